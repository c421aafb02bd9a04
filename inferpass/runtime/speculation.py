"""Self-speculative decoding on plain tensors: drafting a row's tokens, accepting them, and the per-step policy.

A row drafts with the early-exit graph (``passes.early_exit``) while the draft is confident, then the
whole model scores the row's last token and its drafts in one verify step. ``accept`` keeps the
longest prefix the whole model agrees with and adds the whole model's own next token, so every verify
step yields at least one token per row:

* greedy (``temperature=0``): a draft is kept while it is the whole model's argmax — the tokens are
  exactly plain greedy decoding's (Leviathan et al. 2023; LayerSkip);
* sampled: draft ``x`` drawn from the draft's distribution ``q`` is kept with probability
  ``min(1, p(x)/q(x))`` (``p`` the whole model's, both under the request's temperature / top-k / top-p);
  at the first rejection the token is drawn from ``max(0, p − q)`` normalised, and after all ``m``
  drafts from ``p`` at the next position: the output distribution is exactly ``p``'s;
* confidence exit (``DraftSpec.exit_margin``, lossy, CALM): every draft is kept (drafting stopped at
  the first one under the margin), then the whole model's token.

``SpeculationPolicy`` decides per step, per decode-batch bucket, whether drafting pays, from measured
seconds per produced token in either mode (a mode not yet measured at a bucket is tried, its first step,
which may compile, not counted; the slower
one is measured again after a wait that doubles each time it loses, so a losing mode costs a vanishing
share of the steps). The early layers' KV is written by every verify step, so turning drafting back on
needs no catching up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from inferpass.ir.program import DraftSpec
from inferpass.runtime.sampling import SamplingParams, distribution, sample


@dataclass
class Draft:
    """One row's drafting: tokens drafted so far and, for sampled rows, each one's draft distribution."""

    tokens: list[int] = field(default_factory=list)
    probs: list[torch.Tensor] = field(default_factory=list)
    open: bool = True


def propose(logits: torch.Tensor, draft: Draft, spec: DraftSpec, params: SamplingParams,
            generator: torch.Generator) -> None:
    """Extend ``draft`` by the token the draft ``logits`` ``[V]`` give (argmax, or sampled from its
    distribution under ``params``), or close it: when the draft's top-1 probability (temperature 1) is
    below ``spec.confidence``, or (confidence exit) its top-1 − top-2 margin is below ``spec.exit_margin``."""
    probs = torch.softmax(logits.float(), -1)
    top = torch.topk(probs, 2).values
    if top[0] < spec.confidence or (spec.exit_margin is not None and top[0] - top[1] < spec.exit_margin):
        draft.open = False
        return
    if params.temperature == 0:
        draft.tokens.append(int(logits.argmax()))
        return
    q = distribution(logits, params)
    draft.tokens.append(int(torch.multinomial(q, 1, generator=generator)))
    draft.probs.append(q)


def accept(draft: Draft, verify_logits: torch.Tensor, spec: DraftSpec, params: SamplingParams,
           generator: torch.Generator) -> list[int]:
    """The tokens a row emits after a verify step: the kept drafts, then one token of the whole model (see
    module doc). ``verify_logits`` ``[>= m + 1, V]``: the whole model's logits at the row's last token and
    its ``m`` drafts."""
    tokens = draft.tokens
    if spec.exit_margin is not None:
        return tokens + [sample(verify_logits[len(tokens)], params, generator)]
    if params.temperature == 0:
        best = verify_logits[:len(tokens) + 1].argmax(-1).tolist()
        kept = next((j for j, t in enumerate(tokens) if best[j] != t), len(tokens))
        return tokens[:kept] + [best[kept]]
    for j, (token, q) in enumerate(zip(tokens, draft.probs)):
        p = distribution(verify_logits[j], params)
        if float(torch.rand((), generator=generator)) * float(q[token]) >= float(p[token]):  # rejected
            residual = (p - q).clamp(min=0)
            total = residual.sum()
            choice = residual / total if total > 0 else p
            return tokens[:j] + [int(torch.multinomial(choice, 1, generator=generator))]
    return tokens + [sample(verify_logits[len(tokens)], params, generator)]


class SpeculationPolicy:
    """Whether a decode step of a given batch bucket drafts (see module doc). ``mode``: ``auto`` (measured),
    ``always`` or ``never``."""

    def __init__(self, mode: str = "auto", smoothing: float = 0.3, first_wait: int = 8, max_wait: int = 512):
        if mode not in ("auto", "always", "never"):
            raise ValueError(f"speculation mode must be auto, always or never, got {mode!r}")
        self.mode, self.smoothing, self.first_wait, self.max_wait = mode, smoothing, first_wait, max_wait
        self.cost: dict[tuple[int, bool], float] = {}  # (bucket, drafting) -> seconds per produced token
        self.seen: set[tuple[int, bool]] = set()  # modes run once at a bucket: that first step (compiles) is not kept
        self.wait: dict[int, int] = {}  # bucket -> steps before the slower mode is measured again
        self.since: dict[int, int] = {}  # bucket -> steps since then

    def drafts(self, bucket: int) -> bool:
        """Whether the next step at ``bucket`` drafts."""
        if self.mode != "auto":
            return self.mode == "always"
        for mode in (True, False):
            if (bucket, mode) not in self.cost:
                return mode
        faster = self.cost[bucket, True] <= self.cost[bucket, False]
        if self.since.get(bucket, 0) >= self.wait.get(bucket, self.first_wait):
            return not faster
        return faster

    def record(self, bucket: int, drafted: bool, seconds: float, tokens: int) -> None:
        """A step at ``bucket`` (drafting or not) took ``seconds`` and produced ``tokens`` tokens."""
        if self.mode != "auto" or tokens == 0:
            return
        cost, key = seconds / tokens, (bucket, drafted)
        if key not in self.seen:
            self.seen.add(key)
            return
        measured = key in self.cost
        self.cost[key] = cost if not measured else (1 - self.smoothing) * self.cost[key] + self.smoothing * cost
        if (bucket, not drafted) not in self.cost:
            return
        faster = self.cost[bucket, True] <= self.cost[bucket, False]
        if drafted != faster and measured:  # the slower mode, measured again: still slower, so wait longer
            self.wait[bucket] = min(self.max_wait, 2 * self.wait.get(bucket, self.first_wait))
            self.since[bucket] = 0
        else:
            self.since[bucket] = self.since.get(bucket, 0) + 1
