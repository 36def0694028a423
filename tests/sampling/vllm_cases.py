"""The cases of the vLLM engine's tests, shared by tests/sampling/test_vllm_sampler.py, test_vllm_ddp.py and the
worker tests/workers/vllm_ddp.py (not a test module: workers import it). Importing it needs no vLLM.

The model is the shipped arith teacher's Llama, trained as a student: the shipped arith student's head size (24) is
one vLLM's CPU attention does not run, which start-up refuses (test_vllm_sampler.test_refusals_name_the_fix)."""

from __future__ import annotations

import torch
from torch import Tensor

from kdlab.data.datamodule import DistillationDataModule
from kdlab.data.tasks import Task
from kdlab.models.scoring import score_targets
from kdlab.run.compose import task_node
from kdlab.sampling.base import SamplingSettings
from kdlab.sampling.hf import HFSampler
from tests.conftest import REPO

ASSETS = REPO / "src" / "kdlab" / "assets" / "arith"
# vLLM's log-probabilities of its own samples against the student's forward pass, both float32: measured up to
# 1.7e-5 here (other kernels for attention, norms and matmuls), a stale engine 11 after three steps; the bound
# leaves a factor of 10 above the first and 5e4 below the second.
LOGPROB_TOLERANCE = 2e-4
SAMPLE = SamplingSettings(max_new_tokens=16, do_sample=True)
GREEDY = SamplingSettings(max_new_tokens=64, do_sample=False)  # long enough for some rows to reach EOS
TASK = {"name": "arith", "train_size": 32, "val_size": 8, "eval_examples": 8, "batch_size": 4, "eval_batch_size": 8,
        "generation": {"max_new_tokens": 8, "do_sample": False}}
ENGINE = {"engine": "vllm", "vllm": {"max_model_len": 256, "kv_cache_gib": 0.25}}  # policy.sampling for the tests


def arith_case():
    """(tokenizer, model, prompt): the arith teacher's weights (float32) and the task's first 4 training prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(ASSETS / "teacher", dtype=torch.float32)
    datamodule = DistillationDataModule(Task.from_config(task_node(**TASK)), tokenizer)
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    return tokenizer, model, batch.student.prompt


def logprob_error(engine, model, prompt, seed: int = 0) -> float:
    """Largest |vLLM's log-probability of a token it sampled - the student's, from its forward pass|, float32."""
    ids, mask, logprobs = engine.sample_with_logprobs(*prompt, SAMPLE, seed)
    assert mask.sum() > 0
    with torch.no_grad():
        logits = score_targets(model.eval(), *prompt, ids, mask).float()
    reference = logits.log_softmax(-1).gather(-1, ids[..., None])[..., 0]
    return float((reference - logprobs)[mask].abs().max())


def nll_of_samples(model, prompt, ids: Tensor, mask: Tensor) -> Tensor:
    """The model's mean negative log-likelihood of the samples' tokens, with gradient (train mode)."""
    model.train()
    logits = score_targets(model, *prompt, ids, mask).float()
    return -(logits.log_softmax(-1).gather(-1, ids[..., None])[..., 0] * mask).sum() / mask.sum()


def train_steps(model, prompt, tokenizer, steps: int, lr: float = 3e-3) -> None:
    """`steps` AdamW steps on the model's NLL of greedy continuations (from HF generate: independent of the engine)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids, mask = HFSampler(model, tokenizer).sample(*prompt, SamplingSettings(max_new_tokens=16, do_sample=False))
    for _ in range(steps):
        nll_of_samples(model, prompt, ids, mask).backward()
        optimizer.step()
        optimizer.zero_grad()
