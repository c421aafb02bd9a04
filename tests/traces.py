"""Shared test helpers: a decoder's logits through prefill and decode steps, and the quantization-error bound."""

from __future__ import annotations

import torch

from inferpass.runtime.generator import Generator
from inferpass.targets import Executable, get_target


def trace(program_or_executable, prompts: list[list[int]], steps: int = 8, *, feed: str = "fixed") -> torch.Tensor:
    """Logits ``[steps + 1, B, V]``: of each prompt's last token, then of ``steps`` decode steps.

    Decode steps are fed fixed tokens (``feed="fixed"``: ``(5 i + 3 r) mod V`` for step i, row r, so
    two programs see the same inputs however they differ) or their own greedy tokens
    (``feed="greedy"``). A ``Program`` runs on the eager target.
    """
    executable = program_or_executable if isinstance(program_or_executable, Executable) else \
        get_target("eager").compile(program_or_executable)
    gen = Generator(executable)
    logits, cache, lengths = gen.prefill(prompts)
    out = [logits[torch.arange(len(prompts)), lengths - 1]]
    vocab = executable.program.info.vocab_size
    for i in range(steps):
        tokens = out[-1].argmax(-1) if feed == "greedy" else torch.tensor(
            [(5 * i + 3 * r) % vocab for r in range(len(prompts))])
        out.append(gen.decode(cache, tokens))
    return torch.stack(out)


def assert_within_quantization_error(got: torch.Tensor, quantized: torch.Tensor, reference: torch.Tensor) -> None:
    """``got`` (a quantized program on some target) is within twice the eager quantized program's error
    (``quantized``) of the full-precision ``reference`` trace (plus fp32 slack)."""
    error = (quantized - reference).abs().max()
    assert (got - reference).abs().max() <= 2 * error + 1e-5, f"{(got - reference).abs().max()} > 2 x {error}"
