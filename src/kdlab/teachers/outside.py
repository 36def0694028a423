"""Teachers outside the training process, as a training step sees them: `teacher=cached` and `teacher=remote`.

Both answer one question for a batch, whatever its targets: the teacher's top-k log-probabilities, their ids and the
log of the remaining mass at every student target token (`TopK`, aligned with the student's target logits). The step
then trains on the top-k form of the configured divergence (kdlab.losses.sparse, the approximation stated there).

- `CachedTeacher` reads the rows `kdlab-cache-teacher` wrote for each training example (`Batch.index`): no teacher
  model loads, but only fixed targets are cached (the ground truth, or with `cache.targets=teacher` one teacher
  sample per example, which a SeqKD run then trains on), so on-policy steps are refused at start-up.
- `RemoteTeacher` asks a server (`kdlab-serve-teacher`, or `vllm serve`) for every target token of the batch's rows,
  ground truth or the student's own samples: on-policy works.

A teacher preset without `kind` is a model loaded into the process (`kind: model`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from kdlab.data.batch import Batch
from kdlab.losses.sparse import TopK

MODEL, CACHED, REMOTE = "model", "cached", "remote"
KINDS = (MODEL, CACHED, REMOTE)


def teacher_kind(teacher_cfg: Mapping[str, Any] | None) -> str | None:
    """None without a teacher; else the preset's `kind` (a model when it names none)."""
    return None if teacher_cfg is None else str(teacher_cfg.get("kind") or MODEL)


def outside_teacher_errors(cfg: Mapping[str, Any]) -> list[str]:
    """What a cached or remote teacher cannot do with this run's loss and policy, each with its fix."""
    kind = teacher_kind(cfg.get("teacher"))
    if kind not in (CACHED, REMOTE):
        return [f"teacher.kind={kind!r} is unknown; choose one of {KINDS}"] if kind not in (None, MODEL) else []
    from kdlab.losses.objective import build_objective
    from kdlab.losses.sparse import sparse_form

    teacher, errors = cfg["teacher"], []
    key = "dir" if kind == CACHED else "url"
    if not teacher.get(key):
        errors.append(f"teacher={kind} needs teacher.{key}")
    if kind == CACHED:
        from kdlab.teachers.cache_verify import VERIFY_MODES

        if teacher.get("verify", "sampled") not in VERIFY_MODES:
            errors.append(f"teacher.verify={teacher.get('verify')!r}: one of {', '.join(VERIFY_MODES)} (how much of "
                          f"the cache is re-read against its checksums before training)")
        for name in ("verify_blocks", "verify_seed"):
            value = teacher.get(name, 0)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                errors.append(f"teacher.{name}={value!r}: an integer >= 0")
    fraction = float(cfg["policy"]["student_fraction"])
    if kind == CACHED and fraction > 0:
        errors.append(f"teacher=cached holds the teacher's distributions on the fixed training targets only, but "
                      f"policy.student_fraction={fraction} trains on the student's own samples: use teacher=remote "
                      f"(a teacher server scores any sequence), or policy=supervised")
    if kind == REMOTE and cfg["policy"].get("fixed_source") == "teacher" and fraction < 1:
        errors.append("teacher=remote cannot sample SeqKD targets (policy.fixed_source=teacher): a server scores "
                      "sequences, it does not sample them; write the teacher's samples once with kdlab-cache-teacher "
                      "cache.targets=teacher and train with teacher=cached, or train on the ground truth "
                      "(policy.fixed_source=ground_truth)")
    try:
        sparse_form(build_objective(cfg["loss"]).loss)
    except (ValueError, KeyError, TypeError) as err:
        errors.append(f"loss={cfg['loss'].get('name')} with teacher={kind}: {err}")
    return errors


class CachedTeacher:
    """The top-k a cache holds for each training example, by `Batch.index` (rows written by kdlab-cache-teacher),
    and for a SeqKD cache the teacher's samples those rows score (`samples`)."""

    kind = CACHED

    def __init__(self, cache: Any):
        self.cache = cache  # kdlab.teachers.cache.TeacherCache

    def samples(self, batch: Batch, pad_token_id: int) -> tuple[Tensor, Tensor]:
        """SeqKD targets for the batch's examples: the samples the cache drew from the teacher for each, as
        (ids, mask) right-padded like kdlab.sampling.hf.generate_targets' output (EOS included where the sample
        reached one), so the step goes on as if the teacher had sampled them now; `top_k` then reads their rows."""
        if batch.index is None:
            raise ValueError("a cached teacher needs each row's example index (Batch.index)")
        rows = [self.cache.targets(index) for index in batch.index.tolist()]
        ids = torch.full((len(rows), max(len(r) for r in rows)), pad_token_id, dtype=torch.long)
        mask = torch.zeros(ids.shape, dtype=torch.bool)
        for b, row in enumerate(rows):
            ids[b, : len(row)], mask[b, : len(row)] = row, True
        device = batch.student.prompt_ids.device
        return ids.to(device), mask.to(device)

    def top_k(self, batch: Batch) -> TopK:
        if batch.index is None:
            raise ValueError("a cached teacher needs each row's example index (Batch.index)")
        mask = batch.student.target_mask
        lengths = mask.sum(dim=1).tolist()
        rows = []
        for index, length in zip(batch.index.tolist(), lengths):
            logprobs, ids, tail = self.cache[index]
            if len(ids) != length:
                raise ValueError(f"the teacher cache holds {len(ids)} target tokens for training example {index}, "
                                 f"the batch {length}: the cache was written for other targets")
            rows.append((logprobs, ids, tail))
        return _padded(rows, mask, self.cache.k)


