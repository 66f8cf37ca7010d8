"""The signal feed: a PUB socket that streams fused signals, and a subscriber that checks it.

Wire format
-----------
Every message is two frames: ``[topic, payload]``.

=====================================  =====================================================
topic                                  payload
=====================================  =====================================================
``sig.<instrument>.<timeframe>``       :class:`~dynamic_core.payloads.SignalBatch`
``rat.<instrument>.<timeframe>``       :class:`~dynamic_core.payloads.RationaleUpdate`
``hb``                                 :class:`~dynamic_core.payloads.Heartbeat`
=====================================  =====================================================

``<timeframe>`` is in seconds (``sig.EURUSD.3600``). Subscribe with a prefix (``sig.`` for
every signal, ``sig.EURUSD.`` for one instrument; mind the trailing dot, ``sig.EUR`` also
matches ``sig.EURUSD``). Payloads are msgpack maps by default or JSON objects (``fmt="json"``,
for subscribers without msgpack); a :class:`SignalSubscriber` reads either.

Sequencing
----------
Each :class:`SignalFeed` instance draws a random 64-bit ``epoch``. Per topic it numbers signals
from 0: a batch's ``seq`` is the number of signals published on that topic before it. Numbers
are per topic, not per feed, so a subscriber that filters topics still sees a dense sequence
and every jump is a real loss (PUB drops messages for a subscriber whose queue is at its
high-water mark). A new epoch means the publisher restarted: sequences start again.

Batching
--------
``publish(signals)`` sends one :class:`SignalBatch` per topic present in the call (signals of a
topic stay in bar order; the relative order of different topics within one call is not
kept), split into messages of at most ``max_batch`` signals.

Memory
------
A subscriber that stops reading (stalled, paused in a debugger, on a link slower than the feed)
costs the publishing process at most ``sndhwm`` messages, on top of what the operating system's
socket buffers hold: beyond that PUB drops its messages for that subscriber alone, and it sees
the loss as a gap. A msgpack signal takes about 260 bytes plus its instrument's name (JSON about
twice that), so with the defaults (``sndhwm=1000`` messages of at most ``max_batch=1024``
signals) one stalled subscriber holds at most about 270 MB (msgpack, six-letter names). The
subscriber's side is bounded the same way: ``rcvhwm`` frames of at most ``max_frame`` bytes.
``sndhwm=0`` lifts the bound: the queue then grows for as long as a subscriber stays behind.

Heartbeats
----------
The feed has no thread of its own (a ZeroMQ socket must not be shared between threads, and a
lock would put a heartbeat in the way of a signal). The owner calls :meth:`SignalFeed.tick`
from its loop; it sends a heartbeat when nothing was sent for ``heartbeat_interval`` seconds.
:class:`~dynamic_core.transport.EngineService` does this for you.

Slow joiners
------------
The feed's socket is an XPUB, which sees subscriptions arrive. :meth:`SignalFeed.wait_for_subscribers`
returns once ``n`` subscribers that receive heartbeats (every :class:`SignalSubscriber` does)
have subscribed, so a publisher can wait for its audience instead of sleeping.
:attr:`SignalFeed.subscribers` is the number of them connected now: a subscriber that closes
or disconnects is counted out (seen the next time the feed publishes, ticks or waits).
Each call reads at most :data:`MAX_SUBSCRIPTIONS_PER_DRAIN` subscription messages, so a peer
that floods subscriptions cannot hold signals and heartbeats up. libzmq itself still keeps
every distinct topic prefix subscribed (and the messages not read yet): a feed open to
untrusted peers grows in memory with a flood of distinct prefixes.
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import zmq

from ..errors import PayloadError
from ..instruments import instruments
from ..payloads import (
    DEFAULT_MAX_FRAME,
    AISignal,
    Codec,
    FeedMessage,
    Heartbeat,
    RationaleUpdate,
    SignalBatch,
    encode_signal_batch,
)
from ..records import SIGNAL_DTYPE
from ._common import DEFAULT_ADDRESS, MAX_TOPIC, SocketOwner, attach, check_topics, readable, recv_valid

__all__ = ["HEARTBEAT_TOPIC", "EpochChange", "Gap", "SignalFeed", "SignalSubscriber", "signal_topic"]

HEARTBEAT_TOPIC = b"hb"
MAX_TOPICS_IN_HEARTBEAT = 4096
MAX_TRACKED_TOPICS = 65_536
"""Topics a subscriber tracks sequence numbers of (beyond it, the oldest is forgotten)."""
DEFAULT_SNDHWM = 1000
"""Messages a feed queues per subscriber before it drops that subscriber's (see Memory above)."""
DEFAULT_MAX_BATCH = 1024
"""Signals per feed message at most (about 270 KB in msgpack)."""
MAX_SUBSCRIPTIONS_PER_DRAIN = 1000
"""Subscription messages a feed reads per publish/heartbeat/tick call (a few ms at most): any
peer can subscribe, and a flood of subscriptions must not hold the publishing thread."""


