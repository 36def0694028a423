"""What verifying a teacher cache costs: open_cache under teacher.verify=off|sampled|full, and the value check of
every row a training step reads.

    python benchmarks/bench_cache_verify.py --threads 1 --out benchmarks/results/cache_verify_cpu.json
    python benchmarks/bench_cache_verify.py --cache <dir written by kdlab-cache-teacher>

Without --cache it writes (with kdlab's own ShardWriter, so with its checksums) a cache the shape of the arith one
the issue measured: --examples 20,000 examples of 40-106 target tokens (73 on average, as the arith training set),
k = --top-k 32, float16, 1 MiB blocks, in --shards shards; the values are the top-k and tail of random logits over
746 tokens. Verification reads what the files hold, whatever the values, so the shape is what matters. Times are
medians over --repeats opens with the files in the page cache (the machine's memory holds them after writing): a
first open after a reboot also waits for the disk.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, parse, parser, stats, table, write  # noqa: E402

from kdlab.losses.sparse import top_k_of_logits  # noqa: E402
from kdlab.teachers.cache import (  # noqa: E402
    FORMAT,
    ShardWriter,
    TeacherCache,
    open_cache,
    shard_dir,
    shard_range,
    write_or_check_manifest,
)

VOCAB = 746


def synthesize(directory: Path, examples: int, k: int, shards: int, batch: int = 64) -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(40, 107, size=examples)
    write_or_check_manifest(directory, {"format": FORMAT, "tokenizer": "synthetic", "vocab_size": VOCAB,
                                        "task": {}, "data": "synthetic", "targets": "ground_truth",
                                        "examples": examples, "top_k": k, "dtype": "float16", "shard_count": shards})
    generator = torch.Generator().manual_seed(0)
    for index in range(shards):
        todo = shard_range(index, shards, examples)
        with ShardWriter(shard_dir(directory, index, shards), k, "float16") as writer:
            for start in range(todo.start, todo.stop, batch):
                part = lengths[start : min(start + batch, todo.stop)].tolist()
                logits = 3.0 * torch.randn(sum(part), VOCAB, generator=generator)
                values, ids, tail = top_k_of_logits(logits, k)
                writer.append(values, ids, tail, part)


def time_opens(directory: Path, repeats: int) -> dict[str, dict]:
    out = {}
    for mode in ("off", "sampled", "full"):
        times, cache = [], None
        for _ in range(repeats + 1):  # the first warms the page cache and is dropped
            start = time.perf_counter()
            cache = open_cache(directory, verify=mode)
            times.append(time.perf_counter() - start)
        read = sum(len(b) for b in cache.checked.values())
        out[mode] = {**stats(times[1:]), "blocks_read": read}
    return out


def time_reads(cache: TeacherCache, repeats: int, batch: int = 32) -> dict[str, dict]:
    """A step's reads (`batch` examples through cache[i]) with the per-row value check and without it."""
    indices = np.random.default_rng(1).choice(len(cache), size=batch, replace=False).tolist()
    checked = cache._check_values
    out = {}
    for name, check in (("with value check", checked), ("without", lambda *args, **kwargs: None)):
        cache._check_values = check
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            for i in indices:
                cache[i]
            times.append(time.perf_counter() - start)
        out[name] = stats(times[1:])
    cache._check_values = checked
    return out


def main() -> None:
    p = parser(__doc__.splitlines()[0], "benchmarks/results/cache_verify_cpu.json")
    p.add_argument("--cache", default=None, help="an existing cache to measure instead of a synthesized one")
    p.add_argument("--examples", type=int, default=20_000)
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--shards", type=int, default=1)
    args = parse(p)
    scratch = None
    if args.cache:
        directory = Path(args.cache)
    else:
        scratch = Path(tempfile.mkdtemp())
        directory = scratch / "cache"
        start = time.perf_counter()
        synthesize(directory, args.examples, args.top_k, args.shards)
        print(f"synthesized in {time.perf_counter() - start:.1f} s")
    try:
        size = sum(f.stat().st_size for f in directory.glob("shard-*/*.bin"))
        opens = time_opens(directory, args.repeats)
        reads = time_reads(open_cache(directory), args.repeats)
        cache = open_cache(directory, verify="off")
        rows = [{"verify": mode, "median ms": 1e3 * s["median_s"], "min ms": 1e3 * s["min_s"],
                 "max ms": 1e3 * s["max_s"], "blocks read": s["blocks_read"]} for mode, s in opens.items()]
        rows += [{"verify": f"a step's 32 reads, {name}", "median ms": 1e3 * s["median_s"], "min ms": 1e3 * s["min_s"],
                  "max ms": 1e3 * s["max_s"], "blocks read": ""} for name, s in reads.items()]
        rows_total = sum(int(s.offsets[-1]) for s in cache.shards)
        print(f"{directory}: {len(cache)} examples, {rows_total} rows, k={cache.k}, {cache.dtype}, "
              f"{len(cache.shards)} shard(s), {size / 1e6:.1f} MB")
        print(table(rows, list(rows[0])))
        write(args.out, {"benchmark": "cache_verify", "machine": machine("cpu"), "args": vars(args),
                         "bytes": size, "examples": len(cache), "rows": rows_total, "open": opens, "reads": reads})
    finally:
        if scratch is not None:
            shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
