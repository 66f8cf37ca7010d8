"""The reasoning mesh's own overhead: routing + cache lookup, the broker round trip to a local
adapter process, and requests/s through the broker.

Run: ``python -m bench.bench_reasoning [--quick] [--json PATH]``

1. Routing decision + narrative-cache lookup: ``ReasoningMesh._route`` (the built-in policy and
   the ten provider profiles, RouteRequest, candidates filtered by budgets/quotas/breakers,
   context distillation + digest, the cache key, the LRU lookup) on 1,000 distinct contexts,
   once all missing and once all hitting; p50/p99 per call (perf_counter_ns around each).
2. Broker round trip: one task at a time, submit() -> broker thread -> ROUTER -> a local adapter
   process (the template narrator) -> reply -> finished rationale, measured by the broker from
   submission to delivery, minus the adapter's own narrator time (the "model time").
3. Throughput: N tasks submitted as fast as the inbox takes them, through the broker to two local
   adapter processes; requests/s from the first submission to the last rationale. Twice: with
   ``submit_many`` (100 contexts per call, as a bar's signals arrive together) and with one
   ``submit`` call per task (the submitting thread then costs the broker more of the GIL).

Floor (measured): a bare pyzmq ROUTER -> DEALER echo in another process, one 200-byte message at
a time (bench/_floor.py), printed beside the round trip: what the hop alone costs here.
Peer (published, not measured here: LiteLLM is not a dependency): LiteLLM's proxy overhead (docs.litellm.ai, "LiteLLM Proxy Performance": 3.25 ms
added latency versus calling OpenAI directly; "Benchmarks": 12 ms median overhead with 2
instances on 4-CPU machines, 2 ms with 4), printed beside our figures; the ratio is theirs over
ours. Different work (theirs is an HTTP proxy in front of a provider; ours is a ZeroMQ broker in
front of adapter processes), same role: what the routing layer adds to every request.
Figures are printed, never asserted. Targets from the issue (2 cores): routing + cache <= 20 us
p50; round trip <= 300 us p50; >= 20k requests/s.
"""

from __future__ import annotations

import os
import sys
import threading
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from dynamic_core.payloads import ReasoningContext  # noqa: E402
from dynamic_core.reasoning import ReasoningMesh  # noqa: E402
from dynamic_core.reasoning.tasks import Task  # noqa: E402

from ._floor import pingpong_floor  # noqa: E402
from ._machine import arg_parser, describe, finish  # noqa: E402

LITELLM_OVERHEAD_MS = 3.25  # docs.litellm.ai/docs/proxy/perf
LITELLM_BENCH_MEDIAN_MS = (12.0, 2.0)  # docs.litellm.ai/docs/benchmarks: 2 and 4 instances


SUBMIT_BATCH = 100  # contexts per submit_many call (a bar's signals arrive together)


def _progress(msg: str) -> None:
    print(f"  ... {msg}", file=sys.stderr, flush=True)


def contexts(n: int) -> list[ReasoningContext]:
    rng = np.random.default_rng(7)
    names = ["EURUSD", "GBPUSD", "USDJPY", "XAUUSD", "BTCUSD", "SPX"]
    out = []
    for i in range(n):
        a = int(rng.integers(-2, 3))
        out.append(ReasoningContext(
            signal_id=f"{0xBE7C4:016x}:{i}", instrument=names[i % len(names)], timeframe=3600, seq=i, action=a,
            score=float(rng.normal(0, 0.3)), confidence=float(rng.uniform()), agreement=float(rng.uniform()),
            dispersion=float(rng.uniform(0, 0.5)), n_agents=10_000,
            features={"atr_pct": float(rng.uniform(0, 1)), "ret_20": float(rng.normal()),
                      "rsi": float(rng.uniform(0, 100))}))
    return out


def _pct(ns: np.ndarray) -> dict:
    return {"p50_us": float(np.percentile(ns, 50)) / 1e3, "p99_us": float(np.percentile(ns, 99)) / 1e3,
            "n": int(len(ns))}


