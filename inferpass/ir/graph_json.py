"""An exported graph as JSON, loaded without running anything from the file.

``torch.export.save``/``load`` keep weights, constants and example inputs as pickles and
unpickle them on load (falling back to ``weights_only=False``), and torch's JSON
deserializer evaluates every symbolic-shape expression with ``sympy.sympify`` (Python's
``eval``). Here the graph alone goes to JSON (tensors travel separately, in safetensors)
and, before torch's deserializer sees it, every shape expression is checked to be plain
sympy constructor calls over numbers and symbol names, and every call target to be an
operator from torch's registry, ``operator``, ``math`` or ``torch.sym_*``; after
deserialization every node target is checked again. Anything else is refused with
``ModelLoadError`` naming the file and the offending entry.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re
from typing import Any, Iterator

import torch
from torch._export.serde import schema
from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass, serialize
from torch.export import ExportedProgram

from inferpass.errors import ModelLoadError

# sympy constructors ``srepr`` writes, and the functions torch's deserializer itself passes to sympify
_SYMPY_CALLS = frozenset({
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs", "floor", "ceiling",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality", "Unequality", "StrictLessThan", "LessThan",
    "StrictGreaterThan", "GreaterThan", "And", "Or", "Not", "Piecewise", "ExprCondPair",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator",
    "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity",
})
_SYMPY_NAMES = frozenset({"oo", "zoo", "nan", "true", "false", "S", "pi", "E"})
_NUMBER = re.compile(r"[-+]?[0-9.]+(e[-+]?[0-9]+)?")
_ARITHMETIC = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.USub, ast.UAdd)
_SYM_FUNCTIONS = frozenset({torch.sym_int, torch.sym_float, torch.sym_max, torch.sym_min, torch.sym_not,
                            torch.sym_ite, torch.sym_sqrt, torch.sym_sum})
_TARGET_PREFIXES = ("torch.ops.", "_operator.", "math.", "torch.sym_")


def graph_to_json(ep: ExportedProgram) -> bytes:
    """The graph, signature and shape constraints of ``ep`` as JSON (no tensors, no pickles)."""
    return serialize(ep, serialize_state_dict=False, serialize_constants=False,
                     serialize_example_inputs=False).exported_program


def _walk(value: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _walk(v, k)
    elif isinstance(value, list):
        for v in value:
            yield from _walk(v, key)
    else:
        yield key, value


def _check_expression(node: ast.AST, symbol_name: bool = False) -> None:
    """Raise ``ValueError`` unless ``node`` is sympy constructor calls, arithmetic, numbers and symbol names.

    Text is allowed only as a ``Symbol``'s name (an identifier) or a ``Float``'s digits: any other
    text would itself be sympified, that is evaluated.
    """
    if isinstance(node, ast.Expression):
        _check_expression(node.body)
    elif isinstance(node, ast.Call):
        if not (isinstance(node.func, ast.Name) and node.func.id in _SYMPY_CALLS):
            raise ValueError(f"call of {ast.unparse(node.func)!r} is not a sympy constructor")
        for i, arg in enumerate(node.args):
            _check_expression(arg, symbol_name=i == 0 and node.func.id in ("Symbol", "Float"))
        for keyword in node.keywords:
            if keyword.arg is None:
                raise ValueError("** arguments are not allowed")
            _check_expression(keyword.value)
    elif isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, str):
            if not (symbol_name and (value.isidentifier() or _NUMBER.fullmatch(value))):
                raise ValueError(f"text {value[:40]!r} is not a symbol name")
        elif not isinstance(value, (int, float)):
            raise ValueError(f"literal {value!r} is not a number")
    elif isinstance(node, ast.Name):
        if node.id not in _SYMPY_CALLS and node.id not in _SYMPY_NAMES and not _is_symbol_name(node.id):
            raise ValueError(f"name {node.id!r} is not a shape symbol or sympy constructor")
    elif isinstance(node, ast.BinOp) and isinstance(node.op, _ARITHMETIC):
        _check_expression(node.left)
        _check_expression(node.right)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, _ARITHMETIC):
        _check_expression(node.operand)
    else:
        raise ValueError(f"{type(node).__name__} is not allowed in a shape expression")


def _is_symbol_name(name: str) -> bool:
    """Shape symbols as torch names them: a lowercase prefix and a number (``s0``, ``u3``, ``zuf1``)."""
    stripped = name.rstrip("0123456789")
    return stripped != name and stripped.isalpha() and stripped.islower()


def check_graph_json(data: dict, source: str) -> None:
    """Raise ``ModelLoadError`` for a shape expression or call target that loading could turn into code."""
    for key, value in _walk(data):
        if key == "expr_str":
            try:
                _check_expression(ast.parse(str(value), mode="eval"))
            except (SyntaxError, ValueError) as exc:
                raise ModelLoadError(f"{source}: shape expression {str(value)[:120]!r} refused ({exc}); "
                                     "the file was not written by inferpass or was altered") from exc
        elif key == "target" and isinstance(value, str) and not value.startswith(_TARGET_PREFIXES):
            raise ModelLoadError(f"{source}: call target {value[:120]!r} is not an operator; the file was not "
                                 "written by inferpass or was altered")
    for name in data.get("range_constraints", {}):
        if not _is_symbol_name(name):
            raise ModelLoadError(f"{source}: range constraint on {name[:120]!r}, which is not a shape symbol")


def op_targets(data: dict) -> set[str]:
    """The ``torch.ops.NS.OP.OVERLOAD`` operators the graph calls."""
    return {value for key, value in _walk(data)
            if key == "target" and isinstance(value, str) and value.startswith("torch.ops.") and value.count(".") >= 3}


def _allowed_target(target: Any) -> bool:
    if isinstance(target, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)):
        return True
    if target in _SYM_FUNCTIONS:
        return True
    return any(getattr(module, getattr(target, "__name__", ""), None) is target for module in (operator, math))


def parse_graph_json(raw: bytes, source: str) -> dict:
    """The JSON object in ``raw``; raises ``ModelLoadError`` naming ``source`` for anything else."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"{source}: not a JSON graph ({exc}); inferpass folders keep graphs as JSON and "
                             "never load pickled archives") from exc
    if not isinstance(data, dict) or "graph_module" not in data:
        raise ModelLoadError(f"{source}: not an exported graph (no 'graph_module')")
    return data


def graph_from_json(data: dict, state_dict: dict[str, torch.Tensor], constants: dict[str, torch.Tensor],
                    source: str) -> ExportedProgram:
    """The ``ExportedProgram`` of ``data`` (from ``parse_graph_json``) with the given tensors.

    Checks ``data`` (``check_graph_json``) before deserializing and every node's target after.
    """
    check_graph_json(data, source)
    try:
        serialized = _dict_to_dataclass(schema.ExportedProgram, data)
        ep = ExportedProgramDeserializer().deserialize(serialized, state_dict, constants, None)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"{source}: cannot rebuild the graph: {type(exc).__name__}: {exc}") from exc
    for module in ep.graph_module.modules():
        for node in getattr(module, "graph", torch.fx.Graph()).nodes:
            if node.op == "call_function" and not _allowed_target(node.target):
                raise ModelLoadError(f"{source}: node {node.name} calls {node.target!r}, which is not an operator")
            if node.op in ("call_module", "call_method"):
                raise ModelLoadError(f"{source}: node {node.name} is a {node.op}, which exported graphs never hold")
    return ep
