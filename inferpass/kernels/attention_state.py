"""Online-softmax attention state: what a chunk of keys contributes, and the exact merge of two chunks.

A state over a set of keys holds, per query row, ``lse = log Σ exp(s)`` over the
chunk's scores and ``o = Σ softmax(s) v`` (normalized within the chunk). Merging
two disjoint chunks gives exactly the state of their union (up to fp rounding):

    lse = logaddexp(lse1, lse2),  o = o1·exp(lse1 - lse) + o2·exp(lse2 - lse)

which is the (m, l, o) merge of TECHNIQUES.md §1 with ``lse = m + log l``. The
empty chunk (``lse = -inf``, ``o = 0``) is the identity; merging two empty states
stays empty instead of producing NaN. All math is fp32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class AttentionState(NamedTuple):
    """``o`` ``[..., D]`` fp32 (chunk-normalized output), ``lse`` ``[...]`` fp32 (``-inf`` for an empty chunk)."""

    o: torch.Tensor
    lse: torch.Tensor


def empty_state(shape: tuple[int, ...], head_dim: int, device: torch.device | str = "cpu") -> AttentionState:
    """The identity of ``merge``: no keys seen."""
    return AttentionState(
        torch.zeros(*shape, head_dim, device=device), torch.full(shape, float("-inf"), device=device)
    )


def chunk_state(scores: torch.Tensor, visible: torch.Tensor, values: torch.Tensor) -> AttentionState:
    """State of one chunk: ``scores`` ``[..., n]`` (already scaled), ``visible`` bool broadcastable to it,
    ``values`` ``[..., n, D]`` with leading dims broadcastable to the scores'. Rows with no visible key
    get the empty state."""
    scores = scores.float().masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - _finite(lse)[..., None])
    return AttentionState(torch.einsum("...n,...nd->...d", weights, values.float()), lse)


def merge(a: AttentionState, b: AttentionState) -> AttentionState:
    """Exact merge of the states of two disjoint key sets (associative, commutative, empty = identity)."""
    lse = torch.logaddexp(a.lse, b.lse)
    ref = _finite(lse)
    wa, wb = torch.exp(a.lse - ref), torch.exp(b.lse - ref)
    return AttentionState(a.o * wa[..., None] + b.o * wb[..., None], lse)


def merge_along(states: AttentionState, dim: int) -> AttentionState:
    """Merge the states stacked along ``dim`` of ``lse`` (``o`` has one more trailing dim) in one step."""
    lse = torch.logsumexp(states.lse, dim=dim)
    weights = torch.exp(states.lse - _finite(lse).unsqueeze(dim))
    return AttentionState((states.o * weights[..., None]).sum(dim=dim if dim >= 0 else dim - 1), lse)


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """``lse`` with ``-inf`` (empty rows) replaced by 0, so ``exp(-inf - ref)`` is 0 rather than NaN."""
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)

