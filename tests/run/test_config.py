"""Every config option composes; overrides land where they should; bad values fail at start-up naming the fix."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kdlab.run.train import validate
from kdlab.run.validate import ConfigError, config_errors
from tests.conftest import CONF_DIR, compose

GROUPS = ["task", "model", "teacher", "loss", "policy", "reward", "trainer", "trainer/strategy", "logger",
          "experiment", "debug"]


def _options(group: str) -> list[str]:
    """A group's options: its files, less the partials (`_defaults.yaml`) that options include."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


def _leaves(node: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# Options that are only valid together with others (no teacher means SFT).
COMPANIONS = {"teacher=none": ["loss=sft", "policy=supervised"], "loss=sft": ["policy=supervised"],
              "loss=rkl_sampled": ["policy=onpolicy"],  # it weighs the student's own samples only
              "teacher=cached": ["teacher.dir=/a/cache", "policy=supervised"],  # validated without reading it
              "teacher=remote": ["teacher.url=http://127.0.0.1:8000"],
              "task=chat": ["task.data.path=/a/folder"]}  # chat-format data names no hub dataset of its own


# conf/model serves both roles: each preset composes as `student=` and as `teacher=`
CHOICES = [(role, o) for g in GROUPS for role in (("student", "teacher") if g == "model" else (g,))
           for o in _options(g)]


@pytest.mark.parametrize("group,option", CHOICES)
def test_every_option_composes_resolves_and_validates(group, option, tmp_path):
    override = f"{group}={option}"
    cfg = compose([override, *COMPANIONS.get(override, [])], output_dir=tmp_path)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert config_errors(cfg) == []


def test_task_files_leave_shared_values_to_their_defaults():
    """Each task default lives once: a task file sets only what differs from `_defaults.yaml` (and, for datasets,
    `_dataset.yaml`), so changing a shared default cannot miss a task."""
    import yaml

    shared = {name: _leaves(yaml.safe_load((CONF_DIR / "task" / f"{name}.yaml").read_text()))
              for name in ("_defaults", "_dataset")}
    for option in _options("task"):
        own = yaml.safe_load((CONF_DIR / "task" / f"{option}.yaml").read_text())
        assert own["defaults"][-1] == "_self_" and own["defaults"][0] in shared, option
        for base in shared.values():
            repeated = {k: v for k, v in _leaves(own).items() if k in base and base[k] == v and k != "defaults"}
            assert repeated == {}, f"conf/task/{option}.yaml repeats {repeated}"


def test_each_group_has_options():
    for group in GROUPS:
        assert _options(group), f"conf/{group}/ is empty"


def test_default_config_is_the_embedded_arith_distillation(tmp_path):
    cfg = compose([], output_dir=tmp_path)
    assert (cfg.task.name, cfg.loss.name, cfg.policy.student_fraction) == ("arith", "jsd", 0.5)
    assert Path(cfg.teacher.path).is_dir() and Path(cfg.student.path).is_dir()
    assert config_errors(cfg) == []


def test_overrides_land(tmp_path):
    cfg = compose(["loss=rkl", "policy=onpolicy", "seed=3"], output_dir=tmp_path)
    assert cfg.loss.name == "rkl" and cfg.policy.student_fraction == 1.0 and cfg.seed == 3
    cfg = compose(["loss=jsd", "loss.beta=0.9", "policy.student_fraction=0.25"], output_dir=tmp_path)
    assert cfg.loss.beta == 0.9 and cfg.policy.student_fraction == 0.25


def test_ot_released_code_variant_sets_the_released_settings_and_keeps_overrides(tmp_path):
    from kdlab.run.resolvers import method_label

    def loss(*overrides):
        cfg = compose(["loss=ot", "teacher=arith_unigram_teacher", *overrides], output_dir=tmp_path)
        return OmegaConf.to_container(cfg.loss, resolve=True)

    paper, released = loss(), loss("loss.variant=released_code")
    assert (paper["alpha"], paper["sinkhorn_iterations"]) == (0.15, 20)
    assert (released["alpha"], released["sinkhorn_iterations"]) == (1.5, 10)
    assert loss("loss.variant=released_code", "loss.alpha=0.3")["alpha"] == 0.3
    assert (method_label(paper), method_label(released)) == ("ot", "ot(released_code)")


def test_teacher_none_means_no_teacher(tmp_path):
    cfg = compose(["teacher=none", "loss=sft", "policy=supervised"], output_dir=tmp_path)
    assert cfg.teacher is None and config_errors(cfg) == []


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["policy.student_fraction=1.5"], "policy.student_fraction=1.5 is outside [0, 1]"),
        (["loss.beta=1.2"], "loss.beta=1.2 is outside [0, 1]"),
        (["loss=skl", "loss.alpha=-0.1"], "loss.alpha=-0.1 is outside [0, 1]"),
        (["+task.batchsize=4"], "task.batchsize is not a task field; did you mean task.batch_size?"),
        (["loss=fkl", "teacher=none"], "pick a teacher or use loss=sft"),
        (["loss=sft", "policy=onpolicy"], "use policy=supervised"),
        (["+loss.gamma=1"], "loss.gamma does not apply to loss=jsd"),
        (["loss=ot", "teacher=arith_unigram_teacher", "+loss.beta_typo=1"], "loss.beta_typo does not apply to loss=ot"),
        (["loss._target_=tests.no_such_module.my_loss"], "loss._target_=tests.no_such_module.my_loss cannot be loaded"),
        (["~loss._target_"], "loss=jsd names no loss function: set loss._target_"),
        (["loss=ot", "teacher=arith_unigram_teacher", "~loss.gamma"], "loss.gamma is missing"),
        (["loss.temperature=0"], "loss.temperature=0 must be > 0"),
        (["policy.sampling.top_p=0"], "top_p=0 must be in (0, 1]"),
        (["policy=seqkd", "teacher=none", "loss=sft"], "samples from the teacher but teacher=null"),
        (["loss=ot", "teacher=arith_unigram_teacher", "loss.variant=authors"], "loss.variant=authors is unknown"),
        (["score_groups=0"], "score_groups=0 must be a positive integer"),
        (["nonfinite.max_consecutive_steps=0"], "nonfinite.max_consecutive_steps=0 must be a positive integer"),
        (["loss.reduction=mean"], "loss.reduction=mean is unknown; choose one of"),
    ],
)
def test_bad_values_fail_with_the_fix(overrides, message, tmp_path):
    cfg = compose(overrides, output_dir=tmp_path)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert message in str(err.value)


