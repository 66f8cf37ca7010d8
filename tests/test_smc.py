"""Causal SMC structure (learning.dsi.smc) against the smartmoneyconcepts package, which looks
ahead: agreement on real data where the package's labels are settled, hand-made bar sequences
with exact events and confirmation bars, and causality (no event about a bar before it could be
known; nothing ever revised)."""

from __future__ import annotations

import math
import re

import msgspec
import numpy as np
import pandas as pd
import pytest

import dynamic_core as dc
from dynamic_core.learning.dsi import smc
from dynamic_core.learning.dsi.smc import SmcDetector, SmcEvent, detect
from dynamic_core.learning.harness import (CONCEPTS, format_report, reference_labels, replay_report,
                                           smc_agreement)


# ---- data ---------------------------------------------------------------------------------------
def _real(name: str) -> pd.DataFrame:
    if name == "SP500":
        from arch.data import sp500

        return sp500.load()
    import backtesting.test as bt

    return getattr(bt, name)


_CACHE: dict[tuple[str, int], dict] = {}


def _agreement(name: str, L: int) -> dict:
    if (name, L) not in _CACHE:
        _CACHE[(name, L)] = smc_agreement(_real(name), L)
    return _CACHE[(name, L)]


def _frame(rows: list[tuple[float, float, float, float]], volume: float = 100.0) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=["open", "high", "low", "close"])
    df["volume"] = volume
    return df


def _mirror(rows: list[tuple[float, float, float, float]], k: float = 30.0) -> list[tuple[float, float, float, float]]:
    """The same bars upside down (highs become lows): bullish structure turns bearish."""
    return [(k - o, k - lo, k - h, k - c) for o, h, lo, c in rows]


def _of(events: list[SmcEvent], *kinds: str) -> list[SmcEvent]:
    return [e for e in events if e.kind in kinds]


# (open, high, low, close). swing_length=2: a swing at bar i is the extreme of bars i-1 .. i+2.
# Swing low a=3 (8.0), swing high b=6 (12.0), higher low c=9 (9.0); bar 12 closes above b.
STRUCTURE = [
    (9.5, 10.0, 9.0, 9.6),      # 0
    (9.6, 10.5, 9.5, 10.2),     # 1
    (10.2, 10.2, 9.2, 9.4),     # 2
    (9.4, 9.8, 8.0, 8.6),       # 3  swing low a
    (8.6, 10.0, 8.5, 9.8),      # 4
    (9.8, 11.0, 9.0, 10.8),     # 5
    (10.8, 12.0, 10.0, 11.2),   # 6  swing high b
    (11.2, 11.5, 10.0, 10.4),   # 7
    (10.4, 11.0, 9.5, 9.7),     # 8
    (9.7, 10.5, 9.0, 10.3),     # 9  swing low c; the lowest bar before the break: order block
    (10.3, 11.0, 9.4, 10.9),    # 10
    (10.9, 11.8, 10.0, 11.7),   # 11
    (11.7, 12.6, 11.0, 12.5),   # 12 closes above b: bullish BOS, order block; bullish gap 11-12-13
    (12.5, 13.0, 12.0, 12.8),   # 13
    (12.8, 13.5, 12.5, 13.4),   # 14
    (13.4, 14.0, 13.0, 13.2),   # 15 swing high d
    (13.2, 13.5, 12.8, 12.9),   # 16
    (12.9, 13.0, 12.0, 12.2),   # 17 low 12.0 fills the gap of bar 12; bearish gap 16-17-18
    (12.2, 12.5, 11.5, 11.6),   # 18 swing low e
    (11.8, 12.8, 11.8, 12.7),   # 19 high 12.8 fills the gap of bar 17 (opens at its low: a valid bar)
    (12.7, 13.2, 12.2, 13.1),   # 20
    (13.1, 13.6, 12.6, 13.5),   # 21
    (13.5, 14.02, 13.2, 13.4),  # 22 swing high within the band of d: buy-side liquidity pool
    (13.4, 13.6, 12.9, 13.0),   # 23
    (13.0, 13.3, 12.5, 12.6),   # 24
    (12.6, 13.0, 12.2, 12.9),   # 25
    (12.9, 13.8, 12.8, 13.7),   # 26
    (13.7, 14.3, 13.6, 13.9),   # 27 wick above the pool, close below d: a sweep, no break
    (13.9, 14.0, 13.0, 13.1),   # 28
    (13.1, 13.4, 12.6, 12.7),   # 29
    (12.7, 13.0, 12.3, 12.4),   # 30
    (12.4, 12.6, 11.9, 12.0),   # 31
]


# ---- agreement with smartmoneyconcepts on real data ----------------------------------------------
@pytest.mark.parametrize("name", ["EURUSD", "GOOG", "SP500"])
@pytest.mark.parametrize("L", [5, 10])
def test_agreement_swings_and_breaks(name, L):
    """Settled swings agree exactly; BOS and CHoCH >= 95% precision and recall (each kind on its
    own: the direction and the BOS/CHoCH distinction must both match)."""
    a = _agreement(name, L)
    assert a["swing"]["n_ref"] >= 90
    assert a["swing"]["precision"] == 1.0 and a["swing"]["recall"] == 1.0
    # every settled swing was emitted when first confirmed, some later superseded
    assert a["swing_first"]["recall"] == 1.0 and a["swing_first"]["lag"] == L
    for kind in ("bos", "choch"):
        assert a[kind]["n_ref"] >= 10, (kind, a[kind])
        assert a[kind]["precision"] >= 0.95, (kind, a[kind])
        assert a[kind]["recall"] >= 0.95, (kind, a[kind])
        assert a[kind]["attr"] >= 0.98   # the bar that broke the level


