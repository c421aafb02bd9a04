"""``layer-skip``: remove whole blocks, attention or MLP sublayers, or skip lower layers by position (SkipDecode).

Sources (TECHNIQUES.md §3): ShortGPT (Men et al. 2024) ranks blocks by Block Influence on calibration
text and removes the least influential; "What Matters in Transformers" (He et al. 2024) drops
attention sublayers, the more redundant half, and their KV cache with them; FFN-SkipLLM (Jaiswal et
al. 2024) skips MLP sublayers, attention and cache untouched; SkipDecode (Del Corro et al. 2023)
gives every position a layer budget, non-increasing with position and the same for the whole
batch, spending it on the top layers.

Modes. ``blocks``: the chosen blocks become the identity (output = input) in every graph; the
cache layout drops their k/v tensors and every role's ``layers`` drops them. ``attention``: the
chosen blocks' first residual branch becomes zero (``h + attn`` → ``h``); their caches go.
``ffn``: their MLP branch becomes zero; caches stay. ``schedule``: ``budgets={position: layers}``
adds one decode graph per entry (``GraphRole.from_position``) running that many layers: the
protected ones and the top of the rest, skipping in ``rank`` order; each reads and writes only its
layers' caches. The runtime picks, per step, the graph of the batch's furthest row and never lets
a row go back to more layers (``runtime.step_runner``), so a layer a token runs has KV for every
earlier position (the prompt is prefilled through all layers).

Choice: ``layers`` (explicit; may name layer 0), else ``k``, else ``fraction`` of the candidate
blocks, ranked by ``rank``: ``influence`` (lowest Block Influence of what is removed: the block, the
attention or the MLP branch, at prefill positions; at decode positions for ``schedule``; see
``block_influence``), ``last`` (the last blocks: the strong baseline), ``first`` (SkipDecode's
lower layers first) or ``random`` (``seed``). Layer 0 is protected unless named. Approximate:
the removed branch's contribution to the residual stream is lost (``--explain`` shows its
influence). Identity: ``layers=[]`` (or an empty ``budgets`` in ``schedule`` mode).
"""

from __future__ import annotations

import random
from typing import Literal

import torch
from pydantic import Field, PositiveInt, model_validator

from inferpass import progress
from inferpass.errors import PipelineError
from inferpass.ir.cache_io import open_cache_io
from inferpass.ir.graph_utils import skip_aliases
from inferpass.ir.program import Program, copy_graph
from inferpass.ir.structure import graph_structure
from inferpass.passes.base import Pass, PassConfig, PassResult, register_pass, select_layers
from inferpass.passes.block_influence import block_influence, calibration_bits, calibration_tokens

aten = torch.ops.aten
Mode = Literal["blocks", "attention", "ffn", "schedule"]
Rank = Literal["influence", "ablation", "last", "first", "random"]
_PART = {"blocks": "block", "attention": "attention", "ffn": "mlp", "schedule": "block"}


class LayerSkipConfig(PassConfig):
    """mode: blocks | attention | ffn | schedule; layers / k / fraction: what to skip (first given wins;
    ``layers=[]`` = identity); rank: influence | last | first | random (seeded by ``seed``); budgets:
    ``schedule`` mode, position -> layers run from there on (non-increasing); calibration: a UTF-8
    text file (byte-level models), None = text the model generates; calibration_tokens / window:
    its size and the prefill window; decode_steps: decode positions measured after each window (both
    shortened to fit a short cache)."""

    mode: Mode = "blocks"
    layers: list[int] | None = None
    k: PositiveInt | None = None
    fraction: float = Field(0.25, gt=0, lt=1)
    rank: Rank = "influence"
    seed: int = 0
    budgets: dict[int, PositiveInt] = Field(default_factory=dict)
    calibration: str | None = None
    calibration_tokens: PositiveInt = 2048
    window: PositiveInt = 256
    decode_steps: PositiveInt = 16

    @model_validator(mode="after")
    def _monotone_budgets(self):
        positions = sorted(self.budgets)
        if positions and positions[0] < 1:
            raise ValueError("budgets: positions start at 1 (position 0 is the prompt's first token)")
        counts = [self.budgets[p] for p in positions]
        if any(a < b for a, b in zip(counts, counts[1:])):
            raise ValueError(f"budgets must not grow with position (SkipDecode), got {dict(zip(positions, counts))}")
        return self


