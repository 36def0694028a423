"""Cross-tokenizer losses (MultiLevelOT, ULD): Sinkhorn against POT and a naive loop, invariances, padding, fp16."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from kdlab.losses.cross_tokenizer import (
    log_sinkhorn,
    multilevel_ot,
    ranked_topk_probs,
    ranked_topk_probs_at,
    sequence_ranked_topk,
    universal_logit_distillation,
)
from kdlab.losses.objective import build_objective
from tests.conftest import loss_config


def logits(batch, length, vocab, seed, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(batch, length, vocab, generator=g)).to(dtype)


def lengths_mask(lengths, width):
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


# -- Sinkhorn ------------------------------------------------------------------------------------------------------
def test_sinkhorn_plan_has_the_uniform_marginals_of_the_valid_positions():
    cost = torch.rand(2, 5, 7, generator=torch.Generator().manual_seed(0))
    rows, cols = lengths_mask([5, 3], 5), lengths_mask([7, 4], 7)
    plan = log_sinkhorn(cost, rows, cols, epsilon=0.1, iterations=500)
    for b, (n, m) in enumerate([(5, 7), (3, 4)]):
        assert torch.allclose(plan[b].sum(1)[:n], torch.full((n,), 1 / n), atol=1e-5)
        assert torch.allclose(plan[b].sum(0)[:m], torch.full((m,), 1 / m), atol=1e-6)
        assert plan[b, n:].abs().sum() == 0 and plan[b, :, m:].abs().sum() == 0  # padding gets no mass
    short = log_sinkhorn(cost, rows, cols, epsilon=0.1, iterations=20)  # the last update fixes the columns exactly
    assert torch.allclose(short[0].sum(0), torch.full((7,), 1 / 7), atol=1e-6)


def naive_sinkhorn(cost: np.ndarray, epsilon: float, iterations: int) -> np.ndarray:
    """Kernel-domain Sinkhorn in float64, one pair at a time (Cuturi 2013): u = a / K v, v = b / K^T u."""
    n, m = cost.shape
    a, b = np.full(n, 1 / n), np.full(m, 1 / m)
    kernel = np.exp(-cost / epsilon)
    v = np.ones(m)
    for _ in range(iterations):
        u = a / (kernel @ v)
        v = b / (kernel.T @ u)
    return u[:, None] * kernel * v[None, :]


def test_sinkhorn_agrees_with_a_naive_loop_and_with_pot():
    import ot

    cost = torch.rand(3, 6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64).float() * 2
    rows, cols = lengths_mask([6, 4, 2], 6), lengths_mask([4, 4, 3], 4)
    plan = log_sinkhorn(cost, rows, cols, epsilon=0.1, iterations=20)
    for b, (n, m) in enumerate([(6, 4), (4, 4), (2, 3)]):
        c = cost[b, :n, :m].double().numpy()
        expected = naive_sinkhorn(c, 0.1, 20)
        assert np.allclose(plan[b, :n, :m].numpy(), expected, atol=1e-6)
        converged = log_sinkhorn(cost[b : b + 1], rows[b : b + 1], cols[b : b + 1], 0.1, 2000)[0, :n, :m]
        reference = ot.sinkhorn(np.full(n, 1 / n), np.full(m, 1 / m), c, reg=0.1, numItermax=100000, stopThr=1e-12)
        assert np.allclose(converged.numpy(), reference, atol=1e-6)


def test_kernel_domain_sinkhorn_equals_the_log_domain_in_plan_and_gradient(monkeypatch):
    import kdlab.losses.cross_tokenizer as ct

    # float64: both domains run the same iterates, so they agree to rounding (2e-16 in the plan and 2e-15 in the
    # gradient when measured, bounds 1e-13 and 1e-12); in float32 the plans came 1.6e-7 apart against a 1e-7 + 1e-5
    # relative bound, too close to hold on every CPU's kernels
    g = torch.Generator().manual_seed(3)
    cost = (2 * torch.rand(3, 6, 5, generator=g, dtype=torch.float64)).requires_grad_()
    rows, cols = lengths_mask([6, 3, 0], 6), lengths_mask([5, 2, 4], 5)  # the last pair has an empty side
    weights = torch.rand(3, 6, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def plan_and_grad():
        plan = log_sinkhorn(cost, rows, cols, epsilon=0.1, iterations=20)
        (grad,) = torch.autograd.grad((plan * weights).sum(), cost)
        return plan.detach(), grad

    kernel_plan, kernel_grad = plan_and_grad()  # costs <= 2 at epsilon 0.1: the kernel domain
    monkeypatch.setattr(ct, "KERNEL_MAX_EXPONENT", 0.0)  # forces the log domain
    log_plan, log_grad = plan_and_grad()
    assert kernel_plan.dtype == torch.float64
    assert torch.allclose(kernel_plan, log_plan, atol=1e-13, rtol=0)
    assert torch.allclose(kernel_grad[:2], log_grad[:2], atol=1e-12, rtol=0)
    # an empty side: no mass, and a finite (zero) gradient, where the log domain's is NaN
    assert kernel_plan[2].abs().sum() == 0 and kernel_grad[2].abs().sum() == 0 and torch.isfinite(kernel_grad).all()


def test_sinkhorn_has_no_nan_at_tiny_epsilon_where_the_kernel_underflows():
    cost = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(2)) * 5
    mask = torch.ones(1, 8, dtype=torch.bool)
    plan = log_sinkhorn(cost, mask, mask, epsilon=1e-3, iterations=20)  # exp(-C/eps) is 0 in float32 here
    assert torch.isfinite(plan).all() and torch.allclose(plan.sum(), torch.tensor(1.0), atol=1e-4)


# -- MultiLevelOT: references written from the paper's equations ---------------------------------------------------
def _ranked_truncated(logits_2d, tau, k, column_sums=None):
    """softmax(logits / tau) per position (float64), columns ordered by descending column sum (by default the
    sequence's own), the first k kept, zero-padded to k when the vocabulary is smaller."""
    probs = torch.softmax(logits_2d.double() / tau, -1)
    sums = probs.sum(0) if column_sums is None else column_sums
    order = sorted(range(probs.shape[1]), key=lambda j: -float(sums[j]))[:k]
    return torch.nn.functional.pad(probs[:, order], (0, max(0, k - len(order))))


def paper_multilevel_ot(s, t, s_len, t_len, k=50, tau=1.0, tau_sl=1.0, tau_sd=2.0, eps=0.1, iters=20):
    """Cui et al. (AAAI 2025) for one sequence pair, float64, loops: t = softmax_tau(teacher), s = softmax_tau(student),
    t^k, s^k ranked per sequence and truncated to k;
      L_HAD = 1/T sum_t sum_i |t^k_i - s^k_i|; L_SL = -1/T sum_t sum_i t^k_i log s^k_i (tau_SL);
      C_ij = sum_l |t^k_l(i) - s^k_l(j)| (tau_SD), L_SD = <P, C> with P the Sinkhorn plan after `iters` iterations."""
    k = min(k, max(s.shape[-1], t.shape[-1]))
    width = min(t_len, s_len)

    def both(temperature):
        return _ranked_truncated(t[:t_len], temperature, k), _ranked_truncated(s[:s_len], temperature, k)

    t_k, s_k = both(tau)
    had = sum(float(sum(abs(t_k[i, j] - s_k[i, j]) for j in range(k))) for i in range(width)) / max(width, 1)
    t_k, s_k = both(tau_sl)
    floor = torch.finfo(torch.float32).tiny  # the documented floor of log s^k: only zero-padded columns reach it
    sl = -sum(float(t_k[i, j] * math.log(max(s_k[i, j], floor))) for i in range(width) for j in range(k))
    sl /= max(width, 1)
    t_k, s_k = both(tau_sd)
    cost = np.array([[float(sum(abs(t_k[i, c] - s_k[j, c]) for c in range(k))) for j in range(s_len)]
                     for i in range(t_len)])
    sd = float((naive_sinkhorn(cost, eps, iters) * cost).sum())
    return {"had": had, "sl": sl, "sd": sd}


def released_code_reference(s, t, s_lens, t_lens, k=50, tau=1.0, tau_sl=1.0, tau_sd=2.0, eps=0.1, iters=10):
    """The authors' `DistillationLoss` (2018cx/Multi-Level-OT, models/distillation_model.py, commit 712cfb4, f=1),
    written from its formulas in float64 with loops; tensors, so that autograd gives its gradient.

    s, t: each side's logits at its response rows (row i predicts response token i), s_lens, t_lens: the response
    lengths (the released code's answer sizes). Its steps: `normalize` divides each row by its standard deviation
    over the vocabulary (Bessel-corrected) plus 1e-4; softmax(. / tau) of the response rows, right-padded with zero
    rows to n = the longest response of either side; `improved_sort` orders the vocabulary by its column sums over
    the whole batch and keeps k columns; the narrower side is zero-padded. Then
      had = mean over sequences of the L1 of each row, averaged over the shorter response's rows;
      sl  = `KL_wo(teacher, student)`: -sum softmax(s^k / tau_SL) log softmax(t^k / tau_SL), averaged over all
            B x n rows, zero rows included;
      sd  = `Sinkhorn_seq(teacher, student)`: per sequence, C_ij = L1(softmax(t^k_i / tau_SD), softmax(s^k_j /
            tau_SD)) over all n x n rows, K = exp(-C / eps), `iters` row then column normalisations, sum(P * C);
            0.001 times its sum over the sequences.
    The released code's loss is had + 0.1 sl + 0.1 sd, times distil_factor (1.5)."""
    batch, n = len(s_lens), max(max(s_lens), max(t_lens))

    def window(x, lengths):
        rows = torch.zeros(batch, n, x.shape[-1], dtype=torch.float64)
        for b in range(batch):
            for i in range(lengths[b]):
                z = x[b, i].double()
                sigma = (((z - z.mean()) ** 2).sum() / (len(z) - 1)).sqrt()
                rows[b, i] = torch.softmax(z / (sigma + 1e-4) / tau, -1)
        return rows

    def ranked(p):
        sums = p.detach().sum(dim=(0, 1))
        return p[:, :, sorted(range(p.shape[-1]), key=lambda j: -float(sums[j]))[:k]]

    t_k, s_k = ranked(window(t, t_lens)), ranked(window(s, s_lens))
    width = max(t_k.shape[-1], s_k.shape[-1])
    t_k, s_k = (torch.nn.functional.pad(x, (0, width - x.shape[-1])) for x in (t_k, s_k))
    had = sum(sum((s_k[b, i] - t_k[b, i]).abs().sum() for i in range(m)) / m
              for b, m in enumerate(map(min, s_lens, t_lens))) / batch
    sl = -sum((torch.softmax(s_k[b, i] / tau_sl, -1) * torch.log_softmax(t_k[b, i] / tau_sl, -1)).sum()
              for b in range(batch) for i in range(n)) / (batch * n)
    sd = 0.0
    for b in range(batch):
        p_t, p_s = torch.softmax(t_k[b] / tau_sd, -1), torch.softmax(s_k[b] / tau_sd, -1)
        cost = torch.stack([torch.stack([(p_t[i] - p_s[j]).abs().sum() for j in range(n)]) for i in range(n)])
        plan = torch.exp(-cost / eps)
        for _ in range(iters):
            plan = plan / plan.sum(1, keepdim=True)  # each teacher row sums to 1
            plan = plan / plan.sum(0, keepdim=True)  # each student column sums to 1
        sd = sd + 0.001 * (plan * cost).sum()
    return {"had": had, "sl": sl, "sd": sd}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("k", "vocabs"), [(50, (40, 60)), (5, (40, 60)), (20, (389, 746)), (20, (746, 389))])