@pytest.mark.parametrize("name", ["EURUSD", "GOOG", "SP500"])
@pytest.mark.parametrize("L", [5, 10])
def test_agreement_gaps_liquidity_order_blocks(name, L):
    """Gaps agree exactly (mitigation bar included); liquidity with the package's band and order
    blocks >= 95% and >= 90% (the package dates a block from swings confirmed only later)."""
    a = _agreement(name, L)
    assert a["fvg"]["n_ref"] >= 500
    assert a["fvg"]["precision"] == a["fvg"]["recall"] == a["fvg"]["attr"] == 1.0
    assert a["liquidity"]["n_ref"] >= 10
    assert a["liquidity"]["precision"] >= 0.95 and a["liquidity"]["recall"] >= 0.95
    assert a["liquidity"]["attr"] >= 0.95   # mean level and sweep bar
    assert a["order_block"]["n_ref"] >= 10
    assert a["order_block"]["precision"] >= 0.9 and a["order_block"]["recall"] >= 0.9
    assert a["order_block"]["attr"] == 1.0  # top and bottom


def test_reference_labels_are_the_package_s():
    """The harness feeds the package the bars unchanged: its swings are the raw candidates
    reduced to one per leg."""
    df = _real("GOOG")
    ref = reference_labels(df, 5)
    _, h, lo, _, _ = smc.ohlcv_arrays(df)
    cand = smc.swing_candidates(h, lo, 5)
    kept = []
    for i in np.flatnonzero(cand):
        d = int(cand[i])
        x = h[i] if d == 1 else lo[i]
        if kept and kept[-1][1] == d:
            if d * x > d * kept[-1][2]:
                kept[-1] = (int(i), d, x)
        else:
            kept.append((int(i), d, x))
    hl = ref["swing"]["HighLow"].to_numpy()
    pkg = [(int(i), int(hl[i])) for i in np.flatnonzero(~np.isnan(hl)) if 0 < i < len(df) - 1]
    assert pkg == [(i, d) for i, d, _ in kept]


# ---- causality -----------------------------------------------------------------------------------
def test_prefix_and_other_futures_never_change_past_events():
    """Events of a prefix are exactly the full run's events confirmed within it, whatever follows."""
    df = _real("EURUSD").iloc[:3000]
    full = detect(df, 5)
    assert len(_of(full, "bos", "choch")) > 50 and len(_of(full, "order_block")) > 10
    rng = np.random.default_rng(7)
    for m in (250, 1111, 2999):
        assert detect(df.iloc[:m], 5) == [e for e in full if e.confirmed_at < m]
        # a different future (bars shuffled) leaves everything confirmed before it alone
        other = pd.concat([df.iloc[:m], df.iloc[m:].sample(frac=1.0, random_state=int(rng.integers(1 << 30)))])
        got = detect(other, 5)
        assert [e for e in got if e.confirmed_at < m] == [e for e in full if e.confirmed_at < m]


def test_events_are_never_earlier_than_their_information():
    L = 5
    ev = detect(_real("SP500"), L)
    for e in ev:
        assert e.confirmed_at >= e.bar
        if e.kind == smc.SWING:
            assert e.confirmed_at == e.bar + L
        elif e.kind == smc.FVG:
            assert e.confirmed_at == e.bar + 1
        elif e.kind in (smc.BOS, smc.CHOCH):
            # the close that broke the swing came after the swing was confirmed
            assert e.bar + L < e.ref <= e.confirmed_at
        elif e.kind == smc.ORDER_BLOCK:
            assert e.bar < e.ref == e.confirmed_at
        elif e.kind == smc.LIQUIDITY:
            assert e.confirmed_at == e.ref + L
        elif e.kind in (smc.FVG_MITIGATED, smc.LIQUIDITY_SWEPT, smc.OB_MITIGATED, smc.OB_INVALIDATED):
            assert e.ref == e.confirmed_at


def test_superseding_swings():
    """A swing superseded later is followed by one strictly more extreme of the same leg."""
    ev = _of(detect(_real("EURUSD"), 5), smc.SWING)
    seen: dict[int, SmcEvent] = {}
    n = 0
    for e in ev:
        if e.ref >= 0:
            n += 1
            old = seen[e.ref]
            assert old.direction == e.direction and e.direction * e.level > e.direction * old.level
            # no swing of the other kind in between
            assert not any(x.direction != e.direction and old.bar < x.bar < e.bar for x in seen.values())
        seen[e.bar] = e
    assert n > 20


def test_batch_forms_match_the_stream():
    df = _real("EURUSD")
    o, h, lo, c, _ = smc.ohlcv_arrays(df)
    d, top, bot, mit = smc.fvg_batch(o, h, lo, c)
    ev = detect(df, 5)
    gaps = {(e.bar, e.direction): (e.top, e.bottom) for e in _of(ev, smc.FVG)}
    assert {(int(i), int(d[i])): (top[i], bot[i]) for i in np.flatnonzero(d)} == gaps
    m = {e.bar: e.ref for e in _of(ev, smc.FVG_MITIGATED)}
    assert {int(i): int(mit[i]) for i in np.flatnonzero(mit >= 0)} == m
    cand = smc.swing_candidates(h, lo, 5)
    for e in _of(ev, smc.SWING):
        assert cand[e.bar] == e.direction


