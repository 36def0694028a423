"""loss.fused in the training step: the terms from hidden states and output layers equal the logits path's (values,
gradients, weights after SGD steps) for every fused loss (the cross-tokenizer ones, ot and uld, too), reduction,
length grouping and output layer kind, in one process and on 2 processes under DDP and FSDP2; no (rows, positions,
vocabulary) tensor of either model exists in a fused step; what cannot be fused falls back with one log line."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kdlab.run.build import use_fused
from kdlab.step.fused import fused_off_reason, fused_terms
from kdlab.step.policy import STUDENT
from kdlab.step.step import DistillationStep, StepTargets
from tests.conftest import REPO, compose, loss_config
from tests.workers.cases import RUN, SAMPLING, TOKENS, TWO_PROCESS_RUNS, add_output_bias, case_step, twin

DIVERGENCES = ["fkl", "rkl", "jsd", "tvd", "skl", "srkl"]


def _counts(targets: StepTargets) -> dict[str, torch.Tensor]:
    return DistillationStep.global_counts([targets], targets.batch.student.target_ids.device)


def _steps(step: DistillationStep, targets: StepTargets, steps: int) -> tuple[list[torch.Tensor], list[dict], dict]:
    """`steps` SGD steps of the step's loss on `targets`: the losses, each step's gradients, the weights.

    SGD, not Adam: Adam's first steps move each weight by about lr whatever its gradient's size, so float noise in a
    near-zero gradient would show at 1e-3 (tests/teachers/test_teacher_outside_training.py); SGD's update is the
    gradient."""
    optimizer = torch.optim.SGD([p for p in step.student.parameters() if p.requires_grad], lr=0.5)
    losses, gradients = [], []
    for _ in range(steps):
        loss, _ = step.loss(targets, _counts(targets))
        loss.backward()
        gradients.append({n: p.grad.clone() for n, p in step.student.named_parameters() if p.requires_grad})
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return losses, gradients, {k: v.detach().clone() for k, v in step.student.state_dict().items()}


def _relative(ours: dict, reference: dict) -> float:
    """max over tensors of max |a - b| / max |b|."""
    return max(float((ours[k] - reference[k]).abs().max() / reference[k].abs().max().clamp(min=1e-30))
               for k in reference)


def _cross(step: DistillationStep) -> bool:
    """Whether the step's teacher reads its own tokens."""
    return step.teacher is not None and step.teacher.tokenizer is not None


def _own_samples(step: DistillationStep, batch) -> StepTargets:
    """The student's own samples of the batch's prompts (retokenized for a teacher with its own tokenizer)."""
    torch.manual_seed(3)
    targets = step.targets(batch, STUDENT, SAMPLING)
    for side in ("student", "teacher") if _cross(step) else ("student",):
        ours, given = targets.batch.side(side).target_ids, batch.side(side).target_ids
        assert ours.shape != given.shape or not torch.equal(ours, given), side  # sampled, not the ground truth
    return targets


def _compare(step: DistillationStep, batch, steps: int = 2, tolerance: float = 1e-5, later: float = 1e-5,
             onpolicy: bool = False) -> None:
    """Fused and logits-path runs from the same start: the same losses, gradients and weights after each step
    (gradients after the first step and the weights to `later`). `onpolicy`: on the student's own samples, without
    hard labels (no CE term)."""
    fused = twin(step, fused=True)
    assert fused.fused and not step.fused
    start = {k: v.detach().clone() for k, v in step.student.state_dict().items()}
    targets = _own_samples(step, batch) if onpolicy else StepTargets(batch)
    fused_losses, fused_gradients, fused_weights = _steps(fused, targets, steps)
    plain_losses, plain_gradients, plain_weights = _steps(step, targets, steps)
    torch.testing.assert_close(torch.stack(fused_losses), torch.stack(plain_losses), rtol=tolerance, atol=tolerance)
    assert _relative(fused_gradients[0], plain_gradients[0]) <= tolerance
    for ours, reference in zip(fused_gradients[1:], plain_gradients[1:]):
        assert _relative(ours, reference) <= later
    assert _relative(fused_weights, plain_weights) <= later
    assert _relative(plain_weights, start) > 100 * tolerance  # the steps moved the student far beyond it


