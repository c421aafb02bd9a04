"""Pass instrumentation (after MLIR's PassInstrumentation): hooks around every pass.

* ``IRDump`` writes each stage's graphs into numbered folders (``00-input``, ``01-dce``, ...);
* ``ReproOnFailure`` records what a failing pass received (a reference to the model
  directory and the passes before it, or the program itself under a size cap), the
  pipeline and the seed into a bundle, with the one command that reproduces the failure.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shlex
import sys
import tempfile
import traceback
from pathlib import Path

from inferpass.ir.program import Program
from inferpass.passes.base import Pass, PassResult, get_pass


class Instrument:
    """Base instrument: every hook is a no-op."""

    def before_pipeline(self, program: Program) -> None: ...

    def after_pass(self, index: int, pass_: Pass, result: PassResult, seconds: float) -> None: ...

    def on_failure(self, index: int, pass_: Pass, program: Program, error: BaseException) -> str | None:
        """Return a line to add to the error message, or None."""
        return None


def graph_text(program: Program) -> dict[str, str]:
    """Readable code of each graph, for dumps and diffs."""
    return {name: ep.graph_module.print_readable(print_output=False) for name, ep in program.graphs.items()}


class IRDump(Instrument):
    """Write ``<dir>/NN-<pass>/<graph>.txt`` for the input (``00-input``) and after every pass."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def _write(self, stage: str, program: Program, summary: dict) -> None:
        folder = self.directory / stage
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in graph_text(program).items():
            (folder / f"{name}.txt").write_text(text)
        (folder / "summary.json").write_text(json.dumps(summary, indent=2, default=str))

    def before_pipeline(self, program):
        self._write("00-input", program, {"nodes": program.node_count(), "parameters": program.parameter_count()})

    def after_pass(self, index, pass_, result, seconds):
        summary = {
            "pass": pass_.spec(),
            "changed": result.changed,
            "seconds": seconds,
            "stats": result.stats,
            "nodes": result.program.node_count(),
            "parameters": result.program.parameter_count(),
        }
        self._write(f"{index + 1:02d}-{pass_.name}", result.program, summary)


REPRO_PROGRAM_CAP = 16 * 2**20  # weight bytes up to which a bundle carries the failing pass's input program


def file_digests(root: Path) -> dict[str, str]:
    """sha256 of the files capture reads from a model directory (``config.json``, ``*.safetensors``)."""
    digests = {}
    for f in [root / "config.json", *sorted(root.glob("*.safetensors"))]:
        if f.is_file():
            with f.open("rb") as data:
                digests[f.name] = hashlib.file_digest(data, "sha256").hexdigest()
    return digests


def weight_bytes(program: Program) -> int:
    """Bytes of the distinct weight and constant tensors of ``program``'s graphs."""
    seen = {id(t): t.numel() * t.element_size() for ep in program.graphs.values()
            for t in (*ep.state_dict.values(), *ep.constants.values()) if hasattr(t, "element_size")}
    return sum(seen.values())


class ReproOnFailure(Instrument):
    """On failure, write a bundle: ``repro.json`` (failing pass, the passes applied before it, seed, error)
    and the failing pass's input, as small as it can be.

    The input is referenced when it is a capture of a model directory that is still there plus the
    passes it records in ``applied``: the bundle keeps the directory's path, capture length and the
    sha256 of its files, and ``--repro`` re-captures and replays. Otherwise the program itself is
    saved into ``program/`` if its weights are at most ``REPRO_PROGRAM_CAP`` bytes, else the bundle
    holds the record alone (and says so). Plugins are recorded by module and file, never imported
    by ``--repro``.
    """

    def __init__(self, directory: str | Path | None, pipeline: str, seed: int, debug: bool):
        self.directory = directory
        self.pipeline = pipeline
        self.seed = seed
        self.debug = debug
        self.bundle: Path | None = None

    def on_failure(self, index, pass_, program, error):
        root = Path(self.directory) if self.directory else Path(tempfile.gettempdir())
        root.mkdir(parents=True, exist_ok=True)
        bundle = Path(tempfile.mkdtemp(prefix=f"inferpass-repro-{pass_.name}-", dir=root))
        record = {
            "pipeline": self.pipeline,
            "failing_index": index,
            "failing_pass": pass_.spec(),
            "applied": list(program.applied),
            "plugins": _plugins([*program.applied, pass_.spec()]),
            "input": self._input(program, bundle),
            "seed": self.seed,
            "debug": self.debug,
            "error": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exception(error),
            "argv": sys.argv,
        }
        (bundle / "repro.json").write_text(json.dumps(record, indent=2))
        command = f"optimize-model --repro {shlex.quote(str(bundle))}"
        plugins = sorted({p["file"] for p in record["plugins"].values()})
        command += "".join(f" --plugin {shlex.quote(f)}" for f in plugins)
        (bundle / "command.txt").write_text(command + "\n")
        self.bundle = bundle
        return f"repro bundle: {bundle}\nreproduce with: {command}"

    @staticmethod
    def _input(program: Program, bundle: Path) -> dict:
        from inferpass.ir.serialize import save_program

        source = Path(program.info.source).resolve() if program.info.source else None
        if source is not None and source.is_dir():
            return {"kind": "source", "path": str(source), "sha256": file_digests(source),
                    "max_len": program.cache.max_len if program.cache else None}
        size = weight_bytes(program)
        if size > REPRO_PROGRAM_CAP:
            return {"kind": "none", "reason": f"the failing pass's input has {size:,} weight bytes, over the "
                                              f"{REPRO_PROGRAM_CAP:,}-byte cap for bundles, and no model directory "
                                              "to re-capture it from"}
        save_program(program, bundle / "program")
        return {"kind": "program", "path": "program"}


def _plugins(specs: list[str]) -> dict[str, dict[str, str]]:
    """Module and file of each out-of-tree pass among ``specs`` (pipeline items), by pass name."""
    plugins = {}
    for spec in specs:
        cls = get_pass(spec.split("{")[0])
        if not cls.__module__.startswith("inferpass."):
            plugins[cls.name] = {"module": cls.__module__, "file": inspect.getfile(cls)}
    return plugins
