"""Interleaved sampling for speculative knowledge distillation (`policy=speculative`).

Speculative KD (Xu et al., "Speculative Knowledge Distillation: Bridging the Teacher-Student Gap Through
Interleaved Sampling", ICLR 2025, Algorithm 1): the student proposes each next token y_i ~ q(. | y_<i, x); the
teacher keeps it when it is among the teacher's K most likely tokens at that position, y_i in top_K(p(. | y_<i, x)),
and otherwise replaces it with a token drawn from its own distribution, y_i ~ p(. | y_<i, x). The interleaved
sequence is the step's target, scored by both models with the run's divergence. The paper's default is K = 25
(`policy.speculative.top_k`); K = vocabulary keeps every proposal (on-policy GKD), K = 1 with a greedy teacher
keeps only the teacher's own greedy tokens.

`SpeculativeSampler` implements kdlab.sampling.base.Sampler for the student and an in-process teacher that reads the
student's tokens (kdlab.teachers.model.ModelTeacher). Both models advance together one token at a time, each with its
own KV cache: one forward of each per token, whatever was kept. Proposals are drawn as Hugging Face `generate`
draws them (the same logits warpers, one `torch.multinomial` per token from the global generator), and the
teacher's replacements only for the rows that need one, so with K = vocabulary the targets are the on-policy samples
`HFSampler` draws under the same seed. Replacements are drawn with `teacher_settings` (policy.speculative.teacher:
by default policy.sampling's temperature, top-p and top-k). Draws come from torch's generator, which the step seeds
per step: a resumed run repeats them. `lockstep` (sharded models) keeps every rank stepping until all have finished.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from kdlab.models.scoring import forward_parameters, is_encoder_decoder, unwrap
from kdlab.models.sharding import world_size
from kdlab.sampling.base import SamplingSettings, response_mask
from kdlab.sampling.layers import linears_for_sampling

PAPER_TOP_K = 25  # Xu et al. (ICLR 2025): the top-K of their experiments


@dataclass
class Interleaved:
    """One batch of interleaved samples: token ids and response mask (batch, new tokens) as a sampler returns them,
    and which of the response's tokens the teacher replaced (bool, False outside the mask)."""

    ids: Tensor
    mask: Tensor
    replaced: Tensor

    @property
    def accepted(self) -> Tensor:
        """The student's proposals the teacher kept (bool, False outside the mask)."""
        return self.mask & ~self.replaced


