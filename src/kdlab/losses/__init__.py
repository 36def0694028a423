"""Distillation losses as plain functions: `loss(student_logits, teacher_logits, mask, *, temperature, reduction,
chunk_size)` with logits (batch, positions, vocab), student = Q, teacher = P, and a bool mask (batch, positions)
True where a response token is scored (None scores every position). Each returns a float32 (or float64) scalar
reduced by "token_mean" (default), "sequence_mean" or "sum"; temperature divides both logits with no T^2
rescaling; work is chunked over flattened rows so no full float32 copy of the logits is made. `cross_entropy`
takes aligned labels instead of teacher logits. The registry maps config names (fkl, rkl, jsd, tvd, skl, srkl)
to functions and lists each one's own knobs (beta, alpha).
"""

from kdlab.losses.divergences import (
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    total_variation,
)
from kdlab.losses.registry import DIVERGENCES, SAME_VOCAB_LOSSES, divergence_params, get_divergence
from kdlab.losses.sft import cross_entropy

__all__ = [
    "forward_kl",
    "reverse_kl",
    "generalized_jsd",
    "total_variation",
    "skew_forward_kl",
    "skew_reverse_kl",
    "cross_entropy",
    "DIVERGENCES",
    "SAME_VOCAB_LOSSES",
    "get_divergence",
    "divergence_params",
]
