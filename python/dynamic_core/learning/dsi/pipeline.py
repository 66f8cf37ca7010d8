"""The DSI façade: ticks in, per-instrument microstructure evidence out.

``Dsi.update(ticks)`` validates a ``TICK_DTYPE`` batch (bad ticks are counted by reason and kept
as dead letters, never raised), splits it by instrument and runs each instrument's slice through
the MicroTape, the micro-experts and the fusion, all with whole-array numpy operations.
``Dsi.evidence(instrument)`` is the fused evidence in [-1, 1] after the latest tick and
``Dsi.top(instrument, k)`` what moved it most. Signals and plans carry ``validation(instrument,
direction)``: the evidence signed by the direction they propose.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Self

import msgspec
import numpy as np

from ...instruments import UnknownInstrument
from ...instruments import instruments as _registry
from ...ticks import (
    MAX_DEAD_LETTERS,
    TickValidator,
    _check_band,
    _instrument_order,
    _segment_starts,
    _ts_range,
    as_ticks,
)
from ._scan import check_int, check_real
from .experts import AbsorptionExpert, AnomalyScorer, DivergenceVerifier, NGramClassifier, RunExperts, symbols
from .fusion import Contribution, DsiFusion, FusionState, check_top
from .tape import MicroTape

__all__ = ["EXPERTS", "Dsi", "DsiConfig"]

EXPERTS: tuple[str, ...] = (
    "momentum",
    "exhaustion",
    "sweep",
    "absorption",
    "volume_anomaly",
    "return_anomaly",
    "rsi_divergence",
    "macd_divergence",
)
"""The directional experts in fusion order (``spread_anomaly`` damps, ``sequence`` adds its
log-odds)."""


class DsiConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Parameters of the tape, the experts and the fusion (periods and windows in ticks).

    Checked when built (directly, by ``msgspec.structs.replace`` or decoded): TypeError for a
    value of the wrong type, ValueError naming the field for one out of range, with the bounds
    the native passes need (:mod:`.experts`: ``pivot <= 10000``, periods within int32,
    ``absorb_window <= 10000``, ``ngram_order <= 4``, ``burst_ns <= 2**53``; every float finite;
    ``div_max_jump > 1``; ``max_dead_letters <= 10_000_000``). ``div_max_jump``: a trade price
    more than this many times above or below the last one the divergence verifier took is an
    absurd print it leaves out (:class:`.experts.DivergenceVerifier`; counted by
    :meth:`Dsi.divergence_skips`); the return to and from such a print is left out of the
    anomaly scorer's return moments (counted by :meth:`Dsi.anomaly_skips`). So a :class:`Dsi`
    never fails half-way through an update.
    """

    span: float = 200.0
    size_edges: tuple[float, float, float] = (0.5, 2.0, 5.0)
    spread_edges: tuple[float, float] = (1.25, 2.5)
    warmup: int = 50
    z_volume: float = 3.0
    z_return: float = 4.0
    z_spread: float = 3.0
    burst_moves: int = 4
    burst_share: float = 0.6
    burst_ns: int = 2_000_000_000
    exhaustion_moves: int = 6
    climax_z: float = 3.0
    sweep_moves: int = 3
    sweep_share: float = 0.6
    sweep_retrace: float = 0.5
    absorb_window: int = 20
    absorb_share: float = 0.7
    absorb_volume: float = 1.5
    rsi_period: int = 14
    macd_fast: int = 12
    macd_slow: int = 26
    pivot: int = 5
    div_warmup: int = 78
    div_max_jump: float = 10.0
    ngram_order: int = 3
    ngram_alpha: float = 1.0
    half_life: float = 200.0
    spread_damp: float = 0.5
    weights: dict[str, float] = msgspec.field(default_factory=dict)
    band: float = 0.01
    band_spreads: float = 10.0
    max_dead_letters: int = 10_000

    def __post_init__(self) -> None:
        # the components check their own parameters; building one instrument's set checks all
        fusion = DsiFusion(EXPERTS, weights=dict(self.weights), half_life=self.half_life,
                           spread_damp=self.spread_damp)
        _Instrument(self, fusion)
        _check_band(self.band, self.band_spreads)
        check_int("max_dead_letters", self.max_dead_letters, 0, MAX_DEAD_LETTERS)


