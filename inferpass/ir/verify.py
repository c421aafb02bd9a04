"""The verifier run after every pass: graph lint, export signature, fake-tensor metadata, cache I/O, structure."""

from __future__ import annotations

import torch
from torch._guards import detect_fake_mode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from inferpass.errors import InferpassError, VerificationError
from inferpass.ir.graph_utils import fake_value, output_values, user_inputs
from inferpass.ir.program import DECODER_INPUTS, Program
from inferpass.ir.structure import ModelStructure, graph_structure


def check_structure(program: Program) -> dict[str, ModelStructure]:
    """Recover every graph's structure and check its blocks against its role's layers (all
    ``program.info.num_layers`` when the role names none)."""
    structures = {}
    for name in program.graphs:
        structure = graph_structure(program, name)
        expected, named = program.graph_layers(name), program.roles[name].layers is not None
        found = [b.index for b in structure.blocks]
        if len(found) != len(expected):
            raise VerificationError(
                f"graph '{name}': {len(found)} blocks recovered but its role runs {len(expected)} "
                f"(layers {expected if named else f'0..{program.info.num_layers - 1}'})"
            )
        structures[name] = structure
    return structures


def _shape_str(val) -> str:
    return "x".join(str(d) for d in val.shape)


def _returns(node) -> bool:
    """False for ops whose schema returns nothing (asserts): they carry no value metadata."""
    schema = getattr(node.target, "_schema", None)
    return schema is None or bool(schema.returns)


def _check_fake_metadata(name: str, ep) -> None:
    gm = ep.graph_module
    missing = [
        n.name for n in gm.graph.nodes if n.op in ("placeholder", "call_function") and "val" not in n.meta and _returns(n)
    ]
    if missing:
        raise VerificationError(f"graph '{name}': nodes without fake-tensor metadata (meta['val']): {missing[:8]}")
    placeholders = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode(placeholders)
    stored = {n: n.meta["val"] for n in gm.graph.nodes if n.op == "call_function" and "val" in n.meta}
    try:
        FakeTensorProp(gm, mode=mode).propagate_dont_convert_inputs(*placeholders)
    except Exception as exc:
        raise VerificationError(f"graph '{name}': fake-tensor propagation failed: {exc}") from exc
    try:
        for node, old in stored.items():
            new = node.meta.get("val")
            if isinstance(old, torch.Tensor) != isinstance(new, torch.Tensor):
                raise VerificationError(f"graph '{name}': node {node.name} ({node.target}) changed value kind")
            if isinstance(old, torch.Tensor) and (old.dtype != new.dtype or _shape_str(old) != _shape_str(new)):
                raise VerificationError(
                    f"graph '{name}': node {node.name} ({node.target}) metadata says "
                    f"{old.dtype}[{_shape_str(old)}] but computes {new.dtype}[{_shape_str(new)}]"
                )
    finally:
        for node, old in stored.items():
            node.meta["val"] = old


def _check_io(name: str, ep, program: Program) -> None:
    """The graph's inputs and outputs are what its role and the program's metadata say: logits as wide as the
    vocabulary (labels for encoders), and (decoders) its tokens per row and cache tensors."""
    role = program.roles[name]
    outputs = output_values(ep)
    width = program.info.vocab_size if program.is_decoder else program.info.num_labels
    logits = fake_value(outputs[0])
    if role.outputs[0] == "logits" and width is not None and (
            not isinstance(logits, torch.Tensor) or logits.shape[-1] != width):
        raise VerificationError(f"graph '{name}': returns logits {list(getattr(logits, 'shape', []))}, the program "
                                f"says {width} {'vocabulary entries' if program.is_decoder else 'labels'}")
    if not program.is_decoder:
        return
    tensors = program.cache_tensors(name)
    inputs = user_inputs(ep)
    fixed, leading = len(DECODER_INPUTS), len(role.outputs)
    if len(inputs) != fixed + len(tensors) or len(outputs) != leading + len(tensors):
        raise VerificationError(
            f"graph '{name}': {len(inputs)} inputs / {len(outputs)} outputs do not match its role "
            f"({fixed} inputs + {len(tensors)} cache tensors, {', '.join(role.outputs)} + cache outputs)"
        )
    tokens = fake_value(inputs[0]).shape[1]  # a graph taking any count (symbolic) also serves a fixed-count role
    if role.tokens != "any" and isinstance(tokens, int) and tokens != role.tokens:
        raise VerificationError(f"graph '{name}': takes {tokens} tokens per row, its role says {role.tokens}")
    for spec, placeholder, out in zip(tensors, inputs[fixed:], outputs[leading:]):
        for what, node in (("input", placeholder), ("output", out)):
            val = fake_value(node)
            if not isinstance(val, torch.Tensor):
                raise VerificationError(f"graph '{name}': cache {what} {spec.name} is not a tensor")
            if str(val.dtype).removeprefix("torch.") != spec.dtype or [str(d) for d in val.shape[1:]] != [
                str(d) for d in spec.shape[1:]
            ]:
                raise VerificationError(
                    f"graph '{name}': cache {what} {spec.name} is {val.dtype}[{_shape_str(val)}], "
                    f"layout says {spec.dtype}{list(spec.shape)}"
                )


