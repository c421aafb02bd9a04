"""Iteration-level scheduling: requests join and leave the running batch at every step.

Each step admits waiting requests while the cache pool has free rows (first come, first
served), then plans one decode over every decoding row and prefill chunks of at most
``prefill_chunk`` tokens for the prefilling requests, oldest first, while the step's tokens
(one per decoding row, plus the chunks) stay within ``step_tokens`` — at least one chunk
whenever a prompt is waiting, so prefill always progresses. A long prompt thus never stalls
the running decodes for more than a step's budget, and a backlog of prompts is cleared in
few steps (each decode step costs a fixed overhead however many rows it runs).

Requests carry a ``priority`` (higher first; first come, first served within one). When no row is
free and a waiting request outranks a running one, the lowest-priority running request (the
latest admitted among equals) is preempted by recompute: its row is freed, it waits at the head
of its priority, and once readmitted it prefills its prompt and the tokens it had generated, then
goes on where it stopped (its sampling generator too, so greedy and seeded output are unchanged;
on a SkipDecode schedule the recomputed positions get every layer's KV, on a quantized cache they
are quantized again: within those passes' own bounds).
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
    cancelled / failed (with ``error``); a preempted request goes back to waiting. ``tokens`` are the generated
    ids; ``on_token`` is called with each; ``prefilled`` counts the positions of ``context`` in the cache."""

    prompt: list[int]
    params: SamplingParams
    on_token: Callable[["Request", int], None] | None = None
    priority: int = 0
    id: int = field(default_factory=lambda: next(_IDS))
    tokens: list[int] = field(default_factory=list)
    prefilled: int = 0
    state: str = "waiting"
    finish_reason: str | None = None
    error: str | None = None
    generator: torch.Generator = field(default_factory=torch.Generator)
    preemptions: int = 0

    def __post_init__(self):
        self.generator.manual_seed(self.params.seed if self.params.seed is not None else
                                   int(torch.randint(0, 2**62, ())))

    @property
    def context(self) -> list[int]:
        """What a prefill feeds: the prompt, then (after a preemption) the tokens generated before it."""
        return self.prompt + self.tokens if self.tokens else self.prompt

    @property
    def done(self) -> bool:
        return self.state in ("finished", "cancelled", "failed")


@dataclass
class Step:
    """What one engine step runs: a decode over ``decode`` (in row order), then the prefill chunks
    ``(request, start, end)`` (``request.context[start:end]``) in order."""

    decode: list[Request]
    prefills: list[tuple[Request, int, int]] = field(default_factory=list)


class Scheduler:
    """Admission by free cache rows and the plan of each step (see module doc)."""

    def __init__(self, pool: CachePool, prefill_chunk: int = 256, step_tokens: int = 1024):
        self.pool = pool
        self.prefill_chunk = prefill_chunk
        self.step_tokens = step_tokens
        self.waiting: deque[Request] = deque()

    def add(self, request: Request, first: bool = False) -> None:
        """Queue ``request`` behind the waiting requests of its priority (``first``: ahead of them)."""
        at = next((i for i, r in enumerate(self.waiting) if r.priority < request.priority or
                   (first and r.priority == request.priority)), len(self.waiting))
        self.waiting.insert(at, request)

    @property
    def idle(self) -> bool:
        return not self.waiting and self.pool.used == 0

    def plan(self) -> Step:
        """Admit what fits (preempting what a waiting request outranks), then the next step's work."""
        while self.waiting and (self.pool.free or self._preempt_for(self.waiting[0])):
            request = self.waiting.popleft()
            self.pool.acquire(request)
            request.state = "prefill"
        step = Step(list(self.pool.owners[: self.pool.decoding]))
        budget = self.step_tokens - len(step.decode)
        for request in self.pool.owners[self.pool.decoding: self.pool.used]:
            start, length = request.prefilled, len(request.context)
            while start < length and (budget > 0 or not step.prefills):
                end = min(length, start + self.prefill_chunk, start + max(budget, 1))
                step.prefills.append((request, start, end))
                budget -= end - start
                start = end
            if budget <= 0:
                break
        return step

    def preempt(self, request: Request) -> None:
        """Free running ``request``'s row and queue it first among its priority, to be recomputed."""
        self.pool.release(request)
        request.state, request.prefilled = "waiting", 0
        request.preemptions += 1
        self.add(request, first=True)

    def _preempt_for(self, request: Request) -> bool:
        """Preempt the lowest-priority running request (latest admitted among equals) if ``request`` outranks
        it; whether a row was freed."""
        running = self.pool.owners[:self.pool.used]
        victim = min(reversed(running), key=lambda r: r.priority, default=None)
        if victim is None or victim.priority >= request.priority:
            return False
        self.preempt(victim)
        return True

    def remove(self, request: Request) -> None:
        """Take ``request`` out of the queue or free its row."""
        if request in self.waiting:
            self.waiting.remove(request)
        elif request in self.pool.owners:
            self.pool.release(request)
