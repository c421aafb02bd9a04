"""``early-exit``: draft with the model's first layers (self-speculative decoding) or exit per token (lossy).

Sources (TECHNIQUES.md §5): LayerSkip (Elhoushi et al. 2024) drafts k tokens with the first E layers and
the model's own final norm and LM head, then checks them with the whole model in one step, keeping the
longest agreeing prefix plus the whole model's next token: lossless (greedy output is the base model's;
sampled output keeps its distribution by rejection sampling). Kangaroo (Liu et al. 2024) stops drafting
at a token whose top-1 probability falls below a threshold. CALM (Schuster et al. 2022) exits a token
once its top-1 − top-2 probability margin passes a threshold: lossy.

The pass adds two graphs and changes none: ``draft``, the one-token graph with blocks ≥ E bypassed (their
output is block E−1's) into the model's own final norm and LM head, reading and writing the caches of
layers < E, its role carrying a ``DraftSpec``; and ``verify``, the whole-sequence graph serving
``draft_len + 1`` tokens per row (a fixed count: static-shape targets compile it once per batch bucket,
with no prefill padding). The engine runs them (``runtime.speculation``): drafting writes layers < E's
KV at the drafted positions, which later drafts attend to; the verify step runs every layer over those
positions (its layers < E write the same KV again); each row's cache is then rolled back to what it
accepted.

``exit_layer`` / ``draft_len`` ``auto``: calibration greedy-continues prompts (``calibration`` text, or
tokens the model samples) with the whole model, measures at every continuation position whether each
candidate exit layer's top-1 agrees with it (acceptance under greedy speculation) and its top-1
probability, times draft and verify steps on this machine (eager, batch 1), and takes the E, k and (with
``confidence: auto``) the stop threshold of the best modelled speed. ``exit_margin`` set: CALM-style
confidence exit instead (lossy, see ``DraftSpec``). Identity: ``exit_layer`` = the number of layers (the
draft is the whole model; every draft is accepted and the output is the base model's bit for bit); the
graphs the pass finds are never changed, so the program's other outputs are exact.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, PositiveInt

from inferpass import progress
from inferpass.errors import PipelineError
from inferpass.ir.program import DraftSpec, Program, copy_graph
from inferpass.passes.base import AutoOrPositive, Pass, PassConfig, PassResult, register_pass
from inferpass.passes.block_influence import calibration_tokens, run_graph
from inferpass.passes.layer_skip import rewrite_blocks

CONFIDENCES = (0.0, 0.2, 0.4, 0.6, 0.8)  # the stop thresholds ``confidence: auto`` chooses from


class EarlyExitConfig(PassConfig):
    """exit_layer: blocks the draft runs (1..L; auto = calibrated); draft_len: tokens drafted per verify step
    (auto = calibrated, up to ``max_draft_len``); confidence: stop a row's drafting below this top-1
    probability (auto = calibrated); exit_margin: None = lossless speculation, else lossy confidence exit at
    this top-1 − top-2 margin; calibration: a UTF-8 text file for the prompts (byte-level models), None =
    tokens the model samples; calibration_tokens / window: calibration size (half of each window is prompt,
    half greedy continuation); seed."""

    exit_layer: AutoOrPositive = "auto"
    draft_len: AutoOrPositive = "auto"
    max_draft_len: PositiveInt = 7  # verify steps of up to 8 tokens: the cpu target slows sharply past 8
    confidence: Literal["auto"] | float = "auto"
    exit_margin: float | None = Field(None, ge=0)
    calibration: str | None = None
    calibration_tokens: PositiveInt = 1024
    window: PositiveInt = 128
    seed: int = 0


@dataclass(frozen=True)
class Calibration:
    """Per exit layer E: ``agree[E]`` ``[N]`` whether the draft's top-1 is the whole model's greedy token at
    each of N continuation positions (in order, windows concatenated; ``ends`` marks a window's last
    position), ``top1[E]`` its top-1 probability there; step times in seconds (eager, batch 1)."""

    agree: dict[int, torch.Tensor]
    top1: dict[int, torch.Tensor]
    ends: torch.Tensor
    draft_s: dict[int, float]
    decode_s: float
    verify_s: dict[int, float]

    def speed(self, exit_layer: int, draft_len: int, confidence: float) -> tuple[float, float, float]:
        """Modelled (speed-up over plain decoding, tokens per verify step, draft steps per verify step): from
        each position, drafting goes on while the draft is confident (at most ``draft_len``), acceptance
        while it also agrees (windows end a run)."""
        agree, sure = self.agree[exit_layer], self.top1[exit_layer] >= confidence
        n, accepted, drafted = len(agree), torch.zeros(len(agree)), torch.zeros(len(agree))
        alive_accept, alive_draft = torch.ones(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)
        stop = torch.zeros(n, dtype=torch.bool)
        for j in range(draft_len):
            index = torch.arange(n) + j
            inside = index < n
            index = index.clamp(max=n - 1)
            alive_draft &= inside & ~stop & sure[index]
            alive_accept &= alive_draft & agree[index]
            drafted += alive_draft.float()
            accepted += alive_accept.float()
            stop |= self.ends[index]
        tokens, steps = 1 + float(accepted.mean()), float(drafted.mean())
        cost = max(1.0, steps) * self.draft_s[exit_layer] + self.verify_s[draft_len]
        return tokens * self.decode_s / cost, tokens, steps


@register_pass
class EarlyExit(Pass):
    """Add the draft and verify graphs of self-speculative decoding or confidence exit (see module doc)."""

    name = "early-exit"
    exact = True  # the graphs it finds are unchanged; speculation is lossless (exit_margin: see exact_within)
    Config = EarlyExitConfig
    requires = frozenset({"decoder"})

    def exact_within(self) -> int | None:
        return None if self.config.exit_margin is None else 0

    def run(self, program: Program) -> PassResult:
        cfg, layers = self.config, program.layers()
        if program.draft_graph() is not None:
            raise PipelineError(f"pass '{self.name}': the program already has a draft graph "
                                f"'{program.draft_graph()}'")
        if len(program.schedule(1)) > 1:
            raise PipelineError(f"pass '{self.name}': the program has a SkipDecode schedule "
                                f"({', '.join(program.schedule(1)[1:])}); run early-exit without it")
        if not program.cache.supports_rollback:
            raise PipelineError(f"pass '{self.name}': this program's cache cannot be rolled back (a quantized "
                                "cache); put early-exit before kv-quant in the pipeline or leave kv-quant out")
        if len(layers) < 2 and cfg.exit_layer == "auto":
            raise PipelineError(f"pass '{self.name}': the model has {len(layers)} layer; calibrating an exit needs "
                                "at least 2 (give exit_layer and draft_len)")
        if cfg.exit_layer != "auto" and cfg.exit_layer > len(layers):
            raise PipelineError(f"pass '{self.name}': exit_layer {cfg.exit_layer} is beyond the model's "
                                f"{len(layers)} layers (1..{len(layers)})")
        exit_layer, draft_len, confidence, rows = self._choose(program, layers)
        spec = DraftSpec(length=draft_len, confidence=confidence, exit_margin=cfg.exit_margin)
        draft = add_exit_graph(program, program.graph_for(1), layers[:exit_layer], "draft", draft=spec)
        verify = add_exit_graph(program, program.graph_for(), layers, "verify", tokens=draft_len + 1)
        stats = {"exit_layer": exit_layer, "draft_len": draft_len, "confidence": confidence,
                 "mode": "speculate" if cfg.exit_margin is None else f"exit at margin {cfg.exit_margin}",
                 "graphs": [draft, verify]}
        return PassResult(program, changed=True, stats=stats, tables={"calibration": rows} if rows else {})

    def _choose(self, program: Program, layers: list[int]) -> tuple[int, int, float, list[dict]]:
        """(E, k, confidence, the calibration table) as configured, calibrating what is ``auto``."""
        cfg = self.config
        fixed_conf = None if cfg.confidence == "auto" else float(cfg.confidence)
        if not 0 <= (fixed_conf or 0) <= 1:
            raise PipelineError(f"pass '{self.name}': confidence {fixed_conf} is outside [0, 1]")
        if "auto" not in (cfg.exit_layer, cfg.draft_len, cfg.confidence):
            return cfg.exit_layer, cfg.draft_len, fixed_conf, []
        exits = [cfg.exit_layer] if cfg.exit_layer != "auto" else list(range(1, len(layers)))
        lengths = [cfg.draft_len] if cfg.draft_len != "auto" else list(range(1, cfg.max_draft_len + 1))
        confidences = [fixed_conf] if fixed_conf is not None else list(CONFIDENCES)
        calibration = calibrate(program, layers, exits, lengths, cfg)
        rows, best = [], None
        for e in exits:
            for k in lengths:
                for c in confidences:
                    speed, tokens, steps = calibration.speed(e, k, c)
                    if best is None or speed > best[0]:
                        best = (speed, e, k, c)
            row_best = max(((calibration.speed(e, k, c), k, c) for k in lengths for c in confidences))
            rows.append({"exit layer": e, "greedy agreement": float(calibration.agree[e].float().mean()),
                         "draft step ms": calibration.draft_s[e] * 1e3, "best draft_len": row_best[1],
                         "best confidence": row_best[2], "tokens / verify": row_best[0][1],
                         "modelled speed-up": row_best[0][0]})
        return best[1], best[2], best[3], rows


def add_exit_graph(program: Program, source: str, kept: list[int], name: str, **role) -> str:
    """Add graph ``name``: a copy of ``source`` running only blocks ``kept`` (a prefix of the model's layers;
    the others bypassed) into the final norm and LM head, over the caches of those layers; ``role``: fields
    its ``GraphRole`` changes. Returns ``name``."""
    program.graphs[name] = copy_graph(program.graphs[source])
    program.roles[name] = program.roles[source].model_copy(update=role)
    skipped = set(program.graph_layers(source)) - set(kept)
    tensors = tuple(t for t in program.cache.tensors if t.layer not in skipped)
    if skipped:
        rewrite_blocks(program, name, skipped, set(), "blocks", tensors, program.cache.tensors)
    return name


def calibrate(program: Program, layers: list[int], exits: list[int], lengths: list[int],
              cfg: EarlyExitConfig) -> Calibration:
    """Measure what ``EarlyExitConfig``'s ``auto`` needs (see module doc and ``Calibration``)."""
    window = min(cfg.window, program.cache.max_len)
    prompt = max(1, window // 2)
    tokens = calibration_tokens(program, cfg.calibration, cfg.calibration_tokens, window, cfg.seed)
    tokens = _greedy_continue(program, tokens[:, :prompt], window - prompt)
    trial = program.clone()
    agree, top1 = {}, {}
    with torch.no_grad():
        full, _, _ = run_graph(trial, trial.graph_for(), tokens, 0)
        target = full[:, prompt - 1:-1].argmax(-1)  # the greedy tokens at the continuation positions
        with progress.task("calibrating exit layers", total=len(exits)) as step:
            for e in exits:
                graph = add_exit_graph(trial, trial.graph_for(), layers[:e], f"exit_{e}", tokens="any")
                logits, _, _ = run_graph(trial, graph, tokens, 0)
                probs = torch.softmax(logits[:, prompt - 1:-1].float(), -1)
                agree[e] = (probs.argmax(-1) == target).flatten()
                top1[e] = probs.max(-1).values.flatten()
                step.advance()
    ends = torch.zeros_like(target, dtype=torch.bool)
    ends[:, -1] = True
    draft_s = {e: _step_seconds(trial, add_exit_graph(trial, trial.graph_for(1), layers[:e], f"draft_{e}"), 1)
               for e in exits}
    verify_s = {k: _step_seconds(trial, trial.graph_for(), k + 1) for k in lengths}
    return Calibration(agree, top1, ends.flatten(), draft_s, _step_seconds(trial, trial.graph_for(1), 1), verify_s)


def _greedy_continue(program: Program, prompts: torch.Tensor, count: int) -> torch.Tensor:
    """``prompts`` ``[B, P]`` followed by ``count`` greedy tokens of the whole model."""
    ids, position = prompts, prompts.shape[1]
    with torch.no_grad(), progress.task("greedy calibration text", total=count) as step:
        logits, caches, _ = run_graph(program, program.graph_for(), ids, 0)
        for _ in range(count):
            ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
            logits, caches, _ = run_graph(program, program.graph_for(1), ids[:, -1:], position, caches)
            position += 1
            step.advance()
    return ids


def _step_seconds(program: Program, graph: str, tokens: int, repeats: int = 20) -> float:
    """Median seconds of one eager call of ``graph`` on ``tokens`` tokens of one row after 64 cached ones."""
    module = program.graphs[graph].module()
    caches = [torch.zeros(t.concrete_shape(1), dtype=t.torch_dtype()) for t in program.cache_tensors(graph)]
    ids, start = torch.zeros(1, tokens, dtype=torch.long), torch.tensor([min(64, program.cache.max_len - tokens)])
    times = []
    with torch.no_grad():
        for _ in range(repeats + 3):
            t0 = time.perf_counter()
            module(ids, start, *caches)
            times.append(time.perf_counter() - t0)
    return sorted(times[3:])[repeats // 2]
