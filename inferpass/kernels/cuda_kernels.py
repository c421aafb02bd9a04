"""The custom ops' CUDA kernels: importing this module makes the Triton ops of ``triton_ops`` the ops' kernels on CUDA.

* ``inferpass::split_kv_attention`` → ``split_kv_attention_triton``, planned for the device's SM count;
* ``inferpass::kv_quant_attention`` → ``kv_quant_attention_triton`` where ``fused_kernel_supports`` the
  spec, else the op's CPU kernel (the chunked torch kernel, which runs on any device).

The op modules themselves never import Triton: without this module, an eager run on a GPU
computes our ops with their aten references (``kernels`` registers only those and the CPU
kernels). The ``cuda`` target imports it; so does anything else that wants our Triton
kernels in eager GPU runs. ``triton_replacement`` says which Triton op replaces a graph node
(the ``cuda`` target rewrites graphs with it).
"""

from __future__ import annotations

import torch
from torch.fx import Node

from inferpass.ir.ops import register_kernel
from inferpass.kernels.kv_quant_op import KV_QUANT_ATTENTION
from inferpass.kernels.quantized_cache import fused_kernel_supports, op_spec
from inferpass.kernels.split_kv_op import SPLIT_KV_ATTENTION
from inferpass.kernels.triton_ops import kv_quant_attention_op, split_kv_attention_op

_SPLIT_KV = torch.ops.inferpass.split_kv_attention_triton.default
_KV_QUANT = torch.ops.inferpass.kv_quant_attention_triton.default


def _kv_quant_attention(*args):
    fused = fused_kernel_supports(op_spec(*args[6:11]))
    return (kv_quant_attention_op if fused else KV_QUANT_ATTENTION.kernels["cpu"])(*args)


register_kernel(SPLIT_KV_ATTENTION.name, "cuda", split_kv_attention_op)
register_kernel(KV_QUANT_ATTENTION.name, "cuda", _kv_quant_attention)


def triton_replacement(node: Node) -> torch._ops.OpOverload | None:
    """The Triton op computing ``node`` (same arguments), or None when no kernel of ours takes it."""
    if node.target is SPLIT_KV_ATTENTION.overload:
        return _SPLIT_KV
    if node.target is KV_QUANT_ATTENTION.overload and fused_kernel_supports(op_spec(*node.args[6:11])):
        return _KV_QUANT
    return None