def _gradients(step: DistillationStep, batch) -> tuple[torch.Tensor, dict]:
    step.student.zero_grad(set_to_none=True)
    targets = StepTargets(batch)
    loss, _ = step.loss(targets, _counts(targets))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in step.student.named_parameters()}


@pytest.mark.parametrize("loss", [*DIVERGENCES, "sft"])
def test_one_and_two_steps_give_the_logits_path_s_losses_and_weights(loss):
    step, batch = case_step(loss)
    assert loss_config(loss)["fused"]  # the config's default
    # TVD's gradient 0.5 sign(q - p) jumps where q = p: after a step, 10 of 408,062 scored (q, p) pairs of this
    # batch lie within 1e-8 of each other, where the two paths' 1e-7 float noise flips a sign (5e-4 of the gradient)
    _compare(step, batch, later=1e-3 if loss == "tvd" else 1e-5)


@pytest.mark.parametrize("loss", ["jsd", "tvd", "sft", "ot", "uld"])
def test_float64_values_and_gradients_equal_the_logits_path_s(loss):
    step, batch = case_step(loss, dtype=torch.float64, ce_weight=0.5) if loss != "sft" else case_step(
        loss, dtype=torch.float64)
    fused_loss, fused = _gradients(twin(step, fused=True), batch)
    plain_loss, plain = _gradients(step, batch)
    assert fused_loss.dtype == torch.float64
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-12, atol=1e-12)
    for name in plain:
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("case", [
    dict(loss="jsd", ce_weight=0.5),
    dict(loss="fkl", reduction="sequence_mean", ce_weight=1.0),
    dict(loss="srkl", reduction="sum"),
    dict(loss="sft", reduction="sequence_mean"),
    dict(loss="jsd", score_groups=4),
    dict(loss="rkl", score_groups=4, ce_weight=0.3, temperature=2.0),
    dict(loss="skl", beta=None, alpha=0.3, temperature=0.5),
])
def test_weights_ce_reductions_temperatures_and_length_groups(case):
    case = {k: v for k, v in case.items() if v is not None}
    step, batch = case_step(**case)
    _compare(step, batch)


@pytest.mark.parametrize("preset,overrides", [
    ("tiny_qwen2", ()),  # untied output layer
    ("tiny_qwen3", ("vocab_size=768",)),  # tied, padded beyond the tokenizer (746 tokens)
    ("tiny_gemma3", ("final_logit_softcapping=3.0",)),  # Gemma 2-style soft-cap, scaled tied embeddings
])
def test_untied_padded_and_soft_capped_output_layers(preset, overrides):
    step, batch = case_step("jsd", preset, overrides, ce_weight=0.5)
    head = step.student.get_output_embeddings()
    tied = head.weight is step.student.get_input_embeddings().weight
    assert tied == (preset != "tiny_qwen2")
    if overrides == ("vocab_size=768",):
        assert head.weight.shape[0] == 768 > TOKENS
        with torch.no_grad():  # large values in the padding rows: any softmax that saw them would change
            for model in (step.student, step.teacher.model):
                model.get_output_embeddings().weight[TOKENS:] = 30.0
    _compare(step, batch)


def test_an_output_bias_is_fused():
    step, batch = case_step("fkl", "tiny_qwen2", ce_weight=0.5)
    add_output_bias(step)
    _compare(step, batch)


# -- cross-tokenizer losses: each model reads its own tokens and keeps its own tokenizer's columns -----------------

CROSS_TOKENIZER_CASES = {
    "ot": dict(loss="ot"),  # the paper's variant, ranked per sequence; with the CE term (ce_weight 1, conf/loss)
    # the authors' code: rows of logits over their std, ranked per batch, padded window, second softmax, 10 iterations
    "ot_released_code": dict(loss="ot", variant="released_code"),
    "uld": dict(loss="uld"),
    "ot_onpolicy": dict(loss="ot", onpolicy=True),
    "ot_released_code_onpolicy": dict(loss="ot", variant="released_code", onpolicy=True),
    "uld_onpolicy": dict(loss="uld", onpolicy=True),
    # every setting reaches the fused loss: top_k, each temperature, Sinkhorn's; length groups
    "ot_settings": dict(loss="ot", top_k=8, temperature=2.0, sl_temperature=0.5, sd_temperature=1.5,
                        sinkhorn_epsilon=0.5, sinkhorn_iterations=5, score_groups=4),
    "uld_temperature": dict(loss="uld", temperature=0.5, score_groups=4),
    "ot_one_tokenizer": dict(loss="ot", cross=False),  # loss=ot with a teacher of the student's tokenizer
}


