"""The work behind ``optimize-model`` (``inferpass.cli`` parses the arguments): list passes, reproduce a
repro bundle, or optimize a model.

Optimizing validates everything it can before capture — the model directory (``config.json``
read as JSON, no weights loaded), the pipeline (names, configs, duplicates, graph names for
the model kind), the target, ``--max-len`` against the model's context, the evaluation text
and the output location — so bad input fails in seconds, not after minutes of work. Long
steps show progress bars with an ETA (``inferpass.progress``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from inferpass import progress
from inferpass.capture import capture, inspect_model_dir
from inferpass.capture.decoder import check_max_len
from inferpass.capture.hf_loader import ModelDir
from inferpass.defaults import DEFAULT_MODEL, DEFAULT_PIPELINES, HELDOUT_TEXT
from inferpass.errors import InferpassError, PipelineError
from inferpass.eval.digits import DIGITS_FILE, IMAGE_SIZE, load_digits
from inferpass.eval.report import Report, compare_decoders, compare_encoders, prompts_from_text, random_prompts
from inferpass.ir.compare import compare_programs
from inferpass.ir.examples import example_inputs
from inferpass.ir.output_folder import check_output
from inferpass.ir.serialize import save_program
from inferpass.passes import PassManager, Pipeline, PipelineRun, registered_passes
from inferpass.plugins import load_plugin
from inferpass.runtime.engine import Engine
from inferpass.runtime.text_codec import TextCodec
from inferpass.targets import Executable, get_target

OUTPUT_BYTES_PER_WEIGHT_BYTE = 3  # the saved folder holds fp32 weights (2x a bf16 checkpoint) plus graphs

console = Console(highlight=False, markup=False, width=140)  # no markup: "[encoder]" in a message is text
err_console = Console(stderr=True, highlight=False, markup=False, width=140)


def run(args: argparse.Namespace) -> int:
    """Run the mode ``args`` selects; raises ``InferpassError`` for bad input."""
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2))
    torch.manual_seed(args.seed)
    for plugin in args.plugin:
        load_plugin(plugin)
    if args.command == "generate":
        return generate(args)
    if args.list_passes:
        list_passes()
        return 0
    if args.repro:
        from inferpass.repro import reproduce

        message = reproduce(args.repro)
        err_console.print(f"reproduced: {message}", soft_wrap=True)
        return 1
    return optimize(args)


def generate(args: argparse.Namespace) -> int:
    """``optimize-model generate``: run prompts through the engine, streaming a single prompt's text, and print
    a throughput summary."""
    path = Path(args.model_dir) if args.model_dir else DEFAULT_MODEL
    engine = Engine.open(path, target=args.target, max_len=args.max_len, rows=args.rows)
    codec = TextCodec(engine.program, [path, *([Path(engine.program.info.source)] if engine.program.info.source
                                              else [])])
    texts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise InferpassError("no prompts: pass --prompt TEXT or one prompt per line on stdin")
    params = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
              "top_p": args.top_p, "seed": args.seed, "stop": tuple(args.stop)}
    requests = [engine.submit(codec.encode(text), params) for text in texts]
    decoders = {r.id: codec.decoder() for r in requests}
    pieces: dict[int, list[str]] = {r.id: [] for r in requests}
    first_token: dict[int, float] = {}
    if len(requests) == 1:
        sys.stdout.write(texts[0])
    t0 = time.perf_counter()
    for request, token in engine.stream():
        first_token.setdefault(request.id, time.perf_counter() - t0)
        piece = decoders[request.id].push(token)
        pieces[request.id].append(piece)
        if len(requests) == 1:
            sys.stdout.write(piece)
            sys.stdout.flush()
        elif request.done:
            console.print(f"[{requests.index(request)}] {texts[requests.index(request)]}{''.join(pieces[request.id])}")
    seconds = time.perf_counter() - t0
    tokens = sum(len(r.tokens) for r in requests)
    if len(requests) == 1:
        sys.stdout.write("\n")
    waits = sorted(first_token.values())
    err_console.print(f"{len(requests)} requests, {tokens} tokens in {seconds:.2f}s: {tokens / seconds:.1f} tokens/s; "
                      f"time to first token p50 {waits[len(waits) // 2]:.3f}s ({args.target}, {args.rows} rows)")
    return 0


def field_default(field) -> str:
    """A config field's default as ``--list-passes`` shows it (a factory's value, not pydantic's sentinel)."""
    if field.is_required():
        return "(required)"
    value = field.get_default(call_default_factory=True)
    return "=auto" if value is None and "auto" in (field.description or "") else f"={value!r}"


def list_passes() -> None:
    table = Table(title="passes")
    for col in ("name", "kind", "config (default)", "runs after", "runs before", "summary"):
        table.add_column(col)
    for cls in registered_passes():
        fields = ", ".join(f"{k}{field_default(f)}" for k, f in cls.Config.model_fields.items())
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        table.add_row(
            cls.name,
            "exact" if cls.exact else "approximate",
            fields or "-",
            ",".join(sorted(cls.runs_after)) or "-",
            ",".join(sorted(cls.runs_before)) or "-",
            summary,
        )
    console.print(table)


