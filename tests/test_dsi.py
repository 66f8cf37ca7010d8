"""DSI: MicroTape tokens, each micro-expert on constructed sequences and against plain per-tick
reference loops, the n-gram classifier on a planted pattern, log-odds fusion arithmetic, and the
Dsi façade (bounded evidence, batching, malformed ticks), and a tick feed driving an engine
with that evidence."""

from __future__ import annotations

import math
import re
from itertools import pairwise

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dynamic_core as dc
from dynamic_core.learning.dsi import (
    AbsorptionExpert,
    AnomalyScorer,
    DivergenceVerifier,
    Dsi,
    DsiFusion,
    MicroTape,
    NGramClassifier,
    RunExperts,
    TickDriver,
    decode,
    encode,
    token_name,
)
from dynamic_core.learning.dsi._scan import EwMoments, window_sums
from dynamic_core.learning.dsi.experts import Calls, symbols
from dynamic_core.learning.dsi.pipeline import EXPERTS
from dynamic_core.learning.dsi.tape import N_TOKENS
from dynamic_core.ticks import TickAggregator

NS = 1_000_000_000
T0 = 1_700_000_000 * NS


# -- helpers ---------------------------------------------------------------------------------
def moves_of(price: np.ndarray) -> np.ndarray:
    m = np.zeros(len(price), dtype=np.int8)
    m[1:] = np.sign(np.diff(price))
    return m


def split_points(n: int, pieces: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(np.arange(1, n), size=pieces - 1, replace=False))


def run_batches(step, arrays: list[np.ndarray], cuts) -> dict[str, list[tuple[int, int]]]:
    """Feed ``step`` the arrays cut at ``cuts``; collect calls as (global index, sign)."""
    out: dict[str, list[tuple[int, int]]] = {}
    bounds = [0, *list(cuts), len(arrays[0])]
    for a, b in pairwise(bounds):
        res = step(*[x[a:b] for x in arrays])
        if isinstance(res, Calls):
            res = {"calls": res}
        for name, c in res.items():
            out.setdefault(name, []).extend((a + int(i), int(s)) for i, s in zip(c.index, c.sign))
    return out


