"""Worker of tests/step/test_normalisation.py, started by torchrun on 2 processes: every case's DDP run, one after the
other in the same process group (one start-up instead of five). The runs are defined here; the test imports them."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.conftest import compose

# Supervised targets make a step a function of the weights, so runs can be compared; 3 steps of 8 examples each.
WHOLE_RUN = ["teacher=tiny", "student=tiny", "trainer.max_steps=3", "trainer.log_every_n_steps=1", "task.train_size=48",
             "task.val_size=8", "task.eval_examples=4", "task.eval_batch_size=4", "task.generation.max_new_tokens=4",
             "checkpoint.every_n_train_steps=100", "policy=supervised", "eval.teacher=false", "eval.before=false"]
CASES = {
    "jsd": [],
    "sequence_mean": ["loss.reduction=sequence_mean"],
    "sft": ["loss=sft", "teacher=none"],
    "ot": ["loss=ot", "teacher=arith_unigram_teacher"],
    "uld": ["loss=uld", "teacher=arith_unigram_teacher"],
}
TWO_PROCESSES = ["task.batch_size=4", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]

if __name__ == "__main__":
    from kdlab.run.train import run

    root = Path(sys.argv[1])
    for case, overrides in CASES.items():
        run(compose([*WHOLE_RUN, *overrides, *TWO_PROCESSES], output_dir=root / case / "ddp"))
