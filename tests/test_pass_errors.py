"""Every pass names what is at fault: a bad config key or value, or a model it cannot rewrite."""

import pytest

from factories import tiny_decoder, tiny_vit
from inferpass.capture import capture
from inferpass.errors import PipelineError, UnsupportedModelError
from inferpass.passes import PassManager, Pipeline
from inferpass.passes.base import Pass, PassResult
from inferpass.passes.manager import PassFailure


@pytest.mark.parametrize("text, match", [
    ("lean-attention{block_n=48}", "block_n"), ("lean-attention{splits=0}", "splits"),
    ("lean-attention{schedule=fast}", "schedule"),
    ("kv-quant{bits=3}", "bits must be one of"), ("kv-quant{bits_per_layer={0: 16}}", "bits must be one of"),
    ("kv-quant{bogus=1}", "bogus"), ("kv-quant{sink=-1}", "sink"), ("kv-quant{splits=0}", "splits"),
])
def test_bad_configs_are_named(text, match):
    with pytest.raises(PipelineError, match=match):
        Pipeline.parse(text)


@pytest.mark.parametrize("text, model, error, match", [
    ("lean-attention", tiny_vit, UnsupportedModelError, "pass 'lean-attention' needs a decoder with a KV cache; "
                                                        "ViTForImageClassification is an encoder"),
    ("lean-attention{graphs=[verify]}", tiny_decoder, PipelineError, "no graph 'verify'"),
    ("kv-quant", tiny_vit, UnsupportedModelError, "pass 'kv-quant' needs a decoder"),
    ("kv-quant{value_group=24}", tiny_decoder, UnsupportedModelError, "layer 0: value group 24 must divide"),
    ("kv-quant{layers=[5]}", tiny_decoder, PipelineError, r"layers \[5\] out of range \(the model has 1: 0..0\)"),
    ("kv-quant,kv-quant{bits=2}", tiny_decoder, PipelineError, "conflicting configs for pass 'kv-quant'"),
])
def test_unsupported_models_are_named(text, model, error, match):
    program = capture(model(layers=1), max_len=8) if model is tiny_decoder else capture(model())
    with pytest.raises(error, match=match):
        PassManager(Pipeline.parse(text)).run(program)


def test_a_pass_may_not_rewrite_what_the_manager_records():
    class Meddling(Pass):
        name, exact = "test-meddling", True

        def run(self, program):
            program.applied.append("something else")
            return PassResult(program, changed=False)

    with pytest.raises(PassFailure, match="changed the program's 'applied' list"):
        PassManager(Pipeline([Meddling()]), write_repro=False).run(capture(tiny_decoder(layers=1), max_len=8))
