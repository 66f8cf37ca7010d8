"""Upward migration of circuits under per-channel bandwidth limits.

Accounting follows the design's ``enqueue_migration`` / ``tick``: a circuit's size is its
``parameter_count / from_layer.total_params``; it goes through at once when
``current_transfer + size <= bandwidth`` (then ``current_transfer += size``), else it waits in
a queue ordered by priority (fast-tracked first, then autocorrelation, then arrival). Each tick
``current_transfer *= 1 - restore_rate`` (0.9: 10% of the bandwidth restored) and the queue
drains head first while ``current_transfer < bandwidth``.

Two fixes to the pseudocode, which loops forever when the head does not fit (it re-enqueues
it): the head takes whatever room is left, so a circuit larger than the room (or than the whole
bandwidth, which would otherwise never move) streams over several ticks in slices, each
accounted like a transfer; and ``current_transfer`` never exceeds ``bandwidth``. Emergency
requests (``criticality > emergency_threshold``) bypass the check and are not accounted, as in
the design, but counted. A *rejection* is a request that could not go through at once (queued
or dropped); wait times are in ticks from request to the last slice (0 when immediate).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field

from .circuits import Circuit

__all__ = ["MigrationCoordinator", "MigrationQueue", "Transfer"]

Executor = Callable[[Circuit, float], None]
"""``execute(circuit, fraction)``: blend ``fraction`` (0, 1] of the circuit into the target."""


@dataclass(slots=True)
class _Pending:
    key: tuple[int, float, int]
    circuit: Circuit
    remaining: float  # fraction of the circuit still to move
    enqueued: int


@dataclass(slots=True, frozen=True)
class Transfer:
    """One execution: ``size`` of the bandwidth (fraction of the source layer's parameters)
    moving ``fraction`` of ``circuit`` at ``tick``; ``kind`` is ``immediate``, ``queued``
    (from the queue, maybe a slice) or ``emergency``."""

    circuit: Circuit = field(repr=False)
    size: float
    fraction: float
    tick: int
    kind: str


class MigrationQueue:
    """One channel (``from_layer`` -> ``to_layer``) with its bandwidth and priority queue.

    Parameters
    ----------
    from_layer, to_layer : str
        Layer names.
    bandwidth : float
        Fraction of the source layer's parameters that may move per tick.
    total_params : int
        Parameters of the source layer (every slot).
    execute : callable, optional
        ``execute(circuit, fraction)`` applies a transfer; None records only.
    restore_rate : float
        ``current_transfer *= 1 - restore_rate`` per tick.
    emergency_threshold : float
        Criticality above which a request bypasses the bandwidth.
    max_pending : int
        Queue bound; the lowest priority request beyond it is dropped (counted).
    """

    def __init__(self, from_layer: str, to_layer: str, bandwidth: float, *, total_params: int,
                 execute: Executor | None = None, restore_rate: float = 0.1, emergency_threshold: float = 0.95,
                 max_pending: int = 1024) -> None:
        if not 0.0 < bandwidth <= 1.0 or total_params < 1:
            raise ValueError("bandwidth must be in (0, 1] and total_params >= 1")
        self.from_layer, self.to_layer = from_layer, to_layer
        self.bandwidth = float(bandwidth)
        self.total_params = int(total_params)
        self.execute = execute
        self.restore_rate = float(restore_rate)
        self.emergency_threshold = float(emergency_threshold)
        self.max_pending = int(max_pending)
        self.current_transfer = 0.0
        self.pending: list[_Pending] = []
        self.now = 0
        self._seq = 0
        self.total_requests = 0
        self.rejections = 0
        self.emergencies = 0
        self.dropped = 0
        self.completed = 0
        self.wait_sum = 0
        self.transferred = 0.0  # accounted sizes (emergencies excluded)
        self.emergency_transfer = 0.0
        self.log: list[Transfer] = []  # this tick's transfers (cleared by tick())

    @property
    def key(self) -> str:
        """``"from->to"``."""
        return f"{self.from_layer}->{self.to_layer}"

    def size_of(self, circuit: Circuit) -> float:
        """Bandwidth a whole circuit needs: ``parameter_count / total_params``."""
        return circuit.parameter_count / self.total_params

    def _run(self, circuit: Circuit, size: float, fraction: float, kind: str) -> None:
        if self.execute is not None:
            self.execute(circuit, fraction)
        self.log.append(Transfer(circuit, size, fraction, self.now, kind))

    def enqueue_migration(self, circuit: Circuit) -> str:
        """Request a migration: ``"emergency"``, ``"executed"`` (fits now), ``"queued"`` or
        ``"dropped"`` (the queue was full and this was its lowest priority)."""
        self.total_requests += 1
        size = self.size_of(circuit)
        if circuit.criticality > self.emergency_threshold:
            self.emergencies += 1
            self.emergency_transfer += size
            self._run(circuit, size, 1.0, "emergency")
            self.completed += 1
            return "emergency"
        total = self.current_transfer + size
        if total <= self.bandwidth:
            self._run(circuit, size, 1.0, "immediate")
            self.current_transfer = total
            self.transferred += size
            self.completed += 1
            return "executed"
        self.rejections += 1
        self._seq += 1
        item = _Pending((-int(circuit.fast_track), -circuit.autocorr, self._seq), circuit, 1.0, self.now)
        bisect.insort(self.pending, item, key=lambda p: p.key)
        if len(self.pending) > self.max_pending:
            last = self.pending.pop()
            self.dropped += 1
            if last is item:
                return "dropped"
        return "queued"

    def tick(self) -> list[Transfer]:
        """Advance one tick: restore bandwidth, then drain the queue by priority. Returns the
        transfers of the closing tick (immediate and emergency ones included) and starts a new
        log."""
        self.current_transfer *= 1.0 - self.restore_rate
        while self.pending and self.current_transfer < self.bandwidth:
            head = self.pending[0]
            room = self.bandwidth - self.current_transfer
            need = head.remaining * self.size_of(head.circuit)
            if need <= room:
                self.pending.pop(0)
                self._run(head.circuit, need, head.remaining, "queued")
                self.current_transfer = min(self.current_transfer + need, self.bandwidth)
                self.transferred += need
                self.completed += 1
                self.wait_sum += self.now - head.enqueued
            else:
                frac = head.remaining * room / need
                self._run(head.circuit, room, frac, "queued")
                head.remaining -= frac
                self.current_transfer = self.bandwidth
                self.transferred += room
        done, self.log = self.log, []
        self.now += 1
        return done

    def average_wait_time(self) -> float:
        """Mean ticks from request to completion over completed requests (0 when none)."""
        return self.wait_sum / self.completed if self.completed else 0.0

    @property
    def rejection_rate(self) -> float:
        """Rejections per request (0 when none)."""
        return self.rejections / self.total_requests if self.total_requests else 0.0

    def purge(self, predicate: Callable[[Circuit], bool]) -> int:
        """Drop pending requests whose circuit matches (counted as dropped); returns how many."""
        keep = [p for p in self.pending if not predicate(p.circuit)]
        n = len(self.pending) - len(keep)
        self.pending = keep
        self.dropped += n
        return n

    def stats(self) -> dict[str, float]:
        """Queue depth, wait, rejections and transfer counters."""
        return {"queue_depth": len(self.pending), "avg_wait_time": self.average_wait_time(),
                "rejection_rate": self.rejection_rate, "requests": self.total_requests,
                "rejections": self.rejections, "emergencies": self.emergencies, "dropped": self.dropped,
                "completed": self.completed, "current_transfer": self.current_transfer,
                "transferred": self.transferred}


class MigrationCoordinator:
    """The four channels (context->agent 0.01, agent->swarm 0.005, swarm->domain 0.001,
    domain->foundation 0.0001 of the source layer's parameters per tick).

    Parameters
    ----------
    queues : dict[str, MigrationQueue]
        Keyed ``"from->to"``.
    """

    def __init__(self, queues: dict[str, MigrationQueue]) -> None:
        self.queues = dict(queues)

    def migrate_circuit(self, circuit: Circuit, from_layer: str, to_layer: str) -> str:
        """Request a migration on the ``from_layer -> to_layer`` channel."""
        q = self.queues.get(f"{from_layer}->{to_layer}")
        if q is None:
            raise KeyError(f"no migration channel {from_layer}->{to_layer}")
        return q.enqueue_migration(circuit)

    def tick_all(self) -> dict[str, list[Transfer]]:
        """Tick every channel; the transfers of the closing tick per channel."""
        return {k: q.tick() for k, q in self.queues.items()}
