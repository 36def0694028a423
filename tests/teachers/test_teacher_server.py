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
from contextlib import contextmanager
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from kdlab.run.compose import compose
from kdlab.teachers.client import TeacherClient, TeacherLost, TeacherRefused, TeacherServerError
from kdlab.teachers.server import ServerLimits, TeacherScorer, TeacherServer, build_server
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
    # refused before parsing: a recursion of the JSON decoder, or ~20 bytes of lists per byte of body
    ("deeply nested arrays", b"[" * 4000, 400, "4000 arrays"),
    ("array-heavy", b"[" + b"[]," * 1300 + b"[]]", 400, "1302 arrays"),
    ("deeply nested objects", b'{"a":' * 500 + b"1" + b"}" * 500, 400, "500 objects"),
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


def test_forward_passes_split_to_fit_the_memory_budget_and_answer_as_one(server) -> None:
    """8 prompts of 200 tokens: under a 32 MiB budget they go through the model a few rows at a time, and each row's
    answer is the one it gets in a single pass (float64: padding changes nothing beyond rounding)."""
    scorer = server.scorer
    prompts = [[(11 * i + j) % 700 + 3 for j in range(200 - 9 * i)] for i in range(8)]
    limits = ServerLimits(max_batch=8, max_request_memory=32 * 2**20)
    rows = scorer.rows_per_pass([len(p) for p in prompts], 8, 20000, limits)
    per_row, fixed = scorer.forward_bytes_per_row(200), scorer.answer_bytes([len(p) for p in prompts], 8, 20000)
    assert 1 <= rows < 8 and fixed + rows * per_row <= 32 * 2**20 < fixed + (rows + 1) * per_row
    split, whole = scorer.score(prompts, 8, rows), scorer.score(prompts, 8, 8)
    for a, b in zip(split, whole):
        assert torch.equal(a.top_ids, b.top_ids) and torch.equal(a.rank, b.rank) and a.greedy == b.greedy
        assert torch.allclose(a.top_values, b.top_values, rtol=0, atol=1e-12)
        assert torch.allclose(a.own, b.own, rtol=0, atol=1e-12)


def test_a_request_over_the_memory_budget_is_413_saying_what_fits(server) -> None:
    from kdlab.teachers.server import ApiError

    scorer, limits = server.scorer, ServerLimits(max_batch=64, max_request_memory=32 * 2**20)
    with pytest.raises(ApiError, match=r"a prompt of 512 tokens needs ~.* MiB in one forward pass over a vocabulary "
                                       r"of 746; server.max_request_memory is 32.0 MiB, which fits prompts of at most "
                                       r"(\d+) tokens \(at k = 64\)") as err:
        scorer.rows_per_pass([512], 64, 0, limits)
    fits = int(re.search(r"at most (\d+) tokens", err.value.message).group(1))
    assert err.value.status == 413 and scorer.rows_per_pass([fits], 64, 0, limits) == 1
    with pytest.raises(ApiError, match=f"a prompt of {fits + 1} tokens"):
        scorer.rows_per_pass([fits + 1], 64, 0, limits)
    with pytest.raises(ApiError, match=r"64 prompts of up to 300 tokens at k = 64 need ~.* for their top-k, answer "
                                       r"and one forward pass; server.max_request_memory is 32.0 MiB, which fits "
                                       r"(\d+) such prompts") as err:
        scorer.rows_per_pass([300] * 64, 64, 0, limits)
    most = int(re.search(r"fits (\d+) such", err.value.message).group(1))
    assert 1 <= most < 64 and scorer.rows_per_pass([300] * most, 64, 0, limits) >= 1
    with pytest.raises(ApiError, match=f"fits {most} such prompts"):
        scorer.rows_per_pass([300] * (most + 1), 64, 0, limits)


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

    monkeypatch.setattr(server.scorer, "forward", broken)
    status, out = _post(server.url, "/v1/completions", _request())
    assert status == 500 and "secret" not in json.dumps(out)
    monkeypatch.undo()
    assert _post(server.url, "/v1/completions", _request())[0] == 200


