"""The eager target: run each exported graph with PyTorch eager kernels. The reference for every other target.

It never imports Triton: our ops run their CPU kernels, and on CUDA tensors their aten references unless
``inferpass.kernels.cuda_kernels`` (the ops' Triton kernels) has been imported.
"""

from __future__ import annotations

import torch

from inferpass.ir.program import Program
from inferpass.targets.base import Executable, Target, register_target


class EagerExecutable(Executable):
    def __init__(self, program: Program):
        super().__init__(program)
        self.modules = {name: ep.module() for name, ep in program.graphs.items()}

    def run(self, graph, *inputs):
        with torch.no_grad():
            out = self.modules[graph](*inputs)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)


@register_target
class EagerTarget(Target):
    """Runs the graphs as captured (plus passes) with eager PyTorch; exact reference semantics."""

    name = "eager"

    def compile(self, program):
        return EagerExecutable(program)
