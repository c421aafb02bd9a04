"""The runtime-owned KV cache: tensors allocated from a Program's ``CacheLayout``, replaced after each step."""

from __future__ import annotations

import torch

from inferpass.errors import InferpassError
from inferpass.ir.program import CacheLayout


class KVCache:
    """Cache tensors for ``batch`` sequences plus each row's written length.

    Each step returns written caches (new tensors, or on targets that keep cache memory the
    same tensors written in place), which ``advance`` installs as the current state. The
    tensors live on ``device``; the lengths stay on the host (bookkeeping, never a device sync).
    """

    def __init__(self, layout: CacheLayout, batch: int, device: torch.device | str = "cpu"):
        self.layout = layout
        self.tensors = layout.allocate(batch, device)
        self.lengths = torch.zeros(batch, dtype=torch.long)

    @property
    def batch(self) -> int:
        return int(self.lengths.shape[0])

    def reserve(self, tokens: torch.Tensor) -> torch.Tensor:
        """Start positions for writing ``tokens[b]`` more tokens per row; raises when a row would overflow."""
        end = self.lengths + tokens
        if int(end.max()) > self.layout.max_len:
            row = int(end.argmax())
            raise InferpassError(
                f"row {row} needs {int(end[row])} cache positions but the program was captured with "
                f"max_len={self.layout.max_len} (capture again with a larger --max-len)"
            )
        return self.lengths.clone()

    def advance(self, written: tuple[torch.Tensor, ...], tokens: torch.Tensor) -> None:
        """Install the caches a step returned and grow each row's length by ``tokens[b]``."""
        if len(written) != len(self.tensors):
            raise InferpassError(f"step returned {len(written)} cache tensors, layout has {len(self.tensors)}")
        self.tensors = list(written)
        self.lengths = self.lengths + tokens

    def rows(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """The cache tensors of a subset of rows (copies), for a step over those rows only."""
        return [t[rows] for t in self.tensors]

    def advance_rows(self, rows: torch.Tensor, written: tuple[torch.Tensor, ...], tokens: int) -> None:
        """Install the caches a step over ``rows`` returned and grow those rows' lengths by ``tokens``."""
        if len(written) != len(self.tensors):
            raise InferpassError(f"step returned {len(written)} cache tensors, layout has {len(self.tensors)}")
        for full, part in zip(self.tensors, written):
            full[rows] = part
        self.lengths[rows] += tokens
