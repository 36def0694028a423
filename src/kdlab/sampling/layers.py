"""Linear layers as sampling reads them on a CPU: a few rows at a time, weight on the left of the product.

Why: a decoding step pushes a few hidden states (one per sequence of the batch) through every linear layer of the
model and the output layer. `nn.Linear` computes x @ W.T, and on CPU BLAS that orientation is slow for a handful of
rows: at 4 rows a 49,152 x 576 output layer took 18.8 ms per call against 6.8 ms for W @ x.T, 151,936 x 1,024
114 ms against 54 ms; one row is slower still (matrix-vector: 10.5 ms against 4.9 ms for two copies of the row).
The layers of a decoder gain too once their weights stream from memory, as in decoding: the 42 linear layers of a
6-layer SmolLM2-shaped student took 13.4 ms per token against 7.4 ms (2 threads; benchmarks/bench_sampling_layers.py,
docs/benchmarks.md section 3). `generate` at batch 4, 64 tokens on that student went from 2.9 s to 2.0 s with the
output layer alone read this way, and to 1.7 s with every layer.

The outputs are those of `nn.Linear` to float rounding (another summation order: 1e-6 apart at these sizes), not bit
for bit, so a draw that sits on a tie may differ from an unpatched `generate`; kdlab's two samplers (`generate` and
the compiled loop) both read the layers this way and still draw the same tokens. Applied only where measured: at
least two threads (`MIN_THREADS`: at one, nn.Linear was as fast or faster), float32 CPU weights (in bfloat16
`nn.Linear` was as fast or faster), plain `nn.Linear` modules without hooks, of at least `MIN_ENTRIES` weights, at
most `FEW_ROWS` rows per call (more rows, e.g. the prefill of a prompt, go through `nn.Linear`'s own forward).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Rows per call up to which W @ x.T was measured faster (2-6x at 2-4 rows, 15% at 16, 5-10% at 64) at three output
# layers (49,152 x 576, 151,936 x 1,024, 32,000 x 2,048); beyond it, nn.Linear's own.
FEW_ROWS = 64
# Small layers gain little (the transposed copy costs as much as the product); the shipped arith models (at most
# 95,488 weights per layer) keep nn.Linear's own results.
MIN_ENTRIES = 2**17
# The gain is BLAS spreading a few-row x @ W.T badly over threads: at one thread nn.Linear's own product was as fast or
# faster (a 576 x 576 layer at 4 rows 0.044 ms against 0.129 ms; the output layer 29.6 ms against 30.8 ms), and
# `generate` on the SmolLM2-shaped student (batch 4, 256-450-token DialogSum prompts, 64 tokens) took 5.06 s against
# 6.02 s read this way (docs/benchmarks.md section 3). One thread: the layers are left as they are.
MIN_THREADS = 2


def applies(layer: nn.Module) -> bool:
    """Whether `layer` is one this module reads faster: a plain float32 CPU `nn.Linear` without hooks, not tiny."""
    if type(layer) is not nn.Linear or layer._forward_hooks or layer._forward_pre_hooks or "forward" in vars(layer):
        return False
    weight = layer.weight
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
def linears_for_sampling(model: nn.Module) -> Iterator[int]:
    """Within the block, every linear layer of `model` that `applies` (the output layer included) computes few-row
    calls as W @ x.T, where torch runs at least MIN_THREADS threads; each is restored on exit, whatever happens.
    Yields how many layers it changed."""
    layers = [module for module in model.modules() if applies(module)] if torch.get_num_threads() >= MIN_THREADS else []
    for layer in layers:
        layer.forward = types.MethodType(_forward, layer)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            vars(layer).pop("forward", None)
