"""Start-up validation of a composed config.

`validate` gathers every problem before anything heavy is built and raises one error listing them, each naming the
key and the fix: a sweep should fail in its first second, not after a teacher has loaded.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch
from omegaconf import DictConfig

from kdlab.data.tasks import task_config_errors
from kdlab.losses.chunking import REDUCTIONS
from kdlab.losses.cross_tokenizer import VARIANTS as OT_VARIANTS
from kdlab.losses.divergences import DIVERGENCES
from kdlab.losses.objective import CROSS_TOKENIZER_LOSSES, SFT, build_objective
from kdlab.losses.sampled import RKL_SAMPLED
from kdlab.sampling.vllm import vllm_config_errors
from kdlab.step.policy import FIXED_SOURCES


class ConfigError(ValueError):
    """The config cannot run; the message lists every problem found and how to fix each."""


def _loss_errors(loss: Mapping[str, Any]) -> list[str]:
    name = loss.get("name")
    if "_target_" not in loss:
        return [f"loss={name} names no loss function: set loss._target_ (e.g. kdlab.losses.forward_kl, or "
                "my_module.my_loss) with loss._partial_=true"]
    errors = []
    if name in CROSS_TOKENIZER_LOSSES:
        errors += _cross_tokenizer_errors(loss)
    elif name in DIVERGENCES:  # each setting's range is the divergence record's
        settings = [s for s in DIVERGENCES[name].settings if s.name in loss]
        errors += [e for e in (s.config_error(loss[s.name]) for s in settings) if e]
    if float(loss.get("temperature", 1.0)) <= 0:
        errors.append(f"loss.temperature={loss['temperature']} must be > 0; e.g. loss.temperature=1.0")
    if float(loss.get("ce_weight", 0.0)) < 0:
        errors.append(f"loss.ce_weight={loss['ce_weight']} must be >= 0 (0 turns the hard-label term off)")
    if loss.get("reduction", "token_mean") not in REDUCTIONS:
        errors.append(f"loss.reduction={loss['reduction']} is unknown; choose one of {REDUCTIONS}")
    if not isinstance(loss.get("fused", False), bool):
        errors.append(f"loss.fused={loss['fused']!r} must be true or false (false: the logits path in training steps)")
    if int(loss.get("chunk_size", 1024)) < 1:
        errors.append(f"loss.chunk_size={loss['chunk_size']} must be a positive integer")
    return errors or _loss_call_errors(loss)


def _loss_call_errors(loss: Mapping[str, Any]) -> list[str]:
    """Build the objective and run it once on a tiny batch, so that a function that cannot be loaded, a key it does
    not take or a value it refuses is reported at start-up, whatever function `loss._target_` names."""
    from hydra.errors import InstantiationException

    name, target = loss.get("name"), loss.get("_target_")
    try:
        objective = build_objective(loss)
    except KeyError as err:
        return [f"loss.{err.args[0]} is missing: loss={name} weighs its terms by it"]
    except InstantiationException as err:
        return [f"loss._target_={target} cannot be loaded: {err}"]
    cross = objective.cross_tokenizer
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 8, generator=generator)
    teacher = torch.randn(2, 4 if cross else 3, 10 if cross else 8, generator=generator)
    targets, mask = torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool)
    teacher_mask = torch.ones(2, 4, dtype=torch.bool) if cross else None
    try:
        objective.terms(student, teacher if objective.needs_teacher else None, targets, mask, teacher_mask)
    except TypeError as err:
        key = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        if key:
            return [f"loss.{key.group(1)} does not apply to loss={name} ({target}: {err})"]
        return [f"loss={name}: {target} cannot be called as fn(student_logits, teacher_logits, mask, **params): {err}"]
    except (ValueError, RuntimeError) as err:
        return [f"loss={name}: {target} refused its settings: {err}"]
    return []


def _cross_tokenizer_errors(loss: Mapping[str, Any]) -> list[str]:
    errors = []
    for key in ("alpha", "had_weight", "beta", "gamma", "uld_weight"):
        if key in loss and float(loss[key]) < 0:
            errors.append(f"loss.{key}={loss[key]} must be >= 0 (0 switches its term off)")
    for key in ("top_k", "sinkhorn_iterations"):
        if key in loss and int(loss[key]) < 1:
            errors.append(f"loss.{key}={loss[key]} must be a positive integer")
    for key in ("sl_temperature", "sd_temperature", "sinkhorn_epsilon"):
        if key in loss and float(loss[key]) <= 0:
            errors.append(f"loss.{key}={loss[key]} must be > 0")
    if "variant" in loss and loss["variant"] not in OT_VARIANTS:
        errors.append(f"loss.variant={loss['variant']} is unknown; choose one of {', '.join(OT_VARIANTS)} "
                      "(paper: the paper's equations; released_code: the authors' code, docs/cross_tokenizer.md)")
    return errors


def _policy_errors(policy: Mapping[str, Any]) -> list[str]:
    errors = []
    fraction = float(policy.get("student_fraction", 0.0))
    if not 0.0 <= fraction <= 1.0:
        errors.append(
            f"policy.student_fraction={fraction} is outside [0, 1] (it is the probability that a step trains on "
            f"student samples); e.g. policy.student_fraction=0.5, or policy=onpolicy / policy=supervised"
        )
    if policy.get("fixed_source", "ground_truth") not in FIXED_SOURCES:
        errors.append(f"policy.fixed_source={policy['fixed_source']} is unknown; choose one of {FIXED_SOURCES}")
    sampling = policy.get("sampling") or {}
    if float(sampling.get("temperature", 1.0)) <= 0:
        errors.append("policy.sampling.temperature must be > 0 (use do_sample=false for greedy decoding)")
    if not 0.0 < float(sampling.get("top_p", 1.0)) <= 1.0:
        errors.append(f"policy.sampling.top_p={sampling['top_p']} must be in (0, 1]; 1.0 turns nucleus sampling off")
    if int(sampling.get("top_k", 0)) < 0:
        errors.append(f"policy.sampling.top_k={sampling['top_k']} must be >= 0; 0 turns top-k off")
    if int(sampling.get("max_new_tokens", 1)) < 1:
        errors.append(f"policy.sampling.max_new_tokens={sampling['max_new_tokens']} must be >= 1")
    return errors + _speculative_errors(policy.get("speculative"))


def _speculative_errors(node: Mapping[str, Any] | None) -> list[str]:
    """policy=speculative's own settings (its teacher is checked by kdlab.teachers.build.speculative_errors)."""
    if not node:
        return []
    errors = []
    top_k = node.get("top_k")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        errors.append(f"policy.speculative.top_k={top_k!r} must be an integer >= 1 (the teacher keeps a proposal it "
                      f"ranks in its top K; the paper's default is 25)")
    known = ("do_sample", "temperature", "top_p", "top_k")
    errors += [f"policy.speculative.teacher.{key} is not a sampling setting of the teacher's replacements; known: "
               f"{', '.join(known)}" for key in (node.get("teacher") or {}) if key not in known]
    return errors


