"""Benchmark decode attention: our split-KV kernels against torch SDPA, side by side in one process.

    python tools/bench_decode_attention.py                  # GPU if present, else CPU
    python tools/bench_decode_attention.py --contexts 1024 16384 --batches 1 8

One query token per row against a full cache of ``context`` slots, MHA (32 KV heads)
and GQA (8 KV heads of 4), head_dim 128. Per case it prints time, achieved
bandwidth (KV bytes read / time), its fraction of the device's peak (nominal peak
from the spec sheet on a GPU; measured copy bandwidth on a CPU) and speed ratios
against SDPA and against our no-split kernel.

On a GPU: Triton kernels (single = no split, split = Flash-Decoding, stream-k,
auto = the planner's choice) vs SDPA with each available backend, timed with
``triton.testing.do_bench`` (L2 flushed). On a CPU: our CPU kernel (valid prefix,
chunked) vs SDPA on the expanded cache with the capture's mask, as the captured
graph computes it; ``--fill`` < 1 leaves part of the cache unused, as in serving.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent.parent))
from inferpass.kernels.decode_plan import device_workers, plan_decode_attention  # noqa: E402
from inferpass.kernels.split_kv_reference import chunked_attention  # noqa: E402

HEADS, HEAD_DIM = 32, 128
LAYOUTS = {"MHA": 32, "GQA": 8}
PEAK_GBPS = {"H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H200": 4800, "A100-SXM4-80GB": 2039,
             "A100-SXM4-40GB": 1555, "A100 80GB PCIe": 1935, "L40S": 864, "A10G": 600}


def peak_bandwidth(device: torch.device) -> tuple[float, str]:
    """(GB/s, where it came from): the spec sheet for known GPUs, else a measured large copy."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, gbps in PEAK_GBPS.items():
            if key in name:
                return float(gbps), f"spec sheet ({name})"
    src = torch.empty(256 * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    seconds = time_call(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / seconds / 1e9, "measured copy"


def time_call(fn, device: torch.device, repeats: int = 7) -> float:
    """Median seconds per call."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _sdpa_backends(device: torch.device):
    from torch.nn.attention import SDPBackend

    if device.type != "cuda":
        return {"sdpa": None}
    return {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
            "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-math": SDPBackend.MATH}


def candidates(q, k, v, start, device: torch.device) -> dict:
    """Name -> zero-argument callable computing the same attention."""
    from torch.nn.attention import sdpa_kernel

    scale = HEAD_DIM**-0.5
    group = q.shape[1] // k.shape[1]
    fns = {}
    if device.type == "cuda":
        from inferpass.kernels.split_kv_triton import split_kv_attention_triton

        for schedule in ("single", "split", "stream-k", "auto"):
            plan = plan_decode_attention(q.shape[0], k.shape[1], k.shape[2], device_workers(device), schedule=schedule)
            fns[f"ours-{schedule}"] = (lambda p=plan: split_kv_attention_triton(q, k, v, start, scale, p))
        for name, backend in _sdpa_backends(device).items():
            def run(b=backend):
                with sdpa_kernel(b):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale,
                                                                            enable_gqa=group > 1)
            fns[name] = run
        return fns
    slots = torch.arange(k.shape[2])
    mask = (slots[None, None, None, :] <= start[:, None, None, None])
    fns["ours-single"] = lambda: chunked_attention(q, k, v, start, scale, k.shape[2])
    fns["ours-auto"] = lambda: chunked_attention(q, k, v, start, scale, 64)
    fns["sdpa"] = lambda: torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=mask, scale=scale)
    return fns


def main() -> None:
    parser = argparse.ArgumentParser(description="Decode-attention benchmark: ours vs SDPA, one process.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--contexts", type=int, nargs="+", default=None)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--fill", type=float, default=1.0, help="fraction of the cache holding valid tokens")
    parser.add_argument("--memory-fraction", type=float, default=0.4, help="skip cases whose KV exceeds this")
    parser.add_argument("--json", type=Path, default=None, help="also write one JSON record per case")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    contexts = args.contexts or ([2**i for i in range(10, 20)] if device.type == "cuda" else [1024, 4096, 16384])
    budget = args.memory_fraction * (torch.cuda.get_device_properties(device).total_memory
                                     if device.type == "cuda" else 8 * 2**30)
    peak, peak_source = peak_bandwidth(device)
    console = Console(width=150)
    console.print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
                  f"{dtype}, peak {peak:.0f} GB/s ({peak_source}), fill {args.fill}")
    table = Table(title="decode attention: time, bandwidth, ratios (>1 = ours faster)")
    for col in ("layout", "batch", "context", "kernel", "µs", "GB/s", "% peak", "vs best SDPA", "vs ours-single"):
        table.add_column(col, justify="right")
    records = []
    for layout, kv_heads in LAYOUTS.items():
        for batch in args.batches:
            for context in contexts:
                kv_bytes = 2 * batch * kv_heads * context * HEAD_DIM * dtype.itemsize
                if kv_bytes * (HEADS // kv_heads + 1) > budget:
                    continue
                gen = torch.Generator(device=device).manual_seed(0)
                q = torch.randn(batch, HEADS, 1, HEAD_DIM, device=device, dtype=dtype, generator=gen)
                k = torch.randn(batch, kv_heads, context, HEAD_DIM, device=device, dtype=dtype, generator=gen)
                v = torch.randn_like(k)
                start = torch.full((batch,), int(args.fill * context) - 1, device=device, dtype=torch.long)
                read = kv_bytes * (int(args.fill * context) / context)
                times = {name: time_call(fn, device) for name, fn in candidates(q, k, v, start, device).items()
                         if _runs(fn)}
                best_sdpa = min(t for n, t in times.items() if n.startswith("sdpa"))
                for name, seconds in times.items():
                    rec = {"layout": layout, "batch": batch, "context": context, "kernel": name,
                           "seconds": seconds, "gbps": read / seconds / 1e9, "peak_fraction": read / seconds / 1e9 / peak,
                           "vs_sdpa": best_sdpa / seconds, "vs_single": times["ours-single"] / seconds}
                    records.append(rec)
                    table.add_row(layout, str(batch), str(context), name, f"{seconds * 1e6:.1f}", f"{rec['gbps']:.0f}",
                                  f"{rec['peak_fraction']:.0%}", f"{rec['vs_sdpa']:.2f}×", f"{rec['vs_single']:.2f}×")
                del q, k, v
    console.print(table)
    if args.json:
        args.json.write_text("\n".join(json.dumps(r) for r in records) + "\n")


def _runs(fn) -> bool:
    """False for an SDPA backend that cannot take this case (so it is left out, not failed)."""
    try:
        fn()
        return True
    except RuntimeError:
        return False


if __name__ == "__main__":
    main()
