"""``lean-attention``: decode-phase attention becomes split-KV attention over the raw KV cache.

Source: Flash-Decoding (Dao et al. 2023) and LeanAttention (Sanovar et al. 2024);
TECHNIQUES.md §1. Each block's ``scaled_dot_product_attention`` in the selected
graphs (``decode`` by default) reads ``repeat_kv``-expanded caches through a
``slots <= position`` mask over the whole cache. It is replaced by
``inferpass::split_kv_attention`` on the unexpanded caches and the graph's
``start`` input: KV bytes are read once per GQA group, only each row's valid
prefix is read, and on a GPU the keys are split across programs (single /
split / stream-K schedule, see ``kernels.decode_plan``) and merged exactly.

Exact: the same attention up to fp32 rounding (the merge is exact; summation
order differs). Identity: ``graphs=[]``.
"""

from __future__ import annotations

import operator
from typing import Literal

import torch
from pydantic import Field, field_validator

from inferpass.ir.graph_utils import refresh, user_inputs
from inferpass.ir.program import Program
from inferpass.ir.structure import graph_structure
from inferpass.kernels.decode_plan import cached_plan, planning_workers
from inferpass.kernels.split_kv_op import SPLIT_KV_ATTENTION
from inferpass.passes.base import (AutoOrPositive, GraphSelection, Pass, PassResult, op_count, register_pass,
                                  select_graphs)
from inferpass.passes.cache_attention import cache_attention, insert_like

class LeanAttentionConfig(GraphSelection):
    """schedule: auto | single | split | stream-k; splits: split count for ``split`` (auto or N ≥ 1);
    block_n: KV tile size (power of two ≥ 16); graphs: graphs to rewrite, by role or name (default: the
    one-token steps; ``[]`` = identity)."""

    schedule: Literal["auto", "single", "split", "stream-k"] = "auto"
    splits: AutoOrPositive = "auto"
    block_n: int = 64
    graphs: list[str] | None = Field(default_factory=lambda: ["decode"])

    @field_validator("block_n")
    @classmethod
    def _power_of_two(cls, value):
        if value < 16 or value & (value - 1):
            raise ValueError("block_n must be a power of two >= 16")
        return value


@register_pass
class LeanAttention(Pass):
    """Rewrite every attention site of the selected graphs to ``split_kv_attention`` (see module doc)."""

    name = "lean-attention"
    exact = True
    Config = LeanAttentionConfig
    requires = frozenset({"decoder"})

    def run(self, program: Program) -> PassResult:
        rewritten = 0
        for name in select_graphs(program, self.config.graphs, self.name):
            rewritten += self._rewrite(program, name)
        stats = {"attention_sites": rewritten, **(self.plans(program, planning_workers()) if rewritten else {})}
        return PassResult(program, changed=rewritten > 0, stats=stats)

    def plans(self, program: Program, workers: int, batches: tuple[int, ...] = (1, 8, 32)) -> dict[str, str]:
        """The plan the GPU kernel uses at full cache length for each batch size, on ``workers`` SMs."""
        kv_heads, cache_len = int(program.cache.tensors[0].shape[1]), program.cache.max_len
        splits = op_count(self.config.splits)
        return {f"plan batch {b}": cached_plan(b, kv_heads, cache_len, workers, self.config.schedule, splits,
                                              self.config.block_n).describe() for b in batches}

    def _rewrite(self, program: Program, graph: str) -> int:
        ep = program.graphs[graph]
        structure = graph_structure(program, graph)
        start = user_inputs(ep)[1]
        count = 0
        for block in structure.blocks:
            if block.attention is None or \
                    block.attention.attention.target is not torch.ops.aten.scaled_dot_product_attention.default:
                continue  # no attention (layer-skip dropped it), or already rewritten (by this pass or another)
            site = cache_attention(program, block, start, f"{graph} graph, block {block.index} ({block.scope})")
            splits = op_count(self.config.splits)
            call = insert_like(site.attention, SPLIT_KV_ATTENTION.overload,
                               (site.query, site.writes["k"], site.writes["v"], start, site.scale,
                                self.config.schedule, splits, self.config.block_n))
            out = insert_like(site.attention, operator.getitem, (call, 0))
            site.attention.replace_all_uses_with(out)
            ep.graph.erase_node(site.attention)
            count += 1
        if count:
            ep.graph.eliminate_dead_code()
            program.graphs[graph] = refresh(ep)
        return count
