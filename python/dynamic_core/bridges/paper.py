"""The paper broker: orders and trading plans filled against bars with costs, netting and
conservative intrabar rules, so that a backtest and a live paper account behave alike.

Prices. Bar prices are mid prices: buys fill at ``mid + spread/2``, sells at ``mid - spread/2``;
``slippage`` worsens market fills, stop-order fills and stop-loss exits, never limit entries or
take-profits (resting orders). Limit and stop entry prices are compared with mid prices (the
spread is paid on top); stop-loss and take-profit levels with the side a position exits at (bid
for longs, ask for shorts), as a dealer's terminal does.

Events within one bar of an instrument (:meth:`PaperBroker.on_bar`), in this order:

1. pending orders with ``valid_until != 0`` and ``valid_until < ts`` expire unfilled;
2. pending market orders (``fill_market="next_open"``) fill at the open;
3. stop orders trigger (buy: ``high >= price``, filled at ``max(price, open)``) and limit orders
   (buy: ``low <= price``, filled at ``min(price, open)``), sells mirrored, in submission order;
4. stop-losses and take-profits of the open legs, FIFO. The path inside a bar is unknown, so the
   worst case is assumed: a bar reaching both levels of a leg takes the stop; a gap through the
   stop fills at the open (worse than the stop), a gap through the target at the open too (the
   better price, the first that traded: a target is a limit order, filled like one). A leg
   opened in this bar follows the same rule from its own fill on: it may be stopped, and
   reaches its target only when its stop was out of reach; filled beyond its target, it exits
   at the price of that moment;
5. the close becomes the instrument's last price; one equity-curve point is appended.

Netting. One net position per instrument, kept as FIFO legs that keep their order's stop-loss
and take-profit. An order in the position's direction adds a leg; an opposite order closes legs
first in, first out (each closed leg or part of one is a :class:`ClosedTrade` of THAT leg's
plan) and, when larger than the position, opens a reverse leg for its own plan.

Accounting. Commission (per lot per side) is charged to the balance when paid; a closed trade
carries its share of the entry commission and its exit commission. P&L is ``(exit - entry) *
direction * lots * contract_size``, converted to the account currency by
:func:`~dynamic_core.decision.specs.quote_to_account` at the exit price with the last prices of
all instruments as crosses. ``equity`` marks open legs at the price they would exit at now (bid
for longs, ask for shorts; no slippage or exit commission).

Idempotency and bad input. A ``client_order_id`` once accepted answers ``"duplicate"`` and
changes nothing, however long ago it was accepted (see Memory); a rejected one may be sent again
(nothing was executed). Invalid orders are rejected with a reason code, invalid bars ignored and
counted, a raising trade callback counted and logged once: nothing raises. Callbacks run once
the call that closed the trade has finished its bookkeeping, so they may call the broker. Same
calls, same results, bit for bit; reading ``equity`` (or anything else) between calls changes
nothing.

Memory. The equity curve, the fills, the closed trades and the statuses of finished orders are
history: the latest ``history`` of each are kept (the oldest dropped a chunk at a time), while
``stats()`` and the counts cover the whole run. Open legs and pending orders are state and are
never dropped. The id of a finished order whose status is dropped is kept as a 64-bit hash (16
bytes an id) so that a resubmission is still answered ``"duplicate"``, up to ``max_order_ids``
of them (:data:`MAX_ORDER_IDS`); once that many are kept, a new id is rejected ``"ids_full"``
rather than risk accepting a duplicate the broker no longer knows (a new id whose hash equals an
old one's is answered ``"duplicate"``: odds about one in 2**64 / ``max_order_ids`` an order).

Against backtesting.py (no costs, ``trade_on_close=False``) market entries with brackets and
netted orders agree exactly. It runs a bar's stop-losses before its market orders and puts off
a stop/limit entry's same-bar exits to the next bar; here both happen in time order.
"""

from __future__ import annotations

import logging
import math
import re
from array import array
from collections import deque
from collections.abc import Callable, Mapping
from hashlib import blake2b

import msgspec
import numpy as np

from .._checks import is_int, is_real
from ..decision._history import _History
from ..decision.specs import CURRENCY_PATTERN, InstrumentSpec, conversion_prices, instrument_spec, quote_to_account
from ..instruments import instruments
from ..records import MAX_PRICE, MIN_PRICE
from ..payloads import TradingPlan

__all__ = ["EQUITY_DTYPE", "MAX_ORDER_IDS", "ClosedTrade", "CostModel", "Fill", "Leg", "Order", "OrderResult",
           "PaperBroker", "Position", "order_from_plan"]

log = logging.getLogger("dynamic_core.bridges.paper")

EQUITY_DTYPE = np.dtype([("ts", "<i8"), ("balance", "<f8"), ("equity", "<f8")])
"""One equity-curve point: bar time (ns), balance and equity in the account currency."""

_ORDER_TYPES = ("market", "limit", "stop")
_REAL_FIELDS = ("lots", "price", "stop_loss", "take_profit")
HISTORY = 100_000
"""Curve points, fills, closed trades and finished-order statuses a broker keeps by default."""
MAX_ORDER_IDS = 1 << 24
"""Ids of finished orders (beyond the ``history`` statuses) a broker remembers by default, as
64-bit hashes: at most 256 MiB; past that, new ids are rejected ``"ids_full"``."""
_EPS = 1e-9  # lots below this are float dust from subtracting steps, not a position


def _lots(x: float) -> float:
    # Lots live on a decimal grid (0.01 ...); rounding after each subtraction keeps 0.3 - 0.1
    # from leaving 0.19999999999999998 lots (and a phantom 1e-17 leg) behind.
    return round(x, 10)


