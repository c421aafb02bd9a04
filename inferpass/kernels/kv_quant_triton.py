"""Fused dequantizing split-KV decode attention over a quantized layer cache (Triton).

``_quantized_partials`` runs one program per (batch row, KV head, split). Program ``j`` of
``splits`` takes key groups ``[j·T // splits, (j+1)·T // splits)`` of the row's ``T = n_q / G``
quantized groups, reading the packed codes (``8/b`` per byte) and the fp16 statistics of
each tile and dequantizing them in registers — the store is never expanded in memory. The
last split also folds in the small full-precision *extras* (sinks, window, new tokens; built
by ``quantized_attention.fp_extras``). The ``G·S`` query rows that share a KV head are
stacked, so each code byte is read once per group. With one split the program writes the
output directly; otherwise ``split_kv_triton.reduce_partials`` merges the partials exactly.

Contract: ``quantized_attention.quantized_cache_attention`` (same result up to fp rounding;
in fp16/bf16 the dequantized tiles enter the dots in the query dtype). Needs ``group`` a power of
two >= 16 (it is the key tile). Runs under ``TRITON_INTERPRET=1`` on CPU tensors and compiles
for sm_80/sm_90 (``compile_check``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from inferpass.kernels.decode_plan import cached_plan, device_workers
from inferpass.kernels.quantized_attention import fp_extras
from inferpass.kernels.quantized_cache import KVQuantSpec, LayerCache, fused_kernel_supports
from inferpass.kernels.split_kv_triton import finish, load_queries, reduce_partials, softmax_step, store_partial, store_rows

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _unpack(Codes, row_offsets, d, d_ok, BITS: tl.constexpr):
    """Codes ``[N, BLOCK_D]`` (int32) of packed rows at ``row_offsets`` ``[N]``: channel ``d`` sits in byte
    ``d // (8 / BITS)`` at bit ``(d % (8 / BITS)) · BITS`` (lowest bits first)."""
    per_byte: tl.constexpr = 8 // BITS
    packed = tl.load(Codes + row_offsets[:, None] + (d // per_byte)[None, :], mask=d_ok[None, :], other=0)
    return (packed.to(tl.int32) >> ((d % per_byte) * BITS)[None, :]) & ((1 << BITS) - 1)


@triton.jit
def _quantized_partials(
        Q, KCodes, KScale, KZero, VCodes, VScale, VZero, XK, XV, XPos, Start, Out, Lse, PartO, PartLse,
        sqb, sqh, sqs, kcb, kch, kcl, ksb, ksh, ksg, vcb, vch, vcl, vsb, vsl, xkb, xkh, xkl, xpb,
        sob, soh, sos, slb, slh, kv_heads, q_len, extras_len, scale, splits, sink, residual,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BITS: tl.constexpr, KEY_GROUP: tl.constexpr,
        VALUE_GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_X: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr, SINGLE: tl.constexpr):
    """Partial attention state of split ``program_id % splits`` of head ``program_id // splits`` (see module doc)."""
    pid = tl.program_id(0)
    head = pid // splits
    part = pid % splits
    b = head // kv_heads
    kvh = head % kv_heads
    q, row_ok, i = load_queries(Q, b, kvh, q_len, sqb, sqh, sqs, GROUP, HEAD_DIM, BLOCK_M, BLOCK_D, UPCAST)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    start = tl.load(Start + b)
    tail = start - sink - residual
    groups = tl.where(tail > 0, tail // KEY_GROUP, 0)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    value_stat = (kvh * HEAD_DIM + d) // VALUE_GROUP
    for tile in range(part * groups // splits, (part + 1) * groups // splits):
        n = tile * KEY_GROUP + tl.arange(0, KEY_GROUP)
        k_code = _unpack(KCodes + b * kcb + kvh * kch, n * kcl, d, d_ok, BITS)
        k_scale = tl.load(KScale + b * ksb + kvh * ksh + tile * ksg + d, mask=d_ok, other=1.0).to(tl.float32)
        k_zero = tl.load(KZero + b * ksb + kvh * ksh + tile * ksg + d, mask=d_ok, other=0.0).to(tl.float32)
        k = (k_code.to(tl.float32) * k_scale[None, :] + k_zero[None, :]).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        v_code = _unpack(VCodes + b * vcb + kvh * vch, n * vcl, d, d_ok, BITS)
        v_stats = b * vsb + n[:, None] * vsl + value_stat[None, :]
        v_scale = tl.load(VScale + v_stats, mask=d_ok[None, :], other=1.0).to(tl.float32)
        v_zero = tl.load(VZero + v_stats, mask=d_ok[None, :], other=0.0).to(tl.float32)
        v = (v_code.to(tl.float32) * v_scale + v_zero).to(q.dtype)
        m, l_sum, acc = softmax_step(m, l_sum, acc, tl.where(row_ok[:, None], s, float("-inf")), v, PRECISION)
    if part == splits - 1:
        position = start + i
        for first in range(0, extras_len, BLOCK_X):
            j = first + tl.arange(0, BLOCK_X)
            j_ok = j < extras_len
            pos = tl.load(XPos + b * xpb + j, mask=j_ok, other=-1)
            x_ok = j_ok[:, None] & d_ok[None, :]
            k = tl.load(XK + b * xkb + kvh * xkh + j[:, None] * xkl + d[None, :], mask=x_ok, other=0.0).to(q.dtype)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            visible = row_ok[:, None] & (pos[None, :] >= 0) & (pos[None, :] <= position[:, None])
            v = tl.load(XV + b * xkb + kvh * xkh + j[:, None] * xkl + d[None, :], mask=x_ok, other=0.0).to(q.dtype)
            m, l_sum, acc = softmax_step(m, l_sum, acc, tl.where(visible, s, float("-inf")), v, PRECISION)
    o, lse = finish(m, l_sum, acc)
    if SINGLE:
        store_rows(Out, Lse, o, lse, b, kvh, q_len, sob, soh, sos, slb, slh, GROUP, HEAD_DIM, BLOCK_M, BLOCK_D)
    else:
        store_partial(PartO, PartLse, pid, o, lse, GROUP * q_len, HEAD_DIM, BLOCK_M, BLOCK_D)


def kernel_signature(dtype: str) -> dict[str, str]:
    """Argument types of ``_quantized_partials`` for ``triton.compile`` (``dtype``: fp32, fp16 or bf16)."""
    pointers = {"Q": f"*{dtype}", "KCodes": "*u8", "KScale": "*fp16", "KZero": "*fp16", "VCodes": "*u8",
                "VScale": "*fp16", "VZero": "*fp16", "XK": f"*{dtype}", "XV": f"*{dtype}", "XPos": "*i64",
                "Start": "*i64", "Out": f"*{dtype}", "Lse": "*fp32", "PartO": "*fp32", "PartLse": "*fp32"}
    return {name: pointers.get(name, "fp32" if name == "scale" else "constexpr" if name.isupper() else "i32")
            for name in _quantized_partials.arg_names}


def kv_quant_attention_triton(q: torch.Tensor, cache: LayerCache, new_k: torch.Tensor, new_v: torch.Tensor,
                              start: torch.Tensor, scale: float, spec: KVQuantSpec, *,
                              splits: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, Hq, S, D] q.dtype, lse [B, Hq, S] fp32)``: attention of ``q`` over the quantized cache and the
    new tokens with the fused kernels; ``splits`` programs per (row, KV head), -1 = Flash-Decoding heuristic."""
    if q.dtype not in _DTYPES:
        raise ValueError(f"kv_quant_attention: q must be one of {_DTYPES}, got {q.dtype}")
    g = spec.group
    if not fused_kernel_supports(spec):
        raise ValueError(f"kv_quant_attention (Triton): group must be a power of two >= 16 (it is the key tile), "
                         f"got {g}")
    batch, heads, q_len, head_dim = q.shape
    kv_heads = cache.k_codes.shape[1]
    if splits < 0:
        capacity = max(1, cache.k_codes.shape[2] - g)  # quantized slots without the scratch group, as --explain plans
        splits = cached_plan(batch, kv_heads, capacity, device_workers(q.device), "split", -1, g).splits
    xk, xv, xpos = fp_extras(cache, new_k, new_v, start, spec)
    out = torch.empty_like(q)  # q's strides, as the op's fake implementation promises
    q, xk, xv, xpos = q.contiguous(), xk.contiguous(), xv.contiguous(), xpos.contiguous()
    group = heads // kv_heads
    rows = group * q_len
    lse = torch.empty(batch, heads, q_len, device=q.device, dtype=torch.float32)
    programs = batch * kv_heads * splits
    part_o = torch.empty(programs if splits > 1 else 1, rows, head_dim, device=q.device, dtype=torch.float32)
    part_lse = torch.empty(part_o.shape[:2], device=q.device, dtype=torch.float32)
    upcast = os.environ.get("TRITON_INTERPRET") == "1" and q.dtype == torch.bfloat16
    meta = dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_M=max(16, triton.next_power_of_2(rows)),
                BLOCK_D=max(16, triton.next_power_of_2(head_dim)))
    k_codes, k_scale, k_zero, v_codes, v_scale, v_zero = (t.contiguous() for t in cache[:6])
    wrap_triton(_quantized_partials)[(programs,)](
        q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, xk, xv, xpos, start, out, lse, part_o, part_lse,
        q.stride(0), q.stride(1), q.stride(2), k_codes.stride(0), k_codes.stride(1), k_codes.stride(2),
        k_scale.stride(0), k_scale.stride(1), k_scale.stride(2), v_codes.stride(0), v_codes.stride(1),
        v_codes.stride(2), v_scale.stride(0), v_scale.stride(2), xk.stride(0), xk.stride(1), xk.stride(2),
        xpos.stride(0), out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        kv_heads, q_len, xk.shape[2], float(scale), splits, spec.sink, spec.residual,
        BITS=spec.bits, KEY_GROUP=g, VALUE_GROUP=spec.value_group_size(kv_heads, head_dim), BLOCK_X=16,
        PRECISION="ieee" if q.dtype == torch.float32 or upcast else "tf32", UPCAST=upcast, SINGLE=splits == 1,
        **meta,
    )
    if splits > 1:
        wrap_triton(reduce_partials)[(batch * kv_heads,)](
            start, out, lse, part_o, part_lse, out.stride(0), out.stride(1), out.stride(2), lse.stride(0),
            lse.stride(1), batch, kv_heads, q_len, 1, programs, splits, BLOCK_N=16, BLOCK_B=2, SCHEDULE=1, **meta,
        )
    return out, lse
