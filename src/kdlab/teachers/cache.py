"""`kdlab-cache-teacher`: the teacher's top-k log-probabilities over the training targets, written once to disk.

    kdlab-cache-teacher teacher=arith_teacher cache.dir=<dir> cache.top_k=32 [task=... student=...]
    kdlab-cache-teacher ... cache.shard_index=1 cache.shard_count=4        # one of four processes
    kdlab-cache-teacher ... cache.targets=teacher [policy.sampling.temperature=...]   # SeqKD: the teacher's samples

Composed from the same `conf/` as `train.py`, so the cached targets are the run's own: the training split of
`task`, tokenized by the student's tokenizer exactly as the training batches are (kdlab.data.datamodule). With
`cache.targets=ground_truth` the targets are the task's; with `cache.targets=teacher` (SeqKD) each example's target is
the teacher's sample from its prompt under the run's `policy.sampling`, drawn from a generator seeded by
(cache.seed or the run's seed, the batch's first example), so a rewrite or a resume draws the same tokens. The teacher
scores each target with `kdlab.models.scoring.score_targets`; for every target token it stores

    topk_logprobs (k, cache.dtype)   topk_ids (k, int32)   tail_logmass (cache.dtype): log(1 - sum of the top-k)

Layout (columnar, memory-mapped by the reader, little-endian, rows in example order):

    <dir>/manifest.json                        format, teacher/tokenizer/task/data fingerprints, vocab_size, top_k,
                                               dtype, shard_count, and manifest_sha256 (of the rest)
    <dir>/shard-00000-of-00002/{topk_logprobs,topk_ids,tail_logmass}.bin   (rows, k) (rows, k) (rows,)
    <dir>/shard-00000-of-00002/lengths.bin     int64 per example: its number of target tokens (rows)
    <dir>/shard-00000-of-00002/target_ids.bin  int32 per row: the sampled target token (cache.targets=teacher only)
    <dir>/shard-00000-of-00002/progress.json   examples and rows written and flushed so far, and the crc32 of every
                                               block_bytes block of each .bin file
    <dir>/shard-00000-of-00002/writer.lock     flocked by the shard's writer, naming it (empty when none)

Shard i of n holds examples [i N / n, (i + 1) N / n). After every batch the columns are flushed and then
progress.json is replaced, so an interrupted writer resumes where the last progress says, cutting whatever the
interruption left past it (and checking what it keeps against the checksums): the files come out byte-identical to
an uninterrupted run. bfloat16 is stored as its raw 16 bits (numpy has no bfloat16); the reader returns float32.

The reader verifies a cache before a run uses it (`open_cache(dir, vocab_size, verify=...)`; what each check
catches is in docs/teacher_outside.md): the manifest against its digest; every file's size against the manifest
and lengths.bin; the checksums and values (ids in the vocabulary, log-probabilities neither NaN nor above 0, each
row's mass summing to 1) of the blocks `verify` chooses (kdlab.teachers.cache_verify.choose_blocks); and, while
training, the values of every row it hands out.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdlab.losses.sparse import top_k_of_logits
from kdlab.sampling.base import ENGINE_KEYS, SamplingSettings
from kdlab.sampling.hf import generate_targets
from kdlab.teachers.cache_verify import (
    BITS,
    BLOCK_BYTES,
    VERIFY_MODES,
    BlockChecksums,
    CacheError,
    WriterLock,
    block_count,
    choose_blocks,
    decode,
    directory_lock,
    mass_errors,
    mass_tolerance,
    nonpositive,
    read_block,
)

FORMAT = "kdlab-teacher-cache/2"
# caches written before checksums existed: refused with the command that rewrites them (their files cannot be
# verified, and a size check alone misses ids moved within range or bytes overwritten in place)
UNVERIFIABLE_FORMATS = ("kdlab-teacher-cache/1",)
DIGEST = "manifest_sha256"
MANIFEST, PROGRESS, LOCK = "manifest.json", "progress.json", "writer.lock"
LOGPROBS, IDS, TAIL, LENGTHS, TARGETS = "topk_logprobs.bin", "topk_ids.bin", "tail_logmass.bin", "lengths.bin", \
    "target_ids.bin"
WIDE = (IDS, LOGPROBS)  # k values per row: verify=sampled reads some of their blocks, the other columns whole
# the manifest's "targets": the task's own, or the teacher's samples (then a mapping naming how they were drawn)
GROUND_TRUTH, TEACHER_SAMPLES = "ground_truth", "teacher_samples"
TARGET_CHOICES = {"ground_truth": GROUND_TRUTH, "teacher": TEACHER_SAMPLES}  # cache.targets -> manifest
STORAGE = {"float32": (torch.float32, np.float32), "float16": (torch.float16, np.float16),
           "bfloat16": (torch.bfloat16, np.uint16)}  # bfloat16: raw bits in a uint16 column
# the manifest keys a run is compared on, in the order differences are reported
MATCHED_KEYS = ("format", "teacher", "tokenizer", "vocab_size", "task", "data", "targets", "examples", "top_k",
                "dtype", "shard_count")


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
    settings = SamplingSettings(**{k: v for k, v in dict(sampling).items() if k not in ENGINE_KEYS})
    out: dict[str, Any] = {"source": TEACHER_SAMPLES, "sampling": {
        "max_new_tokens": int(settings.max_new_tokens), "do_sample": bool(settings.do_sample),
        "temperature": float(settings.temperature), "top_p": float(settings.top_p), "top_k": int(settings.top_k),
        "num_beams": int(settings.num_beams)}}
    if seed is not None:
        out["seed"] = int(seed)
    if batch_size is not None:
        out["batch_size"] = int(batch_size)
    return out


# -- the manifest and the progress files ------------------------------------------------------------------------------
def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 of the manifest without its digest, as canonical JSON: an edited manifest no longer matches."""
    rest = {key: value for key, value in manifest.items() if key != DIGEST}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _rewrite_cache(directory: Path) -> str:
    return (f"delete {directory} and write the cache again: kdlab-cache-teacher <the run's overrides> "
            f"cache.dir={directory}")


