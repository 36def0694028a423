"""kdlab-cache-teacher: values equal to the teacher's own top-k, resume, shards, and the mismatch messages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdlab.run.compose import compose
from kdlab.teachers import cache as cache_module
from kdlab.teachers.cache import CacheError, cache_teacher, check_cache_matches, open_cache, run_fingerprints
from tests.conftest import REPO

torch.set_num_threads(1)  # a tiny model on a shared 2-core machine: one thread is several times faster than two

SMALL = ["teacher=arith_teacher", "task.train_size=23", "task.val_size=4", "cache.top_k=4", "cache.dtype=float32",
         "cache.batch_size=5"]


def _compose(overrides: list[str]):
    return compose(overrides, config_name="cache_teacher")


def _write(directory: Path, *extra: str) -> float:
    return cache_teacher(_compose([*SMALL, f"cache.dir={directory}", *extra]))


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("cache") / "one"
    _write(directory)
    return directory


@pytest.fixture(scope="module")
def run_inputs() -> tuple:
    """The student-side training examples and the teacher, built here independently of the writer."""
    from kdlab.data.datamodule import TokenizedExamples
    from kdlab.data.tasks import Task
    from kdlab.models.loading import load_model, load_tokenizer

    cfg = _compose(SMALL + ["cache.dir=unused"])
    tokenizer = load_tokenizer(cfg.student)
    task = Task.from_config(dict(cfg.task))
    examples = TokenizedExamples(task.splits()["train"], task, tokenizer, "train").items
    return cfg, tokenizer, examples, load_model(cfg.teacher, load_tokenizer(cfg.teacher)).eval()


def test_cached_values_are_the_teachers_top_k_of_each_target_token(one_shard, run_inputs) -> None:
    _, _, examples, teacher = run_inputs
    cache = open_cache(one_shard)
    assert len(cache) == len(examples) == 23 and cache.k == 4
    for index, example in enumerate(examples):
        prompt, target = example.student.prompt, example.student.target
        with torch.no_grad():  # one unpadded sequence: position p predicts token p + 1
            logits = teacher(input_ids=torch.tensor([prompt + target])).logits[0]
        full = torch.log_softmax(logits[len(prompt) - 1 : -1].double(), dim=-1)  # rows predicting target tokens
        top = full.topk(4)
        logprobs, ids, tail = cache[index]
        assert logprobs.shape == (len(target), 4)
        assert torch.equal(ids, top.indices)
        assert torch.allclose(logprobs.double(), top.values, atol=1e-5)
        assert torch.allclose(tail.double(), torch.log1p(-top.values.exp().sum(-1)), atol=1e-5)


def test_manifest_names_teacher_tokenizer_task_and_k(one_shard, run_inputs) -> None:
    cfg, tokenizer, examples, teacher = run_inputs
    manifest = open_cache(one_shard).manifest
    assert (manifest["top_k"], manifest["dtype"], manifest["shard_count"]) == (4, "float32", 1)
    expected = run_fingerprints(dict(cfg.task), tokenizer, examples, teacher, "arith-teacher")
    assert check_cache_matches(manifest, {**expected, "top_k": 4}) is None


def test_bytes_per_token_is_reported_and_counts_every_column(one_shard, capsys, tmp_path) -> None:
    per_token = _write(tmp_path / "again")
    rows = sum(len(open_cache(one_shard)[i][0]) for i in range(23))
    want = (rows * (4 * 4 + 4 * 4 + 4) + 23 * 8) / rows  # float32 log-probs, int32 ids, float32 tail, int64 lengths
    assert per_token == pytest.approx(want)
    assert f"{want:.1f} bytes per token" in capsys.readouterr().out
    assert open_cache(one_shard).bytes_per_token() == pytest.approx(want)


def test_resume_after_an_interruption_gives_identical_files(one_shard, tmp_path, monkeypatch) -> None:
    directory = tmp_path / "resumed"
    real, calls = cache_module.score_batch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_module, "score_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _write(directory)
    monkeypatch.undo()
    shard = directory / "shard-00000-of-00001"
    assert (shard / "progress.json").read_text() != ""
    with open(shard / "topk_ids.bin", "ab") as f:  # a batch the interruption left half written
        f.write(b"\x07" * 20)
    with pytest.raises(CacheError, match="shard 0 of 1 is incomplete \\(10 of 23 examples\\)"):
        open_cache(directory)
    _write(directory)
    assert _files(directory) == _files(one_shard)


def test_two_shards_together_equal_one(one_shard, tmp_path) -> None:
    """Same examples, same ids; values to float32 rounding (the batches around the shard boundary pad differently)."""
    directory = tmp_path / "two"
    _write(directory, "cache.shard_index=1", "cache.shard_count=2")
    with pytest.raises(CacheError, match="shard 0 of 2 is incomplete"):
        open_cache(directory)
    _write(directory, "cache.shard_index=0", "cache.shard_count=2")
    one, two = open_cache(one_shard), open_cache(directory)
    assert len(two.shards) == 2 and len(one) == len(two)
    for index in range(len(one)):
        (lp_a, ids_a, tail_a), (lp_b, ids_b, tail_b) = one[index], two[index]
        assert torch.equal(ids_a, ids_b)
        assert torch.allclose(lp_a, lp_b, atol=1e-5) and torch.allclose(tail_a, tail_b, atol=1e-5)


def test_half_precision_storage_keeps_values_to_its_precision(one_shard, tmp_path) -> None:
    exact = open_cache(one_shard)
    for dtype, tolerance in (("float16", 2**-10), ("bfloat16", 2**-7)):
        _write(tmp_path / dtype, f"cache.dtype={dtype}")
        stored = open_cache(tmp_path / dtype)
        assert stored.bytes_per_token() < exact.bytes_per_token()
        rounded = False
        for index in range(len(exact)):
            a, b = exact[index], stored[index]
            assert torch.equal(a[1], b[1])
            assert torch.allclose(b[0], a[0], rtol=tolerance, atol=1e-6)
            assert torch.allclose(b[2], a[2], rtol=tolerance, atol=1e-6)
            rounded |= not torch.equal(b[0], a[0])
        assert rounded, dtype  # the values really went through the narrow type


def test_a_cache_that_does_not_match_the_run_names_the_difference(one_shard, run_inputs) -> None:
    from kdlab.models.loading import load_tokenizer

    cfg, tokenizer, examples, _ = run_inputs
    manifest = open_cache(one_shard).manifest
    run = {**run_fingerprints(dict(cfg.task), tokenizer, examples), "top_k": 4}
    assert check_cache_matches(manifest, run) is None  # a run reading the cache does not load the teacher
    assert "top_k is 4 in the cache, 8 in this run" in check_cache_matches(manifest, {**run, "top_k": 8})
    other = load_tokenizer({"tokenizer": str(REPO / "src/kdlab/assets/arith/unigram_tokenizer")})
    mismatch = check_cache_matches(manifest, {**run_fingerprints(dict(cfg.task), other, examples), "top_k": 4})
    assert mismatch.startswith("the teacher cache does not match this run: tokenizer is ")
    task = {**dict(cfg.task), "max_target_tokens": 64}
    assert "task.max_target_tokens is 256 in the cache, 64 in this run" in check_cache_matches(
        manifest, {**run, "task": run_fingerprints(task, tokenizer, examples)["task"]})
    assert "data is " in check_cache_matches(manifest, {**run, "data": run_fingerprints(
        dict(cfg.task), tokenizer, examples[1:])["data"]})
    other_batch = run_fingerprints({**dict(cfg.task), "batch_size": 1}, tokenizer, examples)["task"]
    assert check_cache_matches(manifest, {**run, "task": other_batch}) is None  # batch size does not change scores


def test_writing_into_a_cache_built_for_another_k_or_teacher_stops(one_shard) -> None:
    with pytest.raises(CacheError, match="top_k is 4 in the cache, 8 in this run"):
        cache_teacher(_compose([*SMALL, f"cache.dir={one_shard}", "cache.top_k=8"]))
    with pytest.raises(CacheError, match="teacher.name is 'arith-teacher' in the cache, 'tiny"):
        cache_teacher(_compose([*SMALL, f"cache.dir={one_shard}", "teacher=tiny", "student=tiny"]))


def test_bad_cache_settings_are_listed_together() -> None:
    with pytest.raises(CacheError) as err:
        cache_teacher(_compose(["cache.top_k=0", "cache.dtype=int8", "cache.shard_index=2", "cache.shard_count=2"]))
    for key in ("cache.dir", "cache.top_k=0", "cache.dtype='int8'", "cache.shard_index=2"):
        assert key in str(err.value)


def test_the_command_line_writes_a_cache_and_refuses_a_mismatch_in_one_line(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}

    def command(*extra: str) -> subprocess.CompletedProcess:
        # a subprocess each time: Hydra's job logging, set up in-process, would outlive the test's captured streams
        return subprocess.run([sys.executable, "-m", "kdlab.teachers.cache", *SMALL, f"cache.dir={tmp_path}", *extra],
                              env=env, cwd=REPO, capture_output=True, text=True, timeout=300)

    out = command()
    assert out.returncode == 0, out.stderr[-2000:]
    assert "bytes per token" in out.stdout and "teacher cache shard 0/1" in out.stderr  # tqdm writes to stderr
    assert len(open_cache(tmp_path)) == 23
    refused = command("cache.top_k=8")
    assert refused.returncode == 1
    message = refused.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and "top_k is 4 in the cache, 8 in this run" in message
