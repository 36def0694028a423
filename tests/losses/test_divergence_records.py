"""A divergence is one record (kdlab.losses.divergences.Divergence): a new one, defined and registered here and in a
YAML written here, touching no kdlab file, gets its dense, top-k and fused forms, its config validation and the
training step's fused path, each equal to a float64 reference or to its dense form on the same logits."""

from __future__ import annotations

import inspect
from functools import partial

import pytest
import torch

from kdlab.losses import DIVERGENCES, Divergence, Setting, forward_kl, register_divergence, reverse_kl, sparse
from kdlab.losses.fused import OutputLayer, fused_divergence, loss_and_grad_of
from kdlab.losses.rowwise import kl
from kdlab.losses.sparse import TopK, sparse_form, top_k_form, top_k_of_logits

# ---------------------------------------------------------------- two new divergences, written as a user would


def _mixed_kl(log_q: torch.Tensor, log_p: torch.Tensor, *, gamma: float) -> torch.Tensor:
    return gamma * kl(log_p, log_q) + (1.0 - gamma) * kl(log_q, log_p)


def _mixed_kl_and_grad(log_q: torch.Tensor, log_p: torch.Tensor, *, gamma: float):
    # gamma (q - p) + (1 - gamma) q (log q - log p - KL(Q||P)): the two KLs' gradients through the softmax
    q, p = log_q.exp(), log_p.exp()
    forward = (log_p - log_q).masked_fill(p == 0, 0.0).mul(p).sum(-1)
    diff = (log_q - log_p).masked_fill(q == 0, 0.0)
    reverse = (q * diff).sum(-1)
    grad = gamma * (q - p) + (1.0 - gamma) * q * (diff - reverse[:, None])
    return gamma * forward + (1.0 - gamma) * reverse, grad


# gamma KL(P||Q) + (1 - gamma) KL(Q||P): a setting with a range, a closed-form gradient, and endpoints that are fkl/rkl
MIXED_KL = Divergence(
    name="mkl",
    function="mixed_kl",
    doc="gamma KL(P || Q) + (1-gamma) KL(Q || P) per scored token (a test's divergence).",
    row=_mixed_kl,
    row_and_grad=_mixed_kl_and_grad,
    settings=(Setting("gamma", 0.5),),
    same_as=lambda s: {1.0: "fkl", 0.0: "rkl"}.get(s["gamma"]),
)
# squared Hellinger distance 1 - sum_v sqrt(p_v q_v): no settings and no closed form (every gradient is autograd's)
HELLINGER = Divergence(
    name="hellinger",
    function="hellinger",
    doc="H^2(P, Q) = 1 - sum_v sqrt(p_v q_v) per scored token (a test's divergence).",
    row=lambda log_q, log_p: 1.0 - (0.5 * (log_q + log_p)).exp().sum(-1),
)
NEW = {"mkl": (MIXED_KL, {"gamma": 0.3}), "hellinger": (HELLINGER, {})}
# what a conf/loss/<name>.yaml names by `_target_`
mixed_kl = MIXED_KL.dense
hellinger = HELLINGER.dense


@pytest.fixture
def registered():
    for record, _ in NEW.values():
        register_divergence(record)
    try:
        yield
    finally:
        for name in NEW:
            DIVERGENCES.pop(name, None)


def _reference(name: str, s: torch.Tensor, t: torch.Tensor, temperature: float = 1.0, **settings) -> torch.Tensor:
    """Per token, from float64 probabilities (not log-probabilities): the formula written out."""
    q = torch.softmax(s.double() / temperature, -1)
    p = torch.softmax(t.double() / temperature, -1)
    if name == "mkl":
        gamma = settings["gamma"]
        return gamma * (p * (p / q).log()).sum(-1) + (1 - gamma) * (q * (q / p).log()).sum(-1)
    return 1.0 - (p * q).sqrt().sum(-1)


def _token_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (per_token * mask).sum() / mask.sum()


