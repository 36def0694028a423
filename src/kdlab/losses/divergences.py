"""Token-level divergences between a student Q and a teacher P over the same vocabulary, each one record.

A `Divergence` holds what a divergence is: its config name (`loss=jsd`), its settings (beta) and their ranges, its
loss per row of log-probabilities, and where it has one, that loss with its closed-form gradient. Every form kdlab
computes is built from the record by the same code, as torchtune builds its chunked KD losses from one formula:

- the dense loss on logits (`forward_kl`, ..., here): chunked rows, the closed-form gradient when only the student
  needs one, else each chunk checkpointed;
- the top-k loss of a cached or remote teacher (kdlab.losses.sparse: the row loss over k + 1 buckets);
- the output layer and the loss fused (kdlab.losses.fused: the closed-form gradient, or autograd on one chunk).

Adding a divergence is one record here, registered (`register_divergence`), and a `conf/loss/<name>.yaml` that lists
`_divergence` in its defaults and names the dense form by `_target_`.

Every dense loss takes logits shaped (batch, positions, vocab) and an optional bool mask (batch, positions), True
where a response token is scored, and returns a scalar. The work is done in chunks of flattened rows, each upcast to
float32 on its own (float64 inputs stay float64), so neither the forward nor the backward pass ever holds a float32
copy of the full (batch, positions, vocab) tensor.

When only the student needs a gradient (the teacher is frozen: every training step), a divergence with a
closed-form gradient takes a fused path: one pass over the scored rows computes each chunk's loss and its gradient
together, writes the gradient into one buffer of the student's dtype and drops the chunk. Backward is then a
multiply, nothing is recomputed, the logits themselves are not kept for backward, and unscored rows (padding,
prompts) cost nothing. Where the teacher needs a gradient too, or for a divergence whose dense form keeps autograd
(`dense_closed_form=False`), each chunk is checkpointed instead (recomputed in backward). A chunk holds at most
`chunk_size` rows and at most `kdlab.losses.chunking.CHUNK_ELEMENTS` entries, so a 128k vocabulary does not make a
1024-row chunk 512 MB.

Temperature divides both logits before the softmax, as TRL's `generalized_jsd_loss`; there is no T^2 rescaling.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from kdlab.losses.chunking import (
    check_inputs,
    compute_dtype,
    reduce_over_chunks,
    row_weights,
    rows_per_chunk,
)
from kdlab.losses.rowwise import (
    LossAndGrad,
    autograd_loss_and_grad,
    dot,
    kl,
    log_mix,
    log_mix_no_grad,
    log_softmax,
)

# (log q, log p, **settings) -> per-row loss (rows,), differentiable by autograd
RowLoss = Callable[..., Tensor]
# (log q, log p, **settings) -> (per-row loss, d loss / d (student logits / temperature)), without autograd
RowLossAndGrad = Callable[..., tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class Setting:
    """A divergence's own setting (`loss.<name>`), its default and the closed range it must lie in."""

    name: str
    default: float
    low: float = 0.0
    high: float = 1.0

    @property
    def range(self) -> str:
        return f"[{self.low:g}, {self.high:g}]"

    def check(self, value: float) -> float:
        """`value`, or ValueError when it is outside the range."""
        if not self.low <= value <= self.high:
            raise ValueError(f"{self.name} must be in the range {self.range}, got {value}")
        return value

    def config_error(self, value: Any) -> str | None:
        """The start-up message for `loss.<name>=value` outside the range (kdlab.run.validate), or None."""
        if self.low <= float(value) <= self.high:
            return None
        return f"loss.{self.name}={value} is outside {self.range}; e.g. loss.{self.name}={self.default:g}"


def _never(settings: Mapping[str, float]) -> str | None:
    return None


