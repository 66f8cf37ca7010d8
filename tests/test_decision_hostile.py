"""The decision layer against hostile input and long runs: every case a review found, each
checked against a plain-Python oracle or an explicit scenario."""

from __future__ import annotations

import math

import dynamic_core as dc
import msgspec
import numpy as np
import pytest
from dynamic_core.bridges.paper import CostModel, PaperBroker
from dynamic_core.decision import (
    DecisionMaker,
    InstrumentSpec,
    PlanConfig,
    Portfolio,
    RiskGovernor,
    RiskLimits,
    load_decision_config,
    make_plan,
    time_steps,
)
from dynamic_core.decision.plans import size_batch, valid_until_fits
from dynamic_core.decision.specs import MIN_LOT_STEP
from dynamic_core.payloads import AISignal

H1 = 3600
T0 = 1_704_067_200_000_000_000  # 2024-01-01 00:00 UTC
NO_LIMITS = RiskLimits(max_open_positions=0, max_instrument_leverage=0, max_currency_leverage=0, max_leverage=0,
                       daily_loss_pct=0, max_drawdown_pct=0, loss_streak=0, allow_pyramiding=True)


def ai_signal(instrument="EURUSD", action=1, *, ts=T0, timeframe=H1, confidence=0.9, agreement=0.9):
    return AISignal(ts=ts, instrument=instrument, timeframe=timeframe, seq=1, population_hash=1, score=0.4,
                    confidence=confidence, agreement=agreement, dispersion=0.1, action=action, n_agents=8,
                    votes=(0, 0, 1, 6, 1))


def signals(instrument, ts, *, action=1, n=1, timeframe=H1, confidence=0.9, agreement=0.9, dsi=None):
    s = np.zeros(n, dtype=dc.SIGNAL_DTYPE)
    s["instrument"], s["timeframe"], s["ts"], s["action"], s["seq"] = instrument, timeframe, ts, action, np.arange(n)
    s["confidence"], s["agreement"] = confidence, agreement
    if dsi is not None:
        s["dsi"], s["flags"] = dsi, dc.SIGNAL_DSI
    return s


@pytest.fixture(scope="module")
def eu_bars():
    return dc.sim.MarketSimulator(["EURUSD"], seed=2).bars(60)


# ---- 1. a pending order never frees a slot or exposure ------------------------------------------------

def test_a_pending_close_does_not_free_a_max_open_positions_slot():
    # every plan is exactly 1 lot; EURUSD's bar at t41 is missing, so the order closing its long
    # (valid one bar) expires unfilled. The slot it would have freed must not have been given away.
    one_lot = {n: InstrumentSpec(name=n, base=n[:3], quote="USD", lot_step=1.0, min_lot=1.0, max_lot=1.0)
               for n in ("EURUSD", "GBPUSD")}
    bars = dc.sim.MarketSimulator(["EURUSD", "GBPUSD"], seed=2).bars(45)
    eu, gb = dc.instruments.id("EURUSD"), dc.instruments.id("GBPUSD")
    bars = bars[~((bars["instrument"] == eu) & (bars["ts"] == np.unique(bars["ts"])[41]))]
    m = DecisionMaker(PaperBroker(equity=1e8, specs=one_lot), specs=one_lot, plan=PlanConfig(stop_atr=20.0),
                      limits=RiskLimits(max_open_positions=1))
    verdicts = {}
    for k, step in enumerate(time_steps(bars)):
        m.on_bars(step)
        ts = int(step["ts"][0])
        if k == 39:
            verdicts["long EURUSD"] = m.on_signals(signals(eu, ts, action=1))[0]
        if k == 40:
            verdicts["close EURUSD"] = m.on_signals(signals(eu, ts, action=-1))[0]
            # the governor still sees the long: the close has not filled
            assert m._positions() == {"EURUSD": 1.0} and m.trader.net_lots(pending=True) == {}
            verdicts["long GBPUSD"] = m.on_signals(signals(gb, ts, action=1))[0]
        assert len(m.trader.positions()) <= 1, k
    assert verdicts["long EURUSD"].verdict == verdicts["close EURUSD"].verdict == "APPROVED"
    assert verdicts["long GBPUSD"].reasons == ("max_open_positions",)
    assert m.trader.order_status(verdicts["close EURUSD"].plan_id) == "expired"
    assert {k: p.lots for k, p in m.trader.positions().items()} == {"EURUSD": 1.0}


