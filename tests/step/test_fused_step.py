"""loss.fused in the training step: the terms from hidden states and output layers equal the logits path's (values,
gradients, weights after SGD steps) for every fused loss (the cross-tokenizer ones, ot and uld, too), reduction,
length grouping and output layer kind, in one process and on 2 processes under DDP and FSDP2; no (rows, positions,
vocabulary) tensor of either model exists in a fused step; what cannot be fused falls back with one log line."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kdlab.data.datamodule import DistillationDataModule
from kdlab.data.tasks import Task
from kdlab.losses.objective import CROSS_TOKENIZER_LOSSES, build_objective
from kdlab.models.loading import load_model, load_tokenizer
from kdlab.run.compose import task_node
from kdlab.sampling.base import SamplingSettings
from kdlab.step.fused import fused_terms
from kdlab.step.module import DistillationModule, StepTargets
from kdlab.step.policy import STUDENT, DataPolicy
from tests.conftest import REPO, compose, loss_config

TASK = {"name": "arith", "train_size": 16, "val_size": 4, "eval_examples": 4, "batch_size": 8, "eval_batch_size": 4,
        "generation": {"max_new_tokens": 4, "do_sample": False}}
TOKENS = 746  # the arith tokenizer
UNIGRAM = REPO / "src/kdlab/assets/arith/unigram_tokenizer"  # 389 tokens: a teacher with its own tokenizer
DIVERGENCES = ["fkl", "rkl", "jsd", "tvd", "skl", "srkl"]


def _model(role: str, preset: str, seed: int, *overrides: str, tokenizer=None):
    own = [f"{role}.tokenizer={tokenizer}"] if tokenizer is not None else []
    cfg = compose([f"{role}={preset}", *own, *(f"+{role}.config.{o}" for o in overrides)])[role]
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(seed)
    return load_model(cfg, tokenizer), tokenizer


def _module(loss: str = "fkl", preset: str = "tiny", overrides: tuple[str, ...] = (), dtype=torch.float32,
            score_groups: int = 1, cross: bool | None = None, **loss_overrides) -> tuple[DistillationModule, object]:
    """A module with a tiny student and teacher of `preset` and a batch of 8 ground-truth rows of mixed lengths; with
    `cross` (default: for loss=ot|uld) the teacher has its own tokenizer (Unigram, 389 tokens), the batch its own
    tokens."""
    student, tokenizer = _model("student", preset, 0, *overrides)
    cross = loss in CROSS_TOKENIZER_LOSSES if cross is None else cross
    teacher, teacher_tokenizer = (None, None) if loss == "sft" else _model(
        "teacher", preset, 1, *overrides, tokenizer=UNIGRAM if cross else None)
    task = Task.from_config(task_node(**TASK))
    module = DistillationModule(student=student.to(dtype), tokenizer=tokenizer,
                                objective=build_objective(loss_config(loss, **loss_overrides)),
                                policy=DataPolicy(0.0, sampling=SamplingSettings(max_new_tokens=4, do_sample=True)), task=task,
                                teacher=None if teacher is None else teacher.to(dtype),
                                teacher_tokenizer=teacher_tokenizer if cross else None,
                                optimizer=lambda params: torch.optim.Adam(params, lr=1e-3),
                                max_nonfinite_steps=10, score_groups=score_groups)
    datamodule = DistillationDataModule(task, tokenizer, teacher_tokenizer=teacher_tokenizer if cross else None)
    datamodule.setup("fit")
    return module, next(iter(datamodule.train_dataloader()))


def _steps(module: DistillationModule, targets: StepTargets, fused: bool, steps: int,
           hard_labels: bool = True) -> tuple[list[torch.Tensor], list[dict], dict]:
    """`steps` SGD steps of the module's micro-loss on `targets`: the losses, each step's gradients, the weights.

    SGD, not Adam: Adam's first steps move each weight by about lr whatever its gradient's size, so float noise in a
    near-zero gradient would show at 1e-3 (tests/teachers/test_teacher_outside_training.py); SGD's update is the gradient."""
    module._fused_reason = "" if fused else "off"
    assert module._fused is fused
    optimizer = torch.optim.SGD([p for p in module.student.parameters() if p.requires_grad], lr=0.5)
    losses, gradients = [], []
    for _ in range(steps):
        loss, _ = module._micro_loss(targets, hard_labels, module._global_counts([targets]))
        loss.backward()
        gradients.append({n: p.grad.clone() for n, p in module.student.named_parameters() if p.requires_grad})
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return losses, gradients, {k: v.detach().clone() for k, v in module.student.state_dict().items()}