class CostModel(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Trading costs of one instrument (all >= 0)."""

    spread: float = 0.0  # full spread in price units: buys fill at mid + spread/2, sells at mid - spread/2
    slippage: float = 0.0  # price units against market, stop-order and stop-loss fills (not limits or targets)
    commission_per_lot: float = 0.0  # account currency per lot per side

    def __post_init__(self) -> None:
        for name in ("spread", "slippage", "commission_per_lot"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0.0):
                raise ValueError(f"CostModel.{name} must be a finite number >= 0, got {v!r}")


class Order(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, gc=False):
    """An order to the paper broker; prices are mid prices in the quote currency."""

    client_order_id: str  # idempotency key: once accepted, the same id is answered "duplicate"
    instrument: str
    side: int  # +1 buy, -1 sell
    type: str = "market"  # "market" | "limit" | "stop"
    lots: float  # a multiple of the instrument's lot step within its limits
    price: float = 0.0  # limit price or stop trigger; unused by market orders
    stop_loss: float = 0.0  # attached to the leg the order opens; 0 = none
    take_profit: float = 0.0  # 0 = none
    valid_until: int = 0  # ns; a pending order with valid_until < bar ts expires; 0 = good till cancelled
    plan_id: str = ""  # the plan the resulting legs and trades belong to
    ts: int = 0  # submission time, ns (the fill time of an immediate fill when later than the last bar)


class Fill(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One execution. An order's execution is one fill (``kind`` ``"entry"`` when it only opens
    or adds, ``"close"`` when it only reduces, ``"reverse"`` when it does both); exits the broker
    makes (``"stop_loss"``, ``"take_profit"``, ``"closed_out"``, ``"flatten"``) are one fill per leg,
    carrying the leg's ``client_order_id`` and ``plan_id``."""

    client_order_id: str
    plan_id: str
    instrument: str
    side: int
    lots: float
    price: float
    commission: float
    ts: int
    kind: str


class OrderResult(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """The broker's answer to :meth:`PaperBroker.submit`: ``status`` is ``"accepted"``
    (pending), ``"filled"``, ``"duplicate"`` or ``"rejected"`` (with a ``reason`` code)."""

    client_order_id: str
    status: str
    reason: str = ""
    fills: tuple[Fill, ...] = ()


class ClosedTrade(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A leg, or part of one, opened and closed. Money is in the account currency; ``pnl`` is
    net of ``commission`` (the entry share and the exit); ``r_multiple`` is ``pnl`` over the loss
    at the leg's stop-loss for these lots (NaN without a stop)."""

    plan_id: str
    instrument: str
    direction: int
    lots: float
    entry_ts: int
    entry_price: float
    exit_ts: int
    exit_price: float
    exit_reason: str
    gross_pnl: float
    commission: float
    pnl: float
    r_multiple: float
    client_order_id: str = ""


class Leg(msgspec.Struct, kw_only=True, gc=False):
    """One open leg of a position (``commission`` is the entry commission not yet attributed to
    a closed trade)."""

    client_order_id: str
    plan_id: str
    direction: int
    lots: float
    price: float
    ts: int
    stop_loss: float = 0.0
    take_profit: float = 0.0
    commission: float = 0.0


class Position(msgspec.Struct, kw_only=True):
    """The net position of one instrument: signed ``lots``, lots-weighted ``avg_price`` and the
    open legs, oldest first."""

    instrument: str
    lots: float
    avg_price: float
    legs: list[Leg]


def order_from_plan(plan: TradingPlan, *, client_order_id: str | None = None, type: str = "market") -> Order:
    """The order that executes ``plan``: its direction, size, stop, first target and validity;
    a limit or stop order rests at ``plan.entry``. ``client_order_id`` defaults to the plan id,
    so resubmitting a plan is idempotent."""
    return Order(client_order_id=plan.plan_id if client_order_id is None else client_order_id,
                 instrument=plan.instrument, side=plan.direction, type=type, lots=plan.size,
                 price=plan.entry if type != "market" else 0.0, stop_loss=plan.stop,
                 take_profit=plan.targets[0] if plan.targets else 0.0, valid_until=plan.valid_until,
                 plan_id=plan.plan_id, ts=plan.ts)


class PaperBroker:
    """A deterministic simulated account that fills :class:`Order` s against bars. Not
    thread-safe: callers sharing one across threads serialise their calls.

    Parameters
    ----------
    equity : float
        Starting balance in the account currency.
    account : str
        Account currency.
    costs : CostModel or Mapping[str, CostModel], optional
        One model for all instruments, or one per instrument name with ``"*"`` as the default.
    specs : Mapping[str, InstrumentSpec], optional
        Contract overrides; other instruments use :func:`instrument_spec`.
    fill_market : str
        ``"next_open"`` (backtests: market orders fill at the open of the instrument's next bar)
        or ``"immediate"`` (a terminal: at the last close, rejected ``"no_price"`` before the
        instrument's first bar).
    history : int or None
        How many equity-curve points, fills, closed trades and finished-order statuses are kept
        in memory (default :data:`HISTORY`; None keeps all). ``stats()`` covers the whole run
        either way; a journal of the decisions is the durable record.
    max_order_ids : int or None
        How many ids of finished orders whose status was dropped are remembered (as 64-bit
        hashes) to refuse their resubmission (default :data:`MAX_ORDER_IDS`; None: no cap).
        Once full, new ids are rejected ``"ids_full"``: a duplicate is never accepted.
    """

    def __init__(self, *, equity: float = 100_000.0, account: str = "USD",
                 costs: CostModel | Mapping[str, CostModel] | None = None,
                 specs: Mapping[str, InstrumentSpec] | None = None,
                 fill_market: str = "next_open", history: int | None = HISTORY,
                 max_order_ids: int | None = MAX_ORDER_IDS) -> None:
        if fill_market not in ("next_open", "immediate"):
            raise ValueError(f"fill_market must be 'next_open' or 'immediate', got {fill_market!r}")
        if not (math.isfinite(equity) and equity > 0):
            raise ValueError(f"equity must be finite and > 0, got {equity!r}")
        if not isinstance(account, str) or re.search(CURRENCY_PATTERN, account) is None:
            raise ValueError(f"account must be an upper-case currency code as instruments name their legs "
                             f"(e.g. 'USD'), got {account!r}")
        if history is not None and (not isinstance(history, int) or history < 1):
            raise ValueError(f"history must be an int >= 1 or None, got {history!r}")
        if max_order_ids is not None and (not isinstance(max_order_ids, int) or max_order_ids < 0):
            raise ValueError(f"max_order_ids must be an int >= 0 or None, got {max_order_ids!r}")
        if costs is not None and not isinstance(costs, CostModel) and not all(
                isinstance(v, CostModel) for v in costs.values()):
            raise TypeError("costs must be a CostModel or a mapping of instrument name to CostModel")
        self._initial = float(equity)
        self._balance = float(equity)
        self._account = account
        self._costs = costs if costs is not None else CostModel()
        self._overrides = dict(specs or {})
        self._fill_market = fill_market
        self._spec_cache: dict[str, InstrumentSpec] = {}
        self._status: dict[str, str] = {}
        # ids of finished orders whose status was dropped: a resubmission is still a duplicate
        self._old_ids = _IdHashes()
        self._max_ids = max_order_ids if max_order_ids is not None else 2**63 - 1
        self._ids_full = False  # max_order_ids reached: new ids are refused
        self._pending: dict[str, Order] = {}  # insertion order = submission order
        self._pending_at: dict[str, dict[str, Order]] = {}  # the same, by instrument
        self._legs: dict[str, list[Leg]] = {}
        self._prices: dict[str, float] = {}  # last close (mid) per instrument: marks and crosses
        # equity without a pass over every position per bar: each open instrument's marked value,
        # recomputed when its legs or its mark change, or a price its conversion reads
        self._open_value: dict[str, float] = {}
        self._stale: set[str] = set()
        self._conv_users: dict[str, set[str]] = {}  # conversion price name -> open instruments
        self._conv_of: dict[str, tuple[str, ...]] = {}  # open instrument -> its conversion prices
        self._last_ts: dict[str, int] = {}
        self._clock = 0  # latest bar time seen on any instrument
        # bounded history: each list is cut back to `history` once it is a chunk longer
        self._curve: _History = _History(history)  # of (ts, balance, equity)
        self._trades: _History = _History(history)  # of ClosedTrade
        self._fills: _History = _History(history)  # of Fill
        self._callbacks: list[Callable[[ClosedTrade], object]] = []
        self._outbox: deque[ClosedTrade] = deque()  # closed trades not yet given to the callbacks
        self._dispatching = False
        self._rejects: dict[str, int] = {}  # by reason
        self._expired = 0  # pending orders whose valid_until passed unfilled
        self._ignored: dict[str, int] = {}  # bars, by reason
        self._callback_errors = self._conversion_errors = 0
        self._commission = 0.0
        self._names: dict[int, str] = {}
        # the statuses of finished orders are bounded the same way (a pending order's stays)
        self._keep = history if history is not None else 2**63 - 1
        self._chunk = max(1, self._keep // 8)
        self._statuses_dropped = 0
        self._status_at = self._keep + self._chunk
        # the whole run's figures, kept as they come (exact sums: the same bits as fsum over all)
        self._n_trades = self._wins = self._losses = 0
        self._sums = {k: _ExactSum() for k in ("won", "lost", "net", "gross")}
        self._peak = self._initial
        self._max_dd = self._max_dd_pct = 0.0

    # ----------------------------------------------------------------------------- lookups
    def _spec(self, instrument: str, keep: bool = True) -> InstrumentSpec:
        """The spec of ``instrument``, cached when ``keep`` (not for an order still being
        checked: every name a refused order gave would stay in the cache)."""
        spec = self._spec_cache.get(instrument)
        if spec is None:
            spec = instrument_spec(instrument, self._overrides)
            if keep:
                self._spec_cache[instrument] = spec
        return spec

    def _cost(self, instrument: str) -> CostModel:
        if isinstance(self._costs, CostModel):
            return self._costs
        return self._costs.get(instrument) or self._costs.get("*") or CostModel()

    def _has_route(self, spec: InstrumentSpec) -> bool:
        a, q = self._account, spec.quote
        return q == a or spec.base == a or bool(self._prices.get(q + a)) or bool(self._prices.get(a + q))

    def _conv(self, spec: InstrumentSpec, price: float) -> float:
        try:
            return quote_to_account(spec, price, self._account, self._prices)
        except (KeyError, ZeroDivisionError):
            # Orders without a route are rejected at submission and prices are never forgotten,
            # so this needs a zero price; count it rather than take the account down.
            if self._conversion_errors == 0:
                log.error("no conversion of %s to %s at %r; P&L taken 1:1", spec.quote, self._account, price)
            self._conversion_errors += 1
            return 1.0

    # ----------------------------------------------------------------------------- orders
    def submit(self, order: Order) -> OrderResult:
        """Validate ``order`` and accept it (pending) or, for a market order with
        ``fill_market="immediate"``, fill it now. Never raises for a bad order: rejection reasons
        are ``bad_order``, ``bad_side``, ``bad_type``, ``bad_size``, ``bad_price``, ``bad_stops``,
        ``expired``, ``no_conversion``, ``no_price`` and ``ids_full`` (a new id once
        ``max_order_ids`` finished ids are remembered)."""
        cid = getattr(order, "client_order_id", None)
        if not isinstance(cid, str) or not cid:
            return self._reject("", "bad_order")
        st = self._status.get(cid)
        if st is None:
            if self._old_ids.n and _IdHashes.key(cid) in self._old_ids:
                return OrderResult(client_order_id=cid, status="duplicate")
            if self._ids_full:  # not recorded: a refused id takes no memory
                self._rejects["ids_full"] = self._rejects.get("ids_full", 0) + 1
                return OrderResult(client_order_id=cid, status="rejected", reason="ids_full")
        elif st != "rejected":
            return OrderResult(client_order_id=cid, status="duplicate")
        try:
            reason = self._validate(order)
        except (TypeError, ValueError, OverflowError):
            reason = "bad_order"
        if reason:
            return self._reject(cid, reason)
        # kept as plain Python numbers (a numpy scalar or a float subclass would travel on), the
        # lots on the lot step (float dust within the tolerance does not travel on either)
        order = msgspec.structs.replace(
            order, side=int(order.side), lots=self._spec(order.instrument).round_lots(float(order.lots)),
            price=float(order.price),
            stop_loss=float(order.stop_loss), take_profit=float(order.take_profit), ts=int(order.ts),
            valid_until=int(order.valid_until))
        if order.type == "market" and self._fill_market == "immediate":
            cost = self._cost(order.instrument)
            px = self._prices[order.instrument] + order.side * (cost.spread / 2 + cost.slippage)
            ts = max(int(order.ts), self._last_ts[order.instrument])
            self._set_status(cid, "filled")
            fill = self._execute(order, px, ts, None)
            self._dispatch()
            return OrderResult(client_order_id=cid, status="filled", fills=(fill,))
        self._set_status(cid, "pending")
        self._pending[cid] = order
        self._pending_at.setdefault(order.instrument, {})[cid] = order
        return OrderResult(client_order_id=cid, status="accepted")

    def _validate(self, order: Order) -> str:
        if not isinstance(order, Order) or not isinstance(order.instrument, str) or not order.instrument:
            return "bad_order"
        # a Struct built in Python is not type-checked: a price given as a str, a bool side...
        for f in _REAL_FIELDS:
            if not is_real(getattr(order, f)):
                return "bad_order"
        for f in ("ts", "valid_until"):
            v = getattr(order, f)
            if not is_int(v):
                return "bad_order"
        if not is_int(order.side):
            return "bad_side"
        if order.side not in (1, -1):
            return "bad_side"
        if order.type not in _ORDER_TYPES:
            return "bad_type"
        spec = self._spec(order.instrument, keep=False)
        lots = float(order.lots)
        if not (math.isfinite(lots) and lots > 0.0) or abs(spec.round_lots(lots) - lots) > _EPS:
            return "bad_size"
        price, sl, tp = float(order.price), float(order.stop_loss), float(order.take_profit)
        if order.type != "market" and not (math.isfinite(price) and price > 0.0):
            return "bad_price"
        if not (math.isfinite(sl) and sl >= 0.0 and math.isfinite(tp) and tp >= 0.0):
            return "bad_stops"
        if order.type == "market":
            last = self._prices.get(order.instrument)
            ref = None if last is None else last + order.side * self._cost(order.instrument).spread / 2
        else:
            ref = price
        if ref is not None:
            d = order.side
            if (sl and (sl - ref) * d >= 0.0) or (tp and (tp - ref) * d <= 0.0):
                return "bad_stops"
        if order.valid_until != 0 and int(order.valid_until) < self._clock:  # a negative time is past too
            return "expired"
        if not self._has_route(spec):
            return "no_conversion"
        if order.type == "market" and self._fill_market == "immediate" and order.instrument not in self._prices:
            return "no_price"
        return ""

    def _reject(self, cid: str, reason: str) -> OrderResult:
        self._rejects[reason] = self._rejects.get(reason, 0) + 1
        if cid:  # only ever a new or a previously rejected id: accepted ids are duplicates
            self._set_status(cid, "rejected")
        return OrderResult(client_order_id=cid, status="rejected", reason=reason)

    def submit_plan(self, plan: TradingPlan, **kw: object) -> OrderResult:
        """:meth:`submit` the order of :func:`order_from_plan` (``kw`` goes to it)."""
        return self.submit(order_from_plan(plan, **kw))  # type: ignore[arg-type]

    def cancel(self, client_order_id: str) -> bool:
        """Cancel a pending order; False when it is not pending (unknown, filled, expired)."""
        od = self._pending.pop(client_order_id, None)
        if od is None:
            return False
        self._unpend(od)
        self._set_status(client_order_id, "cancelled")
        return True

    def pending(self) -> list[Order]:
        """Pending orders in submission order."""
        return list(self._pending.values())

    def order_status(self, client_order_id: str) -> str | None:
        """``"pending"``, ``"filled"``, ``"cancelled"``, ``"expired"``, ``"rejected"`` or None."""
        return self._status.get(client_order_id)

    # ----------------------------------------------------------------------------- execution
    def _execute(self, order: Order, px: float, ts: int, refs: dict[int, tuple[Leg, float]] | None,
                 ref_mid: float = 0.0) -> Fill:
        """Fill all of ``order`` at ``px``: close opposite legs FIFO, open a leg with the rest."""
        name, side = order.instrument, order.side
        self._stale.add(name)
        legs = self._legs.get(name, [])
        held = _lots(sum(leg.lots for leg in legs))
        opposite = bool(legs) and legs[0].direction != side
        lots = _lots(float(order.lots))
        reverses = opposite and lots > held + _EPS
        commission = remaining = 0.0
        if opposite:
            commission, _ = self._reduce(name, lots, px, ts, "reverse" if reverses else "close", per_leg=False)
            remaining = _lots(lots - held) if reverses else 0.0
        else:
            remaining = lots
        if remaining > _EPS:
            entry_comm = self._cost(name).commission_per_lot * remaining
            leg = Leg(client_order_id=order.client_order_id, plan_id=order.plan_id, direction=side,
                      lots=remaining, price=px, ts=ts, stop_loss=float(order.stop_loss),
                      take_profit=float(order.take_profit), commission=entry_comm)
            self._legs.setdefault(name, []).append(leg)
            self._balance -= entry_comm
            self._commission += entry_comm
            commission += entry_comm
            if refs is not None:
                refs[id(leg)] = (leg, ref_mid)
        kind = "reverse" if reverses else ("close" if opposite else "entry")
        fill = Fill(client_order_id=order.client_order_id, plan_id=order.plan_id, instrument=name, side=side,
                    lots=_lots(float(order.lots)), price=px, commission=commission, ts=ts, kind=kind)
        self._fills.append(fill)
        return fill

    def _reduce(self, name: str, lots: float, px: float, ts: int, reason: str,
                per_leg: bool) -> tuple[float, list[Fill]]:
        """Close up to ``lots`` of the position FIFO at ``px``; return the exit commission and,
        when ``per_leg``, one fill per leg touched (an order's own fill covers them otherwise)."""
        self._stale.add(name)
        legs = self._legs[name]
        commission, fills = 0.0, []
        while legs and lots > _EPS:
            leg = legs[0]
            q = min(lots, leg.lots)
            if per_leg:
                fills.append(self._exit_leg(name, leg, q, px, ts, reason))
                commission += fills[-1].commission
            else:
                commission += self._close_part(name, leg, q, px, ts, reason)
            lots = _lots(lots - q)
            if leg.lots <= _EPS:
                legs.pop(0)
        if not legs:
            del self._legs[name]
        return commission, fills

    def _close_part(self, name: str, leg: Leg, q: float, px: float, ts: int, reason: str) -> float:
        """Close ``q`` lots of ``leg`` at ``px``; book and queue the trade; return the exit
        commission. The caller removes the leg once it is empty."""
        spec, cost = self._spec(name), self._cost(name)
        scale = leg.direction * q * spec.contract_size
        gross = (px - leg.price) * scale * self._conv(spec, px)
        exit_comm = cost.commission_per_lot * q
        entry_comm = leg.commission if q >= leg.lots else leg.commission * (q / leg.lots)
        total_comm = entry_comm + exit_comm
        pnl = gross - total_comm
        risk = 0.0
        if leg.stop_loss > 0.0:
            risk = abs((leg.price - leg.stop_loss) * scale * self._conv(spec, leg.stop_loss))
        self._balance += gross - exit_comm
        self._commission += exit_comm
        leg.lots = _lots(leg.lots - q)
        leg.commission -= entry_comm
        self._emit(ClosedTrade(
            plan_id=leg.plan_id, instrument=name, direction=leg.direction, lots=q, entry_ts=leg.ts,
            entry_price=leg.price, exit_ts=ts, exit_price=px, exit_reason=reason, gross_pnl=gross,
            commission=total_comm, pnl=pnl, r_multiple=pnl / risk if risk > 0.0 else math.nan,
            client_order_id=leg.client_order_id))
        return exit_comm

    def _exit_leg(self, name: str, leg: Leg, q: float, px: float, ts: int, kind: str) -> Fill:
        comm = self._close_part(name, leg, q, px, ts, kind)
        fill = Fill(client_order_id=leg.client_order_id, plan_id=leg.plan_id, instrument=name,
                    side=-leg.direction, lots=q, price=px, commission=comm, ts=ts, kind=kind)
        self._fills.append(fill)
        return fill

    def _emit(self, trade: ClosedTrade) -> None:
        p = trade.pnl
        self._n_trades += 1
        self._wins += p > 0.0
        self._losses += p < 0.0
        sums = self._sums
        sums["net"].add(p)
        sums["gross"].add(trade.gross_pnl)
        if p > 0.0:
            sums["won"].add(p)
        elif p < 0.0:
            sums["lost"].add(-p)
        self._trades.append(trade)
        self._outbox.append(trade)

    def _set_status(self, cid: str, status: str) -> None:
        self._status[cid] = status
        if len(self._status) > self._status_at:
            # the oldest finished orders' statuses are dropped (a pending one is state and stays);
            # an executed or cancelled one's id is kept as a hash: resubmitted, it is a duplicate
            excess = len(self._status) - self._keep
            old = [k for k, v in self._status.items() if v != "pending"][:excess]
            ids, status_of, dropped = self._old_ids, self._status, 0
            for k in old:
                if status_of[k] != "rejected":
                    if ids.n >= self._max_ids:  # kept whole instead, and no new id from now on
                        self._ids_full = True
                        continue
                    ids.add(_IdHashes.key(k))
                del status_of[k]
                dropped += 1
            self._statuses_dropped += dropped
            self._status_at = max(self._keep, len(self._status)) + self._chunk

    def _dispatch(self) -> None:
        # Called last by every public method that can close trades, so callbacks see final books
        # and may call the broker themselves; trades closed by such a nested call are queued and
        # delivered by the outer loop, in closing order.
        if self._dispatching:
            return
        self._dispatching = True
        try:
            while self._outbox:
                trade = self._outbox.popleft()
                for cb in list(self._callbacks):
                    try:
                        cb(trade)
                    except Exception:
                        # A subscriber's bug must neither undo the books nor starve the others.
                        if self._callback_errors == 0:
                            log.exception("on_trade callback %r raised (further errors only counted)", cb)
                        self._callback_errors += 1
        finally:
            self._dispatching = False

    def on_trade(self, callback: Callable[[ClosedTrade], object]) -> None:
        """Call ``callback(trade)`` for every :class:`ClosedTrade`, in closing order, once the
        broker call that closed it has finished its bookkeeping (so the callback may itself
        call the broker). A raising callback is logged once and counted in
        ``stats()["callback_errors"]``."""
        self._callbacks.append(callback)

    # ----------------------------------------------------------------------------- bars
    def _ignore(self, reason: str) -> list[Fill]:
        self._ignored[reason] = self._ignored.get(reason, 0) + 1
        return []

    def on_bar(self, instrument: str, ts: int, open: float, high: float, low: float,
               close: float) -> list[Fill]:
        """Process one bar of ``instrument`` (events in the order of the module docstring) and
        return the fills it caused. Invalid bars are ignored and counted in
        ``stats()["ignored_bars"]``: ``non_finite``, ``non_positive_price``,
        ``price_out_of_range`` (outside ``[dc.MIN_PRICE, dc.MAX_PRICE]``, as the engine rejects
        it), ``bad_range``, ``out_of_order``, ``bad_bar`` (among others a time that is not an
        integer in int64's range)."""
        # a time is an integer (ns) in int64's range: a float would be truncated, a larger one
        # break the equity curve (int64) for good
        if not is_int(ts) or not -(2**63) <= ts < 2**63:
            return self._ignore("bad_bar")
        try:
            ts, o, h, lo, c = int(ts), float(open), float(high), float(low), float(close)
        except (TypeError, ValueError, OverflowError):
            return self._ignore("bad_bar")
        if not isinstance(instrument, str) or not instrument:
            return self._ignore("bad_bar")
        if not (math.isfinite(o) and math.isfinite(h) and math.isfinite(lo) and math.isfinite(c)):
            return self._ignore("non_finite")
        if not min(o, lo, c) > 0.0:  # as the engine rejects them: a fill at 0 is no price
            return self._ignore("non_positive_price")
        if min(o, lo, c) < MIN_PRICE or max(o, h, c) > MAX_PRICE:  # one 1e300 print marks equity to inf
            return self._ignore("price_out_of_range")
        if h < max(o, c, lo) or lo > min(o, c):
            return self._ignore("bad_range")
        if ts <= self._last_ts.get(instrument, -(2**63)):
            return self._ignore("out_of_order")
        self._last_ts[instrument] = ts
        self._clock = max(self._clock, ts)
        cost = self._cost(instrument)
        hs, slip = cost.spread / 2, cost.slippage
        fills: list[Fill] = []
        refs: dict[int, tuple[Leg, float]] = {}
        mine = list(self._pending_at.get(instrument, {}).values())
        for od in mine:  # (1) expiry
            if od.valid_until != 0 and od.valid_until < ts:
                del self._pending[od.client_order_id]
                self._unpend(od)
                self._set_status(od.client_order_id, "expired")
                self._expired += 1
        mine = [od for od in mine if od.client_order_id in self._pending]
        for od in mine:  # (2) market orders at the open
            if od.type == "market":
                fills.append(self._fill_pending(od, o + od.side * (hs + slip), ts, refs, o))
        for od in mine:  # (3) stop and limit orders
            d, p = od.side, od.price
            if od.type == "stop" and (h >= p if d > 0 else lo <= p):
                mid = max(p, o) if d > 0 else min(p, o)
                fills.append(self._fill_pending(od, mid + d * (hs + slip), ts, refs, mid))
            elif od.type == "limit" and (lo <= p if d > 0 else h >= p):
                mid = min(p, o) if d > 0 else max(p, o)
                fills.append(self._fill_pending(od, mid + d * hs, ts, refs, mid))
        fills += self._exits(instrument, ts, o, h, lo, hs, slip, refs)  # (4)
        self._prices[instrument] = c  # (5)
        self._stale.add(instrument)
        users = self._conv_users.get(instrument)
        if users:
            self._stale.update(users)
        eq = self.equity
        self._curve.append((ts, self._balance, eq))
        # the drawdown of the whole curve, point by point: stats() used to take it from the list
        self._peak = peak = max(self._peak, eq)
        dd = peak - eq
        self._max_dd = max(self._max_dd, dd)
        self._max_dd_pct = max(self._max_dd_pct, dd / peak)
        self._dispatch()
        return fills

    def _fill_pending(self, od: Order, px: float, ts: int, refs: dict[int, tuple[Leg, float]],
                      ref_mid: float) -> Fill:
        del self._pending[od.client_order_id]
        self._unpend(od)
        self._set_status(od.client_order_id, "filled")
        return self._execute(od, px, ts, refs, ref_mid)

    def _unpend(self, od: Order) -> None:
        at = self._pending_at[od.instrument]
        del at[od.client_order_id]
        if not at:
            del self._pending_at[od.instrument]

    def _exits(self, name: str, ts: int, o: float, h: float, lo: float, hs: float, slip: float,
               refs: dict[int, tuple[Leg, float]]) -> list[Fill]:
        fills: list[Fill] = []
        keep: list[Leg] = []
        for leg in self._legs.get(name, ()):
            d, sl, tp = leg.direction, leg.stop_loss, leg.take_profit
            new = id(leg) in refs
            ref = refs[id(leg)][1] if new else o  # the leg exists from its fill on
            # The side the leg exits at: bid (mid - hs) for longs, ask for shorts.
            worst, best, now = (lo - hs, h - hs, ref - hs) if d > 0 else (h + hs, lo + hs, ref + hs)
            if sl > 0.0 and (worst - sl) * d <= 0.0:
                px = (min(sl, now) if d > 0 else max(sl, now)) - d * slip
                fills.append(self._exit_leg(name, leg, leg.lots, px, ts, "stop_loss"))
            elif tp > 0.0 and (best - tp) * d >= 0.0:
                px = max(tp, now) if d > 0 else min(tp, now)  # at the open (or fill) when gapped past
                fills.append(self._exit_leg(name, leg, leg.lots, px, ts, "take_profit"))
            else:
                keep.append(leg)
        if keep:
            self._legs[name] = keep
        else:
            self._legs.pop(name, None)
        return fills

    def on_bars(self, bars: np.ndarray) -> list[Fill]:
        """:meth:`on_bar` for each row of a ``BAR_DTYPE`` array, in order; rows of unknown
        instrument ids are ignored and counted (``unknown_instrument``)."""
        fills: list[Fill] = []
        cols = ("ts", "instrument", "open", "high", "low", "close")
        for ts, iid, o, h, lo, c in zip(*(bars[k].tolist() for k in cols), strict=True):
            name = self._names.get(iid)
            if name is None:
                try:
                    name = self._names[iid] = instruments.name(iid)
                except KeyError:
                    self._ignore("unknown_instrument")
                    continue
            fills += self.on_bar(name, ts, o, h, lo, c)
        return fills

    # ----------------------------------------------------------------------------- closing
    def close(self, instrument: str, *, lots: float | None = None, reason: str = "closed_out") -> list[Fill]:
        """Close ``lots`` (default all, rounded down to the lot step) of the position FIFO at the
        last close, exit side (bid for longs, ask for shorts) minus slippage; ``reason`` is the
        fills' kind and the trades' exit reason (default ``"closed_out"``: not ``"close"``, which marks
        an order that executed by reducing a position). Nothing happens without a position."""
        fills = self._close(instrument, lots, reason)
        self._dispatch()
        return fills

    def _close(self, instrument: str, lots: float | None, reason: str) -> list[Fill]:
        legs = self._legs.get(instrument)
        if not legs:
            return []
        held = _lots(sum(leg.lots for leg in legs))
        try:
            # not capped at max_lot: that limits an order, and a position may hold several
            q_left = held if lots is None else self._spec(instrument).round_lots(min(float(lots), held), cap=False)
        except (TypeError, ValueError, OverflowError):
            return []
        if not q_left > 0.0:
            return []
        cost = self._cost(instrument)
        px = self._prices[instrument] - legs[0].direction * (cost.spread / 2 + cost.slippage)
        return self._reduce(instrument, q_left, px, self._last_ts[instrument], reason, per_leg=True)[1]

    def flatten(self, *, reason: str = "flatten") -> list[Fill]:
        """Cancel every pending order and close every position (instruments in name order)."""
        for cid in list(self._pending):
            self.cancel(cid)
        fills: list[Fill] = []
        for name in sorted(self._legs):
            fills += self._close(name, None, reason)
        self._dispatch()
        return fills

    # ----------------------------------------------------------------------------- state
    @property
    def balance(self) -> float:
        """Realised account value: initial equity plus closed P&L minus commission paid."""
        return self._balance

    @property
    def account(self) -> str:
        """The account currency (P&L, balance and equity are in it)."""
        return self._account

    @property
    def equity(self) -> float:
        """Balance plus open legs marked at their exit side of the last close (bid for longs,
        ask for shorts; no slippage or exit commission).

        Each open instrument's marked value is kept and recomputed only when its legs, its
        mark or a price its currency conversion reads changed, so a bar costs O(1) here rather
        than a pass over every position; the total is the balance plus those values in a fixed
        order (the same events give the same bits): the instruments' name order, so reading
        equity between two events changes nothing later."""
        if self._stale:
            for name in sorted(self._stale):
                self._revalue(name)
            self._stale.clear()
        return self._balance + sum(self._open_value.values())

    def _revalue(self, name: str) -> None:
        legs = self._legs.get(name)
        mark = self._prices.get(name)
        for k in self._conv_of.pop(name, ()):
            users = self._conv_users[k]
            users.discard(name)
            if not users:
                del self._conv_users[k]
        if not legs or mark is None:  # flat (or, defensively, filled before any bar)
            self._open_value.pop(name, None)
            return
        spec = self._spec(name)
        keys = conversion_prices(spec, self._account)
        self._conv_of[name] = keys
        for k in keys:
            self._conv_users.setdefault(k, set()).add(name)
        mark -= legs[0].direction * self._cost(name).spread / 2
        conv = self._conv(spec, mark)
        value = 0.0
        for leg in legs:
            value += (mark - leg.price) * leg.direction * leg.lots * spec.contract_size * conv
        ov = self._open_value
        fresh = name not in ov
        ov[name] = value
        if fresh and len(ov) > 1:
            # kept in name order (re-sorted only when an instrument opens): the sum's order must
            # not depend on when equity was read, which decides when each value is inserted
            self._open_value = dict(sorted(ov.items()))

    def net_lots(self, *, pending: bool = False) -> dict[str, float]:
        """Signed net lots per instrument with an open position (cheap: no copies of the legs);
        with ``pending``, orders waiting to fill are counted as if filled."""
        out = {name: _lots(legs[0].direction * sum(leg.lots for leg in legs)) for name, legs in self._legs.items()}
        if pending:
            for o in self._pending.values():
                out[o.instrument] = _lots(out.get(o.instrument, 0.0) + o.side * o.lots)
        return {k: v for k, v in out.items() if v != 0.0}

    def positions(self) -> dict[str, Position]:
        """Open positions by instrument (copies: changing them changes nothing here)."""
        out: dict[str, Position] = {}
        for name, legs in self._legs.items():
            lots = sum(leg.lots for leg in legs)
            avg = sum(leg.lots * leg.price for leg in legs) / lots
            out[name] = Position(instrument=name, lots=_lots(legs[0].direction * lots), avg_price=avg,
                                 legs=[msgspec.structs.replace(leg) for leg in legs])
        return out

    @property
    def trades(self) -> list[ClosedTrade]:
        """The latest ``history`` closed trades in closing order (a copy)."""
        return list(self._trades)

    @property
    def fills(self) -> list[Fill]:
        """The latest ``history`` fills in execution order (a copy)."""
        return list(self._fills)

    @property
    def fill_count(self) -> int:
        """Fills so far, dropped history included."""
        return self._fills.total

    def fills_since(self, n: int) -> list[Fill]:
        """Fills after the first ``n`` of :attr:`fill_count`, as far as they are kept (no copy of
        the earlier ones)."""
        return self._fills.since(n)

    def last_prices(self) -> dict[str, float]:
        """Last close (mid) of every instrument seen (a copy)."""
        return dict(self._prices)

    def equity_curve(self) -> np.ndarray:
        """One :data:`EQUITY_DTYPE` point per accepted bar, after that bar's events (the latest
        ``history``)."""
        return np.array(self._curve, dtype=EQUITY_DTYPE)

    def stats(self) -> dict[str, object]:
        """Trade counts, P&L, commission paid, drawdown, profit factor and error counters.

        ``max_drawdown`` is the largest fall of the equity curve below its running peak (the
        initial equity included), in the account currency; ``max_drawdown_pct`` the same relative
        to the peak; ``profit_factor`` winning over losing net P&L (inf without losses, NaN
        without trades). All of them cover the whole run, dropped history included
        (``dropped`` counts what was)."""
        n, wins = self._n_trades, self._wins
        won, lost = self._sums["won"].value(), self._sums["lost"].value()
        return {
            "trades": n, "wins": wins, "losses": self._losses,
            "win_rate": wins / n if n else math.nan,
            "net_pnl": self._sums["net"].value(), "gross_pnl": self._sums["gross"].value(),
            "commission": self._commission,
            "profit_factor": won / lost if lost > 0.0 else (math.inf if won > 0.0 else math.nan),
            "max_drawdown": self._max_dd, "max_drawdown_pct": self._max_dd_pct,
            "balance": self._balance, "equity": self.equity, "fills": self.fill_count,
            "rejects": dict(sorted(self._rejects.items())), "expired": self._expired,
            "ignored_bars": dict(sorted(self._ignored.items())),
            "callback_errors": self._callback_errors, "conversion_errors": self._conversion_errors,
            "dropped": {"curve": self._curve.dropped, "fills": self._fills.dropped,
                        "trades": self._trades.dropped, "statuses": self._statuses_dropped},
        }


class _IdHashes:
    """A set of 64-bit hashes of order ids (BLAKE2b: the same in every process), in one array
    with open addressing and linear probing, at most half full: 16 bytes an id."""

    __slots__ = ("mask", "n", "table")

    def __init__(self) -> None:
        self.table = array("q", bytes(8 * 1024))
        self.mask = 1023
        self.n = 0

    @staticmethod
    def key(cid: str) -> int:
        h = int.from_bytes(blake2b(cid.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little",
                           signed=True)
        return h or 1  # 0 marks an empty slot

    def _slot(self, h: int) -> int:
        """Where ``h`` is, or the empty slot where it would go."""
        table, mask = self.table, self.mask
        i = h & mask
        while True:
            v = table[i]
            if v == h or not v:
                return i
            i = (i + 1) & mask

    def __contains__(self, h: int) -> bool:
        return self.table[self._slot(h)] == h

    def add(self, h: int) -> None:
        if 2 * (self.n + 1) > len(self.table):
            old = self.table
            self.table = array("q", bytes(16 * len(old)))
            self.mask = len(self.table) - 1
            self.n = 0
            for v in old:
                if v:
                    self._put(v)
        self._put(h)

    def _put(self, h: int) -> None:
        i = self._slot(h)
        if self.table[i] != h:
            self.table[i] = h
            self.n += 1


class _ExactSum:
    """A sum kept exactly as non-overlapping partials (Shewchuk's algorithm, the one behind
    math.fsum): :meth:`value` is ``math.fsum`` of every value added, without keeping them."""

    __slots__ = ("partials", "special")

    def __init__(self) -> None:
        self.partials: list[float] = []
        self.special = 0.0  # inf / NaN terms (and an overflow), added plainly

    def add(self, x: float) -> None:
        if not math.isfinite(x):
            self.special += x
            return
        partials = self.partials
        i = 0
        for y in partials:
            if abs(x) < abs(y):
                x, y = y, x
            hi = x + y
            if not math.isfinite(hi):  # past the float range: fsum raises; the total is hi
                self.special += hi
                return
            lo = y - (hi - x)
            if lo:
                partials[i] = lo
                i += 1
            x = hi
        partials[i:] = [x]

    def value(self) -> float:
        return self.special if self.special else math.fsum(self.partials)
