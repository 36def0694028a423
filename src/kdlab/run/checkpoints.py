"""Surviving interruption: the one writer of `last.ckpt`, and checkpoints on preemption signals.

- `LastCheckpoint`: the one writer of `last.ckpt`, every n steps, on a stop request and when training ends, never
  twice for one step.
- `PreemptionCheckpoint`: SIGTERM (schedulers, `kill`), SIGINT (Ctrl-C) or SIGUSR1/SIGUSR2 (SLURM's and submitit's
  warning before a time limit) ask the run to stop. At the end of the current step every process agrees, saves
  `last.ckpt` together (sharded checkpoints are collective) and training stops; `ckpt_path=last` resumes exactly.
  A second Ctrl-C stops at once. A handler installed before (e.g. submitit's requeue on SIGUSR2) still runs, after
  the checkpoint is written.
- `stop_on_sigterm`: outside training, SIGTERM stops the run at once.

Seeding per step and skipping non-finite steps, which make a resume exact and a run robust, belong to the step
(kdlab.step.resilience).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from kdlab.models.sharding import any_rank

STOP_SIGNALS = tuple(s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", None),
                                 getattr(signal, "SIGUSR2", None)) if s is not None)


class RunInterrupted(SystemExit):
    """Training stopped on a signal after saving `last.ckpt`; exits with 128 + the signal number, like a process
    killed by it, so schedulers and shells see an interrupted job, not a finished one."""

    def __init__(self, signum: int, message: str):
        super().__init__(128 + signum)
        self.signum = signum
        self.message = message


@contextmanager
def stop_on_sigterm(output_dir: Path) -> Iterator[None]:
    """Outside training (data, models, evaluation), SIGTERM stops the run at once with RunInterrupted: there is no
    step to finish, and `last.ckpt`, if any, is already on disk. During training PreemptionCheckpoint takes over.
    Lightning's own handler, registered around each trainer call, calls this one too."""

    def handle(signum: int, frame: FrameType | None) -> None:
        raise RunInterrupted(signum, f"interrupted by {signal.Signals(signum).name} outside training; to resume "
                                     f"from the last checkpoint: hydra.run.dir={output_dir} ckpt_path=last")

    handle.kdlab_outer = True  # type: ignore[attr-defined]  # PreemptionCheckpoint does not chain to it
    try:
        previous = signal.signal(signal.SIGTERM, handle)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class LastCheckpoint(Callback):
    """Saves `path` every `every_n_train_steps` optimizer steps, when asked (`save`, on a stop request) and when
    training ends, at most once per step.

    Lightning's ModelCheckpoint(save_last=True) cannot be the writer beside a preemption save: at the end of training
    it saves again and, finding a last.ckpt it did not write itself, writes a second file (last-v1.ckpt) of the same
    step. The trainer runs with `enable_checkpointing=False`, so this callback is the only one that saves.
    """

    def __init__(self, path: Path, every_n_train_steps: int):
        self.path = Path(path)
        self.every_n_train_steps = every_n_train_steps
        self.saved_step: int | None = None  # the global step last.ckpt holds, when this run wrote or resumed it

    def save(self, trainer: L.Trainer) -> None:
        """Write last.ckpt for the current step unless it holds this step already (a collective: every rank calls)."""
        if self.saved_step == trainer.global_step:
            return
        trainer.save_checkpoint(self.path, weights_only=False)  # explicit: Lightning warns when it is unset
        self.saved_step = trainer.global_step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        resumed = trainer.ckpt_path is not None and Path(trainer.ckpt_path).resolve() == self.path.resolve()
        self.saved_step = trainer.global_step if resumed else None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        every = self.every_n_train_steps
        if every > 0 and trainer.global_step > 0 and trainer.global_step % every == 0:
            self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer)  # not on an exception: a diverged run keeps the last good step's checkpoint


class PreemptionCheckpoint(Callback):
    """Turns a stop signal into a checkpoint at the end of the current step (through `last`) and a stopped run."""

    def __init__(self, last: LastCheckpoint):
        self.last = last
        self.requested: int | None = None  # the signal received, until the run stops
        self.stopped_by: int | None = None  # the signal that stopped training
        self.stopped_at_step: int | None = None
        self._previous: dict[int, Any] = {}
        self._saved: dict[int, Any] = {}

    # Installed when training starts, after Lightning's own SIGTERM handler, which it replaces: Lightning's would
    # raise mid-loop, before this callback can write a resumable checkpoint at a step boundary.
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.requested = None
        try:
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread (e.g. a notebook's worker): signals cannot be caught here
            self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without waiting for the step to end
        self.requested = signum
        print(f"\nreceived {signal.Signals(signum).name}: saving {self.last.path.name} at the end of this step, then "
              "stopping", flush=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Every process must take the same decision: the checkpoint below is a collective under FSDP and DDP.
        if not any_rank(self.requested is not None, pl_module.device):
            return
        signum = self.requested or signal.SIGTERM  # a process that got no signal follows the others
        self.last.save(trainer)
        trainer.should_stop = True
        self.stopped_by, self.stopped_at_step = signum, trainer.global_step
        rank_zero_info(f"saved {self.last.path} at step {trainer.global_step}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()
        if self.stopped_by is not None:
            previous = self._previous_handler(self.stopped_by)
            if callable(previous):  # e.g. submitit's requeue on SIGUSR2, now that the checkpoint exists
                previous(self.stopped_by, None)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _previous_handler(self, signum: int) -> Any:
        handler = self._saved.get(signum)
        if handler in (signal.SIG_DFL, signal.SIG_IGN, signal.default_int_handler, None):
            return None
        # Lightning's own SIGTERM handler would kill the other processes and raise mid-loop: it was replaced on
        # purpose. Others (a scheduler's, submitit's) get their turn now that the checkpoint is written.
        if getattr(handler, "kdlab_outer", False) or type(handler).__module__.startswith("lightning"):
            return None
        return handler

    def _restore(self) -> None:
        self._saved = dict(self._previous)
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()
