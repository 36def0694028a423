"""Sampling targets: masks, padding, modes, agreement with a naive greedy loop; scoring for both model kinds."""

import pytest
import torch

from kdlab.data.datamodule import pad
from kdlab.models.scoring import score_targets
from kdlab.sampling.base import SamplingSettings, response_mask
from kdlab.sampling.hf import generate_targets
from tests.conftest import tiny_model

GREEDY = SamplingSettings(max_new_tokens=8, do_sample=False)


def test_response_mask_stops_after_first_eos():
    eos = 2
    tokens = torch.tensor([[5, 6, 2, 7, 2], [5, 5, 5, 5, 5], [2, 9, 9, 9, 9]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(response_mask(tokens, eos), expected)


def _prompts(tokenizer, texts):
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return pad(ids, tokenizer.pad_token_id, "left")


def _naive_greedy(model, prompt: list[int], steps: int, eos: int) -> list[int]:
    """Greedy decoding one example at a time, without a KV cache or padding: the reference."""
    ids = list(prompt)
    out = []
    for _ in range(steps):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        token = int(logits.argmax())
        out.append(token)
        if token == eos:
            break
        ids.append(token)
    return out


def test_batched_greedy_generation_matches_naive_loop(tokenizer):
    model = tiny_model(tokenizer, seed=1)
    texts = ["Question: Ann has 3 pens.\nAnswer:", "Question: 12 + 7?\nAnswer:"]
    prompt_ids, prompt_mask = _prompts(tokenizer, texts)
    ids, mask = generate_targets(model, prompt_ids, prompt_mask, GREEDY,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    for row, text in enumerate(texts):
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        expected = _naive_greedy(model.eval(), prompt, GREEDY.max_new_tokens, tokenizer.eos_token_id)
        assert ids[row][mask[row]].tolist() == expected
        assert (ids[row][~mask[row]] == tokenizer.pad_token_id).all()


def test_sampling_restores_mode_and_uses_eval_mode(tokenizer):
    # T5 has dropout: in train mode two greedy passes would differ; generation must switch to eval and back.
    model = tiny_model(tokenizer, architecture="t5", seed=2)
    model.config.dropout_rate = 0.5
    prompt_ids, prompt_mask = _prompts(tokenizer, ["Question: 5 * 6?\nAnswer:"] * 3)
    model.train()
    first, _ = generate_targets(model, prompt_ids, prompt_mask, GREEDY, pad_token_id=0, eos_token_id=2)
    assert model.training
    model.eval()
    second, _ = generate_targets(model, prompt_ids, prompt_mask, GREEDY, pad_token_id=0, eos_token_id=2)
    assert not model.training
    assert torch.equal(first, second)


def test_samples_carry_no_gradient(tokenizer):
    model = tiny_model(tokenizer)
    prompt_ids, prompt_mask = _prompts(tokenizer, ["Question: 1 + 1?\nAnswer:"])
    ids, mask = generate_targets(model, prompt_ids, prompt_mask, SamplingSettings(max_new_tokens=5, do_sample=True),
                                 pad_token_id=0, eos_token_id=2)
    assert not ids.requires_grad and ids.dtype == torch.long and mask.dtype == torch.bool


def test_samples_can_be_scored_with_a_gradient_right_after_sampling(tokenizer):
    # sampling runs under inference_mode; its tokens must still be usable by a training forward, which saves them
    model = tiny_model(tokenizer)
    prompt_ids, prompt_mask = _prompts(tokenizer, ["Question: 1 + 1?\nAnswer:", "Question: 12 * 3?\nAnswer:"])
    ids, mask = generate_targets(model, prompt_ids, prompt_mask, SamplingSettings(max_new_tokens=5, do_sample=True),
                                 pad_token_id=0, eos_token_id=2)
    assert not ids.is_inference() and not mask.is_inference()
    logits = score_targets(model, prompt_ids, prompt_mask, ids, mask)
    logits.logsumexp(-1)[mask].sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # the same tokens again, in place: they are ordinary tensors (an inference tensor would refuse this)
    ids.add_(0)


def test_seeded_sampling_is_reproducible(tokenizer):
    model = tiny_model(tokenizer)
    prompt_ids, prompt_mask = _prompts(tokenizer, ["Question: 4 - 1?\nAnswer:"] * 4)
    settings = SamplingSettings(max_new_tokens=10, temperature=1.5, top_k=50, top_p=0.95, do_sample=True)
    runs = []
    for _ in range(2):
        torch.manual_seed(11)
        runs.append(generate_targets(model, prompt_ids, prompt_mask, settings, pad_token_id=0, eos_token_id=2)[0])
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("architecture", ["llama", "t5"])
def test_score_targets_aligns_logits_with_targets_and_ignores_padding(tokenizer, architecture):
    model = tiny_model(tokenizer, architecture=architecture, seed=3).eval()
    prompts = tokenizer(["Question: Bo has 41 cards.\nAnswer:", "Q: 9?\nA:"], add_special_tokens=False)["input_ids"]
    targets = tokenizer([" 41 + 2 = 43", " 9"], add_special_tokens=False)["input_ids"]
    prompt_ids, prompt_mask = pad(prompts, 0, "left")
    target_ids, target_mask = pad(targets, 0, "right")
    batched = score_targets(model, prompt_ids, prompt_mask, target_ids, target_mask)
    assert batched.shape == (2, target_ids.shape[1], len(tokenizer))
    for row in range(2):
        p, t = torch.tensor([prompts[row]]), torch.tensor([targets[row]])
        if architecture == "llama":  # reference: one unpadded sequence, logits at the positions before each target
            full = model(input_ids=torch.cat([p, t], dim=1)).logits[0]
            reference = full[p.shape[1] - 1 : p.shape[1] - 1 + t.shape[1]]
        else:  # reference: HF's own label shifting
            reference = model(input_ids=p, labels=t).logits[0]
        torch.testing.assert_close(batched[row, : t.shape[1]], reference, atol=1e-5, rtol=1e-5)


def test_unknown_model_dtype_is_named(tokenizer):
    from kdlab.models.loading import load_model

    choices = r"\['bfloat16', 'float16', 'float32', 'float64'\]"
    with pytest.raises(ValueError, match=r"dtype='float8'; choose one of " + choices):
        load_model({"name": "tiny", "architecture": "llama", "dtype": "float8", "config": {}}, tokenizer)
