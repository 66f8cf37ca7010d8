"""Trading plans: what to do about one signal, sized by risk.

A plan takes a signal's direction, enters at the bar's close, puts its stop ``stop_atr`` ATRs
away, its targets at R multiples of that distance, and sizes the position so the loss at the
stop is ``risk_pct`` percent of equity::

    size = round_down(equity * risk_pct / 100 / (|entry - stop| * contract_size * quote_to_account))

rounded down to the instrument's lot step and clipped to its limits (a size that rounds to
less than the minimum lot gives no plan: it could only be placed by risking more than asked).
It is valid for ``valid_bars`` bars of its timeframe. The id is a hash of the signal's
provenance and every term of the plan, so the same signal under the same configuration always
gives the same id, on any machine.

The ATR the stop uses is tracked per stream by :class:`AtrTracker` (Wilder's ATR with TA-Lib's
seeding, the same numbers as :func:`dynamic_core.indicators.atr`).
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Mapping
from typing import Annotated, Any

import msgspec
import numpy as np

from ..instruments import instruments
from ..payloads import TradingPlan, checked
from ..records import SIGNAL_DSI
from .specs import CurrencyCode, InstrumentSpec, check_fields, instrument_spec, quote_to_account

__all__ = ["AtrTracker", "PlanConfig", "assemble_plan", "build_plan", "make_plan", "plan_id_for", "signal_id_for",
           "size_batch", "valid_until_fits"]


class PlanConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How signals become plans.

    Attributes
    ----------
    risk_pct : float
        Percent of equity lost at the stop.
    stop_atr : float
        Stop distance in ATRs.
    targets_r : tuple of float
        Take-profit levels in multiples of the stop distance (R); the first is the order's.
    valid_bars : int
        Bars of the signal's timeframe the plan may still be entered.
    atr_period : int
        Period of the ATR behind the stop.
    min_action : int
        Smallest ``|action|`` that makes a plan (1: BUY/SELL and stronger, 2: STRONG only).
    min_score : float
        When > 0, a signal whose ``|score|`` reaches it also makes a plan in the score's
        direction, whatever its action. The fused score of a large, diverse population is a
        small number (votes cancel), so its action is mostly HOLD; this trades its lean.
    account : str
        Account currency.

    Every field is checked on construction as on decoding (``ValueError`` naming it; floats
    must be finite). A plan's validity, ``valid_bars`` bars of its timeframe after its bar,
    must end by int64 nanoseconds (the year 2262): a signal whose window would not (10,000
    monthly bars) makes no plan.
    """

    risk_pct: Annotated[float, msgspec.Meta(gt=0.0, le=100.0)] = 0.5
    stop_atr: Annotated[float, msgspec.Meta(gt=0.0, le=100.0)] = 2.0
    targets_r: Annotated[tuple[Annotated[float, msgspec.Meta(gt=0.0)], ...], msgspec.Meta(max_length=8)] = (1.5, 3.0)
    valid_bars: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 1
    atr_period: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 14
    min_action: Annotated[int, msgspec.Meta(ge=1, le=2)] = 1
    min_score: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.0
    account: CurrencyCode = "USD"

    def __post_init__(self) -> None:
        check_fields(self)


_I64_MAX = 2**63 - 1
_NS = 1_000_000_000


def valid_until_fits(cfg: PlanConfig, ts: int, timeframe: int) -> bool:
    """Whether ``ts + valid_bars * timeframe`` seconds is still an int64 nanosecond time."""
    return cfg.valid_bars * timeframe <= (_I64_MAX - max(ts, 0)) // _NS


def signal_id_for(population_hash: int, seq: int) -> str:
    """The id a signal is known by everywhere (rationales, plans, attribution)."""
    return f"{population_hash:016x}:{seq}"


_ID_PACK = struct.Struct("<qIQbdddd")
_pack_id = _ID_PACK.pack
_blake2b = hashlib.blake2b


def plan_id_for(signal_id: str, instrument: str, timeframe: int, ts: int, seq: int, direction: int,
                entry: float, stop: float, size: float, target: float) -> str:
    """A 16-hex-digit id: BLAKE2b over the signal's provenance and the plan's terms."""
    return _blake2b(b"".join((signal_id.encode(), instrument.encode(),
                              _pack_id(ts, timeframe, seq, direction, entry, stop, size, target))),
                    digest_size=8).hexdigest()


