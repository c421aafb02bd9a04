"""``optimize-model``: parse the command line, then hand over to ``inferpass.commands``.

Only the standard library, ``inferpass.defaults`` and ``inferpass.errors`` are imported here, so ``--help`` and
argument errors answer at once; the heavy stack (torch, transformers) is imported
deliberately late, after the arguments parse.
"""

from __future__ import annotations

import argparse
import sys

from inferpass.defaults import DEFAULT_MODEL, DEFAULT_PIPELINES, HELDOUT_TEXT, TARGETS
from inferpass.errors import InferpassError

__all__ = ["DEFAULT_MODEL", "DEFAULT_PIPELINES", "HELDOUT_TEXT", "build_parser", "main"]


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def seconds(text: str) -> float:
    """argparse type: a number of seconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="optimize-model",
        description="Capture a transformer, rewrite it with passes, verify it and save the optimized model.",
    )
    p.add_argument("model_dir", nargs="?", help="Hugging Face model directory (default: the embedded default LM)")
    p.add_argument("--pipeline", default=None, help=f"pipeline string or YAML/JSON file (default, exact: "
                   f"{DEFAULT_PIPELINES['decoder']!r} for decoders, {DEFAULT_PIPELINES['encoder']!r} for encoders)")
    p.add_argument("--target", default="eager", help=f"where the result runs: {', '.join(TARGETS)}")
    p.add_argument("--out", help="output folder (default: ./<model name>.inferpass)")
    p.add_argument("--force", action="store_true",
                   help="replace --out if it is an inferpass output folder (or empty)")
    p.add_argument("--max-len", type=int, help="KV-cache length for decoder graphs, 3..the model's context "
                   "(default: the model's context, <= 4096)")
    p.add_argument("--list-passes", action="store_true", help="list passes with their config fields and exit")
    p.add_argument("--explain", action="store_true", help="print what each pass changed")
    p.add_argument("--dump-ir", metavar="DIR", help="write IR dumps per stage into DIR")
    p.add_argument("--repro-dir", metavar="DIR", help="where repro bundles go on failure (default: temp dir)")
    p.add_argument("--repro", metavar="BUNDLE", help="re-run the failing pass recorded in a repro bundle "
                   "(plugins it names must be given with --plugin)")
    p.add_argument("--debug", action="store_true", help="also check exact passes numerically after each pass")
    p.add_argument("--plugin", action="append", default=[], help="import a module that registers passes")
    p.add_argument("--no-eval", action="store_true", help="skip the baseline-vs-optimized quality/speed report")
    p.add_argument("--eval-text", help="text for bits/byte (byte-level LMs; default: the shipped held-out text)")
    p.add_argument("--speed-budget", type=seconds, default=120.0, metavar="SECONDS",
                   help="speed runs repeat until their ratios are stable, starting no new round after this "
                        "(default: 120; the first rounds always run)")
    p.add_argument("--new-tokens", type=positive_int, default=32, help="tokens generated per prompt in the report")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


def build_generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="optimize-model generate",
        description="Generate text with the engine (continuous batching) from a saved inferpass folder or a model "
                    "directory; prompts from --prompt, else one per line on stdin. Streams a single prompt's text; "
                    "ends with a throughput summary.",
    )
    p.add_argument("model_dir", nargs="?", help="saved inferpass folder or Hugging Face model directory "
                   "(default: the embedded default LM)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    p.add_argument("--target", default="eager", help=f"where it runs: {', '.join(TARGETS)}")
    p.add_argument("--max-len", type=positive_int, help="KV-cache length when capturing a model directory")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-k", type=positive_int)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (byte-level models; repeatable)")
    p.add_argument("--rows", type=positive_int, default=8, help="sequences decoded at once (cache rows)")
    p.add_argument("--plugin", action="append", default=[], help="import a module that registers passes or ops")
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``optimize-model`` (or ``optimize-model generate ...``); 0 on success, 2 with ``error: ...`` on stderr
    for bad input, 1 for a reproduced failure (``--repro``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["generate"]:
        args = build_generate_parser().parse_args(argv[1:])
        args.command = "generate"
    else:
        args = build_parser().parse_args(argv)
        args.command = "optimize"
    from inferpass import commands  # the heavy stack, only now that the arguments parse

    try:
        return commands.run(args)
    except InferpassError as exc:
        commands.err_console.print(f"error: {exc}", soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
