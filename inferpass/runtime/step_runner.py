"""The step runner: one decode over the pool's decoding rows, or one prefill chunk of one row, through an
``Executable``, choosing graphs by role and writing results back into the pool.

A decode runs on views of rows ``[0, n)``; where the layout accepts padding and the rows
after them are free, it is padded to a power-of-two batch (static-shape targets compile
one decode function per bucket; padded rows are free rows, so their writes are harmless).
A prefill chunk runs on one row's view. Logits come back to the host. ``seconds`` adds up
the time spent in target calls.
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
        self.seconds = 0.0

    def decode(self, tokens: list[int]) -> torch.Tensor:
        """Feed ``tokens[i]`` to decoding row ``i``; logits ``[n, V]``."""
        pool, count = self.pool, len(tokens)
        padded = pool.layout.accepts_padding and pool.used == count
        batch = decode_bucket(count, pool.rows) if padded else count
        ids = torch.zeros(batch, 1, dtype=torch.long)
        ids[:count, 0] = torch.tensor(tokens)
        logits = self._run(self.program.graph_for(1), ids, 0, batch, count, 1)
        return logits[:count, -1]

    def prefill(self, row: int, ids: list[int]) -> torch.Tensor:
        """Feed the chunk ``ids`` to ``row`` after its written positions; logits of its last token ``[V]``."""
        logits = self._run(self.program.graph_for(len(ids)), torch.tensor([ids]), row, 1, 1, len(ids))
        return logits[0, -1]

    def _run(self, graph: str, ids: torch.Tensor, first: int, batch: int, count: int, tokens: int) -> torch.Tensor:
        start = self.pool.lengths[first:first + batch].clone()
        t0 = time.perf_counter()
        logits, *written = self.executable.run(graph, ids, start, *self.pool.views(first, first + batch))
        logits = logits.cpu()  # waits for the device
        self.seconds += time.perf_counter() - t0
        self.pool.write(first, count, tuple(written), tokens)
        return logits
