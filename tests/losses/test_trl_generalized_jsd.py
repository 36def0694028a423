"""kdlab's generalized JSD against TRL's own `GKDTrainer.generalized_jsd_loss` (trl/experimental/gkd), in float64.

The conventions map one to one, which is what this test pins down:
- beta: TRL mixes M = beta P + (1 - beta) Q (P the teacher: `teacher_log_probs + log(beta)`) and returns
  beta KL(P || M) + (1 - beta) KL(Q || M), kdlab's `generalized_jsd(beta=...)` with the same beta. Its endpoints are
  branches, not the formula's limit (which is 0): beta = 0 is KL(P || Q) (forward KL), beta = 1 is KL(Q || P)
  (reverse KL), and kdlab returns the same.
- temperature: both divide the student's and the teacher's logits by it before the softmax; neither multiplies by T^2.
- reduction: TRL's "batchmean" with labels divides by the number of labels != -100, kdlab's token_mean by the mask's
  count; TRL's `num_items_in_batch=N` (the gradient-accumulation form, trl#4719) is kdlab's reduction="sum" over N.
Without TRL installed (it is in the bench extra), the test is skipped."""

import pytest
import torch

from kdlab.losses import generalized_jsd

gkd = pytest.importorskip("trl.experimental.gkd")


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = 3 * torch.randn(3, 6, 40, generator=g, dtype=torch.float64)
    t = 3 * torch.randn(3, 6, 40, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 6, generator=g) < 0.6
    mask[0, 0] = True
    mask[2] = False  # a sequence with nothing scored
    labels = torch.where(mask, 1, -100)
    return s, t, mask, labels


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_generalized_jsd_equals_trls_gkd_loss_in_value_and_gradient(beta, temperature):
    s, t, mask, labels = inputs()
    ours_in = s.clone().requires_grad_()
    theirs_in = s.clone().requires_grad_()
    ours = generalized_jsd(ours_in, t, mask, beta=beta, temperature=temperature)
    theirs = gkd.GKDTrainer.generalized_jsd_loss(theirs_in, t, labels=labels, beta=beta, temperature=temperature)
    assert ours.dtype == theirs.dtype == torch.float64
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-12, abs=1e-12) and ours.item() > 0
    ours.backward()
    theirs.backward()
    assert torch.allclose(ours_in.grad, theirs_in.grad, rtol=0, atol=1e-12)


def test_trls_accumulation_normalisation_is_kdlabs_sum_over_the_global_count():
    s, t, mask, labels = inputs(seed=1)
    global_tokens = 3 * int(mask.sum())  # as if two more micro-batches of the same size were accumulated
    theirs = gkd.GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=0.5, num_items_in_batch=global_tokens)
    ours = generalized_jsd(s, t, mask, beta=0.5, reduction="sum") / global_tokens
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-12)


def test_beta_means_the_teachers_weight_in_both():
    """Not symmetric: swapping beta for 1 - beta changes the value (so the agreement above is not a coincidence of
    a symmetric formula)."""
    s, t, mask, labels = inputs(seed=2)
    theirs = gkd.GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=0.1)
    assert generalized_jsd(s, t, mask, beta=0.9).item() != pytest.approx(theirs.item(), rel=1e-3)
