"""The ready sweeps in sweeps/: every job they launch composes and validates; Optuna runs a real 2-trial search."""

import json
import subprocess
import sys

import pytest
import yaml

from kdlab.run.rundir import CONFIG, RESULTS
from tests.conftest import CONF_DIR, REPO

SWEEPS_DIR = REPO / "sweeps"
SWEEPS = ["gkd_grid", "ot_ablation", "optuna_search"]
# A fast job: tiny random models, two steps, four validation problems, only the final score (no export).
TINY_JOB = [
    "teacher=tiny", "student=tiny", "trainer.max_steps=2", "trainer.log_every_n_steps=1", "task.train_size=32",
    "task.val_size=4", "task.eval_examples=4", "task.batch_size=4", "task.eval_batch_size=4",
    "task.generation.max_new_tokens=8", "policy.sampling.max_new_tokens=8", "eval.teacher=false",
    "eval.before=false", "export=false",
]


def compose_sweep(name: str, overrides: list[str]):
    """The config one job of `python train.py -m -cd sweeps -cn <name> <overrides>` runs, composed in-process."""
    from hydra import compose, initialize_config_dir

    from kdlab.run.compose import expand_overrides
    from kdlab.run.resolvers import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(SWEEPS_DIR), version_base="1.3"):
        overrides = [f"hydra.searchpath=[file://{CONF_DIR}]", *expand_overrides(overrides), "output_dir=/tmp/unused"]
        return compose(config_name=name, overrides=overrides, return_hydra_config=True)


def basic_sweep_values(params) -> dict[str, list[str]]:
    return {key: str(value).split(",") for key, value in params.items()}


@pytest.mark.parametrize("name", ["gkd_grid", "ot_ablation", "gkd_decided", "xtok_decided", "onpolicy_methods"])
def test_every_value_of_every_swept_key_composes_and_validates(name):
    """Each value of each key a sweep varies gives a valid config (validated as train.py would, models not loaded):
    a typo in a loss option or a key that does not apply would otherwise surface only when its job starts."""
    from kdlab.run.validate import config_errors

    params = basic_sweep_values(compose_sweep(name, []).hydra.sweeper.params)
    base = compose_sweep(name, ["loss=ot"]).loss
    for key, values in params.items():
        for value in values:
            cfg = compose_sweep(name, [f"{key}={value}"])
            assert config_errors(cfg) == [], (key, value)
            if key == "loss" and value.startswith("jsd"):  # jsd0.1 is loss=jsd with beta 0.1
                assert cfg.loss.name == "jsd" and cfg.loss.beta == float(value[3:])
            if key == "loss" and value.startswith("ot_"):  # one setting changed from the paper's ot
                changed = {k for k in cfg.loss if cfg.loss[k] != base[k]}
                assert cfg.loss.name == "ot" and len(changed) == 1, (value, changed)


def test_gkd_grid_is_the_papers_grid_and_takes_the_small_run_overrides():
    cfg = compose_sweep("gkd_grid", [])
    params = basic_sweep_values(cfg.hydra.sweeper.params)
    assert params == {"loss": ["fkl", "rkl", "jsd0.1", "jsd0.5", "jsd0.9"],
                      "policy.student_fraction": ["0", "0.5", "1"], "seed": ["1", "2", "3"]}
    small = compose_sweep("gkd_grid", ["trainer.max_steps=7", "hydra.sweep.dir=/tmp/grid"])
    assert small.trainer.max_steps == 7 and small.scheduler.total_steps == 7 and small.hydra.sweep.dir == "/tmp/grid"
    assert small.export is False and small.keep_checkpoints is False  # small outputs by default; both can be true
    kept = compose_sweep("gkd_grid", ["export=true", "keep_checkpoints=true"])
    assert kept.export is True and kept.keep_checkpoints is True
    assert small.task.name == "arith" and small.teacher.name == compose_sweep("gkd_grid", []).teacher.name


