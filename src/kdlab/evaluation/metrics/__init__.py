"""Metrics shipped with kdlab as `evaluate` modules, one folder each (`<name>/<name>.py`), loaded by local path.

`load_metric("gsm8k_accuracy")` is `evaluate.load(<this folder>/gsm8k_accuracy, keep_in_memory=True)`: evaluate
copies the script into its modules cache (`$HF_HOME/modules/evaluate_modules`) and imports it from there.

Offline: evaluate resolves a path to an existing local script before anything else, and that branch makes no
network request at all (checked with sockets and DNS blocked and no HF_*_OFFLINE variable set), so this function
sets no offline variable and changes nothing in the environment. `keep_in_memory=True` keeps the predictions of a
`compute` call in memory instead of arrow files under `$HF_HOME/metrics`, so concurrent processes (DDP ranks, test
workers) never contend for the same cache file. Most of the cost of a first call is `import evaluate` (it pulls in
`datasets` and pandas, about 3 s); `evaluate.load` itself takes milliseconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import evaluate

__all__ = ["METRICS_DIR", "available_metrics", "load_metric"]

METRICS_DIR = Path(__file__).parent


def available_metrics() -> list[str]:
    """Names of the metric folders shipped here (folders holding a script of the same name)."""
    return sorted(p.name for p in METRICS_DIR.iterdir() if p.is_dir() and (p / f"{p.name}.py").is_file())


def load_metric(name: str) -> "evaluate.EvaluationModule":
    """The `evaluate` module of the metric `name` shipped in `kdlab/evaluation/metrics/<name>/` (no network involved).

    Raises ValueError, listing the shipped metrics, when there is no folder `name` with a script `name.py`.
    """
    names = available_metrics()
    if name not in names:
        raise ValueError(f"unknown metric {name!r}; metrics shipped in {METRICS_DIR}: {', '.join(names) or 'none'}")
    import evaluate  # imported here: it pulls in `datasets` and pandas, which most of kdlab never needs

    return evaluate.load(str(METRICS_DIR / name), keep_in_memory=True)
