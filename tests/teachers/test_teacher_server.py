"""kdlab-serve-teacher and its client against a real server on 127.0.0.1, the shipped arith teacher behind it."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from kdlab.run.compose import compose
from kdlab.teachers.client import TeacherClient, TeacherServerError
from kdlab.teachers.server import TeacherScorer, TeacherServer, build_server
from tests.conftest import REPO

torch.set_num_threads(1)  # a tiny model on a shared 2-core machine: one thread is several times faster than two

KEY = "test-key"
SEQUENCES = [[1, 48, 30, 9, 57, 61, 12], [1, 48, 30], [1, 22, 5, 600, 33, 2]]  # different lengths: padding is tested
# The teacher runs in float64 on both sides. In float32 the server's padded batch and the reference's one sequence at
# a time round differently, by up to 1.1e-5 on some CPUs: a bound near that passes on one machine and fails on another.
# In float64 that rounding is ~1e-14, so the bounds below measure the server's arithmetic, not the BLAS kernels.
TEACHER = ["teacher=arith_teacher", "teacher.dtype=float64"]


def _compose(overrides: list[str]):
    return compose(overrides, config_name="serve_teacher")


def _serve(server: TeacherServer) -> TeacherServer:
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def server() -> Iterator[TeacherServer]:
    cfg = _compose([*TEACHER, "server.port=0", f"server.api_key={KEY}", "server.max_batch=4",
                    "server.max_tokens_per_sequence=32", "server.max_request_bytes=4096", "server.max_logprobs=16"])
    srv = _serve(build_server(cfg))
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def reference() -> tuple:
    """The teacher loaded on its own, and its log-softmax of one unpadded sequence at a time."""
    from kdlab.models.loading import load_model, load_tokenizer

    cfg = _compose(TEACHER)
    tokenizer = load_tokenizer(cfg.teacher)
    model = load_model(cfg.teacher, tokenizer).eval()

    def log_softmax(seq: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0], dim=-1)

    return tokenizer, log_softmax


def _post(url: str, path: str, body: bytes | str | dict, key: str | None = KEY,
          headers: dict | None = None) -> tuple[int, dict]:
    raw = body if isinstance(body, bytes) else (body if isinstance(body, str) else json.dumps(body)).encode()
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    h = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    conn.request("POST" if body != b"GET" else "GET", path, body=None if body == b"GET" else raw, headers=h)
    response = conn.getresponse()
    status, text = response.status, response.read().decode()
    conn.close()
    assert "Traceback" not in text
    return status, json.loads(text)


def _request(k: int = 5, prompt=None, **extra) -> dict:
    return {"model": "arith-teacher", "prompt": SEQUENCES if prompt is None else prompt, "max_tokens": 1,
            "prompt_logprobs": k, **extra}


def test_prompt_logprobs_are_the_teachers_log_softmax_in_vllms_shape(server, reference) -> None:
    tokenizer, log_softmax = reference
    status, out = _post(server.url, "/v1/completions", _request(k=5))
    assert status == 200 and out["object"] == "text_completion" and out["model"] == "arith-teacher"
    assert out["usage"]["prompt_tokens"] == sum(len(s) for s in SEQUENCES)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    for seq, choice in zip(SEQUENCES, out["choices"]):
        want = log_softmax(seq)
        entries = choice["prompt_logprobs"]
        assert choice["prompt_token_ids"] == seq and len(entries) == len(seq) and entries[0] is None
        assert choice["text"] == tokenizer.decode([int(want[-1].argmax())])  # max_tokens=1: the greedy token
        for t in range(1, len(seq)):
            row = want[t - 1]  # the distribution of token t given tokens < t
            top = row.topk(5)
            assert set(entries[t]) == {str(i) for i in top.indices.tolist()} | {str(seq[t])}
            for token, entry in entries[t].items():
                assert abs(entry["logprob"] - row[int(token)].item()) < 1e-9
                assert entry["rank"] == int((row > row[int(token)]).sum()) + 1
                assert entry["decoded_token"] == tokenizer.decode([int(token)])


def test_models_card_and_health(server) -> None:
    status, out = _post(server.url, "/v1/models", b"GET")
    card = out["data"][0]
    assert status == 200 and card["id"] == "arith-teacher" and card["max_model_len"] == 512
    assert card["kdlab"]["vocab_size"] == 746
    assert _post(server.url, "/health", b"GET", key=None) == (200, {})


@pytest.mark.parametrize("key", [None, "wrong"])
def test_a_missing_or_wrong_key_gets_401(server, key) -> None:
    for path, body in (("/v1/completions", _request()), ("/v1/models", b"GET")):
        status, out = _post(server.url, path, body, key=key)
        assert status == 401 and out["error"]["code"] == 401 and "API key" in out["error"]["message"]


BAD_REQUESTS = [
    ("malformed json", b'{"model": "arith-teacher", "prompt": [[1, 2]', 400, "not valid JSON"),
    ("not an object", b"[1, 2, 3]", 400, "JSON object"),
    ("NaN literal", b'{"model": "arith-teacher", "prompt": [[1, 2]], "prompt_logprobs": NaN}', 400, "not valid"),
    ("unknown model", _request(model="gpt-4"), 404, "does not exist"),
    ("text prompt", _request(prompt="two plus two"), 400, "token ids"),
    ("id past the vocabulary", _request(prompt=[[1, 746]]), 400, "[0, 746)"),
    ("negative id", _request(prompt=[[1, -3]]), 400, "[0, 746)"),
    ("float id", _request(prompt=[[1, 2.5]]), 400, "not a token id"),
    ("bool id", _request(prompt=[[1, True]]), 400, "not a token id"),
    ("empty sequence", _request(prompt=[[1, 2], []]), 400, "non-empty"),
    ("too many sequences", _request(prompt=[[1, 2]] * 5), 400, "server.max_batch"),
    ("sequence too long", _request(prompt=[[1] * 33]), 400, "server.max_tokens_per_sequence"),
    ("k too large", _request(k=17), 400, "prompt_logprobs"),
    ("k missing", {"model": "arith-teacher", "prompt": [[1, 2]]}, 400, "prompt_logprobs"),
    ("generation", _request(max_tokens=8), 400, "max_tokens"),
    ("body too large", _request(prompt=[[1] * 30] * 4, pad="x" * 5000), 413, "server.max_request_bytes"),
]


@pytest.mark.parametrize("name,body,status,message", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_a_4xx_with_a_message_and_the_server_goes_on(server, name, body, status, message) -> None:
    got, out = _post(server.url, "/v1/completions", body)
    assert got == status, out
    assert out["error"]["code"] == status and message in out["error"]["message"], out
    assert _post(server.url, "/v1/completions", _request(prompt=[[1, 2, 3]]))[0] == 200


def test_sequences_past_the_models_positions_are_refused_even_under_a_larger_limit(server) -> None:
    from kdlab.teachers.server import ApiError, ServerLimits, parse_completion_request

    with pytest.raises(ApiError, match="513 tokens; at most 512") as err:
        parse_completion_request(_request(prompt=[[1] * 513]), server.scorer,
                                 ServerLimits(max_tokens_per_sequence=4096))
    assert err.value.status == 400


def test_a_body_without_content_length_is_411(server) -> None:
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=10) as conn:
        conn.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Transfer-Encoding: chunked\r\n\r\n".encode())
        reply = b""
        while chunk := conn.recv(4096):  # the server closes the connection after an error
            reply += chunk
    reply = reply.decode()
    assert reply.startswith("HTTP/1.1 411") and "Content-Length is required" in reply


def test_unknown_path_is_404(server) -> None:
    assert _post(server.url, "/v1/chat/completions", _request())[0] == 404
    assert _post(server.url, "/admin", b"GET")[0] == 404


def test_a_failing_forward_is_a_500_without_traceback_and_the_server_survives(server, monkeypatch) -> None:
    def broken(sequences):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(server.scorer, "log_probs", broken)
    status, out = _post(server.url, "/v1/completions", _request())
    assert status == 500 and "secret" not in json.dumps(out)
    monkeypatch.undo()
    assert _post(server.url, "/v1/completions", _request())[0] == 200


# -- client -----------------------------------------------------------------------------------------------------------
def test_client_top_k_is_aligned_with_causal_logits(server, reference) -> None:
    from kdlab.teachers.fingerprint import tokenizer_fingerprint

    tokenizer, log_softmax = reference
    client = TeacherClient(server.url, top_k=6, api_key=KEY, max_batch=2)  # 3 sequences: two requests
    assert client.check(746, tokenizer_fingerprint(tokenizer))["id"] == "arith-teacher"
    topk = client.top_k(SEQUENCES)
    assert topk.logprobs.shape == (3, 6, 6) and topk.tail.shape == (3, 6)
    for row, seq in enumerate(SEQUENCES):
        want = log_softmax(seq)[:-1].double()  # position t: the distribution of token t + 1
        n = len(seq) - 1
        assert topk.mask[row].tolist() == [True] * n + [False] * (6 - n)
        top = want.topk(6)
        assert torch.equal(topk.ids[row, :n], top.indices)
        assert torch.allclose(topk.logprobs[row, :n].double(), top.values, atol=1e-5)
        exact_tail = torch.log1p(-top.values.exp().sum(-1))
        assert torch.allclose(topk.tail[row, :n].double(), exact_tail, atol=1e-4)


def test_client_target_top_k_is_aligned_with_score_targets(server, reference) -> None:
    """Row j of a target: the teacher's distribution of target token j, as kdlab.models.scoring.score_targets' logits."""
    from kdlab.data.datamodule import pad
    from kdlab.models.loading import load_model
    from kdlab.models.scoring import score_targets

    tokenizer, _ = reference
    prompts, targets = [[1, 48, 30, 9], [1, 22]], [[57, 61, 12], [5, 600, 33, 2]]
    client = TeacherClient(server.url, top_k=5, api_key=KEY)
    client.check(746)
    got = client.target_top_k(prompts, targets)
    prompt_ids, prompt_mask = pad(prompts, tokenizer.pad_token_id, "left")
    target_ids, target_mask = pad(targets, tokenizer.pad_token_id, "right")
    teacher = load_model(_compose(TEACHER).teacher, tokenizer).eval()
    with torch.no_grad():
        logits = score_targets(teacher, prompt_ids, prompt_mask, target_ids, target_mask)
    want = torch.log_softmax(logits.double(), dim=-1).topk(5)
    assert torch.equal(got.mask, target_mask)
    assert torch.equal(got.ids[target_mask], want.indices[target_mask])
    assert torch.allclose(got.logprobs[target_mask].double(), want.values[target_mask], atol=1e-5)


def test_client_refuses_another_tokenizer(server) -> None:
    with pytest.raises(TeacherServerError, match="vocabulary of 746 tokens, the student 500"):
        TeacherClient(server.url, top_k=4, api_key=KEY).check(500)
    with pytest.raises(TeacherServerError, match="another tokenizer"):
        TeacherClient(server.url, top_k=4, api_key=KEY).check(746, "0000000000000000")


class VllmLikeScorer(TeacherScorer):
    """The same teacher, with a /v1/models card as vLLM's: no vocabulary size, no tokenizer fingerprint."""

    def models(self) -> dict:
        out = super().models()
        del out["data"][0]["kdlab"]
        return out


