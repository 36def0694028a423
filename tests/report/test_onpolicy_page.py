"""docs/onpolicy_methods.md's tables say what its committed reports say.

The page's numbers were copied out of the reports under docs/onpolicy_methods/ (whose runs.csv and differences.csv
test_committed_reports.py checks against kdlab-report). This test recomputes each table cell from those files
(means and Student-t intervals from runs.csv, paired differences from differences.csv) and compares it with the
page's text, so a report rebuilt with more seeds cannot leave the page behind, and a hand-edited number cannot
drift. Only the speculative-acceptance column is not checked: it comes from the runs' metrics.csv, which is not
committed."""

from __future__ import annotations

import csv
import functools
import statistics
from pathlib import Path

import pytest

from kdlab.report.stats import t_interval
from kdlab.report.tables import STUDENT_FRACTION, column_title
from tests.conftest import REPO

PAGE = REPO / "docs" / "onpolicy_methods.md"
REPORTS = REPO / "docs" / "onpolicy_methods"
SFT = "sft policy=supervised λ=0"
# page label -> (report cell, the same divergence's λ=0 cell, its λ=1 cell): the rows of every table on the page
ARMS = {
    "SFT (no teacher)": (SFT, None, None),
    "fkl, λ=0": ("fkl policy=supervised λ=0", None, None),
    "fkl, λ=1": ("fkl policy=onpolicy λ=1", "fkl policy=supervised λ=0", None),
    "SKD + fkl": ("fkl policy=speculative λ=1", "fkl policy=supervised λ=0", "fkl policy=onpolicy λ=1"),
    "JSD(0.9), λ=0": ("jsd(0.9) policy=supervised λ=0", None, None),
    "JSD(0.9), λ=1": ("jsd(0.9) policy=onpolicy λ=1", "jsd(0.9) policy=supervised λ=0", None),
    "SKD + JSD(0.9)": ("jsd(0.9) policy=speculative λ=1", "jsd(0.9) policy=supervised λ=0",
                       "jsd(0.9) policy=onpolicy λ=1"),
    "rkl, λ=0": ("rkl policy=supervised λ=0", None, None),
    "rkl, λ=1": ("rkl policy=onpolicy λ=1", "rkl policy=supervised λ=0", None),
    "rkl_sampled, λ=1": ("rkl_sampled policy=onpolicy λ=1", "rkl policy=supervised λ=0", "rkl policy=onpolicy λ=1"),
}
MISMATCH = ("own_teacher_nll", "own_fkl", "own_rkl")


@functools.cache
def _table(header_start: str) -> dict[str, list[str]]:
    """The page's Markdown table whose header row starts with `header_start`: first cell -> the other cells."""
    lines = PAGE.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(header_start)), None)
    assert start is not None, f"no table headed {header_start!r} on {PAGE.name}"
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


@functools.cache
def _finished(folder: Path) -> list[dict]:
    with (folder / "runs.csv").open(newline="") as f:
        return [r for r in csv.DictReader(f) if r["status"] == "finished"]


