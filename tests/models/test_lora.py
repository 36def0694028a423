"""LoRA students (`student.lora.*`): only the adapters train and sit in the optimizer and in checkpoints, a resumed
run ends with the adapters of an uninterrupted one, the export writes an adapter peft loads and a merged model with
the same logits, and sampling (compiled too), FSDP2 and DDP see the adapters."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import lightning as L
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from kdlab.data.datamodule import DistillationDataModule, pad
from kdlab.data.tasks import Task
from kdlab.losses import cross_entropy, forward_kl
from kdlab.losses.objective import Objective
from kdlab.models.loading import load_model, load_tokenizer
from kdlab.models.lora import count_parameters
from kdlab.models.scoring import score_targets
from kdlab.run.compose import task_node
from kdlab.run.validate import config_errors
from kdlab.sampling import compiled as decoding
from kdlab.sampling.base import SamplingSettings
from kdlab.sampling.hf import generate_targets
from kdlab.step.module import DistillationModule
from tests.builders import distillation_module
from tests.conftest import REPO, TINY_RUN, compose

LORA = ["student.lora.r=4", "student.lora.alpha=8"]


def _student(overrides: list[str], seed: int = 0, preset: str = "tiny_qwen3"):
    cfg = compose([f"student={preset}", *overrides]).student
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(seed)
    return load_model(cfg, tokenizer), tokenizer


def _perturb_adapters(model, seed: int = 1) -> None:
    """B starts at zero (the adapters change nothing); random B makes every adapter matter in a comparison."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))


def test_off_by_default_and_r_turns_adapters_on_where_asked():
    assert compose([]).student.lora.r == 0
    plain, _ = _student([])
    assert count_parameters(plain) == (48672, 48672)  # full fine-tuning: everything trains
    every_linear, _ = _student(LORA)
    # tiny_qwen3 per layer, r * (in + out): q 4*(32+64), k 4*(32+32), v 4*(32+32), o 4*(64+32), gate, up 4*(32+64),
    # down 4*(64+32) = 2432; two layers. The base (48672) stays, frozen.
    assert count_parameters(every_linear) == (4864, 48672 + 4864)
    attention, _ = _student([*LORA, "student.lora.target_modules=[q_proj,v_proj]"])
    assert count_parameters(attention) == (2 * (384 + 256), 48672 + 1280)
    assert all(("lora_" in n) == p.requires_grad for n, p in attention.named_parameters())


@pytest.mark.parametrize(("override", "message"), [
    ("student.lora.r=-1", "student.lora.r=-1 must be a positive integer"),
    ("student.lora.r=2.5", "student.lora.r=2.5 must be a positive integer"),
    ("student.lora.alpha=0", "student.lora.alpha=0 must be > 0"),
    ("student.lora.dropout=1.0", r"student.lora.dropout=1.0 must be in \[0, 1\)"),
    ("student.lora.target_modules=[]", "student.lora.target_modules=.* must be a non-empty list"),
    ("student.lora.target_modules=attention", "student.lora.target_modules='attention' must be"),
    ("+student.lora.rank=4", "student.lora.rank is unknown"),
])
def test_bad_lora_settings_are_named_at_start_up(override, message):
    import re

    errors = config_errors(compose(["student.lora.r=8", override]))
    assert any(re.search(message, e) for e in errors), errors
    assert config_errors(compose(["student.lora.r=8"])) == []


TASK = {"name": "arith", "train_size": 32, "val_size": 4, "eval_examples": 4, "batch_size": 4, "eval_batch_size": 4,
        "generation": {"max_new_tokens": 4, "do_sample": False}}


def _fit(steps: int, ckpt_dir, resume_from=None) -> DistillationModule:
    """A LoRA student distilled through Lightning (mixed policy: half the steps sample from the student; AdamW, so
    the optimizer has state to restore); the base and teacher are rebuilt from the seed, as a resumed run does."""
    student, tokenizer = _student([*LORA, "student.lora.dropout=0.1"], seed=0, preset="tiny")
    teacher, _ = _student([], seed=1, preset="tiny")
    task = Task.from_config(task_node(**TASK))
    module = distillation_module(student, tokenizer, Objective("fkl", forward_kl), teacher, fraction=0.5,
                                 max_new_tokens=6, seed=3, micro_batch_size=TASK["batch_size"], score_groups=4,
                                 optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), max_nonfinite_steps=10)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    L.seed_everything(0)
    trainer.fit(module, datamodule=DistillationDataModule(task, tokenizer, seed=0), ckpt_path=resume_from)
    trainer.save_checkpoint(ckpt_dir / f"step{steps}.ckpt")
    return module


