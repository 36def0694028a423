"""Straightforward unchunked references that the benchmarks compare kdlab with.

`unchunked_generalized_jsd` is TRL's `GKDTrainer.generalized_jsd_loss` (trl/experimental/gkd/gkd_trainer.py, Apache
2.0) as researchers write it: log-softmaxes of the whole (batch, positions, vocab) tensors, the mixture through a
stacked logsumexp, `F.kl_div` per entry, then the mask. Two differences, both so that values compare with kdlab's
maths: the logits are upcast to float32 first (float64 stays float64), and the mask is a bool tensor instead of
labels == -100. beta=0 is forward KL and beta=1 reverse KL, as in TRL. When TRL is installed, bench_losses.py checks
this copy against TRL's own function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def unchunked_generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, beta: float = 0.5,
                              temperature: float = 1.0) -> Tensor:
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # float32 at least; float64 stays float64
    student_log_probs = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        beta_t = torch.tensor(beta, dtype=student_log_probs.dtype, device=student_log_probs.device)
        mixture_log_probs = torch.logsumexp(
            torch.stack([student_log_probs + torch.log1p(-beta_t), teacher_log_probs + torch.log(beta_t)]), dim=0
        )
        kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
        jsd = beta_t * kl_teacher + (1 - beta_t) * kl_student
    jsd = jsd[mask]
    return jsd.sum() / mask.sum().clamp_min(1)


def trl_generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, beta: float) -> Tensor | None:
    """TRL's own function on the same inputs (labels -100 off the mask), or None when TRL is not installed."""
    try:
        from trl.experimental.gkd import GKDTrainer
    except Exception:
        return None
    labels = torch.where(mask, 0, -100)
    return GKDTrainer.generalized_jsd_loss(student_logits.float(), teacher_logits.float(), labels=labels, beta=beta)
