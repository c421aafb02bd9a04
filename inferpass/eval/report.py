"""Baseline vs optimized, side by side in one process: quality, speed and memory, with ratios."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from rich.table import Table

from inferpass.eval.quality import accuracy, greedy_agreement, program_bits_per_byte
from inferpass.eval.speed import BUDGET_S, STABLE_SPREAD, decoder_speeds, encoder_speeds
from inferpass.targets.base import Executable


@dataclass
class Row:
    """One metric for both programs. ``better`` is ``lower`` or ``higher``."""

    metric: str
    baseline: float | None
    optimized: float | None
    better: str
    fmt: str = "{:.4g}"
    spread: float | None = None  # relative 95% CI half-width of the ratio, for measured speeds

    @property
    def ratio(self) -> float | None:
        if self.baseline in (None, 0) or self.optimized is None:
            return None
        return self.optimized / self.baseline


@dataclass
class Report:
    """Rows of metrics and how the speeds were measured; ``table()`` renders them (the caption says how many
    interleaved rounds the speeds took and whether their ratios were stable), ``to_dict()`` goes into the manifest."""

    rows: list[Row]
    speed_repeats: int | None = None
    speed_stable: bool | None = None

    def table(self, title: str = "baseline vs optimized") -> Table:
        caption = None
        if self.speed_repeats is not None:
            caption = (f"speeds: {self.speed_repeats} interleaved rounds; ratios "
                       + (f"stable to ±{STABLE_SPREAD:.0%} (95% CI)" if self.speed_stable else
                          "NOT stable (busy machine?): read them with their ± spread"))
        table = Table(title=title, caption=caption)
        for col in ("metric", "baseline", "optimized", "optimized / baseline", "± (95% CI)", "better"):
            table.add_column(col, justify="left" if col == "metric" else "right")
        for row in self.rows:
            show = lambda v: "-" if v is None else row.fmt.format(v)  # noqa: E731
            table.add_row(row.metric, show(row.baseline), show(row.optimized),
                          "-" if row.ratio is None else f"{row.ratio:.3f}×",
                          "-" if row.spread is None else f"±{row.spread:.1%}", row.better)
        return table

    def to_dict(self) -> dict:
        return {"speed_repeats": self.speed_repeats, "speed_stable": self.speed_stable,
                **{row.metric: {**asdict(row), "ratio": row.ratio} for row in self.rows}}

    def value(self, metric: str) -> Row:
        return next(r for r in self.rows if r.metric == metric)


def prompts_from_text(text: bytes, count: int = 8, length: int = 64) -> list[list[int]]:
    """``count`` byte prompts of ``length`` bytes at evenly spaced offsets of ``text`` (deterministic)."""
    step = max(1, (len(text) - length) // count)
    return [list(text[i * step : i * step + length]) for i in range(count)]


def random_prompts(vocab: int, count: int = 8, length: int = 16, seed: int = 0) -> list[list[int]]:
    """Seeded random token prompts, for models without a byte-level evaluation text."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (count, length), generator=gen).tolist()


EVAL_CHUNK = 64  # tokens per call when scoring a changed cache: later chunks read what earlier ones cached
STEP_EVAL_WINDOWS = 8  # windows scored one token per call (a decode schedule), as one batch


