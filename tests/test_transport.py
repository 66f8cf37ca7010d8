"""ZeroMQ transport across real processes: signal feed, market ingress, CURVE control plane,
EngineService and the socket commands of the CLI.

Every receive has a timeout. Handshakes replace sleeps: a publisher waits for its subscriber
(XPUB sees the subscription), a subscriber waits for the first heartbeat before bars are sent.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from pathlib import Path

import dynamic_core as dc
import msgspec
import numpy as np
import pytest
import zmq
from dynamic_core import payloads as P
from dynamic_core import transport as T
from dynamic_core.errors import TransportTimeout
from hypothesis import given, settings
from hypothesis import strategies as st

from .transport_peer import market, population

PKG_ROOT = str(Path(dc.__file__).resolve().parent.parent)
PEER = str(Path(__file__).with_name("transport_peer.py"))
TIMEOUT = 20.0  # generous upper bound on any single wait; never reached when things work


def _env() -> dict[str, str]:
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PKG_ROOT, env.get("PYTHONPATH")) if p)
    env["OPENBLAS_NUM_THREADS"] = "1"
    return env


class Peer:
    """A child process speaking JSON lines on stdout; closing its stdin asks it to finish."""

    def __init__(self, *args: str, module: bool = False) -> None:
        cmd = [sys.executable, "-m", "dynamic_core", *args] if module else [sys.executable, PEER, *args]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=_env())

    def line(self, timeout: float = TIMEOUT) -> dict:
        out: list[str] = []
        t = threading.Thread(target=lambda: out.append(self.proc.stdout.readline()), daemon=True)
        t.start()
        t.join(timeout)
        if not out or not out[0]:
            self.kill()
            raise AssertionError(f"peer said nothing within {timeout} s; stderr: {self.proc.stderr.read()}")
        return json.loads(out[0])

    def finish(self, timeout: float = TIMEOUT) -> tuple[str, str]:
        """Close its stdin (the signal to stop), wait, and return the rest of its output."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
            self.proc.stdin = None
        out, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, err
        return out, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture()
def peers() -> Iterator[list[Peer]]:
    started: list[Peer] = []
    yield started
    for p in started:
        p.kill()


def _no_hash(s: P.AISignal) -> P.AISignal:
    # population hashes include per-process instrument ids; everything else must match exactly
    return msgspec.structs.replace(s, population_hash=0)


def _expected_signals() -> list[P.AISignal]:
    with dc.Engine(population(), threads=1) as eng:
        return P.signals_from_records(eng.run(market()))


def _address(kind: str, tmp_path: Path, name: str) -> str:
    return f"ipc://{tmp_path / name}" if kind == "ipc" else "tcp://127.0.0.1:*"


# ---- addresses -------------------------------------------------------------------------------

def test_bind_policy_is_loopback_unless_allowed() -> None:
    for a in ("tcp://127.0.0.1:5555", "tcp://localhost:1", "tcp://[::1]:9", "ipc:///tmp/x", "inproc://a",
              "tcp://127.0.0.1:*"):
        assert T.is_loopback(a), a
    for a in ("tcp://*:5555", "tcp://0.0.0.0:5555", "tcp://10.1.2.3:1", "tcp://eth0:5"):
        assert not T.is_loopback(a), a
        with pytest.raises(ValueError, match="allow_remote"):
            T.check_address(a, bind=True, allow_remote=False)
        assert T.check_address(a, bind=False, allow_remote=False) == a  # connecting is fine
    with pytest.raises(ValueError, match="allow_remote"):
        T.SignalFeed("tcp://0.0.0.0:*")
    with pytest.raises(ValueError, match="not a ZeroMQ address"):
        T.MarketIngress("127.0.0.1:5")


@pytest.mark.parametrize("port", ["-5", "0", "65536", "!", "[5000-6000]", "5x"])
def test_a_bind_port_that_zeromq_would_reinterpret_is_refused(port: str) -> None:
    # ZeroMQ binds 65531 for -5 and another port for 99999: the address would not be the one asked for
    with pytest.raises(ValueError, match="port must be in 1..65535"):
        T.check_address(f"tcp://127.0.0.1:{port}", bind=True, allow_remote=False)


def test_a_huge_timeout_is_cut_to_what_zeromq_takes(tmp_path: Path) -> None:
    from dynamic_core.transport._common import MAX_WAIT_MS, to_ms

    assert to_ms(1e7) == to_ms(math.inf) == MAX_WAIT_MS and to_ms(0.0) == 1 and to_ms(0.0, 0) == 0
    with T.MarketIngress(f"ipc://{tmp_path / 'b.sock'}") as ing:
        assert ing.recv_bars(0.001) is None
    with T.MarketSender(f"ipc://{tmp_path / 'c.sock'}", bind=True, send_timeout=1e7) as tx:
        tx.close(linger=1e9)


# ---- signal feed -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind,fmt", [("ipc", "msgpack"), ("tcp", "msgpack"), ("tcp", "json")])
def test_feed_across_processes(kind: str, fmt: str, tmp_path: Path, peers: list[Peer]) -> None:
    pub = Peer("feed", _address(kind, tmp_path, "feed.sock"), "--fmt", fmt)
    peers.append(pub)
    hello = pub.line()
    assert hello["endpoint"].startswith(kind + "://")
    got: list[P.AISignal] = []
    with T.SignalSubscriber(hello["endpoint"]) as sub:
        done = pub.line()  # the publisher waited for us, then published everything
        while len(got) < done["done"]:
            msg = sub.recv(timeout=TIMEOUT)
            assert msg is not None, f"only {len(got)} of {done['done']} signals"
            if isinstance(msg, P.SignalBatch):
                assert len(msg.signals) <= 16
                got.extend(msg.signals)
        while sub.heartbeats == 0:  # the feed is idle now: heartbeats follow
            assert sub.recv(timeout=TIMEOUT) is not None
        assert sub.epoch == hello["epoch"] and sub.alive(TIMEOUT)
        assert sub.gap_count == 0 and not sub.gaps and not sub.epoch_changes and sub.stats()["rejected"] == 0
    pub.finish()
    # per topic in bar order; across topics in batch order: compare each topic's stream
    want = _expected_signals()
    for name in ("EURUSD", "GBPUSD"):
        mine = [_no_hash(s) for s in got if s.instrument == name]
        ref = [_no_hash(s) for s in want if s.instrument == name]
        assert mine == ref and len(ref) > 50


