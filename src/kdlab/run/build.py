"""From a composed config to the objects a run is made of: policy, reward, samplers, the step, the module, loggers and
the trainer. `kdlab.run.train.run` calls them in order; tests and benchmarks call them to build what a run builds."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from omegaconf import DictConfig, OmegaConf

from kdlab.data.tasks import Task
from kdlab.evaluation.generations import GenerationScorer
from kdlab.losses.objective import build_objective
from kdlab.models.loading import load_model
from kdlab.models.sharding import FSDP2Strategy
from kdlab.run import rundir
from kdlab.run.checkpoints import LastCheckpoint, PreemptionCheckpoint
from kdlab.run.last_step import LogLastStep
from kdlab.run.progress import StepProgressBar
from kdlab.sampling.base import ENGINE_KEYS, Sampler, SamplingSettings
from kdlab.sampling.hf import HFSampler
from kdlab.sampling.speculative import SpeculativeSampler
from kdlab.sampling.vllm import engine_of
from kdlab.step.fused import ALWAYS_UNFUSED, fused_off_reason
from kdlab.step.module import DistillationModule, OptimSettings, RunSettings
from kdlab.step.policy import DataPolicy
from kdlab.step.rewards import RewardTerm
from kdlab.step.rollouts import ROLLOUTS, RolloutWriter
from kdlab.step.step import DistillationStep
from kdlab.teachers.model import ModelTeacher

log = logging.getLogger(__name__)
# strategies whose sharded parameters are outside a model's forward: the fused loss reads the output weight there
SHARDING_STRATEGIES = ("FSDPStrategy", "ModelParallelStrategy")


def build_policy(cfg: DictConfig) -> DataPolicy:
    return DataPolicy(student_fraction=float(cfg.policy.student_fraction), fixed_source=cfg.policy.fixed_source,
                      sampling=sampling_settings(cfg.policy.sampling), seed=int(cfg.seed),
                      speculative=bool(cfg.policy.get("speculative")))


def build_speculative(policy: Any, student: Any, teacher: Any, tokenizer: Any) -> SpeculativeSampler | None:
    """policy=speculative's sampler (kdlab.sampling.speculative) when the policy has on-policy steps, else None. The
    teacher must be one model in this process reading the student's tokens (the config checks refuse the rest at
    start-up; this is the last word once the models exist)."""
    node = policy.get("speculative")
    if not node or float(policy.student_fraction) <= 0:
        return None
    if not isinstance(teacher, ModelTeacher) or teacher.tokenizer is not None:
        raise ValueError("policy=speculative needs one teacher model in this process that reads the student's tokens "
                         "(its top-K must rank the student's proposals)")
    changes = {key: value for key, value in dict(node.get("teacher") or {}).items() if value is not None}
    settings = replace(sampling_settings(policy.sampling), **changes) if changes else None
    return SpeculativeSampler(student, teacher.model, tokenizer, int(node.top_k), teacher_vocab=teacher.vocab,
                              teacher_settings=settings)


def sampling_settings(node: Any) -> SamplingSettings:
    """`policy.sampling` or `task.generation` as SamplingSettings (keys that pick an engine are the sampler's)."""
    return SamplingSettings(**{k: v for k, v in dict(node).items() if k not in ENGINE_KEYS})


def build_reward(cfg: DictConfig) -> RewardTerm | None:
    """The reward term of GKD Eq. 5 from `conf/reward/*.yaml` (None: pure distillation)."""
    node = cfg.get("reward")
    if node is None:
        return None
    return RewardTerm(hydra.utils.instantiate(node.fn), alpha=node.alpha, samples_per_prompt=node.samples_per_prompt)


def build_sampler(model: Any, tokenizer: Any, sampling: Any = None) -> Sampler:
    """The sampler a model draws its continuations with (the student's, and an in-process teacher's), by
    `policy.sampling.engine` (`sampling`: that node; None: hf): Hugging Face `generate`, or an in-process vLLM engine
    (kdlab.sampling.vllm, imported only then)."""
    if engine_of(sampling) == "vllm":
        from kdlab.sampling.vllm import VllmSampler, VllmSettings

        return VllmSampler(model, tokenizer, VllmSettings.from_config(sampling.get("vllm")))
    return HFSampler(model, tokenizer)


def sampler_factory(cfg: DictConfig) -> Callable[[Any, Any], Sampler]:
    """`build_sampler` with the run's `policy.sampling`: what builds a model teacher's sampler."""
    return partial(build_sampler, sampling=cfg.policy.get("sampling"))


def strategy_of(cfg: DictConfig) -> Any:
    """The trainer preset's strategy (conf/trainer/strategy/): an object built from its `_target_` (DDP, FSDP2), or
    a name Lightning resolves (auto: one device, or DDP over several)."""
    node = cfg.trainer.strategy
    return hydra.utils.instantiate(node) if "_target_" in node else node.name


def use_fused(cfg: DictConfig, step_parts: dict[str, Any]) -> bool:
    """Whether training steps fuse the output layer and the loss (`loss.fused`, where the objective, the models and
    the strategy allow it); the reason it cannot is logged once (shown with verbose=true)."""
    if not cfg.loss.fused:
        return False
    reason = fused_off_reason(step_parts["objective"], step_parts["student"], step_parts["teacher"])
    target = str(cfg.trainer.strategy.get("_target_", ""))
    if reason is None and target.rsplit(".", 1)[-1] in SHARDING_STRATEGIES:
        reason = ("the models are sharded by a strategy other than trainer=fsdp, whose FSDP2 units run the fused loss "
                  "inside their forward; others leave the output weight sharded")
    if reason is None:
        ce = " and its CE term" if step_parts["objective"].ce_weight > 0 else ""
        log.info("loss.fused: training steps compute loss=%s%s from hidden states and the output layers; the logits "
                 "path stays for %s", cfg.loss.name, ce, ALWAYS_UNFUSED)
    else:
        log.info("loss.fused: training steps keep the logits path: %s", reason)
    return reason is None


def build_module(cfg: DictConfig, task: Task, student_tokenizer: Any, teacher: Any,
                 resume_command: str | None = None) -> DistillationModule:
    """Load the student and build the step (objective, sampler, reward, the fused choice) and the module (policy,
    optimizer, and the two trainer keys the module applies itself under manual optimization: gradient clipping, and
    accumulation, which is the datamodule's window)."""
    student = load_model(cfg.student, student_tokenizer)
    parts = {"student": student, "objective": build_objective(cfg.loss), "teacher": teacher}
    sampler = build_sampler(student, student_tokenizer, cfg.policy.get("sampling"))
    step = DistillationStep(tokenizer=student_tokenizer, sampler=sampler,
                            reward=build_reward(cfg), fused=use_fused(cfg, parts), score_groups=int(cfg.score_groups),
                            speculative=build_speculative(cfg.policy, student, teacher, student_tokenizer), **parts)
    optim = OptimSettings(optimizer=hydra.utils.instantiate(cfg.optimizer),
                          scheduler=hydra.utils.instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
                          gradient_clip_val=cfg.trainer.get("gradient_clip_val"),
                          gradient_clip_algorithm=cfg.trainer.get("gradient_clip_algorithm") or "norm")
    settings = RunSettings(micro_batch_size=int(task.config.batch_size), seed=int(cfg.seed),
                           max_nonfinite_steps=int(cfg.nonfinite.max_consecutive_steps),
                           eval_sampling=sampling_settings(task.config.generation),
                           rollouts=(int(cfg.log_rollouts_every_n_steps), int(cfg.log_rollouts_examples)),
                           **({"resume_command": resume_command} if resume_command else {}))
    return DistillationModule(step, build_policy(cfg), optim, settings)


def build_loggers(cfg: DictConfig) -> list:
    loggers = [hydra.utils.instantiate(node) for node in (cfg.get("logger") or {}).values() if node is not None]
    config = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams(config)
    return loggers


def build_trainer(cfg: DictConfig, task: Task, loggers: list, output_dir: Path) -> tuple[L.Trainer,
                                                                                       PreemptionCheckpoint]:
    strategy = strategy_of(cfg)
    last = LastCheckpoint(rundir.last_checkpoint(output_dir), int(cfg.checkpoint.every_n_train_steps))
    preemption = PreemptionCheckpoint(last)
    extra = [hydra.utils.instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node is not None]
    # LogLastStep first: the learning rate monitor then logs the last step too. LastCheckpoint last: a periodic save
    # sees what the other callbacks did at the end of the step (as Lightning orders its own)
    callbacks = [LogLastStep(), preemption, LearningRateMonitor(logging_interval="step"), GenerationScorer(task),
                 RolloutWriter(output_dir / ROLLOUTS), *extra, last]
    if cfg.trainer.get("enable_progress_bar", True) and not any(isinstance(c, ProgressBar) for c in extra):
        callbacks.insert(-1, StepProgressBar())
    # FSDP2 allocates its gather buffers lazily at the first forward; under inference mode (Lightning's default for
    # validate, which runs first) they would become inference tensors that training cannot use. no_grad instead.
    inference_mode = not isinstance(strategy, FSDP2Strategy) and cfg.trainer.get("inference_mode", True)
    # The module accumulates and clips itself (one loss normalisation per window): these two keys go to it and to
    # the datamodule, and Lightning, which refuses them under manual optimization, gets neutral values.
    trainer = hydra.utils.instantiate(
        cfg.trainer, strategy=strategy, logger=loggers or False, callbacks=callbacks, default_root_dir=str(output_dir),
        inference_mode=inference_mode, enable_checkpointing=False,  # LastCheckpoint is the one writer of last.ckpt
        accumulate_grad_batches=1, gradient_clip_val=None, gradient_clip_algorithm=None,
    )
    return trainer, preemption