def routing_section(quick: bool) -> dict:
    ctxs = contexts(1000)
    reps = 20 if quick else 100
    m = ReasoningMesh([], cache_size=4096, spawn=False)
    try:
        classes = ["tactical", "deep", "numeric", "multilingual", "regional-CN"]
        now = time.monotonic()

        def tasks() -> list[Task]:
            return [Task(i + 1, c, classes[i % 5], 2, now, now + 3600.0, 1, False, 256)
                    for i, c in enumerate(ctxs)]

        out = {}
        for label, fill in (("miss", False), ("hit", True)):
            m.cache.clear()
            if fill:
                for t in tasks():
                    m._route(t, now)
                    m.cache.put(t.key, ("cached text", 1))
            times = np.empty(reps * len(ctxs), dtype=np.int64)
            k = 0
            route = m._route
            clock = time.perf_counter_ns
            for _ in range(reps):
                for t in tasks():
                    t0 = clock()
                    route(t, now)
                    times[k] = clock() - t0
                    k += 1
            out[label] = _pct(times)
        return out
    finally:
        m.close()


def _local_mesh(workers: int, queue: int) -> tuple[ReasoningMesh, list, threading.Event, dict]:
    """A started mesh with ``workers`` local adapter processes; ``ev`` is set once ``done``
    holds ``state["want"]`` outcomes."""
    done: list = []
    ev = threading.Event()
    state = {"want": 0}

    def on(o) -> None:
        done.append(o)
        if len(done) >= state["want"]:
            ev.set()

    m = ReasoningMesh(["local"], workers=workers, cache_size=0, queue_size=queue, deadline_s=60.0,
                      on_rationale=on, outbox_size=1_000_000,
                      policy={"rules": [{"request_class": "*", "candidates": ["local"]}]})
    m.start(wait=30.0)
    return m, done, ev, state


def roundtrip_section(quick: bool) -> dict:
    n = 500 if quick else 3000
    ctxs = contexts(n)
    m, done, ev, st = _local_mesh(1, 1000)
    try:
        for i in range(200):  # warm-up
            ev.clear()
            st["want"] = len(done) + 1
            m.submit(ctxs[i % n])
            ev.wait(5)
        done.clear()
        for c in ctxs:
            ev.clear()
            st["want"] = len(done) + 1
            m.submit(c)
            if not ev.wait(5):
                raise RuntimeError("no rationale within 5 s")
        total = np.array([o.latency_s for o in done]) * 1e9
        model = np.array([o.model_s for o in done]) * 1e9
        statuses = {o.status for o in done}
        return {"total": _pct(total), "excl_model": _pct(total - model), "model": _pct(model),
                "statuses": sorted(statuses), "providers": sorted({o.provider for o in done})}
    finally:
        m.close()


def throughput_section(quick: bool, batch: int) -> dict:
    """``n`` tasks through the broker to two local adapters: submitted ``batch`` at a time with
    ``submit_many`` (``batch`` 1: one ``submit`` call per task)."""
    n = 20_000 if quick else 100_000
    ctxs = contexts(1000)
    m, done, ev, st = _local_mesh(2, n)
    try:
        st["want"] = n
        t0 = time.perf_counter()
        give_up = t0 + 120.0

        def wait_for_room() -> None:  # inbox full: the broker is behind; yield to it
            if time.perf_counter() > give_up:
                raise RuntimeError("the inbox stayed full for 120 s")
            time.sleep(0.0005)

        if batch == 1:
            for i in range(n):
                while not m.submit(ctxs[i % 1000]):
                    wait_for_room()
        else:
            for i in range(0, n, batch):
                todo = [ctxs[j % 1000] for j in range(i, min(i + batch, n))]
                while todo:
                    ids = m.submit_many(todo)
                    todo = [c for c, tid in zip(todo, ids) if not tid]  # the refused ones, again
                    if todo:
                        wait_for_room()
        if not ev.wait(120):
            raise RuntimeError(f"only {len(done)} of {n} rationales within 120 s")
        wall = time.perf_counter() - t0
        by = {}
        for o in done:
            by[o.provider] = by.get(o.provider, 0) + 1
        return {"n": n, "batch": batch, "wall_s": wall, "per_s": n / wall, "by_provider": by,
                "statuses": sorted({o.status for o in done})}
    finally:
        m.close()