class AtrTracker:
    """Streaming Wilder ATR per (instrument, timeframe), seeded as TA-Lib seeds it.

    The first ATR is the mean of the first ``period`` true ranges (true ranges start at the
    second bar); after that ``atr = (atr * (period - 1) + tr) / period``. ``value`` is NaN
    until then, exactly where :func:`dynamic_core.indicators.atr` is NaN.
    """

    __slots__ = ("_state", "period")

    def __init__(self, period: int = 14) -> None:
        if period < 1:
            raise ValueError("period must be >= 1")
        self.period = int(period)
        # key -> [prev_close, n_tr, tr_sum, atr]
        self._state: dict[tuple[int, int], list[float]] = {}

    def update(self, instrument: int, timeframe: int, high: float, low: float, close: float) -> float:
        """Take one bar; return the ATR after it (NaN while warming up)."""
        key = (instrument, timeframe)
        st = self._state.get(key)
        if st is None:
            self._state[key] = [close, 0.0, 0.0, math.nan]
            return math.nan
        prev = st[0]
        tr = max(high - low, abs(high - prev), abs(low - prev))
        st[0] = close
        n = self.period
        if st[1] < n:
            st[1] += 1.0
            st[2] += tr
            if st[1] == n:
                st[3] = st[2] / n
            return st[3]
        st[3] = (st[3] * (n - 1) + tr) / n
        return st[3]

    def update_bars(self, bars: np.ndarray) -> None:
        """Take a ``BAR_DTYPE`` array in order."""
        upd = self.update
        for i, tf, h, lo, c in zip(bars["instrument"].tolist(), bars["timeframe"].tolist(), bars["high"].tolist(),
                                   bars["low"].tolist(), bars["close"].tolist()):
            upd(i, tf, h, lo, c)

    def value(self, instrument: int, timeframe: int) -> float:
        st = self._state.get((instrument, timeframe))
        return math.nan if st is None else st[3]

    def last_close(self, instrument: int, timeframe: int) -> float:
        st = self._state.get((instrument, timeframe))
        return math.nan if st is None else st[0]


def make_plan(signal: Any, *, entry: float, atr: float, equity: float, config: PlanConfig | None = None,
              spec: InstrumentSpec | None = None, prices: Mapping[str, float] | None = None,
              contributors: tuple[int, ...] = (), rationale: str = "", rationale_provider: str = "",
              providers_agreeing: int = 0) -> TradingPlan | None:
    """The plan for one signal, or ``None`` when it calls for none.

    Parameters
    ----------
    signal : AISignal or SIGNAL_DTYPE record
        The fused signal.
    entry : float
        Entry price (the signal bar's close).
    atr : float
        The stream's ATR at that bar.
    equity : float
        Account equity the risk is a percentage of.
    spec : InstrumentSpec, optional
        Contract of the instrument (default: :func:`instrument_spec`).
    prices : mapping, optional
        Last prices of other instruments, to convert a quote currency that is neither the
        account's nor the instrument's base (e.g. EURJPY via USDJPY).

    Returns ``None`` for a HOLD (or weaker than ``min_action``), a non-finite or zero ATR,
    entry or equity, a stop distance that rounds to nothing, a currency conversion that is not
    a finite rate > 0, a validity window past int64 nanoseconds, or a size below the minimum
    lot: never an arithmetic error. Everything else becomes a plan; whether it may be traded is
    the governor's call. :class:`~dynamic_core.errors.PayloadError` (a ValueError) for an
    ``AISignal`` a receiver would refuse (one built in Python is unchecked: see
    :func:`~dynamic_core.payloads.checked`).
    """
    if isinstance(signal, np.void):
        instrument = instruments.name(int(signal["instrument"]))
        timeframe, ts, seq = int(signal["timeframe"]), int(signal["ts"]), int(signal["seq"])
        action, score = int(signal["action"]), float(signal["score"])
        confidence, agreement = float(signal["confidence"]), float(signal["agreement"])
        pop_hash, dispersion, n_agents = int(signal["population_hash"]), float(signal["dispersion"]), int(signal["n_agents"])
        flags, dsi = int(signal["flags"]), float(signal["dsi"])
    else:
        # a Struct built in Python is not checked against its schema (its ids go into the plan's
        # id and the signal id): as a receiver would decode it, or PayloadError naming the field
        signal = checked(signal)
        instrument, timeframe, ts, seq = signal.instrument, signal.timeframe, signal.ts, signal.seq
        action, score, confidence, agreement = signal.action, signal.score, signal.confidence, signal.agreement
        pop_hash, dispersion, n_agents = signal.population_hash, signal.dispersion, signal.n_agents
        flags, dsi = signal.flags, signal.dsi
    return build_plan(instrument, timeframe, ts, seq, pop_hash, action, score, confidence, agreement, dispersion,
                      n_agents, entry=entry, atr=atr, equity=equity, config=config, spec=spec, prices=prices,
                      contributors=contributors, rationale=rationale, rationale_provider=rationale_provider,
                      providers_agreeing=providers_agreeing, dsi=dsi if flags & SIGNAL_DSI else None)