# -- HTTP: every answer JSON, bounded in time and in number ------------------------------------------------------------
@contextmanager
def _served(scorer: TeacherScorer, host: str = "127.0.0.1", **limits) -> Iterator[TeacherServer]:
    """A server of the module's teacher with the module fixture's limits changed by `limits`."""
    base = ServerLimits(max_batch=4, max_tokens_per_sequence=32, max_request_bytes=4096, max_logprobs=16)
    srv = _serve(TeacherServer(scorer, host=host, api_key=KEY, limits=replace(base, **limits)))
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def _exchange(url: str, raw: bytes, timeout: float = 10) -> tuple[int, dict, bytes]:
    """Send raw bytes, read one HTTP answer: (status, headers, body)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as conn:
        conn.sendall(raw)
        response = http.client.HTTPResponse(conn)
        response.begin()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()


@pytest.mark.parametrize("method,path,allowed", [
    ("PUT", "/v1/completions", "POST"), ("GET", "/v1/completions", "POST"), ("POST", "/v1/models", "GET"),
    ("DELETE", "/health", "GET"), ("BREW", "/v1/models", "GET"),
])
def test_a_wrong_method_gets_405_naming_the_right_one(server, method, path, allowed) -> None:
    request = f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 0\r\n\r\n"
    status, headers, body = _exchange(server.url, request.encode())
    error = json.loads(body)["error"]
    assert (status, headers["allow"], error["code"]) == (405, allowed, 405) and f"use {allowed}" in error["message"]


def test_a_query_string_does_not_change_the_route(server) -> None:
    assert _post(server.url, "/health?probe=1", b"GET", key=None) == (200, {})
    assert _post(server.url, "/v1/models?x=y", b"GET")[1]["data"][0]["id"] == "arith-teacher"
    assert _post(server.url, "/v1/completions?x=y", _request(prompt=[[1, 2, 3]]))[0] == 200


@pytest.mark.parametrize("raw,message", [
    (b"NOT HTTP AT ALL\r\n\r\n", "invalid HTTP request"),
    # headers still incomplete past max_header_bytes (16 KiB): h11 bounds what it buffers, so this is refused
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 20000, "invalid HTTP request"),
])
def test_malformed_http_and_oversized_headers_get_a_json_400(server, raw, message) -> None:
    status, headers, body = _exchange(server.url, raw)
    assert status == 400 and headers["content-type"] == "application/json"
    assert message in json.loads(body)["error"]["message"]
    assert _post(server.url, "/health", b"GET", key=None) == (200, {})


def test_answers_do_not_name_the_server_software(server) -> None:
    _, headers, _ = _exchange(server.url, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert "server" not in headers and not any("python" in v.lower() for v in headers.values())


def test_the_ipv6_loopback_serves(server, reference) -> None:
    with _served(server.scorer, host="::1") as v6:
        assert v6.url.startswith("http://[::1]:")
        client = TeacherClient(v6.url, top_k=4, api_key=KEY, retries=0)
        client.check(746)
        got = client.top_k(SEQUENCES[:1])
    want = reference[1](SEQUENCES[0])[:-1].topk(4)
    assert torch.equal(got.ids[0], want.indices)
    assert torch.allclose(got.logprobs[0].double(), want.values, rtol=0, atol=1e-6)  # the client keeps float32


def _closed_by_server(conn: socket.socket, within: float) -> bool:
    conn.settimeout(within)
    try:
        return conn.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_past_max_connections_a_request_gets_503_until_idle_connections_reach_the_header_deadline(server) -> None:
    with _served(server.scorer, max_connections=4, header_timeout=1.0) as srv:
        host, port = srv.server_address
        idle = [socket.create_connection((host, port)) for _ in range(4)]  # connected, sending nothing
        try:
            status, out = _post(srv.url, "/v1/completions", _request(prompt=[[1, 2, 3]]))
            assert status == 503 and "5 connections open, at most 4 (server.max_connections)" in out["error"]["message"]
            started = time.monotonic()
            assert all(_closed_by_server(conn, within=5) for conn in idle)
            assert time.monotonic() - started < 2.0  # 1 s after they connected, not at some later sweep
            assert _post(srv.url, "/v1/completions", _request(prompt=[[1, 2, 3]]))[0] == 200
        finally:
            for conn in idle:
                conn.close()


def test_a_slow_body_gets_408_and_a_request_waiting_past_queue_timeout_gets_503(server) -> None:
    """One turn (max_requests_in_flight=1), held by a body that never completes: the next completion waits
    queue_timeout (0.3 s) and gets 503, which the client retries; the slow one gets 408 at body_timeout (1 s)."""
    with _served(server.scorer, max_requests_in_flight=1, body_timeout=1.0, queue_timeout=0.3) as srv:
        host, port = srv.server_address
        with socket.create_connection((host, port), timeout=10) as slow:
            slow.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                         f"Content-Length: 100\r\n\r\n{{".encode())
            started = time.monotonic()
            status, out = _post(srv.url, "/v1/completions", _request(prompt=[[1, 2, 3]]))
            waited = time.monotonic() - started
            assert status == 503 and "server.queue_timeout" in out["error"]["message"] and 0.3 <= waited < 0.9
            response = http.client.HTTPResponse(slow)
            response.begin()
            assert response.status == 408 and "server.body_timeout" in json.loads(response.read())["error"]["message"]
        assert _post(srv.url, "/v1/completions", _request(prompt=[[1, 2, 3]]))[0] == 200  # the turn is free again


def test_a_client_that_leaves_its_answer_unread_is_dropped_and_frees_its_turn(server) -> None:
    """A ~20 MB answer to a client that reads nothing: after write_timeout (0.5 s) of no progress the connection is
    dropped (the answer arrives cut short), and the one turn serves the next request."""
    prompts = [[(7 * i + j) % 700 + 3 for j in range(200)] for i in range(20)]
    raw = json.dumps(_request(k=64, prompt=prompts)).encode()
    with _served(server.scorer, max_requests_in_flight=1, write_timeout=0.5, max_batch=20, max_logprobs=64,
                 max_tokens_per_sequence=512, max_request_bytes=2**20) as srv:
        host, port = srv.server_address
        with socket.socket() as stalled:
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stalled.connect((host, port))
            stalled.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                            f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
            assert _post(srv.url, "/v1/completions", _request(prompt=[[1, 2, 3]]))[0] == 200  # after the drop
            received = b""
            stalled.settimeout(10)
            try:
                while chunk := stalled.recv(2**20):
                    received += chunk
            except ConnectionResetError:
                pass
    assert received.startswith(b"HTTP/1.1 200") and not received.endswith(b"0\r\n\r\n")  # cut before its end
    assert 0 < len(received) < 15 * 2**20


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
    """Row j of a target: the teacher's distribution of target token j, as kdlab.models.scoring.score_targets'
    logits."""
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


def test_client_leaves_room_for_the_token_a_vllm_like_server_generates(server, reference) -> None:
    """vLLM generates at least one token per request and counts it against max_model_len (checked against the real
    server in tests/teachers/test_vllm_serve.py): a server without kdlab's card is asked for one token, so rows of
    max_model_len tokens are refused before any request; kdlab's own server is asked for none and takes them."""
    vllm_like = VllmLikeScorer(server.scorer.model, reference[0], "arith-teacher", "unused")
    for scorer, longest in ((vllm_like, 511), (server.scorer, 512)):
        with _served(scorer, max_tokens_per_sequence=600, max_request_bytes=8192) as srv:
            assert TeacherClient(srv.url, top_k=4, api_key=KEY, retries=0).check(746, longest=longest)
    with _served(vllm_like, max_tokens_per_sequence=600) as srv:
        with pytest.raises(TeacherRefused, match=r"max_model_len 512, and this run's sequences reach 512 tokens plus "
                                                 r"the 1 it generates per request: .*--max-model-len <longest \+ 1>"):
            TeacherClient(srv.url, top_k=4, api_key=KEY, retries=0).check(746, longest=512)


