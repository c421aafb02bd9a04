"""Text in and out of a decoder program: UTF-8 bytes for byte-level models (vocabulary 256), otherwise the
Hugging Face tokenizer saved beside the model (loaded from local files only; a tokenizer is data, never code)."""

from __future__ import annotations

import codecs
from pathlib import Path

from transformers import AutoTokenizer

from inferpass.errors import InferpassError
from inferpass.ir.program import Program


class TextCodec:
    """``encode(text) -> ids`` and an incremental ``decoder()`` whose ``push(id)`` returns the new text."""

    def __init__(self, program: Program, folders: list[Path]):
        self.byte_level = program.info.vocab_size == 256
        self.tokenizer = None
        if self.byte_level:
            return
        from_dirs = [Path(f) for f in folders if (Path(f) / "tokenizer.json").is_file()]
        if not from_dirs:
            raise InferpassError(f"{program.info.architecture} has a vocabulary of {program.info.vocab_size} and no "
                                 f"tokenizer was found in {', '.join(map(str, folders))}; save the tokenizer with "
                                 "the model (tokenizer.json) or pass token ids")
        self.tokenizer = AutoTokenizer.from_pretrained(from_dirs[0], local_files_only=True, trust_remote_code=False)

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            return list(text.encode("utf-8"))
        return self.tokenizer.encode(text, add_special_tokens=True)

    def decoder(self) -> "_Incremental":
        return _Incremental(self)


class _Incremental:
    """Text of a growing token sequence, a piece at a time (UTF-8 sequences split over tokens are held back)."""

    def __init__(self, codec: TextCodec):
        self.codec = codec
        self.ids: list[int] = []
        self.shown = ""
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, token: int) -> str:
        if self.codec.tokenizer is None:
            return self.utf8.decode(bytes([token]))
        self.ids.append(token)
        text = self.codec.tokenizer.decode(self.ids, skip_special_tokens=True)
        new, self.shown = text[len(self.shown):], text
        return new
