"""Several teachers sharing the student's tokenizer, mixed per token: p(v) = sum_i w_i p_i(v).

    python train.py teacher=arith_pair        # conf/teacher/arith_pair.yaml: the arith teacher and a weaker peer

Each member is a teacher of any kind (a model in this process, a cache, a server); the weights are normalised to
sum to 1. With every member a model the mixture is exact over the shared vocabulary:
log p = logsumexp_i(log w_i + log softmax(z_i)), which the divergence reads as the teacher's logits (so
`loss.temperature` tempers the mixture, not each member).

With a cached or remote member, every member is a top-k (a model member its own top `teacher.top_k`) and the mixture
lives on the union of the members' ids plus one tail bucket: p(v) = sum_i w_i p_i(v) [v in top-k_i] and
tail = sum_i w_i tail_i. A member's mass on another member's ids outside its own top-k stays in its tail: the bucket
approximation of kdlab.losses.sparse, member by member; with k = the vocabulary it is the exact mixture.

The step also logs each member's own divergence from the student (`train/teacher/<name>`), from the parts of the
`Members` answer.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from kdlab.data.batch import Batch
from kdlab.losses.sparse import TopK, top_k_of_logits
from kdlab.sampling.base import SamplingSettings
from kdlab.teachers.base import LOGITS, Members, Teacher, full_rows

SEVERAL_REASON = "several teachers (their combination is logits-level)"


class Several:
    """What a mixture and a routed set of teachers share: members by name, each prepared and scored in turn."""

    tokenizer = None
    generates = False

    def __init__(self, members: Mapping[str, Teacher]):
        self.members = dict(members)
        self.models: list[nn.Module] = [m for member in self.members.values() for m in member.models]
        self.in_process = all(member.in_process for member in self.members.values())

    def fused_reason(self) -> str | None:
        return SEVERAL_REASON

    def prepare(self, batch: Batch) -> dict[str, Any]:
        return {name: member.prepare(batch) for name, member in self.members.items()}

    def member_scores(self, batch: Batch, prepared: Mapping[str, Any] | None, groups: int) -> dict[str, Any]:
        prepared = prepared or {}
        return {name: member.scores(batch, prepared.get(name), LOGITS, groups)
                for name, member in self.members.items()}

    def sample(self, batch: Batch, settings: SamplingSettings, lockstep: bool = False) -> tuple[Tensor, Tensor]:
        raise ValueError("several teachers cannot sample one set of targets (refused at start-up)")


class MixtureTeacher(Several):
    """Members mixed per token with normalised weights (see the module doc)."""

    def __init__(self, members: Mapping[str, Teacher], weights: Mapping[str, float], vocab: int, top_k: int,
                 name: str = "mixture"):
        super().__init__(members)
        total = sum(float(weights[n]) for n in self.members)
        self.weights = {n: float(weights[n]) / total for n in self.members}
        self.vocab, self.top_k, self.name = vocab, top_k, name

    def scores(self, batch: Batch, prepared: Any = None, want: str = LOGITS, groups: int = 1,
               then: Callable[[Any], Any] | None = None) -> Members:
        scores = self.member_scores(batch, prepared, groups)
        rows = full_rows(batch)
        out = Members({name: (score, rows) for name, score in scores.items()}, self.mixed(scores, batch))
        return then(out) if then is not None else out

    def mixed(self, scores: Mapping[str, Tensor | TopK], batch: Batch) -> Tensor | TopK:
        """Dense log-probabilities when every member is dense, else a TopK over the union of the members' ids."""
        names = list(self.members)
        if all(isinstance(scores[n], Tensor) for n in names):
            width = min(scores[n].shape[-1] for n in names)  # the columns every member's output layer has
            return torch.logsumexp(torch.stack([torch.log_softmax(scores[n][..., :width].float(), dim=-1)
                                                + math.log(self.weights[n]) for n in names]), dim=0)
        tops = [self.as_top_k(scores[n], batch.student.target_mask) for n in names]
        return mix_top_k(tops, [self.weights[n] for n in names], self.vocab)

    def as_top_k(self, score: Tensor | TopK, mask: Tensor) -> TopK:
        """A member as a top-k: an outside member as it answered, a model member its own top `top_k`."""
        if isinstance(score, TopK):
            return score
        logprobs, ids, tail = top_k_of_logits(score, min(self.top_k, score.shape[-1]))
        return TopK(logprobs, ids, tail, mask.bool())


def mix_top_k(tops: list[TopK], weights: list[float], vocab: int) -> TopK:
    """sum_i w_i p_i over the union of the members' ids (module doc), with one tail bucket: sum_i w_i tail_i."""
    ids = torch.cat([t.ids for t in tops], dim=-1)
    probs = torch.cat([w * t.logprobs.double().exp() for t, w in zip(tops, weights)], dim=-1)
    tail = torch.logsumexp(torch.stack([t.tail.double() + math.log(w) for t, w in zip(tops, weights)]), dim=0)
    width = min(ids.shape[-1], vocab)
    return _merged(ids, probs, tail, width, tops[0].mask)


def _merged(ids: Tensor, probs: Tensor, tail: Tensor, width: int, mask: Tensor) -> TopK:
    """Entries with the same id summed into one bucket, `width` slots per row; slots left over repeat the row's first
    id with probability 0, which the sparse losses read as empty buckets."""
    lead = ids.shape[:-1]
    ids, probs = ids.reshape(-1, ids.shape[-1]), probs.reshape(-1, probs.shape[-1])
    sorted_ids, order = ids.sort(dim=-1)
    sorted_probs = probs.gather(-1, order)
    repeat = torch.zeros_like(sorted_ids, dtype=torch.bool)
    repeat[:, 1:] = sorted_ids[:, 1:] == sorted_ids[:, :-1]
    slot = (~repeat).long().cumsum(dim=-1) - 1  # the bucket of each entry: its id's first occurrence
    merged_probs = torch.zeros_like(sorted_probs).scatter_add_(-1, slot, sorted_probs)[:, :width]
    merged_ids = torch.full_like(sorted_ids, -1).scatter_(-1, slot, sorted_ids)[:, :width]
    used = (~repeat).sum(dim=-1, keepdim=True)  # distinct ids per row
    position = torch.arange(width, device=ids.device).expand_as(merged_ids)
    # unused slots repeat the row's first id with nothing on it: empty buckets on both sides (sparse.student_buckets)
    merged_ids = torch.where(position < used, merged_ids, merged_ids[:, :1])
    logprobs = merged_probs.log().float()  # 0 -> -inf: a bucket the teacher gives nothing
    return TopK(logprobs.reshape(*lead, width), merged_ids.reshape(*lead, width), tail.float().reshape(lead), mask)
