"""Capture -> identity pipeline -> run equals the eager model, for random configs of each supported family."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import DynamicCache

from factories import DECODER_FAMILIES, decoder_configs, tiny_bert, tiny_decoder, tiny_vit
from inferpass.capture import capture
from inferpass.ir.verify import verify_program
from inferpass.passes import PassManager, Pipeline
from inferpass.runtime.generator import Generator
from inferpass.targets import get_target

ATOL, RTOL = 5e-5, 1e-4
IDENTITY_PIPELINES = ["", "dce,cse,drop-unused-params"]


def eager_steps(model, ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Reference: HF forward with its own dynamic cache; greedy tokens fed back one at a time."""
    with torch.no_grad():
        out = model(ids, past_key_values=DynamicCache(config=model.config), use_cache=True)
        prefill, cache = out.logits, out.past_key_values
        token = prefill[:, -1].argmax(-1)
        tokens, step_logits = [token], []
        for _ in range(steps):
            out = model(token[:, None], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            step_logits.append(out.logits[:, -1])
            token = out.logits[:, -1].argmax(-1)
            tokens.append(token)
    return prefill, step_logits, torch.stack(tokens, 1)


@pytest.mark.parametrize("family", DECODER_FAMILIES)
@given(data=st.data())
def test_decoder_prefill_then_decode_matches_eager(family, data):
    cfg = data.draw(decoder_configs(family=family), label="config")
    batch = data.draw(st.integers(1, 3), label="batch")
    seq = data.draw(st.integers(1, 10), label="prompt length")
    steps = data.draw(st.integers(1, 5), label="decode steps")
    pipeline = data.draw(st.sampled_from(IDENTITY_PIPELINES), label="pipeline")
    model = tiny_decoder(**cfg)
    ids = torch.randint(0, cfg["vocab"], (batch, seq), generator=torch.Generator().manual_seed(cfg["seed"]))
    want_prefill, want_steps, want_tokens = eager_steps(model, ids, steps)

    program = PassManager(Pipeline.parse(pipeline), debug=True).run(capture(model, max_len=24)).program
    verify_program(program)
    gen = Generator(get_target("eager").compile(program))
    logits, cache, _ = gen.prefill(ids.tolist())
    torch.testing.assert_close(logits, want_prefill, atol=ATOL, rtol=RTOL)
    for step, want in enumerate(want_steps):
        got = gen.decode(cache, want_tokens[:, step])
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL, msg=lambda m: f"decode step {step}: {m}")
    assert cache.lengths.tolist() == [seq + steps] * batch


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_greedy_generation_of_ragged_batch_matches_per_row_eager(family):
    model = tiny_decoder(family, layers=2, seed=3)
    prompts = [[5, 9, 2, 7, 1, 3, 8], [4], [11, 12, 13]]
    gen = Generator(get_target("eager").compile(capture(model, max_len=32)))
    result = gen.generate(prompts, max_new_tokens=6)
    for prompt, got in zip(prompts, result.tokens):
        _, _, want = eager_steps(model, torch.tensor([prompt]), 5)
        assert got == want[0].tolist()
    assert len(result.decode_seconds) == 5


@given(layers=st.integers(1, 3), heads=st.sampled_from([1, 2, 4]), head_dim=st.sampled_from([4, 8]),
       batch=st.integers(1, 4), seed=st.integers(0, 1000))
def test_vit_forward_matches_eager(layers, heads, head_dim, batch, seed):
    model = tiny_vit(layers=layers, heads=heads, head_dim=head_dim, seed=seed)
    program = capture(model)
    pixels = torch.randn(batch, 1, 16, 16, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = model(pixel_values=pixels).logits
    (got,) = get_target("eager").compile(program).run("forward", pixels)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


@given(layers=st.integers(1, 3), heads=st.sampled_from([1, 2, 4]), batch=st.integers(1, 3),
       seq=st.integers(1, 12), seed=st.integers(0, 1000))
def test_bert_forward_matches_eager_with_padding(layers, heads, batch, seq, seed):
    model = tiny_bert(layers=layers, heads=heads, seed=seed)
    program = capture(model)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, seq // 2 + 1:] = 0  # a padded row
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    (got,) = get_target("eager").compile(program).run("forward", ids, mask)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