def test_only_adapters_train_checkpoint_and_resume_exactly(tmp_path):
    straight = _fit(4, tmp_path)
    base = _student([], seed=0, preset="tiny")[0].state_dict()
    for name, value in straight.student.state_dict().items():  # the frozen base did not move
        if "lora_" not in name:
            torch.testing.assert_close(value, base[name.replace(".base_layer", "")], rtol=0, atol=0, msg=name)
    assert any(not torch.all(v == 0) for n, v in straight.student.state_dict().items() if "lora_B" in n)
    assert straight.onpolicy_fraction > 0  # the student sampled with its adapters

    first = _fit(2, tmp_path)
    checkpoint = torch.load(tmp_path / "step2.ckpt", weights_only=False)
    adapters = {n for n, p in first.student.named_parameters() if p.requires_grad}
    assert set(checkpoint["state_dict"]) == {f"student.{n}" for n in adapters}  # no base, no teacher
    (optimizer,) = checkpoint["optimizer_states"]
    assert len(optimizer["state"]) == len(adapters) == sum(len(g["params"]) for g in optimizer["param_groups"])

    resumed = _fit(4, tmp_path, resume_from=tmp_path / "step2.ckpt")
    ours, reference = resumed.student.state_dict(), straight.student.state_dict()
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], rtol=0, atol=1e-6, msg=name)