def test_inputs():
    det = SmcDetector(3)
    det.update(1, 2, 0.5, 1.5)
    with pytest.raises(ValueError):
        det.update(1, math.nan, 0.5, 1.5)
    assert det.n_bars == 1
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError):
            SmcDetector(bad)
    with pytest.raises(ValueError):
        SmcDetector(3, liquidity_tolerance=-1.0)
    arr = np.array(STRUCTURE)
    assert detect(arr, 2) == detect(_frame(STRUCTURE, 0.0), 2)
    bars = np.zeros(len(STRUCTURE), dtype=dc.BAR_DTYPE)
    for k, name in enumerate(("open", "high", "low", "close")):
        bars[name] = arr[:, k]
    assert detect(bars, 2) == detect(_frame(STRUCTURE, 0.0), 2)
    e = detect(arr, 2)[0]
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(e), type=SmcEvent) == e


# ---- hand-made sequences -------------------------------------------------------------------------
def _structure_events(rows, **kw):
    det = SmcDetector(2, **kw)
    out: list[list[SmcEvent]] = []
    for o, h, lo, c in rows:
        out.append(det.update(o, h, lo, c, 100.0))
    return det, out


def test_swings_and_bos_exact():
    _, per_bar = _structure_events(STRUCTURE)
    ev = [e for bar in per_bar for e in bar]
    assert [(e.bar, e.direction, e.level, e.confirmed_at) for e in _of(ev, smc.SWING)] == [
        (3, -1, 8.0, 5), (6, 1, 12.0, 8), (9, -1, 9.0, 11), (15, 1, 14.0, 17), (18, -1, 11.5, 20),
        (22, 1, 14.02, 24), (25, -1, 12.2, 27), (27, 1, 14.3, 29)]
    bos, choch = _of(ev, smc.BOS, smc.CHOCH)
    assert (bos.kind, bos.bar, bos.direction, bos.level, bos.ref, bos.confirmed_at) == ("bos", 6, 1, 12.0, 12, 12)
    assert bos in per_bar[12]
    # 25 made a higher low than 18, 27 a higher high than 22; bar 31 closes below 25
    assert (choch.kind, choch.bar, choch.direction, choch.ref, choch.confirmed_at) == ("choch", 25, -1, 31, 31)
    # the package labels the same (it knows at bar 12 what it will only confirm later)
    ref = reference_labels(_frame(STRUCTURE), 2)
    hl = ref["swing"]["HighLow"]
    assert hl.dropna().index.tolist()[1:-1] == [3, 6, 9, 15, 18, 22, 25, 27]
    bc = ref["bos_choch"]
    assert bc["BOS"].dropna().to_dict() == {6: 1.0} and bc["CHOCH"].dropna().to_dict() == {25: -1.0}
    assert bc["BrokenIndex"].dropna().to_dict() == {6: 12.0, 25: 31.0}


def test_choch_and_bearish_mirror():
    rows = list(STRUCTURE)
    rows[9] = (9.7, 10.5, 7.5, 10.3)   # c below a: a lower low, then the break is a change of character
    _, per_bar = _structure_events(rows)
    e = _of([x for b in per_bar for x in b], smc.BOS, smc.CHOCH)[0]
    assert (e.kind, e.bar, e.direction, e.confirmed_at) == ("choch", 6, 1, 12)
    ref = reference_labels(_frame(rows), 2)["bos_choch"]
    assert ref["CHOCH"][6] == 1 and ref["BrokenIndex"][6] == 12
    _, per_bar = _structure_events(_mirror(STRUCTURE))
    got = [(e.kind, e.bar, e.direction, e.level, e.confirmed_at)
           for e in _of([x for b in per_bar for x in b], smc.BOS, smc.CHOCH)]
    assert got == [("bos", 6, -1, 18.0, 12), ("choch", 25, 1, 17.8, 31)]


def test_fair_value_gaps_exact():
    _, per_bar = _structure_events(STRUCTURE)
    ev = [e for b in per_bar for e in b]
    gaps = [(e.kind, e.bar, e.direction, e.top, e.bottom, e.confirmed_at) for e in _of(ev, smc.FVG, smc.FVG_MITIGATED)]
    assert gaps == [("fvg", 12, 1, 12.0, 11.8, 13), ("fvg_mitigated", 12, 1, 12.0, 11.8, 17),
                    ("fvg", 17, -1, 12.8, 12.5, 18), ("fvg_mitigated", 17, -1, 12.8, 12.5, 19),
                    ("fvg", 26, 1, 13.6, 13.0, 27), ("fvg_mitigated", 26, 1, 13.6, 13.0, 28),
                    # bar 29 reaches the bottom but is the gap's own third bar; no bar after it does
                    ("fvg", 28, -1, 13.6, 13.4, 29)]
    ref = reference_labels(_frame(STRUCTURE), 2)["fvg"]
    got = ref[ref["FVG"].notna()]
    assert got.index.tolist() == [12, 17, 26, 28] and got["MitigatedIndex"].tolist() == [17, 19, 28, 0]


def test_liquidity_pool_and_sweep_exact():
    df = _frame(STRUCTURE)
    tol = reference_labels(df, 2)["liquidity_tolerance"]
    _, per_bar = _structure_events(STRUCTURE, liquidity_tolerance=tol)
    ev = [e for b in per_bar for e in b]
    (pool,) = _of(ev, smc.LIQUIDITY)
    assert (pool.bar, pool.direction, pool.ref, pool.confirmed_at) == (15, 1, 22, 24)
    assert pool.level == pytest.approx(14.01)
    (swept,) = _of(ev, smc.LIQUIDITY_SWEPT)
    assert (swept.bar, swept.confirmed_at) == (15, 27) and swept in per_bar[27]
    assert not _of(per_bar[27], smc.BOS, smc.CHOCH)   # a wick through the pool, no close beyond
    ref = reference_labels(df, 2)["liquidity"]
    assert ref["Liquidity"][15] == 1 and ref["End"][15] == 22 and ref["Swept"][15] == 27
    assert ref["Level"][15] == pytest.approx(14.01)


