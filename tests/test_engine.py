"""The engine: a request's output does not depend on what else runs (alone, batched, joining mid-flight), on
eager and cpu; seeded sampling likewise; every finished, cancelled or failed request returns its cache row;
bad requests are named and do not stop the others; a stress run of mixed requests loses nothing."""

import io
import random

import pytest
import torch
from hypothesis import given, settings, strategies as st

from factories import decoder_configs, tiny_decoder
from inferpass.capture import capture
from inferpass.cli import main
from inferpass.defaults import DEFAULT_PIPELINES
from inferpass.errors import InferpassError
from inferpass.ir.serialize import save_program
from inferpass.passes import PassManager, Pipeline
from inferpass.runtime.engine import Engine
from inferpass.runtime.generator import Generator
from inferpass.runtime.sampling import SamplingParams, sample
from inferpass.targets import get_target
from inferpass.targets.iree_cpu import CpuTarget

MAX_LEN = 48


@pytest.fixture(scope="module")
def small():
    """A two-layer GQA Llama (vocab 64, cache of 48 slots) on the eager target."""
    return get_target("eager").compile(capture(tiny_decoder("llama", layers=2), max_len=MAX_LEN))


def _alone(executable, prompt, params):
    return Engine(executable, rows=1).generate([prompt], params)[0].tokens


def _staggered(executable, prompts, params, rows, chunk, join_every=2, step_tokens=1024):
    """Submit the prompts one at a time, ``join_every`` steps apart, so requests join a running batch."""
    engine = Engine(executable, rows=rows, prefill_chunk=chunk, step_tokens=step_tokens)
    requests = []
    for prompt in prompts:
        requests.append(engine.submit(prompt, params))
        for _ in range(join_every):
            engine.step()
    for _ in engine.stream():
        pass
    assert engine.pool.used == 0 and all(r.state == "finished" for r in requests)
    return [r.tokens for r in requests]


@settings(max_examples=5)
@given(config=decoder_configs(), pipeline=st.sampled_from(["", DEFAULT_PIPELINES["decoder"]]), data=st.data())
def test_greedy_output_is_the_same_alone_batched_and_joining_mid_flight(config, pipeline, data):
    program = PassManager(Pipeline.parse(pipeline)).run(capture(tiny_decoder(**config), max_len=MAX_LEN)).program
    executable = get_target("eager").compile(program)
    vocab = program.info.vocab_size
    prompts = data.draw(st.lists(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=20), min_size=1,
                                 max_size=5))
    params = {"max_new_tokens": data.draw(st.integers(1, 12))}
    alone = [_alone(executable, p, params) for p in prompts]
    assert alone == Generator(executable).generate(prompts, params["max_new_tokens"]).tokens
    rows, chunk = data.draw(st.integers(1, 4)), data.draw(st.sampled_from([3, 8, 64]))
    step_tokens = data.draw(st.sampled_from([1, 10, 1024]))
    engine = Engine(executable, rows=rows, prefill_chunk=chunk, step_tokens=step_tokens)
    assert [r.tokens for r in engine.generate(prompts, params)] == alone
    assert _staggered(executable, prompts, params, rows, chunk, step_tokens=step_tokens) == alone


def test_cpu_target_gives_the_eager_engine_output(small, tmp_path):
    prompts = [[5, 9, 2], list(range(20)), [7] * 11]
    params = {"max_new_tokens": 6}
    want = [_alone(small, p, params) for p in prompts]
    executable = CpuTarget(cache_dir=tmp_path).compile(small.program)
    assert _staggered(executable, prompts, params, rows=2, chunk=16) == want
    caches = [c.normal_() for c in small.program.cache.allocate(2)]
    ids, start = torch.tensor([[3], [7]]), torch.tensor([5, 9])
    want_logits, *want_caches = small.run("decode", ids, start, *caches)
    logits, *written = executable.run("decode", ids, start, *caches)  # a shape the engine compiled
    assert all(w is c for w, c in zip(written, caches))  # IREE wrote the caller's caches in place
    torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(written, want_caches, atol=1e-4, rtol=1e-4)


