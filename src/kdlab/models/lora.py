"""LoRA students through `peft`: adapters on a frozen base (`student.lora.{r, alpha, dropout, target_modules}`).

The adapters are injected into the Hugging Face model in place (`peft.inject_adapter_in_model`), so the student stays
a `PreTrainedModel`: generation (compiled decoding included), scoring, DDP and FSDP2's per-block sharding see the
same classes as for full fine-tuning, and only the adapter weights require grad. Checkpoints keep the adapters only
(the base is rebuilt from its config on resume); the export writes the adapter in peft's format
(`PeftModel.from_pretrained`) and the merged model (`from_pretrained`, no peft needed).
"""

from __future__ import annotations

from collections.abc import Mapping
from copy import deepcopy
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from transformers import PreTrainedModel

if TYPE_CHECKING:
    from peft import LoraConfig

ADAPTER_KEY = "lora_"  # every adapter parameter's name holds it (lora_A, lora_B)
PEFT_PREFIX = "base_model.model."  # how PeftModel.save_pretrained names the weights of the model it wraps
KEYS = {"r", "alpha", "dropout", "target_modules"}


def lora_enabled(lora: Mapping[str, Any] | None) -> bool:
    """`student.lora` is on when it names a rank above 0 (null or r=0: full fine-tuning)."""
    return lora is not None and int(lora.get("r", 0) or 0) > 0


def lora_errors(lora: Mapping[str, Any] | None) -> list[str]:
    """Problems in `student.lora` (null or r=0: off), each naming the key and the fix."""
    if lora is None:
        return []
    if not isinstance(lora, Mapping):
        return [f"student.lora={lora!r} must be a mapping with keys {sorted(KEYS)} (r=0 or null: off)"]
    errors = [f"student.lora.{key} is unknown; its keys: {sorted(KEYS)}" for key in lora if key not in KEYS]
    r, alpha, dropout = lora.get("r", 0), lora.get("alpha", 32), lora.get("dropout", 0.0)
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        errors.append(f"student.lora.r={r!r} must be a positive integer (the adapter rank; 0: off), "
                      "e.g. student.lora.r=16")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        errors.append(f"student.lora.alpha={alpha!r} must be > 0 (the update is scaled by alpha / r), "
                      "e.g. student.lora.alpha=32")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        errors.append(f"student.lora.dropout={dropout!r} must be in [0, 1), e.g. student.lora.dropout=0.05")
    targets = lora.get("target_modules", "all-linear")
    names = _is_list(targets) and len(targets) > 0 and all(isinstance(t, str) and t for t in targets)
    if targets != "all-linear" and not names:
        errors.append(f"student.lora.target_modules={targets!r} must be a non-empty list of module names or "
                      "all-linear, e.g. student.lora.target_modules=[q_proj,v_proj]")
    return errors


def _is_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) or OmegaConf.is_list(value)


def lora_config(lora: Mapping[str, Any]) -> LoraConfig:
    """peft's LoraConfig for `student.lora` (plain LoRA: no DoRA, no rsLoRA, so the merge is W + alpha/r * B A)."""
    from peft import LoraConfig

    if isinstance(lora, DictConfig):
        lora = OmegaConf.to_container(lora, resolve=True)
    targets = lora.get("target_modules", "all-linear")
    return LoraConfig(
        r=int(lora["r"]),
        lora_alpha=float(lora.get("alpha", 32)),
        lora_dropout=float(lora.get("dropout", 0.0)),
        target_modules=targets if isinstance(targets, str) else list(targets),
        bias="none",
    )


def add_lora(model: PreTrainedModel, lora: Mapping[str, Any]) -> PreTrainedModel:
    """Inject adapters into `model` in place and freeze everything else; returns the same model.

    The adapters' A matrices draw from torch's global RNG (B starts at zero, so the model's outputs are unchanged):
    the run seed fixes them."""
    from peft import inject_adapter_in_model

    model.requires_grad_(False)
    model = inject_adapter_in_model(lora_config(lora), model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(ADAPTER_KEY in name)
    return model


def has_lora(model: nn.Module) -> bool:
    return any(ADAPTER_KEY in name for name, _ in model.named_parameters())


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor once."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique)


def export_lora(model: PreTrainedModel, state: Mapping[str, Tensor], directory: str | Path) -> None:
    """Write `directory/adapter` (peft's adapter_config.json + adapter_model.safetensors, for
    `PeftModel.from_pretrained(base, directory/adapter)`) and the merged model in `directory` (for
    `from_pretrained`), from `state`: the student's full state dict (gathered whole when sharded).

    Both are built on a fresh copy loaded from `state`, so the training model (sharded or not) is left untouched."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    fresh = _fresh_copy(model, state)
    config = fresh.peft_config["default"]
    adapter_dir = Path(directory) / "adapter"
    config.base_model_name_or_path = model.config._name_or_path or None  # a hub name or folder; None: built
    config.save_pretrained(str(adapter_dir))
    adapter = get_peft_model_state_dict(fresh, adapter_name="default")
    weights = {PEFT_PREFIX + name: tensor.contiguous() for name, tensor in adapter.items()}
    save_file(weights, str(adapter_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    merge_adapters(fresh).save_pretrained(str(directory))


def _fresh_copy(model: PreTrainedModel, state: Mapping[str, Tensor]) -> PreTrainedModel:
    """An unsharded model of the student's class and dtype, with the same adapters, holding `state`."""
    from peft import inject_adapter_in_model
    from torch.distributed.fsdp import FSDPModule

    cls = next(c for c in type(model).__mro__ if issubclass(c, PreTrainedModel) and not issubclass(c, FSDPModule))
    fresh = cls(model.config).to(model.dtype)
    fresh.generation_config = model.generation_config
    fresh = inject_adapter_in_model(deepcopy(model.peft_config["default"]), fresh)
    missing, unexpected = fresh.load_state_dict(dict(state), strict=False)
    # a tied output layer is saved once, under the embedding's name
    missing = set(missing) - tied_parameter_names(fresh)
    if unexpected or missing:
        raise RuntimeError(f"LoRA export: the state dict does not fit the student (missing {sorted(missing)}, "
                           f"unexpected {sorted(unexpected)})")
    return fresh


def tied_parameter_names(model: nn.Module) -> set[str]:
    """Names of parameters that are the same tensor as a parameter named before them (tied weights)."""
    seen: set[int] = set()
    tied = set()
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in seen:
            tied.add(name)
        seen.add(id(parameter))
    return tied


def merge_adapters(model: PreTrainedModel) -> PreTrainedModel:
    """Fold each adapter into its base layer (W + alpha/r * B A) and put the plain layer back, in place: what peft's
    `merge_and_unload` does, on a model that is not wrapped in a PeftModel."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge(safe_merge=True)  # safe: raises on a non-finite merged weight instead of saving it
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model
