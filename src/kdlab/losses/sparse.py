"""Token-level divergences between a student's full logits and a teacher known only by its top-k plus a tail.

A cached teacher (`kdlab-cache-teacher`) or a teacher server (`prompt_logprobs`) gives, per scored token, the
log-probabilities of its k most likely tokens and their ids; the rest of its mass is one number, the tail
log(1 - sum_i p_i). Each loss here compares two distributions over the same k + 1 buckets: the k teacher ids, and
one "tail" bucket for every other token.

    teacher buckets: p_1 .. p_k (the given top-k), p_tail = 1 - sum_i p_i
    student buckets: q_1 .. q_k = softmax(student logits) at the teacher's ids, q_tail = 1 - sum_i q_i

The approximation, stated once: each loss equals the dense divergence between these two bucketed distributions.
By the data-processing inequality it is at most the dense divergence between the full distributions (the tail's
inner shape is lost), and it equals the dense loss exactly when k = vocabulary size (the tail is empty). The
teacher's buckets are renormalised to sum to 1: a no-op up to rounding for float32 top-k, it absorbs the rounding of
float16/bfloat16 caches. Temperature is not offered: a tempered teacher cannot be recovered from its top-k alone.
(The inequality holds for f-divergences, which every built-in divergence is.)

Each loss is built from a divergence's record (kdlab.losses.divergences.Divergence): its row loss on the buckets'
log-probabilities, its settings and edge cases as in the dense form (`top_k_form`). The built-ins' forms go by
name (`sparse_forward_kl`, `sparse_generalized_jsd`, ...: `sparse_` and the dense form's name, for any registered
divergence); `sparse_form` gives the form of a config's loss with its settings bound.

Shapes: student_logits (batch, positions, vocab); teacher_logprobs and teacher_ids (batch, positions, k), ids
distinct within a row; teacher_tail (batch, positions) or None (then computed with `tail_log_mass`); mask (batch,
positions) bool, True where a token is scored. Reductions as in `kdlab.losses`: token_mean (default), sequence_mean,
sum. Computed in float32 (float64 inputs stay float64), chunked over rows, each chunk checkpointed so that no
float32 copy of the full (batch, positions, vocab) tensor exists in forward or backward.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from kdlab.losses.chunking import CHUNK_ELEMENTS, row_weights
from kdlab.losses.divergences import DIVERGENCES, Divergence, keyword_settings, named_form

# (log q buckets, log p buckets), each (rows, k + 1) -> per-row loss
BucketDivergence = Callable[[Tensor, Tensor], Tensor]


@dataclass
class TopK:
    """A teacher known by its top-k over a batch: logprobs and ids (batch, positions, k), tail (log of the remaining
    mass) and mask (batch, positions), position t aligned with the student's logits at t (a cache row, a server's
    prompt_logprobs)."""

    logprobs: Tensor
    ids: Tensor
    tail: Tensor
    mask: Tensor

    def to(self, device: torch.device | str) -> "TopK":
        return TopK(*(t.to(device) for t in (self.logprobs, self.ids, self.tail, self.mask)))


def tail_log_mass(topk_logprobs: Tensor) -> Tensor:
    """log(1 - sum_i exp(topk_logprobs[..., i])), in float64 internally; -inf where the top-k holds all the mass.

    A remainder below the rounding of the sum itself (k float32 ulps of 1) cannot be told from zero, so it is zero:
    otherwise a teacher given over the whole vocabulary would keep a spurious tail of ~1e-7 that the student,
    with no token left outside the top-k, could not match (an infinite forward KL).
    """
    total = topk_logprobs.double().exp().sum(dim=-1)
    rest = 1.0 - total
    noise = topk_logprobs.shape[-1] * torch.finfo(torch.float32).eps
    rest = torch.where(rest > noise, rest, torch.zeros_like(rest))
    return rest.log().to(torch.promote_types(topk_logprobs.dtype, torch.float32))


def student_buckets(student_logits: Tensor, teacher_ids: Tensor) -> Tensor:
    """(rows, k + 1) student log-probabilities: at the teacher's ids, then the tail (every other token).

    The tail is logsumexp over the logits outside the ids minus logsumexp over all of them, not log(1 - sum q_i):
    exact where the top-k holds nearly all the mass, and -inf (with a zero gradient) when no token is left. A slot
    whose id repeats an earlier slot's is empty (-inf): several teachers mixed over the union of their ids fill a
    row's unused slots that way (kdlab.teachers.mixture), with nothing on them on the teacher's side either.
    """
    lse_all = torch.logsumexp(student_logits, dim=-1, keepdim=True)
    at_ids = (student_logits.gather(-1, teacher_ids) - lse_all).masked_fill(_repeated_slots(teacher_ids), -math.inf)
    outside = student_logits.scatter(-1, teacher_ids, -math.inf)
    covered = torch.isneginf(outside).all(dim=-1, keepdim=True)  # every token is a bucket: an empty tail
    # logsumexp over nothing has a NaN gradient: such rows take 0 there, then -inf
    tail = torch.logsumexp(outside.masked_fill(covered, 0.0), dim=-1, keepdim=True) - lse_all
    return torch.cat([at_ids, tail.masked_fill(covered, -math.inf)], dim=-1)


def _repeated_slots(ids: Tensor) -> Tensor:
    """True at each slot whose id an earlier slot of the same row holds (in sorted order: all but one of a kind)."""
    sorted_ids, order = ids.sort(dim=-1)
    repeat = torch.zeros_like(sorted_ids, dtype=torch.bool)
    repeat[..., 1:] = sorted_ids[..., 1:] == sorted_ids[..., :-1]
    return torch.zeros_like(repeat).scatter(-1, order, repeat)


def teacher_buckets(teacher_logprobs: Tensor, teacher_tail: Tensor) -> Tensor:
    """(rows, k + 1) teacher log-probabilities, top-k then tail, renormalised to sum to 1 (see the module doc)."""
    buckets = torch.cat([teacher_logprobs, teacher_tail[..., None]], dim=-1)
    return buckets - torch.logsumexp(buckets, dim=-1, keepdim=True)


def _check_shapes(student_logits: Tensor, logprobs: Tensor, ids: Tensor, tail: Tensor | None,
                  mask: Tensor | None) -> None:
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be (batch, positions, vocab), got {tuple(student_logits.shape)}")
    lead = tuple(student_logits.shape[:2])
    if logprobs.dim() != 3 or tuple(logprobs.shape[:2]) != lead or logprobs.shape != ids.shape:
        raise ValueError(f"teacher_logprobs {tuple(logprobs.shape)} and teacher_ids {tuple(ids.shape)} must both be "
                         f"(batch, positions, k) with (batch, positions) = {lead}")
    if not 1 <= ids.shape[-1] <= student_logits.shape[-1]:
        raise ValueError(f"k = {ids.shape[-1]} must be in [1, vocab = {student_logits.shape[-1]}]")
    for name, t in (("teacher_tail", tail), ("mask", mask)):
        if t is not None and tuple(t.shape) != lead:
            raise ValueError(f"{name} shape {tuple(t.shape)} must be (batch, positions) = {lead}")


def _sparse_divergence(fn: BucketDivergence, student_logits: Tensor, teacher_logprobs: Tensor, teacher_ids: Tensor,
                       teacher_tail: Tensor | None, mask: Tensor | None, reduction: str, chunk_size: int) -> Tensor:
    """sum_rows weight[row] * fn(student buckets, teacher buckets), over chunks of flattened rows."""
    _check_shapes(student_logits, teacher_logprobs, teacher_ids, teacher_tail, mask)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    batch, positions, vocab = student_logits.shape
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logprobs.dtype), torch.float32)
    if teacher_tail is None:
        teacher_tail = tail_log_mass(teacher_logprobs)
    if mask is None:
        mask = torch.ones(batch, positions, dtype=torch.bool, device=student_logits.device)
    weights = row_weights(mask.bool(), reduction, dtype).reshape(-1)
    n, k = batch * positions, teacher_ids.shape[-1]
    rows = (student_logits.reshape(n, vocab), teacher_logprobs.reshape(n, k), teacher_ids.reshape(n, k).long(),
            teacher_tail.reshape(n))
    if n == 0:
        return student_logits.sum().to(dtype) * 0.0

    def chunk_loss(s: Tensor, lp: Tensor, ids: Tensor, tail: Tensor, w: Tensor) -> Tensor:
        log_q = student_buckets(s.to(dtype), ids)
        log_p = teacher_buckets(lp.to(dtype), tail.to(dtype))
        return torch.where(w > 0, fn(log_q, log_p) * w, 0.0).sum()  # where: unscored garbage must not leak

    step = max(1, min(chunk_size, CHUNK_ELEMENTS // max(vocab, 1)))
    use_ckpt = torch.is_grad_enabled() and student_logits.requires_grad
    total = None
    for start in range(0, n, step):
        args = [t[start : start + step] for t in (*rows, weights)]
        part = (checkpoint(chunk_loss, *args, use_reentrant=False, preserve_rng_state=False) if use_ckpt
                else chunk_loss(*args))
        total = part if total is None else total + part
    return total


def top_k_of_logits(teacher_logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(top-k log-probs, their ids, tail log-mass) of dense teacher logits (..., vocab), in float32 or wider.

    The tail is logsumexp over the other logits minus logsumexp over all: exact, unlike 1 - sum of the top-k.
    """
    dtype = torch.promote_types(teacher_logits.dtype, torch.float32)
    logprobs = torch.log_softmax(teacher_logits.to(dtype), dim=-1)
    values, ids = logprobs.topk(k, dim=-1)
    if k >= logprobs.shape[-1]:
        tail = torch.full(values.shape[:-1], -math.inf, dtype=dtype, device=values.device)
    else:
        tail = torch.logsumexp(logprobs.scatter(-1, ids, -math.inf), dim=-1)
    return values, ids, tail



