"""The engine: a population run over market data, producing fused signals."""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import msgspec
import numpy as np

from . import _core
from ._checks import check_int, check_real, is_int, is_real
from .errors import BackendUnavailable, JournalError
from .journal import DEFAULT_SEGMENT_BYTES
from .instruments import instruments
from .market import as_bars
from .population import Population
from .payloads import AISignal, signal_from_bytes, signal_from_record, signals_from_records
from .records import AGENT_DTYPE, BAR_DTYPE, BIRTH_DTYPE, DEAD_LETTER_DTYPE, GENOME_DTYPE, LINEAGE_DTYPE, SIGNAL_DTYPE

__all__ = ["BACKPRESSURE", "Engine"]

log = logging.getLogger("dynamic_core.engine")
_fallbacks_logged: set[str] = set()  # backend="auto" fallback reasons already logged
_fallbacks_lock = threading.Lock()

BACKPRESSURE = {"block": 0, "reject_new": 1, "drop_oldest": 2}


_event_encoder = msgspec.msgpack.Encoder()


def usable_cores() -> int:
    """CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


MAX_THREADS = 63  # the native engine's limit of SM worker threads
# The longest wait handed to the native side (~146 years): its deadline is now + timeout in
# int64 ns, which a timeout near the int64 limit (~292 years) would overflow.
_MAX_WAIT_NS = 1 << 62
_MAX_POLL = (1 << 64) - 1  # the native max_n (size_t); at most `capacity` signals are ever ready
_POLL_SLICE_NS = 500_000_000  # a longer poll waits in slices of this, so ^C can end it
_SIGNAL_SIZE = SIGNAL_DTYPE.itemsize
_NO_SIGNALS = np.empty(0, dtype=np.uint8)  # an empty hold (signal records as bytes)


def _timeout_ns(timeout: object) -> int:
    """A timeout in seconds as the native side's nanoseconds: None or +inf wait forever (-1),
    0 or less not at all, anything longer than ``_MAX_WAIT_NS`` is clamped to it (forever in
    practice). TypeError for a non-number, ValueError for NaN."""
    if timeout is None:
        return -1
    if type(timeout) is float and 0.0 < timeout < _MAX_WAIT_NS / 1e9:  # the common case, at once
        return int(timeout * 1e9)
    if not is_real(timeout):
        raise TypeError(f"timeout must be a number of seconds or None, got {type(timeout).__name__}")
    try:
        x = float(timeout)
    except OverflowError:  # an int past the float range
        x = math.inf
    if math.isnan(x):
        raise ValueError("timeout must be a number of seconds or None, got nan")
    if x == math.inf:
        return -1
    if x <= 0.0:
        return 0
    return _MAX_WAIT_NS if x >= _MAX_WAIT_NS / 1e9 else int(x * 1e9)


def _attach_partial(e: BaseException, signals: np.ndarray, taken: int) -> None:
    """Put what a failed ``run`` had done on its exception: ``.signals`` it had handed out and
    ``.taken``, the rows of its batch the engine took (a prefix), when it took any."""
    if not taken and not len(signals):
        return
    try:
        e.signals = signals  # type: ignore[attr-defined]
        e.taken = taken  # type: ignore[attr-defined]
    except AttributeError:  # an exception type without a __dict__: the note says where they went
        e.add_note(f"Engine.run: {taken} bars were taken and {len(signals)} signals handed out before this")
        return
    e.add_note(f"Engine.run: the first {taken} bars of the batch were taken before this and their "
               f"{len(signals)} signals handed out (the journal records them so): this exception's .taken "
               "and .signals")


def _check_strict(strict: object, allow_none: bool) -> bool | None:
    """``strict`` as a bool (None kept when ``allow_none``); TypeError for anything else."""
    if strict is None and allow_none:
        return None
    if not isinstance(strict, (bool, np.bool_)):
        raise TypeError(f"strict must be a bool{' or None' if allow_none else ''}, got {strict!r}")
    return bool(strict)


def _agent_ids(what: str, agent_ids: object) -> np.ndarray:
    """Agent ids as uint32 (flat): integers only (no bool, float, str or object) in [0, 2**32),
    TypeError/ValueError naming the offending value otherwise (a cast would wrap or truncate
    it into another agent's id)."""
    expected = f"{what}: agent_ids must be integer agent ids in [0, 2**32)"
    if agent_ids is None:
        raise TypeError(f"{expected}, got None")
    try:
        a = np.asarray(agent_ids)
        if a.dtype.kind == "f" and not isinstance(agent_ids, np.ndarray):
            a = np.asarray(agent_ids, dtype=object)  # [-1, 2**63] is float64: judge each value
    except (ValueError, TypeError, OverflowError) as e:
        raise TypeError(f"{expected}: {e}") from None
    flat = a.ravel()
    if flat.size == 0:  # any dtype: [] is float64
        return np.empty(0, dtype=np.uint32)
    if a.dtype.kind == "O":  # Python ints past int64/uint64, or mixed objects
        for v in flat:
            if not is_int(v):
                raise TypeError(f"{expected}, got {v!r} ({type(v).__name__})")
        for v in flat:
            if not 0 <= int(v) < 1 << 32:
                raise ValueError(f"{expected}, got {int(v)}")
        return np.array([int(v) for v in flat], dtype=np.uint32)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{expected}, got {flat[0].item()!r} (dtype {a.dtype})")
    bad = (flat < 0) | (flat > 0xFFFFFFFF)
    if bad.any():
        raise ValueError(f"{expected}, got {int(flat[np.flatnonzero(bad)[0]])}")
    return np.ascontiguousarray(flat, dtype=np.uint32)


def _real_values(what: str, name: str, values: object) -> np.ndarray:
    """Numbers (int or float, no bool, str or object) as float64, flat; TypeError naming
    ``name`` otherwise. Their range is the native side's check."""
    expected = f"{what}: {name} must be numbers"
    if values is None:
        raise TypeError(f"{expected}, got None")
    try:
        a = np.asarray(values)
    except (ValueError, TypeError) as e:
        raise TypeError(f"{expected}: {e}") from None
    if a.size and a.dtype.kind not in "iuf":
        first = a.ravel()[0]
        raise TypeError(f"{expected}, got {first.item() if isinstance(first, np.generic) else first!r} "
                        f"(dtype {a.dtype})")
    return np.ascontiguousarray(a, dtype=np.float64).ravel()


def _close_native(native: Any) -> None:
    native.close()


# Engines of this process: a child made by fork() has none of their threads (workers, sentinel,
# dispatcher), so joining or feeding one there would crash or hang; the child marks them foreign.
_live_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    import ctypes

    for e in list(_live_engines):
        e._foreign = os.getpid()
        e._closed = True
        # locks another thread of the parent may have held at the fork, fresh and released
        e._close_lock, e._egress_guard, e._own_lock = threading.Lock(), threading.Lock(), threading.RLock()
        e._close_done = threading.Event()
        e._close_done.set()
        e._pollers, e._runners, e._held = {}, {}, _NO_SIGNALS
        e._finalizer.detach()  # the parent's threads are not here to join
        # nor may the child keep the journal directory's lock after the parent lets go of it
        with contextlib.suppress(Exception):
            e._native.forget_journal_after_fork()
        # nor may the native destructor join them (a crash): one reference the child never
        # gives back keeps it from running, also at the interpreter's exit
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(e._native))
        # and every use raises instead of waiting on workers that are not here (agents() waited
        # for bars in flight at the fork, forever; stats() answered for threads that are gone)
        e._native = _Forked(e._foreign)


class _Forked:
    """The native engine of an engine inherited by a fork()ed child: any use raises."""

    def __init__(self, pid: int) -> None:
        self._pid = pid

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(_forked_message(self._pid))


def _forked_message(pid: int) -> str:
    return (f"this engine was created in another process (this is process {pid}, a fork of it): its "
            f"threads are not here; create an Engine in this process (or start processes with 'spawn')")


os.register_at_fork(after_in_child=_after_fork_in_child)


def _dispatch_loop(native: Any, stop: threading.Event, errors: list[int], engine: weakref.ref,
                   held: np.ndarray) -> None:
    """The ``on_signal`` dispatcher. It holds only a weak reference to the :class:`Engine` (and
    what it needs; the callbacks are fetched through it for each batch, since a callback may
    refer to the engine), so an engine with callbacks is still collected once unreferenced;
    this thread then ends (``close`` ends it through ``stop``). ``held``: the signals an
    interrupted poll or step kept for the next poll, delivered first."""
    if len(held) and not _dispatch_batch(held, errors, engine, stop):
        return
    del held
    while not stop.is_set() and engine() is not None:
        try:
            # long waits: each starts with a 2 ms spin (latency on a live feed), so an idle
            # engine's dispatcher costs 0.4% of a core, not 4% as with 50 ms waits; close and
            # collection end a wait at once (the native engine stops)
            batch = native.poll(4096, 500_000_000)
        except RuntimeError:  # closed underneath us
            return
        if len(batch) and not _dispatch_batch(batch, errors, engine, stop):
            return


