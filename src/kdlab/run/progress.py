"""The training progress bar: steps out of max_steps, time left, and the metrics a user watches, in 80 columns."""

from __future__ import annotations

import contextlib
import shutil
import sys
from typing import Any, Mapping

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, convert_inf
from tqdm.contrib.logging import logging_redirect_tqdm

# (logged name, name on the bar, format): the bar's short names; metrics.csv and W&B keep the logged names.
BAR_METRICS = (
    ("train/loss", "loss", "{:.3g}"),
    ("train/tokens_per_sec", "tok/s", None),
    ("train/onpolicy_fraction", "onpol", "{:.2f}"),
    ("train/reward", "reward", "{:.3g}"),
)


def bar_metrics(metrics: Mapping[str, Any]) -> dict[str, str]:
    """The bar's short names and compact values for those of BAR_METRICS that were logged."""
    shown = {}
    for logged, short, pattern in BAR_METRICS:
        if logged in metrics:
            value = float(metrics[logged])
            shown[short] = compact_count(value) if pattern is None else pattern.format(value)
    return shown


def compact_count(value: float) -> str:
    """1234 -> '1234', 12345 -> '12.3k', 1234567 -> '1.23M': a rate in at most five characters."""
    if value < 1e4:
        return f"{value:.0f}"
    if value < 1e6:
        return f"{value / 1e3:.3g}k"
    return f"{value / 1e6:.3g}M"


class StepTqdm(Tqdm):
    """tqdm whose metrics read `loss=0.0123 tok/s=137 onpol=0.50`: one space between them, not tqdm's ", ", which
    keeps a long reward run's line within 80 columns."""

    def set_postfix(self, ordered_dict: Mapping[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.set_postfix_str(" ".join(f"{name}={value}" for name, value in items.items()), refresh=refresh)


class StepProgressBar(TQDMProgressBar):
    """One training bar over optimizer steps, `step 12/400, eta 01:20, loss=… tok/s=… onpol=…`, within 80 columns.

    Lightning's default counts batches per epoch (`Epoch 0/-2` when only max_steps bounds the run) and lists metrics
    by their logged names, cut at the terminal's edge. Scoring bars (`scoring teacher`) show outside training only
and vanish when done: the table reports them."""

    TRAIN_FORMAT = "{desc} {n_fmt}/{total_fmt}, eta {remaining}{postfix}"
    WIDTH = 80

    def __init__(self, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self._redirect: contextlib.AbstractContextManager | None = None

    def init_train_tqdm(self) -> Tqdm:
        return StepTqdm(desc="step", position=2 * self.process_position, disable=self.is_disabled, leave=True,
                    ncols=self._ncols(), file=sys.stdout, smoothing=0, bar_format=self.TRAIN_FORMAT)

    def init_validation_tqdm(self) -> Tqdm:
        # Inside training (a periodic validation) the step bar stays the one line: no second bar interleaves with it.
        # Scoring before and after training shows `scoring <role>`, which vanishes when done (the table reports it).
        fitting = self.trainer.state.fn == "fit"
        return Tqdm(desc="scoring", position=2 * self.process_position, disable=self.is_disabled or fitting,
                    leave=False, dynamic_ncols=False, ncols=self._ncols(), file=sys.stdout, bar_format=self.BAR_FORMAT)

    def on_validation_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        # Lightning's, but named for what runs, the scoring of one model, not "Validation DataLoader 0"
        if not self.has_dataloader_changed(dataloader_idx):
            return
        bar = self.val_progress_bar
        bar.reset()
        bar.total, bar.initial = convert_inf(self.total_val_batches_current_dataloader), 0
        bar.set_description(f"scoring {getattr(pl_module, 'eval_role', 'student')}", refresh=False)

    def _ncols(self) -> int:
        return min(self.WIDTH, shutil.get_terminal_size((self.WIDTH, 24)).columns)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        # log lines while the bar is up (Lightning's "`Trainer.fit` stopped") print above it, not inside its line
        if not self.train_progress_bar.disable:
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()
        total = trainer.max_steps if trainer.max_steps > 0 else convert_inf(trainer.estimated_stepping_batches)
        # a resumed run starts at its checkpoint's step; the rate, and so the eta, counts the steps run here only
        self.train_progress_bar.reset(total=total)
        self.train_progress_bar.initial = self.train_progress_bar.n = trainer.global_step

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        super().on_train_end(trainer, pl_module)
        self._end_redirect()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self._train_progress_bar is not None:
            self._train_progress_bar.close()  # the error then starts on a line of its own
        self._end_redirect()

    def _end_redirect(self) -> None:
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None

    def on_train_epoch_start(self, trainer: Any, *_: Any) -> None:
        pass  # one bar over the whole run, not one per epoch

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        # the module logs a step's tokens/s in its own on_train_batch_end, after this callback's: show it now
        if not self.train_progress_bar.disable and trainer.global_step > 0:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        bar = self.train_progress_bar
        if bar.disable or not self._should_update(trainer.global_step, bar.total):
            return
        bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        bar.n = trainer.global_step
        bar.refresh()

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, str]:
        return bar_metrics(trainer.callback_metrics)
