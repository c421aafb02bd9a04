"""Load a Hugging Face model directory (local, safetensors) with clear errors for bad input."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    PreTrainedModel,
)

from transformers.utils import logging as hf_logging

from inferpass.errors import ModelLoadError, UnsupportedModelError

hf_logging.disable_progress_bar()

DECODER_FAMILIES = ("llama", "qwen2", "mistral", "gpt2")
ENCODER_FAMILIES = {"vit": AutoModelForImageClassification, "bert": AutoModelForSequenceClassification}


def model_kind(model_type: str) -> str:
    """``decoder`` or ``encoder`` for a supported ``model_type``; raises naming the supported ones."""
    if model_type in DECODER_FAMILIES:
        return "decoder"
    if model_type in ENCODER_FAMILIES:
        return "encoder"
    supported = ", ".join(DECODER_FAMILIES + tuple(ENCODER_FAMILIES))
    raise UnsupportedModelError(f"model_type '{model_type}' is not supported (supported: {supported})")


def load_hf_model(path: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load the model in ``path`` (config.json + *.safetensors) in eval mode with SDPA attention.

    Raises ``ModelLoadError`` for a missing directory, missing/corrupt config or weights,
    or weights that do not match the config; ``UnsupportedModelError`` for other families.
    """
    root = Path(path)
    if not root.is_dir():
        raise ModelLoadError(f"model directory {root} does not exist or is not a directory")
    config_file = root / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{root}: no config.json (expected a Hugging Face model directory)")
    try:
        config = AutoConfig.from_pretrained(root, local_files_only=True)
    except Exception as exc:  # transformers raises several types for a bad config
        raise ModelLoadError(f"{config_file}: cannot read model config: {exc}") from exc
    kind = model_kind(config.model_type)
    weight_files = sorted(root.glob("*.safetensors"))
    if not weight_files:
        raise ModelLoadError(f"{root}: no *.safetensors weight files")
    for wf in weight_files:
        try:
            with safe_open(str(wf), framework="pt") as f:
                for key in f.keys():
                    f.get_slice(key)
        except Exception as exc:
            raise ModelLoadError(f"{wf}: corrupt safetensors file: {exc}") from exc
    auto = AutoModelForCausalLM if kind == "decoder" else ENCODER_FAMILIES[config.model_type]
    try:
        model, info = auto.from_pretrained(
            root, local_files_only=True, attn_implementation="sdpa", dtype=dtype, output_loading_info=True
        )
    except Exception as exc:
        raise ModelLoadError(f"{root}: cannot load weights: {exc}") from exc
    missing = [k for k in info.get("missing_keys", []) if k]
    mismatched = info.get("mismatched_keys", [])
    if missing or mismatched:
        raise ModelLoadError(f"{root}: weights do not match config (missing {missing[:5]}, mismatched {mismatched[:5]})")
    return model.eval()
