"""The engine: a population run over market data, producing fused signals."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _core
from .errors import InvalidInput
from .instruments import instruments
from .market import as_bars
from .population import Population
from .records import AGENT_DTYPE, DEAD_LETTER_DTYPE, REASONS, SIGNAL_DTYPE

__all__ = ["Engine"]


class Engine:
    """Runs a :class:`Population` over bars and fuses the agents into one signal per
    (instrument, timeframe, bar).

    Parameters
    ----------
    population : Population
        The agents. Their layout into warps of 32 lanes and SMs depends only on the population
        and ``cores_per_sm``.
    cores_per_sm : int
        Lanes per streaming multiprocessor: 32, 64, 96 or 128.
    strict : bool
        When True, ``run`` raises :class:`dynamic_core.errors.InvalidInput` for a batch holding any
        bad bar and processes none of it. When False (default) bad bars are rejected with a
        reason, counted in ``stats()`` and kept in ``dead_letters()``, and the rest runs.
    dead_letter_capacity : int
        How many rejected bars are kept (the newest); older ones are counted as dropped.

    Examples
    --------
    >>> pop = dc.Population.grid("EURUSD", "H1", fast=[5, 10, 20], slow=[50, 100])
    >>> eng = dc.Engine(pop)
    >>> signals = eng.run(bars)          # SIGNAL_DTYPE, one per bar
    >>> eng.agents()[["agent_id", "equity", "sharpe"]]
    """

    def __init__(self, population: Population, *, cores_per_sm: int = 128, strict: bool = False,
                 dead_letter_capacity: int = 10_000, block_bars: int = 0) -> None:
        if not isinstance(population, Population):
            raise TypeError(f"expected a dc.Population, got {type(population).__name__}")
        if cores_per_sm not in (32, 64, 96, 128):
            raise ValueError(f"cores_per_sm must be 32, 64, 96 or 128, got {cores_per_sm!r}")
        if not 0 <= dead_letter_capacity <= 10_000_000:
            raise ValueError("dead_letter_capacity must be in [0, 10M]")
        self._pop = population
        self.strict = bool(strict)
        self._native = _core.Engine(population.records, cores_per_sm=cores_per_sm,
                                    population_hash=population.hash,
                                    dead_letter_capacity=dead_letter_capacity, block_bars=block_bars)

    @property
    def population(self) -> Population:
        return self._pop

    def run(self, bars: np.ndarray, *, strict: bool | None = None) -> np.ndarray:
        """Process a time-ordered ``BAR_DTYPE`` batch (instruments may be mixed).

        Returns a ``SIGNAL_DTYPE`` array: one signal per accepted bar of a followed
        (instrument, timeframe), in input order. State carries over between calls, so a long
        history can be fed in pieces. The GIL is released while the batch runs.
        """
        b = as_bars(bars)
        if self.strict if strict is None else strict:
            reasons = self._native.validate(b, len(instruments))
            bad = np.flatnonzero(reasons)
            if len(bad):
                names = [REASONS[int(r)] for r in reasons[bad]]
                shown = ", ".join(f"row {int(i)}: {n}" for i, n in zip(bad[:10], names[:10]))
                more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
                raise InvalidInput(f"{len(bad)} bad bar(s), batch not processed: {shown}{more}",
                                   rows=bad.tolist(), reasons=names)
        return self._native.run(b, len(instruments)).view(SIGNAL_DTYPE)

    def validate(self, bars: np.ndarray) -> np.ndarray:
        """Reason code per bar that ``run`` would give now (0 = accepted), changing nothing."""
        return self._native.validate(as_bars(bars), len(instruments))

    def agents(self) -> np.ndarray:
        """Per-agent state in population order (``AGENT_DTYPE``): score, action, position,
        equity, trades, wins, Sharpe, max drawdown, quarantined, ..."""
        return self._native.agents().view(AGENT_DTYPE)

    def dead_letters(self) -> np.ndarray:
        """Rejected bars with batch index and reason code (``DEAD_LETTER_DTYPE``), oldest first."""
        return self._native.dead_letters().view(DEAD_LETTER_DTYPE)

    def stats(self) -> dict[str, Any]:
        """Counters: bars in/accepted/rejected (by reason)/skipped, signals, agent updates and
        agent-updates/s of the time spent in ``run``, quarantined agents, warps, SMs, occupancy."""
        s = self._native.stats()
        lay = self._native.layout()
        s.update(
            n_agents=lay["n_agents"],
            n_warps=lay["n_warps"],
            n_sms=lay["n_sms"],
            n_streams=lay["n_streams"],
            warp_occupancy=lay["n_agents"] / lay["n_lanes"] if lay["n_lanes"] else 0.0,
        )
        return s

    def layout(self) -> dict[str, Any]:
        """How the population was cut into streams, SMs and warps, with each SM's bank size."""
        return self._native.layout()

    def __repr__(self) -> str:
        lay = self._native.layout()
        return (f"Engine({lay['n_agents']} agents, {lay['n_warps']} warps, {lay['n_sms']} SMs, "
                f"{lay['n_streams']} streams)")
