"""Trainable parameters and peak memory of a few training steps: LoRA students against full fine-tuning.

    python benchmarks/bench_lora.py --threads 1 --out benchmarks/results/lora_cpu_float32.json

The student is a random-init Qwen3 decoder built by kdlab's loader (`load_model`, the arith tokenizer, the output
layer padded to --vocab rows), once with every weight trainable and once per LoRA setting (`student.lora`: the
adapters train, the base is frozen). Each step is what kdlab's training step does to the student: `score_targets`
(prompt + target, logits of the target positions), cross-entropy on the targets, backward, an AdamW step over the
parameters that require grad (what `configure_optimizers` hands the optimizer). Each case runs in a fresh process and
reports the trainable and total parameter counts, the process's peak resident memory over the steps (VmHWM, the
imports and the model included), the peak the steps add above the built model and batch, and the loss of each step.
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    add_model_size_args,
    case_in_subprocess,
    machine,
    parse,
    parser,
    peak_rss,
    reset_peak_rss,
    sized_cases,
    sized_student,
    table,
    write,
)

from kdlab.models.lora import count_parameters  # noqa: E402
from kdlab.models.scoring import score_targets  # noqa: E402

# name -> student.lora (None: full fine-tuning)
MODES = {
    "full": None,
    "lora_r16_all_linear": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
    "lora_r16_all_linear_no_dropout": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
    "lora_r16_q_v": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
}


def build(case: dict):
    """The student in train mode and a batch of (prompt ids, mask, target ids, mask): 3/4 prompt, 1/4 target."""
    return sized_student(case, lora=MODES[case["mode"]])


def memory_case(case: dict) -> None:
    """Child process: a few optimizer steps; prints one JSON line of counts, peaks and losses."""
    torch.set_num_threads(case["threads"])
    model, batch = build(case)
    trainable, total = count_parameters(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = reset_peak_rss()
    losses, saved = [], {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for _ in range(case["steps"]):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(partial(_count, saved, weights), lambda tensor: tensor):
            logits = score_targets(model, *batch)
            loss = F.cross_entropy(logits.flatten(0, 1), batch[2].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    peak = peak_rss()
    print(json.dumps({"trainable": trainable, "total": total, "process_peak_bytes": peak,
                      "steps_peak_bytes": peak - before, "saved_for_backward_bytes": sum(saved.values()),
                      "losses": losses}))


def _count(saved: dict[int, int], weights: set[int], tensor: torch.Tensor) -> torch.Tensor:
    """Records the bytes of a tensor autograd keeps from forward to backward (each storage once, weights left out):
    the activations, free of the allocator effects that move the resident peak."""
    storage = tensor.untyped_storage()
    if storage.data_ptr() not in weights:
        saved[storage.data_ptr()] = storage.nbytes()
    return tensor


def measure(case: dict) -> dict:
    return {**case, **json.loads(case_in_subprocess(__file__, case))}


def main() -> None:
    p = parser(__doc__.splitlines()[0], "benchmarks/results/lora.json")
    p.add_argument("--sizes", nargs="+", default=["4x256", "1x64"], help="batch x positions (prompt + target)")
    p.add_argument("--steps", type=int, default=3)
    add_model_size_args(p, layers=8, width=512, heads=8, kv_heads=4, head_dim=64, intermediate=1536)
    args = parse(p)
    if args.device != "cpu":
        raise SystemExit("bench_lora measures resident memory of CPU processes: --device cpu")
    rows = []
    for sized in sized_cases(args):
        full = None
        for mode in MODES:
            case = dict(sized, mode=mode, steps=args.steps, threads=torch.get_num_threads())
            row = measure(case)
            full = full or row
            row["trainable_share"] = row["trainable"] / row["total"]
            row["process_peak_mib"] = row["process_peak_bytes"] / 2**20
            row["steps_peak_mib"] = row["steps_peak_bytes"] / 2**20
            row["process_peak_ratio"] = row["process_peak_bytes"] / full["process_peak_bytes"]
            rows.append(row)
    print(table(rows, ["mode", "batch", "positions", "trainable", "total", "trainable_share", "process_peak_mib",
                       "steps_peak_mib", "process_peak_ratio"]))
    write(args.out, {"machine": machine(args.device), "args": vars(args), "results": rows})


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--memory-case":
        memory_case(json.loads(sys.argv[2]))
    else:
        main()
