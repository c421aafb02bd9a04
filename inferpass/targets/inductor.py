"""The ``inductor`` target: AOTInductor packages compiled ahead of time per static call shape.

Each graph is specialized like the ``cpu`` target (``static_shapes``): the lifted graph, weights
first, re-exported with every dim fixed, custom ops decomposed to their aten references (Inductor
then fuses them), and compiled with ``torch._inductor.aoti_compile_and_package`` into a ``.pt2``
package that holds no weights. Static rather than dynamic shapes: AOTInductor in torch 2.13 runs
our decode graph with a dynamic batch correctly at batch 1 only (index out of bounds from batch 2),
and a static function is what the other ahead-of-time target runs too. Compiling a shape takes
tens of seconds on 2 cores; packages are cached on disk and carried by saved folders like the
``cpu`` target's. Outputs equal eager up to fp32 rounding.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from inferpass.ir.ops import reference_decompositions
from inferpass.ir.program import Program
from inferpass.targets.artifacts import ArtifactStore
from inferpass.targets.base import register_target
from inferpass.targets.static_shapes import (Function, StaticShapeExecutable, StaticShapeTarget, lifted_inputs,
                                              static_export)


class InductorExecutable(StaticShapeExecutable):
    """Static AOTInductor packages per call shape (see module doc)."""

    target = "inductor"
    suffix = ".pt2"

    def __init__(self, program: Program, store: ArtifactStore):
        super().__init__(program, store, (torch.__version__, torch.backends.cpu.get_cpu_capability()))
        self.weights = {name: [t.detach() for _, t in lifted_inputs(ep, self.target)]
                        for name, ep in program.graphs.items()}

    def build(self, graph: str, inputs: tuple[torch.Tensor, ...]) -> bytes:
        static = static_export(self.program.graphs[graph], inputs, self.target)
        with torch.no_grad():
            static = static.run_decompositions(reference_decompositions())
        with tempfile.TemporaryDirectory() as tmp:
            path = torch._inductor.aoti_compile_and_package(static, package_path=str(Path(tmp) / "graph.pt2"))
            return Path(path).read_bytes()

    def load(self, graph: str, path: Path) -> Function:
        runner = torch._inductor.aoti_load_package(str(path))
        weights = self.weights[graph]

        def call(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            with torch.no_grad():
                out = runner(*weights, *inputs)
            return tuple(out) if isinstance(out, (tuple, list)) else (out,)

        return call


@register_target
class InductorTarget(StaticShapeTarget):
    """AOTInductor on this machine's device (CPU here), static shapes, packages cached on disk (see module doc)."""

    name = "inductor"
    executable = InductorExecutable
