"""Sparse (top-k + tail) divergences: equal to the dense losses at k = V, to a float64 bucket reference at k < V."""

from __future__ import annotations

import math

import pytest
import torch

from kdlab.losses import divergences as dense
from kdlab.losses import sparse

# name -> (sparse fn, dense fn, params, float64 reference on probability buckets p, q)
DIVERGENCES = {
    "fkl": (sparse.sparse_forward_kl, dense.forward_kl, {}, lambda p, q: (p * (p.log() - q.log())).sum(-1)),
    "rkl": (sparse.sparse_reverse_kl, dense.reverse_kl, {}, lambda p, q: (q * (q.log() - p.log())).sum(-1)),
    "jsd": (sparse.sparse_generalized_jsd, dense.generalized_jsd, {"beta": 0.3},
            lambda p, q: 0.3 * (p * (p / (0.3 * p + 0.7 * q)).log()).sum(-1)
            + 0.7 * (q * (q / (0.3 * p + 0.7 * q)).log()).sum(-1)),
    "tvd": (sparse.sparse_total_variation, dense.total_variation, {}, lambda p, q: 0.5 * (p - q).abs().sum(-1)),
    "skl": (sparse.sparse_skew_forward_kl, dense.skew_forward_kl, {"alpha": 0.2},
            lambda p, q: (p * (p / (0.2 * p + 0.8 * q)).log()).sum(-1)),
    "srkl": (sparse.sparse_skew_reverse_kl, dense.skew_reverse_kl, {"alpha": 0.2},
             lambda p, q: (q * (q / (0.2 * q + 0.8 * p)).log()).sum(-1)),
}


def _logits(batch: int, positions: int, vocab: int, seed: int, scale: float = 2.0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, positions, vocab, generator=g) * scale
    teacher = torch.randn(batch, positions, vocab, generator=g) * scale
    mask = torch.rand(batch, positions, generator=g) > 0.3
    mask[0, 0] = True
    return student, teacher, mask


