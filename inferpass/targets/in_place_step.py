"""A graph as one flat step function that writes its caches in place, for compilers that keep cache memory.

``in_place_step(ep, inputs, caches, triton=..., device=..., kernels=...)`` returns, for the shapes of ``inputs``,
a module: ``module(*weights, *inputs)`` computes the graph with its weights, buffers and constants
as leading arguments (like ``static_shapes.static_export``, nothing baked in) and:

* every op of ours is replaced by its Triton op where one of our kernels takes it
  (``cuda_kernels.triton_replacement``, when ``triton``); with ``kernels`` an op with a kernel
  for ``device``'s type stays a call of that kernel (for Inductor, which calls it: on a CPU,
  attention over the valid cache prefix only, where the reference reads and masks the whole
  cache); every other op of ours is decomposed to its aten reference;
* every ``scatter(x, dim, index, src)`` — how captured graphs write a cache — becomes the
  equivalent ``index_put`` with an index per dim: Inductor turns an ``index_put`` of a graph input
  that is copied back into that input into an in-place write of the new slots only, where a
  scatter would copy the whole cache;
* ops that create tensors on a fixed device (capture records ``arange(..., device=cpu)``) create
  them on ``device``, and views become reshapes (a view may assume the capture device's layouts);
* the last ``caches`` user inputs are caches and the last ``caches`` outputs their written
  versions: the module copies each written cache into its input (``copy_``) and returns only
  the other outputs. Compiled, a decode step then touches only the slots it writes.

Exact: the graph's arithmetic; only where the written caches live changes.
"""

from __future__ import annotations

import torch
from torch.fx import Graph, GraphModule, Node

from inferpass.ir.ops import reference_decompositions
from inferpass.kernels.cuda_kernels import triton_replacement
from inferpass.targets.static_shapes import static_export

aten = torch.ops.aten


def _use_triton_ops(graph: Graph) -> None:
    for node in graph.nodes:
        if node.op == "call_function" and (op := triton_replacement(node)) is not None:
            node.target = op


def _scatter_as_index_put(graph: Graph, node: Node) -> None:
    """Replace ``scatter(x, dim, index, src)`` by ``index_put(x, [i_0, .., index, .., i_n], src)``, ``i_d`` an
    arange along dim ``d`` shaped to broadcast against ``index``: the same writes, element for element."""
    x, dim, index, src = node.args
    rank = index.meta["val"].dim()
    dim %= rank
    with graph.inserting_before(node):
        indices = []
        for d in range(rank):
            if d == dim:
                indices.append(index)
                continue
            size = graph.call_function(aten.sym_size.int, (index, d))
            steps = graph.call_function(aten.arange.default, (size,),
                                        {"dtype": torch.long, "device": index.meta["val"].device})
            indices.append(graph.call_function(aten.view.default, (steps, [-1 if i == d else 1 for i in range(rank)])))
        write = graph.call_function(aten.index_put.default, (x, indices, src))
    write.meta.update(node.meta)
    node.replace_all_uses_with(write)
    graph.erase_node(node)


def _write_caches_in_place(graph: Graph, caches: int) -> None:
    if not caches:
        return
    inputs = [n for n in graph.nodes if n.op == "placeholder"][-caches:]
    output = graph.output_node()
    results = list(output.args[0])
    with graph.inserting_before(output):
        for cache, written in zip(inputs, results[-caches:]):
            if written is not cache:
                graph.call_function(aten.copy_.default, (cache, written))
    output.args = (tuple(results[:-caches]),)


def _views_as_reshapes(graph: Graph) -> None:
    """``view`` -> ``reshape``: a view recorded on the capture device may assume a layout that another device's
    kernel does not produce (SDPA's output is transposed-contiguous on CPU, contiguous from the math kernel);
    ``reshape`` is a view wherever the layout allows one and a copy elsewhere. Safe in a functional graph."""
    for node in graph.nodes:
        if node.op == "call_function" and node.target is aten.view.default:
            node.target = aten.reshape.default


def _place_on(graph: Graph, device: torch.device) -> None:
    """Point every op that creates a tensor on a fixed device (``arange(..., device=cpu)`` recorded by capture)
    at ``device``."""
    for node in graph.nodes:
        where = node.kwargs.get("device") if node.op == "call_function" else None
        if isinstance(where, torch.device) and where != device:
            node.kwargs = {**node.kwargs, "device": device}


def in_place_step(ep: torch.export.ExportedProgram, inputs: tuple[torch.Tensor, ...], caches: int, *,
                  triton: bool, device: torch.device, kernels: bool = False) -> GraphModule:
    """``ep`` as a module for ``device`` at the shapes of ``inputs`` (its user inputs; see module doc):
    ``module(*weights, *inputs)``, ``weights`` the tensors of ``static_shapes.lifted_inputs(ep)``, returns the
    graph's outputs but the last ``caches``, which it writes into the last ``caches`` inputs instead."""
    examples = tuple(torch.empty(t.shape, dtype=t.dtype) for t in inputs)  # host stand-ins: pages never touched
    static = static_export(ep, examples, "cuda")
    if triton:
        _use_triton_ops(static.graph_module.graph)
        static.graph_module.recompile()
    with torch.no_grad():
        static = static.run_decompositions(reference_decompositions(device.type if kernels else None))
    module = static.graph_module
    graph = module.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is aten.scatter.src:
            _scatter_as_index_put(graph, node)
    _write_caches_in_place(graph, caches)
    _views_as_reshapes(graph)
    _place_on(graph, device)
    graph.lint()
    module.recompile()
    return module
