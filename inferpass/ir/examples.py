"""Deterministic example inputs for a Program's graphs (numerical checks, repro bundles, benchmarks)."""

from __future__ import annotations

import torch

from inferpass.ir.program import CacheLayout, Program


def example_inputs(program: Program, graph: str, *, batch: int = 2, seq: int = 5, seed: int = 0) -> tuple:
    """Inputs for ``program.graphs[graph]`` drawn from a generator seeded with ``seed``, by the graph's role.

    A decoder graph of ``any`` tokens (a prefill): random ids ``[batch, seq]``, start 0, zero
    caches. Of a fixed count k (a decode or verify step): k random ids per row, ragged
    starts in ``[1, max_len - k]``, caches filled with random history (as the runtime's caches
    would be). Encoders: random pixels, or ids with a full mask.
    """
    gen = torch.Generator().manual_seed(seed)
    info = program.info
    if info.kind == "encoder":
        cfg = info.hf_config
        if info.family == "vit":
            size = cfg["image_size"]
            return (torch.randn(batch, cfg["num_channels"], size, size, generator=gen),)
        ids = torch.randint(0, info.vocab_size, (batch, seq), generator=gen)
        return (ids, torch.ones_like(ids))
    layout = CacheLayout(max_len=program.cache.max_len, tensors=program.cache_tensors(graph))
    tokens = program.roles[graph].tokens
    if tokens == "any":
        seq = min(seq, layout.max_len)
        ids = torch.randint(0, info.vocab_size, (batch, seq), generator=gen)
        return (ids, torch.zeros(batch, dtype=torch.long), *layout.allocate(batch))
    ids = torch.randint(0, info.vocab_size, (batch, tokens), generator=gen)
    start = torch.randint(1, layout.max_len - tokens + 1, (batch,), generator=gen)
    caches = []
    for t in layout.allocate(batch):
        if t.is_floating_point():
            t.normal_(generator=gen)
        caches.append(t)
    return (ids, start, *caches)
