"""The data policy's per-step draw (GKD Algorithm 1)."""

import pytest

from kdlab.sampling.base import SamplingSettings
from kdlab.step.policy import STUDENT, DataPolicy


def _policy(student_fraction: float, fixed_source: str = "ground_truth", seed: int = 0) -> DataPolicy:
    return DataPolicy(student_fraction, fixed_source, SamplingSettings(max_new_tokens=8, do_sample=True), seed)


def test_draw_is_a_function_of_seed_and_step():
    a, b = _policy(student_fraction=0.5, seed=7), _policy(student_fraction=0.5, seed=7)
    assert [a.draw(s) for s in range(200)] == [b.draw(s) for s in range(200)]
    # in any order: a rank or a resumed run that reaches step s takes the same branch
    assert [a.draw(s) for s in reversed(range(200))] == [b.draw(s) for s in range(200)][::-1]


def test_different_seeds_give_different_draw_sequences():
    draws = {seed: [_policy(0.5, seed=seed).draw(s) for s in range(64)] for seed in (0, 1)}
    assert draws[0] != draws[1]


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_observed_fraction_matches_lambda(fraction):
    n = 4000
    hits = sum(_policy(fraction, seed=3).draw(s) == STUDENT for s in range(n))
    std = (fraction * (1 - fraction) / n) ** 0.5
    assert abs(hits / n - fraction) < 4 * std


def test_endpoints_and_fixed_source():
    assert {_policy(0.0).draw(s) for s in range(100)} == {"ground_truth"}
    assert {_policy(1.0).draw(s) for s in range(100)} == {STUDENT}
    seqkd = _policy(0.0, fixed_source="teacher")
    assert {seqkd.draw(s) for s in range(100)} == {"teacher"}
    assert seqkd.uses_teacher_samples and not _policy(1.0, fixed_source="teacher").uses_teacher_samples


def test_invalid_values_are_refused():
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        _policy(1.5)
    with pytest.raises(ValueError, match="fixed_source"):
        _policy(0.5, fixed_source="student")
