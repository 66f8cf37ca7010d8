"""From signal to order: plans/s through the decision maker, and the MT5 bridge's signal-to-ack
round trip over loopback.

Run: ``python -m bench.bench_decision [--quick] [--json PATH]``

1. Decision maker: 256 simulated instruments (7 named, the rest simulated equities), one signal
   per instrument per hourly bar, every signal actionable (random BUY/SELL, STRONG or not); a
   16-instrument run is printed beside it (fewer plans per call: the per-call work weighs more). Per time step the paper broker takes the
   bars (fills, stops, targets, marks; not timed; the costs of ``run --paper``), then ``DecisionMaker.on_signals`` plans,
   judges and places (timed): ATR stop and targets, risk sizing with lot rounding and currency
   conversion, a deterministic plan id, the governor's checks (breaker, daily loss, cooldown,
   guardrails, positions, instrument / gross / currency exposure with resizing), the verdict
   journaled as msgpack, approved plans submitted to the paper broker. The broker's own time per
   bar (fills, exits, equity) is printed beside it. Two limit sets:
   ``default`` (RiskLimits(): most plans end early, e.g. no pyramiding, the breaker once the
   random trades lose) and ``all checks`` (open-position cap, breaker, daily loss and cooldown off, so every plan
   runs the exposure math; about 6-7% are placed, approved or resized, and most of the rest are
   rejected because resizing them to the leverage limit leaves less than the minimum lot).
   Plans/s = plans judged / time in ``on_signals``.
2. Bridge round trip: ``MT5Bridge.submit_plan`` of a fresh plan -> order over ROUTER/DEALER on
   loopback TCP -> SimulatedTerminal (the EA side, a paper broker behind it) -> ``ack`` decoded
   by the bridge thread; one order at a time, after a warm-up (bench/_bridge_rt.py).

Peers: none for the decision maker (no public one does the same work; the design documents'
target of 1,000 plans/s is printed beside it, as a target, not a measurement). For the bridge,
the floor is measured: a bare pyzmq ROUTER/DEALER ping-pong on the same machine
(bench/_floor.py); the best-known public ZeroMQ MetaTrader bridge has no acknowledgements at
all (fire-and-forget PUSH with HWM 1), so it has no round trip to compare. Targets from the issue (2 cores): >= 100k plans/s;
round trip p50 <= 300 us. Figures are printed, never asserted.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import dynamic_core as dc
import numpy as np
from dynamic_core.bridges.paper import PaperBroker
from dynamic_core.cli_decision import DEFAULT_COSTS
from dynamic_core.decision import DecisionMaker, RiskLimits

from ._bridge_rt import measure
from ._floor import pingpong_floor
from ._machine import arg_parser, describe, finish

DESIGN_PLANS_PER_S = 1_000.0
NAMED = ["EURUSD", "GBPUSD", "USDJPY", "XAUUSD", "AUDUSD", "BTCUSD", "SPX"]


def names(k: int) -> list[str]:
    return NAMED[:k] + [f"SIM{i}" for i in range(len(NAMED), k)]

LIMITS = {
    "default": RiskLimits(),
    "all checks": RiskLimits(max_open_positions=0, max_drawdown_pct=0, daily_loss_pct=0, loss_streak=0),
}


def _progress(msg: str) -> None:
    print(f"  ... {msg}", file=sys.stderr, flush=True)


class _Sink:
    """A journal stand-in that keeps the encoded verdicts in memory (the encoding is timed; the
    disk write is the journal's, measured by bench_journal)."""

    def __init__(self) -> None:
        self.n = 0
        self.bytes = 0

    def __call__(self, raw: bytes) -> None:
        self.n += 1
        self.bytes += len(raw)


def decision_section(steps: int, limits: RiskLimits, k: int = 256) -> dict:
    inst = names(k)
    bars = dc.sim.MarketSimulator(inst, seed=1).bars(steps + 50)
    ids = np.array([dc.instruments.id(n) for n in inst], dtype=np.uint32)
    rng = np.random.default_rng(3)
    sink = _Sink()
    broker = PaperBroker(costs=DEFAULT_COSTS)
    maker = DecisionMaker(broker, limits=limits, journal=sink)
    maker.on_bars(bars[: 50 * k])  # warm the ATRs
    sigs = []
    for t in range(steps):
        b = bars[(50 + t) * k:(51 + t) * k]
        s = np.zeros(k, dtype=dc.SIGNAL_DTYPE)
        s["instrument"], s["timeframe"], s["ts"] = ids, 3600, b["ts"][0]
        s["seq"], s["population_hash"] = np.arange(t * k, (t + 1) * k), 0xD0
        a = rng.choice([-2, -1, 1, 2], k)
        s["action"], s["score"] = a, a * 0.3
        s["confidence"], s["agreement"] = rng.uniform(0, 1, k), rng.uniform(0, 1, k)
        sigs.append((b, s))
    spent = bars_s = 0.0
    n = positions = 0
    for b, s in sigs:
        t0 = time.perf_counter()
        maker.on_bars(b)
        t1 = time.perf_counter()
        n += len(maker.on_signals(s))
        spent += time.perf_counter() - t1
        bars_s += t1 - t0
        positions += len(broker.net_lots())
    g = maker.governor.stats()
    return {"instruments": k, "steps": steps, "plans": n, "seconds": spent, "per_s": n / spent, "us_per_plan": spent / n * 1e6,
            "decisions": g["decisions"], "reasons": g["reasons"], "journaled": sink.n,
            "trades": len(maker.attributions), "broker_us_per_bar": bars_s / (steps * k) * 1e6,
            "mean_open_positions": positions / steps}


def main(argv: list[str] | None = None) -> int:
    ap = arg_parser(__doc__)
    args = ap.parse_args(argv)
    t_all = time.perf_counter()
    print("dynamic_core decision benchmark")
    print(describe())
    steps = 60 if args.quick else 400
    res: dict = {"decision": {}}
    for name, lim in LIMITS.items():
        _progress(f"decision maker, {name} limits ...")
        decision_section(20, lim)  # warm-up
        res["decision"][name] = decision_section(steps, lim)
    _progress("decision maker, 16 instruments ...")
    res["decision_16"] = decision_section(steps * 16, LIMITS["default"], k=16)
    _progress("bridge round trip ...")
    rt = measure(500 if args.quick else 2000)
    res["bridge"] = rt
    floor = res["pingpong"] = pingpong_floor()

    print(f"\n1. Decision maker: 256 instruments x {steps:,} hourly steps, one actionable signal each")
    for name, r in res["decision"].items():
        d = r["decisions"]
        print(f"   {name:<10}: {r['per_s']:>9,.0f} plans/s ({r['us_per_plan']:.1f} us a plan; {r['plans']:,} plans: "
              f"{d['APPROVED']:,} approved, {d['MODIFIED']:,} modified, {d['REJECTED']:,} rejected)")
        top = sorted(r["reasons"].items(), key=lambda kv: -kv[1])[:4]
        print(f"               reasons: {', '.join(f'{k} {v:,}' for k, v in top) or 'none'}; "
              f"{r['journaled']:,} verdicts encoded for the journal, {r['trades']:,} trades closed")
        print(f"               paper broker (not in plans/s): {r['broker_us_per_bar']:.1f} us a bar with "
              f"{r['mean_open_positions']:.0f} open positions on average")
    r16 = res["decision_16"]
    print(f"   16 instruments x {r16['steps']:,} steps, default limits: {r16['per_s']:,.0f} plans/s "
          f"({r16['us_per_plan']:.1f} us a plan)")
    worst = min(r["per_s"] for r in res["decision"].values())
    print("   peer: none measured (no public decision maker does this work: plan, size, govern, journal, place)")
    print(f"   against the design documents' target of {DESIGN_PLANS_PER_S:,.0f} plans/s (a target, not a measurement): "
          f"slowest limit set {worst / DESIGN_PLANS_PER_S:,.0f}x")
    print(f"\n2. MT5 bridge round trip, submit_plan -> ack over loopback TCP ({rt['n']:,} orders, one at a time)")
    print(f"   p50 {rt['p50_us']:.0f} us   p90 {rt['p90_us']:.0f} us   p99 {rt['p99_us']:.0f} us   "
          f"(re-sends {rt['resends']}, executions {rt['executions']:,})")
    print(f"   floor: bare pyzmq ROUTER/DEALER ping-pong between two threads, same machine: p50 "
          f"{floor['p50_us']:.0f} us, p99 {floor['p99_us']:.0f} us (the bridge adds {rt['p50_us'] - floor['p50_us']:.0f} us p50)")
    print("   peer: the best-known public ZeroMQ MT bridge sends fire-and-forget (no ack, HWM 1): no round "
          "trip to compare, and a lost command is never noticed")
    finish([("plans/s, default limits", f"{res['decision']['default']['per_s']:,.0f}", ">=100k",
             res["decision"]["default"]["per_s"] >= 100_000),
            ("plans/s, all checks", f"{res['decision']['all checks']['per_s']:,.0f}", ">=100k",
             res["decision"]["all checks"]["per_s"] >= 100_000),
            ("bridge round trip p50 (us)", f"{rt['p50_us']:.0f}", "<=300", rt["p50_us"] <= 300)],
           res, args, t_all)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
