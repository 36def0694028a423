"""A teacher known by its top-k (teacher=cached, teacher=remote) against the live teacher, on the embedded task.

    python benchmarks/bench_sparse_teacher.py --threads 2 --out benchmarks/results/sparse_teacher_cpu.json

On one batch of the arith training set (the shipped teacher and student, ground-truth targets):
- the loss and its gradient with the teacher's top-k plus a tail bucket (k = 8, 32, 128; kdlab.losses.sparse)
  against the dense loss over the whole vocabulary, for fkl, rkl and jsd(0.5): relative difference of the value,
  and cosine similarity and relative norm difference of the gradient with respect to the student's logits;
- the teacher's share of a step: the live teacher's forward pass over the batch against reading the same rows from
  a cache written by kdlab-cache-teacher (memory-mapped), timed alternately.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_times, machine, parse, parser, stats, table, write  # noqa: E402

from kdlab.data.datamodule import DistillationDataModule  # noqa: E402
from kdlab.data.tasks import Task  # noqa: E402
from kdlab.losses import forward_kl, generalized_jsd, reverse_kl  # noqa: E402
from kdlab.losses.sparse import (  # noqa: E402
    sparse_forward_kl,
    sparse_generalized_jsd,
    sparse_reverse_kl,
    top_k_of_logits,
)
from kdlab.models.scoring import score_targets  # noqa: E402
from kdlab.run.compose import task_node  # noqa: E402

LOSSES = {"fkl": (forward_kl, sparse_forward_kl), "rkl": (reverse_kl, sparse_reverse_kl),
          "jsd": (generalized_jsd, sparse_generalized_jsd)}


def load(batch_size: int):
    from kdlab.models.loading import load_model, load_tokenizer
    from kdlab.run.compose import compose

    cfg = compose([])
    tokenizer = load_tokenizer(cfg.student)
    teacher = load_model(cfg.teacher, tokenizer).eval().requires_grad_(False)
    student = load_model(cfg.student, tokenizer).eval()
    task_cfg = task_node("arith", train_size=max(batch_size, 64), val_size=8, batch_size=batch_size)
    data = DistillationDataModule(Task.from_config(task_cfg), tokenizer)
    data.setup()
    return task_cfg, tokenizer, teacher, student, data


def accuracy_rows(student_logits, teacher_logits, mask, ks: list[int]) -> list[dict]:
    rows = []
    for name, (dense_fn, sparse_fn) in LOSSES.items():
        s = student_logits.detach().clone().requires_grad_()
        dense = dense_fn(s, teacher_logits, mask)
        (dense_grad,) = torch.autograd.grad(dense, s)
        for k in ks:
            values, ids, tail = top_k_of_logits(teacher_logits, k)
            s = student_logits.detach().clone().requires_grad_()
            sparse = sparse_fn(s, values, ids, tail, mask)
            (grad,) = torch.autograd.grad(sparse, s)
            cosine = torch.nn.functional.cosine_similarity(grad.flatten().double(), dense_grad.flatten().double(), 0)
            rows.append({"loss": name, "k": k, "dense": dense.item(), "top-k": sparse.item(),
                         "value rel. diff": (sparse.item() - dense.item()) / dense.item(),
                         "grad cosine": cosine.item(),
                         "grad norm rel. diff": ((grad.norm() - dense_grad.norm()) / dense_grad.norm()).item()})
    return rows


def teacher_share(task_cfg, tokenizer, teacher, data, batch, repeats: int) -> dict:
    """Live teacher forward over the batch (ModelTeacher.scores) against the cache lookup of the same examples
    (CachedTeacher.prepare): what a training step asks of each kind of teacher."""
    from kdlab.sampling.hf import HFSampler
    from kdlab.teachers.cache import open_cache, run_fingerprints, write_or_check_manifest, write_shard
    from kdlab.teachers.cached import CachedTeacher
    from kdlab.teachers.model import ModelTeacher

    directory = Path(tempfile.mkdtemp()) / "cache"
    cache_cfg = {"shard_index": 0, "shard_count": 1, "top_k": 32, "dtype": "float16", "batch_size": 32}
    examples = data.train_set.items
    write_or_check_manifest(directory, {**run_fingerprints(task_cfg, tokenizer, examples), "top_k": 32,
                                        "dtype": "float16", "shard_count": 1})
    write_shard(directory, teacher, examples, int(tokenizer.pad_token_id), cache_cfg, len(tokenizer))
    cached = CachedTeacher(open_cache(directory), int(tokenizer.pad_token_id))
    live = ModelTeacher(teacher, len(tokenizer), HFSampler(teacher, tokenizer))
    fns = {"live teacher forward": lambda: live.scores(batch),
           "cache lookup (k=32)": lambda: cached.prepare(batch)}
    with torch.no_grad():
        times = interleaved_times(fns, repeats, "cpu")
    return {name: stats(t) for name, t in times.items()}


def main() -> None:
    p = parser(__doc__.splitlines()[0], "benchmarks/results/sparse_teacher_cpu.json")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--ks", type=int, nargs="+", default=[8, 32, 128])
    args = parse(p)
    task_cfg, tokenizer, teacher, student, data = load(args.batch)
    batch = next(iter(data.train_dataloader()))
    side = batch.student
    start = time.perf_counter()
    with torch.no_grad():
        teacher_logits = score_targets(teacher, *side.prompt, *side.target)[..., : len(tokenizer)]
    student_logits = score_targets(student, *side.prompt, *side.target)[..., : len(tokenizer)].detach()
    rows = accuracy_rows(student_logits, teacher_logits, side.target_mask, args.ks)
    print(table(rows, list(rows[0])))
    share = teacher_share(task_cfg, tokenizer, teacher, data, batch, args.repeats)
    share_rows = [{"": name, "median ms": 1e3 * s["median_s"]} for name, s in share.items()]
    print(table(share_rows, list(share_rows[0])))
    write(args.out, {"benchmark": "sparse_teacher", "machine": machine("cpu"), "args": vars(args),
                     "scored_tokens": int(side.target_mask.sum()), "vocab": len(tokenizer), "losses": rows,
                     "teacher_share": share, "wall_s": time.perf_counter() - start})


if __name__ == "__main__":
    main()
