"""Block influence: how much each block, and its attention and MLP branches, change the residual stream.

Source: ShortGPT (Men et al. 2024), Block Influence ``BI = 1 − mean_t cos(h_in,t, h_out,t)``, NaN → 0.5;
and the L2 adaptive-computation ratio ``‖h_out − h_in‖ / ‖h_in‖`` (mean over tokens). TECHNIQUES.md §3.
Per block: the whole block (input → output), its attention branch (input → after the first residual
add) and its MLP branch (that → output). Measured on calibration tokens at *prefill* positions
(windows through the whole-sequence graph, empty cache) and at *decode* positions (then
``decode_steps`` greedy tokens per window through the one-token graph over what prefill cached).
Calibration tokens are a text's bytes (byte-level models) or, with no text, sampled from the model
itself (temperature 1, seeded: data-free calibration). Results are cached by the program's
fingerprint and the calibration, in memory and as JSON under ``defaults.default_cache_dir()``, so a
changed program is measured again.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from inferpass import progress
from inferpass.defaults import default_cache_dir
from inferpass.errors import PipelineError
from inferpass.ir.probes import probe
from inferpass.ir.program import CacheLayout, Program
from inferpass.ir.structure import BlockSite, graph_structure

PHASES = ("prefill", "decode")
PARTS = ("block", "attention", "mlp")
_VERSION = 1  # bump when what is measured changes


@dataclass(frozen=True)
class Influence:
    """One block's influence in one phase: BI of the block, of its attention and MLP branches (0 for a
    branch the block does not have), and the residual stream's relative L2 change over the block."""

    block: float
    attention: float
    mlp: float
    relative_l2: float


@dataclass
class InfluenceTable:
    """Per phase (``prefill``, ``decode``), block index -> ``Influence``; ``tokens`` calibration tokens."""

    prefill: dict[int, Influence]
    decode: dict[int, Influence]
    tokens: int

    def ranking(self, part: str = "block", phase: str = "prefill") -> list[int]:
        """Block indices from least to most influential by ``part`` BI (``relative_l2`` too) in ``phase``."""
        table = getattr(self, phase)
        return sorted(table, key=lambda block: (getattr(table[block], part), block))

    def rows(self) -> list[dict]:
        """One dict per block (for ``--explain`` and benchmarks): ``block`` then ``<phase> <part>`` figures."""
        return [{"block": b, **{f"{phase} {field}": round(getattr(getattr(self, phase)[b], field), 4)
                                for phase in PHASES for field in (*PARTS, "relative_l2")}}
                for b in sorted(self.prefill)]

    def to_json(self) -> dict:
        return {"tokens": self.tokens, **{phase: {str(b): asdict(i) for b, i in getattr(self, phase).items()}
                                          for phase in PHASES}}

    @classmethod
    def from_json(cls, data: dict) -> "InfluenceTable":
        return cls(**{phase: {int(b): Influence(**i) for b, i in data[phase].items()} for phase in PHASES},
                   tokens=int(data["tokens"]))


def calibration_tokens(program: Program, text: str | Path | None, count: int, window: int,
                       seed: int = 0) -> torch.Tensor:
    """``count`` calibration token ids (rounded down to whole ``window``s, at least one) as ``[rows, window]``:
    the UTF-8 bytes of the file ``text`` (byte-level models; raises ``PipelineError`` naming the file if it
    is missing or too short), or with ``text=None`` sampled from ``program`` (temperature 1, ``seed``)."""
    rows = max(1, count // window)
    if text is not None:
        path = Path(text)
        if program.info.vocab_size != 256:
            raise PipelineError(f"calibration text {path}: only byte-level models (vocabulary 256) read text; "
                                f"this model's vocabulary is {program.info.vocab_size} (omit it to calibrate on "
                                "text the model generates)")
        if not path.is_file():
            raise PipelineError(f"calibration text {path} does not exist (give a UTF-8 text file)")
        data = path.read_bytes()
        if len(data) < rows * window:
            raise PipelineError(f"calibration text {path} has {len(data):,} bytes; {rows * window:,} are needed "
                                f"({rows} windows of {window}): give a longer text or fewer calibration tokens")
        return torch.frombuffer(bytearray(data[:rows * window]), dtype=torch.uint8).long().view(rows, window)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, program.info.vocab_size, (rows, 1), generator=gen)
    prefill, decode = program.graph_for(), program.graph_for(1)
    with progress.task("sampling calibration tokens", total=window - 1) as step:
        logits, caches, _ = run_graph(program, prefill, ids, 0)
        for position in range(1, window):
            probs = torch.softmax(logits[:, -1].float(), -1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen)], dim=1)
            logits, caches, _ = run_graph(program, decode, ids[:, -1:], position, caches)
            step.advance()
    return ids


def run_graph(program: Program, graph: str, ids: torch.Tensor, start: int, caches=None, nodes=()):
    """Run ``graph`` eagerly on ``ids`` after ``start`` cached positions (fresh caches when None): its
    logits, the caches it returns, and the values of ``nodes``."""
    if caches is None:
        layout = CacheLayout(max_len=program.cache.max_len, tensors=program.cache_tensors(graph))
        caches = layout.allocate(ids.shape[0])
    starts = torch.full((ids.shape[0],), start, dtype=torch.long)
    outputs, values = probe(program.graphs[graph], nodes, ids, starts, *caches)
    return outputs[0], list(outputs[len(program.roles[graph].outputs):]), values


