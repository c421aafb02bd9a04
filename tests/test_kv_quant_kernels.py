"""Attention over a quantized KV cache: the CPU kernel and the fused dequantizing Triton kernel (under
TRITON_INTERPRET) against the reference, on random specs, ragged rows, GQA, several query tokens and dtypes."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from inferpass.kernels.kv_quant_triton import kv_quant_attention_triton
from inferpass.kernels.quantized_attention import fp_extras, quantized_cache_attention
from inferpass.kernels.quantized_cache import KVQuantSpec, LayerCache, allocate, append, attend

TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _ragged_cache(spec, keys, values, lengths, dtype):
    """One cache row per sequence, row ``b`` holding ``lengths[b]`` tokens of ``keys``/``values`` [B, H, T, D]."""
    rows = []
    for b, n in enumerate(lengths):
        row = allocate(spec, 1, keys.shape[1], keys.shape[3], max_len=keys.shape[2], dtype=dtype)
        if n:
            row = append(row, keys[b : b + 1, :, :n].to(dtype), values[b : b + 1, :, :n].to(dtype),
                         torch.zeros(1, dtype=torch.long), spec)
        rows.append(row)
    return LayerCache(*[torch.cat(parts) if parts[0] is not None else None for parts in zip(*rows)])


@st.composite
def problems(draw, dtypes=(torch.float32,)):
    """A quantized cache with ragged rows, and a call of 1-3 new tokens with GQA queries."""
    d = draw(st.sampled_from([16, 32]))
    kv_heads, group, q_len = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    spec = KVQuantSpec(bits=draw(st.sampled_from([2, 4, 8])), group=draw(st.sampled_from([16, 32])),
                       residual=draw(st.integers(1, 20)), sink=draw(st.integers(0, 4)),
                       value_group=draw(st.sampled_from([None, d // 2, kv_heads * d])))
    max_len = 160
    lengths = draw(st.lists(st.integers(0, max_len - q_len), min_size=1, max_size=3))
    dtype = draw(st.sampled_from(dtypes))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    keys, values = torch.randn(len(lengths), kv_heads, max_len, d, generator=gen), \
        torch.randn(len(lengths), kv_heads, max_len, d, generator=gen)
    cache = _ragged_cache(spec, keys, values, lengths, dtype)
    start = torch.tensor(lengths)
    new = [torch.stack([x[b, :, n : n + q_len] for b, n in enumerate(lengths)]).to(dtype) for x in (keys, values)]
    q = torch.randn(len(lengths), kv_heads * group, q_len, d, generator=gen).to(dtype)
    return spec, q, cache, new[0], new[1], start, 1 / math.sqrt(d)


@given(problem=problems())
@settings(max_examples=20)
def test_cpu_kernel_equals_the_reference(problem):
    spec, q, cache, new_k, new_v, start, scale = problem
    want = attend(q, cache, new_k, new_v, start, scale, spec)
    for chunk_groups in (1, 3):
        got, _ = quantized_cache_attention(q, cache, new_k, new_v, start, scale, spec, chunk_groups=chunk_groups)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@given(problem=problems(dtypes=(torch.float32, torch.float16, torch.bfloat16)), splits=st.integers(1, 5))
@settings(max_examples=20)
def test_fused_triton_kernel_equals_the_cpu_kernel_for_any_split(problem, splits):
    spec, q, cache, new_k, new_v, start, scale = problem
    want, want_lse = quantized_cache_attention(q, cache, new_k, new_v, start, scale, spec)
    got, lse = kv_quant_attention_triton(q, cache, new_k, new_v, start, scale, spec, splits=splits)
    tol = TOLERANCE[q.dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse, want_lse, atol=tol, rtol=tol)
    again, _ = kv_quant_attention_triton(q, cache, new_k, new_v, start, scale, spec, splits=splits)
    assert torch.equal(again, got), "a fixed split count must be bit-stable"


def test_extras_carry_sinks_window_and_new_tokens_with_their_positions():
    spec = KVQuantSpec(bits=4, group=16, residual=4, sink=2)
    keys = torch.arange(40, dtype=torch.float32)[None, None, :, None].expand(1, 1, 40, 16).contiguous()
    cache = _ragged_cache(spec, keys, keys, [30], torch.float32)  # n_q = 16: tail slots 0..15 quantized
    k, _, positions = fp_extras(cache, keys[:, :, 30:32], keys[:, :, 30:32], torch.tensor([30]), spec)
    assert positions.tolist() == [[0, 1, *range(18, 30), *[-1] * 8, 30, 31]]  # window: R + G = 20 slots
    visible = positions[0] >= 0
    assert torch.equal(k[0, 0, visible, 0], positions[0, visible].float())  # each slot holds its token


def test_triton_kernel_names_an_unsupported_group_or_dtype():
    spec = KVQuantSpec(bits=4, group=8, residual=4)
    cache = allocate(spec, 1, 1, 16, max_len=32)
    q, new = torch.zeros(1, 1, 1, 16), torch.zeros(1, 1, 1, 16)
    with pytest.raises(ValueError, match="group must be a power of two >= 16"):
        kv_quant_attention_triton(q, cache, new, new, torch.zeros(1, dtype=torch.long), 1.0, spec)
    with pytest.raises(ValueError, match="q must be one of"):
        kv_quant_attention_triton(q.double(), cache, new, new, torch.zeros(1, dtype=torch.long), 1.0, spec)
