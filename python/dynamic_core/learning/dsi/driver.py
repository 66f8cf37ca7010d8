"""A tick feed driving an engine: ticks become bars for the agents and DSI evidence for their
``dsi`` feature and their signals.

Each batch of ticks goes, in this order:

1. the evidence :class:`~dynamic_core.learning.dsi.Dsi` holds from the *earlier* batches is set
   on the engine (:meth:`dynamic_core.Engine.set_dsi`, journaled with a journal) for every
   instrument it has seen ticks of and whose evidence changed;
2. the bars the batch finishes (:class:`~dynamic_core.ticks.TickAggregator`) run through the
   engine: their agents read that evidence, their signals carry it (``SIGNAL_DTYPE['dsi']``,
   ``flags & dc.SIGNAL_DSI``);
3. the batch's ticks update the DSI state.

So a bar never sees evidence from ticks that came after the batch that finished it (the
evidence is causal), at the price of lagging the bar's own last ticks by up to one batch:
smaller batches give fresher evidence. A journaled run replays bit-identically from the journal
alone, since the evidence is journaled where it changed.
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
    """Ticks -> bars -> ``engine.run`` with DSI evidence set before each batch's bars.

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
        order); return the signals of the bars it finished. Malformed ticks are refused and
        counted by the aggregator and the DSI pipeline (``.aggregator.rejects``)."""
        t = as_ticks(ticks)
        self._set_evidence()
        sig = self._run(self.aggregator.update(t))
        if self.dsi is not None:
            self.dsi.update(t)
        return sig

    def flush(self) -> np.ndarray:
        """Finish the open bars (end of the feed) with the evidence of every tick seen."""
        self._set_evidence()
        return self._run(self.aggregator.flush())

    def close(self) -> None:
        if self.dsi is not None:
            self.dsi.close()
