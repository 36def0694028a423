"""The data policy's per-step draw (GKD Algorithm 1)."""

import pytest

from kdlab.step.policy import STUDENT, DataPolicy


def test_draw_is_a_function_of_seed_and_step():
    a, b = DataPolicy(student_fraction=0.5, seed=7), DataPolicy(student_fraction=0.5, seed=7)
    assert [a.draw(s) for s in range(200)] == [b.draw(s) for s in range(200)]
    # in any order: a rank or a resumed run that reaches step s takes the same branch
    assert [a.draw(s) for s in reversed(range(200))] == [b.draw(s) for s in range(200)][::-1]


def test_different_seeds_give_different_draw_sequences():
    draws = {seed: [DataPolicy(0.5, seed=seed).draw(s) for s in range(64)] for seed in (0, 1)}
    assert draws[0] != draws[1]


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_observed_fraction_matches_lambda(fraction):
    n = 4000
    hits = sum(DataPolicy(fraction, seed=3).draw(s) == STUDENT for s in range(n))
    std = (fraction * (1 - fraction) / n) ** 0.5
    assert abs(hits / n - fraction) < 4 * std


def test_endpoints_and_fixed_source():
    assert {DataPolicy(0.0).draw(s) for s in range(100)} == {"ground_truth"}
    assert {DataPolicy(1.0).draw(s) for s in range(100)} == {STUDENT}
    seqkd = DataPolicy(0.0, fixed_source="teacher")
    assert {seqkd.draw(s) for s in range(100)} == {"teacher"}
    assert seqkd.uses_teacher_samples and not DataPolicy(1.0, fixed_source="teacher").uses_teacher_samples


def test_invalid_values_are_refused():
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        DataPolicy(1.5)
    with pytest.raises(ValueError, match="fixed_source"):
        DataPolicy(0.5, fixed_source="student")
