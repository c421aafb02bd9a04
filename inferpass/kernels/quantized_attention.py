"""Decode attention over a quantized layer cache without expanding the store: the CPU kernel.

The keys a call attends to split in two disjoint sets whose attention states merge exactly
(``attention_state``):

* the quantized tail slots ``[0, n_q)``, dequantized ``chunk`` groups at a time (only the
  valid prefix is read: ``max n_q`` over the rows, a host sync);
* the full-precision *extras* ``fp_extras``: sinks, window and the call's new tokens, each
  with its sequence position (``-1`` where a slot holds nothing), a few dozen tokens.

``quantized_cache_attention`` equals ``quantized_cache.attend`` up to fp32 rounding. The
Triton kernel (``kv_quant_triton``) splits the same two sets across programs on a GPU.
"""

from __future__ import annotations

import torch

from inferpass.kernels.attention_state import AttentionState, chunk_state, empty_state, merge
from inferpass.kernels.quantized_cache import KVQuantSpec, LayerCache, dequantize_keys, dequantize_values
from inferpass.kernels.split_kv_reference import finish_state, grouped_queries

CHUNK_ELEMENTS = 2**19  # dequantized keys per chunk on the CPU (2 MiB of fp32: stays in cache; measured best)


def fp_extras(cache: LayerCache, new_k: torch.Tensor, new_v: torch.Tensor, start: torch.Tensor,
              spec: KVQuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sinks, window and new tokens as ``(keys, values [B, H, E, D], positions [B, E] int64)``,
    ``E = sink + R + G + S``; ``positions`` is ``-1`` for slots that hold no token yet."""
    b, s = start.shape[0], new_k.shape[2]
    window = spec.window
    n_q = spec.quantized_length(start)
    window_pos = spec.sink + n_q[:, None] + torch.arange(window, device=start.device)[None, :]
    parts_pos = [torch.where(window_pos < start[:, None], window_pos, -1),
                 start[:, None] + torch.arange(s, device=start.device)[None, :]]
    keys, values = [cache.k_window, new_k.to(cache.k_window.dtype)], [cache.v_window, new_v.to(cache.v_window.dtype)]
    if spec.sink:
        sink_pos = torch.arange(spec.sink, device=start.device)[None, :].expand(b, spec.sink)
        parts_pos.insert(0, torch.where(sink_pos < start[:, None], sink_pos, -1))
        keys.insert(0, cache.k_sink)
        values.insert(0, cache.v_sink)
    return torch.cat(keys, dim=2), torch.cat(values, dim=2), torch.cat(parts_pos, dim=1)


def _state(qg: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor,
           scale: float) -> AttentionState:
    """State of grouped queries ``[B, Hkv, G, S, D]`` over ``keys``/``values`` ``[B, Hkv, N, D]``;
    ``visible`` broadcastable to ``[B, 1, 1, S, N]``."""
    scores = torch.einsum("bkgsd,bknd->bkgsn", qg, keys.float()) * scale
    return chunk_state(scores, visible, values.float()[:, :, None, None])


def quantized_cache_attention(q: torch.Tensor, cache: LayerCache, new_k: torch.Tensor, new_v: torch.Tensor,
                              start: torch.Tensor, scale: float, spec: KVQuantSpec,
                              chunk_groups: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, Hq, S, D] in q's dtype, lse [B, Hq, S] fp32)`` of ``q`` at positions ``start + i`` over
    the cache and the new tokens (contract of ``quantized_cache.attend``), reading only the valid
    quantized prefix, ``chunk_groups`` key groups at a time (default: about ``CHUNK_ELEMENTS``
    dequantized elements per chunk, a cache-sized working set)."""
    b, kv_heads = cache.k_window.shape[:2]
    qg = grouped_queries(q, kv_heads)
    q_len, g = q.shape[2], spec.group
    n_q = spec.quantized_length(start)
    state = empty_state(qg.shape[:4], q.shape[3], device=q.device)
    if chunk_groups is None:
        chunk_groups = max(1, CHUNK_ELEMENTS // (b * kv_heads * q.shape[3] * g))
    step = chunk_groups * g
    for lo in range(0, int(n_q.max()), step):
        hi = lo + step
        keys = dequantize_keys(cache.k_codes[:, :, lo:hi], cache.k_scale[:, :, lo // g : -(-hi // g)],
                               cache.k_zero[:, :, lo // g : -(-hi // g)], spec.bits)
        values = dequantize_values(cache.v_codes[:, :, lo:hi], cache.v_scale[:, :, lo:hi],
                                   cache.v_zero[:, :, lo:hi], spec.bits)
        slots = torch.arange(lo, lo + keys.shape[2], device=q.device)
        visible = (slots[None, :] < n_q[:, None])[:, None, None, None, :]
        state = merge(state, _state(qg, keys, values, visible, scale))
    keys, values, positions = fp_extras(cache, new_k, new_v, start, spec)
    query_pos = start[:, None] + torch.arange(q_len, device=q.device)[None, :]
    visible = ((positions[:, None, :] >= 0) & (positions[:, None, :] <= query_pos[:, :, None]))[:, None, None]
    return finish_state(merge(state, _state(qg, keys, values, visible, scale)), q)
