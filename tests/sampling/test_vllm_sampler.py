"""policy.sampling.engine=vllm: the in-process vLLM engine samples from the student's current weights, maps the
sampling settings one to one, repeats seeded draws, takes no CPU while idle, and bad settings stop at start-up.

Runs where vLLM is installed (`pip install -e ".[vllm]"`; .ci/run installs it, so CI runs these). One engine for
the whole file (module-scoped, shut down at the end): an idle-but-running engine is cheap in this process, but each
start costs seconds. Every test syncs the weights it samples from first.

The model, prompts and the log-probability comparison: tests/sampling/vllm_cases.py.
"""

from __future__ import annotations

import copy
import logging
import os
import time

import pytest

pytest.importorskip("vllm")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from kdlab.data.datamodule import DistillationDataModule  # noqa: E402
from kdlab.data.tasks import Task  # noqa: E402
from kdlab.losses.objective import build_objective  # noqa: E402
from kdlab.models.lora import add_lora, merge_adapters  # noqa: E402
from kdlab.run.build import build_sampler  # noqa: E402
from kdlab.run.compose import task_node  # noqa: E402
from kdlab.run.validate import config_errors  # noqa: E402
from kdlab.sampling.base import SamplingSettings  # noqa: E402
from kdlab.sampling.hf import HFSampler  # noqa: E402
from kdlab.sampling.vllm import VllmSampler, engine_weights, sampling_params  # noqa: E402
from kdlab.step.module import DistillationModule, OptimSettings, RunSettings  # noqa: E402
from kdlab.step.policy import DataPolicy  # noqa: E402
from kdlab.step.step import DistillationStep  # noqa: E402
from tests.builders import model_teacher  # noqa: E402
from tests.conftest import compose, loss_config  # noqa: E402
from tests.sampling.vllm_cases import (  # noqa: E402
    ENGINE,
    GREEDY,
    LOGPROB_TOLERANCE,
    SAMPLE,
    TASK,
    arith_case,
    logprob_error,
    train_steps,
)


@pytest.fixture(scope="module")
def arith():
    torch.manual_seed(0)
    return arith_case()


@pytest.fixture(scope="module")
def engine(arith):
    tokenizer, model, _ = arith
    sampler = build_sampler(copy.deepcopy(model), tokenizer, ENGINE)
    assert isinstance(sampler, VllmSampler)
    yield sampler
    sampler.close()  # an engine left running would outlive the file


def test_samples_come_from_the_students_weights_at_step_zero_and_after_synced_steps(engine, arith, caplog):
    tokenizer, base, prompt = arith
    student = copy.deepcopy(base)
    with caplog.at_level(logging.INFO):
        engine.sync(student)
    assert "Failed to load weights" not in caplog.text and "prefix cache" not in caplog.text  # no lines per step
    assert logprob_error(engine, student, prompt) <= LOGPROB_TOLERANCE
    train_steps(student, prompt, tokenizer, steps=3)
    stale = logprob_error(engine, student, prompt)
    assert stale > 10 * LOGPROB_TOLERANCE  # the comparison catches an engine left on old weights
    syncs = len(engine.sync_seconds)
    engine.sync(student)
    assert len(engine.sync_seconds) == syncs + 1
    assert logprob_error(engine, student, prompt) <= LOGPROB_TOLERANCE


