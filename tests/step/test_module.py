"""DistillationModule: frozen teacher, student-only optimizer, checkpoints without the teacher, the step's loss."""

import copy

import lightning as L
import pytest
import torch

from kdlab.data.datamodule import DistillationDataModule
from kdlab.data.tasks import Task
from kdlab.losses import forward_kl
from kdlab.models.scoring import score_targets
from kdlab.run.compose import task_node
from kdlab.sampling.base import SamplingSettings
from kdlab.step.module import shards_models
from tests.builders import distillation_module
from tests.conftest import loss_config, tiny_model

TASK = {"name": "arith", "train_size": 32, "val_size": 8, "eval_examples": 8, "batch_size": 4, "eval_batch_size": 8,
        "generation": {"max_new_tokens": 8, "do_sample": False}}


def _module(tokenizer, fraction=1.0, loss="rkl", teacher=True, fixed_source="ground_truth", max_new_tokens=8,
            **settings):
    task = Task.from_config(task_node(**TASK))
    module = distillation_module(tiny_model(tokenizer, seed=0), tokenizer, loss_config(loss),
                                 tiny_model(tokenizer, seed=1, width=48) if teacher else None, fraction=fraction,
                                 fixed_source=fixed_source, max_new_tokens=max_new_tokens, score_groups=4,
                                 micro_batch_size=TASK["batch_size"], max_nonfinite_steps=3,
                                 eval_sampling=SamplingSettings(**TASK["generation"]), **settings)
    return module, DistillationDataModule(task, tokenizer)


def _fit(module, datamodule, steps=2):
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule)
    return trainer


def test_teacher_stays_frozen_in_eval_mode_and_unchanged(tokenizer):
    module, datamodule = _module(tokenizer)
    (teacher,) = module.teachers
    teacher_before = copy.deepcopy(teacher.state_dict())
    student_before = copy.deepcopy(module.student.state_dict())
    module.train()
    assert module.student.training and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    _fit(module, datamodule)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())
    assert any(not torch.equal(v, module.student.state_dict()[k]) for k, v in student_before.items())
    assert not teacher.training


def test_optimizer_sees_student_parameters_only(tokenizer):
    module, _ = _module(tokenizer)
    optimizer = module.configure_optimizers()
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.student.parameters()}


def test_checkpoint_leaves_the_teacher_out(tokenizer):
    module, _ = _module(tokenizer)
    checkpoint = {"state_dict": module.state_dict()}
    assert any(k.startswith("teachers.") for k in checkpoint["state_dict"])
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and all(k.startswith("student.") for k in checkpoint["state_dict"])


def test_training_step_loss_is_the_divergence_on_ground_truth_targets(tokenizer):
    module, datamodule = _module(tokenizer, fraction=0.0, loss="fkl")
    captured = {}
    original_end = module.on_train_batch_end

    def capture(outputs, batch, batch_idx):  # what the first step returned, and on which batch
        captured.setdefault("loss", outputs["loss"].detach())
        captured.setdefault("batch", batch)
        original_end(outputs, batch, batch_idx)

    module.on_train_batch_end = capture
    student_before = copy.deepcopy(module.student).eval()
    _fit(module, datamodule, steps=1)
    batch = captured["batch"]
    args = (*batch.student.prompt, *batch.student.target)
    with torch.no_grad():
        expected = forward_kl(score_targets(student_before, *args), score_targets(module.teachers[0], *args),
                              batch.student.target_mask)
    torch.testing.assert_close(captured["loss"], expected, atol=1e-6, rtol=1e-6)


def test_divergence_without_teacher_is_refused(tokenizer):
    with pytest.raises(ValueError, match="no teacher"):
        _module(tokenizer, loss="jsd", teacher=False)


@pytest.mark.parametrize("fraction,fixed_source,sampler",
                         [(1.0, "ground_truth", "student"), (0.0, "teacher", "teacher"), (0.0, "ground_truth", None)])