def explain(run: PipelineRun) -> None:
    table = Table(title="what each pass changed")
    for col in ("#", "pass", "kind", "seconds", "changed", "nodes Δ", "params Δ", "cache bytes Δ", "details"):
        table.add_column(col)
    for i, r in enumerate(run.records, 1):
        table.add_row(
            str(i),
            r.spec,
            "exact" if r.exact else "approx",
            f"{r.seconds:.3f}",
            "yes" if r.changed else "no",
            f"{r.nodes_delta:+d}",
            f"{r.parameters_delta:+d}",
            f"{r.cache_bytes_delta:+d}",
            ", ".join(f"{k}={v}" for k, v in r.stats.items()),
        )
    console.print(table)
    for i, r in enumerate(run.records, 1):
        for title, rows in r.tables.items():
            if rows:
                console.print(rows_table(f"pass {i} ({r.spec}): {title}", rows))


def rows_table(title: str, rows: list[dict]) -> Table:
    """A rich table of ``rows`` (dicts with the same keys), floats to 4 significant digits."""
    table = Table(title=title)
    for col in rows[0]:
        table.add_column(str(col), justify="right")
    for row in rows:
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()))
    return table


def exact_bound(run: PipelineRun) -> str:
    """What the pipeline promises about logits, in words (``Pass.exact_within`` of the passes that changed
    something)."""
    bound = run.exact_within()
    changed = [r.spec for r in run.records if r.exact_within is not None]
    if bound is None:
        return "exact at every position (fp32 rounding)"
    if bound == 0:
        return f"none: approximate ({', '.join(changed)}); quality is what the report measures"
    limited = [r.spec for r in run.records if r.exact_within == bound]
    return f"exact up to {bound} tokens per row ({', '.join(limited)}), approximate after"


def compare_outputs(baseline: Executable, optimized: Executable, run: PipelineRun, seed: int, target: str) -> dict:
    """Each graph of ``optimized`` against the captured program on the same seeded tokens, each over its own
    cache (``ir.compare``), checked against the pipeline's exact bound; prints the table, warns on stderr
    about any output outside the bound, and returns the figures for the manifest."""
    tolerance = max(baseline.fp32_tolerance, optimized.fp32_tolerance)
    with progress.task("comparing outputs with the captured model"):
        gaps, probe = compare_programs(baseline, optimized, seed=seed, exact_within=run.exact_within(),
                                       rtol=tolerance, atol=tolerance)
    bound = exact_bound(run)
    table = Table(title=f"outputs vs the captured model ({probe})",
                  caption=f"bound: {bound}; within it |Δ| <= {tolerance:g} + {tolerance:g}·|logit|")
    for col in ("graph", "against", "output", "compared", "max |Δ|", "within the exact bound"):
        table.add_column(col, justify="left" if col in ("graph", "against", "output") else "right")
    for gap in gaps:
        verdict = {None: "-", True: f"yes ({gap.exact_outputs})", False: f"NO ({gap.exact_outputs})"}[gap.within]
        table.add_row(gap.graph, gap.reference, gap.output, str(gap.outputs), f"{gap.max_abs:.3g}", verdict)
    console.print(table)
    for gap in gaps:
        if gap.within is False:
            err_console.print(f"warning: the {gap.output} of graph '{gap.graph}' of the optimized program differ from "
                              f"'{gap.reference}' of the captured one by up to {gap.max_abs:.3g} where the pipeline "
                              f"promises "
                              f"{bound}: a pass or the '{target}' target is wrong",
                              soft_wrap=True)
    return {"probe": probe, "bound": bound, "exact_within": run.exact_within(), "tolerance": tolerance,
            "graphs": [asdict(g) for g in gaps]}


def eval_text(args: argparse.Namespace, model: ModelDir) -> bytes | None:
    """The bytes bits/byte is scored on: ``--eval-text`` (checked), else the shipped held-out text for
    byte-level models (vocab 256), else None."""
    byte_level = model.config.get("vocab_size") == 256
    if args.eval_text:
        path = Path(args.eval_text)
        if not path.is_file():
            raise InferpassError(f"--eval-text {path} is not a file")
        if model.kind != "decoder" or not byte_level:
            raise InferpassError(f"--eval-text needs a byte-level decoder (vocab 256) to score bits/byte; "
                                 f"{model.root} is a {model.model_type} {model.kind} with vocab "
                                 f"{model.config.get('vocab_size')}")
        try:
            return path.read_bytes()
        except OSError as exc:
            raise InferpassError(f"--eval-text {path}: cannot read it: {exc.strerror}") from None
    return HELDOUT_TEXT.read_bytes() if byte_level and model.kind == "decoder" and HELDOUT_TEXT.is_file() else None