def test_pending_orders_only_add_to_what_the_governor_sees():
    class Book:  # a trader as seen by the maker: filled net lots and pending orders
        equity = 1e5

        def __init__(self, filled, pending):
            self.filled, self.pend = filled, pending

        def on_trade(self, cb):
            pass

        def net_lots(self, *, pending=False):
            out = dict(self.filled)
            if pending:
                for k, v in self.pend.items():
                    out[k] = out.get(k, 0.0) + v
            return {k: v for k, v in out.items() if v != 0.0}

    m = DecisionMaker(Book({"EURUSD": 2.0, "GBPUSD": -1.0, "XAUUSD": 1.0},
                           {"EURUSD": -2.0, "GBPUSD": -1.0, "XAUUSD": -3.0, "USDJPY": 0.5}))
    # oracle: per instrument the larger in size of filled and filled + pending
    assert m._positions() == {"EURUSD": 2.0, "GBPUSD": -2.0, "XAUUSD": -2.0, "USDJPY": 0.5}


def _long_then_sells(limits, sells, *, again=False, long_lots=1.0, eur2_short=False):
    """EURUSD (lots of 1, at most 2): a long of ``long_lots`` placed at bar 38 (filled at 39's
    open), then ``sells`` sell signals in one call at bar 39 (filled at 40's open) -- the same
    signals twice with ``again``; with ``eur2_short``, a 2-lot short of EUR2 (a EUR/USD contract
    of 1,000 EUR at ~100) from bar 37. Returns the maker, the sells' verdicts and EURUSD's
    position at bar 40."""
    spec = {"EURUSD": InstrumentSpec(name="EURUSD", base="EUR", quote="USD", lot_step=1.0, min_lot=1.0, max_lot=2.0),
            "EUR2": InstrumentSpec(name="EUR2", base="EUR", quote="USD", contract_size=1000.0, lot_step=1.0,
                                   min_lot=1.0, max_lot=2.0)}
    bars = dc.sim.MarketSimulator(["EURUSD", "EUR2"], seed=2).bars(41)
    eu = dc.instruments.id("EURUSD")
    m = DecisionMaker(PaperBroker(equity=1e8, specs=spec), specs=spec, plan=PlanConfig(stop_atr=20.0), limits=limits)

    def place(name, direction, lots, step):
        close = float(step["close"][step["instrument"] == dc.instruments.id(name)][0])
        p = make_plan(ai_signal(name, direction, ts=int(step["ts"][0])), entry=close, atr=close / 1000, equity=1e8,
                      config=PlanConfig(stop_atr=20.0), spec=spec[name])
        assert m.decide(msgspec.structs.replace(p, size=lots)).verdict == "APPROVED"

    verdicts = []
    for k, step in enumerate(time_steps(bars)):
        m.on_bars(step)
        if k == 37 and eur2_short:
            place("EUR2", -1, 2.0, step)
        if k == 38:
            place("EURUSD", 1, long_lots, step)
        if k == 39:
            assert m.trader.net_lots().get("EURUSD") == long_lots
            s = signals(eu, int(step["ts"][0]), action=-1, n=sells)
            verdicts += m.on_signals(s)
            if again:
                verdicts += m.on_signals(s)
    return m, verdicts, m.trader.positions().get("EURUSD")


def test_a_second_sell_while_a_reversal_is_pending_is_judged_from_both_books():
    # long 1 filled; the first sell (2 lots) reverses it, waiting for the next open (short 1 once
    # it fills); the second sell was judged against the filled long alone -- as a close -- and
    # approved: both filled into a 3-lot short of two plans, pyramiding that allow_pyramiding=False forbids
    _, (first, second), pos = _long_then_sells(RiskLimits(), 2)
    assert first.verdict == "APPROVED" and first.plan.size == 2.0
    assert second.verdict == "REJECTED" and second.reasons == ("position_open",)
    assert second.detail["position_open.value"] == -1.0  # the book once the reversal fills
    assert pos.lots == -1.0 and [leg.plan_id for leg in pos.legs] == [first.plan_id]


