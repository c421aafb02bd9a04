"""Train inferpass's default ViT (for token merging) on the digits data set; one command, fixed seed.

    python tools/train_default_vit.py --out inferpass/models/default-vit

4×4 patches of 32×32 upscaled digits = 64 patch tokens + [CLS]. Augmentation: random
±1-pixel shifts of the 8×8 originals. Writes HF-layout weights and ``training_report.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import ViTConfig, ViTForImageClassification

from inferpass.eval.digits import DIGITS_FILE, IMAGE_SIZE, preprocess
from safetensors.torch import load_file

SEED = 11
CONFIG = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
              image_size=IMAGE_SIZE, patch_size=4, num_channels=1, num_labels=10)
EPOCHS, BATCH, LR, WEIGHT_DECAY = 80, 64, 2e-3, 0.05


def shifted(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each 8×8 image shifted by a random (dy, dx) in {-1, 0, 1}², zero-filled."""
    padded = torch.nn.functional.pad(images.float(), (1, 1, 1, 1))
    offsets = torch.randint(0, 3, (len(images), 2), generator=gen)
    return torch.stack([padded[i, dy : dy + 8, dx : dx + 8] for i, (dy, dx) in enumerate(offsets.tolist())])


def evaluate(model, pixels, labels) -> float:
    with torch.no_grad():
        return float((model(pixel_values=pixels).logits.argmax(-1) == labels).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the default digits ViT.")
    parser.add_argument("--out", type=Path, default=Path("inferpass/models/default-vit"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    data = load_file(str(DIGITS_FILE))
    train_images, train_labels = data["train_images"], data["train_labels"].long()
    test_pixels, test_labels = preprocess(data["test_images"]), data["test_labels"].long()
    model = ViTForImageClassification(ViTConfig(**CONFIG, attn_implementation="sdpa"))
    steps = EPOCHS * ((len(train_images) + BATCH - 1) // BATCH)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(SEED)
    t0 = time.perf_counter()
    for _ in tqdm(range(EPOCHS), desc="train", unit="epoch"):
        model.train()
        order = torch.randperm(len(train_images), generator=gen)
        for i in range(0, len(order), BATCH):
            idx = order[i : i + BATCH]
            pixels = preprocess(shifted(train_images[idx], gen))
            loss = torch.nn.functional.cross_entropy(model(pixel_values=pixels).logits, train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    train_seconds = time.perf_counter() - t0
    model.eval()
    model.save_pretrained(args.out)
    saved = ViTForImageClassification.from_pretrained(args.out, attn_implementation="sdpa").eval()
    report = {
        "parameters": sum(p.numel() for p in saved.parameters()),
        "config": CONFIG,
        "recipe": {"epochs": EPOCHS, "batch": BATCH, "lr": LR, "weight_decay": WEIGHT_DECAY, "seed": SEED},
        "train_seconds": round(train_seconds, 1),
        "train_images": len(train_images),
        "test_images": len(test_labels),
        "test_accuracy": round(evaluate(saved, test_pixels, test_labels), 4),
    }
    (args.out / "training_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
