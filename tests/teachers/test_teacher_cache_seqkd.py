"""SeqKD from a teacher cache: `cache.targets=teacher` stores the teacher's own samples and their top-k, and
`teacher=cached policy=seqkd` trains on exactly those samples without loading the teacher."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kdlab.run.compose import compose as compose_conf
from kdlab.run.train import run
from kdlab.teachers import cache as cache_module
from kdlab.teachers.cache import CacheError, cache_teacher, check_cache_matches, open_cache, sampled_targets
from tests.conftest import TINY_RUN, compose

torch.set_num_threads(1)  # a tiny model on a shared 2-core machine: one thread is several times faster than two

SEED, NEW_TOKENS, BATCH = 3, 96, 5
SAMPLES = ["teacher=arith_teacher", "task.train_size=23", "task.val_size=4", "cache.top_k=4", "cache.dtype=float32",
           f"cache.batch_size={BATCH}", "cache.targets=teacher", f"policy.sampling.max_new_tokens={NEW_TOKENS}",
           f"seed={SEED}"]
VOCAB = 746  # the arith tokenizer: with k = VOCAB a cache row is the teacher's whole distribution
RUN = [*TINY_RUN, "teacher=arith_teacher", "student=arith_student", "loss=fkl", "eval.teacher=false",
       "eval.before=false", "task.train_size=24", "task.eval_examples=4", "trainer.max_steps=1",
       "policy.sampling.max_new_tokens=64"]


def _write(directory: Path, *extra: str) -> float:
    cfg = compose_conf([*SAMPLES, f"cache.dir={directory}", *extra], config_name="cache_teacher")
    return cache_teacher(cfg)


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("seqkd") / "samples"
    _write(directory)
    return directory


@pytest.fixture(scope="module")
def run_inputs() -> tuple:
    """The student-side training examples, the tokenizer and the teacher, built here independently of the writer."""
    from kdlab.data.datamodule import TokenizedExamples
    from kdlab.data.tasks import Task
    from kdlab.models.loading import load_model, load_tokenizer

    cfg = compose_conf([*SAMPLES, "cache.dir=unused"], config_name="cache_teacher")
    tokenizer = load_tokenizer(cfg.student)
    task = Task.from_config(dict(cfg.task))
    examples = TokenizedExamples(task.splits()["train"], task, tokenizer, "train").items
    return cfg, tokenizer, examples, load_model(cfg.teacher, load_tokenizer(cfg.teacher)).eval()


def _teacher_draws(teacher, tokenizer, prompts: list[list[int]], seed: int) -> list[list[int]]:
    """The teacher's samples of a batch drawn with Hugging Face's generate directly: left-padded prompts, the
    policy's settings, cut after the first EOS."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        out = teacher.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=NEW_TOKENS,
                               temperature=1.0, top_p=1.0, top_k=0, pad_token_id=pad, eos_token_id=eos)
    return [row[: row.index(eos) + 1] if eos in row else row for row in out[:, width:].tolist()]


def test_cached_targets_are_the_teachers_samples_under_the_seed_of_each_batch(samples, run_inputs) -> None:
    _, tokenizer, examples, teacher = run_inputs
    cache = open_cache(samples)
    assert cache.holds_samples and len(cache) == len(examples) == 23
    drawn = []
    for first in range(0, 23, BATCH):  # the writer's batches; each draws under (seed, first example index)
        batch = examples[first : first + BATCH]
        drawn += _teacher_draws(teacher, tokenizer, [e.student.prompt for e in batch],
                                (SEED * 1_000_003 + first) % (2**63 - 1))
    cached = [cache.targets(i).tolist() for i in range(23)]
    assert cached == drawn
    assert sum(row != e.student.target for row, e in zip(cached, examples)) > 10  # samples, not the ground truth
    ends = [row[-1] == tokenizer.eos_token_id for row in cached]
    assert any(ends) and not all(ends)  # both: samples that stopped, and samples cut at max_new_tokens
    assert all(len(row) == NEW_TOKENS for row, end in zip(cached, ends) if not end)


def test_cached_top_k_is_the_teachers_log_softmax_on_its_own_samples(samples, run_inputs) -> None:
    _, _, examples, teacher = run_inputs
    cache = open_cache(samples)
    for index, example in enumerate(examples):
        prompt, target = example.student.prompt, cache.targets(index).tolist()
        with torch.no_grad():  # one unpadded sequence: position p predicts token p + 1
            logits = teacher(input_ids=torch.tensor([prompt + target])).logits[0]
        top = torch.log_softmax(logits[len(prompt) - 1 : -1].double(), dim=-1).topk(4)
        logprobs, ids, tail = cache[index]
        assert logprobs.shape == (len(target), 4)
        assert torch.equal(ids, top.indices)
        assert torch.allclose(logprobs.double(), top.values, atol=1e-5)
        assert torch.allclose(tail.double(), torch.log1p(-top.values.exp().sum(-1)), atol=1e-5)


