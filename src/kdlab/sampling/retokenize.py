"""Carry generated responses from one tokenizer to another through text (on-policy across tokenizers).

A student's sample is a sequence of student token ids; the teacher can only score it in its own tokens. The text is
the source of truth: each response is decoded (up to and without its EOS), re-encoded with the other tokenizer, and
given that tokenizer's EOS back if (and only if) the sample had stopped by itself. Response masks are rebuilt from
the new lengths, so both sides score exactly the same text.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from kdlab.data.datamodule import pad


def response_texts(ids: Tensor, mask: Tensor, tokenizer: PreTrainedTokenizerBase) -> tuple[list[str], list[bool]]:
    """(text, ended with EOS) of each row's masked tokens."""
    texts, ended = [], []
    for row_ids, row_mask in zip(ids.tolist(), mask.tolist()):
        tokens = [t for t, keep in zip(row_ids, row_mask) if keep]
        stopped = bool(tokens) and tokens[-1] == tokenizer.eos_token_id
        if stopped:
            tokens = tokens[:-1]
        texts.append(tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False))
        ended.append(stopped)
    return texts, ended


def retokenize(
    ids: Tensor, mask: Tensor, source: PreTrainedTokenizerBase, target: PreTrainedTokenizerBase
) -> tuple[Tensor, Tensor]:
    """Right-padded (ids, mask) in `target`'s tokens for the responses `ids` (`source`'s tokens, masked by `mask`)."""
    texts, ended = response_texts(ids, mask, source)
    encoded = target(texts, add_special_tokens=False)["input_ids"] if texts else []
    rows = [tokens + [target.eos_token_id] if stopped else tokens for tokens, stopped in zip(encoded, ended)]
    if not rows or max(len(r) for r in rows) == 0:  # nothing to score: one masked-out column keeps shapes valid
        width = 1
        return (torch.full((len(rows), width), target.pad_token_id, dtype=torch.long, device=ids.device),
                torch.zeros((len(rows), width), dtype=torch.bool, device=ids.device))
    new_ids, new_mask = pad(rows, target.pad_token_id, "right")
    return new_ids.to(ids.device), new_mask.to(ids.device)
