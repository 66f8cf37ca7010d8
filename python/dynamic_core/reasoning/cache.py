"""Narrative cache: rationales already written, keyed by everything that shaped them.

Exact match only: the key holds the instrument, a coarse regime bucket, the action, the
adapter, the persona, the prompt template version and the digest of the distilled context
(:func:`~dynamic_core.reasoning.prompts.digest`), so a hit is a rationale written from the
same rounded numbers by the same provider with the same prompt. Least recently used entries
are evicted beyond ``size`` entries or ``max_bytes`` bytes (the texts come from providers: a
count alone does not bound the memory); entries older than ``ttl_s`` are misses (and dropped
when seen).
"""

from __future__ import annotations

import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

__all__ = ["DEFAULT_MAX_BYTES", "NarrativeCache", "weigh"]

DEFAULT_MAX_BYTES = 32 << 20
"""Default byte budget of a :class:`NarrativeCache` (32 MiB)."""

_getsizeof = sys.getsizeof


def weigh(obj: Any) -> int:
    """Bytes ``obj`` holds, as :func:`sys.getsizeof` counts them, with the items of a tuple or
    list (one level deep: a cache key or a ``(text, agreeing)`` value)."""
    n = _getsizeof(obj)
    if type(obj) is tuple or type(obj) is list:
        for x in obj:
            n += _getsizeof(x)
    return n


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
    max_bytes : int
        Most bytes held by keys and values together (:func:`weigh`, default
        :data:`DEFAULT_MAX_BYTES`); least recently used entries are evicted beyond it, and a
        value bigger than it on its own is not cached (counted in ``too_big``).

    Notes
    -----
    Not thread-safe: one cache per event loop. ``None`` cannot be cached (it means a miss).
    """

    __slots__ = ("_bytes", "_clock", "_d", "_max_bytes", "_size", "_ttl", "evictions", "expired", "hits",
                 "misses", "too_big")

    def __init__(self, size: int = 4096, ttl_s: float = 300.0, *,
                 clock: Callable[[], float] = time.monotonic, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        if not ttl_s > 0.0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        if not max_bytes >= 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self._d: OrderedDict[Hashable, tuple[Any, float, int]] = OrderedDict()
        self._size = int(size)
        self._ttl = float(ttl_s)
        self._max_bytes = int(max_bytes)
        self._bytes = 0
        self._clock = clock
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.expired = 0
        self.too_big = 0

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
            self._bytes -= entry[2]
            self.expired += 1
            self.misses += 1
            return None
        self._d.move_to_end(key)
        self.hits += 1
        return entry[0]

    def put(self, key: Hashable, value: Any) -> None:
        """Cache ``value`` under ``key`` for ``ttl_s`` (replacing any entry), evicting least
        recently used entries while more than ``size`` entries or ``max_bytes`` bytes are held."""
        if not self._size:
            return
        d = self._d
        old = d.pop(key, None)
        if old is not None:
            self._bytes -= old[2]
        nbytes = weigh(key) + weigh(value)
        if nbytes > self._max_bytes:
            self.too_big += 1
            return
        d[key] = (value, self._clock() + self._ttl, nbytes)
        self._bytes += nbytes
        while len(d) > self._size or self._bytes > self._max_bytes:
            _, (_, _, n) = d.popitem(last=False)
            self._bytes -= n
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
        self._bytes = 0

    def stats(self) -> dict[str, int | float]:
        """``size`` (entries now), ``capacity``, ``bytes`` (held now), ``max_bytes``, ``hits``,
        ``misses``, ``hit_ratio`` (0 before any lookup), ``evictions``, ``expired`` and
        ``too_big``."""
        lookups = self.hits + self.misses
        return {
            "size": len(self._d),
            "capacity": self._size,
            "bytes": self._bytes,
            "max_bytes": self._max_bytes,
            "hits": self.hits,
            "misses": self.misses,
            "hit_ratio": self.hits / lookups if lookups else 0.0,
            "evictions": self.evictions,
            "expired": self.expired,
            "too_big": self.too_big,
        }