@pytest.fixture()
def raw_pub() -> Iterator[zmq.Socket]:
    """A bare XPUB the test writes crafted frames to."""
    pub = zmq.Context.instance().socket(zmq.XPUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind("tcp://127.0.0.1:*")
    yield pub
    pub.close(linger=0)


def _wait_subscriptions(pub: zmq.Socket, n: int) -> None:
    for _ in range(n):
        assert pub.poll(int(TIMEOUT * 1000)), "no subscription arrived"
        pub.recv()


def test_subscriber_reports_gaps_epochs_and_bad_frames(raw_pub: zmq.Socket) -> None:
    gaps: list[T.Gap] = []
    epochs: list[T.EpochChange] = []
    topic = b"sig.EURUSD.3600"
    sig = P.AISignal(ts=1, instrument="EURUSD", timeframe=3600, seq=1, population_hash=1, score=0.0,
                     confidence=0.0, agreement=0.0, dispersion=0.0, action=0, n_agents=0, votes=(0, 0, 0, 0, 0))
    enc = msgspec.msgpack.Encoder()

    def batch(epoch: int, seq: int, n: int) -> bytes:
        return enc.encode(P.SignalBatch(epoch=epoch, seq=seq, signals=(sig,) * n))

    pub = raw_pub
    with T.SignalSubscriber(pub.getsockopt(zmq.LAST_ENDPOINT).decode(), topics="sig.", on_gap=gaps.append,
                            on_epoch=epochs.append, max_frame=4096) as sub:
        _wait_subscriptions(pub, 2)  # "sig." and the heartbeat topic
        frames = [
            [topic, batch(5, 0, 3)],                  # seq 0..2
            [topic, batch(5, 3, 2)],                  # 3..4: dense
            [topic, batch(5, 10, 1)],                 # 5..9 lost
            [b"sig.GBPUSD.3600", batch(5, 7, 1)],     # first seen on this topic: no gap
            [topic, b"\xc1garbage"],                  # refused, counted, skipped
            [topic, batch(5, 11, 1), b"extra"],       # three frames: refused
            [topic, b"x" * 5000],                     # oversized
            [b"hb", enc.encode(P.Heartbeat(epoch=5, seq=0, ts=0, next_seq={"sig.EURUSD.3600": 15}))],
            [topic, batch(9, 0, 2)],                  # publisher restarted: new epoch, no gap
            [topic, batch(9, 2, 1)],
        ]
        for f in frames:
            pub.send_multipart(f)
        kinds = []
        while True:
            msg = sub.recv(timeout=TIMEOUT)
            assert msg is not None
            kinds.append(type(msg).__name__)
            if isinstance(msg, P.SignalBatch) and msg.epoch == 9 and msg.seq == 2:
                break
        assert kinds.count("SignalBatch") == 6 and kinds.count("Heartbeat") == 1
        assert [(g.topic, g.expected, g.got, g.at_heartbeat) for g in gaps] == [
            ("sig.EURUSD.3600", 5, 10, False), ("sig.EURUSD.3600", 11, 15, True)]
        assert sub.gap_count == 5 + 4
        assert epochs == [T.EpochChange(5, 9)] and sub.epoch == 9
        st = sub.stats()
        assert st["rejected"] == 3 and st["rejects"] == {"malformed": 2, "oversized": 1}
        assert [r[0] for r in sub.rejects] == ["malformed", "malformed", "oversized"]


def test_subscriber_stats_count_every_gap_and_restart_beyond_the_kept_events(raw_pub: zmq.Socket) -> None:
    # stats() once reported len() of the bounded lists, so `subscribe` printed max_events gaps at most
    enc = msgspec.msgpack.Encoder()
    with T.SignalSubscriber(raw_pub.getsockopt(zmq.LAST_ENDPOINT).decode(), max_events=3) as sub:
        _wait_subscriptions(raw_pub, 2)
        frames = [(1, 2 * i) for i in range(10)] + [(2 + i, 0) for i in range(6)]  # 9 gaps, 6 restarts
        for epoch, seq in frames:
            batch = P.SignalBatch(epoch=epoch, seq=seq, signals=())
            raw_pub.send_multipart([b"sig.EURUSD.3600", enc.encode(batch)])
        for _ in frames:
            assert isinstance(sub.recv(timeout=TIMEOUT), P.SignalBatch)
        st = sub.stats()
        assert len(sub.gaps) == len(sub.epoch_changes) == 3  # the lists stay bounded
        assert (st["gaps"], st["gap_signals"], st["epoch_changes"]) == (9, 9 * 2, 6)


def test_subscriber_survives_garbage(raw_pub: zmq.Socket) -> None:
    pub = raw_pub
    good = msgspec.msgpack.encode(P.Heartbeat(epoch=3, seq=0, ts=0))
    with T.SignalSubscriber(pub.getsockopt(zmq.LAST_ENDPOINT).decode(), max_frame=2048) as sub:
        _wait_subscriptions(pub, 2)

        @settings(max_examples=150, deadline=None)
        @given(frames=st.lists(st.binary(max_size=3000), min_size=1, max_size=3))
        def check(frames: list[bytes]) -> None:
            before = sub.stats()
            pub.send_multipart([b"sig.X.60", *frames])
            pub.send_multipart([b"hb", good])  # a valid message after each bad one
            while True:
                msg = sub.recv(timeout=TIMEOUT)
                assert msg is not None
                if isinstance(msg, P.Heartbeat) and msg.epoch == 3:
                    break
            after = sub.stats()
            assert after["rejected"] + after["messages"] - before["rejected"] - before["messages"] == 2

        check()


_FLOOD = """
import sys, time, zmq
s = zmq.Context().socket(zmq.XSUB)
s.setsockopt(zmq.SNDHWM, 0)
s.connect(sys.argv[1])
end = time.monotonic() + float(sys.argv[2])
print("connected", flush=True)
while time.monotonic() < end:
    for _ in range(1000):
        s.send(b"\\x01zz")  # one topic again and again: XPUB_VERBOSER hands every one to the feed
s.close(0)
"""


def test_a_subscription_flood_does_not_hold_the_feed() -> None:
    # the feed read subscriptions until none was left at every publish/heartbeat: a peer that kept
    # subscribing held the publishing thread for as long as it kept at it (tens of seconds)
    flood_s = 10.0  # how long the flooder goes on by itself; the test kills it as soon as it is done
    sig = np.zeros(1, dtype=dc.SIGNAL_DTYPE)
    sig["instrument"], sig["timeframe"] = dc.instruments.id("EURUSD"), 3600
    with T.SignalFeed("tcp://127.0.0.1:*") as feed, T.SignalSubscriber(feed.endpoint) as sub:
        assert feed.wait_for_subscribers(1, TIMEOUT)
        flood = subprocess.Popen([sys.executable, "-c", _FLOOD, feed.endpoint, str(flood_s)],
                                 stdout=subprocess.PIPE, text=True, env=_env())
        try:
            assert flood.stdout.readline() == "connected\n"
            while feed.subscriptions < 1000:  # the flood has reached the feed
                feed.tick()
            seen = feed.subscriptions
            got: list[str] = []
            for i in range(40):
                feed.publish(sig)
                feed.heartbeat()
                for _ in range(2):
                    msg = sub.recv(timeout=TIMEOUT)
                    assert msg is not None, got
                    got.append(type(msg).__name__)
                    if isinstance(msg, P.SignalBatch):
                        assert msg.seq == i
            # every signal and heartbeat went out, in order, while the flood went on and was read
            assert got == ["SignalBatch", "Heartbeat"] * 40 and sub.gap_count == 0
            assert flood.poll() is None and feed.subscriptions > seen
        finally:
            flood.kill()
            flood.communicate()


def test_gaps_under_a_tiny_hwm_across_processes(tmp_path: Path, peers: list[Peer]) -> None:
    """A publisher with SNDHWM 1 blasts 40k signals at a subscriber that does not read: PUB
    drops, and every dropped signal is accounted for as a gap (tail gaps via heartbeats)."""
    pub = Peer("blast", f"ipc://{tmp_path / 'blast.sock'}", "40000")
    peers.append(pub)
    hello = pub.line()
    with T.SignalSubscriber(hello["endpoint"], rcvhwm=1) as sub:
        done = pub.line()  # all sent while we were not reading
        total, topic = done["done"], done["topic"]
        received = 0
        first = None
        while True:
            msg = sub.recv(timeout=TIMEOUT)
            assert msg is not None
            if isinstance(msg, P.SignalBatch):
                first = msg.seq if first is None else first  # (in practice 0: the first batch fits)
                received += len(msg.signals)
            elif isinstance(msg, P.Heartbeat) and msg.next_seq.get(topic) == total:
                break
        assert sub.gap_count > 0 and sub.gaps
        assert received + sub.gap_count == total - first
        assert all(g.missed > 0 for g in sub.gaps)
    pub.finish()


_STALLED = """
import sys, time, zmq
s = zmq.Context().socket(zmq.SUB)
s.setsockopt(zmq.RCVHWM, 1)  # holds next to nothing: what it does not read stays with the feed
s.setsockopt(zmq.RCVBUF, 4096)
s.connect(sys.argv[1])
s.setsockopt(zmq.SUBSCRIBE, b"")
print("connected", flush=True)
time.sleep(120)  # never reads; killed by the test
"""


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("sndhwm", [16, 64])
def test_a_stalled_subscriber_holds_at_most_sndhwm_messages_of_the_feeds_memory(sndhwm: int) -> None:
    # A subscriber process that never reads: PUB keeps its messages for it up to the high-water
    # mark, then drops them. The publisher's memory grows by at most sndhwm messages (plus
    # slack), not by the ~300 MB published: with no mark (sndhwm=0) this fails
    recs = np.zeros(1024, dtype=dc.SIGNAL_DTYPE)
    recs["instrument"], recs["timeframe"] = dc.instruments.id("EURUSD"), 3600
    recs["seq"] = np.arange(1, 1025)
    msg_bytes = len(P.encode_signal_batch(1, 0, recs, "EURUSD"))
    n_msgs = 300 * 2**20 // msg_bytes
    with T.SignalFeed("tcp://127.0.0.1:*", sndhwm=sndhwm, max_batch=1024, heartbeat_interval=3600) as feed:
        stalled = subprocess.Popen([sys.executable, "-c", _STALLED, feed.endpoint], stdout=subprocess.PIPE,
                                   text=True, env=_env())
        try:
            assert stalled.stdout.readline() == "connected\n"
            assert feed.wait_for_subscribers(1, TIMEOUT)
            feed.publish(recs)  # the encoder's buffers, once, before the baseline
            time.sleep(0.2)
            before = _rss_bytes()
            for _ in range(n_msgs):
                feed.publish(recs)
            time.sleep(0.5)  # libzmq's I/O thread moves what the socket buffers take
            grown = _rss_bytes() - before
            assert feed.messages == n_msgs + 1
            assert grown <= sndhwm * msg_bytes + 48 * 2**20, (grown, sndhwm * msg_bytes)
        finally:
            stalled.kill()
            stalled.communicate()


def test_the_feeds_defaults_bound_a_stalled_subscriber_near_the_documented_figure() -> None:
    # the module docstring's "about 270 MB" (msgpack, six-letter names) follows from the defaults
    feed = T.SignalFeed("tcp://127.0.0.1:*")
    try:
        hwm, batch = feed._sock.getsockopt(zmq.SNDHWM), feed.max_batch
    finally:
        feed.close()
    recs = np.zeros(batch, dtype=dc.SIGNAL_DTYPE)
    recs["instrument"], recs["timeframe"] = dc.instruments.id("EURUSD"), 3600
    assert 260e6 <= hwm * len(P.encode_signal_batch(1, 0, recs, "EURUSD")) <= 280e6


def test_feed_publishes_objects_rationales_and_waits_for_subscribers() -> None:
    with T.SignalFeed(heartbeat_interval=3600, max_batch=2) as feed:
        assert not feed.wait_for_subscribers(1, timeout=0.05)
        with T.SignalSubscriber(feed.endpoint, topics=["sig.EURUSD.", "rat."]) as sub:
            assert feed.wait_for_subscribers(1, timeout=TIMEOUT)
            sigs = [P.AISignal(ts=i, instrument=n, timeframe=60, seq=i, population_hash=0, score=0.5,
                               confidence=1.0, agreement=1.0, dispersion=0.0, action=1, n_agents=1,
                               votes=(0, 0, 0, 1, 0)) for i, n in enumerate(["EURUSD", "GBPUSD"] * 3)]
            assert feed.publish(sigs) == 4  # 3 per topic, batches of 2
            feed.publish_rationale(P.RationaleUpdate(signal_id="0:0", instrument="EURUSD", timeframe=60,
                                                     text="why", provider="test"))
            feed.heartbeat()
            msgs = [sub.recv(timeout=TIMEOUT) for _ in range(4)]
            assert [type(m).__name__ for m in msgs] == ["SignalBatch", "SignalBatch", "RationaleUpdate",
                                                        "Heartbeat"]
            assert [s.seq for m in msgs[:2] for s in m.signals] == [0, 2, 4]  # GBPUSD filtered out
            assert msgs[2].epoch == feed.epoch and msgs[2].text == "why"
            assert msgs[3].next_seq == {"sig.EURUSD.60": 3, "sig.GBPUSD.60": 3}
            assert sub.gap_count == 0
            assert feed.tick() is False  # not due
            assert sub.recv(timeout=0.05) is None
        with pytest.raises(TypeError):
            feed.publish(np.zeros(2, dtype=dc.BAR_DTYPE))


def _subscribers_become(feed: T.SignalFeed, n: int) -> int:
    """Drive the feed (as its owner's loop would) until it counts ``n`` subscribers or TIMEOUT
    passes; returns the last count."""
    deadline = time.monotonic() + TIMEOUT
    while feed.subscribers != n and time.monotonic() < deadline:
        feed.tick()
        time.sleep(0.005)
    return feed.subscribers


def test_feed_counts_subscribers_down_as_they_leave() -> None:
    # two subscribers on the same topics: libzmq reports the leaving of each one only with
    # XPUB_VERBOSER (XPUB_VERBOSE passes every subscribe but only the last unsubscribe of a topic)
    with T.SignalFeed(heartbeat_interval=3600) as feed:
        first = T.SignalSubscriber(feed.endpoint, topics="sig.EURUSD.")
        second = T.SignalSubscriber(feed.endpoint, topics="sig.EURUSD.")
        try:
            assert feed.wait_for_subscribers(2, timeout=TIMEOUT)
            assert _subscribers_become(feed, 2) == 2
            first.close()
            assert _subscribers_become(feed, 1) == 1
            feed.heartbeat()
            assert isinstance(second.recv(timeout=TIMEOUT), P.Heartbeat)  # the one left still gets them
            second.close()
            assert _subscribers_become(feed, 0) == 0
        finally:
            first.close()
            second.close()
        assert feed.stats()["subscribers"] == 0
        assert not feed.wait_for_subscribers(1, timeout=0.05)
        with T.SignalSubscriber(feed.endpoint) as third:  # and counting up still works
            assert feed.wait_for_subscribers(1, timeout=TIMEOUT)
            assert _subscribers_become(feed, 1) == 1
            feed.heartbeat()
            assert isinstance(third.recv(timeout=TIMEOUT), P.Heartbeat)
        assert _subscribers_become(feed, 0) == 0


def test_feed_counts_out_a_killed_subscriber_process(peers: list[Peer]) -> None:
    with T.SignalFeed(heartbeat_interval=3600) as feed, \
            T.SignalSubscriber(feed.endpoint, topics="sig.EURUSD.") as local:
        assert feed.wait_for_subscribers(1, timeout=TIMEOUT)
        remote = Peer("subscribe", feed.endpoint, "--topic", "sig.EURUSD.", module=True)
        peers.append(remote)
        assert feed.wait_for_subscribers(2, timeout=TIMEOUT)
        remote.kill()  # SIGKILL: no goodbye, only the connection dropping
        assert _subscribers_become(feed, 1) == 1
        feed.heartbeat()
        assert isinstance(local.recv(timeout=TIMEOUT), P.Heartbeat)


# ---- market ingress --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["ipc", "tcp"])
def test_ingress_from_another_process_matches_run(kind: str, tmp_path: Path, peers: list[Peer]) -> None:
    bars = market()
    with dc.Engine(population(), threads=1) as ref_eng:
        ref = ref_eng.run(bars)
        ref_dead = ref_eng.dead_letters()
    with dc.Engine(population(), threads=2) as eng, \
            T.MarketIngress(_address(kind, tmp_path, "bars.sock"), engine=eng) as ingress:
        tx = Peer("send-bars", ingress.endpoint)
        peers.append(tx)
        assert tx.line()["endpoint"] == ingress.endpoint
        deadline = time.monotonic() + TIMEOUT
        while ingress.submitted < len(bars):
            ingress.pump(timeout=0.5)
            assert time.monotonic() < deadline
        out = []
        while sum(map(len, out)) < len(ref):
            got = eng.poll(timeout=TIMEOUT)
            assert len(got)
            out.append(got)
        tx.finish()
        sig = np.concatenate(out)
        assert sig.tobytes() == ref.tobytes()  # same bars, same order, same sequence numbers
        assert eng.dead_letters()["reason"].tolist() == ref_dead["reason"].tolist()
        assert len(ref_dead) == 2
        st = ingress.stats()
        assert st["bars"] == len(bars) and st["rejected"] == 2
        assert st["rejects"] == {"malformed": 1, "version": 1}
        assert [r.reason for r in ingress.dead_letters()] == ["malformed", "version"]


def test_ingress_sub_socket_and_dead_letter_bound() -> None:
    seen: list[P.Reject] = []
    with T.MarketIngress("inproc://ingress-sub-test", kind="sub", bind=True, topics=["mkt.EURUSD."],
                         dead_letter_capacity=2, on_reject=seen.append) as ingress:
        with T.MarketSender("inproc://ingress-sub-test", kind="pub") as tx:
            bars = market(30)
            # SUB joins asynchronously: repeat the first frame until one arrives
            deadline = time.monotonic() + TIMEOUT
            first = None
            while first is None:
                tx.send(bars[:1])
                first = ingress.recv_bars(timeout=0.02)
                assert time.monotonic() < deadline
            assert first["instrument"][0] == dc.instruments.id("EURUSD")
            while ingress.recv_bars(timeout=0.05) is not None:  # drain repeats
                pass
            tx.send(bars)  # GBPUSD frames are filtered out by topic
            got = []
            while (b := ingress.recv_bars(timeout=0.2)) is not None:
                got.append(b)
            eur = bars[bars["instrument"] == dc.instruments.id("EURUSD")]
            assert np.concatenate(got).tobytes() == eur.tobytes()
            for i in range(3):
                tx.send_raw(b"mkt.EURUSD.3600", b"\xc1" * (i + 1))
            tx.send_raw(b"mkt.EURUSD.3600")  # one frame on a SUB: malformed
            assert ingress.recv_bars(timeout=0.2) is None
    st = ingress.stats()
    assert st["rejected"] == 4 and st["dead_letters"] == 2 and st["dead_letters_dropped"] == 2
    assert [r.size for r in seen] == [16, 17, 18, 15]  # the hook sees every one
    assert ingress.dead_letters() == seen[2:]
    with T.MarketIngress("inproc://x2") as no_engine, pytest.raises(RuntimeError, match="no engine"):
        no_engine.pump()


@pytest.fixture()
def pull_pair() -> Iterator[tuple[T.MarketIngress, zmq.Socket]]:
    addr = f"inproc://pull-pair-{uuid.uuid4().hex}"  # a closed inproc name is freed asynchronously
    ingress = T.MarketIngress(addr, max_frame=4096)
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(addr)
    yield ingress, push
    push.close(linger=0)
    ingress.close()


def test_ingress_survives_garbage_frames(pull_pair) -> None:
    ingress, push = pull_pair
    good = P.Codec(P.PreparedMarketContext).encode(P.split_bars(market(3))[0])

    @settings(max_examples=200, deadline=None)
    @given(frames=st.lists(st.binary(max_size=5000), min_size=1, max_size=3))
    def check(frames: list[bytes]) -> None:
        before = ingress.stats()
        push.send_multipart(frames)
        push.send(good)  # a valid frame after each bad one: the ingress keeps working
        bars = ingress.recv_bars(timeout=TIMEOUT)
        assert bars is not None
        after = ingress.stats()
        assert after["frames"] - before["frames"] in (1, 2)
        if after["frames"] - before["frames"] == 2:  # the garbage was refused, with a reason
            assert after["rejected"] == before["rejected"] + 1

    check()


def _eur_context(n: int) -> bytes:
    bars = market(n)
    return P.Codec(P.PreparedMarketContext).encode(
        P.PreparedMarketContext.from_bars(bars[bars["instrument"] == dc.instruments.id("EURUSD")]))


BAD_INGRESS_FRAMES = [
    ("oversized", _eur_context(200)),  # about 9 kB > max_frame 4096
    ("version", msgspec.msgpack.encode({"type": "market", "version": P.PAYLOAD_VERSION + 1})),
    ("truncated", P.Codec(P.PreparedMarketContext).encode(P.split_bars(market(3))[0])[:-5]),
    ("unknown_field", msgspec.msgpack.encode({"type": "market", "colour": 1})),
    ("unknown_tag", msgspec.msgpack.encode({"type": "signal_batch", "epoch": 1, "seq": 0, "signals": []})),
    ("malformed", b"\xc1"),
]


@pytest.mark.parametrize("reason,frame", BAD_INGRESS_FRAMES, ids=[r for r, _ in BAD_INGRESS_FRAMES])
def test_ingress_rejects_each_kind_of_bad_frame(pull_pair, reason: str, frame: bytes) -> None:
    ingress, push = pull_pair
    push.send(frame)
    assert ingress.recv_bars(timeout=0.2) is None
    assert ingress.stats()["rejects"] == {reason: 1}
    (dead,) = ingress.dead_letters()
    assert dead.reason == reason and dead.size == len(frame) and dead.ts > 0


# ---- control plane ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("keys")
    T.new_keypair(d, "server")
    T.new_keypair(d / "clients", "ops")
    T.new_keypair(d / "strangers", "mallory")  # never authorised
    return d


def test_keypair_files(keys: Path) -> None:
    import zmq.auth

    pub, sec = zmq.auth.load_certificate(str(keys / "server.key_secret"))
    assert sec and zmq.auth.load_certificate(str(keys / "server.key"))[0] == pub
    assert (keys / "server.key_secret").stat().st_mode & 0o777 == 0o600
    assert "secret" not in (keys / "server.key").read_text().split("metadata")[1]
    assert T.authorised_keys(keys / "clients") == {T.load_public_key(keys / "clients" / "ops.key")}
    with pytest.raises(FileExistsError):
        T.new_keypair(keys, "server")
    with pytest.raises(ValueError):
        T.new_keypair(keys, "../escape")
    # a public key file where a secret one belongs: said so, not "chmod 600" (0644 is right for it)
    with pytest.raises(ValueError, match=r"no secret key in it \(pass the \.key_secret file\)"):
        T.load_keypair(keys / "server.key")


def test_a_key_file_that_is_not_a_regular_file_is_refused_not_read(tmp_path: Path, keys: Path) -> None:
    # a FIFO would block the read forever; a device is no key (and "chmod 600 /dev/null" bad advice)
    fifo = tmp_path / "fifo.key_secret"
    os.mkfifo(fifo, 0o600)
    for call, what in ((T.load_keypair, "secret key file"), (T.load_public_key, "public key file")):
        with pytest.raises(ValueError, match=f"{what} .*fifo.key_secret is not a regular file"):
            call(fifo)
    with pytest.raises(ValueError, match="secret key file /dev/null is not a regular file"):
        T.load_keypair("/dev/null")
    auth = tmp_path / "clients"
    auth.mkdir(mode=0o700)
    (auth / "ops.key").write_bytes((keys / "clients" / "ops.key").read_bytes())
    os.mkfifo(auth / "late.key", 0o600)
    with pytest.raises(ValueError, match="authorised key file .*late.key is not a regular file"):
        T.authorised_keys(auth)
    # key text passed where a file belongs: not echoed back (it may be the secret)
    secret = T.load_keypair(keys / "server.key_secret")[1].decode()
    with pytest.raises(FileNotFoundError, match="40 key characters, not a file name") as e:
        T.load_keypair(secret)
    assert secret not in str(e.value)
    with pytest.raises(FileNotFoundError, match="secret key file not found: /nonexistent/x"):
        T.load_keypair(b"/nonexistent/x")  # a bytes path, as os.fspath allows


class Served:
    """A ControlServer served by a thread of this process (clients may be other processes)."""

    def __init__(self, keys: Path, **kw) -> None:
        self.applied: list = []
        kw.setdefault("handler", self._apply)
        self.server = T.ControlServer(secret_key=keys / "server.key_secret", authorized_keys=keys / "clients", **kw)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _apply(self, cmd):
        self.applied.append(cmd)
        if isinstance(cmd, P.Snapshot) and cmd.path == "boom":
            raise RuntimeError("disk on fire")
        return {"applied": type(cmd).__name__, "n": len(self.applied)}

    def _run(self) -> None:
        while not self._stop.is_set():
            self.server.serve(timeout=0.01)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.server.close()


@pytest.fixture()
def served(keys: Path) -> Iterator[Served]:
    s = Served(keys)
    yield s
    s.close()


def _client(served: Served, keys: Path, who: str = "clients/ops", **kw) -> T.ControlClient:
    return T.ControlClient(served.server.endpoint, server_key=keys / "server.key",
                           client_key=keys / f"{who}.key_secret", **kw)


def test_curve_authorised_client_gets_replies(served: Served, keys: Path) -> None:
    for fmt in ("msgpack", "json"):
        with _client(served, keys, fmt=fmt) as c:
            r = c.set_throttle(100)
            assert r.ok and r.result["applied"] == "SetThrottle" and r.request_id > 0
            assert c.update_routing({"EURUSD": "paper"}).ok
    assert [type(c).__name__ for c in served.applied] == ["SetThrottle", "UpdateRouting"] * 2
    st = served.server.stats()
    assert st["accepted"] == 4 and st["auth_refused"] == 0 and st["auth_allowed"] >= 2


def test_curve_unknown_key_is_refused(served: Served, keys: Path) -> None:
    with _client(served, keys, who="strangers/mallory") as bad:
        with pytest.raises(TransportTimeout, match="not authorised"):
            bad.pause(timeout=0.5)
    # the client gives up after 0.5 s whether or not the server's ZAP thread has run yet (its
    # timeout message always names the possible causes): wait for the refusal to be counted
    mallory = T.load_public_key(keys / "strangers" / "mallory.key").decode()
    _until(lambda: mallory in served.server.refused_keys, what="the refusal of mallory's key")
    assert served.applied == []
    st = served.server.stats()
    assert st["auth_refused"] >= 1 and st["requests"] == 0
    # a client that knows the wrong server key cannot talk either
    with T.ControlClient(served.server.endpoint, server_key=keys / "clients" / "ops.key",
                         client_key=keys / "clients" / "ops.key_secret") as confused:
        with pytest.raises(TransportTimeout):
            confused.health(timeout=0.3)
    with _client(served, keys) as good:  # the server still serves everyone else
        assert good.health().ok


def test_malformed_commands_get_error_replies(served: Served, keys: Path) -> None:
    with _client(served, keys) as c:
        r = c.send_raw(b"\xc1 not msgpack")
        assert not r.ok and r.request_id == 0 and r.error.startswith("malformed")
        r = c.send_raw(msgspec.msgpack.encode({"type": "format_disk", "request_id": 77}))
        assert not r.ok and r.request_id == 77 and "unknown_tag" in r.error
        r = c.send_raw(msgspec.msgpack.encode({"type": "pause", "request_id": 78, "version": 99}))
        assert not r.ok and r.request_id == 78 and r.error.startswith("version")
        r = c.send_raw(b'{"type": "set_throttle", "request_id": 79, "max_bars_per_s": -1}')
        assert not r.ok and r.request_id == 79 and "invalid" in r.error  # a JSON request, a JSON reply
        c.socket.send_multipart([b"", b"one", b"two"])  # too many frames
        r = c.send_raw(msgspec.msgpack.encode({"type": "health", "request_id": 80}))
        assert not r.ok and "one payload frame" in r.error  # the first reply: to the bad message
        r = c.send_raw(msgspec.msgpack.encode({"type": "health", "request_id": 81}))
        assert r.ok and r.request_id == 80  # then the health request; 81's reply is skipped below
        r = c.snapshot("boom")  # the handler raises: an error reply, the server goes on
        assert not r.ok and "disk on fire" in r.error
        assert c.health().ok
    st = served.server.stats()
    assert st["errors"] == 6 and st["handler_errors"] == 1 and st["rejected"] == 5
    assert st["rejects"] == {"malformed": 2, "unknown_tag": 1, "version": 1, "invalid": 1}


DEEP = 100_000


def _mp_map(*pairs: tuple[str, bytes]) -> bytes:
    """A msgpack map from keys and already encoded values (lets a value be a crafted nesting)."""
    assert len(pairs) < 16
    return bytes([0x80 | len(pairs)]) + b"".join(msgspec.msgpack.encode(k) + v for k, v in pairs)


def _js_obj(*pairs: tuple[str, bytes]) -> bytes:
    return b"{" + b", ".join(json.dumps(k).encode() + b": " + v for k, v in pairs) + b"}"


MP_DEEP = b"\x91" * DEEP + b"\xc0"  # [[[...[nil]...]]]
JS_DEEP = b"[" * DEEP + b"]" * DEEP
MP_WIDE = b"\xdd" + (4 << 20).to_bytes(4, "big") + b"\xc0" * (4 << 20)  # 4 Mi nils: 4 MiB on the wire


@pytest.mark.parametrize("raw,rid", [
    (_mp_map(("type", msgspec.msgpack.encode("pause")), ("request_id", msgspec.msgpack.encode(91)),
             ("junk", MP_DEEP)), 0),  # deeper than msgspec skips: no id, but no harm either
    (_mp_map(("junk", b"\x91" * 100 + b"\xc0"), ("request_id", msgspec.msgpack.encode(92)),
             ("type", msgspec.msgpack.encode("pause"))), 92),
    (_mp_map(("type", msgspec.msgpack.encode("pause")), ("request_id", msgspec.msgpack.encode(93)),
             ("junk", MP_WIDE)), 93),
    (_mp_map(("request_id", msgspec.msgpack.encode(94)), ("junk", MP_DEEP[:-1])), 0),  # truncated too
    (_mp_map(("request_id", msgspec.msgpack.encode(True)), ("junk", b"\xc0")), 0),  # a bool is no id
    (_js_obj(("type", b'"pause"'), ("request_id", b"96"), ("junk", JS_DEEP)), 0),
    (_js_obj(("junk", b'[{"a": "]}\\""}, ' + b"[" * 100 + b"]" * 100 + b"]"), ("request_id", b"97")), 97),
    (_js_obj(("request_id", b"-1"), ("junk", b"[]")), 0),
    (_js_obj(("request_id", b"1e3"), ("junk", b"[]")), 0),
], ids=["mp-deep", "mp-nested-before", "mp-wide", "mp-truncated", "mp-bool", "js-deep", "js-nested-before",
        "js-negative", "js-float"])
def test_malformed_command_nested_or_huge_gets_an_error_reply(served: Served, keys: Path, raw: bytes,
                                                              rid: int) -> None:
    # the id is read by a typed decode that builds none of the command's other fields: a wide
    # one costs no memory, a deep one gives up (id 0); the server answers and goes on
    with _client(served, keys) as c:
        tracemalloc.start()
        try:
            r = c.send_raw(raw, timeout=TIMEOUT)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert not r.ok and r.request_id == rid
        assert peak < len(raw) // 2 + (1 << 20), f"{peak} bytes allocated for a {len(raw)}-byte command"
        assert c.health().ok  # the server goes on
    assert served.applied == [P.HealthQuery(request_id=served.applied[0].request_id)]


@pytest.mark.parametrize("raw", [
    b'{"type": "pause", "version": 1, "request_id": 18446744073709551616}',
    b'{"type": "review", "version": 1, "request_id": 5, "item": 18446744073709551616, "approve": true}',
])
def test_a_json_integer_beyond_64_bits_gets_an_error_reply(served: Served, keys: Path, raw: bytes) -> None:
    with _client(served, keys) as c:
        r = c.send_raw(raw, timeout=TIMEOUT)
        assert not r.ok and r.error == "invalid: an integer does not fit in 64 bits"
        assert c.health().ok  # the server goes on
    assert [type(cmd) for cmd in served.applied] == [P.HealthQuery]


def test_a_request_that_breaks_the_server_gets_an_error_and_the_next_is_served(served: Served, keys: Path,
                                                                               monkeypatch) -> None:
    real = served.server._handle
    broken = [True]

    def handle_once_broken(frames):
        if broken.pop() if broken else False:
            raise MemoryError("no room")
        return real(frames)

    monkeypatch.setattr(served.server, "_handle", handle_once_broken)
    with _client(served, keys) as c:
        r = c.pause()
        assert not r.ok and r.error == "internal error: MemoryError"
        assert c.health().ok
    assert served.server.stats()["handler_errors"] == 1


def test_control_survives_garbage(served: Served, keys: Path) -> None:
    with _client(served, keys) as c:
        @settings(max_examples=60, deadline=None)
        @given(data=st.binary(max_size=2000))
        def check(data: bytes) -> None:
            r = c.send_raw(data, timeout=TIMEOUT)
            assert isinstance(r, P.ControlReply)

        check()
        assert c.health().ok


def test_oversized_control_frame(keys: Path) -> None:
    s = Served(keys, max_frame=1024)
    try:
        with _client(s, keys) as c:
            r = c.update_routing({f"k{i}": "v" * 20 for i in range(100)})
            assert not r.ok and r.error.startswith("oversized")
            assert c.pause().ok
    finally:
        s.close()


def test_journal_hook_runs_before_apply_and_can_veto(keys: Path) -> None:
    journal: list[bytes] = []
    s = Served(keys, journal_hook=journal.append)
    try:
        handler = s.server.handler

        def check_journaled_first(cmd):
            assert P.decode_command(journal[-1]) == cmd  # journaled before it is applied
            return handler(cmd)

        s.server.handler = check_journaled_first
        with _client(s, keys) as c:
            assert c.swap_persona("calm").ok and c.pause().ok
            c.send_raw(b"\xc1")  # malformed: never journaled
            assert [type(P.decode_command(r)) for r in journal] == [P.SwapPersona, P.Pause]

            def full(raw: bytes) -> None:
                raise OSError("journal disk full")

            s.server.journal_hook = full
            r = c.resume()
            assert not r.ok and "not journaled" in r.error
            assert [type(x) for x in s.applied] == [P.SwapPersona, P.Pause]  # Resume not applied
    finally:
        s.close()
    assert s.server.stats()["journal_errors"] == 1


# ---- the service -----------------------------------------------------------------------------

def _wait_heartbeat(sub: T.SignalSubscriber) -> None:
    while sub.heartbeats == 0:
        assert sub.recv(timeout=TIMEOUT) is not None, "no heartbeat"


def test_service_across_processes(keys: Path, peers: list[Peer]) -> None:
    svc = Peer("service", str(keys))
    peers.append(svc)
    ep = svc.line()
    bars = market()
    want = {s.seq: _no_hash(s) for s in _expected_signals()}
    with T.SignalSubscriber(ep["feed"]) as sub, \
            T.MarketSender(ep["ingress"]) as tx, \
            T.ControlClient(ep["control"], server_key=keys / "server.key",
                            client_key=keys / "clients" / "ops.key_secret") as ctl:
        _wait_heartbeat(sub)  # subscribed: nothing published from now on is missed
        assert ctl.pause().result == {"paused": True}
        tx.send(bars[:50])
        # paused: the bars wait in the ingress socket; nothing is submitted
        assert ctl.health().result["service"]["bars_submitted"] == 0
        assert ctl.resume().ok
        tx.send(bars[50:])
        got = {}
        while len(got) < len(want):
            msg = sub.recv(timeout=TIMEOUT)
            assert msg is not None, f"{len(got)} of {len(want)} signals"
            if isinstance(msg, P.SignalBatch):
                got.update((s.seq, _no_hash(s)) for s in msg.signals)
        assert sorted(got) == sorted(want)
        differ = [k for k in sorted(want) if got[k] != want[k]]
        assert not differ, (len(differ), differ[:5], got[differ[0]], want[differ[0]])
        assert sub.gap_count == 0 and not sub.gaps
        assert sub.epoch == ep["epoch"], (sub.epoch, ep["epoch"])
        health = ctl.health().result
        assert health["engine"]["bars_in"] == len(bars) and health["engine"]["rejected"] == 2
        assert health["service"]["signals_published"] == len(want)
        snap = ctl.snapshot("agents.npy")
        assert snap.ok and snap.result["agents"] == 300
        agents = np.load(snap.result["path"])
        assert agents.dtype == dc.AGENT_DTYPE and len(agents) == 300
        assert not ctl.snapshot("../outside.npy").ok  # confined to snapshot_dir
        r = ctl.load_population(path="pop.npy")
        assert not r.ok and "not supported while running" in r.error
        assert ctl.swap_persona("contrarian").result == {"persona": "contrarian"}
    out, _ = svc.finish()
    final = json.loads(out.strip().splitlines()[-1])
    # 8 commands: the two refusals are refused before they are journaled or applied, and the two
    # health queries change nothing, so they are applied but not journaled
    assert final["journaled"] == 4 and final["commands"] == 6 and final["errors"] == 2


def test_service_throttle_and_pause_in_process(tmp_path: Path) -> None:
    clean = dc.sim.MarketSimulator(["EURUSD", "GBPUSD"], timeframe="H1", seed=3).bars(70)
    with dc.Engine(population(), threads=1) as eng:
        ingress = T.MarketIngress(f"ipc://{tmp_path / 'in.sock'}")
        feed = T.SignalFeed(f"ipc://{tmp_path / 'out.sock'}", heartbeat_interval=0.02)
        svc = T.EngineService(eng, ingress=ingress, feed=feed, idle_timeout=0.005)
        with svc, T.SignalSubscriber(feed.endpoint) as sub, T.MarketSender(ingress.endpoint) as tx:
            svc.start()
            _wait_heartbeat(sub)
            svc.apply(P.SetThrottle(max_bars_per_s=200))
            bars = clean[:120]
            t0 = time.monotonic()
            tx.send(bars)
            n = 0
            while n < 120:
                msg = sub.recv(timeout=TIMEOUT)
                assert msg is not None
                n += len(getattr(msg, "signals", ()))
            # 120 bars at 200/s with 10-bar bursts cannot take less than ~0.55 s
            assert time.monotonic() - t0 >= 0.5
            assert svc.apply(P.Pause()) == {"paused": True}
            tx.send(clean[120:])
            assert sub.recv(timeout=0.3) is None or sub.signals_received == 120
            assert svc.stats()["bars_submitted"] == 120
            svc.apply(P.SetThrottle(max_bars_per_s=0))
            svc.apply(P.Resume())
            while sub.signals_received < 140:
                assert sub.recv(timeout=TIMEOUT) is not None
        assert eng.stats()["bars_in"] == 140


def test_a_strict_engine_behind_the_service_refuses_bad_pieces_and_the_stream_goes_on(tmp_path: Path) -> None:
    clean = dc.sim.MarketSimulator(["EURUSD"], timeframe="H1", seed=3).bars(40)
    bad = clean[10:20].copy()
    bad["high"][4] = bad["low"][4] - 1.0
    with dc.Engine(population(), threads=1, strict=True) as eng:
        ingress = T.MarketIngress(f"ipc://{tmp_path / 'in.sock'}")
        svc = T.EngineService(eng, ingress=ingress, on_signals=lambda s: None, idle_timeout=0.005)
        with svc, T.MarketSender(ingress.endpoint) as tx:
            svc.start()
            tx.send(clean[:10])
            tx.send(bad)
            tx.send(clean[20:])
            deadline = time.monotonic() + TIMEOUT
            while svc.stats()["bars_submitted"] + svc.stats()["strict_refused"] < 40:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            st = svc.stats()
            assert st["running"] and st["error"] is None
            assert (st["bars_submitted"], st["strict_refused"]) == (30, 10)
        assert eng.stats()["bars_in"] == 30 and eng.stats()["rejected"] == 0


def test_service_journals_commands_in_order_with_the_bars(tmp_path: Path, keys: Path) -> None:
    clean = dc.sim.MarketSimulator(["EURUSD", "GBPUSD"], timeframe="H1", seed=4).bars(30)
    eng = dc.Engine(population(), threads=1, journal=tmp_path / "journal")
    control = T.ControlServer(secret_key=keys / "server.key_secret", authorized_keys=keys / "clients")
    svc = T.EngineService(eng, control=control, on_signals=lambda s: None)
    assert control.journal_hook == eng.journal_control  # wired because the engine has a journal
    try:
        svc.start()
        with T.ControlClient(control.endpoint, server_key=keys / "server.key",
                             client_key=keys / "clients" / "ops.key_secret") as c:
            eng.submit(clean[:20])
            assert c.set_throttle(50).ok
            eng.submit(clean[20:])
            assert c.pause().ok and c.swap_persona("calm").ok
    finally:
        svc.close()
        eng.close()
    replayed: list = []
    res = dc.journal.replay(tmp_path / "journal", on_control=lambda raw: replayed.append(P.decode_command(raw)))
    assert [type(x) for x in replayed] == [P.SetThrottle, P.Pause, P.SwapPersona]
    assert [n for n, _ in res.controls] == [20, 60, 60]  # between the same bars as when it ran
    assert replayed[0].max_bars_per_s == 50 and res.ok


# ---- CLI -------------------------------------------------------------------------------------

def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dynamic_core", *args], capture_output=True, text=True,
                          timeout=timeout, env=_env(), check=False)


