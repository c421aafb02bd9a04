"""Saved programs load back and run identically; writes are atomic, never replace what is not ours, and
report OS failures clearly; edited manifests and metadata that contradicts the graphs are refused."""

import errno
import json
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors import SafetensorError

from factories import tiny_decoder, tiny_vit
from inferpass.capture import capture
from inferpass.errors import ModelLoadError, OutputError
from inferpass.ir import output_folder, serialize
from inferpass.ir.examples import example_inputs
from inferpass.ir.output_folder import check_output
from inferpass.ir.serialize import load_program, manifest_checksum, save_program
from inferpass.ir.verify import verify_program
from inferpass.passes import PassManager, Pipeline


@pytest.fixture(scope="module")
def small():
    """A one-layer Llama program (cache of 8 slots), captured once for this module."""
    return capture(tiny_decoder("llama", layers=1), max_len=8)


@pytest.mark.parametrize("make", [lambda: tiny_decoder("gpt2", tie=True), lambda: tiny_decoder("mistral"), tiny_vit])
def test_round_trip_runs_identically(make, tmp_path):
    program = capture(make(), max_len=10) if make is not tiny_vit else capture(make())
    program = PassManager(Pipeline.parse("cse,drop-unused-params")).run(program).program
    out = save_program(program, tmp_path / "model", extra={"pipeline": "cse,drop-unused-params"})
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pipeline"] == "cse,drop-unused-params" and manifest["versions"]["torch"] == torch.__version__
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", "weights.safetensors", *(f"{g}.json" for g in program.graphs)]
    )
    loaded = load_program(out)
    verify_program(loaded)
    assert loaded.applied == program.applied and loaded.cache == program.cache
    for graph, ep in program.graphs.items():
        inputs = example_inputs(program, graph)
        with torch.no_grad():
            want, got = ep.module()(*inputs), loaded.graphs[graph].module()(*inputs)
        want, got = (x if isinstance(x, tuple) else (x,) for x in (want, got))
        assert all(torch.equal(a, b) for a, b in zip(want, got))


def test_shared_weights_are_stored_once(tmp_path):
    program = capture(tiny_decoder("llama", layers=2), max_len=10)
    out = save_program(program, tmp_path / "m")
    size = (out / "weights.safetensors").stat().st_size
    params = sum(t.numel() * t.element_size() for t in program.graphs["prefill"].state_dict.values())
    assert params <= size < 1.2 * params + 10_000


def test_saved_files_follow_the_umask(small, tmp_path):
    old = os.umask(0o022)
    try:
        out = save_program(small, tmp_path / "m")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {p.name: 0o644 for p in out.iterdir()}


