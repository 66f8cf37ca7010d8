"""Typed errors. Each also subclasses the built-in it resembles, so ``except ValueError`` works."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "AdapterError",
    "BackendUnavailable",
    "CommandRefused",
    "DynamicCoreError",
    "EvolutionInterrupted",
    "InsufficientMemory",
    "InvalidGenome",
    "InvalidInput",
    "JournalCorrupt",
    "JournalError",
    "PayloadError",
    "PolicyError",
    "ReasoningError",
    "ReplayMismatch",
    "SecretsError",
    "StateError",
    "TransportTimeout",
    "UnknownInstrument",
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


class InsufficientMemory(DynamicCoreError, MemoryError):
    """Something too large for the memory this machine has available now (a population of
    millions of agents), refused before it was allocated: allocating it anyway swaps or gets the
    process killed by the kernel's out-of-memory killer, with no message at all."""


class UnknownInstrument(DynamicCoreError, ValueError, KeyError):
    """An instrument name or id that is not registered in ``dc.instruments``, or that the
    component asked does not follow. A ``ValueError`` (bad argument) that is also a ``KeyError``
    (what the registry raised before), so either ``except`` keeps working."""

    __str__ = ValueError.__str__  # KeyError's would quote the message


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


class EvolutionInterrupted(DynamicCoreError, RuntimeError):
    """:meth:`dynamic_core.learning.evolution.Evolution.run` failed part-way, after the engine had taken some of the bars.

    The cause is chained (``__cause__``). Nothing the engine produced is lost: resume with
    ``bars[done:]``.

    Attributes
    ----------
    signals : numpy.ndarray of SIGNAL_DTYPE
        The signals of the bars the engine took, as ``run`` would have returned them.
    done : int
        How many leading rows of the batch the engine took; the driver's bar counts cover
        exactly these. Their due generations ran, except a failed one, which comes due again
        on the stream's next bar.
    """

    def __init__(self, message: str, signals: Any, done: int) -> None:
        super().__init__(message)
        self.signals = signals
        self.done = done


class StateError(DynamicCoreError, ValueError):
    """A saved state (a ``state_dict``, or the file it was saved to) that cannot be restored: a
    missing key, a wrong dtype or shape, a value out of range or non-finite, a configuration that
    does not validate, or a size beyond the documented caps. Raised before anything is allocated
    from it; the message names the offending key."""


class CommandRefused(DynamicCoreError, ValueError):
    """A well-formed control command that the receiver will not apply (e.g. LoadPopulation while
    running). Control servers reply ``ok=False`` with the message and log no traceback."""


class ReasoningError(DynamicCoreError, RuntimeError):
    """Base class of the reasoning mesh's errors."""


class AdapterError(ReasoningError):
    """One reasoning attempt failed (an HTTP call, an adapter process, a deadline).

    The message never contains an API key or an ``Authorization`` header: adapters redact
    every secret they know before building it.

    Attributes
    ----------
    kind : str
        ``timeout``, ``rate_limited``, ``server_error``, ``client_error``, ``auth``,
        ``malformed``, ``connection``, ``adapter_lost`` (the process died mid-request),
        ``cancelled`` or ``budget`` (refused by a budget or quota before it was sent).
    status : int | None
        The HTTP status, when there was one.
    retry_after : float | None
        Seconds the server asked to wait (``Retry-After`` of a 429 or 503).
    """

    KINDS = ("timeout", "rate_limited", "server_error", "client_error", "auth", "malformed", "connection",
             "adapter_lost", "cancelled", "budget")

    def __init__(self, kind: str, message: str = "", *, status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{kind}: {message}" if message else kind)
        self.kind = kind
        self.status = status
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        """Worth another attempt at the same provider (after a backoff)."""
        return self.kind in ("timeout", "rate_limited", "server_error", "connection", "malformed")


class SecretsError(ReasoningError, PermissionError):
    """A secrets file that may not be read: readable by group or others (must be 0600), not a
    regular file, or not parseable. The message names the file, never its contents."""


class PolicyError(ReasoningError, ValueError):
    """A routing-policy or provider configuration that cannot be used (unknown provider, bad
    field, a TOML syntax error); the message says where."""
