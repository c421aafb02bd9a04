"""Every registered pass, with its recommended configuration, through ``optimize-model`` on every model kind it
applies to: capture → pass → comparison with the captured model → save → load in a fresh process → generate or
classify. A new pass joins the matrix by being registered.

Kinds: the default LM (decoder, byte-level), the default ViT (images), a tiny random BERT (token ids). Targets:
eager for every pass; each compiled target (cpu: IREE, inductor: AOTInductor) with each kind's default preset,
whose saved folder must replay the CLI's comparison in the fresh process from its carried artifacts alone (one
per call shape, nothing compiled) and, for the LM, prefill prompts padded to a new bucket as eager does. Each cell
runs with ``--no-eval``; one pass per kind also runs the short evaluation. A cell fails naming its pass, kind and
target.
"""

import contextlib
import io
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import inferpass.commands
from factories import tiny_bert
from traces import trace
from inferpass.capture import capture
from inferpass.cli import main
from inferpass.defaults import CACHE_ENV, DEFAULT_MODEL, DEFAULT_PIPELINES
from inferpass.ir.compare import GraphGap, ProgramRunner, compare_programs
from inferpass.ir.examples import example_inputs
from inferpass.ir.program import Program
from inferpass.ir.serialize import load_program, save_program
from inferpass.passes import registered_passes
from inferpass.passes.base import check_requirements
from inferpass.runtime.engine import Engine
from inferpass.targets import Executable, get_target

KIND_MODELS = {"lm": DEFAULT_MODEL, "vit": DEFAULT_MODEL.parent / "default-vit", "bert": None}  # bert: built here
KIND_INFO = {"lm": ("decoder", 256), "vit": ("encoder", None), "bert": ("encoder", 50)}
COMPILED = ("cpu", "inductor")  # the ahead-of-time targets available here
EVALUATED = "dce"  # the pass that also runs the short evaluation, on every kind
MAX_LEN = 96  # decoders: room for the comparison's 32 + 16 prompt tokens and a few steps
PROMPTS = [list(b"ROMEO: "), list(b"JULIET:")]  # same length: one (2, 16) prefill, as the comparison compiled
PADDED = [list(range(3, 40)), list(range(5, 21))]  # 37 and 16 tokens, prefilled per row: a new bucket (64)
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


CELLS = [(cls.name, kind, "eager") for kind in KIND_MODELS for cls in applicable(kind)] + [
    (DEFAULT_PIPELINES[KIND_INFO[kind][0]], kind, target) for kind in KIND_MODELS for target in COMPILED]


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


def run_cell(pass_name: str, kind: str, target: str, model: Path, out: Path, capsys, captured: Program,
             evaluate: bool = False) -> Cell:
    """``optimize-model`` for one cell; raises ``AssertionError`` naming the cell unless it exits 0 with a
    comparison of every logits graph of the saved program within the pipeline's exact bound, and of the
    caches where the layout is still ``captured``'s (the program ``model`` captures into)."""
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
    logits_graphs = [n for n, g in manifest["graphs"].items()  # early-exit drafts differ by design
                     if g["role"]["outputs"][0] == "logits" and not g["role"].get("draft")]
    compared = [g["graph"] for g in comparison["graphs"] if g["output"] == "logits"]
    assert compared == logits_graphs, f"{where}: graphs not compared: {comparison}"
    same_layout = captured.is_decoder and manifest["cache"] == captured.cache.model_dump(mode="json")
    assert any(g["output"] == "cache" for g in comparison["graphs"]) == same_layout, f"{where}: caches: {comparison}"
    for gap in comparison["graphs"]:
        assert gap["within"] is not False, f"{where}: graph {gap['graph']} outside the exact bound: {comparison}"
        assert gap["max_abs"] < float("inf"), f"{where}: graph {gap['graph']} shape changed: {comparison}"
    exact = all(r["exact"] or r["exact_within"] is None for r in manifest["records"])
    if exact:
        assert all(g["within"] for g in comparison["graphs"]), f"{where}: exact pipeline not fully checked"
    assert "outputs vs the captured model" in printed.out, f"{where}: no comparison printed"
    return Cell(pass_name, kind, target, out, manifest, printed.out)


def outputs_of(executable: Executable, kind: str) -> list:
    """What ``executable`` gives: greedy tokens for ``PROMPTS`` (decoders) or top-1 labels of its program's
    seeded example inputs (encoders)."""
    if kind == "lm":
        return [r.tokens for r in Engine(executable, rows=2).generate(PROMPTS, {"max_new_tokens": NEW_TOKENS})]
    graph = executable.program.graph_for()
    return executable.run(graph, *example_inputs(executable.program, graph))[0].argmax(-1).tolist()


