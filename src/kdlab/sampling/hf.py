"""Sampling with Hugging Face models: `generate`, or the compiled static-cache loop, behind the sampler interface.

`HFSampler` (kdlab.sampling.base.Sampler) samples from a model it holds, without gradient, in eval mode (no dropout:
the paper's on-policy samples come from the model as it would be used), with the KV cache on, from left-padded
prompts, and leaves the model's train/eval mode as it found it. It reads the model's current weights at every call,
so `sync` has nothing to do. Its draws come from torch's generator, which the training step seeds per step
(kdlab.step.resilience.step_seed): a resumed run repeats them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from kdlab.models.scoring import is_encoder_decoder
from kdlab.sampling import compiled
from kdlab.sampling.base import SamplingSettings, response_mask
from kdlab.sampling.layers import linears_for_sampling


class HFSampler:
    """Samples `model`'s continuations with `generate` or the compiled loop (`settings.compile`); see the module doc.
    The tokenizer gives the padding and end-of-sequence ids, and its size: rows of an output layer padded beyond it
    are never drawn."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        self.model, self.tokenizer = model, tokenizer

    def sample(self, prompt_ids: Tensor, prompt_mask: Tensor, settings: SamplingSettings, seed: int | None = None,
               lockstep: bool = False) -> tuple[Tensor, Tensor]:
        return generate_targets(self.model, prompt_ids, prompt_mask, settings,
                                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
                                synced_gpus=lockstep, vocab=len(self.tokenizer))

    def sync(self, model: nn.Module) -> None:
        """Nothing to do: `generate` reads the model's weights as they are."""


def generate_targets(
    model: PreTrainedModel,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    settings: SamplingSettings,
    *,
    pad_token_id: int,
    eos_token_id: int,
    synced_gpus: bool = False,
    vocab: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Generate a continuation of each prompt; returns (target_ids, target_mask), both (batch, new_tokens).

    Tokens after a row's first EOS become padding and are masked out, so a sample scores exactly like a reference
    target: its text, then EOS. `synced_gpus` keeps ranks in lockstep under sharding (a rank that finished early
    keeps stepping so the others' collectives do not hang). `vocab` (the tokenizer's size) keeps the rows of an output
    layer padded beyond the tokenizer from ever being drawn: they are no tokens at all.
    """
    was_training = model.training
    model.eval()
    try:
        # inference_mode, not only no_grad: no version counters or view tracking on the per-token tensors (8% of
        # sampling time on the shipped models, docs/benchmarks.md). The clone makes the tokens a normal tensor that
        # autograd may save (the scoring pass embeds them). Sharded models keep no_grad: FSDP reuses the buffers it
        # gathers parameters into, and one allocated under inference_mode could not be used by a training forward.
        config = settings.generation_config(pad_token_id, eos_token_id)
        head = model.get_output_embeddings()
        rows = head.weight.shape[0] if head is not None else vocab
        if vocab is not None and rows > vocab:  # generate suppresses them (the compiled loop then falls back)
            config.suppress_tokens = list(range(vocab, rows))
        use_compiled_loop = settings.compile and _compiled_loop_applies(model, config, synced_gpus)
        grad_off = torch.no_grad() if synced_gpus else torch.inference_mode()
        # linear layers read as W @ x.T on CPU (kdlab.sampling.layers): up to 2-6x faster at a few rows per step
        with grad_off, linears_for_sampling(model):
            if use_compiled_loop:
                new_tokens = compiled.sample_compiled(model, prompt_ids, prompt_mask, config)
            else:
                out = model.generate(
                    input_ids=prompt_ids,
                    attention_mask=prompt_mask.long(),
                    generation_config=config,
                    synced_gpus=synced_gpus,
                )
                # Decoder-only output repeats the prompt; encoder-decoder output starts with the decoder start token.
                new_tokens = out[:, 1:] if is_encoder_decoder(model) else out[:, prompt_ids.shape[1]:]
        new_tokens = new_tokens.clone()
    finally:
        model.train(was_training)
    if new_tokens.shape[1] == 0:  # max_new_tokens reached zero length: keep one EOS so shapes stay valid
        new_tokens = torch.full_like(prompt_ids[:, :1], eos_token_id)
    mask = response_mask(new_tokens, eos_token_id)
    return new_tokens.masked_fill(~mask, pad_token_id), mask


def _compiled_loop_applies(model: PreTrainedModel, config: GenerationConfig, synced_gpus: bool) -> bool:
    reason = compiled.unsupported_reason(model, config, synced_gpus)
    if reason is not None:
        compiled.log_fallback(reason)
    return reason is None
