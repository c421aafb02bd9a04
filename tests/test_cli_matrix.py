"""Every registered pass, with its recommended configuration, through ``optimize-model`` on every model kind it
applies to: capture → pass → comparison with the captured model → save → load in a fresh process → generate or
classify. A new pass joins the matrix by being registered.

Kinds: the default LM (decoder, byte-level), the default ViT (images), a tiny random BERT (token ids). Target:
eager for every cell (the compiled targets' equality with eager is ``test_targets.py``'s). Each cell runs with
``--no-eval``; one pass per kind also runs the short evaluation. A cell fails naming its pass, kind and target.
"""

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from factories import tiny_bert
from inferpass.cli import main
from inferpass.defaults import DEFAULT_MODEL
from inferpass.ir.examples import example_inputs
from inferpass.ir.serialize import load_program
from inferpass.passes import registered_passes
from inferpass.passes.base import check_requirements
from inferpass.runtime.engine import Engine
from inferpass.targets import get_target

KIND_MODELS = {"lm": DEFAULT_MODEL, "vit": DEFAULT_MODEL.parent / "default-vit", "bert": None}  # bert: built here
KIND_INFO = {"lm": ("decoder", 256), "vit": ("encoder", None), "bert": ("encoder", 50)}
TARGETS = ("eager",)
EVALUATED = "dce"  # the pass that also runs the short evaluation, on every kind
MAX_LEN = 96  # decoders: room for the comparison's 32 + 16 prompt tokens and a few steps
PROMPT = list(b"ROMEO: ")
NEW_TOKENS = 8


def applicable(kind: str) -> list:
    """The in-tree registered passes whose requirements a ``kind`` model meets."""
    model_kind, vocab = KIND_INFO[kind]
    passes = []
    for cls in registered_passes():
        if not cls.__module__.startswith("inferpass."):
            continue  # plugins registered by other tests
        try:
            check_requirements(cls, model_kind, vocab, kind)
        except Exception:
            continue
        passes.append(cls)
    return passes


CELLS = [(cls.name, kind, target) for kind in KIND_MODELS for cls in applicable(kind) for target in TARGETS]


@dataclass
class Cell:
    pass_name: str
    kind: str
    target: str
    out: Path
    manifest: dict
    printed: str


def _cell_name(pass_name: str, kind: str, target: str) -> str:
    return f"pass '{pass_name}' on the {kind} model, target '{target}'"


def run_cell(pass_name: str, kind: str, target: str, model: Path, out: Path, capsys, evaluate: bool = False) -> Cell:
    """``optimize-model`` for one cell; raises ``AssertionError`` naming the cell unless it exits 0 with a
    comparison of every logits graph of the saved program within the pipeline's exact bound."""
    where = _cell_name(pass_name, kind, target)
    argv = [str(model), "--pipeline", pass_name, "--target", target, "--out", str(out), "--force"]
    argv += ["--max-len", str(MAX_LEN)] if KIND_INFO[kind][0] == "decoder" else []
    argv += ["--speed-budget", "0", "--new-tokens", "4"] if evaluate else ["--no-eval"]
    try:
        code = main(argv)
    except Exception as exc:  # a raw traceback is what the matrix exists to catch
        raise AssertionError(f"{where}: optimize-model raised {type(exc).__name__}: {exc}") from exc
    printed = capsys.readouterr()
    assert code == 0, f"{where}: exit code {code}: {printed.err}"
    assert "warning" not in printed.err, f"{where}: {printed.err}"
    manifest = json.loads((out / "manifest.json").read_text())
    comparison = manifest["report"]["comparison"]
    program = load_program(out)
    logits_graphs = [n for n, r in program.roles.items() if r.outputs[0] == "logits"]
    assert [g["graph"] for g in comparison["graphs"]] == logits_graphs, f"{where}: graphs not compared: {comparison}"
    for gap in comparison["graphs"]:
        assert gap["within"] is not False, f"{where}: graph {gap['graph']} outside the exact bound: {comparison}"
        assert gap["max_abs"] < float("inf"), f"{where}: graph {gap['graph']} shape changed: {comparison}"
    exact = all(r["exact"] or r["exact_within"] is None for r in manifest["records"])
    if exact:
        assert all(g["within"] for g in comparison["graphs"]), f"{where}: exact pipeline not fully checked"
    assert "outputs vs the captured model" in printed.out, f"{where}: no comparison printed"
    return Cell(pass_name, kind, target, out, manifest, printed.out)


