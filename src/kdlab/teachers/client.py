"""Client of a teacher server (`kdlab-serve-teacher` or `vllm serve`): top-k log-probabilities of token sequences.

    client = TeacherClient("http://127.0.0.1:8000", top_k=32, api_key=...)
    client.check(vocab_size=len(tokenizer), tokenizer_fingerprint=...)   # once, at start-up
    topk = client.top_k(sequences)   # prompt + target ids per row, ground truth or the student's own samples
    topk = client.target_top_k(prompts, targets)   # the same, aligned with score_targets' (batch, target, vocab)

Alignment: `topk.logprobs[b, t]` is the teacher's distribution of token t + 1 of sequence b given tokens 0..t,
the same alignment as a causal model's `logits[b, t]` over the same ids. The last token of each sequence has no
row (nothing after it is scored: `mask` is False there and on padding). Tail: log(1 - sum of the top-k), the mass
of every other token (`kdlab.losses.sparse.tail_log_mass`).

Every failure is one `TeacherServerError` line naming the URL, of one of two kinds that a run treats differently:

- `TeacherLost`: no answer (connection refused or reset, a timeout) or a 5xx, 408 or 429, after `retries` tries with
  exponential backoff. The server may come back: a training step saves a checkpoint to resume from.
- `TeacherRefused`: any other 4xx (a wrong key, k above the server's limit, sequences longer than it takes), or a
  redirect. Asking again would get the same answer: the run stops with the server's message and the fix.
  `check(..., longest=...)` asks what the run will ask once at start-up, so these stop a run before its first step.

Other failures (an answer of the wrong shape, another tokenizer) are plain `TeacherServerError`s. The API key is
never sent across a redirect (none is followed) nor over plain HTTP to another machine unless `allow_insecure_key`.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from kdlab.losses.sparse import TopK, tail_log_mass


class TeacherServerError(RuntimeError):
    """The teacher server cannot give what the run needs; the message says which URL and what to do."""


class TeacherLost(TeacherServerError):
    """No answer, or a server error, after every retry: the server may come back (a run checkpoints and stops)."""


class TeacherRefused(TeacherServerError):
    """A permanent refusal (4xx, a redirect) with the server's message: asking again would not change it."""

    def __init__(self, message: str, status: int | None = None, server_message: str = ""):
        super().__init__(message)
        self.status, self.server_message = status, server_message


# what a run changes when a server refuses what it asks, by what the server's message names (first match)
FIXES = (
    (("prompts in one request", "prompts of up to", "max_batch"),
     "lower teacher.max_batch, or raise the server's limits (kdlab-serve-teacher server.max_batch, "
     "server.max_request_memory)"),
    (("logprobs",),
     "lower teacher.top_k, or raise the server's limit (vllm serve --max-logprobs <k>, default 20; "
     "kdlab-serve-teacher server.max_logprobs=<k>)"),
    (("tokens", "context length"),
     "shorten the run's sequences (task.max_prompt_tokens, task.max_target_tokens, policy.sampling.max_new_tokens), "
     "or raise the server's limit (vllm serve --max-model-len <longest + 1>, past the model's positions with "
     "VLLM_ALLOW_LONG_MAX_MODEL_LEN=1; kdlab-serve-teacher server.max_tokens_per_sequence, "
     "server.max_request_memory)"),
)


