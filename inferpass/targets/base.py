"""Targets: lower a Program to something that runs. One interface for every target.

``Target.compile(program)`` returns an ``Executable`` whose ``run(graph, *inputs)``
takes and returns tensors exactly as the graph's signature says — the runtime calls
prefill/decode and passes cache tensors the same way whatever the target. Two things vary
by target and are part of the contract: ``device`` (where outputs live and where caches
should be allocated; inputs elsewhere are copied there) and whether the written caches a
call returns are its cache inputs written in place (targets that keep cache memory do so:
a caller must treat the caches it passes as consumed and use only the returned ones).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from inferpass.errors import TargetError
from inferpass.ir.program import Program


class Executable(ABC):
    """A compiled program: ``run(graph, *inputs)`` returns the graph's outputs as a tuple."""

    device = torch.device("cpu")
    shape_specialized = False  # True where each new call shape costs a compile: callers should reuse few shapes
    fp32_tolerance = 1e-5  # rtol = atol within which its fp32 outputs match the eager target's on the same graph

    def __init__(self, program: Program):
        self.program = program

    @abstractmethod
    def run(self, graph: str, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Run graph ``graph`` on ``inputs``; outputs on ``self.device``; cache inputs may be written in place."""

    def step(self, graph: str, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``run`` for a caller that hands its cache inputs over (the engine): the target may write them in place
        and return them as the written caches even where ``run`` is functional. Default: ``run``."""
        return self.run(graph, *inputs)

    def artifacts(self) -> dict[str, Path]:
        """Compiled files this executable used (name -> path), saved with the program so that loading it
        on this target needs no compilation; none for targets that compile nothing."""
        return {}


class Target(ABC):
    """A place programs run; ``name`` is what ``--target`` accepts."""

    name: str

    @abstractmethod
    def compile(self, program: Program) -> Executable:
        """Lower ``program``; raise ``TargetError`` naming any op or dtype the target cannot run."""


# The module of each built-in target, imported when the target is first asked for: running on one target never
# imports another's compiler (the eager path never imports Triton).
BUILT_IN = {"eager": "inferpass.targets.eager", "cpu": "inferpass.targets.iree_cpu",
            "inductor": "inferpass.targets.inductor", "cuda": "inferpass.targets.cuda"}

_TARGETS: dict[str, type[Target]] = {}


def register_target(cls: type[Target]) -> type[Target]:
    """Class decorator adding ``cls`` to the target registry under ``cls.name``."""
    _TARGETS[cls.name] = cls
    return cls


def get_target(name: str) -> Target:
    """A target instance by name (importing a built-in target's module); unknown names raise naming the known
    targets, and a built-in target whose module cannot be imported (its compiler missing) raises naming why."""
    if name not in _TARGETS and name in BUILT_IN:
        try:
            importlib.import_module(BUILT_IN[name])
        except ImportError as err:
            raise TargetError(f"target '{name}' cannot be loaded: {err}") from err
    if name not in _TARGETS:
        raise TargetError(f"unknown target '{name}'; available: {', '.join(target_names())}")
    return _TARGETS[name]()


def target_names() -> list[str]:
    """Names of the built-in and registered targets."""
    return sorted(BUILT_IN.keys() | _TARGETS.keys())