@pytest.mark.parametrize("failure, message", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on the device"),
    (OSError(errno.EROFS, "Read-only file system"), "read-only file system"),
    (OSError(errno.EACCES, "Permission denied"), "permission denied"),
    # safetensors' writer raises its own error type naming the os error
    (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
     "no space left on the device"),
])
def test_failed_save_is_a_clear_error_and_leaves_nothing(small, tmp_path, monkeypatch, failure, message):
    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(serialize, "save_file", fail)
    with pytest.raises(OutputError, match=f"cannot write {tmp_path / 'm'}: {message}.*nothing was written"):
        save_program(small, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_needs_overwrite_and_is_replaced_whole(small, tmp_path):
    save_program(small, tmp_path / "m")
    with pytest.raises(OutputError, match="already exists"):
        save_program(small, tmp_path / "m")
    (tmp_path / "m" / "stale.txt").write_text("x")
    save_program(small, tmp_path / "m", overwrite=True)
    assert not (tmp_path / "m" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_overwrite_never_replaces_a_folder_that_is_not_ours(small, tmp_path):
    model = tmp_path / "hf-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(OutputError, match="not an inferpass output"):
        save_program(small, model, overwrite=True)
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]
    (tmp_path / "empty").mkdir()
    save_program(small, tmp_path / "empty", overwrite=True)  # an empty folder may be filled


def test_check_output_refuses_inputs_the_current_directory_and_files(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    for out in (model, model / "sub" / "out", tmp_path):
        with pytest.raises(OutputError, match="would overwrite the input"):
            check_output(out, overwrite=True, sources=[model])
    monkeypatch.chdir(model)
    for out in (".", model, tmp_path):
        with pytest.raises(OutputError, match="current directory"):
            check_output(out, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="exists and is not a folder"):
        check_output(tmp_path / "file", overwrite=True)
    check_output(tmp_path / "new" / "deeper", overwrite=False, sources=[model])


def test_check_output_names_read_only_and_full_file_systems(tmp_path, monkeypatch):
    monkeypatch.setattr(output_folder.shutil, "disk_usage", lambda path: SimpleNamespace(free=5 * 2**20))
    with pytest.raises(OutputError, match=r"needs about 100.0 MiB and only 5.0 MiB is free"):
        check_output(tmp_path / "out", overwrite=False, expected_bytes=100 * 2**20)
    monkeypatch.setattr(output_folder.os, "access", lambda path, mode: False)
    monkeypatch.setattr(output_folder.os, "statvfs", lambda path: SimpleNamespace(f_flag=os.ST_RDONLY))
    with pytest.raises(OutputError, match=r"is not writable \(read-only file system\)"):
        check_output(tmp_path / "out", overwrite=False)


def test_a_save_killed_midway_is_cleaned_up_by_the_next_save(small, tmp_path):
    """A process killed while writing leaves its temporary folder; the next save to that place removes it
    (and keeps a live process's)."""
    saved = save_program(small, tmp_path / "src")
    script = (
        "import sys, time\n"
        "from inferpass.ir import serialize\n"
        "program = serialize.load_program(sys.argv[1])\n"
        "serialize.save_file = lambda *a, **k: (print('writing', flush=True), time.sleep(600))\n"
        "serialize.save_program(program, sys.argv[2])\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(saved), str(tmp_path / "m")], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".m.tmp-")]
    assert len(left) == 1 and not (tmp_path / "m").exists()
    live = tmp_path / f".m.tmp-{os.getpid()}-live"
    live.mkdir()
    save_program(small, tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "m", "src"])
    load_program(tmp_path / "m")


def test_tampered_files_are_rejected(small, tmp_path):
    out = save_program(small, tmp_path / "m")
    with open(out / "decode.json", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(ModelLoadError, match=r"decode.json: missing or checksum mismatch"):
        load_program(out)
    (out / "manifest.json").write_text("{")
    with pytest.raises(ModelLoadError, match="cannot read inferpass manifest"):
        load_program(out)


def _edit_manifest(folder, edit, *, rehash: bool):
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    if rehash:
        manifest["manifest_sha256"] = manifest_checksum(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _swap_two_weights(manifest):
    weights = manifest["graphs"]["decode"]["weights"]
    a, b = "model.model.embed_tokens.weight", "model.model.layers.0.self_attn.q_proj.weight"
    weights[a], weights[b] = weights[b], weights[a]


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["info"].update(vocab_size=65), r"contradicts the graphs: graph '(prefill|decode)': returns logits "
                                                r"\[s\d+, (s\d+|1), 64\], the program says 65 vocabulary entries"),
    (lambda m: m["cache"].update(max_len=4096), "says max_len 4096 but graph 'prefill' was captured for 8"),
    (lambda m: m["cache"]["tensors"][0].update(dtype="float16"), "cache input k0 is torch.float32"),
    (lambda m: m["graphs"]["decode"]["role"].update(tokens=2), "graph 'decode': takes 1 tokens per row, its role "
                                                               "says 2"),
    (lambda m: m["graphs"]["decode"]["role"].update(caches=["v0", "k0"]), "role's caches \\['v0', 'k0'\\] are "
                                                                         "not tensors of the cache layout in layout"),
    (_swap_two_weights, "graph 'decode' expects model.model.embed_tokens.weight as torch.float32"),
    (lambda m: m.pop("graphs"), "malformed manifest.*graphs"),
    (lambda m: m.update(applied="dce"), "malformed manifest.*applied"),
])
def test_manifest_edits_are_refused(small, tmp_path, edit, message):
    out = save_program(small, tmp_path / "m")
    original = (out / "manifest.json").read_text()
    _edit_manifest(out, edit, rehash=False)
    with pytest.raises(ModelLoadError, match="the manifest was edited after it was saved"):
        load_program(out)
    (out / "manifest.json").write_text(original)
    _edit_manifest(out, edit, rehash=True)  # a consistent-looking manifest still has to agree with the graphs
    with pytest.raises(ModelLoadError, match=message):
        load_program(out)
