"""optimize-model end to end, and a clear error that leaves nothing behind for each kind of bad input."""

import json
import shutil
import subprocess
import sys
import time
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
    assert "PydanticUndefined" not in done.stdout  # factory defaults show their value
    assert "graphs=['decode']" in done.stdout and "bits_per_layer={}" in done.stdout
    assert "value_group='auto'" in done.stdout  # kv-quant picks it per model


def test_optimize_writes_a_folder_that_runs_like_the_model(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(model_dir), "--out", str(out), "--explain", "--max-len", "16", "--speed-budget", "0"]) == 0
    printed = capsys.readouterr().out
    assert "what each pass changed" in printed and "nodes_merged" in printed and "wrote" in printed
    for step in ("capturing", "running passes", "greedy agreement", "measuring decoder speed"):
        assert f"✓ {step}" in printed  # progress, as log lines when stdout is no terminal
    assert "speeds: 3 interleaved rounds; ratios" in printed and "± (95% CI)" in printed  # 0 s: the first 3 only
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


@pytest.fixture
def no_capture(monkeypatch):
    """Makes any capture fail the test: what it guards must be refused before capture."""
    import inferpass.commands

    def capture(*args, **kwargs):
        raise AssertionError("captured although the input was invalid")

    monkeypatch.setattr(inferpass.commands, "capture", capture)


def _fails(argv, capsys, message, out):
    assert main(argv + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".out")] == []
    return err


def test_missing_model_dir(tmp_path, capsys, no_capture):
    _fails([str(tmp_path / "nope")], capsys, "does not exist", tmp_path / "out")


def test_directory_without_config(tmp_path, capsys, no_capture):
    (tmp_path / "empty").mkdir()
    _fails([str(tmp_path / "empty")], capsys, "no config.json", tmp_path / "out")


def test_corrupt_config(model_dir, tmp_path, capsys, no_capture):
    bad = _copy(model_dir, tmp_path)
    (bad / "config.json").write_text("{not json")
    _fails([str(bad)], capsys, "cannot read model config", tmp_path / "out")


def test_corrupt_weights(model_dir, tmp_path, capsys):
    bad = _copy(model_dir, tmp_path)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _fails([str(bad)], capsys, "model.safetensors: corrupt safetensors file", tmp_path / "out")


def test_missing_weight_tensor_is_named(model_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    bad = _copy(model_dir, tmp_path)
    weights = load_file(bad / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    err = _fails([str(bad)], capsys, f"{bad}: weights do not match config.json "
                 "(1 missing: model.layers.1.mlp.up_proj.weight)", tmp_path / "out")
    assert "Traceback" not in err


def test_missing_weights(model_dir, tmp_path, capsys, no_capture):
    bad = _copy(model_dir, tmp_path)
    (bad / "model.safetensors").unlink()
    _fails([str(bad)], capsys, "no *.safetensors weight files", tmp_path / "out")


def test_unsupported_architecture(tmp_path, capsys, no_capture):
    BloomConfig(n_layer=1, hidden_size=8, n_head=2, vocab_size=10).save_pretrained(tmp_path / "bloom")
    _fails([str(tmp_path / "bloom")], capsys, f"{tmp_path / 'bloom'}: model_type 'bloom' is not supported "
           "(supported: llama, qwen2, mistral, gpt2, vit, bert)", tmp_path / "out")


def test_unknown_model_type_lists_the_supported_ones(model_dir, tmp_path, capsys, no_capture):
    bad = _copy(model_dir, tmp_path)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "frobnet"}))
    err = _fails([str(bad)], capsys, f"{bad}: model_type 'frobnet' is not supported (supported: llama, qwen2, "
                 "mistral, gpt2, vit, bert)", tmp_path / "out")
    assert "upgrade" not in err.lower()  # transformers' own advice does not leak through


@pytest.mark.parametrize(
    "pipeline, message",
    [
        ("dce,frobnicate", "unknown pass 'frobnicate'"),
        ("cse{graph=[decode]}", "pass 'cse': bad config: graph: Extra inputs are not permitted"),
        ("cse{graphs=7}", "pass 'cse': bad config: graphs: Input should be a valid list"),
        ("cse{graphs=[encoder]}", "error: pass 'cse{graphs=[encoder]}': no graph 'encoder' in the decoder"),
        ("lean-attention{graphs=[forward]}", "no graph 'forward' in the decoder"),
        ("cse{graphs=}", "pass 'cse': 'graphs=' has no value (leave the key out for its default)"),
        ("", "--pipeline '' names no passes and would run nothing; omit --pipeline for the default preset"),
        ("dce,dce", "pass 'dce' is listed twice"),
        ("kv-quant{bits=4},kv-quant{bits=2}", "conflicting configs for pass 'kv-quant'"),
    ],
)
def test_bad_pipeline_is_refused_before_capture(model_dir, tmp_path, capsys, no_capture, pipeline, message):
    _fails([str(model_dir), "--pipeline", pipeline], capsys, message, tmp_path / "out")


def test_graph_names_are_checked_against_the_model_kind(tmp_path, capsys, no_capture):
    from factories import tiny_bert

    tiny_bert(layers=1).save_pretrained(tmp_path / "bert")
    _fails([str(tmp_path / "bert"), "--pipeline", "cse{graphs=[decode]}"], capsys,
           f"no graph 'decode' in the encoder {tmp_path / 'bert'} (its graphs: forward)", tmp_path / "out")
    _fails([str(tmp_path / "bert"), "--max-len", "16"], capsys,
           f"--max-len sets a decoder's KV-cache length; {tmp_path / 'bert'} is an encoder (bert)", tmp_path / "out")


