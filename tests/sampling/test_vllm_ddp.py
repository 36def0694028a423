"""Under DDP each process holds its own vLLM engine (policy.sampling.engine=vllm): after synced steps every engine
samples from its rank's student, draws under its rank's seed, and all engines hold the same weights.

Two gloo processes (tests/workers/vllm_ddp.py), each starting an engine: about a minute on 2 cores. Runs where vLLM
is installed (.ci/run installs it)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("vllm")

from tests.conftest import REPO  # noqa: E402
from tests.sampling.vllm_cases import LOGPROB_TOLERANCE  # noqa: E402


@pytest.mark.slow
def test_one_engine_per_process_follows_its_ranks_student(tmp_path):
    out = tmp_path / "ranks.json"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                "-m", "tests.workers.vllm_ddp", str(out)]
    done = subprocess.run(torchrun, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    ranks = json.loads(out.read_text())
    assert [r["syncs"] for r in ranks] == [2, 2]  # one sync per optimizer step on every rank
    assert all(r["error"] <= LOGPROB_TOLERANCE for r in ranks), [r["error"] for r in ranks]
    assert ranks[0]["shared"] == ranks[1]["shared"]  # the same weights in both engines: the same draws at one seed
    assert ranks[0]["own"] != ranks[1]["own"]  # each rank's seed: the ranks sample different continuations
