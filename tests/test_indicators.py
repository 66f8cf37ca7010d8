"""Indicators equal TA-Lib from its first output on (1e-12 relative), on real market data."""

from __future__ import annotations

import numpy as np
import pytest
import talib
from hypothesis import given, settings
from hypothesis import strategies as st

import dynamic_core as dc

from .reference import ew_bands


def assert_matches(ours: np.ndarray, theirs: np.ndarray, scale: float = 0.0) -> None:
    """Warm-up (NaN) positions agree exactly, values to 1e-12 relative.

    ``scale`` (the input's magnitude) widens the tolerance to 1e-12 of it for series that are
    differences of two near-equal values (the MACD lines): the TA-Lib wheel's EMA differs from
    the textbook recursion by one ulp on some periods (EMA(35) on EURUSD, for one), which is
    1e-16 relative for the EMA but unbounded relative for a difference that cancels to ~0.
    """
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    m = ~np.isnan(theirs)
    assert m.any()
    np.testing.assert_allclose(ours[m], theirs[m], rtol=1e-12, atol=1e-12 * scale)


DATASETS = ["eurusd", "goog", "btcusd"]


@pytest.mark.parametrize("data", DATASETS)
@pytest.mark.parametrize("n", [2, 5, 14, 30, 35, 50])
def test_ema_rsi_atr_roc_equal_talib(request, data, n):
    b = request.getfixturevalue(data)
    if n >= len(b):
        pytest.skip("series shorter than the period")
    c, h, l = b["close"], b["high"], b["low"]
    assert_matches(dc.indicators.ema(c, n), talib.EMA(c, n))
    assert_matches(dc.indicators.rsi(c, n), talib.RSI(c, n))
    assert_matches(dc.indicators.atr(h, l, c, n), talib.ATR(h, l, c, n))
    assert_matches(dc.indicators.roc(c, n), talib.ROC(c, n))


@pytest.mark.parametrize("data", DATASETS)
@pytest.mark.parametrize("fast,slow,signal", [(12, 26, 9), (5, 35, 5), (3, 10, 16), (26, 12, 9), (2, 2, 2)])
def test_macd_equals_talib(request, data, fast, slow, signal):
    b = request.getfixturevalue(data)
    if max(fast, slow) + signal >= len(b):
        pytest.skip("series shorter than the lookback")
    ours = dc.indicators.macd(b["close"], fast, slow, signal)
    theirs = talib.MACD(b["close"], fast, slow, signal)
    for o, t in zip(ours, theirs):
        assert_matches(o, t, scale=float(np.abs(b["close"]).max()))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0.5, 2.0), min_size=40, max_size=200),
    st.integers(2, 30),
)
def test_random_series_match_talib(values, n):
    c = np.cumprod(np.asarray(values))
    h, l = c * 1.01, c * 0.99
    assert_matches(dc.indicators.ema(c, n), talib.EMA(c, n))
    assert_matches(dc.indicators.rsi(c, n), talib.RSI(c, n))
    assert_matches(dc.indicators.atr(h, l, c, n), talib.ATR(h, l, c, n))
    for o, t in zip(dc.indicators.macd(c, 3, n, 4), talib.MACD(c, 3, n, 4)):
        assert_matches(o, t, scale=float(c.max()))


def test_ew_bands_match_reference(eurusd):
    c = eurusd["close"]
    mean, var, pos = dc.indicators.ew_bands(c, 20)
    rm, rv = ew_bands(c, 20)
    np.testing.assert_allclose(mean, rm, rtol=1e-12)
    np.testing.assert_allclose(var, rv, rtol=1e-9)
    sd = np.sqrt(rv)
    z = (c - rm) / (2 * sd)
    np.testing.assert_allclose(pos, z / (1 + np.abs(z)), rtol=1e-9)
    assert np.isnan(mean[:19]).all() and not np.isnan(mean[19:]).any()


def test_flat_series_rsi_is_zero_like_talib():
    c = np.full(50, 1.2345)
    assert_matches(dc.indicators.rsi(c, 14), talib.RSI(c, 14))


