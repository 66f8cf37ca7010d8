"""Immutable, versioned payloads for everything that crosses a process boundary (msgspec Structs).

Every payload is a ``msgspec.Struct(frozen=True, kw_only=True, forbid_unknown_fields=True)``
with a tag (the ``"type"`` key on the wire) and a ``version`` field (:data:`PAYLOAD_VERSION`).
On the wire a payload is one msgpack map (or, on request, one JSON object) whose keys are the
field names::

    {"type": "signal_batch", "version": 1, "epoch": 81985529216486895, "seq": 40,
     "signals": [{"type": "signal", "version": 1, "ts": 1704067200000000000,
                  "instrument": "EURUSD", "timeframe": 3600, ...}, ...]}

Decoding is strict and typed: an unknown ``type``, an unknown field, a version this build does
not speak, a value of the wrong type or out of range, truncated or garbage bytes and frames over
the size bound all raise :class:`dynamic_core.errors.PayloadError` with a ``reason``, and the
:class:`Codec` that saw it counts it. Nothing in here raises anything else on bad input.

Kinds of payload and where they travel:

================================  ===================  =========================================
payload                           socket               notes
================================  ===================  =========================================
:class:`PreparedMarketContext`    market ingress       bars of ONE (instrument, timeframe), columnar
:class:`SignalBatch`              signal feed          signals of one topic + epoch + sequence
:class:`Heartbeat`                signal feed          sent when the feed is idle
:class:`RationaleUpdate`          signal feed          reasoning text for an earlier signal
:data:`ControlCommand` (union)    control plane        Pause, Resume, SetThrottle, ... each with
                                                       a ``request_id``
:class:`ControlReply`             control plane        ``ok``, ``result`` or ``error``
:class:`Reject`                   dead-letter lists    why a frame was refused
================================  ===================  =========================================

Construction is not checked: msgspec checks types and constraints when it decodes, so a Struct
built in Python with a bad field (``AISignal(action=99, ...)``) encodes as is and only its
receiver refuses it. :func:`checked` gives a payload as a receiver would decode it (or the
PayloadError the receiver would raise), for code that builds payloads by hand.

Versioning: ``version`` is checked during decoding (``1 <= version <= PAYLOAD_VERSION``), for
nested payloads too. A newer peer that adds a field must bump the version; an older decoder
then refuses the frame (``unknown_field`` or ``version``) instead of misreading it.
"""

from __future__ import annotations

import functools
import math
import struct
import typing
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import msgspec
import numpy as np

from ._checks import is_int, is_real
from .errors import PayloadError
from .instruments import MAX_NAME, instruments
from .records import BAR_DTYPE, SIGNAL_DSI, SIGNAL_DTYPE

__all__ = [
    "BATCH_MAX",
    "CONTROL_COMMANDS",
    "DEFAULT_MAX_FRAME",
    "MAX_BARS_PER_S",
    "PAYLOAD_VERSION",
    "AISignal",
    "AdapterBeat",
    "AdapterBye",
    "AdapterHello",
    "Codec",
    "ControlCommand",
    "ControlReply",
    "CreditUpdate",
    "DsiEvidence",
    "EvolutionConfig",
    "ExternalScores",
    "FeedMessage",
    "GenerationEvent",
    "HealthQuery",
    "Heartbeat",
    "LoadPopulation",
    "MeshFromAdapter",
    "MeshShutdown",
    "MeshToAdapter",
    "Pause",
    "PlanDecision",
    "PreparedMarketContext",
    "RationaleUpdate",
    "ReasonReply",
    "ReasonRequest",
    "ReasoningContext",
    "Reject",
    "Resume",
    "Review",
    "ReviewQuery",
    "SetThrottle",
    "SignalBatch",
    "Snapshot",
    "SwapPersona",
    "TradingPlan",
    "UpdateRouting",
    "batch_frames",
    "checked",
    "decode_command",
    "encode_batch",
    "encode_command",
    "encode_signal_batch",
    "evolution_config",
    "plain",
    "signal_from_bytes",
    "signal_from_record",
    "signals_from_records",
    "signals_to_records",
    "split_bars",
    "split_batch",
]

PAYLOAD_VERSION = 2
"""Schema version written by this build; decoders accept 1..PAYLOAD_VERSION.
2: :class:`AISignal` carries ``dsi`` (version-1 signals decode with ``dsi=0.0``, no flag)."""

DEFAULT_MAX_FRAME = 16 * 1024 * 1024
"""Frames above this many bytes are refused before decoding (``reason="oversized"``)."""

MAX_BARS_PER_CONTEXT = 1 << 20
MAX_BARS_PER_S = 1e12
"""Largest :class:`SetThrottle` rate (bars per second). Finite, so a token bucket never holds
infinitely many tokens; far above anything an engine takes (use 0 for "unlimited")."""
MAX_SIGNALS_PER_BATCH = 1 << 20
MAX_TEXT = 1 << 20

# Constrained scalar types: checked by msgspec while decoding, at C speed.
Version = Annotated[int, msgspec.Meta(ge=1, le=PAYLOAD_VERSION)]
U32 = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
# msgspec bounds must fit an int64; msgpack cannot carry more than 64 bits anyway, JSON can
# (such values decode and stay Python ints: the control server refuses a command it cannot
# encode, signals_to_records refuses them)
U64 = Annotated[int, msgspec.Meta(ge=0)]
I64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
Timeframe = Annotated[int, msgspec.Meta(ge=1, le=2**32 - 1)]
InstrumentName = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME)]
ShortText = Annotated[str, msgspec.Meta(max_length=256)]
Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT)]


class _Payload(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True,
               tag_field="type"):
    """Common base: frozen, keyword-only, strict, tagged by ``"type"``."""


# ---- signals ---------------------------------------------------------------------------------

