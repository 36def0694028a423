"""PNG plots of a sweep (matplotlib, Agg backend: no display needed): the headline metric against the student
fraction with one line per method, and learning curves (train/loss against step) per method."""

from __future__ import annotations

import csv
import math
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: works on a headless machine and in tests
import matplotlib.pyplot as plt  # noqa: E402

from kdlab.report.runs import STUDENT_FRACTION, RunRecord, Sweep  # noqa: E402
from kdlab.report.tables import column_title, compare, reference_scores  # noqa: E402


def plot_metric(sweep: Sweep, path: str | Path, column: str | None = None) -> Path | None:
    """Metric against the column key (the student fraction), one line per method, error bars one sample std over
    seeds; a bar chart when the sweep has a single column. None when no run finished."""
    comparison = compare(sweep, column)
    if not any(cell.values for cell in comparison.cells.values()):
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    numeric = comparison.column_key is not None and all(isinstance(c, (int, float)) for c in comparison.columns)
    if comparison.column_key is not None and len(comparison.columns) > 1:
        positions = comparison.columns if numeric else list(range(len(comparison.columns)))
        spacing = min(b - a for a, b in zip(positions, positions[1:])) if len(positions) > 1 else 1.0
        for i, row in enumerate(comparison.rows):
            dodge = (i - (len(comparison.rows) - 1) / 2) * spacing * 0.02  # error bars side by side, not on top
            xs, means, stds = [], [], []
            for x, col in zip(positions, comparison.columns):
                cell = comparison.cells.get((row, col))
                if cell is not None and cell.mean is not None:
                    xs.append(x + dodge)
                    means.append(cell.mean)
                    stds.append(cell.std or 0.0)
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=row)
        if not numeric:
            ax.set_xticks(positions, [str(c) for c in comparison.columns])
        ax.set_xlabel("student fraction λ" if comparison.column_key == STUDENT_FRACTION else comparison.column_key)
    else:
        col = comparison.columns[0] if comparison.columns else None
        cells = [comparison.cells.get((row, col)) for row in comparison.rows]
        means = [c.mean if c is not None and c.mean is not None else math.nan for c in cells]
        stds = [c.std or 0.0 if c is not None else 0.0 for c in cells]
        ax.bar(range(len(comparison.rows)), means, yerr=stds, capsize=3)
        ax.set_xticks(range(len(comparison.rows)), comparison.rows, rotation=30, ha="right", fontsize=8)
    references = reference_scores(sweep.runs, sweep.metric)
    for name, style in (("teacher", "--"), ("student_before", ":")):
        by_model = references.get(name, {})
        for model, value in by_model.items():  # one line per model: different teachers are not averaged
            label = name.replace("_", " ") + (f" {model}" if len(by_model) > 1 else "")
            ax.axhline(value, color="gray", linestyle=style, linewidth=1, label=f"{label} {value:.3f}")
    ax.legend(fontsize=8)
    ax.set_ylabel(f"{sweep.metric} (student after training)")
    ax.set_title(f"{sweep.metric}: mean ± std over seeds")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def read_curve(run: RunRecord, key: str = "train/loss") -> list[tuple[int, float]]:
    """(step, value) pairs of `key` from the run's csv/metrics.csv (Lightning's CSVLogger: one row per log call,
    empty cells for the metrics not logged in it)."""
    path = run.directory / "csv" / "metrics.csv"
    if not path.is_file():
        return []
    points = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            value, step = row.get(key), row.get("step")
            if value not in (None, "") and step not in (None, ""):
                points.append((int(float(step)), float(value)))
    return points


def plot_learning_curves(sweep: Sweep, path: str | Path, key: str = "train/loss", column: str | None = None
                         ) -> Path | None:
    """`key` against step, one line per method (mean over seeds at each logged step), one panel per column value
    (e.g. per student fraction). Losses of different methods measure different divergences: compare shapes, not
    levels, across methods. None when no run logged `key`."""
    comparison = compare(sweep, column)
    from kdlab.report.tables import row_labels

    labels = row_labels(sweep, comparison.column_key)
    curves: dict[tuple, dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for run in sweep.runs:
        col = run.get(comparison.column_key) if comparison.column_key else None
        for step, value in read_curve(run, key):
            curves[col][labels[str(run.directory)]][step].append(value)
    if not curves:
        return None
    columns = [c for c in comparison.columns if c in curves] or list(curves)
    fig, axes = plt.subplots(1, len(columns), figsize=(4.5 * len(columns) + 2, 4), squeeze=False, sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles = {}
    for ax, col in zip(axes[0], columns):
        for i, row in enumerate(comparison.rows):  # one colour per method in every panel
            if row not in curves[col]:
                continue
            steps = sorted(curves[col][row])
            means = [statistics.fmean(curves[col][row][s]) for s in steps]
            (handles[row],) = ax.plot(steps, means, color=colours[i % len(colours)], label=row)
        ax.set_xlabel("step")
        ax.xaxis.get_major_locator().set_params(integer=True)
        if comparison.column_key:
            ax.set_title(column_title(comparison.column_key, col, sweep.metric))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{key} (mean over seeds)")
    labels = [row for row in comparison.rows if row in handles]
    fig.legend([handles[row] for row in labels], labels, loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1 - 1.8 / fig.get_figwidth(), 1))
    return _save(fig, path, tight=False)


def _save(fig, path: str | Path, tight: bool = True) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
