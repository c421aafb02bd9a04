"""Capture: turn a Hugging Face model (directory or module) into a ``Program``."""

from __future__ import annotations

from pathlib import Path

from torch import nn
from transformers import PreTrainedModel

from inferpass import progress
from inferpass.capture.decoder import capture_decoder
from inferpass.capture.encoder import capture_encoder
from inferpass.capture.hf_loader import inspect_model_dir, load_hf_model, model_kind
from inferpass.errors import UnsupportedModelError
from inferpass.ir.program import Program

__all__ = ["capture", "inspect_model_dir", "load_hf_model"]


def capture(source: str | Path | nn.Module, *, max_len: int | None = None) -> Program:
    """Capture ``source`` (a model directory or a transformers ``PreTrainedModel``) as a ``Program``.

    Decoder LMs give ``prefill`` and ``decode`` graphs with a functional cache of
    ``max_len`` positions; encoders give one ``forward`` graph. Every graph is a valid
    ``torch.export.ExportedProgram``. The structure map is checked before returning,
    so an unrecognized architecture fails here, naming what was not recognized (and the
    directory, for a directory). Progress: one step per stage (load, export, structure check).
    """
    from inferpass.ir.verify import check_structure

    if not isinstance(source, (str, Path, PreTrainedModel)):
        raise UnsupportedModelError(
            f"cannot capture {type(source).__name__}: pass a Hugging Face model directory or a PreTrainedModel"
        )
    where = str(source) if isinstance(source, (str, Path)) else None
    with progress.task(f"capturing {where or type(source).__name__}", total=3) as step:
        model = load_hf_model(source) if where else source
        step.advance()
        try:
            if model_kind(model.config.model_type) == "decoder":
                program = capture_decoder(model, max_len=max_len, source=where)
            else:
                program = capture_encoder(model, source=where)
            step.advance()
            check_structure(program)
        except UnsupportedModelError as exc:
            raise UnsupportedModelError(f"{where}: {exc}" if where else str(exc)) from None
        step.advance()
    return program
