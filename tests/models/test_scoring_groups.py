"""Scoring in groups of rows of similar length: the split reads the fewest positions, and every row gets the logits
and gradients it gets from one padded batch."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from kdlab.data.datamodule import pad
from kdlab.models.loading import load_model
from kdlab.models.scoring import length_groups, score_targets
from tests.conftest import tiny_model


def positions(groups, prompts, targets) -> int:
    return sum(len(g) * (max(prompts[r] for r in g) + max(targets[r] for r in g)) for g in groups)


def brute_force(prompts, targets, k) -> int:
    """Fewest positions over every split of the target-sorted rows into exactly k runs."""
    order = sorted(range(len(targets)), key=lambda r: (targets[r], prompts[r]))
    best = None
    for cuts in itertools.combinations(range(1, len(order)), k - 1):
        bounds = [0, *cuts, len(order)]
        cost = positions([order[a:b] for a, b in zip(bounds, bounds[1:])], prompts, targets)
        best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_groups_are_the_cheapest_split_and_each_extra_group_pays(seed):
    rng = random.Random(seed)
    n = rng.randint(3, 9)
    prompts = [rng.randint(5, 80) for _ in range(n)]
    targets = [rng.randint(1, 128) for _ in range(n)]
    groups = length_groups(prompts, targets, max_groups=4, gain=0.05)
    assert sorted(r for g in groups for r in g) == list(range(n))
    best = {k: brute_force(prompts, targets, k) for k in range(1, min(4, n) + 1)}
    chosen = len(groups)
    assert positions(groups, prompts, targets) == best[chosen]
    # the rule: a group count is taken when it saves 5% on the best count before it
    expected, cost = 1, best[1]
    for k in range(2, min(4, n) + 1):
        if best[k] < cost * 0.95:
            expected, cost = k, best[k]
    assert chosen == expected


def test_equal_lengths_stay_one_group_and_large_batches_are_split_in_blocks():
    assert length_groups([10] * 8, [20] * 8, max_groups=4) == [list(range(8))]
    assert length_groups([10, 12], [5, 90], max_groups=1) == [[0, 1]]
    rng = random.Random(0)
    prompts = [rng.randint(5, 80) for _ in range(300)]
    targets = [rng.randint(1, 128) for _ in range(300)]
    groups = length_groups(prompts, targets, max_groups=4)
    assert sorted(r for g in groups for r in g) == list(range(300)) and len(groups) > 1
    assert positions(groups, prompts, targets) < 0.8 * positions([list(range(300))], prompts, targets)


QUESTIONS = ["Question: Bo has 41 cards.\nAnswer:", "Q: 9?\nA:", "Question: Mia has 12 apples and 7 pears. Sum?\nA:",
             "Q: 3 + 4?\nA:", "Question: Leo reads 7 pages a day for 6 days. Pages?\nAnswer:"]
ANSWERS = [" 41 + 2 = 43", " 9", " 12 + 7 = 19 and that is the number of fruits she has in all", " 7",
           " 7 * 6 = 42, so 42 pages in all; the answer is 42"]


def batch(tokenizer):
    prompts = tokenizer(QUESTIONS, add_special_tokens=False)["input_ids"]
    targets = tokenizer(ANSWERS, add_special_tokens=False)["input_ids"]
    return (*pad(prompts, tokenizer.pad_token_id, "left"), *pad(targets, tokenizer.pad_token_id, "right"))


FAMILIES = {
    "llama": None,
    "opt": dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32,
                max_position_embeddings=256),
    "bloom": dict(hidden_size=32, n_layer=2, n_head=4),
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=256),
}


@pytest.mark.parametrize("architecture", sorted(FAMILIES))
def test_grouped_scoring_gives_each_row_its_logits_and_gradients(tokenizer, architecture):
    if FAMILIES[architecture] is None:
        model = tiny_model(tokenizer, seed=4)
    else:
        torch.manual_seed(4)
        model = load_model({"name": architecture, "architecture": architecture, "config": FAMILIES[architecture]},
                           tokenizer)
    model.eval()  # no dropout: both passes must see the same network
    prompt_ids, prompt_mask, target_ids, target_mask = batch(tokenizer)
    lengths = (prompt_mask.sum(1).tolist(), target_mask.sum(1).tolist())
    assert len(length_groups(*lengths, max_groups=4)) > 1  # the batch really is split
    results = []
    for groups in (1, 4):
        logits = score_targets(model, prompt_ids, prompt_mask, target_ids, target_mask, max_groups=groups)
        picked = torch.log_softmax(logits, -1).gather(-1, target_ids[..., None]).squeeze(-1)
        (picked * target_mask).sum().backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
        model.zero_grad()
    (one, one_grads), (grouped, grouped_grads) = results
    scored = target_mask.bool()
    torch.testing.assert_close(grouped[scored], one[scored], atol=2e-5, rtol=1e-5)
    assert grouped.shape == one.shape
    for rows in length_groups(*lengths, max_groups=4):  # past its group's longest target a row's logits are zeros
        width = max(lengths[1][r] for r in rows)
        assert torch.all(grouped[rows, width:] == 0)
    assert any(max(lengths[1][r] for r in rows) < target_ids.shape[1] for rows in length_groups(*lengths, 4))
    for a, b in zip(one_grads, grouped_grads):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-4)


def test_encoder_decoder_models_ignore_groups(tokenizer):
    model = tiny_model(tokenizer, architecture="t5", seed=1).eval()
    args = batch(tokenizer)
    torch.testing.assert_close(score_targets(model, *args, max_groups=4), score_targets(model, *args), rtol=0, atol=0)
