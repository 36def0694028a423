"""Lightning callbacks the tests plug into real runs with `+callbacks.<name>._target_=tests.workers.callbacks.<Class>`:
they interrupt a run or poison one step the way a preemption or an overflow would."""

from __future__ import annotations

import math
import os
import signal

import torch
from lightning.pytorch.callbacks import Callback


class SignalAt(Callback):
    """Sends this process `signum` (default SIGTERM) when training reaches `step`, as a scheduler would."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM), rank: int = 0):
        self.step, self.signum, self.rank = step, signum, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), self.signum)


class NonFiniteAt(Callback):
    """Makes the loss (what="loss") or one gradient (what="gradient") NaN at the given optimizer steps, and records
    the student's weights before and after each step so a test can check what a step changed."""

    def __init__(self, steps: list[int], what: str = "loss"):
        self.steps, self.what = set(steps), what
        self.before: dict[int, list[torch.Tensor]] = {}
        self.after: dict[int, list[torch.Tensor]] = {}
        self._poisoned = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        self.before[step] = [p.detach().clone() for p in pl_module.student.parameters()]
        if step in self.steps and self.what == "loss":  # every micro-batch's loss and logged terms (any path)
            real = pl_module.step.loss

            def poisoned(*args, **kwargs):
                loss, values = real(*args, **kwargs)
                return loss * math.nan, {name: value * math.nan for name, value in values.items()}

            pl_module.step.loss, self._poisoned = poisoned, True

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step in self.steps and self.what == "gradient":
            grad = next(p for p in pl_module.student.parameters() if p.grad is not None).grad
            grad.view(-1)[0] = math.inf

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._poisoned:
            del pl_module.step.loss  # the class's own method again
            self._poisoned = False
        self.after[trainer.global_step - 1] = [p.detach().clone() for p in pl_module.student.parameters()]


class SignalOnValidation(Callback):
    """Sends this process SIGTERM as the first evaluation (before training) starts."""

    def on_validation_start(self, trainer, pl_module):
        if trainer.global_step == 0 and trainer.global_rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)


SERVERS: dict[str, object] = {}  # teacher servers a test started, by name, for ShutDownServerAt


class ShutDownServerAt(Callback):
    """Stops the named teacher server (from SERVERS) once `step` optimizer steps are done: the next step finds it
    gone, as when a teacher server crashes mid-run."""

    def __init__(self, step: int, name: str = "teacher"):
        self.step, self.name = step, name

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and self.name in SERVERS:
            server = SERVERS.pop(self.name)
            server.shutdown()
            server.server_close()
