"""System health: entropy per layer, migration bandwidth, resonance."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .config import LoRAConfig

if TYPE_CHECKING:
    from .layer import DynamicLoRALayer
    from .migration import MigrationCoordinator
    from .resonance import ResonanceEngine

__all__ = ["ACCEPTABLE", "AMNESIA_RISK", "CRYSTALLIZATION_RISK", "DEGRADED", "HEALTHY", "HealthMonitor"]

HEALTHY = "HEALTHY"
ACCEPTABLE = "ACCEPTABLE"
CRYSTALLIZATION_RISK = "CRYSTALLIZATION_RISK"
AMNESIA_RISK = "AMNESIA_RISK"
DEGRADED = "DEGRADED"


class HealthMonitor:
    """The design's three checks, with its thresholds (all in :class:`LoRAConfig`)."""

    def __init__(self, config: LoRAConfig | None = None) -> None:
        self.config = config if config is not None else LoRAConfig()

    @staticmethod
    def optimal_entropy(layer: DynamicLoRALayer) -> float:
        """Midpoint of the layer's entropy budget."""
        lo, hi = layer.entropy_budget
        return 0.5 * (lo + hi)

    def entropy_status(self, ratio: float) -> str:
        """Band of an entropy ratio: HEALTHY strictly inside (0.8, 1.2), CRYSTALLIZATION_RISK
        below 0.5, AMNESIA_RISK above 2.0, ACCEPTABLE otherwise (edges included)."""
        crys, lo, hi, amn = self.config.entropy_bands
        if lo < ratio < hi:
            return HEALTHY
        if ratio < crys:
            return CRYSTALLIZATION_RISK
        if ratio > amn:
            return AMNESIA_RISK
        return ACCEPTABLE

    def entropy_ratio(self, layer: DynamicLoRALayer) -> float:
        """Mean entropy over the layer's slots divided by the optimal entropy."""
        return float(layer.current_entropy.mean()) / self.optimal_entropy(layer)

    def check_entropy_health(self, layer: DynamicLoRALayer) -> str:
        """Status of the layer's entropy ratio."""
        return self.entropy_status(self.entropy_ratio(layer))

    def bandwidth_metrics(self, coordinator: MigrationCoordinator) -> dict[str, dict[str, float]]:
        """Queue depth, mean wait (ticks) and rejection rate per channel."""
        return {k: {"queue_depth": len(q.pending), "avg_wait_time": q.average_wait_time(),
                    "rejection_rate": q.rejection_rate} for k, q in coordinator.queues.items()}

    def check_bandwidth_health(self, coordinator: MigrationCoordinator) -> str:
        """HEALTHY iff every channel has depth < 10, mean wait < 5 and rejection rate < 0.01."""
        c = self.config
        ok = all(m["queue_depth"] < c.max_queue_depth and m["avg_wait_time"] < c.max_avg_wait
                 and m["rejection_rate"] < c.max_rejection_rate for m in self.bandwidth_metrics(coordinator).values())
        return HEALTHY if ok else DEGRADED

    def resonance_metrics(self, engine: ResonanceEngine) -> dict[str, float | None]:
        """Mean vertical alignment, fast-track rate (fast-tracked migration requests per
        request) and conflict rate (CONFLICT ticks per operation); None when undefined."""
        al = engine.collect_vertical_alignments()
        return {
            "mean_alignment": float(np.mean(al)) if al else None,
            "fast_track_rate": engine.fast_track_count / engine.total_migrations if engine.total_migrations else None,
            "conflict_rate": engine.conflict_count / engine.total_operations if engine.total_operations else None,
        }

    def check_resonance_health(self, engine: ResonanceEngine) -> str:
        """HEALTHY iff ``|mean alignment| > 0.1``, ``0.05 < fast-track rate < 0.20`` and
        ``conflict rate < 0.05``; a metric not yet defined (no operation, no migration) fails
        its condition: there is no signal to call healthy."""
        c = self.config
        m = self.resonance_metrics(engine)
        lo, hi = c.fast_track_band
        ok = (m["mean_alignment"] is not None and abs(m["mean_alignment"]) > c.min_alignment
              and m["fast_track_rate"] is not None and lo < m["fast_track_rate"] < hi
              and m["conflict_rate"] is not None and m["conflict_rate"] < c.max_conflict_rate)
        return HEALTHY if ok else DEGRADED

    def overall_health(self, system: Any) -> dict[str, Any]:
        """Every check over a hierarchy (anything with ``layers``, ``migration_coordinator``,
        ``resonance_engine`` and ``tick``): statuses, the metrics behind them, and the tick (not
        a wall-clock time: reports replay identically)."""
        layers = system.layers
        return {
            "entropy": {name: self.check_entropy_health(layer) for name, layer in layers.items()},
            "entropy_ratio": {name: self.entropy_ratio(layer) for name, layer in layers.items()},
            "bandwidth": self.check_bandwidth_health(system.migration_coordinator),
            "resonance": self.check_resonance_health(system.resonance_engine),
            "resonance_metrics": self.resonance_metrics(system.resonance_engine),
            "tick": int(system.tick),
        }