@functools.cache
def _differences(folder: Path) -> list[dict]:
    with (folder / "differences.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _cell(row: dict) -> str:
    """The report's name for the row's cell: its method, then its λ column as the report titles it."""
    return f"{row['method']} {column_title(STUDENT_FRACTION, float(row[STUDENT_FRACTION]), 'accuracy')}"


def _values(rows: list[dict], cell: str, column: str) -> list[float]:
    return [float(r[column]) for r in rows if _cell(r) == cell]


def _signed(x: float, digits: int) -> str:
    return f"{x:+.{digits}f}"


def _difference(folder: Path, baseline: str | None, cell: str, digits: int) -> str:
    """The page's text for `cell` minus `baseline`, paired by seed, from the report's differences.csv."""
    if baseline is None:
        return ""
    pair = [r for r in _differences(folder) if r["key"] == f"against {baseline}" and r["value_b"] == cell]
    assert len(pair) == 1, (baseline, cell)
    r = pair[0]
    star = " *" if r["distinguishable"] == "True" else ""
    return (f"{_signed(float(r['mean_difference']), digits)} [{_signed(float(r['low']), digits)}, "
            f"{_signed(float(r['high']), digits)}]{star}")


def test_every_arm_is_a_row_of_every_table() -> None:
    assert set(_table("| arm | mean [95%]")) == set(ARMS)
    assert set(_table("| arm | `own_teacher_nll`")) == set(ARMS)
    assert set(_table("| arm | training wall time")) == set(ARMS)
    new = {label for label, (_, _, l1) in ARMS.items() if l1 is not None}
    assert set(_table("| new method minus same divergence at λ=1")) == new


@pytest.mark.parametrize("label", list(ARMS))
def test_accuracy_row(label: str) -> None:
    cell, l0, l1 = ARMS[label]
    values = _values(_finished(REPORTS), cell, "student_after/accuracy")
    interval = t_interval(values)
    expected = [f"{interval.mean:.3f} [{interval.low:.3f}, {interval.high:.3f}]", str(len(values)),
                "" if cell == SFT else _difference(REPORTS, SFT, cell, 3),
                _difference(REPORTS, l0, cell, 3), _difference(REPORTS, l1, cell, 3)]
    assert _table("| arm | mean [95%]")[label] == expected


@pytest.mark.parametrize("label", list(ARMS))
def test_mismatch_means_row(label: str) -> None:
    cell = ARMS[label][0]
    expected = [f"{statistics.fmean(_values(_finished(REPORTS / m), cell, f'student_after/{m}')):.4f}"
                for m in MISMATCH]
    assert _table("| arm | `own_teacher_nll`")[label] == expected


@pytest.mark.parametrize("label", [label for label, (_, _, l1) in ARMS.items() if l1 is not None])
def test_new_method_minus_lambda1_row(label: str) -> None:
    cell, _, l1 = ARMS[label]
    expected = [_difference(REPORTS / m, l1, cell, 4) for m in MISMATCH]
    assert _table("| new method minus same divergence at λ=1")[label] == expected


@pytest.mark.parametrize("label", list(ARMS))
def test_cost_row(label: str) -> None:
    rows = _finished(REPORTS)
    cell = ARMS[label][0]
    reference = statistics.fmean(_values(rows, "fkl policy=supervised λ=0", "train/teacher_forward_tokens_total"))
    wall = statistics.fmean(_values(rows, cell, "wall_time_s"))
    tokens = statistics.fmean(_values(rows, cell, "train/teacher_forward_tokens_total"))
    assert _table("| arm | training wall time")[label][:3] == [f"{wall:.0f}", f"{tokens / 1e6:.2f}M",
                                                            f"{tokens / reference:.2f}"]


def test_k1_diagnostic_table() -> None:
    """The K = 1 diagnostic's table: its runs (k1_diagnostic/runs.csv) beside the same seeds' runs of the other arms."""
    k1 = _finished(REPORTS / "k1_diagnostic")  # one cell: every run is SKD + fkl at K = 1
    seeds = sorted(r["seed"] for r in k1)
    arms = ["fkl policy=speculative λ=1", "fkl policy=onpolicy λ=1", "fkl policy=supervised λ=0", SFT]

    def value(rows: list[dict], seed: str, metric: str) -> float:
        mine = [r for r in rows if r["seed"] == seed]
        assert len(mine) == 1, seed
        return float(mine[0][f"student_after/{metric}"])

    def columns(folder: Path) -> list[list[dict]]:
        """The table's columns: the diagnostic's runs, then each arm's runs in `folder`'s report."""
        return [k1] + [[r for r in _finished(folder) if _cell(r) == arm] for arm in arms]

    table = _table("| seed | SKD + fkl, K = 1")
    for seed in seeds:
        assert table[seed] == [f"{value(rows, seed, 'accuracy'):.3f}" for rows in columns(REPORTS)]
    for m in ("own_teacher_nll", "own_rkl"):
        means = [f"{statistics.fmean(value(rows, s, m) for s in seeds):.4f}" for rows in columns(REPORTS / m)[:-1]]
        assert table[f"`{m}`, seeds {seeds[0]}-{seeds[-1]}"] == means + [""]
