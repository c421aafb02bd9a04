"""Probes: run an exported graph eagerly and read intermediate values (hidden states between blocks).

Calibration (``passes.block_influence``) asks for "block 3's input and output" by node; this runs
the graph node by node (``torch.fx.Interpreter`` over ``ep.module()``, made once per graph, whose nodes keep the
exported graph's names) and keeps the values of the named nodes. Exact: the same ops on the same inputs.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.export import ExportedProgram
from torch.fx import Interpreter, Node


_MODULES: "weakref.WeakKeyDictionary[ExportedProgram, tuple[str, torch.fx.GraphModule]]" = weakref.WeakKeyDictionary()


class _Recorder(Interpreter):
    def __init__(self, module: torch.fx.GraphModule, names: set[str]):
        super().__init__(module)
        self.names, self.values = names, {}

    def run_node(self, node: Node):
        value = super().run_node(node)
        if node.name in self.names:
            self.values[node.name] = value
        return value


def probe(ep: ExportedProgram, nodes: Iterable[Node], *inputs: torch.Tensor) -> tuple[tuple, dict[str, torch.Tensor]]:
    """Run ``ep`` on its user ``inputs``; its flat outputs and the value of each of ``nodes`` (nodes of
    ``ep.graph``) by node name. Raises ``KeyError`` naming a node the graph does not compute."""
    code, (made_for, module) = ep.graph_module.code, _MODULES.get(ep, (None, None))
    if made_for != code:  # first use, or the graph was edited since
        module = ep.module()
        _MODULES[ep] = (code, module)
    names = {n.name for n in nodes}
    missing = names - {n.name for n in module.graph.nodes}
    if missing:
        raise KeyError(f"nodes {sorted(missing)} are not in the graph")
    with torch.no_grad():
        if not names:
            return tuple(module(*inputs)), {}
        recorder = _Recorder(module, names)
        outputs = recorder.run(*inputs)
    return tuple(outputs), recorder.values
