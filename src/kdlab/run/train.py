"""`run(cfg)`: one distillation experiment from a composed config, top to bottom.

validate (config, data, tokenizers) -> seed -> tokenize data -> models -> module -> loggers, callbacks, trainer ->
score teacher and student -> fit -> score student -> export student -> results.json. Loggers close in `finally`,
so one failed job cannot break a sweep.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from kdlab.data.datamodule import DistillationDataModule
from kdlab.data.sources import DataUnavailableError
from kdlab.data.tasks import Task
from kdlab.evaluation.generations import evaluate
from kdlab.evaluation.mismatch import MISMATCH_KEYS
from kdlab.models.loading import HubUnavailableError, load_tokenizer, same_vocabulary
from kdlab.run import rundir
from kdlab.run.build import build_loggers, build_module, build_trainer, sampler_factory
from kdlab.run.checkpoints import PreemptionCheckpoint, RunInterrupted, stop_on_sigterm
from kdlab.run.console import run_end_lines, run_start_line, setup_console
from kdlab.run.last_step import final_train_metrics
from kdlab.run.record import run_choices
from kdlab.run.resolvers import in_multirun, register_resolvers
from kdlab.run.resume import next_resume_dir
from kdlab.run.validate import ConfigError, config_errors, device_errors, raise_if_any, vocabulary_errors
from kdlab.step.module import DistillationModule
from kdlab.step.resilience import TrainingDiverged
from kdlab.teachers.build import MODEL, build_teacher, member_tokenizer_errors, route_field, teacher_kind

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def validate(cfg: DictConfig) -> tuple[Any, Any, Task | None]:
    """Check the whole config and that its data and models can be found, before anything heavy is built.

    Returns the (student, teacher) tokenizers it loaded to compare vocabularies (the teacher's when it is a model in
    this process) and the task with its examples read.
    """
    errors = config_errors(cfg) + device_errors(cfg.trainer)
    task = None
    if not errors:
        try:
            task = Task.from_config(cfg.task)
            task.splits()  # reads (or downloads) the examples now: a missing dataset fails here, not mid-run
        except (DataUnavailableError, ValueError, OSError) as err:
            errors.append(f"task {cfg.task.get('name')}: {err}")
    tokenizers = {}
    for role in ("student", "teacher"):
        if cfg.get(role) is None or (role == "teacher" and teacher_kind(cfg.teacher) != MODEL):
            tokenizers[role] = None  # outside teachers are checked against the student's tokenizer as they open
            continue
        try:
            tokenizers[role] = load_tokenizer(cfg[role])
        except (OSError, ValueError, HubUnavailableError) as err:
            errors.append(f"{role}: {err}")
            tokenizers[role] = None
    if not errors:
        errors += member_tokenizer_errors(cfg.get("teacher"), tokenizers["student"])
    if tokenizers["student"] is not None and tokenizers["teacher"] is not None:
        errors += vocabulary_errors(
            cfg.loss.name,
            same_vocabulary(tokenizers["student"], tokenizers["teacher"]),
            cfg.student.get("name"),
            cfg.teacher.get("name"),
        )
    raise_if_any(errors)
    return tokenizers["student"], tokenizers["teacher"], task


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """`ckpt_path=last` resumes from this run directory's `checkpoints/last.ckpt` (which must exist); `auto` resumes
    from it when it exists and starts afresh otherwise (for jobs a scheduler may requeue); a path is used as is."""
    last = rundir.last_checkpoint(output_dir)
    if ckpt_path == "last":
        if not last.exists():
            raise FileNotFoundError(f"ckpt_path=last: {last} does not exist; point hydra.run.dir at the run to "
                                    "resume, or use ckpt_path=auto to start afresh when there is no checkpoint")
        return str(last)
    if ckpt_path == "auto":
        return str(last) if last.exists() else None
    return ckpt_path


def config_file(cfg: DictConfig, output_dir: Path, ckpt_path: str | None) -> Path:
    """Where the resolved config goes: `<run>/config.yaml`, but a resume in place keeps the first start's and writes
    its own into `<run>/resumes/<n>/` (kdlab.run.resume; train.py names it in `resume.record_dir`)."""
    first = output_dir / rundir.CONFIG
    if ckpt_path is None or not first.exists():
        return first
    record_dir = cfg.get("resume", {}).get("record_dir")
    record_dir = Path(record_dir) if record_dir else next_resume_dir(output_dir)
    record_dir.mkdir(parents=True, exist_ok=True)
    return record_dir / rundir.CONFIG


def fit(trainer: L.Trainer, preemption: PreemptionCheckpoint, module: DistillationModule, datamodule: Any,
        ckpt_path: str | None, output_dir: Path) -> float:
    """Train; returns the wall time in seconds. A run that diverged or was stopped by a signal raises with where its
    checkpoint is (and, when stopped, how to resume), so the job's marker says it."""
    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except TrainingDiverged as err:
        raise TrainingDiverged(f"{err}. Checkpoint: {rundir.last_checkpoint(output_dir)}") from None
    if preemption.stopped_by is not None:
        last = rundir.last_checkpoint(output_dir)
        message = (f"interrupted at step {preemption.stopped_at_step}; {last} is saved. "
                   f"Resume with: {rundir.resume_command(output_dir)}")
        raise RunInterrupted(preemption.stopped_by, message)
    return time.perf_counter() - start


