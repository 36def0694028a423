"""policy=speculative: interleaved sampling (the student proposes, the teacher keeps its top-K and replaces the rest)
against on-policy sampling, the teacher's greedy decoding and a naive per-token reference; its draws repeat on
resume; a run trains on it end to end and logs what the teacher kept; other teachers are refused at start-up."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from kdlab.data.batch import Batch, Side
from kdlab.data.datamodule import pad
from kdlab.losses.objective import build_objective
from kdlab.run.validate import config_errors
from kdlab.sampling.base import SamplingSettings, response_mask
from kdlab.sampling.hf import HFSampler
from kdlab.sampling.speculative import SpeculativeSampler
from kdlab.step.policy import SPECULATIVE, DataPolicy
from kdlab.step.resilience import step_seed
from kdlab.step.step import DistillationStep
from tests.builders import model_teacher
from tests.conftest import TINY_RUN, compose, loss_config, tiny_model

torch.set_num_threads(1)

TEXTS = ["Question: Ann has 3 pens.\nAnswer:", "Question: 12 + 7?\nAnswer:", "Q: 1", "Question: 5 * 6 = ?\nAnswer:"]
SAMPLE = SamplingSettings(max_new_tokens=12, do_sample=True)
GREEDY = SamplingSettings(max_new_tokens=12, do_sample=False)


@pytest.fixture(scope="module")
def models(tokenizer):
    return tiny_model(tokenizer, seed=1), tiny_model(tokenizer, seed=2)


def _prompts(tokenizer):
    return pad(tokenizer(TEXTS, add_special_tokens=False)["input_ids"], tokenizer.pad_token_id, "left")


@pytest.mark.parametrize("settings", [SAMPLE, SamplingSettings(max_new_tokens=12, do_sample=True, temperature=0.7,
                                                                top_p=0.9, top_k=40)])
def test_top_k_of_the_whole_vocabulary_keeps_every_proposal_the_on_policy_samples(tokenizer, models, settings):
    student, teacher = models
    prompt = _prompts(tokenizer)
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        ids, mask = HFSampler(student, tokenizer).sample(*prompt, settings)
        torch.manual_seed(seed)
        draw = SpeculativeSampler(student, teacher, tokenizer, top_k=len(tokenizer)).interleaved(*prompt, settings)
        assert torch.equal(draw.ids, ids) and torch.equal(draw.mask, mask)
        assert not draw.replaced.any() and torch.equal(draw.accepted, mask)


def test_top_1_with_a_greedy_teacher_gives_the_teachers_greedy_continuation(tokenizer, models):
    # K = 1 keeps a proposal only where it is the teacher's argmax, and a greedy teacher replaces every other one by
    # its argmax: the whole target is the teacher's greedy decoding, whatever the student proposed.
    student, teacher = models
    prompt = _prompts(tokenizer)
    expected, expected_mask = HFSampler(teacher, tokenizer).sample(*prompt, GREEDY)
    sampler = SpeculativeSampler(student, teacher, tokenizer, top_k=1, teacher_settings=GREEDY)
    for seed in (0, 1):
        torch.manual_seed(seed)
        draw = sampler.interleaved(*prompt, SAMPLE)
        assert torch.equal(draw.ids, expected) and torch.equal(draw.mask, expected_mask)
        assert draw.replaced.any()  # the student disagreed somewhere: those tokens came from the teacher


def test_a_student_that_proposes_the_teachers_greedy_tokens_is_never_replaced(tokenizer, models):
    _, teacher = models
    prompt = _prompts(tokenizer)
    draw = SpeculativeSampler(teacher, teacher, tokenizer, top_k=1).interleaved(*prompt, GREEDY)
    assert not draw.replaced.any() and torch.equal(draw.accepted, draw.mask)


def _naive_interleaved(student, teacher, prompt_ids, prompt_mask, k: int, steps: int, eos: int, pad_id: int):
    """The rule token by token, each model reading the whole sequence so far (no KV cache), a token's rank counted
    as the number of tokens the teacher rates strictly higher."""
    ids, mask = prompt_ids, prompt_mask.long()
    unfinished = torch.ones(len(ids), dtype=torch.bool)
    tokens, replaced = [], []
    with torch.no_grad():
        for _ in range(steps):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            q = student(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].float()
            p = teacher(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].float()
            proposal = torch.multinomial(torch.softmax(q, -1), 1)[:, 0]
            rank = (p > p.gather(-1, proposal[:, None])).sum(-1)
            swap = unfinished & (rank >= k)
            token = proposal.clone()
            if swap.any():
                token[swap] = torch.multinomial(torch.softmax(p[swap], -1), 1)[:, 0]
            token = torch.where(unfinished, token, torch.full_like(token, pad_id))
            tokens.append(token)
            replaced.append(swap)
            unfinished &= token != eos
            if not unfinished.any():
                break
            ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    ids, replaced = torch.stack(tokens, 1), torch.stack(replaced, 1)
    kept = response_mask(ids, eos)
    return ids.masked_fill(~kept, pad_id), replaced & kept


@pytest.mark.parametrize("k", [1, 5, 25])
def test_the_acceptance_rule_matches_a_naive_per_token_reference(tokenizer, models, k):
    student, teacher = models
    prompt = _prompts(tokenizer)
    sampler = SpeculativeSampler(student, teacher, tokenizer, top_k=k)
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        draw = sampler.interleaved(*prompt, SAMPLE)
        torch.manual_seed(seed)
        ids, replaced = _naive_interleaved(student.eval(), teacher.eval(), *prompt, k, SAMPLE.max_new_tokens,
                                           tokenizer.eos_token_id, tokenizer.pad_token_id)
        assert torch.equal(draw.ids, ids) and torch.equal(draw.replaced, replaced)
    # smaller K replaces more: the rule is the teacher's ranking, not a no-op
    counts = {}
    for top_k in (1, 5, len(tokenizer)):
        torch.manual_seed(0)
        counts[top_k] = int(SpeculativeSampler(student, teacher, tokenizer, top_k).interleaved(*prompt, SAMPLE)
                            .replaced.sum())
    assert counts[1] > counts[5] >= counts[len(tokenizer)] == 0


def _step(student, teacher, tokenizer, loss: dict, top_k: int) -> DistillationStep:
    return DistillationStep(student, tokenizer, build_objective(loss), HFSampler(student, tokenizer),
                            model_teacher(teacher, tokenizer),
                            speculative=SpeculativeSampler(student, teacher, tokenizer, top_k=top_k))


def test_a_resumed_run_repeats_the_draws_of_its_steps(tokenizer, models):
    # The module seeds each step from (seed, step, rank) before drawing (kdlab.step.resilience.step_seed); a run
    # resumed at step 3 draws step 3's targets without having drawn steps 0-2.
    student, teacher = models
    step = _step(student, teacher, tokenizer, loss_config("jsd"), top_k=5)
    prompt = _prompts(tokenizer)
    empty = torch.zeros(len(TEXTS), 1, dtype=torch.long)
    batch = Batch(Side(*prompt, empty, empty.bool()), [""] * len(TEXTS))

    def targets(at: int):
        torch.manual_seed(step_seed(7, at, 0))
        return step.targets(batch, SPECULATIVE, SAMPLE, step_seed(7, at, 0))

    straight = [targets(at) for at in range(4)]
    resumed = targets(3)
    assert torch.equal(resumed.batch.student.target_ids, straight[3].batch.student.target_ids)
    assert torch.equal(resumed.replaced, straight[3].replaced)
    assert not torch.equal(straight[2].batch.student.target_ids, straight[3].batch.student.target_ids)


def test_the_policy_draws_speculative_steps_at_its_fraction():
    settings = SamplingSettings(max_new_tokens=4, do_sample=True)
    assert {DataPolicy(1.0, "ground_truth", settings, 0, speculative=True).draw(s) for s in range(5)} == {SPECULATIVE}
    mixed = DataPolicy(0.5, "ground_truth", settings, 0, speculative=True)
    plain = DataPolicy(0.5, "ground_truth", settings, 0)
    draws = [mixed.draw(s) for s in range(40)]
    assert set(draws) == {SPECULATIVE, "ground_truth"}
    assert [d == SPECULATIVE for d in draws] == [plain.draw(s) == "student" for s in range(40)]


def test_speculative_targets_train_without_the_ce_term_and_log_the_acceptance(tokenizer, models):
    student, teacher = models
    step = _step(student, teacher, tokenizer, loss_config("fkl", ce_weight=1.0), top_k=3)
    prompt = _prompts(tokenizer)
    empty = torch.zeros(len(TEXTS), 1, dtype=torch.long)
    torch.manual_seed(0)
    targets = step.targets(Batch(Side(*prompt, empty, empty.bool()), [""] * len(TEXTS)), SPECULATIVE, SAMPLE)
    counts = step.global_counts([targets], torch.device("cpu"))
    _, values = step.loss(targets, counts)
    assert "ce" not in values  # like the student's own samples: CE would reinforce its proposals
    mask = targets.batch.student.target_mask
    expected = float((mask & ~targets.replaced).sum()) / float(mask.sum())
    assert float(values["speculative_accept"]) == pytest.approx(expected, abs=1e-6)
    assert 0.0 < expected < 1.0


@pytest.mark.parametrize("teacher,message", [
    (["teacher=remote", "teacher.url=http://127.0.0.1:8000"], "round trip per token"),
    (["teacher=cached", "teacher.dir=/a/cache"], "fixed targets only"),
    (["teacher=arith_pair"], "several teachers"),
    (["teacher=none", "loss=sft"], "no teacher"),
    (["loss=ot"], "share a tokenizer"),
])
def test_teachers_that_cannot_rank_each_proposal_are_refused_at_start(teacher, message):
    errors = config_errors(compose(["policy=speculative", *teacher]))
    assert any(message in e and "policy=speculative" in e for e in errors), errors


def test_a_teacher_with_another_tokenizer_is_refused_at_start(tmp_path):
    # with a token-by-token loss by the vocabulary check, with a cross-tokenizer loss by the policy's own check
    from kdlab.run.train import validate
    from kdlab.run.validate import ConfigError

    for loss, message in (("jsd", "different vocabularies"), ("ot", "share a tokenizer")):
        with pytest.raises(ConfigError, match=message):
            validate(compose(["policy=speculative", "teacher=arith_unigram_teacher", f"loss={loss}"],
                             output_dir=tmp_path))


def test_its_own_settings_are_checked_at_start():
    errors = config_errors(compose(["policy=speculative", "policy.speculative.top_k=0",
                                    "+policy.speculative.teacher.beams=2"]))
    assert any("policy.speculative.top_k=0" in e for e in errors)
    assert any("policy.speculative.teacher.beams" in e for e in errors)
    assert config_errors(compose(["policy=speculative", "policy.speculative.teacher.do_sample=false"])) == []


def test_a_teacher_with_its_own_tokenizer_is_refused_when_the_sampler_is_built(tokenizer, models):
    from kdlab.run.build import build_speculative

    student, teacher = models
    policy = compose(["policy=speculative"]).policy
    with pytest.raises(ValueError, match="reads the student's tokens"):
        build_speculative(policy, student, model_teacher(teacher, tokenizer, own=True), tokenizer)
    built = build_speculative(policy, student, model_teacher(teacher, tokenizer), tokenizer)
    assert built.top_k == 25 and built.teacher_settings is None  # the paper's K; replacements drawn as proposals
    greedy = compose(["policy=speculative", "policy.speculative.teacher.do_sample=false"]).policy
    built = build_speculative(greedy, student, model_teacher(teacher, tokenizer), tokenizer)
    assert built.teacher_settings.do_sample is False and built.teacher_settings.max_new_tokens == 160
    assert build_speculative(compose(["policy=speculative", "policy.student_fraction=0"]).policy, student,
                             model_teacher(teacher, tokenizer), tokenizer) is None


@pytest.mark.slow
def test_a_speculative_run_trains_end_to_end_and_records_the_teachers_replacements(tmp_path):
    from kdlab.run.train import run

    cfg = compose(TINY_RUN + ["policy=speculative", "policy.speculative.top_k=2", "loss=jsd", "loss.beta=0.9",
                              "log_rollouts_every_n_steps=1", "log_rollouts_examples=4"], output_dir=tmp_path)
    run(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["steps"] == 3 and results["onpolicy_fraction"] == 1.0
    assert results["train"]["teacher_forward_tokens_total"] > 0  # the teacher's compute, for the comparison
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    accept = [float(r["train/speculative_accept"]) for r in rows if r.get("train/speculative_accept")]
    assert len(accept) == 3 and all(0.0 <= a <= 1.0 for a in accept)
    rollouts = [json.loads(line) for line in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    assert {r["source"] for r in rollouts} == {SPECULATIVE}
    assert all(all(0 <= i < r["tokens"] for i in r["replaced"]) for r in rollouts)
    assert any(r["replaced"] for r in rollouts)  # K = 2 with random tiny models: the teacher replaced some


def test_both_models_read_each_new_token_once_through_their_kv_caches(tokenizer, models):
    # The prompt once, then one token per row and step: P + T - 1 positions per row for each model (no re-reading
    # of the sequence so far), counted as the run counts the teacher's compute (kdlab.step.module.ForwardTokens).
    from kdlab.step.module import ForwardTokens

    student, teacher = models
    prompt = _prompts(tokenizer)
    counts = ForwardTokens([student]), ForwardTokens([teacher])
    torch.manual_seed(0)
    draw = SpeculativeSampler(student, teacher, tokenizer, top_k=5).interleaved(*prompt, SAMPLE)
    expected = len(TEXTS) * (prompt[0].shape[1] + draw.ids.shape[1] - 1)
    assert [c.take() for c in counts] == [expected, expected]
    assert [c.take() for c in counts] == [0, 0]
    for count in counts:
        count.remove()


def test_a_lora_student_proposes_through_its_adapters(tokenizer, models):
    # LoRA injects adapters in place: the sampler reads the adapted model, token for token as generate does.
    from kdlab.models.lora import add_lora

    _, teacher = models
    student = add_lora(tiny_model(tokenizer, seed=3), {"r": 4, "alpha": 8, "dropout": 0.0,
                                                       "target_modules": "all-linear"})
    with torch.no_grad():
        for name, parameter in student.named_parameters():
            if "lora_B" in name:  # B starts at zero: make the adapters change the proposals
                parameter.normal_(0, 0.5)
    prompt = _prompts(tokenizer)
    torch.manual_seed(0)
    plain, _ = HFSampler(tiny_model(tokenizer, seed=3), tokenizer).sample(*prompt, SAMPLE)
    torch.manual_seed(0)
    ids, _ = HFSampler(student, tokenizer).sample(*prompt, SAMPLE)
    torch.manual_seed(0)
    draw = SpeculativeSampler(student, teacher, tokenizer, top_k=len(tokenizer)).interleaved(*prompt, SAMPLE)
    assert torch.equal(draw.ids, ids) and not torch.equal(ids, plain)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_sample_speculatively_each_step(tmp_path, strategy):
    # FSDP: every forward pass is a collective, so the sampler keeps both ranks stepping until both have finished
    # (their rows end at different tokens); DDP replicas sample on their own. Started as docs/scaling.md starts them.
    import subprocess
    import sys

    from tests.conftest import REPO

    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"] if strategy == "fsdp" else []
    cmd = [sys.executable, *launcher, "train.py", f"hydra.run.dir={tmp_path}", *TINY_RUN, f"trainer={strategy}",
           "trainer.accelerator=cpu", "trainer.devices=2", "task.batch_size=4", "policy=speculative",
           "policy.speculative.top_k=2", "trainer.max_steps=2", "export=false", "eval.teacher=false",
           "eval.before=false", "task.eval_examples=8"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["steps"] == 2 and results["onpolicy_fraction"] == 1.0
    assert 0.0 <= results["train"]["speculative_accept"] <= 1.0


def test_a_training_step_counts_the_teachers_forward_tokens_of_training_only(tokenizer):
    # The teacher compute the comparison reports (train/teacher_forward_tokens): one padded scoring pass of the
    # batch reads rows x (prompt + target) positions; the rollouts scored in the same step are left out.
    import lightning as L

    from kdlab.data.datamodule import DistillationDataModule
    from kdlab.data.tasks import Task
    from kdlab.run.compose import task_node
    from tests.builders import distillation_module

    task = Task.from_config(task_node(name="arith", train_size=8, val_size=4, eval_examples=4, batch_size=4,
                                      eval_batch_size=4, generation={"max_new_tokens": 4, "do_sample": False}))
    module = distillation_module(tiny_model(tokenizer, seed=0), tokenizer, loss_config("fkl"),
                                 tiny_model(tokenizer, seed=1), micro_batch_size=4, rollouts=(1, 2))
    batches = []
    original = module.training_step
    module.training_step = lambda batch, batch_idx: batches.append(batch) or original(batch, batch_idx)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(module, datamodule=DistillationDataModule(task, tokenizer))
    side = batches[0].student
    expected = side.prompt_ids.shape[0] * (side.prompt_ids.shape[1] + side.target_ids.shape[1])
    assert module.teacher_forward_tokens == expected
