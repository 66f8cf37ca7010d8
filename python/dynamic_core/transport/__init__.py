"""ZeroMQ transport: market ingress, the signal feed, the CURVE control plane, and a service
that wires them to an engine.

=========================  ===============  ==================================================
class                      socket           role
=========================  ===============  ==================================================
:class:`SignalFeed`        XPUB (PUB)       publish signals, heartbeats, rationales
:class:`SignalSubscriber`  SUB              decode the feed, report gaps and epoch changes
:class:`MarketIngress`     PULL or SUB      bars from other processes into ``engine.submit``
:class:`MarketSender`      PUSH or PUB      the sending side of market ingress
:class:`ControlServer`     ROUTER + CURVE   commands applied between updates, journal hook
:class:`ControlClient`     DEALER + CURVE   send commands, wait for replies
:class:`EngineService`     (all of them)    ingress -> engine -> feed, with control
=========================  ===============  ==================================================

Every socket binds loopback by default (``tcp://127.0.0.1:*``, read ``.endpoint`` for the
port); binding beyond loopback needs ``allow_remote=True``. Every receive has a timeout and
every frame a size bound; bad frames are counted and never raise out of a receive loop.
Payloads and their wire format are in :mod:`dynamic_core.payloads`.
"""

from __future__ import annotations

from ._common import DEFAULT_ADDRESS, check_address, is_loopback
from .control import ControlClient, ControlServer
from .feed import HEARTBEAT_TOPIC, EpochChange, Gap, SignalFeed, SignalSubscriber, signal_topic
from .ingress import MarketIngress, MarketSender, market_topic
from .keys import authorised_keys, load_keypair, load_public_key, new_keypair
from .service import EngineService

__all__ = [
    "DEFAULT_ADDRESS",
    "HEARTBEAT_TOPIC",
    "ControlClient",
    "ControlServer",
    "EngineService",
    "EpochChange",
    "Gap",
    "MarketIngress",
    "MarketSender",
    "SignalFeed",
    "SignalSubscriber",
    "authorised_keys",
    "check_address",
    "is_loopback",
    "load_keypair",
    "load_public_key",
    "market_topic",
    "new_keypair",
    "signal_topic",
]
