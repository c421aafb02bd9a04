"""Iteration-level scheduling: requests join and leave the running batch at every step.

Each step admits waiting requests while the cache pool has free rows (first come, first
served), then plans one decode over every decoding row and one prefill chunk of at most
``prefill_chunk`` tokens for the oldest prefilling request, so a long prompt never stalls
the running decodes for more than one chunk.
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
    """What one engine step runs: a decode over ``decode`` (in row order) and a prefill chunk
    ``prompt[start:end]`` of ``prefill``."""

    decode: list[Request]
    prefill: Request | None = None
    start: int = 0
    end: int = 0


class Scheduler:
    """Admission by free cache rows and the plan of each step (see module doc)."""

    def __init__(self, pool: CachePool, prefill_chunk: int = 256):
        self.pool = pool
        self.prefill_chunk = prefill_chunk
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
        decode = list(self.pool.owners[: self.pool.decoding])
        prefilling = self.pool.owners[self.pool.decoding: self.pool.used]
        if not prefilling:
            return Step(decode)
        request = prefilling[0]
        end = min(len(request.prompt), request.prefilled + self.prefill_chunk)
        return Step(decode, request, request.prefilled, end)

    def remove(self, request: Request) -> None:
        """Take ``request`` out of the queue or free its row."""
        if request in self.waiting:
            self.waiting.remove(request)
        elif request in self.pool.owners:
            self.pool.release(request)