def test_bad_arguments():
    with pytest.raises(ValueError, match="period"):
        dc.indicators.ema(np.ones(10), 0)
    with pytest.raises(TypeError, match="1-dimensional"):
        dc.indicators.ema(np.ones((3, 3)), 2)
    with pytest.raises(ValueError, match="length"):
        dc.indicators.atr(np.ones(5), np.ones(4), np.ones(5), 2)
    assert np.isnan(dc.indicators.ema(np.ones(3), 5)).all()
    # a period is an int: a float, bool or str was cut or converted and ran
    for bad in (2.9, True, "3", None):
        with pytest.raises(TypeError, match="period"):
            dc.indicators.ema(np.ones(10), bad)
    with pytest.raises(ValueError, match="period"):
        dc.indicators.rsi(np.ones(10), 2**31)
    with pytest.raises(TypeError, match="1-dimensional"):
        dc.indicators.ema(3.0, 2)  # a 0-d value gave [nan]
    with pytest.raises(TypeError, match="numbers"):
        dc.indicators.ema(["a", "b"], 2)
    assert dc.indicators.ema(np.ones(10), np.int64(3))[-1] == 1.0


def test_leading_nans_are_skipped_like_talib():
    # a pct_change() series starts with NaN: every output was NaN; TA-Lib's wrapper skips it
    rng = np.random.default_rng(3)
    c = np.cumprod(1 + rng.normal(0, 0.01, 300))
    r = np.concatenate(([np.nan], c[1:] / c[:-1] - 1))
    for ours, theirs in ((dc.indicators.ema(r, 10), talib.EMA(r, 10)), (dc.indicators.rsi(r, 14), talib.RSI(r, 14)),
                         (dc.indicators.roc(c, 5), talib.ROC(c, 5))):
        assert np.isfinite(ours).sum() > 250
        assert_matches(ours, theirs)
    lead = np.concatenate(([np.nan] * 3, c))
    for ours, theirs in zip(dc.indicators.macd(lead), talib.MACD(lead)):
        assert_matches(ours, theirs)
    h, lo = lead * 1.01, lead * 0.99
    assert_matches(dc.indicators.atr(h, lo, lead, 7), talib.ATR(h, lo, lead, 7))
    assert np.isnan(dc.indicators.ema(np.full(5, np.nan), 2)).all()


def test_rsi_keeps_100_while_a_lone_gain_decays_like_talib():
    # One up-move then a flat series: the average gain decays geometrically far below 1e-8.
    # TA-Lib 0.6+ returns 100 until the sum is exactly 0 (an older epsilon test gave 0 here).
    c = np.array([1.0] * 13 + [2.0] * 60)
    ours, theirs = dc.indicators.rsi(c, 2), talib.RSI(c, 2)
    assert theirs[-1] == 100.0
    assert_matches(ours, theirs)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_bad_value_after_the_first_as_documented_against_talib(bad):
    # the module docstring said "a NaN after the first value makes every later output NaN, as in
    # TA-Lib": not so for RSI (TA-Lib gives 0.0 there), ROC (NaN only where it reads the NaN) or
    # ew_bands' feature (0.0). These pin down what it now says, TA-Lib as the oracle.
    rng = np.random.default_rng(7)
    c = 100 * np.cumprod(1 + rng.normal(0, 0.01, 120))
    x = c.copy()
    x[60] = bad
    assert_matches(dc.indicators.ema(x, 5), talib.EMA(x, 5))
    for ours, theirs in zip(dc.indicators.macd(x, 3, 6, 2), talib.MACD(x, 3, 6, 2)):
        assert_matches(ours, theirs, scale=100.0)
    assert_matches(dc.indicators.roc(x, 5), talib.ROC(x, 5))
    h, lo = c * 1.01, c * 0.99
    h[60] = bad
    assert_matches(dc.indicators.atr(h, lo, c, 7), talib.ATR(h, lo, c, 7))
    ours, theirs = dc.indicators.rsi(x, 14), talib.RSI(x, 14)
    assert_matches(ours[:60], theirs[:60])
    assert np.isnan(ours[60:]).all() and (theirs[60:] == 0.0).all()  # where TA-Lib differs
    if np.isnan(bad):
        assert np.isnan(dc.indicators.ema(x, 5)[60:]).all()
        assert np.isnan(dc.indicators.atr(h, lo, c, 7)[60:]).all()
        r = dc.indicators.roc(x, 5)
        assert np.isnan(r[[60, 65]]).all() and np.isfinite(np.delete(r[5:], [55, 60])).all()
        mean, var, feat = dc.indicators.ew_bands(x, 5)
        assert np.isnan(mean[60:]).all() and np.isnan(var[60:]).all() and (feat[60:] == 0.0).all()
        assert np.isfinite(feat[4:60]).all()


