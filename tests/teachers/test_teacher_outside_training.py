"""teacher=cached and teacher=remote in the training step: the same loss as the live teacher where k covers the
vocabulary, start-up refusals with their fixes, and a run that loses its server stops with a checkpoint it resumes
from exactly."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from kdlab.run.compose import compose as compose_conf
from kdlab.run.rundir import RESULTS, STUDENT, last_checkpoint
from kdlab.run.train import run
from kdlab.run.validate import ConfigError
from kdlab.teachers.cache import CacheError, cache_teacher
from kdlab.teachers.client import TeacherRefused, TeacherServerError
from kdlab.teachers.server import build_server
from tests.conftest import TINY_RUN, compose
from tests.workers.callbacks import SERVERS

VOCAB = 746  # the arith tokenizer: with k = VOCAB the top-k forms are the dense losses (no tail)
TEACHER = ["teacher=arith_teacher", "student=arith_student"]  # both loaded: the runs compared start alike
RUN = [*TINY_RUN, *TEACHER, "loss=fkl", "eval.teacher=false", "eval.before=false", "task.train_size=24",
       "task.eval_examples=4", "trainer.max_steps=2"]
def _serve(name: str = "teacher", *limits: str) -> str:
    cfg = compose_conf(["teacher=arith_teacher", "server.port=0", f"server.max_logprobs={VOCAB}", *limits],
                       config_name="serve_teacher")
    server = build_server(cfg)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    SERVERS[name] = server
    host, port = server.server_address[:2]
    return f"http://{host}:{port}"


@pytest.fixture
def served():
    url = _serve()
    yield url
    server = SERVERS.pop("teacher", None)
    if server is not None:
        server.shutdown()
        server.server_close()


def _run(run_dir: Path, *overrides: str) -> dict:
    run(compose([*RUN, *overrides], output_dir=run_dir))
    return json.loads((run_dir / RESULTS).read_text())


def _losses(run_dir: Path) -> list[float]:
    """train/loss of every step, from the run's metrics log."""
    import csv

    with (run_dir / "csv" / "metrics.csv").open() as f:
        return [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]


def _write_cache(directory: Path, *overrides: str) -> None:
    cfg = compose_conf([*RUN, f"cache.dir={directory}", f"cache.top_k={VOCAB}", "cache.dtype=float32", *overrides],
                       config_name="cache_teacher")
    cache_teacher(cfg)


