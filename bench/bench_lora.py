"""DynamicLoRA: forward + update per tick for 10,000 agents at feature dimension 64, batched
(stacked per-agent layers, one contraction for all agents) against a per-agent loop.

Run: ``python -m bench.bench_lora [--quick] [--json PATH]``

One tick is what a learning population does per bar: ``snapshot()`` (O(1)), ``learn()`` (the
forward pass through the frozen base and the five layers, the score, and analytic backprop
into every layer: per-agent rank-one gradient factors, shared means with horizontal resonance,
the per-layer effective-map changes for vertical resonance) and ``system_tick()`` (homeostasis,
vertical resonance, the update of every layer: gradient step, per-parameter phase, decay toward
the initial values, entropy; circuit detection, migration, health). Every agent learns every
tick (the heaviest case); inputs are N(0, 1), targets ``tanh(x @ w)``. Figures are medians over
the timed ticks after a warm-up, for float64 and float32, on 1 thread and on 2 (the native
update's slots split over ``LoRAConfig.threads`` and BLAS on as many, through threadpoolctl).

Floor: one tick reads every per-agent parameter in ``learn`` and reads it, its initial value and
writes it again in the update: about 15.4M parameters x ~16 bytes (float32) = ~250 MB a tick.
Section 3 times the least of that (one pass reading each parameter and its initial value and
writing it) on this machine, on 1 and 2 threads: a tick cannot be faster.

Peer: the same math as a Python loop over agents, each with its own one-slot agent and context
``DynamicLoRALayer`` (shared layers as in the batched run): forward, backprop, interaction
record, homeostasis and update per agent. It skips what the batched tick adds on top (vertical
and horizontal resonance, circuit detection, migration, health), so the ratio understates the
batching gain. It is timed on a subset of agents and scaled; after one tick its agent and
context parameters are compared with the batched run's (same inputs, same resonance factors).

GPU: where CuPy finds a CUDA device (``dynamic_core.gpu.probe``), section 4 runs the same ticks
with every array on the GPU (``LoRAHierarchy(..., xp="cupy")``), float64 and float32, each timed
piece ended by a device synchronise; elsewhere it says why it was skipped.

Target from the issue: forward + update per tick <= 1 ms for 10k agents at dim 64 on 2 cores.
Figures are printed, never asserted.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
from dynamic_core.learning.lora import (
    LAYERS,
    SHARED_LAYERS,
    DynamicLoRALayer,
    LayerGradient,
    LoRAConfig,
    LoRAHierarchy,
)

from ._machine import arg_parser, describe, finish

DIM = 64
TARGET_MS = 1.0


def _progress(msg: str) -> None:
    print(f"  ... {msg}", file=sys.stderr, flush=True)


def _blas_limit(threads: int):
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # without it BLAS keeps the environment's thread count
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(threads, user_api="blas")


def _inputs(n: int, ticks: int, dtype: np.dtype, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=DIM) / np.sqrt(DIM)
    X = rng.normal(size=(ticks, n, DIM)).astype(dtype)
    return X, np.tanh(X @ w).astype(dtype)


def _sync(xp) -> None:
    """Wait for the GPU's queued work (nothing on the host)."""
    if xp is not np:
        xp.cuda.Device().synchronize()


