"""Token-level divergences between a student Q and a teacher P over the same vocabulary.

Every loss takes logits shaped (batch, positions, vocab) and an optional bool mask (batch, positions), True where
a response token is scored, and returns a scalar. The work is done in chunks of flattened rows, each upcast to
float32 on its own (float64 inputs stay float64), so neither the forward nor the backward pass ever holds a float32
copy of the full (batch, positions, vocab) tensor.

Forward KL, reverse KL and JSD have closed-form gradients with respect to the student logits. When only the
student needs a gradient (the teacher is frozen: every training step), they take a fused path: one pass over the
scored rows computes each chunk's loss and its gradient together, writes the gradient into one buffer of the
student's dtype and drops the chunk. Backward is then a multiply, nothing is recomputed, the logits themselves are not
kept for backward, and unscored rows (padding, prompts) cost nothing. Where the teacher needs a gradient too, or for
the other divergences, each chunk is checkpointed instead (recomputed in backward). A chunk holds at most
`chunk_size` rows and at most `CHUNK_ELEMENTS` entries, so a 128k vocabulary does not make a 1024-row chunk 512 MB.

Temperature divides both logits before the softmax, as TRL's `generalized_jsd_loss`; there is no T^2 rescaling.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

REDUCTIONS = ("token_mean", "sequence_mean", "sum")
# At most this many (row, vocab) entries per chunk on CPU: 2^19 float32 values are 2 MB per temporary (4 rows at a
# 128k vocabulary, 16 at 32k), about a core's L2 cache. A chunk's temporaries are most of the loss's own memory:
# benchmarks/bench_losses.py measured 2^19 against 2^21 at V = 128k, 2 x 128 positions, as 24-33% less peak memory
# and 5-20% less time (docs/benchmarks.md).
CHUNK_ELEMENTS = 2**19
# On accelerators a 2M-entry chunk is a few microseconds of work per kernel, as short as its launch: 8x larger.
CHUNK_ELEMENTS_ACCELERATOR = 2**24

# (log q, log p) in the compute dtype -> (per-row loss, d loss / d (student logits / temperature)), rows of a chunk
LossAndGrad = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    # at least float32 (bf16/fp16 are upcast), but keep float64 so gradcheck sees full precision
    dtype = torch.float32
    for t in tensors:
        if t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_inputs(student_logits: Tensor, other: Tensor, mask: Tensor | None, other_name: str, other_shape) -> None:
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be (batch, positions, vocab), got shape {tuple(student_logits.shape)}")
    if tuple(other.shape) != tuple(other_shape):
        raise ValueError(
            f"{other_name} shape {tuple(other.shape)} does not match expected {tuple(other_shape)} "
            f"(student_logits shape {tuple(student_logits.shape)})"
        )
    if mask is not None and tuple(mask.shape) != tuple(student_logits.shape[:2]):
        raise ValueError(
            f"mask shape {tuple(mask.shape)} must be (batch, positions) = {tuple(student_logits.shape[:2])}"
        )


def _row_weights(mask: Tensor, reduction: str, dtype: torch.dtype) -> Tensor:
    """Per-(batch, position) weights whose weighted sum of per-token losses is the requested reduction."""
    m = mask.to(dtype)
    if reduction == "token_mean":
        return m / m.sum().clamp(min=1)
    if reduction == "sequence_mean":
        per_seq = m.sum(dim=1, keepdim=True)
        nonempty = (per_seq > 0).sum().clamp(min=1)
        return m / (per_seq.clamp(min=1) * nonempty)
    if reduction == "sum":
        return m
    raise ValueError(f"unknown reduction {reduction!r}; expected one of {', '.join(REDUCTIONS)}")


def _rows_per_chunk(chunk_size: int, vocab: int, device: torch.device | None = None) -> int:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    budget = CHUNK_ELEMENTS if device is None or device.type == "cpu" else CHUNK_ELEMENTS_ACCELERATOR
    return max(1, min(chunk_size, budget // max(vocab, 1)))


def _reduce_over_chunks(
    per_token_fn: Callable[[Tensor, Tensor], Tensor],
    student_logits: Tensor,
    other: Tensor,
    mask: Tensor | None,
    reduction: str,
    chunk_size: int,
) -> Tensor:
    """sum_rows weight[row] * per_token_fn(student_rows, other_rows), over slices of `chunk_size` flattened rows.

    `other` is the teacher logits (batch, positions, vocab) or the labels (batch, positions). per_token_fn gets the
    raw slices in their input dtype and does its own upcast, so the float32 copy exists one chunk at a time, and
    under checkpoint it is recomputed in backward instead of being kept alive for every chunk.
    """
    batch, positions, vocab = student_logits.shape
    chunk_size = _rows_per_chunk(chunk_size, vocab, student_logits.device)
    dtype = _compute_dtype(student_logits, other)
    if mask is None:
        mask = torch.ones(batch, positions, dtype=torch.bool, device=student_logits.device)
    weights = _row_weights(mask.bool(), reduction, dtype).reshape(-1)
    n = batch * positions
    student_rows = student_logits.reshape(n, vocab)  # a view when contiguous
    other_rows = other.reshape(n, *other.shape[2:])
    if n == 0:
        return student_logits.sum().to(dtype) * 0.0

    def chunk_loss(s: Tensor, o: Tensor, w: Tensor) -> Tensor:
        loss = per_token_fn(s, o)
        # where, not just *w: garbage (inf/nan) at unscored rows must not leak into the value
        return torch.where(w > 0, loss * w, 0.0).sum()

    use_ckpt = torch.is_grad_enabled() and (student_logits.requires_grad or other.requires_grad)
    total = None
    for start in range(0, n, chunk_size):
        args = (student_rows[start : start + chunk_size], other_rows[start : start + chunk_size],
                weights[start : start + chunk_size])
        if use_ckpt:  # keep only the input slices for backward; the float32 intermediates are recomputed there
            part = checkpoint(chunk_loss, *args, use_reentrant=False, preserve_rng_state=False)
        else:
            part = chunk_loss(*args)
        total = part if total is None else total + part
    return total  # zero (with a gradient path) when the mask is empty, since every weight is then 0


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """sum_v a_v (log a_v - log b_v) per row; entries with a_v == 0 contribute 0 (and no NaN gradient)."""
    a = log_a.exp()
    # guard the difference itself, not just the product: 0 * (-inf - x) would be NaN in value or gradient
    diff = torch.where(a > 0, log_a - log_b, 0.0)
    return (a * diff).sum(dim=-1)


def _log_mix(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """log(w * a + (1 - w) * b) in log space; the endpoints return an input exactly."""
    if w == 0.0:
        return log_b
    if w == 1.0:
        return log_a
    # where both are -inf (a vocab entry masked in both models) logaddexp's gradient is NaN: route those around it
    both = torch.isneginf(log_a) & torch.isneginf(log_b)
    mix = torch.logaddexp(log_a.masked_fill(both, 0.0) + math.log(w), log_b.masked_fill(both, 0.0) + math.log1p(-w))
    return mix.masked_fill(both, -math.inf)


def _log_softmax(logits: Tensor, dtype: torch.dtype, temperature: float) -> Tensor:
    x = logits.to(dtype)
    return F.log_softmax(x if temperature == 1.0 else x / temperature, dim=-1)


class _FusedDivergence(torch.autograd.Function):
    """Loss and its gradient with respect to the student logits in one chunked pass (the teacher gets none).

    Forward walks the scored rows only, `rows` at a time, and writes weight * d loss / d logits of each chunk into a
    buffer of the student's dtype; backward scales that buffer by the incoming gradient, in place, and hands it on.
    The buffer is given away on the first backward, so backward runs once per forward (as every training step does).
    """

    @staticmethod
    def forward(ctx, student_logits: Tensor, teacher_logits: Tensor, weights: Tensor, loss_and_grad: LossAndGrad,
                temperature: float, rows: int, dtype: torch.dtype) -> Tensor:
        vocab = student_logits.shape[-1]
        student_rows = student_logits.reshape(-1, vocab)
        teacher_rows = teacher_logits.reshape(-1, vocab)
        grad = torch.zeros_like(student_rows)
        scored = weights.nonzero().squeeze(1)  # one host sync per call; padding rows are then skipped entirely
        every_row = scored.numel() == weights.numel()
        total = torch.zeros((), dtype=dtype, device=student_logits.device)
        for start in range(0, scored.numel(), rows):
            index = slice(start, start + rows) if every_row else scored[start : start + rows]
            log_q = _log_softmax(student_rows[index], dtype, temperature)
            log_p = _log_softmax(teacher_rows[index], dtype, temperature)
            loss, dlogits = loss_and_grad(log_q, log_p)
            w = weights[index]
            total = total + (loss * w).sum()
            grad[index] = dlogits.mul_((w / temperature)[:, None]).to(grad.dtype)
        ctx.grad = grad.view_as(student_logits)
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("kdlab's fused divergence gradient was already used: backward runs once per forward "
                               "(for retain_graph, let the teacher logits require grad: the checkpointed path)")
        return grad.mul_(grad_output.to(grad.dtype)), None, None, None, None, None, None


def _divergence(fn: Callable[[Tensor, Tensor], Tensor], student_logits: Tensor, teacher_logits: Tensor,
                mask: Tensor | None, temperature: float, reduction: str, chunk_size: int,
                loss_and_grad: LossAndGrad | None = None) -> Tensor:
    """Validate, then reduce fn(log q, log p) over chunks (log-probs at `temperature`, in float32 or wider).

    `loss_and_grad`, when given, is the same per-row loss with its closed-form gradient: the fused path, taken when
    the student alone needs a gradient."""
    _check_inputs(student_logits, teacher_logits, mask, "teacher_logits", student_logits.shape)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = _compute_dtype(student_logits, teacher_logits)
    fused = (loss_and_grad is not None and torch.is_grad_enabled() and student_logits.requires_grad
             and not teacher_logits.requires_grad and student_logits.numel() > 0)
    if fused:
        batch, positions, vocab = student_logits.shape
        if mask is None:
            mask = torch.ones(batch, positions, dtype=torch.bool, device=student_logits.device)
        weights = _row_weights(mask.bool(), reduction, dtype).reshape(-1)
        rows = _rows_per_chunk(chunk_size, vocab, student_logits.device)
        return _FusedDivergence.apply(student_logits, teacher_logits.detach(), weights, loss_and_grad, temperature,
                                      rows, dtype)

    def per_token(s: Tensor, t: Tensor) -> Tensor:
        return fn(_log_softmax(s, dtype, temperature), _log_softmax(t, dtype, temperature))

    return _reduce_over_chunks(per_token, student_logits, teacher_logits, mask, reduction, chunk_size)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise sum_v a_v b_v. Not einsum/bmm: their float32 accumulation over a 32k row was 100x less accurate."""
    return (a * b).sum(dim=-1)


