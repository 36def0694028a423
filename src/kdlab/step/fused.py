"""The training step's terms from hidden states: the output layer and the loss as one operation (`loss.fused`).

Both models hand over their last hidden states at the scored positions (kdlab.models.scoring.score_hidden); the objective's
terms are computed from them and the output layers' weights chunk by chunk (kdlab.losses.fused), so no
(batch, positions, vocabulary) logits tensor of either model exists in the step. Each term is the LossSum
`Objective.terms` gives on the logits path: the same per-row losses, weighed by the same row weights (the loss's
reduction times the count of the objective's unit), over the same vocabulary columns (`DistillationModule._scores`).

Fused: a run with one teacher model in the process and a built-in divergence (fkl, rkl, jsd, tvd, skl, srkl) or
cross-tokenizer loss (ot, uld: each model reads its own tokens and keeps its own tokenizer's columns; the loss takes
each side as `HiddenStates`, and MultiLevelOT's per-sequence ranking makes two passes over chunks, column sums then
the top-k), or loss=sft, and the CE term. Everything else keeps the logits path, and `fused_off_reason` says why
(logged once at start-up): an outside teacher or several teachers, a loss function of the user's own, a model whose
output layer is not a plain linear map or that is an encoder-decoder, and models sharded by a strategy other than
strategy=fsdp. Under strategy=fsdp (FSDP2, kdlab.models.sharding.shard_model) the output weight is a sharded DTensor
outside its model's forward, so each model's decoder stack and its reading of the output layer run as one forward of
that model (kdlab.models.sharding.within_forward): FSDP2 gathers the weight whole for it and reduce-scatters the
student's output weight and bias gradients in backward (docs/benchmarks.md section 6).
Validation's loss, training rollouts and steps with a reward (REINFORCE needs the student's log-probabilities of
its samples) always take the logits path.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from torch import Tensor, nn

from kdlab.losses.chunking import compute_dtype, row_weights
from kdlab.losses.cross_tokenizer import multilevel_ot, universal_logit_distillation
from kdlab.losses.divergences import DIVERGENCES
from kdlab.losses.fused import (
    HiddenStates,
    OutputLayer,
    fused_cross_entropy_sum,
    fused_divergence_sum,
    unfused_reason,
)
from kdlab.losses.normalisation import REDUCTION_UNITS, TOKENS, LossSum, unit_counts
from kdlab.losses.objective import SFT, Objective
from kdlab.losses.sft import cross_entropy
from kdlab.models.scoring import decoder_of, score_hidden, unwrap
from kdlab.models.sharding import FSDP2Strategy, within_forward

log = logging.getLogger(__name__)

ALWAYS_UNFUSED = "validation loss, rollouts and steps with a reward (REINFORCE needs the student's logits)"
# kdlab's own loss function for each loss name: only these take hidden states (a user's `_target_` is called on logits)
BUILTIN_LOSSES = {**DIVERGENCES, SFT: cross_entropy, "ot": multilevel_ot, "uld": universal_logit_distillation}


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
    return fn is BUILTIN_LOSSES.get(objective.name)


def model_reason(model: nn.Module) -> str | None:
    """Why `model`'s terms cannot come from its hidden states (None when they can)."""
    model = unwrap(model)
    if decoder_of(model) is None:
        return f"{type(model).__name__} is not a decoder-only model with a decoder stack apart from its output layer"
    return unfused_reason(model)


def fused_off_reason(module: Any) -> str | None:
    """Why a DistillationModule's training steps keep the logits path (None: they are fused)."""
    objective = module.objective
    if not objective.fused:
        return "loss.fused=false"
    if module.cross_tokenizer and objective.needs_teacher and not objective.cross_tokenizer:
        return f"the teacher has its own tokenizer, and loss={objective.name} compares token by token"
    if module.outside_teacher is not None or module.ensemble is not None:
        return "the teacher is outside the process or several teachers (their top-k or combination is logits-level)"
    if objective.needs_teacher and module.teacher is None:
        return "no teacher model in the process"
    if not _builtin(objective):
        return f"loss._target_ is not kdlab's own loss for loss={objective.name}"
    if module._sharded and not isinstance(getattr(module._trainer, "strategy", None), FSDP2Strategy):
        return ("the models are sharded by a strategy other than strategy=fsdp, whose FSDP2 units run the fused loss "
                "inside their forward (kdlab.models.sharding.within_forward); others leave the output weight sharded")
    for role, model in (("student", module.student), ("teacher", module.teacher)):
        reason = None if model is None else model_reason(model)
        if reason is not None:
            return f"the {role}: {reason}"
    return None


def output_layer(model: nn.Module, vocab: int | None) -> OutputLayer:
    """The model's output layer as kdlab.losses.fused reads it (checked plain by `fused_off_reason` already)."""
    model = unwrap(model)
    head = model.get_output_embeddings()
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    softcap = getattr(config, "final_logit_softcapping", None)
    return OutputLayer(head.weight, head.bias, float(softcap) if softcap else None, vocab)


