"""The control plane: a CURVE-encrypted ROUTER that applies commands between updates.

Wire format
-----------
A client sends ``[b"", payload]`` (a REQ socket does this by itself; a DEALER adds the empty
delimiter) where ``payload`` is one control command of the tagged union
:data:`~dynamic_core.payloads.ControlCommand`, e.g. msgpack or JSON::

    {"type": "set_throttle", "version": 1, "request_id": 7, "max_bars_per_s": 500.0}

and gets back ``[b"", reply]`` with a :class:`~dynamic_core.payloads.ControlReply` in the
same format as the request::

    {"type": "reply", "version": 1, "request_id": 7, "ok": true, "result": {...}, "error": null}

(A DEALER that sends ``[payload]`` without the delimiter gets ``[reply]`` back.)

Security
--------
The socket is a CURVE server with its own ``zmq.Context`` and a ZAP authenticator thread
that accepts exactly the public keys found in the authorised-keys directory. An unknown key
never completes the handshake: the client sees nothing at all (its request times out), the
server counts the refusal (``stats()["auth_refused"]``, :attr:`ControlServer.refused_keys`).
Non-CURVE peers (no key, PLAIN, a wrong server key, bytes that are not ZMTP) never reach the
handler either; a socket monitor counts their failed handshakes (``stats()["handshake_failed"]``
and, by kind, ``stats()["handshake_failures"]``: ``protocol``, ``auth``, ``no_detail``, and
``no_handshake`` for a connection dropped before any handshake event). The monitor is read by
the serving thread (in :meth:`ControlServer.serve`; an owner that polls may also register
:attr:`ControlServer.monitor_socket`).

Semantics
---------
The server does not own a thread. Its owner calls :meth:`ControlServer.serve` from the loop
that drives the engine, so every command is applied *between* updates, never concurrently
with one. For each request, in order:

1. decode; a malformed command (garbage, unknown type or field, wrong version...) gets
   ``ok=False`` with the reason and is counted; nothing else happens. The reply carries the
   command's ``request_id`` when a typed decode of that one field succeeds (it builds none of
   the others, so a huge frame costs no memory), else 0;
2. a repeated request (the same client key, ``request_id`` and command as one of its last
   ``dedupe_window`` requests, e.g. a retry after a timeout) is answered with the reply the first
   one got, and not applied or journaled again (``stats()["duplicates"]``). Pure queries
   (:data:`QUERIES`: HealthQuery, ReviewQuery) are always answered afresh; a ``request_id`` of 0
   is never deduplicated;
3. ``validate(cmd)`` (when set; :class:`~dynamic_core.transport.EngineService` sets its
   :meth:`~dynamic_core.transport.EngineService.check`) may refuse the command with
   :class:`~dynamic_core.errors.CommandRefused` before it is journaled: nothing is journaled
   that would be refused anyway;
4. ``journal_hook(raw)`` is called with the command re-encoded as canonical msgpack (decode it
   with :func:`dynamic_core.payloads.decode_command`), BEFORE it is applied; pure queries are
   not journaled (they change nothing replay could reproduce). If the hook raises, the command
   is refused (``ok=False``, "not journaled") and not applied: nothing is applied that replay
   could not reproduce;
5. ``handler(cmd)`` applies it and returns a result mapping (or None). If it raises
   :class:`~dynamic_core.errors.CommandRefused` the reply is ``ok=False`` with its message; any
   other exception is logged (``logging.getLogger("dynamic_core.transport.control")``), counted and sent back
   as ``ok=False``; the server keeps serving.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import msgspec
import zmq

from ..errors import CommandRefused, PayloadError, TransportTimeout
from ..payloads import (
    Codec,
    ControlCommand,
    ControlReply,
    HealthQuery,
    LoadPopulation,
    Pause,
    Resume,
    ReviewQuery,
    SetThrottle,
    Snapshot,
    SwapPersona,
    UpdateRouting,
    encode_command,
    plain,
)
from ._common import DEFAULT_ADDRESS, SocketOwner, attach, close_socket, readable, recv_frames, to_ms
from .keys import authorised_keys, load_keypair, load_public_key

__all__ = ["DEFAULT_CONTROL_MAX_FRAME", "QUERIES", "ControlClient", "ControlServer"]

log = logging.getLogger("dynamic_core.transport.control")

DEFAULT_CONTROL_MAX_FRAME = 64 * 1024 * 1024  # LoadPopulation may carry genome records

QUERIES: tuple[type, ...] = (HealthQuery, ReviewQuery)
"""Pure queries: they change nothing, so they are never journaled nor deduplicated."""

_HANDSHAKE_FAILURES = {
    int(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL): "protocol",
    int(zmq.EVENT_HANDSHAKE_FAILED_AUTH): "auth",
    int(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL): "no_detail",
}
_MONITOR_EVENTS = (zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
                   | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                   | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class _Handshakes:
    """Counts failed handshakes from the control socket's monitor events. libzmq's handshake
    events carry no connection, so each is matched to the oldest open connection without one;
    a connection that closes without any (bytes that are not ZMTP 3) counts as
    ``no_handshake``. The totals are exact once the connections involved have closed."""

    def __init__(self) -> None:
        self.failures = {"protocol": 0, "auth": 0, "no_detail": 0, "no_handshake": 0}
        self.succeeded = 0
        self.accepted = 0
        self._open: dict[int, bool] = {}  # fd -> a handshake event was matched to it
        self._waiting: collections.deque[int] = collections.deque()  # fds without one, oldest first

    def event(self, event: int, value: int) -> None:
        if event == zmq.EVENT_ACCEPTED:
            self.accepted += 1
            self._open[value] = False
            self._waiting.append(value)
        elif event == zmq.EVENT_DISCONNECTED:
            had = self._open.pop(value, None)
            if had is False:
                self.failures["no_handshake"] += 1
            if len(self._waiting) > 2 * len(self._open) + 64:  # closed ones: bounded under a flood
                self._waiting = collections.deque(
                    fd for fd in dict.fromkeys(self._waiting) if self._open.get(fd) is False)
        else:
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.succeeded += 1
            elif event in _HANDSHAKE_FAILURES:
                self.failures[_HANDSHAKE_FAILURES[event]] += 1
            else:
                return
            while self._waiting:
                fd = self._waiting.popleft()
                if self._open.get(fd) is False:
                    self._open[fd] = True
                    break

    @property
    def failed(self) -> int:
        return sum(self.failures.values())


class _ReplyCache:
    """The last replies per client (bounded), for answering a repeated request without applying it
    again. Keyed by (client, request_id); a hit needs the same command (by digest) too."""

    def __init__(self, per_client: int, clients: int) -> None:
        self.per_client = int(per_client)
        self.clients = int(clients)
        self._by_client: collections.OrderedDict[Any, collections.OrderedDict[int, tuple[bytes, ControlReply]]] = \
            collections.OrderedDict()

    def get(self, client: Any, rid: int, digest: bytes) -> ControlReply | None:
        seen = self._by_client.get(client)
        if seen is None:
            return None
        hit = seen.get(rid)
        if hit is None or hit[0] != digest:
            return None
        return hit[1]

    def put(self, client: Any, rid: int, digest: bytes, reply: ControlReply) -> None:
        if self.per_client <= 0:
            return
        seen = self._by_client.get(client)
        if seen is None:
            seen = self._by_client[client] = collections.OrderedDict()
            while len(self._by_client) > self.clients:
                self._by_client.popitem(last=False)  # the least recently active client
        else:
            self._by_client.move_to_end(client)
        seen[rid] = (digest, reply)
        seen.move_to_end(rid)
        while len(seen) > self.per_client:
            seen.popitem(last=False)


class _KeyRing:
    """ZAP credentials provider: the authorised public keys, with counters (runs on the
    authenticator's thread; ints and a deque under the GIL need no lock)."""

    def __init__(self, directory: str | os.PathLike, max_events: int) -> None:
        self.directory = os.fspath(directory)
        self.keys: frozenset[bytes] = frozenset()
        self.allowed = 0
        self.refused = 0
        self.refused_keys: collections.deque[str] = collections.deque(maxlen=max_events)
        self.reload()

    def reload(self) -> int:
        self.keys = frozenset(authorised_keys(self.directory))
        return len(self.keys)

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys:
            self.allowed += 1
            return True
        self.refused += 1
        self.refused_keys.append(key.decode("ascii", "replace"))  # public key: fine to keep
        return False


class _RequestIdOnly(msgspec.Struct):
    """The one field of a command an error reply needs. Unknown fields are allowed: msgspec
    skips their values without building them, so a huge field costs no memory."""

    request_id: int = 0


_RID_DECODERS = {False: msgspec.msgpack.Decoder(_RequestIdOnly), True: msgspec.json.Decoder(_RequestIdOnly)}


def _request_id_of(raw: Any, is_json: bool) -> int:
    """Best-effort ``request_id`` of a command that failed to decode, for the error reply: read
    by a typed decode that builds nothing else, 0 when it fails (garbage, or a nesting deeper
    than msgspec skips)."""
    try:
        rid = _RID_DECODERS[is_json].decode(raw).request_id
    except Exception:  # noqa: BLE001 - garbage: there is no id to find
        return 0
    return rid if 0 <= rid < 2**64 else 0


class ControlServer(SocketOwner):
    """CURVE ROUTER for control commands (see the module docstring).

    Parameters
    ----------
    address : str
        Bind address (default ``tcp://127.0.0.1:*``; read :attr:`endpoint`). Binding beyond
        loopback needs ``allow_remote=True`` even though the socket is authenticated.
    secret_key : path
        The server's ``.key_secret`` file (see :func:`~dynamic_core.transport.new_keypair`).
    authorized_keys : path
        Directory of authorised client public keys (``*.key``).
    handler : callable, optional
        ``handler(cmd) -> dict | None`` applies a command; may be set later (``server.handler
        = ...``). Without one every command gets ``ok=False``.
    journal_hook : callable, optional
        ``journal_hook(raw: bytes)`` called with each accepted command (canonical msgpack)
        before it is applied.
    fmt : {"auto", "msgpack", "json"}
        Accepted request format; replies use the request's.
    max_frame : int
        Requests above this are refused (``oversized``) before decoding; above twice this
        libzmq drops the connection.
    validate : callable, optional
        ``validate(cmd)`` raises :class:`~dynamic_core.errors.CommandRefused` for a command to
        refuse before it is journaled (may be set later).
    dedupe_window : int
        Replies remembered per client (its CURVE public key) for answering repeated requests;
        0 turns deduplication off. At most ``dedupe_clients`` clients are remembered (the least
        recently active is forgotten first).
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, *, secret_key: str | os.PathLike,
                 authorized_keys: str | os.PathLike,
                 handler: Callable[[Any], dict[str, Any] | None] | None = None,
                 journal_hook: Callable[[bytes], Any] | None = None, fmt: str = "auto",
                 max_frame: int = DEFAULT_CONTROL_MAX_FRAME, max_events: int = 1000,
                 allow_remote: bool = False, validate: Callable[[Any], Any] | None = None,
                 dedupe_window: int = 1024, dedupe_clients: int = 256) -> None:
        public, secret = load_keypair(secret_key)
        self.public_key = public.decode("ascii")
        self.handler = handler
        self.journal_hook = journal_hook
        self.validate = validate
        self._replies = _ReplyCache(dedupe_window, dedupe_clients)
        self._handshakes = _Handshakes()
        self._mon: zmq.Socket | None = None
        self._codec = Codec(ControlCommand, fmt=fmt, max_frame=max_frame)
        self._reply_codec = Codec(ControlReply)
        self._keys = _KeyRing(authorized_keys, max_events)
        # own context: a ZAP handler serves a whole context, and the feed/ingress sockets that
        # share the default context must stay unauthenticated
        from zmq.auth.thread import ThreadAuthenticator  # imports asyncio: only when a server starts

        self._ctx = zmq.Context()
        self._auth = ThreadAuthenticator(self._ctx, log=logging.getLogger("dynamic_core.transport.zap"))
        self._sock: zmq.Socket | None = None
        try:
            # the authenticator must run before the socket binds: without a ZAP handler libzmq
            # would let any CURVE client in
            self._auth.start()
            self._auth.configure_curve_callback(domain="*", credentials_provider=self._keys)
            self._sock = self._ctx.socket(zmq.ROUTER)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.setsockopt(zmq.MAXMSGSIZE, 2 * int(max_frame) + 4096)
            self._sock.curve_secretkey = secret
            self._sock.curve_publickey = public
            self._sock.curve_server = True
            # handshake failures (no key, PLAIN, wrong server key, not ZMTP) never reach ZAP:
            # only the monitor sees them. Read by the serving thread (serve()).
            self._mon = self._sock.get_monitor_socket(_MONITOR_EVENTS)
            self._mon.setsockopt(zmq.LINGER, 0)
            self.endpoint = attach(self._sock, address, bind=True, allow_remote=allow_remote)
        except Exception:
            self.close()
            raise
        del secret
        self.requests = 0
        self.accepted = 0
        self.errors = 0  # malformed commands, journal failures, handler errors
        self.handler_errors = 0
        self.journal_errors = 0
        self.duplicates = 0
        self.errors_log: collections.deque[tuple[int, str]] = collections.deque(maxlen=max_events)

    # ---- serving ------------------------------------------------------------------------------
    @property
    def monitor_socket(self) -> zmq.Socket | None:
        """The PAIR socket carrying the control socket's connection events (for an owner that
        polls: readable means :meth:`serve` has events to count). Only the serving thread may
        read it."""
        return self._mon

    def _read_monitor(self) -> None:
        mon = self._mon
        if mon is None or mon.closed:
            return
        from zmq.utils.monitor import parse_monitor_message

        for _ in range(10_000):  # bounded: a flood of connections cannot hold the loop
            if not readable(mon):
                return
            try:
                msg = parse_monitor_message(mon.recv_multipart(zmq.NOBLOCK))
            except (zmq.ZMQError, ValueError, IndexError, TypeError):
                return
            self._handshakes.event(int(msg["event"]), int(msg["value"]))

    def serve(self, timeout: float | None = 0.0, max_requests: int = 64) -> int:
        """Handle the waiting requests (up to ``max_requests``), waiting up to ``timeout``
        seconds for the first. Returns how many were handled. Call it between updates."""
        self._read_monitor()
        n = 0
        wait = timeout
        while n < max_requests:
            frames = recv_frames(self._sock, wait)
            if frames is None:
                break
            wait = 0.0
            try:
                self._handle(frames)
            except Exception as e:  # noqa: BLE001 - one request never ends the server
                self.handler_errors += 1
                log.exception("control request failed unexpectedly")
                envelope = [frames[0].bytes] + ([b""] if len(frames) > 2 and len(frames[1]) == 0 else [])
                with contextlib.suppress(Exception):
                    raw = frames[-1].buffer
                    js = self._codec.is_json(raw)
                    self._fail(envelope, _request_id_of(raw, js), f"internal error: {type(e).__name__}", js)
            n += 1
        return n

    @staticmethod
    def _client_of(frame: zmq.Frame) -> Any:
        """Who sent a request: its CURVE public key (the ZAP user id, the same across
        reconnections), else the connection's routing id."""
        try:
            user = frame.get("User-Id")
        except (zmq.ZMQError, AttributeError, TypeError, ValueError):
            user = None
        return ("key", user) if user else ("routing", frame.bytes)

    def _handle(self, frames: list[zmq.Frame]) -> None:
        self.requests += 1
        ident = frames[0].bytes
        rest = frames[1:]
        envelope = [ident]
        if rest and len(rest[0]) == 0:
            envelope.append(b"")
            rest = rest[1:]
        if len(rest) != 1:
            self._codec.count("malformed")
            self._fail(envelope, 0, f"malformed: expected one payload frame, got {len(rest)}", False)
            return
        raw = rest[0].buffer
        is_json = self._codec.is_json(raw)
        try:
            cmd = self._codec.decode(raw)
        except PayloadError as e:
            self._fail(envelope, _request_id_of(raw, is_json), str(e), is_json)
            return
        rid = cmd.request_id
        query = isinstance(cmd, QUERIES)
        canon: bytes | None = None
        key: tuple[Any, int, bytes] | None = None
        if not query:
            try:
                canon = encode_command(cmd)  # what is journaled and what a retry is compared by
            except OverflowError:  # JSON can spell an integer beyond 64 bits; msgpack cannot
                self._codec.count("invalid")
                self._fail(envelope, rid if rid < 1 << 64 else 0, "invalid: an integer does not fit in 64 bits",
                           is_json)
                return
        if not query and rid != 0 and self._replies.per_client > 0:
            key = (self._client_of(frames[0]), rid, hashlib.blake2b(canon, digest_size=16).digest())
            cached = self._replies.get(*key)
            if cached is not None:  # a retry of a request already answered: same answer, no effect
                self.duplicates += 1
                self._send(envelope, self._reply_codec.encode(cached, "json" if is_json else "msgpack"))
                return
        if self.validate is not None:
            try:
                self.validate(cmd)
            except CommandRefused as e:  # refused before it is journaled: nothing happened
                self._fail(envelope, rid, f"refused: {e}", is_json)
                return
            except Exception as e:  # a validator bug refuses, the server goes on
                self.handler_errors += 1
                log.exception("control validator raised for %s (request %d)", type(cmd).__name__, rid)
                self._fail(envelope, rid, f"{type(e).__name__}: {e}", is_json)
                return
        if self.journal_hook is not None and not query:
            try:
                self.journal_hook(canon)
            except Exception as e:  # noqa: BLE001 - a failed journal refuses the command
                self.journal_errors += 1
                log.exception("journal_hook failed; %s (request %d) refused", type(cmd).__name__, rid)
                self._fail(envelope, rid, f"not journaled, not applied: {type(e).__name__}: {e}", is_json)
                return
        if self.handler is None:
            self._fail(envelope, rid, "no handler: this server applies no commands", is_json)
            return
        try:
            result = self.handler(cmd)
        except CommandRefused as e:
            self._fail(envelope, rid, f"refused: {e}", is_json, key)
            return
        except Exception as e:  # noqa: BLE001 - decided: reply with the error, keep serving
            self.handler_errors += 1
            log.exception("control handler raised for %s (request %d)", type(cmd).__name__, rid)
            self._fail(envelope, rid, f"{type(e).__name__}: {e}", is_json, key)
            return
        reply = ControlReply(request_id=rid, ok=True, result=plain(result or {}))
        try:
            payload = self._reply_codec.encode(reply, "json" if is_json else "msgpack")
        except (TypeError, ValueError, OverflowError) as e:
            self._fail(envelope, rid, f"applied, but the result cannot be encoded: {e}", is_json, key)
            return
        self.accepted += 1
        if key is not None:
            self._replies.put(*key, reply)
        self._send(envelope, payload)

    def _fail(self, envelope: list[bytes], rid: int, error: str, is_json: bool,
              key: tuple[Any, int, bytes] | None = None) -> None:
        self.errors += 1
        self.errors_log.append((rid, error[:500]))
        reply = ControlReply(request_id=rid, ok=False, error=error[:4000])
        if key is not None:  # it was applied (or attempted): a retry gets this answer, not a second try
            self._replies.put(*key, reply)
        self._send(envelope, self._reply_codec.encode(reply, "json" if is_json else "msgpack"))

    def _send(self, envelope: list[bytes], payload: bytes) -> None:
        try:
            self._sock.send_multipart([*envelope, payload], zmq.NOBLOCK)
        except zmq.ZMQError:  # peer gone or its queue full: the reply is lost, the server goes on
            pass

    # ---- keys and stats -----------------------------------------------------------------------
    def reload_keys(self) -> int:
        """Re-read the authorised-keys directory; returns the number of keys. Applies to new
        connections (an authenticated connection stays up)."""
        return self._keys.reload()

    @property
    def refused_keys(self) -> list[str]:
        """Public keys (z85) of recently refused handshakes, oldest first."""
        return list(self._keys.refused_keys)

    def stats(self) -> dict[str, Any]:
        c = self._codec.stats()
        return {"endpoint": self.endpoint, "requests": self.requests, "accepted": self.accepted,
                "errors": self.errors, "handler_errors": self.handler_errors,
                "journal_errors": self.journal_errors, "rejected": c["rejected"], "rejects": c["rejects"],
                "duplicates": self.duplicates,
                "auth_allowed": self._keys.allowed, "auth_refused": self._keys.refused,
                "handshake_failed": self._handshakes.failed,
                "handshake_failures": dict(self._handshakes.failures),
                "authorised_keys": len(self._keys.keys)}

    def close(self, linger: float | None = None) -> None:
        if self._mon is not None:
            if self._sock is not None and not self._sock.closed:
                try:
                    self._sock.disable_monitor()
                except zmq.ZMQError:
                    pass
            close_socket(self._mon)
        super().close(linger)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if not self._ctx.closed:
            self._ctx.term()

    def __repr__(self) -> str:
        return f"ControlServer({getattr(self, 'endpoint', '?')!r}, public_key={self.public_key!r})"


