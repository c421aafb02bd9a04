"""early-exit: self-speculative decoding is lossless (greedy tokens, sampled distribution), caches roll back
exactly, the identity settings give the base model, the policy and the pass's errors."""

import random

import pytest
import torch
from hypothesis import given, settings, strategies as st

from factories import decoder_configs, tiny_decoder
from inferpass.capture import capture
from inferpass.errors import InferpassError, PipelineError
from inferpass.ir.program import DraftSpec
from inferpass.ir.serialize import load_program, save_program
from inferpass.ir.verify import verify_program
from inferpass.passes import PassManager, Pipeline
from inferpass.runtime.engine import Engine
from inferpass.runtime.sampling import SamplingParams
from inferpass.runtime.speculation import Draft, SpeculationPolicy, accept
from inferpass.targets import get_target


def _program(base, spec: str):
    return PassManager(Pipeline.parse(spec)).run(base.clone()).program


_EXECUTABLES = {}


def _eager(program):
    """One eager executable per program object (shared by the tests that run it)."""
    key = id(program)
    if key not in _EXECUTABLES:
        _EXECUTABLES[key] = (program, get_target("eager").compile(program))
    return _EXECUTABLES[key][1]


def _generate(program, prompts, params, speculation, rows=8):
    engine = Engine(_eager(program), rows=rows, speculation=speculation)
    requests = [engine.submit(p, params) for p in prompts]
    lengths_ok = []
    while not engine.idle:
        engine.step()
        # every decoding row's cache holds its context but the last generated token, in every layer
        lengths_ok += [int(engine.pool.lengths[i]) == len(r.prompt) + len(r.tokens) - 1
                       for i, r in enumerate(engine.pool.owners[:engine.pool.decoding])]
    assert engine.pool.used == 0 and all(lengths_ok)
    return [r.tokens for r in requests], engine.stats


@pytest.fixture(scope="module")
def lm(lm_program):
    """The default LM with a draft of 2 layers, 4 tokens per verify step, no confidence stop."""
    return lm_program, _program(lm_program, "early-exit{exit_layer=2,draft_len=4,confidence=0}")


def _prompts(text: bytes, count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(text) - 200) for _ in range(count)]
    return [list(text[s:s + rng.randint(1, 120)]) for s in starts]


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_greedy_self_speculation_is_plain_greedy_decoding_on_the_default_lm(lm, heldout, batch):
    _, program = lm
    prompts = _prompts(heldout, batch + 2, seed=batch)  # more requests than rows: some join mid-flight
    plain, _ = _generate(program, prompts, {"max_new_tokens": 40}, "never", rows=batch)
    speculative, stats = _generate(program, prompts, {"max_new_tokens": 40}, "always", rows=batch)
    assert speculative == plain
    assert 0 < stats["accepted"] <= stats["drafted"] and stats["verify_steps"] > 0
    assert stats["accepted"] / stats["verified_rows"] > 0.5  # the LayerSkip-trained early layers predict


@given(config=decoder_configs(), data=st.data())
@settings(max_examples=4, deadline=None)
def test_greedy_self_speculation_equals_plain_decoding_on_random_models(config, data):
    base = capture(tiny_decoder(**config), max_len=48)
    layers = base.info.num_layers
    exit_layer, draft_len = data.draw(st.integers(1, layers)), data.draw(st.integers(1, 5))
    program = _program(base, f"early-exit{{exit_layer={exit_layer},draft_len={draft_len},confidence=0}}")
    verify_program(program)
    vocab = base.info.vocab_size
    prompts = [data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=12)) for _ in range(3)]
    new = data.draw(st.integers(1, 20))
    plain, _ = _generate(program, prompts, {"max_new_tokens": new}, "never", rows=2)
    speculative, stats = _generate(program, prompts, {"max_new_tokens": new}, "always", rows=2)
    assert speculative == plain and all(len(t) == new for t in plain)
    assert stats["accepted"] <= stats["drafted"]
    if exit_layer == layers:  # the draft is the whole model: every draft is accepted
        assert stats["accepted"] == stats["drafted"]


