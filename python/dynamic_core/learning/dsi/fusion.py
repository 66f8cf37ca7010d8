"""Bayesian (log-odds) fusion of the micro-experts' calls into one evidence value per instrument.

Each expert ``e`` is read as a test with likelihood ratio ``exp(w_e)``: a call with sign ``s``
adds ``s * w_e`` to the log-odds that the next moves go up rather than down (``w_e = log(p /
(1 - p))`` for an expert right with probability ``p``). Calls are independent observations, so
their log-odds add; older calls fade by ``0.5 ** (age / half_life)`` (age in ticks), and a call
on a tick flagged by the spread anomaly counts ``spread_damp`` times. The sequence classifier's
current log-odds is added with weight ``w_sequence``. The evidence is
``tanh(L / 2) = P(up) - P(down)`` in [-1, 1].

Contributions are kept per expert and per MicroTape token (the token of the tick each call was
made on), so the evidence comes with the tokens and experts that moved it most.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ._scan import check_real
from .experts import Calls
from .tape import N_TOKENS, token_name

__all__ = ["DEFAULT_WEIGHTS", "MAX_WEIGHT", "Contribution", "DsiFusion", "FusionState"]

MAX_WEIGHT = 1e6
"""Largest |weight| (a log likelihood ratio; real experts are below 10)."""

DEFAULT_WEIGHTS: dict[str, float] = {
    "momentum": math.log(0.6 / 0.4),
    "exhaustion": math.log(0.6 / 0.4),
    "sweep": math.log(0.62 / 0.38),
    "absorption": math.log(0.6 / 0.4),
    "volume_anomaly": math.log(0.55 / 0.45),
    "return_anomaly": math.log(0.55 / 0.45),
    "rsi_divergence": math.log(0.57 / 0.43),
    "macd_divergence": math.log(0.57 / 0.43),
    "sequence": 1.0,
}
"""Log likelihood ratios of the experts' calls (``sequence``: weight of the classifier's log-odds)."""


@dataclass(frozen=True, slots=True)
class Contribution:
    """One line of an evidence breakdown: what (``kind`` ``"token"`` or ``"expert"``), its name,
    and the log-odds it currently adds (positive: up)."""

    kind: str
    name: str
    log_odds: float


class FusionState:
    """One instrument's fused log-odds, broken down by expert and by token."""

    __slots__ = ("by_expert", "by_token", "calls", "last_token", "sequence", "sequence_context", "ticks")

    def __init__(self, n_experts: int) -> None:
        self.by_expert = np.zeros(n_experts)
        self.by_token = np.zeros(N_TOKENS)
        self.last_token = np.full(n_experts, -1, dtype=np.int64)
        self.calls = np.zeros(n_experts, dtype=np.int64)
        self.sequence = 0.0  # the classifier's current log-odds (weighted)
        self.sequence_context = ""
        self.ticks = 0


