"""Worker of tests/sampling/test_vllm_ddp.py, started by torchrun on 2 gloo processes: one vLLM engine per process
(VllmSampler, started after the process group, as in a DDP run), two optimizer steps on each rank's own samples with
gradients averaged over the ranks (what DDP does), each engine synced after each step. Rank 0 writes what the test
checks to argv[1]: each rank's largest log-probability error against its student, and the samples each engine draws
under its rank's seed and under a shared seed."""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist

from kdlab.step.resilience import step_seed
from tests.sampling.vllm_cases import SAMPLE, arith_case, logprob_error, nll_of_samples


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tokenizer, base, prompt = arith_case()
    student = copy.deepcopy(base)
    from kdlab.sampling.vllm import VllmSampler, VllmSettings

    sampler = VllmSampler(student, tokenizer, VllmSettings(max_model_len=256, kv_cache_gib=0.25))
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    try:
        for step in range(2):
            ids, mask = sampler.sample(*prompt, SAMPLE, step_seed(0, step, rank))
            nll_of_samples(student, prompt, ids, mask).backward()
            for p in student.parameters():
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
            optimizer.step()
            optimizer.zero_grad()
            sampler.sync(student)
        error = logprob_error(sampler, student, prompt)
        own, _ = sampler.sample(*prompt, SAMPLE, step_seed(0, 2, rank))
        shared, _ = sampler.sample(*prompt, SAMPLE, 123)
        result = {"error": error, "own": own.tolist(), "shared": shared.tolist(), "syncs": len(sampler.sync_seconds)}
    finally:
        sampler.close()
    gathered = [None, None]
    dist.all_gather_object(gathered, result)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