def test_exit_layer_l_and_unreachable_thresholds_are_the_base_model(lm, heldout):
    base, _ = lm
    prompts = _prompts(heldout, 3, seed=7)
    reference, _ = _generate(_program(base, "dce"), prompts, {"max_new_tokens": 24}, "never")
    full = _program(base, "early-exit{exit_layer=8,draft_len=3,confidence=0}")
    tokens, stats = _generate(full, prompts, {"max_new_tokens": 24}, "always")
    assert tokens == reference and stats["accepted"] == stats["drafted"] > 0
    for spec in ("early-exit{exit_layer=2,draft_len=3,confidence=1.0}",  # no draft is ever that confident
                 "early-exit{exit_layer=2,draft_len=3,confidence=0,exit_margin=1.01}"):  # lossy exit never taken
        tokens, stats = _generate(_program(base, spec), prompts, {"max_new_tokens": 24}, "always")
        assert tokens == reference and stats["drafted"] == 0


def test_confidence_exit_keeps_confident_drafts_unverified(lm, heldout):
    base, _ = lm
    prompts = _prompts(heldout, 3, seed=11)
    lossy = _program(base, "early-exit{exit_layer=2,draft_len=4,confidence=0,exit_margin=0.3}")
    tokens, stats = _generate(lossy, prompts, {"max_new_tokens": 32}, "always")
    assert stats["accepted"] == stats["drafted"] > 0 and all(len(t) == 32 for t in tokens)


def test_the_sampled_distribution_is_the_base_models():
    """Rejection sampling on random p, q over a small vocabulary: the empirical distribution of the first
    emitted token approaches p (its distance shrinking as samples grow), never q."""
    gen = torch.Generator().manual_seed(0)
    vocab = 6
    target_logits, draft_logits = torch.randn(2, vocab, generator=gen) * 2, torch.randn(vocab, generator=gen) * 2
    params = SamplingParams(temperature=1.0)
    p, q = torch.softmax(target_logits[0], -1), torch.softmax(draft_logits, -1)
    spec = DraftSpec(length=1)
    counts, distances = torch.zeros(vocab), []
    for n in range(1, 20001):
        token = int(torch.multinomial(q, 1, generator=gen))
        emitted = accept(Draft(tokens=[token], probs=[q]), target_logits, spec, params, gen)
        counts[emitted[0]] += 1
        if n in (500, 20000):
            distances.append(float((counts / n - p).abs().sum() / 2))
    assert distances[1] < distances[0] and distances[1] < 0.02
    assert float((counts / counts.sum() - q).abs().sum() / 2) > 5 * distances[1]


def test_sampled_self_speculation_matches_the_base_distribution_through_the_engine(lm):
    """The first two sampled tokens (top-k 3) of many seeded speculative requests: close to the base model's
    exact joint distribution (the unit test above shows the distance shrinking with samples)."""
    base, program = lm
    prompt = list(b"ROMEO:\nWhat light through yonder window")
    params = {"max_new_tokens": 2, "temperature": 1.0, "top_k": 3}
    runner = get_target("eager").compile(base)
    with torch.no_grad():
        caches = base.cache.allocate(1)
        logits, *caches = runner.run(base.graph_for(), torch.tensor([prompt]), torch.tensor([0]), *caches)
    first = torch.softmax(torch.topk(logits[0, -1], 3).values, -1)
    firsts = torch.topk(logits[0, -1], 3).indices.tolist()
    exact = {}
    for a, pa in zip(firsts, first.tolist()):
        with torch.no_grad():
            out = runner.run(base.graph_for(1), torch.tensor([[a]]), torch.tensor([len(prompt)]),
                             *[c.clone() for c in caches])[0][0, -1]
        values, indices = torch.topk(out, 3)
        for b, pb in zip(indices.tolist(), torch.softmax(values, -1).tolist()):
            exact[a, b] = pa * pb
    samples = 1000
    engine = Engine(_eager(program), rows=64, speculation="always")
    requests = [engine.submit(prompt, {**params, "seed": seed}) for seed in range(samples)]
    engine.generate([])
    seen = {}
    for r in requests:
        seen[tuple(r.tokens)] = seen.get(tuple(r.tokens), 0) + 1
    distance = sum(abs(seen.get(k, 0) / samples - v) for k, v in exact.items()) / 2
    distance += sum(v / samples for k, v in seen.items() if k not in exact) / 2
    assert distance < 0.07 and engine.stats["verify_steps"] > 0