def test_a_bool_array_is_not_a_series_of_numbers():
    # the docstring says non-numbers raise TypeError, but a bool array ran as 0/1
    for fn, args in ((dc.indicators.ema, (2,)), (dc.indicators.rsi, ()), (dc.indicators.roc, ()),
                     (dc.indicators.macd, ()), (dc.indicators.ew_bands, ())):
        with pytest.raises(TypeError, match=r"x must hold numbers .*got bool.*astype\(float\)"):
            fn([True, False, True], *args)
    with pytest.raises(TypeError, match="close must hold numbers"):
        dc.indicators.atr(np.ones(5), np.ones(5), np.ones(5, dtype=bool), 2)
    want = talib.EMA(np.array([1.0, 0.0, 1.0]), 2)  # 0/1 meant: cast first, or ints
    assert_matches(dc.indicators.ema(np.array([True, False, True]).astype(float), 2), want)
    assert_matches(dc.indicators.ema(np.array([1, 0, 1], dtype=np.int8), 2), want)


def test_a_nan_close_does_not_reach_atr_as_in_talib_but_a_nan_high_does():
    import talib

    h = np.linspace(2.0, 11.0, 10)
    lo, c = h - 1.0, h - 0.5
    c_nan = c.copy()
    c_nan[6] = np.nan
    got = dc.indicators.atr(h, lo, c_nan, 3)
    np.testing.assert_allclose(got, talib.ATR(h, lo, c_nan, 3), rtol=1e-12)
    assert np.isfinite(got[3:]).all()  # what the module docstring says
    h_nan = h.copy()
    h_nan[6] = np.nan
    got = dc.indicators.atr(h_nan, lo, c, 3)
    np.testing.assert_allclose(got, talib.ATR(h_nan, lo, c, 3), rtol=1e-12)
    assert np.isnan(got[6:]).all()


def test_ema_of_period_1_is_the_input_as_in_talib_and_in_the_agents():
    """The blend ((x - v) * k) + v with k = 1 is not x once x and v differ by more than 2x (1e20
    then 1 gave 0), and stayed NaN after one NaN or inf; TA-Lib's EMA of period 1 is the input.
    The agents' bank (its steady form too) reads the same: a fast EMA of period 1 is the close."""
    for x in ([1e20, 1.0, 3.0, 0.1, 7.0], [1.0, 2.0, np.nan, 4.0, 5.0], [1.0, np.inf, 3.0, 4.0],
              [5.0, -1e300, 2e-300, 3.0]):
        x = np.array(x)
        np.testing.assert_array_equal(dc.indicators.ema(x, 1), talib.EMA(x, 1))
    # agents: trend = soft((ema_fast - ema_slow) / atr) with fast 1 reads the close itself
    bars = dc.sim.MarketSimulator(["EMA1"], timeframe="H1", seed=7).bars(300)
    bars["close"][150] = bars["close"][149] * 1e6  # a jump the blend would not follow exactly
    bars["high"][150] = bars["close"][150]
    pop = dc.Population.grid("EMA1", "H1", fast=1, slow=3, atr_period=2, w_trend=1.0, w_rsi=0.0, w_macd=0.0,
                             w_bb=0.0, w_mom=0.0, entry=0.0)
    c, h, lo = bars["close"], bars["high"], bars["low"]
    e1, e3, atr = talib.EMA(c, 1), talib.EMA(c, 3), talib.ATR(h, lo, c, 2)
    feat = (e1 - e3) / atr
    want = np.where(atr == 0, 0.0, feat / (1 + np.abs(feat)))
    want = want / (1 + np.abs(want))
    with dc.Engine(pop, threads=1) as eng:
        got = []
        for i in range(len(bars)):
            eng.run(bars[i:i + 1])
            got.append(eng.agents()["score"][0])
    np.testing.assert_allclose(np.array(got)[3:], want[3:], rtol=1e-12, atol=0)
    np.testing.assert_array_equal(np.array(got)[148:153], want[148:153])  # exactly: the jump too
