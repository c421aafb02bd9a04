"""The ``inferpass::split_kv_attention`` op: decode attention against a KV cache, split over the keys.

    split_kv_attention(q, k, v, start, scale, schedule, splits, block_n) -> (out, lse)

Shapes and visibility as in ``split_kv_reference``. ``schedule`` is ``auto``,
``single``, ``split`` or ``stream-k``; ``splits`` is the split count for ``split``
(-1 = auto); ``block_n`` is the KV tile size. Implementations:

* reference (any device, and what lowering decomposes to): ``dense_attention``;
* CPU kernel: ``chunked_attention`` — reads only the valid cache prefix, in
  ``block_n``-slot chunks merged exactly;
* CUDA kernel: the Triton kernels with a plan from ``plan_decode_attention``
  for the device's SM count, through the Triton op of ``triton_ops``.

All return the same values up to fp32 rounding; a fixed plan is bit-stable.
"""

from __future__ import annotations

import functools

import torch

from inferpass.ir.ops import define_op, register_kernel
from inferpass.kernels.decode_plan import DecodePlan, plan_decode_attention
from inferpass.kernels.split_kv_reference import check_decode_shapes, chunked_attention, dense_attention

SCHEDULES = ("auto", "single", "split", "stream-k")


def _reference(q, k, v, start, scale: float, schedule: str, splits: int, block_n: int):
    check_decode_shapes(q, k, v, start)
    return dense_attention(q, k, v, start, scale)


def _fake(q, k, v, start, scale: float, schedule: str, splits: int, block_n: int):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


SPLIT_KV_ATTENTION = define_op(
    "split_kv_attention",
    "(Tensor q, Tensor k, Tensor v, Tensor start, float scale, str schedule, int splits, int block_n)"
    " -> (Tensor, Tensor)",
    reference=_reference,
    fake=_fake,
    role="attention",
)


def _cpu_kernel(q, k, v, start, scale: float, schedule: str, splits: int, block_n: int):
    check_decode_shapes(q, k, v, start)
    return chunked_attention(q, k, v, start, scale, block_n)


@functools.lru_cache(maxsize=256)
def cached_plan(batch: int, kv_heads: int, cache_len: int, workers: int, schedule: str, splits: int,
                block_n: int) -> DecodePlan:
    """``plan_decode_attention`` memoized on the call shape (splits -1 = auto)."""
    return plan_decode_attention(batch, kv_heads, cache_len, workers, schedule=schedule,
                                 splits="auto" if splits < 0 else splits, block_n=block_n)


REFERENCE_SMS = 132  # plans shown without a GPU are for an H100 SXM


def planning_workers() -> int:
    """SMs of the local GPU, or ``REFERENCE_SMS`` without one: the device ``--explain`` shows plans for."""
    return device_workers(torch.device("cuda")) if torch.cuda.is_available() else REFERENCE_SMS


def device_workers(device: torch.device) -> int:
    """Programs the device runs at once: SMs on CUDA, threads on CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return torch.get_num_threads()


def _cuda_kernel(q, k, v, start, scale: float, schedule: str, splits: int, block_n: int):
    from inferpass.kernels.triton_ops import split_kv_attention_op

    return split_kv_attention_op(q, k, v, start, scale, schedule, splits, block_n)


register_kernel("split_kv_attention", "cpu", _cpu_kernel)
register_kernel("split_kv_attention", "cuda", _cuda_kernel)


def split_kv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor, scale: float, *,
                       schedule: str = "auto", splits: int = -1, block_n: int = 64,
                       return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Call the op; ``out`` ``[B,H,S,D]``, plus ``lse`` ``[B,H,S]`` fp32 when ``return_lse``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    out, lse = SPLIT_KV_ATTENTION.overload(q, k, v, start, float(scale), schedule, int(splits), int(block_n))
    return (out, lse) if return_lse else out
