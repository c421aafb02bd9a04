"""Speed and memory measures: prefill latency, decode tokens/s, request latency percentiles, peak RSS.

Absolute times on a shared machine are noise: programs are measured interleaved in one
process, and the report compares them as ratios. Rounds of interleaved runs repeat until every
headline ratio is stable (relative 95% confidence half-width of its per-round values at most
``STABLE_SPREAD``) or a round/time bound is hit; the result says how many rounds it took and
the spread of each ratio, so a busy machine shows a wide spread instead of a confident verdict.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from inferpass import progress
from inferpass.runtime.generator import Generator
from inferpass.targets.base import Executable

STABLE_SPREAD = 0.05  # relative 95% CI half-width of a ratio at which rounds stop
BUDGET_S = 120.0  # no new round starts after this many seconds (min_repeats rounds always run)
_T975 = {1: 12.71,  # Student t, 97.5% quantile by degrees of freedom; beyond: 1.96 + 2.5/df (within 1%)
 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def process_status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (e.g. ``VmHWM``, ``VmSize``) in bytes; None where unavailable."""
    try:
        match = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def peak_memory_bytes(fn: Callable[[], object]) -> int | None:
    """Peak resident set size of the process (bytes) while ``fn`` runs, the process's own base included.

    The peak is reset first (Linux ``clear_refs``), so two calls in one process compare
    fairly; None where that reset is unavailable.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    fn()
    return process_status_bytes("VmHWM")


def percentile(values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``values`` by linear interpolation."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def relative_spread(values: list[float]) -> float:
    """Half-width of the 95% confidence interval of the mean of ``values`` (Student's t), relative to the mean."""
    if len(values) < 2:
        return math.inf
    mean = statistics.fmean(values)
    t = _T975.get(len(values) - 1, 1.96 + 2.5 / (len(values) - 1))
    return t * statistics.stdev(values) / math.sqrt(len(values)) / abs(mean) if mean else math.inf


@dataclass
class Speeds:
    """Figures per executable, the interleaved rounds measured, and per figure the spread of its ratio to the
    first executable (``relative_spread`` of the per-round ratios, worst over executables); ``stable`` when
    every headline ratio's spread reached ``STABLE_SPREAD``."""

    figures: list[dict]
    repeats: int
    spread: dict[str, float]
    stable: bool


def repeat_until_stable(round_: Callable[[], list[dict[str, float]]], headline: tuple[str, ...], *, what: str,
                        min_repeats: int, max_repeats: int, budget_s: float = BUDGET_S) -> tuple[int, dict, bool]:
    """Run ``round_`` (one interleaved round; per executable, that round's figures) until the ratios of the
    ``headline`` figures to the first executable's are stable, ``max_repeats`` rounds ran, or ``budget_s``
    passed (after ``min_repeats``). Returns (rounds, spread per figure, stable)."""
    ratios: dict[str, list[list[float]]] = {}
    spread, stable, t0 = {}, False, time.perf_counter()
    with progress.task(f"{what}: up to {max_repeats} rounds, until ratios are stable to ±{STABLE_SPREAD:.0%}",
                       total=max_repeats) as step:
        for done in range(1, max_repeats + 1):
            figures = round_()
            for key in figures[0]:
                per_exec = ratios.setdefault(key, [[] for _ in figures[1:]])
                for values, other in zip(per_exec, figures[1:]):
                    values.append(other[key] / figures[0][key] if figures[0][key] else math.nan)
            spread = {key: max(relative_spread(v) for v in per_exec) for key, per_exec in ratios.items()}
            stable = all(spread[key] <= STABLE_SPREAD for key in headline)
            step.advance()
            if done >= min_repeats and (stable or time.perf_counter() - t0 > budget_s):
                break
    return done, spread, stable


def decoder_speeds(executables: list[Executable], prompts: list[list[int]], new_tokens: int, *, min_repeats: int = 3,
                   max_repeats: int = 10, budget_s: float = BUDGET_S) -> Speeds:
    """Per executable: prefill seconds (median), decode tokens/s (median step), request latency p50/p90/p99, peak RSS.

    Interleaved: in every round each prompt runs on each executable in turn, so machine drift hits
    all of them alike; rounds repeat until the prefill, decode and p50 latency ratios are stable
    (``repeat_until_stable``). One untimed warm-up per prompt length comes first, so first-use
    compilation is not counted as latency.
    """
    gens = [Generator(e) for e in executables]
    lengths = sorted({len(p) for p in prompts})
    with progress.task("warming up (first calls compile on ahead-of-time targets)", total=len(gens) * len(lengths)) as step:
        for gen in gens:
            for length in lengths:
                gen.generate([next(p for p in prompts if len(p) == length)], new_tokens)
                step.advance()
    samples = [{"prefill": [], "steps": [], "latency": []} for _ in gens]

    def round_() -> list[dict[str, float]]:
        now = [{"prefill": [], "steps": [], "latency": []} for _ in gens]
        for prompt in prompts:
            for gen, sample in zip(gens, now):
                t0 = time.perf_counter()
                out = gen.generate([prompt], new_tokens)
                sample["latency"].append(time.perf_counter() - t0)
                sample["prefill"].append(out.prefill_seconds)
                sample["steps"].extend(out.decode_seconds)
        for total, sample in zip(samples, now):
            for key in total:
                total[key] += sample[key]
        return [_decoder_figures(sample) for sample in now]

    repeats, spread, stable = repeat_until_stable(
        round_, ("prefill_s", "decode_tok_s", "latency_p50_s"), what="measuring decoder speed",
        min_repeats=min_repeats, max_repeats=max_repeats, budget_s=budget_s)
    figures = [_decoder_figures(sample) for sample in samples]
    for gen, figure in zip(gens, figures):
        figure["peak_rss_bytes"] = peak_memory_bytes(lambda g=gen: g.generate(prompts, new_tokens))
    return Speeds(figures, repeats, spread, stable)


def _decoder_figures(sample: dict[str, list[float]]) -> dict[str, float]:
    steps, latency = sample["steps"], sample["latency"]
    return {
        "prefill_s": statistics.median(sample["prefill"]),
        "decode_tok_s": 1.0 / statistics.median(steps) if steps else float("nan"),
        "latency_p50_s": percentile(latency, 0.5),
        "latency_p90_s": percentile(latency, 0.9),
        "latency_p99_s": percentile(latency, 0.99),
    }


def encoder_speeds(executables: list[Executable], inputs: tuple[torch.Tensor, ...], *, min_repeats: int = 5,
                   max_repeats: int = 30, budget_s: float = BUDGET_S) -> Speeds:
    """Per executable: forward latency (median seconds per batch over interleaved rounds, repeated until its
    ratio is stable) and peak RSS for one batch."""
    times: list[list[float]] = [[] for _ in executables]

    def round_() -> list[dict[str, float]]:
        for executable, samples in zip(executables, times):
            t0 = time.perf_counter()
            executable.run(executable.program.graph_for(), *inputs)[0].cpu()  # waits for a device to finish
            samples.append(time.perf_counter() - t0)
        return [{"forward_s": samples[-1]} for samples in times]

    repeats, spread, stable = repeat_until_stable(round_, ("forward_s",), what="measuring encoder speed",
                                                  min_repeats=min_repeats, max_repeats=max_repeats, budget_s=budget_s)
    figures = [
        {
            "forward_s": statistics.median(samples),
            "peak_rss_bytes": peak_memory_bytes(lambda e=executable: e.run(e.program.graph_for(), *inputs)),
        }
        for executable, samples in zip(executables, times)
    ]
    return Speeds(figures, repeats, spread, stable)
