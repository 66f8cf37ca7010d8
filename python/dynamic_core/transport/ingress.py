"""Market ingress: bars from other processes into an engine, over PULL or SUB.

Wire format
-----------
Each message carries one :class:`~dynamic_core.payloads.PreparedMarketContext` (the bars of
one instrument and timeframe, columnar, msgpack or JSON) as its LAST frame:

* PUSH -> PULL (default): ``[payload]`` (a ``[topic, payload]`` pair is accepted too);
* PUB -> SUB: ``[topic, payload]`` with topic ``mkt.<instrument>.<timeframe>``; the ingress
  subscribes to ``topics`` (prefixes, default ``mkt.``).

PUSH/PULL is the lossless choice while the ingress lives: the sender blocks (or queues) when the
ingress falls behind, and a single PUSH connection keeps its order, so the engine sees exactly the
sender's bar sequence. A frame ``send`` returned for has been queued, not delivered: frames
queued when the receiving process dies are lost with it (the journal tells what the engine
took). PUB/SUB fans one market feed out to many engines but drops at the high-water mark.

Bad frames never reach the engine: an undecodable frame is counted by reason (see
:class:`~dynamic_core.errors.PayloadError`) and kept as a :class:`~dynamic_core.payloads.Reject`
in a bounded dead-letter list. Decoded bars go through ``engine.submit``, i.e. the engine's own
validation, so a bad *bar* is rejected, counted and dead-lettered by the engine exactly as in
``Engine.run``.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import zmq

from ..errors import PayloadError
from ..payloads import DEFAULT_MAX_FRAME, Codec, PreparedMarketContext, Reject, split_bars
from ._common import DEFAULT_ADDRESS, SocketOwner, attach, check_topics, recv_valid, to_ms

__all__ = ["MarketIngress", "MarketSender", "market_topic"]


def market_topic(instrument: str, timeframe: int) -> bytes:
    """``mkt.<instrument>.<timeframe>`` as bytes."""
    return f"mkt.{instrument}.{int(timeframe)}".encode()


class MarketIngress(SocketOwner):
    """Receives :class:`PreparedMarketContext` frames and hands their bars to an engine.

    Parameters
    ----------
    address : str
        Bind address (default ``tcp://127.0.0.1:*``; read :attr:`endpoint`), or the address to
        connect to with ``bind=False`` (typical for ``kind="sub"`` on a market PUB).
    engine : dynamic_core.Engine, optional
        Where :meth:`pump` submits bars (anything with ``submit(bars)``).
    kind : {"pull", "sub"}
        Socket type (see the module docstring).
    topics : sequence of str or bytes
        SUB prefix filters (default ``["mkt."]``); ignored for PULL.
    fmt : {"auto", "msgpack", "json"}
    max_frame : int
        Frames above this are refused (``oversized``) before decoding; above twice this libzmq
        drops the connection before buffering them. The bound is per frame: a message of many
        frames is buffered whole by libzmq before it is read (and then refused as
        ``malformed``), which libzmq has no option to bound, so an ingress reachable by
        untrusted senders is exposed to that memory; bind it to loopback (the default).
    rcvhwm : int
        Frames queued in the socket. While the engine is paused they wait here; beyond it a
        PUSH sender blocks and a PUB sender drops.
    dead_letter_capacity : int
        Most recent refused frames kept (:meth:`dead_letters`); older ones are only counted.
    on_reject : callable, optional
        ``on_reject(reject)`` with each :class:`~dynamic_core.payloads.Reject` as it is made
        (e.g. to journal undecodable frames). If it raises, the exception propagates out of
        :meth:`recv_bars`/:meth:`pump` after the reject is counted and kept.
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, *, engine: Any = None, kind: str = "pull",
                 topics: Any = ("mkt.",), fmt: str = "auto", max_frame: int = DEFAULT_MAX_FRAME,
                 rcvhwm: int = 10_000, dead_letter_capacity: int = 1000, bind: bool | None = None,
                 allow_remote: bool = False, on_reject: Callable[[Reject], Any] | None = None,
                 context: zmq.Context | None = None) -> None:
        if kind not in ("pull", "sub"):
            raise ValueError(f"kind must be 'pull' or 'sub', got {kind!r}")
        if dead_letter_capacity < 0:
            raise ValueError("dead_letter_capacity must be >= 0")
        subscriptions = check_topics(topics) if kind == "sub" else []
        self.kind = kind
        self.engine = engine
        self.on_reject = on_reject
        self._codec = Codec(PreparedMarketContext, fmt=fmt, max_frame=max_frame)
        ctx = context if context is not None else zmq.Context.instance()
        self._sock = ctx.socket(zmq.PULL if kind == "pull" else zmq.SUB)
        self._sock.setsockopt(zmq.RCVHWM, int(rcvhwm))
        self._sock.setsockopt(zmq.MAXMSGSIZE, 2 * int(max_frame) + 4096)
        self._sock.setsockopt(zmq.LINGER, 0)
        if kind == "sub":
            for t in subscriptions:
                self._sock.setsockopt(zmq.SUBSCRIBE, t)
        bind = (kind == "pull") if bind is None else bind
        try:
            self.endpoint = attach(self._sock, address, bind=bind, allow_remote=allow_remote)
        except Exception:
            self._sock.close(linger=0)
            raise
        self._dead: collections.deque[Reject] = collections.deque(maxlen=dead_letter_capacity)
        self.frames = 0
        self.bars = 0
        self.submitted = 0
        self.dead_letters_dropped = 0

    def recv_bars(self, timeout: float | None = 0.0) -> np.ndarray | None:
        """Bars of the next valid frame (``BAR_DTYPE``), or None when no valid frame arrives
        within ``timeout`` seconds. Refused frames are counted, dead-lettered and skipped."""
        return recv_valid(self._sock, timeout, self._decode)

    def _decode(self, frames: list[zmq.Frame]) -> np.ndarray | None:
        self.frames += 1
        size = sum(len(f) for f in frames)
        if not 1 <= len(frames) <= 2 or (self.kind == "sub" and len(frames) != 2):
            self._codec.count("malformed")
            self._dead_letter("malformed", f"{len(frames)} frames, expected [topic,] payload", size)
            return None
        try:
            ctx = self._codec.decode(frames[-1].buffer)  # counts its own rejects
        except PayloadError as e:
            self._dead_letter(e.reason, e.detail, size)
            return None
        try:
            bars = ctx.to_bars()
        except PayloadError as e:  # decoded, but columns of unequal length or a bad name
            self._codec.count(e.reason)
            self._dead_letter(e.reason, e.detail, size)
            return None
        self.bars += len(bars)
        return bars

    def _dead_letter(self, reason: str, detail: str, size: int) -> None:
        rej = Reject(reason=reason, detail=detail[:1000], size=size, ts=time.time_ns())
        if self._dead.maxlen == 0 or len(self._dead) == self._dead.maxlen:
            self.dead_letters_dropped += 1
        if self._dead.maxlen:
            self._dead.append(rej)
        if self.on_reject is not None:
            self.on_reject(rej)

    def pump(self, timeout: float = 0.0, max_frames: int = 64) -> int:
        """Receive up to ``max_frames`` frames (waiting up to ``timeout`` for the first) and
        submit their bars to the engine; returns the number of bars submitted."""
        if self.engine is None:
            raise RuntimeError("MarketIngress has no engine: pass engine= or use recv_bars()")
        n = 0
        wait = timeout
        for _ in range(max_frames):
            bars = self.recv_bars(wait)
            if bars is None:
                break
            wait = 0.0
            if len(bars):
                n += int(self.engine.submit(bars))
        self.submitted += n
        return n

    def dead_letters(self) -> list[Reject]:
        """The most recent refused frames, oldest first."""
        return list(self._dead)

    def stats(self) -> dict[str, Any]:
        c = self._codec.stats()
        return {"endpoint": self.endpoint, "kind": self.kind, "frames": self.frames, "bars": self.bars,
                "submitted": self.submitted, "rejected": c["rejected"], "rejects": c["rejects"],
                "dead_letters": len(self._dead), "dead_letters_dropped": self.dead_letters_dropped}

    def __repr__(self) -> str:
        return f"MarketIngress({self.endpoint!r}, kind={self.kind!r})"