def test_the_module_syncs_the_engine_after_every_optimizer_step(engine, arith):
    """Three on-policy steps of DistillationModule sampling through the engine: afterwards its samples' log-probs are
    the trained student's, and the engine was synced once per optimizer step."""
    tokenizer, base, prompt = arith
    student = copy.deepcopy(base)
    engine.sync(student)
    syncs = len(engine.sync_seconds)
    step = DistillationStep(student, tokenizer, build_objective(loss_config("jsd")), engine,
                            model_teacher(copy.deepcopy(base).requires_grad_(False).eval(), tokenizer))
    module = DistillationModule(
        step, DataPolicy(1.0, "ground_truth", SamplingSettings(max_new_tokens=8, do_sample=True), seed=0),
        OptimSettings(lambda params: torch.optim.AdamW(params, lr=3e-3)),
        RunSettings(micro_batch_size=TASK["batch_size"], seed=0, max_nonfinite_steps=3,
                    eval_sampling=SamplingSettings(**TASK["generation"])))
    before = copy.deepcopy(student.state_dict())
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(module, datamodule=DistillationDataModule(Task.from_config(task_node(**TASK)), tokenizer))
    assert module.onpolicy_steps == 3 and len(engine.sync_seconds) == syncs + 3
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert logprob_error(engine, student, prompt) <= LOGPROB_TOLERANCE


def test_a_lora_student_syncs_its_merged_weights(engine, arith):
    tokenizer, base, prompt = arith
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    student = add_lora(copy.deepcopy(base), lora)
    train_steps(student, prompt, tokenizer, steps=2, lr=3e-2)  # B leaves zero: the adapters change the outputs
    merged = merge_adapters(copy.deepcopy(student)).state_dict()
    weights = dict(engine_weights(student))
    assert weights.keys() == merged.keys()
    assert all(torch.allclose(weights[k], merged[k], atol=1e-6) for k in merged)
    assert any(not torch.equal(merged[k], base.state_dict()[k]) for k in merged)
    engine.sync(student)
    assert logprob_error(engine, student, prompt) <= LOGPROB_TOLERANCE


def test_settings_map_one_to_one(arith):
    tokenizer = arith[0]
    settings = SamplingSettings(max_new_tokens=7, do_sample=True, temperature=0.7, top_p=0.9, top_k=5)
    params = sampling_params(settings, tokenizer.eos_token_id, seed=3)
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k, params.seed) == (7, 0.7, 0.9, 5, 3)
    assert params.stop_token_ids == [tokenizer.eos_token_id] and not params.ignore_eos
    off = sampling_params(SamplingSettings(max_new_tokens=7, do_sample=True), tokenizer.eos_token_id, seed=3)
    assert (off.top_p, off.top_k) == (1.0, 0)  # 0 turns top-k off in both
    assert sampling_params(GREEDY, tokenizer.eos_token_id, seed=3).temperature == 0.0
    with pytest.raises(ValueError, match="num_beams=2 needs engine=hf"):
        sampling_params(SamplingSettings(max_new_tokens=7, do_sample=False, num_beams=2), 2, seed=0)


def test_greedy_samples_equal_generate_tokens_mask_and_padding(engine, arith):
    """Greedy decoding is one sequence: the engine's must be HF generate's, token for token, with the same EOS mask,
    the same right padding and the same width (the longest row)."""
    tokenizer, base, prompt = arith
    engine.sync(base)
    ids, mask = engine.sample(*prompt, GREEDY, seed=0)
    expected_ids, expected_mask = HFSampler(base, tokenizer).sample(*prompt, GREEDY)
    assert torch.equal(ids, expected_ids) and torch.equal(mask, expected_mask)
    assert (ids[mask.logical_not()] == tokenizer.pad_token_id).all()
    assert ((ids == tokenizer.eos_token_id) & mask).any()  # some rows stopped at EOS and kept it


def test_top_k_one_is_greedy_and_max_new_tokens_bounds_the_samples(engine, arith):
    tokenizer, base, prompt = arith
    engine.sync(base)
    greedy, _ = engine.sample(*prompt, SamplingSettings(max_new_tokens=16, do_sample=False), seed=0)
    top1, _ = engine.sample(*prompt, SamplingSettings(max_new_tokens=16, do_sample=True, top_k=1), seed=5)
    assert torch.equal(top1, greedy)
    short, short_mask = engine.sample(*prompt, SamplingSettings(max_new_tokens=3, do_sample=True), seed=5)
    assert short.shape[1] <= 3 and short_mask.sum(1).max() <= 3


