"""Pass defaults: --list-passes shows every default's value; kv-quant's defaults are the recommended settings."""

import json

from factories import tiny_decoder
from inferpass.capture import capture
from inferpass.commands import field_default
from inferpass.defaults import DEFAULT_MODEL
from inferpass.passes import PassManager, Pipeline
from inferpass.passes.kv_quant import KVQuantConfig, auto_value_group
from inferpass.passes.lean_attention import LeanAttention


def test_factory_defaults_show_their_value():
    assert field_default(LeanAttention.Config.model_fields["graphs"]) == "=['decode']"
    assert field_default(KVQuantConfig.model_fields["bits_per_layer"]) == "={}"
    assert field_default(KVQuantConfig.model_fields["value_group"]) == "='auto'"


def test_kv_quant_defaults_are_the_readme_settings_for_the_default_lm():
    config = json.loads((DEFAULT_MODEL / "config.json").read_text())
    assert auto_value_group(config["num_key_value_heads"], config["head_dim"]) == 96  # README: 2.8× vs 2.6×
    defaults = KVQuantConfig()
    assert (defaults.bits, defaults.group, defaults.residual, defaults.value_group) == (4, 32, 32, "auto")


def test_auto_value_group_is_chosen_per_model():
    assert auto_value_group(8, 128) == 128 and auto_value_group(2, 8) == 16 and auto_value_group(3, 48) == 72
    program = capture(tiny_decoder("llama", layers=1, kv_heads=2, head_dim=8), max_len=16)
    auto = PassManager(Pipeline.parse("kv-quant{group=4, residual=4}")).run(program)
    explicit = PassManager(Pipeline.parse("kv-quant{group=4, residual=4, value_group=16}")).run(program)
    assert auto.records[0].stats["value_group"] == 16
    assert auto.program.cache == explicit.program.cache
