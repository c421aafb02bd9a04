"""The ``cpu`` target: graphs compiled ahead of time by IREE for the host CPU, through torch-mlir's FX importer.

Lowering one graph for one static call shape (``static_shapes``: decode per batch size, prefill
per batch size and sequence bucket): the lifted graph, weights first, re-exported with every
dim fixed; custom ops decomposed to their aten references (``ir.ops.reference_decompositions``)
along with torch-mlir's own table; imported by torch-mlir as torch-dialect MLIR and compiled by
IREE for ``llvm-cpu`` with the host's CPU features into a vmfb of tens of KB (no weights).

A graph that takes caches is compiled as an in-place step (``in_place_step``: every cache write
an ``index_put`` copied back into its input, imported by torch-mlir as a mutable argument that
IREE writes through): the runtime hands IREE the caller's cache memory itself (imported as host
buffers, no copy) and IREE writes the new positions there, so a decode step no longer copies
every cache in and out. ``run`` then returns the cache inputs as the written caches (a
non-contiguous cache input is written through a contiguous copy, which is returned instead).
A graph with a ``uint8`` cache (kv-quant codes) stays functional: IREE 3.13 cannot convert a
mutable unsigned argument (``ui8`` to its signless ``i8``).

The IREE runtime calls it with the weights as device arrays made once, on a ``local-task``
pool of as many workers as torch has threads (decode steps too: a batched step is twice as fast
on two workers as inline). Static shapes because IREE runs
them at eager speed and dynamic ones about 2× slower (and, imported with symbolic shapes,
wrongly). Outputs equal eager up to fp32 rounding (IREE's fusion and reduction order).
"""

from __future__ import annotations

import importlib.metadata
import platform
from pathlib import Path

import numpy as np
import torch

from inferpass.errors import TargetError
from inferpass.ir.ops import reference_decompositions
from inferpass.ir.program import Program
from inferpass.targets.artifacts import ArtifactStore, artifact_key
from inferpass.targets.base import register_target
from inferpass.targets.in_place_step import in_place_step
from inferpass.targets.static_shapes import (Function, StaticShapeExecutable, StaticShapeTarget, lifted_inputs,
                                              static_export)

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


def _weights(ep: torch.export.ExportedProgram) -> list[torch.Tensor]:
    """The graph's lifted tensors, each checked to be of a dtype this target runs."""
    tensors = []
    for name, value in lifted_inputs(ep, "cpu"):
        if value.dtype not in _NUMPY_DTYPES:
            raise TargetError(f"target 'cpu': weight {name} has dtype {value.dtype}, which the cpu target "
                              f"does not run (supported: {_supported()})")
        tensors.append(value)
    return tensors


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


def lower_to_vmfb(ep: torch.export.ExportedProgram, inputs: tuple[torch.Tensor, ...], graph: str,
                  caches: int = 0) -> bytes:
    """Compile ``ep`` for the static shapes of ``inputs`` (user inputs only) into an IREE vmfb whose function
    ``main`` takes the lifted weights, then the inputs; with ``caches``, the last ``caches`` inputs are written
    in place (mutable arguments) and not returned."""
    import iree.compiler as ireec
    from torch_mlir import fx as torch_mlir_fx
    from torch_mlir.extras.fx_decomp_util import get_decomposition_table

    weights = _weights(ep)
    table = {**get_decomposition_table(), **reference_decompositions()}
    static = static_export(ep, inputs, "cpu")
    with torch.no_grad():
        _check_lowerable(static.run_decompositions(table), graph)
        if caches:
            step = in_place_step(ep, inputs, caches, triton=False, device=torch.device("cpu"))
            static = torch.export.export(step, (*weights, *inputs), strict=False)
    try:
        mlir = torch_mlir_fx.export_and_import(static, output_type="raw", decomposition_table=table, func_name="main",
                                               experimental_support_mutation=bool(caches))
        return ireec.compile_str(str(mlir), target_backends=["llvm-cpu"], input_type="torch", extra_args=list(FLAGS))
    except Exception as err:  # torch-mlir and IREE report unsupported ops in their own exception types
        raise TargetError(f"target 'cpu': cannot compile the {graph} graph: {str(err).strip()[:2000]}") from err