# Each divergence's top-k form, built once from its record.
_TOP_K: dict[Divergence, Callable[..., Tensor]] = {}


def top_k_form(divergence: Divergence) -> Callable[..., Tensor]:
    """`sparse_<function>(student_logits, teacher_logprobs, teacher_ids, teacher_tail=None, mask=None, *,
    <settings>, reduction, chunk_size)`: the divergence's row loss over the k + 1 buckets (module doc), with its
    settings checked and its edge cases (jsd at beta 0 is fkl) as in the dense form."""
    form = _TOP_K.get(divergence)
    if form is None:
        form = _TOP_K[divergence] = _build_top_k(divergence)
    return form


def _build_top_k(divergence: Divergence) -> Callable[..., Tensor]:
    p = inspect.Parameter
    signature = inspect.Signature(
        [p(name, p.POSITIONAL_OR_KEYWORD, annotation="Tensor") for name in
         ("student_logits", "teacher_logprobs", "teacher_ids")]
        + [p(name, p.POSITIONAL_OR_KEYWORD, default=None, annotation="Tensor | None") for name in
           ("teacher_tail", "mask")]
        + keyword_settings(divergence, reduction="token_mean", chunk_size=1024),
        return_annotation="Tensor")

    def compute(target: Divergence, settings: dict[str, float], *, student_logits: Tensor, teacher_logprobs: Tensor,
                teacher_ids: Tensor, teacher_tail: Tensor | None, mask: Tensor | None, reduction: str,
                chunk_size: int) -> Tensor:
        return _sparse_divergence(target.row_loss(settings), student_logits, teacher_logprobs, teacher_ids,
                                  teacher_tail, mask, reduction, chunk_size)

    summary = inspect.getdoc(divergence.dense).splitlines()[0]
    doc = (f"The top-k form of kdlab.losses.{divergence.function} (loss={divergence.name}): its divergence over the "
           f"k + 1 buckets (kdlab.losses.sparse's doc).\n\n    {summary}")
    return named_form(divergence, f"sparse_{divergence.function}", doc, signature, compute, __name__)