def _rewrite_shard(directory: Path, index: int, count: int) -> str:
    return (f"delete {shard_dir(directory, index, count)} and write that shard again: kdlab-cache-teacher <the run's "
            f"overrides> cache.dir={directory} cache.shard_index={index} cache.shard_count={count}")


def _is_int(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of the cache in `directory`, checked: valid JSON, this format, unchanged since it was written
    (its digest), and the fields the files are read by well-typed; CacheError naming the file otherwise."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.exists():
        raise CacheError(f"{directory} holds no teacher cache (no {MANIFEST}): write one with "
                         f"kdlab-cache-teacher <the run's overrides> cache.dir={directory}")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CacheError(f"{path} is not valid JSON ({err}): {_rewrite_cache(directory)}") from None
    if not isinstance(manifest, dict):
        raise CacheError(f"{path} holds a JSON {type(manifest).__name__}, not an object: {_rewrite_cache(directory)}")
    form = manifest.get("format")
    if form in UNVERIFIABLE_FORMATS:
        raise CacheError(f"{path}: format {form!r} was written before caches carried checksums, and this kdlab reads "
                         f"only caches it can verify ({FORMAT!r}): write it again with kdlab-cache-teacher <the run's "
                         f"overrides> cache.dir=<a new directory>")
    if form != FORMAT:
        raise CacheError(f"{path}: format {form!r}, this kdlab reads {FORMAT!r}: {_rewrite_cache(directory)}")
    if manifest.get(DIGEST) != manifest_digest(manifest):
        raise CacheError(f"{path} was changed after it was written (its {DIGEST} does not match its contents): "
                         f"restore the original, or {_rewrite_cache(directory)}")
    wanted = {"top_k": "an integer >= 1", "shard_count": "an integer >= 1", "examples": "an integer >= 0",
              "vocab_size": "an integer >= 1"}
    for key, what in wanted.items():
        if not _is_int(manifest.get(key), 0 if key == "examples" else 1):
            raise CacheError(f"{path}: {key}={manifest.get(key)!r} is not {what}: {_rewrite_cache(directory)}")
    if manifest.get("dtype") not in STORAGE:
        raise CacheError(f"{path}: dtype={manifest.get('dtype')!r} is not a storage kdlab writes "
                         f"({', '.join(STORAGE)}): {_rewrite_cache(directory)}")
    return manifest


@dataclass
class ShardProgress:
    """progress.json: what a shard holds on disk, flushed (examples, rows) and the crc32 of each of its files'
    `block_bytes` blocks (the last one partial)."""

    examples: int = 0
    rows: int = 0
    block_bytes: int = BLOCK_BYTES
    checksums: dict[str, list[int]] = field(default_factory=dict)


def read_progress(path: Path, fix: str) -> ShardProgress:
    """A shard's progress.json, checked for shape; CacheError naming it (and `fix`) otherwise."""
    try:
        raw = json.loads(path.read_text())
        progress = ShardProgress(**raw)
    except FileNotFoundError:
        raise CacheError(f"{path} is missing: {fix}") from None
    except (ValueError, TypeError, UnicodeDecodeError) as err:
        raise CacheError(f"{path} is not a shard's progress ({err}): {fix}") from None
    sound = (_is_int(progress.examples, 0) and _is_int(progress.rows, 0) and _is_int(progress.block_bytes, 8)
             and progress.block_bytes % 8 == 0 and isinstance(progress.checksums, dict)
             and all(isinstance(v, list) and all(_is_int(c, 0) for c in v) for v in progress.checksums.values()))
    if not sound:
        raise CacheError(f"{path} is not a shard's progress (examples, rows, block_bytes, checksums): {fix}")
    return progress


class ShardWriter:
    """Appends batches of rows to one shard's column files under its writer lock; `resume` first cuts them back to
    the last progress and checks what it keeps against the checksums. With `samples`, each row also keeps its
    target token (the teacher's sample, which training cannot re-derive). Close it (or use `with`) to let the next
    writer in; the OS releases the lock of a writer that dies."""

    def __init__(self, directory: Path, top_k: int, dtype: str, samples: bool = False,
                 block_bytes: int = BLOCK_BYTES):
        self.directory, self.k, self.samples = Path(directory), top_k, samples
        self.torch_dtype, self.np_dtype = STORAGE[dtype]
        self.directory.mkdir(parents=True, exist_ok=True)
        item = np.dtype(self.np_dtype).itemsize
        self.row_bytes = {LOGPROBS: top_k * item, IDS: top_k * 4, TAIL: item}
        if samples:
            self.row_bytes[TARGETS] = 4
        self.lock = WriterLock(self.directory / LOCK, self.directory.name).__enter__()
        try:
            self.progress = self._read_progress(block_bytes)
            self._cut_to_progress()
            self.checksums = self._check_kept()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.lock.__exit__(None, None, None)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _damaged(self) -> str:
        return f"the shard is damaged: delete {self.directory} and run this command again"

    def _read_progress(self, block_bytes: int) -> ShardProgress:
        path = self.directory / PROGRESS
        if not path.exists():
            return ShardProgress(block_bytes=block_bytes)
        progress = read_progress(path, self._damaged())
        if progress.block_bytes != block_bytes:
            raise CacheError(f"{path}: the shard was started with cache.block_bytes={progress.block_bytes}, this run "
                             f"has {block_bytes}: resume with cache.block_bytes={progress.block_bytes}")
        return progress

    def _sizes(self) -> dict[str, int]:
        sizes = {name: self.progress.rows * size for name, size in self.row_bytes.items()}
        sizes[LENGTHS] = self.progress.examples * 8
        return sizes

    def _cut_to_progress(self) -> None:
        """Drop bytes past the last recorded progress (a batch the interruption left half written)."""
        for name, size in self._sizes().items():
            path = self.directory / name
            with open(path, "ab") as f:  # creates the file when missing
                if f.tell() < size:
                    raise CacheError(f"{path} is shorter than its {PROGRESS} says: {self._damaged()}")
                f.truncate(size)

    def _check_kept(self) -> dict[str, BlockChecksums]:
        """The running checksums of what the files keep, after reading every kept block against them: a resume
        must not build on bytes that changed since they were written."""
        block = self.progress.block_bytes
        out = {}
        for name, size in self._sizes().items():
            path, values = self.directory / name, self.progress.checksums.get(name, [])
            if len(values) != block_count(size, block):
                raise CacheError(f"{self.directory / PROGRESS} holds {len(values)} checksums for {name}, whose "
                                 f"{size} bytes make {block_count(size, block)} blocks: {self._damaged()}")
            for b, value in enumerate(values):
                if zlib.crc32(read_block(path, b, block)) != value:
                    raise CacheError(f"{path}: block {b} does not match its checksum: {self._damaged()}")
            out[name] = BlockChecksums(block, values, size)
        return out

    def append(self, logprobs: Tensor, ids: Tensor, tail: Tensor, lengths: Sequence[int],
               targets: Tensor | None = None) -> None:
        """Rows of a batch of examples (rows in example order), flushed to disk before progress is advanced;
        `targets` (rows,) are the rows' target tokens, required exactly when the shard holds samples."""
        if (targets is not None) != self.samples:
            raise ValueError(f"{self.directory}: target ids are {'required' if self.samples else 'not stored'} here")
        columns = {LOGPROBS: self._store(logprobs), IDS: ids.to(torch.int32).numpy(), TAIL: self._store(tail),
                   LENGTHS: np.asarray(lengths, dtype=np.int64)}
        if targets is not None:
            columns[TARGETS] = targets.to(torch.int32).numpy()
        for name, array in columns.items():
            data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
            with open(self.directory / name, "ab") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            self.checksums[name].update(data)  # of the bytes written, not of what a later read returns
        self.progress = ShardProgress(self.progress.examples + len(lengths), self.progress.rows + int(sum(lengths)),
                                      self.progress.block_bytes,
                                      {name: list(c.values) for name, c in self.checksums.items()})
        tmp = self.directory / f"{PROGRESS}.tmp"
        tmp.write_text(json.dumps(vars(self.progress)))
        os.replace(tmp, self.directory / PROGRESS)

    def _store(self, values: Tensor) -> np.ndarray:
        stored = values.to(self.torch_dtype)
        if self.torch_dtype == torch.bfloat16:  # numpy has no bfloat16: keep its bits
            return stored.view(torch.int16).numpy().view(np.uint16)
        return stored.numpy()


# -- reading --------------------------------------------------------------------------------------------------------
@dataclass
class _Shard:
    index: int
    directory: Path
    progress: ShardProgress
    offsets: np.ndarray  # example j's rows are offsets[j]:offsets[j + 1]
    sizes: dict[str, int]  # bytes of each .bin file
    columns: dict[str, np.ndarray] = field(default_factory=dict)  # memory maps: (rows, width) bits or int32


class TeacherCache:
    """A finished cache, verified and memory-mapped: `cache[i]` is example i's (top-k log-probs (T, k) float32, ids
    (T, k) int64, tail log-mass (T,) float32), row t for target token t, whichever shard holds it. A cache of the
    teacher's samples (`holds_samples`) also gives the T target tokens themselves: `cache.targets(i)`.

    `vocab_size`: the student's vocabulary (the run's tokenizer), which every id must lie in; None takes the
    manifest's. `verify`: which blocks are re-read against their checksums and value ranges before use, full |
    sampled (the small columns whole; of the (rows, k) ones each file's first and last block and `verify_blocks`
    more, drawn with `verify_seed`) | off (no block read: the manifest's digest, the files' sizes and lengths.bin
    only). `checked` records the blocks read, by (shard, file)."""

    def __init__(self, directory: str | Path, vocab_size: int | None = None, verify: str = "sampled",
                 verify_blocks: int = 16, verify_seed: int = 0):
        self.directory = Path(directory)
        if verify not in VERIFY_MODES:
            raise CacheError(f"teacher.verify={verify!r}: one of {', '.join(VERIFY_MODES)}")
        if not (_is_int(verify_blocks, 0) and _is_int(verify_seed, 0)):
            raise CacheError(f"teacher.verify_blocks={verify_blocks!r}, teacher.verify_seed={verify_seed!r}: "
                             f"integers >= 0")
        self.manifest = read_manifest(self.directory)
        self.k, count, total = self.manifest["top_k"], self.manifest["shard_count"], self.manifest["examples"]
        self.dtype = self.manifest["dtype"]
        self.torch_dtype = STORAGE[self.dtype][0]
        self.vocab_size = int(vocab_size if vocab_size is not None else self.manifest["vocab_size"])
        self.holds_samples = _targets_source(self.manifest.get("targets")) == TEACHER_SAMPLES
        item = np.dtype(STORAGE[self.dtype][1]).itemsize
        self.row_bytes = {LOGPROBS: self.k * item, IDS: self.k * 4, TAIL: item}
        if self.holds_samples:
            self.row_bytes[TARGETS] = 4
        self.shards = [self._open_shard(i, count, total) for i in range(count)]
        self.starts = [shard_range(i, count, total).start for i in range(count)]
        self.checked = self._verify(verify, verify_blocks, verify_seed)
        for shard in self.shards:
            self._map(shard)

    # -- sizes --
    def _open_shard(self, index: int, count: int, total: int) -> _Shard:
        """The shard's progress, lengths and file sizes, checked against the manifest and each other."""
        directory, fix = shard_dir(self.directory, index, count), _rewrite_shard(self.directory, index, count)
        expected = len(shard_range(index, count, total))
        done = read_progress(directory / PROGRESS, fix).examples if directory.exists() else 0
        if done != expected:
            where = directory / PROGRESS if directory.exists() else directory
            raise CacheError(f"{where}: shard {index} of {count} is incomplete ({done} of {expected} examples); "
                             f"finish it with kdlab-cache-teacher <the run's overrides> cache.dir={self.directory} "
                             f"cache.shard_index={index} cache.shard_count={count}")
        progress = read_progress(directory / PROGRESS, fix)
        sizes = {}
        for name in (LENGTHS, *self.row_bytes):
            path = directory / name
            if not path.exists():
                raise CacheError(f"{path} is missing: {fix}")
            sizes[name] = path.stat().st_size
        if sizes[LENGTHS] != 8 * expected:
            raise CacheError(f"{directory / LENGTHS} holds {sizes[LENGTHS]} bytes, not 8 for each of the shard's "
                             f"{expected} examples ({8 * expected}): {fix}")
        lengths = np.fromfile(directory / LENGTHS, dtype="<i8")
        if (lengths < 0).any() or int(lengths.sum()) != progress.rows:
            raise CacheError(f"{directory / LENGTHS}: its lengths (sum {int(lengths.sum())}, least "
                             f"{int(lengths.min(initial=0))}) do not make the {progress.rows} rows {PROGRESS} "
                             f"records: {fix}")
        for name, row_bytes in self.row_bytes.items():
            if sizes[name] != progress.rows * row_bytes:
                raise CacheError(f"{directory / name} holds {sizes[name]} bytes; {progress.rows} rows (lengths.bin) "
                                 f"of {row_bytes} bytes (top_k={self.k}, dtype={self.dtype} in {MANIFEST}) make "
                                 f"{progress.rows * row_bytes}: {fix}")
        for name, size in sizes.items():
            have, want = len(progress.checksums.get(name, [])), block_count(size, progress.block_bytes)
            if have != want:
                raise CacheError(f"{directory / PROGRESS} holds {have} checksums for {name}, whose {size} bytes make "
                                 f"{want} blocks of {progress.block_bytes}: {fix}")
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        return _Shard(index, directory, progress, offsets, sizes)

    # -- checksums and values --
    def _verify(self, mode: str, sample: int, seed: int) -> dict[tuple[int, str], list[int]]:
        """Re-read the chosen blocks against their checksums, then their values; the narrow columns first, so
        that a damaged tail is named as such rather than as a row whose mass does not sum to 1."""
        order = (LENGTHS, TAIL, TARGETS, IDS, LOGPROBS)
        counts = {(s.index, name): block_count(s.sizes[name], s.progress.block_bytes)
                  for s in self.shards for name in order if name in s.sizes}
        wide = {key for key in counts if key[1] in WIDE}
        chosen = choose_blocks(counts, wide, mode, sample, seed)
        for (index, name), blocks in chosen.items():
            shard = self.shards[index]
            path, size = shard.directory / name, shard.progress.block_bytes
            for b in blocks:
                raw = read_block(path, b, size)
                if zlib.crc32(raw) != shard.progress.checksums[name][b]:
                    raise CacheError(f"{path}: block {b} (bytes {b * size}-{b * size + len(raw) - 1}) does not match "
                                     f"its checksum in {PROGRESS}: the file changed after it was written; "
                                     f"{_rewrite_shard(self.directory, index, len(self.shards))}")
                if name != LENGTHS:
                    kind = BITS[self.dtype][0] if name in (LOGPROBS, TAIL) else np.dtype("<i4")
                    self._check_values(shard, name, np.frombuffer(raw, kind), b * size // kind.itemsize)
        return {key: blocks for key, blocks in chosen.items() if blocks}

    def _check_values(self, shard: _Shard, name: str, values: np.ndarray, first: int, example: int | None = None
                      ) -> None:
        """Ids in [0, vocab_size); log-probabilities and tails neither NaN nor above 0; and (blocks of log-probs)
        each whole row's mass summing to 1. `values` are the file's elements from element `first` on (raw bits for
        log-probs and tails); `example`: the example being read in training, whose row this is."""
        width = self.k if name in WIDE else 1
        values = values.reshape(-1)
        if name in (IDS, TARGETS):
            bad = (values < 0) | (values >= self.vocab_size)
            if bad.any():
                i = int(np.argmax(bad))
                self._refuse(shard, name, example, f"token id {int(values[i])} at row {(first + i) // width} is "
                                                   f"outside the student's vocabulary [0, {self.vocab_size})")
            return
        good = nonpositive(values, self.dtype)
        if not good.all():
            i = int(np.argmin(good))
            value = float(decode(values[i : i + 1], self.dtype)[0])
            self._refuse(shard, name, example, f"row {(first + i) // width} holds {value} where a log-probability "
                                               f"must be at most 0 (and not NaN)")
        if name == LOGPROBS and example is None:
            start, stop = -(-first // width), (first + len(values)) // width  # the block's whole rows
            if stop > start:
                rows = decode(values[start * width - first : stop * width - first], self.dtype).reshape(-1, width)
                errors = mass_errors(rows, self._tail(shard, start, stop))
                tolerance = mass_tolerance(self.dtype, self.k)
                wrong = ~(np.abs(errors) <= tolerance)  # NaN too
                if wrong.any():
                    r = int(np.argmax(wrong))
                    self._refuse(shard, f"{name} and {TAIL}", example,
                                 f"row {start + r}'s top-k and tail hold a probability mass of {1 + errors[r]:.4g}, "
                                 f"not 1 (within {tolerance:.2g} for {self.dtype}): these bytes are not "
                                 f"top_k={self.k} {self.dtype} log-probabilities (was {MANIFEST} changed?)")

    def _refuse(self, shard: _Shard, name: str, example: int | None, what: str) -> None:
        fix = _rewrite_shard(self.directory, shard.index, len(self.shards))
        if example is not None:
            fix = (f"found reading example {example} in training: teacher.verify=sampled reads some blocks only, "
                   f"teacher.verify=full all of them before training; {fix}")
        raise CacheError(f"{shard.directory / name}: {what}: {fix}")

    def _tail(self, shard: _Shard, start: int, stop: int) -> np.ndarray:
        item = BITS[self.dtype][0]
        with open(shard.directory / TAIL, "rb") as f:
            f.seek(start * item.itemsize)
            return decode(np.frombuffer(f.read((stop - start) * item.itemsize), item), self.dtype)

    def _map(self, shard: _Shard) -> None:
        rows, bits = shard.progress.rows, BITS[self.dtype][0]

        def column(name: str, dtype: Any, width: int) -> np.ndarray:
            if rows == 0:
                return np.zeros((0, width), dtype=dtype)
            return np.memmap(shard.directory / name, dtype=dtype, mode="r", shape=(rows, width))

        shard.columns = {LOGPROBS: column(LOGPROBS, bits, self.k), IDS: column(IDS, np.dtype("<i4"), self.k),
                         TAIL: column(TAIL, bits, 1)}
        if self.holds_samples:
            shard.columns[TARGETS] = column(TARGETS, np.dtype("<i4"), 1)

    def __len__(self) -> int:
        return int(self.manifest["examples"])

    def _rows(self, index: int) -> tuple[_Shard, slice]:
        """The shard holding example `index` and the slice of its rows there."""
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} outside the cache's {len(self)}")
        shard_index = int(np.searchsorted(self.starts, index, side="right")) - 1
        shard = self.shards[shard_index]
        local = index - self.starts[shard_index]
        return shard, slice(int(shard.offsets[local]), int(shard.offsets[local + 1]))

    def _read(self, shard: _Shard, name: str, rows: slice, index: int) -> np.ndarray:
        """Rows of one column, value-checked (a few vector comparisons): a block the sampled check did not read
        stops the run with a CacheError naming the file, not a NaN loss or a device-side assert."""
        values = np.array(shard.columns[name][rows])
        self._check_values(shard, name, values, rows.start * (self.k if name in WIDE else 1), example=index)
        return values

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        shard, rows = self._rows(index)
        logprobs, ids, tail = (self._read(shard, name, rows, index) for name in (LOGPROBS, IDS, TAIL))
        return (torch.from_numpy(decode(logprobs, self.dtype)), torch.from_numpy(ids.astype(np.int64)),
                torch.from_numpy(decode(tail, self.dtype))[:, 0])

    def targets(self, index: int) -> Tensor:
        """Example `index`'s target tokens (T,) int64 as the cache scored them: the teacher's sample, EOS included
        when the sample reached one. Only a cache of samples has them (the ground truth is the task's own)."""
        if not self.holds_samples:
            raise CacheError(f"{self.directory} holds the teacher's top-k on the ground-truth targets, not samples: "
                             f"write a SeqKD cache with kdlab-cache-teacher ... cache.targets=teacher")
        shard, rows = self._rows(index)
        return torch.from_numpy(self._read(shard, TARGETS, rows, index)[:, 0].astype(np.int64))

    def bytes_per_token(self) -> float:
        """Bytes on disk per cached target token: the columns and lengths of every shard over their rows."""
        rows = sum(int(s.offsets[-1]) for s in self.shards)
        size = sum(f.stat().st_size for f in self.directory.glob("shard-*/*.bin"))
        return size / max(rows, 1)


def open_cache(directory: str | Path, vocab_size: int | None = None, verify: str = "sampled",
               verify_blocks: int = 16, verify_seed: int = 0) -> TeacherCache:
    """The finished cache in `directory` (every shard complete), verified as `verify` says (TeacherCache) and
    memory-mapped; CacheError, one line naming the file and the fix, otherwise."""
    return TeacherCache(directory, vocab_size, verify, verify_blocks, verify_seed)


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
    block = cache_cfg.get("block_bytes", BLOCK_BYTES)
    if not (_is_int(block, 8) and block % 8 == 0):
        errors.append(f"cache.block_bytes={block!r}: a multiple of 8 (bytes per checksummed block, e.g. {BLOCK_BYTES})")
    return errors


def run_fingerprints(task_cfg: Mapping[str, Any], tokenizer, examples: Sequence[Any],
                     teacher: torch.nn.Module | None = None, teacher_name: str | None = None,
                     targets: Any = GROUND_TRUTH) -> dict[str, Any]:
    """What a cache must agree with: tokenizer and its vocabulary size, task settings, the tokenized examples,
    which targets are scored (GROUND_TRUTH, or `sampled_targets(...)` for SeqKD), and the teacher when loaded."""
    from kdlab.teachers.fingerprint import data_fingerprint, model_fingerprint, task_settings, tokenizer_fingerprint

    out: dict[str, Any] = {
        "format": FORMAT,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer),
        "task": task_settings(task_cfg),
        "data": data_fingerprint((e.student.prompt, e.student.target) for e in examples),
        "targets": targets,
        "examples": len(examples),
    }
    if teacher is not None:
        out["teacher"] = {"name": teacher_name, "weights": model_fingerprint(teacher)}
    return out


def write_or_check_manifest(directory: Path, manifest: Mapping[str, Any]) -> None:
    """Write the manifest with its digest, or, when the directory already has one (a resume, another shard),
    insist it is sound and matches; under a lock on the directory, so shards starting together agree on one."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with directory_lock(directory):
        if (directory / MANIFEST).exists():
            difference = check_cache_matches(read_manifest(directory), manifest)
            if difference:
                raise CacheError(f"{directory}: {difference}; choose another cache.dir or delete this one")
            return
        data = json.loads(json.dumps(dict(manifest), default=str))  # the digest is of what a reader will parse
        data[DIGEST] = manifest_digest(data)
        tmp = directory / f"{MANIFEST}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
        os.replace(tmp, directory / MANIFEST)


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
    """Score this process's shard in batches under its writer lock, resuming after the examples already written; a
    tqdm bar shows it. With `sampling`, each batch's targets are first replaced by the teacher's samples, which are
    stored too. Returns the (closed) writer, whose `progress` says what the shard holds."""
    from tqdm.auto import tqdm

    index, count = int(cache_cfg["shard_index"]), int(cache_cfg["shard_count"])
    todo = shard_range(index, count, len(examples))
    writer = ShardWriter(shard_dir(directory, index, count), int(cache_cfg["top_k"]), str(cache_cfg["dtype"]),
                         samples=sampling is not None, block_bytes=int(cache_cfg.get("block_bytes", BLOCK_BYTES)))
    size = int(cache_cfg["batch_size"])
    with writer, tqdm(total=len(todo), initial=writer.progress.examples, desc=f"teacher cache shard {index}/{count}",
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
    size = sum((writer.directory / name).stat().st_size for name in (*writer.row_bytes, LENGTHS))
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
    sampling = {k: v for k, v in dict(cfg.policy.sampling).items() if k not in ENGINE_KEYS}  # the draw, not its engine
    teacher_sampling = TeacherSampling(SamplingSettings(**sampling), seed, eos_token_id)
    return teacher_sampling, sampled_targets(sampling, seed, int(cfg.cache.batch_size))


def training_command(overrides: list[str], cache_dir: str, targets: str) -> str:
    """The train.py command that reads this cache: the cache command's own overrides (task, data, sizes: the run must
    tokenize the same examples), less those of the cache and of the teacher it scored, with the cached teacher and a
    policy that trains on what was cached (ground truth: policy=supervised; teacher samples: policy=seqkd)."""
    def key(override: str) -> str:
        return override.split("=", 1)[0].lstrip("+~")

    dropped = ("cache", "teacher", "model@teacher", "hydra")
    kept = [o for o in overrides if key(o).split(".", 1)[0] not in dropped]
    policy = [] if any(key(o) == "policy" for o in kept) else [
        "policy=supervised" if targets == GROUND_TRUTH else "policy=seqkd"]
    return " ".join(["python train.py", "teacher=cached", f"teacher.dir={cache_dir}", *policy, *kept])


def main() -> None:
    """Console entry point: Hydra composes conf/cache_teacher.yaml (train.yaml plus the `cache` group)."""
    import sys

    from kdlab.teachers.entry import hydra_entry

    def run(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig

        try:
            cache_teacher(cfg)
        except CacheError as err:
            sys.exit(f"error: {err}")
        print("train on it with the same task overrides: "
              + training_command(list(HydraConfig.get().overrides.task), str(cfg.cache.dir), str(cfg.cache.targets)))

    hydra_entry("cache_teacher", run)


if __name__ == "__main__":
    main()
