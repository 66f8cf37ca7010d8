"""argparse types shared by the command lines (``dynamic-core`` and its subcommands).

Each raises :class:`argparse.ArgumentTypeError`, so argparse reports ``argument --X: ...`` and
exits with status 2. No heavy imports: the subcommand modules import this at load time.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

__all__ = ["count", "int_range", "nonnegative_float", "positive_float", "positive_int", "seed"]


def int_range(low: int, high: int | None = None, *, span: str | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number in ``low..high`` (``high`` None: no upper bound).
    ``span`` words the range in the error (default ``>= low`` or ``low..high``)."""
    span = span or (f">= {low}" if high is None else f"{low}..{high}")

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if v < low or (high is not None and v > high):
            raise argparse.ArgumentTypeError(f"must be {span}, got {v}")
        return v

    return parse


positive_int = int_range(1)
count = int_range(0)
"""A whole number >= 0 (0: off)."""
seed = int_range(0, 2**64 - 1, span="0..2**64-1")
"""A seed: a whole number in [0, 2**64), the range every seeded component takes."""


def _finite(text: str, *, zero: bool) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(v) and (v > 0 or (zero and v == 0))):
        raise argparse.ArgumentTypeError(f"must be a finite number {'>=' if zero else '>'} 0, got {text!r}")
    return v


def positive_float(text: str) -> float:
    """A finite number > 0 (NaN and inf refused: a NaN duration or timeout compares false with
    everything, so it would never expire)."""
    return _finite(text, zero=False)


def nonnegative_float(text: str) -> float:
    """A finite number >= 0."""
    return _finite(text, zero=True)
