"""Bits per byte of a byte-level LM on a text, with long sliding windows.

Every byte after the first is scored exactly once. Windows hold ``context`` input
bytes and advance by ``stride``, so each scored byte sees at least
``context - stride`` bytes of left context (all of it in the first window).
Bits per byte = mean negative log2-likelihood of the scored bytes (one token per byte).
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import torch

from inferpass import progress

LogitsFn = Callable[[torch.Tensor], Mapping[str | int, torch.Tensor]]


def byte_tokens(data: bytes) -> torch.Tensor:
    """The bytes of ``data`` as int64 token ids in [0, 256)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def sliding_windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows ``(start, end, first_scored)`` over ``n`` tokens, absolute token indices.

    Inputs are tokens ``[start, end - 1)``, targets ``[start + 1, end)``; targets with
    absolute index ``>= first_scored`` are scored. Together they score ``[1, n)`` once each.
    """
    if not 0 < stride <= context:
        raise ValueError(f"need 0 < stride <= context, got stride={stride}, context={context}")
    windows, end = [], min(context + 1, n)
    windows.append((0, end, 1))
    while end < n:
        new_end = min(end + stride, n)
        windows.append((max(0, new_end - context - 1), new_end, end))
        end = new_end
    return windows


def bits_per_byte(
    logits_fn: LogitsFn, data: bytes, *, context: int = 1024, stride: int = 512, batch: int = 8
) -> dict[str | int, float]:
    """Bits per byte of ``data`` for every output of ``logits_fn``.

    ``logits_fn(ids [B, S] int64) -> {name: logits [B, S, 256]}`` (several outputs, e.g.
    one per exit layer, share the pass over the data). Exact up to float summation order.
    """
    tokens = byte_tokens(data)
    if len(tokens) < 2:
        raise ValueError("need at least 2 bytes to score")
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for w in sliding_windows(len(tokens), context, stride):
        groups.setdefault(w[1] - w[0], []).append(w)
    totals: dict[str | int, float] = {}
    scored = 0
    batches = sum(-(-len(ws) // batch) for ws in groups.values())
    with torch.no_grad(), progress.task(f"scoring bits/byte on {len(tokens):,} bytes", total=batches) as step:
        for length, ws in groups.items():
            for i in range(0, len(ws), batch):
                chunk = ws[i : i + batch]
                ids = torch.stack([tokens[s:e] for s, e, _ in chunk])
                mask = torch.zeros(len(chunk), length - 1, dtype=torch.bool)
                for row, (s, _, first) in enumerate(chunk):
                    mask[row, first - s - 1 :] = True
                targets = ids[:, 1:]
                for name, logits in logits_fn(ids[:, :-1]).items():
                    nll = torch.nn.functional.cross_entropy(
                        logits.float().transpose(1, 2), targets, reduction="none"
                    )
                    totals[name] = totals.get(name, 0.0) + float(nll[mask].double().sum())
                scored += int(mask.sum())
                step.advance()
    assert scored == len(tokens) - 1, (scored, len(tokens))
    return {name: total / scored / math.log(2) for name, total in totals.items()}
