"""Per-row divergence formulas over log-probabilities, and the closed-form gradients the fused paths use.

Each takes (rows, vocab) log-probabilities in the compute dtype and returns one value per row; the `*_and_grad`
forms also return d loss / d (student logits / temperature), computed in place on tensors that are dead after the
line (they run without autograd), so a chunk needs about four (rows, vocab) temporaries.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# (log q, log p) in the compute dtype -> (per-row loss, d loss / d (student logits / temperature)), rows of a chunk
LossAndGrad = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """sum_v a_v (log a_v - log b_v) per row; entries with a_v == 0 contribute 0 (and no NaN gradient)."""
    a = log_a.exp()
    # guard the difference itself, not just the product: 0 * (-inf - x) would be NaN in value or gradient
    diff = torch.where(a > 0, log_a - log_b, 0.0)
    return (a * diff).sum(dim=-1)


def log_mix(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """log(w * a + (1 - w) * b) in log space; the endpoints return an input exactly."""
    if w == 0.0:
        return log_b
    if w == 1.0:
        return log_a
    # where both are -inf (a vocab entry masked in both models) logaddexp's gradient is NaN: route those around it
    both = torch.isneginf(log_a) & torch.isneginf(log_b)
    mix = torch.logaddexp(log_a.masked_fill(both, 0.0) + math.log(w), log_b.masked_fill(both, 0.0) + math.log1p(-w))
    return mix.masked_fill(both, -math.inf)


def log_softmax(logits: Tensor, dtype: torch.dtype, temperature: float) -> Tensor:
    x = logits.to(dtype)
    return F.log_softmax(x if temperature == 1.0 else x / temperature, dim=-1)


def dot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise sum_v a_v b_v. Not einsum/bmm: their float32 accumulation over a 32k row was 100x less accurate."""
    return (a * b).sum(dim=-1)


# The fused helpers below run without autograd, so they work in place on tensors that are dead after the line: a
# chunk then needs about four (rows, vocab) temporaries, which is most of the loss's own memory.


def forward_kl_and_grad(log_q: Tensor, log_p: Tensor) -> tuple[Tensor, Tensor]:
    # d KL(P||Q) / d logits = q - p
    p = log_p.exp()
    loss = (log_p - log_q).masked_fill_(p == 0, 0.0).mul_(p).sum(dim=-1)
    return loss, log_q.exp_().sub_(p)


def reverse_kl_and_grad(log_q: Tensor, log_p: Tensor) -> tuple[Tensor, Tensor]:
    # d KL(Q||P) / d q_v = log q_v - log p_v + 1; through the softmax: q * (diff - KL), the constant cancels
    q = log_q.exp()
    diff = (log_q - log_p).masked_fill_(q == 0, 0.0)
    loss = dot(q, diff)
    return loss, diff.sub_(loss[:, None]).mul_(q)


def jsd_and_grad(beta: float) -> LossAndGrad:
    def loss_and_grad(log_q: Tensor, log_p: Tensor) -> tuple[Tensor, Tensor]:
        # d JSD / d q_v = (1 - beta) log(q_v / m_v): the p/m and q/m terms of both KLs cancel exactly;
        # through the softmax, q * (g - <q, g>). No gradient flows through log m here, so entries where both
        # models are -inf need no detour (their -inf - -inf is masked with p == 0 and q == 0).
        lm = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        p = log_p.exp()
        kl_p = (log_p - lm).masked_fill_(p == 0, 0.0).mul_(p).sum(dim=-1)
        del p
        q = log_q.exp()
        diff = (log_q - lm).masked_fill_(q == 0, 0.0)
        loss = beta * kl_p + (1.0 - beta) * dot(q, diff)
        g = diff.mul_(1.0 - beta)
        return loss, g.sub_(dot(q, g)[:, None]).mul_(q)

    return loss_and_grad


def check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in the range [0, 1], got {value}")