@dataclass(frozen=True, eq=False)
class Divergence:
    """One divergence, from which its dense, top-k and fused forms are built.

    name: `loss=<name>`; function: the dense form's name (`forward_kl`; the top-k form is `sparse_<function>`);
    doc: the dense form's docstring (the formula in one line, the paper); row: the per-row loss of the student's and
    the teacher's log-probabilities at one temperature, (log q, log p, **settings) -> (rows,), what the dense chunked
    loss, the top-k bucket loss and references use; row_and_grad: the same loss with its gradient with respect to the
    student's logits (at temperature 1) in closed form, or None (the fused loss then runs autograd on each chunk);
    settings: its own settings, in the order the dense form takes them; same_as: the divergence some settings make
    it exactly (jsd at beta 0 is fkl), by name, or None: every form then computes that one, so the endpoints are
    exact in value and gradient; dense_closed_form: whether the dense form uses row_and_grad when only the student
    needs a gradient (False keeps autograd through each checkpointed chunk there).
    """

    name: str
    function: str
    doc: str
    row: RowLoss
    row_and_grad: RowLossAndGrad | None = None
    settings: tuple[Setting, ...] = ()
    same_as: Callable[[Mapping[str, float]], str | None] = _never
    dense_closed_form: bool = True
    dense: Callable[..., Tensor] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dense", _dense_form(self))

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        """The dense form: `DIVERGENCES[name](student_logits, teacher_logits, mask, **settings)`."""
        return self.dense(*args, **kwargs)

    @property
    def top_k(self) -> Callable[..., Tensor]:
        """The top-k form (kdlab.losses.sparse): the row loss over the teacher's k + 1 buckets."""
        from kdlab.losses.sparse import top_k_form

        return top_k_form(self)

    def bind(self, settings: Mapping[str, Any]) -> tuple["Divergence", dict[str, float]]:
        """(the divergence that computes it, its settings): `settings` checked, defaults filled in, and the edge
        cases (`same_as`) resolved. An unknown setting is a TypeError, as an unexpected keyword argument."""
        unknown = set(settings) - {s.name for s in self.settings}
        if unknown:
            raise TypeError(f"{self.function}() got an unexpected keyword argument '{sorted(unknown)[0]}'")
        values = {s.name: s.check(settings.get(s.name, s.default)) for s in self.settings}
        other = self.same_as(values)
        return (self, values) if other is None else (divergence_named(other), {})

    def row_loss(self, settings: Mapping[str, float]) -> Callable[[Tensor, Tensor], Tensor]:
        """The per-row loss (log q, log p) -> (rows,) with `settings` (already bound) fixed."""
        return functools.partial(self.row, **settings) if settings else self.row

    def loss_and_grad(self, settings: Mapping[str, float]) -> LossAndGrad:
        """(log q, log p) -> (per-row loss, d loss / d student logits at temperature 1), `settings` (bound) fixed:
        the closed form, or autograd on the chunk when the record has none."""
        if self.row_and_grad is None:
            return autograd_loss_and_grad(self.row_loss(settings))
        return functools.partial(self.row_and_grad, **settings) if settings else self.row_and_grad


# ---------------------------------------------------------------- the dense form, built from a record


class _FusedDivergence(torch.autograd.Function):
    """Loss and its gradient with respect to the student logits in one chunked pass (the teacher gets none).

    Forward walks the scored rows only, `rows` at a time, and writes weight * d loss / d logits of each chunk into a
    buffer of the student's dtype; backward scales that buffer by the incoming gradient, in place, and hands it on.
    The buffer is given away on the first backward, so backward runs once per forward (as every training step does).
    """

    @staticmethod
    def forward(ctx, student_logits: Tensor, teacher_logits: Tensor, weights: Tensor, loss_and_grad: LossAndGrad,
                temperature: float, rows: int, dtype: torch.dtype) -> Tensor:
        vocab = student_logits.shape[-1]
        student_rows = student_logits.reshape(-1, vocab)
        teacher_rows = teacher_logits.reshape(-1, vocab)
        grad = torch.zeros_like(student_rows)
        scored = weights.nonzero().squeeze(1)  # one host sync per call; padding rows are then skipped entirely
        every_row = scored.numel() == weights.numel()
        total = torch.zeros((), dtype=dtype, device=student_logits.device)
        for start in range(0, scored.numel(), rows):
            index = slice(start, start + rows) if every_row else scored[start : start + rows]
            log_q = log_softmax(student_rows[index], dtype, temperature)
            log_p = log_softmax(teacher_rows[index], dtype, temperature)
            loss, dlogits = loss_and_grad(log_q, log_p)
            w = weights[index]
            total = total + (loss * w).sum()
            grad[index] = dlogits.mul_((w / temperature)[:, None]).to(grad.dtype)
        ctx.grad = grad.view_as(student_logits)
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("kdlab's fused divergence gradient was already used: backward runs once per forward "
                               "(for retain_graph, let the teacher logits require grad: the checkpointed path)")
        return grad.mul_(grad_output.to(grad.dtype)), None, None, None, None, None, None


