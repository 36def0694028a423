"""The last training step reaches the loggers whatever `log_every_n_steps` is, once, and results.json reports it."""

import csv
import json

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from kdlab.run.last_step import LogLastStep, final_train_metrics
from kdlab.run.train import run
from tests.conftest import TINY_RUN, compose


class Regression(L.LightningModule):
    """The smallest module that logs a step metric: a linear layer fit to zero."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch: list, batch_idx: int) -> torch.Tensor:
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("train/loss", loss)
        self.log("train/step_seen", float(self.global_step))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(64, 2, generator=torch.Generator().manual_seed(0))), batch_size=4)


def _fit(tmp_path, callbacks: list, **trainer_args) -> tuple[L.Trainer, list[dict]]:
    trainer = L.Trainer(logger=CSVLogger(tmp_path, name="csv", version=""), callbacks=callbacks,
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                        **trainer_args)
    trainer.fit(Regression())
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row["train/loss"]]
    return trainer, rows


def test_lightning_alone_skips_the_last_step_that_the_callback_logs_once(tmp_path):
    _, plain = _fit(tmp_path / "plain", [], max_steps=5, log_every_n_steps=2)
    trainer, rows = _fit(tmp_path / "last", [LogLastStep()], max_steps=5, log_every_n_steps=2)
    assert [int(r["step"]) for r in plain] == [1, 3]  # steps 2 and 4 of 5 (0-based 1, 3): step 5 never logged
    assert [int(r["step"]) for r in rows] == [1, 3, 4]
    assert [float(r["train/step_seen"]) for r in rows] == [1.0, 3.0, 4.0]  # the values of the step logged
    assert trainer.log_every_n_steps == 2  # the interval is the user's again after training


def test_a_run_shorter_than_the_interval_logs_its_last_step(tmp_path):
    trainer, rows = _fit(tmp_path, [LogLastStep()], max_steps=4, log_every_n_steps=10)
    assert [int(r["step"]) for r in rows] == [3]
    last = rows[-1]
    assert final_train_metrics(trainer) == {"loss": float(last["train/loss"]), "step_seen": 3.0}


def test_a_step_lightning_logs_anyway_is_logged_once(tmp_path):
    _, rows = _fit(tmp_path, [LogLastStep()], max_steps=4, log_every_n_steps=2)
    assert [int(r["step"]) for r in rows] == [1, 3]


def test_the_last_batch_of_the_last_epoch_is_logged_when_epochs_bound_the_run(tmp_path):
    _, rows = _fit(tmp_path, [LogLastStep()], max_epochs=2, limit_train_batches=3, log_every_n_steps=10)
    assert [int(r["step"]) for r in rows] == [5]


@pytest.mark.slow
def test_short_reward_run_logs_and_reports_its_training_metrics(tmp_path):
    """The issue's case: a 4-step reward run under the default interval of 10 logged no train/reward at all."""
    overrides = TINY_RUN + ["reward=arith_correct", "policy=onpolicy", "trainer.max_steps=4",
                            "trainer.log_every_n_steps=10"]
    run(compose(overrides, output_dir=tmp_path))
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row["train/loss"]]
    assert [int(r["step"]) for r in rows] == [3]
    logged = {k.removeprefix("train/"): float(v) for k, v in rows[0].items() if k.startswith("train/") and v}
    reported = json.loads((tmp_path / "results.json").read_text())["train"]
    assert {"loss", "reward", "pg", "distill", "jsd", "onpolicy_fraction", "tokens_per_sec"} <= set(reported)
    assert reported == logged  # exactly the last logged row of metrics.csv
    assert reported["onpolicy_fraction"] == 1.0 and 0.0 <= reported["reward"] <= 1.0
