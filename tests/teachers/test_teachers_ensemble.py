"""Several teachers: the per-token mixture and the per-example route against naive references, each member's loss
logged, and what several teachers cannot do refused before anything loads."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from kdlab.losses import generalized_jsd
from kdlab.losses.sparse import TopK, sparse_generalized_jsd, top_k_of_logits
from kdlab.run.compose import compose as compose_conf
from kdlab.run.train import run
from kdlab.run.validate import ConfigError
from kdlab.teachers.cache import cache_teacher
from kdlab.teachers.mixture import mix_top_k
from tests.conftest import TINY_RUN, compose

V = 50


def _naive_mixture(logits: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """log(sum_i w_i softmax(z_i)) token by token, in float64."""
    total = sum(w * torch.softmax(z.double(), dim=-1) for z, w in zip(logits, weights))
    return total.log()


def _top(logits: torch.Tensor, k: int) -> TopK:
    values, ids, tail = top_k_of_logits(logits.double(), k)
    return TopK(values, ids, tail, torch.ones(logits.shape[:-1], dtype=torch.bool))


def test_the_mixture_of_whole_vocabulary_top_ks_is_the_dense_mixture():
    g = torch.Generator().manual_seed(0)
    a, b, student = (torch.randn(2, 5, V, generator=g, dtype=torch.float64) * 3 for _ in range(3))
    mixed = mix_top_k([_top(a, V), _top(b, V)], [0.7, 0.3], V)
    reference = _naive_mixture([a, b], [0.7, 0.3])
    dense = generalized_jsd(student, reference, beta=0.9)
    sparse = sparse_generalized_jsd(student, mixed.logprobs.double(), mixed.ids, mixed.tail.double(), beta=0.9)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-7)


def test_a_mixture_of_top_ks_puts_each_members_mass_on_the_union_of_their_ids():
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randn(3, 4, V, generator=g, dtype=torch.float64) * 3 for _ in range(2))
    ta, tb = _top(a, 6), _top(b, 4)
    mixed = mix_top_k([ta, tb], [0.25, 0.75], V)
    assert mixed.ids.shape[-1] == 10
    for row in range(3):
        for pos in range(4):
            ids = mixed.ids[row, pos].tolist()
            probs = mixed.logprobs[row, pos].double().exp().tolist()
            seen = set()
            for token, prob in zip(ids, probs):  # an id comes back only as an empty slot (the sparse losses' rule)
                assert token not in seen or prob == 0.0
                seen.add(token)
            expected = {}
            for top, w in ((ta, 0.25), (tb, 0.75)):
                for token, lp in zip(top.ids[row, pos].tolist(), top.logprobs[row, pos].exp().tolist()):
                    expected[token] = expected.get(token, 0.0) + w * lp
            got = {t: p for t, p in zip(ids, probs) if p > 0}
            assert got.keys() == expected.keys()
            # the mixture is computed in float64 and its log stored in float32: exp of log p rounded to float32 is
            # p to a relative 2^-24 |log p| (one rounding); the bound is twice that. rel=1e-6 sat within 4x of the
            # error seen (2.4e-7), and small probabilities (|log p| > 17) would pass 1e-6 on their rounding alone
            for token in got:
                assert abs(got[token] / expected[token] - 1) <= 2**-23 * abs(math.log(expected[token]))
            tail = (0.25 * ta.tail[row, pos].exp() + 0.75 * tb.tail[row, pos].exp()).item()
            assert abs(mixed.tail[row, pos].double().exp().item() / tail - 1) <= 2**-23 * abs(math.log(tail))
            assert sum(got.values()) + tail == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd", "tvd", "skl", "srkl"])
def test_a_repeated_id_with_nothing_on_it_is_an_empty_bucket(name):
    """The mixture fills unused slots by repeating a row's first id at probability 0: the loss is the loss without
    those slots (no double-counted student mass, no infinite reverse KL)."""
    from kdlab.losses import sparse

    fn = {"fkl": sparse.sparse_forward_kl, "rkl": sparse.sparse_reverse_kl, "jsd": sparse.sparse_generalized_jsd,
          "tvd": sparse.sparse_total_variation, "skl": sparse.sparse_skew_forward_kl,
          "srkl": sparse.sparse_skew_reverse_kl}[name]
    g = torch.Generator().manual_seed(3)
    student, teacher = (torch.randn(2, 3, V, generator=g, dtype=torch.float64) for _ in range(2))
    top = _top(teacher, 6)
    padded_ids = torch.cat([top.ids, top.ids[..., :1].expand(-1, -1, 3)], dim=-1)
    padded_logprobs = torch.cat([top.logprobs, torch.full((2, 3, 3), -torch.inf, dtype=torch.float64)], dim=-1)
    student = student.requires_grad_()
    plain = fn(student, top.logprobs, top.ids, top.tail)
    (plain_grad,) = torch.autograd.grad(plain, student)
    padded = fn(student, padded_logprobs, padded_ids, top.tail)
    (padded_grad,) = torch.autograd.grad(padded, student)
    torch.testing.assert_close(padded, plain)
    torch.testing.assert_close(padded_grad, plain_grad)


# -- runs -----------------------------------------------------------------------------------------------------------
# no teacher= here: a model preset given on the command line would be merged into teacher=arith_pair's node
RUN = [*(o for o in TINY_RUN if not o.startswith("teacher=")), "student=arith_student", "loss=fkl", "policy=supervised",
       "eval.teacher=false", "eval.before=false", "task.train_size=24", "task.eval_examples=4", "trainer.max_steps=1"]


def _metrics(run_dir: Path) -> dict[str, float]:
    with (run_dir / "csv" / "metrics.csv").open() as f:
        row = next(r for r in csv.DictReader(f) if r.get("train/loss"))
    return {k: float(v) for k, v in row.items() if v and k.startswith("train/")}


def _run_pair(run_dir: Path, *overrides: str, peer: dict | None = None) -> dict[str, float]:
    cfg = compose([*RUN, "teacher=arith_pair", *overrides], output_dir=run_dir)
    if peer is not None:
        with open_dict(cfg):
            cfg.teacher.members.peer = peer
    run(cfg)
    return _metrics(run_dir)


def test_a_mixture_of_the_same_teacher_twice_is_that_teacher_and_each_members_loss_is_logged(tmp_path):
    single = compose([*RUN, "teacher=arith_teacher"], output_dir=tmp_path / "single")
    run(single)
    mixed = _run_pair(tmp_path / "pair", peer=dict(single.teacher))
    expected = _metrics(tmp_path / "single")["train/loss"]
    assert mixed["train/loss"] == pytest.approx(expected, rel=1e-5)
    assert mixed["train/teacher/teacher"] == pytest.approx(expected, rel=1e-5)
    assert mixed["train/teacher/peer"] == pytest.approx(expected, rel=1e-5)


def test_a_cached_member_beside_a_live_one_mixes_on_the_union_of_ids(tmp_path):
    cache = tmp_path / "cache"
    cache_teacher(compose_conf([*RUN, "teacher=arith_teacher", f"cache.dir={cache}", "cache.top_k=746",
                                "cache.dtype=float32"], config_name="cache_teacher"))
    run(compose([*RUN, "teacher=arith_teacher"], output_dir=tmp_path / "single"))
    mixed = _run_pair(tmp_path / "pair", "teacher.top_k=746", peer={"kind": "cached", "dir": str(cache),
                                                                      "name": "cached", "top_k": None})
    assert mixed["train/loss"] == pytest.approx(_metrics(tmp_path / "single")["train/loss"], rel=1e-5)


def test_routing_every_example_to_one_member_is_that_teacher_alone(tmp_path):
    run(compose([*RUN, "teacher=arith_teacher"], output_dir=tmp_path / "single"))
    metrics = _run_pair(tmp_path / "pair", "teacher.combine=route", "teacher.route_field=steps",
                        'teacher.routes={2: teacher, 3: teacher, 4: teacher}')
    expected = _metrics(tmp_path / "single")["train/loss"]
    assert metrics["train/loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["train/teacher/teacher"] == pytest.approx(expected, rel=1e-5)
    assert metrics["train/teacher/peer"] == 0.0


def test_routed_members_losses_add_up_to_the_loss(tmp_path):
    tiny = dict(compose(["teacher=tiny"]).teacher)  # the pair's peer is the student itself: a divergence of 0
    metrics = _run_pair(tmp_path, "teacher.combine=route", "teacher.route_field=steps",
                        'teacher.routes={2: peer, 3: teacher, 4: peer}', "task.batch_size=8", peer=tiny)
    assert metrics["train/teacher/peer"] > 0 and metrics["train/teacher/teacher"] > 0
    total = metrics["train/teacher/peer"] + metrics["train/teacher/teacher"]
    assert total == pytest.approx(metrics["train/loss"], rel=1e-5)  # each row is taught by one member


@pytest.mark.parametrize("overrides,message", [
    (["loss=ot"], "a teacher with another tokenizer is distilled alone with loss=ot or loss=uld"),
    (["teacher.combine=route"], "needs teacher.route_field"),
    (["policy=seqkd"], "samples its targets from one teacher"),
    (["~teacher.weights.peer"], "teacher.weights.peer is missing"),
])
def test_what_several_teachers_cannot_do_is_refused_before_anything_loads(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        run(compose([*RUN, "teacher=arith_pair", *overrides], output_dir=tmp_path))


def test_one_teacher_beside_several_is_refused(tmp_path):
    cfg = compose([*RUN, "teacher=arith_pair", "teacher=arith_teacher"], output_dir=tmp_path)
    with pytest.raises(ConfigError, match="are both set"):
        run(cfg)


def test_a_member_with_another_tokenizer_is_refused_naming_the_cross_tokenizer_losses(tmp_path):
    cfg = compose([*RUN, "teacher=arith_pair"], output_dir=tmp_path)
    unigram = compose(["teacher=arith_unigram_teacher"]).teacher
    with open_dict(cfg):
        cfg.teacher.members.peer = unigram
    with pytest.raises(ConfigError, match=r"teacher.members.peer .* tokenizes differently.*loss=ot.*loss=uld"):
        run(cfg)
