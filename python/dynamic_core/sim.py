"""The built-in simulated market: a regime-switching random walk with realistic volatility.

:class:`MarketSimulator` makes bars. Each instrument follows its own Markov chain of regimes
(quiet up-trend, quiet down-trend, mean-reverting range, volatile) with fat-tailed (Student-t, 4
degrees of freedom) returns, intrabar paths for high/low, and volume that rises with absolute
returns. Named majors start at plausible prices with plausible annual volatility; other names
start at 100 with 20%.

:class:`TickSimulator` makes trade prints (``TICK_DTYPE``) with the quote in force: for the tick
path (:class:`~dynamic_core.ticks.TickAggregator`, the DSI micro-experts, ``TickDriver``).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from fractions import Fraction
from collections.abc import Sequence

import numpy as np

from . import detmath
from ._checks import check_int, check_real
from .instruments import instruments as registry
from .market import _INT64_MAX, BadTimes, _to_ns, empty, parse_timeframe  # bar times are int64 ns
from .records import TICK_DTYPE

__all__ = ["MarketSimulator", "PROFILES", "REGIMES", "TickSimulator"]

YEAR_S = 365.25 * 86400.0


PROFILES: dict[str, tuple[float, float]] = {
    # name: (start price, annual volatility)
    "EURUSD": (1.0850, 0.07),
    "GBPUSD": (1.2700, 0.08),
    "USDJPY": (150.00, 0.09),
    "AUDUSD": (0.6600, 0.10),
    "XAUUSD": (2000.0, 0.15),
    "BTCUSD": (60000.0, 0.60),
    "SPX": (5000.0, 0.16),
}

# name: (annual drift, volatility multiplier, mean-reversion speed per bar)
REGIMES: dict[str, tuple[float, float, float]] = {
    "trend_up": (0.08, 0.8, 0.0),
    "trend_down": (-0.08, 0.8, 0.0),
    "range": (0.0, 0.6, 0.05),
    "volatile": (0.0, 2.2, 0.0),
}
_TRANSITION = np.array(
    [  # rows: from; columns: to (trend_up, trend_down, range, volatile)
        [0.985, 0.003, 0.008, 0.004],
        [0.003, 0.985, 0.008, 0.004],
        [0.006, 0.006, 0.984, 0.004],
        [0.010, 0.010, 0.020, 0.960],
    ]
)
_SUBSTEPS = 6
_CHUNK = 1 << 16  # bars per instrument generated at a time


def _instruments(instruments: str | Sequence[str]) -> tuple[list[str], np.ndarray]:
    """A simulator's instrument names (a bare str is one name) and their ids, registered."""
    if isinstance(instruments, str):
        instruments = [instruments]
    if not instruments:
        raise ValueError("need at least one instrument")
    names = list(instruments)
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise ValueError(f"instrument {n!r} is named twice (one walk per instrument)")
        seen.add(n)
    return names, np.array([registry.id(n) for n in names], dtype=np.uint32)


def _start_ns(start: object) -> int:
    """``start`` as int64 ns: a time (UTC when naive) or an epoch number, read as a bar time
    column is (:func:`~dynamic_core.market._to_ns`): None, NaN, unreadable or out-of-range
    times are a ValueError naming ``start`` (None and NaN would read as pandas' NaT, the int64
    minimum)."""
    import pandas as pd

    if start is None or isinstance(start, (list, tuple, dict, set, np.ndarray)):
        raise TypeError(f"start must be a time or an epoch number, got {type(start).__name__}")
    try:
        return int(_to_ns(pd.Series([start]), "start")[0])
    except BadTimes as e:  # said of one value, not of rows
        raise ValueError(f"start {start!r} is {e.why}") from None


def _box_muller(u1: np.ndarray, u2: np.ndarray) -> np.ndarray:
    """Standard normal draws from uniforms ``u1`` in (0, 1] and ``u2``: Box-Muller with
    detmath's log and cos, so the bits are the same on every machine (numpy's own normal,
    Student-t and lognormal samplers call the C library's exp/log/pow, whose FMA and non-FMA
    variants differ in the last bit)."""
    return np.sqrt(-2.0 * detmath.log(u1)) * detmath.cos2pi(u2)


def _normal(u: np.ndarray) -> np.ndarray:
    """Standard normal draws from pairs of uniforms in [0, 1) (last axis)."""
    return _box_muller(1.0 - u[..., 0], u[..., 1])