class DsiFusion:
    """Log-odds fusion of named experts' calls.

    Parameters
    ----------
    experts : sequence of str
        Names of the directional experts, in a fixed order.
    weights : dict, optional
        Log likelihood ratio per expert (and ``"sequence"``); missing names take
        :data:`DEFAULT_WEIGHTS` (or ``log(0.6/0.4)``).
    half_life : float
        Ticks after which a call counts half (finite, > 0).
    spread_damp : float
        Factor on calls made on ticks flagged ``spread_anomaly``, in [0, 1].

    Weights are finite and at most :data:`MAX_WEIGHT` in size, so the fused log-odds stay
    finite and the evidence in [-1, 1].
    """

    def __init__(self, experts: tuple[str, ...] | list[str], *, weights: dict[str, float] | None = None,
                 half_life: float = 200.0, spread_damp: float = 0.5) -> None:
        half_life = check_real("half_life", half_life, 0.0, lo_open=True)
        spread_damp = check_real("spread_damp", spread_damp, 0.0, 1.0)
        self.experts = tuple(experts)
        self._index = {e: i for i, e in enumerate(self.experts)}
        w = dict(DEFAULT_WEIGHTS)
        w.update(weights or {})
        unknown = set(weights or {}) - set(self.experts) - {"sequence"}
        if unknown:
            raise ValueError(f"weights for unknown experts: {sorted(unknown, key=str)}")
        for name, v in (weights or {}).items():  # a NaN or infinite weight makes the evidence NaN
            check_real(f"weights[{name!r}]", v, -MAX_WEIGHT, MAX_WEIGHT)
        self.weights = np.array([w.get(e, math.log(0.6 / 0.4)) for e in self.experts])
        self.w_sequence = float(w["sequence"])
        self.half_life = float(half_life)
        self.decay = 0.5 ** (1.0 / self.half_life)
        self.spread_damp = float(spread_damp)
        self._pow = np.ones(1)

    def new_state(self) -> FusionState:
        return FusionState(len(self.experts))

    def _age_weights(self, n: int) -> np.ndarray:
        """``decay ** (n - 1 - t)`` for t = 0..n-1, indexable by age."""
        if len(self._pow) < n:
            self._pow = np.power(self.decay, np.arange(max(n, 2 * len(self._pow)), dtype=np.float64))
        return self._pow

    def fuse(self, state: FusionState, n: int, calls: dict[str, Calls], tokens: np.ndarray,
             damped: np.ndarray | None = None, sequence: float = 0.0, sequence_context: str = "") -> None:
        """Fold a batch of ``n`` ticks' calls into ``state``.

        ``tokens`` are the batch's MicroTape tokens; ``damped`` flags ticks whose calls count
        ``spread_damp`` times; ``sequence`` is the classifier's log-odds after the batch.
        """
        if n <= 0:
            return
        fade = self.decay ** n
        state.by_expert *= fade
        state.by_token *= fade
        age = self._age_weights(n)
        idx_all, val_all = [], []
        for name, c in calls.items():
            e = self._index.get(name)
            if e is None or len(c.index) == 0:
                continue
            v = (self.weights[e] * age[n - 1 - c.index]) * c.sign
            if damped is not None:
                v = np.where(damped[c.index], v * self.spread_damp, v)
            state.by_expert[e] += v.sum()
            state.calls[e] += len(c.index)
            state.last_token[e] = tokens[c.index[-1]]
            idx_all.append(c.index)
            val_all.append(v)
        if idx_all:
            idx = np.concatenate(idx_all)
            state.by_token += np.bincount(tokens[idx], weights=np.concatenate(val_all), minlength=N_TOKENS)
        state.sequence = self.w_sequence * sequence
        state.sequence_context = sequence_context
        state.ticks += n

    @staticmethod
    def log_odds(state: FusionState) -> float:
        return float(state.by_expert.sum() + state.sequence)

    @classmethod
    def evidence(cls, state: FusionState) -> float:
        """``tanh(L / 2)``: P(up) - P(down) under the fused log-odds ``L``; in [-1, 1]."""
        return math.tanh(0.5 * cls.log_odds(state))

    def top(self, state: FusionState, k: int = 5, by: str = "token") -> list[Contribution]:
        """The ``k`` largest contributions by absolute log-odds, ``by`` ``"token"`` (the
        sequence classifier's context counts as one) or ``"expert"``."""
        if by == "token":
            rows = [Contribution("token", token_name(t), float(v)) for t, v in enumerate(state.by_token) if v != 0]
            if state.sequence != 0:
                rows.append(Contribution("token", f"sequence:{state.sequence_context}", float(state.sequence)))
        elif by == "expert":
            rows = [Contribution("expert", e, float(v)) for e, v in zip(self.experts, state.by_expert) if v != 0]
            if state.sequence != 0:
                rows.append(Contribution("expert", "sequence", float(state.sequence)))
        else:
            raise ValueError("by must be 'token' or 'expert'")
        rows.sort(key=lambda c: (-abs(c.log_odds), c.name))
        return rows[:max(0, int(k))]
