"""docs/own_data.md as written: the chat-format example file it shows (written here from the page's own block) reads
as prompts, targets and references built from the conversation, its bad line is dropped by reason, a chat template
renders the turns, and the page's command trains on it."""

import json
import re

import pytest

from kdlab.data.datamodule import DistillationDataModule
from kdlab.data.tasks import Task, conversation_problem
from kdlab.run.compose import task_node
from kdlab.run.rundir import RESULTS
from kdlab.run.train import run
from tests.conftest import REPO, compose

PAGE = REPO / "docs" / "own_data.md"
# a ChatML-style template, as chat models ship them (tokenizer_config.json's `chat_template`)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def page_lines() -> list[str]:
    (block,) = re.findall(r"```jsonl\n(.*?)```", PAGE.read_text(), re.S)
    return block.strip().splitlines()


@pytest.fixture
def my_data(tmp_path):
    """The page's example folder: its lines four times as train.jsonl, once as validation.jsonl."""
    folder = tmp_path / "my_data"
    folder.mkdir()
    lines = page_lines()
    (folder / "train.jsonl").write_text("\n".join(lines * 4) + "\n")
    (folder / "validation.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _task(folder, **overrides) -> Task:
    return Task.from_config(task_node("chat", data={"hub": None, "path": str(folder)}, **overrides))


def test_a_conversation_becomes_prompt_target_and_reference(my_data):
    task = _task(my_data)
    examples = task.splits()["validation"]
    messages = [json.loads(line)["messages"] for line in page_lines()]
    assert len(examples) == 3  # the fourth line has no answer
    assert task.report.to_dict()["validation"]["dropped"] == {"messages does not end with an assistant's answer": 1}
    first, _, multi = examples
    assert task.prompt(first) == "system: You add numbers.\nuser: What is 2 + 3?\nassistant:"
    assert task.target(first) == " 2 + 3 = 5\n#### 5" and task.reference(first) == "2 + 3 = 5\n#### 5"
    assert task.conversation(multi) == messages[2][:-1]  # earlier turns, answers included, stay in the prompt
    assert task.prompt(multi).endswith("user: And 4 + 5?\nassistant:") and task.reference(multi).endswith("#### 9")


def test_conversations_that_cannot_train_are_named():
    assert conversation_problem("hi", "messages") == "messages is not a list of {role, content} messages"
    assert conversation_problem([{"role": "assistant", "content": "x"}], "messages") == (
        "messages has no message before the answer")
    assert conversation_problem([{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}],
                                "messages") == "messages does not end with an assistant's answer"
    assert conversation_problem([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                                "messages") is None


def test_a_chat_template_renders_the_turns_and_the_answer_follows_it(my_data, tokenizer):
    tokenizer = tokenizer.__class__.from_pretrained(str(REPO / "src/kdlab/assets/arith/tokenizer"))
    tokenizer.chat_template = CHATML
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    task = _task(my_data, batch_size=4)
    datamodule = DistillationDataModule(task, tokenizer)
    datamodule.setup("fit")
    example = datamodule.val_set.items[0]
    messages = json.loads(page_lines()[0])["messages"]
    text = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou add numbers.<|im_end|>\n<|im_start|>user\n")
    assert example.student.prompt == tokenizer(text, add_special_tokens=False)["input_ids"]
    # after the template's assistant turn the answer starts as written (no space a plain prompt needs)
    assert example.student.target == tokenizer("2 + 3 = 5\n#### 5", add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id]


def test_chat_data_refuses_what_does_not_apply():
    from kdlab.data.tasks import task_config_errors

    errors = task_config_errors(task_node("chat", data={"hub": None, "path": "x"}, few_shot=2))
    assert errors == ["task.few_shot does not apply to chat-format data (task.messages_field); set it to 0, or put "
                      "exemplars in the conversations"]


def test_the_pages_command_trains_on_the_pages_file(my_data, tmp_path, monkeypatch):
    monkeypatch.chdir(my_data.parent)  # `task.data.path=my_data`, relative as the page writes it
    (command,) = [line for line in PAGE.read_text().splitlines() if line.startswith("python train.py task=chat")]
    overrides = command.split()[2:] + ["trainer.max_steps=2", "task.eval_examples=3",
                                       "task.generation.max_new_tokens=8", "policy.sampling.max_new_tokens=8"]
    run(compose(overrides, output_dir=tmp_path / "run"))
    results = json.loads((tmp_path / "run" / RESULTS).read_text())
    assert results["metric"] == "rougeL" and results["steps"] == 2
    assert results["data"]["train"]["dropped"] == {"messages does not end with an assistant's answer": 4}
    rows = [json.loads(line) for line in (tmp_path / "run" / "generations" / "student_after.jsonl").open()]
    assert [row["reference"] for row in rows] == ["2 + 3 = 5\n#### 5", "7 + 8 = 15\n#### 15", "4 + 5 = 9\n#### 9"]
