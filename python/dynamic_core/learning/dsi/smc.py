"""Causal Smart Money Concepts (SMC) market structure, one streaming detector per bar stream.

:class:`SmcDetector` takes one bar at a time and returns the :class:`SmcEvent` objects that the
bar made knowable, never more: nothing is revised in place, and a later event that changes the
picture (a swing superseded by a more extreme one of the same leg, an order block invalidated)
is an event of its own. Feeding a prefix of a series gives exactly the events of the full
series whose ``confirmed_at`` lies in the prefix.

The definitions follow the ``smartmoneyconcepts`` package (0.0.27; ``smc.swing_highs_lows``,
``smc.bos_choch(close_break=True)``, ``smc.fvg``, ``smc.liquidity``, ``smc.ob``), which labels a
whole DataFrame at once and looks ahead. Each concept here is that definition restated as what
can be known at the close of each bar; :mod:`dynamic_core.learning.harness` measures the
agreement on real data. Concepts and the bar each event is confirmed at (``L`` is
``swing_length``):

``swing`` (``direction`` +1 high, -1 low)
    Bar ``i`` is a swing high when its high equals the highest high of bars ``i-L+1 .. i+L``
    (a swing low likewise with lows; a bar that is both is a high), confirmed at ``i+L``. Of
    consecutive swings of one kind (no opposite swing between them) only the first most extreme
    one stands: a later, strictly more extreme swing of the same leg is emitted with ``ref`` =
    the bar it supersedes; a later, not more extreme one is not emitted. As in the reference no
    swing is reported before bar ``2L-1``; the reference's made-up swings at the first bar
    (opposite to the first swing) and at the last bar are not events, though the first one
    anchors the structure below as it does there.
``bos`` / ``choch``
    With three alternating swings ``a, b, c`` and ``b`` a swing high: a close above ``b`` is a
    bullish break of structure when ``a < c < b`` (a higher low before the break) and a bullish
    change of character when ``c < a < b`` (a lower low first); mirrored for a swing low ``b``.
    ``bar`` is ``b`` (the reference's row), ``level`` its price, ``ref`` the bar whose close
    broke it. The event comes at that close when ``c`` is known by then: confirmed, or still in
    the making (the extreme since ``b`` that is not yet past its confirmation and is the extreme
    of its window so far; the reference, looking ahead, already has it). Otherwise it comes
    when ``c`` is confirmed. A level not broken by the time the next swing of its kind (the
    reference's ``d``) is final stays armed if that swing went beyond it and is dropped if not.
    When a level breaks, every older level still waiting is dropped, and of levels broken by
    one close only the newest counts (the reference removes an older label whose break comes
    no earlier than a newer one's). Bar 0 is the reference's first ``a``.
``fvg``
    Three bars ``i-1, i, i+1``: bullish when ``high[i-1] < low[i+1]`` and bar ``i`` closes up
    (``top = low[i+1]``, ``bottom = high[i-1]``), bearish when ``low[i-1] > high[i+1]`` and bar
    ``i`` closes down (``top = low[i-1]``, ``bottom = high[i+1]``); ``bar`` is ``i``, confirmed
    at ``i+1``. ``fvg_mitigated`` at the first bar from ``i+2`` whose low reaches ``top``
    (bullish) or whose high reaches ``bottom`` (bearish).
``liquidity`` / ``liquidity_swept`` / ``liquidity_withdrawn``
    Swing highs (lows) within ``tolerance`` of an earlier swing high (low), the *anchor*, and
    before the anchor is swept form a pool at the anchor's bar; ``level`` is the mean of the
    members, ``ref`` the newest member. A swing joins the earliest anchor whose band holds it,
    and a swing that joined a pool is no anchor itself; bar 0 is an anchor as in the reference.
    The event is emitted when the pool gets its second member and again whenever its members
    change. ``liquidity_swept`` at the first bar whose high reaches ``anchor + tolerance``
    (lows: ``anchor - tolerance``). A member superseded by a more extreme swing of its leg
    leaves the pool (the reference never had it); ``liquidity_withdrawn`` when that leaves
    the anchor alone.
``order_block`` / ``ob_mitigated`` / ``ob_invalidated``
    When a close first rises above the last swing high, the bar with the lowest low since that
    swing (the latest of equal lows) is a bullish order block (``top``/``bottom`` its high and
    low; ``volume`` the volume of the breaking bar and the two before it, ``strength``
    ``min/max`` of (two newest, oldest) of those volumes); mirrored for bearish blocks. "The
    last swing high" is the reference's, as far as this bar can tell: the newest confirmed one,
    except that one a close has already passed with no counter-swing possible since (the leg
    will supersede it, so the one before counts), and no block while a swing high may be
    forming after it (the reference would compare with that one, which this close does not
    pass). A block is mitigated when a low goes below its bottom (bullish; with
    ``close_mitigation``, the lower of open and close) and, once mitigated, invalidated when a
    high goes above its top; the reference drops invalidated blocks from its output.

Evidence: :meth:`SmcDetector.evidence` is ``+1`` right after a bullish break (BOS or CHoCH),
``-1`` after a bearish one, halving every ``evidence_half_life`` bars.

Example::

    det = SmcDetector(swing_length=10)
    for o, h, l, c, v in bars:
        for ev in det.update(o, h, l, c, v):
            ...
    events = detect(df, swing_length=10)          # the same, for a whole series
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np

from ... import detmath
from ..._checks import as_real, check_int, check_real, is_int

__all__ = [
    "BOS",
    "CHOCH",
    "FVG",
    "FVG_MITIGATED",
    "KINDS",
    "LIQUIDITY",
    "LIQUIDITY_SWEPT",
    "LIQUIDITY_WITHDRAWN",
    "OB_INVALIDATED",
    "OB_MITIGATED",
    "ORDER_BLOCK",
    "SWING",
    "SmcDetector",
    "SmcEvent",
    "detect",
    "fvg_batch",
    "ohlcv_arrays",
    "swing_candidates",
]

SWING = "swing"
BOS = "bos"
CHOCH = "choch"
FVG = "fvg"
FVG_MITIGATED = "fvg_mitigated"
LIQUIDITY = "liquidity"
LIQUIDITY_SWEPT = "liquidity_swept"
LIQUIDITY_WITHDRAWN = "liquidity_withdrawn"
ORDER_BLOCK = "order_block"
OB_MITIGATED = "ob_mitigated"
OB_INVALIDATED = "ob_invalidated"
KINDS: tuple[str, ...] = (SWING, BOS, CHOCH, FVG, FVG_MITIGATED, LIQUIDITY, LIQUIDITY_SWEPT,
                          LIQUIDITY_WITHDRAWN, ORDER_BLOCK, OB_MITIGATED, OB_INVALIDATED)

# Bound on the levels/blocks/pools a detector keeps open, so update() stays O(1) on any stream;
# the reference keeps all of them, which only matters after this many untouched levels. What
# goes past it is counted (SmcDetector.dropped), never silently lost.
_MAX_OPEN = 256
_MAX_RECORDS = 4096
# Unswept liquidity pools watched for their sweep, per side. An anchor that left ``_anchors``
# alone (no second member) or was superseded can report nothing more, and its heap entry is
# purged once a side holds 2 * _MAX_SWEEP entries (so the purge costs O(1) per push, amortised);
# pools that still could report a sweep beyond _MAX_SWEEP go farthest from the price first
# (``SmcDetector.pools_dropped``). In a trend the price never comes back to sweep old anchors:
# without this the heap grew by one entry per swing for ever.
_MAX_SWEEP = 2 * _MAX_OPEN
# Largest swing_length (a swing's window is 2 * swing_length bars, kept in deques)
_MAX_SWING = 1 << 31


class SmcEvent(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One SMC observation, emitted at the close of bar ``confirmed_at``.

    Attributes
    ----------
    kind : str
        One of :data:`KINDS`.
    bar : int
        The bar the label belongs to (the row ``smartmoneyconcepts`` labels): the swing bar, the
        broken swing for ``bos``/``choch``, the middle bar of a gap, the anchor swing of a pool,
        the order-block bar. Bars count from 0, the first bar fed to the detector.
    confirmed_at : int
        The bar whose close made the event known (``>= bar``).
    direction : int
        +1 bullish / swing high / buy-side liquidity (highs), -1 the opposite.
    level : float
        The price: swing, broken level, gap middle, pool mean, block middle.
    top, bottom : float
        The zone (equal to ``level`` for swings and breaks; the pool band for liquidity).
    ref : int
        The other bar involved, -1 if none: the superseded swing (``swing``), the bar whose close
        broke the level (``bos``/``choch``), the newest member (``liquidity``), the member that
        left (``liquidity_withdrawn``), the bar whose close passed the swing (``order_block``),
        the bar that mitigated, swept or invalidated (the others; equal to ``confirmed_at``).
    volume, strength : float
        Order blocks only: volume of the breaking bar and the two before it, and the balance
        ``min/max`` of (newest two, oldest) of those volumes, in [0, 1].
    """

    kind: str
    bar: int
    confirmed_at: int
    direction: int
    level: float
    top: float
    bottom: float
    ref: int = -1
    volume: float = 0.0
    strength: float = 0.0