# The fused helpers below run without autograd, so they work in place on tensors that are dead after the line: a
# chunk then needs about four (rows, vocab) temporaries, which is most of the loss's own memory.


def _forward_kl_and_grad(log_q: Tensor, log_p: Tensor) -> tuple[Tensor, Tensor]:
    # d KL(P||Q) / d logits = q - p
    p = log_p.exp()
    loss = (log_p - log_q).masked_fill_(p == 0, 0.0).mul_(p).sum(dim=-1)
    return loss, log_q.exp_().sub_(p)


def _reverse_kl_and_grad(log_q: Tensor, log_p: Tensor) -> tuple[Tensor, Tensor]:
    # d KL(Q||P) / d q_v = log q_v - log p_v + 1; through the softmax: q * (diff - KL), the constant cancels
    q = log_q.exp()
    diff = (log_q - log_p).masked_fill_(q == 0, 0.0)
    loss = _dot(q, diff)
    return loss, diff.sub_(loss[:, None]).mul_(q)


def _jsd_and_grad(beta: float) -> LossAndGrad:
    def loss_and_grad(log_q: Tensor, log_p: Tensor) -> tuple[Tensor, Tensor]:
        # d JSD / d q_v = (1 - beta) log(q_v / m_v): the p/m and q/m terms of both KLs cancel exactly;
        # through the softmax, q * (g - <q, g>). No gradient flows through log m here, so entries where both
        # models are -inf need no detour (their -inf - -inf is masked with p == 0 and q == 0).
        lm = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        p = log_p.exp()
        kl_p = (log_p - lm).masked_fill_(p == 0, 0.0).mul_(p).sum(dim=-1)
        del p
        q = log_q.exp()
        diff = (log_q - lm).masked_fill_(q == 0, 0.0)
        loss = beta * kl_p + (1.0 - beta) * _dot(q, diff)
        g = diff.mul_(1.0 - beta)
        return loss, g.sub_(_dot(q, g)[:, None]).mul_(q)

    return loss_and_grad


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in the range [0, 1], got {value}")


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
               temperature: float = 1.0, reduction: str = "token_mean", chunk_size: int = 1024) -> Tensor:
    """KL(P || Q) = sum_v p_v (log p_v - log q_v) per scored token (mode-covering; classic KD, Hinton et al. 2015).

    Logits (batch, positions, vocab), mask (batch, positions) bool. reduction: token_mean | sequence_mean | sum.
    Both logits are divided by `temperature` before the softmax; no T^2 rescaling.
    """
    return _divergence(lambda lq, lp: _kl(lp, lq), student_logits, teacher_logits, mask,
                       temperature, reduction, chunk_size, _forward_kl_and_grad)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
               temperature: float = 1.0, reduction: str = "token_mean", chunk_size: int = 1024) -> Tensor:
    """KL(Q || P) = sum_v q_v (log q_v - log p_v) per scored token (mode-seeking; MiniLLM, Gu et al. ICLR 2024).

    Logits (batch, positions, vocab), mask (batch, positions) bool. reduction: token_mean | sequence_mean | sum.
    Both logits are divided by `temperature` before the softmax; no T^2 rescaling.
    """
    return _divergence(lambda lq, lp: _kl(lq, lp), student_logits, teacher_logits, mask,
                       temperature, reduction, chunk_size, _reverse_kl_and_grad)