def main(argv: list[str] | None = None) -> int:
    ap = arg_parser(__doc__)
    args = ap.parse_args(argv)
    t_all = time.perf_counter()
    print("dynamic_core reasoning-mesh benchmark")
    print(describe())
    _progress("routing + cache lookup ...")
    rt = routing_section(args.quick)
    _progress("broker round trip to a local adapter process ...")
    rtt = roundtrip_section(args.quick)
    _progress("bare pyzmq round trip to another process (the floor) ...")
    floor = pingpong_floor(1000 if args.quick else 3000, process=True)
    _progress("requests/s through the broker (submit_many) ...")
    thr = throughput_section(args.quick, SUBMIT_BATCH)
    _progress("requests/s through the broker (one submit per task) ...")
    thr1 = throughput_section(args.quick, 1)

    print("\n1. Routing decision + narrative-cache lookup (ReasoningMesh._route), per call")
    for k in ("miss", "hit"):
        print(f"   cache {k:<4}: p50 {rt[k]['p50_us']:6.2f} us   p99 {rt[k]['p99_us']:6.2f} us   ({rt[k]['n']:,} calls)")
    print("\n2. Broker round trip, submit -> local adapter process -> rationale (one at a time)")
    print(f"   total          : p50 {rtt['total']['p50_us']:7.1f} us   p99 {rtt['total']['p99_us']:7.1f} us")
    print(f"   narrator (model): p50 {rtt['model']['p50_us']:7.1f} us")
    print(f"   excluding model: p50 {rtt['excl_model']['p50_us']:7.1f} us   p99 {rtt['excl_model']['p99_us']:7.1f} us"
          f"   (answered by {', '.join(rtt['providers'])}, status {', '.join(rtt['statuses'])})")
    ours_ms = rtt["excl_model"]["p50_us"] / 1e3
    print(f"   floor (measured): bare pyzmq ROUTER -> DEALER in another process -> back, 200 B, one at a time: "
          f"p50 {floor['p50_us']:.0f} us, p99 {floor['p99_us']:.0f} us; the broker adds "
          f"{rtt['excl_model']['p50_us'] - floor['p50_us']:.0f} us p50 over it")
    print(f"   peer (published, other hardware, not measured here): LiteLLM proxy adds {LITELLM_OVERHEAD_MS} ms (published); median overhead "
          f"{LITELLM_BENCH_MEDIAN_MS[0]:g} ms / {LITELLM_BENCH_MEDIAN_MS[1]:g} ms (2 / 4 instances, published)")
    print(f"   ratio against the measured floor: ours / floor = {rtt['excl_model']['p50_us'] / floor['p50_us']:.1f}x "
          f"(LiteLLM's published figure over ours would be {LITELLM_OVERHEAD_MS / ours_ms:.0f}x: not the same "
          f"machine or work)")
    print(f"\n3. Throughput: {thr['n']:,} tasks to 2 local adapter processes")
    print(f"   submit_many, {SUBMIT_BATCH} per call: {thr['per_s']:,.0f} requests/s ({thr['wall_s']:.2f} s; "
          f"answered by {thr['by_provider']})")
    print(f"   one submit() per task: {thr1['per_s']:,.0f} requests/s ({thr1['wall_s']:.2f} s; "
          f"answered by {thr1['by_provider']})")
    res = {"routing": rt, "roundtrip": rtt, "pingpong_process": floor, "throughput": thr, "throughput_single_submit": thr1,
           "peer": {"litellm_overhead_ms": LITELLM_OVERHEAD_MS, "litellm_bench_median_ms": LITELLM_BENCH_MEDIAN_MS}}
    rows = [
        ("routing + cache lookup p50 (miss), us", f"{rt['miss']['p50_us']:.2f}", "<= 20", rt["miss"]["p50_us"] <= 20),
        ("broker round trip p50 excl. model, us", f"{rtt['excl_model']['p50_us']:.0f}", "<= 300",
         rtt["excl_model"]["p50_us"] <= 300),
        (f"requests/s through the broker (submit_many x{SUBMIT_BATCH})", f"{thr['per_s']:,.0f}", ">= 20k",
         thr["per_s"] >= 20_000),
        ("requests/s through the broker (submit x1)", f"{thr1['per_s']:,.0f}", ">= 20k", thr1["per_s"] >= 20_000),
    ]
    finish(rows, res, args, t_all)
    return 0


if __name__ == "__main__":
    sys.exit(main())
