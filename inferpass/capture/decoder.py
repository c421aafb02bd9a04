"""Capture a decoder LM as prefill and decode graphs with a functional KV cache."""

from __future__ import annotations

import torch
from torch.export import Dim
from transformers import PreTrainedModel

from inferpass.capture.decoder_step import DecoderStep
from inferpass.errors import InferpassError
from inferpass.ir.program import BATCH, DECODE, PREFILL, CacheLayout, CacheTensor, ModelInfo, Program

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


MIN_MAX_LEN = 3  # a prefill of two tokens and one decode step
MAX_LEN_CAP = 32768  # cache slots per row beyond which a cache is more likely a typo than a plan
DEFAULT_MAX_LEN = 4096  # the default cache: the model's context, at most this


def context_of(config) -> int | None:
    """The context a transformers config declares (``max_position_embeddings``; GPT-2's ``n_positions``)."""
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def default_max_len(context: int | None) -> int:
    """Cache length used when none is given: the model's context (2048 if undeclared), at most 4096."""
    return min(context or 2048, DEFAULT_MAX_LEN)


def check_max_len(max_len: int, context: int | None, *, name: str = "max_len", where: str = "the model") -> None:
    """Raise ``InferpassError`` unless ``MIN_MAX_LEN <= max_len <= min(context, MAX_LEN_CAP)``, naming the range."""
    limit = min(context, MAX_LEN_CAP) if context else MAX_LEN_CAP
    why = f"the context of {where}" if context and context <= MAX_LEN_CAP else "inferpass's cap on cache slots"
    if isinstance(max_len, bool) or not isinstance(max_len, int) or not MIN_MAX_LEN <= max_len <= limit:
        raise InferpassError(f"{name} {max_len} is out of range: allowed {MIN_MAX_LEN}..{limit} "
                             f"({MIN_MAX_LEN}: a prefill and a decode step; {limit}: {why})")


def capture_decoder(model: PreTrainedModel, max_len: int | None = None, source: str | None = None) -> Program:
    """Export ``model`` as ``prefill`` (batch and sequence dynamic) and ``decode`` (batch dynamic, one token).

    Both graphs take ``(input_ids, start, *cache)`` and return ``(logits, *cache)``; see ``DecoderStep``.
    ``max_len`` (cache slots; None: ``default_max_len``) must pass ``check_max_len``.
    Exact: captured graphs compute what the eager model computes.
    """
    model = model.eval()
    context = context_of(model.config)
    max_len = default_max_len(context) if max_len is None else max_len
    check_max_len(max_len, context, where=source or type(model).__name__)
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
    return Program(info=info, graphs={"prefill": prefill, "decode": decode}, roles={"prefill": PREFILL, "decode": DECODE},
                   cache=layout)
