"""Executables that run every call through a function compiled for its exact shapes.

Shared by the compiling targets (``cpu``: IREE, ``inductor``: AOTInductor, ``cuda``). A graph is
specialized per call shape: decode per batch size, prefill per batch size and sequence
*bucket* (powers of two from ``MIN_BUCKET``, and ``max_len``). A prompt of no bucket length is
padded to the next bucket when the cache accepts padding (plain k/v: padded tokens only write
slots past the prompt, hidden from every query until real tokens overwrite them), otherwise
fed in exact power-of-two pieces (a quantized cache must never take a padded token).

The ahead-of-time targets' functions take the graph's weights, buffers and constants as leading arguments
(``static_export``), so an artifact holds no weights and serves any model with the same graph
and shapes. Artifacts live in an ``ArtifactStore`` under a key of the graph's code, the call
shapes and dtypes, and the target's own versions and flags; a saved folder carries them.
"""

from __future__ import annotations

import copy
import logging
import time
from abc import abstractmethod
from pathlib import Path
from typing import Callable

import torch
from torch.export.graph_signature import InputKind

from inferpass import progress
from inferpass.errors import TargetError
from inferpass.ir.program import Program
from inferpass.targets.artifacts import ArtifactStore, artifact_key
from inferpass.targets.base import Executable, Target

log = logging.getLogger(__name__)
MIN_BUCKET = 16
Function = Callable[[tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]]


def prefill_pieces(length: int, room: int, max_len: int, pad: bool) -> list[tuple[int, int]]:
    """How to feed ``length`` tokens with ``room`` free cache slots: ``(tokens, bucket)`` per call.

    With ``pad``, one call at the smallest bucket (power of two >= ``MIN_BUCKET``, or ``max_len``)
    that holds the tokens and fits the room; otherwise (or when none fits) exact power-of-two pieces.
    """
    if pad:
        buckets = sorted({min(max(MIN_BUCKET, 1 << (length - 1).bit_length()), max_len), max_len})
        fitting = [b for b in buckets if length <= b <= room]
        if fitting:
            return [(length, fitting[0])]
    return [(1 << bit, 1 << bit) for bit in reversed(range(length.bit_length())) if length >> bit & 1]


