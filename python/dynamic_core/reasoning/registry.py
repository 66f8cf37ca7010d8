"""The broker's roster of adapter processes: who is connected, what they can do, how busy
they are, and which one gets the next request (least connections or round robin)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..payloads import AdapterHello

__all__ = ["Adapter", "Roster"]


@dataclass
class Adapter:
    """One connected adapter process (a ROUTER identity)."""

    identity: bytes
    hello: AdapterHello
    last_seen: float
    served: int = 0
    outstanding: dict[tuple[int, int], list] = field(default_factory=dict)
    """(task id, attempt) -> [provider, sent at, outcome recorded]: the attempts this adapter
    holds a slot for, released only by its reply or its loss."""
    beat_s: float = 0.0
    """The adapter's own heartbeat interval, when it was found to beat slower than the broker
    (0: not known, the broker's): its liveness is judged by the longer of the two."""
    missed: bool = False
    """It was lost for missed heartbeats (set by the broker when it removes it)."""

    @property
    def in_flight(self) -> int:
        return len(self.outstanding)

    @property
    def provider(self) -> str:
        return self.hello.provider

    @property
    def capacity(self) -> int:
        return self.hello.max_concurrency

    @property
    def free(self) -> int:
        return self.hello.max_concurrency - len(self.outstanding)


@dataclass
class Roster:
    """Adapters by identity and by provider. ``balance``: ``least_connections`` (default) or
    ``round_robin``."""

    balance: str = "least_connections"
    by_id: dict[bytes, Adapter] = field(default_factory=dict)
    by_provider: dict[str, list[Adapter]] = field(default_factory=dict)
    joined: int = 0
    lost: int = 0
    _rr: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.balance not in ("least_connections", "round_robin"):
            raise ValueError(f"balance must be least_connections or round_robin, got {self.balance!r}")

    def hello(self, identity: bytes, hello: AdapterHello, now: float) -> tuple[Adapter, bool]:
        """Register (or refresh) an adapter; returns (adapter, is_new)."""
        a = self.by_id.get(identity)
        if a is not None:  # (the broker loses an identity reused by another provider first)
            a.hello = hello
            a.last_seen = now
            return a, False
        a = Adapter(identity=identity, hello=hello, last_seen=now)
        self.by_id[identity] = a
        self.by_provider.setdefault(hello.provider, []).append(a)
        self.joined += 1
        return a, True

    def seen(self, identity: bytes, now: float) -> Adapter | None:
        a = self.by_id.get(identity)
        if a is not None:
            a.last_seen = now
        return a

    def remove(self, identity: bytes) -> Adapter | None:
        a = self.by_id.pop(identity, None)
        if a is not None:
            lst = self.by_provider.get(a.provider, [])
            if a in lst:
                lst.remove(a)
            if not lst:
                self.by_provider.pop(a.provider, None)
            self.lost += 1
        return a

    def expired(self, now: float, heartbeat_s: float, liveness: int) -> list[Adapter]:
        """Adapters silent for more than ``liveness`` heartbeats: the broker's ``heartbeat_s``,
        or the adapter's own interval (``beat_s``) when that is longer."""
        return [a for a in self.by_id.values() if now - a.last_seen > liveness * max(heartbeat_s, a.beat_s)]

    def alive(self, provider: str) -> bool:
        return bool(self.by_provider.get(provider))

    def has_free(self, provider: str) -> bool:
        for a in self.by_provider.get(provider, ()):
            if len(a.outstanding) < a.hello.max_concurrency:
                return True
        return False

    def pick(self, provider: str) -> Adapter | None:
        """An adapter of ``provider`` with a free slot, or None."""
        lst = self.by_provider.get(provider)
        if not lst:
            return None
        if self.balance == "round_robin":
            n = len(lst)
            start = self._rr.get(provider, 0)
            for k in range(n):
                a = lst[(start + k) % n]
                if len(a.outstanding) < a.hello.max_concurrency:
                    self._rr[provider] = (start + k + 1) % n
                    return a
            return None
        best = None
        best_n = 0
        for a in lst:
            n = len(a.outstanding)
            if n < a.hello.max_concurrency and (best is None or n < best_n):
                best, best_n = a, n
        return best

    def stats(self) -> dict[str, Any]:
        return {p: {"adapters": len(lst), "in_flight": sum(a.in_flight for a in lst),
                    "capacity": sum(a.capacity for a in lst), "served": sum(a.served for a in lst),
                    "pids": [a.hello.pid for a in lst]}
                for p, lst in self.by_provider.items()}