def microstructure(n: int, seed: int) -> dict[str, np.ndarray]:
    """A tick stream with bursts, stalls, reversals and size clusters, so every expert fires."""
    rng = np.random.default_rng(seed)
    regime = np.repeat(rng.integers(0, 4, n // 40 + 1), 40)[:n]
    drift = np.choose(regime, [0.0, 0.6, -0.6, 0.0])
    step = np.sign(rng.normal(drift, 1.0)) * (rng.random(n) < np.where(regime == 3, 0.1, 0.6))
    step = step * np.where(rng.random(n) < 0.003, 12, 1)  # the odd gap
    price = 100.0 + 0.01 * np.cumsum(step)
    size = np.round(rng.lognormal(0.0, 1.0, n) * np.where(rng.random(n) < 0.02, 8.0, 1.0) + 1.0)
    size *= np.where(regime == 3, 3.0, 1.0)  # heavy one-sided flow at a standstill
    agg = np.where(regime == 3, np.where(rng.random(n) < 0.95, -1, 1), np.sign(step))
    agg = np.where(agg == 0, rng.choice([-1, 1], n), agg).astype(np.int8)
    ts = T0 + np.cumsum(rng.integers(1, 400_000_000, n))
    return {"ts": ts, "price": price, "size": size, "aggressor": agg}


def as_ticks(d: dict[str, np.ndarray], instrument: int) -> np.ndarray:
    t = np.zeros(len(d["price"]), dtype=dc.TICK_DTYPE)
    t["ts"] = d["ts"]
    t["instrument"] = instrument
    t["price"] = d["price"]
    t["size"] = d["size"]
    t["side"] = np.where(d["aggressor"] > 0, 1, 2)
    t["bid"] = d["price"] - 0.005
    t["ask"] = d["price"] + 0.005
    return t


# -- MicroTape -------------------------------------------------------------------------------
def test_token_encoding_round_trips():
    toks = [encode(d, s, sp, a) for a in range(3) for sp in range(3) for s in range(4) for d in range(3)]
    assert toks == list(range(108))
    assert all(encode(*decode(t)) == t for t in toks)
    assert token_name(encode(1, 2, 0, 1)) == "up/large/tight/buy"
    assert token_name(encode(2, 3, 2, 2)) == "down/block/blown/sell"
    np.testing.assert_array_equal(encode(np.array([0, 1]), np.array([1, 1]), 0, 2), [75, 76])
    with pytest.raises(ValueError):
        decode(108)


def test_tape_on_constructed_ticks():
    tape = MicroTape(span=200.0)
    a = 2.0 / 201.0
    price = np.array([100.0, 100.1, 100.0, 100.0, 100.2])
    size = np.array([1.0, 10.0, 1.0, 1.0, 1.0])
    bid = np.array([99.9, 99.9, 99.95, 0.0, 99.8])
    ask = np.array([100.1, 100.1, 100.15, 0.0, 100.6])
    side = np.array([1, 0, 0, 0, 2], dtype=np.uint32)
    out = tape.step(price, size, bid, ask, side)
    np.testing.assert_array_equal(out.move, [0, 1, -1, 0, 1])
    # side given; quote rule at the ask; side of the mid; no quote and no move; side given
    np.testing.assert_array_equal(out.aggressor, [1, 1, -1, 0, -1])
    m1 = 1.0 + a * 9.0  # EW mean size after the 10-lot
    m2 = m1 + a * (1.0 - m1)
    np.testing.assert_allclose(out.size_ref, [1.0, 1.0, m1, m2, m2 + a * (1.0 - m2)], rtol=1e-14)
    np.testing.assert_array_equal(out.size_class, [1, 3, 1, 1, 1])
    np.testing.assert_allclose(out.spread[3], 0.2)  # carried over the unquoted tick
    np.testing.assert_array_equal(out.spread_class, [0, 0, 0, 0, 2])
    want = [encode(0, 1, 0, 1), encode(1, 3, 0, 1), encode(2, 1, 0, 2), encode(0, 1, 0, 0), encode(1, 1, 2, 2)]
    np.testing.assert_array_equal(out.token, want)
    # the next batch continues from the last price
    nxt = tape.step(np.array([100.1]), np.array([1.0]), np.array([0.0]), np.array([0.0]), np.array([0], np.uint32))
    assert nxt.move[0] == -1 and nxt.aggressor[0] == -1  # tick rule


def test_ew_moments_refuse_bad_shapes():
    with pytest.raises(TypeError, match="dimensional"):
        dc._core.ew_moments(np.ones((2, 2, 2)), 0.1, 0.0, 0.0)
    with pytest.raises(ValueError, match="one value per series"):
        dc._core.ew_moments(np.ones((4, 3)), 0.1, np.zeros(2), np.zeros(3))
    with pytest.raises(ValueError, match="one value per series"):
        dc._core.ew_moments(np.ones((4, 3)), 0.1, np.zeros(3), np.zeros(5))


def test_ew_moments_are_wests_recurrence_bit_for_bit_however_batched():
    rng = np.random.default_rng(5)
    x = rng.lognormal(0, 1, (5000, 3))
    a = 2.0 / (50 + 1.0)
    # the recurrence as written in EwMoments' docstring, one value at a time
    mb, vb = np.empty_like(x), np.empty_like(x)
    for c in range(3):
        m, v = float(x[0, c]), 0.0
        for i in range(len(x)):
            mb[i, c], vb[i, c] = m, v
            d = float(x[i, c]) - m
            m = (1 - a) * m + a * float(x[i, c])
            v = (1 - a) * v + (1 - a) * a * d * d
    em = EwMoments(3, 50)
    got = [em.step(x[a_:b]) for a_, b in pairwise([0, *split_points(len(x), 25, 2).tolist(), len(x)])]
    np.testing.assert_array_equal(np.concatenate([g[0] for g in got]), mb)
    np.testing.assert_array_equal(np.concatenate([g[1] for g in got]), vb)
    assert em.count == len(x)
    # and pandas agrees on the values (its own rounding)
    want = pd.DataFrame(x).ewm(span=50, adjust=False).mean().to_numpy()
    np.testing.assert_allclose(mb[1:], want[:-1], rtol=1e-12)


# -- anomaly scorers -------------------------------------------------------------------------
def test_anomaly_zscores_match_pandas_ewm():
    rng = np.random.default_rng(3)
    n = 3000
    size = rng.lognormal(0, 1, n)
    spread = rng.uniform(0.1, 0.3, n)
    ret = rng.normal(0, 1e-4, n)
    sc = AnomalyScorer(span=50, warmup=30)
    z = np.concatenate([sc.zscores(size[a:b], spread[a:b], ret[a:b])
                        for a, b in zip([0, 7, 1000, 2999], [7, 1000, 2999, 3000])])
    for j, x in enumerate((size, spread, ret)):
        s = pd.Series(x)
        m = s.ewm(span=50, adjust=False).mean().shift(1)
        v = s.ewm(span=50, adjust=False).var(bias=True).shift(1)
        ref = np.array((s - m) / np.sqrt(v), dtype=np.float64)
        ref[:30] = 0.0
        np.testing.assert_allclose(z[:, j], ref, rtol=1e-9, atol=1e-12)


def test_anomaly_calls():
    sc = AnomalyScorer(span=20, warmup=10, z_volume=3.0, z_return=3.0, z_spread=3.0)
    rng = np.random.default_rng(1)
    n = 60
    size = 1.0 + 0.1 * rng.random(n)
    size[40] = 50.0  # a block print by a seller
    spread = 0.2 + 0.001 * rng.random(n)
    spread[50] = 2.0
    ret = 1e-5 * rng.normal(size=n)
    ret[45] = 1e-2
    agg = np.ones(n, dtype=np.int8)
    agg[40] = -1
    move = np.ones(n, dtype=np.int8)
    z = sc.zscores(size, spread, ret)
    calls = sc.calls(z, agg, move)
    assert calls["volume_anomaly"].index.tolist() == [40] and calls["volume_anomaly"].sign.tolist() == [-1]
    assert calls["return_anomaly"].index.tolist() == [45] and calls["return_anomaly"].sign.tolist() == [1]
    assert calls["spread_anomaly"].index.tolist() == [50] and calls["spread_anomaly"].sign.tolist() == [0]


# -- run experts -----------------------------------------------------------------------------
def _runs(price, aggressor=None, ts=None, zsize=None, size=None, cuts=(), **kw):
    price = np.asarray(price, dtype=np.float64)
    n = len(price)
    move = moves_of(price)
    aggressor = move.copy() if aggressor is None else np.asarray(aggressor, dtype=np.int8)
    ts = T0 + np.arange(n, dtype=np.int64) * 100_000_000 if ts is None else np.asarray(ts, dtype=np.int64)
    zsize = np.zeros(n) if zsize is None else np.asarray(zsize, dtype=np.float64)
    size = np.ones(n) if size is None else np.asarray(size, dtype=np.float64)
    ex = RunExperts(**kw)
    return run_batches(ex.step, [ts, price, size, move, aggressor, zsize], cuts)


def test_momentum_burst():
    price = [100, 101, 102, 102, 103, 104, 105]
    for cuts in ((), (3,), (1, 2, 5)):
        assert _runs(price, cuts=cuts)["momentum"] == [(5, 1)]  # 4th move of the run
    assert _runs([105, 104, 103, 103, 102, 101])["momentum"] == [(5, -1)]
    sellers = [0, -1, -1, -1, -1, -1, -1]  # up-ticks on selling: not a burst
    assert _runs(price, aggressor=sellers)["momentum"] == []
    slow = T0 + np.arange(7) * NS  # four moves over 4 s
    assert _runs(price, ts=slow)["momentum"] == []
    # a run spanning most of int64's range is not quick (its duration wrapped negative before)
    far = np.array([-9 * 10**18, -9 * 10**18 + 1, -9 * 10**18 + 2, 9 * 10**18, 9 * 10**18 + 1, 9 * 10**18 + 2,
                    9 * 10**18 + 3], dtype=np.int64)
    assert _runs(price, ts=far)["momentum"] == []
    near = far.copy()
    near[3:] = near[2] + np.arange(1, 5)
    assert _runs(price, ts=near)["momentum"] == [(5, 1)]


def test_exhaustion_after_a_climax():
    price = [100, 101, 102, 103, 104, 105, 106, 107, 106, 105]
    z = np.zeros(10)
    z[5] = 5.0
    for cuts in ((), (8,), (2, 6, 9)):
        assert _runs(price, zsize=z, cuts=cuts)["exhaustion"] == [(8, -1)]
    assert _runs(price)["exhaustion"] == []  # no climax
    short = [100, 101, 102, 103, 104, 105, 104]  # five moves only
    assert _runs(short, zsize=np.full(7, 5.0))["exhaustion"] == []


SWEEP = [100, 101, 102, 103, 104, 105, 104, 103, 102, 101, 100, 101, 102, 103, 104, 105, 106, 105, 104, 103, 102]


def test_sweep_stop_run():
    for cuts in ((), (17,), (5, 11, 19)):
        assert _runs(SWEEP, cuts=cuts)["sweep"] == [(19, -1)]
    mirrored = [200 - p for p in SWEEP]
    assert _runs(mirrored)["sweep"] == [(19, 1)]
    no_break = [100, 101, 102, 103, 104, 105, 104, 103, 102, 101, 100, 101, 102, 103, 104, 103, 102, 101]
    assert _runs(no_break)["sweep"] == []
    passive = np.sign(np.diff(SWEEP, prepend=SWEEP[0])).astype(np.int8)
    passive[11:17] = -1  # the break up was made by sellers: not a stop run
    assert _runs(SWEEP, aggressor=passive)["sweep"] == []


class RefRuns:
    """The run experts as a plain per-tick state machine."""

    def __init__(self, K_m=4, th_m=0.6, T_m=2 * NS, K_e=6, z_e=3.0, K_s=3, th_s=0.6, rho=0.5):
        self.p = {"K_m": K_m, "th_m": th_m, "T_m": T_m, "K_e": K_e, "z_e": z_e, "K_s": K_s, "th_s": th_s, "rho": rho}

    def run(self, ts, price, size, aggressor, zsize):
        P = self.p
        out = {"momentum": [], "exhaustion": [], "sweep": []}
        last = None
        d, moves, vol, agg, maxz, start, armed = 0, 0, 0.0, 0.0, -math.inf, 0, False
        ends = [math.nan] * 3
        prev = (0, 0, 0.0, -math.inf)
        for t in range(len(price)):
            p = float(price[t])
            mv = 0 if last is None else (p > last) - (p < last)
            new = mv != 0 and mv != d
            if new:
                ends = ends[1:] + [last]
                prev = (d, moves, agg / vol if vol > 0 else 0.0, maxz)
                if prev[1] >= P["K_e"] and prev[3] >= P["z_e"] and prev[0] != 0:
                    out["exhaustion"].append((t, mv))
                d, moves, vol, agg, maxz, start, armed = mv, 0, 0.0, 0.0, -math.inf, ts[t], False
            moves += mv != 0
            vol += size[t]
            agg += size[t] if aggressor[t] == d else 0.0
            maxz = max(maxz, zsize[t])
            if mv != 0 and moves == P["K_m"] and agg >= P["th_m"] * vol and ts[t] - start <= P["T_m"]:
                out["momentum"].append((t, d))
            e3, e2, e1 = ends
            cond = (d != 0 and -d * (e1 - e3) > 0 and prev[1] >= P["K_s"] and prev[2] >= P["th_s"]
                    and abs(e1 - e2) > 0 and d * (p - e1) >= P["rho"] * abs(e1 - e2))
            if cond and not armed:
                out["sweep"].append((t, d))
            armed = cond
            last = p
        return out


@pytest.mark.parametrize("seed", [0, 1])
def test_run_experts_against_the_reference_state_machine(seed):
    d = microstructure(20_000, seed)
    z = np.random.default_rng(seed).normal(0, 1.5, len(d["price"]))
    ref = RefRuns().run(d["ts"], d["price"], d["size"], d["aggressor"], z)
    got = _runs(d["price"], aggressor=d["aggressor"], ts=d["ts"], zsize=z, size=d["size"],
                cuts=split_points(len(z), 40, seed))
    for name in ("momentum", "exhaustion", "sweep"):
        assert len(ref[name]) > 5, name
        assert got[name] == ref[name], name


def test_run_experts_native_pass_refuses_mismatched_columns():
    ex = RunExperts()
    z = np.zeros(3)
    with pytest.raises(ValueError, match="one length"):
        ex.step(np.arange(3, dtype=np.int64), np.ones(3), np.ones(2), np.zeros(3, np.int8), np.zeros(3, np.int8), z)
    with pytest.raises(ValueError, match="8 values"):
        dc._core.dsi_runs(np.arange(3), np.ones(3), np.ones(3), np.zeros(3, np.int8), np.zeros(3, np.int8), z,
                          [1.0], ex._state, ex._start_ts)
    with pytest.raises(TypeError):  # the carried state is written in place: never a converted copy
        dc._core.dsi_runs(np.arange(3), np.ones(3), np.ones(3), np.zeros(3, np.int8), np.zeros(3, np.int8), z,
                          ex._params, ex._state.astype(np.float32), ex._start_ts)
    assert ex.dir == 0 and len(ex.step(*(np.zeros(0, d) for d in (np.int64, float, float, np.int8, np.int8, float)))
                               ["momentum"].index) == 0


# -- absorption ------------------------------------------------------------------------------
def _absorb(price, size, aggressor, ref=None, cuts=(), **kw):
    n = len(price)
    ex = AbsorptionExpert(**kw)
    ref = np.ones(n) if ref is None else ref
    arrays = [np.asarray(price, float), np.asarray(size, float), np.asarray(aggressor, np.int8), ref]
    return run_batches(ex.step, arrays, cuts).get("calls", [])


def test_absorption_of_sellers_at_a_flat_price():
    n = 12
    flat = np.full(n, 100.0)
    sells = -np.ones(n)
    for cuts in ((), (4,), (3, 5, 6)):
        assert _absorb(flat, np.full(n, 2.0), sells, window=5, cuts=cuts) == [(5, 1)]
    assert _absorb(flat, np.full(n, 2.0), -sells, window=5) == [(5, -1)]  # buyers absorbed
    falling = 100.0 - 0.01 * np.arange(n)  # the sellers get their way: no absorption
    assert _absorb(falling, np.full(n, 2.0), sells, window=5) == []
    assert _absorb(flat, np.ones(n), sells, window=5) == []  # not heavy: 5 < 1.5 x 5 x 1
    mixed = np.where(np.arange(n) % 2 == 0, 1, -1)
    assert _absorb(flat, np.full(n, 2.0), mixed, window=5) == []  # not one-sided
    # the condition lapses and returns: a second call
    sz = np.full(20, 2.0)
    sz[8:12] = 0.1
    assert _absorb(np.full(20, 100.0), sz, -np.ones(20), window=5) == [(5, 1), (15, 1)]


def test_absorption_against_a_reference_window():
    d = microstructure(8000, 4)
    ref_size = pd.Series(d["size"]).ewm(span=200, adjust=False).mean().shift(1).bfill().to_numpy()
    W, share, vol = 20, 0.7, 1.5
    want, armed = [], False
    for t in range(len(ref_size)):
        cond = False
        if t >= W:
            s = float(np.sum(d["aggressor"][t - W + 1:t + 1] * d["size"][t - W + 1:t + 1]))
            v = float(np.sum(d["size"][t - W + 1:t + 1]))
            side = np.sign(s)
            cond = (s != 0 and abs(s) >= share * v and v >= vol * W * ref_size[t]
                    and side * (d["price"][t] - d["price"][t - W]) <= 0)
        if cond and not armed:
            want.append((t, int(-np.sign(s))))
        armed = cond
    got = _absorb(d["price"], d["size"], d["aggressor"], ref=ref_size, cuts=split_points(8000, 30, 1))
    assert len(want) > 5
    assert got == want


def test_absorption_after_a_block_print_does_not_depend_on_batching():
    # one valid print of 1e17 in a flat, sell-heavy tape: differences of one running total over
    # the batch lost the small prints' volume for the rest of the batch (3 calls in one batch,
    # 102 in batches of 200); each window's sum must be its own ticks' sum
    rng = np.random.default_rng(0)
    n, W = 4000, 20
    price = np.full(n, 100.0)
    size = rng.uniform(1, 3, n)
    size[100] = 1e17
    agg = rng.choice([-1, 1], n, p=[0.9, 0.1]).astype(np.int8)
    ref = np.full(n, 2.0)
    want, armed = [], False
    for t in range(n):
        cond = False
        if t >= W:
            s = math.fsum(agg[t - W + 1:t + 1] * size[t - W + 1:t + 1])
            v = math.fsum(size[t - W + 1:t + 1])
            cond = s != 0 and abs(s) >= 0.7 * v and v >= 0.5 * W * 2.0  # flat price: absorbed
        if cond and not armed:
            want.append((t, int(-np.sign(s))))
        armed = cond
    assert sum(t > 120 for t, _ in want) > 50
    for cuts in ((), range(200, n, 200), split_points(n, 50, 2), (1, 2, 3, 99, 100, 101, 119, 120, 121)):
        assert _absorb(price, size, agg, ref=ref, cuts=cuts, window=W, volume=0.5) == want



@pytest.mark.parametrize("w", [1, 3, 20, 500])
def test_window_sums_are_each_window_s_own_and_batch_invariant(w):
    rng = np.random.default_rng(w)
    n = 3000
    x = rng.integers(-50, 50, (2, n + w - 1)).astype(float)  # integer sums are exact
    x[1, 700] = 1e17  # a window without it must not feel it
    got = window_sums(x, w, first=-5)
    want = np.array([[math.fsum(x[c, j:j + w]) for j in range(n)] for c in range(2)])
    np.testing.assert_array_equal(got[0], want[0])
    clear = (np.arange(n) + w - 1 < 700) | (np.arange(n) > 700)
    np.testing.assert_array_equal(got[1][clear], want[1][clear])
    # the same bits from any later start, whichever way the running sums go (few or many blocks)
    y = rng.standard_normal((2, n + w - 1)) * 10.0 ** rng.integers(-8, 8, n + w - 1)
    full = window_sums(y, w, first=12345)
    for cut in (1, w // 2 + 1, 1000, n - 2, n - 1):
        np.testing.assert_array_equal(window_sums(y[:, cut:], w, first=12345 + cut), full[:, cut:])


# -- divergence ------------------------------------------------------------------------------
def reference_divergence(price, rsi_n, fast, slow, k, warmup):
    n = len(price)
    rsi, macd = np.empty(n), np.empty(n)
    g = l = 0.0
    ef = es = price[0]
    for t in range(n):
        dlt = 0.0 if t == 0 else price[t] - price[t - 1]
        g = (1 - 1 / rsi_n) * g + (1 / rsi_n) * max(dlt, 0.0)
        l = (1 - 1 / rsi_n) * l + (1 / rsi_n) * max(-dlt, 0.0)
        rsi[t] = 100 * g / (g + l) if g + l > 0 else 50.0
        af, as_ = 2 / (fast + 1), 2 / (slow + 1)
        ef = (1 - af) * ef + af * price[t]
        es = (1 - as_) * es + as_ * price[t]
        macd[t] = ef - es
    out = {"rsi_divergence": [], "macd_divergence": []}
    last = {1: None, -1: None}
    for t in range(n):
        c = t - k
        if c < k or c < warmup:
            continue
        left, right = price[c - k:c], price[c + 1:t + 1]
        for kind, ok in ((1, price[c] > left.max() and price[c] >= right.max()),
                         (-1, price[c] < left.min() and price[c] <= right.min())):
            if not ok:
                continue
            prev = last[kind]
            if prev is not None:
                pc, rc, mc = prev
                further = kind * (price[c] - pc) > 0
                if further and kind * (rsi[c] - rc) < 0:
                    out["rsi_divergence"].append((t, -kind))
                if further and kind * (macd[c] - mc) < 0:
                    out["macd_divergence"].append((t, -kind))
            last[kind] = (price[c], rsi[c], macd[c])
    return out, rsi, macd


def _divergence_batches(ver, price, cuts):
    """The verifier's calls over ``price`` cut at ``cuts``, and its RSI and MACD at every tick."""
    values = []

    def step(p):
        out = ver.step(p)
        values.append((ver.rsi, ver.macd))
        return out

    got = run_batches(step, [price], cuts)
    return got, np.concatenate([v[0] for v in values]), np.concatenate([v[1] for v in values])


def test_divergence_against_the_reference():
    d = microstructure(6000, 7)
    price = d["price"]
    want, rsi, macd = reference_divergence(price, 14, 12, 26, 5, 78)
    ver = DivergenceVerifier(rsi_period=14, macd_fast=12, macd_slow=26, pivot=5, warmup=78)
    got, got_rsi, got_macd = _divergence_batches(ver, price, split_points(len(price), 25, 2))
    for name in ("rsi_divergence", "macd_divergence"):
        assert len(want[name]) > 5 and {s for _, s in want[name]} == {-1, 1}
        assert got[name] == want[name], name
    # the indicators are the reference's recurrences, value for value, however the feed is cut
    np.testing.assert_array_equal(got_rsi, rsi)
    np.testing.assert_array_equal(got_macd, macd)
    assert ver.count == len(price)


def test_bearish_divergence_on_a_constructed_path():
    # a steep rally to a high, a pullback, then a slow grind to a slightly higher high
    up1 = list(np.linspace(100, 110, 11))
    down = list(np.linspace(109, 105, 5))
    grind = [105.5, 105.4, 106.0, 105.9, 106.5, 106.4, 107.0, 106.9, 107.5, 107.4, 108.0, 107.9, 108.5, 108.4,
             109.0, 108.9, 109.5, 109.4, 110.0, 109.9, 110.5]
    tail = [109.5, 109.0, 108.5, 108.0]
    price = np.array(up1 + down + grind + tail)
    ver = DivergenceVerifier(rsi_period=5, macd_fast=3, macd_slow=6, pivot=2, warmup=0)
    got = run_batches(ver.step, [price], ())
    c = len(up1) + len(down) + len(grind) - 1  # the second high
    assert got["rsi_divergence"] == [(c + 2, -1)]
    assert got["macd_divergence"] == [(c + 2, -1)]


@pytest.mark.parametrize("pieces", [1, 7, 40])
def test_divergence_leaves_out_absurd_prints_however_batched(pieces):
    # absurd prints (finite or not, far above or below the last price taken) stayed in the RSI
    # averages and the EMAs for thousands of ticks; left out, the calls are those of the feed
    # without them, at the same ticks
    clean = microstructure(6000, 7)["price"]
    at = [1000, 1001, 2500, 4000, 4500]
    bad = [1e300, 1e300, math.inf, 1e-300, clean[4500 - 5] * 50]
    price = clean.copy()
    for k, (i, x) in enumerate(zip(at, bad)):
        price = np.insert(price, i + k, x)
    pos = np.setdiff1d(np.arange(len(price)), [i + k for k, i in enumerate(at)])  # the clean ticks
    want, rsi, macd = reference_divergence(clean, 14, 12, 26, 5, 78)
    ver = DivergenceVerifier(rsi_period=14, macd_fast=12, macd_slow=26, pivot=5, warmup=78)
    cuts = sorted({*split_points(len(price), pieces, 3).tolist(), 1000, 1001, 1002}) if pieces > 1 else ()
    got, r, m = _divergence_batches(ver, price, cuts)
    for name in ("rsi_divergence", "macd_divergence"):
        assert len(want[name]) > 5
        assert got[name] == [(int(pos[t]), s) for t, s in want[name]], name
    np.testing.assert_array_equal(r[pos], rsi)
    np.testing.assert_array_equal(m[pos], macd)
    assert np.isnan(np.delete(r, pos)).all() and np.isnan(np.delete(m, pos)).all()
    assert (ver.skipped, ver.restarts, ver.count) == (5, 0, len(clean))


@pytest.mark.parametrize("cuts", [(), (50,), (1, 100, 101, 102)])
def test_divergence_restarts_when_the_stream_has_moved(cuts):
    # the first print is the absurd one: the next DIV_RESTART_AFTER are left out, then the
    # indicators start over from the next print as on a new stream
    from dynamic_core.learning.dsi.experts import DIV_RESTART_AFTER as R

    clean = microstructure(4000, 8)["price"]
    price = np.concatenate(([1e300], clean))
    want, _, _ = reference_divergence(clean[R:], 14, 12, 26, 5, 78)
    ver = DivergenceVerifier(rsi_period=14, macd_fast=12, macd_slow=26, pivot=5, warmup=78)
    got = run_batches(ver.step, [price], cuts)
    assert (ver.skipped, ver.restarts, ver.count) == (R, 1, len(clean) - R)
    for name in ("rsi_divergence", "macd_divergence"):
        assert len(want[name]) > 5
        assert got[name] == [(t + R + 1, s) for t, s in want[name]], name



def _screen_oracle(price, max_jump):
    """The absurd-print rule tick by tick: what the verifier takes, and where it restarts."""
    from dynamic_core.learning.dsi.experts import DIV_RESTART_AFTER

    ref, streak, taken, restarts = math.nan, 0, [], []
    for t, p in enumerate(price.tolist()):
        ok = math.isfinite(p) and p > 0
        if math.isinf(p) or (ok and (p > max_jump * ref or p < ref / max_jump)):
            if not ok or streak < DIV_RESTART_AFTER:
                taken.append(False)
                streak += 1
                continue
            restarts.append(t)
        taken.append(True)
        if ok:  # a NaN or non-positive print is not judged and does not end a run of absurd ones
            ref, streak = p, 0
    return np.array(taken), restarts


@pytest.mark.parametrize("seed", range(4))
def test_divergence_screen_follows_the_per_tick_rule_however_batched(seed):
    rng = np.random.default_rng(seed)
    for _ in range(25):
        n = int(rng.integers(1, 900))
        price = 100 * np.exp(np.cumsum(rng.normal(0, 0.05, n)))
        kind = rng.integers(0, 40, n)
        price[kind == 1] = 1e300
        price[kind == 2] = np.inf
        price[kind == 3] = 1e-300
        price[kind == 4] = np.nan
        price[kind == 5] = -1.0
        price[: int(rng.integers(0, n + 1)) if rng.random() < 0.3 else 0] *= 1e6  # the stream moves
        jump = float(rng.choice([1.5, 10.0, 1e3]))
        taken, restarts = _screen_oracle(price, jump)
        ver = DivergenceVerifier(rsi_period=3, macd_fast=2, macd_slow=4, pivot=1, warmup=0, max_jump=jump)
        cuts = split_points(n, min(n, 6), int(rng.integers(1 << 30))) if n > 1 else ()
        rsi = []
        for a, b in pairwise([0, *cuts, n]):
            ver.step(price[a:b])
            rsi.append(ver.rsi)
        # a print left out has no RSI; every print taken has one
        np.testing.assert_array_equal(np.isnan(np.concatenate(rsi)), ~taken)
        assert (ver.skipped, ver.restarts) == (int((~taken).sum()), len(restarts))


# -- sequence classifier ---------------------------------------------------------------------
def test_ngram_learns_a_planted_pattern():
    rng = np.random.default_rng(5)
    n = 6000
    move = rng.choice([-1, 0, 1], n)
    for t in range(2, n):  # planted: two up-ticks are always followed by a down-tick
        if move[t - 2] == 1 and move[t - 1] == 1:
            move[t] = -1
    agg = np.where(move > 0, 1, np.where(move < 0, -1, 0)).astype(np.int8)
    size_class = np.ones(n, dtype=np.uint8)
    sym = symbols(move, agg, size_class)
    outcome = np.where(move < 0, 2, move)
    clf = NGramClassifier(order=3, alpha=1.0)
    probs = np.concatenate([clf.update(sym[a:b], outcome[a:b], predictions=True)
                            for a, b in zip([0, 1000, 1001, 3500], [1000, 1001, 3500, n])])
    # the planted context predicts down, the others stay near a third each
    up2 = np.zeros(n, dtype=bool)
    up2[2:] = (move[:-2] == 1) & (move[1:-1] == 1)
    late = np.arange(n) > n // 2
    assert (probs[up2 & late].argmax(axis=1) == 2).all()
    assert probs[up2 & late, 2].min() > 0.95
    other = ~up2 & late & ~np.isnan(probs[:, 0])
    assert np.abs(probs[other] - 1 / 3).max() < 0.15
    # exactly what a tick-by-tick loop with a dict of counts gives
    counts: dict[tuple[int, int], list[int]] = {}
    for t in range(2, n):
        c = counts.setdefault((int(sym[t - 2]), int(sym[t - 1])), [0, 0, 0])
        ref = (np.array(c) + 1.0) / (sum(c) + 3.0)
        np.testing.assert_allclose(probs[t], ref, rtol=1e-15)
        c[outcome[t]] += 1
    assert np.isnan(probs[:2]).all()
    # after two up-ticks: down
    clf.update(symbols(np.array([1, 1]), np.array([1, 1]), np.ones(2)), np.array([1, 1]))
    assert clf.log_odds() < -3 and clf.predict()[2] > 0.95
    assert clf.context_name() == "up.buy>up.buy"


# -- fusion ----------------------------------------------------------------------------------
def test_fusion_is_log_odds_arithmetic():
    f = DsiFusion(("a", "b"), weights={"a": 0.8, "b": 0.5, "sequence": 2.0}, half_life=10.0, spread_damp=0.25)
    st = f.new_state()
    tok = np.arange(11, dtype=np.uint8)
    f.fuse(st, 5, {"a": Calls(np.array([4]), np.array([1], np.int8))}, tok[:5])
    assert DsiFusion.log_odds(st) == pytest.approx(0.8, rel=1e-15)
    p = 1.0 / (1.0 + math.exp(-0.8))
    assert DsiFusion.evidence(st) == pytest.approx(2 * p - 1, rel=1e-14)  # P(up) - P(down)
    # a call half a life old counts half; the old state fades by the batch's length
    f.fuse(st, 11, {"b": Calls(np.array([0]), np.array([-1], np.int8))}, tok)
    want = 0.8 * 0.5 ** 1.1 - 0.5 * 0.5
    assert DsiFusion.log_odds(st) == pytest.approx(want, rel=1e-13)
    # a damped tick, and the sequence classifier's log-odds (weighted), which is not accumulated
    f.fuse(st, 1, {"a": Calls(np.array([0]), np.array([-1], np.int8))}, tok[:1], damped=np.array([True]),
           sequence=0.3, sequence_context="x")
    want = want * 0.5 ** 0.1 - 0.8 * 0.25 + 2.0 * 0.3
    assert DsiFusion.log_odds(st) == pytest.approx(want, rel=1e-13)
    top = f.top(st, 5, by="expert")
    assert [c.name for c in top] == ["sequence", "b", "a"] or [c.name for c in top] == ["sequence", "a", "b"]
    assert abs(top[0].log_odds) >= abs(top[1].log_odds) >= abs(top[2].log_odds)
    assert sum(c.log_odds for c in top) == pytest.approx(want, rel=1e-12)
    by_tok = f.top(st, 10, by="token")
    assert sum(c.log_odds for c in by_tok) == pytest.approx(want, rel=1e-12)
    assert by_tok[0].name == "sequence:x"
    assert {c.name for c in by_tok[1:]} == {token_name(0), token_name(4)}


def test_evidence_is_bounded():
    f = DsiFusion(("a",), weights={"a": 1e6}, half_life=1e9)
    st = f.new_state()
    f.fuse(st, 3, {"a": Calls(np.arange(3), np.ones(3, np.int8))}, np.zeros(3, np.uint8))
    assert DsiFusion.evidence(st) == 1.0
    f.fuse(st, 3, {"a": Calls(np.arange(3), -np.ones(3, np.int8) * 1)}, np.zeros(3, np.uint8))
    f.fuse(st, 3, {"a": Calls(np.arange(3), -np.ones(3, np.int8))}, np.zeros(3, np.uint8))
    assert DsiFusion.evidence(st) == -1.0
    with pytest.raises(ValueError):
        DsiFusion(("a",), weights={"nope": 1.0})


def _fuse_cut(f: DsiFusion, cuts: list[int], calls: dict[str, tuple[np.ndarray, np.ndarray]],
              tokens: np.ndarray, damped: np.ndarray):
    """Fuse the calls of ``len(tokens)`` ticks in batches of the lengths ``cuts`` (then the rest)."""
    state = f.new_state()
    bounds = [0]
    for c in cuts:
        bounds.append(min(bounds[-1] + c, len(tokens)))
    bounds.append(len(tokens))
    for a, b in pairwise(bounds):
        part = {}
        for name, (idx, sign) in calls.items():
            m = (idx >= a) & (idx < b)
            part[name] = Calls(idx[m] - a, sign[m])
        f.fuse(state, b - a, part, tokens[a:b], damped[a:b], sequence=0.01 * b, sequence_context=str(b))
    return state


def _fusion_bits(f: DsiFusion, state) -> tuple:
    return (state.by_expert.tobytes(), state.by_token.tobytes(), DsiFusion.log_odds(state),
            DsiFusion.evidence(state), f.top(state, 99), f.top(state, 99, by="expert"), state.calls.tolist(),
            state.last_token.tolist(), state.ticks)


@settings(max_examples=100, deadline=None)
@given(data=st.data(), n=st.integers(0, 300), block=st.sampled_from([1, 2, 3, 7, 16, 64, 4096]),
       half_life=st.sampled_from([0.5, 3.0, 10.0, 77.7, 1e9, 1e-300]))
def test_fusion_is_bit_identical_however_the_ticks_are_batched(data, n, block, half_life):
    # Random calls of three experts (and one the fusion does not know), random cut patterns
    # with batches of 0 and 1 ticks and cuts on and around block ends: every contribution, the
    # log-odds, the evidence and the breakdowns have the same bits as with one batch; and they
    # match a plain loop summing each call's w * sign * damp * 0.5 ** (age / half_life).
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    w = {"a": 0.8, "b": -0.5, "c": 1.3}
    f = DsiFusion(("a", "b", "c"), weights=w, half_life=half_life, spread_damp=0.25, block=block)
    calls = {}
    for name in ("a", "b", "c", "unknown"):
        idx = np.flatnonzero(rng.random(n) < rng.choice([0.0, 0.1, 0.5, 1.0]))
        calls[name] = (idx, rng.choice(np.array([-1, 0, 1], np.int8), len(idx), p=[0.45, 0.1, 0.45]))
    tokens = rng.integers(0, N_TOKENS, n).astype(np.uint8)
    damped = rng.random(n) < 0.2
    whole = _fusion_bits(f, _fuse_cut(f, [], calls, tokens, damped))
    for _ in range(4):
        cuts = data.draw(st.lists(st.one_of(st.sampled_from([0, 1, block - 1, block, block + 1]),
                                            st.integers(0, 3 * block)), max_size=60), label="cuts")
        assert _fusion_bits(f, _fuse_cut(f, cuts, calls, tokens, damped)) == whole
    assert _fusion_bits(f, _fuse_cut(f, [1] * n, calls, tokens, damped)) == whole
    # the arithmetic, against a plain loop
    by_expert = np.zeros(3)
    terms: list[list[float]] = [[], [], []]
    for e, name in enumerate(("a", "b", "c")):
        idx, sign = calls[name]
        for i, s_ in zip(idx.tolist(), sign.tolist()):
            terms[e].append(w[name] * s_ * (0.25 if damped[i] else 1.0) * 0.5 ** ((n - 1 - i) / half_life))
        by_expert[e] = math.fsum(terms[e])
    scale = sum(abs(x) for t in terms for x in t) + 1e-300
    state = _fuse_cut(f, [], calls, tokens, damped)
    assert np.abs(state.by_expert - by_expert).max() <= 1e-12 * scale
    assert state.by_token.sum() == pytest.approx(by_expert.sum(), rel=0, abs=1e-12 * scale)
    assert DsiFusion.log_odds(state) == pytest.approx(math.fsum(by_expert) + 0.01 * n, rel=0,
                                                  abs=1e-12 * scale + 1e-15)


# -- the façade ------------------------------------------------------------------------------
def _feed(names, seed, n=30_000):
    ids = [dc.instruments.id(x) for x in names]
    parts = [as_ticks(microstructure(n, seed + k), i) for k, i in enumerate(ids)]
    allt = np.concatenate(parts)
    return allt[np.argsort(allt["ts"], kind="stable")]


def test_dsi_evidence_is_bounded_and_does_not_depend_on_batching():
    names = ["DSI_A", "DSI_B", "DSI_C"]
    ticks = _feed(names, 11)
    one = Dsi(names)
    one.update(ticks)
    many = Dsi(names)
    for part in np.split(ticks, split_points(len(ticks), 60, 3)):
        many.update(part)
    for nm in names:
        assert -1.0 <= one.evidence(nm) <= 1.0
        assert one.calls(nm) == many.calls(nm)
        assert all(v > 0 for v in one.calls(nm).values()), one.calls(nm)
        # bit for bit: the fusion's decay blocks sit at absolute tick positions
        assert one.evidence(nm) == many.evidence(nm) and one.log_odds(nm) == many.log_odds(nm)
        assert one.top(nm, 99) == many.top(nm, 99) and one.top(nm, 9, by="expert") == many.top(nm, 9, by="expert")
        top = one.top(nm, 4)
        assert len(top) == 4 and all(abs(a.log_odds) >= abs(b.log_odds) for a, b in pairwise(top))
    assert one.ticks == len(ticks) and one.rejects == {}


def _random_cuts(rng: np.random.Generator, n: int, around: int) -> list[int]:
    """Batch bounds over ``n`` ticks: empty batches, runs of 1-tick batches (some across the
    block end ``around``), short and long ones."""
    bounds = [0]
    while bounds[-1] < n:
        a = bounds[-1]
        if abs(a - around) < 60:
            bounds.append(a + 1)
            continue
        kind = rng.choice(4, p=[0.1, 0.3, 0.4, 0.2])
        step = (0, 1, int(rng.integers(2, 60)), int(rng.integers(60, 2000)))[kind]
        if a < around - 60:
            step = min(step, around - 60 - a)  # never over the run of 1-tick batches
        bounds.append(min(n, a + step))
    return bounds


def test_dsi_evidence_is_bit_identical_for_random_cut_patterns():
    # Many random cut patterns (batches of 0 and 1 ticks among short and long ones, runs of
    # 1-tick batches across a block end), one and two threads, decay blocks of 64 ticks (each
    # instrument crosses many) and the default ones: the evidence, log-odds, breakdowns and
    # calls are those of one batch, bit for bit.
    names = ["DSI_A", "DSI_B", "DSI_C"]
    ticks = _feed(names, 31, n=5000)
    rng = np.random.default_rng(8)
    updates = 0
    for block in (64, 4096):

        def make(threads=1, block=block):
            d = Dsi(names, threads=threads)
            d.fusion = DsiFusion(EXPERTS, weights=dict(d.config.weights), half_life=d.config.half_life,
                                 spread_damp=d.config.spread_damp, block=block)
            return d

        def bits(d):
            return [(d.evidence(nm), d.log_odds(nm), d.top(nm, 99), d.top(nm, 9, by="expert"), d.calls(nm))
                    for nm in names]

        one = make()
        one.update(ticks)
        want = bits(one)
        assert all(e != 0 for e, *_ in want)
        for trial in range(6):
            # where in the feed one instrument's ticks reach a block end
            mine = np.flatnonzero(ticks["instrument"] == dc.instruments.id(names[trial % 3]))
            around = int(mine[block * (1 + trial * (block == 64))])
            bounds = _random_cuts(rng, len(ticks), around)
            updates += len(bounds) - 1
            with make(threads=1 + trial % 2) as d:
                for a, b in pairwise(bounds):
                    d.update(ticks[a:b])
                assert bits(d) == want, (block, trial)
    assert updates > 12 * 100


def test_dsi_reads_an_aggressive_rally_as_up():
    rng = np.random.default_rng(2)
    n = 3000
    step = np.where(rng.random(n) < 0.7, 1, np.where(rng.random(n) < 0.5, 0, -1))
    price = 100 + 0.01 * np.cumsum(step)
    d = {"ts": T0 + np.arange(n) * 50_000_000, "price": price, "size": np.ones(n) + (step > 0),
         "aggressor": np.where(step >= 0, 1, -1).astype(np.int8)}
    dsi = Dsi(["RALLY"])
    dsi.update(as_ticks(d, dc.instruments.id("RALLY")))
    assert dsi.evidence("RALLY") > 0.5
    assert dsi.validation("RALLY", +1) == dsi.evidence("RALLY") == -dsi.validation("RALLY", -2.0)
    assert dsi.validation("RALLY", 0) == 0.0
    assert dsi.top("RALLY", 1, by="expert")[0].log_odds > 0


def test_dsi_rejects_malformed_ticks_and_counts_them():
    dsi = Dsi(["DSI_A"], max_dead_letters=2)
    i = dc.instruments.id("DSI_A")
    other = dc.instruments.id("DSI_OTHER")
    t = as_ticks(microstructure(100, 1), i)
    bad = t[:4].copy()
    bad["price"][0] = np.nan
    bad["size"][1] = -1
    bad["instrument"][2] = other
    bad["ts"][3] = t["ts"][0] - 1
    dsi.update(np.concatenate([t[:50], bad, t[50:]]))
    assert dsi.rejects == {"non_finite": 1, "negative_size": 1, "unknown_instrument": 1, "out_of_order": 1}
    assert dsi.ticks == 100 and len(dsi.dead_letters()) == 2
    with pytest.raises(KeyError):
        dsi.evidence("DSI_OTHER")
    assert Dsi(["DSI_A"]).evidence("DSI_A") == 0.0 and Dsi(["DSI_A"]).top("DSI_A") == []
    with pytest.raises(TypeError):
        dsi.update(np.zeros(3))


def test_dsi_config_is_checked():
    with pytest.raises(TypeError):
        Dsi(["DSI_A"], no_such_field=1)
    with pytest.raises(ValueError):
        Dsi(["DSI_A"], weights={"nope": 1.0})


def test_dsi_worker_threads_give_the_same_state():
    names = ["DSI_A", "DSI_B", "DSI_C"]
    ticks = _feed(names, 21, n=5000)
    one = Dsi(names)
    with Dsi(names, threads=2) as two:
        for part in np.array_split(ticks, 4):
            one.update(part)
            two.update(part)
        for nm in names:
            assert one.calls(nm) == two.calls(nm)
            assert one.evidence(nm) == two.evidence(nm)
            assert one.top(nm, 5) == two.top(nm, 5)


def test_a_tick_driver_feeds_bars_and_causal_evidence_to_the_engine(tmp_path):
    # Ticks drive the engine through TickDriver: each bar runs with the evidence of every tick
    # before its close and of none after it, however the feed is batched (the oracle: an
    # independent Dsi fed, tick by tick in a plain loop, each instrument's ticks up to the
    # close), its signal carries that evidence, and the journal replays bit for bit.
    names = ["DRV_A", "DRV_B"]
    ticks = _feed(names, 21, n=12_000)
    # a first batch of 2000 ticks finishing several bars, the rest cut at random
    parts = [ticks[:2000], *np.split(ticks[2000:], split_points(len(ticks) - 2000, 30, 5))]
    pop = dc.Population.random(96, instruments=names, timeframes=[60], seed=3, dsi_share=0.5)
    with dc.Engine(pop, threads=2, cores_per_sm=32, journal=tmp_path / "j") as eng:
        drv = TickDriver(eng)
        got = [drv.update(p) for p in parts] + [drv.flush()]
        drv.close()
    assert drv.evidence_sets > 0 and drv.bars == sum(len(g) for g in got)
    allsig = np.concatenate(got)
    # the bars themselves: those of one aggregator over the whole feed, in close-time order
    agg = TickAggregator([60], instruments=names)
    bars = np.concatenate([agg.update(ticks), agg.flush()])
    assert allsig["ts"].tolist() == bars["ts"].tolist()
    assert allsig["instrument"].tolist() == bars["instrument"].tolist()
    ref = Dsi(names)
    pos = 0  # ticks fed to ref so far (the feed is in time order)
    flagged = 0
    for k in range(len(allsig)):
        close = int(allsig["ts"][k]) + 60 * 1_000_000_000
        start = pos
        while pos < len(ticks) and int(ticks["ts"][pos]) < close:
            pos += 1
        if pos > start:
            ref.update(ticks[start:pos])
        i = int(allsig["instrument"][k])
        if i in ref.seen():
            # bit for bit: the evidence does not depend on how the feed is cut into batches
            assert allsig["dsi"][k] == ref.evidence(dc.instruments.name(i))
            assert allsig["flags"][k] == dc.SIGNAL_DSI
            flagged += 1
        else:
            assert allsig["flags"][k] == 0 and allsig["dsi"][k] == 0.0
    # every bar is made of ticks of its instrument, so every bar has evidence
    assert len(allsig) > 50 and flagged == len(allsig) and (allsig["dsi"] != 0).sum() > 0
    res = dc.journal.replay(tmp_path / "j", verify=True)
    assert res.ok and res.verified == len(allsig)
    assert res.signals.tobytes() == allsig.tobytes()


@pytest.mark.parametrize("garbage", ["far_ahead_negative_price", "end_of_time"])
def test_a_refused_tick_changes_neither_the_bars_nor_their_evidence(garbage):
    """One tick both validators refuse, dated far ahead, sat in the driver's running maximum of
    its instrument's times (every later tick of the batch then seemed to come after every
    close: all bars ran with stale evidence); a tick dated at the end of int64 time, refused by
    the aggregator (bad_timestamp), was taken by the DSI pipeline, which then refused every
    later tick as out of order, for good. The oracle: the same feed without it."""
    ticks = dc.sim.TickSimulator(["EURUSD"], seed=1).ticks(2 * 3600)
    bad = ticks[:1].copy()
    if garbage == "far_ahead_negative_price":
        bad["price"], bad["ts"] = -1.0, bad["ts"] + 10 * 3600 * 10**9
    else:
        bad["ts"] = 2**63 - 5

    def run(t):
        pop = dc.Population.random(64, instruments=["EURUSD"], timeframes=["M1"], seed=3, dsi_share=1.0)
        with dc.Engine(pop, threads=1) as eng:
            drv = TickDriver(eng)
            out = [drv.update(t[:len(t) // 2]), drv.update(t[len(t) // 2:])]
            drv.close()
            return np.concatenate(out), drv

    clean, _ = run(ticks)
    dirty, drv = run(np.concatenate([ticks[:10], bad, ticks[10:]]))
    assert sum(drv.aggregator.rejects.values()) == 1 and drv.dsi.ticks == len(ticks)
    assert len(clean) > 100 and dirty.tobytes() == clean.tobytes() and (clean["dsi"] != 0).any()


def test_a_standalone_dsi_refuses_a_tick_at_the_end_of_time():
    ticks = _feed(["DSI_EOT"], 3, n=400)
    bad = ticks[:1].copy()
    bad["ts"] = 2**63 - 5
    d = Dsi(["DSI_EOT"])
    d.update(np.concatenate([ticks[:5], bad, ticks[5:]]))
    assert d.rejects == {"bad_timestamp": 1} and d.ticks == len(ticks)


def test_dsi_reader_arguments_are_checked_for_every_instrument():
    dsi = Dsi(["DSI_A"])  # no state yet: the same errors as with one
    with pytest.raises(ValueError, match="by must be 'token' or 'expert', got 'foo'"):
        dsi.top("DSI_A", by="foo")
    with pytest.raises(ValueError, match="k must be in"):
        dsi.top("DSI_A", -1)
    with pytest.raises(TypeError, match="k must be an int"):
        dsi.top("DSI_A", 2.5)
    with pytest.raises(ValueError, match="direction must be a finite number"):
        dsi.validation("DSI_A", math.nan)
    with pytest.raises(TypeError, match="direction must be a number"):
        dsi.validation("DSI_A", "long")
    assert dsi.validation("DSI_A", -3) == 0.0 and dsi.top("DSI_A", 0, by="expert") == []


# -- TickDriver: a failing engine loses no bar --------------------------------------------------
def _driver_feed():
    """Two instruments' ticks over ~50 one-minute bars, cut into 8 batches (each finishing bars
    of several close times), and a population trading M1 with DSI weights."""
    names = ["DRV_F1", "DRV_F2"]
    ticks = _feed(names, 31, n=1500)
    ticks["ts"] = T0 + (ticks["ts"] - T0) * 10  # ~2 s apart: 50 bars an instrument
    pop = dc.Population.random(64, instruments=names, timeframes=[60], seed=3, dsi_share=0.5)
    return ticks, np.array_split(ticks, 8), pop


def _drive_clean(pop, parts):
    with dc.Engine(pop, threads=1) as eng:
        drv = TickDriver(eng)
        out = np.concatenate([drv.update(p) for p in parts] + [drv.flush()])
        drv.close()
        return out, eng.agents()


def test_a_tick_driver_refuses_a_batch_the_engine_cannot_run_before_taking_it():
    # a consumer registered or a closed engine makes engine.run refuse any batch: the driver
    # used to finish the bars first and drop them, so the same ticks sent again were refused as
    # out_of_order and the stream went on with a hole. Now it refuses before taking anything.
    import threading

    _, parts, pop = _driver_feed()
    want, want_agents = _drive_clean(pop, parts)
    with dc.Engine(pop, threads=1) as eng:
        drv = TickDriver(eng)
        got = [drv.update(parts[0])]
        consumer = threading.Thread(target=threading.Event().wait, args=(30,), daemon=True)
        consumer.start()
        eng.register_consumer(consumer)
        before = (drv.aggregator.accepted, drv.dsi.ticks, drv.bars, eng.stats()["bars_in"])
        with pytest.raises(RuntimeError, match="takes signals too"):
            drv.update(parts[1])
        assert (drv.aggregator.accepted, drv.dsi.ticks, drv.bars, eng.stats()["bars_in"]) == before
        assert len(drv.held()) == 0
        eng.unregister_consumer(consumer)
        got += [drv.update(p) for p in parts[1:]] + [drv.flush()]  # the same batch again
        assert drv.aggregator.rejects == {} and drv.bars == eng.stats()["bars_in"] == len(want)
        assert np.concatenate(got).tobytes() == want.tobytes()
        assert np.array_equal(eng.agents(), want_agents)
    with pytest.raises(RuntimeError, match="closed"):
        drv.update(parts[2])
    with pytest.raises(RuntimeError, match="closed"):
        drv.flush()
    with pytest.raises(RuntimeError, match="closed"):
        TickDriver(eng)


def test_a_tick_driver_takes_one_timeframe_as_the_aggregator_does():
    # a single timeframe (str or seconds) is one timeframe, not an iterable of characters
    pop = dc.Population.random(32, instruments=["EURUSD"], timeframes=["H1"], seed=1)
    with dc.Engine(pop, threads=1) as eng:
        for tf in ("H1", "1h", 3600, ["H1"], ("1h", 60)):
            assert TickDriver(eng, tf).aggregator.timeframes == TickAggregator(tf).timeframes
        assert TickDriver(eng, "M1").aggregator.timeframes == (60,)


@pytest.mark.parametrize("fail", ["first run of a batch", "a later run of a batch", "flush", "twice"])
def test_a_tick_driver_holds_the_bars_a_failing_run_did_not_take(fail):
    # engine.run raising after the aggregator finished the bars: they stay held (with the ticks
    # the DSI state has not seen, and the signals of the runs before) and run first on the next
    # call, each with the evidence it would have had. The oracle: the same feed, nothing failing.
    ticks, parts, pop = _driver_feed()
    want, want_agents = _drive_clean(pop, parts)
    with dc.Engine(pop, threads=1) as eng:
        drv = TickDriver(eng)
        run, calls = eng.run, {"n": 0, "fail": set()}

        def flaky(b, **kw):
            calls["n"] += 1
            if calls["n"] in calls["fail"]:
                raise OSError("journal disk full")
            return run(b, **kw)

        eng.run = flaky
        got = [drv.update(parts[0]), drv.update(parts[1])]
        runs_per_batch = calls["n"] // 2
        assert runs_per_batch >= 3  # a batch finishes bars of several close times
        if fail == "flush":
            got += [drv.update(p) for p in parts[2:]]
            calls["fail"] = {calls["n"] + 1}
            with pytest.raises(OSError, match="disk full") as err:
                drv.flush()
            assert len(drv.held()) > 0
            got.append(drv.update(ticks[:0]))  # an empty batch runs what is held
        else:
            first = calls["n"] + (1 if fail == "first run of a batch" else 2)
            calls["fail"] = {first, first + 1} if fail == "twice" else {first}
            with pytest.raises(OSError, match="disk full") as err:
                drv.update(parts[2])
            held = drv.held()
            assert len(held) > 0 and drv.bars == eng.stats()["bars_in"]  # counts only what the engine took
            if fail == "a later run of a batch":  # the first run's signals are held too, not lost
                assert re.search(r"the signals of [1-9]\d* run ones are held", "".join(err.value.__notes__))
            assert drv.bars + len(held) == drv.aggregator.bars_out
            if fail == "twice":  # the retry fails too: the next batch waits behind the held bars
                with pytest.raises(OSError, match="disk full"):
                    drv.update(parts[3])
                assert len(drv.held()) >= len(held) and drv.bars == eng.stats()["bars_in"]
                got.append(drv.update(ticks[:0]))
                got += [drv.update(p) for p in parts[4:]]
            else:
                got += [drv.update(p) for p in parts[3:]]
            got.append(drv.flush())
        assert "held" in "".join(getattr(err.value, "__notes__", []))
        drv.close()
        assert drv.held().size == 0 and drv.aggregator.rejects == {}
        assert drv.bars == eng.stats()["bars_in"] == len(want)
        assert np.concatenate(got).tobytes() == want.tobytes()  # bars, order and evidence
        assert np.array_equal(eng.agents(), want_agents)


def test_a_tick_driver_hands_back_what_it_held_when_told_to_discard_it():
    # a caller that will not retry the engine gets the held bars and signals back (nothing is
    # dropped silently); the DSI state takes the held ticks, and the driver goes on from there
    ticks, parts, pop = _driver_feed()
    want, _ = _drive_clean(pop, parts)
    with dc.Engine(pop, threads=1) as eng:
        drv = TickDriver(eng)
        assert [a.size for a in drv.discard()] == [0, 0]  # nothing held
        run, calls = eng.run, {"n": 0, "fail": 0}

        def flaky(b, **kw):
            calls["n"] += 1
            if calls["n"] == calls["fail"]:
                raise OSError("journal disk full")
            return run(b, **kw)

        eng.run = flaky
        got = [drv.update(parts[0]), drv.update(parts[1])]
        calls["fail"] = calls["n"] + 2  # the second run of the next batch
        with pytest.raises(OSError, match="disk full") as err:
            drv.update(parts[2])
        assert "discard()" in "".join(err.value.__notes__)
        held = drv.held()
        bars, sig = drv.discard()
        assert bars.tobytes() == held.tobytes() and len(bars) > 0
        assert len(sig) > 0 and drv.held().size == 0
        assert drv.dsi.ticks == sum(len(p) for p in parts[:3])  # every tick taken, the held ones too
        returned = np.concatenate([*got, sig])
        assert returned.tobytes() == want[:len(returned)].tobytes()  # the same signals as no failure
        assert drv.bars == eng.stats()["bars_in"] == len(returned)
        more = [drv.update(p) for p in parts[3:]] + [drv.flush()]
        assert drv.bars == eng.stats()["bars_in"] == len(returned) + sum(map(len, more))
        assert drv.bars + len(bars) == drv.aggregator.bars_out
        drv.close()


def test_a_tick_driver_checks_its_arguments():
    pop = dc.Population.random(16, instruments=["DRV_ARG"], timeframes=[60], seed=1)
    with dc.Engine(pop, threads=1) as eng:
        for bad in (None, "engine", pop):
            with pytest.raises(TypeError, match="engine must be a dynamic_core.Engine"):
                TickDriver(bad)
        for bad in (5, 0, "yes", 1.0):
            with pytest.raises(TypeError, match="dsi must be a Dsi"):
                TickDriver(eng, dsi=bad)
        for bad in (5, [60], TickAggregator):
            with pytest.raises(TypeError, match="aggregator must be"):
                TickDriver(eng, aggregator=bad)
        with pytest.raises(ValueError, match="not both"):
            TickDriver(eng, [60], aggregator=TickAggregator([60]))
        drv = TickDriver(eng, dsi=False, aggregator=TickAggregator([300]))
        assert drv.dsi is None and drv.aggregator.timeframes == (300,)
        with pytest.raises(TypeError, match="TICK_DTYPE"):
            drv.update([1, 2, 3])


@settings(max_examples=60, deadline=None)
@given(k=st.integers(1, 300), n=st.integers(0, 2000), wide=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_the_drivers_running_max_per_instrument_matches_a_per_instrument_loop(k, n, wide, seed):
    # one sort instead of a mask per instrument (instruments x ticks); exact for any int64 times
    from dynamic_core.learning.dsi.driver import _running_max_by_instrument

    rng = np.random.default_rng(seed)
    t = np.zeros(n, dtype=[("instrument", "u4"), ("ts", "i8")])
    t["instrument"] = rng.integers(0, k, n)
    t["ts"] = rng.integers(-2**63, 2**63 - 1, n, dtype=np.int64) if wide else rng.integers(0, 10**6, n)
    want = np.empty_like(t["ts"])
    for i in np.unique(t["instrument"]):
        m = t["instrument"] == i
        want[m] = np.maximum.accumulate(t["ts"][m])
    assert np.array_equal(_running_max_by_instrument(t), want)
