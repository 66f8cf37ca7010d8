"""Replay harness: how well the causal SMC detectors agree with ``smartmoneyconcepts``.

The ``smartmoneyconcepts`` package labels a whole series at once and looks ahead; the
detectors of :mod:`dynamic_core.learning.dsi.smc` see one bar at a time. This module runs both
on the same bars and scores the causal events against the package's labels, concept by
concept, where the package's labels are *settled* (would not change if more bars came):

=============  =====================================================  ===========================
concept        a label is                                             compared where
=============  =====================================================  ===========================
``swing``      (bar, high/low); ours after supersession events        bar before the last swing
               (settled: a swing later superseded is not counted)
``swing_first``  every swing event as first emitted (no supersession)  as ``swing``
``bos``        (broken swing bar, direction)                          swing bar <= 4th-last swing
``choch``      (broken swing bar, direction)                          and break before 3rd-last
``fvg``        (middle bar, direction)                                every bar
``liquidity``  (anchor swing bar, direction); the detector is given   anchor before 2nd-last swing
               the package's band, a share of the *whole series'*
               range (look-ahead: not a causal figure)
``liquidity_causal``  as ``liquidity``, the detector using its own     as ``liquidity``
               causal band (a share of the range seen so far)
``order_block``  (block bar, direction), blocks not invalidated        block before the last swing
=============  =====================================================  ===========================

The bars are checked first with the engine's own validation (:func:`dynamic_core.market.validate`:
non-finite or non-positive prices, high below low, open or close outside the bar, negative
volume, times out of order or repeated): invalid bars are dropped and counted per reason, and
only the valid ones are labelled, run and measured (their range included).

Every concept also skips labels before the first swing (where the package's made-up swing at
bar 0 acts and no causal detector has confirmed anything). ``tp``/``fp``/``fn`` count matching,
causal-only and package-only labels; ``precision = tp/(tp+fp)``, ``recall = tp/(tp+fn)``.
``attr`` is the share of matched labels whose attributes also agree (the break bar for
BOS/CHoCH, the mitigation bar for gaps, the sweep bar and member mean for liquidity, top and
bottom for order blocks) and ``lag`` the mean bars from a label's bar to its confirmation.

Definitional differences that cost agreement (besides look-ahead itself) are documented in
:func:`smc_agreement`.

Usage::

    table = replay_report({"EURUSD": df}, swing_length=10)    # or a journal directory
    print(format_report(table))
    table.attrs["rejected"]      # {stream: {reason: invalid bars dropped}}
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .._checks import check_int, check_real
from .dsi.smc import (
    BOS,
    CHOCH,
    FVG,
    FVG_MITIGATED,
    LIQUIDITY,
    LIQUIDITY_SWEPT,
    LIQUIDITY_WITHDRAWN,
    OB_INVALIDATED,
    ORDER_BLOCK,
    SWING,
    SmcDetector,
    SmcEvent,
    _MAX_SWING,
    ohlcv_arrays,
)

__all__ = [
    "CONCEPTS",
    "format_report",
    "journal_bars",
    "print_replay_report",
    "reference_labels",
    "replay_report",
    "smc_agreement",
]

CONCEPTS: tuple[str, ...] = ("swing", "swing_first", "bos", "choch", "fvg", "liquidity", "liquidity_causal",
                             "order_block")

Progress = Callable[[str], None]
"""A callback taking a short line on the work under way (for a status line on long runs)."""

_PROGRESS_EVERY = 8192   # bars between progress calls inside a detector run
_SHORT = "fewer than"     # in the reason of a stream skipped for want of bars


def _check_args(swing_length: Any, close_break: Any, close_mitigation: Any, range_percent: Any) -> int:
    """The package's parameters checked before any work: TypeError for a wrong type, ValueError
    naming the argument for a value out of range. Returns ``swing_length``."""
    L = check_int("swing_length", swing_length, 1, _MAX_SWING)
    for name, v in (("close_break", close_break), ("close_mitigation", close_mitigation)):
        if not isinstance(v, (bool, np.bool_)):
            raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
    check_real("range_percent", range_percent, 0.0)
    return L


def _check_progress(progress: Any) -> None:
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be callable or None, got {type(progress).__name__}")


def _prefixed(progress: Progress, prefix: str) -> Progress:
    """``progress`` with each line prefixed (the stream it is about)."""
    return lambda text: progress(prefix + text)


def _one_stream(keys: list[tuple[Any, Any]], what: str) -> None:
    """ValueError when the distinct (instrument, timeframe) ``keys`` of some bars are more than
    one stream: scored as one series, two instruments' bars would interleave into nonsense."""
    if len(keys) > 1:
        shown = ", ".join(f"{a}/{b}" for a, b in sorted(keys, key=str)[:5])
        shown += ", ..." if len(keys) > 5 else ""
        raise ValueError(f"{what} hold {len(keys)} streams (instrument/timeframe: {shown}); compare one at a "
                         f"time, or give them to replay_report, which splits bar records per stream")


