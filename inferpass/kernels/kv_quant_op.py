"""Ops over the quantized KV cache of ``quantized_cache``: attention, then append.

    kv_quant_attention(q, new_k, new_v, start, cache[8|10], scale, bits, group, residual, sink,
                       value_group, splits) -> out
    kv_quant_append(new_k, new_v, start, cache[8|10], bits, group, residual, sink, value_group) -> cache'

``cache`` is a layer's tensors in ``LayerCache`` order (10 with sinks); ``new_k``/``new_v``
``[B, H, S, D]`` are the call's new tokens (after RoPE) at positions ``start + i``;
``splits`` is the split-KV program count per (row, KV head) on a GPU (-1: planner's choice).
The query and new-token arguments come first so structure recovery finds the projections
feeding them. Implementations of the attention:

* reference (any device without a kernel, and what lowering decomposes to): ``quantized_cache.attend``,
  which expands the whole store (aten only, traceable);
* CPU kernel: ``quantized_attention.quantized_cache_attention``, the valid prefix a chunk at a time;
* CUDA kernel: the fused dequantizing Triton kernel, registered by ``cuda_kernels`` (not imported
  here, so this op never imports Triton).

The append is functional (``quantized_cache.append``) on every device.
"""

from __future__ import annotations

import torch

from inferpass.ir.ops import define_op, register_kernel
from inferpass.kernels.quantized_attention import quantized_cache_attention
from inferpass.kernels.quantized_cache import LayerCache, append, attend, empty_attention, op_spec
from inferpass.kernels.split_kv_reference import laid_out_like


def _attention(q, new_k, new_v, start, cache, scale: float, bits: int, group: int, residual: int, sink: int,
               value_group: int, splits: int):
    return attend(q, LayerCache(*cache), new_k, new_v, start, scale, op_spec(bits, group, residual, sink, value_group))


def _append(new_k, new_v, start, cache, bits: int, group: int, residual: int, sink: int, value_group: int):
    return append(LayerCache(*cache), new_k, new_v, start, op_spec(bits, group, residual, sink, value_group)).tensors()


KV_QUANT_ATTENTION = define_op(
    "kv_quant_attention",
    "(Tensor q, Tensor new_k, Tensor new_v, Tensor start, Tensor[] cache, float scale, int bits, int group,"
    " int residual, int sink, int value_group, int splits) -> Tensor",
    reference=_attention,
    fake=empty_attention,
    role="attention",
)
KV_QUANT_APPEND = define_op(
    "kv_quant_append",
    "(Tensor new_k, Tensor new_v, Tensor start, Tensor[] cache, int bits, int group, int residual, int sink,"
    " int value_group) -> Tensor[]",
    reference=_append,
    fake=lambda new_k, new_v, start, cache, bits, group, residual, sink, value_group:
        [torch.empty_like(t) for t in cache],
)


def _cpu_attention(q, new_k, new_v, start, cache, scale: float, bits: int, group: int, residual: int, sink: int,
                   value_group: int, splits: int):
    spec = op_spec(bits, group, residual, sink, value_group)
    return laid_out_like(q, quantized_cache_attention(q, LayerCache(*cache), new_k, new_v, start, scale, spec)[0])


register_kernel("kv_quant_attention", "cpu", _cpu_attention)
