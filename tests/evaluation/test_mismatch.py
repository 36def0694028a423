"""The teacher's view of the student's own greedy outputs (kdlab.evaluation.mismatch), in evaluation and afterwards
(kdlab-mismatch), checked against a per-token reference written from the definitions, one unpadded row at a time."""

import json
import math

import lightning as L
import pytest
import torch

from kdlab.data.datamodule import DistillationDataModule
from kdlab.data.tasks import Task
from kdlab.evaluation import mismatch
from kdlab.evaluation.generations import GenerationScorer, evaluate
from kdlab.run.compose import task_node
from kdlab.run.rundir import RESULTS
from kdlab.sampling.base import SamplingSettings
from kdlab.sampling.hf import generate_targets
from tests.builders import distillation_module, distillation_step
from tests.conftest import TINY_RUN, compose, loss_config, tiny_model

TASK = {"name": "arith", "train_size": 32, "val_size": 8, "eval_examples": 8, "batch_size": 4, "eval_batch_size": 8,
        "generation": {"max_new_tokens": 8, "do_sample": False}}


def _reference(student, teacher, prompt, target) -> list[float]:
    """Sums over the whole evaluation, token by token: each row alone, no padding, the softmax written out."""
    sums = [0.0, 0.0, 0.0, 0]
    for p_ids, p_mask, t_ids, t_mask in zip(*prompt, *target):
        ids = torch.cat([p_ids[p_mask.bool()], t_ids[t_mask.bool()]])[None]
        n_prompt, n_target = int(p_mask.sum()), int(t_mask.sum())
        with torch.no_grad():
            logits = [m(input_ids=ids).logits[0].double() for m in (student, teacher)]
        for t in range(n_target):
            row = [x[n_prompt - 1 + t] for x in logits]
            q, p = (torch.exp(r - r.max()) / torch.exp(r - r.max()).sum() for r in row)  # student q, teacher p
            token = int(ids[0, n_prompt + t])
            sums[0] -= math.log(float(p[token]))
            sums[1] += float((p * (p.log() - q.log())).sum())
            sums[2] += float((q * (q.log() - p.log())).sum())
            sums[3] += 1
    return sums


