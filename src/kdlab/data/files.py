"""Read examples from local JSONL, JSON, CSV or Parquet files without letting one bad record stop a run.

Rules (counted by reason, never silent):
- a JSONL line that is not valid UTF-8 is dropped as `not_utf8`; one that is not a JSON object as `malformed`;
- in JSON and CSV files, decoded leniently, a record holding text that was not valid UTF-8 is dropped as `not_utf8`;
- blank lines are ignored (not counted: they are not records).
Column names with dots (`translation.de` in a CSV) become nested fields (`{"translation": {"de": ...}}`), so a flat
file can hold the same fields as a hub dataset with nested records.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path
from typing import Any

FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def read_records(path: Path) -> tuple[list[dict], Counter]:
    """(records, dropped) from one file; `dropped` counts records left out, keyed by reason."""
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(FORMATS)}")
    dropped: Counter = Counter()
    if kind == "jsonl":
        records = _read_jsonl(path.read_bytes(), dropped)
    elif kind == "json":
        records = _read_json(path, dropped)
    elif kind == "csv":
        with path.open(newline="", encoding="utf-8", errors="surrogateescape") as f:
            records = [dict(row) for row in csv.DictReader(f)]
    else:
        import pyarrow.parquet as pq

        records = pq.read_table(path).to_pylist()
    kept = []
    for record in records:
        if _has_bad_text(record):
            dropped["not_utf8"] += 1
        else:
            kept.append(_unflatten(record))
    return kept, dropped


def _read_jsonl(data: bytes, dropped: Counter) -> list[dict]:
    records = []
    for raw in data.splitlines():
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            dropped["not_utf8"] += 1
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped["malformed"] += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            dropped["malformed"] += 1
    return records


def _read_json(path: Path, dropped: Counter) -> list[dict]:
    """A list of records, or an object holding one list of records (`{"data": [...]}`); JSON lines also accepted."""
    data = path.read_bytes()
    try:
        parsed = json.loads(data.decode("utf-8", errors="surrogateescape"))
    except json.JSONDecodeError:
        return _read_jsonl(data, dropped)  # `.json` files holding JSON lines, as `datasets` also accepts
    if isinstance(parsed, dict):
        lists = [v for v in parsed.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise ValueError(f"{path}: a JSON object must hold exactly one list of records; found {len(lists)}")
        parsed = lists[0]
    if not isinstance(parsed, list):
        raise ValueError(f"{path}: expected a list of records, got {type(parsed).__name__}")
    records = [r for r in parsed if isinstance(r, dict)]
    if len(records) < len(parsed):
        dropped["malformed"] += len(parsed) - len(records)
    return records


def _has_bad_text(value: Any) -> bool:
    """Lone surrogates are what undecodable bytes become under `surrogateescape` (and never valid text)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_bad_text(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_bad_text(v) for v in value)
    return False


def _unflatten(record: dict) -> dict:
    out: dict = {}
    for key, value in record.items():
        if isinstance(key, str) and "." in key:
            node = out
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        else:
            out[key] = value
    return out
