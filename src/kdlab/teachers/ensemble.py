"""Several teachers sharing the student's tokenizer: a per-token weighted mixture, or one teacher per example.

    python train.py teachers=arith_pair                   # conf/teachers/arith_pair.yaml: two members, mixed
    python train.py teachers=arith_pair teachers.combine=route teachers.route_field=steps \
        'teachers.routes={2: peer, 3: teacher, 4: teacher}'

`teachers.members.<name>` is a teacher preset of any kind (a model in this process, `kind: cached`, `kind: remote`).

- **mixture**: p(v) = sum_i w_i p_i(v), the weights `teachers.weights` normalised to sum to 1. With every member a
  model the mixture is exact over the shared vocabulary: log p = logsumexp_i(log w_i + log softmax(z_i)), which the
  divergence reads as the teacher's logits (so `loss.temperature` tempers the mixture, not each member).
- **route**: each example is distilled from one member, the one `teachers.routes` maps its `teachers.route_field`
  value to (values are compared as text; a value without a route stops the run at its first batch). The step sums
  each member's own loss over its rows, so a routed row's loss is exactly its member's single-teacher loss.

In a mixture with a cached or remote member, every member is a top-k (a model member its own top `teachers.top_k`) and
the mixture lives on the union of the members' ids plus one tail bucket: p(v) = sum_i w_i p_i(v) [v in top-k_i] and
tail = sum_i w_i tail_i. A member's mass on another member's ids outside its own top-k stays in its tail: the bucket
approximation of kdlab.losses.sparse, member by member; with k = the vocabulary it is the exact mixture.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from kdlab.data.batch import Batch
from kdlab.losses.sparse import TopK, top_k_of_logits

MIXTURE, ROUTE = "mixture", "route"
COMBINES = (MIXTURE, ROUTE)


class TeacherEnsemble:
    """The members (models by name, and outside teachers by name) and how their distributions combine."""

    def __init__(self, models: Mapping[str, nn.Module], outside: Mapping[str, Any], weights: Mapping[str, float],
                 combine: str, vocab: int, top_k: int, routes: Mapping[str, str] | None = None):
        self.names = [*models, *outside]
        if combine not in COMBINES:
            raise ValueError(f"teachers.combine={combine!r}; choose one of {COMBINES}")
        total = sum(float(weights[n]) for n in self.names)
        self.weights = {n: float(weights[n]) / total for n in self.names}
        self.models, self.outside = dict(models), dict(outside)
        self.combine, self.vocab, self.top_k = combine, vocab, top_k
        self.routes = {str(k): str(v) for k, v in (routes or {}).items()}

    def outside_scores(self, batch: Batch) -> dict[str, TopK]:
        """The cached and remote members' top-k for the batch's targets (a step asks before any backward)."""
        return {name: teacher.top_k(batch) for name, teacher in self.outside.items()}

    def member_rows(self, batch: Batch) -> dict[str, Tensor]:
        """Which rows each member teaches: all of them in a mixture, its routed examples otherwise (bool, rows)."""
        rows = len(batch)
        device = batch.student.target_mask.device
        if self.combine == MIXTURE:
            return {name: torch.ones(rows, dtype=torch.bool, device=device) for name in self.names}
        if batch.route is None:
            raise ValueError("teachers.combine=route needs each example's teachers.route_field value")
        missing = sorted({value for value in batch.route if value not in self.routes})
        if missing:
            raise ValueError(f"teachers.routes has no member for {_quoted(missing)}; routes: "
                             f"{self.routes}")
        owner = [self.routes[value] for value in batch.route]
        return {name: torch.tensor([o == name for o in owner], dtype=torch.bool, device=device) for name in self.names}

    def combined(self, scores: Mapping[str, Tensor | TopK], batch: Batch) -> Tensor | TopK:
        """The mixture the loss compares the student with: dense log-probabilities when every member is a model,
        else a TopK over the union of the members' ids. (Routed members are compared row by row instead: the step
        sums each member's loss over its own rows, DistillationModule._routed_terms.)"""
        if self.combine != MIXTURE:
            raise ValueError(f"teachers.combine={self.combine}: routed members are not combined into one teacher")
        if not self.outside:
            return torch.logsumexp(torch.stack([torch.log_softmax(scores[n].float(), dim=-1) + math.log(self.weights[n])
                                                for n in self.names]), dim=0)
        tops = [self.as_top_k(scores[n], batch.student.target_mask) for n in self.names]
        return mix_top_k(tops, [self.weights[n] for n in self.names], self.vocab)

    def as_top_k(self, score: Tensor | TopK, mask: Tensor) -> TopK:
        """A member as a top-k: an outside member as it answered, a model member its own top `top_k`."""
        if isinstance(score, TopK):
            return score
        logprobs, ids, tail = top_k_of_logits(score, min(self.top_k, score.shape[-1]))
        return TopK(logprobs, ids, tail, mask.bool())


