"""Per-request sampling: greedy, temperature, top-k, top-p, with a generator of the request's own.

A request's tokens depend only on its own logits and its own seeded generator, so the same
request with the same seed gives the same tokens alone or batched with others.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field


class SamplingParams(BaseModel):
    """How one request generates. ``temperature=0`` is greedy; ``top_k``/``top_p`` filter before sampling;
    ``seed`` fixes the request's sampling (None: a random seed); generation stops after ``max_new_tokens``,
    at a token in ``stop_token_ids`` (kept) or once the text ends with one of ``stop`` (byte-level models)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_new_tokens: int = Field(16, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_k: int | None = Field(None, ge=1)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()


def distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The probabilities ``[V]`` (fp32) a sampled request (``temperature > 0``) draws from: ``logits`` ``[V]``
    over the temperature, filtered by ``top_k`` and ``top_p``."""
    scores = logits.float() / params.temperature
    if params.top_k is not None and params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1:
        ordered, order = torch.sort(scores, descending=True)
        probs = torch.softmax(ordered, -1)
        outside = probs.cumsum(-1) - probs >= params.top_p  # tokens after the nucleus is complete
        scores = scores.scatter(0, order[outside], float("-inf"))
    return torch.softmax(scores, -1)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token id from ``logits`` ``[V]`` (any float dtype, on the host) under ``params``."""
    if params.temperature == 0:
        return int(logits.argmax())
    return int(torch.multinomial(distribution(logits, params), 1, generator=generator))
