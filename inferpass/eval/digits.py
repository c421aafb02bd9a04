"""The default ViT's data: scikit-learn's handwritten digits (8×8, 0..16), shipped as a small safetensors file.

Images are upscaled to 32×32 (bilinear) so a 4×4 patch ViT sees 64 patch tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

DIGITS_FILE = Path(__file__).resolve().parent.parent / "models" / "digits.safetensors"
IMAGE_SIZE = 32


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8/float ``[N, 8, 8]`` in 0..16 -> float ``[N, 1, 32, 32]`` normalised to about [-1, 1]."""
    x = images.float()[:, None] / 16.0
    x = torch.nn.functional.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return (x - 0.5) / 0.5


def load_digits(split: str, path: Path = DIGITS_FILE) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixels ``[N, 1, 32, 32]``, labels ``[N]`` int64) of the ``train`` or ``test`` split."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    tensors = load_file(str(path))
    return preprocess(tensors[f"{split}_images"]), tensors[f"{split}_labels"].long()