def test_order_block_lifecycle_exact():
    rows = list(STRUCTURE[:20]) + [
        (12.7, 12.9, 8.8, 9.0),     # 20 low below the block's bottom (9.0): mitigated
        (9.0, 10.2, 8.9, 10.0),     # 21
        (10.0, 10.8, 9.6, 10.7),    # 22 high above the block's top (10.5) after mitigation: invalidated
        (10.7, 11.0, 10.2, 10.4),   # 23
    ]
    _, per_bar = _structure_events(rows)
    ev = [e for b in per_bar for e in b]
    obs = [(e.kind, e.bar, e.direction, e.top, e.bottom, e.confirmed_at)
           for e in _of(ev, smc.ORDER_BLOCK, smc.OB_MITIGATED, smc.OB_INVALIDATED)]
    assert obs[:3] == [("order_block", 9, 1, 10.5, 9.0, 12), ("ob_mitigated", 9, 1, 10.5, 9.0, 20),
                       ("ob_invalidated", 9, 1, 10.5, 9.0, 22)]
    (block,) = _of(per_bar[12], smc.ORDER_BLOCK)
    assert block.volume == 300.0 and block.strength == 0.5
    ref = reference_labels(_frame(rows), 2)["ob"]
    assert math.isnan(ref["OB"][9])   # the package drops invalidated blocks
    ref = reference_labels(_frame(rows[:21]), 2)["ob"]
    assert ref["OB"][9] == 1 and ref["Top"][9] == 10.5 and ref["Bottom"][9] == 9.0


# ---- bounded state -------------------------------------------------------------------------------
def _trend_bars(n: int):
    """A falling zig-zag: each swing high below the last, never revisited (no sweep ever)."""
    for t in range(1, n + 1):
        c = 1e6 - 0.5 * t + 5.0 * math.sin(t / 2.0)
        yield c, c + 0.1, c - 0.1, c


