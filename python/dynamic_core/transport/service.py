"""EngineService: one engine wired to market ingress, the signal feed and the control plane.

Threads
-------
``run()`` (or the thread ``start()`` creates) is the *ingress loop*: it waits on the control
and ingress sockets, applies control commands, then submits market bars, so a command always
lands between two submits, never inside one. A second *egress thread* is the engine's only
consumer: it waits in ``engine.poll`` (GIL released), publishes what comes out on the feed and
sends heartbeats when idle. Splitting them means a ``submit`` that waits for room in the engine
(``backpressure="block"``) is always drained by the egress thread, and a signal is published
as soon as it is fused, without the ingress loop having to guess when to poll. Each ZeroMQ
socket is used by one thread only.

The ingress loop submits no more bars than the engine's window has room for (``capacity``
minus ``in_flight`` in ``engine.stats()``); the rest of a frame waits (``stats()["pending_bars"]``)
while the loop goes back to the control socket, so a slow consumer never holds a command up.
The egress thread is registered with the engine as a consumer (``Engine.register_consumer``):
an ``on_signals`` hook that calls ``engine.submit``/``run`` gets ``RuntimeError`` instead of a
deadlock.

Stopping: :meth:`EngineService.stop` asks the loop to end and waits (bounded). The loop then
submits the bars it already took from the ingress socket (``_pending``; within the stop's time
limit, else they are counted in ``stats()["dropped_on_stop"]`` and logged) and the egress thread
publishes the signals of the bars in flight before it ends. Called from the service's own
threads (an ``on_signals`` hook, a control handler), ``stop()`` and ``close()`` only ask: the
threads end on their own after the hook returns (its batch is still published), and ``close()``
closes the sockets when the last one ends. An exception that ends the ingress loop or the egress
thread is logged once and kept: ``stats()["error"]`` (``"<Type>: message"``; also in the health
reply), ``stats()["running"]``; :meth:`EngineService.start` may run the loop again afterwards.

Control commands
----------------
============== =========================================================================
Pause          stop reading the ingress socket; frames wait there (up to its RCVHWM), then
               the sender blocks (PUSH) or drops (PUB). Bars already in the engine finish
               and their signals are still published.
Resume         read again.
SetThrottle    submit at most ``max_bars_per_s`` bars/s (token bucket, bursts of 50 ms);
               0 = unlimited; at most :data:`~dynamic_core.payloads.MAX_BARS_PER_S` (NaN,
               infinity and negative rates are refused).
SwapPersona    stored (``service.persona``) and handed to the reasoning mesh (when there is
               one): later rationales are written in that persona.
UpdateRouting  parsed (keys ``CLASS[/PERSONA[/ASSET_CLASS]]``, values comma-separated
               providers: :func:`~dynamic_core.reasoning.policy.routing_rules`), stored
               (``service.routing``) and handed to the reasoning mesh (when there is one):
               its tasks are routed by the table ahead of the policy's rules; an empty table
               drops it. A table that does not parse, or names a provider the mesh does not
               know, is refused.
LoadPopulation refused with "not supported while running": swapping a population under a
               live engine needs engine support that does not exist yet. Restart the service.
Snapshot       ``np.save(path, engine.agents())`` (``.npy`` appended unless the name has it);
               relative to ``snapshot_dir`` and confined to it when one is given (after the
               suffix is added and symlinks resolved; the directory itself is refused). Written
               to a fresh temporary file (mode 0600) in the same directory, then renamed: a
               reader never sees half a snapshot. A name over the file system's limit (255
               bytes) is refused.
HealthQuery    ``{"engine": engine.stats(), "service": service.stats()}`` as plain values
               (plus ``"mesh": mesh.stats()`` with a reasoning mesh).
ReviewQuery    the reasoning mesh's review queue (``{"items": [...]}``).
Review         approve or reject one review item; adjusts that adapter's ensemble weight.
============== =========================================================================

Commands are checked (:meth:`EngineService.check`) before the control server journals them:
a command that would be refused is neither journaled nor applied. Pure queries (HealthQuery,
ReviewQuery) are not journaled.

Replaying a journal
-------------------
``dc.journal.replay(DIR, on_control=service.replay_control)`` hands each journaled command to
:meth:`EngineService.replay_control`, which applies the commands that set the service's state
(Pause, Resume, SetThrottle, SwapPersona, UpdateRouting), skips those whose only effects are
outside (Snapshot: the live snapshot file is not rewritten) or that the live service refused,
and swallows a refusal the way the live service answered it. The signals replay bit for bit
whatever the commands were (the journal holds the bars as they were submitted).

Reasoning
---------
With ``mesh=`` (a started :class:`~dynamic_core.reasoning.ReasoningMesh`), the egress thread
hands each published batch to ``mesh.submit_signals`` (after publishing it: a signal never
waits for reasoning) and publishes finished rationales as
:class:`~dynamic_core.payloads.RationaleUpdate` on ``rat.<instrument>.<timeframe>``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from ..errors import CommandRefused, InvalidInput
from ..payloads import (
    MAX_BARS_PER_S,
    HealthQuery,
    LoadPopulation,
    Pause,
    Resume,
    Review,
    ReviewQuery,
    SetThrottle,
    Snapshot,
    SwapPersona,
    UpdateRouting,
    decode_command,
    plain,
)
from ._common import make_private_dirs, to_ms
from .control import ControlServer
from .feed import SignalFeed
from .ingress import MarketIngress

__all__ = ["EngineService"]

log = logging.getLogger("dynamic_core.transport.service")

_STATE_COMMANDS = (Pause, Resume, SetThrottle, SwapPersona, UpdateRouting)
"""What :meth:`EngineService.replay_control` applies: the commands that set the service's state."""

