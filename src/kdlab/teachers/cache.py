"""`kdlab-cache-teacher`: the teacher's top-k log-probabilities over the training targets, written once to disk.

    kdlab-cache-teacher teacher=arith_teacher cache.dir=<dir> cache.top_k=32 [task=... student=...]
    kdlab-cache-teacher ... cache.shard_index=1 cache.shard_count=4        # one of four processes
    kdlab-cache-teacher ... cache.targets=teacher [policy.sampling.temperature=...]   # SeqKD: the teacher's samples

Composed from the same `conf/` as `train.py`, so the cached targets are the run's own: the training split of
`task`, tokenized by the student's tokenizer exactly as the training batches are (kdlab.data.datamodule). With
`cache.targets=ground_truth` the targets are the task's; with `cache.targets=teacher` (SeqKD) each example's target is
the teacher's sample from its prompt under the run's `policy.sampling`, drawn from a generator seeded by
(cache.seed or the run's seed, the batch's first example), so a rewrite or a resume draws the same tokens. The teacher
scores each target with `kdlab.models.loading.score_targets`; for every target token it stores

    topk_logprobs (k, cache.dtype)   topk_ids (k, int32)   tail_logmass (cache.dtype): log(1 - sum of the top-k)

Layout (columnar, memory-mapped by the reader, little-endian, rows in example order):

    <dir>/manifest.json                        format, teacher/tokenizer/task/data fingerprints, top_k, dtype, shards
    <dir>/shard-00000-of-00002/{topk_logprobs,topk_ids,tail_logmass}.bin   (rows, k) (rows, k) (rows,)
    <dir>/shard-00000-of-00002/lengths.bin     int64 per example: its number of target tokens (rows)
    <dir>/shard-00000-of-00002/target_ids.bin  int32 per row: the sampled target token (cache.targets=teacher only)
    <dir>/shard-00000-of-00002/progress.json   examples and rows written and flushed so far

Shard i of n holds examples [i N / n, (i + 1) N / n). After every batch the columns are flushed and then
progress.json is replaced, so an interrupted writer resumes where the last progress says, cutting whatever the
interruption left past it: the files come out byte-identical to an uninterrupted run. bfloat16 is stored as its raw
16 bits (numpy has no bfloat16); the reader returns float32 tensors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdlab.losses.sparse import top_k_of_logits
from kdlab.sampling.hf import SamplingSettings, generate_targets

FORMAT = "kdlab-teacher-cache/1"
# the manifest's "targets": the task's own, or the teacher's samples (then a mapping naming how they were drawn)
GROUND_TRUTH, TEACHER_SAMPLES = "ground_truth", "teacher_samples"
TARGET_CHOICES = {"ground_truth": GROUND_TRUTH, "teacher": TEACHER_SAMPLES}  # cache.targets -> manifest
STORAGE = {"float32": (torch.float32, np.float32), "float16": (torch.float16, np.float16),
           "bfloat16": (torch.bfloat16, np.uint16)}  # bfloat16: raw bits in a uint16 column
# the manifest keys a run is compared on, in the order differences are reported
MATCHED_KEYS = ("format", "teacher", "tokenizer", "task", "data", "targets", "examples", "top_k", "dtype",
                "shard_count")


class CacheError(RuntimeError):
    """A cache that cannot be written or read as asked; the message names the difference and the fix."""


def shard_dir(directory: Path, index: int, count: int) -> Path:
    return Path(directory) / f"shard-{index:05d}-of-{count:05d}"


def shard_range(index: int, count: int, examples: int) -> range:
    """Contiguous examples of shard `index`: concatenating shards 0..count-1 gives 0..examples-1 in order."""
    return range(index * examples // count, (index + 1) * examples // count)


def check_cache_matches(manifest: Mapping[str, Any], expected: Mapping[str, Any]) -> str | None:
    """One message naming the first difference between a cache's manifest and what this run expects, or None.

    Only keys present in `expected` are compared: a run reading the cache cannot fingerprint a teacher it does not
    load, and then compares tokenizer, task settings, data and k.
    """
    from kdlab.teachers.fingerprint import settings_difference

    for key in MATCHED_KEYS:
        if key not in expected:
            continue
        cached, wanted = manifest.get(key), expected[key]
        if key == "task" and isinstance(cached, Mapping) and isinstance(wanted, Mapping):
            difference = settings_difference(cached, wanted, "task")
        elif key == "teacher" and isinstance(cached, Mapping) and isinstance(wanted, Mapping):
            difference = settings_difference(cached, wanted, "teacher")
        elif key == "targets":
            difference = targets_difference(cached, wanted)
        else:
            difference = None if cached == wanted else f"{key} is {cached!r} in the cache, {wanted!r} in this run"
        if difference:
            return f"the teacher cache does not match this run: {difference}"
    return None


def _targets_source(targets: Any) -> Any:
    return targets.get("source") if isinstance(targets, Mapping) else targets


def targets_difference(cached: Any, wanted: Any) -> str | None:
    """The first difference between two manifests' `targets`: ground truth against samples, then the sampling
    settings, then (when `wanted` names them: the writer, not a training run) the seed and batch size the samples
    were drawn with. A training run compares what changes the distribution of its targets, not which draw it got."""
    described = {GROUND_TRUTH: "the ground truth (cache.targets=ground_truth)",
                 TEACHER_SAMPLES: "the teacher's samples (cache.targets=teacher)"}
    if _targets_source(cached) != _targets_source(wanted):
        what = [described.get(_targets_source(t), repr(t)) for t in (cached, wanted)]
        return f"targets are {what[0]} in the cache, {what[1]} in this run"
    if not isinstance(wanted, Mapping):
        return None
    from kdlab.teachers.fingerprint import settings_difference

    difference = settings_difference(cached.get("sampling", {}), wanted["sampling"], "policy.sampling")
    for key in ("seed", "batch_size"):
        if difference is None and key in wanted and cached.get(key) != wanted[key]:
            difference = (f"cache.{key} is {cached.get(key)!r} in the cache, {wanted[key]!r} in this run (the "
                          f"samples depend on it)")
    return difference


def sampled_targets(sampling: Mapping[str, Any], seed: int | None = None,
                    batch_size: int | None = None) -> dict[str, Any]:
    """The manifest's `targets` for teacher samples: the sampling settings that decide which tokens can be drawn
    (as plain typed values, so `temperature=1` and `1.0` agree; `compile` draws the same tokens and is left out), and
    for the writer the seed and batch size that fix which draw it is."""
    settings = SamplingSettings(**dict(sampling))
    out: dict[str, Any] = {"source": TEACHER_SAMPLES, "sampling": {
        "max_new_tokens": int(settings.max_new_tokens), "do_sample": bool(settings.do_sample),
        "temperature": float(settings.temperature), "top_p": float(settings.top_p), "top_k": int(settings.top_k),
        "num_beams": int(settings.num_beams)}}
    if seed is not None:
        out["seed"] = int(seed)
    if batch_size is not None:
        out["batch_size"] = int(batch_size)
    return out


@dataclass
class ShardProgress:
    examples: int = 0
    rows: int = 0


class ShardWriter:
    """Appends batches of rows to one shard's column files; `resume` first cuts them back to the last progress.
    With `samples`, each row also keeps its target token (the teacher's sample, which training cannot re-derive)."""

    def __init__(self, directory: Path, top_k: int, dtype: str, samples: bool = False):
        self.directory, self.k, self.samples = Path(directory), top_k, samples
        self.torch_dtype, self.np_dtype = STORAGE[dtype]
        self.directory.mkdir(parents=True, exist_ok=True)
        self.progress = self._read_progress()
        item = np.dtype(self.np_dtype).itemsize
        self.row_bytes = {"topk_logprobs.bin": top_k * item, "topk_ids.bin": top_k * 4, "tail_logmass.bin": item}
        if samples:
            self.row_bytes["target_ids.bin"] = 4
        self._cut_to_progress()

    def _read_progress(self) -> ShardProgress:
        path = self.directory / "progress.json"
        return ShardProgress(**json.loads(path.read_text())) if path.exists() else ShardProgress()

    def _cut_to_progress(self) -> None:
        """Drop bytes past the last recorded progress (a batch the interruption left half written)."""
        sizes = {name: self.progress.rows * size for name, size in self.row_bytes.items()}
        sizes["lengths.bin"] = self.progress.examples * 8
        for name, size in sizes.items():
            path = self.directory / name
            with open(path, "ab") as f:  # creates the file when missing
                if f.tell() < size:
                    raise CacheError(f"{path} is shorter than its progress.json says: the shard is damaged; "
                                     f"delete {self.directory} and write it again")
                f.truncate(size)

    def append(self, logprobs: Tensor, ids: Tensor, tail: Tensor, lengths: Sequence[int],
               targets: Tensor | None = None) -> None:
        """Rows of a batch of examples (rows in example order), flushed to disk before progress is advanced;
        `targets` (rows,) are the rows' target tokens, required exactly when the shard holds samples."""
        if (targets is not None) != self.samples:
            raise ValueError(f"{self.directory}: target ids are {'required' if self.samples else 'not stored'} here")
        columns = {"topk_logprobs.bin": self._store(logprobs), "topk_ids.bin": ids.to(torch.int32).numpy(),
                   "tail_logmass.bin": self._store(tail), "lengths.bin": np.asarray(lengths, dtype=np.int64)}
        if targets is not None:
            columns["target_ids.bin"] = targets.to(torch.int32).numpy()
        for name, array in columns.items():
            with open(self.directory / name, "ab") as f:
                f.write(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
                f.flush()
                os.fsync(f.fileno())
        self.progress = ShardProgress(self.progress.examples + len(lengths), self.progress.rows + int(sum(lengths)))
        tmp = self.directory / "progress.json.tmp"
        tmp.write_text(json.dumps(vars(self.progress)))
        os.replace(tmp, self.directory / "progress.json")

    def _store(self, values: Tensor) -> np.ndarray:
        stored = values.to(self.torch_dtype)
        if self.torch_dtype == torch.bfloat16:  # numpy has no bfloat16: keep its bits
            return stored.view(torch.int16).numpy().view(np.uint16)
        return stored.numpy()


# -- reading --------------------------------------------------------------------------------------------------------
class TeacherCache:
    """A finished cache, memory-mapped: `cache[i]` is example i's (top-k log-probs (T, k) float32, ids (T, k) int64,
    tail log-mass (T,) float32), row t for target token t, whichever shard holds it. A cache of the teacher's samples
    (`holds_samples`) also gives the T target tokens themselves: `cache.targets(i)`."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        path = self.directory / "manifest.json"
        if not path.exists():
            raise CacheError(f"{self.directory} holds no teacher cache (no manifest.json): write one with "
                             f"kdlab-cache-teacher cache.dir={self.directory}")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise CacheError(f"{path}: format {self.manifest.get('format')!r}, this kdlab reads {FORMAT!r}")
        self.k, count, total = self.manifest["top_k"], self.manifest["shard_count"], self.manifest["examples"]
        self.torch_dtype, self.np_dtype = STORAGE[self.manifest["dtype"]]
        self.holds_samples = _targets_source(self.manifest.get("targets")) == TEACHER_SAMPLES
        self.shards = [self._open_shard(i, count, total) for i in range(count)]
        self.starts = [shard_range(i, count, total).start for i in range(count)]

    def _open_shard(self, index: int, count: int, total: int) -> dict[str, Any]:
        directory = shard_dir(self.directory, index, count)
        expected = len(shard_range(index, count, total))
        done = json.loads((directory / "progress.json").read_text())["examples"] if directory.exists() else 0
        if done != expected:
            raise CacheError(f"{self.directory}: shard {index} of {count} is incomplete ({done} of {expected} "
                             f"examples); finish it with kdlab-cache-teacher ... cache.shard_index={index} "
                             f"cache.shard_count={count}")
        lengths = np.fromfile(directory / "lengths.bin", dtype="<i8")
        rows = int(lengths.sum())

        def column(name: str, dtype: Any, width: int) -> np.ndarray:
            if rows == 0:
                return np.zeros((0, width), dtype=dtype)
            return np.memmap(directory / name, dtype=np.dtype(dtype).newbyteorder("<"), mode="r", shape=(rows, width))

        shard = {"offsets": np.concatenate([[0], np.cumsum(lengths)]),
                 "logprobs": column("topk_logprobs.bin", self.np_dtype, self.k),
                 "ids": column("topk_ids.bin", np.int32, self.k),
                 "tail": column("tail_logmass.bin", self.np_dtype, 1)}
        if self.holds_samples:
            shard["targets"] = column("target_ids.bin", np.int32, 1)
        return shard

    def __len__(self) -> int:
        return int(self.manifest["examples"])

    def _rows(self, index: int) -> tuple[dict[str, Any], slice]:
        """The shard holding example `index` and the slice of its rows there."""
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} outside the cache's {len(self)}")
        shard_index = int(np.searchsorted(self.starts, index, side="right")) - 1
        shard = self.shards[shard_index]
        local = index - self.starts[shard_index]
        return shard, slice(int(shard["offsets"][local]), int(shard["offsets"][local + 1]))

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        shard, rows = self._rows(index)
        return self._values(shard["logprobs"][rows]), torch.from_numpy(np.array(shard["ids"][rows], dtype=np.int64)), \
            self._values(shard["tail"][rows])[:, 0]

    def targets(self, index: int) -> Tensor:
        """Example `index`'s target tokens (T,) int64 as the cache scored them: the teacher's sample, EOS included
        when the sample reached one. Only a cache of samples has them (the ground truth is the task's own)."""
        if not self.holds_samples:
            raise CacheError(f"{self.directory} holds the teacher's top-k on the ground-truth targets, not samples: "
                             f"write a SeqKD cache with kdlab-cache-teacher ... cache.targets=teacher")
        shard, rows = self._rows(index)
        return torch.from_numpy(np.array(shard["targets"][rows, 0], dtype=np.int64))

    def _values(self, stored: np.ndarray) -> Tensor:
        t = torch.from_numpy(np.array(stored, dtype=stored.dtype.newbyteorder("=")))
        if self.torch_dtype == torch.bfloat16:
            t = t.view(torch.int16).view(torch.bfloat16)
        return t.float()

    def bytes_per_token(self) -> float:
        """Bytes on disk per cached target token: the columns and lengths of every shard over their rows."""
        rows = sum(int(s["offsets"][-1]) for s in self.shards)
        size = sum(f.stat().st_size for f in self.directory.glob("shard-*/*.bin"))
        return size / max(rows, 1)


def open_cache(directory: str | Path) -> TeacherCache:
    """The finished cache in `directory` (every shard complete), memory-mapped; CacheError otherwise."""
    return TeacherCache(directory)


# -- writing --------------------------------------------------------------------------------------------------------
def cache_config_errors(cache_cfg: Mapping[str, Any]) -> list[str]:
    """Every problem of the `cache` group, each naming the key and the fix."""
    errors = []
    if not cache_cfg.get("dir"):
        errors.append("cache.dir is not set: cache.dir=<directory to write>")
    if not (isinstance(cache_cfg.get("top_k"), int) and cache_cfg["top_k"] >= 1):
        errors.append(f"cache.top_k={cache_cfg.get('top_k')!r}: an integer >= 1 (e.g. 32)")
    if cache_cfg.get("dtype") not in STORAGE:
        errors.append(f"cache.dtype={cache_cfg.get('dtype')!r}: one of {', '.join(STORAGE)}")
    count, index = cache_cfg.get("shard_count"), cache_cfg.get("shard_index")
    if not (isinstance(count, int) and count >= 1 and isinstance(index, int) and 0 <= index < count):
        errors.append(f"cache.shard_index={index!r} of cache.shard_count={count!r}: 0 <= shard_index < shard_count")
    if not (isinstance(cache_cfg.get("batch_size"), int) and cache_cfg["batch_size"] >= 1):
        errors.append(f"cache.batch_size={cache_cfg.get('batch_size')!r}: an integer >= 1")
    if cache_cfg.get("targets") not in TARGET_CHOICES:
        errors.append(f"cache.targets={cache_cfg.get('targets')!r}: ground_truth (the task's targets, for supervised "
                      f"KD) or teacher (the teacher's samples, for SeqKD: policy=seqkd)")
    seed = cache_cfg.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        errors.append(f"cache.seed={seed!r}: an integer >= 0, or null for the run's seed")
    return errors


def run_fingerprints(task_cfg: Mapping[str, Any], tokenizer, examples: Sequence[Any],
                     teacher: torch.nn.Module | None = None, teacher_name: str | None = None,
                     targets: Any = GROUND_TRUTH) -> dict[str, Any]:
    """What a cache must agree with: tokenizer, task settings, the tokenized examples, which targets are scored
    (GROUND_TRUTH, or `sampled_targets(...)` for SeqKD), and the teacher when loaded."""
    from kdlab.teachers.fingerprint import data_fingerprint, model_fingerprint, task_settings, tokenizer_fingerprint

    out: dict[str, Any] = {
        "format": FORMAT,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "task": task_settings(task_cfg),
        "data": data_fingerprint((e.student.prompt, e.student.target) for e in examples),
        "targets": targets,
        "examples": len(examples),
    }
    if teacher is not None:
        out["teacher"] = {"name": teacher_name, "weights": model_fingerprint(teacher)}
    return out


def write_or_check_manifest(directory: Path, manifest: Mapping[str, Any]) -> None:
    """Write the manifest, or, when the directory already has one (a resume, another shard), insist it matches."""
    path = Path(directory) / "manifest.json"
    if path.exists():
        difference = check_cache_matches(json.loads(path.read_text()), manifest)
        if difference:
            raise CacheError(f"{directory}: {difference}; choose another cache.dir or delete this one")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"manifest.json.{os.getpid()}.tmp")  # shards starting together each write the same text
    tmp.write_text(json.dumps(dict(manifest), indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


@torch.no_grad()
def score_batch(model: torch.nn.Module, items: Sequence[Any], pad_id: int, top_k: int,
                vocab: int | None = None) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """Top-k, ids and tail of every target token of a batch, the rows of all examples concatenated in order. With
    `vocab`, over the tokenizer's columns only (checkpoints pad their output layer beyond it; training trims too)."""
    from kdlab.data.datamodule import Collator
    from kdlab.models.scoring import score_targets

    device = next(model.parameters()).device
    side = Collator(pad_id)(list(items)).student.to(device)
    logits = score_targets(model, *side.prompt, *side.target)[..., :vocab]
    values, ids, tail = top_k_of_logits(logits, top_k)
    lengths = [len(item.student.target) for item in items]
    pick = lambda t: torch.cat([t[row, :n] for row, n in enumerate(lengths)]).cpu()  # noqa: E731
    return pick(values), pick(ids), pick(tail), lengths


@dataclass(frozen=True)
class TeacherSampling:
    """How the writer draws SeqKD targets: the run's sampling settings, the seed and the EOS that ends a sample."""

    settings: SamplingSettings
    seed: int
    eos_token_id: int


def batch_seed(seed: int, first: int) -> int:
    """The generator seed of the batch starting at example `first`: a function of the example, not of the process
    or of what was written before, so a resumed writer draws what an uninterrupted one drew."""
    return (seed * 1_000_003 + first) % (2**63 - 1)


@torch.no_grad()
def sample_batch(model: torch.nn.Module, items: Sequence[Any], pad_id: int, sampling: TeacherSampling,
                 first: int) -> list[Any]:
    """`items` with the teacher's samples as their targets (tokens up to and including the first EOS, as the live
    SeqKD step samples them: kdlab.sampling.hf.generate_targets from the left-padded prompts of the batch), drawn
    under `batch_seed(sampling.seed, first)` without touching the caller's random state."""
    from kdlab.data.datamodule import Collator

    device = next(model.parameters()).device
    side = Collator(pad_id)(list(items)).student.to(device)
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(batch_seed(sampling.seed, first))
        ids, mask = generate_targets(model, *side.prompt, sampling.settings, pad_token_id=pad_id,
                                     eos_token_id=sampling.eos_token_id)
    rows = [row[keep].tolist() for row, keep in zip(ids.cpu(), mask.cpu())]
    return [replace(item, student=replace(item.student, target=row)) for item, row in zip(items, rows)]


def write_shard(directory: Path, model: torch.nn.Module, examples: Sequence[Any], pad_id: int,
                cache_cfg: Mapping[str, Any], vocab: int | None = None,
                sampling: TeacherSampling | None = None) -> ShardWriter:
    """Score this process's shard in batches, resuming after the examples already written; a tqdm bar shows it.
    With `sampling`, each batch's targets are first replaced by the teacher's samples, which are stored too."""
    from tqdm.auto import tqdm

    index, count = int(cache_cfg["shard_index"]), int(cache_cfg["shard_count"])
    todo = shard_range(index, count, len(examples))
    writer = ShardWriter(shard_dir(directory, index, count), int(cache_cfg["top_k"]), str(cache_cfg["dtype"]),
                         samples=sampling is not None)
    size = int(cache_cfg["batch_size"])
    with tqdm(total=len(todo), initial=writer.progress.examples, desc=f"teacher cache shard {index}/{count}",
              unit="example") as bar:
        for start in range(todo.start + writer.progress.examples, todo.stop, size):
            items = [examples[i] for i in range(start, min(start + size, todo.stop))]
            targets = None
            if sampling is not None:
                items = sample_batch(model, items, pad_id, sampling, start)
                targets = torch.tensor([t for item in items for t in item.student.target], dtype=torch.int32)
            writer.append(*score_batch(model, items, pad_id, int(cache_cfg["top_k"]), vocab), targets)
            bar.update(len(items))
    return writer


def cache_teacher(cfg) -> float:
    """The CLI's work: validate, load tokenizers, task and teacher, write the manifest and this shard; returns
    (and prints) the bytes per cached token of this shard."""
    from omegaconf import OmegaConf

    from kdlab.data.datamodule import TokenizedExamples
    from kdlab.data.tasks import Task
    from kdlab.models.loading import load_model, load_tokenizer, same_vocabulary

    errors = cache_config_errors(cfg.cache)
    if errors:
        raise CacheError("invalid cache config:\n  " + "\n  ".join(errors))
    tokenizer, teacher_tokenizer = load_tokenizer(cfg.student), load_tokenizer(cfg.teacher)
    if not same_vocabulary(tokenizer, teacher_tokenizer):
        raise CacheError(f"teacher {cfg.teacher.name} and student {cfg.student.name} tokenize differently; a cache "
                         f"stores the teacher's distribution over the student's tokens (cross-tokenizer caches are "
                         f"not supported)")
    task_cfg = OmegaConf.to_container(cfg.task, resolve=True)
    task = Task.from_config(task_cfg)
    examples = TokenizedExamples(task.splits()["train"], task, tokenizer, "train").items
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.cache.device == "auto" else cfg.cache.device
    model = load_model(cfg.teacher, teacher_tokenizer).to(device).eval().requires_grad_(False)
    directory = Path(cfg.cache.dir)
    sampling, targets = _teacher_sampling(cfg, int(tokenizer.eos_token_id))
    manifest = {**run_fingerprints(task_cfg, tokenizer, examples, model, str(cfg.teacher.name), targets),
                "top_k": int(cfg.cache.top_k), "dtype": str(cfg.cache.dtype),
                "shard_count": int(cfg.cache.shard_count)}
    write_or_check_manifest(directory, manifest)
    writer = write_shard(directory, model, examples, int(tokenizer.pad_token_id), cfg.cache, len(tokenizer), sampling)
    size = sum((writer.directory / name).stat().st_size for name in (*writer.row_bytes, "lengths.bin"))
    per_token = size / max(writer.progress.rows, 1)
    print(f"teacher cache {writer.directory}: {writer.progress.examples} examples, {writer.progress.rows} tokens, "
          f"{size} bytes, {per_token:.1f} bytes per token (top_k={cfg.cache.top_k}, {cfg.cache.dtype})")
    return per_token


def _teacher_sampling(cfg, eos_token_id: int) -> tuple[TeacherSampling | None, Any]:
    """(how to draw the targets, the manifest's `targets`) for `cache.targets`: None and GROUND_TRUTH, or the run's
    `policy.sampling` with cache.seed (the run's seed when null), which the manifest records with the batch size."""
    if cfg.cache.targets == "ground_truth":
        return None, GROUND_TRUTH
    seed = int(cfg.cache.seed if cfg.cache.get("seed") is not None else cfg.seed)
    sampling = dict(cfg.policy.sampling)
    teacher_sampling = TeacherSampling(SamplingSettings(**sampling), seed, eos_token_id)
    return teacher_sampling, sampled_targets(sampling, seed, int(cfg.cache.batch_size))


def main() -> None:
    """Console entry point: Hydra composes conf/cache_teacher.yaml (train.yaml plus the `cache` group)."""
    import sys

    from kdlab.teachers.entry import hydra_entry

    def run(cfg) -> None:
        try:
            cache_teacher(cfg)
        except CacheError as err:
            sys.exit(f"error: {err}")

    hydra_entry("cache_teacher", run)


if __name__ == "__main__":
    main()