def _relative(ours: dict, reference: dict) -> float:
    """max over tensors of max |a - b| / max |b|."""
    return max(float((ours[k] - reference[k]).abs().max() / reference[k].abs().max().clamp(min=1e-30))
               for k in reference)


def _own_samples(module, batch) -> StepTargets:
    """The student's own samples of the batch's prompts (retokenized for a teacher with its own tokenizer)."""
    torch.manual_seed(3)
    targets = module._step_targets(batch, STUDENT)
    for side in ("student", "teacher") if module.cross_tokenizer else ("student",):
        ours, given = targets.batch.side(side).target_ids, batch.side(side).target_ids
        assert ours.shape != given.shape or not torch.equal(ours, given), side  # sampled, not the ground truth
    return targets


def _compare(module, batch, steps: int = 2, tolerance: float = 1e-5, later: float = 1e-5,
             onpolicy: bool = False) -> None:
    """Fused and logits-path runs from the same start: the same losses, gradients and weights after each step
    (gradients after the first step and the weights to `later`). `onpolicy`: on the student's own samples, without
    hard labels (no CE term)."""
    twin = copy.deepcopy(module)
    start = {k: v.detach().clone() for k, v in module.student.state_dict().items()}
    targets = _own_samples(module, batch) if onpolicy else StepTargets(batch)
    fused_losses, fused_gradients, fused_weights = _steps(module, targets, True, steps, not onpolicy)
    plain_losses, plain_gradients, plain_weights = _steps(twin, targets, False, steps, not onpolicy)
    torch.testing.assert_close(torch.stack(fused_losses), torch.stack(plain_losses), rtol=tolerance, atol=tolerance)
    assert _relative(fused_gradients[0], plain_gradients[0]) <= tolerance
    for ours, reference in zip(fused_gradients[1:], plain_gradients[1:]):
        assert _relative(ours, reference) <= later
    assert _relative(fused_weights, plain_weights) <= later
    assert _relative(plain_weights, start) > 100 * tolerance  # the steps moved the student far beyond it


def _gradients(module, batch, fused: bool) -> tuple[torch.Tensor, dict]:
    module._fused_reason = "" if fused else "off"
    assert module._fused is fused, module._fused_reason
    module.student.zero_grad(set_to_none=True)
    targets = StepTargets(batch)
    loss, _ = module._micro_loss(targets, True, module._global_counts([targets]))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.student.named_parameters()}


@pytest.mark.parametrize("loss", [*DIVERGENCES, "sft"])
def test_one_and_two_steps_give_the_logits_path_s_losses_and_weights(loss):
    module, batch = _module(loss)
    assert module.objective.fused
    # TVD's gradient 0.5 sign(q - p) jumps where q = p: after a step, 10 of 408,062 scored (q, p) pairs of this
    # batch lie within 1e-8 of each other, where the two paths' 1e-7 float noise flips a sign (5e-4 of the gradient)
    _compare(module, batch, later=1e-3 if loss == "tvd" else 1e-5)


@pytest.mark.parametrize("loss", ["jsd", "tvd", "sft", "ot", "uld"])
def test_float64_values_and_gradients_equal_the_logits_path_s(loss):
    module, batch = _module(loss, dtype=torch.float64, ce_weight=0.5) if loss != "sft" else _module(
        loss, dtype=torch.float64)
    fused_loss, fused = _gradients(module, batch, True)
    plain_loss, plain = _gradients(module, batch, False)
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
    module, batch = _module(**case)
    _compare(module, batch)


@pytest.mark.parametrize("preset,overrides", [
    ("tiny_qwen2", ()),  # untied output layer
    ("tiny_qwen3", ("vocab_size=768",)),  # tied, padded beyond the tokenizer (746 tokens)
    ("tiny_gemma3", ("final_logit_softcapping=3.0",)),  # Gemma 2-style soft-cap, scaled tied embeddings
])
def test_untied_padded_and_soft_capped_output_layers(preset, overrides):
    module, batch = _module("jsd", preset, overrides, ce_weight=0.5)
    head = module.student.get_output_embeddings()
    tied = head.weight is module.student.get_input_embeddings().weight
    assert tied == (preset != "tiny_qwen2")
    if overrides == ("vocab_size=768",):
        assert head.weight.shape[0] == 768 > TOKENS
        with torch.no_grad():  # large values in the padding rows: any softmax that saw them would change
            for model in (module.student, module.teacher):
                model.get_output_embeddings().weight[TOKENS:] = 30.0
    _compare(module, batch)


def add_output_bias(module) -> None:
    """Each model's output layer becomes a Linear with the same weight and a random bias (teacher frozen)."""
    for seed, model in enumerate((module.student, module.teacher)):
        old = model.get_output_embeddings()
        head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
        torch.manual_seed(seed)
        with torch.no_grad():
            head.weight.copy_(old.weight)
            head.bias.normal_(0.0, 1.0)
        model.set_output_embeddings(head)
    module.teacher.requires_grad_(False)


