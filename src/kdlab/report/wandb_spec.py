"""The W&B comparison report of a sweep, as kdlab's own JSON specification, and the Report rebuilt from it.

A `wandb_workspaces.reports.v2.Report` builds offline, but turning its run sets into the wire model looks projects
up on the server, so it cannot be saved to a file without a login. The specification is therefore kdlab's: a small,
versioned, JSON-able description of the report's blocks, panels and run-set filters. `sweep_specification` derives
it from the runs on disk (no network); `report_from_spec` turns it into the Report object (no network either), which
`kdlab.report.wandb_report` saves when W&B is reachable.

Metric references in the specification are strings: `config:<dotted key>` (a run's config, e.g.
`config:policy.student_fraction`), `summary:<key>` (its final value, e.g. `summary:val/accuracy`), and anything else
a logged history key (e.g. `train/loss`).
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from pathlib import Path
from typing import Any

from kdlab.run.resolvers import LABEL_PARAMS, format_value, method_label

SPEC_FORMAT = "kdlab-wandb-report"
SPEC_VERSION = 1

STUDENT_FRACTION = "policy.student_fraction"
SEED = "seed"
# Lightning's WandbLogger declares this as the step metric of everything it logs; W&B's own `_step` counts log calls.
STEP = "trainer/global_step"
THROUGHPUT = "train/tokens_per_sec"
# train/* columns that describe the step rather than a term of the objective.
BOOKKEEPING = {"train/onpolicy", "train/onpolicy_fraction", "train/target_tokens", THROUGHPUT}
# Keys that differ between jobs of any multirun without being hyper-parameters: paths and logger naming.
NOT_HYPERPARAMETERS = ("output_dir", "ckpt_path", "logger.", "hydra.")


def _wandb_groups(sweep: Any) -> list[str]:
    """The W&B groups the sweep's runs logged under. One group per sweep is the rule (conf/logger/wandb.yaml); runs
    logged under several (an older sweep, edited configs) are all selected rather than some silently dropped."""
    groups = list(dict.fromkeys(str(g) for g in (run.get("logger.wandb.group") for run in sweep.runs) if g))
    groups = groups or ([sweep.wandb_group] if sweep.wandb_group else [])
    if not groups:
        raise ValueError("the runs did not log to W&B: run the sweep with logger=wandb, then `wandb sync` its runs")
    return groups


def sweep_specification(sweep: Any, table_markdown: str, entity: str | None = None,
                        project: str | None = None) -> dict:
    """The report specification of `sweep` (a `kdlab.report.runs.Sweep`); raises ValueError when its runs did not
    log to W&B, since the report's run sets select the sweep's runs by their W&B group."""
    runs = sweep.runs
    groups = _wandb_groups(sweep)
    summary_metric = f"summary:val/{sweep.metric}"
    swept = [key for key in sweep.swept_keys if not key.startswith(NOT_HYPERPARAMETERS)]
    methods = loss_methods(runs, swept)
    history = logged_history_keys(runs)
    components = [key for key in history if key.startswith("train/") and key not in BOOKKEEPING]
    components.sort(key=lambda key: (key != "train/loss", key))  # the total first, then its terms

    blocks: list[dict] = [
        {"type": "markdown", "text": _overview(sweep, swept, methods)},
        {"type": "heading", "level": 2, "text": "Comparison table"},
        {"type": "markdown", "text": table_markdown},
        {"type": "heading", "level": 2, "text": f"{sweep.metric} against student fraction, per loss"},
    ]
    for method in methods:
        runset = _runset(method["label"], groups, config=method["config"], columns=[summary_metric])
        scatter = {"type": "scatter", "title": f"{method['label']}: {sweep.metric} vs student fraction",
                   "x": f"config:{STUDENT_FRACTION}", "y": summary_metric, "w": 12, "h": 8}
        blocks.append({"type": "panel_grid", "runsets": [runset], "panels": [scatter], "hide_run_sets": True})

    # Learning curves: one line per configuration, the mean over seeds with its spread.
    by_configuration = [key for key in swept if key != SEED]
    curves = [_line(key, key) for key in components]
    if THROUGHPUT in history:
        curves.append(_line("throughput (scored tokens/s)", THROUGHPUT))
    if curves:
        blocks.append({"type": "heading", "level": 2, "text": "Learning curves and throughput (mean ± std over seeds)"})
        runset = _runset("by configuration", groups, groupby=[f"config:{key}" for key in by_configuration])
        blocks.append({"type": "panel_grid", "runsets": [runset], "panels": curves, "hide_run_sets": False})

    columns = [f"config:{key}" for key in swept] + [summary_metric]
    blocks.append({"type": "heading", "level": 2, "text": "Runs compared over the swept keys"})
    blocks.append({"type": "panel_grid", "runsets": [_runset("all runs", groups, columns=columns)], "panels": [
        {"type": "parallel_coordinates", "title": f"swept keys and {sweep.metric}", "columns": columns,
         "w": 24, "h": 8},
        {"type": "run_comparer", "diff_only": "split", "w": 24, "h": 10},
    ], "hide_run_sets": False})

    entity, project = _destination(runs, entity, project)
    return {
        "format": SPEC_FORMAT,
        "version": SPEC_VERSION,
        "entity": entity,
        "project": project,
        "title": _title(sweep, swept, methods),
        "description": _description(sweep, swept, methods, groups),
        "groups": groups,
        "sweep_dir": str(sweep.directory),
        "metric": summary_metric,
        "swept_keys": swept,
        "components": components,
        "blocks": blocks,
    }


def loss_methods(runs: list, swept: list[str]) -> list[dict]:
    """The distinct losses of the runs, in job order, each with the label the local table gives it (`jsd(0.9)`) and
    the loss config keys that select its runs: `loss.name`, the parameter its label shows, the swept `loss.*` keys
    it has (fkl has no `loss.beta`)."""
    extra = [key.split(".", 1)[1] for key in swept if key.startswith("loss.") and key != "loss.name"]
    methods: dict[tuple, dict] = {}
    for run in runs:
        loss = run.get("loss")
        if not isinstance(loss, dict) or loss.get("name") is None:
            continue  # a run that failed before its config was written
        keys = ["name", LABEL_PARAMS.get(loss["name"]), *extra]
        config = {f"loss.{key}": loss[key] for key in dict.fromkeys(keys) if key and loss.get(key) is not None}
        identity = tuple((key, repr(value)) for key, value in config.items())
        methods.setdefault(identity, {"label": method_label(loss, extra), "config": config})
    return list(methods.values())


def logged_history_keys(runs: list) -> list[str]:
    """Every metric column the runs logged with a value (their `csv/metrics.csv`), sorted: what W&B's history holds."""
    keys: set[str] = set()
    for run in runs:
        path = Path(run.directory) / "csv" / "metrics.csv"
        if not path.is_file():
            continue
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                keys.update(key for key, value in row.items() if key and value not in (None, ""))
    return sorted(keys)