def _quoted(values: list[str]) -> str:
    return ", ".join(repr(v) for v in values[:5]) + (" ..." if len(values) > 5 else "")


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


def teachers_errors(cfg: Mapping[str, Any]) -> list[str]:
    """Every problem of a `teachers` node (conf/teachers/*.yaml) and of what its members are asked to do."""
    from kdlab.teachers.outside import outside_teacher_errors

    node = cfg.get("teachers")
    if node is None:
        return []
    members, errors = dict(node.get("members") or {}), []
    if cfg.get("teacher") is not None:
        errors.append("teachers= and teacher= are both set: a run distils from one teacher or from several "
                      "(teachers=<option> sets teacher=null itself; drop the teacher= override)")
    if len(members) < 2:
        errors.append(f"teachers.members holds {len(members)} teacher(s); several teachers means two or more")
    errors += [f"teachers.members.{n}: a member's name is a plain identifier" for n in members if not n.isidentifier()]
    loss = cfg["loss"].get("name")
    if loss in ("ot", "uld", "sft"):
        errors.append(f"loss={loss} with several teachers: the members share the student's tokenizer and are "
                      f"combined token by token, so the loss is a divergence (fkl, rkl, jsd, tvd, skl, srkl); a "
                      f"teacher with another tokenizer is distilled alone with loss=ot or loss=uld")
    if cfg["policy"].get("fixed_source") == "teacher" and float(cfg["policy"]["student_fraction"]) < 1:
        errors.append("policy=seqkd samples its targets from one teacher; with several, train on the ground truth "
                      "or the student's own samples")
    errors += _combine_errors(node, members)
    for name, member in members.items():
        member_cfg = {"teacher": member, "policy": cfg["policy"], "loss": cfg["loss"]}
        errors += [f"teachers.members.{name}: {e}" for e in outside_teacher_errors(member_cfg)]
    return errors


def _combine_errors(node: Mapping[str, Any], members: Mapping[str, Any]) -> list[str]:
    errors = []
    combine = node.get("combine")
    if combine not in COMBINES:
        errors.append(f"teachers.combine={combine!r} is unknown; choose one of {COMBINES}")
    weights = dict(node.get("weights") or {})
    if combine == MIXTURE:
        errors += [f"teachers.weights.{n} is missing: a mixture weighs every member" for n in members
                   if n not in weights]
        errors += [f"teachers.weights.{n}={w} must be > 0" for n, w in weights.items() if float(w) <= 0]
    errors += [f"teachers.weights.{n} names no member ({', '.join(members)})" for n in weights if n not in members]
    if combine == ROUTE:
        routes = dict(node.get("routes") or {})
        if not node.get("route_field") or not routes:
            errors.append("teachers.combine=route needs teachers.route_field (an example field) and teachers.routes "
                          "(its values -> member names)")
        errors += [f"teachers.routes.{v}={n} names no member ({', '.join(members)})" for v, n in routes.items()
                   if n not in members]
    if int(node.get("top_k") or 0) < 1:
        errors.append(f"teachers.top_k={node.get('top_k')!r} must be >= 1 (a model member's top-k beside cached or "
                      f"remote members)")
    return errors


def build_ensemble(node: Mapping[str, Any], task_cfg: Mapping[str, Any], tokenizer: Any,
                   train_examples: Any) -> TeacherEnsemble:
    """Load the model members and connect the outside ones (each checked as a single teacher would be)."""
    from kdlab.models.loading import load_model, load_tokenizer
    from kdlab.teachers.outside import MODEL, build_outside_teacher, teacher_kind

    models, outside = {}, {}
    for name, member in node["members"].items():
        if teacher_kind(member) == MODEL:
            models[name] = load_model(member, load_tokenizer(member))
        else:
            outside[name] = build_outside_teacher(member, task_cfg, tokenizer, train_examples)
    weights = dict(node.get("weights") or {}) or {n: 1.0 for n in node["members"]}
    return TeacherEnsemble(models, outside, {n: float(weights.get(n, 1.0)) for n in node["members"]},
                           str(node["combine"]), len(tokenizer), int(node["top_k"]), node.get("routes"))