def test_seeded_draws_repeat_and_depend_on_the_seed_and_row_only(engine, arith):
    _, base, prompt = arith
    engine.sync(base)
    first, _ = engine.sample(*prompt, SAMPLE, seed=11)
    again, _ = engine.sample(*prompt, SAMPLE, seed=11)
    other, _ = engine.sample(*prompt, SAMPLE, seed=12)
    assert torch.equal(first, again) and not torch.equal(first, other)
    alone, _ = engine.sample(prompt[0][:1], prompt[1][:1], SAMPLE, seed=11)  # row 0 without the rest of its batch
    assert torch.equal(alone[0], first[0, :alone.shape[1]])
    torch.manual_seed(4)  # no seed: torch's generator, which the module seeds per (seed, step, rank)
    unseeded, _ = engine.sample(*prompt, SAMPLE)
    torch.manual_seed(4)
    assert torch.equal(engine.sample(*prompt, SAMPLE)[0], unseeded)


def test_the_engine_leaves_the_process_as_it_found_it(engine, arith):
    """Starting an engine must not reseed torch (a resumed run would draw differently) nor freeze its thread count
    (vLLM's CPU worker replaces torch.set_num_threads). The file's engine is closed and started again for this."""
    _, base, prompt = arith
    engine.close()
    engine.sync(base)  # before the start: nothing to load, the start reads the model
    torch.manual_seed(21)
    expected = torch.rand(4)
    torch.manual_seed(21)
    threads = torch.get_num_threads()
    engine.engine()  # starts it (sampling draws from torch's generator, as generate does: not checked here)
    assert engine.llm is not None
    assert torch.equal(torch.rand(4), expected)
    torch.set_num_threads(threads + 1)
    assert torch.get_num_threads() == threads + 1
    torch.set_num_threads(threads)
    assert engine.sample(*prompt, SAMPLE, seed=0)[1].any()  # the restarted engine samples


def test_an_idle_engine_takes_no_cpu(engine, arith):
    """Between samples the engine must not busy-wait: a second of idling costs this process (and any child) under
    5% of a core (measured 0.3-1%). vLLM's default engine, its engine core in a child process, took 7-23x more in
    benchmarks/bench_vllm.py on a loaded machine (docs/benchmarks.md, section 8)."""
    import psutil

    _, base, prompt = arith
    engine.sync(base)
    engine.sample(*prompt, SAMPLE, seed=0)
    process = psutil.Process(os.getpid())

    def cpu_seconds() -> float:
        return sum(sum(p.cpu_times()[:2]) for p in [process, *process.children(recursive=True)])

    before, start = cpu_seconds(), time.perf_counter()
    time.sleep(1.0)
    assert (cpu_seconds() - before) / (time.perf_counter() - start) < 0.05


def test_refusals_name_the_fix():
    """Start-up refuses what vLLM cannot run, from the config alone, one line each naming the fix."""
    head = config_errors(compose(["policy.sampling.engine=vllm"]))  # the shipped arith student: head size 24
    assert len(head) == 1 and "head size 24" in head[0] and "policy.sampling.engine=hf" in head[0]
    ok = ["policy.sampling.engine=vllm", "student=arith_teacher"]
    assert config_errors(compose(ok)) == []
    short = config_errors(compose([*ok, "policy.sampling.vllm.max_model_len=300"]))
    assert "policy.sampling.vllm.max_model_len=300 is below task.max_prompt_tokens + policy.sampling.max_new_tokens " \
           "= 416: set policy.sampling.vllm.max_model_len=416" in short
    unsupported = config_errors(compose(["policy.sampling.engine=vllm", "student=tiny_t5"]))
    assert any("vLLM does not support its architecture ['T5ForConditionalGeneration']" in e for e in unsupported)
    beams = config_errors(compose([*ok, "task.generation.num_beams=2"]))
    assert beams == ["task.generation.num_beams=2: engine=vllm samples one beam; set task.generation.num_beams=1 or "
                     "policy.sampling.engine=hf"]
