"""Purity by mutation: a node is pure when its op writes no argument and has no side effect.

torch.fx's default test keeps every op tagged ``nondeterministic_seeded`` — SDPA
among them (for its dropout), so default dead-code elimination never removes an
unused attention. Here only real effects count: mutated arguments (schema alias
info), known side-effecting functions (asserts, prints) and ops that return nothing.
Random ops are pure for dead-code elimination but never merged by CSE.
"""

from __future__ import annotations

import torch
from torch.fx import Node
from torch.fx.node import _side_effectful_functions

_OP_OVERLOAD = torch._ops.OpOverload


def _schema(node: Node):
    return node.target._schema if isinstance(node.target, _OP_OVERLOAD) else None


def is_pure(node: Node) -> bool:
    """True when removing ``node`` (if unused) cannot change any observable effect."""
    if node.op != "call_function":
        return node.op == "get_attr"
    if node.target in _side_effectful_functions:
        return False
    schema = _schema(node)
    if schema is None:
        return node.target.__module__ == "_operator"  # getitem and friends
    if not schema.returns:
        return False
    return not any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)


def is_deterministic(node: Node) -> bool:
    """True when two calls with equal arguments return equal values (safe to merge)."""
    if not is_pure(node):
        return False
    if node.target is torch.ops.aten.scaled_dot_product_attention.default:
        dropout = node.kwargs.get("dropout_p", node.args[4] if len(node.args) > 4 else 0.0)
        return dropout == 0.0
    target = node.target
    return not (isinstance(target, _OP_OVERLOAD) and torch.Tag.nondeterministic_seeded in target.tags)
