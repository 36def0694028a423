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

Scoring lives here (`TeacherScorer`, `parse_completion_request`, the memory plan); the HTTP side, built on uvicorn
with the limits that make the server safe to leave running, is `kdlab.teachers.server_http`.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

LOGPROB_FLOOR = -9999.0  # JSON has no -inf; vLLM sends this for impossible tokens
POSITION_CHUNK = 128  # positions whose log-softmax over the vocabulary is held at once
PARSED_BYTES_PER_TOKEN = 40  # a parsed token id: a Python int (28-32 bytes) and its list slot (8)
MIB = 2**20


class ApiError(Exception):
    """A request the server refuses: HTTP status, a one-line message and an OpenAI-style error type."""

    def __init__(self, status: int, message: str, kind: str = "BadRequestError", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}


@dataclass(frozen=True)
class ServerLimits:
    """What clients may take (conf/server/default.yaml): per request, memory and time; in all, connections."""

    max_batch: int = 64  # sequences per request (and per forward pass)
    max_tokens_per_sequence: int = 2048
    max_request_bytes: int = 8 * 2**20
    max_logprobs: int = 64  # the largest k (vLLM: --max-logprobs)
    max_request_memory: int = 4 * 2**30  # bytes one request may use: forward passes, top-k, its answer
    max_requests_in_flight: int = 2  # completions being read, scored or answered at once; the rest wait
    queue_timeout: float = 300.0  # seconds a completion may wait for its turn, then 503
    max_connections: int = 1024  # open connections; a request on one past it gets 503
    backlog: int = 2048  # connections the kernel queues before they are accepted
    header_timeout: float = 10.0  # seconds from connect (or the previous answer) to complete request headers
    body_timeout: float = 60.0  # seconds to receive a body once its request's turn has come
    write_timeout: float = 60.0  # seconds a client may leave an answer unread before its connection is dropped
    keep_alive_timeout: float = 5.0  # seconds an idle connection is kept between requests
    max_header_bytes: int = 16384  # request line and headers


