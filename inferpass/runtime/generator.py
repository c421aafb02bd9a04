"""The generation loop: prefill a (ragged) batch of prompts, then decode token by token, greedy or sampled."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from inferpass.errors import InferpassError
from inferpass.runtime.kv_cache import KVCache
from inferpass.targets.base import Executable


@dataclass
class Generation:
    """Generated token ids per row and where the time went (seconds)."""

    tokens: list[list[int]]
    prefill_seconds: float
    decode_seconds: list[float] = field(default_factory=list)


def _pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InferpassError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, : len(p)] = torch.tensor(p, dtype=torch.long)
    return ids, torch.tensor([len(p) for p in prompts], dtype=torch.long)


class Generator:
    """Runs a decoder ``Executable``'s prefill and decode graphs over a runtime-owned ``KVCache``."""

    def __init__(self, executable: Executable):
        program = executable.program
        if not program.is_decoder:
            raise InferpassError(f"{program.info.architecture} is not a decoder; nothing to generate")
        self.executable = executable
        self.layout = program.cache

    def prefill(self, prompts: list[list[int]]) -> tuple[torch.Tensor, KVCache, torch.Tensor]:
        """Prefill a batch of prompts; return (logits [B, S_max, V] on the host, right-padded with zeros, the cache
        on the executable's device, lengths).

        Rows are prefilled in groups of equal prompt length, so every row's cache holds exactly
        its prompt: nothing is written past a row's length (a padded token could otherwise
        reach a cache that cannot take writes back, such as a quantized one).
        """
        ids, lengths = _pad(prompts)
        cache = KVCache(self.layout, len(prompts), self.executable.device)
        cache.reserve(lengths)
        logits = None
        for length in sorted(set(lengths.tolist())):
            rows = torch.nonzero(lengths == length).flatten()
            whole = len(rows) == len(prompts)  # one length for all: no gather/scatter copies of the cache
            start = cache.lengths[rows]
            graph = "decode" if length == 1 else "prefill"
            out, *written = self.executable.run(graph, ids[rows, :length], start,
                                                *(cache.tensors if whole else cache.rows(rows)))
            if whole:
                cache.advance(tuple(written), lengths)
            else:
                cache.advance_rows(rows, tuple(written), length)
            out = out.cpu()
            if logits is None:
                logits = out.new_zeros(len(prompts), ids.shape[1], out.shape[-1])
            logits[rows, :length] = out
        return logits, cache, lengths

    def decode(self, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row; return logits ``[B, V]`` (on the host)."""
        one = torch.ones(cache.batch, dtype=torch.long)
        start = cache.reserve(one)
        logits, *written = self.executable.run("decode", tokens.view(-1, 1), start, *cache.tensors)
        cache.advance(tuple(written), one)
        return logits[:, -1].cpu()

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        seed: int = 0,
        eos_token_id: int | None = None,
    ) -> Generation:
        """Generate up to ``max_new_tokens`` per row; ``temperature=0`` is greedy (argmax)."""
        gen = torch.Generator().manual_seed(seed)

        def pick(logits: torch.Tensor) -> torch.Tensor:
            if temperature <= 0:
                return logits.argmax(-1)
            probs = torch.softmax(logits.float() / temperature, -1)
            return torch.multinomial(probs, 1, generator=gen).squeeze(-1)

        t0 = time.perf_counter()
        logits, cache, lengths = self.prefill(prompts)
        rows = torch.arange(len(prompts))
        nxt = pick(logits[rows, lengths - 1])
        result = Generation([[int(t)] for t in nxt], time.perf_counter() - t0)
        done = torch.zeros(len(prompts), dtype=torch.bool)
        for _ in range(max_new_tokens - 1):
            if eos_token_id is not None:
                done |= nxt == eos_token_id
                if bool(done.all()):
                    break
            t0 = time.perf_counter()
            nxt = pick(self.decode(cache, nxt))
            result.decode_seconds.append(time.perf_counter() - t0)
            for row, tok in enumerate(nxt.tolist()):
                if not bool(done[row]):
                    result.tokens[row].append(tok)
        return result