def _greedy(model, tokenizer, datamodule):
    datamodule.setup()
    batch = next(iter(datamodule.val_dataloader()))
    ids, mask = generate_targets(model, *batch.student.prompt, SamplingSettings(do_sample=False, max_new_tokens=8),
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return batch, (ids, mask)


@pytest.mark.parametrize("groups,elements", [(1, 2**24), (4, 2**24), (4, 1)])
def test_own_output_sums_match_the_per_token_reference(tokenizer, monkeypatch, groups, elements):
    monkeypatch.setattr(mismatch, "SCORE_ELEMENTS", elements)  # 1: every row through the models alone
    # float64 models: the reference scores each row alone, without padding, so in float32 the two differ by
    # rounding that depends on batch composition (4.6e-6 relative when measured, against a 1e-5 bound)
    student, teacher = tiny_model(tokenizer, seed=0).double(), tiny_model(tokenizer, seed=1, width=48).double()
    datamodule = DistillationDataModule(Task.from_config(task_node(**TASK)), tokenizer)
    batch, target = _greedy(student, tokenizer, datamodule)
    step = distillation_step(student, tokenizer, loss_config("fkl"), teacher, score_groups=groups)
    sums = step.mismatch_sums(batch.student.prompt, *target)
    reference = _reference(student, teacher, batch.student.prompt, target)
    assert sums.shape == (target[0].shape[0], 4)
    assert sums.dtype == torch.float64
    assert sums.sum(0).tolist() == pytest.approx(reference, rel=1e-10)
    means = mismatch.per_token_means(sums.tolist())
    assert means == pytest.approx({k: reference[i] / reference[3] for i, k in enumerate(mismatch.MISMATCH_KEYS)},
                                  rel=1e-10)


def test_a_teacher_equal_to_the_student_shows_no_divergence(tokenizer):
    student, teacher = tiny_model(tokenizer, seed=0), tiny_model(tokenizer, seed=0)  # the same weights
    datamodule = DistillationDataModule(Task.from_config(task_node(**TASK)), tokenizer)
    batch, target = _greedy(student, tokenizer, datamodule)
    step = distillation_step(student, tokenizer, loss_config("fkl"), teacher)
    means = mismatch.per_token_means(step.mismatch_sums(batch.student.prompt, *target).tolist())
    assert means["own_fkl"] == pytest.approx(0.0, abs=1e-6) and means["own_rkl"] == pytest.approx(0.0, abs=1e-6)
    assert means["own_teacher_nll"] > 0  # the student's own NLL of its greedy tokens


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_evaluation_measures_the_students_own_outputs(tokenizer, role):
    task = Task.from_config(task_node(**TASK))
    # float64 models, so that the reference (each row alone, no padding) agrees to rounding (float32: 4.5e-6 relative
    # against a 1e-5 bound)
    student, teacher = tiny_model(tokenizer, seed=0).double(), tiny_model(tokenizer, seed=1, width=48).double()
    module = distillation_module(student, tokenizer, loss_config("fkl"), teacher, max_new_tokens=8,
                                 micro_batch_size=TASK["batch_size"], max_nonfinite_steps=3, score_groups=4,
                                 eval_sampling=SamplingSettings(**TASK["generation"]))
    datamodule = DistillationDataModule(task, tokenizer)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[GenerationScorer(task)])
    generations = evaluate(trainer, module, datamodule, role)
    if role == "teacher":  # the teacher's own outputs: nothing to compare them with
        assert generations.mismatch == {}
        return
    batch, target = _greedy(student, tokenizer, datamodule)
    reference = _reference(student, teacher, batch.student.prompt, target)
    assert generations.mismatch == pytest.approx(
        {k: reference[i] / reference[3] for i, k in enumerate(mismatch.MISMATCH_KEYS)}, rel=1e-10)
    assert float(trainer.callback_metrics["val/own_fkl"]) == pytest.approx(generations.mismatch["own_fkl"])


@pytest.mark.slow
def test_kdlab_mismatch_reproduces_what_the_run_measured(tmp_path, capsys):
    from kdlab.evaluation.mismatch_cli import main
    from kdlab.run.train import run

    sweep, tmp_path = tmp_path, tmp_path / "sweep" / "0"  # a run below a sweep directory
    run(compose(TINY_RUN + ["loss=fkl", "export=true"], output_dir=tmp_path))
    measured = json.loads((tmp_path / RESULTS).read_text())
    assert set(mismatch.MISMATCH_KEYS) <= set(measured["student_after"]) <= set(measured["metrics"])
    assert set(mismatch.MISMATCH_KEYS) <= set(measured["student_before"])
    stripped = json.loads(json.dumps(measured))
    for key in ("student_after", "student_before", "metrics"):
        stripped[key] = {k: v for k, v in stripped[key].items() if k not in mismatch.MISMATCH_KEYS}
    (tmp_path / RESULTS).write_text(json.dumps(stripped))

    assert main([str(sweep), "--before"]) == 0  # found below the sweep directory
    again = json.loads((tmp_path / RESULTS).read_text())
    for key in ("student_after", "student_before"):
        assert again[key] == pytest.approx(measured[key], rel=1e-5)
    assert again["metrics"] == again["student_after"]
    assert "own_teacher_nll" in capsys.readouterr().out

    # a run whose outputs cannot be reproduced says so instead of scoring other outputs
    again["student_after"]["accuracy"] += 0.5
    (tmp_path / RESULTS).write_text(json.dumps(again))
    assert main([str(tmp_path)]) == 1
    assert "not the outputs the run scored" in capsys.readouterr().err


def test_the_run_end_table_shows_the_task_scores_only():
    from kdlab.run.train import format_results_table

    after = {"accuracy": 0.45, "own_teacher_nll": 0.08, "own_fkl": 0.03, "own_rkl": 0.09}
    table = format_results_table({"metrics": after, "teacher": {"accuracy": 0.62}, "student_before": None,
                                  "student_after": after})
    assert "accuracy" in table and "0.4500" in table and "own_" not in table