def _logits(vocab: int = 9, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(3, 5, vocab, generator=g, dtype=dtype) * 2
    t = torch.randn(3, 5, vocab, generator=g, dtype=dtype) * 2
    mask = torch.rand(3, 5, generator=g) < 0.7
    mask[0, 0] = True
    return s, t, mask


def _value_and_grad(fn, s, t, mask, teacher_grad=False, **kw):
    x = s.clone().requires_grad_()
    value = fn(x, t.clone().requires_grad_(teacher_grad), mask, **kw)
    value.backward()
    return value.detach(), x.grad


# ---------------------------------------------------------------- the dense form


@pytest.mark.parametrize("name", list(NEW))
def test_dense_form_equals_the_formula_in_float64(name):
    record, settings = NEW[name]
    s, t, mask = _logits(seed=1)
    value, grad = _value_and_grad(record.dense, s, t, mask, temperature=1.3, chunk_size=4, **settings)
    x = s.clone().requires_grad_()
    ref = _token_mean(_reference(name, x, t, 1.3, **settings), mask)
    (ref_grad,) = torch.autograd.grad(ref, x)
    assert value.dtype == torch.float64
    torch.testing.assert_close(value, ref.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
    # the record is callable as its dense form (no gradient here: each chunk reduced by autograd's formula)
    torch.testing.assert_close(record(s, t, mask, temperature=1.3, **settings), value, rtol=0, atol=1e-12)


def test_dense_form_takes_the_closed_form_gradient_and_keeps_nothing_for_backward():
    s, t, mask = _logits(seed=2)
    saved = []
    x = s.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda v: saved.append(v) or v, lambda v: v):
        value = mixed_kl(x, t, mask, gamma=0.3, chunk_size=4)
    assert saved == []  # the fused path: the record's closed-form gradient, computed in forward
    value.backward()
    # against autograd through the row formula: a teacher that needs a gradient takes the checkpointed path
    ref_value, ref_grad = _value_and_grad(mixed_kl, s, t, mask, teacher_grad=True, gamma=0.3, chunk_size=4)
    torch.testing.assert_close(value.detach(), ref_value, rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad, ref_grad, rtol=0, atol=1e-12)


def test_signature_settings_checks_and_edge_cases():
    assert str(inspect.signature(mixed_kl)) == (
        "(student_logits: 'Tensor', teacher_logits: 'Tensor', mask: 'Tensor | None' = None, *, gamma: 'float' = 0.5, "
        "temperature: 'float' = 1.0, reduction: 'str' = 'token_mean', chunk_size: 'int' = 1024) -> 'Tensor'")
    assert mixed_kl.__name__ == "mixed_kl" and mixed_kl.__doc__ == MIXED_KL.doc
    s, t, mask = _logits(seed=3)
    with pytest.raises(ValueError, match=r"gamma must be in the range \[0, 1\], got 1.5"):
        mixed_kl(s, t, mask, gamma=1.5)
    with pytest.raises(TypeError, match="mixed_kl.* unexpected keyword argument 'beta'"):
        mixed_kl(s, t, mask, beta=0.5)
    with pytest.raises(TypeError, match="hellinger.* unexpected keyword argument 'gamma'"):
        hellinger(s, t, mask, gamma=0.5)
    # the endpoints the record names are those divergences exactly, value and gradient (needs them registered)
    for gamma, other in ((1.0, forward_kl), (0.0, reverse_kl)):
        ours, ours_grad = _value_and_grad(mixed_kl, s, t, mask, gamma=gamma)
        theirs, theirs_grad = _value_and_grad(other, s, t, mask)
        assert torch.equal(ours, theirs) and torch.equal(ours_grad, theirs_grad)
    # inside the range the formula itself: near gamma = 1 it approaches forward KL
    near = mixed_kl(s, t, mask, gamma=1 - 1e-9)
    torch.testing.assert_close(near, forward_kl(s, t, mask), rtol=1e-7, atol=0)


def test_register_refuses_a_taken_name():
    taken = Divergence(name="fkl", function="another_forward_kl", doc="", row=lambda lq, lp: kl(lp, lq))
    with pytest.raises(ValueError, match="'fkl' is already registered"):
        register_divergence(taken)
    assert DIVERGENCES["fkl"].dense is forward_kl


# ---------------------------------------------------------------- the top-k form


@pytest.mark.parametrize("name", list(NEW))
def test_top_k_form_at_the_whole_vocabulary_is_the_dense_form(registered, name):
    record, settings = NEW[name]
    s, t, mask = _logits(vocab=7, seed=4)
    form = getattr(sparse, f"sparse_{record.function}")  # by name, like sparse_forward_kl, once registered
    assert form is top_k_form(record) is record.top_k
    logprobs, ids, tail = top_k_of_logits(t, 7)
    value, grad = _value_and_grad(lambda x, _, m, **kw: form(x, logprobs, ids, tail, m, **kw), s, t, mask,
                                  **settings)
    dense, dense_grad = _value_and_grad(record.dense, s, t, mask, **settings)
    torch.testing.assert_close(value, dense, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, dense_grad, rtol=0, atol=1e-12)
    # a config's partial finds the same form, settings bound
    bound = sparse_form(partial(record.dense, temperature=1.0, **settings))
    assert torch.equal(bound(s, logprobs, ids, tail, mask), value)
    # fewer buckets lose information: at most the dense divergence (both are f-divergences)
    logprobs, ids, tail = top_k_of_logits(t, 3)
    coarse = form(s, logprobs, ids, tail, mask, **settings)
    assert 0 < coarse.item() < dense.item()


def test_top_k_form_of_an_unregistered_loss_names_the_registered_ones(registered):
    with pytest.raises(ValueError, match=r"loss=fkl\|rkl\|jsd\|tvd\|skl\|srkl\|mkl\|hellinger"):
        sparse_form(partial(lambda s, t, m: s.sum(), temperature=1.0))


# ---------------------------------------------------------------- the fused form


def _layers(softcap: float | None):
    g = torch.Generator().manual_seed(5)
    ws = torch.randn(10, 6, generator=g, dtype=torch.float64).requires_grad_()
    bs = torch.randn(10, generator=g, dtype=torch.float64).requires_grad_()
    wt = torch.randn(12, 8, generator=g, dtype=torch.float64)
    return OutputLayer(ws, bs, softcap, 9), OutputLayer(wt, None, None, 9)


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("name", list(NEW))
def test_fused_form_equals_the_dense_form_on_the_layers_logits(registered, name, softcap):
    record, settings = NEW[name]
    student, teacher = _layers(softcap)
    g = torch.Generator().manual_seed(6)
    hs = torch.randn(3, 5, 6, generator=g, dtype=torch.float64).requires_grad_()
    ht = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 5, generator=g) < 0.7
    inputs = [hs, student.weight, student.bias]
    ref = record.dense(student.logits(hs), teacher.logits(ht), mask, temperature=0.8, **settings)
    ref_grads = torch.autograd.grad(ref, inputs)
    # by name (what the step passes for a config's loss) and by record
    for loss in (name, record):
        ours = fused_divergence(loss, hs, student, ht, teacher, mask, temperature=0.8, chunk_size=4, **settings)
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)
        for a, b in zip(torch.autograd.grad(ours, inputs), ref_grads):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_fused_loss_and_grad_is_the_closed_form_or_autograd_on_the_chunk(registered):
    s, t, _ = _logits(seed=7)
    log_q, log_p = torch.log_softmax(s.reshape(-1, 9), -1), torch.log_softmax(t.reshape(-1, 9), -1)
    for name, (record, settings) in NEW.items():
        loss, grad = loss_and_grad_of(name, **settings)(log_q.clone(), log_p)
        z = s.reshape(-1, 9).clone().requires_grad_()
        ref = record.row(torch.log_softmax(z, -1), log_p, **settings)
        (ref_grad,) = torch.autograd.grad(ref.sum(), z)
        torch.testing.assert_close(loss, ref.detach(), rtol=0, atol=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)
    with pytest.raises(TypeError, match="unexpected keyword argument 'gamma'"):
        loss_and_grad_of("hellinger", gamma=0.3)