def test_cli_help_teaches() -> None:
    for cmd, words in [("subscribe", ["sig.EURUSD.", "--json", "gap"]), ("ctl", ["pause", "throttle N", "CURVE"]),
                       ("keys", ["new", ".key_secret"]), ("run", ["--publish", "--feed", "--control"])]:
        p = _cli(cmd, "--help")
        assert p.returncode == 0
        for w in words:
            assert w in p.stdout, (cmd, w)


def test_cli_keys_new(tmp_path: Path) -> None:
    p = _cli("keys", "new", str(tmp_path / "k"), "--name", "srv")
    assert p.returncode == 0, p.stderr
    public = T.load_public_key(tmp_path / "k" / "srv.key").decode()
    assert public in p.stdout
    _, secret = T.load_keypair(tmp_path / "k" / "srv.key_secret")
    assert secret.decode() not in p.stdout + p.stderr  # never printed
    p = _cli("keys", "new", str(tmp_path / "k"), "--name", "srv")
    assert p.returncode == 2 and "exists" in p.stderr and "Traceback" not in p.stderr
    assert _cli("keys", "new", str(tmp_path / "k"), "--name", "srv", "--force").returncode == 0


@pytest.mark.parametrize("as_json", [False, True])
def test_cli_subscribe(as_json: bool, peers: list[Peer]) -> None:
    with T.SignalFeed(heartbeat_interval=0.05) as feed:
        args = ["subscribe", feed.endpoint, "--count", "7", "--topic", "sig.EURUSD."] + (["--json"] if as_json else [])
        sub = Peer(*args, module=True)
        peers.append(sub)
        assert feed.wait_for_subscribers(1, timeout=TIMEOUT)
        with dc.Engine(population(), threads=1) as eng:
            sigs = eng.run(market(20))
        feed.publish(sigs)
        out, err = sub.finish()
    lines = out.strip().splitlines()
    assert len(lines) == 7
    eur = [s for s in P.signals_from_records(sigs) if s.instrument == "EURUSD"][:7]
    if as_json:
        assert [_no_hash(msgspec.json.decode(x, type=P.AISignal)) for x in lines] == [_no_hash(s) for s in eur]
    else:
        assert all("EURUSD" in x and "H1" in x for x in lines)
        assert f"seq {eur[3].seq} " in lines[3]
    assert "received 7 signal(s); 0 missed" in err


