"""Typed errors. Each also subclasses the built-in it resembles, so ``except ValueError`` works."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["DynamicCoreError", "InvalidInput", "InvalidGenome", "BackendUnavailable"]


class DynamicCoreError(Exception):
    """Base class of every error raised by dynamic_core."""


class InvalidInput(DynamicCoreError, ValueError):
    """Market data that strict mode refuses.

    Attributes
    ----------
    rows : list[int]
        Indices of the offending records in the batch (all of them, not only those named in the
        message).
    reasons : list[str]
        Reason name of each offending row.
    """

    def __init__(self, message: str, rows: Sequence[int] = (), reasons: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.rows = list(rows)
        self.reasons = list(reasons)


class InvalidGenome(DynamicCoreError, ValueError):
    """Population records that cannot run (bad period, non-finite weight, unknown mode...).

    Attributes
    ----------
    rows : list[int]
        Indices of the offending genomes.
    """

    def __init__(self, message: str, rows: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.rows = list(rows)


class BackendUnavailable(DynamicCoreError, RuntimeError):
    """The requested execution backend cannot run on this machine."""
