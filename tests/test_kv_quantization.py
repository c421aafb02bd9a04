"""KIVI-style KV-cache quantization (TECHNIQUES.md §2): the invariants of the quantizer, the packing and
the quantized cache's append and attention."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from inferpass.kernels.quantization import dequantize, pack, quantize, unpack
from inferpass.kernels.quantized_cache import (KVQuantSpec, allocate, append, attend, dequantized_keys_values,
                                               head_channels, token_channels)
from inferpass.kernels.split_kv_reference import dense_attention


def _tensor(seed: int, *shape, spread: float = 3.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen) * spread + torch.randn((), generator=gen)


@given(bits=st.sampled_from([2, 4, 8]), seed=st.integers(0, 2**16), groups=st.integers(1, 4),
       group=st.integers(1, 16), dim=st.sampled_from([-1, -2]))
@settings(max_examples=60)
def test_round_trip_error_is_at_most_half_a_step(bits, seed, groups, group, dim):
    x = _tensor(seed, groups, group, group)
    codes, scale, zero = quantize(x, bits, dim=dim)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    err = (dequantize(codes, scale, zero) - x).abs()
    fp16_slack = 2e-3 * (zero.float().abs() + scale.float() * (2**bits - 1))  # stats are stored in fp16
    assert bool((err <= scale.float() / 2 + fp16_slack).all())


@given(bits=st.sampled_from([2, 4, 8]), value=st.floats(-100, 100, width=16), n=st.integers(1, 40))
def test_constant_groups_round_trip_exactly(bits, value, n):
    x = torch.full((3, n), value)
    codes, scale, zero = quantize(x, bits, dim=-1)
    out = dequantize(codes, scale, zero)
    assert not torch.isnan(out).any() and torch.equal(out, x)


@given(bits=st.sampled_from([2, 4, 8]), seed=st.integers(0, 2**16), width=st.integers(1, 6))
def test_pack_unpack_is_a_bijection_on_codes(bits, seed, width):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (3, 5, width * 8 // bits), generator=gen, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape[-1] == width and packed.dtype == torch.uint8
    assert torch.equal(unpack(packed, bits), codes)
    every_byte = torch.arange(256, dtype=torch.uint8)[:, None]
    assert torch.equal(pack(unpack(every_byte, bits), bits), every_byte)


def test_bad_bits_and_widths_are_named():
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize(torch.zeros(4), 3, dim=-1)
    with pytest.raises(ValueError, match="not a multiple of 4"):
        pack(torch.zeros(2, 6, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="value group 16 must divide the 1×24 channels"):
        KVQuantSpec(bits=4, group=16).value_group_size(1, 24)
    assert KVQuantSpec(group=16, value_group=48).value_group_size(3, 32) == 48  # groups may span heads


def _fill(spec, keys, values, chunks):
    """Append ``keys``/``values`` [B, H, T, D] chunk by chunk (sizes from ``chunks``), recording each state."""
    b, h, _, d = keys.shape
    cache = allocate(spec, b, h, d, max_len=keys.shape[2] + 8)
    states, pos = [cache], 0
    for size in chunks:
        start = torch.full((b,), pos)
        cache = append(cache, keys[:, :, pos : pos + size], values[:, :, pos : pos + size], start, spec)
        states.append(cache)
        pos += size
    return states


@st.composite
def fills(draw):
    """A random spec (sinks, value groups spanning heads) and keys/values [2, 2, T, D] appended in random chunks."""
    d = draw(st.sampled_from([8, 16]))
    spec = KVQuantSpec(bits=draw(st.sampled_from([2, 4, 8])), group=draw(st.sampled_from([2, 4, 8])),
                       residual=draw(st.integers(1, 12)), sink=draw(st.integers(0, 5)),
                       value_group=draw(st.sampled_from([None, d // 2, d, 2 * d])))
    chunks = draw(st.lists(st.integers(1, 9), min_size=1, max_size=8))
    seed = draw(st.integers(0, 2**16))
    keys, values = _tensor(seed, 2, 2, sum(chunks), d), _tensor(seed + 1, 2, 2, sum(chunks), d)
    return spec, keys, values, chunks


@given(fill=fills())
@settings(max_examples=25)
def test_appends_never_change_existing_codes_and_window_and_sinks_are_bit_exact(fill):
    spec, keys, values, chunks = fill
    states = _fill(spec, keys, values, chunks)
    n = 0
    for before, after, size in zip(states, states[1:], chunks):
        n += size
        n_q_before = int(spec.quantized_length(torch.tensor(n - size)))
        n_q = int(spec.quantized_length(torch.tensor(n)))
        for name in ("k_codes", "v_codes", "v_scale", "v_zero"):
            old, new = getattr(before, name), getattr(after, name)
            assert torch.equal(old[:, :, :n_q_before], new[:, :, :n_q_before]), f"{name} rewritten"
        for name in ("k_scale", "k_zero"):
            groups = n_q_before // spec.group
            assert torch.equal(getattr(before, name)[:, :, :groups], getattr(after, name)[:, :, :groups])
        recent = max(0, n - spec.sink - n_q)  # recent window: exact copies of the newest tokens
        assert torch.equal(after.k_window[:, :, :recent], keys[:, :, n - recent : n])
        assert torch.equal(after.v_window[:, :, :recent], values[:, :, n - recent : n])
        assert recent <= spec.window
        sinks = min(n, spec.sink)  # attention sinks: exact, for good
        if spec.sink:
            assert torch.equal(after.k_sink[:, :, :sinks], keys[:, :, :sinks])
            assert torch.equal(after.v_sink[:, :, :sinks], values[:, :, :sinks])
        else:
            assert after.k_sink is None and len(after.tensors()) == 8


@given(fill=fills())
@settings(max_examples=25)
def test_quantized_prefix_matches_direct_quantization(fill):
    spec, keys, values, chunks = fill
    final = _fill(spec, keys, values, chunks)[-1]
    n_q = int(spec.quantized_length(torch.tensor(sum(chunks))))
    got_k, got_v = dequantized_keys_values(final, spec)
    b, h, _, d = keys.shape
    if n_q:
        tail_k, tail_v = keys[:, :, spec.sink : spec.sink + n_q], values[:, :, spec.sink : spec.sink + n_q]
        ck, sk, zk = quantize(tail_k.reshape(b, h, n_q // spec.group, spec.group, d), spec.bits, dim=3)
        torch.testing.assert_close(got_k[:, :, :n_q], dequantize(ck, sk, zk).reshape(b, h, n_q, d))
        vg = spec.value_group_size(h, d)
        cv, sv, zv = quantize(token_channels(tail_v, vg), spec.bits, dim=3)
        torch.testing.assert_close(got_v[:, :, :n_q], head_channels(dequantize(cv, sv, zv), h))


def _quantized_attention_error(spec, q, keys, values, prefix):
    """Max error of attention over a cache holding ``prefix`` tokens plus one new token, vs fp32."""
    b, h, t, d = keys.shape
    cache = append(allocate(spec, b, h, d, max_len=t + 8), keys[:, :, :prefix], values[:, :, :prefix],
                   torch.zeros(b, dtype=torch.long), spec)
    start = torch.full((b,), prefix)
    got = attend(q, cache, keys[:, :, prefix : prefix + 1], values[:, :, prefix : prefix + 1], start, 0.25, spec)
    want = dense_attention(q, keys, values, start, 0.25)[0]
    return (got - want).abs().max().item()


def test_short_sequences_equal_the_full_precision_cache_exactly():
    spec = KVQuantSpec(bits=2, group=8, residual=16)
    keys, values, q = _tensor(0, 1, 2, 40, 16, spread=1), _tensor(1, 1, 2, 40, 16, spread=1), _tensor(2, 1, 4, 1, 16)
    assert _quantized_attention_error(spec, q, keys, values, prefix=15) < 1e-6  # 16 tokens <= R: nothing quantized


@given(seed=st.integers(0, 2**16))
@settings(max_examples=10)
def test_attention_error_shrinks_as_bits_grow(seed):
    keys, values, q = _tensor(seed, 2, 2, 200, 16, spread=1), _tensor(seed + 1, 2, 2, 200, 16, spread=1), \
        _tensor(seed + 2, 2, 4, 1, 16, spread=1)
    errors = [_quantized_attention_error(KVQuantSpec(bits=b, group=16, residual=16), q, keys, values, 180)
              for b in (2, 4, 8)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.02
    assert math.isfinite(errors[0])