def config_errors(cfg: DictConfig) -> list[str]:
    """Every problem found in the config without loading anything."""
    from kdlab.models.lora import lora_errors
    from kdlab.step.rewards import reward_config_errors
    from kdlab.teachers.build import teacher_errors

    errors = _loss_errors(cfg.loss) + _policy_errors(cfg.policy) + task_config_errors(cfg.task) + _run_errors(cfg)
    errors += reward_config_errors(cfg.get("reward"), float(cfg.policy.get("student_fraction", 0.0)))
    errors += lora_errors(cfg.student.get("lora") if cfg.get("student") is not None else None)
    errors += teacher_errors(cfg)
    errors += vllm_config_errors(cfg)
    loss_name = cfg.loss.get("name")
    has_teacher = cfg.get("teacher") is not None
    fraction = float(cfg.policy.get("student_fraction", 0.0))
    if loss_name != SFT and not has_teacher:
        errors.append(f"loss={loss_name} distills from a teacher but teacher=null; pick a teacher or use loss=sft")
    if cfg.policy.get("fixed_source") == "teacher" and fraction < 1.0 and not has_teacher:
        errors.append("policy.fixed_source=teacher (SeqKD) samples from the teacher but teacher=null; pick a teacher")
    if loss_name == RKL_SAMPLED and fraction < 1.0:
        errors.append(f"loss=rkl_sampled with policy.student_fraction={fraction}: it weighs the student's own sampled "
                      f"tokens, and fixed data has no student samples to weigh; use policy=onpolicy "
                      f"(policy.student_fraction=1), or loss=rkl for the exact reverse KL on any targets")
    speculative = bool(cfg.policy.get("speculative")) and fraction > 0
    if speculative and str((cfg.policy.get("sampling") or {}).get("engine") or "hf") != "hf":
        errors.append("policy=speculative with policy.sampling.engine=vllm: the speculative sampler interleaves the "
                      "student's and the teacher's tokens one at a time in this process; use policy.sampling.engine=hf")
    if speculative and loss_name == RKL_SAMPLED:
        errors.append("loss=rkl_sampled with policy=speculative: the estimator needs the student's own samples, and "
                      "speculative targets hold the teacher's replacements; use policy=onpolicy, or a divergence "
                      "(fkl, rkl, jsd) with policy=speculative")
    if speculative and cfg.get("reward") is not None and float(cfg.reward.get("alpha", 1.0)) < 1:
        errors.append("reward= with policy=speculative: REINFORCE weighs the student's own samples, and speculative "
                      "targets hold the teacher's replacements; use policy=onpolicy with a reward, or reward=none")
    if loss_name == SFT and fraction > 0:
        errors.append(
            f"loss=sft with policy.student_fraction={fraction}: cross-entropy on the student's own samples only "
            f"reinforces them; use policy=supervised (or policy=seqkd with a teacher) for SFT"
        )
    return errors


