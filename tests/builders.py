"""Builders shared by tests and the distributed workers: a step and a module from models built in code.

Not a test module (workers import it, and no worker imports from a test module): what a test needs to build a
DistillationModule around tiny models, through the same public constructors `kdlab.run.build` uses.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from kdlab.losses.objective import Objective, build_objective
from kdlab.sampling.base import SamplingSettings
from kdlab.sampling.hf import HFSampler
from kdlab.step.module import DistillationModule, OptimSettings, RunSettings
from kdlab.step.policy import GROUND_TRUTH, DataPolicy
from kdlab.step.step import DistillationStep
from kdlab.teachers.model import ModelTeacher


def model_teacher(model: torch.nn.Module, tokenizer: Any, own: bool = False) -> ModelTeacher:
    """A model teacher reading the student's tokens (`own=False`) or its own (`tokenizer` is then its own)."""
    return ModelTeacher(model, len(tokenizer), HFSampler(model, tokenizer), tokenizer if own else None)


def distillation_step(student: torch.nn.Module, tokenizer: Any, objective: Objective | dict,
                      teacher: torch.nn.Module | Any = None, teacher_tokenizer: Any = None, fused: bool = False,
                      score_groups: int = 1, reward: Any = None) -> DistillationStep:
    """The step around `student` and `teacher` (a model, wrapped as a ModelTeacher, or any Teacher); with
    `teacher_tokenizer` the teacher reads its own tokens. `objective` may be a `conf/loss` node."""
    if isinstance(objective, dict):
        objective = build_objective(objective)
    if isinstance(teacher, torch.nn.Module):
        teacher = model_teacher(teacher, teacher_tokenizer or tokenizer, own=teacher_tokenizer is not None)
    return DistillationStep(student, tokenizer, objective, HFSampler(student, tokenizer), teacher, reward, fused,
                            score_groups)


def distillation_module(student: torch.nn.Module, tokenizer: Any, objective: Objective | dict,
                        teacher: torch.nn.Module | Any = None, *, teacher_tokenizer: Any = None,
                        fraction: float = 0.0, fixed_source: str = GROUND_TRUTH, max_new_tokens: int = 4,
                        fused: bool = False, score_groups: int = 1, reward: Any = None, micro_batch_size: int = 8,
                        optimizer: Callable[..., torch.optim.Optimizer] | None = None, seed: int = 0,
                        eval_sampling: SamplingSettings | None = None, max_nonfinite_steps: int = 10,
                        rollouts: tuple[int, int] = (0, 0),
                        gradient_clip_val: float | None = None) -> DistillationModule:
    """A DistillationModule as `kdlab.run.build.build_module` makes one, from models built in code."""
    step = distillation_step(student, tokenizer, objective, teacher, teacher_tokenizer, fused, score_groups, reward)
    policy = DataPolicy(fraction, fixed_source, SamplingSettings(max_new_tokens=max_new_tokens, do_sample=True), seed)
    optim = OptimSettings(optimizer or (lambda params: torch.optim.SGD(params, lr=0.1)),
                          gradient_clip_val=gradient_clip_val)
    settings = RunSettings(micro_batch_size=micro_batch_size, seed=seed, max_nonfinite_steps=max_nonfinite_steps,
                           eval_sampling=eval_sampling or SamplingSettings(max_new_tokens=8, do_sample=False),
                           rollouts=rollouts)
    return DistillationModule(step, policy, optim, settings)
