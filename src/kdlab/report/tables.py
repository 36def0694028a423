"""The comparison table of a sweep (mean, 95% interval and spread over seeds, best per column in bold) and the CSV of
all runs.

Rows are methods: the loss with its own parameter (`jsd(0.9)`) and whatever else the sweep varied, except the seed
(averaged over) and the column key (the student fraction lambda when it was swept). Cells average the finished runs;
failed and unfinished runs are counted beside them, never silently dropped.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdlab.report.runs import (
    FINISHED,
    SEED,
    STUDENT_FRACTION,
    RunRecord,
    Sweep,
    flatten,
)
from kdlab.report.stats import Interval, binomial_standard_error, t_interval
from kdlab.run.resolvers import format_value, method_label

LOSS_FACTOR = "loss"  # the loss and the loss parameters a sweep varied form one factor: the method


@dataclass
class Cell:
    """The runs of one (method, column) pair."""

    values: list[float] = field(default_factory=list)  # the metric of each finished run
    seeds: list[Any] = field(default_factory=list)  # the seed of each finished run, in the order of `values`
    not_finished: int = 0  # failed or unfinished runs of this cell

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation over seeds (n - 1); None below two runs."""
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    @property
    def interval(self) -> Interval | None:
        """The mean's 95% t interval over seeds (no bounds with one run); None without a finished run."""
        return t_interval(self.values) if self.values else None

    def by_seed(self) -> dict[Any, float]:
        """{seed: metric}; runs that share a seed (the same setting run twice) are averaged into one value."""
        grouped: dict[Any, list[float]] = {}
        for seed, value in zip(self.seeds, self.values):
            grouped.setdefault(seed, []).append(value)
        return {seed: statistics.fmean(values) for seed, values in grouped.items()}


@dataclass
class Comparison:
    column_key: str | None  # the config key spread over columns, None for one metric column
    columns: list[Any]  # the column key's values, sorted
    rows: list[str]  # method labels, in first-seen order
    cells: dict[tuple[str, Any], Cell]
    row_factors: dict[str, dict[str, str]] = field(default_factory=dict)  # each row's label, factor by factor


def column_key(sweep: Sweep, requested: str | None = None) -> str | None:
    """The key spread over the table's columns: `requested`, else the student fraction when the sweep varied it."""
    if requested:
        return requested
    return STUDENT_FRACTION if STUDENT_FRACTION in sweep.swept_keys else None


def row_keys(sweep: Sweep, column: str | None) -> list[str]:
    return [key for key in sweep.swept_keys if key not in (SEED, column)]


def row_labels(sweep: Sweep, column: str | None = None) -> dict[str, str]:
    """Each run's row label (by run directory): the loss's label, then what else sets the run apart.

    A loss parameter the sweep varied shows only where it departs from the value most runs of that loss use, so an
    ablation reads `ot`, `ot(gamma=0)`, `ot(top_k=10)` rather than every parameter of every row; likewise any other
    setting shows only where it departs from the value most runs share, and never as `None` (runs beside a
    baseline read `jsd(0.5)`, `jsd(0.5) reward=arith_correct`, `jsd(0.5) r=16`)."""
    factors = row_factors(sweep, column)
    omitted = omitted_values(factors)
    return {run: _label(parts, omitted) for run, parts in factors.items()}


def _label(factors: dict[str, str | None], omitted: dict[str, str | None] | None = None) -> str:
    omitted = omitted or {}
    shown = [text for key, text in factors.items()
             if text is not None and (key == LOSS_FACTOR or omitted.get(key, _NOTHING) != text)]
    return " ".join(shown) or "all runs"


_NOTHING = object()


def omitted_values(factors: dict[str, dict[str, str | None]]) -> dict[str, str | None]:
    """The value of each setting that labels leave out: null where some run has none, else the value more than half
    the runs share (the baseline); a setting with no such value is written in every label. At most one value per
    setting is left out, so two rows never read alike."""
    runs = list(factors.values())
    keys = list(dict.fromkeys(key for parts in runs for key in parts if key != LOSS_FACTOR))
    omitted: dict[str, str | None] = {}
    for key in keys:
        texts = [parts.get(key) for parts in runs]
        if None in texts:
            omitted[key] = None
            continue
        text, count = Counter(texts).most_common(1)[0]
        if count * 2 > len(texts):
            omitted[key] = text
    return omitted


