"""The engine side of the MetaTrader 5 bridge: :class:`MT5Bridge`.

The ROUTER socket and every piece of order and session state are worked on only under one
lock, ``_state_lock``. The bridge thread takes it for each round of its loop (it waits for the
socket on its file descriptor, without the lock; callbacks run in those rounds, holding it).
Other threads hand it work (orders, cancels, calls) through a deque and a
:class:`~._util.Doorbell`, with one exception: a new order on a live link, when the lock is free
and nothing is queued before it, is sent by the submitting thread itself under the lock, so it
is on the wire without waiting for the bridge thread to wake. The rules it implements are in
``docs/mt5-bridge.md``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Self

import msgspec
import zmq

from ...errors import PayloadError
from ...payloads import TradingPlan
from ...transport._common import check_address, endpoint, readable
from ._util import Doorbell, LogLimiter, ReplyThrottle, SeqTracker, Stamper, configure
from .protocol import (
    MAX_HEARTBEAT_MS,
    MAX_ID,
    MAX_MISSED,
    PROTOCOL_VERSION,
    Ack,
    Cancel,
    EngineHello,
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
    TerminalMessage,
    client_order_id_for,
    new_epoch,
    now_ms,
)

__all__ = ["DEFAULT_BRIDGE_ADDRESS", "BridgeReport", "MT5Bridge"]

log = logging.getLogger("dynamic_core.bridges.mt5")

DEFAULT_BRIDGE_ADDRESS = "tcp://127.0.0.1:5560"

# order states (docs/mt5-bridge.md, section 11)
QUEUED, SENT, ACKED, PLACED, PARTIAL, UNCONFIRMED = "queued", "sent", "acked", "placed", "partial", "unconfirmed"
FILLED, REJECTED, EXPIRED, CANCELLED, REFUSED = "filled", "rejected", "expired", "cancelled", "refused"
FINAL = frozenset({FILLED, REJECTED, EXPIRED, CANCELLED, REFUSED})
_RANK = {QUEUED: 0, SENT: 1, UNCONFIRMED: 1, ACKED: 2, PLACED: 3, PARTIAL: 4}
_EPS = 1e-9
_CHECK_STAMP = {"v": PROTOCOL_VERSION, "epoch": 1, "seq": 1, "ts": 0}  # a valid stamp, for checking an order
MAX_POSITIONS = 10_000
"""Most positions one reconciliation answer may list (a larger answer is refused: ``bad_answers``)."""


class BridgeReport(msgspec.Struct, frozen=True, kw_only=True):
    """What :meth:`MT5Bridge.on_report` callbacks receive: a change in an order's execution.

    ``status`` is an exec-report status (``placed``, ``partial``, ``filled``, ``rejected``,
    ``expired``, ``cancelled``). ``source`` says who decided it: ``"terminal"`` (an
    ``exec_report`` or a refused ``ack``), ``"bridge"`` (expired before it could be sent,
    refused in safe mode, dropped by flatten-on-safe-mode) or ``"reconciliation"`` (found as a
    position at the terminal). ``volume`` is the cumulative filled volume, ``price`` its
    average; ``ts`` is the terminal's ``fill_ts`` or the bridge's clock (ms UTC).
    """

    client_order_id: str
    plan_id: str
    status: str
    symbol: str
    side: str
    volume: float
    price: float
    commission: float
    ticket: int
    reason: str
    source: str
    ts: int


class _Order:
    """One order's state, changed only under the bridge's state lock once created."""

    __slots__ = (
        "acks",
        "backoff",
        "cancel",
        "coid",
        "comment",
        "confirmed",
        "commission",
        "ever_sent",
        "fill_price",
        "fill_ts",
        "filled",
        "inconsistent",
        "next_send",
        "open",
        "order_type",
        "plan_id",
        "price",
        "reason",
        "sends",
        "side",
        "sl",
        "state",
        "symbol",
        "t_ack",
        "t_final",
        "t_submit",
        "ticket",
        "tp",
        "valid_until",
        "volume",
    )

    def __init__(self, coid: str, symbol: str, side: str, order_type: str, volume: float, price: float,
                 sl: float, tp: float, valid_until: int, plan_id: str, comment: str) -> None:
        self.coid, self.symbol, self.side, self.order_type = coid, symbol, side, order_type
        self.volume, self.price, self.sl, self.tp = volume, price, sl, tp
        self.valid_until, self.plan_id, self.comment = valid_until, plan_id, comment
        self.state, self.reason = QUEUED, ""
        self.sends = 0
        self.ever_sent = False
        self.confirmed = False  # the terminal itself said this order ended (its final is final)
        self.next_send = 0.0
        self.backoff = 0.0
        self.ticket = 0
        self.fill_price = 0.0
        self.filled = 0.0
        self.commission = 0.0
        self.fill_ts = 0
        self.inconsistent = 0
        self.open = False
        self.cancel = False
        self.t_submit = time.perf_counter_ns()
        self.t_ack = 0
        self.t_final = 0
        self.acks = 0

    @property
    def upgradable(self) -> bool:
        """Marked expired here while sent but unacked: the EA may have placed it just in time,
        so a late ack, report or position still says what happened (section 6)."""
        return self.state == EXPIRED and self.ever_sent and not self.confirmed

    def view(self) -> dict[str, Any]:
        return {"client_order_id": self.coid, "state": self.state, "reason": self.reason, "symbol": self.symbol,
                "side": self.side, "order_type": self.order_type, "volume": self.volume, "price": self.price,
                "sl": self.sl, "tp": self.tp, "valid_until": self.valid_until, "plan_id": self.plan_id,
                "sends": self.sends, "ticket": self.ticket, "filled_volume": self.filled,
                "fill_price": self.fill_price, "commission": self.commission, "fill_ts": self.fill_ts,
                "open": self.open, "cancel_requested": self.cancel, "acks": self.acks,
                "inconsistent_reports": self.inconsistent,
                "ack_latency_us": (self.t_ack - self.t_submit) / 1e3 if self.t_ack else None}


def _mismatch(o: _Order, status: str, symbol: str, side: str, volume: float, price: float) -> str:
    """Why an execution (an ``exec_report``, or a position found by reconciliation as status
    ``filled``) cannot be of order ``o``; "" when it can (docs/mt5-bridge.md, section 5): the
    order's symbol and side (empty: not said), at most the ordered volume, a price > 0 for any
    volume filled (price 0 means nothing filled), and some volume when ``filled``."""
    if symbol and symbol != o.symbol:
        return f"symbol {symbol}"
    if side and side != o.side:
        return f"side {side}"
    if volume > o.volume + _EPS:
        return f"{volume:.8g} lots filled"
    if volume > _EPS and not price > 0:
        return f"{volume:.8g} lots filled at price {price:.8g}"
    if status == FILLED and not volume > _EPS:
        return "filled without volume"
    return ""


def _positions_mismatch(o: _Order, ps: list[Position]) -> tuple[str, int]:
    """:func:`_mismatch` of the positions listed under ``o``'s id, their volumes together; with
    the ``seq`` of the first position that cannot be ``o``'s."""
    vol = sum(p.volume for p in ps)
    for p in ps:
        why = _mismatch(o, FILLED, p.symbol, p.side, vol, p.price_open)
        if why:
            return f"position {p.ticket}: {why}", p.seq
    return "", 0


