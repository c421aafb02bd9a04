"""The lean-attention pass on whole models: every decode attention site rewritten, generation unchanged."""

import torch
from hypothesis import given, settings, strategies as st

from factories import decoder_configs, tiny_decoder
from traces import trace
from inferpass.capture import capture
from inferpass.eval.report import prompts_from_text
from inferpass.ir.serialize import load_program, save_program
from inferpass.kernels.split_kv_op import SPLIT_KV_ATTENTION
from inferpass.passes import PassManager, Pipeline
from inferpass.runtime.generator import Generator
from inferpass.targets import get_target

aten = torch.ops.aten


def _optimize(program, text="lean-attention{block_n=16}"):
    return PassManager(Pipeline.parse(text), debug=True).run(program.clone())


def _count(program, graph, target):
    return sum(n.target is target for n in program.graphs[graph].graph.nodes)


@given(config=decoder_configs(), data=st.data())
@settings(max_examples=8)
def test_random_decoders_keep_their_logits_and_greedy_tokens(config, data):
    program = capture(tiny_decoder(**config), max_len=24)
    run = _optimize(program)
    optimized = run.program
    layers = program.info.num_layers
    assert run.records[0].stats["attention_sites"] == layers
    assert _count(optimized, "decode", SPLIT_KV_ATTENTION.overload) == layers
    assert _count(optimized, "decode", aten.scaled_dot_product_attention.default) == 0
    assert _count(optimized, "prefill", aten.scaled_dot_product_attention.default) == layers  # decode only
    vocab = program.info.vocab_size
    prompts = [data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=9)) for _ in range(data.draw(st.integers(1, 3)))]
    for want, got in zip(trace(program, prompts, 6, feed="greedy"), trace(optimized, prompts, 6, feed="greedy")):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    base = Generator(get_target("eager").compile(program)).generate(prompts, 8).tokens
    assert Generator(get_target("eager").compile(optimized)).generate(prompts, 8).tokens == base


def test_default_lm_generation_is_identical(lm_program, heldout):
    optimized = _optimize(lm_program, "lean-attention").program
    prompts = prompts_from_text(heldout, count=4, length=48)
    for want, got in zip(trace(lm_program, prompts, 8, feed="greedy"), trace(optimized, prompts, 8, feed="greedy")):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    base = Generator(get_target("eager").compile(lm_program)).generate(prompts, 16).tokens
    assert Generator(get_target("eager").compile(optimized)).generate(prompts, 16).tokens == base


def test_identity_setting_is_bit_exact_and_plans_are_explained():
    program = capture(tiny_decoder("llama", layers=2, context=256), max_len=256)
    identity = _optimize(program, "lean-attention{graphs=[]}").program
    assert _count(identity, "decode", SPLIT_KV_ATTENTION.overload) == 0
    assert identity.node_count() == program.node_count()
    stats = _optimize(program, "lean-attention{schedule=split, splits=4}").records[0].stats
    assert stats["plan batch 1"].startswith("split: 2 heads × 4 splits = 8 programs")
    auto = _optimize(program).records[0].stats
    assert auto["plan batch 1"].startswith("stream-k") and "workers=" in auto["plan batch 32"]


def test_rewritten_program_saves_loads_and_runs(tmp_path):
    program = capture(tiny_decoder("qwen2", layers=1), max_len=32)
    optimized = _optimize(program).program
    save_program(optimized, tmp_path / "out")
    loaded = load_program(tmp_path / "out")
    assert _count(loaded, "decode", SPLIT_KV_ATTENTION.overload) == 1
    prompts = [[1, 2, 3], [4]]
    for want, got in zip(trace(optimized, prompts, 3, feed="greedy"), trace(loaded, prompts, 3, feed="greedy")):
        assert torch.equal(want, got)
