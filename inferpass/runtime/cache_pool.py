"""The engine's cache: rows allocated once from a ``CacheLayout``, kept dense so a step needs no gathers.

Rows are ordered ``[decoding | prefilling | free]``: a decode step runs on the views
``tensor[:decoding]`` (no copy of any row in), a prefill chunk on one row's view. A row is
a sequence slot of ``max_len`` positions, so an admitted request never runs out of room:
admission by free rows is the whole of memory control. Moving a sequence between rows
(when one finishes, or starts decoding) copies that one row. Lengths live on the host, with each
row's schedule stage: the furthest graph of a decode schedule (``Program.schedule``) it has run,
which it never goes back from (the layers that graph skips have no KV for its later positions).
"""

from __future__ import annotations

import torch

from inferpass.errors import InferpassError
from inferpass.ir.program import CacheLayout


class CachePool:
    """``rows`` cache rows of ``layout`` on ``device``, with each row's owner and written length."""

    def __init__(self, layout: CacheLayout, rows: int, device: torch.device | str = "cpu"):
        if rows < 1:
            raise InferpassError(f"a cache pool needs at least one row, got {rows}")
        self.layout = layout
        self.tensors = layout.allocate(rows, device)
        self.lengths = torch.zeros(rows, dtype=torch.long)
        self.stages = torch.zeros(rows, dtype=torch.long)
        self.owners: list[object | None] = [None] * rows
        self.decoding = 0  # rows [0, decoding) decode; [decoding, used) prefill; the rest are free
        self.used = 0

    @property
    def rows(self) -> int:
        return len(self.owners)

    @property
    def free(self) -> int:
        return self.rows - self.used

    def row_of(self, owner: object) -> int:
        return self.owners.index(owner)

    def acquire(self, owner: object) -> int:
        """A free row for ``owner`` (at the end of the prefilling rows), empty; raises when none is free."""
        if not self.free:
            raise InferpassError(f"cache pool full: all {self.rows} rows are in use")
        row = self.used
        self.used += 1
        self.owners[row], self.lengths[row], self.stages[row] = owner, 0, 0
        if not self.layout.accepts_padding:  # a cache that cannot take stale writes starts clean
            for t in self.tensors:
                t[row].zero_()
        return row

    def start_decoding(self, owner: object) -> int:
        """Move ``owner`` (prefilling) to the end of the decoding rows; returns its new row."""
        row, target = self.row_of(owner), self.decoding
        if not target <= row < self.used:
            raise InferpassError(f"row {row} is not prefilling")
        self._swap(row, target)
        self.decoding += 1
        return target

    def release(self, owner: object) -> None:
        """Free ``owner``'s row, keeping the rows dense (the last row of its segment moves into it)."""
        row = self.row_of(owner)
        if row < self.decoding:
            self._move(self.decoding - 1, row)
            row = self.decoding - 1
            self.decoding -= 1
        self._move(self.used - 1, row)
        self.used -= 1
        self.owners[self.used], self.lengths[self.used], self.stages[self.used] = None, 0, 0

    def truncate(self, owner: object, length: int) -> None:
        """Forget ``owner``'s positions from ``length`` on (where the layout supports rollback)."""
        if not self.layout.supports_rollback:
            raise InferpassError("this cache layout cannot be rolled back (e.g. a quantized cache)")
        row = self.row_of(owner)
        if not 0 <= length <= int(self.lengths[row]):
            raise InferpassError(f"cannot truncate row {row} of length {int(self.lengths[row])} to {length}")
        self.lengths[row] = length

    def views(self, first: int, last: int, tensors: list[int] | None = None) -> list[torch.Tensor]:
        """Rows ``[first, last)`` of the cache tensors (those at layout positions ``tensors``; None = all) as
        views (no copy)."""
        return [self.tensors[i][first:last] for i in (range(len(self.tensors)) if tensors is None else tensors)]

    def write(self, first: int, count: int, written: tuple[torch.Tensor, ...], tokens: int,
              tensors: list[int] | None = None) -> None:
        """Install the first ``count`` rows of what a step over rows ``[first, ...)`` returned for the cache
        tensors at layout positions ``tensors`` (None = all; a padded step returns more rows) and grow their
        lengths by ``tokens``; nothing is copied where the target wrote the views in place."""
        targets = self.tensors if tensors is None else [self.tensors[i] for i in tensors]
        if len(written) != len(targets):
            raise InferpassError(f"step returned {len(written)} cache tensors, it takes {len(targets)}")
        for full, new in zip(targets, written):
            view = full[first:first + count]
            if new.data_ptr() != view.data_ptr():
                view.copy_(new[:count])
        self.lengths[first:first + count] += tokens

    def _move(self, src: int, dst: int) -> None:
        """Copy row ``src`` (contents, owner, length) into ``dst``, whose sequence is gone."""
        if src == dst:
            return
        for t in self.tensors:
            t[dst].copy_(t[src])
        self.owners[dst], self.lengths[dst], self.stages[dst] = self.owners[src], self.lengths[src], self.stages[src]

    def _swap(self, a: int, b: int) -> None:
        if a == b:
            return
        for t in self.tensors:
            held = t[a].clone()
            t[a].copy_(t[b])
            t[b].copy_(held)
        self.owners[a], self.owners[b] = self.owners[b], self.owners[a]
        self.lengths[[a, b]] = self.lengths[[b, a]]
        self.stages[[a, b]] = self.stages[[b, a]]
