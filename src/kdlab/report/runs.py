"""Runs of a sweep read back from disk: config, overrides, results and status, and the parameters the sweep varied.

A run directory is one Hydra job: `.hydra/overrides.yaml` (what the command line set) and the files `kdlab.run.rundir`
names: the resolved config, the results (written last, so their presence means the run finished) and the failure
marker (the job raised). A run with neither results nor failure is unfinished: interrupted (its interruption marker
says how), still running, killed, or crashed without Python seeing it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from kdlab.run.rundir import CONFIG, FAILURE_MARKER, INTERRUPTION_MARKER, RESULTS, other_rank_markers

FINISHED, FAILED, UNFINISHED = "finished", "failed", "unfinished"
STUDENT_FRACTION = "policy.student_fraction"
SEED = "seed"
# Keys that differ between the jobs of any sweep without being parameters of the experiment.
# Keys that change what a run writes or scores besides its student, not what it trains: runs that differ only there
# are one method (e.g. the one run of a grid that also scores the teacher and the untrained student).
NOT_PARAMETERS = ("output_dir", "ckpt_path", "logger.", "eval.", "export", "keep_checkpoints", "checkpoint.",
                  "log_rollouts_")
_MISSING = object()


@dataclass
class RunRecord:
    """One job of a sweep as found on disk."""

    directory: Path
    name: str  # the job directory's name, e.g. "3"
    overrides: list[str] = field(default_factory=list)  # from .hydra/overrides.yaml ([] when absent)
    config: dict = field(default_factory=dict)  # resolved config (config.yaml, else .hydra/config.yaml)
    results: dict | None = None  # results.json, None when missing
    status: str = UNFINISHED  # "finished" | "failed" | "unfinished"
    error: str | None = None  # one line: why it failed, when known
    # the config group options the run composed, defaults included ({"reward": "none", "model@teacher": ...}), from
    # Hydra's .hydra/hydra.yaml; {} when absent
    choices: dict = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        """The config value at dotted path `key` (e.g. "loss.beta"), `default` when any part is missing."""
        value = _lookup(self.config, key)
        return default if value is _MISSING else value

    def metric(self, name: str) -> float | None:
        """The student's final score `name` (results.json `metrics`), None when the run has no results."""
        if not self.results:
            return None
        value = (self.results.get("metrics") or {}).get(name)
        return None if value is None else float(value)


@dataclass
class Sweep:
    """The runs found under one directory and what varied between them."""

    directory: Path
    runs: list[RunRecord]
    swept_keys: list[str]  # dotted config keys whose values differ between runs (seed included)
    metric: str  # headline metric name (results["metric"]), e.g. "accuracy"
    wandb_group: str | None = None  # the W&B group the runs logged to, when they used logger=wandb
    planned_jobs: int | None = None  # how many jobs the sweep was to launch (multirun.yaml), when known

    def by_status(self, status: str) -> list[RunRecord]:
        return [run for run in self.runs if run.status == status]


