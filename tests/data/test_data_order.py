"""StepSampler: data order as a function of (seed, step), shared by any number of processes, resumable."""

import torch
from torch.utils.data import DistributedSampler

from kdlab.data.order import StepSampler


def batches(sampler: StepSampler) -> list[list[int]]:
    indices = list(sampler)
    return [indices[i : i + sampler.batch_size] for i in range(0, len(indices), sampler.batch_size)]


def test_two_processes_see_the_global_batches_of_one():
    one = batches(StepSampler(50, 8, seed=3, num_steps=10))
    ranks = [batches(StepSampler(50, 4, seed=3, num_replicas=2, rank=r, num_steps=10)) for r in (0, 1)]
    for step in range(10):
        assert sorted(ranks[0][step] + ranks[1][step]) == sorted(one[step])
        assert not set(ranks[0][step]) & set(ranks[1][step])


def test_each_pass_is_a_permutation_and_passes_differ():
    sampler = StepSampler(24, 4, seed=0, num_steps=12)  # 6 steps per pass: two passes
    indices = list(sampler)
    first, second = indices[:24], indices[24:]
    assert sorted(first) == list(range(24)) and sorted(second) == list(range(24))
    assert first != second
    assert len(sampler) == 48


def test_the_last_partial_global_batch_of_a_pass_is_dropped():
    indices = list(StepSampler(10, 4, seed=1, num_steps=2))  # 2 steps per pass of 10: 8 used, 2 dropped
    assert len(set(indices)) == 8


def test_resuming_skips_exactly_the_steps_already_trained():
    full = batches(StepSampler(40, 4, seed=7, num_replicas=2, rank=1, num_steps=9))
    resumed = StepSampler(40, 4, seed=7, num_replicas=2, rank=1, start_step=5, num_steps=9)
    assert batches(resumed) == full[5:]
    assert len(resumed) == 9 * 4  # the whole run's length, so Lightning's restored batch count ends with the data


def test_order_depends_on_the_seed_and_lightning_keeps_the_sampler():
    a, b = list(StepSampler(30, 5, seed=0, num_steps=3)), list(StepSampler(30, 5, seed=1, num_steps=3))
    assert a != b and a == list(StepSampler(30, 5, seed=0, num_steps=3))
    assert isinstance(StepSampler(30, 5, seed=0), DistributedSampler)  # Lightning injects none of its own


def test_epoch_mode_moves_to_the_next_pass_with_set_epoch():
    sampler = StepSampler(12, 3, seed=2)  # no num_steps: one pass per epoch
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert sorted(epoch0) == sorted(epoch1) == list(range(12)) and epoch0 != epoch1
    reference = torch.randperm(12, generator=torch.Generator().manual_seed(2 * 1_000_003 + 1)).tolist()
    assert epoch1 == reference