def test_a_second_sell_while_a_close_is_pending_must_fit_as_a_new_short():
    # EUR exposure: EUR2 short 2 (-2 x 1,000 x ~100 = -200k), EURUSD long 2 (+2 x 100,000 x ~1.07 =
    # +214k); the limit 0.0025 x 1e8 = 250k either way. The first sell (2 lots) closes the long,
    # waiting; the second, judged as closing the same long (EUR ~+14k - 107k x 2), was approved and
    # left EUR at ~-414k once both filled. Judged from the flat book too it is a new short, room
    # for (250k - 200k) / 107k = 0.47 lots: under the minimum lot
    lim = RiskLimits(max_currency_leverage=0.0025, max_instrument_leverage=0, max_leverage=0)
    m, (first, second), pos = _long_then_sells(lim, 2, long_lots=2.0, eur2_short=True)
    assert first.verdict == "APPROVED" and first.plan.size == 2.0
    assert second.verdict == "REJECTED" and second.reasons == ("resized_currency", "below_min_lot")
    assert pos is None
    # the limit holds on the books as they are (prices of the last bar)
    eur = sum(p.lots * (1000.0 if n == "EUR2" else 100_000.0) * m.prices[n] for n, p in m.trader.positions().items())
    assert abs(eur) <= 0.0025 * m.trader.equity


def test_a_plan_whose_order_waits_is_not_approved_twice():
    # the same sell signal twice before its order fills: it closes the long once; judged again
    # against the filled long it was approved again (and answered "duplicate" by the broker)
    m, verdicts, pos = _long_then_sells(RiskLimits(), 1, again=True, long_lots=2.0)
    first, again = verdicts
    assert first.verdict == "APPROVED" and again.plan_id == first.plan_id
    assert again.verdict == "REJECTED" and again.reasons == ("duplicate_plan",)
    assert pos is None and m.stats()["decisions"] == {"APPROVED": 2, "MODIFIED": 0, "REJECTED": 1}
    assert [f.kind for f in m.trader.fills] == ["entry", "close"]


def test_no_position_ever_pyramids_through_orders_waiting_to_fill():
    # three signals per instrument per bar, random sides: with pyramiding off every position is
    # one plan's leg at every bar, and max_open_positions holds (the old single-book view let a
    # second sell through while a first one reversed the position)
    names = ["EURUSD", "GBPUSD", "USDJPY"]
    bars = dc.sim.MarketSimulator(names, seed=5).bars(400)
    ids = [dc.instruments.id(n) for n in names]
    m = DecisionMaker(PaperBroker(), limits=NO_LIMITS.__class__(
        **{**msgspec.structs.asdict(NO_LIMITS), "allow_pyramiding": False, "max_open_positions": 2}))
    rng = np.random.default_rng(8)
    refused = 0
    for k, step in enumerate(time_steps(bars)):
        m.on_bars(step)
        for pos in m.trader.positions().values():
            assert len(pos.legs) == 1, (k, pos)
        assert len(m.trader.positions()) <= 2
        if k >= 20:
            s = np.concatenate([signals(i, int(step["ts"][0]), action=int(rng.choice([-1, 1])), n=1)
                                for i in ids for _ in range(3)])
            s["seq"] = np.arange(len(s)) + 10 * k
            refused += sum(v.reasons[:1] == ("position_open",) for v in m.on_signals(s))
    assert refused > 100 and m.stats()["trades"] > 50


# ---- 2 + 6. the governor fails closed on NaN and on no equity -----------------------------------------

@pytest.mark.parametrize("field, reason", [("confidence", "min_confidence"), ("agreement", "min_agreement")])
def test_nan_guardrail_inputs_are_rejected(field, reason):
    p = make_plan(ai_signal("GBPUSD"), entry=1.27, atr=0.002, equity=1e5)
    g = RiskGovernor(RiskLimits(min_confidence=0.5, min_agreement=0.5))
    pf = Portfolio(equity=1e5, prices={"GBPUSD": 1.27})
    assert g.evaluate(p, pf).verdict == "APPROVED"
    d = g.evaluate(msgspec.structs.replace(p, **{field: math.nan}), pf)
    assert d.verdict == "REJECTED" and d.reasons == (reason,)
    # the default limit (0) rejects NaN too: NaN is no confidence at all
    assert RiskGovernor().evaluate(msgspec.structs.replace(p, **{field: math.nan}), pf).reasons == (reason,)


@pytest.mark.parametrize("kw, reason", [({"confidence": math.nan}, "min_confidence"),
                                        ({"agreement": math.nan}, "min_agreement"),
                                        ({"dsi": math.nan}, "dsi_disagrees")])
