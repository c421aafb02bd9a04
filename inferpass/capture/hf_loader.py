"""Load a Hugging Face model directory (local, safetensors) with clear errors for bad input.

``inspect_model_dir`` checks a directory without loading weights (reads ``config.json`` as
plain JSON), so front ends refuse a bad model before minutes of work; ``load_hf_model``
inspects, then loads. Every refusal names the directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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
SHOWN_KEYS = 5  # tensor names listed in a mismatch message


def model_kind(model_type: str) -> str:
    """``decoder`` or ``encoder`` for a supported ``model_type``; raises naming the supported ones."""
    if model_type in DECODER_FAMILIES:
        return "decoder"
    if model_type in ENCODER_FAMILIES:
        return "encoder"
    supported = ", ".join(DECODER_FAMILIES + tuple(ENCODER_FAMILIES))
    raise UnsupportedModelError(f"model_type '{model_type}' is not supported (supported: {supported})")


@dataclass(frozen=True)
class ModelDir:
    """What a model directory declares: its ``config.json`` (as JSON), kind, context and weight files."""

    root: Path
    config: dict
    kind: str
    weight_files: tuple[Path, ...]

    @property
    def model_type(self) -> str:
        return self.config["model_type"]

    @property
    def context(self) -> int | None:
        """Positions the model was built for (``max_position_embeddings``, GPT-2's ``n_positions``), if declared."""
        value = self.config.get("max_position_embeddings") or self.config.get("n_positions")
        return int(value) if isinstance(value, int) and value > 0 else None

    @property
    def weight_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.weight_files)


def inspect_model_dir(path: str | Path) -> ModelDir:
    """Check ``path`` without loading weights: a directory with a JSON ``config.json`` naming a supported
    ``model_type`` and at least one ``*.safetensors`` file. Raises ``ModelLoadError`` or
    ``UnsupportedModelError`` naming the directory."""
    root = Path(path)
    if not root.is_dir():
        raise ModelLoadError(f"model directory {root} does not exist or is not a directory")
    config_file = root / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{root}: no config.json (expected a Hugging Face model directory)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"{config_file}: cannot read model config: {exc}") from exc
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ModelLoadError(f"{config_file}: cannot read model config: no \"model_type\" string")
    try:
        kind = model_kind(config["model_type"])
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(f"{root}: {exc}") from None
    weight_files = tuple(sorted(root.glob("*.safetensors")))
    if not weight_files:
        raise ModelLoadError(f"{root}: no *.safetensors weight files")
    return ModelDir(root, config, kind, weight_files)


def load_hf_model(path: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load the model in ``path`` (config.json + *.safetensors) in eval mode with SDPA attention.

    Raises ``ModelLoadError`` for a missing directory, missing/corrupt config or weights,
    or weights that do not match the config (naming the missing or mismatched tensors);
    ``UnsupportedModelError`` for other families.
    """
    found = inspect_model_dir(path)
    root = found.root
    try:
        config = AutoConfig.from_pretrained(root, local_files_only=True)
    except Exception as exc:  # transformers raises several types for a bad config
        raise ModelLoadError(f"{root / 'config.json'}: cannot read model config: {exc}") from exc
    for wf in found.weight_files:
        try:
            with safe_open(str(wf), framework="pt") as f:
                for key in f.keys():
                    f.get_slice(key)
        except Exception as exc:
            raise ModelLoadError(f"{wf}: corrupt safetensors file: {exc}") from exc
    auto = AutoModelForCausalLM if found.kind == "decoder" else ENCODER_FAMILIES[config.model_type]
    try:
        model, info = auto.from_pretrained(
            root, local_files_only=True, attn_implementation="sdpa", dtype=dtype, output_loading_info=True
        )
    except Exception as exc:
        raise ModelLoadError(f"{root}: cannot load weights: {exc}") from exc
    problems = [f"{len(keys)} {what}: {', '.join(keys[:SHOWN_KEYS])}{', ...' if len(keys) > SHOWN_KEYS else ''}"
                for what, keys in (("missing", sorted(k for k in info.get("missing_keys", ()) if k)),
                                   ("mismatched", sorted(str(k) for k in info.get("mismatched_keys", ()))))
                if keys]
    if problems:
        raise ModelLoadError(f"{root}: weights do not match config.json ({'; '.join(problems)})")
    return model.eval()