def test_cli_subscribe_times_out_cleanly() -> None:
    with T.SignalFeed(heartbeat_interval=3600) as feed:
        p = _cli("subscribe", feed.endpoint, "--timeout", "0.3")
    assert p.returncode == 1 and "no message within 0.3 s" in p.stderr and "Traceback" not in p.stderr
    assert "received 0 signal(s); 0 missed in 0 gap(s)" in p.stderr  # the summary, on a timeout too


def test_a_request_that_timed_out_on_a_down_server_is_not_applied_when_one_starts(keys: Path) -> None:
    """The client queues only to a connection whose handshake succeeded: a command that timed
    out while no server listened must not be delivered (and applied) once one starts there."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    addr = f"tcp://127.0.0.1:{port}"
    with T.ControlClient(addr, server_key=keys / "server.key",
                         client_key=keys / "clients" / "ops.key_secret") as c:
        with pytest.raises(TransportTimeout, match="no connection"):
            c.pause(timeout=0.3)
        served = Served(keys, address=addr)
        try:
            assert c.health(timeout=TIMEOUT).ok  # the server answers the client now
            time.sleep(0.3)
            assert [type(x) for x in served.applied] == [P.HealthQuery]  # not the timed-out Pause
        finally:
            served.close()


def test_cli_ctl(served: Served, keys: Path) -> None:
    common = ["--server-key", str(keys / "server.key"), "--client-key", str(keys / "clients" / "ops.key_secret")]
    p = _cli("ctl", served.server.endpoint, "throttle", "250", *common)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {"applied": "SetThrottle", "n": 1}
    p = _cli("ctl", served.server.endpoint, "routing", "deep=claude,gemini", "tactical/macro/fx=groq",
             "--json-wire", *common)
    assert p.returncode == 0 and served.applied[-1] == P.UpdateRouting(
        request_id=served.applied[-1].request_id, table={"deep": "claude,gemini", "tactical/macro/fx": "groq"})
    for bad, msg in ((["EURUSD=paper"], "unknown request class 'EURUSD'"), ([], "or 'clear'"),
                     (["deep"], "expected KEY=VALUE"), (["deep=a,"], "expected PROVIDER")):
        p = _cli("ctl", served.server.endpoint, "routing", *bad, *common)
        assert p.returncode == 2 and msg in p.stderr and "Traceback" not in p.stderr, (bad, p.stderr)
    p = _cli("ctl", served.server.endpoint, "snapshot", "boom", *common)
    assert p.returncode == 1 and "disk on fire" in p.stderr
    p = _cli("ctl", served.server.endpoint, "throttle", "fast", *common)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    stranger = ["--server-key", str(keys / "server.key"), "--client-key",
                str(keys / "strangers" / "mallory.key_secret"), "--timeout", "0.3"]
    p = _cli("ctl", served.server.endpoint, "pause", *stranger)
    assert p.returncode == 2 and "no connection" in p.stderr and "Traceback" not in p.stderr
    # a secret key pasted in place of a file name is refused without being echoed
    secret = next(line.split('"')[1] for line in (keys / "clients" / "ops.key_secret").read_text().splitlines()
                  if line.strip().startswith("secret-key"))
    # as --opt=VALUE and as --opt VALUE: a Z85 key may begin with "-", which argparse alone would
    # take for an option ("expected one argument")
    dash_secret = "-" + secret[1:]
    for key, args in ((secret, ["--server-key", str(keys / "server.key"), f"--client-key={secret}"]),
                      (secret, [f"--server-key={secret}", "--client-key", str(keys / "clients" / "ops.key_secret")]),
                      (dash_secret, ["--server-key", str(keys / "server.key"), "--client-key", dash_secret]),
                      (dash_secret, ["--server-key", dash_secret, "--client-key", str(keys / "clients" / "ops.key_secret")])):
        p = _cli("ctl", served.server.endpoint, "health", *args)
        assert p.returncode == 2 and "40 key characters" in p.stderr, (args, p.stderr)
        assert key not in p.stderr + p.stdout and key[1:] not in p.stderr + p.stdout
    p = _cli("ctl", served.server.endpoint, "routing", "clear", *common)
    assert p.returncode == 0 and served.applied[-1].table == {}
    assert [type(c) for c in served.applied] == [P.SetThrottle, P.UpdateRouting, P.Snapshot, P.UpdateRouting]


def test_cli_run_publishes_to_a_subscriber(tmp_path: Path, peers: list[Peer]) -> None:
    addr = f"ipc://{tmp_path / 'run.sock'}"
    run = Peer("run", "--agents", "300", "--instruments", "2", "--bars", "50", "--publish", addr,
               "--wait-subscribers", "1", "--heartbeat", "0.05", module=True)
    peers.append(run)
    with T.SignalSubscriber(addr) as sub:
        n = 0
        while n < 100:
            msg = sub.recv(timeout=TIMEOUT)
            assert msg is not None, f"{n} signals; {run.proc.poll()}"
            n += len(getattr(msg, "signals", ()))
        assert sub.gap_count == 0
    out, _ = run.finish()
    assert "signals 100, published 100;" in out


def test_cli_run_serves_a_market_feed_with_control(tmp_path: Path, keys: Path, peers: list[Peer]) -> None:
    bars_addr, sig_addr = f"ipc://{tmp_path / 'bars.sock'}", f"ipc://{tmp_path / 'sig.sock'}"
    run = Peer("run", "--agents", "300", "--instruments", "EURUSD,GBPUSD", "--feed", bars_addr, "--publish", sig_addr,
               "--heartbeat", "0.05", "--control", "tcp://127.0.0.1:*", "--server-key", str(keys / "server.key_secret"),
               "--authorized", str(keys / "clients"), "--journal", str(tmp_path / "journal"), module=True)
    peers.append(run)
    lines = [run.proc.stdout.readline() for _ in range(4)]  # the banner names the endpoints
    control = next(x.split()[2] for x in lines if x.strip().startswith("control"))
    bars = dc.sim.MarketSimulator(["EURUSD", "GBPUSD"], timeframe="H1", seed=8).bars(40)
    with T.SignalSubscriber(sig_addr) as sub, T.MarketSender(bars_addr) as tx, \
            T.ControlClient(control, server_key=keys / "server.key",
                            client_key=keys / "clients" / "ops.key_secret") as ctl:
        _wait_heartbeat(sub)
        tx.send(bars)
        while sub.signals_received < 80:
            assert sub.recv(timeout=TIMEOUT) is not None
        assert ctl.health().result["engine"]["bars_in"] == 80
        # snapshots are confined to a directory by default (with --journal: JOURNAL/snapshots)
        snap = ctl.snapshot("s1")
        assert snap.ok and Path(snap.result["path"]) == (tmp_path / "journal" / "snapshots" / "s1.npy").resolve()
        for outside in (str(tmp_path / "abs"), "../escape", "../../x"):
            r = ctl.snapshot(outside)
            assert not r.ok and "leaves the snapshot directory" in r.error
    run.proc.send_signal(signal.SIGINT)  # serves until interrupted
    out, err = run.proc.communicate(timeout=TIMEOUT)
    assert run.proc.returncode == 130, err
    assert "signals 80, published 80;" in out and "control commands 2;" in out  # the refusals never applied
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bars.sock", "journal", "sig.sock"]
    assert dc.journal.verify(tmp_path / "journal").status == "ok"
    p = _cli("run", "--bars", "5", "--snapshot-dir", str(tmp_path / "s"))
    assert p.returncode == 2 and "--snapshot-dir only makes sense with --control" in p.stderr



def _service(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "dynamic_core", "run", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())


def _summary(out: str) -> int:
    """The signal count of run's summary line, which must equal the count published."""
    m = re.search(r"signals ([\d,]+), published ([\d,]+);", out)
    assert m is not None and m[1] == m[2], out
    return int(m[1].replace(",", ""))


