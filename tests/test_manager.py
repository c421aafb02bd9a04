"""The pass manager verifies after every pass, dumps IR, and turns any failure into a working repro."""

import json
import shlex
import subprocess
import sys

import pytest

from factories import tiny_decoder
from inferpass.capture import capture
from inferpass.errors import InferpassError
from inferpass.passes import PassFailure, PassManager, Pipeline
from plugins import broken_passes  # noqa: F401  (registers the broken passes)

CLI = [sys.executable, "-m", "inferpass.cli"]


@pytest.fixture(scope="module")
def program():
    return capture(tiny_decoder("llama", layers=2), max_len=12)


PLUGIN = broken_passes.__file__


def _run_repro(command: str) -> subprocess.CompletedProcess:
    argv = shlex.split(command)
    assert argv[:2] == ["optimize-model", "--repro"]
    return subprocess.run(CLI + argv[1:], capture_output=True, text=True, timeout=300)


def _bundle_size(bundle) -> int:
    return sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file())


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
    assert record["applied"] == ["dce"] and record["input"]["kind"] == "program"  # captured from a module
    command = message.split("reproduce with: ")[1].strip()
    assert command == (bundle / "command.txt").read_text().strip() and f"--plugin {PLUGIN}" in command
    done = _run_repro(command)
    assert done.returncode == 1, done.stderr
    assert "reproduced" in done.stderr and "metadata says torch.float16" in done.stderr


def test_repro_never_imports_the_plugin_a_bundle_names(program, tmp_path):
    with pytest.raises(PassFailure) as info:
        PassManager(Pipeline.parse("test-corrupt-metadata"), repro_dir=tmp_path).run(program)
    done = _run_repro(f"optimize-model --repro {info.value.bundle}")  # without --plugin
    assert done.returncode == 2, done.stderr
    assert (f"pass 'test-corrupt-metadata' comes from plugin module 'plugins.broken_passes' ({PLUGIN}), which is "
            f"not loaded; a bundle never imports code: pass --plugin {PLUGIN} if you trust it") in done.stderr


def test_bundles_are_capped_in_size(program, tmp_path, monkeypatch):
    from inferpass.passes import instruments
    from inferpass.repro import reproduce

    with pytest.raises(PassFailure) as info:
        PassManager(Pipeline.parse("test-corrupt-metadata"), repro_dir=tmp_path / "a").run(program)
    assert _bundle_size(info.value.bundle) < 1_000_000  # the tiny program itself
    monkeypatch.setattr(instruments, "REPRO_PROGRAM_CAP", 1000)
    with pytest.raises(PassFailure) as info:
        PassManager(Pipeline.parse("test-corrupt-metadata"), repro_dir=tmp_path / "b").run(program)
    assert not (info.value.bundle / "program").exists() and _bundle_size(info.value.bundle) < 64_000
    with pytest.raises(InferpassError, match=r"the bundle holds no input program \(the failing pass's input has "
                                             r"[\d,]+ weight bytes, over the 1,000-byte cap"):
        reproduce(info.value.bundle)


def test_bundle_refuses_a_changed_model_directory(tmp_path):
    from inferpass.repro import reproduce

    tiny_decoder("llama", layers=1, seed=3).save_pretrained(tmp_path / "m")
    with pytest.raises(PassFailure) as info:
        PassManager(Pipeline.parse("cse,test-corrupt-metadata"), repro_dir=tmp_path / "r").run(
            capture(tmp_path / "m", max_len=8))
    bundle = info.value.bundle
    assert json.loads((bundle / "repro.json").read_text())["input"]["kind"] == "source"
    assert "metadata says torch.float16" in reproduce(bundle)  # re-captured, cse replayed
    (tmp_path / "m" / "config.json").write_text((tmp_path / "m" / "config.json").read_text() + " ")
    with pytest.raises(InferpassError, match=r"model directory .* changed since the failure \(config.json: not the recorded sha256"):
        reproduce(bundle)


def test_debug_mode_catches_inexact_exact_pass(program, tmp_path):
    assert PassManager(Pipeline.parse("test-silently-wrong")).run(program).records[0].changed
    with pytest.raises(PassFailure, match=r"graph 'decode' changed its logits under an exact pass \(max abs diff") as info:
        PassManager(Pipeline.parse("test-silently-wrong"), debug=True, repro_dir=tmp_path).run(program)
    assert json.loads((info.value.bundle / "repro.json").read_text())["debug"] is True
    done = _run_repro(f"optimize-model --repro {info.value.bundle} --plugin {PLUGIN}")
    assert done.returncode == 1 and "under an exact pass" in done.stderr


def test_ir_dumps_and_records(program, tmp_path):
    run = PassManager(Pipeline.parse("dce,cse"), dump_dir=tmp_path).run(program)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00-input", "01-dce", "02-cse"]
    summary = json.loads((tmp_path / "02-cse" / "summary.json").read_text())
    assert summary["stats"]["nodes_merged"] > 0
    assert (tmp_path / "02-cse" / "decode.txt").read_text() != (tmp_path / "00-input" / "decode.txt").read_text()
    assert [r.spec for r in run.records] == ["dce", "cse"] and run.records[1].nodes_delta < 0
    assert run.program.applied == ["dce", "cse"] and program.applied == []
