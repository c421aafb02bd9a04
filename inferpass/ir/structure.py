"""Structure recovery: map an exported graph back to embedding, blocks, attention sites, MLPs and head.

Passes ask ``recover_structure(ep)`` for "block 3's attention" instead of scanning
nodes. Recovery reads ``nn_module_stack`` for scopes (which nodes belong to which
module) and checks patterns inside each scope (projections feed the attention op,
residual adds join the block input), looking through no-op alias nodes. Anything
it cannot recognize raises ``UnsupportedModelError`` naming the block and module.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch.export import ExportedProgram
from torch.fx import Node

from inferpass.errors import UnsupportedModelError
from inferpass.ir.graph_utils import (
    LINEAR_TARGETS,
    ancestors,
    fake_value,
    in_scope,
    module_scopes,
    output_values,
    skip_aliases,
)
from inferpass.ir.ops import attention_targets
from inferpass.ir.program import CacheTensor, Program

aten = torch.ops.aten
_LAYER_INDEX = re.compile(r"(.+)\.(\d+)")
_MLP_CLASS = re.compile(r"MLP|FeedForward|Intermediate|Output$")
_NORM_CLASS = re.compile(r"Norm")
_VIEW_TARGETS = {
    aten.unsqueeze.default, aten.view.default, aten.reshape.default, aten.expand.default,
    aten.slice.Tensor, aten.to.dtype, aten.alias.default, aten.transpose.int,
}
_POST_NORM_TARGETS = {aten.layer_norm.default, aten.native_layer_norm.default}


@dataclass
class AttentionSite:
    """One block's attention: projections, rotary multiplies, cache writes, the attention op, output projection.

    ``q_proj``, ``k_proj`` and ``v_proj`` are the same node for fused-QKV models (GPT-2).
    ``cache_writes`` maps cache-tensor name -> the node producing its written value.
    """

    block: int
    scope: str
    q_proj: Node
    k_proj: Node
    v_proj: Node
    rotary: list[Node]
    attention: Node
    o_proj: Node
    cache_writes: dict[str, Node] = field(default_factory=dict)

    @property
    def fused_qkv(self) -> bool:
        return self.q_proj is self.k_proj is self.v_proj


@dataclass
class MLPSite:
    """One block's feed-forward network: its module scopes, nodes and the node leaving it."""

    scopes: list[str]
    nodes: list[Node]
    output: Node


@dataclass
class BlockSite:
    """One transformer block. ``index`` is the original layer number (kept after layers are removed);
    ``attention`` / ``mlp`` are None where the block has none (e.g. ``layer-skip`` dropped it)."""

    index: int
    scope: str
    input: Node
    output: Node
    attention: AttentionSite | None
    mlp: MLPSite | None
    residual_adds: list[Node]
    nodes: list[Node]
    residual_streams: list[Node] = field(default_factory=list)

    def residual_branch(self, branch: str, where: str) -> tuple[Node, Node]:
        """``(add, stream)`` of ``branch`` (``attention`` or ``mlp``): the residual add that joins the branch
        to the stream, and its operand that is the stream. Raises ``UnsupportedModelError`` naming ``where``
        unless there is one add per branch present (parallel-residual blocks have fewer)."""
        present = [b for b in ("attention", "mlp") if getattr(self, b) is not None]
        if len(self.residual_adds) != len(present) or branch not in present:
            raise UnsupportedModelError(f"{where}: expected one residual add per branch ({', '.join(present)}), "
                                        f"found {len(self.residual_adds)} (parallel-residual blocks are not "
                                        "supported)")
        index = present.index(branch)
        return self.residual_adds[index], self.residual_streams[index]


@dataclass
class ModelStructure:
    """The recovered structure of one graph."""

    embedding: list[Node]
    blocks: list[BlockSite]
    final_norm: list[Node]
    head: Node

    def block(self, index: int) -> BlockSite:
        """The block with original layer number ``index``."""
        for b in self.blocks:
            if b.index == index:
                return b
        raise KeyError(f"no block {index}; blocks present: {[b.index for b in self.blocks]}")


def _find_block_container(nodes: list[Node]) -> tuple[str, dict[int, str]]:
    containers: dict[str, dict[int, str]] = {}
    for n in nodes:
        for path, cls in module_scopes(n):
            m = _LAYER_INDEX.fullmatch(path)
            if m:
                containers.setdefault(m.group(1), {})[int(m.group(2))] = cls
    uniform = {c: idx for c, idx in containers.items() if len(set(idx.values())) == 1}
    if not uniform:
        raise UnsupportedModelError(
            "no repeated transformer blocks found: expected a ModuleList of identical layers "
            "(e.g. model.layers.N, transformer.h.N, encoder.layer.N) in nn_module_stack"
        )
    container = min(uniform, key=lambda c: (c.count("."), len(c)))
    return container, uniform[container]


