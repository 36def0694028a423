"""Rewards for distillation with RL (GKD Eq. 5), and the REINFORCE term that uses them.

A reward is any callable `fn(predictions: list[str], references: list[str]) -> list[float]`, one number per
generated text. `conf/reward/*.yaml` names one by `_target_` (a class, or a function with `_partial_: true`), so a
user's own reward plugs in from the command line: `reward.fn._target_=my_module.MyReward`.

GKD's Eq. 5 maximises (1 - alpha) E[r(y)] - alpha E[D(teacher || student)(y | x)] over the student's samples y. The
reward part is optimised with REINFORCE and a leave-one-out baseline (Kool et al. 2019): each prompt is sampled k
times, and sample i's advantage is r_i minus the mean reward of the prompt's other k - 1 samples. That baseline is
unbiased and needs no value model.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from kdlab.data.answers import is_correct
from kdlab.losses.normalisation import LossSum
from kdlab.losses.sampled import policy_gradient_sum as token_policy_gradient_sum


class FinalAnswerCorrect:
    """1.0 when the generation's final answer (`#### x`, GSM8K's rule) equals the reference's, else 0.0."""

    def __call__(self, predictions: Sequence[str], references: Sequence[str]) -> list[float]:
        return [float(is_correct(p, r)) for p, r in zip(predictions, references)]


class RougeReward:
    """Each generation's ROUGE F-measure (`rouge_type`: rouge1, rouge2, rougeL, rougeLsum) against its reference."""

    def __init__(self, rouge_type: str = "rougeL", use_stemmer: bool = True):
        from rouge_score import rouge_scorer

        self.rouge_type = rouge_type
        self.scorer = rouge_scorer.RougeScorer([rouge_type], use_stemmer=use_stemmer)

    def __call__(self, predictions: Sequence[str], references: Sequence[str]) -> list[float]:
        return [self.scorer.score(r, p)[self.rouge_type].fmeasure for p, r in zip(predictions, references)]


def leave_one_out_advantages(rewards: Tensor, samples_per_prompt: int) -> Tensor:
    """r_i - mean of the other samples' rewards of the same prompt; `rewards` holds each prompt's k samples in a row
    (prompt-major, as `repeat_interleave` lays them out)."""
    k = samples_per_prompt
    grouped = rewards.view(-1, k)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).reshape(-1)


def policy_gradient_sum(student_logits: Tensor, target_ids: Tensor, mask: Tensor, advantages: Tensor) -> LossSum:
    """REINFORCE as a sum over the batch's response tokens: -sum_i A_i * log q(y_i), counted in scored tokens.

    log q(y_i) is the sum of sample i's token log-probabilities. Its gradient is the policy-gradient estimate of -E[r]
    (the advantages are constants); normalised per scored token as the distillation term is (token_mean): a
    per-sequence sum would outweigh it by the response length (about 90 tokens here), and on the embedded task that
    collapsed the student within 20 steps. Float32 inside. The one REINFORCE path (kdlab.losses.sampled), which
    loss=rkl_sampled takes with an advantage per token.
    """
    return token_policy_gradient_sum(student_logits, target_ids, mask, advantages)


def policy_gradient_loss(student_logits: Tensor, target_ids: Tensor, mask: Tensor, advantages: Tensor) -> Tensor:
    """REINFORCE: -sum_i A_i * log q(y_i) / (response tokens in the batch); see `policy_gradient_sum`."""
    return policy_gradient_sum(student_logits, target_ids, mask, advantages).mean()


class RewardTerm:
    """The reward side of Eq. 5: a reward callable, the mixing weight `alpha` and k samples per prompt (their
    defaults live in conf/reward/*.yaml)."""

    def __init__(self, fn, alpha: float, samples_per_prompt: int):
        if not callable(fn):
            raise TypeError(f"reward.fn must be callable (predictions, references) -> rewards; got {type(fn).__name__}")
        self.fn = fn
        self.alpha = float(alpha)
        self.samples_per_prompt = int(samples_per_prompt)

    @property
    def active(self) -> bool:
        """alpha=1 is pure distillation: no reward, no extra samples."""
        return self.alpha < 1.0

    def score(self, predictions: Sequence[str], references: Sequence[str]) -> Tensor:
        rewards = list(self.fn(list(predictions), list(references)))
        if len(rewards) != len(predictions):
            raise ValueError(f"the reward returned {len(rewards)} values for {len(predictions)} generations")
        return torch.tensor([float(r) for r in rewards], dtype=torch.float32)


def reward_config_errors(reward: dict | None, student_fraction: float) -> list[str]:
    """Problems with a `reward` node, each naming the key and the fix."""
    if reward is None:
        return []
    errors = []
    for key in reward:
        if key not in ("fn", "alpha", "samples_per_prompt"):
            errors.append(f"reward.{key} is not a reward setting; known: fn, alpha, samples_per_prompt")
    if "_target_" not in (reward.get("fn") or {}):
        errors.append("reward.fn needs a `_target_`: a callable (predictions, references) -> list of floats")
    if not 0.0 <= float(reward.get("alpha", 0.5)) <= 1.0:
        errors.append(f"reward.alpha={reward['alpha']} is outside [0, 1] (1 is pure distillation)")
    if int(reward.get("samples_per_prompt", 4)) < 2:
        errors.append("reward.samples_per_prompt must be >= 2: the leave-one-out baseline needs other samples")
    if student_fraction <= 0 and float(reward.get("alpha", 0.5)) < 1:
        errors.append("a reward is optimised on the student's own samples, but policy.student_fraction=0; use "
                      "policy=onpolicy or policy=mixed")
    return errors
