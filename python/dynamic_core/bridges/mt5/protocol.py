"""The MetaTrader 5 bridge protocol: flat JSON messages between the engine and the EA.

One ZeroMQ message = one frame = one JSON object (UTF-8), at most :data:`MAX_FRAME` bytes. The
engine binds a ROUTER, the EA connects a DEALER; nothing else is on the wire (no empty delimiter
frame, no topic). Every object is FLAT: keys map to strings, integers, floats or booleans only,
and every field of a message type is always present, so a small MQL5 JSON parser reads it with
fixed code. The full specification, with examples and the rules the EA must follow, is
``docs/mt5-bridge.md``; this module is its executable form.

Every message carries::

    type   message tag ("order", "ack", ...)
    v      protocol version (:data:`PROTOCOL_VERSION`); a receiver refuses any other value
    epoch  the SENDER's session epoch: random in [1, 2**63 - 1], new at every start
    seq    the sender's sequence number in this epoch and direction: 1, 2, 3, ...
    ts     the sender's wall clock, milliseconds since 1970-01-01 UTC

Times (``ts``, ``valid_until``, ``fill_ts``) are integer milliseconds since the Unix epoch, UTC.
Volumes are lots, prices are in the symbol's quote currency, money in the account currency.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from typing import Annotated, Any, Literal

import msgspec

from ...errors import PayloadError
from ...payloads import Codec

__all__ = [
    "MAX_FRAME",
    "MAX_HEARTBEAT_MS",
    "MAX_ID",
    "MAX_MISSED",
    "PROTOCOL_VERSION",
    "Ack",
    "Cancel",
    "EngineHello",
    "EngineMessage",
    "Error",
    "ExecReport",
    "Flatten",
    "Heartbeat",
    "MT5Codec",
    "Order",
    "Position",
    "PositionsEnd",
    "PositionsQuery",
    "TerminalHello",
    "TerminalMessage",
    "client_order_id_for",
    "new_epoch",
    "now_ms",
]

PROTOCOL_VERSION = 1
"""The only version this build speaks; a message with another ``v`` is refused (``version``)."""

MAX_FRAME = 64 * 1024
"""Frames above this many bytes are refused before parsing (``oversized``)."""

MAX_ID = 24
"""Longest ``client_order_id``: it travels in the MT5 order comment (31 characters at most)."""

_I63 = 2**63 - 1

V = Annotated[int, msgspec.Meta(ge=PROTOCOL_VERSION, le=PROTOCOL_VERSION)]
Epoch = Annotated[int, msgspec.Meta(ge=1, le=_I63)]
Seq = Annotated[int, msgspec.Meta(ge=1, le=_I63)]
Count = Annotated[int, msgspec.Meta(ge=0, le=_I63)]
Ms = Annotated[int, msgspec.Meta(ge=0, le=_I63)]
ClientOrderId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID, pattern=r"^[A-Za-z0-9_.:-]+$")]
MaybeId = Annotated[str, msgspec.Meta(max_length=MAX_ID)]
Symbol = Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
Comment = Annotated[str, msgspec.Meta(max_length=31)]
Short = Annotated[str, msgspec.Meta(max_length=64)]
Reason = Annotated[str, msgspec.Meta(max_length=256)]
Lots = Annotated[float, msgspec.Meta(gt=0.0, le=1e9)]
FilledLots = Annotated[float, msgspec.Meta(ge=0.0, le=1e9)]
Price = Annotated[float, msgspec.Meta(ge=0.0, le=1e12)]
Side = Literal["buy", "sell"]
MaybeSymbol = Annotated[str, msgspec.Meta(max_length=32)]
MaybeSide = Literal["buy", "sell", ""]
OrderType = Literal["market", "limit", "stop"]
Status = Literal["placed", "partial", "filled", "rejected", "expired", "cancelled"]

FINAL_STATUSES = frozenset({"filled", "rejected", "expired", "cancelled"})
"""Exec-report statuses after which an order never changes again at the terminal."""


class _Msg(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="type"):
    """Fields of every message (see the module docstring)."""

    v: V
    epoch: Epoch
    seq: Seq
    ts: Ms


# ---- both directions ---------------------------------------------------------------------------

class Heartbeat(_Msg, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="heartbeat"):
    """Liveness, sent every heartbeat interval by both sides. ``recv_seq`` is the highest ``seq``
    the sender has received from the peer's current epoch (0: none yet)."""

    recv_seq: Count


class Error(_Msg, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="error"):
    """The answer to a frame the sender could not accept: ``reason`` as in
    :class:`~dynamic_core.errors.PayloadError` (``malformed``, ``oversized``, ``unknown_tag``,
    ``unknown_field``, ``version``, ``invalid``, ``truncated``) or a protocol reason
    (``unexpected``); ``ref_seq`` is the offending message's ``seq`` when it could be read, else 0."""

    reason: Short
    detail: Reason
    ref_seq: Count


