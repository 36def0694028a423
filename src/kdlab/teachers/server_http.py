"""The HTTP side of `kdlab-serve-teacher`: an ASGI app on uvicorn, with the limits that let it be left running.

Why uvicorn: it is the server under vLLM's own API and it already bounds what a plain socket server does not: the
listen backlog, header size (h11), idle keep-alive connections, back-pressure on slow readers, and one event loop
instead of a thread per connection. What it lacks, measured before choosing it (docs/teacher_outside.md), is added
here in a few lines: a deadline for a request's headers (uvicorn restarts its keep-alive timer on every byte, so a
client trickling a byte a second held a connection for ever), a body deadline, and JSON for its own 400.

Every answer is JSON. Per request, in order: more than `max_connections` open -> 503; /health needs no key; every
other route checks the key (401) and the method (405); a completion checks Content-Length (411, 413), waits for one
of `max_requests_in_flight` turns (503 after `queue_timeout`), reads its body within `body_timeout` (408), parses it
(400), checks it against the limits and the memory budget (400, 404, 413), and runs its forward passes in a worker
thread, one pass at a time over the whole server. The answer streams one choice at a time; a client that leaves it
unread for `write_timeout` is dropped. An internal error is a 500 that says only that it was logged.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from kdlab.teachers.server import (
    ApiError,
    ServerLimits,
    TeacherScorer,
    completion_head,
    completion_tail,
    parse_body,
    parse_completion_request,
)

ABORT = "kdlab.abort"  # the connection's transport.abort, passed to the app in scope["state"] by our protocol
SEND_SLICE = 256 * 1024  # an answer is written in slices this size, each waiting for the client to read the last
ROUTES = {"/health": "GET", "/v1/models": "GET", "/v1/completions": "POST"}


def error_body(status: int, message: str, kind: str) -> bytes:
    """OpenAI's error shape, as vLLM answers it."""
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}).encode()


class _Disconnected(Exception):
    """The client went away: nothing to answer."""


class _Stalled(Exception):
    """The client did not read the answer within write_timeout."""


