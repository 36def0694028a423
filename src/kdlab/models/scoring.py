"""Score target text with a loaded model: logits aligned with the target tokens, for either kind of model, or
(decoder-only models, `score_hidden`) the last hidden states the output layer would turn into those logits.

Decoder-only and encoder-decoder (T5-style, as in the GKD paper) models are both scored through `score_targets`, so
nothing downstream knows the difference. `length_groups` splits a batch into rows of similar length so that scoring
reads fewer padded positions; `real_token_positions` is the position rule that scoring and decoding share.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch
from torch import Tensor
from transformers import PreTrainedModel


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
    return _in_length_groups(_score, model, prompt_ids, prompt_mask, target_ids, target_mask, max_groups)


def score_hidden(
    model: PreTrainedModel,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    target_ids: Tensor,
    target_mask: Tensor,
    max_groups: int = 1,
) -> Tensor:
    """Last hidden states (batch, target_len, H) where the output layer turns `hidden[:, t]` into the logits that
    `score_targets` gives at t (those predicting `target_ids[:, t]`): the fused output layer and loss
    (kdlab.losses.fused) take them instead of logits, so no (batch, positions, vocabulary) tensor is made.

    Decoder-only models only (an encoder-decoder is scored through `score_targets`); the model's decoder stack
    (`decoder_of`) runs without its output layer. Same length groups as `score_targets` (rows past their group's
    longest target are zeros)."""
    if decoder_of(model) is None:
        raise ValueError(f"{type(unwrap(model)).__name__} has no decoder stack apart from its output layer: "
                         "score it with score_targets")
    return _in_length_groups(_hidden, model, prompt_ids, prompt_mask, target_ids, target_mask, max_groups)


def decoder_of(model: torch.nn.Module) -> torch.nn.Module | None:
    """The decoder stack of a decoder-only Hugging Face model (its `base_model`: every layer and the final norm,
    not the output layer), or None for an encoder-decoder model or one without a separate base model."""
    model = unwrap(model)
    if not isinstance(model, PreTrainedModel) or is_encoder_decoder(model):
        return None
    base = model.base_model
    return None if base is model else base


def _in_length_groups(read: Callable[..., Tensor], model: PreTrainedModel, prompt_ids: Tensor, prompt_mask: Tensor,
                      target_ids: Tensor, target_mask: Tensor, max_groups: int) -> Tensor:
    """`read(model, prompts, targets)` over the whole batch, or over its length groups (decoder-only models with
    `max_groups` > 1), back in the batch's row order: the one place scoring splits a batch."""
    if max_groups > 1 and not is_encoder_decoder(model):
        # left-padded prompts count from their first real token, right-padded targets to their last; one host sync
        prompt_len = prompt_mask.shape[1] - prompt_mask.int().argmax(dim=1)
        target_len = target_mask.shape[1] - target_mask.flip(1).int().argmax(dim=1)
        prompt_lengths, target_lengths = torch.stack([prompt_len, target_len]).tolist()
        groups = length_groups(prompt_lengths, target_lengths, max_groups)
        if len(groups) > 1:
            return _read_in_groups(read, model, prompt_ids, prompt_mask, target_ids, target_mask, groups,
                                   prompt_lengths, target_lengths)
    return read(model, prompt_ids, prompt_mask, target_ids, target_mask)


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


def _read_in_groups(
    read: Callable[..., Tensor],
    model: PreTrainedModel,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    target_ids: Tensor,
    target_mask: Tensor,
    groups: list[list[int]],
    prompt_lengths: list[int],
    target_lengths: list[int],
) -> Tensor:
    """`read` (`_score` or `_hidden`) per group, each trimmed to its own longest prompt and target, back in the
    batch's row order."""
    width = target_ids.shape[1]
    parts = []
    for rows in groups:
        index = torch.tensor(rows, device=prompt_ids.device)
        first = max(max(prompt_lengths[r] for r in rows), 1)
        last = max(max(target_lengths[r] for r in rows), 1)
        scores = read(model, prompt_ids[index, -first:], prompt_mask[index, -first:], target_ids[index, :last],
                      target_mask[index, :last])
        parts.append(torch.nn.functional.pad(scores, (0, 0, 0, width - last)))
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
    out = model(**_decoder_inputs(unwrap(model), prompt_ids, prompt_mask, target_ids, target_mask),
                use_cache=False, logits_to_keep=target_len + 1)
    return out.logits[:, :-1]


def _hidden(
    model: PreTrainedModel,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    target_ids: Tensor,
    target_mask: Tensor,
) -> Tensor:
    """`_score`'s positions, read before the output layer: the decoder stack's last hidden states."""
    decoder = decoder_of(model)
    out = decoder(**_decoder_inputs(decoder, prompt_ids, prompt_mask, target_ids, target_mask), use_cache=False)
    return out.last_hidden_state[:, -target_ids.shape[1] - 1: -1]


def _decoder_inputs(model: torch.nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, target_ids: Tensor,
                    target_mask: Tensor) -> dict[str, Tensor]:
    """A decoder-only model's inputs: prompt then target, and real-token positions where `model` takes them."""
    attention_mask = torch.cat([prompt_mask, target_mask], dim=1).long()
    inputs = {"input_ids": torch.cat([prompt_ids, target_ids], dim=1), "attention_mask": attention_mask}
    if _takes_position_ids(model):
        # Left padding shifts where each row starts: positions count real tokens only. Learned absolute positions
        # (OPT) depend on it; rotary ones are shift-invariant. BLOOM (ALiBi) has no positions and takes none.
        inputs["position_ids"] = real_token_positions(attention_mask)
    return inputs


def real_token_positions(mask: Tensor) -> Tensor:
    """Position ids of left-padded rows: real tokens count from 0, padding sits at 0 (it is masked anyway)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
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
