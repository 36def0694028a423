"""Integrity of a teacher cache (kdlab.teachers.cache): block checksums, the stored values' ranges, the writer's lock.

A run trusts a cache without seeing its teacher, so damage must stop the run before it trains, not turn into a
wrong loss. The pieces here know nothing of the cache's layout; kdlab.teachers.cache puts them together:

- `BlockChecksums`: the crc32 of every `block_bytes` block of a file, kept by the writer from the bytes it appends
  (the last entry is the running value of the partial block, so a resumed writer continues it from progress.json).
  crc32 because it is incremental and fast (~2 GB/s in one thread here); it finds damage, not forgery: whoever can
  edit the files can edit their checksums, which is why the values are range-checked as well.
- `choose_blocks`: which blocks the reader re-reads for `teacher.verify=full|sampled|off`.
- `nonpositive`, `decode`: log-probabilities checked on their bits (no NaN, nothing above 0) and widened to float.
- `WriterLock`: an flock on a lock file, released by the OS when the writer dies, naming the writer that holds it.
"""

from __future__ import annotations

import fcntl
import math
import os
import socket
import time
import zlib
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from kdlab.run.validate import ConfigError

BLOCK_BYTES = 1 << 20  # 1 MiB: ~300 checksums for a 300 MB cache, and a sampled block costs well under a millisecond
VERIFY_MODES = ("sampled", "full", "off")


class CacheError(ConfigError):
    """A cache that cannot be written or read as asked; one line naming the file, the difference and the fix.

    A ConfigError, so `train.py` prints it as one line without a traceback, as it does a bad override."""


def block_count(size: int, block_bytes: int) -> int:
    return -(-size // block_bytes)


class BlockChecksums:
    """crc32 of consecutive `block_bytes` blocks of a file that only grows; `values[-1]` is the partial block's."""

    def __init__(self, block_bytes: int, values: Sequence[int] = (), size: int = 0):
        if len(values) != block_count(size, block_bytes):
            raise ValueError(f"{len(values)} checksums for {size} bytes in blocks of {block_bytes}")
        self.block_bytes, self.values, self.size = block_bytes, list(values), size

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            used = self.size % self.block_bytes
            if used == 0:
                self.values.append(0)  # crc32 of nothing; crc32(data, 0) == crc32(data)
            take = min(self.block_bytes - used, len(view))
            self.values[-1] = zlib.crc32(view[:take], self.values[-1])
            view, self.size = view[take:], self.size + take


def read_block(path: Path, block: int, block_bytes: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(block * block_bytes)
        return f.read(block_bytes)


def choose_blocks(counts: Mapping[Hashable, int], sampled: set[Hashable], mode: str, sample: int,
                  seed: int) -> dict[Hashable, list[int]]:
    """The blocks to re-read of each file (`counts`: file -> its number of blocks).

    full: all. off: none. sampled: every block of the files not in `sampled` (the small columns, read whole), and of
    the files in `sampled` (the (rows, k) columns) the first and the last block of each plus `sample` blocks drawn
    without replacement from all their other blocks together, by a generator seeded with `seed`: the same blocks
    for the same cache and seed, other blocks for another seed.
    """
    if mode not in VERIFY_MODES:
        raise ValueError(f"verify={mode!r}: one of {', '.join(VERIFY_MODES)}")
    if mode == "off":
        return {key: [] for key in counts}
    chosen = {key: list(range(n)) if mode == "full" or key not in sampled else sorted({0, n - 1}) if n else []
              for key, n in counts.items()}
    if mode == "sampled":
        middle = [(key, b) for key, n in counts.items() if key in sampled for b in range(1, n - 1)]
        picks = np.random.default_rng(seed).choice(len(middle), size=min(sample, len(middle)), replace=False)
        for i in sorted(int(p) for p in picks):
            chosen[middle[i][0]].append(middle[i][1])
        for key in chosen:
            chosen[key].sort()
    return chosen


# -- values ---------------------------------------------------------------------------------------------------------
# stored dtype -> (its bits as an unsigned integer, the sign bit, -inf's bits). IEEE order on bits: a value is not
# NaN and at most 0 exactly when its bits are +0, or carry the sign bit and are at most -inf's (negative NaNs lie
# above -inf). Tested against numpy's float comparisons over every 16-bit pattern.
BITS = {"float32": (np.dtype("<u4"), 0x80000000, 0xFF800000), "float16": (np.dtype("<u2"), 0x8000, 0xFC00),
        "bfloat16": (np.dtype("<u2"), 0x8000, 0xFF80)}
# storage rounding of a log-probability: half an ulp, relative (2^-(mantissa bits + 1))
HALF_ULP = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}


def nonpositive(bits: np.ndarray, dtype: str) -> np.ndarray:
    """Where the stored values (as their bits) are neither NaN nor above 0; -inf passes (an impossible token)."""
    _, sign, neg_inf = BITS[dtype]
    return (bits == 0) | ((bits >= sign) & (bits <= neg_inf))


def decode(bits: np.ndarray, dtype: str) -> np.ndarray:
    """The stored bits as float32 (bfloat16 is the top half of a float32)."""
    bits = np.ascontiguousarray(bits)
    with np.errstate(invalid="ignore"):  # NaN payloads widen quietly: the checks report them
        if dtype == "float32":
            return bits.view("<f4").astype(np.float32)
        if dtype == "float16":
            return bits.view("<f2").astype(np.float32)
        return (bits.astype(np.uint32) << 16).view(np.float32)


def mass_tolerance(dtype: str, k: int) -> float:
    """How far from 1 a row's top-k probabilities plus its tail may sum after storage rounding.

    Rounding moves log p by at most |log p| * HALF_ULP, so p by a factor exp(+-|log p| * HALF_ULP); summed, the
    mass moves by about HALF_ULP * sum p |log p| <= HALF_ULP * log(k + 1) (the entropy of k + 1 buckets). Twice that,
    plus 1e-4 for the float32 arithmetic that made the values: 0.0045 for float16 at k = 32, 0.035 for bfloat16.
    """
    return 2 * HALF_ULP[dtype] * (math.log(k + 1) + 1) + 1e-4


def mass_errors(logprobs: np.ndarray, tail: np.ndarray) -> np.ndarray:
    """sum_i p_i + p_tail - 1 of each row. In float32, whose rounding (~1e-6 over k + 1 terms) is far inside the
    1e-4 that mass_tolerance allows for it, and which the full check's hundreds of millions of values need."""
    return np.exp(logprobs, dtype=np.float32).sum(axis=-1) + np.exp(tail, dtype=np.float32) - np.float32(1.0)


# -- locks ----------------------------------------------------------------------------------------------------------
class WriterLock:
    """An exclusive flock on `path`, which then names its holder (pid, host, start time) for whoever is refused.

    The OS drops the lock when the holder's process ends however it ends, so a writer that crashed blocks nobody;
    its text stays until the next writer overwrites it, and a clean release empties the file."""

    def __init__(self, path: Path, what: str):
        self.path, self.what, self.fd = Path(path), what, None

    def __enter__(self) -> WriterLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise CacheError(f"{self.path}: {self.what} is being written by {holder}; two writers would interleave "
                             f"their rows: wait for that one to finish, or stop it (its lock goes with its process) "
                             f"and run this again to resume") from None
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        os.pwrite(fd, f"kdlab-cache-teacher pid {os.getpid()} on host {socket.gethostname()} since {started}\n"
                  .encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


@contextmanager
def directory_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive flock on the directory itself for a short read-compare-write (the manifest), waiting
    for another process that holds it: shards started together then agree on one manifest."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock
