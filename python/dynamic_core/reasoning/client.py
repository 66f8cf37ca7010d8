"""A small, strict client for OpenAI-compatible chat completions over real HTTP.

Standard library only (``http.client``, ``ssl``): one keep-alive connection per client, one
overall deadline per attempt (name lookup + connect + send + read), every failure an
:class:`~dynamic_core.errors.AdapterError` whose ``kind`` says what to do next (retry, back off,
give up) and whose message never carries the API key. Retrying is the caller's business: the
client makes exactly one attempt per call.
"""

from __future__ import annotations

import email.utils
import functools
import http.client
import io
import ipaddress
import math
import select
import socket
import ssl
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from datetime import timezone
from types import TracebackType
from typing import Any

import msgspec

from ..errors import AdapterError, PolicyError
from .profiles import ProviderProfile, check_base_url, check_key_transport
from .secrets import Secret, redact

__all__ = ["DEFAULT_MAX_RESPONSE_BYTES", "MAX_RETRY_AFTER_S", "Completion", "OpenAICompatibleClient",
           "parse_retry_after"]

DEFAULT_MAX_RESPONSE_BYTES = 4 << 20
"""Largest response body a client reads by default (a rationale is a few KiB)."""

MAX_RETRY_AFTER_S = 300.0
"""Longest wait :func:`parse_retry_after` returns by default: a ``Retry-After`` of a day or a
date in the year 9999 is a server bug, not a reason to give up on the provider."""

_CHUNK = 64 << 10
_ERROR_BODY_BYTES = 64 << 10  # enough for any error JSON; the excerpt is 200 characters anyway
_EXCERPT_CHARS = 200


class Completion(msgspec.Struct, frozen=True):
    """One successful chat completion.

    Attributes
    ----------
    text : str
        ``choices[0].message.content``.
    model : str
        The model that answered (as the server reports it, else the one requested).
    tokens_in, tokens_out : int
        ``usage.prompt_tokens`` / ``usage.completion_tokens``; estimated as ``ceil(chars / 4)``
        when the server does not report them.
    latency_s : float
        Wall time of the attempt, connect to last byte.
    status : int
        HTTP status (2xx).
    """

    text: str
    model: str
    tokens_in: int
    tokens_out: int
    latency_s: float
    status: int


