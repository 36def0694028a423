"""`kdlab-serve-teacher`: a teacher's top-k log-probabilities over HTTP, in vLLM's OpenAI-compatible dialect.

    kdlab-serve-teacher teacher=arith_teacher server.port=8000 [server.api_key=...] [server.host=0.0.0.0]

It implements the subset of `vllm serve` that kdlab's client uses, with the same request and response shapes, so a
GPU machine can run `vllm serve <teacher> --max-logprobs <k>` instead and nothing else changes:

    POST /v1/completions {"model": name, "prompt": [[ids...], ...] or [ids...], "max_tokens": 0 or 1,
                          "prompt_logprobs": k}
      -> {"id", "object": "text_completion", "created", "model", "usage": {...},
          "choices": [{"index": i, "text", "logprobs": null, "finish_reason": "length", "prompt_token_ids": [...],
                       "prompt_logprobs": [null, {"<id>": {"logprob", "rank", "decoded_token"}, ...}, ...]}]}
    GET /v1/models -> {"object": "list", "data": [{"id", "object": "model", "max_model_len", ...,
                                                  "kdlab": {"vocab_size", "tokenizer_fingerprint"}}]}
    GET /health -> 200

`prompt_logprobs[t]` is the distribution of token t given tokens 0..t-1: None at t = 0, then the top-k entries
plus the prompt's own token t (ranked 1 = most likely over the whole vocabulary), as vLLM returns them. With
max_tokens = 1 the greedy next token is returned as `text` (vLLM samples one; kdlab's client ignores it).

It is safe to leave running: it binds 127.0.0.1 unless told otherwise, checks `Authorization: Bearer <key>` when a
key is set, bounds the body size, the sequences per request and their length, reads nothing but JSON, answers every
bad request with a 4xx and an OpenAI-style `{"error": {"message", "type", "code"}}`, and never sends a traceback.
"""

from __future__ import annotations

import hmac
import json
import math
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from torch import Tensor

LOGPROB_FLOOR = -9999.0  # JSON has no -inf; vLLM sends this for impossible tokens


