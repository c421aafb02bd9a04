"""The ``inductor`` target: AOTInductor packages compiled ahead of time per static call shape.

Each graph is specialized like the ``cpu`` target (``static_shapes``): the lifted graph, weights
first, re-exported with every dim fixed, custom ops decomposed to their aten references (Inductor
then fuses them), and compiled with ``torch._inductor.aoti_compile_and_package`` into a ``.pt2``
package that holds no weights. Static rather than dynamic shapes: AOTInductor in torch 2.13 runs
our decode graph with a dynamic batch correctly at batch 1 only (index out of bounds from batch 2),
and a static function is what the other ahead-of-time target runs too. Compiling a shape takes
tens of seconds on 2 cores; packages are cached on disk and carried by saved folders like the
``cpu`` target's. Outputs equal eager up to fp32 rounding.

A graph that takes caches is compiled as an in-place step (``in_place_step``, as the cuda target:
our ops' CPU kernels stay calls, so attention reads only the valid cache prefix; every cache
write is an ``index_put`` copied back into its input, which Inductor turns into a write of the
new slots only): ``run`` writes the caller's caches in place and returns them, so a decode step
no longer copies every cache in and out.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from inferpass.ir.ops import reference_decompositions
from inferpass.ir.program import Program
from inferpass.targets.artifacts import ArtifactStore
from inferpass.targets.base import register_target
from inferpass.targets.in_place_step import in_place_step
from inferpass.targets.static_shapes import (Function, StaticShapeExecutable, StaticShapeTarget, lifted_inputs,
                                              static_export)


class InductorExecutable(StaticShapeExecutable):
    """Static AOTInductor packages per call shape (see module doc)."""

    target = "inductor"
    suffix = ".pt2"

    def __init__(self, program: Program, store: ArtifactStore):
        super().__init__(program, store, (torch.__version__, torch.backends.cpu.get_cpu_capability(),
                                          "caches written in place"))
        self.weights = {name: [t.detach() for _, t in lifted_inputs(ep, self.target)]
                        for name, ep in program.graphs.items()}

    def build(self, graph: str, inputs: tuple[torch.Tensor, ...]) -> bytes:
        ep, caches = self.program.graphs[graph], len(self.program.cache_tensors(graph))
        with torch.no_grad():
            if caches:
                step = in_place_step(ep, inputs, caches, triton=False, device=self.device, kernels=True)
                static = torch.export.export(step, (*self.weights[graph], *inputs), strict=False)
            else:
                static = static_export(ep, inputs, self.target).run_decompositions(reference_decompositions())
        with tempfile.TemporaryDirectory() as tmp:
            path = torch._inductor.aoti_compile_and_package(static, package_path=str(Path(tmp) / "graph.pt2"))
            return Path(path).read_bytes()

    def load(self, graph: str, path: Path) -> Function:
        runner = torch._inductor.aoti_load_package(str(path))
        weights, caches = self.weights[graph], len(self.program.cache_tensors(graph))

        def call(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            written = [t if t.is_contiguous() else t.contiguous() for t in inputs[len(inputs) - caches:]]
            with torch.no_grad():
                out = runner(*weights, *inputs[:len(inputs) - caches], *written)
            return (*(out if isinstance(out, (tuple, list)) else (out,)), *written)

        return call


@register_target
class InductorTarget(StaticShapeTarget):
    """AOTInductor on this machine's device (CPU here), static shapes, packages cached on disk (see module doc)."""

    name = "inductor"
    executable = InductorExecutable
