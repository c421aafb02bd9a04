"""Fixed-batch generation: prefill a (ragged) batch of prompts, then decode token by token, greedy or sampled.

The engine's parts run it — a ``CachePool`` with one row per prompt and a ``StepRunner`` — so it
measures and scores exactly what the engine serves (the CLI report and the speed and agreement
measures use it); the engine adds scheduling, per-request sampling and streaming on top.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from inferpass.errors import InferpassError
from inferpass.runtime.cache_pool import CachePool
from inferpass.runtime.step_runner import StepRunner
from inferpass.targets.base import Executable


@dataclass
class Generation:
    """Generated token ids per row and where the time went (seconds)."""

    tokens: list[list[int]]
    prefill_seconds: float
    decode_seconds: list[float] = field(default_factory=list)


def token_id(value, where: str, vocab: int | None) -> int:
    """``value`` as a token id; raises ``InferpassError`` naming ``where`` (e.g. "prompt 1, position 3") for a
    non-integer (floats and bools too: never truncated) or an id outside ``[0, vocab)``."""
    try:
        if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
            raise TypeError
        token = operator.index(value)
    except TypeError:
        raise InferpassError(f"{where}: token id {value!r} is a "
                             f"{type(value).__name__}, not an integer") from None
    if token < 0 or (vocab is not None and token >= vocab):
        raise InferpassError(f"{where}: token id {token} is outside the vocabulary "
                             f"[0, {vocab}) of this program")
    return token


def check_prompts(prompts: list[list[int]], vocab: int | None) -> list[list[int]]:
    """The prompts as lists of int token ids; raises ``InferpassError`` for an empty batch ("no prompts"),
    an empty prompt, or a bad token id (see ``token_id``)."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence | torch.Tensor):
        raise InferpassError(f"prompts must be a list of token-id lists, got a {type(prompts).__name__}")
    if len(prompts) == 0:
        raise InferpassError("no prompts: the batch is empty")
    checked = []
    for row, prompt in enumerate(prompts):
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence | torch.Tensor):
            raise InferpassError(f"prompt {row} must be a list of token ids, got a {type(prompt).__name__}")
        if len(prompt) == 0:
            raise InferpassError(f"prompt {row} is empty: every prompt needs at least one token")
        checked.append([token_id(t, f"prompt {row}, position {i}", vocab) for i, t in enumerate(prompt)])
    return checked


class Generator:
    """Runs a decoder ``Executable``'s prefill and decode graphs over a ``CachePool`` row per prompt."""

    def __init__(self, executable: Executable):
        program = executable.program
        if not program.is_decoder:
            raise InferpassError(f"{program.info.architecture} is not a decoder; nothing to generate")
        self.executable = executable
        self.program = program
        self.layout = program.cache

    def check_request(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """The prompts as int lists, or ``InferpassError`` before any work: prompts as in ``check_prompts``,
        ``max_new_tokens`` an int >= 0, and every prompt plus its ``max_new_tokens - 1`` fed-back tokens
        within the cache's ``max_len``."""
        prompts = check_prompts(prompts, self.program.info.vocab_size)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise InferpassError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        row = max(range(len(prompts)), key=lambda r: len(prompts[r]))
        length, max_len = len(prompts[row]), self.layout.max_len
        needed = length + max(max_new_tokens, 1) - 1
        if needed > max_len:
            room = (f"at most {max_len - length + 1} new tokens for this prompt" if length <= max_len
                    else "the prompt alone does not fit")
            raise InferpassError(f"prompt {row} ({length} tokens) + max_new_tokens {max_new_tokens} needs {needed} "
                                 f"cache positions; the program's max_len is {max_len} ({room})")
        return prompts

    def prefill(self, prompts: list[list[int]]) -> tuple[torch.Tensor, CachePool, torch.Tensor]:
        """Prefill a batch of prompts (row ``i`` of the returned pool holds prompt ``i``); return (logits
        ``[B, S_max, V]`` on the host, right-padded with zeros, the pool, lengths).

        Each run of neighbouring prompts of one length is prefilled in one call, so every row's
        cache holds exactly its prompt: nothing is written past a row's length (a padded token
        could otherwise reach a cache that cannot take writes back, such as a quantized one).
        """
        prompts = self.check_request(prompts, 1)
        pool = CachePool(self.layout, len(prompts), self.executable.device)
        runner = StepRunner(self.executable, pool)
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
        for row in range(len(prompts)):
            pool.acquire(row)
        logits, first = None, 0
        while first < len(prompts):
            last = first + 1
            while last < len(prompts) and len(prompts[last]) == len(prompts[first]):
                last += 1
            out = runner.prefill(first, torch.tensor(prompts[first:last], dtype=torch.long))
            if logits is None:
                logits = out.new_zeros(len(prompts), int(lengths.max()), out.shape[-1])
            logits[first:last, : out.shape[1]] = out
            first = last
        for row in range(len(prompts)):
            pool.start_decoding(row)
        return logits, pool, lengths

    def decode(self, cache: CachePool, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row of ``cache`` (all decoding); return logits ``[B, V]`` (on the host)."""
        if int(cache.lengths.max()) >= self.layout.max_len:
            row = int(cache.lengths.argmax())
            raise InferpassError(f"row {row} needs {int(cache.lengths[row]) + 1} cache positions but the program was "
                                 f"captured with max_len={self.layout.max_len} (capture again with a larger --max-len)")
        return StepRunner(self.executable, cache).decode(tokens.view(-1).tolist())

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        seed: int = 0,
        eos_token_id: int | None = None,
    ) -> Generation:
        """Generate up to ``max_new_tokens`` per row; ``temperature=0`` is greedy (argmax).

        The request is checked first (``check_request``); ``max_new_tokens=0`` returns an empty list per
        row and runs nothing.
        """
        prompts = self.check_request(prompts, max_new_tokens)
        if max_new_tokens == 0:
            return Generation([[] for _ in prompts], 0.0)
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
