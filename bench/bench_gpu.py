"""The CUDA backend against the CPU engine on the same machine.

Run from the repository root on a machine with an NVIDIA GPU and ``pip install '.[cuda]'``::

    python -m bench.bench_gpu            # 1M and 10M agents (several minutes, ~6 GB of host memory)
    python -m bench.bench_gpu --quick    # 100k and 1M agents
    python -m bench.bench_gpu --sizes 10000000   # only these sizes
    python -m bench.bench_gpu --json out.json

What it measures (simulated bars of one instrument, ``dc.sim.MarketSimulator``; random agents,
``dc.Population.random``). Every engine first runs ``WARM_BARS`` bars untimed, past every agent's
lookback (``Population.random``: at most ~200 bars), so its indicators and agents are warm; the
rates are then measured on the same window of bars after them, on both backends:

1. Backtest mode: ``Engine(pop, backend="cuda").run(window)``, agent-updates/s at 1M and 10M
   agents (the time loop inside the lane kernel, ``block_bars`` bars per launch). Timed after a
   warm-up engine (NVRTC compilation, allocations); best of 3.
2. The CPU engine on the same population, all usable cores, the same window: the ratio GPU / CPU.
3. Live mode at 1M agents: ``step(bar)`` after the warm bars, one bar in and its signal out (one
   launch of each kernel per bar), wall time per bar: p50 / p99 over 300 bars.
4. Parity: every signal of the GPU run (warm bars and window) against the CPU's, bit for bit.

Without a usable GPU it prints why (CuPy missing, no driver, no device) and the CPU figure only.
Targets (from the issue): >= 20 G agent-updates/s in backtest mode on an H100; <= 1 ms bar-to-signal
at 1M agents in live mode. Nothing here asserts a timing.
"""
from __future__ import annotations

import argparse
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


WARM_BARS = 400  # untimed, before every measurement: past every agent's lookback


def backtest(pop: object, warm: np.ndarray, window: np.ndarray, backend: str, repeats: int) -> dict:
    """Agent-updates/s of ``run(window)`` after ``run(warm)`` (untimed), best of ``repeats``
    engines after one more that warms the process up (compiles, allocates)."""
    import dynamic_core as dc
    times = []
    sig = None
    for r in range(repeats + 1):
        with dc.Engine(pop, backend=backend) as eng:
            first = eng.run(warm)
            if r == 0:
                warm_share = float(eng.agents()["warm"].mean())
            u0 = eng.stats()["agent_updates"]
            t0 = time.perf_counter()
            out = eng.run(window)
            dt = time.perf_counter() - t0
            upd = eng.stats()["agent_updates"] - u0
            if r == 0:
                sig = np.concatenate([first, out])
                device = eng.stats().get("device", "")
            else:
                times.append(dt)
    best = min(times)
    return {"backend": backend, "agents": len(pop), "warm_bars": len(warm), "bars": len(window),
            "warm_agents": warm_share, "seconds": best, "median_s": statistics.median(times), "updates": upd,
            "updates_per_s": upd / best, "device": device, "signals": sig}


