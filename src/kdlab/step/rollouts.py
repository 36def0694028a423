"""Training rollouts: what a step trained on, a few examples at a time, to read beside the loss curve.

Every `log_rollouts_every_n_steps` optimizer steps (conf/train.yaml; 0: never) the first
`log_rollouts_examples` rows of the step's first micro-batch are scored once more, before the update, and written
to `<run>/rollouts.jsonl` (and, with `logger=wandb`, a `train/rollouts` W&B table):

    step, source (ground_truth | teacher | student: where the targets came from), prompt, target (the text trained
    on: ground truth, a teacher sample or the student's own), prompt_ids, target_ids, tokens,
    student_logprob and teacher_logprob (the sequence's log-likelihood under each model, summed over its tokens),
    divergence (the objective on this sequence alone, CE term left out), reward (GKD Eq. 5 runs only), replaced
    (policy=speculative: the positions in target_ids of the tokens the teacher replaced; null on other steps)

The teacher's log-likelihood is null where it is unknown: with routed teachers, and with a top-k teacher when a target
token is outside its top-k; with several teachers mixed it is the mixture's. Every process scores its own rows (sharded
models need every process in each forward pass); the first process writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from kdlab.losses.objective import Members
from kdlab.losses.sampled import TokenLogprobs
from kdlab.losses.sparse import TopK
from kdlab.teachers.base import LOGITS

ROLLOUTS = "rollouts.jsonl"
COLUMNS = ("step", "source", "prompt", "target", "tokens", "student_logprob", "teacher_logprob", "divergence",
           "reward", "replaced", "prompt_ids", "target_ids")


def sequence_logprob(logits: Tensor, ids: Tensor, mask: Tensor) -> float | None:
    """sum_t log softmax(logits[t])[ids[t]] over the masked tokens of one row (batch of 1); None when a token lies
    past the logits' columns (a sample drawn from an output layer padded beyond the tokenizer: no token at all)."""
    if bool((ids[mask.bool()] >= logits.shape[-1]).any()):
        return None
    logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids.clamp(max=logits.shape[-1] - 1)[..., None])
    return float((logprobs[..., 0] * mask).sum())


def _top_k_logprob(top: TopK, ids: Tensor, mask: Tensor) -> float | None:
    """The sequence's log-likelihood from a top-k, or None when a token is outside it."""
    hit = top.ids == ids[..., None]
    if not bool((hit.any(-1) | ~mask.bool()).all()):
        return None
    return float((top.logprobs * hit).sum(-1).masked_fill(~mask.bool(), 0.0).sum())


@torch.no_grad()
def rollout_rows(step: Any, targets: Any, step_index: int, examples: int) -> list[dict[str, Any]]:
    """The first `examples` rows of a micro-batch's targets (kdlab.step.step.StepTargets), each scored alone by
    `step` (kdlab.step.step.DistillationStep) on the logits path."""
    rows = []
    for i in range(min(examples, len(targets.batch))):
        row = targets.row(i)
        ids, mask = row.batch.student.target
        student_logits, scores = step.scored(row)  # one scoring serves the divergence and the log-likelihoods
        teacher_mask = row.batch.teacher.target_mask if row.batch.teacher is not None else None
        terms = step.objective.terms(student_logits, scores, ids, mask, teacher_mask, hard_labels=False)
        divergence = sum(weight * term.mean() for weight, term in terms.values())
        prompt_ids, target_ids = (side_ids[side_mask].tolist() for side_ids, side_mask in
                                  (row.batch.student.prompt, row.batch.student.target))
        rows.append({
            "step": step_index, "source": targets.source, "prompt": step.tokenizer.decode(prompt_ids),
            "target": step.tokenizer.decode(target_ids), "tokens": len(target_ids),
            "student_logprob": sequence_logprob(student_logits, ids, mask),
            "teacher_logprob": _teacher_logprob(step, row, scores),
            "divergence": float(divergence),
            "reward": float(row.rewards[0]) if row.rewards is not None else None,
            "prompt_ids": prompt_ids, "target_ids": target_ids,
            "replaced": (row.replaced[0][mask[0].bool()].nonzero().flatten().tolist()
                         if row.replaced is not None else None),
        })
    return rows


def _teacher_logprob(step: Any, row: Any, scores: Any) -> float | None:
    """The teacher's log-likelihood of the row's target in its own tokens, from the scores the loss used: its logits,
    its top-k, or several teachers' mixture (None for routed members, whose row has one member's). With loss=sft the
    teacher takes no part in the loss and, when it scores in the process, is scored here."""
    if scores is None:
        if step.teacher is None or not step.teacher.in_process:
            return None
        scores = step.teacher.scores(row.batch, None, LOGITS, step.groups)
    if isinstance(scores, Members):
        scores = scores.mixture
    if isinstance(scores, TopK):
        return _top_k_logprob(scores, *row.batch.student.target)
    if isinstance(scores, TokenLogprobs):  # a server's log-probabilities of the target tokens (loss=rkl_sampled)
        mask = row.batch.student.target_mask.bool()
        return float(scores.logprobs.masked_fill(~mask, 0.0).sum())
    if scores is None:
        return None
    return sequence_logprob(scores, *row.batch.side("teacher").target)


class RolloutWriter(L.Callback):
    """Appends the rows a training step returned (`outputs["rollouts"]`) to rollouts.jsonl, and to a W&B table."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.table: list[list[Any]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        rows = outputs.get("rollouts") if isinstance(outputs, dict) else None
        if not rows or not trainer.is_global_zero:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        self.table += [[json.dumps(row[c]) if c.endswith("_ids") or c == "replaced" else row[c] for c in COLUMNS]
                       for row in rows]
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":  # the whole table so far: W&B replaces a table per key
                logger.log_table(key="train/rollouts", columns=list(COLUMNS), data=self.table, step=trainer.global_step)
