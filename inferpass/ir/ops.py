"""Registry of the custom ops passes insert, under the ``torch.library`` namespace ``inferpass``.

Each op has a schema, a reference implementation in plain aten ops (the oracle in
tests, and what CPU lowering imports via ``reference_decompositions``), a fake
implementation for export, and slots for device kernels (e.g. a Triton kernel for CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from inferpass.errors import InferpassError

NAMESPACE = "inferpass"
_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")


@dataclass
class OpSpec:
    """A registered op. ``role`` tags ops that structure recovery must recognize (e.g. ``attention``)."""

    name: str
    schema: str
    reference: Callable
    fake: Callable
    role: str | None = None
    kernels: dict[str, Callable] = field(default_factory=dict)

    @property
    def qualname(self) -> str:
        return f"{NAMESPACE}::{self.name}"

    @property
    def overload(self) -> torch._ops.OpOverload:
        return getattr(getattr(torch.ops, NAMESPACE), self.name).default


_REGISTRY: dict[str, OpSpec] = {}


def define_op(name: str, schema: str, *, reference: Callable, fake: Callable, role: str | None = None) -> OpSpec:
    """Define ``inferpass::name`` with ``schema`` (e.g. ``"(Tensor x) -> Tensor"``).

    ``reference`` runs for every device without a registered kernel and must use only
    aten ops; ``fake`` computes output metadata for export.
    """
    if name in _REGISTRY:
        raise InferpassError(f"op {NAMESPACE}::{name} is already defined")
    _LIB.define(name + schema)
    _LIB.impl(name, reference, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_LIB)
    spec = OpSpec(name, schema, reference, fake, role)
    _REGISTRY[name] = spec
    return spec


def register_kernel(name: str, device: str, kernel: Callable) -> None:
    """Register a device kernel (``device`` is ``"cuda"`` or ``"cpu"``) that replaces the reference there."""
    spec = get_op(name)
    _LIB.impl(name, kernel, device.upper())
    spec.kernels[device] = kernel


def get_op(name: str) -> OpSpec:
    """The spec of ``inferpass::name``; unknown names raise naming the known ops."""
    if name not in _REGISTRY:
        raise InferpassError(f"unknown op {NAMESPACE}::{name}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def registered_ops() -> list[OpSpec]:
    """All registered op specs, by name."""
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def reference_decompositions(keep_kernels_for: str | None = None) -> dict:
    """Decomposition table mapping every registered op to its aten reference (for lowering); with
    ``keep_kernels_for`` (a device type), ops with a kernel for that device are left out (they stay calls)."""
    return {spec.overload: spec.reference for spec in _REGISTRY.values() if keep_kernels_for not in spec.kernels}


def attention_targets() -> set:
    """Graph targets that structure recovery treats as a block's attention op."""
    targets = {torch.ops.aten.scaled_dot_product_attention.default}
    targets |= {spec.overload for spec in _REGISTRY.values() if spec.role == "attention"}
    return targets