def test_nan_signal_values_are_rejected_through_the_maker(eu_bars, kw, reason):
    m = DecisionMaker(PaperBroker(), limits=RiskLimits(min_confidence=0.5, min_agreement=0.5, min_dsi_validation=0.0))
    m.on_bars(eu_bars)
    ts = int(eu_bars["ts"][-1])
    ok = m.on_signals(signals(dc.instruments.id("EURUSD"), ts, dsi=0.5))[0]
    assert ok.verdict == "APPROVED"
    d = m.on_signals(signals(dc.instruments.id("EURUSD"), ts, **{"dsi": 0.5, **kw}))[0]
    assert d.verdict == "REJECTED" and d.reasons == (reason,)


@pytest.mark.parametrize("equity", [0.0, -1e5, math.nan, math.inf])
def test_no_equity_rejects_instead_of_skipping_every_exposure_limit(equity):
    p = make_plan(ai_signal("GBPUSD"), entry=1.27, atr=0.00001, equity=1e6)  # 100 lots: 127x 100k
    lim = RiskLimits(max_drawdown_pct=0, daily_loss_pct=0)
    prices = {"EURUSD": 1.08, "GBPUSD": 1.27}
    good = RiskGovernor(lim).evaluate(p, Portfolio(equity=1e5, positions={"EURUSD": 100.0}, prices=prices))
    assert good.verdict == "REJECTED" and good.reasons[-1] == "below_min_lot"  # the limits bind
    d = RiskGovernor(lim).evaluate(p, Portfolio(equity=equity, positions={"EURUSD": 100.0}, prices=prices))
    assert d.verdict == "REJECTED" and d.reasons == ("no_equity",)


# ---- 3. config Structs built in Python are checked as decoding checks them ----------------------------

BAD_FIELDS = [
    (RiskLimits, "max_leverage", math.nan), (RiskLimits, "max_instrument_leverage", math.nan),
    (RiskLimits, "max_currency_leverage", math.inf), (RiskLimits, "max_drawdown_pct", -5.0),
    (RiskLimits, "daily_loss_pct", math.nan), (RiskLimits, "max_open_positions", -1),
    (RiskLimits, "max_open_positions", "3"), (RiskLimits, "min_confidence", 1.5),
    (RiskLimits, "min_dsi_validation", -2.0), (RiskLimits, "account", "US"), (RiskLimits, "allow_pyramiding", 1),
    (PlanConfig, "stop_atr", 0.0), (PlanConfig, "stop_atr", -2.0), (PlanConfig, "risk_pct", math.nan),
    (PlanConfig, "risk_pct", -1.0), (PlanConfig, "targets_r", (1.5, math.inf)), (PlanConfig, "targets_r", (0.0,)),
    (PlanConfig, "valid_bars", 0), (PlanConfig, "atr_period", 1.5),
    (InstrumentSpec, "lot_step", 0.0), (InstrumentSpec, "lot_step", -0.01), (InstrumentSpec, "lot_step", 1e-320),
    (InstrumentSpec, "contract_size", math.inf), (InstrumentSpec, "max_lot", math.nan),
    (InstrumentSpec, "tick_size", 0.0), (InstrumentSpec, "digits", 13),
]


@pytest.mark.parametrize("cls, field, value", BAD_FIELDS)
def test_config_structs_refuse_bad_fields_when_built_and_when_decoded(cls, field, value):
    base = {"name": "EURUSD"} if cls is InstrumentSpec else {}
    with pytest.raises(ValueError, match=field):
        cls(**base, **{field: value})
    with pytest.raises(ValueError, match=field):
        msgspec.structs.replace(cls(**base), **{field: value})
    with pytest.raises(msgspec.ValidationError):  # a ValueError too
        msgspec.convert({**base, field: value}, cls)


def test_config_structs_take_their_documented_values():
    assert RiskLimits(max_leverage=0, max_open_positions=0).max_leverage == 0
    assert PlanConfig(stop_atr=0.5, targets_r=(), valid_bars=10_000).targets_r == ()
    assert InstrumentSpec(name="X", lot_step=MIN_LOT_STEP, min_lot=MIN_LOT_STEP).lot_step == 1e-9
    assert RiskLimits(max_leverage=np.float64(5.0), max_open_positions=np.int64(3)).max_open_positions == 3


