"""Peak memory and time of one student forward + backward with and without `student.gradient_checkpointing`.

    python benchmarks/bench_activation_checkpointing.py --threads 1 --repeats 2 \
        --out benchmarks/results/activation_checkpointing_cpu_float32.json
    python benchmarks/bench_activation_checkpointing.py --device cuda --layers 28 --width 1024 --heads 16 \
        --kv-heads 8 --head-dim 128 --intermediate 3072 --vocab 151936 --sizes 8x1024 8x2048 \
        --out benchmarks/results/activation_checkpointing_cuda.json     # Qwen3-0.6B's shape, random init

The student is a random-init Qwen3 decoder built by kdlab's loader (`load_model`, the arith tokenizer, the output
layer padded to --vocab rows), scored as kdlab scores it (`score_targets`: prompt + target, logits of the target
positions only), with cross-entropy on the target tokens, then backward. Each case reports: the peak memory the step
adds above the model and inputs (CPU: the resident high-water mark in a fresh process per case; CUDA: the caching
allocator's peak), the bytes autograd keeps from forward to backward outside checkpointed blocks (saved-tensor
hooks), the median time of forward + backward (interleaved), and the largest gradient difference between the modes.
"""

from __future__ import annotations

import gc
import json
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    add_model_size_args,
    cpu_peak_bytes_in_subprocess,
    cuda_peak_bytes,
    interleaved_times,
    machine,
    parse,
    parser,
    peak_rss,
    reset_peak_rss,
    sized_cases,
    sized_student,
    stats,
    table,
    write,
)

from kdlab.models.scoring import score_targets  # noqa: E402

MODES = ("off", "on")


def build(case: dict, checkpointing: bool):
    """The student and a batch of (prompt ids, mask, target ids, mask): 3/4 prompt, 1/4 target, no padding."""
    model, batch = sized_student(case, case["dtype"], gradient_checkpointing=checkpointing)
    return model.to(case["device"]), tuple(t.to(case["device"]) for t in batch)


def step(model, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    logits = score_targets(model, *batch)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[2].flatten())
    loss.backward()
    return loss.detach()


def saved_bytes(model, batch: tuple[torch.Tensor, ...]) -> int:
    """Bytes autograd keeps for backward outside checkpointed blocks (whose own hooks take their tensors)."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step(model, batch)
    return total


def memory_case(case: dict) -> None:
    """Child process: print the peak bytes one forward + backward adds above the model and its inputs."""
    torch.set_num_threads(case["threads"])
    model, batch = build(case, case["mode"] == "on")
    before = reset_peak_rss()
    step(model, batch)
    print(peak_rss() - before)


def measure(case: dict, args) -> dict:
    models = {mode: build(case, mode == "on") for mode in MODES}
    grads = {}
    result = dict(case)
    for mode, (model, batch) in models.items():
        result[f"{mode}_saved_bytes"] = saved_bytes(model, batch)
        grads[mode] = {name: p.grad.clone() for name, p in model.named_parameters()}
    result["grad_max_abs_diff"] = max((grads["on"][k] - g).abs().max().item() for k, g in grads["off"].items())
    del grads
    times = interleaved_times({mode: partial(step, *models[mode]) for mode in MODES}, args.repeats, case["device"])
    for mode in MODES:
        result[f"{mode}_time"] = stats(times[mode])
    del models
    gc.collect()
    for mode in MODES:
        if case["device"] == "cuda":
            model, batch = build(case, mode == "on")
            result[f"{mode}_peak_bytes"] = cuda_peak_bytes(partial(step, model, batch))
            del model, batch
        else:
            result[f"{mode}_peak_bytes"] = cpu_peak_bytes_in_subprocess(__file__, dict(case, mode=mode))
    result["peak_ratio"] = result["on_peak_bytes"] / max(result["off_peak_bytes"], 1)
    result["time_ratio"] = result["on_time"]["median_s"] / result["off_time"]["median_s"]
    return result


def main() -> None:
    p = parser(__doc__.splitlines()[0], "benchmarks/results/activation_checkpointing.json")
    p.add_argument("--sizes", nargs="+", default=["4x512", "4x1024"], help="batch x positions (prompt + target)")
    add_model_size_args(p, layers=8, width=256, heads=4, kv_heads=2, head_dim=64, intermediate=768)
    args = parse(p)
    rows = []
    for case in sized_cases(args):
        case.update(dtype=args.dtype, device=args.device, threads=torch.get_num_threads())
        rows.append(measure(case, args))
    for row in rows:
        row["off_peak_mib"], row["on_peak_mib"] = row["off_peak_bytes"] / 2**20, row["on_peak_bytes"] / 2**20
        row["off_median_s"], row["on_median_s"] = row["off_time"]["median_s"], row["on_time"]["median_s"]
    print(table(rows, ["batch", "positions", "off_peak_mib", "on_peak_mib", "peak_ratio", "off_saved_bytes",
                       "on_saved_bytes", "off_median_s", "on_median_s", "time_ratio", "grad_max_abs_diff"]))
    write(args.out, {"machine": machine(args.device), "args": vars(args), "results": rows})


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--memory-case":
        memory_case(json.loads(sys.argv[2]))
    else:
        main()
