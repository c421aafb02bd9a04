"""Work planning for split-KV decode attention: which program reads which KV blocks.

The work is a list of *tiles*: for every (batch row b, KV head k), the row's valid
cache prefix ``min(start[b] + q_len, cache_len)`` cut into blocks of ``block_n``
slots. Heads are numbered ``h = b * kv_heads + k`` and their tiles are laid out
one head after another in a flat tile index. A *schedule* gives each program a
contiguous *run* of that flat index:

* ``single``: one program per head, no split, no reduction (plain flash decoding).
* ``split`` (Flash-Decoding): ``splits`` programs per head; program ``j`` of head
  ``h`` takes tiles ``[j·n // splits, (j+1)·n // splits)`` of the head's ``n``.
  Runs never cross heads; a stage-2 reduction merges each head's partials.
* ``stream-k`` (LeanAttention): ``programs`` persistent programs share all ``T``
  tiles equally, program ``p`` taking flat tiles ``[p·T // P, (p+1)·T // P)``. A
  run may cross head boundaries; each (program, head) segment writes a partial in
  slot ``h + p`` (distinct for distinct segments, because runs are ordered) and
  the reduction merges a head's slots ``h + p`` for ``p`` in its program range.

The Triton kernels compute the same runs on the device from ``start``, so a plan
needs no host-side lengths: ``DecodePlan`` fixes only the grid (schedule, split
count, program count, block size), chosen from static sizes and the device's
parallelism (``device_workers``). ``runs`` is the host-side model of the kernels'
assignment, used by ``describe`` and by tests.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

Schedule = Literal["single", "split", "stream-k"]
MAX_SPLITS = 128
FILL_FRACTION = 0.8  # no split when one-program-per-head already fills this share of the workers
WAVE_TOLERANCE = 0.85  # split count: the smallest within this factor of the best wave efficiency
PROGRAMS_PER_WORKER = 2  # stream-k: persistent programs per SM (or per CPU thread)
REFERENCE_SMS = 132  # plans shown without a GPU are for an H100 SXM


class DecodePlan(BaseModel):
    """A fixed work split for one decode-attention call shape; the same plan gives bit-identical results."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    schedule: Schedule
    splits: int
    programs: int
    block_n: int
    heads: int
    workers: int
    reason: str

    def describe(self) -> str:
        """One line for ``--explain``: the schedule, the grid and why it was chosen."""
        grid = {"single": f"{self.heads} programs (one per batch row × KV head)",
                "split": f"{self.heads} heads × {self.splits} splits = {self.programs} programs + reduction",
                "stream-k": f"{self.programs} persistent programs over all tiles + reduction"}[self.schedule]
        return f"{self.schedule}: {grid}, block_n={self.block_n}, workers={self.workers} ({self.reason})"


def head_tiles(lengths: list[int], kv_heads: int, block_n: int) -> list[int]:
    """Tiles per head ``h = b * kv_heads + k`` for per-row valid lengths."""
    return [math.ceil(n / block_n) for n in lengths for _ in range(kv_heads)]


def runs(plan: DecodePlan, tiles: list[int]) -> list[tuple[int, int, int, int]]:
    """The kernels' assignment as ``(program, head, first_tile, end_tile)`` segments, tiles local to the head.

    Empty segments are omitted. Every tile of every head appears in exactly one segment.
    """
    if plan.schedule == "single":
        return [(h, h, 0, n) for h, n in enumerate(tiles) if n]
    if plan.schedule == "split":
        out = []
        for h, n in enumerate(tiles):
            for j in range(plan.splits):
                lo, hi = j * n // plan.splits, (j + 1) * n // plan.splits
                if hi > lo:
                    out.append((h * plan.splits + j, h, lo, hi))
        return out
    offsets = [0]
    for n in tiles:
        offsets.append(offsets[-1] + n)
    total, out = offsets[-1], []
    for p in range(plan.programs):
        t, end = p * total // plan.programs, (p + 1) * total // plan.programs
        h = 0
        while t < end:
            while offsets[h + 1] <= t:
                h += 1
            seg_end = min(end, offsets[h + 1])
            out.append((p, h, t - offsets[h], seg_end - offsets[h]))
            t = seg_end
    return out