def _student_t4(u: np.ndarray) -> np.ndarray:
    """Student-t(4) draws from quadruples of uniforms in [0, 1) (last axis): ``Z / sqrt(V / 4)``,
    ``Z`` normal, ``V = -2 ln((1 - u2)(1 - u3))`` chi-squared with 4 degrees of freedom."""
    v = -2.0 * (detmath.log(1.0 - u[..., 2]) + detmath.log(1.0 - u[..., 3]))
    return _normal(u[..., :2]) / np.sqrt(np.maximum(v, 1e-300) / 4.0)


class MarketSimulator:
    """Deterministic simulated bars for several instruments.

    Parameters
    ----------
    instruments : sequence of str
        Instrument names (registered in ``dc.instruments``).
    timeframe : int or str
        Bar length: seconds, ``"H1"`` or ``"1h"``.
    seed : int
        Same seed, same market.
    start : str
        Time of the first bar (UTC).

    ``bars(n)`` returns the next ``n`` bars of every instrument, time-ordered and interleaved
    (instruments in the given order at each timestamp); successive calls continue the walk.
    ``regimes`` holds the regime index of every bar produced so far, per instrument.
    """

    def __init__(self, instruments: Sequence[str] = ("EURUSD", "GBPUSD", "USDJPY", "XAUUSD"),
                 timeframe: int | str = "H1", seed: int = 0, start: str = "2024-01-01") -> None:
        self.names, self.ids = _instruments(instruments)
        self.timeframe = parse_timeframe(timeframe)
        self.seed = check_int("seed", seed, 0, (1 << 64) - 1)
        self._dt_ns = self.timeframe * 1_000_000_000
        self._t = _start_ns(start)
        # One generator per instrument and per quantity, each drawn a fixed amount per bar, so the
        # stream does not depend on how bars() calls are chunked.
        children = np.random.SeedSequence(seed).spawn(len(self.names))
        self._rngs = [[np.random.default_rng(g) for g in c.spawn(5)] for c in children]
        k = len(self.names)
        prof = [PROFILES.get(n, (100.0, 0.20)) for n in self.names]
        self._price = np.array([p[0] for p in prof])
        self._logp = detmath.log(self._price)  # carried as a log so chunked calls continue exactly
        self._anchor = self._logp.copy()
        self._vol = np.array([p[1] for p in prof]) * np.sqrt(self.timeframe / YEAR_S)
        self._regime = np.array([r[4].integers(0, 4) for r in self._rngs])
        self._base_volume = np.array([r[4].uniform(500, 5000) for r in self._rngs])
        self.regimes: list[list[int]] = [[] for _ in range(k)]

    def bars(self, n: int) -> np.ndarray:
        """The next ``n`` bars of every instrument as one time-ordered ``BAR_DTYPE`` array.

        Raises ``ValueError`` (changing nothing) when ``n`` is outside [0, 1e8], when ``n`` bars
        of every instrument would pass 1e8 bars, or when a bar's time would pass the int64
        nanosecond range (2262-04-11), which bar times cannot hold."""
        if check_int("n", n, -math.inf, math.inf) < 0 or n > 100_000_000:
            raise ValueError(f"n must be in [0, 1e8], got {n}")
        n = int(n)
        k = len(self.names)
        if n == 0:  # the clock may already be past int64 (after the last bar it can hold)
            return empty(0)
        if n * k > 100_000_000:
            raise ValueError(f"{n:,} bars of {k:,} instruments are {n * k:,} bars, more than the 1e8 limit")
        if self._t + self._dt_ns * (n - 1) > _INT64_MAX:  # Python ints: no wrap
            raise ValueError(f"bar times would pass the int64 nanosecond range (2262-04-11): {n:,} bars of "
                             f"{self.timeframe:,} s from {self._t} ns; the simulated clock cannot go on")
        out = empty(n * k)
        # in parts of _CHUNK bars: the walk's Python-float temporaries cost ~500 bytes a bar,
        # ten times the output (the draws per bar are fixed, so the bars are the same bits)
        for a in range(0, n, _CHUNK):
            m = min(_CHUNK, n - a)
            out[a * k:(a + m) * k] = self._walk(m)
        return out

    def _walk(self, n: int) -> np.ndarray:
        k = len(self.names)
        out = empty(n * k)
        drift = np.array([v[0] for v in REGIMES.values()]) * (self.timeframe / YEAR_S)
        volm = np.array([v[1] for v in REGIMES.values()])
        kappa = np.array([v[2] for v in REGIMES.values()])
        cum = np.cumsum(_TRANSITION, axis=1)
        # The per-bar recurrence runs on Python floats (numpy's per-call overhead dominated a
        # loop over 6-step arrays); every operation and its order are numpy's, so the bars are
        # the same bits: bisect_right is searchsorted(side="right"), the path is o + a running
        # sum of the steps, as o + cumsum(steps) was.
        cum_l = cum.tolist()
        drift_l, kappa_l = drift.tolist(), kappa.tolist()
        for j in range(k):
            r_regime, r_shock, r_gap, r_volume, _ = self._rngs[j]
            reg_l = []
            r = int(self._regime[j])
            for ui in r_regime.random(n).tolist():
                r = min(bisect_right(cum_l[r], ui), 3)
                reg_l.append(r)
            reg = np.array(reg_l, dtype=np.int64)
            self._regime[j] = r
            self.regimes[j].extend(reg_l)
            sigma = self._vol[j] * volm[reg]
            # Student-t(4) scaled to unit variance, split over intrabar steps
            shocks = _student_t4(r_shock.random((n, _SUBSTEPS, 4))) / np.sqrt(2.0) / np.sqrt(_SUBSTEPS)
            noise = (sigma[:, None] * shocks).tolist()
            logp = float(self._logp[j])
            anchor = float(self._anchor[j])
            opens = np.empty(n)
            highs = np.empty(n)
            lows = np.empty(n)
            closes = np.empty(n)
            gaps = _normal(r_gap.random((n, 2))) * 0.05
            for i, (g, sg, ri, ni) in enumerate(zip(gaps.tolist(), sigma.tolist(), reg_l, noise)):
                o = logp + g * sg
                kap = kappa_l[ri]
                a = (drift_l[ri] + -kap * (logp - anchor)) / _SUBSTEPS
                run = a + ni[0]
                hi = lo = last = o + run
                for x in ni[1:]:
                    run = run + (a + x)
                    last = o + run
                    if last > hi:
                        hi = last
                    if last < lo:
                        lo = last
                opens[i] = o
                highs[i] = max(o, hi)
                lows[i] = min(o, lo)
                closes[i] = last
                logp = last
                if kap == 0.0:  # trends and shocks move the level the range reverts to
                    anchor = 0.99 * anchor + 0.01 * logp
            self._anchor[j] = anchor
            self._logp[j] = logp
            absret = np.abs(closes - opens)
            lognormal = detmath.exp(0.3 * _normal(r_volume.random((n, 2))))
            vol = self._base_volume[j] * (1.0 + absret / np.maximum(sigma, 1e-12)) * lognormal
            sl = slice(j, n * k, k)
            out["open"][sl] = detmath.exp(opens)
            out["high"][sl] = detmath.exp(highs)
            out["low"][sl] = detmath.exp(lows)
            out["close"][sl] = detmath.exp(closes)
            out["volume"][sl] = np.round(vol)
            out["instrument"][sl] = self.ids[j]
        # modulo 2**64, then as int64: exact, as every time is within int64 (checked above), even
        # where the step alone would not be (a start before 1970 and a timeframe near 2**32 s)
        steps = np.uint64(self._dt_ns) * np.arange(n, dtype=np.uint64)
        ts = (np.uint64(self._t % (1 << 64)) + steps).view(np.int64)
        out["ts"] = np.repeat(ts, k)
        out["timeframe"] = self.timeframe
        # exp() of the extremes can round across open/close by one ulp; keep bars consistent
        out["high"] = np.maximum.reduce([out["high"], out["open"], out["close"]])
        out["low"] = np.minimum.reduce([out["low"], out["open"], out["close"]])
        self._t += self._dt_ns * n
        return out

    def __repr__(self) -> str:
        return f"MarketSimulator({self.names}, timeframe={self.timeframe}s, seed={self.seed})"