def test_multilevel_ot_agrees_with_the_papers_equations(k, vocabs, dtype):
    s, t = logits(3, 7, vocabs[0], seed=3, dtype=dtype), logits(3, 9, vocabs[1], seed=4, dtype=dtype)
    s_len, t_len = [7, 5, 2], [9, 3, 6]  # padding on both sides, different lengths per side
    got = multilevel_ot(s, t, lengths_mask(s_len, 7), lengths_mask(t_len, 9), top_k=k)
    expected = [paper_multilevel_ot(s[b], t[b], s_len[b], t_len[b], k=k) for b in range(3)]
    for term in ("had", "sl", "sd"):
        assert got[term].item() == pytest.approx(np.mean([e[term] for e in expected]), rel=1e-5, abs=1e-6), term


def test_the_sequential_log_loss_depends_on_the_models_unlike_the_released_codes():
    # The released code's second softmax flattens probabilities in [0, 1] to almost uniform: about log k, whatever
    # the models say. The paper's L_SL follows the distributions (here: sharper logits, more mass in the top k).
    mask = torch.ones(4, 16, dtype=torch.bool)
    paper, released = [], []
    for scale in (1.0, 3.0):
        s, t = logits(4, 16, 500, seed=30, scale=scale), logits(4, 16, 700, seed=31, scale=scale)
        paper.append(multilevel_ot(s, t, mask, mask, top_k=20)["sl"].item())
        released.append(multilevel_ot(s, t, mask, mask, top_k=20, variant="released_code")["sl"].item())
    assert released == pytest.approx([math.log(20)] * 2, abs=0.01)
    assert paper[1] - paper[0] > 2.0, paper


