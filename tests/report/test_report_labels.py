"""kdlab-report on runs that are not one grid (a baseline and one-off changes, as `outputs/runs/<date>` holds after
an afternoon of recipes): rows are labelled by what sets each run apart, never by null or shared settings; teachers
are never averaged into one reference; a lambda sweep reads as one. The run directories are written here from the
configs `python train.py <overrides>` composes, with Hydra's record of each run's group choices."""

from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from kdlab.report.cli import main as report_main
from kdlab.report.markdown import report_markdown
from kdlab.report.runs import load_sweep
from kdlab.report.tables import (
    column_key,
    compare,
    comparison_table_markdown,
    fixed_settings,
    reference_scores,
    row_labels,
)
from kdlab.run.rundir import CONFIG, RESULTS
from tests.report.test_report import _cells


def _run(root: Path, name: str, overrides: list[str], accuracy: float, teacher: float | None = None,
         before: float | None = 0.36, hydra_record: bool = True) -> Path:
    """A finished run of `python train.py <overrides>`: its resolved config, overrides, Hydra's choices, results."""
    from hydra import compose, initialize_config_dir

    from kdlab.run.compose import expand_overrides
    from kdlab.run.resolvers import register_resolvers
    from tests.conftest import CONF_DIR

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*expand_overrides(overrides), "output_dir=/unused"],
                      return_hydra_config=True)
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    config = OmegaConf.to_container(cfg, resolve=False)
    config.pop("hydra")
    config = OmegaConf.to_container(OmegaConf.create(config), resolve=True)
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if hydra_record:
        (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))
    (run / CONFIG).write_text(yaml.safe_dump(config))
    results = {"metric": "accuracy", "metrics": {"accuracy": accuracy}, "steps": 4,
               "teacher": None if teacher is None else {"accuracy": teacher},
               "student_before": None if before is None else {"accuracy": before}}
    (run / RESULTS).write_text(__import__("json").dumps(results))
    return run


@pytest.fixture(scope="module")
def afternoon(tmp_path_factory):
    """The README's recipes, one run each, all `debug=limit`: the default, a reward, LoRA, two teachers, an
    experiment file, and lambda set by hand."""
    root = tmp_path_factory.mktemp("runs")
    _run(root, "default", ["debug=limit"], 0.19, teacher=0.5625)
    _run(root, "reward", ["reward=arith_correct", "debug=limit"], 0.06, teacher=0.5625)
    _run(root, "lora", ["student.lora.r=16", "student.lora.target_modules=[q_proj,v_proj]", "debug=limit"], 0.07)
    _run(root, "pair", ["teacher=arith_pair", "debug=limit"], 0.12, teacher=0.25)  # as runs before it was refused
    _run(root, "experiment", ["experiment=gkd_onpolicy_jsd", "debug=limit"], 0.13)
    _run(root, "lambda0", ["policy.student_fraction=0", "debug=limit"], 0.08)
    return root


def test_runs_beside_a_baseline_are_labelled_by_what_sets_each_apart(afternoon):
    sweep = load_sweep(afternoon)
    assert column_key(sweep) == "policy.student_fraction"  # lambda is the table's columns
    labels = {Path(run).name: label for run, label in row_labels(sweep, column_key(sweep)).items()}
    # the experiment is JSD(0.9) on-policy: lambda 1, its column
    assert labels == {"default": "jsd(0.5)", "reward": "jsd(0.5) reward=arith_correct",
                      "lora": "jsd(0.5) r=16 target_modules=[q_proj,v_proj]", "pair": "jsd(0.5) teacher=arith_pair",
                      "experiment": "jsd(0.9)", "lambda0": "jsd(0.5)"}
    # the default and lambda=0 runs are one row, two columns
    cells = _cells(comparison_table_markdown(sweep))
    assert cells[("jsd(0.5)", "λ=0.5")].startswith("**0.1900**") and cells[("jsd(0.5)", "λ=0")].startswith("**0.0800")
    assert "policy.student_fraction" in sweep.swept_keys
    report = report_markdown(sweep)
    for junk in ("None", "alpha=", "dir=", "name=", "all-linear", "policy.name=mixed"):
        assert junk not in report.split("## Comparison")[1].split("## Paired")[0], junk