def test_cli_run_service_stops_on_sigterm_as_on_sigint(tmp_path: Path) -> None:
    # SIGTERM (systemd, docker, kill) killed the service: signals of bars the engine had taken and
    # journaled were never published, and no summary was printed
    bars_addr, sig_addr = f"ipc://{tmp_path / 'bars.sock'}", f"ipc://{tmp_path / 'sig.sock'}"
    run = _service("--agents", "4000", "--instruments", "EURUSD,GBPUSD", "--feed", bars_addr,
                   "--publish", sig_addr, "--heartbeat", "0.05", "--journal", str(tmp_path / "j"))
    try:
        for _ in range(4):  # the banner: every socket is bound
            run.stdout.readline()
        bars = dc.sim.MarketSimulator(["EURUSD", "GBPUSD"], timeframe="H1", seed=8).bars(3000)
        with T.SignalSubscriber(sig_addr) as sub, T.MarketSender(bars_addr, max_bars=500) as tx:
            _wait_heartbeat(sub)
            tx.send(bars)
            while sub.signals_received < 100:
                assert sub.recv(timeout=TIMEOUT) is not None
            run.send_signal(signal.SIGTERM)
            out, err = run.communicate(timeout=TIMEOUT)
            while sub.recv(timeout=1.0) is not None:  # the process has ended: what it sent is here
                pass
        assert run.returncode == 130, err
        assert "Traceback" not in err
        taken = sum(len(r.payload) // dc.BAR_DTYPE.itemsize for r in dc.journal.read(tmp_path / "j")
                    if r.type == "bars")
        # one signal per bar taken (every stream has agents), each one published and received
        assert sub.signals_received == taken == _summary(out) and sub.gap_count == 0
    finally:
        run.kill()
        run.communicate()