RELEASED_CASES = {
    # student vocab, teacher vocab, student (width, lengths), teacher (width, lengths), settings
    "defaults": (40, 60, (7, [5, 3, 2]), (6, [4, 6, 3]), {}),
    "student_narrower_than_teacher_responses": (746, 389, (3, [3, 2]), (8, [6, 4]), dict(top_k=20)),
    "settings": (389, 120, (5, [5, 1, 4]), (9, [2, 7, 3]),
                 dict(top_k=5, temperature=1.5, sl_temperature=0.7, sd_temperature=3.0, sinkhorn_epsilon=0.2,
                      sinkhorn_iterations=4)),
}


@pytest.mark.parametrize("case", list(RELEASED_CASES))
def test_released_code_variant_equals_the_authors_formulas_in_value_and_gradient(case):
    """variant=released_code against `released_code_reference` (the authors' DistillationLoss written out), float64:
    responses of different lengths on each side, garbage in the padding rows, vocabularies of different sizes.
    The reference itself agreed with the authors' file run on the same logits to 2.2e-16 in value and 3e-18 in
    gradient (docs/cross_tokenizer.md); both sides here agree to about 1e-15."""
    s_vocab, t_vocab, (s_width, s_lens), (t_width, t_lens), settings = RELEASED_CASES[case]
    s = logits(len(s_lens), s_width, s_vocab, seed=50, dtype=torch.float64)
    t = logits(len(t_lens), t_width, t_vocab, seed=51, dtype=torch.float64)
    sm, tm = lengths_mask(s_lens, s_width), lengths_mask(t_lens, t_width)
    s = torch.where(sm[..., None], s, 50.0).requires_grad_(True)  # what the padding rows hold must not matter
    settings = {"top_k": 50, "sinkhorn_iterations": 10, **settings}
    got = multilevel_ot(s, t, sm, tm, variant="released_code", **settings)
    expected = released_code_reference(s, t, s_lens, t_lens, k=settings["top_k"],
                                       tau=settings.get("temperature", 1.0),
                                       tau_sl=settings.get("sl_temperature", 1.0),
                                       tau_sd=settings.get("sd_temperature", 2.0),
                                       eps=settings.get("sinkhorn_epsilon", 0.1), iters=settings["sinkhorn_iterations"])
    for term in ("had", "sl", "sd"):
        assert got[term].dtype == torch.float64
        assert got[term].item() == pytest.approx(expected[term].item(), rel=1e-10, abs=1e-12), term
        (ours,) = torch.autograd.grad(got[term], s, retain_graph=True)
        (theirs,) = torch.autograd.grad(expected[term], s, retain_graph=True)
        assert theirs.abs().max() > 0, term
        torch.testing.assert_close(ours, theirs, rtol=1e-8, atol=1e-12, msg=term)
    with pytest.raises(ValueError, match="variant"):
        multilevel_ot(s, t, sm, tm, variant="authors")


