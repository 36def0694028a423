"""Output layer + JSD, forward + backward: kdlab's fused loss against today's path and TRL's DistillationTrainer.

    python benchmarks/bench_fused.py --threads 1 --repeats 2 --out benchmarks/results/fused_cpu_float32.json

Three implementations on the same tensors (student and teacher hidden states (B x T, H), output weights (V, H)):
- `fused`: kdlab.losses.fused.fused_divergence("jsd"), no (B x T, V) tensor outlives a chunk of rows;
- `logits` (today's kdlab path): logits = hidden @ W.T for both models (the teacher's under no_grad), then
  kdlab.losses.generalized_jsd on the logits (itself chunked, with a closed-form gradient);
- `trl`: TRL's `_chunked_divergence_loss` (trl/trainer/distillation_trainer.py, TRL 1.16), the function its
  DistillationTrainer calls on hidden states and `lm_head` weights (tiles of 4,096 rows x 32,768 columns; backward
  recomputes the tiles), skipped when TRL is not installed.
Each case: the values (all three must agree), gradient agreement of the student's hidden states and weight, times
measured interleaved (the checked pass is the first round, then --repeats more; medians), and the peak memory one
forward + backward adds above the inputs (CUDA: the allocator's peak; CPU: peak RSS in a fresh process per case and
implementation). Cases whose logits path would need more than --max-gib, or whose matmuls exceed --max-tflop, are
skipped, and said so. `--memory-only` measures the peaks alone (a fresh process per implementation, one forward +
backward each): at 8 x 1,024 the in-process check would hold all three implementations' inputs and outputs at once,
and each call takes minutes of a CPU; values and times are those of the smaller sizes.

    python benchmarks/bench_fused.py --threads 2 --memory-only --sizes 8x1024 --vocab 151936 --max-gib 20 \
        --out benchmarks/results/fused_memory_8x1024_cpu_float32.json
"""

from __future__ import annotations

import gc
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DTYPES,
    cpu_peak_bytes_in_subprocess,
    cuda_peak_bytes,
    interleaved_times,
    machine,
    package_version,
    parse,
    parser,
    peak_rss,
    reset_peak_rss,
    stats,
    sync,
    table,
    write,
)

from kdlab.losses import generalized_jsd  # noqa: E402
from kdlab.losses.fused import OutputLayer, fused_divergence  # noqa: E402

BETA = 0.5


def trl_loss():
    """TRL's chunked hidden-state JSD, or None when TRL (>= 1.x with DistillationTrainer) is absent."""
    try:
        from trl.trainer.distillation_trainer import _chunked_divergence_loss
    except ImportError:
        return None
    return _chunked_divergence_loss


