"""Linear layers at a few rows per call, as sampling reads them: nn.Linear's x @ W.T against kdlab's W @ x.T.

    python benchmarks/bench_sampling_layers.py --threads 2 --out benchmarks/results/sampling_layers_cpu_float32.json

Three measurements, each interleaved (A, B, A, B, ...) in one process, medians:
- an output layer alone, `F.linear(x, W)` against `kdlab.sampling.layers.few_rows_linear(x, W)`, for output layers
  of (V, H) = (49,152, 576) (SmolLM2), (151,936, 1,024) (Qwen3-0.6B), (32,000, 2,048) and --rows rows per call;
- the decoder layers of the SmolLM2-shaped student of `bench_step.py --pair smollm` (its `nn.Linear` layers but the
  output layer, one call each at --batch rows, as one decoding step reads them: the weights stream from memory);
- `generate` on that student (batch --batch, --max-new-tokens sampled tokens) through kdlab's sampling
  (`generate_targets`, which reads the layers as W @ x.T) against the same call with every layer left as it is
  (`sampling_layers.MIN_ENTRIES` raised above every layer's size).
Values: the largest difference between the two ways' outputs, per case.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_times, machine, parse, parser, stats, table, write  # noqa: E402

from kdlab.sampling import layers as sampling_layers  # noqa: E402
from kdlab.sampling.base import SamplingSettings  # noqa: E402
from kdlab.sampling.hf import generate_targets  # noqa: E402
from kdlab.sampling.layers import few_rows_linear  # noqa: E402

LAYERS = [(49152, 576), (151936, 1024), (32000, 2048)]


def layer_cases(args) -> list[dict]:
    out = []
    for vocab, hidden in LAYERS[: args.layers]:
        weight = torch.randn(vocab, hidden) * hidden**-0.5
        for rows in args.rows:
            x = torch.randn(rows, 1, hidden)
            with torch.inference_mode():
                diff = (F.linear(x, weight) - few_rows_linear(x, weight, None)).abs().max().item()
                times = interleaved_times({"nn.Linear": partial(F.linear, x, weight),
                                           "W @ x.T": partial(few_rows_linear, x, weight, None)}, args.repeats, "cpu")
            out.append({"V": vocab, "H": hidden, "rows": rows, "max_abs_diff": diff,
                        **{name: stats(t) for name, t in times.items()}})
            print(f"V={vocab} H={hidden} rows={rows}: nn.Linear {out[-1]['nn.Linear']['median_s'] * 1e3:.2f} ms, "
                  f"W @ x.T {out[-1]['W @ x.T']['median_s'] * 1e3:.2f} ms", flush=True)
    return out


def decoder_layers_case(student, args) -> dict:
    """One decoding step's worth of the student's decoder layers (every nn.Linear but the output layer), each way."""
    head = student.get_output_embeddings()
    weights = [m.weight for m in student.modules() if type(m) is torch.nn.Linear and m is not head]
    inputs = {w.shape[1]: torch.randn(args.batch, 1, w.shape[1]) for w in weights}

    def each(linear) -> None:
        for w in weights:
            linear(inputs[w.shape[1]], w, None)

    with torch.inference_mode():
        diff = max((F.linear(inputs[w.shape[1]], w) - few_rows_linear(inputs[w.shape[1]], w, None)).abs().max().item()
                   for w in weights)
        times = interleaved_times({"nn.Linear": partial(each, F.linear), "W @ x.T": partial(each, few_rows_linear)},
                                  args.repeats, "cpu")
    return {"layers": len(weights), "weights": sum(w.numel() for w in weights), "rows": args.batch,
            "max_abs_diff": diff, **{name: stats(t) for name, t in times.items()}}


def sampling_case(student, tokenizer, args) -> dict:
    """generate on the SmolLM2-shaped student, with and without the few-row layers."""
    from bench_step import first_batch

    batch, _ = first_batch(tokenizer, args.batch, "cpu")
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens, do_sample=True)
    floor = sampling_layers.MIN_ENTRIES
    largest = max(m.weight.numel() for m in student.modules() if type(m) is torch.nn.Linear)

    def sample(patched: bool):
        sampling_layers.MIN_ENTRIES = floor if patched else largest + 1
        torch.manual_seed(0)
        try:
            return generate_targets(student, *batch.student.prompt, settings, pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=tokenizer.eos_token_id)
        finally:
            sampling_layers.MIN_ENTRIES = floor

    times = interleaved_times({"nn.Linear": lambda: sample(False), "W @ x.T": lambda: sample(True)}, args.repeats,
                              "cpu")
    same = torch.equal(sample(False)[0], sample(True)[0])
    return {"batch": args.batch, "max_new_tokens": args.max_new_tokens, "student_layers": args.student_layers,
            "same_tokens_under_one_seed": same, **{name: stats(t) for name, t in times.items()}}


def main() -> None:
    p = parser(__doc__.splitlines()[0], "benchmarks/results/sampling_head.json")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 16, 64])
    p.add_argument("--layers", type=int, default=len(LAYERS), help="how many of the output layers to time")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--student-layers", type=int, default=6, help="the SmolLM2-shaped student's layers (tests: 1)")
    args = parse(p)
    from bench_step import load

    cases = layer_cases(args)
    tokenizer, _, student = load("cpu", torch.float32, "smollm", (1, args.student_layers))
    decoder = decoder_layers_case(student, args)
    print(f"decoder layers ({decoder['layers']} nn.Linear, {args.batch} rows): nn.Linear "
          f"{decoder['nn.Linear']['median_s'] * 1e3:.2f} ms, W @ x.T {decoder['W @ x.T']['median_s'] * 1e3:.2f} ms")
    generation = sampling_case(student, tokenizer, args)
    rows = [{"V": c["V"], "H": c["H"], "rows": c["rows"], "nn.Linear ms": c["nn.Linear"]["median_s"] * 1e3,
             "W @ x.T ms": c["W @ x.T"]["median_s"] * 1e3,
             "speed-up": c["nn.Linear"]["median_s"] / c["W @ x.T"]["median_s"], "max |diff|": c["max_abs_diff"]}
            for c in cases]
    speedup = generation["nn.Linear"]["median_s"] / generation["W @ x.T"]["median_s"]
    print(table(rows, list(rows[0])))
    print(f"generate, batch {args.batch}, {args.max_new_tokens} tokens: nn.Linear "
          f"{generation['nn.Linear']['median_s']:.3f} s, W @ x.T {generation['W @ x.T']['median_s']:.3f} s "
          f"({speedup:.2f}x); same tokens under one seed: {generation['same_tokens_under_one_seed']}")
    write(args.out, {"benchmark": "sampling layers", "machine": machine("cpu"), "args": vars(args), "layers": cases,
                     "decoder_layers": decoder, "generate": dict(generation, speedup=speedup),
                     "table": table(rows, list(rows[0]))})


if __name__ == "__main__":
    main()
