"""`python eval.py`: score a trained student on a task, as train.py scores it at the end of a run.

The student comes from a training checkpoint (`ckpt_path=`: the run directory's config.yaml says which model it
trained, so a LoRA or another preset is rebuilt before its weights load) or from an exported student folder
(`student_dir=`: `<run>/student`, or any `save_pretrained` folder holding its tokenizer). The scoring is train.py's own
(`kdlab.run.train.evaluate_and_save`: greedy generation on the validation split, the task's metric, the generations
written beside the scores). The result goes to `eval_results.json` in the job's directory (conf/eval.yaml:
`outputs/eval/<date>/<time>_<task>`), which the console names.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from kdlab.run.validate import ConfigError

EVAL_RESULTS = "eval_results.json"


def student_source(cfg: DictConfig) -> tuple[dict[str, Any], Path | None]:
    """(the student's model node, the checkpoint to load into it or None), from `ckpt_path` or `student_dir`."""
    ckpt, folder = cfg.get("ckpt_path"), cfg.get("student_dir")
    if (ckpt is None) == (folder is None):
        raise ConfigError("give the student to score: ckpt_path=<run>/checkpoints/last.ckpt (a training checkpoint) "
                          "or student_dir=<run>/student (an exported student), one of the two")
    student = OmegaConf.to_container(cfg.student, resolve=True)
    if folder is not None:
        path = Path(str(folder)).expanduser()
        if not (path / "config.json").is_file():
            raise ConfigError(f"student_dir={folder} holds no exported model (no config.json in {path.resolve()}); "
                              f"point it at a run's student/ folder")
        node = {key: student[key] for key in ("dtype", "gradient_checkpointing") if key in student}
        return {**node, "name": path.resolve().name, "path": str(path), "lora": {"r": 0}}, None
    path = Path(str(ckpt)).expanduser()
    if not path.is_file():
        raise ConfigError(f"ckpt_path={ckpt} does not exist (looked for {path.resolve()})")
    run_config = path.resolve().parent.parent / "config.yaml"  # <run>/checkpoints/last.ckpt -> <run>/config.yaml
    if run_config.is_file():
        student = (yaml.safe_load(run_config.read_text()) or {}).get("student") or student
    return student, path


def load_student_weights(module: Any, checkpoint: Path) -> int:
    """Load a training checkpoint's student into the module (the teacher and a LoRA student's frozen base are not in
    it: they come from the configs); returns the number of tensors loaded. A checkpoint of another model is refused
    by name."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    result = module.load_state_dict(state, strict=False)
    if result.unexpected_keys or not state:
        raise ConfigError(f"ckpt_path={checkpoint} does not fit the student {module.student.name_or_path!r}: "
                          f"{len(result.unexpected_keys)} of its tensors have no place (first: "
                          f"{(result.unexpected_keys or ['none'])[0]}); set student= to the model it trained")
    return len(state)


def evaluate_student(cfg: DictConfig) -> dict[str, Any]:
    """Score the student `cfg` names on `cfg.task`; writes eval_results.json and generations/student.jsonl into
    `cfg.output_dir` and returns the results."""
    import lightning as L

    from kdlab.data.datamodule import DistillationDataModule
    from kdlab.data.tasks import Task
    from kdlab.models.loading import load_tokenizer
    from kdlab.run.build import build_module, build_trainer
    from kdlab.run.console import setup_console
    from kdlab.run.train import evaluate_and_save
    from kdlab.run.validate import config_errors, raise_if_any

    setup_console()
    student, checkpoint = student_source(cfg)
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    cfg.student = student
    raise_if_any(config_errors(cfg))
    task = Task.from_config(cfg.task)
    try:
        task.splits()
    except (ValueError, OSError, RuntimeError) as err:
        raise ConfigError(f"task {task.name}: {err}") from None
    L.seed_everything(int(cfg.seed), workers=True)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(cfg.student)
    datamodule = DistillationDataModule(task, tokenizer, seed=int(cfg.seed))
    datamodule.setup("validate")
    module = build_module(cfg, task, tokenizer, teacher=None)
    loaded = load_student_weights(module, checkpoint) if checkpoint is not None else None
    trainer, _ = build_trainer(cfg, task, [], output_dir)
    generations = output_dir / "generations" / "student.jsonl"
    scores = evaluate_and_save(trainer, module, datamodule, "student", generations)
    results = {
        "metric": task.metric_name,
        "metrics": scores,
        "task": task.name,
        "examples": sum(1 for _ in generations.open()) if generations.is_file() else None,  # what was scored
        "ckpt_path": str(Path(str(checkpoint)).resolve()) if checkpoint is not None else None,
        "student_dir": str(Path(str(cfg.student_dir)).resolve()) if cfg.get("student_dir") else None,
        "student": cfg.student.get("name"),
        "tensors_loaded": loaded,
        "data": task.report.to_dict(),
    }
    if trainer.is_global_zero:
        (output_dir / EVAL_RESULTS).write_text(json.dumps(results, indent=2))
        print(f"{task.name} {task.metric_name}: {scores[task.metric_name]:.4f} ({results['student']})\n"
              f"results: {output_dir / EVAL_RESULTS}")
    return results


def run_eval(cfg: DictConfig) -> float:
    """The Hydra job of eval.py: a user error is one line, not a traceback."""
    from kdlab.run.resolvers import register_resolvers

    register_resolvers()
    try:
        results = evaluate_student(cfg)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    return float(results["metrics"][results["metric"]])


def main() -> None:
    """Console entry point (the repository's eval.py): Hydra composes conf/eval.yaml."""
    from kdlab.teachers.entry import hydra_entry

    hydra_entry("eval", run_eval)