def fresh_run(out: str, kind: str, target: str, empty_cache: str) -> dict:
    """A saved folder in this (fresh) process on ``target``, with an empty artifact cache: its ``outputs``;
    for compiled targets also the CLI's comparison replayed against eager on the loaded program (``replay``:
    every output within the target's fp32 tolerance, with what that compiled and loaded) and, for the LM,
    the ``PADDED`` prompts' trace against eager (``padded``: within the tolerance, max |Δ|, and the functions
    compiled for it)."""
    program = load_program(out)
    runs_on = get_target(target)
    if target in COMPILED:
        runs_on.cache_dir = empty_cache
    executable = runs_on.compile(program)
    result = {"outputs": outputs_of(executable, kind)}
    if target not in COMPILED:
        return result
    eager = get_target("eager").compile(program)
    tolerance = executable.fp32_tolerance
    gaps, _ = compare_programs(eager, executable, rtol=tolerance, atol=tolerance)
    replayed = executable.compiled
    result["replay"] = {"within": all(g.within for g in gaps), "compiled": replayed, "loaded": executable.loaded}
    if kind == "lm":
        got, want = trace(executable, PADDED), trace(eager, PADDED)
        result["padded"] = {"close": bool(torch.isclose(got, want, rtol=tolerance, atol=tolerance).all()),
                            "max_abs": float((got - want).abs().max()), "compiled": executable.compiled - replayed}
    return result


FRESH_PROCESS = """
import json, sys
from test_cli_matrix import fresh_run
jobs = json.loads(sys.argv[1])
print(json.dumps({out: fresh_run(out, kind, target, empty) for out, kind, target, empty in jobs}))
"""


@pytest.fixture(scope="module")
def capture_once():
    """``capture`` that captures each (model, max_len) once in this module and hands every call a clone."""
    programs = {}

    def capture_once(model_dir, max_len=None):
        if (model_dir, max_len) not in programs:
            programs[model_dir, max_len] = capture(model_dir, max_len=max_len)
        return programs[model_dir, max_len].clone()

    return capture_once


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, capture_once):
    """Every cell run once (module doc), then every saved folder loaded and run in one fresh process (``fresh``,
    by folder), with what each cell's program gave in this process before it was saved (by cell) and what the
    captured model gives (by kind). Each model is captured once: the cells get clones
    (capture is ``test_capture.py``'s)."""
    root = tmp_path_factory.mktemp("matrix")
    models = dict(KIND_MODELS)
    models["bert"] = root / "tiny-bert"
    tiny_bert(layers=2).save_pretrained(models["bert"])
    captured = {kind: capture_once(models[kind], MAX_LEN if KIND_INFO[kind][0] == "decoder" else None)
                for kind in KIND_MODELS}
    capsys = _Capture()
    cells, failures, saved = {}, {}, {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(root / "artifacts"))  # what the CLI compiles, for this module only
        patch.setattr(inferpass.commands, "capture", capture_once)

        def save_and_keep(program, out, **options):
            saved[out] = program
            save_program(program, out, **options)

        patch.setattr(inferpass.commands, "save_program", save_and_keep)
        for pass_name, kind, target in CELLS:
            out = root / f"{pass_name.replace(',', '+')}-{kind}-{target}.inferpass"
            try:
                with capsys:
                    cells[pass_name, kind, target] = run_cell(
                        pass_name, kind, target, models[kind], out, capsys, captured[kind],
                        evaluate=pass_name == EVALUATED)
            except AssertionError as err:
                failures[pass_name, kind, target] = str(err)
        in_memory = {key: outputs_of(get_target(c.target).compile(saved[c.out]), c.kind) for key, c in cells.items()}
    eager = get_target("eager")
    captured_outputs = {kind: outputs_of(eager.compile(program), kind) for kind, program in captured.items()}
    jobs = [[str(c.out), c.kind, c.target, str(root / f"empty-{i}")] for i, c in enumerate(cells.values())]
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, json.dumps(jobs)], capture_output=True, text=True,
                          timeout=600, cwd=Path(__file__).parent)
    assert done.returncode == 0, done.stderr
    fresh = json.loads(done.stdout.strip().splitlines()[-1])
    return cells, failures, in_memory, captured_outputs, fresh


class _Capture:
    """A stand-in for pytest's ``capsys`` in a module fixture: captures stdout and stderr while entered."""

    def __enter__(self):
        self._out, self._err = io.StringIO(), io.StringIO()
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(contextlib.redirect_stdout(self._out))
        self._stack.enter_context(contextlib.redirect_stderr(self._err))
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def readouterr(self):
        out, err = self._out.getvalue(), self._err.getvalue()
        self._out.seek(0), self._out.truncate(), self._err.seek(0), self._err.truncate()
        return SimpleNamespace(out=out, err=err)


def test_matrix_covers_every_registered_pass_on_every_kind_it_applies_to():
    names = {cls.name for cls in registered_passes() if cls.__module__.startswith("inferpass.")}
    assert names == {p for p, _, t in CELLS if t == "eager"}
    assert {(k, t) for _, k, t in CELLS if t != "eager"} == {(k, t) for k in KIND_MODELS for t in COMPILED}
    assert {"dce", "cse", "drop-unused-params", "lean-attention", "kv-quant", "layer-skip"} <= names
    assert {k for p, k, _ in CELLS if p == "kv-quant"} == {"lm"}  # decoders only
    assert {k for p, k, _ in CELLS if p == "dce"} == {"lm", "vit", "bert"}