_NAME_MAX = 255  # bytes in one path component on Linux, macOS and Windows file systems


class EngineService:
    """Drive an engine from sockets: ingress -> engine -> feed, with a control plane.

    Parameters
    ----------
    engine : dynamic_core.Engine
        Owned by the caller (not closed by :meth:`close`). The service must be its only
        consumer of signals: do not ``poll`` it or register ``on_signal`` elsewhere.
    ingress : MarketIngress, optional
        Where bars come from. Without one, bars can still be submitted by the caller.
    feed : SignalFeed, optional
        Where signals go. Without a feed and without ``on_signals`` no egress thread runs and
        the caller must poll the engine (or a full window blocks ``submit``).
    control : ControlServer, optional
        Its ``handler`` is set to :meth:`apply` (and its ``validate`` to :meth:`check`) unless
        it already has one, and, when the engine writes a journal (``Engine(..., journal=DIR)``),
        its ``journal_hook`` to ``engine.journal_control`` unless it already has one: every
        accepted command that changes something is journaled before it is applied. Replaying:
        ``dc.journal.replay(DIR, on_control=service.replay_control)`` (see
        :meth:`replay_control`).
    on_signals : callable, optional
        ``on_signals(records)`` with each ``SIGNAL_DTYPE`` batch before it is published (egress
        thread). If it raises (anything, ``SystemExit`` included), the exception is logged,
        counted (``stats()["hook_errors"]``) and the batch is still published. It must not feed
        the engine (``engine.submit`` raises ``RuntimeError`` there); it may call :meth:`stop` or
        :meth:`close`, which then only ask (see the module docstring).
    snapshot_dir : path, optional
        Base directory of Snapshot paths; a path that leaves it is refused.
    create_snapshot_dir : bool
        Create ``snapshot_dir`` (mode 0700) at the first Snapshot if it does not exist (else a
        Snapshot into a missing directory is refused).
    idle_timeout : float
        Seconds the ingress loop waits on its sockets per iteration (bounds how quickly
        :meth:`stop` is noticed).
    max_frames : int
        Ingress frames handled per iteration before control is looked at again.

    Examples
    --------
    >>> eng = dc.Engine(pop)
    >>> svc = EngineService(eng, ingress=MarketIngress("ipc:///tmp/bars"),
    ...                     feed=SignalFeed("ipc:///tmp/signals"),
    ...                     control=ControlServer(secret_key="keys/server.key_secret",
    ...                                           authorized_keys="keys/clients"))
    >>> svc.start()          # background thread; or svc.run() to block
    >>> ...
    >>> svc.stop(); svc.close()
    """

    END_TIMEOUT = 10.0
    """Seconds the loop spends, when it ends without :meth:`stop` giving a limit (``duration``,
    ``until``, an error, a stop from a hook), on submitting its pending bars and letting the
    egress thread publish the signals in flight."""

    def __init__(self, engine: Any, *, ingress: MarketIngress | None = None, feed: SignalFeed | None = None,
                 control: ControlServer | None = None,
                 on_signals: Callable[[np.ndarray], Any] | None = None,
                 snapshot_dir: str | os.PathLike | None = None, idle_timeout: float = 0.05,
                 max_frames: int = 64, mesh: Any = None, create_snapshot_dir: bool = False) -> None:
        self.engine = engine
        self.mesh = mesh
        self.ingress = ingress
        self.feed = feed
        self.control = control
        self.on_signals = on_signals
        self.snapshot_dir = Path(snapshot_dir).resolve() if snapshot_dir is not None else None
        self.create_snapshot_dir = bool(create_snapshot_dir)
        self.idle_timeout = float(idle_timeout)
        self.max_frames = int(max_frames)
        if control is not None and control.handler is None:
            control.handler = self.apply
            if getattr(control, "validate", None) is None:
                control.validate = self.check  # refused commands are not journaled
        if control is not None and control.journal_hook is None and getattr(engine, "journal_path", None):
            # an engine with a journal records each command in order with the bars, before it
            # is applied; replay hands it back (dynamic_core.journal.replay(on_control=...))
            control.journal_hook = engine.journal_control
        self.paused = False
        self.max_bars_per_s = 0.0
        self.persona: str | None = None
        self.routing: dict[str, str] = {}
        self.commands = 0
        self.bars_submitted = 0
        self.signals_published = 0  # signals taken from the engine by the egress thread
        self.rationales_published = 0
        self.hook_errors = 0
        self.loop_errors = 0  # exceptions that ended the ingress loop or the egress thread
        self.dropped_on_stop = 0  # bars taken from the ingress socket, never submitted
        self.strict_refused = 0  # bars of batches a strict engine refused (InvalidInput), logged
        self._error: str | None = None
        self._tokens = 0.0
        self._refill_at = time.monotonic()
        self._pending: np.ndarray | None = None
        self._room_limited = False
        self._room_known = 0
        self._stop = threading.Event()
        self._egress_stop = threading.Event()
        self._egress_ended = threading.Event()
        self._egress_end_by = 0.0
        self._lock = threading.Lock()  # the thread bookkeeping below
        self._thread: threading.Thread | None = None  # the thread start() made
        self._loop: threading.Thread | None = None  # the thread running the ingress loop
        self._loop_done = threading.Event()
        self._loop_done.set()
        self._egress: threading.Thread | None = None
        self._end_by: float | None = None  # deadline stop() gave the loop's shutdown
        self._close_pending = False
        self._closed = False
        # large frames are submitted in pieces, so a blocking submit never holds more than half
        # the engine's window and control commands get a look-in between pieces
        try:
            cap = int(engine.stats().get("capacity", 0))
        except Exception:  # noqa: BLE001 - an engine-like object without stats
            cap = 0
        # only a blocking submit can hold the loop; "reject_new" and "drop_oldest" never wait
        self._cap = cap if getattr(engine, "backpressure", "block") == "block" else 0
        self._chunk = max(1, cap // 2) if cap else 4096
        self._poll_all = zmq.Poller()
        self._poll_ctl = zmq.Poller()
        self._monitor = getattr(control, "monitor_socket", None) if control is not None else None
        if control is not None:
            self._poll_all.register(control.socket, zmq.POLLIN)
            self._poll_ctl.register(control.socket, zmq.POLLIN)
            if self._monitor is not None:  # handshake failures are counted promptly
                self._poll_all.register(self._monitor, zmq.POLLIN)
                self._poll_ctl.register(self._monitor, zmq.POLLIN)
        if ingress is not None:
            self._poll_all.register(ingress.socket, zmq.POLLIN)

    # ---- control ------------------------------------------------------------------------------
    def check(self, cmd: Any) -> None:
        """Raise :class:`~dynamic_core.errors.CommandRefused` for a command :meth:`apply` would
        refuse, changing nothing. The :class:`ControlServer` calls it before journaling, so a
        refused command is never journaled."""
        if isinstance(cmd, SetThrottle):
            rate = cmd.max_bars_per_s
            try:
                ok = not isinstance(rate, bool) and 0.0 <= float(rate) <= MAX_BARS_PER_S
            except (TypeError, ValueError, OverflowError):
                ok = False
            if not ok:
                raise CommandRefused(f"max_bars_per_s must be a number in [0, {MAX_BARS_PER_S:g}] "
                                     f"(0 = unlimited), got {rate!r}")
        elif isinstance(cmd, (ReviewQuery, Review)):
            if self.mesh is None:
                raise CommandRefused("no reasoning mesh is running (start the service with one)")
        elif isinstance(cmd, Snapshot):
            self._snapshot_path(cmd.path)
        elif isinstance(cmd, UpdateRouting):
            from ..errors import PolicyError
            from ..reasoning.policy import routing_rules

            try:
                rules = routing_rules(cmd.table)
                if self.mesh is not None:
                    self.mesh.router.check_overrides(rules)
            except PolicyError as e:
                raise CommandRefused(str(e)) from None
        elif isinstance(cmd, LoadPopulation):
            raise CommandRefused("LoadPopulation is not supported while running: restart the service "
                                 "with the new population")
        elif not isinstance(cmd, (Pause, Resume, SwapPersona, UpdateRouting, HealthQuery)):
            raise CommandRefused(f"unknown command {type(cmd).__name__}")

    def apply(self, cmd: Any) -> dict[str, Any]:
        """Apply one control command (the :class:`ControlServer` handler; also usable directly).
        Returns the reply's ``result``; :class:`~dynamic_core.errors.CommandRefused` for a
        command it will not apply (see :meth:`check`). To replay a journal use
        :meth:`replay_control`."""
        self.commands += 1
        self.check(cmd)
        if isinstance(cmd, Pause):
            self.paused = True
            return {"paused": True}
        if isinstance(cmd, Resume):
            self.paused = False
            return {"paused": False}
        if isinstance(cmd, SetThrottle):
            self.max_bars_per_s = float(cmd.max_bars_per_s)
            self._tokens = 0.0
            self._refill_at = time.monotonic()
            return {"max_bars_per_s": self.max_bars_per_s}
        if isinstance(cmd, SwapPersona):
            self.persona = cmd.persona
            if self.mesh is not None:
                self.mesh.persona = cmd.persona
            return {"persona": self.persona}
        if isinstance(cmd, ReviewQuery):
            return {"items": self.mesh.review_list(cmd.limit)}
        if isinstance(cmd, Review):
            try:
                return self.mesh.review(cmd.item, cmd.approve)
            except KeyError:
                raise CommandRefused(f"no review item {cmd.item} (already decided, or never queued)") from None
        if isinstance(cmd, UpdateRouting):
            if self.mesh is not None:
                self.mesh.set_routing(cmd.table)
            self.routing = dict(cmd.table)
            return {"routes": len(self.routing), "mesh": self.mesh is not None}
        if isinstance(cmd, Snapshot):
            return self._snapshot(cmd.path)
        # HealthQuery: check() let nothing else through
        out = {"engine": plain(self.engine.stats()), "service": self.stats()}
        if self.mesh is not None:
            out["mesh"] = plain(self.mesh.stats())
        return out

    def replay_control(self, raw: bytes) -> dict[str, Any] | None:
        """The ``on_control`` of :func:`dynamic_core.journal.replay`::

            dc.journal.replay(DIR, on_control=service.replay_control)

        Decodes a journaled command and applies it when it sets the service's state (Pause,
        Resume, SetThrottle, SwapPersona, UpdateRouting); a command whose effects are outside
        (Snapshot: the live snapshot file is not rewritten, Review) or a query is skipped (None).
        A command the live service refused is refused again and skipped the same way (None),
        never raised. Returns the result of an applied command."""
        cmd = decode_command(raw)  # PayloadError: a record this build cannot read
        if not isinstance(cmd, _STATE_COMMANDS):
            return None
        try:
            return self.apply(cmd)
        except CommandRefused:
            return None

    def _snapshot_path(self, path: str) -> Path:
        """Where a Snapshot of ``path`` goes, or CommandRefused (nothing is written)."""
        if not isinstance(path, str) or not path:
            raise CommandRefused("snapshot path must be a non-empty string")
        if "\x00" in path:
            raise CommandRefused("snapshot path contains a NUL byte")
        p = Path(path)
        if p.name in ("", ".", "..") or path.endswith(("/", os.sep)):
            raise CommandRefused(f"snapshot path {path!r} does not name a file")
        if p.suffix != ".npy":
            p = p.with_name(p.name + ".npy")
        if self.snapshot_dir is not None:
            # the suffix first, then resolve (symlinks too), then check: '.' or 'a/..' must not
            # turn into a sibling of the directory once '.npy' is appended
            try:
                p = (self.snapshot_dir / p).resolve()
            except (OSError, RuntimeError) as e:  # a symlink loop, an unreadable component
                raise CommandRefused(f"snapshot path {path!r} cannot be resolved: {e}") from None
            if p == self.snapshot_dir or not p.is_relative_to(self.snapshot_dir):
                raise CommandRefused(f"snapshot path {path!r} leaves the snapshot directory")
        try:
            name_max = int(os.pathconf(p.parent, "PC_NAME_MAX"))
        except (OSError, ValueError, AttributeError):
            name_max = _NAME_MAX
        if len(os.fsencode(p.name)) > min(name_max, _NAME_MAX) or len(os.fsencode(str(p))) > 4096:
            raise CommandRefused(f"snapshot file name of {len(os.fsencode(p.name))} bytes: the limit is "
                                 f"{min(name_max, _NAME_MAX)}")
        to_create = self.create_snapshot_dir and p.parent == self.snapshot_dir and not os.path.lexists(p.parent)
        if not to_create and not p.parent.is_dir():
            raise CommandRefused(f"snapshot directory does not exist: {p.parent}")
        if p.is_dir():
            raise CommandRefused(f"snapshot path {path!r} is a directory")
        return p

    def _snapshot(self, path: str) -> dict[str, Any]:
        p = self._snapshot_path(path)
        if self.create_snapshot_dir and p.parent == self.snapshot_dir and not os.path.lexists(p.parent):
            make_private_dirs(p.parent)  # its missing parents 0700 too, whatever the umask
        agents = self.engine.agents()
        # a fresh temporary name (O_CREAT|O_EXCL, mode 0600): never an existing file or a
        # symlink planted under a predictable name
        fd, tmp = tempfile.mkstemp(prefix=".snapshot-", suffix=".tmp", dir=p.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, agents)
            os.replace(tmp, p)  # a reader never sees a half-written snapshot
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return {"path": str(p), "agents": len(agents)}

    # ---- ingress loop -------------------------------------------------------------------------
    def _take(self, n: int, now: float) -> int:
        """Bars the throttle allows now (token bucket, bursts of 50 ms)."""
        rate = self.max_bars_per_s
        if not 0.0 < rate < math.inf:  # 0 = unlimited (so are a NaN or infinite rate set by hand)
            return n
        burst = max(1.0, rate * 0.05)
        self._tokens = min(burst, self._tokens + max(0.0, now - self._refill_at) * rate)
        self._refill_at = now
        k = n if self._tokens >= n else int(self._tokens)
        self._tokens -= k
        return k

    def _room(self, want: int) -> int | None:
        """How many of ``want`` bars the engine's window has room for now (None: unknown, an
        engine-like object). Asks ``engine.in_flight()`` only when the room known from the last
        time (less what this loop submitted since; the egress thread only makes more) is short."""
        if self._cap <= 0:
            return None
        if self._room_known < want:
            try:
                self._room_known = max(0, self._cap - int(self.engine.in_flight()))
            except Exception:  # noqa: BLE001 - closed or engine-like: let submit say what is wrong
                return None
        return min(want, self._room_known)

    def _submit_pending(self, k: int) -> int:
        """Submit the first ``k`` pending bars; returns how many the engine took (the rest stay
        pending)."""
        bars = self._pending
        try:
            taken = int(self.engine.submit(bars[:k]))
        except InvalidInput as e:  # a strict engine refuses the whole piece; the stream goes on
            self.strict_refused += k
            log.warning("the strict engine refused %d bars: %s", k, e)
            self._pending = bars[k:] if k < len(bars) else None
            return k
        self.bars_submitted += taken
        self._room_known = max(0, self._room_known - taken)
        self._pending = bars[taken:] if taken < len(bars) else None
        return taken

    def run_once(self, timeout: float | None = None) -> int:
        """One iteration of the ingress loop: wait up to ``timeout`` (default ``idle_timeout``)
        for the sockets, apply waiting control commands, then submit bars. Returns the number of
        bars submitted."""
        wait = self.idle_timeout if timeout is None else timeout
        rate = self.max_bars_per_s
        throttled = 0.0 < rate < math.inf
        accepting = self.ingress is not None and not self.paused and self._pending is None
        if self._pending is not None and not self.paused:
            # waiting for throttle tokens or engine room: come back when one is due
            wait = min(wait, 1.0 / rate if throttled and not self._room_limited else 0.001)
        poller = self._poll_all if accepting else self._poll_ctl
        if poller.sockets:
            events = dict(poller.poll(to_ms(wait, 0)))
        else:
            time.sleep(wait)
            events = {}
        if self.control is not None and (self.control.socket in events or
                                         (self._monitor is not None and self._monitor in events)):
            self.control.serve(0.0)
        return self._submit_ingress()

    def _submit_ingress(self) -> int:
        if self.ingress is None or self.paused:
            return 0
        n = 0
        self._room_limited = False
        for _ in range(self.max_frames):
            if self._pending is None:
                bars = self.ingress.recv_bars(0.0)
                if bars is None:
                    break
                if len(bars) == 0:
                    continue
                self._pending = bars
            bars = self._pending
            want = min(len(bars), self._chunk)
            room = self._room(want)
            if room is not None and room < want:
                # never more than the window holds: a blocking submit would keep the loop (and
                # every control command) waiting for a slow consumer
                want = room
                self._room_limited = True
            if want == 0:
                break
            k = self._take(want, time.monotonic())
            if k == 0:
                break
            taken = self._submit_pending(k)
            n += taken
            if taken < k or self._room_limited:  # engine full: control first, then retry
                break
            if self.control is not None and self.control.socket.poll(0, zmq.POLLIN):
                break  # a command is waiting: apply it before the next submit
            if self.paused:
                break
        return n

    def _flush_pending(self, end_by: float) -> None:
        """Submit the bars taken from the ingress socket but not submitted yet (the loop is
        ending), as room allows, until ``end_by``; what is left is counted and logged."""
        while self._pending is not None:
            bars = self._pending
            room = self._room(len(bars))
            k = len(bars) if room is None else room
            if k == 0:
                egress_dead = self._egress is not None and self._egress_ended.is_set()
                if time.monotonic() >= end_by or egress_dead:
                    break
                time.sleep(0.002)
                continue
            try:
                taken = self._submit_pending(k)
            except Exception as e:  # noqa: BLE001 - the engine is closed or its journal failed
                log.warning("submitting the pending bars at stop failed: %s: %s", type(e).__name__, e)
                break
            if taken < k:
                if time.monotonic() >= end_by:
                    break
                time.sleep(0.002)
        if self._pending is not None:
            lost = len(self._pending)
            self._pending = None
            self.dropped_on_stop += lost
            log.warning("service stopped with %d bar(s) taken from the ingress socket that could not be "
                        "submitted in time; dropped (stats()['dropped_on_stop'])", lost)

    # ---- egress thread ------------------------------------------------------------------------
    def _egress_loop(self) -> None:
        me = threading.current_thread()
        register = getattr(self.engine, "register_consumer", None)
        if register is not None:  # a hook feeding the engine gets RuntimeError, not a deadlock
            register(me)
        try:
            self._egress_body()
        except BaseException as e:  # noqa: BLE001 - recorded, logged; the loop sees it in stats
            self._record_error("egress thread", e)
        finally:
            unregister = getattr(self.engine, "unregister_consumer", None)
            if unregister is not None:
                unregister(me)
            self._egress_ended.set()
            self._maybe_close_deferred()

    def _in_flight(self) -> int:
        try:
            return int(self.engine.in_flight())
        except Exception:  # noqa: BLE001 - closed or engine-like: nothing to wait for
            return 0

    def _egress_body(self) -> None:
        feed = self.feed
        mesh = self.mesh
        while True:
            stopping = self._egress_stop.is_set()
            late = stopping and time.monotonic() >= self._egress_end_by
            try:
                # modest max_n: the engine allocates max_n records per call (1<<20 costs ~45 ms)
                sigs = self.engine.poll(4096, timeout=(0.0 if late else 0.005) if stopping else 0.02)
            except RuntimeError:  # engine closed underneath us
                return
            if len(sigs):
                if self.on_signals is not None:
                    try:
                        self.on_signals(sigs)
                    except BaseException:  # SystemExit too: log, count, publish anyway
                        self.hook_errors += 1
                        log.exception("on_signals hook raised")
                # counted before sending, so a subscriber never sees more than health reports
                self.signals_published += len(sigs)
                if feed is not None:
                    feed.publish(sigs)
                if mesh is not None:  # after publishing: reasoning never delays a signal
                    mesh.submit_signals(sigs)
            elif stopping and (late or self._in_flight() == 0):
                self._publish_rationales()  # those that came since the last round go out too
                return
            self._publish_rationales()
            if feed is not None:
                feed.tick()

    def _publish_rationales(self) -> None:
        """Publish the rationales the mesh has finished (egress thread)."""
        if self.mesh is None:
            return
        for upd in self.mesh.take_rationales():
            if self.feed is not None:
                self.feed.publish_rationale(upd)
            self.rationales_published += 1

    def _start_egress(self) -> None:
        if self.feed is None and self.on_signals is None and self.mesh is None:
            return
        old = self._egress
        if old is not None:
            if not self._egress_ended.is_set():
                return  # still running (run() checked that it is not a leftover)
            old.join()  # it ended (after its stop timed out): only its last lines are left
        self._egress_stop.clear()
        self._egress_ended.clear()
        self._egress = threading.Thread(target=self._egress_loop, name="dc-service-egress", daemon=True)
        self._egress.start()

    def _stop_egress(self, end_by: float) -> bool:
        """Ask the egress thread to publish what is in flight and end; wait until ``end_by``.
        True when it ended (it is kept, and logged, when it did not: a hook that blocks)."""
        eg = self._egress
        if eg is None:
            return True
        self._egress_end_by = end_by
        self._egress_stop.set()
        if eg is threading.current_thread():
            return False
        eg.join(None if end_by == math.inf else max(0.0, end_by - time.monotonic()))
        if eg.is_alive():
            log.warning("the egress thread did not end in time (an on_signals hook that does not return?); "
                        "it is left running: start() refuses and close() leaves the sockets open until it ends")
            return False
        with self._lock:
            if self._egress is eg:
                self._egress = None
        return True

    # ---- lifecycle ----------------------------------------------------------------------------
    def _record_error(self, where: str, e: BaseException) -> None:
        msg = f"{type(e).__name__}: {e}"
        self._error = msg if where == "ingress loop" else f"{where}: {msg}"
        self.loop_errors += 1
        log.error("EngineService %s ended by %s", where, msg, exc_info=(type(e), e, e.__traceback__))

    def _check_can_run(self, me: threading.Thread | None) -> None:
        """RuntimeError unless no loop or egress thread of this service runs (lock held)."""
        if self._closed or self._close_pending:
            raise RuntimeError("service is closed")
        if self._loop is not None and self._loop is not me:
            raise RuntimeError(f"service already running (its ingress loop runs in {self._loop.name!r})")
        eg = self._egress
        if eg is not None and eg.is_alive() and not self._egress_ended.is_set():
            raise RuntimeError("the egress thread of an earlier run is still running (an on_signals hook "
                               "that does not return?): the service cannot run again until it ends")

    def _end_deadline(self) -> float:
        e = self._end_by
        if e is not None and self._stop.is_set():
            return e
        return time.monotonic() + self.END_TIMEOUT

    def run(self, duration: float | None = None, until: Callable[[], bool] | None = None) -> None:
        """Serve in this thread until :meth:`stop` (from another thread, a control handler or a
        hook), ``duration`` seconds, or ``until()`` returns True. Then the bars taken from the
        ingress socket are submitted and the signals in flight published (within the time
        :meth:`stop` gave, else :attr:`END_TIMEOUT`) before it returns.

        ``RuntimeError`` if a loop of this service already runs (:meth:`start`, or ``run`` in
        another thread), if the egress thread of an earlier run is still alive, or after
        :meth:`close`. An exception that ends the loop is recorded (``stats()["error"]``),
        logged once, and raised."""
        me = threading.current_thread()
        with self._lock:
            self._check_can_run(me)
            self._loop = me
            self._loop_done.clear()
        try:
            self._start_egress()
            end = None if duration is None else time.monotonic() + duration
            try:
                while not self._stop.is_set():
                    self.run_once()
                    if end is not None and time.monotonic() >= end:
                        break
                    if until is not None and until():
                        break
            except KeyboardInterrupt:
                raise
            except BaseException as e:  # recorded, then raised
                self._record_error("ingress loop", e)
                raise
            finally:
                end_by = self._end_deadline()
                self._flush_pending(end_by)
                self._stop_egress(end_by)
        finally:
            with self._lock:
                if self._loop is me:
                    self._loop = None
                self._loop_done.set()
            self._maybe_close_deferred()

    def _run_background(self) -> None:
        with contextlib.suppress(BaseException):  # recorded and logged by run()
            self.run()

    def start(self) -> None:
        """Run :meth:`run` on a background thread. ``RuntimeError`` while a loop or egress thread
        of this service is still alive (e.g. after a :meth:`stop` that timed out) and after
        :meth:`close`. After the loop ended by an exception (``stats()["error"]``) it may start
        again; the error stays reported until then and after (the last one is kept)."""
        with self._lock:
            self._check_can_run(None)
            self._stop.clear()
            self._end_by = None
            t = threading.Thread(target=self._run_background, name="dc-service", daemon=True)
            self._loop = self._thread = t
            self._loop_done.clear()
        try:
            t.start()
        except BaseException:
            with self._lock:
                self._loop = self._thread = None
                self._loop_done.set()
            raise

    def stop(self, timeout: float | None = 10.0) -> bool:
        """Ask the loop to end and wait up to ``timeout`` seconds (None: as long as it takes)
        for it and the egress thread. Returns True when no thread of the service runs any more.

        False when one still runs after ``timeout`` (logged as a warning): it is kept, so
        :meth:`start` and :meth:`run` refuse and :meth:`close` does not close the sockets under
        it, and a later ``stop()`` waits for it again. Called from the service's own threads (a
        control handler, an ``on_signals`` hook) it only asks and returns False at once: the
        loop and the egress thread end on their own (the hook's batch is still published)."""
        me = threading.current_thread()
        with self._lock:
            own = me is self._loop or me is self._egress
            if not own:
                self._end_by = math.inf if timeout is None else time.monotonic() + max(0.0, float(timeout))
            self._stop.set()
            loop, thread = self._loop, self._thread
            deadline = self._end_by if not own else None
        if own:
            return False

        def left(grace: float = 0.0) -> float | None:
            return None if deadline == math.inf else max(0.0, deadline - time.monotonic()) + grace

        if loop is not None:
            # the loop ends by the deadline; a little grace for it to return from its last wait
            self._loop_done.wait(left(0.25))
        if thread is not None and thread is not me and self._loop_done.is_set():
            thread.join(left(0.25))
        eg = self._egress
        if eg is not None and eg is not me and self._loop_done.is_set():
            self._egress_stop.set()  # an egress thread left behind by an earlier run
            eg.join(left())
        with self._lock:
            running = self._loop is not None or (self._egress is not None and self._egress.is_alive()
                                                 and not self._egress_ended.is_set())
            if self._thread is not None and not self._thread.is_alive():
                self._thread = None
            if self._egress is not None and not self._egress.is_alive():
                self._egress = None
        if running:
            log.warning("EngineService.stop: a service thread is still running after %s s; it is kept "
                        "(start() refuses, close() leaves the sockets open until it ends)", timeout)
            return False
        return True

    def close(self, timeout: float | None = 10.0) -> bool:
        """Stop (waiting up to ``timeout`` s), then close the ingress, feed and control sockets
        (not the engine). Returns True when they are closed.

        Sockets are never closed under a running thread: if one is still running (the stop timed
        out, or ``close()`` was called from the service's own thread: a hook or a control
        handler), the last of the service's threads closes them when it ends, and ``close()``
        returns False (with a warning, unless called from the service's own thread)."""
        if self._closed:
            return True
        stopped = self.stop(timeout)
        with self._lock:
            self._close_pending = True
        self._maybe_close_deferred()
        if not self._closed:
            me = threading.current_thread()
            if not stopped and me is not self._loop and me is not self._egress:
                log.warning("EngineService.close: a service thread is still running; the sockets stay open "
                            "and are closed when it ends")
            return False
        return True

    def _maybe_close_deferred(self) -> None:
        """Close the sockets if a close is pending and no other thread of the service runs."""
        me = threading.current_thread()
        with self._lock:
            if not self._close_pending or self._closed:
                return
            if self._loop is not None and self._loop is not me:
                return
            eg = self._egress
            if eg is not None and eg is not me and eg.is_alive() and not self._egress_ended.is_set():
                return
            self._close_pending = False
            self._closed = True
        for part in (self.ingress, self.feed, self.control):
            if part is not None:
                try:
                    part.close()
                except Exception:  # close the others anyway
                    log.exception("closing %r failed", part)

    def __enter__(self) -> EngineService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def error(self) -> str | None:
        """The last exception that ended the loop or the egress thread (``"<Type>: message"``),
        else None: ``stats()["error"]`` without the sockets' stats."""
        return self._error

    def stats(self) -> dict[str, Any]:
        """Counters: commands, bars submitted, signals and rationales published, hook errors,
        pending bars, ``dropped_on_stop``, ``strict_refused`` (bars of pieces a ``strict`` engine
        refused, each logged); ``running`` (the ingress loop runs), ``egress_running``,
        ``error`` (the last exception that ended the loop or the egress thread, ``"<Type>:
        message"``, else None) and ``loop_errors``; and the sockets' own stats."""
        eg = self._egress
        return plain({
            "paused": self.paused, "max_bars_per_s": self.max_bars_per_s, "persona": self.persona,
            "routes": len(self.routing), "commands": self.commands, "bars_submitted": self.bars_submitted,
            "signals_published": self.signals_published, "hook_errors": self.hook_errors,
            "rationales_published": self.rationales_published,
            "pending_bars": 0 if self._pending is None else len(self._pending),
            "dropped_on_stop": self.dropped_on_stop, "strict_refused": self.strict_refused,
            "running": self._loop is not None,
            "egress_running": eg is not None and eg.is_alive() and not self._egress_ended.is_set(),
            "error": self._error, "loop_errors": self.loop_errors,
            "ingress": self.ingress.stats() if self.ingress is not None else None,
            "feed": self.feed.stats() if self.feed is not None else None,
            "control": self.control.stats() if self.control is not None else None,
        })