def test_the_policy_turns_drafting_off_where_it_is_slower_and_measures_again_ever_less_often():
    policy = SpeculationPolicy("auto")
    costs = {(1, True): 0.5, (1, False): 1.0, (64, True): 2.0, (64, False): 1.0}  # seconds per token
    chosen = {1: [], 64: []}
    for _ in range(300):
        for bucket in (1, 64):
            drafted = policy.drafts(bucket)
            chosen[bucket].append(drafted)
            policy.record(bucket, drafted, costs[bucket, drafted], 1)
    assert sum(chosen[1][10:]) / len(chosen[1][10:]) > 0.95  # drafting pays at batch 1
    assert sum(chosen[64][10:]) / len(chosen[64][10:]) < 0.05  # and not at batch 64, re-measured rarely
    assert sum(chosen[64][150:]) <= 2
    assert not SpeculationPolicy("never").drafts(1) and SpeculationPolicy("always").drafts(64)


def test_auto_calibration_picks_a_setting_and_the_program_survives_save_load(lm_program, heldout, tmp_path):
    from inferpass.defaults import HELDOUT_TEXT

    run = PassManager(Pipeline.parse(f"early-exit{{calibration={HELDOUT_TEXT},calibration_tokens=512,"
                                     "max_draft_len=4}")).run(lm_program.clone())
    stats, table = run.records[0].stats, run.records[0].tables["calibration"]
    assert 1 <= stats["exit_layer"] < 8 and 1 <= stats["draft_len"] <= 4 and len(table) == 7
    assert all(0 < row["greedy agreement"] <= 1 for row in table)
    save_program(run.program, tmp_path / "ee")
    loaded = load_program(tmp_path / "ee")
    assert loaded.roles == run.program.roles and loaded.draft_graph() == "draft"
    prompts = _prompts(heldout, 2, seed=3)
    plain, _ = _generate(loaded, prompts, {"max_new_tokens": 16}, "never")
    assert _generate(loaded, prompts, {"max_new_tokens": 16}, "always")[0] == plain


@pytest.mark.parametrize("spec, message", [
    ("kv-quant{bits=4},early-exit{exit_layer=2,draft_len=2}", "cannot be rolled back"),
    ("early-exit{exit_layer=9,draft_len=2}", "beyond the model's 8 layers"),
    ("early-exit{exit_layer=2,draft_len=2},early-exit{exit_layer=3,draft_len=2}", "conflicting configs"),
    ("layer-skip{mode=schedule,budgets={8: 6}},early-exit{exit_layer=2,draft_len=2}", "SkipDecode schedule"),
    ("early-exit{exit_layer=2,draft_len=2,confidence=2}", "confidence"),
])
def test_bad_setups_name_what_is_wrong(lm_program, spec, message):
    with pytest.raises(PipelineError, match=message):
        PassManager(Pipeline.parse(spec)).run(lm_program.clone())


def test_bad_engine_setups_name_what_is_wrong(lm):
    _, program = lm
    with pytest.raises(InferpassError, match="speculation"):
        Engine(_eager(program), speculation="sometimes")
    quantized = _program(program, "kv-quant{bits=4}")
    with pytest.raises(InferpassError, match="rolled back"):
        Engine(get_target("eager").compile(quantized))
