"""The output layer as sampling reads it on a CPU: a few rows at a time, weight on the left of the product.

Why: a decoding step turns a few hidden states (one per sequence of the batch) into logits over the whole
vocabulary. `nn.Linear` computes that as x @ W.T, and on CPU BLAS that orientation is slow for a handful of rows
and a large output layer: at 4 rows, a 49,152 x 576 layer took 18.8 ms per call against 6.8 ms for W @ x.T, and
151,936 x 1,024 took 114 ms against 54 ms (2 threads, docs/benchmarks.md section 3). One row is slower still
(matrix-vector: 10.5 ms against 4.9 ms for two copies of the row). On the SmolLM2-135M-shaped pair that was a
third of the whole sampling time: `generate` at batch 4, 64 tokens went from 2.6 s to 1.9 s with this.

The logits are those of `nn.Linear` to float rounding (another summation order: 1e-6 apart at these sizes), not
bit for bit, so a draw that sits on a tie may differ from an unpatched `generate`; kdlab's two samplers (`generate`
and the compiled loop) both read the layer this way and still draw the same tokens. Applied only where measured:
float32 CPU weights (in bfloat16 `nn.Linear` was as fast or faster), a plain `nn.Linear` without hooks, layers of at
least `MIN_ENTRIES` weights, at most `FEW_ROWS` rows per call (more rows, e.g. a prefill that keeps every position,
go through `nn.Linear`'s own forward).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Rows per call up to which W @ x.T was measured faster (2-6x at 2-4 rows, 15% at 16, 5-10% at 64) at the three
# large layers measured (49,152 x 576, 151,936 x 1,024, 32,000 x 2,048; benchmarks/bench_sampling_head.py); beyond
# it, nn.Linear's own.
FEW_ROWS = 64
# Small layers gain nothing (746 x 64: 0.01 ms either way, the transposed copy costs more).
MIN_ENTRIES = 2**20


def applies(head: nn.Module | None) -> bool:
    """Whether the output layer is one this module reads faster: a plain float32 CPU `nn.Linear`, no hooks, large."""
    if type(head) is not nn.Linear or head._forward_hooks or head._forward_pre_hooks or "forward" in vars(head):
        return False
    weight = head.weight
    return (type(weight) is nn.Parameter and weight.device.type == "cpu" and weight.dtype == torch.float32
            and weight.numel() >= MIN_ENTRIES)


def few_rows_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """F.linear(x, weight, bias), computed as (weight @ rows.T).T when x holds at most FEW_ROWS rows."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not 0 < rows <= FEW_ROWS:
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])
    if rows == 1:  # a matrix-vector product is the slow case: two copies of the row make it a matrix product
        z = (weight @ torch.cat([flat, flat]).T)[:, :1]
    else:
        z = weight @ flat.T
    z = z.T.contiguous()
    if bias is not None:
        z = z + bias
    return z.reshape(*x.shape[:-1], weight.shape[0])


def _forward(self: nn.Linear, x: Tensor) -> Tensor:
    return few_rows_linear(x, self.weight, self.bias)


@contextlib.contextmanager
def output_layer_for_sampling(model: nn.Module) -> Iterator[bool]:
    """Within the block, `model`'s output layer computes few-row calls as W @ x.T (where `applies`); restored on
    exit, whatever happens. Yields whether it applied."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not applies(head):
        yield False
        return
    head.forward = types.MethodType(_forward, head)
    try:
        yield True
    finally:
        del head.forward
