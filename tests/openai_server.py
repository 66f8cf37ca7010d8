"""A scriptable OpenAI-compatible chat-completions server for tests (standard library only).

Run it as its own process (never collected by pytest)::

    python tests/openai_server.py [--host 127.0.0.1] [--port 0] [--expect-key KEY]

It prints one line ``PORT <n>`` once listening and serves until SIGTERM or SIGINT. Or, from a
test, ``with FakeOpenAI(expect_key=...) as fake:`` starts it as a subprocess.

Endpoints
---------
``POST /v1/chat/completions``
    With ``--expect-key``, a request without ``Authorization: Bearer <KEY>`` gets 401 (the key
    received is never echoed, stored or counted beyond "correct or not"). A body that is not
    JSON with ``model`` and a ``messages`` list gets 400. Otherwise the next scripted step
    (FIFO), or the default step when the script is empty, decides the reply.
``POST /_script``
    ``{"steps": [...], "default": {...}}`` replaces the queue (and the default, when given).
``POST /_reset``
    Clears the script and the statistics and restores the default step (``normal``).
``GET /_stats``
    ``{"requests", "by_mode", "models", "authorized", "in_flight", "connections",
    "open_connections", "last_request"}``; ``by_mode`` also counts ``auth`` (401 from the key
    check) and ``invalid`` (400 from validation); ``connections`` counts the TCP connections
    that carried a chat request (control calls are not counted), ``open_connections`` those of
    them not yet closed by the server; ``last_request`` is the last valid
    request's JSON body with its ``user_agent`` and ``content_type`` headers.

Steps
-----
A step is ``{"mode": ..., "times": n (default 1), ...options}``:

``normal``
    200 with a ``chat.completion``. Options: ``content`` (else a JSON object
    ``{"direction", "confidence", "rationale"}`` when the request asked for
    ``response_format: json_object``, else one sentence naming the direction), ``direction``
    (``buy``/``sell``/``hold``; default from the last user message: a word ``BUY``/``buy`` ->
    buy, ``SELL``/``sell`` -> sell, else hold), ``direction_by_model`` (``{model: direction}``,
    before ``direction``: two providers on one server that disagree), ``confidence`` (0.7),
    ``prompt_tokens`` and ``completion_tokens`` (else ``ceil(chars / 4)``), ``close_after``
    (close the connection after replying, without saying ``Connection: close``: a keep-alive
    socket gone stale).
``slow``
    Sleep ``delay`` seconds (1.0), then as ``normal``.
``hang``
    Sleep ``delay`` (3600) without replying, then close; returns early when the client goes
    away or the server stops.
``status``
    HTTP ``status`` (500) with an OpenAI-style error JSON whose message is ``message`` when
    given; ``Retry-After: <retry_after>`` when given (a number or an HTTP-date string).
``malformed``
    200 with the body ``{"choices": [`` (not JSON).
``bad_shape``
    200 with valid JSON that has no ``choices``.
``drop``
    Close the TCP connection without sending a byte.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

MODES = ("normal", "slow", "hang", "status", "malformed", "bad_shape", "drop")
_MAX_BODY = 16 << 20
_REASONS = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 429: "Too Many Requests",
            500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}
_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
                404: "not_found_error", 429: "rate_limit_exceeded"}


class _Stopping(Exception):
    pass


class State:
    """The script and the statistics, shared by the handler threads."""

    def __init__(self, expect_key: str | None) -> None:
        self.expect_key = expect_key
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.ids = 0
        self.in_flight = 0  # live requests and sockets: _reset leaves these two alone
        self.open_connections = 0
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.steps: deque[list[Any]] = deque()  # [step, uses left]
            self.default: dict[str, Any] = {"mode": "normal"}
            self.requests = 0
            self.authorized = 0
            self.by_mode: Counter[str] = Counter()
            self.models: Counter[str] = Counter()
            self.last_request: dict[str, Any] | None = None
            self.connections = 0

    def script(self, steps: list[dict[str, Any]], default: dict[str, Any] | None) -> None:
        with self.lock:
            self.steps = deque([s, int(s.get("times", 1))] for s in steps if int(s.get("times", 1)) > 0)
            if default is not None:
                self.default = default

    def next_step(self) -> dict[str, Any]:
        with self.lock:
            if not self.steps:
                return self.default
            entry = self.steps[0]
            entry[1] -= 1
            if entry[1] <= 0:
                self.steps.popleft()
            return entry[0]

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {"requests": self.requests, "by_mode": dict(self.by_mode), "models": dict(self.models),
                    "authorized": self.authorized, "in_flight": self.in_flight,
                    "connections": self.connections, "open_connections": self.open_connections,
                    "last_request": self.last_request, "queued": sum(n for _, n in self.steps)}


def _validate_step(step: Any) -> str | None:
    if not isinstance(step, dict):
        return "a step must be a JSON object"
    if step.get("mode", "normal") not in MODES:
        return f"unknown mode {step.get('mode')!r}; modes are {', '.join(MODES)}"
    if not isinstance(step.get("times", 1), int):
        return "times must be an integer"
    return None


def _direction_from(messages: list[Any]) -> str:
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            text = str(m.get("content", ""))
            if re.search(r"\b(BUY|buy)\b", text):
                return "buy"
            if re.search(r"\b(SELL|sell)\b", text):
                return "sell"
            return "hold"
    return "hold"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeOpenAI/1.0"
    server: Server

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # -- plumbing ---------------------------------------------------------------------------

    def _send_json(self, status: int, doc: Any, headers: dict[str, str] | None = None) -> None:
        self._send_bytes(status, json.dumps(doc).encode(), headers)

    def _send_bytes(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status, _REASONS.get(status))
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        doc = {"error": {"message": message, "type": _ERROR_TYPES.get(status, "server_error"), "param": None,
                         "code": None}}
        self._send_bytes(status, json.dumps(doc).encode(), headers)

    def _body(self) -> bytes | None:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit() or int(length) > _MAX_BODY:
            self._error(411 if length is None else 413, "a Content-Length body is required")
            self.close_connection = True
            return None
        return self.rfile.read(int(length))

    def _client_gone(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _sleep(self, seconds: float) -> bool:
        """Sleep; False when the client went away or the server is stopping."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if self.server.state.stopping.wait(min(0.02, left)) or self._client_gone():
                return False
        return True

    # -- routes -----------------------------------------------------------------------------

    def do_GET(self) -> None:
        if self.path == "/_stats":
            self._send_json(200, self.server.state.stats())
        else:
            self._error(404, f"no route GET {self.path}")

    def do_POST(self) -> None:
        body = self._body()
        if body is None:
            return
        state = self.server.state
        if self.path == "/_reset":
            state.reset()
            self._send_json(200, {"ok": True})
        elif self.path == "/_script":
            try:
                doc = json.loads(body)
            except ValueError:
                self._error(400, "script body is not JSON")
                return
            steps = doc.get("steps", []) if isinstance(doc, dict) else None
            default = doc.get("default") if isinstance(doc, dict) else None
            if not isinstance(steps, list):
                self._error(400, "the script must be {\"steps\": [...], \"default\": {...}}")
                return
            problems = [p for p in map(_validate_step, steps + ([default] if default is not None else [])) if p]
            if problems:
                self._error(400, problems[0])
                return
            state.script(steps, default)
            self._send_json(200, {"ok": True, "queued": len(steps)})
        elif self.path.rstrip("/").endswith("/chat/completions"):
            with state.lock:
                state.in_flight += 1
            try:
                self._chat(body)
            finally:
                with state.lock:
                    state.in_flight -= 1
        else:
            self._error(404, f"no route POST {self.path}")

    def _chat(self, raw: bytes) -> None:
        state = self.server.state
        authorized = state.expect_key is not None and \
            self.headers.get("Authorization") == f"Bearer {state.expect_key}"
        with state.lock:
            state.requests += 1
            state.authorized += authorized
            if self.request not in self.server.chat_sockets:
                self.server.chat_sockets.add(self.request)
                state.connections += 1
                state.open_connections += 1
        if state.expect_key is not None and not authorized:
            with state.lock:
                state.by_mode["auth"] += 1
            self._error(401, "Incorrect API key provided")
            return
        try:
            req = json.loads(raw)
        except ValueError:
            req = None
        if not isinstance(req, dict) or not isinstance(req.get("model"), str) or \
                not isinstance(req.get("messages"), list):
            with state.lock:
                state.by_mode["invalid"] += 1
            self._error(400, "body must be JSON with a string 'model' and a 'messages' list")
            return
        step = state.next_step()
        mode = step.get("mode", "normal")
        with state.lock:
            state.by_mode[mode] += 1
            state.models[req["model"]] += 1
            state.last_request = {"body": req, "user_agent": self.headers.get("User-Agent"),
                                  "content_type": self.headers.get("Content-Type")}
        if mode == "drop":
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        elif mode == "hang":
            self._sleep(float(step.get("delay", 3600.0)))
            self.close_connection = True
        elif mode == "slow":
            if self._sleep(float(step.get("delay", 1.0))):
                self._normal(req, step)
            else:
                self.close_connection = True
        elif mode == "status":
            status = int(step.get("status", 500))
            headers = {"Retry-After": str(step["retry_after"])} if step.get("retry_after") is not None else None
            self._error(status, str(step.get("message", f"scripted status {status}")), headers)
        elif mode == "malformed":
            self._send_bytes(200, b'{"choices": [')
        elif mode == "bad_shape":
            self._send_json(200, {"id": "chatcmpl-bad", "object": "chat.completion", "model": req["model"],
                                  "result": "there are no choices here"})
        else:
            self._normal(req, step)

    def _normal(self, req: dict[str, Any], step: dict[str, Any]) -> None:
        messages = req["messages"]
        content = step.get("content")
        if content is None:
            by_model = step.get("direction_by_model") or {}
            direction = by_model.get(req["model"]) or step.get("direction") or _direction_from(messages)
            confidence = float(step.get("confidence", 0.7))
            rationale = (f"The consensus of the agents points to {direction} with confidence "
                         f"{confidence:.2f}, as momentum and trend agree.")
            fmt = req.get("response_format")
            if isinstance(fmt, dict) and fmt.get("type") == "json_object":
                content = json.dumps({"direction": direction, "confidence": confidence, "rationale": rationale})
            else:
                content = rationale
        chars = sum(len(m["content"]) if isinstance(m, dict) and isinstance(m.get("content"), str)
                    else len(str(m.get("content", "")) if isinstance(m, dict) else str(m)) for m in messages)
        prompt_tokens = int(step.get("prompt_tokens", math.ceil(chars / 4)))
        completion_tokens = int(step.get("completion_tokens", math.ceil(len(content) / 4)))
        with self.server.state.lock:
            self.server.state.ids += 1
            n = self.server.state.ids
        self._send_json(200, {
            "id": f"chatcmpl-fake{n:08d}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        })
        if step.get("close_after"):
            self.close_connection = True


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], state: State) -> None:
        self.state = state
        self.chat_sockets: set[Any] = set()  # guarded by state.lock
        super().__init__(address, Handler)

    def shutdown_request(self, request: Any) -> None:
        super().shutdown_request(request)
        # counted after the close, so a test that saw open_connections drop knows the FIN is out
        with self.state.lock:
            if request in self.chat_sockets:
                self.chat_sockets.discard(request)
                self.state.open_connections -= 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a client that hangs up mid-reply is part of the tests, not an error worth a traceback
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):
            super().handle_error(request, client_address)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--expect-key", default=None)
    args = ap.parse_args(argv)

    def on_term(signum: int, frame: Any) -> None:
        raise _Stopping

    signal.signal(signal.SIGTERM, on_term)
    state = State(args.expect_key)
    server = Server((args.host, args.port), state)
    print(f"PORT {server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.1)
    except (_Stopping, KeyboardInterrupt):
        pass
    finally:
        state.stopping.set()
        server.server_close()
    return 0


# -- the test side ---------------------------------------------------------------------------


class FakeOpenAI:
    """:mod:`openai_server` as a subprocess, with its control endpoints as methods.

    Parameters
    ----------
    expect_key : str, optional
        Require ``Authorization: Bearer <expect_key>``.
    host : str
        Interface to listen on.
    startup_timeout : float
        Seconds to wait for the ``PORT`` line.
    """

    def __init__(self, *, expect_key: str | None = None, host: str = "127.0.0.1",
                 startup_timeout: float = 10.0) -> None:
        self.expect_key = expect_key
        self.host = host
        self.startup_timeout = startup_timeout
        self.port = 0
        self.proc: subprocess.Popen[str] | None = None
        self._stderr: Any = None

    @property
    def url(self) -> str:
        """The API root to give a client as ``base_url``."""
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> FakeOpenAI:
        cmd = [sys.executable, str(Path(__file__)), "--host", self.host, "--port", "0"]
        if self.expect_key is not None:
            cmd += ["--expect-key", self.expect_key]
        # stderr to a file, not a pipe nobody drains: a chatty server must never block on it
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr,
                                     text=True)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], self.startup_timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("PORT "):
            self.kill()
            raise RuntimeError(f"openai_server did not start within {self.startup_timeout} s "
                               f"(stdout {line!r}); stderr:\n{self._read_stderr()}")
        self.port = int(line.split()[1])
        return self

    def _read_stderr(self) -> str:
        if self._stderr is None or self._stderr.closed:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def _call(self, method: str, path: str, doc: Any = None) -> Any:
        data = None if doc is None else json.dumps(doc).encode()
        req = urllib.request.Request(f"http://{self.host}:{self.port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def script(self, steps: list[dict[str, Any]], default: dict[str, Any] | None = None) -> None:
        """Replace the queue of steps (and the default step, when given)."""
        doc: dict[str, Any] = {"steps": steps}
        if default is not None:
            doc["default"] = default
        self._call("POST", "/_script", doc)

    def reset(self) -> None:
        """Clear the script and the statistics; the default step is ``normal`` again."""
        self._call("POST", "/_reset", {})

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/_stats")

    def wait_for(self, key: str, value: Any, timeout: float = 5.0) -> dict[str, Any]:
        """Poll the statistics until ``stats()[key] == value``; the last statistics."""
        end = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if stats[key] == value or time.monotonic() > end:
                return stats
            time.sleep(0.01)

    def _finish(self, sig: int | None) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                if sig == signal.SIGKILL:
                    proc.kill()
                else:
                    proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        if self._stderr is not None:
            self._stderr.close()

    def kill(self) -> None:
        """SIGKILL the server (a provider that vanishes)."""
        self._finish(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s."""
        self._finish(signal.SIGTERM)

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
