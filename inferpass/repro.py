"""Reproduce a pass failure from a repro bundle written by ``ReproOnFailure``.

A bundle is untrusted: it names the plugins its passes came from but is never allowed to
import them. A pass that is not registered is an error telling the user to pass
``--plugin`` explicitly.
"""

from __future__ import annotations

import json
from pathlib import Path

from inferpass.capture import capture
from inferpass.errors import InferpassError, PipelineError
from inferpass.ir.program import Program
from inferpass.ir.serialize import load_program
from inferpass.passes import PassManager, Pipeline
from inferpass.passes.base import registered_passes
from inferpass.passes.instruments import file_digests


def reproduce(bundle: str | Path) -> str:
    """Re-run the failing pass of ``bundle`` on the program it received, with the recorded seed and mode.

    The input is re-captured from the recorded model directory (its files must still have the
    recorded sha256) and the recorded passes replayed, or loaded from the bundle. Returns the error
    message when the failure reproduces; raises ``InferpassError`` if it does not or cannot.
    """
    bundle = Path(bundle)
    try:
        record = json.loads((bundle / "repro.json").read_text())
        failing, applied, source = record["failing_pass"], record["applied"], record["input"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InferpassError(f"{bundle}: not a repro bundle ({exc})") from exc
    _check_plugins(bundle, record.get("plugins") or {})
    program = _input_program(bundle, source, applied, record["seed"])
    manager = PassManager(Pipeline.parse(failing), debug=record["debug"], seed=record["seed"], write_repro=False)
    try:
        manager.run(program)
    except InferpassError as exc:
        return str(exc.__cause__ or exc)
    raise InferpassError(f"{bundle}: pass {failing} did not fail this time (recorded: {record['error']})")


def _check_plugins(bundle: Path, plugins: dict[str, dict[str, str]]) -> None:
    registered = {cls.name for cls in registered_passes()}
    for name, plugin in plugins.items():
        if name not in registered:
            raise PipelineError(
                f"{bundle}: pass '{name}' comes from plugin module '{plugin['module']}' ({plugin['file']}), which "
                f"is not loaded; a bundle never imports code: pass --plugin {plugin['file']} if you trust it"
            )


def _input_program(bundle: Path, source: dict, applied: list[str], seed: int) -> Program:
    if source.get("kind") == "program":
        return load_program(bundle / source["path"])
    if source.get("kind") != "source":
        raise InferpassError(f"{bundle}: the bundle holds no input program ({source.get('reason', 'none recorded')}); "
                             "re-run the original command (repro.json 'argv')")
    model = Path(source["path"])
    if not model.is_dir():
        raise InferpassError(f"{bundle}: the model directory {model} it references is gone")
    digests = file_digests(model)
    changed = sorted(n for n in set(digests) | set(source["sha256"]) if digests.get(n) != source["sha256"].get(n))
    if changed:
        raise InferpassError(f"{bundle}: the model directory {model} changed since the failure "
                             f"({', '.join(changed)}: not the recorded sha256)")
    program = capture(model, max_len=source["max_len"])
    for spec in applied:  # one at a time: a program may carry a pass twice (e.g. re-optimized after loading)
        program = PassManager(Pipeline.parse(spec), seed=seed, write_repro=False).run(program).program
    return program