def results_record(cfg: DictConfig, task: Task, trainer: L.Trainer, module: DistillationModule,
                   scores: dict[str, dict[str, float] | None], wall_time: float) -> dict[str, Any]:
    """What `results.json` holds: the scores of teacher and student (before and after), the run's size and speed
    (train_time_s: fit only; total_time_s: the whole run), the settings a comparison groups runs by, the resolved
    choices (kdlab.run.record.run_choices) and the command-line overrides."""
    return {
        "task": task.name,
        "metric": task.metric_name,
        "metrics": scores["student_after"],
        **scores,
        "steps": trainer.global_step,
        "train_time_s": round(wall_time, 3),
        "wall_time_s": round(wall_time, 3),  # the training time, as read before train_time_s (kdlab.report reads it)
        "total_time_s": None,  # set once the run is done: start-up, scoring, training and export
        "train_tokens": module.train_tokens,
        "tokens_per_sec": round(module.train_tokens / max(wall_time, 1e-9), 2),
        "onpolicy_fraction": module.onpolicy_fraction,
        "skipped_nonfinite_steps": module.nonfinite.skipped,
        "loss": cfg.loss.name,
        "student_fraction": float(cfg.policy.student_fraction),
        "seed": int(cfg.seed),
        "choices": run_choices(cfg),
        "overrides": command_line_overrides(),
        "data": task.report.to_dict(),
    }


