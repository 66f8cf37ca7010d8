"""The task manager's data: tasks, priorities, and the bounded weighted-fair queue.

A :class:`Task` is one rationale to write (one signal). It waits in the :class:`TaskQueue`
(four priority classes served by weighted fair queueing: critical 8, high 4, medium 2, low 1)
until one of its candidate providers can take it. Queued tasks are grouped by their remaining
candidate list (their *route*), so the broker decides per route, not per task, whether a task
can start now: a backlog waiting for one busy provider never hides a task another provider
could serve at once, and a round costs O(routes), not O(queued tasks). Among the tasks that
can start, the WFQ order of their classes decides, then arrival order. The queue is bounded:
when it is full, the newest task of the lowest non-empty priority is shed (or the incoming
one, when nothing queued ranks lower). Everything here runs on the broker thread only.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable
from typing import Any

from ..payloads import ReasoningContext

__all__ = ["PRIORITIES", "Task", "TaskQueue", "priority_index"]

PRIORITIES = ("critical", "high", "medium", "low")
"""Priority classes, most urgent first."""
WEIGHTS = (8.0, 4.0, 2.0, 1.0)
_STEP = tuple(1.0 / w for w in WEIGHTS)  # a served task's virtual-time cost per class


_INDEX = {p: i for i, p in enumerate(PRIORITIES)}


def priority_index(p: str | int) -> int:
    if type(p) is str and p in _INDEX:  # the common case: a name, one dict lookup
        return _INDEX[p]
    if isinstance(p, int) and 0 <= p < len(PRIORITIES):
        return p
    try:
        return PRIORITIES.index(str(p))
    except ValueError:
        raise ValueError(f"unknown priority {p!r}: use one of {', '.join(PRIORITIES)}") from None


class Task:
    """One rationale request moving through the mesh."""

    __slots__ = ("id", "ctx", "rclass", "priority", "created", "deadline", "total_s", "candidates", "ci",
                 "tries_here", "attempt", "state", "pending", "replies", "ensemble", "used", "arm",
                 "refine", "stage", "draft", "tokens_out", "est_in", "key", "reserve", "qkey", "qseq",
                 "ntimers")

    def __init__(self, id: int, ctx: ReasoningContext, rclass: str, priority: int, created: float,
                 deadline: float, ensemble: int, refine: bool, tokens_out: int) -> None:
        self.id = id
        self.ctx = ctx
        self.rclass = rclass
        self.priority = priority
        self.created = created
        self.deadline = deadline
        self.total_s = deadline - created
        # kept back at the end of the deadline for the local narration
        self.reserve = min(0.1, max(0.01, 0.05 * self.total_s))
        self.candidates: list[str] = []
        self.ci = 0  # next candidate to try
        self.tries_here = 0  # retries at candidates[ci - 1]
        self.attempt = 0  # attempts sent so far (the wire's ``attempt``)
        self.state = "new"  # new, queued, running, waiting (backoff), done
        self.pending: dict[int, tuple[str, bytes | None, float]] = {}  # attempt -> (provider, worker, sent)
        self.replies: list[Any] = []
        self.ensemble = ensemble
        self.used: set[str] = set()
        self.arm = "A"
        self.refine = refine
        self.stage = 0  # refinement: 0 draft, 1 refine
        self.draft: Any = None
        self.tokens_out = tokens_out
        self.est_in = 0
        self.key: Any = None
        self.qkey: tuple[str, ...] | None = None  # its route while queued (TaskQueue)
        self.qseq = 0  # arrival order in the queue
        self.ntimers = 0  # its entries in the broker's timer heap

    def remaining(self, now: float) -> float:
        return self.deadline - now


class TaskQueue:
    """Bounded weighted-fair queue over the four priority classes, grouped by route.

    ``groups`` maps a route (the task's remaining candidates, ``tuple(candidates[ci:])``) to
    one FIFO per class. The broker tells :meth:`take` which routes can start a task now and
    at which of their candidates (see ``ReasoningMesh._pick``)."""

    def __init__(self, capacity: int = 1000) -> None:
        if capacity < 1:
            raise ValueError("queue capacity must be >= 1")
        self.capacity = int(capacity)
        self.groups: dict[tuple[str, ...], tuple[deque[Task], ...]] = {}
        self.counts = [0] * len(PRIORITIES)  # queued tasks per class
        self._vt = [0.0] * len(PRIORITIES)
        self._now_vt = 0.0
        self._seq = itertools.count()
        self.size = 0
        self.shed = [0] * len(PRIORITIES)
        self.served = [0] * len(PRIORITIES)

    def __len__(self) -> int:
        return self.size

    def push(self, task: Task) -> Task | None:
        """Queue ``task`` (its ``candidates`` and ``ci`` set); returns the task shed to make
        room (possibly ``task`` itself)."""
        victim = None
        if self.size >= self.capacity:
            low = max((i for i, n in enumerate(self.counts) if n), default=-1)
            if low <= task.priority:  # nothing queued ranks lower than the newcomer: refuse it
                self.shed[task.priority] += 1
                return task
            victim = self._pop_newest(low)
            self.shed[low] += 1
        cls = task.priority
        if not self.counts[cls]:  # (re)activated class: starts at the current virtual time
            self._vt[cls] = max(self._vt[cls], self._now_vt)
        key = tuple(task.candidates[task.ci:])
        lanes = self.groups.get(key)
        if lanes is None:
            lanes = self.groups[key] = tuple(deque() for _ in PRIORITIES)
        lanes[cls].append(task)
        task.qkey = key
        task.qseq = next(self._seq)
        self.counts[cls] += 1
        self.size += 1
        task.state = "queued"
        return victim

    def _pop_newest(self, cls: int) -> Task:
        """Take out the newest queued task of class ``cls`` (which has one)."""
        best_key = None
        best_seq = -1
        for key, lanes in self.groups.items():
            lane = lanes[cls]
            if lane and lane[-1].qseq > best_seq:
                best_key, best_seq = key, lane[-1].qseq
        assert best_key is not None
        lanes = self.groups[best_key]
        t = lanes[cls].pop()
        self._unlink(t, best_key, lanes)
        t.state = "shed"
        return t

    def _unlink(self, task: Task, key: tuple[str, ...], lanes: tuple[deque[Task], ...]) -> None:
        self.counts[task.priority] -= 1
        self.size -= 1
        if not any(lanes):
            del self.groups[key]

    def take(self, runnable: Callable[[tuple[str, ...]], bool]) -> Task | None:
        """Remove and return the next task to start: the first in WFQ order of classes, then
        arrival, among the routes ``runnable`` accepts (asked once per route); None when no
        queued task can start. A taken task keeps its route in ``qkey``."""
        ok = [lanes for key, lanes in self.groups.items() if runnable(key)]
        if not ok:
            return None
        # WFQ: of the classes with a task that can start, the smallest virtual finish time
        # (start tag + 1/weight), ties to the higher priority; within it the earliest arrival
        best, best_cls, best_v = None, -1, math.inf
        vt = self._vt
        for cls, n in enumerate(self.counts):
            if n:
                v = vt[cls] + _STEP[cls]
                if v < best_v:  # (strictly: ties stay with the higher priority)
                    first = None
                    for lanes in ok:
                        lane = lanes[cls]
                        if lane and (first is None or lane[0].qseq < first[0].qseq):
                            first = lane
                    if first is not None:
                        best, best_cls, best_v = first, cls, v
        return self._taken(best, best_cls) if best is not None else None

    def _taken(self, lane: deque[Task], cls: int) -> Task:
        t = lane.popleft()
        self._unlink(t, t.qkey, self.groups[t.qkey])  # type: ignore[index]
        self._now_vt = self._vt[cls]  # the system's virtual time: the served start tag
        self._vt[cls] += _STEP[cls]
        self.served[cls] += 1
        t.state = "taken"
        return t

    def remove(self, task: Task) -> None:
        """Take a queued task out (its deadline came before a slot did)."""
        key = task.qkey
        lanes = self.groups[key]  # type: ignore[index]
        lanes[task.priority].remove(task)
        self._unlink(task, key, lanes)  # type: ignore[arg-type]
        task.state = "expired"

    def stats(self) -> dict[str, Any]:
        return {"queued": self.size, "capacity": self.capacity, "routes": len(self.groups),
                "by_priority": {p: self.counts[i] for i, p in enumerate(PRIORITIES)},
                "shed": {p: self.shed[i] for i, p in enumerate(PRIORITIES)},
                "served": {p: self.served[i] for i, p in enumerate(PRIORITIES)}}
