"""A tick feed driving an engine: ticks become bars for the agents and DSI evidence for their
``dsi`` feature and their signals.

Each batch of ticks is taken bar close by bar close. For every close time ``e`` among the bars
the batch finishes (:class:`~dynamic_core.ticks.TickAggregator`), in ascending order:

1. the batch's ticks before ``e`` that the DSI state has not seen update it (for each
   instrument the ticks up to its first one at or after ``e``: its own time order is kept);
2. the evidence :class:`~dynamic_core.learning.dsi.Dsi` then holds is set on the engine
   (:meth:`dynamic_core.Engine.set_dsi`, journaled with a journal) for every instrument it has
   seen ticks of and whose evidence changed;
3. the bars closing at ``e`` run through the engine: their agents read that evidence, their
   signals carry it (``SIGNAL_DTYPE['dsi']``, ``flags & dc.SIGNAL_DSI``).

The batch's remaining ticks then update the DSI state. So a bar's agents read the evidence of
every tick before its close and of none at or after it, however the feed is cut into batches
(the evidence is causal and does not lag). A journaled run replays bit-identically from the
journal alone, since the evidence is journaled where it changed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from ...records import SIGNAL_DTYPE
from ...ticks import TickAggregator, as_ticks
from .pipeline import Dsi

__all__ = ["TickDriver"]


class TickDriver:
    """Ticks -> bars -> ``engine.run``, each bar run with the DSI evidence of the ticks before its close.

    Parameters
    ----------
    engine : dynamic_core.Engine
        The engine the bars run through.
    timeframes : iterable of int or str, optional
        Bar timeframes to build (default: every timeframe the engine's population trades).
    dsi : Dsi, optional
        The DSI pipeline (default: a new ``Dsi`` over the engine's instruments); pass ``False``
        to drive bars only.
    aggregator : TickAggregator, optional
        Built from ``timeframes`` by default.

    Examples
    --------
    >>> drv = TickDriver(eng)                       # doctest: +SKIP
    >>> signals = drv.update(ticks)                 # SIGNAL_DTYPE, bars this batch finished
    >>> signals = drv.flush()                       # the open bars at the end of the feed
    """

    def __init__(self, engine: Any, timeframes: Iterable[int | str] | None = None, *, dsi: Dsi | bool | None = None,
                 aggregator: TickAggregator | None = None) -> None:
        self.engine = engine
        g = engine.population.records
        names = list(dict.fromkeys(int(i) for i in g["instrument"].tolist()))
        if aggregator is None:
            tfs = list(timeframes) if timeframes is not None else sorted({int(t) for t in g["timeframe"].tolist()})
            aggregator = TickAggregator(tfs, instruments=names)
        self.aggregator = aggregator
        if dsi is None or dsi is True:
            dsi = Dsi(names)
        self.dsi: Dsi | None = dsi or None
        self._last: dict[int, float] = {}
        self.evidence_sets = 0  # set_dsi calls made
        self.bars = 0

    def _set_evidence(self) -> None:
        if self.dsi is None:
            return
        changed = {}
        for i in self.dsi.seen():
            ev = self.dsi.evidence(i)
            if self._last.get(i) != ev:
                changed[i] = ev
        if changed:
            self.engine.set_dsi(changed)
            self._last.update(changed)
            self.evidence_sets += 1

    def _run(self, bars: np.ndarray) -> np.ndarray:
        if len(bars) == 0:
            return np.zeros(0, dtype=SIGNAL_DTYPE)
        self.bars += len(bars)
        return self.engine.run(bars)

    def update(self, ticks: np.ndarray) -> np.ndarray:
        """Take a batch of ticks (``TICK_DTYPE``, any interleaving of instruments, each in time
        order); return the signals of the bars it finished, in close-time order. Malformed ticks
        are refused and counted by the aggregator (``.aggregator.rejects``); the DSI pipeline
        takes only the ticks the aggregator took, so a refused tick (a time far ahead, say)
        changes neither the bars nor the evidence they run with."""
        t = as_ticks(ticks)
        bars = self.aggregator.update(t)
        if self.dsi is None:
            return self._run(bars)
        ok = self.aggregator.last_accepted
        if not ok.all():
            t = t[ok]
        if len(bars) == 0:
            self.dsi.update(t)
            return np.zeros(0, dtype=SIGNAL_DTYPE)
        # fits int64: the aggregator refuses (bad_timestamp) a tick whose bar would end past it
        ends = bars["ts"] + bars["timeframe"].astype(np.int64) * 1_000_000_000
        # ticks in order of the time their instrument has reached by them: those before a close
        # are a prefix of this order, and the next close only extends it
        reached = _running_max_by_instrument(t)
        order = np.argsort(reached, kind="stable")
        reached = reached[order]
        fed = 0
        out = []
        cuts = np.flatnonzero(np.diff(ends)) + 1  # bars come out ordered by close time
        for lo, hi in zip([0, *cuts.tolist()], [*cuts.tolist(), len(bars)]):
            upto = int(np.searchsorted(reached, ends[lo], side="left"))
            if upto > fed:
                self.dsi.update(t[np.sort(order[fed:upto])])  # in batch order
                fed = upto
            self._set_evidence()
            out.append(self._run(bars[lo:hi]))
        if fed < len(t):
            self.dsi.update(t[np.sort(order[fed:])])
        return np.concatenate(out)

    def flush(self) -> np.ndarray:
        """Finish the open bars (end of the feed) with the evidence of every tick seen."""
        self._set_evidence()
        return self._run(self.aggregator.flush())

    def close(self) -> None:
        if self.dsi is not None:
            self.dsi.close()


def _running_max_by_instrument(t: np.ndarray) -> np.ndarray:
    """Per tick: the largest ``ts`` of its instrument's ticks up to it (in batch order). The
    ticks of an instrument with this below a time ``e`` are a prefix of that instrument's ticks."""
    inst, ts = t["instrument"], t["ts"]
    out = np.empty_like(ts)
    for i in np.unique(inst).tolist():
        m = inst == i
        out[m] = np.maximum.accumulate(ts[m])
    return out
