"""Ops over the quantized KV cache of ``quantized_cache``: attention, then append.

    kv_quant_attention(q, new_k, new_v, start, cache[8|10], scale, bits, group, residual, sink,
                       value_group, splits) -> out
    kv_quant_append(new_k, new_v, start, cache[8|10], bits, group, residual, sink, value_group) -> cache'

``cache`` is a layer's tensors in ``LayerCache`` order (10 with sinks); ``new_k``/``new_v``
``[B, H, S, D]`` are the call's new tokens (after RoPE) at positions ``start + i``;
``splits`` is the split-KV program count per (row, KV head) on a GPU (-1: planner's choice).
The query and new-token arguments come first so structure recovery finds the projections
feeding them. Implementations of the attention:

* reference (and what lowering decomposes to): ``quantized_cache.attend``, which expands the
  whole store (aten only, traceable);
* CPU kernel: ``quantized_attention.quantized_cache_attention``, the valid prefix a chunk at a time;
* CUDA kernel: the fused dequantizing Triton kernels of ``kv_quant_triton`` through the Triton op of
  ``triton_ops`` (key groups that are no power of two >= 16 fall back to the chunked torch kernel).

The append is functional (``quantized_cache.append``) on every device.
"""

from __future__ import annotations

import torch

from inferpass.ir.ops import define_op, register_kernel
from inferpass.kernels.quantized_attention import quantized_cache_attention
from inferpass.kernels.quantized_cache import KVQuantSpec, LayerCache, append, attend


def op_spec(bits: int, group: int, residual: int, sink: int, value_group: int) -> KVQuantSpec:
    """The ``KVQuantSpec`` of the ops' trailing int arguments; every implementation of both ops builds it here."""
    return KVQuantSpec(bits=bits, group=group, residual=residual, sink=sink, value_group=value_group)


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
    fake=lambda q, new_k, new_v, start, cache, scale, bits, group, residual, sink, value_group, splits:
        torch.empty_like(q),
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
    return quantized_cache_attention(q, LayerCache(*cache), new_k, new_v, start, scale, spec)[0]


def fused_kernel_supports(spec: KVQuantSpec) -> bool:
    """Whether the fused Triton kernel takes ``spec``: its key group is the tile, a power of two >= 16."""
    return spec.group >= 16 and not spec.group & (spec.group - 1)


def _cuda_attention(q, new_k, new_v, start, cache, scale: float, bits: int, group: int, residual: int, sink: int,
                    value_group: int, splits: int):
    spec = op_spec(bits, group, residual, sink, value_group)
    if not fused_kernel_supports(spec):
        return quantized_cache_attention(q, LayerCache(*cache), new_k, new_v, start, scale, spec)[0]
    from inferpass.kernels.triton_ops import kv_quant_attention_op

    return kv_quant_attention_op(q, new_k, new_v, start, cache, scale, bits, group, residual, sink, value_group, splits)


register_kernel("kv_quant_attention", "cpu", _cpu_attention)
register_kernel("kv_quant_attention", "cuda", _cuda_attention)