def _divergence(divergence: Divergence, settings: Mapping[str, float], student_logits: Tensor,
                teacher_logits: Tensor, mask: Tensor | None, temperature: float, reduction: str,
                chunk_size: int) -> Tensor:
    """Validate, then reduce the divergence's row loss of (log q, log p) over chunks (log-probs at `temperature`, in
    float32 or wider): fused with its closed-form gradient when the student alone needs a gradient, else each chunk
    checkpointed."""
    check_inputs(student_logits, teacher_logits, mask, "teacher_logits", student_logits.shape)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = compute_dtype(student_logits, teacher_logits)
    fused = (divergence.row_and_grad is not None and divergence.dense_closed_form and torch.is_grad_enabled()
             and student_logits.requires_grad and not teacher_logits.requires_grad and student_logits.numel() > 0)
    if fused:
        batch, positions, vocab = student_logits.shape
        if mask is None:
            mask = torch.ones(batch, positions, dtype=torch.bool, device=student_logits.device)
        weights = row_weights(mask.bool(), reduction, dtype).reshape(-1)
        rows = rows_per_chunk(chunk_size, vocab, student_logits.device)
        return _FusedDivergence.apply(student_logits, teacher_logits.detach(), weights,
                                      divergence.loss_and_grad(settings), temperature, rows, dtype)
    row = divergence.row_loss(settings)

    def per_token(s: Tensor, t: Tensor) -> Tensor:
        return row(log_softmax(s, dtype, temperature), log_softmax(t, dtype, temperature))

    return reduce_over_chunks(per_token, student_logits, teacher_logits, mask, reduction, chunk_size)


def _parameter(name: str, default: Any = inspect.Parameter.empty, annotation: Any = "Tensor",
               kind: inspect._ParameterKind = inspect.Parameter.POSITIONAL_OR_KEYWORD) -> inspect.Parameter:
    return inspect.Parameter(name, kind, default=default, annotation=annotation)


def keyword_settings(divergence: Divergence, **common: Any) -> list[inspect.Parameter]:
    """The keyword-only parameters of a form of `divergence`: its settings, then `common` (name -> default)."""
    keyword = inspect.Parameter.KEYWORD_ONLY
    return ([_parameter(s.name, s.default, "float", keyword) for s in divergence.settings]
            + [_parameter(name, value, type(value).__name__, keyword) for name, value in common.items()])


def named_form(divergence: Divergence, name: str, doc: str, signature: inspect.Signature,
               compute: Callable[..., Tensor], module: str) -> Callable[..., Tensor]:
    """A plain function `name(...)` of `signature` (what Hydra, `inspect` and help() read) whose call binds its
    arguments, the divergence's settings and edge cases, then runs compute(divergence, settings, **other
    arguments)."""
    setting_names = [s.name for s in divergence.settings]

    def form(*args: Any, **kwargs: Any) -> Tensor:
        try:
            call = signature.bind(*args, **kwargs)
        except TypeError as err:
            raise TypeError(f"{name}() {err}") from None
        call.apply_defaults()
        arguments = dict(call.arguments)
        target, settings = divergence.bind({key: arguments.pop(key) for key in setting_names})
        return compute(target, settings, **arguments)

    form.__name__ = form.__qualname__ = name
    form.__module__ = module
    form.__doc__ = doc
    form.__signature__ = signature  # type: ignore[attr-defined]
    return form


