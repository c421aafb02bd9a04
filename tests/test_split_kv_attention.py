"""Split-KV decode attention (TECHNIQUES.md §1): the Triton kernels under TRITON_INTERPRET, the CPU kernel,
the exact state merge, the planner's tile assignment, and AOT compilation for sm_80/sm_90."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

from inferpass.kernels.attention_state import AttentionState, empty_state, merge, merge_along
from inferpass.kernels.decode_plan import head_tiles, plan_decode_attention, runs
from inferpass.kernels.split_kv_op import split_kv_attention
from inferpass.kernels.split_kv_reference import chunked_attention, dense_attention
from inferpass.kernels.split_kv_triton import split_kv_attention_triton

TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@st.composite
def decode_problems(draw, dtypes=(torch.float32,)):
    """Random GQA decode problem: ragged starts, 1-3 query tokens, caches up to 5 tiles of 16."""
    batch, kv_heads, group = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    q_len, head_dim = draw(st.integers(1, 3)), draw(st.sampled_from([8, 16, 32]))
    cache_len = draw(st.integers(q_len, 80))
    starts = draw(st.lists(st.integers(0, cache_len - q_len), min_size=batch, max_size=batch))
    dtype = draw(st.sampled_from(dtypes))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    q = torch.randn(batch, kv_heads * group, q_len, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, cache_len, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, cache_len, head_dim, generator=gen).to(dtype)
    return q, k, v, torch.tensor(starts), 1.0 / math.sqrt(head_dim)


@st.composite
def plans(draw, batch: int, kv_heads: int, cache_len: int):
    schedule = draw(st.sampled_from(["single", "split", "stream-k"]))
    return plan_decode_attention(batch, kv_heads, cache_len, draw(st.integers(1, 8)), schedule=schedule,
                                 splits=draw(st.integers(1, 12)), block_n=16)


def _reference_fp32(q, k, v, start, scale):
    return dense_attention(q.float(), k.float(), v.float(), start, scale)


def _valid_tiles(start, q_len, cache_len, kv_heads, block_n=16):
    return head_tiles([min(int(s) + q_len, cache_len) for s in start], kv_heads, block_n)


@given(problem=decode_problems(dtypes=(torch.float32, torch.float16, torch.bfloat16)), data=st.data())
def test_triton_kernels_equal_fp32_reference_for_any_plan(problem, data):
    q, k, v, start, scale = problem
    plan = data.draw(plans(q.shape[0], k.shape[1], k.shape[2]))
    tiles = _valid_tiles(start, q.shape[2], k.shape[2], k.shape[1])
    counts = torch.zeros(plan.heads, max(tiles), dtype=torch.int32)
    out, lse = split_kv_attention_triton(q, k, v, start, scale, plan, tile_count=counts)
    want, want_lse = _reference_fp32(q, k, v, start, scale)
    tol = TOLERANCE[q.dtype]
    torch.testing.assert_close(out.float(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, want_lse, atol=tol, rtol=tol)
    expected = torch.tensor([[1] * n + [0] * (max(tiles) - n) for n in tiles], dtype=torch.int32)
    assert torch.equal(counts, expected), "every valid tile must be processed exactly once"


@given(problem=decode_problems(), data=st.data())
def test_kernel_lse_is_logsumexp_of_visible_scores(problem, data):
    q, k, v, start, scale = problem
    plan = data.draw(plans(q.shape[0], k.shape[1], k.shape[2]))
    _, lse = split_kv_attention_triton(q, k, v, start, scale, plan)
    group = q.shape[1] // k.shape[1]
    scores = q @ k.repeat_interleave(group, 1).transpose(-1, -2) * scale
    positions = start[:, None] + torch.arange(q.shape[2])[None]
    visible = torch.arange(k.shape[2])[None, None, :] <= positions[:, :, None]
    want = scores.masked_fill(~visible[:, None], float("-inf")).logsumexp(-1)
    torch.testing.assert_close(lse, want, atol=1e-5, rtol=1e-5)


@given(problem=decode_problems(dtypes=(torch.float32, torch.float16)), data=st.data())
def test_gqa_equals_mha_with_repeated_kv_heads(problem, data):
    q, k, v, start, scale = problem
    group = q.shape[1] // k.shape[1]
    schedule = data.draw(st.sampled_from(["single", "split", "stream-k"]))
    gqa_plan = plan_decode_attention(q.shape[0], k.shape[1], k.shape[2], 4, schedule=schedule, splits=3, block_n=16)
    mha_plan = plan_decode_attention(q.shape[0], q.shape[1], k.shape[2], 4, schedule=schedule, splits=3, block_n=16)
    gqa, _ = split_kv_attention_triton(q, k, v, start, scale, gqa_plan)
    mha, _ = split_kv_attention_triton(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                       start, scale, mha_plan)
    tol = TOLERANCE[q.dtype]
    torch.testing.assert_close(gqa.float(), mha.float(), atol=tol, rtol=tol)


@given(problem=decode_problems(), data=st.data())
def test_fixed_plan_is_bit_stable(problem, data):
    q, k, v, start, scale = problem
    plan = data.draw(plans(q.shape[0], k.shape[1], k.shape[2]))
    first = split_kv_attention_triton(q, k, v, start, scale, plan)
    second = split_kv_attention_triton(q, k, v, start, scale, plan)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_length_one_cache_and_more_splits_than_blocks():
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
    start = torch.tensor([0, 39])  # row 0 sees exactly one slot; row 1 the whole cache (3 tiles)
    want, want_lse = dense_attention(q, k, v, start, 0.25)
    for plan in (plan_decode_attention(2, 2, 40, 3, schedule="split", splits=50, block_n=16),
                 plan_decode_attention(2, 2, 40, 64, schedule="stream-k", block_n=16)):
        out, lse = split_kv_attention_triton(q, k, v, start, 0.25, plan)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(want[0, :2], v[0, 0, :1].expand(2, 1, 16))  # one visible slot: its value


def test_kernel_rejects_bad_inputs_by_name():
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 32, 16)
    plan = plan_decode_attention(1, 2, 32, 4, block_n=16)
    with pytest.raises(ValueError, match="start must be int64"):
        split_kv_attention_triton(q, k, k, torch.tensor([0], dtype=torch.int32), 1.0, plan)
    with pytest.raises(ValueError, match="heads not a multiple"):
        split_kv_attention_triton(torch.randn(1, 3, 1, 16), k, k, torch.tensor([0]), 1.0, plan)
    with pytest.raises(ValueError, match="share one of"):
        split_kv_attention_triton(q.half(), k, k, torch.tensor([0]), 1.0, plan)
    with pytest.raises(ValueError, match="plan is for 2 heads"):
        split_kv_attention_triton(q.expand(3, -1, -1, -1).contiguous(), k.expand(3, -1, -1, -1).contiguous(),
                                  k.expand(3, -1, -1, -1).contiguous(), torch.tensor([0, 0, 0]), 1.0, plan)


@given(problem=decode_problems(), chunk=st.integers(1, 40))
def test_cpu_chunked_kernel_equals_dense_for_any_chunk(problem, chunk):
    q, k, v, start, scale = problem
    out, lse = chunked_attention(q, k, v, start, scale, chunk)
    want, want_lse = dense_attention(q, k, v, start, scale)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)


def test_dense_reference_equals_torch_sdpa():
    q, k, v = torch.randn(2, 6, 2, 8), torch.randn(2, 3, 30, 8), torch.randn(2, 3, 30, 8)
    start = torch.tensor([4, 28])
    positions = start[:, None] + torch.arange(2)[None]
    mask = (torch.arange(30)[None, None, :] <= positions[:, :, None])[:, None]
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask, scale=0.3)
    torch.testing.assert_close(dense_attention(q, k, v, start, 0.3)[0], want, atol=1e-6, rtol=1e-5)


@st.composite
def states(draw, empty_rows: bool = True):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    lse = torch.randn(5, generator=gen) * 4
    if empty_rows:
        lse[draw(st.integers(0, 4))] = float("-inf")
    o = torch.randn(5, 8, generator=gen)
    return AttentionState(torch.where(torch.isinf(lse)[:, None], torch.zeros_like(o), o), lse)


def _close(a: AttentionState, b: AttentionState):
    torch.testing.assert_close(a.o, b.o, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a.lse, b.lse, atol=1e-6, rtol=1e-5)


@given(a=states(), b=states(), c=states())
def test_merge_is_associative_commutative_with_empty_identity(a, b, c):
    _close(merge(merge(a, b), c), merge(a, merge(b, c)))
    _close(merge(a, b), merge(b, a))
    empty = empty_state((5,), 8)
    _close(merge(a, empty), a)
    both_empty = merge(empty, empty)
    assert not torch.isnan(both_empty.o).any() and torch.isinf(both_empty.lse).all()
    _close(merge_along(AttentionState(torch.stack([a.o, b.o, c.o]), torch.stack([a.lse, b.lse, c.lse])), 0),
           merge(merge(a, b), c))


@given(lengths=st.lists(st.integers(1, 300), min_size=1, max_size=6), kv_heads=st.integers(1, 4),
       workers=st.integers(1, 200), splits=st.integers(1, 40),
       schedule=st.sampled_from(["single", "split", "stream-k", "auto"]), block_n=st.sampled_from([16, 64]))
@settings(max_examples=200)
def test_every_tile_is_assigned_exactly_once(lengths, kv_heads, workers, splits, schedule, block_n):
    plan = plan_decode_attention(len(lengths), kv_heads, max(lengths), workers, schedule=schedule, splits=splits,
                                 block_n=block_n)
    tiles = head_tiles(lengths, kv_heads, block_n)
    seen = [[0] * n for n in tiles]
    for program, head, lo, hi in runs(plan, tiles):
        assert 0 <= program < plan.programs and lo < hi
        for t in range(lo, hi):
            seen[head][t] += 1
    assert all(c == 1 for row in seen for c in row)
    if plan.schedule == "stream-k":  # equal shares: run sizes differ by at most one tile
        sizes = [0] * plan.programs
        for program, _, lo, hi in runs(plan, tiles):
            sizes[program] += hi - lo
        assert max(sizes) - min(sizes) <= 1


def test_planner_falls_back_where_splitting_does_not_pay():
    assert plan_decode_attention(32, 8, 32768, 132).schedule == "single"  # 256 heads fill 132 SMs
    assert plan_decode_attention(1, 8, 64, 132).schedule == "single"  # one tile per head
    long = plan_decode_attention(1, 8, 32768, 132)
    assert long.schedule == "stream-k" and long.programs == 264
    fd = plan_decode_attention(1, 8, 32768, 132, schedule="split")
    assert fd.schedule == "split" and 1 < fd.splits <= 128 and fd.programs == 8 * fd.splits
    assert "stream-k" in long.describe() and "264 persistent programs" in long.describe()
    with pytest.raises(ValueError, match="block_n"):
        plan_decode_attention(1, 8, 1024, 132, block_n=48)
    with pytest.raises(ValueError, match="splits"):
        plan_decode_attention(1, 8, 1024, 132, splits=0)


def test_op_exports_with_fake_impl_and_decomposes_to_reference():
    class Decode(torch.nn.Module):
        def forward(self, q, k, v, start):
            return split_kv_attention(q, k, v, start, 0.25, block_n=16) * 2

    args = (torch.randn(2, 4, 1, 16), torch.randn(2, 2, 48, 16), torch.randn(2, 2, 48, 16), torch.tensor([3, 40]))
    ep = torch.export.export(Decode(), args)
    want = dense_attention(*args, 0.25)[0] * 2
    torch.testing.assert_close(ep.module()(*args), want, atol=1e-5, rtol=1e-5)
    from inferpass.ir.ops import reference_decompositions

    lowered = ep.run_decompositions(reference_decompositions())
    assert not any("inferpass" in str(n.target) for n in lowered.graph.nodes)
    torch.testing.assert_close(lowered.module()(*args), want, atol=1e-5, rtol=1e-5)


def test_kernels_compile_for_sm80_and_sm90_without_a_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "inferpass.kernels.compile_check", "--arch", "80", "90"],
                          capture_output=True, text=True, env=env | {"TRITON_DEFAULT_FP_FUSION": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in done.stdout.splitlines()]
    split_kv = {(f"sm_{a}", kernel, s, d) for a in (80, 90) for d in ("fp32", "fp16", "bf16")
                for s in ("single", "split", "stream-k") for kernel in ("_partials", "reduce_partials")
                if not (kernel == "reduce_partials" and s == "single")}
    quantized = {(f"sm_{a}", f"_quantized_partials[{bits}bit]", s, d) for a in (80, 90) for s in ("single", "split")
                 for d, bits in (("fp32", 4), ("fp16", 2), ("fp16", 4), ("fp16", 8), ("bf16", 4))}
    assert {(r["arch"], r["kernel"], r["schedule"], r["dtype"]) for r in records} == split_kv | quantized
    assert all(r["cubin_bytes"] > 0 and r["local_bytes"] == 0 for r in records), "kernels must not spill"
