"""Bayesian (log-odds) fusion of the micro-experts' calls into one evidence value per instrument.

Each expert ``e`` is read as a test with likelihood ratio ``exp(w_e)``: a call with sign ``s``
adds ``s * w_e`` to the log-odds that the next moves go up rather than down (``w_e = log(p /
(1 - p))`` for an expert right with probability ``p``). Calls are independent observations, so
their log-odds add; older calls fade by ``0.5 ** (age / half_life)`` (age in ticks), and a call
on a tick flagged by the spread anomaly counts ``spread_damp`` times. The sequence classifier's
current log-odds is added with weight ``w_sequence``. The evidence is
``tanh(L / 2) = P(up) - P(down)`` in [-1, 1].

Contributions are kept per expert and per MicroTape token (the token of the tick each call was
made on), so the evidence comes with the tokens and experts that moved it most. They are
bit-identical however the tick feed is cut into batches (and on any thread count): decay is
applied over fixed blocks of ticks at absolute positions, with one decay table and sums in a
canonical order (see :class:`FusionState`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ... import detmath
from ._scan import check_int, check_real
from .experts import Calls
from .tape import N_TOKENS, token_name

__all__ = ["BLOCK", "DEFAULT_WEIGHTS", "MAX_WEIGHT", "Contribution", "DsiFusion", "FusionState"]

MAX_WEIGHT = 1e6
"""Largest |weight| (a log likelihood ratio; real experts are below 10)."""

DEFAULT_WEIGHTS: dict[str, float] = {
    "momentum": detmath.log(0.6 / 0.4),
    "exhaustion": detmath.log(0.6 / 0.4),
    "sweep": detmath.log(0.62 / 0.38),
    "absorption": detmath.log(0.6 / 0.4),
    "volume_anomaly": detmath.log(0.55 / 0.45),
    "return_anomaly": detmath.log(0.55 / 0.45),
    "rsi_divergence": detmath.log(0.57 / 0.43),
    "macd_divergence": detmath.log(0.57 / 0.43),
    "sequence": 1.0,
}
"""Log likelihood ratios of the experts' calls (``sequence``: weight of the classifier's log-odds)."""


def check_top(k: object, by: object) -> int:
    """The arguments of :meth:`DsiFusion.top`: ``k`` as an int >= 0, ``by`` one of the two."""
    if by not in ("token", "expert"):
        raise ValueError(f"by must be 'token' or 'expert', got {by!r}")
    return check_int("k", k, 0, 2**31 - 1)


@dataclass(frozen=True, slots=True)
class Contribution:
    """One line of an evidence breakdown: what (``kind`` ``"token"`` or ``"expert"``), its name,
    and the log-odds it currently adds (positive: up)."""

    kind: str
    name: str
    log_odds: float


BLOCK = 4096
"""Default block length (ticks) of the fusion's fixed decay blocks (see :class:`FusionState`)."""

_EMPTY_I = np.zeros(0, dtype=np.int64)
_EMPTY_F = np.zeros(0, dtype=np.float64)