def _dense_form(divergence: Divergence) -> Callable[..., Tensor]:
    signature = inspect.Signature(
        [_parameter("student_logits"), _parameter("teacher_logits"), _parameter("mask", None, "Tensor | None"),
         *keyword_settings(divergence, temperature=1.0, reduction="token_mean", chunk_size=1024)],
        return_annotation="Tensor")

    def compute(target: Divergence, settings: dict[str, float], *, student_logits: Tensor, teacher_logits: Tensor,
                mask: Tensor | None, temperature: float, reduction: str, chunk_size: int) -> Tensor:
        return _divergence(target, settings, student_logits, teacher_logits, mask, temperature, reduction,
                           chunk_size)

    return named_form(divergence, divergence.function, divergence.doc, signature, compute, __name__)


# ---------------------------------------------------------------- the registry


# The divergences by the names configs give them (`loss=jsd`); a config picks the dense form by `_target_`.
DIVERGENCES: dict[str, Divergence] = {}


def register_divergence(divergence: Divergence) -> Divergence:
    """Make `divergence` known by its name (`loss=<name>`): its top-k form, the fused step and config validation
    find it there. Returns it; a name already taken by another record is a ValueError."""
    known = DIVERGENCES.get(divergence.name)
    if known is not None and known is not divergence:
        raise ValueError(f"a divergence named {divergence.name!r} is already registered ({known.function})")
    DIVERGENCES[divergence.name] = divergence
    return divergence


def divergence_named(name: str) -> Divergence:
    """The registered divergence `name` (fkl, rkl, jsd, tvd, skl, srkl, or one registered since)."""
    try:
        return DIVERGENCES[name]
    except KeyError:
        raise ValueError(f"unknown divergence {name!r}; known: {', '.join(sorted(DIVERGENCES))}") from None


def get_divergence(name: str) -> Callable[..., Tensor]:
    """The divergence function named `name` (fkl, rkl, jsd, tvd, skl, srkl)."""
    return divergence_named(name).dense


# ---------------------------------------------------------------- the divergences
# Closed-form gradients run without autograd, in place on tensors that are dead after the line (rowwise's doc).


def _forward_kl_and_grad(log_q: Tensor, log_p: Tensor) -> tuple[Tensor, Tensor]:
    # d KL(P||Q) / d logits = q - p
    p = log_p.exp()
    loss = (log_p - log_q).masked_fill_(p == 0, 0.0).mul_(p).sum(dim=-1)
    return loss, log_q.exp_().sub_(p)


FORWARD_KL = register_divergence(Divergence(
    name="fkl",
    function="forward_kl",
    doc="""KL(P || Q) = sum_v p_v (log p_v - log q_v) per scored token (mode-covering; classic KD, Hinton et al. 2015).

    Logits (batch, positions, vocab), mask (batch, positions) bool. reduction: token_mean | sequence_mean | sum.
    Both logits are divided by `temperature` before the softmax; no T^2 rescaling.
    """,
    row=lambda log_q, log_p: kl(log_p, log_q),
    row_and_grad=_forward_kl_and_grad,
))
forward_kl = FORWARD_KL.dense


def _reverse_kl_and_grad(log_q: Tensor, log_p: Tensor) -> tuple[Tensor, Tensor]:
    # d KL(Q||P) / d q_v = log q_v - log p_v + 1; through the softmax: q * (diff - KL), the constant cancels
    q = log_q.exp()
    diff = (log_q - log_p).masked_fill_(q == 0, 0.0)
    loss = dot(q, diff)
    return loss, diff.sub_(loss[:, None]).mul_(q)


