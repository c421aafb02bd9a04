"""The functional decoder step that prefill and decode graphs are exported from."""

from __future__ import annotations

import torch
from torch import nn

from inferpass.capture.functional_cache import FunctionalKVCache


def causal_cache_mask(positions: torch.Tensor, max_len: int) -> torch.Tensor:
    """Boolean mask ``[B, 1, S, max_len]``: query at ``positions[b, i]`` sees cache slots ``<=`` it.

    Slots beyond a row's own position are hidden, so a row's unwritten or stale
    slots never contribute; rows of a batch may have different lengths (ragged).
    """
    slots = torch.arange(max_len, device=positions.device)
    return slots[None, None, None, :] <= positions[:, None, :, None]


class DecoderStep(nn.Module):
    """Run ``S`` new tokens per row against a functional KV cache.

    forward(input_ids [B, S] int64, start [B] int64, *caches) ->
    (logits [B, S, V], *written caches), caches ordered k0, v0, k1, v1, ...,
    each ``[B, H_kv, max_len, D]``. Token ``i`` of row ``b`` sits at position
    ``start[b] + i``. Exact: the same arithmetic as the wrapped model's forward.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, start: torch.Tensor, *caches: torch.Tensor):
        seq_len = input_ids.shape[1]
        positions = start[:, None] + torch.arange(seq_len, device=input_ids.device)[None, :]
        mask = causal_cache_mask(positions, caches[0].shape[2])
        cache = FunctionalKVCache(list(caches[0::2]), list(caches[1::2]), positions)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        )
        written = [t for pair in zip(cache.keys, cache.values) for t in pair]
        return (out.logits, *written)