def test_released_code_terms_make_the_authors_total_through_the_objective():
    """loss=ot loss.variant=released_code's objective: CE + 1.5 (had + 0.1 sl + 0.1 sd), the released code's
    crossentropy + distil_factor x distillation loss, although its sl and sd are batch-wide (not means over
    sequences) and its ranking is one for the batch."""
    s, t = logits(3, 6, 30, seed=52, dtype=torch.float64), logits(3, 7, 45, seed=53, dtype=torch.float64)
    s_lens, t_lens = [6, 4, 2], [5, 7, 3]
    target = torch.randint(0, 30, (3, 6), generator=torch.Generator().manual_seed(54))
    sm, tm = lengths_mask(s_lens, 6), lengths_mask(t_lens, 7)
    total, _ = build_objective(loss_config("ot", variant="released_code"))(s, t, target, sm, tm)
    ref = released_code_reference(s, t, s_lens, t_lens)
    ce = torch.nn.functional.cross_entropy(s[sm], target[sm])
    assert total.item() == pytest.approx((ce + 1.5 * (ref["had"] + 0.1 * ref["sl"] + 0.1 * ref["sd"])).item(),
                                         rel=1e-10)


def _shared_order_logits(positions, vocab, seed):
    """Logits whose probabilities at every position decrease with the vocabulary index: the ranking is the
    identity for any mixture of two such distributions, so "moving towards the teacher" is well defined."""
    raw = torch.rand(positions, vocab, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (4 * raw).sort(-1, descending=True).values


def test_the_sequential_log_loss_falls_as_the_student_moves_towards_the_teacher():
    teacher = _shared_order_logits(6, 12, seed=40)[None]
    start = _shared_order_logits(6, 12, seed=41)[None]
    p, q0 = torch.softmax(teacher, -1), torch.softmax(start, -1)
    mask = torch.ones(1, 6, dtype=torch.bool)
    values = []
    for a in torch.linspace(0, 1, 6, dtype=torch.float64):
        student = ((1 - a) * q0 + a * p).log()  # the student's distribution a of the way to the teacher's
        values.append(multilevel_ot(student, teacher, mask, mask, top_k=12)["sl"].item())
    assert all(later < earlier for earlier, later in zip(values, values[1:])), values


def test_the_released_codes_sequential_log_loss_prefers_a_peaked_student_to_the_teacher():
    # Its reversed roles reward the student for piling mass on the teacher's largest entries; the paper's L_SL, a
    # cross-entropy of the student under the teacher, is least at the teacher itself.
    teacher = _shared_order_logits(6, 12, seed=40)[None]
    peaked = teacher.clone()
    peaked[..., 0] += 20.0  # nearly all mass on the teacher's most probable entry
    mask = torch.ones(1, 6, dtype=torch.bool)
    for variant, teacher_wins in (("paper", True), ("released_code", False)):
        same = multilevel_ot(teacher.clone(), teacher, mask, mask, top_k=12, variant=variant)["sl"].item()
        other = multilevel_ot(peaked, teacher, mask, mask, top_k=12, variant=variant)["sl"].item()
        assert (same < other) == teacher_wins, (variant, same, other)


def _normalised_distance(student, teacher, mask, k):
    s, t = ranked_topk_probs(student.detach(), mask, k), ranked_topk_probs(teacher, mask, k)
    return (s / s.sum(-1, keepdim=True) - t / t.sum(-1, keepdim=True)).abs().sum(-1).mean().item()


@pytest.mark.parametrize("variant", ["paper", "released_code"])
def test_gradient_descent_on_the_sequential_log_loss_matches_the_student_to_the_teacher(variant):
    # One position per sequence, so that the student can match the teacher's ranked top k exactly (up to the mass
    # the teacher has outside it: the minimiser of -sum t^k log s^k is s^k proportional to t^k).
    t = logits(6, 1, 30, seed=42)
    s = logits(6, 1, 24, seed=43).requires_grad_(True)
    mask = torch.ones(6, 1, dtype=torch.bool)
    before = _normalised_distance(s, t, mask, 10)
    optimizer = torch.optim.Adam([s], lr=0.1)
    for _ in range(300):
        optimizer.zero_grad()
        multilevel_ot(s, t, mask, mask, top_k=10, variant=variant, components=("sl",))["sl"].backward()
        optimizer.step()
    after = _normalised_distance(s, t, mask, 10)
    if variant == "paper":
        assert after < 0.01 * before, (before, after)
    else:  # the released code's L_SL stays within 0.01 of log k: its gradient leaves the student far from the teacher
        assert after > 0.5 * before, (before, after)  # measured: 0.72 before, between 0.72 and 0.91 along the way


def test_sequence_ranking_orders_columns_by_their_sum_over_response_positions():
    probs = torch.tensor([[[0.1, 0.6, 0.3], [0.5, 0.2, 0.3], [9.0, 0.0, 0.0]]])  # the last position is padding
    ranked = sequence_ranked_topk(probs, lengths_mask([2], 3), k=2)
    # column sums over the two response positions: 0.6, 0.8, 0.6 -> column 1 first, then a tie broken by topk
    assert torch.allclose(ranked[0, :2, 0], torch.tensor([0.6, 0.2]))
    assert ranked[0, 2].abs().sum() == 0


@pytest.mark.parametrize("chunk_elements", [2**22, 3 * 40])  # one chunk; 3 rows per chunk, across sequences
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_chunked_ranked_topk_equals_softmax_then_ranking(monkeypatch, chunk_elements, temperature):
    import kdlab.losses.chunking as chunking

    monkeypatch.setattr(chunking, "CHUNK_ELEMENTS", chunk_elements)  # in value and in gradient
    x = logits(3, 7, 40, seed=21)
    mask = lengths_mask([7, 4, 1], 7)
    weights = torch.randn(3, 7, 6, generator=torch.Generator().manual_seed(22))  # a random upstream gradient
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = ranked_topk_probs(a, mask, 6, temperature)
    expected = sequence_ranked_topk(torch.softmax(b / temperature, -1), mask, 6)
    assert torch.allclose(got, expected, atol=1e-7)
    (got * weights).sum().backward()
    (expected * weights).sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-7)
    assert a.grad[~mask].abs().max() == 0


