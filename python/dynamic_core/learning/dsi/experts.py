"""DSI micro-experts: each reads one instrument's batch of ticks (and its MicroTape) and fires
directional calls at specific ticks. A call is a tick index and a sign (+1: the next moves
should go up, -1: down); :mod:`.fusion` turns calls into log-odds.

Every expert keeps O(1) state per instrument and handles a batch with whole-array numpy
operations (the run experts with one native pass over the batch, ``_core.dsi_runs``); feeding a
sequence in one batch or in many gives the same calls.

Patterns over *runs*: a run is a maximal stretch of ticks whose last non-flat move points one
way (flat ticks continue the run; a move the other way starts the next). Its *moves* are its
non-flat ticks, its *end price* the price where it turned (its extreme).

``momentum`` (burst)
    At the ``burst_moves``-th move of a run, when the run's volume is at least ``burst_share``
    on the run's side (buyers in an up-run) and those moves took at most ``burst_ns``: the run
    goes on. Sign: the run's direction. Once per run.
``exhaustion``
    At the first move of a new run, when the run it ends had at least ``exhaustion_moves``
    moves and a climax print (size z-score >= ``climax_z``) in it: the old move is spent.
    Sign: the new run's direction.
``sweep`` (stop run)
    A run ``R`` that pushed past the end of the run before the previous one (the last swing
    extreme in its direction: where the stops sit) with at least ``sweep_moves`` moves and
    ``sweep_share`` of its volume aggressive on its side, followed by a run that takes back at
    least ``sweep_retrace`` of ``R``: the break failed. Fires at the first tick of that retrace.
    Sign: against ``R``.
``absorption``
    Over the last ``absorb_window`` ticks, aggressive volume is one-sided (``|buy - sell| >=
    absorb_share * volume``) and heavy (volume >= ``absorb_volume`` x window x EW mean size), yet
    the price is no better for the aggressors than before the window: a passive side soaks them
    up. Fires when the condition starts. Sign: against the aggressors.

Anomaly scorers: EW z-scores (mean and variance *before* the tick, span ``span``, after
``warmup`` ticks) of size, spread and return. ``volume_anomaly`` fires with the aggressor on a
size z >= ``z_volume``; ``return_anomaly`` with the move on |return z| >= ``z_return``;
``spread_anomaly`` (z >= ``z_spread``) has no direction: the fusion damps that tick's calls.

Divergence verifiers: Wilder RSI and the MACD line (EMA fast - EMA slow, seeded with the first
price) over the trade prices. A pivot high at tick ``c`` is strictly above the ``pivot`` ticks
before it and at least the ``pivot`` ticks after it, known at ``c + pivot`` (a pivot low
mirrored). A higher pivot high with a lower RSI (MACD) than the previous pivot high is a
bearish divergence (-1); a lower pivot low with a higher RSI (MACD) a bullish one (+1). Pivots
before ``div_warmup`` ticks are not compared. An absurd print, more than ``max_jump`` (10) times
above or below the last positive finite price the verifier took (an infinite one included), is
left out of its indicators and pivots (counted in ``skipped``): one print of 1e300 would
otherwise sit in the averages for thousands of ticks. After :data:`DIV_RESTART_AFTER` (100)
such prints in a row the stream, not the print, has moved: the indicators restart from the next
one as on a new stream (warm-up included; counted in ``restarts``).

Sequence classifier: an online n-gram model over coarse MicroTape symbols (direction x
aggressor x large size) predicting the next tick's direction with Laplace-smoothed counts.

Every parameter is checked when an expert is built, with the bounds the native passes
(``cpp/dynamic_core/dsi.hpp``) need, so an update never fails half-way: periods fit int32
(``MAX_PERIOD``), ``pivot <= MAX_PIVOT``, ``burst_ns <= MAX_BURST_NS`` (exact as a float64),
``absorb_window <= MAX_ABSORB_WINDOW``, ``ngram_order <= MAX_NGRAM_ORDER``; thresholds, shares
and weights are finite; ``max_jump > 1``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from ... import _core, detmath
from ._scan import EwMoments, check_int, check_real, prepend, window_sums

__all__ = [
    "DIV_RESTART_AFTER",
    "MAX_ABSORB_WINDOW",
    "MAX_BURST_NS",
    "MAX_NGRAM_ORDER",
    "MAX_NGRAM_TABLE_BYTES",
    "MAX_PERIOD",
    "MAX_PIVOT",
    "AbsorptionExpert",
    "AnomalyScorer",
    "Calls",
    "DivergenceVerifier",
    "NGramClassifier",
    "RunExperts",
    "symbols",
]


class Calls(NamedTuple):
    """An expert's calls in a batch: tick indices (increasing) and signs (+1 / -1; 0 for a
    non-directional flag)."""

    index: np.ndarray
    sign: np.ndarray

    @staticmethod
    def where(mask: np.ndarray, sign: np.ndarray | int) -> Calls:
        idx = np.flatnonzero(mask)
        s = sign[idx] if isinstance(sign, np.ndarray) else np.full(len(idx), sign)
        return Calls(idx, s.astype(np.int8))


_EMPTY_I = np.zeros(0, dtype=np.intp)

MAX_PERIOD = 2**31 - 2
"""Largest RSI / MACD period: the native pass holds them as int32 and computes ``period + 1``."""
MAX_PIVOT = 10_000
"""Largest divergence ``pivot`` (the native pass refuses more)."""
MAX_BURST_NS = 2**53
"""Largest ``burst_ns``: it travels as a float64, exact up to 2**53, into an int64."""
MAX_ABSORB_WINDOW = 10_000
"""Largest absorption window (its tail, ``24 * window`` bytes, is kept per instrument)."""
MAX_NGRAM_ORDER = 4
"""Largest n-gram order: the count table is ``18 ** (order - 1) * 3`` int64 per instrument,
137 KiB at order 4 (order 5 would be 2.4 MiB, 6 would be 45 MiB)."""
MAX_NGRAM_TABLE_BYTES = 1 << 20
"""Largest n-gram count table per instrument (1 MiB), whatever the alphabet."""
DIV_RESTART_AFTER = 100
"""Absurd prints in a row after which the divergence verifier restarts its indicators."""
_MAX_COUNT = 2**31 - 1
_MAX_I64 = 2**63 - 1


# -- anomaly scorers -------------------------------------------------------------------------
class AnomalyScorer:
    """EW z-scores of size, spread and return; calls on the extreme ones."""

    series = ("size", "spread", "return")

    def __init__(self, *, span: float = 200.0, warmup: int = 50, z_volume: float = 3.0,
                 z_return: float = 4.0, z_spread: float = 3.0) -> None:
        self._moments = EwMoments(3, check_real("span", span, 1.0))
        self.mean_before = np.zeros((0, 3))
        self.warmup = check_int("warmup", warmup, 0, _MAX_I64)
        self.z_volume = check_real("z_volume", z_volume)
        self.z_return = check_real("z_return", z_return)
        self.z_spread = check_real("z_spread", z_spread)

    @property
    def skipped(self) -> dict[str, int]:
        """Values left out of the EW moments per series: those whose update would overflow (a
        finite but absurd print, e.g. a size of 1e300) and returns to or from a print more than
        ``div_max_jump`` times away: see :class:`._scan.EwMoments`."""
        return {s: int(k) for s, k in zip(self.series, self._moments.skipped)}

    def zscores(self, size: np.ndarray, spread: np.ndarray, ret: np.ndarray) -> np.ndarray:
        """(n, 3) z-scores of (size, spread, return) against the EW moments before each tick;
        0 before ``warmup`` ticks or while the variance is 0. The means are kept in
        ``mean_before`` until the next call."""
        n = len(size)
        x = np.empty((n, 3))
        x[:, 0] = size
        x[:, 1] = spread
        x[:, 2] = ret
        # NaN is 0; an infinite return (a jump the caller leaves out) stays infinite, so it is
        # left out of the moments and never mistaken for a value (nan_to_num's default made it
        # DBL_MAX, on which a long run of jumps restarted the series)
        np.nan_to_num(x, copy=False, nan=0.0, posinf=np.inf, neginf=-np.inf)
        seen = self._moments.count
        mean, var = self._moments.step(x)
        self.mean_before = mean
        z = np.zeros_like(x)
        ok = var > 0
        ok[: max(0, min(n, self.warmup - seen))] = False
        with np.errstate(over="ignore"):  # a value left out (an absurd print) may score inf
            np.divide(x - mean, np.sqrt(var, where=ok, out=np.ones_like(var)), out=z, where=ok)
        return z

    def calls(self, z: np.ndarray, aggressor: np.ndarray, move: np.ndarray) -> dict[str, Calls]:
        return {
            "volume_anomaly": Calls.where((z[:, 0] >= self.z_volume) & (aggressor != 0), aggressor),
            "return_anomaly": Calls.where((np.abs(z[:, 2]) >= self.z_return) & (move != 0), move),
            "spread_anomaly": Calls.where(z[:, 1] >= self.z_spread, 0),
        }


# -- run patterns ----------------------------------------------------------------------------
class RunExperts:
    """``momentum``, ``exhaustion`` and ``sweep`` over the runs of one instrument's ticks."""

    names = ("momentum", "exhaustion", "sweep")

    def __init__(self, *, burst_moves: int = 4, burst_share: float = 0.6, burst_ns: int = 2_000_000_000,
                 exhaustion_moves: int = 6, climax_z: float = 3.0, sweep_moves: int = 3,
                 sweep_share: float = 0.6, sweep_retrace: float = 0.5) -> None:
        self.burst_moves = check_int("burst_moves", burst_moves, 1, _MAX_COUNT)
        self.burst_share = check_real("burst_share", burst_share, 0.0, 1.0)
        self.burst_ns = check_int("burst_ns", burst_ns, 0, MAX_BURST_NS)
        self.exhaustion_moves = check_int("exhaustion_moves", exhaustion_moves, 0, _MAX_COUNT)
        self.climax_z = check_real("climax_z", climax_z)
        self.sweep_moves = check_int("sweep_moves", sweep_moves, 0, _MAX_COUNT)
        self.sweep_share = check_real("sweep_share", sweep_share, 0.0, 1.0)
        self.sweep_retrace = check_real("sweep_retrace", sweep_retrace, 0.0)
        self._params = [float(self.burst_moves), self.burst_share, float(self.burst_ns),
                        float(self.exhaustion_moves), self.climax_z, float(self.sweep_moves), self.sweep_share,
                        self.sweep_retrace]
        # The carried state (cpp/dynamic_core/dsi.hpp, RunSlot): the run in progress
        # (direction, moves, volume, aggressive volume, largest size z, sweep armed), the last
        # price, the end prices of the last three finished runs (oldest first) and the last
        # finished run's direction, moves, aggressive share and largest size z.
        self._state = np.array([0.0, 0.0, 0.0, 0.0, -np.inf, 0.0, np.nan, np.nan, np.nan, np.nan,
                                0.0, 0.0, 0.0, -np.inf])
        self._start_ts = np.zeros(1, dtype=np.int64)

    @property
    def dir(self) -> int:
        """Direction of the run in progress (0 before the first move)."""
        return int(self._state[0])

    def step(self, ts: np.ndarray, price: np.ndarray, size: np.ndarray, move: np.ndarray,
             aggressor: np.ndarray, zsize: np.ndarray) -> dict[str, Calls]:
        """The calls of a batch, in one native pass over its ticks (the state machine of the
        module doc, ``_core.dsi_runs``)."""
        mo, ex, sw = _core.dsi_runs(ts, price, size, move, aggressor, zsize, self._params, self._state,
                                    self._start_ts)
        return {"momentum": Calls(*mo), "exhaustion": Calls(*ex), "sweep": Calls(*sw)}


