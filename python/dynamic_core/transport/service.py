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

Control commands
----------------
============== =========================================================================
Pause          stop reading the ingress socket; frames wait there (up to its RCVHWM), then
               the sender blocks (PUSH) or drops (PUB). Bars already in the engine finish
               and their signals are still published.
Resume         read again.
SetThrottle    submit at most ``max_bars_per_s`` bars/s (token bucket, bursts of 50 ms);
               0 = unlimited.
SwapPersona    stored (``service.persona``) and handed to the reasoning mesh (when there is
               one): later rationales are written in that persona.
UpdateRouting  stored (``service.routing``) and acknowledged.
LoadPopulation refused with "not supported while running": swapping a population under a
               live engine needs engine support that does not exist yet. Restart the service.
Snapshot       ``np.save(path, engine.agents())``; relative to ``snapshot_dir`` and confined
               to it when one is given.
HealthQuery    ``{"engine": engine.stats(), "service": service.stats()}`` as plain values
               (plus ``"mesh": mesh.stats()`` with a reasoning mesh).
ReviewQuery    the reasoning mesh's review queue (``{"items": [...]}``).
Review         approve or reject one review item; adjusts that adapter's ensemble weight.
============== =========================================================================

Reasoning
---------
With ``mesh=`` (a started :class:`~dynamic_core.reasoning.ReasoningMesh`), the egress thread
hands each published batch to ``mesh.submit_signals`` (after publishing it: a signal never
waits for reasoning) and publishes finished rationales as
:class:`~dynamic_core.payloads.RationaleUpdate` on ``rat.<instrument>.<timeframe>``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from ..errors import CommandRefused
from ..payloads import (
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
    plain,
)
from .control import ControlServer
from .feed import SignalFeed
from .ingress import MarketIngress

__all__ = ["EngineService"]

