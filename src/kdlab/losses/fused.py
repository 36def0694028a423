"""The output layer and the loss as one operation: no (rows, vocabulary) logits tensor outlives a chunk of rows.

Both models hand over their last hidden states at the scored positions and their output layer (weight (V, H), an
optional bias (V,), an optional final-logit soft-cap c: logits = c tanh(z / c)). One pass over the scored rows, a
chunk at a time, computes the student's and the teacher's logits of the chunk, the per-row loss and its gradient
with respect to the student's logits (a divergence's closed form from its record in kdlab.losses.divergences, or
autograd on the chunk where it has none), chains that through the soft-cap and the temperature, and
accumulates the gradients of the student's hidden states, output weight and bias; the chunk's logits are then
dropped. Backward only scales those gradients by the incoming one, so nothing is recomputed. The teacher gets no
gradient (it is frozen in every training step).

The values and gradients are those of today's path (logits = the model's head on the hidden states, then the
kdlab.losses function on the logits): same per-row formulas, same float32 (or float64) compute dtype, same row
weights for each reduction. The memory the loss needs on top of its inputs is one chunk of each side's logits and
a cache-sized slice's temporaries, plus the gradients themselves (hidden states (N, H), weight (V, H)), which any
implementation needs (docs/benchmarks.md section 6). ULD and MultiLevelOT's ranked top-k probabilities are here too:
ULD row by row like the divergences; the ranking in two passes over chunks (column sums, then the top-k columns).

The training step calls them through kdlab.step.fused (`loss.fused`, on by default where it applies).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlab.losses.chunking import compute_dtype, row_weights, rows_per_chunk
from kdlab.losses.divergences import Divergence, divergence_named
from kdlab.losses.rowwise import LossAndGrad

log = logging.getLogger(__name__)

# At most this many (row, vocab) entries per chunk (220 rows at V = 151,936, 128 at 262,144). Far above the
# logit-level losses' budget: each chunk runs three matmuls that read the whole output weight (and its gradient), so
# short chunks re-read it often. Measured at V = 151,936, H = 1,024, 256 rows, one thread (before the loss ran in
# slices): 16 rows per chunk 31 s, 64 rows 21 s, 256 rows 15.6 s (forward + backward of JSD). A chunk costs two
# (rows, V) buffers of the compute dtype (the student's logits, then their gradient; the teacher's logits).
FUSED_CHUNK_ELEMENTS = 2**25
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


@dataclass(frozen=True)
class HiddenStates:
    """A side of a cross-tokenizer loss as what makes its logits: last hidden states (B, T, H) and the output layer.

    kdlab.losses.cross_tokenizer's losses take it in place of (B, T, V) logits and compute them chunk by chunk
    (the training step's `loss.fused`, kdlab.step.fused). `shape` and `device` are the logits' it stands for."""

    hidden: Tensor
    layer: OutputLayer

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.hidden.shape[:-1], self.layer.columns))

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    def detach(self) -> "HiddenStates":
        """The same side without a gradient path (the teacher's)."""
        bias = None if self.layer.bias is None else self.layer.bias.detach()
        return HiddenStates(self.hidden.detach(), replace(self.layer, weight=self.layer.weight.detach(), bias=bias))


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


def loss_and_grad_of(divergence: str | Divergence, **settings: float) -> LossAndGrad:
    """Per-row (loss, d loss / d student logits at temperature 1) of a divergence (its record, or its `loss=` name)
    with its settings (beta=...), as kdlab.losses defines it: the record's closed form, or autograd on each chunk
    where it has none; the edge cases (jsd at beta 0 is fkl) resolved as in the dense form."""
    record = divergence if isinstance(divergence, Divergence) else divergence_named(divergence)
    target, values = record.bind(settings)
    return target.loss_and_grad(values)


# A loss seen from one chunk of rows: given the chunk's row index (what the targets of those rows need, e.g. the
# teacher's logits of the chunk, is computed once here), a function of (slice of rows within the chunk, student
# logits of those rows in the compute dtype, which it may overwrite) -> (per-row loss, d loss / d those logits)
ChunkTarget = Callable[[Any], Callable[[slice, Tensor], tuple[Tensor, Tensor]]]


def _layer_chunk(hidden: Tensor, layer: OutputLayer, dtype: torch.dtype, cap: bool = True
                 ) -> tuple[Tensor, Tensor | None]:
    """(logits (rows, vocab) in `dtype`, d logits / d z or None): z = hidden @ W.T + b, then the soft-cap (unless
    cap=False: then z itself and None)."""
    v = layer.columns
    z = F.linear(hidden, layer.weight[:v], None if layer.bias is None else layer.bias[:v]).to(dtype)
    return _softcap_(z, layer.softcap) if cap else (z, None)


def _softcap_(z: Tensor, softcap: float | None) -> tuple[Tensor, Tensor | None]:
    """(c tanh(z / c) written over z, its derivative 1 - tanh^2 (a new tensor)), or (z, None) without a cap."""
    if softcap is None:
        return z, None
    t = z.div_(softcap).tanh_()
    dcap = 1.0 - t * t
    return t.mul_(softcap), dcap


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

    A chunk's matmuls run on `rows` rows (tall, so the weight is read few times); its loss runs on slices of
    `loss_rows` rows (cache-sized), each writing its gradient over its own logits, so a chunk costs the student's
    and the target's (rows, V) buffers and a slice's temporaries.

    Forward keeps d(sum)/d(hidden, weight, bias) (shapes of the inputs: (N, H), (V, H), (V,)) and nothing else;
    backward multiplies them by the incoming gradient in place and gives them away, so it runs once per forward (as
    in every training step)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, row_weights: Tensor, softcap: float | None,
                vocab: int | None, target: ChunkTarget, rows: int, loss_rows: int) -> Tensor:
        layer, dtype = OutputLayer(weight, bias, softcap, vocab), row_weights.dtype
        grad_h = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w, grad_b = _grad_buffer(weight, ctx.needs_input_grad[1]), _grad_buffer(bias, ctx.needs_input_grad[2])
        scored = row_weights.nonzero().squeeze(1)  # unscored rows (padding, prompts) cost nothing
        every_row = scored.numel() == row_weights.numel()
        total = torch.zeros((), dtype=dtype, device=hidden.device)
        for start in range(0, scored.numel(), rows):
            index = slice(start, start + rows) if every_row else scored[start: start + rows]
            h, w = hidden[index], row_weights[index]
            g, _ = _layer_chunk(h, layer, dtype, cap=False)  # becomes the gradient, slice by slice
            part = target(index)
            for sub in (slice(i, i + loss_rows) for i in range(0, g.shape[0], loss_rows)):
                logits, dcap = _softcap_(g[sub], softcap)
                loss, grad = part(sub, logits)
                total += (loss * w[sub]).sum()
                grad = grad.mul_(w[sub, None]) if dcap is None else grad.mul_(w[sub, None]).mul_(dcap)
                g[sub] = grad  # a no-op copy where the loss already wrote its gradient over the logits
            del part
            _accumulate(g, h, weight, index, grad_h, grad_w, grad_b)
        # ctx attributes, not save_for_backward: backward hands the buffers on and drops its own reference, so
        # autograd moves them into .grad instead of copying a (V, H) weight gradient
        ctx.grads = [grad_h, grad_w, grad_b]
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("kdlab's fused output-layer loss gradient was already used: backward runs once per "
                               "forward")
        for i, dtype in enumerate(ctx.dtypes):
            if grads[i] is not None:
                grads[i] = grads[i].mul_(grad_output.to(grads[i].dtype)).to(dtype)
        return (*grads, None, None, None, None, None, None)


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
    loss_rows = rows_per_chunk(rows, layer.columns, hidden.device)
    return _FusedOutputLoss.apply(hidden, layer.weight, layer.bias, row_weights, layer.softcap, layer.vocab, target,
                                  rows, loss_rows)


def fused_divergence_sum(loss: str | Divergence | LossAndGrad, student_hidden: Tensor, student_layer: OutputLayer,
                         teacher_hidden: Tensor, teacher_layer: OutputLayer, row_weights: Tensor, *,
                         temperature: float = 1.0, chunk_size: int | None = None, **settings: float) -> Tensor:
    """sum_n w_n D(P_n || Q_n) with Q = softmax(student_layer(h_s) / T), P = softmax(teacher_layer(h_t) / T).

    student_hidden (N, Hs), teacher_hidden (N, Ht): the same N scored rows; row_weights (N,) in the compute dtype
    (rows with weight 0 are skipped). loss: a divergence of kdlab.losses (its record in `DIVERGENCES`, or its name:
    fkl | rkl | jsd | tvd | skl | srkl) with its `settings` (beta=..., alpha=...), or a LossAndGrad (log q, log p)
    -> (per-row loss, gradient w.r.t. the student logits at T = 1). The core of `fused_divergence`, for callers that
    normalise once by a global count of units."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_layer.columns != teacher_layer.columns:
        raise ValueError(f"student vocab {student_layer.columns} != teacher vocab {teacher_layer.columns}: the "
                         "divergences need one vocabulary (set OutputLayer.vocab to the tokenizer's size)")
    if teacher_hidden.shape[0] != student_hidden.shape[0]:
        raise ValueError(f"teacher rows {teacher_hidden.shape[0]} != student rows {student_hidden.shape[0]}")
    if isinstance(loss, (str, Divergence)):
        loss_and_grad = loss_and_grad_of(loss, **settings)
    elif settings:
        raise TypeError(f"settings {sorted(settings)} are a divergence's; a LossAndGrad has its own bound")
    else:
        loss_and_grad = loss
    dtype = row_weights.dtype
    teacher_hidden = teacher_hidden.detach()  # read, never differentiated (forward runs without autograd)

    def target(index: Any) -> Callable[[slice, Tensor], tuple[Tensor, Tensor]]:
        teacher_logits = _layer_chunk(teacher_hidden[index], teacher_layer, dtype)[0]

        def part(sub: slice, student_logits: Tensor) -> tuple[Tensor, Tensor]:
            log_q = _log_softmax_(student_logits, temperature)
            value, grad = loss_and_grad(log_q, _log_softmax_(teacher_logits[sub], temperature))
            return value, grad if temperature == 1.0 else grad.div_(temperature)

        return part

    return _apply(student_hidden, student_layer, row_weights, target, chunk_size)


def _flat_weights(hidden: Tensor, mask: Tensor | None, reduction: str, dtype: torch.dtype) -> Tensor:
    """Row weights (N,) of `reduction` over hidden (batch, positions, H) or (N, H) (one sequence) and its mask."""
    lead = hidden.shape[:-1]
    if mask is None:
        mask = torch.ones(lead, dtype=torch.bool, device=hidden.device)
    if tuple(mask.shape) != tuple(lead):
        raise ValueError(f"mask shape {tuple(mask.shape)} must be the hidden states' leading shape {tuple(lead)}")
    mask2d = mask.bool().reshape(1, -1) if mask.dim() == 1 else mask.bool().reshape(-1, mask.shape[-1])
    return row_weights(mask2d, reduction, dtype).reshape(-1)


def fused_divergence(loss: str | Divergence | LossAndGrad, student_hidden: Tensor, student_layer: OutputLayer,
                     teacher_hidden: Tensor, teacher_layer: OutputLayer, mask: Tensor | None = None, *,
                     temperature: float = 1.0, reduction: str = "token_mean", chunk_size: int | None = None,
                     **settings: float) -> Tensor:
    """The divergence of kdlab.losses (`loss` by name or record, with its `settings`) on the logits both output
    layers would give, fused.

    Hidden states (batch, positions, H) or (N, H) (one sequence), each model with its own H; mask of their leading
    shape, True where scored. reduction: token_mean | sequence_mean | sum, as the logit-level losses."""
    dtype = compute_dtype(student_hidden, student_layer.weight, teacher_hidden, teacher_layer.weight)
    weights = _flat_weights(student_hidden, mask, reduction, dtype)
    return fused_divergence_sum(loss, student_hidden.reshape(-1, student_hidden.shape[-1]), student_layer,
                                teacher_hidden.reshape(-1, teacher_hidden.shape[-1]), teacher_layer, weights,
                                temperature=temperature, chunk_size=chunk_size, **settings)


def fused_cross_entropy_sum(hidden: Tensor, layer: OutputLayer, labels: Tensor, row_weights: Tensor, *,
                            chunk_size: int | None = None) -> Tensor:
    """sum_n w_n (-log softmax(layer(h_n))[labels_n]); hidden (N, H), labels (N,) long, row_weights (N,).

    Labels of rows with weight 0 are never read (they may be -100). d CE / d logits = softmax - onehot(label)."""
    if tuple(labels.shape) != (hidden.shape[0],):
        raise ValueError(f"labels must be ({hidden.shape[0]},), got {tuple(labels.shape)}")

    def target(index: Any) -> Callable[[slice, Tensor], tuple[Tensor, Tensor]]:
        chunk_labels = labels[index]

        def part(sub: slice, logits: Tensor) -> tuple[Tensor, Tensor]:
            y = chunk_labels[sub]
            log_q = _log_softmax_(logits, 1.0)
            loss = -log_q.gather(1, y[:, None]).squeeze(1)
            grad = log_q.exp_()
            grad[torch.arange(grad.shape[0], device=grad.device), y] -= 1.0
            return loss, grad

        return part

    return _apply(hidden, layer, row_weights, target, chunk_size)


def fused_cross_entropy(hidden: Tensor, layer: OutputLayer, labels: Tensor, mask: Tensor | None = None, *,
                        reduction: str = "token_mean", chunk_size: int | None = None) -> Tensor:
    """kdlab.losses.cross_entropy on the logits `layer` would give, fused: hidden (batch, positions, H) or (N, H),
    labels and mask of the leading shape (labels already aligned: logits at t predict labels at t)."""
    dtype = compute_dtype(hidden, layer.weight)
    weights = _flat_weights(hidden, mask, reduction, dtype)
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels shape {tuple(labels.shape)} must be {tuple(hidden.shape[:-1])}")
    return fused_cross_entropy_sum(hidden.reshape(-1, hidden.shape[-1]), layer, labels.reshape(-1), weights,
                                   chunk_size=chunk_size)


def uld_row_loss(q: Tensor, p: Tensor) -> Tensor:
    """Per row (any leading shape): sum_i |sort(p)_i - sort(q)_i|, the smaller vocabulary zero-padded (ULD, Boizard
    et al. 2024); the padded tail's |p_i - 0| terms are the larger side's own sorted tail, summed directly. The
    logits path (kdlab.losses.cross_tokenizer) and the fused one both call it."""
    p = p.sort(-1, descending=True).values
    q = q.sort(-1, descending=True).values
    shared = min(p.shape[-1], q.shape[-1])
    return (p[..., :shared] - q[..., :shared]).abs().sum(-1) + p[..., shared:].sum(-1) + q[..., shared:].sum(-1)


def fused_universal_logit_distillation(student_hidden: Tensor, student_layer: OutputLayer, teacher_hidden: Tensor,
                                       teacher_layer: OutputLayer, student_mask: Tensor, teacher_mask: Tensor, *,
                                       temperature: float = 1.0, chunk_size: int | None = None) -> dict[str, Tensor]:
    """kdlab.losses.cross_tokenizer.universal_logit_distillation on the logits both layers would give, fused.

    student_hidden (B, Ts, Hs) and teacher_hidden (B, Tt, Ht), each with its own response mask and vocabulary;
    position t of one is matched with position t of the other up to the shorter response. Per sequence the mean
    over matched positions, then the mean over sequences: row weight = matched / count(sequence) / B. ULD's sort
    has no closed-form gradient worth writing, so each chunk's gradient is autograd's on that chunk alone."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    length = torch.minimum(student_mask.sum(-1), teacher_mask.sum(-1))
    width = min(student_mask.shape[1], teacher_mask.shape[1])
    matched = torch.arange(width, device=length.device)[None, :] < length[:, None]
    dtype = compute_dtype(student_hidden, student_layer.weight, teacher_hidden, teacher_layer.weight)
    weights = matched.to(dtype) / (matched.sum(-1, keepdim=True).clamp(min=1) * max(matched.shape[0], 1))
    hs = student_hidden[:, :width].reshape(-1, student_hidden.shape[-1])
    ht = teacher_hidden[:, :width].detach().reshape(-1, teacher_hidden.shape[-1])

    def target(index: Any) -> Callable[[slice, Tensor], tuple[Tensor, Tensor]]:
        # softmax as the logits path takes it (not exp of a log-softmax): ULD's sort and |.| turn ulp-level
        # differences in nearly equal probabilities into swapped ranks, and those into gradient differences
        p = torch.softmax(_layer_chunk(ht[index], teacher_layer, dtype)[0].div_(temperature), dim=-1)

        def part(sub: slice, logits: Tensor) -> tuple[Tensor, Tensor]:
            with torch.enable_grad():
                x = logits.detach().requires_grad_()
                loss = uld_row_loss(torch.softmax(x / temperature, dim=-1), p[sub])
                (grad,) = torch.autograd.grad(loss.sum(), x)
            return loss.detach(), grad

        return part

    return {"uld": _apply(hs, student_layer, weights.reshape(-1), target, chunk_size)}


# MultiLevelOT's released code (its `normalize`) divides each row of logits by its standard deviation over the
# vocabulary (Bessel-corrected) plus this, before any softmax: loss=ot's variant=released_code does the same.
STD_SCALE_OFFSET = 1e-4


def row_std_scale(z: Tensor) -> Tensor:
    """(3, rows): each row's mean, standard deviation (Bessel-corrected) and std + STD_SCALE_OFFSET, the divisor of
    the released MultiLevelOT code's `normalize` (z (rows, V) in the compute dtype)."""
    mean, std = z.mean(dim=-1), z.std(dim=-1)
    return torch.stack((mean, std, std + STD_SCALE_OFFSET))


def chain_row_std_scale_(grad: Tensor, z: Tensor, stats: Tensor) -> Tensor:
    """d loss / d z from grad = d loss / d x, x = z / (std(z) + offset), in place on grad (rows, V); `stats` is
    `row_std_scale(z)`. d x_j / d z_i = delta_ij / s - z_j / s^2 * (z_i - mean) / ((V - 1) std): the scale is a
    function of the row, so every column's gradient gets a share of <grad, z>."""
    mean, std, scale = stats
    share = torch.einsum("rv,rv->r", grad, z) / (scale * scale * (z.shape[-1] - 1) * std.clamp(min=torch.finfo(
        std.dtype).tiny))
    return grad.div_(scale[:, None]).sub_((z - mean[:, None]).mul_(share[:, None]))


def _ranking(hidden: Tensor, layer: OutputLayer, weight: Tensor, owner: Tensor, groups: int, k: int,
             temperatures: tuple[float, ...], rows: int, std_scaled: bool = False
             ) -> tuple[Tensor, Tensor, Tensor | None]:
    """First pass: per row and temperature the log-normaliser (nT, N); per group the top-k columns of its masked
    probabilities' column sums, broadcast to its rows (nT, N, k); with `std_scaled` each row's `row_std_scale`
    (3, N), by which its logits are divided before the temperature (else None)."""
    dtype = weight.dtype
    lse = torch.empty(len(temperatures), hidden.shape[0], dtype=dtype, device=hidden.device)
    column_sums = torch.zeros(len(temperatures), groups, layer.columns, dtype=dtype, device=hidden.device)
    stats = torch.empty(3, hidden.shape[0], dtype=dtype, device=hidden.device) if std_scaled else None
    for start in range(0, hidden.shape[0], rows):
        part = slice(start, start + rows)
        z, _ = _layer_chunk(hidden[part], layer, dtype)
        if stats is not None:
            stats[:, part] = row_std_scale(z)
            z = z.div_(stats[2, part, None])
        for i, temperature in enumerate(temperatures):
            x = z / temperature
            lse[i, part] = torch.logsumexp(x, dim=-1)
            column_sums[i].index_add_(0, owner[part], x.sub_(lse[i, part, None]).exp_().mul_(weight[part, None]))
    return lse, column_sums.topk(k, dim=-1).indices[:, owner], stats


def _selected_logits(hidden: Tensor, layer: OutputLayer, index: Tensor, dtype: torch.dtype) -> Tensor:
    """logits at the chosen columns only, (rows, k): h . W[c] + b[c], soft-capped; no (rows, V) tensor."""
    z = torch.einsum("nh,nkh->nk", hidden, layer.weight[index]).to(dtype)
    if layer.bias is not None:
        z = z + layer.bias[index].to(dtype)
    return z if layer.softcap is None else torch.tanh(z / layer.softcap) * layer.softcap


class _FusedRankedTopK(torch.autograd.Function):
    """kdlab.losses.cross_tokenizer's ranked top-k probabilities from hidden states and the output layer.

    Forward: a first pass over chunks of rows for each row's normaliser and each sequence's column sums, then each
    row's probabilities at its sequence's top-k columns from those k columns of the weight alone. Backward recomputes
    each chunk's logits (nothing (N, V) is kept), forms d/d logits = sum_T (mask / T)(scatter(g q~) - q <g, q~>),
    chains the soft-cap, and accumulates the hidden states', weight's and bias's gradients."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, mask: Tensor, softcap: float | None,
                vocab: int | None, k: int, temperatures: tuple[float, ...], rows: int, per_batch: bool,
                std_scaled: bool = False):
        layer = OutputLayer(weight, bias, softcap, vocab)
        batch, positions = mask.shape
        dtype = compute_dtype(hidden, weight)
        row_weight = mask.reshape(-1).to(dtype)
        groups = 1 if per_batch else batch
        owner = torch.arange(groups, device=hidden.device).repeat_interleave(positions * (batch // groups))
        lse, index, stats = _ranking(hidden, layer, row_weight, owner, groups, k, temperatures, rows, std_scaled)
        tops = []
        for i, temperature in enumerate(temperatures):
            top = torch.empty(hidden.shape[0], k, dtype=dtype, device=hidden.device)
            for start in range(0, hidden.shape[0], rows):
                part = slice(start, start + rows)
                z = _selected_logits(hidden[part], layer, index[i, part], dtype)
                if stats is not None:
                    z = z / stats[2, part, None]
                top[part] = (z / temperature - lse[i, part, None]).exp() * row_weight[part, None]
            tops.append(top)
        ctx.save_for_backward(hidden, weight, bias, row_weight, lse, index, stats, *tops)
        ctx.settings = (softcap, vocab, temperatures, rows)
        return tuple(top.view(batch, positions, k) for top in tops)

    @staticmethod
    def backward(ctx, *grad_tops: Tensor):
        hidden, weight, bias, row_weight, lse, index, stats, *tops = ctx.saved_tensors
        softcap, vocab, temperatures, rows = ctx.settings
        layer, dtype = OutputLayer(weight, bias, softcap, vocab), row_weight.dtype
        gqs = [torch.zeros_like(top) if g is None else g.reshape(top.shape).to(dtype) * top
               for g, top in zip(grad_tops, tops)]
        inners = [gq.sum(dim=-1) for gq in gqs]  # <g, q~> per row
        grad_h, grad_w, grad_b = torch.zeros_like(hidden), _grad_buffer(weight, True), _grad_buffer(bias, True)
        for start in range(0, hidden.shape[0], rows):
            part = slice(start, start + rows)
            z, dcap = _layer_chunk(hidden[part], layer, dtype)
            x = z if stats is None else z / stats[2, part, None]
            g = torch.zeros_like(z)
            for i, temperature in enumerate(temperatures):
                q = (x / temperature).sub_(lse[i, part, None]).exp_()
                g += q.mul_(-inners[i][part, None]).scatter_add_(1, index[i, part], gqs[i][part]).div_(temperature)
            if stats is not None:
                g = chain_row_std_scale_(g, z, stats[:, part])
            g.mul_(row_weight[part, None])
            _accumulate(g if dcap is None else g.mul_(dcap), hidden[part], weight, part, grad_h, grad_w, grad_b)
        grads = [grad_h, grad_w.to(weight.dtype), None if grad_b is None else grad_b.to(bias.dtype)]
        return (*grads, None, None, None, None, None, None, None, None)


def _accumulate(g: Tensor, h: Tensor, weight: Tensor, index: Any, grad_h: Tensor | None, grad_w: Tensor | None,
                grad_b: Tensor | None) -> None:
    """Chain d loss / d logits (rows, V) of a chunk into the hidden states', weight's and bias's gradients."""
    v = g.shape[1]
    if grad_b is not None:
        grad_b[:v] += g.sum(dim=0)
    if grad_w is not None:  # in place: g.T @ h would be a (V, H) temporary per chunk
        g = g.to(grad_w.dtype)
        grad_w[:v].addmm_(g.T, h.to(grad_w.dtype))
    if grad_h is not None:
        grad_h[index] = (g.to(weight.dtype) @ weight[:v]).to(grad_h.dtype)


def fused_ranked_topk_probs_at(hidden: Tensor, layer: OutputLayer, mask: Tensor, k: int,
                               temperatures: tuple[float, ...], per_batch: bool = False,
                               chunk_size: int | None = None, std_scaled: bool = False) -> tuple[Tensor, ...]:
    """kdlab.losses.cross_tokenizer.ranked_topk_probs_at(layer.logits(hidden), mask, k, temperatures, per_batch,
    std_scaled), without (B, T, V) logits: hidden (B, T, H), mask (B, T) -> one (B, T, k) tensor per temperature,
    each sequence's probabilities on its k most used vocabulary entries (MultiLevelOT's t^k, s^k)."""
    if hidden.dim() != 3 or tuple(mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"hidden (B, T, H) and mask (B, T) expected, got {tuple(hidden.shape)}, {tuple(mask.shape)}")
    k = min(k, layer.columns)
    rows = _rows(chunk_size, layer.columns * len(temperatures), hidden.device)
    flat = hidden.reshape(-1, hidden.shape[-1])
    args = (layer.softcap, layer.vocab, k, tuple(temperatures), rows, per_batch, std_scaled)
    if not (torch.is_grad_enabled() and (hidden.requires_grad or layer.weight.requires_grad)):
        with torch.no_grad():
            return _FusedRankedTopK.apply(flat, layer.weight, layer.bias, mask.bool(), *args)
    return _FusedRankedTopK.apply(flat, layer.weight, layer.bias, mask.bool(), *args)