def parse_retry_after(value: str | None, *, now: float | None = None,
                      cap: float = MAX_RETRY_AFTER_S) -> float | None:
    """Seconds to wait from a ``Retry-After`` header value.

    Parameters
    ----------
    value : str or None
        Delta-seconds (``"2"``, also ``"1.5"``) or an HTTP-date.
    now : float, optional
        The current POSIX time (default :func:`time.time`), for an HTTP-date.
    cap : float
        Longest wait returned (default :data:`MAX_RETRY_AFTER_S`): a longer one, in either
        form, gives ``cap``.

    Returns
    -------
    float or None
        Seconds in ``[0, cap]`` (a date in the past gives 0.0); ``None`` when absent or
        unparseable.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return min(seconds, cap) if math.isfinite(seconds) and seconds >= 0.0 else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:  # "-0000" dates parse naive; HTTP-dates are UTC by definition
        when = when.replace(tzinfo=timezone.utc)
    base = time.time() if now is None else now
    return min(max(0.0, when.timestamp() - base), cap)


def _estimate_tokens(chars: int) -> int:
    return -(-chars // 4)


_RESOLVER_THREADS = 4
"""Name lookups in flight at most, all clients together. A lookup runs on a thread of its own
so that a slow resolver holds that thread, not the call; past the deadline the call gives up
and the thread finishes (or hangs) unwatched."""

_resolver_slots = threading.BoundedSemaphore(_RESOLVER_THREADS)


def _time_left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0.0:
        raise TimeoutError("deadline passed")
    return left


def _needs_lookup(host: str) -> bool:
    if host == "localhost":  # /etc/hosts, not a DNS server
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return True
    return False


def _resolve(host: str, port: int, deadline: float) -> list[tuple[Any, ...]]:
    """``getaddrinfo`` for a TCP connection to ``host``, waited for until ``deadline`` at most
    (then :class:`TimeoutError`); a lookup that fails raises its ``socket.gaierror``.

    The lookup runs on a daemon thread rather than a ``concurrent.futures`` pool: the pool's
    workers are joined at interpreter exit, so a resolver that hangs would hold the exit too.
    """
    if not _needs_lookup(host):
        return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    if not _resolver_slots.acquire(timeout=_time_left(deadline)):
        raise TimeoutError("every resolver thread is busy")
    result: Future[list[tuple[Any, ...]]] = Future()

    def lookup() -> None:
        try:
            result.set_result(socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM))
        except Exception as e:  # noqa: BLE001 - handed to the waiting call, which classifies it
            result.set_exception(e)
        finally:
            _resolver_slots.release()

    try:
        threading.Thread(target=lookup, name="dynamic-core-resolve", daemon=True).start()
    except BaseException:
        _resolver_slots.release()
        raise
    return result.result(timeout=_time_left(deadline))  # its TimeoutError is the builtin one


def _connect(address: tuple[str, int], timeout: float | None = None,
             source_address: tuple[str, int] | None = None, *, deadline: float) -> socket.socket:
    """``socket.create_connection`` with the name lookup and each connect attempt bounded by
    ``deadline`` (``timeout``, what http.client passes, is superseded by it)."""
    host, port = address
    error: OSError | None = None
    for family, kind, proto, _, sockaddr in _resolve(host, port, deadline):
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(_time_left(deadline))
            if source_address is not None:
                sock.bind(source_address)
            sock.connect(sockaddr)
            # what is left for the TLS handshake: CPython's do_handshake takes the socket's
            # timeout as one deadline for the whole handshake (every read of it together), so
            # a server dripping its handshake cannot stretch the attempt past ``deadline``
            # (test_a_server_dripping_its_tls_handshake_times_out_on_time)
            sock.settimeout(_time_left(deadline))
            return sock
        except OSError as e:  # TimeoutError included: the next address fails at once then
            sock.close()
            error = e
    raise error if error is not None else OSError(f"no address found for {host!r}")


def _header_safe(value: str) -> bool:
    """``value`` fits an HTTP header value: Latin-1, and no control characters."""
    return all(" " <= ch <= "\xff" and not "\x7f" <= ch <= "\x9f" for ch in value)


def _socket_dropped(sock: socket.socket) -> bool:
    """An idle keep-alive socket that is readable was closed by the server (EOF) or holds bytes
    nobody asked for; either way it must not carry the next request."""
    try:
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
            return bool(poller.poll(0))
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable)
    except (OSError, ValueError):
        return True


class _DeadlineReader(io.RawIOBase):
    """``sock.makefile("rb", buffering=0)`` with every read bounded by an overall deadline (a
    :func:`time.monotonic` time): the socket's timeout is the time left before each read, and
    a read at or past the deadline raises :class:`TimeoutError`. A server that drips a byte
    at a time cannot stretch the attempt past it."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._sock = sock
        self._raw = sock.makefile("rb", buffering=0)
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._raw.fileno()

    def readinto(self, buffer: Any) -> int | None:
        left = self._deadline - time.monotonic()
        if left <= 0.0:
            raise TimeoutError("deadline passed")
        self._sock.settimeout(left)
        return self._raw.readinto(buffer)

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


class _DeadlineResponse(http.client.HTTPResponse):
    """An HTTP response whose status line, headers, chunk sizes and body are all read against
    the attempt's overall ``deadline`` (see :class:`_DeadlineReader`)."""

    def __init__(self, sock: socket.socket, debuglevel: int = 0, method: str | None = None,
                 url: str | None = None, *, deadline: float) -> None:
        super().__init__(sock, debuglevel, method, url)
        unbounded, self.fp = self.fp, io.BufferedReader(_DeadlineReader(sock, deadline))
        unbounded.close()


