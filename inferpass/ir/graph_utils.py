"""Small, exact helpers over exported graphs: module scopes, alias look-through, signature refresh."""

from __future__ import annotations

import dataclasses

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind
from torch.fx import Node

from inferpass.ir.purity import is_pure

aten = torch.ops.aten

# Ops that return their input's value unchanged when dtype/device/shape do not change.
_ALIAS_TARGETS = {
    aten.alias.default,
    aten.to.dtype,
    aten.to.dtype_layout,
    aten.to.device,
    aten._to_copy.default,
    aten.clone.default,
    aten.detach.default,
    aten.contiguous.default,
}
LINEAR_TARGETS = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default}
WRAPPER_ATTR = "model"


def fake_value(node: Node):
    """The node's fake-tensor value (``meta['val']``), or None."""
    return node.meta.get("val") if isinstance(node, Node) else None


def is_noop_alias(node: Node) -> bool:
    """True for ``alias``/``to``/``clone``-like nodes whose output equals their input exactly."""
    if node.op != "call_function" or node.target not in _ALIAS_TARGETS or not node.args:
        return False
    src, out = fake_value(node.args[0]), fake_value(node)
    if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor):
        return False
    return src.dtype == out.dtype and src.device == out.device and src.shape == out.shape


def skip_aliases(node):
    """Follow no-op alias nodes back to the value they alias."""
    while isinstance(node, Node) and is_noop_alias(node):
        node = node.args[0]
    return node


def ancestors(node: Node, stop: frozenset[Node] | set[Node] = frozenset()) -> set[Node]:
    """Every node ``node`` depends on, without walking into or past the nodes in ``stop``."""
    seen, stack = set(), [node]
    while stack:
        for parent in stack.pop().all_input_nodes:
            if parent not in seen and parent not in stop:
                seen.add(parent)
                stack.append(parent)
    return seen


def module_scopes(node: Node) -> list[tuple[str, str]]:
    """The node's module stack as (path, class name), outermost first, wrapper prefix removed."""
    stack = node.meta.get("nn_module_stack") or {}
    scopes = []
    for path, type_name in stack.values():
        if not path or path == WRAPPER_ATTR:
            continue
        if path.startswith(WRAPPER_ATTR + "."):
            path = path[len(WRAPPER_ATTR) + 1 :]
        cls = type_name.rsplit(".", 1)[-1] if isinstance(type_name, str) else getattr(type_name, "__name__", "")
        scopes.append((path, cls))
    return scopes


def in_scope(node: Node, path: str) -> bool:
    """True when ``node`` was produced inside module ``path`` (or a submodule of it)."""
    return any(p == path for p, _ in module_scopes(node))


def user_inputs(ep: ExportedProgram) -> list[Node]:
    """Placeholders of the user inputs, in signature order."""
    names = [s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    by_name = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    return [by_name[n] for n in names]


def output_values(ep: ExportedProgram) -> list[Node]:
    """The graph's output values, in signature order."""
    out = next(n for n in reversed(ep.graph.nodes) if n.op == "output")
    return list(out.args[0])


def eliminate_dead_code(graph: torch.fx.Graph, *, checks: bool = True) -> int:
    """Remove every unread node whose op is pure by mutation (``ir.purity``: unlike fx's default, unused
    attention goes too) and, with ``checks``, the metadata checks (``aten._assert_tensor_metadata``) of
    values nothing else reads, so a bypassed block or branch goes entirely; the number of nodes removed.
    Exact: only unread values and checks on them go."""
    removed, changed = 0, True
    while changed:
        changed = False
        for node in reversed(list(graph.nodes)):
            check_only = checks and node.target is aten._assert_tensor_metadata.default and all(
                u.target is aten._assert_tensor_metadata.default for u in node.args[0].users)
            if node.op == "call_function" and (check_only or (not node.users and is_pure(node))):
                graph.erase_node(node)
                removed, changed = removed + 1, True
    return removed


def refresh(ep: ExportedProgram) -> ExportedProgram:
    """Rebuild ``ep`` after in-place graph edits: drop specs (and weights) whose placeholders are gone,
    and point output specs at the graph's current output values.

    Exact: the graph is unchanged; only the signature, state dict and constants follow it.
    """
    gm = ep.graph_module
    gm.graph.lint()
    gm.recompile()
    present = {n.name for n in gm.graph.nodes if n.op == "placeholder"}
    sig = ep.graph_signature
    input_specs = [s for s in sig.input_specs if getattr(s.arg, "name", None) in present]
    targets = {s.target for s in input_specs if s.target is not None}
    state_dict = {k: v for k, v in ep.state_dict.items() if k in targets}
    constants = {k: v for k, v in ep.constants.items() if k in targets}
    outputs = next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0]
    output_specs = [
        dataclasses.replace(spec, arg=dataclasses.replace(spec.arg, name=value.name))
        if isinstance(value, Node) and hasattr(spec.arg, "name")
        else spec
        for spec, value in zip(sig.output_specs, outputs)
    ]
    new_sig = type(sig)(input_specs=input_specs, output_specs=output_specs)
    return ExportedProgram(
        root=gm,
        graph=gm.graph,
        graph_signature=new_sig,
        state_dict=state_dict,
        range_constraints=ep.range_constraints,
        module_call_graph=ep.module_call_graph,
        example_inputs=ep.example_inputs,
        constants=constants,
        verifiers=ep.verifiers,
    )



def set_user_io(ep: ExportedProgram) -> ExportedProgram:
    """Rebuild ``ep`` after a pass added or removed *user* inputs or outputs (e.g. a new cache layout).

    User inputs become the graph's non-state placeholders in graph order; every output is
    a user output; the calling convention (pytree specs) follows: ``module()(*inputs)``
    takes the new inputs positionally and returns a tuple. Weights, buffers and constants
    are kept as they are (``refresh`` drops unused ones).
    """
    from torch.export.exported_program import ModuleCallEntry, ModuleCallSignature
    from torch.export.graph_signature import InputSpec, OutputKind, OutputSpec, TensorArgument
    from torch.utils import _pytree as pytree

    gm = ep.graph_module
    state = {s.arg.name: s for s in ep.graph_signature.input_specs if s.kind != InputKind.USER_INPUT}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    input_specs = [state.get(n.name) or InputSpec(InputKind.USER_INPUT, TensorArgument(n.name), None)
                   for n in placeholders]
    outputs = next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0]
    output_specs = [OutputSpec(OutputKind.USER_OUTPUT, TensorArgument(v.name), None) for v in outputs]
    users = [n for n in placeholders if n.name not in state]
    in_spec = pytree.tree_flatten((tuple(range(len(users))), {}))[1]
    out_spec = pytree.tree_flatten(tuple(range(len(outputs))))[1]
    signature = ModuleCallSignature(inputs=[TensorArgument(n.name) for n in users],
                                    outputs=[TensorArgument(v.name) for v in outputs],
                                    in_spec=in_spec, out_spec=out_spec, forward_arg_names=None)
    call_graph = [ModuleCallEntry(fqn="", signature=signature)]
    call_graph += [e for e in ep.module_call_graph if e.fqn != ""]
    gm.graph.lint()
    gm.recompile()
    return ExportedProgram(
        root=gm, graph=gm.graph,
        graph_signature=type(ep.graph_signature)(input_specs=input_specs, output_specs=output_specs),
        state_dict=ep.state_dict, range_constraints=ep.range_constraints, module_call_graph=call_graph,
        example_inputs=None, constants=ep.constants, verifiers=ep.verifiers,
    )
