"""KV-cache quantization, measured side by side in one process: quality, cache bytes, attention speed, batch fit.

    python tools/bench_kv_quant.py quality [--context 4096]   # default LM: bits/byte, greedy agreement, bytes
    python tools/bench_kv_quant.py attention                  # quantized decode attention vs fp16 SDPA
    python tools/bench_kv_quant.py fit [--budget-gib 1]       # a batch that only fits with the 4-bit cache

``quality``: the shipped default LM captured with a ``--context``-slot cache (past its
2048-position config the RoPE model extrapolates: baseline and quantized see the same
positions), unquantized against ``kv-quant{bits=8|4|2, SPEC}``. Held-out bits/byte over
``--context``-byte windows fed ``64`` tokens per call through the cache (later chunks
attend to what earlier ones cached), greedy agreement of 32 new tokens after prompts of
``context - 32`` bytes, and KV-cache bytes per sequence: of this fp32 program and of the
same layouts in fp16 (the GPU deployment), each against an fp16 cache.

``attention``: one decode query per row (32 query / 8 KV heads, head_dim 128) over a
full ``context``-token cache: ours over the 4-bit cache (fused Triton kernel on a GPU,
the CPU kernel here) against SDPA over fp16 K/V (and fp32 on a CPU), bytes each reads.

``fit``: each case runs in a child process whose address space is capped at what it
uses after start-up plus ``--budget-gib``: the fp16 cache (and this program's fp32 one)
for a batch of ``context``-slot sequences, against the 4-bit cache for the same batch,
which then generates for real.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent.parent))
sys.path.insert(0, str(Path(__file__).parent))
from bench_decode_attention import time_call  # noqa: E402
from inferpass.capture import capture, load_hf_model  # noqa: E402
from inferpass.cli import DEFAULT_MODEL, HELDOUT_TEXT  # noqa: E402
from inferpass.eval.quality import greedy_agreement, program_bits_per_byte  # noqa: E402
from inferpass.eval.speed import process_status_bytes  # noqa: E402
from inferpass.ir.program import CacheLayout, Program  # noqa: E402
from inferpass.kernels.quantized_attention import quantized_cache_attention  # noqa: E402
from inferpass.kernels.quantized_cache import KVQuantSpec, allocate, append  # noqa: E402
from inferpass.passes import PassManager, Pipeline  # noqa: E402
from inferpass.runtime.generator import Generator  # noqa: E402
from inferpass.runtime.cache_pool import CachePool  # noqa: E402
from inferpass.targets import get_target  # noqa: E402

DEFAULT_SPEC = "group=32, residual=32, value_group=96"  # value groups: all 3×32 channels of a default-LM token
EVAL_CHUNK = 64
NEW_TOKENS = 32
console = Console(width=160)


def long_context_program(context: int) -> Program:
    """The default LM captured with ``context`` cache slots (RoPE positions past its config extrapolate)."""
    model = load_hf_model(DEFAULT_MODEL)
    model.config.max_position_embeddings = max(model.config.max_position_embeddings, context)
    return capture(model, max_len=context)


def quantize(program: Program, bits: int, spec: str) -> tuple[Program, CacheLayout]:
    """``program`` through ``kv-quant{bits, spec}``, and the layout that pass gives the program captured in fp16."""
    pipeline = Pipeline.parse(f"kv-quant{{bits={bits}, {spec}}}")
    fp16 = pipeline.passes[0].quantized_layout(as_dtype(program.cache, "float16"),
                                               {t.layer for t in program.cache.tensors})
    return PassManager(pipeline).run(program.clone()).program, fp16


def as_dtype(layout: CacheLayout, dtype: str) -> CacheLayout:
    """``layout`` with every full-precision tensor (fp32/fp16/bf16) in ``dtype``: the program captured in ``dtype``."""
    tensors = tuple(t.model_copy(update={"dtype": dtype}) if t.dtype in ("float32", "bfloat16") else t
                    for t in layout.tensors)
    return layout.model_copy(update={"tensors": tensors})


def quality(args) -> list[dict]:
    program = long_context_program(args.context)
    text = HELDOUT_TEXT.read_bytes()[: args.bytes]
    eager = get_target("eager")
    base = eager.compile(program)
    prompts = [list(text[i : i + args.context - NEW_TOKENS])
               for i in range(0, len(text) - args.context, max(1, (len(text) - args.context) // args.prompts))
               ][: args.prompts]
    fp16 = as_dtype(program.cache, "float16").nbytes(1)
    base_bpb = program_bits_per_byte(base, text, context=args.context, chunk=EVAL_CHUNK)
    rows = [{"cache": "fp (unquantized)", "bits_per_byte": base_bpb, "delta": 0.0, "agreement": 1.0,
             "bytes_fp32_program": program.cache.nbytes(1), "vs_fp16_fp32_program": fp16 / program.cache.nbytes(1),
             "bytes_fp16_program": fp16, "vs_fp16_fp16_program": 1.0}]
    for bits in args.bits:
        spec = f"{args.spec}, sink={args.sink}" if args.sink else args.spec
        quantized, fp16_layout = quantize(program, bits, spec)
        ours = eager.compile(quantized)
        bpb = program_bits_per_byte(ours, text, context=args.context, chunk=EVAL_CHUNK)
        rows.append({"cache": f"{bits}-bit", "bits_per_byte": bpb, "delta": bpb - base_bpb,
                     "agreement": greedy_agreement(base, ours, prompts, NEW_TOKENS),
                     "bytes_fp32_program": quantized.cache.nbytes(1),
                     "vs_fp16_fp32_program": fp16 / quantized.cache.nbytes(1),
                     "bytes_fp16_program": fp16_layout.nbytes(1), "vs_fp16_fp16_program": fp16 / fp16_layout.nbytes(1)})
        console.print(rows[-1])
    table = Table(title=f"default LM, {args.context}-byte windows over {len(text):,} held-out bytes, "
                        f"kv-quant{{{args.spec}{', sink=' + str(args.sink) if args.sink else ''}}}")
    for col in ("cache", "bits/byte", "Δ vs fp", "greedy agreement", "KV bytes/seq (this fp32 program)",
                "fp16 / it", "KV bytes/seq (fp16 program)", "fp16 / it"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["cache"], f"{r['bits_per_byte']:.4f}", f"{r['delta']:+.4f}", f"{r['agreement']:.3f}",
                      f"{r['bytes_fp32_program']:,}", f"{r['vs_fp16_fp32_program']:.2f}×",
                      f"{r['bytes_fp16_program']:,}", f"{r['vs_fp16_fp16_program']:.2f}×")
    console.print(table)
    return rows


def attention(args) -> list[dict]:
    device = torch.device(args.device)
    heads, kv_heads, head_dim = 32, 8, 128
    spec = KVQuantSpec(bits=4, group=32, residual=32)
    table = Table(title=f"decode attention over a full cache, {heads}/{kv_heads} heads, head_dim {head_dim}, "
                        f"{device} (ratio > 1: ours faster)")
    for col in ("batch", "context", "kernel", "µs", "MB read", "fp16 SDPA / it"):
        table.add_column(col, justify="right")
    records = []
    for batch in args.batches:
        for context in args.contexts:
            if 2 * batch * kv_heads * context * head_dim * 2 > args.max_gib * 2**30:
                continue
            gen = torch.Generator(device=device).manual_seed(0)
            k = torch.randn(batch, kv_heads, context + 1, head_dim, device=device, generator=gen)
            v = torch.randn(batch, kv_heads, context + 1, head_dim, device=device, generator=gen)
            q = torch.randn(batch, heads, 1, head_dim, device=device, generator=gen)
            cache = append(allocate(spec, batch, kv_heads, head_dim, context + 1, device=device), k[:, :, :context],
                           v[:, :, :context], torch.zeros(batch, dtype=torch.long, device=device), spec)
            start = torch.full((batch,), context, dtype=torch.long, device=device)
            new_k, new_v = k[:, :, context:], v[:, :, context:]
            quantized_bytes = sum(t.numel() * t.element_size() for t in cache.tensors())
            fns = {}
            if device.type == "cuda":
                from inferpass.kernels.kv_quant_triton import kv_quant_attention_triton

                q16 = q.half()
                cache16 = cache._replace(k_window=cache.k_window.half(), v_window=cache.v_window.half())
                fns["ours 4-bit (Triton, fused)"] = lambda: kv_quant_attention_triton(
                    q16, cache16, new_k.half(), new_v.half(), start, head_dim**-0.5, spec)
            else:
                fns["ours 4-bit (CPU kernel)"] = lambda: quantized_cache_attention(
                    q, cache, new_k, new_v, start, head_dim**-0.5, spec)
            for dtype in (torch.float16,) + ((torch.float32,) if device.type == "cpu" else ()):
                kd, vd, qd = k.to(dtype), v.to(dtype), q.to(dtype)
                fns[f"SDPA {str(dtype).removeprefix('torch.')}"] = (
                    lambda kd=kd, vd=vd, qd=qd: torch.nn.functional.scaled_dot_product_attention(
                        qd, kd, vd, scale=head_dim**-0.5, enable_gqa=True))
            times = {name: time_call(fn, device) for name, fn in fns.items()}
            for name, seconds in times.items():
                read = quantized_bytes if name.startswith("ours") else k.numel() * 2 * (2 if "16" in name else 4)
                rec = {"device": str(device), "batch": batch, "context": context, "kernel": name, "seconds": seconds,
                       "bytes": read, "vs_fp16_sdpa": times["SDPA float16"] / seconds}
                records.append(rec)
                table.add_row(str(batch), str(context), name, f"{seconds * 1e6:,.0f}", f"{read / 1e6:,.1f}",
                              f"{rec['vs_fp16_sdpa']:.2f}×")
    console.print(table)
    return records


def _child_fit(args) -> None:
    """In a child process: cap the address space at current use + budget, then allocate (and run) one case."""
    program = long_context_program(args.context)
    if args.case != "fp":
        program = quantize(program, int(args.case.split("-")[0]), args.spec)[0]
    layout = as_dtype(program.cache, args.cache_dtype) if args.case == "fp" else program.cache
    used = process_status_bytes("VmSize")
    limit = used + int(args.budget_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    result = {"case": args.case, "cache_dtype": args.cache_dtype if args.case == "fp" else "quantized",
              "batch": args.batch, "cache_bytes": layout.nbytes(args.batch)}
    try:
        if args.case == "fp":
            CachePool(layout, args.batch)
            result["outcome"] = "allocated"
        else:
            prompts = [list(HELDOUT_TEXT.read_bytes()[i * 64 : i * 64 + 64]) for i in range(args.batch)]
            out = Generator(get_target("eager").compile(program)).generate(prompts, 8)
            result["outcome"] = f"generated {sum(len(t) for t in out.tokens)} tokens"
    except (MemoryError, RuntimeError) as err:
        asked = re.search(r"tried to allocate (\d+) bytes", str(err))
        result["outcome"] = "out of memory" + (f" (asked for {int(asked[1]):,} more bytes)" if asked else "")
    result["peak_rss_bytes"] = process_status_bytes("VmHWM")
    print(json.dumps(result))


def fit(args) -> list[dict]:
    program = long_context_program(args.context)
    budget = args.budget_gib * 2**30
    fp16_seq = as_dtype(program.cache, "float16").nbytes(1)
    quantized_seq = quantize(program, 4, args.spec)[0].cache.nbytes(1)
    batch = args.batch or int(budget // fp16_seq) + 1
    console.print(f"budget {budget / 2**30:.2f} GiB over start-up use; {args.context}-slot sequences: fp16 cache "
                  f"{fp16_seq:,} B/seq (fits {int(budget // fp16_seq)}), 4-bit cache {quantized_seq:,} B/seq "
                  f"(fits {int(budget // quantized_seq)}); batch {batch}")
    rows = []
    for case, dtype in (("fp", "float16"), ("fp", "float32"), ("4-bit", "float32")):
        cmd = [sys.executable, __file__, "fit-child", "--case", case, "--cache-dtype", dtype, "--batch", str(batch),
               "--context", str(args.context), "--budget-gib", str(args.budget_gib), "--spec", args.spec]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"fit child {case} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    table = Table(title=f"batch {batch} × {args.context}-slot sequences under a {args.budget_gib} GiB cap")
    for col in ("cache", "cache bytes", "outcome", "peak RSS"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(f"{r['case']} {r['cache_dtype']}", f"{r['cache_bytes']:,}", r["outcome"],
                      f"{r['peak_rss_bytes']:,}")
    console.print(table)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["quality", "attention", "fit", "fit-child"])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--spec", default=DEFAULT_SPEC, help="kv-quant config besides bits")
    parser.add_argument("--sink", type=int, default=0)
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4, 2])
    parser.add_argument("--bytes", type=int, default=65536, help="held-out bytes scored")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--contexts", type=int, nargs="+", default=None)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-gib", type=float, default=4.0, help="skip attention cases with more fp16 KV")
    parser.add_argument("--budget-gib", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--case", default="fp")
    parser.add_argument("--cache-dtype", default="float16")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.contexts is None:
        args.contexts = [4096, 16384, 32768, 131072] if args.device == "cuda" else [1024, 4096, 16384, 32768]
    if args.what == "fit-child":
        return _child_fit(args)
    records = {"quality": quality, "attention": attention, "fit": fit}[args.what](args)
    if args.json:
        args.json.write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