def test_client_refuses_ids_outside_the_students_vocabulary_from_a_vllm_like_server(server, reference) -> None:
    """Against vLLM nothing is known of the vocabulary at start-up: the ids of each answer are what is checked."""
    scorer = VllmLikeScorer(server.scorer.model, reference[0], "arith-teacher", "unused")
    vllm_like = _serve(TeacherServer(scorer, api_key=KEY, limits=server.limits))
    try:
        client = TeacherClient(vllm_like.url, top_k=4, api_key=KEY)
        client.check(300)  # 286 (" she") is in every top-4 of this teacher; 300 leaves it out
        with pytest.raises(TeacherServerError, match=r"token id \d+, outside the student's vocabulary of 300"):
            client.top_k(SEQUENCES[:1])
    finally:
        vllm_like.shutdown()
        vllm_like.server_close()


def test_client_with_the_wrong_key_says_so(server) -> None:
    with pytest.raises(TeacherServerError, match=f"{server.url} refused the API key"):
        TeacherClient(server.url, top_k=4, api_key="nope", retries=0).check(746)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_client_of_a_server_that_is_down_names_the_url_after_retries() -> None:
    url = f"http://127.0.0.1:{_free_port()}"  # bound and closed: nothing listens
    started = time.monotonic()
    with pytest.raises(TeacherServerError, match=f"{url} failed 3 tries .*is it running"):
        TeacherClient(url, top_k=4, retries=2, backoff=0.05).check(746)
    assert time.monotonic() - started >= 0.05 + 0.1  # backoff 0.05 then 0.1 between the three tries