def unit_row_weights(mask: Tensor, reduction: str, unit: str, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(row weights (batch * positions,), count of `unit`s): the function's mean over `reduction` times the unit
    count, so that sum_rows w loss_row is the LossSum total `as_loss_sum(mean, mask, unit)` makes of the mean."""
    count = unit_counts(mask)[unit]
    return (row_weights(mask.bool(), reduction, dtype) * count.to(dtype)).reshape(-1), count


def fused_terms(module: Any, batch: Any, hard_labels: bool) -> tuple[Tensor, dict[str, tuple[float, LossSum]]]:
    """(a gradient anchor on the student's hidden states, the objective's terms as `Objective.terms` gives them)
    over the batch's targets, computed from hidden states and output layers: the fused counterpart of
    `DistillationModule._terms` for one local teacher (or none: loss=sft).

    Each model's decoder stack and its reading of the output layer run as one forward of that model
    (kdlab.models.sharding.within_forward), the teacher's nested in the student's: under FSDP2 each root unit (embeddings,
    final norm, output layer) is gathered whole for it, and the gradients of the student's output weight and bias
    are reduce-scattered in backward like every other parameter's. Unsharded, the same calls run plainly."""
    return within_forward(module.student, lambda: _student_forward(module, batch, hard_labels))


def _student_forward(module: Any, batch: Any, hard_labels: bool) -> tuple[Tensor, dict[str, tuple[float, LossSum]]]:
    objective, side = module.objective, batch.student
    ids, mask = side.target
    groups = 1 if module._sharded else module.score_groups
    student_hidden = score_hidden(module.student, *side.prompt, *side.target, groups)
    # a scalar, not the hidden states: FSDP2 hooks its backward onto the outputs of a forward and warns at views
    anchor = student_hidden.sum() * 0.0
    flat = student_hidden.reshape(-1, student_hidden.shape[-1])
    labels = torch.where(mask.bool(), ids, torch.zeros((), dtype=ids.dtype, device=ids.device)).reshape(-1)
    if not objective.needs_teacher:  # loss=sft: the tokenizer's columns, as on the logits path
        layer = output_layer(module.student, min(len(module.tokenizer), _rows(module.student)))
        return anchor, {"ce": (1.0, _ce_term(objective, flat, layer, labels, mask))}
    student_vocab, teacher_vocab = _vocabularies(module)
    layer = output_layer(module.student, student_vocab)
    # with its own tokenizer the teacher reads its own prompt and target tokens, and a cross-tokenizer loss its mask
    teacher_side = batch.side("teacher")
    teacher_mask = batch.teacher.target_mask if batch.teacher is not None else None
    grad_enabled = torch.is_grad_enabled()

    def teacher_forward() -> dict[str, tuple[float, LossSum]]:
        # The teacher's forward runs without grad (FSDP2 then hooks nothing of the frozen teacher into backward);
        # the loss's gradient path to the student opens inside it, where the teacher's output layer is whole.
        teacher_hidden = score_hidden(module.teacher, *teacher_side.prompt, *teacher_side.target, groups)
        teacher_layer = output_layer(module.teacher, teacher_vocab)
        with torch.set_grad_enabled(grad_enabled):
            if objective.cross_tokenizer:  # the bound loss itself, on each side's hidden states: every setting holds
                return objective.cross_tokenizer_terms(HiddenStates(student_hidden, layer),
                                                       HiddenStates(teacher_hidden, teacher_layer), mask, teacher_mask)
            return {objective.name: (1.0, _divergence_term(objective, flat, layer, teacher_hidden, teacher_layer,
                                                           mask))}

    with torch.no_grad():
        terms = within_forward(module.teacher, teacher_forward)
    if objective.ce_weight > 0 and hard_labels:
        terms["ce"] = (objective.ce_weight, _ce_term(objective, flat, layer, labels, mask))
    return anchor, terms


def _rows(model: nn.Module) -> int:
    # a sharded weight outside its model's forward is a DTensor: its shape is the whole weight's
    return unwrap(model).get_output_embeddings().weight.shape[0]


def _vocabularies(module: Any) -> tuple[int, int]:
    """(the student's, the teacher's) logit columns, those `DistillationModule._scores` keeps: with its own tokenizer
    each model its tokenizer's, else the tokenizer's columns both output layers have."""
    if module.cross_tokenizer:
        return (min(len(module.tokenizer), _rows(module.student)),
                min(len(module.teacher_tokenizer), _rows(module.teacher)))
    vocab = min(len(module.tokenizer), _rows(module.student), _rows(module.teacher))
    return vocab, vocab


def _divergence_term(objective: Objective, student: Tensor, student_layer: OutputLayer, teacher_hidden: Tensor,
                     teacher_layer: OutputLayer, mask: Tensor) -> LossSum:
    settings = loss_settings(objective)
    teacher = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    dtype = compute_dtype(student, student_layer.weight, teacher, teacher_layer.weight)
    unit = REDUCTION_UNITS.get(objective.reduction, TOKENS)
    weights, count = unit_row_weights(mask, settings["reduction"], unit, dtype)
    total = fused_divergence_sum(objective.name, student, student_layer, teacher, teacher_layer, weights,
                                 temperature=float(settings["temperature"]), beta=float(settings.get("beta", 0.5)),
                                 alpha=float(settings.get("alpha", 0.1)))
    return LossSum(total, count, unit)


def _ce_term(objective: Objective, student: Tensor, layer: OutputLayer, labels: Tensor, mask: Tensor) -> LossSum:
    """The hard-label CE: loss=sft's own (its function's reduction) or the CE term (the objective's reduction)."""
    reduction = loss_settings(objective)["reduction"] if objective.name == SFT else objective.reduction
    unit = REDUCTION_UNITS.get(objective.reduction, TOKENS)
    weights, count = unit_row_weights(mask, reduction, unit, compute_dtype(student, layer.weight))
    return LossSum(fused_cross_entropy_sum(student, layer, labels, weights), count, unit)


def log_plan(module: Any) -> str | None:
    """Log, once at start-up, which training steps are fused and what keeps the logits path; the reason or None."""
    reason = fused_off_reason(module)
    if reason is None:
        log.info("loss.fused: training steps compute loss=%s%s from hidden states and the output layers; the logits "
                 "path stays for %s", module.objective.name, " and its CE term" if module.objective.ce_weight > 0
                 else "", ALWAYS_UNFUSED)
    elif module.objective.fused:
        log.info("loss.fused: training steps keep the logits path: %s", reason)
    return reason
