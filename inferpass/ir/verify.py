"""The verifier run after every pass: graph lint, export signature, fake-tensor metadata, cache I/O, structure."""

from __future__ import annotations

import torch
from torch._guards import detect_fake_mode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from inferpass.errors import InferpassError, VerificationError
from inferpass.ir.graph_utils import fake_value, output_values, user_inputs
from inferpass.ir.program import DECODER_INPUTS, Program
from inferpass.ir.structure import ModelStructure, recover_structure


def check_structure(program: Program) -> dict[str, ModelStructure]:
    """Recover every graph's structure and check its block count against ``program.info.num_layers``."""
    structures = {}
    for name, ep in program.graphs.items():
        structure = recover_structure(ep, program.info.hidden_size, program.cache if program.is_decoder else None)
        if len(structure.blocks) != program.info.num_layers:
            raise VerificationError(
                f"graph '{name}': {len(structure.blocks)} blocks recovered but the program declares "
                f"{program.info.num_layers} layers"
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


def _check_cache_io(name: str, ep, program: Program) -> None:
    layout = program.cache
    inputs, outputs = user_inputs(ep), output_values(ep)
    fixed = len(DECODER_INPUTS)
    if len(inputs) != fixed + len(layout.tensors) or len(outputs) != 1 + len(layout.tensors):
        raise VerificationError(
            f"graph '{name}': {len(inputs)} inputs / {len(outputs)} outputs do not match the cache layout "
            f"({len(layout.tensors)} cache tensors + {fixed} inputs, logits + cache outputs)"
        )
    for spec, placeholder, out in zip(layout.tensors, inputs[fixed:], outputs[1:]):
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


def verify_program(program: Program) -> None:
    """Raise ``VerificationError`` naming the graph and node when ``program`` is malformed.

    Checks: graph lint, export signature vs graph, every node's fake-tensor metadata
    (present and reproduced by re-propagation), cache inputs/outputs vs the cache
    layout (decoders), and that the structure map is still recoverable.
    """
    for name, ep in program.graphs.items():
        try:
            ep.graph.lint()
            ep.validate()
        except Exception as exc:
            raise VerificationError(f"graph '{name}': {type(exc).__name__}: {exc}") from exc
        _check_fake_metadata(name, ep)
        if program.is_decoder:
            _check_cache_io(name, ep, program)
    try:
        check_structure(program)
    except VerificationError:
        raise
    except InferpassError as exc:
        raise VerificationError(f"structure map no longer valid: {exc}") from exc