def batched(n: int, dtype: np.dtype, threads: int, warm: int, ticks: int, xp=None) -> dict:
    """Median per-tick times of the batched hierarchy (on a GPU when ``xp`` is CuPy: inputs
    uploaded before the timing, every timed piece ended by a device synchronise)."""
    cfg = LoRAConfig(threads=threads)
    X, T = _inputs(n, warm + ticks, dtype)
    with _blas_limit(threads):
        h = LoRAHierarchy(n, DIM, config=cfg, seed=1, dtype=dtype, xp=xp)
        xp = h.xp
        if xp is not np:
            X, T = xp.asarray(X), xp.asarray(T)
        t_learn, t_tick, t_total = [], [], []
        for i in range(warm + ticks):
            _sync(xp)
            t0 = time.perf_counter()
            snap = h.snapshot()
            h.learn(X[i], T[i], snap)
            _sync(xp)
            t1 = time.perf_counter()
            h.system_tick()
            _sync(xp)
            t2 = time.perf_counter()
            if i >= warm:
                t_learn.append(t1 - t0)
                t_tick.append(t2 - t1)
                t_total.append(t2 - t0)
        # where the time goes: pieces timed alone on the warmed state
        snap = h.snapshot()
        def synced(fn):
            return lambda: (fn(), _sync(xp))

        pieces = {
            "score (inference)": _median(synced(lambda: h.score(X[0], snap)), 5),
            "update, agent layer": _median(synced(lambda: h.layers["agent"].update(None)), 3),
            "update, context layer": _median(synced(lambda: h.layers["context"].update(None)), 3),
            "update, 3 shared layers": _median(synced(lambda: [h.layers[k].update(None) for k in SHARED_LAYERS]), 5),
        }
    return {"n": n, "dtype": np.dtype(dtype).name, "threads": threads, "ticks": ticks,
            "learn_ms": 1e3 * float(np.median(t_learn)), "system_tick_ms": 1e3 * float(np.median(t_tick)),
            "tick_ms": 1e3 * float(np.median(t_total)), "pieces_ms": {k: 1e3 * v for k, v in pieces.items()}}


def _median(fn, reps: int) -> float:
    fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return float(np.median(out))


class _PerAgent:
    """The per-agent loop: each agent owns one-slot agent and context layers copied from the
    batched hierarchy's slots."""

    def __init__(self, h: LoRAHierarchy, agents: np.ndarray) -> None:
        self.h = h
        self.agents = agents
        self.own: list[dict[str, DynamicLoRALayer]] = []
        for i in agents.tolist():
            layers = {}
            for name in ("agent", "context"):
                src = h.layers[name]
                L = DynamicLoRALayer(h.dim, src.rank, src.base_inertia, slots=1, config=h.config, dtype=h.dtype,
                                     name=name)
                L.set_params(A=src.A[i], B=src.B[i], A_init=src.A_init[i], B_init=src.B_init[i])
                L.interaction_history[0] = src.interaction_history[i]
                L._hist_pos, L._hist_sum[0] = src._hist_pos, src._hist_sum[i]
                L.screening_threshold[0] = src.screening_threshold[i]
                L.act_in[0], L.act_mid[0], L.act_out[0] = src.act_in[i], src.act_mid[i], src.act_out[i]
                L.current_entropy[0], L._activity_total[0] = src.current_entropy[i], src._activity_total[i]
                layers[name] = L
            self.own.append(layers)

    def tick(self, x: np.ndarray, t: np.ndarray, snap, strength: dict[str, float]) -> None:
        h = self.h
        W, head = h.backend.weight, snap.head
        for k, i in enumerate(self.agents.tolist()):
            own = self.own[k]
            z = x[i] @ W
            trace = []
            for name in LAYERS:
                if name in SHARED_LAYERS:
                    A, B = snap[name]
                else:
                    A, B = own[name].A[0], own[name].B[0]
                u = z @ A
                d = u @ B
                trace.append((z, u, d, A, B))
                z = z + d
            s = np.tanh(z @ head)
            e = (s - t[i]) * (1 - s * s)
            g = e * head
            grads = {}
            for name, (zi, u, _, A, B) in zip(reversed(LAYERS), reversed(trace)):
                v = B @ g
                grads[name] = (np.outer(zi, v), np.outer(u, g))
                g = g + A @ v
            for name in ("agent", "context"):
                zi, u, d, _, _ = trace[LAYERS.index(name)]
                L = own[name]
                L.maintain_homeostasis()
                L.record_interaction(zi[None], u[None], d[None])
                L.end_interactions()
                gA, gB = grads[name]
                L.update(LayerGradient(-gA, -gB), strength[name])