class _Swing:
    __slots__ = ("broken_at", "closed_beyond", "ext", "idx", "level", "leveled", "liq", "ob_crossed", "typ")

    def __init__(self, idx: int, typ: int, level: float) -> None:
        self.idx = idx
        self.typ = typ
        self.level = level
        self.broken_at = -1
        self.leveled = False   # has had its _Level
        self.closed_beyond = False   # a close beyond the level has happened (order blocks)
        self.ob_crossed = False
        # the extreme on the other side since the swing (lowest low after a high), the latest
        # of equal ones: (price, bar, the bar's price on the swing's side)
        self.ext: tuple[float, int, float] | None = None
        self.liq: _Pool | None = None  # the pool it anchors or belongs to


class _Level:
    """A swing that may become a BOS/CHoCH label (the reference's ``b``)."""

    __slots__ = ("a_level", "armed", "c_level", "done", "kind", "swing")

    def __init__(self, swing: _Swing, a_level: float, c_level: float) -> None:
        self.swing = swing
        self.a_level = a_level
        self.c_level = c_level
        self.kind: str | None = None
        self.armed = False
        self.done = False
        self.classify()

    def classify(self) -> None:
        a, b, c = self.a_level, self.swing.level, self.c_level
        s = self.swing.typ
        # bullish (b a high): BOS a < c < b, CHoCH c < a < b; bearish mirrored
        if s * a < s * c < s * b:
            self.kind = BOS
        elif s * c < s * a < s * b:
            self.kind = CHOCH
        else:
            self.kind = None


class _Pool:
    __slots__ = ("anchor", "members", "swept_at", "tol", "typ")

    def __init__(self, anchor: _Swing, tol: float) -> None:
        self.anchor = anchor
        self.typ = anchor.typ
        self.tol = tol
        self.members: list[_Swing] = [anchor]
        self.swept_at = -1

    @property
    def threshold(self) -> float:
        return self.anchor.level + self.typ * self.tol


class _Block:
    __slots__ = ("bottom", "breaker", "idx", "top", "typ")

    def __init__(self, idx: int, typ: int, top: float, bottom: float) -> None:
        self.idx = idx
        self.typ = typ
        self.top = top
        self.bottom = bottom
        self.breaker = False