# -- absorption ------------------------------------------------------------------------------
class AbsorptionExpert:
    """One-sided heavy aggression that does not move the price (see the module doc)."""

    name = "absorption"

    def __init__(self, *, window: int = 20, share: float = 0.7, volume: float = 1.5) -> None:
        window = check_int("absorb_window", window, 1, MAX_ABSORB_WINDOW)
        self.window = window
        self.share = check_real("absorb_share", share, 0.0, 1.0)
        self.volume = check_real("absorb_volume", volume, 0.0)
        self._tail = np.zeros((2, window))  # signed volume, volume
        self._tail_price = np.full(window, np.nan)
        self.count = 0
        self.armed = False

    def step(self, price: np.ndarray, size: np.ndarray, aggressor: np.ndarray, size_ref: np.ndarray) -> Calls:
        n = len(price)
        w = self.window
        if n == 0:
            return Calls(_EMPTY_I, np.zeros(0, np.int8))
        x = np.empty((2, n + w))
        x[:, :w] = self._tail
        x[0, w:] = aggressor * size
        x[1, w:] = size
        # sums over the last w ticks, this one included, added the same way however the ticks
        # are batched (x[:, 0] is tick count - w)
        win = window_sums(x[:, 1:], w, self.count - w + 1)
        p_ext = np.concatenate((self._tail_price, price))
        before = p_ext[:n]  # the price just before the window
        signed, vol = win
        side = np.sign(signed)
        valid = (self.count + np.arange(1, n + 1)) > w
        with np.errstate(invalid="ignore"):
            cond = (valid & (signed != 0) & (np.abs(signed) >= self.share * vol)
                    & (vol >= self.volume * w * size_ref) & (side * (price - before) <= 0))
        fire = cond & ~prepend(self.armed, cond)
        self._tail = x[:, -w:].copy()
        self._tail_price = p_ext[-w:].copy()
        self.count += n
        self.armed = bool(cond[-1])
        return Calls.where(fire, -side.astype(np.int8))


