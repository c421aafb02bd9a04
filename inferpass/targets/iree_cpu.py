"""The ``cpu`` target: graphs compiled ahead of time by IREE for the host CPU, through torch-mlir's FX importer.

Lowering one graph for one static call shape:

1. the lifted graph (weights, buffers and constants are its leading inputs, then the graph's
   own inputs) is re-exported with every dim fixed; custom ops are decomposed to their aten
   references (``ir.ops.reference_decompositions``) along with torch-mlir's own table;
2. torch-mlir imports it as torch-dialect MLIR, and IREE compiles that for ``llvm-cpu`` with the
   host's CPU features into a vmfb;
3. the IREE runtime calls it with the weights as device arrays made once, so a vmfb holds no
   weights (tens of KB) and serves any model with the same graph and shapes. Decode runs
   inline (``local-sync``: lowest latency for one token per row); prefill and encoder graphs
   run on a ``local-task`` pool of as many workers as torch has threads.

Shapes: IREE runs static shapes at eager speed and dynamic ones about 2× slower, so every
call runs a static specialization: decode per batch size, prefill per batch size and
sequence *bucket* (powers of two from ``MIN_BUCKET``, and ``max_len``). A prompt of no bucket
length is padded to the next bucket when the cache accepts padding (plain k/v: padded tokens
only write slots past the prompt, hidden from every query until real tokens overwrite them),
otherwise fed in exact power-of-two pieces (a quantized cache must never take a padded token).

Compiled functions live in an ``ArtifactStore`` under a key of the graph's code, shapes,
dtypes, compiler version, flags and host CPU; a saved program folder carries the ones it used.
Outputs equal eager up to fp32 rounding (IREE's own fusion and reduction order).
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch.export.graph_signature import InputKind

from inferpass.errors import TargetError
from inferpass.ir.ops import reference_decompositions
from inferpass.ir.program import Program
from inferpass.targets.artifacts import ArtifactStore, artifact_key
from inferpass.targets.base import Executable, Target, register_target

log = logging.getLogger(__name__)
MIN_BUCKET = 16
SYNC_GRAPHS = {"decode"}  # one token per row: run inline (``local-sync``); other graphs use a task pool
FLAGS = ("--iree-llvmcpu-target-cpu=host",)
_NUMPY_DTYPES = {torch.float32, torch.float16, torch.float64, torch.int64, torch.int32, torch.uint8, torch.int8,
                 torch.bool}
_LOWERABLE_NAMESPACES = {"aten", "prims"}


def _supported() -> str:
    return ", ".join(sorted(str(d).removeprefix("torch.") for d in _NUMPY_DTYPES))


def host_cpu() -> str:
    """What ``--iree-llvmcpu-target-cpu=host`` compiles for: the machine and its CPU feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        flags = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return f"{platform.machine()}:{artifact_key(flags)}"


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


def _lifted_inputs(ep: torch.export.ExportedProgram) -> list[torch.Tensor]:
    """The tensors behind the graph's non-user inputs (parameters, buffers, constants), in graph order (the
    program's own objects: graphs sharing a weight share the tensor)."""
    tensors = []
    for spec in ep.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            continue
        value = ep.state_dict.get(spec.target) if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) else None
        value = ep.constants.get(spec.target) if value is None else value
        if not isinstance(value, torch.Tensor):
            raise TargetError(f"target 'cpu': input {spec.target} of kind {spec.kind.name} is not a tensor")
        if value.dtype not in _NUMPY_DTYPES:
            raise TargetError(f"target 'cpu': weight {spec.target} has dtype {value.dtype}, which the cpu target "
                              f"does not run (supported: {_supported()})")
        tensors.append(value)
    return tensors


class _Lifted(torch.nn.Module):
    """The lifted graph as a module whose every input (weights first) is an argument."""

    def __init__(self, graph_module: torch.fx.GraphModule):
        super().__init__()
        self.graph_module = graph_module

    def forward(self, *args):
        return self.graph_module(*args)


def _check_lowerable(ep: torch.export.ExportedProgram, graph: str) -> None:
    """Raise ``TargetError`` naming the first op (or dtype) the CPU lowering cannot take."""
    for node in ep.graph.nodes:
        value = node.meta.get("val")
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, torch.Tensor) and v.dtype not in _NUMPY_DTYPES:
                raise TargetError(f"target 'cpu': {graph} graph, node {node.name} ({node.target}) has dtype {v.dtype}, "
                                  f"which the cpu target does not run (supported: {_supported()})")
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) \
                and node.target.namespace not in _LOWERABLE_NAMESPACES:
            raise TargetError(f"target 'cpu': {graph} graph calls op {node.target.name()}, which has no aten "
                              "decomposition (register it with inferpass.ir.ops.define_op and a reference)")


def lower_to_vmfb(ep: torch.export.ExportedProgram, inputs: tuple[torch.Tensor, ...], graph: str) -> bytes:
    """Compile ``ep`` for the static shapes of ``inputs`` (user inputs only) into an IREE vmfb whose function
    ``main`` takes the lifted weights, then the inputs."""
    import iree.compiler as ireec
    from torch_mlir import fx as torch_mlir_fx
    from torch_mlir.extras.fx_decomp_util import get_decomposition_table

    table = {**get_decomposition_table(), **reference_decompositions()}
    with torch.no_grad():
        static = torch.export.export(_Lifted(ep.graph_module), (*(t.detach() for t in _lifted_inputs(ep)), *inputs),
                                     strict=False)
        _check_lowerable(static.run_decompositions(table), graph)
    try:
        mlir = torch_mlir_fx.export_and_import(static, output_type="raw", decomposition_table=table, func_name="main")
        return ireec.compile_str(str(mlir), target_backends=["llvm-cpu"], input_type="torch", extra_args=list(FLAGS))
    except Exception as err:  # torch-mlir and IREE report unsupported ops in their own exception types
        raise TargetError(f"target 'cpu': cannot compile the {graph} graph: {str(err).strip()[:2000]}") from err


