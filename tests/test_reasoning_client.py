"""The OpenAI-compatible client over real HTTP against a scripted server process, and the secrets
that feed it (files, environment, redaction of errors and logs)."""

from __future__ import annotations

import contextlib
import email.utils
import json
import logging
import math
import os
import pickle
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from dynamic_core.errors import AdapterError, PolicyError, SecretsError
from dynamic_core.reasoning.client import (
    MAX_RETRY_AFTER_S,
    Completion,
    OpenAICompatibleClient,
    parse_retry_after,
)
from dynamic_core.reasoning.profiles import ProviderProfile, profile
from dynamic_core.reasoning.secrets import RedactingFilter, Secret, api_key, load_secrets_file, redact

from .openai_server import FakeOpenAI

KEY = "sk-test-Zq8vR2mN4pL7xK1wY5tB"
OTHER_KEY = "sk-other-Hj3kL9mN2bV6cX8z"
MESSAGES = [("system", "You explain trading signals in one sentence."),
            ("user", "Signal: BUY EURUSD, score 0.82, 1,204 agents agree. Why?")]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(expect_key=KEY) as server:
        yield server


@pytest.fixture(autouse=True)
def _fresh_script(request: pytest.FixtureRequest) -> None:
    if "fake" in request.fixturenames:
        request.getfixturevalue("fake").reset()


def prof(url: str, **kw: object) -> ProviderProfile:
    fields: dict[str, object] = {"base_url": url, "model": "fake-model", "api_key_env": "FAKE_API_KEY",
                                 "timeout_s": 10.0}
    fields.update(kw)
    return profile("fakeprov", fields)


def client(fake: FakeOpenAI, key: str | Secret | None = KEY, **kw: object) -> OpenAICompatibleClient:
    return OpenAICompatibleClient(prof(fake.url), key, **kw)  # type: ignore[arg-type]


def assert_no_key(err: BaseException, *keys: str) -> None:
    texts = [str(err), repr(err), "".join(traceback.format_exception(err))]
    for key in keys or (KEY,):
        for text in texts:
            assert key not in text
            assert key[6:] not in text  # not even the tail


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RawServer:
    """An HTTP server on a raw socket, for replies FakeOpenAI cannot script (a body nested too
    deeply to decode, headers dripped a line at a time). Each connection's request is read
    whole, then each ``(delay_s, data)`` step is sent after its delay; a client gone or the
    server stopping ends the reply."""

    def __init__(self, steps: Sequence[tuple[float, bytes]]) -> None:
        self.steps = list(steps)
        self.stopping = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10.0)
            try:
                buf = b""
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, body = buf.partition(b"\r\n\r\n")
                length = int(next((line.split(b":", 1)[1] for line in head.split(b"\r\n")
                                   if line.lower().startswith(b"content-length:")), b"0"))
                while len(body) < length:
                    data = conn.recv(65536)
                    if not data:
                        return
                    body += data
                for delay, data in self.steps:
                    if self.stopping.wait(delay):
                        return
                    conn.sendall(data)
            except OSError:
                return

    def __enter__(self) -> RawServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join()
        self.sock.close()


def reply(status: int, body: bytes, reason: bytes = b"X") -> bytes:
    return b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" \
           b"Connection: close\r\n\r\n%s" % (status, reason, len(body), body)


# -- successful calls --------------------------------------------------------------------------


def test_normal_reply_counts_tokens_and_sends_the_key(fake: FakeOpenAI) -> None:
    with client(fake) as c:
        out = c.complete(MESSAGES, max_tokens=77, temperature=0.3)
    assert isinstance(out, Completion)
    assert out.status == 200 and out.model == "fake-model"
    assert "buy" in out.text
    chars = sum(len(m) for _, m in MESSAGES)
    assert out.tokens_in == math.ceil(chars / 4)  # the server's usage, computed its way
    assert out.tokens_out == math.ceil(len(out.text) / 4)
    assert 0.0 < out.latency_s < 10.0
    stats = fake.stats()
    assert stats["requests"] == 1 and stats["authorized"] == 1 and stats["by_mode"] == {"normal": 1}
    sent = stats["last_request"]
    assert sent["body"] == {"model": "fake-model", "max_tokens": 77, "temperature": 0.3, "stream": False,
                            "messages": [{"role": r, "content": m} for r, m in MESSAGES]}
    assert sent["content_type"] == "application/json"
    assert sent["user_agent"].startswith("dynamic-core/")
    with pytest.raises(AttributeError, match="immutable"):
        out.text = "x"  # type: ignore[misc]


def test_usage_comes_from_the_server_and_is_estimated_without_it(fake: FakeOpenAI) -> None:
    fake.script([{"mode": "normal", "prompt_tokens": 1234, "completion_tokens": 56, "content": "hold it"}])
    with client(fake) as c:
        out = c.complete([{"role": "user", "content": "x" * 41}], model="other-model")
    assert (out.text, out.tokens_in, out.tokens_out, out.model) == ("hold it", 1234, 56, "other-model")
    assert fake.stats()["models"] == {"other-model": 1}