@pytest.mark.parametrize("per_batch", [False, True])
def test_ranked_topk_at_several_temperatures_equals_each_alone_in_value_and_gradient(monkeypatch, per_batch):
    import kdlab.losses.chunking as chunking

    monkeypatch.setattr(chunking, "CHUNK_ELEMENTS", 3 * 40 * 2)  # 3 rows per chunk, across sequences
    x = logits(3, 7, 40, seed=24)
    mask = lengths_mask([7, 4, 1], 7)
    gen = torch.Generator().manual_seed(25)
    weights = [torch.randn(3, 7, 6, generator=gen) for _ in range(2)]
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    together = ranked_topk_probs_at(a, mask, 6, (1.0, 2.0), per_batch)
    alone = [ranked_topk_probs(b, mask, 6, tau, per_batch) for tau in (1.0, 2.0)]
    for got, expected in zip(together, alone):
        assert torch.equal(got, expected)
    sum((t * w).sum() for t, w in zip(together, weights)).backward()
    sum((t * w).sum() for t, w in zip(alone, weights)).backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-7)


def test_ranked_topk_keeps_no_vocab_wide_float32_tensor_for_backward():
    x = logits(2, 8, 64, seed=23, dtype=torch.bfloat16).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        top = ranked_topk_probs(x, lengths_mask([8, 5], 8), 4)
    vocab_wide = [t for t in saved if t.numel() >= x.numel()]
    assert len(vocab_wide) == 1 and vocab_wide[0].dtype == torch.bfloat16  # the input logits themselves, no copy
    top.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("side", ["student", "teacher"])
