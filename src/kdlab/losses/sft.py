"""Hard-label cross-entropy on the student (SFT, or the CE term added to a divergence)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlab.losses.chunking import check_inputs, compute_dtype, reduce_over_chunks


def cross_entropy(student_logits: Tensor, labels: Tensor, mask: Tensor | None = None, *,
                  reduction: str = "token_mean", chunk_size: int = 1024) -> Tensor:
    """CE = -log q(labels_t) per scored token.

    student_logits (batch, positions, vocab) are already aligned with labels (batch, positions) long:
    logits[:, t] predicts labels[:, t], no shifting here. Positions where mask is False are ignored whatever the
    label there (padding ids, -100). reduction: token_mean | sequence_mean | sum. Computed chunkwise in float32
    (float64 stays float64), like the divergences.
    """
    check_inputs(student_logits, labels, mask, "labels", student_logits.shape[:2])
    if mask is not None:
        # unscored labels may be -100 or out of range; replace them so the gather is valid (their weight is 0)
        labels = torch.where(mask.bool(), labels, torch.zeros((), dtype=labels.dtype, device=labels.device))
    dtype = compute_dtype(student_logits)

    def per_token(s: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(s.to(dtype), y, reduction="none")

    return reduce_over_chunks(per_token, student_logits, labels, mask, reduction, chunk_size)
