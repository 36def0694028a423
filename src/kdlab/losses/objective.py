"""The training objective a run optimises: a divergence, a cross-tokenizer loss or plain SFT, with a CE term.

    total = divergence(student, teacher) + ce_weight * CE(student, targets)        (loss=fkl|rkl|jsd|tvd|skl|srkl)
    total = ce_weight * CE + alpha * (had_weight * HAD + beta * SL + gamma * SD)     (loss=ot, MultiLevelOT)
    total = ce_weight * CE + uld_weight * ULD                                        (loss=uld)
    total = CE(student, targets)                                                     (loss=sft, no teacher needed)
    total = sampled reverse KL (kdlab.losses.sampled)                                (loss=rkl_sampled)

The loss function is chosen by Hydra: `conf/loss/*.yaml` names it by `_target_` with `_partial_: true`, so
`loss._target_=my_module.my_loss` plugs in a user's own function with no registry. Every loss is called the same way,
`fn(student_logits, teacher_logits, mask, **params)`; the cross-tokenizer ones (loss=ot|uld) also get
`teacher_mask=` and `components=` (the terms to compute), and loss=sft gets the target ids in the teacher's place. A
loss returns a mean over the units of its `reduction` (tokens by default), a `LossSum`, or, cross-tokenizer, a dict
of per-sequence means by term name. The node's other keys are the objective's own: `name` (which calling convention),
`ce_weight`, and for loss=ot|uld the term weights and the CE term's `reduction` and `chunk_size`; `fused` is the
step's (kdlab.step.fused), read by the run. Every default lives in the YAML.

The teacher's side is what the teacher answered (kdlab.teachers.base): its logits, a `TopK` (a cache, a server: the
divergence's top-k form), or `Members` (several teachers: their mixture, or each row's own member's term summed).

A term whose weight is 0 is not computed at all (ablations cost nothing). The CE term is left out on steps that
train on the student's own samples (`hard_labels=False`): cross-entropy on its own samples only reinforces them
(GKD's on-policy objective has no such term). A training step takes each term as a sum (`terms`) and normalises it
once over the whole global batch (kdlab.losses.normalisation); `__call__` normalises over one batch (validation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import hydra
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from kdlab.losses.fused import HiddenStates
from kdlab.losses.normalisation import REDUCTION_UNITS, SEQUENCES, TOKENS, LossSum, as_loss_sum, unit_counts
from kdlab.losses.sampled import RKL_SAMPLED, TOKEN_LOGPROBS, TokenLogprobs, target_logprobs
from kdlab.losses.sft import cross_entropy
from kdlab.losses.sparse import TopK, sparse_form

SFT = "sft"
# Cross-tokenizer losses: each term they return, and the config keys whose product weighs it.
TERM_WEIGHT_KEYS: dict[str, dict[str, tuple[str, ...]]] = {
    "ot": {"had": ("alpha", "had_weight"), "sl": ("alpha", "beta"), "sd": ("alpha", "gamma")},
    "uld": {"uld": ("uld_weight",)},
}
CROSS_TOKENIZER_LOSSES = tuple(TERM_WEIGHT_KEYS)
# Keys of a loss node that configure the objective or the step, not the loss function.
OBJECTIVE_KEYS = ("name", "ce_weight", "fused")
CE_KEYS = ("reduction", "chunk_size")  # loss=ot|uld: settings of the CE term only


@dataclass
class Members:
    """Several teachers' answers for one batch: each member's scores and the rows it teaches (bool, (batch,)), and
    their per-token mixture (None when each row has its own member: routing)."""

    parts: dict[str, tuple[Any, Tensor]]
    mixture: Tensor | TopK | None = None


@dataclass(frozen=True)
class Objective:
    name: str
    loss: Callable[..., Any]  # the loss function with its own settings bound (a Hydra partial)
    ce_weight: float = 0.0
    reduction: str = "token_mean"  # of the CE term, and the unit a loss's plain mean is over
    chunk_size: int = 1024  # of the CE term
    term_weights: Mapping[str, float] = field(default_factory=dict)  # loss=ot|uld: each returned term's weight

    @property
    def needs_teacher(self) -> bool:
        return self.name != SFT

    @property
    def needs_student_samples(self) -> bool:
        """True for objectives that weigh the student's own samples (loss=rkl_sampled): fixed data is refused."""
        return self.name == RKL_SAMPLED

    def teacher_want(self, hard_labels: bool) -> str:
        """What the teacher's `scores` are asked for (kdlab.teachers.base): the log-probabilities of the sampled
        tokens alone for loss=rkl_sampled on the student's samples, else logits (or what stands for them)."""
        return TOKEN_LOGPROBS if self.needs_student_samples and not hard_labels else "logits"

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
        teacher_logits: Tensor | TopK | Members | None,
        target_ids: Tensor,
        mask: Tensor,
        teacher_mask: Tensor | None = None,
        hard_labels: bool = True,
    ) -> dict[str, tuple[float, LossSum]]:
        """Each active term by name: (its weight in the total, its LossSum). A term of weight 0 is not computed.

        `teacher_logits` may be a `TopK` (a cached or remote teacher: the loss's top-k form,
        kdlab.losses.sparse.sparse_form) or `Members` (several teachers: the divergence from their mixture, or with
        routed members the sum of each member's divergence over its own rows). `teacher_mask` marks the teacher's
        own response tokens (cross-tokenizer losses); default: `mask`.
        `hard_labels=False` (targets sampled from the student) leaves the CE term out."""
        unit = REDUCTION_UNITS.get(self.reduction, TOKENS)
        if not self.needs_teacher:
            return {"ce": (1.0, as_loss_sum(self.loss(student_logits, target_ids, mask), mask, unit))}
        if self.cross_tokenizer:
            terms = self.cross_tokenizer_terms(student_logits, teacher_logits, mask, teacher_mask)
        elif isinstance(teacher_logits, Members) and teacher_logits.mixture is None:  # routed: each row its member's
            parts = list(self.member_terms(student_logits, teacher_logits, target_ids, mask).values())
            terms = {self.name: (1.0, LossSum(sum(p.total for p in parts), sum(p.count for p in parts), parts[0].unit))}
        elif self.needs_student_samples:
            terms = {self.name: (1.0, self.sampled_term(student_logits, teacher_logits, target_ids, mask, hard_labels))}
        else:
            terms = {self.name: (1.0, self.divergence_term(student_logits, teacher_logits, mask))}
        if self.ce_weight > 0 and hard_labels:
            terms["ce"] = (self.ce_weight, self.ce_term(student_logits, target_ids, mask))
        return terms

    def divergence_term(self, student_logits: Tensor, teacher: Tensor | TopK | Members, mask: Tensor) -> LossSum:
        """The divergence from a teacher's logits, its top-k (the loss's top-k form) or several teachers' mixture."""
        unit = REDUCTION_UNITS.get(self.reduction, TOKENS)
        teacher = teacher.mixture if isinstance(teacher, Members) else teacher
        if isinstance(teacher, TopK):
            value = sparse_form(self.loss)(student_logits, teacher.logprobs, teacher.ids, teacher.tail, mask)
        else:
            value = self.loss(student_logits, teacher, mask)
        return as_loss_sum(value, mask, unit)

    def sampled_term(self, student_logits: Tensor, teacher: Tensor | TokenLogprobs, target_ids: Tensor, mask: Tensor,
                     hard_labels: bool) -> LossSum:
        """loss=rkl_sampled: on the student's samples the sampled-token estimate (kdlab.losses.sampled), from the
        teacher's token log-probabilities or its logits; on the reference solutions (validation's loss) the exact
        reverse KL, the quantity the estimate's gradient follows, comparable with loss=rkl's val/loss."""
        unit = REDUCTION_UNITS.get(self.reduction, TOKENS)
        if hard_labels:
            if not isinstance(teacher, Tensor):
                raise ValueError("loss=rkl_sampled on fixed targets needs the teacher's logits (the exact reverse KL); "
                                 "it trains on the student's own samples only (policy.student_fraction=1)")
            from kdlab.losses.divergences import reverse_kl

            value = reverse_kl(student_logits, teacher, mask, reduction=self.reduction, chunk_size=self.chunk_size)
            return as_loss_sum(value, mask, unit)
        if isinstance(teacher, Members):
            teacher = teacher.mixture
        if isinstance(teacher, Tensor):
            teacher = TokenLogprobs(target_logprobs(teacher, target_ids), target_ids)
        if not isinstance(teacher, TokenLogprobs):
            raise ValueError(f"loss=rkl_sampled reads the teacher's log-probability of each sampled token; the "
                             f"teacher answered {type(teacher).__name__}")
        return as_loss_sum(self.loss(student_logits, teacher, mask), mask, unit)

    def member_terms(self, student_logits: Tensor, members: Members, target_ids: Tensor,
                     mask: Tensor) -> dict[str, LossSum]:
        """Each member's own divergence from the student over the rows it teaches (all of them in a mixture)."""
        return {name: self.divergence_term(student_logits, scores, mask & rows[:, None])
                for name, (scores, rows) in members.parts.items()}

    def ce_term(self, student_logits: Tensor, target_ids: Tensor, mask: Tensor) -> LossSum:
        """The hard-label cross-entropy term (weighed by `ce_weight` in the total)."""
        unit = REDUCTION_UNITS.get(self.reduction, TOKENS)
        ce = cross_entropy(student_logits, target_ids, mask, reduction=self.reduction, chunk_size=self.chunk_size)
        return as_loss_sum(ce, mask, unit)

    def cross_tokenizer_terms(
        self, student: Tensor | HiddenStates, teacher: Tensor | HiddenStates, mask: Tensor, teacher_mask: Tensor | None
    ) -> dict[str, tuple[float, LossSum]]:
        """The cross-tokenizer loss's active terms, each a mean over the batch's sequences turned into a sum over
        them. Each side is its logits, or (kdlab.step.fused, kdlab's own ot and uld only) `HiddenStates`."""
        active = tuple(term for term, weight in self.term_weights.items() if weight != 0)
        values = self.loss(student, teacher, mask, teacher_mask=teacher_mask, components=active)
        # Means over all rows; a row without scored tokens contributes 0, so mean * rows is the sum over sequences.
        rows, sequences = mask.shape[0], unit_counts(mask)[SEQUENCES]
        terms = {}
        for term, value in values.items():
            term_sum = value if isinstance(value, LossSum) else LossSum(value * rows, sequences, SEQUENCES)
            terms[term] = (self.term_weights[term], term_sum)
        return terms


def build_objective(loss_cfg: Mapping[str, Any]) -> Objective:
    """An Objective from a `conf/loss/*.yaml` node: its `_target_` (a partial) with the node's own settings bound,
    and the objective's keys (name, ce_weight; for loss=ot|uld the term weights and the CE term's settings)."""
    if isinstance(loss_cfg, DictConfig):
        loss_cfg = OmegaConf.to_container(loss_cfg, resolve=True)
    name = loss_cfg["name"]
    weight_keys = TERM_WEIGHT_KEYS.get(name, {})
    own = {*OBJECTIVE_KEYS}
    if weight_keys:
        own |= {key for keys in weight_keys.values() for key in keys} | set(CE_KEYS)
    term_weights = {term: math.prod(float(loss_cfg[key]) for key in keys) for term, keys in weight_keys.items()}
    return Objective(
        name=name,
        loss=hydra.utils.instantiate({key: value for key, value in loss_cfg.items() if key not in own}),
        ce_weight=float(loss_cfg.get("ce_weight", 0.0)),  # loss=sft has none: it is the cross-entropy
        reduction=loss_cfg["reduction"],
        chunk_size=int(loss_cfg["chunk_size"]),
        term_weights=term_weights,
    )