def evaluate(baseline: Executable, optimized: Executable, args: argparse.Namespace, text: bytes | None) -> Report:
    """The side-by-side report: decoders on held-out text and prompts, encoders on their test data."""
    info = baseline.program.info
    if info.kind == "encoder":
        if info.family == "vit" and info.hf_config.get("image_size") == IMAGE_SIZE and DIGITS_FILE.is_file():
            pixels, labels = load_digits("test")
            return compare_encoders(baseline, optimized, (pixels,), labels, budget_s=args.speed_budget)
        inputs = example_inputs(baseline.program, baseline.program.graph_for(), batch=16, seed=args.seed)
        return compare_encoders(baseline, optimized, inputs, budget_s=args.speed_budget)
    max_len = baseline.program.cache.max_len
    context = min(1024, max_len)
    length = max(1, min(64 if text else 16, max_len // 2))  # prompts leave room to generate
    if text:
        prompts = prompts_from_text(text, length=length)
    else:
        prompts = random_prompts(info.vocab_size, length=length, seed=args.seed)
    new_tokens = min(args.new_tokens, max_len - length)
    return compare_decoders(baseline, optimized, prompts=prompts, new_tokens=new_tokens, text=text, context=context,
                            budget_s=args.speed_budget)


def load_pipeline(text: str | None, model: ModelDir) -> Pipeline:
    """``--pipeline`` (or the model kind's default preset), checked against the model's graphs."""
    if text is None:
        return Pipeline.parse(DEFAULT_PIPELINES[model.kind])
    pipeline = Pipeline.load(text)
    if not len(pipeline):
        raise PipelineError(f"--pipeline {text!r} names no passes and would run nothing; omit --pipeline for the "
                            f"default preset ({DEFAULT_PIPELINES[model.kind]!r} for a {model.kind})")
    pipeline.check_model(model.kind, model.config.get("vocab_size"), f"the {model.kind} {model.root}")
    return pipeline


def optimize(args: argparse.Namespace) -> int:
    """Validate the inputs (module doc), then capture, run the pipeline, compare, report and save; 0 on success."""
    if not args.model_dir and not DEFAULT_MODEL.is_dir():
        raise InferpassError(f"no MODEL_DIR given and the embedded default model is not installed at {DEFAULT_MODEL}")
    model_dir = Path(args.model_dir) if args.model_dir else DEFAULT_MODEL
    model = inspect_model_dir(model_dir)
    pipeline = load_pipeline(args.pipeline, model)
    target = get_target(args.target)
    if args.max_len is not None:
        if model.kind != "decoder":
            raise InferpassError(f"--max-len sets a decoder's KV-cache length; {model_dir} is an encoder "
                                 f"({model.model_type})")
        check_max_len(args.max_len, model.context, name="--max-len", where=str(model_dir))
    text = None if args.no_eval else eval_text(args, model)
    out = Path(args.out) if args.out else Path.cwd() / f"{model_dir.name}.inferpass"
    check_output(out, overwrite=args.force, sources=[model_dir],
                 expected_bytes=OUTPUT_BYTES_PER_WEIGHT_BYTE * model.weight_bytes)
    with progress.ConsoleReporter(console) as reporter, progress.reporting(reporter):
        return _optimize(args, model_dir, pipeline, target, text, out)


def _optimize(args, model_dir: Path, pipeline: Pipeline, target, text: bytes | None, out: Path) -> int:
    """The work of ``optimize`` once its inputs are validated."""
    t0 = time.perf_counter()
    program = capture(model_dir, max_len=args.max_len)
    capture_s = time.perf_counter() - t0
    console.print(
        f"captured {program.info.architecture} ({program.info.num_layers} layers, "
        f"{program.parameter_count():,} parameters) into graphs {', '.join(program.graphs)} in {capture_s:.1f}s"
    )
    manager = PassManager(pipeline, debug=args.debug, dump_dir=args.dump_ir, repro_dir=args.repro_dir, seed=args.seed)
    console.print(f"pipeline: {pipeline.to_string()}")
    run = manager.run(program)
    if args.explain or args.verbose:
        explain(run)
    baseline, optimized = get_target("eager").compile(program), target.compile(run.program)
    comparison = compare_outputs(baseline, optimized, run, args.seed, target.name)
    report = None
    if not args.no_eval:
        report = evaluate(baseline, optimized, args, text)
        console.print(report.table(f"{program.info.architecture}: captured (eager) vs optimized ({target.name})"))
    extra = {
        "pipeline": pipeline.to_string(),
        "pass_configs": [{"name": p.name, "config": p.config.model_dump(mode="json")} for p in pipeline.passes],
        "target": target.name,
        "records": [r.__dict__ for r in run.records],
        "report": {
            "max_abs_output_diff": {g["graph"]: g["max_abs"] for g in comparison["graphs"]},
            "comparison": comparison,
            "capture_seconds": capture_s,
            "metrics": report.to_dict() if report else None,
        },
    }
    artifacts = optimized.artifacts()
    with progress.task(f"saving {out}"):
        save_program(run.program, out, extra=extra, overwrite=args.force,
                     artifacts={target.name: artifacts} if artifacts else None)
    console.print(f"wrote {out}")
    return 0
