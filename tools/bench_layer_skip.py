"""Layer skipping on the default LM, side by side in one process: quality and decode speed per setting.

    python tools/bench_layer_skip.py [--ks 1 2 3 4] [--target eager] [--out bench-results]

For ``blocks``, ``attention`` and ``ffn`` with k = 1 … 4 of the 8 blocks, each ranked three ways
(``influence``: lowest Block Influence on calibration text the model generates; ``ablation``: greedy,
least rise of the calibration loss; ``last``: the last k blocks; ``random``: seeded), and for SkipDecode schedules of falling minimum budgets: held-out
bits/byte (``--context``-byte windows; schedules are scored one token per call so every position
runs its scheduled graph), greedy agreement over ``--new`` tokens after ``--prompts`` held-out prompts
of ``--prompt-len`` bytes, and decode tokens/s against the unmodified program on the same target,
timed in rounds alternating which runs first (median ratio, with its spread). Every program runs the same exact
baseline pipeline (``--base``) first. Writes a table, ``layer_skip.json`` and ``layer_skip.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent.parent))
from inferpass.capture import capture  # noqa: E402
from inferpass.defaults import DEFAULT_MODEL, HELDOUT_TEXT  # noqa: E402
from inferpass.eval.quality import program_bits_per_byte  # noqa: E402
from inferpass.passes import PassManager, Pipeline  # noqa: E402
from inferpass.runtime.generator import Generator  # noqa: E402
from inferpass.targets import get_target  # noqa: E402

console = Console(width=170)


def decode_seconds(executable, prompts, new: int) -> float:
    """Seconds the decode steps of one greedy generation take (prefill excluded)."""
    return sum(Generator(executable).generate(prompts, new).decode_seconds)


def agreement(want: list[list[int]], got: list[list[int]]) -> float:
    """Mean fraction of tokens equal to the baseline's before the first difference."""
    same = []
    for w, g in zip(want, got):
        n = next((i for i, (a, b) in enumerate(zip(w, g)) if a != b), min(len(w), len(g)))
        same.append(n / len(w))
    return sum(same) / len(same)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--modes", nargs="+", default=["blocks", "attention", "ffn"])
    parser.add_argument("--ranks", nargs="+", default=["influence", "ablation", "last", "random"])
    parser.add_argument("--schedule-ranks", nargs="+", default=["influence", "ablation", "first"])
    parser.add_argument("--schedules", nargs="+", default=["64:6", "64:5", "32:6,128:4", "64:4"],
                        help="SkipDecode budgets, position:layers pairs")
    parser.add_argument("--target", default="eager")
    parser.add_argument("--base", default="dce,cse,drop-unused-params,lean-attention")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--bytes", type=int, default=32768, help="held-out bytes scored (prefill modes)")
    parser.add_argument("--schedule-bytes", type=int, default=4096, help="held-out bytes scored one token per call")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=192)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args()

    captured = capture(DEFAULT_MODEL, max_len=args.context + args.new)
    base_program = PassManager(Pipeline.parse(args.base)).run(captured).program
    target = get_target(args.target)
    text = HELDOUT_TEXT.read_bytes()
    scored, scored_steps = text[: args.bytes], text[-args.schedule_bytes:]
    stride = (len(text) - args.prompt_len) // args.prompts
    prompts = [list(text[i * stride: i * stride + args.prompt_len]) for i in range(args.prompts)]
    base = target.compile(base_program)
    want = Generator(base).generate(prompts, args.new).tokens
    base_bpb = program_bits_per_byte(base, scored, context=args.context)
    base_steps_bpb = program_bits_per_byte(base, scored_steps, context=args.context, batch=8, chunk=1)
    decode_seconds(base, prompts, 4)  # warm-up

    settings = [(mode, rank, k) for mode in args.modes for k in args.ks for rank in args.ranks]
    settings += [("schedule", rank, s) for s in args.schedules for rank in args.schedule_ranks]
    rows = []
    started = time.perf_counter()
    for i, (mode, rank, k) in enumerate(settings):
        if mode == "schedule":
            budgets = "{" + ", ".join(f"{p}: {n}" for p, n in (pair.split(":") for pair in k.split(","))) + "}"
            spec = f"layer-skip{{mode=schedule, rank={rank}, budgets={budgets}}}"
        else:
            spec = f"layer-skip{{mode={mode}, rank={rank}, k={k}, seed={args.seed}}}"
        run = PassManager(Pipeline.parse(spec)).run(base_program)
        ours = target.compile(run.program)
        if mode == "schedule":
            bpb = program_bits_per_byte(ours, scored_steps, context=args.context, batch=8, chunk=1)
            delta = bpb - base_steps_bpb
        else:
            bpb = program_bits_per_byte(ours, scored, context=args.context)
            delta = bpb - base_bpb
        got = Generator(ours).generate(prompts, args.new).tokens
        decode_seconds(ours, prompts, 4)  # warm-up
        ratios = []
        for round_ in range(args.rounds):  # alternating which runs first, so neither gains from going second
            pair = (base, ours) if round_ % 2 == 0 else (ours, base)
            seconds = {id(e): decode_seconds(e, prompts, args.new) for e in pair}
            ratios.append(seconds[id(base)] / seconds[id(ours)])
        stats = run.records[0].stats
        rows.append({"mode": mode, "rank": rank, "k": k, "skipped": stats.get("skipped", stats.get("stages")),
                     "bits_per_byte": bpb, "delta": delta, "agreement": agreement(want, got),
                     "decode_speedup": statistics.median(ratios), "speedup_spread": max(ratios) - min(ratios),
                     "cache_kept": stats.get("cache_fraction_kept", 1.0)})
        elapsed = time.perf_counter() - started
        console.print(f"[{i + 1}/{len(settings)}] {spec}: Δbits/byte {delta:+.4f}, agreement "
                      f"{rows[-1]['agreement']:.3f}, decode ×{rows[-1]['decode_speedup']:.2f} "
                      f"(ETA {elapsed / (i + 1) * (len(settings) - i - 1):.0f} s)")

    table = Table(title=f"layer-skip on the default LM ({args.target} target, after {args.base}); baseline "
                        f"{base_bpb:.4f} bits/byte ({base_steps_bpb:.4f} scored one token per call)")
    for col in ("mode", "rank", "k / budgets", "skipped", "bits/byte", "Δ", "greedy agreement",
                f"decode ×  (spread, {args.rounds} rounds)", "KV kept"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["mode"], r["rank"], str(r["k"]), str(r["skipped"]), f"{r['bits_per_byte']:.4f}",
                      f"{r['delta']:+.4f}", f"{r['agreement']:.3f}",
                      f"{r['decode_speedup']:.2f}× (±{r['speedup_spread'] / 2:.2f})", f"{r['cache_kept']:.2f}")
    console.print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "layer_skip.json").write_text(json.dumps({"base_bits_per_byte": base_bpb,
                                                          "base_steps_bits_per_byte": base_steps_bpb,
                                                          "rows": rows}, indent=1, default=str))
    fig, axes = plt.subplots(1, len(args.modes) + 1, figsize=(5 * (len(args.modes) + 1), 4))
    for ax, mode in zip(axes, args.modes):
        for rank in args.ranks:
            pts = [r for r in rows if r["mode"] == mode and r["rank"] == rank]
            ax.plot([r["decode_speedup"] for r in pts], [r["delta"] for r in pts], "o-", label=rank)
        ax.set(title=f"{mode}: k = {args.ks}", xlabel="decode speed-up ×", ylabel="Δ bits/byte")
        ax.legend()
    for rank in args.schedule_ranks:
        pts = [r for r in rows if r["mode"] == "schedule" and r["rank"] == rank]
        axes[-1].plot([r["decode_speedup"] for r in pts], [r["delta"] for r in pts], "o-", label=rank)
        for r in pts:
            axes[-1].annotate(str(r["k"]), (r["decode_speedup"], r["delta"]), fontsize=7)
    axes[-1].legend()
    axes[-1].set(title="SkipDecode schedules", xlabel="decode speed-up ×", ylabel="Δ bits/byte (per-token)")
    fig.tight_layout()
    fig.savefig(args.out / "layer_skip.png", dpi=120)
    console.print(f"wrote {args.out / 'layer_skip.json'} and {args.out / 'layer_skip.png'}")


if __name__ == "__main__":
    main()
