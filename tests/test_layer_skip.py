"""layer-skip: identity, equality with zeroed branches, cache consistency, SkipDecode schedules, ranking, errors."""

import functools

import pytest
import torch
from hypothesis import given, settings, strategies as st

from factories import DECODER_FAMILIES, decoder_configs, tiny_decoder
from traces import trace
from inferpass.capture import capture
from inferpass.errors import InferpassError, PipelineError
from inferpass.eval.quality import program_bits_per_byte
from inferpass.eval.report import compare_decoders
from inferpass.ir.serialize import load_program, save_program
from inferpass.passes import PassManager, Pipeline
from inferpass.passes import block_influence as influence_module
from inferpass.runtime.engine import Engine
from inferpass.runtime.generator import Generator
from inferpass.runtime.step_runner import StepRunner
from inferpass.targets import get_target

MODES = ("blocks", "attention", "ffn")


def _run(program, text):
    return PassManager(Pipeline.parse(text)).run(program.clone())


def _zeroed(program, family: str, layer: int, mode: str):
    """A copy of ``program`` whose block ``layer`` adds nothing through ``mode``'s residual branches: the
    branches' output projections (weight and bias) replaced by zeros."""
    block = f"model.transformer.h.{layer}." if family == "gpt2" else f"model.model.layers.{layer}."
    attention, mlp = ("attn.c_proj.", "mlp.c_proj.") if family == "gpt2" else ("self_attn.o_proj.", "mlp.down_proj.")
    prefixes = [block + part for part in {"blocks": (attention, mlp), "attention": (attention,), "ffn": (mlp,)}[mode]]
    zeroed = program.clone()
    for ep in zeroed.graphs.values():
        for name, weight in ep.state_dict.items():
            if name.startswith(tuple(prefixes)):
                ep.state_dict[name] = torch.nn.Parameter(torch.zeros_like(weight), requires_grad=False)
    return zeroed


@given(config=decoder_configs(), mode=st.sampled_from((*MODES, "schedule")), data=st.data())
@settings(max_examples=5, deadline=None)
def test_skipping_nothing_is_bit_identical(config, mode, data):
    program = capture(tiny_decoder(**config), max_len=24)
    run = _run(program, f"layer-skip{{mode={mode}, layers=[]}}")
    assert not run.records[0].changed and run.program.cache == program.cache
    assert run.program.node_count() == program.node_count() and run.program.roles == program.roles
    vocab = program.info.vocab_size
    prompts = [data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=5)) for _ in range(2)]
    assert torch.equal(trace(run.program, prompts, 5), trace(program, prompts, 5))


@given(family=st.sampled_from(DECODER_FAMILIES), layers=st.integers(2, 3), mode=st.sampled_from(MODES),
       seed=st.integers(0, 2**16), data=st.data())
@settings(max_examples=6, deadline=None)
def test_skipping_equals_zeroing_the_residual_branches(family, layers, mode, seed, data):
    layer = data.draw(st.integers(0, layers - 1))
    program = capture(tiny_decoder(family, layers=layers, group=1 if family == "gpt2" else 2, seed=seed), max_len=24)
    skipped = _run(program, f"layer-skip{{mode={mode}, layers=[{layer}]}}").program
    reference = _zeroed(program, family, layer, mode)
    prompts = [data.draw(st.lists(st.integers(0, 63), min_size=1, max_size=6)) for _ in range(2)]
    assert torch.equal(trace(skipped, prompts, 6), trace(reference, prompts, 6))
    kept = {t.layer for t in skipped.cache.tensors}
    assert kept == (set(range(layers)) - {layer} if mode != "ffn" else set(range(layers)))


