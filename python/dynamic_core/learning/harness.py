"""Replay harness: how well the causal SMC detectors agree with ``smartmoneyconcepts``.

The ``smartmoneyconcepts`` package labels a whole series at once and looks ahead; the
detectors of :mod:`dynamic_core.learning.dsi.smc` see one bar at a time. This module runs both
on the same bars and scores the causal events against the package's labels, concept by
concept, where the package's labels are *settled* (would not change if more bars came):

=============  =====================================================  ===========================
concept        a label is                                             compared where
=============  =====================================================  ===========================
``swing``      (bar, high/low); ours after supersession events        bar before the last swing
``swing_first``  every swing event as first emitted (no supersession)  as ``swing``
``bos``        (broken swing bar, direction)                          swing bar <= 4th-last swing
``choch``      (broken swing bar, direction)                          and break before 3rd-last
``fvg``        (middle bar, direction)                                every bar
``liquidity``  (anchor swing bar, direction)                          anchor before 2nd-last swing
``liquidity_causal``  as ``liquidity``, the detector using its own band  as ``liquidity``
``order_block``  (block bar, direction), blocks not invalidated        block before the last swing
=============  =====================================================  ===========================

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
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

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
    band the package derived from the whole series."""
    import pandas as pd

    smc = _smc_package()
    o, h, lo, c, v = ohlcv_arrays(bars)
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
                  events: list[SmcEvent] | None = None) -> dict[str, dict[str, float]]:
    """Precision, recall and F1 of each causal detector against ``smartmoneyconcepts`` on the
    same bars, where the package's labels are settled (see the module table).

    Parameters
    ----------
    bars : DataFrame or array
        OHLC(V) bars of one stream (see :func:`~dynamic_core.learning.dsi.smc.ohlcv_arrays`).
    swing_length, close_break, close_mitigation, range_percent
        The package's parameters; the detector gets the same ones, and the package's
        whole-series liquidity band as its fixed ``liquidity_tolerance``.
    events : list of SmcEvent, optional
        The causal events of these bars with these parameters, if already computed.

    Returns
    -------
    dict
        ``{concept: {"n_ref", "n_ours", "tp", "fp", "fn", "precision", "recall", "f1", "attr",
        "lag"}}`` for each of :data:`CONCEPTS`.

    Notes
    -----
    Where the causal definitions must differ from the package's (each costs a few labels):

    - *swings*: the package keeps only the most extreme of consecutive same-kind swings, which
      it knows by looking ahead to the next opposite swing. The detector emits each swing when
      confirmed and a superseding event when a more extreme one of the same leg follows;
      ``swing`` scores the structure after those events, ``swing_first`` every emission as
      made (its precision is what a consumer acting on first emissions sees).
    - *BOS/CHoCH*: the package classifies a break by four swings ``a, b, c, d`` (``d`` beyond
      ``b``), the detector at the break from ``a, b, c``, assuming the leg that breaks ``b``
      ends beyond it. The package compares closes with the level rounded to float32; the
      detector uses the float64 level.
    - *liquidity*: the package's band is ``range_percent`` of the whole series' range, known
      only at its end; here the harness hands the detector that number.
    - *order blocks*: the package forms a block from the last swing before the breaking bar
      including swings confirmed only later; the detector uses the last swing confirmed at the
      breaking bar. The package also merges bullish and bearish blocks on the same bar into
      one row (the later, bearish pass wins).
    """
    o, h, lo, c, v = ohlcv_arrays(bars)
    n = len(o)
    ref = reference_labels(bars, swing_length, close_break=close_break, close_mitigation=close_mitigation,
                           range_percent=range_percent)
    if events is None:
        det = SmcDetector(swing_length, close_break=close_break, close_mitigation=close_mitigation,
                          liquidity_tolerance=ref["liquidity_tolerance"])
        events = []
        for row in zip(o.tolist(), h.tolist(), lo.tolist(), c.tolist(), v.tolist()):
            events.extend(det.update(*row))

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
    own_ev: list[SmcEvent] = []
    for row in zip(o.tolist(), h.tolist(), lo.tolist(), c.tolist(), v.tolist()):
        own_ev.extend(e for e in own.update(*row) if e.kind in (LIQUIDITY, LIQUIDITY_SWEPT, LIQUIDITY_WITHDRAWN))
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


