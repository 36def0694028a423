"""MultiLevelOT's Sinkhorn distance: kdlab's batched log-domain Sinkhorn against POT's (ot.batch) and a POT loop.

    python benchmarks/bench_sinkhorn.py --out benchmarks/results/sinkhorn_cpu_float32.json
    python benchmarks/bench_sinkhorn.py --device cuda --out benchmarks/results/sinkhorn_cuda.json

Part 1 (`sinkhorn`): the sequence-level term alone, from each side's top-k distributions (B, T, k) to a scalar:
cost = L1 distances between softmax(p~ / tau_SD) and softmax(q~ / tau_SD) (torch.cdist, the same for everyone), then
20 Sinkhorn iterations at epsilon 0.1, value <plan, cost> averaged over the batch, then backward to the student's
top-k values. Five solvers, all differentiated through the unrolled iterations (POT: grad="autodiff"):
kdlab.losses.cross_tokenizer.log_sinkhorn (which runs in the kernel domain here: costs are at most 2, so
exp(-C / 0.1) cannot underflow); POT batched, ot.batch.solve_batch, in the log domain (method="log_sinkhorn",
`pot_batch`) and in the kernel domain (method="sinkhorn", `pot_batch_kernel`); and ot.solve called once per
sequence, the loop a per-sample implementation runs, in each domain (method="sinkhorn_log", `pot_loop`;
method="sinkhorn", `pot_loop_kernel`). The grid grows positions,
k and the batch (to show the cost is linear in it). Part 2 (`multilevel_ot`): the whole loss from (B, T, V) logits,
kdlab only, time and peak memory as positions grow. Sinkhorn maths is float32 whatever --dtype says (the contract);
--dtype sets the logits' dtype in part 2. Without POT installed its columns are skipped with a note.
"""

from __future__ import annotations

import gc
import json
import sys
import warnings
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

from kdlab.losses.cross_tokenizer import log_sinkhorn, multilevel_ot  # noqa: E402

EPSILON, ITERATIONS, TAU_SD = 0.1, 20, 2.0
# POT's sides, each by its `method`: the log domain (logsumexp updates) and the kernel domain (u = a / K v,
# v = b / K^T u), batched (ot.batch.solve_batch) and once per sequence (ot.solve)
POT_BATCH = {"pot_batch": "log_sinkhorn", "pot_batch_kernel": "sinkhorn"}
POT_LOOP = {"pot_loop": "sinkhorn_log", "pot_loop_kernel": "sinkhorn"}

try:
    import ot
    import ot.batch
except ImportError:  # POT is a dev/bench extra: without it only kdlab's column is measured
    ot = None


