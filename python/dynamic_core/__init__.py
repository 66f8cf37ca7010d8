"""dynamic_core: thousands to millions of trading micro-agents, fused into consensus signals.

Quick start::

    import dynamic_core as dc
    sim = dc.sim.MarketSimulator(["EURUSD", "GBPUSD"], timeframe="H1", seed=1)
    bars = sim.bars(2000)
    pop = dc.Population.random(10_000, instruments=["EURUSD", "GBPUSD"], timeframes=["H1"], seed=7)
    eng = dc.Engine(pop)
    signals = eng.run(bars)
"""

from __future__ import annotations

from . import _launch

try:  # a ^C while the command line imports the package: one line, exit 130 (see _launch)
    from . import decision, errors, indicators, journal, market, payloads, sim, transport
    from .engine import Engine
    from .payloads import AISignal
    from .instruments import InstrumentRegistry, instruments
    from .population import Population
    from .records import (
        AGENT_DTYPE,
        BAR_DTYPE,
        DEAD_LETTER_DTYPE,
        GENOME_DTYPE,
        MAX_PRICE,
        MIN_PRICE,
        REASONS,
        SIGNAL_DSI,
        SIGNAL_DTYPE,
        TICK_DTYPE,
        Action,
        score_to_action,
    )
except KeyboardInterrupt:
    _launch.interrupted()
    raise

__version__ = "0.1.0"

__all__ = [
    "AGENT_DTYPE",
    "AISignal",
    "BAR_DTYPE",
    "DEAD_LETTER_DTYPE",
    "GENOME_DTYPE",
    "MAX_PRICE",
    "MIN_PRICE",
    "REASONS",
    "SIGNAL_DSI",
    "SIGNAL_DTYPE",
    "TICK_DTYPE",
    "Action",
    "Engine",
    "InstrumentRegistry",
    "Population",
    "__version__",
    "decision",
    "errors",
    "indicators",
    "instruments",
    "journal",
    "market",
    "payloads",
    "score_to_action",
    "sim",
    "transport",
]
