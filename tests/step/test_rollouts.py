"""Training rollouts: rows written every n steps with the text trained on and its scores, each checked against the
shipped models scored by hand."""

from __future__ import annotations

import json

import pytest
import torch

from kdlab.losses import forward_kl
from kdlab.run.train import run
from kdlab.step.rollouts import ROLLOUTS
from tests.conftest import TINY_RUN, compose

RUN = [*TINY_RUN, "teacher=arith_teacher", "student=arith_student", "loss=fkl", "eval.teacher=false",
       "eval.before=false", "task.train_size=24", "task.eval_examples=4", "trainer.max_steps=3",
       "log_rollouts_every_n_steps=2", "log_rollouts_examples=2"]


def _rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / ROLLOUTS).read_text().splitlines()]


def test_rollouts_hold_the_text_trained_on_and_its_scores_under_both_models(tmp_path):
    cfg = compose([*RUN, "policy=supervised"], output_dir=tmp_path)
    run(cfg)
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [0, 0, 2, 2]  # every 2 steps, 2 examples each
    from kdlab.models.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(cfg.student)
    student, teacher = (load_model(cfg[role], tokenizer).eval() for role in ("student", "teacher"))
    for row in rows[:2]:  # step 0: the shipped weights, before any update
        assert row["source"] == "ground_truth" and row["reward"] is None
        assert row["target"] == tokenizer.decode(row["target_ids"]) and row["tokens"] == len(row["target_ids"])
        ids = torch.tensor([row["prompt_ids"] + row["target_ids"]])
        rows_of_target = slice(len(row["prompt_ids"]) - 1, ids.shape[1] - 1)  # position t predicts token t + 1
        with torch.no_grad():
            s, t = (m(input_ids=ids).logits[:, rows_of_target, : len(tokenizer)].double() for m in (student, teacher))
        target = torch.tensor([row["target_ids"]])
        for logits, key in ((s, "student_logprob"), (t, "teacher_logprob")):
            expected = torch.log_softmax(logits, -1).gather(-1, target[..., None]).sum().item()
            assert row[key] == pytest.approx(expected, rel=1e-4), key
        assert row["divergence"] == pytest.approx(forward_kl(s, t).item(), rel=1e-4)


def test_several_teachers_rollouts_hold_the_mixtures_log_likelihood_and_none_when_routed(tmp_path):
    """Mixed teachers: the teacher's log-likelihood and the divergence are the mixture's, log sum_i w_i p_i, written
    out here from each member's logits; routed members have no one distribution for a row: null."""
    import math

    from kdlab.models.loading import load_model, load_tokenizer

    pair = [o for o in RUN if not o.startswith("teacher=")] + ["teacher=arith_pair", "policy=supervised",
                                                                 "trainer.max_steps=1"]
    cfg = compose(pair, output_dir=tmp_path / "mixed")
    run(cfg)
    rows = _rows(tmp_path / "mixed")
    assert len(rows) == 2
    tokenizer = load_tokenizer(cfg.student)
    student = load_model(cfg.student, tokenizer).eval()
    members = {name: load_model(node, tokenizer).eval() for name, node in cfg.teacher.members.items()}
    total = sum(float(w) for w in cfg.teacher.weights.values())
    weights = {name: float(cfg.teacher.weights[name]) / total for name in members}
    for row in rows:
        ids = torch.tensor([row["prompt_ids"] + row["target_ids"]])
        rows_of_target = slice(len(row["prompt_ids"]) - 1, ids.shape[1] - 1)
        with torch.no_grad():
            s = student(input_ids=ids).logits[:, rows_of_target, : len(tokenizer)].double()
            mixture = torch.logsumexp(torch.stack([
                torch.log_softmax(model(input_ids=ids).logits[:, rows_of_target, : len(tokenizer)].double(), -1)
                + math.log(weights[name]) for name, model in members.items()]), dim=0)
        target = torch.tensor([row["target_ids"]])
        expected = mixture.gather(-1, target[..., None]).sum().item()
        assert row["teacher_logprob"] == pytest.approx(expected, rel=1e-4)
        assert row["divergence"] == pytest.approx(forward_kl(s, mixture).item(), rel=1e-4)

    routed = [*pair, "teacher.combine=route", "teacher.route_field=steps",
              "teacher.routes={2: peer, 3: teacher, 4: teacher}"]
    run(compose(routed, output_dir=tmp_path / "routed"))
    rows = _rows(tmp_path / "routed")
    assert len(rows) == 2 and all(r["teacher_logprob"] is None and r["student_logprob"] is not None for r in rows)


def test_on_policy_rollouts_are_the_students_own_samples_and_off_means_no_file(tmp_path):
    run(compose([*RUN, "policy=onpolicy", "trainer.max_steps=1"], output_dir=tmp_path / "on"))
    rows = _rows(tmp_path / "on")
    assert {r["source"] for r in rows} == {"student"} and len(rows) == 2
    run(compose([*RUN, "policy=supervised", "trainer.max_steps=1", "log_rollouts_every_n_steps=0"],
                output_dir=tmp_path / "off"))
    assert not (tmp_path / "off" / ROLLOUTS).exists()


def test_rollouts_go_to_a_wandb_table_with_every_row_so_far(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from lightning.pytorch.loggers import WandbLogger

    from kdlab.step.rollouts import COLUMNS, RolloutWriter

    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    calls = []
    monkeypatch.setattr(logger, "log_table", lambda **kw: calls.append(kw))
    writer = RolloutWriter(tmp_path / ROLLOUTS)
    row = {c: 1 for c in COLUMNS} | {"prompt_ids": [1, 2], "target_ids": [3]}
    for step in (0, 50):
        trainer = SimpleNamespace(is_global_zero=True, loggers=[logger], global_step=step)
        writer.on_train_batch_end(trainer, None, {"loss": 0.0, "rollouts": [dict(row, step=step)]}, None, 0)
    assert [c["step"] for c in calls] == [0, 50] and calls[-1]["columns"] == list(COLUMNS)
    assert [r[0] for r in calls[-1]["data"]] == [0, 50] and calls[-1]["data"][0][-1] == "[3]"
    assert len(_rows(tmp_path)) == 2