# ---- engine -> EA ------------------------------------------------------------------------------

MAX_HEARTBEAT_MS = 3_600_000
"""Longest heartbeat interval the protocol carries (an hour, in ms; the shortest is 1 ms)."""
MAX_MISSED = 1000
"""Most silent heartbeat intervals before safe mode the protocol carries."""


class EngineHello(_Msg, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="hello"):
    """The engine's half of the handshake: the answer to every EA ``hello`` (and to a message
    from a terminal epoch the engine has no session with). ``peer_epoch`` is the terminal epoch
    answered (0: none); ``heartbeat_ms`` and ``missed`` tell the EA the engine's liveness rule;
    ``magic`` is the MT5 magic number of this bridge's orders."""

    peer_epoch: Count
    heartbeat_ms: Annotated[int, msgspec.Meta(ge=1, le=MAX_HEARTBEAT_MS)]
    missed: Annotated[int, msgspec.Meta(ge=1, le=MAX_MISSED)]
    magic: Count


class Order(_Msg, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="order"):
    """Place an order (or, with a ``client_order_id`` the EA has seen, repeat its outcome).

    ``price`` is the limit/stop price (0 for market orders); ``sl``/``tp`` 0 mean none;
    ``valid_until`` is the last moment (ms UTC) the order may be placed and, for limit/stop
    orders, its expiry at the broker. ``attempt`` counts sends of this order (0 = first).
    """

    client_order_id: ClientOrderId
    symbol: Symbol
    side: Side
    order_type: OrderType
    volume: Lots
    price: Price
    sl: Price
    tp: Price
    valid_until: Ms
    plan_id: Reason
    magic: Count
    comment: Comment
    attempt: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]


class Cancel(_Msg, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="cancel"):
    """Cancel an order that is not filled yet; the EA answers with an ``exec_report``."""

    client_order_id: ClientOrderId
    reason: Reason


class PositionsQuery(_Msg, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="positions_query"):
    """List the open positions with magic ``magic`` (0: every position of the account): one
    ``position`` each, then ``positions_end``, all echoing ``query_id``."""

    query_id: Annotated[int, msgspec.Meta(ge=1, le=_I63)]
    magic: Count


class Flatten(_Msg, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="flatten"):
    """Close every position and delete every pending order with magic ``magic``, then answer as
    to a ``positions_query`` with the same ``query_id`` (normally zero positions)."""

    query_id: Annotated[int, msgspec.Meta(ge=1, le=_I63)]
    magic: Count
    reason: Reason


# ---- EA -> engine ------------------------------------------------------------------------------

class TerminalHello(_Msg, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="hello"):
    """The EA's half of the handshake, repeated every heartbeat interval until the engine's
    ``hello`` with ``peer_epoch`` equal to the EA's epoch arrives. ``resumed`` is true when the
    EA already had a session with an engine (it is re-introducing itself, e.g. after an engine
    restart) and false on a fresh EA start; ``peer_epoch`` is the engine epoch it last knew (0:
    none)."""

    login: Count
    server: Short
    resumed: bool
    peer_epoch: Count
    build: Short


class Ack(_Msg, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="ack"):
    """Receipt of one ``order``: ``accepted`` false with a ``reason`` when the EA refused it
    (``expired``, ``cancelled``, ``invalid_symbol``, ...). ``order_seq`` is the engine ``seq`` of
    the order message acked; ``duplicate`` is true when the EA had seen this ``client_order_id``
    before (the ack repeats the first decision); ``ticket`` is the MT5 order ticket (0: none)."""

    client_order_id: ClientOrderId
    order_seq: Count
    accepted: bool
    reason: Reason
    duplicate: bool
    ticket: Count


class ExecReport(_Msg, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="exec_report"):
    """The state of one order at the terminal. Cumulative, so repeating it is harmless:
    ``volume`` is the total filled so far, ``price`` their average price (0: nothing filled),
    ``commission`` the total commission as MT5 reports it (negative: a charge). ``status`` is
    ``placed`` (a limit/stop order resting at the broker), ``partial``, or a final one:
    ``filled``, ``rejected``, ``expired``, ``cancelled``. ``fill_ts`` is the time of the last fill
    (ms UTC; 0: none). ``symbol`` and ``side`` are empty only for the ``cancelled`` report of an
    order the EA never received."""

    client_order_id: ClientOrderId
    status: Status
    symbol: MaybeSymbol
    side: MaybeSide
    ticket: Count
    price: Price
    volume: FilledLots
    commission: float
    fill_ts: Ms
    reason: Reason


