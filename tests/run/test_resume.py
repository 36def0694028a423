"""Resuming into an existing run directory (kdlab.run.resume): the run's own overrides are reused, a change is refused
by name unless allowed, and a finished run's files stay byte for byte as they were.

The rewriting of the command line is checked on run directories laid out as train.py leaves them; the end-to-end
checks run train.py itself (an uninterrupted run against a resumed one is in test_resilience.py)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kdlab.run import rundir
from kdlab.run.resume import ResumeRefused, resume_argv
from tests.conftest import REPO, TINY_RUN

OWN = ["model@teacher=tiny", "loss=rkl", "seed=3", "tags=[a,b]"]


def _run_dir(root: Path, finished: bool, overrides=OWN) -> Path:
    """A run directory as train.py leaves it: its overrides, a checkpoint and, when finished, results.json."""
    run = root / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    rundir.last_checkpoint(run).parent.mkdir()
    rundir.last_checkpoint(run).write_bytes(b"ckpt")
    (run / rundir.CONFIG).write_text("seed: 3\n")
    if finished:
        (run / rundir.RESULTS).write_text('{"steps": 4}')
    return run


def _overrides(argv: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in argv if "=" in a)


def test_without_overrides_an_unfinished_run_goes_on_in_place_under_its_own(tmp_path):
    run = _run_dir(tmp_path, finished=False)
    argv = resume_argv([f"hydra.run.dir={run}", "ckpt_path=last"])
    got = _overrides(argv)
    assert [a for a in argv if a in OWN] == OWN
    assert got["hydra.run.dir"] == str(run) and got["ckpt_path"] == "last"
    # this attempt's Hydra record and config go beside the first start's, which stay
    assert got["hydra.output_subdir"] == "resumes/1/.hydra"
    assert got["resume.record_dir"] == str(run / "resumes" / "1")


def test_repeating_some_or_all_of_the_runs_overrides_is_no_change(tmp_path):
    run = _run_dir(tmp_path, finished=False)
    for given in (OWN, OWN[1:2], list(reversed(OWN))):
        argv = resume_argv([*given, f"hydra.run.dir={run}", "ckpt_path=last"])
        assert sorted(a for a in argv if a in OWN) == sorted(OWN)


def test_a_key_given_twice_is_compared_by_its_last_value_as_hydra_applies_it(tmp_path):
    """A command line built from a shared list and then a test's own (`TINY_RUN`, then `seed=4`) names a key twice;
    Hydra applies the last. The run started under seed=4, so the same command line resumes it; seed=5 last does not."""
    run = _run_dir(tmp_path, finished=False, overrides=["seed=2", "loss=rkl", "seed=4"])
    argv = resume_argv(["seed=2", "loss=rkl", "seed=4", f"hydra.run.dir={run}", "ckpt_path=last"])
    assert [a for a in argv if a.startswith("seed=")][-1] == "seed=4"
    with pytest.raises(ResumeRefused, match="seed=5 differs from the run's own seed=4"):
        resume_argv(["seed=4", "seed=5", f"hydra.run.dir={run}", "ckpt_path=last"])


@pytest.mark.parametrize("given, named", [
    (["loss=jsd"], "loss=jsd differs from the run's own loss=rkl"),
    (["seed=3", "reward=arith_correct"], "reward=arith_correct is not among the run's own overrides"),
    (["model@teacher=tiny", "+callbacks.x._target_=a.B"], "callbacks.x._target_=a.B is not among"),
])
def test_a_changed_or_added_override_is_refused_by_name(tmp_path, given, named):
    run = _run_dir(tmp_path, finished=False)
    with pytest.raises(ResumeRefused, match="resume.allow_changes=true") as refused:
        resume_argv([*given, f"hydra.run.dir={run}", "ckpt_path=last"])
    assert named in str(refused.value) and "\n" not in str(refused.value)


def test_allow_changes_replaces_and_adds_to_the_runs_overrides(tmp_path):
    run = _run_dir(tmp_path, finished=False)
    argv = resume_argv(["loss=jsd", "trainer.max_steps=8", f"hydra.run.dir={run}", "ckpt_path=last",
                        "resume.allow_changes=true"])
    got = _overrides(argv)
    assert (got["loss"], got["seed"], got["model@teacher"], got["trainer.max_steps"]) == ("jsd", "3", "tiny", "8")
    assert got["resume.allow_changes"] == "true"


def test_the_next_resume_compares_with_the_last_in_place_resume(tmp_path):
    """A run resumed with a change and stopped again resumes under the changed overrides, which its checkpoint holds."""
    run = _run_dir(tmp_path, finished=False)
    attempt = run / "resumes" / "1" / ".hydra"
    attempt.mkdir(parents=True)
    changed = ["model@teacher=tiny", "loss=jsd", "seed=3", "tags=[a,b]", "ckpt_path=last",
               f"resume.record_dir={attempt.parent}", "resume.allow_changes=true"]
    (attempt / "overrides.yaml").write_text(yaml.safe_dump(changed))
    assert _overrides(resume_argv([f"hydra.run.dir={run}", "ckpt_path=last"]))["loss"] == "jsd"
    with pytest.raises(ResumeRefused, match="loss=rkl differs from the run's own loss=jsd"):
        resume_argv(["loss=rkl", f"hydra.run.dir={run}", "ckpt_path=last"])
    assert _overrides(resume_argv([f"hydra.run.dir={run}", "ckpt_path=last"]))["hydra.output_subdir"] == \
        "resumes/2/.hydra"


def test_a_finished_run_is_resumed_into_a_run_directory_of_its_own(tmp_path):
    run = _run_dir(tmp_path, finished=True)
    got = _overrides(resume_argv([f"hydra.run.dir={run}", "ckpt_path=last"]))
    assert got["hydra.run.dir"] == str(run / "resumes" / "1")
    assert got["ckpt_path"] == str(rundir.last_checkpoint(run))
    assert "hydra.output_subdir" not in got and "resume.record_dir" not in got


@pytest.mark.parametrize("ckpt", [None, "auto", "some/other.ckpt"])
def test_a_fresh_start_into_a_finished_run_is_refused(tmp_path, ckpt):
    run = _run_dir(tmp_path, finished=True)
    rundir.last_checkpoint(run).unlink()  # keep_checkpoints=false: nothing to resume from either
    with pytest.raises(ResumeRefused, match="holds a finished run"):
        resume_argv([f"hydra.run.dir={run}", *([f"ckpt_path={ckpt}"] if ckpt else [])])


def test_commands_that_resume_nothing_are_left_as_written(tmp_path):
    run = _run_dir(tmp_path, finished=False)
    for argv in (["loss=fkl"], [f"hydra.run.dir={tmp_path / 'new'}", "ckpt_path=auto"],
                 ["-m", f"hydra.run.dir={run}", "ckpt_path=last", "loss=fkl"]):
        assert resume_argv(argv) == argv


def test_the_processes_lightning_starts_for_other_devices_repeat_rank_0s_command_line(tmp_path, monkeypatch):
    """Under trainer=ddp Lightning starts each other device's process with rank 0's (rewritten) command line plus its
    own `hydra.run.dir` and `hydra.output_subdir=null`: rewriting it again would pick another resumes/<n>."""
    run = _run_dir(tmp_path, finished=False)
    rank_0 = resume_argv([f"hydra.run.dir={run}", "ckpt_path=last"])
    # (Lightning quotes the directory, which alone would hide it here; a launcher that does not must not matter)
    child = [*rank_0, f"hydra.run.dir={run}", "hydra.job.name=train_ddp_process_1", "hydra.output_subdir=null"]
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resume_argv(child) == child


def _digests(directory: Path) -> dict[str, str]:
    files = [p for p in sorted(directory.rglob("*")) if p.is_file()]
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files
            if rundir.RESUMES not in p.relative_to(directory).parts}


def _train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_train_py_refuses_a_changed_override_in_one_line_before_anything_loads(tmp_path):
    run = _run_dir(tmp_path, finished=True)
    before = _digests(run)
    started = time.perf_counter()
    done = _train(f"hydra.run.dir={run}", "ckpt_path=last", "loss=jsd")
    assert done.returncode == 1
    assert done.stderr.strip() == (f"error: cannot resume {run}: loss=jsd differs from the run's own loss=rkl "
                                   f"({run}/.hydra/overrides.yaml); leave it off to resume under the run's own "
                                   "overrides, or add resume.allow_changes=true to change the run on purpose")
    assert time.perf_counter() - started < 20  # no model, no torch: the refusal is the entry point's first act
    assert _digests(run) == before and not (run / rundir.RESUMES).exists()


@pytest.mark.slow
def test_resuming_a_finished_run_writes_beside_it_and_leaves_its_files_byte_identical(tmp_path):
    run = tmp_path / "run"
    _check(_train(f"hydra.run.dir={run}", *TINY_RUN, "eval.before=false", "reward=arith_correct"))
    before, results = _digests(run), json.loads((run / rundir.RESULTS).read_text())
    done = _check(_train(f"hydra.run.dir={run}", "ckpt_path=last"))
    assert f"resuming {run} under its own overrides" in done.stdout
    assert _digests(run) == before
    resumed = run / rundir.RESUMES / "1"
    again = json.loads((resumed / rundir.RESULTS).read_text())
    assert again["steps"] == results["steps"] == 3  # the run's own trainer.max_steps=3, not the default 400
    assert again["metrics"] == results["metrics"]
    assert "reward=arith_correct" in results["overrides"] and results["choices"]["reward"]["name"] == "arith_correct"
    assert again["overrides"][-2:] == [f"ckpt_path={rundir.last_checkpoint(run)}", "resume.allow_changes=false"]
    # the run's own config, its reward included, not the default one
    reward = yaml.safe_load((resumed / rundir.CONFIG).read_text())["reward"]
    assert reward["fn"]["_target_"].endswith("FinalAnswerCorrect")


def _check(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, done.stderr[-3000:]
    return done
