"""What happened to the data on its way in: examples read, kept, dropped (by reason) and truncated, per split.

Nothing is dropped or cut silently: the report is printed at start-up, logged, and stored in `results.json` and
`data_report.json` of the run directory.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SplitReport:
    read: int = 0
    dropped: Counter = field(default_factory=Counter)
    truncated: Counter = field(default_factory=Counter)

    @property
    def used(self) -> int:
        """Examples in the split as trained on or evaluated: read minus every drop (caps and samples included)."""
        return self.read - sum(self.dropped.values())


class DataReport:
    """Per-split counts; `dropped` and `truncated` are keyed by reason ("empty summary", "too long", "not_utf8").

    Examples set aside on purpose (held out for validation, few-shot exemplars, beyond `train_size` or
    `eval_examples`) count as drops too, with their own reasons, so `used = read - dropped` always holds.
    """

    def __init__(self) -> None:
        self.splits: dict[str, SplitReport] = {}

    def _split(self, split: str) -> SplitReport:
        return self.splits.setdefault(split, SplitReport())

    def record_read(self, split: str, read: int, dropped: Counter) -> None:
        report = self._split(split)
        report.read += read
        report.dropped.update(dropped)

    def record_drop(self, split: str, reason: str, count: int = 1) -> None:
        self._split(split).dropped[reason] += count

    def record_truncation(self, split: str, reason: str, count: int = 1) -> None:
        self._split(split).truncated[reason] += count

    def describe_drops(self, split: str) -> str:
        dropped = self._split(split).dropped
        return ", ".join(f"{reason}: {n}" for reason, n in sorted(dropped.items())) or "none dropped"

    def to_dict(self) -> dict[str, Any]:
        return {
            name: {"read": r.read, "used": r.used, "dropped": dict(r.dropped), "truncated": dict(r.truncated)}
            for name, r in self.splits.items()
        }

    def summary(self) -> str:
        """One line per split, e.g. `train: 990 used of 1000 read; dropped empty summary: 10; truncated prompt: 4`."""
        lines = []
        for name, r in self.splits.items():
            line = f"{name}: {r.used} used of {r.read} read"
            if r.dropped:
                line += f"; dropped {self.describe_drops(name)}"
            if r.truncated:
                line += "; truncated " + ", ".join(f"{k}: {n}" for k, n in sorted(r.truncated.items()))
            lines.append(line)
        return "\n".join(lines)
