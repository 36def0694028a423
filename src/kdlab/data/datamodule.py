"""Tokenized datasets, collation into left-padded prompts and right-padded targets, and the LightningDataModule.

Text is tokenized once at setup, not per batch. Prompt and target are tokenized separately, exactly as generation
sees them (the model continues the prompt's tokens), and every target that fits ends with EOS so the student learns
to stop. Length rules and chat templates are documented on `PromptEncoder` and `TokenizedExamples`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from kdlab.data.tasks import Task, lookup

PROBE = "kdlab probe text"


def special_affixes(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """The ids a tokenizer puts before and after text by default: BOS for Llama or OPT, EOS after a T5 input.

    Found by tokenizing a probe with and without special tokens, so no per-family table is needed.
    """
    plain = tokenizer(PROBE, add_special_tokens=False)["input_ids"]
    full = tokenizer(PROBE, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    return [], []


def with_field(example: Mapping[str, Any], path: str, value: Any) -> dict:
    """A copy of `example` with the field at `path` (`document`, `translation.en`) replaced."""
    head, _, rest = path.partition(".")
    out = dict(example)
    out[head] = with_field(example[head], rest, value) if rest else value
    return out


class PromptEncoder:
    """Example -> prompt token ids for one tokenizer.

    The prompt text goes through the tokenizer's chat template when it has one (and the task allows it); otherwise
    the tokenizer's own special tokens are put around it (BOS for decoder-only models, EOS after a T5 input).
    A prompt over `max_prompt_tokens` first has the end of `task.truncate_field` cut (an article keeps its lead and
    the instruction after it survives); if still too long, its start is dropped (the end is nearest the answer).
    """

    def __init__(self, task: Task, tokenizer: PreTrainedTokenizerBase):
        self.task = task
        self.tokenizer = tokenizer
        self.use_chat = task.config.chat_template == "auto" and bool(getattr(tokenizer, "chat_template", None))
        self.prefix, self.suffix = ([], []) if self.use_chat else special_affixes(tokenizer)
        self.limit = task.config.max_prompt_tokens - len(self.prefix) - len(self.suffix)
        if self.limit < 1:
            raise ValueError(f"task.max_prompt_tokens={task.config.max_prompt_tokens} leaves no room for text")

    def text(self, example: Mapping[str, Any]) -> str:
        text = self.task.prompt(example)
        if self.use_chat:
            messages = [{"role": "user", "content": text}]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def encode(self, examples: Sequence[Mapping[str, Any]]) -> list[tuple[list[int], str | None]]:
        """(ids, how it was cut: None, "prompt field" or "prompt") per example."""
        out = []
        for example, body in zip(examples, self._ids([self.text(e) for e in examples])):
            cut = None
            if len(body) > self.limit and self.task.config.truncate_field:
                body, cut = self._cut_field(example, body)
            if len(body) > self.limit:
                body, cut = body[-self.limit :], "prompt"
            out.append((self.prefix + body + self.suffix, cut))
        return out

    def _cut_field(self, example: Mapping[str, Any], body: list[int]) -> tuple[list[int], str | None]:
        path = self.task.config.truncate_field
        value = lookup(example, path)
        field_ids = self._ids([str(value)])[0]
        excess = len(body) - self.limit
        for slack in (0, 4, 16, 64):  # re-tokenizing the cut text can merge differently at the boundary
            keep = max(0, len(field_ids) - excess - slack)
            shortened = self.tokenizer.decode(field_ids[:keep])
            candidate = self._ids([self.text(with_field(example, path, shortened))])[0]
            if len(candidate) <= self.limit:
                return candidate, "prompt field"
        return body, None


class TokenizedExamples(Dataset):
    """Prompt ids, target ids and the reference text of each example, under the task's length rules.

    Targets end with EOS so the student learns to stop; a target over `max_target_tokens` keeps its start and gets
    no EOS (the student is never taught to stop mid-answer). With `task.long_examples=skip`, training examples over
    either limit are dropped instead. Validation examples are never dropped for length (the evaluation set stays the
    dataset's): they are truncated. Every drop and cut is counted in `task.report`.
    """

    def __init__(self, examples: Sequence[dict], task: Task, tokenizer: PreTrainedTokenizerBase,
                 split: str = "train"):
        c = task.config
        skip_long = split == "train" and c.long_examples == "skip"
        prompts = PromptEncoder(task, tokenizer).encode(examples)
        targets = tokenizer([task.target(e) for e in examples], add_special_tokens=False)["input_ids"]
        self.items = []
        for (prompt, prompt_cut), target, example in zip(prompts, targets, examples):
            target_cut = len(target) + 1 > c.max_target_tokens
            if skip_long and (prompt_cut or target_cut):
                task.report.record_drop(split, "too long prompt" if prompt_cut else "too long target")
                continue
            if prompt_cut:
                task.report.record_truncation(split, prompt_cut)
            if target_cut:
                task.report.record_truncation(split, "target")
                target = target[: c.max_target_tokens]
            else:
                target = target + [tokenizer.eos_token_id]
            self.items.append({"prompt": prompt, "target": target, "reference": task.reference(example)})

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
        self.train_set = TokenizedExamples(splits["train"], self.task, self.tokenizer, "train")
        self.val_set = TokenizedExamples(splits["validation"], self.task, self.tokenizer, "validation")
        batch_size = self.task.config.batch_size
        if len(self.train_set) < batch_size:
            raise ValueError(
                f"task {self.task.name}: {len(self.train_set)} training examples remain, fewer than one batch "
                f"(task.batch_size={batch_size}), so there is nothing to train on. Data report:\n"
                f"{self.task.report.summary()}"
            )

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