def _runset(name: str, groups: list[str], config: dict | None = None, groupby: list[str] | None = None,
            columns: list[str] | None = None) -> dict:
    return {"name": name, "filters": {"groups": list(groups), "config": dict(config or {})},
            "groupby": list(groupby or []), "columns": list(columns or [])}


def _line(title: str, key: str) -> dict:
    return {"type": "line", "title": title, "x": STEP, "y": [key], "aggregate": "mean", "range": "stddev",
            "w": 8, "h": 6}


def _values(runs: list, key: str) -> list:
    """The distinct values of a config key over the runs, numbers in numeric order (lists and dicts allowed)."""
    distinct = {repr(v): v for v in (run.get(key) for run in runs) if v is not None}
    return sorted(distinct.values(), key=lambda v: (not isinstance(v, (int, float)), v if isinstance(v, (int, float))
                                                    else 0, repr(v)))


def _title(sweep: Any, swept: list[str], methods: list[dict]) -> str:
    task = ", ".join(str(v) for v in _values(sweep.runs, "task.name")) or "kdlab"
    title = f"{task}: " + ", ".join(m["label"] for m in methods)
    if STUDENT_FRACTION in swept:
        title += " × student fraction " + "/".join(map(format_value, _values(sweep.runs, STUDENT_FRACTION)))
    seeds = _values(sweep.runs, SEED)
    title += f" ({len(sweep.runs)} runs, {len(seeds)} seed{'s' if len(seeds) != 1 else ''})"
    return title if len(title) <= 128 else title[:127] + "…"  # W&B caps report titles at 128 characters


def _description(sweep: Any, swept: list[str], methods: list[dict], groups: list[str]) -> str:
    task = ", ".join(map(str, _values(sweep.runs, "task.name")))
    return (f"{task} distillation sweep of {len(sweep.runs)} runs: {', '.join(m['label'] for m in methods)}; swept "
            f"{', '.join(swept) or 'nothing'}; W&B group {', '.join(groups)}; made by kdlab-report from "
            f"{sweep.directory}.")


def _overview(sweep: Any, swept: list[str], methods: list[dict]) -> str:
    runs = sweep.runs
    status = Counter(run.status for run in runs)
    lines = [
        f"Sweep `{sweep.directory}`: {len(runs)} runs ("
        + ", ".join(f"{n} {state}" for state, n in sorted(status.items())) + ").",
        "",
        f"- task: {', '.join(map(str, _values(runs, 'task.name')))}; teacher: "
        f"{', '.join(map(str, _values(runs, 'teacher.name'))) or 'none'}; "
        f"student: {', '.join(map(str, _values(runs, 'student.name')))}",
        f"- losses: {', '.join(m['label'] for m in methods)}",
        f"- headline metric: `val/{sweep.metric}` (the student after training)",
    ]
    lines += [f"- swept `{key}`: " + ", ".join(map(format_value, _values(runs, key))) for key in swept]
    failed = [run.name for run in runs if run.status != "finished"]
    if failed:
        lines.append(f"- not finished (listed, not hidden): jobs {', '.join(failed)}")
    return "\n".join(lines)


