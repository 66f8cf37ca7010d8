"""Immutable, versioned payloads for everything that leaves the engine (msgspec Structs)."""

from __future__ import annotations

import msgspec
import numpy as np

from .instruments import instruments

__all__ = ["PAYLOAD_VERSION", "AISignal", "signal_from_record"]

PAYLOAD_VERSION = 1


class AISignal(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True,
               tag="signal"):
    """One fused consensus signal for an (instrument, timeframe, bar).

    ``action`` is an :class:`dynamic_core.Action` value (-2 STRONG_SELL .. 2 STRONG_BUY);
    ``votes`` counts warm agents per action in that order. ``seq`` is the ingress sequence
    number of the bar and, with ``population_hash``, identifies the signal across processes.
    """

    version: int = PAYLOAD_VERSION
    ts: int  # bar timestamp, ns since the epoch
    instrument: str
    timeframe: int  # seconds
    seq: int
    population_hash: int
    score: float
    confidence: float
    agreement: float
    dispersion: float
    action: int
    n_agents: int
    votes: tuple[int, int, int, int, int]
    flags: int = 0

    @property
    def id(self) -> str:
        """Stable signal id: population hash and sequence number."""
        return f"{self.population_hash:016x}:{self.seq}"


def signal_from_record(r: np.void) -> AISignal:
    """``SIGNAL_DTYPE`` record -> :class:`AISignal`."""
    return AISignal(
        ts=int(r["ts"]), instrument=instruments.name(int(r["instrument"])),
        timeframe=int(r["timeframe"]), seq=int(r["seq"]),
        population_hash=int(r["population_hash"]), score=float(r["score"]),
        confidence=float(r["confidence"]), agreement=float(r["agreement"]),
        dispersion=float(r["dispersion"]), action=int(r["action"]), n_agents=int(r["n_agents"]),
        votes=tuple(int(v) for v in r["votes"]), flags=int(r["flags"]),
    )
