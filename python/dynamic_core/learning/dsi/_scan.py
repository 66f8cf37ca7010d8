"""Whole-array forms of the sequential updates the DSI experts need (no Python loop per tick).

``ew_filter`` solves ``y[t] = r * y[t-1] + x[t]`` as ``r**(t+1) * (y0 + cumsum(x[j] * r**-(j+1)))``
over chunks short enough that ``r**-j`` stays far from overflow; the rounding error stays at the
scale of the exponentially weighted sum of ``|x|``, as in the sequential loop.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["EwMoments", "ew_filter", "prepend", "run_start_index"]

_LOG_LIMIT = 600.0  # chunk so that r**-(j+1) <= e**600 (float64 overflows past e**709)
_POW_CACHE: dict[float, tuple[np.ndarray, np.ndarray]] = {}


def _powers(r: float, m: int) -> tuple[np.ndarray, np.ndarray]:
    got = _POW_CACHE.get(r)
    if got is None or len(got[0]) < m:
        cap = max(1, int(_LOG_LIMIT / -math.log(r)))
        k = np.arange(1, min(max(m, 1024), cap) + 1, dtype=np.float64)
        got = (np.power(r, k), np.power(r, -k))
        if len(_POW_CACHE) > 64:
            _POW_CACHE.clear()
        _POW_CACHE[r] = got
    return got


def ew_filter(x: np.ndarray, r: float, y0: float | np.ndarray) -> np.ndarray:
    """``y[t] = r * y[t-1] + x[t]`` with ``y[-1] = y0``, along axis 0 (``x`` 1-d or 2-d)."""
    n = len(x)
    out = np.empty_like(x, dtype=np.float64)
    if n == 0:
        return out
    if not 0.0 < r < 1.0:
        raise ValueError(f"decay must be in (0, 1), got {r}")
    chunk = max(1, int(_LOG_LIMIT / -math.log(r)))
    pos, neg = _powers(r, min(n, chunk))
    two = x.ndim == 2
    y = np.asarray(y0, dtype=np.float64)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        m = b - a
        up, down = (pos[:m, None], neg[:m, None]) if two else (pos[:m], neg[:m])
        seg = out[a:b]
        np.multiply(x[a:b], down, out=seg)
        np.cumsum(seg, axis=0, out=seg)
        seg += y
        seg *= up
        y = seg[-1].copy()
    return out


def prepend(first, rest: np.ndarray) -> np.ndarray:
    """``rest`` shifted one place later with ``first`` in front, dropping its last element:
    the value *before* each position."""
    out = np.empty_like(rest)
    if len(rest):
        out[0] = first
        out[1:] = rest[:-1]
    return out


def run_start_index(flag: np.ndarray) -> np.ndarray:
    """For each position, the index of the latest ``True`` in ``flag`` at or before it (-1: none)."""
    idx = np.where(flag, np.arange(len(flag)), -1)
    return np.maximum.accumulate(idx) if len(idx) else idx


class EwMoments:
    """Exponentially weighted mean and variance of ``k`` series, streamed in batches.

    ``alpha = 2 / (span + 1)``; the first value seeds the mean (variance 0). Updates are
    ``delta = x - mean``, ``mean += alpha * delta``, ``var = (1 - alpha) * (var + alpha * delta**2)``
    (West's recurrence, pandas' ``ewm(adjust=False)``). ``step`` returns the mean and variance in
    force *before* each value, so a score of a value never includes the value itself.
    """

    def __init__(self, k: int, span: float) -> None:
        if span < 1:
            raise ValueError("span must be >= 1")
        self.alpha = 2.0 / (span + 1.0)
        self.mean = np.zeros(k)
        self.var = np.zeros(k)
        self.count = 0

    def step(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and variance before each row of ``x`` (n, k); the state moves past ``x``."""
        n = len(x)
        if n == 0:
            return np.zeros_like(x), np.zeros_like(x)
        a = self.alpha
        m0 = x[0] if self.count == 0 else self.mean
        mean = ew_filter(a * x, 1.0 - a, m0)
        mean_before = np.empty_like(mean)
        mean_before[0] = m0
        mean_before[1:] = mean[:-1]
        delta = x - mean_before
        var = ew_filter((1.0 - a) * a * delta * delta, 1.0 - a, self.var)
        var_before = np.empty_like(var)
        var_before[0] = self.var
        var_before[1:] = var[:-1]
        self.mean = mean[-1].copy()
        self.var = var[-1].copy()
        self.count += n
        return mean_before, var_before
