"""Reproduce a pass failure from a repro bundle written by ``ReproOnFailure``."""

from __future__ import annotations

import json
from pathlib import Path

from inferpass.errors import InferpassError
from inferpass.ir.serialize import load_program
from inferpass.passes import PassManager, Pipeline
from inferpass.plugins import load_plugin


def reproduce(bundle: str | Path) -> str:
    """Re-run the failing pass of ``bundle`` on the program it received, with the recorded seed and mode.

    Returns the error message when the failure reproduces; raises ``InferpassError`` if it does not.
    """
    bundle = Path(bundle)
    try:
        record = json.loads((bundle / "repro.json").read_text())
    except (OSError, ValueError) as exc:
        raise InferpassError(f"{bundle}: not a repro bundle ({exc})") from exc
    plugin = record["plugin"]
    load_plugin(plugin["module"], plugin["file"])
    program = load_program(bundle / "program")
    manager = PassManager(
        Pipeline.parse(record["failing_pass"]), debug=record["debug"], seed=record["seed"], write_repro=False
    )
    try:
        manager.run(program)
    except InferpassError as exc:
        return str(exc.__cause__ or exc)
    raise InferpassError(f"{bundle}: pass {record['failing_pass']} did not fail this time (recorded: {record['error']})")