class RemoteTeacher:
    """A teacher server's top-k of every target token of a batch's rows (kdlab.teachers.client.TeacherClient)."""

    kind = REMOTE

    def __init__(self, client: Any):
        self.client = client

    def top_k(self, batch: Batch) -> TopK:
        side = batch.student
        prompts = _rows(*side.prompt)
        targets = _rows(*side.target)
        answer = self.client.target_top_k(prompts, targets)
        rows = [(answer.logprobs[b, :n], answer.ids[b, :n], answer.tail[b, :n])
                for b, n in enumerate(len(t) for t in targets)]
        return _padded(rows, side.target_mask, self.client.k)


def _rows(ids: Tensor, mask: Tensor) -> list[list[int]]:
    """Each row's tokens without its padding."""
    return [row[keep].tolist() for row, keep in zip(ids.cpu(), mask.bool().cpu())]


def _padded(rows: Sequence[tuple[Tensor, Tensor, Tensor]], mask: Tensor, k: int) -> TopK:
    """Per-row (n, k) top-k into (batch, positions, k), placed where `mask` holds each row's n target tokens."""
    batch, width = mask.shape
    logprobs = torch.zeros(batch, width, k)
    ids = torch.zeros(batch, width, k, dtype=torch.long)
    tail = torch.zeros(batch, width)
    for b, (lp, token_ids, t) in enumerate(rows):
        n = len(token_ids)
        logprobs[b, :n], ids[b, :n], tail[b, :n] = lp, token_ids, t
    return TopK(logprobs, ids, tail, mask.cpu().bool()).to(mask.device)


def build_outside_teacher(teacher_cfg: Mapping[str, Any], task_cfg: Mapping[str, Any], tokenizer: Any,
                          train_examples: Sequence[Any],
                          policy_cfg: Mapping[str, Any] | None = None) -> CachedTeacher | RemoteTeacher:
    """Open the cache (its manifest checked against this run's tokenizer, task settings, data, k and, from
    `policy_cfg`, its targets: the ground truth, or for SeqKD the teacher's samples under this run's sampling
    settings; then its files verified as `teacher.verify` says, ids against the student's vocabulary) or connect to
    the server (checked against the student's vocabulary and tokenizer): every mismatch stops here, before training."""
    from kdlab.teachers.cache import (
        GROUND_TRUTH,
        CacheError,
        check_cache_matches,
        open_cache,
        read_manifest,
        run_fingerprints,
        sampled_targets,
    )
    from kdlab.teachers.fingerprint import tokenizer_fingerprint

    if teacher_kind(teacher_cfg) == CACHED:
        manifest = read_manifest(teacher_cfg["dir"])  # which run it was written for, before its files are read
        policy = policy_cfg or {}
        seqkd = policy.get("fixed_source") == "teacher" and float(policy.get("student_fraction", 0.0)) < 1
        targets = sampled_targets(policy["sampling"]) if seqkd else GROUND_TRUTH
        expected = run_fingerprints(task_cfg, tokenizer, train_examples, targets=targets)
        if teacher_cfg.get("top_k") is not None:
            expected["top_k"] = int(teacher_cfg["top_k"])
        difference = check_cache_matches(manifest, expected)
        if difference:
            how = "cache.targets=teacher" if seqkd else "cache.targets=ground_truth"
            raise CacheError(f"{difference} ({teacher_cfg['dir']}); write a cache for this run with "
                             f"kdlab-cache-teacher <this run's overrides> {how} cache.dir=<dir>")
        verify = {key: teacher_cfg[key] for key in ("verify", "verify_blocks", "verify_seed")
                  if teacher_cfg.get(key) is not None}
        return CachedTeacher(open_cache(teacher_cfg["dir"], vocab_size=len(tokenizer), **verify))
    from kdlab.teachers.client import TeacherClient

    client = TeacherClient(str(teacher_cfg["url"]), top_k=int(teacher_cfg["top_k"]), model=teacher_cfg.get("model"),
                           api_key=teacher_cfg.get("api_key"), timeout=float(teacher_cfg["timeout"]),
                           retries=int(teacher_cfg["retries"]), backoff=float(teacher_cfg["backoff"]),
                           max_batch=int(teacher_cfg["max_batch"]),
                           allow_insecure_key=bool(teacher_cfg.get("allow_insecure_key", False)))
    # the longest row a step sends: a prompt and its target, or the student's sample when the policy draws them
    sampled = (policy_cfg or {}).get("sampling") or {}
    on_policy = float((policy_cfg or {}).get("student_fraction", 0.0)) > 0
    target = max(int(task_cfg["max_target_tokens"]), int(sampled.get("max_new_tokens", 0)) if on_policy else 0)
    client.check(vocab_size=len(tokenizer), tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                 longest=int(task_cfg["max_prompt_tokens"]) + target)  # k and length refused now, not mid-run
    return RemoteTeacher(client)