@pytest.mark.parametrize("value", ["0", "-5", "2", "99999"])
def test_max_len_out_of_range_is_refused_before_capture(model_dir, tmp_path, capsys, no_capture, value):
    _fails([str(model_dir), "--max-len", value], capsys,
           f"error: --max-len {value} is out of range: allowed 3..64", tmp_path / "out")


def test_output_inside_the_model_is_refused_before_capture(model_dir, tmp_path, capsys, no_capture):
    model = _copy(model_dir, tmp_path)
    before = sorted(p.name for p in model.iterdir())
    for out in (model, model / "sub"):
        assert main([str(model), "--out", str(out), "--force"]) == 2
        assert "would overwrite the input" in capsys.readouterr().err
    assert sorted(p.name for p in model.iterdir()) == before


def test_save_failure_is_a_clear_error(model_dir, tmp_path, capsys, monkeypatch):
    import inferpass.commands
    from inferpass.errors import OutputError

    def full_disk(program, out, **kwargs):
        raise OutputError(f"cannot write {out}: no space left on the device; nothing was written")

    monkeypatch.setattr(inferpass.commands, "save_program", full_disk)
    _fails([str(model_dir), "--no-eval", "--max-len", "16"], capsys, "error: cannot write", tmp_path / "out")


def test_broken_pass_prints_repro_command(model_dir, tmp_path, capsys):
    err = _fails(
        [str(model_dir), "--plugin", PLUGIN, "--pipeline", "dce,test-corrupt-metadata", "--repro-dir", str(tmp_path / "r"),
         "--max-len", "16"],
        capsys,
        f"reproduce with: optimize-model --repro {tmp_path / 'r'}",
        tmp_path / "out",
    )
    assert "metadata says torch.float16" in err and f"--plugin {PLUGIN}" in err
    (bundle,) = (tmp_path / "r").iterdir()
    record = json.loads((bundle / "repro.json").read_text())
    assert record["input"]["kind"] == "source" and record["input"]["path"] == str(model_dir.resolve())
    assert record["applied"] == ["dce"] and record["input"]["max_len"] == 16
    assert sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file()) < 64_000  # the model is referenced
    assert main(["--repro", str(bundle), "--plugin", PLUGIN]) == 1  # re-captures, replays dce, fails again
    assert "reproduced: " in capsys.readouterr().err


@pytest.mark.parametrize("pipeline", ["kv-quant{value_group=24}", "kv-quant{layers=[7]}"])
def test_config_errors_found_by_a_pass_write_no_repro_bundle(model_dir, tmp_path, capsys, pipeline):
    err = _fails([str(model_dir), "--pipeline", pipeline, "--repro-dir", str(tmp_path / "r"), "--max-len", "16"],
                 capsys, "error: pass 'kv-quant", tmp_path / "out")
    assert "repro" not in err and not (tmp_path / "r").exists()


def test_existing_output_is_not_overwritten(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main([str(model_dir), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"


def test_no_model_dir_without_default_model(tmp_path, capsys, monkeypatch):
    import inferpass.commands as commands

    monkeypatch.setattr(commands, "DEFAULT_MODEL", tmp_path / "missing-default")
    assert main(["--out", str(tmp_path / "out")]) == 2
    assert "embedded default model is not installed" in capsys.readouterr().err


def test_unknown_target(model_dir, tmp_path, capsys, no_capture):
    _fails([str(model_dir), "--target", "tpu"], capsys, "unknown target 'tpu'; available: cpu, cuda, eager, inductor",
           tmp_path / "out")


def test_bert_classifier_report(tmp_path, capsys):
    from factories import tiny_bert

    tiny_bert(layers=2).save_pretrained(tmp_path / "bert")
    assert main([str(tmp_path / "bert"), "--out", str(tmp_path / "out"), "--speed-budget", "0"]) == 0
    metrics = json.loads((tmp_path / "out" / "manifest.json").read_text())["report"]["metrics"]
    assert metrics["top-1 agreement"]["optimized"] == 1.0 and "accuracy" not in metrics


def test_missing_eval_text(model_dir, tmp_path, capsys, no_capture):
    _fails([str(model_dir), "--eval-text", str(tmp_path / "none.txt")], capsys, "is not a file", tmp_path / "out")


def test_eval_text_needs_a_byte_level_model(model_dir, tmp_path, capsys, no_capture):
    (tmp_path / "t.txt").write_text("some text")
    _fails([str(model_dir), "--eval-text", str(tmp_path / "t.txt")], capsys,
           "--eval-text needs a byte-level decoder (vocab 256)", tmp_path / "out")


def test_targets_listed_in_help_are_the_registered_ones():
    from inferpass.cli import TARGETS
    from inferpass.targets import target_names

    assert sorted(TARGETS) == sorted(target_names())


@pytest.mark.parametrize("argv", [["--help"], ["--max-len", "many"]])
def test_help_and_argument_errors_answer_at_once(argv):
    code = ("import sys, time; t0 = time.perf_counter(); from inferpass.cli import main\n"
            f"try: main({argv!r})\nexcept SystemExit as e: code = e.code\n"
            "print(code, time.perf_counter() - t0, 'torch' in sys.modules, 'transformers' in sys.modules, "
            "file=sys.stderr)")
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    wall = time.perf_counter() - t0
    status, seconds, torch_loaded, transformers_loaded = done.stderr.split()[-4:]
    assert status == ("0" if argv == ["--help"] else "2"), done.stderr
    assert torch_loaded == transformers_loaded == "False"  # the heavy stack is imported after parsing only
    assert float(seconds) < 0.5 and wall < 1.5, (seconds, wall)