def row_factors(sweep: Sweep, column: str | None = None) -> dict[str, dict[str, str | None]]:
    """Each run's row label in parts (by run directory): {"loss": "jsd(0.9)", "optimizer.lr": "lr=0.001"}, None
    where the run's value is null. The parts are what paired differences vary one at a time; the loss and its varied
    parameters count as one factor, and the fields of a config group chosen by name count as one: `reward=
    arith_correct`, `teacher=arith_pair` (Hydra's record of each run's choices, else its overrides). A setting of
    the column's own node that the column's value determines (the policy preset of a lambda sweep) is left out: the
    column says it."""
    keys = row_keys(sweep, column)
    loss_keys = [key.split(".", 1)[1] for key in keys if key.startswith("loss.") and key != "loss.name"]
    usual: dict[tuple[str, str], Any] = {}
    for name in {run.get("loss.name") for run in sweep.runs}:
        same = [run for run in sweep.runs if run.get("loss.name") == name]
        for key in loss_keys:
            counts = Counter(_as_key(run.get(f"loss.{key}")) for run in same)
            usual[(name, key)] = counts.most_common(1)[0][0] if counts else None
    other = [key for key in keys if not key.startswith("loss.")]
    groups, other = _chosen_groups(sweep, other)
    node = column.rsplit(".", 1)[0] if column and "." in column else None
    if node:  # policy=onpolicy in the column lambda=1: the preset of the column's own node says nothing more
        groups = {p: texts for p, texts in groups.items() if p != node or not _follows(sweep, column, texts)}
        other = [k for k in other if not k.startswith(node + ".") or not _follows(
            sweep, column, {str(r.directory): _as_key(r.get(k)) for r in sweep.runs})]
    short = _short_names(other)
    factors = {}
    for run in sweep.runs:
        name = run.get("loss.name")
        unusual = [k for k in loss_keys if _as_key(run.get(f"loss.{k}")) != usual.get((name, k))]
        parts: dict[str, str | None] = {LOSS_FACTOR: method_label(run.get("loss") or {}, unusual)} if (
            run.get("loss") is not None or loss_keys) else {}
        parts.update({package: texts[str(run.directory)] for package, texts in groups.items()})
        for key in other:
            value = run.get(key)
            parts[key] = None if value is None else f"{short[key]}={value_text(value)}"
        factors[str(run.directory)] = parts
    return factors


# config group choices (Hydra's `runtime.choices` keys) by the config node they fill; loss has its own factor and
# experiment=/debug= fill no node of their own
_GROUP_NODES = {"model@teacher": "teacher", "teacher": "teacher", "model@student": "student", "reward": "reward",
                "policy": "policy", "task": "task", "trainer": "trainer", "trainer/strategy": "trainer.strategy"}


def _run_choices(run: RunRecord) -> dict[str, str]:
    """{config node: how the command line names its option} for the groups the run chose, e.g. {"teacher":
    "teacher=arith_pair", "reward": "reward=none"}: from Hydra's record, else from the run's own overrides."""
    choices = dict(run.choices)
    if not choices:
        for override in run.overrides:
            key, _, value = override.lstrip("+~").partition("=")
            if key in _GROUP_NODES or key in ("student",):
                choices["model@student" if key == "student" else key] = value
    out: dict[str, str] = {}
    for group, node in _GROUP_NODES.items():
        value = choices.get(group)
        if value is None or node in out and group != node:  # teacher=arith_pair wins over its model@teacher null
            continue
        out[node] = f"{node}={value}"
    return out


