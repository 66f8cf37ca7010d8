"""Batch indicators: the streaming C++ code the agents run, applied to whole arrays.

EMA, RSI (Wilder), MACD and ATR (Wilder) follow TA-Lib's conventions (SMA seeding, the same
lookback, the same arithmetic) and equal TA-Lib from its first output on. Values are NaN during
warm-up.
"""

from __future__ import annotations

import numpy as np

from . import _core

__all__ = ["ema", "rsi", "macd", "atr", "roc", "ew_bands"]

_ind = _core


def _arr(x, name: str) -> np.ndarray:
    a = np.ascontiguousarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise TypeError(f"{name} must be 1-dimensional, got shape {a.shape}")
    return a


def ema(x, n: int) -> np.ndarray:
    """Exponential moving average, seeded with the SMA of the first ``n`` values (lookback n-1)."""
    return _ind.ema(_arr(x, "x"), int(n))


def rsi(x, n: int = 14) -> np.ndarray:
    """Wilder's relative strength index in [0, 100] (lookback n)."""
    return _ind.rsi(_arr(x, "x"), int(n))


def macd(x, fast: int = 12, slow: int = 26, signal: int = 9) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MACD line, signal line and histogram (lookback slow-1 + signal-1), as TA-Lib's MACD."""
    return _ind.macd(_arr(x, "x"), int(fast), int(slow), int(signal))


def atr(high, low, close, n: int = 14) -> np.ndarray:
    """Wilder's average true range (lookback n)."""
    return _ind.atr(_arr(high, "high"), _arr(low, "low"), _arr(close, "close"), int(n))


def roc(x, n: int = 10) -> np.ndarray:
    """Rate of change in percent, ``(x / x[t-n] - 1) * 100`` (lookback n), as TA-Lib's ROC."""
    return _ind.roc(_arr(x, "x"), int(n))


def ew_bands(x, n: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exponentially weighted mean and variance (alpha = 2/(n+1), seeded with the first value)
    and the agents' Bollinger feature ``soft((x - mean) / (2 sd))``; warm after ``n`` values."""
    return _ind.ew_bands(_arr(x, "x"), int(n))
