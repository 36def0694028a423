"""`teacher=cached`: a teacher read from the top-k cache `kdlab-cache-teacher` wrote (kdlab.teachers.cache).

No teacher model loads. For every target token of a training example the cache holds the teacher's top-k
log-probabilities, their ids and the log of the remaining mass (`TopK`, aligned with the student's target logits), so
the step trains on the top-k form of its divergence (kdlab.losses.sparse). Only fixed targets are cached: the ground
truth, or with `cache.targets=teacher` one teacher sample per example, which a SeqKD run trains on (`sample`), so
on-policy steps are refused at start-up (kdlab.teachers.build). Rows are found by each example's index in the
training split (`Batch.index`).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from kdlab.data.batch import Batch
from kdlab.losses.sparse import TopK
from kdlab.sampling.base import SamplingSettings

OUTSIDE_REASON = "the teacher is outside the process (its top-k is logits-level)"


class CachedTeacher:
    """The top-k a cache holds for each training example (see the module doc)."""

    models: list[nn.Module] = []
    tokenizer = None
    in_process = False
    generates = False

    def __init__(self, cache: Any, pad_token_id: int, name: str = "cached"):
        self.cache = cache  # kdlab.teachers.cache.TeacherCache
        self.pad_token_id, self.name = pad_token_id, name

    def fused_reason(self) -> str | None:
        return OUTSIDE_REASON

    def prepare(self, batch: Batch) -> TopK:
        """The cached top-k of every target token of the batch's examples."""
        mask = batch.student.target_mask
        rows = []
        for index, length in zip(_indices(batch), mask.sum(dim=1).tolist()):
            logprobs, ids, tail = self.cache[index]
            if len(ids) != length:
                raise ValueError(f"the teacher cache holds {len(ids)} target tokens for training example {index}, "
                                 f"the batch {length}: the cache was written for other targets")
            rows.append((logprobs, ids, tail))
        return padded_top_k(rows, mask, self.cache.k)

    def scores(self, batch: Batch, prepared: TopK, want: str = "logits", groups: int = 1,
               then: Callable[[Any], Any] | None = None) -> Any:
        return then(prepared) if then is not None else prepared

    def sample(self, batch: Batch, settings: SamplingSettings, lockstep: bool = False) -> tuple[Tensor, Tensor]:
        """SeqKD targets for the batch's examples: the samples the cache drew from the teacher for each, right-padded
        like a sampler's output (EOS included where the sample reached one), so the step goes on as if the teacher
        had sampled them now; `prepare` then reads their rows. `settings` were checked against the cache's at start."""
        rows = [self.cache.targets(index) for index in _indices(batch)]
        ids = torch.full((len(rows), max(len(r) for r in rows)), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(ids.shape, dtype=torch.bool)
        for b, row in enumerate(rows):
            ids[b, : len(row)], mask[b, : len(row)] = row, True
        device = batch.student.prompt_ids.device
        return ids.to(device), mask.to(device)


def _indices(batch: Batch) -> list[int]:
    if batch.index is None:
        raise ValueError("a cached teacher needs each row's example index (Batch.index)")
    return batch.index.tolist()


def padded_top_k(rows: Sequence[tuple[Tensor, Tensor, Tensor]], mask: Tensor, k: int) -> TopK:
    """Per-row (n, k) top-k into (batch, positions, k), placed where `mask` holds each row's n target tokens."""
    batch, width = mask.shape
    logprobs = torch.zeros(batch, width, k)
    ids = torch.zeros(batch, width, k, dtype=torch.long)
    tail = torch.zeros(batch, width)
    for b, (lp, token_ids, t) in enumerate(rows):
        n = len(token_ids)
        logprobs[b, :n], ids[b, :n], tail[b, :n] = lp, token_ids, t
    return TopK(logprobs, ids, tail, mask.cpu().bool()).to(mask.device)
