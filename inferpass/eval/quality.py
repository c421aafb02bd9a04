"""Quality measures that run through a compiled Program (so they see what passes did)."""

from __future__ import annotations

import torch

from inferpass import progress
from inferpass.eval.bits_per_byte import bits_per_byte
from inferpass.runtime.cache_pool import CachePool
from inferpass.runtime.generator import Generator
from inferpass.runtime.step_runner import StepRunner
from inferpass.targets.base import Executable


def program_bits_per_byte(executable: Executable, data: bytes, *, context: int = 1024, batch: int = 4,
                          chunk: int | None = None) -> float:
    """Bits per byte of a byte-level decoder program on ``data``, scored through its own graphs.

    Windows of ``context`` bytes, non-overlapping (each byte sees 0..context-1 bytes of left context).
    ``chunk=None`` scores a window with one ``prefill``; ``chunk=C`` feeds it C tokens at a time
    through the program's cache (``decode`` for single tokens), so every token attends to what
    earlier calls left in the cache: what a quantized or otherwise rewritten cache serves in decoding.
    """
    program = executable.program
    if program.info.vocab_size != 256:
        raise ValueError(f"bits per byte needs a byte-level model (vocab 256), got vocab {program.info.vocab_size}")
    if program.cache.max_len < context:
        raise ValueError(f"context {context} exceeds the program's max_len {program.cache.max_len}")

    def logits(ids: torch.Tensor) -> dict[str, torch.Tensor]:
        pool = CachePool(program.cache, ids.shape[0], executable.device)
        for row in range(ids.shape[0]):
            pool.acquire(row)
        runner, step = StepRunner(executable, pool), chunk or ids.shape[1]
        return {"model": torch.cat([runner.prefill(0, ids[:, first: first + step])
                                    for first in range(0, ids.shape[1], step)], dim=1)}

    return bits_per_byte(logits, data, context=context, stride=context, batch=batch)["model"]


def greedy_agreement(
    baseline: Executable, candidate: Executable, prompts: list[list[int]], new_tokens: int
) -> float:
    """Mean fraction of ``new_tokens`` greedy tokens the candidate generates identically to the baseline
    before the first divergence (1.0 = identical continuations for every prompt)."""
    with progress.task("greedy agreement", total=2) as step:
        want = Generator(baseline).generate(prompts, new_tokens).tokens
        step.advance()
        got = Generator(candidate).generate(prompts, new_tokens).tokens
        step.advance()
    fractions = []
    for w, g in zip(want, got):
        same = 0
        while same < min(len(w), len(g)) and w[same] == g[same]:
            same += 1
        fractions.append(same / len(w))
    return sum(fractions) / len(fractions)


def accuracy(
    executable: Executable, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor, batch: int = 64
) -> float:
    """Top-1 accuracy of an encoder classifier program; ``inputs`` are its ``forward`` inputs, batch-first."""
    correct = 0
    for i in range(0, len(labels), batch):
        (logits,) = executable.run(executable.program.graph_for(), *(x[i : i + batch] for x in inputs))
        correct += int((logits.cpu().argmax(-1) == labels[i : i + batch]).sum())
    return correct / len(labels)
