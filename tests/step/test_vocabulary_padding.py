"""Same-tokenizer pairs whose output layers are padded beyond the tokenizer, each its own way (Qwen3: 151,936 rows
for 151,669 tokens; Qwen2/2.5: 151,936 or 152,064 by size; Gemma 3: 262,144 or 262,208): the loss sees tokens only."""

import json

import pytest
import torch

from kdlab.data.datamodule import DistillationDataModule
from kdlab.data.tasks import Task
from kdlab.losses import forward_kl
from kdlab.losses.objective import Objective
from kdlab.models.loading import load_model, load_tokenizer
from kdlab.models.scoring import score_targets
from kdlab.run.compose import task_node
from kdlab.sampling.base import SamplingSettings
from kdlab.step.policy import STUDENT
from kdlab.step.step import DistillationStep, StepTargets
from tests.builders import distillation_module, distillation_step
from tests.conftest import TINY_RUN, compose

TASK = {"name": "arith", "train_size": 16, "val_size": 4, "eval_examples": 4, "batch_size": 4, "eval_batch_size": 4,
        "generation": {"max_new_tokens": 4, "do_sample": False}}
TOKENS = 746  # the arith tokenizer; 768 = 6 x 128 pads it the way Qwen pads 151,669 tokens to 151,936 = 1,187 x 128


def _padded(role: str, vocab_size: int, seed: int):
    cfg = compose([f"{role}=tiny_qwen3", f"+{role}.config.vocab_size={vocab_size}"])[role]
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(seed)
    return load_model(cfg, tokenizer), tokenizer


def _module_and_batch(student_rows: int, teacher_rows: int):
    student, tokenizer = _padded("student", student_rows, seed=0)
    teacher, _ = _padded("teacher", teacher_rows, seed=1)
    task = Task.from_config(task_node(**TASK))
    module = distillation_module(student, tokenizer, Objective("fkl", forward_kl), teacher, fraction=0.0,
                                 max_new_tokens=4, micro_batch_size=TASK["batch_size"], max_nonfinite_steps=10,
                                 optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3), score_groups=1)
    datamodule = DistillationDataModule(task, tokenizer)
    datamodule.setup("fit")
    return module, next(iter(datamodule.train_dataloader()))


def _module_loss(module, batch) -> torch.Tensor:
    with torch.no_grad():
        return module.step.validation_loss(batch)


def _scrambled_padding(model) -> None:
    """Large values in the output rows past the tokenizer: they would dominate any softmax that saw them."""
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[TOKENS:] = 30 * torch.randn_like(head[TOKENS:])


@pytest.mark.parametrize("student_rows,teacher_rows", [(768, 896), (768, 768), (TOKENS, 768)])
def test_same_vocabulary_loss_is_the_loss_on_logits_trimmed_to_the_tokenizer(student_rows, teacher_rows):
    module, batch = _module_and_batch(student_rows, teacher_rows)
    assert len(module.step.tokenizer) == TOKENS
    assert module.student.get_output_embeddings().weight.shape[0] == student_rows
    assert module.teacher.model.get_output_embeddings().weight.shape[0] == teacher_rows
    module.eval()
    args = (*batch.student.prompt, *batch.student.target)
    with torch.no_grad():
        student_logits, teacher_logits = score_targets(module.student, *args), score_targets(module.teacher.model,
                                                                                              *args)
    by_hand = forward_kl(student_logits[..., :TOKENS], teacher_logits[..., :TOKENS], batch.student.target_mask)
    torch.testing.assert_close(_module_loss(module, batch), by_hand, atol=1e-6, rtol=1e-6)


def test_padded_columns_do_not_move_the_loss():
    module, batch = _module_and_batch(768, 768)  # equal widths: nothing forces a trim but the padding itself
    module.eval()
    before = _module_loss(module, batch)
    args = (*batch.student.prompt, *batch.student.target)
    teacher = module.teacher.model
    with torch.no_grad():
        untrimmed_before = forward_kl(score_targets(module.student, *args), score_targets(teacher, *args),
                                      batch.student.target_mask)
    _scrambled_padding(module.student)
    _scrambled_padding(teacher)
    with torch.no_grad():
        untrimmed_after = forward_kl(score_targets(module.student, *args), score_targets(teacher, *args),
                                     batch.student.target_mask)
    assert abs(untrimmed_after - untrimmed_before) > 0.1  # the scrambled rows would change a loss that saw them
    assert torch.equal(_module_loss(module, batch), before)  # the module's loss does not see them


def test_a_vocabulary_smaller_than_the_tokenizer_is_refused():
    with pytest.raises(ValueError, match=r"config.vocab_size=700 is smaller than its tokenizer \(746 tokens\)"):
        _padded("student", 700, seed=0)


@pytest.mark.slow
def test_differently_padded_pair_trains_end_to_end(tmp_path):
    from kdlab.run.train import run

    overrides = [o for o in TINY_RUN if not o.startswith(("teacher=", "student=", "trainer.max_steps="))]
    cfg = compose([*overrides, "trainer.max_steps=2", "loss=fkl", "teacher=tiny_qwen3", "student=tiny_qwen3",
                   "+teacher.config.vocab_size=896", "+student.config.vocab_size=768"], output_dir=tmp_path)
    run(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["steps"] == 2
    exported = json.loads((tmp_path / "student" / "config.json").read_text())
    assert exported["vocab_size"] == 768 and exported["model_type"] == "qwen3"


def test_sampling_never_draws_the_rows_padded_beyond_the_tokenizer():
    from kdlab.sampling.hf import generate_targets

    module, batch = _module_and_batch(768, 768)
    _scrambled_padding(module.student)  # padding rows the softmax would otherwise favour
    settings = SamplingSettings(max_new_tokens=12, do_sample=True)
    tokenizer = module.step.tokenizer
    common = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    unguarded, _ = generate_targets(module.student, *batch.student.prompt, settings, **common)
    assert (unguarded >= TOKENS).any()  # without the tokenizer's size the padded rows are drawn
    torch.manual_seed(0)
    ids, mask = generate_targets(module.student, *batch.student.prompt, settings, vocab=TOKENS, **common)
    assert not (ids[mask] >= TOKENS).any()
    torch.manual_seed(0)
    module_ids, module_mask = module.step.sampled(batch, STUDENT, settings).student.target  # the step passes it
    assert not (module_ids[module_mask] >= TOKENS).any()


@pytest.mark.parametrize("fused", [False, True])
def test_sft_reads_the_tokenizers_columns_only(fused):
    """loss=sft's softmax runs over the tokens: rows of the output layer padded beyond the tokenizer never enter it
    (on the logits path and the fused one alike)."""
    from kdlab.losses.sft import cross_entropy

    module, batch = _module_and_batch(768, 768)
    step = distillation_step(module.student, module.step.tokenizer, Objective("sft", cross_entropy), fused=fused)
    module.eval()
    ids, mask = batch.student.target
    with torch.no_grad():
        logits = score_targets(module.student, *batch.student.prompt, ids, mask)[..., :TOKENS]
        by_hand = cross_entropy(logits, ids, mask)
        _scrambled_padding(module.student)
        targets = StepTargets(batch)
        loss, _ = step.loss(targets, DistillationStep.global_counts([targets], mask.device))
    torch.testing.assert_close(loss, by_hand, rtol=1e-5, atol=1e-6)