def __getattr__(name: str) -> Callable[..., Tensor]:
    """`sparse_forward_kl`, ...: the top-k form of each registered divergence, by its dense form's name."""
    if name.startswith("sparse_"):
        for divergence in DIVERGENCES.values():
            if divergence.function == name[len("sparse_"):]:
                return top_k_form(divergence)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _registered(fn: Callable[..., Any]) -> Divergence | None:
    """The registered divergence whose dense form `fn` is (or that `fn` is), else None."""
    for divergence in DIVERGENCES.values():
        if fn is divergence or fn is divergence.dense:
            return divergence
    return None


def sparse_form(loss: Callable[..., Any]) -> Callable[..., Tensor]:
    """The top-k form of a dense divergence with its settings bound (a `conf/loss` partial): what a run with a cached
    or remote teacher calls, as `fn(student_logits, teacher_logprobs, teacher_ids, teacher_tail, mask)`.

    Raises ValueError for a loss without one (a user's own `_target_`, loss=ot|uld|sft) and for a temperature other
    than 1 (a tempered teacher cannot be recovered from its top-k)."""
    fn = loss.func if isinstance(loss, functools.partial) else loss
    keywords = dict(loss.keywords) if isinstance(loss, functools.partial) else {}
    divergence = _registered(fn)
    if divergence is None:
        known = ", ".join(f"{d.dense.__module__}.{d.function}" for d in DIVERGENCES.values())
        raise ValueError(f"{getattr(fn, '__qualname__', fn)} has no top-k form for a cached or remote teacher; "
                         f"those teachers train with {known} (loss={'|'.join(DIVERGENCES)})")
    temperature = keywords.pop("temperature", 1.0)
    if temperature != 1.0:
        raise ValueError(f"loss.temperature={temperature}: a cached or remote teacher gives its top-k at temperature "
                         f"1 (a server's prompt_logprobs ignore a request's temperature, vLLM's and "
                         f"kdlab-serve-teacher's alike), from which a tempered teacher cannot be recovered; use "
                         f"loss.temperature=1.0")
    return functools.partial(top_k_form(divergence), **keywords)