def test_cache_layout_stays_consistent_through_steps_save_load_and_later_passes(tmp_path):
    program = capture(tiny_decoder("qwen2", layers=4, seed=1), max_len=32)
    run = _run(program, "layer-skip{layers=[1, 2]}")
    skipped = run.program
    assert [t.name for t in skipped.cache.tensors] == ["k0", "v0", "k3", "v3"]
    assert {r.layers for r in skipped.roles.values()} == {(0, 3)} and skipped.layers() == [0, 3]
    assert run.records[0].cache_bytes_delta == -program.cache.nbytes(1) // 2
    save_program(skipped, tmp_path / "s")
    loaded = load_program(tmp_path / "s")
    prompts = [list(range(9)), list(range(4, 8))]
    assert torch.equal(trace(loaded, prompts, 10), trace(skipped, prompts, 10))
    eager = get_target("eager")
    assert Generator(eager.compile(loaded)).generate(prompts, 8).tokens == \
        Generator(eager.compile(skipped)).generate(prompts, 8).tokens
    quantized = _run(skipped, "kv-quant{group=4, residual=4}").program  # selects the layers left
    assert {t.layer for t in quantized.cache.tensors} == {0, 3}
    with pytest.raises(PipelineError, match=r"layers \[1\] were removed by an earlier pass"):
        _run(skipped, "kv-quant{layers=[1]}")
    dropped = _run(skipped, "layer-skip{mode=attention, layers=[3]}").program
    assert [t.name for t in dropped.cache.tensors] == ["k0", "v0"] and dropped.layers() == [0, 3]
    assert torch.isfinite(trace(dropped, prompts, 4)).all()


@functools.cache
def _composition_program():
    return capture(tiny_decoder("llama", layers=3, head_dim=8, seed=4), max_len=40)


@pytest.mark.parametrize("mode", ["blocks", "attention", "ffn", "schedule"])
def test_every_mode_composes_with_lean_attention_and_kv_quant_in_either_order(mode):
    program = _composition_program()
    skip = f"layer-skip{{mode={mode}, layers=[1]{', budgets={6: 2}' if mode == 'schedule' else ''}}}"
    prompts = [list(range(3, 10)), list(range(20, 27))]
    alone = trace(_run(program, skip).program, prompts, 10)
    for other, atol in (("lean-attention{graphs=[prefill, decode]}", 1e-5), ("kv-quant{group=4, residual=4}", 0.5)):
        first = trace(_run(program, f"{skip},{other}").program, prompts, 10)
        second = trace(_run(program, f"{other},{skip}").program, prompts, 10)
        torch.testing.assert_close(first, second, atol=1e-5, rtol=1e-5)  # the order does not matter
        torch.testing.assert_close(first, alone, atol=atol, rtol=0)


@functools.cache
def _schedule_base():
    return capture(tiny_decoder("llama", layers=4, seed=2), max_len=32)


@given(budgets=st.lists(st.integers(1, 4), min_size=1, max_size=3), data=st.data())
@settings(max_examples=4, deadline=None)
def test_schedules_are_monotone_and_every_layer_a_token_runs_has_kv_for_earlier_positions(budgets, data):
    budgets = sorted(budgets, reverse=True)
    positions = sorted(data.draw(st.lists(st.integers(6, 20), min_size=len(budgets), max_size=len(budgets),
                                          unique=True)))
    spec = ", ".join(f"{p}: {b}" for p, b in zip(positions, budgets))
    rank = data.draw(st.sampled_from(["first", "last", "random"]))
    program = _run(_schedule_base(), f"layer-skip{{mode=schedule, rank={rank}, budgets={{{spec}}}}},lean-attention"
                   ).program
    schedule = program.schedule(1)
    layers = [set(program.roles[g].layers or range(4)) for g in schedule]
    assert all(later <= earlier for earlier, later in zip(layers, layers[1:]))  # monotone
    assert 0 in layers[-1]  # layer 0 is protected
    gen = Generator(get_target("eager").compile(program))
    prompt_len = 5
    _, pool, _ = gen.prefill([list(range(1, 1 + prompt_len))] * 3)
    for t in pool.tensors:
        t[:, :, prompt_len:] = float("nan")  # unwritten slots poison any attention that reads them
    stages = []
    for step in range(32 - prompt_len):
        logits = gen.decode(pool, torch.tensor([step % 7] * 3))
        assert torch.isfinite(logits).all(), f"step {step} read KV a skipped layer never wrote"
        assert len(set(pool.stages.tolist())) == 1  # batch-uniform
        stages.append(int(pool.stages[0]))
    assert stages == sorted(stages)
    starts = [0, *(program.roles[g].from_position for g in schedule[1:])]
    for t in program.cache.tensors:
        for position in range(prompt_len, 32):
            stage = max(i for i, s in enumerate(starts) if s <= position)
            assert torch.isnan(pool.tensors[program.cache.tensors.index(t)][:, :, position]).all() == \
                (t.layer not in layers[stage]), (t.name, position)


