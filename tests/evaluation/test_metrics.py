"""GSM8K answer extraction and scoring, and the `gsm8k_accuracy` evaluate metric that ships with kdlab."""

from __future__ import annotations

import ast
import importlib.util
import json
import random
from pathlib import Path

import pytest

from kdlab.data import answers
from kdlab.data.answers import INVALID_ANSWER, accuracy, extract_answer, is_correct
from kdlab.data.arith import make_splits
from kdlab.evaluation.metrics import METRICS_DIR, available_metrics, load_metric

GSM8K_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gsm8k"


@pytest.fixture(scope="module")
def metric():
    return load_metric("gsm8k_accuracy")


@pytest.fixture(scope="module")
def metric_script():
    """The metric script imported directly, to compare its regex with kdlab's."""
    path = METRICS_DIR / "gsm8k_accuracy" / "gsm8k_accuracy.py"
    spec = importlib.util.spec_from_file_location("_gsm8k_accuracy_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------- answers.py


@pytest.mark.parametrize("text,expected", [
    ("#### 1,234", "1234"),
    ("#### -5", "-5"),
    ("so she has 42 apples.\n#### 42", "42"),
    ("#### 3.50", "3.50"),  # no numeric normalisation: "3.50" stays "3.50"
    ("The answer is 42.", INVALID_ANSWER),
    ("####42", INVALID_ANSWER),  # the space after #### is part of the pattern
    ("#### ", INVALID_ANSWER),
    ("#### 7\n#### 8", "7"),  # the first match wins, as re.search does
    ("step 1\n#### 12 apples\nmore text #### 99", "12"),
    ("#### 1,000,000.", "1000000."),  # the character class takes a trailing dot too, exactly as the original
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_is_correct():
    assert is_correct("She has 40 + 2 = 42.\n#### 42", "40 + 2 = 42\n#### 42")
    assert is_correct("#### 1,234", "#### 1234")
    assert not is_correct("#### 42.0", "#### 42")  # string comparison, as GSM8K's scorer
    assert not is_correct("42", "#### 42")  # no marker: "[invalid]" is never correct
    assert not is_correct("#### 41", "#### 42")
    with pytest.raises(ValueError, match="no final answer"):
        is_correct("#### 42", "the reference lost its answer")
    with pytest.raises(ValueError, match="no final answer"):
        is_correct("[invalid]", "[invalid]")


def test_accuracy_of_a_known_list():
    refs = ["#### 1", "#### 2", "#### 3", "#### 4"]
    preds = ["#### 1", "x\n#### 2", "#### 30", "no answer"]
    assert accuracy(preds, refs) == 0.5
    assert accuracy([], []) == 0.0
    with pytest.raises(ValueError):
        accuracy(preds[:3], refs)


def test_every_gsm8k_test_answer_extracts_and_matches_itself():
    path = GSM8K_DIR / "test.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    with path.open(encoding="utf-8") as f:
        examples = [json.loads(line) for line in f if line.strip()]
    assert len(examples) > 1000
    for example in examples:
        assert set(example) >= {"question", "answer"}
        assert extract_answer(example["answer"]) != INVALID_ANSWER, example["answer"]
        assert is_correct(example["answer"], example["answer"])
    assert accuracy([e["answer"] for e in examples], [e["answer"] for e in examples]) == 1.0


# --------------------------------------------------------------------------------------------------- the metric


def test_metric_exact_accuracy_on_hand_made_predictions(metric):
    references = ["Mia has 2 + 3 = 5.\n#### 5", "#### 1,234", "#### -7", "#### 10", "#### 3", "#### 8", "#### 0"]
    predictions = [
        "Mia has 2 + 3 = 5.\n#### 5",  # right
        "#### 1234",  # right: commas are removed from both
        "#### -7 apples",  # right
        "#### 10.0",  # wrong: strings differ
        "3",  # wrong: no marker
        "#### 8\n#### 9",  # right: first match
        "####0",  # wrong: no space after the marker
    ]
    result = metric.compute(predictions=predictions, references=references)
    assert set(result) == {"accuracy"}
    assert result["accuracy"] == pytest.approx(4 / 7, abs=1e-12)
    assert result["accuracy"] == accuracy(predictions, references)


def test_metric_agrees_with_answers_on_corrupted_arith_predictions(metric):
    rng = random.Random(0)
    problems = make_splits(200, 1, seed=21)["train"]
    references = [p["answer"] for p in problems]
    predictions = []
    for reference in references:
        lines = reference.splitlines()
        value = int(lines[-1][len("#### "):])
        corruption = rng.choice(["none", "off_by_one", "no_marker", "comma", "truncated", "float"])
        if corruption == "off_by_one":
            lines[-1] = f"#### {value + rng.choice([-1, 1])}"
        elif corruption == "no_marker":
            lines[-1] = str(value)
        elif corruption == "comma":
            lines[-1] = f"#### {value:,}" if value >= 1000 else f"#### {value}"
        elif corruption == "truncated":
            lines = lines[: rng.randint(0, len(lines) - 1)]
        elif corruption == "float":
            lines[-1] = f"#### {value}.0"
        predictions.append("\n".join(lines))
    expected = accuracy(predictions, references)
    assert 0.1 < expected < 0.9  # the corruptions really change the score
    assert metric.compute(predictions=predictions, references=references)["accuracy"] == pytest.approx(expected)


def test_metric_reference_without_answer_is_an_error(metric):
    with pytest.raises(ValueError, match="no final answer"):
        metric.compute(predictions=["#### 1"], references=["no answer here"])


def test_metric_regex_duplicates_answers(metric_script):
    assert metric_script.ANSWER_PATTERN.pattern == answers.ANSWER_PATTERN.pattern
    assert metric_script.INVALID_ANSWER == answers.INVALID_ANSWER
    for text in ["#### 1,234", "#### -5", "nothing", "#### 7\n#### 8", "####9", "#### 1.5.", "#### ,"]:
        assert metric_script.extract_answer(text) == extract_answer(text)


def test_metric_script_imports_nothing_from_kdlab():
    # evaluate copies the script alone into its cache, where `kdlab` may not be importable
    tree = ast.parse((METRICS_DIR / "gsm8k_accuracy" / "gsm8k_accuracy.py").read_text())
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module or "." for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert {m.split(".")[0] for m in modules} <= {"re", "datasets", "evaluate"}, modules


def test_load_metric_unknown_name_lists_the_metrics():
    assert "gsm8k_accuracy" in available_metrics()
    with pytest.raises(ValueError, match="gsm8k_accuracy"):
        load_metric("rouge_l")  # close to a shipped name, but not one
    with pytest.raises(ValueError, match="unknown metric"):
        load_metric("../metrics")