class ApiError(Exception):
    """A request the server refuses: HTTP status, a one-line message and an OpenAI-style error type."""

    def __init__(self, status: int, message: str, kind: str = "BadRequestError"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for (conf/server/default.yaml): bounds on memory and time per request."""

    max_batch: int = 64  # sequences per request (and per forward pass)
    max_tokens_per_sequence: int = 2048
    max_request_bytes: int = 8 * 2**20
    max_logprobs: int = 64  # the largest k (vLLM: --max-logprobs)


class TeacherScorer:
    """A causal teacher and its tokenizer: batched forward passes and the prompt log-probabilities vLLM returns."""

    def __init__(self, model: torch.nn.Module, tokenizer, model_name: str, tokenizer_fingerprint: str):
        if getattr(model.config, "is_encoder_decoder", False):
            raise ValueError("kdlab-serve-teacher serves decoder-only teachers (prompt_logprobs read one sequence)")
        self.model = model.eval().requires_grad_(False)
        self.model_name = model_name
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.max_model_len = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        # decoded once: per-entry decoding would dominate a request's time
        self.decoded = [tokenizer.decode([i]) for i in range(self.vocab_size)]
        self.device = next(model.parameters()).device
        self.lock = threading.Lock()  # one forward at a time: threads share the model and its memory

    @torch.no_grad()
    def log_probs(self, sequences: list[list[int]]) -> list[Tensor]:
        """Per sequence, (length, vocab) log-softmax in float32 or wider: row t is the distribution of token t + 1."""
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):  # right padding: real tokens keep positions 0..len-1
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        with self.lock:
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                use_cache=False).logits
        logprobs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1).cpu()
        return [logprobs[row, : len(seq)] for row, seq in enumerate(sequences)]

    def prompt_logprobs(self, sequence: list[int], logprobs: Tensor, k: int) -> list[dict[str, dict] | None]:
        """vLLM's `prompt_logprobs` of one sequence: None, then per token its own entry and the top-k."""
        out: list[dict[str, dict] | None] = [None]
        if len(sequence) < 2:
            return out
        rows = logprobs[:-1]  # row t - 1 predicts token t
        targets = torch.tensor(sequence[1:], dtype=torch.long)
        own = rows.gather(1, targets[:, None]).squeeze(1)
        own_rank = (rows > own[:, None]).sum(dim=1) + 1
        top_values, top_ids = rows.topk(k, dim=1) if k > 0 else (rows[:, :0], targets[:, None][:, :0])
        for t in range(rows.shape[0]):
            entry = {str(sequence[t + 1]): self._entry(own[t].item(), own_rank[t].item(), sequence[t + 1])}
            for j, (value, token) in enumerate(zip(top_values[t].tolist(), top_ids[t].tolist())):
                entry.setdefault(str(token), self._entry(value, j + 1, token))
            out.append(entry)
        return out

    def _entry(self, logprob: float, rank: int, token: int) -> dict[str, Any]:
        value = logprob if math.isfinite(logprob) else LOGPROB_FLOOR
        return {"logprob": value, "rank": int(rank), "decoded_token": self.decoded[token]}

    def models(self) -> dict[str, Any]:
        card = {"id": self.model_name, "object": "model", "created": int(time.time()), "owned_by": "kdlab",
                "root": self.model_name, "parent": None, "max_model_len": self.max_model_len,
                "kdlab": {"vocab_size": self.vocab_size, "tokenizer_fingerprint": self.tokenizer_fingerprint}}
        return {"object": "list", "data": [card]}


def parse_completion_request(body: dict[str, Any], scorer: TeacherScorer, limits: ServerLimits) -> tuple:
    """(sequences, k, max_tokens) from a completions request, or ApiError naming what is wrong."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if body.get("model") != scorer.model_name:
        raise ApiError(404, f"The model `{body.get('model')}` does not exist (this server has "
                            f"`{scorer.model_name}`).", "NotFoundError")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(_is_id(x) for x in prompt):
        prompt = [prompt]
    if not (isinstance(prompt, list) and prompt and all(isinstance(s, list) and s for s in prompt)):
        raise ApiError(400, "prompt must be a non-empty list of token ids or a list of such lists "
                            "(this server takes token ids, not text)")
    if len(prompt) > limits.max_batch:
        raise ApiError(400, f"{len(prompt)} prompts in one request; at most {limits.max_batch} (server.max_batch)")
    longest = min(limits.max_tokens_per_sequence, scorer.max_model_len or limits.max_tokens_per_sequence)
    for index, seq in enumerate(prompt):
        if len(seq) > longest:
            raise ApiError(400, f"prompt {index} has {len(seq)} tokens; at most {longest} "
                                f"(server.max_tokens_per_sequence, and the model's max_model_len)")
        bad = next((x for x in seq if not (_is_id(x) and 0 <= x < scorer.vocab_size)), None)
        if bad is not None or not all(_is_id(x) for x in seq):
            raise ApiError(400, f"prompt {index} holds {bad!r}, not a token id in [0, {scorer.vocab_size})")
    k = body.get("prompt_logprobs")
    if not (_is_id(k) and 0 <= k <= limits.max_logprobs):
        raise ApiError(400, f"prompt_logprobs must be an integer in [0, {limits.max_logprobs}], got {k!r}")
    max_tokens = body.get("max_tokens", 1)
    if max_tokens not in (0, 1) or isinstance(max_tokens, bool):
        raise ApiError(400, f"max_tokens must be 0 or 1 (this server scores prompts), got {max_tokens!r}")
    if body.get("stream"):
        raise ApiError(400, "stream is not supported with prompt_logprobs")
    return prompt, k, max_tokens


def _is_id(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def complete(body: dict[str, Any], scorer: TeacherScorer, limits: ServerLimits) -> dict[str, Any]:
    """The completions response for a valid request: forward passes of up to max_batch sequences."""
    sequences, k, max_tokens = parse_completion_request(body, scorer, limits)
    choices = []
    for start in range(0, len(sequences), limits.max_batch):
        group = sequences[start : start + limits.max_batch]
        for offset, (seq, logprobs) in enumerate(zip(group, scorer.log_probs(group))):
            text = scorer.decoded[int(logprobs[-1].argmax())] if max_tokens else ""
            choices.append({"index": start + offset, "text": text, "logprobs": None, "finish_reason": "length",
                            "stop_reason": None, "prompt_token_ids": seq,
                            "prompt_logprobs": scorer.prompt_logprobs(seq, logprobs, k)})
    prompt_tokens = sum(len(s) for s in sequences)
    completion_tokens = max_tokens * len(sequences)
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": scorer.model_name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


class TeacherHandler(BaseHTTPRequestHandler):
    """Routes, authentication, body limits and error responses; the scoring itself is `complete`."""

    server: "TeacherServer"
    server_version = "kdlab-teacher"
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._answer(lambda: self._get())

    def do_POST(self) -> None:  # noqa: N802
        self._answer(lambda: self._post())

    def _get(self) -> dict[str, Any]:
        if self.path == "/health":
            return {}
        self._authorize()
        if self.path == "/v1/models":
            return self.server.scorer.models()
        raise ApiError(404, f"no route {self.path}; this server answers /v1/completions and /v1/models",
                       "NotFoundError")

    def _post(self) -> dict[str, Any]:
        self._authorize()
        if self.path != "/v1/completions":
            raise ApiError(404, f"no route {self.path}; POST /v1/completions", "NotFoundError")
        return complete(self._read_json(), self.server.scorer, self.server.limits)

    def _authorize(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer <key>)", "AuthenticationError")

    def _read_json(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "Content-Length is required")
        if not length.isdigit():
            raise ApiError(400, f"bad Content-Length {length!r}")
        if int(length) > self.server.limits.max_request_bytes:
            raise ApiError(413, f"request body of {int(length)} bytes; at most "
                                f"{self.server.limits.max_request_bytes} (server.max_request_bytes)")
        raw = self.rfile.read(int(length))
        try:
            return json.loads(raw, parse_constant=_refuse_constant)
        except (ValueError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the body is not valid JSON: {err}") from None

    def _answer(self, handle) -> None:
        try:
            status, payload = 200, handle()
        except ApiError as err:
            status, payload = err.status, {"error": {"message": err.message, "type": err.kind, "param": None,
                                                     "code": err.status}}
        except Exception:  # a bug must not kill the server or leak a traceback to the caller: log it here
            traceback.print_exc(file=sys.stderr)
            status, payload = 500, {"error": {"message": "internal server error (logged by the server)",
                                              "type": "InternalServerError", "param": None, "code": 500}}
        body = json.dumps(payload).encode()
        if status >= 400:  # the unread rest of a refused body would be parsed as the next request
            self.close_connection = True
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        if self.server.verbose:
            super().log_message(format, *args)


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


class TeacherServer(ThreadingHTTPServer):
    """A threaded HTTP server holding one scorer; threads are daemons so a stopped server never hangs the exit."""

    daemon_threads = True

    def __init__(self, scorer: TeacherScorer, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
                 limits: ServerLimits = ServerLimits(), verbose: bool = False):
        super().__init__((host, port), TeacherHandler)
        self.scorer, self.api_key, self.limits, self.verbose = scorer, api_key, limits, verbose

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def build_server(cfg) -> TeacherServer:
    """Load the teacher named by the composed config and wrap it in a server (not yet serving)."""
    from kdlab.models.loading import load_model, load_tokenizer
    from kdlab.teachers.fingerprint import tokenizer_fingerprint

    s = cfg.server
    tokenizer = load_tokenizer(cfg.teacher)
    model = load_model(cfg.teacher, tokenizer)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if s.device == "auto" else s.device
    scorer = TeacherScorer(model.to(device), tokenizer, str(s.model_name), tokenizer_fingerprint(tokenizer))
    limits = ServerLimits(int(s.max_batch), int(s.max_tokens_per_sequence), int(s.max_request_bytes),
                          int(s.max_logprobs))
    api_key = None if s.api_key in (None, "") else str(s.api_key)
    if s.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"warning: serving on {s.host} without an API key: anyone who reaches the port can use the teacher "
              f"(set server.api_key or KDLAB_TEACHER_API_KEY)", file=sys.stderr)
    return TeacherServer(scorer, str(s.host), int(s.port), api_key, limits, bool(s.verbose))


def serve(cfg) -> None:
    server = build_server(cfg)
    print(f"kdlab-serve-teacher: {server.scorer.model_name} (vocabulary {server.scorer.vocab_size}) at "
          f"{server.url}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main() -> None:
    """Console entry point: Hydra composes conf/serve_teacher.yaml (train.yaml plus the `server` group)."""
    from kdlab.teachers.entry import hydra_entry

    hydra_entry("serve_teacher", serve)


if __name__ == "__main__":
    main()