def test_the_batch_and_make_plan_agree_on_refusing_a_stop_distance_of_zero():
    # 2 x 5e-324 rounds to a distance of 0 (or of 5e-324 that leaves stop == entry); 1e-20 is lost
    # in 1.1: each row used to be a plan of max_lot lots with the stop at the entry (or raised)
    cfg = PlanConfig()
    atr = np.array([5e-324, 1e-20, 0.002])
    entry = np.full(3, 1.1)
    one = np.ones(3)
    _, stop, size, _, ok = size_batch(cfg, entry, atr, np.ones(3, dtype=np.int64), one * 1e5, one, one * 0.01,
                                      one * 100, one * 0.01, one * 100, 1e5)
    assert ok.tolist() == [False, False, True]
    for a, want in zip(atr.tolist(), ok.tolist()):
        p = make_plan(ai_signal(), entry=1.1, atr=a, equity=1e5, config=cfg)
        assert (p is not None) == want
        if p is not None:
            assert p.stop < p.entry and p.size == size[2] and p.stop == stop[2]


# ---- 4. bars the trader refuses never reach the ATR ---------------------------------------------------

def _bad(bars, i, **cols):
    b = bars[i:i + 1].copy()
    for k, v in cols.items():
        b[k] = v
    return b


@pytest.mark.parametrize("case, reason", [
    ("nan_high", "non_finite"), ("inf_high", "non_finite"), ("nan_open", "non_finite"),
    ("high_below_low", "bad_range"), ("high_below_close", "bad_range"), ("low_above_open", "bad_range"),
    ("duplicate", "out_of_order"), ("older", "out_of_order"), ("unknown_id", "unknown_instrument"),
    ("zero_bar", "non_positive_price"), ("negative_low", "non_positive_price"),
    ("absurd_high", "price_out_of_range"), ("tiny_low", "price_out_of_range")])
def test_a_refused_bar_moves_neither_atr_nor_price(case, reason):
    bars = dc.sim.MarketSimulator(["EURUSD"], seed=2).bars(300)
    eu, tf = dc.instruments.id("EURUSD"), int(bars["timeframe"][0])
    b = bars[30]
    bad = {
        "nan_high": lambda: _bad(bars, 30, high=math.nan),
        "inf_high": lambda: _bad(bars, 30, high=math.inf),
        "nan_open": lambda: _bad(bars, 30, open=math.nan),
        "high_below_low": lambda: _bad(bars, 30, high=b["low"] - 0.05),
        "high_below_close": lambda: _bad(bars, 30, high=b["close"] - 1e-4, low=b["low"] - 1.0),
        "low_above_open": lambda: _bad(bars, 30, low=b["open"] + 1e-4, high=b["high"] + 1.0),
        "duplicate": lambda: _bad(bars, 29, close=b["close"] * 3, high=b["close"] * 3),
        "older": lambda: _bad(bars, 10, close=5.0, high=5.0),
        "unknown_id": lambda: _bad(bars, 30, instrument=len(dc.instruments) + 7, close=9.0, high=9.0),
        "zero_bar": lambda: _bad(bars, 30, open=0.0, high=0.0, low=0.0, close=0.0),  # an ATR of ~1.1 in one bar
        "negative_low": lambda: _bad(bars, 30, low=-1.0),
        "absurd_high": lambda: _bad(bars, 30, high=1e300, close=1e300),  # the engine refuses it too
        "tiny_low": lambda: _bad(bars, 30, low=1e-300),
    }[case]()
    ref, m = DecisionMaker(PaperBroker()), DecisionMaker(PaperBroker())
    for x in (ref, m):
        x.on_bars(bars[:30])
    m.on_bars(bad)
    assert m.atr._state == ref.atr._state and m.prices == ref.prices
    for step in time_steps(bars[30:]):  # one step at a time, as a session feeds them
        for x in (ref, m):
            x.on_bars(step)
    # oracle: the maker that never saw the bad bar, bit for bit
    assert m.atr.value(eu, tf) == ref.atr.value(eu, tf) and math.isfinite(m.atr.value(eu, tf))
    assert m.prices == ref.prices and m.governor.now == ref.governor.now
    assert m.stats()["skipped_bars"] == {reason: 1} and ref.stats()["skipped_bars"] == {}
    assert m.trader.stats()["ignored_bars"] == {reason: 1}  # the trader refused the same bar