def test_run_settings_fail_at_start_up_before_any_model_loads(tmp_path, monkeypatch):
    """score_groups and nonfinite were checked by the module, once both models had loaded; now by the config."""
    import kdlab.models.loading
    import kdlab.run.build
    from kdlab.run.train import run

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(kdlab.models.loading, "load_model", no_loading)  # teachers (kdlab.teachers.build)
    monkeypatch.setattr(kdlab.run.build, "load_model", no_loading)  # the student
    cfg = compose(["score_groups=-1", "nonfinite.max_consecutive_steps=0"], output_dir=tmp_path)
    with pytest.raises(ConfigError) as err:
        run(cfg)
    assert "score_groups=-1 must be" in str(err.value) and "score_groups=1 scores one padded batch" in str(err.value)
    assert "nonfinite.max_consecutive_steps=0 must be" in str(err.value)


def test_all_problems_are_reported_at_once(tmp_path):
    cfg = compose(["policy.student_fraction=2", "loss.beta=3", "+task.foo=1"], output_dir=tmp_path)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    text = str(err.value)
    assert "student_fraction" in text and "loss.beta" in text and "task.foo" in text


def test_same_vocabulary_loss_with_different_tokenizers_stops(tmp_path):
    from kdlab.data.tokenizer import train_tokenizer

    other = train_tokenizer(["completely different text corpus " * 20, "with other words"], vocab_size=300)
    other.save_pretrained(tmp_path / "other_tokenizer")
    cfg = compose(["teacher=tiny", f"teacher.tokenizer={tmp_path / 'other_tokenizer'}", "loss=fkl"],
                  output_dir=tmp_path)
    with pytest.raises(ConfigError, match="different vocabularies") as err:
        validate(cfg)
    assert "loss=ot" in str(err.value) and "loss=uld" in str(err.value)
    # the shared-tokenizer pair passes
    cfg = compose(["teacher=tiny", "loss=fkl"], output_dir=tmp_path)
    validate(cfg)


def test_missing_local_model_path_is_reported_not_raised_deep(tmp_path):
    cfg = compose([f"student.path={tmp_path / 'nope'}"], output_dir=tmp_path)
    with pytest.raises(ConfigError, match="student:"):
        validate(cfg)


def test_unreachable_hub_model_gives_one_clear_error_naming_local_files(tmp_path):
    # HF_HUB_OFFLINE=1 (conftest) stands for a machine without network; the name is not in any local cache
    cfg = compose(["student.path=kdlab-test/not-a-cached-model"], output_dir=tmp_path)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    text = str(err.value)
    assert "kdlab-test/not-a-cached-model" in text and "student.path=/path/to/model_dir" in text
    assert "Traceback" not in text


def test_trainer_gpu_without_a_gpu_is_one_line_at_start_up(tmp_path):
    """trainer=gpu where torch sees no CUDA GPU: ConfigError naming the key and the fix, from train.py too, not
    Lightning's InstantiationException; with enough GPUs, nothing."""
    import subprocess
    import sys

    import torch

    from tests.conftest import REPO

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for devices in (1, visible + 1):
        cfg = compose(["trainer=gpu", f"trainer.devices={devices}"], output_dir=tmp_path)
        if visible >= devices:
            validate(cfg)
            continue
        with pytest.raises(ConfigError) as err:
            validate(cfg)
        assert (f"trainer.accelerator=gpu with trainer.devices={devices}, but torch sees {visible} CUDA GPU"
                in str(err.value)) and "use trainer=cpu" in str(err.value)
    if visible == 0:  # the whole entry point: the run stops before building a trainer, its error in one line
        done = subprocess.run([sys.executable, "train.py", "trainer=gpu", f"hydra.run.dir={tmp_path / 'run'}"],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 1 and "Traceback" not in done.stderr and "Instantiation" not in done.stderr
        problems = [line for line in done.stderr.splitlines() if line.startswith("  - ")]
        assert done.stderr.startswith("error: invalid config:") and len(problems) == 1
        assert "trainer.accelerator=gpu" in problems[0]
