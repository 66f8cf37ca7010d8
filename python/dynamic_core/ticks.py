"""Tick ingress: validation with reason codes and dead letters, and tick-to-bar aggregation.

A tick feed drives the bar agents through :class:`TickAggregator`: trade prints go in (numpy
``TICK_DTYPE`` batches, in any instrument interleaving), finished ``BAR_DTYPE`` bars come out per
(instrument, timeframe) — OHLC from the trade prices, volume the sum of the sizes, ``ts`` the
bucket start (UTC, aligned on the epoch: an H1 bar starts on the hour). A bar is finished when a
tick of a later bucket of the same instrument arrives, when :meth:`TickAggregator.close_until`
passes its end, or on :meth:`TickAggregator.flush`. Buckets without ticks give no bar. A bar,
once finished, never reopens: a later tick of its bucket is refused as ``late``.

Every batch is handled with whole-array numpy operations: there is no Python loop per tick.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

import numpy as np

from ._checks import check_int, check_real
from .instruments import instruments as _registry
from .market import _INT64_MAX, as_records, parse_timeframe
from .records import BAR_DTYPE, MAX_PRICE, MIN_PRICE, TICK_DTYPE

__all__ = [
    "TICK_DEAD_LETTER_DTYPE",
    "TICK_REASONS",
    "MAX_TICK_SIZE",
    "TickAggregator",
    "TickValidator",
    "as_ticks",
    "tick_reason_counts",
    "validate_ticks",
]

TICK_REASONS: tuple[str, ...] = (
    "ok",
    "unknown_instrument",
    "bad_side",
    "non_finite",
    "non_positive_price",
    "negative_size",
    "bad_quote",
    "crossed_quote",
    "price_out_of_band",
    "out_of_order",
    "bad_timestamp",
    "late",
    "size_too_large",
    "price_out_of_range",
)
"""Tick reject reason names indexed by code (0 is ``ok``). A tick gets the first that applies,
in this order except that ``size_too_large`` (a size above :data:`MAX_TICK_SIZE`) is checked
right after ``negative_size`` and ``price_out_of_range`` (a positive price outside
[:data:`dynamic_core.MIN_PRICE`, :data:`dynamic_core.MAX_PRICE`], which a bar may not carry)
right after ``non_positive_price``, and ``bad_timestamp`` (a time whose bar would not fit int64
nanoseconds, :class:`TickAggregator`) and ``late`` (a tick of a bar the aggregator has already
finished by the clock) come before ``out_of_order``: a refused tick never counts for the order
of the next ones. Codes are only ever appended, so a stored code keeps its meaning."""

_R = {name: np.uint32(i) for i, name in enumerate(TICK_REASONS)}

MAX_TICK_SIZE = 1e15
"""The largest tick size taken: a bar's volume, the sum of its ticks' sizes, then stays finite
(a few sizes near the float maximum summed to inf, and the engine refused the whole bar)."""

TICK_DEAD_LETTER_DTYPE: np.dtype = np.dtype(
    {
        "names": [*TICK_DTYPE.names, "index", "reason", "batch"],
        "formats": [TICK_DTYPE.fields[n][0] for n in TICK_DTYPE.names] + ["<u8", "<u4", "<u4"],
        "offsets": [TICK_DTYPE.fields[n][1] for n in TICK_DTYPE.names]
        + [TICK_DTYPE.itemsize, TICK_DTYPE.itemsize + 8, TICK_DTYPE.itemsize + 12],
        "itemsize": TICK_DTYPE.itemsize + 16,
    }
)
"""A refused tick followed by its position in its batch, the reason code and the batch number
(counted from 0 by the validator, modulo 2^32)."""

_NONE = np.iinfo(np.int64).min
_NS = 1_000_000_000
MAX_DEAD_LETTERS = 10_000_000
"""Largest ``max_dead_letters`` (the Engine's dead-letter capacity bound)."""


def as_ticks(ticks: object, what: str = "ticks") -> np.ndarray:
    """``ticks`` as a contiguous 1-d ``TICK_DTYPE`` array, or a TypeError saying what was expected."""
    return as_records(ticks, TICK_DTYPE, "TICK_DTYPE", what)


def _instrument_order(inst: np.ndarray) -> np.ndarray:
    """Stable order grouping ``inst``; a radix sort when the ids fit 16 bits."""
    if len(inst) and int(inst.max()) < 65536:
        return np.argsort(inst.astype(np.uint16), kind="stable")
    return np.argsort(inst, kind="stable")


def _segment_starts(keys: np.ndarray) -> np.ndarray:
    """Indices where a run of equal values in ``keys`` starts (``keys`` grouped)."""
    if len(keys) == 0:
        return np.zeros(0, dtype=np.intp)
    flag = np.empty(len(keys), dtype=bool)
    flag[0] = True
    np.not_equal(keys[1:], keys[:-1], out=flag[1:])
    return np.flatnonzero(flag)


def _out_of_order(ts: np.ndarray, inst: np.ndarray, last_ts: np.ndarray | None) -> np.ndarray:
    """Flags of the ticks whose ``ts`` is before an earlier tick of their instrument (in this
    batch, or ``last_ts[instrument]`` from earlier batches). Equal times are in order."""
    n = len(ts)
    bad = np.zeros(n, dtype=bool)
    if n == 0:
        return bad
    order = _instrument_order(inst)
    s_ts = ts[order]
    s_inst = inst[order]
    starts = _segment_starts(s_inst)
    seg = np.zeros(n, dtype=np.int64)
    seg[starts[1:]] = 1
    np.cumsum(seg, out=seg)
    prior = np.full(len(starts), _NONE, dtype=np.int64)
    if last_ts is not None:
        ids = s_inst[starts].astype(np.int64)
        have = ids < len(last_ts)
        prior[have] = last_ts[ids[have]]
    tmin, tmax = int(s_ts.min()), int(s_ts.max())
    span = tmax - tmin + 3
    if span * (len(starts) + 1) < 2**62:
        # One running max over the whole batch: each instrument's times are lifted above the
        # previous instrument's, so the max never leaks across instruments.
        key = (s_ts - tmin + 1) + seg * span
        run = np.maximum.accumulate(key)
        prev = np.empty(n, dtype=np.int64)
        prev[0] = _NONE
        prev[1:] = run[:-1] - seg[1:] * span + tmin - 1
        prev[starts] = _NONE
    else:  # a batch with absurd time spread: one instrument at a time
        prev = np.full(n, _NONE, dtype=np.int64)
        ends = np.append(starts[1:], n)
        for a, b in zip(starts, ends):
            if b - a > 1:
                prev[a + 1:b] = np.maximum.accumulate(s_ts[a:b - 1])
    prev = np.maximum(prev, prior[seg])
    bad[order] = s_ts < prev
    return bad


def _check_band(band: float, band_spreads: float) -> tuple[float, float]:
    return check_real("band", band, 0.0), check_real("band_spreads", band_spreads, 0.0)


def _per_instrument(name: str, a: object, kind: str) -> np.ndarray | None:
    """``a`` as a 1-d table indexed by instrument id: bool (``kind="bool"``) or int64 times."""
    if a is None:
        return None
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-d array indexed by instrument id, got shape {arr.shape}")
    if len(arr) == 0:  # no instrument at all ([] reads as float64)
        return np.zeros(0, dtype=np.bool_ if kind == "bool" else np.int64)
    if kind == "bool":
        if arr.dtype != np.bool_:
            raise TypeError(f"{name} must be a bool array (index = instrument id), got dtype {arr.dtype}")
        return arr
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be an integer array of times in ns (index = instrument id), "
                        f"got dtype {arr.dtype}")
    if arr.dtype == np.uint64 and len(arr) and int(arr.max()) > _INT64_MAX:
        raise ValueError(f"{name} holds a time beyond int64")
    return arr.astype(np.int64, copy=False)


