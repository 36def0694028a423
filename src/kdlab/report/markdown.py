"""The Markdown report of a sweep: what was run, the comparison table with intervals over seeds, the paired
differences between settings, the plots, the runs that did not finish."""

from __future__ import annotations

from pathlib import Path

import yaml

from kdlab.report import plots
from kdlab.report.differences import (
    Difference,
    against,
    against_markdown,
    differences,
    differences_markdown,
    write_differences_csv,
)
from kdlab.report.runs import FAILED, FINISHED, UNFINISHED, Sweep
from kdlab.report.tables import (
    column_key,
    compare,
    comparison_table_markdown,
    fixed_settings,
    model_label,
    reference_scores,
    run_standard_error_line,
    value_text,
    write_runs_csv,
)
from kdlab.run.resolvers import format_value
from kdlab.run.rundir import RESULTS

METRIC_PLOT = "metric.png"
CURVES_PLOT = "learning_curves.png"


def write_report(sweep: Sweep, out_dir: str | Path, column: str | None = None,
                 baselines: list[str] | None = None) -> dict[str, Path]:
    """Write report.md, runs.csv, differences.csv and the PNG plots into `out_dir`; returns their paths by kind.
    `baselines`: cells every other cell is also paired with (kdlab.report.differences.against; a name that is no
    cell is UnknownCell, raised before anything is written)."""
    comparison = compare(sweep, column)
    found = differences(comparison, sweep.metric)
    versus = against(comparison, sweep.metric, baselines or [])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {"csv": write_runs_csv(sweep, out_dir / "runs.csv")}
    written["differences"] = write_differences_csv(found + versus, out_dir / "differences.csv")
    metric_plot = plots.plot_metric(sweep, out_dir / METRIC_PLOT, column)
    curves_plot = plots.plot_learning_curves(sweep, out_dir / CURVES_PLOT, column=column)
    for kind, path in (("metric_plot", metric_plot), ("curves_plot", curves_plot)):
        if path is not None:
            written[kind] = path
    text = report_markdown(sweep, column, metric_plot=metric_plot, curves_plot=curves_plot, out_dir=out_dir,
                           differences_found=found, against_found=versus)
    written["report"] = out_dir / "report.md"
    written["report"].write_text(text)
    return written


def report_markdown(sweep: Sweep, column: str | None = None, metric_plot: Path | None = None,
                    curves_plot: Path | None = None, out_dir: Path | None = None,
                    differences_found: list[Difference] | None = None,
                    against_found: list[Difference] | None = None) -> str:
    """The whole report.md; `differences_found` (the paired differences) is computed here when not given;
    `against_found` (kdlab.report.differences.against) gets a section of its own when given."""
    counts = {status: len(sweep.by_status(status)) for status in (FINISHED, FAILED, UNFINISHED)}
    lines = [f"# Sweep report: `{sweep.directory}`", ""]
    lines.append(f"{len(sweep.runs)} runs: {counts[FINISHED]} finished, {counts[FAILED]} failed, "
                 f"{counts[UNFINISHED]} unfinished. Metric: `{sweep.metric}` of the student after training, on the "
                 f"validation split.")
    missing = (sweep.planned_jobs or 0) - len(sweep.runs)
    if missing > 0:
        lines.append(f"The sweep was to launch {sweep.planned_jobs} jobs: {missing} never started (no directory; the "
                     f"sweep was stopped or is still running).")
    lines.append("")
    if sweep.swept_keys:
        lines.append("Swept (detected from the runs): " + "; ".join(
            f"`{key}` ({', '.join(_distinct(sweep, key))})" for key in sweep.swept_keys) + ".")
    else:
        lines.append("Swept: nothing differs between the runs.")
    fixed = fixed_settings(sweep)
    if fixed:
        lines.append("Fixed: " + ", ".join(f"`{k}={format_value(v)}`" for k, v in fixed.items()) + ".")
    if sweep.wandb_group:
        lines.append(f"W&B group: `{sweep.wandb_group}`.")
    lines += _comparison_lines(sweep, column)
    if differences_found is None:
        differences_found = differences(compare(sweep, column), sweep.metric)
    lines += differences_markdown(differences_found)
    lines += against_markdown(against_found or [])
    lines += _optuna_lines(sweep)
    if metric_plot or curves_plot:
        lines += ["## Plots", ""]
        for path, caption in ((metric_plot, f"{sweep.metric} per method"), (curves_plot, "learning curves")):
            if path is not None:
                lines += [f"![{caption}]({_relative(path, out_dir)})", ""]
    lines += _not_finished_lines(sweep)
    lines += ["", "Every run, its status, swept values and scores: [runs.csv](runs.csv).", ""]
    return "\n".join(lines)


