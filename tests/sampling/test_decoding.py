"""The compiled static-cache sampling loop draws exactly what `generate` draws, and hands back to `generate` where it
does not apply.

Equality is token for token under one seed: both consume the random stream the same way (one multinomial per
step), so any difference in logits, warpers, stopping or padding shows up as different tokens."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM

from kdlab.data.datamodule import pad
from kdlab.models.loading import load_model
from kdlab.sampling import compiled as decoding
from kdlab.sampling.base import SamplingSettings
from kdlab.sampling.hf import generate_targets
from tests.conftest import REPO, tiny_model

STUDENT = REPO / "src/kdlab/assets/arith/student"
QUESTIONS = [
    "Question: Mia has 12 apples. She buys 30 more. How many apples does Mia have now?\nAnswer:",
    "Question: There are 89 beads in Sofia's room. She gives 36 beads to Finn. How many beads are left?\nAnswer:",
    "Question: Leo reads 7 pages a day for 6 days. How many pages does he read?\nAnswer:",
    "Question: 45 birds sit on a wire. 19 fly away. How many birds are on the wire?\nAnswer:",
    "Question: Ana had 64 stickers and gave half to Ben. How many stickers does Ana have?\nAnswer:",
    "Question: 8 boxes hold 9 pens each. How many pens are there?\nAnswer:",
]


@pytest.fixture(autouse=True)
def fresh_compile_cache():
    """Each test counts its own compilations, and no test inherits another's recompile budget."""
    torch._dynamo.reset()
    counters.clear()
    decoding._compiled_step.cache_clear()
    yield


@pytest.fixture(scope="module")
def student():
    return AutoModelForCausalLM.from_pretrained(STUDENT)


def prompts(tokenizer, questions=QUESTIONS):
    ids = tokenizer(questions, add_special_tokens=False)["input_ids"]
    return pad(ids, tokenizer.pad_token_id, "left")


def both(model, tokenizer, prompt_ids, prompt_mask, settings: SamplingSettings, seed: int = 5):
    """(generate's (ids, mask), the compiled loop's (ids, mask)) under the same seed."""
    out = []
    for compile in (False, True):
        torch.manual_seed(seed)
        out.append(generate_targets(model, prompt_ids, prompt_mask, dataclasses.replace(settings, compile=compile),
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    return out


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


SETTINGS = {
    "sampling": SamplingSettings(max_new_tokens=96, do_sample=True),
    "greedy": SamplingSettings(max_new_tokens=96, do_sample=False),
    "warped": SamplingSettings(max_new_tokens=96, temperature=0.7, top_k=20, top_p=0.9, do_sample=True),
}


def test_compiled_loop_draws_what_generate_draws(student, tokenizer):
    prompt_ids, prompt_mask = prompts(tokenizer)
    for name, settings in SETTINGS.items():  # one cache length: the three share one compiled step
        (ids, mask), (cids, cmask) = both(student, tokenizer, prompt_ids, prompt_mask, settings)
        assert torch.equal(ids, cids) and torch.equal(mask, cmask), name
        lengths = mask.sum(1)
        assert (lengths < settings.max_new_tokens).any(), f"{name}: no row ended, so stopping was not exercised"
        if name == "sampling":  # rows end at different steps, and decoding stops when the last one has
            assert lengths.unique().numel() > 1 and ids.shape[1] < settings.max_new_tokens
    assert graphs() == 1


def test_weights_are_read_at_every_call_without_recompiling(student, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(STUDENT)
    prompt_ids, prompt_mask = prompts(tokenizer)
    settings = SETTINGS["sampling"]
    both(model, tokenizer, prompt_ids, prompt_mask, settings)
    compiled = graphs()
    with torch.no_grad():  # a large step: a graph with the old weights baked in would sample other tokens
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    (ids, mask), (cids, cmask) = both(model, tokenizer, prompt_ids, prompt_mask, settings)
    assert torch.equal(ids, cids) and torch.equal(mask, cmask)
    assert graphs() == compiled


def test_prompts_of_other_widths_reuse_the_compiled_step(student, tokenizer):
    settings = SamplingSettings(max_new_tokens=40, do_sample=True)
    for questions in (QUESTIONS[:4], [q[10:] for q in QUESTIONS[:4]]):  # widths differ, cache length bucket does not
        prompt_ids, prompt_mask = prompts(tokenizer, questions)
        (ids, mask), (cids, cmask) = both(student, tokenizer, prompt_ids, prompt_mask, settings)
        assert torch.equal(ids, cids) and torch.equal(mask, cmask)
    assert graphs() == 1


ARCHITECTURES = {  # learned positions with an offset (OPT), no positions at all (BLOOM, ALiBi), rotary (NeoX)
    "opt": dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32,
                max_position_embeddings=256),
    "bloom": dict(hidden_size=32, n_layer=2, n_head=4),
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=256),
}


@pytest.mark.slow
@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_other_decoder_families_decode_the_same(tokenizer, architecture):
    torch.manual_seed(0)
    model = load_model({"name": architecture, "architecture": architecture, "config": ARCHITECTURES[architecture]},
                       tokenizer)
    prompt_ids, prompt_mask = prompts(tokenizer, QUESTIONS[:3])
    for settings in (SamplingSettings(max_new_tokens=12, do_sample=True),
                     SamplingSettings(max_new_tokens=12, do_sample=False)):
        (ids, mask), (cids, cmask) = both(model, tokenizer, prompt_ids, prompt_mask, settings)
        assert torch.equal(ids, cids) and torch.equal(mask, cmask)


def test_what_the_loop_does_not_cover_goes_to_generate_with_the_reason(tokenizer, caplog):
    llama = tiny_model(tokenizer)
    penalised = tiny_model(tokenizer)
    penalised.generation_config.repetition_penalty = 1.3  # as a checkpoint's generation_config.json may set
    uncompilable = tiny_model(tokenizer)
    uncompilable._can_compile_fullgraph = False  # as Hugging Face marks models with graph breaks
    cases = [
        (tiny_model(tokenizer, architecture="t5"), SamplingSettings(max_new_tokens=6, do_sample=True), False,
         "encoder-decoder"),
        (llama, SamplingSettings(max_new_tokens=6, do_sample=False, num_beams=2), False, "beam search"),
        (llama, SamplingSettings(max_new_tokens=6, do_sample=True), True, "sharded"),
        (penalised, SamplingSettings(max_new_tokens=6, do_sample=True), False, "repetition_penalty"),
        (uncompilable, SamplingSettings(max_new_tokens=6, do_sample=True), False, "does not compile as one graph"),
    ]
    prompt_ids, prompt_mask = prompts(tokenizer, QUESTIONS[:2])
    decoding.log_fallback.cache_clear()
    for model, settings, synced, reason in cases:
        config = settings.generation_config(tokenizer.pad_token_id, tokenizer.eos_token_id)
        assert reason in decoding.unsupported_reason(model, config, synced)
        if synced:  # generate's synced_gpus needs a process group; the choice of path is what is tested here
            continue
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="kdlab.sampling.compiled"):
            (ids, mask), (cids, cmask) = both(model, tokenizer, prompt_ids, prompt_mask, settings)
        assert torch.equal(ids, cids) and torch.equal(mask, cmask)
        assert reason in caplog.text and "through generate" in caplog.text
    config = SamplingSettings(max_new_tokens=8, do_sample=True).generation_config(tokenizer.pad_token_id,
                                                                                 tokenizer.eos_token_id)
    assert decoding.unsupported_reason(llama, config, False) is None
    assert graphs() == 0  # nothing above compiled
