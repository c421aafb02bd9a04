"""The shipped default models: load, meet their quality figures on held-out data, and fail when damaged."""

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from inferpass.capture import capture
from inferpass.defaults import DEFAULT_MODEL, HELDOUT_TEXT, MODELS
from inferpass.eval.bits_per_byte import bits_per_byte, byte_tokens
from inferpass.eval.digits import load_digits
from inferpass.eval.early_exit import all_exit_logits
from inferpass.eval.quality import accuracy, program_bits_per_byte
from inferpass.targets import get_target

LM_FULL_MAX_BPB = 2.3  # issue #3's target, on all 490 KB of held-out works (training_report.json: 2.290)
LM_SLICE_MAX_BPB = 2.35  # the 8 KB test slice through the captured program (measured 2.290)
HALF_DEPTH_MAX_EXTRA = 0.6
VIT_MIN_ACCURACY = 0.97
TOOLS = Path(__file__).parent.parent / "tools"


def test_default_lm_is_a_gqa_llama_of_the_promised_size():
    report = json.loads((DEFAULT_MODEL / "training_report.json").read_text())
    config = report["config"]
    assert 6_000_000 <= report["parameters"] <= 12_000_000
    assert config["num_hidden_layers"] >= 8 and config["num_key_value_heads"] < config["num_attention_heads"]
    assert report["heldout_bits_per_byte"][str(config["num_hidden_layers"])] <= LM_FULL_MAX_BPB


def test_default_lm_quality_on_heldout_slice(lm_program, heldout):
    bpb = program_bits_per_byte(get_target("eager").compile(lm_program), heldout, context=1024)
    assert bpb <= LM_SLICE_MAX_BPB


def test_half_depth_exit_costs_at_most_the_promised_extra(heldout):
    model = LlamaForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32, attn_implementation="sdpa").eval()
    layers = model.config.num_hidden_layers
    per_exit = bits_per_byte(all_exit_logits(model), heldout, context=1024, stride=1024)
    assert per_exit[layers // 2] - per_exit[layers] <= HALF_DEPTH_MAX_EXTRA
    assert per_exit[1] > per_exit[layers // 2] > per_exit[layers]  # deeper exits predict better


def test_harness_fails_a_damaged_lm(lm_program, heldout):
    damaged = lm_program.clone()
    for ep in damaged.graphs.values():
        for name, weight in ep.state_dict.items():
            ep.state_dict[name] = torch.nn.Parameter(torch.zeros_like(weight), requires_grad=False)
    bpb = program_bits_per_byte(get_target("eager").compile(damaged), heldout, context=1024)
    assert bpb == pytest.approx(8.0) and bpb > LM_SLICE_MAX_BPB  # zero weights: uniform over 256 bytes


def test_default_vit_accuracy_and_damage():
    program = capture(MODELS / "default-vit")
    pixels, labels = load_digits("test")
    executable = get_target("eager").compile(program)
    assert accuracy(executable, (pixels,), labels) >= VIT_MIN_ACCURACY
    assert len(pixels) >= 350 and pixels.shape[-1] // program.info.hf_config["patch_size"] >= 8  # >= 64 patches
    damaged = program.clone()
    for name, weight in damaged.graphs["forward"].state_dict.items():
        if name.startswith("model.classifier"):
            damaged.graphs["forward"].state_dict[name] = torch.nn.Parameter(torch.zeros_like(weight), requires_grad=False)
    assert accuracy(get_target("eager").compile(damaged), (pixels,), labels) < 0.5


def test_training_recipe_is_deterministic():
    sys.path.insert(0, str(TOOLS))
    import train_default_lm as recipe

    tokens = byte_tokens(HELDOUT_TEXT.read_bytes())
    first, _ = recipe.train(tokens, steps=2)
    second, _ = recipe.train(tokens, steps=2)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_optimize_model_without_arguments_reports_on_the_default_lm(tmp_path, capsys, monkeypatch):
    from inferpass.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["--new-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    for metric in ("held-out bits/byte", "greedy agreement", "decode tokens/s", "request latency p99", "peak RSS"):
        assert metric in printed
    manifest = json.loads((tmp_path / "default-lm.inferpass" / "manifest.json").read_text())
    metrics = manifest["report"]["metrics"]
    assert metrics["greedy agreement"]["optimized"] == 1.0
    assert metrics["held-out bits/byte"]["optimized"] == pytest.approx(metrics["held-out bits/byte"]["baseline"])


def test_optimize_model_reports_accuracy_for_the_default_vit(tmp_path, capsys):
    from inferpass.cli import main

    assert main([str(MODELS / "default-vit"), "--out", str(tmp_path / "vit")]) == 0
    assert "forward latency" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "vit" / "manifest.json").read_text())["report"]["metrics"]
    assert metrics["accuracy"]["optimized"] == metrics["accuracy"]["baseline"] >= VIT_MIN_ACCURACY
    assert metrics["top-1 agreement"]["optimized"] == 1.0
