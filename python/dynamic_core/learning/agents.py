"""Learning micro-agents: lanes whose score is a LoRA-adapted head over a feature vector,
trained online from realised next-bar returns, taking part in consensus like any agent.

In the engine a learning agent is an *external-score* lane (genome ``kind`` 1): it has a
position, paper P&L, fitness, votes and a consensus weight like an indicator-blend agent, but its
score comes from :meth:`Engine.set_external_scores`. :class:`LearningAgents` owns the model side:

* per stream (instrument, timeframe) a :class:`FeatureBank` turns bars into a feature vector
  (lagged returns and range scaled by an EW volatility, RSI, EW-band position, momentum, a bias,
  and the DSI microstructure evidence when a provider gives one);
* one :class:`~dynamic_core.learning.lora.LoRAHierarchy` over all learning agents: the frozen
  base and the shared foundation/domain/swarm layers are common, each agent has its own agent
  and context layers (stored stacked, applied in one batched contraction);
* per time step (:meth:`LearningAgents.step`, before ``engine.run`` of the same bars): the new
  bar's realised return is the target for the features seen one bar earlier (``learn``), a
  ``system_tick`` applies the hierarchy's update rules, and the scores of a fresh snapshot
  (Variant A: inference on frozen weights) go to the engine, journaled, so replay reproduces
  them without the model.

Deterministic: the same bars and seed give the same scores bit for bit (the model runs on one
thread's arithmetic; see :mod:`dynamic_core.learning.lora`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..instruments import instruments
from ..market import parse_timeframe
from ..records import GENOME_DTYPE

__all__ = ["FEATURES", "FeatureBank", "LearningAgents", "learning_genomes"]

FEATURES = ("ret1", "ret2", "ret3", "ret4", "ret5", "ret8", "range", "rsi", "band", "mom10", "bias", "dsi")
"""Names of the feature vector's leading components (the rest, up to ``dim``, are zero)."""

_VOL_N = 20
_RSI_N = 14
_BAND_N = 20
_MOM_N = 10


class FeatureBank:
    """Streaming features of one stream; ``update(bar)`` returns the vector after that bar
    (zeros until ``warm``). All values are clipped to [-5, 5] so one outlier cannot saturate."""

    __slots__ = ("_closes", "_ew_var", "_gain", "_loss", "_mean", "_prev", "_var", "dim", "dsi", "n")

    def __init__(self, dim: int = 16) -> None:
        if dim < len(FEATURES):
            raise ValueError(f"dim must be >= {len(FEATURES)}, got {dim}")
        self.dim = int(dim)
        self.n = 0
        self._closes: list[float] = []
        self._var = 0.0
        self._mean = 0.0
        self._ew_var = 0.0
        self._gain = 0.0
        self._loss = 0.0
        self._prev = math.nan
        self.dsi = 0.0

    @property
    def warm(self) -> bool:
        return self.n > _BAND_N

    def update(self, high: float, low: float, close: float) -> np.ndarray:
        """Take one bar; return the feature vector after it."""
        out = np.zeros(self.dim)
        if not (close > 0.0 and math.isfinite(close)):
            return out
        prev = self._prev
        self._prev = close
        self.n += 1
        closes = self._closes
        closes.append(close)
        if len(closes) > _MOM_N + 1:
            del closes[0]
        if math.isnan(prev):  # first bar
            self._mean = close
            return out
        r = math.log(close / prev)
        a = 2.0 / (_VOL_N + 1)
        self._var = (1 - a) * self._var + a * r * r if self.n > 2 else r * r
        # Wilder RSI on close-to-close changes
        up, dn = max(close - prev, 0.0), max(prev - close, 0.0)
        w = 1.0 / _RSI_N
        self._gain = (1 - w) * self._gain + w * up
        self._loss = (1 - w) * self._loss + w * dn
        # EW band of the close
        b = 2.0 / (_BAND_N + 1)
        d = close - self._mean
        self._mean += b * d
        self._ew_var = (1 - b) * (self._ew_var + b * d * d)
        if not self.warm:
            return out
        vol = math.sqrt(self._var) or 1e-12
        rets = [math.log(closes[i] / closes[i - 1]) for i in range(len(closes) - 1, 0, -1)]
        lag = {1: 0, 2: 1, 3: 2, 4: 3, 5: 4, 8: 7}
        vals = [rets[k] / vol if k < len(rets) else 0.0 for k in lag.values()]
        vals.append(math.log(high / low) / vol if high > 0 and low > 0 else 0.0)
        tot = self._gain + self._loss
        vals.append((self._gain / tot - 0.5) * 2.0 if tot > 0 else 0.0)
        sd = math.sqrt(self._ew_var)
        vals.append((close - self._mean) / (2 * sd) if sd > 0 else 0.0)
        vals.append(math.log(close / closes[0]) / (vol * math.sqrt(_MOM_N)) if len(closes) > _MOM_N else 0.0)
        vals.append(1.0)
        vals.append(self.dsi)
        out[: len(vals)] = np.clip(vals, -5.0, 5.0)
        return out


