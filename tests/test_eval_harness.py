"""The evaluation harness: window coverage, exact bits/byte, agreement and report mechanics on small models."""

import math

import pytest

import torch
from hypothesis import given
from hypothesis import strategies as st

from factories import tiny_decoder
from inferpass.capture import capture
from inferpass.eval.bits_per_byte import bits_per_byte, sliding_windows
from inferpass.eval.quality import greedy_agreement, program_bits_per_byte
from inferpass.eval.report import compare_decoders, random_prompts
from inferpass.eval.speed import percentile
from inferpass.targets import get_target


@given(n=st.integers(2, 3000), context=st.integers(1, 300), data=st.data())
def test_windows_score_every_byte_once_with_bounded_context(n, context, data):
    stride = data.draw(st.integers(1, context))
    seen = []
    for start, end, first in sliding_windows(n, context, stride):
        assert end - start <= context + 1 and start < first <= end
        assert first == 1 or first - start - 1 >= context - stride  # left context of the first scored byte
        seen.extend(range(first, end))
    assert seen == list(range(1, n))


def test_uniform_model_scores_exactly_eight_bits():
    uniform = lambda ids: {"u": torch.zeros(*ids.shape, 256)}  # noqa: E731
    assert bits_per_byte(uniform, bytes(range(256)) * 7, context=100, stride=37)["u"] == pytest.approx(8.0, rel=1e-7)


def test_perfect_model_scores_zero_bits():
    data = bytes(i % 256 for i in range(2000))

    def oracle(ids):
        logits = torch.full((*ids.shape, 256), -1e4)
        logits.scatter_(-1, ((ids + 1) % 256)[..., None], 0.0)
        return {"o": logits}

    assert bits_per_byte(oracle, data, context=64, stride=64)["o"] < 1e-6


def test_program_bits_per_byte_matches_the_eager_model():
    model = tiny_decoder("llama", vocab=256, context=128, seed=5)
    program = capture(model, max_len=64)
    data = bytes(torch.randint(0, 256, (500,), generator=torch.Generator().manual_seed(0)).tolist())
    got = program_bits_per_byte(get_target("eager").compile(program), data, context=64)
    with torch.no_grad():
        want = bits_per_byte(lambda ids: {"m": model(ids).logits}, data, context=64, stride=64)["m"]
    assert math.isclose(got, want, rel_tol=1e-6)


def test_agreement_and_report_detect_a_damaged_program():
    program = capture(tiny_decoder("qwen2", vocab=48, seed=2), max_len=48)
    damaged = program.clone()
    for ep in damaged.graphs.values():
        for name, weight in ep.state_dict.items():
            if "mlp" in name or "o_proj" in name:
                ep.state_dict[name] = torch.nn.Parameter(torch.randn_like(weight), requires_grad=False)
    base, bad = get_target("eager").compile(program), get_target("eager").compile(damaged)
    prompts = random_prompts(48, count=4, length=6)
    assert greedy_agreement(base, base, prompts, 12) == 1.0
    assert greedy_agreement(base, bad, prompts, 12) < 0.5
    report = compare_decoders(base, bad, prompts=prompts, new_tokens=8)
    assert report.value("greedy agreement").optimized < 0.5
    assert report.value("KV-cache bytes / sequence").ratio == 1.0
    assert "optimized / baseline" in str(report.table().columns[3].header)


def test_percentile():
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0 and percentile([1.0, 2.0], 0.99) == 1.99