def test_client_timeout_is_reported() -> None:
    with socket.socket() as listener:  # accepts connections (the kernel's backlog) and never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(TeacherServerError, match=r"failed 2 tries \(no answer within 0.2s\)"):
            TeacherClient(url, top_k=4, timeout=0.2, retries=1, backoff=0.01).check(746)


def test_client_retries_5xx_and_not_4xx() -> None:
    calls = []

    class Flaky(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            calls.append(self.path)
            code = 503 if self.path == "/v1/models" else 400
            body = json.dumps({"error": {"message": f"busy {code}", "type": "x", "code": code}}).encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    flaky = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=flaky.serve_forever, daemon=True).start()
    try:
        client = TeacherClient(f"http://127.0.0.1:{flaky.server_address[1]}", top_k=4, retries=3, backoff=0.01)
        with pytest.raises(TeacherServerError, match="HTTP 503: busy 503"):
            client.check(746)
        assert len(calls) == 4  # one try and three retries
        with pytest.raises(TeacherServerError, match=r"rejected GET /other \(400: busy 400\)"):
            client._request("GET", "/other")
        assert len(calls) == 5  # a 4xx is not retried
    finally:
        flaky.shutdown()
        flaky.server_close()


@pytest.mark.parametrize("entries,message", [
    ([None, {"7": {"logprob": -0.1}}], "returned 1 log-probabilities per token, fewer than top_k=2"),
    ([None, None], "malformed prompt_logprobs entry at position 1"),
    ([None, {"7": {"rank": 1}, "8": {"rank": 2}}], "malformed prompt_logprobs entry at position 1"),
    ([None], "prompt_logprobs of length 1 for a sequence of 2 tokens"),
])
def test_client_names_a_malformed_answer(entries, message) -> None:
    """A server that answers 200 with the wrong content (a proxy, another API) gets one clear line too."""
    class Canned(BaseHTTPRequestHandler):
        def _send(self, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802
            self._send({"object": "list", "data": [{"id": "m", "object": "model"}]})

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            self._send({"choices": [{"index": 0, "prompt_logprobs": entries}]})

        def log_message(self, *args) -> None:
            pass

    canned = ThreadingHTTPServer(("127.0.0.1", 0), Canned)
    threading.Thread(target=canned.serve_forever, daemon=True).start()
    try:
        client = TeacherClient(f"http://127.0.0.1:{canned.server_address[1]}", top_k=2, retries=0)
        assert client.check(746)["id"] == "m"
        with pytest.raises(TeacherServerError, match=re.escape(message)):
            client.top_k([[1, 7]])
    finally:
        canned.shutdown()
        canned.server_close()


def test_the_command_line_server_serves_the_composed_teacher(reference) -> None:
    """`python -m kdlab.teachers.server` (the kdlab-serve-teacher script) composes conf/ and serves."""
    _, log_softmax = reference
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "KDLAB_TEACHER_API_KEY": KEY}
    process = subprocess.Popen([sys.executable, "-m", "kdlab.teachers.server", *TEACHER,
                                f"server.port={port}"], env=env, cwd=Path(REPO), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        client = TeacherClient(f"http://127.0.0.1:{port}", top_k=3, api_key=KEY, retries=0, timeout=5)
        deadline = time.monotonic() + 120  # the start-up imports torch and transformers: seconds on a busy machine
        while True:
            try:
                client.check(746)
                break
            except TeacherServerError:
                assert process.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.5)
        topk = client.top_k([SEQUENCES[1]])
        assert torch.allclose(topk.logprobs[0, :2].double(), log_softmax(SEQUENCES[1])[:2].topk(3).values, atol=1e-5)
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert f"127.0.0.1:{port}/v1" in output
