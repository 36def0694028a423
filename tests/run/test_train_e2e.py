"""End to end: `run(cfg)` on tiny models for every loss and policy preset, the run-directory contract, `train.py`."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from kdlab.run.rundir import CONFIG, RESULTS, STUDENT, last_checkpoint
from kdlab.run.train import run
from tests.conftest import REPO, TINY_RUN, compose

pytestmark = pytest.mark.slow

LOSSES = ["sft", "fkl", "rkl", "jsd", "tvd", "skl", "srkl"]
POLICIES = ["supervised", "onpolicy", "mixed", "seqkd"]


def _run(tmp_path, overrides):
    cfg = compose(TINY_RUN + overrides, output_dir=tmp_path)
    value = run(cfg)
    return value, json.loads((tmp_path / RESULTS).read_text())


@pytest.mark.parametrize("loss", LOSSES)
def test_each_loss_runs_end_to_end(tmp_path, loss):
    extra = ["teacher=none", "policy=supervised"] if loss == "sft" else []
    value, results = _run(tmp_path, [f"loss={loss}", *extra])
    assert results["steps"] == 3 and results["loss"] == loss
    assert 0.0 <= value <= 1.0 and results["metrics"]["accuracy"] == value
    assert (results["teacher"] is None) == (loss == "sft")
    metrics = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/loss" in metrics and f"train/{'ce' if loss == 'sft' else loss}" in metrics


@pytest.mark.parametrize("policy,fraction", [("supervised", 0.0), ("onpolicy", 1.0), ("mixed", None), ("seqkd", 0.0)])
def test_each_policy_preset_runs_and_reports_the_fraction_used(tmp_path, policy, fraction):
    _, results = _run(tmp_path, [f"policy={policy}", "trainer.max_steps=4"])
    assert results["student_fraction"] == {"supervised": 0.0, "onpolicy": 1.0, "mixed": 0.5, "seqkd": 0.0}[policy]
    if fraction is not None:
        assert results["onpolicy_fraction"] == fraction
    else:  # the draws of steps 0..3 under seed 0, recomputed here
        from kdlab.run.build import build_policy

        policy = build_policy(compose(["policy=mixed", "seed=0"]))
        expected = sum(policy.draw(s) == "student" for s in range(4)) / 4
        assert results["onpolicy_fraction"] == expected


def test_run_directory_contract(tmp_path):
    _, results = _run(tmp_path, ["policy=onpolicy"])
    for key in ("metrics", "teacher", "student_before", "student_after", "steps", "wall_time_s", "tokens_per_sec"):
        assert key in results
    assert results["tokens_per_sec"] > 0 and results["train_tokens"] > 0
    # the training time and the whole run's apart; wall_time_s stays the training time for older readers
    assert 0 < results["train_time_s"] == results["wall_time_s"] < results["total_time_s"]
    assert results["choices"]["policy"] == {"name": "onpolicy", "student_fraction": 1.0, "fixed_source": "ground_truth"}
    assert results["choices"]["teacher"]["name"] == results["choices"]["student"]["name"] == "tiny-llama"
    assert results["overrides"] == []  # run(cfg) outside Hydra: no command line (train.py's are in test_resume.py)
    assert (tmp_path / CONFIG).is_file()
    # the reported scores are the GSM8K accuracy of the saved generations, recomputed here without evaluate
    from kdlab.data.answers import accuracy

    for name in ("teacher", "student_before", "student_after"):
        rows = [json.loads(line) for line in (tmp_path / "generations" / f"{name}.jsonl").read_text().splitlines()]
        assert len(rows) == 8
        expected = accuracy([r["prediction"] for r in rows], [r["reference"] for r in rows])
        assert results[name]["accuracy"] == pytest.approx(expected)
    checkpoint = torch.load(last_checkpoint(tmp_path), weights_only=False)
    assert checkpoint["global_step"] == 3
    assert checkpoint["state_dict"] and not any(k.startswith("teacher.") for k in checkpoint["state_dict"])
    export = tmp_path / STUDENT
    model = AutoModelForCausalLM.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert len(tokenizer) == model.config.vocab_size
    # the export is the trained student, not the teacher: same weights as the checkpoint's student
    weight = checkpoint["state_dict"]["student.model.embed_tokens.weight"]
    assert torch.equal(model.model.embed_tokens.weight, weight)


def test_compiled_sampling_trains_exactly_like_generate(tmp_path):
    """policy.sampling.compile (and the task's) draws the same tokens as generate under the same seed, so the whole
    on-policy run, from samples to losses to the evaluation's generations, is the same run."""
    from torch._dynamo.utils import counters

    runs, compiled_graphs = {}, {}
    for compile in ("false", "true"):
        before = counters["stats"]["unique_graphs"]
        _, results = _run(tmp_path / compile, ["policy=onpolicy", f"policy.sampling.compile={compile}",
                                               f"task.generation.compile={compile}"])
        losses = [line.split(",") for line in (tmp_path / compile / "csv" / "metrics.csv").read_text().splitlines()]
        column = losses[0].index("train/loss")
        runs[compile] = results, [row[column] for row in losses[1:] if row[column]]
        runs[compile] += ((tmp_path / compile / "generations" / "student_after.jsonl").read_text(),)
        compiled_graphs[compile] = counters["stats"]["unique_graphs"] - before
    assert compiled_graphs["false"] == 0 and compiled_graphs["true"] >= 2  # training's and evaluation's shapes
    (plain, plain_losses, plain_text), (compiled, compiled_losses, compiled_text) = runs["false"], runs["true"]
    assert len(plain_losses) == 3 and plain_losses == compiled_losses
    assert plain["train_tokens"] == compiled["train_tokens"] and plain["metrics"] == compiled["metrics"]
    assert plain_text == compiled_text


def test_encoder_decoder_models_use_the_same_path(tmp_path):
    _, results = _run(tmp_path, ["teacher=tiny_t5", "student=tiny_t5", "policy=mixed", "loss=jsd"])
    assert results["steps"] == 3
    assert AutoModelForSeq2SeqLM.from_pretrained(tmp_path / STUDENT).config.is_encoder_decoder


def test_resume_from_last_checkpoint_continues_the_step_count(tmp_path):
    _, first = _run(tmp_path, [])
    _, resumed = _run(tmp_path, ["ckpt_path=last", "trainer.max_steps=5"])
    assert resumed["steps"] == 5
    # it ran the 2 missing steps only, not 5 from scratch (about 2/3 of the first run's 3 steps of tokens)
    assert resumed["train_tokens"] < first["train_tokens"]


def test_wandb_logger_runs_offline_with_name_group_and_tags(tmp_path):
    _, results = _run(tmp_path, ["logger=wandb", "tags=[mine]"])
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and results["steps"] == 3
    cfg = compose(TINY_RUN + ["logger=wandb", "tags=[mine]"], output_dir=tmp_path)
    assert list(cfg.logger.wandb.tags) == ["arith", "jsd", "mixed", "mine"]
    assert cfg.logger.wandb.offline is True and cfg.logger.wandb.group == "arith-jsd-mixed"


def test_train_py_entry_point_on_shipped_checkpoints(tmp_path):
    """The real entry point with the embedded default's models, cut to a few steps and 8 validation problems."""
    cmd = [sys.executable, "train.py", f"hydra.run.dir={tmp_path}", "trainer.max_steps=2",
           "task.eval_examples=8", "task.eval_batch_size=8", "policy.sampling.max_new_tokens=48",
           "task.train_size=64", "task.batch_size=4"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "student after" in done.stdout and "teacher" in done.stdout
    results = json.loads((tmp_path / RESULTS).read_text())
    # the shipped teacher scores 0.62 and the student 0.36 on all 200; on these first 8, 3 and 0 (greedy, fixed data)
    assert results["steps"] == 2
    assert (results["teacher"]["accuracy"], results["student_before"]["accuracy"]) == (3 / 8, 0.0)


def scaled_forward_kl(student_logits, teacher_logits, mask=None, *, scale, **params):
    """A user's own loss, plugged in by `loss._target_`: forward KL times `scale`."""
    from kdlab.losses import forward_kl

    return scale * forward_kl(student_logits, teacher_logits, mask, **params)


def _first_train_loss(run_dir) -> float:
    import csv

    with (run_dir / "csv" / "metrics.csv").open() as f:
        return next(float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss"))


def test_a_user_loss_plugs_in_by_target(tmp_path):
    common = ["loss=fkl", "policy=supervised", "eval.teacher=false", "eval.before=false"]
    _run(tmp_path / "fkl", common)
    _, results = _run(tmp_path / "user", [*common, "loss._target_=tests.run.test_train_e2e.scaled_forward_kl",
                                          "+loss.scale=0.5"])
    assert results["steps"] == 3
    # the same first batch and weights: the step's loss is half of forward KL's (the function and its `scale` ran)
    assert _first_train_loss(tmp_path / "user") == pytest.approx(0.5 * _first_train_loss(tmp_path / "fkl"), rel=1e-5)


def test_debug_overfit_trains_on_fixed_targets_and_its_loss_falls(tmp_path):
    """debug=overfit is the check that training works: one batch, fixed targets only (a student-sampled step would
    train on fresh samples each time), so the last logged train loss is below the first."""
    import csv

    cfg = compose(["debug=overfit", "teacher=tiny", "student=tiny", "trainer.max_steps=20", "task.train_size=64",
                   "task.val_size=16", "task.eval_examples=8", "task.batch_size=4", "task.eval_batch_size=8",
                   "task.generation.max_new_tokens=4", "eval.before=false", "export=false"], output_dir=tmp_path)
    assert (cfg.policy.name, cfg.policy.student_fraction) == ("supervised", 0.0)
    run(cfg)
    with open(tmp_path / "csv" / "metrics.csv") as f:
        losses = [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]
    results = json.loads((tmp_path / RESULTS).read_text())
    assert results["onpolicy_fraction"] == 0.0 and len(losses) >= 4  # every 5 steps
    assert losses[-1] < 0.75 * losses[0], losses  # measured: 0.44 of the first after 20 steps (tiny models, seed 0)


@pytest.mark.parametrize("overrides, reason", [
    (["teacher=arith_pair"], "2 teachers (teacher, peer) mix per token; no one of them generates for the run"),
    (["teacher=tiny", "eval.teacher=false"], "eval.teacher=false"),
])
def test_a_teacher_that_cannot_be_scored_says_why_and_the_run_goes_on(tmp_path, overrides, reason):
    """Several teachers have no one model to generate with: scoring them as one teacher stopped the run."""
    tiny = [o for o in TINY_RUN if not o.startswith("teacher=")]
    cfg = compose([*tiny, *overrides, "trainer.max_steps=1", "eval.before=false", "export=false"], output_dir=tmp_path)
    run(cfg)
    results = json.loads((tmp_path / RESULTS).read_text())
    assert results["teacher"] is None and results["teacher_not_scored"] == reason
    assert not (tmp_path / "generations" / "teacher.jsonl").exists()
    from kdlab.run.train import format_results_table

    assert format_results_table(results).splitlines()[-1] == f"(teacher not scored: {reason})"