def test_manifest_names_the_sampling_and_bytes_count_the_target_column(samples) -> None:
    cache = open_cache(samples)
    sampling = {"max_new_tokens": NEW_TOKENS, "do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
                "num_beams": 1}
    assert cache.manifest["targets"] == {"source": "teacher_samples", "sampling": sampling, "seed": SEED,
                                         "batch_size": BATCH}
    rows = sum(len(cache.targets(i)) for i in range(23))
    # float32 log-probs, int32 ids, float32 tail, int32 sampled target per row; int64 lengths per example
    assert cache.bytes_per_token() == pytest.approx((rows * (4 * 4 + 4 * 4 + 4 + 4) + 23 * 8) / rows)


def test_resume_after_an_interruption_gives_identical_files(samples, tmp_path, monkeypatch) -> None:
    directory = tmp_path / "resumed"
    real, calls = cache_module.sample_batch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_module, "sample_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _write(directory)
    monkeypatch.undo()
    shard = directory / "shard-00000-of-00001"
    assert json.loads((shard / "progress.json").read_text())["examples"] == 10
    with open(shard / "target_ids.bin", "ab") as f:  # a batch the interruption left half written
        f.write(b"\x07" * 12)
    with pytest.raises(CacheError, match="cache.batch_size is 5 in the cache, 6 in this run .*another cache.dir"):
        _write(directory, f"cache.batch_size={BATCH + 1}")  # other batches would draw other samples
    with pytest.raises(CacheError, match="cache.seed is 3 in the cache, 4 in this run"):
        _write(directory, "cache.seed=4")
    _write(directory)
    assert _files(directory) == _files(samples)


def test_the_sampled_targets_are_verified_whole_by_the_default_and_against_the_vocabulary(samples, tmp_path) -> None:
    copy = Path(shutil.copytree(samples, tmp_path / "copy"))
    path = copy / "shard-00000-of-00001" / "target_ids.bin"
    data = bytearray(path.read_bytes())
    data[-4:] = np.array([VOCAB], dtype="<i4").tobytes()  # the last row (verify=sampled reads this file whole)
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=re.escape(str(path)) + r": block 0 \(bytes 0-\d+\) does not match"):
        open_cache(copy)
    largest = max(int(open_cache(samples).targets(i).max()) for i in range(23))
    with pytest.raises(CacheError, match=rf"target_ids.bin: token id {largest} at row \d+ is outside the student's "
                                         rf"vocabulary \[0, {largest}\)"):
        open_cache(samples, vocab_size=largest)


def test_the_writer_refuses_other_targets_or_sampling_in_the_same_directory(samples) -> None:
    with pytest.raises(CacheError, match=r"targets are the teacher's samples \(cache.targets=teacher\) in the cache, "
                                         r"the ground truth \(cache.targets=ground_truth\) in this run"):
        _write(samples, "cache.targets=ground_truth")
    with pytest.raises(CacheError, match="policy.sampling.temperature is 1.0 in the cache, 0.7 in this run"):
        _write(samples, "policy.sampling.temperature=0.7")
    with pytest.raises(CacheError, match=r"cache.targets='beam': ground_truth .* or teacher"):
        _write(samples, "cache.targets=beam")


def test_a_training_run_compares_the_sampling_not_the_draw(samples) -> None:
    manifest = open_cache(samples).manifest
    run_sampling = {"max_new_tokens": NEW_TOKENS, "do_sample": True, "temperature": 1,  # int 1 == 1.0
                    "compile": True}  # compile: same tokens
    assert check_cache_matches(manifest, {"targets": sampled_targets(run_sampling)}) is None
    assert check_cache_matches(manifest, {"targets": sampled_targets({**run_sampling, "top_p": 0.9})}) == (
        "the teacher cache does not match this run: policy.sampling.top_p is 1.0 in the cache, 0.9 in this run")


# -- training --------------------------------------------------------------------------------------------------------
def _write_run_cache(directory: Path, *extra: str) -> Path:
    cfg = compose_conf([*RUN, f"cache.dir={directory}", "cache.dtype=float32", *extra], config_name="cache_teacher")
    cache_teacher(cfg)
    return directory


