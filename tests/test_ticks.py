"""Tick ingress: validation reason codes, dead letters, and tick-to-bar aggregation against pandas."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import dynamic_core as dc
from dynamic_core.ticks import (
    TICK_DEAD_LETTER_DTYPE,
    TICK_REASONS,
    TickAggregator,
    TickValidator,
    tick_reason_counts,
    validate_ticks,
)

NS = 1_000_000_000
T0 = 1_700_000_000 * NS  # 2023-11-14 22:13:20 UTC: not on a minute boundary


def _ids(*names: str) -> list[int]:
    return [dc.instruments.id(n) for n in names]


def random_ticks(n: int, ids: list[int], seed: int, *, span_s: int = 2 * 86400, t0: int = T0,
                 integer_sizes: bool = True) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.zeros(n, dtype=dc.TICK_DTYPE)
    t["ts"] = np.sort(t0 + rng.integers(0, span_s * NS, n))
    t["instrument"] = rng.choice(ids, n)
    t["price"] = 100.0 + np.cumsum(rng.normal(0.0, 0.01, n))
    t["size"] = rng.integers(1, 500, n) if integer_sizes else rng.exponential(3.0, n)
    t["side"] = rng.integers(0, 3, n)
    t["bid"] = t["price"] - 0.01
    t["ask"] = t["price"] + 0.01
    return t


def pandas_bars(ticks: np.ndarray, instrument: int, rule: str) -> pd.DataFrame:
    m = ticks[ticks["instrument"] == instrument]
    df = pd.DataFrame({"p": m["price"], "s": m["size"]}, index=pd.to_datetime(m["ts"], utc=True))
    r = df.resample(rule).agg({"p": ["first", "max", "min", "last"], "s": "sum"}).dropna()
    return r


def aggregate(ticks: np.ndarray, timeframes, pieces: int, seed: int = 0, **kw) -> tuple[np.ndarray, TickAggregator]:
    agg = TickAggregator(timeframes, **kw)
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, len(ticks)), size=pieces - 1, replace=False)) if pieces > 1 else []
    out = [agg.update(part) for part in np.split(ticks, cuts)]
    out.append(agg.flush())
    return np.concatenate(out), agg


@pytest.mark.parametrize("pieces", [1, 53])
def test_aggregation_matches_pandas_resample(pieces):
    ids = _ids("EURUSD", "GBPUSD", "USDJPY", "XAUUSD")
    ticks = random_ticks(120_000, ids, seed=pieces)
    bars, agg = aggregate(ticks, ["1min", "M5", 3600], pieces)
    assert agg.rejects == {} and agg.accepted == len(ticks)
    for i in ids:
        for tf, rule in ((60, "1min"), (300, "5min"), (3600, "1h")):
            ref = pandas_bars(ticks, i, rule)
            b = bars[(bars["instrument"] == i) & (bars["timeframe"] == tf)]
            assert len(b) == len(ref) > 0
            np.testing.assert_array_equal(b["ts"], ref.index.as_unit("ns").asi8)
            for col, how in (("open", "first"), ("high", "max"), ("low", "min"), ("close", "last")):
                np.testing.assert_array_equal(b[col], ref[("p", how)].to_numpy())
            np.testing.assert_array_equal(b["volume"], ref[("s", "sum")].to_numpy())


def test_fractional_sizes_do_not_depend_on_batching():
    ids = _ids("EURUSD", "GBPUSD")
    ticks = random_ticks(30_000, ids, seed=5, integer_sizes=False)
    whole, _ = aggregate(ticks, ["1min", "1h"], 1)
    split, _ = aggregate(ticks, ["1min", "1h"], 97, seed=3)
    whole, split = (b[np.lexsort((b["ts"], b["timeframe"], b["instrument"]))] for b in (whole, split))
    for k in ("ts", "instrument", "timeframe", "open", "high", "low", "close"):
        np.testing.assert_array_equal(whole[k], split[k])
    np.testing.assert_allclose(whole["volume"], split["volume"], rtol=1e-14)
    for i in ids:
        ref = pandas_bars(ticks, i, "1min")  # pandas sums with Kahan compensation
        b = whole[(whole["instrument"] == i) & (whole["timeframe"] == 60)]
        np.testing.assert_allclose(b["volume"], ref[("s", "sum")].to_numpy(), rtol=1e-13)


def test_buckets_before_the_epoch_are_floored():
    ids = _ids("EURUSD")
    ticks = random_ticks(5_000, ids, seed=9, span_s=7200, t0=-3_600 * NS - 17 * NS)
    bars, _ = aggregate(ticks, ["1min"], 4)
    ref = pandas_bars(ticks, ids[0], "1min")
    np.testing.assert_array_equal(bars["ts"], ref.index.as_unit("ns").asi8)
    assert (bars["ts"] % (60 * NS) == 0).all()


def _tick(ts, inst, price, size=1.0, side=0, bid=0.0, ask=0.0):
    t = np.zeros(1, dtype=dc.TICK_DTYPE)
    t[0] = (ts, inst, side, price, size, bid, ask)
    return t


def test_a_bar_is_emitted_when_a_later_bucket_starts_and_on_flush():
    (i,) = _ids("EURUSD")
    m = 60 * NS
    agg = TickAggregator(["M1"])
    assert len(agg.update(np.concatenate([_tick(10 * m + NS, i, 1.0, 2), _tick(10 * m + 30 * NS, i, 1.2, 3)]))) == 0
    assert len(agg.pending()) == 1
    out = agg.update(_tick(11 * m + 5 * NS, i, 0.9, 4))
    assert len(out) == 1
    assert tuple(out[0]) == (10 * m, i, 60, 1.0, 1.2, 1.0, 1.2, 5.0)
    # a quiet instrument's bar closes on the clock
    assert len(agg.close_until(12 * m - 1)) == 0
    out = agg.close_until(12 * m)
    assert tuple(out[0]) == (11 * m, i, 60, 0.9, 0.9, 0.9, 0.9, 4.0)
    assert len(agg.flush()) == 0
    agg.update(_tick(13 * m, i, 1.1, 1))
    out = agg.flush()
    assert tuple(out[0]) == (13 * m, i, 60, 1.1, 1.1, 1.1, 1.1, 1.0)
    assert len(agg.pending()) == 0


def test_bars_come_out_in_close_time_order_and_drive_the_engine():
    ids = _ids("EURUSD", "GBPUSD")
    ticks = random_ticks(40_000, ids, seed=2, span_s=6 * 3600)
    agg = TickAggregator(["M1", "M15"])
    parts = [agg.update(p) for p in np.array_split(ticks, 7)] + [agg.flush()]
    for p in parts:
        close = p["ts"] + p["timeframe"].astype(np.int64) * NS
        assert (np.diff(close) >= 0).all()
    bars = np.concatenate(parts)
    for i in ids:
        for tf in (60, 900):
            assert (np.diff(bars["ts"][(bars["instrument"] == i) & (bars["timeframe"] == tf)]) > 0).all()
    assert (dc.market.validate(bars) == 0).all()
    pop = dc.Population.random(256, instruments=["EURUSD", "GBPUSD"], timeframes=["M1", "M15"], seed=1)
    with dc.Engine(pop, threads=1) as eng:
        sig = eng.run(bars)
    assert len(sig) == len(bars)


def test_each_malformed_tick_gets_its_reason_and_a_dead_letter():
    (i, j) = _ids("EURUSD", "GBPUSD")
    unknown = len(dc.instruments) + 5
    rows = [
        _tick(T0 + 1, i, 1.1000, 1, 1, 1.0999, 1.1001),  # ok
        _tick(T0 + 2, unknown, 1.1, 1),  # unknown_instrument
        _tick(T0 + 3, i, 1.1, 1, side=3),  # bad_side
        _tick(T0 + 4, i, np.nan, 1),  # non_finite
        _tick(T0 + 5, i, 1.1, np.inf),  # non_finite
        _tick(T0 + 6, i, 0.0, 1),  # non_positive_price
        _tick(T0 + 7, i, -1.0, 1),  # non_positive_price
        _tick(T0 + 8, i, 1.1, -1.0),  # negative_size
        _tick(T0 + 9, i, 1.1, 1, bid=-1.0, ask=1.2),  # bad_quote
        _tick(T0 + 10, i, 1.1, 1, bid=1.2, ask=1.0),  # crossed_quote
        _tick(T0 + 11, i, 1.5, 1, bid=1.0999, ask=1.1001),  # price_out_of_band
        _tick(T0 + 12, i, 1.1002, 1, bid=1.0999, ask=1.1001),  # ok: near the quote
        _tick(T0 + 5, i, 1.1, 1),  # out_of_order
        _tick(T0 + 12, i, 1.1, 1),  # ok: equal times are in order
        _tick(T0 + 1, j, 1.3, 1),  # ok: another instrument has its own clock
        _tick(T0 + 20, i, 1.1, 0.0),  # ok: zero size
        _tick(T0 + 21, i, 1.1, 1e308),  # size_too_large (two of them made a bar of volume inf)
        _tick(T0 + 22, i, 1.1, 1e15),  # ok: at the bound
        _tick(T0 + 23, i, 1e-308, 1),  # price_out_of_range (a bar may not carry it)
        _tick(T0 + 24, i, 2e15, 1),  # price_out_of_range
    ]
    t = np.concatenate(rows)
    want = ["ok", "unknown_instrument", "bad_side", "non_finite", "non_finite", "non_positive_price",
            "non_positive_price", "negative_size", "bad_quote", "crossed_quote", "price_out_of_band", "ok",
            "out_of_order", "ok", "ok", "ok", "size_too_large", "ok", "price_out_of_range", "price_out_of_range"]
    codes = validate_ticks(t)
    assert [TICK_REASONS[c] for c in codes] == want
    v = TickValidator(max_dead_letters=100)
    good, codes2 = v(t)
    np.testing.assert_array_equal(codes, codes2)
    assert len(good) == 6 and v.accepted == 6 and v.rejected == 14
    assert v.rejects == tick_reason_counts(codes) == {
        "unknown_instrument": 1, "bad_side": 1, "non_finite": 2, "non_positive_price": 2, "negative_size": 1,
        "bad_quote": 1, "crossed_quote": 1, "price_out_of_band": 1, "out_of_order": 1, "size_too_large": 1,
        "price_out_of_range": 2}
    dead = v.dead_letters()
    assert dead.dtype == TICK_DEAD_LETTER_DTYPE and len(dead) == 14
    np.testing.assert_array_equal(dead["index"], np.flatnonzero(codes))
    np.testing.assert_array_equal(dead["reason"], codes[codes != 0])
    assert (dead["batch"] == 0).all()
    np.testing.assert_array_equal(dead["ts"], t["ts"][codes != 0])


def test_order_is_kept_per_instrument_across_batches():
    (i, j) = _ids("EURUSD", "GBPUSD")
    v = TickValidator()
    v(np.concatenate([_tick(T0 + 100, i, 1.0), _tick(T0 + 50, j, 1.0)]))
    _, codes = v(np.concatenate([_tick(T0 + 99, i, 1.0), _tick(T0 + 100, i, 1.0), _tick(T0 + 60, j, 1.0),
                                 _tick(T0 + 300, i, 1.0), _tick(T0 + 200, i, 1.0), _tick(T0 + 300, i, 1.0)]))
    assert [TICK_REASONS[c] for c in codes] == ["out_of_order", "ok", "ok", "ok", "out_of_order", "ok"]
    assert v.last_ts("EURUSD") == T0 + 300 and v.last_ts("GBPUSD") == T0 + 60
    # a rejected tick does not move the clock: T0 + 301 is still in order after a bad T0 + 10**6
    _, codes = v(np.concatenate([_tick(T0 + 10**6, i, -1.0), _tick(T0 + 301, i, 1.0)]))
    assert [TICK_REASONS[c] for c in codes] == ["non_positive_price", "ok"]


def test_out_of_order_with_an_absurd_time_spread():
    # times far apart take the per-instrument path; the verdicts must not change
    (i, j) = _ids("EURUSD", "GBPUSD")
    t = np.concatenate([_tick(-(2**62), i, 1.0), _tick(2**62, i, 1.0), _tick(0, i, 1.0), _tick(5, j, 1.0),
                        _tick(4, j, 1.0), _tick(2**62, i, 1.0)])
    assert [TICK_REASONS[c] for c in validate_ticks(t)] == ["ok", "ok", "out_of_order", "ok", "out_of_order", "ok"]


def test_dead_letters_are_bounded_to_the_latest():
    (i,) = _ids("EURUSD")
    v = TickValidator(max_dead_letters=3)
    for k in range(3):
        bad = np.concatenate([_tick(T0 + 10 * k + q, i, -1.0 - q) for q in range(2)])
        v(bad)
    dead = v.dead_letters()
    assert len(dead) == 3 and v.rejects == {"non_positive_price": 6}
    np.testing.assert_array_equal(dead["price"], [-2.0, -1.0, -2.0])
    np.testing.assert_array_equal(dead["batch"], [1, 2, 2])


def test_validator_batch_numbers_wrap_and_its_time_range_is_checked_up_front():
    # the dead letters' batch field is uint32: after 2^32 batches the number wraps instead of
    # failing every later batch with a bad tick (its good ticks lost, the bad one counted only)
    (i,) = _ids("EURUSD")
    v = TickValidator()
    v._batch = 2**32 + 1  # as after that many calls
    good, code = v(np.concatenate([_tick(T0, i, 1.0), _tick(T0 + 1, i, -1.0), _tick(T0 + 2, i, 1.0)]))
    assert len(good) == 2 and v.rejects == {"non_positive_price": 1}
    assert v.dead_letters()["batch"].tolist() == [1]
    assert len(v(_tick(T0 + 3, i, 1.0))[0]) == 1  # later batches still work
    for bad, err in [((5, 1), ValueError), ((1.5, 2), TypeError), (("a", "b"), TypeError), ((1,), TypeError)]:
        with pytest.raises(err):
            TickValidator(ts_range=bad)


def test_aggregator_restricted_instruments_and_bad_ticks_do_not_touch_bars():
    (i, j) = _ids("EURUSD", "GBPUSD")
    agg = TickAggregator(["M1"], instruments=["EURUSD"])
    t = np.concatenate([_tick(T0, i, 1.0, 1), _tick(T0 + NS, j, 2.0, 1), _tick(T0 + 2 * NS, i, 50.0, -1),
                        _tick(T0 + 3 * NS, i, 1.2, 2)])
    agg.update(t)
    bar = agg.flush()
    assert len(bar) == 1 and bar[0]["high"] == 1.2 and bar[0]["volume"] == 3.0
    assert agg.rejects == {"unknown_instrument": 1, "negative_size": 1}


def test_wrong_input_types_are_refused():
    agg = TickAggregator(["M1"])
    with pytest.raises(TypeError):
        agg.update(np.zeros(3))
    with pytest.raises(TypeError):
        agg.update([1, 2])
    with pytest.raises(ValueError):
        TickAggregator([])
    assert len(agg.update(np.zeros(0, dtype=dc.TICK_DTYPE))) == 0


def test_tick_dtype_layout():
    assert dc.TICK_DTYPE.itemsize == 48
    assert dc.TICK_DTYPE.names == ("ts", "instrument", "side", "price", "size", "bid", "ask")
    assert dc.TICK_DTYPE.fields["price"][1] == 16


# ---- the built-in tick simulator -------------------------------------------------------------

def test_tick_simulator_is_deterministic_and_the_same_however_time_is_cut() -> None:
    names = ["EURUSD", "USDJPY", "BTCUSD"]
    whole = dc.sim.TickSimulator(names, seed=4).ticks(2 * 3600)
    cut = dc.sim.TickSimulator(names, seed=4)
    parts = [cut.ticks(s) for s in (0.0, 1e-9, 0.25, 59.75, 1740.0, 0.0, 5400.0)]
    assert np.concatenate(parts).tobytes() == whole.tobytes()
    assert dc.sim.TickSimulator(names, seed=5).ticks(2 * 3600).tobytes() != whole.tobytes()
    # the Poisson arrivals: 2 prints a second on average per instrument
    assert abs(len(whole) - 2 * 2 * 3600 * 3) < 5 * np.sqrt(2 * 2 * 3600 * 3)


def test_tick_simulator_cuts_that_add_up_agree_and_extreme_rates_and_dates_stay_in_range() -> None:
    # thirds of a second: each rounded alone, 30 calls would drift from one call of 10 s
    a, b = (dc.sim.TickSimulator(["EURUSD", "BTCUSD"], seed=3, rate=50.0) for _ in range(2))
    assert np.concatenate([a.ticks(1 / 3) for _ in range(30)]).tobytes() == b.ticks(10.0).tobytes()
    # the slowest feed: gaps of up to ~10 hours, every print inside the window asked for
    slow = dc.sim.TickSimulator(["EURUSD"], rate=1e-3, seed=1)
    t0 = slow._t
    t = slow.ticks(1e6)
    assert 800 < len(t) < 1200 and t0 < t["ts"].min() and t["ts"].max() < t0 + 10**15
    # near the end of int64 time: the prints stop at the clock, then the clock refuses to pass it
    late = dc.sim.TickSimulator(["EURUSD"], start="2262-04-11 23:47:00")
    t = late.ticks(16)
    assert len(t) and (np.diff(t["ts"]) > 0).all() and tick_reason_counts(validate_ticks(t)) == {}
    with pytest.raises(ValueError, match="int64 nanosecond range"):
        late.ticks(10)


def test_tick_simulator_prints_are_valid_ordered_and_consistent_with_their_quotes() -> None:
    sim = dc.sim.TickSimulator(["EURUSD", "XAUUSD", "SIMTICK"], seed=2, rate=5.0)
    t = sim.ticks(3600)
    assert tick_reason_counts(validate_ticks(t)) == {}
    assert (np.diff(t["ts"]) >= 0).all() and t["ts"][0] >= pd.Timestamp("2024-01-01", tz="UTC").value
    for i in np.unique(t["instrument"]):
        assert (np.diff(t["ts"][t["instrument"] == i]) > 0).all()
    assert (t["bid"] < t["ask"]).all() and set(np.unique(t["side"])) == {1, 2}
    assert (t["price"] == np.where(t["side"] == 1, t["ask"], t["bid"])).all()
    assert (t["size"] >= 1).all() and (t["size"] == np.round(t["size"])).all()
    # prices on the instrument's grid of increments
    for name, inc in zip(sim.names, sim.increments):
        b = t["bid"][t["instrument"] == dc.instruments.id(name)]
        assert np.allclose(b / inc, np.round(b / inc), rtol=0, atol=1e-6)
    # aggregated into bars the engine accepts, every print counted in their volume
    agg = TickAggregator([60, 3600])
    bars = np.concatenate([agg.update(t), agg.flush()])
    assert dc.market.reason_counts(dc.market.validate(bars)) == {}
    h1 = bars[bars["timeframe"] == 3600]
    assert h1["volume"].sum() == t["size"].sum() and len(h1) == 3


@pytest.mark.parametrize(("kwargs", "seconds", "error", "match"), [
    ({}, -1.0, ValueError, "seconds"),
    ({}, float("nan"), ValueError, "seconds"),
    ({}, "10", TypeError, "seconds"),
    ({"rate": 0.0}, 1.0, ValueError, "rate"),
    ({"rate": float("inf")}, 1.0, ValueError, "rate"),
    ({"seed": -1}, 1.0, ValueError, "seed"),
    ({"instruments": []}, 1.0, ValueError, "instrument"),
    ({"rate": 1000.0, "instruments": ["EURUSD", "GBPUSD"]}, 1e4, ValueError, "1e7 expected prints"),
    ({}, 2e8, ValueError, "seconds"),
    ({"rate": 1e-4}, 1.0, ValueError, "rate"),
    ({"start": "2262-04-11"}, 86400.0, ValueError, "int64 nanosecond range"),
    ({"start": None}, 1.0, TypeError, "start must be a time"),
    ({"start": "NaT"}, 1.0, ValueError, "start 'NaT' is a missing, unreadable or out-of-range time"),
    ({"start": "1600-01-01"}, 1.0, ValueError, "start '1600-01-01' is a time outside the int64 nanosecond range"),
    ({"instruments": ["EURUSD", "EURUSD"]}, 1.0, ValueError, "'EURUSD' is named twice"),
])
def test_tick_simulator_refuses_bad_arguments_changing_nothing(kwargs, seconds, error, match) -> None:
    with pytest.raises(error, match=match):
        sim = dc.sim.TickSimulator(**{"instruments": ["EURUSD"], **kwargs})
        before = repr(sim.__dict__)
        try:
            sim.ticks(seconds)
        finally:
            assert repr(sim.__dict__) == before


@pytest.mark.parametrize("kw, err, match", [
    ({"last_ts": [1.5]}, TypeError, "last_ts must be an integer array"),
    ({"last_ts": np.zeros((2, 2), np.int64)}, ValueError, "1-d array indexed by instrument id"),
    ({"last_ts": 5}, ValueError, "1-d array"),
    ({"allowed": [1, 0]}, TypeError, "allowed must be a bool array"),
    ({"sealed": [None]}, TypeError, "sealed must be an integer array"),
    ({"sealed": np.array([2**63 + 5], dtype=np.uint64)}, ValueError, "beyond int64"),
    ({"ts_range": (5,)}, TypeError, r"ts_range must be a \(first, last\) pair"),
    ({"ts_range": ("a", "b")}, TypeError, r"ts_range\[0\] must be an int"),
    ({"ts_range": (3, 2)}, ValueError, "starts after it ends"),
])
def test_validate_ticks_refuses_malformed_tables_with_typed_errors(kw, err, match) -> None:
    """The per-instrument tables and the time range are checked up front: a typed error that
    names the argument (numpy's indexing errors, or an AttributeError, before)."""
    t = random_ticks(5, _ids("EURUSD"), seed=1)
    with pytest.raises(err, match=match):
        validate_ticks(t, **kw)


def test_validate_ticks_takes_lists_and_an_empty_allowed_table() -> None:
    t = random_ticks(50, _ids("EURUSD"), seed=2)
    i = int(t["instrument"][0])
    assert (validate_ticks(t, allowed=[]) == TICK_REASONS.index("unknown_instrument")).all()
    first = int(t["ts"].min())
    late = validate_ticks(t, sealed=[first + 1] * (i + 1), last_ts=[-2**63] * (i + 1))
    assert (late == TICK_REASONS.index("late")).sum() == (t["ts"] < first + 1).sum() > 0
