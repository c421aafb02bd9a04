"""Pipelines from strings, files and Python; config validation; ordering constraints and cycles."""

import json

import pytest

from inferpass.errors import PipelineError, UnsupportedModelError
from inferpass.passes import Pass, PassConfig, PassResult, Pipeline, register_pass


class _Noop(Pass):
    exact = True

    def run(self, program):
        return PassResult(program, changed=False)


class OrderConfig(PassConfig):
    level: int = 0
    layers: list[int] = []


@register_pass
class OrderA(_Noop):
    """Test pass a."""

    name = "test-a"
    Config = OrderConfig


@register_pass
class OrderB(_Noop):
    """Test pass b: must run after test-a."""

    name = "test-b"
    runs_after = frozenset({"test-a"})


@register_pass
class OrderC(_Noop):
    """Test pass c: must run before test-a and after test-b (a cycle with them)."""

    name = "test-c"
    runs_before = frozenset({"test-a"})
    runs_after = frozenset({"test-b"})


def test_string_round_trip_with_values():
    pipe = Pipeline.parse("test-a{layers=[3, 5], level=2}, dce")
    assert [p.name for p in pipe.passes] == ["test-a", "dce"]
    assert pipe.passes[0].config.layers == [3, 5] and pipe.passes[0].config.level == 2
    assert pipe.to_string() == "test-a{level=2,layers=[3,5]},dce"
    assert Pipeline.parse(pipe.to_string()).to_string() == pipe.to_string()


def test_empty_string_is_identity_pipeline():
    assert len(Pipeline.parse("")) == 0


def test_yaml_and_json_files(tmp_path):
    (tmp_path / "p.yaml").write_text("passes:\n  - name: test-a\n    config: {level: 1}\n  - cse\n")
    (tmp_path / "p.json").write_text(json.dumps([{"name": "test-a", "config": {"level": 1}}, "cse"]))
    for f in ("p.yaml", "p.json"):
        assert Pipeline.load(str(tmp_path / f)).to_string() == "test-a{level=1},cse"


def test_constraints_reorder_stably():
    pipe = Pipeline.parse("test-b,dce,test-a")
    assert [p.name for p in pipe.passes] == ["dce", "test-a", "test-b"]


def test_cycle_names_the_passes():
    with pytest.raises(PipelineError, match=r"cycle: .*test-a.*test-b.*test-c|cycle: .*test-c.*test-a.*test-b"):
        Pipeline.parse("test-a,test-b,test-c")


@pytest.mark.parametrize(
    "text, message",
    [
        ("no-such-pass", "unknown pass 'no-such-pass'; known passes: .*dce"),
        ("test-a{colour=3}", r"pass 'test-a': bad config: colour: Extra inputs are not permitted"),
        ("test-a{level=high}", r"pass 'test-a': bad config: level: Input should be a valid integer"),
        ("test-a{level}", "expected key=value"),
        ("test-a{level=1", "unbalanced"),
        ("dce{graphs=[prefill}", "unbalanced"),
    ],
)
def test_bad_pipelines_name_the_fault(text, message):
    with pytest.raises(PipelineError, match=message):
        Pipeline.parse(text)


def test_bad_file(tmp_path):
    (tmp_path / "p.yaml").write_text("passes: {not: a list}\n")
    with pytest.raises(PipelineError, match="expected a list of passes"):
        Pipeline.load(str(tmp_path / "p.yaml"))
    with pytest.raises(PipelineError, match="cannot read pipeline file"):
        Pipeline.load(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("text, message", [
    ("dce,cse,dce", "pass 'dce' is listed twice; list it once"),
    ("test-a{level=1},test-a{level=2}", "conflicting configs for pass 'test-a': 'test-a{level=1}' and "
                                        "'test-a{level=2}'; list it once"),
    ("test-a{level=}", "pass 'test-a': 'level=' has no value \\(leave the key out for its default\\)"),
])
def test_repeated_passes_and_empty_values_are_refused_at_parse_time(text, message):
    with pytest.raises(PipelineError, match=message):
        Pipeline.parse(text)


def test_graph_names_and_requirements_are_checked_without_a_program():
    pipe = Pipeline.parse("cse{graphs=[decode, steps]},dce")
    pipe.check_model("decoder", 64, "a decoder")
    with pytest.raises(PipelineError, match=r"pass 'cse\{graphs=\[decode,steps\]\}': no graph 'decode', 'steps' in "
                                            r"an encoder \(its graphs: forward\)"):
        pipe.check_model("encoder", 64, "an encoder")
    with pytest.raises(UnsupportedModelError, match="pass 'kv-quant' needs a decoder with a KV cache; an encoder is "
                                                    "an encoder with vocabulary 30"):
        Pipeline.parse("kv-quant").check_model("encoder", 30, "an encoder")
