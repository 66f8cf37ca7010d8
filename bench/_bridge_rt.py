"""Signal-to-ack round trip of the MetaTrader 5 bridge over loopback TCP.

``measure(n)`` starts an :class:`~dynamic_core.bridges.mt5.MT5Bridge` and a
:class:`~dynamic_core.bridges.mt5.SimulatedTerminal` (the EA side, paper broker behind it) in
this process, warms up, then submits ``n`` fresh trading plans one at a time and times each from
the ``submit_plan`` call to the moment the bridge thread has decoded the EA's ``ack`` (the
``on_ack`` callback). The next plan is submitted after the previous one's exec report, so every
sample is an unloaded round trip. Plans are built before timing.

``terminal="thread"`` (default) runs the terminal as a thread of this process (it then shares
the GIL with the bridge); ``terminal="process"`` runs it in a child process, as a real EA is.

Run from the repository root::

    python -m bench._bridge_rt [--n 2000] [--terminal thread|process]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import gc
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from dynamic_core.bridges.mt5 import MT5Bridge, SimulatedTerminal
from dynamic_core.payloads import TradingPlan

from bench._machine import positive_int


def _plans(n: int, tag: str) -> list[TradingPlan]:
    now = time.time_ns()
    return [TradingPlan(plan_id=f"bench-{tag}-{i}", signal_id=f"s{i}", instrument="EURUSD", timeframe=3600, ts=now,
                        seq=i, direction=1 if i % 2 == 0 else -1, action=1 if i % 2 == 0 else -1, entry=1.1,
                        stop=1.09 if i % 2 == 0 else 1.11, targets=(1.12 if i % 2 == 0 else 1.08,), size=0.01,
                        valid_until=now + 3_600_000_000_000) for i in range(n)]


_CHILD = """
import sys
from dynamic_core.bridges.mt5 import SimulatedTerminal
t = SimulatedTerminal(sys.argv[1], heartbeat=0.05)
t.set_price("EURUSD", 1.1)
print("ready", flush=True)
sys.stdin.read()
print(sum(t.executions().values()), flush=True)
t.close()
"""


class _ChildTerminal:
    """A SimulatedTerminal in a child process (what a real EA is: another process)."""

    def __init__(self, address: str) -> None:
        import dynamic_core

        env = dict(os.environ)
        root = str(Path(dynamic_core.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen([sys.executable, "-c", _CHILD, address], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the terminal process did not start")
        self.executed = 0

    def set_price(self, *a: object) -> None:
        pass

    def executions(self) -> dict:
        return {"all": self.executed}

    def close(self) -> None:
        if self.proc.poll() is None:
            out, _ = self.proc.communicate("", timeout=30)
            self.executed = int(out.split()[-1]) if out.split() else 0


def measure(n: int = 2000, warmup: int = 300, terminal: str = "thread") -> dict:
    """p50/p90/p99 (and mean, max) microseconds of submit_plan -> ack, over ``n`` orders."""
    if terminal not in ("thread", "process"):
        raise ValueError("terminal must be 'thread' or 'process'")
    bridge = MT5Bridge("tcp://127.0.0.1:*", heartbeat=1.0)
    term = SimulatedTerminal(bridge.address, heartbeat=0.05) if terminal == "thread" else _ChildTerminal(bridge.address)
    acked = threading.Event()
    box = [0]

    def on_ack(coid: str, accepted: bool, reason: str) -> None:
        box[0] = time.perf_counter_ns()
        acked.set()

    bridge.on_ack(on_ack)
    try:
        term.set_price("EURUSD", 1.1)
        if not bridge.wait_until(lambda: bridge.link == "live", 10.0):
            raise RuntimeError("the simulated terminal did not connect")
        samples = []
        plans = _plans(warmup + n, os.urandom(4).hex())
        gc.collect()
        for i, plan in enumerate(plans):
            acked.clear()
            t0 = time.perf_counter_ns()
            coid = bridge.submit_plan(plan)
            if not acked.wait(5.0):
                raise RuntimeError(f"no ack for {coid}")
            if i >= warmup:
                samples.append((box[0] - t0) / 1e3)
            if bridge.wait(coid, timeout=5.0) != "filled":
                raise RuntimeError(f"{coid} not filled: {bridge.order(coid)}")
        a = np.array(samples)
        st = bridge.stats()
        term.close()
        return {"n": n, "terminal": terminal, "p50_us": float(np.percentile(a, 50)),
                "p90_us": float(np.percentile(a, 90)), "p99_us": float(np.percentile(a, 99)),
                "mean_us": float(a.mean()), "max_us": float(a.max()), "resends": st["resends"],
                "executions": sum(term.executions().values()) - warmup}
    finally:
        term.close()
        bridge.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=positive_int, default=2000, help="round trips timed (default 2000)")
    ap.add_argument("--terminal", choices=("thread", "process"), default="thread")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    r = measure(args.n, terminal=args.terminal)
    if args.json:
        print(json.dumps(r))
        return
    try:
        from bench._machine import describe  # type: ignore[attr-defined]

        print(describe())
    except Exception:  # noqa: BLE001 - the machine line is optional
        print(f"{os.cpu_count()} CPUs")
    print(f"mt5 bridge signal->ack round trip, loopback TCP, {r['n']} orders, terminal in a {r['terminal']}")
    print(f"  p50 {r['p50_us']:8.1f} us   p90 {r['p90_us']:8.1f} us   p99 {r['p99_us']:8.1f} us   "
          f"max {r['max_us']:8.1f} us   (target p50 <= 300 us: {'PASS' if r['p50_us'] <= 300 else 'BELOW'})")


if __name__ == "__main__":
    main()
