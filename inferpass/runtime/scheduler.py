"""Iteration-level scheduling: requests join and leave the running batch at every step.

Each step admits waiting requests while the cache pool has free rows (first come, first
served), then plans one decode over every decoding row and prefill chunks of at most
``prefill_chunk`` tokens for the prefilling requests, oldest first, while the step's tokens
(one per decoding row, plus the chunks) stay within ``step_tokens`` — at least one chunk
whenever a prompt is waiting, so prefill always progresses. A long prompt thus never stalls
the running decodes for more than a step's budget, and a backlog of prompts is cleared in
few steps (each decode step costs a fixed overhead however many rows it runs).
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from inferpass.runtime.cache_pool import CachePool
from inferpass.runtime.sampling import SamplingParams

_IDS = itertools.count()


@dataclass(eq=False)
class Request:
    """One generation request and its progress. ``state``: waiting → prefill → decode → finished, or
    cancelled / failed (with ``error``). ``tokens`` are the generated ids; ``on_token`` is called with each."""

    prompt: list[int]
    params: SamplingParams
    on_token: Callable[["Request", int], None] | None = None
    id: int = field(default_factory=lambda: next(_IDS))
    tokens: list[int] = field(default_factory=list)
    prefilled: int = 0
    state: str = "waiting"
    finish_reason: str | None = None
    error: str | None = None
    generator: torch.Generator = field(default_factory=torch.Generator)

    def __post_init__(self):
        self.generator.manual_seed(self.params.seed if self.params.seed is not None else
                                   int(torch.randint(0, 2**62, ())))

    @property
    def done(self) -> bool:
        return self.state in ("finished", "cancelled", "failed")


@dataclass
class Step:
    """What one engine step runs: a decode over ``decode`` (in row order), then the prefill chunks
    ``(request, start, end)`` (``request.prompt[start:end]``) in order."""

    decode: list[Request]
    prefills: list[tuple[Request, int, int]] = field(default_factory=list)


class Scheduler:
    """Admission by free cache rows and the plan of each step (see module doc)."""

    def __init__(self, pool: CachePool, prefill_chunk: int = 256, step_tokens: int = 1024):
        self.pool = pool
        self.prefill_chunk = prefill_chunk
        self.step_tokens = step_tokens
        self.waiting: deque[Request] = deque()

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def idle(self) -> bool:
        return not self.waiting and self.pool.used == 0

    def plan(self) -> Step:
        """Admit what fits, then the next step's work."""
        while self.waiting and self.pool.free:
            request = self.waiting.popleft()
            self.pool.acquire(request)
            request.state = "prefill"
        step = Step(list(self.pool.owners[: self.pool.decoding]))
        budget = self.step_tokens - len(step.decode)
        for request in self.pool.owners[self.pool.decoding: self.pool.used]:
            start = request.prefilled
            while start < len(request.prompt) and (budget > 0 or not step.prefills):
                end = min(len(request.prompt), start + self.prefill_chunk, start + max(budget, 1))
                step.prefills.append((request, start, end))
                budget -= end - start
                start = end
            if budget <= 0:
                break
        return step

    def remove(self, request: Request) -> None:
        """Take ``request`` out of the queue or free its row."""
        if request in self.waiting:
            self.waiting.remove(request)
        elif request in self.pool.owners:
            self.pool.release(request)
