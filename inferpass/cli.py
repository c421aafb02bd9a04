"""``optimize-model``: capture a model, run a pass pipeline, verify, and write the optimized folder."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from inferpass.capture import capture
from inferpass.eval.digits import DIGITS_FILE, IMAGE_SIZE, load_digits
from inferpass.eval.report import Report, compare_decoders, compare_encoders, prompts_from_text, random_prompts
from inferpass.errors import InferpassError
from inferpass.ir.examples import example_inputs
from inferpass.ir.serialize import save_program
from inferpass.passes import PassManager, Pipeline, PipelineRun, registered_passes
from inferpass.plugins import load_plugin
from inferpass.targets import Executable, get_target, target_names

DEFAULT_PIPELINES = {  # exact presets per model kind
    "decoder": "dce,cse,drop-unused-params,lean-attention",
    "encoder": "dce,cse,drop-unused-params",
}
MODELS = Path(__file__).parent / "models"
DEFAULT_MODEL = MODELS / "default-lm"
HELDOUT_TEXT = MODELS / "shakespeare-heldout.txt"

console = Console(highlight=False, width=140)
err_console = Console(stderr=True, highlight=False, width=140)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="optimize-model",
        description="Capture a transformer, rewrite it with passes, verify it and save the optimized model.",
    )
    p.add_argument("model_dir", nargs="?", help="Hugging Face model directory (default: the embedded default LM)")
    p.add_argument("--pipeline", default=None, help=f"pipeline string or YAML/JSON file (default, exact: "
                   f"{DEFAULT_PIPELINES['decoder']!r} for decoders, {DEFAULT_PIPELINES['encoder']!r} for encoders)")
    p.add_argument("--target", default="eager", help=f"where the result runs: {', '.join(target_names())}")
    p.add_argument("--out", help="output folder (default: ./<model name>.inferpass)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--max-len", type=int, help="KV-cache length for decoder graphs (default: model context, <= 4096)")
    p.add_argument("--list-passes", action="store_true", help="list passes with their config fields and exit")
    p.add_argument("--explain", action="store_true", help="print what each pass changed")
    p.add_argument("--dump-ir", metavar="DIR", help="write IR dumps per stage into DIR")
    p.add_argument("--repro-dir", metavar="DIR", help="where repro bundles go on failure (default: temp dir)")
    p.add_argument("--repro", metavar="BUNDLE", help="re-run the failing pass recorded in a repro bundle")
    p.add_argument("--debug", action="store_true", help="also check exact passes numerically after each pass")
    p.add_argument("--plugin", action="append", default=[], help="import a module that registers passes")
    p.add_argument("--no-eval", action="store_true", help="skip the baseline-vs-optimized quality/speed report")
    p.add_argument("--eval-text", help="text for bits/byte (byte-level LMs; default: the shipped held-out text)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt in the report")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


def list_passes() -> None:
    table = Table(title="passes")
    for col in ("name", "kind", "config (default)", "runs after", "runs before", "summary"):
        table.add_column(col)
    for cls in registered_passes():
        fields = ", ".join(
            f"{k}={f.default!r}" if not f.is_required() else f"{k} (required)" for k, f in cls.Config.model_fields.items()
        )
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


def output_diffs(baseline: Executable, optimized: Executable, seed: int) -> dict[str, float]:
    """Max |first-output difference| per graph between two executables on seeded example inputs."""
    diffs = {}
    for name in baseline.program.graphs:
        inputs = example_inputs(baseline.program, name, seed=seed)
        want, got = baseline.run(name, *inputs), optimized.run(name, *inputs)
        diffs[name] = float((want[0].float() - got[0].float().cpu()).abs().max())
    return diffs


def evaluate(baseline: Executable, optimized: Executable, args: argparse.Namespace) -> Report:
    """The side-by-side report: decoders on held-out text and prompts, encoders on their test data."""
    info = baseline.program.info
    if info.kind == "encoder":
        if info.family == "vit" and info.hf_config.get("image_size") == IMAGE_SIZE and DIGITS_FILE.is_file():
            pixels, labels = load_digits("test")
            return compare_encoders(baseline, optimized, (pixels,), labels)
        return compare_encoders(baseline, optimized, example_inputs(baseline.program, "forward", batch=16, seed=args.seed))
    if args.eval_text and not Path(args.eval_text).is_file():
        raise InferpassError(f"--eval-text {args.eval_text} is not a file")
    text_path = Path(args.eval_text) if args.eval_text else HELDOUT_TEXT
    text = text_path.read_bytes() if info.vocab_size == 256 and text_path.is_file() else None
    max_len = baseline.program.cache.max_len
    context = min(1024, max_len)
    length = max(1, min(64 if text else 16, max_len // 2))  # prompts leave room to generate
    if text:
        prompts = prompts_from_text(text, length=length)
    else:
        prompts = random_prompts(info.vocab_size, length=length, seed=args.seed)
    new_tokens = min(args.new_tokens, max_len - length)
    return compare_decoders(baseline, optimized, prompts=prompts, new_tokens=new_tokens, text=text, context=context)


def optimize(args: argparse.Namespace) -> int:
    model_dir = Path(args.model_dir) if args.model_dir else DEFAULT_MODEL
    if not args.model_dir and not DEFAULT_MODEL.is_dir():
        raise InferpassError(f"no MODEL_DIR given and the embedded default model is not installed at {DEFAULT_MODEL}")
    pipeline = Pipeline.load(args.pipeline) if args.pipeline is not None else None
    target = get_target(args.target)
    out = Path(args.out) if args.out else Path.cwd() / f"{model_dir.name}.inferpass"
    if out.exists() and not args.force:
        raise InferpassError(f"output folder {out} already exists (use --force to replace it)")
    with console.status(f"capturing {model_dir} ..."):
        t0 = time.perf_counter()
        program = capture(model_dir, max_len=args.max_len)
        capture_s = time.perf_counter() - t0
    console.print(
        f"captured {program.info.architecture} ({program.info.num_layers} layers, "
        f"{program.parameter_count():,} parameters) into graphs {', '.join(program.graphs)} in {capture_s:.1f}s"
    )
    if pipeline is None:
        pipeline = Pipeline.parse(DEFAULT_PIPELINES[program.info.kind])
    manager = PassManager(pipeline, debug=args.debug, dump_dir=args.dump_ir, repro_dir=args.repro_dir, seed=args.seed)
    with console.status(f"running pipeline {pipeline.to_string() or '(empty)'} ..."):
        run = manager.run(program)
    if args.explain or args.verbose:
        explain(run)
    baseline, optimized = get_target("eager").compile(program), target.compile(run.program)
    diffs = output_diffs(baseline, optimized, args.seed)
    console.print("max |output difference| vs captured model: " + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()))
    report = None
    if not args.no_eval:
        with console.status("measuring baseline and optimized side by side ..."):
            report = evaluate(baseline, optimized, args)
        console.print(report.table(f"{program.info.architecture}: captured (eager) vs optimized ({target.name})"))
    extra = {
        "pipeline": pipeline.to_string(),
        "pass_configs": [{"name": p.name, "config": p.config.model_dump(mode="json")} for p in pipeline.passes],
        "target": target.name,
        "records": [r.__dict__ for r in run.records],
        "report": {
            "max_abs_output_diff": diffs,
            "capture_seconds": capture_s,
            "metrics": report.to_dict() if report else None,
        },
    }
    artifacts = optimized.artifacts()
    save_program(run.program, out, extra=extra, overwrite=args.force,
                 artifacts={target.name: artifacts} if artifacts else None)
    console.print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2))
    torch.manual_seed(args.seed)
    try:
        for plugin in args.plugin:
            load_plugin(plugin)
        if args.list_passes:
            list_passes()
            return 0
        if args.repro:
            from inferpass.repro import reproduce

            message = reproduce(args.repro)
            err_console.print(f"reproduced: {message}", soft_wrap=True)
            return 1
        return optimize(args)
    except (InferpassError, FileExistsError) as exc:
        err_console.print(f"error: {exc}", soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