def test_quantized_caches_are_never_padded_and_give_the_same_output_batched(small):
    quantized = PassManager(Pipeline.parse("kv-quant{bits=4, group=8, residual=8}")).run(small.program).program
    executable = get_target("eager").compile(quantized)
    prompts = [list(range(3, 30)), [1, 2], list(range(10, 40))]
    params = {"max_new_tokens": 10}
    want = [_alone(executable, p, params) for p in prompts]
    assert _staggered(executable, prompts, params, rows=3, chunk=8, join_every=1) == want
    engine = Engine(executable, rows=2)
    request = engine.submit([1, 2, 3], params)
    engine.step()
    with pytest.raises(InferpassError, match="cannot be rolled back"):
        engine.pool.truncate(request, 1)


def test_seeded_sampling_is_the_same_alone_and_batched(small):
    params = {"max_new_tokens": 12, "temperature": 0.9, "top_k": 20, "top_p": 0.9, "seed": 1234}
    prompts = [[1, 2, 3], [4] * 9, list(range(17))]
    alone = [_alone(small, p, params) for p in prompts]
    assert _staggered(small, prompts, params, rows=3, chunk=4) == alone
    other_seed = Engine(small, rows=3).generate(prompts, {**params, "seed": 99})
    assert [r.tokens for r in other_seed] != alone


@pytest.mark.parametrize("params, prompt, message", [
    ({}, [], "prompt: a request needs a non-empty list of token ids"),
    ({}, list(range(3)) * 20, r"prompt: 60 tokens \+ max_new_tokens 16 need 75 cache positions; .* max_len is 48"),
    ({"max_new_tokens": 0}, [1], "max_new_tokens: Input should be greater than or equal to 1"),
    ({"temperature": -1}, [1], "temperature: Input should be greater than or equal to 0"),
    ({"top_p": 0}, [1], "top_p: Input should be greater than 0"),
    ({"top_p": 1.5}, [1], "top_p: Input should be less than or equal to 1"),
    ({}, [1, 64], r"prompt position 1: token id 64 is outside the vocabulary \[0, 64\)"),
    ({}, [1, 2.5], "prompt position 1: token id 2.5 is a float, not an integer"),
    ({"stop_token_ids": [99]}, [1], r"stop_token_ids: token id 99 is outside the vocabulary"),
    ({"stop": ["x"]}, [1], "stop strings need a byte-level model"),
])
def test_bad_requests_are_named_and_the_others_continue(small, params, prompt, message):
    engine = Engine(small, rows=2)
    with pytest.raises(InferpassError, match=message):
        engine.submit(prompt, params)
    assert engine.idle
    good, bad = engine.generate([[1, 2, 3], prompt], params)
    assert bad.state == "failed" and message.split(":")[0] in bad.error and engine.pool.used == 0
    if not message.startswith(("max_new_tokens", "temperature", "top_p", "stop")):  # shared params: both fail
        assert good.state == "finished" and len(good.tokens) == 16


def test_cancelled_and_failed_requests_return_their_rows(small, monkeypatch):
    engine = Engine(small, rows=2, prefill_chunk=4, step_tokens=4)  # at most one 4-token chunk a step
    running, prefilling, waiting = (engine.submit(p, {"max_new_tokens": 20}) for p in ([1, 2], [3] * 20, [4]))
    for _ in range(3):
        engine.step()
    assert (running.state, prefilling.state, waiting.state) == ("decode", "prefill", "waiting")
    for request in (running, prefilling, waiting):
        engine.cancel(request)
        assert request.state == "cancelled"
    assert engine.idle and engine.pool.free == 2
    request = engine.submit([1, 2, 3], {"max_new_tokens": 5})
    engine.step()

    def broken(*args):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.runner.executable, "step", broken)
    engine.step()
    assert request.state == "failed" and "device lost" in request.error and engine.pool.used == 0


def test_a_higher_priority_request_preempts_by_recompute_and_nothing_changes(small):
    params = [{"max_new_tokens": 30}, {"max_new_tokens": 30, "temperature": 0.9, "seed": 3}]
    prompts = [[1, 2, 3, 4], [5, 6]]
    want = [_alone(small, p, q) for p, q in zip(prompts, params)]
    urgent_want = _alone(small, [7, 8, 9], {"max_new_tokens": 5})
    engine = Engine(small, rows=2, prefill_chunk=3)
    low = [engine.submit(p, q) for p, q in zip(prompts, params)]
    for _ in range(6):
        engine.step()
    assert [r.state for r in low] == ["decode", "decode"]
    urgent = engine.submit([7, 8, 9], {"max_new_tokens": 5}, priority=1)
    engine.step()
    assert (urgent.state, low[1].state, low[1].preemptions, low[0].preemptions) == ("decode", "waiting", 1, 0)
    assert list(engine.scheduler.waiting) == [low[1]]
    for _ in engine.stream():
        pass
    assert [r.tokens for r in low] == want and urgent.tokens == urgent_want  # greedy and seeded alike
    assert all(r.state == "finished" for r in [*low, urgent]) and engine.pool.used == 0
    equal = [engine.submit([1], {"max_new_tokens": 3}, priority=p) for p in (0, 0)]
    engine.step()
    assert [r.preemptions for r in equal] == [0, 0]  # equals never preempt each other
    with pytest.raises(InferpassError, match="priority"):
        engine.submit([1], priority="high")


