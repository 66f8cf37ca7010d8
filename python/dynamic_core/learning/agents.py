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
thread's arithmetic; see :mod:`dynamic_core.learning.lora`), however the bars are batched: a call
is processed bar by bar in input order, each bar its own learning tick.

Bad input is never learned from: a bar the engine rejects (its own validation, the same reason
codes ``engine.run`` gives) is skipped without touching the stream's features, previous close or
learning sample, and counted by reason in :meth:`LearningAgents.stats` (the engine counts and
dead-letters it as usual). A non-finite ``dsi`` value counts as 0 (counted). Every check that can
fail runs before the first change of state, so a step that raises changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .. import detmath
from .._checks import check_int, check_real, is_real
from ..instruments import instruments
from ..market import as_bars, parse_timeframe, reason_counts, refuse_bad, validate
from ..population import MAX_AGENTS
from ..records import BAR_DTYPE, GENOME_DTYPE

__all__ = ["FEATURES", "MAX_DIM", "FeatureBank", "LearningAgents", "learning_genomes"]

FEATURES = ("ret1", "ret2", "ret3", "ret4", "ret5", "ret8", "range", "rsi", "band", "mom10", "bias", "dsi")
"""Names of the feature vector's leading components (the rest, up to ``dim``, are zero)."""

MAX_DIM = 1024
"""Largest feature dimension (``dim``): the components past ``len(FEATURES)`` are zero, and every
agent carries ``dim x rank`` weights per layer, so a larger one only costs memory."""

_VOL_N = 20
_RSI_N = 14
_BAND_N = 20
_MOM_N = 10


class FeatureBank:
    """Streaming features of one stream; ``update(bar)`` returns the vector after that bar
    (zeros until ``warm``). All values are clipped to [-5, 5] so one outlier cannot saturate.

    ``dim`` is an int in ``[len(FEATURES), MAX_DIM]`` (TypeError for a non-int, bool and float
    included; ValueError out of range)."""

    __slots__ = ("_closes", "_ew_var", "_gain", "_loss", "_mean", "_prev", "_var", "dim", "dsi", "n")

    def __init__(self, dim: int = 16) -> None:
        self.dim = check_int("dim", dim, len(FEATURES), MAX_DIM)
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
        r = detmath.log(close / prev)
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
        rets = [detmath.log(closes[i] / closes[i - 1]) for i in range(len(closes) - 1, 0, -1)]
        lag = {1: 0, 2: 1, 3: 2, 4: 3, 5: 4, 8: 7}
        vals = [rets[k] / vol if k < len(rets) else 0.0 for k in lag.values()]
        vals.append(detmath.log(high / low) / vol if high > 0 and low > 0 else 0.0)
        tot = self._gain + self._loss
        vals.append((self._gain / tot - 0.5) * 2.0 if tot > 0 else 0.0)
        sd = math.sqrt(self._ew_var)
        vals.append((close - self._mean) / (2 * sd) if sd > 0 else 0.0)
        vals.append(detmath.log(close / closes[0]) / (vol * math.sqrt(_MOM_N)) if len(closes) > _MOM_N else 0.0)
        vals.append(1.0)
        vals.append(self.dsi)
        out[: len(vals)] = np.clip(vals, -5.0, 5.0)
        return out


