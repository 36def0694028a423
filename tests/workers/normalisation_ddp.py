"""Worker of tests/step/test_normalisation.py, started by torchrun on 2 processes: every case's DDP run, one after the
other in the same process group (one start-up instead of five)."""

from __future__ import annotations

import sys
from pathlib import Path

from kdlab.run.train import run
from tests.conftest import compose
from tests.step.test_normalisation import CASES, TWO_PROCESSES, WHOLE_RUN

if __name__ == "__main__":
    root = Path(sys.argv[1])
    for case, overrides in CASES.items():
        run(compose([*WHOLE_RUN, *overrides, *TWO_PROCESSES], output_dir=root / case / "ddp"))
