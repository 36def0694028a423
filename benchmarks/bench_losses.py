"""Forward + backward of kdlab's fkl, rkl and jsd against the unchunked reference (TRL's generalized_jsd_loss).

    python benchmarks/bench_losses.py --out benchmarks/results/losses_cpu_float32.json
    python benchmarks/bench_losses.py --device cuda --dtype bfloat16 --sizes 4x512 8x1024 \
        --out benchmarks/results/losses_cuda_bfloat16.json

For each vocabulary, batch x positions and loss: the value and the student-logit gradient of both (max abs
difference), the median time of forward + backward measured interleaved, and the peak memory that forward + backward
adds on top of the inputs (CUDA: the caching allocator's peak; CPU: ru_maxrss in a fresh process per case). The
student logits are a leaf that needs a gradient; the teacher's do not (a frozen teacher). The mask scores every
position unless --scored-fraction is below 1 (then each row's response is a random-length prefix).
"""

from __future__ import annotations

import gc
import json
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DTYPES,
    cpu_peak_bytes_in_subprocess,
    cuda_peak_bytes,
    interleaved_times,
    machine,
    parse,
    parser,
    peak_rss,
    reset_peak_rss,
    stats,
    table,
    write,
)
from reference import trl_generalized_jsd, unchunked_generalized_jsd  # noqa: E402

from kdlab.losses import forward_kl, generalized_jsd, reverse_kl  # noqa: E402

LOSSES = {"fkl": 0.0, "rkl": 1.0, "jsd": 0.5}  # as TRL's beta: 0 is forward KL, 1 reverse KL
KDLAB = {"fkl": forward_kl, "rkl": reverse_kl, "jsd": lambda s, t, m, **kw: generalized_jsd(s, t, m, beta=0.5, **kw)}


