"""The fused step's cases, shared by tests/step/test_fused_step.py and the workers it starts (fused_step_fsdp.py,
fused_step_runs.py): the step around a tiny student and teacher with a batch, its fused or logits-path twin, and the
whole runs compared on 2 processes. Not a test module: workers import it, and no worker imports a test module."""

from __future__ import annotations

import copy

import torch

from kdlab.data.batch import Batch
from kdlab.data.datamodule import DistillationDataModule
from kdlab.data.tasks import Task
from kdlab.losses.objective import CROSS_TOKENIZER_LOSSES
from kdlab.models.loading import load_model, load_tokenizer
from kdlab.run.compose import task_node
from kdlab.sampling.base import SamplingSettings
from kdlab.step.step import DistillationStep
from tests.builders import distillation_step
from tests.conftest import REPO, compose, loss_config

TASK = {"name": "arith", "train_size": 16, "val_size": 4, "eval_examples": 4, "batch_size": 8, "eval_batch_size": 4,
        "generation": {"max_new_tokens": 4, "do_sample": False}}
TOKENS = 746  # the arith tokenizer
UNIGRAM = REPO / "src/kdlab/assets/arith/unigram_tokenizer"  # 389 tokens: a teacher with its own tokenizer
SAMPLING = SamplingSettings(max_new_tokens=4, do_sample=True)  # the student's own samples (on-policy cases)


def _model(role: str, preset: str, seed: int, *overrides: str, tokenizer=None):
    own = [f"{role}.tokenizer={tokenizer}"] if tokenizer is not None else []
    cfg = compose([f"{role}={preset}", *own, *(f"+{role}.config.{o}" for o in overrides)])[role]
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(seed)
    return load_model(cfg, tokenizer), tokenizer


def case_step(loss: str = "fkl", preset: str = "tiny", overrides: tuple[str, ...] = (), dtype=torch.float32,
              score_groups: int = 1, cross: bool | None = None, **loss_overrides) -> tuple[DistillationStep, Batch]:
    """The logits-path step (fused=False) around a tiny student and teacher of `preset`, and a batch of 8
    ground-truth rows of mixed lengths; with `cross` (default: for loss=ot|uld) the teacher has its own tokenizer
    (Unigram, 389 tokens), the batch its own tokens. `twin(step, fused=True)` is its fused counterpart."""
    student, tokenizer = _model("student", preset, 0, *overrides)
    cross = loss in CROSS_TOKENIZER_LOSSES if cross is None else cross
    teacher, teacher_tokenizer = (None, None) if loss == "sft" else _model(
        "teacher", preset, 1, *overrides, tokenizer=UNIGRAM if cross else None)
    task = Task.from_config(task_node(**TASK))
    step = distillation_step(student.to(dtype), tokenizer, loss_config(loss, **loss_overrides),
                             teacher=None if teacher is None else teacher.to(dtype),
                             teacher_tokenizer=teacher_tokenizer if cross else None, score_groups=score_groups)
    datamodule = DistillationDataModule(task, tokenizer, teacher_tokenizer=teacher_tokenizer if cross else None)
    datamodule.setup("fit")
    return step, next(iter(datamodule.train_dataloader()))


def twin(step: DistillationStep, fused: bool) -> DistillationStep:
    """The step again around copies of its models (the same weights), fused or on the logits path: the choice a run
    makes once (`kdlab.run.build.use_fused`). Raises with the reason where the fused path cannot run."""
    c = copy.deepcopy(step)  # one memo: the copied sampler and teacher hold the copied models
    return DistillationStep(c.student, c.tokenizer, c.objective, c.sampler, c.teacher, c.reward, fused,
                            c.score_groups)


def add_output_bias(step: DistillationStep) -> None:
    """Each model's output layer becomes a Linear with the same weight and a random bias (teacher frozen)."""
    for seed, model in enumerate((step.student, step.teacher.model)):
        old = model.get_output_embeddings()
        head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
        torch.manual_seed(seed)
        with torch.no_grad():
            head.weight.copy_(old.weight)
            head.bias.normal_(0.0, 1.0)
        model.set_output_embeddings(head)
    step.teacher.model.requires_grad_(False)


# -- whole runs: the config's default (loss.fused=true) against loss.fused=false, in one process, DDP and FSDP2 -----
RUN = ["teacher=tiny", "student=tiny", "trainer.max_steps=2", "trainer.log_every_n_steps=1", "task.train_size=16",
       "task.val_size=4", "task.eval_examples=4", "task.batch_size=4", "task.eval_batch_size=4",
       "task.generation.max_new_tokens=4", "policy.sampling.max_new_tokens=4", "eval.teacher=false",
       "eval.before=false", "checkpoint.every_n_train_steps=2", "loss=jsd", "loss.ce_weight=0.5"]
TWO_PROCESSES = ["trainer.accelerator=cpu", "trainer.devices=2"]
STRATEGIES = {"ddp": ["trainer=ddp", *TWO_PROCESSES], "fsdp": ["trainer=fsdp", *TWO_PROCESSES]}
# loss=ot with a teacher of its own tokenizer (the tiny teacher on the Unigram tokenizer), the CE term on
CROSS_RUN = [*(o for o in RUN if not o.startswith("loss")), "loss=ot", f"teacher.tokenizer={UNIGRAM}"]
# tests/workers/fused_step_runs.py's runs on 2 processes: (the run, the strategy) by name
TWO_PROCESS_RUNS = {"ddp": (RUN, STRATEGIES["ddp"]), "fsdp": (RUN, STRATEGIES["fsdp"]),
                    "ddp_ot": (CROSS_RUN, STRATEGIES["ddp"])}
