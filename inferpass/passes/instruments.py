"""Pass instrumentation (after MLIR's PassInstrumentation): hooks around every pass.

* ``IRDump`` writes each stage's graphs into numbered folders (``00-input``, ``01-dce``, ...);
* ``ReproOnFailure`` saves the program a failing pass received, the pipeline and the
  seed into a bundle, with the one command that reproduces the failure.
"""

from __future__ import annotations

import inspect
import json
import shlex
import sys
import tempfile
import traceback
from pathlib import Path

from inferpass.ir.program import Program
from inferpass.passes.base import Pass, PassResult


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


class ReproOnFailure(Instrument):
    """On failure, save ``repro.json`` + the failing pass's input program into a bundle folder."""

    def __init__(self, directory: str | Path | None, pipeline: str, seed: int, debug: bool):
        self.directory = directory
        self.pipeline = pipeline
        self.seed = seed
        self.debug = debug
        self.bundle: Path | None = None

    def on_failure(self, index, pass_, program, error):
        from inferpass.ir.serialize import save_program

        root = Path(self.directory) if self.directory else Path(tempfile.gettempdir())
        root.mkdir(parents=True, exist_ok=True)
        bundle = Path(tempfile.mkdtemp(prefix=f"inferpass-repro-{pass_.name}-", dir=root))
        save_program(program, bundle / "program")
        record = {
            "pipeline": self.pipeline,
            "failing_index": index,
            "failing_pass": pass_.spec(),
            "plugin": {"module": type(pass_).__module__, "file": inspect.getfile(type(pass_))},
            "seed": self.seed,
            "debug": self.debug,
            "error": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exception(error),
            "argv": sys.argv,
        }
        (bundle / "repro.json").write_text(json.dumps(record, indent=2))
        command = f"optimize-model --repro {shlex.quote(str(bundle))}"
        (bundle / "command.txt").write_text(command + "\n")
        self.bundle = bundle
        return f"repro bundle: {bundle}\nreproduce with: {command}"