def inputs(case: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits drawn in their own dtype (no float32 transient that would inflate the memory baseline)."""
    g = torch.Generator(device=case["device"]).manual_seed(0)
    shape = (case["batch"], case["positions"], case["vocab"])
    dtype = DTYPES[case["dtype"]]
    student = torch.randn(shape, generator=g, device=case["device"], dtype=dtype).mul_(3).requires_grad_()
    teacher = torch.randn(shape, generator=g, device=case["device"], dtype=dtype).mul_(3)
    lengths = torch.randint(max(1, int(case["scored_fraction"] * shape[1])), shape[1] + 1, (shape[0],), generator=g,
                            device=case["device"])
    mask = torch.arange(shape[1], device=case["device"])[None, :] < lengths[:, None]
    return student, teacher, mask


def step(impl: str, loss: str, student, teacher, mask, chunk_size: int) -> torch.Tensor:
    student.grad = None
    if impl == "kdlab":
        value = KDLAB[loss](student, teacher, mask, chunk_size=chunk_size)
    else:
        value = unchunked_generalized_jsd(student, teacher, mask, beta=LOSSES[loss])
    value.backward()
    return value.detach()


def memory_case(case: dict) -> None:
    """Child process: print the peak bytes one forward + backward adds above the inputs."""
    torch.set_num_threads(case["threads"])
    student, teacher, mask = inputs(case)
    before = reset_peak_rss()
    step(case["impl"], case["loss"], student, teacher, mask, case["chunk_size"])
    print(peak_rss() - before)


def measure(case: dict, args) -> dict:
    """Values, gradient agreement and interleaved times in this process; peak memory per implementation."""
    student, teacher, mask = inputs(case)
    ours = step("kdlab", case["loss"], student, teacher, mask, args.chunk_size)
    our_grad = student.grad.clone()
    ref = step("reference", case["loss"], student, teacher, mask, args.chunk_size)
    grad_diff = (student.grad.float() - our_grad.float()).abs().max().item()
    del our_grad
    calls = {impl: partial(step, impl, case["loss"], student, teacher, mask, args.chunk_size)
             for impl in ("kdlab", "reference")}
    times = interleaved_times(calls, args.repeats, args.device, warmup=0)
    result = dict(case, kdlab_value=ours.item(), reference_value=ref.item(),
                  value_abs_diff=abs(ours.item() - ref.item()), grad_max_abs_diff=grad_diff,
                  kdlab_time=stats(times["kdlab"]), reference_time=stats(times["reference"]))
    check = case["first_size"] and not args.no_trl_check
    trl = trl_generalized_jsd(student.detach(), teacher, mask, LOSSES[case["loss"]]) if check else None
    result["trl_value_abs_diff"] = None if trl is None else abs(trl.item() - ref.item())
    del student, teacher, mask, calls
    gc.collect()
    if not args.no_memory:
        for impl in ("kdlab", "reference"):
            if args.device == "cuda":
                fresh = inputs(case)
                result[f"{impl}_peak_bytes"] = cuda_peak_bytes(partial(step, impl, case["loss"], *fresh,
                                                                       args.chunk_size))
                del fresh
            else:
                result[f"{impl}_peak_bytes"] = cpu_peak_bytes_in_subprocess(__file__, dict(case, impl=impl))
        result["memory_ratio"] = result["kdlab_peak_bytes"] / max(result["reference_peak_bytes"], 1)
    return result


def main() -> None:
    p = parser(__doc__.splitlines()[0], "benchmarks/results/losses.json")
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 128000])
    p.add_argument("--sizes", nargs="+", default=["2x128", "4x256", "8x256"], help="batch x positions")
    p.add_argument("--max-elements", type=float, default=1.4e8,
                   help="skip cases with more logits than this (the reference needs ~10 float32 copies)")
    p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    p.add_argument("--chunk-size", type=int, default=1024, help="kdlab's chunk_size (the loss configs' default)")
    p.add_argument("--scored-fraction", type=float, default=1.0)
    p.add_argument("--no-memory", action="store_true", help="time only")
    p.add_argument("--no-trl-check", action="store_true", help="skip checking the reference against TRL's function")
    args = parse(p)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False

    rows, cases = [], []
    for vocab in args.vocab:
        for size in args.sizes:
            batch, positions = map(int, size.split("x"))
            if batch * positions * vocab > args.max_elements:
                print(f"skip V={vocab} {size}: over --max-elements")
                continue
            for loss in args.losses:
                case = dict(device=args.device, dtype=args.dtype, batch=batch, positions=positions, vocab=vocab,
                            loss=loss, chunk_size=args.chunk_size, scored_fraction=args.scored_fraction,
                            threads=torch.get_num_threads(), first_size=size == args.sizes[0])
                result = measure(case, args)
                result["time_ratio"] = result["kdlab_time"]["median_s"] / result["reference_time"]["median_s"]
                cases.append(result)
                rows.append({
                    "V": vocab, "B x T": size, "loss": loss,
                    "kdlab ms": 1e3 * result["kdlab_time"]["median_s"],
                    "ref ms": 1e3 * result["reference_time"]["median_s"],
                    "time kdlab/ref": result["time_ratio"],
                    "kdlab MiB": result.get("kdlab_peak_bytes", 0) / 2**20 if not args.no_memory else None,
                    "ref MiB": result.get("reference_peak_bytes", 0) / 2**20 if not args.no_memory else None,
                    "mem kdlab/ref": result.get("memory_ratio"),
                    "|value diff|": result["value_abs_diff"],
                })
                print(table(rows[-1:], list(rows[-1])).splitlines()[-1], flush=True)

    columns = list(rows[0]) if rows else []
    print(table(rows, columns))
    memory_method = ("torch.cuda.max_memory_allocated above the inputs" if args.device == "cuda" else
                     "peak RSS (VmHWM, reset before the case) above the RSS before it, one forward+backward, "
                     "fresh process per case")
    write(args.out, {"benchmark": "losses", "machine": machine(args.device), "args": vars(args),
                     "memory_method": memory_method, "cases": cases, "table": table(rows, columns)})


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--memory-case":
        memory_case(json.loads(sys.argv[2]))
    else:
        main()