def compare_decoders(
    baseline: Executable,
    optimized: Executable,
    *,
    prompts: list[list[int]],
    new_tokens: int = 32,
    text: bytes | None = None,
    context: int = 1024,
    budget_s: float = BUDGET_S,
) -> Report:
    """Quality (bits/byte on ``text`` if given, greedy agreement) then speed and memory, both programs
    (speed rounds repeat until their ratios are stable or ``budget_s`` passes: ``speed.decoder_speeds``).

    When the optimized program's cache layout differs from the baseline's, bits/byte feed each
    window ``EVAL_CHUNK`` tokens at a time through the cache (see ``program_bits_per_byte``) so
    what the new cache serves is measured; otherwise one prefill per window (the same figure, faster).
    When it has a decode schedule (``Program.schedule``: e.g. ``layer-skip{mode=schedule}``), each of the
    first ``STEP_EVAL_WINDOWS`` windows is fed one token per call, so every position runs the graph the
    schedule gives it.
    """
    scoring, label = {"chunk": EVAL_CHUNK if optimized.program.cache != baseline.program.cache else None}, ""
    if text is not None and len(optimized.program.schedule(1)) > 1:  # a decode schedule acts one token per step
        scoring, text = {"chunk": 1, "batch": STEP_EVAL_WINDOWS}, text[:STEP_EVAL_WINDOWS * context + 1]
        label = f" (one token per step, first {len(text):,} bytes)"
    rows = []
    if text is not None:
        rows.append(Row(f"held-out bits/byte{label}", program_bits_per_byte(baseline, text, context=context, **scoring),
                        program_bits_per_byte(optimized, text, context=context, **scoring), "lower"))
    rows.append(Row("greedy agreement", 1.0, greedy_agreement(baseline, optimized, prompts, new_tokens), "higher",
                    "{:.3f}"))
    speeds = decoder_speeds([baseline, optimized], prompts, new_tokens, budget_s=budget_s)
    base, opt = speeds.figures
    rows += [
        Row(name, base[key], opt[key], better, fmt, speeds.spread[key])
        for name, key, better, fmt in (
            ("prefill latency (s)", "prefill_s", "lower", "{:.4g}"),
            ("decode tokens/s", "decode_tok_s", "higher", "{:.1f}"),
            ("request latency p50 (s)", "latency_p50_s", "lower", "{:.4g}"),
            ("request latency p90 (s)", "latency_p90_s", "lower", "{:.4g}"),
            ("request latency p99 (s)", "latency_p99_s", "lower", "{:.4g}"),
        )
    ]
    rows += [
        Row("peak RSS (bytes)", base["peak_rss_bytes"], opt["peak_rss_bytes"], "lower", "{:,.0f}"),
        Row("KV-cache bytes / sequence", baseline.program.cache.nbytes(1), optimized.program.cache.nbytes(1),
            "lower", "{:,.0f}"),
        Row("parameters", baseline.program.parameter_count(), optimized.program.parameter_count(), "lower",
            "{:,.0f}"),
    ]
    return Report(rows, speeds.repeats, speeds.stable)


def compare_encoders(
    baseline: Executable,
    optimized: Executable,
    inputs: tuple[torch.Tensor, ...],
    labels: torch.Tensor | None = None,
    *,
    budget_s: float = BUDGET_S,
) -> Report:
    """Accuracy (with ``labels``) and top-1 agreement on ``forward(*inputs)``, latency and memory, both programs."""
    rows = []
    if labels is not None:
        rows.append(Row("accuracy", accuracy(baseline, inputs, labels), accuracy(optimized, inputs, labels),
                        "higher", "{:.4f}"))
    (want,), (got,) = (e.run(e.program.graph_for(), *inputs) for e in (baseline, optimized))
    want, got = want.cpu(), got.cpu()
    rows.append(Row("top-1 agreement", 1.0, float((want.argmax(-1) == got.argmax(-1)).float().mean()), "higher",
                    "{:.4f}"))
    speeds = encoder_speeds([baseline, optimized], inputs, budget_s=budget_s)
    base, opt = speeds.figures
    rows += [
        Row("forward latency (s)", base["forward_s"], opt["forward_s"], "lower", spread=speeds.spread["forward_s"]),
        Row("peak RSS (bytes)", base["peak_rss_bytes"], opt["peak_rss_bytes"], "lower", "{:,.0f}"),
        Row("parameters", baseline.program.parameter_count(), optimized.program.parameter_count(), "lower",
            "{:,.0f}"),
    ]
    return Report(rows, speeds.repeats, speeds.stable)
