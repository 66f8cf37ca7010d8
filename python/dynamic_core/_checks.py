"""Argument checks shared across the package: an int or a finite real within bounds, TypeError for
the wrong type and ValueError naming the argument when out of range; and :func:`short_repr`, to
show a value in a message without echoing all of a huge one. Imports numpy only."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["as_real", "check_int", "check_real", "is_int", "is_real", "short_repr"]

SHORT = 40
"""The most characters of a value :func:`short_repr` shows."""


def is_int(v: object) -> bool:
    """An integer: an int, numpy's included, but no bool (nor a float, whatever its value), as
    msgspec decodes an int field."""
    return not isinstance(v, bool) and isinstance(v, (int, np.integer))


def check_int(name: str, v: object, lo: int, hi: int) -> int:
    """``v`` as an int in ``[lo, hi]``: TypeError for a non-integer (bool and float included,
    as msgspec decodes an int field), ValueError naming ``name`` when out of range (a C++ cast
    would wrap it)."""
    if not is_int(v):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    i = int(v)
    if not lo <= i <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {short_repr(i)}")
    return i


def is_real(v: object) -> bool:
    """A real number: an int or float, numpy's included, but no bool (nor a str or complex,
    whatever ``float()`` makes of them)."""
    return not isinstance(v, (bool, np.bool_)) and isinstance(v, (int, float, np.integer, np.floating))


def as_real(name: str, v: object) -> float:
    """``v`` as a float, NaN and infinities included: TypeError for a non-number (see
    :func:`is_real`), ValueError naming ``name`` for an int beyond float64's range (``float()``
    raised OverflowError)."""
    if not is_real(v):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    try:
        return float(v)
    except OverflowError:
        raise ValueError(f"{name} {short_repr(v)} is out of range: beyond a float64 (about ±1.8e308)"
                         ) from None


def check_real(name: str, v: object, lo: float = -math.inf, hi: float = math.inf, *,
               lo_open: bool = False) -> float:
    """``v`` as a finite float in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``): TypeError for a
    non-number, ValueError naming ``name`` for NaN, an infinity or a value out of range."""
    try:
        x = as_real(name, v)
    except ValueError:  # an int beyond float64: out of any finite range, said as for the others
        x = math.inf
    if not (math.isfinite(x) and (x > lo if lo_open else x >= lo) and x <= hi):
        bound = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise ValueError(f"{name} must be a finite number in {bound}, got {short_repr(v)}")
    return x


def short_repr(v: object, limit: int = SHORT) -> str:
    """``repr(v)`` for an error message, cut to its first ``limit`` characters plus ``...`` and
    its full length when longer: a message never echoes a megabyte of input. An int too long for
    ``str()`` (over 4300 digits: Python refuses, with a ValueError of its own) is named by its
    size; a long str is cut before ``repr`` (no copy of all of it)."""
    if isinstance(v, str):
        return repr(v) if len(v) <= limit else f"{v[:limit]!r}... ({len(v):,} characters)"
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 4 * limit:
        digits = int(v.bit_length() * math.log10(2)) + 1
        return f"{'a negative' if v < 0 else 'an'} int of about {digits:,} digits"
    try:
        r = repr(v)
    except Exception:  # noqa: BLE001 - a repr that fails (an int too long, a broken object)
        return f"a {type(v).__name__}"
    return r if len(r) <= limit else f"{r[:limit]}... ({len(r):,} characters)"
