"""The output layer and the loss as one operation: no (rows, vocabulary) logits tensor outlives a chunk of rows.

Both models hand over their last hidden states at the scored positions and their output layer (weight (V, H), an
optional bias (V,), an optional final-logit soft-cap c: logits = c tanh(z / c)). One pass over the scored rows, a
chunk at a time, computes the student's and the teacher's logits of the chunk, the per-row loss and its gradient
with respect to the student's logits in closed form, chains that through the soft-cap and the temperature, and
accumulates the gradients of the student's hidden states, output weight and bias; the chunk's logits are then
dropped. Backward only scales those gradients by the incoming one, so nothing is recomputed. The teacher gets no
gradient (it is frozen in every training step).

The values and gradients are those of today's path (logits = the model's head on the hidden states, then the
kdlab.losses function on the logits): same per-row formulas, same float32 (or float64) compute dtype, same row
weights for each reduction. The memory the loss needs on top of its inputs is one chunk of each side's logits and
its temporaries, plus the gradients themselves (hidden states (N, H), weight (V, H)), which any implementation needs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlab.losses.divergences import (
    LossAndGrad,
    _check_unit,
    _compute_dtype,
    _dot,
    _forward_kl_and_grad,
    _jsd_and_grad,
    _reverse_kl_and_grad,
    _row_weights,
)

log = logging.getLogger(__name__)

# At most this many (row, vocab) entries per chunk. Larger than the logit-level losses' budget: each chunk also runs
# a matmul that reads the whole output weight, so fewer, taller chunks read it fewer times (64 rows at V = 262,144).
FUSED_CHUNK_ELEMENTS = 2**24
FUSED_CHUNK_ELEMENTS_ACCELERATOR = 2**26
# config keys with which Hugging Face models rescale their logits after the output layer: not a plain linear map
_LOGIT_SCALES = ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier")


@dataclass(frozen=True)
class OutputLayer:
    """logits = softcap(hidden @ weight.T + bias)[..., :vocab], softcap(z) = c tanh(z / c) when `softcap` is c.

    weight (V_layer, H); bias (V_layer,) or None; vocab: the tokenizer's columns to keep (<= V_layer; None keeps all),
    so rows of an output layer padded beyond the tokenizer are never computed. A tied input/output embedding is the
    same Parameter as the input embedding, so its gradient from the loss adds to the embedding's."""

    weight: Tensor
    bias: Tensor | None = None
    softcap: float | None = None
    vocab: int | None = None

    @property
    def columns(self) -> int:
        """Number of logit columns the layer yields (the tokenizer's vocabulary)."""
        return self.weight.shape[0] if self.vocab is None else self.vocab

    def logits(self, hidden: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """The unfused logits (..., vocab) in `dtype` (default the weight's): today's path, and the tests' reference."""
        z = F.linear(hidden, self.weight[: self.columns], None if self.bias is None else self.bias[: self.columns])
        z = z.to(dtype or z.dtype)
        return z if self.softcap is None else torch.tanh(z / self.softcap) * self.softcap


def unfused_reason(model: nn.Module) -> str | None:
    """Why `model`'s output layer is not a plain linear map (None when it is): the fused loss would be wrong then."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return f"{type(model).__name__} has no output embeddings (get_output_embeddings() is None)"
    if type(head) is not nn.Linear:  # a LoRA-wrapped or quantized head computes more than weight @ hidden + bias
        return f"its output layer is {type(head).__module__}.{type(head).__name__}, not a plain torch.nn.Linear"
    if head._forward_hooks or head._forward_pre_hooks:
        return "its output layer has forward hooks, which the fused loss would bypass"
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in _LOGIT_SCALES:
        value = getattr(config, key, None)
        if value is not None and value != 1:
            return f"its config rescales the logits after the output layer ({key}={value})"
    if getattr(config, "model_type", "") in ("t5", "mt5", "umt5") and getattr(config, "tie_word_embeddings", False):
        return "T5 rescales its hidden states by d_model**-0.5 before a tied output layer"
    return None


def output_layer_of(model: nn.Module, vocab: int | None = None) -> OutputLayer | None:
    """The output layer of a Hugging Face causal LM (its `get_output_embeddings()` Linear and its config's
    `final_logit_softcapping`), or None, with one log line saying why, when it is not a plain linear map."""
    reason = unfused_reason(model)
    if reason is not None:
        log.info("fused output layer and loss off for %s: %s; using the logits path", type(model).__name__, reason)
        return None
    head = model.get_output_embeddings()
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    softcap = getattr(config, "final_logit_softcapping", None)
    if vocab is not None and not 0 < vocab <= head.weight.shape[0]:
        raise ValueError(f"vocab={vocab} must be in 1..{head.weight.shape[0]} (the output layer's rows)")
    return OutputLayer(head.weight, head.bias, float(softcap) if softcap else None, vocab)


def _skew_forward_kl_and_grad(alpha: float) -> LossAndGrad:
    def loss_and_grad(log_q: Tensor, log_p: Tensor) -> tuple[Tensor, Tensor]:
        # KL(P || M), M = alpha P + (1-alpha) Q: d / d q_v = -(1-alpha) p_v / m_v; through the softmax
        # r - q <1, r> with r_v = q_v d/dq_v = -(1-alpha) q_v p_v / m_v
        lm = _log_mix(log_p, log_q, alpha)
        p = log_p.exp()
        loss = (log_p - lm).masked_fill_(p == 0, 0.0).mul_(p).sum(dim=-1)
        r = (log_q + log_p - lm).nan_to_num_(nan=-math.inf).exp_().mul_(-(1.0 - alpha))
        return loss, r.sub_(log_q.exp().mul_(r.sum(dim=-1, keepdim=True)))

    return loss_and_grad


def _skew_reverse_kl_and_grad(alpha: float) -> LossAndGrad:
    def loss_and_grad(log_q: Tensor, log_p: Tensor) -> tuple[Tensor, Tensor]:
        # KL(Q || M), M = alpha Q + (1-alpha) P: d / d q_v = log(q_v / m_v) + 1 - alpha q_v / m_v; the constant
        # cancels through the softmax, which gives r - q <1, r> with r_v = q_v (log(q_v / m_v) - alpha q_v / m_v)
        lm = _log_mix(log_q, log_p, alpha)
        q = log_q.exp()
        diff = (log_q - lm).masked_fill_(q == 0, 0.0)
        loss = _dot(q, diff)
        ratio = (log_q - lm).nan_to_num_(nan=-math.inf).exp_().mul_(alpha)
        r = diff.sub_(ratio).mul_(q)
        return loss, r.sub_(q.mul_(r.sum(dim=-1, keepdim=True)))

    return loss_and_grad


def _total_variation_and_grad(log_q: Tensor, log_p: Tensor) -> tuple[Tensor, Tensor]:
    # 0.5 sum |p - q|: d / d q_v = 0.5 sign(q_v - p_v) (0 at a tie, as autograd's abs); through the softmax
    # q (s - <q, s>)
    q = log_q.exp()
    delta = q - log_p.exp()
    loss = 0.5 * delta.abs().sum(dim=-1)
    s = delta.sign_().mul_(0.5)
    return loss, s.sub_(_dot(q, s)[:, None]).mul_(q)


def _log_mix(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """log(w a + (1 - w) b) in log space, without autograd; the endpoints return an input exactly (as divergences')."""
    if w == 0.0:
        return log_b
    if w == 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def loss_and_grad_of(name: str, beta: float = 0.5, alpha: float = 0.1) -> LossAndGrad:
    """Per-row (loss, d loss / d student logits at temperature 1) of divergence `name`, as kdlab.losses defines it."""
    if name in ("jsd", "skl", "srkl"):
        _check_unit("beta" if name == "jsd" else "alpha", beta if name == "jsd" else alpha)
    if name == "fkl" or (name == "jsd" and beta == 0.0):
        return _forward_kl_and_grad
    if name == "rkl" or (name == "jsd" and beta == 1.0):
        return _reverse_kl_and_grad
    known = {"jsd": lambda: _jsd_and_grad(beta), "tvd": lambda: _total_variation_and_grad,
             "skl": lambda: _skew_forward_kl_and_grad(alpha), "srkl": lambda: _skew_reverse_kl_and_grad(alpha)}
    if name not in known:
        raise ValueError(f"unknown divergence {name!r} for the fused loss; known: fkl, jsd, rkl, skl, srkl, tvd")
    return known[name]()


# (indices of the chunk's rows, student logits of the chunk in the compute dtype) -> (per-row loss, d loss / d logits)
ChunkTarget = Callable[[Any, Tensor], tuple[Tensor, Tensor]]


def _layer_chunk(hidden: Tensor, layer: OutputLayer, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """(logits (rows, vocab) in `dtype`, d logits / d z or None): z = hidden @ W.T + b, then the soft-cap."""
    v = layer.columns
    z = F.linear(hidden, layer.weight[:v], None if layer.bias is None else layer.bias[:v]).to(dtype)
    if layer.softcap is None:
        return z, None
    t = z.div_(layer.softcap).tanh_()
    dcap = 1.0 - t * t  # d (c tanh(z / c)) / dz
    return t.mul_(layer.softcap), dcap


def _log_softmax_(logits: Tensor, temperature: float) -> Tensor:
    """log softmax(logits / T) over the last dim, in place: the chunk's logits are not needed after it."""
    if temperature != 1.0:
        logits.div_(temperature)
    return logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))


def _grad_buffer(t: Tensor | None, needed: bool) -> Tensor | None:
    # a half-precision weight's gradient is summed over chunks in float32, then rounded once
    if t is None or not needed:
        return None
    return torch.zeros(t.shape, dtype=torch.promote_types(t.dtype, torch.float32), device=t.device)


class _FusedOutputLoss(torch.autograd.Function):
    """sum_rows w_row loss_row over the student's output layer applied chunk by chunk; gradients built in forward.

    Forward keeps d(sum)/d(hidden, weight, bias) (shapes of the inputs: (N, H), (V, H), (V,)); backward multiplies
    them by the incoming gradient in place, so it runs once per forward (as in every training step)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, row_weights: Tensor, softcap: float | None,
                vocab: int | None, target: ChunkTarget, rows: int) -> Tensor:
        layer = OutputLayer(weight, bias, softcap, vocab)
        v, dtype = layer.columns, row_weights.dtype
        grad_h = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w, grad_b = _grad_buffer(weight, ctx.needs_input_grad[1]), _grad_buffer(bias, ctx.needs_input_grad[2])
        scored = row_weights.nonzero().squeeze(1)  # unscored rows (padding, prompts) cost nothing
        every_row = scored.numel() == row_weights.numel()
        total = torch.zeros((), dtype=dtype, device=hidden.device)
        for start in range(0, scored.numel(), rows):
            index = slice(start, start + rows) if every_row else scored[start: start + rows]
            h = hidden[index]
            logits, dcap = _layer_chunk(h, layer, dtype)
            loss, g = target(index, logits)  # consumes logits (in place)
            del logits
            w = row_weights[index]
            total += (loss * w).sum()
            g = g.mul_(w[:, None]) if dcap is None else g.mul_(w[:, None]).mul_(dcap)
            del dcap
            if grad_b is not None:
                grad_b[:v] += g.sum(dim=0)
            if grad_w is not None:  # in place: g.T @ h would be a (V, H) temporary per chunk
                g = g.to(grad_w.dtype)
                grad_w[:v].addmm_(g.T, h.to(grad_w.dtype))
            if grad_h is not None:
                grad_h[index] = (g.to(weight.dtype) @ weight[:v]).to(grad_h.dtype)
        # saved (not ctx attributes) so that saved_tensors_hooks see everything backward keeps
        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in (grad_h, grad_w, grad_b)))
        ctx.present = (grad_h is not None, grad_w is not None, grad_b is not None)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.used = False
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        if ctx.used:
            raise RuntimeError("kdlab's fused output-layer loss gradient was already used: backward runs once per "
                               "forward")
        ctx.used = True
        grads = [g.mul_(grad_output.to(g.dtype)).to(dtype) if present else None
                 for g, present, dtype in zip(ctx.saved_tensors, ctx.present, ctx.dtypes)]
        return (*grads, None, None, None, None, None)


def _rows(chunk_size: int | None, vocab: int, device: torch.device) -> int:
    budget = FUSED_CHUNK_ELEMENTS if device.type == "cpu" else FUSED_CHUNK_ELEMENTS_ACCELERATOR
    rows = max(1, budget // max(vocab, 1))
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        rows = chunk_size
    return rows


def _apply(hidden: Tensor, layer: OutputLayer, row_weights: Tensor, target: ChunkTarget,
           chunk_size: int | None) -> Tensor:
    if hidden.dim() != 2 or hidden.shape[1] != layer.weight.shape[1]:
        raise ValueError(f"hidden must be (rows, {layer.weight.shape[1]}) for an output weight of shape "
                         f"{tuple(layer.weight.shape)}, got {tuple(hidden.shape)}")
    if tuple(row_weights.shape) != (hidden.shape[0],):
        raise ValueError(f"row_weights must be ({hidden.shape[0]},), got {tuple(row_weights.shape)}")
    rows = _rows(chunk_size, layer.columns, hidden.device)
    return _FusedOutputLoss.apply(hidden, layer.weight, layer.bias, row_weights, layer.softcap, layer.vocab, target,
                                  rows)


def fused_divergence_sum(loss: str | LossAndGrad, student_hidden: Tensor, student_layer: OutputLayer,
                         teacher_hidden: Tensor, teacher_layer: OutputLayer, row_weights: Tensor, *,
                         temperature: float = 1.0, chunk_size: int | None = None, beta: float = 0.5,
                         alpha: float = 0.1) -> Tensor:
    """sum_n w_n D(P_n || Q_n) with Q = softmax(student_layer(h_s) / T), P = softmax(teacher_layer(h_t) / T).

    student_hidden (N, Hs), teacher_hidden (N, Ht): the same N scored rows; row_weights (N,) in the compute dtype
    (rows with weight 0 are skipped). loss: fkl | rkl | jsd (beta) | tvd | skl (alpha) | srkl (alpha) as in
    kdlab.losses, or a LossAndGrad (log q, log p) -> (per-row loss, gradient w.r.t. the student logits at T = 1).
    The core of `fused_divergence`, for callers that normalise once by a global count of units."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_layer.columns != teacher_layer.columns:
        raise ValueError(f"student vocab {student_layer.columns} != teacher vocab {teacher_layer.columns}: the "
                         "divergences need one vocabulary (set OutputLayer.vocab to the tokenizer's size)")
    if teacher_hidden.shape[0] != student_hidden.shape[0]:
        raise ValueError(f"teacher rows {teacher_hidden.shape[0]} != student rows {student_hidden.shape[0]}")
    loss_and_grad = loss_and_grad_of(loss, beta, alpha) if isinstance(loss, str) else loss
    dtype = row_weights.dtype
    teacher_hidden = teacher_hidden.detach()  # read, never differentiated (forward runs without autograd)

    def target(index: Any, student_logits: Tensor) -> tuple[Tensor, Tensor]:
        log_q = _log_softmax_(student_logits, temperature)
        log_p = _log_softmax_(_layer_chunk(teacher_hidden[index], teacher_layer, dtype)[0], temperature)
        value, grad = loss_and_grad(log_q, log_p)
        return value, grad if temperature == 1.0 else grad.div_(temperature)

    return _apply(student_hidden, student_layer, row_weights, target, chunk_size)


def _flat_weights(hidden: Tensor, mask: Tensor | None, reduction: str, dtype: torch.dtype) -> Tensor:
    """Row weights (N,) of `reduction` over hidden (batch, positions, H) or (N, H) (one sequence) and its mask."""
    lead = hidden.shape[:-1]
    if mask is None:
        mask = torch.ones(lead, dtype=torch.bool, device=hidden.device)
    if tuple(mask.shape) != tuple(lead):
        raise ValueError(f"mask shape {tuple(mask.shape)} must be the hidden states' leading shape {tuple(lead)}")
    mask2d = mask.bool().reshape(1, -1) if mask.dim() == 1 else mask.bool().reshape(-1, mask.shape[-1])
    return _row_weights(mask2d, reduction, dtype).reshape(-1)


def fused_divergence(loss: str | LossAndGrad, student_hidden: Tensor, student_layer: OutputLayer,
                     teacher_hidden: Tensor, teacher_layer: OutputLayer, mask: Tensor | None = None, *,
                     temperature: float = 1.0, reduction: str = "token_mean", chunk_size: int | None = None,
                     beta: float = 0.5, alpha: float = 0.1) -> Tensor:
    """The divergence of kdlab.losses (`loss` by name) on the logits both output layers would give, fused.

    Hidden states (batch, positions, H) or (N, H) (one sequence), each model with its own H; mask of their leading
    shape, True where scored. reduction: token_mean | sequence_mean | sum, as the logit-level losses."""
    dtype = _compute_dtype(student_hidden, student_layer.weight, teacher_hidden, teacher_layer.weight)
    weights = _flat_weights(student_hidden, mask, reduction, dtype)
    return fused_divergence_sum(loss, student_hidden.reshape(-1, student_hidden.shape[-1]), student_layer,
                                teacher_hidden.reshape(-1, teacher_hidden.shape[-1]), teacher_layer, weights,
                                temperature=temperature, chunk_size=chunk_size, beta=beta, alpha=alpha)


def fused_cross_entropy_sum(hidden: Tensor, layer: OutputLayer, labels: Tensor, row_weights: Tensor, *,
                            chunk_size: int | None = None) -> Tensor:
    """sum_n w_n (-log softmax(layer(h_n))[labels_n]); hidden (N, H), labels (N,) long, row_weights (N,).

    Labels of rows with weight 0 are never read (they may be -100). d CE / d logits = softmax - onehot(label)."""
    if tuple(labels.shape) != (hidden.shape[0],):
        raise ValueError(f"labels must be ({hidden.shape[0]},), got {tuple(labels.shape)}")

    def target(index: Any, logits: Tensor) -> tuple[Tensor, Tensor]:
        y = labels[index]
        log_q = _log_softmax_(logits, 1.0)
        loss = -log_q.gather(1, y[:, None]).squeeze(1)
        grad = log_q.exp_()
        grad[torch.arange(grad.shape[0], device=grad.device), y] -= 1.0
        return loss, grad

    return _apply(hidden, layer, row_weights, target, chunk_size)


def fused_cross_entropy(hidden: Tensor, layer: OutputLayer, labels: Tensor, mask: Tensor | None = None, *,
                        reduction: str = "token_mean", chunk_size: int | None = None) -> Tensor:
    """kdlab.losses.cross_entropy on the logits `layer` would give, fused: hidden (batch, positions, H) or (N, H),
    labels and mask of the leading shape (labels already aligned: logits at t predict labels at t)."""
    dtype = _compute_dtype(hidden, layer.weight)
    weights = _flat_weights(hidden, mask, reduction, dtype)
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels shape {tuple(labels.shape)} must be {tuple(hidden.shape[:-1])}")
    return fused_cross_entropy_sum(hidden.reshape(-1, hidden.shape[-1]), layer, labels.reshape(-1), weights,
                                   chunk_size=chunk_size)
