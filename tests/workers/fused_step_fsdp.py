"""Worker of tests/step/test_fused_step.py's FSDP2 test, started by torchrun on 2 processes (gloo): for each case, one
student and teacher in two steps, fused and not (tests/workers/cases.py), each sharded as trainer=fsdp shards them
(kdlab.models.sharding.shard_model), two SGD steps of the training step's loss with each, each rank on its own half
of a batch (other rows, other token counts). Rank 0 writes what the test asserts on to <dir>/fsdp.json."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from kdlab.models.sharding import FSDP2Strategy, ShardingOptions, shard_model
from kdlab.step.fused import fused_off_reason
from kdlab.step.module import shards_models
from kdlab.step.policy import STUDENT
from kdlab.step.step import DistillationStep, StepTargets
from tests.workers.cases import SAMPLING, add_output_bias, case_step, twin

# "tiny" (Llama) ties its output layer to the input embedding; "tiny_qwen2" does not.
CASES = {
    "fkl_tied": dict(loss="fkl", preset="tiny"),
    "fkl_untied": dict(loss="fkl", preset="tiny_qwen2"),
    "jsd_tied_ce": dict(loss="jsd", preset="tiny", ce_weight=0.5),
    "jsd_untied_ce": dict(loss="jsd", preset="tiny_qwen2", ce_weight=0.5),
    "rkl_untied_output_bias": dict(loss="rkl", preset="tiny_qwen2", bias=True),
    "sft_tied": dict(loss="sft", preset="tiny"),
    "jsd_tied_onpolicy": dict(loss="jsd", preset="tiny", ce_weight=0.5, onpolicy=True),
    "jsd_untied_checkpointed": dict(loss="jsd", preset="tiny_qwen2", ce_weight=0.5,
                                    sharding=dict(activation_checkpointing=True)),
    "jsd_tied_bf16": dict(loss="jsd", preset="tiny", ce_weight=0.5, sharding=dict(mixed_precision="bf16")),
    # a teacher of its own tokenizer (tests/workers/cases.py's `case_step`): MultiLevelOT's ranking keeps the hidden
    # states and the output weight for its backward, which FSDP2 gathers again there
    "ot_tied_ce": dict(loss="ot", preset="tiny"),
    "uld_untied_onpolicy": dict(loss="uld", preset="tiny_qwen2", onpolicy=True),
}
STEPS = 2


def _local(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if isinstance(t, DTensor) else t).detach().clone()


def _steps(step: DistillationStep, targets: StepTargets) -> tuple[list[float], list[dict], dict]:
    """STEPS SGD steps: the global loss of each (the ranks' shares summed), each step's gradient shards, the final
    weight shards."""
    optimizer = torch.optim.SGD([p for p in step.student.parameters() if p.requires_grad], lr=0.5)
    losses, gradients = [], []
    for _ in range(STEPS):
        counts = DistillationStep.global_counts([targets], targets.batch.student.target_ids.device)  # all ranks'
        loss, _ = step.loss(targets, counts)
        loss.backward()
        gradients.append({n: _local(p.grad) for n, p in step.student.named_parameters() if p.requires_grad})
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total))
    return losses, gradients, {n: _local(p) for n, p in step.student.named_parameters()}


def _maxima(ours: dict, reference: dict) -> torch.Tensor:
    """(tensors, 2): max |a - b| and max |b| of each tensor over both ranks' shards."""
    maxima = torch.stack([torch.stack([(ours[n] - reference[n]).abs().max(), reference[n].abs().max()]).double()
                          for n in reference])
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
    return maxima


def _relative(ours: dict, reference: dict) -> float:
    """max over tensors of max |a - b| / max |b|."""
    maxima = _maxima(ours, reference)
    return float((maxima[:, 0] / maxima[:, 1].clamp(min=1e-30)).max())


def _moved(weights: dict, start: dict) -> float:
    """max |w - w0| / max |w0|, each over every weight (some start at zero: biases)."""
    maxima = _maxima(weights, start).max(dim=0).values
    return float(maxima[0] / maxima[1])


def run_case(case: dict, mesh, rank: int) -> dict:
    case = dict(case)
    bias, onpolicy = case.pop("bias", False), case.pop("onpolicy", False)
    options = ShardingOptions(**case.pop("sharding", {}))
    plain, batch = case_step(**case)
    if bias:
        add_output_bias(plain)
    batch = batch.split(len(batch) // 2)[rank]
    fused = twin(plain, fused=True)
    for step in (fused, plain):
        step.sharded = shards_models(FSDP2Strategy())  # what the module's `setup` sets under trainer=fsdp
        shard_model(step.student, mesh, options, frozen=False)
        if step.teacher is not None:
            shard_model(step.teacher.model, mesh, options, frozen=True)
    assert fused.sharded and fused.groups == 1
    start = {n: _local(p) for n, p in plain.student.named_parameters()}
    # on-policy: the student's own samples (every rank sampling in lockstep), the same for both runs
    targets = fused.targets(batch, STUDENT, SAMPLING) if onpolicy else StepTargets(batch)
    fused_losses, fused_gradients, fused_weights = _steps(fused, targets)
    fused_reason = fused_off_reason(fused.objective, fused.student, fused.teacher)  # of the sharded models
    plain_losses, plain_gradients, plain_weights = _steps(plain, targets)
    return {
        "fused_reason": fused_reason,
        "tied": bool(fused.student.get_output_embeddings().weight is fused.student.get_input_embeddings().weight),
        "bias": fused.student.get_output_embeddings().bias is not None,
        "sampled": onpolicy and not torch.equal(targets.batch.student.target_ids, batch.student.target_ids),
        "fused_losses": fused_losses,
        "plain_losses": plain_losses,
        "gradients": [_relative(f, p) for f, p in zip(fused_gradients, plain_gradients)],
        "weights": _relative(fused_weights, plain_weights),
        "moved": _moved(plain_weights, start),
    }


if __name__ == "__main__":
    root = Path(sys.argv[1])
    logging.basicConfig(level=logging.WARNING)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    results = {name: run_case(case, mesh, rank) for name, case in CASES.items()}
    if rank == 0:
        (root / "fsdp.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()
