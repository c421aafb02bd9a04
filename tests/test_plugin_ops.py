"""An out-of-tree plugin pass with its own custom op: the folder it saves loads and runs in a fresh process,
the op coming from the plugin's installed distribution (an ``inferpass.op_providers`` entry point)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from factories import tiny_decoder
from inferpass.capture import capture
from inferpass.cli import main
from inferpass.runtime.generator import Generator
from inferpass.targets import get_target

SITE = Path(__file__).parent / "plugins" / "site"  # the plugin as installed: module + .dist-info
PROMPT = [[3, 1, 4, 1, 5]]
LOAD = f"""
import json, sys
from inferpass.ir.serialize import load_program
from inferpass.runtime.generator import Generator
from inferpass.targets import get_target
program = load_program(sys.argv[1])
logits, _, _ = Generator(get_target("eager").compile(program)).prefill({PROMPT})
print(json.dumps({{"applied": program.applied, "plugin_loaded": "logit_scale_plugin" in sys.modules,
                  "logits": logits[0, -1].tolist()}}))
"""


def test_a_plugin_pass_with_its_own_op_saves_a_folder_that_loads_in_a_fresh_process(tmp_path):
    tiny_decoder("llama", layers=1).save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    code = main([str(tmp_path / "model"), "--plugin", str(SITE / "logit_scale_plugin.py"),
                 "--pipeline", "test-logit-scale{factor=2.0}", "--max-len", "16", "--no-eval", "--out", str(out)])
    assert code == 0
    done = subprocess.run([sys.executable, "-c", LOAD, str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(SITE)})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["applied"] == ["test-logit-scale{factor=2.0}"] and result["plugin_loaded"]
    baseline, _, _ = Generator(get_target("eager").compile(capture(tmp_path / "model", max_len=16))).prefill(PROMPT)
    torch.testing.assert_close(torch.tensor(result["logits"]), 2 * baseline[0, -1])