def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *, beta: float = 0.5,
                    temperature: float = 1.0, reduction: str = "token_mean", chunk_size: int = 1024) -> Tensor:
    """JSD(beta) = beta KL(P || M) + (1-beta) KL(Q || M), M = beta P + (1-beta) Q (GKD, Agarwal et al. ICLR 2024).

    log M = logsumexp(log P + log beta, log Q + log(1-beta)). The formula itself tends to 0 at both ends, so the
    endpoints follow TRL's GKDTrainer instead: beta == 0 returns forward_kl and beta == 1 returns reverse_kl,
    exactly. beta outside [0, 1] raises ValueError. Logits (batch, positions, vocab), mask (batch, positions) bool;
    reduction: token_mean | sequence_mean | sum. Both logits are divided by `temperature`; no T^2 rescaling.
    """
    _check_unit("beta", beta)
    common = dict(temperature=temperature, reduction=reduction, chunk_size=chunk_size)
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, mask, **common)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, mask, **common)

    def jsd(lq: Tensor, lp: Tensor) -> Tensor:
        lm = _log_mix(lp, lq, beta)
        return beta * _kl(lp, lm) + (1.0 - beta) * _kl(lq, lm)

    return _divergence(jsd, student_logits, teacher_logits, mask, **common, loss_and_grad=_jsd_and_grad(beta))


