"""The reports committed under docs/ are what `kdlab-report` writes from their own `runs.csv`.

Each committed `runs.csv` holds every number its report shows, and its `directory` column is relative to the sweep
(kdlab.report.tables.relative_directory), so the run directories can be rebuilt anywhere: each row becomes a run
directory holding the results.json the run wrote (the row's scores and sizes), its overrides, and the config its
sweep file composes to with them, with the group options Hydra records. `kdlab-report`'s writer on those directories
gives back the committed runs.csv and differences.csv byte for byte, and report.md but for its first line (which
names the directory it was given) and its learning-curves figure (drawn from each run's csv/metrics.csv, which is not
committed: the PNG is the only record)."""

from __future__ import annotations

import copy
import csv
import functools
import json
from pathlib import Path

import pytest
import yaml

from kdlab.report.markdown import write_report
from kdlab.report.runs import load_sweep
from kdlab.report.tables import RESULT_FIELDS, TRAIN_FIELDS
from kdlab.run.rundir import CONFIG, RESULTS
from tests.conftest import REPO

DOCS = REPO / "docs"
# docs/onpolicy_methods.md's baselines: SFT and the GKD grid's arms, which every new method is paired with
ONPOLICY_BASELINES = ("sft policy=supervised", "fkl policy=supervised", "fkl policy=onpolicy",
                      "jsd(0.9) policy=supervised", "jsd(0.9) policy=onpolicy", "rkl policy=supervised",
                      "rkl policy=onpolicy")
# report folder -> (the sweep file its runs were composed from, the metric compared, the --against baselines)
REPORTS = {
    "gkd_grid": ("gkd_decided", None, ()),
    "gkd_grid/own_fkl": ("gkd_decided", "own_fkl", ()),
    "gkd_grid/own_rkl": ("gkd_decided", "own_rkl", ()),
    "gkd_grid/own_teacher_nll": ("gkd_decided", "own_teacher_nll", ()),
    "gkd_grid/steps100": ("gkd_grid", None, ()),
    "cross_tokenizer": ("xtok_decided", None, ()),
    "cross_tokenizer/variants": ("xtok_decided", None, ()),
    **{folder: ("onpolicy_methods", metric, ONPOLICY_BASELINES) for folder, metric in (
        ("onpolicy_methods", None), ("onpolicy_methods/own_teacher_nll", "own_teacher_nll"),
        ("onpolicy_methods/own_fkl", "own_fkl"), ("onpolicy_methods/own_rkl", "own_rkl"))},
    "onpolicy_methods/k1_diagnostic": ("onpolicy_methods", None, ()),  # SKD + fkl at K = 1, seeds 1-2
}


def _number(text: str) -> int | float:
    return float(text) if any(c in text for c in ".eE") or text in ("nan", "inf") else int(text)


def _scores(row: dict, prefix: str) -> dict | None:
    scores = {key.split("/", 1)[1]: _number(value) for key, value in row.items()
              if key.startswith(prefix + "/") and value != ""}
    return scores or None


@functools.lru_cache(maxsize=None)
def _composed(sweep_file: str, overrides: tuple[str, ...]) -> dict:
    """The job's config, unresolved, without its hydra node (the reports of one grid share their jobs)."""
    from omegaconf import OmegaConf

    from tests.run.test_sweeps import compose_sweep

    config = OmegaConf.to_container(compose_sweep(sweep_file, list(overrides)), resolve=False)
    choices = config.pop("hydra")["runtime"]["choices"]
    return {"config": config, "choices": choices}


def rebuild_runs(runs_csv: Path, sweep_file: str, root: Path) -> None:
    """One run directory per row of `runs_csv` under `root`, at the row's relative `directory`."""
    from omegaconf import OmegaConf

    with runs_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        assert not Path(row["directory"]).is_absolute(), row["directory"]  # relative to the sweep
        run = root / row["directory"]
        overrides = row["overrides"].split()
        composed = _composed(sweep_file, tuple(overrides))
        config = copy.deepcopy(composed["config"])
        config["output_dir"] = str(run)
        config = OmegaConf.to_container(OmegaConf.create(config), resolve=True)
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        # the group options the job composed, as Hydra records them (a report names a group's option by them)
        (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": dict(
            composed["choices"])}}}))
        (run / CONFIG).write_text(yaml.safe_dump(config))
        results = {"metric": "accuracy", "metrics": _scores(row, "student_after"),
                   "student_before": _scores(row, "student_before"), "teacher": _scores(row, "teacher"),
                   **{key: _number(row[key]) for key in RESULT_FIELDS if row[key] != ""}}
        train = {key: _number(row[f"train/{key}"]) for key in TRAIN_FIELDS if row.get(f"train/{key}", "") != ""}
        if train:
            results["train"] = train
        assert row["status"] == "finished"  # every committed run finished: results.json is all it needs
        (run / RESULTS).write_text(json.dumps(results))


@pytest.mark.parametrize("folder", list(REPORTS))
def test_the_committed_report_is_what_kdlab_report_writes_from_its_runs_csv(folder, tmp_path):
    committed = DOCS / folder
    sweep_file, metric, baselines = REPORTS[folder]
    root = tmp_path / "runs"
    rebuild_runs(committed / "runs.csv", sweep_file, root)
    sweep = load_sweep(root)
    if metric:
        sweep.metric = metric
    out = tmp_path / "report"
    write_report(sweep, out, baselines=list(baselines))
    for name in ("runs.csv", "differences.csv"):
        if (committed / name).exists():
            assert (out / name).read_bytes() == (committed / name).read_bytes(), name
    ours, theirs = (out / "report.md").read_text(), (committed / "report.md").read_text()
    theirs = theirs.replace("\n![learning curves](learning_curves.png)\n", "")
    assert ours.split("\n", 1)[1] == theirs.split("\n", 1)[1]