@pytest.fixture(scope="module")
def run_caches(tmp_path_factory) -> dict[str, Path]:
    """A SeqKD cache of the whole vocabulary (rows are the teacher's full distribution) and a ground-truth one."""
    root = tmp_path_factory.mktemp("run_caches")
    return {"teacher": _write_run_cache(root / "samples", "cache.targets=teacher", f"cache.top_k={VOCAB}"),
            "ground_truth": _write_run_cache(root / "ground_truth", "cache.top_k=4")}


def _first_loss(run_dir: Path) -> float:
    with (run_dir / "csv" / "metrics.csv").open() as f:
        return [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")][0]


def _loss_by_hand(cfg, cache_dir: Path) -> float:
    """Forward KL(teacher || student), mean over the tokens of step 0's batch, on each example's cached sample:
    the student reads prompt + sample alone (no padding), the teacher's distribution is its cache row."""
    from kdlab.data.datamodule import DistillationDataModule
    from kdlab.data.tasks import Task
    from kdlab.models.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(cfg.student)
    data = DistillationDataModule(Task.from_config(cfg.task), tokenizer, seed=int(cfg.seed))
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))  # step 0's rows (the order is a function of seed and step)
    student, cache = load_model(cfg.student, tokenizer).eval(), open_cache(cache_dir)
    total, tokens = 0.0, 0
    for index in batch.index.tolist():
        prompt, target = data.train_set[index].student.prompt, cache.targets(index).tolist()
        with torch.no_grad():
            logits = student(input_ids=torch.tensor([prompt + target])).logits[0, len(prompt) - 1 : -1, :VOCAB]
        logprobs, ids, _ = cache[index]
        teacher = torch.full((len(target), VOCAB), -torch.inf, dtype=torch.float64).scatter(1, ids, logprobs.double())
        student_lp = torch.log_softmax(logits.double(), dim=-1)
        total += float((teacher.exp() * (teacher - student_lp)).nan_to_num().sum())
        tokens += len(target)
    return total / tokens


def test_seqkd_with_a_cached_teacher_trains_on_the_cached_samples(run_caches, tmp_path) -> None:
    overrides = [*RUN, "policy=seqkd", "teacher=cached", f"teacher.dir={run_caches['teacher']}"]
    run(compose(overrides, output_dir=tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["steps"] == 1 and results["teacher"] is None and results["onpolicy_fraction"] == 0.0
    want = _loss_by_hand(compose(overrides), run_caches["teacher"])
    assert _first_loss(tmp_path) == pytest.approx(want, rel=1e-4)


def test_a_cache_of_other_targets_or_sampling_is_refused_naming_the_difference(run_caches, tmp_path) -> None:
    cached = ["teacher=cached", "teacher.dir={}"]
    with pytest.raises(CacheError, match=r"targets are the ground truth \(cache.targets=ground_truth\) in the cache, "
                                         r"the teacher's samples \(cache.targets=teacher\) in this run.*"
                                         r"kdlab-cache-teacher <this run's overrides> cache.targets=teacher"):
        run(compose([*RUN, "policy=seqkd", cached[0], cached[1].format(run_caches["ground_truth"])], tmp_path))
    with pytest.raises(CacheError, match=r"targets are the teacher's samples \(cache.targets=teacher\) in the cache, "
                                         r"the ground truth \(cache.targets=ground_truth\) in this run"):
        run(compose([*RUN, "policy=supervised", cached[0], cached[1].format(run_caches["teacher"])], tmp_path))
    with pytest.raises(CacheError, match="policy.sampling.max_new_tokens is 64 in the cache, 32 in this run"):
        run(compose([*RUN, "policy=seqkd", cached[0], cached[1].format(run_caches["teacher"]),
                     "policy.sampling.max_new_tokens=32"], tmp_path))
    ground_truth = open_cache(run_caches["ground_truth"])
    assert not ground_truth.holds_samples
    with pytest.raises(CacheError, match="not samples: write a SeqKD cache with .* cache.targets=teacher"):
        ground_truth.targets(0)


def test_seqkd_is_refused_for_a_remote_teacher_only() -> None:
    from kdlab.teachers.build import teacher_errors

    assert teacher_errors(compose([*RUN, "policy=seqkd", "teacher=cached", "teacher.dir=x"])) == []
    errors = teacher_errors(compose([*RUN, "policy=seqkd", "teacher=remote", "teacher.url=http://x"]))
    assert len(errors) == 1 and "cannot sample SeqKD targets" in errors[0] and "cache.targets=teacher" in errors[0]