_CAUSES = "(server down, a wrong server key, or this client's key not authorised?)"
"""What a request that times out may have met, for its message."""


class ControlClient(SocketOwner):
    """DEALER client of a :class:`ControlServer`, with CURVE client keys.

    Parameters
    ----------
    address : str
        The server's endpoint.
    server_key : path or str
        The server's public key: its ``.key`` file or the z85 text.
    client_key : path
        This client's ``.key_secret`` file; its ``.key`` must be in the server's authorised
        directory, or every request times out (:class:`~dynamic_core.errors.TransportTimeout`).
    fmt : {"msgpack", "json"}
    timeout : float
        Default seconds to wait for a reply.

    Replies are matched by ``request_id``: a reply to another request (e.g. the late answer to
    one that timed out) is dropped. To retry a command without risking it being applied twice,
    resend it with the same ``request_id`` (``request(cmd, retries=N)`` does this): the server
    answers a repeated request with the first answer and does not apply it again. Reusing the
    ``request_id`` of a request still unanswered for a *different* command raises
    ``ValueError`` (the late answer could not be told from the new one).

    Examples
    --------
    >>> with ControlClient(server.endpoint, server_key="keys/server.key",
    ...                    client_key="keys/ops.key_secret") as c:
    ...     c.pause(); c.health().result["engine"]["bars_in"]; c.resume()
    """

    MAX_UNANSWERED = 4096
    """Unanswered requests remembered (for refusing a reused ``request_id``); older ones are forgotten."""

    def __init__(self, address: str, *, server_key: str | bytes | os.PathLike,
                 client_key: str | os.PathLike, fmt: str = "msgpack", timeout: float = 5.0,
                 context: zmq.Context | None = None) -> None:
        if fmt not in ("msgpack", "json"):
            raise ValueError(f"fmt must be 'msgpack' or 'json', got {fmt!r}")
        server_public = load_public_key(server_key)
        public, secret = load_keypair(client_key)
        self.fmt = fmt
        self.timeout = float(timeout)
        self._codec = Codec(ControlReply, fmt="auto")
        self._cmd_codec = Codec(ControlCommand, fmt=fmt)
        ctx = context if context is not None else zmq.Context.instance()
        self._sock = ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        # queue only to a connection whose handshake succeeded: a request that times out against
        # a server that is down is not delivered later, when one starts (it was applied then)
        self._sock.setsockopt(zmq.IMMEDIATE, 1)
        self._sock.curve_serverkey = server_public
        self._sock.curve_publickey = public
        self._sock.curve_secretkey = secret
        del secret
        try:
            self.endpoint = attach(self._sock, address, bind=False, allow_remote=True)
        except Exception:
            self._sock.close(linger=0)
            raise
        self._ids = itertools.count(int.from_bytes(os.urandom(3), "little") + 1)
        # request_id -> (payload, sends not answered yet)
        self._unanswered: collections.OrderedDict[int, tuple[bytes, int]] = collections.OrderedDict()

    def request(self, cmd: Any, timeout: float | None = None, *, retries: int = 0) -> ControlReply:
        """Send a command and wait for its reply. A ``request_id`` of 0 is replaced by a fresh
        one. Raises :class:`TransportTimeout` when no reply comes within ``timeout``.

        ``retries``: after a timeout, send the same command with the same ``request_id`` again,
        up to this many times (each waiting ``timeout``); the server applies it at most once.
        To retry by hand, pass a command with an explicit ``request_id`` and send it again.
        ``ValueError`` if ``request_id`` belongs to an unanswered request for another command."""
        if retries < 0:
            raise ValueError("retries must be >= 0")
        if cmd.request_id == 0:
            cmd = msgspec.structs.replace(cmd, request_id=next(self._ids))
        payload = self._cmd_codec.encode(cmd)
        rid = cmd.request_id
        earlier = self._unanswered.get(rid)
        if earlier is not None and earlier[0] != payload:
            raise ValueError(f"request_id {rid} belongs to an earlier request for another command that is "
                             "still unanswered (it timed out): its late reply could be taken for this one's; "
                             "use another request_id (or 0 for a fresh one)")
        for attempt in range(retries + 1):
            try:
                return self._roundtrip(payload, rid, timeout)
            except TransportTimeout:
                if attempt == retries:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _sent(self, rid: int, payload: bytes) -> None:
        _, n = self._unanswered.pop(rid, (payload, 0))
        self._unanswered[rid] = (payload, n + 1)
        while len(self._unanswered) > self.MAX_UNANSWERED:
            self._unanswered.popitem(last=False)

    def _answered(self, rid: int) -> None:
        entry = self._unanswered.get(rid)
        if entry is not None:
            if entry[1] <= 1:
                del self._unanswered[rid]
            else:
                self._unanswered[rid] = (entry[0], entry[1] - 1)

    def send_raw(self, payload: bytes, timeout: float | None = None) -> ControlReply:
        """Send arbitrary bytes as a command (to exercise the server's error path) and return
        the first reply."""
        return self._roundtrip(payload, None, timeout)

    def _roundtrip(self, payload: bytes, rid: int | None, timeout: float | None) -> ControlReply:
        t = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + t
        # A DEALER with no connection to send on (the server down, or its handshake refused
        # this client, which tears the pipe down) blocks in send: wait for room only until the
        # deadline, like the reply.
        while True:
            try:
                self._sock.send_multipart([b"", payload], flags=zmq.NOBLOCK)
                break
            except zmq.Again:
                left = deadline - time.monotonic()
                if left <= 0 or not self._sock.poll(to_ms(left), zmq.POLLOUT):
                    raise TransportTimeout(f"no connection to {self.endpoint} within {t} s {_CAUSES}") from None
        if rid is not None:
            self._sent(rid, payload)
        while True:
            left = deadline - time.monotonic()
            frames = recv_frames(self._sock, max(0.0, left)) if left > 0 else None
            if frames is None:
                raise TransportTimeout(f"no reply from {self.endpoint} within {t} s {_CAUSES}")
            body = frames[1:] if len(frames) == 2 and len(frames[0]) == 0 else frames
            if len(body) != 1:
                continue
            try:
                reply = self._codec.decode(body[0].buffer)
            except PayloadError:
                continue
            if rid is not None:
                self._answered(reply.request_id)
            if rid is None or reply.request_id == rid:
                return reply
            # a late reply to an earlier, timed-out request (or a second answer to a retried
            # one): not the one awaited, dropped

    # convenience wrappers
    def pause(self, **kw: Any) -> ControlReply:
        return self.request(Pause(), **kw)

    def resume(self, **kw: Any) -> ControlReply:
        return self.request(Resume(), **kw)

    def set_throttle(self, max_bars_per_s: float, **kw: Any) -> ControlReply:
        return self.request(SetThrottle(max_bars_per_s=float(max_bars_per_s)), **kw)

    def swap_persona(self, persona: str, **kw: Any) -> ControlReply:
        return self.request(SwapPersona(persona=persona), **kw)

    def update_routing(self, table: dict[str, str], **kw: Any) -> ControlReply:
        return self.request(UpdateRouting(table=dict(table)), **kw)

    def load_population(self, path: str | None = None, records: bytes | None = None, **kw: Any) -> ControlReply:
        return self.request(LoadPopulation(path=path, records=records), **kw)

    def snapshot(self, path: str, **kw: Any) -> ControlReply:
        return self.request(Snapshot(path=os.fspath(path)), **kw)

    def health(self, **kw: Any) -> ControlReply:
        return self.request(HealthQuery(), **kw)

    def __repr__(self) -> str:
        return f"ControlClient({self.endpoint!r})"
