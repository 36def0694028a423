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
`chunk_size` rows and at most `kdlab.losses.chunking.CHUNK_ELEMENTS` entries, so a 128k vocabulary does not make a
1024-row chunk 512 MB.

Temperature divides both logits before the softmax, as TRL's `generalized_jsd_loss`; there is no T^2 rescaling.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from kdlab.losses.chunking import (
    check_inputs,
    compute_dtype,
    reduce_over_chunks,
    row_weights,
    rows_per_chunk,
)
from kdlab.losses.rowwise import (
    LossAndGrad,
    check_unit,
    forward_kl_and_grad,
    jsd_and_grad,
    kl,
    log_mix,
    log_softmax,
    reverse_kl_and_grad,
)


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
            log_q = log_softmax(student_rows[index], dtype, temperature)
            log_p = log_softmax(teacher_rows[index], dtype, temperature)
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
    check_inputs(student_logits, teacher_logits, mask, "teacher_logits", student_logits.shape)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = compute_dtype(student_logits, teacher_logits)
    fused = (loss_and_grad is not None and torch.is_grad_enabled() and student_logits.requires_grad
             and not teacher_logits.requires_grad and student_logits.numel() > 0)
    if fused:
        batch, positions, vocab = student_logits.shape
        if mask is None:
            mask = torch.ones(batch, positions, dtype=torch.bool, device=student_logits.device)
        weights = row_weights(mask.bool(), reduction, dtype).reshape(-1)
        rows = rows_per_chunk(chunk_size, vocab, student_logits.device)
        return _FusedDivergence.apply(student_logits, teacher_logits.detach(), weights, loss_and_grad, temperature,
                                      rows, dtype)

    def per_token(s: Tensor, t: Tensor) -> Tensor:
        return fn(log_softmax(s, dtype, temperature), log_softmax(t, dtype, temperature))

    return reduce_over_chunks(per_token, student_logits, teacher_logits, mask, reduction, chunk_size)


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
               temperature: float = 1.0, reduction: str = "token_mean", chunk_size: int = 1024) -> Tensor:
    """KL(P || Q) = sum_v p_v (log p_v - log q_v) per scored token (mode-covering; classic KD, Hinton et al. 2015).

    Logits (batch, positions, vocab), mask (batch, positions) bool. reduction: token_mean | sequence_mean | sum.
    Both logits are divided by `temperature` before the softmax; no T^2 rescaling.
    """
    return _divergence(lambda lq, lp: kl(lp, lq), student_logits, teacher_logits, mask,
                       temperature, reduction, chunk_size, forward_kl_and_grad)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
               temperature: float = 1.0, reduction: str = "token_mean", chunk_size: int = 1024) -> Tensor:
    """KL(Q || P) = sum_v q_v (log q_v - log p_v) per scored token (mode-seeking; MiniLLM, Gu et al. ICLR 2024).

    Logits (batch, positions, vocab), mask (batch, positions) bool. reduction: token_mean | sequence_mean | sum.
    Both logits are divided by `temperature` before the softmax; no T^2 rescaling.
    """
    return _divergence(lambda lq, lp: kl(lq, lp), student_logits, teacher_logits, mask,
                       temperature, reduction, chunk_size, reverse_kl_and_grad)


def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *, beta: float = 0.5,
                    temperature: float = 1.0, reduction: str = "token_mean", chunk_size: int = 1024) -> Tensor:
    """JSD(beta) = beta KL(P || M) + (1-beta) KL(Q || M), M = beta P + (1-beta) Q (GKD, Agarwal et al. ICLR 2024).

    log M = logsumexp(log P + log beta, log Q + log(1-beta)). The formula itself tends to 0 at both ends, so the
    endpoints follow TRL's GKDTrainer instead: beta == 0 returns forward_kl and beta == 1 returns reverse_kl,
    exactly. beta outside [0, 1] raises ValueError. Logits (batch, positions, vocab), mask (batch, positions) bool;
    reduction: token_mean | sequence_mean | sum. Both logits are divided by `temperature`; no T^2 rescaling.
    """
    check_unit("beta", beta)
    common = dict(temperature=temperature, reduction=reduction, chunk_size=chunk_size)
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, mask, **common)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, mask, **common)

    def jsd(lq: Tensor, lp: Tensor) -> Tensor:
        lm = log_mix(lp, lq, beta)
        return beta * kl(lp, lm) + (1.0 - beta) * kl(lq, lm)

    return _divergence(jsd, student_logits, teacher_logits, mask, **common, loss_and_grad=jsd_and_grad(beta))


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
    check_unit("alpha", alpha)
    return _divergence(lambda lq, lp: kl(lp, log_mix(lp, lq, alpha)), student_logits, teacher_logits, mask,
                       temperature, reduction, chunk_size)


def skew_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *, alpha: float = 0.1,
                    temperature: float = 1.0, reduction: str = "token_mean", chunk_size: int = 1024) -> Tensor:
    """SRKL(alpha) = KL(Q || (1-alpha) P + alpha Q) per scored token (DistiLLM, Ko et al. ICML 2024).

    alpha == 0 is reverse_kl; alpha in [0, 1] else ValueError. Logits (batch, positions, vocab), mask (batch,
    positions) bool; reduction: token_mean | sequence_mean | sum. Both logits divided by `temperature`; no T^2.
    """
    check_unit("alpha", alpha)
    return _divergence(lambda lq, lp: kl(lq, log_mix(lq, lp, alpha)), student_logits, teacher_logits, mask,
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
