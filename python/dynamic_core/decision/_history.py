"""Bounded history: the latest items of a growing list, the oldest dropped a chunk at a time."""

from __future__ import annotations

from typing import Any

_UNBOUNDED = 2**63 - 1


class _History(list):
    """A list that keeps its latest ``keep`` items (None: all): once it is a chunk (``keep // 8``,
    at least 1) longer, :meth:`append` cuts it back to ``keep`` -- amortised O(1) per append.
    ``dropped`` counts what was cut, :attr:`total` every item appended (dropped included), and
    :meth:`since` reads the items by that running count. Only :meth:`append` trims."""

    __slots__ = ("_at", "dropped", "keep")

    def __init__(self, keep: int | None) -> None:
        super().__init__()
        self.keep = k = keep if keep is not None else _UNBOUNDED
        self._at = k + max(1, k // 8)
        self.dropped = 0

    def append(self, item: Any) -> None:
        list.append(self, item)
        if len(self) > self._at:
            drop = len(self) - self.keep
            del self[:drop]
            self.dropped += drop

    @property
    def total(self) -> int:
        """Items appended so far, dropped ones included."""
        return len(self) + self.dropped

    def since(self, n: int) -> list:
        """The items after the first ``n`` of :attr:`total`, as far as they are kept (a plain list)."""
        return self[max(0, n - self.dropped):]