def _check_ts_range(ts_range: object) -> tuple[int, int] | None:
    if ts_range is None:
        return None
    if not isinstance(ts_range, (tuple, list)) or len(ts_range) != 2:
        raise TypeError(f"ts_range must be a (first, last) pair of times in ns, got {ts_range!r}")
    lo = check_int("ts_range[0]", ts_range[0], -_INT64_MAX - 1, _INT64_MAX)
    hi = check_int("ts_range[1]", ts_range[1], -_INT64_MAX - 1, _INT64_MAX)
    if lo > hi:
        raise ValueError(f"ts_range starts after it ends: {lo} > {hi}")
    return lo, hi


def validate_ticks(ticks: np.ndarray, *, last_ts: np.ndarray | None = None,
                   allowed: np.ndarray | None = None, band: float = 0.01,
                   band_spreads: float = 10.0, ts_range: tuple[int, int] | None = None,
                   sealed: np.ndarray | None = None) -> np.ndarray:
    """Reject reason code of each tick (0 = ok); names in :data:`TICK_REASONS`.

    Parameters
    ----------
    ticks : numpy array of ``dc.TICK_DTYPE``
    last_ts : int64 array, optional
        Last accepted time per instrument id from earlier batches (``INT64_MIN``: none); a tick
        earlier than it, or than an earlier valid tick of its instrument in this batch, is
        ``out_of_order``. Equal times are allowed (several prints in one nanosecond).
    allowed : bool array, optional
        Instrument ids accepted (index = id). Default: every id registered in ``dc.instruments``.
    band, band_spreads : float
        A quoted tick's price must lie within ``max(band * mid, band_spreads * spread)`` of the
        quote; ``bid == ask == 0`` means no quote and skips the quote checks. Finite, >= 0.
    ts_range : (int, int), optional
        Times accepted (ns, both ends included); others are ``bad_timestamp``.
    sealed : int64 array, optional
        Per instrument id, the time before which its ticks are ``late`` (``INT64_MIN``: none).
    """
    band, band_spreads = _check_band(band, band_spreads)
    last_ts = _per_instrument("last_ts", last_ts, "int64")
    allowed = _per_instrument("allowed", allowed, "bool")
    sealed = _per_instrument("sealed", sealed, "int64")
    ts_range = _check_ts_range(ts_range)
    t = as_ticks(ticks)
    n = len(t)
    code = np.zeros(n, dtype=np.uint32)
    if n == 0:
        return code
    inst = t["instrument"]
    price, size, bid, ask = t["price"], t["size"], t["bid"], t["ask"]
    if allowed is None:
        known = inst < len(_registry)
    else:
        known = np.zeros(n, dtype=bool)
        in_range = inst < len(allowed)
        known[in_range] = allowed[inst[in_range]]
    has_quote = (bid != 0) | (ask != 0)
    spread = ask - bid
    mid = 0.5 * (bid + ask)
    with np.errstate(invalid="ignore", over="ignore"):
        width = np.maximum(band * np.abs(mid), band_spreads * spread)
        outside = has_quote & ((price < bid - width) | (price > ask + width))
    finite = np.isfinite(price) & np.isfinite(size) & np.isfinite(bid) & np.isfinite(ask)
    # Later checks first, so the first that applies is the one left standing.
    code[outside] = _R["price_out_of_band"]
    code[has_quote & (bid > ask)] = _R["crossed_quote"]
    code[has_quote & ((bid <= 0) | (ask <= 0))] = _R["bad_quote"]
    code[size > MAX_TICK_SIZE] = _R["size_too_large"]
    code[size < 0] = _R["negative_size"]
    code[(price < MIN_PRICE) | (price > MAX_PRICE)] = _R["price_out_of_range"]
    code[price <= 0] = _R["non_positive_price"]
    code[~finite] = _R["non_finite"]
    code[t["side"] > 2] = _R["bad_side"]
    code[~known] = _R["unknown_instrument"]
    ok = code == 0
    if ts_range is not None or sealed is not None:
        ts = t["ts"]
        t_lo, t_hi = int(ts.min()), int(ts.max())  # the usual batch needs neither mask below
        again = False
        if sealed is not None and len(sealed) and t_lo < int(sealed.max()):
            in_range = inst < len(sealed)
            floor = np.full(n, _NONE, dtype=np.int64)
            floor[in_range] = sealed[inst[in_range]]
            code[ok & (ts < floor)] = _R["late"]
            again = True
        if ts_range is not None and (t_lo < ts_range[0] or t_hi > ts_range[1]):
            code[ok & ((ts < ts_range[0]) | (ts > ts_range[1]))] = _R["bad_timestamp"]
            again = True
        if again:
            ok = code == 0
    if ok.any():
        idx = np.flatnonzero(ok)
        late = _out_of_order(t["ts"][idx], inst[idx], last_ts)
        code[idx[late]] = _R["out_of_order"]
    return code


