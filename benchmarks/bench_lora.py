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
from common import machine, parse, parser, peak_rss, reset_peak_rss, table, write  # noqa: E402

from kdlab.lora import count_parameters  # noqa: E402
from kdlab.models import load_model, load_tokenizer  # noqa: E402
from kdlab.scoring import score_targets  # noqa: E402

TOKENIZER = Path(__file__).resolve().parents[1] / "src/kdlab/assets/arith/tokenizer"
# name -> student.lora (None: full fine-tuning)
MODES = {
    "full": None,
    "lora_r16_all_linear": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
    "lora_r16_all_linear_no_dropout": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
    "lora_r16_q_v": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
}


def build(case: dict):
    """The student in train mode and a batch of (prompt ids, mask, target ids, mask): 3/4 prompt, 1/4 target."""
    tokenizer = load_tokenizer({"tokenizer": str(TOKENIZER)})
    config = dict(hidden_size=case["width"], intermediate_size=case["intermediate"], num_hidden_layers=case["layers"],
                  num_attention_heads=case["heads"], num_key_value_heads=case["kv_heads"], head_dim=case["head_dim"],
                  vocab_size=case["vocab"], max_position_embeddings=max(4096, case["positions"]),
                  tie_word_embeddings=True)
    torch.manual_seed(0)
    model = load_model({"name": "bench-qwen3", "architecture": "qwen3", "config": config, "dtype": "float32",
                        "lora": MODES[case["mode"]]}, tokenizer).train()
    generator = torch.Generator().manual_seed(1)
    prompt_len = case["positions"] * 3 // 4
    ids = torch.randint(3, len(tokenizer), (case["batch"], case["positions"]), generator=generator)
    mask = torch.ones_like(ids, dtype=torch.bool)
    return model, (ids[:, :prompt_len], mask[:, :prompt_len], ids[:, prompt_len:], mask[:, prompt_len:])


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
    import subprocess

    out = subprocess.run([sys.executable, __file__, "--memory-case", json.dumps(case)], capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"case {case['mode']} failed:\n{out.stderr[-2000:]}")
    return {**case, **json.loads(out.stdout.strip().splitlines()[-1])}


def main() -> None:
    p = parser(__doc__.splitlines()[0], "benchmarks/results/lora.json")
    p.add_argument("--sizes", nargs="+", default=["4x256", "1x64"], help="batch x positions (prompt + target)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=32768, help="output rows (the tokenizer's 746, padded)")
    args = parse(p)
    if args.device != "cpu":
        raise SystemExit("bench_lora measures resident memory of CPU processes: --device cpu")
    rows = []
    for size in args.sizes:
        batch, positions = (int(x) for x in size.split("x"))
        full = None
        for mode in MODES:
            case = dict(mode=mode, batch=batch, positions=positions, steps=args.steps, layers=args.layers,
                        width=args.width, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                        intermediate=args.intermediate, vocab=args.vocab, threads=torch.get_num_threads())
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
