"""The mismatch GKD's argument rests on, measured: how the teacher judges what the student writes by itself.

GKD (Agarwal et al., 2024) explains its gain by the gap between the prefixes a student trains on (fixed data) and the
ones it produces at inference (its own outputs). Every student evaluation measures that gap on the student's own
greedy outputs, the ones the task scores, per generated token:

- `own_teacher_nll`: -log p_T(y_t | x, y_<t), the teacher's negative log-likelihood of the student's token;
- `own_fkl`: KL(p_T || p_S) over the vocabulary at each position (forward KL, teacher first);
- `own_rkl`: KL(p_S || p_T) (reverse KL).

Each is a mean over all generated tokens of the evaluation (the end-of-sequence token included, padding not). Needs
a teacher that scores in the process with the student's tokenizer (a model, or several mixed): across tokenizers no
per-token divergence exists, and an outside teacher's top-k gives no exact one.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from kdlab.losses.chunking import compute_dtype
from kdlab.losses.rowwise import kl

Scorer = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor | None]
MISMATCH_KEYS = ("own_teacher_nll", "own_fkl", "own_rkl")
# At most this many (row, position, vocab) logits of one model at a time: rows are scored in groups under it.
SCORE_ELEMENTS = 2**24


@torch.no_grad()
def own_output_sums(score_student: Scorer, score_teacher: Scorer, prompt: tuple[Tensor, Tensor],
                    target: tuple[Tensor, Tensor], vocab: int) -> Tensor | None:
    """(rows, 4) per-row sums over the target's tokens of the teacher's NLL, KL(T || S) and KL(S || T), and the
    number of tokens; None when the teacher gives no dense scores of them (`score_teacher` returns None). Each
    scorer maps (prompt ids, prompt mask, target ids, target mask) to logits (rows, positions, columns); only the
    first `vocab` columns (the tokenizer's) that both have are read: an output layer padded beyond the tokenizer has
    rows that are no tokens. Rows are scored in groups of at most SCORE_ELEMENTS logits each."""
    ids, mask = target
    rows, width = ids.shape
    step = max(1, SCORE_ELEMENTS // max(1, width * vocab))
    parts = []
    for start in range(0, rows, step):
        part = slice(start, start + step)
        args = (prompt[0][part], prompt[1][part], ids[part], mask[part])
        teacher_logits = score_teacher(*args)
        if teacher_logits is None:
            return None
        student_logits = score_student(*args)
        v = min(vocab, student_logits.shape[-1], teacher_logits.shape[-1])
        dtype = compute_dtype(student_logits, teacher_logits)  # float32 at least; float64 models stay float64
        log_s = torch.log_softmax(student_logits[..., :v].to(dtype), dim=-1)
        log_t = torch.log_softmax(teacher_logits[..., :v].to(dtype), dim=-1)
        m = mask[part].to(log_t.dtype)
        nll = -log_t.gather(-1, ids[part].clamp(max=v - 1)[..., None])[..., 0]
        per_token = torch.stack([nll, kl(log_t, log_s), kl(log_s, log_t)], dim=-1)
        # where, not *: positions past a group's longest target hold zero logits, never garbage, but stay out anyway
        sums = torch.where(m[..., None] > 0, per_token, 0.0).sum(dim=1)
        parts.append(torch.cat([sums, m.sum(dim=1, keepdim=True)], dim=-1))
    return torch.cat(parts).cpu() if parts else torch.zeros(0, 4)


def per_token_means(sums: list[list[float]]) -> dict[str, float]:
    """`own_output_sums`' rows (from every batch and process) -> each measure's mean over all tokens."""
    total = torch.tensor(sums, dtype=torch.float64).reshape(-1, 4).sum(dim=0)
    tokens = max(float(total[3]), 1.0)
    return {key: float(total[i]) / tokens for i, key in enumerate(MISMATCH_KEYS)}