def plan_decode_attention(
    batch: int,
    kv_heads: int,
    cache_len: int,
    workers: int,
    *,
    schedule: Literal["auto", "single", "split", "stream-k"] = "auto",
    splits: int | Literal["auto"] = "auto",
    block_n: int = 64,
) -> DecodePlan:
    """Choose the grid for ``batch × kv_heads`` heads over a cache of ``cache_len`` slots.

    ``workers`` is the number of programs the device runs at once (SMs, or CPU
    threads). ``auto`` keeps one program per head when that already fills
    ``FILL_FRACTION`` of the workers or a head has a single tile (splitting does not
    pay), and otherwise uses stream-K. The planner sizes the split for a full cache
    (``cache_len`` slots per row); the kernels divide the actual lengths.
    """
    if batch < 1 or kv_heads < 1 or cache_len < 1 or workers < 1:
        raise ValueError(f"plan needs positive sizes, got batch={batch} kv_heads={kv_heads} "
                         f"cache_len={cache_len} workers={workers}")
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    if splits != "auto" and not (isinstance(splits, int) and splits >= 1):
        raise ValueError(f"splits must be 'auto' or a positive int, got {splits!r}")
    heads = batch * kv_heads
    tiles = math.ceil(cache_len / block_n)

    def make(kind: Schedule, n_splits: int, programs: int, reason: str) -> DecodePlan:
        return DecodePlan(schedule=kind, splits=n_splits, programs=programs, block_n=block_n, heads=heads,
                          workers=workers, reason=reason)

    if schedule == "auto":
        if tiles <= 1:
            return make("single", 1, heads, f"one {block_n}-slot tile per head: nothing to split")
        if heads >= FILL_FRACTION * workers:
            return make("single", 1, heads, f"{heads} heads already fill {heads / workers:.0%} of {workers} workers")
        schedule = "stream-k"
    if schedule == "single":
        return make("single", 1, heads, "requested")
    if schedule == "split":
        n = _flash_decoding_splits(heads, tiles, workers) if splits == "auto" else splits
        return make("split", n, heads * n, "requested" if splits != "auto" else "Flash-Decoding wave heuristic")
    programs = max(1, min(PROGRAMS_PER_WORKER * workers, heads * tiles))
    return make("stream-k", 1, programs, f"{heads * tiles} tiles over {programs} programs")


def _flash_decoding_splits(heads: int, tiles: int, workers: int) -> int:
    """Smallest split count within ``WAVE_TOLERANCE`` of the best wave efficiency (at most ``MAX_SPLITS``)."""
    if heads >= FILL_FRACTION * workers:
        return 1
    candidates = range(1, min(MAX_SPLITS, tiles) + 1)

    def efficiency(n: int) -> float:
        programs = heads * n
        return programs / (math.ceil(programs / workers) * workers)

    best = max(efficiency(n) for n in candidates)
    return next(n for n in candidates if efficiency(n) >= WAVE_TOLERANCE * best)


@functools.lru_cache(maxsize=256)
def cached_plan(batch: int, kv_heads: int, cache_len: int, workers: int, schedule: str, splits: int,
                block_n: int) -> DecodePlan:
    """``plan_decode_attention`` memoized on the call shape (splits -1 = auto)."""
    return plan_decode_attention(batch, kv_heads, cache_len, workers, schedule=schedule,
                                 splits="auto" if splits < 0 else splits, block_n=block_n)


def device_workers(device: torch.device) -> int:
    """Programs the device runs at once: SMs on CUDA, threads on CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return torch.get_num_threads()


def planning_workers() -> int:
    """SMs of the local GPU, or ``REFERENCE_SMS`` without one: the device ``--explain`` shows plans for."""
    return device_workers(torch.device("cuda")) if torch.cuda.is_available() else REFERENCE_SMS
