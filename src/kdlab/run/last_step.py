"""The last training step is always logged, and its values are what results.json reports as the run's training end.

Lightning writes step metrics to the loggers every `trainer.log_every_n_steps` steps (and when a run is stopped
early). A run whose length is not a multiple of it ends without its last values in metrics.csv or W&B, and a run
shorter than it logs no training metric at all.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

TRAIN_PREFIX = "train/"


def is_last_step(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether the batch about to run belongs to the run's last optimizer step (max_steps, or the last batch of the
    last epoch when max_epochs bounds the run first)."""
    if trainer.max_steps > 0 and trainer.global_step + 1 >= trainer.max_steps:
        return True
    max_epochs = trainer.max_epochs
    if max_epochs is None or max_epochs < 0:
        return False
    return trainer.current_epoch + 1 >= max_epochs and batch_idx + 1 >= trainer.num_training_batches


class LogLastStep(Callback):
    """For the last step, lowers the logging interval to every step, and restores it once training ends.

    Set before the step starts (on_train_batch_start), so the step's metrics and what callbacks log at its start
    (LearningRateMonitor, when it comes after this callback) reach the loggers through Lightning's own path: a step
    Lightning logs anyway is logged once, not twice."""

    def __init__(self) -> None:
        self._interval: int | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._interval is None and is_last_step(trainer, batch_idx):
            self._interval = trainer.log_every_n_steps
            trainer.log_every_n_steps = 1

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._restore(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        self._restore(trainer)

    def _restore(self, trainer: L.Trainer) -> None:
        if self._interval is not None:
            trainer.log_every_n_steps, self._interval = self._interval, None


def final_train_metrics(trainer: L.Trainer) -> dict[str, float]:
    """The last logged value of each `train/...` metric, without the prefix (`loss`, `jsd`, `reward`,
    `onpolicy_fraction`, ...): read right after fit, they are the last row of metrics.csv."""
    return {name[len(TRAIN_PREFIX):]: float(value) for name, value in trainer.logged_metrics.items()
            if name.startswith(TRAIN_PREFIX)}
