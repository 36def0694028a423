"""Generations keep the prompt, the reference and each example's own score: the per-example scores of every shipped
metric against the scoring rule called directly, and an evaluation's generations file against the shipped teacher's
answers checked one by one with kdlab.data.answers."""

import json

import lightning as L
import pytest
import sacrebleu
import torch
from rouge_score import rouge_scorer

from kdlab.data.answers import is_correct
from kdlab.data.datamodule import DistillationDataModule
from kdlab.data.tasks import Task
from kdlab.evaluation.generations import Generations, GenerationScorer, evaluate
from kdlab.models.loading import load_model
from kdlab.run.compose import task_node
from kdlab.sampling.base import SamplingSettings
from tests.builders import distillation_module
from tests.conftest import REPO, loss_config, tiny_model

TEXTS = [
    ("The council closed the old bridge. Repairs start on Monday!", "The old bridge was closed by the council."),
    ("Two men were arrested after a fight in Leeds.", "Police arrested two men following a fight in Leeds city."),
    ("Prices rose 3% in May.\nAnalysts expect more.", "Inflation hit 3% in May. Analysts expect further rises."),
    ("", "A reference with no prediction at all."),
]


def test_accuracy_per_example_is_each_answers_correctness():
    task = Task.from_config(task_node(name="arith"))
    references = ["so 2\n#### 2", "#### 1,000", "#### 7", "x\n#### -3"]
    predictions = ["#### 2", "#### 1000", "#### 7.0", "no answer"]
    scores, each = task.score_examples(predictions, references)
    assert each == [float(is_correct(p, r)) for p, r in zip(predictions, references)] == [1.0, 1.0, 0.0, 0.0]
    assert scores == {"accuracy": 0.5} == task.score(predictions, references)


@pytest.mark.parametrize("task_name,key", [("dialogsum", "rougeLsum"), ("xsum", "rouge2"), ("instruction", "rougeL")])
def test_rouge_per_example_is_rouge_score_of_that_pair(task_name, key):
    task = Task.from_config(task_node(name=task_name))
    predictions, references = [p for p, _ in TEXTS], [r for _, r in TEXTS]
    scores, each = task.score_examples(predictions, references)
    scorer = rouge_scorer.RougeScorer([key], use_stemmer=True)
    # rougeLsum reads sentences from newlines: the metric splits them (one sentence per line here already but
    # the first and third pairs), so the direct call gets the same split text
    split = {"rougeLsum": lambda t: t.replace(". ", ".\n").replace("! ", "!\n")}.get(key, lambda t: t)
    expected = [scorer.score(split(r), split(p))[key].fmeasure for p, r in TEXTS]
    assert each == pytest.approx(expected, abs=1e-12)
    assert scores[key] == pytest.approx(sum(expected) / len(expected), abs=1e-12)  # ROUGE: the mean of the examples
    assert each[-1] == 0.0 and 0.0 < each[0] < 1.0


def test_bleu_per_example_is_sentence_bleu():
    task = Task.from_config(task_node(name="wmt14_en_de"))
    predictions, references = [p for p, _ in TEXTS], [r for _, r in TEXTS]
    scores, each = task.score_examples(predictions, references)
    assert each == pytest.approx([sacrebleu.sentence_bleu(p, [r]).score for p, r in TEXTS], abs=1e-9)
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, [references]).score, abs=1e-9)


def test_rows_carry_prompt_prediction_reference_and_score(tmp_path):
    generations = Generations("student", predictions=["#### 3"], references=["#### 3"], prompts=["1 + 2 ="],
                              example_scores=[1.0], metric="accuracy")
    path = tmp_path / "g.jsonl"
    generations.write_jsonl(path)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"prompt": "1 + 2 =", "prediction": "#### 3", "reference": "#### 3", "score": 1.0, "metric": "accuracy"}]



def test_evaluation_writes_each_prompt_and_whether_its_answer_was_right(tokenizer, tmp_path, one_thread):
    """The shipped teacher (about 0.6 accuracy) answers 32 problems: some right, some wrong. Each line's prompt is the
    task's prompt of that validation example, its score is kdlab.data.answers' verdict, and their mean is the score
    the evaluation logged."""
    spec = {"name": "arith", "train_size": 32, "val_size": 32, "eval_examples": 32, "batch_size": 8,
            "eval_batch_size": 16, "generation": {"max_new_tokens": 96, "do_sample": False}}
    task = Task.from_config(task_node(**spec))
    torch.manual_seed(0)
    teacher = load_model({"name": "arith-teacher", "path": str(REPO / "src/kdlab/assets/arith/teacher"),
                          "dtype": "float32"}, tokenizer)
    module = distillation_module(tiny_model(tokenizer), tokenizer, loss_config("fkl"), teacher,
                                 eval_sampling=SamplingSettings(**spec["generation"]))
    datamodule = DistillationDataModule(task, tokenizer)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[GenerationScorer(task)])
    generations = evaluate(trainer, module, datamodule, "teacher")
    path = tmp_path / "teacher.jsonl"
    generations.write_jsonl(path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]

    examples = task.splits()["validation"][:32]
    assert [row["prompt"] for row in rows] == [task.prompt(e).strip() for e in examples]
    assert [row["reference"] for row in rows] == [task.reference(e) for e in examples]
    verdicts = [float(is_correct(row["prediction"], row["reference"])) for row in rows]
    assert [row["score"] for row in rows] == verdicts and {row["metric"] for row in rows} == {"accuracy"}
    assert 0 < sum(verdicts) < len(verdicts)  # both kinds of answer are checked
    assert generations.scores["accuracy"] == pytest.approx(sum(verdicts) / len(verdicts), abs=1e-12)