def _direct_children(block_nodes: list[Node], block_path: str) -> dict[str, str]:
    children: dict[str, str] = {}
    for n in block_nodes:
        scopes = module_scopes(n)
        for i, (path, _) in enumerate(scopes):
            if path == block_path and i + 1 < len(scopes):
                children.setdefault(*scopes[i + 1])
    return children


def _search(start: Node, scope: str, want, forward: bool) -> Node | None:
    """Breadth-first search from ``start`` inside ``scope`` for the first node satisfying ``want``."""
    queue, seen = deque([start]), {start}
    while queue:
        node = queue.popleft()
        if node is not start and want(node):
            return node
        nexts = list(node.users) if forward else [a for a in node.all_input_nodes]
        for nxt in nexts:
            if nxt not in seen and nxt.op == "call_function" and in_scope(nxt, scope):
                seen.add(nxt)
                queue.append(nxt)
    return None


def _is_linear(node: Node) -> bool:
    return node.op == "call_function" and node.target in LINEAR_TARGETS


def _from_outside(node: Node, block_path: str) -> bool:
    """True when ``node`` is, up to view/alias ops, a value computed outside the block (e.g. rotary cos/sin)."""
    while node.op == "call_function" and in_scope(node, block_path) and node.target in _VIEW_TARGETS:
        node = node.args[0]
    return node.op == "call_function" and not in_scope(node, block_path)


def _attention_site(block_index: int, block_path: str, attn_path: str, block_nodes: list[Node]) -> AttentionSite:
    targets = attention_targets()
    ops = [n for n in block_nodes if n.target in targets and in_scope(n, attn_path)]
    where = f"block {block_index} ({block_path})"
    if len(ops) != 1:
        raise UnsupportedModelError(
            f"{where}: expected exactly one attention op in {attn_path}, found {len(ops)}; "
            "capture with attn_implementation='sdpa' or insert a registered attention op"
        )
    op = ops[0]
    q_arg, k_arg, v_arg = (skip_aliases(a) for a in op.args[:3])
    projs = []
    for role, arg in (("query", q_arg), ("key", k_arg), ("value", v_arg)):
        proj = arg if _is_linear(arg) else _search(arg, attn_path, _is_linear, forward=False)
        if proj is None:
            raise UnsupportedModelError(f"{where}: no linear projection feeds the attention {role}")
        projs.append(proj)
    o_proj = _search(op, attn_path, _is_linear, forward=True)
    if o_proj is None:
        raise UnsupportedModelError(f"{where}: no output projection follows the attention op in {attn_path}")
    rotary = [
        n
        for n in block_nodes
        if n.target == aten.mul.Tensor
        and in_scope(n, attn_path)
        and any(_from_outside(a, block_path) for a in n.args if isinstance(a, Node))
    ]
    return AttentionSite(block_index, attn_path, projs[0], projs[1], projs[2], rotary, op, o_proj)


def _hidden_like(node: Node, ref) -> bool:
    val = fake_value(node)
    return (
        isinstance(val, torch.Tensor)
        and val.dtype == ref.dtype
        and val.dim() == ref.dim()
        and str(val.shape[-1]) == str(ref.shape[-1])
    )


def _block_io(index: int, path: str, nodes: list[Node], hidden_size: int) -> tuple[Node, Node]:
    members = set(nodes)
    outs = []
    for n in nodes:
        val = fake_value(n)
        if (
            isinstance(val, torch.Tensor)
            and val.is_floating_point()
            and val.dim() == 3
            and val.shape[-1] == hidden_size
            and any(u not in members for u in n.users)
        ):
            outs.append(n)
    if len(outs) != 1:
        raise UnsupportedModelError(
            f"block {index} ({path}): expected one hidden-state output of width {hidden_size}, "
            f"found {[o.name for o in outs]}"
        )
    out = outs[0]
    ref = fake_value(out)
    ins = []
    for n in nodes:
        for a in n.all_input_nodes:
            src = skip_aliases(a)
            if src in members or src in ins or not _hidden_like(src, ref):
                continue
            if any("rotary" in p or "position" in p for p, _ in module_scopes(src)):
                continue
            ins.append(src)
    if len(ins) != 1:
        raise UnsupportedModelError(
            f"block {index} ({path}): expected one hidden-state input, found {[i.name for i in ins]}"
        )
    return ins[0], out


