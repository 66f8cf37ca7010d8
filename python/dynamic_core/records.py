"""numpy dtypes of the native records, built from the offsets the C++ side reports."""

from __future__ import annotations

import enum

import numpy as np

from . import _core
from ._checks import as_real, check_real

__all__ = [
    "BAR_DTYPE",
    "GENOME_DTYPE",
    "SIGNAL_DTYPE",
    "SIGNAL_DSI",
    "AGENT_DTYPE",
    "DEAD_LETTER_DTYPE",
    "TICK_DTYPE",
    "LINEAGE_DTYPE",
    "BIRTH_DTYPE",
    "REASONS",
    "MIN_PRICE",
    "MAX_PRICE",
    "Action",
    "score_to_action",
]


def _dtype(name: str) -> np.dtype:
    itemsize, fields = _core.record_layouts()[name]
    return np.dtype(
        {
            "names": [f[0] for f in fields],
            "formats": [f[2] if f[3] == 1 else (f[2], (f[3],)) for f in fields],
            "offsets": [f[1] for f in fields],
            "itemsize": itemsize,
        }
    )


BAR_DTYPE: np.dtype = _dtype("bar")
"""One OHLCV bar: ``ts`` (int64 ns), ``instrument`` (uint32 id), ``timeframe`` (uint32 s), prices."""
GENOME_DTYPE: np.dtype = _dtype("genome")
"""One agent's parameters: periods, feature weights, ``entry``, ``mode``, ``cost_bps``."""
SIGNAL_DTYPE: np.dtype = _dtype("signal")
"""One fused signal per (instrument, timeframe, bar); ``dsi`` is its stream's DSI evidence."""
SIGNAL_DSI: int = int(_core.SIGNAL_DSI)
"""``SIGNAL_DTYPE['flags']`` bit: DSI evidence had been set for the signal's stream."""
AGENT_DTYPE: np.dtype = _dtype("agent")
"""Per-agent state and paper P&L statistics."""
DEAD_LETTER_DTYPE: np.dtype = _dtype("dead_letter")
"""A rejected bar with its batch index and reason code."""
TICK_DTYPE: np.dtype = _dtype("tick")
"""One trade print: ``ts`` (int64 ns), ``instrument`` (uint32 id), ``side`` (aggressor: 0 unknown,
1 buy, 2 sell), ``price``, ``size`` and the quote in force, ``bid``/``ask`` (both 0: no quote)."""

LINEAGE_DTYPE: np.dtype = _dtype("lineage")
"""Lineage of the agent in one population slot: ``agent_id``, ``parent_a``/``parent_b`` (ids;
0xFFFFFFFF for none: founders have neither, a clone no second parent), ``generation`` of birth
(0 for founders) and ``birth_bar`` (bar index of its stream at birth)."""
ADMITTED_DTYPE: np.dtype = _dtype("admitted")
"""A bar admitted for a device backend to run: ``stream`` (index), ``index`` (position in its
batch), ``sidx`` (bar index within the stream) and ``seq`` (ingress sequence number)."""
BIRTH_DTYPE: np.dtype = _dtype("birth")
"""One child of a generation: ``slot`` (population index), ``agent_id``, ``replaced_id``,
parents, ``stream``, ``sm``, ``how`` (bits: 1 crossover, 2 migrant parent, 4 gap spawn,
8 replaced a quarantined agent) and the fitness of the agent it replaced."""

REASONS: tuple[str, ...] = tuple(_core.reason_names())
"""Reject reason names indexed by code (0 is ``ok``). Codes are only ever appended."""
MIN_PRICE: float = float(_core.MIN_PRICE)
"""The smallest price a bar may carry (1e-15); a positive price below it, or above
:data:`MAX_PRICE`, is refused as ``price_out_of_range`` (a unit or scaling error: so small a
price would make the next bar's return overflow and quarantine the stream's agents)."""
MAX_PRICE: float = float(_core.MAX_PRICE)
"""The largest price a bar may carry (1e15)."""


class Action(enum.IntEnum):
    """Discrete view of a score in (-1, 1)."""

    STRONG_SELL = -2
    SELL = -1
    HOLD = 0
    BUY = 1
    STRONG_BUY = 2


def score_to_action(score, weak: float = 0.2, strong: float = 0.6):
    """Map a score in (-1, 1) to an :class:`Action`.

    ``score >= strong`` is STRONG_BUY, ``score >= weak`` BUY, symmetric for sells, HOLD between
    (the engine's own mapping: a sum of the four comparisons, so a scalar and an array agree and
    a NaN score is HOLD). A numpy array (or list) gives an int32 array of action codes.

    A 0-d array is a scalar (its one value gives an :class:`Action`).

    Raises ``ValueError`` unless ``0 <= weak <= strong`` (finite), or for an int score beyond
    float64's range (``10**400``); ``TypeError`` for a score or threshold that is not a number
    (a str or bool is none).
    """
    weak = check_real("weak", weak, 0.0)
    strong = check_real("strong", strong, weak)
    if np.ndim(score) == 0:
        if isinstance(score, np.ndarray):  # np.array(0.5): a scalar, if its dtype is a number's
            if score.dtype.kind not in "iuf":
                raise TypeError(f"score must be a number, got a 0-d array of {score.dtype}")
            score = score[()]
        return Action(_core.score_to_action(as_real("score", score), weak, strong))
    s = np.asarray(score)
    if s.dtype.kind not in "iuf":
        raise TypeError(f"scores must be numbers, got an array of {s.dtype}")
    s = s.astype(np.float64, copy=False)
    out = (s >= strong).astype(np.int32)
    out += s >= weak
    out -= s <= -weak
    out -= s <= -strong
    return out
