"""The training objective a run optimises: a divergence, a cross-tokenizer loss or plain SFT, with a CE term.

    total = divergence(student, teacher) + ce_weight * CE(student, targets)        (loss=fkl|rkl|jsd|tvd|skl|srkl)
    total = ce_weight * CE + alpha * (had_weight * HAD + beta * SL + gamma * SD)     (loss=ot, MultiLevelOT)
    total = ce_weight * CE + uld_weight * ULD                                        (loss=uld)
    total = CE(student, targets)                                                     (loss=sft, no teacher needed)

A term whose weight is 0 is not computed at all (ablations cost nothing). The CE term is left out on steps that
train on the student's own samples (`hard_labels=False`): cross-entropy on its own samples only reinforces them
(GKD's on-policy objective has no such term). The module calls the objective once per step; it returns the total and
each component, unweighted, for logging; a training step takes each term as a sum and normalises it once over
the whole global batch (kdlab.losses.normalisation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from torch import Tensor

from kdlab.losses.normalisation import REDUCTION_UNITS, SEQUENCES, TOKENS, LossSum, as_loss_sum, unit_counts
from kdlab.losses.registry import (
    CROSS_TOKENIZER_LOSSES,
    CROSS_TOKENIZER_WEIGHTS,
    cross_tokenizer_params,
    divergence_params,
    get_divergence,
)
from kdlab.losses.sft import cross_entropy

SFT = "sft"
# Default weights of the cross-tokenizer terms: MultiLevelOT's alpha, beta, gamma as in the paper; ULD's lambda 1.
DEFAULT_WEIGHTS = {"alpha": 0.15, "had_weight": 1.0, "beta": 0.1, "gamma": 0.1, "uld_weight": 1.0}


@dataclass(frozen=True)
class Objective:
    name: str
    params: Mapping[str, Any] = field(default_factory=dict)  # the loss's own knobs: beta, alpha, top_k, ...
    temperature: float = 1.0
    ce_weight: float = 0.0
    reduction: str = "token_mean"
    chunk_size: int = 1024
    weights: Mapping[str, float] = field(default_factory=dict)  # cross-tokenizer term weights

    @property
    def needs_teacher(self) -> bool:
        return self.name != SFT

    @property
    def cross_tokenizer(self) -> bool:
        """True for losses that compare a teacher and a student with different tokenizers (loss=ot|uld)."""
        return self.name in CROSS_TOKENIZER_LOSSES

    def __call__(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | None,
        target_ids: Tensor,
        mask: Tensor,
        teacher_mask: Tensor | None = None,
        hard_labels: bool = True,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(total, each component unweighted) for this batch alone: every term divided by its own unit count.

        A training step instead divides `terms(...)` by global counts (kdlab.losses.normalisation)."""
        terms = self.terms(student_logits, teacher_logits, target_ids, mask, teacher_mask, hard_labels)
        total = student_logits.sum() * 0.0  # a gradient path even when every term is switched off
        for weight, term in terms.values():
            total = total + weight * term.mean()
        return total, {name: term.mean().detach() for name, (_, term) in terms.items()}

    def terms(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | None,
        target_ids: Tensor,
        mask: Tensor,
        teacher_mask: Tensor | None = None,
        hard_labels: bool = True,
    ) -> dict[str, tuple[float, LossSum]]:
        """Each active term by name: (its weight in the total, its LossSum). A term of weight 0 is not computed.

        `teacher_mask` marks the teacher's own response tokens (cross-tokenizer losses); default: `mask`.
        `hard_labels=False` (targets sampled from the student) leaves the CE term out."""
        common = dict(reduction=self.reduction, chunk_size=self.chunk_size)
        unit = REDUCTION_UNITS.get(self.reduction, TOKENS)
        if not self.needs_teacher:
            return {"ce": (1.0, as_loss_sum(cross_entropy(student_logits, target_ids, mask, **common), mask, unit))}
        if self.cross_tokenizer:
            terms = self._cross_tokenizer_terms(
                student_logits, teacher_logits, mask, mask if teacher_mask is None else teacher_mask
            )
        else:
            divergence = get_divergence(self.name)(
                student_logits, teacher_logits, mask, temperature=self.temperature, **self.params, **common
            )
            terms = {self.name: (1.0, as_loss_sum(divergence, mask, unit))}
        if self.ce_weight > 0 and hard_labels:
            ce = cross_entropy(student_logits, target_ids, mask, **common)
            terms["ce"] = (self.ce_weight, as_loss_sum(ce, mask, unit))
        return terms

    def _cross_tokenizer_terms(
        self, student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, teacher_mask: Tensor
    ) -> dict[str, tuple[float, LossSum]]:
        """MultiLevelOT's or ULD's terms, each a mean over the batch's sequences turned into a sum over them."""
        w = {**DEFAULT_WEIGHTS, **self.weights}
        if self.name == "ot":
            term_weights = {"had": w["alpha"] * w["had_weight"], "sl": w["alpha"] * w["beta"],
                            "sd": w["alpha"] * w["gamma"]}
        else:
            term_weights = {"uld": w["uld_weight"]}
        active = tuple(term for term, weight in term_weights.items() if weight != 0)
        kwargs = dict(self.params)
        if self.name == "ot":
            kwargs["components"] = active
        values = CROSS_TOKENIZER_LOSSES[self.name](
            student_logits, teacher_logits, mask, teacher_mask, temperature=self.temperature, **kwargs
        ) if active else {}
        # Means over all rows; a row without scored tokens contributes 0, so mean * rows is the sum over sequences.
        rows, sequences = mask.shape[0], unit_counts(mask)[SEQUENCES]
        return {term: (term_weights[term], LossSum(value * rows, sequences, SEQUENCES))
                for term, value in values.items()}


def build_objective(loss_cfg: Mapping[str, Any]) -> Objective:
    """An Objective from a flat `conf/loss/*.yaml` node: name, the loss's own knobs (`beta`, `alpha`, `top_k`, ...),
    temperature, ce_weight, reduction, chunk_size."""
    name = loss_cfg["name"]
    if name in CROSS_TOKENIZER_LOSSES:
        weight_keys = CROSS_TOKENIZER_WEIGHTS[name]
        own = cross_tokenizer_params(name) - weight_keys
        weights = {key: float(loss_cfg[key]) for key in weight_keys if key in loss_cfg}
    else:
        own = divergence_params(name) if name != SFT else set()
        weights = {}
    return Objective(
        name=name,
        params={key: _number(loss_cfg[key]) for key in own if key in loss_cfg},
        temperature=float(loss_cfg.get("temperature", 1.0)),
        ce_weight=float(loss_cfg.get("ce_weight", 0.0)),
        reduction=loss_cfg.get("reduction", "token_mean"),
        chunk_size=int(loss_cfg.get("chunk_size", 1024)),
        weights=weights,
    )


def _number(value: Any) -> int | float | str:
    """A config value as the loss function takes it: ints stay ints, names (`variant`) stay strings."""
    if isinstance(value, str):
        return value
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else float(value)