def test_a_row_never_goes_back_to_more_layers_when_batched_with_longer_rows():
    program = _run(capture(tiny_decoder("llama", layers=3, seed=5), max_len=32),
                   "layer-skip{mode=schedule, rank=first, budgets={8: 2}}").program
    gen = Generator(get_target("eager").compile(program))
    _, pool, _ = gen.prefill([list(range(10)), [1, 2, 3]])
    gen.decode(pool, torch.tensor([4, 5]))  # the long row is past position 8: both rows run 2 layers
    assert pool.stages.tolist() == [1, 1]
    pool.release(0)
    gen.decode(pool, torch.tensor([6]))  # the short row alone, at position 4, stays on 2 layers
    assert pool.stages.tolist()[:1] == [1] and int(pool.lengths[0]) == 5
    with pytest.raises(InferpassError, match="skipped layers in scheduled decode steps"):
        StepRunner(gen.executable, pool).prefill(0, torch.tensor([[1, 2]]))


def test_a_schedule_survives_save_load_and_serves_an_engine_with_requests_joining_mid_flight(tmp_path):
    program = _run(capture(tiny_decoder("llama", layers=3, seed=8), max_len=40),
                   "layer-skip{mode=schedule, rank=last, budgets={6: 2, 12: 1}}").program
    save_program(program, tmp_path / "s")
    loaded = load_program(tmp_path / "s")
    assert loaded.schedule(1) == program.schedule(1) and loaded.roles == program.roles
    prompts = [list(range(1, 9)), [3, 4]]
    assert torch.equal(trace(loaded, prompts, 12), trace(program, prompts, 12))
    engine = Engine(get_target("eager").compile(loaded), rows=3, prefill_chunk=4)
    requests = [engine.submit(prompt, {"max_new_tokens": 10}) for prompt in ([5] * 9, [7, 8], list(range(20)))]
    engine.step()
    requests.append(engine.submit([1, 2, 3], {"max_new_tokens": 6}))  # joins while the others decode
    reached = {}
    for _ in engine.stream():
        for row, owner in enumerate(engine.pool.owners[:engine.pool.used]):
            stage = int(engine.pool.stages[row])
            assert stage >= reached.get(id(owner), 0)  # a request never goes back to more layers
            reached[id(owner)] = stage
    assert max(reached.values()) == 2 and engine.pool.used == 0 and [len(r.tokens) for r in requests] == [10, 10, 10, 6]


def test_the_report_scores_a_schedule_one_token_per_step():
    program = capture(tiny_decoder("llama", layers=3, vocab=256, seed=9), max_len=32)
    scheduled = _run(program, "layer-skip{mode=schedule, rank=last, budgets={4: 1}}").program
    base, ours = get_target("eager").compile(program), get_target("eager").compile(scheduled)
    text = bytes(range(32, 127)) * 4
    report = compare_decoders(base, ours, prompts=[[1, 2, 3]] * 2, new_tokens=4, text=text, context=32,
                              budget_s=0.5)
    row = report.rows[0]
    assert row.metric == "held-out bits/byte (one token per step, first 257 bytes)"
    assert row.optimized == pytest.approx(program_bits_per_byte(ours, text[:257], context=32, chunk=1, batch=8))
    assert row.optimized != pytest.approx(program_bits_per_byte(ours, text[:257], context=32))  # prefill: no skip


