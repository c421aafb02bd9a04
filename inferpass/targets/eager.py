"""The eager target: run each exported graph with PyTorch eager kernels. The reference for every other target.

``run`` is functional, like the graphs. ``step`` (for a caller that hands over its caches, the
engine) runs a copy of the graph in which every scatter that writes a cache input is done in
place (``scatter_``), so a decode step writes its new positions only and returns the cache
inputs themselves; a cache written any other way (the kv-quant append) stays functional. A step's
inputs are the runtime's own (its pool's rows, its ids), so it skips the input-constraint check
that ``run`` keeps (2 ms a call on a graph a pass rebuilt, which torch no longer checks inline).
Exact: the same arithmetic; only where the written caches live changes.

It never imports Triton: our ops run their CPU kernels, and on CUDA tensors their aten references unless
``inferpass.kernels.cuda_kernels`` (the ops' Triton kernels) has been imported.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from inferpass.ir.program import Program
from inferpass.targets.base import Executable, Target, register_target

_IN_PLACE = {torch.ops.aten.scatter.src: torch.ops.aten.scatter_.src,
             torch.ops.aten.index_put.default: torch.ops.aten.index_put_.default}


def _reads_before(user: Node, write: Node, order: dict[Node, int]) -> bool:
    """``user`` of a cache runs before ``write`` (``order``: node positions) and keeps no view of it (so writing
    the cache after is safe)."""
    aliases = isinstance(user.target, torch._ops.OpOverload) and any(
        r.alias_info is not None for r in user.target._schema.returns)
    return order[user] < order[write] and not aliases


def write_caches_in_place(module: GraphModule, caches: int) -> GraphModule:
    """``module`` with each functional scatter into one of its last ``caches`` inputs made in place, where
    nothing reads that input after the write (see module doc)."""
    placeholders = [n for n in module.graph.nodes if n.op == "placeholder"][-caches:] if caches else []
    order = {n: i for i, n in enumerate(module.graph.nodes)}
    for cache in placeholders:
        writes = [u for u in cache.users if u.target in _IN_PLACE and u.args[0] is cache]
        if len(writes) == 1 and all(u is writes[0] or _reads_before(u, writes[0], order) for u in cache.users):
            writes[0].target = _IN_PLACE[writes[0].target]
    module.recompile()
    return module


class EagerExecutable(Executable):
    def __init__(self, program: Program):
        super().__init__(program)
        self.modules = {name: ep.module() for name, ep in program.graphs.items()}
        self.in_place: dict[str, GraphModule] = {}

    def run(self, graph, *inputs):
        return self._call(self.modules[graph], inputs)

    def step(self, graph, *inputs):
        if graph not in self.in_place:
            caches = len(self.program.cache_tensors(graph))
            module = write_caches_in_place(self.program.graphs[graph].module(), caches)
            module.validate_inputs = False  # the runtime's own tensors: skip the per-call shape-constraint check
            self.in_place[graph] = module
        return self._call(self.in_place[graph], inputs)

    @staticmethod
    def _call(module: GraphModule, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            out = module(*inputs)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)


@register_target
class EagerTarget(Target):
    """Runs the graphs as captured (plus passes) with eager PyTorch; exact reference semantics."""

    name = "eager"

    def compile(self, program):
        return EagerExecutable(program)
