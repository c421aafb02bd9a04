"""Capture an encoder classifier (ViT, BERT-style) as one ``forward`` graph with a dynamic batch."""

from __future__ import annotations

import torch
from torch import nn
from torch.export import Dim
from transformers import PreTrainedModel

from inferpass.ir.program import ENCODER, ModelInfo, Program

EXAMPLE_BATCH = 3


class ImageClassifierForward(nn.Module):
    """forward(pixel_values [B, C, H, W]) -> logits [B, num_labels]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


class TextClassifierForward(nn.Module):
    """forward(input_ids [B, S] int64, attention_mask [B, S] int64) -> logits [B, num_labels]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def example_inputs(model: PreTrainedModel, batch: int = EXAMPLE_BATCH, seq: int = 7) -> tuple[torch.Tensor, ...]:
    """Inputs of the right shapes for ``model``'s forward graph (random pixels, or token ids with a full mask)."""
    config = model.config
    if config.model_type == "vit":
        return (torch.randn(batch, config.num_channels, config.image_size, config.image_size),)
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    return (ids, torch.ones_like(ids))


def capture_encoder(model: PreTrainedModel, source: str | None = None) -> Program:
    """Export ``model`` as one ``forward`` graph (batch dynamic; text sequence length dynamic)."""
    model = model.eval()
    config = model.config
    batch = Dim("batch", min=1, max=1024)
    if config.model_type == "vit":
        wrapper: nn.Module = ImageClassifierForward(model)
        dynamic = ({0: batch},)
    else:
        wrapper = TextClassifierForward(model)
        seq = Dim("seq", min=1, max=config.max_position_embeddings)
        dynamic = ({0: batch, 1: seq}, {0: batch, 1: seq})
    with torch.no_grad():
        ep = torch.export.export(wrapper.eval(), example_inputs(model), dynamic_shapes=dynamic)
    info = ModelInfo.from_hf(model, "encoder", source)
    return Program(info=info, graphs={"forward": ep}, roles={"forward": ENCODER})