def test_an_output_bias_is_fused():
    module, batch = _module("fkl", "tiny_qwen2", ce_weight=0.5)
    add_output_bias(module)
    _compare(module, batch)


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
    module, batch = _module(**settings)
    assert module.cross_tokenizer == (case != "ot_one_tokenizer") and module._fused, module._fused_reason
    _compare(module, batch, onpolicy=onpolicy, later=1e-3 if settings["loss"] == "uld" else 1e-5)


@pytest.mark.parametrize("case,names", [
    (dict(loss="ot", had_weight=0.0, gamma=0.3, ce_weight=0.5), {"sl": 0.15 * 0.1, "sd": 0.15 * 0.3, "ce": 0.5}),
    (dict(loss="uld", uld_weight=2.0, reduction="sequence_mean"), {"uld": 2.0, "ce": 1.0}),
])
def test_cross_tokenizer_terms_are_the_logits_path_s_loss_sums(case, names):
    """Each term as `Objective.terms` gives it on the logits path: its name, weight, unit, count and sum; a term of
    weight 0 is not computed."""
    module, batch = _module(**case)
    with torch.no_grad():
        _, fused = fused_terms(module, batch, True)
        _, plain, _ = module._terms(batch, {}, True)
    assert fused.keys() == plain.keys() == names.keys()
    for name, (weight, term) in plain.items():
        assert fused[name][0] == pytest.approx(weight) == pytest.approx(names[name])
        assert fused[name][1].unit == term.unit and torch.equal(fused[name][1].count, term.count), name
        torch.testing.assert_close(fused[name][1].total, term.total, rtol=1e-6, atol=1e-6, msg=name)


def test_a_lora_student_is_fused():
    from kdlab.models.lora import add_lora, has_lora

    module, batch = _module("jsd", "tiny_qwen2", ce_weight=0.5)
    torch.manual_seed(2)
    add_lora(module.student, {"r": 4, "alpha": 8})
    with torch.no_grad():  # B starts at zero: give the adapters an output, so that their A matrices get gradients
        for name, parameter in module.student.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.1)
    assert has_lora(module.student) and not module.student.get_output_embeddings().weight.requires_grad
    _compare(module, batch)


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


def _logits_shapes(module, batch, fused: bool) -> set[tuple[int, ...]]:
    """Shapes of (rows, positions, vocabulary) tensors of either model that one micro-batch's forward and backward
    create, vocabulary being any width of the output layers or the tokenizer."""
    module._fused_reason = "" if fused else "off"
    targets = StepTargets(batch)
    counts = module._global_counts([targets])
    with _Shapes() as seen:
        loss, _ = module._micro_loss(targets, True, counts)
        loss.backward()
    widths = {TOKENS, module.student.config.vocab_size, module.teacher.config.vocab_size}
    if module.teacher_tokenizer is not None:
        widths.add(len(module.teacher_tokenizer))
    return {s for s in seen.shapes if len(s) == 3 and s[0] == batch.student.target_ids.shape[0] and s[2] in widths}


@pytest.mark.parametrize("case", [dict(loss="jsd", preset="tiny_qwen3", overrides=("vocab_size=768",), ce_weight=0.5),
                                  dict(loss="ot"), dict(loss="uld")], ids=["jsd", "ot", "uld"])
def test_no_logits_tensor_of_either_model_exists_in_a_fused_step(case):
    module, batch = _module(**case)
    assert module._fused, module._fused_reason
    unfused = _logits_shapes(module, batch, fused=False)  # the logits path makes them: the probe sees them
    # the student's logits over its tokens, and with a teacher of its own tokenizer the teacher's over its own
    widths = {len(module.tokenizer), *([len(module.teacher_tokenizer)] if module.cross_tokenizer else [])}
    assert {shape[2] for shape in unfused} >= widths, unfused
    assert _logits_shapes(module, batch, fused=True) == set()


class _ScaledHead(torch.nn.Linear):
    """An output layer that computes more than weight @ hidden: the fused loss would be wrong for it."""

    def forward(self, hidden):
        return 2.0 * super().forward(hidden)