@register_pass
class LayerSkip(Pass):
    """Skip blocks or sublayers chosen on calibration text (see module doc)."""

    name = "layer-skip"
    exact = False
    Config = LayerSkipConfig
    requires = frozenset({"decoder"})

    def run(self, program: Program) -> PassResult:
        config = self.config
        if config.mode == "schedule" and config.layers is None and not config.budgets:
            raise PipelineError(f"pass '{self.name}': mode schedule needs budgets, e.g. budgets={{256: 6, 512: 4}}")
        if config.mode == "schedule" and len(program.schedule(1)) > 1:
            raise PipelineError(f"pass '{self.name}': the program already has a decode schedule "
                                f"({', '.join(program.schedule(1)[1:])})")
        candidates, tables = self._candidates(program), {}
        if config.layers is not None:
            order = select_layers(program, config.layers, self.name)
            missing = sorted(set(order) - set(candidates))
            if missing:
                raise PipelineError(f"pass '{self.name}': layers {missing} have no {_PART[config.mode]} to skip "
                                    f"(candidates: {candidates})")
        else:
            candidates = [i for i in candidates if i != 0]
            order, tables = self._order(program, candidates)
        stats = {"mode": config.mode, "rank": config.rank if config.layers is None else "explicit"}
        if config.mode == "schedule":
            stages = self._schedule(program, order)
            return PassResult(program, changed=bool(stages), stats={**stats, "stages": stages}, tables=tables)
        chosen = order if config.layers is not None else order[:self._count(len(candidates))]
        if not chosen:
            return PassResult(program, changed=False, stats={**stats, "skipped": []}, tables=tables)
        before = program.cache.nbytes(1)
        self._skip(program, sorted(chosen))
        return PassResult(program, changed=True, stats={
            **stats, "skipped": sorted(chosen), "layers_left": len(program.layers()),
            "cache_bytes_per_sequence": program.cache.nbytes(1),
            "cache_fraction_kept": round(program.cache.nbytes(1) / before, 3)}, tables=tables)

    def _candidates(self, program: Program) -> list[int]:
        blocks = graph_structure(program, program.graph_for()).blocks
        part = {"attention": "attention", "ffn": "mlp"}.get(self.config.mode)
        return [b.index for b in blocks if part is None or getattr(b, part) is not None]

    def _count(self, candidates: int) -> int:
        return min(candidates, self.config.k if self.config.k is not None else round(self.config.fraction * candidates))

    def _order(self, program: Program, candidates: list[int]) -> tuple[list[int], dict[str, list[dict]]]:
        """``candidates`` in skipping order, and the tables behind it (for ``--explain``)."""
        rank, cfg = self.config.rank, self.config
        if rank == "last":
            return sorted(candidates, reverse=True), {}
        if rank == "first":
            return sorted(candidates), {}
        if rank == "random":
            order = sorted(candidates)
            random.Random(cfg.seed).shuffle(order)
            return order, {}
        steps = min(cfg.decode_steps, program.cache.max_len // 2)  # a short cache takes shorter windows
        tokens = calibration_tokens(program, cfg.calibration, cfg.calibration_tokens,
                                    min(cfg.window, program.cache.max_len - steps), cfg.seed)
        table = block_influence(program, tokens, decode_steps=steps)
        tables = {"block influence": table.rows()}
        if rank == "influence":
            phase = "decode" if cfg.mode == "schedule" else "prefill"
            return [i for i in table.ranking(_PART[cfg.mode], phase) if i in candidates], tables
        present = len(program.layers())
        count = max((present - b for b in cfg.budgets.values()), default=0) if cfg.mode == "schedule" else \
            self._count(len(candidates))
        order, tables["ablation"] = self._ablation_order(program, candidates, tokens, min(count, len(candidates)))
        return order, tables

    def _ablation_order(self, program: Program, candidates: list[int], tokens, count: int):
        """Greedy ablation: ``count`` times, skip the candidate whose skipping (on top of those already chosen)
        raises the calibration loss least; the rest follow by their last loss. Returns the order and one row
        per choice."""
        mode = "blocks" if self.config.mode == "schedule" else self.config.mode
        base, current, order, rows, scores = calibration_bits(program, tokens), program, [], [], {}
        with progress.task(f"ranking {len(candidates)} blocks by ablation", total=count) as step:
            for _ in range(count):
                for i in (c for c in candidates if c not in order):
                    trial = current.clone()
                    self._skip(trial, [i], mode)
                    scores[i] = calibration_bits(trial, tokens)
                best = min((c for c in candidates if c not in order), key=lambda c: (scores[c], -c))
                order.append(best)
                loss = scores.pop(best)
                rows.append({"skip": best, "calibration bits/token": loss, "Δ vs none": loss - base})
                current = current.clone()
                self._skip(current, [best], mode)
                step.advance()
        rest = [c for c in candidates if c not in order]
        return order + sorted(rest, key=lambda c: (scores.get(c, 0.0), -c)), rows

    def _skip(self, program: Program, chosen: list[int], mode: str | None = None) -> None:
        """Apply ``mode`` (``blocks`` / ``attention`` / ``ffn``; default the config's) to the ``chosen`` blocks in
        every graph."""
        mode = mode or self.config.mode
        first = graph_structure(program, program.graph_for())
        removed = set(chosen) if mode == "blocks" else {  # dropping a block's last branch removes the block
            b.index for b in first.blocks if b.index in chosen and getattr(b, "mlp" if mode == "attention"
                                                                          else "attention") is None}
        cache_gone = set(chosen) if mode in ("blocks", "attention") else removed
        kept = tuple(t for t in program.cache.tensors if t.layer not in cache_gone)
        for graph in list(program.graphs):
            rewrite_blocks(program, graph, removed, set(chosen) - removed, mode, kept, kept)
        program.cache = program.cache.model_copy(update={"tensors": kept})

    def _schedule(self, program: Program, order: list[int]) -> list[str]:
        """Add one decode graph per budget (see module doc); returns ``"from P: N layers (skips ...)"`` lines."""
        decode, present = program.graph_for(1), program.layers()
        protected = [i for i in present if i not in order]
        stages = []
        for position, budget in sorted(self.config.budgets.items()):
            if budget < len(protected):
                raise PipelineError(f"pass '{self.name}': budget {budget} at position {position} is below the "
                                    f"{len(protected)} layers that always run ({protected})")
            skip = set(order[:max(0, len(present) - budget)])
            if not skip:
                continue
            name = f"{decode}_from_{position}"
            program.graphs[name] = copy_graph(program.graphs[decode])
            program.roles[name] = program.roles[decode].model_copy(update={"from_position": position})
            kept = tuple(t for t in program.cache.tensors if t.layer not in skip)
            rewrite_blocks(program, name, skip, set(), "blocks", kept, program.cache.tensors)
            stages.append(f"from {position}: {len(present) - len(skip)} layers (skips {sorted(skip)})")
        return stages


def rewrite_blocks(program: Program, graph: str, removed: set[int], zeroed: set[int], mode: str, kept, layout) -> None:
    """Edit ``graph``: bypass the ``removed`` blocks, zero the ``mode``'s branch of the ``zeroed`` ones, and
    close its cache I/O over the ``kept`` tensors it reads; ``layout``: the cache layout's tensors after
    the pass (a graph reading all of them keeps ``caches=None``)."""
    structure = graph_structure(program, graph)
    io = open_cache_io(program, graph)
    for block in reversed(structure.blocks):  # last first: a removed block's input may be the output of another
        if block.index in removed:
            for value in dict.fromkeys((block.output, skip_aliases(block.output))):  # later blocks may read either
                value.replace_all_uses_with(block.input)
            for check in [n for n in block.nodes if n.target is aten._assert_tensor_metadata.default]:
                program.graphs[graph].graph.erase_node(check)  # the block's dtype checks go with it
        elif block.index in zeroed:
            add, stream = block.residual_branch("attention" if mode == "attention" else "mlp",
                                                f"{graph} graph, block {block.index} ({block.scope})")
            add.replace_all_uses_with(stream)  # the branch adds nothing
    role = program.roles[graph]
    reads = {t.name for t in program.cache_tensors(graph)}
    tensors = [t for t in kept if t.name in reads]
    layers = [i for i in program.graph_layers(graph) if i not in removed]
    whole = role.caches is None and tensors == list(layout)
    program.roles[graph] = role.model_copy(update={
        "layers": tuple(layers), "caches": None if whole else tuple(t.name for t in tensors)})
    program.graphs[graph] = io.close(tensors)
