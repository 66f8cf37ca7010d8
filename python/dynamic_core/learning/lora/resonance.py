"""Resonance: how gradients are weighted by agreement, across agents and across layers.

* Horizontal (swarm layer): each agent's contribution to the shared swarm gradient is weighted
  by its alignment ``a`` (cosine, in [-1, 1]) with the swarm's current direction:
  ``1 + alpha * a`` when ``a > 0`` (0.5), ``1 + beta * |a|`` otherwise (beta = -0.3). The
  design writes ``1 + beta * a``, which with a negative beta and a negative alignment would
  *amplify* conflicting gradients, against its own comment ("dampening for conflicting
  gradients"); the magnitude form does what the comment says. The design normalises only
  the direction; both sides are normalised here so factors stay within [0.7, 1.5].
* Vertical (context / agent / swarm): the mean of the three pairwise alignments decides
  FAST_TRACK (above ``vertical_threshold``: every gradient times
  ``min(1 + gamma * a, max_amplification)``), CONFLICT (below ``-conflict_threshold``: context
  times ``1 - delta * |a|``, agent times ``1 - delta / 2 * |a|``, swarm untouched) or NORMAL.
  What is compared is chosen by :class:`~dynamic_core.learning.lora.LoRAHierarchy`: each
  layer's first-order change of its effective map ``A @ B`` (dim x dim, a space every layer
  shares), see there.
"""

from __future__ import annotations

from collections import deque
from collections.abc import MutableMapping
from typing import Any

import numpy as np

from .layer import row_dot

__all__ = ["CONFLICT", "FAST_TRACK", "NORMAL", "HorizontalResonance", "ResonanceEngine", "VerticalResonance",
           "cosine"]

FAST_TRACK = "FAST_TRACK"
CONFLICT = "CONFLICT"
NORMAL = "NORMAL"


def cosine(x: np.ndarray, y: np.ndarray) -> float:
    """Normalised dot product of two arrays (flattened); 0 when either is zero."""
    x = np.ravel(x).astype(np.float64, copy=False)[None]
    y = np.ravel(y).astype(np.float64, copy=False)[None]
    # dot products in the native fixed order (a BLAS ddot's rounding changes with the CPU)
    nx, ny = float(np.sqrt(row_dot(x, x)[0])), float(np.sqrt(row_dot(y, y)[0]))
    if nx == 0.0 or ny == 0.0:
        return 0.0
    return float(np.clip(row_dot(x, y)[0] / (nx * ny), -1.0, 1.0))


class HorizontalResonance:
    """Weights agents' gradients by their alignment with the swarm direction.

    Parameters
    ----------
    alpha : float
        Amplification of aligned gradients (0.5).
    beta : float
        Dampening of conflicting ones (-0.3): factor ``1 + beta * |a|``.
    """

    def __init__(self, alpha: float = 0.5, beta: float = -0.3) -> None:
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.current_direction: tuple[np.ndarray, ...] | None = None

    def factor(self, alignment: np.ndarray | float, xp: Any = np) -> np.ndarray:
        """Resonance factor of an alignment (or an array of them, of module ``xp``)."""
        a = xp.asarray(alignment, dtype=xp.float64)
        return xp.where(a > 0.0, 1.0 + self.alpha * a, 1.0 + self.beta * xp.abs(a))

    def apply(self, new_gradient: np.ndarray, swarm_gradient_accumulator: np.ndarray) -> np.ndarray:
        """The design's single-gradient form: ``new_gradient`` times its factor against the
        direction (set from ``swarm_gradient_accumulator`` on first use)."""
        if self.current_direction is None:
            acc = np.asarray(swarm_gradient_accumulator, dtype=np.float64)
            n = float(np.linalg.norm(acc))
            self.current_direction = (acc / n if n > 0 else acc,)
        a = cosine(new_gradient, self.current_direction[0])
        return new_gradient * self.factor(a)

    def update_direction(self, gradient: tuple[np.ndarray, ...], decay: float) -> None:
        """Move the direction toward this tick's (unit) swarm gradient:
        ``normalise(decay * direction + (1 - decay) * unit(gradient))``."""
        g = [np.asarray(x, dtype=np.float64) for x in gradient]
        n = float(np.sqrt(sum(float(np.sum(x * x)) for x in g)))
        if n == 0.0:
            return
        unit = [x / n for x in g]
        if self.current_direction is None:
            self.current_direction = tuple(unit)
            return
        mix = [decay * d + (1.0 - decay) * u for d, u in zip(self.current_direction, unit)]
        m = float(np.sqrt(sum(float(np.sum(x * x)) for x in mix)))
        if m > 0.0:
            self.current_direction = tuple(x / m for x in mix)