class MarketSender(SocketOwner):
    """The other end of :class:`MarketIngress`: sends ``BAR_DTYPE`` arrays as
    :class:`PreparedMarketContext` frames, in order (see :func:`~dynamic_core.payloads.split_bars`).

    Parameters
    ----------
    address : str
        The ingress endpoint (connects by default; ``bind=True`` to bind, e.g. as a market PUB).
    kind : {"push", "pub"}
        PUSH for a PULL ingress (blocks when it falls behind; frames still queued when the
        receiving process dies are lost), PUB for SUB ingresses.
    fmt : {"msgpack", "json"}
    max_bars : int
        Bars per frame at most.
    sndhwm : int
        Frames queued before ``send`` blocks (PUSH) or drops (PUB).
    send_timeout : float, optional
        PUSH only: seconds ``send`` may block on a full queue before raising ``zmq.Again``
        (default: wait forever).
    """

    _linger_s = 2.0  # close(): unsent frames get 2 s to leave

    def __init__(self, address: str, *, kind: str = "push", fmt: str = "msgpack", max_bars: int = 4096,
                 sndhwm: int = 10_000, send_timeout: float | None = None, bind: bool = False,
                 allow_remote: bool = False, context: zmq.Context | None = None) -> None:
        if kind not in ("push", "pub"):
            raise ValueError(f"kind must be 'push' or 'pub', got {kind!r}")
        if fmt not in ("msgpack", "json"):
            raise ValueError(f"fmt must be 'msgpack' or 'json', got {fmt!r}")
        self.kind = kind
        self.max_bars = int(max_bars)
        self._codec = Codec(PreparedMarketContext, fmt=fmt)
        ctx = context if context is not None else zmq.Context.instance()
        self._sock = ctx.socket(zmq.PUSH if kind == "push" else zmq.PUB)
        self._sock.setsockopt(zmq.SNDHWM, int(sndhwm))
        self._sock.setsockopt(zmq.LINGER, 2000)
        if send_timeout is not None:
            self._sock.setsockopt(zmq.SNDTIMEO, to_ms(send_timeout, 0))
        try:
            self.endpoint = attach(self._sock, address, bind=bind, allow_remote=allow_remote)
        except Exception:
            self._sock.close(linger=0)
            raise
        self.frames = 0
        self.bars = 0

    def send(self, bars: np.ndarray) -> int:
        """Send ``bars`` (any mix of streams, kept in order); returns the number of frames."""
        n = 0
        for ctx in split_bars(bars, self.max_bars):
            self.send_context(ctx)
            n += 1
        return n

    def send_context(self, ctx: PreparedMarketContext) -> None:
        payload = self._codec.encode(ctx)
        if self.kind == "pub":
            self._sock.send_multipart((market_topic(ctx.instrument, ctx.timeframe), payload))
        else:
            self._sock.send(payload)
        self.frames += 1
        self.bars += len(ctx)

    def send_raw(self, *frames: bytes) -> None:
        """Send arbitrary frames as they are (for tests of the receiving side's robustness)."""
        self._sock.send_multipart(frames)

    def __repr__(self) -> str:
        return f"MarketSender({self.endpoint!r}, kind={self.kind!r})"