def _residual_adds(block_input: Node, nodes: list[Node]) -> tuple[list[Node], list[Node]]:
    """The block's residual adds in order, and the operand of each that is the residual stream (the
    block input, an earlier add, or a post-norm of one)."""
    stream, adds, streams = {block_input}, [], []
    for n in nodes:
        args = [a for a in n.args if isinstance(a, Node)]
        operands = [skip_aliases(a) for a in args]
        if n.target == aten.add.Tensor and len(operands) == 2 and sum(o in stream for o in operands) == 1:
            adds.append(n)
            streams.append(next(a for a, o in zip(args, operands) if o in stream))
            stream.add(n)
        elif n.target in _POST_NORM_TARGETS and operands and operands[0] in adds:
            stream.add(n)
    return adds, streams


def _ancestor_ops(node: Node, stop: set[Node]) -> list[Node]:
    """The call_function nodes ``node`` depends on (not past ``stop``), in graph order."""
    found = ancestors(node, stop)
    return [n for n in node.graph.nodes if n in found and n.op == "call_function"]


def graph_structure(program: Program, graph: str) -> ModelStructure:
    """``recover_structure`` of one of ``program``'s graphs, with its cache outputs labelled per its role."""
    role = program.roles[graph]
    return recover_structure(program.graphs[graph], program.info.hidden_size, program.cache_tensors(graph),
                             leading_outputs=len(role.outputs))


def recover_structure(ep: ExportedProgram, hidden_size: int, cache: Sequence[CacheTensor] = (),
                      leading_outputs: int = 1) -> ModelStructure:
    """Recover the model structure of ``ep``.

    ``hidden_size`` is the residual-stream width; ``cache`` (decoder graphs: the cache tensors
    the graph returns after its ``leading_outputs``, logits first) labels each cache output
    with the block that writes it. Raises ``UnsupportedModelError`` naming what was not
    recognized.
    """
    nodes = [n for n in ep.graph.nodes if n.op == "call_function"]
    container, classes = _find_block_container(nodes)
    blocks: list[BlockSite] = []
    for index in sorted(classes):
        path = f"{container}.{index}"
        block_nodes = [n for n in nodes if in_scope(n, path)]
        children = _direct_children(block_nodes, path)
        attn = [p for p, cls in children.items() if "Attention" in cls]
        if len(attn) > 1:
            raise UnsupportedModelError(
                f"block {index} ({path}, {classes[index]}): no single attention submodule among "
                f"{sorted(f'{p} ({c})' for p, c in children.items())}"
            )
        site = _attention_site(index, path, attn[0], block_nodes) if attn else None
        mlp_scopes = [p for p, cls in children.items() if _MLP_CLASS.search(cls) and p not in attn]
        mlp = None
        if mlp_scopes:
            mlp_nodes = [n for n in block_nodes if any(in_scope(n, s) for s in mlp_scopes)]
            members = set(mlp_nodes)
            leaving = [n for n in mlp_nodes if any(u not in members for u in n.users)]
            mlp = MLPSite(mlp_scopes, mlp_nodes, leaving[-1])
        block_in, block_out = _block_io(index, path, block_nodes, hidden_size)
        adds, streams = _residual_adds(block_in, block_nodes)
        blocks.append(BlockSite(index, path, block_in, block_out, site, mlp, adds, block_nodes, streams))

    outputs = output_values(ep)
    head = skip_aliases(outputs[0])
    if cache:
        by_index = {b.index: b for b in blocks}
        for spec, value in zip(cache, outputs[leading_outputs:]):
            block = by_index.get(spec.layer)
            writer = skip_aliases(value)
            if block is None or block.attention is None or writer not in set(block.nodes):
                raise UnsupportedModelError(
                    f"cache tensor {spec.name} (layer {spec.layer}) is not written inside block {spec.layer}"
                )
            block.attention.cache_writes[spec.name] = writer
    in_blocks = {n for b in blocks for n in b.nodes}
    embedding = [n for n in _ancestor_ops(blocks[0].input, set()) if n not in in_blocks] + [blocks[0].input]
    tail = _ancestor_ops(head, {blocks[-1].output})
    final_norm = [n for n in tail if n not in in_blocks and any(_NORM_CLASS.search(c) for _, c in module_scopes(n))]
    return ModelStructure(embedding, blocks, final_norm, head)
