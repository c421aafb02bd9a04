"""Compare two programs' outputs on the same token inputs, each program driving its own cache.

A pass may change the cache layout (``kv-quant`` packs it, ``layer-skip`` drops layers' tensors) or add
graphs (scheduled decode steps, verify steps), so one program's cache tensors are no input for the
other. Instead both run the same seeded tokens: each prefills them into caches allocated from its own
layout — two chunks, all rows then row 0 alone from where it stopped, so rows end ragged and the
second chunk starts mid-cache — and then every fixed-token-count graph runs a few steps of the same
seeded tokens from that state (from a copy, so graphs do not see each other's writes). Each graph of
``got`` is compared with the graph of ``want`` that serves the same token count (``Program.graph_for``),
on the first output of graphs whose first output is ``logits`` (early-exit drafts, which differ by design,
are left out); where both programs have the same cache
layout, the caches the prefill chunks wrote are compared too. Encoders: every graph on the same seeded
inputs (``examples.example_inputs``).

A *runner* is anything with ``program`` and ``run(graph, *inputs)`` (a target's ``Executable``, or
``ProgramRunner`` for a bare program); inputs go to its ``device`` where it has one.

``exact_within`` says up to which sequence length (tokens per row) outputs are promised equal up to
fp32 rounding (None: any length; 0: none): outputs at positions within it are checked against
``atol + rtol·|want|``, the rest only measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from inferpass.ir.examples import example_inputs
from inferpass.ir.program import Program

EXACT_RTOL = 1e-5  # fp32 rounding of a reordered computation on the eager target
EXACT_ATOL = 1e-5
MAX_PROMPT = 64  # tokens per row of the first prefill chunk, at most
STEPS = 3  # steps per fixed-token-count graph


class Runner(Protocol):
    program: Program

    def run(self, graph: str, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]: ...


class ProgramRunner:
    """Runs a program's exported graphs as they are (PyTorch, on the CPU)."""

    def __init__(self, program: Program):
        self.program = program

    def run(self, graph: str, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            out = self.program.graphs[graph].module()(*inputs)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)


@dataclass(frozen=True)
class Probe:
    """The token inputs of a decoder comparison: the two prefill chunks and the tokens of each step."""

    chunks: tuple[torch.Tensor, torch.Tensor | None]  # [rows, L] for every row, then [1, L // 2] for row 0
    step_tokens: dict[int, list[torch.Tensor]]  # token count k -> per step [rows, k]

    def describe(self) -> str:
        first, second = self.chunks
        rows, length = first.shape
        lengths = [length + (second.shape[1] if second is not None else 0), *[length] * (rows - 1)]
        steps = ", ".join(f"{len(s)} of {k} token{'s' * (k > 1)}" for k, s in self.step_tokens.items())
        return f"{rows} rows, prompts of {' and '.join(map(str, lengths))} tokens; steps: {steps or 'none'}"


