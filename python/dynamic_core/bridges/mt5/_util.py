"""Plumbing shared by both ends of the bridge: the doorbell, sequence tracking, message stamps,
bounds on what a peer can make us log or answer."""

from __future__ import annotations

import logging
import time
from typing import Any

import zmq

from ...transport.doorbell import Doorbell
from .protocol import PROTOCOL_VERSION, now_ms

__all__ = ["Doorbell", "LogLimiter", "ReplyThrottle", "SeqTracker", "Stamper", "configure"]


class SeqTracker:
    """Classifies the ``seq`` of each message of one peer epoch (docs/mt5-bridge.md, section 3).

    :meth:`check` returns ``"first"`` (baseline), ``"ok"``, ``"gap"`` (processed; the missing
    count is added to ``gaps``), ``"reordered"`` (late but new: processed), ``"duplicate"``
    (seen before within the window: to be ignored) or ``"jump"`` (:attr:`WINDOW` or more away
    from the highest ``seq``, ahead or behind: processed, counted in ``jumps``, and the window
    restarts at it). A jump moves the window instead of being judged against it, so one bad
    number costs two jumps (away and back) and never makes later messages look old; sequence
    numbers only detect, the order-level rules make every message safe to process again.
    """

    WINDOW = 1024
    _FULL = (1 << WINDOW) - 1

    def __init__(self) -> None:
        self.hi = 0
        self.mask = 0
        self.gaps = 0
        self.reordered = 0
        self.duplicates = 0
        self.jumps = 0

    def reset(self) -> None:
        self.hi = 0
        self.mask = 0

    def check(self, seq: int) -> str:
        hi = self.hi
        if hi == 0:
            self.hi, self.mask = seq, 1
            return "first"
        d = seq - hi
        if d >= self.WINDOW or -d >= self.WINDOW:
            self.hi, self.mask = seq, 1
            self.jumps += 1
            return "jump"
        if d > 0:
            self.mask = ((self.mask << d) | 1) & self._FULL
            self.hi = seq
            if d > 1:
                self.gaps += d - 1
                return "gap"
            return "ok"
        bit = 1 << -d
        if self.mask & bit:
            self.duplicates += 1
            return "duplicate"
        self.mask |= bit
        self.reordered += 1
        return "reordered"


class LogLimiter:
    """Bounded logging of what a peer can make happen once per message.

    Per ``key`` (a fixed string, never peer data: the keys stay few), the first ``first`` records
    of every ``interval`` seconds are logged; the rest are counted (``suppressed``, in all) and
    summed up in one line of the same level once the interval is over (at the next record of
    that key, or at :meth:`flush`). So a flood logs at most ``first + 1`` lines per key and
    interval.
    """

    def __init__(self, logger: logging.Logger, first: int = 10, interval: float = 60.0) -> None:
        self.log = logger
        self.first = first
        self.interval = interval
        self.suppressed = 0
        self._keys: dict[str, list[Any]] = {}  # key -> [window start, logged, suppressed, level]

    def __call__(self, key: str, level: int, msg: str, *args: object) -> None:
        now = time.monotonic()
        st = self._keys.get(key)
        if st is None or now - st[0] >= self.interval:
            if st is not None:
                self._summary(key, st, now)
            st = self._keys[key] = [now, 0, 0, level]
        if st[1] < self.first:
            st[1] += 1
            self.log.log(level, msg, *args)
        else:
            st[2] += 1
            self.suppressed += 1

    def flush(self, now: float | None = None) -> None:
        """Write the summary of every interval that is over."""
        now = time.monotonic() if now is None else now
        for key, st in list(self._keys.items()):
            if now - st[0] >= self.interval:
                self._summary(key, st, now)
                del self._keys[key]

    def _summary(self, key: str, st: list[Any], now: float) -> None:
        if st[2]:
            self.log.log(st[3], "%s: %d more not logged in the last %.1f s", key, st[2], now - st[0])


class ReplyThrottle:
    """A token bucket per peer identity: at most ``burst`` replies at once, then ``rate`` per
    second. At most ``peers`` identities are remembered (the oldest is forgotten first), so a
    peer reconnecting under new identities cannot grow it."""

    def __init__(self, rate: float = 10.0, burst: int = 50, peers: int = 1024) -> None:
        self.rate = rate
        self.burst = burst
        self.peers = peers
        self._buckets: dict[bytes, list[float]] = {}  # identity -> [tokens, last refill]

    def allow(self, ident: bytes) -> bool:
        now = time.monotonic()
        b = self._buckets.get(ident)
        if b is None:
            if len(self._buckets) >= self.peers:
                del self._buckets[next(iter(self._buckets))]
            b = self._buckets[ident] = [float(self.burst), now]
        else:
            b[0] = min(float(self.burst), b[0] + (now - b[1]) * self.rate)
            b[1] = now
        if b[0] < 1.0:
            return False
        b[0] -= 1.0
        return True


class Stamper:
    """The common fields of every message a sender writes: ``v``, its ``epoch``, the next
    ``seq`` and ``ts`` (ms)."""

    __slots__ = ("epoch", "seq")

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.seq = 0

    def __call__(self) -> dict[str, int]:
        self.seq += 1
        return {"v": PROTOCOL_VERSION, "epoch": self.epoch, "seq": self.seq, "ts": now_ms()}


MAX_MSG = 1 << 20
"""A peer that sends a frame above this is disconnected by ZeroMQ before it is read (it
reconnects); frames between :data:`~.protocol.MAX_FRAME` and this are read and refused
(``oversized``) with an ``error`` answer."""


def configure(sock: zmq.Socket, hwm: int = 10_000) -> None:
    """Socket options of every bridge socket: no linger, deep queues (never HWM 1), a bound on
    what a peer can make us allocate."""
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MSG)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