def _dispatch_batch(batch: Any, errors: list[int], engine: weakref.ref, stop: threading.Event) -> bool:
    """One batch to the callbacks (False: the engine is gone, or closed: the rest of the batch is
    not delivered, so ``close`` waits for the callback running, not for up to 4,096 of them).
    A function of its own, so that nothing the callbacks refer to outlives the batch in the
    dispatcher's frame."""
    eng = engine()
    if eng is None:
        return False
    callbacks = list(eng._callbacks)
    del eng
    for sig in signals_from_records(np.frombuffer(batch, dtype=SIGNAL_DTYPE)):
        if stop.is_set():
            return False
        for cb in callbacks:
            try:
                cb(sig)
            except BaseException:  # SystemExit too: it would end the dispatcher, losing the batch
                errors[0] += 1
                log.exception("on_signal callback %r raised for signal %s", cb, sig.id)
    return True


class Engine:
    """Runs a :class:`Population` over bars and fuses the agents into one signal per
    (instrument, timeframe, bar).

    Parameters
    ----------
    population : Population
        The agents. Their layout into warps of 32 lanes and SMs depends only on the population
        and ``cores_per_sm``.
    threads : int, optional
        SM worker threads, 1 to 63 (default: the cores this process may use, at most 63). Each
        SM is owned by one worker for the whole run; a standby worker is started besides them
        for failover. Results are bit-identical for any thread count.
    cores_per_sm : int
        Lanes per streaming multiprocessor: 32, 64, 96 or 128.
    strict : bool
        When True, ``run``, ``submit`` and ``step`` raise :class:`dynamic_core.errors.InvalidInput`
        for a batch holding any bad bar and take none of it (an ``EngineService`` in front counts
        and logs the refused bars and goes on). When False (default) bad bars are rejected with a
        reason, counted in ``stats()`` and kept in ``dead_letters()``, and the rest runs.
    backpressure : {"block", "reject_new", "drop_oldest"}
        What ``submit`` does when ``capacity`` bars are in flight or unpolled (see ``submit``).
    capacity : int
        Bars in flight plus ready-but-unpolled signals (rounded up to a power of two, at least
        2); 0 sizes it from the population (64..8192).
    stall_deadline : float
        Seconds an SM with pending bars may go without progress (while its worker shows no
        heartbeat) before the health sentinel marks it stalled and moves it to the standby.
    dead_letter_capacity : int
        How many rejected bars are kept (the newest); older ones are counted as dropped.
    block_bars : int
        Bars per execution block. On the CPU: the most bars a worker takes from its queue and
        runs as one batch (an SM's agents stay in cache across a batch); 0 (default) lets each
        worker size its batches from its own measured time per agent-update so a batch takes
        about a quarter of ``stall_deadline`` even if every bar is of the largest stream (1 to 256 bars, never more than ``capacity``; the first
        from an estimate of ~20 ns per agent). A fixed value whose batches take longer than
        ``stall_deadline`` makes the sentinel take a busy worker for stalled and move its SMs
        (results are the same; ``stats()["failovers"]`` counts the moves). With ``backend="cuda"``: bars per kernel launch; 0 means 4096, fewer
        when a block's scratch memory would pass 256 MiB. Results are bit-identical for any
        value.
    fault_injection : bool
        Arms ``eng.faults`` (stall an SM, poison an agent) for tests; when it is False, those
        calls raise ``RuntimeError``.
    journal : path, optional
        Directory of a new append-only journal (see :mod:`dynamic_core.journal`): the population
        and configuration, every accepted bar (written before it is processed), rejects,
        control commands and the hash of every signal handed out. ``Engine.replay(path)``
        reproduces the run bit for bit. A failed journal write or sync (a full disk, an I/O
        error) raises :class:`~dynamic_core.errors.JournalError` where it happens and is final:
        every later input is refused with it (the batch is not taken), signals already computed
        are still handed out, and the journal on disk ends at its last complete commit, which
        verifies and replays. ``stats()["journal"]["error"]`` says why; ``close()`` raises it if
        no call has yet.
    fsync : {0, 1, 2}
        Journal durability per batch: 0 leaves flushing to the OS, 1 syncs the data
        (fdatasync), 2 syncs data and metadata (fsync, the directory on new segments, and the
        parent's entry of each directory it creates for the journal).
    journal_segment_bytes : int
        Size at which the journal starts a new segment file (default 64 MiB).
    population_hash : int, optional
        Provenance written into every signal (default: ``population.hash``). Replay passes the
        journaled value so signals stay identical when instrument ids differ between processes.
    backend : {"cpu", "cuda", "auto"}
        Where the agents run. ``"cuda"``: population, indicator banks and agent state in GPU
        memory (:mod:`dynamic_core.gpu`; needs ``pip install 'dynamic_core[cuda]'`` and an NVIDIA
        GPU, else :class:`dynamic_core.errors.BackendUnavailable` says what is missing), with
        signals and agent state bit-identical to the CPU's; whatever keeps the backend from
        starting (compiler, driver, device, memory) is a ``BackendUnavailable`` raised here.
        ``"auto"``: the GPU when the backend starts, else the CPU, with the reason in
        ``stats()["backend_fallback"]`` (and logged once per reason). With ``"cuda"``, ``run``
        (``block_bars`` bars per kernel launch) and ``step`` run on the device;
        ``submit``/``poll``/``on_signal`` and fault injection are CPU-only. A device error while
        bars run is raised once as the device's own exception; the device state then matches no
        journal position, so later feeding calls and reads of agent state (``agents()``,
        ``evolve``...) raise ``BackendUnavailable`` (``stats()["device_error"]`` says why; the
        journal replays the run).
    device : optional
        The device for ``backend="cuda"``: a :class:`dynamic_core.gpu.CupyDevice` (its ordinal
        picks the GPU); default ``CupyDevice()``, the current CuPy device.

    Examples
    --------
    >>> pop = dc.Population.grid("EURUSD", "H1", fast=[5, 10, 20], slow=[50, 100])
    >>> eng = dc.Engine(pop)
    >>> signals = eng.run(bars)          # SIGNAL_DTYPE, one per bar
    >>> eng.agents()[["agent_id", "equity", "sharpe"]]

    Streaming::

        with dc.Engine(pop) as eng:
            eng.submit(bars[:100])           # returns at once
            ready = eng.poll(timeout=0.01)   # signals in bar order
            sig = eng.step(bars[100])        # one bar in, one frozen AISignal out
    """

    def __init__(self, population: Population, *, threads: int | None = None,
                 cores_per_sm: int = 128, strict: bool = False,
                 backpressure: str = "block", capacity: int = 0,
                 stall_deadline: float = 0.050, dead_letter_capacity: int = 10_000,
                 block_bars: int = 0, fault_injection: bool = False,
                 journal: str | os.PathLike[str] | None = None, fsync: int = 0,
                 journal_segment_bytes: int = DEFAULT_SEGMENT_BYTES,
                 population_hash: int | None = None, backend: str = "cpu", device: Any = None) -> None:
        from . import gpu
        if not isinstance(population, Population):
            raise TypeError(f"expected a dc.Population, got {type(population).__name__}")
        any_int = (-math.inf, math.inf)  # check_int's type check; the range is checked below
        cores_per_sm = check_int("cores_per_sm", cores_per_sm, *any_int)
        if cores_per_sm not in (32, 64, 96, 128):
            raise ValueError(f"cores_per_sm must be 32, 64, 96 or 128, got {cores_per_sm!r}")
        if not 0 <= check_int("dead_letter_capacity", dead_letter_capacity, *any_int) <= 10_000_000:
            raise ValueError(f"dead_letter_capacity must be in [0, 10M], got {dead_letter_capacity}")
        dead_letter_capacity = int(dead_letter_capacity)
        strict = _check_strict(strict, allow_none=False)
        if not isinstance(fault_injection, (bool, np.bool_)):
            raise TypeError(f"fault_injection must be True or False, got {type(fault_injection).__name__}")
        fault_injection = bool(fault_injection)
        if backend == "auto" and fault_injection:
            backend = "cpu"  # fault injection is CPU-only; auto never picks what cannot run
        factory = gpu.make_device(backend) if device is None else (lambda: device)
        if factory is not None and backend == "cpu":
            raise ValueError("a device was given but backend='cpu'")
        if factory is not None and fault_injection:
            raise BackendUnavailable("fault injection runs on the CPU backend only")
        # default: every usable core, up to the native limit (a 96-core machine runs 63 workers)
        cpu_threads = (min(usable_cores(), MAX_THREADS) if threads is None
                       else check_int("threads", threads, *any_int))
        if not isinstance(backpressure, str) or backpressure not in BACKPRESSURE:
            raise (ValueError if isinstance(backpressure, str) else TypeError)(
                f"backpressure must be one of {sorted(BACKPRESSURE)}, got {backpressure!r}")
        if not 0 <= check_int("capacity", capacity, *any_int) <= 1 << 20:
            raise ValueError(f"capacity must be in [0, 2**20] (0 = automatic), got {capacity}")
        capacity = int(capacity)
        block_bars = check_int("block_bars", block_bars, 0, (1 << 32) - 1)
        stall_deadline = check_real("stall_deadline", stall_deadline, 0.001, 3600)
        if check_int("fsync", fsync, *any_int) not in (0, 1, 2):
            raise ValueError(f"fsync must be 0, 1 or 2, got {fsync!r}")
        fsync = int(fsync)
        if not 1 << 16 <= check_int("journal_segment_bytes", journal_segment_bytes, *any_int) <= 1 << 40:
            raise ValueError(f"journal_segment_bytes must be in [64 KiB, 1 TiB], got {journal_segment_bytes}")
        journal_segment_bytes = int(journal_segment_bytes)
        if population_hash is not None:
            population_hash = check_int("population_hash", population_hash, 0, (1 << 64) - 1)
        self._pop = population
        self._ids_lock = threading.RLock()  # agent ids -> slots vs generations replacing them
        self.strict = strict
        self.backpressure = backpressure
        self._population_hash = population.hash if population_hash is None else population_hash
        self._config = {"cores_per_sm": cores_per_sm, "block_bars": int(block_bars),
                        "strict": self.strict, "backpressure": backpressure,
                        "capacity": int(capacity), "dead_letter_capacity": int(dead_letter_capacity)}
        native_config = {"cores_per_sm": cores_per_sm, "population_hash": self._population_hash,
                         "dead_letter_capacity": dead_letter_capacity, "block_bars": block_bars,
                         "capacity": capacity, "backpressure": BACKPRESSURE[backpressure],
                         "stall_deadline_ns": int(stall_deadline * 1e9), "fault_injection": fault_injection}

        def cpu_engine() -> Any:
            """The native engine on ``cpu_threads`` CPU threads (no device, or auto's fallback):
            the only place the range of ``threads`` is checked, a device runs on its own."""
            if not 1 <= cpu_threads <= MAX_THREADS:
                raise ValueError(f"threads must be in [1, {MAX_THREADS}], got {cpu_threads}") from None
            return _core.Engine(population.records, threads=cpu_threads, **native_config)

        self.backend_fallback: str | None = None  # why backend="auto" runs on the CPU
        self._device: Any = None
        self._device_lock = threading.RLock()
        dev = None
        if factory is not None:
            try:
                dev = factory()  # CupyDevice: compiles, loads and runs a kernel, or BackendUnavailable
            except BackendUnavailable as e:
                if backend != "auto":
                    raise
                self._fall_back(e)
        if dev is None:
            self._native = cpu_engine()
        else:  # the native engine only mirrors: ingress, journal, state for readers
            self._native = _core.Engine(population.records, threads=1, **native_config)
            try:
                self._device = gpu.DeviceRunner(self._native, dev, population_hash=self._population_hash,
                                                block_bars=block_bars)
            except BackendUnavailable as e:
                _close_native(self._native)
                if backend != "auto":
                    raise
                self._fall_back(e)
                self._native = cpu_engine()
            except BaseException:
                _close_native(self._native)
                raise
        self._callbacks: list[Callable[[AISignal], Any]] = []
        self._dispatcher: threading.Thread | None = None
        self._dispatch_lock = threading.Lock()  # one dispatcher started at a time
        # threads that consume this engine's signals and so may not feed it (see
        # register_consumer): the on_signal dispatcher, an EngineService's egress thread; each
        # with how a refusal names it
        self._consumers: dict[threading.Thread, str] = {}
        self._stop = threading.Event()
        self._callback_errors = [0]  # shared with the dispatcher thread
        # run/step return the signals of their own bars: while one runs, no other thread may
        # poll (it would take some of them), and neither starts while another thread polls
        self._egress_guard = threading.Lock()
        # run and step of several threads, one at a time for their whole call: natively a step
        # lets go of the feed before it waits for its signal, and another thread's run or step
        # coming in then found that bar unpolled and refused ("poll() them first"). Reentrant
        # only so that a thread can tell it holds it (_is_owned): a call cut short by ^C at any
        # bytecode lets go of what it took, and a signal handler's run inside a run is refused.
        self._own_lock = threading.RLock()
        self._pollers: dict[threading.Thread, bool] = {}  # threads in poll()
        self._runners: dict[threading.Thread, str] = {}  # threads in run/step, and which
        # signals a poll or step had taken when ^C cut it short (uint8, whole records): the
        # next poll returns them first (under _egress_guard)
        self._held: np.ndarray = _NO_SIGNALS
        self._close_lock = threading.Lock()
        self._close_done = threading.Event()
        self._closed = False
        self._foreign = 0  # the pid of a forked child this engine was inherited by
        # Threads are joined when the engine is garbage-collected, even without close().
        self._finalizer = weakref.finalize(self, _close_native, self._native)
        _live_engines.add(self)
        # The native side learns which thread runs the interpreter's exit, so that a daemon
        # thread coming back from a native call once the interpreter finalizes waits for the
        # process to end instead of taking the GIL (which aborted the process). Registered
        # again with each engine: atexit runs the last registration first.
        atexit.unregister(_core._exiting)
        atexit.register(_core._exiting)
        ref = weakref.ref(self)
        self.faults = _Faults(self._native, fault_injection, lambda: (e := ref()) is None or e._closed)
        self._journal_path: str | None = None
        self._journal_lock = threading.Lock()
        self._journal_instruments = 0
        self.backend = "cpu" if self._device is None else "cuda"
        if journal is not None:
            self._open_journal(os.fspath(journal), fsync, journal_segment_bytes)

    def _fall_back(self, e: BaseException) -> None:
        """backend="auto" could not start the GPU backend: run on the CPU, saying why (in
        ``stats()["backend_fallback"]``, and in the log once per reason and process)."""
        reason = str(e)
        self.backend_fallback = reason
        with _fallbacks_lock:
            if reason in _fallbacks_logged:
                return
            _fallbacks_logged.add(reason)
        # no GPU stack here is the expected case of "auto"; a broken one, or a GPU that failed to start, is not
        level = logging.INFO if getattr(e, "no_gpu", False) else logging.WARNING
        log.log(level, "backend='auto' runs on the CPU: %s", reason)

    # ---- journal ------------------------------------------------------------------------------
    def _open_journal(self, path: str, fsync: int, segment_bytes: int) -> None:
        from . import journal as jr

        try:
            with self._journal_lock:
                # one reading of the names for the meta record and the count the next
                # instruments record starts from: a name registered by another thread between
                # two readings went into both, and replay refused the journal
                names = instruments.names()
                self._journal_instruments = len(names)
                meta = jr.encode_meta(self._pop.records, self._population_hash, self._config, names)
                self._native.open_journal(path, meta, self._population_hash,
                                          jr.config_hash(self._config), jr.build_id(), fsync,
                                          segment_bytes)
        except (OSError, ValueError) as e:
            self.close()
            raise JournalError(f"cannot open journal at {path!r}: {e}") from e
        self._journal_path = path

    def _journal_new_instruments(self) -> None:
        # Ids are per process: names registered since the last record go to the journal before
        # any bar that may use them.
        if self._journal_path is None or len(instruments) == self._journal_instruments:
            return
        from . import journal as jr

        with self._journal_lock:
            names = instruments.names()
            first = self._journal_instruments
            if len(names) > first:
                self._native.journal_append(_core.RecordType.INSTRUMENTS,
                                            jr.encode_instruments(first, names[first:]), True)
                self._journal_instruments = len(names)

    @property
    def journal_path(self) -> str | None:
        """Directory of this engine's journal, or None."""
        return self._journal_path

    def journal_control(self, raw: bytes) -> int:
        """Journal an encoded control command, in order with the bars (durably, by the fsync
        level), before the caller applies it. Returns the record's sequence number."""
        return self._journal_record(_core.RecordType.CONTROL, raw)

    def journal_event(self, raw: bytes) -> int:
        """Journal an encoded event of your own (a decision, an annotation...) in order with the
        bars; replay reports it. ``ValueError`` for a msgpack map whose ``type`` is one of the
        engine's own (``credit``, ``dsi``, ``ext_scores``, ``generation``): replay applies those
        to the engine, so one of yours would change (or stop) the replay; the engine journals
        them itself (``set_credit``, ``set_dsi``, ``set_external_scores``, ``evolve``)."""
        from . import journal as jr

        if isinstance(raw, (bytes, bytearray, memoryview)):
            kind = jr.engine_event_type(bytes(raw))
            if kind is not None:
                raise ValueError(f"journal_event: type {kind!r} is the engine's own event, which replay "
                                 f"applies to the engine: give yours another type")
        return self._journal_record(_core.RecordType.EVENT, raw)

    def _journal_record(self, kind: Any, raw: bytes) -> int:
        self._check_open()
        if self._journal_path is None:
            raise JournalError("this engine has no journal (pass journal=DIR)")
        if not isinstance(raw, (bytes, bytearray, memoryview)):
            raise TypeError(f"expected encoded bytes, got {type(raw).__name__}")
        self._journal_new_instruments()
        return int(self._native.journal_append(kind, bytes(raw), True))

    @classmethod
    def replay(cls, path: str | os.PathLike[str], **kwargs: Any) -> Any:
        """Rebuild an engine from the journal at ``path`` and reproduce its signal stream,
        verified against the journaled hashes. See :func:`dynamic_core.journal.replay`."""
        from . import journal as jr

        return jr.replay(path, **kwargs)

    @property
    def population(self) -> Population:
        return self._pop

    def run(self, bars: np.ndarray, *, strict: bool | None = None) -> np.ndarray:
        """Process a time-ordered ``BAR_DTYPE`` batch (instruments may be mixed).

        Returns a ``SIGNAL_DTYPE`` array: one signal per accepted bar of a followed
        (instrument, timeframe), in input order. State carries over between calls, so a long
        history can be fed in pieces. The GIL is released while the batch runs. A batch longer
        than the room in the window (``capacity``) is taken in pieces, each journaled as it is
        taken; ``close`` from another thread ends the call (it raises), and the journal holds
        the bars taken before it (``stats()["bars_in"]``).

        When it raises after taking pieces of the batch (a journal write that failed on a later
        piece, ^C, ``close``), the exception carries ``.taken``, how many rows of the batch (a
        prefix) the engine took, and ``.signals``, their signals (``SIGNAL_DTYPE``, in order):
        the journal records them as handed out, and nothing else returns them. Resume from row
        ``.taken``.
        """
        self._check_runnable()
        strict = _check_strict(strict, allow_none=True)
        b = as_bars(bars)
        self._journal_new_instruments()
        strict = self.strict if strict is None else strict
        if self._device is not None:
            with self._device_lock:
                return self._device.run(b, len(instruments), strict=strict)
        self._not_nested("run")
        box: list[tuple[Any, int]] = []  # (signals, bars taken): the native run puts them here too
        try:
            try:
                self._egress_enter("run")
                return self._native.run(b, len(instruments), strict, box).view(SIGNAL_DTYPE)
            finally:
                self._egress_exit()
        except BaseException as e:  # ^C as the call returned too: the signals are in the box
            if box:
                raw, taken = box[-1]
                _attach_partial(e, np.frombuffer(raw, dtype=SIGNAL_DTYPE), int(taken))
            raise

    def _not_nested(self, what: str) -> None:
        """RuntimeError when this thread is inside a ``run`` or ``step`` already (a signal
        handler's call, run during the wait): it would wait for its own caller."""
        if self._own_lock._is_owned():  # type: ignore[attr-defined]
            raise RuntimeError(f"{what}() inside a run() or step() on the same thread (from a signal "
                               f"handler?): it would wait for that call to end, which waits for it")

    def _egress_enter(self, what: str, timeout_ns: int = -1) -> bool:
        """``run`` and ``step`` return the signals of their own bars: while one runs (between
        this and ``_egress_exit``), ``poll`` from another thread raises instead of taking some of
        them, and neither starts while another thread polls (RuntimeError, before anything is
        taken). Feeding calls of several threads still serialise among themselves: this waits
        for another thread's run or step (interruptible by ^C), at most ``timeout_ns`` (< 0: no
        limit; False returned when it ran out). Called inside the ``try`` whose ``finally`` calls
        ``_egress_exit``, which undoes whatever part of it was done."""
        me = threading.current_thread()
        if not self._own_lock.acquire(timeout=-1 if timeout_ns < 0 else timeout_ns / 1e9):
            return False
        try:
            self._check_open()  # closed while this call waited
            with self._egress_guard:
                if k := self._n_held():
                    raise RuntimeError(f"{what}(): {k} signal(s) of earlier bars are not polled yet (a poll or "
                                       f"step that ^C cut short had taken them): poll() them first; {what}() "
                                       f"returns its own bars' signals only")
                if self._pollers:
                    raise RuntimeError(f"{what}() returns the signals of its bars, but poll() is waiting on "
                                       f"another thread and would take some of them: feed with submit() and "
                                       f"poll, or stop polling first")
                # checked again under the guard that on_signal starts its dispatcher under: one
                # starting since the caller's first check would take some of these signals
                self._no_other_consumer(what)
                # only the holder of _own_lock is in run/step: anything else here is what a ^C
                # in an earlier call's _egress_exit left behind
                self._runners.clear()
                self._runners[me] = what
        except BaseException:
            self._own_lock.release()
            raise
        return True

    def _no_runner_beside(self, what: str, taker: str, hint: str = "") -> None:
        """Under ``_egress_guard``: RuntimeError when another thread is in ``run``/``step``,
        whose signals ``taker`` (what ``what`` would start) would take some of."""
        me = threading.current_thread()
        for th, runs in self._runners.items():
            if th is not me and self._own_lock_held_elsewhere():
                raise RuntimeError(f"{what}() while {runs}() runs on thread {th.name!r}: it returns the signals "
                                   f"of its bars, and {taker} would take some of them{hint}")

    def _own_lock_held_elsewhere(self) -> bool:
        """Whether another thread is in ``run``/``step`` now (it holds ``_own_lock``): what
        ``_runners`` says is checked against it, since a ^C in ``_egress_exit`` may leave its
        thread there after it let go of the lock."""
        if self._own_lock._is_owned():  # type: ignore[attr-defined]
            return False
        took = False
        try:
            took = self._own_lock.acquire(blocking=False)
        finally:
            try:  # (no call before the release: see _egress_exit)
                self._own_lock.release()
            except RuntimeError:  # not taken
                pass
        return not took

    def _egress_exit(self) -> None:
        """Undo what ``_egress_enter`` did on this thread, all or part of it (^C may have cut it
        short at any bytecode): the lock is let go even if ^C lands in the unregistering."""
        try:
            with self._egress_guard:
                self._runners.pop(threading.current_thread(), None)
        finally:
            # no call before the release (Python raises a pending ^C as a call returns or a
            # function starts), so ^C cannot land between finding it held and letting go;
            # never held nested (_not_nested)
            try:
                self._own_lock.release()
            except RuntimeError:  # not held by this thread: the enter failed or was cut short
                pass

    def _n_held(self) -> int:
        """Signals an interrupted poll or step gave back, waiting for the next poll."""
        return len(self._held) // _SIGNAL_SIZE

    def _hold(self, box: list[Any]) -> None:
        """A poll or step was cut short (^C, as the native call returned too) after taking the
        signals in ``box`` (in order): they go back for the next poll, ahead of the rest held."""
        parts = [np.frombuffer(x, dtype=np.uint8) for x in box if len(x)]
        if parts:
            with self._egress_guard:
                self._held = np.concatenate([*parts, self._held])

    # ---- streaming ----------------------------------------------------------------------------
    def submit(self, bars: np.ndarray, timeout: float | None = None) -> int:
        """Hand bars to the workers without waiting for their signals; returns how many were
        taken. Bad bars are taken too (rejected with a reason, counted, dead-lettered).

        When the window of bars in flight (``capacity``) is full, the ``backpressure`` policy
        decides: ``"block"`` waits until a consumer polls; ``"reject_new"`` returns early, the
        bars from the returned index on were not taken (resubmit them); ``"drop_oldest"`` drops
        the oldest ready, unpolled signals (for a piece of up to a quarter of the window at a
        time, each journaled as it is taken). Every case is counted in ``stats()["backpressure"]``.
        Safe to call from several threads (feeding calls, ``submit``, ``step``, ``run``, are
        serialised and each batch stays contiguous among them). A ``"block"`` submit takes its
        batch in pieces that fit the room in the window, each journaled as it is taken. While it
        waits for room, readers (``stats``, ``agents``, ``dead_letters``...) and changes
        (``evolve``, ``set_credit``, ``set_dsi``...) go on, a change landing between two pieces
        (the journal records it there, so replay matches); another feeding call waits for the
        batch. ``close`` ends the wait: the submit raises, and the bars taken before it (counted
        in ``stats()["bars_in"]``) are the ones journaled.

        ``timeout`` (seconds; None: no limit) bounds a ``"block"`` submit's wait for room: what
        fits by then is taken and its count returned, the rest is not (counted in
        ``stats()["backpressure"]["rejected"]``; resubmit it). It bounds the wait for another
        feeder's batch too (a blocked submit, a ``run``): past it nothing is taken and 0 is
        returned, the bars counted the same way (one backpressure event). A thread that both submits and
        polls needs it, or must poll until its bars are out: ``poll`` returns the signals ready
        when the first one is, so bars can still be in flight after it, holding the window.
        On the main thread, ^C ends either wait with ``KeyboardInterrupt`` (the pieces taken
        before it stay taken; behind another feeder's batch, nothing is).
        """
        self._check_open()
        self._cpu_only("submit")
        self._not_from_consumer("submit")
        self._not_nested("submit")
        b = as_bars(bars)
        self._journal_new_instruments()
        return int(self._native.submit(b, len(instruments), self.strict, _timeout_ns(timeout)))

    def poll(self, max_n: int | None = None, timeout: float | None = 0.0) -> np.ndarray:
        """Ready signals in bar order (``SIGNAL_DTYPE``), at most ``max_n``. Waits up to
        ``timeout`` seconds for the first one (``None`` or ``inf``: until one is ready; 0: not at
        all; longer than ~146 years: clamped to that). On the main thread, ^C ends the wait with
        ``KeyboardInterrupt`` before any signal is taken: the ready ones stay for the next poll."""
        self._check_open()
        self._cpu_only("poll")
        # more than the native maximum means "all there are", like it
        n = 1 << 20 if max_n is None else min(check_int("max_n", max_n, 0, math.inf), _MAX_POLL)
        if n == 0:
            return np.empty(0, dtype=SIGNAL_DTYPE)
        t = _timeout_ns(timeout)
        me = threading.current_thread()
        box: list[Any] = []  # what this poll took, in order: what was held, then the native polls'
        try:
            try:
                with self._egress_guard:  # the guard on_signal starts its dispatcher under
                    self._pollers[me] = True
                    disp = self._dispatcher
                    if disp is not None and disp is not me and disp.is_alive():
                        raise RuntimeError("poll() beside on_signal: its dispatcher delivers every signal to the "
                                           "callbacks, and this poll would take some of them from them; consume "
                                           "in the callbacks, or poll on an engine without any")
                    self._no_runner_beside("poll", "this poll")
                    if len(self._held):
                        box.append(self._held[:n * _SIGNAL_SIZE])
                        self._held = self._held[n * _SIGNAL_SIZE:]
                got = len(box[0]) // _SIGNAL_SIZE if box else 0
                if got < n:
                    self._sliced_poll(n - got, 0 if got else t, box)
            finally:
                with self._egress_guard:
                    self._pollers.pop(me, None)
            if not box:
                return np.empty(0, dtype=SIGNAL_DTYPE)
            return np.frombuffer(box[0] if len(box) == 1 else np.concatenate(box), dtype=SIGNAL_DTYPE)
        except BaseException:  # ^C as a native poll returned too: what it took is in the box
            self._hold(box)
            raise

    def _sliced_poll(self, n: int, t: int, box: list[Any]) -> Any:
        """The native poll of up to ``n`` signals waiting ``t`` ns (< 0: no limit), which it
        also appends to ``box`` when it takes any. A long wait goes in slices, so ^C (handled
        between them) ends it, and so does :meth:`close` from another thread (RuntimeError)."""
        if 0 <= t <= _POLL_SLICE_NS:
            return self._native.poll(n, t, box)
        end = None if t < 0 else time.monotonic_ns() + t
        while True:
            left = _POLL_SLICE_NS if end is None else min(_POLL_SLICE_NS, end - time.monotonic_ns())
            raw = self._native.poll(n, max(0, left), box)
            if len(raw) or (end is not None and time.monotonic_ns() >= end):
                return raw
            self._check_open()  # closed while waiting: the native poll would return at once, forever

    def step(self, bar: np.ndarray | np.void, timeout: float | None = 10.0) -> AISignal | None:
        """One bar in, its signal out (a frozen :class:`AISignal`). Returns None when the bar
        was rejected or no agent follows its stream. Not beside a running ``on_signal``
        dispatcher or another thread's ``poll``, which could take the signal first: RuntimeError
        (and a ``poll`` from another thread while it runs raises).

        ``timeout`` (seconds; None: no limit) bounds the whole call: the wait for another
        thread's feeding call (a ``run``, a ``submit`` still placing its batch) to finish it,
        then the wait for the signal. Behind a ``submit`` that waits for room, which only a
        consumer's ``poll`` makes (refused while a step runs), it raises ``RuntimeError`` at once
        (the earlier bars' signals are not polled; nothing is taken or counted), as ``run``
        does. ``TimeoutError`` otherwise, saying which wait ran out: a bar that was
        not taken is counted as a ``submit``'s would be (``stats()["backpressure"]``: one event,
        one rejected bar; step it again); a bar that was taken has its signal come later
        (``poll`` it before the next ``step`` or ``run``). On the main thread, ^C ends the wait
        with ``KeyboardInterrupt`` (a bar that was not taken yet is not taken; one that was has
        its signal come later, as after a timeout: ``poll`` it)."""
        self._check_open()
        self._not_from_consumer("step")
        self._no_other_consumer("step")
        if type(bar) is np.void and bar.dtype == BAR_DTYPE:
            b = bar  # one record (a row of a BAR_DTYPE array): its bytes go to the core as they are
        else:
            b = as_bars(np.atleast_1d(bar))
            if len(b) != 1:
                raise ValueError(f"step() takes one bar, got {len(b)}")
        t = _timeout_ns(timeout)
        self._journal_new_instruments()
        if self._device is not None:
            with self._device_lock:
                out = self._device.run(np.atleast_1d(b), len(instruments), strict=self.strict)
            return signal_from_record(out[0]) if len(out) else None
        self._not_nested("step")
        start = time.monotonic_ns()
        box: list[Any] = []  # the signal, once the native step or poll took it
        try:
            try:
                if not self._egress_enter("step", t):  # another thread's run or step held on throughout
                    self._native.count_refused(1)
                    raise self._step_not_taken(timeout)
                if t >= 0:
                    t = max(0, start + t - time.monotonic_ns())
                first = t if 0 <= t <= _POLL_SLICE_NS else _POLL_SLICE_NS
                status, raw = self._native.step(b, len(instruments), first, self.strict, t, box)
                if status == -2:
                    self._check_open()
                    raise self._step_not_taken(timeout)
                if status < 0:
                    return None
                if status == 0 and first != t:  # the rest of a long wait, in slices (^C, close)
                    raw = self._sliced_poll(1, -1 if t < 0 else max(0, start + t - time.monotonic_ns()), box)
                    status = 1 if len(raw) else 0
            finally:
                self._egress_exit()
            if status == 0:
                self._check_open()  # closed while it waited: that, not a timeout
                raise TimeoutError(f"step(): the bar was taken but its signal was not ready within {timeout} s "
                                   "(see stats()['sms']); poll() it before the next step or run")
            return signal_from_bytes(raw)
        except BaseException:  # ^C as the native call returned too: the signal is in the box
            self._hold(box)
            raise

    @staticmethod
    def _step_not_taken(timeout: float | None) -> TimeoutError:
        return TimeoutError(f"step(): the bar was not taken: another thread's feeding call (a run, a step, a "
                            f"submit waiting for room) held the feed for the whole timeout ({timeout} s); "
                            f"counted in stats()['backpressure']; step it again")

    def on_signal(self, callback: Callable[[AISignal], Any]) -> Callable[[AISignal], Any]:
        """Call ``callback(signal)`` for every signal, in bar order, on a dispatcher thread.

        The dispatcher becomes the consumer: ``poll`` from another thread raises
        ``RuntimeError`` (it would take signals from the callbacks). A callback that raises is
        logged (``logging.getLogger("dynamic_core.engine")``) and counted in
        ``stats()["callback_errors"]``; the signal is not redelivered, and later signals and the
        other callbacks still run. Workers never run Python. Usable as a decorator.

        A callback must not feed the engine: ``run``, ``submit`` and ``step`` called from it
        raise ``RuntimeError`` (the dispatcher is the engine's only consumer, so a feeding call
        waiting for room from it could wait forever). Nor does a dispatcher start while another
        thread is in ``run`` or ``step``, which return their own bars' signals, or waits in
        ``poll``, which would take some of the callbacks': RuntimeError.
        """
        if not callable(callback):
            raise TypeError("callback must be callable")
        self._check_open()
        self._cpu_only("on_signal")
        with self._dispatch_lock:
            if self._dispatcher is None or not self._dispatcher.is_alive():  # none yet, or it died
                with self._egress_guard:  # the guard run, step and poll register under
                    self._no_runner_beside("on_signal", "the dispatcher",
                                           "; register callbacks before feeding, or after it returns")
                    if any(th is not threading.current_thread() for th in self._pollers):
                        # a poll waiting on another thread would take some signals
                        raise RuntimeError("on_signal() while poll() waits on another thread: the dispatcher "
                                           "delivers every signal to the callbacks, and that poll would take "
                                           "some of them; stop polling first, or consume by polling only")
                    if self._dispatcher is not None:
                        self.unregister_consumer(self._dispatcher)
                    held, self._held = self._held, _NO_SIGNALS  # an interrupted poll's: first
                    self._dispatcher = threading.Thread(
                        target=_dispatch_loop, name="dc-signal-dispatch", daemon=True,
                        args=(self._native, self._stop, self._callback_errors, weakref.ref(self), held))
                    self.register_consumer(self._dispatcher, "an on_signal callback")
                    self._callbacks.append(callback)  # before its first batch
                    # started under the guard: run/step see a consumer only once it is alive
                    self._dispatcher.start()
            else:
                self._callbacks.append(callback)
        return callback

    def _no_other_consumer(self, what: str) -> None:
        """RuntimeError when another thread consumes this engine's signals (an ``on_signal``
        dispatcher, a registered consumer): it would take some of the signals ``what`` returns."""
        if not self._consumers:
            return
        me = threading.current_thread()
        for th, who in list(self._consumers.items()):
            if th is not me and th.is_alive():
                raise RuntimeError(f"{what}() returns the signals of its bars, but {who} ({th.name!r}) takes "
                                   f"signals too and would get some of them: use submit() and let it consume, "
                                   f"or {what}() on an engine without one")

    def _not_from_consumer(self, what: str) -> None:
        """RuntimeError when called from a consumer thread (see :meth:`register_consumer`)."""
        me = threading.current_thread()
        who = self._consumers.get(me)
        if who is not None:
            raise RuntimeError(f"{what}() called from {who} ({me.name!r}): {who} cannot feed the engine "
                               "(a consumer thread is the one that makes room, so feeding from it can "
                               "deadlock); feed from another thread")

    def register_consumer(self, thread: threading.Thread | None = None,
                          who: str = "a consumer thread") -> None:
        """Declare ``thread`` (default: the calling one) a consumer of this engine's signals, e.g.
        the egress thread of an :class:`~dynamic_core.transport.EngineService` (the ``on_signal``
        dispatcher is one from its start): ``run`` and ``submit`` called from it raise
        ``RuntimeError``, naming it as ``who``, instead of deadlocking. Undo with
        :meth:`unregister_consumer`."""
        self._consumers[threading.current_thread() if thread is None else thread] = who

    def unregister_consumer(self, thread: threading.Thread | None = None) -> None:
        """Undo :meth:`register_consumer` (no error if ``thread`` was not registered)."""
        self._consumers.pop(threading.current_thread() if thread is None else thread, None)

    def close(self) -> None:
        """Stop the dispatcher, workers and sentinel and join them. Bars already handed to the
        workers are run first, so every SM's agents stand at the same bar (``agents()`` still
        answers after close); their signals are not delivered. That takes as long as those bars
        do: up to the window, ``capacity``. The ``on_signal`` dispatcher stops after the callback
        it is running (the rest of the signals it took are not delivered). Idempotent; also done
        by ``with`` and when the engine is collected."""
        with self._close_lock:
            first = not self._closed
            self._closed = True
        if not first:
            # a later call returns once the first has joined everything (the dispatcher's own
            # call, from a callback, cannot wait for the join of itself)
            if threading.current_thread() is not self._dispatcher:
                self._close_done.wait()
            return
        try:
            self._close_first()
        finally:
            self._close_done.set()

    def _close_first(self) -> None:
        self._stop.set()
        # The native engine stops first: a callback waiting on it (a feeding call from another
        # thread it waits for, a submit parked for room) is released, so the join can end.
        self._finalizer()
        if self._dispatcher is not None and self._dispatcher is not threading.current_thread():
            self._dispatcher.join()
        try:
            if self._journal_path is not None:
                # raises JournalError if the journal failed and no call has said so yet
                self._native.close_journal()
        finally:
            if self._device is not None:  # device memory back now, not at garbage collection
                with self._device_lock:
                    self._close_device()

    def _close_device(self) -> None:
        """Copies the device's state to the native mirror (so agents() still answers after
        close) and lets the device go. Raises nothing: after a device failure (or one found by
        this copy, logged) there is no state to copy, and agents() says so."""
        dev = self._device
        try:
            dev.store_state()  # a no-op once the runner failed
        except Exception as e:
            log.warning("the CUDA device failed while its agent state was copied back at close: %s", e)
        finally:
            self._device = _ClosedDevice(getattr(dev, "failed", None))

    @property
    def closed(self) -> bool:
        return self._closed

    def __copy__(self) -> Engine:
        raise TypeError("an Engine cannot be copied: it owns worker threads, native state and its journal; "
                        "make another from the same population (or replay the journal)")

    def __deepcopy__(self, memo: dict[int, Any]) -> Engine:
        return self.__copy__()

    def __reduce__(self) -> Any:
        raise TypeError("an Engine cannot be pickled: it owns worker threads, native state and its journal; "
                        "pickle its population (Engine.population) or keep its journal, and build it again")

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_runnable(self) -> None:
        """What makes ``run`` refuse any batch (closed, called from a consumer thread, another
        consumer taking the signals): RuntimeError, before anything is taken (feeders that
        must not take input they cannot run, such as the tick driver, check it first too)."""
        self._check_open()
        self._not_from_consumer("run")
        self._no_other_consumer("run")

    def _check_open(self) -> None:
        if self._closed:
            if self._foreign:
                raise RuntimeError(_forked_message(self._foreign))
            raise RuntimeError("engine is closed")

    def validate(self, bars: np.ndarray) -> np.ndarray:
        """Reason code per bar that ``run`` would give now (0 = accepted), changing nothing."""
        return self._native.validate(as_bars(bars), len(instruments))

    def agents(self) -> np.ndarray:
        """Per-agent state in population order (``AGENT_DTYPE``): score, action, position,
        equity, trades, wins, Sharpe, max drawdown, quarantined, ...

        With ``backend="cuda"``, after a device error (in ``run``/``step``, or while state was
        copied) raises :class:`~dynamic_core.errors.BackendUnavailable` naming it, also after
        ``close()``: the device held the only current state, and what it held when it failed
        matches no journal position (replay the journal for it)."""
        with self._mirror():
            return self._native.agents().view(AGENT_DTYPE)

    def _cpu_only(self, what: str) -> None:
        if self._device is not None:
            raise BackendUnavailable(f"{what}() runs on the CPU backend only; with backend='cuda' use run() "
                                     "(blocks of bars) or step() (one bar, its signal)")

    @contextlib.contextmanager
    def _mirror(self, changes: bool = False, lanes: bool = False,
                only: tuple[str, ...] = ()) -> Iterator[None]:
        """Around native calls that read (or, ``changes``, write) agent state: with a device, its
        state is copied to the native mirror first and, after a change, back (with the lanes'
        parameters, which a generation rewrites). ``only``: the call writes just these state
        arrays and reads none, so only they travel, and only back."""
        if self._device is None:
            yield
            return
        with self._device_lock:
            if self._device.failed:
                raise BackendUnavailable(f"the CUDA device failed ({self._device.failed}): the agent state it "
                                         "held is lost and the mirror's is stale; replay the journal "
                                         "(dc.journal.replay) for the state")
            if not only:
                self._device.store_state()
            try:
                yield
            finally:
                if only:
                    self._device.load_fields(only)
                elif changes:
                    if lanes:
                        self._device.load_lanes()
                    self._device.load_state()

    def set_credit(self, agent_ids: Any, credit: Any) -> None:
        """Set the consensus-weight credit of agents by id (1.0 = neutral), between updates.

        An agent's weight in consensus is ``max(equity, 0) x max(1 - max_drawdown, 0) x credit``;
        the decision layer raises the credit of agents whose live trades worked and lowers it
        for those whose did not (:class:`dynamic_core.decision.CreditLedger`). With a journal
        the change is journaled in order with the bars, so replay reproduces it.

        Raises ``ValueError`` for an unknown id (or one outside [0, 2**32)) or a credit that is
        not in (0, 1e6], ``TypeError`` for ids that are not integers (a bool, float or str is
        no id) or credits that are not numbers (nothing changes then). No ids: nothing to do.
        """
        from .payloads import CreditUpdate

        self._set_by_id("set_credit", agent_ids, credit, self._native.set_credit,
                        lambda ids, vals: CreditUpdate(agents=ids, credit=vals), "credit")

    def set_external_scores(self, agent_ids: Any, scores: Any) -> None:
        """Set the scores of external-score agents (genome ``kind`` 1) by id, used from the
        next update on; between updates, journaled like :meth:`set_credit`.

        An external-score agent is a lane like any other -- position, paper P&L, fitness,
        votes and weight in consensus -- except that its score in [-1, 1] comes from outside
        the engine (e.g. a learning model, :mod:`dynamic_core.learning.agents`) instead of the
        indicator blend. It keeps its last score until set again (0.0 at first).

        Raises ``ValueError`` for an unknown id, an agent that is not kind 1, or a score that
        is not finite or outside [-1, 1], ``TypeError`` for ids or scores of the wrong type, as
        :meth:`set_credit` (nothing changes then).
        """
        from .payloads import ExternalScores

        self._set_by_id("set_external_scores", agent_ids, scores, self._native.set_external_scores,
                        lambda ids, vals: ExternalScores(agents=ids, scores=vals), "scores")

    def _set_by_id(self, what: str, agent_ids: Any, values: Any, native: Callable[..., Any],
                   event: Callable[[bytes, bytes], Any], name: str = "values") -> None:
        self._check_open()
        ids = _agent_ids(what, agent_ids)
        vals = _real_values(what, name, values)
        if len(ids) != len(vals):
            raise ValueError(f"{what}: {len(ids)} agent ids but {len(vals)} values")
        if not len(ids):
            return  # nothing to set (nor to journal)
        u, counts = np.unique(ids, return_counts=True)
        if len(u) != len(ids):
            raise ValueError(f"{what}: agent id {int(u[counts > 1][0])} is given more than once (one value "
                             f"per agent)")
        with self._ids_lock:  # no generation may replace these agents between lookup and write
            idx = self._indices_of(ids, what)
            raw = b""
            if self._journal_path is not None:
                raw = _event_encoder.encode(event(ids.astype("<u4").tobytes(), vals.astype("<f8").tobytes()))
                self._journal_new_instruments()
            with self._mirror(changes=True, only=("credit", "ext_score")):
                native(idx, vals, raw)

    def set_dsi(self, evidence: Mapping[str | int, float]) -> int:
        """Set the DSI microstructure evidence (in [-1, 1]) of instruments, between updates.

        Agents whose genome has ``w_dsi != 0`` add ``w_dsi x evidence`` of their stream's
        instrument (every timeframe of it) to their blend before the squash, from the next update
        on; the others are untouched. Feed it from :class:`dynamic_core.learning.dsi.Dsi`, e.g.
        ``eng.set_dsi({name: dsi.evidence(name) for name in names})``. With a journal the change
        is journaled in order with the bars, so replay reproduces it.

        Returns the number of streams updated (instruments this engine has no stream of are
        skipped). Raises ``ValueError`` for evidence that is not finite or outside [-1, 1], or an
        unknown instrument id (nothing changes then).
        """
        from .payloads import DsiEvidence

        self._check_open()
        # a mapping, or what has its items() (a pandas Series)
        if not isinstance(evidence, Mapping) and not callable(getattr(evidence, "items", None)):
            raise TypeError("set_dsi: evidence must be a mapping of instrument (name or id) to evidence "
                            f"in [-1, 1], got {type(evidence).__name__}")
        names: list[str] = []
        ids: list[int] = []
        vals: list[float] = []
        for k, v in evidence.items():
            if not is_real(v):
                raise TypeError(f"set_dsi: evidence of {k!r} must be a number, got {type(v).__name__}")
            try:
                x = float(v)
            except OverflowError:  # an int past the float range: out of [-1, 1] below
                x = math.inf
            if not (math.isfinite(x) and -1.0 <= x <= 1.0):
                raise ValueError(f"set_dsi: evidence of {k!r} must be finite and in [-1, 1], got {v!r}")
            if isinstance(k, str):
                i = instruments.get(k)
                if i is None:  # never registered: no stream of it
                    continue
            else:
                try:
                    i = instruments.resolve(k)
                except KeyError as e:
                    raise ValueError(f"set_dsi: {e.args[0]}") from None
            if i in ids:  # by name and by id, say: which value applies would be undefined
                raise ValueError(f"set_dsi: instrument {instruments.name(i)!r} is given more than once "
                                 "(one evidence per instrument)")
            names.append(instruments.name(i))
            ids.append(i)
            vals.append(x)
        raw = b""
        if self._journal_path is not None:
            raw = _event_encoder.encode(DsiEvidence(instruments=tuple(names), evidence=tuple(vals)))
            self._journal_new_instruments()
        with self._mirror(changes=True, only=("dsi",)):
            return int(self._native.set_dsi(np.asarray(ids, dtype=np.uint32), np.asarray(vals, dtype=np.float64),
                                            raw))

    def evolve(self, config: Any = None, *, seed: int = 0, generation: int,
               trigger: str = "manual") -> dict[str, Any]:
        """Run one generation of evolution on the population in place, between updates.

        In each SM (an island of up to ``cores_per_sm`` agents) the weakest judged agents (and
        any quarantined one) are replaced by children of the fittest: tournament selection,
        block crossover, mutation of weights, entry threshold and periods, migrants from the
        neighbouring SM of the same stream, spawns into styles the stream lacks. Periods move
        only among the features the SM's bank already computes, so every child reads warm
        indicators at once. Children get new agent ids and fresh paper state; see
        :class:`dynamic_core.payloads.EvolutionConfig` for the knobs and
        :mod:`dynamic_core.learning.evolution` for a driver that triggers generations.

        Deterministic: a function of the population, its state, ``seed`` and ``generation``
        (any thread count). With a journal the generation is journaled first, and replay applies
        it between the same updates.

        Returns the report: ``judged``, ``eligible``, ``replaced``, ``crossovers``, ``migrants``,
        ``spawns``, ``period_moves``, ``best``/``median``/``mean`` fitness of the judged agents
        with at least ``min_trades`` closed trades, before replacement (NaN when none has; an
        agent short of them ranks below every other), ``styles`` (agents per dominant feature after it) and ``births``
        (``BIRTH_DTYPE``).
        """
        from .payloads import GenerationEvent, evolution_config

        self._check_open()
        cfg = evolution_config(config)
        seed = check_int("seed", seed, 0, (1 << 64) - 1)
        if not 0 < check_int("generation", generation, -math.inf, math.inf) < 1 << 32:
            raise ValueError(f"generation must be in [1, 2^32) (0 is the founders'), got {generation}")
        # Streams are bred in (instrument name, timeframe) order, which any process agrees on
        # (stream indices follow instrument ids, which differ between processes).
        keys = self._stream_keys()
        if not -1 <= cfg.stream < len(keys):
            raise ValueError(f"evolution config: stream {cfg.stream} out of range ({len(keys)} streams)")
        scope = range(len(keys)) if cfg.stream < 0 else (cfg.stream,)
        pairs = sorted((keys[s] for s in scope), key=lambda k: (instruments.name(k[0]), k[1]))
        raw = b""
        if self._journal_path is not None:
            raw = _event_encoder.encode(GenerationEvent(generation=int(generation), seed=int(seed),
                                                        trigger=str(trigger)[:256], config=cfg,
                                                        streams=tuple(pairs)))
            self._journal_new_instruments()
        return self._evolve_native(cfg, int(seed), int(generation), raw, pairs)

    def _evolve_native(self, cfg: Any, seed: int, generation: int, raw: bytes,
                       pairs: Any = ()) -> dict[str, Any]:
        """The native generation over the streams ``pairs`` ((instrument id, timeframe), in
        breeding order; empty: the config's scope in stream order)."""
        index = {k: s for s, k in enumerate(self._stream_keys())}
        try:
            streams = [index[(int(i), int(t))] for i, t in pairs]
        except KeyError as e:
            raise ValueError(f"evolution: no stream {e.args[0]} in this engine") from None
        with self._ids_lock, self._mirror(changes=True, lanes=True):
            rep = self._native.evolve(msgspec.structs.asdict(cfg), seed, generation, raw, streams)
            rep["births"] = rep["births"].view(BIRTH_DTYPE)  # a fresh array the report owns
            if len(rep["births"]):
                self._evolved = True
                self._id_index = None  # ids changed
        return rep

    def _stream_keys(self) -> list[tuple[int, int]]:
        """(instrument id, timeframe) of each stream, by stream index (fixed by the population)."""
        keys = getattr(self, "_keys", None)
        if keys is None:
            lay = self._native.layout()
            keys = self._keys = [(int(i), int(t)) for i, t in zip(lay["stream_instrument"], lay["stream_timeframe"])]
        return keys

    def genomes(self) -> np.ndarray:
        """The current genomes in population order (``GENOME_DTYPE``): the founding population
        as evolved so far (``population`` stays the founding one)."""
        self._check_open()
        return np.frombuffer(self._native.genomes(), dtype=GENOME_DTYPE).copy()

    def lineage(self) -> np.ndarray:
        """Lineage of the agent in each population slot (``LINEAGE_DTYPE``): parents, generation
        and stream bar of birth."""
        self._check_open()
        return np.frombuffer(self._native.lineage(), dtype=LINEAGE_DTYPE).copy()

    def _indices_of(self, ids: np.ndarray, what: str = "set_credit") -> np.ndarray:
        """Population indices of agent ids (``ValueError`` naming an unknown one)."""
        index = getattr(self, "_id_index", None)
        if index is None:  # assigned as one tuple so a concurrent caller sees all or nothing
            aid = (self._pop.records["agent_id"] if getattr(self, "_evolved", False) is False
                   else np.frombuffer(self._native.genomes(), dtype=GENOME_DTYPE)["agent_id"])
            order = np.argsort(aid, kind="stable").astype(np.uint32)
            index = self._id_index = (order, aid[order])
        order, srt = index
        if not len(srt) and len(ids):  # no agents: every id is unknown
            raise ValueError(f"{what}: no agent with id {int(ids[0])} (the population is empty)")
        pos = np.searchsorted(srt, ids)
        pos_c = np.minimum(pos, len(srt) - 1)
        bad = (pos >= len(srt)) | (srt[pos_c] != ids)
        if bad.any():
            raise ValueError(f"{what}: no agent with id {int(ids[np.flatnonzero(bad)[0]])}")
        return order[pos_c]

    def _external_indices_of(self, ids: np.ndarray, what: str) -> np.ndarray:
        """Population indices of external-score agents by id (``ValueError`` naming an unknown
        id or one that is not kind 1). A slot's kind never changes: evolution breeds over
        indicator-blend agents only."""
        idx = self._indices_of(ids, what)
        bad = np.flatnonzero(self._pop.records["kind"][idx] != 1)
        if len(bad):
            raise ValueError(f"{what}: agent id {int(ids[bad[0]])} is not an external-score agent (kind 1)")
        return idx

    def dead_letters(self) -> np.ndarray:
        """Rejected bars with batch index and reason code (``DEAD_LETTER_DTYPE``), oldest first."""
        return self._native.dead_letters().view(DEAD_LETTER_DTYPE)

    def in_flight(self) -> int:
        """Bars submitted whose signals are not yet polled (``stats()["in_flight"]`` without the
        rest of the health report: one lock-free read). After ``close``: the bars that were in
        flight then, whose signals were discarded (it stays at that count). Counts the signals a
        poll or step that ^C cut short had taken, which the next poll returns."""
        return int(self._native.in_flight()) + self._n_held()

    def stats(self) -> dict[str, Any]:
        """Counters and health: bars in/accepted/rejected (by reason)/skipped, signals, agent
        updates and agent-updates/s (over the longer of the time spent in ``run``,
        ``busy_seconds``, and the busiest worker's time running bars, ``worker_busy_seconds``:
        an engine fed only by ``submit``/``poll`` spends none in ``run``; fault-injection stalls
        are not busy time), agents quarantined now (``quarantined``: a generation's children
        replace them),
        bar-to-signal latency (``latency_s``: p50/p90/p99/max, from histogram buckets 9% wide),
        window depth and high-water mark, backpressure events, failovers, per-worker queue depth,
        high-water mark and heartbeat age, per-SM owner/status/heartbeat age (``sms``; status
        ``"ok"``, ``"stalled"``: it missed its deadline and was moved or is being caught up, until
        it progresses again, or ``"moving"``: its stuck worker still holds it, owner -1), warp
        occupancy (active lanes / 32 over all warps), callback errors and, with a journal, its
        records/bytes/commits/syncs/segments (``journal``). Also ``backend``, ``backend_fallback``
        (why ``backend="auto"`` runs on the CPU, else None) and, on the CUDA backend, ``device``
        and ``device_error`` (the device failure that stopped it, else None)."""
        s = self._native.stats()  # counters only: the device's state need not be mirrored
        s["in_flight"] += self._n_held()  # as in_flight() counts them
        s["backend"] = self.backend
        s["backend_fallback"] = self.backend_fallback
        if self._device is not None:
            s["device"] = getattr(self._device.dev, "name", "")
            s["device_error"] = self._device.failed
        if self._journal_path is not None:
            s["journal"] = dict(self._native.journal_stats(), path=self._journal_path)
        lay = self._native.layout()
        s["callback_errors"] = self._callback_errors[0]
        s["sms"]["status"] = np.array(["ok", "stalled", "moving"])[s["sms"]["status"]]
        s.update(
            n_agents=lay["n_agents"],
            n_warps=lay["n_warps"],
            n_sms=lay["n_sms"],
            n_streams=lay["n_streams"],
            warp_occupancy=lay["n_agents"] / lay["n_lanes"] if lay["n_lanes"] else 0.0,
        )
        return s

    def layout(self) -> dict[str, Any]:
        """How the population was cut into streams, SMs and warps, with each SM's bank size."""
        return self._native.layout()

    def __repr__(self) -> str:
        lay = self._native.layout()
        state = ("closed" if self._closed else "cuda" if self._device is not None
                 else f"{self._native.stats()['threads']} threads")
        return (f"Engine({lay['n_agents']} agents, {lay['n_warps']} warps, {lay['n_sms']} SMs, "
                f"{lay['n_streams']} streams, {state})")


