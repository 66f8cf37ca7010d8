"""Shared socket plumbing: address policy, contexts, bounded receives."""

from __future__ import annotations

import ipaddress
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["DEFAULT_ADDRESS", "check_address", "endpoint", "is_loopback", "readable", "recv_frames"]

DEFAULT_ADDRESS = "tcp://127.0.0.1:*"
"""Where sockets bind by default: loopback, with a port chosen by the OS (see ``.endpoint``)."""

_TCP = re.compile(r"^tcp://(?:(?P<iface>[^;]*);)?(?P<host>\[[^\]]*\]|[^:\[\]]*):(?P<port>\*|[0-9]+)$")


_POLLIN = int(zmq.POLLIN)  # a plain int: IntFlag arithmetic costs about a microsecond


MAX_TOPIC = 256
"""Longest topic (or subscription prefix) in bytes: a feed topic is ``sig.<instrument>.<tf>``.
Longer ones are refused: libzmq's subscription trie recurses once per byte, and a topic frame is
otherwise bounded only by the socket's message size."""


def check_topics(topics: Any) -> list[bytes]:
    """Subscription prefixes as bytes (one str/bytes or an iterable of them); ValueError for one
    above :data:`MAX_TOPIC` bytes."""
    if isinstance(topics, (str, bytes)):
        topics = [topics]
    out = [t.encode() if isinstance(t, str) else bytes(t) for t in topics]
    for t in out:
        if len(t) > MAX_TOPIC:
            raise ValueError(f"topic prefix of {len(t)} bytes: the limit is {MAX_TOPIC}")
    return out


def readable(sock: zmq.Socket) -> bool:
    """Whether ``sock`` holds a whole message to read now (ZMQ_EVENTS, no system call). Drain
    loops ask this before each receive instead of catching ``zmq.Again`` at the end: raising and
    catching it costs 6 us, this 2 us. Only from the thread that uses the socket."""
    return bool(sock.getsockopt(zmq.EVENTS) & _POLLIN)


def is_loopback(address: str) -> bool:
    """True for ``ipc://``, ``inproc://`` and ``tcp://`` addresses on 127.0.0.0/8, ``::1``,
    ``localhost`` or the ``lo`` interface."""
    if address.startswith(("ipc://", "inproc://")):
        return True
    m = _TCP.match(address)
    if not m:
        return False
    host = m.group("host").strip("[]")
    if host in ("localhost", "lo"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_address(address: str, *, bind: bool, allow_remote: bool) -> str:
    """Validate a ZeroMQ address; binding beyond loopback needs ``allow_remote=True``.

    The feed and market ingress have no authentication, so exposing them to the network is an
    explicit decision. Connecting anywhere is always allowed.
    """
    if not isinstance(address, str) or "://" not in address:
        raise ValueError(f"not a ZeroMQ address: {address!r} (e.g. tcp://127.0.0.1:5555 or ipc:///tmp/dc.sock)")
    scheme = address.split("://", 1)[0]
    if scheme not in ("tcp", "ipc", "inproc"):
        raise ValueError(f"unsupported transport {scheme!r} in {address!r}: use tcp://, ipc:// or inproc://")
    if bind and scheme == "tcp":
        _check_port(address)  # first: an address without a port reads as a remote one
    if bind and not allow_remote and not is_loopback(address):
        raise ValueError(f"refusing to bind {address!r} beyond loopback: pass allow_remote=True "
                         "(CLI: --allow-remote) to expose it to the network")
    return address


def _check_port(address: str) -> None:
    """A ``tcp://`` bind address must name its port: 1..65535, or ``*`` for a free one (ZeroMQ
    would silently bind another port for 99999 or -5)."""
    _, sep, port = address[len("tcp://"):].rpartition(":")
    if not sep or not port:
        raise ValueError(f"no port in {address!r} (e.g. tcp://127.0.0.1:5560, or :* for a free port)")
    if port.isascii() and port.isdigit():
        if not 1 <= int(port) <= 65535:
            raise ValueError(f"port must be in 1..65535, got {port} in {address!r}")
    elif port != "*":
        raise ValueError(f"port must be in 1..65535 or *, got {port!r} in {address!r}")


def endpoint(sock: zmq.Socket) -> str:
    """The address a socket actually bound (resolves ``tcp://127.0.0.1:*``)."""
    ep = sock.getsockopt(zmq.LAST_ENDPOINT)
    return ep.decode() if isinstance(ep, bytes) else str(ep)


def attach(sock: zmq.Socket, address: str, *, bind: bool, allow_remote: bool) -> str:
    """Bind or connect ``sock``; returns the resolved endpoint (the address when connecting)."""
    check_address(address, bind=bind, allow_remote=allow_remote)
    if bind:
        sock.bind(address)
        return endpoint(sock)
    sock.connect(address)
    return address


MAX_WAIT_MS = 2**31 - 1
"""Longest wait ZeroMQ takes (a C int of milliseconds, about 24.8 days): longer ones are cut to it."""


def to_ms(seconds: float, least: int = 1) -> int:
    """``seconds`` as whole milliseconds for a ZeroMQ wait, at least ``least``, at most
    :data:`MAX_WAIT_MS`."""
    return max(least, int(min(seconds * 1000, MAX_WAIT_MS)))


def recv_frames(sock: zmq.Socket, timeout: float | None) -> list[zmq.Frame] | None:
    """One multipart message as zero-copy frames, or None when nothing arrives within
    ``timeout`` seconds (0: do not wait; None: wait forever)."""
    if timeout is None or timeout > 0:
        ms = -1 if timeout is None else to_ms(timeout)
        if not sock.poll(ms, zmq.POLLIN):
            return None
    try:
        return sock.recv_multipart(zmq.NOBLOCK, copy=False)
    except zmq.Again:
        return None


def recv_valid(sock: zmq.Socket, timeout: float | None, accept: Callable[[list[zmq.Frame]], Any]) -> Any:
    """The first message ``accept(frames)`` makes something of (not None), or None when none
    arrives within ``timeout`` seconds (None: wait forever). Frames it refuses are skipped; the
    wait goes on until the deadline."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        frames = recv_frames(sock, left)
        if frames is None:
            return None
        out = accept(frames)
        if out is not None:
            return out
        if deadline is not None and time.monotonic() >= deadline:
            return None


def close_socket(sock: Any, linger_ms: int = 0) -> None:
    if sock is not None and not sock.closed:
        sock.close(linger=linger_ms)


class SocketOwner:
    """Base of the transport classes that own one ZeroMQ socket (``self._sock``): the raw
    socket, ``close()`` and use as a context manager."""

    _sock: Any = None
    _linger_s = 0.0  # the class's default for close()

    @property
    def socket(self) -> zmq.Socket:
        return self._sock

    def close(self, linger: float | None = None) -> None:
        """Close; messages still queued get up to ``linger`` seconds to leave, in the background
        while the process lives (default: the class's; 0 drops them now)."""
        close_socket(self._sock, to_ms(self._linger_s if linger is None else linger, 0))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_private_dirs(d: Path) -> None:
    """``mkdir -p`` where every directory created is mode 0700 (``Path.mkdir(parents=True)``
    gives the parents the umask's default mode: 0777 under umask 0)."""
    missing = []
    p = d
    while not os.path.lexists(p):
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for q in reversed(missing):
        try:
            os.mkdir(q, 0o700)
        except FileExistsError:  # made by someone else meanwhile: fine if it is a directory
            pass
    if not d.is_dir():
        raise NotADirectoryError(f"{d} is not a directory")