def test_export_writes_a_peft_adapter_and_a_merged_model_with_the_same_logits(tmp_path):
    from peft import PeftModel

    student, tokenizer = _student(LORA)
    _perturb_adapters(student)
    module = distillation_module(student, tokenizer, Objective("sft", cross_entropy),
                                 optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), max_nonfinite_steps=10,
                                 score_groups=4)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    ids = torch.randint(3, len(tokenizer), (3, 11))
    with torch.no_grad():
        reference = student.eval()(ids).logits
        module.export_student(str(tmp_path / "student"))
    assert sorted(p.name for p in (tmp_path / "student" / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    assert not any("lora_" in name for name in merged.state_dict())  # a plain model: no peft needed to load it
    base, _ = _student([])  # the same seed rebuilds the frozen base
    with torch.no_grad():
        assert (base.eval()(ids).logits - reference).abs().max() > 1e-2  # the adapters matter
        adapted = PeftModel.from_pretrained(base, tmp_path / "student" / "adapter").eval()
        torch.testing.assert_close(adapted(ids).logits, reference, rtol=0, atol=1e-5)
        torch.testing.assert_close(merged(ids).logits, reference, rtol=0, atol=1e-5)
    for name, value in student.state_dict().items():  # the export merged a copy: training state is untouched
        assert torch.equal(value, before[name]), name
    assert (tmp_path / "student" / "tokenizer.json").exists()


def test_compiled_sampling_on_a_lora_student_draws_what_generate_draws():
    student, tokenizer = _student(LORA)
    _perturb_adapters(student)
    ids = tokenizer(["Question: 12 + 7?\nAnswer:", "Q: 9?\nA:"], add_special_tokens=False)["input_ids"]
    prompt_ids, prompt_mask = pad(ids, tokenizer.pad_token_id, "left")
    settings = SamplingSettings(max_new_tokens=12, do_sample=True)
    config = settings.generation_config(tokenizer.pad_token_id, tokenizer.eos_token_id)
    assert decoding.unsupported_reason(student, config, False) is None  # the compiled loop applies
    torch._dynamo.reset()
    out = []
    for compile in (False, True):
        torch.manual_seed(5)
        out.append(generate_targets(student, prompt_ids, prompt_mask, dataclasses.replace(settings, compile=compile),
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    (tokens, mask), (compiled_tokens, compiled_mask) = out
    assert torch.equal(tokens, compiled_tokens) and torch.equal(mask, compiled_mask)


def test_gradient_checkpointing_on_a_lora_student_gives_the_same_adapter_gradients():
    no_dropout = [*LORA, "student.lora.dropout=0.0"]
    plain, tokenizer = _student(no_dropout)
    checkpointed, _ = _student([*no_dropout, "student.gradient_checkpointing=true"])
    assert any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.modules())
    prompt = torch.randint(3, len(tokenizer), (2, 6))
    target = torch.randint(3, len(tokenizer), (2, 5))
    batch = (prompt, torch.ones_like(prompt, dtype=torch.bool), target, torch.ones_like(target, dtype=torch.bool))
    for model in (plain, checkpointed):
        _perturb_adapters(model)
        score_targets(model.train(), *batch).logsumexp(-1).mean().backward()
    grads = {n: p.grad for n, p in checkpointed.named_parameters() if p.grad is not None}
    assert set(grads) == {n for n, p in plain.named_parameters() if p.requires_grad}
    for name, parameter in plain.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(grads[name], parameter.grad, rtol=0, atol=1e-6, msg=name)



def test_fsdp_shards_a_lora_student_by_block_and_exports_it_whole(one_process_mesh, tmp_path):
    from kdlab.models.lora import export_lora
    from kdlab.models.sharding import ShardingOptions, full_state_dict, shard_model, transformer_blocks

    plain, tokenizer = _student([*LORA, "student.lora.dropout=0.0"])  # train mode, yet the same draws
    sharded, _ = _student([*LORA, "student.lora.dropout=0.0"])
    for model in (plain, sharded):
        _perturb_adapters(model)
    assert len(transformer_blocks(sharded)) == 2  # the decoder layers, found through the injected adapters
    shard_model(sharded, one_process_mesh, ShardingOptions(), frozen=False)
    prompt = torch.randint(3, len(tokenizer), (2, 5))
    target = torch.randint(3, len(tokenizer), (2, 4))
    batch = (prompt, torch.ones_like(prompt, dtype=torch.bool), target, torch.ones_like(target, dtype=torch.bool))
    for model in (plain.train(), sharded.train()):
        score_targets(model, *batch).logsumexp(-1).mean().backward()
    grads = {n: p.grad.full_tensor() for n, p in sharded.named_parameters() if p.grad is not None}
    assert set(grads) == {n for n, p in plain.named_parameters() if p.requires_grad}  # adapters only
    for name, parameter in plain.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(grads[name], parameter.grad, rtol=0, atol=1e-6, msg=name)
    export_lora(sharded, full_state_dict(sharded), tmp_path)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(prompt).logits, plain.eval()(prompt).logits, rtol=0, atol=1e-5)


# -- end to end: train.py on one process, DDP and FSDP2 (2 gloo processes) ------------------------------------------
COMMON = [*TINY_RUN, "trainer.max_steps=3", "policy=supervised", "loss=jsd", "eval.teacher=false",
          "eval.before=false", "checkpoint.every_n_train_steps=100", *LORA, "student.lora.dropout=0.0"]
TWO_PROCESSES = ["trainer.accelerator=cpu", "trainer.devices=2", "task.batch_size=4"]


def _train(run_dir, *overrides, launcher=(), check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *launcher, "train.py", f"hydra.run.dir={run_dir}", *COMMON, *overrides]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def _adapter(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "student" / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_ddp_and_fsdp_lora_runs_end_with_the_single_process_adapters_and_fsdp_resumes_exactly(tmp_path):
    _train(tmp_path / "single", "task.batch_size=8")
    _train(tmp_path / "ddp", "trainer=ddp", *TWO_PROCESSES)
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    fsdp = ["trainer=fsdp", *TWO_PROCESSES]
    _train(tmp_path / "fsdp", *fsdp, launcher=torchrun)
    single = _adapter(tmp_path / "single")
    assert single and all("lora_" in name for name in single)
    assert any(not torch.all(v == 0) for n, v in single.items() if "lora_B" in n)  # the adapters trained
    for strategy in ("ddp", "fsdp"):
        adapter = _adapter(tmp_path / strategy)
        assert adapter.keys() == single.keys()
        for name in single:
            torch.testing.assert_close(adapter[name], single[name], rtol=1e-4, atol=1e-5, msg=f"{strategy} {name}")
        merged = load_file(str(tmp_path / strategy / "student" / "model.safetensors"))
        assert not any("lora_" in name for name in merged)
    # A sharded checkpoint without the frozen base (and teacher) resumes: SIGTERM in step 2, then ckpt_path=last.
    killed = tmp_path / "fsdp_killed"
    done = _train(killed, *fsdp, "+callbacks.kill._target_=tests.workers.callbacks.SignalAt", "+callbacks.kill.step=1",
                  launcher=torchrun, check=False)
    assert done.returncode != 0 and (killed / "checkpoints" / "last.ckpt").is_dir(), done.stderr[-3000:]
    _train(killed, *fsdp, "ckpt_path=last", launcher=torchrun)
    assert json.loads((killed / "results.json").read_text())["steps"] == 3
    resumed, straight = _adapter(killed), _adapter(tmp_path / "fsdp")
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_lora_benchmark_counts_parameters_and_compares_the_same_model(tmp_path):
    out = tmp_path / "lora.json"
    cmd = [sys.executable, "benchmarks/bench_lora.py", "--threads", "1", "--layers", "2", "--width", "64", "--heads",
           "2", "--kv-heads", "1", "--head-dim", "32", "--intermediate", "128", "--vocab", "1024", "--sizes", "2x32",
           "--steps", "2", "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["mode"]: row for row in json.loads(out.read_text())["results"]}
    assert rows["full"]["trainable"] == rows["full"]["total"] == 139712
    # r * (in + out) per adapted layer, 2 layers: q 16*(64+64), v 16*(64+32)
    assert rows["lora_r16_q_v"]["trainable"] == 2 * (2048 + 1536)
    assert rows["lora_r16_q_v"]["total"] == 139712 + 7168
    first = {mode: row["losses"][0] for mode, row in rows.items()}
    assert len(set(first.values())) == 1, first  # B starts at 0: every mode starts from the same model
    assert all(row["saved_for_backward_bytes"] > 0 and row["steps_peak_bytes"] > 0 for row in rows.values())
    # dropout on the adapters' input keeps one more copy of each adapted layer's input for backward
    assert rows["lora_r16_all_linear"]["saved_for_backward_bytes"] > rows["lora_r16_all_linear_no_dropout"][
        "saved_for_backward_bytes"]