def signal_topic(instrument: str, timeframe: int) -> bytes:
    """``sig.<instrument>.<timeframe>`` as bytes."""
    return f"sig.{instrument}.{int(timeframe)}".encode()


def _new_epoch() -> int:
    # 63 random bits, so a JSON subscriber in a language with only signed 64-bit integers (Java,
    # MQL5, Go's int64) reads it; never 0 so "no epoch yet" can be 0 on the subscriber side
    return (int.from_bytes(os.urandom(8), "little") >> 1) or 1


class SignalFeed(SocketOwner):
    """PUB side of the signal feed (see the module docstring for the wire format).

    Parameters
    ----------
    address : str
        Where to bind (default ``tcp://127.0.0.1:*``, an OS-chosen loopback port: read
        :attr:`endpoint`), or ``ipc:///path``. Binding beyond loopback needs ``allow_remote``.
    fmt : {"msgpack", "json"}
        Payload format. msgpack batches are encoded straight from ``SIGNAL_DTYPE`` arrays;
        JSON builds :class:`AISignal` objects first (about 10x slower).
    sndhwm : int
        Messages queued per subscriber before PUB drops (subscribers see the loss as a gap):
        with ``max_batch``, what bounds the memory a stalled subscriber holds here (see
        "Memory" above). 0: no limit.
    heartbeat_interval : float
        Seconds of silence after which :meth:`tick` sends a heartbeat.
    max_batch : int
        Signals per :class:`SignalBatch` message at most.
    epoch : int, optional
        Fixed epoch (tests, deterministic replays); random when omitted.
    bind : bool
        Bind (default) or connect to ``address`` (e.g. towards an XSUB/XPUB proxy).
    context : zmq.Context, optional
        Default: the process-wide ``zmq.Context.instance()``.
    """

    # close(): signals published but not yet taken by a subscriber that is behind keep leaving for
    # 1 s (with none, the last signals of a run published just before the close were dropped)
    _linger_s = 1.0

    def __init__(self, address: str = DEFAULT_ADDRESS, *, fmt: str = "msgpack", sndhwm: int = DEFAULT_SNDHWM,
                 heartbeat_interval: float = 1.0, max_batch: int = DEFAULT_MAX_BATCH,
                 epoch: int | None = None,
                 bind: bool = True, allow_remote: bool = False,
                 context: zmq.Context | None = None) -> None:
        if fmt not in ("msgpack", "json"):
            raise ValueError(f"fmt must be 'msgpack' or 'json', got {fmt!r}")
        if not 1 <= max_batch <= 1 << 20:
            raise ValueError("max_batch must be in [1, 2**20]")
        if not 0 < heartbeat_interval <= 3600:
            raise ValueError("heartbeat_interval must be in (0, 3600] seconds")
        if sndhwm < 0:
            raise ValueError("sndhwm must be >= 0 (0 = unbounded)")
        self.fmt = fmt
        self.max_batch = int(max_batch)
        self.heartbeat_interval = float(heartbeat_interval)
        self.epoch = _new_epoch() if epoch is None else int(epoch)
        self._codec = Codec(FeedMessage, fmt=fmt)
        ctx = context if context is not None else zmq.Context.instance()
        self._sock = ctx.socket(zmq.XPUB)
        self._sock.setsockopt(zmq.SNDHWM, int(sndhwm))
        # VERBOSER, not VERBOSE: both pass every subscribe, but VERBOSE passes only the last
        # unsubscribe of a topic (and none for a peer that disconnects while another peer holds
        # the same topic), so ``subscribers`` would never come back down. (Setting VERBOSE after
        # this would switch the unsubscribes off again.) libzmq >= 4.2.
        self._sock.setsockopt(zmq.XPUB_VERBOSER, 1)
        # what a peer sends here is a subscription (one byte and a topic prefix): a larger frame
        # drops that peer instead of being buffered
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_TOPIC + 64)
        self._sock.setsockopt(zmq.LINGER, 0)
        try:
            self.endpoint = attach(self._sock, address, bind=bind, allow_remote=allow_remote)
        except Exception:
            self._sock.close(linger=0)
            raise
        self._next: dict[bytes, int] = {}
        self._hb_seq = 0
        self._last_send = time.monotonic()
        self.messages = 0
        self.signals = 0
        self.heartbeats = 0
        self.rationales = 0
        # heartbeat-receiving subscriptions now active: +1 per subscribe, -1 per unsubscribe,
        # including the ones libzmq reports for a subscriber that closed or disconnected
        self.subscribers = 0
        self.subscriptions = 0

    # ---- publishing ---------------------------------------------------------------------------
    def publish(self, signals: np.ndarray | Sequence[AISignal] | AISignal) -> int:
        """Publish signals; returns the number of messages sent.

        ``signals`` is a ``SIGNAL_DTYPE`` array (as ``Engine.poll``/``Engine.run`` return), a
        sequence of :class:`AISignal`, or one :class:`AISignal`. Never blocks: a subscriber
        whose queue is full loses the message (and sees a gap).
        """
        self._drain_subscriptions()
        if isinstance(signals, AISignal):
            signals = [signals]
        if isinstance(signals, np.ndarray):
            if signals.dtype != SIGNAL_DTYPE:
                raise TypeError(f"expected dtype dc.SIGNAL_DTYPE, got {signals.dtype}")
            return self._publish_records(signals)
        return self._publish_objects(list(signals))

    def _publish_records(self, arr: np.ndarray) -> int:
        n = len(arr)
        if n == 0:
            return 0
        inst, tf = arr["instrument"], arr["timeframe"]
        if n == 1 or ((inst == inst[0]).all() and (tf == tf[0]).all()):
            groups: Iterable[np.ndarray] = (arr,)
        else:
            key = inst.astype(np.uint64) << np.uint64(32) | tf.astype(np.uint64)
            order = np.argsort(key, kind="stable")
            k = key[order]
            cuts = np.flatnonzero(k[1:] != k[:-1]) + 1
            groups = (arr[idx] for idx in np.split(order, cuts))
        sent = 0
        for g in groups:
            name = instruments.name(int(g["instrument"][0]))
            topic = signal_topic(name, int(g["timeframe"][0]))
            for s in range(0, len(g), self.max_batch):
                part = g[s:s + self.max_batch]
                seq = self._next.get(topic, 0)
                if self.fmt == "msgpack":
                    payload = encode_signal_batch(self.epoch, seq, part, name)
                else:
                    from ..payloads import signals_from_records

                    payload = self._codec.encode(SignalBatch(epoch=self.epoch, seq=seq,
                                                             signals=tuple(signals_from_records(part))))
                self._next[topic] = seq + len(part)
                self.signals += len(part)
                self._send(topic, payload)
                sent += 1
        return sent

    def _publish_objects(self, sigs: list[AISignal]) -> int:
        if not sigs:
            return 0
        by_topic: dict[bytes, list[AISignal]] = {}
        for s in sigs:
            if not isinstance(s, AISignal):
                raise TypeError(f"expected AISignal objects or a SIGNAL_DTYPE array, got {type(s).__name__}")
            by_topic.setdefault(signal_topic(s.instrument, s.timeframe), []).append(s)
        sent = 0
        for topic, group in by_topic.items():
            for i in range(0, len(group), self.max_batch):
                part = tuple(group[i:i + self.max_batch])
                seq = self._next.get(topic, 0)
                payload = self._codec.encode(SignalBatch(epoch=self.epoch, seq=seq, signals=part))
                self._next[topic] = seq + len(part)
                self.signals += len(part)
                self._send(topic, payload)
                sent += 1
        return sent

    def publish_rationale(self, update: RationaleUpdate) -> None:
        """Publish reasoning text for an earlier signal on ``rat.<instrument>.<timeframe>``
        (``epoch`` and ``seq`` are filled in here)."""
        if not isinstance(update, RationaleUpdate):
            raise TypeError("expected a RationaleUpdate")
        topic = f"rat.{update.instrument}.{update.timeframe}".encode()
        seq = self._next.get(topic, 0)
        msg = msgspec.structs.replace(update, epoch=self.epoch, seq=seq)
        self._send(topic, self._codec.encode(msg))
        self._next[topic] = seq + 1
        self.rationales += 1

    def heartbeat(self) -> None:
        """Send a heartbeat now."""
        self._drain_subscriptions()
        nxt = ({t.decode(): s for t, s in self._next.items() if t.startswith(b"sig.")}
               if len(self._next) <= MAX_TOPICS_IN_HEARTBEAT else {})
        hb = Heartbeat(epoch=self.epoch, seq=self._hb_seq, ts=time.time_ns(), next_seq=nxt)
        self._send(HEARTBEAT_TOPIC, self._codec.encode(hb))
        self._hb_seq += 1
        self.heartbeats += 1

    def tick(self, now: float | None = None) -> bool:
        """Call often from the owning loop: sends a heartbeat if the feed was silent for
        ``heartbeat_interval`` seconds. Returns True when it sent one. Cheap when not due."""
        now = time.monotonic() if now is None else now
        if now - self._last_send >= self.heartbeat_interval:
            self.heartbeat()
            return True
        self._drain_subscriptions()
        return False

    def _send(self, topic: bytes, payload: bytes) -> None:
        try:
            self._sock.send_multipart((topic, payload), zmq.NOBLOCK, copy=len(payload) < 65536)
        except zmq.Again:  # pragma: no cover - XPUB drops rather than blocks at HWM
            pass
        self.messages += 1
        self._last_send = time.monotonic()

    # ---- subscriptions ------------------------------------------------------------------------
    def _drain_subscriptions(self) -> None:
        sock = self._sock
        # bounded: a peer that keeps subscribing (unauthenticated, anyone who can connect) would
        # otherwise keep the owner here, and no signal or heartbeat would leave meanwhile; the
        # rest waits in libzmq for the next call
        for _ in range(MAX_SUBSCRIPTIONS_PER_DRAIN):
            if not readable(sock):
                return
            try:
                m = sock.recv(zmq.NOBLOCK)
            except zmq.Again:  # pragma: no cover - EVENTS said readable
                return
            if not m:
                continue
            sub, prefix = m[0], m[1:]
            if sub not in (0, 1):
                continue
            self.subscriptions += 1 if sub == 1 else 0
            if HEARTBEAT_TOPIC.startswith(prefix):
                self.subscribers += 1 if sub == 1 else -1

    def wait_for_subscribers(self, n: int = 1, timeout: float = 10.0) -> bool:
        """Wait until at least ``n`` heartbeat-receiving subscriptions (one per
        :class:`SignalSubscriber`, or any SUB subscribed to ``""``, ``"h"`` or ``"hb"``) are
        active. Returns False on timeout. Messages published after this returns reach them."""
        deadline = time.monotonic() + timeout
        while True:
            self._drain_subscriptions()
            if self.subscribers >= n:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._sock.poll(max(1, int(min(left, 0.05) * 1000)), zmq.POLLIN)

    def next_seq(self, topic: str | bytes) -> int:
        """The ``seq`` the next batch on ``topic`` will carry."""
        return self._next.get(topic.encode() if isinstance(topic, str) else topic, 0)

    def stats(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "endpoint": self.endpoint, "fmt": self.fmt, "messages": self.messages,
                "signals": self.signals, "heartbeats": self.heartbeats, "rationales": self.rationales,
                "subscribers": self.subscribers, "topics": len(self._next)}

    def __repr__(self) -> str:
        return f"SignalFeed({self.endpoint!r}, fmt={self.fmt!r}, epoch={self.epoch:#018x})"


