"""Reverse KL estimated on the student's own sampled tokens: on-policy distillation with a policy-gradient step.

As Thinking Machines' "On-Policy Distillation" (Lu et al., 2025), NeMo-RL and verl run it: the student samples
x_1..x_T; each sampled token gets the advantage

    A_t = log p(x_t | x_<t) - log q(x_t | x_<t)          (p teacher, q student; detached: a constant)

and the step is REINFORCE on those per-token advantages, with no sum over the vocabulary:

    loss = sum_t w_t * (-A_t * log q(x_t | x_<t)),      gradient  sum_t w_t (log q(x_t) - log p(x_t)) grad log q(x_t)

Since E_{x~q}[(log q(x) - log p(x)) grad log q(x)] = grad KL(q || p) (the score function's mean is zero), its mean
over samples is the exact per-token reverse-KL gradient that loss=rkl computes with the full vocabulary on the same
prefixes. The value reported is the estimate of KL(q || p) itself, sum_t w_t (log q(x_t) - log p(x_t)), not the
surrogate's. w_t is the reduction's weight (token_mean: 1 / scored tokens).

The teacher need only give the log-probability of each sampled token (`TokenLogprobs`: kdlab.teachers.base's
TOKEN_LOGPROBS answer; a server with `prompt_logprobs` 0), not a distribution. Fixed data has no student samples to
weigh, so the run refuses policy.student_fraction < 1 (kdlab.run.validate) and the step refuses fixed targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kdlab.losses.chunking import row_weights
from kdlab.losses.normalisation import TOKENS, LossSum, unit_counts

RKL_SAMPLED = "rkl_sampled"
TOKEN_LOGPROBS = "token_logprobs"  # what Teacher.scores is asked for: the targets' log-probabilities (TokenLogprobs)


@dataclass
class TokenLogprobs:
    """A teacher's log-probability of each target token, (batch, positions), and those tokens' ids, (batch,
    positions): all a sampled-token objective reads of the teacher. `received_bytes`: what the answer took to move
    (a server's; 0 in the process)."""

    logprobs: Tensor
    ids: Tensor
    received_bytes: int = 0


def target_logprobs(logits: Tensor, ids: Tensor, chunk_size: int = 1024) -> Tensor:
    """log softmax(logits)[ids] per position, in float32 (float64 inputs stay float64), `chunk_size` rows of
    (batch * positions) upcast at a time."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    flat, index = logits.reshape(-1, logits.shape[-1]), ids.reshape(-1, 1)
    parts = [flat[i : i + chunk_size].to(dtype).gather(-1, index[i : i + chunk_size]).squeeze(-1)
             - torch.logsumexp(flat[i : i + chunk_size].to(dtype), dim=-1) for i in range(0, flat.shape[0], chunk_size)]
    return (torch.cat(parts) if parts else flat.new_zeros(0, dtype=dtype)).reshape(ids.shape)


def policy_gradient_sum(student_logits: Tensor, target_ids: Tensor, mask: Tensor, advantages: Tensor) -> LossSum:
    """REINFORCE as a sum over the batch's response tokens: -sum A * log q(y_t), counted in scored tokens.

    `advantages` is per sequence (batch,), every token of a sequence weighed by its sequence's (the reward's path,
    kdlab.step.rewards), or per token (batch, positions) (loss=rkl_sampled). Constants: detached here."""
    weights = advantages.detach()
    if weights.dim() == 1:
        weights = weights[:, None]
    token_log_probs = target_logprobs(student_logits, target_ids) * mask
    total = -(weights * token_log_probs).sum()
    return LossSum(total, unit_counts(mask)[TOKENS], TOKENS)


def sampled_reverse_kl(student_logits: Tensor, teacher: TokenLogprobs, mask: Tensor | None = None,
                       reduction: str = "token_mean", chunk_size: int = 1024) -> Tensor:
    """The sampled-token reverse KL of the module doc: value the estimate of KL(q || p) under `reduction`, gradient
    the per-token policy gradient. student_logits (batch, positions, vocab); `teacher` the teacher's log-probability
    of `teacher.ids`, the student's sampled tokens (batch, positions); mask (batch, positions)."""
    ids = teacher.ids
    if mask is None:
        mask = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    mask = mask.bool()
    student = target_logprobs(student_logits, ids, chunk_size)
    weights = row_weights(mask, reduction, student.dtype)
    estimate = (student - teacher.logprobs.to(student.dtype)).masked_fill(~mask, 0.0)  # log q - log p = -A
    surrogate = estimate.detach() * student  # its gradient is the policy gradient: -A grad log q
    return (weights * estimate.detach()).sum() + (weights * (surrogate - surrogate.detach())).sum()