def test_ot_and_uld_are_invariant_to_a_permutation_of_either_vocabulary(side):
    s, t = logits(2, 6, 30, seed=5), logits(2, 8, 45, seed=6)
    sm, tm = lengths_mask([6, 4], 6), lengths_mask([8, 5], 8)
    perm = torch.randperm(30 if side == "student" else 45, generator=torch.Generator().manual_seed(7))
    s2, t2 = (s[..., perm], t) if side == "student" else (s, t[..., perm])
    for fn in (multilevel_ot, universal_logit_distillation):
        a, b = fn(s, t, sm, tm), fn(s2, t2, sm, tm)
        for term in a:
            assert a[term].item() == pytest.approx(b[term].item(), rel=1e-6, abs=1e-6), (fn.__name__, term)


def test_identical_inputs_give_zero_where_the_math_says_so():
    x = logits(2, 6, 30, seed=8)
    mask = lengths_mask([6, 3], 6)
    ot_terms = multilevel_ot(x, x.clone(), mask, mask)
    assert ot_terms["had"].item() == pytest.approx(0.0, abs=1e-7)
    assert universal_logit_distillation(x, x.clone(), mask, mask)["uld"].item() == pytest.approx(0.0, abs=1e-7)
    # SL is a cross-entropy (its minimum is the entropy, not 0) and SD an entropic OT cost, which is 0 only when
    # every position's distribution is the same: then the cost matrix itself is 0.
    assert ot_terms["sl"].item() > 0
    same = x[:, :1].expand(-1, 6, -1).contiguous()
    assert multilevel_ot(same, same.clone(), mask, mask)["sd"].item() == pytest.approx(0.0, abs=1e-7)


