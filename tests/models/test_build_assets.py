"""`python -m kdlab.models.build_assets`, the documented way to rebuild the shipped checkpoints, run end to end but
short."""

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdlab.models.build_assets import main
from kdlab.run.rundir import RESULTS
from tests.conftest import CONF_DIR

pytestmark = pytest.mark.slow


def test_build_assets_writes_loadable_tokenizer_teacher_and_student(tmp_path):
    assets = tmp_path / "assets"
    main(["--config-dir", str(CONF_DIR), "--work-dir", str(tmp_path / "work"), "--assets-dir", str(assets),
          "trainer.max_steps=2", "trainer.val_check_interval=1000", "task.train_size=64", "task.val_size=8",
          "task.eval_examples=8", "task.eval_batch_size=8", "task.generation.max_new_tokens=8"])
    tokenizer = AutoTokenizer.from_pretrained(assets / "tokenizer")
    text = "Question: Mia has 23 apples.\nAnswer: 23 + 4 = 27\n#### 27"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    teacher = AutoModelForCausalLM.from_pretrained(assets / "teacher")
    student = AutoModelForCausalLM.from_pretrained(assets / "student")
    # the architectures of the experiment presets, built with the freshly trained tokenizer
    assert teacher.config.hidden_size == 128 and teacher.config.num_hidden_layers == 4
    assert student.config.hidden_size == 96 and student.config.num_hidden_layers == 3
    assert teacher.config.vocab_size == student.config.vocab_size == len(tokenizer)
    assert teacher.num_parameters() > 2 * student.num_parameters()
    # the cross-tokenizer teacher: the teacher's architecture on a Unigram tokenizer of another vocabulary
    unigram = AutoTokenizer.from_pretrained(assets / "unigram_tokenizer")
    assert unigram.decode(unigram(text, add_special_tokens=False)["input_ids"]) == text
    assert json.loads(unigram.backend_tokenizer.to_str())["model"]["type"] == "Unigram"
    assert len(unigram) != len(tokenizer)
    cross = AutoModelForCausalLM.from_pretrained(assets / "unigram_teacher")
    assert cross.config.hidden_size == 128 and cross.config.vocab_size == len(unigram)
    results = json.loads((tmp_path / "work" / "teacher" / RESULTS).read_text())
    assert results["loss"] == "sft" and results["teacher"] is None and results["steps"] == 2
