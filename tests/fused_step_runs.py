"""Worker of tests/test_fused_step.py, started by torchrun on 2 processes: the same 2-process run (argv[2]: ddp or
fsdp) with loss.fused=true and false, one after the other in the same process group."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from kdlab.train import run
from tests.conftest import compose
from tests.test_fused_step import RUN, STRATEGIES

if __name__ == "__main__":
    root, strategy = Path(sys.argv[1]), STRATEGIES[sys.argv[2]]
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("kdlab.fused_step").setLevel(logging.INFO)  # the start-up line the test reads
    run(compose([*RUN, *strategy], output_dir=root / "fused"))
    run(compose([*RUN, *strategy, "loss.fused=false"], output_dir=root / "logits"))