def test_the_deciding_sweeps_keep_the_protocol_of_issue_18():
    """400 steps and 1,000 scored validation problems (one run's standard error <= 0.016), the students kept for
    kdlab-mismatch, the teacher and the untrained student scored once rather than in every run."""
    grid, xtok = compose_sweep("gkd_decided", []), compose_sweep("xtok_decided", [])
    assert basic_sweep_values(grid.hydra.sweeper.params) == {
        "loss": ["fkl", "rkl", "jsd0.9"], "policy.student_fraction": ["0", "1"], "seed": ["1", "2", "3", "4", "5"]}
    assert basic_sweep_values(xtok.hydra.sweeper.params) == {"loss": ["ot", "uld", "sft"], "seed": ["1", "2", "3"]}
    assert xtok.teacher.name == compose_sweep("ot_ablation", ["teacher=arith_unigram_teacher"]).teacher.name
    assert xtok.policy.student_fraction == 0 and xtok.trainer.max_steps == 400
    for cfg in (grid, xtok):
        assert cfg.trainer.max_steps == 400 and cfg.task.val_size == 1000 and cfg.task.eval_examples == 1000
        assert cfg.eval.teacher is False and cfg.eval.before is False
    assert grid.export is True and xtok.export is False


def test_the_onpolicy_methods_sweep_has_issue_33s_arms_at_the_decided_protocol():
    """Each arm (sweeps/method/) is the loss, policy and lambda issue 33 compares, at 400 steps, 1,000 problems and
    seeds 1-5, with the shipped pair of the GKD grid."""
    cfg = compose_sweep("onpolicy_methods", [])
    params = basic_sweep_values(cfg.hydra.sweeper.params)
    assert params["seed"] == ["1", "2", "3", "4", "5"]
    arms = {}
    for method in params["method"]:
        arm = compose_sweep("onpolicy_methods", [f"method={method}"])
        assert arm.trainer.max_steps == 400 and arm.task.val_size == 1000 and arm.task.eval_examples == 1000
        assert arm.teacher.name == cfg.teacher.name and arm.student.name == cfg.student.name
        arms[method] = (arm.loss.name, arm.loss.get("beta"), arm.policy.name, arm.policy.student_fraction)
    assert arms == {
        "sft": ("sft", None, "supervised", 0.0),
        **{f"{loss}_lambda{lam}": (loss[:3], 0.9 if loss == "jsd0.9" else None,
                                    "supervised" if lam == 0 else "onpolicy", float(lam))
           for loss in ("fkl", "rkl", "jsd0.9") for lam in (0, 1)},
        "skd_jsd0.9": ("jsd", 0.9, "speculative", 1.0), "skd_fkl": ("fkl", None, "speculative", 1.0),
        "rkl_sampled": ("rkl_sampled", None, "onpolicy", 1.0),
    }
    assert compose_sweep("onpolicy_methods", ["method=skd_fkl"]).policy.speculative.top_k == 25


@pytest.mark.slow
def test_optuna_search_runs_two_trials_and_reports_the_best(tmp_path):
    """A real 2-trial Optuna search (hydra-optuna-sweeper) on tiny models: each trial's value is its results.json
    accuracy, and the best value Optuna reports is the best of those."""
    sweep_dir = tmp_path / "optuna"
    cmd = [sys.executable, "train.py", "-m", "-cd", "sweeps", "-cn", "optuna_search", f"hydra.sweep.dir={sweep_dir}",
           "hydra.sweeper.n_trials=2", *TINY_JOB]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert [p.name for p in trials] == ["0", "1"]
    results = [json.loads((p / RESULTS).read_text()) for p in trials]
    lrs = [yaml.safe_load((p / CONFIG).read_text())["optimizer"]["lr"] for p in trials]
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs) and lrs[0] != lrs[1]  # drawn from the search space
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(r["metrics"]["accuracy"] for r in results)
    assert set(best["best_params"]) == {"optimizer.lr", "loss.beta", "policy.student_fraction"}
