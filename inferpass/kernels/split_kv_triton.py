"""Triton kernels for split-KV decode attention: one partial kernel for every schedule, one exact reduction.

``_partials`` gives each program a run of KV tiles (see ``decode_plan``) and
computes it with an online softmax: one (batch row, KV head) at a time, the
``G = H / H_kv`` query heads that share the KV head and the ``S`` query tokens
stacked as ``G·S`` rows, so every KV byte is loaded once per group. The runs are
computed on the device from ``start`` (no host sync): for stream-K each program
walks its run across head boundaries, writing one partial ``(o, lse)`` per head
segment. ``reduce_partials`` merges a head's partials exactly (empty runs are skipped).
With the ``single`` schedule the partial kernel writes the final output directly.

Contract: ``split_kv_reference`` (shapes, visibility, dtypes). Works under
``TRITON_INTERPRET=1`` on CPU tensors and compiles for sm_80/sm_90.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from inferpass.kernels.decode_plan import DecodePlan
from inferpass.kernels.split_kv_reference import check_decode_shapes

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _row_tiles(Start, batch, q_len, cache_len, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    """Per batch row: tile count of its valid prefix (0 beyond ``batch``), as a ``[BLOCK_B]`` vector."""
    rows = tl.arange(0, BLOCK_B)
    start = tl.load(Start + rows, mask=rows < batch, other=0)
    length = tl.minimum(start + q_len, cache_len)
    return tl.where(rows < batch, tl.cdiv(length, BLOCK_N), 0)


@triton.jit
def _pick(vector, index, BLOCK_B: tl.constexpr):
    """``vector[index]`` for a runtime scalar index."""
    return tl.sum(tl.where(tl.arange(0, BLOCK_B) == index, vector, 0), axis=0)


@triton.jit
def load_queries(Q, b, kvh, q_len, sqb, sqh, sqs, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """The ``G·S`` query rows of KV head (b, kvh) as ``[BLOCK_M, BLOCK_D]`` (row ``r``: head ``kvh·G + r // S``,
    token ``r % S``), plus the row mask and each row's token index ``i``."""
    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    row_ok = r < GROUP * q_len
    i = r % q_len
    q_ptr = Q + b * sqb + (kvh * GROUP + r // q_len) * sqh + i * sqs
    q = tl.load(q_ptr[:, None] + d[None, :], mask=row_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    return q, row_ok, i


@triton.jit
def _attend(Q, K, V, Start, b, kvh, tile_lo, tile_hi, q_len, cache_len, scale,
            sqb, sqh, sqs, skb, skh, skl, svb, svh, svl,
            GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Online softmax of the group's rows over tiles ``[tile_lo, tile_hi)`` of head (b, kvh).

    Returns ``(o, lse)``: ``o`` ``[BLOCK_M, BLOCK_D]`` normalized, ``lse`` ``[BLOCK_M]`` (-inf: nothing seen).
    """
    q, row_ok, i = load_queries(Q, b, kvh, q_len, sqb, sqh, sqs, GROUP, HEAD_DIM, BLOCK_M, BLOCK_D, UPCAST)
    d = tl.arange(0, BLOCK_D)
    start = tl.load(Start + b)
    position = start + i
    length = tl.minimum(start + q_len, cache_len)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for tile in range(tile_lo, tile_hi):
        n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        kv_ok = (n[:, None] < length) & (d[None, :] < HEAD_DIM)
        k = tl.load(K + b * skb + kvh * skh + n[:, None] * skl + d[None, :], mask=kv_ok, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        visible = row_ok[:, None] & (n[None, :] <= position[:, None]) & (n[None, :] < length)
        v = tl.load(V + b * svb + kvh * svh + n[:, None] * svl + d[None, :], mask=kv_ok, other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        m, l_sum, acc = softmax_step(m, l_sum, acc, tl.where(visible, s, float("-inf")), v, PRECISION)
    return finish(m, l_sum, acc)


@triton.jit
def softmax_step(m, l_sum, acc, s, v, PRECISION: tl.constexpr):
    """One online-softmax step: fold masked scores ``s`` ``[M, N]`` (-inf = hidden) and values ``v``
    ``[N, D]`` into the running max ``m``, sum ``l_sum`` and unnormalized output ``acc``."""
    m_new = tl.maximum(m, tl.max(s, axis=1))
    ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - ref)
    p = tl.exp(s - ref[:, None])
    l_sum = l_sum * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_sum, acc


@triton.jit
def finish(m, l_sum, acc):
    """``(o, lse)`` of a running state: ``o = acc / l``, ``lse = m + log l``; empty rows give ``(0, -inf)``."""
    empty = l_sum == 0.0
    o = acc / tl.where(empty, 1.0, l_sum)[:, None]
    lse = tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, l_sum)))
    return o, lse


@triton.jit
def store_rows(Out, Lse, o, lse, b, kvh, q_len, sob, soh, sos, slb, slh,
                GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Write the group's rows to ``out[b, kvh·G + g, i]`` and ``lse[b, kvh·G + g, i]``."""
    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    row_ok = r < GROUP * q_len
    head = kvh * GROUP + r // q_len
    i = r % q_len
    out_ptr = Out + b * sob + head * soh + i * sos
    tl.store(out_ptr[:, None] + d[None, :], o.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (d[None, :] < HEAD_DIM))
    tl.store(Lse + b * slb + head * slh + i, lse, mask=row_ok)


@triton.jit
def store_partial(PartO, PartLse, slot, o, lse, rows,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Write a partial state to ``slot`` of the ``[slots, rows, HEAD_DIM]`` scratch buffers."""
    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    ptr = PartO + (slot * rows + r[:, None]) * HEAD_DIM + d[None, :]
    tl.store(ptr, o, mask=(r[:, None] < rows) & (d[None, :] < HEAD_DIM))
    tl.store(PartLse + slot * rows + r, lse, mask=r < rows)


@triton.jit
def _partials(Q, K, V, Start, Out, Lse, PartO, PartLse, TileCount,
              sqb, sqh, sqs, skb, skh, skl, svb, svh, svl, sob, soh, sos, slb, slh,
              batch, kv_heads, q_len, cache_len, scale, programs, splits, max_tiles,
              GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, SCHEDULE: tl.constexpr, PRECISION: tl.constexpr,
              UPCAST: tl.constexpr, RECORD: tl.constexpr):
    """SCHEDULE 0 = single (writes Out/Lse), 1 = split, 2 = stream-k (write partials).

    UPCAST: compute the dots in fp32 (the interpreter's bf16 ``tl.dot`` is wrong; compiled kernels use
    the native dtype). RECORD: count, per (head, tile), how many times a program processed it (tests).
    """
    pid = tl.program_id(0)
    rows = GROUP * q_len
    if SCHEDULE == 2:
        tiles = _row_tiles(Start, batch, q_len, cache_len, BLOCK_N, BLOCK_B)
        row_end = tl.cumsum(tiles, axis=0) * kv_heads
        row_begin = row_end - tiles * kv_heads
        total = tl.sum(tiles, axis=0) * kv_heads
        t = pid * total // programs
        run_end = (pid + 1) * total // programs
        while t < run_end:
            b = tl.sum(tl.where((row_end <= t) & (tl.arange(0, BLOCK_B) < batch), 1, 0), axis=0)
            n = _pick(tiles, b, BLOCK_B)
            kvh = (t - _pick(row_begin, b, BLOCK_B)) // n
            head_begin = _pick(row_begin, b, BLOCK_B) + kvh * n
            seg_end = tl.minimum(run_end, head_begin + n)
            o, lse = _attend(Q, K, V, Start, b, kvh, t - head_begin, seg_end - head_begin, q_len, cache_len,
                             scale, sqb, sqh, sqs, skb, skh, skl, svb, svh, svl,
                             GROUP, HEAD_DIM, BLOCK_M, BLOCK_D, BLOCK_N, PRECISION, UPCAST)
            head = b * kv_heads + kvh
            store_partial(PartO, PartLse, head + pid, o, lse, rows, HEAD_DIM, BLOCK_M, BLOCK_D)
            if RECORD:
                for tile in range(t - head_begin, seg_end - head_begin):
                    tl.atomic_add(TileCount + head * max_tiles + tile, 1)
            t = seg_end
    else:
        head = pid // splits
        part = pid % splits
        b = head // kv_heads
        kvh = head % kv_heads
        n = tl.cdiv(tl.minimum(tl.load(Start + b) + q_len, cache_len), BLOCK_N)
        lo = part * n // splits
        hi = (part + 1) * n // splits
        o, lse = _attend(Q, K, V, Start, b, kvh, lo, hi, q_len, cache_len, scale,
                         sqb, sqh, sqs, skb, skh, skl, svb, svh, svl,
                         GROUP, HEAD_DIM, BLOCK_M, BLOCK_D, BLOCK_N, PRECISION, UPCAST)
        if SCHEDULE == 0:
            store_rows(Out, Lse, o, lse, b, kvh, q_len, sob, soh, sos, slb, slh, GROUP, HEAD_DIM, BLOCK_M, BLOCK_D)
        else:
            store_partial(PartO, PartLse, pid, o, lse, rows, HEAD_DIM, BLOCK_M, BLOCK_D)
        if RECORD:
            for tile in range(lo, hi):
                tl.atomic_add(TileCount + head * max_tiles + tile, 1)


@triton.jit
def reduce_partials(Start, Out, Lse, PartO, PartLse, sob, soh, sos, slb, slh,
            batch, kv_heads, q_len, cache_len, programs, splits,
            GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, SCHEDULE: tl.constexpr):
    """Merge head ``program_id``'s partials (slots of its non-empty runs) and write the result."""
    head = tl.program_id(0)
    b = head // kv_heads
    kvh = head % kv_heads
    rows = GROUP * q_len
    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    if SCHEDULE == 2:
        tiles = _row_tiles(Start, batch, q_len, cache_len, BLOCK_N, BLOCK_B)
        total = tl.sum(tiles, axis=0) * kv_heads
        n = _pick(tiles, b, BLOCK_B)
        first_tile = (_pick(tl.cumsum(tiles, axis=0), b, BLOCK_B) - n) * kv_heads + kvh * n
        p_lo = ((first_tile + 1) * programs - 1) // total
        p_hi = ((first_tile + n) * programs - 1) // total + 1
        slot_base = head
    else:
        p_lo = head * splits
        p_hi = p_lo + splits
        slot_base = 0
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for p in range(p_lo, p_hi):
        if SCHEDULE == 2:  # a program whose run missed this head wrote no partial for it
            take = r < tl.where((p * total // programs) < ((p + 1) * total // programs), rows, 0)
        else:  # every split writes its partial, an empty one as the identity state
            take = r < rows
        slot = slot_base + p
        lse_p = tl.load(PartLse + slot * rows + r, mask=take, other=float("-inf"))
        o_p = tl.load(PartO + (slot * rows + r[:, None]) * HEAD_DIM + d[None, :],
                      mask=take[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
        m_new = tl.maximum(m, lse_p)
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - ref)
        w = tl.exp(lse_p - ref)
        acc = acc * alpha[:, None] + o_p * w[:, None]
        l_sum = l_sum * alpha + w
        m = m_new
    o, lse = finish(m, l_sum, acc)
    store_rows(Out, Lse, o, lse, b, kvh, q_len, sob, soh, sos, slb, slh, GROUP, HEAD_DIM, BLOCK_M, BLOCK_D)


_SCHEDULE_CODE = {"single": 0, "split": 1, "stream-k": 2}


def split_kv_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor,
                              scale: float, plan: DecodePlan,
                              tile_count: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``plan`` with the Triton kernels; returns ``(out [B,H,S,D] q.dtype, lse [B,H,S] fp32)``.

    ``tile_count``, if given (int32 ``[B·H_kv, max_tiles]``, zeroed), receives how many
    times each tile was processed: all ones over the valid tiles for a correct plan.
    """
    check_decode_shapes(q, k, v, start)
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"split_kv_attention: q, k, v must share one of {_DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("split_kv_attention: the head_dim axis of q, k and v must be contiguous")
    batch, heads, q_len, head_dim = q.shape
    kv_heads, cache_len = k.shape[1], k.shape[2]
    if plan.heads != batch * kv_heads:
        raise ValueError(f"plan is for {plan.heads} heads, call has batch {batch} × {kv_heads} KV heads")
    group = heads // kv_heads
    rows = group * q_len
    out = torch.empty_like(q)
    lse = torch.empty(batch, heads, q_len, device=q.device, dtype=torch.float32)
    slots = {"single": 1, "split": plan.programs, "stream-k": plan.heads + plan.programs}[plan.schedule]
    part_o = torch.empty(slots, rows, head_dim, device=q.device, dtype=torch.float32)
    part_lse = torch.empty(slots, rows, device=q.device, dtype=torch.float32)
    record = tile_count is not None
    counts = tile_count if record else part_lse
    meta = dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_M=max(16, triton.next_power_of_2(rows)),
                BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_N=plan.block_n,
                BLOCK_B=max(2, triton.next_power_of_2(batch)), SCHEDULE=_SCHEDULE_CODE[plan.schedule])
    upcast = os.environ.get("TRITON_INTERPRET") == "1" and q.dtype == torch.bfloat16
    precision = "ieee" if q.dtype == torch.float32 or upcast else "tf32"
    wrap_triton(_partials)[(plan.programs,)](
        q, k, v, start, out, lse, part_o, part_lse, counts,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), batch, kv_heads, q_len, cache_len, float(scale), plan.programs,
        plan.splits, counts.shape[-1] if record else 0, PRECISION=precision, UPCAST=upcast, RECORD=record,
        **meta,
    )
    if plan.schedule != "single":
        wrap_triton(reduce_partials)[(plan.heads,)](
            start, out, lse, part_o, part_lse, out.stride(0), out.stride(1), out.stride(2), lse.stride(0),
            lse.stride(1), batch, kv_heads, q_len, cache_len, plan.programs, plan.splits, **meta,
        )
    return out, lse
