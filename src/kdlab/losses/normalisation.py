"""One loss normalisation, right under every split of a batch: a term is a sum over units and a count of them.

A mean of micro-batch means is not the mean of the batch when micro-batches score different numbers of tokens (the
gradient-accumulation bug huggingface/trl#4719 describes), and a mean of per-process means is not the mean of the
global batch. So every term of the objective is kept as `LossSum(total, count, unit)`: what it sums, and over how
many units (scored tokens, or sequences). A training step counts each unit over its whole accumulation window and all
processes *before* any backward pass, and divides every micro-batch's sum by that global count; the micro-batches'
losses then add up to the loss of the whole global batch, and so do their gradients, however the batch was split.

Units: "tokens" (the student's scored tokens), "sequences" (rows with at least one scored token) and "none" (a plain
sum: its global count is 1). The plain loss functions (`forward_kl`, ...) return means; `from_mean` turns a mean
back into its sum (mean * count, exact up to one float rounding), so a user's loss may return a mean or a LossSum.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import torch
from torch import Tensor

TOKENS = "tokens"
SEQUENCES = "sequences"
NONE = "none"
UNITS = (TOKENS, SEQUENCES, NONE)
# The unit a `reduction` setting averages over.
REDUCTION_UNITS = {"token_mean": TOKENS, "sequence_mean": SEQUENCES, "sum": NONE}


class LossSum(NamedTuple):
    """A loss term as `total` summed over `count` units of kind `unit` (one of UNITS)."""

    total: Tensor
    count: Tensor
    unit: str

    def mean(self) -> Tensor:
        """The term's mean over its own units (0 with a gradient path when there are none)."""
        return self.total / self.count.clamp(min=1).to(self.total.dtype)


def unit_counts(mask: Tensor) -> dict[str, Tensor]:
    """How many units of each kind a (batch, positions) mask of scored tokens holds; "none" counts 1."""
    mask = mask.bool()
    one = torch.ones((), dtype=torch.float32, device=mask.device)
    return {TOKENS: mask.sum().float(), SEQUENCES: mask.any(dim=-1).sum().float(), NONE: one}


def from_mean(mean: Tensor, mask: Tensor, unit: str = TOKENS) -> LossSum:
    """The LossSum of a loss that averaged over the `unit`s of `mask` (a plain `fn(...) -> scalar` loss)."""
    if unit not in UNITS:
        raise ValueError(f"unknown loss unit {unit!r}; expected one of {', '.join(UNITS)}")
    count = unit_counts(mask)[unit]
    return LossSum(mean * count.to(mean.dtype), count, unit)


def as_loss_sum(value: Tensor | LossSum, mask: Tensor, unit: str = TOKENS) -> LossSum:
    """A loss function's result as a LossSum: kept when it is one, else read as a mean over `unit`s of `mask`."""
    if isinstance(value, LossSum):
        if value.unit not in UNITS:
            raise ValueError(f"a loss returned unit {value.unit!r}; expected one of {', '.join(UNITS)}")
        return value
    return from_mean(value, mask, unit)


def normalised(term: LossSum, global_counts: Mapping[str, Tensor]) -> Tensor:
    """The term's share of the global loss: its sum divided by the global count of its unit (at least 1)."""
    return term.total / global_counts[term.unit].clamp(min=1).to(term.total.dtype)