def test_client_with_the_wrong_key_says_so(server) -> None:
    with pytest.raises(TeacherRefused, match=f"{server.url} refused the API key"):
        TeacherClient(server.url, top_k=4, api_key="nope", retries=0).check(746)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_client_of_a_server_that_is_down_names_the_url_after_retries() -> None:
    url = f"http://127.0.0.1:{_free_port()}"  # bound and closed: nothing listens
    started = time.monotonic()
    with pytest.raises(TeacherLost, match=f"{url} failed 3 tries .*is it running"):
        TeacherClient(url, top_k=4, retries=2, backoff=0.05).check(746)
    assert time.monotonic() - started >= 0.05 + 0.1  # backoff 0.05 then 0.1 between the three tries


def test_client_timeout_is_reported() -> None:
    with socket.socket() as listener:  # accepts connections (the kernel's backlog) and never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(TeacherLost, match=r"failed 2 tries \(no answer within 0.2s\)"):
            TeacherClient(url, top_k=4, timeout=0.2, retries=1, backoff=0.01).check(746)


@contextmanager
def _canned(answer) -> Iterator[tuple[str, list]]:
    """A plain HTTP server whose every request gets `answer(path) -> (status, body bytes, headers)`; yields its URL
    and the (method, path, Authorization) of each request it saw."""
    seen = []

    class Canned(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            seen.append((self.command, self.path, self.headers.get("Authorization")))
            if self.headers.get("Content-Length"):
                self.rfile.read(int(self.headers["Content-Length"]))
            status, body, headers = answer(self.path)
            self.send_response(status)
            for name, value in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer  # noqa: N815

        def log_message(self, *args) -> None:
            pass

    canned = ThreadingHTTPServer(("127.0.0.1", 0), Canned)
    threading.Thread(target=canned.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{canned.server_address[1]}", seen
    finally:
        canned.shutdown()
        canned.server_close()


def _error(code: int, message: str) -> tuple[int, bytes, dict]:
    return code, json.dumps({"error": {"message": message, "type": "x", "code": code}}).encode(), {}


@pytest.mark.parametrize("code,kind,tries", [
    (500, TeacherLost, 4), (503, TeacherLost, 4), (408, TeacherLost, 4), (429, TeacherLost, 4),
    (400, TeacherRefused, 1), (404, TeacherRefused, 1), (413, TeacherRefused, 1), (401, TeacherRefused, 1),
    (403, TeacherRefused, 1),
])
def test_client_retries_then_reports_a_lost_server_and_stops_at_once_on_a_refusal(code, kind, tries) -> None:
    """5xx, 408 and 429 may pass: retried, then TeacherLost (the run checkpoints). Other 4xx would come back the same:
    one try, TeacherRefused with the server's message."""
    with _canned(lambda path: _error(code, f"answer {code}")) as (url, seen):
        client = TeacherClient(url, top_k=4, retries=3, backoff=0.01)
        with pytest.raises(kind, match=f"answer {code}") as err:
            client.check(746)
        assert len(seen) == tries and type(err.value) is kind
        if kind is TeacherRefused:
            assert err.value.status == code and err.value.server_message == f"answer {code}"


def test_client_never_follows_a_redirect_and_never_sends_the_key_elsewhere() -> None:
    with _canned(lambda path: (200, b"{}", {})) as (elsewhere, seen_elsewhere):
        moved = lambda path: (307, b"", {"Location": elsewhere + path})  # noqa: E731
        with _canned(moved) as (url, seen):
            with pytest.raises(TeacherRefused, match=f"redirects /v1/models \\(307\\) to {elsewhere}/v1/models; "
                                                     f"set teacher.url"):
                TeacherClient(url, top_k=4, api_key=KEY, retries=2).check(746)
    assert seen == [("GET", "/v1/models", f"Bearer {KEY}")] and seen_elsewhere == []


@pytest.mark.parametrize("url,key,allow,refused", [
    ("http://10.1.2.3:8000", KEY, False, True),
    ("http://teacher.example.org:8000", KEY, False, True),
    ("http://10.1.2.3:8000", KEY, True, False),  # teacher.allow_insecure_key=true
    ("http://10.1.2.3:8000", None, False, False),  # no key to leak
    ("https://10.1.2.3:8000", KEY, False, False),
    ("http://localhost:8000", KEY, False, False),
    ("http://127.0.0.2:8000", KEY, False, False),
    ("http://[::1]:8000", KEY, False, False),
])
def test_client_refuses_to_send_the_key_over_plain_http_to_another_machine(url, key, allow, refused) -> None:
    make = lambda: TeacherClient(url, top_k=4, api_key=key, allow_insecure_key=allow)  # noqa: E731
    if refused:
        with pytest.raises(TeacherServerError, match=r"plain HTTP to another machine.*teacher.allow_insecure_key=true"):
            make()
    else:
        assert make().url == url  # nothing is sent at construction


def test_client_names_a_url_that_is_not_http() -> None:
    with pytest.raises(TeacherServerError, match="teacher.url 127.0.0.1:8000 must start with http:// or https://"):
        TeacherClient("127.0.0.1:8000", top_k=4)


@pytest.mark.parametrize("body,message", [
    ({"error": {"message": "nested"}}, "nested"),  # OpenAI, vLLM
    ({"message": "top level", "type": "BadRequestError", "code": 400}, "top level"),  # vLLM in some versions
    ({"error": "a string"}, "a string"),
    ({"detail": "Not Found"}, "Not Found"),  # FastAPI's own errors
    ("not json", "Bad Request"),  # the HTTP reason
])
def test_client_reads_the_servers_message_in_every_shape(body, message) -> None:
    raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    with _canned(lambda path: (400, raw, {})) as (url, _):
        with pytest.raises(TeacherRefused) as err:
            TeacherClient(url, top_k=4, retries=0).check(746)
    assert err.value.server_message == message and f"(400: {message})" in str(err.value)


def test_check_asks_the_runs_k_and_length_and_a_refusal_says_the_servers_message_and_the_fix(server) -> None:
    """At start-up: k above server.max_logprobs (16 here), sequences over server.max_tokens_per_sequence (32) or the
    card's max_model_len stop the run with the server's words and what to change on either side."""
    client = lambda k: TeacherClient(server.url, top_k=k, api_key=KEY, retries=0)  # noqa: E731
    assert client(16).check(746, longest=32)["id"] == "arith-teacher"
    with pytest.raises(TeacherRefused, match=r"prompt_logprobs must be an integer in \[0, 16\] \(server.max_logprobs\)"
                                             r", got 17\): lower teacher.top_k, .*vllm serve --max-logprobs"):
        client(17).check(746, longest=8)
    with pytest.raises(TeacherRefused, match=r"prompt 0 has 33 tokens; at most 32 .*: shorten the run's sequences "
                                             r"\(task.max_prompt_tokens"):
        client(4).check(746, longest=33)
    with pytest.raises(TeacherRefused, match=r"max_model_len 512, and this run's sequences reach 600 tokens"):
        client(4).check(746, longest=600)  # from the card, before any request


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