def test_each_step_trains_on_the_source_the_policy_drew(tokenizer, monkeypatch, fraction, fixed_source, sampler):
    import kdlab.sampling.hf

    module, datamodule = _module(tokenizer, fraction=fraction, loss="jsd", fixed_source=fixed_source,
                                 max_new_tokens=6)
    calls = []
    real_generate = kdlab.sampling.hf.generate_targets

    def recording_generate(model, *args, **kwargs):
        modes = []  # the model's train flag at every forward pass made while sampling
        hook = model.register_forward_pre_hook(lambda m, _: modes.append(m.training))
        ids, mask = real_generate(model, *args, **kwargs)
        hook.remove()
        calls.append((model, ids, mask, any(modes)))
        return ids, mask

    monkeypatch.setattr(kdlab.sampling.hf, "generate_targets", recording_generate)
    scored = []
    real_loss = module.step.loss  # what each micro-batch's loss reads (logits path or fused alike)
    monkeypatch.setattr(module.step, "loss", lambda targets, counts: scored.append(targets.batch.student.target)
                        or real_loss(targets, counts))
    _fit(module, datamodule, steps=2)
    assert len(scored) == 2  # one scoring per step (one micro-batch each)

    if sampler is None:
        assert calls == []  # ground truth: nothing sampled
        return
    sampled_by = module.student if sampler == "student" else module.teachers[0]
    assert len(calls) == 2 and all(model is sampled_by for model, *_ in calls)
    assert not any(training for *_, training in calls)  # every sampling forward ran in eval mode
    for (_, ids, mask, _), (scored_ids, scored_mask) in zip(calls, scored):
        assert torch.equal(ids, scored_ids) and torch.equal(mask, scored_mask)  # the loss saw exactly those samples
        assert ids.shape[1] <= 6


def test_lockstep_generation_only_under_sharded_strategies(tokenizer):
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy

    from kdlab.models.sharding import FSDP2Strategy

    module, datamodule = _module(tokenizer)
    assert module.step.sharded is False and module.step.groups == 4
    for strategy, sharded in [(SingleDeviceStrategy("cpu"), False), (DDPStrategy(), False), (FSDPStrategy(), True),
                              (ModelParallelStrategy(), True), (FSDP2Strategy(), True)]:
        assert shards_models(strategy) is sharded, type(strategy).__name__
    _fit(module, datamodule, steps=1)  # a single-device trainer: setup leaves the step unsharded
    assert module.step.sharded is False


def test_scoring_in_length_groups_gives_the_loss_of_one_padded_batch(tokenizer):
    module, datamodule = _module(tokenizer, loss="jsd")
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    mask = batch.student.target_mask  # answers of different lengths
    from kdlab.models.scoring import length_groups

    assert len(length_groups(batch.student.prompt_mask.sum(1).tolist(), mask.sum(1).tolist(), 4)) > 1
    losses = {}
    for groups in (1, 4):
        module.step.score_groups = groups
        loss = module.step.validation_loss(batch)
        (grad,) = torch.autograd.grad(loss, module.student.get_input_embeddings().weight)
        losses[groups] = (loss.item(), grad)
    assert losses[4][0] == pytest.approx(losses[1][0], rel=1e-5, abs=1e-7)
    torch.testing.assert_close(losses[4][1], losses[1][1], atol=1e-7, rtol=1e-4)


def test_gradient_clipping_bounds_the_update_under_manual_optimization(tokenizer):
    module, datamodule = _module(tokenizer, fraction=0.0, loss="fkl", gradient_clip_val=1e-3,
                                 optimizer=lambda params: torch.optim.SGD(params, lr=1.0))
    before = [p.detach().clone() for p in module.student.parameters()]
    _fit(module, datamodule, steps=1)
    update = torch.cat([(p.detach() - b).flatten() for p, b in zip(module.student.parameters(), before)])
    assert update.norm().item() == pytest.approx(1e-3, rel=1e-3)  # SGD with lr 1: the clipped gradient's norm


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_evaluate_returns_the_generations_it_scored(tokenizer, role):
    from kdlab.evaluation.generations import GenerationScorer, evaluate
    from kdlab.sampling.hf import generate_targets

    module, datamodule = _module(tokenizer)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[GenerationScorer(datamodule.task)])
    generations = evaluate(trainer, module, datamodule, role)
    datamodule.setup()
    batch = next(iter(datamodule.val_dataloader()))
    model = module.teachers[0] if role == "teacher" else module.student
    ids, _ = generate_targets(model, *batch.student.prompt, module.settings.eval_sampling,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    by_hand = [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    assert generations.role == role and module.eval_role == "student"
    assert generations.predictions == by_hand and generations.references == batch.reference
    assert generations.scores == datamodule.task.score(by_hand, batch.reference)
    assert trainer.callback_metrics[f"{'teacher' if role == 'teacher' else 'val'}/accuracy"] == pytest.approx(
        generations.scores["accuracy"])