def test_out_of_order_is_per_stream():
    bars = dc.sim.MarketSimulator(["EURUSD"], seed=2).bars(40)
    m = DecisionMaker(PaperBroker())
    m.on_bars(bars[:20])
    other = bars[19:20].copy()
    other["timeframe"] = 4 * H1  # the same time on another timeframe is another stream
    m.on_bars(other)
    assert m.stats()["skipped_bars"] == {} and (int(other["instrument"][0]), 4 * H1) in m.atr._state


# ---- 5. unknown instrument ids are skipped and counted, nothing half done -----------------------------

def test_unknown_instrument_ids_are_skipped_and_counted(eu_bars):
    m = DecisionMaker(PaperBroker())
    m.on_bars(eu_bars)
    before = (dict(m.atr._state), dict(m.prices), m.governor.now, m.no_plan)
    bad = eu_bars[-1:].copy()
    bad["instrument"] = len(dc.instruments) + 9999
    bad["ts"] += 3600 * 10**9
    m.on_bars(bad)
    assert (dict(m.atr._state), dict(m.prices), m.governor.now, m.no_plan) == before
    mixed = np.concatenate([signals(len(dc.instruments) + 9999, int(eu_bars["ts"][-1]), n=2),
                            signals(dc.instruments.id("EURUSD"), int(eu_bars["ts"][-1]))])
    out = m.on_signals(mixed)
    assert [d.plan.instrument for d in out] == ["EURUSD"] and len(m.decisions) == 1
    st = m.stats()
    assert st["skipped_bars"] == {"unknown_instrument": 1} and st["skipped_signals"] == {"unknown_instrument": 2}


def test_negative_instrument_ids_are_unknown_not_the_last_instrument(eu_bars):
    # records with a signed id column: -1 indexed the instrument table from its end, so a BUY of
    # "instrument -1" traded the last registered instrument
    dc.instruments.id("GBPUSD")
    signed_bar = np.dtype([(n, "<i8" if n == "instrument" else eu_bars.dtype[n]) for n in eu_bars.dtype.names])
    m = DecisionMaker(PaperBroker())
    m.on_bars(eu_bars)
    before = (dict(m.atr._state), dict(m.prices))
    bad = eu_bars[-1:].astype(signed_bar)
    bad["instrument"] = -1
    bad["ts"] += 3600 * 10**9
    m.on_bars(bad)
    assert (dict(m.atr._state), dict(m.prices)) == before
    sig = signals(dc.instruments.id("EURUSD"), int(eu_bars["ts"][-1]), n=2)
    signed_sig = np.dtype([(n, "<i8" if n == "instrument" else sig.dtype[n]) for n in sig.dtype.names])
    neg = sig.astype(signed_sig)
    neg["instrument"] = -1
    assert m.on_signals(neg) == [] and m.decisions == []
    st = m.stats()
    assert st["skipped_bars"] == {"unknown_instrument": 1} and st["skipped_signals"] == {"unknown_instrument": 2}
    floats = np.dtype([(n, "<f8" if n == "instrument" else sig.dtype[n]) for n in sig.dtype.names])
    with pytest.raises(TypeError, match="instrument field must be an integer"):
        m.on_signals(sig.astype(floats))


# ---- 7. bounded history -------------------------------------------------------------------------------

def test_verdicts_and_plans_are_bounded_and_counted(eu_bars):
    m = DecisionMaker(PaperBroker(), limits=RiskLimits(min_confidence=0.95), history=1000)
    m.on_bars(eu_bars)
    s = signals(dc.instruments.id("EURUSD"), int(eu_bars["ts"][-1]), n=5000)
    seen = []
    for _ in range(3):
        n0 = m.decision_count
        seen += m.on_signals(s)
        assert m.decisions_since(n0)[-1] is seen[-1]
        assert len(m.decisions) <= 1000 + 1000 // 8
    assert m.decisions == seen[-len(m.decisions):] and len(m.decisions) >= 1000
    st = m.stats()
    assert st["plans"] == m.decision_count == 15_000 == len(m.decisions) + st["dropped"]["decisions"]
    with pytest.raises(ValueError, match="history"):
        DecisionMaker(PaperBroker(), history=0)


