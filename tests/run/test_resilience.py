"""Interruption and divergence: SIGTERM saves last.ckpt and a resumed run ends where an uninterrupted one does;
non-finite steps are skipped, and too many in a row stop the run with a good checkpoint."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from kdlab.run.rundir import CHECKPOINTS, LAST_CHECKPOINT, RESULTS, STUDENT, last_checkpoint
from kdlab.run.train import run
from kdlab.step.resilience import NonFiniteGuard, TrainingDiverged, step_seed
from tests.conftest import REPO, TINY_RUN, compose

# Mixed policy: half the steps sample from the student, so an exact resume needs the sampling RNG, the policy draw,
# the data order, the optimizer and the scheduler all restored.
RESUME_RUN = [*TINY_RUN, "trainer.max_steps=6", "policy=mixed", "eval.teacher=false", "eval.before=false",
              "checkpoint.every_n_train_steps=100"]


def _train(run_dir, *overrides, check=True):
    cmd = [sys.executable, "train.py", f"hydra.run.dir={run_dir}", *RESUME_RUN, *overrides]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def _weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / STUDENT / "model.safetensors"))


@pytest.mark.slow
def test_sigterm_saves_last_ckpt_and_the_resumed_run_ends_with_the_same_weights(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _train(straight)
    done = _train(killed, "+callbacks.kill._target_=tests.workers.callbacks.SignalAt", "+callbacks.kill.step=2",
                  check=False)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-3000:]
    assert "interrupted at step 3" in done.stderr + done.stdout
    assert last_checkpoint(killed).exists() and not (killed / RESULTS).exists()
    assert [p.name for p in (killed / CHECKPOINTS).iterdir()] == [LAST_CHECKPOINT]  # saved once: no last-v1.ckpt
    assert torch.load(last_checkpoint(killed), weights_only=False)["global_step"] == 3

    first_start = {name: (killed / name).read_bytes() for name in (".hydra/overrides.yaml", "config.yaml")}
    # the bare resume line (README): the run's own overrides, its callback included, come from its .hydra/
    resumed = subprocess.run([sys.executable, "train.py", f"hydra.run.dir={killed}", "ckpt_path=last"], cwd=REPO,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    results = json.loads((killed / RESULTS).read_text())
    # the first start's record stays; this resume's own is beside it
    assert {name: (killed / name).read_bytes() for name in first_start} == first_start
    assert (killed / "resumes" / "1" / "config.yaml").is_file()
    assert (killed / "resumes" / "1" / ".hydra" / "overrides.yaml").is_file()
    assert results["steps"] == 6 and results["metrics"] == json.loads((straight / RESULTS).read_text())["metrics"]
    ours, reference = _weights(killed), _weights(straight)
    assert ours.keys() == reference.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], reference[name], rtol=0, atol=1e-6, msg=name)
    # the resumed half sampled on-policy too (not only fixed data): a draw the policy makes from (seed, step)
    straight_results = json.loads((straight / RESULTS).read_text())
    assert straight_results["onpolicy_fraction"] > 0


def test_sigterm_outside_training_stops_the_run_at_once(tmp_path):
    done = _train(tmp_path, "eval.before=true", "+callbacks.kill._target_=tests.workers.callbacks.SignalOnValidation",
                  check=False)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-3000:]
    assert "outside training" in done.stderr
    assert not (tmp_path / CHECKPOINTS).exists() and not (tmp_path / RESULTS).exists()


def test_ckpt_path_last_without_a_checkpoint_says_how_to_fix_it_and_auto_starts_afresh(tmp_path):
    from kdlab.run.train import resolve_ckpt_path

    with pytest.raises(FileNotFoundError, match="ckpt_path=auto"):
        resolve_ckpt_path("last", tmp_path)
    assert resolve_ckpt_path("auto", tmp_path) is None
    (tmp_path / CHECKPOINTS).mkdir()
    last_checkpoint(tmp_path).write_bytes(b"")
    assert resolve_ckpt_path("auto", tmp_path) == str(last_checkpoint(tmp_path))


def _run_with(tmp_path, callback, overrides=()):
    from kdlab.run import train as train_module

    cfg = compose([*TINY_RUN, "trainer.max_steps=4", "eval.teacher=false", "eval.before=false",
                   "checkpoint.every_n_train_steps=1", *overrides], output_dir=tmp_path)
    original = train_module.build_trainer

    def build_with_callback(*args, **kwargs):
        trainer, preemption = original(*args, **kwargs)
        trainer.callbacks.append(callback)
        return trainer, preemption

    train_module.build_trainer = build_with_callback
    try:
        return run(cfg)
    finally:
        train_module.build_trainer = original


def _record_saves(monkeypatch) -> list[tuple[str, int]]:
    """(file name, global step) of every checkpoint the trainer writes."""
    import lightning as L

    saves, save = [], L.Trainer.save_checkpoint

    def recording(trainer, filepath, *args, **kwargs):
        saves.append((Path(filepath).name, trainer.global_step))
        return save(trainer, filepath, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "save_checkpoint", recording)
    return saves


def test_sigterm_saves_the_checkpoint_of_its_step_once(tmp_path, monkeypatch):
    from tests.workers.callbacks import SignalAt

    saves = _record_saves(monkeypatch)
    with pytest.raises(SystemExit) as stopped:
        _run_with(tmp_path, SignalAt(step=2), ["checkpoint.every_n_train_steps=100"])
    assert stopped.value.code == 128 + signal.SIGTERM
    assert saves == [(LAST_CHECKPOINT, 3)]
    assert [p.name for p in (tmp_path / CHECKPOINTS).iterdir()] == [LAST_CHECKPOINT]


def test_periodic_checkpoints_and_the_final_one_save_each_step_once(tmp_path, monkeypatch):
    saves = _record_saves(monkeypatch)
    _run_with(tmp_path, Callback(), ["checkpoint.every_n_train_steps=2"])  # 4 steps: saves at 2 and 4, the end
    assert saves == [(LAST_CHECKPOINT, 2), (LAST_CHECKPOINT, 4)]
    assert torch.load(last_checkpoint(tmp_path), weights_only=False)["global_step"] == 4


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_a_non_finite_step_is_skipped_and_training_goes_on(tmp_path, what):
    from tests.workers.callbacks import NonFiniteAt

    poison = NonFiniteAt(steps=[1], what=what)
    _run_with(tmp_path, poison)
    results = json.loads((tmp_path / RESULTS).read_text())
    assert results["steps"] == 4 and results["skipped_nonfinite_steps"] == 1
    for before, after in zip(poison.before[1], poison.after[1]):
        assert torch.equal(before, after)  # the poisoned step changed nothing
    assert any(not torch.equal(b, a) for b, a in zip(poison.before[2], poison.after[2]))  # the next one trained
    assert all(torch.isfinite(p).all() for p in poison.after[3])


def test_non_finite_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path):
    from tests.workers.callbacks import NonFiniteAt

    poison = NonFiniteAt(steps=[2, 3, 4], what="loss")
    with pytest.raises(TrainingDiverged, match=r"3 steps in a row .*lower optimizer.lr.*last.ckpt"):
        _run_with(tmp_path, poison, ["trainer.max_steps=6", "nonfinite.max_consecutive_steps=3"])
    checkpoint = torch.load(last_checkpoint(tmp_path), weights_only=False)
    weights = [v for k, v in checkpoint["state_dict"].items() if k.startswith("student.")]
    assert all(torch.isfinite(w).all() for w in weights)
    good = poison.after[1]  # the weights after the last good step are the ones the checkpoint holds
    for saved, expected in zip(weights, good):
        assert torch.equal(saved, expected)
    assert not (tmp_path / RESULTS).exists()


def test_guard_counts_only_consecutive_failures():
    guard = NonFiniteGuard(max_consecutive=2)
    guard.record(0, False, "loss")
    guard.record(1, True, "loss")
    guard.record(2, False, "loss")
    with pytest.raises(TrainingDiverged):
        guard.record(3, False, "gradient")
    assert guard.skipped == 3


def test_step_seeds_differ_by_step_rank_and_seed():
    seeds = {step_seed(s, t, r) for s in range(3) for t in range(50) for r in range(4)}
    assert len(seeds) == 3 * 50 * 4