@pytest.fixture(scope="module")
def full_cache(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("cache") / "k746"
    _write_cache(directory)
    return directory


def test_a_cache_of_the_whole_vocabulary_trains_as_the_live_teacher(full_cache, tmp_path):
    live = _run(tmp_path / "live", "policy=supervised")
    cached = _run(tmp_path / "cached", "policy=supervised", "teacher=cached", f"teacher.dir={full_cache}")
    assert _losses(tmp_path / "cached") == pytest.approx(_losses(tmp_path / "live"), rel=1e-5)  # both steps
    assert cached["steps"] == live["steps"] == 2 and cached["teacher"] is None
    ours, reference = (load_file(str(tmp_path / d / STUDENT / "model.safetensors")) for d in ("cached", "live"))
    for name in reference:  # Adam's first steps move each weight by about lr = 1e-3 whatever the gradient's size,
        # so float noise in a near-zero gradient shows at 1e-5 here: far below one step
        torch.testing.assert_close(ours[name], reference[name], rtol=0, atol=1e-4, msg=name)


def test_a_cache_written_for_other_data_stops_at_start_up_naming_the_difference(full_cache, tmp_path):
    with pytest.raises(CacheError, match=r"does not match this run: task.train_size is 24 in the cache, 20"):
        _run(tmp_path, "policy=supervised", "teacher=cached", f"teacher.dir={full_cache}", "task.train_size=20")
    with pytest.raises(CacheError, match=r"top_k is 746 in the cache, 32 in this run"):
        _run(tmp_path, "policy=supervised", "teacher=cached", f"teacher.dir={full_cache}", "teacher.top_k=32")


@pytest.mark.parametrize("overrides,message", [
    (["teacher=cached", "teacher.dir=x", "policy=mixed"], "use teacher=remote"),
    (["teacher=cached", "policy=supervised"], "teacher=cached needs teacher.dir"),
    (["teacher=remote", "teacher.url=http://127.0.0.1:1", "policy=seqkd"], "cannot sample SeqKD targets"),
    (["teacher=remote", "teacher.url=http://127.0.0.1:1", "loss=ot"], "has no top-k form"),
    (["teacher=remote", "teacher.url=http://127.0.0.1:1", "loss.temperature=2.0"], "use loss.temperature=1.0"),
])
def test_what_a_teacher_outside_cannot_do_is_refused_before_anything_loads(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        _run(tmp_path, *overrides)


def test_a_remote_teacher_scores_the_students_own_samples_as_the_live_teacher(served, tmp_path):
    remote = ["teacher=remote", f"teacher.url={served}", f"teacher.top_k={VOCAB}"]
    live = _run(tmp_path / "live", "policy=onpolicy", "trainer.max_steps=1")
    _run(tmp_path / "remote", "policy=onpolicy", "trainer.max_steps=1", *remote)
    assert live["onpolicy_fraction"] == 1.0
    assert _losses(tmp_path / "remote") == pytest.approx(_losses(tmp_path / "live"), rel=1e-5)


def test_a_run_that_loses_its_server_stops_with_a_checkpoint_and_resumes_exactly(served, tmp_path):
    common = ["policy=mixed", "trainer.max_steps=4", "teacher=remote", "teacher.top_k=8", "teacher.retries=0",
              "checkpoint.every_n_train_steps=100"]
    _run(tmp_path / "straight", *common, f"teacher.url={served}")
    lost = tmp_path / "lost"
    with pytest.raises(TeacherServerError, match=r"saved .*last.ckpt at step 2\. Resume"):
        _run(lost, *common, f"teacher.url={served}",
             "+callbacks.stop._target_=tests.workers.callbacks.ShutDownServerAt", "+callbacks.stop.step=2")
    assert torch.load(last_checkpoint(lost), weights_only=False)["global_step"] == 2
    results = _run(lost, *common, f"teacher.url={_serve()}", "ckpt_path=last")  # the server is back, elsewhere
    assert results["steps"] == 4
    ours, reference = (load_file(str(tmp_path / d / STUDENT / "model.safetensors")) for d in ("lost", "straight"))
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("limit,overrides,message", [
    ("server.max_logprobs=16", ["teacher.top_k=32"],
     r"prompt_logprobs must be an integer in \[0, 16\] \(server.max_logprobs\), got 32\): lower teacher.top_k"),
    ("server.max_tokens_per_sequence=300", [],  # arith: prompts up to 256 tokens, targets and samples up to 256
     r"prompt 0 has 512 tokens; at most 300 .*: shorten the run's sequences \(task.max_prompt_tokens"),
])
def test_a_server_that_refuses_what_the_run_will_ask_stops_it_at_start_up(tmp_path, limit, overrides, message):
    """A permanent refusal is not a lost server: the run stops before its first step (no checkpoint, nothing to
    resume) with the server's message and the fix, instead of failing at the first step that asks."""
    url = _serve("refusing", limit)
    try:
        with pytest.raises(TeacherRefused, match=message):
            _run(tmp_path, "policy=mixed", "teacher=remote", f"teacher.url={url}", "teacher.retries=0", *overrides)
    finally:
        server = SERVERS.pop("refusing")
        server.shutdown()
        server.server_close()
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / RESULTS).exists()


class RefuseFrom(Callback):
    """From optimizer step `step` on, the named server refuses k above 4, as a server restarted with a lower
    server.max_logprobs would."""

    def __init__(self, step: int, name: str = "teacher"):
        self.step, self.name = step, name

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            app = SERVERS[self.name].app
            app.limits = replace(app.limits, max_logprobs=4)


def test_a_refusal_mid_run_is_not_a_lost_server(served, tmp_path):
    """The step checkpoints and says "Resume" for TeacherLost only: a refusal would be refused again on resuming."""
    with pytest.raises(TeacherRefused, match=r"\(server.max_logprobs\), got 8\): lower teacher.top_k") as err:
        _run(tmp_path, "policy=supervised", "trainer.max_steps=4", "teacher=remote", f"teacher.url={served}",
             "teacher.top_k=8", "teacher.retries=0", f"+callbacks.refuse._target_={__name__}.RefuseFrom",
             "+callbacks.refuse.step=2")
    assert "Resume" not in str(err.value)
