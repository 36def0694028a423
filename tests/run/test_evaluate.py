"""eval.py (kdlab.run.evaluate): a tiny run's exported student and its checkpoint, scored again, give the run's own
final generations and score; the user errors are one line naming the key."""

import json
import sys

import pytest

from kdlab.run.compose import compose as compose_conf
from kdlab.run.evaluate import EVAL_RESULTS, evaluate_student, student_source
from kdlab.run.rundir import RESULTS
from kdlab.run.train import run
from kdlab.run.validate import ConfigError
from tests.conftest import REPO, TINY_RUN, compose

TASK = [o for o in TINY_RUN if o.startswith("task.")]


def _eval_config(*overrides: str, output_dir):
    return compose_conf([*overrides, *TASK, f"output_dir={output_dir}"], config_name="eval")


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    run(compose(TINY_RUN + ["export=true", "eval.teacher=false", "eval.before=false"], output_dir=run_dir))
    return run_dir


@pytest.mark.parametrize("source", ["student_dir", "ckpt_path"])
def test_a_scored_student_gives_the_runs_own_final_generations(tiny_run, tmp_path, source):
    where = tiny_run / "student" if source == "student_dir" else tiny_run / "checkpoints" / "last.ckpt"
    cfg = _eval_config(f"{source}={where}", output_dir=tmp_path)  # the student: the folder's, or the run's config
    results = evaluate_student(cfg)
    recorded = json.loads((tiny_run / RESULTS).read_text())
    assert results["metrics"]["accuracy"] == recorded["metrics"]["accuracy"]
    assert json.loads((tmp_path / EVAL_RESULTS).read_text())["metrics"] == results["metrics"]
    # the same greedy outputs for the same prompts: the weights, the tokenizer and the scoring are the run's
    ours, theirs = _lines(tmp_path / "generations" / "student.jsonl"), _lines(tiny_run / "generations" /
                                                                               "student_after.jsonl")
    assert [r["prediction"] for r in ours] == [r["prediction"] for r in theirs] and len(ours) == 8
    assert [r["prompt"] for r in ours] == [r["prompt"] for r in theirs]
    assert results["examples"] == 8 and (results["tensors_loaded"] is None) == (source == "student_dir")


def test_the_student_is_named_once_and_paths_that_do_not_exist_are_named(tmp_path):
    with pytest.raises(ConfigError, match="ckpt_path=.* or student_dir="):
        student_source(_eval_config(output_dir=tmp_path))
    with pytest.raises(ConfigError, match="one of the two"):
        student_source(_eval_config("ckpt_path=a", "student_dir=b", output_dir=tmp_path))
    with pytest.raises(ConfigError, match=f"looked for {tmp_path / 'nope.ckpt'}"):
        student_source(_eval_config(f"ckpt_path={tmp_path / 'nope.ckpt'}", output_dir=tmp_path))
    with pytest.raises(ConfigError, match="no exported model"):
        student_source(_eval_config(f"student_dir={tmp_path}", output_dir=tmp_path))


def test_eval_py_stops_with_one_line_and_runs_only_as_a_script(tmp_path, monkeypatch):
    """run_eval (eval.py's job) turns a user error into one line; importing eval.py runs nothing."""
    import importlib.util

    from kdlab.run.evaluate import run_eval

    with pytest.raises(SystemExit) as stop:
        run_eval(_eval_config(output_dir=tmp_path))
    assert str(stop.value.code).startswith("error: give the student to score: ckpt_path=")
    monkeypatch.setattr(sys, "argv", ["eval.py", "--help"])  # would print help and exit if main() ran on import
    spec = importlib.util.spec_from_file_location("_eval_entry", REPO / "eval.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