@pytest.mark.parametrize("case", list(CROSS_TOKENIZER_CASES))
def test_cross_tokenizer_losses_give_the_logits_path_s_losses_gradients_and_weights(case):
    """loss=ot and loss=uld from hidden states: supervised with the CE term on the student's labels, and on the
    student's own samples retokenized for the teacher (no CE term).

    ULD's gradient jumps where two nearly equal probabilities swap ranks in its sort: after the first step the two
    paths' weights differ by float32 noise (1e-7), enough to swap such ranks, so with temperature 0.5 the second
    step's gradients differ by 4e-4 (from the same weights they agree to 4e-7; in float64 to 1e-15). The first step
    is compared to 1e-5."""
    settings = dict(CROSS_TOKENIZER_CASES[case])
    onpolicy = settings.pop("onpolicy", False)
    step, batch = case_step(**settings)
    reason = fused_off_reason(step.objective, step.student, step.teacher)
    assert _cross(step) == (case != "ot_one_tokenizer") and reason is None, reason
    _compare(step, batch, onpolicy=onpolicy, later=1e-3 if settings["loss"] == "uld" else 1e-5)


@pytest.mark.parametrize("case,names", [
    (dict(loss="ot", had_weight=0.0, gamma=0.3, ce_weight=0.5), {"sl": 0.15 * 0.1, "sd": 0.15 * 0.3, "ce": 0.5}),
    (dict(loss="uld", uld_weight=2.0, reduction="sequence_mean"), {"uld": 2.0, "ce": 1.0}),
])
def test_cross_tokenizer_terms_are_the_logits_path_s_loss_sums(case, names):
    """Each term as `Objective.terms` gives it on the logits path: its name, weight, unit, count and sum; a term of
    weight 0 is not computed."""
    step, batch = case_step(**case)
    with torch.no_grad():
        _, fused = fused_terms(twin(step, fused=True), StepTargets(batch), True)
        _, plain, _ = step.terms(StepTargets(batch), True)
    assert fused.keys() == plain.keys() == names.keys()
    for name, (weight, term) in plain.items():
        assert fused[name][0] == pytest.approx(weight) == pytest.approx(names[name])
        assert fused[name][1].unit == term.unit and torch.equal(fused[name][1].count, term.count), name
        torch.testing.assert_close(fused[name][1].total, term.total, rtol=1e-6, atol=1e-6, msg=name)


