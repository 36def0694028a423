"""Distillation losses as plain functions: `loss(student_logits, teacher_logits, mask, *, temperature, reduction,
chunk_size)` with logits (batch, positions, vocab), student = Q, teacher = P, and a bool mask (batch, positions)
True where a response token is scored (None scores every position). Each returns a float32 (or float64) scalar
reduced by "token_mean" (default), "sequence_mean" or "sum"; temperature divides both logits with no T^2
rescaling; work is chunked over flattened rows so no full float32 copy of the logits is made. `cross_entropy`
takes aligned labels instead of teacher logits. The cross-tokenizer losses `multilevel_ot` and
`universal_logit_distillation` take each side's own logits and masks (`teacher_mask=`) and return their terms by
name. Configs pick a loss by `_target_` (conf/loss/*.yaml); `DIVERGENCES` maps the config names to the divergences'
records (`Divergence`: each divergence's row loss, settings and closed-form gradient, from which its dense, top-k and
fused forms are built; `register_divergence` adds one).
"""

from kdlab.losses.cross_tokenizer import multilevel_ot, universal_logit_distillation
from kdlab.losses.divergences import (
    DIVERGENCES,
    SAME_VOCAB_LOSSES,
    Divergence,
    Setting,
    forward_kl,
    generalized_jsd,
    get_divergence,
    register_divergence,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    total_variation,
)
from kdlab.losses.normalisation import LossSum
from kdlab.losses.sft import cross_entropy

__all__ = [
    "forward_kl",
    "reverse_kl",
    "generalized_jsd",
    "total_variation",
    "skew_forward_kl",
    "skew_reverse_kl",
    "cross_entropy",
    "multilevel_ot",
    "universal_logit_distillation",
    "LossSum",
    "DIVERGENCES",
    "SAME_VOCAB_LOSSES",
    "get_divergence",
    "Divergence",
    "Setting",
    "register_divergence",
]
