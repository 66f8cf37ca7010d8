"""Instrument names to compact ids: ``dc.instruments.id("EURUSD")``, ``dc.instruments.name(0)``."""

from __future__ import annotations

import numbers
import operator
import threading
import unicodedata
from collections.abc import Iterable, Iterator

from ._checks import short_repr
from .errors import UnknownInstrument

__all__ = ["InstrumentRegistry", "UnknownInstrument", "instruments"]

MAX_INSTRUMENTS = 1_000_000
MAX_NAME = 64
# NFC composes at most 4 code points into one (the longest canonical decomposition is 4), so a
# str longer than this is too long after normalisation too: refused before that work
_MAX_RAW_NAME = 4 * MAX_NAME


class InstrumentRegistry:
    """Process-wide, thread-safe map between instrument names and dense uint32 ids.

    Ids are handed out in registration order from 0 and never reused, so an id stays valid for the
    life of the process.
    """

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self._names: list[str] = []
        self._lock = threading.Lock()

    def id(self, name: str) -> int:
        """Id of ``name``, registering it on first use. Names are kept in Unicode NFC form: the
        composed and decomposed spellings of one name (``"CAFÉ"`` typed, or read from a macOS
        file name) are one instrument."""
        if not isinstance(name, str):
            raise TypeError(f"instrument name must be a str, got {type(name).__name__}")
        if len(name) <= _MAX_RAW_NAME:
            i = self._ids.get(name)
            if i is not None:
                return i
            name = _nfc(name)
            i = self._ids.get(name)
            if i is not None:
                return i
        if not name or len(name) > MAX_NAME or not name.isprintable() or name != name.strip():
            # shown whole up to twice the limit (a name a few characters too long), cut beyond
            raise ValueError(f"invalid instrument name {short_repr(name, 2 * MAX_NAME)}: 1-{MAX_NAME} "
                             "printable characters, no padding")
        with self._lock:
            i = self._ids.get(name)
            if i is None:
                if len(self._names) >= MAX_INSTRUMENTS:
                    raise ValueError(f"too many instruments (limit {MAX_INSTRUMENTS})")
                i = len(self._names)
                self._names.append(name)
                self._ids[name] = i
            return i

    def get(self, name: str) -> int | None:
        """Id of ``name`` (in any Unicode normal form) or None, without registering it."""
        if isinstance(name, str) and len(name) > _MAX_RAW_NAME:
            return None  # too long to name an instrument in any normal form: not normalised
        i = self._ids.get(name)
        return i if i is not None or not isinstance(name, str) else self._ids.get(_nfc(name))

    def name(self, i: int) -> str:
        """Name of id ``i``; :class:`UnknownInstrument` (a KeyError) when unknown, ``TypeError``
        for anything but an integer (a float, bool or str is no id)."""
        names = self._names
        if type(i) is int and 0 <= i < len(names):  # the common case, at once
            return names[i]
        if isinstance(i, (bool, str, bytes)) or not hasattr(i, "__index__"):
            raise TypeError(f"an instrument id is an int, got {type(i).__name__}")
        k = operator.index(i)
        if not 0 <= k < len(self._names):
            raise UnknownInstrument(f"unknown instrument id {short_repr(k)}: not registered in "
                                    "dc.instruments")
        return self._names[k]

    def resolve(self, x: str | int) -> int:
        """Id of a name (registering it) or a registered id; :class:`UnknownInstrument` for an
        unregistered id, TypeError for anything but a str or an integer."""
        if isinstance(x, str):
            return self.id(x)
        return self._registered_id(x)

    def lookup(self, x: str | int) -> int:
        """Id of a registered name or id, never registering anything; :class:`UnknownInstrument`
        otherwise."""
        if isinstance(x, str):
            i = self.get(x)
            if i is None:
                raise UnknownInstrument(f"unknown instrument {short_repr(x, 2 * MAX_NAME)}: not registered "
                                        "in dc.instruments")
            return i
        return self._registered_id(x)

    def _registered_id(self, x: object) -> int:
        if isinstance(x, bool):
            raise TypeError("an instrument is a name (str) or an id (int), got bool")
        try:
            i = operator.index(x)
        except TypeError:
            raise TypeError(f"an instrument is a name (str) or an id (int), got {type(x).__name__}") from None
        self.name(i)
        return i

    def resolve_all(self, xs: str | int | Iterable[str | int]) -> list[int]:
        """Ids of ``xs``, each as :meth:`resolve` gives it; a single name or id counts as one
        instrument (``"EURUSD"`` is not six one-letter instruments)."""
        if isinstance(xs, (bytes, bytearray)):
            raise TypeError("instruments: names are str, not bytes")
        if isinstance(xs, (str, numbers.Integral)):
            xs = [xs]
        return [self.resolve(x) for x in xs]

    def names(self) -> list[str]:
        return list(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._ids or (isinstance(name, str) and self.get(name) is not None)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._names))

    def __repr__(self) -> str:
        return f"InstrumentRegistry({self._names!r})"


instruments = InstrumentRegistry()
"""The process-wide registry used by populations, market loaders and engines."""


def _nfc(name: str) -> str:
    return name if name.isascii() else unicodedata.normalize("NFC", name)
