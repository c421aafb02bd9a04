"""Every pass names what is at fault: a bad config key or value, or a model it cannot rewrite."""

import pytest

from factories import tiny_decoder, tiny_vit
from inferpass.capture import capture
from inferpass.errors import PipelineError, UnsupportedModelError
from inferpass.passes import Pipeline


@pytest.mark.parametrize("text, match", [
    ("lean-attention{block_n=48}", "block_n"), ("lean-attention{splits=0}", "splits"),
    ("lean-attention{schedule=fast}", "schedule"),
    ("kv-quant{bits=3}", "bits must be one of"), ("kv-quant{bits_per_layer={0: 16}}", "bits must be one of"),
    ("kv-quant{bogus=1}", "bogus"), ("kv-quant{sink=-1}", "sink"), ("kv-quant{splits=0}", "splits"),
])
def test_bad_configs_are_named(text, match):
    with pytest.raises(PipelineError, match=match):
        Pipeline.parse(text)


@pytest.mark.parametrize("text, model, match", [
    ("lean-attention", tiny_vit, "needs a decoder"),
    ("lean-attention{graphs=[verify]}", tiny_decoder, "no graph 'verify'"),
    ("kv-quant", tiny_vit, "needs a decoder"),
    ("kv-quant{value_group=24}", tiny_decoder, "layer 0: value group 24 must divide"),
    ("kv-quant{layers=[5]}", tiny_decoder, "layer 5 has no fp k/v cache"),
])
def test_unsupported_models_are_named(text, model, match):
    program = capture(model(layers=1), max_len=8) if model is tiny_decoder else capture(model())
    with pytest.raises(UnsupportedModelError, match=match):
        Pipeline.parse(text).passes[0].run(program)