class AISignal(_Payload, frozen=True, kw_only=True, forbid_unknown_fields=True,
               tag="signal", gc=False):
    """One fused consensus signal for an (instrument, timeframe, bar).

    ``action`` is an :class:`dynamic_core.Action` value (-2 STRONG_SELL .. 2 STRONG_BUY);
    ``votes`` counts warm agents per action in that order. ``seq`` is the ingress sequence
    number of the bar and, with ``population_hash``, identifies the signal across processes.
    ``population_hash`` is an unsigned 64-bit value (half of them above 2**63 - 1): in JSON read
    it as unsigned (Java ``Long.parseUnsignedLong`` on the number's text, MQL5 ``ulong``,
    JavaScript a ``BigInt``-aware parser).

    ``dsi`` is the microstructure validation: the stream's DSI evidence in [-1, 1] (positive:
    the tape leans to buying) that the bar's agents read, as last set by
    :meth:`dynamic_core.Engine.set_dsi`; ``flags & SIGNAL_DSI`` tells evidence that was set
    (possibly 0.0) from none at all. ``dsi_validation`` is the direction the consensus takes
    times that evidence: positive when the tape agrees with the signal.

    Not tracked by the garbage collector (``gc=False``: its fields are numbers, strings and a
    tuple of counts, which cannot form a cycle), so a consumer that keeps or creates millions
    of signals does not make every collection slower.
    """

    version: Version = PAYLOAD_VERSION
    ts: I64  # bar timestamp, ns since the epoch
    instrument: InstrumentName
    timeframe: Timeframe  # seconds
    seq: U64
    population_hash: U64
    score: float
    confidence: float
    agreement: float
    dispersion: float
    action: Annotated[int, msgspec.Meta(ge=-2, le=2)]
    n_agents: U32
    votes: tuple[U32, U32, U32, U32, U32]
    flags: U32 = 0
    dsi: Annotated[float, msgspec.Meta(ge=-1.0, le=1.0)] = 0.0

    @property
    def has_dsi(self) -> bool:
        """Whether DSI evidence had been set for the stream (``flags & SIGNAL_DSI``)."""
        return bool(self.flags & SIGNAL_DSI)

    @property
    def dsi_validation(self) -> float:
        """sign(score) x dsi: > 0 when the tape agrees with the consensus direction, < 0 when it
        disagrees, 0 without evidence or without a direction."""
        return (1.0 if self.score > 0 else -1.0 if self.score < 0 else 0.0) * self.dsi

    @property
    def id(self) -> str:
        """Stable signal id: population hash and sequence number."""
        return f"{self.population_hash:016x}:{self.seq}"


def _record_format(dtype: np.dtype) -> struct.Struct:
    """The ``struct`` format of a packed little-endian record dtype (fields in offset order, no
    gaps), so a record's bytes unpack in one call; ValueError for a layout it cannot say."""
    codes = {"<i8": "q", "<u8": "Q", "<i4": "i", "<u4": "I", "<f8": "d"}
    fmt, at = "<", 0
    for name in dtype.names:
        sub, off = dtype.fields[name][:2]
        base, shape = (sub.subdtype if sub.subdtype else (sub, ()))
        if off != at or base.str not in codes or len(shape) > 1:
            raise ValueError(f"record field {name!r} has no packed struct format")
        n = shape[0] if shape else 1
        fmt += (f"{n}" if n > 1 else "") + codes[base.str]
        at += sub.itemsize
    out = struct.Struct(fmt)
    if out.size != dtype.itemsize:
        raise ValueError("record dtype has trailing padding")
    return out


_SIGNAL_STRUCT = _record_format(SIGNAL_DTYPE)


def _signal(t: tuple, name_of: Callable[[int], str]) -> AISignal:
    """An :class:`AISignal` from one record unpacked by ``_SIGNAL_STRUCT``."""
    ts, inst, tf, sq, ph, sc, cf, ag, dp, ds, ac, na, v0, v1, v2, v3, v4, fl = t
    return AISignal(ts=ts, instrument=name_of(inst), timeframe=tf, seq=sq, population_hash=ph, score=sc,
                    confidence=cf, agreement=ag, dispersion=dp, action=ac, n_agents=na,
                    votes=(v0, v1, v2, v3, v4), flags=fl, dsi=ds)


def signal_from_bytes(raw: bytes) -> AISignal:
    """One ``SIGNAL_DTYPE`` record's bytes -> :class:`AISignal`, unpacked in one ``struct``
    call (no numpy record in between: what ``Engine.step`` returns per bar)."""
    return _signal(_SIGNAL_STRUCT.unpack(raw), instruments.name)


def signal_from_record(r: np.void) -> AISignal:
    """``SIGNAL_DTYPE`` record -> :class:`AISignal` (its bytes unpacked in one call)."""
    return signal_from_bytes(r.tobytes())


_SIGNAL_SCALARS = ("ts", "timeframe", "seq", "population_hash", "score", "confidence", "agreement",
                   "dispersion", "action", "n_agents", "flags", "dsi")


def signals_from_records(arr: np.ndarray) -> list[AISignal]:
    """A ``SIGNAL_DTYPE`` array -> list of :class:`AISignal`, the records' bytes unpacked by one
    ``struct`` iteration (faster than numpy's ``tolist`` per row or per field at every size)."""
    if arr.dtype != SIGNAL_DTYPE:
        raise TypeError(f"expected dtype dc.SIGNAL_DTYPE, got {arr.dtype}")
    name_of = instruments.names().__getitem__
    return [_signal(t, name_of) for t in _SIGNAL_STRUCT.iter_unpack(arr.tobytes())]


def signals_to_records(signals: Sequence[AISignal]) -> np.ndarray:
    """:class:`AISignal` objects -> ``SIGNAL_DTYPE`` array, with instrument ids of THIS process's
    registry (names are registered on first use, as ``dc.market.from_pandas`` does)."""
    out = np.zeros(len(signals), dtype=SIGNAL_DTYPE)
    if not signals:
        return out
    try:
        for f in _SIGNAL_SCALARS:
            out[f] = [getattr(s, f) for s in signals]
        out["instrument"] = [instruments.id(s.instrument) for s in signals]
        out["votes"] = [s.votes for s in signals]
    except (OverflowError, ValueError) as e:
        raise PayloadError("invalid", f"signal does not fit SIGNAL_DTYPE: {e}") from None
    return out


class SignalBatch(_Payload, frozen=True, kw_only=True, forbid_unknown_fields=True,
           tag="signal_batch"):
    """Signals of ONE feed topic (``sig.<instrument>.<timeframe>``), in bar order.

    ``epoch`` is the publishing feed's random id (a new one per feed instance, so a restarted
    publisher is recognisable; 63 bits, so it fits a signed 64-bit integer); ``seq`` is the per-topic sequence number of the
    first signal in the batch: the number of signals the feed published on this topic, in this
    epoch, before this batch. The next batch on the topic has ``seq + len(signals)``; anything
    else is a gap (``SignalSubscriber`` counts it in signals).
    """

    version: Version = PAYLOAD_VERSION
    epoch: U64
    seq: U64
    signals: Annotated[tuple[AISignal, ...], msgspec.Meta(max_length=MAX_SIGNALS_PER_BATCH)]


class RationaleUpdate(_Payload, frozen=True, kw_only=True, forbid_unknown_fields=True,
           tag="rationale"):
    """Reasoning text for an earlier signal (sent after it, never before: signals never wait).

    Travels on the feed topic ``rat.<instrument>.<timeframe>``; ``epoch``/``seq`` are filled in
    by the feed (``seq`` counts rationale messages per topic).
    """

    version: Version = PAYLOAD_VERSION
    signal_id: ShortText
    instrument: InstrumentName
    timeframe: Timeframe
    text: Text
    provider: ShortText = ""
    ts: I64 = 0  # ns since the epoch
    epoch: U64 = 0
    seq: U64 = 0


