"""The EA side of the bridge in Python: :class:`SimulatedTerminal`.

It speaks the protocol over a real ZeroMQ DEALER exactly as the shipped MQL5 EA must
(``docs/mt5-bridge.md``, the "EA rules") and executes through a
:class:`~dynamic_core.bridges.paper.PaperBroker` in place of a trade server. Tests and the
``--simulated-terminal`` command line use it; it is also the reference for the EA's behaviour.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections import deque
from typing import Any, Self

import msgspec
import zmq

from ...errors import PayloadError
from ...transport._common import readable
from ..paper import CostModel, PaperBroker
from ..paper import Order as PaperOrder
from ._util import Doorbell, SeqTracker, Stamper, configure
from .protocol import (
    Ack,
    Cancel,
    EngineHello,
    EngineMessage,
    Error,
    ExecReport,
    Flatten,
    Heartbeat,
    MT5Codec,
    Order,
    Position,
    PositionsEnd,
    PositionsQuery,
    TerminalHello,
    new_epoch,
    now_ms,
)

__all__ = ["SimulatedTerminal"]

log = logging.getLogger("dynamic_core.bridges.mt5.terminal")

_EXEC_KINDS = ("entry", "close", "reverse")  # fills that execute an order (not stop/target/flatten exits)


class _Rec:
    """What the EA remembers of one ``client_order_id`` (persistent: survives restarts)."""

    __slots__ = (
        "accepted",
        "ack_reason",
        "coid",
        "commission",
        "fill_ts",
        "filled",
        "magic",
        "order_type",
        "price",
        "reason",
        "side",
        "status",
        "symbol",
        "ticket",
    )

    def __init__(self, coid: str, symbol: str = "", side: str = "", order_type: str = "market", magic: int = 0) -> None:
        self.coid, self.symbol, self.side, self.order_type, self.magic = coid, symbol, side, order_type, magic
        self.accepted = False
        self.ack_reason = ""
        self.ticket = 0
        self.status = ""
        self.price = 0.0
        self.filled = 0.0
        self.commission = 0.0
        self.fill_ts = 0
        self.reason = ""


class SimulatedTerminal:
    """A MetaTrader 5 terminal with the bridge EA, simulated: DEALER, connects to ``address``.

    Parameters
    ----------
    address : str
        The bridge's address (``MT5Bridge.address``, or a :class:`FaultProxy`'s).
    broker : PaperBroker, optional
        The account; default ``PaperBroker(equity=100_000, fill_market="immediate")`` with no
        costs. Market orders fill at the last price given by :meth:`set_price`/:meth:`on_bar`.
    login, server, build : int, str, str
        What the EA's ``hello`` says.
    heartbeat : float
        Hello/heartbeat interval until the engine's ``hello`` says otherwise, seconds.
    flatten_on_engine_loss : bool
        Flatten the account when the engine has been silent for its ``missed`` intervals.
    start : bool
        Connect and start the EA thread now.

    The account (broker, order table, tickets) survives :meth:`kill` and :meth:`restart`, like an
    MT5 account's history does; a restart is a new EA instance: a new epoch, a new socket. The
    broker has no notion of magic numbers: every position counts as the bridge's, and
    ``flatten`` closes everything. ``profit`` in ``position`` messages is 0 (not modelled).
    """

    def __init__(self, address: str, *, broker: PaperBroker | None = None, login: int = 1000001,
                 server: str = "Simulated-Server", build: str = "SimulatedTerminal 1.0", heartbeat: float = 1.0,
                 flatten_on_engine_loss: bool = False, start: bool = True) -> None:
        self.address = address
        self.broker = broker if broker is not None else PaperBroker(equity=100_000.0, costs=CostModel(),
                                                                     fill_market="immediate")
        self.login, self.server, self.build = int(login), server, build
        self.initial_heartbeat = float(heartbeat)
        self.flatten_on_engine_loss = bool(flatten_on_engine_loss)
        self._ctx = zmq.Context(io_threads=1)
        self._codec = MT5Codec(EngineMessage)
        self._enc = msgspec.json.Encoder()
        self._lock = threading.RLock()  # the account: broker + order table (the test thread feeds prices)
        self._table: dict[str, _Rec] = {}
        self._next_ticket = 90_001
        self._last_ts: dict[str, int] = {}
        self._outbox: deque[tuple[type, dict[str, Any]]] = deque()
        self._bell = Doorbell()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = False
        self.counts: dict[str, int] = dict.fromkeys(
            ("orders_received", "duplicate_orders", "expired_refused", "broker_submits", "cancels", "queries",
             "flattens", "hellos_sent", "heartbeats_sent", "errors_sent", "errors_received", "stale_epoch",
             "unknown_epoch", "engine_losses", "restarts"), 0)
        self.order_messages: dict[str, int] = {}
        self._had_session = False
        self._retired: set[int] = set()
        self._new_session()
        if start:
            self.start()

    def _new_session(self) -> None:
        self.epoch = new_epoch()
        self._stamp = Stamper(self.epoch)
        self.engine_epoch = 0
        self.handshaked = False
        self._seq = SeqTracker()
        self._hb = self.initial_heartbeat
        self._missed = 3
        self._last_heard = time.monotonic()
        self._engine_lost = False

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> SimulatedTerminal:
        """Connect and start the EA thread (sends ``hello`` at once)."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="dc-mt5-terminal", daemon=True)
            self._thread.start()
        return self

    def kill(self, timeout: float = 5.0) -> None:
        """Stop abruptly: the socket closes without a word to the engine (a crashed terminal or a
        pulled cable). The account is kept."""
        if self._thread is not None:
            self._stop.set()
            self._bell.ring()
            self._thread.join(timeout)
            self._thread = None

    def restart(self) -> None:
        """A new EA instance on the same account: kill (if running), new epoch, new socket,
        ``hello`` with ``resumed`` false."""
        self.kill()
        self.counts["restarts"] += 1
        self._had_session = False
        self._new_session()
        self.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.kill()
        self._ctx.term()
        self._bell.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- market (any thread) ----------------------------------------------------------------------
    def on_bar(self, symbol: str, ts: int, open: float, high: float, low: float, close: float) -> None:
        """One bar of ``symbol`` (``ts`` ns): resting orders may fill or expire, stops and targets
        may close positions; exec reports of the orders it settles go to the engine."""
        with self._lock:
            self._last_ts[symbol] = max(ts, self._last_ts.get(symbol, ts))
            fills = self.broker.on_bar(symbol, ts, open, high, low, close)
            for rec in self._table.values():
                if rec.status not in ("placed", "partial") or rec.symbol != symbol:
                    continue
                st = self.broker.order_status(rec.coid)
                if st == "filled":
                    for f in fills:
                        if f.client_order_id == rec.coid and f.kind in _EXEC_KINDS:
                            self._filled(rec, f)
                    self._queue_report(rec)
                elif st in ("expired", "cancelled"):
                    rec.status, rec.reason = st, st
                    self._queue_report(rec)

    def set_price(self, symbol: str, price: float, ts: int | None = None) -> None:
        """The current mid price of ``symbol`` (a flat bar at ``ts``, default now in ns)."""
        with self._lock:
            t = time.time_ns() if ts is None else int(ts)
            t = max(t, self._last_ts.get(symbol, t - 1) + 1)
            self.on_bar(symbol, t, price, price, price, price)

    # ---- inspection (any thread) ------------------------------------------------------------------
    def executions(self) -> dict[str, int]:
        """How many times the broker executed each ``client_order_id`` (exactly once each, if the
        protocol works)."""
        with self._lock:
            out: dict[str, int] = {}
            for f in self.broker.fills:
                if f.kind in _EXEC_KINDS:
                    out[f.client_order_id] = out.get(f.client_order_id, 0) + 1
            return out

    def positions(self) -> dict[str, dict[str, Any]]:
        """Open positions by the ``client_order_id`` that opened them (one per open leg)."""
        with self._lock:
            out: dict[str, dict[str, Any]] = {}
            for name, pos in self.broker.positions().items():
                for leg in pos.legs:
                    rec = self._table.get(leg.client_order_id)
                    out[leg.client_order_id] = {"symbol": name, "side": "buy" if leg.direction > 0 else "sell",
                                                "volume": leg.lots, "price": leg.price,
                                                "ticket": rec.ticket if rec else 0}
            return out

    def order_status(self, client_order_id: str) -> str | None:
        rec = self._table.get(client_order_id)
        return None if rec is None else rec.status

    def stats(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "engine_epoch": self.engine_epoch, "handshaked": self.handshaked,
                "alive": self.alive, "gaps": self._seq.gaps, "reordered": self._seq.reordered,
                "duplicates": self._seq.duplicates, "seq_jumps": self._seq.jumps, "rejects": dict(self._codec.rejects),
                **self.counts}

    # ---- EA thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        configure(sock)
        sock.connect(self.address)
        self._sock = sock
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._bell.rfd, zmq.POLLIN)
        next_hello = 0.0
        next_hb = 0.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                due = next_hb if self.handshaked else next_hello
                events = dict(poller.poll(max(0, int((due - now) * 1000) + 1)))
                if self._bell.rfd in events:
                    self._bell.clear()
                try:
                    if sock in events:
                        self._read()
                    while self._outbox and self.handshaked:  # after the hello: the engine must know us
                        cls, kw = self._outbox.popleft()
                        self._send(cls(**self._stamp(), **kw))
                    now = time.monotonic()
                    if not self.handshaked:
                        if now >= next_hello:
                            self._hello()
                            next_hello = now + self._hb
                    else:
                        if now >= next_hb:
                            self.counts["heartbeats_sent"] += 1
                            self._send(Heartbeat(**self._stamp(), recv_seq=self._seq.hi))
                            next_hb = now + self._hb
                        self._check_engine(now)
                except Exception:
                    log.exception("simulated terminal iteration failed")
        finally:
            sock.close(0)

    def _check_engine(self, now: float) -> None:
        if not self._engine_lost and now - self._last_heard > self._missed * self._hb:
            self._engine_lost = True
            self.counts["engine_losses"] += 1
            log.warning("engine %d silent for %d heartbeats", self.engine_epoch, self._missed)
            if self.flatten_on_engine_loss:
                with self._lock:
                    self._flatten()

    def _send(self, msg: Any) -> None:
        try:
            self._sock.send(self._enc.encode(msg), zmq.NOBLOCK)
        except zmq.ZMQError as e:  # queue full: the engine's re-sends recover whatever this loses
            log.debug("terminal send failed: %s", e)

    def _reply(self, cls: type, **kw: Any) -> None:
        self._send(cls(**self._stamp(), **kw))

    def _hello(self) -> None:
        self.counts["hellos_sent"] += 1
        self._reply(TerminalHello, login=self.login, server=self.server, resumed=self._had_session,
                    peer_epoch=self.engine_epoch, build=self.build)

    def _read(self) -> None:
        for _ in range(4096):
            if not readable(self._sock):
                return
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:  # pragma: no cover - EVENTS said readable
                return
            if len(frames) != 1:
                self._codec.count("invalid")
                self.counts["errors_sent"] += 1
                self._reply(Error, reason="invalid", detail=f"expected 1 frame, got {len(frames)}", ref_seq=0)
                continue
            try:
                m = self._codec.decode(frames[0])
            except PayloadError as e:
                if getattr(e, "msg_type", "") == "error":  # an error is never answered with an error
                    continue
                self.counts["errors_sent"] += 1
                self._reply(Error, reason=e.reason, detail=e.detail[:200], ref_seq=getattr(e, "ref_seq", 0))
                continue
            self._dispatch(m)

    def _dispatch(self, m: Any) -> None:
        t = type(m)
        if m.epoch in self._retired:
            self.counts["stale_epoch"] += 1
            return
        if t is EngineHello:
            if m.peer_epoch != self.epoch:
                self._hello()  # the engine does not know this EA (yet)
                return
            if m.epoch != self.engine_epoch:
                if self.engine_epoch:
                    self._retired.add(self.engine_epoch)
                self.engine_epoch = m.epoch
                self._seq.reset()
                self._seq.check(m.seq)
            self.handshaked = True
            self._had_session = True
            self._hb = m.heartbeat_ms / 1000.0
            self._missed = m.missed
            self._last_heard = time.monotonic()
            self._engine_lost = False
            return
        if not self.handshaked or m.epoch != self.engine_epoch:
            self.counts["unknown_epoch"] += 1
            if self.handshaked:  # an engine restarted: introduce ourselves to it
                self.handshaked = False
            return
        if self._seq.check(m.seq) == "duplicate":
            return
        self._last_heard = time.monotonic()
        self._engine_lost = False
        with self._lock:
            if t is Order:
                self._on_order(m)
            elif t is Cancel:
                self._on_cancel(m)
            elif t is PositionsQuery:
                self.counts["queries"] += 1
                self._answer_positions(m.query_id, m.magic)
            elif t is Flatten:
                self.counts["flattens"] += 1
                self._flatten()
                self._answer_positions(m.query_id, m.magic)
            elif t is Error:
                self.counts["errors_received"] += 1
                log.warning("engine reported an error: %s %s", m.reason, m.detail)

    # ---- the EA rules (docs/mt5-bridge.md, section 5) -----------------------------------------------
    def _on_order(self, m: Order) -> None:
        coid = m.client_order_id
        self.counts["orders_received"] += 1
        self.order_messages[coid] = self.order_messages.get(coid, 0) + 1
        rec = self._table.get(coid)
        if rec is not None:  # seen before: repeat the first decision and the current state, place nothing
            self.counts["duplicate_orders"] += 1
            self._reply(Ack, client_order_id=coid, order_seq=m.seq, accepted=rec.accepted, reason=rec.ack_reason,
                        duplicate=True, ticket=rec.ticket)
            if rec.status:
                self._reply(ExecReport, **self._report_fields(rec))
            return
        rec = self._table[coid] = _Rec(coid, m.symbol, m.side, m.order_type, m.magic)
        if now_ms() >= m.valid_until:
            self.counts["expired_refused"] += 1
            rec.ack_reason = rec.reason = rec.status = "expired"
            self._reply(Ack, client_order_id=coid, order_seq=m.seq, accepted=False, reason="expired",
                        duplicate=False, ticket=0)
            self._reply(ExecReport, **self._report_fields(rec))
            return
        rec.accepted = True
        rec.ticket = self._next_ticket
        self._next_ticket += 1
        self._reply(Ack, client_order_id=coid, order_seq=m.seq, accepted=True, reason="", duplicate=False,
                    ticket=rec.ticket)
        self.counts["broker_submits"] += 1
        res = self.broker.submit(PaperOrder(
            client_order_id=coid, instrument=m.symbol, side=1 if m.side == "buy" else -1, type=m.order_type,
            lots=m.volume, price=m.price, stop_loss=m.sl, take_profit=m.tp,
            valid_until=0 if m.order_type == "market" else m.valid_until * 1_000_000, plan_id=m.plan_id,
            ts=max(time.time_ns(), self._last_ts.get(m.symbol, 0))))
        if res.status == "filled":
            for f in res.fills:
                self._filled(rec, f)
        elif res.status == "accepted":
            rec.status = "placed"
        else:
            rec.status, rec.reason = "rejected", res.reason or res.status
        self._reply(ExecReport, **self._report_fields(rec))

    def _on_cancel(self, m: Cancel) -> None:
        self.counts["cancels"] += 1
        rec = self._table.get(m.client_order_id)
        if rec is None:  # a tombstone: the order, should it arrive later, is refused
            rec = self._table[m.client_order_id] = _Rec(m.client_order_id)
            rec.ack_reason = rec.reason = rec.status = "cancelled"
        elif rec.status in ("placed", "partial") and self.broker.cancel(rec.coid):
            rec.status, rec.reason = "cancelled", m.reason or "cancelled"
        self._reply(ExecReport, **self._report_fields(rec))

    def _flatten(self) -> None:
        self.broker.flatten(reason="flatten")
        for rec in self._table.values():
            if rec.status in ("placed", "partial") and self.broker.order_status(rec.coid) == "cancelled":
                rec.status, rec.reason = "cancelled", "flatten"
                self._queue_report(rec)

    def _answer_positions(self, qid: int, magic: int) -> None:
        listed = []
        for name, pos in self.broker.positions().items():
            for leg in pos.legs:
                rec = self._table.get(leg.client_order_id)
                pmagic = rec.magic if rec is not None else 0
                if not (magic and pmagic and pmagic != magic):
                    listed.append((name, leg, rec, pmagic))
        # the snapshot: a hash of what is listed, so equal answers are recognisably equal
        snapshot = zlib.crc32(repr([(n, lg.client_order_id, lg.lots, lg.price, lg.stop_loss, lg.take_profit)
                                    for n, lg, _, _ in listed]).encode())
        for i, (name, leg, rec, pmagic) in enumerate(listed, 1):
            self._reply(Position, query_id=qid, snapshot=snapshot, index=i, symbol=name,
                        ticket=rec.ticket if rec else 0, side="buy" if leg.direction > 0 else "sell", volume=leg.lots,
                        price_open=leg.price, sl=leg.stop_loss, tp=leg.take_profit, magic=pmagic,
                        comment=leg.client_order_id[:31],
                        client_order_id=leg.client_order_id if rec is not None else "", profit=0.0)
        self._reply(PositionsEnd, query_id=qid, snapshot=snapshot, count=len(listed))

    # ---- helpers ------------------------------------------------------------------------------------
    def _filled(self, rec: _Rec, f: Any) -> None:
        total = rec.filled + f.lots
        rec.price = (rec.price * rec.filled + f.price * f.lots) / total
        rec.filled = round(total, 10)
        rec.commission -= f.commission  # MT5 books commission as a negative amount
        rec.fill_ts = f.ts // 1_000_000
        rec.status = "filled"

    def _report_fields(self, rec: _Rec) -> dict[str, Any]:
        return {"client_order_id": rec.coid, "status": rec.status, "symbol": rec.symbol, "side": rec.side,
                "ticket": rec.ticket, "price": rec.price, "volume": rec.filled, "commission": rec.commission,
                "fill_ts": rec.fill_ts, "reason": rec.reason}

    def _queue_report(self, rec: _Rec) -> None:
        """A report decided off the EA thread: the EA thread stamps and sends it."""
        self._outbox.append((ExecReport, self._report_fields(rec)))
        self._bell.ring()
