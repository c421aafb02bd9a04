"""Bad generation requests fail up front with a message naming the fault, before any work is done."""

import pytest

from factories import tiny_decoder
from inferpass.capture import capture
from inferpass.errors import InferpassError
from inferpass.runtime.generator import Generator
from inferpass.targets import get_target

VOCAB, MAX_LEN = 64, 12


@pytest.fixture(scope="module")
def gen():
    return Generator(get_target("eager").compile(capture(tiny_decoder("llama", layers=1, vocab=VOCAB), max_len=MAX_LEN)))


@pytest.fixture
def no_work(gen, monkeypatch):
    """Makes running any graph fail the test: what it guards must be refused before any work."""
    def run(*args):
        raise AssertionError("ran a graph for a request that should have been refused")

    monkeypatch.setattr(gen.executable, "run", run)
    return gen


@pytest.mark.parametrize("prompts, new_tokens, message", [
    ([], 3, "no prompts: the batch is empty"),
    ([[1, 2], []], 3, "prompt 1 is empty: every prompt needs at least one token"),
    ([[1, 2], [3, VOCAB]], 3, f"prompt 1, position 1: token id {VOCAB} is outside the vocabulary \\[0, {VOCAB}\\)"),
    ([[-1]], 3, f"prompt 0, position 0: token id -1 is outside the vocabulary \\[0, {VOCAB}\\)"),
    ([[1, 2.0]], 3, "prompt 0, position 1: token id 2.0 is a float, not an integer"),
    ([[True]], 3, "prompt 0, position 0: token id True is a bool, not an integer"),
    ("hello", 3, "prompts must be a list of token-id lists, got a str"),
    ([[1]], -1, "max_new_tokens must be an integer >= 0, got -1"),
    ([[1]], 2.5, "max_new_tokens must be an integer >= 0, got 2.5"),
    ([[1], [1] * 10], 4, "prompt 1 \\(10 tokens\\) \\+ max_new_tokens 4 needs 13 cache positions; the program's "
                         f"max_len is {MAX_LEN} \\(at most 3 new tokens for this prompt\\)"),
    ([[1] * 13], 1, f"prompt 0 \\(13 tokens\\) \\+ max_new_tokens 1 needs 13 cache positions; the program's max_len "
                    f"is {MAX_LEN} \\(the prompt alone does not fit\\)"),
])
def test_bad_requests_are_refused_before_any_work(no_work, prompts, new_tokens, message):
    with pytest.raises(InferpassError, match=message):
        no_work.generate(prompts, new_tokens)


def test_zero_new_tokens_generates_nothing(no_work):
    assert no_work.generate([[1, 2], [3]], 0).tokens == [[], []]


def test_a_request_that_just_fits_runs_to_max_len(gen):
    out = gen.generate([[1] * 10], MAX_LEN - 10 + 1)  # the last token is generated, never fed back
    assert len(out.tokens[0]) == 3


def test_integer_like_ids_are_accepted(gen):
    import numpy as np
    import torch

    want = gen.generate([[1, 2, 3]], 2).tokens
    assert gen.generate([[np.int64(1), torch.tensor(2), 3]], 2).tokens == want
