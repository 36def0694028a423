"""The most common teacher: a model in this process, reading the student's tokens or its own.

It scores a batch's targets under no_grad in eval mode, as logits over its tokenizer's columns or, for the fused
path, as its last hidden states and output layer (`HiddenStates`), computed inside its own forward so that FSDP2
gathers a sharded output layer for the loss (kdlab.models.sharding.within_forward). With its own tokenizer it reads
the batch's teacher side (`Batch.teacher`: the same text in its tokens), and a cross-tokenizer loss compares the two.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kdlab.data.batch import Batch
from kdlab.losses.fused import HiddenStates
from kdlab.losses.sampled import TokenLogprobs, target_logprobs
from kdlab.models.scoring import decoder_of, score_hidden, score_targets, unwrap
from kdlab.models.sharding import within_forward
from kdlab.sampling.base import Sampler, SamplingSettings
from kdlab.teachers.base import HIDDEN, TOKEN_LOGPROBS, frozen


class ModelTeacher:
    """One model in this process. `tokenizer` is its own when it tokenizes differently from the student (else None);
    `vocab` is the number of its tokenizer's tokens (the columns of its logits that are tokens)."""

    in_process = True
    generates = True

    def __init__(self, model: PreTrainedModel, vocab: int, sampler: Sampler,
                 tokenizer: PreTrainedTokenizerBase | None = None, name: str = "teacher"):
        self.model = frozen(model)
        self.models: list[nn.Module] = [self.model]
        self.vocab, self.sampler, self.tokenizer, self.name = vocab, sampler, tokenizer, name

    def fused_reason(self) -> str | None:
        return fused_model_reason(self.model)

    def prepare(self, batch: Batch) -> None:
        return None  # nothing to read ahead: it scores in the step

    def scores(self, batch: Batch, prepared: Any = None, want: str = "logits", groups: int = 1,
               then: Callable[[Any], Any] | None = None) -> Any:
        """Its logits over its tokenizer's columns, with want=HIDDEN its `HiddenStates`, or with want=TOKEN_LOGPROBS
        its log-probability of each target token (`TokenLogprobs`; see the module doc)."""
        side = batch.side("teacher")
        grad_enabled = torch.is_grad_enabled()  # the loss `then` computes may need a gradient path to the student

        def forward() -> Any:
            if want == HIDDEN:
                scores = HiddenStates(score_hidden(self.model, *side.prompt, *side.target, groups),
                                      output_layer(self.model, self.vocab))
            else:
                scores = score_targets(self.model, *side.prompt, *side.target, groups)[..., : self.vocab]
                if want == TOKEN_LOGPROBS:
                    scores = TokenLogprobs(target_logprobs(scores, side.target_ids), side.target_ids)
            with torch.set_grad_enabled(grad_enabled):
                return then(scores) if then is not None else scores

        with torch.no_grad():
            return within_forward(self.model, forward) if want == HIDDEN else forward()

    def sample(self, batch: Batch, settings: SamplingSettings, lockstep: bool = False) -> tuple[Tensor, Tensor]:
        """Its continuations of the batch's prompts, in its own tokens."""
        return self.sampler.sample(*batch.side("teacher").prompt, settings, lockstep=lockstep)


def fused_model_reason(model: nn.Module) -> str | None:
    """Why `model`'s scores cannot come from its hidden states and output layer (None when they can)."""
    from kdlab.losses.fused import unfused_reason

    model = unwrap(model)
    if decoder_of(model) is None:
        return f"{type(model).__name__} is not a decoder-only model with a decoder stack apart from its output layer"
    return unfused_reason(model)


def output_layer(model: nn.Module, vocab: int | None):
    """The model's output layer as kdlab.losses.fused reads it, cut to `vocab` columns (those that are tokens)."""
    from kdlab.losses.fused import OutputLayer

    model = unwrap(model)
    head = model.get_output_embeddings()
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    softcap = getattr(config, "final_logit_softcapping", None)
    rows = head.weight.shape[0]  # inside the forward of a sharded model: the whole weight's
    return OutputLayer(head.weight, head.bias, float(softcap) if softcap else None,
                       None if vocab is None else min(vocab, rows))
