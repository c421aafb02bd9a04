"""Speed and memory measures: prefill latency, decode tokens/s, request latency percentiles, peak RSS.

Absolute times on a shared machine are noise: programs are measured interleaved in one
process, and the report compares them as ratios.
"""

from __future__ import annotations

import re
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from inferpass.runtime.generator import Generator
from inferpass.targets.base import Executable

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


def decoder_speeds(executables: list[Executable], prompts: list[list[int]], new_tokens: int, repeats: int = 3) -> list[dict]:
    """Per executable: prefill seconds (median), decode tokens/s (median step), request latency p50/p90/p99, peak RSS.

    Interleaved: every prompt of every repeat runs on each executable in turn, so machine
    drift hits all of them alike and their ratios stay fair. One untimed warm-up per prompt
    length comes first, so first-use compilation is not counted as latency.
    """
    gens = [Generator(e) for e in executables]
    for gen in gens:  # untimed: ahead-of-time targets compile (or load) each new call shape on first use
        for length in sorted({len(p) for p in prompts}):
            gen.generate([next(p for p in prompts if len(p) == length)], new_tokens)
    samples = [{"prefill": [], "steps": [], "latency": []} for _ in gens]
    for _ in range(repeats):
        for prompt in prompts:
            for gen, sample in zip(gens, samples):
                t0 = time.perf_counter()
                out = gen.generate([prompt], new_tokens)
                sample["latency"].append(time.perf_counter() - t0)
                sample["prefill"].append(out.prefill_seconds)
                sample["steps"].extend(out.decode_seconds)
    results = []
    for gen, sample in zip(gens, samples):
        steps, latency = sample["steps"], sample["latency"]
        results.append({
            "prefill_s": statistics.median(sample["prefill"]),
            "decode_tok_s": 1.0 / statistics.median(steps) if steps else float("nan"),
            "latency_p50_s": percentile(latency, 0.5),
            "latency_p90_s": percentile(latency, 0.9),
            "latency_p99_s": percentile(latency, 0.99),
            "peak_rss_bytes": peak_memory_bytes(lambda g=gen: g.generate(prompts, new_tokens)),
        })
    return results


def encoder_speeds(executables: list[Executable], inputs: tuple[torch.Tensor, ...], repeats: int = 5) -> list[dict]:
    """Per executable: forward latency (median seconds per batch, interleaved runs) and peak RSS for one batch."""
    times: list[list[float]] = [[] for _ in executables]
    for _ in range(repeats):
        for executable, samples in zip(executables, times):
            t0 = time.perf_counter()
            executable.run("forward", *inputs)[0].cpu()  # waits for a device to finish
            samples.append(time.perf_counter() - t0)
    return [
        {
            "forward_s": statistics.median(samples),
            "peak_rss_bytes": peak_memory_bytes(lambda e=executable: e.run("forward", *inputs)),
        }
        for executable, samples in zip(executables, times)
    ]