def _normalise_messages(messages: Sequence[tuple[str, str]] | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if isinstance(m, Mapping):
            msg = dict(m)
        elif isinstance(m, (tuple, list)) and len(m) == 2:
            msg = {"role": m[0], "content": m[1]}
        else:
            raise ValueError(f"messages[{i}] must be a (role, content) pair or a mapping with role and content")
        if not isinstance(msg.get("role"), str) or not msg["role"]:
            raise ValueError(f"messages[{i}] has no role")
        if not isinstance(msg.get("content"), str):
            raise TypeError(f"messages[{i}] content must be a str, got {type(msg.get('content')).__name__}")
        out.append(msg)
    if not out:
        raise ValueError("messages is empty")
    return out


class OpenAICompatibleClient:
    """Chat completions from one OpenAI-compatible provider.

    Keeps one keep-alive HTTP(S) connection to the host of ``profile.base_url`` (certificates
    checked with the default SSL context) and opens a fresh one when the server has closed it
    or after any error. Not thread-safe: use one client per thread.

    Parameters
    ----------
    profile : ProviderProfile
        An ``openai-compatible`` profile; ``base_url`` may carry a path prefix
        (``http://127.0.0.1:8000/v1``).
    api_key : Secret or str, optional
        Sent as ``Authorization: Bearer <key>``; ``None`` or empty sends no header. Surrounding
        whitespace (the ``\r\n`` of a key read from a CRLF file) is stripped.
    max_response_bytes : int
        A larger response body is not read further and fails with kind ``malformed``.

    Raises
    ------
    PolicyError
        A ``local`` profile, a ``base_url`` that is not ``http(s)://host[:port][/path]`` (no
        credentials, no query string), an ``api_key`` with a plain ``http://`` ``base_url``
        whose host is not this machine (the key would travel in cleartext), or an ``api_key``
        that still holds control characters or characters outside Latin-1 once stripped (an HTTP
        header cannot carry them; the message does not quote the key).
    """

    def __init__(self, profile: ProviderProfile, api_key: Secret | str | None = None, *,
                 max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES) -> None:
        if profile.kind != "openai-compatible":
            raise PolicyError(f"provider {profile.name!r} is {profile.kind!r}, not an HTTP provider")
        url = check_base_url(profile.name, profile.base_url)
        port = url.port
        if max_response_bytes < 1:
            raise ValueError("max_response_bytes must be positive")
        from .. import __version__  # here, not at import time: the package may still be importing

        self.profile = profile
        self.max_response_bytes = int(max_response_bytes)
        self._https = url.scheme == "https"
        self._host = url.hostname
        self._port = port or (443 if self._https else 80)
        self._path = url.path.rstrip("/") + "/chat/completions"  # (check_base_url refuses a query)
        if isinstance(api_key, str):
            api_key = Secret(api_key)
        if api_key and not _header_safe(api_key.reveal()):
            raise PolicyError(f"provider {profile.name!r}: the API key holds control characters or "
                              "characters outside Latin-1 (key not shown); check how it was stored")
        check_key_transport(profile.name, profile.base_url, bool(api_key))  # never a key in cleartext
        self._key: Secret | None = api_key if api_key else None
        self._headers = {"Content-Type": "application/json", "Accept": "application/json",
                         "User-Agent": f"dynamic-core/{__version__}"}
        self._ssl: ssl.SSLContext | None = ssl.create_default_context() if self._https else None
        self._conn: http.client.HTTPConnection | None = None

    def __repr__(self) -> str:
        return (f"OpenAICompatibleClient({self.profile.name!r}, {self._host}:{self._port}, "
                f"key={'set' if self._key else 'none'})")

    # -- connection -------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection (the next call opens a fresh one)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __enter__(self) -> OpenAICompatibleClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _connected(self, deadline: float) -> tuple[http.client.HTTPConnection, socket.socket]:
        conn = self._conn
        if conn is not None and (conn.sock is None or _socket_dropped(conn.sock)):
            self.close()
            conn = None
        if conn is None:
            timeout = _time_left(deadline)
            if self._https:
                conn = http.client.HTTPSConnection(self._host, self._port, timeout=timeout, context=self._ssl)
            else:
                conn = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
            # connect() opens its socket through this attribute (http.client's hook, set in
            # __init__); ours holds the name lookup to the deadline as well
            conn._create_connection = functools.partial(_connect, deadline=deadline)  # type: ignore[attr-defined]
            self._conn = conn
            conn.connect()
        assert conn.sock is not None
        return conn, conn.sock

    def _read_body(self, resp: http.client.HTTPResponse, limit: int, strict: bool) -> bytes:
        """The body, a chunk at a time (each read held to the deadline by the response's
        reader, :class:`_DeadlineReader`); at most ``limit`` bytes (more:
        ``malformed`` when ``strict``, else the first ``limit`` bytes, the rest left unread)."""
        if strict and resp.length is not None and resp.length > limit:
            raise AdapterError("malformed", f"{self.profile.name} sent a {resp.length}-byte body, "
                               f"more than max_response_bytes={limit}", status=resp.status)
        chunks: list[bytes] = []
        total = 0
        while True:
            if resp.length == 0:  # read1 does not mark a Content-Length body done; read() does
                resp.read()
                break
            chunk = resp.read1(_CHUNK)
            if not chunk:
                if resp.length:  # closed before the Content-Length it promised: not a reply
                    raise http.client.IncompleteRead(b"".join(chunks), resp.length)
                break
            total += len(chunk)
            if total > limit:
                if strict:
                    raise AdapterError("malformed", f"{self.profile.name} sent more than "
                                       f"max_response_bytes={limit}", status=resp.status)
                chunks.append(chunk[: len(chunk) - (total - limit)])
                break
            chunks.append(chunk)
        return b"".join(chunks)

    # -- request ----------------------------------------------------------------------------

    def complete(self, messages: Sequence[tuple[str, str]] | Sequence[Mapping[str, Any]], *,
                 max_tokens: int = 256, temperature: float = 0.0, timeout: float | None = None,
                 json_mode: bool = False, model: str | None = None) -> Completion:
        """One chat completion: ``POST {base_url}/chat/completions``, not streamed.

        Parameters
        ----------
        messages : Sequence[tuple[str, str]] or Sequence[Mapping]
            ``(role, content)`` pairs or ``{"role", "content", ...}`` mappings, in order.
        max_tokens : int
            Upper bound of the reply's tokens.
        temperature : float
            Sampling temperature.
        timeout : float, optional
            Overall deadline of the attempt in seconds, name lookup to last byte, however slowly
            the resolver answers or the server drips its status line, headers or body (default
            ``profile.timeout_s``).
        json_mode : bool
            Ask for a JSON object (``response_format: {"type": "json_object"}``).
        model : str, optional
            Model to ask for (default ``profile.model``).

        Returns
        -------
        Completion

        Raises
        ------
        AdapterError
            ``timeout`` (deadline passed), ``connection`` (refused, reset, closed without a
            reply, DNS, TLS), ``rate_limited`` (429, with ``retry_after``), ``server_error``
            (5xx, with ``retry_after`` when the server sent one), ``auth`` (401/403),
            ``client_error`` (other 4xx, an unexpected status, or a header HTTP cannot carry),
            ``malformed`` (a 2xx body that is not JSON, is nested too deeply to decode, lacks
            ``choices[0].message.content``, or exceeds ``max_response_bytes``). ``status`` is
            set when the server answered. The message holds at most a 200-character redacted
            excerpt of the server's error.
        ValueError, TypeError
            Empty or ill-formed ``messages`` (a content that is not a str: TypeError), or a
            non-positive ``timeout``.
        """
        msgs = _normalise_messages(messages)
        timeout = self.profile.timeout_s if timeout is None else float(timeout)
        if not timeout > 0.0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        model = model or self.profile.model
        payload: dict[str, Any] = {"model": model, "messages": msgs, "max_tokens": int(max_tokens),
                                   "temperature": float(temperature), "stream": False}
        if json_mode:
            payload["response_format"] = {"type": "json_object"}
        body = msgspec.json.encode(payload)
        headers = dict(self._headers)
        if self._key is not None:
            headers["Authorization"] = f"Bearer {self._key.reveal()}"

        start = time.perf_counter()
        deadline = time.monotonic() + timeout
        name = self.profile.name
        try:
            conn, sock = self._connected(deadline)
            sock.settimeout(_time_left(deadline))  # the send; the response's reads hold to it themselves
            unsendable = None
            try:
                conn.request("POST", self._path, body=body, headers=headers)
            except ValueError as e:  # UnicodeError too: a header http.client refuses
                unsendable = type(e).__name__
            if unsendable is not None:  # outside the except: the refusal quotes the header
                raise AdapterError("client_error", f"the request to {name} cannot be sent: a header holds "
                                   f"characters HTTP does not allow ({unsendable}; value not shown)")
            conn.response_class = functools.partial(  # type: ignore[assignment]
                _DeadlineResponse, deadline=deadline)
            resp = conn.getresponse()
            status = resp.status
            ok = 200 <= status < 300
            try:
                data = self._read_body(resp, self.max_response_bytes if ok else
                                       min(self.max_response_bytes, _ERROR_BODY_BYTES), strict=ok)
                if not ok or resp.will_close or not resp.isclosed():
                    self.close()
            finally:
                # a body not read to its end (past a limit, refused) still holds the socket's
                # file: closed now, not whenever the response is collected
                resp.close()
        except AdapterError:
            self.close()
            raise
        except TimeoutError:
            self.close()
            raise AdapterError("timeout", f"no complete reply from {name} within {timeout:.3g} s") from None
        except socket.gaierror as e:
            self.close()
            raise AdapterError("connection", f"cannot resolve {self._host!r} for {name}: {e.strerror}") from None
        except http.client.RemoteDisconnected:
            self.close()
            raise AdapterError("connection", f"{name} closed the connection without a reply") from None
        except http.client.IncompleteRead as e:
            self.close()
            raise AdapterError("connection", f"{name} closed the connection mid-reply "
                               f"({len(e.partial)} bytes read)") from None
        except http.client.HTTPException as e:
            self.close()
            raise AdapterError("malformed", f"{name} did not answer in HTTP: "
                               f"{self._excerpt(type(e).__name__ + ' ' + str(e))}") from None
        except ssl.SSLError as e:
            self.close()
            raise AdapterError("connection", f"TLS with {name} failed: {self._excerpt(str(e))}") from None
        except OSError as e:
            self.close()
            what = e.strerror or type(e).__name__
            raise AdapterError("connection", f"cannot reach {name} at {self._host}:{self._port}: {what}") from None
        latency = time.perf_counter() - start
        if not ok:
            raise self._status_error(status, resp, data)
        try:
            return self._completion(data, msgs, model, latency, status)
        except AdapterError:
            self.close()  # the server is misbehaving: do not trust its connection either
            raise

    # -- replies ----------------------------------------------------------------------------

    def _excerpt(self, text: str) -> str:
        # redacted whole, then cut: a cut first could split a key and leave its first part
        text = " ".join(redact(text, (self._key,) if self._key else ()).split())
        return text if len(text) <= _EXCERPT_CHARS else text[: _EXCERPT_CHARS - 3] + "..."

    def _error_detail(self, data: bytes) -> str:
        try:
            doc = msgspec.json.decode(data)
        except (msgspec.DecodeError, RecursionError, ValueError):
            return self._excerpt(data.decode("utf-8", "replace"))  # (at most _ERROR_BODY_BYTES)
        err = doc.get("error") if isinstance(doc, dict) else None
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return self._excerpt(err["message"])
        if isinstance(err, str):
            return self._excerpt(err)
        return self._excerpt(data.decode("utf-8", "replace"))

    def _status_error(self, status: int, resp: http.client.HTTPResponse, data: bytes) -> AdapterError:
        detail = self._error_detail(data)
        where = f"HTTP {status} from {self.profile.name}" + (f": {detail}" if detail else "")
        if status == 429:
            return AdapterError("rate_limited", where, status=status,
                                retry_after=parse_retry_after(resp.getheader("Retry-After")))
        if 500 <= status < 600:
            return AdapterError("server_error", where, status=status,
                                retry_after=parse_retry_after(resp.getheader("Retry-After")))
        if status in (401, 403):
            return AdapterError("auth", where, status=status)
        # other 4xx, and statuses an API should not send (1xx, 3xx): retrying will not help
        return AdapterError("client_error", where, status=status)

    def _completion(self, data: bytes, msgs: list[dict[str, Any]], model: str, latency: float,
                    status: int) -> Completion:
        name = self.profile.name
        try:
            doc = msgspec.json.decode(data)
        except (msgspec.DecodeError, RecursionError, ValueError):
            raise AdapterError("malformed", f"{name} answered {status} with a body that is not JSON "
                               "(or nested too deeply to decode)", status=status) from None
        text = None
        choices = doc.get("choices") if isinstance(doc, dict) else None
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            message = choices[0].get("message")
            if isinstance(message, dict):
                text = message.get("content")
        if not isinstance(text, str):
            raise AdapterError("malformed", f"{name} answered {status} without choices[0].message.content",
                               status=status)
        usage = doc.get("usage")
        usage = usage if isinstance(usage, dict) else {}
        tokens_in = usage.get("prompt_tokens")
        tokens_out = usage.get("completion_tokens")
        if not isinstance(tokens_in, int) or isinstance(tokens_in, bool) or tokens_in < 0:
            tokens_in = _estimate_tokens(sum(len(m["content"]) for m in msgs))
        if not isinstance(tokens_out, int) or isinstance(tokens_out, bool) or tokens_out < 0:
            tokens_out = _estimate_tokens(len(text))
        answered_by = doc.get("model")
        return Completion(text=text, model=answered_by if isinstance(answered_by, str) and answered_by else model,
                          tokens_in=tokens_in, tokens_out=tokens_out, latency_s=latency, status=status)
