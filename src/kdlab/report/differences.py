"""Paired differences between the cells of a comparison that differ in one swept setting only.

Two cells pair when they agree on every setting but one: the column key (λ=1 against λ=0 for the same loss), the
loss (fkl against rkl at the same λ), or any other swept key. Their runs are matched by seed (the same seed gives the
same initialisation and data order), so the difference per seed cancels what the seeds share; the mean difference
gets a 95% t interval over the matched seeds, and the report says whether it excludes zero.

`against` pairs differently: every cell with each cell named as a baseline (`kdlab-report --against sft`), whatever
settings set them apart. A comparison of methods that differ in several settings at once (speculative KD against the
supervised grid, every arm against plain SFT) needs exactly these pairs, which one-setting pairing never forms.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdlab.report.stats import Paired, paired_differences
from kdlab.report.tables import Cell, Comparison, column_title

LISTED_IN_REPORT = 60  # sentences in report.md; the CSV holds every pair
CSV_FIELDS = ("key", "value_a", "value_b", "fixed", "n_pairs", "seeds", "seeds_left_out", "mean_difference",
              "sd_difference", "low", "high", "distinguishable")


@dataclass(frozen=True)
class Difference:
    """value_b minus value_a of one metric, seed by seed, with everything else in `fixed`."""

    key: str  # the setting varied: the column key, "loss", or another swept config key
    value_a: str  # how the table writes each side's value, e.g. "λ=0", "fkl"
    value_b: str
    fixed: str  # the settings both sides share, e.g. "fkl" or "λ=0.5"
    paired: Paired

    @property
    def distinguishable(self) -> bool:
        """True when the 95% interval of the mean difference excludes zero."""
        return self.paired.interval is not None and self.paired.interval.excludes_zero


def differences(comparison: Comparison, metric: str) -> list[Difference]:
    """Every pair of cells with results that differ in exactly one setting: the column key's pairs first (row by
    row, columns in order), then each row setting's (the loss first), within each the values in table order."""
    factors = _cell_factors(comparison, metric)
    keys = ([comparison.column_key] if comparison.column_key else []) + list(
        dict.fromkeys(k for row in comparison.rows for k in comparison.row_factors.get(row, {})))
    found = []
    for key in keys:
        groups: dict[tuple, list[tuple[str, Any]]] = {}
        for cell_id, settings in factors.items():
            if key in settings:
                others = tuple((k, v) for k, v in settings.items() if k != key)
                groups.setdefault(others, []).append(cell_id)
        for others, members in groups.items():
            fixed = " ".join(v for _, v in others) or "all runs"
            for i, a in enumerate(members):
                for b in members[i + 1:]:
                    found.append(_difference(key, factors[a][key], factors[b][key], fixed,
                                             comparison.cells[a], comparison.cells[b]))
    return found


class UnknownCell(ValueError):
    """A baseline name (`--against`) that names no cell with results."""


def cell_name(comparison: Comparison, row: str, col: Any, metric: str) -> str:
    """How a cell is named, in the report and to `--against`: its row, then its column's title when the table has
    columns (`fkl λ=0`)."""
    return row if comparison.column_key is None else f"{row} {column_title(comparison.column_key, col, metric)}"


def find_cell(names: dict[tuple[str, Any], str], name: str) -> tuple[str, Any]:
    """The (row, column) that `name` names among `names` ({cell: its name}, the cells with results): its full name,
    or its row's label where that row has results in one column only. A name that matches none, or a row with
    results in several columns, is UnknownCell, which lists the names there are."""
    for cell, full in names.items():
        if full == name:
            return cell
    in_row = [cell for cell in names if cell[0] == name]
    if len(in_row) == 1:
        return in_row[0]
    what = (f"the row {name!r} has results in {len(in_row)} columns: name one of them" if in_row
            else f"no cell with results is named {name!r}")
    raise UnknownCell(f"{what} (cells: {', '.join(repr(n) for n in names.values())})")


def against(comparison: Comparison, metric: str, baselines: list[str]) -> list[Difference]:
    """Every other cell with results minus each baseline cell (named as `find_cell` reads names), seed by seed:
    key `against <baseline>`, value_a the baseline, value_b the other cell; in table order."""
    names = {cell: cell_name(comparison, *cell, metric) for cell in _cell_factors(comparison, metric)}
    found = []
    for name in baselines:
        base = find_cell(names, name)
        found += [_difference(f"against {names[base]}", names[base], other_name, "", comparison.cells[base],
                              comparison.cells[other]) for other, other_name in names.items() if other != base]
    return found


def _cell_factors(comparison: Comparison, metric: str) -> dict[tuple[str, Any], dict[str, str]]:
    """{(row, column): {setting: value as written}} for the cells with at least one finished run, row by row."""
    factors = {}
    for row in comparison.rows:
        for col in comparison.columns:
            cell = comparison.cells.get((row, col))
            if cell is None or not cell.values:
                continue
            settings = dict(comparison.row_factors.get(row, {}))
            if comparison.column_key:
                settings[comparison.column_key] = column_title(comparison.column_key, col, metric)
            factors[(row, col)] = settings
    return factors