def test_ranking_protection_calibration_cache_and_explain_table(monkeypatch, tmp_path):
    monkeypatch.setenv("INFERPASS_CACHE", str(tmp_path))
    program = capture(tiny_decoder("llama", layers=4, vocab=256, seed=6), max_len=64)
    assert _run(program, "layer-skip{rank=last, k=2}").records[0].stats["skipped"] == [2, 3]
    randoms = {tuple(_run(program, f"layer-skip{{rank=random, k=2, seed={s}}}").records[0].stats["skipped"])
               for s in range(6)}
    assert len(randoms) > 1 and all(0 not in r for r in randoms)  # seeded, and layer 0 is protected
    assert _run(program, "layer-skip{layers=[0]}").records[0].stats["skipped"] == [0]  # unless named
    measured = []
    real = influence_module._measure
    monkeypatch.setattr(influence_module, "_measure", lambda *a: measured.append(1) or real(*a))
    run = _run(program, "layer-skip{k=1, calibration_tokens=96, window=48, decode_steps=4}")
    table = run.records[0].tables["block influence"]
    assert [row["block"] for row in table] == [0, 1, 2, 3] and len(measured) == 1
    least = min((row for row in table if row["block"] != 0), key=lambda row: row["prefill block"])
    assert run.records[0].stats["skipped"] == [least["block"]]
    influence_module._MEMO.clear()  # a new process: read back from the cache directory
    _run(program, "layer-skip{k=1, calibration_tokens=96, window=48, decode_steps=4}")
    assert len(measured) == 1 and list((tmp_path / "calibration").glob("*.json"))
    text = tmp_path / "calibration.txt"
    text.write_text("To be, or not to be, that is the question. " * 4)
    on_text = f"layer-skip{{k=1, calibration={text}, calibration_tokens=96, window=48, decode_steps=4}}"
    _run(program, on_text)
    changed = _run(program, "layer-skip{layers=[3]}").program
    _run(changed, on_text)  # the same calibration tokens
    assert len(measured) == 3  # a changed program is measured again
    ablation = _run(program, "layer-skip{rank=ablation, k=2, calibration_tokens=96, window=48, decode_steps=4}")
    tokens = influence_module.calibration_tokens(program, None, 96, 48)
    singles = {i: influence_module.calibration_bits(_run(program, f"layer-skip{{layers=[{i}]}}").program, tokens)
               for i in (1, 2, 3)}
    steps = ablation.records[0].tables["ablation"]
    assert steps[0]["skip"] == min(singles, key=singles.get)  # the cheapest single removal first
    assert steps[0]["calibration bits/token"] == pytest.approx(singles[steps[0]["skip"]])
    assert ablation.records[0].stats["skipped"] == sorted(row["skip"] for row in steps)
    by_text = _run(program, f"layer-skip{{mode=ffn, k=1, calibration={text}, calibration_tokens=96, window=48}}")
    assert by_text.records[0].stats["skipped"][0] in (1, 2, 3)


@pytest.mark.parametrize("spec, message", [
    ("layer-skip{mode=schedule}", "mode schedule needs budgets"),
    ("layer-skip{mode=schedule, budgets={4: 1, 8: 2}}", "must not grow with position"),
    ("layer-skip{layers=[7]}", r"layers \[7\] out of range"),
    ("layer-skip{fraction=1.5}", "fraction"),
    ("layer-skip{calibration=/no/such/file.txt}", "/no/such/file.txt does not exist"),
])
def test_bad_configs_name_what_is_wrong(spec, message):
    program = capture(tiny_decoder("llama", layers=2, vocab=256), max_len=16)
    with pytest.raises(PipelineError, match=message):
        _run(program, spec)


def test_every_mode_and_a_schedule_run_on_the_cpu_target():
    program = capture(tiny_decoder("llama", layers=4, head_dim=8, seed=7), max_len=32)
    skipped = program
    for spec in ("mode=attention, layers=[3]", "mode=ffn, layers=[2]", "layers=[1]",
                 "mode=schedule, rank=first, budgets={8: 1}"):
        skipped = _run(skipped, f"layer-skip{{{spec}}}").program
    assert len(skipped.schedule(1)) == 2 and skipped.layers() == [0, 2, 3]
    prompts = [list(range(2, 7)), list(range(10, 15))]
    torch.testing.assert_close(trace(get_target("cpu").compile(skipped), prompts, 8), trace(skipped, prompts, 8),
                               atol=1e-4, rtol=1e-4)
