"""Cache I/O surgery: rewrite a graph's cache inputs and outputs from one set of cache tensors to another.

A decoder graph takes ``(input_ids, start, *caches)`` and returns ``(*outputs, *caches)``
with the caches its role names, in layout order (``Program.cache_tensors``). A pass that changes the cache (quantizing a layer's k/v, dropping a skipped
layer's k/v) opens the graph's cache I/O, adds placeholders for the new tensors and names
the node that writes each one, and closes it against the new layout: outputs are put in
the new order (an unchanged tensor keeps its old writer), placeholders of tensors the new
layout no longer has are removed (a batch size read off one, ``sym_size(cache, 0)``, is read
off a remaining user input instead), and the signature is rebuilt. Exact: nodes the pass
did not touch are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch.export import ExportedProgram
from torch.fx import Node

from inferpass.errors import UnsupportedModelError
from inferpass.ir.graph_utils import eliminate_dead_code, fake_value, output_values, refresh, set_user_io, user_inputs
from inferpass.ir.program import DECODER_INPUTS, CacheTensor, Program


@dataclass
class CacheIO:
    """One graph's cache placeholders and written values by tensor name, open for editing."""

    ep: ExportedProgram
    graph: str
    inputs: dict[str, Node]
    writes: dict[str, Node]
    fixed_inputs: list[Node]
    leading_outputs: list[Node]
    added: dict[str, Node] = field(default_factory=dict)

    @property
    def start(self) -> Node:
        """The ``start`` input (positions already in each row's cache)."""
        return self.fixed_inputs[1]

    def add_input(self, tensor: CacheTensor) -> Node:
        """A new cache placeholder for ``tensor``, batch-sized like the graph's ``input_ids`` (put in calling
        order by ``close``)."""
        with self.ep.graph.inserting_before(next(n for n in self.ep.graph.nodes if n.op != "placeholder")):
            node = self.ep.graph.placeholder(tensor.name)
        ids = fake_value(self.fixed_inputs[0])
        with ids.fake_mode:
            node.meta["val"] = torch.empty((ids.shape[0], *tensor.shape[1:]), dtype=tensor.torch_dtype())
        self.added[tensor.name] = node
        return node

    def write(self, name: str, value: Node) -> None:
        """Make ``value`` the graph's output for cache tensor ``name``."""
        self.writes[name] = value

    def close(self, tensors: Sequence[CacheTensor]) -> ExportedProgram:
        """The graph taking and returning the cache ``tensors`` (in that order); raises ``UnsupportedModelError``
        if a removed cache is still read (other than for its batch size) or one of ``tensors`` has no input or
        writer."""
        graph = self.ep.graph
        names = [t.name for t in tensors]
        placeholders = {**self.inputs, **self.added}
        missing = [n for n in names if n not in placeholders or n not in self.writes]
        if missing:
            raise UnsupportedModelError(f"{self.graph} graph: cache tensors {missing} have no input or no writer")
        output = next(n for n in reversed(graph.nodes) if n.op == "output")
        output.args = ((*self.leading_outputs, *(self.writes[n] for n in names)),)
        eliminate_dead_code(graph)
        batch_source = self.fixed_inputs[0]
        for name, node in placeholders.items():
            if name in names:
                continue
            for user in list(node.users):
                if user.target is not torch.ops.aten.sym_size.int or user.args[1] != 0:
                    raise UnsupportedModelError(f"{self.graph} graph: removed cache {name} is still read by "
                                                f"{user.format_node()}")
                user.replace_input_with(node, batch_source)
            graph.erase_node(node)
        self._order_placeholders(names, placeholders)
        return refresh(set_user_io(self.ep))

    def _order_placeholders(self, names: list[str], placeholders: dict[str, Node]) -> None:
        """Put the user inputs in calling order: fixed inputs, then caches in layout order, after all state."""
        graph = self.ep.graph
        anchor = next(n for n in graph.nodes if n.op != "placeholder")
        for node in (*self.fixed_inputs, *(placeholders[n] for n in names)):
            anchor.prepend(node)


def open_cache_io(program: Program, graph: str) -> CacheIO:
    """Open the cache I/O of ``program.graphs[graph]`` (edited in place), a decoder graph whose caches and
    leading outputs are those its role declares."""
    ep, tensors = program.graphs[graph], program.cache_tensors(graph)
    inputs = user_inputs(ep)
    fixed, leading = len(DECODER_INPUTS), len(program.roles[graph].outputs)
    outputs = output_values(ep)
    caches, written = inputs[fixed:], outputs[leading:]
    if len(caches) != len(tensors) or len(written) != len(tensors):
        raise UnsupportedModelError(f"{graph} graph: {len(caches)} cache inputs / {len(outputs)} outputs do not "
                                    f"match its role's {len(tensors)} cache tensors and {leading} outputs")
    names = [t.name for t in tensors]
    return CacheIO(ep=ep, graph=graph, inputs=dict(zip(names, caches)), writes=dict(zip(names, written)),
                   fixed_inputs=inputs[:fixed], leading_outputs=outputs[:leading])
