"""The training objective a run optimises: a divergence, a cross-tokenizer loss or plain SFT, with a CE term.

    total = divergence(student, teacher) + ce_weight * CE(student, targets)        (loss=fkl|rkl|jsd|tvd|skl|srkl)
    total = ce_weight * CE + alpha * (had_weight * HAD + beta * SL + gamma * SD)     (loss=ot, MultiLevelOT)
    total = ce_weight * CE + uld_weight * ULD                                        (loss=uld)
    total = CE(student, targets)                                                     (loss=sft, no teacher needed)

A term whose weight is 0 is not computed at all (ablations cost nothing). The CE term is left out on steps that
train on the student's own samples (`hard_labels=False`): cross-entropy on its own samples only reinforces them
(GKD's on-policy objective has no such term). The module calls the objective once per step; it returns the total and
each component, unweighted, for logging.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from torch import Tensor

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
        """`teacher_mask` marks the teacher's own response tokens (cross-tokenizer losses); default: `mask`.
        `hard_labels=False` (targets sampled from the student) leaves the CE term out."""
        common = dict(reduction=self.reduction, chunk_size=self.chunk_size)
        if not self.needs_teacher:
            ce = cross_entropy(student_logits, target_ids, mask, **common)
            return ce, {"ce": ce.detach()}
        if self.cross_tokenizer:
            total, components = self._cross_tokenizer_terms(
                student_logits, teacher_logits, mask, mask if teacher_mask is None else teacher_mask
            )
        else:
            divergence = get_divergence(self.name)(
                student_logits, teacher_logits, mask, temperature=self.temperature, **self.params, **common
            )
            total, components = divergence, {self.name: divergence.detach()}
        if self.ce_weight > 0 and hard_labels:
            ce = cross_entropy(student_logits, target_ids, mask, **common)
            components["ce"] = ce.detach()
            total = total + self.ce_weight * ce
        return total, components

    def _cross_tokenizer_terms(self, student_logits, teacher_logits, mask, teacher_mask):
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
        terms = CROSS_TOKENIZER_LOSSES[self.name](
            student_logits, teacher_logits, mask, teacher_mask, temperature=self.temperature, **kwargs
        ) if active else {}
        total = student_logits.sum() * 0.0  # a gradient path even when every term is switched off
        for term, value in terms.items():
            total = total + term_weights[term] * value
        return total, {term: value.detach() for term, value in terms.items()}


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