class SmcDetector:
    """Streaming, causal SMC structure of one bar stream (one instrument and timeframe).

    Parameters
    ----------
    swing_length : int
        Bars on each side of a swing (the reference's ``swing_length``), 1 to ``2**31``; a swing
        at bar ``i`` is confirmed at ``i + swing_length``.
    close_break : bool
        BOS/CHoCH need a close beyond the level (True, the reference's ``close_break=True``)
        or only a high/low beyond it.
    close_mitigation : bool
        Order blocks are mitigated by the body (lower of open and close for bullish blocks)
        instead of the wick, as the reference's ``close_mitigation``.
    liquidity_tolerance : float, optional
        Half-width of a liquidity band in price units. When omitted, each anchor's band is
        ``liquidity_range_percent`` of the range (highest high - lowest low) seen up to its
        confirmation; the reference uses the range of the whole series, which a causal detector
        cannot know (the harness passes that number here to compare like with like).
    liquidity_range_percent : float
        See ``liquidity_tolerance`` (the reference's ``range_percent``, 0.01).
    evidence_half_life : float, optional
        Bars over which :meth:`evidence` halves; ``swing_length`` when omitted.

    Attributes
    ----------
    pools_dropped : int
        Liquidity pools of two or more members no longer watched for their sweep because more
        than 512 per side were waiting (the farthest from the price went first): their sweep is
        never reported. Zero unless a stream leaves that many reported pools unswept.
    fvgs_dropped : int
        Open fair value gaps given up because more than 256 of one direction were open (the
        farthest from the price went first): their ``fvg_mitigated`` is never reported.
    order_blocks_dropped : int
        Order blocks given up because more than 256 were live (the oldest went first): their
        ``ob_mitigated`` / ``ob_invalidated`` is never reported.
    levels_dropped : int
        Swings waiting to be labelled BOS/CHoCH given up because more than 256 waited (the
        oldest went first): a later break of such a level is not reported.
    anchors_dropped : int
        Liquidity anchors that stopped taking members because more than 256 could (the oldest
        went first), plus bar 0's level when more than 4096 new highs and lows came before the
        first swing: pools the reference would form on them are not reported.

    All are zero unless a stream leaves that many items open; :attr:`dropped` has them together.
    """

    def __init__(self, swing_length: int = 50, *, close_break: bool = True,
                 close_mitigation: bool = False, liquidity_tolerance: float | None = None,
                 liquidity_range_percent: float = 0.01,
                 evidence_half_life: float | None = None) -> None:
        if not is_int(swing_length) or not 1 <= swing_length <= _MAX_SWING:
            # ValueError for a wrong type too, as this constructor always raised
            raise ValueError(f"swing_length must be an int in [1, {_MAX_SWING}], got {swing_length!r}")
        if liquidity_tolerance is not None:
            check_real("liquidity_tolerance", liquidity_tolerance, 0.0)
        check_real("liquidity_range_percent", liquidity_range_percent, 0.0)
        hl = float(swing_length) if evidence_half_life is None else check_real(
            "evidence_half_life", evidence_half_life, 0.0, lo_open=True)
        self.swing_length = L = int(swing_length)
        self.close_break = bool(close_break)
        self.close_mitigation = bool(close_mitigation)
        self.liquidity_tolerance = None if liquidity_tolerance is None else float(liquidity_tolerance)
        self.liquidity_range_percent = float(liquidity_range_percent)
        self.evidence_half_life = hl
        self._t = -1
        # the last 2L bars (a swing's window), newest last
        self._hi: deque[float] = deque(maxlen=2 * L)
        self._lo: deque[float] = deque(maxlen=2 * L)
        self._h3: deque[float] = deque(maxlen=3)
        self._l3: deque[float] = deque(maxlen=3)
        self._op: deque[float] = deque(maxlen=2)
        self._cl: deque[float] = deque(maxlen=2)
        self._vol: deque[float] = deque(maxlen=3)
        self._first_hl: tuple[float, float] | None = None
        # until the first swing: bars after the first whose high (low) beat all before them,
        # to date the sweep of the first bar's level once it is known to be a swing
        self._records: tuple[list[tuple[int, float]], list[tuple[int, float]]] | None = ([], [])
        self._max_hi = -math.inf
        self._min_lo = math.inf
        # swings as the reference keeps them (alternating), newest last; a short tail suffices
        self._sw: list[_Swing] = []
        self._levels: list[_Level] = []     # candidate BOS/CHoCH levels not yet emitted or dropped
        # FVGs still open: heaps keyed so that the first to be mitigated is on top
        self._fvg_bull: list[tuple[float, int, float]] = []   # (-top, bar, bottom)
        self._fvg_bear: list[tuple[float, int, float]] = []   # (bottom, bar, top)
        self._blocks: list[_Block] = []
        # liquidity: anchors still able to take members, and unswept anchors by sweep threshold
        self._anchors: list[_Pool] = []
        self._sweep_heap: dict[int, list[tuple[float, int, _Pool]]] = {1: [], -1: []}
        self.pools_dropped = 0
        self.fvgs_dropped = 0
        self.order_blocks_dropped = 0
        self.levels_dropped = 0
        self.anchors_dropped = 0
        self._trend = 0
        self._trend_at = -1

    # ---- public state ----------------------------------------------------------------------
    @property
    def n_bars(self) -> int:
        """Bars fed so far (the next bar's index)."""
        return self._t + 1

    @property
    def trend(self) -> int:
        """Direction of the last BOS/CHoCH (+1, -1; 0 before the first)."""
        return self._trend

    @property
    def swings(self) -> list[tuple[int, int, float]]:
        """The newest confirmed swings as ``(bar, direction, level)``, oldest first (a short tail;
        the anchor at bar 0 included)."""
        return [(s.idx, s.typ, s.level) for s in self._sw]

    @property
    def open_fvgs(self) -> list[tuple[int, int, float, float]]:
        """Unmitigated gaps as ``(bar, direction, top, bottom)``, by bar."""
        out = [(b, 1, -nt, bot) for nt, b, bot in self._fvg_bull]
        out += [(b, -1, top, bot) for bot, b, top in self._fvg_bear]
        return sorted(out)

    @property
    def order_blocks(self) -> list[tuple[int, int, float, float, bool]]:
        """Order blocks not invalidated as ``(bar, direction, top, bottom, mitigated)``, by bar."""
        return sorted((b.idx, b.typ, b.top, b.bottom, b.breaker) for b in self._blocks)

    @property
    def dropped(self) -> dict[str, int]:
        """Open items given up past the caps so far (see the class's attributes), by kind:
        ``{"fvgs", "order_blocks", "levels", "anchors", "pools"}``."""
        return {"fvgs": self.fvgs_dropped, "order_blocks": self.order_blocks_dropped,
                "levels": self.levels_dropped, "anchors": self.anchors_dropped, "pools": self.pools_dropped}

    def evidence(self) -> float:
        """Structure evidence in [-1, 1]: the direction of the last BOS/CHoCH, halving every
        ``evidence_half_life`` bars since it was confirmed; 0 before the first."""
        if self._trend == 0:
            return 0.0
        age = self._t - self._trend_at
        return self._trend * detmath.exp2(-(age / self.evidence_half_life))

    # ---- the update ------------------------------------------------------------------------
    def update(self, open: float, high: float, low: float, close: float, volume: float = 0.0) -> list[SmcEvent]:
        """Feed the next bar; returns the events its close made known (possibly none), in the
        order: swing (with the liquidity pool it joins), breaks, gaps, sweeps, order blocks.

        Raises
        ------
        TypeError
            A price or the volume is not a number (a bool or a string such as ``"1"`` included,
            which ``float()`` would take); the detector's state is then unchanged.
        ValueError
            A price or the volume is not finite, the high is below the low (swapped columns), the
            open or the close lies outside [low, high] (what the engine rejects as
            ``open_out_of_range`` / ``close_out_of_range``) or the volume is negative; the
            detector's state is then unchanged.
        """
        try:  # TypeError for a non-number, ValueError for an int beyond float64
            o, h, lo, c, v = (as_real(name, x) for name, x in
                              (("open", open), ("high", high), ("low", low), ("close", close), ("volume", volume)))
        except (TypeError, ValueError) as e:
            raise type(e)(f"bar {self._t + 1}: {e}") from None
        if not (math.isfinite(o) and math.isfinite(h) and math.isfinite(lo) and math.isfinite(c)
                and math.isfinite(v)):
            raise ValueError(f"bar {self._t + 1}: non-finite value in {(o, h, lo, c, v)}")
        if h < lo:
            raise ValueError(f"bar {self._t + 1}: high {h!r} below low {lo!r}")
        if not (lo <= o <= h and lo <= c <= h):
            raise ValueError(f"bar {self._t + 1}: open {o!r} or close {c!r} outside [low {lo!r}, high {h!r}]")
        if v < 0:
            # order-block strength is a ratio of volumes, in [0, 1] only for volumes >= 0
            raise ValueError(f"bar {self._t + 1}: negative volume {v!r}")
        self._t += 1
        t = self._t
        L = self.swing_length
        self._hi.append(h)
        self._lo.append(lo)
        self._h3.append(h)
        self._l3.append(lo)
        self._vol.append(v)
        if self._first_hl is None:
            self._first_hl = (h, lo)
        elif self._records is not None:
            rh, rl = self._records
            if len(rh) + len(rl) > _MAX_RECORDS:
                self._records = None
            else:
                if h > (rh[-1][1] if rh else self._max_hi):
                    rh.append((t, h))
                if lo < (rl[-1][1] if rl else self._min_lo):
                    rl.append((t, lo))
        self._max_hi = max(self._max_hi, h)
        self._min_lo = min(self._min_lo, lo)
        events: list[SmcEvent] = []
        # the reference's rolling window needs 2L bars before the swing bar as well
        i = t - L
        if i >= 2 * L - 1:
            self._swing_at(i, events)
        self._breaks(c, events)
        self._fvg(o, h, lo, c, events)
        self._sweeps(h, lo, events)
        self._order_blocks(o, h, lo, c, events)
        self._op.append(o)
        self._cl.append(c)
        return events

    # ---- swings ----------------------------------------------------------------------------
    def _swing_at(self, i: int, events: list[SmcEvent]) -> None:
        L = self.swing_length
        hi, lo = self._hi, self._lo
        if hi[L - 1] == max(hi):
            typ, level = 1, hi[L - 1]
        elif lo[L - 1] == min(lo):
            typ, level = -1, lo[L - 1]
        else:
            return
        t = self._t
        sw = self._sw
        new = _Swing(i, typ, level)
        affected: _Pool | None = None
        if not sw:
            # the reference starts its structure with bar 0 taken as the opposite extreme
            assert self._first_hl is not None
            fh, fl = self._first_hl
            sw.append(_Swing(0, -typ, fl if typ == 1 else fh))
            self._liquidity_first(sw[0])
        last = sw[-1]
        if last.typ == typ:
            if typ * level <= typ * last.level:
                return
            sw[-1] = new
            self._on_replaced(last, new)
            affected = self._liquidity_remove(last)
            events.append(SmcEvent(kind=SWING, bar=i, confirmed_at=t, direction=typ, level=level,
                                   top=level, bottom=level, ref=last.idx))
        else:
            sw.append(new)
            if len(sw) > 6:
                del sw[0]
            self._on_appended()
            events.append(SmcEvent(kind=SWING, bar=i, confirmed_at=t, direction=typ, level=level,
                                   top=level, bottom=level))
        # a close between the swing bar and its confirmation cannot pass its level (the swing
        # is the extreme of that window), so its break is watched from here on
        self._ob_watch(new)
        self._liquidity_add(new, events)
        if affected is not None and affected is not new.liq:
            if len(affected.members) > 1:
                self._emit_pool(affected, events)
            else:
                a = affected.anchor
                events.append(SmcEvent(kind=LIQUIDITY_WITHDRAWN, bar=a.idx, confirmed_at=t, direction=a.typ,
                                       level=a.level, top=a.level + affected.tol,
                                       bottom=a.level - affected.tol, ref=last.idx))

    def _on_appended(self) -> None:
        sw = self._sw
        # the new swing is c for the swing two back (b), d for three back
        if len(sw) >= 3 and not sw[-2].leveled:
            sw[-2].leveled = True
            self._levels.append(_Level(sw[-2], sw[-3].level, sw[-1].level))
            if len(self._levels) > _MAX_OPEN:
                del self._levels[0]
                self.levels_dropped += 1
        elif len(sw) >= 3:
            # classified earlier from a c in the making: the confirmed c decides
            for lv in self._levels:
                if lv.swing is sw[-2]:
                    lv.c_level = sw[-1].level
                    lv.classify()
        if len(sw) >= 4:
            b = sw[-3]
            self._check_d(b, sw[-1])
            for lv in self._levels:
                if lv.swing is b and lv.kind is None:
                    lv.done = True   # c is final now and fits neither pattern
        if len(sw) >= 5:
            # b's next swing beyond it is final: drop b if it never got past b
            b = sw[-4]
            for lv in self._levels:
                if lv.swing is b and not lv.armed:
                    lv.done = True
        self._levels = [lv for lv in self._levels if not lv.done]

    def _on_replaced(self, old: _Swing, new: _Swing) -> None:
        sw = self._sw
        for lv in self._levels:
            if len(sw) >= 2 and lv.swing is sw[-2] and lv.c_level == old.level:
                lv.c_level = new.level    # c moved further: re-classify
                lv.classify()
        if len(sw) >= 3:
            self._check_d(sw[-3], new)

    def _check_d(self, b: _Swing, d: _Swing) -> None:
        for lv in self._levels:
            if lv.swing is b and d.typ * d.level > d.typ * b.level:
                lv.armed = True

    # ---- BOS / CHoCH -----------------------------------------------------------------------
    def _crosses(self, c: float, s: _Swing) -> bool:
        if self.close_break:
            return c > s.level if s.typ == 1 else c < s.level
        h, lo = self._hi[-1], self._lo[-1]
        return h > s.level if s.typ == 1 else lo < s.level

    def _pending_swing(self, typ: int, after: int, beyond: float, until: int | None = None) -> float | None:
        """The price of the most extreme bar in ``after+1 .. until`` (default: this bar) and
        strictly beyond ``beyond`` that can still become a swing of type ``typ`` (not yet past
        its confirmation and the extreme of its window so far), the earliest of equal ones;
        None if there is none."""
        t, L = self._t, self.swing_length
        own = self._hi if typ == 1 else self._lo
        best: float | None = None
        last = t if until is None else until
        for ci in range(max(after + 1, t - L + 1, 2 * L - 1), last + 1):
            x = own[ci - t - 1]
            if typ * x <= typ * beyond or (best is not None and typ * x <= typ * best):
                continue
            ok = True
            for k in range(ci - L + 1, t + 1):
                if typ * own[k - t - 1] > typ * x:
                    ok = False
                    break
            if ok:
                best = x
        return best

    def _breaks(self, c: float, events: list[SmcEvent]) -> None:
        t = self._t
        sw = self._sw
        for s in sw:
            if s.broken_at < 0 and s.idx > 0 and self._crosses(c, s):
                s.broken_at = t
        for lv in self._levels:
            if lv.swing.broken_at < 0 and self._crosses(c, lv.swing):
                lv.swing.broken_at = t
        # The reference classifies a break by the swing after the broken one (c), which may be
        # made but not yet confirmed: use such a bar when it can still become that swing.
        if len(sw) >= 2 and sw[-1].broken_at == t and not sw[-1].leveled:
            b = sw[-1]
            cl = self._pending_swing(-b.typ, b.idx, b.typ * math.inf)
            if cl is not None:
                b.leveled = True
                self._levels.append(_Level(b, sw[-2].level, cl))
        if len(sw) >= 3 and sw[-2].broken_at == t:
            c_sw = sw[-1]
            cl = self._pending_swing(c_sw.typ, c_sw.idx, c_sw.level)
            if cl is not None:
                for lv in self._levels:
                    if lv.swing is sw[-2]:
                        lv.c_level = cl
                        lv.classify()
        self._emit_ready(events)

    def _emit_ready(self, events: list[SmcEvent]) -> None:
        ready = [lv for lv in self._levels if lv.kind is not None and lv.swing.broken_at >= 0]
        if not ready:
            return
        t = self._t
        ready.sort(key=lambda lv: lv.swing.idx)
        # an older label broken no earlier than a newer one is dropped (the reference's rule)
        keep: list[_Level] = []
        for k, lv in enumerate(ready):
            if any(o.swing.broken_at <= lv.swing.broken_at for o in ready[k + 1:]):
                lv.done = True
                continue
            keep.append(lv)
        for lv in keep:
            s = lv.swing
            assert lv.kind is not None
            events.append(SmcEvent(kind=lv.kind, bar=s.idx, confirmed_at=t, direction=s.typ,
                                   level=s.level, top=s.level, bottom=s.level, ref=s.broken_at))
            lv.done = True
            self._trend = s.typ
            self._trend_at = t
            # older levels still waiting would break later than this one: the reference drops them
            for o in self._levels:
                if not o.done and o.swing.idx < s.idx and (o.swing.broken_at < 0 or o.swing.broken_at >= s.broken_at):
                    o.done = True
        self._levels = [lv for lv in self._levels if not lv.done]

    # ---- fair value gaps -------------------------------------------------------------------
    def _fvg(self, o: float, h: float, lo: float, c: float, events: list[SmcEvent]) -> None:
        t = self._t
        bull, bear = self._fvg_bull, self._fvg_bear
        while bull and -bull[0][0] >= lo:
            ntop, b, bot = heapq.heappop(bull)
            events.append(SmcEvent(kind=FVG_MITIGATED, bar=b, confirmed_at=t, direction=1,
                                   level=0.5 * (-ntop + bot), top=-ntop, bottom=bot, ref=t))
        while bear and bear[0][0] <= h:
            bot, b, top = heapq.heappop(bear)
            events.append(SmcEvent(kind=FVG_MITIGATED, bar=b, confirmed_at=t, direction=-1,
                                   level=0.5 * (top + bot), top=top, bottom=bot, ref=t))
        if t < 2:
            return
        h2, l2 = self._h3[0], self._l3[0]
        o1, c1 = self._op[-1], self._cl[-1]
        if h2 < lo and c1 > o1:
            top, bot = lo, h2
            heapq.heappush(bull, (-top, t - 1, bot))
            if len(bull) > _MAX_OPEN:
                bull.remove(max(bull))   # the lowest top: the farthest below the price
                heapq.heapify(bull)
                self.fvgs_dropped += 1
            d = 1
        elif l2 > h and c1 < o1:
            top, bot = l2, h
            heapq.heappush(bear, (bot, t - 1, top))
            if len(bear) > _MAX_OPEN:
                bear.remove(max(bear))   # the highest bottom: the farthest above the price
                heapq.heapify(bear)
                self.fvgs_dropped += 1
            d = -1
        else:
            return
        events.append(SmcEvent(kind=FVG, bar=t - 1, confirmed_at=t, direction=d,
                               level=0.5 * (top + bot), top=top, bottom=bot))

    # ---- liquidity -------------------------------------------------------------------------
    def _liquidity_add(self, s: _Swing, events: list[SmcEvent]) -> None:
        for pool in self._anchors:
            if pool.typ != s.typ or pool.anchor.idx >= s.idx:
                continue
            if pool.swept_at >= 0 and s.idx >= pool.swept_at:
                continue
            if pool.anchor.level - pool.tol <= s.level <= pool.anchor.level + pool.tol:
                pool.members.append(s)
                s.liq = pool
                self._emit_pool(pool, events)
                return
        tol = self.liquidity_tolerance
        if tol is None:
            tol = (self._max_hi - self._min_lo) * self.liquidity_range_percent
        pool = _Pool(s, tol)
        s.liq = pool
        # a bar since the swing may already have reached the threshold (possible only with a
        # zero tolerance: later bars of the swing's window can equal it)
        L = self.swing_length
        for k in range(1, L + 1):
            x = self._hi[-1 - L + k] if s.typ == 1 else self._lo[-1 - L + k]
            if s.typ * x >= s.typ * pool.threshold:
                pool.swept_at = s.idx + k
                break
        self._anchors.append(pool)
        if pool.swept_at < 0:
            self._watch_sweep(pool)
        if len(self._anchors) > _MAX_OPEN:
            # anchors swept more than L bars ago can take no member any more
            t = self._t
            self._anchors = [p for p in self._anchors if p.swept_at == -1 or p.swept_at > t - L]
            if len(self._anchors) > _MAX_OPEN:
                del self._anchors[0]
                self.anchors_dropped += 1

    def _liquidity_first(self, a: _Swing) -> None:
        # the reference's made-up swing at bar 0 is a liquidity level like any other
        records, self._records = self._records, None
        if records is None:   # more than _MAX_RECORDS new highs and lows before the first swing
            self.anchors_dropped += 1
            return
        tol = self.liquidity_tolerance
        if tol is None:
            tol = (self._max_hi - self._min_lo) * self.liquidity_range_percent
        pool = _Pool(a, tol)
        a.liq = pool
        thr = pool.threshold
        for k, x in records[0 if a.typ == 1 else 1]:
            if a.typ * x >= a.typ * thr:
                pool.swept_at = k
                break
        self._anchors.append(pool)
        if pool.swept_at < 0:
            self._watch_sweep(pool)

    def _watch_sweep(self, pool: _Pool) -> None:
        heap = self._sweep_heap[pool.typ]
        heapq.heappush(heap, (pool.typ * pool.threshold, pool.anchor.idx, pool))
        if len(heap) <= 2 * _MAX_SWEEP:
            return
        # Keep what a sweep can still report: an unswept pool that is still an anchor (it may
        # get members) or has members already. (The bar keys are distinct: tuples never compare
        # pools.)
        anchors = set(self._anchors)
        live = [e for e in heap if e[2].swept_at == -1 and (len(e[2].members) > 1 or e[2] in anchors)]
        if len(live) > _MAX_SWEEP:
            live.sort()   # nearest threshold first, and a sorted list is a heap
            for _, _, p in live[_MAX_SWEEP:]:
                p.swept_at = -3   # not watched any more: like a swept pool, it takes no member
                if p in anchors:
                    self._anchors.remove(p)
                self.pools_dropped += 1
            del live[_MAX_SWEEP:]
        else:
            heapq.heapify(live)
        heap[:] = live

    def _emit_pool(self, pool: _Pool, events: list[SmcEvent]) -> None:
        lv = sum(m.level for m in pool.members) / len(pool.members)
        a = pool.anchor.level
        events.append(SmcEvent(kind=LIQUIDITY, bar=pool.anchor.idx, confirmed_at=self._t, direction=pool.typ,
                               level=lv, top=a + pool.tol, bottom=a - pool.tol, ref=pool.members[-1].idx))

    def _liquidity_remove(self, s: _Swing) -> _Pool | None:
        """Undo a superseded swing's part in liquidity (it never was a swing of the reference);
        the pool it was a member of (not its own: a swing is superseded before any later swing
        of its kind can join it), if that pool had been reported."""
        pool = s.liq
        s.liq = None
        if pool is None:
            return None
        if pool.anchor is s:
            if pool in self._anchors:
                self._anchors.remove(pool)
            pool.swept_at = -2   # ignored by the sweep heap
            return None
        if s in pool.members:
            pool.members.remove(s)
            return pool
        return None

    def _sweeps(self, h: float, lo: float, events: list[SmcEvent]) -> None:
        t = self._t
        for typ, x in ((1, h), (-1, lo)):
            heap = self._sweep_heap[typ]
            while heap and heap[0][0] <= typ * x:
                _, _, pool = heapq.heappop(heap)
                if pool.swept_at != -1:
                    continue
                pool.swept_at = t
                if len(pool.members) > 1:
                    events.append(SmcEvent(kind=LIQUIDITY_SWEPT, bar=pool.anchor.idx, confirmed_at=t,
                                           direction=pool.typ, level=pool.anchor.level,
                                           top=pool.anchor.level + pool.tol,
                                           bottom=pool.anchor.level - pool.tol, ref=t))

    # ---- order blocks ----------------------------------------------------------------------
    def _ob_watch(self, s: _Swing) -> None:
        # the extreme of bars s+1 .. t-1 from the window; bar t joins in _order_blocks
        L = self.swing_length
        for k in range(1, L):
            self._ext_bar(s, -1 - L + k, s.idx + k)

    def _ext_bar(self, s: _Swing, pos: int, k: int) -> None:
        if s.typ == 1:
            x, other = self._lo[pos], self._hi[pos]
        else:
            x, other = self._hi[pos], self._lo[pos]
        if s.ext is None or s.typ * x <= s.typ * s.ext[0]:
            s.ext = (x, k, other)

    def _ob_source(self, typ: int, c: float) -> _Swing | None:
        """The swing the reference would take as the last swing of ``typ`` before this bar, if
        this close forms an order block from it."""
        sw = self._sw
        mine = [s for s in sw if s.typ == typ and s.idx > 0]
        if not mine:
            return None
        p = mine[-1]
        q = mine[-2] if len(mine) >= 2 else None

        def forms(s: _Swing | None) -> bool:
            return s is not None and not s.ob_crossed and typ * c > typ * s.level

        if not forms(p) and not forms(q):
            return None
        if p is sw[-1] and p.closed_beyond and self._pending_swing(-typ, p.idx, typ * math.inf) is None:
            # a close went beyond the newest swing and no counter-swing can separate them any
            # more: this leg will supersede it, and the reference never has it
            p = q
        return p if forms(p) else None

    def _order_blocks(self, o: float, h: float, lo: float, c: float, events: list[SmcEvent]) -> None:
        t = self._t
        keep: list[_Block] = []
        for b in self._blocks:
            if b.breaker:
                if (b.typ == 1 and h > b.top) or (b.typ == -1 and lo < b.bottom):
                    events.append(SmcEvent(kind=OB_INVALIDATED, bar=b.idx, confirmed_at=t, direction=b.typ,
                                           level=0.5 * (b.top + b.bottom), top=b.top, bottom=b.bottom, ref=t))
                    continue
            else:
                if b.typ == 1:
                    x = min(o, c) if self.close_mitigation else lo
                    hit = x < b.bottom
                else:
                    x = max(o, c) if self.close_mitigation else h
                    hit = x > b.top
                if hit:
                    b.breaker = True
                    events.append(SmcEvent(kind=OB_MITIGATED, bar=b.idx, confirmed_at=t, direction=b.typ,
                                           level=0.5 * (b.top + b.bottom), top=b.top, bottom=b.bottom, ref=t))
            keep.append(b)
        self._blocks = keep
        for s in self._sw:
            if s.idx > 0 and not s.closed_beyond and s.typ * c > s.typ * s.level:
                s.closed_beyond = True
        for typ in (1, -1):
            p = self._ob_source(typ, c)
            if p is None:
                continue
            # a swing of this kind may have been made since (not yet confirmed): the reference
            # compares with that one, which this close cannot pass; wait and see
            opp = [s.idx for s in self._sw if s.typ == -typ and s.idx > p.idx]
            if self._pending_swing(typ, max([p.idx, *opp]), -typ * math.inf, until=t - 1) is not None:
                continue
            p.ob_crossed = True
            ext = p.ext
            if ext is None:
                # no bar between the swing and this one (unreachable for swing_length >= 1)
                h1, l1 = self._h3[-2], self._l3[-2]
                idx, x, other = t - 1, (l1 if typ == 1 else h1), (h1 if typ == 1 else l1)
            else:
                x, idx, other = ext
            top, bot = (other, x) if typ == 1 else (x, other)
            vols = list(self._vol)
            v0 = vols[-1]
            v1 = vols[-2] if len(vols) >= 2 else 0.0
            v2 = vols[-3] if len(vols) >= 3 else 0.0
            near, far = v0 + v1, v2
            if near == math.inf:  # volumes near the float maximum: the ratio from scaled volumes
                k = max(v0, v1, v2)
                near, far = v0 / k + v1 / k, v2 / k
            mx = max(near, far)
            strength = min(near, far) / mx if mx != 0 else 1.0
            blk = _Block(idx, typ, top, bot)
            self._blocks.append(blk)
            if len(self._blocks) > _MAX_OPEN:
                del self._blocks[0]
                self.order_blocks_dropped += 1
            events.append(SmcEvent(kind=ORDER_BLOCK, bar=idx, confirmed_at=t, direction=typ,
                                   level=0.5 * (top + bot), top=top, bottom=bot, ref=t,
                                   volume=v0 + v1 + v2, strength=strength))
        # bar t joins each swing's extreme for the next bar
        for s in self._sw:
            if s.idx > 0:
                self._ext_bar(s, -1, t)


