"""The custom ops' Triton kernels as ``torch.library.triton_op`` ops, so compilers see through them.

    inferpass::split_kv_attention_triton — same schema and contract as ``split_kv_op``
    inferpass::kv_quant_attention_triton — same schema and contract as ``kv_quant_op``'s attention

Each launches our kernels through ``torch.library.wrap_triton``: an eager call runs them
directly; under ``torch.compile`` / Inductor the op decomposes into the kernel launches, which
Inductor emits in its own generated code — a compiled graph, and a CUDA graph captured from
it, calls no Python per step. The ops' CUDA kernels call these ops, so eager and compiled GPU
runs share one path. ``triton_replacement`` says which op replaces a graph node, if any (the
``cuda`` target rewrites graphs with it). Shape propagation uses the original ops' fake
implementations, so graphs holding these ops trace on any device (also under
``TRITON_INTERPRET=1``, where the kernels run on CPU tensors).
"""

from __future__ import annotations

import torch
from torch.fx import Node
from torch.library import triton_op

from inferpass.kernels.kv_quant_op import KV_QUANT_ATTENTION, fused_kernel_supports, op_spec
from inferpass.kernels.kv_quant_triton import kv_quant_attention_triton
from inferpass.kernels.quantized_cache import LayerCache
from inferpass.kernels.split_kv_op import SPLIT_KV_ATTENTION, cached_plan, device_workers
from inferpass.kernels.split_kv_triton import split_kv_attention_triton


@triton_op("inferpass::split_kv_attention_triton", mutates_args=())
def split_kv_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor, scale: float,
                          schedule: str, splits: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``inferpass::split_kv_attention`` on the Triton kernels, planned for the device's SM count."""
    plan = cached_plan(q.shape[0], k.shape[1], k.shape[2], device_workers(q.device), schedule, splits, block_n)
    return split_kv_attention_triton(q, k, v, start, scale, plan)


@triton_op("inferpass::kv_quant_attention_triton", mutates_args=())
def kv_quant_attention_op(q: torch.Tensor, new_k: torch.Tensor, new_v: torch.Tensor, start: torch.Tensor,
                          cache: list[torch.Tensor], scale: float, bits: int, group: int, residual: int, sink: int,
                          value_group: int, splits: int) -> torch.Tensor:
    """``inferpass::kv_quant_attention`` on the fused dequantizing kernel (key group a power of two >= 16)."""
    spec = op_spec(bits, group, residual, sink, value_group)
    return kv_quant_attention_triton(q, LayerCache(*cache), new_k, new_v, start, scale, spec, splits=splits)[0]


split_kv_attention_op.register_fake(SPLIT_KV_ATTENTION.fake)
kv_quant_attention_op.register_fake(KV_QUANT_ATTENTION.fake)
_SPLIT_KV = torch.ops.inferpass.split_kv_attention_triton.default
_KV_QUANT = torch.ops.inferpass.kv_quant_attention_triton.default


def triton_replacement(node: Node) -> torch._ops.OpOverload | None:
    """The Triton op computing ``node`` (same arguments), or None when no kernel of ours takes it."""
    if node.target is SPLIT_KV_ATTENTION.overload:
        return _SPLIT_KV
    if node.target is KV_QUANT_ATTENTION.overload and fused_kernel_supports(op_spec(*node.args[6:11])):
        return _KV_QUANT
    return None