# -- divergence ------------------------------------------------------------------------------
class DivergenceVerifier:
    """Price pivots against RSI and MACD-line pivots (see the module doc)."""

    names = ("rsi_divergence", "macd_divergence")

    def __init__(self, *, rsi_period: int = 14, macd_fast: int = 12, macd_slow: int = 26, pivot: int = 5,
                 warmup: int | None = None, max_jump: float = 10.0) -> None:
        # the native pass's own check (bind_indicators.cpp, dsi_divergence), done here so an
        # update never fails after the validator and the other experts have taken the batch
        rsi_period = check_int("rsi_period", rsi_period, 1, MAX_PERIOD)
        macd_fast = check_int("macd_fast", macd_fast, 1, MAX_PERIOD - 1)
        macd_slow = check_int("macd_slow", macd_slow, 2, MAX_PERIOD)
        if macd_slow <= macd_fast:
            raise ValueError(f"need macd_fast < macd_slow, got macd_fast={macd_fast}, macd_slow={macd_slow}")
        pivot = check_int("pivot", pivot, 1, MAX_PIVOT)
        self.rsi_period, self.macd_fast, self.macd_slow, self.pivot = rsi_period, macd_fast, macd_slow, pivot
        self.warmup = check_int("div_warmup", warmup if warmup is not None else 3 * macd_slow, 0, _MAX_I64)
        self.max_jump = check_real("div_max_jump", max_jump, 1.0, lo_open=True)
        self._params = [rsi_period, macd_fast, macd_slow, pivot, self.warmup]
        # the carried state (cpp/dynamic_core/dsi.hpp, DivSlot): last price, RSI gain and
        # loss averages, the two EMAs, ticks seen, then price, rsi, macd of the previous pivot
        # high and of the previous pivot low; and the last 2 * pivot (price, rsi, macd) rows
        self._state = np.empty(12)
        self._tail = np.empty((2 * pivot, 3))
        self._start()
        self._ref = math.nan  # the last positive finite price taken: absurd prints are judged by it
        self._streak = 0      # absurd prints left out in a row
        self.skipped = 0
        """Absurd prints left out of the indicators."""
        self.restarts = 0
        """Restarts after :data:`DIV_RESTART_AFTER` absurd prints in a row."""
        self.rsi = np.zeros(0)
        """The RSI at each tick of the last batch (NaN at a print left out)."""
        self.macd = np.zeros(0)
        """The MACD line (EMA fast - EMA slow) at each tick of the last batch (NaN at a print
        left out)."""

    def _start(self) -> None:
        """The indicators of a new stream (in place: the native pass holds the arrays)."""
        self._state[:] = [np.nan, 0.0, 0.0, 0.0, 0.0, 0.0] + [np.nan] * 6
        self._tail[:] = np.nan

    @property
    def count(self) -> int:
        """Ticks taken since the indicators (re)started."""
        return int(self._state[5])

    def step(self, price: np.ndarray) -> dict[str, Calls]:
        """The calls of a batch, in one native pass (``_core.dsi_divergence``) over the prints
        that are not absurd."""
        price = np.ascontiguousarray(price, dtype=np.float64)
        taken, restart_at = self._screen(price)
        if taken is None:
            rsi, macd, self.rsi, self.macd = _core.dsi_divergence(price, self._params, self._state, self._tail)
            return {"rsi_divergence": Calls(*rsi), "macd_divergence": Calls(*macd)}
        # one native pass per stretch between restarts, over the prints taken; calls and
        # indicators mapped back to the batch's ticks
        pos = np.flatnonzero(taken)
        self.rsi = np.full(len(price), np.nan)
        self.macd = np.full(len(price), np.nan)
        rsi_calls: list[tuple[np.ndarray, np.ndarray]] = []
        macd_calls: list[tuple[np.ndarray, np.ndarray]] = []
        cuts = np.searchsorted(pos, restart_at).tolist()
        for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, len(pos)])):
            if i:  # pos[a] restarts the indicators
                self._start()
            seg = pos[a:b]
            rsi, macd, r_val, m_val = _core.dsi_divergence(price[seg], self._params, self._state, self._tail)
            self.rsi[seg], self.macd[seg] = r_val, m_val
            rsi_calls.append((seg[rsi[0]], rsi[1]))
            macd_calls.append((seg[macd[0]], macd[1]))
        return {name: Calls(*map(np.concatenate, zip(*calls)))
                for name, calls in zip(self.names, (rsi_calls, macd_calls))}

    def _screen(self, price: np.ndarray) -> tuple[np.ndarray | None, list[int]]:
        """The prints of a batch the indicators take (None: all of them) and the ticks that
        restart them. A print is absurd when it is infinite, or positive and more than
        ``max_jump`` times above or below the last positive finite price taken; NaN and
        non-positive prints are not judged here (the native pass handles them as it did). An
        infinite print never restarts the indicators."""
        n = len(price)
        if n == 0:
            return None, []
        j = self.max_jump
        lo, hi = float(price.min()), float(price.max())
        if not math.isnan(self._ref):
            lo, hi = min(lo, self._ref), max(hi, self._ref)
        if lo > 0 and math.isfinite(hi) and hi <= j * lo and lo >= hi / j:
            # every print within max_jump of any price it could be judged by (the usual case)
            self._ref, self._streak = float(price[-1]), 0
            return None, []
        good = np.isfinite(price) & (price > 0)
        # the reference before each tick if every print is taken: the last good price before it
        ref = np.empty(n)
        ref[0] = self._ref
        if good.all():
            ref[1:] = price[:-1]
        else:
            last = np.where(good, np.arange(n), -1)
            np.maximum.accumulate(last, out=last)
            ref[1:] = np.where(last[:-1] >= 0, price[np.maximum(last[:-1], 0)], self._ref)
        with np.errstate(over="ignore", invalid="ignore"):
            absurd = np.isinf(price) | (good & ((price > j * ref) | (price < ref / j)))
        flagged = np.flatnonzero(absurd)
        if len(flagged) == 0:
            if good.any():
                self._ref, self._streak = float(price[np.flatnonzero(good)[-1]]), 0
            return None, []
        # one tick at a time from the first absurd print; once a good print is taken, the
        # vector reference holds again up to the next flagged tick
        taken = np.ones(n, dtype=bool)
        restart_at: list[int] = []
        t = int(flagged[0])
        r = float(ref[t])
        streak = 0 if good[:t].any() else self._streak  # NaN prints neither end nor extend it
        while t < n:
            p = float(price[t])
            ok = math.isfinite(p) and p > 0
            if math.isinf(p) or (ok and (p > j * r or p < r / j)):
                if not ok or streak < DIV_RESTART_AFTER:
                    taken[t] = False
                    streak += 1
                    self.skipped += 1
                    t += 1
                    continue
                restart_at.append(t)  # the stream has moved: start over from this print
                self.restarts += 1
            if not ok:
                t += 1
                continue
            streak = 0
            k = int(np.searchsorted(flagged, t, side="right"))
            if k == len(flagged):
                r = float(price[np.flatnonzero(good)[-1]])
                break
            t = int(flagged[k])
            r = float(ref[t])
        self._ref, self._streak = r, streak
        return taken, restart_at