log = logging.getLogger("dynamic_core.transport.service")


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
        Its ``handler`` is set to :meth:`apply` unless it already has one, and, when the engine
        writes a journal (``Engine(..., journal=DIR)``), its ``journal_hook`` to
        ``engine.journal_control`` unless it already has one: every accepted command is
        journaled before it is applied. Replaying: ``dc.journal.replay(DIR, on_control=lambda
        raw: service.apply(dc.payloads.decode_command(raw)))``.
    on_signals : callable, optional
        ``on_signals(records)`` with each ``SIGNAL_DTYPE`` batch before it is published (egress
        thread). If it raises, the exception is logged, counted (``stats()["hook_errors"]``) and
        the batch is still published.
    snapshot_dir : path, optional
        Base directory of Snapshot paths; a path that leaves it is refused.
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

    def __init__(self, engine: Any, *, ingress: MarketIngress | None = None, feed: SignalFeed | None = None,
                 control: ControlServer | None = None,
                 on_signals: Callable[[np.ndarray], Any] | None = None,
                 snapshot_dir: str | os.PathLike | None = None, idle_timeout: float = 0.05,
                 max_frames: int = 64, mesh: Any = None) -> None:
        self.engine = engine
        self.mesh = mesh
        self.ingress = ingress
        self.feed = feed
        self.control = control
        self.on_signals = on_signals
        self.snapshot_dir = Path(snapshot_dir).resolve() if snapshot_dir is not None else None
        self.idle_timeout = float(idle_timeout)
        self.max_frames = int(max_frames)
        if control is not None and control.handler is None:
            control.handler = self.apply
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
        self._tokens = 0.0
        self._refill_at = time.monotonic()
        self._pending: np.ndarray | None = None
        self._stop = threading.Event()
        self._egress_stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._egress: threading.Thread | None = None
        # large frames are submitted in pieces, so a blocking submit never holds more than half
        # the engine's window and control commands get a look-in between pieces
        try:
            cap = int(engine.stats().get("capacity", 0))
        except Exception:  # noqa: BLE001 - an engine-like object without stats
            cap = 0
        self._chunk = max(1, cap // 2) if cap else 4096
        self._poll_all = zmq.Poller()
        self._poll_ctl = zmq.Poller()
        if control is not None:
            self._poll_all.register(control.socket, zmq.POLLIN)
            self._poll_ctl.register(control.socket, zmq.POLLIN)
        if ingress is not None:
            self._poll_all.register(ingress.socket, zmq.POLLIN)

    # ---- control ------------------------------------------------------------------------------
    def apply(self, cmd: Any) -> dict[str, Any]:
        """Apply one control command (the :class:`ControlServer` handler; also usable directly,
        e.g. when replaying a journal). Returns the reply's ``result``."""
        self.commands += 1
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
        if isinstance(cmd, (ReviewQuery, Review)):
            if self.mesh is None:
                raise CommandRefused("no reasoning mesh is running (start the service with one)")
            if isinstance(cmd, ReviewQuery):
                return {"items": self.mesh.review_list(cmd.limit)}
            try:
                return self.mesh.review(cmd.item, cmd.approve)
            except KeyError:
                raise CommandRefused(f"no review item {cmd.item} (already decided, or never queued)") from None
        if isinstance(cmd, UpdateRouting):
            self.routing = dict(cmd.table)
            return {"routes": len(self.routing)}
        if isinstance(cmd, Snapshot):
            return self._snapshot(cmd.path)
        if isinstance(cmd, HealthQuery):
            out = {"engine": plain(self.engine.stats()), "service": self.stats()}
            if self.mesh is not None:
                out["mesh"] = plain(self.mesh.stats())
            return out
        if isinstance(cmd, LoadPopulation):
            raise CommandRefused("LoadPopulation is not supported while running: restart the service "
                                 "with the new population")
        raise CommandRefused(f"unknown command {type(cmd).__name__}")

    def _snapshot(self, path: str) -> dict[str, Any]:
        p = Path(path)
        if self.snapshot_dir is not None:
            p = (self.snapshot_dir / p).resolve()
            if not p.is_relative_to(self.snapshot_dir):
                raise CommandRefused(f"snapshot path {path!r} leaves the snapshot directory")
        if p.suffix != ".npy":
            p = p.with_name(p.name + ".npy")
        if not p.parent.is_dir():
            raise CommandRefused(f"snapshot directory does not exist: {p.parent}")
        agents = self.engine.agents()
        tmp = p.with_name(p.name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, agents)
        os.replace(tmp, p)  # a reader never sees a half-written snapshot
        return {"path": str(p), "agents": len(agents)}

    # ---- ingress loop -------------------------------------------------------------------------
    def _take(self, n: int, now: float) -> int:
        """Bars the throttle allows now (token bucket, bursts of 50 ms)."""
        rate = self.max_bars_per_s
        if rate <= 0:
            return n
        burst = max(1.0, rate * 0.05)
        self._tokens = min(burst, self._tokens + (now - self._refill_at) * rate)
        self._refill_at = now
        k = min(n, int(self._tokens))
        self._tokens -= k
        return k

    def run_once(self, timeout: float | None = None) -> int:
        """One iteration of the ingress loop: wait up to ``timeout`` (default ``idle_timeout``)
        for the sockets, apply waiting control commands, then submit bars. Returns the number of
        bars submitted."""
        wait = self.idle_timeout if timeout is None else timeout
        throttled = self.max_bars_per_s > 0
        accepting = self.ingress is not None and not self.paused and self._pending is None
        if self._pending is not None and not self.paused:
            # waiting for throttle tokens (or engine room): come back when one is due
            wait = min(wait, 1.0 / self.max_bars_per_s if throttled else 0.001)
        poller = self._poll_all if accepting else self._poll_ctl
        if poller.sockets:
            events = dict(poller.poll(max(0, int(wait * 1000))))
        else:
            time.sleep(wait)
            events = {}
        if self.control is not None and self.control.socket in events:
            self.control.serve(0.0)
        return self._submit_ingress()

    def _submit_ingress(self) -> int:
        if self.ingress is None or self.paused:
            return 0
        n = 0
        for _ in range(self.max_frames):
            if self._pending is None:
                bars = self.ingress.recv_bars(0.0)
                if bars is None:
                    break
                if len(bars) == 0:
                    continue
                self._pending = bars
            bars = self._pending
            k = self._take(min(len(bars), self._chunk), time.monotonic())
            if k == 0:
                break
            taken = int(self.engine.submit(bars[:k]))
            n += taken
            self.bars_submitted += taken
            self._pending = bars[taken:] if taken < len(bars) else None
            if taken < k:  # engine full with backpressure="reject_new": retry next iteration
                break
            if self.control is not None and self.control.socket.poll(0, zmq.POLLIN):
                break  # a command is waiting: apply it before the next submit
            if self.paused:
                break
        return n

    # ---- egress thread ------------------------------------------------------------------------
    def _egress_loop(self) -> None:
        feed = self.feed
        mesh = self.mesh
        while True:
            stopping = self._egress_stop.is_set()
            try:
                # modest max_n: the engine allocates max_n records per call (1<<20 costs ~45 ms)
                sigs = self.engine.poll(4096, timeout=0.0 if stopping else 0.02)
            except RuntimeError:  # engine closed underneath us
                return
            if len(sigs):
                if self.on_signals is not None:
                    try:
                        self.on_signals(sigs)
                    except Exception:  # noqa: BLE001 - decided: log, count, publish anyway
                        self.hook_errors += 1
                        log.exception("on_signals hook raised")
                # counted before sending, so a subscriber never sees more than health reports
                self.signals_published += len(sigs)
                if feed is not None:
                    feed.publish(sigs)
                if mesh is not None:  # after publishing: reasoning never delays a signal
                    mesh.submit_signals(sigs)
            elif stopping:
                return
            if mesh is not None:
                for upd in mesh.take_rationales():
                    if feed is not None:
                        feed.publish_rationale(upd)
                    self.rationales_published += 1
            if feed is not None:
                feed.tick()

    def _start_egress(self) -> None:
        if (self.feed is not None or self.on_signals is not None or self.mesh is not None) and self._egress is None:
            self._egress_stop.clear()
            self._egress = threading.Thread(target=self._egress_loop, name="dc-service-egress", daemon=True)
            self._egress.start()

    def _stop_egress(self) -> None:
        if self._egress is not None:
            self._egress_stop.set()
            self._egress.join()
            self._egress = None

    # ---- lifecycle ----------------------------------------------------------------------------
    def run(self, duration: float | None = None, until: Callable[[], bool] | None = None) -> None:
        """Serve in this thread until :meth:`stop` (from another thread or a control handler),
        ``duration`` seconds, or ``until()`` returns True. Signals of submitted bars that are
        ready within the last egress round are published before it returns."""
        self._start_egress()
        end = None if duration is None else time.monotonic() + duration
        try:
            while not self._stop.is_set():
                self.run_once()
                if end is not None and time.monotonic() >= end:
                    break
                if until is not None and until():
                    break
        finally:
            self._stop_egress()

    def start(self) -> None:
        """Run :meth:`run` on a background thread."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("service already running")
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name="dc-service", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Ask the loop to end and wait for the background thread (if :meth:`start` made one)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            self._thread = None

    def close(self) -> None:
        """Stop, then close the ingress, feed and control sockets (not the engine)."""
        self.stop()
        for part in (self.ingress, self.feed, self.control):
            if part is not None:
                part.close()

    def __enter__(self) -> EngineService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> dict[str, Any]:
        return plain({
            "paused": self.paused, "max_bars_per_s": self.max_bars_per_s, "persona": self.persona,
            "routes": len(self.routing), "commands": self.commands, "bars_submitted": self.bars_submitted,
            "signals_published": self.signals_published, "hook_errors": self.hook_errors,
            "rationales_published": self.rationales_published,
            "pending_bars": 0 if self._pending is None else len(self._pending),
            "ingress": self.ingress.stats() if self.ingress is not None else None,
            "feed": self.feed.stats() if self.feed is not None else None,
            "control": self.control.stats() if self.control is not None else None,
        })
