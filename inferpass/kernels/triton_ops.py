"""The custom ops' Triton kernels as ``torch.library.triton_op`` ops, so compilers see through them.

    inferpass::split_kv_attention_triton — same schema and contract as ``split_kv_op``
    inferpass::kv_quant_attention_triton — same schema and contract as ``kv_quant_op``'s attention
                                           (key group a power of two >= 16: ``fused_kernel_supports``)

Each launches our kernels through ``torch.library.wrap_triton``: an eager call runs them
directly; under ``torch.compile`` / Inductor the op decomposes into the kernel launches, which
Inductor emits in its own generated code — a compiled graph, and a CUDA graph captured from
it, calls no Python per step. ``cuda_kernels`` makes these ops the custom ops' CUDA kernels, so
eager and compiled GPU runs share one path. Shape propagation uses the same fake
implementations as the custom ops, so graphs holding these ops trace on any device (also under
``TRITON_INTERPRET=1``, where the kernels run on CPU tensors). Built on the Triton kernels and
the planners only: nothing here imports the custom ops.
"""

from __future__ import annotations

import torch
from torch.library import triton_op

from inferpass.kernels.decode_plan import cached_plan, device_workers
from inferpass.kernels.kv_quant_triton import kv_quant_attention_triton
from inferpass.kernels.quantized_cache import LayerCache, empty_attention, op_spec
from inferpass.kernels.split_kv_reference import empty_outputs
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


split_kv_attention_op.register_fake(empty_outputs)
kv_quant_attention_op.register_fake(empty_attention)