def _valid_bars(bars: Any, what: str = "bars") -> tuple[np.ndarray, dict[str, int]]:
    """The valid bars of one stream as an ``(n, 5)`` OHLCV float64 array, in the order given, and
    ``{reason: count}`` of the bars dropped. The checks are the engine's
    (:func:`dynamic_core.market.validate`, its reason names): prices, volume, and time order where
    the bars have times (bar records' ``ts``; a DataFrame's time column or DatetimeIndex); bars
    without times are taken in row order. The instrument is not checked (a journal's ids are
    another process's); ValueError for bars of more than one stream."""
    from .. import _core
    from ..market import _TIME_COLUMNS, _to_ns, reason_counts
    from ..records import BAR_DTYPE

    ts: np.ndarray | None = None
    tf: Any = 1
    if hasattr(bars, "columns"):
        import pandas as pd

        cols = {str(c).strip().lower(): c for c in bars.columns}
        ic = cols.get("instrument", cols.get("symbol"))
        tc = cols.get("timeframe")
        if ic is not None or tc is not None:
            n = len(bars)
            keys = pd.DataFrame({"i": bars[ic] if ic is not None else ["-"] * n,
                                 "t": bars[tc] if tc is not None else ["-"] * n}).drop_duplicates()
            _one_stream(list(keys.itertuples(index=False, name=None)), what)
        tcol = next((cols[k] for k in _TIME_COLUMNS if k in cols), None)
        if tcol is not None:
            ts = _to_ns(bars[tcol], f"{what}: time column {tcol!r}")
        elif isinstance(bars.index, pd.DatetimeIndex):
            ts = _to_ns(pd.Series(bars.index), f"{what}: the DatetimeIndex")
    elif isinstance(bars, np.ndarray) and bars.dtype.names:
        names = {k.lower(): k for k in bars.dtype.names}
        if "instrument" in names or "timeframe" in names:
            from ..instruments import instruments

            n = len(bars)
            zero = np.zeros(n, dtype=np.int64)
            pairs = np.unique(np.stack([np.asarray(bars[names[k]], dtype=np.int64) if k in names else zero
                                        for k in ("instrument", "timeframe")], axis=1), axis=0)
            # bar records carry ids: say the names this process has for them
            _one_stream([(instruments.name(i) if 0 <= i < len(instruments) else i, t)
                         for i, t in pairs.tolist()], what)
        if "ts" in names:
            ts = np.asarray(bars[names["ts"]], dtype=np.int64)
        if "timeframe" in names and len(bars):
            tf = bars[names["timeframe"]][0]
    o, h, lo, c, v = ohlcv_arrays(bars)
    n = len(o)
    rec = np.zeros(n, dtype=BAR_DTYPE)
    rec["ts"] = np.arange(n) if ts is None else ts
    rec["timeframe"] = tf
    for name, x in (("open", o), ("high", h), ("low", lo), ("close", c), ("volume", v)):
        rec[name] = x
    reasons = np.asarray(_core.validate_bars(rec, 1))   # instrument 0 of 1: never "unknown"
    ok = reasons == 0
    arr = np.column_stack([o, h, lo, c, v])
    return (arr, {}) if ok.all() else (arr[ok], reason_counts(reasons))


def _smc_package() -> Any:
    """The ``smc`` class of ``smartmoneyconcepts``, imported without its import-time banner."""
    with contextlib.redirect_stdout(io.StringIO()):
        from smartmoneyconcepts import smc
    return smc


def reference_labels(bars: Any, swing_length: int = 50, *, close_break: bool = True,
                     close_mitigation: bool = False, range_percent: float = 0.01) -> dict[str, Any]:
    """The ``smartmoneyconcepts`` labels of ``bars`` (a DataFrame or array as for
    :func:`~dynamic_core.learning.dsi.smc.ohlcv_arrays`): ``{"swing", "bos_choch", "fvg", "ob",
    "liquidity"}`` DataFrames on a 0..n-1 index, plus ``"liquidity_tolerance"``, the absolute
    band the package derived from the whole series.

    The labels are of row positions, so invalid bars (the engine's checks, as in
    :func:`smc_agreement`) are refused, not dropped: ValueError counting them per reason."""
    L = _check_args(swing_length, close_break, close_mitigation, range_percent)
    arr, rejected = _valid_bars(bars)
    if rejected:
        raise ValueError(f"bars: {_rejects_text(rejected)} (labels are of row positions: drop them first, "
                         f"as smc_agreement does)")
    return _reference(arr, L, close_break, close_mitigation, range_percent)


def _rejects_text(rejected: Mapping[str, int]) -> str:
    """``"3 invalid bar(s) (non_finite 2, out_of_order 1)"``."""
    total = sum(rejected.values())
    return f"{total:,} invalid bar(s) ({', '.join(f'{k} {v:,}' for k, v in rejected.items())})"


