"""Progress of long steps (capture, passes, compiles, evaluation windows, speed runs).

Library code reports through ``task(description, total)``; nothing is shown unless a front
end installs a reporter with ``reporting`` — the CLI installs ``ConsoleReporter``: rich
progress bars with an ETA on a terminal, a line per step and per quarter (with an ETA) in
a log. Without a reporter every call is a no-op, so library users and tests see nothing.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator, Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class Step(Protocol):
    """A running task: ``advance`` by finished units, ``total`` (None: unknown) may be raised as work is found."""

    def advance(self, units: int = 1) -> None: ...

    def set_total(self, total: int | None) -> None: ...


class Reporter(Protocol):
    def start(self, description: str, total: int | None) -> Step: ...

    def finish(self, step: Step) -> None: ...


class _Silent:
    def advance(self, units: int = 1) -> None:
        pass

    def set_total(self, total: int | None) -> None:
        pass


_reporter: Reporter | None = None


@contextmanager
def task(description: str, total: int | None = None) -> Iterator[Step]:
    """Report ``description`` while the block runs; ``total`` units (None: a spinner with the elapsed time)."""
    if _reporter is None:
        yield _Silent()
        return
    step = _reporter.start(description, total)
    try:
        yield step
    finally:
        _reporter.finish(step)


@contextmanager
def reporting(reporter: Reporter) -> Iterator[None]:
    """Install ``reporter`` for the block (the previous one is restored after)."""
    global _reporter
    previous, _reporter = _reporter, reporter
    try:
        yield
    finally:
        _reporter = previous


QUIET_S = 2.0  # a logged step this short gets no intermediate lines


class _BarStep:
    def __init__(self, progress: Progress, description: str, total: int | None):
        self.progress = progress
        self.id = progress.add_task(description, total=total)

    def advance(self, units: int = 1) -> None:
        self.progress.advance(self.id, units)

    def set_total(self, total: int | None) -> None:
        self.progress.update(self.id, total=total)


class _LineStep:
    """A step in a log: a line when it starts, at each quarter of its total (with an ETA) once it has run
    ``QUIET_S`` seconds, and when it ends."""

    def __init__(self, console: Console, description: str, total: int | None, depth: int):
        self.console, self.description, self.total, self.indent = console, description, total, "  " * depth
        self.done, self.quarter, self.t0 = 0, 0, time.perf_counter()
        console.print(f"{self.indent}… {description}" + (f" ({total} steps)" if total else ""), soft_wrap=True)

    def advance(self, units: int = 1) -> None:
        self.done += units
        if not self.total or self.done >= self.total:
            return
        quarter, elapsed = 4 * self.done // self.total, time.perf_counter() - self.t0
        if quarter > self.quarter and elapsed >= QUIET_S:
            self.quarter = quarter
            eta = elapsed * (self.total - self.done) / self.done
            self.console.print(f"{self.indent}  {self.description}: {self.done}/{self.total}, "
                               f"{elapsed:.0f}s elapsed, about {eta:.0f}s left", soft_wrap=True)

    def set_total(self, total: int | None) -> None:
        self.total = total

    def end(self) -> None:
        self.console.print(f"{self.indent}✓ {self.description}: {time.perf_counter() - self.t0:.1f}s", soft_wrap=True)


class ConsoleReporter:
    """Rich progress bars (spinner, bar, done/total, elapsed, ETA) on a terminal; ``_LineStep`` lines otherwise.

    Use as a context manager around ``reporting(reporter)``; nested tasks show as nested bars or lines.
    """

    def __init__(self, console: Console):
        self.console = console
        self.live = console.is_terminal
        self.open: list = []
        self.progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=True,
        )

    def __enter__(self) -> "ConsoleReporter":
        if self.live:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.live:
            self.progress.stop()

    def start(self, description: str, total: int | None) -> Step:
        step = (_BarStep(self.progress, description, total) if self.live
                else _LineStep(self.console, description, total, len(self.open)))
        self.open.append(step)
        return step

    def finish(self, step: Step) -> None:
        self.open.remove(step)
        if isinstance(step, _BarStep):
            self.progress.remove_task(step.id)
        else:
            step.end()
