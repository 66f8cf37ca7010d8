"""ReasoningMesh: the broker that turns signals into rationales without ever holding one back.

Threads and sockets
-------------------
:meth:`ReasoningMesh.submit` (any thread) appends to a bounded inbox and, when the inbox was
idle, writes an eventfd: it never blocks (beyond a lock held for a few hundred nanoseconds, which
also keeps :meth:`~ReasoningMesh.close` from closing the eventfd under it) and never touches a
socket. One *broker thread* owns everything else: the ROUTER
socket the adapter processes connect to, the roster, the router (policy), the queue, the
cache, the review queue and every timer. Finished rationales go to an outbox the caller drains
(:meth:`take_rationales`, e.g. the service's egress thread, which publishes them on the feed)
and, optionally, to ``on_rationale`` (called on the broker thread; keep it short).

A task's life
-------------
1. *Route*: the policy's candidates for (class, persona, asset class, deadline), filtered by
   budgets, quotas, breakers and cooldowns; ``local`` is always last. The cache is looked up
   under the first candidate; a hit finishes the task at once.
2. *Queue*: weighted fair queueing by priority, bounded (shed lowest priority first; a shed
   task still gets the local narration, marked ``shed``).
3. *Attempt*: sent to the least-busy adapter of the first *live* candidate (adapter registered,
   breaker not open, not cooling down) with a free slot; while every live one is busy the task
   waits, and tasks behind it that another provider can serve start meanwhile.
   Each attempt has a timeout (the provider's, or what is left of the deadline minus a small
   reserve). Retryable failures retry the same provider up to ``max_retries`` times (backoff
   x1.5 with jitter, at least the server's ``Retry-After``), others move down the candidates.
   An adapter that stops heartbeating, says goodbye or cannot be reached fails its attempts at
   once (``adapter_lost``) and they fall back.
4. *Finish*: at the latest at ``deadline - reserve`` the task finishes with what it has (the
   best ensemble reply, the draft) or with the local narration. Late replies still count
   toward budgets and telemetry, never toward the result.

Ensemble (``ensemble=k``) sends k providers in parallel and reranks; progressive refinement
(``refine=True``) lets the cheapest provider draft and the most expensive one refine only when
the signal's agreement or the draft's confidence is low.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import math
import os
import random
import subprocess
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import zmq

from .._checks import check_int, check_real
from ..errors import AdapterError, PayloadError, ReasoningError
from ..payloads import (
    AdapterBeat,
    AdapterBye,
    AdapterHello,
    Codec,
    MeshFromAdapter,
    MeshShutdown,
    MeshToAdapter,
    RationaleUpdate,
    ReasoningContext,
    ReasonReply,
    ReasonRequest,
    batch_frames,
    signals_from_records,
    split_batch,
)
from ..records import SIGNAL_DTYPE
from ..transport._common import check_address, endpoint, readable
from ..transport.doorbell import Doorbell
from .cache import DEFAULT_MAX_BYTES, NarrativeCache
from .ensemble import ABSplit, Candidate, ReviewQueue, Weights, rerank
from .narrator import narrate
from .policy import REQUEST_CLASSES, PolicyConfig, RouteRequest, Router, load_policy, routing_rules
from .profiles import ProviderProfile, load_profiles
from .profiles import profile as make_profile
from .prompts import (
    TEMPLATE_VERSION,
    TEMPLATES,
    ParsedReply,
    action_direction,
    build_messages,
    digest,
    distill,
    parse_reply,
    regime_bucket,
    template_for,
)
from .registry import Roster
from .tasks import PRIORITIES, Task, TaskQueue, priority_index
from .worker import CONFIG_ERROR_EXIT, HEARTBEAT_MAX_S, HEARTBEAT_MIN_S, HELLO_EVERY_S, reply_limit

__all__ = ["Outcome", "ReasoningMesh", "asset_class_of"]

log = logging.getLogger("dynamic_core.reasoning.mesh")

# CONFIG_ERROR_EXIT (2, from .worker): the exit status of ``dynamic-core adapter`` for bad
# arguments or configuration (secrets file, profile, address, API key): such an adapter is not
# restarted, since it would fail the same way.

MAX_DEADLINE_S = 86400.0
"""Longest deadline a task may have (``deadline_s`` of the constructor and of ``submit``)."""

RESPAWN_MIN_S = 1.0
RESPAWN_MAX_S = 60.0
"""A spawned adapter that dies is restarted after ``RESPAWN_MIN_S``, doubling for each exit in
a row of the same provider (one that ran :data:`RESPAWN_STABLE_S` resets the count), at most
``RESPAWN_MAX_S``."""
RESPAWN_STABLE_S = 60.0

# reply_limit (from .worker): a provider's reply is cut to
# max(MIN_REPLY_CHARS, REPLY_CHARS_PER_TOKEN * max_tokens) characters before it is parsed
# (counted as ``truncated_replies``): one that ignores max_tokens cannot make the broker parse,
# cache or publish megabytes per rationale.

_DISPATCH_MAX = 1024  # tasks started per broker round at most (the loop comes straight back)

SLOW_BEAT_MAX_S = 1.5 * HELLO_EVERY_S
"""An adapter taken for lost for missed heartbeats that speaks again after at most this much
silence is taken to beat slower than the broker (an adapter started by hand with a longer
``--heartbeat``; its hellos come every :data:`~dynamic_core.reasoning.worker.HELLO_EVERY_S`
whatever its heartbeat): it is registered again at once and judged by that silence from then on
(logged once per adapter). A longer silence is a stall, not a slower heartbeat."""

_CRYPTO = ("BTC", "ETH", "SOL", "XRP", "DOGE", "LTC", "ADA")
_ISO = {"USD", "EUR", "JPY", "GBP", "CHF", "AUD", "NZD", "CAD", "CNH", "CNY", "HKD", "SGD", "SEK", "NOK",
        "MXN", "ZAR", "TRY", "PLN", "XAU", "XAG"}


def asset_class_of(instrument: str) -> str:
    """A best guess from the name: ``crypto``, ``fx`` (six-letter ISO pairs, metals) or ``equity``."""
    u = instrument.upper()
    if any(c in u for c in _CRYPTO):
        return "crypto"
    if len(u) == 6 and u[:3] in _ISO and u[3:] in _ISO:
        return "fx"
    return "equity"


class _Inbox:
    """Submitted tasks on their way to the broker: one FIFO per priority class. Appended to (and,
    to make room for an urgent task, popped from the right) under the mesh's lock; drained from
    the left by the broker thread (single deque operations are atomic)."""

    __slots__ = ("lanes",)

    def __init__(self) -> None:
        self.lanes: tuple[deque[tuple], ...] = tuple(deque() for _ in PRIORITIES)

    def __len__(self) -> int:
        return sum(map(len, self.lanes))

    def __bool__(self) -> bool:
        return any(self.lanes)


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, np.generic):  # numpy scalars (features computed with numpy): as Python's
        return obj.item()
    raise TypeError(f"a value of type {type(obj).__name__} cannot be encoded")


def _checked(ctx: Any, name: str) -> ReasoningContext:
    """``ctx`` as an adapter will decode it: encoded and decoded as the wire's own type, so that a
    context an adapter would refuse (more than 64 features, a 300-character signal id or feature
    name, ``timeframe=0``, ``action=3``, ``seq=-1``: a Struct built in Python skips its
    constraints) is refused here, before the broker sends it (an adapter that cannot decode a
    request cannot answer it). What the broker keeps is that decoded copy, ``features``
    included: the caller changing its dict afterwards changes neither the prompt nor the cache
    key. :class:`TypeError` for what is not a ReasoningContext or holds a value msgpack cannot
    carry (numpy scalars are taken as Python's), :class:`ValueError` naming the field otherwise."""
    if not isinstance(ctx, ReasoningContext):
        raise TypeError(f"{name} must be a dynamic_core.payloads.ReasoningContext, got {type(ctx).__name__}")
    try:
        raw = msgspec.msgpack.encode(ctx, enc_hook=_enc_hook)
    except TypeError as e:
        raise TypeError(f"{name} cannot be sent to an adapter: {e}") from None
    except (ValueError, OverflowError, msgspec.EncodeError) as e:
        raise ValueError(f"{name} cannot be sent to an adapter: {e}") from None
    try:
        return msgspec.msgpack.decode(raw, type=ReasoningContext)
    except msgspec.DecodeError as e:  # (a ValidationError: a constraint the Struct skipped when built)
        raise ValueError(f"{name} would be refused by the adapters: {e}") from None


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    """How one task ended (passed to ``on_rationale`` with the update; immutable).

    ``status``: ``ok`` (a provider answered), ``cached``, ``fallback`` (the local narrator after
    providers failed or ran out of time), ``local`` (routed to the narrator in the first
    place), ``shed`` (refused by a full queue, narrated locally).
    """

    update: RationaleUpdate
    task_id: int
    status: str
    provider: str
    attempts: int
    latency_s: float
    agreeing: int
    conflict: bool
    arm: str
    model_s: float = 0.0
    """Time the answering adapter spent in its model (or narrator); 0 for inline answers."""
    reason: str = ""
    """Why a ``fallback`` came without the providers having failed: ``closed`` (the mesh
    closed first) or ``evicted`` (a full inbox made room for a more urgent task); else empty."""


class ReasoningMesh:
    """The federated reasoning mesh: a broker thread plus adapter processes.

    Parameters
    ----------
    providers : sequence of str
        Providers to start adapter processes for (with ``spawn=True``); ``local`` is always
        available, as a process when listed and inline in the broker otherwise.
    policy : path, str, mapping or PolicyConfig, optional
        Routing rules, limits, breakers (default: the built-in policy). A ``str`` naming an
        existing file is read as a TOML file; any other ``str`` is parsed as TOML text, except
        one that looks like a path (one line, ending in ``.toml``, or holding a path separator
        and no ``=``), which raises :class:`~dynamic_core.errors.PolicyError` saying the file
        does not exist. See :func:`~dynamic_core.reasoning.policy.load_policy`.
    profiles : mapping, optional
        Per-provider field overrides (``{"deepseek": {"base_url": ...}}``); also passed to the
        adapter processes this mesh spawns.
    address : str
        Where the broker's ROUTER binds (loopback unless ``allow_remote``).
    spawn : bool
        Start one adapter process per provider (``workers`` per provider).
    deadline_s : float
        Default time from submission to the rationale.
    queue_size : int
        Bound of the task queue (``reasoning_queue_size``).
    cache_size, cache_ttl_s : int, float
        Narrative cache (``reasoning_cache_size``); 0 disables it.
    cache_bytes : int
        Byte budget of the cached texts (default 32 MiB): least recently used entries go first
        when it is exceeded, whatever ``cache_size`` says.
    ensemble : int
        Providers asked in parallel per task (1: no ensemble).
    refine : bool
        Progressive refinement (cheap draft, premium refinement when ambiguous).
    ambiguity : float
        Refinement and review threshold on ``1 - min(agreement, confidence)``.
    review_confidence : float
        Winners with a stated confidence below this go to the review queue.
    ab_fraction, ab_candidates : float, sequence of str
        A/B split: that fraction of signals uses ``ab_candidates`` instead of the rule's.
    weights_path : path, optional
        Where per-adapter ensemble weights persist (review decisions adjust them).
    balance : str
        ``least_connections`` or ``round_robin`` among adapters of one provider.
    max_retries, backoff_s : int, float
        Retries within a provider and the first backoff (x1.5 per retry, +-20 % jitter).
    heartbeat_s, liveness : float, int
        Adapters beat every ``heartbeat_s``; ``liveness`` missed beats mark one lost (2 s by
        default: an adapter a busy machine leaves unscheduled for a moment is not failed over,
        and its requests not paid for twice; a hung one is caught by then). An adapter
        started by hand with a longer ``--heartbeat`` is taken for lost once, then, when it
        speaks again within :data:`SLOW_BEAT_MAX_S`, registered again and judged by its own
        interval (a warning says so). An adapter process this mesh spawned is lost as soon as it
        exits, whatever its heartbeats.
    secrets_file : path, optional
        0600 TOML of API keys for spawned adapters (else environment variables).
    on_rationale : callable, optional
        ``on_rationale(outcome)`` for each finished task, on the broker thread.

    Every number is checked (``TypeError`` for a wrong type, ``ValueError`` naming the argument
    for NaN, an infinity or a value out of range): ``deadline_s`` in (0, 86400] as in
    :meth:`submit`, ``heartbeat_s`` in [0.01, 60], ``workers`` in [1, 256], ``ensemble`` in
    [1, 64], ``ambiguity``, ``review_confidence`` and ``ab_fraction`` in [0, 1], ``max_retries``
    in [0, 100], ``backoff_s`` in [0, 60], ``liveness`` in [1, 1000], ``max_tokens`` in
    [1, 2**20], ``cache_ttl_s`` in (0, 30 days], sizes at least 1 (0 for the cache).

    A spawned adapter process that dies is restarted a second later, and after each further exit
    in a row twice as late, up to a minute (``adapter_exits``, ``respawned``, ``respawn`` in
    :meth:`stats`); one that exits with :data:`CONFIG_ERROR_EXIT` (a bad secrets file, profile,
    address or API key) is not: that is counted (``adapter_config_errors``), logged once, and its
    provider is marked down in ``down`` (provider -> reason, cleared when an adapter of it
    joins); its requests fall back.

    :meth:`close` ends every task still in progress with the local narration (status
    ``fallback``, ``Outcome.reason`` ``closed``) before it stops the adapters.
    """

    def __init__(self, providers: Sequence[str] = ("local",), *, policy: Any = None,
                 profiles: Mapping[str, Mapping[str, Any]] | None = None, address: str = "tcp://127.0.0.1:*",
                 allow_remote: bool = False, spawn: bool = True, workers: int = 1, deadline_s: float = 5.0,
                 queue_size: int = 1000, cache_size: int = 4096, cache_ttl_s: float = 300.0, ensemble: int = 1,
                 refine: bool = False, ambiguity: float = 0.5, review_confidence: float = 0.4,
                 ab_fraction: float = 0.0, ab_candidates: Sequence[str] = (),
                 weights_path: str | os.PathLike | None = None, balance: str = "least_connections",
                 max_retries: int = 3, backoff_s: float = 0.05, heartbeat_s: float = 0.1, liveness: int = 20,
                 max_tokens: int = 256, secrets_file: str | os.PathLike | None = None,
                 on_rationale: Callable[[Outcome], Any] | None = None, outbox_size: int = 100_000,
                 select: str = "change", seed: int | None = None,
                 context: zmq.Context | None = None, cache_bytes: int = DEFAULT_MAX_BYTES) -> None:
        workers = check_int("workers", workers, 1, 256)
        deadline_s = check_real("deadline_s", deadline_s, 0.0, MAX_DEADLINE_S, lo_open=True)
        queue_size = check_int("queue_size", queue_size, 1, 10_000_000)
        cache_size = check_int("cache_size", cache_size, 0, 10_000_000)
        cache_ttl_s = check_real("cache_ttl_s", cache_ttl_s, 0.0, 30 * 86400.0, lo_open=True)
        cache_bytes = check_int("cache_bytes", cache_bytes, 0, 1 << 40)
        ensemble = check_int("ensemble", ensemble, 1, 64)
        ambiguity = check_real("ambiguity", ambiguity, 0.0, 1.0)
        review_confidence = check_real("review_confidence", review_confidence, 0.0, 1.0)
        ab_fraction = check_real("ab_fraction", ab_fraction, 0.0, 1.0)
        max_retries = check_int("max_retries", max_retries, 0, 100)
        backoff_s = check_real("backoff_s", backoff_s, 0.0, 60.0)
        heartbeat_s = check_real("heartbeat_s", heartbeat_s, HEARTBEAT_MIN_S, HEARTBEAT_MAX_S)
        liveness = check_int("liveness", liveness, 1, 1000)
        max_tokens = check_int("max_tokens", max_tokens, 1, 1 << 20)
        outbox_size = check_int("outbox_size", outbox_size, 1, 100_000_000)
        if seed is not None:
            check_int("seed", seed, -(1 << 63), (1 << 64) - 1)
        if select not in ("change", "all", "nonhold"):
            raise ValueError("select must be 'change', 'all' or 'nonhold'")
        self._profile_overrides = {k: dict(v) for k, v in (profiles or {}).items()}
        self.profiles: dict[str, ProviderProfile] = load_profiles(self._profile_overrides)
        for p in providers:
            if p not in self.profiles:
                raise ReasoningError(f"unknown provider {p!r}: known are {', '.join(self.profiles)}")
        self.config: PolicyConfig = policy if isinstance(policy, PolicyConfig) else load_policy(policy)
        self.router = Router(self.config, self.profiles)
        self.providers = tuple(dict.fromkeys(providers))
        self.deadline_s = float(deadline_s)
        self.ensemble = int(ensemble)
        self.refine = bool(refine)
        self.ambiguity = float(ambiguity)
        self.review_confidence = float(review_confidence)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.heartbeat_s = float(heartbeat_s)
        self.liveness = int(liveness)
        self.max_tokens = int(max_tokens)
        self.select = select
        self.persona = ""
        self.asset_classes: dict[str, str] = {}
        self.on_rationale = on_rationale
        self.secrets_file = os.fspath(secrets_file) if secrets_file is not None else None
        self.workers = int(workers)
        self._spawn = bool(spawn)
        self.cache = NarrativeCache(cache_size, cache_ttl_s, max_bytes=cache_bytes)
        self._cache_on = cache_size > 0 and cache_bytes > 0
        self.queue = TaskQueue(queue_size)
        self.roster = Roster(balance=balance)
        self.weights = Weights(weights_path)
        self.review_queue = ReviewQueue(self.weights)
        self.ab = ABSplit(ab_fraction, ab_candidates)
        for c in self.ab.candidates:
            if c not in self.profiles:
                raise ReasoningError(f"A/B candidate {c!r} is not a known provider")
        self._rng = random.Random(seed)
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._sock.setsockopt(zmq.SNDHWM, 100_000)
        self._sock.setsockopt(zmq.RCVHWM, 100_000)
        self._sock.bind(check_address(address, bind=True, allow_remote=allow_remote))
        self.address = endpoint(self._sock)
        self._in = Codec(MeshFromAdapter)
        self._out = Codec(MeshToAdapter)
        self._wake = Doorbell()
        # submit's closed check, inbox bound and doorbell ring happen under this lock, and close
        # sets _closed under it: no submit rings (or queues) after close has begun
        self._lock = threading.Lock()
        self._inbox = _Inbox()
        self._inbox_cap = max(1024, 4 * queue_size)
        self._evicted: deque[tuple] = deque()  # inbox entries that made room for a more urgent one
        self._more_work = False  # work left for the next iteration (dispatch or inbox cut short)
        self._calls: deque[tuple[Callable[[], Any], threading.Event, list]] = deque()
        self._outbox_cap = max(1, int(outbox_size))
        self.outbox: deque[RationaleUpdate] = deque(maxlen=self._outbox_cap)  # oldest dropped (counted)
        # a random start per broker: a reply to an earlier broker's task can never match one of ours
        self._ids = itertools.count((int.from_bytes(os.urandom(4), "big") << 20) + 1)
        self._tasks: dict[int, Task] = {}
        self._outq: dict[bytes, list[bytes]] = {}  # per adapter: encoded requests for the next _flush
        self._lost: OrderedDict[bytes, Any] = OrderedDict()  # recently lost adapters, for late replies
        self._timers: list[tuple[float, int, str, int, int]] = []
        self._dead_timers = 0  # heap entries of finished tasks (lazy deletion; see _compact_timers)
        self._tseq = itertools.count()
        self._last_action: dict[tuple[int, int], int] = {}
        self._children: dict[int, tuple[str, subprocess.Popen, dict]] = {}
        self._spawned_at: dict[int, float] = {}
        self._exits: dict[str, int] = {}  # provider -> its adapters' exits in a row
        self._respawn_at: list[tuple[float, str]] = []
        self._thread: threading.Thread | None = None
        self._close_in_loop = False  # close() was called on the broker thread
        self._stop = threading.Event()
        self._closed = False
        self.counts = {"submitted": 0, "completed": 0, "dropped_inbox": 0, "dropped_outbox": 0,
                       "late_replies": 0, "unknown_replies": 0, "adapter_lost": 0, "respawned": 0,
                       "inline_local": 0, "callback_errors": 0, "rejected_frames": 0, "adapter_config_errors": 0,
                       "adapter_exits": 0, "refused_closed": 0, "evicted_inbox": 0, "ended_by_close": 0,
                       "truncated_replies": 0, "timers_compacted": 0, "invalid_contexts": 0,
                       "slow_heartbeats": 0}
        self.down: dict[str, str] = {}  # provider -> why its spawned adapters are not restarted
        self._warned_invalid = False
        self.by_status: dict[str, int] = {}
        self.provider_extra: dict[str, dict[str, int]] = {}
        self._latencies: deque[float] = deque(maxlen=4096)

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self, wait: float | None = 10.0) -> ReasoningMesh:
        """Start the broker thread and (with ``spawn``) the adapter processes; wait up to
        ``wait`` seconds for every adapter to register (None: don't wait)."""
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._loop, name="dc-reasoning-broker", daemon=True)
        self._thread.start()
        for p in self.providers if self._spawn else ():
            for _ in range(self.workers):
                self.spawn(p)
        if wait is not None and self._children and not self.wait_ready(timeout=wait):
            missing = [p for p in self.providers if not self.adapters(p) and p not in self.down]
            if missing:  # a provider that is down said so already
                log.warning("adapters not registered after %.1fs: %s", wait, ", ".join(missing))
        return self

    def spawn(self, provider: str, **overrides: Any) -> subprocess.Popen:
        """Start one adapter process for ``provider`` connected to this broker. The profile
        overrides travel on its command line (``--profile-json``), checked first
        (:class:`~dynamic_core.errors.PolicyError`): a profile holds no secret (no credentials
        or query string in ``base_url``; keys come from the environment or the secrets file)."""
        over = dict(self._profile_overrides.get(provider, {}))
        over.update(overrides)
        # refused here (PolicyError), not by the process: its command line, which any local user
        # can read, must never carry what check_base_url refuses (a credential in a URL)
        make_profile(provider, over)
        cmd = [sys.executable, "-m", "dynamic_core", "adapter", "--provider", provider, "--connect",
               self.address, "--parent-pid", str(os.getpid()), "--heartbeat", str(self.heartbeat_s)]
        if over:
            cmd += ["--profile-json", json.dumps(over)]
        if self.secrets_file:
            cmd += ["--secrets", self.secrets_file]
        env = dict(os.environ)
        pkg_root = str(Path(__file__).resolve().parent.parent.parent)
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        self._children[proc.pid] = (provider, proc, over)
        self._spawned_at[proc.pid] = time.monotonic()
        return proc

    def adapters(self, provider: str | None = None) -> list[dict[str, Any]]:
        """Registered adapters (``provider``'s only, when given)."""
        def get() -> list[dict[str, Any]]:
            return [{"provider": a.provider, "pid": a.hello.pid, "in_flight": a.in_flight, "served": a.served,
                     "capacity": a.capacity} for a in self.roster.by_id.values()
                    if provider is None or a.provider == provider]
        return self._call(get)

    def wait_ready(self, providers: Sequence[str] | None = None, timeout: float = 10.0) -> bool:
        """Wait until every provider in ``providers`` (default: those spawned) has an adapter.
        False at the timeout, or as soon as every provider still missing is in :attr:`down`.
        RuntimeError from ``on_rationale`` (the broker thread it would wait for)."""
        self._not_on_broker("wait_ready")
        want = set(self.providers if providers is None else providers)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            have, down = self._call(lambda: ({a.provider for a in self.roster.by_id.values()}, set(self.down)))
            if want <= have:
                return True
            if want - have <= down:  # the rest will not come: their adapters failed to configure
                return False
            time.sleep(0.02)
        return False

    def close(self, timeout: float = 5.0) -> None:
        """Stop the broker, ask adapters to exit (then terminate, then kill), close sockets.

        Every task not finished yet (queued, in flight, or still in the inbox) ends first, once,
        with the local narration: status ``fallback``, ``Outcome.reason`` ``closed`` (counted as
        ``ended_by_close``), through ``on_rationale`` and the outbox. A :meth:`submit` after
        ``close`` has begun is refused (returns 0)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True  # from here on no submit or _call rings the doorbell
        t = self._thread
        if t is not None:
            self._stop.set()
            self._wake.ring()
            if t is threading.current_thread():
                # close from on_rationale: the loop ends after it and closes the sockets itself
                self._close_in_loop = True
            else:
                t.join(timeout)
                if t.is_alive():
                    log.warning("reasoning broker did not stop within %.1fs", timeout)
                else:
                    self._thread = None
        else:  # never started: this thread owns the broker's state
            try:
                self._end_unfinished("closed")
            except Exception:  # noqa: BLE001 - close must go on
                log.exception("ending the unfinished tasks failed")
        for _, proc, _ in list(self._children.values()):
            if proc.poll() is None:
                proc.terminate()
        end = time.monotonic() + timeout
        for _, proc, _ in list(self._children.values()):
            try:
                proc.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._children.clear()
        if self._thread is None:  # (a broker that did not stop may still use them)
            self._sock.close(0)
            self._wake.close()

    def __enter__(self) -> ReasoningMesh:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- submission (any thread; never blocks) ------------------------------------------------
    def submit(self, ctx: ReasoningContext, *, request_class: str = "tactical", priority: str | int = "medium",
               deadline_s: float | None = None, ensemble: int | None = None, refine: bool | None = None) -> int:
        """Queue a rationale for ``ctx``; returns the task id, or 0 when refused: the inbox is
        full (counted as ``dropped_inbox``) or the mesh is closed (``refused_closed``). Never
        blocks, never raises on load.

        A full inbox makes room for a ``critical`` or ``high`` task by evicting its newest task
        of the lowest class ranking below it (``evicted_inbox``; that task ends at once with the
        local narration, status ``fallback``, ``Outcome.reason`` ``evicted``); only when nothing
        ranks lower is the newcomer refused. ``ctx.features`` is copied here: changing the
        caller's dict afterwards changes neither the prompt nor the cache key.

        ``deadline_s`` must be in (0, 86400] and ``ensemble`` in [1, 64] (``ValueError``).
        ``ctx`` is checked as an adapter will decode it: ``TypeError`` for what is not a
        :class:`~dynamic_core.payloads.ReasoningContext`, ``ValueError`` naming the field for
        one an adapter would refuse (e.g. more than 64 features; counted as
        ``invalid_contexts``); nothing is queued then."""
        return self._submit((ctx,), request_class, priority, deadline_s, ensemble, refine, "ctx")[0]

    def submit_many(self, ctxs: Sequence[ReasoningContext], *, request_class: str = "tactical",
                    priority: str | int = "medium", deadline_s: float | None = None, ensemble: int | None = None,
                    refine: bool | None = None) -> list[int]:
        """:meth:`submit` for each context, with the same options, under one lock and one
        wake-up of the broker (cheaper per task when a caller has several at once): the task
        ids in order, 0 for each context refused (inbox full, or the mesh closed). A context
        :meth:`submit` would raise for raises here (naming ``ctxs[i]``) before any of the batch
        is queued."""
        return self._submit(ctxs, request_class, priority, deadline_s, ensemble, refine, "ctxs")

    def _submit(self, ctxs: Sequence[ReasoningContext], request_class: str, priority: str | int,
                deadline_s: float | None, ensemble: int | None, refine: bool | None, arg: str) -> list[int]:
        if request_class not in REQUEST_CLASSES:
            raise ValueError(f"unknown request class {request_class!r}: use one of {', '.join(REQUEST_CLASSES)}")
        pri = priority_index(priority)  # a name or an index, or raises naming the choices
        dl = self.deadline_s if deadline_s is None else check_real("deadline_s", deadline_s, 0.0, MAX_DEADLINE_S,
                                                                     lo_open=True)
        ens = self.ensemble if ensemble is None else check_int("ensemble", ensemble, 1, 64)
        ref = self.refine if refine is None else bool(refine)
        # checked copies first, outside the lock: a context an adapter would refuse, or that
        # cannot be copied, raises before any of the batch is queued (all or nothing)
        snaps = []
        for i, c in enumerate(ctxs):
            try:
                snaps.append(_checked(c, arg if arg == "ctx" else f"{arg}[{i}]"))
            except (TypeError, ValueError):
                with self._lock:
                    self.counts["invalid_contexts"] += 1
                raise
        out: list[int] = []
        with self._lock:
            if self._closed:
                self.counts["refused_closed"] += len(snaps)
                return [0] * len(snaps)
            lanes = self._inbox.lanes
            lane = lanes[pri]
            cap = self._inbox_cap
            ids = self._ids
            queued = -1  # inbox length, when known (the broker drains concurrently: only ever less)
            accepted = 0
            now = time.monotonic()  # (one submission time for the whole batch)
            for ctx in snaps:
                if queued < 0 or queued >= cap:
                    queued = len(lanes[0]) + len(lanes[1]) + len(lanes[2]) + len(lanes[3])
                    if queued >= cap and not self._evict_for(pri):
                        self.counts["dropped_inbox"] += 1
                        out.append(0)
                        continue
                tid = next(ids)
                lane.append((tid, ctx, request_class, pri, now, now + dl, ens, ref))
                queued += 1
                out.append(tid)
                accepted += 1
            # counted here, as the refusals are: submitted + dropped_inbox is every context
            # offered, whether or not the broker has taken it out of the inbox yet
            self.counts["submitted"] += accepted
            if accepted:
                self._wake.ring()
        return out

    def _evict_for(self, pri: int) -> bool:
        """A full inbox and a critical or high newcomer: move the newest entry of the lowest class
        ranking below ``pri`` to the evicted list (the broker narrates it). Under ``_lock``."""
        if pri > 1:
            return False
        lanes = self._inbox.lanes
        for low in range(len(lanes) - 1, pri, -1):
            try:
                victim = lanes[low].pop()  # (the broker may have just drained it)
            except IndexError:
                continue
            self._evicted.append(victim)
            self.counts["evicted_inbox"] += 1
            return True
        return False

    def submit_signals(self, records: np.ndarray, *, request_class: str = "tactical") -> int:
        """Submit ``SIGNAL_DTYPE`` records as selected by ``select`` (``change``: when a
        stream's action changes; ``nonhold``; ``all``). Strong actions get high priority.
        A signal whose stream had DSI evidence (``flags & SIGNAL_DSI``) carries it to the
        prompt as the feature ``dsi_evidence``. Returns how many were submitted."""
        return len(self.submit_signal_ids(records, request_class=request_class))

    def submit_signal_ids(self, records: np.ndarray, *, request_class: str = "tactical",
                          force: np.ndarray | None = None) -> list[str]:
        """:meth:`submit_signals`, returning the ids of the signals submitted. ``force`` (a
        boolean mask over ``records``) adds rows whatever ``select`` says, e.g. those a
        decision waits on."""
        if records.dtype != SIGNAL_DTYPE or not len(records):
            return []
        if self.select == "all":
            chosen = np.ones(len(records), dtype=bool)
        elif self.select == "nonhold":
            chosen = records["action"] != 0
        else:
            chosen = np.zeros(len(records), dtype=bool)
            last = self._last_action
            ins, tfs, acts = records["instrument"], records["timeframe"], records["action"]
            for i in range(len(records)):
                k = (int(ins[i]), int(tfs[i]))
                a = int(acts[i])
                if last.get(k) != a:
                    last[k] = a
                    chosen[i] = True
        if force is not None:
            chosen |= np.asarray(force, dtype=bool)
        out = []
        for s in signals_from_records(records[chosen]):
            name = s.instrument
            ctx = ReasoningContext(
                signal_id=s.id, instrument=name, timeframe=s.timeframe, ts=s.ts, seq=s.seq, action=s.action,
                score=s.score, confidence=s.confidence, agreement=s.agreement, dispersion=s.dispersion,
                n_agents=s.n_agents, asset_class=self.asset_classes.get(name) or asset_class_of(name),
                persona=self.persona,
                # microstructure evidence the agents read (Engine.set_dsi), when the stream had any
                features={"dsi_evidence": s.dsi} if s.has_dsi else {})
            try:
                tid = self.submit(ctx, request_class=request_class, priority="high" if abs(ctx.action) == 2
                                  else "medium")
            except (TypeError, ValueError) as e:  # (counted) a persona or asset class too long, say
                if not self._warned_invalid:
                    self._warned_invalid = True
                    log.warning("reasoning: a signal's context is not one an adapter would take, skipped "
                                "(counted as invalid_contexts; logged once): %s", e)
                continue
            if tid:
                out.append(ctx.signal_id)
        return out

    def take_rationales(self, max_n: int = 1024) -> list[RationaleUpdate]:
        """Finished rationales, oldest first (any thread)."""
        out = []
        box = self.outbox
        while box and len(out) < max_n:
            out.append(box.popleft())
        return out

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until every submitted task has finished. RuntimeError from ``on_rationale``
        (the broker thread it would wait for)."""
        self._not_on_broker("wait_idle")
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not self._inbox and not self._evicted and self._call(lambda: len(self._tasks)) == 0:
                return True
            time.sleep(0.005)
        return False

    # ---- routing ------------------------------------------------------------------------------
    def set_routing(self, table: Mapping[str, str]) -> int:
        """Route tasks by ``table`` ahead of the policy's own rules (the ``UpdateRouting``
        control command); an empty table drops the overrides. Keys are
        ``CLASS[/PERSONA[/ASSET_CLASS]]``, values comma-separated providers, most preferred
        first (see :func:`~dynamic_core.reasoning.policy.routing_rules`)::

            mesh.set_routing({"deep": "kimi,deepseek", "tactical/*/crypto": "grok"})

        Returns the number of rules. Raises
        :class:`~dynamic_core.reasoning.policy.PolicyError` for a table that does not parse or
        names an unknown provider; the routing in force is then unchanged."""
        rules = routing_rules(table)
        self._call(lambda: self.router.set_overrides(rules))
        return len(rules)

    # ---- review -------------------------------------------------------------------------------
    def review_list(self, limit: int = 100) -> list[dict[str, Any]]:
        return self._call(lambda: self.review_queue.list(limit))

    def review(self, item: int, approve: bool) -> dict[str, Any]:
        """Approve or reject a queued rationale; ``KeyError`` for an unknown item,
        :class:`~dynamic_core.errors.ReasoningError` when the weights file cannot be written
        (the item stays queued, to be decided again)."""
        box: list = []

        def do() -> None:
            try:
                box.append(self.review_queue.decide(item, approve))
            except KeyError:
                box.append(None)
        self._call(do)
        if not box or box[0] is None:
            raise KeyError(f"no review item {item}")
        return box[0]

    # ---- telemetry ----------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Per provider: requests, tokens in/out, USD, p50/p99 latency, errors by type, cache
        hits, budget left, breaker state, adapters; plus tasks, queue, cache, review, A/B."""
        return self._call(self._stats)

    def _stats(self) -> dict[str, Any]:
        rs = self.router.stats()
        roster = self.roster.stats()
        prov: dict[str, Any] = {}
        for name in sorted(set(rs) | set(roster) | set(self.provider_extra)):
            row = dict(rs.get(name, {}))
            row.update(self.provider_extra.get(name, {}))
            r = roster.get(name)
            row["adapters"] = r["adapters"] if r else 0
            row["in_flight"] = r["in_flight"] if r else 0
            if name in self.down:
                row["down"] = self.down[name]
            if row.get("requests") or row["adapters"] or name in self.providers or row.get("answers"):
                prov[name] = row
        lat = sorted(self._latencies)
        return {
            "providers": prov,
            "tasks": dict(self.counts, in_progress=len(self._tasks), by_status=dict(self.by_status),
                          p50_ms=lat[len(lat) // 2] * 1e3 if lat else None,
                          p99_ms=lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3 if lat else None),
            "queue": self.queue.stats(),
            "cache": self.cache.stats(),
            "review": self.review_queue.stats(),
            "ab": self.ab.stats(),
            "adapters_joined": self.roster.joined, "adapters_lost": self.roster.lost,
            "respawn": dict(self._exits),
            "frames": self._in.stats(),
        }

    # ---- broker thread ------------------------------------------------------------------------
    def _not_on_broker(self, what: str) -> None:
        if self._thread is not None and threading.current_thread() is self._thread:
            raise RuntimeError(f"{what}() from on_rationale would wait for the broker thread that runs it; "
                               "record what you need and return")

    def _call(self, fn: Callable[[], Any], timeout: float = 5.0) -> Any:
        """Run ``fn`` on the broker thread (directly when it is not running)."""
        t = self._thread
        if t is None or not t.is_alive() or threading.current_thread() is t:
            return fn()
        ev = threading.Event()
        box: list = []
        with self._lock:
            closing = self._closed
            if not closing:
                self._calls.append((fn, ev, box))
                self._wake.ring()
        if closing:  # no ring after close has begun: run it once the broker has stopped
            t.join(timeout)
            if t.is_alive():
                raise ReasoningError(f"reasoning broker did not stop within {timeout:.1f}s")
            return fn()
        if not ev.wait(timeout):
            raise ReasoningError("reasoning broker did not answer within %.1fs" % timeout)
        if box and isinstance(box[0], BaseException):
            raise box[0]
        return box[0] if box else None

    def _loop(self) -> None:
        try:
            self._serve()
        finally:
            if self._close_in_loop:  # close() ran on this thread (from on_rationale): nobody joins it
                self._sock.close(0)
                self._wake.close()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake.rfd, zmq.POLLIN)
        next_check = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            wait = next_check - now
            if self._timers:
                wait = min(wait, self._timers[0][0] - now)
            if self._more_work:
                wait = 0.0
            try:
                events = dict(poller.poll(max(0, int(wait * 1000) + 1) if wait > 0 else 0))
            except zmq.ZMQError:  # pragma: no cover - context terminated
                return
            if self._wake.rfd in events:
                self._wake.clear()
            self._more_work = False  # (set below when work is left for the next iteration)
            try:
                # timers due before the replies read now: an attempt whose budget ran out while
                # this loop was busy is a timeout, whatever reply sits in the socket behind it
                self._run_timers(time.monotonic())
                if self._sock in events:
                    self._read_adapters()
                self._run_calls()
                self._drain_inbox()
                now = time.monotonic()
                self._run_timers(now)
                if now >= next_check:
                    self._check_liveness(now)
                    self._check_children(now)
                    next_check = now + min(0.05, self.heartbeat_s)
                self._dispatch()
                self._flush()
                self._compact_timers()
            except Exception:  # noqa: BLE001 - the broker must outlive any bug in one task
                log.exception("reasoning broker iteration failed")
        self._run_calls()  # (queued before close began)
        try:
            self._end_unfinished("closed")
        except Exception:  # noqa: BLE001 - the adapters must still be told to stop
            log.exception("reasoning broker: ending the unfinished tasks failed")
        self._shutdown_adapters()

    def _end_unfinished(self, reason: str) -> None:
        """Finish every task not finished yet (in the inbox, queued, waiting or in flight) with
        the local narration, status ``fallback`` and ``reason``: each exactly once."""
        now = time.monotonic()
        n = 0
        for lane in self._inbox.lanes:
            while lane:
                n += 1
                self._finish_local(self._task_of(lane.popleft()), "fallback", now, reason=reason)
        self._finish_evicted(now)
        for task in list(self._tasks.values()):
            if task.state == "done":
                continue
            if task.state == "queued":
                self.queue.remove(task)
            n += 1
            self._finish_local(task, "fallback", now, reason=reason)
        self.counts["ended_by_close"] += n

    def _finish_evicted(self, now: float) -> None:
        box = self._evicted
        while box:
            self._finish_local(self._task_of(box.popleft()), "fallback", now, reason="evicted")

    def _task_of(self, entry: tuple) -> Task:
        """The task of an inbox entry (a submit; counted as submitted by it)."""
        tid, ctx, rclass, pri, created, deadline, ens, refine = entry
        return Task(tid, ctx, rclass, pri, created, deadline, ens, refine, self.max_tokens)

    def _flush(self) -> None:
        """Send the requests buffered by :meth:`_send`: one multipart message per adapter, several
        requests in batch frames (:func:`~dynamic_core.payloads.batch_frames`)."""
        while self._outq:
            outq, self._outq = self._outq, {}
            for ident, reqs in outq.items():
                frames = [ident, *batch_frames(reqs)]
                try:
                    self._sock.send_multipart(frames, zmq.NOBLOCK, copy=len(frames) > 8)
                except zmq.ZMQError:  # gone (ROUTER_MANDATORY) or its queue is full: fail over
                    self._lose(ident, time.monotonic(), "unreachable")

    def _run_calls(self) -> None:
        while self._calls:
            fn, ev, box = self._calls.popleft()
            try:
                box.append(fn())
            except BaseException as e:  # noqa: BLE001 - handed back to the caller
                box.append(e)
            ev.set()

    def _shutdown_adapters(self) -> None:
        raw = self._out.encode(MeshShutdown())
        for ident in list(self.roster.by_id):
            try:
                self._sock.send_multipart([ident, raw], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    # ---- adapters -----------------------------------------------------------------------------
    def _read_adapters(self) -> None:
        sock = self._sock
        for _ in range(4096):
            if not readable(sock):
                return
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:  # pragma: no cover - EVENTS said readable
                return
            now = time.monotonic()
            if len(frames) < 2:
                self._in.count("bad_shape")
                self.counts["rejected_frames"] += 1
                continue
            ident = frames[0].bytes
            # an adapter may send several messages in one multipart message and in batch frames
            for buf in (m for frame in frames[1:] for m in split_batch(frame.buffer)):
                try:
                    msg = self._in.decode(buf)
                except PayloadError:
                    self.counts["rejected_frames"] += 1
                    continue
                try:
                    self._on_message(ident, msg, now)
                except Exception:  # noqa: BLE001 - one bad message must not drop the rest of the batch
                    log.exception("reasoning broker: handling a %s failed", type(msg).__name__)

    def _on_message(self, ident: bytes, msg: Any, now: float) -> None:
        if ident not in self.roster.by_id and ident in self._lost and not isinstance(msg, AdapterBye):
            self._slow_heartbeat(ident, now)
        if isinstance(msg, ReasonReply):
            a = self.roster.seen(ident, now)
            self._on_reply(a, ident, msg, now)
        elif isinstance(msg, AdapterBeat):
            self.roster.seen(ident, now)
        elif isinstance(msg, AdapterHello):
            old = self.roster.by_id.get(ident)
            if old is not None and old.provider != msg.provider:
                self._lose(ident, now, f"identity reused by provider {msg.provider!r}")
            self._join(ident, msg, now)
        elif isinstance(msg, AdapterBye):
            self._lose(ident, now, "adapter said goodbye")

    def _join(self, ident: bytes, hello: AdapterHello, now: float) -> None:
        a, new = self.roster.hello(ident, hello, now)
        if new:
            lost = self._lost.get(ident)
            if lost is not None:  # the same process again: what was learned of its heartbeat holds
                a.beat_s = lost.beat_s
            log.info("adapter joined: %s (pid %d, %d slots)", hello.provider, hello.pid, hello.max_concurrency)
            self.down.pop(hello.provider, None)
            if hello.provider not in self.profiles:  # a provider configured only in its process
                log.warning("adapter for unknown provider %r ignored by routing", hello.provider)

    def _slow_heartbeat(self, ident: bytes, now: float) -> None:
        """An adapter lost for missed heartbeats speaks again. Silent no longer than
        :data:`SLOW_BEAT_MAX_S`, it is alive and beats slower than this broker (a hand-started
        adapter with a longer ``--heartbeat``): judged by that silence from now on and registered
        again at once, with a warning; a heartbeat mismatch would otherwise lose it again after
        every hello, and fail over its requests each time."""
        a = self._lost[ident]
        if not a.missed:
            return
        a.missed = False  # (once per loss)
        silence = now - a.last_seen
        if silence > SLOW_BEAT_MAX_S:  # a stall, not a slower heartbeat: its next hello registers it
            return
        a.beat_s = max(a.beat_s, silence)
        self.counts["slow_heartbeats"] += 1
        log.warning("adapter %s (pid %d) was taken for lost after missing heartbeats (this mesh beats every "
                    "%g s and allows %d missed) but is alive, silent %.2g s: it beats slower than the mesh (started "
                    "with a longer --heartbeat?); judging it by its own interval from now on, so a dead one is "
                    "noticed after %.2g s. Start adapters with --heartbeat %g", a.provider, a.hello.pid,
                    self.heartbeat_s, self.liveness, silence, self.liveness * max(self.heartbeat_s, a.beat_s),
                    self.heartbeat_s)
        self._join(ident, a.hello, now)

    def _check_liveness(self, now: float) -> None:
        expired = self.roster.expired(now, self.heartbeat_s, self.liveness)
        if expired and self._sock.poll(0, zmq.POLLIN):
            self._read_adapters()  # unread messages may hold their beats (a busy broker)
            expired = self.roster.expired(now, self.heartbeat_s, self.liveness)
        for a in expired:
            self._lose(a.identity, now, "missed heartbeats")
            a.missed = True  # (if it speaks again soon, it beats slower than this broker)

    def _lose(self, ident: bytes, now: float, why: str) -> None:
        a = self.roster.remove(ident)
        if a is None:
            return
        self.counts["adapter_lost"] += 1
        log.warning("adapter lost: %s (pid %d): %s", a.provider, a.hello.pid, why)
        self._lost[ident] = a  # its late replies still charge tokens
        while len(self._lost) > 256:
            self._lost.popitem(last=False)
        for (tid, att), o in list(a.outstanding.items()):
            if not o[2]:  # every attempt gets exactly one outcome (a half-open probe included)
                o[2] = True
                self._record(o[0], ok=False, latency_s=now - o[1], error_kind="adapter_lost", attempt=(tid, att))
            task = self._tasks.get(tid)
            if task is not None and task.state != "done" and task.pending.get(att, (None, None))[1] == ident:
                self._attempt_failed(task, att, "adapter_lost", now, None)

    def _check_children(self, now: float) -> None:
        for pid, (prov, proc, over) in list(self._children.items()):
            if proc.poll() is not None:
                del self._children[pid]
                born = self._spawned_at.pop(pid, now)
                if self._stop.is_set():
                    continue
                # its adapter is gone with it: its requests fail over now, not after its heartbeats
                for a in [a for a in self.roster.by_id.values() if a.hello.pid == pid and a.provider == prov]:
                    self._lose(a.identity, now, f"its process exited with {proc.returncode}")
                if proc.returncode == CONFIG_ERROR_EXIT:
                    # a bad secrets file, profile or address: a restart would fail the same way
                    self.counts["adapter_config_errors"] += 1
                    if prov not in self.down:
                        self.down[prov] = f"adapter process exited with {CONFIG_ERROR_EXIT} (configuration error)"
                        log.error("adapter process %s (pid %d) exited with %d, a configuration error (its own "
                                  "message is above); not restarting it: %s is down, its requests fall back",
                                  prov, pid, CONFIG_ERROR_EXIT, prov)
                    continue
                # capped exponential backoff: an adapter that keeps dying (a crash at start, a
                # provider that kills it) is not restarted every second forever
                n = 0 if now - born >= RESPAWN_STABLE_S else self._exits.get(prov, 0)
                delay = min(RESPAWN_MAX_S, RESPAWN_MIN_S * 2.0 ** min(n, 32))
                self._exits[prov] = n + 1
                self.counts["adapter_exits"] += 1
                log.warning("adapter process %s (pid %d) exited with %s; restarting in %.0fs", prov, pid,
                            proc.returncode, delay)
                self._respawn_at.append((now + delay, prov))
        if self._respawn_at and not self._stop.is_set():
            due = [p for t, p in self._respawn_at if t <= now]
            self._respawn_at = [(t, p) for t, p in self._respawn_at if t > now]
            for p in due:
                try:
                    self.spawn(p)
                    self.counts["respawned"] += 1
                except OSError as e:
                    log.error("could not restart adapter %s: %s", p, e)

    # ---- tasks --------------------------------------------------------------------------------
    def _drain_inbox(self) -> None:
        """Route and queue what was submitted: at most an inbox's worth per loop iteration, so a
        producer that keeps the inbox full cannot hold the broker (replies, timers, dispatch)
        here, and the timers of what this sheds wait at most one iteration for compaction."""
        if self._evicted:
            self._finish_evicted(time.monotonic())
        budget = self._inbox_cap
        for box in self._inbox.lanes:  # the most urgent first
            budget = self._drain_lane(box, budget)
            if budget <= 0:
                self._more_work = True  # (the rest next iteration, without waiting in poll)
                break
        pressure = len(self.queue) / self.queue.capacity
        self.router.pressure = 0.0 if pressure < 0.5 else min(1.0, (pressure - 0.5) * 2)

    def _drain_lane(self, box: deque[tuple], budget: int) -> int:
        """Up to ``budget`` entries of one inbox lane; returns the budget left."""
        while box and budget > 0:
            try:
                entry = box.popleft()
            except IndexError:  # (taken by a submit making room for a more urgent task)
                break
            budget -= 1
            task = self._task_of(entry)
            self._tasks[task.id] = task
            self._push_timer(task.deadline - task.reserve, "deadline", task.id, 0, task)
            try:
                hit = self._route(task, task.created)
            except Exception:  # noqa: BLE001 - a context routing cannot handle still gets its rationale
                log.exception("reasoning broker: routing task %d failed", task.id)
                task.candidates = [self.config.last_resort]
                self._finish_local(task, "fallback", time.monotonic())
                continue
            if hit is not None:  # answered from the narrative cache
                self._extra(task.candidates[0], "cache_hits")
                self._deliver(task, "cached", hit[0], task.candidates[0], time.monotonic(), agreeing=int(hit[1]),
                              conflict=False)
                continue
            victim = self.queue.push(task)
            if victim is not None:
                self._finish_local(victim, "shed", time.monotonic())
        return budget

    def _route(self, task: Task, now: float) -> tuple[str, int] | None:
        """Route ``task`` (sets its candidates) and look it up in the narrative cache under its
        first candidate: the cached (text, agreeing) or None. What ``bench_reasoning`` times."""
        ctx = task.ctx
        task.arm = self.ab.arm(ctx.signal_id)
        task.est_in = 160 + 12 * len(ctx.features)
        req = RouteRequest(request_class=task.rclass, persona=ctx.persona,
                                            asset_class=ctx.asset_class, deadline_s=task.deadline - now,
                                            tokens_in=task.est_in, tokens_out=task.tokens_out,
                                            language=ctx.language)
        task.candidates = self.router.route(req, self.ab.candidates if task.arm == "B" else None)
        if task.refine and len(task.candidates) > 2:
            # the cheapest drafts; the most expensive refines (see _after_success)
            body = task.candidates[:-1]
            body.sort(key=lambda p: self.profiles[p].unit_cost)
            task.candidates = body + task.candidates[-1:]
        primary = task.candidates[0]
        if self._cache_on:
            task.key = NarrativeCache.make_key(ctx.instrument, regime_bucket(ctx), ctx.action, primary,
                                               ctx.persona, TEMPLATE_VERSION, digest(distill(ctx)))
            return self.cache.get(task.key)
        return None

    def _pick(self, route: tuple[str, ...]) -> int:
        """Where a queued task with these remaining candidates can start now: the index of the
        first *live* candidate (an adapter registered, breaker not open, not cooling down) with
        a free slot; -1 while every live one is busy (it waits for them, its deadline brings
        the narrator). With no live candidate left before the last, the last (the last resort:
        inline when no adapter serves it, else when one of them has a free slot)."""
        roster = self.roster
        admits = self.router.admits
        last = len(route) - 1
        live = False
        for i in range(last):
            p = route[i]
            if roster.alive(p) and admits(p):
                if roster.has_free(p):
                    return i
                live = True
        if live:
            return -1
        p = route[last]
        return last if not roster.alive(p) or roster.has_free(p) else -1

    def _dispatch(self) -> None:
        """Start queued tasks that can start now, in WFQ then arrival order. Decided per route
        (see :meth:`_pick`, asked again only for the routes sharing a provider that just took a
        task), so a backlog for a busy provider costs nothing per round and never holds back a
        task another candidate could serve."""
        q = self.queue
        if not q.size:
            return
        now = time.monotonic()
        memo: dict[tuple[str, ...], int] = {}
        pick = self._pick

        def runnable(route: tuple[str, ...]) -> bool:
            i = memo.get(route)
            if i is None:
                i = memo[route] = pick(route)
            return i >= 0

        for _ in range(_DISPATCH_MAX):
            task = q.take(runnable)
            if task is None:
                return
            task.ci += memo[task.qkey]  # type: ignore[index]
            task.state = "running"
            if task.ensemble > 1:
                self._start_ensemble(task, now)
            else:
                self._try_from(task, task.ci, now)
            if task.pending:  # slots (and maybe half-open probes) were taken: ask those routes again
                if len(memo) == 1:  # (its own route, which holds the provider it went to)
                    memo.clear()
                else:
                    used = {pend[0] for pend in task.pending.values()}
                    for route in [r for r in memo if not used.isdisjoint(r)]:
                        del memo[route]
        if q.size:
            self._more_work = True

    def _start_ensemble(self, task: Task, now: float) -> None:
        sent = 0
        last = len(task.candidates) - 1
        i = task.ci
        while i < last and sent < task.ensemble:
            p = task.candidates[i]
            if self.roster.has_free(p) and self._send(task, p, now):
                sent += 1
            i += 1
        task.ci = i
        if not sent:
            self._try_from(task, i, now)

    def _try_from(self, task: Task, start: int, now: float) -> None:
        """Send the next attempt from candidate ``start`` on; the last resort runs inline when
        no adapter process serves it."""
        c = task.candidates
        last = len(c) - 1
        i = start
        while i <= last:
            p = c[i]
            if task.remaining(now) <= task.reserve and i < last:
                i = last
                continue
            if i == last and not self.roster.has_free(p):
                task.ci = last + 1
                self._finish_local(task, "fallback" if task.attempt else "local", now)
                return
            if self.roster.has_free(p) and self._send(task, p, now):
                task.ci = i + 1
                task.tries_here = 0
                return
            i += 1
        self._finish_local(task, "fallback", now)

    def _send(self, task: Task, provider: str, now: float) -> bool:
        if provider != self.config.last_resort and not self.router.admits(provider):
            return False  # its breaker opened (or half-open probes are taken) since routing
        a = self.roster.pick(provider)
        if a is None:
            return False
        prof = self.profiles[provider]  # routing only names configured providers
        reserve = task.reserve
        budget = min(prof.timeout_s, task.remaining(now) - reserve)
        if budget <= 0.001:
            return False
        ctx = task.ctx
        json_mode = prof.style == "json"
        if prof.kind == "local":
            msgs: tuple = ()
            tmpl_name = "local"
            est = 0
        else:
            draft = task.draft.text if task.stage == 1 and task.draft is not None else None
            tmpl = TEMPLATES["refine/1"] if draft is not None else template_for(prof.style, ctx.language)
            msgs, est = build_messages(tmpl, ctx, context_window=prof.context_window, max_tokens=task.tokens_out,
                                       draft=draft)
            tmpl_name = tmpl.name
        att = task.attempt
        if att > 255:
            return False
        if self.router.admits_send(provider, est or task.est_in, task.tokens_out):
            return False  # its budget or quota was spent since routing (by the tasks sent before)
        req = ReasonRequest(task_id=task.id, attempt=att, context=ctx, messages=msgs, template=tmpl_name,
                            max_tokens=task.tokens_out, timeout_ms=max(1, int(budget * 1000)), json_mode=json_mode)
        # buffered per adapter and sent as one multipart message per loop iteration (_flush)
        self._outq.setdefault(a.identity, []).append(self._out.encode(req))
        task.attempt += 1
        task.pending[att] = (provider, a.identity, now)
        task.used.add(provider)
        a.outstanding[(task.id, att)] = [provider, now, False]
        self.router.record_start(provider, est or task.est_in, task.tokens_out, attempt=(task.id, att))
        self._push_timer(now + budget, "attempt", task.id, att, task)
        return True

    def _record(self, provider: str, **kw: Any) -> None:
        if provider in self.profiles:
            kind = kw.get("error_kind")
            if kind is not None and kind not in AdapterError.KINDS:
                kw["error_kind"] = "server_error"  # bounded error-kind counters
            self.router.record_result(provider, **kw)

    def _on_reply(self, a: Any, ident: bytes, rep: ReasonReply, now: float) -> None:
        key = (rep.task_id, rep.attempt)
        o = a.outstanding.pop(key, None) if a is not None else None
        if o is None:  # sent before this adapter was lost (and maybe said hello again)
            lost = self._lost.get(ident)
            o = lost.outstanding.pop(key, None) if lost is not None else None
        if o is None:  # never sent there (e.g. meant for an earlier broker): a stray
            self.counts["unknown_replies"] += 1
            return
        if a is not None:
            a.served += 1
        provider, sent, recorded = o
        latency = now - sent
        kind = None if rep.ok else (rep.error_kind if rep.error_kind in AdapterError.KINDS else "server_error")
        if recorded:  # timed out or lost already: the spend is real, the outcome was counted
            if provider in self.profiles:
                self.router.record_tokens(provider, rep.tokens_in, rep.tokens_out)
        else:
            self._record(provider, ok=rep.ok, latency_s=latency, tokens_in=rep.tokens_in,
                         tokens_out=rep.tokens_out, error_kind=kind, retry_after=rep.retry_after, attempt=key)
        task = self._tasks.get(rep.task_id)
        pend = task.pending.get(rep.attempt) if task is not None else None
        if pend is None or pend[1] != ident or task.state == "done":
            self.counts["late_replies"] += 1  # the task moved on: the answer no longer matters
            return
        del task.pending[rep.attempt]
        if not rep.ok:
            if rep.error:
                log.debug("attempt %d of task %d at %s failed: %s", rep.attempt, task.id, provider, rep.error)
            self._attempt_failed(task, rep.attempt, kind or "server_error", now, rep.retry_after)
            return
        self._extra(provider, "answers")
        text = rep.text
        limit = reply_limit(task.tokens_out)
        if len(text) > limit:  # it ignored max_tokens: cut before parsing, caching or publishing
            text = text[:limit]
            self.counts["truncated_replies"] += 1
            self._extra(provider, "truncated")
        prof = self.profiles.get(provider)
        if prof is not None and prof.kind == "local":
            # the narrator restates the signal: no view of its own, so it never counts as a
            # provider agreeing (min_providers_agree), as when it runs inline
            ctx = task.ctx
            parsed = ParsedReply(direction=None, confidence=ctx.confidence
                                 if math.isfinite(ctx.confidence) else None, rationale=text, valid=True)
        else:
            parsed = parse_reply(text, prof.style if prof is not None else "narrative")
        cand = Candidate(provider=provider, text=parsed.rationale or text, parsed=parsed, latency_s=latency,
                         model_s=rep.model_ms / 1e3)
        if task.ensemble > 1:
            task.replies.append(cand)
            if len(task.replies) >= task.ensemble or (not task.pending and not self._more_ensemble(task, now)):
                self._finish_ensemble(task, now)
            return
        if task.refine and task.stage == 0:
            conf = parsed.confidence if parsed.confidence is not None else task.ctx.confidence
            ambiguity = 1.0 - min(task.ctx.agreement, conf)
            premium = task.candidates[-2] if len(task.candidates) > 2 else None
            if ambiguity > self.ambiguity and premium is not None and premium != provider:
                task.draft = cand
                task.stage = 1
                self._extra(premium, "refinements")
                if self.roster.has_free(premium) and self._send(task, premium, now):
                    return
                task.stage = 0  # the premium cannot take it now: the draft stands
        self._complete(task, cand, now, "ok")

    def _more_ensemble(self, task: Task, now: float) -> bool:
        """Ask one more candidate after an ensemble member failed; False when none is left."""
        last = len(task.candidates) - 1
        while task.ci < last:
            p = task.candidates[task.ci]
            task.ci += 1
            if p not in task.used and self.roster.has_free(p) and self._send(task, p, now):
                return True
        return False

    def _attempt_failed(self, task: Task, att: int, kind: str, now: float, retry_after: float | None) -> None:
        """Move ``task`` on after attempt ``att`` failed (its outcome is recorded elsewhere,
        once: by the reply, the attempt timer or the adapter's loss)."""
        pend = task.pending.pop(att, None)
        provider = pend[0] if pend is not None else (task.candidates[task.ci - 1] if task.ci else "?")
        self._extra(provider, f"failed_{kind}")
        if task.state == "done":
            return
        if task.ensemble > 1:
            if not task.pending and not self._more_ensemble(task, now):
                self._finish_ensemble(task, now)
            return
        if task.stage == 1:  # the refinement failed: the draft stands
            task.stage = 0
            self._complete(task, task.draft, now, "ok")
            return
        retryable = kind in ("timeout", "rate_limited", "server_error", "connection", "malformed", "adapter_lost")
        if retryable and task.tries_here < self.max_retries:
            delay = self.backoff_s * (1.5 ** task.tries_here) * self._rng.uniform(0.8, 1.2)
            if retry_after:
                delay = max(delay, retry_after)
            if now + delay < task.deadline - task.reserve - 0.001 * 5:
                task.tries_here += 1
                task.state = "waiting"
                self._push_timer(now + delay, "retry", task.id, task.ci - 1, task)
                return
        self._try_from(task, task.ci, now)

    # ---- timers -------------------------------------------------------------------------------
    def _push_timer(self, when: float, kind: str, tid: int, arg: int, task: Task | None = None) -> None:
        """Schedule ``kind`` for task ``tid`` at ``when`` (``task``: that task, when the caller has
        it). Finished tasks' entries are dropped in bulk by :meth:`_compact_timers`."""
        if not when < math.inf:  # NaN or +inf would sit at (or corrupt) the heap's root: fire now
            log.error("reasoning broker: %s timer of task %d at %r; firing it now", kind, tid, when)
            when = time.monotonic()
        if task is None:
            task = self._tasks.get(tid)
        if task is not None:
            task.ntimers += 1
        else:
            self._dead_timers += 1
        heapq.heappush(self._timers, (when, next(self._tseq), kind, tid, arg))

    def _compact_timers(self) -> None:
        """Drop the timers of finished tasks once they are more than half of a heap of over 1024
        (lazy deletion: a finished task's timers otherwise stay until they are due, an hour
        later for an hour's deadline). Asked once per broker iteration; each compaction halves
        the heap at least: amortized O(1) per timer."""
        timers = self._timers
        if self._dead_timers * 2 <= len(timers) or len(timers) <= 1024:
            return
        live = self._tasks
        timers[:] = [e for e in timers if e[3] in live]  # in place: _run_timers may hold the list
        heapq.heapify(timers)
        self._dead_timers = 0
        self.counts["timers_compacted"] += 1

    def _run_timers(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, kind, tid, arg = heapq.heappop(timers)
            task = self._tasks.get(tid)
            if task is None or task.state == "done":
                self._dead_timers -= 1
                continue
            task.ntimers -= 1
            try:
                self._timer(task, kind, tid, arg, now)
            except Exception:  # noqa: BLE001 - one task's bug must not stop the others' timers
                log.exception("reasoning broker: %s timer of task %d failed", kind, tid)
                if task.state != "done":
                    self._deliver(task, "fallback", _FALLBACK_TEXT, self.config.last_resort, now,
                                  agreeing=0, conflict=False)

    def _timer(self, task: Task, kind: str, tid: int, arg: int, now: float) -> None:
        if kind == "attempt":
            pend = task.pending.get(arg)
            if pend is not None:
                a = self.roster.by_id.get(pend[1])
                o = a.outstanding.get((tid, arg)) if a is not None else None
                if o is not None and not o[2]:
                    o[2] = True  # its late reply will only charge tokens
                    self._record(pend[0], ok=False, latency_s=now - pend[2], error_kind="timeout", attempt=(tid, arg))
                self._attempt_failed(task, arg, "timeout", now, None)
        elif kind == "retry":
            if task.state == "waiting":
                task.state = "running"
                p = task.candidates[arg]
                if not (self.roster.has_free(p) and self._send(task, p, now)):
                    self._try_from(task, arg + 1, now)
        elif kind == "deadline":
            self._on_deadline(task, now)

    def _on_deadline(self, task: Task, now: float) -> None:
        if task.state == "queued":  # never got a slot: out of the queue, narrated locally
            self.queue.remove(task)
            self._finish_local(task, "fallback", now)
            return
        if task.ensemble > 1 and task.replies:
            self._finish_ensemble(task, now)
        elif task.stage == 1 and task.draft is not None:
            self._complete(task, task.draft, now, "ok")
        else:
            self._finish_local(task, "fallback", now)

    # ---- finishing ----------------------------------------------------------------------------
    def _finish_ensemble(self, task: Task, now: float) -> None:
        if not task.replies:
            self._finish_local(task, "fallback", now)
            return
        # routing order, not arrival order: ties go to the earlier candidate, whatever answered first
        order = {p: i for i, p in enumerate(task.candidates)}
        replies = sorted(task.replies, key=lambda c: order.get(c.provider, len(order)))
        weights = {c.provider: self._weight(c.provider) for c in replies}
        ranked = rerank(replies, task.ctx.action, weights)
        self._complete(task, ranked.winner, now, "ok", agreeing=ranked.agreeing, conflict=ranked.conflict)

    def _weight(self, provider: str) -> float:
        """A provider's ensemble weight: the policy's ``[limits.NAME] weight`` times the weight
        review decisions gave it (both 1.0 when unset)."""
        try:
            w = self.router.weight(provider)
        except KeyError:
            w = 1.0
        return w * self.weights.get(provider)

    def _complete(self, task: Task, cand: Candidate, now: float, status: str, *, agreeing: int | None = None,
                  conflict: bool = False) -> None:
        want = action_direction(task.ctx.action)
        if agreeing is None:
            agreeing = int(cand.parsed.direction == want)
        narrator = self.profiles.get(cand.provider)
        if status == "ok" and narrator is not None and narrator.kind == "local":
            # the narrator's process answered: as inline, "fallback" after providers were tried
            status = "fallback" if any(p != cand.provider and self.profiles.get(p) is not None
                                       and self.profiles[p].kind != "local" for p in task.used) else "local"
        if task.key is not None and status == "ok" and task.key[3] == cand.provider:
            self.cache.put(task.key, (cand.text, agreeing))
        reason = None
        prof = self.profiles.get(cand.provider)
        if cand.provider == self.config.last_resort or (prof is not None and prof.kind == "local"):
            pass  # the narrator restates the signal: nothing for a person to review
        elif conflict:
            reason = "conflict"
        elif cand.parsed.confidence is not None and cand.parsed.confidence < self.review_confidence:
            reason = "low_confidence"
        elif cand.parsed.direction not in (None, want) and not (want == "hold" or cand.parsed.direction == "hold"):
            reason = "disagrees"
        if reason is not None:
            ctx = task.ctx
            self.review_queue.add(signal_id=ctx.signal_id, instrument=ctx.instrument, timeframe=ctx.timeframe,
                                  provider=cand.provider, text=cand.text, reason=reason,
                                  confidence=cand.parsed.confidence)
        self._deliver(task, status, cand.text, cand.provider, now, agreeing=agreeing, conflict=conflict,
                      model_s=cand.model_s)

    def _finish_local(self, task: Task, status: str, now: float, *, reason: str = "") -> None:
        self.counts["inline_local"] += 1
        try:
            text = narrate(task.ctx)
        except Exception:  # noqa: BLE001 - the last resort must not fail
            log.exception("narrator failed on task %d", task.id)
            text = _FALLBACK_TEXT
        self._extra(self.config.last_resort, "answers")
        self._deliver(task, status, text, self.config.last_resort, now, agreeing=0, conflict=False, reason=reason)

    def _deliver(self, task: Task, status: str, text: str, provider: str, now: float, *, agreeing: int,
                 conflict: bool, model_s: float = 0.0, reason: str = "") -> None:
        task.state = "done"
        task.pending.clear()  # abandoned attempts keep their slots until their (late) replies
        if self._tasks.pop(task.id, None) is not None and task.ntimers:
            self._dead_timers += task.ntimers  # its timers are dead weight now
            task.ntimers = 0
        ctx = task.ctx
        upd = RationaleUpdate(signal_id=ctx.signal_id, instrument=ctx.instrument, timeframe=ctx.timeframe,
                              text=text[: 1 << 20], provider=provider[:256], ts=time.time_ns())
        latency = now - task.created
        self._latencies.append(latency)
        self.counts["completed"] += 1
        self.by_status[status] = self.by_status.get(status, 0) + 1
        self.ab.record(task.arm, ok=status in ("ok", "cached"), fallback=status in ("fallback", "shed"),
                       agree=agreeing > 0, latency_s=latency)
        if len(self.outbox) >= self._outbox_cap:
            self.counts["dropped_outbox"] += 1
        self.outbox.append(upd)
        if self.on_rationale is not None:
            try:
                self.on_rationale(Outcome(update=upd, task_id=task.id, status=status, provider=provider,
                                          attempts=task.attempt, latency_s=latency, agreeing=agreeing,
                                          conflict=conflict, arm=task.arm, model_s=model_s, reason=reason))
            except Exception:  # noqa: BLE001 - a callback bug must not stop the broker
                self.counts["callback_errors"] += 1
                log.exception("on_rationale raised")

    def _extra(self, provider: str, key: str) -> None:
        d = self.provider_extra.setdefault(provider, {})
        d[key] = d.get(key, 0) + 1


_FALLBACK_TEXT = "No rationale available for this signal."
