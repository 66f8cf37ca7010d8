"""Whole-array helpers of the DSI experts (no Python loop per tick).

The exponentially weighted moments run natively (``dynamic_core._core.ew_moments``,
cpp/dynamic_core/ew.hpp): one pass in time order, each value the recurrence's own arithmetic, so
a batch split anywhere gives the same bits as the whole batch.
"""

from __future__ import annotations

import numpy as np

from ... import _core

__all__ = ["EwMoments", "prepend"]


def prepend(first, rest: np.ndarray) -> np.ndarray:
    """``rest`` shifted one place later with ``first`` in front, dropping its last element:
    the value *before* each position."""
    out = np.empty_like(rest)
    if len(rest):
        out[0] = first
        out[1:] = rest[:-1]
    return out


class EwMoments:
    """Exponentially weighted mean and variance of ``k`` series, streamed in batches.

    ``alpha = 2 / (span + 1)``; the first value seeds the mean (variance 0). Updates are
    ``delta = x - mean``, ``mean = (1 - alpha) * mean + alpha * x``, ``var = (1 - alpha) * var +
    (1 - alpha) * alpha * delta**2`` (West's recurrence, pandas' ``ewm(adjust=False)``). ``step`` returns the mean and variance in
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
        m0 = x[0] if self.count == 0 else self.mean
        mean_before, var_before, self.mean, self.var = _core.ew_moments(x, self.alpha, m0, self.var)
        self.count += n
        return mean_before, var_before