def test_cli_run_service_a_second_interrupt_does_not_cut_its_stop_short(tmp_path: Path) -> None:
    # a second ^C during the stop closed the sockets and the engine under the service's threads
    # (a traceback from the egress thread, signals computed and never published, no summary)
    addr = f"ipc://{tmp_path / 'sig.sock'}"
    run = _service("--agents", "4000", "--instruments", "1", "--bars", "100000", "--chunk", "20000",
                   "--publish", addr, "--wait-subscribers", "1", "--heartbeat", "0.05")
    err: list[str] = []
    try:
        for _ in range(3):
            run.stdout.readline()
        threading.Thread(target=lambda: err.extend(run.stderr), daemon=True).start()
        with T.SignalSubscriber(addr) as sub:
            while sub.signals_received == 0:
                assert sub.recv(timeout=TIMEOUT) is not None
            run.send_signal(signal.SIGINT)
            # ^C again and again until the service says it is already stopping (or it has ended)
            while run.poll() is None and not any("already stopping" in line for line in err):
                time.sleep(0.02)
                run.send_signal(signal.SIGINT)
            out = run.stdout.read()
            run.wait(timeout=TIMEOUT)
        assert run.returncode == 130, err
        assert any("already stopping" in line for line in err)
        assert not any("Traceback" in line for line in err)
        assert _summary(out) > 0
    finally:
        run.kill()
        run.communicate()


def test_topics_are_bounded() -> None:
    import zmq
    from dynamic_core.transport._common import MAX_TOPIC

    long = "sig." + "A" * 200_000  # libzmq's subscription trie would recurse once per byte
    with pytest.raises(ValueError, match="topic prefix"):
        T.SignalSubscriber("tcp://127.0.0.1:5999", topics=[long])
    with pytest.raises(ValueError, match="topic prefix"):
        T.MarketIngress("tcp://127.0.0.1:5999", kind="sub", topics=["mkt." + "A" * 200_000])
    # a publisher's topic frames longer than any feed topic are rejected, not tracked
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    sub = T.SignalSubscriber(f"tcp://127.0.0.1:{port}", topics=["sig."])
    try:
        pub.setsockopt(zmq.RCVTIMEO, 10_000)
        while pub.recv() != b"\x01sig.":  # the subscriber's subscription has reached the publisher
            pass
        empty = msgspec.msgpack.encode(P.SignalBatch(epoch=1, seq=0, signals=()))
        good = b"sig.EURUSD.3600"
        for topic in (b"sig." + b"A" * MAX_TOPIC, good):
            pub.send_multipart([topic, empty])
        got = None
        deadline = time.monotonic() + 10
        while got is None and time.monotonic() < deadline:
            got = sub.recv(timeout=0.5)
        assert isinstance(got, P.SignalBatch)
        assert sub.stats()["rejected"] == 1 and list(sub._expect) == [good.decode()]
    finally:
        sub.close()
        pub.close(0)


# ---- service: limits, shutdown, hooks, replay, retries, peers, keys ---------------------------

def _clean(n: int, seed: int = 3) -> np.ndarray:
    """2n bars of two instruments, all valid."""
    return dc.sim.MarketSimulator(["EURUSD", "GBPUSD"], timeframe="H1", seed=seed).bars(n)


@contextlib.contextmanager
def _hooked_service(eng: dc.Engine, tmp_path: Path, hook) -> Iterator[tuple[T.EngineService, T.MarketSender]]:
    """A started service reading bars from an ipc ingress, with ``hook`` as its on_signals, and
    a sender into it; both closed on exit."""
    ingress = T.MarketIngress(f"ipc://{tmp_path / 'in.sock'}")
    svc = T.EngineService(eng, ingress=ingress, on_signals=hook, idle_timeout=0.005)
    with svc, T.MarketSender(ingress.endpoint) as tx:
        svc.start()
        yield svc, tx


def _until(pred, timeout: float = TIMEOUT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout} s"
        time.sleep(0.005)


def test_throttle_is_bounded_and_a_dead_loop_is_reported(tmp_path: Path, caplog) -> None:
    import logging

    # over the wire: infinity (and anything above MAX_BARS_PER_S) and NaN do not decode
    for v in (float("inf"), 1e308, float("nan"), -1.0):
        with pytest.raises(dc.errors.PayloadError):
            P.decode_command(msgspec.msgpack.encode({"type": "set_throttle", "max_bars_per_s": v}))
    assert P.decode_command(msgspec.msgpack.encode({"type": "set_throttle", "max_bars_per_s": P.MAX_BARS_PER_S}))

    def on_reject(rej: P.Reject) -> None:
        raise OSError("dead-letter disk full")

    with dc.Engine(population(), threads=1) as eng:
        ingress = T.MarketIngress(f"ipc://{tmp_path / 'in.sock'}", on_reject=on_reject)
        svc = T.EngineService(eng, ingress=ingress, on_signals=lambda s: None, idle_timeout=0.005)
        with svc, T.MarketSender(ingress.endpoint) as tx:
            # built in-process, a bad rate is refused by apply as well, and changes nothing
            for v in (float("inf"), float("nan"), -1.0, 1e13):
                with pytest.raises(dc.errors.CommandRefused, match="max_bars_per_s"):
                    svc.apply(P.SetThrottle(max_bars_per_s=v))
            assert svc.max_bars_per_s == 0.0
            svc.max_bars_per_s = float("inf")  # set by hand: the token bucket must not overflow
            svc.start()
            tx.send(_clean(10))
            _until(lambda: svc.bars_submitted == 20, what="bars submitted at an infinite rate")
            assert svc.stats()["running"] and svc.stats()["error"] is None
            # an exception that ends the loop (here the documented on_reject hook raising) is
            # recorded, logged once, and shows in stats and the health reply
            with caplog.at_level(logging.ERROR, logger="dynamic_core.transport.service"):
                tx.send_raw(b"\xc1garbage")
                _until(lambda: not svc.stats()["running"], what="the loop ending")
            st = svc.stats()
            assert st["error"] == "OSError: dead-letter disk full" and st["loop_errors"] == 1
            assert svc.apply(P.HealthQuery())["service"]["error"] == "OSError: dead-letter disk full"
            assert len([r for r in caplog.records if "dead-letter disk full" in r.getMessage()]) == 1
            # it may run again; the last error stays reported
            svc.ingress.on_reject = None
            svc.start()
            tx.send(_clean(5, seed=4))
            _until(lambda: svc.bars_submitted == 30, what="bars after the restart")
            assert svc.stats()["running"] and svc.stats()["error"] == "OSError: dead-letter disk full"
            assert svc.stop() is True


def test_stop_that_times_out_keeps_the_threads_and_close_leaves_the_sockets(tmp_path: Path) -> None:
    release, entered = threading.Event(), threading.Event()

    def hook(s: np.ndarray) -> None:
        entered.set()
        release.wait()  # a hook that does not return (until the test lets it)

    bars = _clean(300)  # prefixes of one simulation: each phase sends later bars
    with dc.Engine(population(), threads=1, capacity=16) as eng:
        ingress = T.MarketIngress(f"ipc://{tmp_path / 'in.sock'}")
        feed = T.SignalFeed(f"ipc://{tmp_path / 'out.sock'}")
        svc = T.EngineService(eng, ingress=ingress, feed=feed, on_signals=hook, idle_timeout=0.005)
        try:
            svc.start()
            with pytest.raises(RuntimeError, match="already running"):
                svc.run(duration=0.1)  # a second loop on the same sockets: refused
            with T.MarketSender(ingress.endpoint, send_timeout=1) as tx:
                tx.send(bars[:200])
                assert entered.wait(TIMEOUT)
                t0 = time.monotonic()
                assert svc.stop(timeout=0.3) is False  # the egress thread is stuck in the hook
                assert time.monotonic() - t0 < TIMEOUT / 2  # (it does not wait for the hook)
                # the ingress loop ends (a loaded machine may take longer than the 0.3 s to run it)
                _until(lambda: not svc.stats()["running"], what="the ingress loop ending")
                assert svc.stats()["egress_running"]
                with pytest.raises(RuntimeError, match="still running"):
                    svc.start()
                with pytest.raises(RuntimeError, match="still running"):
                    svc.run(duration=0.1)
                # once the hook returns, the service can run again, with a new egress thread
                release.set()
                _until(lambda: not svc.stats()["egress_running"], what="the egress thread ending")
                svc.start()
                tx.send(bars[200:400])
                _until(lambda: svc.stats()["ingress"]["bars"] > 200 and eng.stats()["in_flight"] == 0
                       and svc.stats()["pending_bars"] == 0 and svc.signals_published >= 200,
                       what="bars after the restart")
                # a stuck hook again: close() does not close the sockets under it
                entered.clear()
                release.clear()
                tx.send(bars[400:])
                assert entered.wait(TIMEOUT)
                assert svc.close(timeout=0.2) is False
                assert not ingress.socket.closed and not feed.socket.closed
                release.set()
                # the last thread to end closes them
                _until(lambda: ingress.socket.closed and feed.socket.closed, what="the deferred close")
            assert svc.stop() is True and svc.close() is True
            st = svc.stats()
            assert not st["running"] and not st["egress_running"] and st["error"] is None
            # every bar taken from the socket was submitted or counted as dropped, none vanished
            assert st["dropped_on_stop"] > 0
            assert st["bars_submitted"] + st["dropped_on_stop"] == st["ingress"]["bars"]
            assert st["bars_submitted"] == eng.stats()["bars_in"]
            with pytest.raises(RuntimeError, match="closed"):
                svc.start()
        finally:
            release.set()
            svc.close()