def peer(h: LoRAHierarchy, agents: np.ndarray, X: np.ndarray, T: np.ndarray, ticks: int) -> dict:
    """Time the per-agent loop on ``agents`` and check it against the batched tick."""
    cfg = h.config
    snap = h.snapshot()
    loop = _PerAgent(h, agents)
    h.learn(X[0], T[0], snap)
    rep = h.system_tick()
    strength = {name: cfg.step_size * rep["factors"].get(name, 1.0) for name in ("agent", "context")}
    loop.tick(X[0], T[0], snap, strength)
    diff = max(float(np.max(np.abs(loop.own[k][name].A[0] - h.layers[name].A[i])))
               for k, i in enumerate(agents.tolist()) for name in ("agent", "context"))
    diff = max(diff, max(float(np.max(np.abs(loop.own[k][name].B[0] - h.layers[name].B[i])))
                         for k, i in enumerate(agents.tolist()) for name in ("agent", "context")))
    times = []
    for j in range(1, ticks + 1):
        s2 = h.snapshot()
        t0 = time.perf_counter()
        loop.tick(X[j], T[j], s2, strength)
        times.append(time.perf_counter() - t0)
    per_agent = float(np.median(times)) / len(agents)
    return {"agents_timed": len(agents), "per_agent_us": 1e6 * per_agent, "max_abs_diff": diff}


def memory_floor(n: int, dtype: np.dtype, threads: int, reps: int = 5) -> dict:
    """The least one tick must move through memory, timed on this machine: one pass over every
    per-agent parameter (agent and context layers, A and B) that reads it and its initial value
    and writes it (``P += P_init``, what the update's decay toward init needs at the least),
    split over ``threads`` threads (numpy releases the GIL in the loop). ``learn``'s reads and
    everything else come on top, so a tick cannot be faster than this."""
    from concurrent.futures import ThreadPoolExecutor

    count = n * 2 * DIM * (8 + 4)
    rng = np.random.default_rng(0)
    P = rng.random(count, dtype=np.float32).astype(dtype)  # touched: no zero pages
    P0 = rng.random(count, dtype=np.float32).astype(dtype)
    cuts = np.linspace(0, count, threads + 1).astype(np.int64)

    def part(k: int) -> None:
        np.add(P[cuts[k]:cuts[k + 1]], P0[cuts[k]:cuts[k + 1]], out=P[cuts[k]:cuts[k + 1]])

    with ThreadPoolExecutor(threads) as pool:  # started once, outside the timing
        def one_pass() -> None:
            list(pool.map(part, range(threads)))

        secs = _median(one_pass, reps)
    moved = 3 * count * np.dtype(dtype).itemsize  # two reads and a write
    return {"dtype": np.dtype(dtype).name, "threads": threads, "params": count, "ms": 1e3 * secs,
            "gb_s": moved / secs / 1e9}


