"""DSI: tick microstructure. MicroTape tokens (:mod:`.tape`), micro-experts (:mod:`.experts`),
log-odds fusion (:mod:`.fusion`) behind the :class:`Dsi` façade (:mod:`.pipeline`)."""

from __future__ import annotations

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
    "decode",
    "encode",
    "token_name",
]