@pytest.mark.parametrize("how", ["stop", "close"])
def test_stop_or_close_from_the_hook_returns_at_once(how: str, tmp_path: Path) -> None:
    calls: list[tuple[float, object, int]] = []
    svc: T.EngineService | None = None

    def hook(s: np.ndarray) -> None:
        if not calls:
            t0 = time.monotonic()
            result = getattr(svc, how)()
            calls.append((time.monotonic() - t0, result, len(s)))

    with dc.Engine(population(), threads=1) as eng:
        ingress = T.MarketIngress(f"ipc://{tmp_path / 'in.sock'}")
        feed = T.SignalFeed(f"ipc://{tmp_path / 'out.sock'}", heartbeat_interval=3600)
        svc = T.EngineService(eng, ingress=ingress, feed=feed, on_signals=hook, idle_timeout=0.005)
        try:
            with T.SignalSubscriber(feed.endpoint) as sub, T.MarketSender(ingress.endpoint) as tx:
                assert feed.wait_for_subscribers(1, timeout=TIMEOUT)
                svc.start()
                tx.send(_clean(25))
                _until(lambda: bool(calls), what="the hook's call returning")
                (took, result, n), = calls
                assert took < 5.0 and result is False  # it only asked (no wait for its own thread)
                _until(lambda: not svc.stats()["running"] and not svc.stats()["egress_running"],
                       what="the service ending on its own")
                # the batch that called it was still published
                got = 0
                while got < n:
                    msg = sub.recv(timeout=TIMEOUT)
                    assert msg is not None, f"{got} of {n} signals"
                    got += len(getattr(msg, "signals", ()))
                assert svc.signals_published >= n
                if how == "close":
                    _until(lambda: ingress.socket.closed and feed.socket.closed, what="the deferred close")
        finally:
            svc.close()


def test_a_hook_that_feeds_the_engine_gets_an_error_not_a_deadlock(tmp_path: Path) -> None:
    errors: list[BaseException] = []
    extra = _clean(20, seed=9)

    def hook(s: np.ndarray) -> None:
        try:
            eng.submit(extra)
        except RuntimeError as e:
            errors.append(e)

    with dc.Engine(population(), threads=1) as other:
        # the mechanism: a registered consumer thread cannot feed its engine
        other.register_consumer()
        with pytest.raises(RuntimeError, match="consumer thread cannot feed the engine"):
            other.submit(extra[:1])
        with pytest.raises(RuntimeError, match="consumer thread cannot feed the engine"):
            other.run(extra[:1])
        assert other.stats()["bars_in"] == 0
        other.unregister_consumer()
        assert len(other.run(extra[:2])) == 2
    with dc.Engine(population(), threads=1, capacity=16) as eng:
        before = eng.stats()["bars_in"]
        with _hooked_service(eng, tmp_path, hook) as (svc, tx):
            tx.send(_clean(20))
            _until(lambda: svc.signals_published == 40, what="all signals published")
            assert errors and "consumer thread cannot feed the engine" in str(errors[0])
            assert eng.stats()["bars_in"] == before + 40  # the hook's bars were never taken
            assert svc.stop(timeout=TIMEOUT) is True
        assert svc.stats()["hook_errors"] == 0  # the hook caught its error


def test_a_hook_raising_base_exception_loses_nothing(tmp_path: Path) -> None:
    n = {"calls": 0}

    def hook(s: np.ndarray) -> None:
        n["calls"] += 1
        if n["calls"] == 2:
            raise SystemExit("boom")

    with dc.Engine(population(), threads=1, capacity=16) as eng:
        with _hooked_service(eng, tmp_path, hook) as (svc, tx):
            tx.send(_clean(100))
            _until(lambda: svc.signals_published == 200, what="every signal published")
            st = svc.stats()
            assert st["hook_errors"] == 1 and st["egress_running"] and st["error"] is None
            assert svc.stop(timeout=TIMEOUT) is True


def test_replay_control_reproduces_a_run_with_commands(tmp_path: Path, keys: Path) -> None:
    snaps = tmp_path / "snaps"
    snaps.mkdir()
    bars = _clean(100, seed=5)
    live: list[np.ndarray] = []
    eng = dc.Engine(population(), threads=1, journal=tmp_path / "journal")
    control = T.ControlServer(secret_key=keys / "server.key_secret", authorized_keys=keys / "clients")
    svc = T.EngineService(eng, control=control, on_signals=lambda s: live.append(s.copy()), snapshot_dir=snaps)
    try:
        svc.start()
        with T.ControlClient(control.endpoint, server_key=keys / "server.key",
                             client_key=keys / "clients" / "ops.key_secret") as c:
            eng.submit(bars[:50])
            assert c.pause().ok and c.set_throttle(50).ok
            eng.submit(bars[50:100])
            assert c.snapshot("mid").ok and c.health().ok
            r = c.load_population(path="x.npy")
            assert not r.ok and "not supported while running" in r.error
            assert not c.snapshot("../escape").ok and not c.set_throttle(1e13).ok
            eng.submit(bars[100:])
            assert c.resume().ok
            _until(lambda: svc.signals_published == len(bars), what="live signals")
    finally:
        svc.close()
        eng.close()
    live_sig = np.concatenate(live)
    mid = snaps / "mid.npy"
    stamp = (mid.read_bytes(), mid.stat().st_mtime_ns)
    # refusals and queries were never journaled
    res = dc.journal.replay(tmp_path / "journal")
    assert [type(P.decode_command(r)).__name__ for _, r in res.controls] == [
        "Pause", "SetThrottle", "Snapshot", "Resume"]
    # the documented recipe: bit-identical signals, the service's state as it was live, and the
    # snapshot file left alone
    with dc.Engine(population(), threads=1) as scratch:
        again = T.EngineService(scratch, snapshot_dir=snaps)
        res = dc.journal.replay(tmp_path / "journal", on_control=again.replay_control)
        assert res.ok and res.signals.tobytes() == live_sig.tobytes()
        assert again.max_bars_per_s == 50.0 and not again.paused
        assert (mid.read_bytes(), mid.stat().st_mtime_ns) == stamp and sorted(os.listdir(snaps)) == ["mid.npy"]
        # a journal written before refusals were kept out of it still replays: a refused or
        # query command is skipped, never raised
        assert again.replay_control(P.encode_command(P.LoadPopulation(path="x.npy"))) is None
        assert again.replay_control(P.encode_command(P.HealthQuery())) is None
        assert again.replay_control(P.encode_command(P.Pause())) == {"paused": True}


def test_snapshot_paths_stay_in_the_snapshot_directory(tmp_path: Path) -> None:
    snaps, outside = tmp_path / "snaps", tmp_path / "outside"
    snaps.mkdir()
    outside.mkdir()
    # a symlink planted at the old predictable temporary name must not be followed
    (snaps / "link.npy.tmp").symlink_to(outside / "victim")
    with dc.Engine(population(), threads=1) as eng:
        svc = T.EngineService(eng, snapshot_dir=snaps)
        for bad in (".", "a/..", "..", "../x", str(outside / "abs"), "sub/", "a\x00b", "x" * 252):
            with pytest.raises(dc.errors.CommandRefused):
                svc.check(P.Snapshot(path=bad))  # refused before anything is journaled...
            with pytest.raises(dc.errors.CommandRefused):
                svc.apply(P.Snapshot(path=bad))  # ...and when applied
        assert svc.apply(P.Snapshot(path="link"))["path"] == str(snaps / "link.npy")
        assert not (outside / "victim").exists()
        assert svc.apply(P.Snapshot(path="x" * 251))["path"] == str(snaps / ("x" * 251 + ".npy"))  # 255 bytes
        assert sorted(p.name for p in outside.iterdir()) == []
        assert sorted(p.name for p in tmp_path.iterdir()) == ["outside", "snaps"]
        assert sorted(p.name for p in snaps.iterdir()) == ["link.npy", "link.npy.tmp", "x" * 251 + ".npy"]
        assert ((snaps / "link.npy").stat().st_mode & 0o777) == 0o600
        assert len(np.load(snaps / "link.npy")) == 300
        # created on demand when asked to
        svc2 = T.EngineService(eng, snapshot_dir=tmp_path / "later", create_snapshot_dir=True)
        assert svc2.apply(P.Snapshot(path="s"))["path"] == str(tmp_path / "later" / "s.npy")
        assert ((tmp_path / "later").stat().st_mode & 0o777) == 0o700
        # its missing parents are private too, whatever the umask (as key directories are)
        svc3 = T.EngineService(eng, snapshot_dir=tmp_path / "p" / "q", create_snapshot_dir=True)
        old = os.umask(0)
        try:
            svc3.apply(P.Snapshot(path="s"))
        finally:
            os.umask(old)
        assert ((tmp_path / "p").stat().st_mode & 0o777) == 0o700
        assert ((tmp_path / "p" / "q").stat().st_mode & 0o777) == 0o700


def test_close_submits_the_bars_already_taken(tmp_path: Path) -> None:
    bars = dc.sim.MarketSimulator(["EURUSD"], timeframe="H1", seed=3).bars(200)
    with dc.Engine(population(), threads=1) as eng:
        ingress = T.MarketIngress(f"ipc://{tmp_path / 'in.sock'}")
        svc = T.EngineService(eng, ingress=ingress, on_signals=lambda s: None, idle_timeout=0.005)
        svc.apply(P.SetThrottle(max_bars_per_s=20))  # they will wait in the service, not the socket
        with T.MarketSender(ingress.endpoint) as tx:
            svc.start()
            tx.send(bars)
            _until(lambda: svc.stats()["ingress"]["bars"] == 200 and svc.stats()["pending_bars"] > 100,
                   what="the frame taken")
        closed = svc.close()
        st = svc.stats()
        assert st["bars_submitted"] == 200 and st["dropped_on_stop"] == 0 and st["pending_bars"] == 0
        assert eng.stats()["bars_in"] == 200
        assert svc.signals_published == 200  # their signals were published before it returned
        assert closed is True


