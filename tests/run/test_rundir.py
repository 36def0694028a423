"""The run directory's markers: what a failed or interrupted job writes, per rank, what a finished job clears, and
that kdlab-report reads back what the job wrote."""

from __future__ import annotations

import json

import pytest

from kdlab.report.runs import load_run
from kdlab.run import rundir
from kdlab.run.rundir import CHECKPOINTS, FAILURE_MARKER, INTERRUPTION_MARKER, last_checkpoint


def _raised(err: BaseException) -> BaseException:
    try:
        raise err
    except BaseException as caught:
        return caught


def test_failure_marker_holds_one_line_the_message_and_the_traceback_and_the_report_reads_it(tmp_path):
    rundir.write_marker(tmp_path, _raised(ValueError("bad value\n  on two lines")))
    record = json.loads((tmp_path / FAILURE_MARKER).read_text())
    assert record["error"] == "ValueError: bad value on two lines"
    assert record["message"] == "bad value\n  on two lines"
    assert "Traceback" in record["traceback"] and "_raised" in record["traceback"]
    assert (load_run(tmp_path).status, load_run(tmp_path).error) == ("failed", record["error"])


def test_other_ranks_write_their_own_marker_which_the_report_falls_back_to(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "process_rank", lambda: 1)
    rundir.write_marker(tmp_path, _raised(RuntimeError("rank 1 ran out of memory")))
    assert not (tmp_path / FAILURE_MARKER).exists()
    assert [p.name for p in rundir.other_rank_markers(tmp_path, FAILURE_MARKER)] == ["failed_rank1.json"]
    record = load_run(tmp_path)
    assert (record.status, record.error) == ("failed", "RuntimeError: rank 1 ran out of memory")


def test_a_marker_that_cannot_be_written_warns_instead_of_raising(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    rundir.write_marker(blocker / "run", _raised(ValueError("x")), INTERRUPTION_MARKER)  # a file where a folder goes
    assert f"could not write {INTERRUPTION_MARKER}" in capsys.readouterr().err


@pytest.mark.parametrize("keep", [True, False])
def test_a_finished_job_clears_old_markers_and_keeps_checkpoints_only_when_asked(tmp_path, keep):
    for marker in (FAILURE_MARKER, INTERRUPTION_MARKER):
        (tmp_path / marker).write_text("{}")
    last_checkpoint(tmp_path).parent.mkdir()
    last_checkpoint(tmp_path).write_bytes(b"ckpt")
    rundir.mark_finished(tmp_path, keep_checkpoints=keep)
    assert not (tmp_path / FAILURE_MARKER).exists() and not (tmp_path / INTERRUPTION_MARKER).exists()
    assert (tmp_path / CHECKPOINTS).exists() == keep


def test_the_resume_command_repeats_the_runs_own_overrides(tmp_path):
    """What a lost server or a stop signal prints is the command that resumes this run, not a placeholder."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from kdlab.run.resolvers import register_resolvers
    from tests.conftest import CONF_DIR

    assert rundir.resume_command(tmp_path) == f"python train.py hydra.run.dir={tmp_path} ckpt_path=last"  # no Hydra
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["loss=rkl", "seed=3", "tags=[a b]", f"hydra.run.dir={tmp_path}",
                                          "ckpt_path=auto"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        assert rundir.resume_command(tmp_path) == (f"python train.py loss=rkl seed=3 'tags=[a b]' "
                                                   f"hydra.run.dir={tmp_path} ckpt_path=last")
    finally:
        HydraConfig.instance().cfg = None
