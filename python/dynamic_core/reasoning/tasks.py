"""The task manager's data: tasks, priorities, and the bounded weighted-fair queue.

A :class:`Task` is one rationale to write (one signal). It waits in the :class:`TaskQueue`
(four priority classes served by weighted fair queueing: critical 8, high 4, medium 2, low 1)
until an adapter of one of its candidate providers has a free slot. The queue is bounded: when
it is full, the newest task of the lowest non-empty priority is shed (or the incoming one, when
nothing queued ranks lower). Everything here runs on the broker thread only.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from ..payloads import ReasoningContext

__all__ = ["PRIORITIES", "Task", "TaskQueue", "priority_index"]

PRIORITIES = ("critical", "high", "medium", "low")
"""Priority classes, most urgent first."""
WEIGHTS = (8.0, 4.0, 2.0, 1.0)


def priority_index(p: str | int) -> int:
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
                 "refine", "stage", "draft", "tokens_out", "est_in", "key", "reserve")

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

    def remaining(self, now: float) -> float:
        return self.deadline - now


class TaskQueue:
    """Bounded weighted-fair queue over the four priority classes."""

    def __init__(self, capacity: int = 1000) -> None:
        if capacity < 1:
            raise ValueError("queue capacity must be >= 1")
        self.capacity = int(capacity)
        self.lanes: tuple[deque[Task], ...] = tuple(deque() for _ in PRIORITIES)
        self._vt = [0.0] * len(PRIORITIES)
        self._now_vt = 0.0
        self.size = 0
        self.shed = [0] * len(PRIORITIES)
        self.served = [0] * len(PRIORITIES)

    def __len__(self) -> int:
        return self.size

    def push(self, task: Task) -> Task | None:
        """Queue ``task``; returns the task shed to make room (possibly ``task`` itself)."""
        victim = None
        if self.size >= self.capacity:
            low = max((i for i, lane in enumerate(self.lanes) if lane), default=-1)
            if low <= task.priority:  # nothing queued ranks lower than the newcomer: refuse it
                self.shed[task.priority] += 1
                return task
            victim = self.lanes[low].pop()  # the newest of the lowest class
            self.size -= 1
            self.shed[low] += 1
        lane = self.lanes[task.priority]
        if not lane:  # (re)activated class: starts at the current virtual time
            self._vt[task.priority] = max(self._vt[task.priority], self._now_vt)
        lane.append(task)
        self.size += 1
        task.state = "queued"
        return victim

    def order(self) -> Iterator[int]:
        """Classes in the order WFQ serves them now (non-empty only)."""
        active = [i for i, lane in enumerate(self.lanes) if lane]
        # smallest virtual finish time first (start tag + 1/weight), ties to the higher priority
        active.sort(key=lambda i: (self._vt[i] + 1.0 / WEIGHTS[i], i))
        return iter(active)

    def take(self, fits: Callable[[Task], bool], limit: int = 64) -> Iterator[Task]:
        """Yield queued tasks in WFQ order that ``fits`` accepts, removing them, scanning at
        most ``limit`` tasks; tasks it declines stay queued in their place."""
        scanned = 0
        while scanned < limit and self.size:
            progressed = False
            for cls in self.order():
                lane = self.lanes[cls]
                skipped: list[Task] = []
                picked = None
                while lane and scanned < limit:
                    t = lane.popleft()
                    scanned += 1
                    if fits(t):
                        picked = t
                        break
                    skipped.append(t)
                lane.extendleft(reversed(skipped))
                if picked is not None:
                    self.size -= 1
                    self._now_vt = self._vt[cls]  # the system's virtual time: the served start tag
                    self._vt[cls] += 1.0 / WEIGHTS[cls]
                    self.served[cls] += 1
                    picked.state = "taken"
                    progressed = True
                    yield picked
                    break  # re-evaluate the WFQ order after each pick
            if not progressed:
                return

    def remove(self, task: Task) -> None:
        """Take a queued task out (its deadline came before a slot did)."""
        self.lanes[task.priority].remove(task)
        self.size -= 1
        task.state = "expired"

    def stats(self) -> dict[str, Any]:
        return {"queued": self.size, "capacity": self.capacity,
                "by_priority": {p: len(self.lanes[i]) for i, p in enumerate(PRIORITIES)},
                "shed": {p: self.shed[i] for i, p in enumerate(PRIORITIES)},
                "served": {p: self.served[i] for i, p in enumerate(PRIORITIES)}}
