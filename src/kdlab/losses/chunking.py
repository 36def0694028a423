"""The losses' chunking: rows of (batch, positions) upcast and reduced a slice at a time, and the row weights that
turn per-token losses into each reduction.

Shared by the dense divergences, the CE term, the top-k (sparse) losses, the cross-tokenizer ranking and the fused
output-layer losses, so that every loss chunks and weighs rows the same way.
"""

from __future__ import annotations

from typing import Callable

import torch
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


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    # at least float32 (bf16/fp16 are upcast), but keep float64 so gradcheck sees full precision
    dtype = torch.float32
    for t in tensors:
        if t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def check_inputs(student_logits: Tensor, other: Tensor, mask: Tensor | None, other_name: str, other_shape) -> None:
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


def row_weights(mask: Tensor, reduction: str, dtype: torch.dtype) -> Tensor:
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


def rows_per_chunk(chunk_size: int, vocab: int, device: torch.device | None = None) -> int:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    budget = CHUNK_ELEMENTS if device is None or device.type == "cpu" else CHUNK_ELEMENTS_ACCELERATOR
    return max(1, min(chunk_size, budget // max(vocab, 1)))


def reduce_over_chunks(
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
    chunk_size = rows_per_chunk(chunk_size, vocab, student_logits.device)
    dtype = compute_dtype(student_logits, other)
    if mask is None:
        mask = torch.ones(batch, positions, dtype=torch.bool, device=student_logits.device)
    weights = row_weights(mask.bool(), reduction, dtype).reshape(-1)
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