def test_json_mode_reply_parses(fake: FakeOpenAI) -> None:
    fake.script([{"mode": "normal"}, {"mode": "normal", "direction": "hold", "confidence": 0.25}])
    with client(fake) as c:
        first = json.loads(c.complete([("user", "Signal: SELL GBPUSD. Explain.")], json_mode=True).text)
        second = json.loads(c.complete(MESSAGES, json_mode=True).text)
    assert first["direction"] == "sell" and first["confidence"] == 0.7 and "sell" in first["rationale"]
    assert second["direction"] == "hold" and second["confidence"] == 0.25
    fake.script([{"mode": "normal", "direction_by_model": {"contrarian": "sell"}, "times": 2}])
    with client(fake) as c:
        assert json.loads(c.complete(MESSAGES, json_mode=True, model="contrarian").text)["direction"] == "sell"
        assert json.loads(c.complete(MESSAGES, json_mode=True).text)["direction"] == "buy"
    assert fake.stats()["last_request"]["body"]["response_format"] == {"type": "json_object"}


def test_slow_reply_within_the_timeout_succeeds(fake: FakeOpenAI) -> None:
    fake.script([{"mode": "slow", "delay": 0.2}])
    with client(fake) as c:
        out = c.complete(MESSAGES, timeout=10.0)
    assert out.latency_s >= 0.2 and "buy" in out.text


def test_keep_alive_reuses_one_connection_and_recovers_after_a_drop(fake: FakeOpenAI) -> None:
    with client(fake) as c:
        for _ in range(5):
            c.complete(MESSAGES)
        assert fake.stats()["connections"] == 1
        fake.script([{"mode": "drop"}])
        with pytest.raises(AdapterError) as ei:
            c.complete(MESSAGES)
        assert ei.value.kind == "connection" and ei.value.status is None and ei.value.retryable
        for _ in range(3):
            assert "buy" in c.complete(MESSAGES).text
    stats = fake.stats()
    assert stats["connections"] == 2 and stats["requests"] == 9
    assert stats["by_mode"] == {"normal": 8, "drop": 1}


def test_a_keep_alive_connection_closed_by_the_server_is_replaced_before_sending(fake: FakeOpenAI) -> None:
    # the server closes after replying without announcing it: the idle socket has gone stale
    fake.script([{"mode": "normal", "close_after": True}])
    with client(fake) as c:
        c.complete(MESSAGES)
        assert fake.wait_for("open_connections", 0)["open_connections"] == 0
        c.complete(MESSAGES)  # must not fail with "connection"
    assert fake.stats()["connections"] >= 2


# -- failures ----------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, "", "sk-wrong-Aa1Bb2Cc3Dd4Ee5"])
def test_missing_or_wrong_key_is_auth(fake: FakeOpenAI, key: str | None) -> None:
    with client(fake, key) as c, pytest.raises(AdapterError) as ei:
        c.complete(MESSAGES)
    err = ei.value
    assert (err.kind, err.status, err.retryable) == ("auth", 401, False)
    assert "Incorrect API key" in str(err)
    assert_no_key(err, KEY, *([key] if key else []))
    assert fake.stats()["authorized"] == 0


def test_server_error_body_holding_the_key_is_redacted(fake: FakeOpenAI) -> None:
    fake.script([{"mode": "status", "status": 401,
                  "message": f"Incorrect API key provided: {KEY}. Also seen: {OTHER_KEY}; "
                             f"Authorization: Bearer {KEY}"}])
    with client(fake) as c, pytest.raises(AdapterError) as ei:
        c.complete(MESSAGES)
    assert ei.value.kind == "auth" and "Incorrect API key provided: ***" in str(ei.value)
    assert_no_key(ei.value, KEY, OTHER_KEY)


def test_429_with_retry_after_seconds_and_http_date(fake: FakeOpenAI) -> None:
    t0 = time.time()
    when = email.utils.formatdate(t0 + 30, usegmt=True)
    fake.script([{"mode": "status", "status": 429, "retry_after": 2, "message": "Rate limit reached"},
                 {"mode": "status", "status": 429, "retry_after": when},
                 {"mode": "status", "status": 429, "retry_after": "soon"},
                 {"mode": "status", "status": 429}])
    errors = []
    with client(fake) as c:
        for _ in range(4):
            with pytest.raises(AdapterError) as ei:
                c.complete(MESSAGES)
            errors.append(ei.value)
    t1 = time.time()
    assert all(e.kind == "rate_limited" and e.status == 429 and e.retryable for e in errors)
    assert errors[0].retry_after == 2.0 and "Rate limit reached" in str(errors[0])
    # the date (whole seconds) less the time it was read at, some time between t0 and t1 (however
    # long a loaded machine took in between)
    due = math.floor(t0 + 30)
    assert errors[1].retry_after is not None and due - t1 - 1e-3 <= errors[1].retry_after <= due - t0 + 1e-3
    assert errors[2].retry_after is None and errors[3].retry_after is None


def test_retry_after_beyond_the_cap_is_capped(fake: FakeOpenAI) -> None:
    fake.script([{"mode": "status", "status": 429, "retry_after": "Fri, 31 Dec 9999 23:59:59 GMT"},
                 {"mode": "status", "status": 429, "retry_after": 1e12},
                 {"mode": "status", "status": 503, "retry_after": "86400"}])
    with client(fake) as c:
        for kind in ("rate_limited", "rate_limited", "server_error"):
            with pytest.raises(AdapterError) as ei:
                c.complete(MESSAGES)
            assert (ei.value.kind, ei.value.retry_after) == (kind, MAX_RETRY_AFTER_S)
    assert MAX_RETRY_AFTER_S == 300.0


