"""The ``cuda`` target: our ops as Triton ops, the rest compiled by Inductor, decode steps replayed as CUDA graphs.

Per call shape (decode per batch size, prefill per bucket, as ``static_shapes``) a graph is
lowered by ``in_place_step`` — our ops replaced by their Triton ops (``triton_ops``), cache
writes made in place — and compiled with ``torch._inductor.compile``: Inductor fuses the aten
ops around our kernels into Triton kernels of its own and launches ours from the same
generated code. Caches are written in place, so a decode step reads the cache once and writes
only the new slots, where a functional step would copy it whole.

Decode steps run under CUDA graphs. The first call of a decode function on a set of cache
tensors runs it directly (which also warms it up); the next call on the same tensors captures
the step into a CUDA graph with static token/position buffers, and every later call copies
its tokens and positions in and replays the graph: one launch per step, no Python per kernel.
A call on other cache tensors (a new generation, a subset of rows) drops the graph and starts over.

Weights move to the device once, shared between graphs. Outputs equal eager up to fp32
rounding and the kernels' own contracts. ``CudaTarget(device="cpu")`` runs the same lowering
with our ops' CPU kernels (called from the compiled code), Inductor's CPU backend and no CUDA graphs:
how the lowering is tested on machines without a GPU (the Triton ops themselves are tested in
interpreter mode), and what the ``inductor`` target's engine steps run.
Importing this target registers our ops' CUDA kernels (``kernels.cuda_kernels``, imported by
``in_place_step``), so eager calls of our ops on CUDA tensors run the Triton kernels too.
"""

from __future__ import annotations

import logging
import time

import torch

from inferpass.errors import TargetError
from inferpass.ir.program import Program
from inferpass.targets.base import Target, register_target
from inferpass.targets.in_place_step import in_place_step
from inferpass.targets.static_shapes import Function, ShapeSpecializedExecutable, lifted_inputs

log = logging.getLogger(__name__)


class GraphedDecode:
    """``step`` replayed from a CUDA graph when called again on the same cache tensors (see module doc).

    ``step(inputs)`` takes ``(*small, *caches)`` (the last ``caches`` inputs), writes the caches in
    place and returns ``(*outputs, *caches)``; so does this wrapper. ``captures`` counts graphs captured.
    """

    def __init__(self, step: Function, caches: int):
        self.step, self.caches = step, caches
        self.key: tuple[int, ...] | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.captures = 0

    def __call__(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        split = len(inputs) - self.caches
        small, caches = inputs[:split], inputs[split:]
        key = tuple(t.data_ptr() for t in caches)
        if key != self.key:
            self.key, self.graph = key, None
            return self.step(inputs)
        if self.graph is None:
            self._capture(small, caches)
        for static, value in zip(self.small, small):
            static.copy_(value, non_blocking=True)
        self.graph.replay()
        return (*(t.clone() for t in self.outputs), *caches)

    def _capture(self, small: tuple[torch.Tensor, ...], caches: tuple[torch.Tensor, ...]) -> None:
        self.small = [t.clone() for t in small]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.step((*self.small, *caches))
        self.outputs = out[: len(out) - self.caches]
        self.graph = graph
        self.captures += 1


class CudaExecutable(ShapeSpecializedExecutable):
    """Inductor-compiled in-place steps per call shape on ``device``; decode under CUDA graphs there (module doc).

    ``compiled`` counts functions compiled, ``compile_seconds`` sums their lowering and compile time.
    """

    def __init__(self, program: Program, device: torch.device):
        super().__init__(program)
        self.device = device
        self.triton = device.type == "cuda"
        on_device: dict[int, torch.Tensor] = {}
        self.weights = {name: [on_device.setdefault(id(t), t.detach().to(device)) for _, t in lifted_inputs(ep, "cuda")]
                        for name, ep in program.graphs.items()}
        self.compiled = 0
        self.compile_seconds = 0.0

    def specialize(self, graph: str, inputs: tuple[torch.Tensor, ...], shapes: tuple) -> Function:
        caches = len(self.program.cache_tensors(graph))
        weights = self.weights[graph]
        t0 = time.perf_counter()
        try:
            module = in_place_step(self.program.graphs[graph], inputs, caches, triton=self.triton, device=self.device,
                                   kernels=not self.triton)
            with torch.no_grad():
                compiled = torch._inductor.compile(module, [*weights, *inputs])
        except Exception as err:  # noqa: BLE001  (any lowering or compiler failure, named for the user)
            raise TargetError(f"target 'cuda': cannot compile the {graph} graph for inputs {shapes} on "
                              f"{self.device}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                              ) from err
        seconds = time.perf_counter() - t0
        self.compiled += 1
        self.compile_seconds += seconds
        log.info("cuda target: compiled %s for %s in %.1fs", graph, shapes, seconds)

        def step(args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            with torch.no_grad():
                return (*compiled(*weights, *args), *args[len(args) - caches :])

        if self.program.is_decoder and self.program.roles[graph].tokens != "any" and self.device.type == "cuda":
            return GraphedDecode(step, caches)
        return step


@register_target
class CudaTarget(Target):
    """Triton kernels for our ops, Inductor for the rest, CUDA graphs for decode (see module doc)."""

    name = "cuda"

    def __init__(self, device: str | torch.device = "cuda"):
        """Raises at once where there is no GPU, so a command fails before it captures anything."""
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise TargetError("target 'cuda' needs a CUDA GPU and this machine has none "
                              "(torch.cuda.is_available() is False); targets that run here: cpu, inductor, eager")

    def compile(self, program: Program) -> CudaExecutable:
        return CudaExecutable(program, self.device)
