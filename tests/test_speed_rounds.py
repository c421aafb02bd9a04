"""Speed rounds repeat until their ratios are stable, within a bound, and the report says how it went."""

import itertools
import math

from inferpass.eval.report import Report, Row
from inferpass.eval.speed import STABLE_SPREAD, relative_spread, repeat_until_stable


def _rounds(ratios):
    """A round function whose second executable is ``next(ratios)`` times the first."""
    return lambda: [{"t": 1.0}, {"t": next(ratios)}]


def test_steady_ratios_stop_after_the_first_rounds():
    rounds, spread, stable = repeat_until_stable(_rounds(itertools.repeat(0.8)), ("t",), what="x", min_repeats=3,
                                                 max_repeats=10)
    assert (rounds, spread, stable) == (3, {"t": 0.0}, True)


def test_noisy_ratios_run_to_the_bound_and_report_their_spread():
    rounds, spread, stable = repeat_until_stable(_rounds(itertools.cycle([0.5, 1.5])), ("t",), what="x",
                                                 min_repeats=3, max_repeats=8)
    assert rounds == 8 and not stable and spread["t"] > STABLE_SPREAD


def test_the_time_budget_bounds_the_rounds():
    rounds, _, stable = repeat_until_stable(_rounds(itertools.cycle([0.5, 1.5])), ("t",), what="x", min_repeats=3,
                                            max_repeats=50, budget_s=0.0)
    assert rounds == 3 and not stable


def test_ratios_converge_as_rounds_add_up():
    ratios = itertools.cycle([0.98, 1.02])
    rounds, spread, stable = repeat_until_stable(_rounds(ratios), ("t",), what="x", min_repeats=3, max_repeats=20)
    assert stable and 3 <= rounds < 20 and spread["t"] <= STABLE_SPREAD


def test_relative_spread():
    assert relative_spread([2.0, 2.0, 2.0]) == 0.0 and math.isinf(relative_spread([1.0]))
    assert relative_spread([0.9, 1.1]) == __import__("pytest").approx(12.71 * 0.1414213 / 1.41421356, rel=1e-4)


def test_table_says_how_many_rounds_and_the_spread():
    rows = [Row("decode tokens/s", 100.0, 120.0, "higher", spread=0.031)]
    for stable, words in ((True, f"stable to ±{STABLE_SPREAD:.0%}"), (False, "NOT stable")):
        table = Report(rows, speed_repeats=7, speed_stable=stable).table()
        assert table.caption.startswith("speeds: 7 interleaved rounds") and words in table.caption
        assert list(table.columns[4].cells) == ["±3.1%"]
