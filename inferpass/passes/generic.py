"""Generic exact cleanups every pipeline can use: dead-code elimination, CSE, unused-weight removal."""

from __future__ import annotations

from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind
from torch.fx.node import map_arg

from inferpass.ir.graph_utils import eliminate_dead_code, refresh
from inferpass.ir.program import Program
from inferpass.ir.purity import is_deterministic
from inferpass.passes.base import GraphSelection, Pass, PassResult, register_pass, select_graphs


class _PerGraphPass(Pass):
    """Apply ``rewrite`` to each selected graph; the counts it returns are summed into the stats."""

    Config = GraphSelection
    exact = True
    stat_name = "changes"

    def rewrite(self, ep: ExportedProgram) -> tuple[ExportedProgram, int]:
        raise NotImplementedError

    def run(self, program: Program) -> PassResult:
        total = 0
        for name in select_graphs(program, self.config.graphs, self.name):
            program.graphs[name], count = self.rewrite(program.graphs[name])
            total += count
        return PassResult(program, changed=total > 0, stats={self.stat_name: total})


@register_pass
class DeadCodeElimination(_PerGraphPass):
    """Remove unused nodes whose ops are pure by mutation (``ir.purity``), so unused SDPA goes too.

    Source: classic DCE; fixes torch.fx's default, which keeps ``nondeterministic_seeded`` ops.
    Exact: only values nothing reads are removed.
    """

    name = "dce"
    stat_name = "nodes_removed"

    def rewrite(self, ep):
        removed = eliminate_dead_code(ep.graph, checks=False)
        return (refresh(ep) if removed else ep), removed


@register_pass
class CommonSubexpressionElimination(_PerGraphPass):
    """Merge nodes that apply the same deterministic pure op to the same arguments.

    Source: classic CSE (value numbering over the topologically ordered graph).
    Exact: merged nodes compute bit-identical values.
    """

    name = "cse"
    stat_name = "nodes_merged"

    def rewrite(self, ep):
        seen, merged = {}, 0
        for node in list(ep.graph.nodes):
            if node.op != "call_function" or not is_deterministic(node):
                continue
            try:
                key = (node.target, _freeze(node.args), _freeze(node.kwargs))
                hash(key)
            except TypeError:
                continue
            if key in seen:
                node.replace_all_uses_with(seen[key])
                ep.graph.erase_node(node)
                merged += 1
            else:
                seen[key] = node
        return (refresh(ep) if merged else ep), merged


def _freeze(value):
    value = map_arg(value, lambda n: ("node", n.name))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, float):
        return (float, repr(value))  # keeps 0.0 and -0.0 apart
    return value


@register_pass
class DropUnusedParameters(_PerGraphPass):
    """Remove parameters, buffers and constants no node reads (from the graph, signature and state dict).

    Source: standard weight pruning after graph surgery. Exact: unread weights cannot affect outputs.
    """

    name = "drop-unused-params"
    stat_name = "weights_removed"

    def rewrite(self, ep):
        user_names = {s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT}
        dead = [n for n in ep.graph.nodes if n.op == "placeholder" and not n.users and n.name not in user_names]
        for node in dead:
            ep.graph.erase_node(node)
        return (refresh(ep) if dead else ep), len(dead)