def decoder_probe(want: Program, got: Program, seed: int, rows: int = 2) -> Probe:
    """Seeded tokens for comparing decoders ``want`` and ``got``: the longest first chunk (a power of two, at
    most ``MAX_PROMPT``) that leaves room for a second chunk of half its length and at least one step of
    every fixed token count either program runs (up to ``STEPS`` of each)."""
    gen = torch.Generator().manual_seed(seed)
    vocab, max_len = want.info.vocab_size, min(want.cache.max_len, got.cache.max_len)
    counts = sorted({r.tokens for p in (want, got) for r in p.roles.values() if r.tokens != "any"})
    widest = max(counts, default=0)
    length = MAX_PROMPT
    while length > 1 and length + length // 2 + widest > max_len:
        length //= 2
    first = torch.randint(0, vocab, (rows, length), generator=gen)
    second = torch.randint(0, vocab, (1, length // 2), generator=gen) if length > 1 else None
    room = max_len - length - length // 2
    steps = {k: [torch.randint(0, vocab, (rows, k), generator=gen) for _ in range(min(STEPS, room // k))]
             for k in counts}
    return Probe((first, second), {k: s for k, s in steps.items() if s})


def _run(runner: Runner, graph: str, ids: torch.Tensor, start: torch.Tensor,
         caches: dict[str, torch.Tensor], rows: slice) -> torch.Tensor:
    """One call of ``graph`` on ``rows`` of ``caches`` (written back there); its logits on the host."""
    program = runner.program
    names = [t.name for t in program.cache_tensors(graph)]
    device = getattr(runner, "device", "cpu")
    out = runner.run(graph, ids.to(device), start.to(device), *(caches[n][rows].clone() for n in names))
    for name, written in zip(names, out[len(program.roles[graph].outputs):]):
        caches[name][rows] = written
    return out[0].cpu()


Trace = dict[tuple[str, int | str], tuple[torch.Tensor, torch.Tensor]]


def decoder_trace(runner: Runner, probe: Probe,
                  graphs: dict[int, list[str]]) -> tuple[Trace, dict[str, torch.Tensor]]:
    """Logits ``[n, V]`` and positions ``[n]`` of every output, by (graph, token count): of the prefill graph
    (``"any"``) over ``probe``'s chunks, and of each graph in ``graphs[k]`` over ``probe``'s k-token steps, each
    from the prefilled state (a graph of any token count may serve k-token steps too); and that prefilled
    state, by cache tensor name."""
    program = runner.program
    first, second = probe.chunks
    rows, length = first.shape
    caches = dict(zip((t.name for t in program.cache.tensors), program.cache.allocate(rows)))
    prefill = program.graph_for()
    logits = [_run(runner, prefill, first, torch.zeros(rows, dtype=torch.long), caches, slice(0, rows))]
    positions = [torch.arange(length).repeat(rows)]
    lengths = torch.full((rows,), length)
    if second is not None:
        logits.append(_run(runner, prefill, second, lengths[:1].clone(), caches, slice(0, 1)))
        positions.append(torch.arange(length, length + second.shape[1]))
        lengths[0] += second.shape[1]
    traces = {(prefill, "any"): (torch.cat([x.reshape(-1, x.shape[-1]) for x in logits]), torch.cat(positions))}
    for k, names in graphs.items():
        for graph in names:
            state = {n: t.clone() for n, t in caches.items()}
            start, out, where = lengths.clone(), [], []
            for ids in probe.step_tokens.get(k, []):
                out.append(_run(runner, graph, ids, start, state, slice(0, rows)).reshape(-1, logits[0].shape[-1]))
                where.append((start[:, None] + torch.arange(k)).reshape(-1))
                start += k
            if out:
                traces[graph, k] = torch.cat(out), torch.cat(where)
    return traces, caches


@dataclass(frozen=True)
class GraphGap:
    """How far one graph of ``got`` is from its reference graph of ``want``.

    ``output``: ``"logits"``, or ``"cache"`` for the cache tensors the prefill wrote; ``outputs``: output
    rows compared (positions × rows; cache: tensors); ``max_abs``: the largest |difference|;
    ``exact_outputs``: those at positions within ``exact_within`` (cache: all tensors, only where
    ``exact_within`` is None); ``within``: whether all of those are within ``atol + rtol·|want|``
    (None when there are none)."""

    graph: str
    reference: str
    output: str
    outputs: int
    max_abs: float
    exact_outputs: int
    within: bool | None


def _gap(graph: str, reference: str, want: torch.Tensor, got: torch.Tensor, positions: torch.Tensor | None,
         exact_within: int | None, rtol: float, atol: float) -> GraphGap:
    if want.shape != got.shape:
        return GraphGap(graph, reference, "logits", want.shape[0], float("inf"), 0, False)
    want, got = want.float(), got.float()
    diff = (want - got).abs()
    excess = (diff - rtol * want.abs()).reshape(diff.shape[0], -1).amax(1)
    exact = (torch.ones_like(excess, dtype=torch.bool) if exact_within is None or positions is None
             else positions < exact_within)
    count = int(exact.sum())
    within = bool((excess[exact] <= atol).all()) if count else None
    return GraphGap(graph, reference, "logits", diff.shape[0], float(diff.max()) if diff.numel() else 0.0, count,
                    within)


def _cache_gap(graph: str, reference: str, want: dict[str, torch.Tensor], got: dict[str, torch.Tensor],
               exact_within: int | None, rtol: float, atol: float) -> GraphGap:
    """The prefilled caches of two programs of the same layout: measured always, checked where the pipeline is
    exact at every position (a bounded pass may change what it stores beyond its bound)."""
    diffs = [(want[n].float() - got[n].float()).abs() for n in want]
    excess = max((float((d - rtol * want[n].float().abs()).max()) for n, d in zip(want, diffs)), default=0.0)
    checked = exact_within is None
    return GraphGap(graph, reference, "cache", len(diffs), max((float(d.max()) for d in diffs), default=0.0),
                    len(diffs) if checked else 0, excess <= atol if checked else None)


def compare_programs(want: Runner, got: Runner, *, seed: int = 0, exact_within: int | None = None,
                     rtol: float = EXACT_RTOL, atol: float = EXACT_ATOL) -> tuple[list[GraphGap], str]:
    """One ``GraphGap`` per graph of ``got`` whose first output is logits (see module doc), in program order,
    then one for the prefilled caches where the layouts match, and a line saying what was compared."""
    wp, gp = want.program, got.program
    compared = [n for n, r in gp.roles.items() if r.outputs[0] == "logits" and r.draft is None]
    if not gp.is_decoder:
        reference = wp.graph_for()
        inputs = example_inputs(wp, reference, seed=seed)
        want_out = want.run(reference, *inputs)[0].cpu()
        return ([_gap(name, reference, want_out, got.run(name, *inputs)[0].cpu(), None, exact_within, rtol, atol)
                 for name in compared], f"seeded inputs, batch {inputs[0].shape[0]}")
    probe = decoder_probe(wp, gp, seed)
    counts = {r.tokens for n, r in gp.roles.items() if n in compared and r.tokens != "any"}
    references = {k: wp.graph_for(k) for k in counts}
    want_traces, want_caches = decoder_trace(want, probe, {k: [g] for k, g in references.items()})
    got_traces, got_caches = decoder_trace(got, probe, {k: [n for n in compared if gp.roles[n].tokens == k]
                                                        for k in counts})
    gaps = []
    for name in compared:
        tokens = gp.roles[name].tokens
        if (name, tokens) not in got_traces:
            continue  # not traced: an any-token graph besides graph_for(), or no room for its steps
        reference = wp.graph_for() if tokens == "any" else references[tokens]
        logits, positions = got_traces[name, tokens]
        gaps.append(_gap(name, reference, want_traces[reference, tokens][0], logits, positions, exact_within, rtol,
                         atol))
    if wp.cache == gp.cache:
        gaps.append(_cache_gap(gp.graph_for(), wp.graph_for(), want_caches, got_caches, exact_within, rtol, atol))
    return gaps, probe.describe()