# ---- ticks -----------------------------------------------------------------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_TICK_FIELDS = 9  # draws per tick: arrival, move, direction, magnitude, size (2), side, spread, large print
_REGIME_TICKS = 256  # ticks per regime block
# regime: (probability of a move per tick, probability that a move is up, largest move in
# price increments, probability that a print without a move is a buy)
_TICK_REGIMES = {
    "trend_up": (0.35, 0.62, 1, 0.58),
    "trend_down": (0.35, 0.38, 1, 0.42),
    "range": (0.25, 0.50, 1, 0.50),
    "volatile": (0.60, 0.50, 3, 0.50),
}


def _nice(x: float) -> float:
    """``x`` rounded to 1, 2 or 5 times a power of ten."""
    e = math.floor(math.log10(x))
    m = x / 10.0**e
    m = 1.0 if m < 1.5 else (2.0 if m < 3.5 else (5.0 if m < 7.5 else 10.0))
    return float(f"{m * 10.0**e:.12g}")


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic): rng.hpp's rng_mix."""
    z = z + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _uniform(key: int, index: np.ndarray, field: int) -> np.ndarray:
    """Uniform draws in (0, 1), one per index: a pure function of (key, index, field), so a
    tick's draws do not depend on how the ticks are asked for."""
    z = _mix(np.uint64(key) + (index.astype(np.uint64) * np.uint64(_TICK_FIELDS) + np.uint64(field)) * _GOLDEN)
    return ((z >> np.uint64(12)).astype(np.float64) + 0.5) * (1.0 / 4503599627370496.0)  # exact: never 0 or 1