class CpuExecutable(Executable):
    """Runs each call through the static IREE function of its shape, compiling (or loading) it on first use.

    ``compiled`` / ``loaded`` count functions built here / found on disk; ``compile_seconds`` sums build time.
    """

    def __init__(self, program: Program, store: ArtifactStore):
        import iree.runtime as ireert
        from iree.runtime import _binding

        _binding.disable_leak_checker()  # its report at interpreter exit is about nanobind's own type objects

        super().__init__(program)
        self.store = store
        self._rt = ireert
        configs = {}  # driver -> runtime config; the weights live once per driver's device
        self.weights, self.configs = {}, {}
        for name, ep in program.graphs.items():
            driver = "local-sync" if name in SYNC_GRAPHS else "local-task"
            if driver not in configs:
                if driver == "local-task":
                    ireert.flags.parse_flags(f"--task_topology_max_group_count={torch.get_num_threads()}")
                configs[driver] = (ireert.Config(driver), {})
            config, device_weights = configs[driver]
            self.configs[name] = config
            self.weights[name] = [
                device_weights.setdefault(id(t), ireert.asdevicearray(config.device, t.detach().numpy()))
                for t in _lifted_inputs(ep)]
        self.output_dtypes = {name: [n.meta["val"].dtype for n in ep.graph.output_node().args[0]]
                              for name, ep in program.graphs.items()}
        self.functions: dict[tuple, object] = {}
        self.compiled = self.loaded = 0
        self.compile_seconds = 0.0
        versions = [importlib.metadata.version(p) for p in ("iree-base-compiler", "torch-mlir")]
        self._key_base = (versions, torch.__version__, FLAGS, host_cpu())

    def run(self, graph: str, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if graph == "prefill":
            return self._prefill(*inputs)
        return self._call(graph, inputs)

    def _prefill(self, ids: torch.Tensor, start: torch.Tensor, *caches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        layout = self.program.cache
        room = layout.max_len - int(start.max())
        pieces = prefill_pieces(ids.shape[1], room, layout.max_len, layout.accepts_padding)
        logits, first = [], 0
        for tokens, bucket in pieces:
            piece = ids[:, first : first + tokens]
            if bucket > tokens:
                piece = torch.nn.functional.pad(piece, (0, bucket - tokens))
            out, *caches = self._call("prefill", (piece, start + first, *caches))
            logits.append(out[:, :tokens])
            first += tokens
        return (torch.cat(logits, dim=1) if len(logits) > 1 else logits[0], *caches)

    def _call(self, graph: str, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        shapes = tuple((tuple(t.shape), str(t.dtype)) for t in inputs)
        fn = self.functions.get((graph, shapes)) or self._function(graph, inputs, shapes)
        out = fn(*self.weights[graph], *[np.ascontiguousarray(t.numpy()) for t in inputs])
        out = [torch.from_numpy(np.asarray(o.to_host())) for o in (out if isinstance(out, tuple) else (out,))]
        # IREE integers are signless: a uint8 result comes back as int8 with the same bits
        return tuple(t if t.dtype == d else t.view(d) for t, d in zip(out, self.output_dtypes[graph]))

    def _function(self, graph: str, inputs: tuple[torch.Tensor, ...], shapes: tuple):
        for t in inputs:
            if t.dtype not in _NUMPY_DTYPES:
                raise TargetError(f"target 'cpu': {graph} graph input of dtype {t.dtype} is not supported "
                                  f"(supported: {_supported()})")
        ep = self.program.graphs[graph]
        name = f"{graph}-{artifact_key(str(ep.graph), str(ep.graph_signature), shapes, self._key_base)}.vmfb"
        path = self.store.find(name)
        if path is None:
            t0 = time.perf_counter()
            path = self.store.put(name, lower_to_vmfb(ep, inputs, graph))
            self.compile_seconds += time.perf_counter() - t0
            self.compiled += 1
            log.info("cpu target: compiled %s for %s in %.1fs", graph, shapes, time.perf_counter() - t0)
        else:
            self.loaded += 1
        config = self.configs[graph]
        module = self._rt.VmModule.mmap(config.vm_instance, str(path))
        context = self._rt.SystemContext(vm_modules=[module], config=config)
        fn = context.modules.module["main"]
        self.functions[(graph, shapes)] = fn
        return fn

    def artifacts(self) -> dict[str, Path]:
        """Compiled functions this executable used (file name -> path), to save with the program."""
        return dict(self.store.used)


@register_target
class CpuTarget(Target):
    """IREE ``llvm-cpu`` through torch-mlir, static shapes, artifacts cached on disk (see module doc)."""

    name = "cpu"

    def __init__(self, cache_dir: str | Path | None = None):
        self.cache_dir = cache_dir

    def compile(self, program: Program) -> CpuExecutable:
        carried = [program.folder / "artifacts" / self.name] if program.folder else []
        return CpuExecutable(program, ArtifactStore(self.name, self.cache_dir, carried))