def build_plan(instrument: str, timeframe: int, ts: int, seq: int, pop_hash: int, action: int, score: float,
               confidence: float, agreement: float, dispersion: float, n_agents: int, *, entry: float, atr: float,
               equity: float, config: PlanConfig | None = None, spec: InstrumentSpec | None = None,
               prices: Mapping[str, float] | None = None, contributors: tuple[int, ...] = (), rationale: str = "",
               rationale_provider: str = "", providers_agreeing: int = 0,
               dsi: float | None = None) -> TradingPlan | None:
    """:func:`make_plan` from the signal's fields (the decision maker's path: no record access).
    ``dsi``: the signal's DSI evidence (None: none was set); the plan carries
    ``evidence["dsi"]`` = direction x dsi."""
    cfg = config if config is not None else _DEFAULT_CONFIG
    if abs(action) >= cfg.min_action:
        direction = 1 if action > 0 else -1
    elif cfg.min_score > 0.0 and abs(score) >= cfg.min_score:
        direction = 1 if score > 0 else -1
    else:
        return None
    if not (atr > 0.0 and math.isfinite(atr) and entry > 0.0 and math.isfinite(entry) and equity > 0.0
            and math.isfinite(equity)):
        return None
    if not valid_until_fits(cfg, ts, timeframe):
        return None
    sp = spec if spec is not None else instrument_spec(instrument)
    dist = cfg.stop_atr * atr
    stop = entry - direction * dist
    # the same tests, in the same IEEE arithmetic, as size_batch
    if not (stop > 0.0 and stop != entry):  # a stop distance lost in the entry's rounding is none
        return None
    if sp.quote == cfg.account:
        conv = 1.0
    else:
        try:
            conv = quote_to_account(sp, entry, cfg.account, prices)
        except (KeyError, ZeroDivisionError):
            return None
    risk_per_lot = dist * sp.contract_size * conv
    if not risk_per_lot > 0.0:  # (size_batch: x / 0 is inf there, refused below as here)
        return None
    lots = equity * cfg.risk_pct / 100.0 / risk_per_lot
    if not 0.0 < lots < math.inf:
        return None
    size = sp.round_lots(lots)
    if size <= 0.0:
        return None
    return assemble_plan(cfg, instrument, timeframe, ts, seq, pop_hash, direction, action, score, confidence,
                         agreement, dispersion, n_agents, entry, atr, dist, stop, size, risk_per_lot, contributors,
                         rationale, rationale_provider, providers_agreeing,
                         None if dsi is None else {"dsi": direction * dsi})


def assemble_plan(cfg: PlanConfig, instrument: str, timeframe: int, ts: int, seq: int, pop_hash: int,
                  direction: int, action: int, score: float, confidence: float, agreement: float, dispersion: float,
                  n_agents: int, entry: float, atr: float, dist: float, stop: float, size: float,
                  risk_per_lot: float, contributors: tuple[int, ...] = (), rationale: str = "",
                  rationale_provider: str = "", providers_agreeing: int = 0,
                  extra: dict[str, float] | None = None, targets: tuple[float, ...] | None = None) -> TradingPlan:
    """The :class:`TradingPlan` of terms already sized: targets, ids, validity, evidence.
    ``targets``: the plan's targets when already computed (:func:`target_batch`)."""
    if targets is None:
        # a short's far targets can fall below zero: those are dropped (no price gets there)
        targets = tuple([t for t in [entry + direction * r * dist for r in cfg.targets_r] if t > 0.0])
    evidence = {"dispersion": dispersion, "n_agents": float(n_agents), "atr": atr}
    if extra:
        evidence.update(extra)
    signal_id = f"{pop_hash:016x}:{seq}"
    return _new_plan(signal_id, signal_id.encode() + instrument.encode(), instrument, timeframe, ts, seq, direction,
                     action, entry, stop, targets, size, size * risk_per_lot,
                     ts + cfg.valid_bars * timeframe * 1_000_000_000, score, confidence, agreement, atr,
                     contributors, evidence, rationale, rationale_provider, providers_agreeing)


