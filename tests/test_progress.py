"""Progress reporting: silent without a reporter; bars on a terminal, lines with an ETA in a log."""

import io

from rich.console import Console

from inferpass import progress


def _run(reporter_console):
    with progress.ConsoleReporter(reporter_console) as reporter, progress.reporting(reporter):
        with progress.task("outer", total=2) as outer:
            with progress.task("compiling"):
                pass
            outer.advance(2)


def test_silent_without_a_reporter(capsys):
    with progress.task("work", total=3) as step:
        step.advance()
    assert capsys.readouterr() == ("", "")


def test_a_log_gets_a_line_per_step_and_quarter(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(progress, "QUIET_S", 0.0)
    console = Console(file=out, width=100)
    with progress.ConsoleReporter(console) as reporter, progress.reporting(reporter):
        with progress.task("scoring", total=4) as step:
            for _ in range(4):
                step.advance()
    lines = out.getvalue().splitlines()
    assert lines[0] == "… scoring (4 steps)" and lines[-1].startswith("✓ scoring: ")
    assert any("scoring: 2/4" in line and "s left" in line for line in lines)


def test_a_terminal_gets_transient_bars():
    out = io.StringIO()
    _run(Console(file=out, force_terminal=True, width=100))
    assert "outer" in out.getvalue() and progress._reporter is None