class SpeculativeSampler:
    """The student proposes, the teacher keeps its top-K and replaces the rest (see the module doc). `teacher` is a
    ModelTeacher reading the student's tokens; `teacher_settings` how it draws a replacement (None: the proposals'
    settings)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, tokenizer: PreTrainedTokenizerBase, top_k: int,
                 teacher_vocab: int | None = None, teacher_settings: SamplingSettings | None = None):
        if top_k < 1:
            raise ValueError(f"policy.speculative.top_k={top_k} must be >= 1 (the paper's default is {PAPER_TOP_K})")
        for role, model in (("student", student), ("teacher", teacher)):
            if is_encoder_decoder(model):
                raise ValueError(f"policy=speculative samples decoder-only models token by token; the {role} is "
                                 f"{type(model).__name__}, an encoder-decoder")
        self.student, self.teacher, self.tokenizer, self.top_k = student, teacher, tokenizer, top_k
        self.vocab = min(len(tokenizer), teacher_vocab or len(tokenizer))
        self.teacher_settings = teacher_settings

    def sample(self, prompt_ids: Tensor, prompt_mask: Tensor, settings: SamplingSettings, seed: int | None = None,
               lockstep: bool = False) -> tuple[Tensor, Tensor]:
        draw = self.interleaved(prompt_ids, prompt_mask, settings, seed, lockstep)
        return draw.ids, draw.mask

    def sync(self, model: nn.Module) -> None:
        """Nothing to do: both models are read as they are."""

    def interleaved(self, prompt_ids: Tensor, prompt_mask: Tensor, settings: SamplingSettings,
                    seed: int | None = None, lockstep: bool = False) -> Interleaved:
        """The interleaved continuations of left-padded prompts, and which tokens the teacher replaced."""
        models = (self.student, self.teacher)
        was_training = [m.training for m in models]
        for model in models:
            model.eval()
        # Sharded models keep no_grad (as kdlab.sampling.hf: FSDP's gather buffers must stay usable by training)
        grad_off = torch.no_grad() if lockstep else torch.inference_mode()
        try:
            with grad_off, linears_for_sampling(self.student), linears_for_sampling(self.teacher):
                ids, replaced = self._loop(prompt_ids, prompt_mask, settings, lockstep)
            ids, replaced = ids.clone(), replaced.clone()
        finally:
            for model, mode in zip(models, was_training):
                model.train(mode)
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        mask = response_mask(ids, eos)
        return Interleaved(ids.masked_fill(~mask, pad), mask, replaced & mask)

    def _loop(self, prompt_ids: Tensor, prompt_mask: Tensor, settings: SamplingSettings,
              lockstep: bool) -> tuple[Tensor, Tensor]:
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        attention = prompt_mask.long()
        positions = (attention.cumsum(-1) - 1).clamp(min=0)  # left padding: as generate counts positions
        student_logits, student_cache = _forward(self.student, prompt_ids, attention, positions, None)
        teacher_logits, teacher_cache = _forward(self.teacher, prompt_ids, attention, positions, None)
        position = positions[:, -1:]
        student_warp, teacher_warp = _warpers(settings), _warpers(self.teacher_settings or settings)
        unfinished = torch.ones(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)
        tokens, replaced = [], []
        for step in range(settings.max_new_tokens):
            proposal = _draw(self._columns(student_logits), student_warp, settings.do_sample, prompt_ids)
            kept = _in_top_k(self._columns(teacher_logits), proposal, self.top_k)
            replace = unfinished & ~kept
            token = proposal.clone()
            if bool(replace.any()):  # only these rows draw from the teacher: the generator is read as generate reads it
                teacher_settings = self.teacher_settings or settings
                token[replace] = _draw(self._columns(teacher_logits[replace]), teacher_warp,
                                       teacher_settings.do_sample, prompt_ids[replace])
            token = torch.where(unfinished, token, torch.full_like(token, pad))
            tokens.append(token)
            replaced.append(replace)
            unfinished = unfinished & (token != eos)
            if step + 1 == settings.max_new_tokens or _all_finished(unfinished, lockstep):
                break
            attention = torch.cat([attention, attention.new_ones(attention.shape[0], 1)], dim=1)
            position = position + 1
            student_logits, student_cache = _forward(self.student, token[:, None], attention, position, student_cache)
            teacher_logits, teacher_cache = _forward(self.teacher, token[:, None], attention, position, teacher_cache)
        if not tokens:  # max_new_tokens 0: one EOS keeps shapes valid (as kdlab.sampling.hf)
            return torch.full_like(prompt_ids[:, :1], eos), torch.zeros_like(prompt_ids[:, :1], dtype=torch.bool)
        return torch.stack(tokens, dim=1), torch.stack(replaced, dim=1)

    def _columns(self, logits: Tensor) -> Tensor:
        """Rows of an output layer padded beyond the tokenizer are no tokens: never drawn, never in a top-K."""
        if logits.shape[-1] <= self.vocab:
            return logits
        return logits.masked_fill(torch.arange(logits.shape[-1], device=logits.device) >= self.vocab, -torch.inf)


def _forward(model: nn.Module, ids: Tensor, attention: Tensor, positions: Tensor, cache) -> tuple[Tensor, object]:
    """The next-token logits (float32, as generate reads them) after `ids`, and the model's updated KV cache. The
    cache argument is `cache` from transformers 5.2x on (`past_key_values` before); BLOOM (ALiBi) takes no
    positions."""
    parameters = forward_parameters(type(unwrap(model)))
    kwargs = {"cache" if "cache" in parameters else "past_key_values": cache}
    if "position_ids" in parameters:
        kwargs["position_ids"] = positions
    out = model(input_ids=ids, attention_mask=attention, use_cache=True, logits_to_keep=1, **kwargs)
    new_cache = out.cache if "cache" in out else out.past_key_values
    return out.logits[:, -1, :].to(dtype=torch.float32, copy=True), new_cache


def _warpers(settings: SamplingSettings) -> LogitsProcessorList:
    """generate's warpers for these settings, in its order (temperature, top-k, top-p); none at the neutral values."""
    warpers = LogitsProcessorList()
    if not settings.do_sample:
        return warpers
    if settings.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(settings.temperature))
    if settings.top_k:
        warpers.append(TopKLogitsWarper(settings.top_k))
    if settings.top_p < 1.0:
        warpers.append(TopPLogitsWarper(settings.top_p))
    return warpers


def _draw(logits: Tensor, warpers: LogitsProcessorList, do_sample: bool, context: Tensor) -> Tensor:
    """One token per row: the argmax, or a draw from the warped softmax (one multinomial call, as generate)."""
    if not do_sample:
        return logits.argmax(dim=-1)
    scores = warpers(context, logits)
    return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)


def _in_top_k(logits: Tensor, tokens: Tensor, k: int) -> Tensor:
    """Whether each row's token is among the row's k largest logits (ties at the k-th value count as in)."""
    if k >= logits.shape[-1]:
        return torch.ones_like(tokens, dtype=torch.bool)
    kth = logits.topk(k, dim=-1).values[:, -1]
    return logits.gather(-1, tokens[:, None]).squeeze(-1) >= kth


def _all_finished(unfinished: Tensor, lockstep: bool) -> bool:
    """Whether every row has ended; in lockstep, on every rank (each sharded forward needs all of them)."""
    left = unfinished.any().to(torch.int32).reshape(1)
    if lockstep and world_size() > 1:
        dist.all_reduce(left)
    return not bool(left.item())
