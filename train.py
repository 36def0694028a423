"""Entry point: `python train.py [group=option ...] [key=value ...]` (Hydra); see README.md.

A job that raises leaves `failed.json` (the error in one line, and the traceback) in its run directory. In a
multirun the error then goes back to Hydra, whose launcher records it and goes on with the next job (it re-raises the
first failure once the sweep is done), so `kdlab-report` can list the failed run beside the others' results. A job
stopped by a signal or Ctrl-C leaves `interrupted.json` instead (it can resume) and stops the sweep.
"""

import json
import shutil
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from kdlab.config import ConfigError, in_multirun, register_resolvers

register_resolvers()

FAILURE_MARKER = "failed.json"  # read by kdlab.report.runs
INTERRUPTION_MARKER = "interrupted.json"


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from kdlab.train import run  # imported here so `--help` and config errors stay fast

    try:
        value = run(cfg)
    except Exception as err:
        mark_failed(err)
        if isinstance(err, ConfigError) and not in_multirun():
            sys.exit(f"error: {err}")  # the message lists every problem and its fix; a stack trace would only bury it
        # In a multirun, SystemExit would end the whole sweep: an exception lets Hydra go on with the next job.
        print(f"error: job failed: {type(err).__name__}: {err}", file=sys.stderr)
        raise
    except (KeyboardInterrupt, SystemExit) as err:  # stopped on a signal: resumable, so unfinished rather than failed
        mark_failed(err, INTERRUPTION_MARKER)
        raise
    directory = Path(HydraConfig.get().runtime.output_dir)
    # a job resumed in the same directory after a failure has finished now: its old markers no longer apply
    for marker in (FAILURE_MARKER, INTERRUPTION_MARKER):
        (directory / marker).unlink(missing_ok=True)
    if not cfg.get("keep_checkpoints", True) and _rank() == 0:
        shutil.rmtree(directory / "checkpoints", ignore_errors=True)  # finished: nothing left to resume
    return value


def _rank() -> int:
    # Lightning's reading of the launcher's environment (RANK, LOCAL_RANK, SLURM_PROCID, ...), as the run used it
    from lightning.pytorch.utilities import rank_zero_only

    return rank_zero_only.rank


def mark_failed(err: BaseException, marker: str = FAILURE_MARKER) -> None:
    """Write `failed.json` (or `interrupted.json`) into the job's directory (rank 0; other ranks suffix their rank),
    never raising itself: a broken marker must not hide the run's own error."""
    try:
        directory = Path(HydraConfig.get().runtime.output_dir)
        rank = _rank()
        name = marker if rank == 0 else marker.replace(".json", f"_rank{rank}.json")
        text = getattr(err, "message", None) or str(err)  # RunInterrupted keeps its message beside the exit code
        one_line = " ".join(line.strip() for line in text.splitlines() if line.strip())
        record = {
            "error": f"{type(err).__name__}: {one_line}"[:500],
            "message": text,
            "traceback": "".join(traceback.format_exception(err)),
        }
        directory.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(json.dumps(record, indent=2))
    except Exception as marker_err:
        print(f"warning: could not write {marker}: {marker_err}", file=sys.stderr)


if __name__ == "__main__":
    main()
