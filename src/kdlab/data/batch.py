"""The shape of a batch: one `Side` per tokenizer (left-padded prompts, right-padded targets) and the references.

A batch always has the student's side. When the teacher tokenizes differently it also has the teacher's own side: the
same examples' text in the teacher's tokens and prompt format (kdlab.sampling.retokenize crosses samples between the two
through text). A training step replaces a batch's targets with the ones its data policy picked (`with_targets`), so "the
step's targets" and "the batch" are one object all the way to the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class Side:
    """One tokenizer's tokens of a batch: prompts padded on the left, targets on the right (masks: True = token)."""

    prompt_ids: Tensor
    prompt_mask: Tensor
    target_ids: Tensor
    target_mask: Tensor

    @property
    def prompt(self) -> tuple[Tensor, Tensor]:
        return self.prompt_ids, self.prompt_mask

    @property
    def target(self) -> tuple[Tensor, Tensor]:
        return self.target_ids, self.target_mask

    def with_targets(self, ids: Tensor, mask: Tensor) -> "Side":
        return replace(self, target_ids=ids, target_mask=mask)

    def rows(self, start: int, stop: int) -> "Side":
        """Rows [start, stop), each part trimmed to its own padding: as wide as if those rows had been collated alone
        (prompts lose the columns padded on the left of every row, targets those on the right)."""
        prompt_ids, prompt_mask = _trim(self.prompt_ids[start:stop], self.prompt_mask[start:stop], left=True)
        target_ids, target_mask = _trim(self.target_ids[start:stop], self.target_mask[start:stop], left=False)
        return Side(prompt_ids, prompt_mask, target_ids, target_mask)

    def repeat_rows(self, k: int) -> "Side":
        """Each row k times in a row (k samples per prompt)."""
        return Side(*(t.repeat_interleave(k, dim=0) for t in (self.prompt_ids, self.prompt_mask, self.target_ids,
                                                              self.target_mask)))

    def to(self, device: torch.device | str) -> "Side":
        return Side(*(t.to(device) for t in (self.prompt_ids, self.prompt_mask, self.target_ids, self.target_mask)))


@dataclass(frozen=True)
class Batch:
    """Rows of examples: the student's tokens, the teacher's own when it tokenizes differently (else None), each
    example's reference text (what a prediction is scored against, and a reward's second argument) and its row in
    its split (a cached teacher's key; None where rows were not read from a split), and with several teachers
    routed by a field (`teacher.route_field`), that field's value per example."""

    student: Side
    reference: list[str]
    teacher: Side | None = None
    index: Tensor | None = None  # int64 (rows,), kept on the CPU
    route: list[str] | None = None

    def __len__(self) -> int:
        return len(self.reference)

    def side(self, role: str) -> Side:
        """The tokens `role` ("student" or "teacher") reads: the teacher's own side when there is one."""
        return self.teacher if role == "teacher" and self.teacher is not None else self.student

    def with_targets(self, student: tuple[Tensor, Tensor], teacher: tuple[Tensor, Tensor] | None) -> "Batch":
        """The same prompts with other targets (the step's: ground truth, or samples), on each side."""
        own = self.teacher.with_targets(*teacher) if self.teacher is not None and teacher is not None else None
        return Batch(self.student.with_targets(*student), self.reference, own, self.index, self.route)

    def split(self, size: int) -> list["Batch"]:
        """Consecutive micro-batches of `size` rows, each trimmed to its own padding (`Side.rows`)."""
        parts = []
        for start in range(0, len(self), size):
            stop = start + size
            teacher = self.teacher.rows(start, stop) if self.teacher is not None else None
            index = self.index[start:stop] if self.index is not None else None
            route = self.route[start:stop] if self.route is not None else None
            parts.append(Batch(self.student.rows(start, stop), self.reference[start:stop], teacher, index, route))
        return parts

    def repeat_rows(self, k: int) -> "Batch":
        """Each example k times in a row: k samples per prompt (GKD Eq. 5's reward step)."""
        teacher = self.teacher.repeat_rows(k) if self.teacher is not None else None
        index = self.index.repeat_interleave(k) if self.index is not None else None
        route = [r for r in self.route for _ in range(k)] if self.route is not None else None
        return Batch(self.student.repeat_rows(k), [r for r in self.reference for _ in range(k)], teacher, index, route)

    def to(self, device: torch.device | str) -> "Batch":
        teacher = self.teacher.to(device) if self.teacher is not None else None
        return Batch(self.student.to(device), self.reference, teacher, self.index, self.route)


def _trim(ids: Tensor, mask: Tensor, left: bool) -> tuple[Tensor, Tensor]:
    """Drop the columns no row uses: on the left of left-padded ids, on the right of right-padded ones."""
    used = mask.any(dim=0).nonzero()
    if used.numel() == 0:
        return ids, mask
    span = slice(int(used[0]), None) if left else slice(0, int(used[-1]) + 1)
    return ids[:, span], mask[:, span]
