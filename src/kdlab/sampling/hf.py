"""Batched sampling from the student or the teacher, returned as right-padded targets with a response mask.

Sampling runs without gradient, in eval mode (no dropout: the paper's on-policy samples come from the model as it
would be used), with the KV cache on, from left-padded prompts, and leaves the model's train/eval mode as it found it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import GenerationConfig, PreTrainedModel

from kdlab.models.scoring import is_encoder_decoder
from kdlab.sampling import compiled
from kdlab.sampling.layers import linears_for_sampling


@dataclass(frozen=True)
class SamplingSettings:
    """How targets are generated: sampling for on-policy/teacher data, greedy or beam search for evaluation."""

    max_new_tokens: int = 128
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_beams: int = 1
    # Sample through kdlab.sampling.compiled's compiled static-cache loop (same tokens as generate, less time per token; the
    # first batch of each shape pays a compilation). Falls back to generate where that loop does not apply.
    compile: bool = False

    def generation_config(self, pad_token_id: int, eos_token_id: int) -> GenerationConfig:
        kwargs = dict(
            max_new_tokens=self.max_new_tokens,
            do_sample=self.do_sample,
            num_beams=self.num_beams,
            use_cache=True,
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
        )
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return GenerationConfig(**kwargs)


def response_mask(tokens: Tensor, eos_token_id: int) -> Tensor:
    """True up to and including each row's first EOS (the whole row when it has none)."""
    is_eos = tokens == eos_token_id
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    return ~after_eos


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