def load_sweep(directory: str | Path) -> Sweep:
    """Every run under `directory` (a multirun folder, or any folder holding run directories at any depth)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory")
    runs = [load_run(path) for path in find_run_dirs(directory)]
    return Sweep(
        directory=directory,
        runs=runs,
        swept_keys=detect_swept_keys(runs),
        metric=_headline_metric(runs),
        wandb_group=_wandb_group(runs),
        planned_jobs=planned_jobs(directory),
    )


def planned_jobs(directory: Path) -> int | None:
    """The number of jobs the multirun in `directory` was launched with, from Hydra's multirun.yaml: the product of
    the sweep lists (the sweeper's params, then the command line's) for the basic sweeper, n_trials for Optuna. Jobs
    that never started (a sweep killed half way) have no directory; this count shows them."""
    hydra = (_read_yaml(directory / "multirun.yaml") or {}).get("hydra") or {}
    sweeper = hydra.get("sweeper") or {}
    target = str(sweeper.get("_target_", ""))
    if "optuna" in target.lower():
        return int(sweeper["n_trials"]) if sweeper.get("n_trials") is not None else None
    if not target.endswith("BasicSweeper"):
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{key}={value}" for key, value in (sweeper.get("params") or {}).items()]
    params += list((hydra.get("overrides") or {}).get("task") or [])
    try:
        parsed = OverridesParser.create().parse_overrides(params)
    except Exception:  # a grammar this Hydra does not know: no count rather than a wrong one
        return None
    sizes = {o.key_or_group: len(list(o.sweep_string_iterator())) if o.is_sweep_override() else 1 for o in parsed}
    return math.prod(sizes.values())


def load_run(directory: str | Path) -> RunRecord:
    directory = Path(directory)
    overrides = _read_yaml(directory / ".hydra" / "overrides.yaml") or []
    results = _read_json(directory / RESULTS)
    failure = _read_json(directory / FAILURE_MARKER)
    if failure is None:  # a DDP run whose rank 0 survived the failure of another rank
        failure = next((_read_json(p) for p in other_rank_markers(directory, FAILURE_MARKER)), None)
    interruption = _read_json(directory / INTERRUPTION_MARKER)
    if results is not None:
        status, error = FINISHED, None
    elif failure is not None:
        status, error = FAILED, str(failure.get("error") or "failed (no message)")
    else:  # interrupted (resumable, with how to resume), killed, or still running
        status, error = UNFINISHED, (str(interruption.get("error")) if interruption else None)
    return RunRecord(
        directory=directory,
        name=directory.name,
        overrides=[str(o) for o in overrides],
        config=_load_config(directory),
        results=results,
        status=status,
        error=error,
        choices=_choices(directory),
    )


def _choices(directory: Path) -> dict:
    hydra = (_read_yaml(directory / ".hydra" / "hydra.yaml") or {}).get("hydra") or {}
    choices = (hydra.get("runtime") or {}).get("choices") or {}
    return {str(k): v for k, v in choices.items() if not str(k).startswith("hydra")}


def find_run_dirs(root: Path) -> list[Path]:
    """Run directories under `root`, in job order. A run directory is not searched further: it holds other
    `config.yaml` files (W&B's, the exported student's) that are not runs."""
    if _is_run_dir(root):
        return [root]
    found = []
    for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found += find_run_dirs(child)
    return sorted(found, key=lambda p: _job_order(p, root))


def _is_run_dir(path: Path) -> bool:
    return any((path / name).exists() for name in (".hydra", RESULTS, FAILURE_MARKER, INTERRUPTION_MARKER))


def _job_order(path: Path, root: Path) -> tuple:
    # Hydra numbers jobs 0, 1, ..., 10: sort numerically, not as text
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.relative_to(root).parts)


def _load_config(directory: Path) -> dict:
    resolved = _read_yaml(directory / CONFIG)
    if isinstance(resolved, dict):
        return resolved
    raw = directory / ".hydra" / "config.yaml"
    if not raw.is_file():
        return {}
    from omegaconf import OmegaConf

    from kdlab.run.resolvers import register_resolvers

    register_resolvers()
    return _resolve_loosely(OmegaConf.load(raw))


def _resolve_loosely(node: Any) -> Any:
    """A container of `node`, each value resolved where it can be: a job that failed before writing config.yaml
    leaves only Hydra's unresolved copy, whose `${hydra:...}` values cannot resolve outside the job."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, DictConfig):
        raw = OmegaConf.to_container(node, resolve=False)
        out = {}
        for key in raw:
            try:
                out[key] = _resolve_loosely(node[key])
            except Exception:
                out[key] = raw[key]
        return out
    if isinstance(node, ListConfig):
        try:
            return OmegaConf.to_container(node, resolve=True)
        except Exception:
            return OmegaConf.to_container(node, resolve=False)
    return node


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _lookup(config: Mapping, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


def flatten(config: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"loss.beta": 0.5, ...}: every leaf of a nested config under its dotted key (lists stay whole)."""
    flat = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True, default=str)
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return value


def detect_swept_keys(runs: list[RunRecord]) -> list[str]:
    """The dotted config keys whose values differ between runs and that the sweep itself varied.

    A key set on the command line (`loss.beta=0.1,0.9`, `seed=1,2`) counts when its values differ. A group choice
    (`loss=fkl,jsd`) counts through `<group>.name`, plus those keys under the group that the names alone do not
    determine (loss.beta for jsd at several betas, but not each field of a different teacher). Without overrides on
    disk, every differing key counts that the keys already found do not determine.
    """
    configs = [flatten(run.config) for run in runs if run.config]
    if len(configs) < 2:
        return []
    keys = sorted({key for config in configs for key in config})
    values = {key: [_hashable(config.get(key)) for config in configs] for key in keys}
    differing = [key for key in keys if len(set(values[key])) > 1 and not key.startswith(NOT_PARAMETERS)]
    override_keys = _override_keys(runs)
    leaves = {key for key in override_keys if key in keys and not any(k.startswith(key + ".") for k in keys)}
    groups = override_keys - leaves  # group choices (loss=jsd), or overrides that name no config node
    kept = [key for key in differing if key in leaves]
    for group in sorted(groups):
        if f"{group}.name" in differing:
            kept.append(f"{group}.name")
    candidates = [key for key in differing if any(key.startswith(group + ".") for group in groups)]
    if not override_keys or any(not any(k.startswith(g + ".") for k in keys) for g in groups):
        candidates = differing  # no overrides on disk, or experiment=/debug=: any key may have been set
    for key in candidates:
        if key not in kept and not _determined(values, kept, key):
            kept.append(key)
    if STUDENT_FRACTION in differing and STUDENT_FRACTION not in kept:
        # lambda is the experiment's axis (the table's columns) even where a policy preset set it (policy=onpolicy)
        kept.append(STUDENT_FRACTION)
    return sorted(kept, key=_key_order)


def _override_keys(runs: Iterable[RunRecord]) -> set[str]:
    keys = set()
    for run in runs:
        for override in run.overrides:
            key = override.split("=", 1)[0].lstrip("+~")
            keys.add(key.split("@", 1)[0])  # `loss@pkg=...`: the group is what was chosen
    return keys


def _determined(values: Mapping[str, list], by: list[str], key: str) -> bool:
    """True when runs that agree on every key of `by` also agree on `key`."""
    seen: dict[tuple, Any] = {}
    for i, value in enumerate(values[key]):
        signature = tuple(values[k][i] for k in by)
        if seen.setdefault(signature, value) != value:
            return False
    return True


def _key_order(key: str) -> tuple:
    # the method first, then the other hyper-parameters, the student fraction, and the seed last
    return (not key.startswith("loss."), key == SEED, key == STUDENT_FRACTION, key)


def _headline_metric(runs: list[RunRecord]) -> str:
    for run in runs:
        if run.results and run.results.get("metric"):
            return str(run.results["metric"])
    for run in runs:
        if run.get("task.metric_key"):
            return str(run.get("task.metric_key"))
    return "accuracy"


def _wandb_group(runs: list[RunRecord]) -> str | None:
    for run in runs:
        group = run.get("logger.wandb.group")
        if group:
            return str(group)
    return None