class TeacherApp:
    """The ASGI application: routes, key, admission, body, scoring in a worker thread, the streamed answer."""

    def __init__(self, scorer: TeacherScorer, limits: ServerLimits, api_key: str | None,
                 open_connections: Callable[[], int]):
        self.scorer, self.limits, self.api_key, self.open_connections = scorer, limits, api_key, open_connections
        # one thread per request in flight; the scorer's lock keeps forward passes one at a time among them
        self.executor = ThreadPoolExecutor(limits.max_requests_in_flight, thread_name_prefix="kdlab-teacher")
        self.turns: asyncio.Semaphore | None = None  # made on the serving loop
        self.waiting = 0

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            return
        started = False

        async def guarded(message: dict) -> None:
            nonlocal started
            started = True
            try:
                await asyncio.wait_for(send(message), self.limits.write_timeout)
            except asyncio.TimeoutError:
                raise _Stalled from None

        try:
            try:
                await self._route(scope, receive, guarded)
            except ApiError as err:
                if not started:
                    await _send_json(guarded, err.status, error_body(err.status, err.message, err.kind), close=True,
                                     headers=err.headers)
            except (_Disconnected, _Stalled):
                raise
            except Exception:  # a bug must not kill the server or leak a traceback to the caller: log it here
                traceback.print_exc(file=sys.stderr)
                if not started:
                    body = error_body(500, "internal server error (logged by the server)", "InternalServerError")
                    await _send_json(guarded, 500, body, close=True)
        except _Disconnected:
            pass
        except _Stalled:  # the client left the answer unread: drop the connection and what it buffers
            abort = scope.get("state", {}).get(ABORT)
            if abort is not None:
                abort()

    async def _route(self, scope: dict, receive, send) -> None:
        if self.open_connections() > self.limits.max_connections:
            raise ApiError(503, f"the server has {self.open_connections()} connections open, at most "
                                f"{self.limits.max_connections} (server.max_connections): retry later",
                           "ServiceUnavailableError", {"retry-after": "1"})
        path, method = scope["path"], scope["method"]
        if path != "/health":
            self._authorize(scope)
        if path not in ROUTES:
            raise ApiError(404, f"no route {path}; this server answers GET /health, GET /v1/models and "
                                f"POST /v1/completions", "NotFoundError")
        if method != ROUTES[path]:
            raise ApiError(405, f"{method} is not allowed on {path}; use {ROUTES[path]}", "MethodNotAllowedError",
                           {"allow": ROUTES[path]})
        if path == "/health":
            await _send_json(send, 200, b"{}")
        elif path == "/v1/models":
            await _send_json(send, 200, json.dumps(self.scorer.models()).encode())
        else:
            length = self._content_length(scope)
            async with self._turn():
                await self._complete(await self._read_body(receive, length), send)

    def _authorize(self, scope: dict) -> None:
        if self.api_key is None:
            return
        given = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
        if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer <key>)", "AuthenticationError")

    def _content_length(self, scope: dict) -> int:
        length = next((value.decode("latin-1") for name, value in scope["headers"] if name == b"content-length"),
                      None)
        if length is None:
            raise ApiError(411, "Content-Length is required", "LengthRequiredError")
        if not length.isdigit():
            raise ApiError(400, f"bad Content-Length {length[:40]!r}")
        if int(length) > self.limits.max_request_bytes:
            raise ApiError(413, f"request body of {int(length)} bytes; at most {self.limits.max_request_bytes} "
                                f"(server.max_request_bytes)", "RequestTooLargeError")
        return int(length)

    @asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        """One of `max_requests_in_flight` turns, waited for up to `queue_timeout` seconds (then 503)."""
        if self.turns is None:
            self.turns = asyncio.Semaphore(self.limits.max_requests_in_flight)
        self.waiting += 1
        try:
            await asyncio.wait_for(self.turns.acquire(), self.limits.queue_timeout)
        except asyncio.TimeoutError:
            raise ApiError(503, f"busy: {self.limits.max_requests_in_flight} requests in flight and "
                                f"{self.waiting - 1} more waiting for over {self.limits.queue_timeout:g}s "
                                f"(server.queue_timeout): retry later", "ServiceUnavailableError",
                           {"retry-after": "5"}) from None
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self.turns.release()

    async def _read_body(self, receive, length: int) -> bytes:
        chunks: list[bytes] = []

        async def read() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _Disconnected
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    return

        try:
            await asyncio.wait_for(read(), self.limits.body_timeout)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {self.limits.body_timeout:g}s "
                                f"(server.body_timeout)", "RequestTimeoutError") from None
        return b"".join(chunks)

    async def _complete(self, raw: bytes, send) -> None:
        loop = asyncio.get_running_loop()
        run = lambda fn, *args: loop.run_in_executor(self.executor, fn, *args)  # noqa: E731
        body = await run(parse_body, raw, self.limits)
        sequences, k, max_tokens = parse_completion_request(body, self.scorer, self.limits)
        rows = self.scorer.rows_per_pass([len(s) for s in sequences], k, len(raw), self.limits)
        del raw, body
        scored = await run(self.scorer.score, sequences, k, rows)
        # every forward pass is done before the first byte: an error until here is still a JSON answer
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})  # no length: chunked, one choice at a time
        await _send_slices(send, completion_head(self.scorer))
        for index, (seq, one) in enumerate(zip(sequences, scored)):
            text = await run(self.scorer.choice_json, index, seq, one, max_tokens)
            await _send_slices(send, (b", " if index else b"") + text)
            scored[index] = None  # its top-k is written out: free it
        await _send_slices(send, completion_tail(sequences, max_tokens))
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _send_json(send, status: int, body: bytes, close: bool = False, headers: dict | None = None) -> None:
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    head += [(name.encode(), value.encode()) for name, value in (headers or {}).items()]
    if close:  # a refused body may be partly unread: it must not be parsed as the next request
        head.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _send_slices(send, data: bytes) -> None:
    """Write `data` in slices: uvicorn waits for the client to read before each one, so memory stays one slice."""
    view = memoryview(data)
    for start in range(0, len(data), SEND_SLICE):
        await send({"type": "http.response.body", "body": bytes(view[start : start + SEND_SLICE]), "more_body": True})