def tick_reason_counts(codes: np.ndarray) -> dict[str, int]:
    """{reason name: count} of the non-zero codes returned by :func:`validate_ticks`."""
    c = np.asarray(codes)
    counts = np.bincount(c[c != 0].astype(np.intp), minlength=len(TICK_REASONS))
    return {TICK_REASONS[i]: int(k) for i, k in enumerate(counts) if k}


def _allowed(instruments: str | int | Iterable[str | int] | None) -> np.ndarray | None:
    if instruments is None:
        return None
    ids = _registry.resolve_all(instruments)
    mask = np.zeros(max(ids, default=-1) + 1, dtype=bool)
    mask[ids] = True
    return mask


class TickValidator:
    """Stateful tick validation: per-instrument time order across batches, reject counters by
    reason, and the most recent refused ticks kept as dead letters (at most ``max_dead_letters``).

    Calling it with a batch returns the accepted ticks (original order) and every tick's code.

    ``instruments`` (a name, an id or an iterable of them) restricts the accepted instruments;
    ``max_dead_letters`` is at most :data:`MAX_DEAD_LETTERS`; ``band`` and ``band_spreads`` as
    for :func:`validate_ticks`; ``ts_range`` (ns, inclusive) refuses other times as
    ``bad_timestamp``.
    """

    def __init__(self, *, instruments: str | int | Iterable[str | int] | None = None,
                 max_dead_letters: int = 10_000, band: float = 0.01, band_spreads: float = 10.0,
                 ts_range: tuple[int, int] | None = None) -> None:
        max_dead_letters = check_int("max_dead_letters", max_dead_letters, 0, MAX_DEAD_LETTERS)
        self._band, self._band_spreads = _check_band(band, band_spreads)
        self._allowed = _allowed(instruments)
        self._ts_range = _check_ts_range(ts_range)
        self._sealed: np.ndarray | None = None  # per instrument: ticks before it are late
        self._last_ts = np.full(0, _NONE, dtype=np.int64)
        self._counts = np.zeros(len(TICK_REASONS), dtype=np.int64)
        self._dead = np.zeros(max_dead_letters, dtype=TICK_DEAD_LETTER_DTYPE)
        self._dead_n = 0  # ever written; the ring holds the last len(self._dead)
        self._batch = 0

    def __call__(self, ticks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = as_ticks(ticks)
        code = validate_ticks(t, last_ts=self._last_ts, allowed=self._allowed, band=self._band,
                              band_spreads=self._band_spreads, ts_range=self._ts_range, sealed=self._sealed)
        ok = code == 0
        self._counts += np.bincount(code, minlength=len(TICK_REASONS))
        if not ok.all():
            self._bury(t, code)
        good = t[ok] if not ok.all() else t
        if len(good):
            inst = good["instrument"]
            top = int(inst.max())
            if top >= len(self._last_ts):
                grown = np.full(max(top + 1, 2 * len(self._last_ts)), _NONE, dtype=np.int64)
                grown[:len(self._last_ts)] = self._last_ts
                self._last_ts = grown
            # ufunc.at applies every write, so the maximum per instrument wins whatever the order
            np.maximum.at(self._last_ts, inst, good["ts"])
        self._batch += 1
        return good, code

    def seal(self, instruments: np.ndarray, until: np.ndarray) -> None:
        """Refuse, as ``late``, every later tick of ``instruments[k]`` before ``until[k]`` (ns):
        its bar has been finished."""
        ids = np.asarray(instruments, dtype=np.int64)
        if len(ids) == 0:
            return
        top = int(ids.max())
        cur = self._sealed if self._sealed is not None else np.full(0, _NONE, dtype=np.int64)
        if top >= len(cur):
            grown = np.full(max(top + 1, 2 * len(cur)), _NONE, dtype=np.int64)
            grown[:len(cur)] = cur
            cur = grown
        np.maximum.at(cur, ids, np.asarray(until, dtype=np.int64))
        self._sealed = cur

    def _bury(self, t: np.ndarray, code: np.ndarray) -> None:
        cap = len(self._dead)
        if cap == 0:
            return
        idx = np.flatnonzero(code)[-cap:]
        k = len(idx)
        rows = np.zeros(k, dtype=TICK_DEAD_LETTER_DTYPE)
        for name in TICK_DTYPE.names:
            rows[name] = t[name][idx]
        rows["index"] = idx
        rows["reason"] = code[idx]
        rows["batch"] = self._batch & 0xFFFFFFFF  # the field is uint32: the count wraps after 2^32 batches
        pos = (self._dead_n + np.arange(k)) % cap
        self._dead[pos] = rows
        self._dead_n += k

    @property
    def rejects(self) -> dict[str, int]:
        """{reason name: count} of every tick refused so far."""
        return {TICK_REASONS[i]: int(k) for i, k in enumerate(self._counts) if i and k}

    @property
    def accepted(self) -> int:
        """Number of ticks accepted so far."""
        return int(self._counts[0])

    @property
    def rejected(self) -> int:
        """Number of ticks refused so far."""
        return int(self._counts[1:].sum())

    def dead_letters(self) -> np.ndarray:
        """The most recent refused ticks, oldest first (``TICK_DEAD_LETTER_DTYPE``)."""
        cap = len(self._dead)
        if self._dead_n <= cap:
            return self._dead[:self._dead_n].copy()
        start = self._dead_n % cap
        return np.concatenate([self._dead[start:], self._dead[:start]])

    def last_ts(self, instrument: str | int) -> int | None:
        """Time of the last accepted tick of ``instrument`` (ns), or None;
        :class:`~dynamic_core.instruments.UnknownInstrument` (a ValueError) for an unregistered
        name or id (a name is never registered by asking)."""
        i = _registry.lookup(instrument)
        v = int(self._last_ts[i]) if i < len(self._last_ts) else _NONE
        return None if v == _NONE else v


class _Pending:
    """The open bar of each instrument for one timeframe, indexed by instrument id."""

    def __init__(self) -> None:
        self.bucket = np.full(0, _NONE, dtype=np.int64)
        self.ohlcv = np.zeros((0, 5), dtype=np.float64)

    def grow(self, top: int) -> None:
        n = len(self.bucket)
        if top < n:
            return
        m = max(top + 1, 2 * n, 16)
        b = np.full(m, _NONE, dtype=np.int64)
        b[:n] = self.bucket
        v = np.zeros((m, 5), dtype=np.float64)
        v[:n] = self.ohlcv
        self.bucket, self.ohlcv = b, v


def _ts_range(timeframes: Iterable[int]) -> tuple[int, int]:
    """Tick times (ns, inclusive) whose bucket start and end fit int64 for every timeframe."""
    lo, hi = -(2**63), 2**63 - 1
    for tf in timeframes:
        w = tf * _NS
        first = -((2**63) // w)  # the earliest bucket starting at or after INT64_MIN
        last = (2**63 - 1) // w - 1  # the latest bucket ending at or before INT64_MAX
        lo, hi = max(lo, first * w), min(hi, (last + 1) * w - 1)
    return lo, hi


def _bars(inst: np.ndarray, bucket: np.ndarray, ohlcv: np.ndarray, tf: int) -> np.ndarray:
    out = np.zeros(len(inst), dtype=BAR_DTYPE)
    out["ts"] = bucket * (tf * _NS)
    out["instrument"] = inst
    out["timeframe"] = tf
    out["open"], out["high"], out["low"], out["close"], out["volume"] = ohlcv.T
    return out


class TickAggregator:
    """Streaming tick-to-bar aggregation for several timeframes at once.

    Parameters
    ----------
    timeframes : int, str or an iterable of them
        Whole seconds, ``"M1"``/``"H1"`` or pandas offsets (``"1min"``, ``"1h"``).
    instruments : str, int or an iterable of them, optional
        Accept only these instruments; default every registered one.
    max_dead_letters : int
        Refused ticks kept for inspection (the most recent ones).
    band, band_spreads : float
        Price band around the quote, see :func:`validate_ticks`.

    Notes
    -----
    Each call's bars come out ordered by their close time (``ts + timeframe``), then timeframe,
    then instrument; across calls each (instrument, timeframe) stream is in time order (a bar
    closes when its instrument's next bucket starts), so the output feeds
    :meth:`dynamic_core.Engine.run` directly. Open, high,
    low and close do not depend on how a feed is cut into batches; volume neither when the
    sizes add exactly (whole lots, shares, contracts), otherwise it can differ in the last bits
    (numpy sums a batch's part of a bar pairwise, then adds it to the open bar's volume).

    Two kinds of tick are refused here on top of :func:`validate_ticks`' checks (counted and
    dead-lettered like the others): ``bad_timestamp``, a time whose bar would start or end
    outside int64 nanoseconds for one of the timeframes (within one timeframe of 1677 or 2262),
    and ``late``, a tick of a bar already finished by :meth:`close_until` or :meth:`flush`
    (it would make a second bar with the same ``ts``).
    """

    def __init__(self, timeframes: int | str | Iterable[int | str], *,
                 instruments: str | int | Iterable[str | int] | None = None,
                 max_dead_letters: int = 10_000, band: float = 0.01, band_spreads: float = 10.0) -> None:
        if isinstance(timeframes, (str, int, float, np.integer, np.floating)):
            timeframes = [timeframes]
        tfs = sorted({parse_timeframe(tf) for tf in timeframes})
        if not tfs:
            raise ValueError("TickAggregator needs at least one timeframe")
        self.timeframes: tuple[int, ...] = tuple(tfs)
        self.validator = TickValidator(instruments=instruments, max_dead_letters=max_dead_letters,
                                       band=band, band_spreads=band_spreads, ts_range=_ts_range(tfs))
        self._pending = {tf: _Pending() for tf in self.timeframes}
        self.bars_out = 0
        self.last_accepted = np.zeros(0, dtype=bool)  # of the last update's batch

    # -- counters ---------------------------------------------------------------------------
    @property
    def rejects(self) -> dict[str, int]:
        return self.validator.rejects

    @property
    def accepted(self) -> int:
        return self.validator.accepted

    def dead_letters(self) -> np.ndarray:
        return self.validator.dead_letters()

    # -- data path --------------------------------------------------------------------------
    def update(self, ticks: np.ndarray) -> np.ndarray:
        """Take a batch of ticks; return the bars it finished (``BAR_DTYPE``). ``last_accepted``
        is then the batch's mask of ticks taken (the others were refused and counted)."""
        good, code = self.validator(ticks)
        self.last_accepted = code == 0
        if len(good) == 0:
            return np.zeros(0, dtype=BAR_DTYPE)
        order = _instrument_order(good["instrument"])
        inst = good["instrument"][order]
        ts = good["ts"][order]
        price = good["price"][order]
        size = good["size"][order]
        inst_starts = _segment_starts(inst)
        out = [self._one(tf, inst, ts, price, size, inst_starts) for tf in self.timeframes]
        return self._emit(out)

    def _one(self, tf: int, inst: np.ndarray, ts: np.ndarray, price: np.ndarray, size: np.ndarray,
             inst_starts: np.ndarray) -> list[np.ndarray]:
        pend = self._pending[tf]
        pend.grow(int(inst.max()))
        n = len(ts)
        bucket = ts // (tf * _NS)  # floor division: epoch-aligned buckets, also before 1970
        flag = np.zeros(n, dtype=bool)
        flag[inst_starts] = True
        flag[1:] |= bucket[1:] != bucket[:-1]
        g = np.flatnonzero(flag)
        g_inst = inst[g]
        g_bucket = bucket[g]
        first = np.zeros(len(g), dtype=bool)
        first[np.searchsorted(g, inst_starts)] = True
        last = np.zeros(len(g), dtype=bool)
        last[:-1] = first[1:]
        last[-1] = True

        fi = g_inst[first]
        p_bucket = pend.bucket[fi]
        merge = p_bucket == g_bucket[first]
        closed = (p_bucket != _NONE) & ~merge
        bars = []
        if closed.any():
            ids = fi[closed]
            bars.append(_bars(ids, p_bucket[closed], pend.ohlcv[ids], tf))

        vol_in = size
        if merge.any():
            # the open bar's volume joins the sum through its first new tick
            vol_in = size.copy()
            vol_in[g[first][merge]] = pend.ohlcv[fi[merge], 4] + size[g[first][merge]]
        ohlcv = np.empty((len(g), 5), dtype=np.float64)
        ohlcv[:, 0] = price[g]
        ohlcv[:, 1] = np.maximum.reduceat(price, g)
        ohlcv[:, 2] = np.minimum.reduceat(price, g)
        ohlcv[:, 3] = price[np.append(g[1:], n) - 1]
        ohlcv[:, 4] = np.add.reduceat(vol_in, g)
        if merge.any():
            rows = np.flatnonzero(first)[merge]
            prev = pend.ohlcv[fi[merge]]
            ohlcv[rows, 0] = prev[:, 0]
            ohlcv[rows, 1] = np.maximum(prev[:, 1], ohlcv[rows, 1])
            ohlcv[rows, 2] = np.minimum(prev[:, 2], ohlcv[rows, 2])

        done = ~last
        if done.any():
            bars.append(_bars(g_inst[done], g_bucket[done], ohlcv[done], tf))
        li = g_inst[last]
        pend.bucket[li] = g_bucket[last]
        pend.ohlcv[li] = ohlcv[last]
        return bars

    def _emit(self, parts: list[list[np.ndarray]]) -> np.ndarray:
        flat = [b for p in parts for b in p if len(b)]
        if not flat:
            return np.zeros(0, dtype=BAR_DTYPE)
        bars = np.concatenate(flat) if len(flat) > 1 else flat[0]
        # close times fit int64: ticks whose bar would end past it are refused (bad_timestamp)
        order = np.lexsort((bars["instrument"], bars["timeframe"],
                            bars["ts"] + bars["timeframe"].astype(np.int64) * _NS))
        bars = bars[order]
        self.bars_out += len(bars)
        return bars

    def close_until(self, ts: int) -> np.ndarray:
        """Finish the open bars that end at or before ``ts`` (ns) even though no later tick has
        come: a clock-driven close for quiet instruments. Later ticks of a bar finished so are
        refused as ``late``."""
        if isinstance(ts, bool):
            raise TypeError("close_until: ts must be an int (ns)")
        ts = min(max(operator.index(ts), int(_NONE)), int(_INT64_MAX))
        out = []
        for tf in self.timeframes:
            pend = self._pending[tf]
            open_ = pend.bucket != _NONE
            ids = np.flatnonzero(open_)
            # bucket ends fit int64: ticks whose would not are refused as bad_timestamp
            end = (pend.bucket[ids] + 1) * (tf * _NS)
            done = end <= ts
            ids = ids[done]
            if len(ids):
                out.append([_bars(ids.astype(np.uint32), pend.bucket[ids], pend.ohlcv[ids], tf)])
                pend.bucket[ids] = _NONE
                self.validator.seal(ids, end[done])
        return self._emit(out)

    def flush(self) -> np.ndarray:
        """Finish every open bar (end of a feed or of a replay)."""
        return self.close_until(np.iinfo(np.int64).max)

    def pending(self) -> np.ndarray:
        """The open bars as they stand, without finishing them."""
        parts = []
        for tf in self.timeframes:
            pend = self._pending[tf]
            ids = np.flatnonzero(pend.bucket != _NONE)
            parts.append(_bars(ids.astype(np.uint32), pend.bucket[ids], pend.ohlcv[ids], tf))
        bars = np.concatenate(parts)
        return bars[np.lexsort((bars["instrument"], bars["timeframe"], bars["ts"]))]
