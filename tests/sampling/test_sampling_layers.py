"""Sampling reads large CPU linear layers as W @ x.T (kdlab.sampling.layers): the same outputs as nn.Linear to float
rounding, only where it applies, restored afterwards, and both of kdlab's samplers still draw the same tokens."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM

from kdlab.sampling import compiled as decoding
from kdlab.sampling import layers as sampling_layers
from kdlab.sampling.base import SamplingSettings
from kdlab.sampling.hf import generate_targets
from kdlab.sampling.layers import FEW_ROWS, few_rows_linear, linears_for_sampling
from tests.conftest import REPO
from tests.sampling.test_decoding import QUESTIONS, prompts

STUDENT = REPO / "src/kdlab/assets/arith/student"


@pytest.mark.parametrize("rows", [1, 2, 4, FEW_ROWS, FEW_ROWS + 1])
@pytest.mark.parametrize("bias", [False, True])
def test_few_rows_linear_is_nn_linear(rows, bias):
    torch.manual_seed(rows)
    layer = nn.Linear(96, 1000, bias=bias)
    x = torch.randn(rows, 1, 96)  # (batch, positions, hidden): a decoding step's shape
    expected = layer(x)
    got = few_rows_linear(x, layer.weight, layer.bias)
    assert got.shape == expected.shape == (rows, 1, 1000) and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # float64: the summation order is all that differs
    x64, layer64 = x.double(), layer.double()
    torch.testing.assert_close(few_rows_linear(x64, layer64.weight, layer64.bias), layer64(x64), rtol=1e-12,
                               atol=1e-12)


def _patched(model) -> list[str]:
    return [name for name, module in model.named_modules() if "forward" in vars(module)]


def test_applies_only_to_large_plain_float32_cpu_linears_and_is_restored(monkeypatch):
    monkeypatch.setattr(sampling_layers, "MIN_THREADS", 1)
    model = AutoModelForCausalLM.from_pretrained(STUDENT)
    linears = [name for name, module in model.named_modules() if type(module) is nn.Linear]
    with linears_for_sampling(model) as changed:  # the shipped student's layers are too small to gain
        assert changed == 0 and not _patched(model)
    monkeypatch.setattr(sampling_layers, "MIN_ENTRIES", 0)
    head = model.get_output_embeddings()
    seen = []
    with pytest.raises(RuntimeError, match="inside"):
        with linears_for_sampling(model) as changed:
            seen.append((changed, sorted(_patched(model))))
            x = torch.randn(3, 1, head.in_features)
            torch.testing.assert_close(head(x), nn.functional.linear(x, head.weight), rtol=1e-5, atol=1e-6)
            raise RuntimeError("inside")
    assert seen == [(len(linears), sorted(linears))] and "lm_head" in linears  # every layer, the output layer too
    assert not _patched(model)  # restored on the way out of an error
    handle = head.register_forward_hook(lambda *a: None)  # a hook would be bypassed: that layer is left alone
    with linears_for_sampling(model) as changed:
        assert changed == len(linears) - 1 and "lm_head" not in _patched(model)
    handle.remove()
    model.to(torch.bfloat16)  # bfloat16: nn.Linear was as fast or faster there
    with linears_for_sampling(model) as changed:
        assert changed == 0


def test_both_samplers_draw_the_same_tokens_through_it(tokenizer, monkeypatch):
    """The compiled loop and generate read the patched layers alike: same tokens under one seed (the tiny shipped
    student's layers are let through by lowering the size floor)."""
    monkeypatch.setattr(sampling_layers, "MIN_ENTRIES", 0)
    monkeypatch.setattr(sampling_layers, "MIN_THREADS", 1)
    torch._dynamo.reset()
    counters.clear()
    decoding._compiled_step.cache_clear()
    model = AutoModelForCausalLM.from_pretrained(STUDENT)
    calls = []
    monkeypatch.setattr(sampling_layers, "_forward", lambda self, x: calls.append(x.shape) or few_rows_linear(
        x, self.weight, self.bias))
    prompt_ids, prompt_mask = prompts(tokenizer, QUESTIONS[:4])
    settings = SamplingSettings(max_new_tokens=24, do_sample=True)
    out = []
    for compile in (False, True):
        torch.manual_seed(11)
        out.append(generate_targets(model, prompt_ids, prompt_mask, dataclasses.replace(settings, compile=compile),
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    assert calls and any(shape[0] * shape[1] <= FEW_ROWS for shape in calls)  # read through the patched layers
    assert not _patched(model)


def test_sampling_again_reuses_the_compiled_step(tokenizer, monkeypatch):
    """Each sampling call patches the layers anew: the compiled step must not recompile for it (a training step
    samples every time, and torch._dynamo's recompile limit would send it back to eager)."""
    monkeypatch.setattr(sampling_layers, "MIN_ENTRIES", 0)
    torch._dynamo.reset()
    counters.clear()
    decoding._compiled_step.cache_clear()
    model = AutoModelForCausalLM.from_pretrained(STUDENT)
    prompt_ids, prompt_mask = prompts(tokenizer, QUESTIONS[:4])
    settings = SamplingSettings(max_new_tokens=16, compile=True, do_sample=True)
    out = []
    for _ in range(3):
        torch.manual_seed(11)
        out.append(generate_targets(model, prompt_ids, prompt_mask, settings, pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=tokenizer.eos_token_id)[0])
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])
    assert counters["stats"]["unique_graphs"] == 1


def test_one_thread_leaves_the_layers_as_they_are_and_draws_nn_linears_tokens(tokenizer, monkeypatch):
    """At one thread nn.Linear's own product was as fast or faster (MIN_THREADS): no layer is changed, and the tokens
    are those of `generate` on the plain model, bit for bit; at two threads the same layers are changed."""
    monkeypatch.setattr(sampling_layers, "MIN_ENTRIES", 0)
    model = AutoModelForCausalLM.from_pretrained(STUDENT)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with linears_for_sampling(model) as changed:
            assert changed > 0 and _patched(model)
        torch.set_num_threads(1)
        with linears_for_sampling(model) as changed:
            assert changed == 0 and not _patched(model)
        prompt_ids, prompt_mask = prompts(tokenizer, QUESTIONS[:4])
        settings = SamplingSettings(max_new_tokens=24, do_sample=True)
        torch.manual_seed(11)
        ids, mask = generate_targets(model, prompt_ids, prompt_mask, settings, pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=tokenizer.eos_token_id)
        torch.manual_seed(11)
        with torch.inference_mode():  # the plain model, no kdlab sampling code
            plain = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask.long(),
                                   generation_config=settings.generation_config(tokenizer.pad_token_id,
                                                                                tokenizer.eos_token_id))
        new = plain[:, prompt_ids.shape[1]:]
        assert torch.equal(ids[mask], new[:, :ids.shape[1]][mask])
    finally:
        torch.set_num_threads(threads)
