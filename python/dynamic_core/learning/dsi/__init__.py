"""DSI: tick microstructure. MicroTape tokens (:mod:`.tape`), micro-experts (:mod:`.experts`),
log-odds fusion (:mod:`.fusion`) behind the :class:`Dsi` façade (:mod:`.pipeline`); a tick feed
driving an engine with its evidence (:class:`TickDriver`, :mod:`.driver`)."""

from __future__ import annotations

from .driver import TickDriver
from .experts import AbsorptionExpert, AnomalyScorer, Calls, DivergenceVerifier, NGramClassifier, RunExperts
from .fusion import DEFAULT_WEIGHTS, Contribution, DsiFusion
from .pipeline import EXPERTS, Dsi, DsiConfig
from .smc import SmcDetector, SmcEvent
from .tape import MicroTape, Tape, decode, encode, token_name

__all__ = [
    "DEFAULT_WEIGHTS",
    "EXPERTS",
    "AbsorptionExpert",
    "AnomalyScorer",
    "Calls",
    "Contribution",
    "DivergenceVerifier",
    "Dsi",
    "DsiConfig",
    "DsiFusion",
    "MicroTape",
    "NGramClassifier",
    "RunExperts",
    "SmcDetector",
    "SmcEvent",
    "Tape",
    "TickDriver",
    "decode",
    "encode",
    "token_name",
]