class _ClosedDevice:
    """Stands in for the device runner of a closed engine (its memory released); ``failed``:
    the runner's failure, if it had one."""

    dev = None

    def __init__(self, failed: str | None = None) -> None:
        self.failed = failed

    def store_state(self) -> None:
        pass

    def load_state(self) -> None:
        raise RuntimeError("engine is closed")

    load_lanes = load_state

    def load_fields(self, names: tuple[str, ...]) -> None:
        self.load_state()


class _Faults:
    """Fault injection for tests (``Engine(..., fault_injection=True)``); when the engine was
    created without it, every call raises ``RuntimeError``."""

    def __init__(self, native: Any, armed: bool, closed: Callable[[], bool] = lambda: False) -> None:
        self._native = native
        self.armed = armed
        self._closed = closed

    def _check(self) -> None:
        if not self.armed:
            raise RuntimeError("fault injection is not armed: create the Engine with fault_injection=True")
        if self._closed():
            raise RuntimeError("engine is closed")

    def stall_sm(self, sm: int, seconds: float, holding: bool = False) -> None:
        """The worker owning SM ``sm`` (0 to ``stats()["n_sms"] - 1``) sleeps ``seconds`` (0 to
        3600) before it next runs that SM. One stall per SM group is pending at a time: a second
        call before it runs replaces the first.

        ``holding=True``: it sleeps once it has taken hold of the SM, as a worker stuck in the
        middle of its arithmetic would. The sentinel cannot take the SM from it: ``stats()``
        shows it ``"moving"`` (owner -1) until the worker lets go, then the standby adopts it.
        Without it the SM moves at the deadline and the sleeper finds it gone."""
        self._check()
        sm = check_int("sm", sm, 0, (1 << 32) - 1)
        ns = int(check_real("seconds", seconds, 0.0, 3600.0) * 1e9)
        self._native.inject_stall(sm, ns, bool(holding))

    def poison(self, agent: int) -> None:
        """Agent ``agent`` (population index) gets a NaN score on its next bar: quarantined. One
        poisoned agent per SM group is pending at a time: poisoning another agent of the same
        group before that bar replaces the first (poison one, run a bar, then the next). A
        generation that replaces the agent before that bar takes the poison with it: the child
        born into position ``agent`` is not poisoned."""
        self._check()
        self._native.inject_poison(check_int("agent", agent, 0, (1 << 32) - 1))
