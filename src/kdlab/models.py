"""Load or build the teacher and the student, and score target text with either kind of model.

A model config (`conf/teacher/*.yaml`, `conf/student/*.yaml`) names either a pretrained checkpoint (`path`: a local
directory or a hub name) or an architecture built from config (`architecture` + `config`, random init) with a tokenizer
that needs no download. Decoder-only and encoder-decoder (T5-style, as in the GKD paper) models are both scored through
`score_targets`, which returns logits aligned with the target tokens, so nothing downstream knows the difference.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
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

from kdlab.lora import add_lora, lora_enabled

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

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    from kdlab.hub import offline_unless_reachable

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
    only, on a frozen base (kdlab.lora).
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
    FSDP's `strategy.activation_checkpointing` may enable it again. transformers >= 5.24 names it
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


def is_encoder_decoder(model: PreTrainedModel) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def score_targets(
    model: PreTrainedModel,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    target_ids: Tensor,
    target_mask: Tensor,
    max_groups: int = 1,
) -> Tensor:
    """Logits (batch, target_len, vocab) where `logits[:, t]` predicts `target_ids[:, t]`.

    Prompts are left-padded and targets right-padded. A decoder-only model reads prompt+target and only the
    target positions go through the LM head (`logits_to_keep`), which is most of the saving on long prompts.
    An encoder-decoder model encodes the prompt and reads the target shifted right behind its start token.

    `max_groups` > 1 lets a decoder-only model read the batch in up to that many groups of rows of similar length,
    each trimmed to its own longest prompt and target (`length_groups`): on-policy samples end anywhere up to the
    sampling limit, so one padded batch is a third padding. Every row gets the logits it gets alone (logits past
    its group's longest target are zeros, which every loss masks); under sharding every rank must run the same
    forwards, so the module passes 1 there.
    """
    if max_groups > 1 and not is_encoder_decoder(model):
        # left-padded prompts count from their first real token, right-padded targets to their last; one host sync
        prompt_len = prompt_mask.shape[1] - prompt_mask.int().argmax(dim=1)
        target_len = target_mask.shape[1] - target_mask.flip(1).int().argmax(dim=1)
        prompt_lengths, target_lengths = torch.stack([prompt_len, target_len]).tolist()
        groups = length_groups(prompt_lengths, target_lengths, max_groups)
        if len(groups) > 1:
            return _score_in_groups(model, prompt_ids, prompt_mask, target_ids, target_mask, groups,
                                    prompt_lengths, target_lengths)
    return _score(model, prompt_ids, prompt_mask, target_ids, target_mask)


def length_groups(
    prompt_lengths: list[int], target_lengths: list[int], max_groups: int, gain: float = 0.05, blocks: int = 64
) -> list[list[int]]:
    """Rows split into at most `max_groups` groups for scoring, the split that reads the fewest positions, a group
    reading (rows x (its longest prompt + its longest target)). Each group beyond the first must save `gain` of
    the positions, since a forward pass has a fixed cost too. Groups are runs of the rows ordered by target length
    (then prompt length), found by dynamic programming over at most `blocks` runs of that order."""
    n = len(target_lengths)
    order = sorted(range(n), key=lambda row: (target_lengths[row], prompt_lengths[row]))
    edges = sorted({round(b * n / min(blocks, n)) for b in range(min(blocks, n) + 1)})  # block boundaries
    m = len(edges) - 1
    block_prompt = [max(prompt_lengths[r] for r in order[edges[i]:edges[i + 1]]) for i in range(m)]
    # cost[k][j]: fewest positions for the first j blocks in k groups; start[k][j]: the block its last group starts
    inf = float("inf")
    cost, start = [[0.0] + [inf] * m], [[0] * (m + 1)]
    best_k, best = 1, inf
    for k in range(1, max(1, max_groups) + 1):
        row_cost, row_start = [inf] * (m + 1), [0] * (m + 1)
        for j in range(1, m + 1):
            longest_target = target_lengths[order[edges[j] - 1]]  # sorted: the group's last row is its longest
            longest_prompt = 0
            for i in range(j - 1, -1, -1):
                longest_prompt = max(longest_prompt, block_prompt[i])
                total = cost[k - 1][i] + (edges[j] - edges[i]) * (longest_prompt + longest_target)
                if total < row_cost[j]:
                    row_cost[j], row_start[j] = total, i
        cost.append(row_cost)
        start.append(row_start)
        if row_cost[m] < best * (1 - gain):
            best_k, best = k, row_cost[m]
    bounds, j = [m], m
    for k in range(best_k, 0, -1):
        j = start[k][j]
        bounds.append(j)
    bounds = bounds[::-1]
    return [order[edges[a]:edges[b]] for a, b in zip(bounds, bounds[1:])]


def _score_in_groups(
    model: PreTrainedModel,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    target_ids: Tensor,
    target_mask: Tensor,
    groups: list[list[int]],
    prompt_lengths: list[int],
    target_lengths: list[int],
) -> Tensor:
    """`_score` per group, each trimmed to its own longest prompt and target, back in the batch's row order."""
    width = target_ids.shape[1]
    parts = []
    for rows in groups:
        index = torch.tensor(rows, device=prompt_ids.device)
        first = max(max(prompt_lengths[r] for r in rows), 1)
        last = max(max(target_lengths[r] for r in rows), 1)
        logits = _score(model, prompt_ids[index, -first:], prompt_mask[index, -first:], target_ids[index, :last],
                        target_mask[index, :last])
        parts.append(torch.nn.functional.pad(logits, (0, 0, 0, width - last)))
    order = torch.tensor([row for rows in groups for row in rows], device=prompt_ids.device)
    return torch.cat(parts).index_select(0, torch.argsort(order))


def _score(
    model: PreTrainedModel,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    target_ids: Tensor,
    target_mask: Tensor,
) -> Tensor:
    target_len = target_ids.shape[1]
    if is_encoder_decoder(model):
        start = torch.full_like(target_ids[:, :1], model.config.decoder_start_token_id)
        decoder_ids = torch.cat([start, target_ids[:, :-1]], dim=1)
        decoder_mask = torch.cat([torch.ones_like(target_mask[:, :1]), target_mask[:, :-1]], dim=1)
        out = model(
            input_ids=prompt_ids,
            attention_mask=prompt_mask.long(),
            decoder_input_ids=decoder_ids,
            decoder_attention_mask=decoder_mask.long(),
            use_cache=False,
        )
        return out.logits
    input_ids = torch.cat([prompt_ids, target_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, target_mask], dim=1).long()
    kwargs = {}
    if _takes_position_ids(_unwrap(model)):
        # Left padding shifts where each row starts: positions count real tokens only. Learned absolute positions
        # (OPT) depend on it; rotary ones are shift-invariant. BLOOM (ALiBi) has no positions and takes none.
        kwargs["position_ids"] = real_token_positions(attention_mask)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        use_cache=False,
        logits_to_keep=target_len + 1,
        **kwargs,
    )
    return out.logits[:, :-1]


def real_token_positions(mask: Tensor) -> Tensor:
    """Position ids of left-padded rows: real tokens count from 0, padding sits at 0 (it is masked anyway)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside DDP/FSDP-style wrappers (whose own forward takes only *args, **kwargs)."""
    while not isinstance(model, PreTrainedModel) and isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


@functools.cache
def forward_parameters(model_cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(model_cls.forward).parameters)


def _takes_position_ids(model: torch.nn.Module) -> bool:
    """Whether the model's forward names `position_ids` (inspected once per class)."""
    return "position_ids" in forward_parameters(type(model))


def same_vocabulary(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """True when both tokenizers map the same strings to the same ids (what token-level losses need)."""
    return a is b or (len(a) == len(b) and a.get_vocab() == b.get_vocab())