def test_a_head_that_is_not_plain_falls_back_with_one_log_line(caplog):
    module, batch = _module("fkl", "tiny_qwen2")
    old = module.student.get_output_embeddings()
    head = _ScaledHead(old.in_features, old.out_features, bias=False)
    head.weight = old.weight
    module.student.set_output_embeddings(head)
    with caplog.at_level(logging.INFO, logger="kdlab.step.fused"):
        assert not module._fused
        assert not module._fused  # decided once: one line
    lines = [r.getMessage() for r in caplog.records if r.name == "kdlab.step.fused"]
    assert len(lines) == 1 and "keep the logits path" in lines[0] and "_ScaledHead" in lines[0], lines
    targets = StepTargets(batch)
    loss, _ = module._micro_loss(targets, True, module._global_counts([targets]))
    with torch.no_grad():
        by_hand, _ = module._loss(batch)  # the logits path through the scaled head
    torch.testing.assert_close(loss, by_hand)


@pytest.mark.parametrize("case,reason", [
    (dict(loss="fkl", fused=False), "loss.fused=false"),
    (dict(loss="fkl", preset="tiny_t5"), "not a decoder-only model"),
    (dict(loss="fkl", _target_="kdlab.losses.divergences.reverse_kl"), "not kdlab's own loss"),
    (dict(loss="ot", _target_="kdlab.losses.universal_logit_distillation"), "not kdlab's own loss for loss=ot"),
])
def test_what_falls_back_says_why(case, reason, caplog):
    with caplog.at_level(logging.INFO, logger="kdlab.step.fused"):
        module, _ = _module(**case)
        assert not module._fused
    lines = [r.getMessage() for r in caplog.records if r.name == "kdlab.step.fused"]
    assert (lines == []) if reason == "loss.fused=false" else (len(lines) == 1 and reason in lines[0]), lines
    assert module._fused_reason.startswith(reason) or reason in module._fused_reason


# -- whole runs: the config's default (loss.fused=true) against loss.fused=false, in one process, DDP and FSDP2 -----

RUN = ["teacher=tiny", "student=tiny", "trainer.max_steps=2", "trainer.log_every_n_steps=1", "task.train_size=16",
       "task.val_size=4", "task.eval_examples=4", "task.batch_size=4", "task.eval_batch_size=4",
       "task.generation.max_new_tokens=4", "policy.sampling.max_new_tokens=4", "eval.teacher=false",
       "eval.before=false", "checkpoint.every_n_train_steps=2", "loss=jsd", "loss.ce_weight=0.5"]
TWO_PROCESSES = ["trainer.accelerator=cpu", "trainer.devices=2"]
STRATEGIES = {"ddp": ["trainer=ddp", "strategy=ddp", *TWO_PROCESSES],
              "fsdp": ["trainer=fsdp", "strategy=fsdp", *TWO_PROCESSES]}
# loss=ot with a teacher of its own tokenizer (the tiny teacher on the Unigram tokenizer), the CE term on
CROSS_RUN = [*(o for o in RUN if not o.startswith("loss")), "loss=ot", f"teacher.tokenizer={UNIGRAM}"]
# tests/workers/fused_step_runs.py's runs on 2 processes: (the run, the strategy) by name
TWO_PROCESS_RUNS = {"ddp": (RUN, STRATEGIES["ddp"]), "fsdp": (RUN, STRATEGIES["fsdp"]),
                    "ddp_ot": (CROSS_RUN, STRATEGIES["ddp"])}


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

    with caplog.at_level(logging.INFO, logger="kdlab.step.fused"):
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
    """tests/workers/fused_step_fsdp.py's cases: two SGD steps, fused and not, of models sharded as strategy=fsdp shards
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
    leave the fused weights apart from the logits path's. bf16 (strategy.mixed_precision): the logits path rounds the
    logits' gradient and the weight gradient's matmul to bf16, the fused one the weight gradient once, so they agree
    to bf16's precision (2^-8 relative per rounding), not float32's."""
    result = fsdp_steps[case]
    losses, gradients, weights = (1e-3, 5e-2, 5e-3) if case.endswith("bf16") else (1e-5, 1e-5, 1e-5)
    assert result["fused_reason"] is None  # the fused path ran (fused_off_reason: no fallback for FSDP2)
    assert result["tied"] == ("untied" not in case) and result["bias"] == ("bias" in case)
    assert result["sampled"] == ("onpolicy" in case)  # trained on the student's own samples
    assert result["fused_losses"] == pytest.approx(result["plain_losses"], rel=losses)
    assert max(result["gradients"]) <= gradients
    assert result["weights"] <= weights
    assert result["moved"] > 10 * weights  # the steps moved the student far beyond the tolerance


def test_models_sharded_by_another_strategy_keep_the_logits_path(monkeypatch, caplog):
    monkeypatch.setattr(DistillationModule, "_sharded", property(lambda self: True))  # no FSDP2Strategy trainer
    module, _ = _module("fkl")
    with caplog.at_level(logging.INFO, logger="kdlab.step.fused"):
        assert not module._fused
    assert "sharded by a strategy other than strategy=fsdp" in caplog.records[-1].getMessage()