class Heartbeat(_Payload, frozen=True, kw_only=True, forbid_unknown_fields=True,
           tag="heartbeat"):
    """Liveness of an idle feed (topic ``hb``).

    ``seq`` counts heartbeats of this epoch; ``ts`` is the sender's wall clock (ns);
    ``next_seq`` maps each signal topic to the ``seq`` its next batch will carry, so a
    subscriber also detects a lost *last* batch (a tail gap) once the feed goes idle. It is left
    empty when the feed has more than 4096 topics.
    """

    version: Version = PAYLOAD_VERSION
    epoch: U64
    seq: U64
    ts: I64
    next_seq: Annotated[dict[str, U64], msgspec.Meta(max_length=4096)] = msgspec.field(default_factory=dict)


class Reject(_Payload, frozen=True, kw_only=True, forbid_unknown_fields=True,
           tag="reject"):
    """Why a frame was refused: ``reason`` as in :class:`~dynamic_core.errors.PayloadError`,
    the decoder's ``detail``, the frame ``size`` in bytes and the wall-clock ``ts`` (ns)."""

    version: Version = PAYLOAD_VERSION
    reason: ShortText
    detail: Text = ""
    size: Annotated[int, msgspec.Meta(ge=0)] = 0
    ts: I64 = 0


FeedMessage = SignalBatch | Heartbeat | RationaleUpdate
"""What a signal-feed subscriber decodes."""


# ---- market data -----------------------------------------------------------------------------

_FloatCol = Annotated[tuple[float, ...], msgspec.Meta(max_length=MAX_BARS_PER_CONTEXT)]


class PreparedMarketContext(_Payload, frozen=True, kw_only=True, forbid_unknown_fields=True,
           tag="market"):
    """A batch of bars of ONE stream (instrument, timeframe), columnar, in time order.

    Wire form (msgpack or JSON)::

        {"type": "market", "version": 1, "instrument": "EURUSD", "timeframe": 3600,
         "ts": [1704067200000000000, ...],          # int64 ns since the epoch (UTC)
         "open": [1.1, ...], "high": [...], "low": [...], "close": [...], "volume": [...]}

    Columns must all have the same length. Instruments travel by NAME (ids are per process);
    :meth:`to_bars` maps the name to this process's id, registering it on first use exactly as
    ``dc.market.from_pandas`` does. A context holds no validation beyond types: bad prices are
    the engine's to reject (with a reason, counted and dead-lettered), as for ``Engine.run``.
    JSON cannot carry NaN or infinity (msgspec writes ``null``), so such a bar makes the whole
    frame fail to decode instead.
    """

    version: Version = PAYLOAD_VERSION
    instrument: InstrumentName
    timeframe: Timeframe
    ts: Annotated[tuple[I64, ...], msgspec.Meta(max_length=MAX_BARS_PER_CONTEXT)]
    open: _FloatCol
    high: _FloatCol
    low: _FloatCol
    close: _FloatCol
    volume: _FloatCol

    def __len__(self) -> int:
        return len(self.ts)

    def to_bars(self) -> np.ndarray:
        """The bars as a ``BAR_DTYPE`` array; :class:`PayloadError` (``invalid``) when the
        columns differ in length or the instrument name is not a valid name."""
        n = len(self.ts)
        if not (len(self.open) == len(self.high) == len(self.low) == len(self.close)
                == len(self.volume) == n):
            raise PayloadError("invalid", "market context columns differ in length")
        try:
            iid = instruments.id(self.instrument)
        except ValueError as e:
            raise PayloadError("invalid", str(e)) from None
        out = np.empty(n, dtype=BAR_DTYPE)
        out["ts"] = self.ts
        out["instrument"] = iid
        out["timeframe"] = self.timeframe
        out["open"] = self.open
        out["high"] = self.high
        out["low"] = self.low
        out["close"] = self.close
        out["volume"] = self.volume
        return out

    @classmethod
    def from_bars(cls, bars: np.ndarray) -> PreparedMarketContext:
        """One context from bars of a single (instrument, timeframe); ValueError otherwise
        (use :func:`split_bars` for mixed arrays)."""
        b = _as_bar_array(bars)
        if len(b) == 0:
            raise ValueError("no bars")
        inst, tf = b["instrument"], b["timeframe"]
        if (inst != inst[0]).any() or (tf != tf[0]).any():
            raise ValueError("bars of several streams: use dynamic_core.payloads.split_bars")
        return cls._from_run(b)

    @classmethod
    def _from_run(cls, b: np.ndarray) -> PreparedMarketContext:
        return cls(instrument=instruments.name(int(b["instrument"][0])), timeframe=int(b["timeframe"][0]),
                   ts=tuple(b["ts"].tolist()), open=tuple(b["open"].tolist()),
                   high=tuple(b["high"].tolist()), low=tuple(b["low"].tolist()),
                   close=tuple(b["close"].tolist()), volume=tuple(b["volume"].tolist()))


def _as_bar_array(bars: np.ndarray) -> np.ndarray:
    if not isinstance(bars, np.ndarray) or bars.dtype != BAR_DTYPE or bars.ndim != 1:
        raise TypeError("expected a 1-d numpy array of dc.BAR_DTYPE")
    return bars


def split_bars(bars: np.ndarray, max_bars: int = 4096) -> list[PreparedMarketContext]:
    """Cut a (possibly mixed) bar array into contexts WITHOUT reordering: each context is a run
    of consecutive bars of one stream, at most ``max_bars`` long. Sent in order over one
    connection, the receiver submits exactly the original sequence, so the engine assigns the
    same sequence numbers as ``Engine.run(bars)`` would."""
    b = _as_bar_array(bars)
    if max_bars < 1:
        raise ValueError("max_bars must be >= 1")
    n = len(b)
    if n == 0:
        return []
    key = b["instrument"].astype(np.uint64) << np.uint64(32) | b["timeframe"].astype(np.uint64)
    cuts = np.flatnonzero(key[1:] != key[:-1]) + 1
    starts = np.concatenate(([0], cuts))
    ends = np.concatenate((cuts, [n]))
    out = []
    for s, e in zip(starts.tolist(), ends.tolist()):
        for k in range(s, e, max_bars):
            out.append(PreparedMarketContext._from_run(b[k:min(e, k + max_bars)]))
    return out


# ---- control plane ---------------------------------------------------------------------------

