"""`student.gradient_checkpointing=true` on one device: the same gradients, each block run twice, fewer tensors kept
for backward; through Lightning's training loop, and together with FSDP's
`trainer.strategy.activation_checkpointing`."""


import lightning as L
import pytest
import torch
import torch.nn.functional as F

from kdlab.data.datamodule import DistillationDataModule, pad
from kdlab.data.tasks import Task
from kdlab.losses import forward_kl
from kdlab.losses.objective import Objective
from kdlab.models.loading import load_model, load_tokenizer
from kdlab.models.scoring import score_targets
from kdlab.run.compose import task_node
from tests.builders import distillation_module
from tests.conftest import compose

PROMPTS = ["Question: Bo has 41 cards and buys 2.\nAnswer:", "Q: 9?\nA:", "Question: 12 + 7?\nAnswer:"]
TARGETS = [" 41 + 2 = 43", " 9", " 19 and then some"]


def _student(preset: str, checkpointing: bool, seed: int = 0):
    cfg = compose([f"student={preset}", f"student.gradient_checkpointing={str(checkpointing).lower()}"]).student
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(seed)
    return load_model(cfg, tokenizer), tokenizer


def _batch(tokenizer) -> tuple[torch.Tensor, ...]:
    prompt_ids, prompt_mask = pad(tokenizer(PROMPTS, add_special_tokens=False)["input_ids"], tokenizer.pad_token_id,
                                  "left")
    target_ids, target_mask = pad(tokenizer(TARGETS, add_special_tokens=False)["input_ids"], tokenizer.pad_token_id,
                                  "right")
    return prompt_ids, prompt_mask, target_ids, target_mask


def _loss(model, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Cross-entropy of the targets (a loss through every block and the output layer)."""
    logits = score_targets(model, *batch)
    target_ids, target_mask = batch[2], batch[3]
    return F.cross_entropy(logits[target_mask], target_ids[target_mask])


def _count_block_calls(model) -> list[int]:
    """A counter per transformer block, raised as its attention starts, recomputation included. (transformers
    checkpoints a block's `forward`, so hooks on the block itself run once; a recomputation stops early, once it
    has rebuilt what backward needs, so forward hooks at an end may not run either.)"""
    blocks = model.model.layers
    calls = [0] * len(blocks)
    for index, block in enumerate(blocks):
        block.self_attn.register_forward_pre_hook(lambda *_, i=index: calls.__setitem__(i, calls[i] + 1))
    return calls


def test_default_is_off_and_the_override_turns_it_on():
    assert compose([]).student.gradient_checkpointing is False  # one default for every student preset
    assert compose(["student=tiny_qwen3"]).student.gradient_checkpointing is False
    plain, _ = _student("tiny_qwen3", False)
    checkpointed, _ = _student("tiny_qwen3", True)
    assert [any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
            for model in (plain, checkpointed)] == [False, True]


@pytest.mark.parametrize("preset", ["tiny", "tiny_qwen3", "tiny_gemma3"])
def test_checkpointed_gradients_equal_plain_ones_and_each_block_runs_twice(preset):
    plain, tokenizer = _student(preset, False)
    checkpointed, _ = _student(preset, True)
    assert plain.config.attention_dropout == 0.0  # train mode, yet deterministic: the two runs must agree
    batch = _batch(tokenizer)
    calls = {"plain": _count_block_calls(plain), "checkpointed": _count_block_calls(checkpointed)}
    losses = {}
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        model.train()
        losses[name] = _loss(model, batch)
        losses[name].backward()
    assert calls == {"plain": [1, 1], "checkpointed": [2, 2]}  # recomputed in backward
    torch.testing.assert_close(losses["checkpointed"], losses["plain"], atol=1e-6, rtol=0)
    grads = {name: dict(model.named_parameters()) for name, model in (("p", plain), ("c", checkpointed))}
    for name, parameter in grads["p"].items():
        torch.testing.assert_close(grads["c"][name].grad, parameter.grad, atol=1e-6, rtol=0)


def _bytes_saved_for_backward(model, batch: tuple[torch.Tensor, ...]) -> int:
    """Bytes of the tensors autograd keeps from forward to backward (a checkpointed block keeps its own hooks, so
    what it recomputes is not seen here: that is the memory checkpointing frees)."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = _loss(model.train(), batch)
    loss.backward()
    return total


def test_checkpointing_keeps_fewer_tensors_for_backward():
    plain, tokenizer = _student("tiny_qwen3", False)
    checkpointed, _ = _student("tiny_qwen3", True)
    prompt_ids = torch.randint(3, len(tokenizer), (4, 96))
    target_ids = torch.randint(3, len(tokenizer), (4, 32))
    batch = (prompt_ids, torch.ones_like(prompt_ids, dtype=torch.bool), target_ids,
             torch.ones_like(target_ids, dtype=torch.bool))
    kept_plain = _bytes_saved_for_backward(plain, batch)
    kept_checkpointed = _bytes_saved_for_backward(checkpointed, batch)
    # measured 0.30: what is left is the output layer and the loss, outside the blocks
    assert kept_checkpointed < 0.5 * kept_plain


TASK = {"name": "arith", "train_size": 16, "val_size": 4, "eval_examples": 4, "batch_size": 4, "eval_batch_size": 4,
        "generation": {"max_new_tokens": 4, "do_sample": False}}


def _fit_one_step(checkpointing: bool) -> tuple[dict[str, torch.Tensor], list[int]]:
    student, tokenizer = _student("tiny", checkpointing, seed=0)
    teacher, _ = _student("tiny", False, seed=1)
    task = Task.from_config(task_node(**TASK))
    module = distillation_module(student, tokenizer, Objective("fkl", forward_kl), teacher, fraction=0.0,
                                 max_new_tokens=4, micro_batch_size=TASK["batch_size"], max_nonfinite_steps=10,
                                 optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
                                 score_groups=1)  # one scoring forward a step
    calls = _count_block_calls(student)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(module, datamodule=DistillationDataModule(task, tokenizer))
    return {k: v.detach().clone() for k, v in student.state_dict().items()}, calls


def test_lightning_step_recomputes_the_student_and_updates_it_as_without():
    plain_weights, plain_calls = _fit_one_step(False)
    weights, calls = _fit_one_step(True)
    assert plain_calls == [1, 1] and calls == [2, 2]  # ground truth: one scoring forward, recomputed in backward
    assert any(not torch.equal(weights[k], v) for k, v in _student("tiny", False)[0].state_dict().items())
    for name, value in plain_weights.items():
        torch.testing.assert_close(weights[name], value, atol=1e-6, rtol=0)



def test_fsdp_activation_checkpointing_on_a_checkpointed_student_changes_nothing(one_process_mesh):
    from kdlab.models.sharding import ShardingOptions, shard_model

    plain, tokenizer = _student("tiny", False)
    # student.gradient_checkpointing=true and trainer.strategy.activation_checkpointing
    sharded, _ = _student("tiny", True)
    shard_model(sharded, one_process_mesh, ShardingOptions(activation_checkpointing=True), frozen=False)
    calls = _count_block_calls(sharded)
    batch = _batch(tokenizer)
    for model in (plain.train(), sharded.train()):
        _loss(model, batch).backward()
    assert calls == [2, 2]  # recomputed once, not twice over
    sharded_grads = {name: p.grad.full_tensor() for name, p in sharded.named_parameters()}
    for name, parameter in plain.named_parameters():
        torch.testing.assert_close(sharded_grads[name], parameter.grad, atol=1e-6, rtol=0)