def fix_for(message: str) -> str | None:
    """The run-side fix for a server's refusal, or None when its message names nothing known."""
    lowered = message.lower()
    return next((fix for words, fix in FIXES if any(word in lowered for word in words)), None)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are answered, not followed: following one would send the Bearer key to wherever it points."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def is_loopback(url: str) -> bool:
    """Whether the URL's host is this machine (localhost, 127.0.0.0/8, ::1): plain HTTP never leaves it."""
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class TeacherClient:
    """Batched, authenticated, retried requests for prompt log-probabilities (see the module doc)."""

    def __init__(self, url: str, top_k: int, model: str | None = None, api_key: str | None = None,
                 timeout: float = 60.0, retries: int = 3, backoff: float = 0.5, max_batch: int = 32,
                 allow_insecure_key: bool = False):
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        scheme = urllib.parse.urlsplit(url).scheme
        if scheme not in ("http", "https"):
            raise TeacherServerError(f"teacher.url {url} must start with http:// or https://")
        if api_key and scheme == "http" and not is_loopback(url) and not allow_insecure_key:
            raise TeacherServerError(f"teacher.url {url} is plain HTTP to another machine: the API key would cross "
                                     f"the network unencrypted; use https://, a tunnel to 127.0.0.1, or set "
                                     f"teacher.allow_insecure_key=true")
        self.url = url.rstrip("/")
        self.k, self.model, self.api_key = top_k, model, api_key
        self.timeout, self.retries, self.backoff, self.max_batch = timeout, retries, backoff, max_batch
        self.vocab_size: int | None = None
        self.received_bytes = 0  # the answers' bodies so far: what scoring moved over the network
        # tokens each request asks the server to generate: vLLM takes no fewer than 1 and counts it against its
        # max_model_len (a sequence of max_model_len tokens is refused); kdlab-serve-teacher takes 0 (see check)
        self.generated = 1

    # -- start-up ---------------------------------------------------------------------------------------------------
    def check(self, vocab_size: int, tokenizer_fingerprint: str | None = None,
              longest: int | None = None) -> dict[str, Any]:
        """The served model's card, after checking it can be this run's teacher; remembers the vocabulary size.

        vLLM's /v1/models names the model and its `max_model_len`; kdlab's server adds its vocabulary size and
        tokenizer fingerprint, compared here. vLLM generates at least one token per request and counts it against
        max_model_len, so a sequence must leave room for it; kdlab's server (its card holds `kdlab`) is asked for
        none. Against vLLM the ids of every answer are still checked (`top_k`).
        With `longest` (the run's longest prompt + target, in tokens) it then asks for the top-k of one sequence of
        that length, so that a k or a length the server refuses stops the run now, with the server's message and
        the fix, rather than at the step that first needs it.
        """
        cards = self._request("GET", "/v1/models").get("data") or []
        names = [c.get("id") for c in cards]
        if self.model is None:
            if len(cards) != 1:
                raise TeacherServerError(f"teacher server at {self.url} serves {names}: name one (teacher.model)")
            self.model = names[0]
        if self.model not in names:
            raise TeacherServerError(f"teacher server at {self.url} serves {names}, not {self.model!r}")
        card = cards[names.index(self.model)]
        extra = card.get("kdlab") or {}
        if extra.get("vocab_size") not in (None, vocab_size):
            raise TeacherServerError(f"teacher server at {self.url} has a vocabulary of {extra['vocab_size']} "
                                     f"tokens, the student {vocab_size}: it serves another tokenizer")
        if tokenizer_fingerprint and extra.get("tokenizer_fingerprint") not in (None, tokenizer_fingerprint):
            raise TeacherServerError(f"teacher server at {self.url} uses another tokenizer (fingerprint "
                                     f"{extra['tokenizer_fingerprint']}, the student's {tokenizer_fingerprint})")
        self.vocab_size = vocab_size
        self.generated = 0 if "kdlab" in card else 1
        if longest is not None:
            limit = card.get("max_model_len")
            if isinstance(limit, int) and 0 < limit < longest + self.generated:
                counted = f" plus the {self.generated} it generates per request" if self.generated else ""
                raise TeacherRefused(f"teacher server at {self.url} serves {self.model} with max_model_len {limit}, "
                                     f"and this run's sequences reach {longest} tokens{counted}: {fix_for('tokens')}")
            self.top_k([[0] * longest])
        return card

    # -- scoring ----------------------------------------------------------------------------------------------------
    def top_k(self, sequences: Sequence[Sequence[int]]) -> TopK:
        """Top-k of every position of every sequence (module doc for the alignment), in requests of max_batch."""
        if self.model is None or self.vocab_size is None:
            raise TeacherServerError(f"teacher server at {self.url}: call check() before top_k()")
        seqs = [[int(x) for x in s] for s in sequences]
        width = max(1, max(len(s) for s in seqs) - 1)
        logprobs = torch.full((len(seqs), width, self.k), -torch.inf, dtype=torch.float32)
        ids = torch.zeros((len(seqs), width, self.k), dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.bool)
        for row, seq, entries in self._prompt_logprobs(seqs, self.k):
            self._fill(row, seq, entries, logprobs, ids, mask)
        tail = tail_log_mass(logprobs).float().masked_fill(~mask, 0.0)
        return TopK(logprobs.masked_fill(~mask[..., None], 0.0), ids, tail, mask)

    def target_top_k(self, prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> TopK:
        """Top-k aligned as `kdlab.models.scoring.score_targets`' logits: row j of example b is the distribution of
        targets[b][j] given the prompt and targets[b][:j]; (batch, longest target, k), mask False past a target."""
        if any(len(p) < 1 for p in prompts):
            raise ValueError("every prompt needs at least one token (the first target token is predicted from it)")
        full = self.top_k([list(p) + list(t) for p, t in zip(prompts, targets)])
        width = max(1, max(len(t) for t in targets))
        out = TopK(torch.zeros(len(prompts), width, self.k), torch.zeros(len(prompts), width, self.k, dtype=torch.long),
                   torch.zeros(len(prompts), width), torch.zeros(len(prompts), width, dtype=torch.bool))
        for row, (prompt, target) in enumerate(zip(prompts, targets)):
            rows = slice(len(prompt) - 1, len(prompt) - 1 + len(target))
            n = len(target)
            out.logprobs[row, :n], out.ids[row, :n] = full.logprobs[row, rows], full.ids[row, rows]
            out.tail[row, :n], out.mask[row, :n] = full.tail[row, rows], full.mask[row, rows]
        return out

    def target_logprobs(self, prompts: Sequence[Sequence[int]],
                        targets: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
        """The teacher's log-probability of each target token alone, asked with `prompt_logprobs` 0 (the answer
        then holds each token's own entry, no top-k): (logprobs (batch, longest target), mask).
        Aligned as `target_top_k`: entry j of row b is log p(targets[b][j] | prompt, targets[b][:j])."""
        if self.model is None or self.vocab_size is None:
            raise TeacherServerError(f"teacher server at {self.url}: call check() before target_logprobs()")
        if any(len(p) < 1 for p in prompts):
            raise ValueError("every prompt needs at least one token (the first target token is predicted from it)")
        width = max(1, max(len(t) for t in targets))
        logprobs = torch.zeros(len(prompts), width, dtype=torch.float32)
        mask = torch.zeros(len(prompts), width, dtype=torch.bool)
        seqs = [[int(x) for x in p] + [int(x) for x in t] for p, t in zip(prompts, targets)]
        for row, seq, entries in self._prompt_logprobs(seqs, 0):
            first = len(prompts[row])
            for j, token in enumerate(seq[first:]):
                entry = entries[first + j]
                try:
                    logprobs[row, j] = float(entry[str(token)]["logprob"])
                except (KeyError, TypeError, ValueError):
                    raise TeacherServerError(f"teacher server at {self.url} returned no log-probability for "
                                             f"token {token} at position {first + j}: {str(entry)[:80]}") from None
                mask[row, j] = True
        return logprobs, mask

    def _prompt_logprobs(self, seqs: list[list[int]], k: int) -> Iterator[tuple[int, list[int], list]]:
        """(row, sequence, its prompt_logprobs: one entry per token) for every sequence, asked in requests of
        max_batch with `prompt_logprobs` k (0: each token's own entry only). The answers' shapes are checked here."""
        for start in range(0, len(seqs), self.max_batch):
            group = seqs[start : start + self.max_batch]
            # prompt_logprobs do not depend on the generated token, nor on a temperature (vLLM and kdlab's server
            # ignore it there: a run with a tempered loss is refused, kdlab.losses.sparse.sparse_form)
            body = {"model": self.model, "prompt": group, "max_tokens": self.generated, "prompt_logprobs": k}
            choices = sorted(self._request("POST", "/v1/completions", body).get("choices") or [],
                             key=lambda c: c.get("index", 0))
            if len(choices) != len(group):
                raise TeacherServerError(f"teacher server at {self.url} answered {len(choices)} choices for "
                                         f"{len(group)} prompts")
            for offset, (seq, choice) in enumerate(zip(group, choices)):
                entries = choice.get("prompt_logprobs")
                if not isinstance(entries, list) or len(entries) != len(seq):
                    got = len(entries) if isinstance(entries, list) else type(entries).__name__
                    raise TeacherServerError(f"teacher server at {self.url} returned prompt_logprobs of length {got} "
                                             f"for a sequence of {len(seq)} tokens (does it serve prompt_logprobs?)")
                yield start + offset, seq, entries

    def _fill(self, row: int, seq: list[int], entries: Any, logprobs: Tensor, ids: Tensor, mask: Tensor) -> None:
        """Row `row` from one choice's prompt_logprobs: entry t + 1 goes to position t, its k largest entries."""
        for t, entry in enumerate(entries[1:]):
            try:
                ranked = sorted(((float(v["logprob"]), int(token)) for token, v in entry.items()), reverse=True)
            except (AttributeError, KeyError, TypeError, ValueError):
                raise TeacherServerError(f"teacher server at {self.url} returned a malformed prompt_logprobs entry "
                                         f"at position {t + 1}: {str(entry)[:80]}") from None
            if len(ranked) < self.k:
                raise TeacherServerError(f"teacher server at {self.url} returned {len(ranked)} log-probabilities "
                                         f"per token, fewer than top_k={self.k} (vllm serve: --max-logprobs)")
            top = ranked[: self.k]
            outside = [token for _, token in top if not 0 <= token < self.vocab_size]
            if outside:
                raise TeacherServerError(f"teacher server at {self.url} returned token id {outside[0]}, outside the "
                                         f"student's vocabulary of {self.vocab_size}: it serves another tokenizer")
            logprobs[row, t] = torch.tensor([value for value, _ in top])
            ids[row, t] = torch.tensor([token for _, token in top])
            mask[row, t] = True

    # -- transport --------------------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: dict | None = None) -> dict[str, Any]:
        """JSON in, JSON out, with the retry policy of the module doc; each answer's size is added to
        `received_bytes`."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
            try:
                with _OPENER.open(request, timeout=self.timeout) as response:
                    raw = response.read()
                    self.received_bytes += len(raw)
                    return json.loads(raw)
            except urllib.error.HTTPError as err:
                message = error_message(err)
                if err.code in (401, 403):
                    raise TeacherRefused(f"teacher server at {self.url} refused the API key ({err.code}: {message}); "
                                         f"set teacher.api_key to the server's key", err.code, message) from None
                if 300 <= err.code < 400:
                    raise TeacherRefused(f"teacher server at {self.url} redirects {path} ({err.code}) to "
                                         f"{err.headers.get('Location')}; set teacher.url to where it points (a "
                                         f"redirect is never followed: it would carry the API key)", err.code) from None
                if err.code < 500 and err.code not in (408, 429):
                    fix = fix_for(message)
                    raise TeacherRefused(f"teacher server at {self.url} refused {method} {path} ({err.code}: "
                                         f"{message})" + (f": {fix}" if fix else ""), err.code, message) from None
                last = f"HTTP {err.code}: {message}"
            except (TimeoutError, socket.timeout):
                last = f"no answer within {self.timeout}s"
            except (urllib.error.URLError, ConnectionError, http.client.HTTPException, ValueError) as err:
                reason = getattr(err, "reason", err)
                timed_out = isinstance(reason, (TimeoutError, socket.timeout))
                last = f"no answer within {self.timeout}s" if timed_out else (str(reason) or type(err).__name__)
        raise TeacherLost(f"teacher server at {self.url} failed {self.retries + 1} tries ({last}): is it running and "
                          f"reachable? (teacher.url)")


def error_message(err: urllib.error.HTTPError) -> str:
    """The message of an error body: OpenAI's `{"error": {"message"}}`, vLLM's top-level `{"message"}` (some
    versions), `{"error": "..."}`, FastAPI's `{"detail"}`; else the HTTP reason. One line, at most 500 characters."""
    try:
        raw = err.read()
    except Exception:
        raw = b""
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = None
    message = None
    if isinstance(payload, dict):
        inner = payload.get("error")
        if isinstance(inner, dict):
            message = inner.get("message")
        elif isinstance(inner, str):
            message = inner
        message = message or payload.get("message") or payload.get("detail")
    text = str(message) if message else str(err.reason)
    return " ".join(text.split())[:500]
