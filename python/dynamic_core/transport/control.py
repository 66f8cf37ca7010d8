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

Semantics
---------
The server does not own a thread. Its owner calls :meth:`ControlServer.serve` from the loop
that drives the engine, so every command is applied *between* updates, never concurrently
with one. For each request, in order:

1. decode; a malformed command (garbage, unknown type or field, wrong version...) gets
   ``ok=False`` with the reason and is counted; nothing else happens. The reply carries the
   command's ``request_id`` when a typed decode of that one field succeeds (it builds none of
   the others, so a huge frame costs no memory), else 0;
2. ``journal_hook(raw)`` is called with the command re-encoded as canonical msgpack (decode it
   with :func:`dynamic_core.payloads.decode_command`), BEFORE it is applied. If the hook
   raises, the command is refused (``ok=False``, "not journaled") and not applied: nothing is
   applied that replay could not reproduce;
3. ``handler(cmd)`` applies it and returns a result mapping (or None). If it raises
   :class:`~dynamic_core.errors.CommandRefused` the reply is ``ok=False`` with its message; any
   other exception is logged (``logging.getLogger("dynamic_core.transport.control")``), counted and sent back
   as ``ok=False``; the server keeps serving.
"""

from __future__ import annotations

import collections
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
    SetThrottle,
    Snapshot,
    SwapPersona,
    UpdateRouting,
    encode_command,
    plain,
)
from ._common import DEFAULT_ADDRESS, SocketOwner, attach, close_socket, recv_frames
from .keys import authorised_keys, load_keypair, load_public_key

__all__ = ["DEFAULT_CONTROL_MAX_FRAME", "ControlClient", "ControlServer"]

log = logging.getLogger("dynamic_core.transport.control")

DEFAULT_CONTROL_MAX_FRAME = 64 * 1024 * 1024  # LoadPopulation may carry genome records


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
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, *, secret_key: str | os.PathLike,
                 authorized_keys: str | os.PathLike,
                 handler: Callable[[Any], dict[str, Any] | None] | None = None,
                 journal_hook: Callable[[bytes], Any] | None = None, fmt: str = "auto",
                 max_frame: int = DEFAULT_CONTROL_MAX_FRAME, max_events: int = 1000,
                 allow_remote: bool = False) -> None:
        public, secret = load_keypair(secret_key)
        self.public_key = public.decode("ascii")
        self.handler = handler
        self.journal_hook = journal_hook
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
        self.errors_log: collections.deque[tuple[int, str]] = collections.deque(maxlen=max_events)

    # ---- serving ------------------------------------------------------------------------------
    def serve(self, timeout: float | None = 0.0, max_requests: int = 64) -> int:
        """Handle the waiting requests (up to ``max_requests``), waiting up to ``timeout``
        seconds for the first. Returns how many were handled. Call it between updates."""
        n = 0
        wait = timeout
        while n < max_requests:
            frames = recv_frames(self._sock, wait)
            if frames is None:
                break
            wait = 0.0
            self._handle(frames)
            n += 1
        return n

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
        if self.journal_hook is not None:
            try:
                self.journal_hook(encode_command(cmd))
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
            self._fail(envelope, rid, f"refused: {e}", is_json)
            return
        except Exception as e:  # noqa: BLE001 - decided: reply with the error, keep serving
            self.handler_errors += 1
            log.exception("control handler raised for %s (request %d)", type(cmd).__name__, rid)
            self._fail(envelope, rid, f"{type(e).__name__}: {e}", is_json)
            return
        try:
            payload = self._reply_codec.encode(ControlReply(request_id=rid, ok=True, result=plain(result or {})),
                                               "json" if is_json else "msgpack")
        except (TypeError, ValueError, OverflowError) as e:
            self._fail(envelope, rid, f"applied, but the result cannot be encoded: {e}", is_json)
            return
        self.accepted += 1
        self._send(envelope, payload)

    def _fail(self, envelope: list[bytes], rid: int, error: str, is_json: bool) -> None:
        self.errors += 1
        self.errors_log.append((rid, error[:500]))
        reply = ControlReply(request_id=rid, ok=False, error=error[:4000])
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
                "auth_allowed": self._keys.allowed, "auth_refused": self._keys.refused,
                "authorised_keys": len(self._keys.keys)}

    def close(self) -> None:
        close_socket(self._sock)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if not self._ctx.closed:
            self._ctx.term()

    def __repr__(self) -> str:
        return f"ControlServer({getattr(self, 'endpoint', '?')!r}, public_key={self.public_key!r})"


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

    Examples
    --------
    >>> with ControlClient(server.endpoint, server_key="keys/server.key",
    ...                    client_key="keys/ops.key_secret") as c:
    ...     c.pause(); c.health().result["engine"]["bars_in"]; c.resume()
    """

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

    def request(self, cmd: Any, timeout: float | None = None) -> ControlReply:
        """Send a command and wait for its reply. A ``request_id`` of 0 is replaced by a fresh
        one. Raises :class:`TransportTimeout` when no reply comes within ``timeout``."""
        if cmd.request_id == 0:
            cmd = msgspec.structs.replace(cmd, request_id=next(self._ids))
        return self._roundtrip(self._cmd_codec.encode(cmd), cmd.request_id, timeout)

    def send_raw(self, payload: bytes, timeout: float | None = None) -> ControlReply:
        """Send arbitrary bytes as a command (to exercise the server's error path) and return
        the first reply."""
        return self._roundtrip(payload, None, timeout)

    def _roundtrip(self, payload: bytes, rid: int | None, timeout: float | None) -> ControlReply:
        t = self.timeout if timeout is None else timeout
        self._sock.send_multipart([b"", payload])
        deadline = time.monotonic() + t
        while True:
            left = deadline - time.monotonic()
            frames = recv_frames(self._sock, max(0.0, left)) if left > 0 else None
            if frames is None:
                raise TransportTimeout(f"no reply from {self.endpoint} within {t} s (server down, or "
                                       "this client's key not authorised?)")
            body = frames[1:] if len(frames) == 2 and len(frames[0]) == 0 else frames
            if len(body) != 1:
                continue
            try:
                reply = self._codec.decode(body[0].buffer)
            except PayloadError:
                continue
            if rid is None or reply.request_id == rid:
                return reply
            # a late reply to an earlier, timed-out request: skip it

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