# -- sequence classifier ---------------------------------------------------------------------
N_SYMBOLS = 18


def symbols(move: np.ndarray, aggressor: np.ndarray, size_class: np.ndarray) -> np.ndarray:
    """Coarse MicroTape symbols for the sequence model: direction (flat, up, down) x aggressor
    (unknown, buy, sell) x large (size class large or block): 18 symbols."""
    d = np.where(move < 0, 2, move)
    a = np.where(aggressor < 0, 2, aggressor)
    return (d + 3 * (a + 3 * (size_class >= 2))).astype(np.int64)


class NGramClassifier:
    """Online n-gram model: the next tick's direction (flat, up, down) from the previous
    ``order - 1`` symbols, with counts and Laplace smoothing ``alpha``.

    Its call is the log-odds of an up-move over a down-move after the latest context,
    ``log((n_up + alpha) / (n_down + alpha))``.

    ``order`` is in [2, :data:`MAX_NGRAM_ORDER`] (4): the counts are a dense table of
    ``n_symbols ** (order - 1) x 3`` int64 per instrument, at most
    :data:`MAX_NGRAM_TABLE_BYTES` (1 MiB; 137 KiB at order 4 over the 18 symbols).
    """

    name = "sequence"

    def __init__(self, *, order: int = 3, alpha: float = 1.0, n_symbols: int = N_SYMBOLS) -> None:
        order = check_int("ngram_order", order, 2, MAX_NGRAM_ORDER)
        alpha = check_real("ngram_alpha", alpha, 0.0, lo_open=True)
        n_symbols = check_int("n_symbols", n_symbols, 1, 1 << 16)
        if n_symbols ** (order - 1) * 3 * 8 > MAX_NGRAM_TABLE_BYTES:
            raise ValueError(f"n-gram table of {n_symbols} ** {order - 1} contexts is over "
                             f"{MAX_NGRAM_TABLE_BYTES} bytes")
        self.order, self.alpha, self.n_symbols = order, alpha, n_symbols
        self.n_contexts = self.n_symbols ** (self.order - 1)
        self.counts = np.zeros((self.n_contexts, 3), dtype=np.int64)
        self._tail = np.full(self.order - 1, -1, dtype=np.int64)

    def _contexts(self, sym: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h = self.order - 1
        ext = np.concatenate((self._tail, sym))
        n = len(sym)
        ctx = np.zeros(n, dtype=np.int64)
        valid = np.ones(n, dtype=bool)
        for j in range(h):  # ext[t + j] is the (h - j)-th symbol before tick t
            s = ext[j:j + n]
            valid &= s >= 0
            ctx = ctx * self.n_symbols + np.maximum(s, 0)
        return ctx, valid

    def update(self, sym: np.ndarray, outcome: np.ndarray, *, predictions: bool = False) -> np.ndarray | None:
        """Learn a batch (``outcome``: 0 flat, 1 up, 2 down, the direction class of each tick).

        With ``predictions``, also return the (n, 3) probabilities the model gave each tick
        before seeing it (online, tick by tick), rows of NaN where it had no full context.
        """
        sym = np.asarray(sym, dtype=np.int64)
        outcome = np.asarray(outcome, dtype=np.int64)
        n = len(sym)
        ctx, valid = self._contexts(sym)
        probs = None
        if predictions:
            probs = np.full((n, 3), np.nan)
            idx = np.flatnonzero(valid)
            if len(idx):
                c = ctx[idx]
                o = np.argsort(c, kind="stable")
                cs, oc = c[o], outcome[idx[o]]
                onehot = np.zeros((len(o), 3))
                onehot[np.arange(len(o)), oc] = 1.0
                run = np.cumsum(onehot, axis=0) - onehot  # earlier same-context ticks in this batch
                first = np.ones(len(cs), dtype=bool)
                first[1:] = cs[1:] != cs[:-1]
                starts = np.flatnonzero(first)
                grp = np.cumsum(first) - 1
                run -= run[starts][grp]
                cnt = self.counts[cs] + run
                p = (cnt + self.alpha) / (cnt.sum(axis=1, keepdims=True) + 3 * self.alpha)
                probs[idx[o]] = p
        keys = ctx[valid] * 3 + outcome[valid]
        self.counts += np.bincount(keys, minlength=self.n_contexts * 3).reshape(self.n_contexts, 3)
        h = self.order - 1
        self._tail = np.concatenate((self._tail, sym))[-h:]
        return probs

    def context(self) -> int | None:
        """Context id after the latest tick, or None before ``order - 1`` ticks."""
        if (self._tail < 0).any():
            return None
        c = 0
        for s in self._tail:
            c = c * self.n_symbols + int(s)
        return c

    def predict(self) -> np.ndarray:
        """P(flat, up, down) of the next tick (uniform without a context)."""
        c = self.context()
        cnt = self.counts[c] if c is not None else np.zeros(3)
        return (cnt + self.alpha) / (cnt.sum() + 3 * self.alpha)

    def log_odds(self) -> float:
        """log P(up) / P(down) of the next tick."""
        c = self.context()
        if c is None:
            return 0.0
        up, down = self.counts[c, 1], self.counts[c, 2]
        return detmath.log((up + self.alpha) / (down + self.alpha))

    def context_name(self) -> str:
        """The latest context in words, oldest symbol first (``"up.buy.large>down.sell"``)."""
        if self.context() is None:
            return ""
        parts = []
        for s in self._tail:
            s = int(s)
            d, a, big = s % 3, (s // 3) % 3, s // 9
            parts.append(".".join([("flat", "up", "down")[d], ("unknown", "buy", "sell")[a]] + (["large"] if big else [])))
        return ">".join(parts)
