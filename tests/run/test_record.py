"""What a run says about itself (kdlab.run.record): a directory name that tells runs apart, safe on any filesystem
and in a Hydra override, and the resolved choices results.json records."""

from __future__ import annotations

import re

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from kdlab.run.record import run_choices, run_name
from tests.conftest import compose

# The runs issue 34 found all named `*_arith_jsd`, and what each name must say.
RUNS = {
    "default": ([], "arith_arith-teacher_to_arith-student_jsd-0.5_mixed-0.5"),
    "reward": (["reward=arith_correct"], "arith_arith-teacher_to_arith-student_jsd-0.5_mixed-0.5_reward-"),
    "lora": (["student.lora.r=16"], "arith_arith-teacher_to_arith-student-lora16_jsd-0.5_mixed-0.5"),
    "two teachers": (["teacher=arith_pair"], "arith_arith-teacher+arith-student_to_arith-student_jsd-0.5_mixed-0.5"),
    "cached": (["teacher=cached", "teacher.dir=/a/cache", "policy=supervised"],
               "arith_cached_to_arith-student_jsd-0.5_supervised"),
    "experiment": (["experiment=gkd_onpolicy_jsd"], "arith_arith-teacher_to_arith-student_jsd-0.9_onpolicy"),
    "no teacher": (["teacher=none", "loss=sft", "policy=supervised"],
                   "arith_no-teacher_to_arith-student_sft_supervised"),
    "lambda": (["policy.student_fraction=0.25", "loss=fkl"], "arith_arith-teacher_to_arith-student_fkl_mixed-0.25"),
    "tags": (["tags=[baseline,try 2]"], "arith_arith-teacher_to_arith-student_jsd-0.5_mixed-0.5_baseline-try-2"),
}


def test_each_kind_of_run_has_a_name_of_its_own_that_says_what_ran():
    names = {label: run_name(compose(overrides)) for label, (overrides, _) in RUNS.items()}
    for label, (_, expected) in RUNS.items():
        assert names[label].startswith(expected), (label, names[label])
    assert len(set(names.values())) == len(names)


def test_names_are_safe_in_paths_and_in_a_hydra_override():
    parser = OverridesParser.create()
    for overrides, _ in RUNS.values():
        name = run_name(compose(overrides))
        assert re.fullmatch(r"[A-Za-z0-9._+-]+", name), name
        (parsed,) = parser.parse_overrides([f"hydra.run.dir=outputs/runs/2026-01-01/10-00-00_{name}"])
        assert not parsed.is_sweep_override() and parsed.value().endswith(name)


def test_hydra_names_the_run_and_the_sweep_directory_with_the_jobs_choices():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from kdlab.run.resolvers import register_resolvers
    from tests.conftest import CONF_DIR

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("train", overrides=["reward=arith_correct", "tags=[t1]"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        run_dir, sweep_dir = cfg.hydra.run.dir, cfg.hydra.sweep.dir
    finally:
        HydraConfig.instance().cfg = None
    assert re.fullmatch(r"outputs/runs/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d_arith_arith-teacher_to_arith-student_jsd-0.5_"
                        r"mixed-0.5_reward-arith_correct_t1", run_dir), run_dir
    assert re.fullmatch(r"outputs/multirun/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d_arith_t1", sweep_dir), sweep_dir


def test_choices_record_teacher_student_loss_policy_reward_lora_and_engine():
    choices = run_choices(compose(["teacher=arith_pair", "reward=arith_correct", "student.lora.r=8",
                                   "policy.student_fraction=0.25", "loss.beta=0.9"]))
    teacher = choices["teacher"]
    assert teacher["kind"] == "several" and teacher["combine"] == "mixture"
    members = {n: m["name"] for n, m in teacher["members"].items()}
    assert members == {"teacher": "arith-teacher", "peer": "arith-student"}
    assert choices["student"]["name"] == "arith-student"
    assert (choices["loss"]["name"], choices["loss"]["label"], choices["loss"]["beta"]) == ("jsd", "jsd(0.9)", 0.9)
    assert "_target_" not in choices["loss"]
    assert choices["policy"] == {"name": "mixed", "student_fraction": 0.25, "fixed_source": "ground_truth"}
    assert choices["reward"]["name"] == "FinalAnswerCorrect" and choices["reward"]["alpha"] == 0.5
    assert choices["lora"] == {"r": 8, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}
    assert choices["sampling_engine"] == "hf"  # no engine key: HF generate
    assert run_choices(compose(["policy.sampling.engine=vllm"]))["sampling_engine"] == "vllm"


@pytest.mark.parametrize("overrides, teacher", [
    ([], {"kind": "model", "name": "arith-teacher"}),
    (["teacher=none", "loss=sft", "policy=supervised"], None),
    (["teacher=cached", "teacher.dir=/a/cache", "policy=supervised"], {"kind": "cached", "dir": "/a/cache"}),
    (["teacher=remote", "teacher.url=http://127.0.0.1:8000"], {"kind": "remote", "url": "http://127.0.0.1:8000"}),
])
def test_choices_name_each_kind_of_teacher(overrides, teacher):
    got = run_choices(compose(overrides))
    assert (got["teacher"] is None) == (teacher is None)
    for key, value in (teacher or {}).items():
        assert got["teacher"][key] == value
    assert got["lora"] is None and got["reward"] is None
