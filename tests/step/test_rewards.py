"""GKD Eq. 5: rewards score known strings, REINFORCE's gradient matches a direct computation, alpha=1 is pure KD."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from kdlab.models.scoring import score_targets
from kdlab.run.rundir import RESULTS, STUDENT
from kdlab.step.rewards import (
    FinalAnswerCorrect,
    RewardTerm,
    RougeReward,
    leave_one_out_advantages,
    policy_gradient_loss,
)
from tests.conftest import TINY_RUN, compose, tiny_model


class HalfReward:
    """A user reward plugged in by `_target_`: 0.5 for every generation."""

    def __call__(self, predictions, references):
        return [0.5] * len(predictions)


def test_final_answer_reward_scores_known_strings():
    predictions = ["2 + 2 = 4\n#### 4", "#### 1000", "so the answer is 7", "#### 5"]
    references = ["#### 4", "#### 1,000", "#### 7", "#### 4"]
    assert FinalAnswerCorrect()(predictions, references) == [1.0, 1.0, 0.0, 0.0]


def test_rouge_reward_scores_known_strings():
    reward = RougeReward("rouge1")
    # "the cat ran" vs "the cat sat down": P = 2/3, R = 2/4, F = 4/7
    assert reward(["the cat ran", "x"], ["the cat sat down", "x"]) == pytest.approx([4 / 7, 1.0])


def test_leave_one_out_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])  # two prompts, three samples each
    # prompt 1: 1 - (0+0)/2 = 1, 0 - (1+0)/2 = -0.5, -0.5; prompt 2: all equal -> 0
    assert leave_one_out_advantages(rewards, 3).tolist() == [1.0, -0.5, -0.5, 0.0, 0.0, 0.0]


def test_policy_gradient_matches_a_direct_per_sample_computation(tokenizer):
    model = tiny_model(tokenizer, seed=3)
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ["Question: 1 + 2?\nAnswer:", "Q: 5?"]]
    samples = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in [" 3\n#### 3", " 5 + 0 = 5\n#### 5"]]
    advantages = torch.tensor([0.7, -1.3])
    from kdlab.data.datamodule import pad

    prompt_ids, prompt_mask = pad(prompts, tokenizer.pad_token_id, "left")
    target_ids, target_mask = pad(samples, tokenizer.pad_token_id, "right")
    model.zero_grad()
    logits = score_targets(model, prompt_ids, prompt_mask, target_ids, target_mask)
    policy_gradient_loss(logits, target_ids, target_mask, advantages).backward()
    batched = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    direct = 0.0
    for prompt, sample, advantage in zip(prompts, samples, advantages):
        ids = torch.tensor([prompt + sample])
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt) - 1 : -1], -1)
        direct = direct - advantage * log_probs[torch.arange(len(sample)), torch.tensor(sample)].sum()
    (direct / sum(len(s) for s in samples)).backward()  # per scored token, as the distillation term
    for got, expected in zip(batched, (p.grad for p in model.parameters())):
        assert torch.allclose(got, expected, atol=1e-5)


def test_reward_settings_are_checked(tmp_path):
    from kdlab.run.validate import config_errors

    assert config_errors(compose(["reward=arith_correct"], output_dir=tmp_path)) == []
    errors = config_errors(compose(["reward=arith_correct", "policy=supervised", "reward.samples_per_prompt=1"],
                                   output_dir=tmp_path))
    assert any("samples_per_prompt must be >= 2" in e for e in errors)
    assert any("policy.student_fraction=0" in e for e in errors)
    with pytest.raises(TypeError, match="must be callable"):
        RewardTerm(fn=3, alpha=0.5, samples_per_prompt=4)


def _student_weights(tmp_path, overrides):
    from kdlab.run.train import run

    run(compose([*TINY_RUN, "policy=onpolicy", "loss=rkl", *overrides], output_dir=tmp_path))
    return load_file(tmp_path / STUDENT / "model.safetensors"), tmp_path


@pytest.mark.slow
def test_alpha_one_reproduces_pure_distillation_exactly(tmp_path):
    pure, _ = _student_weights(tmp_path / "pure", [])
    mixed, _ = _student_weights(tmp_path / "alpha1", ["reward=arith_correct", "reward.alpha=1.0"])
    assert pure.keys() == mixed.keys() and all(torch.equal(pure[k], mixed[k]) for k in pure)


@pytest.mark.slow
def test_a_user_reward_runs_end_to_end_and_every_term_is_logged(tmp_path):
    import csv

    overrides = ["reward=arith_correct", "reward.fn._target_=tests.step.test_rewards.HalfReward", "reward.alpha=0.25"]
    _, run_dir = _student_weights(tmp_path, overrides)
    rows = [r for r in csv.DictReader((run_dir / "csv" / "metrics.csv").open()) if r.get("train/loss")]
    assert rows
    for row in rows:
        assert float(row["train/reward"]) == 0.5 and float(row["train/advantage"]) == 0.0  # equal rewards: A = 0
        expected = 0.25 * float(row["train/distill"]) + 0.75 * float(row["train/pg"])
        assert float(row["train/loss"]) == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert json.loads((run_dir / RESULTS).read_text())["onpolicy_fraction"] == 1.0
