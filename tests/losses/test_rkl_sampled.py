"""loss=rkl_sampled: the sampled-token reverse KL's gradient is, in expectation over the student's samples, the exact
reverse-KL gradient; on one sample it is the closed form; fixed data is refused; the teacher answers only the
sampled tokens' log-probabilities, in the process and from a server."""

from __future__ import annotations

import threading

import pytest
import torch

from kdlab.data.batch import Batch, Side
from kdlab.losses.divergences import reverse_kl
from kdlab.losses.sampled import TOKEN_LOGPROBS, TokenLogprobs, sampled_reverse_kl
from kdlab.run.validate import config_errors
from kdlab.step.policy import GROUND_TRUTH, STUDENT
from tests.builders import distillation_step, model_teacher
from tests.conftest import compose, loss_config, tiny_model

torch.set_num_threads(1)
V = 4  # a two-token "language" over 4 symbols: small enough to enumerate every sequence


def _tables(generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Student logits for token 1 (V,) and for token 2 given token 1 (V, V); the teacher's log-probabilities alike."""
    student1 = torch.randn(V, generator=generator, dtype=torch.float64, requires_grad=True)
    student2 = torch.randn(V, V, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher1 = torch.log_softmax(torch.randn(V, generator=generator, dtype=torch.float64), -1)
    teacher2 = torch.log_softmax(torch.randn(V, V, generator=generator, dtype=torch.float64), -1)
    return student1, student2, teacher1, teacher2


def _exact_gradient(student1, student2, teacher1, teacher2) -> torch.Tensor:
    """E over x1 ~ q of the gradient of sum_t KL(q_t || p_t) on the sampled prefix (loss=rkl on on-policy samples,
    summed over the 2 tokens), by enumeration: KL(q1 || p1) + sum_x1 q1(x1) KL(q2(.|x1) || p2(.|x1)), with q1(x1) a
    constant (no gradient flows through which prefix was sampled)."""
    log_q1, log_q2 = torch.log_softmax(student1, -1), torch.log_softmax(student2, -1)
    kl1 = (log_q1.exp() * (log_q1 - teacher1)).sum()
    kl2 = (log_q2.exp() * (log_q2 - teacher2)).sum(-1)
    total = kl1 + (log_q1.exp().detach() * kl2).sum()
    grads = torch.autograd.grad(total, (student1, student2))
    return torch.cat([g.reshape(-1) for g in grads])


def test_its_gradient_averaged_over_samples_is_the_exact_reverse_kl_gradient():
    generator = torch.Generator().manual_seed(0)
    student1, student2, teacher1, teacher2 = _tables(generator)
    n = 200_000
    with torch.no_grad():
        x1 = torch.multinomial(torch.softmax(student1, -1), n, replacement=True, generator=generator)
        x2 = torch.multinomial(torch.softmax(student2[x1], -1), 1, generator=generator)[:, 0]
    ids = torch.stack([x1, x2], 1)
    logits = torch.stack([student1.detach().expand(n, V), student2.detach()[x1]], 1).requires_grad_(True)
    teacher = TokenLogprobs(torch.stack([teacher1[x1], teacher2[x1, x2]], 1), ids)
    sampled_reverse_kl(logits, teacher, reduction="sum").backward()
    # each sample's gradient in the tables' coordinates: its token-1 row goes to student1, its token-2 row to
    # student2's row x1
    per_sample = torch.zeros(n, V + V * V, dtype=torch.float64)
    per_sample[:, :V] = logits.grad[:, 0]
    per_sample[torch.arange(n)[:, None], V + x1[:, None] * V + torch.arange(V)] = logits.grad[:, 1]
    mean, error = per_sample.mean(0), per_sample.std(0) / n**0.5
    exact = _exact_gradient(student1, student2, teacher1, teacher2)
    assert exact.abs().max() > 20 * error.max()  # the test can tell a wrong estimator (e.g. a flipped sign) apart
    assert ((mean - exact).abs() <= 5 * error + 1e-12).all(), (mean - exact) / error  # 5 standard errors


def test_on_one_sample_value_and_gradient_are_the_closed_form():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 7, (2, 3), generator=generator)
    teacher = torch.log_softmax(torch.randn(2, 3, 7, generator=generator, dtype=torch.float64), -1)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    teacher_token = teacher.gather(-1, ids[..., None])[..., 0]
    value = sampled_reverse_kl(logits, TokenLogprobs(teacher_token, ids), mask)
    value.backward()
    log_q = torch.log_softmax(logits.detach(), -1)
    student_token = log_q.gather(-1, ids[..., None])[..., 0]
    estimate = (student_token - teacher_token) * mask  # log q(x_t) - log p(x_t) = -A_t, per scored token
    assert float(value) == pytest.approx(float(estimate.sum() / mask.sum()), abs=1e-12)
    # d/dz_t of -A_t log q(x_t) with A_t constant: (log q(x_t) - log p(x_t)) (onehot(x_t) - softmax(z_t))
    onehot = torch.nn.functional.one_hot(ids, 7).double()
    expected = estimate[..., None] * (onehot - log_q.exp()) / mask.sum()
    torch.testing.assert_close(logits.grad, expected, rtol=0, atol=1e-12)


def test_it_refuses_fixed_data_with_a_message(tokenizer):
    errors = config_errors(compose(["loss=rkl_sampled", "policy=mixed"]))
    assert any("policy.student_fraction=0.5" in e and "no student samples to weigh" in e for e in errors), errors
    assert any("no student samples" in e for e in config_errors(compose(["loss=rkl_sampled", "policy=seqkd"])))
    assert any("policy=speculative" in e for e in config_errors(compose(["loss=rkl_sampled", "policy=speculative"])))
    assert config_errors(compose(["loss=rkl_sampled", "policy=onpolicy"])) == []
    # and the step itself, built without the config checks
    student, teacher = tiny_model(tokenizer, seed=1), tiny_model(tokenizer, seed=2)
    step = distillation_step(student, tokenizer, loss_config("rkl_sampled"), teacher)
    targets = step.targets(_batch(tokenizer), GROUND_TRUTH, None)
    with pytest.raises(ValueError, match="no student samples to weigh"):
        step.loss(targets, step.global_counts([targets], torch.device("cpu")))


def _batch(tokenizer) -> Batch:
    from kdlab.data.datamodule import pad

    prompts = pad(tokenizer(["Question: 2 + 3?\nAnswer:", "Q: 7"], add_special_tokens=False)["input_ids"],
                  tokenizer.pad_token_id, "left")
    targets = pad(tokenizer([" 5 #### 5", " 7 + 1 = 8"], add_special_tokens=False)["input_ids"],
                  tokenizer.pad_token_id, "right")
    return Batch(Side(*prompts, *targets), ["5", "8"])


def test_a_step_on_student_samples_asks_the_teacher_only_for_the_sampled_tokens(tokenizer):
    from kdlab.sampling.base import SamplingSettings

    student, teacher = tiny_model(tokenizer, seed=1), tiny_model(tokenizer, seed=2)
    step = distillation_step(student, tokenizer, loss_config("rkl_sampled"), teacher)
    torch.manual_seed(0)
    targets = step.targets(_batch(tokenizer), STUDENT, SamplingSettings(max_new_tokens=6, do_sample=True))
    side = targets.batch.student
    answer = model_teacher(teacher, tokenizer).scores(targets.batch, None, TOKEN_LOGPROBS)
    assert isinstance(answer, TokenLogprobs) and answer.logprobs.shape == side.target_ids.shape
    with torch.no_grad():
        full = step.teacher.scores(targets.batch, None)  # the teacher's logits
    torch.testing.assert_close(answer.logprobs, torch.log_softmax(full.float(), -1).gather(
        -1, side.target_ids[..., None])[..., 0], rtol=0, atol=1e-6)
    loss, values = step.loss(targets, step.global_counts([targets], torch.device("cpu")))
    logits = step.score_student(*side.prompt, *side.target).detach()
    expected = sampled_reverse_kl(logits, answer, side.target_mask)
    assert float(values["rkl_sampled"]) == pytest.approx(float(expected), abs=1e-5)
    assert "ce" not in values
    # its validation loss is the exact reverse KL on the reference solutions, as loss=rkl's
    batch = _batch(tokenizer)
    with torch.no_grad():
        rkl_value = reverse_kl(step.score_student(*batch.student.prompt, *batch.student.target),
                               step.teacher.scores(batch, None), batch.student.target_mask)
        assert float(step.validation_loss(batch)) == pytest.approx(float(rkl_value), abs=1e-6)


# -- from a teacher server: prompt_logprobs 0 ------------------------------------------------------------------------
KEY = "test-key"


@pytest.fixture(scope="module")
def server():
    from kdlab.run.compose import compose as compose_conf
    from kdlab.teachers.server import build_server

    cfg = compose_conf(["teacher=arith_teacher", "teacher.dtype=float64", "server.port=0", f"server.api_key={KEY}",
                        "server.max_logprobs=16"], config_name="serve_teacher")
    srv = build_server(cfg)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv, cfg
    srv.shutdown()
    srv.server_close()


def test_a_server_answers_the_sampled_tokens_log_probabilities_with_fewer_bytes(server):
    from kdlab.models.loading import load_model, load_tokenizer
    from kdlab.teachers.client import TeacherClient
    from kdlab.teachers.remote import RemoteTeacher

    srv, cfg = server
    tokenizer = load_tokenizer(cfg.teacher)
    model = load_model(cfg.teacher, tokenizer).eval()
    client = TeacherClient(srv.url, top_k=8, api_key=KEY)
    client.check(vocab_size=len(tokenizer))
    batch = _batch(tokenizer)
    remote = RemoteTeacher(client, targets_only=True)
    answer = remote.prepare(batch)
    assert isinstance(answer, TokenLogprobs) and remote.scores(batch, answer, TOKEN_LOGPROBS) is answer
    side = batch.student
    for row in range(len(batch)):
        prompt = side.prompt_ids[row][side.prompt_mask[row]].tolist()
        target = side.target_ids[row][side.target_mask[row]].tolist()
        with torch.no_grad():
            log_p = torch.log_softmax(model(input_ids=torch.tensor([prompt + target])).logits[0].double(), -1)
        expected = log_p[len(prompt) - 1 : -1].gather(-1, torch.tensor(target)[:, None])[:, 0]
        torch.testing.assert_close(answer.logprobs[row, : len(target)].double(), expected, rtol=0, atol=1e-6)
    tokens = int(side.target_mask.sum())
    assert answer.received_bytes > 0 and remote.scored_tokens == tokens
    # the same rows' top-8 answer moves several times the bytes: each token carries 8 entries instead of 1
    before = client.received_bytes
    RemoteTeacher(client).prepare(batch)  # the top-k form's request for the same rows
    assert client.received_bytes - before > 3 * answer.received_bytes
    # a step on the student's samples logs what the answers took per scored token
    from kdlab.sampling.base import SamplingSettings

    step = distillation_step(tiny_model(tokenizer, seed=1), tokenizer, loss_config("rkl_sampled"), remote)
    torch.manual_seed(0)
    targets = step.targets(batch, STUDENT, SamplingSettings(max_new_tokens=6, do_sample=True))
    moved = float(targets.stats["teacher_bytes_per_token"])
    _, values = step.loss(targets, step.global_counts([targets], torch.device("cpu")))
    scored = float(targets.batch.student.target_mask.sum())
    assert moved > 0 and float(values["teacher_bytes_per_token"]) == pytest.approx(moved / scored)
