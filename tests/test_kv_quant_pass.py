"""The kv-quant pass on whole models: new cache layout, exact while the window holds everything, bounded after."""

import torch
from hypothesis import given, settings, strategies as st

from factories import decoder_configs, tiny_decoder
from traces import trace
from inferpass.capture import capture
from inferpass.eval.quality import program_bits_per_byte
from inferpass.ir.program import CacheLayout, CacheTensor
from inferpass.ir.serialize import load_program, save_program
from inferpass.kernels.kv_quant_op import KV_QUANT_ATTENTION
from inferpass.passes import PassManager, Pipeline
from inferpass.targets import get_target


def _quantize(program, text):
    return PassManager(Pipeline.parse(text)).run(program.clone())


@given(config=decoder_configs(family="llama"), data=st.data())
@settings(max_examples=5)
def test_exact_while_the_window_holds_the_whole_sequence(config, data):
    config["head_dim"] = 8
    program = capture(tiny_decoder(**config), max_len=32)
    run = _quantize(program, "kv-quant{bits=2, group=4, residual=8}")
    quantized = run.program
    assert sum(n.target is KV_QUANT_ATTENTION.overload for n in quantized.graphs["decode"].graph.nodes) == \
        program.info.num_layers
    assert quantized.cache.nbytes(1) < program.cache.nbytes(1)
    vocab = program.info.vocab_size
    prompts = [data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=4)) for _ in range(2)]
    steps = 11 - max(len(p) for p in prompts)  # total length <= R + G - 1 = 11: nothing is quantized yet
    torch.testing.assert_close(trace(quantized, prompts, steps), trace(program, prompts, steps),
                               atol=1e-5, rtol=1e-5)


@given(config=decoder_configs(family="llama"), data=st.data())
@settings(max_examples=4)
def test_sinks_extend_the_exact_span_and_value_groups_may_span_heads(config, data):
    config["head_dim"] = 8
    program = capture(tiny_decoder(**config), max_len=40)
    value_group = config["kv_heads"] * 8  # one statistics group over all of a token's KV heads
    quantized = _quantize(program, f"kv-quant{{bits=2, group=4, residual=4, sink=6, value_group={value_group}}}")
    layout = {t.name: t for t in quantized.program.cache.tensors}
    assert layout["k_sink0"].shape == ("batch", config["kv_heads"], 6, 8)
    assert layout["v_scale0"].shape[1:] == (1, 36 + 4, 1)
    vocab = program.info.vocab_size
    prompts = [data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=6)) for _ in range(2)]
    steps = 13 - max(len(p) for p in prompts)  # total length <= sink + R + G - 1 = 13: nothing is quantized yet
    torch.testing.assert_close(trace(quantized.program, prompts, steps),
                               trace(program, prompts, steps), atol=1e-5, rtol=1e-5)


def test_error_shrinks_with_bits_on_long_sequences():
    program = capture(tiny_decoder("qwen2", layers=2, head_dim=16, vocab=96, context=128, seed=3), max_len=96)
    prompts = [list(range(5, 45)), list(range(20, 70))]
    want = trace(program, prompts, 20)
    errors = []
    for bits in (2, 4, 8):
        got = trace(_quantize(program, f"kv-quant{{bits={bits}, group=8, residual=8}}").program, prompts, 20)
        errors.append((got - want).abs().max().item())
    assert errors[0] > errors[1] > errors[2] > 0 and errors[2] < 0.05


def test_layout_per_layer_bits_save_load_and_identity(tmp_path):
    program = capture(tiny_decoder("llama", layers=2, head_dim=16, context=64), max_len=64)
    identity = _quantize(program, "kv-quant{layers=[]}").program
    assert identity.cache == program.cache and identity.node_count() == program.node_count()
    run = _quantize(program, "kv-quant{bits=2, group=8, residual=8, bits_per_layer={0: 8}}")
    layout = {t.name: t for t in run.program.cache.tensors}
    assert layout["k_codes0"].shape[-1] == 16 and layout["k_codes1"].shape[-1] == 4  # 8-bit vs 2-bit packing
    assert layout["k_scale1"].dtype == "float16" and layout["k_window1"].dtype == "float32"
    assert run.records[0].cache_bytes_delta < 0
    save_program(run.program, tmp_path / "q")
    loaded = load_program(tmp_path / "q")
    prompts = [list(range(30)), list(range(3, 20))]
    assert torch.equal(trace(loaded, prompts, 12), trace(run.program, prompts, 12))
    partial = _quantize(program, "kv-quant{layers=[1]}").program
    assert [t.name for t in partial.cache.tensors][:2] == ["k0", "v0"]


def test_composes_with_lean_attention_in_either_order():
    program = capture(tiny_decoder("llama", layers=2, head_dim=16, context=64), max_len=64)
    prompts = [list(range(40))]
    first = _quantize(program, "kv-quant{group=8, residual=8},lean-attention")
    assert [r.spec.split("{")[0] for r in first.records] == ["kv-quant", "lean-attention"]
    reordered = _quantize(program, "lean-attention,kv-quant{group=8, residual=8}")
    assert [r.spec.split("{")[0] for r in reordered.records] == ["kv-quant", "lean-attention"]
    want = trace(_quantize(program, "kv-quant{group=8, residual=8}").program, prompts, 6)
    torch.testing.assert_close(trace(first.program, prompts, 6), want)


def test_default_lm_quality_cost_by_bits(lm_program, heldout):
    text = heldout[:2048]
    base = program_bits_per_byte(get_target("eager").compile(lm_program), text, context=1024, chunk=128)
    costs = {}
    for bits in (8, 4, 2):
        quantized = _quantize(lm_program, f"kv-quant{{bits={bits}}}").program
        costs[bits] = program_bits_per_byte(get_target("eager").compile(quantized), text, context=1024,
                                            chunk=128) - base
    assert abs(costs[8]) < 0.005 and costs[4] < 0.03 and costs[2] < 0.15
    assert costs[2] > costs[4]


def test_cache_compression_against_fp16_at_4k_tokens():
    """The default LM's shapes (8 layers, 3 KV heads of 32) at 4096 slots, fp16 program: KV-cache bytes
    (codes + scales + window) against the fp16 cache, with value groups over a token's 96 channels."""
    fp16 = CacheLayout(max_len=4096, tensors=tuple(
        CacheTensor(name=f"{role}{layer}", layer=layer, role=role, shape=("batch", 3, 4096, 32), dtype="float16")
        for layer in range(8) for role in ("k", "v")))
    ratios = {}
    for bits in (8, 4, 2):
        kv_quant = Pipeline.parse(f"kv-quant{{bits={bits}, group=32, residual=32, value_group=96}}").passes[0]
        ratios[bits] = fp16.nbytes(1) / kv_quant.quantized_layout(fp16, set(range(8))).nbytes(1)
    assert ratios[4] >= 3.2 and ratios[2] >= 5.0 and ratios[8] > 1.7, ratios
