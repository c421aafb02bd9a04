"""Capture a decoder LM as prefill and decode graphs with a functional KV cache."""

from __future__ import annotations

import torch
from torch.export import Dim
from transformers import PreTrainedModel

from inferpass.capture.decoder_step import DecoderStep
from inferpass.ir.program import BATCH, CacheLayout, CacheTensor, ModelInfo, Program

EXAMPLE_BATCH = 3


def cache_layout(model: PreTrainedModel, max_len: int) -> CacheLayout:
    """The k/v cache layout of ``model``, read off one eager step (works for any family's head layout)."""
    with torch.no_grad():
        out = model(torch.zeros(1, 2, dtype=torch.long), use_cache=True)
    tensors = []
    for layer, cached in enumerate(out.past_key_values.layers):
        for role, t in (("k", cached.keys), ("v", cached.values)):
            heads, dim = t.shape[1], t.shape[3]
            dtype = str(t.dtype).removeprefix("torch.")
            tensors.append(CacheTensor(name=f"{role}{layer}", layer=layer, role=role,
                                       shape=(BATCH, heads, max_len, dim), dtype=dtype))
    return CacheLayout(max_len=max_len, tensors=tuple(tensors))


def default_max_len(model: PreTrainedModel) -> int:
    """Cache length used when none is given: the model's context, at most 4096."""
    return min(int(getattr(model.config, "max_position_embeddings", 2048) or 2048), 4096)


def capture_decoder(model: PreTrainedModel, max_len: int | None = None, source: str | None = None) -> Program:
    """Export ``model`` as ``prefill`` (batch and sequence dynamic) and ``decode`` (batch dynamic, one token).

    Both graphs take ``(input_ids, start, *cache)`` and return ``(logits, *cache)``; see ``DecoderStep``.
    Exact: captured graphs compute what the eager model computes.
    """
    model = model.eval()
    max_len = max_len or default_max_len(model)
    limit = getattr(model.config, "max_position_embeddings", None)
    if max_len < 3 or (limit and max_len > limit):
        raise ValueError(f"max_len={max_len} must be in [3, {limit}] for {type(model).__name__}")
    layout = cache_layout(model, max_len)
    step = DecoderStep(model).eval()
    caches = layout.allocate(EXAMPLE_BATCH)
    start = torch.zeros(EXAMPLE_BATCH, dtype=torch.long)
    batch = Dim("batch", min=1, max=1024)
    cache_dims = tuple({0: batch} for _ in caches)
    example_len = 5 if max_len > 5 else 2
    prefill_ids = torch.zeros(EXAMPLE_BATCH, example_len, dtype=torch.long)
    with torch.no_grad():
        prefill = torch.export.export(
            step,
            (prefill_ids, start, *caches),
            dynamic_shapes=({0: batch, 1: Dim("seq", min=1, max=max_len)}, {0: batch}, cache_dims),
        )
        decode = torch.export.export(
            step,
            (prefill_ids[:, :1], start + example_len, *caches),
            dynamic_shapes=({0: batch}, {0: batch}, cache_dims),
        )
    info = ModelInfo.from_hf(model, "decoder", source)
    return Program(info=info, graphs={"prefill": prefill, "decode": decode}, cache=layout)