def _reference(arr: np.ndarray, swing_length: int, close_break: bool, close_mitigation: bool,
               range_percent: float) -> dict[str, Any]:
    """:func:`reference_labels` of checked ``(n, 5)`` bars."""
    import pandas as pd

    smc = _smc_package()
    o, h, lo, c, v = arr.T
    df = pd.DataFrame({"open": o, "high": h, "low": lo, "close": c, "volume": v})
    with warnings.catch_warnings():
        # the package's own deprecation noise is not ours to fail on
        warnings.simplefilter("ignore")
        sw = smc.swing_highs_lows(df, swing_length)
        out = {
            "swing": sw,
            "bos_choch": smc.bos_choch(df, sw, close_break=close_break),
            "fvg": smc.fvg(df),
            "ob": smc.ob(df, sw, close_mitigation=close_mitigation),
            "liquidity": smc.liquidity(df, sw, range_percent=range_percent),
        }
    out["liquidity_tolerance"] = float((h.max() - lo.min()) * range_percent) if len(h) else 0.0
    return out


def _run_detector(det: SmcDetector, arr: np.ndarray, progress: Progress | None, what: str,
                  kinds: tuple[str, ...] | None = None) -> list[SmcEvent]:
    """The events of ``det`` fed the ``(n, 5)`` bars ``arr`` (of ``kinds`` only, if given)."""
    out: list[SmcEvent] = []
    n = len(arr)
    for k, row in enumerate(arr.tolist()):
        if progress is not None and k % _PROGRESS_EVERY == 0 and k:
            progress(f"{what}: {k:,} of {n:,} bars")
        evs = det.update(*row)
        out.extend(evs if kinds is None else (e for e in evs if e.kind in kinds))
    return out


def _score(ours: Mapping[Any, Any], ref: Mapping[Any, Any], same: Any = None) -> dict[str, float]:
    tp_keys = ours.keys() & ref.keys()
    tp, fp, fn = len(tp_keys), len(ours.keys() - ref.keys()), len(ref.keys() - ours.keys())
    p = tp / (tp + fp) if tp + fp else math.nan
    r = tp / (tp + fn) if tp + fn else math.nan
    f1 = 2 * p * r / (p + r) if tp else (0.0 if (tp + fp) and (tp + fn) else math.nan)
    attr = math.nan
    if same is not None and tp:
        attr = sum(1 for k in tp_keys if same(ours[k], ref[k])) / tp
    return {"n_ref": len(ref), "n_ours": len(ours), "tp": tp, "fp": fp, "fn": fn,
            "precision": p, "recall": r, "f1": f1, "attr": attr}


def _lag(events: list[SmcEvent]) -> float:
    return float(np.mean([e.confirmed_at - e.bar for e in events])) if events else math.nan


