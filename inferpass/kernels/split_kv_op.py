"""The ``inferpass::split_kv_attention`` op: decode attention against a KV cache, split over the keys.

    split_kv_attention(q, k, v, start, scale, schedule, splits, block_n) -> (out, lse)

Shapes and visibility as in ``split_kv_reference``. ``schedule`` is ``auto``,
``single``, ``split`` or ``stream-k``; ``splits`` is the split count for ``split``
(-1 = auto); ``block_n`` is the KV tile size. Implementations:

* reference (any device without a kernel, and what lowering decomposes to): ``dense_attention``;
* CPU kernel: ``prefix_attention`` — reads only the valid cache prefix, in one pass (the
  schedule, splits and block size plan GPU programs; on a CPU the matmuls' threads split the work);
* CUDA kernel: the Triton kernels, registered by ``cuda_kernels`` (not imported here, so this
  op never imports Triton).

All return the same values up to fp32 rounding; a fixed plan is bit-stable.
"""

from __future__ import annotations

import torch

from inferpass.ir.ops import define_op, register_kernel
from inferpass.kernels.split_kv_reference import check_decode_shapes, dense_attention, empty_outputs, prefix_attention

SCHEDULES = ("auto", "single", "split", "stream-k")


def _reference(q, k, v, start, scale: float, schedule: str, splits: int, block_n: int):
    check_decode_shapes(q, k, v, start)
    return dense_attention(q, k, v, start, scale)


SPLIT_KV_ATTENTION = define_op(
    "split_kv_attention",
    "(Tensor q, Tensor k, Tensor v, Tensor start, float scale, str schedule, int splits, int block_n)"
    " -> (Tensor, Tensor)",
    reference=_reference,
    fake=empty_outputs,
    role="attention",
)


def _cpu_kernel(q, k, v, start, scale: float, schedule: str, splits: int, block_n: int):
    check_decode_shapes(q, k, v, start)
    return prefix_attention(q, k, v, start, scale)


register_kernel("split_kv_attention", "cpu", _cpu_kernel)


def split_kv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor, scale: float, *,
                       schedule: str = "auto", splits: int = -1, block_n: int = 64,
                       return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Call the op; ``out`` ``[B,H,S,D]``, plus ``lse`` ``[B,H,S]`` fp32 when ``return_lse``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    out, lse = SPLIT_KV_ATTENTION.overload(q, k, v, start, float(scale), schedule, int(splits), int(block_n))
    return (out, lse) if return_lse else out