def evolution_trace(streams: Mapping[str, Any], *, agents: int = 2048, every: int = 250, seed: int = 0,
                    plot: str | os.PathLike[str] | None = None) -> Any:
    """Replay the bars of ``streams`` (``{"NAME/timeframe_s" or any name: BAR_DTYPE array}``, as
    :func:`journal_bars` gives) in time order through ``agents`` random agents that evolve while
    they trade (:class:`~dynamic_core.learning.evolution.Evolution`: a generation of a stream every
    ``every`` of its bars and on a volatility regime change). Returns the
    :class:`~dynamic_core.learning.evolution.Evolution`, whose ``trace`` holds best/median fitness
    per generation; ``plot`` saves it as an image."""
    from ..engine import Engine
    from ..instruments import instruments
    from ..population import Population
    from ..records import BAR_DTYPE
    from .evolution import Evolution

    parts = []
    for name, bars in streams.items():
        arr = np.array(bars, dtype=BAR_DTYPE, copy=True) if isinstance(bars, np.ndarray) else None
        if arr is None or arr.dtype != BAR_DTYPE:
            raise TypeError(f"stream {name!r}: evolution needs BAR_DTYPE bars")
        # the journal numbered instruments in its own process: register them here by name
        arr["instrument"] = instruments.id(str(name).split("/")[0])
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
        evo.plot(plot, title=f"evolution trace: {', '.join(streams)}")
    return evo


def replay_report(source: Any, swing_length: int = 10, *, engine: bool = False,
                  min_bars: int | None = None, evolve: int = 0, evolve_agents: int = 2048,
                  evolve_plot: str | os.PathLike[str] | None = None, **kwargs: Any) -> Any:
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
        Skip streams shorter than this (default ``6 * swing_length``); they are listed in
        ``table.attrs["skipped"]``.
    evolve : int
        When > 0, also replay the bars through ``evolve_agents`` random agents evolving every
        ``evolve`` bars of a stream (:func:`evolution_trace`); the trace goes in
        ``table.attrs["evolution"]`` (and a plot to ``evolve_plot``).
    kwargs
        ``close_break``, ``close_mitigation``, ``range_percent`` for :func:`smc_agreement`.
    """
    import pandas as pd

    attrs: dict[str, Any] = {"swing_length": swing_length, "skipped": []}
    if isinstance(source, (str, os.PathLike)):
        streams: Mapping[str, Any] = journal_bars(source)
        if engine:
            from .. import journal as jr

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
    need = 6 * swing_length if min_bars is None else min_bars
    rows = []
    for name, bars in streams.items():
        if len(bars) < need:
            attrs["skipped"].append(name)
            continue
        try:
            agg = smc_agreement(bars, swing_length, **kwargs)
        except ValueError as e:
            attrs["skipped"].append(f"{name}: {e}")
            continue
        for concept in CONCEPTS:
            rows.append({"stream": name, "bars": len(bars), "concept": concept, **agg[concept]})
    cols = ["stream", "bars", "concept", "n_ref", "n_ours", "tp", "fp", "fn", "precision", "recall",
            "f1", "attr", "lag"]
    if evolve > 0 and streams:  # every one bar records (checked above)
        evo = evolution_trace(streams, agents=evolve_agents, every=evolve, plot=evolve_plot)
        attrs["evolution"] = list(evo.trace)
    table = pd.DataFrame(rows, columns=cols)
    table.attrs.update(attrs)
    return table


def _is_bars(v: Any) -> bool:
    """Bar records (a structured array with an instrument field), not a DataFrame."""
    return isinstance(v, np.ndarray) and bool(v.dtype.names) and "instrument" in v.dtype.names


def format_report(table: Any) -> str:
    """The table of :func:`replay_report` as aligned text (percentages, one decimal)."""
    if len(table) == 0:
        # the rest (the engine's verified replay, the evolution trace) is still reported
        lines = ["no stream long enough to compare" + (
            f" (skipped: {', '.join(table.attrs.get('skipped', []))})" if table.attrs.get("skipped") else "")]
    else:
        t = table.copy()
        for col in ("precision", "recall", "f1", "attr"):
            t[col] = [("   -" if math.isnan(x) else f"{100 * x:5.1f}%") for x in t[col]]
        t["lag"] = [("-" if math.isnan(x) else f"{x:.1f}") for x in t["lag"]]
        lines = [f"SMC agreement with smartmoneyconcepts (swing_length={table.attrs.get('swing_length')})",
                 t.to_string(index=False)]
    if table.attrs.get("engine"):
        e = table.attrs["engine"]
        lines.append(f"engine replay: {e['bars']} bars, {e['signals']} signals, {e['verified']} verified")
    if table.attrs.get("skipped") and len(table):
        lines.append(f"skipped: {', '.join(table.attrs['skipped'])}")
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