REVERSE_KL = register_divergence(Divergence(
    name="rkl",
    function="reverse_kl",
    doc="""KL(Q || P) = sum_v q_v (log q_v - log p_v) per scored token (mode-seeking; MiniLLM, Gu et al. ICLR 2024).

    Logits (batch, positions, vocab), mask (batch, positions) bool. reduction: token_mean | sequence_mean | sum.
    Both logits are divided by `temperature` before the softmax; no T^2 rescaling.
    """,
    row=lambda log_q, log_p: kl(log_q, log_p),
    row_and_grad=_reverse_kl_and_grad,
))
reverse_kl = REVERSE_KL.dense


def _jsd(log_q: Tensor, log_p: Tensor, *, beta: float) -> Tensor:
    lm = log_mix(log_p, log_q, beta)
    return beta * kl(log_p, lm) + (1.0 - beta) * kl(log_q, lm)


def _jsd_and_grad(log_q: Tensor, log_p: Tensor, *, beta: float) -> tuple[Tensor, Tensor]:
    # d JSD / d q_v = (1 - beta) log(q_v / m_v): the p/m and q/m terms of both KLs cancel exactly; through the
    # softmax, q * (g - <q, g>). No gradient flows through log m here, so entries where both models are -inf need no
    # detour (their -inf - -inf is masked with p == 0 and q == 0). 0 < beta < 1: the endpoints are fkl and rkl.
    lm = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    p = log_p.exp()
    kl_p = (log_p - lm).masked_fill_(p == 0, 0.0).mul_(p).sum(dim=-1)
    del p
    q = log_q.exp()
    diff = (log_q - lm).masked_fill_(q == 0, 0.0)
    loss = beta * kl_p + (1.0 - beta) * dot(q, diff)
    g = diff.mul_(1.0 - beta)
    return loss, g.sub_(dot(q, g)[:, None]).mul_(q)


GENERALIZED_JSD = register_divergence(Divergence(
    name="jsd",
    function="generalized_jsd",
    doc="""JSD(beta) = beta KL(P || M) + (1-beta) KL(Q || M), M = beta P + (1-beta) Q (GKD, Agarwal et al. ICLR 2024).

    log M = logsumexp(log P + log beta, log Q + log(1-beta)). The formula itself tends to 0 at both ends, so the
    endpoints follow TRL's GKDTrainer instead: beta == 0 returns forward_kl and beta == 1 returns reverse_kl,
    exactly. beta outside [0, 1] raises ValueError. Logits (batch, positions, vocab), mask (batch, positions) bool;
    reduction: token_mean | sequence_mean | sum. Both logits are divided by `temperature`; no T^2 rescaling.
    """,
    row=_jsd,
    row_and_grad=_jsd_and_grad,
    settings=(Setting("beta", 0.5),),
    same_as=lambda s: {0.0: "fkl", 1.0: "rkl"}.get(s["beta"]),
))
generalized_jsd = GENERALIZED_JSD.dense


def _total_variation_and_grad(log_q: Tensor, log_p: Tensor) -> tuple[Tensor, Tensor]:
    # 0.5 sum |p - q|: d / d q_v = 0.5 sign(q_v - p_v) (0 at a tie, as autograd's abs); through the softmax
    # q (s - <q, s>)
    q = log_q.exp()
    delta = q - log_p.exp()
    loss = 0.5 * delta.abs().sum(dim=-1)
    s = delta.sign_().mul_(0.5)
    return loss, s.sub_(dot(q, s)[:, None]).mul_(q)


TOTAL_VARIATION = register_divergence(Divergence(
    name="tvd",
    function="total_variation",
    doc="""TVD(P, Q) = 0.5 sum_v |p_v - q_v| per scored token (as in GKD's divergence comparison).

    Logits (batch, positions, vocab), mask (batch, positions) bool. reduction: token_mean | sequence_mean | sum.
    Both logits are divided by `temperature` before the softmax; no T^2 rescaling.
    """,
    row=lambda log_q, log_p: 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=-1),
    row_and_grad=_total_variation_and_grad,
    # The dense tvd, skl and srkl keep autograd through checkpointed chunks, as they always have; their closed forms
    # serve the fused output-layer loss (kdlab.losses.fused).
    dense_closed_form=False,
))
total_variation = TOTAL_VARIATION.dense


