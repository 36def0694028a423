"""Which sequences a training step learns from: the fixed data or the student's own samples (GKD Algorithm 1).

With probability `student_fraction` (the paper's lambda) a step trains on sequences the student samples itself
(on-policy); otherwise on the fixed data: the ground-truth targets (supervised KD) or teacher samples (SeqKD).
With `speculative` (policy=speculative, Xu et al. ICLR 2025) the on-policy steps train on interleaved samples instead:
the student proposes each token and the teacher replaces those outside its top-K (kdlab.sampling.speculative).
The draw depends only on (seed, step), so every rank of a distributed run takes the same branch without talking,
and a resumed run repeats the draws of the uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdlab.sampling.base import SamplingSettings

STUDENT, GROUND_TRUTH, TEACHER = "student", "ground_truth", "teacher"  # where a step's targets come from
SPECULATIVE = "speculative"  # the student's proposals, with the teacher's replacements (policy=speculative)
FIXED_SOURCES = (GROUND_TRUTH, TEACHER)
# Sources the student sampled (on-policy steps): no CE term on them, it would only reinforce the student's own tokens
SAMPLED_SOURCES = (STUDENT, SPECULATIVE)


@dataclass(frozen=True)
class DataPolicy:
    """The on-policy fraction, where fixed targets come from and how samples are drawn (conf/policy/*.yaml sets
    them: no defaults here), and the run's seed, of which each step's draw is a function. `speculative`: on-policy
    steps interleave the teacher's tokens (policy=speculative)."""

    student_fraction: float
    fixed_source: str
    sampling: SamplingSettings
    seed: int
    speculative: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.student_fraction <= 1.0:
            raise ValueError(f"student_fraction={self.student_fraction} is outside [0, 1]")
        if self.fixed_source not in FIXED_SOURCES:
            raise ValueError(f"fixed_source={self.fixed_source!r}; choose one of {FIXED_SOURCES}")

    def draw(self, step: int) -> str:
        """The source of step `step`'s targets: "student" (or "speculative"), "ground_truth" or "teacher"."""
        onpolicy = SPECULATIVE if self.speculative else STUDENT
        if self.student_fraction >= 1.0:
            return onpolicy
        if self.student_fraction > 0.0:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            if torch.rand((), generator=generator).item() < self.student_fraction:
                return onpolicy
        return self.fixed_source

    @property
    def uses_teacher_samples(self) -> bool:
        return self.fixed_source == TEACHER and self.student_fraction < 1.0
