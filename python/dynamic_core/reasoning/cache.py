"""Narrative cache: rationales already written, keyed by everything that shaped them.

Exact match only: the key holds the instrument, a coarse regime bucket, the action, the
adapter, the persona, the prompt template version and the digest of the distilled context
(:func:`~dynamic_core.reasoning.prompts.digest`), so a hit is a rationale written from the
same rounded numbers by the same provider with the same prompt. Least recently used entries
are evicted beyond ``size``; entries older than ``ttl_s`` are misses (and dropped when seen).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

__all__ = ["NarrativeCache"]


class NarrativeCache:
    """LRU + TTL cache of rationales (an ``OrderedDict``; O(1) get and put).

    Parameters
    ----------
    size : int
        Most entries kept; 0 disables caching (``get`` always misses, ``put`` does nothing).
    ttl_s : float
        Seconds an entry stays valid after its ``put``.
    clock : callable
        Monotonic seconds (tests drive it).

    Notes
    -----
    Not thread-safe: one cache per event loop. ``None`` cannot be cached (it means a miss).
    """

    __slots__ = ("_clock", "_d", "_size", "_ttl", "evictions", "expired", "hits", "misses")

    def __init__(self, size: int = 4096, ttl_s: float = 300.0, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        if not ttl_s > 0.0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self._d: OrderedDict[Hashable, tuple[Any, float]] = OrderedDict()
        self._size = int(size)
        self._ttl = float(ttl_s)
        self._clock = clock
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.expired = 0

    @staticmethod
    def make_key(instrument: str, regime: str, action: int, adapter: str, persona: str,
                 template_version: int | str, digest: str) -> tuple[Any, ...]:
        """The cache key of one rationale (a plain tuple: cheap to hash and compare)."""
        return (instrument, regime, action, adapter, persona, template_version, digest)

    def get(self, key: Hashable) -> Any | None:
        """The value cached under ``key``, or ``None`` (missing or expired: both count as a
        miss; an expired entry is dropped and counted in ``expired``)."""
        entry = self._d.get(key)
        if entry is None:
            self.misses += 1
            return None
        if self._clock() >= entry[1]:
            del self._d[key]
            self.expired += 1
            self.misses += 1
            return None
        self._d.move_to_end(key)
        self.hits += 1
        return entry[0]

    def put(self, key: Hashable, value: Any) -> None:
        """Cache ``value`` under ``key`` for ``ttl_s`` (replacing any entry), evicting the least
        recently used entry when full."""
        if not self._size:
            return
        d = self._d
        d[key] = (value, self._clock() + self._ttl)
        d.move_to_end(key)
        if len(d) > self._size:
            d.popitem(last=False)
            self.evictions += 1

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key: Hashable) -> bool:
        """Present and not expired (does not count as a hit or miss, nor refresh the entry)."""
        entry = self._d.get(key)
        return entry is not None and self._clock() < entry[1]

    def clear(self) -> None:
        """Drop every entry (the counters stay)."""
        self._d.clear()

    def stats(self) -> dict[str, int | float]:
        """``size`` (entries now), ``capacity``, ``hits``, ``misses``, ``hit_ratio`` (0 before
        any lookup), ``evictions`` and ``expired``."""
        lookups = self.hits + self.misses
        return {
            "size": len(self._d),
            "capacity": self._size,
            "hits": self.hits,
            "misses": self.misses,
            "hit_ratio": self.hits / lookups if lookups else 0.0,
            "evictions": self.evictions,
            "expired": self.expired,
        }