def total_variation(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
                    temperature: float = 1.0, reduction: str = "token_mean", chunk_size: int = 1024) -> Tensor:
    """TVD(P, Q) = 0.5 sum_v |p_v - q_v| per scored token (as in GKD's divergence comparison).

    Logits (batch, positions, vocab), mask (batch, positions) bool. reduction: token_mean | sequence_mean | sum.
    Both logits are divided by `temperature` before the softmax; no T^2 rescaling.
    """
    return _divergence(lambda lq, lp: 0.5 * (lp.exp() - lq.exp()).abs().sum(dim=-1), student_logits, teacher_logits,
                       mask, temperature, reduction, chunk_size)


def skew_forward_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *, alpha: float = 0.1,
                    temperature: float = 1.0, reduction: str = "token_mean", chunk_size: int = 1024) -> Tensor:
    """SKL(alpha) = KL(P || alpha P + (1-alpha) Q) per scored token (DistiLLM, Ko et al. ICML 2024).

    alpha == 0 is forward_kl; alpha in [0, 1] else ValueError. Logits (batch, positions, vocab), mask (batch,
    positions) bool; reduction: token_mean | sequence_mean | sum. Both logits divided by `temperature`; no T^2.
    """
    _check_unit("alpha", alpha)
    return _divergence(lambda lq, lp: _kl(lp, _log_mix(lp, lq, alpha)), student_logits, teacher_logits, mask,
                       temperature, reduction, chunk_size)


def skew_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *, alpha: float = 0.1,
                    temperature: float = 1.0, reduction: str = "token_mean", chunk_size: int = 1024) -> Tensor:
    """SRKL(alpha) = KL(Q || (1-alpha) P + alpha Q) per scored token (DistiLLM, Ko et al. ICML 2024).

    alpha == 0 is reverse_kl; alpha in [0, 1] else ValueError. Logits (batch, positions, vocab), mask (batch,
    positions) bool; reduction: token_mean | sequence_mean | sum. Both logits divided by `temperature`; no T^2.
    """
    _check_unit("alpha", alpha)
    return _divergence(lambda lq, lp: _kl(lq, _log_mix(lq, lp, alpha)), student_logits, teacher_logits, mask,
                       temperature, reduction, chunk_size)


# The divergences by the names configs give them (`loss=jsd`); a config picks its function by `_target_`.
DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "fkl": forward_kl,
    "rkl": reverse_kl,
    "jsd": generalized_jsd,
    "tvd": total_variation,
    "skl": skew_forward_kl,
    "srkl": skew_reverse_kl,
}
SAME_VOCAB_LOSSES = frozenset(DIVERGENCES)


def get_divergence(name: str) -> Callable[..., Tensor]:
    """The divergence function named `name` (fkl, rkl, jsd, tvd, skl, srkl)."""
    try:
        return DIVERGENCES[name]
    except KeyError:
        raise ValueError(f"unknown divergence {name!r}; known: {', '.join(sorted(DIVERGENCES))}") from None