def _comparison_lines(sweep: Sweep, column: str | None) -> list[str]:
    """The table, how to read it, one run's standard error and the reference scores."""
    col = column_key(sweep, column)
    seeds = "seeds" if "seed" in sweep.swept_keys else "runs"
    lines = ["", "## Comparison", ""]
    lines.append(f"Mean over {seeds} with its 95% confidence interval [low, high] (Student t, n - 1 degrees of "
                 f"freedom; a cell of one run has no interval), the sample standard deviation (sd) and n finished "
                 f"runs per cell; the best mean of each column in bold." + (
                     " Columns: `policy.student_fraction` (λ, the share of steps on the student's own samples)."
                     if col == "policy.student_fraction" else ""))
    lines += ["", comparison_table_markdown(sweep, column), ""]
    standard_error = run_standard_error_line(sweep)
    if standard_error:
        lines += [standard_error, ""]
    refs = reference_scores(sweep.runs, sweep.metric)
    if refs:
        parts = []
        for kind, by_model in refs.items():
            what = "teacher" if kind == "teacher" else "student before training"
            role = "teacher" if kind == "teacher" else "student"
            if len({model_label(run, role) for run in sweep.runs}) == 1:
                parts.append(f"{what} {next(iter(by_model.values())):.4f}")
            else:  # one figure per model: an average of different teachers describes none of them
                parts += [f"{what} `{model}` {value:.4f}" for model, value in by_model.items()]
        lines += ["For reference: " + ", ".join(parts) + " (mean over the runs that scored them).", ""]
    return lines


def _not_finished_lines(sweep: Sweep) -> list[str]:
    not_done = [run for run in sweep.runs if run.status != FINISHED]
    lines = ["## Runs that did not finish", ""]
    if not not_done:
        return lines + ["None: every run finished."]
    shared = set.intersection(*(set(run.overrides) for run in sweep.runs))  # said once, not per row
    lines += ["| run | status | overrides (those all runs share left out) | error |", "| --- | --- | --- | --- |"]
    for run in not_done:
        error = (run.error or f"no {RESULTS} and no failure marker: still running, killed or crashed")
        own = [o for o in run.overrides if o not in shared] or run.overrides
        lines.append(f"| {run.name} | {run.status} | `{' '.join(own)}` | {_cell(error)} |")
    return lines


def _optuna_lines(sweep: Sweep) -> list[str]:
    """The best trial of an Optuna search (hydra-optuna-sweeper writes optimization_results.yaml into the sweep)."""
    path = sweep.directory / "optimization_results.yaml"
    if not path.is_file():
        return []
    best = yaml.safe_load(path.read_text()) or {}
    params = ", ".join(f"`{k}={format_value(v)}`" for k, v in (best.get("best_params") or {}).items())
    value = best.get("best_value")
    return ["## Optuna", "", f"Best trial: {params} with {sweep.metric} {format_value(value)}.", ""]


def _distinct(sweep: Sweep, key: str) -> list[str]:
    values = []
    for run in sweep.runs:
        text = value_text(run.get(key)) if run.get(key) is not None else "-"
        if text not in values:
            values.append(text)
    return values


def _relative(path: Path, base: Path | None) -> str:
    try:
        return str(path.relative_to(base)) if base is not None else str(path)
    except ValueError:
        return str(path)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
