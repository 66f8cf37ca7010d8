"""The append-only journal of a run, its verification and repair, and bit-identical replay.

An engine opened with ``dc.Engine(pop, journal=DIR)`` writes, in order:

- a **meta** record first: the population (genome records), the engine configuration and the
  instrument names, so that the journal alone rebuilds the engine;
- the **accepted bars** of every batch, committed (and synced by the ``fsync`` level) *before*
  any of them is processed; rejected bars as **dead letters** with their reason code;
- **control** commands and **events**, in order with the bars (``eng.journal_control(raw)``);
- **instrument** names registered after the journal was opened (ids are per process);
- the FNV-1a 64 **hash of every signal** handed out by ``run``/``poll``/``step``.

The file format (segments, record framing, CRC32C, torn-tail recovery) is described in
``cpp/dynamic_core/journal.hpp``; the writer is C++ and runs inside the engine's ingress.

``replay(DIR)`` (also ``dc.Engine.replay``) rebuilds the engine from the meta record, feeds the
journaled bars through the same ingress, hands control records to a callback at the same place
between updates, and checks every replayed signal against the journaled hash.

Example::

    with dc.Engine(pop, journal="run-1", fsync=1) as eng:
        eng.run(bars)
    result = dc.journal.replay("run-1")          # raises ReplayMismatch on any difference
    result.signals                               # SIGNAL_DTYPE, bit-identical to the live run
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from . import _core
from .errors import BackendUnavailable, JournalCorrupt, JournalError, ReplayMismatch
from .instruments import instruments
from .records import BAR_DTYPE, GENOME_DTYPE, SIGNAL_DTYPE

__all__ = [
    "DEFAULT_SEGMENT_BYTES",
    "JournalRecord",
    "JournalReport",
    "ReplayResult",
    "read",
    "replay",
    "verify",
]

META_FORMAT = 3  # 2: genome records carry w_dsi (120 bytes); 3: signal records (and their hashes) carry dsi.
# Journals of another format do not replay.
DEFAULT_SEGMENT_BYTES = 64 << 20
DEAD_LETTER_RECORD = np.dtype([("bar", BAR_DTYPE), ("reason", "<u4"), ("pad", "<u4")])

_TYPE_NAMES = {int(v): k.lower() for k, v in _core.RecordType.__members__.items()}
_META = int(_core.RecordType.META)
_BARS = int(_core.RecordType.BARS)
_DEAD = int(_core.RecordType.DEAD_LETTER)
_CONTROL = int(_core.RecordType.CONTROL)
_HASHES = int(_core.RecordType.SIGNAL_HASHES)
_INSTRUMENTS = int(_core.RecordType.INSTRUMENTS)
_EVENT = int(_core.RecordType.EVENT)

_encoder = msgspec.msgpack.Encoder()
_credit_decoder = msgspec.msgpack.Decoder(dict)


# The types of the events the engine journals itself and replay applies (an embedder's own
# events, Engine.journal_event, may not take them).
ENGINE_EVENT_TYPES = frozenset({"credit", "dsi", "ext_scores", "generation"})


def _event_head(raw: bytes) -> tuple[dict | None, Any]:
    """An encoded event as a msgpack map and its ``type``; (None, None) when it is no map."""
    try:
        head = _credit_decoder.decode(raw)
    except msgspec.DecodeError:
        return None, None
    return (head, head.get("type")) if isinstance(head, dict) else (None, None)


def engine_event_type(raw: bytes) -> str | None:
    """The ``type`` of an encoded event when it is one of :data:`ENGINE_EVENT_TYPES`, else None."""
    kind = _event_head(raw)[1]
    return kind if isinstance(kind, str) and kind in ENGINE_EVENT_TYPES else None


def _engine_event(raw: bytes) -> tuple[str, Any, Any] | None:
    """(kind, agent ids, values) of a journaled event that changes the engine (``credit``, ``dsi`` (names, evidence) or
    ``ext_scores``), ("generation", GenerationEvent, None) for a generation of evolution; None
    for any other event (decisions, ...), which replay only reports."""
    from .payloads import CreditUpdate, DsiEvidence, ExternalScores, GenerationEvent

    head, kind = _event_head(raw)
    if kind == "generation":
        try:
            return kind, msgspec.convert(head, GenerationEvent), None
        except (msgspec.ValidationError, ValueError) as e:
            raise JournalError(f"unreadable generation event: {e}") from None
    if kind == "dsi":
        try:
            d = msgspec.convert(head, DsiEvidence)
        except msgspec.ValidationError as e:
            raise JournalError(f"unreadable dsi event: {e}") from None
        if len(d.instruments) != len(d.evidence):
            raise JournalError("dsi event with mismatched lengths")
        return kind, d.instruments, d.evidence
    if kind not in ("credit", "ext_scores"):
        return None
    try:
        c = msgspec.convert(head, CreditUpdate if kind == "credit" else ExternalScores)
    except msgspec.ValidationError as e:
        raise JournalError(f"unreadable {kind} event: {e}") from None
    ids = np.frombuffer(c.agents, dtype="<u4")
    vals = np.frombuffer(c.credit if kind == "credit" else c.scores, dtype="<f8")
    if len(ids) != len(vals):
        raise JournalError(f"{kind} event with mismatched lengths")
    return kind, ids, vals


class _Meta(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    format: int
    dc_version: str
    population_hash: int
    genomes: bytes
    config: dict[str, Any]
    instruments: list[str]
    created_ns: int


class _InstrumentsRec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    first: int
    names: list[str]


_meta_decoder = msgspec.msgpack.Decoder(_Meta)
_instr_decoder = msgspec.msgpack.Decoder(_InstrumentsRec)


def config_hash(config: dict[str, Any]) -> int:
    """64-bit hash of an engine configuration (what the segment headers carry)."""
    raw = _encoder.encode(dict(sorted(config.items())))
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")


def build_id() -> str:
    from . import __version__

    return f"dc-{__version__}"[:24]


def encode_meta(genomes: np.ndarray, population_hash: int, config: dict[str, Any],
                names: list[str] | None = None) -> bytes:
    """The meta record: the population, the configuration and the instrument names registered
    (``names``: the caller's one reading of them; the next instruments record follows on it)."""
    from . import __version__

    return _encoder.encode(_Meta(
        format=META_FORMAT, dc_version=__version__, population_hash=int(population_hash),
        genomes=np.ascontiguousarray(genomes, dtype=GENOME_DTYPE).tobytes(), config=dict(config),
        instruments=instruments.names() if names is None else list(names), created_ns=time.time_ns()))


def encode_instruments(first: int, names: list[str]) -> bytes:
    return _encoder.encode(_InstrumentsRec(first=first, names=names))


# ---- reading ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class JournalRecord:
    """One record: its type name (``bars``, ``control``, ...), journal sequence number,
    payload bytes, and where it lies (segment index, byte offset of its header)."""

    type: str
    seq: int
    payload: bytes
    segment: int
    offset: int
    flags: int = 0

    @property
    def more(self) -> bool:
        """The next record belongs to the same batch (a batch's bars, split to keep records
        under the size limit, and its dead letters are journaled as one commit)."""
        return bool(self.flags & _core.RECORD_MORE)

    @property
    def type_code(self) -> int:
        return int(_core.RecordType.__members__[self.type.upper()])


@dataclass(frozen=True)
class JournalReport:
    """Outcome of walking a journal (``verify``).

    ``status`` is ``ok``, ``torn_tail`` (the last record was cut short by a crash: everything
    before it is intact; ``repair`` truncates it), ``corrupt`` (a framing or CRC failure
    elsewhere, at ``bad_segment``/``bad_offset``), ``unreadable`` (segment ``bad_segment`` could
    not be opened or read: permissions, an I/O error, not a regular file; nothing is known to be
    wrong with its records, and ``repair`` leaves it alone), ``unsupported`` (a journal format
    this build does not read) or ``empty`` (no segments).
    """

    path: str
    status: str
    records: int
    last_seq: int
    segments: int
    bad_segment: int
    bad_offset: int
    truncated_bytes: int
    repaired: bool
    detail: str
    format: int
    population_hash: int
    config_hash: int
    build_id: str

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def unusable(self) -> bool:
        """A journal that cannot be read through: ``corrupt``, ``unreadable`` or ``unsupported``
        (a torn tail is not: everything before it reads)."""
        return self.status in ("corrupt", "unreadable", "unsupported")

    def summary(self) -> str:
        head = f"{self.path}: {self.status}, {self.records} records in {self.segments} segment(s)"
        if self.status in ("torn_tail", "corrupt"):
            head += f"; bad record in segment {self.bad_segment} at byte {self.bad_offset} ({self.detail})"
        if self.status == "unreadable":
            head += f"; segment {self.bad_segment} ({self.detail})"
        if self.repaired:
            head += f"; repaired: {self.truncated_bytes} byte(s) of torn tail truncated"
        if self.status in ("empty", "unsupported"):
            head += f" ({self.detail})"
        return head


def _report(path: str | os.PathLike[str], d: dict[str, Any]) -> JournalReport:
    return JournalReport(path=str(path), **d)


def _check_dir(path: str | os.PathLike[str]) -> str:
    p = Path(path)
    if not p.is_dir():
        raise JournalError(f"no journal directory at {str(p)!r}")
    if not os.access(p, os.R_OK | os.X_OK):  # else it would read as "no segments"
        raise JournalError(f"cannot read the journal directory {str(p)!r}: permission denied")
    return str(p)


def writer_holds(path: str | os.PathLike[str]) -> bool:
    """True when a writer (an engine with this journal, in any process) holds the journal at
    ``path`` open: its last record may be one it is still writing, not a torn tail (the check
    ``--repair`` makes before it truncates anything)."""
    return bool(_core.journal_locked(os.fspath(path)))


def verify(path: str | os.PathLike[str], *, repair: bool = False,
           progress: Callable[[int, int], Any] | None = None) -> JournalReport:
    """Walk every record of the journal at ``path`` checking framing, sequence and CRC32C.

    With ``repair=True`` a torn tail (the last record cut short by a crash) is truncated so the
    journal replays cleanly; corruption elsewhere is reported, never "repaired".
    ``progress(bytes_done, bytes_total)`` is called every 1% of the journal (at most 8 MB apart)
    and at the end; an exception it raises (``KeyboardInterrupt`` included) ends the walk before
    anything is repaired.
    """
    _check_progress(progress)
    return _report(path, _core.journal_scan(_check_dir(path), repair, progress))


def _check_progress(progress: object) -> None:
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be callable or None, got {type(progress).__name__}")


def read(path: str | os.PathLike[str], report: dict[str, Any] | None = None,
         progress: Callable[[int, int], Any] | None = None) -> Iterator[JournalRecord]:
    """The records of a journal in order. Stops quietly at a torn tail; raises
    :class:`JournalCorrupt` (with segment and offset) at a corrupt record, after yielding every
    record before it. ``report``, when given, receives the reader's scan report once the records
    run out (``status``: ``"ok"`` or ``"torn_tail"``, ``detail``...); raises
    :class:`JournalError` at a segment it cannot open or read. ``progress(bytes_done,
    bytes_total)`` is called as :func:`verify` calls it: every 1% of the journal (at most 8 MB
    apart) and once at the end."""
    _check_progress(progress)
    rd = _core.JournalReader(_check_dir(path))
    step = _core.journal_progress_step(rd.bytes_total())
    next_call = step
    while True:
        r = rd.next()
        if r is None:
            break
        t, seq, payload, seg, off, flags = r
        yield JournalRecord(_TYPE_NAMES.get(t, f"type{t}"), seq, payload, seg, off, flags)
        if progress is not None and (done := rd.bytes_done()) >= next_call:
            progress(done, max(rd.bytes_total(), done))
            next_call = done + step
    if progress is not None:
        end = max(rd.bytes_total(), rd.bytes_done())
        progress(end, end)
    rep = rd.report()
    if report is not None:
        report.update(rep)
    if rep["status"] == "corrupt":
        raise JournalCorrupt(f"corrupt journal: {rep['detail']}", rep["bad_segment"], rep["bad_offset"])
    if rep["status"] in ("empty", "unsupported", "unreadable"):
        raise JournalError(rep["detail"])


def _grouped(records: Iterator[JournalRecord]) -> Iterator[list[JournalRecord]]:
    """The records in units: a batch's records together (a chain of ``more`` flags and the
    record that ends it), every other record alone. A batch cut short at the end of the journal
    (a torn tail) never became input: it is left out."""
    unit: list[JournalRecord] = []
    for rec in records:
        unit.append(rec)
        if not rec.more:
            yield unit
            unit = []


# ---- replay -----------------------------------------------------------------------------------
@dataclass
class ReplayResult:
    """What ``replay`` reproduced.

    ``signals`` are the replayed signals (``SIGNAL_DTYPE``, in this process's instrument ids).
    ``verified`` signals matched their journaled hash; ``mismatched`` lists the sequence numbers
    that did not; ``missing`` those journaled but not reproduced; ``unverified`` counts replayed
    signals that had no journaled hash (not yet handed out when the run stopped).
    ``controls`` holds ``(bars_before, raw)`` for every control record: the command bytes and
    how many accepted bars preceded it.
    """

    path: str
    signals: np.ndarray
    agents: np.ndarray
    bars: int
    records: int
    verified: int
    unverified: int
    mismatched: list[int]
    missing: list[int]
    controls: list[tuple[int, bytes]]
    events: list[bytes]
    dead_letters: int
    report: JournalReport
    seconds: float
    agent_updates: int
    population_hash: int
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.mismatched and not self.missing

    @property
    def updates_per_s(self) -> float:
        return self.agent_updates / self.seconds if self.seconds > 0 else 0.0


def replay(path: str | os.PathLike[str], *, verify: bool = True, threads: int | None = None,
           on_control: Callable[[bytes], Any] | None = None,
           progress: Callable[[int, int], Any] | None = None, backend: str = "cpu",
           device: Any = None) -> ReplayResult:
    """Rebuild the engine recorded in the journal at ``path`` and run its inputs again.

    Parameters
    ----------
    verify : bool
        Raise :class:`ReplayMismatch` when a replayed signal's hash differs from the journaled
        one, or a journaled signal is not reproduced. (The comparison is always made and
        reported in the result.)
    threads : int, optional
        Worker threads of the replaying engine; any count gives the same signals.
    on_control : callable, optional
        Called with the raw bytes of each control record, between the same updates as in the
        original run (after the bars that preceded it, before those that followed).
    progress : callable, optional
        ``progress(bytes_done, bytes_total)`` as the journal is read (see :func:`read`).
    backend, device : optional
        Where the replaying engine runs (see :class:`dynamic_core.Engine`): a journal written on
        the CPU replays bit for bit on the GPU and the other way round.

    A torn tail is tolerated (what precedes it replays; ``result.report.status`` says so);
    corruption raises :class:`JournalCorrupt`. A GPU that fails mid-replay raises
    :class:`~dynamic_core.errors.BackendUnavailable` naming the failure (CuPy's error chained).
    """
    from .engine import Engine
    from .population import Population

    p = _check_dir(path)
    t0 = time.perf_counter()
    scan: dict[str, Any] = {}  # the reader's own report, once the records run out
    records = read(p, scan, progress)
    try:
        first = next(records)
    except StopIteration:
        raise JournalError(f"journal at {p!r} holds no records") from None
    if first.type != "meta":
        raise JournalError(f"journal at {p!r} does not start with a meta record (found {first.type})")
    try:
        meta = _meta_decoder.decode(first.payload)
    except msgspec.DecodeError as e:
        raise JournalError(f"unreadable meta record: {e}") from None
    if meta.format != META_FORMAT:
        raise JournalError(f"journal meta format {meta.format} is not supported (expected {META_FORMAT})")

    # Instrument ids are per process: map the journal's ids to this process's.
    try:
        jmap: list[int] = [instruments.id(n) for n in meta.instruments]
    except (ValueError, TypeError) as e:
        raise JournalError(f"unreadable instrument names in the meta record: {e}") from None

    def to_local(ids: np.ndarray) -> np.ndarray:
        table = np.asarray(jmap, dtype=np.int64)
        if len(ids) and (ids.max(initial=0) >= len(table)):
            raise JournalError("a bar names an instrument id the journal never registered")
        return table[ids.astype(np.int64)].astype(np.uint32)

    if len(meta.genomes) % GENOME_DTYPE.itemsize:
        raise JournalError(f"journal genomes are {len(meta.genomes)} bytes, not whole "
                           f"{GENOME_DTYPE.itemsize}-byte genome records")
    genomes = np.frombuffer(meta.genomes, dtype=GENOME_DTYPE).copy()
    genomes["instrument"] = to_local(genomes["instrument"])
    pop = Population.from_records(genomes)
    cfg = dict(meta.config)
    eng = Engine(pop, threads=threads, cores_per_sm=int(cfg.get("cores_per_sm", 128)),
                 block_bars=int(cfg.get("block_bars", 0)), population_hash=meta.population_hash,
                 backend=backend, device=device)
    out: list[np.ndarray] = []
    expected: dict[int, int] = {}
    controls: list[tuple[int, bytes]] = []
    events: list[bytes] = []
    dead = 0
    n_bars = 0
    n_records = 1

    def whole(rec: JournalRecord, itemsize: int) -> None:
        if len(rec.payload) % itemsize:
            raise JournalError(f"{rec.type} record (seq {rec.seq}) holds {len(rec.payload)} bytes, "
                               f"not whole {itemsize}-byte items")

    try:
        for unit in _grouped(records):
            n_records += len(unit)
            rec = unit[0]
            t = rec.type_code
            if t in (_BARS, _DEAD):  # one batch: its accepted bars run together, as they did live
                parts = []
                for r in unit:
                    if r.type_code == _BARS:
                        whole(r, BAR_DTYPE.itemsize)
                        parts.append(np.frombuffer(r.payload, dtype=BAR_DTYPE))
                    elif r.type_code == _DEAD:
                        whole(r, DEAD_LETTER_RECORD.itemsize)
                        dead += len(r.payload) // DEAD_LETTER_RECORD.itemsize
                    else:
                        raise JournalError(f"{r.type} record (seq {r.seq}) inside a batch of bars")
                if parts:
                    bars = np.concatenate(parts) if len(parts) > 1 else parts[0].copy()
                    bars["instrument"] = to_local(bars["instrument"])
                    out.append(eng.run(bars).copy())
                    n_bars += len(bars)
            elif len(unit) > 1:
                raise JournalError(f"{rec.type} record (seq {rec.seq}) starts a batch; only bars do")
            elif t == _HASHES:
                whole(rec, 16)
                pairs = np.frombuffer(rec.payload, dtype="<u8").reshape(-1, 2)
                expected.update(zip(pairs[:, 0].tolist(), pairs[:, 1].tolist()))
            elif t == _CONTROL:
                controls.append((n_bars, rec.payload))
                if on_control is not None:
                    on_control(rec.payload)
            elif t == _INSTRUMENTS:
                try:
                    r = _instr_decoder.decode(rec.payload)
                    names = [instruments.id(n) for n in r.names]
                except (msgspec.DecodeError, ValueError, TypeError) as e:
                    raise JournalError(f"unreadable instrument record (seq {rec.seq}): {e}") from None
                if r.first != len(jmap):
                    raise JournalError(f"instrument record (seq {rec.seq}) starts at id {r.first}, expected {len(jmap)}")
                jmap.extend(names)
            elif t == _EVENT:
                events.append(rec.payload)
                applied = _engine_event(rec.payload)
                if applied is not None:  # applied between the same updates as in the original run
                    kind, ids, vals = applied
                    if kind == "generation":
                        gen = ids  # a GenerationEvent
                        if gen.generation == 0 or gen.seed >= 1 << 64:
                            raise JournalError(f"generation event at seq {rec.seq} out of range")
                        pairs = [(jmap[i] if 0 <= i < len(jmap) else -1, tf) for i, tf in gen.streams]
                        try:
                            eng._evolve_native(gen.config, gen.seed, gen.generation, b"", pairs)
                        except ValueError as e:
                            raise JournalError(f"generation event at seq {rec.seq}: {e}") from None
                    else:
                        try:
                            if kind == "dsi":
                                eng.set_dsi(dict(zip(ids, vals)))
                            else:
                                (eng.set_credit if kind == "credit" else eng.set_external_scores)(ids, vals)
                        except ValueError as e:  # a change the engine refuses: not what it journaled
                            raise JournalError(f"{kind} event at seq {rec.seq}: {e}") from None
            elif t == _META:
                raise JournalError(f"a second meta record at seq {rec.seq}")
        agents = eng.agents().copy()
        stats = eng.stats()
    except Exception as e:
        error = eng.stats().get("device_error") if eng.backend == "cuda" else None
        if error is None:
            raise
        # CuPy's own error, from deep inside a launch: named in one line, chained
        raise BackendUnavailable(f"the CUDA device failed after {n_bars:,} replayed bars: {error}") from e
    finally:
        eng.close()
    signals = np.concatenate(out) if out else np.empty(0, dtype=SIGNAL_DTYPE)
    seconds = time.perf_counter() - t0

    # Hash in the journal's instrument ids (what the live engine hashed).
    back = {local: j for j, local in enumerate(jmap)}
    as_journaled = signals.copy()
    if len(as_journaled):
        as_journaled["instrument"] = np.fromiter((back[int(i)] for i in signals["instrument"]),
                                                 dtype=np.uint32, count=len(signals))
    hashes = _core.signal_hashes(as_journaled)
    got = dict(zip(signals["seq"].tolist(), hashes.tolist()))
    mismatched = sorted(s for s, h in expected.items() if s in got and got[s] != h)
    missing = sorted(s for s in expected if s not in got)
    verified = sum(1 for s, h in expected.items() if got.get(s) == h)
    result = ReplayResult(
        path=p, signals=signals, agents=agents, bars=n_bars, records=n_records, verified=verified,
        unverified=len(got) - verified - len(mismatched), mismatched=mismatched, missing=missing,
        controls=controls, events=events, dead_letters=dead, report=_report(p, scan),
        seconds=seconds, agent_updates=int(stats.get("agent_updates", 0)),
        population_hash=meta.population_hash, config=cfg)
    if verify and not result.ok:
        raise ReplayMismatch(
            f"replay of {p!r} differs: {len(mismatched)} signal(s) with another hash "
            f"(first seq {mismatched[:5]}), {len(missing)} journaled signal(s) not reproduced "
            f"(first seq {missing[:5]})", mismatched + missing)
    return result

