"""What every benchmark shares: arguments, side-by-side timing, peak memory, machine description, JSON and tables.

Comparisons are measured in one process, interleaved (A, B, A, B, ...) after a warm-up, so that a noisy shared
machine slows both sides alike; results are medians with the spread (min, max) and the ratio of medians.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parser(description: str, default_out: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="dtype of the logits (loss benchmarks) or of the models' matmuls (step benchmark)")
    p.add_argument("--out", default=default_out, help="where the JSON results go")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per case (after one warm-up)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's). On a CPU shared with other busy processes, 1 "
                        "avoids OpenMP threads waiting on each other (measured 15-50x slower sampling with 2 threads)")
    return p


def parse(p: argparse.ArgumentParser) -> argparse.Namespace:
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved_times(fns: dict[str, Callable[[], Any]], repeats: int, device: str, warmup: int = 1
                      ) -> dict[str, list[float]]:
    """Seconds per call of each fn, measured round-robin so that machine noise hits every contender alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def stats(times: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times)}


def cuda_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes allocated by the caching allocator during fn, above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> int:
    """Reset the process's resident-memory high-water mark (Linux: clear_refs 5); return the current RSS in bytes.

    Without the reset the peak would include import-time transients, which on a small case exceed the case itself."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmRSS") * 1024
    except OSError:  # not Linux, or not allowed: fall back to ru_maxrss, which only ever grows
        return peak_rss()


def peak_rss() -> int:
    try:
        return _status_kib("VmHWM") * 1024
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def case_in_subprocess(script: str, case: dict) -> str:
    """The last line `script --memory-case JSON` prints: one case run in a fresh process, so that freed memory kept
    by the allocator of an earlier case does not hide this one's peak."""
    out = subprocess.run([sys.executable, script, "--memory-case", json.dumps(case)], capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory case {case} failed:\n{out.stderr[-3000:]}")
    return out.stdout.strip().splitlines()[-1]


def cpu_peak_bytes_in_subprocess(script: str, case: dict) -> int:
    """Peak resident memory that one case adds, measured in a fresh process (`case_in_subprocess`).

    The child builds its inputs, resets the resident high-water mark, runs the case once and reads the mark; the
    difference from the resident size before is what the case itself needed at its peak."""
    return int(case_in_subprocess(script, case))


def package_version(name: str) -> str | None:
    try:
        return importlib.import_module(name).__version__
    except Exception:  # absent or broken: the column is skipped, and the JSON says so
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(device: str) -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": package_version("transformers"),
        "trl": package_version("trl"),
        "pot": package_version("ot"),
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def matmul_peak_flops(device: str, dtype: torch.dtype, n: int | None = None, repeats: int = 5) -> float:
    """Measured matmul throughput (FLOP/s) of an n x n x n product: the hardware limit MFU is measured against."""
    n = n or (8192 if device == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = interleaved_times({"mm": lambda: a @ b}, repeats, device, warmup=2)["mm"]
    return 2 * n**3 / min(times)  # the best run: the peak the machine can reach, not its average under load


def write(out: str, payload: dict[str, Any]) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A Markdown table (also what the scripts print), numbers rounded for reading."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return "-" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


# -- a random-init Qwen3-shaped student of a chosen size (bench_activation_checkpointing, bench_lora) --------------
ARITH_TOKENIZER = Path(__file__).resolve().parents[1] / "src/kdlab/assets/arith/tokenizer"
MODEL_SIZE_KEYS = ("layers", "width", "heads", "kv_heads", "head_dim", "intermediate", "vocab")


def add_model_size_args(p: argparse.ArgumentParser, *, layers: int, width: int, heads: int, kv_heads: int,
                        head_dim: int, intermediate: int, vocab: int = 32768) -> None:
    """--sizes (batch x positions) and the student's shape, with this benchmark's defaults."""
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--width", type=int, default=width)
    p.add_argument("--heads", type=int, default=heads)
    p.add_argument("--kv-heads", type=int, default=kv_heads)
    p.add_argument("--head-dim", type=int, default=head_dim)
    p.add_argument("--intermediate", type=int, default=intermediate)
    p.add_argument("--vocab", type=int, default=vocab, help="output rows (the tokenizer's 746, padded)")


def sized_cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One case per --sizes entry: batch, positions and the model's shape (MODEL_SIZE_KEYS) from the arguments."""
    cases = []
    for size in args.sizes:
        batch, positions = (int(x) for x in size.split("x"))
        cases.append(dict(batch=batch, positions=positions, **{key: getattr(args, key) for key in MODEL_SIZE_KEYS}))
    return cases


def sized_student(case: dict[str, Any], dtype: str = "float32", **model_keys: Any):
    """(a random-init Qwen3 student of the case's shape, seeded, in train mode; a batch of (prompt ids, mask, target
    ids, mask): 3/4 prompt, 1/4 target, no padding). `model_keys` go to the model's config node
    (`gradient_checkpointing`, `lora`)."""
    from kdlab.models.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer({"tokenizer": str(ARITH_TOKENIZER)})
    config = dict(hidden_size=case["width"], intermediate_size=case["intermediate"], num_hidden_layers=case["layers"],
                  num_attention_heads=case["heads"], num_key_value_heads=case["kv_heads"], head_dim=case["head_dim"],
                  vocab_size=case["vocab"], max_position_embeddings=max(4096, case["positions"]),
                  tie_word_embeddings=True)
    torch.manual_seed(0)
    model = load_model({"name": "bench-qwen3", "architecture": "qwen3", "config": config, "dtype": dtype,
                        **model_keys}, tokenizer).train()
    generator = torch.Generator().manual_seed(1)
    prompt_len = case["positions"] * 3 // 4
    ids = torch.randint(3, len(tokenizer), (case["batch"], case["positions"]), generator=generator)
    mask = torch.ones_like(ids, dtype=torch.bool)
    return model, (ids[:, :prompt_len], mask[:, :prompt_len], ids[:, prompt_len:], mask[:, prompt_len:])
