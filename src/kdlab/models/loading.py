"""Load or build the teacher and the student and their tokenizers.

A model config (`conf/teacher/*.yaml`, `conf/student/*.yaml`) names either a pretrained checkpoint (`path`: a local
directory or a hub name) or an architecture built from config (`architecture` + `config`, random init) with a tokenizer
that needs no download. Scoring target text with a loaded model is `kdlab.models.scoring`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    BloomConfig,
    BloomForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from kdlab.models.lora import add_lora, lora_enabled

# Architectures a preset can build from config with random weights (tests, ablations, `teacher=tiny_opt`): one per
# family of the papers' models (GKD: T5; MultiLevelOT: Llama, Mistral, Qwen2 teachers, OPT, Pythia, BLOOM students),
# and of the pairs distilled today (Qwen3; Gemma 3's text model; Llama 3.x and SmolLM2 are `llama`).
ARCHITECTURES: dict[str, tuple[type, type]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "t5": (T5Config, T5ForConditionalGeneration),
    "opt": (OPTConfig, OPTForCausalLM),
    "gpt_neox": (GPTNeoXConfig, GPTNeoXForCausalLM),
    "bloom": (BloomConfig, BloomForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}  # float64: references in tests, where float32 rounding would hide a real error


class HubUnavailableError(RuntimeError):
    """A hub model was asked for and the hub cannot be reached."""


def _tokenizer_source(model_cfg: Mapping[str, Any]) -> str:
    source = model_cfg.get("tokenizer") or model_cfg.get("path")
    if not source:
        raise ValueError(f"model '{model_cfg.get('name')}' names neither `path` nor `tokenizer`")
    return str(source)


def _hub_kwargs(model_cfg: Mapping[str, Any], source: str) -> dict[str, Any]:
    """`revision` (a branch, tag or commit of `path`) and `trust_remote_code` (off unless the preset turns it on).

    The revision belongs to `path`: a `tokenizer` elsewhere takes its own `tokenizer_revision`.
    """
    own = source == str(model_cfg.get("path"))
    revision = model_cfg.get("revision") if own else model_cfg.get("tokenizer_revision")
    kwargs: dict[str, Any] = {"trust_remote_code": bool(model_cfg.get("trust_remote_code", False))}
    if revision:
        kwargs["revision"] = str(revision)
    return kwargs


def _from_pretrained(loader, source: str, what: str, **kwargs):
    """`from_pretrained` with one clear error for a missing local folder or a hub name that cannot be fetched."""
    if source.startswith(("/", ".", "~")) and not Path(source).expanduser().exists():
        raise FileNotFoundError(f"{what} folder '{source}' does not exist")
    from kdlab.models.hub import offline_unless_reachable

    try:
        if Path(source).expanduser().exists():
            return loader.from_pretrained(source, **kwargs)
        with offline_unless_reachable():  # no network: the cache or one clear error, not minutes of retries
            return loader.from_pretrained(source, **kwargs)
    except OSError as err:
        if Path(source).expanduser().exists():
            raise
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise HubUnavailableError(
            f"could not load {what} '{source}': it is not a local folder and the Hugging Face hub could not "
            f"provide it ({type(err).__name__}: {reason}). Point the config at local files instead, e.g. "
            f"`student.path=/path/to/model_dir` or `teacher.path=...` (a folder written by save_pretrained, or by "
            f"`hf download {source} --local-dir model_dir` where there is network), or set HF_HOME to a cache that "
            f"holds it. "
            f"Gated models (Llama, Gemma) also need an accepted licence and HF_TOKEN."
        ) from err


def load_tokenizer(model_cfg: Mapping[str, Any]) -> PreTrainedTokenizerBase:
    """The model's tokenizer, left-padded (generation appends to the right of the prompt)."""
    source = _tokenizer_source(model_cfg)
    tokenizer = _from_pretrained(AutoTokenizer, source, "tokenizer", **_hub_kwargs(model_cfg, source))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_cfg: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A pretrained model from `path`, or a randomly initialised `architecture` sized by `config`.

    Pretrained: `dtype`, `attn_implementation` (sdpa, eager, flash_attention_2), `revision` and `trust_remote_code`
    (default false) go to `from_pretrained`. Random init draws from torch's global RNG, so the run seed fixes it.
    `gradient_checkpointing: true` recomputes each transformer block in backward instead of keeping its activations
    (in train mode only; it changes no value). `lora: {r, alpha, dropout, target_modules}` trains low-rank adapters
    only, on a frozen base (kdlab.models.lora).
    """
    dtype_name = model_cfg.get("dtype", "float32")
    if dtype_name not in DTYPES:
        raise ValueError(f"model '{model_cfg.get('name')}': dtype={dtype_name!r}; choose one of {sorted(DTYPES)}")
    dtype = DTYPES[dtype_name]
    if model_cfg.get("path"):
        source = str(model_cfg["path"])
        hub = _hub_kwargs(model_cfg, source)
        config = _from_pretrained(AutoConfig, source, "model config", **hub)
        loader = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        kwargs = {"dtype": dtype, **hub}
        if model_cfg.get("attn_implementation"):
            kwargs["attn_implementation"] = model_cfg["attn_implementation"]
        from kdlab.run.console import quiet_weight_bars, weight_files_bytes

        with quiet_weight_bars(weight_files_bytes(source, hub.get("revision"))):
            model = _from_pretrained(loader, source, "model", **kwargs)
    else:
        model = _build(model_cfg, tokenizer, dtype)
    if lora_enabled(model_cfg.get("lora")):  # adapters on a frozen base
        model = add_lora(model, model_cfg["lora"])
    if model_cfg.get("gradient_checkpointing", False):
        enable_activation_checkpointing(model)
    return model


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each transformer block in backward (non-reentrant checkpoints: no input needs grad). Idempotent, so
    FSDP's `trainer.strategy.activation_checkpointing` may enable it again. transformers >= 5.24 names it
    `activation_checkpointing_enable` (the older name warns)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _build(model_cfg: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype) -> PreTrainedModel:
    """A random-init `architecture` with the tokenizer's special ids and its vocabulary, unless `config.vocab_size`
    pads the output layer beyond it (as Qwen, Gemma and Llama checkpoints do)."""
    architecture = model_cfg.get("architecture")
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"model '{model_cfg.get('name')}': architecture={architecture!r}; known: {sorted(ARCHITECTURES)}"
        )
    config_cls, model_cls = ARCHITECTURES[architecture]
    # The config's own defaults are the hub model's ids (OPT pads with 1, BLOOM's vocabulary is 250880): every
    # family takes the tokenizer's instead, so embeddings, padding and stopping agree with the text.
    special = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    if architecture == "t5":
        special["decoder_start_token_id"] = tokenizer.pad_token_id
    overrides = model_cfg.get("config") or {}
    if isinstance(overrides, DictConfig):  # plain lists and dicts: configs validate field types (layer_types)
        overrides = OmegaConf.to_container(overrides, resolve=True)
    settings = {**special, **overrides}
    if settings["vocab_size"] < len(tokenizer):
        raise ValueError(
            f"model '{model_cfg.get('name')}': config.vocab_size={settings['vocab_size']} is smaller than its "
            f"tokenizer ({len(tokenizer)} tokens); leave it out, or pad beyond {len(tokenizer)}"
        )
    model = model_cls(config_cls(**settings)).to(dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def same_vocabulary(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """True when both tokenizers map the same strings to the same ids (what token-level losses need)."""
    return a is b or (len(a) == len(b) and a.get_vocab() == b.get_vocab())