def test_stop_tokens_strings_and_streaming():
    program = capture(tiny_decoder("llama", layers=1, vocab=256), max_len=MAX_LEN)
    engine = Engine(get_target("eager").compile(program), rows=2)
    free = engine.generate([[10, 20, 30]], {"max_new_tokens": 8})[0].tokens
    stopped = engine.generate([[10, 20, 30]], {"max_new_tokens": 8, "stop_token_ids": [free[2]]})[0]
    assert stopped.tokens == free[:free.index(free[2]) + 1] and stopped.finish_reason == "stop"
    text = bytes(free[:2]).decode("latin-1")
    if text.encode("utf-8") == bytes(free[:2]):  # a stop string only where the bytes are valid UTF-8
        by_text = engine.generate([[10, 20, 30]], {"max_new_tokens": 8, "stop": [text]})[0]
        assert by_text.tokens == free[:2] and by_text.finish_reason == "stop"
    seen = []
    engine.submit([10, 20, 30], {"max_new_tokens": 8}, on_token=lambda r, t: seen.append(t))
    streamed = [t for _, t in engine.stream()]
    assert streamed == seen == free


def test_opens_saved_folders_and_model_directories(small, tmp_path):
    tiny_decoder("llama", layers=2).save_pretrained(tmp_path / "hf")
    save_program(small.program, tmp_path / "saved")
    want = _alone(small, [1, 2, 3], {"max_new_tokens": 5})
    for path, options in ((tmp_path / "saved", {}), (tmp_path / "hf", {"max_len": MAX_LEN})):
        assert Engine.open(path, rows=2, **options).generate([[1, 2, 3]], {"max_new_tokens": 5})[0].tokens == want
    with pytest.raises(InferpassError, match="max_len applies to a model directory"):
        Engine.open(tmp_path / "saved", max_len=8)


def test_stress_mixed_requests_lose_nothing(small):
    rng = random.Random(0)
    engine = Engine(small, rows=6, prefill_chunk=8)
    requests, cancel_after = [], {}
    for i in range(220):
        prompt = [rng.randrange(64) for _ in range(rng.randint(1, 30))]
        params = {"max_new_tokens": rng.randint(1, MAX_LEN - len(prompt) + 1), "temperature": rng.choice([0, 0.7]),
                  "seed": i}
        request = engine.submit(prompt, params, priority=int(rng.random() < 0.1))  # some preempt others
        requests.append(request)
        if rng.random() < 0.15:
            cancel_after[request.id] = rng.randint(0, 5)
        if rng.random() < 0.5:
            for _ in range(rng.randint(1, 3)):
                engine.step()
        for r in requests:
            if r.id in cancel_after and len(r.tokens) >= cancel_after[r.id]:
                engine.cancel(r)
    for _ in engine.stream():
        pass
    assert engine.pool.used == 0 and engine.pool.decoding == 0
    for r in requests:
        if r.id in cancel_after and r.state == "cancelled":
            continue
        assert r.state == "finished" and len(r.tokens) == r.params.max_new_tokens, (r.state, r.error)
    assert sum(r.state == "finished" for r in requests) >= 150 and sum(r.preemptions > 0 for r in requests) >= 5
    finished = [r for r in requests if r.state == "finished"]
    sample = finished[::25] + [r for r in finished if r.preemptions][:4]  # preempted ones resume unchanged
    assert [r.tokens for r in sample] == [_alone(small, r.prompt, r.params) for r in sample]
    assert torch.equal(engine.pool.lengths, torch.zeros(6, dtype=torch.long))