def _destination(runs: list, entity: str | None, project: str | None) -> tuple[str | None, str]:
    """Arguments first, then what the runs logged to (`logger.wandb.*`), then W&B's environment variables. An entity
    left None is the logged-in user's default entity, resolved when the report is pushed."""
    def logged(key: str) -> str | None:
        values = Counter(run.get(f"logger.wandb.{key}") for run in runs if run.get(f"logger.wandb.{key}"))
        return values.most_common(1)[0][0] if values else None

    entity = entity or logged("entity") or os.environ.get("WANDB_ENTITY") or None
    project = project or logged("project") or os.environ.get("WANDB_PROJECT") or "kdlab"
    return entity, project


# -- specification -> Report ---------------------------------------------------------------------------------------

def report_from_spec(spec: dict, entity: str | None = None) -> Any:
    """The `wandb_workspaces.reports.v2.Report` of a specification, built offline (nothing is saved). `entity`
    fills in a specification saved without one."""
    import wandb_workspaces.reports.v2 as wr

    check_specification(spec)
    entity = spec.get("entity") or entity
    if not entity:
        raise ValueError("the specification names no W&B entity: pass --entity or set WANDB_ENTITY")
    blocks = []
    for block in spec["blocks"]:
        kind = block["type"]
        if kind == "heading":
            blocks.append({1: wr.H1, 2: wr.H2, 3: wr.H3}[block["level"]](text=block["text"]))
        elif kind == "markdown":
            blocks.append(wr.MarkdownBlock(text=block["text"]))
        elif kind == "panel_grid":
            blocks.append(wr.PanelGrid(
                runsets=[_wandb_runset(wr, rs, entity, spec["project"]) for rs in block["runsets"]],
                panels=[_wandb_panel(wr, panel) for panel in block["panels"]],
                hide_run_sets=block.get("hide_run_sets", False),
            ))
        else:
            raise ValueError(f"unknown block type {kind!r} in the report specification")
    return wr.Report(entity=entity, project=spec["project"], title=spec["title"], description=spec["description"],
                     blocks=blocks, width="fluid")


def check_specification(spec: Any) -> None:
    """Raises ValueError unless `spec` is a report specification of a version this kdlab reads."""
    if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT:
        raise ValueError(f"not a kdlab W&B report specification (no \"format\": \"{SPEC_FORMAT}\")")
    if spec.get("version") != SPEC_VERSION:
        raise ValueError(f"report specification version {spec.get('version')} is not {SPEC_VERSION}: "
                         "rebuild it with this kdlab (kdlab-report <sweep dir> --wandb)")


def _stored_config_key(key: str) -> str:
    """W&B stores a nested config value under `<top>.value.<rest>` (`loss.value.beta`); filters address it so."""
    top, _, rest = key.partition(".")
    return f"{top}.value.{rest}" if rest else f"{top}.value"


def _metric(wr: Any, ref: str) -> Any:
    section, _, name = ref.partition(":")
    if section == "config" and name:
        return wr.Config(name)
    if section == "summary" and name:
        return wr.SummaryMetric(name)
    return ref  # a history key


def _column(ref: str) -> str:
    """A runs-table column accessor: `config:loss.value.beta`, `summary:val/accuracy`."""
    section, _, name = ref.partition(":")
    return f"config:{_stored_config_key(name)}" if section == "config" else ref


def _wandb_runset(wr: Any, runset: dict, entity: str, project: str) -> Any:
    from wandb_workspaces import expr

    groups = runset["filters"]["groups"]
    filters = [expr.Metric("Group") == groups[0] if len(groups) == 1 else expr.Metric("Group").isin(groups)]
    filters += [expr.Config(_stored_config_key(key)) == value for key, value in runset["filters"]["config"].items()]
    return wr.Runset(
        entity=entity, project=project, name=runset["name"], filters=filters,
        groupby=[f"config.{ref.partition(':')[2]}" for ref in runset.get("groupby", [])],
        pinned_columns=[_column(ref) for ref in runset.get("columns", [])],
    )


def _wandb_panel(wr: Any, panel: dict) -> Any:
    layout = wr.Layout(w=panel.get("w", 8), h=panel.get("h", 6))
    kind = panel["type"]
    if kind == "scatter":
        return wr.ScatterPlot(title=panel.get("title"), x=_metric(wr, panel["x"]), y=_metric(wr, panel["y"]),
                              layout=layout)
    if kind == "line":
        return wr.LinePlot(title=panel.get("title"), x=panel["x"], y=[_metric(wr, y) for y in panel["y"]],
                           groupby_aggfunc=panel.get("aggregate"), groupby_rangefunc=panel.get("range"),
                           layout=layout)
    if kind == "parallel_coordinates":
        columns = [wr.ParallelCoordinatesPlotColumn(metric=_metric(wr, ref)) for ref in panel["columns"]]
        return wr.ParallelCoordinatesPlot(title=panel.get("title"), columns=columns, layout=layout)
    if kind == "run_comparer":
        return wr.RunComparer(diff_only=panel.get("diff_only"), layout=layout)
    raise ValueError(f"unknown panel type {kind!r} in the report specification")
