"""Worker of tests/step/test_fused_step.py, started by torchrun on 2 processes: the same 2-process run (argv[2]: a
name of tests/workers/cases.py's TWO_PROCESS_RUNS: ddp, fsdp, ddp_ot) with loss.fused=true and false, one after the
other in the same process group."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from kdlab.run.train import run
from tests.conftest import compose
from tests.workers.cases import TWO_PROCESS_RUNS

if __name__ == "__main__":
    root, (overrides, strategy) = Path(sys.argv[1]), TWO_PROCESS_RUNS[sys.argv[2]]
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("kdlab.run.build").setLevel(logging.INFO)  # the start-up `loss.fused:` line the test reads
    run(compose([*overrides, *strategy], output_dir=root / "fused"))
    run(compose([*overrides, *strategy, "loss.fused=false"], output_dir=root / "logits"))
