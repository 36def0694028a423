"""What keeps a training step repeatable and robust: per-step seeding and skipping non-finite steps.

- `step_seed`: the random state of each step is a function of (seed, step, rank), so sampling and dropout after a
  resume repeat the uninterrupted run without saving generator states.
- `NonFiniteGuard`: counts skipped steps (non-finite loss or gradients) and stops the run after too many in a row.
"""

from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_info


class TrainingDiverged(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient."""


def step_seed(seed: int, step: int, rank: int) -> int:
    """A distinct 63-bit seed for each (run seed, optimizer step, process)."""
    return ((seed * 1_000_003 + step) * 8191 + rank) % (2**63 - 1)


class NonFiniteGuard:
    """Counts consecutive skipped steps; `record` raises TrainingDiverged once `max_consecutive` is reached.

    `max_consecutive` comes from `nonfinite.max_consecutive_steps` (its default and its check live in the config)."""

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.streak = 0
        self.skipped = 0

    def record(self, step: int, finite: bool, what: str) -> None:
        if finite:
            self.streak = 0
            return
        self.streak += 1
        self.skipped += 1
        rank_zero_info(f"step {step}: non-finite {what}; the update is skipped "
                       f"({self.streak} in a row, the run stops at {self.max_consecutive})")
        if self.streak >= self.max_consecutive:
            raise TrainingDiverged(
                f"{self.streak} steps in a row (up to step {step}) had a non-finite {what}, so training stopped. "
                "No skipped step changed the weights; the last checkpoint holds the last good state. Try a lower "
                "optimizer.lr, trainer.precision=32-true, a gradient_clip_val, or check the data of those steps"
            )
