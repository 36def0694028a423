"""Where a task's examples come from: a Hugging Face hub dataset by default, or local files (`task.data.path`).

A local folder holds one file per split, named after the split: `train.jsonl`, `validation.csv`, ... (JSONL, JSON,
CSV or Parquet, with the hub dataset's fields). A split may also name a file directly (`task.data.splits.train=
my_train.parquet`). `validation` also finds `dev`, `valid` or `val` files, as the original releases of many datasets
(DialogSum among them) name it.

Hub loading goes through `datasets.load_dataset`; when the hub cannot be reached it runs offline, so a cached copy
still loads and a missing one fails at start-up with `DataUnavailableError`, whose message says how to use local files.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from kdlab.data.files import FORMATS, read_records

SPLIT_ALIASES = {"validation": ("validation", "dev", "valid", "val"), "test": ("test",), "train": ("train",)}


class DataUnavailableError(RuntimeError):
    """A task's data can be found neither on disk nor on the hub; the message says how to point at local files."""


@dataclass(frozen=True)
class DataSpec:
    """`task.data`: the hub dataset (`hub`, `config`, `revision`) or a local folder (`path`, which wins).

    `splits` maps kdlab's splits (train, validation) to the dataset's split names or file names; a validation split
    of `null` holds out `task.val_size` training examples instead. `rename` maps source fields to the task's field
    names where a file names them differently (DialogSum's original test file has `summary1` for `summary`).
    """

    hub: str | None = None
    config: str | None = None
    revision: str | None = None
    path: str | None = None
    splits: Mapping[str, str | None] = field(default_factory=lambda: {"train": "train", "validation": "validation"})
    rename: Mapping[str, str] = field(default_factory=dict)


DATA_FIELDS = tuple(DataSpec.__dataclass_fields__)


def split_file(folder: Path, split: str) -> Path:
    """The file holding `split` in `folder`; raises DataUnavailableError listing what the folder holds."""
    direct = folder / split
    if direct.suffix.lower() in FORMATS and direct.is_file():
        return direct
    for stem in SPLIT_ALIASES.get(split, (split,)):
        for suffix in FORMATS:
            candidate = folder / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    present = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in FORMATS) if folder.is_dir() else []
    stems = "/".join(SPLIT_ALIASES.get(split, (split,)))
    raise DataUnavailableError(
        f"no file for split '{split}' in {folder}: expected {stems} with one of {', '.join(FORMATS)}; "
        f"data files there: {', '.join(present) or 'none'}. Name the file with task.data.splits.<split>=<file name>."
    )


def load_split(spec: DataSpec, split: str, fields_hint: str = "") -> tuple[list[dict], Counter]:
    """(records, dropped-by-reason) of one split, from `spec.path` when set, else from the hub."""
    if spec.path:
        folder = Path(spec.path).expanduser()
        if not folder.exists():
            # relative paths resolve against the directory train.py was started from: show where that led
            raise DataUnavailableError(f"task.data.path={spec.path} does not exist (looked for "
                                       f"{folder.resolve()}); point it at the folder holding the split files")
        if folder.is_file():
            raise DataUnavailableError(
                f"task.data.path={spec.path} is a file; point it at the folder that holds one file per split "
                f"(e.g. train.jsonl and validation.jsonl)"
            )
        records, dropped = read_records(split_file(folder, split))
    elif spec.hub:
        records, dropped = _load_hub(spec, split, fields_hint), Counter()
    else:
        raise DataUnavailableError("the task names no data: set task.data.hub or task.data.path")
    if spec.rename:
        records = [_renamed(r, spec.rename) for r in records]
    return records, dropped


def _renamed(record: dict, rename: Mapping[str, str]) -> dict:
    out = dict(record)
    for source, target in rename.items():
        if source in out and target not in out:
            out[target] = out.pop(source)
    return out


def _load_hub(spec: DataSpec, split: str, fields_hint: str) -> list[dict]:
    import datasets

    from kdlab.models.hub import offline_unless_reachable

    name = spec.hub + (f" ({spec.config})" if spec.config else "")
    with offline_unless_reachable() as reachable:
        try:
            dataset = datasets.load_dataset(spec.hub, spec.config, split=split, revision=spec.revision)
        except Exception as err:  # datasets raises many types here (ConnectionError, FileNotFoundError, ValueError)
            reason = "the hub cannot be reached and no cached copy exists" if not reachable else str(err).split("\n")[0]
            raise DataUnavailableError(
                f"could not load split '{split}' of hub dataset {name}: {reason} ({type(err).__name__}). "
                f"Use local files instead: task.data.path=/folder/holding/train.jsonl,validation.jsonl "
                f"(JSONL, JSON, CSV or Parquet{fields_hint}), or set HF_HOME to a cache that holds the dataset."
            ) from None
    return list(dataset)


def data_spec_errors(data: Mapping[str, Any] | None) -> list[str]:
    """Problems with a `task.data` node that can be seen without reading anything."""
    errors = []
    for key in data or {}:
        if key not in DATA_FIELDS:
            errors.append(f"task.data.{key} is not a data field; known: {', '.join(DATA_FIELDS)}")
    if data is not None and not data.get("hub") and not data.get("path"):
        errors.append("task.data names neither `hub` nor `path`; set task.data.path=/folder/with/split/files")
    splits = (data or {}).get("splits") or {}
    for key in splits:
        if key not in ("train", "validation"):
            errors.append(f"task.data.splits.{key}: only train and validation are read; e.g. task.data.splits."
                          f"validation={key} evaluates on the {key} split")
    if data is not None and not splits.get("train", "train"):
        errors.append("task.data.splits.train must name a split")
    return errors