@pytest.mark.parametrize(("step", "kind", "retry_after"), [
    ({"status": 500}, "server_error", None),
    ({"status": 502}, "server_error", None),
    ({"status": 503, "retry_after": 7}, "server_error", 7.0),
    ({"status": 400, "message": "max_tokens is too large"}, "client_error", None),
    ({"status": 404}, "client_error", None),
    ({"status": 403}, "auth", None),
])
def test_status_codes_map_to_kinds(fake: FakeOpenAI, step: dict, kind: str,
                                   retry_after: float | None) -> None:
    fake.script([{"mode": "status", **step}])
    with client(fake) as c:
        with pytest.raises(AdapterError) as ei:
            c.complete(MESSAGES)
        assert c.complete(MESSAGES).status == 200  # a fresh connection after the error
    assert (ei.value.kind, ei.value.status, ei.value.retry_after) == (kind, step["status"], retry_after)
    assert str(ei.value).startswith(f"{kind}: HTTP {step['status']} from fakeprov")
    assert step.get("message", "scripted status") in str(ei.value)
    assert fake.stats()["connections"] == 2


@pytest.mark.parametrize("mode", ["malformed", "bad_shape"])
def test_malformed_and_bad_shape_replies(fake: FakeOpenAI, mode: str) -> None:
    fake.script([{"mode": mode}])
    with client(fake) as c:
        with pytest.raises(AdapterError) as ei:
            c.complete(MESSAGES)
        assert c.complete(MESSAGES).status == 200
    assert (ei.value.kind, ei.value.status) == ("malformed", 200)


def test_content_that_is_not_a_string_is_malformed(fake: FakeOpenAI) -> None:
    fake.script([{"mode": "normal", "content": ["a", "list"]}])
    with client(fake) as c, pytest.raises(AdapterError, match="choices") as ei:
        c.complete(MESSAGES)
    assert ei.value.kind == "malformed"


def test_oversized_reply_is_malformed(fake: FakeOpenAI) -> None:
    fake.script([{"mode": "normal", "content": "x" * 200_000}])
    with client(fake, max_response_bytes=10_000) as c:
        with pytest.raises(AdapterError, match="max_response_bytes") as ei:
            c.complete(MESSAGES)
        assert ei.value.kind == "malformed"
        fake.script([{"mode": "normal", "content": "y" * 9_000}])
        assert c.complete(MESSAGES).text == "y" * 9_000  # under the limit, same client


@pytest.mark.parametrize(("status", "kind"), [(200, "malformed"), (401, "auth"), (403, "auth"),
                                              (500, "server_error"), (429, "rate_limited"),
                                              (400, "client_error")])
def test_json_nested_too_deeply_is_an_adapter_error(status: int, kind: str) -> None:
    # deeper than msgspec decodes: its RecursionError must become the kind the status calls for
    for body in (b"[" * 2000, b'{"error": ' + b"[" * 2000 + b"]" * 2000 + b"}"):
        with RawServer([(0.0, reply(status, body))]) as server, \
                OpenAICompatibleClient(prof(server.url), KEY) as c, pytest.raises(AdapterError) as ei:
            c.complete(MESSAGES, timeout=5.0)
        assert (ei.value.kind, ei.value.status) == (kind, status)
        assert len(str(ei.value)) < 400
        assert_no_key(ei.value)


def test_slow_reply_past_the_deadline_times_out_on_time(fake: FakeOpenAI) -> None:
    fake.script([{"mode": "slow", "delay": 5.0}])
    with client(fake) as c:
        t0 = time.monotonic()
        with pytest.raises(AdapterError) as ei:
            c.complete(MESSAGES, timeout=0.5)
        elapsed = time.monotonic() - t0
        assert (ei.value.kind, ei.value.status, ei.value.retryable) == ("timeout", None, True)
        assert 0.5 <= elapsed < 4.0  # (the reply would take 5 s; slack for a loaded machine)
        assert "buy" in c.complete(MESSAGES).text  # the server moved on; so did the client
    assert fake.wait_for("in_flight", 0)["in_flight"] == 0  # it noticed the client leave


def test_hang_times_out(fake: FakeOpenAI) -> None:
    fake.script([{"mode": "hang"}])
    with client(fake) as c:
        t0 = time.monotonic()
        with pytest.raises(AdapterError) as ei:
            c.complete(MESSAGES, timeout=0.3)
        assert ei.value.kind == "timeout"
        assert time.monotonic() - t0 < 0.3 + 5.0  # (the server hangs for an hour; slack for a loaded machine)


