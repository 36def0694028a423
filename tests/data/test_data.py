"""Tasks and batching: prompt/target text, truncation rules, padding sides, EOS, reproducible order, scoring."""

import pytest

from kdlab.data.datamodule import Collator, DistillationDataModule, TokenizedExamples, pad
from kdlab.data.tasks import Task
from kdlab.run.compose import task_node

SMALL = {"name": "arith", "train_size": 40, "val_size": 12, "eval_examples": 10, "batch_size": 4}


def test_pad_sides_hand_values():
    ids, mask = pad([[5, 6, 7], [8]], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad([[5, 6, 7], [8]], pad_id=0, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_prompt_and_target_text_follow_the_templates():
    task = Task.from_config(task_node(**SMALL))
    example = {"question": "Ann has 3 pens. How many?", "answer": "3 + 0 = 3\n#### 3"}
    assert task.prompt(example) == "Question: Ann has 3 pens. How many?\nAnswer:"
    assert task.target(example) == " 3 + 0 = 3\n#### 3"
    assert task.reference(example) == example["answer"]


def test_truncation_keeps_prompt_end_and_target_start_and_a_cut_target_gets_no_eos(tokenizer):
    task = Task.from_config(task_node(**SMALL, max_prompt_tokens=5, max_target_tokens=4))
    example = {"question": "one two three four five six", "answer": "alpha beta gamma delta"}
    item = TokenizedExamples([example], task, tokenizer)[0]
    prompt = tokenizer(task.prompt(example), add_special_tokens=False)["input_ids"]
    target = tokenizer(task.target(example), add_special_tokens=False)["input_ids"]
    assert item.student.prompt == prompt[-5:]
    assert item.student.target == target[:4]  # no EOS: the student must not learn to stop mid-answer
    assert task.report.splits["train"].truncated == {"prompt": 1, "target": 1}


def test_a_target_that_fits_ends_with_eos(tokenizer):
    task = Task.from_config(task_node(**SMALL, max_target_tokens=64))
    example = {"question": "q", "answer": "alpha"}
    target = tokenizer(task.target(example), add_special_tokens=False)["input_ids"]
    assert TokenizedExamples([example], task, tokenizer)[0].student.target == target + [tokenizer.eos_token_id]


def test_collated_batch_round_trips_to_text(tokenizer):
    task = Task.from_config(task_node(**SMALL))
    examples = task.splits()["train"][:3]
    batch = Collator(tokenizer.pad_token_id)(TokenizedExamples(examples, task, tokenizer).items)
    for row, example in enumerate(examples):
        prompt = tokenizer.decode(batch.student.prompt_ids[row][batch.student.prompt_mask[row]])
        target = batch.student.target_ids[row][batch.student.target_mask[row]]
        assert prompt == task.prompt(example)
        assert target[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(target[:-1]) == task.target(example)
    assert batch.student.prompt_mask[:, -1].all() and batch.student.target_mask[:, 0].all()  # left / right padding
    assert batch.reference == [e["answer"] for e in examples] and batch.teacher is None


def test_train_order_is_reproducible_per_seed_and_validation_is_capped(tokenizer):
    def order(seed):
        dm = DistillationDataModule(Task.from_config(task_node(**SMALL)), tokenizer, seed=seed)
        dm.setup()
        return [tuple(b.student.target_ids[0].tolist()) for b in dm.train_dataloader()]

    assert order(1) == order(1) and order(1) != order(2)
    dm = DistillationDataModule(Task.from_config(task_node(**SMALL)), tokenizer)
    dm.setup()
    assert len(dm.val_set) == 10


def test_task_score_is_gsm8k_accuracy():
    task = Task.from_config(task_node(**SMALL))
    references = ["2 + 2 = 4\n#### 4", "#### 1,000", "#### 7"]
    predictions = ["so #### 4", "#### 1000", "the answer is 7"]  # the last has no final-answer line
    assert task.score(predictions, references) == {"accuracy": pytest.approx(2 / 3)}
    assert task.metric_name == "accuracy"


def test_unknown_task_field_suggests_the_close_name():
    with pytest.raises(ValueError, match="did you mean task.eval_examples"):
        Task.from_config({**task_node(**SMALL), "eval_exmples": 3})
