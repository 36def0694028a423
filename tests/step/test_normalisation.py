"""One loss normalisation under every split of a batch: each term is a sum over units, normalised once by the global
count. Unit tests on tensors (every loss, the reward term), then whole runs: one process with batch 8, batch 4 with
accumulation 2, and 2 processes of batch 4 end with the same weights."""

from __future__ import annotations

import pytest
import torch

from kdlab.losses import cross_entropy, forward_kl, generalized_jsd
from kdlab.losses.normalisation import NONE, SEQUENCES, TOKENS, LossSum, from_mean, normalised, unit_counts
from kdlab.losses.objective import build_objective
from kdlab.run.compose import task_node
from kdlab.step.rewards import policy_gradient_loss, policy_gradient_sum
from tests.conftest import loss_config
from tests.workers.normalisation_ddp import CASES, WHOLE_RUN

VOCAB, TEACHER_VOCAB = 11, 17


def _lengths_mask(lengths: list[int], width: int) -> torch.Tensor:
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


def _batch(seed: int = 0):
    """Four rows whose scored-token counts differ (1, 6, 3, 0): a mean of the halves' means is not the batch mean."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(4, 6, VOCAB, generator=g) * 2
    teacher = torch.randn(4, 6, VOCAB, generator=g) * 2
    teacher_own = torch.randn(4, 7, TEACHER_VOCAB, generator=g) * 2
    targets = torch.randint(0, VOCAB, (4, 6), generator=g)
    mask = _lengths_mask([1, 6, 3, 0], 6)
    teacher_mask = _lengths_mask([2, 7, 3, 1], 7)
    return student, teacher, teacher_own, targets, mask, teacher_mask


# Every kind of objective: token mean, sequence mean, sum, SFT, a divergence with a CE term, MultiLevelOT, ULD.
OBJECTIVES = [
    ("jsd", {}),
    ("jsd", {"reduction": "sequence_mean"}),
    ("fkl", {"reduction": "sum"}),
    ("sft", {}),
    ("rkl", {"ce_weight": 0.5}),
    ("ot", {"top_k": 5}),
    ("uld", {}),
]


def _objective(case):
    name, overrides = case
    return build_objective(loss_config(name, **overrides))


def _terms(objective, student, teacher, teacher_own, targets, mask, teacher_mask, rows=slice(None)):
    cross = objective.cross_tokenizer
    return objective.terms(student[rows], (teacher_own if cross else teacher)[rows], targets[rows], mask[rows],
                           teacher_mask[rows] if cross else None)


def _global(masks: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    counts = [unit_counts(m) for m in masks]
    return {TOKENS: sum(c[TOKENS] for c in counts), SEQUENCES: sum(c[SEQUENCES] for c in counts),
            NONE: torch.tensor(1.0)}


def _loss(terms, counts) -> torch.Tensor:
    return sum(weight * normalised(term, counts) for weight, term in terms.values())


@pytest.mark.parametrize("case", OBJECTIVES, ids=lambda c: "-".join([c[0], *map(str, c[1].values())]))
def test_a_split_batch_with_global_counts_has_the_loss_and_gradient_of_the_whole_batch(case):
    objective = _objective(case)
    student, teacher, teacher_own, targets, mask, teacher_mask = _batch()
    whole_logits = student.clone().requires_grad_()
    whole_terms = _terms(objective, whole_logits, teacher, teacher_own, targets, mask, teacher_mask)
    whole = _loss(whole_terms, _global([mask]))
    (whole_grad,) = torch.autograd.grad(whole, whole_logits)

    halves = (slice(0, 1), slice(1, 4))  # uneven, and the scored tokens even more so
    counts = _global([mask[h] for h in halves])
    split_logits = student.clone().requires_grad_()
    split = sum(_loss(_terms(objective, split_logits, teacher, teacher_own, targets, mask, teacher_mask, h), counts)
                for h in halves)
    (split_grad,) = torch.autograd.grad(split, split_logits)
    torch.testing.assert_close(split, whole, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(split_grad, whole_grad, rtol=1e-5, atol=1e-8)
    # Normalising each half by its own counts (a mean of micro-batch means) would not be the batch's loss.
    own = sum(_loss(_terms(objective, student, teacher, teacher_own, targets, mask, teacher_mask, h),
                    _global([mask[h]])) for h in halves) / 2
    assert abs(own.item() - whole.item()) > 1e-3 * abs(whole.item())


@pytest.mark.parametrize("case", OBJECTIVES, ids=lambda c: "-".join([c[0], *map(str, c[1].values())]))
def test_each_term_s_sum_over_its_count_is_the_batch_mean_the_objective_reports(case):
    objective = _objective(case)
    student, teacher, teacher_own, targets, mask, teacher_mask = _batch(seed=1)
    teacher_logits, own_mask = (teacher_own, teacher_mask) if objective.cross_tokenizer else (teacher, None)
    total, components = objective(student, teacher_logits, targets, mask, own_mask)
    terms = objective.terms(student, teacher_logits, targets, mask, own_mask)
    assert set(terms) == set(components)
    for name, (_, term) in terms.items():
        assert term.unit in (TOKENS, SEQUENCES, NONE)
        torch.testing.assert_close(term.total / term.count.clamp(min=1), components[name])
    assert total.item() == pytest.approx(sum(w * t.mean().item() for w, t in terms.values()), rel=1e-6)


def test_the_sums_are_those_of_the_plain_loss_functions():
    student, teacher, _, targets, mask, _ = _batch(seed=2)
    jsd = build_objective(loss_config("jsd", beta=0.3)).terms(student, teacher, targets, mask)["jsd"][1]
    assert jsd.unit == TOKENS and jsd.count.item() == 10  # 1 + 6 + 3 + 0 scored tokens
    per_token_sum = generalized_jsd(student, teacher, mask, beta=0.3, reduction="sum")
    torch.testing.assert_close(jsd.total, per_token_sum)
    by_sequence = build_objective(loss_config("fkl", reduction="sequence_mean")).terms(student, teacher, targets, mask)
    fkl = by_sequence["fkl"][1]
    assert fkl.unit == SEQUENCES and fkl.count.item() == 3  # the row without a scored token is no sequence
    expected = sum(forward_kl(student[i : i + 1], teacher[i : i + 1], mask[i : i + 1]) for i in range(3))
    torch.testing.assert_close(fkl.total, expected)
    ce = build_objective(loss_config("sft")).terms(student, None, targets, mask)["ce"][1]
    torch.testing.assert_close(ce.mean(), cross_entropy(student, targets, mask))


def test_from_mean_and_unit_counts():
    mask = _lengths_mask([2, 0, 3], 4)
    assert {k: v.item() for k, v in unit_counts(mask).items()} == {TOKENS: 5, SEQUENCES: 2, NONE: 1}
    term = from_mean(torch.tensor(0.5), mask, SEQUENCES)
    assert term == LossSum(term.total, term.count, SEQUENCES) and term.total.item() == 1.0 and term.mean() == 0.5
    assert LossSum(torch.tensor(0.0), torch.tensor(0.0), TOKENS).mean().item() == 0.0  # no units: zero, not NaN
    with pytest.raises(ValueError, match="unknown loss unit"):
        from_mean(torch.tensor(1.0), mask, "words")


def test_the_reinforce_term_splits_like_every_other_term():
    student, _, _, targets, mask, _ = _batch(seed=3)
    advantages = torch.tensor([0.5, -1.0, 2.0, 0.25])
    term = policy_gradient_sum(student, targets, mask, advantages)
    assert term.unit == TOKENS and term.count.item() == 10
    torch.testing.assert_close(term.mean(), policy_gradient_loss(student, targets, mask, advantages))
    logits = student.clone().requires_grad_()
    whole = normalised(policy_gradient_sum(logits, targets, mask, advantages), _global([mask]))
    (whole_grad,) = torch.autograd.grad(whole, logits)
    halves = (slice(0, 1), slice(1, 4))
    counts = _global([mask[h] for h in halves])
    logits = student.clone().requires_grad_()
    split = sum(normalised(policy_gradient_sum(logits[h], targets[h], mask[h], advantages[h]), counts) for h in halves)
    (split_grad,) = torch.autograd.grad(split, logits)
    torch.testing.assert_close(split, whole)
    torch.testing.assert_close(split_grad, whole_grad)


def test_a_batch_splits_into_micro_batches_as_wide_as_collated_alone(tokenizer):
    from kdlab.data.datamodule import Collator, Example, Tokens

    items = [Example(str(i), Tokens([5] * (1 + 3 * i), [6] * (6 - i)), Tokens([7] * (4 - i), [8] * (1 + 2 * i)))
             for i in range(4)]
    collate = Collator(tokenizer.pad_token_id, teacher_pad_token_id=0)
    parts = collate(items).split(2)
    assert len(parts) == 2
    for part, alone in zip(parts, (collate(items[:2]), collate(items[2:]))):
        assert part.reference == alone.reference
        for side in ("student", "teacher"):
            for key in ("prompt_ids", "prompt_mask", "target_ids", "target_mask"):
                assert torch.equal(getattr(getattr(part, side), key), getattr(getattr(alone, side), key)), key


# -- whole runs ---------------------------------------------------------------------------------------------------
# WHOLE_RUN, CASES and TWO_PROCESSES: tests/workers/normalisation_ddp.py (the worker runs the 2-process ones).
SPLITS = {"single": ["task.batch_size=8"], "accumulate": ["task.batch_size=4", "trainer.accumulate_grad_batches=2"]}


def largest_relative_difference(weights, reference) -> float:
    """max over tensors of max |w - r| / max |r|: the measure the issue reports."""
    return max(float((weights[k] - reference[k]).abs().max() / reference[k].abs().max()) for k in reference)


@pytest.fixture(scope="module")
def whole_runs(tmp_path_factory):
    """Every case run three ways: in this process with batch 8 and with batch 4 x 2, and as 2 gloo processes of batch
    4, all DDP cases in one launch of `tests/workers/normalisation_ddp.py` (one start-up for five runs)."""
    import subprocess
    import sys

    from kdlab.run.train import run
    from tests.conftest import REPO, compose

    root = tmp_path_factory.mktemp("normalisation")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                "-m", "tests.workers.normalisation_ddp", str(root)]
    ddp = subprocess.Popen(torchrun, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for case, overrides in CASES.items():
        for split, split_overrides in SPLITS.items():
            run(compose([*WHOLE_RUN, *overrides, *split_overrides], output_dir=root / case / split))
    output, _ = ddp.communicate(timeout=900)
    assert ddp.returncode == 0, output[-3000:]
    return root


def _loss_curve(run_dir) -> list[float]:
    import csv

    with (run_dir / "csv" / "metrics.csv").open() as f:
        return [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_batch_8_accumulation_and_two_processes_end_with_the_same_weights(whole_runs, case):
    from safetensors.torch import load_file

    weights = {split: load_file(str(whole_runs / case / split / "student" / "model.safetensors"))
               for split in (*SPLITS, "ddp")}
    reference = weights["single"]
    for split in ("accumulate", "ddp"):
        assert weights[split].keys() == reference.keys()
        assert largest_relative_difference(weights[split], reference) <= 1e-4, split


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_the_logged_train_loss_is_the_global_batch_loss_however_it_is_split(whole_runs, case):
    curves = {split: _loss_curve(whole_runs / case / split) for split in (*SPLITS, "ddp")}
    reference = curves["single"]
    assert len(reference) == 3 and reference[0] != reference[-1]  # three steps, and the student trained
    for split in ("accumulate", "ddp"):
        assert curves[split] == pytest.approx(reference, rel=1e-5), split


def test_an_accumulation_window_holds_the_examples_of_one_batch_of_its_size(tokenizer):
    from kdlab.data.datamodule import DistillationDataModule
    from kdlab.data.tasks import Task

    def windows(batch_size: int, accumulate: int) -> list[list[str]]:
        task = Task.from_config(task_node("arith", train_size=40, val_size=4, batch_size=batch_size))
        data = DistillationDataModule(task, tokenizer, seed=3, accumulate_grad_batches=accumulate)
        data.setup()
        return [batch.reference for batch in data.train_dataloader()]

    whole, accumulated = windows(8, 1), windows(4, 2)
    assert len(whole) == len(accumulated) == 5 and all(len(w) == 8 for w in accumulated)
    assert accumulated == whole
    with pytest.raises(ValueError, match="accumulate_grad_batches=0"):
        DistillationDataModule(None, tokenizer, accumulate_grad_batches=0)