DRIP_HEADERS = [(0.0, b"HTTP/1.1 200 OK\r\n"), *[(0.2, b"X-Drip: 1\r\n")] * 50]
DRIP_CHUNKS = [(0.0, (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n")),
               *[(0.1, b"1\r\n"), (0.1, b" \r\n")] * 50]
DRIP_BODY = [(0.0, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"),
             *[(0.2, b" ")] * 50]


@pytest.mark.parametrize("steps", [DRIP_HEADERS, DRIP_CHUNKS, DRIP_BODY], ids=["headers", "chunks", "body"])
def test_a_server_dripping_its_reply_times_out_on_time(steps: list[tuple[float, bytes]]) -> None:
    # each read makes progress, so only the overall deadline can end the attempt
    with RawServer(steps) as server, OpenAICompatibleClient(prof(server.url), KEY) as c:
        t0 = time.monotonic()
        with pytest.raises(AdapterError) as ei:
            c.complete(MESSAGES, timeout=1.0)
        elapsed = time.monotonic() - t0
    assert (ei.value.kind, ei.value.status, ei.value.retryable) == ("timeout", None, True)
    assert 1.0 <= elapsed < 1.0 + 5.0  # the drip lasts 10 s (slack for a loaded machine)


def test_profile_timeout_is_the_default(fake: FakeOpenAI) -> None:
    fake.script([{"mode": "hang"}])
    with OpenAICompatibleClient(prof(fake.url, timeout_s=0.3), KEY) as c, pytest.raises(AdapterError) as ei:
        c.complete(MESSAGES)
    assert ei.value.kind == "timeout"


def test_nothing_listening_is_connection() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    with OpenAICompatibleClient(prof(url), KEY) as c, pytest.raises(AdapterError) as ei:
        c.complete(MESSAGES, timeout=5.0)
    assert (ei.value.kind, ei.value.status) == ("connection", None)
    assert_no_key(ei.value)


def test_dns_failure_is_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_dns(*args: object, **kw: object) -> list:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)  # no real resolver: it may be slow or absent here
    with OpenAICompatibleClient(prof("https://api.provider.invalid/v1"), KEY) as c, \
            pytest.raises(AdapterError, match="cannot resolve 'api.provider.invalid'") as ei:
        c.complete(MESSAGES, timeout=5.0)
    assert ei.value.kind == "connection"


class Resolver:
    """``socket.getaddrinfo`` for a test: the stand-in for a DNS server, which a test cannot
    run (the only thing patched here; the HTTP exchange that follows is real). ``slow`` names
    take ``delay`` seconds then fail, ``alias`` names resolve as 127.0.0.1, anything else goes
    to the real resolver; every call is recorded with the thread that made it."""

    def __init__(self, *, slow: str = "", alias: str = "", delay: float = 5.0) -> None:
        self.slow, self.alias, self.delay = slow, alias, delay
        self.released = threading.Event()
        self.calls: list[tuple[str, str]] = []
        self._real = socket.getaddrinfo

    def __call__(self, host: str, *args: object, **kw: object) -> list:
        self.calls.append((host, threading.current_thread().name))
        if host == self.slow:
            self.released.wait(self.delay)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return self._real("127.0.0.1" if host == self.alias else host, *args, **kw)  # type: ignore[arg-type]


def test_slow_name_resolution_times_out_on_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A resolver that answers after 5 s cannot hold a 0.5 s call past its deadline: the lookup
    is waited for only as long as the deadline allows, and the call fails as a ``timeout``."""
    resolver = Resolver(slow="api.slow-dns.invalid")
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    try:
        with OpenAICompatibleClient(prof("https://api.slow-dns.invalid/v1"), KEY) as c:
            t0 = time.monotonic()
            with pytest.raises(AdapterError) as ei:
                c.complete(MESSAGES, timeout=0.5)
            elapsed = time.monotonic() - t0
    finally:
        resolver.released.set()  # the lookup thread may finish now
    assert (ei.value.kind, ei.value.status, ei.value.retryable) == ("timeout", None, True)
    assert 0.5 <= elapsed < 4.0  # (the lookup would take 5 s; slack for a loaded machine)
    assert_no_key(ei.value)
    assert [h for h, _ in resolver.calls] == ["api.slow-dns.invalid"]


def test_names_resolve_within_the_deadline_and_literals_need_no_lookup(fake: FakeOpenAI,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    resolver = Resolver(alias="api.fast-dns.test")
    caller = threading.current_thread().name
    # a named host over plain http is sent no key (it might not be this machine): a server that
    # takes none; the loopback literals get the key
    with FakeOpenAI() as keyless:
        monkeypatch.setattr(socket, "getaddrinfo", resolver)
        for host, server, key in (("api.fast-dns.test", keyless, None), ("127.0.0.1", fake, KEY),
                                  ("localhost", fake, KEY)):
            p = prof(server.url.replace("127.0.0.1", host), api_key_env="FAKE_API_KEY" if key else "")
            with OpenAICompatibleClient(p, key) as c:
                assert "buy" in c.complete(MESSAGES, timeout=5.0).text
        monkeypatch.undo()
    threads = dict(resolver.calls)
    assert threads["api.fast-dns.test"] != caller  # looked up where a slow answer can be left behind
    assert threads.get("127.0.0.1", caller) == caller and threads.get("localhost", caller) == caller


def test_https_to_a_plain_http_server_is_connection(fake: FakeOpenAI) -> None:
    url = fake.url.replace("http://", "https://")
    with OpenAICompatibleClient(prof(url), KEY) as c, pytest.raises(AdapterError) as ei:
        c.complete(MESSAGES, timeout=5.0)
    assert ei.value.kind == "connection" and "TLS" in str(ei.value)
    assert_no_key(ei.value)


class DripTLSServer:
    """A server that answers a TLS ClientHello slowly: ``flight(hello)`` is sent ``chunk`` bytes
    every 0.3 s (20 sends, 6 s, at most). Each of the client's handshake reads makes progress,
    so only a deadline over the whole handshake ends the attempt on time."""

    def __init__(self, flight: Callable[[bytes], bytes], chunk: int) -> None:
        self.flight, self.chunk = flight, chunk
        self.stopping = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"https://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            try:
                data = self.flight(conn.recv(65536))
                for i in range(0, min(len(data), 20 * self.chunk), self.chunk):
                    if i and self.stopping.wait(0.3):
                        return
                    conn.sendall(data[i:i + self.chunk])
            except OSError:
                return

    def __enter__(self) -> DripTLSServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(5.0)
        self.sock.close()


def _record_header(hello: bytes) -> bytes:
    """A handshake record that announces 16 KiB and starts a ServerHello it never finishes."""
    return b"\x16\x03\x03\x40\x00\x02" + b"\x00" * 19


def _real_server_flight(hello: bytes) -> bytes:
    """The first flight of a real TLS server (a self-signed certificate) answering ``hello``:
    ServerHello, then the certificate, which arrives too late to be refused."""
    import datetime
    import ssl
    import tempfile

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as tmp:
        pem = Path(tmp) / "server.pem"
        pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()) + cert.public_bytes(serialization.Encoding.PEM))
        ctx.load_cert_chain(pem)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_side=True)
    incoming.write(hello)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:  # it has answered and waits for the client's next flight
        pass
    return outgoing.read()


@pytest.mark.parametrize("flight,chunk", [(_record_header, 1), (_real_server_flight, 32)],
                         ids=["record", "real-server"])
def test_a_server_dripping_its_tls_handshake_times_out_on_time(flight: Callable[[bytes], bytes],
                                                               chunk: int) -> None:
    """A TLS handshake dripped over 6 s cannot hold a 1 s call past its deadline: the deadline
    bounds connect + handshake + request as a whole, not each read of the handshake."""
    if flight is _real_server_flight:
        pytest.importorskip("cryptography")
    with DripTLSServer(flight, chunk) as server, OpenAICompatibleClient(prof(server.url), KEY) as c:
        t0 = time.monotonic()
        with pytest.raises(AdapterError) as ei:
            c.complete(MESSAGES, timeout=1.0)
        elapsed = time.monotonic() - t0
    assert (ei.value.kind, ei.value.status, ei.value.retryable) == ("timeout", None, True)
    # a deadline per read would last the drip: 19 pauses of 0.3 s, 5.7 s at least (slack for a loaded machine)
    assert 1.0 <= elapsed < 1.0 + 4.0
    assert_no_key(ei.value)


def test_server_killed_between_calls_is_connection() -> None:
    with FakeOpenAI() as server, OpenAICompatibleClient(prof(server.url), KEY) as c:
        c.complete(MESSAGES)
        server.kill()
        with pytest.raises(AdapterError) as ei:
            c.complete(MESSAGES, timeout=5.0)
    assert ei.value.kind == "connection"


@pytest.mark.parametrize("raw", [KEY + "\r\n", KEY + "\r", KEY + "\n", "  \t" + KEY + " \r\n"])
def test_api_key_surrounding_whitespace_is_stripped(fake: FakeOpenAI, raw: str) -> None:
    # e.g. read from a CRLF .env file
    for key in (raw, Secret(raw)):
        with client(fake, key) as c:
            assert c.complete(MESSAGES).status == 200
            assert KEY not in repr(c) and "key=set" in repr(c)
    assert fake.stats()["authorized"] == 2


@pytest.mark.parametrize("bad", [KEY[:10] + "\n" + KEY[10:], KEY[:10] + "\r\n" + KEY[10:], KEY + "\x00",
                                 KEY[:10] + "\x7f" + KEY[10:], KEY[:10] + "\u2028" + KEY[10:], KEY + "\u20ac",
                                 KEY[:10] + "\r\nX-Injected: 1\r\n" + KEY[10:]])
def test_api_key_with_control_or_non_latin1_characters_is_refused_unseen(fake: FakeOpenAI, bad: str) -> None:
    for key in (bad, Secret(bad)):
        with pytest.raises(PolicyError, match="API key holds control characters") as ei:
            client(fake, key)
        assert ei.value.__context__ is None and ei.value.__cause__ is None
        for text in (str(ei.value), repr(ei.value), "".join(traceback.format_exception(ei.value))):
            for part in (bad, KEY, KEY[:10], KEY[10:], repr(bad)[1:-1]):
                assert part not in text
    assert fake.stats()["requests"] == 0


def test_a_header_http_cannot_carry_is_a_redacted_client_error(fake: FakeOpenAI) -> None:
    # the constructor refuses such a key; should one reach the request anyway (a Secret mutated in
    # place), http.client's refusal, which quotes the header, must not escape
    bad = KEY[:10] + "\n" + KEY[10:]
    with client(fake) as c:
        c._key._value = bad  # type: ignore[union-attr]
        with pytest.raises(AdapterError) as ei:
            c.complete(MESSAGES)
    assert (ei.value.kind, ei.value.status, ei.value.retryable) == ("client_error", None, False)
    assert ei.value.__context__ is None and ei.value.__cause__ is None
    for text in (str(ei.value), repr(ei.value), "".join(traceback.format_exception(ei.value))):
        for part in (KEY[:10], KEY[10:], repr(bad)[1:-1]):
            assert part not in text
    assert fake.stats()["requests"] == 0


def test_bad_arguments() -> None:
    with pytest.raises(PolicyError):
        OpenAICompatibleClient(profile("local"))
    with pytest.raises(PolicyError, match="credentials"):
        OpenAICompatibleClient(prof("http://user:pw@127.0.0.1:1/v1"))
    with pytest.raises(PolicyError):
        OpenAICompatibleClient(prof("ftp://127.0.0.1/v1"))
    c = OpenAICompatibleClient(prof("http://127.0.0.1:1/v1"), KEY)
    assert KEY not in repr(c) and "key=set" in repr(c)
    for bad in ([], [("user",)], [{"role": "user"}], [("user", 3)]):
        with pytest.raises((ValueError, TypeError)):
            c.complete(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        c.complete(MESSAGES, timeout=0)


def test_parse_retry_after() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now=now) == 30.0
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    for bad in (None, "", "-1", "nan", "tomorrow", "Mon, 99 Foo 2024"):
        assert parse_retry_after(bad) is None
    for huge in ("1e12", "86400", "Fri, 31 Dec 9999 23:59:59 GMT",
                 email.utils.formatdate(now + 301, usegmt=True)):
        assert parse_retry_after(huge, now=now) == MAX_RETRY_AFTER_S
        assert parse_retry_after(huge, now=now, cap=10.0) == 10.0
    assert parse_retry_after(email.utils.formatdate(now + 299, usegmt=True), now=now) == 299.0
    assert parse_retry_after("86400", cap=math.inf) == 86400.0


# -- secrets -----------------------------------------------------------------------------------


def write(path: Path, text: str, mode: int) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_secret_never_shows_itself() -> None:
    s = Secret(KEY)
    for text in (repr(s), str(s), f"{s}", f"{s!r:>30}", repr([s]), repr({"k": s})):
        assert KEY not in text and "***" in text
    assert s.reveal() == KEY and s and not Secret("")
    same = s
    assert s != Secret(KEY) and s == same  # identity only
    with pytest.raises(TypeError):
        pickle.dumps(s)
    with pytest.raises(TypeError):
        Secret(123)  # type: ignore[arg-type]


def test_secrets_file_permissions(tmp_path: Path) -> None:
    path = write(tmp_path / "secrets.toml", f'OPENAI_API_KEY = "{KEY}"\nXAI_API_KEY = "xai-123456"\n', 0o644)
    with pytest.raises(SecretsError, match=f"chmod 600 {path}") as ei:
        load_secrets_file(path)
    assert isinstance(ei.value, PermissionError)
    path.chmod(0o640)
    with pytest.raises(SecretsError, match="chmod 600"):
        load_secrets_file(path)
    path.chmod(0o600)
    got = load_secrets_file(path)
    assert sorted(got) == ["OPENAI_API_KEY", "XAI_API_KEY"]
    assert got["OPENAI_API_KEY"].reveal() == KEY and isinstance(got["XAI_API_KEY"], Secret)
    path.chmod(0o400)
    assert load_secrets_file(str(path))["XAI_API_KEY"].reveal() == "xai-123456"


def test_secrets_file_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SecretsError, match="does not exist"):
        load_secrets_file(tmp_path / "missing.toml")
    with pytest.raises(SecretsError, match="not a regular file"):
        load_secrets_file(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(SecretsError, match="not a regular file"):
        load_secrets_file(fifo)  # refused without blocking on the open
    for text, match in ((f'OPENAI_API_KEY = ["{KEY}"]\n', "must be a string"),
                        ("A = 1\n", "must be a string"),
                        (f'[OPENAI]\nKEY = "{KEY}"\n', "must be a string"),
                        (f'openai_key = "{KEY}"\n', "must match"),
                        (f'"{KEY}" = "x"\n', "must match")):
        path = write(tmp_path / "s.toml", text, 0o600)
        with pytest.raises(SecretsError, match=match) as ei:
            load_secrets_file(path)
        assert_no_key(ei.value)
    path = write(tmp_path / "ok.toml", 'A_KEY = "abcdef"\n', 0o600)
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(path).st_uid + 1)
    with pytest.raises(SecretsError, match="owned by uid"):
        load_secrets_file(path)


@pytest.mark.parametrize("text", [f'OK = "x"\nOPENAI_API_KEY = "{KEY}\n',          # unterminated string
                                  f'OK = "x"\nOPENAI_API_KEY = {KEY}\n',            # bare value
                                  f'OK = "x"\nOPENAI_API_KEY "{KEY}"\n',            # no '='
                                  f'OK = "x"\nOPENAI_API_KEY = "{KEY}" "{KEY}"\n'])  # junk after value
def test_bad_toml_message_names_the_line_not_the_value(tmp_path: Path, text: str) -> None:
    path = write(tmp_path / "s.toml", text, 0o600)
    with pytest.raises(SecretsError, match="line 2") as ei:
        load_secrets_file(path)
    assert ei.value.__context__ is None and ei.value.__cause__ is None
    assert_no_key(ei.value)


def test_api_key_resolution_order(tmp_path: Path) -> None:
    p = prof("http://127.0.0.1:1/v1")  # api_key_env FAKE_API_KEY
    path = write(tmp_path / "s.toml", 'FAKE_API_KEY = "from-file-1234"\n', 0o600)
    other = write(tmp_path / "o.toml", 'FAKE_API_KEY = "from-env-file-5678"\n', 0o600)
    env = {"FAKE_API_KEY": "from-env-9012", "DYNAMIC_CORE_SECRETS": str(other)}
    assert api_key(p, secrets_file=path, environ=env).reveal() == "from-env-9012"  # type: ignore[union-attr]
    env["FAKE_API_KEY"] = ""  # empty counts as absent
    assert api_key(p, secrets_file=path, environ=env).reveal() == "from-file-1234"  # type: ignore[union-attr]
    assert api_key(p, environ=env).reveal() == "from-env-file-5678"  # type: ignore[union-attr]
    assert api_key(p, environ={}) is None
    assert api_key(p, secrets_file=write(tmp_path / "e.toml", "", 0o600), environ={}) is None
    assert api_key(profile("ollama"), secrets_file=path, environ=env) is None  # needs no key
    path.chmod(0o644)
    with pytest.raises(SecretsError):  # a bad file is loud, not silently keyless
        api_key(p, secrets_file=path, environ={})


def test_redact() -> None:
    text = (f"key={KEY} secret=hunter2-long Bearer abc.DEF-123_x "
            f"Authorization: Bearer tok-xyz-99\n{{\"authorization\": \"Basic Zm9vOmJhcg==\", \"n\": 1}} "
            f"sk-proj-AbCdEfGh12_3 api_key=plainvalue99 tiny=abc")
    out = redact(text, [Secret(KEY), "hunter2-long", "abc", ""])
    for leaked in (KEY, "hunter2-long", "abc.DEF-123_x", "tok-xyz-99", "Zm9vOmJhcg==", "sk-proj-AbCdEfGh12_3",
                   "plainvalue99"):
        assert leaked not in out
    assert "Authorization: ***" in out and '"n": 1' in out and "tiny=abc" in out  # 3 chars: too short
    assert redact("nothing to hide here", [KEY]) == "nothing to hide here"
    assert redact(f"{KEY}{KEY[:-1]}", [KEY, KEY[:-1]]) == "******"  # longest first


@contextlib.contextmanager
def _redacted_log(name: str, secrets: list) -> Iterator[tuple[logging.Logger, RedactingFilter, list[str]]]:
    """A logger with a RedactingFilter installed and a handler collecting its formatted lines."""
    logger = logging.getLogger(name)
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(self.format(record))

    handler = Collect()
    logger.addHandler(handler)
    logger.propagate = False
    filt = RedactingFilter(secrets).install(logger)
    try:
        yield logger, filt, seen
    finally:
        logger.removeHandler(handler)
        logger.removeFilter(filt)
        logger.propagate = True


def test_redacting_filter_on_a_logger() -> None:
    with _redacted_log("dynamic_core.tests.redaction", [Secret(KEY)]) as (logger, filt, seen):
        logger.warning("calling provider with key %s and header %r", KEY, {"Authorization": f"Bearer {KEY}"})
        filt.add("late-secret-1")
        try:
            raise RuntimeError(f"boom with {KEY} and late-secret-1")
        except RuntimeError:
            logger.exception("request failed")
        logging.getLogger("dynamic_core.tests.redaction.child").error("child says %s", KEY)  # via handler
    assert len(seen) == 3
    assert "calling provider with key ***" in seen[0]
    assert "RuntimeError: boom with *** and ***" in seen[1]
    assert seen[2] == "child says ***"
    for line in seen:
        assert KEY not in line and "late-secret-1" not in line


def test_client_built_from_the_secrets_file(fake: FakeOpenAI, tmp_path: Path) -> None:
    path = write(tmp_path / "s.toml", f'FAKE_API_KEY = "{KEY}"\n', 0o600)
    p = prof(fake.url)
    with OpenAICompatibleClient(p, api_key(p, environ={"DYNAMIC_CORE_SECRETS": str(path)})) as c:
        assert c.complete(MESSAGES).status == 200
    assert fake.stats()["authorized"] == 1


# -- second review: key fragments, truncated bodies, keys where they do not belong ----------------

# no shape a generic pattern knows (not sk-...): only the key itself, or a part of it, matches
XKEY = "xai-Zq9vT4mLp2Rk8WnB3yHc6JdF1sGa7QeU0oXi5VbN"


def _escaped(s: str) -> str:
    return "".join("\\u%04x" % ord(ch) for ch in s)


def assert_no_fragment(text: str, key: str = XKEY) -> None:
    """Not one run of 8 characters of ``key`` in ``text``, plain or as \\u escapes."""
    for i in range(len(key) - 7):
        part = key[i:i + 8]
        assert part not in text and _escaped(part) not in text, (part, text)


@pytest.mark.parametrize("body", [
    b" " * 780 + XKEY.encode() + b" end",                                 # straddles where the excerpt was cut
    b"x" * 700 + b" " * 90 + XKEY.encode(),
    b" " * ((64 << 10) - 20) + XKEY.encode(),                              # straddles the 64 KiB body limit
    b'{"error":{"message":"Incorrect API key provided: ' + XKEY[:-4].encode() + b'****"}}',  # echoed cut short
    b'{"error":{"message":"key ' + XKEY[6:30].encode() + b'"}}',           # any part of it
    b'{"error":{"message":"key ' + _escaped(XKEY).encode() + b'" broken',  # \u-escaped, in a body that is no JSON
    b'{"error":{"message":"key ' + _escaped(XKEY[:20]).encode() + XKEY[20:].encode() + b'" broken',
], ids=["pad780", "pad790", "pad64k", "prefix", "middle", "escaped", "half_escaped"])
def test_a_key_echoed_cut_short_split_or_escaped_in_an_error_body_is_redacted(body: bytes) -> None:
    with RawServer([(0.0, reply(401, body))]) as server, \
            OpenAICompatibleClient(prof(server.url), XKEY) as c, pytest.raises(AdapterError) as ei:
        c.complete(MESSAGES, timeout=5.0)
    assert (ei.value.kind, ei.value.status) == ("auth", 401)
    for text in (str(ei.value), repr(ei.value), "".join(traceback.format_exception(ei.value))):
        assert_no_fragment(text)


def test_redact_masks_runs_of_a_key_and_escaped_keys_and_nothing_else() -> None:
    from dynamic_core.reasoning.secrets import FRAGMENT_CHARS

    assert FRAGMENT_CHARS == 8
    for text in (XKEY[:FRAGMENT_CHARS], XKEY[-FRAGMENT_CHARS:], XKEY[5:40], _escaped(XKEY),
                 _escaped(XKEY[3:12]), XKEY[:9] + _escaped(XKEY[9:20]), "\\\\u" + _escaped(XKEY)[1:]):
        out = redact(f"before {text} after", [Secret(XKEY)])
        assert out.startswith("before ") and out.endswith(" after") and "***" in out
        assert_no_fragment(out)
    assert redact(XKEY[:7], [XKEY]) == XKEY[:7]  # 7 characters: too short to be the key
    assert redact("ordinary \\u0041 text, nothing else", [XKEY]) == "ordinary \\u0041 text, nothing else"
    assert redact(f"{XKEY}{XKEY[:-1]}", [XKEY, XKEY[:-1]]) == "******"  # two keys side by side: two
    with _redacted_log("dynamic_core.tests.fragments", [Secret(XKEY)]) as (logger, _, seen):
        logger.warning("server said: Incorrect API key provided: %s****", XKEY[:-4])
        logger.warning("escaped: %s", _escaped(XKEY))
    assert len(seen) == 2
    for line in seen:
        assert_no_fragment(line)


@pytest.mark.parametrize("body", [b'{"choices":[{"message":{"content":"fine"}}],"model":"m"}',  # valid JSON
                                  b'{"choices":[{"message":'], ids=["valid_json", "cut_json"])
def test_a_body_shorter_than_its_content_length_is_a_connection_error(body: bytes) -> None:
    # the server promises 1000 bytes, sends fewer and closes: not a reply, whatever the bytes say
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    with RawServer([(0.0, head + body)]) as server, OpenAICompatibleClient(prof(server.url), KEY) as c, \
            pytest.raises(AdapterError) as ei:
        c.complete(MESSAGES, timeout=5.0)
    assert (ei.value.kind, ei.value.status, ei.value.retryable) == ("connection", None, True)
    assert "mid-reply" in str(ei.value) and f"{len(body)} bytes read" in str(ei.value)


def test_a_secrets_file_with_a_key_where_its_name_goes_never_shows_the_key(tmp_path: Path) -> None:
    # NAME and key swapped: the "name" is the key; the message must not quote it
    path = write(tmp_path / "swapped.toml", f'{XKEY} = "XAI_API_KEY"\n', 0o600)
    with pytest.raises(SecretsError, match="entry 1 has a name that is not upper-case snake case") as ei:
        load_secrets_file(path)
    for text in (str(ei.value), repr(ei.value), "".join(traceback.format_exception(ei.value))):
        assert_no_fragment(text)


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/v1?key=AIzaSyD-9tSrke72PouQMnMX",
                                 "https://example.com/v1?api-version=1&key=AIzaSyD-9tSrke72PouQMnMX",
                                 "http://127.0.0.1:9/v1#AIzaSyD-9tSrke72PouQMnMX",
                                 "ftp://127.0.0.1:9/v1?key=AIzaSyD-9tSrke72PouQMnMX"])
def test_a_base_url_with_a_query_string_is_refused_without_showing_it(url: str) -> None:
    with pytest.raises(PolicyError) as ei:
        profile("grok", {"base_url": url, "api_key_env": ""})
    assert "AIzaSyD" not in str(ei.value) and "base_url" in str(ei.value)
    if not url.startswith("ftp"):
        assert "secrets file" in str(ei.value)
    with pytest.raises(PolicyError) as ei:
        OpenAICompatibleClient(ProviderProfile(name="grok", base_url=url, model="m"))
    assert "AIzaSyD" not in str(ei.value)


def test_a_key_never_goes_over_plain_http_to_another_machine() -> None:
    # refused before any connection: the key would travel in cleartext
    for url in ("http://192.0.2.2:8000/v1", "http://gpu-box:8000/v1", "http://[2001:db8::1]:8000/v1"):
        with pytest.raises(PolicyError, match="cleartext.*https://"):
            profile("deepseek", {"base_url": url})  # takes a key ($DEEPSEEK_API_KEY)
        keyless = profile("deepseek", {"base_url": url, "api_key_env": ""})  # a server that takes none
        assert keyless.base_url == url
        with pytest.raises(PolicyError, match="cleartext") as ei:
            OpenAICompatibleClient(keyless, XKEY)  # a key given anyway
        assert_no_fragment(str(ei.value))
        OpenAICompatibleClient(keyless, None).close()
    for url in ("https://192.0.2.2:8443/v1", "http://127.0.0.1:9/v1", "http://localhost:9/v1", "http://[::1]:9/v1",
                "http://127.8.0.1:9/v1"):
        assert profile("deepseek", {"base_url": url}).base_url == url  # TLS, or this machine
        OpenAICompatibleClient(prof(url), XKEY).close()
