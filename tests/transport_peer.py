"""The other process of the transport tests (run as a script, never collected by pytest).

Each mode prints one JSON line on stdout when its sockets are ready (endpoints, epoch...), does
its work, prints a final JSON line, and (where it keeps serving) stops when stdin is closed.

    python tests/transport_peer.py feed ADDR [--fmt json]     engine signals -> SignalFeed
    python tests/transport_peer.py blast ADDR N               N one-topic signals, tiny HWM
    python tests/transport_peer.py send-bars ADDR             sim bars (+ garbage) -> PUSH, open until stdin closes
    python tests/transport_peer.py service KEYDIR             EngineService: ingress+feed+control
"""

from __future__ import annotations

import json
import os
import sys
import threading

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import dynamic_core as dc  # noqa: E402
import numpy as np  # noqa: E402
from dynamic_core import transport  # noqa: E402

NAMES = ["EURUSD", "GBPUSD"]


def market(n: int = 120) -> np.ndarray:
    """The bars both sides agree on: 2 simulated instruments, seed 3, two bad bars (n > 20)."""
    bars = dc.sim.MarketSimulator(NAMES, timeframe="H1", seed=3).bars(n)
    if len(bars) > 40:
        bars["close"][17] = np.nan  # rejected by the engine (non_finite), the same way in every path
        bars["high"][40] = bars["low"][40] - 1.0  # high_below_low
    return bars


def population() -> dc.Population:
    return dc.Population.random(300, instruments=NAMES, timeframes=["H1"], seed=5)


def say(**kw: object) -> None:
    print(json.dumps(kw), flush=True)


def wait_stdin_closed() -> threading.Event:
    ev = threading.Event()

    def watch() -> None:
        sys.stdin.read()
        ev.set()

    threading.Thread(target=watch, daemon=True).start()
    return ev


def mode_feed(addr: str, fmt: str) -> None:
    closed = wait_stdin_closed()
    with transport.SignalFeed(addr, fmt=fmt, heartbeat_interval=0.02, max_batch=16) as feed:
        say(endpoint=feed.endpoint, epoch=feed.epoch)
        if not feed.wait_for_subscribers(1, timeout=20):
            say(error="no subscriber")
            return
        with dc.Engine(population(), threads=1) as eng:
            bars = market()
            for i in range(0, len(bars), 25):  # several publish calls, mixed topics each
                feed.publish(eng.run(bars[i:i + 25]))
        say(done=feed.signals, messages=feed.messages)
        while not closed.wait(0.01):
            feed.tick()


def mode_blast(addr: str, n: int) -> None:
    closed = wait_stdin_closed()
    with transport.SignalFeed(addr, sndhwm=1, heartbeat_interval=0.02, max_batch=200) as feed:
        say(endpoint=feed.endpoint, epoch=feed.epoch)
        if not feed.wait_for_subscribers(1, timeout=20):
            say(error="no subscriber")
            return
        recs = np.zeros(n, dtype=dc.SIGNAL_DTYPE)
        recs["instrument"] = dc.instruments.id("EURUSD")
        recs["timeframe"] = 60
        recs["seq"] = np.arange(n)
        recs["ts"] = np.arange(n) * 60_000_000_000
        recs["score"] = np.linspace(-1, 1, n)
        for i in range(0, n, 200):
            feed.publish(recs[i:i + 200])
        say(done=feed.signals, topic=transport.signal_topic("EURUSD", 60).decode())
        while not closed.wait(0.01):
            feed.tick()


def mode_send_bars(addr: str) -> None:
    closed = wait_stdin_closed()
    bars = market()
    with transport.MarketSender(addr, kind="push", max_bars=7) as tx:
        say(endpoint=tx.endpoint)
        frames = tx.send(bars[:60])
        tx.send_raw(b"\xc1garbage\xff")  # refused by the ingress, counted, dead-lettered
        tx.send_raw(b'{"type": "market", "version": 99}')
        frames += tx.send(bars[60:])
        # keep the socket open until the test (which closes stdin once it has received
        # everything) is done: closing right away gives queued frames only the close linger to
        # leave, and a receiver that is slow to finish its handshake would lose them
        closed.wait(60.0)
    say(done=len(bars), frames=frames)


def mode_service(keydir: str) -> None:
    closed = wait_stdin_closed()
    eng = dc.Engine(population(), threads=1)
    ingress = transport.MarketIngress("tcp://127.0.0.1:*", engine=eng)
    feed = transport.SignalFeed("tcp://127.0.0.1:*", heartbeat_interval=0.02)
    control = transport.ControlServer("tcp://127.0.0.1:*", secret_key=os.path.join(keydir, "server.key_secret"),
                                      authorized_keys=os.path.join(keydir, "clients"))
    journal: list[bytes] = []
    control.journal_hook = journal.append
    svc = transport.EngineService(eng, ingress=ingress, feed=feed, control=control,
                                  snapshot_dir=keydir, idle_timeout=0.01)
    svc.start()
    say(ingress=ingress.endpoint, feed=feed.endpoint, control=control.endpoint, epoch=feed.epoch)
    closed.wait()
    svc.close()
    st = control.stats()
    eng.close()
    say(journaled=len(journal), commands=svc.commands, auth_refused=st["auth_refused"], errors=st["errors"])


def main(argv: list[str]) -> None:
    mode, *rest = argv
    if mode == "feed":
        mode_feed(rest[0], "json" if "--fmt" in rest and rest[rest.index("--fmt") + 1] == "json" else "msgpack")
    elif mode == "blast":
        mode_blast(rest[0], int(rest[1]))
    elif mode == "send-bars":
        mode_send_bars(rest[0])
    elif mode == "service":
        mode_service(rest[0])
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
