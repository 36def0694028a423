"""The one teacher interface: what a training step, validation and sampling ask of a teacher, whatever it is.

A teacher is a model in this process (`ModelTeacher`, reading the student's tokens or its own), a top-k cache
(`CachedTeacher`), a server (`RemoteTeacher`), or several of these mixed per token (`MixtureTeacher`) or routed by
an example field (`RoutedTeacher`). The step asks each the same questions and never which kind it holds:

    teacher.models          its models in this process: frozen, sharded, left out of checkpoints ([] outside)
    teacher.tokenizer       its own tokenizer, or None when it reads the student's tokens
    teacher.in_process      whether it scores any batch here, without I/O (validation's loss, the mismatch measures)
    teacher.generates       whether it can write a continuation of any prompt (SeqKD, its own evaluation)
    teacher.fused_reason()  why it cannot hand over hidden states and an output layer (None: it can)
    teacher.prepare(batch)  what must be read before any backward: a cache's rows, a server's answers
    teacher.scores(batch, prepared, want, groups, then)   its distributions over the batch's targets
    teacher.sample(batch, settings)                        its own continuations of the batch's prompts

`scores` answers in the form the loss asks for (`want`) where it can: logits (batch, positions, vocab), a `TopK` (a
cache, a server), `HiddenStates` (the fused path: last hidden states and the output layer, no logits tensor),
`TokenLogprobs` (want=TOKEN_LOGPROBS: the log-probability of each target token alone, loss=rkl_sampled), or
`Members` (several teachers: their parts, and their mixture where they mix). `then`, when given, is called on the
scores inside the teacher's forward (FSDP2 gathers a sharded output layer only there) and its result returned.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Protocol, Union

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from kdlab.data.batch import Batch
from kdlab.losses.fused import HiddenStates
from kdlab.losses.objective import Members
from kdlab.losses.sampled import TOKEN_LOGPROBS, TokenLogprobs  # noqa: F401  (a `want`, beside LOGITS and HIDDEN)
from kdlab.losses.sparse import TopK
from kdlab.sampling.base import SamplingSettings

LOGITS, HIDDEN = "logits", "hidden"  # what `scores` is asked for: logits (or what stands for them), hidden states


Scores = Union[Tensor, TopK, HiddenStates, TokenLogprobs, Members]


class Teacher(Protocol):
    """See the module doc."""

    name: str
    models: list[nn.Module]
    tokenizer: PreTrainedTokenizerBase | None
    in_process: bool
    generates: bool

    def fused_reason(self) -> str | None: ...

    def prepare(self, batch: Batch) -> Any: ...

    def scores(self, batch: Batch, prepared: Any, want: str = LOGITS, groups: int = 1,
               then: Callable[[Scores], Any] | None = None) -> Any: ...

    def sample(self, batch: Batch, settings: SamplingSettings, lockstep: bool = False) -> tuple[Tensor, Tensor]: ...


def rows_of(prepared: Any, start: int, stop: int, width: int | None = None) -> Any:
    """Rows [start, stop) of what `prepare` returned (None, a TopK, or one of those per member), its positions cut
    to `width`: the prepared answers of a slice of the batch (a rollout's rows)."""
    if prepared is None:
        return None
    if isinstance(prepared, dict):
        return {name: rows_of(part, start, stop, width) for name, part in prepared.items()}
    if isinstance(prepared, TokenLogprobs):
        cut = slice(0, width)
        return TokenLogprobs(prepared.logprobs[start:stop, cut], prepared.ids[start:stop, cut])
    if isinstance(prepared, TopK):
        cut = slice(0, width)
        return TopK(prepared.logprobs[start:stop, cut], prepared.ids[start:stop, cut], prepared.tail[start:stop, cut],
                    prepared.mask[start:stop, cut])
    raise TypeError(f"cannot take rows of a teacher's prepared {type(prepared).__name__}")


def with_vocab(scores: Scores, vocab: int) -> Scores:
    """`scores` over the first `vocab` columns (models of one tokenizer pad their output layers differently: the
    loss reads the columns every model has)."""
    if isinstance(scores, Tensor):
        return scores[..., :vocab]
    if isinstance(scores, HiddenStates):
        return replace(scores, layer=replace(scores.layer, vocab=min(vocab, scores.layer.columns)))
    return scores


def width_of(scores: Scores) -> int | None:
    """The vocabulary columns `scores` holds (None for a top-k or several teachers: they carry ids)."""
    if isinstance(scores, Tensor):
        return scores.shape[-1]
    if isinstance(scores, HiddenStates):
        return scores.layer.columns
    return None


def frozen(model: nn.Module) -> nn.Module:
    """A teacher model as every kind keeps it: no gradients, eval mode (no dropout, ever)."""
    model.requires_grad_(False)
    return model.eval()


def full_rows(batch: Batch) -> Tensor:
    """Every row of the batch (bool, (batch,)): the rows a mixture member teaches."""
    return torch.ones(len(batch), dtype=torch.bool, device=batch.student.target_mask.device)
