"""Resuming into an existing run directory without changing the run or overwriting its record.

`python train.py hydra.run.dir=<run> ckpt_path=last` continues a run from `<run>/checkpoints/last.ckpt`. Before Hydra
starts (it writes `.hydra/` into the run directory as it starts), `resume_argv` rewrites the command line:

- the run's own overrides (`.hydra/overrides.yaml`) are reused: the run goes on under the config it started with;
- the command line may repeat them, all or some (what `kdlab.run.rundir.resume_command` prints);
- one that changes or adds a value is refused, naming it, unless `resume.allow_changes=true`: then the command line's
  replace or add to the run's.

Where the resume writes: its own Hydra record and resolved config go to `<run>/resumes/<n>/` (n = 1, 2, ...), so
`<run>/.hydra/` and `<run>/config.yaml` keep describing the run as it started. An unfinished run (no results.json)
then goes on in place: checkpoints, results.json, student/ as an uninterrupted run writes them. A finished run is
never written to: the resume is a run directory of its own, `<run>/resumes/<n>/`, that starts from the finished
run's checkpoint. A fresh start (no `ckpt_path`) into a finished run's directory is refused.

Imports nothing heavy: a refusal comes before any model, or torch, loads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from kdlab.run import rundir

RESUME_KEYS = ("ckpt_path", "output_dir")  # set per attempt: never a difference between a run and its resume
RESUME_NODE = "resume."                  # resume.allow_changes, resume.record_dir: about the resume itself
FLAG = "resume.allow_changes"
RECORD_DIR = "resume.record_dir"


class ResumeRefused(ValueError):
    """The command line would resume a run under another config, or write over a finished run's record."""


def resume_argv(argv: Sequence[str], cwd: str | Path | None = None) -> list[str]:
    """`argv` (Hydra's command line, after `kdlab.run.compose.expand_overrides`) as it resumes the run in
    `hydra.run.dir` safely (see the module docstring); unchanged when it resumes nothing. Raises ResumeRefused."""
    argv = list(argv)
    if any(a in ("-m", "--multirun") for a in argv):
        return argv  # a sweep's jobs have their own directories under hydra.sweep.dir
    if os.environ.get("LOCAL_RANK", "0") != "0" and "hydra.output_subdir=null" in argv:
        return argv  # a process Lightning started for another device: rank 0's command line, already rewritten
    overrides = {_key(a): _value(a) for a in argv if _is_override(a)}
    run_dir_text = overrides.get("hydra.run.dir")
    if run_dir_text is None:
        return argv
    run_dir = Path(cwd or os.getcwd()) / run_dir_text
    ckpt_path = overrides.get("ckpt_path", "null")
    checkpoint = rundir.last_checkpoint(run_dir)
    finished = (run_dir / rundir.RESULTS).exists()
    if ckpt_path not in ("last", "auto") or not checkpoint.exists():
        if finished:
            raise ResumeRefused(
                f"{run_dir_text} holds a finished run (results.json) and this command would write over it; "
                + ("resume it with ckpt_path=last, or " if checkpoint.exists() else "")
                + "pick another hydra.run.dir")
        return argv  # nothing to resume: ckpt_path=last reports the missing checkpoint itself
    saved_file = reference_overrides_file(run_dir)
    if not saved_file.exists():
        return argv  # a run started outside train.py: no overrides to compare with
    saved = [str(o) for o in _read_yaml_list(saved_file) if not _is_resume_key(_key(o))]
    given = [a for a in argv if _is_override(a) and not _is_resume_key(_key(a)) and not _key(a).startswith("hydra.")]
    allow = overrides.get(FLAG, "false").lower() == "true"
    difference = first_difference(saved, given)
    if difference is not None and not allow:
        raise ResumeRefused(f"cannot resume {run_dir_text}: {difference} ({saved_file}); leave it off to resume "
                            f"under the run's own overrides, or add {FLAG}=true to change the run on purpose")
    task_overrides = merged(saved, given)
    others = [a for a in argv if not (_is_override(a) and not _key(a).startswith("hydra."))
              and _key(a) != "hydra.run.dir"]
    attempt = next_resume_dir(run_dir)
    resume = [f"{FLAG}={'true' if allow else 'false'}"]
    if finished:  # the resume is a run of its own inside the finished one, which stays as it was
        where = [f"hydra.run.dir={attempt}", f"ckpt_path={checkpoint}"]
    else:  # the run goes on in place; this attempt's Hydra record and config go beside the first one's
        where = [f"hydra.run.dir={run_dir_text}", f"hydra.output_subdir={attempt.relative_to(run_dir)}/.hydra",
                 f"ckpt_path={ckpt_path}", f"{RECORD_DIR}={attempt}"]
    changes = [o for o in given if o not in saved]
    print(f"resuming {run_dir_text} " + (f"with changes: {' '.join(changes)}" if changes else "under its own overrides")
          + (f"; it finished, so this resume writes into {attempt}" if finished else ""), flush=True)
    return [*others, *task_overrides, *where, *resume]


def first_difference(saved: Sequence[str], given: Sequence[str]) -> str | None:
    """The first override of `given` that changes or adds to `saved` (the run's own), in words; None when there is
    none. An override of the run's that `given` leaves out is no difference: the resume keeps it."""
    saved_map = {_key(o): _value(o) for o in saved}
    given_map = {_key(o): _value(o) for o in given}  # a key given twice: the last value, as Hydra applies it
    for key, value in given_map.items():
        if key not in saved_map:
            return f"{key}={value} is not among the run's own overrides"
        if saved_map[key] != value:
            return f"{key}={value} differs from the run's own {key}={saved_map[key]}"
    return None


def merged(saved: Sequence[str], given: Sequence[str]) -> list[str]:
    """The run's overrides with those of `given` replacing the ones of the same key, then `given`'s new ones."""
    given_by_key = {_key(o): o for o in given}
    out = [given_by_key.pop(_key(o), o) for o in saved]
    return out + list(given_by_key.values())


def next_resume_dir(run_dir: Path) -> Path:
    """`<run>/resumes/<n>`, n one past the highest there (1 for the first resume)."""
    numbers = [int(p.name) for p in (run_dir / rundir.RESUMES).glob("*") if p.name.isdigit()]
    return run_dir / rundir.RESUMES / str(max(numbers, default=0) + 1)


def reference_overrides_file(run_dir: Path) -> Path:
    """The overrides the run's checkpoint was trained under: those of its newest in-place resume (one that
    continued the run in its own directory, which records `resume.record_dir`), else the run's own."""
    found = (run_dir / rundir.RESUMES).glob("*/.hydra/overrides.yaml")
    attempts = sorted(((int(p.parent.parent.name), p) for p in found if p.parent.parent.name.isdigit()), reverse=True)
    for _, path in attempts:
        if any(str(o).startswith(f"{RECORD_DIR}=") for o in _read_yaml_list(path)):
            return path
    return run_dir / ".hydra" / "overrides.yaml"


def _read_yaml_list(path: Path) -> list:
    import yaml

    return yaml.safe_load(path.read_text()) or []


def _is_override(arg: str) -> bool:
    return "=" in arg and not arg.startswith("-")


def _key(override: str) -> str:
    return override.partition("=")[0].lstrip("+")


def _value(override: str) -> str:
    return override.partition("=")[2]


def _is_resume_key(key: str) -> bool:
    return key in RESUME_KEYS or key.startswith(RESUME_NODE)