class _Instrument:
    """One instrument's tape, experts and fused state."""

    __slots__ = ("absorption", "anomaly", "divergence", "fused", "ngram", "runs", "tape")

    def __init__(self, cfg: DsiConfig, fusion: DsiFusion) -> None:
        self.tape = MicroTape(span=cfg.span, size_edges=cfg.size_edges, spread_edges=cfg.spread_edges)
        self.anomaly = AnomalyScorer(span=cfg.span, warmup=cfg.warmup, z_volume=cfg.z_volume,
                                     z_return=cfg.z_return, z_spread=cfg.z_spread)
        self.runs = RunExperts(burst_moves=cfg.burst_moves, burst_share=cfg.burst_share, burst_ns=cfg.burst_ns,
                               exhaustion_moves=cfg.exhaustion_moves, climax_z=cfg.climax_z,
                               sweep_moves=cfg.sweep_moves, sweep_share=cfg.sweep_share,
                               sweep_retrace=cfg.sweep_retrace)
        self.absorption = AbsorptionExpert(window=cfg.absorb_window, share=cfg.absorb_share,
                                           volume=cfg.absorb_volume)
        self.divergence = DivergenceVerifier(rsi_period=cfg.rsi_period, macd_fast=cfg.macd_fast,
                                             macd_slow=cfg.macd_slow, pivot=cfg.pivot, warmup=cfg.div_warmup,
                                             max_jump=cfg.div_max_jump)
        self.ngram = NGramClassifier(order=cfg.ngram_order, alpha=cfg.ngram_alpha)
        self.fused: FusionState = fusion.new_state()

    def step(self, fusion: DsiFusion, ts, price, size, bid, ask, side) -> None:
        n = len(price)
        zs = []

        def means(size_, spread, prev):
            with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
                ret = price / prev - 1.0
                # a return to or from an absurd print (more than div_max_jump times the price
                # before) is left out of the return moments, counted in anomaly_skips: taken in,
                # a 1e14 print's return inflated the variance and blinded the return expert
                # for the next ~10^4 ticks (only a return that overflowed was left out)
                j = self.divergence.max_jump
                ret[(prev > 0) & ((price > j * prev) | (price * j < prev))] = np.inf
            zs.append(self.anomaly.zscores(size_, spread, ret))
            return self.anomaly.mean_before

        tape = self.tape.step(price, size, bid, ask, side, means=means)
        z = zs[0]
        calls = self.anomaly.calls(z, tape.aggressor, tape.move)
        damped = None
        spread_calls = calls.pop("spread_anomaly")
        if len(spread_calls.index):
            damped = np.zeros(n, dtype=bool)
            damped[spread_calls.index] = True
        calls.update(self.runs.step(ts, price, size, tape.move, tape.aggressor, z[:, 0]))
        calls["absorption"] = self.absorption.step(price, size, tape.aggressor, tape.size_ref)
        calls.update(self.divergence.step(price))
        outcome = np.where(tape.move < 0, 2, tape.move)
        self.ngram.update(symbols(tape.move, tape.aggressor, tape.size_class), outcome)
        fusion.fuse(self.fused, n, calls, tape.token, damped, self.ngram.log_odds(), self.ngram.context_name())


