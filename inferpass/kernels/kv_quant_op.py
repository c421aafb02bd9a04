"""Ops over the quantized KV cache of ``quantized_cache``: attention, then append.

    kv_quant_attention(q, new_k, new_v, start, cache[8], scale, bits, group, residual) -> out
    kv_quant_append(new_k, new_v, start, cache[8], bits, group, residual) -> cache'[8]

``cache`` is a layer's eight tensors in ``LayerCache`` order; ``new_k``/``new_v``
``[B, H, S, D]`` are the call's new tokens (after RoPE) at positions ``start + i``.
The query and new-token arguments come first so structure recovery finds the
projections feeding them. References: ``quantized_cache.attend`` / ``append`` (aten
only, traceable); they are also the CPU implementation.
"""

from __future__ import annotations

import torch

from inferpass.ir.ops import define_op
from inferpass.kernels.quantized_cache import KVQuantSpec, LayerCache, append, attend


def _spec(bits: int, group: int, residual: int) -> KVQuantSpec:
    return KVQuantSpec(bits=bits, group=group, residual=residual)


def _attention(q, new_k, new_v, start, cache, scale: float, bits: int, group: int, residual: int):
    return attend(q, LayerCache(*cache), new_k, new_v, start, scale, _spec(bits, group, residual))


def _append(new_k, new_v, start, cache, bits: int, group: int, residual: int):
    return list(append(LayerCache(*cache), new_k, new_v, start, _spec(bits, group, residual)))


KV_QUANT_ATTENTION = define_op(
    "kv_quant_attention",
    "(Tensor q, Tensor new_k, Tensor new_v, Tensor start, Tensor[] cache, float scale, int bits, int group,"
    " int residual) -> Tensor",
    reference=_attention,
    fake=lambda q, new_k, new_v, start, cache, scale, bits, group, residual: torch.empty_like(q),
    role="attention",
)
KV_QUANT_APPEND = define_op(
    "kv_quant_append",
    "(Tensor new_k, Tensor new_v, Tensor start, Tensor[] cache, int bits, int group, int residual) -> Tensor[]",
    reference=_append,
    fake=lambda new_k, new_v, start, cache, bits, group, residual: [torch.empty_like(t) for t in cache],
)
