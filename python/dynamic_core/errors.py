"""Typed errors. Each also subclasses the built-in it resembles, so ``except ValueError`` works."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "DynamicCoreError",
    "InvalidInput",
    "InvalidGenome",
    "BackendUnavailable",
    "PayloadError",
    "TransportTimeout",
    "CommandRefused",
    "JournalError",
    "JournalCorrupt",
    "ReplayMismatch",
]


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


class PayloadError(DynamicCoreError, ValueError):
    """A frame that cannot become a payload: oversized, truncated, garbage, an unknown tag or
    field, a schema version this build does not speak, or a value out of range.

    Attributes
    ----------
    reason : str
        One of ``oversized``, ``truncated``, ``malformed``, ``unknown_tag``, ``unknown_field``,
        ``version``, ``invalid`` (a field of the wrong type or out of range) or ``unexpected``
        (a valid payload of a kind this socket does not take). Sockets count rejects by it.
    detail : str
        What the decoder said, with the path of the offending field when there is one.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class TransportTimeout(DynamicCoreError, TimeoutError):
    """No reply within the deadline (e.g. a control request to a server that is down, or that
    refused this client's CURVE key: a refused handshake is silent by design)."""


class JournalError(DynamicCoreError, OSError):
    """A journal that cannot be opened, written or read (missing, not a journal, wrong format)."""


class JournalCorrupt(JournalError):
    """A record whose framing or CRC32C check fails somewhere other than a torn tail.

    Attributes
    ----------
    segment : int
        Index of the segment file holding the bad record.
    offset : int
        Byte offset of the bad record's header within that file.
    """

    def __init__(self, message: str, segment: int = 0, offset: int = 0) -> None:
        super().__init__(message)
        self.segment = segment
        self.offset = offset


class ReplayMismatch(DynamicCoreError, AssertionError):
    """A replayed signal whose hash differs from the one journaled when it was handed out.

    Attributes
    ----------
    mismatches : list[int]
        Sequence numbers of the differing signals.
    """

    def __init__(self, message: str, mismatches: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.mismatches = list(mismatches)


class CommandRefused(DynamicCoreError, ValueError):
    """A well-formed control command that the receiver will not apply (e.g. LoadPopulation while
    running). Control servers reply ``ok=False`` with the message and log no traceback."""