def ohlcv_arrays(bars: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(open, high, low, close, volume) float64 arrays from a DataFrame with OHLC(V) columns in
    any case, a ``BAR_DTYPE`` (or any structured) array with those fields, or an ``(n, 4|5)``
    array. A missing volume is zeros."""
    if hasattr(bars, "columns"):
        cols = {str(c).strip().lower(): c for c in bars.columns}
        missing = [k for k in ("open", "high", "low", "close") if k not in cols]
        if missing:
            raise ValueError(f"bars lack columns {missing}")
        get = [np.asarray(bars[cols[k]], dtype=np.float64) for k in ("open", "high", "low", "close")]
        vol = np.asarray(bars[cols["volume"]], dtype=np.float64) if "volume" in cols else np.zeros(len(bars))
        return get[0], get[1], get[2], get[3], vol
    a = np.asarray(bars)
    if a.dtype.names:
        names = {n.lower(): n for n in a.dtype.names}
        missing = [k for k in ("open", "high", "low", "close") if k not in names]
        if missing:
            raise ValueError(f"bars lack fields {missing}")
        cols5 = [np.asarray(a[names[k]], dtype=np.float64) for k in ("open", "high", "low", "close")]
        vol = np.asarray(a[names["volume"]], dtype=np.float64) if "volume" in names else np.zeros(len(a))
        return cols5[0], cols5[1], cols5[2], cols5[3], vol
    if a.ndim != 2 or a.shape[1] not in (4, 5):
        raise ValueError(f"expected an (n, 4) or (n, 5) OHLC[V] array, got shape {a.shape}")
    a = a.astype(np.float64)
    vol = a[:, 4] if a.shape[1] == 5 else np.zeros(len(a))
    return a[:, 0], a[:, 1], a[:, 2], a[:, 3], vol


def detect(bars: Any, swing_length: int = 50, **kwargs: Any) -> list[SmcEvent]:
    """Every event of a whole series, in emission order: one :class:`SmcDetector` fed bar by
    bar (``kwargs`` go to it). ``bars`` as for :func:`ohlcv_arrays`."""
    o, h, lo, c, v = ohlcv_arrays(bars)
    det = SmcDetector(swing_length, **kwargs)
    out: list[SmcEvent] = []
    for row in zip(o.tolist(), h.tolist(), lo.tolist(), c.tolist(), v.tolist()):
        out.extend(det.update(*row))
    return out


def swing_candidates(high: Sequence[float] | np.ndarray, low: Sequence[float] | np.ndarray,
                     swing_length: int) -> np.ndarray:
    """Vectorised raw swing test of every bar (before one-per-leg filtering): +1 where the high
    is the highest of bars ``i-L+1 .. i+L``, else -1 where the low is the lowest, else 0; 0 for
    bars before ``2L-1`` and the last ``L`` bars (not yet confirmed)."""
    from numpy.lib.stride_tricks import sliding_window_view

    hi = np.asarray(high, dtype=np.float64)
    lo = np.asarray(low, dtype=np.float64)
    if hi.ndim != 1 or hi.shape != lo.shape:
        raise ValueError(f"high and low must be 1-D and of one length, got {hi.shape} and {lo.shape}")
    L = check_int("swing_length", swing_length, 1, _MAX_SWING)
    n = len(hi)
    out = np.zeros(n, dtype=np.int8)
    if n < 3 * L:
        return out
    hmax = sliding_window_view(hi, 2 * L).max(axis=1)   # window starting at bar k: k .. k+2L-1
    lmin = sliding_window_view(lo, 2 * L).min(axis=1)
    idx = np.arange(2 * L - 1, n - L)
    wmax = hmax[idx - L + 1]
    wmin = lmin[idx - L + 1]
    is_hi = hi[idx] == wmax
    is_lo = ~is_hi & (lo[idx] == wmin)
    out[idx[is_hi]] = 1
    out[idx[is_lo]] = -1
    return out


def fvg_batch(open: np.ndarray, high: np.ndarray, low: np.ndarray, close: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised fair value gaps of a whole series: ``(direction, top, bottom, mitigated_at)``
    per bar (0 / NaN / -1 where none). The gaps are the detector's ``fvg`` events and the
    mitigation bars its ``fvg_mitigated`` events, except that this keeps every gap open: the
    detector gives up the farthest of more than 256 open gaps of one direction (counted in
    ``SmcDetector.fvgs_dropped``) and never reports their mitigation.

    Costs O(n log g) for ``n`` bars and ``g`` gaps open at once (one pass over the bars with
    the open gaps in heaps, as the detector keeps them). ValueError unless the four arrays are
    1-D and of one length.
    """
    arrs = [np.asarray(x, dtype=np.float64) for x in (open, high, low, close)]
    if any(a.ndim != 1 for a in arrs) or len({a.shape for a in arrs}) != 1:
        raise ValueError("open, high, low and close must be 1-D and of one length, got shapes "
                         + ", ".join(str(a.shape) for a in arrs))
    o, h, lo, c = arrs
    n = len(o)
    d = np.zeros(n, dtype=np.int8)
    top = np.full(n, np.nan)
    bot = np.full(n, np.nan)
    mit = np.full(n, -1, dtype=np.int64)
    if n < 3:
        return d, top, bot, mit
    m = np.arange(1, n - 1)
    bull = (h[m - 1] < lo[m + 1]) & (c[m] > o[m])
    bear = (lo[m - 1] > h[m + 1]) & (c[m] < o[m])
    d[m[bull]] = 1
    d[m[bear]] = -1
    top[m[bull]] = lo[m + 1][bull]
    bot[m[bull]] = h[m - 1][bull]
    top[m[bear]] = lo[m - 1][bear]
    bot[m[bear]] = h[m + 1][bear]
    # The gap of bar i is watched from bar i + 2 on: a bullish one until a low reaches its top,
    # a bearish one until a high reaches its bottom; heaps put the first to be reached on top.
    gaps = np.flatnonzero(d)
    if not len(gaps):
        return d, top, bot, mit
    dl, tl, bl, hl, ll = d.tolist(), top.tolist(), bot.tolist(), h.tolist(), lo.tolist()
    ups: list[tuple[float, int]] = []     # (-top, bar)
    downs: list[tuple[float, int]] = []   # (bottom, bar)
    out: dict[int, int] = {}
    for j in range(int(gaps[0]) + 1, n):
        x, y = ll[j], hl[j]
        while ups and -ups[0][0] >= x:
            out[heapq.heappop(ups)[1]] = j
        while downs and downs[0][0] <= y:
            out[heapq.heappop(downs)[1]] = j
        i = j - 1   # the gap confirmed at bar j (bar j - 1's) is watched from the next bar
        if dl[i] == 1:
            heapq.heappush(ups, (-tl[i], i))
        elif dl[i] == -1:
            heapq.heappush(downs, (bl[i], i))
    if out:
        k = np.fromiter(out.keys(), dtype=np.int64, count=len(out))
        mit[k] = np.fromiter(out.values(), dtype=np.int64, count=len(out))
    return d, top, bot, mit