def learning_genomes(instrument: int | str, timeframe: int | str, n: int, *, first_id: int = 0, entry: float = 0.1,
                     long_short: bool = True) -> np.ndarray:
    """``n`` external-score genomes (kind 1) on one stream, agent ids from ``first_id``. Their
    indicator weights are zero (the score comes from outside); ``entry`` is the |score| that
    takes a position."""
    g = np.zeros(n, dtype=GENOME_DTYPE)
    g["agent_id"] = np.arange(first_id, first_id + n, dtype=np.uint32)
    g["instrument"] = instruments.resolve(instrument)
    g["timeframe"] = parse_timeframe(timeframe)
    g["mode"] = 1 if long_short else 0
    g["kind"] = 1
    for p, v in (("fast", 12), ("slow", 26), ("rsi_period", 14), ("macd_fast", 12), ("macd_slow", 26),
                 ("macd_signal", 9), ("atr_period", 14), ("bb_period", 20), ("mom_period", 10)):
        g[p] = v
    g["entry"] = entry
    return g


class LearningAgents:
    """The model side of a population's learning agents.

    Parameters
    ----------
    genomes : ndarray of GENOME_DTYPE
        The learning agents' genomes (kind 1), e.g. from :func:`learning_genomes`; they must
        also be in the engine's population.
    dim : int
        Feature dimension (the first ``len(FEATURES)`` are filled, the rest zero).
    learn : bool
        Train online; ``False`` keeps the initial weights (a frozen control).
    target_scale : float
        The target of a realised return ``r`` is ``tanh(target_scale * r / vol)``.
    config, seed, dtype
        Passed to :class:`~dynamic_core.learning.lora.LoRAHierarchy`.
    dsi : callable, optional
        ``dsi(instrument_id) -> float`` in [-1, 1]: microstructure evidence for the stream's
        ``dsi`` feature (0 without one).
    """

    def __init__(self, genomes: np.ndarray, *, dim: int = 16, learn: bool = True, target_scale: float = 1.0,
                 config: Any = None, seed: int = 0, dtype: Any = np.float64,
                 dsi: Callable[[int], float] | None = None) -> None:
        from .lora import LoRAHierarchy

        if genomes.dtype != GENOME_DTYPE or len(genomes) == 0:
            raise ValueError("genomes must be a non-empty GENOME_DTYPE array")
        if (genomes["kind"] != 1).any():
            raise ValueError("learning agents are external-score agents: every genome needs kind 1")
        self.ids = genomes["agent_id"].astype(np.uint32).copy()
        keys = list(zip(genomes["instrument"].tolist(), genomes["timeframe"].tolist()))
        self.streams: list[tuple[int, int]] = sorted(set(keys))
        index = {k: i for i, k in enumerate(self.streams)}
        self.stream_of = np.array([index[k] for k in keys], dtype=np.int64)
        self.members = [np.flatnonzero(self.stream_of == s) for s in range(len(self.streams))]
        self.dim = int(dim)
        self.banks = [FeatureBank(dim) for _ in self.streams]
        self.features = np.zeros((len(self.streams), self.dim))
        self._prev_x: list[np.ndarray | None] = [None] * len(self.streams)
        self._prev_close = [math.nan] * len(self.streams)
        self._vol = [0.0] * len(self.streams)
        self.learn_enabled = bool(learn)
        self.target_scale = float(target_scale)
        self.dsi = dsi
        self.model = LoRAHierarchy(len(self.ids), self.dim, config=config, seed=seed, dtype=dtype)
        self.snapshot = self.model.snapshot()
        self.scores = np.zeros(len(self.ids))
        self.ticks = 0
        # (score given, realised return) of each agent's last scored bar: the hit-rate record
        self.hits = np.zeros(len(self.ids), dtype=np.int64)
        self.calls = np.zeros(len(self.ids), dtype=np.int64)
        self._last_scores: list[np.ndarray | None] = [None] * len(self.streams)

    def step(self, bars: np.ndarray, engine: Any = None) -> np.ndarray:
        """One time step's bars (call before ``engine.run`` of the same bars): learn from the
        realised returns, tick the hierarchy, score the streams these bars belong to, and hand
        the scores to ``engine`` (when given). Returns the scores of every learning agent."""
        index = {k: i for i, k in enumerate(self.streams)}
        touched: list[int] = []
        x_learn = np.zeros((len(self.ids), self.dim))
        target = np.zeros(len(self.ids))
        mask = np.zeros(len(self.ids), dtype=bool)
        for inst, tf, h, lo, c in zip(bars["instrument"].tolist(), bars["timeframe"].tolist(), bars["high"].tolist(),
                                      bars["low"].tolist(), bars["close"].tolist()):
            s = index.get((inst, tf))
            if s is None:
                continue
            prev_c, prev_x = self._prev_close[s], self._prev_x[s]
            if prev_x is not None and prev_c > 0.0 and c > 0.0:
                r = math.log(c / prev_c)
                m = self.members[s]
                last = self._last_scores[s]
                if last is not None:
                    moved = np.sign(last) != 0
                    self.calls[m] += moved
                    self.hits[m] += moved & (np.sign(last) == np.sign(r))
                if self.learn_enabled and self._vol[s] > 0.0:
                    x_learn[m] = prev_x
                    target[m] = math.tanh(self.target_scale * r / self._vol[s])
                    mask[m] = True
            bank = self.banks[s]
            if self.dsi is not None:
                bank.dsi = float(np.clip(self.dsi(inst), -1.0, 1.0))
            x = bank.update(h, lo, c)
            self.features[s] = x
            self._prev_close[s] = c
            self._vol[s] = math.sqrt(bank._var)
            self._prev_x[s] = x if bank.warm else None
            touched.append(s)
        if mask.any():
            self.model.learn(x_learn, target, self.snapshot, mask=mask)
            self.model.system_tick()
            self.snapshot = self.model.snapshot()
            self.ticks += 1
        if touched:
            rows = np.concatenate([self.members[s] for s in touched])
            X = self.features[self.stream_of]
            scores = self.model.score(X, self.snapshot)
            warm = np.array([self.banks[s].warm for s in range(len(self.streams))])[self.stream_of]
            scores = np.where(warm, scores, 0.0)
            self.scores[rows] = scores[rows]
            for s in touched:
                self._last_scores[s] = self.scores[self.members[s]].copy() if self.banks[s].warm else None
            if engine is not None:
                engine.set_external_scores(self.ids[rows], np.clip(self.scores[rows], -1.0, 1.0))
        return self.scores

    def hit_rate(self, agents: Sequence[int] | None = None) -> float:
        """Share of scored bars (score != 0) whose sign matched the next bar's return."""
        sel = slice(None) if agents is None else np.asarray(agents)
        calls = int(self.calls[sel].sum())
        return float(self.hits[sel].sum()) / calls if calls else math.nan

    def inherit(self, child: int, parent: int) -> None:
        """A child agent (slot index) starts from its parent's agent and context layers, as
        evolution's offspring do."""
        self.model.copy_agent(parent, child)