def smc_agreement(bars: Any, swing_length: int = 50, *, close_break: bool = True,
                  close_mitigation: bool = False, range_percent: float = 0.01,
                  events: list[SmcEvent] | None = None,
                  progress: Progress | None = None) -> dict[str, dict[str, Any]]:
    """Precision, recall and F1 of each causal detector against ``smartmoneyconcepts`` on the
    same bars, where the package's labels are settled (see the module table).

    Parameters
    ----------
    bars : DataFrame or array
        OHLC(V) bars of one stream (see :func:`~dynamic_core.learning.dsi.smc.ohlcv_arrays`);
        bar records or a DataFrame with instrument/symbol or timeframe columns must hold one
        stream (ValueError otherwise). Invalid bars are dropped and counted (module docstring).
    swing_length, close_break, close_mitigation, range_percent
        The package's parameters; the detector gets the same ones, and the package's
        whole-series liquidity band as its fixed ``liquidity_tolerance``.
    events : list of SmcEvent, optional
        The causal events of these bars with these parameters, if already computed (bars with
        invalid rows are refused then: the events' bar numbers would not match the valid bars).
    progress : callable, optional
        Called with a short line at each step and every 8,192 bars of a detector run.

    Returns
    -------
    dict
        ``{concept: {"n_ref", "n_ours", "tp", "fp", "fn", "precision", "recall", "f1", "attr",
        "lag"}}`` for each of :data:`CONCEPTS`, and ``"bars"``: ``{"used": valid bars compared,
        "rejected": {reason: invalid bars dropped}, "dropped": {kind: open items the detector
        gave up past its caps}}`` (:attr:`~dynamic_core.learning.dsi.smc.SmcDetector.dropped`,
        non-zero kinds only; empty when ``events`` were given).

    Raises
    ------
    TypeError, ValueError
        An argument of the wrong type or out of range (before any work); bars of more than one
        stream; fewer than five settled swings to compare.

    Notes
    -----
    Where the causal definitions must differ from the package's (each costs a few labels).
    The figures are this function's on EURUSD H1 (5,000 bars), GOOG D1 (2,148) and the S&P 500
    daily (5,031), ``close_break=True`` unless said:

    - *swings*: the package keeps only the most extreme of consecutive same-kind swings, which
      it knows by looking ahead to the next opposite swing. The detector emits each swing when
      confirmed and a superseding event when a more extreme one of the same leg follows;
      ``swing`` scores the structure after those events (settled: 100% on all three at
      ``swing_length`` 3 to 35), ``swing_first`` every emission as made, which is what a
      consumer acting on first emissions sees: 85.6-96.2% precise at 5 and 10, 92.1-96.7% at 3.
    - *BOS/CHoCH*: the package classifies a break by four swings ``a, b, c, d`` (``d`` beyond
      ``b``), the detector at the break from ``a, b, c``, assuming the leg that breaks ``b``
      ends beyond it. Precision and recall are at least 95.9% at ``swing_length`` 5 and 10 and
      95.6% over 3 to 20. From 21 to 35 BOS stays at or above 95.8%, but the few settled
      CHoCH labels (8-15 a series) make one wrong label weigh: CHoCH precision is 0.889-0.938
      on the S&P 500 at 21-25 and on EURUSD at 30-35.
    - *close_break=False* (a high or low beyond the level breaks it): on EURUSD at 3, 5 and 10,
      BOS precision is 87.4-90.8% and CHoCH recall 90.2-93.0% (the other figures 94.9-98.7%;
      GOOG, the S&P 500 and NASDAQ stay at or above 95.4%). A wick reaches the level while
      the low (high) since the broken swing is still in the making: the detector classifies
      the break against it, though it may never become a swing, and no later event withdraws
      a break so classified.
    - *ties*: the package compares closes with the level rounded to float32; the detector
      uses the float64 level. On prices rounded to a coarse tick, exact ties are common (a
      close equal to a level, equal highs or lows in a leg) and decided differently: EURUSD
      rounded to 0.0002 agrees on BOS/CHoCH to 92.1% at ``swing_length=10`` (92.1-94.4% at 3,
      5 and 10), to 91.0% at 0.0005 and 86.6% at 0.001 (94.4% at 0.0001; the bars as quoted,
      to 0.00001, are not affected). About half of those disagreements have a close equal to
      the level before the break; comparing with the float32 level in the detector as well
      does not restore the agreement (it trades recall for precision).
    - *liquidity*: the package's band is ``range_percent`` of the whole series' range, known
      only at its end; here the harness hands the detector that number (look-ahead: the
      ``liquidity`` row is no causal figure). ``liquidity_causal`` is the detector with its own
      band, a share of the range seen so far.
    - *order blocks*: the package forms a block from the last swing before the breaking bar
      including swings confirmed only later; the detector uses the last swing confirmed at the
      breaking bar. The package also merges bullish and bearish blocks on the same bar into
      one row (the later, bearish pass wins).
    """
    swing_length = _check_args(swing_length, close_break, close_mitigation, range_percent)
    if events is not None and not isinstance(events, list):
        raise TypeError(f"events must be a list of SmcEvent or None, got {type(events).__name__}")
    _check_progress(progress)
    bars5, rejected = _valid_bars(bars)
    if rejected and events is not None:
        raise ValueError(f"bars: {_rejects_text(rejected)} with events given: their bar numbers would not "
                         f"match the valid bars; compute the events on the valid bars")
    n = len(bars5)
    if progress is not None:
        progress(f"smartmoneyconcepts labels of {n:,} bars")
    ref = _reference(bars5, swing_length, close_break, close_mitigation, range_percent)
    dropped: dict[str, int] = {}
    if events is None:
        det = SmcDetector(swing_length, close_break=close_break, close_mitigation=close_mitigation,
                          liquidity_tolerance=ref["liquidity_tolerance"])
        events = _run_detector(det, bars5, progress, "causal detector")
        dropped = {k: x for k, x in det.dropped.items() if x}

    hl = ref["swing"]["HighLow"].to_numpy()
    real = np.flatnonzero(~np.isnan(hl))
    real = real[(real != 0) & (real != n - 1)]
    if len(real) < 5:
        raise ValueError(f"too few swings ({len(real)}) in {n} bars with swing_length={swing_length} to compare")
    first, s = int(real[0]), [int(x) for x in real]

    def window(bar: int, hi: int) -> bool:
        return first <= bar < hi

    out: dict[str, dict[str, float]] = {}

    # swings
    by_kind: dict[str, list[SmcEvent]] = {}
    for e in events:
        by_kind.setdefault(e.kind, []).append(e)
    sw_ev = by_kind.get(SWING, [])
    final: dict[tuple[int, int], SmcEvent] = {}
    for e in sw_ev:
        if e.ref >= 0:
            final.pop((e.ref, e.direction), None)
        final[(e.bar, e.direction)] = e
    hi_sw = s[-1]
    ref_sw = {(int(i), int(hl[i])): True for i in real if window(int(i), hi_sw)}
    ours_sw = {k: True for k in final if window(k[0], hi_sw)}
    out["swing"] = _score(ours_sw, ref_sw) | {"lag": _lag([e for k, e in final.items() if window(k[0], hi_sw)])}
    # first emissions: a superseded swing counts as emitted and wrong (it is no longer in ours_sw)
    first_keys = {(e.bar, e.direction): True for e in sw_ev if window(e.bar, hi_sw)}
    out["swing_first"] = _score(first_keys, ref_sw) | {"lag": _lag([e for e in sw_ev if window(e.bar, hi_sw)])}

    # BOS / CHoCH
    bc = ref["bos_choch"]
    hi_b, hi_brk = s[-4], s[-3]
    for kind, col in ((BOS, "BOS"), (CHOCH, "CHOCH")):
        arr = bc[col].to_numpy()
        brk = bc["BrokenIndex"].to_numpy()
        rmap = {(int(i), int(arr[i])): int(brk[i]) for i in np.flatnonzero(~np.isnan(arr))}
        omap = {(e.bar, e.direction): e.ref for e in by_kind.get(kind, [])}
        unsettled = {k for m in (rmap, omap) for k, j in m.items() if j >= hi_brk}
        rmap = {k: j for k, j in rmap.items() if window(k[0], hi_b + 1) and k not in unsettled}
        omap_s = {k: j for k, j in omap.items() if window(k[0], hi_b + 1) and k not in unsettled}
        ev = [e for e in by_kind.get(kind, []) if (e.bar, e.direction) in omap_s]
        out[kind] = _score(omap_s, rmap, lambda a, b: a == b) | {"lag": _lag(ev)}

    # fair value gaps
    fv = ref["fvg"]
    farr, fmit = fv["FVG"].to_numpy(), fv["MitigatedIndex"].to_numpy()
    rmap = {(int(i), int(farr[i])): int(fmit[i]) for i in np.flatnonzero(~np.isnan(farr)) if i >= first}
    mit = {(e.bar, e.direction): e.ref for e in by_kind.get(FVG_MITIGATED, [])}
    f_ev = [e for e in by_kind.get(FVG, []) if e.bar >= first]
    omap = {(e.bar, e.direction): mit.get((e.bar, e.direction), 0) for e in f_ev}
    out["fvg"] = _score(omap, rmap, lambda a, b: a == b) | {"lag": _lag(f_ev)}

    # liquidity
    lq = ref["liquidity"]
    larr = lq["Liquidity"].to_numpy()
    lvl, sw_at = lq["Level"].to_numpy(), lq["Swept"].to_numpy()
    hi_l = s[-2]
    rmap = {(int(i), int(larr[i])): (float(lvl[i]), int(sw_at[i]))
            for i in np.flatnonzero(~np.isnan(larr)) if window(int(i), hi_l)}

    def same_pool(a: tuple[float, int], b: tuple[float, int]) -> bool:
        # the package keeps the mean in float32
        return a[1] == b[1] and abs(a[0] - b[0]) <= 1e-6 * max(1.0, abs(b[0]))

    def pools_of(evs: list[SmcEvent]) -> tuple[dict[tuple[int, int], tuple[float, int]], list[SmcEvent]]:
        swept: dict[tuple[int, int], int] = {}
        pools: dict[tuple[int, int], SmcEvent] = {}
        formed: dict[tuple[int, int], SmcEvent] = {}
        for e in evs:
            k = (e.bar, e.direction)
            if e.kind == LIQUIDITY:
                pools[k] = e
                formed.setdefault(k, e)
            elif e.kind == LIQUIDITY_WITHDRAWN:
                pools.pop(k, None)
                formed.pop(k, None)
            elif e.kind == LIQUIDITY_SWEPT:
                swept[k] = e.ref
        keys = [k for k in pools if window(k[0], hi_l)]
        return {k: (pools[k].level, swept.get(k, 0)) for k in keys}, [formed[k] for k in keys]

    omap, first_ev = pools_of(events)
    out["liquidity"] = _score(omap, rmap, same_pool) | {"lag": _lag(first_ev)}
    # the detector's own causal band (a share of the range seen so far) instead of the package's
    own = SmcDetector(swing_length, close_break=close_break, close_mitigation=close_mitigation,
                      liquidity_range_percent=range_percent)
    own_ev = _run_detector(own, bars5, progress, "causal liquidity band",
                           (LIQUIDITY, LIQUIDITY_SWEPT, LIQUIDITY_WITHDRAWN))
    omap, first_ev = pools_of(own_ev)
    out["liquidity_causal"] = _score(omap, rmap, same_pool) | {"lag": _lag(first_ev)}

    # order blocks
    obf = ref["ob"]
    oarr, otop, obot = obf["OB"].to_numpy(), obf["Top"].to_numpy(), obf["Bottom"].to_numpy()
    hi_o = s[-1]
    rmap = {(int(i), int(oarr[i])): (float(otop[i]), float(obot[i]))
            for i in np.flatnonzero(~np.isnan(oarr)) if window(int(i), hi_o)}
    live: dict[tuple[int, int], SmcEvent] = {}
    for e in events:
        if e.kind == ORDER_BLOCK:
            live[(e.bar, e.direction)] = e
        elif e.kind == OB_INVALIDATED:
            live.pop((e.bar, e.direction), None)
    omap = {k: (e.top, e.bottom) for k, e in live.items() if window(k[0], hi_o)}

    def same_block(a: tuple[float, float], b: tuple[float, float]) -> bool:
        # the package keeps top and bottom in float32
        return all(abs(x - y) <= 1e-6 * max(1.0, abs(y)) for x, y in zip(a, b))

    out["order_block"] = _score(omap, rmap, same_block) | {"lag": _lag([live[k] for k in omap])}
    out["bars"] = {"used": n, "rejected": rejected, "dropped": dropped}
    return out