def test_generate_command_streams_text_and_summarises(tmp_path, capsys, monkeypatch):
    tiny_decoder("llama", layers=1, vocab=256).save_pretrained(tmp_path / "byte-lm")
    args = ["generate", str(tmp_path / "byte-lm"), "--max-len", "32", "--max-new-tokens", "5"]
    assert main([*args, "--prompt", "hi"]) == 0
    out, err = capsys.readouterr()
    want = Engine.open(tmp_path / "byte-lm", max_len=32).generate([list(b"hi")], {"max_new_tokens": 5})[0].tokens
    assert out == "hi" + bytes(want).decode("utf-8", "replace") + "\n"
    assert "1 requests, 5 tokens in" in err and "tokens/s; time to first token p50" in err
    monkeypatch.setattr("sys.stdin", io.StringIO("one\ntwo\n"))
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "[0] one" in out and "[1] two" in out and "2 requests, 10 tokens" in err
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(args) == 2
    assert "error: no prompts: pass --prompt TEXT or one prompt per line on stdin" in capsys.readouterr().err


def test_top_k_and_top_p_keep_only_their_candidates():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9, -1.0])
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        assert sample(logits, SamplingParams(temperature=5.0, top_k=2), gen) in (1, 3)
        assert sample(logits, SamplingParams(temperature=5.0, top_p=0.01), gen) == 1
    drawn = {sample(logits, SamplingParams(temperature=5.0), gen) for _ in range(200)}
    assert drawn == {0, 1, 2, 3, 4}  # without a filter, every token is drawn at this temperature


def test_each_step_stays_within_its_token_budget(small, monkeypatch):
    engine = Engine(small, rows=3, prefill_chunk=8, step_tokens=20)
    plans, plan = [], engine.scheduler.plan
    monkeypatch.setattr(engine.scheduler, "plan", lambda: plans.append(plan()) or plans[-1])
    prompts = [list(range(1, 31)), list(range(2, 12)), [5] * 25]
    assert [r.tokens for r in engine.generate(prompts, {"max_new_tokens": 4})] == \
        [_alone(small, p, {"max_new_tokens": 4}) for p in prompts]
    for step in plans:
        chunks = [end - start for _, start, end in step.prefills]
        assert all(0 < c <= 8 for c in chunks)
        assert len(step.decode) + sum(chunks) <= max(20, len(step.decode) + 1)  # a chunk always runs
    assert [(r.prompt[0], s, e) for r, s, e in plans[0].prefills] == [(1, 0, 8), (1, 8, 16), (1, 16, 20)]
    assert sum(e - s for step in plans for _, s, e in step.prefills) == sum(map(len, prompts))


@pytest.mark.parametrize("pipeline", ["", DEFAULT_PIPELINES["decoder"], "kv-quant{bits=4, group=8, residual=8}"])
def test_eager_steps_write_the_handed_over_caches_in_place(small, pipeline):
    program = PassManager(Pipeline.parse(pipeline)).run(small.program.clone()).program
    executable = get_target("eager").compile(program)
    caches = program.cache.allocate(2)
    ids, start = torch.tensor([[3], [7]]), torch.tensor([5, 9])
    want_logits, *want = executable.run("decode", ids, start, *caches)
    assert all(c.count_nonzero() == 0 for c in caches)  # run is functional
    logits, *written = executable.step("decode", ids, start, *caches)
    torch.testing.assert_close(logits, want_logits, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(written, want, atol=1e-6, rtol=1e-6)
    in_place = [w is c or w.data_ptr() == c.data_ptr() for w, c in zip(written, caches)]
    assert all(in_place) if "kv-quant" not in pipeline else not any(in_place)  # the quantized append stays functional


def test_generate_command_uses_the_tokenizer_saved_with_the_model(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "the", "cat", "sat", "on", "mat", "a", "dog"] + [f"w{i}" for i in range(56)]  # vocab 64
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")
    tiny_decoder("llama", layers=1).save_pretrained(tmp_path / "lm")  # vocab 64, no tokenizer yet
    args = ["generate", str(tmp_path / "lm"), "--max-len", "32", "--max-new-tokens", "4", "--prompt", "the cat sat"]
    assert main(args) == 2 and "no tokenizer was found" in capsys.readouterr().err
    fast.save_pretrained(tmp_path / "lm")
    assert main(args) == 0
    out, _ = capsys.readouterr()
    ids = fast.encode("the cat sat")
    assert ids == [1, 2, 3]
    want = Engine.open(tmp_path / "lm", max_len=32).generate([ids], {"max_new_tokens": 4})[0].tokens
    assert out == "the cat sat" + fast.decode(want, skip_special_tokens=True) + "\n"
