"""Targets side by side in one process: prefill latency per bucket and decode tokens/s, as ratios to eager.

    python tools/bench_targets.py                       # the default LM, max_len 1024
    python tools/bench_targets.py --buckets 16 64 256 --batch 1 --repeats 20

Candidates: ``eager`` (the captured graphs), our ``cpu`` (IREE) and ``inductor``
(AOTInductor) targets, both static per shape, ``torch.compile`` (Inductor, JIT, one
compile per shape), the ``cuda`` target's lowering compiled for the CPU (Inductor with the
caches written in place: what the functional ahead-of-time targets would gain from keeping
cache memory) and, on a machine with a GPU, the ``cuda`` target itself (inputs resident on the
GPU, decode replayed as a CUDA graph; GPU timings against the CPU baseline, see the JSON for
absolute times). Each is first checked against eager on the same inputs; a candidate whose
outputs differ (beyond 1e-3) or that fails is reported as such and not timed. Compile time is
the first call of each shape (the targets' on-disk caches point at an empty folder). Timings are medians of ``--repeats`` calls, interleaved
across candidates so machine drift hits all alike; the table prints ratios to eager.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent.parent))
from inferpass.capture import capture  # noqa: E402
from inferpass.cli import DEFAULT_MODEL  # noqa: E402
from inferpass.ir.program import Program  # noqa: E402
from inferpass.targets.cuda import CudaTarget  # noqa: E402
from inferpass.targets.inductor import InductorTarget  # noqa: E402
from inferpass.targets.iree_cpu import CpuTarget  # noqa: E402

console = Console(width=150)


def _flat(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def candidates(program: Program, cache_dir: Path) -> dict:
    """Name -> function ``(graph, inputs) -> outputs`` for every candidate."""
    modules = {name: ep.module() for name, ep in program.graphs.items()}
    cpu = CpuTarget(cache_dir=cache_dir).compile(program)
    inductor = InductorTarget(cache_dir=cache_dir).compile(program)
    compiled = {name: torch.compile(modules[name], dynamic=False) for name in program.graphs}
    in_place = CudaTarget(device="cpu").compile(program)
    fns = {
        "eager": lambda g, x: _flat(modules[g](*x)),
        "cpu (IREE)": lambda g, x: cpu.run(g, *x),
        "inductor (AOTInductor)": lambda g, x: inductor.run(g, *x),
        "torch.compile": lambda g, x: _flat(compiled[g](*x)),
        # writes the caches of x in place: the slots each case writes first, so no candidate's result changes
        "in-place inductor (cuda lowering on CPU)": lambda g, x: in_place.run(g, *x),
    }
    if torch.cuda.is_available():
        gpu, resident = CudaTarget().compile(program), {}

        def on_gpu(g, x):
            key = (g, tuple(t.shape for t in x))
            if key not in resident:  # one set of device tensors per case, so decode replays its CUDA graph
                resident[key] = tuple(t.cuda() for t in x)
            out = gpu.run(g, *resident[key])
            torch.cuda.synchronize()
            return out

        fns[f"cuda ({torch.cuda.get_device_name()})"] = on_gpu
    return fns


def inputs_for(program: Program, graph: str, batch: int, seq: int) -> tuple[torch.Tensor, ...]:
    """Prefill: ``seq`` tokens at start 0; decode: one token at position max_len/2 over random history."""
    gen = torch.Generator().manual_seed(0)
    layout = program.cache
    caches = [t.normal_(generator=gen) if t.is_floating_point() else t for t in layout.allocate(batch)]
    ids = torch.randint(0, program.info.vocab_size, (batch, seq), generator=gen)
    start = torch.full((batch,), 0 if graph == "prefill" else layout.max_len // 2, dtype=torch.long)
    return (ids, start, *caches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--buckets", type=int, nargs="+", default=[16, 64, 256, 1024])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    program = capture(args.model, max_len=args.max_len)
    cases = [("prefill", b) for b in args.buckets if b <= args.max_len] + [("decode", 1)]
    with tempfile.TemporaryDirectory() as cache_dir:
        fns = candidates(program, Path(cache_dir))
        first_call, usable = {}, {name: True for name in fns}
        for graph, seq in cases:
            x = inputs_for(program, graph, args.batch, seq)
            want = fns["eager"](graph, x)
            for name, fn in fns.items():
                t0 = time.perf_counter()
                try:
                    got = fn(graph, x)
                except Exception as err:  # noqa: BLE001
                    console.print(f"{name}: {graph} seq {seq} failed: {str(err).splitlines()[0][:200]}")
                    usable[name] = False
                    continue
                first_call[(name, graph, seq)] = time.perf_counter() - t0
                diff = max(float((a.float() - b.float().cpu()).abs().max()) for a, b in zip(want, got))
                if diff > 1e-3:
                    console.print(f"{name}: {graph} seq {seq} differs from eager by {diff:.3g}: not timed")
                    usable[name] = False
        times = {key: [] for key in first_call}
        for _ in range(args.repeats):
            for graph, seq in cases:
                x = inputs_for(program, graph, args.batch, seq)
                for name, fn in fns.items():
                    if usable[name]:
                        t0 = time.perf_counter()
                        fn(graph, x)
                        times[(name, graph, seq)].append(time.perf_counter() - t0)
    table = Table(title=f"{program.info.architecture} ({program.parameter_count():,} params), batch {args.batch}, "
                        f"max_len {args.max_len}, {torch.get_num_threads()} torch threads: median latency and "
                        "speed-up over eager (>1 = faster)")
    for col in ("case", *[n for n in fns if usable[n]]):
        table.add_column(col, justify="right")
    records = []
    for graph, seq in cases:
        label = f"prefill {seq} tokens" if graph == "prefill" else "decode step (tok/s)"
        base = statistics.median(times[("eager", graph, seq)])
        row = [label]
        for name in fns:
            if not usable[name]:
                continue
            median = statistics.median(times[(name, graph, seq)])
            records.append({"candidate": name, "graph": graph, "seq": seq, "seconds": median,
                            "speedup_vs_eager": base / median, "first_call_s": first_call[(name, graph, seq)]})
            shown = f"{1 / median:,.0f} tok/s" if graph == "decode" else f"{median * 1e3:,.2f} ms"
            row.append(f"{shown} ({base / median:.2f}×)")
        table.add_row(*row)
    console.print(table)
    compile_table = Table(title="first call per shape (compile + run), seconds")
    compile_table.add_column("candidate")
    for graph, seq in cases:
        compile_table.add_column(f"{graph} {seq}", justify="right")
    for name in fns:
        compile_table.add_row(name, *[f"{first_call[(name, g, s)]:.2f}" if (name, g, s) in first_call else "-"
                                      for g, s in cases])
    console.print(compile_table)
    if args.json:
        args.json.write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
