"""The engine against transformers' ``generate`` on the same requests, in one process.

    python tools/bench_engine.py                                   # 64 requests, eager + cpu + inductor, exact and kv-quant
    python tools/bench_engine.py --requests 16 --targets eager --max-prompt 256 --max-output 64

Requests: prompts of 16..``--max-prompt`` bytes cut from the held-out text, outputs of
16..``--max-output`` tokens (greedy), arriving all at once and as a Poisson stream of
``--rate`` requests/s. Baseline: ``transformers`` ``generate`` on the same model in padded
static batches of each ``--hf-batch`` size (left padding, each batch runs to its longest output);
ratios are against the fastest of them. Ours: the engine over an exact program (``--pipeline``:
lean attention in prefill and decode) and a kv-quant one on each target, after a warm-up run that
compiles every shape the requests need. Reported per candidate: output tokens/s, time to first
token, per-token latency and request latency (arrival to last token) p50/p99, the ratio of
throughput to transformers, greedy agreement with transformers (fraction of requests whose
tokens are identical), and where the engine's time went (decode and prefill calls, scheduling,
sampling; the mean decode batch).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

sys.path.insert(0, str(Path(__file__).parent.parent))
from inferpass.capture import capture  # noqa: E402
from inferpass.defaults import DEFAULT_MODEL, HELDOUT_TEXT  # noqa: E402
from inferpass.eval.speed import percentile  # noqa: E402
from inferpass.passes import PassManager, Pipeline  # noqa: E402
from inferpass.runtime.engine import Engine  # noqa: E402
from inferpass.targets import get_target  # noqa: E402

console = Console(width=160)
EXACT = "dce,cse,drop-unused-params,lean-attention{graphs=[prefill,decode]}"
KV_QUANT = "kv-quant{bits=4},lean-attention{graphs=[prefill,decode]}"


def make_requests(count: int, max_prompt: int, max_output: int, rate: float, seed: int) -> list[dict]:
    """Prompts cut from the held-out text, output lengths and Poisson arrival offsets (seconds)."""
    rng = random.Random(seed)
    text = HELDOUT_TEXT.read_bytes()
    arrival, requests = 0.0, []
    for _ in range(count):
        length = rng.randint(16, max_prompt)
        first = rng.randrange(0, len(text) - length)
        requests.append({"prompt": list(text[first:first + length]), "new": rng.randint(16, max_output),
                         "arrival": arrival})
        arrival += rng.expovariate(rate)
    return requests


class _FirstStep(LogitsProcessor):
    """Records when ``generate`` produced its first token (the first logits processed)."""

    def __init__(self):
        self.first = None

    def __call__(self, input_ids, scores):
        if self.first is None:
            self.first = time.perf_counter()
        return scores


def run_transformers(model, requests: list[dict], batch: int, stream: bool) -> dict:
    """Padded static batches in arrival order; a batch starts when its last request has arrived."""
    outputs, ttft, per_token, latency = [], [], [], []
    t0 = time.perf_counter()
    for first in range(0, len(requests), batch):
        group = requests[first:first + batch]
        if stream:
            wait = group[-1]["arrival"] - (time.perf_counter() - t0)
            if wait > 0:
                time.sleep(wait)
        width = max(len(r["prompt"]) for r in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, r in enumerate(group):
            ids[row, width - len(r["prompt"]):] = torch.tensor(r["prompt"])
            mask[row, width - len(r["prompt"]):] = 1
        hook = _FirstStep()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(r["new"] for r in group),
                                 do_sample=False, logits_processor=LogitsProcessorList([hook]), pad_token_id=0)
        end = time.perf_counter()
        for row, r in enumerate(group):
            outputs.append(out[row, width:width + r["new"]].tolist())
            arrived = t0 + (r["arrival"] if stream else 0.0)
            ttft.append(hook.first - arrived)
            per_token.append((end - hook.first) / max(1, out.shape[1] - width - 1))
            latency.append(end - arrived)
    seconds = time.perf_counter() - t0
    return {"outputs": outputs, "seconds": seconds, "ttft": ttft, "per_token": per_token, "latency": latency}


def run_engine(executable, requests: list[dict], rows: int, chunk: int, step_tokens: int, stream: bool) -> dict:
    """The engine with requests submitted at their arrival times (all at once without ``stream``)."""
    engine = Engine(executable, rows=rows, prefill_chunk=chunk, step_tokens=step_tokens)
    first, last, submitted = {}, {}, []
    t0 = time.perf_counter()
    pending = list(requests)
    while pending or not engine.idle:
        now = time.perf_counter() - t0
        while pending and (not stream or pending[0]["arrival"] <= now):
            r = pending.pop(0)
            submitted.append((engine.submit(r["prompt"], {"max_new_tokens": r["new"]}), r))
        if engine.idle:
            time.sleep(max(0.0, pending[0]["arrival"] - now))
            continue
        for request, _ in engine.step():
            stamp = time.perf_counter()
            first.setdefault(request.id, stamp)
            last[request.id] = stamp
    seconds = time.perf_counter() - t0
    arrived = {q.id: t0 + (r["arrival"] if stream else 0.0) for q, r in submitted}
    ttft = [first[q.id] - arrived[q.id] for q, _ in submitted]
    per_token = [(last[q.id] - first[q.id]) / max(1, len(q.tokens) - 1) for q, _ in submitted]
    latency = [last[q.id] - arrived[q.id] for q, _ in submitted]
    r = engine.runner
    stats = {**engine.stats, "target_s": r.seconds, "decode_s": r.decode_s, "prefill_s": r.prefill_s,
             "decodes": r.decodes, "decode_rows": r.decode_rows, "prefills": r.prefills}
    return {"outputs": [q.tokens for q, _ in submitted], "seconds": seconds, "ttft": ttft, "per_token": per_token,
            "latency": latency, "stats": stats}


def time_split(result: dict) -> str:
    """Shares of the wall time in decode calls / prefill calls / scheduling / sampling, and the mean decode batch."""
    stats, seconds = result.get("stats"), result["seconds"]
    if not stats:
        return "-"
    shares = " / ".join(f"{stats[k] / seconds:.0%}" for k in ("decode_s", "prefill_s", "schedule_s", "sampling_s"))
    return f"{shares} (batch {stats['decode_rows'] / max(1, stats['decodes']):.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-prompt", type=int, default=1024)
    parser.add_argument("--max-output", type=int, default=256)
    parser.add_argument("--rate", type=float, default=4.0, help="Poisson arrivals per second")
    parser.add_argument("--targets", nargs="+", default=["eager", "cpu", "inductor"])
    parser.add_argument("--pipeline", default=EXACT, help="the exact program's passes")
    parser.add_argument("--rows", type=int, default=64, help="engine cache rows")
    parser.add_argument("--chunk", type=int, default=512, help="engine prefill chunk (tokens)")
    parser.add_argument("--step-tokens", type=int, default=1024, help="engine token budget per step")
    parser.add_argument("--hf-batch", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--kv-quant-targets", nargs="*", default=None,
                        help="targets that also run the kv-quant program (default: all; none: no kv-quant)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    requests = make_requests(args.requests, args.max_prompt, args.max_output, args.rate, args.seed)
    max_len = max(len(r["prompt"]) + r["new"] for r in requests)
    program = capture(DEFAULT_MODEL, max_len=max_len)
    programs = {"exact": PassManager(Pipeline.parse(args.pipeline)).run(program).program}
    quantized = args.targets if args.kv_quant_targets is None else args.kv_quant_targets
    if quantized:
        programs["kv-quant"] = PassManager(Pipeline.parse(KV_QUANT)).run(program).program
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, local_files_only=True, attn_implementation="sdpa",
                                                 dtype=torch.float32).eval()
    executables = {}
    for target in args.targets:
        for name, prog in programs.items():
            if name == "kv-quant" and target not in quantized:
                continue
            executable = executables[target, name] = get_target(target).compile(prog)
            t0 = time.perf_counter()
            with console.status(f"warming up {target} {name}: every shape the requests need is compiled first"):
                run_engine(executable, requests, args.rows, args.chunk, args.step_tokens, False)
            console.print(f"warmed up {target} {name} in {time.perf_counter() - t0:.0f}s")
    rows = []
    for mode in ("at once", "poisson"):
        stream = mode == "poisson"
        baselines = {batch: run_transformers(model, requests, batch, stream) for batch in args.hf_batch}
        base = max(baselines.values(), key=lambda b: sum(map(len, b["outputs"])) / b["seconds"])
        rows += [(f"transformers generate, batch {batch}", mode, b, base) for batch, b in baselines.items()]
        for (target, name), executable in executables.items():
            rows.append((f"engine {target} {name}", mode, run_engine(executable, requests, args.rows, args.chunk,
                                                                   args.step_tokens, stream), base))
    table = Table(title=f"{args.requests} requests (prompts 16..{args.max_prompt} B, outputs 16..{args.max_output}), "
                        f"default LM, {torch.get_num_threads()} threads")
    for col in ("candidate", "arrivals", "tokens/s", "× transformers", "TTFT p50 / p99", "per-token p50 / p99",
                "latency p50 / p99", "greedy = transformers", "decode / prefill / sched / sampling"):
        table.add_column(col)
    report = []
    for label, mode, result, base in rows:
        speed = sum(len(o) for o in result["outputs"]) / result["seconds"]
        ratio = speed / (sum(len(o) for o in base["outputs"]) / base["seconds"])
        same = sum(a == b for a, b in zip(result["outputs"], base["outputs"])) / len(requests)
        spread = {k: (percentile(result[k], .5), percentile(result[k], .99)) for k in ("ttft", "per_token", "latency")}
        table.add_row(label, mode, f"{speed:.1f}", f"{ratio:.2f}×", "{:.2f}s / {:.2f}s".format(*spread["ttft"]),
                      "{:.1f} / {:.1f} ms".format(*(x * 1e3 for x in spread["per_token"])),
                      "{:.2f}s / {:.2f}s".format(*spread["latency"]), f"{same:.0%}", time_split(result))
        report.append({"candidate": label, "arrivals": mode, "tokens_per_s": speed, "vs_transformers": ratio,
                       "greedy_identical": same, "seconds": result["seconds"], "p50_p99": spread,
                       "stats": result.get("stats")})
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
