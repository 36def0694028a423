"""Training data order as a pure function of (seed, step): resumable exactly, and the same global batches whatever
the number of processes.

The examples form one endless stream: permutation 0 of the training set, then permutation 1, ... (each drawn from a
generator seeded by (seed, pass)). Global step s trains on stream positions [s*B*W, (s+1)*B*W) for W processes of
B examples each; process r takes positions s*B*W + j*W + r. So one process with batch B*W and W processes with batch
B see the same examples at every step, and a run resumed at step s starts at stream position s*B*W with no state to
save beyond the step count.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DistributedSampler


class StepSampler(DistributedSampler):
    """Indices of process `rank` among `num_replicas` for steps `start_step`..`num_steps - 1` of a run.

    A DistributedSampler subclass so Lightning keeps it instead of injecting its own (which would reshuffle per
    rank and restart the epoch on resume). Its length is the whole run's (`num_steps` batches) even when resumed
    part-way, so that Lightning's restored batch count and the loader end together. With `num_steps=None` it covers
    one pass over the data (epoch-based training; `set_epoch` moves to the next pass).
    """

    def __init__(self, dataset_size: int, batch_size: int, seed: int, *, num_replicas: int = 1, rank: int = 0,
                 start_step: int = 0, num_steps: int | None = None):
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.start_step = start_step
        self.epoch = 0
        self.global_batch = batch_size * num_replicas
        self.steps_per_pass = dataset_size // self.global_batch
        if self.steps_per_pass == 0:
            raise ValueError(f"{dataset_size} training examples are fewer than one global batch "
                             f"({batch_size} x {num_replicas} processes)")
        self.num_steps = num_steps

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _steps(self) -> range:
        if self.num_steps is not None:
            return range(0, self.num_steps)
        first = self.epoch * self.steps_per_pass  # epoch-based: whole passes, the last partial global batch dropped
        return range(first, first + self.steps_per_pass)

    def _permutation(self, data_pass: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + data_pass)
        return torch.randperm(self.dataset_size, generator=generator)

    def __iter__(self) -> Iterator[int]:
        cache: dict[int, torch.Tensor] = {}
        usable = self.steps_per_pass * self.global_batch  # positions per pass; the remainder is dropped each pass
        for step in self._steps():
            if step < self.start_step:  # already trained on before the run was resumed
                continue
            for j in range(self.batch_size):
                position = step * self.global_batch + j * self.num_replicas + self.rank
                data_pass, offset = divmod(position, usable)
                if data_pass not in cache:
                    cache.clear()
                    cache[data_pass] = self._permutation(data_pass)
                yield int(cache[data_pass][offset])

    def __len__(self) -> int:
        return len(self._steps()) * self.batch_size
