"""``PassManager``: run a pipeline with verification after every pass and instruments around it.

After every pass the verifier checks the program (``ir.verify``); in debug mode an
exact pass's output is also compared numerically with its input on seeded example
inputs. A pass that refuses its config or the model (``PipelineError``,
``UnsupportedModelError``) raises that error as is: the user's to fix, no repro bundle. Any
other failure (a bug in the pass, or output the verifier rejects) raises ``PassFailure``
whose message carries the repro command.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from inferpass import progress
from inferpass.errors import InferpassError, PipelineError, UnsupportedModelError, VerificationError
from inferpass.ir.compare import ProgramRunner, compare_programs
from inferpass.ir.program import Program
from inferpass.ir.verify import verify_program
from inferpass.passes.base import Pass, check_requirements
from inferpass.passes.instruments import Instrument, IRDump, ReproOnFailure
from inferpass.passes.pipeline import Pipeline

class PassFailure(InferpassError):
    """A pass raised, or its output failed verification; ``bundle`` is the repro folder if one was written."""

    def __init__(self, message: str, bundle: Path | None = None):
        super().__init__(message)
        self.bundle = bundle


@dataclass
class PassRecord:
    """What one pass did, for ``--explain`` and the manifest."""

    spec: str
    exact: bool
    seconds: float
    changed: bool
    stats: dict[str, Any]
    nodes_delta: int
    parameters_delta: int
    cache_bytes_delta: int
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    exact_within: int | None = None  # Pass.exact_within, None where the pass changed nothing


@dataclass
class PipelineRun:
    """The optimized program and one record per pass."""

    program: Program
    records: list[PassRecord] = field(default_factory=list)

    def exact_within(self) -> int | None:
        """Up to which sequence length the whole pipeline keeps logits equal to its input's (None = any)."""
        bounds = [r.exact_within for r in self.records if r.exact_within is not None]
        return min(bounds, default=None)


def cache_bytes(program: Program, batch: int = 1) -> int:
    """KV-cache bytes of ``program`` for ``batch`` sequences at full length (0 for encoders)."""
    return program.cache.nbytes(batch) if program.cache else 0


def check_numerics(before: Program, after: Program, seed: int) -> None:
    """Raise ``VerificationError`` unless every logits output of ``after`` matches ``before`` up to fp32 rounding
    on the same seeded tokens, each program over its own cache (``ir.compare``)."""
    for name in before.graphs:
        if name not in after.graphs:
            raise VerificationError(f"graph '{name}' disappeared")
    gaps, probe = compare_programs(ProgramRunner(before), ProgramRunner(after), seed=seed)
    for gap in gaps:
        if gap.within is False:
            raise VerificationError(f"graph '{gap.graph}' changed its {gap.output} under an exact pass (max abs diff "
                                    f"{gap.max_abs:.3g} against '{gap.reference}' of the input; {probe})")


class PassManager:
    """Runs a ``Pipeline`` over a ``Program``.

    verify: run the verifier after every pass (on by default).
    debug: also compare exact passes numerically with their input.
    dump_dir: write IR dumps per stage. repro_dir: where repro bundles go (a temp dir if None);
    write_repro=False writes none (used when re-running a bundle).
    """

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        verify: bool = True,
        debug: bool = False,
        dump_dir: str | Path | None = None,
        repro_dir: str | Path | None = None,
        seed: int = 0,
        write_repro: bool = True,
        instruments: list[Instrument] | None = None,
    ):
        self.pipeline = pipeline
        self.verify = verify
        self.debug = debug
        self.seed = seed
        self.repro = ReproOnFailure(repro_dir, pipeline.to_string(), seed, debug) if write_repro else None
        self.instruments: list[Instrument] = [*([self.repro] if self.repro else []), *(instruments or [])]
        if dump_dir is not None:
            self.instruments.append(IRDump(dump_dir))

    def _run_one(self, pass_: Pass, program: Program) -> Any:
        working = program.clone()
        torch.manual_seed(self.seed)
        result = pass_.run(working)
        if result.program.applied != program.applied:
            raise VerificationError(f"pass '{pass_.name}' changed the program's 'applied' list; the pass manager "
                                    "records what ran")
        result.program.applied.append(pass_.spec())
        if self.verify:
            verify_program(result.program)
        if self.debug and pass_.exact:
            check_numerics(program, result.program, self.seed)
        return result

    def run(self, program: Program) -> PipelineRun:
        """Apply every pass in order; return the final program and per-pass records. Every pass's requirements
        are checked first (``UnsupportedModelError`` before any pass runs)."""
        for pass_ in self.pipeline.passes:
            check_requirements(pass_, program.info.kind, program.info.vocab_size,
                               program.info.source or program.info.architecture)
        for inst in self.instruments:
            inst.before_pipeline(program)
        run = PipelineRun(program)
        with progress.task("running passes", total=len(self.pipeline)) as step:
            for index, pass_ in enumerate(self.pipeline.passes):
                self._run_recorded(index, pass_, run)
                step.advance()
        return run

    def _run_recorded(self, index: int, pass_: Pass, run: PipelineRun) -> None:
        """Run one pass on ``run.program``; store its output and record in ``run``, or raise (see module doc)."""
        start = time.perf_counter()
        try:
            result = self._run_one(pass_, run.program)
        except (PipelineError, UnsupportedModelError):
            raise  # the pass refused its config or this model: a user's error, not the pass's
        except Exception as exc:  # any other failure, including bugs in the pass, gets a repro
            lines = [line for inst in self.instruments if (line := inst.on_failure(index, pass_, run.program, exc))]
            message = f"pass '{pass_.spec()}' failed: {type(exc).__name__}: {exc}"
            raise PassFailure("\n".join([message, *lines]), self.repro.bundle if self.repro else None) from exc
        seconds = time.perf_counter() - start
        before, after = run.program, result.program
        run.records.append(
            PassRecord(
                spec=pass_.spec(),
                exact=pass_.exact,
                seconds=seconds,
                changed=result.changed,
                stats=result.stats,
                nodes_delta=after.node_count() - before.node_count(),
                parameters_delta=after.parameter_count() - before.parameter_count(),
                cache_bytes_delta=cache_bytes(after) - cache_bytes(before),
                tables=result.tables,
                exact_within=pass_.exact_within() if result.changed else None,
            )
        )
        for inst in self.instruments:
            inst.after_pass(index, pass_, result, seconds)
        run.program = after
