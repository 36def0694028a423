"""Plots for docs/benchmarks.md from the JSON results (matplotlib, from the `bench` extra).

    python benchmarks/plot.py --sinkhorn benchmarks/results/sinkhorn_cpu_float32.json \
        --losses benchmarks/results/losses_cpu_float32.json --out-dir docs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def sinkhorn_plot(result: dict, out: Path) -> None:
    cases = [c for c in result["cases"] if c["part"] == "sinkhorn"]
    solvers = list(cases[0]["times"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    by_positions = sorted((c for c in cases if c["batch"] == 8 and c["k"] == 50), key=lambda c: c["positions"])
    by_batch = sorted((c for c in cases if c["positions"] == 256 and c["k"] == 50), key=lambda c: c["batch"])
    for solver in solvers:
        left.plot([c["positions"] for c in by_positions], [1e3 * c["times"][solver]["median_s"] for c in by_positions],
                  marker="o", label=solver)
        right.plot([c["batch"] for c in by_batch], [1e3 * c["times"][solver]["median_s"] for c in by_batch],
                   marker="o", label=solver)
    left.set(xscale="log", yscale="log", xlabel="positions (teacher = student)", ylabel="forward + backward, ms",
             title="batch 8, k 50")
    right.set(xlabel="batch", ylabel="forward + backward, ms", title="256 positions, k 50")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Sinkhorn distance, 20 iterations ({result['machine']['cpu']}, {result['args']['device']})")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def losses_plot(result: dict, out: Path) -> None:
    cases = [c for c in result["cases"] if "kdlab_peak_bytes" in c]
    losses = sorted({c["loss"] for c in cases})
    fig, axes = plt.subplots(1, len(losses), figsize=(4 * len(losses), 3.8), sharey=True)
    for ax, loss in zip(axes, losses):
        for vocab, marker in zip(sorted({c["vocab"] for c in cases}), "os^"):
            points = sorted((c for c in cases if c["loss"] == loss and c["vocab"] == vocab),
                            key=lambda c: c["batch"] * c["positions"])
            rows = [c["batch"] * c["positions"] for c in points]
            ax.plot(rows, [c["reference_peak_bytes"] / 2**20 for c in points], marker=marker, linestyle="--",
                    label=f"unchunked reference, V={vocab // 1000}k")
            ax.plot(rows, [c["kdlab_peak_bytes"] / 2**20 for c in points], marker=marker,
                    label=f"kdlab, V={vocab // 1000}k")
        ax.set(xscale="log", yscale="log", xlabel="rows (batch x positions)", title=loss)
        sizes = sorted({c["batch"] * c["positions"] for c in cases})
        ax.set_xticks(sizes, [str(n) for n in sizes])  # the measured sizes, not log-scale minor labels
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("peak memory of forward + backward, MiB")
    axes[-1].legend(fontsize=7)
    fig.suptitle(f"Loss memory above the inputs ({result['args']['dtype']} logits, {result['args']['device']})")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sinkhorn", help="bench_sinkhorn.py JSON")
    p.add_argument("--losses", help="bench_losses.py JSON")
    p.add_argument("--out-dir", default="docs")
    args = p.parse_args()
    out = Path(args.out_dir)
    if args.sinkhorn:
        sinkhorn_plot(json.loads(Path(args.sinkhorn).read_text()), out / "benchmarks_sinkhorn.png")
    if args.losses:
        losses_plot(json.loads(Path(args.losses).read_text()), out / "benchmarks_losses.png")


if __name__ == "__main__":
    main()