# ---- replay ------------------------------------------------------------------------------------
def journal_bars(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The accepted bars of an engine journal, per stream ``"INSTRUMENT/timeframe_s"``, in the
    order the engine processed them."""
    from .. import journal as jr
    from ..records import BAR_DTYPE

    names: list[str] = []
    batches: list[np.ndarray] = []
    for unit in jr._grouped(jr.read(path)):  # whole batches only, as replay takes them
        rec = unit[0]
        if rec.type == "meta":
            names = list(jr._meta_decoder.decode(rec.payload).instruments)
        elif rec.type == "instruments":
            names.extend(jr._instr_decoder.decode(rec.payload).names)
        else:
            batches.extend(np.frombuffer(r.payload, dtype=BAR_DTYPE) for r in unit if r.type == "bars")
    allbars = np.concatenate(batches) if batches else np.zeros(0, dtype=BAR_DTYPE)
    return _streams(allbars, names)


def _streams(bars: np.ndarray, names: list[str] | None = None) -> dict[str, np.ndarray]:
    from ..instruments import instruments

    out: dict[str, np.ndarray] = {}
    keys = np.stack([bars["instrument"].astype(np.int64), bars["timeframe"].astype(np.int64)], axis=1)
    for inst, tf in sorted({(int(a), int(b)) for a, b in keys}):
        sel = bars[(keys[:, 0] == inst) & (keys[:, 1] == tf)]
        name = names[inst] if names is not None and inst < len(names) else instruments.name(inst)
        out[f"{name}/{tf}"] = sel
    return out


def _check_evolution_streams(streams: Mapping[str, Any]) -> None:
    """What evolution_trace needs of ``streams``, checked before any work: BAR_DTYPE bars, one
    instrument under each name (relabelled by name, two instruments' bars would trade as one
    series) and each instrument/timeframe under one name only."""
    from ..records import BAR_DTYPE

    owner: dict[tuple[str, int], str] = {}  # (instrument name, timeframe) -> the key holding it
    for name, bars in streams.items():
        if not isinstance(bars, np.ndarray) or bars.dtype != BAR_DTYPE:
            raise TypeError(f"stream {name!r}: evolution needs BAR_DTYPE bars")
        ids = np.unique(bars["instrument"]).tolist()
        if len(ids) > 1:
            raise ValueError(f"stream {name!r} holds the bars of {len(ids)} instruments (ids {ids[:5]}): give each "
                             "instrument under its own name (journal_bars splits a journal's bars that way)")
        inst = _instrument_of(name)
        for tf in np.unique(bars["timeframe"]).tolist():
            if (inst, tf) in owner:
                raise ValueError(f"streams {owner[inst, tf]!r} and {name!r} both hold {inst} bars of timeframe "
                                 f"{tf} s: give each instrument/timeframe's bars once")
            owner[inst, tf] = str(name)


def _instrument_of(key: Any) -> str:
    """The instrument name of a stream key: ``"NAME/timeframe_s"`` as :func:`journal_bars` writes
    them, the name alone otherwise. Names may hold "/" themselves (``EUR/USD/3600``): only a last
    part of digits is a timeframe (split at the first "/", EUR/USD and EUR/GBP were one "EUR")."""
    name, sep, tail = str(key).rpartition("/")
    return name if sep and tail.isdigit() and name else str(key)


def evolution_trace(streams: Mapping[str, Any], *, agents: int = 2048, every: int = 250, seed: int = 0,
                    plot: str | os.PathLike[str] | None = None) -> Any:
    """Replay the bars of ``streams`` (``{"NAME/timeframe_s" or any name: BAR_DTYPE array}``, as
    :func:`journal_bars` gives) in time order through ``agents`` random agents that evolve while
    they trade (:class:`~dynamic_core.learning.evolution.Evolution`: a generation of a stream every
    ``every`` of its bars and on a volatility regime change). Returns the
    :class:`~dynamic_core.learning.evolution.Evolution`, whose ``trace`` holds best/median fitness
    per generation; ``plot`` saves it as an image, one line per stream (its format is checked
    before any work). Bars the engine rejects are counted by it (``Engine.stats``), not run."""
    from ..engine import Engine
    from ..instruments import instruments
    from ..population import MAX_AGENTS, Population
    from ..records import BAR_DTYPE
    from .evolution import Evolution, _MAX_EVERY, _MAX_SEED, check_plot_path

    agents = check_int("agents", agents, 1, MAX_AGENTS)
    every = check_int("every", every, 0, _MAX_EVERY)
    seed = check_int("seed", seed, 0, _MAX_SEED)
    if plot is not None:
        check_plot_path(plot, "plot")
    _check_evolution_streams(streams)
    parts = []
    for name, bars in streams.items():
        arr = np.array(bars, dtype=BAR_DTYPE, copy=True)
        # the journal numbered instruments in its own process: register them here by name
        arr["instrument"] = instruments.id(_instrument_of(name))
        parts.append(arr)
    if not parts:
        raise ValueError("no bars to evolve over")
    allbars = np.concatenate(parts)
    allbars = allbars[np.argsort(allbars["ts"], kind="stable")]
    keys = sorted({(int(i), int(t)) for i, t in zip(allbars["instrument"], allbars["timeframe"])})
    pop = Population.random_on(keys, agents, seed)
    with Engine(pop) as eng:
        evo = Evolution(eng, every=every, seed=seed)
        evo.run(allbars)
    if plot is not None and evo.trace:
        evo.plot(plot, title="evolution trace")
    return evo


def replay_report(source: Any, swing_length: int = 10, *, engine: bool = False,
                  min_bars: int | None = None, evolve: int = 0, evolve_agents: int = 2048,
                  evolve_plot: str | os.PathLike[str] | None = None, close_break: bool = True,
                  close_mitigation: bool = False, range_percent: float = 0.01,
                  progress: Progress | None = None) -> Any:
    """The agreement table of every stream in ``source``: a pandas DataFrame with one row per
    (stream, concept) and the columns of :func:`smc_agreement`.

    Parameters
    ----------
    source : path, DataFrame, BAR_DTYPE array or mapping
        An engine journal directory (its accepted bars, per instrument and timeframe, exactly as
        the engine saw them), one DataFrame of OHLC(V) bars, a ``BAR_DTYPE`` array (split per
        instrument and timeframe), or ``{stream name: DataFrame or array}``.
    swing_length : int
        Passed to both sides.
    engine : bool
        With a journal: also replay it through the engine (``dc.journal.replay``, verified) and
        put ``{"signals", "verified", "bars"}`` in ``table.attrs["engine"]``.
    min_bars : int, optional
        Skip streams with fewer valid bars than this (default ``6 * swing_length``).
    evolve : int
        When > 0, also replay the bars through ``evolve_agents`` random agents evolving every
        ``evolve`` bars of a stream (:func:`evolution_trace`); the trace goes in
        ``table.attrs["evolution"]`` (and a plot to ``evolve_plot``, its format checked first).
    close_break, close_mitigation, range_percent
        For :func:`smc_agreement`.
    progress : callable, optional
        Called with a short line (stream and step) as the work goes on.

    Each stream's bars are checked first (:func:`smc_agreement`): the invalid ones are dropped
    and counted in ``table.attrs["rejected"]`` (``{stream: {reason: count}}``), and the ``bars``
    column is the valid bars compared. A stream not compared is in ``table.attrs["skipped"]`` as
    ``"name: reason"``; ``table.attrs["dropped"]`` has ``{stream: {kind: count}}`` of open items
    a detector gave up past its caps, where any.

    Every argument is checked before any work: TypeError for a wrong type (an unknown keyword
    included), ValueError naming the argument for a value out of range.
    """
    import pandas as pd

    from ..population import MAX_AGENTS
    from .evolution import _MAX_EVERY, check_plot_path

    swing_length = _check_args(swing_length, close_break, close_mitigation, range_percent)
    if not isinstance(engine, (bool, np.bool_)):
        raise TypeError(f"engine must be a bool, got {type(engine).__name__}")
    if min_bars is not None:
        min_bars = check_int("min_bars", min_bars, 0, 1 << 62)
    evolve = check_int("evolve", evolve, 0, _MAX_EVERY)
    evolve_agents = check_int("evolve_agents", evolve_agents, 1, MAX_AGENTS)
    if evolve_plot is not None:
        if not evolve:
            raise ValueError("evolve_plot needs evolve > 0")
        check_plot_path(evolve_plot, "evolve_plot")
    _check_progress(progress)
    say = progress or (lambda text: None)

    attrs: dict[str, Any] = {"swing_length": swing_length, "skipped": [], "rejected": {}, "dropped": {}}
    if isinstance(source, (str, os.PathLike)):
        say("reading the journal")
        streams: Mapping[str, Any] = journal_bars(source)
        if engine:
            from .. import journal as jr

            say("replaying the journal through the engine")
            res = jr.replay(source, verify=True)
            attrs["engine"] = {"signals": len(res.signals), "verified": res.verified, "bars": res.bars}
    elif hasattr(source, "columns"):
        streams = {"bars": source}
    elif _is_bars(source):
        streams = _streams(source)
    elif isinstance(source, Mapping):
        streams = source
    else:
        streams = {"bars": source}
    if evolve > 0:  # before any work: agents run on bar records, a DataFrame has no stream ids
        frames = [name for name, v in streams.items() if not _is_bars(v)]
        if frames:
            raise ValueError(f"evolve needs BAR_DTYPE bars (dc.market.from_pandas(df, instrument, timeframe) "
                             f"makes them); not bar records: {', '.join(map(str, frames[:5]))}")
        try:
            _check_evolution_streams(streams)
        except TypeError as e:  # bar records of another dtype
            raise ValueError(f"evolve: {e}") from None
    need = 6 * swing_length if min_bars is None else min_bars
    rows = []
    for k, (name, bars) in enumerate(streams.items()):
        where = f"{name} ({k + 1} of {len(streams)})" if len(streams) > 1 else str(name)
        say(f"{where}: checking the bars")
        try:
            arr, rejected = _valid_bars(bars, str(name))
        except ValueError as e:
            attrs["skipped"].append(f"{name}: {e}")
            continue
        if rejected:
            attrs["rejected"][name] = rejected
        if len(arr) < need:
            why = "min_bars" if min_bars is not None else f"6 x swing_length {swing_length}"
            attrs["skipped"].append(f"{name}: {len(arr):,} valid bar(s), {_SHORT} {need:,} ({why})")
            continue
        try:
            agg = smc_agreement(arr, swing_length, close_break=close_break, close_mitigation=close_mitigation,
                                range_percent=range_percent,
                                progress=None if progress is None else _prefixed(progress, f"{where}: "))
        except ValueError as e:
            attrs["skipped"].append(f"{name}: {e}")
            continue
        if agg["bars"]["dropped"]:
            attrs["dropped"][name] = agg["bars"]["dropped"]
        for concept in CONCEPTS:
            rows.append({"stream": name, "bars": len(arr), "concept": concept, **agg[concept]})
    cols = ["stream", "bars", "concept", "n_ref", "n_ours", "tp", "fp", "fn", "precision", "recall",
            "f1", "attr", "lag"]
    if evolve > 0 and streams:  # every one bar records (checked above)
        say(f"evolving {evolve_agents:,} agents over the bars")
        evo = evolution_trace(streams, agents=evolve_agents, every=evolve, plot=evolve_plot)
        attrs["evolution"] = list(evo.trace)
    table = pd.DataFrame(rows, columns=cols)
    table.attrs.update(attrs)
    return table


def _is_bars(v: Any) -> bool:
    """Bar records (a structured array with an instrument field), not a DataFrame."""
    return isinstance(v, np.ndarray) and bool(v.dtype.names) and "instrument" in v.dtype.names


def format_report(table: Any) -> str:
    """The table of :func:`replay_report` as aligned text (percentages, one decimal), with the
    invalid bars dropped and the streams skipped, each with its reason."""
    skipped = table.attrs.get("skipped", [])
    if len(table) == 0:
        # the rest (the engine's verified replay, the evolution trace) is still reported
        # "long enough" only when that is what every stream lacked (bars, or settled swings)
        short = bool(skipped) and all(_SHORT in x or "too few swings" in x for x in skipped)
        lines = [("no stream long enough to compare" if short else "no stream compared")
                 + (f" (skipped: {'; '.join(skipped)})" if skipped else ": no bars")]
    else:
        t = table.copy()
        for col in ("precision", "recall", "f1", "attr"):
            t[col] = [("   -" if math.isnan(x) else f"{100 * x:5.1f}%") for x in t[col]]
        t["lag"] = [("-" if math.isnan(x) else f"{x:.1f}") for x in t["lag"]]
        t["concept"] = [("liquidity*" if x == "liquidity" else x) for x in t["concept"]]
        lines = [f"SMC agreement with smartmoneyconcepts (swing_length={table.attrs.get('swing_length')})",
                 t.to_string(index=False),
                 "* the detector given the package's whole-series liquidity band (look-ahead); "
                 "liquidity_causal: its own band from the bars so far"]
    for name, rej in table.attrs.get("rejected", {}).items():
        lines.append(f"{name}: dropped {_rejects_text(rej)}")
    for name, drop in table.attrs.get("dropped", {}).items():
        lines.append(f"{name}: open items given up past the detector's caps: "
                     + ", ".join(f"{k} {v:,}" for k, v in drop.items()))
    if table.attrs.get("engine"):
        e = table.attrs["engine"]
        lines.append(f"engine replay: {e['bars']} bars, {e['signals']} signals, {e['verified']} verified")
    if skipped and len(table):
        lines.append(f"skipped: {'; '.join(skipped)}")
    if "evolution" in table.attrs:
        from .evolution import format_trace

        rows = table.attrs["evolution"]
        lines.append(f"\nevolution trace ({len(rows)} generations; fitness = per-bar Sharpe - "
                     f"penalty x max drawdown)")
        lines.append(format_trace(rows) if rows else "no generation was due")
    return "\n".join(lines)


def print_replay_report(source: Any, swing_length: int = 10, **kwargs: Any) -> Any:
    """Print :func:`format_report` of :func:`replay_report` and return the table (for a CLI)."""
    table = replay_report(source, swing_length, **kwargs)
    print(format_report(table))
    return table
