"""The synthetic GSM8K-style task: determinism, disjoint splits, consistent worked steps, and the difficulty knobs."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kdlab.data.answers import extract_answer
from kdlab.data.arith import STEP_PATTERN, ArithSpec, generate_problem, make_splits, solve_steps

FINAL_LINE = re.compile(r"#### (\d+)")


def _problems(n: int, spec: ArithSpec = ArithSpec(), seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [generate_problem(rng, spec) for _ in range(n)]


def _step_lines(answer: str) -> list[str]:
    return answer.splitlines()[:-1]


def test_same_seed_same_splits_and_different_seed_different():
    a = make_splits(200, 50, seed=7, test_size=30)
    b = make_splits(200, 50, seed=7, test_size=30)
    c = make_splits(200, 50, seed=8, test_size=30)
    assert a == b
    assert set(a) == {"train", "validation", "test"}
    assert [len(a[k]) for k in ("train", "validation", "test")] == [200, 50, 30]
    for split in a:
        assert a[split] != c[split]
    assert "test" not in make_splits(10, 5, seed=7)


def test_splits_are_disjoint_and_unique():
    splits = make_splits(2000, 300, seed=3, test_size=300)
    questions = {k: [e["question"] for e in v] for k, v in splits.items()}
    for split, qs in questions.items():
        assert len(set(qs)) == len(qs), f"duplicate questions within {split}"
    assert not set(questions["train"]) & set(questions["validation"])
    assert not set(questions["train"]) & set(questions["test"])
    assert not set(questions["validation"]) & set(questions["test"])


def test_splits_are_the_same_in_another_process_with_another_hash_seed():
    # the per-split generators are seeded through sha256, never Python's salted hash()
    code = "import json; from kdlab.data.arith import make_splits; print(json.dumps(make_splits(20, 5, seed=11)))"
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == make_splits(20, 5, seed=11)


def test_validation_stays_put_when_train_size_changes():
    small, large = make_splits(100, 40, seed=5), make_splits(400, 40, seed=5)
    kept = [e for e in small["validation"] if e in large["validation"]]
    assert len(kept) >= 35  # only validation problems that collide with the larger train split may be replaced


def test_too_small_a_space_is_an_error_not_a_hang(monkeypatch):
    import kdlab.data.arith as arith

    monkeypatch.setattr(arith, "generate_problem", lambda rng, spec: {"question": "q", "answer": "1 + 1 = 2\n#### 2"})
    with pytest.raises(ValueError, match="distinct"):
        arith.make_splits(2, 0, seed=0)


def test_every_answer_is_consistent_and_ends_with_its_value():
    for problem in _problems(500):
        answer = problem["answer"]
        last = answer.splitlines()[-1]
        match = FINAL_LINE.fullmatch(last)
        assert match, last
        assert solve_steps(answer) == int(match.group(1))
        assert extract_answer(answer) == match.group(1)
        assert set(problem) == {"question", "answer", "steps"}
        assert problem["steps"] == problem["answer"].count("\n")  # one line per operation, then the final answer


def test_solve_steps_rejects_inconsistent_or_missing_steps():
    assert solve_steps("She has 12 + 30 = 42 apples.\nShe gives 2, so 42 - 2 = 40.\n#### 40") == 40
    assert solve_steps("Each gets 42 / 6 = 7.\n#### 7") == 7
    assert solve_steps("He buys 3 * 12 = 36, so he has 1,200 + 36 = 1,236.\n#### 1236") == 1236
    with pytest.raises(ValueError, match="inconsistent"):
        solve_steps("She has 12 + 30 = 43 apples.\n#### 43")
    with pytest.raises(ValueError, match="division"):
        solve_steps("Each gets 43 / 6 = 7.\n#### 7")
    with pytest.raises(ValueError, match="no `a op b = c`"):
        solve_steps("#### 7")


def test_step_numbers_come_from_the_question_or_earlier_steps():
    for problem in _problems(500, seed=1):
        stated = set(re.findall(r"\d+", problem["question"]))
        known = set(stated)
        operands_from_question = 0
        for line in _step_lines(problem["answer"]):
            for match in STEP_PATTERN.finditer(line):
                a, _, b, c = match.groups()
                assert a in known and b in known, (a, b, problem)
                operands_from_question += b in stated
                known.add(c)
        steps = len(_step_lines(problem["answer"]))
        assert operands_from_question >= steps  # every step brings in at least one number copied from the question


def _check_knobs(problem: dict, spec: ArithSpec) -> int:
    """Asserts the spec's bounds on one problem; returns its number of step lines."""
    lines = _step_lines(problem["answer"])
    assert spec.min_steps <= len(lines) <= spec.max_steps
    assert all(1 <= int(n) <= spec.max_total for n in re.findall(r"\d+", problem["question"]))
    products = set()
    for line in lines:
        for match in STEP_PATTERN.finditer(line):
            a, op, b, c = match.groups()
            assert 0 <= int(a) <= spec.max_total and 0 <= int(c) <= spec.max_total, line
            if op == "*":  # `groups * size` or `total * multiplier`: one factor is a multiplier
                assert 2 <= int(a) <= spec.max_multiplier or 2 <= int(b) <= spec.max_multiplier, line
                products.add(c)
            elif op == "/":
                assert 2 <= int(b) <= spec.max_multiplier, line
            else:  # an addend/subtrahend from the question, or the product of a group computed just before
                assert 1 <= int(b) <= spec.max_operand or b in products, line
    return len(lines)


def test_default_knobs_respected_over_500_problems():
    counts = {_check_knobs(problem, ArithSpec()) for problem in _problems(500, seed=2)}
    assert counts == {2, 3, 4}  # the whole range is used


def test_custom_knobs_respected():
    spec = ArithSpec(min_steps=5, max_steps=6, max_operand=20, max_multiplier=3, max_total=60)
    ops = set()
    for problem in _problems(500, spec, seed=4):
        _check_knobs(problem, spec)
        ops |= {m.group(2) for m in STEP_PATTERN.finditer(problem["answer"])}
    assert ops == {"+", "-", "*", "/"}


def test_exact_step_count():
    spec = ArithSpec(min_steps=3, max_steps=3)
    for problem in _problems(50, spec, seed=5):
        assert len(_step_lines(problem["answer"])) == 3
        assert problem["answer"].count("\n") == 3


def test_bad_specs_are_rejected():
    with pytest.raises(ValueError):
        ArithSpec(min_steps=3, max_steps=2)
    with pytest.raises(ValueError):
        ArithSpec(min_steps=0)
    with pytest.raises(ValueError):
        ArithSpec(max_multiplier=1)


def test_templates_vary():
    problems = _problems(300, seed=6)
    names = {p["question"].split()[0] for p in problems}
    first_words = {line.split()[0] for p in problems for line in _step_lines(p["answer"])}
    assert len(names) >= 10
    assert len(first_words) >= 10
    assert len({p["question"].split("?")[0].split(".")[-1] for p in problems}) >= 3  # several question shapes