def check_interface(program: Program) -> None:
    """The metadata the runtime relies on agrees with the graphs: a cache layout exactly for decoders, roles
    naming the layout's tensors in order, a graph for any number of tokens, and every graph's inputs and
    outputs as its role says (``_check_io``). Cheap: reads the graphs' recorded metadata only."""
    if (program.cache is None) == program.is_decoder:
        raise VerificationError(f"a {program.info.kind} program {'needs' if program.is_decoder else 'has no'} "
                                "cache layout")
    names = [t.name for t in program.cache.tensors] if program.cache else []
    for name, role in program.roles.items():
        if role.caches and list(role.caches) != [n for n in names if n in role.caches]:
            raise VerificationError(f"graph '{name}': its role's caches {list(role.caches)} are not tensors of the "
                                    f"cache layout in layout order ({names})")
    try:
        program.graph_for()
        _check_schedules(program)
    except KeyError as exc:
        raise VerificationError(str(exc.args[0])) from None
    for name, ep in program.graphs.items():
        _check_io(name, ep, program)


def _check_schedules(program: Program) -> None:
    """Scheduled graphs (``GraphRole.from_position``): distinct start positions per token count, each graph
    running a subset of the layers of the one before it (so no later token needs KV an earlier one skipped),
    over exactly the caches of the layers it runs."""
    for tokens in sorted({r.tokens for r in program.roles.values() if r.from_position is not None}, key=str):
        names, previous = program.schedule(tokens), None
        starts = [program.roles[n].from_position for n in names[1:]]
        if len(set(starts)) != len(starts):
            raise VerificationError(f"scheduled {tokens}-token graphs {names[1:]} share a start position {starts}")
        for name in names:
            layers = set(program.graph_layers(name))
            if previous is not None and not layers <= previous[1]:
                raise VerificationError(f"graph '{name}' runs layers {sorted(layers - previous[1])} that "
                                        f"'{previous[0]}', which serves earlier positions, skips")
            want = [t.name for t in program.cache.tensors if t.layer in layers]
            if [t.name for t in program.cache_tensors(name)] != want:
                raise VerificationError(f"graph '{name}' runs layers {sorted(layers)} but its caches are "
                                        f"{[t.name for t in program.cache_tensors(name)]}, not {want}")
            previous = (name, layers)


def verify_program(program: Program) -> None:
    """Raise ``VerificationError`` naming the graph and node when ``program`` is malformed.

    Checks: graph lint, export signature vs graph, every node's fake-tensor metadata
    (present and reproduced by re-propagation), ``check_interface`` (roles, logits, tokens,
    cache inputs/outputs vs the layout), and that the structure map is still recoverable
    (each graph's blocks are its role's layers).
    """
    for name, ep in program.graphs.items():
        try:
            ep.graph.lint()
            ep.validate()
        except Exception as exc:
            raise VerificationError(f"graph '{name}': {type(exc).__name__}: {exc}") from exc
        _check_fake_metadata(name, ep)
    check_interface(program)
    try:
        check_structure(program)
    except VerificationError:
        raise
    except InferpassError as exc:
        raise VerificationError(f"structure map no longer valid: {exc}") from exc
