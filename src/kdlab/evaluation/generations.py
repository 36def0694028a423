"""Evaluation by generation: what a model wrote for each validation prompt, and the task's scores of it.

`DistillationModule.validation_step` returns each batch's generations; `GenerationScorer` (a callback every kdlab
trainer has) collects them, gathers them from every process at the end of the epoch, scores them with the task and
logs the scores (`val/<metric>`, or `teacher/<metric>` when the teacher generated). `evaluate` runs one validation
and returns what was generated and scored, so the caller writes exactly what the scores were computed from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch.distributed as dist

from kdlab.data.tasks import Task
from kdlab.evaluation.mismatch import per_token_means


@dataclass
class Generations:
    """One evaluation: the role that generated, its prompts, predictions and the references, in validation order,
    the task's scores of them (`scores`, and `example_scores`: the headline metric of each example alone, named
    `metric`), and for a student with a teacher in the process the teacher's view of its outputs (`mismatch`:
    kdlab.evaluation.mismatch's per-token means, empty otherwise)."""

    role: str
    predictions: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    mismatch: dict[str, float] = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)
    example_scores: list[float] = field(default_factory=list)
    metric: str = ""

    def rows(self) -> list[dict]:
        """One dict per example: `prompt` (the prompt as the model read it, decoded), `prediction`, `reference`,
        `score` (the task's `metric` of this example alone: accuracy 0 or 1, its ROUGE, sentence BLEU) and
        `metric`."""
        rows = []
        for i, (prediction, reference) in enumerate(zip(self.predictions, self.references)):
            row = {"prompt": self.prompts[i] if i < len(self.prompts) else None, "prediction": prediction,
                   "reference": reference}
            if i < len(self.example_scores):
                row.update(score=self.example_scores[i], metric=self.metric)
            rows.append(row)
        return rows

    def write_jsonl(self, path: Path) -> None:
        """One JSON line per example (`rows`): a score can be checked by reading what was scored, and a wrong
        answer found with its prompt."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            for row in self.rows():
                f.write(json.dumps(row) + "\n")


class GenerationScorer(L.Callback):
    """Collects the generations `validation_step` returns, and scores and logs them once the epoch ends."""

    def __init__(self, task: Task):
        self.task = task
        self.result: Generations | None = None
        self._current = Generations("student")
        # kdlab.evaluation.mismatch's per-row sums, made means at the epoch's end
        self._mismatch_sums: list[list[float]] = []

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._current = Generations(getattr(pl_module, "eval_role", "student"))
        self._mismatch_sums = []

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._current.predictions.extend(outputs["predictions"])
        self._current.references.extend(outputs["references"])
        self._current.prompts.extend(outputs.get("prompts", []))
        self._mismatch_sums.extend(outputs.get("mismatch", []))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        current = self._current
        current.predictions, current.references = _gather(current.predictions), _gather(current.references)
        current.prompts = _gather(current.prompts)
        current.scores, current.example_scores = self.task.score_examples(current.predictions, current.references)
        current.metric = self.task.metric_name
        sums = _gather(self._mismatch_sums)
        current.mismatch = per_token_means(sums) if sums else {}
        prefix = "teacher" if current.role == "teacher" else "val"
        for name, value in current.scores.items():
            pl_module.log(f"{prefix}/{name}", value, prog_bar=True)
        for name, value in current.mismatch.items():
            pl_module.log(f"{prefix}/{name}", value)
        self.result = current


def evaluate(trainer: L.Trainer, module: L.LightningModule, datamodule: Any, role: str) -> Generations:
    """`role`'s ("student" or "teacher") generations on the validation split and the task's scores of them."""
    scorer = next((c for c in trainer.callbacks if isinstance(c, GenerationScorer)), None)
    if scorer is None:
        raise ValueError("evaluate needs a trainer with a kdlab.evaluation.generations.GenerationScorer callback")
    module.eval_role = role
    try:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    finally:
        module.eval_role = "student"
    result, scorer.result = scorer.result, None
    return result


def _gather(items: list) -> list:
    """Every rank's items, in rank order (validation data is split across ranks)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return items
    gathered: list[list] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]
