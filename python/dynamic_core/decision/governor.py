"""The risk governor: every plan ends APPROVED, MODIFIED (resized) or REJECTED, with reasons.

Checks, in this order (a rejection stops the list; resizes accumulate):

=========================  ==================================================================
reason code                rule
=========================  ==================================================================
``invalid_plan``           direction not +1 / -1, or size not a finite number > 0 (the plan
                           schema admits direction 0; no order can carry it)
``halted_drawdown``        equity fell ``max_drawdown_pct`` below its peak: the circuit breaker
                           halts new plans until :meth:`RiskGovernor.reset_breaker`
``daily_loss_limit``       equity fell ``daily_loss_pct`` below the day's opening equity (UTC
                           day of the plan's bar; the equity before its first bar was filled,
                           so that bar's loss counts); lifts at the next day. A plan stamped on an
                           earlier day than the governor's (it arrived after the day rolled) must
                           pass both that day's worst loss (its lowest mark) and today's
``daily_loss_unknown``     a late plan's day is not among the last :data:`DAYS_KEPT` the governor
                           marked: its loss cannot be checked, so the plan is refused
``cooldown``               ``loss_streak`` losing trades in a row: no plans for
                           ``cooldown_bars`` bars of the plan's timeframe after the last loss
``min_confidence``         signal confidence below ``min_confidence`` (or NaN)
``min_agreement``          signal agreement below ``min_agreement`` (or NaN)
``min_providers_agree``    fewer than ``min_providers_agree`` reasoning providers agree with the
                           signal (0 disables the check)
``dsi_disagrees``          the plan's microstructure validation (``evidence["dsi"]``: direction x
                           DSI evidence) is below ``min_dsi_validation`` or NaN (-1 disables the
                           check; plans without DSI evidence are not checked)
``expired``                the plan's ``valid_until`` is before the governor's clock
``duplicate_plan``         the plan's own order is still waiting to fill (the same plan judged
                           again: it is approved once)
``position_open``          a position in the same direction is open (no pyramiding)
``max_open_positions``     a new position would exceed ``max_open_positions``
``no_equity``              equity is not finite and > 0: no exposure limit can be applied
``resized_instrument``     notional over ``max_instrument_leverage`` x equity: resized to fit
``resized_currency``       a currency's net exposure over ``max_currency_leverage`` x equity:
                           resized to fit (the account currency is not counted)
``resized_leverage``       gross notional over ``max_leverage`` x equity: resized to fit (a plan
                           that does not raise the gross is never refused for it)
``below_min_lot``          resizing left less than the instrument's minimum lot
``no_conversion``          a price needed to value exposure (or convert a currency) is unknown
                           (or values a lot at no finite amount > 0)
=========================  ==================================================================

A guardrail refuses what it cannot compare: a NaN signal value fails it, as does equity that
is NaN or not positive (every limit is a multiple of equity).

Exposure is notional in the account currency: ``lots x contract_size x price x quote_to_account``.
A plan opposite to an open position first closes it, so its exposure counts net of that.
``detail`` carries the numbers behind each reason (``<reason>.limit`` and ``<reason>.value``).

Orders waiting to fill (:attr:`Portfolio.pending`) only ever add to what the limits see: each
other instrument counts at the larger in size of its filled position and its position once they
fill, and a plan on an instrument with such orders must pass every check from both (the
tighter resize wins; each number in ``detail`` is the worse of the two). So a second sell while
a sell closing a long is pending is judged as opening a short as well as closing the long: an
order that would close a position frees neither its slot nor its exposure until it fills (it
may expire unfilled), and one that reverses a position is already the position it reverses to.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec

from ..payloads import PlanDecision, TradingPlan
from .specs import CurrencyCode, InstrumentSpec, check_fields, instrument_spec, quote_to_account

__all__ = ["DAYS_KEPT", "DAY_NS", "Portfolio", "RiskGovernor", "RiskLimits"]

DAY_NS = 86_400 * 1_000_000_000
DAYS_KEPT = 8
"""How many past days' worst losses a :class:`RiskGovernor` keeps to judge late plans."""

_NonNeg = Annotated[float, msgspec.Meta(ge=0.0)]


