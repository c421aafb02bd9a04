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

import math
import operator
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch.export import ExportedProgram
from torch.fx import Node

from inferpass.errors import UnsupportedModelError
from inferpass.ir.graph_utils import fake_value, refresh, skip_aliases, user_inputs
from inferpass.ir.program import Program
from inferpass.ir.structure import recover_structure
from inferpass.kernels.split_kv_op import SPLIT_KV_ATTENTION, cached_plan, device_workers
from inferpass.passes.base import Pass, PassConfig, PassResult, register_pass

aten = torch.ops.aten
REFERENCE_SMS = 132  # plans shown without a GPU are for an H100 SXM
_REPEAT_KV = {aten.unsqueeze.default, aten.expand.default, aten.reshape.default, aten.view.default}


class LeanAttentionConfig(PassConfig):
    """schedule: auto | single | split | stream-k; splits: split count for ``split`` (auto or N ≥ 1);
    block_n: KV tile size (power of two ≥ 16); graphs: graphs to rewrite (``[]`` = identity)."""

    schedule: Literal["auto", "single", "split", "stream-k"] = "auto"
    splits: Literal["auto"] | int = "auto"
    block_n: int = 64
    graphs: list[str] = Field(default_factory=lambda: ["decode"])

    @field_validator("splits")
    @classmethod
    def _positive(cls, value):
        if value != "auto" and value < 1:
            raise ValueError("splits must be 'auto' or >= 1")
        return value

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

    def run(self, program: Program) -> PassResult:
        if not program.is_decoder:
            raise UnsupportedModelError(f"pass '{self.name}' needs a decoder program with a KV cache; "
                                        f"got a {program.info.kind}")
        rewritten = 0
        for name in self.config.graphs:
            if name not in program.graphs:
                raise UnsupportedModelError(f"pass '{self.name}': no graph '{name}' (graphs: {sorted(program.graphs)})")
            rewritten += self._rewrite(program, name)
        workers = device_workers(torch.device("cuda")) if torch.cuda.is_available() else REFERENCE_SMS
        stats = {"attention_sites": rewritten, **(self.plans(program, workers) if rewritten else {})}
        return PassResult(program, changed=rewritten > 0, stats=stats)

    def plans(self, program: Program, workers: int, batches: tuple[int, ...] = (1, 8, 32)) -> dict[str, str]:
        """The plan the GPU kernel uses at full cache length for each batch size, on ``workers`` SMs."""
        kv_heads, cache_len = int(program.cache.tensors[0].shape[1]), program.cache.max_len
        splits = -1 if self.config.splits == "auto" else self.config.splits
        return {f"plan batch {b}": cached_plan(b, kv_heads, cache_len, workers, self.config.schedule, splits,
                                              self.config.block_n).describe() for b in batches}

    def _rewrite(self, program: Program, graph: str) -> int:
        ep = program.graphs[graph]
        structure = recover_structure(ep, program.info.hidden_size, program.cache)
        start = user_inputs(ep)[1]
        by_name = {t.name: t for t in program.cache.tensors}
        count = 0
        for block in structure.blocks:
            site = block.attention
            attn = site.attention
            if attn.target is SPLIT_KV_ATTENTION.overload:
                continue
            where = f"{graph} graph, block {block.index} ({site.scope})"
            caches = {by_name[n].role: w for n, w in site.cache_writes.items()}
            if set(caches) != {"k", "v"}:
                raise UnsupportedModelError(f"{where}: expected one k and one v cache write, found {sorted(caches)}")
            q, k, v, scale = _sdpa_operands(attn, start, where)
            for role, expanded in (("k", k), ("v", v)):
                if _unexpanded(expanded) is not caches[role]:
                    raise UnsupportedModelError(f"{where}: attention {role} is not the {role} cache write "
                                                "(up to repeat_kv)")
            count += 1
            _replace(ep, attn, (q, caches["k"], caches["v"], start, scale, self.config.schedule,
                                -1 if self.config.splits == "auto" else self.config.splits, self.config.block_n))
        if count:
            ep.graph.eliminate_dead_code()
            program.graphs[graph] = refresh(ep)
        return count


def _sdpa_operands(attn: Node, start: Node, where: str) -> tuple[Node, Node, Node, float]:
    """(q, k, v, scale) of a decode SDPA whose mask is the capture's ``slots <= start + i`` mask."""
    if attn.target is not aten.scaled_dot_product_attention.default:
        raise UnsupportedModelError(f"{where}: attention op {attn.target} is not scaled_dot_product_attention")
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    args = dict(zip(names, attn.args)) | dict(attn.kwargs)
    if args.get("dropout_p", 0.0) != 0.0 or args.get("is_causal", False):
        raise UnsupportedModelError(f"{where}: attention with dropout or is_causal is not a cache-decode attention")
    mask = skip_aliases(args.get("attn_mask"))
    if not isinstance(mask, Node) or mask.target is not aten.le.Tensor or start not in _ancestors(mask):
        raise UnsupportedModelError(f"{where}: attention mask is not the capture's causal cache mask "
                                    "(slots <= start + i)")
    q = args["query"]
    scale = args.get("scale")
    return q, args["key"], args["value"], 1.0 / math.sqrt(fake_value(q).shape[-1]) if scale is None else scale


def _unexpanded(node: Node) -> Node:
    """Look back through ``repeat_kv`` (unsqueeze / expand / reshape) and no-op aliases."""
    node = skip_aliases(node)
    while isinstance(node, Node) and node.op == "call_function" and node.target in _REPEAT_KV:
        node = skip_aliases(node.args[0])
    return node


def _ancestors(node: Node) -> set[Node]:
    seen, stack = set(), [node]
    while stack:
        for parent in stack.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def _replace(ep: ExportedProgram, attn: Node, args: tuple) -> None:
    """Insert ``split_kv_attention(*args)[0]`` in place of ``attn`` with fake values and module stack."""
    fake_args = tuple(fake_value(a) if isinstance(a, Node) else a for a in args)
    with fake_value(args[0]).fake_mode:
        out_val, lse_val = SPLIT_KV_ATTENTION.overload(*fake_args)
    graph = ep.graph
    with graph.inserting_before(attn):
        call = graph.call_function(SPLIT_KV_ATTENTION.overload, args)
        out = graph.call_function(operator.getitem, (call, 0))
    for node, val in ((call, (out_val, lse_val)), (out, out_val)):
        node.meta.update({k: attn.meta[k] for k in ("nn_module_stack", "stack_trace") if k in attn.meta})
        node.meta["val"] = val
    attn.replace_all_uses_with(out)
    graph.erase_node(attn)
