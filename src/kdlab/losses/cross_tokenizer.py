"""Losses between a teacher and a student whose tokenizers differ: MultiLevelOT and ULD.

Neither vocabulary ids nor positions correspond, so neither loss compares token t of one with token t of the other
through ids. Both compare *sorted* probability vectors (sorting forgets which token a probability belongs to, which
is what makes vocabularies of different sizes and orders comparable), and MultiLevelOT adds an optimal-transport
distance between the two sequences of distributions, which needs no position correspondence at all.

Shapes: `student_logits` (B, Ts, Vs) and `teacher_logits` (B, Tt, Vt), each aligned with its own response tokens;
`mask` (B, Ts) and `teacher_mask` (B, Tt) are true at response positions, which start at position 0 (targets
are right-padded). Either side may instead be `HiddenStates` (its last hidden states and output layer,
kdlab.losses.fused): its logits are then computed chunk by chunk and never exist whole, as in the training step with
`loss.fused` (kdlab.step.fused). Everything is computed in float32 whatever the input dtype (float64 inputs stay
float64, as in the other losses). Each function returns a dict of scalar components (means over the sequences of the
batch; MultiLevelOT's `variant="released_code"` returns the released code's batch-wide values instead); a sequence
with an empty response contributes zero, and a batch of empty responses gives zeros that still carry a gradient path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlab.losses.chunking import compute_dtype, rows_per_chunk
from kdlab.losses.fused import (
    HiddenStates,
    chain_row_std_scale_,
    fused_ranked_topk_probs_at,
    fused_universal_logit_distillation,
    row_std_scale,
    uld_row_loss,
)

Side = Tensor | HiddenStates  # a side's logits, or the hidden states and output layer that make them


def _valid_length_mask(student_mask: Tensor, teacher_mask: Tensor) -> Tensor:
    """(B, T) true at positions t < min(student response length, teacher response length): matched by index."""
    length = torch.minimum(student_mask.sum(-1), teacher_mask.sum(-1))
    width = min(student_mask.shape[1], teacher_mask.shape[1])
    return torch.arange(width, device=length.device)[None, :] < length[:, None]


def _masks(student_logits: Side, teacher_logits: Side, mask: Tensor | None,
           teacher_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Each side's response mask, as the other losses take one: every position when none is given; the teacher's is
    the student's when both sides have the same positions."""
    if mask is None:
        mask = torch.ones(student_logits.shape[:2], dtype=torch.bool, device=student_logits.device)
    if teacher_mask is None:
        same = teacher_logits.shape[1] == mask.shape[1]
        teacher_mask = mask if same else torch.ones(teacher_logits.shape[:2], dtype=torch.bool, device=mask.device)
    return mask.bool(), teacher_mask.bool()


def _mean_over_sequences(per_sequence: Tensor) -> Tensor:
    return per_sequence.mean() if per_sequence.numel() else per_sequence.sum()


def sequence_ranked_topk(probs: Tensor, mask: Tensor, k: int) -> Tensor:
    """(B, T, k): each sequence's probabilities on its own k most probable vocabulary entries overall, in order.

    The ranking is one per sequence (MultiLevelOT, sequence-level ranking): vocabulary entries are ordered by their
    column sums over the sequence's response positions, so that column i means "the i-th most used token of this
    sequence" at every position. Padding positions do not vote and come out as zeros.
    """
    probs = probs * mask[..., None]
    k = min(k, probs.shape[-1])
    order = probs.sum(dim=1).topk(k, dim=-1).indices  # (B, k), by descending column sum
    return probs.gather(-1, order[:, None, :].expand(-1, probs.shape[1], -1))


