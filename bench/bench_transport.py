"""The ZeroMQ transport: bar-to-signal latency across three processes, and signals/s published.

Run: ``python -m bench.bench_transport [--quick] [--json PATH] [--only SECTION ...]``

The script is a list of sections (``SECTIONS``); each measures, prints its own table and
returns rows for the closing summary against the issue's targets.

``latency``
    Three processes on one machine. A *sender* process pushes one bar at a time (PUSH over
    ipc) to this process, which runs an ``EngineService`` (MarketIngress -> Engine with 1,000
    agents on one instrument, so every bar updates all of them -> SignalFeed over ipc); a
    *subscriber* process receives and decodes each signal. Latency is the subscriber's receive
    time minus the sender's send time, both ``time.perf_counter_ns()`` (CLOCK_MONOTONIC, one
    clock for every process on Linux). Bars are paced 1 ms apart after a 300-bar warm-up, as a
    live feed would send them. The peer row is the same three processes with the engine
    replaced by a bare forwarder (PULL -> PUB, no decoding): the floor that two ipc hops and
    three Python loops cost; and by libzmq's own proxy (the relay in C, no Python between the
    hops): the floor of two ipc hops across three processes on this machine.
``feed``
    ``SignalFeed.publish`` of ``SIGNAL_DTYPE`` batches (4,096 signals, one topic, split into
    messages of the default ``max_batch``) to a subscriber process that decodes every message
    into ``AISignal`` objects and checks the sequence (gaps counted). Published/s is timed in
    this process, received/s in the subscriber. Peers: the same batches built as ``AISignal``
    objects and encoded by msgspec (what a plain implementation does), and the JSON format.
    Then, in this process, decoding
    the same frames into ``AISignal`` objects, kept in a list (a consumer that stores them) or
    dropped, against a twin of ``AISignal`` that the garbage collector tracks (``gc=True``, the
    same fields and checks): what leaving signals untracked is worth.

Figures are printed, never asserted. Targets from the issue (2 cores): p50 <= 150 us and
p99 <= 500 us bar-to-signal at 1k agents; >= 1 M signals/s published.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import dynamic_core as dc  # noqa: E402
import msgspec  # noqa: E402
import numpy as np  # noqa: E402
from dynamic_core import payloads as P  # noqa: E402
from dynamic_core import transport as T  # noqa: E402
from dynamic_core.transport.feed import DEFAULT_MAX_BATCH  # noqa: E402

from ._machine import arg_parser, describe, finish  # noqa: E402

INSTRUMENT = "EURUSD"
WARM = 300
TIMEOUT = 60.0


def _progress(msg: str) -> None:
    print(f"  ... {msg}", file=sys.stderr, flush=True)


def _bars(n: int) -> np.ndarray:
    return dc.sim.MarketSimulator([INSTRUMENT], timeframe="H1", seed=1).bars(n)


def _spawn(*args: str) -> subprocess.Popen:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.join(root, "python"), root, env.get("PYTHONPATH"))
                                        if p)
    return subprocess.Popen([sys.executable, "-m", "bench.bench_transport", "--role", *args], cwd=root, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _read_json(proc: subprocess.Popen, timeout: float = TIMEOUT) -> Any:
    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    if not out or not out[0]:
        proc.kill()
        raise RuntimeError(f"{proc.args[4:]} said nothing within {timeout} s")
    return json.loads(out[0])


# ---- roles (the other processes) -------------------------------------------------------------

def role_sender(addr: str, n: int, interval_us: float) -> None:
    """Push ``n`` bars one at a time, ``interval_us`` apart; print send times by bar ts."""
    bars = _bars(n)
    ctxs = [P.PreparedMarketContext.from_bars(bars[i:i + 1]) for i in range(n)]
    sent = []
    with T.MarketSender(addr) as tx:
        nxt = time.perf_counter_ns()
        for c in ctxs:
            # sleep most of the gap (a spinning sender would take a core from the other two
            # processes), then spin the last 150 us for an even pace
            left = (nxt - time.perf_counter_ns()) / 1e9 - 150e-6
            if left > 0:
                time.sleep(left)
            while time.perf_counter_ns() < nxt:
                pass
            t = time.perf_counter_ns()
            tx.send_context(c)
            sent.append((c.ts[0], t))
            nxt = t + int(interval_us * 1000)
    print(json.dumps(sent), flush=True)


def role_subscriber(addr: str, n: int, mode: str) -> None:
    """Receive ``n`` signals (mode ``signal``) or forwarded market frames (mode ``market``);
    print ``ready`` once subscribed, then receive times by bar ts."""
    got = []
    if mode == "signal":
        with T.SignalSubscriber(addr) as sub:
            while sub.heartbeats == 0:
                if sub.recv(timeout=TIMEOUT) is None:
                    raise SystemExit("no heartbeat")
            print(json.dumps("ready"), flush=True)
            while len(got) < n:
                msg = sub.recv(timeout=TIMEOUT)
                if msg is None:
                    break
                if isinstance(msg, P.SignalBatch):
                    t = time.perf_counter_ns()
                    got.extend((s.ts, t) for s in msg.signals)
    else:
        import zmq

        codec = P.Codec(P.PreparedMarketContext)
        sock = zmq.Context.instance().socket(zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(addr)
        while True:  # the forwarder sends "hello" frames until one arrives
            if not sock.poll(int(TIMEOUT * 1000)):
                raise SystemExit("no hello")
            if sock.recv_multipart()[0] == b"hello":
                break
        print(json.dumps("ready"), flush=True)
        while len(got) < n:
            if not sock.poll(int(TIMEOUT * 1000)):
                break
            frames = sock.recv_multipart(copy=False)
            if frames[0].bytes == b"hello":
                continue
            ctx = codec.decode(frames[-1].buffer)  # [topic, bar] from the forwarder, [bar] from the proxy
            got.append((ctx.ts[0], time.perf_counter_ns()))
        sock.close(linger=0)
    print(json.dumps(got), flush=True)


def role_feed_subscriber(addr: str, total: int) -> None:
    """Receive and decode ``total`` signals as fast as they come; report rate and gaps."""
    with T.SignalSubscriber(addr, rcvhwm=0) as sub:
        while sub.heartbeats == 0:
            if sub.recv(timeout=TIMEOUT) is None:
                raise SystemExit("no heartbeat")
        print(json.dumps("ready"), flush=True)
        n = 0
        t0 = None
        while n + sub.gap_count < total:
            msg = sub.recv(timeout=5.0)
            if msg is None:
                break
            if isinstance(msg, P.SignalBatch):
                t0 = time.perf_counter() if t0 is None else t0
                n += len(msg.signals)
        dt = time.perf_counter() - t0 if t0 is not None else float("nan")
        print(json.dumps({"received": n, "seconds": dt, "gap_signals": sub.gap_count}), flush=True)


# ---- section: latency ------------------------------------------------------------------------

def _forwarder(in_addr: str, out_addr: str, stop: threading.Event) -> None:
    import zmq

    ctx = zmq.Context.instance()
    pull, pub = ctx.socket(zmq.PULL), ctx.socket(zmq.PUB)
    pull.bind(in_addr)
    pub.bind(out_addr)
    try:
        while not stop.is_set():
            if pull.poll(5):
                frame = pull.recv(copy=False)
                pub.send_multipart([b"sig.x", frame])
            else:
                pub.send(b"hello")  # lets the subscriber confirm it is subscribed
    finally:
        pull.close(linger=0)
        pub.close(linger=0)


def _c_proxy(in_addr: str, out_addr: str) -> tuple[threading.Thread, Callable[[], None], Callable[[], None]]:
    """libzmq's own proxy (PULL -> PUB in C, without the GIL) on a thread: the floor with no
    Python between the hops. Returns the thread, a function that sends one "hello" through it
    (for the subscriber to confirm its subscription) and one that stops it."""
    import zmq

    ctx = zmq.Context.instance()
    pull, pub, ctl = ctx.socket(zmq.PULL), ctx.socket(zmq.PUB), ctx.socket(zmq.PAIR)
    pull.bind(in_addr)
    pub.bind(out_addr)
    ctl_addr = in_addr + "-ctl"
    ctl.bind(ctl_addr)
    peer = ctx.socket(zmq.PAIR)
    peer.connect(ctl_addr)
    hello = ctx.socket(zmq.PUSH)
    hello.connect(in_addr)

    def run() -> None:
        try:
            zmq.proxy_steerable(pull, pub, None, ctl)
        finally:
            for sock in (pull, pub, ctl):
                sock.close(linger=0)

    def stop() -> None:
        peer.send(b"TERMINATE")
        t.join(5)
        peer.close(linger=0)
        hello.close(linger=0)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, lambda: hello.send(b"hello"), stop


def _latency_run(tmp: str, n: int, engine: bool, threads: int, c_proxy: bool = False) -> dict:
    tag = "eng" if engine else ("cpx" if c_proxy else "fwd")
    in_addr, out_addr = f"ipc://{tmp}/{tag}-in", f"ipc://{tmp}/{tag}-out"
    stop = threading.Event()
    svc = eng = None
    proxy_stop = None
    if c_proxy:
        _, say_hello, proxy_stop = _c_proxy(in_addr, out_addr)

        def greet() -> None:  # until the subscriber is ready (as the forwarder's idle hellos)
            while not stop.is_set():
                say_hello()
                time.sleep(0.005)

        hellos = threading.Thread(target=greet, daemon=True)
        hellos.start()
    elif engine:
        pop = dc.Population.random(1000, instruments=[INSTRUMENT], timeframes=["H1"], seed=7)
        eng = dc.Engine(pop, threads=threads)
        svc = T.EngineService(eng, ingress=T.MarketIngress(in_addr, engine=eng),
                              feed=T.SignalFeed(out_addr, heartbeat_interval=0.01), idle_timeout=0.05)
        svc.start()
    else:
        fwd = threading.Thread(target=_forwarder, args=(in_addr, out_addr, stop), daemon=True)
        fwd.start()
    try:
        sub = _spawn("subscriber", out_addr, str(n), "signal" if engine else "market")
        assert _read_json(sub) == "ready"
        if c_proxy:  # hellos stop before the bars: every frame after "ready" is a bar
            stop.set()
            hellos.join(5)
        tx = _spawn("sender", in_addr, str(n), "1000")
        sent = dict(_read_json(tx))
        got = dict(_read_json(sub))
        tx.wait(TIMEOUT)
        sub.wait(TIMEOUT)
    finally:
        if svc is not None:
            svc.close()
            st = eng.stats()
            eng.close()
        stop.set()
        if proxy_stop is not None:
            proxy_stop()
    ts_order = sorted(sent)[WARM:]
    lat = np.array([got[t] - sent[t] for t in ts_order if t in got]) / 1e3
    out = {"n": len(lat), "lost": len(ts_order) - len(lat), "p50_us": float(np.percentile(lat, 50)),
           "p90_us": float(np.percentile(lat, 90)), "p99_us": float(np.percentile(lat, 99)),
           "max_us": float(lat.max())}
    if engine:
        out["engine_p50_us"] = st["latency_s"]["p50"] * 1e6
        out["engine_p99_us"] = st["latency_s"]["p99"] * 1e6
        out["threads"] = threads
    return out


def latency_section(quick: bool, tmp: str) -> dict:
    n = WARM + (300 if quick else 2000)
    res = {}
    _progress("latency: forwarder floor ...")
    res["forwarder"] = _latency_run(tmp, n, engine=False, threads=0)
    _progress("latency: libzmq proxy floor ...")
    res["libzmq proxy"] = _latency_run(tmp, n, engine=False, threads=0, c_proxy=True)
    for threads in (1, 2):
        _progress(f"latency: engine service, {threads} worker thread(s) ...")
        res[f"engine, {threads} thread(s)"] = _latency_run(tmp, n, engine=True, threads=threads)
    return res


def latency_report(res: dict) -> list[tuple[str, str, str, bool]]:
    print("\nLatency: bar sent by process A -> ipc -> EngineService (1,000 agents, 1 instrument) -> ipc "
          "-> signal decoded in process C (us; 1 ms between bars, after a 300-bar warm-up)")
    print(f"   {'path':<22} {'bars':>6} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>9} {'engine p50':>11} "
          f"{'engine p99':>11}")
    for k, r in res.items():
        e50 = f"{r['engine_p50_us']:>11.1f}" if "engine_p50_us" in r else f"{'-':>11}"
        e99 = f"{r['engine_p99_us']:>11.1f}" if "engine_p99_us" in r else f"{'-':>11}"
        print(f"   {k:<22} {r['n']:>6} {r['p50_us']:>8.1f} {r['p90_us']:>8.1f} {r['p99_us']:>8.1f} "
              f"{r['max_us']:>9.1f} {e50} {e99}" + (f"   ({r['lost']} lost)" if r["lost"] else ""))
    print("   forwarder = PULL -> PUB relay in Python without decoding or engine (the transport floor); "
          "libzmq proxy = the same relay inside libzmq\n   (zmq.proxy_steerable: no Python between the hops); "
          "'engine' columns are ingress -> fused inside the engine (histogram bucket upper edges).")
    best = min((r for k, r in res.items() if k.startswith("engine")), key=lambda r: r["p50_us"])
    t = best["threads"]
    for floor in ("forwarder", "libzmq proxy"):
        f = next((r for k, r in res.items() if k.startswith(floor)), None)
        if f is not None:
            print(f"   engine ({t} thread(s)) minus {floor}: p50 {best['p50_us'] - f['p50_us']:+.1f} us, "
                  f"p99 {best['p99_us'] - f['p99_us']:+.1f} us")
    return [(f"bar->signal p50, 1k agents, {t} thread(s) (us)", f"{best['p50_us']:.1f}", "<= 150",
             best["p50_us"] <= 150),
            (f"bar->signal p99, 1k agents, {t} thread(s) (us)", f"{best['p99_us']:.1f}", "<= 500",
             best["p99_us"] <= 500)]


# ---- section: feed throughput ----------------------------------------------------------------

def _signal_records(n: int) -> np.ndarray:
    pop = dc.Population.random(200, instruments=[INSTRUMENT], timeframes=["H1"], seed=3)
    with dc.Engine(pop, threads=1) as eng:
        base = eng.run(_bars(4096))
    reps = -(-n // len(base))
    out = np.concatenate([base] * reps)[:n]
    out["seq"] = np.arange(1, n + 1)
    return out


def _publish_run(tmp: str, recs: np.ndarray, fmt: str, objects: bool, with_subscriber: bool) -> dict:
    tag = f"{fmt}-{'obj' if objects else 'vec'}-{int(with_subscriber)}"
    # the default max_batch (signals per message); sndhwm=0 so that no message is lost to a
    # slower subscriber: the feed queues them (unbounded), so published/s is the publisher's rate
    # and the subscriber's received/s is the rate end to end
    feed = T.SignalFeed(f"ipc://{tmp}/feed-{tag}", fmt=fmt, sndhwm=0, heartbeat_interval=0.01)
    sub = None
    try:
        if with_subscriber:
            sub = _spawn("feed-subscriber", feed.endpoint, str(len(recs)))
            line: list[str] = []
            reader = threading.Thread(target=lambda: line.append(sub.stdout.readline()), daemon=True)
            reader.start()
            deadline = time.monotonic() + TIMEOUT
            while reader.is_alive():  # heartbeats until the subscriber says it has seen one
                feed.heartbeat()
                reader.join(0.02)
                if time.monotonic() > deadline:
                    raise RuntimeError("feed subscriber not ready")
            if not line or json.loads(line[0]) != "ready":
                raise RuntimeError("feed subscriber died")
        batch = 4096
        chunks = [recs[i:i + batch] for i in range(0, len(recs), batch)]
        t0 = time.perf_counter()
        for c in chunks:
            feed.publish(P.signals_from_records(c) if objects else c)
        dt = time.perf_counter() - t0
        out = {"signals": len(recs), "seconds": dt, "published_per_s": len(recs) / dt}
        if sub is not None:
            r = _read_json(sub)
            sub.wait(TIMEOUT)
            out.update(received=r["received"], gap_signals=r["gap_signals"],
                       received_per_s=r["received"] / r["seconds"] if r["seconds"] else float("nan"))
        return out
    finally:
        if sub is not None and sub.poll() is None:
            sub.kill()
        feed.close()


def _tracked_twin(cls: type, signal_type: type | None = None) -> type:
    """``cls`` as it would be with ``gc=True``: the same fields, tag and checks, every instance
    tracked by the garbage collector (for a batch, its signals of ``signal_type``)."""
    fields = []
    for f in msgspec.structs.fields(cls):
        t = f.type
        if signal_type is not None and f.name == "signals":
            t = Annotated[tuple[signal_type, ...], msgspec.Meta(max_length=P.MAX_SIGNALS_PER_BATCH)]
        fields.append((f.name, t) if f.default is msgspec.NODEFAULT else (f.name, t, f.default))
    cfg = cls.__struct_config__
    return msgspec.defstruct(cls.__name__, fields, frozen=True, kw_only=True, forbid_unknown_fields=True,
                             tag_field=cfg.tag_field, tag=cfg.tag, gc=True)


def decode_kept(frames: list[bytes], batch_type: type, keep: bool) -> float:
    """Signals/s decoded from feed frames into signal objects, kept in a list or dropped."""
    dec = msgspec.msgpack.Decoder(batch_type)
    kept = []
    n = 0
    t0 = time.perf_counter()
    for raw in frames:
        b = dec.decode(raw)
        n += len(b.signals)
        if keep:
            kept.append(b)
    return n / (time.perf_counter() - t0)


def feed_section(quick: bool, tmp: str) -> dict:
    n = 200_000 if quick else 1_000_000
    recs = _signal_records(n)
    res = {}
    _progress("feed: decoding into AISignal, untracked and tracked by the GC ...")
    frames = [P.encode_signal_batch(1, i, recs[i:i + 4096], INSTRUMENT) for i in range(0, n, 4096)]
    twin = _tracked_twin(P.SignalBatch, _tracked_twin(P.AISignal))
    assert not gc.is_tracked(msgspec.msgpack.decode(frames[0], type=P.SignalBatch).signals[0])
    assert gc.is_tracked(msgspec.msgpack.decode(frames[0], type=twin).signals[0])
    dec = {}
    for keep in (True, False):
        for name, typ in (("AISignal", P.SignalBatch), ("tracked twin", twin)):
            rate = max(decode_kept(frames, typ, keep) for _ in range(3))
            dec[f"{name}, {'kept' if keep else 'dropped'}"] = rate
            gc.collect()
    res["decode"] = dec
    _progress("feed: vectorised msgpack, no subscriber ...")
    res["msgpack, vectorised, no subscriber"] = _publish_run(tmp, recs, "msgpack", False, False)
    _progress("feed: vectorised msgpack -> subscriber process ...")
    res["msgpack, vectorised -> subscriber"] = _publish_run(tmp, recs, "msgpack", False, True)
    small = recs[: n // 5]
    _progress("feed: AISignal objects + msgspec (peer) ...")
    res["msgpack, AISignal objects (peer)"] = _publish_run(tmp, small, "msgpack", True, False)
    _progress("feed: JSON ...")
    res["json (for non-Python subscribers)"] = _publish_run(tmp, small, "json", False, False)
    return res


def feed_report(res: dict) -> list[tuple[str, str, str, bool]]:
    print(f"\nSignal feed: SignalFeed.publish of SIGNAL_DTYPE batches of 4,096 signals, "
          f"{DEFAULT_MAX_BATCH:,} signals per message (the default max_batch), ipc")
    print(f"   {'path':<38} {'signals':>9} {'published/s':>12} {'received/s':>12} {'gaps':>6}")
    for k, r in res.items():
        if k == "decode":
            continue
        rec = f"{r['received_per_s'] / 1e6:>10.2f} M" if "received_per_s" in r else f"{'-':>12}"
        gaps = f"{r['gap_signals']:>6}" if "gap_signals" in r else f"{'-':>6}"
        print(f"   {k:<38} {r['signals']:>9,} {r['published_per_s'] / 1e6:>10.2f} M {rec} {gaps}")
    vec = res["msgpack, vectorised, no subscriber"]["published_per_s"]
    peer = res["msgpack, AISignal objects (peer)"]["published_per_s"]
    print(f"   vectorised encoder vs AISignal objects + msgspec: {vec / peer:.1f}x. received/s is the "
          "subscriber process decoding every signal into an AISignal (its own ceiling).")
    d = res["decode"]
    print("   decoding 4,096-signal frames into AISignal objects in this process (best of 3, signals/s): "
          "AISignal is not tracked by the garbage collector; the peer is the same struct with gc=True")
    for how in ("kept", "dropped"):
        a, b = d[f"AISignal, {how}"], d[f"tracked twin, {how}"]
        print(f"     {how:<8} AISignal {a / 1e6:6.2f} M/s   tracked twin {b / 1e6:6.2f} M/s   "
              f"-> {a / b:.2f}x")
    live = res["msgpack, vectorised -> subscriber"]
    rx = live.get("received_per_s", float("nan"))
    return [("signals/s published, batched (publisher side)", f"{vec / 1e6:.2f} M", ">= 1 M", vec >= 1e6),
            ("signals/s end to end, a subscriber process decoding each", f"{rx / 1e6:.2f} M", ">= 1 M", rx >= 1e6)]


# ---- the list --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Section:
    """One part of the benchmark: ``run(quick, tmp) -> figures``, ``report(figures) -> summary
    rows (name, value, target, met)``."""

    name: str
    run: Callable[[bool, str], dict]
    report: Callable[[dict], list[tuple[str, str, str, bool]]]


def journal_section(quick: bool, tmp: str) -> dict:
    from . import bench_journal as bj

    return {"append": bj.append_section(quick, tmp), "engine": bj.engine_section(quick, tmp)}


def journal_report(res: dict) -> list[tuple[str, str, str, bool]]:
    from . import bench_journal as bj

    return bj.report(res["append"], res["engine"])


SECTIONS: list[Section] = [
    Section("latency", latency_section, latency_report),
    Section("feed", feed_section, feed_report),
    Section("journal", journal_section, journal_report),
]


def main(argv: list[str] | None = None) -> int:
    ap = arg_parser(__doc__)
    ap.add_argument("--only", action="append", choices=[s.name for s in SECTIONS], metavar="SECTION",
                    help=f"run only these sections ({', '.join(s.name for s in SECTIONS)}); repeatable")
    ap.add_argument("--role", nargs="+", help=argparse.SUPPRESS)  # the other processes
    args = ap.parse_args(argv)
    if args.role:
        role, *rest = args.role
        if role == "sender":
            role_sender(rest[0], int(rest[1]), float(rest[2]))
        elif role == "subscriber":
            role_subscriber(rest[0], int(rest[1]), rest[2])
        elif role == "feed-subscriber":
            role_feed_subscriber(rest[0], int(rest[1]))
        return 0
    t_all = time.perf_counter()
    print("dynamic_core transport benchmark")
    print(describe())
    res: dict[str, dict] = {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="dc-bench-transport-") as tmp:
        for s in SECTIONS:
            if args.only and s.name not in args.only:
                continue
            res[s.name] = s.run(args.quick, tmp)
            rows += s.report(res[s.name])
    finish(rows, res, args, t_all)
    return 0


if __name__ == "__main__":
    sys.exit(main())