def inputs(case: dict) -> dict:
    """Hidden states and output weights drawn in their own dtype; the student's are leaves that need a gradient."""
    g = torch.Generator(device=case["device"]).manual_seed(0)
    dtype, device = DTYPES[case["dtype"]], case["device"]
    n, hidden, vocab = case["batch"] * case["positions"], case["hidden"], case["vocab"]

    def draw(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(shape, generator=g, device=device, dtype=dtype).mul_(scale)

    # weights ~ 1/sqrt(H) and unit hidden states: logits of standard deviation ~1, as in a trained model's head
    return dict(hs=draw(n, hidden, scale=1.0).requires_grad_(),
                ws=draw(vocab, hidden, scale=hidden**-0.5).requires_grad_(),
                ht=draw(n, hidden, scale=1.0), wt=draw(vocab, hidden, scale=hidden**-0.5),
                mask=torch.ones(case["batch"], case["positions"], dtype=torch.bool, device=device))


def step(impl: str, t: dict, chunk_size: int | None) -> torch.Tensor:
    """One forward + backward of output layer + JSD(0.5), token mean over the scored positions."""
    t["hs"].grad = t["ws"].grad = None
    if impl == "fused":
        value = fused_divergence("jsd", t["hs"], OutputLayer(t["ws"]), t["ht"], OutputLayer(t["wt"]),
                                 t["mask"].reshape(-1), beta=BETA, chunk_size=chunk_size)
    elif impl == "logits":
        student = F.linear(t["hs"], t["ws"])
        with torch.no_grad():
            teacher = F.linear(t["ht"], t["wt"])
        value = generalized_jsd(student[None], teacher[None], t["mask"].reshape(1, -1), beta=BETA)
        del student, teacher
    else:
        b, p = t["mask"].shape
        value = trl_loss()(t["hs"].reshape(b, p, -1), t["ht"].reshape(b, p, -1), t["ws"], t["wt"], t["mask"],
                           BETA)[0]
    value.backward()
    return value.detach()


def memory_case(case: dict) -> None:
    """Child process: print the peak bytes one forward + backward adds above the inputs."""
    torch.set_num_threads(case["threads"])
    t = inputs(case)
    before = reset_peak_rss()
    step(case["impl"], t, case["chunk_size"])
    print(peak_rss() - before)


def logits_path_bytes(case: dict) -> int:
    """What the logits path holds at its peak on top of the inputs: both logits, their gradient, the weight's."""
    n = case["batch"] * case["positions"]
    return 4 * (3 * n * case["vocab"] + case["vocab"] * case["hidden"])


def memory(case: dict, impls: list[str], device: str) -> dict[str, int]:
    """Peak bytes of one forward + backward of each implementation above its inputs, each on fresh inputs."""
    peaks = {}
    for impl in impls:
        if device == "cuda":
            fresh = inputs(case)
            peaks[impl] = cuda_peak_bytes(partial(step, impl, fresh, case["chunk_size"]))
            del fresh
        else:
            peaks[impl] = cpu_peak_bytes_in_subprocess(__file__, dict(case, impl=impl))
        print(f"  {impl}: {peaks[impl] / 2**20:,.0f} MiB", flush=True)
    return peaks


def measure(case: dict, impls: list[str], args) -> dict:
    if args.memory_only:
        return dict(case, peak_bytes=memory(case, impls, args.device))
    t = inputs(case)
    values, grad_diff, fused_grads, first = {}, {}, None, {}
    for impl in impls:  # the checked pass is also the first interleaved timing round
        start = time.perf_counter()
        values[impl] = step(impl, t, args.chunk_size).item()
        sync(args.device)
        first[impl] = time.perf_counter() - start
        # the weight gradient's first 4,096 rows only: three full (V, H) copies would not fit at V = 262k, H = 2k
        grads = (t["hs"].grad, t["ws"].grad[:4096])
        fused_grads = fused_grads or tuple(g.clone() for g in grads)
        grad_diff[impl] = max((a - b).abs().max().item() for a, b in zip(grads, fused_grads))
    del fused_grads, grads
    result = dict(case, values=values, grad_max_abs_diff=grad_diff)
    result["value_max_abs_diff"] = max(abs(v - values["fused"]) for v in values.values())
    times = interleaved_times({impl: partial(step, impl, t, args.chunk_size) for impl in impls}, args.repeats,
                              args.device, warmup=0)
    result["times"] = {impl: stats([first[impl]] + times[impl]) for impl in impls}
    del t
    gc.collect()
    if not args.no_memory:
        result["peak_bytes"] = memory(case, impls, args.device)
    return result


def row(result: dict, impls: list[str]) -> dict:
    """One line of the table: milliseconds, MiB and the fused/other ratios."""
    timed = "times" in result  # not with --memory-only
    ms = {impl: 1e3 * result["times"][impl]["median_s"] if timed else None for impl in impls}
    mib = {impl: result.get("peak_bytes", {}).get(impl, 0) / 2**20 for impl in impls}
    line = {"V": result["vocab"], "H": result["hidden"], "B x T": f"{result['batch']}x{result['positions']}",
            "W grad MiB": 4 * result["vocab"] * result["hidden"] / 2**20}
    for impl in impls:
        line[f"{impl} ms"] = ms[impl]
    for impl in impls:
        line[f"{impl} MiB"] = mib[impl] if "peak_bytes" in result else None
    for other in impls[1:]:
        line[f"time fused/{other}"] = ms["fused"] / ms[other] if timed else None
        line[f"mem fused/{other}"] = mib["fused"] / mib[other] if "peak_bytes" in result and mib[other] else None
    line["|value diff|"] = result.get("value_max_abs_diff")
    return line


def main() -> None:
    p = parser(__doc__.splitlines()[0], "benchmarks/results/fused.json")
    p.add_argument("--vocab", type=int, nargs="+", default=[151936, 262144])
    p.add_argument("--hidden", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--sizes", nargs="+", default=["1x256"], help="batch x positions")
    p.add_argument("--max-gib", type=float, default=8.0, help="skip cases whose logits path needs more (estimate)")
    p.add_argument("--max-tflop", type=float, default=None,
                   help="skip cases whose four output-layer matmuls (forward of both models, two for the student's "
                        "backward) exceed this many TFLOP: the time a slow machine allows")
    p.add_argument("--chunk-size", type=int, default=None, help="fused rows per chunk (default: by element budget)")
    p.add_argument("--no-memory", action="store_true", help="time only")
    p.add_argument("--memory-only", action="store_true", help="peak memory only (no in-process check or timing)")
    p.add_argument("--no-trl", action="store_true")
    args = parse(p)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    impls = ["fused", "logits"] + ([] if args.no_trl or trl_loss() is None else ["trl"])
    rows, cases, skipped = [], [], []
    for size in args.sizes:  # every (V, H) at the smallest size first: on a slow machine the large ones may not end
        for vocab in args.vocab:
            for hidden in args.hidden:
                batch, positions = map(int, size.split("x"))
                case = dict(device=args.device, dtype=args.dtype, batch=batch, positions=positions, vocab=vocab,
                            hidden=hidden, chunk_size=args.chunk_size, threads=torch.get_num_threads())
                need = logits_path_bytes(case) + 4 * 2 * vocab * hidden  # and both weights
                if need > args.max_gib * 2**30:
                    skipped.append(f"V={vocab} H={hidden} {size}: the logits path needs ~{need / 2**30:.1f} GiB")
                    print("skip", skipped[-1], flush=True)
                    continue
                flop = 8 * batch * positions * hidden * vocab
                if args.max_tflop and flop > args.max_tflop * 1e12:
                    skipped.append(f"V={vocab} H={hidden} {size}: {flop / 1e12:.1f} TFLOP per call, over --max-tflop")
                    print("skip", skipped[-1], flush=True)
                    continue
                result = measure(case, impls, args)
                cases.append(result)
                rows.append(row(result, impls))
                print(table(rows[-1:], list(rows[-1])).splitlines()[-1], flush=True)
                save(args, impls, skipped, cases, rows)  # after every case: a run cut short keeps what it measured
    save(args, impls, skipped, cases, rows)
    print(table(rows, list(rows[0]) if rows else []))


def save(args, impls: list[str], skipped: list[str], cases: list[dict], rows: list[dict]) -> None:
    write(args.out, {"benchmark": "fused output layer + jsd", "machine": machine(args.device), "args": vars(args),
                     "trl": package_version("trl"), "impls": impls, "skipped": skipped, "cases": cases,
                     "table": table(rows, list(rows[0]) if rows else [])})


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--memory-case":
        memory_case(json.loads(sys.argv[2]))
    else:
        main()