def test_plans_of_open_positions_are_never_dropped():
    names = ["EURUSD", "GBPUSD", "USDJPY", "XAUUSD"]
    bars = dc.sim.MarketSimulator(names, seed=5).bars(400)
    ids = [dc.instruments.id(n) for n in names]
    rng = np.random.default_rng(3)
    m = DecisionMaker(PaperBroker(), limits=NO_LIMITS, plan=PlanConfig(stop_atr=3.0, targets_r=(4.0,)), history=8)
    full = DecisionMaker(PaperBroker(), limits=NO_LIMITS, plan=PlanConfig(stop_atr=3.0, targets_r=(4.0,)),
                         history=None)
    for step in time_steps(bars):
        sig = signals(ids, int(step["ts"][0]), n=len(ids))
        sig["instrument"] = ids
        sig["action"] = rng.choice([-1, 1], len(ids))
        for x in (m, full):
            x.on_bars(step)
            x.on_signals(sig)
    st, ref = m.stats(), full.stats()
    assert st["dropped"]["plans"] > 100 and st["dropped"]["attributions"] > 0 and ref["dropped"]["plans"] == 0
    # the same run, whatever is kept: every closed trade found its plan (no empty signal ids)
    assert st["trades"] == ref["trades"] > 100 and st["pnl"] == ref["pnl"]
    assert m.attributions == full.attributions[-len(m.attributions):]
    assert all(a.signal_id for a in full.attributions)
    live = {leg.plan_id for p in m.trader.positions().values() for leg in p.legs}
    live |= {o.plan_id for o in m.trader.pending()}
    assert live and live <= m.plans.keys()
    assert len(m.plans) <= max(8, len(live)) + 1 + 8 // 8


# ---- 8. make_plan and the maker never raise arithmetic errors -----------------------------------------

@pytest.mark.parametrize("kw", [
    {"equity": math.inf}, {"equity": math.nan}, {"equity": -1.0}, {"atr": 5e-324}, {"atr": math.inf},
    {"entry": math.inf}, {"s": "EURJPY", "prices": {"USDJPY": math.inf}},
    {"s": "EURJPY", "prices": {"USDJPY": math.nan}}, {"s": "EURJPY", "prices": {"USDJPY": -150.0}},
    {"s": "EURJPY", "prices": {"USDJPY": 5e-324}}, {"s": "EURJPY", "prices": {"JPYUSD": 0.0}},
    {"s": "USDJPY", "entry": 5e-324, "atr": 1e-325}])
def test_make_plan_refuses_unusable_numbers_without_raising(kw):
    kw = {"entry": 1.1, "atr": 0.001, "equity": 1e5, **kw}
    s = ai_signal(kw.pop("s", "EURUSD"))
    if s.instrument in ("EURJPY", "USDJPY"):
        kw.setdefault("entry", 160.0)
    assert make_plan(s, **kw) is None


def test_huge_sizes_clip_to_max_lot_in_both_paths():
    fine = InstrumentSpec(name="FINE", base="FINE", quote="USD", contract_size=1.0, lot_step=MIN_LOT_STEP,
                          min_lot=MIN_LOT_STEP, max_lot=1e6, tick_size=0.01, digits=2)
    assert fine.round_lots(1e300) == 1e6 and fine.round_lots(math.inf) == 0.0  # lots/step overflows
    p = make_plan(ai_signal("FINE"), entry=100.0, atr=1.0, equity=1e307, spec=fine)
    assert p is not None and p.size == 1e6
    # a spec the old checks let through (lot_step=1e-320) or built in Python (lot_step=0) is refused
    for step in (1e-320, 0.0):
        with pytest.raises(ValueError, match="lot_step"):
            InstrumentSpec(name="EURUSD", lot_step=step)


# ---- 9. a validity window past int64 makes no plan ----------------------------------------------------

