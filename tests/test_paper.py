"""The paper broker: hand-computed fills and P&L, netting, validation, and backtesting.py as an
oracle on real GOOG bars."""

from __future__ import annotations

import logging
import math
import warnings

import dynamic_core as dc
import numpy as np
import pytest
from dynamic_core.bridges.paper import (
    EQUITY_DTYPE,
    ClosedTrade,
    CostModel,
    Order,
    PaperBroker,
    order_from_plan,
)
from dynamic_core.decision.specs import InstrumentSpec
from dynamic_core.payloads import TradingPlan

GOOG_SPEC = InstrumentSpec(name="GOOG", asset_class="equity", base="GOOG", quote="USD", contract_size=1.0,
                           lot_step=1.0, min_lot=1.0, max_lot=1_000_000.0, tick_size=0.01, digits=2)


def near(x: float) -> object:
    """Float equality up to the rounding of the arithmetic, not a tolerance for being wrong."""
    return pytest.approx(x, rel=1e-12, abs=1e-9)


def buy(cid: str, lots: float, instrument: str = "EURUSD", **kw: object) -> Order:
    return Order(client_order_id=cid, instrument=instrument, side=1, lots=lots, **kw)  # type: ignore[arg-type]


def sell(cid: str, lots: float, instrument: str = "EURUSD", **kw: object) -> Order:
    return Order(client_order_id=cid, instrument=instrument, side=-1, lots=lots, **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- hand-computed


def test_market_buy_next_open_with_costs_closed_by_take_profit() -> None:
    b = PaperBroker(costs=CostModel(spread=0.0002, slippage=0.0001, commission_per_lot=7.0))
    assert b.on_bar("EURUSD", 1, 1.1000, 1.1010, 1.0990, 1.1000) == []
    r = b.submit(buy("a", 0.5, stop_loss=1.0950, take_profit=1.1100, plan_id="P"))
    assert r.status == "accepted" and r.fills == () and b.order_status("a") == "pending"

    # Next bar: fills at the open + half spread + slippage = 1.1010 + 0.0001 + 0.0001 = 1.1012.
    (f,) = b.on_bar("EURUSD", 2, 1.1010, 1.1050, 1.1005, 1.1040)
    assert (f.kind, f.side, f.lots, f.ts, f.plan_id) == ("entry", 1, 0.5, 2, "P")
    assert f.price == near(1.1012)
    assert f.commission == near(3.5)  # 7 per lot per side x 0.5 lots
    assert b.order_status("a") == "filled" and b.pending() == []
    # Marked at the bid of the close: (1.1040 - 0.0001 - 1.1012) x 0.5 x 100,000 = 135.0.
    assert b.balance == near(100_000 - 3.5)
    assert b.equity == near(100_000 - 3.5 + 135.0)

    # Bid high 1.1120 - 0.0001 >= 1.1100: the target fills at 1.1100 exactly (no slippage).
    (x,) = b.on_bar("EURUSD", 3, 1.1060, 1.1120, 1.1055, 1.1100)
    assert (x.kind, x.side, x.price, x.client_order_id) == ("take_profit", -1, 1.1100, "a")
    (t,) = b.trades
    gross = (1.1100 - 1.1012) * 0.5 * 100_000  # 440.0
    assert t.gross_pnl == near(440.0) and gross == near(440.0)
    assert t.commission == near(7.0)  # 3.5 in + 3.5 out
    assert t.pnl == near(433.0)
    # Risk at the stop: (1.1012 - 1.0950) x 0.5 x 100,000 = 310.0.
    assert t.r_multiple == near(433.0 / 310.0)
    assert (t.plan_id, t.direction, t.lots, t.entry_ts, t.exit_ts, t.exit_reason) == ("P", 1, 0.5, 2, 3, "take_profit")
    assert b.balance == near(100_000 + 433.0) and b.equity == b.balance
    assert b.positions() == {}


def test_short_xauusd_stopped_out_contract_100() -> None:
    b = PaperBroker(costs={"XAUUSD": CostModel(spread=0.30, slippage=0.10), "*": CostModel()})
    b.on_bar("XAUUSD", 1, 2000.0, 2002.0, 1998.0, 2000.0)
    assert b.submit(sell("s", 0.10, "XAUUSD", stop_loss=2010.0, take_profit=1980.0)).status == "accepted"
    # Sell at the open - half spread - slippage: 2001.00 - 0.15 - 0.10 = 2000.75.
    (f,) = b.on_bar("XAUUSD", 2, 2001.0, 2004.0, 1999.0, 2003.0)
    assert f.price == near(2000.75)
    # Ask high 2012.15 >= 2010: stopped at max(2010, ask open 2005.15) + slippage 0.10 = 2010.10.
    (x,) = b.on_bar("XAUUSD", 3, 2005.0, 2012.0, 2004.0, 2011.0)
    assert x.kind == "stop_loss" and x.price == near(2010.10)
    (t,) = b.trades
    # (2010.10 - 2000.75) x -1 x 0.10 lots x 100 oz = -93.5
    assert t.pnl == near(-93.5) and t.gross_pnl == near(-93.5)
    # Risk (2010.00 - 2000.75) x 0.10 x 100 = 92.5
    assert t.r_multiple == near(-93.5 / 92.5)
    assert b.balance == near(100_000 - 93.5)


def _long_with_bracket(sl: float, tp: float, **costs: float) -> PaperBroker:
    b = PaperBroker(costs=CostModel(**costs))
    b.on_bar("EURUSD", 1, 1.1000, 1.1000, 1.1000, 1.1000)
    assert b.submit(buy("L", 1.0, stop_loss=sl, take_profit=tp)).status == "accepted"
    b.on_bar("EURUSD", 2, 1.1000, 1.1010, 1.0990, 1.1000)  # entry at 1.1000
    assert b.positions()["EURUSD"].lots == 1.0
    return b


def test_stop_and_target_in_one_bar_takes_the_stop() -> None:
    b = _long_with_bracket(1.0950, 1.1050)
    (x,) = b.on_bar("EURUSD", 3, 1.1000, 1.1060, 1.0940, 1.1030)
    assert (x.kind, x.price) == ("stop_loss", 1.0950)
    assert b.trades[0].pnl == near(-500.0)  # (1.0950 - 1.1000) x 100,000


def test_gap_through_stop_or_target_fills_at_open() -> None:
    b = _long_with_bracket(1.0950, 1.1050, slippage=0.0001)
    (x,) = b.on_bar("EURUSD", 3, 1.0900, 1.0920, 1.0880, 1.0910)
    assert x.kind == "stop_loss" and x.price == near(1.0899)  # the open 1.0900, minus slippage
    assert b.trades[0].pnl == near((1.0899 - 1.1001) * 100_000)  # entry 1.1000 + slippage

    b = _long_with_bracket(1.0950, 1.1050)
    (x,) = b.on_bar("EURUSD", 3, 1.1100, 1.1120, 1.1090, 1.1110)
    assert (x.kind, x.price) == ("take_profit", 1.1100)  # the better open, the first price traded
    assert b.trades[0].pnl == near(1000.0)


def test_leg_filled_at_open_may_be_stopped_or_reach_target_in_the_same_bar() -> None:
    b = PaperBroker()
    b.on_bar("EURUSD", 1, 1.1000, 1.1000, 1.1000, 1.1000)
    b.submit(buy("a", 1.0, stop_loss=1.0950, take_profit=1.1050))
    fills = b.on_bar("EURUSD", 2, 1.1000, 1.1060, 1.0940, 1.1000)  # both reachable: the stop
    assert [(f.kind, f.price) for f in fills] == [("entry", 1.1000), ("stop_loss", 1.0950)]
    b.submit(buy("b", 1.0, stop_loss=1.0950, take_profit=1.1050))
    fills = b.on_bar("EURUSD", 3, 1.1000, 1.1060, 1.0960, 1.1000)  # stop out of reach: the target
    assert [(f.kind, f.price) for f in fills] == [("entry", 1.1000), ("take_profit", 1.1050)]
    b.submit(buy("c", 1.0, stop_loss=1.0950, take_profit=1.1050))
    # Opened beyond its own target by a gap: exits at that moment's price, not the worse target.
    fills = b.on_bar("EURUSD", 4, 1.1070, 1.1080, 1.1060, 1.1070)
    assert [(f.kind, f.price) for f in fills] == [("entry", 1.1070), ("take_profit", 1.1070)]
    assert [t.pnl for t in b.trades] == [near(-500.0), near(500.0), near(0.0)]


def test_limit_and_stop_entries() -> None:
    b = PaperBroker(costs=CostModel(spread=0.0002, slippage=0.0001))
    b.on_bar("EURUSD", 1, 1.1000, 1.1000, 1.1000, 1.1000)
    assert b.submit(buy("bl", 1.0, type="limit", price=1.0950)).status == "accepted"
    assert b.submit(buy("bs", 1.0, type="stop", price=1.1050, instrument="GBPUSD")).status == "accepted"
    assert b.on_bar("EURUSD", 2, 1.0990, 1.1000, 1.0960, 1.0970) == []  # low above the limit
    (f,) = b.on_bar("EURUSD", 3, 1.0970, 1.0980, 1.0940, 1.0960)
    assert f.price == near(1.0950 + 0.0001)  # the limit + half spread, no slippage
    b.on_bar("GBPUSD", 3, 1.1000, 1.1040, 1.0990, 1.1030)  # high below the trigger
    (f,) = b.on_bar("GBPUSD", 4, 1.1020, 1.1060, 1.1010, 1.1055)
    assert f.price == near(1.1050 + 0.0001 + 0.0001)  # trigger + half spread + slippage

    # Gaps: a sell stop fills at the worse open, a sell limit at the better open.
    b.submit(sell("ss", 1.0, type="stop", price=1.0900))
    b.submit(sell("sl", 1.0, type="limit", price=1.1100, instrument="GBPUSD"))
    (f,) = b.on_bar("EURUSD", 5, 1.0880, 1.0890, 1.0870, 1.0880)
    assert (f.kind, f.price) == ("close", near(1.0880 - 0.0001 - 0.0001))
    (f,) = b.on_bar("GBPUSD", 6, 1.1120, 1.1130, 1.1110, 1.1120)
    assert (f.kind, f.price) == ("close", near(1.1120 - 0.0001))
    assert b.positions() == {}
    # (1.0878 - 1.0951) x 100,000 = -730; (1.1119 - 1.1052) x 100,000 = 670
    assert [t.pnl for t in b.trades] == [near(-730.0), near(670.0)]


def test_stop_entry_stopped_in_the_same_bar_exits_at_the_stop_not_the_open() -> None:
    b = PaperBroker()
    b.on_bar("EURUSD", 1, 1.1000, 1.1000, 1.1000, 1.1000)
    b.submit(buy("bs", 1.0, type="stop", price=1.1050, stop_loss=1.1000))
    fills = b.on_bar("EURUSD", 2, 1.1020, 1.1060, 1.0990, 1.1010)
    # The leg exists from 1.1050 on; the open 1.1020 came before it, so no gap applies.
    assert [(f.kind, f.price) for f in fills] == [("entry", 1.1050), ("stop_loss", 1.1000)]


def test_expiry_via_valid_until() -> None:
    b = PaperBroker()
    b.on_bar("EURUSD", 10, 1.1000, 1.1000, 1.1000, 1.1000)
    assert b.submit(buy("late", 1.0, valid_until=9)).reason == "expired"
    assert b.submit(buy("lim", 1.0, type="limit", price=1.0950, valid_until=20)).status == "accepted"
    assert b.submit(buy("mkt", 1.0, valid_until=15)).status == "accepted"
    assert b.on_bar("GBPUSD", 30, 1.3, 1.3, 1.3, 1.3) == []  # another instrument's bar: still pending
    assert [o.client_order_id for o in b.pending()] == ["lim", "mkt"]
    # ts 20 == valid_until of "lim": still valid (and not reached); "mkt" (15 < 20) expires first.
    assert b.on_bar("EURUSD", 20, 1.1000, 1.1000, 1.0960, 1.0960) == []
    assert b.order_status("mkt") == "expired" and b.order_status("lim") == "pending"
    assert b.on_bar("EURUSD", 21, 1.0940, 1.0950, 1.0900, 1.0920) == []  # would fill, but expired
    assert b.order_status("lim") == "expired" and b.pending() == [] and b.trades == []
    assert b.stats()["rejects"] == {"expired": 1}  # refused at submission
    assert b.stats()["expired"] == 2  # accepted, then expired unfilled


def test_netting_add_partial_fifo_across_plans_and_reversal() -> None:
    b = PaperBroker(costs=CostModel(commission_per_lot=2.0))
    seen: list[ClosedTrade] = []
    b.on_trade(seen.append)
    b.on_bar("EURUSD", 1, 1.1000, 1.1000, 1.1000, 1.1000)
    b.submit(buy("a", 1.0, plan_id="A"))
    b.on_bar("EURUSD", 2, 1.1000, 1.1000, 1.1000, 1.1000)
    b.submit(buy("b", 0.5, plan_id="B"))
    (f,) = b.on_bar("EURUSD", 3, 1.1020, 1.1020, 1.1020, 1.1020)
    assert f.kind == "entry"
    pos = b.positions()["EURUSD"]
    assert pos.lots == 1.5 and pos.avg_price == near((1.1000 * 1.0 + 1.1020 * 0.5) / 1.5)
    assert [(leg.plan_id, leg.lots) for leg in pos.legs] == [("A", 1.0), ("B", 0.5)]

    b.submit(sell("c", 1.2, plan_id="C"))
    (f,) = b.on_bar("EURUSD", 4, 1.1040, 1.1040, 1.1040, 1.1040)
    assert (f.kind, f.lots, f.plan_id) == ("close", 1.2, "C")
    assert f.commission == near(2.4)  # exit commission of 1.2 lots
    ta, tb = b.trades
    # A: (1.1040 - 1.1000) x 1.0 x 100,000 = 400; commission 2.0 in + 2.0 out.
    assert (ta.plan_id, ta.lots, ta.gross_pnl, ta.commission, ta.pnl) == ("A", 1.0, near(400.0), near(4.0),
                                                                         near(396.0))
    # B, 0.2 of its 0.5 lots: (1.1040 - 1.1020) x 0.2 x 100,000 = 40; commission 0.4 in + 0.4 out.
    assert (tb.plan_id, tb.lots, tb.gross_pnl, tb.commission, tb.pnl) == ("B", 0.2, near(40.0), near(0.8),
                                                                         near(39.2))
    pos = b.positions()["EURUSD"]
    assert pos.lots == 0.3 and [(leg.plan_id, leg.lots) for leg in pos.legs] == [("B", 0.3)]
    assert pos.legs[0].commission == near(0.6)

    b.submit(sell("d", 1.0, plan_id="D"))
    (f,) = b.on_bar("EURUSD", 5, 1.1000, 1.1000, 1.0990, 1.0990)
    assert (f.kind, f.lots) == ("reverse", 1.0) and f.commission == near(2.0)
    tc = b.trades[2]
    # B's last 0.3: (1.1000 - 1.1020) x 0.3 x 100,000 = -60; commission 0.6 + 0.6.
    assert (tc.plan_id, tc.lots, tc.exit_reason, tc.pnl) == ("B", 0.3, "reverse", near(-61.2))
    pos = b.positions()["EURUSD"]
    assert pos.lots == -0.7 and pos.legs[0].plan_id == "D" and pos.legs[0].price == 1.1000

    fills = b.flatten()
    assert [(f.kind, f.plan_id, f.lots, f.price) for f in fills] == [("flatten", "D", 0.7, 1.0990)]
    td = b.trades[3]
    # D short 0.7 from 1.1000 to 1.0990: (1.0990 - 1.1000) x -1 x 0.7 x 100,000 = 70; commission 1.4 + 1.4.
    assert (td.plan_id, td.direction, td.exit_reason, td.pnl) == ("D", -1, "flatten", near(67.2))
    assert seen == b.trades
    assert b.balance == near(100_000 + 396.0 + 39.2 - 61.2 + 67.2)
    assert b.balance == near(100_000 + math.fsum(t.pnl for t in b.trades)) and b.equity == b.balance
    assert b.stats()["commission"] == near(2.0 + 1.0 + 2.4 + 2.0 + 1.4)


def test_close_partial_lots_fifo() -> None:
    b = PaperBroker(costs=CostModel(spread=0.0002))
    b.on_bar("EURUSD", 1, 1.1000, 1.1000, 1.1000, 1.1000)
    b.submit(buy("a", 0.3, plan_id="A"))
    b.submit(buy("b", 0.3, plan_id="B"))
    assert len(b.on_bar("EURUSD", 2, 1.1000, 1.1010, 1.1000, 1.1010)) == 2
    fills = b.close("EURUSD", lots=0.45)
    # At the bid of the last close: 1.1010 - 0.0001; A fully, then 0.15 of B.
    assert [(f.plan_id, f.lots, f.price, f.kind) for f in fills] == [("A", 0.3, 1.1009, "closed_out"),
                                                                      ("B", 0.15, 1.1009, "closed_out")]
    assert b.positions()["EURUSD"].lots == 0.15
    assert b.close("EURUSD", lots=0.001) == []  # below the lot step
    assert b.close("GBPUSD") == []


def test_close_of_more_than_one_order_may_hold_is_not_capped_at_max_lot() -> None:
    b = PaperBroker(equity=10_000_000)
    b.on_bar("EURUSD", 1, 1.1, 1.1, 1.1, 1.1)
    for cid in ("a", "b"):
        b.submit(buy(cid, 80.0))  # max_lot is 100 per order
    b.on_bar("EURUSD", 2, 1.1, 1.1, 1.1, 1.1)
    assert b.net_lots() == {"EURUSD": 160.0}
    fills = b.close("EURUSD", lots=150.0)
    assert sum(f.lots for f in fills) == 150.0 and b.net_lots() == {"EURUSD": 10.0}


def test_usdjpy_pnl_converted_with_its_own_price_and_crosses() -> None:
    b = PaperBroker()
    b.on_bar("USDJPY", 1, 150.00, 150.00, 150.00, 150.00)
    b.submit(buy("j", 1.0, "USDJPY", take_profit=151.00))
    b.on_bar("USDJPY", 2, 150.00, 150.50, 149.80, 150.40)
    # Unrealised: (150.40 - 150.00) x 100,000 JPY, at 1/150.40 USD per JPY.
    assert b.equity == near(100_000 + 0.40 * 100_000 / 150.40)
    b.on_bar("USDJPY", 3, 150.60, 151.20, 150.50, 151.10)
    # (151.00 - 150.00) x 100,000 = 100,000 JPY = 100,000 / 151.00 USD = 662.2516556...
    assert b.trades[0].pnl == near(100_000 / 151.0)

    # EURJPY needs the USDJPY cross; without it there is no way to book P&L in USD.
    assert PaperBroker().submit(buy("x", 1.0, "EURJPY")).reason == "no_conversion"
    b.on_bar("EURJPY", 4, 160.00, 160.00, 160.00, 160.00)
    b.submit(sell("e", 0.1, "EURJPY"))
    b.on_bar("EURJPY", 5, 160.00, 160.00, 160.00, 160.00)
    b.on_bar("EURJPY", 6, 159.00, 159.00, 159.00, 159.00)
    assert len(b.close("EURJPY")) == 1
    # (159 - 160) x -1 x 0.1 x 100,000 = 10,000 JPY at USDJPY 151.10.
    assert b.trades[-1].pnl == near(10_000 / 151.10)


def _equity_by_hand(b: PaperBroker) -> float:
    """Balance plus every open leg marked at the exit side of its instrument's last close,
    converted at the current crosses: the whole sum, recomputed from the positions."""
    from dynamic_core.decision.specs import instrument_spec, quote_to_account

    prices = b.last_prices()
    total = b.balance
    for name, pos in b.positions().items():
        spec = instrument_spec(name)
        mark = prices[name] - math.copysign(1.0, pos.lots) * 0.0002 / 2
        conv = quote_to_account(spec, mark, "USD", prices)
        total += sum((mark - leg.price) * leg.direction * leg.lots * spec.contract_size * conv for leg in pos.legs)
    return total


def test_equity_kept_per_instrument_equals_a_full_recomputation_with_crosses() -> None:
    """Equity keeps each open instrument's marked value and refreshes it when its legs, its mark
    or a cross its conversion reads move; at every bar it must equal the sum recomputed from
    all positions (JPY and GBP crosses: a USDJPY or GBPUSD bar revalues EURJPY and EURGBP)."""
    rng = np.random.default_rng(7)
    names = ["EURUSD", "USDJPY", "EURJPY", "GBPUSD", "EURGBP", "XAUUSD"]
    px = {"EURUSD": 1.10, "USDJPY": 150.0, "EURJPY": 165.0, "GBPUSD": 1.27, "EURGBP": 0.86, "XAUUSD": 2000.0}
    b = PaperBroker(costs=CostModel(spread=0.0002, commission_per_lot=3.0))
    checked = crosses = 0
    for t in range(1, 400):
        name = names[rng.integers(len(names))]
        o = px[name]
        c = o * (1 + rng.normal(0, 0.002))
        px[name] = c
        b.on_bar(name, t, o, max(o, c) * 1.0005, min(o, c) * 0.9995, c)
        if rng.random() < 0.3:
            side = buy if rng.random() < 0.5 else sell
            b.submit(side(f"o{t}", float(rng.choice([0.1, 0.2, 0.5])), names[rng.integers(len(names))]))
        if rng.random() < 0.05 and b.positions():
            b.close(sorted(b.positions())[0])
        assert b.equity == pytest.approx(_equity_by_hand(b), rel=1e-12, abs=1e-7), t
        checked += bool(b.positions())
        crosses += bool(set(b.positions()) & {"EURJPY", "EURGBP"}) and name in ("USDJPY", "GBPUSD")
    assert checked > 200 and len(b.trades) > 10
    assert crosses > 20  # bars of a cross's conversion price while the cross was open
    b.flatten()
    assert b.equity == b.balance


def test_lot_rounding_and_validation_rejects() -> None:
    b = PaperBroker(specs={"GOOG": GOOG_SPEC})
    b.on_bar("EURUSD", 1, 1.1, 1.1, 1.1, 1.1)
    cases = {
        "bad_size": [buy("s1", 0.015), buy("s2", 0.0), buy("s3", 100.01), buy("s4", math.nan), buy("s5", math.inf),
                     buy("s6", -1.0), buy("s7", 1.5, "GOOG"), buy("s8", 0.001)],
        "bad_side": [Order(client_order_id="d1", instrument="EURUSD", side=0, lots=1.0)],
        "bad_type": [buy("t1", 1.0, type="iceberg")],
        "bad_price": [buy("p1", 1.0, type="limit"), buy("p2", 1.0, type="stop", price=math.nan)],
        "bad_stops": [buy("k1", 1.0, stop_loss=1.2), buy("k2", 1.0, take_profit=1.05), sell("k3", 1.0, stop_loss=1.05),
                      buy("k4", 1.0, type="limit", price=1.0, take_profit=0.99), buy("k5", 1.0, stop_loss=-1.0)],
        "bad_order": [buy("o1", "x"), Order(client_order_id="", instrument="EURUSD", side=1, lots=1.0)],  # type: ignore[arg-type]
    }
    for reason, orders in cases.items():
        for od in orders:
            r = b.submit(od)
            assert (r.status, r.reason) == ("rejected", reason), od
    assert b.stats()["rejects"] == {k: len(v) for k, v in sorted(cases.items())}
    assert b.submit(buy("ok", 0.01)).status == "accepted"
    assert b.submit(buy("ok2", 100.0)).status == "accepted"
    assert b.submit(buy("g", 3.0, "GOOG")).status == "accepted"
    assert b.order_status("s1") == "rejected"
    # A rejected id may be sent again (nothing was executed under it).
    assert b.submit(buy("s1", 0.02)).status == "accepted"


def test_duplicate_client_order_id_changes_nothing() -> None:
    b = PaperBroker(fill_market="immediate")
    b.on_bar("EURUSD", 1, 1.1, 1.1, 1.1, 1.1)
    assert b.submit(buy("x", 1.0, type="limit", price=1.05)).status == "accepted"
    r = b.submit(buy("x", 2.0))
    assert (r.status, r.fills) == ("duplicate", ()) and len(b.pending()) == 1 and b.positions() == {}
    assert b.submit(buy("m", 1.0)).status == "filled"
    assert b.submit(buy("m", 1.0)).status == "duplicate"
    assert b.cancel("x") and not b.cancel("x") and b.order_status("x") == "cancelled"
    assert b.submit(buy("x", 1.0, type="limit", price=1.05)).status == "duplicate"
    assert b.positions()["EURUSD"].lots == 1.0 and len(b.fills) == 1


def _id_stream(b: PaperBroker, n: int = 2500, ids: int = 1200) -> list[tuple[str, str]]:
    """Market, limit and stop orders on EURUSD with ids reused from far back (order i has id
    i % ``ids``), some expiring, one in 50 cancelled, one in 40 refused (bad size); the answers."""
    rng = np.random.default_rng(5)
    px, out = 1.1, []
    for i in range(n):
        px *= 1 + rng.normal(0, 0.001)
        b.on_bar("EURUSD", (i + 1) * 60, px, px * 1.001, px * 0.999, px)
        side, typ = int(rng.choice([-1, 1])), ("market", "limit", "stop")[i % 3]
        price = 0.0 if typ == "market" else px * (1 - side * 0.0005 if typ == "limit" else 1 + side * 0.0005)
        lots = 0.015 if i % 40 == 0 else float(rng.choice([0.1, 0.2]))
        od = Order(client_order_id=f"o{i % ids}", instrument="EURUSD", side=side, type=typ, lots=lots, price=price,
                   valid_until=(i + 3) * 60, plan_id=f"P{i % ids}")
        r = b.submit(od)
        out.append((r.status, r.reason))
        if i % 50 == 0:
            b.cancel(od.client_order_id)
    return out


def test_an_id_is_a_duplicate_long_after_its_status_is_dropped() -> None:
    # oracle: a broker that keeps every status. With 3 kept, ids sent again 1,200 orders later were
    # accepted and executed a second time
    full, small = PaperBroker(history=None), PaperBroker(history=3)
    got = _id_stream(small)
    assert got == _id_stream(full)
    assert small.fills == full.fills[-len(small.fills):] and small.fill_count == full.fill_count
    assert small.stats()["dropped"]["statuses"] > 1000 and len(small._status) <= 3 + 1 + len(small.pending())
    assert got.count(("duplicate", "")) > 1000 and ("rejected", "bad_size") in got
    assert small._old_ids.n > 512  # the table grew (from 1,024 slots) and kept every id
    # an id accepted 2,400 orders ago: its status is gone, the id is not; a refused id (o0 always
    # had a bad size) may be sent again: nothing was executed under it
    early = [f"o{i}" for i, (st, _) in enumerate(got[:100]) if st == "accepted"]
    assert len(early) > 50 and {small.order_status(c) for c in early} == {None}
    assert {small.submit(buy(c, 0.1)).status for c in early} == {"duplicate"}
    assert small.submit(buy("o0", 0.1)).status == "accepted"


def test_order_id_memory_is_capped_and_refuses_new_ids_rather_than_forget() -> None:
    b = PaperBroker(history=1, max_order_ids=5, fill_market="immediate")
    b.on_bar("EURUSD", 1, 1.1, 1.1, 1.1, 1.1)
    answers = [b.submit((buy if i % 2 else sell)(f"i{i}", 0.1)).status for i in range(10)]
    # 5 ids hashed, then the next one finished could not be: kept whole, and new ids refused
    assert answers == ["filled"] * 7 + ["rejected"] * 3
    assert b.stats()["rejects"] == {"ids_full": 3} and b._old_ids.n == 5 and len(b._status) == 2
    assert [b.submit(buy(f"i{i}", 0.1)).status for i in range(7)] == ["duplicate"] * 7
    assert len(b.fills) == 1 and b.fill_count == 7  # nothing executed twice
    assert b.submit(buy("i8", 0.1)).reason == "ids_full" and len(b._status) == 2  # refusals take no memory
    with pytest.raises(ValueError, match="max_order_ids"):
        PaperBroker(max_order_ids=-1)


def test_fill_market_immediate_and_no_price() -> None:
    b = PaperBroker(fill_market="immediate", costs=CostModel(spread=0.0002, slippage=0.0001))
    r = b.submit(buy("p1", 1.0, ts=5))
    assert (r.status, r.reason) == ("rejected", "no_price")
    b.on_bar("EURUSD", 10, 1.1000, 1.1010, 1.0990, 1.1005)
    r = b.submit(buy("p1", 1.0, ts=12))  # the same id after a rejection: accepted now
    assert r.status == "filled" and b.order_status("p1") == "filled"
    (f,) = r.fills
    assert f.price == near(1.1005 + 0.0001 + 0.0001) and f.ts == 12 and f.kind == "entry"
    assert b.pending() == [] and b.positions()["EURUSD"].lots == 1.0
    # next_open keeps the order until the next bar even when a price is known.
    nb = PaperBroker(costs=CostModel(spread=0.0002, slippage=0.0001))
    nb.on_bar("EURUSD", 10, 1.1000, 1.1010, 1.0990, 1.1005)
    assert nb.submit(buy("p1", 1.0)).status == "accepted"
    with pytest.raises(ValueError, match="fill_market"):
        PaperBroker(fill_market="later")


def test_bad_bars_are_ignored_and_counted() -> None:
    b = PaperBroker()
    b.on_bar("EURUSD", 1, 1.1, 1.1, 1.1, 1.1)
    b.submit(buy("a", 1.0))
    assert b.on_bar("EURUSD", 2, math.nan, 1.1, 1.1, 1.1) == []
    assert b.on_bar("EURUSD", 2, 1.1, math.inf, 1.1, 1.1) == []
    assert b.on_bar("EURUSD", 2, 1.1, 1.0, 1.2, 1.1) == []  # high below low
    assert b.on_bar("EURUSD", 1, 1.1, 1.1, 1.1, 1.1) == []  # not after the last bar
    assert b.on_bar("EURUSD", "soon", 1.1, 1.1, 1.1, 1.1) == []  # type: ignore[arg-type]
    # times are int64 ns: beyond it the equity curve broke for good (and the instrument was
    # blocked as out of order); floats and numeric strings are no time either
    for ts in (2**64, 2**63, 1.7, "5", True):
        assert b.on_bar("EURUSD", ts, 1.1, 1.1, 1.1, 1.1) == []  # type: ignore[arg-type]
    assert b.on_bar("EURUSD", 2, 0.0, 0.0, 0.0, 0.0) == []  # a fill at 0 is no price
    assert b.on_bar("EURUSD", 2, -1.0, -0.5, -1.5, -1.0) == []
    assert b.on_bar("EURUSD", 2, 1.1, 1e300, 1.1, 1e300) == []  # past dc.MAX_PRICE, as the engine
    assert b.on_bar("EURUSD", 2, 1.1, 1.1, 1e-300, 1.1) == []  # below dc.MIN_PRICE
    assert b.pending() and len(b.equity_curve()) == 1 and b.last_prices() == {"EURUSD": 1.1}
    assert b.stats()["ignored_bars"] == {"bad_bar": 6, "bad_range": 1, "non_finite": 2, "out_of_order": 1,
                                         "non_positive_price": 2, "price_out_of_range": 2}
    assert len(b.on_bar("EURUSD", np.int64(2), 1.1, 1.1, 1.1, 1.1)) == 1
    assert len(b.equity_curve()) == 2


def test_refused_orders_leave_nothing_behind() -> None:
    # every name a refused order gave stayed in the broker's spec cache (43 MB for 200k names)
    b = PaperBroker(history=100)
    for k in range(2000):
        assert b.submit(buy(f"x{k}", -1.0, instrument=f"ZZ{k:04d}USD")).reason == "bad_size"
    assert b._spec_cache == {}
    b.on_bar("EURUSD", 1, 1.1, 1.1, 1.1, 1.1)
    assert b.submit(buy("ok", 1.0)).status in ("accepted", "filled")
    assert list(b._spec_cache) == ["EURUSD"]


def test_raising_callback_is_counted_not_propagated(caplog: pytest.LogCaptureFixture) -> None:
    b = PaperBroker(fill_market="immediate")
    got: list[str] = []

    def boom(t: ClosedTrade) -> None:
        raise RuntimeError("subscriber bug")

    b.on_trade(boom)
    b.on_trade(lambda t: got.append(t.plan_id))
    b.on_bar("EURUSD", 1, 1.1, 1.1, 1.1, 1.1)
    with caplog.at_level(logging.ERROR, logger="dynamic_core.bridges.paper"):
        for i in range(3):
            b.submit(buy(f"b{i}", 1.0, plan_id=f"P{i}"))
            b.close("EURUSD")
    assert got == ["P0", "P1", "P2"] and len(b.trades) == 3
    assert b.stats()["callback_errors"] == 3
    assert sum("on_trade callback" in r.getMessage() for r in caplog.records) == 1  # logged once
    assert b.balance == near(100_000.0)


def test_callbacks_see_final_books_and_may_call_the_broker() -> None:
    b = PaperBroker(fill_market="immediate")
    log_: list[tuple[str, str, float, float]] = []

    def react(t: ClosedTrade) -> None:
        if t.exit_reason == "stop_loss":  # re-enter the other way, from inside the callback
            b.submit(sell("again", 1.0, plan_id="R"))
        pos = b.positions().get("EURUSD")
        log_.append((t.plan_id, t.exit_reason, pos.lots if pos else 0.0, b.balance))

    b.on_trade(react)
    b.on_bar("EURUSD", 1, 1.1000, 1.1000, 1.1000, 1.1000)
    b.submit(buy("a", 1.0, plan_id="A", stop_loss=1.0950))
    b.submit(buy("b", 1.0, plan_id="B", stop_loss=1.0950))
    fills = b.on_bar("EURUSD", 2, 1.0990, 1.0990, 1.0940, 1.0960)
    assert [(f.kind, f.plan_id) for f in fills] == [("stop_loss", "A"), ("stop_loss", "B")]
    # Both legs were closed and booked before the first callback ran (its balance has both
    # losses); its re-entry fills at once, and the second trade is delivered only after the first
    # callback returns (in closing order, not nested); its own "again" is a duplicate.
    after = near(100_000 - 2 * 500.0)
    assert log_ == [("A", "stop_loss", -1.0, after), ("B", "stop_loss", -1.0, after)]
    assert b.positions()["EURUSD"].lots == -1.0 and b.order_status("again") == "filled"
    assert b.fills[-1].price == 1.0960


def test_bad_construction_and_garbage_orders() -> None:
    with pytest.raises(ValueError, match="upper-case currency code"):
        PaperBroker(account="usd")  # no instrument's legs say "usd": nothing could be valued
    with pytest.raises(ValueError, match="spread"):
        CostModel(spread=-0.1)
    with pytest.raises(ValueError, match="slippage"):
        CostModel(slippage=math.nan)
    with pytest.raises(TypeError, match="costs"):
        PaperBroker(costs={"*": 0.1})  # type: ignore[dict-item]
    b = PaperBroker()
    assert b.submit(None).reason == "bad_order"  # type: ignore[arg-type]
    assert b.submit(buy("t", 1.0, ts="later")).reason == "bad_order"
    # a Struct built in Python is not type-checked: numbers given as text are refused, not kept
    # to fail in every later bar
    assert b.submit(buy("u", 1.0, type="limit", price="1.0995")).reason == "bad_order"  # type: ignore[arg-type]
    assert b.submit(buy("v", "1")).reason == "bad_order"  # type: ignore[arg-type]
    assert b.submit(buy("w", 1.0, stop_loss=1j)).reason == "bad_order"  # type: ignore[arg-type]
    assert b.submit(Order(client_order_id="x", instrument="EURUSD", side=True, lots=1.0)).reason == "bad_side"
    s = b.stats()
    assert (s["trades"], s["max_drawdown"], s["equity"], s["rejects"]) == (
        0, 0.0, 100_000.0, {"bad_order": 5, "bad_side": 1})
    assert b.net_lots(pending=True) == {}
    assert math.isnan(s["profit_factor"]) and b.equity_curve().shape == (0,)
    b.on_bar("EURUSD", 1, 1.1, 1.1, 1.1, 1.1)
    ok = b.submit(buy("y", np.float32(1.0), type="limit", price=np.float64(1.0995)))
    assert ok.status == "accepted" and type(b.pending()[0].lots) is float
    assert len(b.on_bar("EURUSD", 2, 1.1, 1.1, 1.099, 1.1)) == 1


def test_plan_to_order() -> None:
    plan = TradingPlan(plan_id="plan-1", signal_id="s", instrument="EURUSD", timeframe=3600, ts=1, seq=1,
                       direction=-1, action=-1, entry=1.1, stop=1.11, targets=(1.08, 1.07), size=0.3,
                       valid_until=99)
    od = order_from_plan(plan)
    assert (od.client_order_id, od.side, od.lots, od.stop_loss, od.take_profit, od.valid_until, od.plan_id,
            od.type, od.price) == ("plan-1", -1, 0.3, 1.11, 1.08, 99, "plan-1", "market", 0.0)
    assert order_from_plan(plan, type="limit", client_order_id="c").price == 1.1
    b = PaperBroker()
    b.on_bar("EURUSD", 1, 1.1, 1.1, 1.1, 1.1)
    assert b.submit_plan(plan).status == "accepted"
    assert b.submit_plan(plan).status == "duplicate"  # the plan id is the idempotency key
    b.on_bar("EURUSD", 2, 1.1, 1.1, 1.1, 1.1)
    assert b.positions()["EURUSD"].legs[0].plan_id == "plan-1"


# ---------------------------------------------------------------------------------- runs on real bars


def _churn(b: PaperBroker, bars: np.ndarray) -> None:
    """A deterministic order stream: alternate sides and sizes, some bracketed, some pending."""
    _churn_part(b, bars, 0, len(bars))


def test_equity_curve_and_flat_equity_equals_initial_plus_trades(goog: np.ndarray) -> None:
    b = PaperBroker(specs={"GOOG": GOOG_SPEC}, costs=CostModel(spread=0.10, slippage=0.05, commission_per_lot=0.5))
    _churn(b, goog)
    curve = b.equity_curve()
    assert curve.dtype == EQUITY_DTYPE and len(curve) == len(goog)
    assert np.array_equal(curve["ts"], goog["ts"])
    assert curve["balance"][-1] == b.balance and curve["equity"][-1] == b.equity
    b.flatten()
    assert b.positions() == {} and b.pending() == []
    trades = b.trades
    assert len(trades) > 100
    assert b.equity == b.balance == near(100_000.0 + math.fsum(t.pnl for t in trades))
    s = b.stats()
    assert s["trades"] == len(trades) and s["net_pnl"] == near(b.balance - 100_000.0)
    assert s["commission"] == near(math.fsum(t.commission for t in trades))
    eq = curve["equity"]
    assert s["max_drawdown"] == near(float(np.max(np.maximum.accumulate(np.maximum(eq, 100_000.0)) - eq)))
    wins = [t.pnl for t in trades if t.pnl > 0]
    losses = [-t.pnl for t in trades if t.pnl < 0]
    assert s["profit_factor"] == near(math.fsum(wins) / math.fsum(losses))
    assert {t.exit_reason for t in trades} >= {"stop_loss", "take_profit", "close", "flatten"}


def test_deterministic(goog: np.ndarray) -> None:
    runs = []
    for _ in range(2):
        b = PaperBroker(specs={"GOOG": GOOG_SPEC}, costs=CostModel(spread=0.10, slippage=0.05, commission_per_lot=0.5))
        _churn(b, goog[:800])
        runs.append((b.fills, b.trades, b.equity_curve().tobytes()))
    assert runs[0] == runs[1]


# ---------------------------------------------------------------------------------- backtesting.py oracle


def _sma(x: np.ndarray, n: int) -> np.ndarray:
    out = np.full(len(x), np.nan)
    c = np.cumsum(np.insert(x, 0, 0.0))
    out[n - 1:] = (c[n:] - c[:-n]) / n
    return out


def _bt_run(strategy: type) -> object:
    from backtesting import Backtest
    from backtesting.test import GOOG

    # Zero costs, fills at the next open, one netted position (FIFO), no auto-closing; open trades
    # stay open at the end (equity marks them at the last close, as ours does without a spread).
    bt = Backtest(GOOG, strategy, cash=100_000, commission=0.0, spread=0.0, margin=1.0, trade_on_close=False,
                  hedging=False, exclusive_orders=False, finalize_trades=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its progress bar and "trades remain open" notes
        return bt.run()


def _goog_arrays() -> tuple[np.ndarray, ...]:
    from backtesting.test import GOOG

    ts = GOOG.index.as_unit("ns").asi8
    return (ts,) + tuple(GOOG[c].to_numpy(np.float64) for c in ("Open", "High", "Low", "Close"))


def test_oracle_backtesting_py_netting_and_reversals() -> None:
    """Market orders toward a target position that changes sign and size: adds, FIFO partial
    closes and reversals, compared trade by trade and bar by bar."""
    from backtesting import Strategy

    ts, o, h, lo, c = _goog_arrays()
    fast, slow, trend = _sma(c, 10), _sma(c, 30), _sma(c, 100)
    mag = np.where(c > trend, 15, 5) + np.where(c > fast, 5, 0)
    target = np.where(np.isnan(trend), 0, np.where(fast > slow, 1, -1) * mag)

    class Target(Strategy):
        def init(self) -> None:
            pass

        def next(self) -> None:
            d = int(target[len(self.data) - 1] - self.position.size)
            if d > 0:
                self.buy(size=d)
            elif d < 0:
                self.sell(size=-d)

    res = _bt_run(Target)
    b = PaperBroker(specs={"GOOG": GOOG_SPEC})
    for i in range(len(c)):
        b.on_bar("GOOG", int(ts[i]), o[i], h[i], lo[i], c[i])
        if i == 0:  # backtesting.py's first strategy call is on the second bar
            continue
        p = b.positions().get("GOOG")
        d = int(target[i] - (p.lots if p else 0))
        if d:
            assert b.submit(Order(client_order_id=f"o{i}", instrument="GOOG", side=1 if d > 0 else -1,
                                  lots=float(abs(d)))).status == "accepted"

    theirs = res["_trades"]
    mine = b.trades
    assert len(mine) == len(theirs) == 351
    kinds = [f.kind for f in b.fills]
    assert kinds.count("reverse") == 64 and kinds.count("close") == 191 and kinds.count("entry") == 187
    got = [(t.direction * t.lots, t.entry_price, t.exit_price, t.entry_ts, t.exit_ts) for t in mine]
    want = [(float(r.Size), r.EntryPrice, r.ExitPrice, r.EntryTime.value, r.ExitTime.value)
            for r in theirs.itertuples()]
    assert got == want
    assert [t.pnl for t in mine] == [near(x) for x in theirs["PnL"]]
    assert b.equity == pytest.approx(res["Equity Final [$]"], abs=1e-9)
    their_eq = res["_equity_curve"]["Equity"].to_numpy()
    np.testing.assert_allclose(b.equity_curve()["equity"], their_eq, rtol=0, atol=1e-9)


def test_oracle_backtesting_py_brackets() -> None:
    """Entries with stop-loss and take-profit, both directions, only when flat: next-open
    entries, stops and targets on the bar's range, stop first when both are reachable, a gap
    through the stop or beyond the target filling at the open, the same-bar exits of a leg
    filled at the open -- all agree exactly."""
    from backtesting import Strategy

    ts, o, h, lo, c = _goog_arrays()
    fast, slow = _sma(c, 10), _sma(c, 30)
    up = np.zeros(len(c), bool)
    dn = np.zeros(len(c), bool)
    up[1:] = (fast[1:] > slow[1:]) & (fast[:-1] <= slow[:-1])
    dn[1:] = (fast[1:] < slow[1:]) & (fast[:-1] >= slow[:-1])

    def bracket(i: int) -> tuple[int, float, float] | None:
        if up[i]:
            return 1, c[i] * 0.95, c[i] * 1.10
        if dn[i]:
            return -1, c[i] * 1.05, c[i] * 0.90
        return None

    class Bracket(Strategy):
        def init(self) -> None:
            pass

        def next(self) -> None:
            i = len(self.data) - 1
            if self.position.size or self.orders or (br := bracket(i)) is None:
                return
            (self.buy if br[0] > 0 else self.sell)(size=10, sl=br[1], tp=br[2])

    res = _bt_run(Bracket)
    b = PaperBroker(specs={"GOOG": GOOG_SPEC})
    for i in range(len(c)):
        b.on_bar("GOOG", int(ts[i]), o[i], h[i], lo[i], c[i])
        if i == 0 or b.positions() or b.pending() or (br := bracket(i)) is None:
            continue
        r = b.submit(Order(client_order_id=f"o{i}", instrument="GOOG", side=br[0], lots=10.0, stop_loss=br[1],
                           take_profit=br[2]))
        assert r.status == "accepted"

    theirs = list(res["_trades"].itertuples())
    mine = b.trades
    assert len(mine) == len(theirs) == 50
    bar = {int(t): k for k, t in enumerate(ts)}
    gap_targets = 0
    gap_stops = 0
    for t, r in zip(mine, theirs, strict=True):
        assert (t.direction * t.lots, t.entry_price, t.entry_ts, t.exit_ts, t.exit_price) == (
            float(r.Size), r.EntryPrice, r.EntryTime.value, r.ExitTime.value, r.ExitPrice)
        k = bar[t.exit_ts]
        if t.exit_reason == "take_profit" and t.exit_price != r.TP:
            assert t.exit_price == o[k] and (o[k] - r.TP) * t.direction > 0  # gapped beyond the target
            gap_targets += 1
        if t.exit_reason == "stop_loss" and t.exit_price != r.SL:
            assert t.exit_price == o[k]  # gapped through the stop: both fill at the open
            gap_stops += 1
    reasons = [t.exit_reason for t in mine]
    assert (reasons.count("stop_loss"), reasons.count("take_profit"), gap_targets, gap_stops) == (28, 22, 4, 5)
    assert b.equity == pytest.approx(res["Equity Final [$]"], abs=1e-9)
    their_eq = res["_equity_curve"]["Equity"].to_numpy()
    np.testing.assert_allclose(b.equity_curve()["equity"], their_eq, rtol=0, atol=1e-9)


def test_oracle_gap_beyond_target_fills_at_the_open() -> None:
    """Held long through a gap above the target: both exit at the open."""
    import pandas as pd
    from backtesting import Backtest, Strategy

    df = pd.DataFrame({"Open": [100.0, 100.0, 100.0, 112.0], "High": [100.0, 101.0, 101.0, 113.0],
                       "Low": [100.0, 99.0, 99.0, 111.0], "Close": [100.0, 100.0, 100.0, 112.0]},
                      index=pd.date_range("2024-01-01", periods=4, freq="D"))

    class Once(Strategy):
        def init(self) -> None:
            pass

        def next(self) -> None:
            if len(self.data) == 2:
                self.buy(size=1, sl=95.0, tp=110.0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = Backtest(df, Once, cash=10_000, finalize_trades=False).run()
    b = PaperBroker(specs={"GOOG": GOOG_SPEC})
    ts = df.index.as_unit("ns").asi8
    for i in range(4):
        b.on_bar("GOOG", int(ts[i]), *df.iloc[i][["Open", "High", "Low", "Close"]].to_list())
        if i == 1:
            b.submit(Order(client_order_id="x", instrument="GOOG", side=1, lots=1.0, stop_loss=95.0,
                           take_profit=110.0))
    assert res["_trades"]["ExitPrice"].to_list() == [112.0]  # the open
    assert [t.exit_price for t in b.trades] == [112.0]


def test_instruments_by_id_through_on_bars() -> None:
    bars = np.zeros(3, dtype=dc.BAR_DTYPE)
    bars["ts"] = [1, 2, 3]
    bars["instrument"] = [dc.instruments.id("EURUSD"), dc.instruments.id("EURUSD"), 4_000_000_000]
    bars["open"] = bars["high"] = bars["low"] = bars["close"] = 1.1
    b = PaperBroker()
    b.on_bars(bars[:1])
    b.submit(buy("a", 1.0))
    (f,) = b.on_bars(bars[1:])
    assert f.ts == 2 and b.stats()["ignored_bars"] == {"unknown_instrument": 1}


# ---------------------------------------------------------------------------------- observation and memory


def test_reading_equity_changes_nothing_later() -> None:
    # Values are summed in instrument-name order, whenever they were revalued: a run that reads
    # equity after every event gives the same curve, bit for bit, as one that never does.
    h = 3_600_000_000_000

    def run(peek: bool, seed: int) -> np.ndarray:
        r = np.random.default_rng(seed)
        names = ["AAA", "BBB", "CCC", "DDD"]  # 1-unit USD equities
        b = PaperBroker(equity=1e6, fill_market="immediate")
        for n in names:
            p = float(r.uniform(10, 1000))
            b.on_bar(n, h, p, p, p, p)
        for n in reversed(names):  # opened in reverse name order
            b.submit(Order(client_order_id=n, instrument=n, side=1, lots=float(r.integers(1, 500))))
            if peek:
                _ = b.equity  # only looking
        for t in range(2, 40):
            for n in names:
                c = float(r.uniform(10, 1000))
                b.on_bar(n, t * h, c, c, c, c)
                if peek:
                    _ = b.equity  # only looking
            if t % 9 == 0:  # close one and reopen it: the values' insertion order changes
                n = names[t % 4]
                b.close(n)
                if peek:
                    _ = b.equity  # only looking
                b.submit(Order(client_order_id=f"{n}{t}", instrument=n, side=-1, lots=3.0))
        return b.equity_curve()

    for seed in range(30):
        assert run(False, seed).tobytes() == run(True, seed).tobytes(), seed


def test_history_is_bounded_and_stats_cover_the_whole_run(goog: np.ndarray) -> None:
    costs = CostModel(spread=0.10, slippage=0.05, commission_per_lot=0.5)
    full = PaperBroker(specs={"GOOG": GOOG_SPEC}, costs=costs, history=None)
    small = PaperBroker(specs={"GOOG": GOOG_SPEC}, costs=costs, history=40)
    since, n0 = [], 0
    for i in range(0, len(goog), 50):  # fills_since by running count across the cuts
        for b in (full, small):
            _churn_part(b, goog, i, min(i + 50, len(goog)))
        since += small.fills_since(n0)
        n0 = small.fill_count
        assert len(small.fills) <= 40 + 5 and len(small.equity_curve()) <= 40 + 5 and len(small._status) <= 40 + 5
    assert since == full.fills and small.fill_count == full.fill_count > 200
    a, b = full.stats(), small.stats()
    assert b.pop("dropped")["trades"] > 100 and a.pop("dropped") == {"curve": 0, "fills": 0, "trades": 0, "statuses": 0}
    assert a == b  # the same figures, bit for bit, from the kept sums and the running drawdown
    assert small.trades == full.trades[-len(small.trades):]
    assert small.equity_curve().tobytes() == full.equity_curve()[-len(small.equity_curve()):].tobytes()
    # state is never dropped: legs and pending orders as in the full broker
    assert small.positions() == full.positions() and small.pending() == full.pending()
    for od in small.pending():
        assert small.order_status(od.client_order_id) == "pending"
        assert small.submit(od).status == "duplicate"
    # oracle for the whole-run figures: the full broker's lists, summed and scanned in plain Python
    pnl = [t.pnl for t in full.trades]
    eq = full.equity_curve()["equity"]
    assert a["net_pnl"] == math.fsum(pnl) and a["trades"] == len(pnl)
    assert a["max_drawdown"] == float(np.max(np.maximum.accumulate(np.maximum(eq, 100_000.0)) - eq))


def _churn_part(b: PaperBroker, bars: np.ndarray, lo: int, hi: int) -> None:
    """Bars lo..hi of :func:`_churn`'s order stream."""
    close = bars["close"]
    for i in range(lo, hi):
        b.on_bars(bars[i:i + 1])
        if i % 7 == 0:
            side = 1 if (i // 7) % 3 else -1
            c = float(close[i])
            b.submit(Order(client_order_id=f"c{i}", instrument="GOOG", side=side, lots=float(1 + i % 5),
                           stop_loss=c * (1 - 0.04 * side), take_profit=c * (1 + 0.06 * side), plan_id=f"P{i % 4}"))
        if i % 11 == 0:
            b.submit(Order(client_order_id=f"l{i}", instrument="GOOG", side=1, type="limit", lots=2.0,
                           price=float(close[i]) * 0.99, valid_until=int(bars["ts"][min(i + 3, len(bars) - 1)])))


def test_exact_sum_equals_fsum() -> None:
    from dynamic_core.bridges.paper import _ExactSum

    r = np.random.default_rng(2)
    for scale in (1.0, 1e-280, 1e280):
        xs = (r.standard_normal(2000) * scale * 10.0 ** r.integers(-20, 20, 2000)).tolist()
        s = _ExactSum()
        for x in xs:
            s.add(x)
        assert s.value() == math.fsum(xs)
    s = _ExactSum()
    for x in (1.0, math.inf, 2.0):
        s.add(x)
    assert s.value() == math.inf
    with pytest.raises(ValueError, match="history"):
        PaperBroker(history=0)


def test_order_lots_are_kept_on_the_lot_step_and_a_negative_validity_is_past() -> None:
    """Lots within the float tolerance of a step are accepted as that step (100.0000000005 with
    max_lot 100 is 100, not a hair over the limit); ``valid_until`` is good-till-cancelled only
    at 0: a negative time is in the past, so the order is expired."""
    b = PaperBroker()
    b.on_bar("EURUSD", 10, 1.1, 1.1, 1.1, 1.1)
    assert b.submit(buy("a", 100.0000000005)).status == "accepted"
    assert [o.lots for o in b.pending()] == [100.0]
    r = b.submit(buy("b", 1.0, valid_until=-5))
    assert (r.status, r.reason) == ("rejected", "expired")
