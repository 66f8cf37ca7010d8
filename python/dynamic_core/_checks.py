"""Argument checks shared across the package: an int or a finite real within bounds, TypeError for
the wrong type and ValueError naming the argument when out of range. Imports numpy only."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["check_int", "check_real", "is_int", "is_real"]


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
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {i}")
    return i


def is_real(v: object) -> bool:
    """A real number: an int or float, numpy's included, but no bool (nor a str or complex,
    whatever ``float()`` makes of them)."""
    return not isinstance(v, (bool, np.bool_)) and isinstance(v, (int, float, np.integer, np.floating))


def check_real(name: str, v: object, lo: float = -math.inf, hi: float = math.inf, *,
               lo_open: bool = False) -> float:
    """``v`` as a finite float in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``): TypeError for a
    non-number, ValueError naming ``name`` for NaN, an infinity or a value out of range."""
    if not is_real(v):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    try:
        x = float(v)
    except OverflowError:
        x = math.inf
    if not (math.isfinite(x) and (x > lo if lo_open else x >= lo) and x <= hi):
        bound = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise ValueError(f"{name} must be a finite number in {bound}, got {v!r}")
    return x
