"""Convert scikit-learn's digits data set once into ``inferpass/models/digits.safetensors``.

A stratified 80/20 train/test split with a fixed seed; images stay 8×8 uint8 (0..16).
Needs the ``tools`` extra (scikit-learn).   python tools/digits_data.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

SEED = 7
TEST_FRACTION = 0.2


def main() -> None:
    from sklearn.datasets import load_digits

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("inferpass/models/digits.safetensors"))
    args = parser.parse_args()
    digits = load_digits()
    images, labels = digits.images.astype(np.uint8), digits.target.astype(np.int64)
    rng = np.random.default_rng(SEED)
    test = np.zeros(len(labels), dtype=bool)
    for digit in range(10):
        idx = np.flatnonzero(labels == digit)
        test[rng.choice(idx, size=round(len(idx) * TEST_FRACTION), replace=False)] = True
    tensors = {
        "train_images": torch.from_numpy(images[~test]),
        "train_labels": torch.from_numpy(labels[~test]),
        "test_images": torch.from_numpy(images[test]),
        "test_labels": torch.from_numpy(labels[test]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out))
    print(f"train {int((~test).sum())}, test {int(test.sum())} images -> {args.out}")


if __name__ == "__main__":
    main()