def lifted_inputs(ep: torch.export.ExportedProgram, target: str) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` behind each of the graph's non-user inputs (parameters, buffers, constants), in graph
    order; the program's own tensor objects, so graphs sharing a weight share the tensor."""
    tensors = []
    for spec in ep.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            continue
        value = ep.state_dict.get(spec.target) if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) else None
        value = ep.constants.get(spec.target) if value is None else value
        if not isinstance(value, torch.Tensor):
            raise TargetError(f"target '{target}': input {spec.target} of kind {spec.kind.name} is not a tensor")
        tensors.append((spec.target, value))
    return tensors


class _Lifted(torch.nn.Module):
    """The lifted graph as a module whose every input (weights first) is an argument."""

    def __init__(self, graph_module: torch.fx.GraphModule):
        super().__init__()
        self.graph_module = graph_module

    def forward(self, *args):
        return self.graph_module(*args)


def static_export(ep: torch.export.ExportedProgram, inputs: tuple[torch.Tensor, ...],
                  target: str) -> torch.export.ExportedProgram:
    """``ep`` re-exported with every dim fixed to ``inputs`` (its user inputs), taking the lifted weights as
    leading user inputs (so nothing is baked in, non-persistent buffers included)."""
    weights = tuple(t.detach() for _, t in lifted_inputs(ep, target))
    with torch.no_grad():
        return torch.export.export(_Lifted(ep.graph_module), (*weights, *inputs), strict=False)


def graph_text(ep: torch.export.ExportedProgram) -> str:
    """The graph's code with dead nodes dropped: equal for a program and the same program saved and loaded
    (the export serializer adds unused ``getitem`` nodes for multi-output ops)."""
    module = copy.deepcopy(ep.graph_module)
    module.graph.eliminate_dead_code()
    return f"{module.graph}\n{ep.graph_signature}"


class ShapeSpecializedExecutable(Executable):
    """Runs each call through a function specialized for its shapes, made on first use by ``specialize``;
    prefill calls go through the buckets of ``prefill_pieces``."""

    shape_specialized = True
    fp32_tolerance = 1e-4  # fused, reordered and vectorized reductions (tests/test_targets.py holds them to it)

    def __init__(self, program: Program):
        super().__init__(program)
        self.functions: dict[tuple, Function] = {}

    @abstractmethod
    def specialize(self, graph: str, inputs: tuple[torch.Tensor, ...], shapes: tuple) -> Function:
        """The function running ``graph`` on inputs of these ``shapes`` (``(shape, dtype)`` per input)."""

    def run(self, graph: str, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = tuple(t.to(self.device) for t in inputs)
        if self.program.is_decoder and self.program.roles[graph].tokens == "any":
            return self._prefill(graph, *inputs)
        return self._call(graph, inputs)

    def _prefill(self, graph: str, ids: torch.Tensor, start: torch.Tensor,
                 *caches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        layout = self.program.cache
        room = layout.max_len - int(start.max())
        pieces = prefill_pieces(ids.shape[1], room, layout.max_len, layout.accepts_padding)
        logits, first = [], 0
        for tokens, bucket in pieces:
            piece = ids[:, first : first + tokens]
            if bucket > tokens:
                piece = torch.nn.functional.pad(piece, (0, bucket - tokens))
            out, *caches = self._call(graph, (piece, start + first, *caches))
            logits.append(out[:, :tokens])
            first += tokens
        return (torch.cat(logits, dim=1) if len(logits) > 1 else logits[0], *caches)

    def _call(self, graph: str, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        shapes = tuple((tuple(t.shape), str(t.dtype)) for t in inputs)
        fn = self.functions.get((graph, shapes))
        if fn is None:
            fn = self.functions[(graph, shapes)] = self.specialize(graph, inputs, shapes)
        return fn(inputs)


class StaticShapeExecutable(ShapeSpecializedExecutable):
    """Specializes through artifacts compiled ahead of time, built (or found on disk) per call shape.

    Subclasses give ``target``, ``suffix``, ``build`` and ``load``. ``compiled`` / ``loaded`` count
    functions built here / found on disk; ``compile_seconds`` sums build time.
    """

    target: str
    suffix: str

    def __init__(self, program: Program, store: ArtifactStore, key_base: tuple):
        super().__init__(program)
        self.store = store
        self.key_base = key_base
        self.graph_texts = {name: graph_text(ep) for name, ep in program.graphs.items()}
        self.compiled = self.loaded = 0
        self.compile_seconds = 0.0

    @abstractmethod
    def build(self, graph: str, inputs: tuple[torch.Tensor, ...]) -> bytes:
        """The artifact of ``graph`` compiled for the shapes of ``inputs``."""

    @abstractmethod
    def load(self, graph: str, path: Path) -> Function:
        """A function running the artifact at ``path`` on the graph's inputs, returning its outputs."""

    def specialize(self, graph: str, inputs: tuple[torch.Tensor, ...], shapes: tuple) -> Function:
        name = f"{graph}-{artifact_key(self.graph_texts[graph], shapes, self.key_base)}{self.suffix}"
        path = self.store.find(name)
        if path is None:
            t0 = time.perf_counter()
            with progress.task(f"{self.target}: compiling {graph} for input shape {shapes[0][0]}"):
                path = self.store.put(name, self.build(graph, inputs))
            self.compile_seconds += time.perf_counter() - t0
            self.compiled += 1
            log.info("%s target: compiled %s for %s in %.1fs", self.target, graph, shapes, time.perf_counter() - t0)
        else:
            self.loaded += 1
        return self.load(graph, path)

    def artifacts(self) -> dict[str, Path]:
        return dict(self.store.used)


class StaticShapeTarget(Target):
    """A target whose executables are ``executable`` instances over an ``ArtifactStore`` in ``cache_dir``
    (default ``defaults.default_cache_dir()``) that also reads the program folder's carried artifacts when
    ``load_program`` trusted them (``Program.trusted_artifacts``)."""

    executable: type[StaticShapeExecutable]

    def __init__(self, cache_dir: str | Path | None = None):
        self.cache_dir = cache_dir

    def compile(self, program: Program) -> StaticShapeExecutable:
        carried = [program.folder / "artifacts" / self.name] if program.folder and program.trusted_artifacts else []
        return self.executable(program, ArtifactStore(self.name, self.cache_dir, carried))
