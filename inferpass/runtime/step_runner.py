"""The step runner: one decode over the pool's decoding rows, or one prefill chunk of a run of rows, through an
``Executable``, choosing graphs by role and writing results back into the pool. The engine, the fixed-batch
``Generator`` and bits-per-byte scoring all run their graphs through it.

A decode runs on views of rows ``[0, n)``; on a target that compiles per call shape it is padded
to a power-of-two batch (one decode function per bucket) over rows whose writes are harmless:
free rows (a row is cleared when acquired where the layout cannot take stale writes), and, where
the layout accepts padding, prefilling rows (the padded step writes one slot past their length,
hidden from every query until their next chunk overwrites it; their lengths do not move).
A prefill chunk runs on the views of its rows. Logits come back to the host; the cache
inputs are handed over (``Executable.step``), so targets that can write them in place do. ``seconds`` adds up
the time spent in target calls, ``decode_s`` / ``prefill_s`` its split, ``decode_rows`` the rows decoded
(so ``decode_rows / decodes`` is the mean decode batch).
"""

from __future__ import annotations

import time

import torch

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
        self.seconds = self.decode_s = self.prefill_s = 0.0
        self.decodes = self.decode_rows = self.prefills = 0

    def decode(self, tokens: list[int]) -> torch.Tensor:
        """Feed ``tokens[i]`` to decoding row ``i``; logits ``[n, V]``."""
        pool, count = self.pool, len(tokens)
        spare = pool.rows - count if pool.layout.accepts_padding else pool.free if pool.used == count else 0
        batch = min(decode_bucket(count, pool.rows), count + spare) if self.executable.shape_specialized else count
        ids = torch.zeros(batch, 1, dtype=torch.long)
        ids[:count, 0] = torch.tensor(tokens)
        t0 = self.seconds
        logits = self._run(self.program.graph_for(1), ids, 0, batch, count, 1)
        self.decode_s += self.seconds - t0
        self.decodes, self.decode_rows = self.decodes + 1, self.decode_rows + count
        return logits[:count, -1]

    def prefill(self, first: int, ids: torch.Tensor) -> torch.Tensor:
        """Feed ``ids`` ``[n, S]`` to rows ``[first, first + n)`` after their written positions; logits
        ``[n, S, V]``."""
        rows, tokens = ids.shape
        t0 = self.seconds
        logits = self._run(self.program.graph_for(tokens), ids, first, rows, rows, tokens)
        self.prefill_s += self.seconds - t0
        self.prefills += 1
        return logits

    def _run(self, graph: str, ids: torch.Tensor, first: int, batch: int, count: int, tokens: int) -> torch.Tensor:
        start = self.pool.lengths[first:first + batch].clone()
        t0 = time.perf_counter()
        logits, *written = self.executable.step(graph, ids, start, *self.pool.views(first, first + batch))
        logits = logits.cpu()  # waits for the device
        self.seconds += time.perf_counter() - t0
        self.pool.write(first, count, tuple(written), tokens)
        return logits
