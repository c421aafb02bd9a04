"""Speed and memory measures: prefill latency, decode tokens/s, request latency percentiles, peak RSS.

Absolute times on a shared machine are noise; ``compare`` runs baseline and candidate
interleaved in one process and reports ratios.
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

_HWM = re.compile(r"VmHWM:\s+(\d+) kB")


def _status_kb(pattern: re.Pattern) -> int | None:
    try:
        match = pattern.search(Path("/proc/self/status").read_text())
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
    return _status_kb(_HWM)


def percentile(values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``values`` by linear interpolation."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def decoder_speed(executable: Executable, prompts: list[list[int]], new_tokens: int, repeats: int = 3) -> dict:
    """Prefill seconds (median), decode tokens/s (median over steps), request latency p50/p90/p99, peak RSS."""
    gen = Generator(executable)
    prefill, steps, latency = [], [], []
    for _ in range(repeats):
        for prompt in prompts:
            t0 = time.perf_counter()
            out = gen.generate([prompt], new_tokens)
            latency.append(time.perf_counter() - t0)
            prefill.append(out.prefill_seconds)
            steps.extend(out.decode_seconds)
    peak = peak_memory_bytes(lambda: gen.generate(prompts, new_tokens))
    return {
        "prefill_s": statistics.median(prefill),
        "decode_tok_s": 1.0 / statistics.median(steps) if steps else float("nan"),
        "latency_p50_s": percentile(latency, 0.5),
        "latency_p90_s": percentile(latency, 0.9),
        "latency_p99_s": percentile(latency, 0.99),
        "peak_rss_bytes": peak,
    }


def encoder_speed(executable: Executable, inputs: torch.Tensor, repeats: int = 5) -> dict:
    """Forward latency (median seconds per batch) and peak RSS growth for one batch."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        executable.run("forward", inputs)
        times.append(time.perf_counter() - t0)
    return {"forward_s": statistics.median(times), "peak_rss_bytes": peak_memory_bytes(lambda: executable.run("forward", inputs))}
