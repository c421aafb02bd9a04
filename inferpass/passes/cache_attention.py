"""Recognize a block's cache attention in a captured decoder graph, for passes that replace it.

A captured block writes its new keys and values into the functional cache
(``scatter(cache, 2, index, new)``) and attends with
``scaled_dot_product_attention(q, repeat_kv(k_written), repeat_kv(v_written), mask)``
where the mask is the capture's ``slots <= start + i``. ``cache_attention`` checks
that pattern and returns its parts, or raises ``UnsupportedModelError`` naming the
block and what did not match.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch.fx import Node

from inferpass.errors import UnsupportedModelError
from inferpass.ir.graph_utils import ancestors, fake_value, skip_aliases
from inferpass.ir.program import Program
from inferpass.ir.structure import BlockSite

aten = torch.ops.aten
_REPEAT_KV = {aten.unsqueeze.default, aten.expand.default, aten.reshape.default, aten.view.default}


@dataclass
class CacheAttention:
    """One block's cache attention: the SDPA node, its query, the k/v cache writes and inputs, the scale."""

    attention: Node
    query: Node
    writes: dict[str, Node]  # role ("k", "v") -> the scatter writing the cache
    caches: dict[str, Node]  # role -> the cache placeholder it writes into
    new: dict[str, Node]  # role -> the new tokens' values [B, H_kv, S, D]
    scale: float


def cache_attention(program: Program, block: BlockSite, start: Node, where: str) -> CacheAttention:
    """The parts of ``block``'s cache attention (see module doc); ``start`` is the graph's start input."""
    site = block.attention
    attn = site.attention
    by_name = {t.name: t for t in program.cache.tensors}
    writes = {by_name[n].role: w for n, w in site.cache_writes.items()}
    if set(writes) != {"k", "v"}:
        raise UnsupportedModelError(f"{where}: expected one k and one v cache write, found {sorted(writes)}")
    if attn.target is not aten.scaled_dot_product_attention.default:
        raise UnsupportedModelError(f"{where}: attention op {attn.target} is not scaled_dot_product_attention")
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    args = dict(zip(names, attn.args)) | dict(attn.kwargs)
    if args.get("dropout_p", 0.0) != 0.0 or args.get("is_causal", False):
        raise UnsupportedModelError(f"{where}: attention with dropout or is_causal is not a cache-decode attention")
    mask = skip_aliases(args.get("attn_mask"))
    if not isinstance(mask, Node) or mask.target is not aten.le.Tensor or start not in ancestors(mask):
        raise UnsupportedModelError(f"{where}: attention mask is not the capture's causal cache mask "
                                    "(slots <= start + i)")
    caches, new = {}, {}
    for role, operand in (("k", args["key"]), ("v", args["value"])):
        write = writes[role]
        if _unexpanded(operand) is not write:
            raise UnsupportedModelError(f"{where}: attention {role} is not the {role} cache write (up to repeat_kv)")
        if write.target is not aten.scatter.src or write.args[1] != 2 or write.args[0].op != "placeholder":
            raise UnsupportedModelError(f"{where}: the {role} cache write is not scatter(cache, 2, index, new)")
        caches[role], new[role] = write.args[0], write.args[3]
    q = args["query"]
    scale = args.get("scale")
    return CacheAttention(attn, q, writes, caches, new,
                          1.0 / math.sqrt(fake_value(q).shape[-1]) if scale is None else scale)


def _unexpanded(node: Node) -> Node:
    """Look back through ``repeat_kv`` (unsqueeze / expand / reshape) and no-op aliases."""
    node = skip_aliases(node)
    while isinstance(node, Node) and node.op == "call_function" and node.target in _REPEAT_KV:
        node = skip_aliases(node.args[0])
    return node


def insert_like(anchor: Node, target, args: tuple) -> Node:
    """Insert ``target(*args)`` before ``anchor`` with fake value computed from the args' fake values,
    and ``anchor``'s module stack (so structure recovery places it in the same block)."""
    fake_args = tuple([fake_value(x) for x in a] if isinstance(a, list) else fake_value(a) if isinstance(a, Node)
                      else a for a in args)
    tensors = [v for v in fake_args if isinstance(v, torch.Tensor)]
    with tensors[0].fake_mode if tensors else contextlib.nullcontext():
        val = target(*fake_args)
    with anchor.graph.inserting_before(anchor):
        node = anchor.graph.call_function(target, args)
    node.meta.update({k: anchor.meta[k] for k in ("nn_module_stack", "stack_trace") if k in anchor.meta})
    node.meta["val"] = val
    return node
