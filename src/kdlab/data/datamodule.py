"""Tokenized datasets, collation into left-padded prompts and right-padded targets, and the LightningDataModule.

Text is tokenized once at setup, not per batch. Prompt and target are tokenized separately, exactly as generation
sees them (the model continues the prompt's tokens), and every target ends with EOS so the student learns to stop.
"""

from __future__ import annotations

from typing import Any, Sequence

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from kdlab.data.tasks import Task


class TokenizedExamples(Dataset):
    """Prompt ids, target ids (+EOS) and the reference text of each example."""

    def __init__(self, examples: Sequence[dict], task: Task, tokenizer: PreTrainedTokenizerBase):
        c = task.config
        prompts = tokenizer([task.prompt(e) for e in examples], add_special_tokens=False)["input_ids"]
        targets = tokenizer([task.target(e) for e in examples], add_special_tokens=False)["input_ids"]
        self.items = [
            {
                "prompt": prompt[-c.max_prompt_tokens :],
                "target": target[: c.max_target_tokens - 1] + [tokenizer.eos_token_id],
                "reference": task.reference(example),
            }
            for prompt, target, example in zip(prompts, targets, examples)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def pad(sequences: Sequence[Sequence[int]], pad_id: int, side: str) -> tuple[Tensor, Tensor]:
    """(ids, mask) padded on `side` ("left" for prompts, "right" for targets) to the longest sequence."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = True
    return ids, mask


class Collator:
    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: Sequence[dict]) -> dict[str, Any]:
        prompt_ids, prompt_mask = pad([i["prompt"] for i in items], self.pad_token_id, "left")
        target_ids, target_mask = pad([i["target"] for i in items], self.pad_token_id, "right")
        return {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "target_ids": target_ids,
            "target_mask": target_mask,
            "reference": [i["reference"] for i in items],
        }


class DistillationDataModule(L.LightningDataModule):
    """Train batches are shuffled by a generator seeded from the run seed, so data order is reproducible."""

    def __init__(self, task: Task, tokenizer: PreTrainedTokenizerBase, seed: int = 0, num_workers: int = 0):
        super().__init__()
        self.task = task
        self.tokenizer = tokenizer
        self.seed = seed
        self.num_workers = num_workers
        self.collate = Collator(tokenizer.pad_token_id)
        self.train_set: TokenizedExamples | None = None
        self.val_set: TokenizedExamples | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        splits = self.task.splits()
        self.train_set = TokenizedExamples(splits["train"], self.task, self.tokenizer)
        val = splits["validation"][: self.task.config.eval_examples]
        self.val_set = TokenizedExamples(val, self.task, self.tokenizer)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set,
            batch_size=self.task.config.batch_size,
            shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(self.seed),
            collate_fn=self.collate,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_set,
            batch_size=self.task.config.eval_batch_size,
            collate_fn=self.collate,
            num_workers=self.num_workers,
        )
