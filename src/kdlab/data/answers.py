"""Final-answer extraction and correctness, exactly as GSM8K is scored.

The reference scorer released with GSM8K (openai/grade-school-math, `grade_school_math/dataset.py`) works on text:

1. find the first match of the regex ``#### (\\-?[0-9\\.\\,]+)`` in the text (``re.search``);
2. take the captured group, strip surrounding whitespace and remove every comma (``"1,234"`` -> ``"1234"``);
3. if there is no match the extracted answer is the string ``"[invalid]"``;
4. a prediction is correct when its extracted answer is a valid answer and equals, *as a string*, the answer
   extracted the same way from the reference solution. The reference must itself have a final answer.

So ``"#### 42"`` matches ``"#### 42"`` but not ``"#### 42.0"`` or ``"####42"``: there is no numeric normalisation, which
is what the published GSM8K accuracies use. This module reimplements that rule (it copies no code); the `gsm8k_accuracy`
metric in `kdlab/evaluation/metrics/` carries its own copy of the same regex and a test checks they agree.
"""

from __future__ import annotations

import re
from typing import Sequence

__all__ = ["ANSWER_PATTERN", "INVALID_ANSWER", "extract_answer", "is_correct", "accuracy"]

ANSWER_PATTERN = re.compile(r"#### (\-?[0-9\.\,]+)")
INVALID_ANSWER = "[invalid]"


def extract_answer(text: str) -> str:
    """The final answer in `text` (first `#### x`, stripped, commas removed), or `INVALID_ANSWER` if there is none."""
    match = ANSWER_PATTERN.search(text)
    if match is None:
        return INVALID_ANSWER
    return match.group(1).strip().replace(",", "")


def is_correct(prediction: str, reference: str) -> bool:
    """Whether `prediction`'s final answer equals that of the full GSM8K answer `reference`.

    Raises ValueError when `reference` has no final answer (that is a data error, not a wrong prediction).
    """
    gold = extract_answer(reference)
    if gold == INVALID_ANSWER:
        raise ValueError(f"reference has no final answer (`#### x`): {reference[-200:]!r}")
    return extract_answer(prediction) == gold


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of `predictions` that are correct for the `references` at the same positions (0.0 when empty)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return 0.0
    return sum(is_correct(p, r) for p, r in zip(predictions, references)) / len(predictions)
