"""MicroTape: each trade print as one small-integer token.

A token packs four readings of a tick, each relative to the instrument's own recent tape:

``direction``  flat / up / down against the previous trade price;
``size``       small / normal / large / block: the size against the exponentially weighted mean
               size *before* the tick (edges ``size_edges``, default 0.5x, 2x, 5x);
``spread``     tight / wide / blown: the quoted spread against its EW mean before the tick (edges
               ``spread_edges``, default 1.25x, 2.5x); a tick without a quote carries the last
               known spread, and before any quote the spread is tight;
``aggressor``  unknown / buy / sell: the venue's side when given, else the quote rule (at or
               through the ask is a buy, at or through the bid a sell, otherwise the side of the
               mid), else the tick rule (an up-tick is a buy).

``token = direction + 3 * (size + 4 * (spread + 3 * aggressor))``, so there are 108 tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._scan import EwMoments, check_real, prepend

__all__ = [
    "AGGRESSORS",
    "DIRECTIONS",
    "N_TOKENS",
    "SIZES",
    "SPREADS",
    "MicroTape",
    "Tape",
    "decode",
    "encode",
    "token_name",
]

DIRECTIONS = ("flat", "up", "down")
SIZES = ("small", "normal", "large", "block")
SPREADS = ("tight", "wide", "blown")
AGGRESSORS = ("unknown", "buy", "sell")
N_TOKENS = len(DIRECTIONS) * len(SIZES) * len(SPREADS) * len(AGGRESSORS)


def encode(direction, size, spread, aggressor):
    """Token(s) from class indices (``direction`` 0 flat, 1 up, 2 down; ``aggressor`` 0, 1 buy,
    2 sell). Arrays give a uint8 array."""
    tok = np.asarray(direction) + 3 * (np.asarray(size) + 4 * (np.asarray(spread) + 3 * np.asarray(aggressor)))
    return tok.astype(np.uint8) if np.ndim(tok) else int(tok)


def decode(token: int) -> tuple[int, int, int, int]:
    """``(direction, size, spread, aggressor)`` class indices of a token."""
    t = int(token)
    if not 0 <= t < N_TOKENS:
        raise ValueError(f"token must be in [0, {N_TOKENS}), got {t}")
    return t % 3, (t // 3) % 4, (t // 12) % 3, t // 36


def token_name(token: int) -> str:
    """``"up/large/tight/buy"``."""
    d, s, sp, a = decode(token)
    return f"{DIRECTIONS[d]}/{SIZES[s]}/{SPREADS[sp]}/{AGGRESSORS[a]}"


class Tape(NamedTuple):
    """One instrument's batch on the tape; every field has one entry per tick."""

    move: np.ndarray       # int8: +1 up-tick, -1 down-tick, 0 flat (or the instrument's first tick)
    aggressor: np.ndarray  # int8: +1 buy, -1 sell, 0 unknown
    size_class: np.ndarray  # uint8 index into SIZES
    spread_class: np.ndarray  # uint8 index into SPREADS
    token: np.ndarray      # uint8 MicroTape token
    prev_price: np.ndarray  # trade price before the tick (NaN for the instrument's first)
    spread: np.ndarray     # quoted spread in force (NaN before any quote)
    size_ref: np.ndarray   # EW mean size before the tick (the size class's yardstick)


def _edges(name: str, edges: tuple[float, ...], k: int) -> tuple[float, ...]:
    if isinstance(edges, (str, bytes)) or len(edges) != k:
        raise ValueError(f"{name}: {k} increasing finite multiples")
    out = tuple(check_real(f"{name}[{i}]", e, 0.0) for i, e in enumerate(edges))
    if list(out) != sorted(out):
        raise ValueError(f"{name}: {k} increasing finite multiples, got {edges!r}")
    return out


def _classes(ratio: np.ndarray, edges: tuple[float, ...]) -> np.ndarray:
    out = np.zeros(len(ratio), dtype=np.uint8)
    for e in edges:
        out += ratio >= e
    return out


class MicroTape:
    """Streaming tokeniser of one instrument's trade prints.

    Parameters
    ----------
    span : float
        Span (in ticks) of the EW means of size and spread that the size and spread classes
        are measured against.
    size_edges, spread_edges : tuple of float
        Class edges as multiples of those means (increasing).
    """

    def __init__(self, *, span: float = 200.0, size_edges: tuple[float, ...] = (0.5, 2.0, 5.0),
                 spread_edges: tuple[float, ...] = (1.25, 2.5)) -> None:
        self.size_edges = _edges("size_edges", size_edges, len(SIZES) - 1)
        self.spread_edges = _edges("spread_edges", spread_edges, len(SPREADS) - 1)
        self._moments = EwMoments(2, check_real("span", span, 1.0))
        self.last_price = np.nan
        self.last_spread = np.nan
        self.count = 0

    def step(self, price: np.ndarray, size: np.ndarray, bid: np.ndarray, ask: np.ndarray,
             side: np.ndarray, *, means=None) -> Tape:
        """Tokens of a batch of one instrument's (valid, time-ordered) ticks.

        ``means``, optional: a callable ``(size, spread, prev_price) -> (n, >=2) array`` giving the
        EW mean size and spread before each tick, used instead of the tape's own (the Dsi passes
        its anomaly scorer, which keeps the same means, so they are computed once). ``spread``
        is 0 before the first quote.
        """
        n = len(price)
        prev = prepend(self.last_price, price)
        move = (price > prev).astype(np.int8)
        move -= price < prev  # NaN (no previous trade) compares false: flat

        # spread in force: the quote's, else the last known one
        quoted = (bid != 0) | (ask != 0)
        spread = np.where(quoted, ask - bid, np.nan)
        if not quoted.all():
            last = np.where(quoted, np.arange(n), -1)
            np.maximum.accumulate(last, out=last)
            spread = np.where(last >= 0, spread[np.maximum(last, 0)], self.last_spread)

        aggressor = np.zeros(n, dtype=np.int8)
        aggressor[side == 1] = 1
        aggressor[side == 2] = -1
        unknown = side == 0
        if unknown.any():
            mid = 0.5 * (bid + ask)
            rule = np.where(quoted, np.sign(price - mid), 0).astype(np.int8)
            rule[quoted & (price >= ask)] = 1
            rule[quoted & (price <= bid)] = -1
            rule = np.where(rule == 0, move, rule)
            aggressor[unknown] = rule[unknown]

        x = np.empty((n, 2))
        x[:, 0] = size
        x[:, 1] = np.where(np.isnan(spread), 0.0, spread)
        if means is None:
            mean, _ = self._moments.step(x)
        else:
            mean = means(size, x[:, 1], prev)
        with np.errstate(divide="ignore", invalid="ignore"):
            size_ratio = np.where(mean[:, 0] > 0, size / mean[:, 0], 1.0)
            spread_ratio = np.where(mean[:, 1] > 0, x[:, 1] / mean[:, 1], 0.0)
        size_class = _classes(size_ratio, self.size_edges)
        spread_class = _classes(spread_ratio, self.spread_edges)
        direction = np.where(move < 0, 2, move).astype(np.uint8)
        agg_class = np.where(aggressor < 0, 2, aggressor).astype(np.uint8)
        token = direction + 3 * (size_class + 4 * (spread_class + 3 * agg_class))
        if n:
            self.last_price = float(price[-1])
            self.last_spread = float(spread[-1])
            self.count += n
        return Tape(move, aggressor, size_class, spread_class, token.astype(np.uint8), prev, spread, mean[:, 0])