_replace = msgspec.structs.replace
_ID_HASH = hashlib.blake2b(digest_size=8)  # copied per id: cheaper than a new one


def _new_plan(signal_id: str, id_prefix: bytes, instrument: str, timeframe: int, ts: int, seq: int,
              direction: int, action: int, entry: float, stop: float, targets: tuple[float, ...], size: float,
              risk_amount: float, valid_until: int, score: float, confidence: float, agreement: float, atr: float,
              contributors: tuple[int, ...], evidence: dict[str, float], rationale: str, rationale_provider: str,
              providers_agreeing: int) -> TradingPlan:
    """The plan with these terms and its id (:func:`plan_id_for`, whose hash input starts with
    ``id_prefix``: the signal id and the instrument's name, encoded)."""
    h = _ID_HASH.copy()
    h.update(id_prefix)
    h.update(_pack_id(ts, timeframe, seq, direction, entry, stop, size, targets[0] if targets else 0.0))
    pid = h.hexdigest()
    # built in two calls of at most 15 keywords each: a call with more passes them as a dict
    # (CPython's CALL_FUNCTION_EX), which costs more than both calls together
    plan = TradingPlan(plan_id=pid, signal_id=signal_id, instrument=instrument, timeframe=timeframe, ts=ts,
                       seq=seq, direction=direction, action=action, entry=entry, stop=stop, targets=targets,
                       size=size, risk_amount=risk_amount, valid_until=valid_until, score=score)
    return _replace(plan, confidence=confidence, agreement=agreement, atr=atr, contributors=contributors,
                    evidence=evidence, rationale=rationale, rationale_provider=rationale_provider,
                    providers_agreeing=providers_agreeing)


def size_batch(cfg: PlanConfig, entry: np.ndarray, atr: np.ndarray, direction: np.ndarray, contract: np.ndarray,
               conv: np.ndarray, step: np.ndarray, inv: np.ndarray, min_lot: np.ndarray, max_lot: np.ndarray,
               equity: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`build_plan`'s stop and sizing arithmetic over arrays, the same IEEE operations in
    the same order (so a batch and one-at-a-time give the same plans bit for bit). ``inv`` is
    ``1 / lot_step`` where that is whole, else 0 (those rows need :meth:`round_lots`; their
    size comes back NaN). Returns (dist, stop, size, risk_per_lot, ok). (The validity window's
    int64 bound is the caller's: it needs the rows' times.)"""
    with np.errstate(all="ignore"):
        ok = (atr > 0.0) & np.isfinite(atr) & (entry > 0.0) & np.isfinite(entry) & (0.0 < equity < math.inf)
        dist = cfg.stop_atr * atr
        stop = entry - direction * dist
        ok &= (stop > 0.0) & (stop != entry)  # dist > 0 lost in the entry's rounding: no stop
        rpl = dist * contract * conv
        # a risk per lot that is 0, NaN, < 0 or inf leaves lots inf, NaN, < 0 or 0: refused here
        lots = equity * cfg.risk_pct / 100.0 / rpl
        ok &= (lots > 0.0) & (lots < math.inf)
        steps = np.floor(np.where(ok, lots, 0.0) / step + 1e-9)
        size = np.where(inv > 0, steps / np.where(inv > 0, inv, 1.0), np.nan)
        size = np.where(size < min_lot - 1e-12, 0.0, np.minimum(size, max_lot))
        ok &= (size > 0.0) | np.isnan(size)
    return dist, stop, size, rpl, ok


def target_batch(cfg: PlanConfig, entry: np.ndarray, direction: np.ndarray, dist: np.ndarray) -> list[tuple[float, ...]]:
    """Each row's targets, as :func:`assemble_plan` computes them one plan at a time (the same
    IEEE operations: ``entry + direction * r * dist``; targets at or below zero dropped)."""
    if not cfg.targets_r:
        return [()] * len(entry)
    with np.errstate(all="ignore"):
        cols = [entry + direction * r * dist for r in cfg.targets_r]
    rows = list(zip(*[c.tolist() for c in cols]))
    good = cols[0] > 0.0
    for c in cols[1:]:
        good &= c > 0.0
    if not good.all():
        for j in np.flatnonzero(~good).tolist():
            rows[j] = tuple([t for t in rows[j] if t > 0.0])
    return rows


_DEFAULT_CONFIG = PlanConfig()
