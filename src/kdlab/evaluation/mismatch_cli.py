"""`kdlab-mismatch <run or sweep dir>...`: the teacher's view of a finished run's student outputs, added afterwards.

Runs evaluate the mismatch themselves (kdlab.evaluation.mismatch: own_teacher_nll, own_fkl, own_rkl in results.json).
This command gives it to runs that finished without it: it evaluates each run's exported student (`<run>/student`) on
the run's validation split with the run's own config (`<run>/config.yaml`), checks that the task score is the one the
run reported, and adds the measures to `results.json`. `--before` does the same for the student the run started from
(the config's student), in `student_before`.

    kdlab-mismatch outputs/multirun/gkd_decided/<time>            # every finished run below it
    kdlab-mismatch outputs/2026-11-26/10-00-00 --before
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from kdlab.run import rundir


def run_directories(paths: list[str]) -> list[Path]:
    """Each path that is a finished run (holds results.json), and the finished runs below each other path."""
    found = []
    for path in map(Path, paths):
        found += [path] if (path / rundir.RESULTS).exists() else sorted(p.parent for p in path.rglob(rundir.RESULTS))
    return found


def rescore(run_dir: Path, before: bool = False) -> dict:
    """Adds the mismatch measures to `run_dir`'s results.json (student_after, and student_before with `before`);
    returns the updated results. Raises ValueError when the run cannot be scored again, or scores differently."""
    import lightning as L

    from kdlab.data.datamodule import DistillationDataModule
    from kdlab.evaluation.generations import GenerationScorer, evaluate
    from kdlab.models.loading import same_vocabulary
    from kdlab.run.build import build_module, sampler_factory
    from kdlab.run.train import validate
    from kdlab.teachers.build import build_teacher

    cfg = OmegaConf.load(run_dir / rundir.CONFIG)
    results = json.loads((run_dir / rundir.RESULTS).read_text())
    exported = run_dir / rundir.STUDENT
    if not (exported / "config.json").exists():
        raise ValueError(f"{run_dir}: no exported student in {exported} (the run had export=false)")
    students = {"student_after": OmegaConf.merge(cfg.student, {"path": str(exported), "lora": {"r": 0}})}
    if before:
        students["student_before"] = cfg.student
    student_tokenizer, teacher_tokenizer, task = validate(cfg)
    if teacher_tokenizer is None or not same_vocabulary(student_tokenizer, teacher_tokenizer):
        raise ValueError(f"{run_dir}: no mismatch to measure: it needs one teacher model with the student's tokenizer "
                         "(not across tokenizers, not an outside teacher or several teachers)")
    datamodule = DistillationDataModule(task, student_tokenizer, seed=int(cfg.seed))
    for key, student in students.items():
        run_cfg = OmegaConf.merge(cfg, {"student": student})
        L.seed_everything(int(cfg.seed), verbose=False)  # a randomly initialised student is the run's one again
        # the teacher first, as the run built it: a randomly initialised one draws before the student
        teacher = build_teacher(cfg.teacher, cfg, student_tokenizer, teacher_tokenizer, [], sampler_factory(cfg))
        module = build_module(run_cfg, task, student_tokenizer, teacher)
        trainer = L.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                            enable_model_summary=False, enable_progress_bar=False, callbacks=[GenerationScorer(task)])
        generations = evaluate(trainer, module, datamodule, "student")
        _check_same_score(run_dir, key, results.get(key), generations.scores, task.metric_name)
        results[key] = {**generations.scores, **generations.mismatch}
    results["metrics"] = results["student_after"]
    (run_dir / rundir.RESULTS).write_text(json.dumps(results, indent=2))
    return results


def _check_same_score(run_dir: Path, key: str, reported: dict | None, scores: dict, metric: str) -> None:
    """The outputs scored now are the run's own only if the task score is the one the run reported."""
    if reported is not None and metric in reported and abs(reported[metric] - scores[metric]) > 1e-9:
        raise ValueError(f"{run_dir}: {key} {metric} is {scores[metric]} now, {reported[metric]} in results.json: "
                         "these are not the outputs the run scored (another torch, thread count or device?)")


def main(argv: list[str] | None = None) -> int:
    description, examples = __doc__.split("\n\n", 1)
    parser = argparse.ArgumentParser(prog="kdlab-mismatch", description=description, epilog=examples,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="run directories, or folders holding them (sweeps)")
    parser.add_argument("--before", action="store_true", help="also the student each run started from")
    args = parser.parse_args(argv)
    from kdlab.run.resolvers import register_resolvers

    register_resolvers()
    runs = run_directories(args.paths)
    if not runs:
        print(f"error: no finished run (a directory with {rundir.RESULTS}) under {' '.join(args.paths)}",
              file=sys.stderr)
        return 1
    failed = 0
    for run_dir in runs:
        try:
            results = rescore(run_dir, before=args.before)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
            continue
        after = results["student_after"]
        print(f"{run_dir}: " + ", ".join(f"{k} {after[k]:.4f}" for k in after))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
