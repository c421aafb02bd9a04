"""The generation loop: prefill a (ragged) batch of prompts, then decode token by token, greedy or sampled."""

from __future__ import annotations

import operator
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from inferpass.errors import InferpassError
from inferpass.runtime.kv_cache import KVCache
from inferpass.targets.base import Executable


@dataclass
class Generation:
    """Generated token ids per row and where the time went (seconds)."""

    tokens: list[list[int]]
    prefill_seconds: float
    decode_seconds: list[float] = field(default_factory=list)


def token_id(value, where: str, vocab: int | None) -> int:
    """``value`` as a token id; raises ``InferpassError`` naming ``where`` (e.g. "prompt 1, position 3") for a
    non-integer (floats and bools too: never truncated) or an id outside ``[0, vocab)``."""
    try:
        if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
            raise TypeError
        token = operator.index(value)
    except TypeError:
        raise InferpassError(f"{where}: token id {value!r} is a "
                             f"{type(value).__name__}, not an integer") from None
    if token < 0 or (vocab is not None and token >= vocab):
        raise InferpassError(f"{where}: token id {token} is outside the vocabulary "
                             f"[0, {vocab}) of this program")
    return token


def check_prompts(prompts: list[list[int]], vocab: int | None) -> list[list[int]]:
    """The prompts as lists of int token ids; raises ``InferpassError`` for an empty batch ("no prompts"),
    an empty prompt, or a bad token id (see ``token_id``)."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence | torch.Tensor):
        raise InferpassError(f"prompts must be a list of token-id lists, got a {type(prompts).__name__}")
    if len(prompts) == 0:
        raise InferpassError("no prompts: the batch is empty")
    checked = []
    for row, prompt in enumerate(prompts):
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence | torch.Tensor):
            raise InferpassError(f"prompt {row} must be a list of token ids, got a {type(prompt).__name__}")
        if len(prompt) == 0:
            raise InferpassError(f"prompt {row} is empty: every prompt needs at least one token")
        checked.append([token_id(t, f"prompt {row}, position {i}", vocab) for i, t in enumerate(prompt)])
    return checked


def _pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, : len(p)] = torch.tensor(p, dtype=torch.long)
    return ids, torch.tensor([len(p) for p in prompts], dtype=torch.long)


class Generator:
    """Runs a decoder ``Executable``'s prefill and decode graphs over a runtime-owned ``KVCache``."""

    def __init__(self, executable: Executable):
        program = executable.program
        if not program.is_decoder:
            raise InferpassError(f"{program.info.architecture} is not a decoder; nothing to generate")
        self.executable = executable
        self.program = program
        self.layout = program.cache

    def check_request(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """The prompts as int lists, or ``InferpassError`` before any work: prompts as in ``check_prompts``,
        ``max_new_tokens`` an int >= 0, and every prompt plus its ``max_new_tokens - 1`` fed-back tokens
        within the cache's ``max_len``."""
        prompts = check_prompts(prompts, self.program.info.vocab_size)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise InferpassError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        row = max(range(len(prompts)), key=lambda r: len(prompts[r]))
        length, max_len = len(prompts[row]), self.layout.max_len
        needed = length + max(max_new_tokens, 1) - 1
        if needed > max_len:
            room = (f"at most {max_len - length + 1} new tokens for this prompt" if length <= max_len
                    else "the prompt alone does not fit")
            raise InferpassError(f"prompt {row} ({length} tokens) + max_new_tokens {max_new_tokens} needs {needed} "
                                 f"cache positions; the program's max_len is {max_len} ({room})")
        return prompts

    def prefill(self, prompts: list[list[int]]) -> tuple[torch.Tensor, KVCache, torch.Tensor]:
        """Prefill a batch of prompts; return (logits [B, S_max, V] on the host, right-padded with zeros, the cache
        on the executable's device, lengths).

        Rows are prefilled in groups of equal prompt length, so every row's cache holds exactly
        its prompt: nothing is written past a row's length (a padded token could otherwise
        reach a cache that cannot take writes back, such as a quantized one).
        """
        ids, lengths = _pad(self.check_request(prompts, 1))
        cache = KVCache(self.layout, len(prompts), self.executable.device)
        cache.reserve(lengths)
        logits = None
        for length in sorted(set(lengths.tolist())):
            rows = torch.nonzero(lengths == length).flatten()
            whole = len(rows) == len(prompts)  # one length for all: no gather/scatter copies of the cache
            start = cache.lengths[rows]
            graph = self.program.graph_for(length)
            out, *written = self.executable.run(graph, ids[rows, :length], start,
                                                *(cache.tensors if whole else cache.rows(rows)))
            if whole:
                cache.advance(tuple(written), lengths)
            else:
                cache.advance_rows(rows, tuple(written), length)
            out = out.cpu()
            if logits is None:
                logits = out.new_zeros(len(prompts), ids.shape[1], out.shape[-1])
            logits[rows, :length] = out
        return logits, cache, lengths

    def decode(self, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row; return logits ``[B, V]`` (on the host)."""
        one = torch.ones(cache.batch, dtype=torch.long)
        start = cache.reserve(one)
        logits, *written = self.executable.run(self.program.graph_for(1), tokens.view(-1, 1), start, *cache.tensors)
        cache.advance(tuple(written), one)
        return logits[:, -1].cpu()

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        seed: int = 0,
        eos_token_id: int | None = None,
    ) -> Generation:
        """Generate up to ``max_new_tokens`` per row; ``temperature=0`` is greedy (argmax).

        The request is checked first (``check_request``); ``max_new_tokens=0`` returns an empty list per
        row and runs nothing.
        """
        prompts = self.check_request(prompts, max_new_tokens)
        if max_new_tokens == 0:
            return Generation([[] for _ in prompts], 0.0)
        gen = torch.Generator().manual_seed(seed)

        def pick(logits: torch.Tensor) -> torch.Tensor:
            if temperature <= 0:
                return logits.argmax(-1)
            probs = torch.softmax(logits.float() / temperature, -1)
            return torch.multinomial(probs, 1, generator=gen).squeeze(-1)

        t0 = time.perf_counter()
        logits, cache, lengths = self.prefill(prompts)
        rows = torch.arange(len(prompts))
        nxt = pick(logits[rows, lengths - 1])
        result = Generation([[int(t)] for t in nxt], time.perf_counter() - t0)
        done = torch.zeros(len(prompts), dtype=torch.bool)
        for _ in range(max_new_tokens - 1):
            if eos_token_id is not None:
                done |= nxt == eos_token_id
                if bool(done.all()):
                    break
            t0 = time.perf_counter()
            nxt = pick(self.decode(cache, nxt))
            result.decode_seconds.append(time.perf_counter() - t0)
            for row, tok in enumerate(nxt.tolist()):
                if not bool(done[row]):
                    result.tokens[row].append(tok)
        return result
