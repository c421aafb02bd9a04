"""Saved programs load back and run identically; writes are atomic."""

import json

import pytest
import torch

from factories import tiny_decoder, tiny_vit
from inferpass.capture import capture
from inferpass.errors import ModelLoadError
from inferpass.ir import serialize
from inferpass.ir.examples import example_inputs
from inferpass.ir.serialize import load_program, save_program
from inferpass.ir.verify import verify_program
from inferpass.passes import PassManager, Pipeline


@pytest.mark.parametrize("make", [lambda: tiny_decoder("gpt2", tie=True), lambda: tiny_decoder("mistral"), tiny_vit])
def test_round_trip_runs_identically(make, tmp_path):
    program = capture(make(), max_len=10) if make is not tiny_vit else capture(make())
    program = PassManager(Pipeline.parse("cse,drop-unused-params")).run(program).program
    out = save_program(program, tmp_path / "model", extra={"pipeline": "cse,drop-unused-params"})
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pipeline"] == "cse,drop-unused-params" and manifest["versions"]["torch"] == torch.__version__
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", "weights.safetensors", *(f"{g}.pt2" for g in program.graphs)]
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


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    program = capture(tiny_decoder("llama", layers=1), max_len=8)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(serialize, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_program(program, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_needs_overwrite_and_is_replaced_whole(tmp_path):
    program = capture(tiny_decoder("llama", layers=1), max_len=8)
    save_program(program, tmp_path / "m")
    with pytest.raises(FileExistsError, match="already exists"):
        save_program(program, tmp_path / "m")
    (tmp_path / "m" / "stale.txt").write_text("x")
    save_program(program, tmp_path / "m", overwrite=True)
    assert not (tmp_path / "m" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_tampered_files_are_rejected(tmp_path):
    out = save_program(capture(tiny_decoder("llama", layers=1), max_len=8), tmp_path / "m")
    with open(out / "decode.pt2", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(ModelLoadError, match=r"decode.pt2: missing or checksum mismatch"):
        load_program(out)
    (out / "manifest.json").write_text("{")
    with pytest.raises(ModelLoadError, match="cannot read inferpass manifest"):
        load_program(out)