def learning_genomes(instrument: int | str, timeframe: int | str, n: int, *, first_id: int = 0, entry: float = 0.1,
                     long_short: bool = True) -> np.ndarray:
    """``n`` external-score genomes (kind 1) on one stream, agent ids from ``first_id``. Their
    indicator weights are zero (the score comes from outside); ``entry`` is the |score| that
    takes a position: a finite number >= 0, as the population requires (a score never leaves
    [-1, 1], so above 1 the agents never trade). ``long_short`` is a bool (True: long and short,
    False: long only). TypeError for an argument of the wrong type, ValueError for one out of
    range, before anything is built."""
    n = check_int("n", n, 1, MAX_AGENTS)
    first_id = check_int("first_id", first_id, 0, 2**32 - 1)
    if first_id + n - 1 > 2**32 - 1:
        raise ValueError(f"first_id {first_id} + n {n} passes the largest agent id (2**32 - 1)")
    entry = check_real("entry", entry, 0.0)
    if not isinstance(long_short, (bool, np.bool_)):
        raise TypeError(f"long_short must be a bool (True: long and short, False: long only), "
                        f"got {long_short!r} ({type(long_short).__name__})")
    tf = parse_timeframe(timeframe)  # before resolve, which registers a new name
    g = np.zeros(n, dtype=GENOME_DTYPE)
    g["agent_id"] = np.arange(first_id, first_id + n, dtype=np.uint32)
    g["instrument"] = instruments.resolve(instrument)
    g["timeframe"] = tf
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
        also be in the engine's population. A 1-d ``GENOME_DTYPE`` array (TypeError for
        anything else: a list of records, another dtype), non-empty, each agent id once
        (ValueError: a score per id is handed to the engine, which takes one value per agent).
    dim : int
        Feature dimension in ``[len(FEATURES), MAX_DIM]`` (the first ``len(FEATURES)`` are
        filled, the rest zero).
    learn : bool
        Train online; ``False`` keeps the initial weights (a frozen control).
    target_scale : float
        Finite and > 0: the target of a realised return ``r`` is ``tanh(target_scale * r / vol)``.
    config, dtype
        Passed to :class:`~dynamic_core.learning.lora.LoRAHierarchy`.
    seed : int
        In ``[0, 2**64)``; seeds the :class:`~dynamic_core.learning.lora.LoRAHierarchy`.
    dsi : callable, optional
        ``dsi(instrument_id) -> float`` in [-1, 1] (clipped): microstructure evidence for the
        stream's ``dsi`` feature (0 without one). A non-finite value counts as 0 and is counted
        (``stats()["dsi_nonfinite"]``); a value that is not a real number (an int or float,
        numpy's included; a bool, a str such as ``"0.5"`` or None is none) is a TypeError.
    xp : "numpy", "cupy" or an array module, optional
        Where the hierarchy's arrays live (see :class:`~dynamic_core.learning.lora.LoRAHierarchy`):
        with CuPy the model learns and scores on the GPU and the scores come back to the host
        once per scoring pass.

    Bad arguments are TypeError (wrong type: bool and float are not ints) or ValueError (out of
    range), raised here.
    """

    def __init__(self, genomes: np.ndarray, *, dim: int = 16, learn: bool = True, target_scale: float = 1.0,
                 config: Any = None, seed: int = 0, dtype: Any = np.float64,
                 dsi: Callable[[int], float] | None = None, xp: Any = None) -> None:
        from .lora import LoRAHierarchy

        if not isinstance(genomes, np.ndarray) or genomes.dtype != GENOME_DTYPE:
            what = (f"an array of dtype {genomes.dtype}" if isinstance(genomes, np.ndarray)
                    else type(genomes).__name__)
            raise TypeError(f"genomes must be a 1-d GENOME_DTYPE array (e.g. from learning_genomes), "
                            f"got {what}")
        if genomes.ndim != 1 or len(genomes) == 0:
            raise ValueError(f"genomes must be a non-empty 1-d GENOME_DTYPE array, got shape {genomes.shape}")
        if (genomes["kind"] != 1).any():
            raise ValueError("learning agents are external-score agents: every genome needs kind 1")
        u, counts = np.unique(genomes["agent_id"], return_counts=True)
        if len(u) != len(genomes):
            # each step hands the engine one score per id: it would refuse the step after learning
            dup = u[counts > 1]
            raise ValueError(f"genomes: agent id {int(dup[0])} is given more than once ({len(dup)} "
                             f"duplicated id{'s' if len(dup) > 1 else ''}); give each learning agent its "
                             f"own id (learning_genomes(..., first_id=...))")
        dim = check_int("dim", dim, len(FEATURES), MAX_DIM)
        # NaN would make every target non-finite: learning silently off for good
        target_scale = check_real("target_scale", target_scale, 0.0, lo_open=True)
        seed = check_int("seed", seed, 0, (1 << 64) - 1)
        if dsi is not None and not callable(dsi):
            raise TypeError(f"dsi must be a callable or None, got {type(dsi).__name__}")
        self.ids = genomes["agent_id"].astype(np.uint32).copy()
        keys = list(zip(genomes["instrument"].tolist(), genomes["timeframe"].tolist()))
        self.streams: list[tuple[int, int]] = sorted(set(keys))
        self._index = {k: i for i, k in enumerate(self.streams)}
        self.stream_of = np.array([self._index[k] for k in keys], dtype=np.int64)
        self.members = [np.flatnonzero(self.stream_of == s) for s in range(len(self.streams))]
        self.dim = dim
        self.banks = [FeatureBank(dim) for _ in self.streams]
        self.features = np.zeros((len(self.streams), self.dim))
        self._prev_x: list[np.ndarray | None] = [None] * len(self.streams)
        self._prev_close = [math.nan] * len(self.streams)
        self._vol = [0.0] * len(self.streams)
        # each stream's last bar taken: without an engine, the time-order check of the next call
        self._last_bar = np.zeros(len(self.streams), dtype=BAR_DTYPE)
        self._has_last = np.zeros(len(self.streams), dtype=bool)
        self.learn_enabled = bool(learn)
        self.target_scale = target_scale
        self.dsi = dsi
        self.model = LoRAHierarchy(len(self.ids), self.dim, config=config, seed=seed, dtype=dtype, xp=xp)
        self.snapshot = self.model.snapshot()
        self.scores = np.zeros(len(self.ids))
        self.ticks = 0
        # (score given, realised return) of each agent's last scored bar: the hit-rate record
        self.hits = np.zeros(len(self.ids), dtype=np.int64)
        self.calls = np.zeros(len(self.ids), dtype=np.int64)
        self._last_scores: list[np.ndarray | None] = [None] * len(self.streams)
        self._dirty: dict[int, None] = {}  # streams taken since the last _flush, in order
        self._rejected: dict[str, int] = {}
        self._counts = {"bars": 0, "dsi_nonfinite": 0, "nonfinite_rows": 0, "nonfinite_scores": 0}

    def step(self, bars: np.ndarray, engine: Any = None) -> np.ndarray:
        """One time step's bars (call before ``engine.run`` of the same bars): learn from the
        realised returns, tick the hierarchy, score the streams these bars belong to, and hand
        the scores to ``engine`` (when given). Returns the scores of every learning agent.

        The bars are taken one at a time in input order, each one that teaches anything its own
        learning tick, so any batching of the same bars gives the same state bit for bit. A bar
        the engine rejects is skipped and counted (:meth:`stats`): with ``engine`` its own
        verdict decides (``engine.validate``: what ``run`` will give, hence before it), without
        one the same checks (:func:`dynamic_core.market.validate`, time order continued from
        the previous calls).

        Raises
        ------
        TypeError
            ``bars`` is not a ``BAR_DTYPE`` array, ``engine`` is neither an Engine nor None, or
            ``dsi`` returned something not a real number (a bool or a str included).
        InvalidInput
            ``engine`` is strict and the batch has bad bars (its ``run`` will refuse it too).
        RuntimeError
            ``engine`` is closed.
        ValueError
            ``engine`` has no external-score agent (kind 1) with the id of a learning agent these
            bars would score.

        Every check (the ``dsi`` callback included) runs before the first change, so a step that
        raises changes nothing. A score that comes out non-finite (a model fault) is set to 0
        and counted instead of reaching the engine.
        """
        b = as_bars(bars)
        reasons = self._verdicts(b, engine)
        inst = b["instrument"].tolist()
        todo: list[tuple[int, int]] = []  # (row, stream) of the bars to take, in input order
        for i, (ok, tf) in enumerate(zip((reasons == 0).tolist(), b["timeframe"].tolist())):
            s = self._index.get((inst[i], tf)) if ok else None
            if s is not None:
                todo.append((i, s))
        dsi, dsi_bad = self._dsi_values([inst[i] for i, _ in todo])
        rows = None
        if engine is not None and todo:
            rows = np.concatenate([self.members[s] for s in dict.fromkeys(s for _, s in todo)])
            # ValueError for an id the engine lacks or holds as another kind of agent
            engine._external_indices_of(self.ids[rows], "LearningAgents.step")
        # from here on nothing raises on account of the input: the first change of state
        self._counts["dsi_nonfinite"] += dsi_bad
        for name, k in reason_counts(reasons).items():
            self._rejected[name] = self._rejected.get(name, 0) + k
        high, low, close = b["high"].tolist(), b["low"].tolist(), b["close"].tolist()
        touched: dict[int, None] = {}
        for (i, s), d in zip(todo, dsi):
            self._take(s, high[i], low[i], close[i], d)
            self._last_bar[s] = b[i]
            self._has_last[s] = True
            touched[s] = None
        self._counts["bars"] += len(todo)
        self._flush()
        if rows is not None:
            engine.set_external_scores(self.ids[rows], np.clip(self.scores[rows], -1.0, 1.0))
        return self.scores

    def _verdicts(self, b: np.ndarray, engine: Any) -> np.ndarray:
        """Reject reason of each bar (0 = taken), from the engine's own validation."""
        from ..engine import Engine

        if engine is not None and not isinstance(engine, Engine):
            raise TypeError(f"engine must be a dynamic_core.Engine or None, got {type(engine).__name__}")
        if engine is None:
            # the stateless check sees time order within its batch only: lead with each
            # stream's last bar taken (valid, so reason 0) to continue it across calls
            ref = self._last_bar[self._has_last]
            return validate(np.concatenate([ref, b]))[len(ref):]
        if engine.closed:
            raise RuntimeError("engine is closed")
        reasons = np.asarray(engine.validate(b))
        if engine.strict:
            refuse_bad(reasons, "step not applied (a strict engine)")
        return reasons

    def _dsi_values(self, insts: list[int]) -> tuple[list[float | None], int]:
        """The ``dsi`` provider's value for each bar to take (None without a provider) and how
        many were non-finite (taken as 0). Changes nothing: the caller counts them once every
        check has passed."""
        if self.dsi is None:
            return [None] * len(insts), 0
        out: list[float | None] = []
        bad = 0
        for inst in insts:
            v = self.dsi(inst)
            # float() would take "0.5" and True: a provider returning those has a bug to show
            if not is_real(v):
                raise TypeError(f"dsi({inst}) must return a real number (int or float, not a bool or str), "
                                f"got {v!r} ({type(v).__name__})")
            try:
                x = float(v)
            except OverflowError:  # an int past the float range: clipped to +-1 like any large value
                x = 1.0 if v > 0 else -1.0
            if math.isfinite(x):
                out.append(float(np.clip(x, -1.0, 1.0)))
            else:  # NaN would poison the features and every score of the stream
                out.append(0.0)
                bad += 1
        return out, bad

    def _take(self, s: int, h: float, lo: float, c: float, dsi: float | None) -> None:
        """One accepted bar of stream ``s``: learn from its return, update the features, and mark
        the stream to be scored (by :meth:`_flush`)."""
        if s in self._dirty:  # its hit count below reads the scores, its features change
            self._flush()
        m = self.members[s]
        n = len(self.ids)
        prev_c, prev_x = self._prev_close[s], self._prev_x[s]
        sample = None
        if prev_x is not None and prev_c > 0.0:
            r = detmath.log(c / prev_c)
            last = self._last_scores[s]
            if last is not None:
                moved = np.sign(last) != 0
                self.calls[m] += moved
                self.hits[m] += moved & (np.sign(last) == np.sign(r))
            if self.learn_enabled and self._vol[s] > 0.0:
                x_learn = np.zeros((n, self.dim))
                target = np.zeros(n)
                mask = np.zeros(n, dtype=bool)
                x_learn[m] = prev_x
                target[m] = detmath.tanh(self.target_scale * r / self._vol[s])
                mask[m] = True
                sample = (x_learn, target, mask)
        bank = self.banks[s]
        if dsi is not None:
            bank.dsi = dsi
        x = bank.update(h, lo, c)
        self.features[s] = x
        self._prev_close[s] = c
        self._vol[s] = math.sqrt(bank._var)
        self._prev_x[s] = x if bank.warm else None
        if sample is not None:
            self._flush()  # the weights are about to change
            self.model.learn(sample[0], sample[1], self.snapshot, mask=sample[2])
            report = self.model.system_tick()
            self._counts["nonfinite_rows"] += int(report["nonfinite"]) + int(report.get("overflow", 0))
            self.snapshot = self.model.snapshot()
            self.ticks += 1
        self._dirty[s] = None

    def _flush(self) -> None:
        """Score the streams marked by :meth:`_take`: one score call of every agent (a subset of
        rows would not give the same bits), kept for each marked stream's agents. Runs before
        anything a pending score depends on changes: the stream's features, the weights."""
        if not self._dirty:
            return
        full = None
        for s in self._dirty:
            m = self.members[s]
            if self.banks[s].warm:
                if full is None:
                    full = self.model.score(self.features[self.stream_of], self.snapshot)
                    if self.model.xp is not np:  # from the GPU, once per pass
                        full = self.model.xp.asnumpy(full)
                scores = full[m]
                bad = ~np.isfinite(scores)
                if bad.any():  # set_external_scores would refuse it after the model moved
                    self._counts["nonfinite_scores"] += int(np.count_nonzero(bad))
                    scores[bad] = 0.0
                self.scores[m] = scores
                self._last_scores[s] = scores.copy()
            else:
                self.scores[m] = 0.0
                self._last_scores[s] = None
        self._dirty.clear()

    def stats(self) -> dict[str, Any]:
        """Counters: ``ticks`` (learning ticks), ``bars`` (bars of the agents' streams taken),
        ``rejected`` ({reason: bars skipped because the engine rejects them}),
        ``dsi_nonfinite`` (``dsi`` values taken as 0), ``nonfinite_rows`` (learning rows the
        model left out as non-finite: the ``nonfinite`` of its tick reports) and
        ``nonfinite_scores`` (agent scores that came out non-finite and were set to 0)."""
        return {"ticks": self.ticks, **self._counts, "rejected": dict(self._rejected)}

    def hit_rate(self, agents: Sequence[int] | None = None) -> float:
        """Share of scored bars (score != 0) whose sign matched the next bar's return, over all
        agents or over the rows ``agents`` (indices into :attr:`ids`, like :meth:`inherit`'s, or
        a boolean mask over them)."""
        n = len(self.ids)
        if agents is None:
            sel: slice | np.ndarray = slice(None)
        else:
            sel = np.asarray(agents).reshape(-1)
            if sel.dtype == bool:
                if len(sel) != n:
                    raise IndexError(f"a boolean mask of agents needs {n} entries, got {len(sel)}")
            elif len(sel) == 0:
                sel = sel.astype(np.intp)
            elif sel.dtype.kind not in "iu":
                raise TypeError(f"agents must be row indices (ints) or a boolean mask, got {sel.dtype}")
            else:
                bad = (sel < 0) | (sel >= n)
                if bad.any():
                    raise IndexError(f"agent row {int(sel[bad][0])} out of range [0, {n}) (rows index .ids; "
                                     f"agent id {int(self.ids[0]) if n else 0} is row 0)")
        calls = int(self.calls[sel].sum())
        return float(self.hits[sel].sum()) / calls if calls else math.nan

    def inherit(self, child: int, parent: int) -> None:
        """A child agent (slot index) starts from its parent's agent and context layers, as
        evolution's offspring do."""
        self.model.copy_agent(parent, child)
