"""Decode attention against a KV cache in plain torch: the dense oracle and the chunked split-KV algorithm.

Shapes (shared by every ``split_kv_attention`` implementation):

* ``q`` ``[B, H, S, D]``: S ≥ 1 new query tokens per row (1 for decode, k when
  verifying k speculative drafts), at positions ``start[b] + i``;
* ``k``, ``v`` ``[B, H_kv, L, D]``: the cache, ``H % H_kv == 0``; query head ``h``
  reads KV head ``h // (H // H_kv)`` (the ``repeat_kv`` convention);
* ``start`` ``[B]`` int64: query ``i`` of row ``b`` sees cache slots ``<= start[b] + i``
  (causal among the new tokens, ragged across rows);
* returns ``out`` ``[B, H, S, D]`` in ``q``'s dtype and ``lse`` ``[B, H, S]`` fp32, the
  log-sum-exp of the row's visible scaled scores.

All arithmetic is fp32. ``dense_attention`` is traceable (static shapes, the whole
cache is read and masked) and is what lowering uses; ``chunked_attention`` reads
only the valid prefix, in chunks whose states are merged exactly (the split-KV algorithm);
``prefix_attention`` reads the valid prefix in one fused pass (the CPU kernel: on a CPU the
threads already split the work, so more pieces only add copies).
"""

from __future__ import annotations

import torch

from inferpass.kernels.attention_state import AttentionState, chunk_state, merge_along

_FUSED_CPU_ATTENTION = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default  # returns (out, lse)


def check_decode_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the argument whose shape or dtype breaks the contract above."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"split_kv_attention: q must be [B,H,S,D] and k, v [B,H_kv,L,D] alike; got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3] or q.shape[1] % k.shape[1]:
        raise ValueError(f"split_kv_attention: q {tuple(q.shape)} and cache {tuple(k.shape)} disagree on batch, "
                         "head_dim, or heads not a multiple of KV heads")
    if start.shape != (q.shape[0],) or start.dtype != torch.int64:
        raise ValueError(f"split_kv_attention: start must be int64 [B={q.shape[0]}], got "
                         f"{start.dtype} {tuple(start.shape)}")


def laid_out_like(q: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (``q``'s shape) with the strides of ``torch.empty_like(q)``, as the ops' fakes promise: a
    compiler that calls a kernel trusts those strides."""
    return value if value.stride() == torch.empty_like(q).stride() else torch.empty_like(q).copy_(value)


def empty_outputs(q: torch.Tensor, *_) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialized ``(out, lse)`` for ``q`` as above: the fake implementation of every ``split_kv_attention`` op."""
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


def visible_slots(start: torch.Tensor, q_len: int, cache_len: int) -> torch.Tensor:
    """Bool ``[B, 1, 1, S, L]``: query ``i`` of row ``b`` sees slot ``j`` iff ``j <= start[b] + i``."""
    positions = start[:, None] + torch.arange(q_len, device=start.device)[None, :]
    slots = torch.arange(cache_len, device=start.device)
    return (slots[None, None, :] <= positions[:, :, None])[:, None, None]


def grouped_queries(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[B, H, S, D]`` -> fp32 ``[B, H_kv, H/H_kv, S, D]``: the query heads that share a KV head, together."""
    b, h, s, d = q.shape
    return q.float().reshape(b, kv_heads, h // kv_heads, s, d)


def finish_state(state: AttentionState, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``[B, H_kv, G, S]`` state -> ``(out [B, H, S, D] in q's dtype, lse [B, H, S])``."""
    b, h, s, d = q.shape
    return state.o.reshape(b, h, s, d).to(q.dtype), state.lse.reshape(b, h, s)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention over the whole cache with the visibility mask (exact in fp32; traceable). The query
    heads of a KV head are one block of rows, so the cache is read as it is (no broadcast copy for compilers
    to materialize)."""
    b, kv_heads, cache_len, d = k.shape
    heads, q_len = q.shape[1], q.shape[2]
    rows = heads // kv_heads * q_len
    scores = q.float().reshape(b, kv_heads, rows, d) @ k.float().transpose(-1, -2) * scale  # [B, Hkv, G*S, L]
    visible = visible_slots(start, q_len, cache_len).expand(b, 1, heads // kv_heads, q_len, cache_len)
    scores = scores.masked_fill(~visible.reshape(b, 1, rows, cache_len), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.exp(scores - lse[..., None]) @ v.float()
    return out.reshape(b, heads, q_len, d).to(q.dtype), lse.reshape(b, heads, q_len)


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor, scale: float,
                      chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-KV attention: the valid prefix in ``chunk``-slot pieces, one state each, merged exactly.

    Reads only ``max(start) + S`` slots (a host sync on ``start``). Equals ``dense_attention``
    up to fp32 rounding for any ``chunk`` ≥ 1.
    """
    b, kv_heads, cache_len, d = k.shape
    q_len = q.shape[2]
    valid = min(cache_len, int(start.max()) + q_len)
    pieces = -(-valid // chunk)
    padded = pieces * chunk
    kc, vc = k[:, :, :valid].float(), v[:, :, :valid].float()
    if padded > valid:
        pad = (0, 0, 0, padded - valid)
        kc, vc = torch.nn.functional.pad(kc, pad), torch.nn.functional.pad(vc, pad)
    kc = kc.reshape(b, kv_heads, pieces, chunk, d)
    vc = vc.reshape(b, kv_heads, 1, 1, pieces, chunk, d)
    scores = torch.einsum("bkgsd,bkpcd->bkgspc", grouped_queries(q, kv_heads), kc) * scale
    visible = visible_slots(start, q_len, padded).reshape(b, 1, 1, q_len, pieces, chunk)
    return finish_state(merge_along(chunk_state(scores, visible, vc), dim=-1), q)


def prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the valid prefix ``[0, max(start) + S)`` only (a host sync on ``start``), the cache read
    through views (no copy of it), by PyTorch's fused CPU attention with the query heads of a KV head as one
    query block (no ``repeat_kv``); equals ``dense_attention`` up to fp32 rounding. fp32 CPU tensors."""
    b, kv_heads, cache_len, d = k.shape
    heads, q_len = q.shape[1], q.shape[2]
    group, valid = heads // kv_heads, min(cache_len, int(start.max()) + q_len)
    visible = visible_slots(start, q_len, valid).expand(b, 1, group, q_len, valid).reshape(b, 1, group * q_len, valid)
    bias = torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))
    out, lse = _FUSED_CPU_ATTENTION(q.reshape(b, kv_heads, group * q_len, d), k[:, :, :valid], v[:, :, :valid],
                                    attn_mask=bias, scale=scale)
    return laid_out_like(q, out.reshape(b, heads, q_len, d)), lse.reshape(b, heads, q_len).contiguous()