def command_line_overrides() -> list[str]:
    """The run's command-line overrides as Hydra read them ([] outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def evaluate_and_save(trainer: L.Trainer, module: DistillationModule, datamodule: Any, role: str,
                      save_as: Path) -> dict[str, float]:
    """The task metric of `role` ("student" or "teacher") by generation on the validation split, and for the student
    the teacher's view of its outputs (kdlab.evaluation.mismatch: own_teacher_nll, own_fkl, own_rkl); the generations
    go to `save_as` (JSON lines: prediction, reference) so a score can be checked by reading what was scored."""
    generations = evaluate(trainer, module, datamodule, role)
    if trainer.is_global_zero:
        generations.write_jsonl(save_as)
    return {**generations.scores, **generations.mismatch}


def format_results_table(results: dict[str, Any]) -> str:
    rows = [("teacher", results["teacher"]), ("student before", results["student_before"]),
            ("student after", results["student_after"])]
    # the task's scores; the mismatch measures (kdlab.evaluation.mismatch) have no teacher row and stay in results.json
    names = [name for name in results["metrics"] if name not in MISMATCH_KEYS]
    lines = [f"{'':16}" + "".join(f"{n:>12}" for n in names)]
    for label, scores in rows:
        cells = "".join(f"{scores[n]:>12.4f}" if scores and n in scores else f"{'-':>12}" for n in names)
        lines.append(f"{label:16}" + cells)
    if results.get("teacher_not_scored"):
        lines.append(f"(teacher not scored: {results['teacher_not_scored']})")
    return "\n".join(lines)


def teacher_not_scored(cfg: DictConfig, teacher: Any) -> str | None:
    """Why the teacher row stays empty, or None when the teacher is scored: only a teacher that generates (a model in
    this process) writes answers to score; several teachers mix per token, and none of them is "the" teacher."""
    if teacher is None:
        return "no teacher"
    if not cfg.eval.teacher:
        return "eval.teacher=false"
    if teacher.generates:
        return None
    kind = teacher_kind(cfg.teacher)
    if kind == "several":
        return (f"{len(cfg.teacher.members)} teachers ({', '.join(cfg.teacher.members)}) mix per token; no one of "
                "them generates for the run")
    return f"a {kind} teacher has no model in this run to generate answers with"


def run(cfg: DictConfig) -> float:
    """Run one experiment; returns the student's final task metric (what a sweeper optimises).

    SIGTERM stops it at any point: at the end of the current step while training (after saving last.ckpt), at once
    before and after training."""
    try:
        with stop_on_sigterm(Path(cfg.output_dir)):
            return _run(cfg)
    except RunInterrupted as err:
        if rank_zero_only.rank == 0:
            print(err.message, file=sys.stderr, flush=True)
        raise


def run_job(cfg: DictConfig) -> float:
    """`run` as one Hydra job (what the root train.py calls): the job's directory records how the job ended, for
    `kdlab-report` and for a resume.

    A job that raises leaves `failed.json` (the error in one line, and the traceback). In a multirun the error then
    goes back to Hydra, whose launcher records it and goes on with the next job (it re-raises the first failure once
    the sweep is done), so `kdlab-report` can list the failed run beside the others' results. A job stopped by a
    signal or Ctrl-C leaves `interrupted.json` instead (it can resume) and stops the sweep. A job that finishes
    clears the markers of an earlier attempt in the same directory.
    """
    run_dir = Path(cfg.output_dir)  # Hydra's job directory unless output_dir is set (a resume of a finished run)
    try:
        value = run(cfg)
    except Exception as err:
        rundir.write_marker(run_dir, err, rundir.FAILURE_MARKER)
        if isinstance(err, ConfigError) and not in_multirun():
            sys.exit(f"error: {err}")  # the message lists every problem and its fix; a stack trace would only bury it
        # In a multirun, SystemExit would end the whole sweep: an exception lets Hydra go on with the next job.
        print(f"error: job failed: {type(err).__name__}: {err}", file=sys.stderr)
        raise
    except (KeyboardInterrupt, SystemExit) as err:  # stopped on a signal: resumable, so unfinished rather than failed
        rundir.write_marker(run_dir, err, rundir.INTERRUPTION_MARKER)
        raise
    rundir.mark_finished(run_dir, keep_checkpoints=bool(cfg.keep_checkpoints))
    return value


def _run(cfg: DictConfig) -> float:
    started = time.perf_counter()
    register_resolvers()
    setup_console(verbose=bool(cfg.get("verbose", False)))
    student_tokenizer, teacher_tokenizer, task = validate(cfg)
    L.seed_everything(int(cfg.seed), workers=True)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    # Teacher and student tokenize differently: every example is tokenized for each, and samples cross via text.
    cross = teacher_tokenizer is not None and not same_vocabulary(student_tokenizer, teacher_tokenizer)
    datamodule = DistillationDataModule(task, student_tokenizer, seed=int(cfg.seed),
                                        teacher_tokenizer=teacher_tokenizer if cross else None,
                                        accumulate_grad_batches=int(cfg.trainer.get("accumulate_grad_batches") or 1),
                                        route_field=route_field(cfg.get("teacher")))
    datamodule.setup("fit")  # tokenize now: length rules and an empty training set show before models load
    _print_data_report(task, output_dir)
    # outside teachers (a cache, a server) are opened and checked against this run before any model loads
    teacher = build_teacher(cfg.get("teacher"), cfg, student_tokenizer, teacher_tokenizer,
                            datamodule.train_set.items, sampler_factory(cfg))
    module = build_module(cfg, task, student_tokenizer, teacher, rundir.resume_command(output_dir))
    _print_start_line(cfg, module)

    loggers = build_loggers(cfg)
    succeeded = False
    try:
        trainer, preemption = build_trainer(cfg, task, loggers, output_dir)
        ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)
        if trainer.is_global_zero:
            OmegaConf.save(cfg, config_file(cfg, output_dir, ckpt_path), resolve=True)
        generations = output_dir / "generations"
        teacher_scores, not_scored = None, teacher_not_scored(cfg, module.teacher)
        if not_scored is None:
            teacher_scores = evaluate_and_save(trainer, module, datamodule, "teacher", generations / "teacher.jsonl")
        before = None
        if cfg.eval.before:
            before = evaluate_and_save(trainer, module, datamodule, "student", generations / "student_before.jsonl")

        wall_time = fit(trainer, preemption, module, datamodule, ckpt_path, output_dir)
        train_metrics = final_train_metrics(trainer)  # before evaluation logs its own
        after = evaluate_and_save(trainer, module, datamodule, "student", generations / "student_after.jsonl")
        results = results_record(cfg, task, trainer, module, {"teacher": teacher_scores, "student_before": before,
                                                              "student_after": after}, wall_time)
        results["train"] = train_metrics
        results["teacher_not_scored"] = not_scored
        if cfg.export:
            module.export_student(str(output_dir / rundir.STUDENT))  # every process: a sharded student is gathered
        if trainer.is_global_zero:
            total = time.perf_counter() - started
            results["total_time_s"] = round(total, 3)
            (output_dir / rundir.RESULTS).write_text(json.dumps(results, indent=2))
            student_dir = output_dir / rundir.STUDENT if cfg.export else None
            print(f"\n{format_results_table(results)}\n\n{run_end_lines(total, results, output_dir, student_dir)}")
        succeeded = True
        return float(after[task.metric_name])
    finally:
        _close_loggers(loggers, succeeded)


@rank_zero_only
def _print_start_line(cfg: DictConfig, module: DistillationModule) -> None:
    parameters = list(module.student.parameters())
    trainable = sum(p.numel() for p in parameters if p.requires_grad)
    print(run_start_line(run_choices(cfg), trainable, sum(p.numel() for p in parameters)), flush=True)


@rank_zero_only
def _print_data_report(task: Task, output_dir: Path) -> None:
    (output_dir / "data_report.json").write_text(json.dumps(task.report.to_dict(), indent=2))
    print(f"data ({task.name}):\n" + "\n".join(f"  {line}" for line in task.report.summary().splitlines()))


def _close_loggers(loggers: list, succeeded: bool) -> None:
    for logger in loggers:
        try:
            logger.finalize("success" if succeeded else "failed")
            if type(logger).__name__ == "WandbLogger":
                import wandb

                wandb.finish(exit_code=0 if succeeded else 1)
        except Exception as err:  # a logger that fails to close must not hide the run's own error
            print(f"warning: closing {type(logger).__name__} failed: {err}")
