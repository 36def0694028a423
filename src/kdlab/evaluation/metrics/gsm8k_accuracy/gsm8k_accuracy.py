"""GSM8K accuracy: the fraction of generations whose final answer equals the reference's, scored as GSM8K is.

This is an `evaluate` metric module. `evaluate.load` copies this file alone into its modules cache and imports it
from there, so it must not import anything from kdlab: the scoring rule is written out again here on purpose.
kdlab's own copy lives in `kdlab/data/answers.py`, and a test checks that the two give the same scores.
"""

import re

import datasets
import evaluate

_DESCRIPTION = """
Exact-match accuracy of GSM8K final answers. The final answer of a text is the first match of the regex
`#### (\\-?[0-9\\.\\,]+)`, stripped, with commas removed; a text without a match has the answer "[invalid]", which
is never correct. A prediction is correct when its final answer equals the reference's as a string. This is the
rule of the reference scorer released with GSM8K (openai/grade-school-math); every reference must have a final
answer.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): generated solutions; only the text after the first `#### ` is compared.
    references (`list` of `str`): full reference solutions, each containing a final `#### <answer>` line.
    per_example (`bool`): also return `per_example`, {"accuracy": [1.0 or 0.0 per prediction]}.
Returns:
    accuracy (`float`): fraction of predictions whose final answer equals the reference's (0.0 for no examples).
Examples:
    >>> metric = evaluate.load("path/to/gsm8k_accuracy")
    >>> metric.compute(predictions=["2 + 2 = 4\\n#### 4", "#### 5"], references=["#### 4", "#### 4"])
    {'accuracy': 0.5}
"""

_CITATION = """
@article{cobbe2021gsm8k,
  title={Training Verifiers to Solve Math Word Problems},
  author={Cobbe, Karl and Kosaraju, Vineet and Bavarian, Mohammad and Chen, Mark and Jun, Heewoo and
          Kaiser, Lukasz and Plappert, Matthias and Tworek, Jerry and Hilton, Jacob and Nakano, Reiichiro and
          Hesse, Christopher and Schulman, John},
  journal={arXiv preprint arXiv:2110.14168},
  year={2021}
}
"""

# Deliberately duplicated from kdlab.data.answers (this script is copied out of the package by `evaluate.load`,
# so it cannot import kdlab); tests/evaluation/test_metrics.py checks that both agree.
ANSWER_PATTERN = re.compile(r"#### (\-?[0-9\.\,]+)")
INVALID_ANSWER = "[invalid]"


def extract_answer(text):
    match = ANSWER_PATTERN.search(text)
    if match is None:
        return INVALID_ANSWER
    return match.group(1).strip().replace(",", "")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Gsm8kAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Value("string"),
                "references": datasets.Value("string"),
            }),
            reference_urls=["https://github.com/openai/grade-school-math"],
        )

    def _compute(self, predictions, references, per_example=False):
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
        correct = []
        for prediction, reference in zip(predictions, references):
            gold = extract_answer(reference)
            if gold == INVALID_ANSWER:
                raise ValueError(f"reference has no final answer (`#### x`): {reference[-200:]!r}")
            correct.append(1.0 if extract_answer(prediction) == gold else 0.0)
        result = {"accuracy": sum(correct) / len(predictions) if predictions else 0.0}
        if per_example:  # each example's own score (0 or 1), written beside its generation
            result["per_example"] = {"accuracy": correct}
        return result