def _skew_forward_kl_and_grad(log_q: Tensor, log_p: Tensor, *, alpha: float) -> tuple[Tensor, Tensor]:
    # KL(P || M), M = alpha P + (1-alpha) Q: d / d q_v = -(1-alpha) p_v / m_v; through the softmax
    # r - q <1, r> with r_v = q_v d/dq_v = -(1-alpha) q_v p_v / m_v
    lm = log_mix_no_grad(log_p, log_q, alpha)
    p = log_p.exp()
    loss = (log_p - lm).masked_fill_(p == 0, 0.0).mul_(p).sum(dim=-1)
    r = (log_q + log_p - lm).nan_to_num_(nan=-math.inf).exp_().mul_(-(1.0 - alpha))
    return loss, r.sub_(log_q.exp().mul_(r.sum(dim=-1, keepdim=True)))


SKEW_FORWARD_KL = register_divergence(Divergence(
    name="skl",
    function="skew_forward_kl",
    doc="""SKL(alpha) = KL(P || alpha P + (1-alpha) Q) per scored token (DistiLLM, Ko et al. ICML 2024).

    alpha == 0 is forward_kl; alpha in [0, 1] else ValueError. Logits (batch, positions, vocab), mask (batch,
    positions) bool; reduction: token_mean | sequence_mean | sum. Both logits divided by `temperature`; no T^2.
    """,
    row=lambda log_q, log_p, *, alpha: kl(log_p, log_mix(log_p, log_q, alpha)),
    row_and_grad=_skew_forward_kl_and_grad,
    settings=(Setting("alpha", 0.1),),
    same_as=lambda s: "fkl" if s["alpha"] == 0.0 else None,
    dense_closed_form=False,
))
skew_forward_kl = SKEW_FORWARD_KL.dense


def _skew_reverse_kl_and_grad(log_q: Tensor, log_p: Tensor, *, alpha: float) -> tuple[Tensor, Tensor]:
    # KL(Q || M), M = alpha Q + (1-alpha) P: d / d q_v = log(q_v / m_v) + 1 - alpha q_v / m_v; the constant cancels
    # through the softmax, which gives r - q <1, r> with r_v = q_v (log(q_v / m_v) - alpha q_v / m_v)
    lm = log_mix_no_grad(log_q, log_p, alpha)
    q = log_q.exp()
    diff = (log_q - lm).masked_fill_(q == 0, 0.0)
    loss = dot(q, diff)
    ratio = (log_q - lm).nan_to_num_(nan=-math.inf).exp_().mul_(alpha)
    r = diff.sub_(ratio).mul_(q)
    return loss, r.sub_(q.mul_(r.sum(dim=-1, keepdim=True)))


SKEW_REVERSE_KL = register_divergence(Divergence(
    name="srkl",
    function="skew_reverse_kl",
    doc="""SRKL(alpha) = KL(Q || (1-alpha) P + alpha Q) per scored token (DistiLLM, Ko et al. ICML 2024).

    alpha == 0 is reverse_kl; alpha in [0, 1] else ValueError. Logits (batch, positions, vocab), mask (batch,
    positions) bool; reduction: token_mean | sequence_mean | sum. Both logits divided by `temperature`; no T^2.
    """,
    row=lambda log_q, log_p, *, alpha: kl(log_q, log_mix(log_q, log_p, alpha)),
    row_and_grad=_skew_reverse_kl_and_grad,
    settings=(Setting("alpha", 0.1),),
    same_as=lambda s: "rkl" if s["alpha"] == 0.0 else None,
    dense_closed_form=False,
))
skew_reverse_kl = SKEW_REVERSE_KL.dense

# The built-in divergences' names (a teacher with another tokenizer needs a cross-tokenizer loss instead).
SAME_VOCAB_LOSSES = frozenset(DIVERGENCES)
