"""Layer-by-layer forward of a Llama-family model, for early-exit training and per-exit evaluation.

An exit after layer ``l`` (1-based: ``l`` layers run) applies the model's shared final
norm and LM head to the residual stream, as LayerSkip does.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from transformers import PreTrainedModel


def layer_states(model: PreTrainedModel, ids: torch.Tensor, skip: frozenset[int] = frozenset()) -> Iterator[torch.Tensor]:
    """Yield the residual stream after each layer (causal, positions from 0); layers in ``skip`` pass it through."""
    inner = model.model
    hidden = inner.embed_tokens(ids)
    positions = torch.arange(ids.shape[1], device=ids.device)[None]
    rotary = inner.rotary_emb(hidden, positions)
    for index, layer in enumerate(inner.layers):
        if index not in skip:
            hidden = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=rotary)
        yield hidden


def exit_logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Logits of an early exit: shared final norm + LM head on a residual-stream state."""
    return model.lm_head(model.model.norm(hidden))


def all_exit_logits(model: PreTrainedModel) -> Callable[[torch.Tensor], dict[int, torch.Tensor]]:
    """A ``logits_fn`` for ``bits_per_byte`` returning ``{layers_run: logits}`` for every exit 1..L."""

    def fn(ids: torch.Tensor) -> dict[int, torch.Tensor]:
        return {i + 1: exit_logits(model, h) for i, h in enumerate(layer_states(model, ids))}

    return fn
