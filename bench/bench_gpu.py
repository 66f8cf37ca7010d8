"""The CUDA backend against the CPU engine on the same machine.

Run from the repository root on a machine with an NVIDIA GPU and ``pip install '.[cuda]'``::

    python -m bench.bench_gpu            # 1M and 10M agents (several minutes, ~6 GB of host memory)
    python -m bench.bench_gpu --quick    # 100k and 1M agents
    python -m bench.bench_gpu --json out.json

What it measures (simulated bars of one instrument, ``dc.sim.MarketSimulator``; random agents,
``dc.Population.random``):

1. Backtest mode: ``Engine(pop, backend="cuda").run(bars)``, agent-updates/s at 1M and 10M
   agents (the time loop inside the lane kernel, ``block_bars`` bars per launch). Timed after a
   warm-up run (NVRTC compilation, allocations); best of 3.
2. The CPU engine on the same population, all usable cores, fewer bars (its rate does not
   depend on the bar count once warm): the ratio GPU / CPU.
3. Live mode at 1M agents: ``step(bar)``, one bar in and its signal out (one launch of each
   kernel per bar), wall time per bar: p50 / p99 over 300 bars.
4. Parity: the first 200 signals of the GPU run against the CPU's, bit for bit.

Without a usable GPU it prints why (CuPy missing, no driver, no device) and the CPU figure only.
Targets (from the issue): >= 20 G agent-updates/s in backtest mode on an H100; <= 1 ms bar-to-signal
at 1M agents in live mode. Nothing here asserts a timing.
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from bench._machine import arg_parser, describe, finish  # noqa: E402

TARGET_GUPS = 20e9
TARGET_LIVE_S = 1e-3


def _progress(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


def _bars(n: int) -> np.ndarray:
    import dynamic_core as dc
    return dc.sim.MarketSimulator(["SIM0"], timeframe="H1", seed=1).bars(n)


def backtest(pop: object, bars: np.ndarray, backend: str, repeats: int) -> dict:
    import dynamic_core as dc
    times = []
    sig = None
    for r in range(repeats + 1):  # the first run warms up (compiles, allocates)
        with dc.Engine(pop, backend=backend) as eng:
            t0 = time.perf_counter()
            out = eng.run(bars)
            dt = time.perf_counter() - t0
            upd = eng.stats()["agent_updates"]
            if r == 0:
                sig = out.copy()
                device = eng.stats().get("device", "")
            else:
                times.append(dt)
    best = min(times)
    return {"backend": backend, "agents": len(pop), "bars": len(bars), "seconds": best,
            "median_s": statistics.median(times), "updates": upd, "updates_per_s": upd / best,
            "device": device, "signals": sig}


def live(pop: object, bars: np.ndarray, n: int) -> dict:
    import dynamic_core as dc
    with dc.Engine(pop, backend="cuda") as eng:
        eng.run(bars[:50])  # warm: compiled, indicators seeded
        lat = []
        for b in bars[50:50 + n]:
            t0 = time.perf_counter()
            s = eng.step(b)
            lat.append(time.perf_counter() - t0)
            assert s is not None
    lat.sort()
    return {"p50_s": lat[len(lat) // 2], "p99_s": lat[int(len(lat) * 0.99)], "max_s": lat[-1], "n": len(lat)}


def main(argv: list[str] | None = None) -> int:
    args = arg_parser(__doc__).parse_args(argv)
    t_all = time.perf_counter()
    import dynamic_core as dc
    from dynamic_core import gpu

    print("dynamic_core CUDA backend benchmark")
    print(describe())
    status = gpu.probe()
    print(f"GPU     : {status.device if status else 'not usable: ' + status.reason}")
    sizes = [100_000, 1_000_000] if args.quick else [1_000_000, 10_000_000]
    gpu_bars, cpu_bars = (500, 30) if args.quick else (2000, 40)
    bars = _bars(gpu_bars + 400)
    res: dict = {"gpu": str(status.device or status.reason), "backtest": [], "cpu": [], "live": None}
    rows = []
    for n in sizes:
        _progress(f"population of {n:,} agents ...")
        pop = dc.Population.random(n, instruments=["SIM0"], seed=7)
        _progress(f"CPU engine, {n:,} agents x {cpu_bars} bars ...")
        c = backtest(pop, bars[:cpu_bars], "cpu", 2)
        res["cpu"].append({k: v for k, v in c.items() if k != "signals"})
        print(f"\nCPU engine ({os.cpu_count()} cores seen), {n:,} agents x {cpu_bars} bars: "
              f"{c['updates_per_s'] / 1e9:.2f} G agent-updates/s")
        if not status:
            continue
        _progress(f"GPU backtest, {n:,} agents x {gpu_bars} bars ...")
        g = backtest(pop, bars[:gpu_bars], "cuda", 3)
        same = np.array_equal(g["signals"][:cpu_bars].view(np.uint8), c["signals"].view(np.uint8))
        g["parity_first_bars"] = bool(same)
        res["backtest"].append({k: v for k, v in g.items() if k != "signals"})
        ratio = g["updates_per_s"] / c["updates_per_s"]
        print(f"GPU backtest, {n:,} agents x {gpu_bars} bars: {g['updates_per_s'] / 1e9:.2f} G agent-updates/s "
              f"(best {g['seconds'] * 1e3:.1f} ms, median {g['median_s'] * 1e3:.1f} ms)   CPU {c['updates_per_s'] / 1e9:.2f} G/s"
              f"   ratio {ratio:.1f}x   first {cpu_bars} signals bit-identical to the CPU's: {same}")
        rows.append((f"backtest agent-updates/s, {n:,} agents", f"{g['updates_per_s'] / 1e9:.1f} G/s", "20 G/s",
                     g["updates_per_s"] >= TARGET_GUPS))
        if n == 1_000_000:
            _progress("live mode, 1M agents ...")
            lv = live(pop, bars, 100 if args.quick else 300)
            res["live"] = lv
            print(f"GPU live mode, 1M agents, step(bar) over {lv['n']} bars: p50 {lv['p50_s'] * 1e6:.0f} us, "
                  f"p99 {lv['p99_s'] * 1e6:.0f} us, max {lv['max_s'] * 1e6:.0f} us")
            rows.append(("live bar-to-signal p50, 1M agents", f"{lv['p50_s'] * 1e6:.0f} us", "1000 us",
                         lv["p50_s"] <= TARGET_LIVE_S))
    if not status:
        print("\nGPU figures: not measured (no usable GPU here); the CPU figures above are for comparison.")
    finish(rows, res, args, t_all)
    return 0


if __name__ == "__main__":
    sys.exit(main())