def _run_errors(cfg: DictConfig) -> list[str]:
    """Settings of the training run itself (conf/train.yaml), which the module would otherwise meet only after the
    models have loaded."""
    errors = []
    if int(cfg.score_groups) < 1:
        errors.append(f"score_groups={cfg.score_groups} must be a positive integer (the most groups of rows of "
                      f"similar length a batch is scored in); score_groups=1 scores one padded batch")
    if int(cfg.log_rollouts_every_n_steps) < 0 or int(cfg.log_rollouts_examples) < 1:
        errors.append(f"log_rollouts_every_n_steps={cfg.log_rollouts_every_n_steps} must be >= 0 (0: no rollouts) and "
                      f"log_rollouts_examples={cfg.log_rollouts_examples} >= 1")
    steps = int(cfg.nonfinite.max_consecutive_steps)
    if steps < 1:
        errors.append(f"nonfinite.max_consecutive_steps={steps} must be a positive integer (how many skipped "
                      f"non-finite steps in a row stop the run); 1 stops at the first")
    return errors


def device_errors(trainer: Mapping[str, Any]) -> list[str]:
    """`trainer.accelerator=gpu` (trainer=gpu) where torch sees no CUDA GPU, or fewer than `trainer.devices`: said at
    start-up in one line, not by Lightning's accelerator check inside the trainer's instantiation. This machine's, not
    the config's: `config_errors` stays true of a config wherever it runs."""
    if str(trainer.get("accelerator", "cpu")) not in ("gpu", "cuda"):
        return []
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    devices = trainer.get("devices", 1)
    wanted = devices if isinstance(devices, int) and devices > 0 else 1  # "auto", -1, a list: at least one
    if visible >= wanted:
        return []
    return [f"trainer.accelerator={trainer['accelerator']} with trainer.devices={devices}, but torch sees "
            f"{visible} CUDA GPU{'' if visible == 1 else 's'}; use trainer=cpu (or trainer.accelerator=cpu), or check "
            "the driver and CUDA_VISIBLE_DEVICES"]


def vocabulary_errors(loss_name: str, same_vocabulary: bool, student_name: str, teacher_name: str) -> list[str]:
    if loss_name not in (SFT, *CROSS_TOKENIZER_LOSSES) and not same_vocabulary:
        return [
            f"loss={loss_name} compares teacher and student token by token, but the tokenizers of "
            f"teacher={teacher_name} and student={student_name} have different vocabularies. Use a cross-tokenizer "
            f"loss, loss=ot (MultiLevelOT) or loss=uld (ULD), or a teacher and student that share a tokenizer."
        ]
    return []


def raise_if_any(errors: list[str]) -> None:
    if errors:
        raise ConfigError("invalid config:\n" + "\n".join(f"  - {e}" for e in errors))