# ---------------------------------------------------------------- a YAML, the config checks and the training step


def _loss_yaml(tmp_path, name: str, function: str, **settings) -> str:
    """conf/loss/<name>.yaml as a user would add it, in a config folder of its own on Hydra's search path."""
    folder = tmp_path / "conf" / "loss"
    folder.mkdir(parents=True)
    lines = ["defaults:", "  - _divergence", "  - _self_", f"_target_: {__name__}.{function}", f"name: {name}",
             *(f"{key}: {value}" for key, value in settings.items())]
    (folder / f"{name}.yaml").write_text("\n".join(lines) + "\n")
    return f"hydra.searchpath=[file://{tmp_path / 'conf'}]"


def test_a_yaml_of_its_own_composes_validates_and_trains_through_every_form(registered, tmp_path):
    from kdlab.losses.objective import build_objective
    from kdlab.run.validate import config_errors
    from tests.conftest import compose

    search = _loss_yaml(tmp_path, "mkl", "mixed_kl", gamma=0.3)
    cfg = compose(["loss=mkl", search])
    assert cfg.loss.gamma == 0.3 and cfg.loss.chunk_size == 1024  # _divergence's keys come with it
    assert config_errors(cfg) == []
    # the setting's range is checked at start-up, with the fix
    errors = config_errors(compose(["loss=mkl", "loss.gamma=1.5", search]))
    assert "loss.gamma=1.5 is outside [0, 1]; e.g. loss.gamma=0.5" in errors
    objective = build_objective(cfg.loss)
    s, t, mask = _logits(seed=8, dtype=torch.float32)
    logits_term = objective.divergence_term(s, t, mask)
    torch.testing.assert_close(logits_term.mean(), mixed_kl(s, t, mask, gamma=0.3), rtol=1e-6, atol=1e-7)
    # a cached or remote teacher: its top-k form, here over the whole vocabulary
    top_k = TopK(*top_k_of_logits(t, 9), mask)
    torch.testing.assert_close(objective.divergence_term(s, top_k, mask).mean(), logits_term.mean(),
                               rtol=1e-6, atol=1e-6)


