"""The pass manager verifies after every pass, dumps IR, and turns any failure into a working repro."""

import json
import shlex
import subprocess
import sys

import pytest

from factories import tiny_decoder
from inferpass.capture import capture
from inferpass.passes import PassFailure, PassManager, Pipeline
from plugins import broken_passes  # noqa: F401  (registers the broken passes)

CLI = [sys.executable, "-m", "inferpass.cli"]


@pytest.fixture(scope="module")
def program():
    return capture(tiny_decoder("llama", layers=2), max_len=12)


def _run_repro(command: str) -> subprocess.CompletedProcess:
    argv = shlex.split(command)
    assert argv[:2] == ["optimize-model", "--repro"]
    return subprocess.run(CLI + argv[1:], capture_output=True, text=True, timeout=300)


def test_verifier_catches_broken_pass_and_repro_reproduces(program, tmp_path):
    manager = PassManager(Pipeline.parse("dce,test-corrupt-metadata,cse"), repro_dir=tmp_path)
    with pytest.raises(PassFailure) as info:
        manager.run(program)
    message = str(info.value)
    assert "pass 'test-corrupt-metadata' failed" in message
    assert "metadata says torch.float16" in message and "computes torch.float32" in message
    bundle = info.value.bundle
    record = json.loads((bundle / "repro.json").read_text())
    assert record["failing_pass"] == "test-corrupt-metadata" and record["pipeline"].startswith("dce,")
    command = message.split("reproduce with: ")[1].strip()
    assert command == (bundle / "command.txt").read_text().strip()
    done = _run_repro(command)
    assert done.returncode == 1, done.stderr
    assert "reproduced" in done.stderr and "metadata says torch.float16" in done.stderr


def test_debug_mode_catches_inexact_exact_pass(program, tmp_path):
    assert PassManager(Pipeline.parse("test-silently-wrong")).run(program).records[0].changed
    with pytest.raises(PassFailure, match=r"graph 'decode' output 0 changed .* under an exact pass") as info:
        PassManager(Pipeline.parse("test-silently-wrong"), debug=True, repro_dir=tmp_path).run(program)
    assert json.loads((info.value.bundle / "repro.json").read_text())["debug"] is True
    done = _run_repro(f"optimize-model --repro {info.value.bundle}")
    assert done.returncode == 1 and "under an exact pass" in done.stderr


def test_ir_dumps_and_records(program, tmp_path):
    run = PassManager(Pipeline.parse("dce,cse"), dump_dir=tmp_path).run(program)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00-input", "01-dce", "02-cse"]
    summary = json.loads((tmp_path / "02-cse" / "summary.json").read_text())
    assert summary["stats"]["nodes_merged"] > 0
    assert (tmp_path / "02-cse" / "decode.txt").read_text() != (tmp_path / "00-input" / "decode.txt").read_text()
    assert [r.spec for r in run.records] == ["dce", "cse"] and run.records[1].nodes_delta < 0
    assert run.program.applied == ["dce", "cse"] and program.applied == []