def test_a_lora_student_is_fused():
    from kdlab.models.lora import add_lora, has_lora

    step, batch = case_step("jsd", "tiny_qwen2", ce_weight=0.5)
    torch.manual_seed(2)
    add_lora(step.student, {"r": 4, "alpha": 8})
    with torch.no_grad():  # B starts at zero: give the adapters an output, so that their A matrices get gradients
        for name, parameter in step.student.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.1)
    assert has_lora(step.student) and not step.student.get_output_embeddings().weight.requires_grad
    _compare(step, batch)


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an operation returns."""

    def __init__(self):
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
        return out


def _logits_shapes(step: DistillationStep, batch) -> set[tuple[int, ...]]:
    """Shapes of (rows, positions, vocabulary) tensors of either model that one micro-batch's forward and backward
    create, vocabulary being any width of the output layers or the tokenizer."""
    targets = StepTargets(batch)
    counts = _counts(targets)
    with _Shapes() as seen:
        loss, _ = step.loss(targets, counts)
        loss.backward()
    widths = {TOKENS, step.student.config.vocab_size, step.teacher.model.config.vocab_size}
    if _cross(step):
        widths.add(len(step.teacher.tokenizer))
    return {s for s in seen.shapes if len(s) == 3 and s[0] == batch.student.target_ids.shape[0] and s[2] in widths}


@pytest.mark.parametrize("case", [dict(loss="jsd", preset="tiny_qwen3", overrides=("vocab_size=768",), ce_weight=0.5),
                                  dict(loss="ot"), dict(loss="uld")], ids=["jsd", "ot", "uld"])
def test_no_logits_tensor_of_either_model_exists_in_a_fused_step(case):
    step, batch = case_step(**case)
    fused = twin(step, fused=True)  # raises with the reason where the fused path cannot run
    unfused = _logits_shapes(step, batch)  # the logits path makes them: the probe sees them
    # the student's logits over its tokens, and with a teacher of its own tokenizer the teacher's over its own
    widths = {len(step.tokenizer), *([len(step.teacher.tokenizer)] if _cross(step) else [])}
    assert {shape[2] for shape in unfused} >= widths, unfused
    assert _logits_shapes(fused, batch) == set()


class _ScaledHead(torch.nn.Linear):
    """An output layer that computes more than weight @ hidden: the fused loss would be wrong for it."""

    def forward(self, hidden):
        return 2.0 * super().forward(hidden)


def _run_choice(caplog, step: DistillationStep, *overrides: str) -> tuple[bool, list[str]]:
    """What a run with these overrides decides for the step's objective and models (`kdlab.run.build.use_fused`, once
    per run), and the `loss.fused:` lines it logs."""
    cfg = compose(list(overrides))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kdlab.run.build"):
        fused = use_fused(cfg, {"objective": step.objective, "student": step.student, "teacher": step.teacher})
    return fused, [r.getMessage() for r in caplog.records if r.name == "kdlab.run.build" and "loss.fused" in
                   r.getMessage()]


def test_a_head_that_is_not_plain_falls_back_with_one_log_line(caplog):
    step, batch = case_step("fkl", "tiny_qwen2")
    old = step.student.get_output_embeddings()
    head = _ScaledHead(old.in_features, old.out_features, bias=False)
    head.weight = old.weight
    step.student.set_output_embeddings(head)
    fused, lines = _run_choice(caplog, step, "loss=fkl")
    assert not fused
    assert len(lines) == 1 and "keep the logits path" in lines[0] and "_ScaledHead" in lines[0], lines
    with pytest.raises(ValueError, match="_ScaledHead"):  # a fused step is refused, with the reason
        twin(step, fused=True)
    targets = StepTargets(batch)
    loss, _ = step.loss(targets, _counts(targets))
    with torch.no_grad():
        by_hand = step.validation_loss(batch)  # the logits path through the scaled head
    torch.testing.assert_close(loss, by_hand)


@pytest.mark.parametrize("case,reason", [
    (dict(loss="fkl", fused=False), "loss.fused=false"),
    (dict(loss="fkl", preset="tiny_t5"), "not a decoder-only model"),
    (dict(loss="fkl", _target_="kdlab.losses.divergences.reverse_kl"), "not kdlab's own loss"),
    (dict(loss="ot", _target_="kdlab.losses.universal_logit_distillation"), "not kdlab's own loss for loss=ot"),
])
def test_what_falls_back_says_why(case, reason, caplog):
    step, _ = case_step(**case)
    overrides = [f"loss.{key}={'false' if value is False else value}" for key, value in case.items()
                 if key not in ("loss", "preset")]
    fused, lines = _run_choice(caplog, step, f"loss={case['loss']}", *overrides)
    assert not fused
    off = fused_off_reason(step.objective, step.student, step.teacher)
    if reason == "loss.fused=false":  # the config alone keeps the logits path: nothing to explain
        assert lines == [] and off is None, (lines, off)
        return
    assert len(lines) == 1 and reason in lines[0], lines
    assert reason in off
    with pytest.raises(ValueError, match=re.escape(reason)):
        twin(step, fused=True)


# -- whole runs: the config's default (loss.fused=true) against loss.fused=false, in one process, DDP and FSDP2 -----

# RUN, TWO_PROCESS_RUNS: tests/workers/cases.py (the worker runs them too)


def _losses(run_dir) -> list[float]:
    import csv

    with (run_dir / "csv" / "metrics.csv").open() as f:
        return [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]


def _weights(run_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "student" / "model.safetensors"))


def _assert_same_runs(ours, reference) -> None:
    """Two steps of the same run: the logged losses to 1e-5, the exported weights to Adam's float-noise floor (its
    first steps move each weight by about lr = 1e-3 whatever the gradient's size, so noise in a near-zero gradient
    shows at 1e-5; tests/teachers/test_teacher_outside_training.py)."""
    assert len(_losses(reference)) == 2
    assert _losses(ours) == pytest.approx(_losses(reference), rel=1e-5)
    theirs = _weights(reference)
    for name, weight in _weights(ours).items():
        torch.testing.assert_close(weight, theirs[name], rtol=0, atol=1e-4, msg=name)


@pytest.mark.slow
def test_a_whole_run_trains_as_with_loss_fused_false(tmp_path, caplog):
    from kdlab.run.train import run

    with caplog.at_level(logging.INFO, logger="kdlab.run.build"):
        run(compose(RUN, output_dir=tmp_path / "fused"))
    assert any("compute loss=jsd and its CE term from hidden states" in r.getMessage() for r in caplog.records)
    run(compose([*RUN, "loss.fused=false"], output_dir=tmp_path / "logits"))
    _assert_same_runs(tmp_path / "fused", tmp_path / "logits")


@pytest.mark.slow
@pytest.mark.parametrize("case", list(TWO_PROCESS_RUNS))
def test_two_processes_train_as_with_loss_fused_false(tmp_path, case):
    import subprocess
    import sys

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                "-m", "tests.workers.fused_step_runs", str(tmp_path), case]
    done = subprocess.run(torchrun, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:]
    started = [line for line in done.stdout.splitlines() if "loss.fused: training steps" in line]
    assert len([line for line in started if "from hidden states" in line]) == 2, started  # fused on both processes
    assert len([line for line in started if "loss.fused=false" in line]) == 0, started  # false: no line
    _assert_same_runs(tmp_path / "fused", tmp_path / "logits")


@pytest.fixture(scope="module")
def fsdp_steps(tmp_path_factory) -> dict:
    """tests/workers/fused_step_fsdp.py's cases: two SGD steps, fused and not, of models sharded as trainer=fsdp shards
    them, on 2 gloo processes (one launch for every case)."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO

    root = tmp_path_factory.mktemp("fused_fsdp")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                "-m", "tests.workers.fused_step_fsdp", str(root)]
    done = subprocess.run(torchrun, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    return json.loads((root / "fsdp.json").read_text())


FSDP_CASES = ["fkl_tied", "fkl_untied", "jsd_tied_ce", "jsd_untied_ce", "rkl_untied_output_bias", "sft_tied",
              "jsd_tied_onpolicy", "jsd_untied_checkpointed", "jsd_tied_bf16", "ot_tied_ce", "uld_untied_onpolicy"]


@pytest.mark.parametrize("case", FSDP_CASES)
def test_fsdp2_sharded_models_are_fused_and_train_as_with_loss_fused_false(fsdp_steps, case):
    """Under FSDP2 the output weight is whole only inside its model's forward, and its gradient must be
    reduce-scattered: each rank scores other rows, so a gradient kept local (or read from the local shard) would
    leave the fused weights apart from the logits path's. bf16 (trainer.strategy.mixed_precision): the logits path
    rounds the logits' gradient and the weight gradient's matmul to bf16, the fused one the weight gradient once, so
    they agree to bf16's precision (2^-8 relative per rounding), not float32's."""
    result = fsdp_steps[case]
    losses, gradients, weights = (1e-3, 5e-2, 5e-3) if case.endswith("bf16") else (1e-5, 1e-5, 1e-5)
    assert result["fused_reason"] is None  # the fused path ran (fused_off_reason: no fallback for FSDP2)
    assert result["tied"] == ("untied" not in case) and result["bias"] == ("bias" in case)
    assert result["sampled"] == ("onpolicy" in case)  # trained on the student's own samples
    assert result["fused_losses"] == pytest.approx(result["plain_losses"], rel=losses)
    assert max(result["gradients"]) <= gradients
    assert result["weights"] <= weights
    assert result["moved"] > 10 * weights  # the steps moved the student far beyond the tolerance


@pytest.mark.parametrize("strategy", ["FSDPStrategy", "ModelParallelStrategy"])
def test_models_sharded_by_another_strategy_keep_the_logits_path(caplog, strategy):
    step, _ = case_step("fkl")
    fused, lines = _run_choice(caplog, step, "loss=fkl", "trainer=fsdp",
                               f"trainer.strategy._target_=lightning.pytorch.strategies.{strategy}")
    assert not fused
    assert len(lines) == 1 and "sharded by a strategy other than trainer=fsdp" in lines[0], lines
    fused, lines = _run_choice(caplog, step, "loss=fkl", "trainer=fsdp")  # FSDP2's units: fused
    assert fused and len(lines) == 1 and "from hidden states" in lines[0], lines
