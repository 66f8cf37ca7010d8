"""The decision maker: signals -> plans -> the governor's verdicts -> a trader, and back.

One :class:`DecisionMaker` owns, per account: the ATR trackers behind the stops, the last
prices, the :class:`~dynamic_core.decision.governor.RiskGovernor`, the plans it made and the
trader that executes them (a :class:`~dynamic_core.bridges.paper.PaperBroker`, or anything with
its ``submit_plan`` / ``on_bars`` / ``positions`` / ``equity`` / ``on_trade`` face). Per time
step the caller does::

    maker.on_bars(bars)            # trader fills pending orders, stops and targets; equity marked
    signals = engine.run(bars)
    maker.on_signals(signals, agents=engine.agents())   # plans, verdicts, orders

Every verdict is journaled (when a journal is given) as an event record holding the encoded
:class:`~dynamic_core.payloads.PlanDecision`. Closed trades are attributed to their plan, the
plan's signal, its top contributing agents and the adapter whose rationale was attached
(:meth:`DecisionMaker.attribution`), fed to the governor's loss streak, and credited to the
contributing agents (:class:`CreditLedger`), which an engine can take as consensus weights.

Bad input is skipped and counted, never raised and never half-applied: bars the trader refuses
(non-finite prices, high below open/close, low above them, a time not after the stream's last,
an unknown instrument id) move no ATR and no price (``stats()["skipped_bars"]``), and signals
of an unknown instrument id make no plan (``stats()["skipped_signals"]``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import msgspec
import numpy as np

from .. import detmath
from ..instruments import instruments
from ..payloads import PlanDecision, TradingPlan
from ..records import BAR_DTYPE, MAX_PRICE, MIN_PRICE, SIGNAL_DSI, SIGNAL_DTYPE
from ._history import _History
from .governor import _FLAT, Portfolio, RiskGovernor, RiskLimits, _book_entry, _book_view, _books
from .plans import (
    AtrTracker,
    PlanConfig,
    _new_plan,
    size_batch,
    target_batch,
    valid_until_fits,
)
from .specs import (
    InstrumentSpec,
    _inverse_step,
    _load_toml,
    instrument_spec,
    quote_to_account,
    specs_from_tables,
)

__all__ = ["HISTORY", "Attribution", "CreditLedger", "DecisionMaker", "top_contributors"]

HISTORY = 100_000
"""How many verdicts, closed-trade attributions and finished plans a :class:`DecisionMaker`
keeps in memory by default (the journal is the durable record)."""

_TS_MIN = -(2**63)
_BAR_REASONS = ("", "unknown_instrument", "non_finite", "bad_range", "out_of_order", "non_positive_price",
                "price_out_of_range")
_I64_MAX = 2**63 - 1


def top_contributors(agents: np.ndarray, instrument: int, timeframe: int, direction: int, k: int = 8,
                     index: dict[tuple[int, int], np.ndarray] | None = None) -> tuple[int, ...]:
    """Ids of the ``k`` agents of a stream that voted with ``direction`` and carried the most
    consensus weight (``fitness x |score|``), strongest first; ties go to the lower id."""
    rows = index.get((instrument, timeframe)) if index is not None else None
    if rows is None:
        rows = np.flatnonzero((agents["instrument"] == instrument) & (agents["timeframe"] == timeframe))
    # the columns it needs, gathered one by one: copying whole agent records cost 4x more
    m = ((agents["warm"][rows] != 0) & (agents["quarantined"][rows] == 0)
         & (np.sign(agents["action"][rows]) == direction))
    if not m.any():
        return ()
    r = rows[m]
    w = agents["fitness"][r] * np.abs(agents["score"][r])
    ids = agents["agent_id"][r]
    order = np.lexsort((ids, -w))[:k]
    return tuple(ids[order].tolist())


@dataclass(frozen=True)
class Attribution:
    """One closed trade traced back to where it came from."""

    plan_id: str
    signal_id: str
    instrument: str
    direction: int
    lots: float
    entry_ts: int
    exit_ts: int
    exit_reason: str
    pnl: float
    r_multiple: float
    contributors: tuple[int, ...]
    adapter: str


class CreditLedger:
    """Per-agent credit from live (paper or broker) outcomes: the feedback to agent fitness.

    Each closed trade moves every contributing agent's credit multiplicatively by
    ``exp(rate * clip(R, -cap, cap))``, where ``R`` is the trade's R multiple; credit stays in
    [``lo``, ``hi``]. Credit 1.0 is neutral. An engine that supports it multiplies each agent's
    consensus weight by its credit (:meth:`apply`).
    """

    def __init__(self, rate: float = 0.1, cap: float = 3.0, lo: float = 0.25, hi: float = 4.0) -> None:
        self.rate, self.cap, self.lo, self.hi = float(rate), float(cap), float(lo), float(hi)
        self.credit: dict[int, float] = {}
        self.trades: dict[int, int] = {}
        self.pnl: dict[int, float] = {}
        self._dirty: set[int] = set()

    def record(self, agents: tuple[int, ...], r_multiple: float, pnl: float) -> None:
        if not agents:
            return
        r = r_multiple if math.isfinite(r_multiple) else (1.0 if pnl > 0 else -1.0 if pnl < 0 else 0.0)
        # detmath: the C library's exp differs between CPUs in the last bit, and the credit feeds consensus
        f = detmath.exp(float(self.rate * max(-self.cap, min(self.cap, r))))
        share = pnl / len(agents)
        for a in agents:
            c = self.credit.get(a, 1.0) * f
            self.credit[a] = min(self.hi, max(self.lo, c))
            self.trades[a] = self.trades.get(a, 0) + 1
            self.pnl[a] = self.pnl.get(a, 0.0) + share
            self._dirty.add(a)

    def take_changes(self) -> tuple[np.ndarray, np.ndarray]:
        """(agent ids, credits) changed since the last call, ids ascending."""
        ids = np.array(sorted(self._dirty), dtype=np.uint32)
        self._dirty.clear()
        return ids, np.array([self.credit[int(i)] for i in ids], dtype=np.float64)

    def apply(self, engine: Any) -> int:
        """Hand the changed credits to ``engine.set_credit(ids, credits)`` when it has one;
        returns how many agents changed."""
        ids, vals = self.take_changes()
        if len(ids) and hasattr(engine, "set_credit"):
            try:
                engine.set_credit(ids, vals)
            except BaseException:
                self._dirty.update(ids.tolist())  # not lost: sent again next time
                raise
        return len(ids)


def _check_ids(a: np.ndarray, what: str) -> None:
    """TypeError unless the records' instrument, timeframe and time fields are integers (an id
    column of floats or objects would index the instrument table by accident)."""
    for name in ("instrument", "timeframe", "ts"):
        if a.dtype[name].kind not in "iu":
            raise TypeError(f"{what}: the {name} field must be an integer, got {a.dtype[name]}")


class DecisionMaker:
    """Signals in, verdicts and orders out, outcomes fed back.

    Parameters
    ----------
    trader : PaperBroker-like
        Executes approved plans (``submit_plan(plan)``), reports closed trades (``on_trade``),
        holds ``equity`` and ``positions()``; its ``account`` currency, when it has one, must be
        the plan's.
    plan : PlanConfig, optional
    limits : RiskLimits, optional
        Their account currencies must agree. One not given takes the other's account (neither:
        the trader's, else USD) and its defaults otherwise.
    specs : mapping of InstrumentSpec, optional
        Overrides of :data:`~dynamic_core.decision.specs.DEFAULT_SPECS`.
    journal : callable, optional
        ``journal(raw_bytes)`` for every verdict, e.g. ``engine.journal_event``.
    rationale : callable, optional
        ``rationale(signal_id) -> (text, provider, providers_agreeing) | None``: what the
        reasoning mesh said about a signal, attached to its plan.
    credit : CreditLedger, optional
        Where trade outcomes are credited to contributing agents (default: a new ledger).
    contributors : int
        How many top agents a plan names.
    dsi : object with ``evidence(instrument) -> float``, optional
        Microstructure evidence in [-1, 1] (e.g. :class:`dynamic_core.learning.dsi.Dsi`); a
        plan carries ``evidence["dsi"]`` = its direction x the evidence (the tape agreeing is
        positive), which the governor's ``min_dsi_validation`` can require. A plan on an
        instrument the source does not follow (its ``evidence`` raises a KeyError) is counted
        in ``stats()["dsi_untracked"]`` and made as without a source. Without one, a
        signal that carries DSI evidence (``flags & dc.SIGNAL_DSI``: the engine's
        :meth:`~dynamic_core.Engine.set_dsi` had reached its stream) lends the plan its own.
    history : int or None
        How many verdicts (:attr:`decisions`), attributions (:attr:`attributions`) and plans no
        longer needed (:attr:`plans`) are kept in memory, the oldest dropped first, a chunk at a
        time (default :data:`HISTORY`; None keeps everything). The journal is the durable record
        of every verdict; what is dropped is counted (``stats()["dropped"]``) and the totals
        (``stats()["plans"]``, ``["trades"]``, ``["pnl"]``) still cover everything. A plan whose
        order is pending or whose legs are open is never dropped: its trades need it.

    Attributes
    ----------
    decisions : list of PlanDecision
        The latest verdicts, oldest first (:meth:`decisions_since` reads them by running count).
    plans : dict
        Approved plans by id, for attributing their trades.
    attributions : list of Attribution
        The latest closed trades, in closing order.
    """

    def __init__(self, trader: Any, *, plan: PlanConfig | None = None, limits: RiskLimits | None = None,
                 specs: Mapping[str, InstrumentSpec] | None = None, journal: Callable[[bytes], Any] | None = None,
                 rationale: Callable[[str], tuple[str, str, int] | None] | None = None,
                 credit: CreditLedger | None = None, contributors: int = 8, dsi: Any = None,
                 history: int | None = HISTORY) -> None:
        self.trader = trader
        # one account currency for sizing, the governor and the trader: the one given (plan or
        # limits), else the trader's (when it names one), else USD
        own = getattr(trader, "account", None)
        own = own if isinstance(own, str) else None
        account = (plan.account if plan is not None else limits.account if limits is not None
                   else own if own is not None else PlanConfig().account)
        if plan is None:
            plan = PlanConfig(account=account)
        if limits is None:
            limits = RiskLimits(account=account)
        if limits.account != plan.account:
            raise ValueError(f"the plan config's account currency {plan.account!r} differs from the "
                             f"risk limits' {limits.account!r}: set both ([plan] account and [risk] account)")
        if own is not None and own != plan.account:
            raise ValueError(f"the trader's account currency is {own!r}, the plan config's {plan.account!r}: "
                             "sizes and limits would be in another currency than its equity")
        self.plan_config = plan
        if history is not None and (not isinstance(history, int) or history < 1):
            raise ValueError(f"history must be an int >= 1 or None, got {history!r}")
        self.specs = dict(specs or {})
        self.governor = RiskGovernor(limits, specs=self.specs, equity=float(trader.equity))
        self.atr = AtrTracker(self.plan_config.atr_period)
        self.prices: dict[str, float] = {}
        self.plans: dict[str, TradingPlan] = {}
        self.decisions: _History = _History(history)  # of PlanDecision
        self.attributions: _History = _History(history)  # of Attribution
        self.credit = credit if credit is not None else CreditLedger()
        self.n_contributors = int(contributors)
        self.dsi = dsi
        self._journal = journal
        self._rationale = rationale
        self._enc = msgspec.msgpack.Encoder()
        self._spec_cache: dict[str, InstrumentSpec] = {}
        self._tab: tuple | None = None  # _spec_table's cache
        self._agent_index: dict[tuple[int, int], np.ndarray] | None = None
        self._index_of: int | None = None
        self.no_plan = 0
        self.dsi_untracked = 0  # plans on an instrument the DSI source follows no tape of
        self._no_plan_why: dict[str, int] = {}
        self.order_rejects: dict[str, int] = {}  # approved plans the trader refused, by its reason
        self.skipped_bars: dict[str, int] = {}
        self.skipped_signals: dict[str, int] = {}
        self._bar_ts: dict[tuple[int, int], int] = {}  # last accepted bar time per stream
        self.history = history
        self._keep = keep = history if history is not None else _I64_MAX
        self._chunk = max(1, keep // 8)  # trimmed a chunk at a time: amortised O(1) per append
        self._plans_at = keep + self._chunk
        self.plans_dropped = 0
        self._trades_total = 0
        self._pnl_total = 0.0
        self._pf: Portfolio | None = None
        self._filled: dict[str, float] = {}
        self._both: dict[str, float] = {}
        self._pend: dict[str, tuple[float, float]] = {}
        self._pend_plans: set[str] = set()
        trader.on_trade(self._on_trade)

    # ---- inputs --------------------------------------------------------------------------------

    def on_bars(self, bars: np.ndarray) -> None:
        """Bars of one time step, in time order: the trader fills and marks, the ATRs and last
        prices move, the governor sees the new equity. (Several steps at once are allowed, but
        plans made afterwards use the last bar's close and ATR.)

        A bar the trader would refuse moves neither an ATR nor a price (one NaN high would
        leave its stream's ATR NaN for good): it is skipped and counted by reason in
        ``stats()["skipped_bars"]`` -- ``unknown_instrument``, ``non_finite``,
        ``non_positive_price``, ``price_out_of_range`` (outside ``[dc.MIN_PRICE, dc.MAX_PRICE]``),
        ``bad_range`` (high below open or close, low above them),
        ``out_of_order`` (not after the last bar of its (instrument, timeframe))."""
        if (not isinstance(bars, np.ndarray) or bars.ndim != 1
                or not set(BAR_DTYPE.names) <= set(bars.dtype.names or ())):
            got = f"dtype {bars.dtype}, shape {bars.shape}" if isinstance(bars, np.ndarray) else type(bars).__name__
            raise TypeError(f"on_bars: expected a 1-d array of dc.BAR_DTYPE, got {got}")
        _check_ids(bars, "on_bars")
        if len(bars) == 0:
            return
        opening = float(self.trader.equity)  # a new day opens at the equity before these fills
        self.trader.on_bars(bars)
        names = instruments._names  # read only: names() copies the list
        o, h, lo, c = bars["open"], bars["high"], bars["low"], bars["close"]
        inst = bars["instrument"]
        # MIN_PRICE <= lo <= min(open, close) <= max(open, close) <= high <= MAX_PRICE holds
        # exactly when all four are finite, positive, in bounds and in range (a NaN fails every
        # comparison)
        in_range = (h >= np.maximum(o, c)) & (lo <= np.minimum(o, c))
        good = in_range & (h <= MAX_PRICE) & (lo >= MIN_PRICE)
        if good.all() and 0 <= int(inst.min()) and int(inst.max()) < len(names):
            codes: Any = repeat(0)
        else:  # 0: good; else the index of its reason in _BAR_REASONS (the trader's checks, in its order)
            finite = np.isfinite(o) & np.isfinite(h) & np.isfinite(lo) & np.isfinite(c)
            positive = (o > 0.0) & (lo > 0.0) & (c > 0.0)
            bounded = (np.minimum(np.minimum(o, lo), c) >= MIN_PRICE) & (np.maximum(np.maximum(o, h), c) <= MAX_PRICE)
            codes = np.where((inst < 0) | (inst >= len(names)), 1, np.where(~finite, 2, np.where(
                ~positive, 5, np.where(~bounded, 6, np.where(in_range, 0, 3))))).tolist()
        upd, last, prices, skipped = self.atr.update, self._bar_ts, self.prices, self.skipped_bars
        mark_ts = None
        for i, tf, ts, hh, ll, cc, bad in zip(inst.tolist(), bars["timeframe"].tolist(), bars["ts"].tolist(),
                                              h.tolist(), lo.tolist(), c.tolist(), codes):
            if not bad:
                key = (i, tf)
                if ts > last.get(key, _TS_MIN):
                    last[key] = ts
                    upd(i, tf, hh, ll, cc)
                    if cc > 0.0:
                        prices[names[i]] = cc
                    if mark_ts is None or ts > mark_ts:  # the latest time taken: a lagging stream's
                        mark_ts = ts                     # bar is no clock going back
                    continue
                bad = 4
            reason = _BAR_REASONS[bad]
            skipped[reason] = skipped.get(reason, 0) + 1
        if mark_ts is not None:  # no bar taken: nothing filled, and a bad bar's time is no clock
            self.governor.mark(mark_ts, float(self.trader.equity), opening)

    def _count_no_plan(self, rows: np.ndarray, entry: np.ndarray, atr: np.ndarray, conv: np.ndarray,
                       equity: float, fits: np.ndarray | None) -> None:
        """Why each of ``rows`` (signals that size no plan) makes none, first reason that applies:
        ``no_equity``, ``no_atr`` (its stream has no warm ATR or price yet), ``no_conversion`` (no
        price converts its quote currency to the account's), ``validity_overflow``, else
        ``below_min_lot`` (the risk buys less than one lot step, or the stop vanished in the
        entry's rounding)."""
        with np.errstate(invalid="ignore"):
            why = np.where(~(atr > 0.0) | ~np.isfinite(atr) | ~(entry > 0.0) | ~np.isfinite(entry), 1,
                           np.where(~np.isfinite(conv) | ~(conv > 0.0), 2,
                                    np.where(fits if fits is not None else True, 4, 3)))
        if not 0.0 < equity < math.inf:
            why = np.zeros_like(why)
        names = ("no_equity", "no_atr", "no_conversion", "validity_overflow", "below_min_lot")
        counts = np.bincount(why[rows], minlength=5)
        for k in np.flatnonzero(counts).tolist():
            self._no_plan_why[names[k]] = self._no_plan_why.get(names[k], 0) + int(counts[k])

    def _spec(self, name: str) -> InstrumentSpec:
        sp = self._spec_cache.get(name)
        if sp is None:
            sp = self._spec_cache[name] = instrument_spec(name, self.specs)
        return sp

    def _index(self, agents: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
        # agents() comes in population order, so the rows of a stream do not move between calls
        if self._agent_index is None or self._index_of != len(agents):
            key = agents["instrument"].astype(np.uint64) << np.uint64(32) | agents["timeframe"].astype(np.uint64)
            uniq, inv = np.unique(key, return_inverse=True)
            self._agent_index = {(int(u >> np.uint64(32)), int(u & np.uint64(0xFFFFFFFF))): np.flatnonzero(inv == j)
                                 for j, u in enumerate(uniq)}
            self._index_of = len(agents)
        return self._agent_index

    def _spec_table(self, inst: np.ndarray, names: list[str], account: str) -> tuple[list, np.ndarray, np.ndarray]:
        """Per instrument id, cached: the row list (name, name encoded, spec, id), the sizing columns
        (contract, lot step, 1/step or 0, min lot, max lot) and whether the quote currency is
        not the account's (a conversion is needed). Rows are filled for the ids in ``inst``."""
        tab = self._tab
        if tab is None or tab[0] is not names or tab[1] != account:
            tab = self._tab = (names, account, [], np.zeros((0, 5)), np.zeros(0, dtype=bool), np.zeros(0, dtype=bool))
        _, _, rows, cols, conv, have = tab
        n = len(names)
        if len(rows) < n:  # instruments registered since: room for them
            rows.extend([None] * (n - len(rows)))
            cols = np.concatenate([cols, np.zeros((n - len(cols), 5))])
            conv = np.concatenate([conv, np.zeros(n - len(conv), dtype=bool)])
            have = np.concatenate([have, np.zeros(n - len(have), dtype=bool)])
            tab = self._tab = (names, account, rows, cols, conv, have)
        known = have[inst]
        if not known.all():
            for i in sorted(set(inst[~known].tolist())):
                name = names[i]
                sp = self._spec(name)
                rows[i] = (name, name.encode(), sp, i)
                cols[i] = (sp.contract_size, sp.lot_step, float(_inverse_step(sp.lot_step)), sp.min_lot, sp.max_lot)
                conv[i] = sp.quote != account
                have[i] = True
        return rows, cols, conv

    def on_signals(self, signals: np.ndarray, agents: np.ndarray | Callable[[], np.ndarray] | None = None) -> list[PlanDecision]:
        """Plan, judge and (when approved) trade each signal, in order. ``agents`` (the
        engine's ``agents()`` at the signals' bar, or a callable giving it, called only when a
        plan is made) names each plan's top contributors.

        Stops and sizes are computed for the whole batch at once (:func:`size_batch`, the same
        arithmetic as :func:`make_plan`); verdicts are sequential, each seeing the orders placed
        before it. An actionable signal of an unknown instrument id is skipped and counted
        (``stats()["skipped_signals"]["unknown_instrument"]``) before anything changes, and so
        is one whose action is not an action, outside [-2, 2] (``["bad_action"]``)."""
        out: list[PlanDecision] = []
        if (not isinstance(signals, np.ndarray) or signals.ndim != 1
                or not set(SIGNAL_DTYPE.names) <= set(signals.dtype.names or ())):
            got = (f"dtype {signals.dtype}, shape {signals.shape}" if isinstance(signals, np.ndarray)
                   else type(signals).__name__)
            raise TypeError(f"on_signals: expected a 1-d array of dc.SIGNAL_DTYPE (what Engine.run and poll "
                            f"return), got {got}")
        _check_ids(signals, "on_signals")
        if len(signals) == 0:
            return out
        cfg = self.plan_config
        act_all = signals["action"]
        want = np.abs(act_all) >= cfg.min_action
        if cfg.min_score > 0.0:
            want |= np.abs(signals["score"]) >= cfg.min_score
        if want.all():  # (only read: no copy needed)
            sel = signals
        else:
            rows = np.flatnonzero(want)
            if len(rows) == 0:
                return out
            sel = signals[rows]
        names = instruments._names  # read only: names() copies the list
        inst_a, act = sel["instrument"], sel["action"]
        # skipped and counted before anything changes: unknown instrument ids, then actions that
        # are not an action (STRONG_SELL -2 .. STRONG_BUY 2)
        if (int(inst_a.min()) < 0 or int(inst_a.max()) >= len(names) or int(act.min()) < -2
                or int(act.max()) > 2):
            keep = (inst_a >= 0) & (inst_a < len(names))
            skipped = self.skipped_signals
            for reason, bad in (("unknown_instrument", ~keep), ("bad_action", keep & ((act < -2) | (act > 2)))):
                n_bad = int(np.count_nonzero(bad))
                if n_bad:
                    skipped[reason] = skipped.get(reason, 0) + n_bad
                    keep &= ~bad
            sel = sel[keep]
            if len(sel) == 0:
                return out
            inst_a, act = sel["instrument"], sel["action"]
        inst_l = inst_a.tolist()
        if cfg.min_score > 0.0:
            direction = np.where(np.abs(act) >= cfg.min_action, np.sign(act), np.sign(sel["score"])).astype(np.int64)
        else:  # every signal taken is actionable by its action
            direction = np.sign(act).astype(np.int64)
        tf_l = sel["timeframe"].tolist()
        atr_state = self.atr._state
        nan = math.nan
        st = [atr_state.get(k) for k in zip(inst_l, tf_l)]
        entry = np.array([x[0] if x is not None else nan for x in st])
        atr = np.array([x[3] if x is not None else nan for x in st])
        entry_l = entry.tolist()
        account = cfg.account
        spec_rows, spec_cols, needs_conv = self._spec_table(inst_a, names, account)
        srows = [spec_rows[i] for i in inst_l]
        conv = np.ones(len(sel))
        for j in np.flatnonzero(needs_conv[inst_a]).tolist():
            try:
                conv[j] = quote_to_account(srows[j][2], entry_l[j], account, self.prices)
            except (KeyError, ZeroDivisionError):
                conv[j] = nan
        cols = spec_cols[inst_a]
        # the account as of this call; only this call's own orders change it until the next bar
        equity = float(self.trader.equity)
        dist, stop, size, rpl, ok = size_batch(cfg, entry, atr, direction, cols[:, 0], conv, cols[:, 1], cols[:, 2],
                                               cols[:, 3], cols[:, 4], equity)
        ts_a = sel["ts"]
        # valid_until = ts + valid_bars * timeframe s must stay an int64 time (valid_until_fits);
        # checked row by row only when the batch's extremes do not fit
        fits = None
        if not valid_until_fits(cfg, int(ts_a.max()), max(tf_l)):
            fits = np.array([valid_until_fits(cfg, t, f) for t, f in zip(ts_a.tolist(), tf_l)], dtype=bool)
            ok &= fits
        if not ok.all():
            self._count_no_plan(~ok, entry, atr, conv, equity, fits)
        targets = target_batch(cfg, entry, direction, dist)
        # decide() judges every plan of the batch against this one view, which _place keeps current
        self._pf = Portfolio(equity=equity, positions=self._positions(), prices=self.prices,
                             pending=self._pend, pending_plans=self._pend_plans)
        snapshot: np.ndarray | None = None
        # the signal ids (signal_id_for): when one population made the whole batch (the usual
        # case), its hash's prefix is formatted once
        ph_a, seq_l = sel["population_hash"], sel["seq"].tolist()
        ph0 = int(ph_a[0])
        if (ph_a == ph0).all():
            pre0 = f"{ph0:016x}:"
            sids = [pre0 + str(q) for q in seq_l]
        else:
            sids = [f"{p:016x}:{q}" for p, q in zip(ph_a.tolist(), seq_l)]
        # the start of each plan id's hash input (plan_id_for): the signal id and the instrument
        id_pre = [sid.encode() + r[1] for sid, r in zip(sids, srows)]
        # valid_until = ts + valid_bars * timeframe s; a batch of one bar time and timeframe (the
        # usual case) shares the three ints
        valid_ns = cfg.valid_bars * 1_000_000_000
        ts_l = ts_a.tolist()
        ts0, tf0 = ts_l[0], tf_l[0]
        if (ts_a == ts0).all() and tf_l.count(tf0) == len(tf_l):
            n = len(ts_l)
            ts_l, tf_l, vu_l = [ts0] * n, [tf0] * n, [ts0 + valid_ns * tf0] * n
        else:
            vu_l = [t + valid_ns * f for t, f in zip(ts_l, tf_l)]
        fields = zip(ok.tolist(), direction.tolist(), act.tolist(), sel["score"].tolist(), tf_l,
                     ts_l, vu_l, seq_l, sids, id_pre,
                     sel["confidence"].tolist(), sel["agreement"].tolist(), sel["dispersion"].tolist(),
                     sel["n_agents"].astype(np.float64).tolist(), entry_l, atr.tolist(), stop.tolist(),
                     size.tolist(), rpl.tolist(), srows, sel["dsi"].tolist(),
                     ((sel["flags"] & SIGNAL_DSI) != 0).tolist(), targets)
        risk = cfg.risk_pct
        contrib_k = self.n_contributors if agents is not None else 0
        rationale, dsi_src = self._rationale, self.dsi
        decide, push = self.decide, out.append
        new_plan, isnan = _new_plan, math.isnan
        try:
            for (good, d, a, score, tf, ts, vu, seq, sid, pre, conf, agr, disp, n_ag, e, at, sp_stop, sz, rp,
                 srow, sig_dsi, sig_has_dsi, tgs) in fields:
                if not good:  # counted by reason in _count_no_plan
                    self.no_plan += 1
                    continue
                if isnan(sz):  # NaN: a lot step that is not 1/n, rounded the scalar way
                    sz = srow[2].round_lots(equity * risk / 100.0 / rp)
                    if sz <= 0.0:
                        self.no_plan += 1
                        self._no_plan_why["below_min_lot"] = self._no_plan_why.get("below_min_lot", 0) + 1
                        continue
                contributors: tuple[int, ...] = ()
                if contrib_k:
                    if snapshot is None:
                        snapshot = agents() if callable(agents) else agents
                    contributors = top_contributors(snapshot, srow[3], tf, d, contrib_k, self._index(snapshot))
                text, provider, agreeing = "", "", 0
                if rationale is not None:
                    got = rationale(sid)
                    if got is not None:
                        text, provider, agreeing = got
                evidence = {"dispersion": disp, "n_agents": n_ag, "atr": at}
                ev = self._tape_evidence(srow[0]) if dsi_src is not None else None
                if ev is not None:
                    evidence["dsi"] = d * ev
                elif sig_has_dsi:
                    evidence["dsi"] = d * sig_dsi
                plan = new_plan(sid, pre, srow[0], tf, ts, seq, d, a, e, sp_stop, tgs, sz, sz * rp,
                                vu, score, conf, agr, at, contributors, evidence, text, provider,
                                agreeing)
                push(decide(plan))
        finally:
            self._pf = None
        return out

    def _tape_evidence(self, instrument: str) -> float | None:
        """The DSI source's evidence on ``instrument`` (a non-finite one read as 0), or None
        where the source follows no tape of it (it raises a KeyError, as
        :class:`~dynamic_core.instruments.UnknownInstrument` is): counted in ``stats()["dsi_untracked"]``,
        and the plan carries the signal's own evidence, if any."""
        try:
            ev = float(self.dsi.evidence(instrument))
        except KeyError:
            self.dsi_untracked += 1
            return None
        return ev if math.isfinite(ev) else 0.0

    def decide(self, plan: TradingPlan) -> PlanDecision:
        """Judge one plan, journal the verdict, and hand an approved plan to the trader."""
        pf = self._pf
        if pf is None:
            pf = Portfolio(equity=float(self.trader.equity), positions=self._positions(), prices=self.prices,
                           pending=self._pend, pending_plans=self._pend_plans)
        d = self.governor.evaluate(plan, pf)
        self.decisions.append(d)
        if self._journal is not None:
            self._journal(self._enc.encode(d))
        if d.verdict != "REJECTED":
            self._place(d.plan, pf)
        return d

    def _place(self, p: TradingPlan, pf: Portfolio) -> None:
        """Hand an approved plan to the trader; within :meth:`on_signals`, the governor's view of
        the positions takes the order in (:meth:`_positions`)."""
        self.plans[p.plan_id] = p
        res = self.trader.submit_plan(p)
        if len(self.plans) > self._plans_at:  # after the submission: this plan's order is live
            self._trim_plans()
        status = getattr(res, "status", "accepted")
        if status == "rejected":  # approved, yet never an order: counted, or "approved" overstates
            why = str(getattr(res, "reason", "") or "unknown")
            self.order_rejects[why] = self.order_rejects.get(why, 0) + 1
        if self._pf is not None and status in ("accepted", "filled"):
            name, x = p.instrument, p.direction * p.size
            both = self._both[name] = self._both.get(name, 0.0) + x
            filled = self._filled.get(name, 0.0)
            if status == "filled":
                filled = self._filled[name] = filled + x
            else:  # waiting to fill: judged again, the plan is a duplicate
                pf.pending_plans.add(p.plan_id)
            pair, view = _book_entry(filled, both)
            if pair is not None:  # the next plan on it is judged from both books
                pf.pending[name] = pair
            else:
                pf.pending.pop(name, None)
            self.governor.set_position(pf, name, view)

    def _positions(self) -> dict[str, float]:
        """The positions the governor judges by: per instrument, the larger of the filled net
        lots and the net lots once the pending orders fill (:func:`_worse`). A plan approved on
        this bar is a position from the next open, so the limits must see it now; but an order
        that would close a position frees neither its ``max_open_positions`` slot nor its
        exposure until it has filled (it may expire unfilled). Keeps both books for the orders
        :meth:`decide` places during this call, and (``_pend``, ``_pend_plans``) the
        :class:`Portfolio`'s ``pending`` and ``pending_plans``: a plan on an instrument with
        orders waiting is judged from both books, and a plan whose order waits is not judged
        twice."""
        pending = getattr(self.trader, "pending", None)
        orders = pending() if pending is not None else None
        net = getattr(self.trader, "net_lots", None)
        if net is not None:
            filled = net()
            # (orders placed on a bar fill at the next open: usually none are left by now)
            both = net(pending=True) if orders is None or orders else dict(filled)
        else:
            filled, both, _ = _books(self.trader, orders or ())
            both = {k: v for k, v in both.items() if abs(v) > _FLAT}
        self._filled, self._both = filled, both
        self._pend_plans = {o.plan_id for o in orders if o.plan_id} if orders else set()
        if both == filled:
            self._pend = {}
            return dict(filled)
        # the order of the books (not of a set): the governor sums exposure in this order
        view, self._pend = _book_view(filled, both)
        return view

    # ---- bounded history -----------------------------------------------------------------------

    @property
    def decision_count(self) -> int:
        """Verdicts given so far, dropped ones included."""
        return self.decisions.total

    def decisions_since(self, n: int) -> list[PlanDecision]:
        """The verdicts after the first ``n`` ever given (:attr:`decision_count`), as far as they
        are still kept."""
        return self.decisions.since(n)

    @property
    def decisions_dropped(self) -> int:
        """Verdicts no longer kept."""
        return self.decisions.dropped

    @property
    def attributions_dropped(self) -> int:
        """Attributions no longer kept."""
        return self.attributions.dropped

    def _trim_plans(self) -> None:
        live = self._live_plan_ids()
        if live is not None:
            excess = len(self.plans) - self._keep
            for pid in list(self.plans):  # oldest first
                if excess <= 0:
                    break
                if pid not in live:
                    del self.plans[pid]
                    excess -= 1
                    self.plans_dropped += 1
        # plans still in play are kept whatever their number: look again a chunk later
        self._plans_at = max(self._keep, len(self.plans)) + self._chunk

    def _live_plan_ids(self) -> set[str] | None:
        """Ids of the plans with a pending order or an open leg at the trader; None when the
        trader cannot say (then no plan is dropped)."""
        pending = getattr(self.trader, "pending", None)
        if pending is None:
            return None
        live = {o.plan_id for o in pending()}
        for pos in self.trader.positions().values():
            legs = getattr(pos, "legs", None)
            if legs is None:
                return None
            live.update(leg.plan_id for leg in legs)
        return live

    # ---- outcomes ------------------------------------------------------------------------------

    def _on_trade(self, trade: Any) -> None:
        plan = self.plans.get(trade.plan_id)
        contributors = plan.contributors if plan is not None else ()
        att = Attribution(plan_id=trade.plan_id, signal_id=plan.signal_id if plan else "",
                          instrument=trade.instrument, direction=int(trade.direction), lots=float(trade.lots),
                          entry_ts=int(trade.entry_ts), exit_ts=int(trade.exit_ts), exit_reason=str(trade.exit_reason),
                          pnl=float(trade.pnl), r_multiple=float(trade.r_multiple), contributors=contributors,
                          adapter=plan.rationale_provider if plan else "")
        self.attributions.append(att)
        self._trades_total += 1
        self._pnl_total += att.pnl
        self.governor.on_trade_result(att.pnl, att.exit_ts, plan.timeframe if plan else 0)
        self.credit.record(contributors, att.r_multiple, att.pnl)

    def attribution(self) -> list[Attribution]:
        """The closed trades kept (the latest ``history``; every one without it), in closing order."""
        return list(self.attributions)

    def by_agent(self, k: int = 10) -> list[tuple[int, int, float, float]]:
        """(agent id, trades, attributed P&L, credit) of the ``k`` agents with the most
        attributed P&L."""
        led = self.credit
        rows = sorted(led.pnl.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        return [(a, led.trades[a], p, led.credit[a]) for a, p in rows]

    def stats(self) -> dict[str, Any]:
        """The governor's counts and, over the whole run (dropped history included): plans
        judged, signals that made no plan (``no_plan``; by reason in ``no_plan_reasons``, see
        :meth:`_count_no_plan`), approved plans the trader refused (``order_rejects``,
        by its reason), trades closed and their P&L; bars and signals skipped by reason; how
        much history was dropped; plans on an instrument the DSI source does not follow
        (``dsi_untracked``)."""
        g = self.governor.stats()
        return {**g, "plans": self.decision_count, "no_plan": self.no_plan,
                "no_plan_reasons": dict(sorted(self._no_plan_why.items())),
                "order_rejects": dict(sorted(self.order_rejects.items())), "trades": self._trades_total,
                "pnl": self._pnl_total, "equity": float(self.trader.equity),
                "skipped_bars": dict(sorted(self.skipped_bars.items())),
                "skipped_signals": dict(sorted(self.skipped_signals.items())),
                "dsi_untracked": self.dsi_untracked,
                "dropped": {"decisions": self.decisions_dropped, "attributions": self.attributions_dropped,
                            "plans": self.plans_dropped}}


def load_decision_config(path: str) -> tuple[PlanConfig, RiskLimits, dict[str, InstrumentSpec], dict[str, Any]]:
    """``[plan]``, ``[risk]``, ``[instruments.NAME]`` and ``[costs]`` / ``[costs.NAME]`` tables
    of a TOML file (each optional). Returns (plan config, limits, specs, raw cost tables)."""
    doc = _load_toml(path)
    path = os.fspath(path)
    unknown = set(doc) - {"plan", "risk", "instruments", "costs"}
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {', '.join(sorted(unknown))} "
                         "(expected plan, risk, instruments, costs)")
    for key in ("plan", "risk", "instruments", "costs"):
        if key in doc and not isinstance(doc[key], dict):
            raise ValueError(f"{path}: {key} must be a table ([{key}]), got {type(doc[key]).__name__}")
    def convert(table: str, cls: type) -> Any:
        try:
            return msgspec.convert(doc.get(table, {}), cls)
        except msgspec.ValidationError as e:  # its path ($.risk_pct) is within the table
            raise ValueError(f"{path}: [{table}] {e}") from None

    plan, limits = convert("plan", PlanConfig), convert("risk", RiskLimits)
    if "account" in doc.get("plan", {}) and "account" not in doc.get("risk", {}):
        limits = msgspec.structs.replace(limits, account=plan.account)
    elif "account" in doc.get("risk", {}) and "account" not in doc.get("plan", {}):
        plan = msgspec.structs.replace(plan, account=limits.account)
    if plan.account != limits.account:
        raise ValueError(f"{path}: [plan] account {plan.account!r} and [risk] account {limits.account!r} differ")
    specs = specs_from_tables(doc["instruments"], path) if "instruments" in doc else {}
    return plan, limits, specs, dict(doc.get("costs", {}))