class TickSimulator:
    """Deterministic simulated trade prints for several instruments.

    Parameters
    ----------
    instruments : sequence of str
        Instrument names (registered in ``dc.instruments``); prices start as in
        :data:`PROFILES` (100 for other names).
    seed : int
        Same seed, same ticks (0 to 2**64 - 1).
    start : str
        Time the feed starts (UTC).
    rate : float
        Mean prints per second of each instrument (Poisson arrivals), in [0.001, 1000].

    ``ticks(seconds)`` returns every print of the next ``seconds`` of the feed, time-ordered
    (instruments in the given order at equal times); successive calls continue it. A print's
    time and contents depend only on its place in its instrument's stream, and the clock is the start
    plus the exact sum of the ``seconds`` asked for, rounded to the nanosecond: so calls whose
    seconds add up to the same total return the same ticks, bit for bit, however they cut the
    time. A call may ask for up to 1e8 s and 1e7 expected prints. Each instrument's quote moves on a
    grid of price increments (``increments``; 0.00001 for EURUSD, 5 for BTCUSD at the default
    rate) sized so that an hour of prints moves it about as much as the profile's annual
    volatility says (within a factor of about 2: the increment is rounded to 1, 2 or 5 times a
    power of ten, and trends add their drift), in regimes of 256 prints drawn independently (trend up, trend down, range,
    volatile: more moves, larger ones and a wider spread); a print that moves the quote up is a
    buy at the ask, one
    that moves it down a sell at the bid, others lean with the regime's flow. Sizes are
    log-normal with occasional large prints. Every tick passes
    :func:`~dynamic_core.ticks.validate_ticks`.
    """

    def __init__(self, instruments: Sequence[str] = ("EURUSD",), seed: int = 0, start: str = "2024-01-01",
                 rate: float = 2.0) -> None:
        self.names, self.ids = _instruments(instruments)
        self.seed = check_int("seed", seed, 0, (1 << 64) - 1)
        self.rate = check_real("rate", rate, 1e-3, 1000.0)
        self._t0 = _start_ns(start)
        self._elapsed = Fraction(0)  # seconds asked for so far, summed exactly
        self._t = self._t0  # the feed's clock (ns): the prints before it are out
        base = int(_mix(np.array([self.seed], dtype=np.uint64))[0])
        self._keys = [int(_mix(np.array([base ^ (j << 32 | 0x7469636B)], dtype=np.uint64))[0])
                      for j in range(len(self.names))]
        prof = [PROFILES.get(n, (100.0, 0.20)) for n in self.names]
        prices = [p for p, _ in prof]
        # the increment that gives about the profile's volatility over an hour of prints (a
        # print moves the quote by ~0.97 increments rms, averaged over the regimes), rounded
        # to 1, 2 or 5 times a power of ten
        hour = 3600.0 * self.rate
        self.increments = [_nice(p * v * math.sqrt(3600.0 / YEAR_S) / (0.97 * math.sqrt(hour))) for p, v in prof]
        self._level = [int(round(p / inc)) for p, inc in zip(prices, self.increments)]  # the bid's walk, in increments
        self._k = [0] * len(self.names)  # prints made so far
        self._last = [self._t] * len(self.names)  # time of the last print

    def ticks(self, seconds: float) -> np.ndarray:
        """The prints of the next ``seconds`` of every instrument, one time-ordered
        ``TICK_DTYPE`` array. Raises ``ValueError`` (changing nothing) for a negative or
        non-finite span, one whose expected prints pass 1e7, or one that would take the clock
        past the int64 nanosecond range (2262-04-11)."""
        seconds = check_real("seconds", seconds, 0.0, 1e8)
        if self.rate * seconds * len(self.names) > 1e7:
            raise ValueError(f"{seconds:g} s at {self.rate:g} prints/s over {len(self.names)} instrument(s) is more "
                             f"than 1e7 expected prints (~2 GB): ask for less time per call")
        elapsed = self._elapsed + Fraction(seconds)
        horizon = self._t0 + round(elapsed * 10**9)
        if horizon > _INT64_MAX:
            raise ValueError(f"the tick clock would pass the int64 nanosecond range (2262-04-11) at {horizon} ns")
        parts, state = [], []
        for j in range(len(self.names)):
            part, st = self._instrument(j, horizon)
            parts.append(part)
            state.append(st)
        for j, (k, last, level) in enumerate(state):  # nothing changes before every part is made
            self._k[j], self._last[j], self._level[j] = k, last, level
        self._t, self._elapsed = horizon, elapsed
        out = np.concatenate(parts) if parts else np.zeros(0, TICK_DTYPE)
        return out[np.argsort(out["ts"], kind="stable")]

    def _instrument(self, j: int, horizon: int) -> tuple[np.ndarray, tuple[int, int, int]]:
        key, k, last, level = self._keys[j], self._k[j], self._last[j], self._level[j]
        mean_ns = 1e9 / self.rate
        ts_parts, idx_parts = [], []
        while True:
            left = (horizon - last) / mean_ns
            n = int(1.2 * left + 4.0 * math.sqrt(left + 1.0)) + 16
            idx = np.arange(k, k + n, dtype=np.int64)
            span = horizon - last  # >= 0
            # gaps past the horizon are cut to just past it (the prints kept are the same), so the
            # sums, taken from `last`, stay far inside int64
            gap = np.maximum(1, (-detmath.log(_uniform(key, idx, 0)) * mean_ns).astype(np.int64))  # < 4e13 ns
            rel = np.cumsum(np.minimum(gap, span + 1))
            c = int(np.searchsorted(rel, span, side="left"))  # the prints before the horizon
            if c:
                ts = last + rel[:c]
                ts_parts.append(ts)
                idx_parts.append(idx[:c])
                last, k = int(ts[c - 1]), k + c
            if c < n:
                break
        if not ts_parts:
            return np.zeros(0, TICK_DTYPE), (k, last, level)
        ts = np.concatenate(ts_parts)
        idx = np.concatenate(idx_parts)
        regs = list(_TICK_REGIMES.values())
        block = np.unique(idx // _REGIME_TICKS)
        draw = (_uniform(key ^ 0x5245474D, block, 0) * len(regs)).astype(np.int64)  # regime of each block
        reg = draw[np.searchsorted(block, idx // _REGIME_TICKS)]
        p_move, p_up, biggest, p_buy = (np.array([r[i] for r in regs])[reg] for i in range(4))
        moves = _uniform(key, idx, 1) < p_move
        up = _uniform(key, idx, 2) < p_up
        size_of_move = 1 + (_uniform(key, idx, 3) * biggest).astype(np.int64)
        step = np.where(moves, np.where(up, size_of_move, -size_of_move), 0)
        walk = level + np.cumsum(step)  # integers: exact however the calls cut the feed
        bid = np.maximum(walk, 1)  # a price stays positive (the walk itself goes on)
        volatile = biggest > 1
        spread = 1 + (_uniform(key, idx, 7) * np.where(volatile, 4, 2)).astype(np.int64)
        buy = np.where(step > 0, True, np.where(step < 0, False, _uniform(key, idx, 6) < p_buy))
        u1, u2 = _uniform(key, idx, 4), _uniform(key, idx, 5)
        normal = _box_muller(u1, u2)
        size = np.round(detmath.exp(normal) * np.where(_uniform(key, idx, 8) < 0.02, 8.0, 1.0) + 1.0)
        inc = self.increments[j]
        out = np.zeros(len(ts), TICK_DTYPE)
        out["ts"] = ts
        out["instrument"] = self.ids[j]
        out["bid"] = bid * inc
        out["ask"] = (bid + spread) * inc
        out["price"] = np.where(buy, out["ask"], out["bid"])
        out["side"] = np.where(buy, 1, 2)
        out["size"] = size
        return out, (k, last, int(walk[-1]))

    def __repr__(self) -> str:
        return f"TickSimulator({self.names}, seed={self.seed}, rate={self.rate:g}/s)"