def _expected(out: Path, kind: str) -> list:
    """What the saved folder gives in this process on eager: greedy tokens (decoders) or top-1 labels."""
    program = load_program(out)
    if kind == "lm":
        engine = Engine.open(out, target="eager", rows=2)
        return engine.generate([PROMPT], {"max_new_tokens": NEW_TOKENS})[0].tokens
    logits = get_target("eager").compile(program).run(program.graph_for(), *example_inputs(program,
                                                                                            program.graph_for()))
    return logits[0].argmax(-1).tolist()


FRESH_PROCESS = """
import json, sys
from inferpass.ir.examples import example_inputs
from inferpass.ir.serialize import load_program
from inferpass.runtime.engine import Engine
from inferpass.targets import get_target
results = {}
for folder, kind, target in json.loads(sys.argv[1]):
    program = load_program(folder)
    if kind == "lm":
        engine = Engine.open(folder, target=target, rows=2)
        results[folder] = engine.generate([PROMPT], {"max_new_tokens": NEW_TOKENS})[0].tokens
    else:
        graph = program.graph_for()
        results[folder] = get_target(target).compile(program).run(graph, *example_inputs(program, graph))[0] \\
            .argmax(-1).tolist()
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """Every cell run once (module doc), then every saved folder loaded and run in one fresh process."""
    root = tmp_path_factory.mktemp("matrix")
    models = dict(KIND_MODELS)
    models["bert"] = root / "tiny-bert"
    tiny_bert(layers=2).save_pretrained(models["bert"])
    capsys = _Capture()
    cells, failures = {}, {}
    for pass_name, kind, target in CELLS:
        out = root / f"{pass_name}-{kind}-{target}.inferpass"
        try:
            with capsys:
                cells[pass_name, kind, target] = run_cell(pass_name, kind, target, models[kind], out, capsys,
                                                          evaluate=pass_name == EVALUATED)
        except AssertionError as err:
            failures[pass_name, kind, target] = str(err)
    jobs = [[str(c.out), c.kind, c.target] for c in cells.values()]
    script = f"PROMPT = {PROMPT!r}\nNEW_TOKENS = {NEW_TOKENS}\n" + FRESH_PROCESS
    done = subprocess.run([sys.executable, "-c", script, json.dumps(jobs)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    fresh = json.loads(done.stdout.strip().splitlines()[-1])
    return cells, failures, fresh


class _Capture:
    """A stand-in for pytest's ``capsys`` in a module fixture: captures stdout and stderr while entered."""

    def __enter__(self):
        import contextlib
        import io

        self._out, self._err = io.StringIO(), io.StringIO()
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(contextlib.redirect_stdout(self._out))
        self._stack.enter_context(contextlib.redirect_stderr(self._err))
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def readouterr(self):
        from types import SimpleNamespace

        out, err = self._out.getvalue(), self._err.getvalue()
        self._out.seek(0), self._out.truncate(), self._err.seek(0), self._err.truncate()
        return SimpleNamespace(out=out, err=err)


def test_matrix_covers_every_registered_pass_on_every_kind_it_applies_to():
    names = {cls.name for cls in registered_passes() if cls.__module__.startswith("inferpass.")}
    assert names == {p for p, _, _ in CELLS}
    assert {"dce", "cse", "drop-unused-params", "lean-attention", "kv-quant", "layer-skip"} <= names
    assert {k for p, k, _ in CELLS if p == "kv-quant"} == {"lm"}  # decoders only
    assert {k for p, k, _ in CELLS if p == "dce"} == {"lm", "vit", "bert"}