def _bucket_reference(name: str, student: torch.Tensor, teacher: torch.Tensor, k: int, mask: torch.Tensor,
                      reduction: str = "token_mean") -> torch.Tensor:
    """The bucket definition written out in float64: one-hot bucket matrix, full softmaxes, formula per row."""
    _, _, _, formula = DIVERGENCES[name]
    p_full = teacher.double().softmax(-1)
    q_full = student.double().softmax(-1)
    ids = p_full.topk(k, dim=-1).indices
    assign = torch.zeros(*p_full.shape, k + 1, dtype=torch.float64)
    assign[..., k] = 1.0  # every token in the tail bucket, except the top-k, each its own bucket (plain loops)
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            for j in range(k):
                assign[b, t, ids[b, t, j]] = 0.0
                assign[b, t, ids[b, t, j], j] = 1.0
    p = torch.einsum("btv,btvc->btc", p_full, assign)
    q = torch.einsum("btv,btvc->btc", q_full, assign)
    per_token = formula(p, q)
    m = mask.double()
    if reduction == "token_mean":
        return (per_token * m).sum() / m.sum()
    if reduction == "sum":
        return (per_token * m).sum()
    per_seq = m.sum(1)
    return ((per_token * m).sum(1)[per_seq > 0] / per_seq[per_seq > 0]).mean()


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_k_equal_vocab_is_the_dense_loss(name: str) -> None:
    sparse_fn, dense_fn, params, _ = DIVERGENCES[name]
    student, teacher, mask = _logits(2, 5, 40, seed=1)
    values, ids, tail = sparse.top_k_of_logits(teacher, 40)
    assert torch.isneginf(tail).all()
    got = sparse_fn(student, values, ids, tail, mask, **params)
    want = dense_fn(student, teacher, mask, **params)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got, want)
    # the tail computed from the top-k alone (as a server's client does) gives the same value
    assert torch.allclose(sparse_fn(student, values, ids, None, mask, **params), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean", "sum"])
@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_k_below_vocab_equals_float64_bucket_reference(name: str, reduction: str) -> None:
    sparse_fn, _, params, _ = DIVERGENCES[name]
    student, teacher, mask = _logits(2, 4, 24, seed=2)
    values, ids, tail = sparse.top_k_of_logits(teacher, 5)
    got = sparse_fn(student, values, ids, tail, mask, reduction=reduction, **params)
    want = _bucket_reference(name, student, teacher, 5, mask, reduction)
    assert abs(got.item() - want.item()) < 1e-5 * max(1.0, abs(want.item())), (got, want)


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_gradient_matches_autograd_of_the_reference(name: str) -> None:
    sparse_fn, _, params, _ = DIVERGENCES[name]
    student, teacher, mask = _logits(2, 3, 16, seed=3)
    mask[1, 1] = False
    student64 = student.double().requires_grad_(True)
    values, ids, tail = sparse.top_k_of_logits(teacher.double(), 4)
    sparse_fn(student64, values, ids, tail, mask, chunk_size=2, **params).backward()  # chunked + checkpointed
    reference_student = student.double().requires_grad_(True)
    _bucket_reference(name, reference_student, teacher, 4, mask).backward()
    assert torch.allclose(student64.grad, reference_student.grad, atol=1e-10), name
    assert student64.grad[~mask].abs().max() == 0.0  # unscored rows get no gradient


def test_chunking_and_dtype_do_not_change_the_value() -> None:
    student, teacher, mask = _logits(3, 7, 50, seed=4)
    values, ids, tail = sparse.top_k_of_logits(teacher, 6)
    whole = sparse.sparse_generalized_jsd(student, values, ids, tail, mask, chunk_size=4096)
    rows = sparse.sparse_generalized_jsd(student, values, ids, tail, mask, chunk_size=1)
    half = sparse.sparse_generalized_jsd(student.bfloat16(), values, ids, tail, mask)
    assert torch.allclose(whole, rows, atol=1e-6)
    assert half.dtype == torch.float32  # upcast inside: bf16 logits give a float32 loss
    want = sparse.sparse_generalized_jsd(student.bfloat16().float(), values, ids, tail, mask)
    assert torch.allclose(half, want, atol=1e-6)


def test_jsd_endpoints_are_forward_and_reverse_kl() -> None:
    student, teacher, mask = _logits(2, 4, 30, seed=5)
    topk = sparse.top_k_of_logits(teacher, 7)
    assert sparse.sparse_generalized_jsd(student, *topk, mask, beta=0.0) == sparse.sparse_forward_kl(
        student, *topk, mask)
    assert sparse.sparse_generalized_jsd(student, *topk, mask, beta=1.0) == sparse.sparse_reverse_kl(
        student, *topk, mask)


def test_empty_mask_gives_zero_with_a_gradient_path() -> None:
    student, teacher, _ = _logits(2, 3, 20, seed=6)
    student.requires_grad_(True)
    loss = sparse.sparse_forward_kl(student, *sparse.top_k_of_logits(teacher, 4), torch.zeros(2, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and student.grad.abs().max() == 0.0


def test_tail_log_mass_matches_the_exact_tail_and_is_empty_for_the_full_vocabulary() -> None:
    _, teacher, _ = _logits(2, 3, 64, seed=7)
    values, _, exact_tail = sparse.top_k_of_logits(teacher, 10)
    from_topk = sparse.tail_log_mass(values)
    assert torch.allclose(from_topk, exact_tail, atol=1e-5)
    want = torch.log1p(-teacher.double().softmax(-1).topk(10).values.sum(-1))
    assert torch.allclose(from_topk.double(), want, atol=1e-5)
    full = sparse.top_k_of_logits(teacher, 64)[0]
    assert torch.isneginf(sparse.tail_log_mass(full)).all()


def test_gap_to_the_dense_loss_shrinks_as_k_grows_and_never_exceeds_it() -> None:
    """Bucketing is a coarsening, so each divergence is at most the dense one (data processing inequality), and
    the gap closes as k grows. V = 512, peaked random teacher; the gaps are reported in docs/teacher_outside.md."""
    student, teacher, mask = _logits(4, 16, 512, seed=8, scale=3.0)
    for name, (sparse_fn, dense_fn, params, _) in DIVERGENCES.items():
        full = dense_fn(student, teacher, mask, **params).item()
        gaps = []
        for k in (8, 32, 128):
            value = sparse_fn(student, *sparse.top_k_of_logits(teacher, k), mask, **params).item()
            assert value <= full + 1e-6, (name, k, value, full)
            gaps.append(full - value)
        print(f"{name}: dense {full:.4f}, gap at k=8/32/128: " + " / ".join(f"{g:.4f}" for g in gaps))
        assert gaps[0] > gaps[1] > gaps[2] > 0, (name, gaps)


def test_bad_shapes_and_parameters_are_refused() -> None:
    student, teacher, _ = _logits(1, 2, 10, seed=9)
    values, ids, tail = sparse.top_k_of_logits(teacher, 3)
    with pytest.raises(ValueError, match="teacher_logprobs"):
        sparse.sparse_forward_kl(student, values[:, :1], ids, tail)
    with pytest.raises(ValueError, match="beta"):
        sparse.sparse_generalized_jsd(student, values, ids, tail, beta=1.5)
    with pytest.raises(ValueError, match="reduction"):
        sparse.sparse_forward_kl(student, values, ids, tail, reduction="mean")
    assert math.isfinite(sparse.sparse_forward_kl(student, values, ids, tail).item())
