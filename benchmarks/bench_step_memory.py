"""Whole training step peak memory of a real-shaped pair, with and without the fused output layer and loss.

    python benchmarks/bench_step_memory.py --threads 2 --out benchmarks/results/step_memory_qwen3_cpu_bfloat16.json

The pair: random weights of Qwen3-0.6B's architecture (the student: 28 layers, width 1,024, 16 query and 8
key-value heads of 128, MLP 3,072, tied embeddings) and Qwen3-1.7B's (the teacher: width 2,048, MLP 6,144), both
with Qwen's 151,936-row output layer over a tokenizer of 151,669 tokens (the arith tokenizer with unused tokens
appended, as `bench_step.py --pair smollm` builds it), both in --dtype (bfloat16 by default: weights, gradients and
AdamW's states), built by kdlab's own loader. The batch: --batch rows of --prompt prompt tokens and --response
target tokens (random ids, no padding). The step is what `DistillationModule.training_step` runs on one
micro-batch (`step.targets`, `DistillationStep.global_counts`, `step.loss`: both models score the targets,
`loss=jsd` as train.py composes it (beta 0.5, the logits path's chunks of 1,024 rows) over the response tokens,
backward) and then an AdamW step, --steps times; with `loss.fused=true` (the default) the terms come from hidden
states chunk by chunk (where the run fuses them: `kdlab.run.build.use_fused`), with `false` from both models'
(batch, response, vocabulary) logits.

Each setting runs in a fresh process and reports: the process's peak resident memory (VmHWM: weights, gradients,
optimizer states and the step's own memory), the peak the last step adds above the resident size before it (the
optimizer's states exist by then), each step's loss (the two settings must agree to the dtype's precision) and
time. The targets are fixed tokens, not the student's samples: sampling's memory (a KV cache) is the same on both
paths and its time on a CPU at these sizes would be hours. `--layers T S`, `--vocab` and `--tokenizer-size` scale the
pair down (tests).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import padded_tokenizer  # noqa: E402
from common import case_in_subprocess, machine, parse, parser, peak_rss, reset_peak_rss, table, write  # noqa: E402

from kdlab.data.batch import Batch, Side  # noqa: E402
from kdlab.losses.objective import build_objective  # noqa: E402
from kdlab.models.loading import load_model  # noqa: E402
from kdlab.run.build import build_sampler, use_fused  # noqa: E402
from kdlab.run.compose import compose  # noqa: E402
from kdlab.sampling.base import SamplingSettings  # noqa: E402
from kdlab.step.policy import GROUND_TRUTH  # noqa: E402
from kdlab.step.step import DistillationStep  # noqa: E402
from kdlab.teachers.model import ModelTeacher  # noqa: E402

# Qwen/Qwen3-0.6B and Qwen/Qwen3-1.7B config.json (architecture only; random weights, no download)
QWEN3 = {"num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
         "tie_word_embeddings": True, "rms_norm_eps": 1e-6, "max_position_embeddings": 40960,
         "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "hidden_act": "silu"}
STUDENT = {**QWEN3, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28}
TEACHER = {**QWEN3, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28}
TOKENIZER_SIZE = 151669  # Qwen3's tokenizer; the output layers' other 267 rows are padding, trimmed by the loss


def build(case: dict):
    """(step, optimizer, batch) for one setting: the pair, kdlab's step with JSD(0.5), AdamW, fixed targets."""
    torch.manual_seed(0)
    tokenizer = padded_tokenizer(case["tokenizer_size"], tempfile.mkdtemp())
    teacher_layers, student_layers = case["layers"]

    def model(name: str, config: dict, layers: int):
        config = {**config, "num_hidden_layers": layers, "vocab_size": case["vocab"]}
        return load_model({"name": name, "architecture": "qwen3", "config": config,
                           "dtype": case["dtype"], "attn_implementation": "sdpa"}, tokenizer)

    teacher = model("qwen3-1.7b-shaped-teacher", TEACHER, teacher_layers).eval().requires_grad_(False)
    student = model("qwen3-0.6b-shaped-student", STUDENT, student_layers).train()
    # loss=jsd and score_groups as train.py composes them; loss.fused as the case sets it, applied as the run applies it
    run = compose(["loss=jsd", f"loss.fused={str(case['fused']).lower()}"])
    parts = {"student": student, "objective": build_objective(run.loss),
             "teacher": ModelTeacher(teacher, len(tokenizer), build_sampler(teacher, tokenizer))}
    step = DistillationStep(tokenizer=tokenizer, sampler=build_sampler(student, tokenizer), fused=use_fused(run, parts),
                            score_groups=int(run.score_groups), **parts)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, case["tokenizer_size"], (case["batch"], case["prompt"] + case["response"]), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    p = case["prompt"]
    batch = Batch(Side(ids[:, :p], mask[:, :p], ids[:, p:], mask[:, p:]), reference=[""] * case["batch"])
    return step, optimizer, batch


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def memory_case(case: dict) -> None:
    """Child process: --steps training steps; prints one JSON line of peaks, losses and times."""
    torch.set_num_threads(case["threads"])
    step, optimizer, batch = build(case)
    unused = SamplingSettings(max_new_tokens=1, do_sample=False)  # fixed targets: nothing is sampled
    losses, times, before = [], [], 0
    for i in range(case["steps"]):
        if i == case["steps"] - 1:
            before = reset_peak_rss()
        start = time.perf_counter()
        targets = step.targets(batch, GROUND_TRUTH, unused)
        loss, _ = step.loss(targets, DistillationStep.global_counts([targets], batch.student.target_ids.device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    peak = peak_rss()
    print(json.dumps({"fused_plan": step.fused, "process_peak_bytes": peak,
                      "last_step_peak_bytes": peak - before, "losses": losses, "step_s": times,
                      "student_params": params(step.student), "teacher_params": params(step.teacher.model)}))


def main() -> None:
    p = parser(__doc__.splitlines()[0], "benchmarks/results/step_memory.json")
    p.set_defaults(dtype="bfloat16")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--response", type=int, default=512)
    p.add_argument("--steps", type=int, default=2, help="the last one's peak is reported (AdamW's states exist)")
    p.add_argument("--layers", type=int, nargs=2, default=[28, 28], metavar=("TEACHER", "STUDENT"))
    p.add_argument("--vocab", type=int, default=QWEN3["vocab_size"], help="output layer rows (tests scale it down)")
    p.add_argument("--tokenizer-size", type=int, default=TOKENIZER_SIZE)
    args = parse(p)
    if args.device != "cpu":
        raise SystemExit("bench_step_memory measures CPU resident memory; on CUDA use bench_fused.py's peaks")
    results, rows = {"benchmark": "step memory", "machine": machine(args.device), "args": vars(args)}, []
    for fused in (True, False):
        case = dict(fused=fused, dtype=args.dtype, batch=args.batch, prompt=args.prompt, response=args.response,
                    steps=args.steps, layers=args.layers, vocab=args.vocab, tokenizer_size=args.tokenizer_size,
                    threads=torch.get_num_threads())
        result = json.loads(case_in_subprocess(__file__, case))
        results["fused" if fused else "logits"] = dict(case, **result)
        rows.append({"loss.fused": fused, "process peak GiB": result["process_peak_bytes"] / 2**30,
                     "last step adds GiB": result["last_step_peak_bytes"] / 2**30,
                     "step s": result["step_s"][-1], "losses": ", ".join(f"{x:.6f}" for x in result["losses"])})
        print(table(rows[-1:], list(rows[-1])).splitlines()[-1], flush=True)
    fused, logits = results["fused"], results["logits"]
    results["ratios"] = {"process_peak_fused_over_logits": fused["process_peak_bytes"] / logits["process_peak_bytes"],
                         "step_peak_fused_over_logits": fused["last_step_peak_bytes"]
                         / logits["last_step_peak_bytes"]}
    results["max_loss_diff"] = max(abs(a - b) for a, b in zip(fused["losses"], logits["losses"]))
    results["table"] = table(rows, list(rows[0]))
    print(results["table"])
    print(json.dumps(results["ratios"]), "max loss difference", results["max_loss_diff"])
    write(args.out, results)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--memory-case":
        memory_case(json.loads(sys.argv[2]))
    else:
        main()
