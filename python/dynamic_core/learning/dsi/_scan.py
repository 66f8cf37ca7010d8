"""Whole-array helpers of the DSI experts (no Python loop per tick).

The exponentially weighted moments run natively (``dynamic_core._core.ew_moments``,
cpp/dynamic_core/ew.hpp): one pass in time order, each value the recurrence's own arithmetic, so
a batch split anywhere gives the same bits as the whole batch.
"""

from __future__ import annotations

import math

import numpy as np

from ... import _core
from ..._checks import check_int, check_real

__all__ = ["EwMoments", "check_int", "check_real", "prepend", "window_sums"]


def prepend(first, rest: np.ndarray) -> np.ndarray:
    """``rest`` shifted one place later with ``first`` in front, dropping its last element:
    the value *before* each position."""
    out = np.empty_like(rest)
    if len(rest):
        out[0] = first
        out[1:] = rest[:-1]
    return out


def window_sums(x: np.ndarray, w: int, first: int) -> np.ndarray:
    """Sums of ``w`` consecutive values along the last axis of ``x`` (k, n), one per window end
    from ``w - 1`` on: ``out[:, j] = x[:, j:j + w].sum(axis=1)`` up to rounding, (k, n - w + 1).

    Column ``r`` of ``x`` is tick ``first + r`` of the stream, and the rounding depends only on
    the ticks and their numbers, never on where a batch starts: the stream is cut into blocks of
    ``w`` ticks at multiples of ``w`` (van Herk / Gil-Werman), and a window is the sum of the
    block suffix it starts in (added from the right) and the block prefix it ends in (added from
    the left). Nothing outside the window enters its sum, so one huge value cannot swamp later
    windows (differences of one running total lose every small value added after it).
    """
    k, n = x.shape
    f = first % w  # ticks of the first block before x[:, 0]
    nb = -(-(f + n) // w)
    pad = np.zeros((k, nb * w))
    pad[:, f:f + n] = x
    # (w, k, nb): position in the block, series, block. Running sums add one value at a time
    # in order; win takes the block suffixes, then each window starting at position i > 0 adds
    # the next block's prefix up to position i - 1.
    cols = np.ascontiguousarray(pad.reshape(k, nb, w).transpose(2, 0, 1))
    del pad
    if w > k * nb:  # few blocks: numpy's accumulate along the short axis
        win = np.cumsum(cols[::-1], axis=0)[::-1]
        np.add(win[1:, :, :-1], np.cumsum(cols[:-1], axis=0)[:, :, 1:], out=win[1:, :, :-1])
    else:  # the same additions, a whole contiguous row per call
        win = np.empty_like(cols)
        win[-1] = cols[-1]
        for i in range(w - 2, -1, -1):
            np.add(win[i + 1], cols[i], out=win[i])
        pre = cols[0].copy()
        for i in range(1, w):
            np.add(win[i, :, :-1], pre[:, 1:], out=win[i, :, :-1])
            np.add(pre, cols[i], out=pre)
    return win.transpose(1, 2, 0).reshape(k, nb * w)[:, f:f + n - w + 1]


class EwMoments:
    """Exponentially weighted mean and variance of ``k`` series, streamed in batches.

    ``alpha = 2 / (span + 1)``; the first value seeds the mean (variance 0). Updates are
    ``delta = x - mean``, ``mean = (1 - alpha) * mean + alpha * x``, ``var = (1 - alpha) * var +
    (1 - alpha) * alpha * delta**2`` (West's recurrence, pandas' ``ewm(adjust=False)``). ``step`` returns the mean and variance in
    force *before* each value, so a score of a value never includes the value itself.

    A value whose update would make its series' mean or variance non-finite (a finite but huge
    print: ``delta**2`` overflows) is left out: that series' moments stay as they were and
    ``skipped`` counts it, so one bad print cannot disable the series for ever. After
    ``restart_after`` (``ceil(span)``) such values in a row the series restarts from the next
    one (mean = the value, variance 0; counted in ``restarts``): the stream, not the state, has
    moved (e.g. the very first value was the huge one). An infinite value (how a caller marks
    one to leave out, such as a return to or from an absurd print) is always left out and never
    restarts a series. Feeds without such values give the recurrence's bits exactly, however
    they are batched.
    """

    def __init__(self, k: int, span: float) -> None:
        span = float(span)
        if not (math.isfinite(span) and span >= 1):
            raise ValueError(f"span must be a finite number >= 1, got {span!r}")
        self.alpha = 2.0 / (span + 1.0)
        self.mean = np.zeros(k)
        self.var = np.zeros(k)
        self.count = 0
        self.restart_after = max(1, math.ceil(span))
        self.skipped = np.zeros(k, dtype=np.int64)
        """Values left out per series (their update would have overflowed)."""
        self.restarts = np.zeros(k, dtype=np.int64)
        """Restarts per series after ``restart_after`` values in a row were left out."""
        self._streak = np.zeros(k, dtype=np.int64)  # values left out in a row, per series

    def step(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and variance before each row of ``x`` (n, k); the state moves past ``x``."""
        n = len(x)
        if n == 0:
            return np.zeros_like(x), np.zeros_like(x)
        m0 = x[0] if self.count == 0 else self.mean
        mean_before, var_before, mean, var = _core.ew_moments(x, self.alpha, m0, self.var)
        # a non-finite variance stays non-finite: checking the state after the batch is enough
        if not all(map(math.isfinite, mean.tolist() + var.tolist())):
            return self._step_guarded(x, m0)
        self.mean, self.var = mean, var
        self._streak[:] = 0
        self.count += n
        return mean_before, var_before

    def _step_guarded(self, x: np.ndarray, m0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``step`` leaving out the values whose update overflows: native passes over the clean
        stretches (growing, so a batch costs O(n) plus O(64) per bad row), the bad rows one
        value at a time with the kernel's own arithmetic."""
        n, k = x.shape
        a = self.alpha
        r = 1.0 - a
        w = r * a
        mean_before = np.empty_like(x)
        var_before = np.empty_like(x)
        mean = np.array(m0, dtype=np.float64)
        var = self.var.copy()
        pos, width = 0, 64
        while pos < n:
            seg = x[pos:pos + width]
            mb, vb, m1, v1 = _core.ew_moments(seg, a, mean, var)
            after_m = np.concatenate((mb[1:], m1[None]))
            after_v = np.concatenate((vb[1:], v1[None]))
            bad = ~(np.isfinite(after_m) & np.isfinite(after_v)).all(axis=1)
            if not bad.any():
                mean_before[pos:pos + len(seg)] = mb
                var_before[pos:pos + len(seg)] = vb
                mean, var = m1, v1
                self._streak[:] = 0
                pos += len(seg)
                width *= 2
                continue
            t = int(np.argmax(bad))
            mean_before[pos:pos + t + 1] = mb[:t + 1]
            var_before[pos:pos + t + 1] = vb[:t + 1]
            if t:
                self._streak[:] = 0
            mean, var = mb[t].copy(), vb[t].copy()
            for c in range(k):
                xc, m, v = float(seg[t, c]), float(mean[c]), float(var[c])
                delta = xc - m
                m_new = r * m + a * xc  # ew.hpp: step(m, r, a * x)
                v_new = r * v + (w * delta) * delta
                if math.isfinite(m_new) and math.isfinite(v_new):
                    mean[c], var[c] = m_new, v_new
                    self._streak[c] = 0
                elif self._streak[c] >= self.restart_after and math.isfinite(xc):
                    mean[c], var[c] = xc, 0.0
                    self._streak[c] = 0
                    self.restarts[c] += 1
                else:
                    self.skipped[c] += 1
                    self._streak[c] += 1
            pos += t + 1
            width = 64
        self.mean, self.var = mean, var
        self.count += n
        return mean_before, var_before