class _Command(_Payload, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of control commands: each carries the ``request_id`` its reply will echo."""

    version: Version = PAYLOAD_VERSION
    request_id: U64 = 0


class Pause(_Command, frozen=True, kw_only=True, forbid_unknown_fields=True,
           tag="pause"):
    """Stop taking market updates; those already queued in the socket wait there (up to its HWM)."""


class Resume(_Command, frozen=True, kw_only=True, forbid_unknown_fields=True,
           tag="resume"):
    """Take market updates again after a :class:`Pause`."""


class SetThrottle(_Command, frozen=True, kw_only=True, forbid_unknown_fields=True,
           tag="set_throttle"):
    """Submit at most ``max_bars_per_s`` bars per second to the engine (0 = unlimited; at most
    :data:`MAX_BARS_PER_S`: infinity and NaN are refused)."""

    max_bars_per_s: Annotated[float, msgspec.Meta(ge=0.0, le=MAX_BARS_PER_S)]


class SwapPersona(_Command, frozen=True, kw_only=True, forbid_unknown_fields=True,
           tag="swap_persona"):
    """Switch the reasoning persona (a name the reasoning mesh understands)."""

    persona: ShortText


class UpdateRouting(_Command, frozen=True, kw_only=True, forbid_unknown_fields=True,
           tag="update_routing"):
    """Replace the reasoning mesh's routing table: ``CLASS[/PERSONA[/ASSET_CLASS]]`` ->
    comma-separated providers, most preferred first, routed ahead of the policy's own rules
    (:func:`dynamic_core.reasoning.policy.routing_rules`); an empty table drops it."""

    table: Annotated[dict[ShortText, ShortText], msgspec.Meta(max_length=65536)]


class LoadPopulation(_Command, frozen=True, kw_only=True, forbid_unknown_fields=True,
           tag="load_population"):
    """Load a population: ``records`` (raw ``GENOME_DTYPE`` bytes) or a ``path`` to a ``.npy``
    file on the server. Exactly one of the two."""

    records: bytes | None = None
    path: Annotated[str, msgspec.Meta(max_length=4096)] | None = None


class Snapshot(_Command, frozen=True, kw_only=True, forbid_unknown_fields=True,
           tag="snapshot"):
    """Write the agents' state (``engine.agents()``) to ``path`` (``.npy``) on the server."""

    path: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]


class HealthQuery(_Command, frozen=True, kw_only=True, forbid_unknown_fields=True,
           tag="health"):
    """Ask for the engine's and the service's counters (``engine.stats()`` and more)."""


class ReviewQuery(_Command, frozen=True, kw_only=True, forbid_unknown_fields=True,
           tag="review_list"):
    """List the reasoning mesh's review queue (conflicting or low-confidence rationales)."""

    limit: Annotated[int, msgspec.Meta(ge=1, le=10000)] = 100


class Review(_Command, frozen=True, kw_only=True, forbid_unknown_fields=True,
           tag="review"):
    """Approve or reject one queued rationale (``item`` from :class:`ReviewQuery`); the decision
    adjusts the answering adapter's ensemble weight."""

    item: U64
    approve: bool
    note: ShortText = ""


ControlCommand = (Pause | Resume | SetThrottle | SwapPersona | UpdateRouting | LoadPopulation | Snapshot
                  | HealthQuery | ReviewQuery | Review)
"""Tagged union of every control command."""

CONTROL_COMMANDS: tuple[type, ...] = (Pause, Resume, SetThrottle, SwapPersona, UpdateRouting,
                                      LoadPopulation, Snapshot, HealthQuery, ReviewQuery, Review)


class ControlReply(_Payload, frozen=True, kw_only=True, forbid_unknown_fields=True,
           tag="reply"):
    """The answer to one control command: ``ok`` with a ``result`` mapping (plain msgpack/JSON
    values), or ``ok=False`` with an ``error`` message. ``request_id`` echoes the command's (0
    when the command was too malformed to read one)."""

    version: Version = PAYLOAD_VERSION
    request_id: U64 = 0
    ok: bool
    result: dict[str, Any] = msgspec.field(default_factory=dict)
    error: Text | None = None



# ---- reasoning mesh (broker ROUTER <-> adapter DEALER) -----------------------------------------
# One frame per message after the ROUTER identity. Adapters announce themselves (AdapterHello),
# heartbeat (AdapterBeat), answer requests (ReasonReply) and say goodbye (AdapterBye); the broker
# sends requests (ReasonRequest) and MeshShutdown.

Role = Annotated[str, msgspec.Meta(pattern="^(system|user|assistant)$")]
Action = Annotated[int, msgspec.Meta(ge=-2, le=2)]


class ReasoningContext(_Payload, frozen=True, kw_only=True, forbid_unknown_fields=True,
           tag="reasoning_context"):
    """The compact numeric context a rationale is written from: one signal plus a few named
    features (``features``, e.g. ``{"atr_pct": 0.4, "ret_20": -1.2}``). ``signal_id`` is the
    signal's :attr:`AISignal.id` and is what the :class:`RationaleUpdate` refers to."""

    version: Version = PAYLOAD_VERSION
    signal_id: ShortText
    instrument: InstrumentName
    timeframe: Timeframe
    ts: I64 = 0
    seq: U64 = 0
    action: Action = 0
    score: float = 0.0
    confidence: float = 0.0
    agreement: float = 0.0
    dispersion: float = 0.0
    n_agents: U32 = 0
    asset_class: ShortText = "fx"
    persona: ShortText = ""
    language: ShortText = "en"
    features: Annotated[dict[ShortText, float], msgspec.Meta(max_length=64)] = msgspec.field(default_factory=dict)


class AdapterHello(_Payload, frozen=True, kw_only=True, forbid_unknown_fields=True,
           tag="adapter_hello"):
    """An adapter's capability announcement, sent on connect (and again if the broker restarts)."""

    version: Version = PAYLOAD_VERSION
    provider: ShortText
    kind: ShortText
    model: ShortText = ""
    context_window: U32 = 0
    usd_per_m_input: Annotated[float, msgspec.Meta(ge=0.0)] = 0.0
    usd_per_m_output: Annotated[float, msgspec.Meta(ge=0.0)] = 0.0
    latency_class: ShortText = "standard"
    personas: Annotated[tuple[ShortText, ...], msgspec.Meta(max_length=256)] = ()
    languages: Annotated[tuple[ShortText, ...], msgspec.Meta(max_length=256)] = ()
    style: ShortText = "narrative"
    max_concurrency: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 1
    pid: U32 = 0


class AdapterBeat(_Payload, frozen=True, kw_only=True, forbid_unknown_fields=True,
           tag="adapter_beat"):
    """Adapter liveness: requests it is working on and its wall clock (ns)."""

    version: Version = PAYLOAD_VERSION
    in_flight: U32 = 0
    ts: I64 = 0


