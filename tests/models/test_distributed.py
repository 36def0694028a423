"""DDP (Lightning's launcher) and FSDP2 (torchrun) on 2 CPU processes (gloo): the same loss curve and weights as one
process with the same global batch, and an FSDP export that loads with `from_pretrained`."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from kdlab.run.rundir import RESULTS, STUDENT, last_checkpoint
from tests.conftest import REPO, TINY_RUN

# Supervised targets make every step deterministic given the weights, so the runs can be compared step by step;
# per-process batch 4 on 2 processes against batch 8 on one. Arith targets differ in length, so the processes score
# different token counts: only a mean over the global batch's tokens (not a mean of per-process means) matches.
COMMON = [*TINY_RUN, "trainer.max_steps=4", "policy=supervised", "loss=jsd", "eval.teacher=false",
          "eval.before=false", "task.eval_examples=8", "checkpoint.every_n_train_steps=100"]
TWO_PROCESSES = ["trainer.accelerator=cpu", "trainer.devices=2", "task.batch_size=4"]
# Relative tolerance: curves agree to float32 rounding (summation order differs across processes). A mean of
# per-process means instead of the global token mean misses it by ~1e-3 relative on these batches.
TOLERANCE = 1e-5


def _train(run_dir, *overrides, launcher=()):
    cmd = [sys.executable, *launcher, "train.py", f"hydra.run.dir={run_dir}", *COMMON, *overrides]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((run_dir / RESULTS).read_text())


def _loss_curve(run_dir) -> list[float]:
    with (run_dir / "csv" / "metrics.csv").open() as f:
        return [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    _train(root / "single", "task.batch_size=8")
    _train(root / "ddp", "trainer=ddp", *TWO_PROCESSES)
    # FSDP through the torchrun recipe of docs/scaling.md (processes started outside Lightning), DDP through
    # Lightning's own launcher: both ways of starting processes are covered.
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    _train(root / "fsdp", "trainer=fsdp", *TWO_PROCESSES, launcher=torchrun)
    # On-policy under sharding: both processes sample every step, in lockstep (synced_gpus), without hanging.
    _train(root / "fsdp_onpolicy", "trainer=fsdp", *TWO_PROCESSES, "policy=onpolicy",
           "trainer.max_steps=2", "export=false")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_follow_the_single_process_loss_curve(runs, strategy):
    single, sharded = _loss_curve(runs / "single"), _loss_curve(runs / strategy)
    assert len(single) == len(sharded) == 4
    assert single[0] != single[-1]  # the runs trained
    for step, (a, b) in enumerate(zip(single, sharded)):
        assert abs(a - b) <= TOLERANCE * abs(a), f"step {step}: {a} vs {b}"
    if strategy == "ddp":
        assert (runs / strategy / "train_ddp_process_1.log").is_file()  # Lightning started the second process


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_end_with_the_single_process_weights(runs, strategy):
    single = load_file(str(runs / "single" / STUDENT / "model.safetensors"))
    sharded = load_file(str(runs / strategy / STUDENT / "model.safetensors"))
    assert single.keys() == sharded.keys()
    for name in single:
        torch.testing.assert_close(sharded[name], single[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_fsdp_export_is_a_whole_loadable_checkpoint_and_last_ckpt_is_sharded(runs):
    model = AutoModelForCausalLM.from_pretrained(runs / "fsdp" / STUDENT)
    exported = load_file(str(runs / "fsdp" / STUDENT / "model.safetensors"))
    for name, tensor in model.state_dict().items():  # full shapes, not one rank's shard
        if name in exported:
            assert exported[name].shape == tensor.shape
    assert sum(t.numel() for t in exported.values()) >= sum(p.numel() for p in model.parameters()) - sum(
        p.numel() for n, p in model.named_parameters() if n not in exported)
    last = last_checkpoint(runs / "fsdp")
    assert last.is_dir() and len(list(last.glob("*.distcp"))) == 2  # one shard file per process
    results = json.loads((runs / "fsdp" / RESULTS).read_text())
    assert results["steps"] == 4


def test_slurm_launcher_config_instantiates_with_the_run_s_nodes_and_devices():
    import hydra
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from kdlab.run.resolvers import register_resolvers
    from tests.conftest import CONF_DIR

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True, overrides=[
            "hydra/launcher=slurm", "trainer=fsdp", "trainer.devices=8", "trainer.num_nodes=2",
            "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=60"])
        previous = HydraConfig.instance().cfg
        HydraConfig.instance().set_config(cfg)  # the launcher config interpolates ${hydra:...}
        try:
            launcher = hydra.utils.instantiate(cfg.hydra.launcher)
        finally:
            HydraConfig.instance().cfg = previous  # global state: later tests resolve ${hydra:runtime.output_dir}
    assert type(launcher).__name__ == "SlurmLauncher"  # Hydra's plugin scan imports its own copy of the class
    params = launcher.params
    assert (params["nodes"], params["tasks_per_node"], params["gpus_per_node"]) == (2, 8, 8)
    assert params["partition"] == "gpu" and params["timeout_min"] == 60
    assert params["signal_delay_s"] > 0 and params["max_num_timeout"] > 0  # warned before the limit, requeued


def test_fsdp_strategy_builds_a_data_parallel_mesh_over_every_process():
    from kdlab.models.sharding import FSDP2Strategy, ShardingOptions

    strategy = FSDP2Strategy(mixed_precision="bf16", activation_checkpointing=True, offload_teacher=True)
    assert strategy.sharding == ShardingOptions("bf16", True, True, True)
    with pytest.raises(ValueError, match="mixed_precision"):
        FSDP2Strategy(mixed_precision="int8")


@pytest.mark.slow
def test_fsdp_samples_on_policy_on_every_process_in_lockstep(runs):
    results = json.loads((runs / "fsdp_onpolicy" / RESULTS).read_text())
    assert results["steps"] == 2 and results["onpolicy_fraction"] == 1.0
    assert len(_loss_curve(runs / "fsdp_onpolicy")) == 2



def test_sharding_options_take_effect(one_process_mesh, tokenizer):
    from torch.distributed.fsdp import FSDPModule

    from kdlab.models.sharding import ShardingOptions, shard_model, transformer_blocks
    from tests.conftest import tiny_model

    student, teacher = tiny_model(tokenizer, seed=0), tiny_model(tokenizer, seed=1)
    ids = torch.randint(5, 100, (2, 7))
    with torch.no_grad():
        reference = student(input_ids=ids).logits
    options = ShardingOptions(mixed_precision="bf16", activation_checkpointing=True, offload_teacher=True)
    shard_model(student, one_process_mesh, options, frozen=False)
    shard_model(teacher, one_process_mesh, options, frozen=True)

    blocks = transformer_blocks(student)
    assert len(blocks) == 2 and all(isinstance(b, FSDPModule) for b in [*blocks, student])
    assert student.is_gradient_checkpointing and not teacher.is_gradient_checkpointing  # the teacher never trains
    logits = student(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16  # computed with bf16 parameters ...
    torch.testing.assert_close(logits.float(), reference, atol=0.05, rtol=0.05)  # ... to bf16 precision
    # offload_teacher is a GPU option: on a CPU mesh the teacher's shards are in CPU memory already, and no policy
    # (which would ask for an accelerator) is applied
    assert all(p.device.type == "cpu" for p in teacher.parameters())
    assert type(teacher._get_fsdp_state()._fsdp_param_group.offload_policy).__name__ == "OffloadPolicy"
    logits.float().sum().backward()  # gradients reach the sharded float32 parameters through checkpointed blocks
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in student.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_measure_the_mismatch_over_every_process(runs, strategy):
    """Each process scores its share of the validation problems; the mismatch (kdlab.evaluation.mismatch) is the
    per-token mean over all of them, as one process measures it (half the problems would give other means)."""
    from kdlab.evaluation.mismatch import MISMATCH_KEYS

    single = json.loads((runs / "single" / RESULTS).read_text())["student_after"]
    sharded = json.loads((runs / strategy / RESULTS).read_text())["student_after"]
    for key in MISMATCH_KEYS:
        assert sharded[key] == pytest.approx(single[key], rel=1e-3), key
