"""The step runner: one decode over the pool's decoding rows, or one prefill chunk of a run of rows, through an
``Executable``, choosing graphs by role and writing results back into the pool. The engine, the fixed-batch
``Generator`` and bits-per-byte scoring all run their graphs through it.

A decode runs on views of rows ``[0, n)``; on a target that compiles per call shape it is padded
to a power-of-two batch (one decode function per bucket) over rows whose writes are harmless:
free rows (a row is cleared when acquired where the layout cannot take stale writes), and, where
the layout accepts padding, prefilling rows (the padded step writes one slot past their length,
hidden from every query until their next chunk overwrites it; their lengths do not move).
A prefill chunk runs on the views of its rows. Where the program has a decode schedule
(SkipDecode, ``Program.schedule``) a step runs the graph of its furthest row's position, or of the
furthest stage one of its rows has reached, over that graph's caches only (a batch-uniform budget
that no row ever exceeds again). Logits come back to the host; the cache
inputs are handed over (``Executable.step``), so targets that can write them in place do. ``seconds`` adds up
the time spent in target calls, ``decode_s`` / ``prefill_s`` its split (``draft_s``: the early-exit draft
steps' part of ``decode_s``), ``decode_rows`` the rows decoded (so ``decode_rows / decodes`` is the mean
decode batch).
"""

from __future__ import annotations

import bisect
import time

import torch

from inferpass.errors import InferpassError
from inferpass.runtime.cache_pool import CachePool
from inferpass.targets.base import Executable


def decode_bucket(rows: int, limit: int) -> int:
    """The padded batch for ``rows`` decoding rows: the next power of two, at most ``limit``."""
    return min(1 << (rows - 1).bit_length(), limit)


class StepRunner:
    """Runs steps of ``executable``'s program over ``pool``."""

    def __init__(self, executable: Executable, pool: CachePool):
        self.executable = executable
        self.program = executable.program
        self.pool = pool
        self._draft = self.program.draft_graph()
        self.seconds = self.decode_s = self.prefill_s = self.draft_s = 0.0
        self.decodes = self.decode_rows = self.prefills = 0
        self._schedules: dict[int, tuple[list[str], list[int]]] = {}  # tokens -> graphs, their start positions
        self._tensors: dict[str, list[int]] = {}

    def decode(self, tokens: list[int], graph: str | None = None) -> torch.Tensor:
        """Feed ``tokens[i]`` to decoding row ``i`` (through ``graph``: default by role and schedule); logits
        ``[n, V]``."""
        return self.steps(torch.tensor(tokens)[:, None], graph)[:, -1]

    def steps(self, ids: torch.Tensor, graph: str | None = None) -> torch.Tensor:
        """Feed ``ids`` ``[n, S]`` to decoding rows ``[0, n)`` after their written positions, padded as the module
        doc says (a one-token decode, a draft, an ``S``-token verify step); logits ``[n, S, V]``."""
        pool, (count, tokens) = self.pool, ids.shape
        spare = pool.rows - count if pool.layout.accepts_padding else pool.free if pool.used == count else 0
        batch = min(decode_bucket(count, pool.rows), count + spare) if self.executable.shape_specialized else count
        padded = torch.zeros(batch, tokens, dtype=torch.long)
        padded[:count] = ids
        t0 = self.seconds
        logits = self._run(padded, 0, batch, count, graph)
        self.decode_s += self.seconds - t0
        if graph is not None and graph == self._draft:
            self.draft_s += self.seconds - t0
        self.decodes, self.decode_rows = self.decodes + 1, self.decode_rows + count
        return logits[:count]

    def prefill(self, first: int, ids: torch.Tensor) -> torch.Tensor:
        """Feed ``ids`` ``[n, S]`` to rows ``[first, first + n)`` after their written positions; logits
        ``[n, S, V]``."""
        rows, tokens = ids.shape
        t0 = self.seconds
        logits = self._run(ids, first, rows, rows)
        self.prefill_s += self.seconds - t0
        self.prefills += 1
        return logits

    def _run(self, ids: torch.Tensor, first: int, batch: int, count: int, graph: str | None = None) -> torch.Tensor:
        tokens = ids.shape[1]
        start = self.pool.lengths[first:first + batch].clone()
        graph, stage = (graph, 0) if graph else self._graph(tokens, first, count, int(start[:count].max()))
        tensors = self._tensors.get(graph)
        if tensors is None:
            index = {t.name: i for i, t in enumerate(self.pool.layout.tensors)}
            tensors = self._tensors[graph] = [index[t.name] for t in self.program.cache_tensors(graph)]
        t0 = time.perf_counter()
        logits, *written = self.executable.step(graph, ids, start, *self.pool.views(first, first + batch, tensors))
        logits = logits.cpu()  # waits for the device
        self.seconds += time.perf_counter() - t0
        self.pool.write(first, count, tuple(written), tokens, tensors)
        self.pool.stages[first:first + count] = stage
        return logits

    def _graph(self, tokens: int, first: int, count: int, furthest: int) -> tuple[str, int]:
        """The graph for a step of ``tokens`` over rows ``[first, first + count)`` whose furthest row is at
        position ``furthest``, and its schedule stage: the stage of that position, or the furthest stage a
        row has reached if later (rows never go back to more layers)."""
        if tokens not in self._schedules:
            schedule = self.program.schedule(tokens)
            self._schedules[tokens] = schedule, [self.program.roles[g].from_position for g in schedule[1:]]
        schedule, starts = self._schedules[tokens]
        reached = int(self.pool.stages[first:first + count].max())
        stage = max(reached, bisect.bisect_right(starts, furthest))
        if stage >= len(schedule):
            raise InferpassError(f"rows {first}..{first + count - 1} skipped layers in scheduled decode steps and "
                                 f"cannot run {tokens} tokens through all layers")
        return schedule[stage], stage
