"""The training step's terms from hidden states: the output layer and the loss as one operation (`loss.fused`).

Both models hand over their last hidden states at the scored positions (kdlab.models.scoring.score_hidden); the
objective's terms are computed from them and the output layers' weights chunk by chunk (kdlab.losses.fused), so no
(batch, positions, vocabulary) logits tensor of either model exists in the step. Each term is the LossSum
`Objective.terms` gives on the logits path: the same per-row losses, weighed by the same row weights (the loss's
reduction times the count of the objective's unit), over the same vocabulary columns (`DistillationStep.scored`).

Fused: a teacher that hands over hidden states and a plain output layer (a decoder-only model in the process:
`Teacher.fused_reason`) with a registered divergence (kdlab.losses.DIVERGENCES: fkl, rkl, jsd, tvd, skl, srkl, each
from its record) or cross-tokenizer loss (ot, uld: each model reads its own tokens and keeps its own tokenizer's
columns; the loss takes each side as `HiddenStates`, and MultiLevelOT's per-sequence ranking makes two passes over
chunks, column sums then the top-k), or loss=sft, and the CE term. Everything else keeps the logits path, and
`fused_off_reason` says why (the run logs it once with `verbose=true`): an outside teacher or several teachers, a
loss function of the user's own, a model whose output layer is not a plain linear map or that is an encoder-decoder,
and models sharded by a strategy other than trainer=fsdp. Under trainer=fsdp (FSDP2,
kdlab.models.sharding.shard_model) the output weight is a sharded DTensor outside its model's forward, so each
model's decoder stack and its reading of the output layer run as one forward of that model
(kdlab.models.sharding.within_forward): FSDP2 gathers the weight whole for it and reduce-scatters the student's
output weight and bias gradients in backward (docs/benchmarks.md section 6).
Validation's loss, training rollouts and steps with a reward (REINFORCE needs the student's log-probabilities of
its samples) always take the logits path.
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from typing import Any, Callable

import torch
from torch import Tensor, nn

from kdlab.losses.chunking import compute_dtype, row_weights
from kdlab.losses.cross_tokenizer import multilevel_ot, universal_logit_distillation
from kdlab.losses.divergences import DIVERGENCES
from kdlab.losses.fused import HiddenStates, OutputLayer, fused_cross_entropy_sum, fused_divergence_sum
from kdlab.losses.normalisation import REDUCTION_UNITS, TOKENS, LossSum, unit_counts
from kdlab.losses.objective import SFT, Objective
from kdlab.losses.sft import cross_entropy
from kdlab.models.scoring import score_hidden
from kdlab.models.sharding import within_forward
from kdlab.teachers.base import HIDDEN
from kdlab.teachers.model import fused_model_reason, output_layer

ALWAYS_UNFUSED = "validation loss, rollouts and steps with a reward (REINFORCE needs the student's logits)"
# kdlab's own loss function for each loss name other than a divergence's (each registered divergence's own is its
# record's dense form, kdlab.losses.DIVERGENCES): only these take hidden states (a user's `_target_` is called on
# logits)
BUILTIN_LOSSES = {SFT: cross_entropy, "ot": multilevel_ot, "uld": universal_logit_distillation}


def builtin_loss(name: str) -> Callable[..., Any] | None:
    """kdlab's own loss function for `loss=<name>` (a registered divergence's dense form), or None."""
    divergence = DIVERGENCES.get(name)
    return divergence.dense if divergence is not None else BUILTIN_LOSSES.get(name)


def loss_settings(objective: Objective) -> dict[str, Any]:
    """The loss function's settings: its signature's defaults, then what the config bound (a Hydra partial)."""
    fn = getattr(objective.loss, "func", objective.loss)
    defaults = {name: p.default for name, p in inspect.signature(fn).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **getattr(objective.loss, "keywords", {})}


def _builtin(objective: Objective) -> bool:
    """Whether the objective's loss is kdlab's own function for its name (a user's `_target_` is not fused)."""
    fn = getattr(objective.loss, "func", objective.loss)
    if getattr(objective.loss, "args", ()):
        return False
    return fn is builtin_loss(objective.name)


def fused_off_reason(objective: Objective, student: nn.Module, teacher: Any) -> str | None:
    """Why training steps of this objective, student and teacher keep the logits path (None: they can be fused).
    The strategy's part (models sharded other than by trainer=fsdp) is the run's to add (kdlab.run.build.use_fused)."""
    if teacher is not None and teacher.tokenizer is not None and objective.needs_teacher \
            and not objective.cross_tokenizer:
        return f"the teacher has its own tokenizer, and loss={objective.name} compares token by token"
    if objective.needs_student_samples:
        return (f"loss={objective.name}'s policy gradient reads the student's log-probabilities of its sampled tokens "
                f"(the logits path)")
    if not _builtin(objective):
        return f"loss._target_ is not kdlab's own loss for loss={objective.name}"
    reason = fused_model_reason(student)
    if reason is not None:
        return f"the student: {reason}"
    if objective.needs_teacher:
        reason = "no teacher" if teacher is None else teacher.fused_reason()
        if reason is not None:
            return f"the teacher: {reason}"
    return None


def unit_row_weights(mask: Tensor, reduction: str, unit: str, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(row weights (batch * positions,), count of `unit`s): the function's mean over `reduction` times the unit
    count, so that sum_rows w loss_row is the LossSum total `as_loss_sum(mean, mask, unit)` makes of the mean."""
    count = unit_counts(mask)[unit]
    return (row_weights(mask.bool(), reduction, dtype) * count.to(dtype)).reshape(-1), count


def fused_terms(step: Any, targets: Any, hard_labels: bool) -> tuple[Tensor, dict[str, tuple[float, LossSum]]]:
    """(a gradient anchor on the student's hidden states, the objective's terms as `Objective.terms` gives them)
    over the targets, computed from hidden states and output layers: the fused counterpart of
    `DistillationStep.terms` (kdlab.step.step).

    Each model's decoder stack and its reading of the output layer run as one forward of that model
    (kdlab.models.sharding.within_forward), the teacher's nested in the student's (`Teacher.scores(..., then=)`): under
    FSDP2 each root unit (embeddings, final norm, output layer) is gathered whole for it, and the gradients of the
    student's output weight and bias are reduce-scattered in backward like every other parameter's. Unsharded, the
    same calls run plainly."""
    return within_forward(step.student, lambda: _student_forward(step, targets, hard_labels))


def _student_forward(step: Any, targets: Any, hard_labels: bool) -> tuple[Tensor, dict[str, tuple[float, LossSum]]]:
    objective, batch = step.objective, targets.batch
    side = batch.student
    ids, mask = side.target
    student_hidden = score_hidden(step.student, *side.prompt, *side.target, step.groups)
    # a scalar, not the hidden states: FSDP2 hooks its backward onto the outputs of a forward and warns at views
    anchor = student_hidden.sum() * 0.0
    flat = student_hidden.reshape(-1, student_hidden.shape[-1])
    labels = torch.where(mask.bool(), ids, torch.zeros((), dtype=ids.dtype, device=ids.device)).reshape(-1)
    layer = output_layer(step.student, step.vocab)  # the student's tokenizer's columns, as on the logits path
    if not objective.needs_teacher:  # loss=sft
        return anchor, {"ce": (1.0, _ce_term(objective, flat, layer, labels, mask))}
    teacher_mask = batch.teacher.target_mask if batch.teacher is not None else None
    own_tokens = step.teacher.tokenizer is not None

    def terms_from(teacher: HiddenStates) -> dict[str, tuple[float, LossSum]]:
        # Inside the teacher's forward, where its output layer is whole; the gradient path to the student is open.
        student_layer, teacher_layer = layer, teacher.layer
        if not own_tokens:  # one tokenizer: the columns both output layers have
            vocab = min(layer.columns, teacher.layer.columns)
            student_layer, teacher_layer = replace(layer, vocab=vocab), replace(teacher.layer, vocab=vocab)
        if objective.cross_tokenizer:  # the bound loss itself, on each side's hidden states: every setting holds
            return objective.cross_tokenizer_terms(HiddenStates(student_hidden, student_layer),
                                                   HiddenStates(teacher.hidden, teacher_layer), mask, teacher_mask)
        return {objective.name: (1.0, _divergence_term(objective, flat, student_layer, teacher.hidden, teacher_layer,
                                                       mask))}

    terms = step.teacher.scores(batch, targets.prepared, HIDDEN, step.groups, then=terms_from)
    if objective.ce_weight > 0 and hard_labels:
        terms["ce"] = (objective.ce_weight, _ce_term(objective, flat, layer, labels, mask))
    return anchor, terms


def _divergence_term(objective: Objective, student: Tensor, student_layer: OutputLayer, teacher_hidden: Tensor,
                     teacher_layer: OutputLayer, mask: Tensor) -> LossSum:
    settings = loss_settings(objective)
    divergence = DIVERGENCES[objective.name]
    teacher = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    dtype = compute_dtype(student, student_layer.weight, teacher, teacher_layer.weight)
    unit = REDUCTION_UNITS.get(objective.reduction, TOKENS)
    weights, count = unit_row_weights(mask, settings["reduction"], unit, dtype)
    total = fused_divergence_sum(divergence, student, student_layer, teacher, teacher_layer, weights,
                                 temperature=float(settings["temperature"]),
                                 **{s.name: float(settings[s.name]) for s in divergence.settings})
    return LossSum(total, count, unit)


def _ce_term(objective: Objective, student: Tensor, layer: OutputLayer, labels: Tensor, mask: Tensor) -> LossSum:
    """The hard-label CE: loss=sft's own (its function's reduction) or the CE term (the objective's reduction)."""
    reduction = loss_settings(objective)["reduction"] if objective.name == SFT else objective.reduction
    unit = REDUCTION_UNITS.get(objective.reduction, TOKENS)
    weights, count = unit_row_weights(mask, reduction, unit, compute_dtype(student, layer.weight))
    return LossSum(fused_cross_entropy_sum(student, layer, labels, weights), count, unit)
