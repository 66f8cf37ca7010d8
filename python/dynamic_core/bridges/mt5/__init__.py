"""MetaTrader 5 bridge over ZeroMQ: orders to an EA, executed exactly once.

==============================  =========================================================
name                            role
==============================  =========================================================
:class:`MT5Bridge`              the engine side (ROUTER, binds): orders, acks, re-sends,
                                heartbeats, reconciliation, safe mode
:class:`SimulatedTerminal`      the EA side in Python (DEALER) over a paper broker: the
                                reference behaviour of the MQL5 EA
:class:`FaultProxy`             drops, duplicates, delays and reorders messages (tests)
:mod:`.protocol`                the flat JSON messages and their codec
==============================  =========================================================

The protocol is specified in ``docs/mt5-bridge.md``.
"""

from __future__ import annotations

from .bridge import DEFAULT_BRIDGE_ADDRESS, BridgeReport, MT5Bridge
from .protocol import (
    MAX_FRAME,
    MAX_ID,
    PROTOCOL_VERSION,
    EngineMessage,
    MT5Codec,
    TerminalMessage,
    client_order_id_for,
)
from .proxy import FaultProxy, Faults
from .terminal import SimulatedTerminal

__all__ = [
    "DEFAULT_BRIDGE_ADDRESS",
    "MAX_FRAME",
    "MAX_ID",
    "PROTOCOL_VERSION",
    "BridgeReport",
    "EngineMessage",
    "FaultProxy",
    "Faults",
    "MT5Bridge",
    "MT5Codec",
    "SimulatedTerminal",
    "TerminalMessage",
    "client_order_id_for",
]
