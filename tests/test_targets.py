"""Targets against eager: every pipeline × target available here (cpu: IREE, inductor: AOTInductor) gives eager's
outputs through prefill and 8 decode steps (fp32 tolerance for exact pipelines, the pass's own bound for approximate
ones); shape buckets; clear errors. The default LM with the default preset on each target, its saved folder
replayed in a fresh process from its carried artifacts and padded to a new bucket, is ``test_cli_matrix.py``'s."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from factories import decoder_configs, tiny_decoder, tiny_vit
from traces import assert_within_quantization_error, trace
from inferpass.capture import capture
from inferpass.defaults import MODELS
from inferpass.errors import TargetError
from inferpass.eval.digits import load_digits
from inferpass.eval.quality import accuracy
from inferpass.ir.examples import example_inputs
from inferpass.passes import PassManager, Pipeline
from inferpass.targets import get_target
from inferpass.targets.inductor import InductorTarget
from inferpass.targets.iree_cpu import CpuTarget, lower_to_vmfb
from inferpass.targets.static_shapes import prefill_pieces

EXACT_PIPELINES = ["", "dce,cse,drop-unused-params", "lean-attention"]
TARGETS = {"cpu": CpuTarget, "inductor": InductorTarget}


@pytest.fixture(scope="module", params=["cpu", "inductor"])
def target(request, tmp_path_factory):
    """Each ahead-of-time target, with an on-disk artifact cache of its own for this module."""
    return TARGETS[request.param](cache_dir=tmp_path_factory.mktemp(f"{request.param}-artifacts"))


@given(config=decoder_configs(family="llama"), pipeline=st.sampled_from(EXACT_PIPELINES), data=st.data())
@settings(max_examples=3)
def test_exact_pipelines_equal_eager(target, config, pipeline, data):
    program = PassManager(Pipeline.parse(pipeline)).run(capture(tiny_decoder(**config), max_len=48)).program
    vocab = program.info.vocab_size
    prompts = [data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=20)) for _ in range(2)]
    want = trace(get_target("eager").compile(program), prompts)
    torch.testing.assert_close(trace(target.compile(program), prompts), want, atol=5e-5, rtol=1e-4)


def test_kv_quant_stays_within_the_quantization_error(target):
    program = capture(tiny_decoder("llama", layers=2, head_dim=16, context=64), max_len=64)
    quantized = PassManager(Pipeline.parse("kv-quant{bits=4, group=8, residual=8}")).run(program.clone()).program
    prompts = [list(range(3, 35)), list(range(9, 25))]  # 32 and 16 tokens: one exact prefill piece each
    assert_within_quantization_error(trace(target.compile(quantized), prompts), trace(quantized, prompts),
                                     trace(program, prompts))


def test_encoders_equal_eager(target):
    program = capture(tiny_vit())
    (pixels,) = example_inputs(program, "forward", batch=3)
    (want,) = get_target("eager").compile(program).run("forward", pixels)
    (got,) = target.compile(program).run("forward", pixels)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    vit = capture(MODELS / "default-vit")
    pixels, labels = load_digits("test")
    want = accuracy(get_target("eager").compile(vit), (pixels,), labels)
    assert accuracy(target.compile(vit), (pixels,), labels) == want >= 0.97


@given(length=st.integers(1, 300), room=st.integers(1, 300), pad=st.booleans())
@settings(max_examples=200)
def test_prefill_pieces_cover_the_prompt_within_the_cache(length, room, pad):
    max_len = 300
    room = max(room, length)
    pieces = prefill_pieces(length, room, max_len, pad)
    assert sum(tokens for tokens, _ in pieces) == length
    assert all(tokens <= bucket <= room for tokens, bucket in pieces)
    if not pad:
        assert all(tokens == bucket and bucket & (bucket - 1) == 0 for tokens, bucket in pieces)
    elif len(pieces) == 1 and pieces[0][1] > length:
        assert pieces[0][1] in {max_len} | {1 << b for b in range(4, 9)}


def test_unsupported_ops_and_dtypes_are_named():
    @torch.library.custom_op("inferpass_test::twice", mutates_args=())
    def twice(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    twice.register_fake(lambda x: torch.empty_like(x))

    class UsesCustomOp(torch.nn.Module):
        def forward(self, x):
            return torch.ops.inferpass_test.twice(x) + 1

    ep = torch.export.export(UsesCustomOp(), (torch.ones(3),))
    with pytest.raises(TargetError, match="target 'cpu': forward graph calls op inferpass_test::twice"):
        lower_to_vmfb(ep, (torch.ones(3),), "forward")
    bf16 = capture(tiny_decoder("llama", layers=1).to(torch.bfloat16), max_len=8)
    with pytest.raises(TargetError, match="target 'cpu': weight .*embed_tokens.weight has dtype torch.bfloat16"):
        get_target("cpu").compile(bf16)
