"""An independent plain-Python reference of the micro-agent semantics.

Indicator values come from TA-Lib (EMA, RSI, MACD, ATR, ROC) and a plain loop (EW bands); the
agent logic is a per-agent Python loop written from the specification, not from the C++ code.
"""

from __future__ import annotations

import math

import numpy as np
import talib


def soft(x: float) -> float:
    return x / (1.0 + abs(x))


def action_of(s: float) -> int:
    if s >= 0.6:
        return 2
    if s >= 0.2:
        return 1
    if s <= -0.6:
        return -2
    if s <= -0.2:
        return -1
    return 0


def ew_bands(close: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    alpha = 2.0 / (n + 1)
    mean = np.full(len(close), np.nan)
    var = np.full(len(close), np.nan)
    m, v = close[0], 0.0
    for i, x in enumerate(close):
        if i > 0:
            d = x - m
            m = m + alpha * d
            v = (1 - alpha) * (v + alpha * d * d)
        if i >= n - 1:
            mean[i], var[i] = m, v
    return mean, var


def features(g, o: np.ndarray, h: np.ndarray, l: np.ndarray, c: np.ndarray):
    """Per-bar feature vectors (NaN where an used indicator is cold) and the warm-up index."""
    nbar = len(c)
    f = np.zeros((nbar, 5))
    warm_from = 0
    if g["w_trend"] != 0:
        ef = talib.EMA(c, int(g["fast"])) if g["fast"] > 1 else c.copy()
        es = talib.EMA(c, int(g["slow"])) if g["slow"] > 1 else c.copy()
        atr = talib.ATR(h, l, c, int(g["atr_period"]))
        warm_from = max(warm_from, int(g["fast"]) - 1, int(g["slow"]) - 1, int(g["atr_period"]))
        with np.errstate(invalid="ignore", divide="ignore"):
            f[:, 0] = [0.0 if a == 0 else soft((x - y) / a) for x, y, a in zip(ef, es, atr)]
    if g["w_rsi"] != 0:
        r = talib.RSI(c, int(g["rsi_period"]))
        warm_from = max(warm_from, int(g["rsi_period"]))
        f[:, 1] = (r - 50.0) / 50.0
    if g["w_macd"] != 0:
        _, _, hist = talib.MACD(c, int(g["macd_fast"]), int(g["macd_slow"]), int(g["macd_signal"]))
        atr = talib.ATR(h, l, c, int(g["atr_period"]))
        lb = max(int(g["macd_fast"]), int(g["macd_slow"])) - 1 + int(g["macd_signal"]) - 1
        warm_from = max(warm_from, lb, int(g["atr_period"]))
        f[:, 2] = [0.0 if a == 0 else soft(x / a) for x, a in zip(hist, atr)]
    if g["w_bb"] != 0:
        m, v = ew_bands(c, int(g["bb_period"]))
        warm_from = max(warm_from, int(g["bb_period"]) - 1)
        sd = np.sqrt(np.where(v > 0, v, 0.0))
        f[:, 3] = [0.0 if s == 0 else soft((x - mm) / (2.0 * s)) for x, mm, s in zip(c, m, sd)]
    if g["w_mom"] != 0:
        r = talib.ROC(c, int(g["mom_period"]))
        warm_from = max(warm_from, int(g["mom_period"]))
        f[:, 4] = [soft(x) for x in r]
    return f, warm_from


def run_agent(g, o, h, l, c, dsi=None) -> dict:
    """Final state of one agent over one instrument's bars; ``dsi[t]``: the DSI evidence of its
    instrument in effect at bar t (read through ``w_dsi``; none: 0)."""
    f, warm_from = features(g, o, h, l, c)
    w = [g["w_trend"], g["w_rsi"], g["w_macd"], g["w_bb"], g["w_mom"]]
    cost = g["cost_bps"] * 1e-4
    entry = g["entry"]
    long_short = g["mode"] == 1
    equity, entry_eq, peak, max_dd = 1.0, 1.0, 1.0, 0.0
    pos, trades, wins, n_ret, ret_sum, ret_sq = 0, 0, 0, 0, 0.0, 0.0
    score = 0.0
    for t in range(len(c)):
        warm = t >= warm_from
        x = 0.0
        for k in range(5):
            fk = f[t, k] if warm else 0.0
            x = x + w[k] * (0.0 if math.isnan(fk) else fk)
        d = g["w_dsi"] * dsi[t] if dsi is not None and g["kind"] == 0 else 0.0
        if d != 0.0:
            x = x + d
        s = soft(x)
        ret = c[t] / c[t - 1] - 1.0 if t > 0 else 0.0
        growth = 1.0 + pos * ret
        e = equity * growth
        if not warm:
            new = 0
        elif s > entry:
            new = 1
        elif s < -entry:
            new = -1 if long_short else 0
        else:
            new = pos
        ch = abs(new - pos) * cost
        e = e - e * ch
        if warm:
            r = growth * (1.0 - ch) - 1.0
            ret_sum += r
            ret_sq += r * r
            n_ret += 1
        if pos != 0 and new != pos:
            trades += 1
            wins += e > entry_eq
        if new != 0 and new != pos:
            entry_eq = e
        peak = max(peak, e)
        max_dd = max(max_dd, (peak - e) / peak)
        equity, pos, score = e, new, s
    return dict(equity=equity, position=pos, trades=trades, wins=wins, max_drawdown=max_dd,
                n_returns=n_ret, score=score, action=action_of(score), peak=peak,
                ret_mean=ret_sum / n_ret if n_ret else 0.0)