class _RankedTopK(torch.autograd.Function):
    """softmax(logits / T) ranked per sequence and cut to k columns, for one or more temperatures T, without a
    (B, T, V) float32 tensor.

    Forward walks rows in chunks: each chunk's log-normaliser and its masked probabilities' column sums per
    sequence, for every temperature; then each temperature's top-k columns per sequence, and their probabilities
    exp(logit / T - lse) gathered from the logits. Backward, chunk by chunk again, writes the sum over temperatures
    of d/d logits = (mask / T) (scatter(g * q~) - q * <g, q~>) into one buffer of the logits' dtype: several
    temperatures (MultiLevelOT's tau_SL and tau_SD) cost one gradient of the logits, not one each. The ranking
    itself carries no gradient (as with topk indices). `std_scaled` first divides each row of logits by its
    standard deviation over the vocabulary plus 1e-4 (the released code's `normalize`, kdlab.losses.fused
    `row_std_scale`), and backward chains through that row-dependent divisor.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, mask: Tensor, k: int, temperatures: tuple[float, ...], rows: int,
                per_batch: bool = False, std_scaled: bool = False) -> tuple[Tensor, ...]:
        batch, positions, vocab = logits.shape
        flat = logits.reshape(-1, vocab)
        dtype = compute_dtype(logits)
        weight = mask.reshape(-1).to(dtype)
        # row -> the group whose column sums rank it: its sequence, or the whole batch (the released code's ranking)
        groups = 1 if per_batch else batch
        owner = torch.arange(groups, device=logits.device).repeat_interleave(positions * (batch // groups))
        lse = torch.empty(len(temperatures), flat.shape[0], dtype=dtype, device=logits.device)
        column_sums = torch.zeros(len(temperatures), groups, vocab, dtype=dtype, device=logits.device)
        stats = torch.empty(3, flat.shape[0], dtype=dtype, device=logits.device) if std_scaled else None
        for start in range(0, flat.shape[0], rows):
            part = slice(start, start + rows)
            z = flat[part].to(dtype)
            if stats is not None:
                stats[:, part] = row_std_scale(z)
                z = z / stats[2, part, None]
            for i, temperature in enumerate(temperatures):
                x = z / temperature
                lse[i, part] = torch.logsumexp(x, dim=-1)
                column_sums[i].index_add_(0, owner[part], (x - lse[i, part, None]).exp_().mul_(weight[part, None]))
        index = column_sums.topk(k, dim=-1).indices[:, owner]  # (temperatures, B*T, k), by descending column sum
        tops = []
        for i, temperature in enumerate(temperatures):
            z = flat.gather(1, index[i]).to(dtype)
            if stats is not None:
                z = z / stats[2, :, None]
            tops.append((z / temperature - lse[i, :, None]).exp() * weight[:, None])
        ctx.save_for_backward(logits, weight, lse, index, stats, *tops)
        ctx.temperatures, ctx.rows = temperatures, rows
        return tuple(top.view(batch, positions, k) for top in tops)

    @staticmethod
    def backward(ctx, *grad_tops: Tensor):
        logits, weight, lse, index, stats, *tops = ctx.saved_tensors
        flat = logits.reshape(-1, logits.shape[-1])
        gqs = [g.reshape(top.shape).to(top.dtype) * top for g, top in zip(grad_tops, tops)]
        inners = [gq.sum(dim=-1) for gq in gqs]  # <g, q~> per row
        grad = torch.empty_like(flat)
        for start in range(0, flat.shape[0], ctx.rows):
            part = slice(start, start + ctx.rows)
            z = flat[part].to(lse.dtype)
            x = z if stats is None else z / stats[2, part, None]
            out = None
            for i, temperature in enumerate(ctx.temperatures):
                q = (x / temperature - lse[i, part, None]).exp_()
                term = q.mul_(-inners[i][part, None]).scatter_add_(1, index[i, part], gqs[i][part]).div_(temperature)
                out = term if out is None else out.add_(term)
            if stats is not None:
                out = chain_row_std_scale_(out, z, stats[:, part])
            grad[part] = out.mul_(weight[part, None]).to(grad.dtype)
        return grad.view_as(logits), None, None, None, None, None, None


def ranked_topk_probs(
    logits: Tensor, mask: Tensor, k: int, temperature: float = 1.0, per_batch: bool = False,
    std_scaled: bool = False,
) -> Tensor:
    """(B, T, k): `sequence_ranked_topk(softmax(logits / temperature), mask, k)`, computed from the logits in chunks.

    Equal to the two-step form to float32 rounding (ties in the ranking aside), but never holds a float32 copy of
    the (B, T, V) logits, in forward or backward: the memory of loss=ot is the logits' gradient and a chunk.
    `per_batch=True` ranks by column sums over the whole batch instead, and `std_scaled=True` divides each row of
    logits by its standard deviation over the vocabulary plus 1e-4 first (both as the authors' released code)."""
    return ranked_topk_probs_at(logits, mask, k, (temperature,), per_batch, std_scaled)[0]


def ranked_topk_probs_at(
    logits: Tensor, mask: Tensor, k: int, temperatures: tuple[float, ...], per_batch: bool = False,
    std_scaled: bool = False,
) -> tuple[Tensor, ...]:
    """`ranked_topk_probs` at each of `temperatures`, from one pass over the logits and with one gradient buffer."""
    k = min(k, logits.shape[-1])
    rows = rows_per_chunk(1 << 30, logits.shape[-1] * len(temperatures), logits.device)
    if not (torch.is_grad_enabled() and logits.requires_grad):
        with torch.no_grad():
            return _RankedTopK.forward(_NoCtx(), logits, mask.bool(), k, temperatures, rows, per_batch, std_scaled)
    return _RankedTopK.apply(logits, mask.bool(), k, temperatures, rows, per_batch, std_scaled)


class _NoCtx:
    """Stands in for autograd's ctx when no gradient is needed (the teacher): saving is a no-op."""

    def save_for_backward(self, *tensors: Tensor) -> None:
        pass


# Kernel-domain Sinkhorn is used while every entry of exp(-C / epsilon) stays far from float32 underflow: with costs
# in [0, c_max], the scalings stay below about exp(c_max / epsilon), 1e13 at this bound (MultiLevelOT's L1 costs of
# at most 2 at epsilon 0.1 give 20). Past it, the log domain.
KERNEL_MAX_EXPONENT = 30.0


def log_sinkhorn(cost: Tensor, row_mask: Tensor, col_mask: Tensor, epsilon: float, iterations: int) -> Tensor:
    """Entropic optimal-transport plans (B, n, m) between uniform marginals over the unmasked rows and columns.

    Sinkhorn's iterations (Cuturi 2013; Peyré and Cuturi 2019, Alg. 3.1 and its log form), batched, differentiable
    through the unrolled iterations; masked rows and columns get zero mass. When exp(-C/epsilon) could underflow
    (large costs or a small `epsilon`), the dual potentials are updated with logsumexp in the log domain. Otherwise
    the same iterates run in the kernel domain, u = a / (K v), v = b / (K^T u): two batched matrix-vector products
    per iteration instead of two logsumexps over (B, n, m), several times faster (docs/benchmarks.md).
    """
    cost = cost.to(compute_dtype(cost))
    if cost.numel() and cost.min() >= 0 and cost.max() <= KERNEL_MAX_EXPONENT * epsilon:
        return _kernel_sinkhorn(cost, row_mask, col_mask, epsilon, iterations)
    rows = row_mask.sum(-1, keepdim=True).clamp(min=1).to(cost.dtype)
    cols = col_mask.sum(-1, keepdim=True).clamp(min=1).to(cost.dtype)
    neg = torch.finfo(cost.dtype).min / 4  # a large finite negative instead of -inf: no inf - inf
    log_a = torch.where(row_mask, -rows.log(), neg)  # (B, n)
    log_b = torch.where(col_mask, -cols.log(), neg)  # (B, m)
    scaled = -cost / epsilon
    f = torch.zeros_like(log_a)
    # masked columns start without mass too (v = exp(g / epsilon) = 0): padding must not weigh on the first update
    g = torch.where(col_mask, 0.0, -1e4 * epsilon)
    for _ in range(iterations):
        f = epsilon * (log_a - torch.logsumexp(scaled + g[:, None, :] / epsilon, dim=2))
        g = epsilon * (log_b - torch.logsumexp(scaled + f[:, :, None] / epsilon, dim=1))
    log_plan = scaled + f[:, :, None] / epsilon + g[:, None, :] / epsilon
    pair = row_mask[:, :, None] & col_mask[:, None, :]
    return torch.where(pair, log_plan.exp(), torch.zeros_like(log_plan))


def _kernel_sinkhorn(cost: Tensor, row_mask: Tensor, col_mask: Tensor, epsilon: float, iterations: int) -> Tensor:
    """The log-domain iterates of `log_sinkhorn` as scalings: u = exp(f / epsilon), v = exp(g / epsilon)."""
    a = row_mask.to(cost.dtype) / row_mask.sum(-1, keepdim=True).clamp(min=1)  # (B, n), zero at masked rows
    b = col_mask.to(cost.dtype) / col_mask.sum(-1, keepdim=True).clamp(min=1)  # (B, m)
    plan = _KernelSinkhorn.apply(cost, a, b, epsilon, iterations)
    return torch.where(row_mask[:, :, None] & col_mask[:, None, :], plan, 0.0)


class _KernelSinkhorn(torch.autograd.Function):
    """Unrolled kernel-domain Sinkhorn with a hand-written backward through the same iterations.

    Autograd through the loop would add one (B, n, m) outer product per matrix-vector product to the kernel's
    gradient (40 for 20 iterations); here the backward runs on vectors and sums those rank-one terms in two batched
    matrix products of inner size `iterations`. Same gradient as autograd through the loop (tested against the log
    domain), a fraction of the time and one saved (B, n, m) tensor instead of one per iteration.
    """

    @staticmethod
    def forward(ctx, cost: Tensor, a: Tensor, b: Tensor, epsilon: float, iterations: int) -> Tensor:
        kernel = torch.exp(-cost / epsilon)  # (B, n, m), entries >= exp(-KERNEL_MAX_EXPONENT)
        tiny = torch.finfo(kernel.dtype).tiny  # an empty side (all masked) gives 0 / tiny = 0, not 0 / 0
        v = (b > 0).to(b.dtype)  # masked columns start without mass: padding must not weigh on the first update
        us, vs, row_sums, col_sums = [], [v], [], []
        for _ in range(iterations):
            s = torch.bmm(kernel, v[:, :, None]).squeeze(2)
            u = a / s.clamp(min=tiny)
            r = torch.bmm(u[:, None, :], kernel).squeeze(1)
            v = b / r.clamp(min=tiny)
            us.append(u)
            vs.append(v)
            row_sums.append(s)
            col_sums.append(r)
        u = us[-1] if us else torch.ones_like(a)
        ctx.save_for_backward(kernel, a, b, torch.stack(us, -1) if us else a[..., None], torch.stack(vs, -1),
                              torch.stack(row_sums, -1) if us else a[..., None],
                              torch.stack(col_sums, -1) if us else b[..., None])
        ctx.epsilon, ctx.iterations, ctx.tiny = epsilon, iterations, tiny
        return u[:, :, None] * kernel * v[:, None, :]

    @staticmethod
    def backward(ctx, grad_plan: Tensor):
        kernel, a, b, us, vs, row_sums, col_sums = ctx.saved_tensors
        tiny, iterations = ctx.tiny, ctx.iterations
        u_last = us[..., -1] if iterations else torch.ones_like(a)
        v_last = vs[..., -1]
        weighted = grad_plan * kernel  # (B, n, m)
        grad_kernel = grad_plan * (u_last[:, :, None] * v_last[:, None, :])
        grad_u = torch.bmm(weighted, v_last[:, :, None]).squeeze(2)  # d/du of u_i K_ij v_j
        grad_v = torch.bmm(u_last[:, None, :], weighted).squeeze(1)
        row_terms, col_terms = [], []  # rank-one pieces of the kernel's gradient: d/dK of K v and of K^T u
        for t in reversed(range(iterations)):
            u, v, s, r = us[..., t], vs[..., t + 1], row_sums[..., t], col_sums[..., t]
            grad_r = -grad_v * v / r.clamp(min=tiny) * (r > tiny)  # v = b / r
            grad_u = grad_u + torch.bmm(kernel, grad_r[:, :, None]).squeeze(2)  # r = K^T u
            grad_s = -grad_u * u / s.clamp(min=tiny) * (s > tiny)  # u = a / s
            grad_v = torch.bmm(grad_s[:, None, :], kernel).squeeze(1)  # s = K v_prev
            row_terms.append((u, grad_r))
            col_terms.append((grad_s, vs[..., t]))
            grad_u = torch.zeros_like(grad_u)  # the earlier u feeds only its own r
        if iterations:
            left = torch.stack([x for x, _ in row_terms] + [x for x, _ in col_terms], -1)  # (B, n, 2T)
            right = torch.stack([y for _, y in row_terms] + [y for _, y in col_terms], -1)  # (B, m, 2T)
            grad_kernel = grad_kernel + torch.bmm(left, right.transpose(1, 2))
        return grad_kernel * kernel / -ctx.epsilon, None, None, None, None


VARIANTS = ("paper", "released_code")
# The released code's Sinkhorn term is 0.001 times its sum over the sequences of the batch (`Sinkhorn_seq.forward`).
RELEASED_SINKHORN_SCALE = 1e-3


def multilevel_ot(
    student_logits: Side,
    teacher_logits: Side,
    mask: Tensor | None = None,
    teacher_mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    top_k: int = 50,
    sl_temperature: float = 1.0,
    sd_temperature: float = 2.0,
    sinkhorn_epsilon: float = 0.1,
    sinkhorn_iterations: int = 20,
    variant: str = "paper",
    components: tuple[str, ...] = ("had", "sl", "sd"),
) -> dict[str, Tensor]:
    """MultiLevelOT's distillation terms (Cui et al., AAAI 2025): {"had", "sl", "sd"}, each a scalar.

    With a temperature tau dividing the logits, t = softmax(teacher / tau) and s = softmax(student / tau), each
    ranked and truncated per sequence to its top_k (`sequence_ranked_topk`): t^k (B, Tt, k), s^k (B, Ts, k). For
    positions matched by index up to the shorter response (T = min(Tt, Ts) per sequence):
      had = 1/T sum_t sum_i |t^k_ti - s^k_ti|             at tau = `temperature`    (holistic absolute difference)
      sl  = -1/T sum_t sum_i t^k_ti log s^k_ti             at tau = `sl_temperature` (sequential logarithmic loss)
      sd  = <P, C>, C_ij = sum_l |t^k_l(i) - s^k_l(j)|      at tau = `sd_temperature` (Sinkhorn distance), P the
            entropic OT plan between uniform weights on teacher positions i and student positions j
    The teacher weights the log of the student in sl, so its gradient matches the student to the teacher. A term
    at another temperature ranks its own probabilities. log s^k is floored at float32's smallest normal number
    (only a column past a vocabulary smaller than top_k, zero-padded, reaches it).
    `variant="released_code"` computes what the authors' code computes instead (`_released_code_terms`), for
    comparisons with their numbers (docs/cross_tokenizer.md).
    The teacher side never carries a gradient. `components` names the terms to compute (ablations skip the rest).
    `mask` marks the student's response positions, `teacher_mask` the teacher's (default: see `_masks`). A side given
    as `HiddenStates` is ranked from its hidden states and output layer (`fused_ranked_topk_probs_at`: a first pass
    over chunks of rows for the column sums, a second for the top-k); everything after the ranking is the same.
    """
    student_mask, teacher_mask = _masks(student_logits, teacher_logits, mask, teacher_mask)
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is unknown; choose one of {VARIANTS}")
    if variant == "released_code":
        return _released_code_terms(student_logits, teacher_logits.detach(), student_mask, teacher_mask,
                                    temperature=temperature, top_k=top_k, sl_temperature=sl_temperature,
                                    sd_temperature=sd_temperature, sinkhorn_epsilon=sinkhorn_epsilon,
                                    sinkhorn_iterations=sinkhorn_iterations, components=components)
    wanted = {"had": temperature, "sl": sl_temperature, "sd": sd_temperature}
    pairs = _RankedPairs(student_logits, teacher_logits.detach(), student_mask, teacher_mask, top_k, False,
                         tuple(wanted[term] for term in components if term in wanted))
    matched = _valid_length_mask(student_mask, teacher_mask)  # (B, T)
    width, counts = matched.shape[1], matched.sum(-1).clamp(min=1)

    def position_mean(per_position: Tensor) -> Tensor:
        return _mean_over_sequences((per_position * matched).sum(-1) / counts)

    out: dict[str, Tensor] = {}
    if "had" in components:
        t_top, s_top = pairs(temperature)
        out["had"] = position_mean((t_top[:, :width] - s_top[:, :width]).abs().sum(-1))
    if "sl" in components:
        t_top, s_top = (x[:, :width] for x in pairs(sl_temperature))
        floor = torch.finfo(torch.float32).tiny
        out["sl"] = position_mean(-(t_top * s_top.clamp(min=floor).log()).sum(-1))
    if "sd" in components:
        t_sd, s_sd = pairs(sd_temperature)
        cost = torch.cdist(t_sd, s_sd, p=1)  # (B, Tt, Ts)
        plan = log_sinkhorn(cost, teacher_mask.bool(), student_mask.bool(), sinkhorn_epsilon, sinkhorn_iterations)
        out["sd"] = _mean_over_sequences((plan * cost).sum(dim=(1, 2)))
    return out


def _released_code_terms(student: Side, teacher: Side, student_mask: Tensor, teacher_mask: Tensor, *,
                         temperature: float, top_k: int, sl_temperature: float, sd_temperature: float,
                         sinkhorn_epsilon: float, sinkhorn_iterations: int,
                         components: tuple[str, ...]) -> dict[str, Tensor]:
    """The terms of the authors' `DistillationLoss` (2018cx/Multi-Level-OT, models/distillation_model.py, f=1),
    so that alpha * (had + beta sl + gamma sd) is its distillation loss with distil_factor alpha.

    Each row of logits is divided by its standard deviation over the vocabulary plus 1e-4, then softmax(. / tau);
    the response rows are right-padded with zero rows to n, the longest response of either side in the batch; the
    vocabulary is ranked once for the whole batch by column sums and cut to top_k: t^k, s^k (B, n, k). Then
      had = mean_b 1/T_b sum_{t < T_b} sum_i |t^k_ti - s^k_ti|, T_b the shorter response of sequence b
      sl  = -1/(B n) sum_{b, t < n} sum_i softmax(s^k_bt / tau_SL)_i log softmax(t^k_bt / tau_SL)_i   (zero rows too)
      sd  = 0.001 sum_b sum_ij P_bij C_bij, C_bij = ||softmax(t^k_bi / tau_SD) - softmax(s^k_bj / tau_SD)||_1 over
            all n x n rows, P_b from `sinkhorn_iterations` row-then-column normalisations of exp(-C_b / epsilon)
    The released code's plan has rows and columns each summing to 1 (its mass is n); those iterates are n times
    the uniform-marginal plan of `log_sinkhorn` with every row valid, which is what is computed here. sl, sd and the
    ranking depend on the whole batch and sd grows with the batch size, as in the released code.
    """
    pairs = _RankedPairs(student, teacher, student_mask, teacher_mask, top_k, True, (temperature,), std_scaled=True)
    t_top, s_top = pairs(temperature)
    student_lengths, teacher_lengths = student_mask.sum(-1), teacher_mask.sum(-1)
    batch = student_mask.shape[0]
    n = int(torch.maximum(student_lengths, teacher_lengths).max()) if batch else 0
    # responses start at row 0 and are zero past their lengths (ranked rows are masked), so cutting or zero-padding
    # to n rows gives the released code's padded window
    t_top, s_top = (F.pad(x[:, :n], (0, 0, 0, n - min(n, x.shape[1]))) for x in (t_top, s_top))
    out: dict[str, Tensor] = {}
    if "had" in components:
        lengths = torch.minimum(student_lengths, teacher_lengths)
        matched = torch.arange(n, device=lengths.device)[None, :] < lengths[:, None]
        per_row = (t_top - s_top).abs().sum(-1) * matched
        out["had"] = _mean_over_sequences(per_row.sum(-1) / lengths.clamp(min=1))
    if "sl" in components:
        log_t = torch.log_softmax(t_top / sl_temperature, dim=-1)
        per_row = -(torch.softmax(s_top / sl_temperature, dim=-1) * log_t).sum(-1)
        out["sl"] = per_row.mean() if per_row.numel() else per_row.sum()  # no rows: 0, with a gradient path
    if "sd" in components:
        t_sd, s_sd = torch.softmax(t_top / sd_temperature, dim=-1), torch.softmax(s_top / sd_temperature, dim=-1)
        cost = torch.cdist(t_sd, s_sd, p=1)  # (B, n, n): teacher rows, student rows
        every = torch.ones(batch, n, dtype=torch.bool, device=cost.device)
        plan = log_sinkhorn(cost, every, every, sinkhorn_epsilon, sinkhorn_iterations) * n
        out["sd"] = RELEASED_SINKHORN_SCALE * (plan * cost).sum()
    return out


class _RankedPairs:
    """(t^k, s^k) at each temperature the asked-for terms need, each side's ranked truncated probabilities from one
    pass over its logits (or its hidden states and output layer); the side with fewer than k columns (a vocabulary
    smaller than top_k) is zero-padded to the other."""

    def __init__(self, student_logits: Side, teacher_logits: Side, student_mask: Tensor, teacher_mask: Tensor,
                 top_k: int, per_batch: bool, temperatures: tuple[float, ...], std_scaled: bool = False):
        temperatures = tuple(dict.fromkeys(temperatures))  # distinct, in order
        sides = [_ranked(side, mask, top_k, temperatures, per_batch, std_scaled) if temperatures else ()
                 for side, mask in ((teacher_logits, teacher_mask), (student_logits, student_mask))]
        self.cache: dict[float, tuple[Tensor, Tensor]] = {}
        for temperature, t_top, s_top in zip(temperatures, *sides):
            k = max(t_top.shape[-1], s_top.shape[-1])
            self.cache[temperature] = F.pad(t_top, (0, k - t_top.shape[-1])), F.pad(s_top, (0, k - s_top.shape[-1]))

    def __call__(self, temperature: float) -> tuple[Tensor, Tensor]:
        return self.cache[temperature]


def _ranked(side: Side, mask: Tensor, k: int, temperatures: tuple[float, ...], per_batch: bool,
            std_scaled: bool) -> tuple[Tensor, ...]:
    if isinstance(side, HiddenStates):
        return fused_ranked_topk_probs_at(side.hidden, side.layer, mask, k, temperatures, per_batch,
                                          std_scaled=std_scaled)
    return ranked_topk_probs_at(side, mask, k, temperatures, per_batch, std_scaled)


def universal_logit_distillation(
    student_logits: Side,
    teacher_logits: Side,
    mask: Tensor | None = None,
    teacher_mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    components: tuple[str, ...] = ("uld",),
) -> dict[str, Tensor]:
    """ULD (Boizard et al., 2024): {"uld"}: 1/T sum_t sum_i |sort(p_t)_i - sort(q_t)_i|, T = the shorter response.

    Each position's full probability vector is sorted in descending order and the smaller vocabulary is zero-padded
    to the larger; positions are matched by index. The padded tail's |p_i - 0| terms are the larger side's own sorted
    tail, so they are summed directly instead of materialising the padding. `components` as for `multilevel_ot`:
    () computes nothing. `mask` marks the student's response positions, `teacher_mask` the teacher's. Both sides
    given as `HiddenStates`: the same loss from hidden states and output layers (`fused_universal_logit_distillation`).
    """
    if "uld" not in components:
        return {}
    student_mask, teacher_mask = _masks(student_logits, teacher_logits, mask, teacher_mask)
    hidden = [isinstance(side, HiddenStates) for side in (student_logits, teacher_logits)]
    if all(hidden):
        return fused_universal_logit_distillation(student_logits.hidden, student_logits.layer, teacher_logits.hidden,
                                                  teacher_logits.layer, student_mask, teacher_mask,
                                                  temperature=temperature)
    if any(hidden):
        raise TypeError("universal_logit_distillation takes both sides as logits or both as HiddenStates")
    matched = _valid_length_mask(student_mask, teacher_mask)
    width = matched.shape[1]
    dtype = compute_dtype(student_logits, teacher_logits)
    p, q = (torch.softmax(logits[:, :width].to(dtype) / temperature, dim=-1)
            for logits in (teacher_logits.detach(), student_logits))
    per_position = uld_row_loss(q, p)
    counts = matched.sum(-1).clamp(min=1)
    return {"uld": _mean_over_sequences((per_position * matched).sum(-1) / counts)}
