"""Worker of tests/test_fused_step.py, started by torchrun on 2 processes: the same DDP run with loss.fused=true
and false, one after the other in the same process group."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from kdlab.train import run
from tests.conftest import compose
from tests.test_fused_step import DDP, RUN

if __name__ == "__main__":
    root = Path(sys.argv[1])
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("kdlab.fused_step").setLevel(logging.INFO)  # the start-up line the test reads
    run(compose([*RUN, *DDP], output_dir=root / "fused"))
    run(compose([*RUN, *DDP, "loss.fused=false"], output_dir=root / "logits"))
