"""optimize-model end to end, and a clear error that leaves nothing behind for each kind of bad input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BloomConfig

from factories import tiny_decoder
from inferpass.cli import DEFAULT_PIPELINES, main
from inferpass.ir.serialize import load_program
from inferpass.runtime.generator import Generator
from inferpass.targets import get_target

PLUGIN = str(Path(__file__).parent / "plugins" / "broken_passes.py")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    tiny_decoder("llama", layers=2, seed=1).save_pretrained(path)
    return path


def _copy(model_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(model_dir, dst)
    return dst


def test_list_passes_console_script():
    exe = Path(sys.executable).parent / "optimize-model"
    assert exe.is_file(), f"optimize-model is not installed beside {sys.executable}"
    done = subprocess.run([str(exe), "--list-passes"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for name in ("dce", "cse", "drop-unused-params"):
        assert name in done.stdout
    assert "exact" in done.stdout and "graphs=None" in done.stdout


def test_optimize_writes_a_folder_that_runs_like_the_model(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(model_dir), "--out", str(out), "--explain", "--max-len", "16"]) == 0
    printed = capsys.readouterr().out
    assert "what each pass changed" in printed and "nodes_merged" in printed and "wrote" in printed
    assert "plan batch 1" in printed  # lean-attention's GPU plan
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pipeline"] == DEFAULT_PIPELINES["decoder"] and manifest["target"] == "eager"
    assert [r["spec"].split("{")[0] for r in manifest["records"]] == ["dce", "cse", "drop-unused-params",
                                                                      "lean-attention"]
    diffs = manifest["report"]["max_abs_output_diff"]
    assert diffs["prefill"] == 0.0 and diffs["decode"] < 1e-5  # lean attention: exact up to fp32 rounding
    program = load_program(out)
    model = tiny_decoder("llama", layers=2, seed=1)
    tokens = Generator(get_target("eager").compile(program)).generate([[1, 2, 3]], max_new_tokens=5).tokens[0]
    with torch.no_grad():
        want = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False)[0, 3:].tolist()
    assert tokens == want


def _fails(argv, capsys, message, out):
    assert main(argv + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".out")] == []
    return err


def test_missing_model_dir(tmp_path, capsys):
    _fails([str(tmp_path / "nope")], capsys, "does not exist", tmp_path / "out")


def test_directory_without_config(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _fails([str(tmp_path / "empty")], capsys, "no config.json", tmp_path / "out")


def test_corrupt_config(model_dir, tmp_path, capsys):
    bad = _copy(model_dir, tmp_path)
    (bad / "config.json").write_text("{not json")
    _fails([str(bad)], capsys, "cannot read model config", tmp_path / "out")


def test_corrupt_weights(model_dir, tmp_path, capsys):
    bad = _copy(model_dir, tmp_path)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _fails([str(bad)], capsys, "model.safetensors: corrupt safetensors file", tmp_path / "out")


def test_missing_weights(model_dir, tmp_path, capsys):
    bad = _copy(model_dir, tmp_path)
    (bad / "model.safetensors").unlink()
    _fails([str(bad)], capsys, "no *.safetensors weight files", tmp_path / "out")


def test_unsupported_architecture(tmp_path, capsys):
    BloomConfig(n_layer=1, hidden_size=8, n_head=2, vocab_size=10).save_pretrained(tmp_path / "bloom")
    _fails([str(tmp_path / "bloom")], capsys, "model_type 'bloom' is not supported", tmp_path / "out")


@pytest.mark.parametrize(
    "pipeline, message",
    [
        ("dce,frobnicate", "unknown pass 'frobnicate'"),
        ("cse{graph=[decode]}", "pass 'cse': bad config: graph: Extra inputs are not permitted"),
        ("cse{graphs=7}", "pass 'cse': bad config: graphs: Input should be a valid list"),
        ("cse{graphs=[encoder]}", "no graph 'encoder'"),
    ],
)
def test_bad_pipeline(model_dir, tmp_path, capsys, pipeline, message):
    _fails([str(model_dir), "--pipeline", pipeline], capsys, message, tmp_path / "out")


def test_broken_pass_prints_repro_command(model_dir, tmp_path, capsys):
    err = _fails(
        [str(model_dir), "--plugin", PLUGIN, "--pipeline", "dce,test-corrupt-metadata", "--repro-dir", str(tmp_path / "r")],
        capsys,
        "reproduce with: optimize-model --repro",
        tmp_path / "out",
    )
    assert "metadata says torch.float16" in err
    bundles = list((tmp_path / "r").iterdir())
    assert len(bundles) == 1 and (bundles[0] / "program" / "manifest.json").is_file()


def test_existing_output_is_not_overwritten(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main([str(model_dir), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"


def test_no_model_dir_without_default_model(tmp_path, capsys, monkeypatch):
    import inferpass.cli as cli

    monkeypatch.setattr(cli, "DEFAULT_MODEL", tmp_path / "missing-default")
    assert main(["--out", str(tmp_path / "out")]) == 2
    assert "embedded default model is not installed" in capsys.readouterr().err


def test_unknown_target(model_dir, tmp_path, capsys):
    _fails([str(model_dir), "--target", "tpu"], capsys, "unknown target 'tpu'; available: cpu, cuda, eager, inductor",
           tmp_path / "out")


def test_bert_classifier_report(tmp_path, capsys):
    from factories import tiny_bert

    tiny_bert(layers=2).save_pretrained(tmp_path / "bert")
    assert main([str(tmp_path / "bert"), "--out", str(tmp_path / "out")]) == 0
    metrics = json.loads((tmp_path / "out" / "manifest.json").read_text())["report"]["metrics"]
    assert metrics["top-1 agreement"]["optimized"] == 1.0 and "accuracy" not in metrics


def test_missing_eval_text(model_dir, tmp_path, capsys):
    _fails([str(model_dir), "--eval-text", str(tmp_path / "none.txt")], capsys, "is not a file", tmp_path / "out")