class _Query:
    """The positions queries (or flattens) of one reconciliation and the answers so far, by
    snapshot: answers describing the same snapshot are merged across re-sent queries."""

    __slots__ = ("backoff", "done", "flatten", "next_send", "qid", "qids", "sends", "snaps", "stored")

    def __init__(self, qid: int, flatten: bool) -> None:
        self.qid = qid
        self.qids = {qid}
        self.flatten = flatten
        self.snaps: dict[int, list[Any]] = {}  # snapshot -> [positions by index, count or None]
        self.stored = 0  # positions kept, all snapshots
        self.done: tuple[int, list[Position]] | None = None
        self.next_send = 0.0
        self.backoff = 0.0
        self.sends = 0

    def add(self, snapshot: int, position: Position | None = None, count: int | None = None) -> bool:
        """Record a position or an end marker; True once ``snapshot`` is complete. Raises
        ValueError for an answer no complete snapshot can hold (an index past the snapshot's
        count or past :data:`MAX_POSITIONS`, a count above it); nothing is kept of it."""
        entry = self.snaps.get(snapshot)
        n = entry[1] if entry is not None else None
        limit = MAX_POSITIONS if n is None else n
        if count is not None and (count > MAX_POSITIONS or (n is not None and count != n)):
            raise ValueError(f"positions_end of snapshot {snapshot}: count {count} (limit {limit})")
        if position is not None and position.index > limit:
            raise ValueError(f"position {position.index} of snapshot {snapshot}: past {limit}")
        if entry is None:
            # a terminal whose positions never hold still (or a flood of snapshots): start over
            if len(self.snaps) >= 64 or self.stored >= 4 * MAX_POSITIONS:
                self.snaps.clear()
                self.stored = 0
            entry = self.snaps[snapshot] = [{}, None]
        got = entry[0]
        if position is not None:
            self.stored += position.index not in got
            got[position.index] = position
        if count is not None and entry[1] is None:
            entry[1] = n = count
            for i in [i for i in got if i > n]:  # indices past the count: not of this snapshot
                del got[i]
                self.stored -= 1
        # every index kept is in 1..n, so n of them are all of them
        if n is not None and len(got) == n:
            self.done = (snapshot, [got[i] for i in range(1, n + 1)])
            return True
        return False


