"""Training rollouts: what a step trained on, a few examples at a time, to read beside the loss curve.

Every `log_rollouts_every_n_steps` optimizer steps (conf/train.yaml; 0: never) the first
`log_rollouts_examples` rows of the step's first micro-batch are scored once more, before the update, and written
to `<run>/rollouts.jsonl` (and, with `logger=wandb`, a `train/rollouts` W&B table):

    step, source (ground_truth | teacher | student: where the targets came from), prompt, target (the text trained
    on: ground truth, a teacher sample or the student's own), prompt_ids, target_ids, tokens,
    student_logprob and teacher_logprob (the sequence's log-likelihood under each model, summed over its tokens),
    divergence (the objective on this sequence alone, CE term left out), reward (GKD Eq. 5 runs only)

The teacher's log-likelihood is null where it is unknown: with several teachers, and with a top-k teacher when a
target token is outside its top-k. Every process scores its own rows (sharded models need every process in each
forward pass); the first process writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from kdlab.losses.sparse import TopK

ROLLOUTS = "rollouts.jsonl"
COLUMNS = ("step", "source", "prompt", "target", "tokens", "student_logprob", "teacher_logprob", "divergence",
           "reward", "prompt_ids", "target_ids")


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


def _row_outside(scores: dict[str, TopK], row: int, width: int) -> dict[str, TopK]:
    return {name: TopK(t.logprobs[row : row + 1, :width], t.ids[row : row + 1, :width], t.tail[row : row + 1, :width],
                       t.mask[row : row + 1, :width]) for name, t in scores.items()}


@torch.no_grad()
def rollout_rows(module: Any, targets: Any, source: str, step: int, examples: int) -> list[dict[str, Any]]:
    """The first `examples` rows of a micro-batch's targets (kdlab.step.module.StepTargets), each scored alone."""
    rows = []
    for i, row in enumerate(targets.batch.split(1)[:examples]):
        ids, mask = row.student.target
        student_logits, local = module._scores(row)  # one scoring serves the divergence and the log-likelihoods
        scores = {**local, **_row_outside(targets.outside_scores, i, ids.shape[1])}
        terms, _ = module._terms_of(student_logits, scores, row, hard_labels=False)
        divergence = sum(weight * term.mean() for weight, term in terms.values())
        prompt_ids, target_ids = (side_ids[side_mask].tolist() for side_ids, side_mask in
                                  (row.student.prompt, row.student.target))
        rows.append({
            "step": step, "source": source, "prompt": module.tokenizer.decode(prompt_ids),
            "target": module.tokenizer.decode(target_ids), "tokens": len(target_ids),
            "student_logprob": sequence_logprob(student_logits, ids, mask),
            "teacher_logprob": _teacher_logprob(module, row, scores.get("teacher")),
            "divergence": float(divergence),
            "reward": float(targets.rewards[i]) if targets.rewards is not None else None,
            "prompt_ids": prompt_ids, "target_ids": target_ids,
        })
    return rows


def _teacher_logprob(module: Any, row: Any, score: Tensor | TopK | None) -> float | None:
    """The one teacher's log-likelihood of the row's target in its own tokens, from the scores the loss used (None
    with several teachers). With loss=sft the teacher takes no part in the loss and is scored here."""
    if module.ensemble is not None:
        return None
    if isinstance(score, TopK):
        return _top_k_logprob(score, *row.student.target)
    side = row.side("teacher")
    if score is None:
        if module.teacher is None:
            return None
        from kdlab.models.scoring import score_targets

        score = score_targets(module.teacher, *side.prompt, *side.target)
        score = score[..., : len(module.teacher_tokenizer or module.tokenizer)]
    return sequence_logprob(score, *side.target)


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
        self.table += [[row[c] if not c.endswith("_ids") else json.dumps(row[c]) for c in COLUMNS] for row in rows]
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":  # the whole table so far: W&B replaces a table per key
                logger.log_table(key="train/rollouts", columns=list(COLUMNS), data=self.table, step=trainer.global_step)