def _branch_points(block: BlockSite, where: str):
    """``(input, after attention, output)`` nodes of ``block``."""
    if block.attention is None:
        block.residual_branch("mlp", where)  # checks the block's residual adds
        return block.input, block.input, block.output
    after_attention, _ = block.residual_branch("attention", where)
    return block.input, after_attention if block.mlp is not None else block.output, block.output


def calibration_bits(program: Program, tokens: torch.Tensor, batch: int = 8) -> float:
    """Mean negative log2-likelihood of each next token of the windows ``tokens`` ``[rows, window]`` under
    ``program``'s whole-sequence graph (fresh caches). On tokens the unmodified model generated, the rise
    after a change estimates the KL divergence of the changed model from it."""
    total, count = 0.0, 0
    with torch.no_grad():
        for first in range(0, tokens.shape[0], batch):
            ids = tokens[first:first + batch]
            logits, _, _ = run_graph(program, program.graph_for(), ids[:, :-1], 0)
            nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="sum")
            total, count = total + float(nll), count + ids[:, 1:].numel()
    return total / count / math.log(2)


class _Sums:
    """Running sums of per-token cosines and L2 ratios per block."""

    def __init__(self):
        self.sums: dict[int, dict[str, float]] = {}

    def add(self, block: int, x_in, x_mid, x_out) -> None:
        def bi(a, b):
            cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
            return float(torch.nan_to_num(1 - cos, nan=0.5).sum())
        x_in, x_mid, x_out = (x.reshape(-1, x.shape[-1]) for x in (x_in, x_mid, x_out))
        l2 = float(((x_out - x_in).double().norm(dim=-1) / x_in.double().norm(dim=-1).clamp_min(1e-12)).sum())
        entry = self.sums.setdefault(block, dict.fromkeys((*PARTS, "relative_l2"), 0.0))
        for key, value in zip(entry, (bi(x_in, x_out), bi(x_in, x_mid), bi(x_mid, x_out), l2)):
            entry[key] += value

    def table(self, tokens: int) -> dict[int, Influence]:
        return {b: Influence(**{k: v / tokens for k, v in s.items()}) for b, s in self.sums.items()}


_MEMO: dict[str, InfluenceTable] = {}


def block_influence(program: Program, tokens: torch.Tensor, *, decode_steps: int = 16,
                    batch: int = 8) -> InfluenceTable:
    """The ``InfluenceTable`` of ``program`` (a decoder) on calibration ``tokens`` ``[rows, window]``, each
    window then followed by ``decode_steps`` greedy decode steps; ``batch`` windows per call. Cached."""
    window = tokens.shape[1]
    if window + decode_steps > program.cache.max_len:
        raise PipelineError(f"calibration windows of {window} tokens + {decode_steps} decode steps exceed the "
                            f"program's max_len {program.cache.max_len}")
    key = hashlib.sha256(f"{_VERSION}|{program.fingerprint()}|{decode_steps}|{tuple(tokens.shape)}".encode()
                         + tokens.numpy().tobytes()).hexdigest()[:32]
    path = default_cache_dir() / "calibration" / f"{key}.json"
    if key not in _MEMO and path.is_file():
        try:
            _MEMO[key] = InfluenceTable.from_json(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError):
            pass  # a damaged cache entry is measured again and overwritten
    if key not in _MEMO:
        _MEMO[key] = _measure(program, tokens, decode_steps, batch)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(_MEMO[key].to_json()))
        tmp.replace(path)
    return _MEMO[key]


def _measure(program: Program, tokens: torch.Tensor, decode_steps: int, batch: int) -> InfluenceTable:
    prefill, decode = program.graph_for(), program.graph_for(1)
    points = {g: {b.index: _branch_points(b, f"{g} graph, block {b.index} ({b.scope})")
                  for b in graph_structure(program, g).blocks} for g in (prefill, decode)}
    nodes = {g: [n for trio in blocks.values() for n in trio] for g, blocks in points.items()}
    sums = {phase: _Sums() for phase in PHASES}
    counts = dict.fromkeys(PHASES, 0)

    def record(phase: str, graph: str, values: dict, tokens: int) -> None:
        for block, trio in points[graph].items():
            sums[phase].add(block, *(values[n.name] for n in trio))
        counts[phase] += tokens

    window = tokens.shape[1]
    calls = -(-tokens.shape[0] // batch)
    with torch.no_grad(), progress.task("measuring block influence", total=calls * (1 + decode_steps)) as step:
        for first in range(0, tokens.shape[0], batch):
            ids = tokens[first:first + batch]
            logits, caches, values = run_graph(program, prefill, ids, 0, None, nodes[prefill])
            record("prefill", prefill, values, ids.numel())
            step.advance()
            for position in range(window, window + decode_steps):
                logits, caches, values = run_graph(program, decode, logits[:, -1:].argmax(-1), position, caches,
                                              nodes[decode])
                record("decode", decode, values, ids.shape[0])
                step.advance()
    return InfluenceTable(**{phase: sums[phase].table(counts[phase]) for phase in PHASES},
                          tokens=counts["prefill"])