def _difference(key: str, value_a: str, value_b: str, fixed: str, a: Cell, b: Cell) -> Difference:
    return Difference(key, value_a, value_b, fixed, paired_differences(a.by_seed(), b.by_seed()))


def sentence(difference: Difference, digits: int = 4) -> str:
    """One plain sentence: which pair, the mean difference with its interval and seeds, and whether it is
    distinguishable from zero at 95%."""
    d, paired = difference, difference.paired
    head = f"{d.fixed}: {d.value_b} minus {d.value_a}"
    left_out = _left_out(d)
    interval = paired.interval
    if interval is None:
        return f"{head}: no seed finished on both sides, so no paired difference{left_out}."
    mean = f"{interval.mean:+.{digits}f}"
    if interval.low is None:
        return f"{head} is {mean} from one seed: no interval with one seed{left_out}."
    spread = "; every seed gives the same difference" if paired.constant else ""
    text = (f"{head} is {mean} (95% interval {interval.low:+.{digits}f} to {interval.high:+.{digits}f}, "
            f"{interval.n} seeds{spread}{left_out})")
    if d.distinguishable:
        return f"{text}: distinguishable from zero; {d.value_b if interval.mean > 0 else d.value_a} scores higher."
    return f"{text}: not distinguishable from zero at 95%."


def _left_out(difference: Difference) -> str:
    parts = [f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''} only in {value}" for seeds, value in (
        (difference.paired.only_a, difference.value_a), (difference.paired.only_b, difference.value_b)) if seeds]
    return f"; left out: {', '.join(parts)}" if parts else ""


def differences_markdown(found: list[Difference], digits: int = 4, limit: int = LISTED_IN_REPORT) -> list[str]:
    """The report's section: how to read it, then one sentence per pair under the setting varied."""
    lines = ["## Paired differences", ""]
    if not found:
        return lines + ["None: no two cells with results differ in one setting only.", ""]
    lines += ["Cells that differ in one setting only, run by run with the same seed (same initialisation and data "
              "order): the second minus the first per seed, the mean difference and its 95% t interval over the "
              "seeds both finished. An interval that excludes zero is distinguishable from zero at 95%; among many "
              "pairs with no real difference, about one in twenty still looks distinguishable. Every pair: "
              "[differences.csv](differences.csv).", ""]
    shown = found[:limit]
    key = None
    for difference in shown:
        if difference.key != key:
            key = difference.key
            lines += ([""] if lines[-1] else []) + [f"### `{key}`", ""]
        lines.append(f"- {sentence(difference, digits)}")
    if len(found) > limit:
        lines += ["", f"{len(found) - limit} more pairs in [differences.csv](differences.csv)."]
    return lines + [""]


def against_markdown(found: list[Difference], digits: int = 4) -> list[str]:
    """The report's section for `--against`: how to read it, then per baseline a table of every other cell minus it
    (the mean difference with its 95% interval over the seeds both finished, `*` where it excludes zero)."""
    if not found:
        return []
    lines = ["## Against the baselines", "",
             "Every cell minus each baseline cell named with `--against`, run by run with the same seed, whatever "
             "settings set the two apart: the mean difference, its 95% t interval over the seeds both finished, and "
             "`*` where that interval excludes zero. Also in [differences.csv](differences.csv).", ""]
    key = None
    for d in found:
        if d.key != key:
            key = d.key
            head = [f"### Against `{d.value_a}`", "", f"| cell | minus {d.value_a} (paired) | seeds |",
                    "| --- | --- | --- |"]
            lines += ([""] if lines[-1] else []) + head
        interval = d.paired.interval
        if interval is None:
            text = "no seed on both sides"
        elif interval.low is None:
            text = f"{interval.mean:+.{digits}f} (one seed, no interval)"
        else:
            text = f"{interval.mean:+.{digits}f} [{interval.low:+.{digits}f}, {interval.high:+.{digits}f}]" + (
                " *" if d.distinguishable else "")
        lines.append(f"| {d.value_b} | {text} | {len(d.paired.seeds)} |")
    return lines + [""]


def difference_row(difference: Difference) -> dict[str, Any]:
    """One row of differences.csv (empty interval fields where there is no interval)."""
    paired, interval = difference.paired, difference.paired.interval
    return {
        "key": difference.key, "value_a": difference.value_a, "value_b": difference.value_b,
        "fixed": difference.fixed, "n_pairs": len(paired.seeds), "seeds": " ".join(map(str, paired.seeds)),
        "seeds_left_out": len(paired.only_a) + len(paired.only_b),
        "mean_difference": "" if interval is None else interval.mean,
        "sd_difference": "" if interval is None or interval.std is None else interval.std,
        "low": "" if interval is None or interval.low is None else interval.low,
        "high": "" if interval is None or interval.high is None else interval.high,
        "distinguishable": difference.distinguishable,
    }


def write_differences_csv(found: list[Difference], path: str | Path) -> Path:
    """`differences.csv`: one row per pair, mean_difference = value_b - value_a over the seeds both have."""
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(difference_row(d) for d in found)
    return path