class AdapterBye(_Payload, frozen=True, kw_only=True, forbid_unknown_fields=True,
           tag="adapter_bye"):
    """An adapter leaving on purpose; its in-flight requests fail over at once."""

    version: Version = PAYLOAD_VERSION
    reason: ShortText = ""


class ReasonRequest(_Payload, frozen=True, kw_only=True, forbid_unknown_fields=True,
           tag="reason_request"):
    """One attempt at one task: the prompt (``messages``, already fitted to the adapter's
    context window) and the context it came from (the local narrator writes from that)."""

    version: Version = PAYLOAD_VERSION
    task_id: U64
    attempt: Annotated[int, msgspec.Meta(ge=0, le=255)] = 0
    context: ReasoningContext
    messages: Annotated[tuple[tuple[Role, Text], ...], msgspec.Meta(max_length=32)] = ()
    template: ShortText = ""
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=1 << 20)] = 256
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=2.0)] = 0.0
    timeout_ms: Annotated[int, msgspec.Meta(ge=1, le=3_600_000)] = 30_000
    json_mode: bool = False


class ReasonReply(_Payload, frozen=True, kw_only=True, forbid_unknown_fields=True,
           tag="reason_reply"):
    """The outcome of one :class:`ReasonRequest`: ``text`` and token counts, or an
    :class:`~dynamic_core.errors.AdapterError` kind with a redacted message."""

    version: Version = PAYLOAD_VERSION
    task_id: U64
    attempt: Annotated[int, msgspec.Meta(ge=0, le=255)] = 0
    ok: bool
    text: Text = ""
    model: ShortText = ""
    tokens_in: U32 = 0
    tokens_out: U32 = 0
    model_ms: Annotated[float, msgspec.Meta(ge=0.0)] = 0.0
    error_kind: ShortText = ""
    error: Text = ""
    status: Annotated[int, msgspec.Meta(ge=0, le=999)] | None = None
    retry_after: Annotated[float, msgspec.Meta(ge=0.0)] | None = None


class MeshShutdown(_Payload, frozen=True, kw_only=True, forbid_unknown_fields=True,
           tag="mesh_shutdown"):
    """The broker asks an adapter process to finish and exit."""

    version: Version = PAYLOAD_VERSION


# ---- decision: trading plans and the governor's verdicts --------------------------------------

Verdict = Annotated[str, msgspec.Meta(pattern="^(APPROVED|MODIFIED|REJECTED)$")]
_Price = Annotated[float, msgspec.Meta(ge=0.0)]


class TradingPlan(_Payload, frozen=True, kw_only=True, forbid_unknown_fields=True,
                  tag="plan", gc=False):
    """What to trade on one signal: direction, entry, stop, targets, size, validity, and the
    evidence behind it. Built by :func:`dynamic_core.decision.make_plan`; ``plan_id`` is a
    deterministic hash of the signal's provenance and the plan's terms, so the same signal and
    configuration always give the same id (the bridge derives its ``client_order_id`` from it).

    Prices are in the instrument's quote currency, ``size`` in lots, ``risk_amount`` in the
    account currency (the loss at the stop for ``size`` lots, before costs).

    Not tracked by the garbage collector (``gc=False``: its fields are numbers, strings and
    containers of them, which cannot form a cycle), so a long session that keeps its plans does
    not make every collection slower.
    """

    version: Version = PAYLOAD_VERSION
    plan_id: ShortText
    signal_id: ShortText
    instrument: InstrumentName
    timeframe: Timeframe
    ts: I64
    seq: U64
    direction: Annotated[int, msgspec.Meta(ge=-1, le=1)]
    action: Action
    entry: _Price
    stop: _Price
    targets: Annotated[tuple[_Price, ...], msgspec.Meta(max_length=8)] = ()
    size: Annotated[float, msgspec.Meta(ge=0.0)]
    risk_amount: Annotated[float, msgspec.Meta(ge=0.0)] = 0.0
    valid_until: I64
    score: float = 0.0
    confidence: float = 0.0
    agreement: float = 0.0
    atr: Annotated[float, msgspec.Meta(ge=0.0)] = 0.0
    contributors: Annotated[tuple[U32, ...], msgspec.Meta(max_length=64)] = ()
    evidence: Annotated[dict[ShortText, float], msgspec.Meta(max_length=64)] = msgspec.field(default_factory=dict)
    rationale: Text = ""
    rationale_provider: ShortText = ""
    providers_agreeing: U32 = 0


class PlanDecision(_Payload, frozen=True, kw_only=True, forbid_unknown_fields=True,
                   tag="decision", gc=False):
    """The risk governor's verdict on one plan, journaled for every plan.

    ``reasons`` are machine-readable codes (e.g. ``max_open_positions``, ``min_confidence``,
    ``resized_exposure``); ``detail`` holds the numbers behind them (limit and value).
    ``plan`` is the plan as approved (resized when ``MODIFIED``) or as proposed (``REJECTED``).
    """

    version: Version = PAYLOAD_VERSION
    plan_id: ShortText
    verdict: Verdict
    reasons: Annotated[tuple[ShortText, ...], msgspec.Meta(max_length=64)] = ()
    detail: Annotated[dict[ShortText, float], msgspec.Meta(max_length=128)] = msgspec.field(default_factory=dict)
    original_size: Annotated[float, msgspec.Meta(ge=0.0)] = 0.0
    plan: TradingPlan
    ts: I64 = 0


class CreditUpdate(_Payload, frozen=True, kw_only=True, forbid_unknown_fields=True,
                   tag="credit"):
    """New consensus-weight credits of some agents, earned by live outcomes (journaled as an
    event record and applied between the same updates on replay).

    ``agents`` are agent ids as little-endian uint32, ``credit`` the matching float64 values.
    """

    version: Version = PAYLOAD_VERSION
    agents: Annotated[bytes, msgspec.Meta(max_length=4 << 24)]
    credit: Annotated[bytes, msgspec.Meta(max_length=8 << 24)]


class DsiEvidence(_Payload, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="dsi"):
    """DSI microstructure evidence in [-1, 1] per instrument (by name), read by the agents with
    ``w_dsi != 0`` from the next update on; journaled as an event record and applied between the
    same updates on replay (:meth:`dynamic_core.Engine.set_dsi`)."""

    version: Version = PAYLOAD_VERSION
    instruments: Annotated[tuple[ShortText, ...], msgspec.Meta(max_length=65_536)]
    evidence: Annotated[tuple[Annotated[float, msgspec.Meta(ge=-1.0, le=1.0)], ...], msgspec.Meta(max_length=65_536)]


class ExternalScores(_Payload, frozen=True, kw_only=True, forbid_unknown_fields=True,
                     tag="ext_scores"):
    """Scores of external-score agents (genome kind 1, e.g. learning agents) for the next
    updates, journaled as an event record and applied between the same updates on replay.

    ``agents`` are agent ids as little-endian uint32, ``scores`` the matching float64 values.
    """

    version: Version = PAYLOAD_VERSION
    agents: Annotated[bytes, msgspec.Meta(max_length=4 << 24)]
    scores: Annotated[bytes, msgspec.Meta(max_length=8 << 24)]


class EvolutionConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How one generation of in-place evolution judges, selects, recombines and mutates
    (:mod:`dynamic_core.learning.evolution`). Journaled with every generation, so replay applies
    the same generation.

    Fitness of an agent is its per-bar Sharpe ratio (mean / std of its returns over the warm bars
    since its birth) minus ``dd_penalty`` x its worst drawdown. Agents younger than ``min_age``
    bars are not judged; judged agents need ``min_trades`` closed trades to be parents. The
    weakest ``replace_fraction`` of each SM's judged agents are replaced, all but one at most
    (1.0 keeps the fittest to breed from). numpy numbers are taken and stored as Python ones.
    """

    replace_fraction: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.10
    tournament: Annotated[int, msgspec.Meta(ge=1, le=64)] = 3
    min_trades: Annotated[int, msgspec.Meta(ge=0, le=1 << 31)] = 2
    min_age: Annotated[int, msgspec.Meta(ge=0, le=1 << 31)] = 100
    dd_penalty: Annotated[float, msgspec.Meta(ge=0.0, le=1e6)] = 0.5
    p_crossover: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.5
    p_migrate: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.05
    sigma_weight: Annotated[float, msgspec.Meta(ge=0.0, le=1e6)] = 0.15
    w_max: Annotated[float, msgspec.Meta(gt=0.0, le=1e6)] = 4.0
    sigma_entry: Annotated[float, msgspec.Meta(ge=0.0, le=1e6)] = 0.03
    entry_min: Annotated[float, msgspec.Meta(ge=0.0, le=1e6)] = 0.0
    entry_max: Annotated[float, msgspec.Meta(ge=0.0, le=1e6)] = 0.95
    p_period: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.25
    period_step: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 2
    period_min: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 1
    period_max: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 100_000
    gap_share: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.25
    spawn_fraction: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.25
    stream: Annotated[int, msgspec.Meta(ge=-1, le=1 << 31)] = -1

    def __post_init__(self) -> None:
        # msgspec checks the field constraints only when decoding or converting: an instance
        # built directly must meet the same ones, or a generation runs and is journaled that
        # replay (which decodes) then refuses. numpy numbers are stored as Python ones (the
        # journal's encoder takes no numpy scalar: a generation would fail mid-run).
        for name, (typ, lo, lo_strict, hi) in EvolutionConfig._limits().items():
            v = getattr(self, name)
            if not (is_int(v) if typ is int else is_real(v)):
                raise TypeError(f"EvolutionConfig.{name}: expected {typ.__name__}, got {type(v).__name__}")
            if type(v) is not typ:
                v = typ(v)
                msgspec.structs.force_setattr(self, name, v)
            if not ((v > lo if lo_strict else v >= lo) and v <= hi):  # NaN fails too
                raise ValueError(f"EvolutionConfig.{name}: expected a value {'>' if lo_strict else '>='} {lo} "
                                 f"and <= {hi}, got {v!r}")
        if self.entry_min > self.entry_max:
            raise ValueError("entry_min must be <= entry_max")
        if self.period_min > self.period_max:
            raise ValueError("period_min must be <= period_max")

    @classmethod
    @functools.cache
    def _limits(cls) -> dict[str, tuple[type, float, bool, float]]:
        """{field: (type, lower bound, lower bound strict, upper bound)}, read from the
        ``msgspec.Meta`` annotations above so both checks are the same."""
        out = {}
        for name, hint in typing.get_type_hints(cls, include_extras=True).items():
            typ, *metas = typing.get_args(hint) or (hint,)
            meta = next((m for m in metas if isinstance(m, msgspec.Meta)), msgspec.Meta())
            strict = meta.gt is not None
            lo = meta.gt if strict else (meta.ge if meta.ge is not None else -math.inf)
            out[name] = (typ, lo, strict, meta.le if meta.le is not None else math.inf)
        return out


def evolution_config(config: Any) -> EvolutionConfig:
    """``config`` (None: the defaults, a dict of fields, or an EvolutionConfig) as an
    EvolutionConfig. The same errors however it is given: ``TypeError`` for a field of the wrong
    type (or a config that is none of those), ``ValueError`` for a value out of range or a
    field it does not have."""
    if config is None:
        return EvolutionConfig()
    if isinstance(config, dict):
        unknown = [k for k in config if k not in EvolutionConfig.__struct_fields__]
        if unknown:
            raise ValueError(f"evolution config: unknown field(s) {', '.join(map(repr, unknown))} "
                             f"(fields: {', '.join(EvolutionConfig.__struct_fields__)})")
        # built as a struct is (its __post_init__ checks types and ranges, and takes numpy numbers)
        return EvolutionConfig(**config)
    if not isinstance(config, EvolutionConfig):
        raise TypeError(f"expected an EvolutionConfig or a dict, got {type(config).__name__}")
    return config


class GenerationEvent(_Payload, frozen=True, kw_only=True, forbid_unknown_fields=True,
                      tag="generation"):
    """One generation of evolution, journaled in order with the bars before it is applied;
    replay applies it between the same updates and gets the same children."""

    version: Version = PAYLOAD_VERSION
    generation: Annotated[int, msgspec.Meta(ge=0, le=(1 << 32) - 1)]
    seed: Annotated[int, msgspec.Meta(ge=0)]  # < 2^64, checked by Engine.evolve
    trigger: ShortText = "manual"
    config: EvolutionConfig
    # the streams bred, in order, as (instrument id, timeframe s) in the journal's numbering:
    # replay maps them to its own stream indices, so child ids come out the same
    streams: Annotated[tuple[tuple[int, int], ...], msgspec.Meta(max_length=1 << 20)] = ()


MeshFromAdapter = AdapterHello | AdapterBeat | ReasonReply | AdapterBye
"""What the mesh broker decodes from adapters."""

MeshToAdapter = ReasonRequest | MeshShutdown
"""What an adapter decodes from the broker."""


def plain(obj: Any) -> Any:
    """``obj`` with numpy arrays and scalars turned into lists and Python numbers, recursively,
    so msgspec (msgpack or JSON) can encode it. Non-finite floats stay floats in msgpack; JSON
    writes them as null."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def checked(payload: Any) -> Any:
    """``payload`` as a receiver decodes it: a Struct built in Python is not checked (msgspec
    checks types and constraints when it decodes, not when a Struct is made), so a bad field
    (``action=99``, ``timeframe=0``, a list where a tuple belongs...) would be encoded as is and
    refused only by the receiver. This encodes and decodes it as its own type and returns that
    copy (hashable, constraints met); :class:`~dynamic_core.errors.PayloadError` (a ValueError)
    naming the field otherwise, TypeError for what is not a payload."""
    if not isinstance(payload, msgspec.Struct) or not type(payload).__module__.startswith("dynamic_core"):
        raise TypeError(f"checked() takes a dynamic_core payload Struct, got {type(payload).__name__}")
    try:
        raw = msgspec.msgpack.encode(payload)
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as e:
        raise PayloadError("invalid", f"{type(payload).__name__} cannot be encoded: {e}") from None
    try:
        return msgspec.msgpack.decode(raw, type=type(payload))
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise PayloadError(_classify(e), f"{type(payload).__name__}: {e}") from None