def test_padding_changes_nothing():
    s, t = logits(2, 5, 30, seed=9), logits(2, 7, 45, seed=10)
    sm, tm = lengths_mask([5, 3], 5), lengths_mask([7, 4], 7)
    s_pad = torch.cat([s, logits(2, 4, 30, seed=11, scale=50)], 1).requires_grad_(True)  # garbage in the padding
    t_pad = torch.cat([t, logits(2, 2, 45, seed=12, scale=50)], 1)
    sm_pad, tm_pad = torch.cat([sm, torch.zeros(2, 4, dtype=torch.bool)], 1), torch.cat(
        [tm, torch.zeros(2, 2, dtype=torch.bool)], 1)
    s = s.clone().requires_grad_(True)
    for fn in (multilevel_ot, universal_logit_distillation):
        a, b = fn(s, t, sm, tm), fn(s_pad, t_pad, sm_pad, tm_pad)
        for term in a:
            assert a[term].item() == pytest.approx(b[term].item(), rel=1e-6, abs=1e-8), (fn.__name__, term)
        (ga,) = torch.autograd.grad(sum(a.values()), s)
        (gb,) = torch.autograd.grad(sum(b.values()), s_pad)
        assert torch.allclose(ga, gb[:, :5], atol=1e-7) and gb[:, 5:].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_give_finite_losses_and_gradients(dtype):
    s = logits(2, 6, 300, seed=13, scale=30, dtype=dtype).requires_grad_(True)  # large logits: float16 would overflow
    t = logits(2, 9, 500, seed=14, scale=30, dtype=dtype)
    sm, tm = lengths_mask([6, 2], 6), lengths_mask([9, 4], 9)
    for fn in (multilevel_ot, universal_logit_distillation):
        terms = fn(s, t, sm, tm)
        assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in terms.values())
        (grad,) = torch.autograd.grad(sum(terms.values()), s)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_empty_responses_give_zero_with_a_gradient_path():
    s = logits(2, 4, 20, seed=15).requires_grad_(True)
    t = logits(2, 4, 25, seed=16)
    empty = torch.zeros(2, 4, dtype=torch.bool)
    released = functools.partial(multilevel_ot, variant="released_code")
    for fn in (multilevel_ot, released, universal_logit_distillation):
        total = sum(fn(s, t, empty, empty).values())
        assert total.item() == 0.0
        total.backward()


def test_the_teacher_gets_no_gradient():
    s = logits(1, 4, 20, seed=17).requires_grad_(True)
    t = logits(1, 5, 25, seed=18).requires_grad_(True)
    mask_s, mask_t = torch.ones(1, 4, dtype=torch.bool), torch.ones(1, 5, dtype=torch.bool)
    for fn in (multilevel_ot, universal_logit_distillation):
        sum(fn(s, t, mask_s, mask_t).values()).backward()
        assert t.grad is None and s.grad is not None