class FusionState:
    """One instrument's fused log-odds, broken down by expert and by token.

    The contributions are kept so that their bits do not depend on how the tick feed was cut
    into batches: an instrument's ticks are cut into fixed blocks of ``B`` ticks at absolute
    positions (ticks ``0..B-1``, ``B..2B-1``, ...). The state holds the contributions as of the
    end of the last complete block (``_s_expert``, ``_s_token``) and the calls of the current,
    incomplete block (``_p_*``: absolute tick, expert, token, log-odds before decay; in (tick,
    expert) order, so fewer than ``B`` ticks' calls). A completed block ending at tick ``end``
    folds in as ``S = S * D[B] + C``, where ``C`` sums, with ``np.bincount`` (sequential, in
    (tick, expert) order), each call's value times ``D[end - 1 - tick]``; reading at tick count
    ``N`` gives ``S * D[N - end] + `` the pending calls times ``D[N - 1 - tick]``. ``D =
    0.5 ** (arange(B + 1) / half_life)`` is one table per :class:`DsiFusion`. So every
    operation, its operands and its order are fixed by the absolute tick positions alone.

    ``by_expert``, ``by_token`` (read-only arrays) and the log-odds are computed on first read
    after an update and cached.
    """

    __slots__ = ("_p_expert", "_p_tick", "_p_token", "_p_value", "_s_expert", "_s_token", "_table", "_view",
                 "calls", "last_token", "sequence", "sequence_context", "ticks")

    def __init__(self, n_experts: int, table: np.ndarray) -> None:
        self._table = table  # D (shared with the DsiFusion; never written)
        self._s_expert = np.zeros(n_experts)
        self._s_token = np.zeros(N_TOKENS)
        self._p_tick = self._p_expert = self._p_token = _EMPTY_I
        self._p_value = _EMPTY_F
        self._view: tuple[np.ndarray, np.ndarray, float] | None = None
        self.last_token = np.full(n_experts, -1, dtype=np.int64)
        self.calls = np.zeros(n_experts, dtype=np.int64)
        self.sequence = 0.0  # the classifier's current log-odds (weighted)
        self.sequence_context = ""
        self.ticks = 0

    def _contributions(self) -> tuple[np.ndarray, np.ndarray, float]:
        if self._view is None:
            d = self._table
            n = self.ticks
            fade = d[n % (len(d) - 1)]  # D[N - end]
            w = self._p_value * d[(n - 1) - self._p_tick]
            by_expert = self._s_expert * fade + np.bincount(self._p_expert, weights=w,
                                                            minlength=len(self._s_expert))
            by_token = self._s_token * fade + np.bincount(self._p_token, weights=w, minlength=N_TOKENS)
            by_expert.flags.writeable = False
            by_token.flags.writeable = False
            # fsum: the exactly rounded sum, whatever numpy's reduction order
            self._view = (by_expert, by_token, math.fsum((*by_expert.tolist(), self.sequence)))
        return self._view

    @property
    def by_expert(self) -> np.ndarray:
        """Log-odds each expert currently adds (read-only)."""
        return self._contributions()[0]

    @property
    def by_token(self) -> np.ndarray:
        """Log-odds the calls made on each MicroTape token currently add (read-only)."""
        return self._contributions()[1]


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
    block : int
        Length in ticks of the fixed decay blocks (see :class:`FusionState`), in [1, 2**20];
        the results' last bits depend on it, never on how the feed is batched.

    Weights are finite and at most :data:`MAX_WEIGHT` in size, so the fused log-odds stay
    finite and the evidence in [-1, 1]. A tiny ``half_life`` makes old calls' weights
    underflow to 0, which is exact and deterministic.
    """

    def __init__(self, experts: tuple[str, ...] | list[str], *, weights: dict[str, float] | None = None,
                 half_life: float = 200.0, spread_damp: float = 0.5, block: int = BLOCK) -> None:
        half_life = check_real("half_life", half_life, 0.0, lo_open=True)
        spread_damp = check_real("spread_damp", spread_damp, 0.0, 1.0)
        block = check_int("block", block, 1, 1 << 20)
        self.experts = tuple(experts)
        self._index = {e: i for i, e in enumerate(self.experts)}
        w = dict(DEFAULT_WEIGHTS)
        w.update(weights or {})
        unknown = set(weights or {}) - set(self.experts) - {"sequence"}
        if unknown:
            raise ValueError(f"weights for unknown experts: {sorted(unknown, key=str)}")
        for name, v in (weights or {}).items():  # a NaN or infinite weight makes the evidence NaN
            check_real(f"weights[{name!r}]", v, -MAX_WEIGHT, MAX_WEIGHT)
        self.weights = np.array([w.get(e, detmath.log(0.6 / 0.4)) for e in self.experts])
        self.w_sequence = float(w["sequence"])
        self.half_life = float(half_life)
        self.spread_damp = float(spread_damp)
        self.block = block
        # D[k] = 0.5 ** (k / half_life) = 2 ** -(k / half_life), k = 0..block: one table, so its bits
        # never depend on a batch, and detmath's, so they do not depend on the machine (numpy's
        # power differs in the last bit between CPUs)
        self._table = detmath.exp2(-(np.arange(block + 1, dtype=np.float64) / self.half_life))
        self._table.flags.writeable = False
        self.decay = float(self._table[1])  # a tick's fade

    def new_state(self) -> FusionState:
        return FusionState(len(self.experts), self._table)

    def fuse(self, state: FusionState, n: int, calls: dict[str, Calls], tokens: np.ndarray,
             damped: np.ndarray | None = None, sequence: float = 0.0, sequence_context: str = "") -> None:
        """Fold a batch of ``n`` ticks' calls into ``state``.

        ``tokens`` are the batch's MicroTape tokens; ``damped`` flags ticks whose calls count
        ``spread_damp`` times; ``sequence`` is the classifier's log-odds after the batch. The
        resulting contributions are bit-identical however the ticks are cut into batches.
        """
        if n <= 0:
            return
        n_exp = len(self.experts)
        present, idx_all, sign_all = [], [], []
        for name, c in calls.items():
            e = self._index.get(name)
            if e is None or len(c.index) == 0:
                continue
            state.last_token[e] = tokens[c.index[-1]]
            present.append(e)
            idx_all.append(c.index)
            sign_all.append(c.sign)
        t0 = state.ticks
        if present:
            lens = [len(i) for i in idx_all]
            exp = np.repeat(np.array(present, dtype=np.int64), lens)
            key = np.concatenate(idx_all).astype(np.int64, copy=False) * n_exp + exp
            order = np.argsort(key, kind="stable")  # (tick, expert): the canonical order
            idx = key[order] // n_exp
            exp = exp[order]
            val = self.weights[exp] * np.concatenate(sign_all)[order]  # log-odds before decay
            if damped is not None:
                val = np.where(damped[idx], val * self.spread_damp, val)
            tok = tokens[idx].astype(np.int64)
            tick = idx + t0
            state.calls += np.bincount(exp, minlength=n_exp)
        else:
            tick = exp = tok = _EMPTY_I
            val = _EMPTY_F
        self._take(state, t0 + n, tick, exp, tok, val)
        state.sequence = self.w_sequence * sequence
        state.sequence_context = sequence_context
        state.ticks = t0 + n
        state._view = None

    def _take(self, state: FusionState, n_end: int, tick: np.ndarray, exp: np.ndarray, tok: np.ndarray,
              val: np.ndarray) -> None:
        """Add calls (absolute ticks, after the pending ones, in (tick, expert) order) up to tick
        count ``n_end``, folding every block this completes."""
        b = self.block
        start = state.ticks - state.ticks % b  # first tick of the current block
        folds = n_end - start >= b
        if not folds and len(tick) == 0:
            return
        if len(state._p_tick):
            tick = np.concatenate((state._p_tick, tick))
            exp = np.concatenate((state._p_expert, exp))
            tok = np.concatenate((state._p_token, tok))
            val = np.concatenate((state._p_value, val))
        if folds:
            d = self._table
            fade = d[b]
            s_exp, s_tok = state._s_expert, state._s_token
            n_exp = len(s_exp)
            ends = range(start + b, n_end + 1, b)
            cuts = np.searchsorted(tick, np.array(ends, dtype=np.int64)).tolist()
            lo = 0
            for end, hi in zip(ends, cuts):
                if hi > lo:
                    w = val[lo:hi] * d[(end - 1) - tick[lo:hi]]
                    s_exp = s_exp * fade + np.bincount(exp[lo:hi], weights=w, minlength=n_exp)
                    s_tok = s_tok * fade + np.bincount(tok[lo:hi], weights=w, minlength=N_TOKENS)
                else:  # adding zeros would change nothing but -0.0
                    s_exp = s_exp * fade
                    s_tok = s_tok * fade
                lo = hi
            state._s_expert, state._s_token = s_exp, s_tok
            # copies: the pending calls stay bounded by a block, not by the batch
            tick, exp, tok, val = tick[lo:].copy(), exp[lo:].copy(), tok[lo:].copy(), val[lo:].copy()
        state._p_tick, state._p_expert, state._p_token, state._p_value = tick, exp, tok, val

    @staticmethod
    def log_odds(state: FusionState) -> float:
        """The fused log-odds: the experts' contributions and the sequence classifier's."""
        return state._contributions()[2]

    @classmethod
    def evidence(cls, state: FusionState) -> float:
        """``tanh(L / 2)``: P(up) - P(down) under the fused log-odds ``L``; in [-1, 1]."""
        return detmath.tanh(0.5 * cls.log_odds(state))

    def top(self, state: FusionState, k: int = 5, by: str = "token") -> list[Contribution]:
        """The ``k`` largest contributions by absolute log-odds, ``by`` ``"token"`` (the
        sequence classifier's context counts as one) or ``"expert"``."""
        k = check_top(k, by)
        if by == "token":
            rows = [Contribution("token", token_name(t), float(v)) for t, v in enumerate(state.by_token) if v != 0]
            if state.sequence != 0:
                rows.append(Contribution("token", f"sequence:{state.sequence_context}", float(state.sequence)))
        elif by == "expert":
            rows = [Contribution("expert", e, float(v)) for e, v in zip(self.experts, state.by_expert) if v != 0]
            if state.sequence != 0:
                rows.append(Contribution("expert", "sequence", float(state.sequence)))
        rows.sort(key=lambda c: (-abs(c.log_odds), c.name))
        return rows[:k]