def test_the_training_step_fuses_a_new_divergence_as_the_logits_path(registered, tmp_path, tokenizer):
    from omegaconf import OmegaConf

    from kdlab.data.datamodule import DistillationDataModule
    from kdlab.data.tasks import Task
    from kdlab.run.compose import task_node
    from kdlab.step.fused import fused_off_reason
    from kdlab.step.step import DistillationStep, StepTargets
    from tests.builders import distillation_step
    from tests.conftest import compose, tiny_model

    cfg = compose(["loss=mkl", _loss_yaml(tmp_path, "mkl", "mixed_kl", gamma=0.3), "loss.ce_weight=0.5"])
    student, teacher = tiny_model(tokenizer, seed=0).double(), tiny_model(tokenizer, seed=1, width=48).double()
    teacher.requires_grad_(False)
    task = Task.from_config(task_node(name="arith", train_size=8, val_size=4, eval_examples=4, batch_size=4))
    datamodule = DistillationDataModule(task, tokenizer)
    datamodule.setup("fit")
    targets = StepTargets(next(iter(datamodule.train_dataloader())))
    counts = DistillationStep.global_counts([targets], torch.device("cpu"))
    results = []
    for fused in (True, False):
        step = distillation_step(student, tokenizer, OmegaConf.to_container(cfg.loss, resolve=True), teacher,
                                 fused=fused)
        assert step.fused is fused
        assert fused_off_reason(step.objective, student, step.teacher) is None  # kdlab's own loss for loss=mkl
        student.zero_grad(set_to_none=True)
        loss, values = step.loss(targets, counts)
        loss.backward()
        results.append((loss.detach(), values["mkl"], {n: p.grad.clone() for n, p in student.named_parameters()}))
    (fused_loss, fused_term, fused_grads), (plain_loss, plain_term, plain_grads) = results
    assert plain_term > 0 and fused_loss > fused_term  # the CE term is in the total
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused_term, plain_term, rtol=1e-12, atol=1e-12)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_report_labels_name_a_setting_of_each_built_in_divergence():
    # kdlab.run.resolvers stays free of torch, so its table of label settings is checked against the records here
    from kdlab.run.resolvers import LABEL_PARAMS

    for name, setting in LABEL_PARAMS.items():
        assert setting in {s.name for s in DIVERGENCES[name].settings}, name
    assert {name for name, d in DIVERGENCES.items() if d.settings} == set(LABEL_PARAMS)