class MT5Bridge:
    """The engine side of the MetaTrader 5 bridge (ROUTER, binds): sends orders to one EA and
    makes sure each is executed exactly once (``docs/mt5-bridge.md``).

    Parameters
    ----------
    address : str
        Where the ROUTER binds (default ``tcp://127.0.0.1:5560``; loopback unless
        ``allow_remote``). ``tcp://127.0.0.1:*`` picks a free port: read :attr:`address`; any
        other port must be 1..65535 (ValueError).
    heartbeat : float
        Heartbeat interval, seconds.
    missed : int
        Heartbeat intervals without any message from the EA before safe mode.
    resend_timeout : float
        Seconds without an ack before the first re-send; doubles per re-send.
    resend_max_delay : float
        Cap of the re-send backoff, and the interval of status requests for acked orders
        without a final report.
    max_sends : int
        Sends of an order without any ack before it is ``unconfirmed``.
    magic : int
        MT5 magic number of the bridge's orders.
    safe_mode : {"queue", "refuse"}
        What happens to new orders in safe mode.
    flatten_on_safe_mode : bool
        Drop queued orders, cancel unsettled ones and flatten on entering safe mode (section 8).
    max_queued : int
        Bound of the queue of orders waiting for a live session.
    history : int
        Orders kept in :meth:`orders` (and recognised by id when submitted again); beyond it the
        oldest final orders without an open position are forgotten. A forgotten order submitted again is sent again and
        the EA, which remembers every id, answers with its first outcome. A filled order stays
        open here until a reconciliation finds its position gone (closed by netting, a stop or a
        target), so when pruning leaves more than ``history`` orders the bridge reconciles by
        itself, at most once per ``history`` orders submitted
        (``stats()["auto_reconciliations"]``): the orders kept stay within about twice
        ``history`` plus the positions really open at the terminal.
    symbols : mapping, optional
        Engine instrument name -> broker symbol (``{"EURUSD": "EURUSD.r"}``).
    allow_remote : bool
        Allow binding beyond loopback (the protocol has no authentication).
    start : bool
        Start the bridge thread now (else call :meth:`start`).

    Thread safety: :meth:`submit_plan`, :meth:`submit_order`, :meth:`cancel`, :meth:`flatten`,
    :meth:`stats`, :meth:`orders`, :meth:`positions` and :meth:`wait` may be called from any
    thread. Callbacks (:meth:`on_report`, :meth:`on_ack`) run on the bridge thread and must be
    quick; one that raises is logged and counted (``callback_errors``) and changes nothing else.
    """

    def __init__(self, address: str = DEFAULT_BRIDGE_ADDRESS, *, heartbeat: float = 1.0, missed: int = 3,
                 resend_timeout: float = 0.5, resend_max_delay: float = 5.0, max_sends: int = 8,
                 magic: int = 556001, safe_mode: str = "queue", flatten_on_safe_mode: bool = False,
                 max_queued: int = 1000, history: int = 100_000, symbols: Mapping[str, str] | None = None,
                 allow_remote: bool = False,
                 start: bool = True) -> None:
        if safe_mode not in ("queue", "refuse"):
            raise ValueError(f"safe_mode must be 'queue' or 'refuse', got {safe_mode!r}")
        # the liveness rule travels to the EA in its hello (whole ms): outside the protocol's
        # bounds no EA could accept it and the link never came up
        if not 0.001 <= heartbeat <= MAX_HEARTBEAT_MS / 1000:
            raise ValueError(f"heartbeat must be in [0.001, {MAX_HEARTBEAT_MS // 1000}] s (the protocol carries whole "
                             f"ms up to an hour), got {heartbeat!r}")
        if not 1 <= missed <= MAX_MISSED:
            raise ValueError(f"missed must be in [1, {MAX_MISSED}] (the protocol's bound), got {missed!r}")
        if not (resend_timeout > 0 and resend_max_delay >= resend_timeout):
            raise ValueError("need 0 < resend_timeout <= resend_max_delay")
        if max_sends < 1 or max_queued < 0 or not 0 <= magic < 2**63:
            raise ValueError("need max_sends >= 1, max_queued >= 0, 0 <= magic < 2**63")
        check_address(address, bind=True, allow_remote=allow_remote)
        self.heartbeat = float(heartbeat)
        self.missed = int(missed)
        self.resend_timeout = float(resend_timeout)
        self.resend_max_delay = float(resend_max_delay)
        self.max_sends = int(max_sends)
        self.magic = int(magic)
        self.safe_mode_policy = safe_mode
        self.flatten_on_safe_mode = bool(flatten_on_safe_mode)
        self.max_queued = int(max_queued)
        self.history = max(1, int(history))
        self.symbols = dict(symbols or {})
        self.epoch = new_epoch()
        self._tick = min(0.05, self.heartbeat / 4, self.resend_timeout / 2)

        self._ctx = zmq.Context(io_threads=1)
        self._sock = self._ctx.socket(zmq.ROUTER)
        configure(self._sock)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unreachable EA is an error, not a silent drop
        try:
            self._sock.bind(address)
        except zmq.ZMQError:
            self._sock.close(0)
            self._ctx.term()
            raise
        self.address = endpoint(self._sock)
        self._codec = MT5Codec(TerminalMessage)
        self._enc = msgspec.json.Encoder()
        self._stamp = Stamper(self.epoch)
        self._bell = Doorbell()
        self._sock_fd = self._sock.getsockopt(zmq.FD)  # what the bridge thread waits on

        self._lock = threading.Lock()  # guards _orders insertion against concurrent submitters
        # held by whoever works on the socket and the bridge-thread state below: the bridge thread
        # for each round of its loop, a submitter for the fast path of submit_order
        self._state_lock = threading.Lock()
        self._cond = threading.Condition(threading.Lock())
        self._waiters = 0
        self._changes = 0  # rounds that may have changed something while someone waited
        self._orders: dict[str, _Order] = {}
        self._inbox: deque[tuple[str, Any]] = deque()
        # taken to check that the bridge is open and hand it work in one step, and by close() to
        # stop it: nothing reaches the inbox after the bridge thread's last look at it
        self._post_lock = threading.Lock()
        self._report_cbs: list[Callable[[BridgeReport], object]] = []
        self._ack_cbs: list[Callable[[str, bool, str], object]] = []

        # bridge-thread state
        self._open: dict[str, _Order] = {}  # not final (or expired while unacked): needs attention
        self._queued: dict[str, _Order] = {}
        self.link = "waiting"
        self._term_epoch = 0
        self._term_ident: bytes | None = None
        self._term_hello: TerminalHello | None = None
        self._retired: dict[int, None] = {}  # epochs of replaced sessions, oldest first (at most 256)
        self._seq = SeqTracker()
        # what the terminal (or anyone reaching the socket) can make happen once per frame is bounded
        self._logs = LogLimiter(log)
        self._replies = ReplyThrottle()
        self._last_heard = 0.0
        self._t_silent = 0.0
        self._next_hb = 0.0
        self._query: _Query | None = None
        self._next_qid = 1
        self._flatten_pending = False
        self._unknown_hello_at: dict[bytes, float] = {}
        self._unknown_positions: list[dict[str, Any]] = []
        self._adoptable: dict[str, Position] = {}
        self._last_recon: dict[str, Any] = {}
        self._positions: dict[str, dict[str, Any]] = {}
        self.counts: dict[str, int] = dict.fromkeys(
            ("submitted", "idempotent", "sent", "resends", "status_requests", "acks", "acks_refused",
             "duplicate_acks", "exec_reports", "stale_reports", "fills", "expired", "refused", "stale_epoch",
             "unknown_epoch", "errors_received", "errors_sent", "unexpected", "send_failures", "safe_mode_entries",
             "sessions", "reconciliations", "reconciled_fills", "unknown_positions", "late_outcomes",
             "callback_errors", "unconfirmed", "cancels_sent", "flattens_sent", "heartbeats_sent",
             "hellos_sent", "queue_full", "inconsistent_reports", "bad_answers", "errors_suppressed",
             "auto_reconciliations"), 0)
        self._recon_submitted = -history  # orders submitted at the last reconciliation of its own
        self._safe_since: float | None = None
        self._silence_at_safe = 0.0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = False
        if start:
            self.start()

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> MT5Bridge:
        """Start the bridge thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="dc-mt5-bridge", daemon=True)
            self._thread.start()
        return self

    def _check_open(self) -> None:
        if self._stop.is_set():
            raise RuntimeError("the mt5 bridge is closed")

    def _post(self, kind: str, item: Any) -> None:
        """Hand the bridge thread work; RuntimeError once the bridge is closed (it would wait for a
        thread that has stopped)."""
        with self._post_lock:
            self._check_open()
            self._inbox.append((kind, item))
            self._bell.ring()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the bridge thread and close the socket. Orders not settled stay as they are in
        :meth:`orders` (the EA de-duplicates them if a new bridge submits them again)."""
        with self._post_lock:
            if self._stop.is_set():
                return
            self._stop.set()
            self._bell.ring()
        t_end = time.monotonic() + timeout
        if self._thread is threading.current_thread():  # from a callback: the thread ends after it
            self._closed = True
            return
        if self._thread is not None:
            self._thread.join(timeout)
        # the lock: no submitter is sending on the socket, and the bridge thread is out of its round
        if not self._state_lock.acquire(timeout=max(0.0, t_end - time.monotonic())):
            log.warning("mt5 bridge: still busy %.1f s after close (a slow callback?); "
                        "the bridge thread closes the socket when it gets out", timeout)
            self._closed = True
            return
        try:
            self._closed = True
            self._sock.close(0)
        finally:
            self._state_lock.release()
        self._ctx.term()
        self._bell.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- any thread ----------------------------------------------------------------------------
    def submit_plan(self, plan: TradingPlan, *, order_type: str = "market", attempt: int = 0) -> str:
        """Send the order that executes ``plan``; returns its ``client_order_id``.

        The id is :func:`~.protocol.client_order_id_for` ``(plan.plan_id, attempt)``, so
        submitting the same plan again returns the same id and sends nothing (unless the first
        was refused in safe mode). Side from ``plan.direction``, volume ``plan.size``, stop
        ``plan.stop``, take profit ``plan.targets[0]``, ``valid_until`` ``plan.valid_until``
        (ns, sent as ms); a limit/stop order rests at ``plan.entry``. Never blocks.
        """
        if plan.direction not in (1, -1):
            raise ValueError(f"plan {plan.plan_id!r} has no direction")
        return self.submit_order(
            symbol=plan.instrument, side="buy" if plan.direction > 0 else "sell", volume=plan.size,
            valid_until=plan.valid_until // 1_000_000, order_type=order_type,
            price=plan.entry if order_type != "market" else 0.0, sl=plan.stop,
            tp=plan.targets[0] if plan.targets else 0.0, plan_id=plan.plan_id,
            client_order_id=client_order_id_for(plan.plan_id, attempt))

    def submit_order(self, *, symbol: str, side: str, volume: float, valid_until: int, order_type: str = "market",
                     price: float = 0.0, sl: float = 0.0, tp: float = 0.0, plan_id: str = "",
                     client_order_id: str | None = None, comment: str | None = None) -> str:
        """Send an order with explicit fields; returns its ``client_order_id``.

        ``valid_until`` is ms since the Unix epoch (UTC). ``client_order_id`` defaults to
        :func:`~.protocol.client_order_id_for` ``(plan_id)`` (a random id when there is no
        ``plan_id``); an id already known returns at once and sends nothing. ``symbol`` is
        mapped through ``symbols``. Never blocks; raises ValueError for an order that no EA
        could accept (bad side, type, volume, id), RuntimeError once the bridge is closed (the
        order would wait for a thread that has stopped).
        """
        self._check_open()
        if side not in ("buy", "sell"):
            raise ValueError(f"side must be 'buy' or 'sell', got {side!r}")
        if order_type not in ("market", "limit", "stop"):
            raise ValueError(f"order_type must be market, limit or stop, got {order_type!r}")
        if not (volume > 0 and volume < 1e9):
            raise ValueError(f"volume must be > 0, got {volume!r}")
        if order_type != "market" and not price > 0:
            raise ValueError("a limit or stop order needs a price > 0")
        if client_order_id is None:
            client_order_id = client_order_id_for(plan_id) if plan_id else "dcx" + os.urandom(10).hex()
        coid = client_order_id
        if not (0 < len(coid) <= MAX_ID):
            raise ValueError(f"client_order_id must be 1..{MAX_ID} characters")
        o = _Order(coid, self.symbols.get(symbol, symbol), side, order_type, float(volume), float(price),
                   float(sl), float(tp), int(valid_until), plan_id, coid if comment is None else comment[:31])
        try:  # the message it will be, checked against the protocol's bounds (docs/mt5-bridge.md, 2.1)
            msgspec.convert(msgspec.structs.asdict(self._order_message(o, _CHECK_STAMP)), Order)
        except (msgspec.ValidationError, TypeError, ValueError) as e:
            raise ValueError(f"no EA could accept order {coid!r}: {e}") from None
        with self._lock:
            old = self._orders.get(coid)
            if old is not None and old.state != REFUSED:
                self.counts["idempotent"] += 1
                return coid
            self._orders[coid] = o
        if not self._send_now(o):
            try:
                self._post("order", o)
            except RuntimeError:  # closed meanwhile: the order is not taken
                with self._lock:
                    if self._orders.get(coid) is o:
                        if old is None:
                            del self._orders[coid]
                        else:
                            self._orders[coid] = old
                raise
        return coid

    def _send_now(self, o: _Order) -> bool:
        """The fast path of :meth:`submit_order`: send ``o`` from this thread when the lock is
        free, the link is live, nothing is queued before it and sending is all there is to do
        (no callback runs here: those stay on the bridge thread). False: hand it over."""
        if self._thread is None or self._inbox or not self._state_lock.acquire(blocking=False):
            return False
        try:
            # _new_order would only send it (its other outcomes call back: bridge thread only)
            if (self._closed or self._stop.is_set() or self._inbox or self.link != "live"
                    or o.state != QUEUED or o.cancel or o.coid in self._adoptable
                    or now_ms() >= o.valid_until):
                return False
            self._new_order(o)
            # a send can take the socket's readiness signal: wake the bridge thread if a
            # message waits
            if readable(self._sock):
                self._bell.ring()
        finally:
            self._state_lock.release()
        self._notify_waiters()  # wait(coid, "sent") and the like
        return True

    def _notify_waiters(self) -> None:
        """Wake wait()/wait_until() after something may have changed."""
        if self._waiters:
            with self._cond:
                self._changes += 1
                self._cond.notify_all()

    def cancel(self, client_order_id: str) -> bool:
        """Ask the EA to cancel an order that is not final; False when it is unknown or final.
        The outcome arrives as a report (``cancelled``, or the order's real final state)."""
        self._check_open()
        o = self._orders.get(client_order_id)
        if o is None or o.state in FINAL:
            return False
        self._post("cancel", o)
        return True

    def flatten(self, reason: str = "requested") -> None:
        """Close every position and pending order of this bridge's magic at the terminal. The
        answer reconciles; orders wait meanwhile (section 8 of the protocol)."""
        self._post("flatten", reason)

    def reconcile(self) -> None:
        """Reconcile with the terminal now (positions query); orders wait until it completes."""
        self._post("reconcile", None)

    def on_report(self, callback: Callable[[BridgeReport], object]) -> None:
        """Call ``callback(report)`` on the bridge thread for every change in an order's
        execution (see :class:`BridgeReport`)."""
        self._report_cbs.append(callback)

    def on_ack(self, callback: Callable[[str, bool, str], object]) -> None:
        """Call ``callback(client_order_id, accepted, reason)`` on the bridge thread for the first
        ack of each order."""
        self._ack_cbs.append(callback)

    def orders(self) -> dict[str, dict[str, Any]]:
        """A snapshot of every order's state by ``client_order_id`` (``state``, ``reason``,
        ``sends``, fills, ``open``, ...)."""
        with self._lock:
            items = list(self._orders.values())
        return {o.coid: o.view() for o in items}

    def order(self, client_order_id: str) -> dict[str, Any] | None:
        """One order's state (as in :meth:`orders`), or None."""
        o = self._orders.get(client_order_id)
        return None if o is None else o.view()

    def positions(self) -> dict[str, dict[str, Any]]:
        """What the bridge believes is open at the terminal, by ``client_order_id``: the
        positions of the last reconciliation plus orders filled since (``symbol``, ``side``,
        ``volume``, ``price``, ``ticket``). It does not model netting or stop/target exits: the
        next reconciliation corrects for those."""
        return self._call(lambda: {k: dict(v) for k, v in self._positions.items()})

    def reconciliation(self) -> dict[str, Any]:
        """The outcome of the last reconciliation: ``query_id`` (the last one sent),
        ``query_ids`` (every one it sent: a query re-sent unanswered gets a new id, and an answer
        to any of them counts), ``positions``, ``matched``, ``reconciled`` (orders found
        executed), ``closed`` and ``unknown`` positions."""
        return self._call(lambda: dict(self._last_recon))

    @property
    def safe_mode(self) -> bool:
        return self.link == "safe"

    def stats(self) -> dict[str, Any]:
        """Counters and link state (a snapshot)."""
        def get() -> dict[str, Any]:
            states: dict[str, int] = {}
            for o in list(self._orders.values()):
                states[o.state] = states.get(o.state, 0) + 1
            hello = self._term_hello
            return {
                "link": self.link, "safe_mode": self.link == "safe", "epoch": self.epoch,
                "terminal_epoch": self._term_epoch, "address": self.address,
                "terminal": None if hello is None else {"login": hello.login, "server": hello.server,
                                                        "build": hello.build, "resumed": hello.resumed},
                "queued": len(self._queued), "open": len(self._open), "states": states,
                "gaps": self._seq.gaps, "reordered": self._seq.reordered, "duplicates": self._seq.duplicates,
                "seq_jumps": self._seq.jumps,
                "rejects": dict(self._codec.rejects), "rejected": self._codec.rejected,
                "silence_at_safe_mode_s": self._silence_at_safe, "logs_suppressed": self._logs.suppressed,
                **self.counts,
            }
        return self._call(get)

    def wait(self, client_order_id: str, states: Any = FINAL, timeout: float = 10.0) -> str | None:
        """Wait until the order's state is in ``states`` (default: final); its state, or None on
        timeout."""
        want = {states} if isinstance(states, str) else set(states)
        ok = self.wait_until(lambda: (o := self._orders.get(client_order_id)) is not None and o.state in want,
                             timeout)
        return self._orders[client_order_id].state if ok else None

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        """Wait until ``predicate()`` is true; re-evaluated whenever the bridge thread changed
        something. False on timeout."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("wait()/wait_until() from a bridge callback would wait for the thread it "
                               "blocks; record what you need and return")
        # The predicate runs without the condition's lock: it may ask the bridge thread
        # (stats(), positions()), and that thread takes the lock to notify after each round; a
        # predicate run under it would wait on a thread waiting on us. The round counter, read
        # before the predicate, keeps a change made meanwhile from being missed.
        end = time.monotonic() + timeout
        with self._cond:
            self._waiters += 1
        try:
            while True:
                with self._cond:
                    seen = self._changes
                if predicate():
                    return True
                left = end - time.monotonic()
                if left <= 0:
                    return False
                with self._cond:
                    if self._changes == seen:
                        self._cond.wait(min(left, 0.1))
        finally:
            with self._cond:
                self._waiters -= 1

    def _call(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run ``fn`` on the bridge thread (its state is consistent there) and return the result;
        here once that thread has ended (after its last round) or was never started."""
        th = self._thread
        if th is None or threading.current_thread() is th:
            return fn()
        ev = threading.Event()
        box: list[Any] = []
        try:
            self._post("call", (fn, ev, box))
        except RuntimeError:  # closing or closed: after the thread's last round
            th.join(timeout)
            return fn()
        end = time.monotonic() + timeout
        while not ev.wait(min(0.1, max(0.0, end - time.monotonic()))):
            if not th.is_alive():  # it ended (it failed) after its last drain: answer here
                with self._state_lock:
                    self._drain_calls_on_exit()
                break
            if time.monotonic() >= end:
                raise TimeoutError("the bridge thread did not answer")
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    # ---- bridge thread: loop --------------------------------------------------------------------
    def _loop(self) -> None:
        # The socket is waited for on its file descriptor (ZMQ_FD, edge-triggered: readable when
        # its events may have changed), so the wait does not touch the socket and needs no lock;
        # ZMQ_EVENTS, read under the lock, says whether a message is really there.
        try:
            self._rounds()
        finally:
            with self._state_lock:
                self._drain_calls_on_exit()
                late = self._closed and not self._sock.closed  # close() timed out waiting for us
                if late:
                    self._sock.close(0)
            if late:
                self._ctx.term()
                self._bell.close()

    def _rounds(self) -> None:
        sock, bell = self._sock, self._bell
        poller = zmq.Poller()
        poller.register(self._sock_fd, zmq.POLLIN)
        poller.register(bell.rfd, zmq.POLLIN)
        next_house = 0.0
        more = False  # messages left after a round: go again without waiting
        while not self._stop.is_set():
            wait_ms = 0 if more else max(0, int((next_house - time.monotonic()) * 1000) + 1)
            try:
                events = dict(poller.poll(wait_ms))
            except zmq.ZMQError:  # pragma: no cover - context terminated under us
                return
            with self._state_lock:
                if self._closed:  # pragma: no cover - closed while the thread did not answer
                    return
                try:
                    if bell.rfd in events:
                        bell.clear()
                    self._read()  # returns at once when no message waits
                    if self._inbox:
                        self._drain()
                    now = time.monotonic()
                    if now >= next_house:
                        self._housekeeping(now)
                        next_house = now + self._tick
                except Exception:
                    log.exception("mt5 bridge iteration failed")
                try:
                    more = readable(sock)
                except zmq.ZMQError:  # pragma: no cover - context terminated under us
                    return
            self._notify_waiters()

    def _drain_calls_on_exit(self) -> None:
        while self._inbox:
            kind, item = self._inbox.popleft()
            if kind == "call":
                fn, ev, box = item
                try:
                    box.append(fn())
                except BaseException as e:  # noqa: BLE001 - handed back to the caller
                    box.append(e)
                ev.set()

    def _drain(self) -> None:
        inbox = self._inbox
        while inbox:
            kind, item = inbox.popleft()
            if kind == "order":
                self._new_order(item)
            elif kind == "call":
                fn, ev, box = item
                try:
                    box.append(fn())
                except BaseException as e:  # noqa: BLE001 - handed back to the caller
                    box.append(e)
                ev.set()
            elif kind == "cancel":
                o = item
                if o.state not in FINAL and not o.cancel:
                    if o.state == QUEUED or not o.ever_sent:
                        self._queued.pop(o.coid, None)
                        self._finish(o, CANCELLED, "cancelled_before_send", "bridge")
                    else:
                        o.cancel = True
                        o.sends, o.backoff, o.next_send = 0, 0.0, 0.0
                        self._open[o.coid] = o
                        if self.link == "live":
                            self._send_cancel(o, time.monotonic())
            elif kind == "flatten":
                self._flatten_pending = True
                if self._term_ident is not None and self.link != "safe":
                    self._start_reconcile(time.monotonic())
            elif kind == "reconcile" and self._term_ident is not None and self.link == "live":
                self._start_reconcile(time.monotonic())

    # ---- orders ---------------------------------------------------------------------------------
    def _new_order(self, o: _Order) -> None:
        self.counts["submitted"] += 1
        if o.state != QUEUED or o.cancel:  # cancelled (by a cancel drained first) before it was sent
            return
        pos = self._adoptable.pop(o.coid, None)
        if pos is not None:  # an unknown position of the last reconciliation is this order: done
            why, ref_seq = _positions_mismatch(o, [pos])
            if not why:
                self._reconciled_fill(o, [pos])
                return
            self._inconsistent(o, "a listed position", why, ref_seq)  # not this order's: send it (the EA de-duplicates)
        if self.link == "live":
            if now_ms() >= o.valid_until:
                self._finish(o, EXPIRED, "expired_before_send", "bridge")
                return
            self._open[o.coid] = o
            self._send_order(o, time.monotonic())
            return
        if self.link == "safe" and self.safe_mode_policy == "refuse":
            self._finish(o, REFUSED, "safe_mode", "bridge")
            return
        if len(self._queued) >= self.max_queued:
            self.counts["queue_full"] += 1
            self._finish(o, REFUSED, "queue_full", "bridge")
            return
        self._queued[o.coid] = o
        self._open[o.coid] = o

    def _order_message(self, o: _Order, stamp: dict[str, int]) -> Order:
        return Order(**stamp, client_order_id=o.coid, symbol=o.symbol, side=o.side, order_type=o.order_type,
                     volume=o.volume, price=o.price, sl=o.sl, tp=o.tp, valid_until=o.valid_until,
                     plan_id=o.plan_id, magic=self.magic, comment=o.comment, attempt=o.sends)

    def _send_order(self, o: _Order, now: float) -> None:
        msg = self._order_message(o, self._stamp())
        if o.sends:
            self.counts["resends" if o.state in (SENT, UNCONFIRMED, QUEUED) else "status_requests"] += 1
        else:
            self.counts["sent"] += 1
        if o.state == QUEUED:
            o.state = SENT
        o.sends += 1
        o.ever_sent = True
        if o.state in (SENT, UNCONFIRMED):
            o.backoff = self.resend_timeout if not o.backoff else min(o.backoff * 2, self.resend_max_delay)
        else:
            o.backoff = self.resend_max_delay
        o.next_send = now + o.backoff
        self._send(msg)

    def _send_cancel(self, o: _Order, now: float) -> None:
        self.counts["cancels_sent"] += 1
        o.sends += 1
        o.backoff = self.resend_timeout if not o.backoff else min(o.backoff * 2, self.resend_max_delay)
        o.next_send = now + o.backoff
        self._send(Cancel(**self._stamp(), client_order_id=o.coid, reason=o.reason or "requested"))

    def _close(self, o: _Order, state: str, reason: str) -> None:
        """``o`` leaves the open and queued books in its final ``state``."""
        o.state, o.reason = state, reason
        o.t_final = time.perf_counter_ns()
        self._open.pop(o.coid, None)
        self._queued.pop(o.coid, None)

    def _finish(self, o: _Order, state: str, reason: str, source: str) -> None:
        """Move ``o`` to a final state decided here (not by an exec report)."""
        self._close(o, state, reason)
        if state == EXPIRED:
            # sent but unacked: the EA may still have placed it in time; a late ack or report
            # (or a position found by reconciliation) still upgrades it (see _on_ack, _on_exec)
            self.counts["expired"] += 1
        elif state == REFUSED:
            self.counts["refused"] += 1
        status = "rejected" if state == REFUSED else state
        self._report(o, status, reason, source, now_ms())

    def _report(self, o: _Order, status: str, reason: str, source: str, ts: int) -> None:
        if not self._report_cbs:
            return
        r = BridgeReport(client_order_id=o.coid, plan_id=o.plan_id, status=status, symbol=o.symbol, side=o.side,
                         volume=o.filled, price=o.fill_price, commission=o.commission, ticket=o.ticket,
                         reason=reason, source=source, ts=ts)
        for cb in self._report_cbs:
            try:
                cb(r)
            except Exception:
                self.counts["callback_errors"] += 1
                log.exception("on_report callback failed for %s", o.coid)

    def _on_ack(self, m: Ack) -> None:
        o = self._orders.get(m.client_order_id)
        if o is None:
            self.counts["stale_reports"] += 1
            return
        self.counts["acks"] += 1
        if m.duplicate:
            self.counts["duplicate_acks"] += 1
        first = o.acks == 0
        o.acks += 1
        if first:
            o.t_ack = time.perf_counter_ns()
            for cb in self._ack_cbs:
                try:
                    cb(o.coid, m.accepted, m.reason)
                except Exception:
                    self.counts["callback_errors"] += 1
                    log.exception("on_ack callback failed for %s", o.coid)
        if m.ticket:
            o.ticket = m.ticket
        if not m.accepted:
            self.counts["acks_refused"] += 1
            if o.state == EXPIRED and m.reason == EXPIRED:  # the EA confirms what we assumed
                o.confirmed = True
                self._open.pop(o.coid, None)
                return
            if o.state in FINAL and not o.upgradable:
                return
            state = m.reason if m.reason in (EXPIRED, CANCELLED) else REJECTED
            self._settle(o, state, m.reason or "refused", "terminal", now_ms())
            return
        if o.state in (SENT, UNCONFIRMED):
            o.state = ACKED
            o.backoff = self.resend_max_delay
            o.next_send = time.monotonic() + self.resend_max_delay
        elif o.upgradable and not o.cancel:
            # accepted in time after all: wait for its report like any acked order
            self.counts["late_outcomes"] += 1
            o.state, o.reason = ACKED, ""
            o.next_send = time.monotonic() + self.resend_max_delay
            self._open[o.coid] = o

    def _inconsistent(self, o: _Order, what: str, why: str, ref_seq: int) -> None:
        """An execution that cannot be of ``o`` (see :func:`_mismatch`): counted (in all and on
        the order), logged, answered with ``error`` ``invalid``; ``o`` itself is unchanged."""
        self.counts["inconsistent_reports"] += 1
        o.inconsistent += 1
        detail = f"{what} for {o.coid} does not match the order ({why}; the order: {o.symbol} {o.side} {o.volume:.8g})"
        self._logs("inconsistent reports", logging.WARNING, "refused %s", detail)
        if self._term_ident is not None:
            self._error(self._term_ident, "invalid", detail[:200], ref_seq)

    def _on_exec(self, m: ExecReport) -> None:
        o = self._orders.get(m.client_order_id)
        if o is None:
            self.counts["stale_reports"] += 1
            return
        why = _mismatch(o, m.status, m.symbol, m.side, m.volume, m.price)
        if why:  # not a report of this order: the order is unchanged
            self._inconsistent(o, "exec_report", why, m.seq)
            return
        self.counts["exec_reports"] += 1
        if m.ticket:
            o.ticket = m.ticket
        st = m.status
        if st == EXPIRED and o.state == EXPIRED:  # the EA confirms what we assumed
            o.confirmed = True
            self._open.pop(o.coid, None)
            return
        late = o.upgradable and st != EXPIRED
        if o.state in FINAL and not late:
            return  # final is final; repeats change nothing
        if m.volume + _EPS < o.filled:
            # cumulative volume only grows: a report of fewer lots than already reported would
            # lose a fill (a cancel after a partial fill carries the partial volume)
            self._inconsistent(o, "exec_report", f"{m.volume:.8g} lots after {o.filled:.8g} reported", m.seq)
            return
        if late:
            self.counts["late_outcomes"] += 1
        if st in FINAL:
            o.filled, o.fill_price, o.commission, o.fill_ts = m.volume, m.price, m.commission, m.fill_ts
            o.confirmed = True
            self._settle(o, st, m.reason, "terminal", m.fill_ts or now_ms())
            return
        # placed / partial: only forward moves
        if _RANK.get(st, 0) < _RANK.get(o.state, 0) and m.volume <= o.filled + _EPS:
            return
        changed = st != o.state or m.volume > o.filled + _EPS
        o.filled, o.fill_price, o.commission, o.fill_ts = m.volume, m.price, m.commission, m.fill_ts
        o.state = st
        o.next_send = time.monotonic() + self.resend_max_delay
        self._open[o.coid] = o
        if o.filled > _EPS:
            self._hold(o)
        if changed:
            self._report(o, st, m.reason, "terminal", m.fill_ts or now_ms())

    def _hold(self, o: _Order) -> None:
        """``o``'s filled volume is (as far as the bridge knows) an open position."""
        o.open = True
        self._positions[o.coid] = {"symbol": o.symbol, "side": o.side, "volume": o.filled,
                                   "price": o.fill_price, "ticket": o.ticket}

    def _settle(self, o: _Order, state: str, reason: str, source: str, ts: int) -> None:
        """An outcome from the terminal (or reconciliation): final. Whatever of it was filled
        (all of a fill; the part of a cancelled or expired order filled before) is held."""
        self._close(o, state, reason)
        if o.filled > _EPS:
            self._hold(o)
        if state == FILLED:
            self.counts["fills"] += 1
        elif state == EXPIRED:
            self.counts["expired"] += 1
        self._report(o, state, reason, source, ts)

    # ---- receiving ------------------------------------------------------------------------------
    def _read(self) -> None:
        sock, codec = self._sock, self._codec
        for _ in range(4096):
            if not readable(sock):
                return
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)  # small frames: copying is cheaper than Frame objects
            except zmq.Again:  # pragma: no cover - EVENTS said readable
                return
            ident = frames[0]
            if len(frames) != 2:
                codec.count("invalid")
                self._error(ident, "invalid", f"expected 1 frame, got {len(frames) - 1}", 0)
                continue
            try:
                m = codec.decode(frames[1])
            except PayloadError as e:
                self._logs(f"refused frames ({e.reason})", logging.WARNING, "refused a frame from the terminal: %s", e)
                if getattr(e, "msg_type", "") != "error":  # an error is never answered with an error
                    self._error(ident, e.reason, e.detail[:200], getattr(e, "ref_seq", 0))
                continue
            self._dispatch(ident, m)

    def _error(self, ident: bytes, reason: str, detail: str, ref_seq: int) -> None:
        if not self._replies.allow(ident):  # a flood gets a bounded number of answers
            self.counts["errors_suppressed"] += 1
            return
        self.counts["errors_sent"] += 1
        self._send(Error(**self._stamp(), reason=reason, detail=detail, ref_seq=ref_seq), ident)

    def _dispatch(self, ident: bytes, m: Any) -> None:
        now = time.monotonic()
        ep = m.epoch
        if ep != self._term_epoch:
            # a replaced session's traffic is dropped, unless the session that replaced it has gone
            # silent (safe mode): then that terminal may come back (told to say hello, below)
            if ep in self._retired and self.link != "safe":
                self.counts["stale_epoch"] += 1
                return
            if type(m) is TerminalHello:
                self._new_session(ident, m, now)
                return
            self.counts["unknown_epoch"] += 1
            if now - self._unknown_hello_at.get(ident, 0.0) >= self.heartbeat:  # tell it to say hello
                if len(self._unknown_hello_at) > 64:
                    self._unknown_hello_at.clear()
                self._unknown_hello_at[ident] = now
                self._send_hello(ident, 0)
            return
        if self._seq.check(m.seq) == "duplicate":
            return
        self._term_ident = ident  # a reconnected DEALER gets a new routing id
        self._last_heard = now
        if self.link == "safe":
            log.info("terminal %d heard again: reconciling before leaving safe mode", ep)
            self._start_reconcile(now)
        t = type(m)
        if t is Ack:
            self._on_ack(m)
        elif t is ExecReport:
            self._on_exec(m)
        elif t is Heartbeat:
            pass
        elif t is Position or t is PositionsEnd:
            q = self._query
            if q is None or m.query_id not in q.qids:  # no reconciliation asked for it (any more)
                self.counts["stale_reports"] += 1
                return
            try:
                done = q.add(m.snapshot, position=m) if t is Position else q.add(m.snapshot, count=m.count)
            except ValueError as e:
                self.counts["bad_answers"] += 1
                self._error(ident, "invalid", str(e)[:200], m.seq)
                return
            if done:
                self._finish_reconcile(now)
        elif t is TerminalHello:
            self._term_hello = m
            self._send_hello(ident, ep)
        elif t is Error:
            self.counts["errors_received"] += 1
            self._logs("errors from the terminal", logging.WARNING, "terminal reported an error: %s %s (seq %d)",
                       m.reason, m.detail, m.ref_seq)
        else:  # pragma: no cover - the union has nothing else
            self.counts["unexpected"] += 1

    def _new_session(self, ident: bytes, m: TerminalHello, now: float) -> None:
        self._retired.pop(m.epoch, None)
        if self._term_epoch:
            self._retired[self._term_epoch] = None
            if len(self._retired) > 256:
                del self._retired[next(iter(self._retired))]
            self._logs("terminal restarts", logging.INFO, "terminal restarted: epoch %d -> %d", self._term_epoch,
                       m.epoch)
        self.counts["sessions"] += 1
        self._term_epoch = m.epoch
        self._term_ident = ident
        self._term_hello = m
        self._seq.reset()
        self._seq.check(m.seq)
        self._last_heard = now
        self._logs("terminal sessions", logging.INFO, "terminal session: epoch %d login %d server %s build %s "
                   "resumed %s", m.epoch, m.login, m.server, m.build, m.resumed)
        self._send_hello(ident, m.epoch)
        self._start_reconcile(now)

    def _send_hello(self, ident: bytes, peer_epoch: int) -> None:
        self.counts["hellos_sent"] += 1
        self._send(EngineHello(**self._stamp(), peer_epoch=peer_epoch, heartbeat_ms=max(1, round(self.heartbeat * 1000)),
                               missed=self.missed, magic=self.magic), ident)

    # ---- reconciliation -------------------------------------------------------------------------
    def _start_reconcile(self, now: float) -> None:
        self.link = "reconciling"
        flatten = self._flatten_pending
        if flatten:  # cancels first, so an order that is still on its way is refused when it lands
            for o in list(self._open.values()):
                if o.cancel and o.state not in FINAL:
                    self._send_cancel(o, now)
        self._query = _Query(self._next_qid, flatten)
        self._next_qid += 1
        self._send_query(now)

    def _send_query(self, now: float) -> None:
        q = self._query
        assert q is not None
        q.sends += 1
        q.backoff = self.resend_timeout if not q.backoff else min(q.backoff * 2, self.resend_max_delay)
        q.next_send = now + q.backoff
        if q.flatten:
            self.counts["flattens_sent"] += 1
            self._send(Flatten(**self._stamp(), query_id=q.qid, magic=self.magic, reason="flatten"))
        else:
            self._send(PositionsQuery(**self._stamp(), query_id=q.qid, magic=self.magic))

    def _finish_reconcile(self, now: float) -> None:
        q = self._query
        assert q is not None and q.done is not None
        self._query = None
        if q.flatten:
            self._flatten_pending = False
        self.counts["reconciliations"] += 1
        by_coid: dict[str, list[Position]] = {}
        unknown: list[Position] = []
        snapshot, listed = q.done
        for p in listed:
            if p.client_order_id and p.client_order_id in self._orders:
                by_coid.setdefault(p.client_order_id, []).append(p)
            else:
                unknown.append(p)
        reconciled, closed, matched, inconsistent = [], [], [], []
        for o in list(self._orders.values()):
            ps = by_coid.get(o.coid)
            if ps:
                why, ref_seq = _positions_mismatch(o, ps)
                if why:  # not this order's: listed with the unknown positions, the order unchanged
                    inconsistent.append(o.coid)
                    unknown.extend(ps)
                    self._inconsistent(o, "a listed position", why, ref_seq)
                    continue
                vol = sum(p.volume for p in ps)
                if o.state in FINAL and o.state != FILLED and not o.upgradable and vol > o.filled + _EPS:
                    # it ended (cancelled, rejected, expired) with fewer lots filled: a final
                    # status is never replaced, so these positions cannot be its
                    inconsistent.append(o.coid)
                    unknown.extend(ps)
                    self._inconsistent(o, "a listed position", f"{vol:.8g} lots under an order that ended "
                                       f"{o.state} with {o.filled:.8g} filled", ps[0].seq)
                    continue
                if o.state in FINAL and not o.upgradable:
                    matched.append(o.coid)
                else:
                    reconciled.append(o.coid)
                    self._reconciled_fill(o, ps)
                    continue
                o.open = True
                vol = sum(p.volume for p in ps)
                self._positions[o.coid] = {"symbol": ps[0].symbol, "side": ps[0].side, "volume": vol,
                                           "price": sum(p.price_open * p.volume for p in ps) / vol,
                                           "ticket": ps[0].ticket}
            elif o.open:
                o.open = False
                closed.append(o.coid)
                self._positions.pop(o.coid, None)
        # adopted by an order submitted later under its id; never one that contradicts an order
        self._adoptable = {p.client_order_id: p for p in unknown
                           if p.client_order_id and p.client_order_id not in self._orders}
        self._unknown_positions = [msgspec.structs.asdict(p) for p in unknown]
        self.counts["unknown_positions"] += len(unknown)
        for p in unknown:
            self._logs("unknown positions", logging.WARNING, "unknown position at the terminal: ticket %d %s %s "
                       "%.2f magic %d comment %r", p.ticket, p.symbol, p.side, p.volume, p.magic, p.comment)
        self._last_recon = {"query_id": q.qid, "query_ids": sorted(q.qids), "snapshot": snapshot,
                            "queries": q.sends, "flatten": q.flatten, "positions": len(listed), "matched": matched,
                            "reconciled": reconciled, "closed": closed, "inconsistent": inconsistent,
                            "unknown": list(self._unknown_positions)}
        self._logs("reconciliations", logging.INFO, "reconciled with terminal %d: %d positions, %d matched, %d found "
                   "executed, %d closed, %d unknown (%d contradicting their order)", self._term_epoch, len(listed),
                   len(matched), len(reconciled), len(closed), len(unknown), len(inconsistent))
        if self.link != "live":
            if self._safe_since is not None:
                log.info("leaving safe mode after %.3f s", now - self._safe_since)
                self._safe_since = None
            self.link = "live"
        self._next_hb = 0.0
        # send what waited, oldest first; re-sends of unsettled orders go out now (the EA de-duplicates)
        for o in list(self._open.values()):
            if o.state == UNCONFIRMED:
                o.sends = 0
                o.state = SENT
            if o.state != EXPIRED:
                o.next_send = now
        self._queued.clear()
        self._housekeeping(now)

    def _reconciled_fill(self, o: _Order, ps: list[Position]) -> None:
        vol = sum(p.volume for p in ps)
        price = sum(p.price_open * p.volume for p in ps) / vol
        self.counts["reconciled_fills"] += 1
        if o.upgradable:
            self.counts["late_outcomes"] += 1
        o.filled, o.fill_price, o.ticket = vol, price, ps[0].ticket or o.ticket
        if o.order_type != "market" and vol + _EPS < o.volume and not o.cancel:
            o.state = PARTIAL  # a resting order partly filled: still working
            self._queued.pop(o.coid, None)
            self._open[o.coid] = o
            self._hold(o)
            self._report(o, PARTIAL, "reconciled", "reconciliation", now_ms())
            return
        self._settle(o, FILLED, "reconciled", "reconciliation", now_ms())

    # ---- timers ---------------------------------------------------------------------------------
    def _housekeeping(self, now: float) -> None:
        self._logs.flush(now)
        if len(self._orders) > self.history:
            self._prune()
            # Still over: the rest hold positions. A steady link never reconciles otherwise, so
            # positions closed at the terminal would stay open here and their orders kept for
            # good; at most once per `history` orders submitted.
            if (len(self._orders) > self.history and self.link == "live" and self._term_ident is not None
                    and self._query is None and self.counts["submitted"] - self._recon_submitted >= self.history):
                self._recon_submitted = self.counts["submitted"]
                self.counts["auto_reconciliations"] += 1
                self._start_reconcile(now)
        link = self.link
        if self._term_ident is None:
            self._expire_queued()
            return
        silent = now - self._last_heard
        if link in ("live", "reconciling") and silent > self.missed * self.heartbeat:
            self._enter_safe(now, silent)
            link = self.link
        if now >= self._next_hb and link != "safe":
            self._next_hb = now + self.heartbeat
            self.counts["heartbeats_sent"] += 1
            self._send(Heartbeat(**self._stamp(), recv_seq=self._seq.hi))
        q = self._query
        if link == "reconciling" and q is not None and now >= q.next_send:
            q.qid = self._next_qid  # a fresh id; answers to the earlier ones still count (same snapshot)
            q.qids.add(q.qid)
            self._next_qid += 1
            self._send_query(now)
        if link != "live":
            self._expire_queued()
            return
        ms = now_ms()
        for o in list(self._open.values()):
            if o.state == EXPIRED:
                continue
            if o.state in (QUEUED, SENT, UNCONFIRMED) and ms >= o.valid_until and not o.cancel:
                self._finish(o, EXPIRED, "expired_unacked" if o.ever_sent else "expired_before_send", "bridge")
                continue
            if now < o.next_send:
                continue
            if o.cancel:
                self._send_cancel(o, now)
                continue
            if o.state == SENT and o.sends >= self.max_sends:
                o.state = UNCONFIRMED
                o.next_send = float("inf")
                self.counts["unconfirmed"] += 1
                log.warning("order %s unconfirmed after %d sends", o.coid, o.sends)
                continue
            if o.state == UNCONFIRMED:
                continue
            self._send_order(o, now)

    def _prune(self) -> None:
        with self._lock:
            excess = len(self._orders) - self.history
            # only settled orders without an open position: those are never needed again
            old = [c for c, o in self._orders.items() if o.state in FINAL and not o.open and c not in self._open]
            for coid in old[:excess]:
                del self._orders[coid]

    def _expire_queued(self) -> None:
        if not self._open:
            return
        ms = now_ms()
        for o in list(self._open.values()):
            if o.state in (QUEUED, SENT) and ms >= o.valid_until:
                self._finish(o, EXPIRED, "expired_unacked" if o.ever_sent else "expired_before_send", "bridge")

    def _enter_safe(self, now: float, silent: float) -> None:
        self.link = "safe"
        self._safe_since = now
        self._silence_at_safe = silent
        self._query = None
        self.counts["safe_mode_entries"] += 1
        log.warning("terminal %d silent for %.3f s (%d heartbeats): safe mode", self._term_epoch, silent, self.missed)
        if self.flatten_on_safe_mode:
            for o in list(self._open.values()):
                if o.state == QUEUED:
                    self._finish(o, CANCELLED, "safe_mode_flatten", "bridge")
                elif o.state not in FINAL:
                    o.cancel = True
                    o.reason = "safe_mode_flatten"
                    o.sends, o.backoff, o.next_send = 0, 0.0, 0.0
            self._flatten_pending = True
            qid = self._next_qid
            self._next_qid += 1
            self.counts["flattens_sent"] += 1
            self._send(Flatten(**self._stamp(), query_id=qid, magic=self.magic, reason="safe_mode"))

    # ---- sending --------------------------------------------------------------------------------
    def _send(self, msg: Any, ident: bytes | None = None) -> bool:
        ident = self._term_ident if ident is None else ident
        if ident is None:
            return False
        try:
            self._sock.send_multipart((ident, self._enc.encode(msg)), zmq.NOBLOCK)
            return True
        except zmq.ZMQError as e:  # unreachable (disconnected) or its queue is full: timers re-send
            self.counts["send_failures"] += 1
            log.debug("send to terminal failed: %s", e)
            return False