def topk_inputs(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranked top-k probability vectors of both sides, as multilevel_ot builds them (descending, summing below 1)."""
    g = torch.Generator(device=case["device"]).manual_seed(0)
    shape = (case["batch"], case["positions"], case["k"])
    p = torch.rand(shape, generator=g, device=case["device"]).softmax(-1).sort(-1, descending=True).values
    q = torch.rand(shape, generator=g, device=case["device"]).softmax(-1).sort(-1, descending=True).values
    return p, q.requires_grad_()


def cost_matrix(p_top: torch.Tensor, q_top: torch.Tensor) -> torch.Tensor:
    return torch.cdist(torch.softmax(p_top / TAU_SD, -1), torch.softmax(q_top / TAU_SD, -1), p=1)


def sinkhorn_distance(impl: str, p_top: torch.Tensor, q_top: torch.Tensor) -> torch.Tensor:
    cost = cost_matrix(p_top, q_top)
    batch, n, m = cost.shape
    if impl == "kdlab":
        full_n = torch.ones(batch, n, dtype=torch.bool, device=cost.device)
        full_m = torch.ones(batch, m, dtype=torch.bool, device=cost.device)
        plan = log_sinkhorn(cost, full_n, full_m, EPSILON, ITERATIONS)
        return (plan * cost).sum(dim=(1, 2)).mean()
    if impl in POT_BATCH:
        result = ot.batch.solve_batch(cost, reg=EPSILON, max_iter=ITERATIONS, tol=0.0, method=POT_BATCH[impl],
                                      grad="autodiff")
        return result.value_linear.mean()
    if impl in POT_LOOP:
        values = [ot.solve(cost[b], reg=EPSILON, reg_type="entropy", method=POT_LOOP[impl], max_iter=ITERATIONS,
                           tol=0.0, grad="autodiff").value_linear for b in range(batch)]
        return torch.stack(values).mean()
    raise ValueError(impl)


def ot_inputs(case: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=case["device"]).manual_seed(0)
    dtype = DTYPES[case["dtype"]]
    shape = (case["batch"], case["positions"], case["vocab"])
    student = torch.randn(shape, generator=g, device=case["device"], dtype=dtype).mul_(3).requires_grad_()
    teacher = torch.randn(shape, generator=g, device=case["device"], dtype=dtype).mul_(3)
    mask = torch.ones(shape[:2], dtype=torch.bool, device=case["device"])
    return student, teacher, mask, mask.clone()


def run(case: dict, inputs: tuple) -> torch.Tensor:
    if case["part"] == "sinkhorn":
        p, q = inputs
        q.grad = None
        value = sinkhorn_distance(case["impl"], p, q)
    else:
        student, teacher, sm, tm = inputs
        student.grad = None
        terms = multilevel_ot(student, teacher, sm, tm, top_k=case["k"])
        value = terms["had"] + terms["sl"] + terms["sd"]
    value.backward()
    return value.detach()


def make_inputs(case: dict) -> tuple:
    return topk_inputs(case) if case["part"] == "sinkhorn" else ot_inputs(case)


def memory_case(case: dict) -> None:
    torch.set_num_threads(case["threads"])
    inputs = make_inputs(case)
    before = reset_peak_rss()
    run(case, inputs)
    print(peak_rss() - before)


def measure(case: dict, impls: list[str], repeats: int, memory: bool) -> dict:
    inputs = make_inputs(case)
    values = {impl: run(dict(case, impl=impl), inputs).item() for impl in impls}
    calls = {impl: partial(run, dict(case, impl=impl), inputs) for impl in impls}
    times = interleaved_times(calls, repeats, case["device"], warmup=0)
    result = dict(case, values=values, times={impl: stats(t) for impl, t in times.items()})
    del inputs, calls
    gc.collect()
    if memory:
        result["peak_bytes"] = {}
        for impl in impls:
            c = dict(case, impl=impl)
            if case["device"] == "cuda":
                inp = make_inputs(c)
                result["peak_bytes"][impl] = cuda_peak_bytes(partial(run, c, inp))
                del inp
            else:
                result["peak_bytes"][impl] = cpu_peak_bytes_in_subprocess(__file__, c)
    return result


def main() -> None:
    p = parser(__doc__.splitlines()[0], "benchmarks/results/sinkhorn.json")
    p.add_argument("--positions", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--k", type=int, nargs="+", default=[10, 50, 100], help="top-k values swept at --sweep-positions")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="swept at --sweep-positions, k 50")
    p.add_argument("--sweep-positions", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000, help="part 2: the whole multilevel_ot loss")
    p.add_argument("--ot-positions", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--ot-batch", type=int, default=4)
    p.add_argument("--parts", nargs="+", default=["sinkhorn", "multilevel_ot"], choices=["sinkhorn", "multilevel_ot"])
    p.add_argument("--no-memory", action="store_true")
    args = parse(p)
    warnings.filterwarnings("ignore")  # POT warns that 20 iterations did not converge: by design, as MultiLevelOT
    impls = ["kdlab"] + ([*POT_BATCH, *POT_LOOP] if ot is not None else [])
    base = dict(device=args.device, dtype=args.dtype, threads=torch.get_num_threads(), part="sinkhorn")

    grid = [dict(batch=8, positions=t, k=50) for t in args.positions]
    grid += [dict(batch=8, positions=args.sweep_positions, k=k) for k in args.k if k != 50]
    grid += [dict(batch=b, positions=args.sweep_positions, k=50) for b in args.batches if b != 8]
    grid = grid if "sinkhorn" in args.parts else []
    cases, rows = [], []
    for point in grid:
        result = measure(dict(base, **point), impls, args.repeats, not args.no_memory)
        cases.append(result)
        row = {"B": point["batch"], "T": point["positions"], "k": point["k"]}
        for impl in impls:
            row[f"{impl} ms"] = 1e3 * result["times"][impl]["median_s"]
        for impl in impls[1:]:
            row[f"{impl}/kdlab"] = result["times"][impl]["median_s"] / result["times"]["kdlab"]["median_s"]
        if "peak_bytes" in result:
            for impl in impls:
                row[f"{impl} MiB"] = result["peak_bytes"][impl] / 2**20
        row["max |value diff|"] = max(abs(v - result["values"]["kdlab"]) for v in result["values"].values())
        rows.append(row)
        print(table([row], list(row)).splitlines()[-1], flush=True)

    ot_rows = []
    for t in args.ot_positions if "multilevel_ot" in args.parts else []:
        case = dict(base, part="multilevel_ot", batch=args.ot_batch, positions=t, k=50, vocab=args.vocab)
        result = measure(case, ["kdlab"], args.repeats, not args.no_memory)
        cases.append(result)
        logits_bytes = args.ot_batch * t * args.vocab * 4
        row = {"B": args.ot_batch, "T": t, "V": args.vocab, "ms": 1e3 * result["times"]["kdlab"]["median_s"]}
        if "peak_bytes" in result:
            row["MiB"] = result["peak_bytes"]["kdlab"] / 2**20
            row["float32 logits copies"] = result["peak_bytes"]["kdlab"] / logits_bytes
        ot_rows.append(row)
        print(table([row], list(row)).splitlines()[-1], flush=True)

    sinkhorn_table = table(rows, list(rows[0])) if rows else ""
    ot_table = table(ot_rows, list(ot_rows[0])) if ot_rows else ""
    print(sinkhorn_table + "\n\n" + ot_table)
    write(args.out, {"benchmark": "sinkhorn", "machine": machine(args.device), "args": vars(args),
                     "pot": "absent: POT columns skipped" if ot is None else ot.__version__,
                     "memory_method": "torch.cuda.max_memory_allocated above the inputs" if args.device == "cuda"
                     else "peak RSS (VmHWM, reset before the case) above the RSS before it, fresh process per case",
                     "cases": cases, "sinkhorn_table": sinkhorn_table, "multilevel_ot_table": ot_table})


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--memory-case":
        memory_case(json.loads(sys.argv[2]))
    else:
        main()
