"""Batch indicators: the streaming C++ code the agents run, applied to whole arrays.

EMA, RSI (Wilder), MACD and ATR (Wilder) follow TA-Lib's conventions (SMA seeding, the same
lookback, the same order of operations) and equal TA-Lib from its first output on, to rounding
(TA-Lib's C build may contract a multiply-add: a few ulp apart). Values are NaN during warm-up.
Leading NaNs are skipped as TA-Lib's wrapper skips them (the output starts after them, NaN
before): a series from ``pct_change()`` gives values.

A NaN after the first value does not go away; what comes out from there on:

* ``ema``, ``macd`` (all three lines) and ``atr`` (a NaN high or low): NaN at every later
  position, as in TA-Lib; ``ema`` of period 1 is the input itself (NaN where it is), as in
  TA-Lib. A NaN close does not reach ``atr``, as in TA-Lib: the true range's
  comparisons with the previous close pass over it (that bar's and the next one's true range
  is then high - low).
* ``rsi``: NaN at every later position. TA-Lib differs here: its RSI gives 0.0 from the NaN
  on (its gain/loss comparisons are false for NaN), a value that reads as "oversold"; ours
  keeps saying there is no value.
* ``roc``: NaN only where ``x[t]`` or ``x[t-n]`` is NaN, values again in between and after,
  as in TA-Lib (each output reads two inputs, nothing carries over).
* ``ew_bands`` (no TA-Lib counterpart): mean and variance NaN at every later position; the
  Bollinger feature 0.0 there (the agents' neutral reading), not NaN.

An infinity gives what IEEE arithmetic makes of it, the same as TA-Lib (``atr`` stays inf for
good, ``ema`` is inf once then NaN), except ``rsi`` again: NaN where TA-Lib gives 0.0.

Raises ``TypeError`` for an input that is not a 1-d array of numbers (a bool array is none:
``x.astype(float)`` if 0/1 is meant) or a period that is not an int (a float or bool is none),
``ValueError`` for a period outside [1, 100000] or inputs of different lengths.
"""

from __future__ import annotations

import numpy as np

from . import _core
from ._checks import check_int
from .population import MAX_PERIOD

__all__ = ["ema", "rsi", "macd", "atr", "roc", "ew_bands"]

_ind = _core


def _arr(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise TypeError(f"{name} must be 1-dimensional, got shape {a.shape}")
    if a.dtype.kind not in "iuf":  # bool included: a mask passed by mistake, not prices
        hint = " (cast with .astype(float) if 0/1 values are meant)" if a.dtype.kind == "b" else ""
        raise TypeError(f"{name} must hold numbers (int or float), got {a.dtype}{hint}")
    return np.ascontiguousarray(a, dtype=np.float64)


def _n(name: str, n) -> int:
    return check_int(f"period {name}", n, 1, MAX_PERIOD)


def _skip_leading_nan(fn, *xs: np.ndarray):
    """``fn(*xs)`` on the part after the leading rows where any input is NaN, NaN before (the
    output's shape per input row: one array, or a tuple of them)."""
    n = len(xs[0])
    if any(len(x) != n for x in xs):
        raise ValueError(f"inputs of different lengths: {[len(x) for x in xs]}")
    if not n or not any(np.isnan(x[0]) for x in xs):  # the usual case: no pass over the data
        return fn(*xs)
    nan = np.zeros(n, dtype=bool)
    for x in xs:
        nan |= np.isnan(x)
    begin = n if nan.all() else int(np.argmin(nan))  # the first row without a NaN
    part = fn(*(x[begin:] for x in xs))

    def pad(a: np.ndarray) -> np.ndarray:
        out = np.full(n, np.nan)
        out[begin:] = a
        return out

    return tuple(pad(a) for a in part) if isinstance(part, tuple) else pad(part)


def ema(x, n: int) -> np.ndarray:
    """Exponential moving average, seeded with the SMA of the first ``n`` values (lookback n-1)."""
    n = _n("n", n)
    return _skip_leading_nan(lambda a: _ind.ema(a, n), _arr(x, "x"))


def rsi(x, n: int = 14) -> np.ndarray:
    """Wilder's relative strength index in [0, 100] (lookback n)."""
    n = _n("n", n)
    return _skip_leading_nan(lambda a: _ind.rsi(a, n), _arr(x, "x"))


def macd(x, fast: int = 12, slow: int = 26, signal: int = 9) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MACD line, signal line and histogram (lookback slow-1 + signal-1), as TA-Lib's MACD."""
    f, s, g = _n("fast", fast), _n("slow", slow), _n("signal", signal)
    return _skip_leading_nan(lambda a: _ind.macd(a, f, s, g), _arr(x, "x"))


def atr(high, low, close, n: int = 14) -> np.ndarray:
    """Wilder's average true range (lookback n)."""
    n = _n("n", n)
    return _skip_leading_nan(lambda h, lo, c: _ind.atr(h, lo, c, n), _arr(high, "high"), _arr(low, "low"),
                             _arr(close, "close"))


def roc(x, n: int = 10) -> np.ndarray:
    """Rate of change in percent, ``(x / x[t-n] - 1) * 100`` (lookback n), as TA-Lib's ROC."""
    n = _n("n", n)
    return _skip_leading_nan(lambda a: _ind.roc(a, n), _arr(x, "x"))


def ew_bands(x, n: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exponentially weighted mean and variance (alpha = 2/(n+1), seeded with the first value)
    and the agents' Bollinger feature ``soft((x - mean) / (2 sd))``; warm after ``n`` values."""
    n = _n("n", n)
    return _skip_leading_nan(lambda a: _ind.ew_bands(a, n), _arr(x, "x"))
