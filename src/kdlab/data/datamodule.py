"""Tokenized datasets, collation into left-padded prompts and right-padded targets, and the LightningDataModule.

Text is tokenized once at setup, not per batch. Prompt and target are tokenized separately, exactly as generation
sees them (the model continues the prompt's tokens), and every target that fits ends with EOS so the student learns
to stop. Length rules and chat templates are documented on `PromptEncoder` and `TokenizedExamples`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from kdlab.data.batch import Batch, Side
from kdlab.data.order import StepSampler
from kdlab.data.tasks import Task, lookup, with_field

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
        if self.use_chat:  # chat-format data keeps its own turns and roles (system included)
            messages = self.task.conversation(example) or [{"role": "user", "content": self.task.prompt(example)}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.task.prompt(example)

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
    """Prompt ids, target ids and the reference text of each example (`Example`), under the task's length rules.

    Targets end with EOS so the student learns to stop; a target over `max_target_tokens` keeps its start and gets
    no EOS (the student is never taught to stop mid-answer). With `task.long_examples=skip`, training examples over
    either limit are dropped instead. Validation examples are never dropped for length (the evaluation set stays the
    dataset's): they are truncated. Every drop and cut is counted in `task.report`.

    With a `teacher_tokenizer` (teacher and student tokenize differently), the text stays the source of truth: each
    example is also tokenized for the teacher, with the teacher's own prompt format, as `Example.teacher`, under the
    same rules (reasons counted as "teacher prompt", "teacher target").
    """

    def __init__(self, examples: Sequence[dict], task: Task, tokenizer: PreTrainedTokenizerBase,
                 split: str = "train", teacher_tokenizer: PreTrainedTokenizerBase | None = None,
                 route_field: str | None = None):
        c = task.config
        skip_long = split == "train" and c.long_examples == "skip"
        sides = {"": _encode(examples, task, tokenizer)}
        if teacher_tokenizer is not None:
            sides["teacher "] = _encode(examples, task, teacher_tokenizer)
        self.items: list[Example] = []
        for index, example in enumerate(examples):
            cuts = [(who, cut) for who, side in sides.items() for cut in side[index][2:] if cut]
            if skip_long and cuts:
                who, cut = cuts[0]
                task.report.record_drop(split, f"too long {who}{cut.split()[0]}")
                continue
            for who, cut in cuts:
                task.report.record_truncation(split, who + cut)
            tokens = [Tokens(*side[index][:2]) for side in sides.values()]
            route = _route_value(example, route_field, split, index) if route_field else None
            self.items.append(Example(task.reference(example), *tokens, index=len(self.items), route=route))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> "Example":
        return self.items[index]


@dataclass(frozen=True)
class Tokens:
    """One example in one tokenizer's ids."""

    prompt: list[int]
    target: list[int]


@dataclass(frozen=True)
class Example:
    """One tokenized example: its reference text, the student's tokens, the teacher's own when they differ, and its
    row in its split (`TokenizedExamples.items[index]`, the key of a cached teacher's rows)."""

    reference: str
    student: Tokens
    teacher: Tokens | None = None
    index: int = -1
    route: str | None = None  # the value of `teacher.route_field`, when several teachers are routed by it


def _route_value(example: Mapping[str, Any], field: str, split: str, index: int) -> str:
    try:
        return str(lookup(example, field))
    except KeyError:
        raise ValueError(f"teacher.route_field={field}: {split} example {index} has no such field (its fields: "
                         f"{', '.join(example)})") from None


def _encode(
    examples: Sequence[dict], task: Task, tokenizer: PreTrainedTokenizerBase
) -> list[tuple[list[int], list[int], str | None, str | None]]:
    """(prompt ids, target ids, how the prompt was cut, how the target was cut) per example, for one tokenizer."""
    limit = task.config.max_target_tokens
    encoder = PromptEncoder(task, tokenizer)
    prompts = encoder.encode(examples)
    # a chat template ends the prompt with the assistant's turn: the answer follows it as written, with no space
    texts = [task.reference(e) if encoder.use_chat and task.config.messages_field else task.target(e)
             for e in examples]
    targets = tokenizer(texts, add_special_tokens=False)["input_ids"]
    out = []
    for (prompt, prompt_cut), target in zip(prompts, targets):
        if len(target) + 1 > limit:
            out.append((prompt, target[:limit], prompt_cut, "target"))
        else:
            out.append((prompt, target + [tokenizer.eos_token_id], prompt_cut, None))
    return out


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
    """Examples -> `Batch`: left-padded prompts and right-padded targets, on the teacher's side too when the teacher
    tokenizes differently."""

    def __init__(self, pad_token_id: int, teacher_pad_token_id: int | None = None):
        self.pad_token_id, self.teacher_pad_token_id = pad_token_id, teacher_pad_token_id

    def __call__(self, items: Sequence[Example]) -> Batch:
        teacher = None
        if self.teacher_pad_token_id is not None:
            teacher = _side([i.teacher for i in items], self.teacher_pad_token_id)
        index = torch.tensor([i.index for i in items], dtype=torch.long)
        route = [i.route for i in items] if items and items[0].route is not None else None
        return Batch(_side([i.student for i in items], self.pad_token_id), [i.reference for i in items], teacher, index,
                     route)


def _side(tokens: Sequence[Tokens], pad_id: int) -> Side:
    return Side(*pad([t.prompt for t in tokens], pad_id, "left"), *pad([t.target for t in tokens], pad_id, "right"))


class DistillationDataModule(L.LightningDataModule):
    """Train batches follow `StepSampler`: a function of the run seed and the step, so data order is reproducible.

    One train batch is one optimizer step's whole accumulation window on this process: `accumulate_grad_batches`
    micro-batches of `task.batch_size` rows, which the module splits (`Batch.split`) after counting the window's
    scored units, so that the loss is normalised once over the window (kdlab.losses.normalisation)."""

    def __init__(self, task: Task, tokenizer: PreTrainedTokenizerBase, seed: int = 0, num_workers: int = 0,
                 teacher_tokenizer: PreTrainedTokenizerBase | None = None, accumulate_grad_batches: int = 1,
                 route_field: str | None = None):
        super().__init__()
        if accumulate_grad_batches < 1:
            raise ValueError(f"trainer.accumulate_grad_batches={accumulate_grad_batches} must be at least 1")
        self.accumulate_grad_batches = accumulate_grad_batches
        self.task = task
        self.tokenizer = tokenizer
        self.teacher_tokenizer = teacher_tokenizer  # None: the teacher reads the student's tokens
        self.route_field = route_field  # several teachers routed per example by this field (kdlab.teachers.ensemble)
        self.seed = seed
        self.num_workers = num_workers
        self.collate = Collator(tokenizer.pad_token_id, teacher_tokenizer.pad_token_id if teacher_tokenizer else None)
        self.train_set: TokenizedExamples | None = None
        self.val_set: TokenizedExamples | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        splits = self.task.splits()
        teacher = self.teacher_tokenizer
        route = self.route_field
        self.train_set = TokenizedExamples(splits["train"], self.task, self.tokenizer, "train", teacher, route)
        self.val_set = TokenizedExamples(splits["validation"], self.task, self.tokenizer, "validation", teacher, route)
        batch_size = self.task.config.batch_size
        if len(self.train_set) < batch_size:
            raise ValueError(
                f"task {self.task.name}: {len(self.train_set)} training examples remain, fewer than one batch "
                f"(task.batch_size={batch_size}), so there is nothing to train on. Data report:\n"
                f"{self.task.report.summary()}"
            )

    def train_dataloader(self) -> DataLoader:
        # The order is a function of (seed, step): a resumed run continues where it stopped, and W processes of
        # windows of B rows see the same global batches as one process of B*W rows (kdlab.data.order), whether
        # B is one batch or accumulate x task.batch_size.
        trainer = self.trainer
        world, rank, start, total = 1, 0, 0, None
        if trainer is not None:
            world, rank, start = trainer.world_size, trainer.global_rank, trainer.global_step
            total = trainer.max_steps if trainer.max_steps > 0 else None
        window = self.task.config.batch_size * self.accumulate_grad_batches
        sampler = StepSampler(len(self.train_set), window, self.seed, num_replicas=world, rank=rank,
                              start_step=start, num_steps=total)
        return DataLoader(
            self.train_set,
            batch_size=window,
            sampler=sampler,
            drop_last=True,
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
