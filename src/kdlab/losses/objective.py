"""The training objective a run optimises: one divergence (or plain SFT) plus an optional hard-label CE term.

    total = divergence(student, teacher) + ce_weight * CE(student, targets)        (loss=fkl|rkl|jsd|tvd|skl|srkl)
    total = CE(student, targets)                                                     (loss=sft, no teacher needed)

The module calls it once per step; it returns the total and each component for logging.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from torch import Tensor

from kdlab.losses.registry import divergence_params, get_divergence
from kdlab.losses.sft import cross_entropy

SFT = "sft"


@dataclass(frozen=True)
class Objective:
    name: str
    params: Mapping[str, Any] = field(default_factory=dict)  # the divergence's own knobs: beta, alpha
    temperature: float = 1.0
    ce_weight: float = 0.0
    reduction: str = "token_mean"
    chunk_size: int = 1024

    @property
    def needs_teacher(self) -> bool:
        return self.name != SFT

    def __call__(
        self, student_logits: Tensor, teacher_logits: Tensor | None, target_ids: Tensor, mask: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        common = dict(reduction=self.reduction, chunk_size=self.chunk_size)
        if not self.needs_teacher:
            ce = cross_entropy(student_logits, target_ids, mask, **common)
            return ce, {"ce": ce.detach()}
        divergence = get_divergence(self.name)(
            student_logits, teacher_logits, mask, temperature=self.temperature, **self.params, **common
        )
        components = {self.name: divergence.detach()}
        total = divergence
        if self.ce_weight > 0:
            ce = cross_entropy(student_logits, target_ids, mask, **common)
            components["ce"] = ce.detach()
            total = total + self.ce_weight * ce
        return total, components


def build_objective(loss_cfg: Mapping[str, Any]) -> Objective:
    """An Objective from a flat `conf/loss/*.yaml` node: name, the divergence's own knobs (`beta`, `alpha`),
    temperature, ce_weight, reduction, chunk_size."""
    name = loss_cfg["name"]
    own = divergence_params(name) if name != SFT else set()
    return Objective(
        name=name,
        params={key: float(loss_cfg[key]) for key in own if key in loss_cfg},
        temperature=float(loss_cfg.get("temperature", 1.0)),
        ce_weight=float(loss_cfg.get("ce_weight", 0.0)),
        reduction=loss_cfg.get("reduction", "token_mean"),
        chunk_size=int(loss_cfg.get("chunk_size", 1024)),
    )