# -- ULD --------------------------------------------------------------------------------------------------------------
def test_uld_equals_the_zero_padded_sorted_l1_written_out():
    s, t = logits(2, 5, 30, seed=19), logits(2, 6, 45, seed=20)
    s_len, t_len = [5, 2], [6, 4]
    got = universal_logit_distillation(s, t, lengths_mask(s_len, 5), lengths_mask(t_len, 6))["uld"]
    per_sequence = []
    for b in range(2):
        width = min(s_len[b], t_len[b])
        p = torch.softmax(t[b, :width].double(), -1).sort(-1, descending=True).values
        q = torch.softmax(s[b, :width].double(), -1).sort(-1, descending=True).values
        q = torch.nn.functional.pad(q, (0, 45 - 30))  # zero-pad the smaller vocabulary
        per_sequence.append(float((p - q).abs().sum(-1).mean()))
    assert got.item() == pytest.approx(np.mean(per_sequence), rel=1e-6)


# -- the objective --------------------------------------------------------------------------------------------------
def test_ot_objective_weights_terms_as_the_paper_and_skips_switched_off_terms():
    s = logits(2, 5, 30, seed=21)
    t = logits(2, 6, 45, seed=22)
    target = torch.randint(0, 30, (2, 5), generator=torch.Generator().manual_seed(23))
    sm, tm = lengths_mask([5, 3], 5), lengths_mask([6, 4], 6)
    cfg = loss_config("ot", ce_weight=1.0, alpha=0.15, had_weight=1.0, beta=0.1, gamma=0.1)
    total, parts = build_objective(cfg)(s, t, target, sm, tm)
    expected = parts["ce"] + 0.15 * (parts["had"] + 0.1 * parts["sl"] + 0.1 * parts["sd"])
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    _, ablated = build_objective({**cfg, "gamma": 0.0})(s, t, target, sm, tm)
    assert set(ablated) == {"ce", "had", "sl"}
    _, uld = build_objective(loss_config("uld", ce_weight=0.5, uld_weight=2.0))(s, t, target, sm, tm)
    assert set(uld) == {"ce", "uld"}


def test_the_ce_term_is_left_out_on_the_students_own_samples():
    s, t = logits(1, 4, 30, seed=24), logits(1, 4, 30, seed=25)
    target = torch.randint(0, 30, (1, 4), generator=torch.Generator().manual_seed(26))
    mask = torch.ones(1, 4, dtype=torch.bool)
    for name in ("ot", "uld", "fkl"):
        objective = build_objective(loss_config(name, ce_weight=1.0))
        with_labels, parts = objective(s, t, target, mask, mask)
        without, own_samples = objective(s, t, target, mask, mask, hard_labels=False)
        assert "ce" in parts and "ce" not in own_samples
        assert with_labels.item() == pytest.approx(without.item() + parts["ce"].item(), rel=1e-6)


def test_cross_tokenizer_losses_take_the_calling_convention_of_the_others():
    s, t = logits(2, 4, 30, seed=31), logits(2, 4, 45, seed=32)
    mask = lengths_mask([4, 2], 4)
    for fn in (multilevel_ot, universal_logit_distillation):
        explicit = fn(s, t, mask, teacher_mask=mask)
        default = fn(s, t, mask)  # the teacher's mask is the student's when both have the same positions
        assert explicit.keys() == default.keys() and all(torch.equal(explicit[k], default[k]) for k in explicit)
        ones = torch.ones(2, 4, dtype=torch.bool)
        unmasked, scored_everywhere = fn(s, t), fn(s, t, ones, teacher_mask=ones)  # no mask: every position
        assert all(torch.equal(unmasked[k], scored_everywhere[k]) for k in unmasked)
        assert not torch.equal(unmasked[next(iter(unmasked))], explicit[next(iter(explicit))])
    assert universal_logit_distillation(s, t, mask, components=()) == {}
    assert set(multilevel_ot(s, t, mask, components=("sl",))) == {"sl"}
