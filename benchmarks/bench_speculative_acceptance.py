"""How much the teacher intervenes in speculative KD (`policy=speculative`) as K varies: the share of the student's
proposals the teacher keeps, and the replaced tokens per response, on the shipped arith pair.

Speculative KD keeps a proposal when it is in the teacher's top-K (kdlab.sampling.speculative). Whether that changes
the targets depends on K relative to how the teacher spreads its probability: with the paper's K = 25 on a
256k-token vocabulary the teacher keeps few of a weak student's tokens, while on the arith pair's 746-token vocabulary
(a task with one right next token at most positions) it keeps almost every one. This script draws the interleaved
targets exactly as training does (SpeculativeSampler.interleaved, the run's sampling settings, the same seed for
every K) on validation prompts, for the shipped (untrained) student, and reports per K:

    accepted            proposals kept / response tokens (train/speculative_accept's definition)
    replaced_per_row    tokens the teacher replaced, per response
    rows_touched        responses with at least one replacement

K = the vocabulary keeps every proposal: the student's own samples (on-policy GKD), a check of the count.

    python benchmarks/bench_speculative_acceptance.py --threads 1 --prompts 128
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import load  # noqa: E402
from common import machine, parse, parser, table, write  # noqa: E402

from kdlab.data.datamodule import DistillationDataModule  # noqa: E402
from kdlab.data.tasks import Task  # noqa: E402
from kdlab.run.compose import task_node  # noqa: E402
from kdlab.sampling.base import SamplingSettings  # noqa: E402
from kdlab.sampling.speculative import SpeculativeSampler  # noqa: E402

KS = (1, 2, 3, 5, 10, 25, 50)


def validation_batches(tokenizer, prompts: int, batch_size: int) -> list:
    """The first `prompts` validation problems of the arith task, as training's collator batches them."""
    task = Task.from_config(task_node("arith", val_size=prompts, eval_examples=prompts, eval_batch_size=batch_size))
    datamodule = DistillationDataModule(task, tokenizer)
    datamodule.setup()
    return list(datamodule.val_dataloader())


def measure(student, teacher, tokenizer, batches: list, k: int, settings: SamplingSettings, seed: int) -> dict:
    sampler = SpeculativeSampler(student, teacher, tokenizer, k)
    tokens = kept = replaced = touched = rows = 0
    for i, batch in enumerate(batches):
        torch.manual_seed(seed + i)  # the same draws for every K where the proposals agree
        draw = sampler.interleaved(*batch.student.prompt, settings)
        tokens += int(draw.mask.sum())
        kept += int(draw.accepted.sum())
        replaced += int(draw.replaced.sum())
        touched += int(draw.replaced.any(dim=1).sum())
        rows += draw.mask.shape[0]
    return {"K": k, "accepted": kept / tokens, "replaced_per_row": replaced / rows, "rows_touched": touched / rows,
            "tokens_per_row": tokens / rows}


def main() -> None:
    p = parser(__doc__.split("\n\n")[0], "benchmarks/results/speculative_acceptance_cpu.json")
    p.add_argument("--prompts", type=int, default=128, help="validation problems (the first N)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=1)
    args = parse(p)
    tokenizer, teacher, student = load(args.device, torch.float32)
    batches = [b.to(args.device) for b in validation_batches(tokenizer, args.prompts, args.batch_size)]
    settings = SamplingSettings(max_new_tokens=160, do_sample=True)  # policy.sampling's defaults
    rows = [measure(student, teacher, tokenizer, batches, k, settings, args.seed) for k in (*KS, len(tokenizer))]
    print(table(rows, ["K", "accepted", "replaced_per_row", "rows_touched", "tokens_per_row"]))
    write(args.out, {"machine": machine(args.device), "vocabulary": len(tokenizer), "prompts": args.prompts,
                     "seed": args.seed, "sampling": "temperature 1, up to 160 new tokens", "rows": rows})


if __name__ == "__main__":
    main()