def deadline_protocol(header_timeout: float) -> type:
    """uvicorn's h11 protocol with a deadline for complete request headers, counted from the connection's start or
    its previous answer; JSON for the 400 uvicorn writes itself (malformed HTTP, headers over max_header_bytes);
    and the connection's `abort` handed to the app, which drops clients that stop reading."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class DeadlineH11Protocol(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self._deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.app_state = {**self.app_state, ABORT: transport.abort}
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            if not self.transport.is_closing():
                self._deadline = self.loop.call_later(header_timeout, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            # IDLE: no complete request line and headers yet (a body in progress is the app's body_timeout)
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def send_400_response(self, msg: str) -> None:
            body = error_body(400, f"invalid HTTP request: {msg}", "BadRequestError")
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return DeadlineH11Protocol


def listening_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A bound, listening TCP socket for `host` (IPv4 or IPv6, e.g. ::1), so the port is known (and connections
    queue) before the event loop starts."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class TeacherServer:
    """A teacher behind uvicorn on a socket bound at construction (`server_address`, `url`); `serve_forever()`
    serves until `shutdown()` (from another thread), `server_close()` releases the port: the calls of
    socketserver's servers, which this replaces."""

    def __init__(self, scorer: TeacherScorer, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
                 limits: ServerLimits = ServerLimits(), verbose: bool = False):
        import uvicorn

        self.scorer, self.api_key, self.limits, self.verbose = scorer, api_key, limits, verbose
        self.socket = listening_socket(host, port, limits.backlog)
        self.server_address = self.socket.getsockname()[:2]
        self.app = TeacherApp(scorer, limits, api_key, lambda: len(self._uvicorn.server_state.connections))
        config = uvicorn.Config(self.app, http=deadline_protocol(limits.header_timeout), ws="none", lifespan="off",
                                log_config=None, access_log=verbose, server_header=False, proxy_headers=False,
                                backlog=limits.backlog, timeout_keep_alive=limits.keep_alive_timeout,
                                h11_max_incomplete_event_size=limits.max_header_bytes,
                                timeout_graceful_shutdown=5)
        self._uvicorn = uvicorn.Server(config)
        self._stopped = threading.Event()
        self._stopped.set()

    @property
    def url(self) -> str:
        host, port = self.server_address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def serve_forever(self) -> None:
        self._stopped.clear()
        try:
            asyncio.run(self._serve())
        finally:
            self._stopped.set()

    async def _serve(self) -> None:
        asyncio.get_running_loop().set_exception_handler(_QuietAcceptErrors())
        await self._uvicorn.serve(sockets=[self.socket])

    def shutdown(self) -> None:
        """Stop serving (open requests get up to 5 s to finish) and wait until serve_forever has returned."""
        self._uvicorn.should_exit = True
        self._stopped.wait()

    def server_close(self) -> None:
        self.socket.close()
        self.app.executor.shutdown(wait=False)


class _QuietAcceptErrors:
    """The loop's exception handler: out of file descriptors, asyncio logs a traceback for every accept it retries
    (thousands a second with a large backlog); say it once a minute instead. Connections wait in the listen queue
    meanwhile, and are accepted as others close."""

    def __init__(self) -> None:
        self.last = -float("inf")

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        if context.get("message") != "socket.accept() out of system resource":
            loop.default_exception_handler(context)
            return
        if time.monotonic() - self.last >= 60:
            self.last = time.monotonic()
            print(f"kdlab-serve-teacher: cannot accept connections ({context.get('exception')}); they wait in the "
                  f"listen queue until others close (raise `ulimit -n` or lower server.max_connections)",
                  file=sys.stderr, flush=True)


def raise_open_files_limit(max_connections: int) -> None:
    """Raise this process's soft open-files limit toward its hard limit, so that `max_connections` connections
    (plus the model's and Python's own files) fit; say so when the hard limit is lower."""
    try:
        import resource
    except ImportError:  # not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < wanted:
            print(f"warning: the open-files limit is {new}, below server.max_connections + 256 = {wanted}: "
                  f"connections past it wait in the listen queue", file=sys.stderr)
