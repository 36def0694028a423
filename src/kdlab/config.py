"""Start-up validation of a composed config, and the `${kdlab.asset:...}` resolver for files shipped in the package.

`validate` gathers every problem before anything heavy is built and raises one error listing them, each naming the
key and the fix: a sweep should fail in its first second, not after a teacher has loaded.
"""

from __future__ import annotations

from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from kdlab import ASSETS_DIR
from kdlab.data.tasks import task_config_errors
from kdlab.losses.cross_tokenizer import VARIANTS as OT_VARIANTS
from kdlab.losses.objective import SFT
from kdlab.losses.registry import (
    CROSS_TOKENIZER_LOSSES,
    DIVERGENCES,
    SAME_VOCAB_LOSSES,
    cross_tokenizer_params,
    divergence_params,
)
from kdlab.policy import FIXED_SOURCES

LOSS_COMMON_KEYS = {"name", "temperature", "ce_weight", "reduction", "chunk_size"}
REDUCTIONS = ("token_mean", "sequence_mean", "sum")


def register_resolvers() -> None:
    """`${kdlab.asset:arith/teacher}`: absolute path of a file or folder shipped in `kdlab/assets/`."""
    if not OmegaConf.has_resolver("kdlab.asset"):
        OmegaConf.register_new_resolver("kdlab.asset", lambda rel: str(ASSETS_DIR / rel))
    if not OmegaConf.has_resolver("kdlab.concat"):  # `${kdlab.concat:[a,b],${tags}}` -> one list
        OmegaConf.register_new_resolver("kdlab.concat", lambda *lists: [x for part in lists for x in part])
    if not OmegaConf.has_resolver("kdlab.sweep_group"):  # `${kdlab.sweep_group:<name outside a multirun>}`
        OmegaConf.register_new_resolver("kdlab.sweep_group", _sweep_group)
    if not OmegaConf.has_resolver("kdlab.method"):  # `${kdlab.method:${loss}}` -> fkl, jsd(0.9), ...
        OmegaConf.register_new_resolver("kdlab.method", _method_label)
    if not OmegaConf.has_resolver("kdlab.ot_variant"):  # `${kdlab.ot_variant:${.variant},0.15,1.5}` -> 0.15 or 1.5
        OmegaConf.register_new_resolver("kdlab.ot_variant", _ot_variant_value)


def in_multirun() -> bool:
    """True inside a job of a Hydra multirun (`python train.py -m ...`)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _sweep_group(default: str) -> str:
    """The jobs of one multirun share one W&B group, named after the sweep directory; a single run keeps `default`."""
    from hydra.core.hydra_config import HydraConfig

    if not in_multirun():
        return default
    from kdlab.report.runs import sweep_group_name

    return sweep_group_name(HydraConfig.get().sweep.dir)


def _ot_variant_value(variant: str, paper: Any, released_code: Any) -> Any:
    """A loss=ot setting that differs between the paper and the authors' released code: the one `variant` names.

    The setting stays an ordinary key of the resolved config (saved with every run); an explicit override wins.
    An unknown variant is reported by the config validation (`_cross_tokenizer_errors`)."""
    return released_code if variant == "released_code" else paper


def _method_label(loss: Any) -> str:
    from kdlab.report.runs import method_label

    return method_label(OmegaConf.to_container(loss, resolve=True) if isinstance(loss, DictConfig) else loss)


class ConfigError(ValueError):
    """The config cannot run; the message lists every problem found and how to fix each."""


def _loss_errors(loss: Mapping[str, Any]) -> list[str]:
    name = loss.get("name")
    known = sorted({*DIVERGENCES, *CROSS_TOKENIZER_LOSSES})
    if name != SFT and name not in known:
        return [f"loss={name} is unknown; choose loss=sft or one of {', '.join(known)}"]
    errors = []
    if name in CROSS_TOKENIZER_LOSSES:
        own = cross_tokenizer_params(name)
        errors += _cross_tokenizer_errors(loss)
    else:
        own = divergence_params(name) if name != SFT else set()
        for key in ("beta", "alpha"):
            if key in own and not 0.0 <= float(loss.get(key, 0.5)) <= 1.0:
                errors.append(f"loss.{key}={loss[key]} is outside [0, 1]; e.g. loss.{key}=0.5")
    for key in loss:
        if key not in LOSS_COMMON_KEYS | own:
            errors.append(f"loss.{key} does not apply to loss={name}; its keys: {sorted(LOSS_COMMON_KEYS | own)}")
    if float(loss.get("temperature", 1.0)) <= 0:
        errors.append(f"loss.temperature={loss['temperature']} must be > 0; e.g. loss.temperature=1.0")
    if float(loss.get("ce_weight", 0.0)) < 0:
        errors.append(f"loss.ce_weight={loss['ce_weight']} must be >= 0 (0 turns the hard-label term off)")
    if loss.get("reduction", "token_mean") not in REDUCTIONS:
        errors.append(f"loss.reduction={loss['reduction']} is unknown; choose one of {REDUCTIONS}")
    if int(loss.get("chunk_size", 1024)) < 1:
        errors.append(f"loss.chunk_size={loss['chunk_size']} must be a positive integer")
    return errors


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
    return errors


def config_errors(cfg: DictConfig) -> list[str]:
    """Every problem found in the config without loading anything."""
    from kdlab.lora import lora_errors
    from kdlab.rewards import reward_config_errors

    errors = _loss_errors(cfg.loss) + _policy_errors(cfg.policy) + task_config_errors(cfg.task)
    errors += reward_config_errors(cfg.get("reward"), float(cfg.policy.get("student_fraction", 0.0)))
    errors += lora_errors(cfg.student.get("lora") if cfg.get("student") is not None else None)
    loss_name = cfg.loss.get("name")
    has_teacher = cfg.get("teacher") is not None
    fraction = float(cfg.policy.get("student_fraction", 0.0))
    if loss_name != SFT and not has_teacher:
        errors.append(f"loss={loss_name} distills from a teacher but teacher=null; pick a teacher or use loss=sft")
    if cfg.policy.get("fixed_source") == "teacher" and fraction < 1.0 and not has_teacher:
        errors.append("policy.fixed_source=teacher (SeqKD) samples from the teacher but teacher=null; pick a teacher")
    if loss_name == SFT and fraction > 0:
        errors.append(
            f"loss=sft with policy.student_fraction={fraction}: cross-entropy on the student's own samples only "
            f"reinforces them; use policy=supervised (or policy=seqkd with a teacher) for SFT"
        )
    return errors


def vocabulary_errors(loss_name: str, same_vocabulary: bool, student_name: str, teacher_name: str) -> list[str]:
    if loss_name in SAME_VOCAB_LOSSES and not same_vocabulary:
        return [
            f"loss={loss_name} compares teacher and student token by token, but the tokenizers of "
            f"teacher={teacher_name} and student={student_name} have different vocabularies. Use a cross-tokenizer "
            f"loss, loss=ot (MultiLevelOT) or loss=uld (ULD), or a teacher and student that share a tokenizer."
        ]
    return []


def raise_if_any(errors: list[str]) -> None:
    if errors:
        raise ConfigError("invalid config:\n" + "\n".join(f"  - {e}" for e in errors))