def _chosen_groups(sweep: Sweep, keys: list[str]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """The swept keys that a group option explains, as one factor per group ({node: {run: "node=option"}}), and the
    keys left. A group counts when every run records its option and runs with the same option agree on each of its
    keys; a key an override set directly stays a key of its own (student.lora.r=16 under student=...)."""
    chosen = {str(run.directory): _run_choices(run) for run in sweep.runs}
    direct = {o.split("=", 1)[0].lstrip("+~") for run in sweep.runs for o in run.overrides}
    groups: dict[str, dict[str, str]] = {}
    left = list(keys)
    for node in sorted(set(_GROUP_NODES.values()), key=len):
        members = [k for k in left if k.startswith(node + ".") and k not in direct]
        if not members or any(node not in c for c in chosen.values()):
            continue
        texts = {run: c[node] for run, c in chosen.items()}
        if all(_follows(sweep, None, texts, key) for key in members):
            groups[node] = texts
            left = [k for k in left if k not in members]
    return groups, left


def _follows(sweep: Sweep, key: str | None, by: dict[str, Any], target: str | None = None) -> bool:
    """With `target`: runs that agree on `by` (values by run directory) agree on config key `target`. Without: runs
    that agree on config key `key` agree on `by`."""
    seen: dict[Any, Any] = {}
    for run in sweep.runs:
        if target is not None:
            signature, value = by[str(run.directory)], _as_key(run.get(target))
        else:
            signature, value = _as_key(run.get(key)), by[str(run.directory)]
        if seen.setdefault(signature, value) != value:
            return False
    return True


def value_text(value: Any) -> str:
    """A value as the command line writes it: `[q_proj,v_proj]`, `0.001`."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(value_text(v) for v in value) + "]"
    return format_value(value)


def _as_key(value: Any) -> Any:
    return str(value) if isinstance(value, (list, dict)) else value


def _short_names(keys: list[str]) -> dict[str, str]:
    """`task.data.path` -> `path` when no other key ends the same way; `teacher.name` -> `teacher`."""
    def tail(key: str) -> str:
        parts = key.split(".")
        return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]

    last = Counter(tail(key) for key in keys)
    return {key: tail(key) if last[tail(key)] == 1 else key for key in keys}


def compare(sweep: Sweep, column: str | None = None) -> Comparison:
    """Group the sweep's runs into (method, column value) cells of the headline metric."""
    column = column_key(sweep, column)
    factors = row_factors(sweep, column)
    rows: list[str] = []
    columns: set = set()
    cells: dict[tuple[str, Any], Cell] = {}
    by_row: dict[str, dict[str, str]] = {}
    omitted = omitted_values(factors)
    for run in sweep.runs:
        row = _label(factors[str(run.directory)], omitted)
        col = run.get(column) if column else None
        if row not in rows:
            rows.append(row)
            by_row[row] = factors[str(run.directory)]
        columns.add(col)
        cell = cells.setdefault((row, col), Cell())
        value = run.metric(sweep.metric) if run.status == FINISHED else None
        if value is None:
            cell.not_finished += 1
        else:
            cell.values.append(value)
            cell.seeds.append(run.get(SEED))
    return Comparison(column, sorted(columns, key=_sort_key), rows, cells, by_row)


def _sort_key(value: Any) -> tuple:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return (0, float(value), "") if numeric else (1, 0, str(value))


def lower_is_better(metric: str) -> bool:
    """kdlab's task metrics are higher-is-better; losses, NLLs and the mismatch measures (kdlab.evaluation.mismatch)
    are not."""
    return metric.startswith("own_") or metric.endswith(("loss", "nll"))


def best_per_column(comparison: Comparison, lower: bool = False) -> dict[Any, float]:
    """The best mean of each column: the highest, or with `lower` the lowest."""
    best = {}
    for col in comparison.columns:
        means = [c.mean for (r, k), c in comparison.cells.items() if k == col and c.mean is not None]
        if means:
            best[col] = min(means) if lower else max(means)
    return best


def format_cell(cell: Cell | None, best: float | None, digits: int = 4) -> str:
    """`0.4500 [0.3258, 0.5742] (sd 0.0500, n=3)`: the mean, its 95% interval over seeds, the sample standard
    deviation and the number of finished runs; the mean bold when it is the column's best; `n=1, no interval` with
    a single run; the runs that did not finish counted."""
    if cell is None:
        return ""
    interval = cell.interval
    if interval is None:
        return f"no result ({cell.not_finished} not finished)"
    text = f"{interval.mean:.{digits}f}"
    if best is not None and math.isclose(interval.mean, best, rel_tol=0, abs_tol=1e-12):
        text = f"**{text}**"
    if interval.low is not None:
        text += f" [{interval.low:.{digits}f}, {interval.high:.{digits}f}]"
    counts = [f"sd {interval.std:.{digits}f}"] if interval.std is not None else []
    counts.append(f"n={interval.n}" + (", no interval" if interval.low is None else ""))
    if cell.not_finished:
        counts.append(f"{cell.not_finished} not finished")
    return f"{text} ({', '.join(counts)})"


def column_title(key: str | None, value: Any, metric: str) -> str:
    if key is None:
        return metric
    if key == STUDENT_FRACTION:
        return f"λ={format_value(value)}"
    return f"{key.rsplit('.', 1)[-1]}={format_value(value)}"


def comparison_table_markdown(sweep: Sweep, column: str | None = None, digits: int = 4) -> str:
    """The Markdown comparison table of the report: one row per method, one column per value of the column key;
    each cell the mean over seeds of the headline metric with its 95% t interval, the sample std and n finished
    runs; the best mean per column bold."""
    comparison = compare(sweep, column)
    best = best_per_column(comparison, lower=lower_is_better(sweep.metric))
    titles = [column_title(comparison.column_key, col, sweep.metric) for col in comparison.columns]
    lines = ["| method | " + " | ".join(titles) + " |", "| --- |" + " --- |" * len(titles)]
    for row in comparison.rows:
        cells = [format_cell(comparison.cells.get((row, col)), best.get(col), digits) for col in comparison.columns]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


RESULT_FIELDS = ("steps", "wall_time_s", "tokens_per_sec", "onpolicy_fraction", "train_tokens")
# results.json "train" values kept per run: the teacher's compute in training (tokens its forward passes read,
# kdlab.step.module), what a method comparison weighs beside accuracy and wall time
TRAIN_FIELDS = ("teacher_forward_tokens_total",)


def runs_table(sweep: Sweep) -> tuple[list[str], list[dict[str, Any]]]:
    """(header, rows) of every run: status, swept keys, every final metric, teacher and before-training scores."""
    metric_names = sorted({name for run in sweep.runs for name in ((run.results or {}).get("metrics") or {})})
    labels = row_labels(sweep, column_key(sweep))
    header = ["run", "status", "method", *sweep.swept_keys]
    header += [f"student_after/{m}" for m in metric_names] + [f"student_before/{m}" for m in metric_names]
    header += [f"teacher/{m}" for m in metric_names] + list(RESULT_FIELDS) + [f"train/{k}" for k in TRAIN_FIELDS]
    header += ["error", "overrides", "directory"]
    rows = []
    for run in sweep.runs:
        results = run.results or {}
        row: dict[str, Any] = {"run": run.name, "status": run.status, "method": labels[str(run.directory)]}
        row.update({key: _csv_value(run.get(key)) for key in sweep.swept_keys})
        for prefix, scores in (("student_after", results.get("metrics")), ("student_before", results.get(
                "student_before")), ("teacher", results.get("teacher"))):
            row.update({f"{prefix}/{m}": (scores or {}).get(m, "") for m in metric_names})
        row.update({key: results.get(key, "") for key in RESULT_FIELDS})
        row.update({f"train/{key}": (results.get("train") or {}).get(key, "") for key in TRAIN_FIELDS})
        row.update({"error": run.error or "", "overrides": " ".join(run.overrides),
                    "directory": relative_directory(run.directory, sweep.directory)})
        rows.append(row)
    return header, rows


def relative_directory(directory: Path, sweep_directory: Path) -> str:
    """A run's directory as `runs.csv` records it: relative to the sweep's, so a committed report names its runs
    the same on any machine (the machine's own path only for a run outside the sweep directory)."""
    try:
        return Path(directory).relative_to(sweep_directory).as_posix()
    except ValueError:
        return str(directory)


def _csv_value(value: Any) -> Any:
    return "" if value is None else value


def write_runs_csv(sweep: Sweep, path: str | Path) -> Path:
    """`runs.csv`: one row per run, failed and unfinished included."""
    header, rows = runs_table(sweep)
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    return path


def fixed_settings(sweep: Sweep, keys: tuple[str, ...] = ("task.name", "teacher.name", "student.name", "loss.name",
                                                          "policy.name", "trainer.max_steps", "task.batch_size",
                                                          "optimizer.lr", "seed")) -> dict[str, Any]:
    """Settings shared by every run (the context a reader needs), leaving out what the sweep varied, and the policy's
    name where lambda varied (`policy.name=mixed` beside lambda 0 and 1 reads as if the policy were fixed)."""
    fixed = {}
    configs = [flatten(run.config) for run in sweep.runs if run.config]
    for key in keys:
        if key in sweep.swept_keys or not configs:
            continue
        if key.startswith("policy.") and STUDENT_FRACTION in sweep.swept_keys:
            continue
        values = {str(config.get(key)) for config in configs}
        if len(values) == 1 and configs[0].get(key) is not None:
            fixed[key] = configs[0][key]
    return fixed


def model_label(run: RunRecord, role: str) -> str:
    """Which model a run's `role` ("teacher" or "student") was, as a reader names it: the option the command line
    chose (`arith_pair`, `cached`), else the model's name."""
    chosen = _run_choices(run).get(role)
    if chosen:
        return chosen.split("=", 1)[1]
    name = run.get(f"{role}.name")
    members = run.get(f"{role}.members")
    if name is None and isinstance(members, dict):  # several teachers without a name of their own
        return "+".join(str((m or {}).get("name", k)) for k, m in members.items())
    return str(name) if name is not None else "?"


def reference_scores(runs: list[RunRecord], metric: str) -> dict[str, dict[str, float]]:
    """The teacher's and the untrained student's score, by model ({"teacher": {"arith_teacher": 0.62}, ...}), each
    averaged over the runs of that model that measured it: different teachers are never averaged together."""
    out: dict[str, dict[str, float]] = {}
    for name, role in (("teacher", "teacher"), ("student_before", "student")):
        by_model: dict[str, list[float]] = {}
        for r in runs:
            if r.results and isinstance(r.results.get(name), dict) and metric in r.results[name]:
                by_model.setdefault(model_label(r, role), []).append(float(r.results[name][metric]))
        if by_model:
            out[name] = {model: statistics.fmean(values) for model, values in by_model.items()}
    return out


SCORED_GENERATIONS = Path("generations") / "student_after.jsonl"  # one line per problem the final score counted


def scored_problems(run: RunRecord) -> int | None:
    """How many problems the run's final score averages over: the lines of its final generations (what was scored),
    else the validation examples its data report used, else `task.eval_examples` (an upper bound: the split may be
    smaller). None when none is known."""
    path = run.directory / SCORED_GENERATIONS
    if path.is_file():
        with path.open() as f:
            return sum(1 for line in f if line.strip()) or None
    used = (((run.results or {}).get("data") or {}).get("validation") or {}).get("used")
    if isinstance(used, int) and used > 0:
        return used
    configured = run.get("task.eval_examples")
    return configured if isinstance(configured, int) and configured > 0 else None


def is_accuracy_like(metric: str) -> bool:
    """A share of problems solved (each scores 0 or 1), for which the binomial standard error holds; ROUGE and BLEU
    average graded or corpus-level scores and do not qualify."""
    name = metric.lower()
    return "acc" in name or "exact_match" in name


def run_standard_error_line(sweep: Sweep) -> str | None:
    """`One run's standard error: about 0.0350 (200 problems) ...`: the binomial sqrt(p (1-p) / N) at the finished
    runs' mean score. The intervals over seeds keep the scored problems fixed; this says how far one run's score
    would move on another draw of N problems. None where it does not apply (not an accuracy, outside [0, 1], or N
    unknown)."""
    if not is_accuracy_like(sweep.metric):
        return None
    scored = [(value, scored_problems(run)) for run in sweep.by_status(FINISHED)
              if (value := run.metric(sweep.metric)) is not None]
    if not scored or any(n is None or not 0.0 <= p <= 1.0 for p, n in scored):
        return None
    sizes = sorted({n for _, n in scored})
    if len(sizes) == 1:
        mean = statistics.fmean(p for p, _ in scored)
        error = f"{binomial_standard_error(mean, sizes[0]):.4f} ({sizes[0]} problems, at the mean {sweep.metric})"
    else:
        errors = [binomial_standard_error(p, n) for p, n in scored]
        error = f"{min(errors):.4f} to {max(errors):.4f} ({sizes[0]} to {sizes[-1]} problems, run by run)"
    return (f"One run's standard error: about {error}; binomial sqrt(p(1-p)/N), the spread from which problems were "
            f"drawn, which the intervals over seeds leave out (every run scores the same problems).")