def test_repeated_requests_are_applied_once(keys: Path) -> None:
    journal: list[bytes] = []
    server = T.ControlServer(secret_key=keys / "server.key_secret", authorized_keys=keys / "clients",
                             journal_hook=journal.append)
    applied: list = []
    server.handler = lambda cmd: applied.append(cmd) or {"n": len(applied)}
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            server.serve(0.01)

    thread = threading.Thread(target=serve, daemon=True)
    try:
        with T.ControlClient(server.endpoint, server_key=keys / "server.key",
                             client_key=keys / "clients" / "ops.key_secret") as c:
            # the client queues only to a connection whose handshake succeeded (ZMQ_IMMEDIATE):
            # wait for it, or a loaded machine may time every send out before the handshake and
            # none of them reaches the server
            assert c.socket.poll(int(TIMEOUT * 1000), zmq.POLLOUT), "no CURVE handshake"
            # the server is busy (not serving): the request times out and is retried with its id
            with pytest.raises(TransportTimeout):
                c.request(P.Snapshot(path="s", request_id=7), timeout=0.2, retries=2)
            # reusing that id for another command while its reply is outstanding is refused
            with pytest.raises(ValueError, match="request_id 7"):
                c.request(P.Pause(request_id=7), timeout=0.2)
            thread.start()
            r = c.request(P.Snapshot(path="s", request_id=7), timeout=TIMEOUT)  # a manual retry
            assert r.ok and r.request_id == 7
            assert [type(x).__name__ for x in applied] == ["Snapshot"]  # four sends, applied once
            assert [type(P.decode_command(x)).__name__ for x in journal] == ["Snapshot"]  # journaled once
            # the same id twice
            r1, r2 = c.request(P.Pause(request_id=42)), c.request(P.Pause(request_id=42))
            assert r1 == r2 and r1.ok and [type(x).__name__ for x in applied] == ["Snapshot", "Pause"]
            # the same id for another command once answered: a new request, applied
            r3 = c.request(P.Resume(request_id=42))
            assert r3.ok and r3.result == {"n": 3} and type(applied[-1]).__name__ == "Resume"
            # queries are answered afresh every time, and never journaled
            c.request(P.HealthQuery(request_id=5))
            c.request(P.HealthQuery(request_id=5))
            assert [type(x).__name__ for x in applied][-2:] == ["HealthQuery", "HealthQuery"]
            assert "HealthQuery" not in [type(P.decode_command(x)).__name__ for x in journal]
            # the late replies of the timed-out sends were dropped, never taken for another's
            r4 = c.request(P.Pause(), timeout=TIMEOUT)
            assert r4.ok and r4.result == {"n": 6}
        assert server.stats()["duplicates"] >= 3
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()
        server.close()


def test_control_answers_while_a_slow_consumer_fills_the_window(tmp_path: Path, keys: Path) -> None:
    slow = threading.Event()
    slow.set()

    def hook(s: np.ndarray) -> None:
        if slow.is_set():
            time.sleep(0.004 * len(s))

    with dc.Engine(population(), threads=1, capacity=512) as eng:
        ingress = T.MarketIngress(f"ipc://{tmp_path / 'in.sock'}")
        control = T.ControlServer(secret_key=keys / "server.key_secret", authorized_keys=keys / "clients")
        svc = T.EngineService(eng, ingress=ingress, control=control, on_signals=hook)
        with svc, T.MarketSender(ingress.endpoint, max_bars=1024) as tx, \
                T.ControlClient(control.endpoint, server_key=keys / "server.key",
                                client_key=keys / "clients" / "ops.key_secret") as c:
            svc.start()
            tx.send(_clean(2000))
            _until(lambda: svc.stats()["pending_bars"] > 0 and eng.stats()["in_flight"] >= 400,
                   what="a full window")
            worst = 0.0
            for _ in range(30):
                t0 = time.monotonic()
                assert c.health(timeout=TIMEOUT).ok
                worst = max(worst, time.monotonic() - t0)
                time.sleep(0.02)
            # behind the window it would wait for the backlog (~16 s); slack for a loaded machine
            assert worst < 6.0, f"a health query waited {worst:.2f} s behind the engine's window"
            slow.clear()
            _until(lambda: svc.signals_published == 4000, what="the backlog drained")


def test_a_client_whose_handshake_is_refused_times_out_instead_of_blocking(keys: Path) -> None:
    """A refused handshake (an unauthorised client key) tears the DEALER's pipe down, after
    which a plain send blocks until a connection exists: with that key, never. The first request
    used to time out and the next one (or a retry) to hang for good; every one now ends in
    TransportTimeout within its timeout (the send waits for room only until the deadline)."""
    with dc.Engine(population(), threads=1) as eng:
        control = T.ControlServer(secret_key=keys / "server.key_secret", authorized_keys=keys / "clients")
        with T.EngineService(eng, control=control, idle_timeout=0.01) as svc:
            svc.start()
            with T.ControlClient(control.endpoint, server_key=keys / "server.key",
                                 client_key=keys / "strangers" / "mallory.key_secret") as mallory:
                for _ in range(4):
                    t0 = time.monotonic()
                    with pytest.raises(TransportTimeout):
                        mallory.health(timeout=0.3)
                    assert time.monotonic() - t0 < 5.0  # (slack for a loaded machine; a hang is forever)
                t0 = time.monotonic()
                with pytest.raises(TransportTimeout):
                    mallory.pause(timeout=0.2, retries=2)
                assert time.monotonic() - t0 < 8.0


def test_failed_handshakes_are_counted(keys: Path) -> None:
    import socket

    with dc.Engine(population(), threads=1) as eng:
        control = T.ControlServer(secret_key=keys / "server.key_secret", authorized_keys=keys / "clients")
        svc = T.EngineService(eng, control=control, idle_timeout=0.01)
        with svc:
            svc.start()
            ctx = zmq.Context.instance()
            for plain in (False, True):  # no key at all (NULL mechanism), then PLAIN
                s = ctx.socket(zmq.DEALER)
                s.linger = 0
                s.sndtimeo = 1000  # a DEALER whose only pipe a failed handshake tore down blocks in send
                if plain:
                    s.plain_username, s.plain_password = b"admin", b"x"
                s.connect(control.endpoint)
                try:
                    s.send_multipart([b"", msgspec.msgpack.encode({"type": "pause", "request_id": 1})])
                except zmq.Again:  # nothing to send it on: the handshake was refused already
                    pass
                assert not s.poll(300)
                s.close()
            with T.ControlClient(control.endpoint, server_key=keys / "clients" / "ops.key",  # wrong server key
                                 client_key=keys / "clients" / "ops.key_secret") as confused, \
                    pytest.raises(TransportTimeout):
                confused.health(timeout=0.3)
            host, port = control.endpoint[len("tcp://"):].rsplit(":", 1)
            with socket.create_connection((host, int(port))) as raw:
                raw.sendall(b"GET / HTTP/1.0\r\n\r\n" + b"\x00" * 64)  # not ZMTP at all
                time.sleep(0.2)

            def counted() -> bool:
                # which kind libzmq reports for a refused mechanism or key varies with timing
                # (under load the wrong-key client's failure came as "protocol", not "no_detail")
                f = control.stats()["handshake_failures"]
                return f["protocol"] + f["no_detail"] + f["auth"] >= 3 and f["no_handshake"] >= 1

            try:
                _until(counted, what="the handshake failures counted")
            except AssertionError as e:
                raise AssertionError(f"{e}: {control.stats()['handshake_failures']}") from None
            st = control.stats()
            assert st["handshake_failed"] == sum(st["handshake_failures"].values())
            assert st["requests"] == 0 and svc.commands == 0
            with T.ControlClient(control.endpoint, server_key=keys / "server.key",
                                 client_key=keys / "clients" / "ops.key_secret") as good:
                assert good.health().ok


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX file modes")
def test_key_files_and_directories_are_private(tmp_path: Path, caplog) -> None:
    import logging

    old = os.umask(0)
    try:
        T.new_keypair(tmp_path / "a" / "b", "srv")
    finally:
        os.umask(old)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "a" / "b").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "a" / "b" / "srv.key_secret").stat().st_mode & 0o777 == 0o600
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with caplog.at_level(logging.WARNING, logger="dynamic_core.transport.keys"):
        T.new_keypair(open_dir, "one")
        T.new_keypair(open_dir, "two")
        T.authorised_keys(open_dir)
    assert len([r for r in caplog.records if str(open_dir) in r.getMessage()]) == 1  # once
    secret = open_dir / "one.key_secret"
    assert T.load_keypair(secret)[1]
    secret.chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        T.load_keypair(secret)
    with pytest.raises(PermissionError):
        T.ControlServer(secret_key=secret, authorized_keys=open_dir)


def test_feed_epoch_fits_a_signed_64_bit_integer() -> None:
    # JSON subscribers in Java, MQL5 or Go read it as a signed 64-bit integer
    from dynamic_core.transport.feed import _new_epoch

    eps = [_new_epoch() for _ in range(2000)]
    assert all(0 < e < 1 << 63 for e in eps) and len(set(eps)) == len(eps)
    assert max(eps) > 1 << 61  # still random over the whole range


def test_cli_run_exits_1_when_the_service_loop_ends_by_an_error(tmp_path: Path, monkeypatch, capsys) -> None:
    # the loop's exception is recorded by the service; the command must not report a clean run
    from dynamic_core import cli
    from dynamic_core.transport.service import EngineService

    def broken(self, timeout=None):
        raise RuntimeError("socket on fire")

    monkeypatch.setattr(EngineService, "run_once", broken)
    rc = cli.main(["run", "--agents", "64", "--instruments", "EURUSD", "--feed", f"ipc://{tmp_path / 'bars.sock'}",
                   "--duration", "30"])
    err = capsys.readouterr().err
    assert rc == 1 and "run: the service loop ended early: RuntimeError: socket on fire" in err


def test_subscribe_shows_control_characters_escaped() -> None:
    # a publisher's text reaches a terminal: escape sequences are shown, not obeyed
    from dynamic_core.cli_transport import _shown

    assert _shown("EURUSD") == "EURUSD"
    assert _shown("EU\x1b[2JR") == "EU\\x1b[2JR"
    assert _shown("line one\nline\ttwo\x07\u202e", True) == "line one\nline\ttwo\\x07\\u202e"
    assert _shown("a\nb") == "a\\nb"


@pytest.mark.parametrize("linger", [30.0, 0.0])
def test_signals_published_before_close_still_reach_a_subscriber_that_is_behind(linger: float) -> None:
    # More messages than the loopback socket buffers hold (~100k of these), published and the
    # feed closed before the subscriber reads any: with a linger the rest keep leaving after
    # close() returns; with none (what `run --publish` did) libzmq drops them.
    n = 200_000
    sig = np.zeros(n, dtype=dc.SIGNAL_DTYPE)
    sig["ts"] = np.arange(1, n + 1)
    sig["instrument"] = dc.instruments.id("EURUSD")
    sig["timeframe"] = 3600
    feed = T.SignalFeed("tcp://127.0.0.1:*", max_batch=1, sndhwm=0)
    with T.SignalSubscriber(feed.endpoint, topics="sig.", rcvhwm=1000) as sub:
        assert feed.wait_for_subscribers(1, timeout=TIMEOUT)
        assert feed.publish(sig) == n
        feed.close(linger=linger)
        got = 0
        if linger:
            while got < n:
                msg = sub.recv(timeout=TIMEOUT)
                assert msg is not None, f"{got} of {n} signals"
                got += isinstance(msg, P.SignalBatch)
            assert sub.gap_count == 0
        else:  # the contrast (the test can tell): the rest never comes
            while (msg := sub.recv(timeout=2.0)) is not None:
                got += isinstance(msg, P.SignalBatch)
            assert got < n