def live(pop: object, bars: np.ndarray, n: int) -> dict:
    import dynamic_core as dc
    with dc.Engine(pop, backend="cuda") as eng:
        eng.run(bars[:WARM_BARS])  # warm: compiled, indicators and agents past their lookback
        lat = []
        for b in bars[WARM_BARS:WARM_BARS + n]:
            t0 = time.perf_counter()
            s = eng.step(b)
            lat.append(time.perf_counter() - t0)
            assert s is not None
    lat.sort()
    return {"p50_s": lat[len(lat) // 2], "p99_s": lat[int(len(lat) * 0.99)], "max_s": lat[-1], "n": len(lat)}


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(x.replace("_", "")) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated agent counts, got {text!r}") from None
    if not sizes or min(sizes) < 32:
        raise argparse.ArgumentTypeError(f"every size must be at least 32 agents, got {text!r}")
    return sizes


def main(argv: list[str] | None = None) -> int:
    ap = arg_parser(__doc__)
    ap.add_argument("--sizes", metavar="N[,N...]", type=_sizes,
                    help="population sizes to run instead of the default ones (e.g. 10000000)")
    args = ap.parse_args(argv)
    t_all = time.perf_counter()
    import dynamic_core as dc
    from dynamic_core import gpu

    print("dynamic_core CUDA backend benchmark")
    print(describe())
    status = gpu.probe()
    print(f"GPU     : {status.device if status else 'not usable: ' + status.reason}")
    sizes = args.sizes or ([100_000, 1_000_000] if args.quick else [1_000_000, 10_000_000])
    if not status and not args.sizes and not args.quick:
        # the CPU side alone: no 10M-agent engine (~6 GB, minutes) for a comparison with nothing
        sizes = [1_000_000]
        print("        (no GPU: the CPU figure at 1M agents only; --sizes picks others)")
    from dynamic_core.engine import usable_cores
    window_bars, live_bars = (100, 100) if args.quick else (200, 300)
    bars = _bars(WARM_BARS + max(window_bars, live_bars))
    warm, window = bars[:WARM_BARS], bars[WARM_BARS:WARM_BARS + window_bars]
    res: dict = {"gpu": str(status.device or status.reason), "backtest": [], "cpu": [], "live": None}
    rows = []
    for n in sizes:
        _progress(f"population of {n:,} agents ...")
        pop = dc.Population.random(n, instruments=["SIM0"], seed=7)
        _progress(f"CPU engine, {n:,} agents x {WARM_BARS} warm + {window_bars} timed bars ...")
        c = backtest(pop, warm, window, "cpu", 2)
        res["cpu"].append({k: v for k, v in c.items() if k != "signals"})
        print(f"\nCPU engine ({usable_cores()} usable cores), {n:,} agents x {window_bars} bars after {WARM_BARS} "
              f"warm ones ({c['warm_agents']:.0%} of agents warm): {c['updates_per_s'] / 1e9:.2f} G agent-updates/s")
        if not status:
            continue
        _progress(f"GPU backtest, {n:,} agents x {WARM_BARS} warm + {window_bars} timed bars ...")
        g = backtest(pop, warm, window, "cuda", 3)
        same = np.array_equal(g["signals"].view(np.uint8), c["signals"].view(np.uint8))
        g["parity"] = bool(same)
        res["backtest"].append({k: v for k, v in g.items() if k != "signals"})
        ratio = g["updates_per_s"] / c["updates_per_s"]
        print(f"GPU backtest, {n:,} agents x the same {window_bars} bars: {g['updates_per_s'] / 1e9:.2f} G "
              f"agent-updates/s (best {g['seconds'] * 1e3:.1f} ms, median {g['median_s'] * 1e3:.1f} ms)   "
              f"CPU {c['updates_per_s'] / 1e9:.2f} G/s   ratio {ratio:.1f}x   all {len(g['signals'])} signals "
              f"bit-identical to the CPU's: {same}")
        rows.append((f"backtest agent-updates/s, {n:,} agents", f"{g['updates_per_s'] / 1e9:.1f} G/s", "20 G/s",
                     g["updates_per_s"] >= TARGET_GUPS))
        if n == 1_000_000:
            _progress("live mode, 1M agents ...")
            lv = live(pop, bars, live_bars)
            res["live"] = lv
            print(f"GPU live mode, 1M agents, step(bar) over {lv['n']} bars: p50 {lv['p50_s'] * 1e6:.0f} us, "
                  f"p99 {lv['p99_s'] * 1e6:.0f} us, max {lv['max_s'] * 1e6:.0f} us")
            rows.append(("live bar-to-signal p50, 1M agents", f"{lv['p50_s'] * 1e6:.0f} us", "1000 us",
                         lv["p50_s"] <= TARGET_LIVE_S))
    if not status:
        print("\nGPU figures: not measured (no usable GPU here); the CPU figures above are for comparison.")
        rows.append(("backtest agent-updates/s on the GPU", "n/a", "20 G/s", None))
        rows.append(("live bar-to-signal p50 on the GPU, 1M agents", "n/a", "1000 us", None))
    finish(rows, res, args, t_all)
    return 0


if __name__ == "__main__":
    sys.exit(main())
