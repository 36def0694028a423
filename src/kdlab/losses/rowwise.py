"""What every divergence's per-row formula is built from, over (rows, vocab) log-probabilities.

A divergence (kdlab.losses.divergences.Divergence) gives its loss per row of log-probabilities in the compute dtype;
the forms that also give d loss / d (student logits / temperature) (`LossAndGrad`) run without autograd, so they may
work in place on tensors that are dead after the line: a chunk then needs about four (rows, vocab) temporaries.
`autograd_loss_and_grad` is that form for a divergence without a closed-form gradient: autograd on one chunk alone.
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


def log_mix_no_grad(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """`log_mix` for the closed-form gradients, which run without autograd: no detour around entries where both are
    -inf (their NaN differences are masked where they are read), so no masks are built."""
    if w == 0.0:
        return log_b
    if w == 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def log_softmax(logits: Tensor, dtype: torch.dtype, temperature: float) -> Tensor:
    x = logits.to(dtype)
    return F.log_softmax(x if temperature == 1.0 else x / temperature, dim=-1)


def dot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise sum_v a_v b_v. Not einsum/bmm: their float32 accumulation over a 32k row was 100x less accurate."""
    return (a * b).sum(dim=-1)


def autograd_loss_and_grad(row: Callable[[Tensor, Tensor], Tensor]) -> LossAndGrad:
    """The (loss, d loss / d student logits) of a per-row loss given without a closed-form gradient: autograd on the
    chunk's log q alone, chained through the log-softmax (d log q_v / d z_j = delta_vj - q_j)."""

    def loss_and_grad(log_q: Tensor, log_p: Tensor) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            x = log_q.detach().requires_grad_()
            loss = row(x, log_p)
            (grad,) = torch.autograd.grad(loss.sum(), x)
        return loss.detach(), grad.sub_(log_q.exp().mul_(grad.sum(dim=-1, keepdim=True)))

    return loss_and_grad
