"""A transformers ``Cache`` whose tensors are explicit values, never hidden buffers.

The captured graph takes each layer's key and value cache as inputs and returns
the written caches as outputs, so the runtime owns cache memory and every
compiler in the stack (torch.export, torch-mlir, IREE, Inductor) sees a pure
function.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache


def write_positions(cache: torch.Tensor, new: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Return ``cache`` with ``new`` written at ``positions`` along the sequence axis (out of place).

    cache: [B, H, T, D]; new: [B, H, S, D]; positions: [B, S] int64, each row's
    absolute positions of the S new tokens. Exact (a scatter, no arithmetic).
    """
    index = positions[:, None, :, None].expand(new.shape)
    return cache.scatter(2, index, new)


class FunctionalKVCache(Cache):
    """Per-layer key/value tensors ``[B, H_kv, max_len, D]`` updated out of place.

    ``update`` writes the new keys/values at ``positions`` and returns the whole
    written cache for attention; masking is the caller's job (a 4-D boolean mask
    hides slots that are not yet written).
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], positions: torch.Tensor):
        super().__init__(layers=[])
        self.keys = list(keys)
        self.values = list(values)
        self.positions = positions

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.keys[layer_idx] = write_positions(self.keys[layer_idx], key_states, self.positions)
        self.values[layer_idx] = write_positions(self.values[layer_idx], value_states, self.positions)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        raise NotImplementedError("FunctionalKVCache has per-row lengths; pass position_ids explicitly")

    def __len__(self) -> int:
        return len(self.keys)