# ---- codec -----------------------------------------------------------------------------------

_FORMATS = ("msgpack", "json", "auto")


def _classify(e: Exception) -> str:
    msg = str(e)
    if isinstance(e, msgspec.ValidationError):
        if "unknown field" in msg:
            return "unknown_field"
        if msg.endswith("type`") or "required field `type`" in msg:
            return "unknown_tag"
        if msg.endswith("version`"):
            return "version"
        return "invalid"
    if "truncated" in msg:
        return "truncated"
    return "malformed"


class Codec:
    """One encoder/decoder pair for one socket kind, with the size bound and reject counters.

    Parameters
    ----------
    type : type
        What the socket carries: a payload class or a ``Union`` of them (e.g.
        :data:`ControlCommand`, :data:`FeedMessage`).
    fmt : {"msgpack", "json", "auto"}
        Wire format. ``"auto"`` decodes either (a frame whose first non-blank byte is ``{``
        is JSON, anything else msgpack) and encodes msgpack.
    max_frame : int
        Frames longer than this are refused (``oversized``) before any decoding.

    Decoding accepts ``bytes``, ``memoryview`` or any buffer, e.g. ``zmq.Frame.buffer`` from
    ``recv(copy=False)``, without copying. Not thread-safe: one codec per socket, as sockets
    are.
    """

    def __init__(self, type: Any, *, fmt: str = "msgpack", max_frame: int = DEFAULT_MAX_FRAME) -> None:
        if fmt not in _FORMATS:
            raise ValueError(f"fmt must be one of {_FORMATS}, got {fmt!r}")
        if not 1 <= int(max_frame) <= 1 << 31:
            raise ValueError("max_frame must be in [1, 2**31]")
        self.type = type
        self.fmt = fmt
        self.max_frame = int(max_frame)
        self._mp_enc = msgspec.msgpack.Encoder()
        self._js_enc = msgspec.json.Encoder()
        self._mp_dec = msgspec.msgpack.Decoder(type)
        self._js_dec = msgspec.json.Decoder(type)
        self.decoded = 0
        self.rejected = 0
        self.rejects: dict[str, int] = {}

    def encode(self, obj: Any, fmt: str | None = None) -> bytes:
        """``obj`` as bytes in ``fmt`` (default: the codec's; ``"auto"`` encodes msgpack)."""
        f = self.fmt if fmt is None else fmt
        return self._js_enc.encode(obj) if f == "json" else self._mp_enc.encode(obj)

    def is_json(self, buf: Any) -> bool:
        """Would :meth:`decode` read ``buf`` as JSON?"""
        if self.fmt != "auto":
            return self.fmt == "json"
        mv = memoryview(buf)
        for i in range(min(len(mv), 64)):
            c = mv[i]
            if c not in (0x20, 0x09, 0x0A, 0x0D):
                return c == 0x7B  # "{"
        return False

    def decode(self, buf: Any) -> Any:
        """Decode one frame; :class:`PayloadError` (counted in ``rejects``) when it is not a
        valid payload of this codec's type."""
        try:
            size = memoryview(buf).nbytes
        except TypeError:
            return self._reject("malformed", f"not a buffer: {type(buf).__name__}")
        if size > self.max_frame:
            return self._reject("oversized", f"{size} bytes > max_frame {self.max_frame}")
        try:
            obj = (self._js_dec if self.is_json(buf) else self._mp_dec).decode(buf)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            return self._reject(_classify(e), str(e))
        except (ValueError, TypeError, OverflowError, RecursionError) as e:  # pragma: no cover - defensive
            return self._reject("malformed", f"{type(e).__name__}: {e}")
        self.decoded += 1
        return obj

    def count(self, reason: str) -> None:
        """Count a reject found by the caller (e.g. a bad multipart shape)."""
        self.rejected += 1
        self.rejects[reason] = self.rejects.get(reason, 0) + 1

    def _reject(self, reason: str, detail: str) -> Any:
        self.count(reason)
        raise PayloadError(reason, detail)

    def stats(self) -> dict[str, Any]:
        return {"decoded": self.decoded, "rejected": self.rejected, "rejects": dict(self.rejects)}


# ---- batch frames ---------------------------------------------------------------------------
# Sockets that carry many small messages at once (the reasoning mesh's broker <-> adapters) put
# them in one frame: a msgpack array of the encoded messages, each still decoded (and rejected)
# on its own. A single message (a msgpack map) is a frame as it is, so both kinds can be read.

BATCH_MAX = 256
"""Messages per batch frame (:func:`batch_frames` splits longer lists)."""

_BATCH_ENC = msgspec.msgpack.Encoder()
_BATCH_DEC = msgspec.msgpack.Decoder(list[msgspec.Raw])


def encode_batch(encoded: list[bytes]) -> bytes:
    """One frame holding already encoded msgpack messages (at most :data:`BATCH_MAX`)."""
    return _BATCH_ENC.encode([msgspec.Raw(m) for m in encoded])


def batch_frames(encoded: list[bytes]) -> list[bytes]:
    """The frames that carry already encoded messages: a single one as it is, several in batch
    frames of at most :data:`BATCH_MAX` each."""
    if len(encoded) <= 1:
        return encoded
    return [encode_batch(encoded[i:i + BATCH_MAX]) for i in range(0, len(encoded), BATCH_MAX)]


def split_batch(buf: Any) -> list[Any]:
    """The messages of a frame: those of a batch frame (a msgpack array), else the frame itself.
    A frame that starts like an array but is not a valid one comes back whole, so the caller's
    codec rejects it like any malformed frame."""
    mv = memoryview(buf)
    if mv.nbytes and (0x90 <= mv[0] <= 0x9F or mv[0] in (0xDC, 0xDD)):
        try:
            return _BATCH_DEC.decode(mv)
        except (msgspec.DecodeError, msgspec.ValidationError):
            pass
    return [buf]


_COMMAND_CODEC_ENC = msgspec.msgpack.Encoder()
_COMMAND_DEC = msgspec.msgpack.Decoder(ControlCommand)