class CpuExecutable(StaticShapeExecutable):
    """Static IREE functions per call shape (see module doc)."""

    target = "cpu"
    suffix = ".vmfb"

    def __init__(self, program: Program, store: ArtifactStore):
        import iree.runtime as ireert
        from iree.runtime import _binding

        _binding.disable_leak_checker()  # its report at interpreter exit is about nanobind's own type objects
        versions = [importlib.metadata.version(p) for p in ("iree-base-compiler", "torch-mlir")]
        super().__init__(program, store, (versions, torch.__version__, FLAGS, host_cpu(), "caches written in place"))
        self._rt = ireert
        ireert.flags.parse_flags(f"--task_topology_max_group_count={torch.get_num_threads()}")
        self.config = ireert.Config("local-task")
        on_device: dict[int, object] = {}  # weights on the device by tensor id, shared between graphs
        self.weights = {name: [on_device.setdefault(id(t), ireert.asdevicearray(self.config.device, t.detach().numpy()))
                               for t in _weights(ep)] for name, ep in program.graphs.items()}
        self.output_dtypes = {name: [n.meta["val"].dtype for n in ep.graph.output_node().args[0]]
                              for name, ep in program.graphs.items()}

    def build(self, graph: str, inputs: tuple[torch.Tensor, ...]) -> bytes:
        for t in inputs:
            if t.dtype not in _NUMPY_DTYPES:
                raise TargetError(f"target 'cpu': {graph} graph input of dtype {t.dtype} is not supported "
                                  f"(supported: {_supported()})")
        return lower_to_vmfb(self.program.graphs[graph], inputs, graph, self._in_place_caches(graph))

    def _in_place_caches(self, graph: str) -> int:
        """How many trailing inputs of ``graph`` are caches written in place (0: functional; see module doc)."""
        tensors = self.program.cache_tensors(graph)
        return 0 if any(t.torch_dtype() == torch.uint8 for t in tensors) else len(tensors)

    def load(self, graph: str, path: Path) -> Function:
        config = self.config
        module = self._rt.VmModule.mmap(config.vm_instance, str(path))
        main = self._rt.SystemContext(vm_modules=[module], config=config).modules.module["main"]
        weights, caches = self.weights[graph], self._in_place_caches(graph)
        dtypes = self.output_dtypes[graph][: len(self.output_dtypes[graph]) - caches]
        device = config.device

        def call(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            split = len(inputs) - caches
            written = [t if t.is_contiguous() else t.contiguous() for t in inputs[split:]]
            out = main(*weights, *[np.ascontiguousarray(t.numpy()) for t in inputs[:split]],
                       *[self._in_place(device, t) for t in written])
            out = [torch.from_numpy(np.asarray(o.to_host())) for o in (out if isinstance(out, tuple) else (out,))]
            # IREE integers are signless: a uint8 result comes back as int8 with the same bits
            return (*(t if t.dtype == d else t.view(d) for t, d in zip(out, dtypes)), *written)

        return call

    def _in_place(self, device, tensor: torch.Tensor):
        """``tensor``'s memory as an IREE buffer view (no copy) that a call writes through."""
        rt = self._rt
        array = tensor.numpy()
        buffer = device.allocator.import_host_allocation(array, rt.MemoryType.DEVICE_LOCAL | rt.MemoryType.HOST_VISIBLE,
                                                         rt.BufferUsage.DEFAULT)
        return rt.HalBufferView(buffer, array.shape, rt.array_interop.map_dtype_to_element_type(array.dtype))


@register_target
class CpuTarget(StaticShapeTarget):
    """IREE ``llvm-cpu`` through torch-mlir, static shapes, artifacts cached on disk (see module doc)."""

    name = "cpu"
    executable = CpuExecutable
