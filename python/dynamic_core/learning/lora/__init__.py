"""DynamicLoRA: a five-layer LoRA hierarchy (foundation, domain, swarm shared; agent, context per
agent) with emergent inertia, per-parameter phase dynamics, circuit migration under bandwidth
limits, horizontal and vertical resonance, and health monitoring. numpy with native kernels for
the per-agent passes; CuPy when the arrays live on a GPU (``xp="cupy"``).

::

    h = LoRAHierarchy(n_agents, dim)
    snap = h.snapshot()                  # frozen weights (Variant A inference)
    scores = h.score(x, snap)            # (n_agents,) in (-1, 1)
    h.learn(x, target, snap, mask=mask)  # accumulate gradients
    report = h.system_tick()             # apply them and run the maintenance step

    g = LoRAHierarchy(n_agents, dim, xp="cupy")  # every array on the current GPU
    g.learn(x, target, g.snapshot())             # x: numpy (uploaded) or CuPy
"""

from __future__ import annotations

from .backend import LoRABackend
from .circuits import Circuit, CircuitDetector
from .config import AGENT_LAYERS, CHANNELS, LAYERS, SHARED_LAYERS, LoRAConfig
from .health import ACCEPTABLE, AMNESIA_RISK, CRYSTALLIZATION_RISK, DEGRADED, HEALTHY, HealthMonitor
from .hierarchy import LoRAHierarchy, LoRASnapshot
from .layer import FREE, SCREENED, DynamicLoRALayer, LayerGradient
from .migration import MigrationCoordinator, MigrationQueue, Transfer
from .resonance import CONFLICT, FAST_TRACK, NORMAL, HorizontalResonance, ResonanceEngine, VerticalResonance

__all__ = [
    "ACCEPTABLE",
    "AGENT_LAYERS",
    "AMNESIA_RISK",
    "CHANNELS",
    "CONFLICT",
    "CRYSTALLIZATION_RISK",
    "DEGRADED",
    "FAST_TRACK",
    "FREE",
    "HEALTHY",
    "LAYERS",
    "NORMAL",
    "SCREENED",
    "SHARED_LAYERS",
    "Circuit",
    "CircuitDetector",
    "DynamicLoRALayer",
    "HealthMonitor",
    "HorizontalResonance",
    "LayerGradient",
    "LoRABackend",
    "LoRAConfig",
    "LoRAHierarchy",
    "LoRASnapshot",
    "MigrationCoordinator",
    "MigrationQueue",
    "ResonanceEngine",
    "Transfer",
    "VerticalResonance",
]