class RiskLimits(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Portfolio limits and consensus guardrails (0 disables a leverage or count limit).

    Every field is checked on construction as on decoding (``ValueError`` naming it); floats
    must be finite (a NaN limit would compare false and switch itself off)."""

    max_open_positions: Annotated[int, msgspec.Meta(ge=0)] = 8
    max_instrument_leverage: _NonNeg = 10.0
    max_currency_leverage: _NonNeg = 15.0
    max_leverage: _NonNeg = 30.0
    daily_loss_pct: _NonNeg = 3.0
    max_drawdown_pct: _NonNeg = 15.0
    loss_streak: Annotated[int, msgspec.Meta(ge=0)] = 4
    cooldown_bars: Annotated[int, msgspec.Meta(ge=0)] = 12
    min_confidence: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.0
    min_agreement: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.0
    min_providers_agree: Annotated[int, msgspec.Meta(ge=0, le=64)] = 0
    min_dsi_validation: Annotated[float, msgspec.Meta(ge=-1.0, le=1.0)] = -1.0
    allow_pyramiding: bool = False
    account: CurrencyCode = "USD"

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class Portfolio:
    """What the governor needs to know about the account when it judges a plan.

    ``positions`` maps an instrument to its signed net lots; ``prices`` holds the last price of
    every instrument seen (for notional and currency conversion). With orders waiting to fill,
    ``pending`` holds each instrument's (filled, filled + pending) net lots where the two differ,
    ``positions`` the larger in size of the two (as the decision maker gives them), and
    ``pending_plans`` the ids of the plans those orders execute.
    """

    equity: float
    positions: dict[str, float] = field(default_factory=dict)
    prices: dict[str, float] = field(default_factory=dict)
    version: int = 0
    """Bump after changing ``positions`` or ``prices`` in place (the governor caches per version)."""
    pending: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Instrument -> (filled, filled + pending) signed net lots, for instruments with orders
    waiting to fill: a plan on one must pass every limit from both."""
    pending_plans: set[str] = field(default_factory=set)
    """Ids of the plans with an order waiting to fill: judged again, such a plan is refused."""

    @classmethod
    def of(cls, broker: Any) -> Portfolio:
        """A snapshot of a :class:`~dynamic_core.bridges.paper.PaperBroker`-like object
        (``equity``, ``positions()`` with ``.lots``, ``last_prices()``, and ``pending()`` orders
        with ``instrument``, ``side``, ``lots`` and ``plan_id`` when it has them)."""
        filled, both, orders = _books(broker)
        pos, pend = _book_view(filled, both)
        return cls(equity=float(broker.equity), positions=pos, prices=dict(broker.last_prices()), pending=pend,
                   pending_plans={o.plan_id for o in orders if o.plan_id})


_FLAT = 1e-12  # lots closer to 0 than this are float dust, not a position


def _worse(filled: float, with_pending: float) -> float:
    """The governor's view of one instrument: whichever of the filled position and the position
    once its pending orders fill is the larger. A pending order can only add to what the limits
    see -- one that would close a position may yet expire unfilled."""
    return with_pending if abs(with_pending) > abs(filled) else filled


def _books(trader: Any, orders: Iterable[Any] | None = None) -> tuple[dict[str, float], dict[str, float], Any]:
    """(filled, both, orders) of a trader: the signed net lots of its open positions
    (``positions()`` with ``.lots``, flat ones left out), the same once ``orders`` fill (each
    with ``instrument``, ``side`` and ``lots``; by default the trader's ``pending()``, read after
    its positions, or none when it has no such method), and those orders."""
    filled = {k: float(p.lots) for k, p in trader.positions().items() if p.lots != 0.0}
    if orders is None:
        get = getattr(trader, "pending", None)
        orders = get() if get is not None else ()
    both = dict(filled)
    for o in orders:
        both[o.instrument] = both.get(o.instrument, 0.0) + o.side * float(o.lots)
    return filled, both, orders


def _book_entry(filled: float, both: float) -> tuple[tuple[float, float] | None, float]:
    """(pending, position) of one instrument from its filled net lots and its net lots once its
    pending orders fill: pending the pair (filled, both; a dust ``both`` as 0.0) when the two
    differ by more than dust, else None; position the larger in size (:func:`_worse`), which is
    no position when it is dust."""
    pair = (filled, both if abs(both) > _FLAT else 0.0) if abs(filled - both) > _FLAT else None
    return pair, _worse(filled, both)


def _book_view(filled: Mapping[str, float], both: Mapping[str, float]) -> tuple[dict[str, float],
                                                                                 dict[str, tuple[float, float]]]:
    """(positions, pending) of a :class:`Portfolio` from the filled net lots and the net lots
    once the pending orders fill, per instrument (:func:`_book_entry`): positions in the order
    of ``filled`` then ``both`` (the governor sums exposure in this order), dust left out, and
    pending the pair of each instrument where the two differ."""
    pend: dict[str, tuple[float, float]] = {}
    view: dict[str, float] = {}
    for k, f in filled.items():
        b = both.get(k, 0.0)
        pair, v = _book_entry(f, b)
        if pair is not None:
            pend[k] = pair
        if abs(f) > _FLAT or abs(b) > _FLAT:
            view[k] = v
    for k, b in both.items():
        if k not in filled:
            pair, v = _book_entry(0.0, b)
            if pair is not None:
                pend[k] = pair
            if abs(v) > _FLAT:
                view[k] = v
    return view, pend


class RiskGovernor:
    """Judges plans against :class:`RiskLimits` and the account's state.

    State it keeps itself: the equity peak, the day's opening equity and the worst loss of each
    of the last :data:`DAYS_KEPT` days (fed by :meth:`mark`), the losing streak (fed by
    :meth:`on_trade_result`) and the breaker. Deterministic: the same plans, marks and results in
    the same order give the same decisions.
    """

    def __init__(self, limits: RiskLimits | None = None, *, specs: Mapping[str, InstrumentSpec] | None = None,
                 equity: float | None = None) -> None:
        self.limits = limits if limits is not None else RiskLimits()
        self._specs = dict(specs or {})
        self._spec_cache: dict[str, InstrumentSpec] = {}
        self.peak = float(equity) if equity is not None else 0.0
        self.day = -1
        self._day_start = -DAY_NS  # self.day's first ns: a plan stamped before it is late
        self.day_open = float(equity) if equity is not None else 0.0
        self._day_low: float | None = None  # the lowest equity marked today (None: no mark yet)
        self._equity: float | None = float(equity) if equity is not None else None  # the last mark
        self._past_loss: dict[int, float] = {}  # day -> its worst loss in %, the last DAYS_KEPT marked
        self.halted = False
        self.streak = 0
        self.cooldown_until = -1
        self.now = -(2**63)
        self.counts: dict[str, int] = {"APPROVED": 0, "MODIFIED": 0, "REJECTED": 0}
        self.reasons: dict[str, int] = {}
        self._agg_of: Portfolio | None = None
        self._open_of: Portfolio | None = None
        self._open_key: tuple | None = None
        self._open_n = 0
        self._agg_key: tuple | None = None
        self._agg: tuple[float, dict[str, float], dict[str, float]] = (0.0, {}, {})
        self._inst_cache: dict[str, tuple[InstrumentSpec, tuple[tuple[str, float, str, str], ...], str]] = {}

    # ---- state fed by the trader ---------------------------------------------------------------

    def mark(self, ts: int, equity: float, opening: float | None = None) -> None:
        """Account equity at time ``ts`` (ns): moves the peak, the day's open and the breaker.

        A mark on a new UTC day opens that day at the equity before this mark's bars were filled:
        ``opening`` (the decision maker passes the trader's equity from before it filled them),
        else the last mark's equity (or the governor's starting equity). A loss on a day's first
        bar (every bar, on daily bars) so counts toward that day's loss. A mark stamped on an
        earlier day than the last one (a lagging stream's bar) is the equity of the day already
        open: it never reopens a day that has passed."""
        if not math.isfinite(equity):
            return
        prev = self._equity if opening is None or not math.isfinite(opening) else float(opening)
        self.now = max(self.now, int(ts))
        day = int(ts) // DAY_NS
        if day > self.day:
            low = self._day_low
            if low is not None and self.day_open > 0.0:  # the day left: kept for plans stamped on it
                past = self._past_loss
                loss = (self.day_open - low) / self.day_open * 100.0
                past[self.day] = max(past.get(self.day, loss), loss)
                if len(past) > DAYS_KEPT:
                    del past[min(past)]
            self.day = day
            self._day_start = day * DAY_NS
            self.day_open = prev if prev is not None else equity
            self._day_low = equity
        elif self._day_low is None or equity < self._day_low:
            self._day_low = equity
        self.peak = max(self.peak, equity)
        lim = self.limits.max_drawdown_pct
        if lim > 0.0 and self.peak > 0.0 and (self.peak - equity) / self.peak * 100.0 >= lim:
            self.halted = True
        self._equity = equity

    def on_trade_result(self, pnl: float, ts: int, timeframe: int) -> None:
        """A closed trade's net P&L: losses extend the streak; ``loss_streak`` in a row starts a
        cooldown of ``cooldown_bars`` bars of ``timeframe`` from ``ts``."""
        if pnl < 0.0:
            self.streak += 1
            if self.limits.loss_streak and self.streak >= self.limits.loss_streak:
                self.cooldown_until = max(self.cooldown_until,
                                          int(ts) + self.limits.cooldown_bars * int(timeframe) * 1_000_000_000)
                self.streak = 0
        elif pnl > 0.0:
            self.streak = 0

    def reset_breaker(self, equity: float | None = None) -> None:
        """Lift the drawdown breaker; the peak restarts at ``equity`` (default: the last mark)."""
        self.halted = False
        self.peak = float(equity) if equity is not None else (self._equity if self._equity is not None else self.peak)

    # ---- judging -------------------------------------------------------------------------------

    def _spec(self, name: str) -> InstrumentSpec:
        sp = self._spec_cache.get(name)
        if sp is None:
            sp = self._spec_cache[name] = instrument_spec(name, self._specs)
        return sp

    def _notional_per_lot(self, sp: InstrumentSpec, price: float, prices: Mapping[str, float]) -> float:
        if not price > 0.0:  # unknown (0.0) or bad: exposure cannot be valued
            raise KeyError(f"no price for {sp.name}")
        return sp.contract_size * price * quote_to_account(sp, price, self.limits.account, prices)

    def _aggregates(self, portfolio: Portfolio) -> tuple[float, dict[str, float], dict[str, float]]:
        """(gross notional, net notional per currency, signed notional per instrument) of the
        portfolio's positions, cached until the portfolio's ``version`` or identity changes."""
        # the object itself is kept (not its id, which a new object could reuse)
        key = (portfolio.version, portfolio.equity)
        if self._agg_of is portfolio and self._agg_key == key:
            return self._agg
        prices = portfolio.prices
        gross = 0.0
        ccy: dict[str, float] = {}
        per: dict[str, float] = {}
        for name, lots in portfolio.positions.items():
            if lots == 0.0:
                continue
            sp = self._spec(name)
            n2 = lots * self._notional_per_lot(sp, prices.get(name, 0.0), prices)  # KeyError: no route
            per[name] = n2
            gross += abs(n2)
            _add_ccy(ccy, sp, n2)
        self._agg_of, self._agg_key, self._agg = portfolio, key, (gross, ccy, per)
        return self._agg

    def apply(self, portfolio: Portfolio, instrument: str, lots: float) -> None:
        """Add ``lots`` (signed) to ``portfolio``'s position in ``instrument`` -- an order just
        placed -- keeping the cached exposure aggregates current instead of recomputing them."""
        self.set_position(portfolio, instrument, portfolio.positions.get(instrument, 0.0) + lots)

    def set_position(self, portfolio: Portfolio, instrument: str, new: float) -> None:
        """Set ``portfolio``'s position in ``instrument`` to ``new`` signed lots, keeping the
        cached exposure aggregates current (as :meth:`apply`)."""
        pos = portfolio.positions
        if abs(new) > 1e-12:
            pos[instrument] = new
        else:
            pos.pop(instrument, None)
        cached = self._agg_of is portfolio and self._agg_key == (portfolio.version, portfolio.equity)
        portfolio.version += 1
        if not cached:
            return
        gross, ccy, per = self._agg
        sp = self._spec(instrument)
        try:
            n_new = (new if instrument in pos else 0.0) * self._notional_per_lot(
                sp, portfolio.prices.get(instrument, 0.0), portfolio.prices)
        except (KeyError, ZeroDivisionError):
            self._agg_of = None  # recomputed (and refused) at the next evaluation
            return
        n_old = per.get(instrument, 0.0)
        gross += abs(n_new) - abs(n_old)
        _add_ccy(ccy, sp, n_new - n_old)
        if n_new:
            per[instrument] = n_new
        else:
            per.pop(instrument, None)
        self._agg = (gross, ccy, per)
        self._agg_key = (portfolio.version, portfolio.equity)

    def _n_open(self, portfolio: Portfolio) -> int:
        """Open positions in ``portfolio``, counted once per version."""
        key = (portfolio.version, len(portfolio.positions))
        if self._open_of is portfolio and self._open_key == key:
            return self._open_n
        n = sum(1 for v in portfolio.positions.values() if v != 0.0)
        self._open_of, self._open_key, self._open_n = portfolio, key, n
        return n

    def _late(self, plan: TradingPlan, eq: float) -> PlanDecision | None:
        """The daily loss check of a plan stamped on an earlier day than the governor's (it
        arrived after the day rolled): its order executes today, so today's loss counts, and so
        does the worst loss of its own day; a day not among the last :data:`DAYS_KEPT` marked
        cannot be checked, and the plan is refused."""
        lim = self.limits
        day = plan.ts // DAY_NS
        own = self._past_loss.get(day)
        if own is None:
            oldest = min(self._past_loss, default=self.day)
            return self._reject(plan, "daily_loss_unknown", float(oldest), float(day))
        loss = own
        if self.day_open > 0.0:
            today = (self.day_open - eq) / self.day_open * 100.0
            if today > loss:  # noqa: PLR1730
                loss = today
        if loss >= lim.daily_loss_pct:
            return self._reject(plan, "daily_loss_limit", lim.daily_loss_pct, loss)
        return None

    def _reject(self, plan: TradingPlan, code: str, limit: float, value: float) -> PlanDecision:
        # the common path (one reason, nothing resized): built directly
        keys = _KEYS.get(code)
        if keys is None:
            keys = _KEYS[code] = (code + ".limit", code + ".value", (code,))
        self.counts["REJECTED"] += 1
        reasons = self.reasons
        reasons[code] = reasons.get(code, 0) + 1
        return PlanDecision(plan_id=plan.plan_id, verdict="REJECTED", reasons=keys[2],
                            detail={keys[0]: float(limit), keys[1]: float(value)},
                            original_size=plan.size, plan=plan, ts=plan.ts)

    def _instrument(self, name: str, account: str) -> tuple[InstrumentSpec, tuple[tuple[str, float, str, str], ...], str]:
        """(spec, currency legs, account) of an instrument, cached: the legs are (code, sign,
        limit key, value key) of each currency the currency limit counts for it (the base +1,
        then the quote -1; neither the account's nor the instrument's own name)."""
        got = self._inst_cache.get(name)
        if got is not None and got[2] == account:
            return got
        sp = self._spec(name)
        legs = tuple((code, sign, f"resized_currency.{code}.limit", f"resized_currency.{code}.value")
                     for code, sign in ((sp.base, 1.0), (sp.quote, -1.0))
                     if code and code != account and code != sp.name)
        got = self._inst_cache[name] = (sp, legs, account)
        return got

    def evaluate(self, plan: TradingPlan, portfolio: Portfolio, *, providers_agreeing: int | None = None) -> PlanDecision:
        """The verdict on ``plan`` given ``portfolio``; counted in :attr:`counts` and :attr:`reasons`."""
        lim = self.limits
        eq = portfolio.equity
        # a plan the schema admits but no order can carry (direction 0 divided by zero below; a
        # NaN or negative size passed every `c < size` limit): refused, fail closed
        d = plan.direction
        if d != 1 and d != -1:
            return self._reject(plan, "invalid_plan", 1.0, float(d))
        if not (plan.size > 0.0 and plan.size < math.inf):
            return self._reject(plan, "invalid_plan", 0.0, float(plan.size))
        if self.halted:
            dd = (self.peak - eq) / self.peak * 100.0 if self.peak > 0 else 0.0
            return self._reject(plan, "halted_drawdown", lim.max_drawdown_pct, dd)
        ts = plan.ts
        if lim.daily_loss_pct > 0.0 and self.day == ts // DAY_NS and self.day_open > 0.0:
            loss = (self.day_open - eq) / self.day_open * 100.0
            if loss >= lim.daily_loss_pct:
                return self._reject(plan, "daily_loss_limit", lim.daily_loss_pct, loss)
        elif ts < self._day_start and lim.daily_loss_pct > 0.0:  # stamped before today: late
            late = self._late(plan, eq)
            if late is not None:
                return late
        if ts < self.cooldown_until:
            return self._reject(plan, "cooldown", float(self.cooldown_until), float(ts))
        # `not >=`: a NaN signal value fails the guardrail rather than passing every comparison
        if not plan.confidence >= lim.min_confidence:
            return self._reject(plan, "min_confidence", lim.min_confidence, plan.confidence)
        if not plan.agreement >= lim.min_agreement:
            return self._reject(plan, "min_agreement", lim.min_agreement, plan.agreement)
        if lim.min_providers_agree:
            agreeing = plan.providers_agreeing if providers_agreeing is None else providers_agreeing
            if agreeing < lim.min_providers_agree:
                return self._reject(plan, "min_providers_agree", lim.min_providers_agree, agreeing)
        if lim.min_dsi_validation > -1.0 and "dsi" in plan.evidence:
            v = plan.evidence["dsi"]
            if not v >= lim.min_dsi_validation:
                return self._reject(plan, "dsi_disagrees", lim.min_dsi_validation, v)
        if plan.valid_until < self.now:
            return self._reject(plan, "expired", float(plan.valid_until), float(self.now))
        if portfolio.pending_plans and plan.plan_id in portfolio.pending_plans:
            return self._reject(plan, "duplicate_plan", 0.0, 0.0)

        name = plan.instrument
        held = portfolio.positions.get(name, 0.0)
        d = plan.direction
        views = portfolio.pending.get(name) if portfolio.pending else None
        if views is None:
            if held * d > 0.0 and not lim.allow_pyramiding:
                return self._reject(plan, "position_open", 0.0, held)
            if lim.max_open_positions and held == 0.0:
                n_open = self._n_open(portfolio)
                if n_open + 1 > lim.max_open_positions:
                    return self._reject(plan, "max_open_positions", lim.max_open_positions, n_open + 1)
        else:
            # orders on this instrument wait to fill: the plan must pass from the filled position
            # and from the position once they fill (and from `held`, the larger of the two)
            helds = tuple(dict.fromkeys(h if abs(h) > _FLAT else 0.0 for h in (held, *views)))
            held = helds[0]
            if not lim.allow_pyramiding:
                for h in helds:
                    if h * d > 0.0:
                        return self._reject(plan, "position_open", 0.0, h)
            if lim.max_open_positions and 0.0 in helds:
                # a new position where one of the books is flat; every other instrument counts
                # where it is open in either book (as in `positions`)
                n_open = self._n_open(portfolio) + (held == 0.0)
                if n_open > lim.max_open_positions:
                    return self._reject(plan, "max_open_positions", lim.max_open_positions, n_open)

        if not (eq > 0.0 and eq < math.inf):  # every limit is a multiple of equity: none can hold
            return self._reject(plan, "no_equity", 0.0, eq)
        account = lim.account
        inst = self._inst_cache.get(name)
        if inst is None or inst[2] != account:
            inst = self._instrument(name, account)
        sp = inst[0]
        prices = portfolio.prices
        try:
            # the notional of one lot (_notional_per_lot, inline)
            price = prices.get(name, plan.entry)
            if not price > 0.0:  # unknown (0.0) or bad: exposure cannot be valued
                raise KeyError(name)
            # (quote_to_account is exactly 1.0 for an instrument quoted in the account currency)
            per_lot = sp.contract_size * price * (1.0 if sp.quote == account
                                                  else quote_to_account(sp, price, account, prices))
            if self._agg_of is portfolio and self._agg_key == (portfolio.version, eq):
                gross_all, ccy_all, per_inst = self._agg
            else:
                gross_all, ccy_all, per_inst = self._aggregates(portfolio)
        except (KeyError, ZeroDivisionError):
            return self._reject(plan, "no_conversion", 0.0, 0.0)
        if not (per_lot > 0.0 and per_lot < math.inf):  # a lot valued at nothing (or at inf) fits any limit
            return self._reject(plan, "no_conversion", 0.0, per_lot)
        reasons: list[str] = []
        detail: dict[str, float] = {}
        rs, dt = reasons, detail  # the first book's; a later book's are merged in
        size = plan.size
        cap = math.inf
        own = per_inst.get(name, 0.0)
        n_book = 0
        while True:  # once per book (helds): once but for orders waiting to fill on this instrument
            # the position after the fill: what is held plus the plan (an opposite plan nets)
            after = abs(held + d * size)
            hd = held * d
            # (min(a, b) and max(a, b) below are written out as the builtins decide: the first
            # argument unless the second is strictly smaller / larger)
            if lim.max_instrument_leverage:
                c = lim.max_instrument_leverage * eq / per_lot - hd  # |held + d*x| <= room
                if c < size:
                    rs.append("resized_instrument")
                    dt["resized_instrument.limit"] = lim.max_instrument_leverage
                    dt["resized_instrument.value"] = after * per_lot / eq
                    if c < cap:  # noqa: PLR1730
                        cap = c
            if lim.max_leverage:
                gross = gross_all - abs(own)  # the other positions
                # room for this position: the limit's, or what it holds now when that is more (a
                # plan that does not raise the gross is never refused for it)
                room = (lim.max_leverage * eq - gross) / per_lot
                a_held = abs(held)
                if a_held > room:  # noqa: PLR1730 (max(), without the call)
                    room = a_held
                c = room - hd
                if c < size:
                    rs.append("resized_leverage")
                    dt["resized_leverage.limit"] = lim.max_leverage
                    dt["resized_leverage.value"] = (gross + after * per_lot) / eq
                    if c < cap:  # noqa: PLR1730
                        cap = c
            if lim.max_currency_leverage:
                legs = inst[1]
                if legs:
                    limit = lim.max_currency_leverage * eq
                    for code, sign, k_limit, k_value in legs:
                        other = ccy_all.get(code, 0.0) - sign * own  # without this instrument's position
                        # net exposure to `code` after the fill: other + sign * per_lot * (held + d*x);
                        # the largest x >= 0 in the plan's direction that keeps |...| <= limit
                        k = sign * d * per_lot
                        base = other + sign * per_lot * held
                        x = (limit - base) / k if k > 0 else (-limit - base) / k
                        if x < size:
                            if "resized_currency" not in rs:  # one reason for however many legs
                                rs.append("resized_currency")
                            dt[k_limit] = lim.max_currency_leverage
                            dt[k_value] = abs(base + k * size) / eq
                            if x < cap:  # noqa: PLR1730
                                cap = x
            if views is None:
                break
            if n_book:  # a later book: its reasons join the first's, each number at its worse
                for r in rs:
                    if r not in reasons:
                        reasons.append(r)
                for key, v in dt.items():
                    if not detail.get(key, -math.inf) >= v:
                        detail[key] = v
            n_book += 1
            if n_book == len(helds):
                break
            held = helds[n_book]
            rs, dt = [], {}
        counts, seen = self.counts, self.reasons
        if cap < size:
            floor = 0.0 if 0.0 > cap else cap  # noqa: FURB136 (max(cap, 0.0))
            new = sp.round_lots(floor) if floor > 0.0 else 0.0  # (what round_lots gives for <= 0)
            if new <= 0.0:
                reasons.append("below_min_lot")
                detail["below_min_lot.limit"] = sp.min_lot
                detail["below_min_lot.value"] = floor
                verdict, out = "REJECTED", plan
            else:
                verdict, out = "MODIFIED", _replace(plan, size=new, risk_amount=plan.risk_amount * new / size)
        else:
            verdict, out = "APPROVED", plan
        counts[verdict] += 1
        for r in reasons:
            seen[r] = seen.get(r, 0) + 1
        # one tuple per combination of reasons, shared by the verdicts that give it (every verdict
        # is kept: a tuple each adds up)
        got = tuple(reasons)
        shared = _REASONS.get(got)
        if shared is None:
            shared = got
            if len(_REASONS) < 4096:
                _REASONS[got] = got
        return PlanDecision(plan_id=plan.plan_id, verdict=verdict, reasons=shared, detail=detail,
                            original_size=size, plan=out, ts=ts)

    def stats(self) -> dict[str, Any]:
        return {"decisions": dict(self.counts), "reasons": dict(sorted(self.reasons.items())),
                "halted": self.halted, "peak": self.peak, "streak": self.streak,
                "cooldown_until": self.cooldown_until}


_KEYS: dict[str, tuple[str, str, tuple[str]]] = {}
_REASONS: dict[tuple[str, ...], tuple[str, ...]] = {}
_replace = msgspec.structs.replace


def _add_ccy(acc: dict[str, float], sp: InstrumentSpec, notional: float) -> None:
    """Signed net exposure per currency: long base, short quote."""
    if sp.base:
        acc[sp.base] = acc.get(sp.base, 0.0) + notional
    if sp.quote:
        acc[sp.quote] = acc.get(sp.quote, 0.0) - notional