def test_different_teachers_each_keep_their_own_reference(afternoon, tmp_path):
    sweep = load_sweep(afternoon)
    # 0.5625 twice for the shipped teacher, 0.25 for the pair: never their mean 0.4583 (nor 0.4844 over three runs)
    assert reference_scores(sweep.runs, "accuracy") == {"teacher": {"arith_teacher": 0.5625, "arith_pair": 0.25},
                                                        "student_before": {"arith_student": pytest.approx(0.36)}}
    assert report_main([str(afternoon), "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert ("For reference: teacher `arith_teacher` 0.5625, teacher `arith_pair` 0.2500, student before training "
            "0.3600") in report
    assert "0.4583" not in report and "teacher 0." not in report


def test_one_teacher_keeps_one_unnamed_reference(tmp_path):
    _run(tmp_path, "0", ["loss=fkl"], 0.3, teacher=0.6)
    _run(tmp_path, "1", ["loss=rkl"], 0.2, teacher=0.64)
    sweep = load_sweep(tmp_path)
    assert reference_scores(sweep.runs, "accuracy")["teacher"] == {"arith_teacher": pytest.approx(0.62)}
    assert "For reference: teacher 0.6200, student before training 0.3600" in report_markdown(sweep)


def test_several_teachers_without_hydras_record_are_named_by_their_choice(tmp_path):
    """A run directory without .hydra/hydra.yaml (copied by hand) still names the two-teacher run by its override,
    not `teacher.name=None`."""
    _run(tmp_path, "0", [], 0.2, teacher=0.6, hydra_record=False)
    _run(tmp_path, "1", ["teacher=arith_pair"], 0.1, teacher=0.3, hydra_record=False)
    sweep = load_sweep(tmp_path)
    labels = sorted(row_labels(sweep).values())
    # two runs, no baseline among them: both are named (the first by its model's name: it chose no option)
    assert labels == ["jsd(0.5) teacher=arith-teacher", "jsd(0.5) teacher=arith_pair"]
    assert set(reference_scores(sweep.runs, "accuracy")["teacher"]) == {"arith-teacher", "arith_pair"}


def test_a_lambda_sweep_by_policy_presets_reads_as_lambda(tmp_path):
    """policy=supervised,mixed,onpolicy sets lambda 0, 0.5, 1: lambda is swept and spread over the columns, the
    preset (which lambda determines) adds nothing to the rows, and no `policy.name` is called fixed."""
    job = 0
    for loss in ("fkl", "rkl"):
        for policy in ("supervised", "mixed", "onpolicy"):
            _run(tmp_path, str(job), [f"loss={loss}", f"policy={policy}"], 0.1 + 0.01 * job)
            job += 1
    sweep = load_sweep(tmp_path)
    assert "policy.student_fraction" in sweep.swept_keys
    comparison = compare(sweep)
    assert comparison.column_key == "policy.student_fraction" and comparison.rows == ["fkl", "rkl"]
    assert comparison.columns == [0.0, 0.5, 1.0]
    assert "policy.name" not in fixed_settings(sweep)


def test_a_lambda_sweep_of_the_mixed_policy_does_not_call_the_policy_fixed(tmp_path):
    for job, fraction in enumerate((0, 0.5, 1)):
        _run(tmp_path, str(job), [f"policy.student_fraction={fraction}"], 0.1 + 0.01 * job)
    sweep = load_sweep(tmp_path)
    assert sweep.swept_keys == ["policy.student_fraction"]
    assert "policy.name" not in fixed_settings(sweep) and fixed_settings(sweep)["loss.name"] == "jsd"
    assert "`policy.name=mixed`" not in report_markdown(sweep)