class Dsi:
    """Deep Signal Intelligence over tick feeds: MicroTape, micro-experts, log-odds fusion.

    Parameters
    ----------
    instruments : str, int or an iterable of them, optional
        Instruments to follow (names are registered in ``dc.instruments``; ids must be
        registered); ticks of others are refused as ``unknown_instrument``. Default: every
        registered instrument.
    config : DsiConfig, optional
    threads : int
        Worker threads sharing a batch's instruments (each instrument's ticks stay on one
        thread, so results do not depend on it). 1 runs in the caller's thread.
    **overrides
        Fields of :class:`DsiConfig` to change (``Dsi(["EURUSD"], half_life=500)``).

    Examples
    --------
    >>> dsi = Dsi(["EURUSD"])                              # doctest: +SKIP
    >>> dsi.update(ticks)                                  # doctest: +SKIP
    >>> dsi.evidence("EURUSD"), dsi.top("EURUSD", 3)       # doctest: +SKIP
    """

    def __init__(self, instruments: Iterable[str | int] | None = None, config: DsiConfig | None = None,
                 *, threads: int = 1, **overrides) -> None:
        cfg = DsiConfig() if config is None else config
        if not isinstance(cfg, DsiConfig):
            raise TypeError(f"config must be a DsiConfig, got {type(cfg).__name__}")
        if overrides:
            cfg = msgspec.structs.replace(cfg, **overrides)  # checked by DsiConfig.__post_init__
        threads = check_int("threads", threads, 1, 64)
        self.config = cfg
        ids = None if instruments is None else _registry.resolve_all(instruments)
        self.instruments: tuple[int, ...] | None = None if ids is None else tuple(dict.fromkeys(ids))
        self._followed = None if ids is None else frozenset(ids)
        # times within a week of the int64 limits are refused (bad_timestamp), as the bar
        # aggregator refuses them: one such tick would put every later tick out of order
        self.validator = TickValidator(instruments=ids, max_dead_letters=cfg.max_dead_letters, band=cfg.band,
                                       band_spreads=cfg.band_spreads, ts_range=_ts_range([7 * 86400]))
        self.fusion = DsiFusion(EXPERTS, weights=dict(cfg.weights), half_life=cfg.half_life,
                                spread_damp=cfg.spread_damp)
        self._state: dict[int, _Instrument] = {}
        self.ticks = 0
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="dsi") if threads > 1 else None

    def close(self) -> None:
        """Stop the worker threads (``threads > 1``); the state stays readable."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- data path --------------------------------------------------------------------------
    def update(self, ticks: np.ndarray) -> None:
        """Take a batch of ticks (any interleaving of instruments, each in time order)."""
        good, _ = self.validator(as_ticks(ticks))
        if len(good) == 0:
            return
        inst = good["instrument"]
        # contiguous columns, grouped by instrument (each instrument's slice stays in time order)
        if len(good) > 1 and (inst[1:] != inst[:-1]).any():
            order = _instrument_order(inst)
            inst = inst[order]
            ts, price, size, bid, ask, side = (good[k][order] for k in ("ts", "price", "size", "bid", "ask", "side"))
        else:
            ts, price, size, bid, ask, side = (np.ascontiguousarray(good[k])
                                               for k in ("ts", "price", "size", "bid", "ask", "side"))
        starts = _segment_starts(inst)
        ends = np.append(starts[1:], len(good))
        jobs = []
        for a, b in zip(starts.tolist(), ends.tolist()):
            i = int(inst[a])
            st = self._state.get(i)
            if st is None:
                st = self._state[i] = _Instrument(self.config, self.fusion)
            jobs.append((st, a, b))

        def run(job) -> None:
            st, a, b = job
            st.step(self.fusion, ts[a:b], price[a:b], size[a:b], bid[a:b], ask[a:b], side[a:b])

        if self._pool is not None and len(jobs) > 1:
            # instruments are independent: numpy releases the GIL inside each array operation
            jobs.sort(key=lambda j: j[1] - j[2])  # longest first
            list(self._pool.map(run, jobs))
        else:
            for job in jobs:
                run(job)
        self.ticks += len(good)

    # -- reading ----------------------------------------------------------------------------
    def seen(self) -> list[int]:
        """Ids of the instruments it has taken ticks of, ascending."""
        return sorted(self._state)

    def _slot(self, instrument: str | int) -> _Instrument | None:
        # lookup, not resolve: asking about a name must not register it
        i = _registry.lookup(instrument)
        if self._followed is not None and i not in self._followed:
            raise UnknownInstrument(f"Dsi does not follow instrument {instrument!r}")
        return self._state.get(i)

    def _get(self, instrument: str | int) -> FusionState | None:
        st = self._slot(instrument)
        return None if st is None else st.fused

    def evidence(self, instrument: str | int) -> float:
        """Fused evidence in [-1, 1] after the latest tick (P(up) - P(down)); 0 before any tick.

        :class:`~dynamic_core.instruments.UnknownInstrument` (a ValueError, also a KeyError)
        for an instrument that is not registered or not followed; the same for every reader."""
        st = self._get(instrument)
        return 0.0 if st is None else DsiFusion.evidence(st)

    def log_odds(self, instrument: str | int) -> float:
        st = self._get(instrument)
        return 0.0 if st is None else DsiFusion.log_odds(st)

    def top(self, instrument: str | int, k: int = 5, by: str = "token") -> list[Contribution]:
        """The ``k`` MicroTape tokens (``by="expert"``: experts) contributing most to the evidence."""
        check_top(k, by)  # the same errors whether or not the instrument has a state
        st = self._get(instrument)
        return [] if st is None else self.fusion.top(st, k, by)

    def validation(self, instrument: str | int, direction: float) -> float:
        """Microstructure validation of a proposed trade: the evidence signed by ``direction``
        (> 0 long, < 0 short); positive when the tape agrees, 0 for a flat direction."""
        return float(np.sign(check_real("direction", direction))) * self.evidence(instrument)

    def calls(self, instrument: str | int) -> dict[str, int]:
        """Number of calls each expert has made on ``instrument``."""
        st = self._get(instrument)
        if st is None:
            return {e: 0 for e in EXPERTS}
        return {e: int(c) for e, c in zip(EXPERTS, st.calls)}

    def anomaly_skips(self, instrument: str | int) -> dict[str, int]:
        """Values of ``instrument`` left out of the anomaly scorer's moments, per series (size,
        spread, return), because they would have made them overflow (see
        :class:`~dynamic_core.learning.dsi._scan.EwMoments`), and returns to or from a print more
        than ``div_max_jump`` times the one before."""
        st = self._slot(instrument)
        if st is None:
            return dict.fromkeys(AnomalyScorer.series, 0)
        return st.anomaly.skipped

    def divergence_skips(self, instrument: str | int) -> int:
        """Absurd prints of ``instrument`` left out of the divergence experts' indicators (a
        price more than ``div_max_jump`` times above or below the last one they took; see
        :class:`~dynamic_core.learning.dsi.experts.DivergenceVerifier`)."""
        st = self._slot(instrument)
        return 0 if st is None else st.divergence.skipped

    @property
    def rejects(self) -> dict[str, int]:
        return self.validator.rejects

    def dead_letters(self) -> np.ndarray:
        return self.validator.dead_letters()