def main(argv: list[str] | None = None) -> int:
    ap = arg_parser(__doc__)
    args = ap.parse_args(argv)
    t_all = time.perf_counter()
    print("dynamic_core DynamicLoRA benchmark")
    print(describe())
    n = 1_000 if args.quick else 10_000
    warm, ticks = (2, 3) if args.quick else (3, 10)
    res: dict = {"n_agents": n, "dim": DIM, "batched": [], "peer": {}}
    for dtype in (np.float64, np.float32):
        for threads in (1, 2):
            _progress(f"batched, {np.dtype(dtype).name}, {threads} thread(s) ...")
            res["batched"].append(batched(n, np.dtype(dtype), threads, warm, ticks))
    from dynamic_core import gpu

    status = gpu.probe()
    res["gpu"] = {"device": status.reason if status else None, "skipped": None if status else status.reason,
                  "batched": []}
    if status:
        for dtype in (np.float64, np.float32):
            _progress(f"batched on the GPU (CuPy), {np.dtype(dtype).name} ...")
            res["gpu"]["batched"].append(batched(n, np.dtype(dtype), 1, warm, ticks, xp="cupy"))
    _progress("memory floor ...")
    res["floor"] = [memory_floor(n, np.dtype(np.float32), threads) for threads in (1, 2)]
    _progress("per-agent loop ...")
    m = 50 if args.quick else 200
    for dtype in (np.float64, np.float32):
        X, T = _inputs(n, 4, np.dtype(dtype), seed=5)
        h = LoRAHierarchy(n, DIM, seed=1, dtype=dtype)
        for i in range(2):  # leave the initial state (B = 0) behind
            h.learn(X[i], T[i], h.snapshot())
            h.system_tick()
        agents = np.linspace(0, n - 1, m).astype(np.int64)
        res["peer"][np.dtype(dtype).name] = peer(h, agents, X, T, 2)

    print(f"\n1. Batched: {n:,} agents, dim {DIM}, ranks 64/32/16/8/4, every agent learning every tick "
          f"(median of {ticks} ticks after {warm} warm-up)")
    print(f"   {'dtype':<8}{'threads':>8}{'learn':>11}{'system_tick':>13}{'tick total':>12}   per agent")
    for r in res["batched"]:
        print(f"   {r['dtype']:<8}{r['threads']:>8}{r['learn_ms']:>9.1f}ms{r['system_tick_ms']:>11.1f}ms"
              f"{r['tick_ms']:>10.1f}ms   {1e3 * r['tick_ms'] / n:.2f} us")
    print("   where the time goes (1 thread, pieces timed alone):")
    for r in res["batched"]:
        if r["threads"] == 1:
            print(f"     {r['dtype']}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in r["pieces_ms"].items()))
    print(f"\n2. Peer: per-agent Python loop, one small layer each (timed on {m} agents, scaled to {n:,})")
    best = {}
    for dt, p in res["peer"].items():
        ours = min(r["tick_ms"] for r in res["batched"] if r["dtype"] == dt and r["threads"] == 1)
        loop_ms = p["per_agent_us"] * n / 1e3
        p["tick_ms_scaled"] = loop_ms
        p["ratio"] = loop_ms / ours
        best[dt] = p["ratio"]
        print(f"   {dt:<8} loop {loop_ms:>9.1f} ms/tick ({p['per_agent_us']:.0f} us an agent)   batched (1 thread) "
              f"{ours:.1f} ms   ratio {p['ratio']:.1f}x   (loop vs batched parameters after a tick: max |diff| "
              f"{p['max_abs_diff']:.1e})")
    fastest = min(res["batched"], key=lambda r: r["tick_ms"])
    floor = min(res["floor"], key=lambda r: r["ms"])
    print(f"\n3. Memory floor: one pass P += P_init over the {floor['params'] / 1e6:.1f}M per-agent parameters "
          f"(float32; two reads and a write each), the least a tick must do")
    for r in res["floor"]:
        print(f"   {r['threads']} thread(s): {r['ms']:.2f} ms ({r['gb_s']:.1f} GB/s)")
    print(f"\n   fastest batched tick: {fastest['tick_ms']:.1f} ms ({fastest['dtype']}, {fastest['threads']} threads), "
          f"{fastest['tick_ms'] / floor['ms']:.1f}x the memory floor of {floor['ms']:.2f} ms; the {TARGET_MS:g} ms "
          f"target is {'below' if floor['ms'] > TARGET_MS else 'above'} that floor on this machine")
    print("\n4. The same ticks on a GPU (xp='cupy': every array in GPU memory, CuPy operations)")
    g = res["gpu"]
    if g["skipped"]:
        print(f"   skipped: {g['skipped']}")
    else:
        print(f"   device: {g['device']}")
        print(f"   {'dtype':<8}{'learn':>19}{'system_tick':>13}{'tick total':>12}   vs CPU best of the dtype")
        for r in g["batched"]:
            cpu = min(c["tick_ms"] for c in res["batched"] if c["dtype"] == r["dtype"])
            print(f"   {r['dtype']:<8}{r['learn_ms']:>17.2f}ms{r['system_tick_ms']:>11.2f}ms{r['tick_ms']:>10.2f}ms"
                  f"   {cpu / r['tick_ms']:.1f}x faster")
            print("     pieces: " + ", ".join(f"{k} {v:.2f} ms" for k, v in r["pieces_ms"].items()))
    gpu_rows = []
    if g["batched"]:
        gbest = min(g["batched"], key=lambda r: r["tick_ms"])
        gpu_rows.append((f"tick ms on the GPU, {n:,} agents ({gbest['dtype']})", f"{gbest['tick_ms']:.2f}",
                         f"<={TARGET_MS:g}", gbest["tick_ms"] <= TARGET_MS))
    finish([(f"tick ms, {n:,} agents, dim 64 (best)", f"{fastest['tick_ms']:.1f}", f"<={TARGET_MS:g}",
             fastest["tick_ms"] <= TARGET_MS), *gpu_rows,
            ("per-agent loop time / batched (1 thread), float64", f"{best['float64']:.1f}x", ">1x", best["float64"] > 1),
            ("per-agent loop time / batched (1 thread), float32", f"{best['float32']:.1f}x", ">1x", best["float32"] > 1)],
           res, args, t_all)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
