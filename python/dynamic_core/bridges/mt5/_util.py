"""Plumbing shared by both ends of the bridge: the doorbell, sequence tracking, message stamps."""

from __future__ import annotations

import zmq

from ...transport.doorbell import Doorbell
from .protocol import PROTOCOL_VERSION, now_ms

__all__ = ["Doorbell", "SeqTracker", "Stamper", "configure"]


class SeqTracker:
    """Classifies the ``seq`` of each message of one peer epoch (docs/mt5-bridge.md, section 3).

    :meth:`check` returns ``"first"`` (baseline), ``"ok"``, ``"gap"`` (processed; the missing
    count is added to ``gaps``), ``"reordered"`` (late but new: processed), ``"duplicate"``
    (seen before, or older than the window: to be ignored) or ``"jump"`` (more than
    :attr:`MAX_JUMP` ahead: no link loses that many, so the number is bad; ignored, counted in
    ``jumps``, and the baseline stays where it was, so one bad number cannot make every later
    message look old).
    """

    WINDOW = 1024
    MAX_JUMP = 1 << 20
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
        if seq > hi:
            d = seq - hi
            if d > self.MAX_JUMP:
                self.jumps += 1
                return "jump"
            self.mask = ((self.mask << d) | 1) & self._FULL if d < self.WINDOW else 1
            self.hi = seq
            if d > 1:
                self.gaps += d - 1
                return "gap"
            return "ok"
        back = hi - seq
        bit = 1 << back if back < self.WINDOW else 0
        if not bit or self.mask & bit:
            self.duplicates += 1
            return "duplicate"
        self.mask |= bit
        self.reordered += 1
        return "reordered"


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
