"""The run directory: the names of what a run leaves on disk, its status markers, and the clean-up of a finished run.

One Hydra job is one run directory. `kdlab.run.train` writes into it, the job wrapper (`kdlab.run.train.run_job`) marks
how it ended, and `kdlab.report` reads it back, all through the names below, so a renamed file cannot go unnoticed by
one of them. What the presence of each file means:

    config.yaml              the resolved config (written once the trainer is built)
    results.json             the final metrics; written last, so the run finished
    failed.json              the job raised: the error in one line, its message and traceback (rank r > 0 writes
                             failed_rank<r>.json, so a DDP run whose rank 0 survived still shows why)
    interrupted.json         the job stopped on a signal or Ctrl-C; it can resume (`ckpt_path=last`)
    checkpoints/last.ckpt    the Lightning checkpoint to resume from
    student/                 the distilled student (save_pretrained) with its tokenizer
    resumes/<n>/             the n-th resume (kdlab.run.resume): its `.hydra/` and config.yaml; a resume of a
                             finished run writes everything there instead, as a run directory of its own

Imports nothing heavy: `kdlab-report` reads run directories without torch.
"""

from __future__ import annotations

import json
import shutil
import sys
import traceback
from pathlib import Path

CONFIG = "config.yaml"
RESULTS = "results.json"
FAILURE_MARKER = "failed.json"
INTERRUPTION_MARKER = "interrupted.json"
CHECKPOINTS = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
STUDENT = "student"
RESUMES = "resumes"


def last_checkpoint(run_dir: str | Path) -> Path:
    """`<run_dir>/checkpoints/last.ckpt`: the one checkpoint a run keeps and resumes from."""
    return Path(run_dir) / CHECKPOINTS / LAST_CHECKPOINT


def marker_name(marker: str, rank: int) -> str:
    """`failed.json` on rank 0, `failed_rank<r>.json` on rank r: every process may fail, and none may overwrite
    rank 0's record."""
    return marker if rank == 0 else marker.replace(".json", f"_rank{rank}.json")


def other_rank_markers(run_dir: Path, marker: str) -> list[Path]:
    """The markers of `marker`'s kind that ranks other than 0 wrote in `run_dir`, by rank."""
    return sorted(run_dir.glob(marker.replace(".json", "_rank*.json")))


def process_rank() -> int:
    """This process's rank as Lightning reads it from the launcher (RANK, LOCAL_RANK, SLURM_PROCID, ...)."""
    from lightning.pytorch.utilities import rank_zero_only  # only a training job needs it, never kdlab-report

    return rank_zero_only.rank


def write_marker(run_dir: str | Path, err: BaseException, marker: str = FAILURE_MARKER) -> None:
    """Write `marker` (failed.json or interrupted.json) for `err` into `run_dir`, never raising itself: a marker that
    cannot be written must not hide the run's own error."""
    try:
        run_dir = Path(run_dir)
        text = getattr(err, "message", None) or str(err)  # RunInterrupted keeps its message beside the exit code
        one_line = " ".join(line.strip() for line in text.splitlines() if line.strip())
        record = {
            "error": f"{type(err).__name__}: {one_line}"[:500],
            "message": text,
            "traceback": "".join(traceback.format_exception(err)),
        }
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / marker_name(marker, process_rank())).write_text(json.dumps(record, indent=2))
    except Exception as marker_err:
        print(f"warning: could not write {marker}: {marker_err}", file=sys.stderr)


def mark_finished(run_dir: str | Path, keep_checkpoints: bool = True) -> None:
    """A job that ended normally: markers of an earlier failed or interrupted attempt in the same directory no longer
    apply, and without `keep_checkpoints` the checkpoints go (nothing is left to resume; sweeps stay small)."""
    run_dir = Path(run_dir)
    for marker in (FAILURE_MARKER, INTERRUPTION_MARKER):
        (run_dir / marker).unlink(missing_ok=True)
    if not keep_checkpoints and process_rank() == 0:
        shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)


def resume_command(run_dir: str | Path) -> str:
    """The command that resumes the run in `run_dir`: the entry point, the run's own command-line overrides (Hydra's,
    when the run was started by `train.py`), its directory and `ckpt_path=last`."""
    import shlex

    overrides: list[str] = []
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = [o for o in HydraConfig.get().overrides.task
                     if not o.startswith(("hydra.run.dir=", "ckpt_path=", "output_dir=", "resume."))]
    except ValueError:  # composed outside a Hydra app (tests, notebooks): no command line to repeat
        pass
    where = f"hydra.run.dir={shlex.quote(str(run_dir))}"
    return " ".join(["python train.py", *(shlex.quote(o) for o in overrides), where, "ckpt_path=last"])
