"""The one sampler interface: a batch's prompts in, token ids and a response mask out, whatever engine draws them.

    class Sampler(Protocol):
        def sample(self, prompt_ids, prompt_mask, settings, seed, lockstep=False) -> (ids, mask)
        def sync(self, model) -> None      # after every optimizer step: the engine reads the model's new weights

`HFSampler` (kdlab.sampling.hf) draws with Hugging Face `generate`, or the compiled static-cache loop
(`settings.compile`), with the sampling layers (kdlab.sampling.layers) on CPU; it reads the model itself, so `sync`
has nothing to do. Samples come back right-padded, masked after each row's first EOS (included), so a sample is
scored exactly as a reference target is. Draws are a function of `seed` (the step's: kdlab.step.resilience.step_seed),
so a resumed run repeats them; `lockstep` keeps sharded ranks stepping together until all have finished.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor, nn
from transformers import GenerationConfig

# `policy.sampling` keys that pick and size the engine (kdlab.run.build.build_sampler), not how a sample is drawn
ENGINE_KEYS = ("engine", "vllm")


@dataclass(frozen=True)
class SamplingSettings:
    """How targets are generated: sampling for on-policy and teacher data (`policy.sampling`), greedy or beam search
    for evaluation (`task.generation`). The length and the mode come from those config nodes; the rest default to
    the neutral values (no warping, one beam, plain `generate`)."""

    max_new_tokens: int
    do_sample: bool
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_beams: int = 1
    # Sample through kdlab.sampling.compiled's static-cache loop (same tokens as generate, less time per token; the
    # first batch of each shape pays a compilation). Falls back to generate where that loop does not apply.
    compile: bool = False

    def generation_config(self, pad_token_id: int, eos_token_id: int) -> GenerationConfig:
        kwargs = dict(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample, num_beams=self.num_beams,
                      use_cache=True, pad_token_id=pad_token_id, eos_token_id=eos_token_id)
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return GenerationConfig(**kwargs)


class Sampler(Protocol):
    """See the module doc."""

    def sample(self, prompt_ids: Tensor, prompt_mask: Tensor, settings: SamplingSettings, seed: int | None = None,
               lockstep: bool = False) -> tuple[Tensor, Tensor]: ...

    def sync(self, model: nn.Module) -> None: ...


def response_mask(tokens: Tensor, eos_token_id: int) -> Tensor:
    """True up to and including each row's first EOS (the whole row when it has none)."""
    is_eos = tokens == eos_token_id
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    return ~after_eos