@pytest.mark.parametrize("pass_name,kind,target", CELLS, ids=[f"{p}-{k}-{t}" for p, k, t in CELLS])
def test_cell(matrix, pass_name, kind, target):
    cells, failures, fresh = matrix
    assert (pass_name, kind, target) not in failures, failures.get((pass_name, kind, target))
    cell = cells[pass_name, kind, target]
    where = _cell_name(pass_name, kind, target)
    assert fresh[str(cell.out)] == _expected(cell.out, kind), f"{where}: a fresh process ran the folder differently"
    if pass_name == EVALUATED:
        assert cell.manifest["report"]["metrics"], f"{where}: no evaluation"
    if all(r["exact"] for r in cell.manifest["records"]) and kind == "lm":
        baseline = Engine.open(KIND_MODELS["lm"], target="eager", max_len=MAX_LEN, rows=2)
        assert fresh[str(cell.out)] == baseline.generate([PROMPT], {"max_new_tokens": NEW_TOKENS})[0].tokens, \
            f"{where}: an exact pass changed the greedy tokens"


def test_kv_quant_comparison_shows_the_bound_it_is_checked_against(matrix):
    cell = matrix[0]["kv-quant", "lm", "eager"]
    comparison = cell.manifest["report"]["comparison"]
    assert comparison["exact_within"] == 64 and "exact up to 64 tokens per row (kv-quant" in comparison["bound"]
    prefill = next(g for g in comparison["graphs"] if g["graph"] == "prefill")
    assert prefill["within"] is True and prefill["exact_outputs"] == prefill["outputs"]  # 48 tokens fit the window


def test_a_broken_comparison_fails_its_cell_by_name(tmp_path, capsys, monkeypatch):
    """The bug behind the matrix: the captured program's example caches fed to the optimized one."""
    import inferpass.commands
    from inferpass.ir.compare import GraphGap

    def old_comparison(want, got, **kwargs):
        gaps = []
        for name in want.program.graphs:
            inputs = example_inputs(want.program, name)
            gap = float((want.run(name, *inputs)[0] - got.run(name, *inputs)[0]).abs().max())
            gaps.append(GraphGap(name, name, 1, gap, 1, gap <= kwargs["atol"]))
        return gaps, "the captured program's example inputs"

    monkeypatch.setattr(inferpass.commands, "compare_programs", old_comparison)
    with pytest.raises(AssertionError, match="pass 'kv-quant' on the lm model, target 'eager'"):
        run_cell("kv-quant", "lm", "eager", DEFAULT_MODEL, tmp_path / "out", capsys)
    with pytest.raises(AssertionError, match=r"pass 'lean-attention' on the lm model, target 'eager'.*outside"):
        def off_by_one(want, got, **kwargs):
            gaps, probe = old_comparison(want, got, **kwargs)
            return [GraphGap(g.graph, g.reference, 1, 1.0, 1, False) for g in gaps], probe

        monkeypatch.setattr(inferpass.commands, "compare_programs", off_by_one)
        run_cell("lean-attention", "lm", "eager", DEFAULT_MODEL, tmp_path / "out2", capsys)


def test_a_pass_that_changes_logits_is_caught_by_the_comparison():
    """The comparison itself (not a stand-in) sees an exact pass's output drift, each program over its own cache."""
    from inferpass.capture import capture
    from inferpass.ir.compare import ProgramRunner, compare_programs

    program = capture(DEFAULT_MODEL, max_len=MAX_LEN)
    drifted = program.clone()
    for ep in drifted.graphs.values():
        for key, tensor in ep.state_dict.items():
            if key.endswith("norm.weight") and "layers" not in key:
                ep.state_dict[key] = tensor * (1 + 1e-3)
    gaps, _ = compare_programs(ProgramRunner(program), ProgramRunner(drifted))
    assert [g.graph for g in gaps] == ["prefill", "decode"] and all(g.within is False for g in gaps)
    same, _ = compare_programs(ProgramRunner(program), ProgramRunner(program.clone()))
    assert all(g.within is True and g.max_abs == 0.0 for g in same)