def encode_command(cmd: Any) -> bytes:
    """Canonical msgpack bytes of a control command (what ``journal_hook`` receives)."""
    return _COMMAND_CODEC_ENC.encode(cmd)


def decode_command(raw: Any) -> Any:
    """Inverse of :func:`encode_command`; :class:`PayloadError` on bad input (not counted)."""
    try:
        return _COMMAND_DEC.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise PayloadError(_classify(e), str(e)) from None


# ---- fast signal-batch encoding --------------------------------------------------------------
# A batch holds one topic, so every signal in it has the same instrument and timeframe, and with
# fixed-width msgpack integers every signal map has the same byte layout: constant key bytes and
# type markers around big-endian values. Encoding a batch is then two numpy calls: broadcast the
# constant template into every row, and copy all values at once through a structured view
# (field by position, byte-swapped by numpy) -- ~20x faster than building AISignal objects.
# Decoders accept any integer width, so the result decodes to the very same AISignal values as
# msgspec's own encoding (tested).

def _mp_str(s: str) -> bytes:
    b = s.encode()
    if len(b) < 32:
        return bytes([0xA0 | len(b)]) + b
    if len(b) < 256:
        return b"\xd9" + bytes([len(b)]) + b
    return b"\xda" + len(b).to_bytes(2, "big") + b


_VALUE_FIELDS = ("ts", "timeframe", "seq", "population_hash", "score", "confidence", "agreement",
                 "dispersion", "action", "n_agents", "votes0", "votes1", "votes2", "votes3", "votes4", "flags",
                 "dsi")


def _source_view_dtype() -> np.dtype:
    """SIGNAL_DTYPE seen as the value fields in wire order, votes split into five fields."""
    names, formats, offsets = [], [], []
    for name in _VALUE_FIELDS:
        if name.startswith("votes"):
            base, off = SIGNAL_DTYPE.fields["votes"][:2]
            j = int(name[-1])
            names.append(name)
            formats.append(base.base)
            offsets.append(off + j * base.base.itemsize)
        else:
            dt, off = SIGNAL_DTYPE.fields[name][:2]
            names.append(name)
            formats.append(dt)
            offsets.append(off)
    return np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": SIGNAL_DTYPE.itemsize})


_SRC_VIEW = _source_view_dtype()
_LAYOUT_CACHE: dict[str, tuple[np.ndarray, np.dtype]] = {}


def _signal_layout(instrument: str) -> tuple[np.ndarray, np.dtype]:
    """(constant template of one encoded signal as uint8, dtype of its value slots)."""
    hit = _LAYOUT_CACHE.get(instrument)
    if hit is not None:
        return hit
    k = _mp_str
    # (constant bytes before the value, value name, big-endian format)
    segs = [
        (b"\xde\x00\x10" + k("type") + k("signal") + k("version") + bytes([PAYLOAD_VERSION]) + k("ts") + b"\xd3",
         "ts", ">i8"),
        (k("instrument") + k(instrument) + k("timeframe") + b"\xce", "timeframe", ">u4"),
        (k("seq") + b"\xcf", "seq", ">u8"),
        (k("population_hash") + b"\xcf", "population_hash", ">u8"),
        (k("score") + b"\xcb", "score", ">f8"),
        (k("confidence") + b"\xcb", "confidence", ">f8"),
        (k("agreement") + b"\xcb", "agreement", ">f8"),
        (k("dispersion") + b"\xcb", "dispersion", ">f8"),
        (k("action") + b"\xd2", "action", ">i4"),
        (k("n_agents") + b"\xce", "n_agents", ">u4"),
        (k("votes") + b"\x95\xce", "votes0", ">u4"),
        (b"\xce", "votes1", ">u4"),
        (b"\xce", "votes2", ">u4"),
        (b"\xce", "votes3", ">u4"),
        (b"\xce", "votes4", ">u4"),
        (k("flags") + b"\xce", "flags", ">u4"),
        (k("dsi") + b"\xcb", "dsi", ">f8"),
    ]
    assert tuple(name for _, name, _ in segs) == _VALUE_FIELDS
    template = bytearray()
    offsets = []
    for const, _, fmt in segs:
        template += const
        offsets.append(len(template))
        template += bytes(np.dtype(fmt).itemsize)
    slots = np.dtype({"names": list(_VALUE_FIELDS), "formats": [f for _, _, f in segs], "offsets": offsets,
                      "itemsize": len(template)})
    hit = (np.frombuffer(bytes(template), dtype=np.uint8), slots)
    if len(_LAYOUT_CACHE) < 65536:
        _LAYOUT_CACHE[instrument] = hit
    return hit


def _mp_array_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x90 | n])
    if n < 65536:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


_BATCH_ENC = msgspec.msgpack.Encoder()


def encode_signal_batch(epoch: int, seq: int, records: np.ndarray, instrument: str | None = None) -> bytes:
    """msgpack bytes of a :class:`SignalBatch` built straight from ``SIGNAL_DTYPE`` records of
    ONE (instrument, timeframe), without creating AISignal objects.

    ``instrument`` is the name to write (default: this process's name for the records' id).
    The bytes decode to exactly ``SignalBatch(epoch=epoch, seq=seq,
    signals=signals_from_records(records))``.
    """
    if records.dtype != SIGNAL_DTYPE:
        raise TypeError(f"expected dtype dc.SIGNAL_DTYPE, got {records.dtype}")
    n = len(records)
    if n and instrument is None:
        instrument = instruments.name(int(records["instrument"][0]))
    template, slots = _signal_layout(instrument or "?")
    # `signals` is the batch's last field (checked below at import), so the encoded signals
    # follow the encoding of the rest: one buffer, written once (a 1 MB batch built in several
    # copies cost page faults for each of them)
    head = _BATCH_ENC.encode(SignalBatch(epoch=epoch, seq=seq,
                                         signals=msgspec.Raw(_mp_array_header(n))))  # type: ignore[arg-type]
    out = bytearray(len(head) + n * len(template))
    out[:len(head)] = head
    if n:
        rows = np.frombuffer(out, dtype=np.uint8, offset=len(head)).reshape(n, len(template))
        rows[:] = template
        rows.view(slots)[:, 0] = np.ascontiguousarray(records).view(_SRC_VIEW)  # by position
    return bytes(out)


def _signals_last() -> None:
    probe = b"\xc0\xc2\xc3"  # msgpack nil, false, true: bytes no other field of the batch ends with
    enc = _BATCH_ENC.encode(SignalBatch(epoch=1, seq=2, signals=msgspec.Raw(probe)))  # type: ignore[arg-type]
    if not enc.endswith(probe):
        raise ImportError("SignalBatch.signals must be the last field encoded "
                          "(encode_signal_batch appends to it)")


_signals_last()