# ---- subscriber ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Gap:
    """Signals lost on ``topic``: ``expected`` was the next seq, ``got`` arrived instead
    (``missed = got - expected``). ``at_heartbeat`` when found from a heartbeat's ``next_seq``
    (the tail of a burst was lost)."""

    topic: str
    epoch: int
    expected: int
    got: int
    at_heartbeat: bool = False

    @property
    def missed(self) -> int:
        return self.got - self.expected


@dataclass(frozen=True)
class EpochChange:
    """The publisher's epoch changed (it restarted): sequences start again."""

    old: int
    new: int


class SignalSubscriber(SocketOwner):
    """SUB side of the feed: decodes, tracks sequence gaps, epochs and heartbeats.

    Parameters
    ----------
    address : str
        The feed's endpoint (connects; ``bind=True`` to bind instead).
    topics : str, bytes or sequence of them
        Prefix filters (default ``"sig."``: every signal). ``hb`` (heartbeats) is always added.
    fmt : {"auto", "msgpack", "json"}
        ``auto`` (default) reads either format.
    on_gap, on_epoch : callable, optional
        Called with a :class:`Gap` / :class:`EpochChange` as it is found, on the receiving
        thread, inside :meth:`recv`. An exception from them propagates out of :meth:`recv`
        (the counters are already updated): a callback decides, the subscriber does not hide it.
    max_frame : int
        Frames above this are rejected and counted (``oversized``); frames above twice this are
        refused by libzmq itself (the connection is dropped before the bytes are buffered).
    rcvhwm : int
        Messages queued before libzmq drops (seen as gaps): at most ``rcvhwm`` frames of at
        most ``max_frame`` bytes wait in this process.
    max_events : int
        How many recent gaps / epoch changes / rejects are kept in the lists. :meth:`stats`
        counts all of them, however many were kept.

    Examples
    --------
    >>> with SignalSubscriber(feed.endpoint) as sub:
    ...     for sig in sub.signals(timeout=1.0):   # stops after 1 s without a signal
    ...         print(sig.instrument, sig.action, sig.confidence)
    >>> sub.gap_count, sub.gaps, sub.epoch_changes, sub.rejects
    """

    def __init__(self, address: str, *, topics: str | bytes | Sequence[str | bytes] = "sig.",
                 fmt: str = "auto", on_gap: Callable[[Gap], Any] | None = None,
                 on_epoch: Callable[[EpochChange], Any] | None = None,
                 max_frame: int = DEFAULT_MAX_FRAME, rcvhwm: int = 1000, max_events: int = 1000,
                 bind: bool = False, allow_remote: bool = False,
                 context: zmq.Context | None = None) -> None:
        self.topics = check_topics(topics)
        self._codec = Codec(FeedMessage, fmt=fmt, max_frame=max_frame)
        ctx = context if context is not None else zmq.Context.instance()
        self._sock = ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.RCVHWM, int(rcvhwm))
        self._sock.setsockopt(zmq.MAXMSGSIZE, 2 * int(max_frame) + 4096)
        self._sock.setsockopt(zmq.LINGER, 0)
        for t in self.topics:
            self._sock.setsockopt(zmq.SUBSCRIBE, t)
        if not any(HEARTBEAT_TOPIC.startswith(t) for t in self.topics):
            self._sock.setsockopt(zmq.SUBSCRIBE, HEARTBEAT_TOPIC)
        try:
            self.endpoint = attach(self._sock, address, bind=bind, allow_remote=allow_remote)
        except Exception:
            self._sock.close(linger=0)
            raise
        self.on_gap = on_gap
        self.on_epoch = on_epoch
        self.epoch = 0
        self._expect: dict[str, int] = {}
        self.gaps: collections.deque[Gap] = collections.deque(maxlen=max_events)
        self.epoch_changes: collections.deque[EpochChange] = collections.deque(maxlen=max_events)
        self.rejects: collections.deque[tuple[str, str]] = collections.deque(maxlen=max_events)
        self.gap_count = 0  # signals missed, all topics
        # running totals: the deques above keep only the last ``max_events``
        self.gap_events = 0
        self.epoch_change_count = 0
        self.messages = 0
        self.signals_received = 0
        self.heartbeats = 0
        self.last_heartbeat: float | None = None  # time.monotonic() of the last heartbeat
        self.last_message: float | None = None

    def _matches(self, topic: str) -> bool:
        t = topic.encode()
        return any(t.startswith(p) for p in self.topics)

    def recv(self, timeout: float | None = 1.0) -> SignalBatch | Heartbeat | RationaleUpdate | None:
        """The next valid message, or None when none arrives within ``timeout`` seconds.

        Invalid frames (bad shape, undecodable, wrong version...) are counted in
        :meth:`stats` and listed in :attr:`rejects`, then skipped; the wait goes on until the
        deadline.
        """
        return recv_valid(self._sock, timeout, self._accept)

    def _accept(self, frames: list[zmq.Frame]) -> Any:
        if len(frames) != 2:
            self._codec.count("malformed")
            self.rejects.append(("malformed", f"{len(frames)} frames, expected [topic, payload]"))
            return None
        topic_b = frames[0].bytes
        if len(topic_b) > MAX_TOPIC:  # no feed topic is that long
            self._codec.count("invalid")
            self.rejects.append(("invalid", f"topic of {len(topic_b)} bytes (limit {MAX_TOPIC})"))
            return None
        try:
            msg = self._codec.decode(frames[1].buffer)
        except PayloadError as e:
            self.rejects.append((e.reason, e.detail[:200]))
            return None
        topic = topic_b.decode(errors="replace")
        now = time.monotonic()
        self.messages += 1
        self.last_message = now
        self._check_epoch(msg.epoch)
        if isinstance(msg, SignalBatch):
            self._check_seq(topic, msg.seq, len(msg.signals))
            self.signals_received += len(msg.signals)
        elif isinstance(msg, Heartbeat):
            self.heartbeats += 1
            self.last_heartbeat = now
            for t, nxt in msg.next_seq.items():
                exp = self._expect.get(t)
                if exp is not None and nxt > exp and self._matches(t):
                    self._gap(Gap(t, self.epoch, exp, nxt, at_heartbeat=True))
                    self._expect[t] = nxt
        elif isinstance(msg, RationaleUpdate):
            self._check_seq(topic, msg.seq, 1)
        return msg

    def _check_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            old, self.epoch = self.epoch, epoch
            self._expect.clear()
            if old != 0:
                ev = EpochChange(old, epoch)
                self.epoch_changes.append(ev)
                self.epoch_change_count += 1
                if self.on_epoch is not None:
                    self.on_epoch(ev)

    def _check_seq(self, topic: str, seq: int, n: int) -> None:
        exp = self._expect.get(topic)
        if exp is None and len(self._expect) >= MAX_TRACKED_TOPICS:  # the oldest topic is forgotten
            del self._expect[next(iter(self._expect))]
        self._expect[topic] = seq + n
        if exp is not None and seq != exp:
            # seq < exp (a replay or duplicate) is reported too, with a negative ``missed``
            self._gap(Gap(topic, self.epoch, exp, seq))

    def _gap(self, gap: Gap) -> None:
        self.gaps.append(gap)
        self.gap_events += 1
        self.gap_count += max(0, gap.missed)
        if self.on_gap is not None:
            self.on_gap(gap)

    def __iter__(self) -> Iterator[SignalBatch | Heartbeat | RationaleUpdate]:
        """Messages until the socket is closed (waits forever between messages)."""
        while not self._sock.closed:
            msg = self.recv(timeout=0.1)
            if msg is not None:
                yield msg

    def messages_until(self, timeout: float = 1.0) -> Iterator[SignalBatch | Heartbeat | RationaleUpdate]:
        """Messages until none arrives for ``timeout`` seconds."""
        while True:
            msg = self.recv(timeout)
            if msg is None:
                return
            yield msg

    def signals(self, timeout: float = 1.0) -> Iterator[AISignal]:
        """Signals, one by one, until no message arrives for ``timeout`` seconds."""
        for msg in self.messages_until(timeout):
            if isinstance(msg, SignalBatch):
                yield from msg.signals

    def alive(self, within: float) -> bool:
        """Was anything (signal or heartbeat) received in the last ``within`` seconds?"""
        return self.last_message is not None and time.monotonic() - self.last_message <= within

    def stats(self) -> dict[str, Any]:
        c = self._codec.stats()
        return {"epoch": self.epoch, "messages": self.messages, "signals": self.signals_received,
                "heartbeats": self.heartbeats, "gaps": self.gap_events, "gap_signals": self.gap_count,
                "epoch_changes": self.epoch_change_count, "rejected": c["rejected"],
                "rejects": c["rejects"]}

    def __repr__(self) -> str:
        return f"SignalSubscriber({self.endpoint!r}, topics={self.topics!r})"
