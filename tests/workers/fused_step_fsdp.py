"""Worker of tests/step/test_fused_step.py's FSDP2 test, started by torchrun on 2 processes (gloo): for each case, one
student and teacher sharded twice as strategy=fsdp shards them (kdlab.models.sharding.shard_model), two SGD steps of the
training step's loss with loss.fused=true and with loss.fused=false, each rank on its own half of a batch (other
rows, other token counts). Rank 0 writes what the test asserts on to <dir>/fsdp.json."""

from __future__ import annotations

import copy
import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from kdlab.models.sharding import FSDP2Strategy, ShardingOptions, shard_model
from kdlab.step.module import StepTargets
from kdlab.step.policy import STUDENT
from tests.step.test_fused_step import _module, add_output_bias

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
    # a teacher of its own tokenizer (tests/step/test_fused_step.py's `_module`): MultiLevelOT's ranking keeps the hidden
    # states and the output weight for its backward, which FSDP2 gathers again there
    "ot_tied_ce": dict(loss="ot", preset="tiny"),
    "uld_untied_onpolicy": dict(loss="uld", preset="tiny_qwen2", onpolicy=True),
}
STEPS = 2


def _local(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if isinstance(t, DTensor) else t).detach().clone()


def _steps(module, targets: StepTargets, fused: bool) -> tuple[list[float], list[dict], dict]:
    """STEPS SGD steps: the global loss of each (the ranks' shares summed), each step's gradient shards, the final
    weight shards."""
    module._fused_reason = "" if fused else "off"
    assert module._fused is fused, module._fused_reason
    optimizer = torch.optim.SGD([p for p in module.student.parameters() if p.requires_grad], lr=0.5)
    losses, gradients = [], []
    for _ in range(STEPS):
        loss, _ = module._micro_loss(targets, True, module._global_counts([targets]))
        loss.backward()
        gradients.append({n: _local(p.grad) for n, p in module.student.named_parameters() if p.requires_grad})
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total))
    return losses, gradients, {n: _local(p) for n, p in module.student.named_parameters()}


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
    module, batch = _module(**case)
    if bias:
        add_output_bias(module)
    batch = batch.split(len(batch) // 2)[rank]
    twin = copy.deepcopy(module)
    for m in (module, twin):
        m._trainer = SimpleNamespace(strategy=FSDP2Strategy())  # what `_sharded` and `fused_off_reason` read
        shard_model(m.student, mesh, options, frozen=False)
        if m.teacher is not None:
            shard_model(m.teacher, mesh, options, frozen=True)
    assert module._sharded
    start = {n: _local(p) for n, p in twin.student.named_parameters()}
    # on-policy: the student's own samples (every rank sampling in lockstep), the same for both runs
    targets = module._step_targets(batch, STUDENT) if onpolicy else StepTargets(batch)
    fused_losses, fused_gradients, fused_weights = _steps(module, targets, True)
    fused_reason = module._fused_reason
    plain_losses, plain_gradients, plain_weights = _steps(twin, targets, False)
    return {
        "fused_reason": fused_reason,
        "tied": bool(module.student.get_output_embeddings().weight is module.student.get_input_embeddings().weight),
        "bias": module.student.get_output_embeddings().bias is not None,
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