def _paired_highs(n: int, period: int = 12):
    """A falling staircase with two swing highs per step, the second 0.01 lower: one pool of two
    members per step (tolerance 0.02), above every later price, so never swept."""
    for t in range(n):
        j, k = divmod(t, period)
        peak = 1e4 - 3.0 * (j // 2) - 0.01 * (j % 2)
        x = peak - 10.0 * abs(k - period // 2) / (period // 2)
        yield x, x + 0.001 * (k == period // 2), x - 0.001, x


def _run_watched(bars, **kw):
    det = SmcDetector(3, **kw)
    events, most = [], 0
    for row in bars:
        events += det.update(*row)
        most = max(most, *(len(h) for h in det._sweep_heap.values()))
    return det, events, most


def test_sweep_watch_stays_bounded_in_a_trend(monkeypatch):
    # every swing high anchors a pool the trend never sweeps; anchors beyond the 256 newest take
    # no member and can report nothing: their entries went unpurged (1,590 at 20,000 bars,
    # 31,830 at 400,000)
    det, events, most = _run_watched(_trend_bars(20_000), liquidity_tolerance=0.0)
    assert most <= 2 * smc._MAX_SWEEP and det.pools_dropped == 0
    monkeypatch.setattr(smc, "_MAX_SWEEP", 10**9)   # the unbounded heap: the same events
    _, unbounded, most_unbounded = _run_watched(_trend_bars(20_000), liquidity_tolerance=0.0)
    assert most_unbounded > 1500 and events == unbounded


def test_sweep_watch_drops_the_farthest_live_pools_and_counts_them(monkeypatch):
    monkeypatch.setattr(smc, "_MAX_SWEEP", 32)
    det, events, most = _run_watched(_paired_highs(6000), liquidity_tolerance=0.02)
    pools = {e.bar for e in _of(events, smc.LIQUIDITY) if e.direction == 1}
    assert len(pools) > 200 and most <= 64
    kept = sorted(p.anchor.idx for _, _, p in det._sweep_heap[1] if p.swept_at == -1)
    # none was swept: each is still watched or counted as dropped, and the watched ones are the
    # nearest to the price (the newest, lowest steps)
    assert 32 <= len(kept) <= 64 and det.pools_dropped == len(pools) - len(kept)
    assert kept == sorted(pools)[-len(kept):]


def test_evidence_follows_the_last_break_and_decays():
    det = SmcDetector(2, evidence_half_life=4)
    vals = []
    for o, h, lo, c in STRUCTURE:
        det.update(o, h, lo, c, 1.0)
        vals.append(det.evidence())
    assert vals[:12] == [0.0] * 12
    assert vals[12] == 1.0 and vals[16] == pytest.approx(0.5) and vals[20] == pytest.approx(0.25)
    assert vals[30] == pytest.approx(2 ** -4.5)
    assert vals[31] == -1.0 and det.trend == -1   # the bearish CHoCH of bar 31
    det = SmcDetector(2)
    for o, h, lo, c in _mirror(STRUCTURE):
        det.update(o, h, lo, c)
        assert -1.0 <= det.evidence() <= 1.0
    assert det.trend == 1 and det.evidence() == 1.0


# ---- replay harness --------------------------------------------------------------------------------
def test_replay_report_from_an_engine_journal(tmp_path):
    names = ["EURUSD", "XAUUSD"]
    bars = dc.sim.MarketSimulator(names, 3600, seed=3).bars(1200)
    pop = dc.Population.random(128, instruments=names, timeframes=[3600], seed=1)
    with dc.Engine(pop, threads=1, journal=tmp_path / "j") as eng:
        eng.run(bars)
    table = replay_report(tmp_path / "j", swing_length=5, engine=True)
    assert sorted(set(table["stream"])) == ["EURUSD/3600", "XAUUSD/3600"]
    assert list(table.columns[:3]) == ["stream", "bars", "concept"]
    per_stream = len(bars) // 2
    assert len(table) == 2 * len(CONCEPTS) and (table["bars"] == per_stream).all()
    sw = table[table["concept"] == "swing"]
    assert (sw["precision"] == 1.0).all() and (sw["recall"] == 1.0).all()
    assert table.attrs["engine"]["bars"] == len(bars) and table.attrs["engine"]["signals"] > 0
    text = format_report(table)
    assert "order_block" in text and f"engine replay: {len(bars)} bars" in text
    # the same bars given directly give the same table
    direct = replay_report(bars, swing_length=5)
    pd.testing.assert_frame_equal(direct.reset_index(drop=True), table.reset_index(drop=True))


def test_smc_command(capsys):
    from dynamic_core.cli import main

    assert main(["smc", "backtesting:GOOG", "--swing-length", "5"]) == 0
    out = capsys.readouterr().out
    assert "SMC agreement with smartmoneyconcepts" in out and "choch" in out and "order_block" in out
    assert main(["smc", "backtesting:GOOG", "--engine"]) == 2


@pytest.mark.parametrize("args, err, msg", [
    (([1.0, 2.0], [0.5, 1.0], 0), ValueError, r"swing_length must be in \[1, "),
    (([1.0, 2.0], [0.5, 1.0], 2.0), TypeError, "swing_length must be an int"),
    (([1.0, 2.0], [0.5], 1), ValueError, "high and low must be 1-D and of one length"),
])
def test_swing_candidates_names_a_bad_argument(args, err, msg):
    with pytest.raises(err, match=msg):
        smc.swing_candidates(*args)


# ---- review findings: invalid bars, caps, arguments, plots, CLI ----------------------------------
def _goog_bars() -> np.ndarray:
    return dc.market.from_pandas(_real("GOOG"), instrument="GOOG")


def test_replay_report_drops_and_counts_invalid_bars_before_anything_else():
    """One NaN bar used to skip the whole stream, with the reason of a NaN range
    ("liquidity_tolerance must be finite"); the valid bars are compared, ranges and all."""
    df = _real("GOOG").copy()
    df.iloc[1000, df.columns.get_loc("High")] = np.nan
    table = replay_report(df, 5)
    assert table.attrs["rejected"] == {"bars": {"non_finite": 1}} and table.attrs["skipped"] == []
    assert len(table) == len(CONCEPTS) and (table["bars"] == len(df) - 1).all()
    # exactly the figures of the bars without it: the liquidity band is of the valid bars' range
    clean = replay_report(df.drop(df.index[1000]), 5)
    pd.testing.assert_frame_equal(table, clean, check_like=False, check_flags=False)
    text = format_report(table)
    assert "bars: dropped 1 invalid bar(s) (non_finite 1)" in text
    # the liquidity row says it looks ahead
    assert re.search(r"\n\s*bars\s+2147\s+liquidity\*\s", text)
    assert "whole-series liquidity band (look-ahead)" in text
    a = smc_agreement(df, 5)
    assert a["bars"] == {"used": len(df) - 1, "rejected": {"non_finite": 1}, "dropped": {}}
    # a stream skipped says why
    short = replay_report(_goog_bars()[:86], 20)
    assert short.attrs["skipped"] == ["GOOG/86400: 86 valid bar(s), fewer than 120 (6 x swing_length 20)"]
    assert "no stream long enough to compare (skipped: GOOG/86400: 86 valid bar(s)" in format_report(short)


def test_invalid_bars_are_rejected_with_the_engine_s_reasons_not_scored():
    bars = _goog_bars()
    rev = replay_report(bars[::-1].copy(), 5)
    assert rev.attrs["rejected"] == {"GOOG/86400": {"out_of_order": len(bars) - 1}} and len(rev) == 0
    assert rev.attrs["skipped"] == ["GOOG/86400: 1 valid bar(s), fewer than 30 (6 x swing_length 5)"]
    dup = replay_report(np.concatenate([bars[:1000], bars[999:]]), 5)
    assert dup.attrs["rejected"] == {"GOOG/86400": {"duplicate_timestamp": 1}}
    assert (dup["bars"] == len(bars)).all()
    pd.testing.assert_frame_equal(dup, replay_report(bars, 5), check_flags=False)
    # a DataFrame's times are checked too (rows in the order given)
    df = _real("GOOG")
    assert replay_report(df.iloc[::-1], 5).attrs["rejected"] == {"bars": {"out_of_order": len(df) - 1}}
    with pytest.raises(ValueError, match=r"too few swings \(0\) in 1 bars"):
        smc_agreement(df.iloc[::-1], 5)
    swapped = df.iloc[:600].rename(columns={"High": "Low", "Low": "High"})
    t = replay_report(swapped, 5)
    assert t.attrs["rejected"] == {"bars": {"high_below_low": 600}} and len(t) == 0
    neg = df.iloc[:600].copy()
    neg["Volume"] = -neg["Volume"]
    assert replay_report(neg, 5).attrs["rejected"] == {"bars": {"negative_volume": 600}}
    # reference_labels labels row positions: it refuses invalid rows rather than shift them
    with pytest.raises(ValueError, match=r"1 invalid bar\(s\) \(non_finite 1\)"):
        reference_labels(df.assign(Close=df["Close"].where(df.index != df.index[7])), 5)
    # the detector itself: a swapped bar or a negative volume is refused, its state unchanged
    det = SmcDetector(3)
    det.update(1.0, 2.0, 0.5, 1.5, 10.0)
    with pytest.raises(ValueError, match="bar 1: high 0.5 below low 2.0"):
        det.update(1.0, 0.5, 2.0, 1.5)
    with pytest.raises(ValueError, match="bar 1: negative volume -5.0"):
        det.update(1.0, 2.0, 0.5, 1.5, -5.0)
    # an open or a close outside the bar's range (the engine's open/close_out_of_range)
    with pytest.raises(ValueError, match=r"bar 1: open 2.5 or close 1.5 outside \[low 0.5, high 2.0\]"):
        det.update(2.5, 2.0, 0.5, 1.5)
    with pytest.raises(ValueError, match="outside"):
        det.update(1.0, 2.0, 0.5, 0.25)
    # a price that is not a number is refused, though float() would take it
    with pytest.raises(TypeError, match="bar 1: high must be a number, got bool"):
        det.update(1.0, True, 0.5, 1.0)
    with pytest.raises(TypeError, match="bar 1: close must be a number, got str"):
        det.update(1.0, 2.0, 0.5, "1")
    with pytest.raises(TypeError, match="bar 1: volume must be a number, got NoneType"):
        det.update(1.0, 2.0, 0.5, 1.5, None)
    with pytest.raises(ValueError, match=r"bar 1: low an int of about 401 digits is out of range"):
        det.update(1.0, 2.0, 10**400, 1.5)
    assert det.n_bars == 1
    det.update(np.float32(2.0), 2, np.float64(0.5), 0.5)  # numpy scalars and ints; on the range's edges
    assert det.n_bars == 2


def test_order_block_strength_stays_in_its_documented_range():
    for name in ("EURUSD", "GOOG", "SP500"):
        obs = _of(detect(_real(name), 5), smc.ORDER_BLOCK)
        assert obs and all(0.0 <= e.strength <= 1.0 and e.volume >= 0.0 for e in obs)
    df = _real("GOOG").iloc[:600].copy()
    df["Volume"] = -df["Volume"]   # gave strengths from -3.8 to 20
    with pytest.raises(ValueError, match="negative volume"):
        detect(df, 5)
    # volumes near the float maximum: their sums overflow, the strength still does not (it read
    # 0 for three equal volumes); strength is scale-free, so it is the one of the volumes scaled
    df = _real("GOOG").iloc[:600].copy()
    base = _of(detect(df, 5), smc.ORDER_BLOCK)
    df["Volume"] = df["Volume"] / df["Volume"].max() * 1e308
    huge = _of(detect(df, 5), smc.ORDER_BLOCK)
    assert [e.bar for e in huge] == [e.bar for e in base]
    assert np.allclose([e.strength for e in huge], [e.strength for e in base], rtol=1e-12, atol=0)


def test_smc_agreement_refuses_bars_of_several_streams():
    bars = dc.sim.MarketSimulator(["EURUSD", "XAUUSD"], 3600, seed=3).bars(1200)
    with pytest.raises(ValueError, match=r"hold 2 streams \(instrument/timeframe: EURUSD/3600, XAUUSD/"):
        smc_agreement(bars, 5)
    with pytest.raises(ValueError, match="hold 2 streams"):
        smc_agreement(dc.market.to_pandas(bars), 5)
    one = bars[bars["instrument"] == dc.instruments.id("EURUSD")]
    assert smc_agreement(one, 5)["bars"]["used"] == 1200
    # replay_report splits bar records per stream instead
    assert sorted(set(replay_report(bars, 5)["stream"])) == ["EURUSD/3600", "XAUUSD/3600"]


def _rally_with_gaps(n: int = 600) -> list[tuple[float, float, float, float]]:
    """A bullish fair value gap on every bar, then one bar that falls through all of them."""
    rows = [(100 + 2 * t, 100 + 2 * t + 0.5, 100 + 2 * t - 0.5, 100 + 2 * t + 0.4) for t in range(n)]
    rows.append((rows[-1][3], rows[-1][3], 50.0, 51.0))
    return rows


def _sawtooth_blocks() -> list[tuple[float, float, float, float]]:
    """Every cycle's close passes the last swing high (a bullish order block never revisited),
    then one bar falls below all of them and one rises above all of them."""
    rows, p = [], 100.0
    for _ in range(400):
        for step in (1, 1, 1, 1, -0.6, -0.6):
            o, p = p, p + step
            rows.append((o, max(o, p) + 0.05, min(o, p) - 0.05, p))
    rows.append((p, p, 1.0, 2.0))
    rows.append((2.0, 10 * p, 1.5, 9 * p))
    return rows


def test_items_past_the_open_caps_are_counted():
    det = SmcDetector(5)
    ev = [e for r in _rally_with_gaps() for e in det.update(*r, 1.0)]
    gaps, mitigated = len(_of(ev, smc.FVG)), len(_of(ev, smc.FVG_MITIGATED))
    assert gaps == 598 and mitigated == smc._MAX_OPEN and det.fvgs_dropped == gaps - mitigated
    # fvg_batch keeps every gap: the mitigations the detector gave up are its extra ones
    _, _, _, mit = smc.fvg_batch(*np.array(_rally_with_gaps()).T)
    assert int((mit >= 0).sum()) == mitigated + det.fvgs_dropped
    det = SmcDetector(2)
    ev = [e for r in _sawtooth_blocks() for e in det.update(*r, 1.0)]
    blocks = len(_of(ev, smc.ORDER_BLOCK))
    # each block is mitigated by the fall (one was before it, and invalidated) or was given up
    assert blocks == 401 and len(_of(ev, smc.OB_MITIGATED)) + det.order_blocks_dropped == blocks
    assert det.dropped["order_blocks"] == 144 and det.dropped["levels"] == det.dropped["anchors"] == 0


def test_levels_and_anchors_past_a_smaller_cap_are_counted(monkeypatch):
    df = _real("EURUSD")
    tol = reference_labels(df, 3)["liquidity_tolerance"]   # as smc_agreement runs it
    det = SmcDetector(3, liquidity_tolerance=tol)
    ev = [e for r in df.itertuples(index=False) for e in det.update(r.Open, r.High, r.Low, r.Close, r.Volume)]
    assert det.dropped == dict.fromkeys(("fvgs", "order_blocks", "levels", "anchors", "pools"), 0)
    monkeypatch.setattr(smc, "_MAX_OPEN", 2)
    small = SmcDetector(3, liquidity_tolerance=tol)
    got = [e for r in df.itertuples(index=False) for e in small.update(r.Open, r.High, r.Low, r.Close,
                                                                         r.Volume)]
    assert got != ev
    d = small.dropped
    assert d["fvgs"] > 0 and d["order_blocks"] > 0 and d["levels"] > 0 and d["anchors"] > 0
    assert len(_of(got, smc.FVG)) - len(_of(got, smc.FVG_MITIGATED)) - len(small.open_fvgs) == d["fvgs"]
    a = smc_agreement(df, 3)
    assert a["bars"]["dropped"] == {k: v for k, v in d.items() if v}
    table = replay_report({"EURUSD": df}, 3)
    assert table.attrs["dropped"] == {"EURUSD": a["bars"]["dropped"]}
    assert "EURUSD: open items given up past the detector's caps: fvgs" in format_report(table)


def _fvg_brute(o, h, lo, c):
    n = len(o)
    d, top, bot, mit = np.zeros(n, np.int8), np.full(n, np.nan), np.full(n, np.nan), np.full(n, -1, np.int64)
    for i in range(1, n - 1):
        if h[i - 1] < lo[i + 1] and c[i] > o[i]:
            d[i], top[i], bot[i] = 1, lo[i + 1], h[i - 1]
        elif lo[i - 1] > h[i + 1] and c[i] < o[i]:
            d[i], top[i], bot[i] = -1, lo[i - 1], h[i + 1]
        for j in range(i + 2, n):
            if (d[i] == 1 and lo[j] <= top[i]) or (d[i] == -1 and h[j] >= bot[i]):
                mit[i] = j
                break
    return d, top, bot, mit


def test_fvg_batch_is_exact_and_checks_its_arrays():
    rng = np.random.default_rng(5)
    cases = [np.array(_rally_with_gaps(300)).T]
    for n in (0, 1, 2, 3, 5, 60, 400):
        x = np.round(rng.normal(0, 1, (n, 4)).cumsum(axis=0), 1)
        o, c = x[:, 0], x[:, 3]
        cases.append((o, np.maximum(o, c) + np.abs(x[:, 1]) / 5, np.minimum(o, c) - np.abs(x[:, 2]) / 5, c))
    for o, h, lo, c in cases:
        for got, want in zip(smc.fvg_batch(o, h, lo, c), _fvg_brute(o, h, lo, c)):
            np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match=r"1-D and of one length, got shapes \(4,\), \(4,\), \(2,\), \(4,\)"):
        smc.fvg_batch([1, 2, 3, 4], [2, 3, 4, 5], [0, 1], [1, 2, 3, 4])
    with pytest.raises(ValueError, match=r"got shapes \(3, 3\)"):
        smc.fvg_batch(*[np.ones((3, 3))] * 4)


def test_detector_arguments_are_bounded_and_named():
    with pytest.raises(ValueError, match=r"swing_length must be an int in \[1, 2147483648\]"):
        SmcDetector(2**62)
    with pytest.raises(TypeError, match="liquidity_tolerance must be a number"):
        SmcDetector(3, liquidity_tolerance="x")
    with pytest.raises(ValueError, match="evidence_half_life"):
        SmcDetector(3, evidence_half_life=0)


@pytest.mark.parametrize("call, err, msg", [
    (lambda f: f(2.5), TypeError, "swing_length must be an int, got float"),
    (lambda f: f(-3), ValueError, r"swing_length must be in \[1, "),
    (lambda f: f(0), ValueError, r"swing_length must be in \[1, "),
    (lambda f: f("5"), TypeError, "swing_length must be an int, got str"),
    (lambda f: f(None), TypeError, "swing_length must be an int, got NoneType"),
    (lambda f: f(True), TypeError, "swing_length must be an int, got bool"),
    (lambda f: f(5, range_percent=-1), ValueError, "range_percent must be a finite number"),
    (lambda f: f(5, range_percent=math.nan), ValueError, "range_percent must be a finite number"),
    (lambda f: f(5, close_break="no"), TypeError, "close_break must be a bool"),
    (lambda f: f(5, close_mitigation=1), TypeError, "close_mitigation must be a bool"),
    (lambda f: f(5, bogus=1), TypeError, "bogus"),
    (lambda f: f(5, progress=3), TypeError, "progress must be callable"),
])
@pytest.mark.parametrize("fn", ["replay_report", "smc_agreement"])
def test_harness_arguments_are_checked_before_any_work(fn, call, err, msg, tmp_path):
    # a journal that is not there: checked before it would be read
    missing = str(tmp_path / "no-journal")
    target = {"replay_report": lambda *a, **k: replay_report(missing, *a, **k),
              "smc_agreement": lambda *a, **k: smc_agreement(missing, *a, **k)}[fn]
    with pytest.raises(err, match=msg):
        call(target)


@pytest.mark.parametrize("kw, err, msg", [
    ({"min_bars": -1}, ValueError, "min_bars"),
    ({"evolve": -1}, ValueError, "evolve must be in"),
    ({"evolve": 10, "evolve_agents": 0}, ValueError, "evolve_agents must be in"),
    ({"evolve": 10, "evolve_plot": "trace.bogus"}, ValueError, "unsupported image format 'bogus'"),
    ({"evolve_plot": "trace.png"}, ValueError, "evolve_plot needs evolve > 0"),
    ({"engine": "yes"}, TypeError, "engine must be a bool"),
])
def test_replay_report_options_are_checked_before_any_work(kw, err, msg, tmp_path):
    with pytest.raises(err, match=msg):
        replay_report(str(tmp_path / "no-journal"), 5, **kw)


def test_replay_report_reports_progress():
    lines: list[str] = []
    replay_report({"GOOG": _real("GOOG")}, 5, progress=lines.append)
    assert lines[0] == "GOOG: checking the bars" and "GOOG: smartmoneyconcepts labels of 2,148 bars" in lines


def _rows_of(stream: int, instrument: int, gens: list[int], best: list[float]):
    from dynamic_core.learning.evolution import GenerationRow

    return [GenerationRow(generation=g, stream=stream, instrument=instrument, timeframe=3600, bar=100 * g,
                          trigger="every", judged=10, eligible=5, replaced=2, crossovers=1, migrants=0,
                          spawns=0, period_moves=0, best=b, median=b / 2, mean=b / 3, styles=(1, 1, 1, 1, 1))
            for g, b in zip(gens, best)]


def test_plot_trace_draws_one_line_per_stream(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from dynamic_core.learning.evolution import plot_trace

    a, b = dc.instruments.id("PLOTA"), dc.instruments.id("PLOTB")
    # two streams' generations interleave: one line through all of them was a zigzag of both
    rows = sorted(_rows_of(0, a, [1, 3, 5], [1.0, 1.1, 1.2]) + _rows_of(1, b, [2, 4, 6], [-1.0, -0.9, -0.8]),
                  key=lambda r: r.generation)
    figs = []
    monkeypatch.setattr(plt, "close", figs.append)
    assert plot_trace(rows, tmp_path / "t.png") == str(tmp_path / "t.png")
    (fig,) = figs
    lines = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in fig.axes[0].get_lines()}
    assert lines["PLOTA/3600 best"] == ([1, 3, 5], [1.0, 1.1, 1.2])
    assert lines["PLOTB/3600 best"] == ([2, 4, 6], [-1.0, -0.9, -0.8])
    assert lines["PLOTB/3600 median"] == ([2, 4, 6], [-0.5, -0.45, -0.4])
    assert len(lines) == 6
    with open(tmp_path / "t.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="unsupported image format 'bogus'"):
        plot_trace(rows, tmp_path / "t.bogus")
    assert not (tmp_path / "t.bogus").exists()


def test_smc_command_checks_the_plot_format_up_front(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from dynamic_core.cli import main

    for name, msg in (("evo.bogus", "unsupported image format 'bogus'"), ("evo", "no file extension")):
        argv = ["smc", "backtesting:GOOG", "--evolve", "100", "--evolve-plot", str(tmp_path / name)]
        assert main(argv) == 2
        out = capsys.readouterr()
        assert out.out == "" and out.err.startswith("dynamic-core: error: --evolve-plot") and msg in out.err
        assert len(out.err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_smc_command_exits_1_when_nothing_is_compared_and_says_why(tmp_path, capsys):
    from dynamic_core.cli import main

    _real("GOOG").iloc[:86].rename_axis("time").to_csv(tmp_path / "GOOG.csv")
    assert main(["smc", str(tmp_path / "GOOG.csv"), "--swing-length", "20"]) == 1
    out = capsys.readouterr()
    assert "skipped: GOOG/86400: 86 valid bar(s), fewer than 120 (6 x swing_length 20)" in out.out
    assert "dynamic-core smc: nothing compared" in out.err


def test_smc_command_shows_progress_on_a_terminal_only(monkeypatch, capsys):
    from dynamic_core import cli

    monkeypatch.setattr(cli, "_STATUS_AFTER", 0.0)
    monkeypatch.setattr(cli, "_STATUS_EVERY", 0.001)
    monkeypatch.setattr(cli.sys.stderr, "isatty", lambda: True)
    assert cli.main(["smc", "backtesting:GOOG", "--swing-length", "5"]) == 0
    out = capsys.readouterr()
    assert "\rdynamic-core smc: " in out.err and "GOOG/86400" in out.err and out.err.endswith("\r\x1b[K")
    assert "\r" not in out.out and "SMC agreement" in out.out
    assert cli.main(["smc", "backtesting:GOOG", "--swing-length", "5", "-q"]) == 0
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(cli.sys.stderr, "isatty", lambda: False)
    assert cli.main(["smc", "backtesting:GOOG", "--swing-length", "5"]) == 0
    assert capsys.readouterr().err == ""