class VerticalResonance:
    """Cross-layer interference between the context, agent and swarm gradients.

    Parameters
    ----------
    gamma : float
        Amplification coefficient (0.3).
    delta : float
        Dampening coefficient (0.2).
    max_amplification : float
        Cap on the amplification (2.0).
    vertical_threshold, conflict_threshold : float
        FAST_TRACK above ``vertical_threshold``, CONFLICT below ``-conflict_threshold``.
    """

    def __init__(self, gamma: float = 0.3, delta: float = 0.2, max_amplification: float = 2.0, *,
                 vertical_threshold: float = 0.5, conflict_threshold: float = 0.3) -> None:
        self.gamma = float(gamma)
        self.delta = float(delta)
        self.max_amp = float(max_amplification)
        self.vertical_threshold = float(vertical_threshold)
        self.conflict_threshold = float(conflict_threshold)

    def alignment(self, gradients: MutableMapping[str, np.ndarray]) -> float:
        """Mean of cos(context, agent), cos(agent, swarm), cos(context, swarm)."""
        c, a, s = gradients["context"], gradients["agent"], gradients["swarm"]
        return (cosine(c, a) + cosine(a, s) + cosine(c, s)) / 3.0

    def factors(self, vertical_alignment: float) -> tuple[dict[str, float], str]:
        """Per-layer multipliers and the signal for a given mean alignment."""
        v = float(vertical_alignment)
        if v > self.vertical_threshold:
            amp = min(1.0 + self.gamma * v, self.max_amp)
            return {"context": amp, "agent": amp, "swarm": amp}, FAST_TRACK
        if v < -self.conflict_threshold:
            return {"context": 1.0 - self.delta * abs(v), "agent": 1.0 - self.delta / 2.0 * abs(v),
                    "swarm": 1.0}, CONFLICT
        return {"context": 1.0, "agent": 1.0, "swarm": 1.0}, NORMAL

    def apply(self, gradients_dict: MutableMapping[str, np.ndarray],
              alignment: float | None = None) -> tuple[MutableMapping[str, np.ndarray], str]:
        """The design's form: scale the dict's gradients in place by :meth:`factors` of their
        alignment (or of ``alignment`` when given); returns the dict and the signal."""
        v = self.alignment(gradients_dict) if alignment is None else alignment
        f, signal = self.factors(v)
        for key, k in f.items():
            if k != 1.0:
                gradients_dict[key] = gradients_dict[key] * k
        return gradients_dict, signal


class ResonanceEngine:
    """Both resonances and the counters the health monitor reads.

    Attributes
    ----------
    fast_track_count : int
        Migration requests made while the signal was FAST_TRACK.
    total_migrations : int
        All migration requests.
    conflict_count : int
        Ticks whose signal was CONFLICT.
    total_operations : int
        Ticks on which vertical resonance ran (ticks with gradients).
    """

    def __init__(self, horizontal: HorizontalResonance, vertical: VerticalResonance, *, window: int = 1000) -> None:
        self.horizontal = horizontal
        self.vertical = vertical
        self.alignments: deque[float] = deque(maxlen=window)
        self.fast_track_count = 0
        self.total_migrations = 0
        self.conflict_count = 0
        self.fast_track_ticks = 0
        self.total_operations = 0
        self.last_signal = NORMAL

    def record(self, alignment: float, signal: str) -> None:
        """Count one vertical operation."""
        self.alignments.append(float(alignment))
        self.total_operations += 1
        self.conflict_count += signal == CONFLICT
        self.fast_track_ticks += signal == FAST_TRACK
        self.last_signal = signal

    def record_migrations(self, n: int, fast_track: bool) -> None:
        """Count ``n`` migration requests."""
        self.total_migrations += n
        if fast_track:
            self.fast_track_count += n

    def collect_vertical_alignments(self) -> list[float]:
        """The recent vertical alignments (up to the window)."""
        return list(self.alignments)
