"""A fault-injecting ZeroMQ proxy between the bridge and a terminal: :class:`FaultProxy`.

Terminals connect to the proxy's ROUTER as if it were the bridge; for each terminal connection
the proxy opens its own DEALER to the bridge, so the bridge sees one peer per terminal
connection, as it would without the proxy. Each direction drops, duplicates, delays and
reorders messages at configurable rates, driven by one seeded RNG, so a failing run can be
replayed with the same seed (timing still varies with thread scheduling).
"""

from __future__ import annotations

import heapq
import itertools
import random
import threading
import time
from typing import Any, Self

import msgspec
import zmq

from ...transport._common import endpoint
from ._util import Doorbell, configure

__all__ = ["FaultProxy", "Faults"]


class Faults(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Fault rates of one direction (probabilities per message, each drawn independently).

    ``drop``: the message vanishes. ``duplicate``: it is delivered twice. ``delay``: it is
    held for a uniform time in ``delay_ms``. ``reorder``: it is held back until the next message
    of the same direction has gone (or ``delay_ms[1]`` has passed).
    """

    drop: float = 0.0
    duplicate: float = 0.0
    delay: float = 0.0
    reorder: float = 0.0
    delay_ms: tuple[float, float] = (1.0, 20.0)

    def __post_init__(self) -> None:
        for name in ("drop", "duplicate", "delay", "reorder"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"Faults.{name} must be a probability")
        lo, hi = self.delay_ms
        if not 0.0 <= lo <= hi:
            raise ValueError("Faults.delay_ms must be (lo, hi) with 0 <= lo <= hi")


_UP, _DOWN = 0, 1  # terminal -> bridge, bridge -> terminal


class FaultProxy:
    """Sits between terminals and an :class:`~.bridge.MT5Bridge` and misbehaves on purpose.

    Parameters
    ----------
    bridge_address : str
        The bridge's ROUTER address.
    bind : str
        Where terminals connect (read :attr:`address` for the resolved port).
    to_bridge, to_terminal : Faults
        Fault rates of each direction; change them later with :meth:`set_faults`.
    seed : int
        Seed of the RNG behind every fault decision.
    """

    def __init__(self, bridge_address: str, *, bind: str = "tcp://127.0.0.1:*", to_bridge: Faults | None = None,
                 to_terminal: Faults | None = None, seed: int = 0, start: bool = True) -> None:
        self.bridge_address = bridge_address
        self._faults = [to_bridge or Faults(), to_terminal or Faults()]
        self._rng = random.Random(seed)
        self._ctx = zmq.Context(io_threads=1)
        self._front = self._ctx.socket(zmq.ROUTER)
        configure(self._front)
        self._front.bind(bind)
        self.address = endpoint(self._front)
        self._backs: dict[bytes, zmq.Socket] = {}  # terminal routing id -> DEALER to the bridge
        self._ident_of: dict[zmq.Socket, bytes] = {}
        self._heap: list[tuple[float, int, int, Any, list[bytes]]] = []
        self._held: list[tuple[Any, list[bytes]] | None] = [None, None]
        self._held_until = [0.0, 0.0]
        self._n = itertools.count()
        self._bell = Doorbell()
        self._stop = threading.Event()
        self._poller = zmq.Poller()
        self._poller.register(self._front, zmq.POLLIN)
        self._poller.register(self._bell.rfd, zmq.POLLIN)
        self.counts = {f"{d}_{k}": 0 for d in ("to_bridge", "to_terminal")
                       for k in ("in", "out", "dropped", "duplicated", "delayed", "reordered")}
        self._thread: threading.Thread | None = None
        if start:
            self.start()

    def set_faults(self, *, to_bridge: Faults | None = None, to_terminal: Faults | None = None) -> None:
        """Change the fault rates (takes effect with the next message)."""
        if to_bridge is not None:
            self._faults[_UP] = to_bridge
        if to_terminal is not None:
            self._faults[_DOWN] = to_terminal

    def start(self) -> FaultProxy:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="dc-mt5-fault-proxy", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._bell.ring()
            self._thread.join(5.0)
            self._thread = None
        for s in [self._front, *self._backs.values()]:
            s.close(0)
        self._ctx.term()
        self._bell.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> dict[str, int]:
        return dict(self.counts)

    # ---- proxy thread ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            due = min(self._heap[0][0], now + 0.05) if self._heap else now + 0.05
            for d in (_UP, _DOWN):
                if self._held[d] is not None:
                    due = min(due, self._held_until[d])
            events = dict(self._poller.poll(max(0, int((due - now) * 1000) + 1)))
            if self._bell.rfd in events:
                self._bell.clear()
            for sock in events:
                if sock is self._front:
                    self._pump_front()
                elif isinstance(sock, zmq.Socket):
                    self._pump_back(sock)
            self._release(time.monotonic())

    def _pump_front(self) -> None:
        for _ in range(4096):
            try:
                frames = self._front.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            ident, body = frames[0], frames[1:]
            back = self._backs.get(ident)
            if back is None:
                back = self._ctx.socket(zmq.DEALER)
                configure(back)
                back.connect(self.bridge_address)
                self._backs[ident] = back
                self._ident_of[back] = ident
                self._poller.register(back, zmq.POLLIN)
            self._inject(_UP, back, body)

    def _pump_back(self, back: zmq.Socket) -> None:
        ident = self._ident_of[back]
        for _ in range(4096):
            try:
                body = back.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._inject(_DOWN, ident, [ident, *body])

    def _inject(self, d: int, dest: Any, frames: list[bytes]) -> None:
        f, rng, name = self._faults[d], self._rng, ("to_bridge", "to_terminal")[d]
        now = time.monotonic()
        self.counts[f"{name}_in"] += 1
        if rng.random() < f.drop:
            self.counts[f"{name}_dropped"] += 1
            return
        copies = 1
        if rng.random() < f.duplicate:
            copies = 2
            self.counts[f"{name}_duplicated"] += 1
        for c in range(copies):
            at = now
            if rng.random() < f.delay:
                self.counts[f"{name}_delayed"] += 1
                at += rng.uniform(*f.delay_ms) / 1000.0
            if c == 0 and self._held[d] is None and rng.random() < f.reorder:
                self.counts[f"{name}_reordered"] += 1
                self._held[d] = (dest, frames)
                self._held_until[d] = now + f.delay_ms[1] / 1000.0
                continue
            heapq.heappush(self._heap, (at, next(self._n), d, dest, frames))
            if at <= now and self._held[d] is not None:  # the message it was held for has gone: release
                hd, hf = self._held[d]
                self._held[d] = None
                heapq.heappush(self._heap, (at, next(self._n), d, hd, hf))
        self._release(now)

    def _release(self, now: float) -> None:
        for d in (_UP, _DOWN):
            if self._held[d] is not None and now >= self._held_until[d]:
                hd, hf = self._held[d]
                self._held[d] = None
                heapq.heappush(self._heap, (now, next(self._n), d, hd, hf))
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, d, dest, frames = heapq.heappop(heap)
            sock = dest if d == _UP else self._front
            if d == _UP and sock.closed:
                continue
            try:
                sock.send_multipart(frames, zmq.NOBLOCK)
                self.counts[("to_bridge", "to_terminal")[d] + "_out"] += 1
            except zmq.ZMQError:
                pass