def test_valid_until_past_int64_makes_no_plan():
    mn = 30 * 86_400
    cfg = PlanConfig(valid_bars=10_000)
    bars = dc.sim.MarketSimulator(["EURUSD"], seed=2).bars(40)
    bars["timeframe"] = mn
    bars["ts"] = bars["ts"][0] + np.arange(len(bars)) * mn * 1_000_000_000
    journal = []
    m = DecisionMaker(PaperBroker(), plan=cfg, journal=journal.append)
    m.on_bars(bars)
    ts = int(bars["ts"][-1])
    assert m.on_signals(signals(dc.instruments.id("EURUSD"), ts, timeframe=mn)) == []
    assert m.no_plan == 1 and journal == [] and m.trader.pending() == []
    assert make_plan(ai_signal(ts=ts, timeframe=mn), entry=1.1, atr=0.01, equity=1e5, config=cfg) is None
    # the bound, against plain integers: valid_until must be an int64
    for vb, tf, t in [(10_000, mn, ts), (2_000, mn, ts), (1, 2**32 - 1, ts), (3, 2**32 - 1, 0), (1, 1, 2**63 - 10**9),
                      (1, 1, 2**63 - 10**9 + 1), (5, 60, -(2**63))]:
        assert valid_until_fits(PlanConfig(valid_bars=vb), t, tf) == (t + vb * tf * 10**9 <= 2**63 - 1)
    short = PlanConfig(valid_bars=2_000)
    p = make_plan(ai_signal(ts=ts, timeframe=mn), entry=1.1, atr=0.01, equity=1e5, config=short)
    assert p is not None and p.valid_until == ts + 2_000 * mn * 10**9
    msgspec.msgpack.encode(p)  # journals


# ---- 11. config files: every error is a ValueError naming the file and the key ------------------------

@pytest.mark.parametrize("text, needle", [
    ("instruments = 5\n", "instruments"), ("instruments = [1]\n", "instruments"), ("costs = 5\n", "costs"),
    ('costs = "ab"\n', "costs"), ("plan = 5\n", "plan"), ("[instruments]\nEURUSD = 5\n", "instruments.EURUSD"),
    ("[instruments.EURUSD]\nlot_step = 1e-320\n", "lot_step"),
    ("[instruments.EURUSD]\ncontract_size = inf\n", "contract_size"), ("[risk]\nmax_leverage = inf\n", "max_leverage"),
    ("[risk\n", "not valid TOML")])
def test_config_file_errors_name_the_file_and_the_key(tmp_path, text, needle):
    f = tmp_path / "d.toml"
    f.write_text(text)
    with pytest.raises(ValueError, match=needle) as e:
        load_decision_config(str(f))
    assert str(f) in str(e.value)
    from dynamic_core.decision import load_specs

    if "instruments" in text or "TOML" in needle:
        with pytest.raises(ValueError, match=str(f)):
            load_specs(f)


def test_an_approved_plan_the_broker_refuses_is_counted():
    bars = dc.sim.MarketSimulator(["EURUSD"], seed=2).bars(60)
    m = DecisionMaker(PaperBroker(costs=CostModel(spread=0.02)), plan=PlanConfig(atr_period=3))  # stops inside the spread
    for step in time_steps(bars):
        m.on_bars(step)
    last = bars[-1]
    sig = signals(dc.instruments.id("EURUSD"), int(last["ts"]), action=2, timeframe=int(last["timeframe"]))
    (d,) = m.on_signals(sig)
    assert d.verdict == "APPROVED" and m.trader.pending() == []
    assert m.stats()["order_rejects"] == {"bad_stops": 1} == m.trader.stats()["rejects"]


@pytest.mark.parametrize("bad", [[1, 2], np.zeros(3), dc.market.empty(2)])
def test_on_signals_says_what_it_expects(bad):
    with pytest.raises(TypeError, match="SIGNAL_DTYPE"):
        DecisionMaker(PaperBroker()).on_signals(bad)


def test_a_python_built_signal_with_ids_out_of_range_is_refused_with_a_typed_error():
    # msgspec does not check a Struct built in Python: these reached struct.pack (struct.error)
    # or made a malformed signal id ('-000000000000001:1')
    for field, bad in (("timeframe", -3600), ("seq", -1), ("population_hash", -1), ("seq", 2**64),
                       ("ts", 2**63), ("timeframe", 1.5)):
        sig = msgspec.structs.replace(ai_signal(), **{field: bad})
        # refused as a receiver refuses it: the field named, or (past uint64) not encodable
        with pytest.raises(ValueError, match=rf"\$\.{field}\b|cannot be encoded"):
            make_plan(sig, entry=1.1, atr=0.001, equity=1e5)
    assert make_plan(ai_signal(), entry=1.1, atr=0.001, equity=1e5) is not None


def test_rationale_book_capacity_is_checked():
    from dynamic_core.decision.session import RationaleBook

    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="capacity"):
            RationaleBook(capacity=bad)