@pytest.mark.parametrize("pass_name,kind,target", CELLS, ids=[f"{p}-{k}-{t}" for p, k, t in CELLS])
def test_cell(matrix, pass_name, kind, target):
    cells, failures, in_memory, captured, fresh = matrix
    key = pass_name, kind, target
    assert key not in failures, failures.get(key)
    cell, where = cells[key], _cell_name(*key)
    run = fresh[str(cell.out)]
    assert run["outputs"] == in_memory[key], f"{where}: the saved folder runs differently in a fresh process"
    if target in COMPILED:
        carried = len(list((cell.out / "artifacts" / target).iterdir()))  # one function per call shape
        assert carried == (3 if kind == "lm" else 1), f"{where}: carried {carried} artifacts"
        assert run["replay"] == {"within": True, "compiled": 0, "loaded": carried}, f"{where}: replay: {run}"
        if kind == "lm":  # one function for the new bucket, padded rows invisible
            assert run["padded"]["compiled"] == 1 and run["padded"]["close"], f"{where}: padded: {run}"
    if pass_name == EVALUATED:
        assert cell.manifest["report"]["metrics"], f"{where}: no evaluation"
    if all(r["exact"] for r in cell.manifest["records"]):
        assert in_memory[key] == captured[kind], f"{where}: an exact pass changed the {kind} model's outputs"


def test_kv_quant_comparison_shows_the_bound_it_is_checked_against(matrix):
    cell = matrix[0]["kv-quant", "lm", "eager"]
    comparison = cell.manifest["report"]["comparison"]
    assert comparison["exact_within"] == 64 and "exact up to 64 tokens per row (kv-quant" in comparison["bound"]
    prefill = next(g for g in comparison["graphs"] if g["graph"] == "prefill")
    assert prefill["within"] is True and prefill["exact_outputs"] == prefill["outputs"]  # 48 tokens fit the window


def test_a_broken_comparison_fails_its_cell_by_name(tmp_path, capsys, monkeypatch, capture_once):
    """The bug behind the matrix: the captured program's example caches fed to the optimized one."""
    monkeypatch.setattr(inferpass.commands, "capture", capture_once)

    def old_comparison(want, got, **kwargs):
        gaps = []
        for name in want.program.graphs:
            inputs = example_inputs(want.program, name)
            gap = float((want.run(name, *inputs)[0] - got.run(name, *inputs)[0]).abs().max())
            gaps.append(GraphGap(name, name, "logits", 1, gap, 1, gap <= kwargs["atol"]))
        return gaps, "the captured program's example inputs"

    monkeypatch.setattr(inferpass.commands, "compare_programs", old_comparison)
    with pytest.raises(AssertionError, match="pass 'kv-quant' on the lm model, target 'eager'"):
        run_cell("kv-quant", "lm", "eager", DEFAULT_MODEL, tmp_path / "out", capsys,
                 capture_once(DEFAULT_MODEL, MAX_LEN))
    broken = r"pass 'lean-attention' on the lm model, target 'eager'.*graph 'prefill' of the optimized program differ"
    with pytest.raises(AssertionError, match=broken):
        def off_by_one(want, got, **kwargs):
            gaps, probe = old_comparison(want, got, **kwargs)
            return [GraphGap(g.graph, g.reference, g.output, 1, 1.0, 1, False) for g in gaps], probe

        monkeypatch.setattr(inferpass.commands, "compare_programs", off_by_one)
        run_cell("lean-attention", "lm", "eager", DEFAULT_MODEL, tmp_path / "out2", capsys,
                 capture_once(DEFAULT_MODEL, MAX_LEN))


def _drifted(program: Program, weight) -> Program:
    """``program`` with the weights whose name ``weight(name)`` accepts scaled by 1 + 1e-3, in every graph."""
    drifted = program.clone()
    for ep in drifted.graphs.values():
        for key, tensor in ep.state_dict.items():
            if weight(key):
                ep.state_dict[key] = torch.nn.Parameter(tensor * (1 + 1e-3), requires_grad=False)
    return drifted


def test_a_pass_that_changes_logits_or_caches_is_caught_by_the_comparison(capture_once):
    """The comparison itself (not a stand-in) sees an exact pass's output drift, each program over its own cache."""
    program = capture_once(DEFAULT_MODEL, max_len=MAX_LEN)
    final_norm = _drifted(program, lambda key: key.endswith("norm.weight") and "layers" not in key)
    gaps, _ = compare_programs(ProgramRunner(program), ProgramRunner(final_norm))
    assert [(g.graph, g.output) for g in gaps] == [("prefill", "logits"), ("decode", "logits"), ("prefill", "cache")]
    assert [g.within for g in gaps] == [False, False, True]  # the final norm writes no cache
    last = program.info.num_layers - 1
    last_keys = _drifted(program, lambda key: key.endswith(f"layers.{last}.self_attn.k_proj.weight"))
    assert [g.within for g in compare_programs(ProgramRunner(program), ProgramRunner(last_keys))[0]] == [
        False, False, False]
    same, _ = compare_programs(ProgramRunner(program), ProgramRunner(program.clone()))
    assert all(g.within is True and g.max_abs == 0.0 for g in same)
