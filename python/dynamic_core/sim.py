"""The built-in simulated market: a regime-switching random walk with realistic volatility.

Each instrument follows its own Markov chain of regimes (quiet up-trend, quiet down-trend,
mean-reverting range, volatile) with fat-tailed (Student-t, 4 degrees of freedom) returns,
intrabar paths for high/low, and volume that rises with absolute returns. Named majors start
at plausible prices with plausible annual volatility; other names start at 100 with 20%.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence

import numpy as np

from ._checks import check_int
from .instruments import instruments as registry
from .market import _INT64_MAX, empty, parse_timeframe  # bar times are int64 ns

__all__ = ["MarketSimulator", "PROFILES", "REGIMES"]

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
        import pandas as pd

        if isinstance(instruments, str):
            instruments = [instruments]
        if not instruments:
            raise ValueError("need at least one instrument")
        self.names = list(instruments)
        self.ids = np.array([registry.id(n) for n in self.names], dtype=np.uint32)
        self.timeframe = parse_timeframe(timeframe)
        self.seed = seed
        self._dt_ns = self.timeframe * 1_000_000_000
        self._t = int(pd.Timestamp(start, tz="UTC").value)
        # One generator per instrument and per quantity, each drawn a fixed amount per bar, so the
        # stream does not depend on how bars() calls are chunked.
        children = np.random.SeedSequence(seed).spawn(len(self.names))
        self._rngs = [[np.random.default_rng(g) for g in c.spawn(5)] for c in children]
        k = len(self.names)
        prof = [PROFILES.get(n, (100.0, 0.20)) for n in self.names]
        self._price = np.array([p[0] for p in prof])
        self._logp = np.log(self._price)  # carried as a log so chunked calls continue exactly
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
            shocks = r_shock.standard_t(4, size=(n, _SUBSTEPS)) / np.sqrt(2.0) / np.sqrt(_SUBSTEPS)
            noise = (sigma[:, None] * shocks).tolist()
            logp = float(self._logp[j])
            anchor = float(self._anchor[j])
            opens = np.empty(n)
            highs = np.empty(n)
            lows = np.empty(n)
            closes = np.empty(n)
            gaps = r_gap.standard_normal(n) * 0.05
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
            vol = self._base_volume[j] * (1.0 + absret / np.maximum(sigma, 1e-12)) * r_volume.lognormal(0, 0.3, n)
            sl = slice(j, n * k, k)
            out["open"][sl] = np.exp(opens)
            out["high"][sl] = np.exp(highs)
            out["low"][sl] = np.exp(lows)
            out["close"][sl] = np.exp(closes)
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