class Position(_Msg, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="position"):
    """One open position, the ``index``-th (1-based) of the answer to query ``query_id``.
    ``volume`` is positive lots, the direction is ``side``; ``client_order_id`` is the id the EA
    read from the order comment (empty when the position was not opened by the bridge).
    ``snapshot`` identifies the set of positions answered: the EA changes it whenever a position
    opens, changes or closes, so answers with equal snapshots may be merged."""

    query_id: Annotated[int, msgspec.Meta(ge=1, le=_I63)]
    snapshot: Count
    index: Annotated[int, msgspec.Meta(ge=1, le=_I63)]
    symbol: Symbol
    ticket: Count
    side: Side
    volume: Lots
    price_open: Price
    sl: Price
    tp: Price
    magic: Count
    comment: Comment
    client_order_id: MaybeId
    profit: float


class PositionsEnd(_Msg, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="positions_end"):
    """The end of the answer to query ``query_id``: ``count`` positions of snapshot
    ``snapshot`` were sent."""

    query_id: Annotated[int, msgspec.Meta(ge=1, le=_I63)]
    snapshot: Count
    count: Count


EngineMessage = EngineHello | Order | Cancel | Heartbeat | PositionsQuery | Flatten | Error
"""What the engine sends and the EA decodes."""

TerminalMessage = TerminalHello | Ack | ExecReport | Heartbeat | Position | PositionsEnd | Error
"""What the EA sends and the engine decodes."""


class _Peek(msgspec.Struct):
    """What a frame that failed to decode may still tell: its ``type`` and ``seq``."""

    type: str = ""
    seq: int = 0


_peek_decoder = msgspec.json.Decoder(_Peek)
_ALL_TAGS = frozenset(t.__struct_config__.tag for t in (*EngineMessage.__args__, *TerminalMessage.__args__))


class MT5Codec(Codec):
    """JSON codec of one direction of the protocol, with the :data:`MAX_FRAME` bound.

    ``MT5Codec(TerminalMessage)`` decodes what the EA sends, ``MT5Codec(EngineMessage)`` what the
    engine sends. :meth:`decode` raises :class:`~dynamic_core.errors.PayloadError` with a reason
    (and counts it) on anything that is not a valid message; a ``v`` other than
    :data:`PROTOCOL_VERSION` is reason ``version``, a valid type of the other direction (an
    ``order`` sent to the engine) reason ``unexpected``. The error carries what could still be
    read of the frame (section 2.3): ``ref_seq``, its ``seq`` (else 0), and ``msg_type``, its
    ``type`` (else "").
    """

    def __init__(self, type: Any, *, max_frame: int = MAX_FRAME) -> None:
        super().__init__(type, fmt="json", max_frame=max_frame)
        self._tags = frozenset(t.__struct_config__.tag for t in getattr(type, "__args__", (type,)))

    def _recount(self, old: str, new: str) -> None:
        """Move one reject counted under ``old`` to ``new`` (the total is unchanged)."""
        self.rejects[old] -= 1
        if not self.rejects[old]:
            del self.rejects[old]
        self.rejects[new] = self.rejects.get(new, 0) + 1

    def decode(self, buf: Any) -> Any:
        try:
            return super().decode(buf)
        except PayloadError as e:
            err = e
            if e.reason == "invalid" and e.detail.endswith("`$.v`"):
                # recount under the reason the protocol defines for a version mismatch
                self._recount("invalid", "version")
                err = PayloadError("version", e.detail)
            peek = _Peek()
            if e.reason != "oversized":
                try:
                    peek = _peek_decoder.decode(buf)
                except (msgspec.DecodeError, TypeError, ValueError):
                    pass
            if e.reason == "unknown_tag" and peek.type in _ALL_TAGS and peek.type not in self._tags:
                self._recount("unknown_tag", "unexpected")
                err = PayloadError("unexpected", f"a {peek.type!r} message is not sent in this direction")
            err.ref_seq = peek.seq if 0 <= peek.seq < 1 << 63 else 0
            err.msg_type = peek.type
            if err is e:
                raise
            raise err from None


def now_ms() -> int:
    """Wall clock, ms since the Unix epoch (UTC): the unit of ``ts`` and ``valid_until``."""
    return time.time_ns() // 1_000_000


def new_epoch() -> int:
    """A fresh session epoch: random in [1, 2**63 - 1] (fits an MQL5 ``long``)."""
    return secrets.randbits(63) or 1


def client_order_id_for(plan_id: str, attempt: int = 0) -> str:
    """The order id of attempt ``attempt`` at plan ``plan_id``: ``"dc"`` and 20 base32
    characters of a BLAKE2b hash (22 characters, within :data:`MAX_ID` and the 31-character MT5
    comment). The same plan always gives the same id, so resubmitting a plan cannot make a
    second order; a deliberate new attempt (after a rejection, say) passes ``attempt=1, 2, ...``.
    """
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    h = hashlib.blake2b(f"{plan_id}\x00{attempt}".encode(), digest_size=15, person=b"dc-mt5-order").digest()
    return "dc" + base64.b32encode(h).decode().lower()[:20]