@dataclass
class Scored:
    """One sequence's answer before it becomes JSON: per position t >= 1, its own token's log-probability and rank,
    and the top-k (values, ids) of the distribution that predicts it; the greedy next token after the sequence."""

    own: Tensor  # (n - 1,)
    rank: Tensor  # (n - 1,) int64
    top_values: Tensor  # (n - 1, k)
    top_ids: Tensor  # (n - 1, k) int64
    greedy: int


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
        self.decoded_json = [json.dumps(text) for text in self.decoded]
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.logprob_dtype = torch.promote_types(self.dtype, torch.float32)
        self.lock = threading.Lock()  # one forward at a time: threads share the model and its memory
        # the longest text one prompt_logprobs entry can take (id, rank, a 24-character float, the token), for the
        # memory plan
        digits, longest_token = len(str(self.vocab_size)), max(len(text) for text in self.decoded_json)
        self.entry_bytes = len('"": {"logprob": , "rank": , "decoded_token": }, ') + 2 * digits + 24 + longest_token

    # -- memory ------------------------------------------------------------------------------------------------------
    def forward_bytes_per_row(self, width: int) -> int:
        """Bytes one row of `width` tokens takes in a forward pass: its logits over the vocabulary, and the model's
        activations (hidden states, MLP, eager attention scores), an upper estimate from the model's config."""
        config = self.model.config
        hidden = int(getattr(config, "hidden_size", 0) or 0)
        inner = int(getattr(config, "intermediate_size", 0) or 4 * hidden)
        heads = int(getattr(config, "num_attention_heads", 0) or 0)
        activations = 4 * hidden + 2 * inner + 2 * heads * width  # per token: hidden states, MLP, attention scores
        return width * self.dtype.itemsize * (self.vocab_size + activations)

    def answer_bytes(self, lengths: list[int], k: int, body_bytes: int) -> int:
        """Bytes a request holds besides its forward passes: the body and its parsed ids, every position's top-k,
        one chunk of log-softmax at a time, and one sequence's JSON at a time (its pieces, the text, the bytes)."""
        width, positions = max(lengths), sum(lengths)
        logprob_bytes = self.logprob_dtype.itemsize
        return (2 * body_bytes + positions * PARSED_BYTES_PER_TOKEN
                + positions * (k + 2) * (logprob_bytes + 8)
                + min(width, POSITION_CHUNK) * self.vocab_size * (2 * logprob_bytes + 1)
                + 3 * width * (k + 1) * self.entry_bytes)

    def rows_per_pass(self, lengths: list[int], k: int, body_bytes: int, limits: ServerLimits) -> int:
        """How many sequences go through the model at once within `limits.max_request_memory`, or a 413 that says
        what fits: a shorter prompt when one alone does not, else fewer prompts per request."""
        budget, width = limits.max_request_memory, max(lengths)
        need = lambda n, w, body: self.answer_bytes([w] * n, k, body) + self.forward_bytes_per_row(w)  # noqa: E731
        if need(1, width, 0) > budget:
            fits = _most(lambda w: need(1, w, 0) <= budget, width)
            raise ApiError(413, f"a prompt of {width} tokens needs ~{_mib(need(1, width, 0))} in one forward pass over "
                                f"a vocabulary of {self.vocab_size}; server.max_request_memory is {_mib(budget)}, "
                                f"which fits prompts of at most {fits} tokens (at k = {k}): send shorter prompts",
                           "RequestTooLargeError")
        fixed = self.answer_bytes(lengths, k, body_bytes)
        if fixed + self.forward_bytes_per_row(width) > budget:
            fits = _most(lambda n: need(n, width, body_bytes) <= budget, len(lengths))
            raise ApiError(413, f"{len(lengths)} prompts of up to {width} tokens at k = {k} need "
                                f"~{_mib(fixed + self.forward_bytes_per_row(width))} for their top-k, answer and one "
                                f"forward pass; server.max_request_memory is {_mib(budget)}, which fits {fits} such "
                                f"prompts: send fewer prompts per request or a smaller k", "RequestTooLargeError")
        return int(min((budget - fixed) // self.forward_bytes_per_row(width), limits.max_batch))

    # -- scoring ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, sequences: list[list[int]]) -> Tensor:
        """(rows, longest, vocab) logits of right-padded sequences: real tokens keep positions 0..len-1."""
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        with self.lock:
            return self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                              use_cache=False).logits

    @torch.no_grad()
    def score(self, sequences: list[list[int]], k: int, rows_per_pass: int) -> list[Scored]:
        """Each sequence's own-token log-probabilities, ranks and top-k, in forward passes of `rows_per_pass` rows.
        The log-softmax runs in float32 or the model's wider dtype, POSITION_CHUNK positions at a time, so a large
        vocabulary never holds more than one chunk of it beside the logits."""
        out: list[Scored] = []
        for start in range(0, len(sequences), rows_per_pass):
            group = sequences[start : start + rows_per_pass]
            logits = self.forward(group)
            for row, seq in enumerate(group):
                out.append(self._score_row(logits[row], seq, k))
            del logits
        return out

    def _score_row(self, logits: Tensor, seq: list[int], k: int) -> Scored:
        n = len(seq)
        targets = torch.tensor(seq[1:], dtype=torch.long, device=logits.device)
        own, rank, values, ids = [], [], [], []
        for start in range(0, n - 1, POSITION_CHUNK):  # row t - 1 predicts token t
            stop = min(start + POSITION_CHUNK, n - 1)
            lp = torch.log_softmax(logits[start:stop].to(self.logprob_dtype), dim=-1)
            chunk_own = lp.gather(1, targets[start:stop, None]).squeeze(1)
            own.append(chunk_own)
            rank.append((lp > chunk_own[:, None]).sum(dim=1) + 1)
            top = lp.topk(k, dim=1)
            values.append(top.values)
            ids.append(top.indices)
            del lp
        empty = torch.zeros(0, device=logits.device)
        cat = (lambda parts, like: torch.cat(parts).cpu() if parts else like.cpu())  # noqa: E731
        return Scored(own=cat(own, empty.to(self.logprob_dtype)), rank=cat(rank, empty.long()),
                      top_values=cat(values, empty.to(self.logprob_dtype).reshape(0, k)),
                      top_ids=cat(ids, empty.long().reshape(0, k)), greedy=int(logits[n - 1].argmax()))

    def choice_json(self, index: int, seq: list[int], scored: Scored, max_tokens: int) -> bytes:
        """One choice of the completions answer, written as text directly: a dict per entry would take several
        times the answer's size in Python objects (the issue's 157 MB answer took 1.2 GB that way)."""
        text = self.decoded_json[scored.greedy] if max_tokens else '""'
        parts = [f'{{"index": {index}, "text": {text}, "logprobs": null, "finish_reason": "length", '
                 f'"stop_reason": null, "prompt_token_ids": {json.dumps(seq)}, "prompt_logprobs": [null']
        finite = (lambda t: torch.nan_to_num(t.double(), nan=LOGPROB_FLOOR, neginf=LOGPROB_FLOOR,  # noqa: E731
                                             posinf=LOGPROB_FLOOR).tolist())
        own, values = finite(scored.own), finite(scored.top_values)
        ranks, ids = scored.rank.tolist(), scored.top_ids.tolist()
        names = self.decoded_json
        for t, token in enumerate(seq[1:]):
            items = [f'"{token}": {{"logprob": {own[t]!r}, "rank": {ranks[t]}, "decoded_token": {names[token]}}}']
            for j, (value, top) in enumerate(zip(values[t], ids[t])):
                if top != token:
                    items.append(f'"{top}": {{"logprob": {value!r}, "rank": {j + 1}, "decoded_token": {names[top]}}}')
            parts.append("{" + ", ".join(items) + "}")
        return (", ".join(parts) + "]}").encode()

    def models(self) -> dict[str, Any]:
        card = {"id": self.model_name, "object": "model", "created": int(time.time()), "owned_by": "kdlab",
                "root": self.model_name, "parent": None, "max_model_len": self.max_model_len,
                "kdlab": {"vocab_size": self.vocab_size, "tokenizer_fingerprint": self.tokenizer_fingerprint}}
        return {"object": "list", "data": [card]}


def _most(fits, upper: int) -> int:
    """The largest n in [0, upper] with fits(n), for a monotone `fits` (binary search)."""
    low, high = 0, upper
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def _mib(n: int) -> str:
    return f"{n / MIB:,.1f} MiB"


def parse_body(raw: bytes, limits: ServerLimits) -> Any:
    """The JSON of a body, refusing what no completions request holds before parsing it: deeply nested or
    array-heavy bodies (`[[[[...` recurses; `[[],[],...` of 8 MiB is ~180 MB of lists) and NaN/Infinity."""
    arrays, objects = raw.count(b"["), raw.count(b"{")
    if arrays > limits.max_batch + 16 or objects > 64:
        raise ApiError(400, f"the body holds {arrays} arrays and {objects} objects; a completions request holds one "
                            f"array per prompt (at most server.max_batch = {limits.max_batch}) and a few more")
    try:
        return json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise ApiError(400, "the body is nested too deeply to be a completions request") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the body is not valid JSON: {err}") from None


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def parse_completion_request(body: dict[str, Any], scorer: TeacherScorer, limits: ServerLimits) -> tuple:
    """(sequences, k, max_tokens) from a completions request, or ApiError naming what is wrong."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if body.get("model") != scorer.model_name:
        raise ApiError(404, f"The model `{str(body.get('model'))[:100]}` does not exist (this server has "
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
            raise ApiError(400, f"prompt {index} holds {str(bad)[:40]}, not a token id in [0, {scorer.vocab_size})")
    k = body.get("prompt_logprobs")
    if not (_is_id(k) and 0 <= k <= limits.max_logprobs):
        raise ApiError(400, f"prompt_logprobs must be an integer in [0, {limits.max_logprobs}] "
                            f"(server.max_logprobs), got {str(k)[:40]}")
    max_tokens = body.get("max_tokens", 1)
    if max_tokens not in (0, 1) or isinstance(max_tokens, bool):
        raise ApiError(400, f"max_tokens must be 0 or 1 (this server scores prompts), got {str(max_tokens)[:40]}")
    if body.get("stream"):
        raise ApiError(400, "stream is not supported with prompt_logprobs")
    return prompt, k, max_tokens


def _is_id(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def completion_head(scorer: TeacherScorer) -> bytes:
    return (f'{{"id": "cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": {int(time.time())}, '
            f'"model": {json.dumps(scorer.model_name)}, "choices": [').encode()


def completion_tail(sequences: list[list[int]], max_tokens: int) -> bytes:
    prompt_tokens = sum(len(s) for s in sequences)
    completion_tokens = max_tokens * len(sequences)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    return f'], "usage": {json.dumps(usage)}}}'.encode()


def build_server(cfg):
    """Load the teacher named by the composed config and wrap it in a server (bound, not yet serving)."""
    from kdlab.models.loading import load_model, load_tokenizer
    from kdlab.teachers.fingerprint import tokenizer_fingerprint
    from kdlab.teachers.server_http import TeacherServer

    s = cfg.server
    tokenizer = load_tokenizer(cfg.teacher)
    model = load_model(cfg.teacher, tokenizer)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if s.device == "auto" else s.device
    scorer = TeacherScorer(model.to(device), tokenizer, str(s.model_name), tokenizer_fingerprint(tokenizer))
    limits = limits_from_config(s)
    api_key = None if s.api_key in (None, "") else str(s.api_key)
    if s.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"warning: serving on {s.host} without an API key: anyone who reaches the port can use the teacher "
              f"(set server.api_key or KDLAB_TEACHER_API_KEY)", file=sys.stderr)
    longest = min(limits.max_tokens_per_sequence, scorer.max_model_len or limits.max_tokens_per_sequence)
    try:
        scorer.rows_per_pass([longest], limits.max_logprobs, 0, limits)
    except ApiError as err:
        print(f"warning: the longest prompt this server accepts at k = server.max_logprobs does not fit one request's "
              f"memory: {err.message} (or raise server.max_request_memory)", file=sys.stderr)
    return TeacherServer(scorer, str(s.host), int(s.port), api_key, limits, bool(s.verbose))


def limits_from_config(s) -> ServerLimits:
    """ServerLimits from the `server` config group (conf/server/default.yaml)."""
    fields = ServerLimits.__dataclass_fields__
    return ServerLimits(**{name: type(field.default)(s[name]) for name, field in fields.items()})


def serve(cfg) -> None:
    from kdlab.teachers.server_http import raise_open_files_limit

    raise_open_files_limit(int(cfg.server.max_connections))
    server = build_server(cfg)
    print(f"kdlab-serve-teacher: {server.scorer.model_name} (vocabulary {server.scorer.vocab_size}) at "
          f"{server.url}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def __getattr__(name: str) -> Any:
    """`TeacherServer` lives in server_http (which imports this module); it is importable from here as before."""
    if name == "TeacherServer":
        from kdlab.teachers.server_http import TeacherServer

        return TeacherServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    """Console entry point: Hydra composes conf/serve_teacher.yaml (train.yaml plus the `server` group)."""
    from kdlab.teachers.entry import hydra_entry

    hydra_entry("serve_teacher", serve)


if __name__ == "__main__":  # `python -m`: run the package's module, whose classes server_http imports and catches
    from kdlab.teachers.server import main as package_main

    package_main()
