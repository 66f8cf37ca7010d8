"""The journal: append records/s per fsync level, the cost of journaling in Engine.run, and
replay agent-updates/s.

Run: ``python -m bench.bench_journal [--quick] [--json PATH]`` (also run as a section of
``python -m bench.bench_transport``).

1. Append: the C++ writer alone (``_core.journal_bench``) appending 64-byte records to a new
   journal in a temporary directory, committing every 1,000 records; fsync level 0 leaves
   flushing to the OS, 1 fdatasync()s per commit, 2 fsync()s per commit. Also 11 KiB records
   (a 200-bar batch) at level 0. The peer is Python's own buffered binary file writing the same
   framed records (length, type, seq, payload and header zlib.crc32 -- a cheaper CRC than CRC32C) in a loop.
2. Engine.run over the same bars with and without a journal (level 0 and 1): the overhead of
   journaling every accepted bar before processing it and the hash of every signal.
3. Replay: ``dc.Engine.replay`` of that journal, agent-updates/s (same population, 2 threads),
   verified against the journaled hashes.

Figures are printed, never asserted. Targets from the issue (2 cores): >= 1 M records/s append
at level 0; replay >= 5 M agent-updates/s.
"""

from __future__ import annotations

import os
import shutil
import struct
import sys
import tempfile
import time
import zlib

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


import dynamic_core as dc  # noqa: E402
from dynamic_core import _core  # noqa: E402

from ._machine import arg_parser, describe, finish  # noqa: E402

NAMES = ["EURUSD", "GBPUSD", "USDJPY", "XAUUSD"]


def _progress(msg: str) -> None:
    print(f"  ... {msg}", file=sys.stderr, flush=True)


def fs_type(path: str) -> str:
    """Filesystem type of the mount holding ``path`` (from /proc/mounts): fsync costs depend on it."""
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mnt, typ = parts[1], parts[2]
                if os.path.realpath(path).startswith(mnt) and len(mnt) > len(best):
                    best, kind = mnt, typ
    except OSError:
        pass
    return kind


def _python_append(path: str, n: int, payload: bytes, batch: int) -> float:
    hdr = struct.Struct("<IHHQI")
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for i in range(1, n + 1):
            h = hdr.pack(len(payload), 8, 0, i, zlib.crc32(payload))
            f.write(h + zlib.crc32(h).to_bytes(4, "little"))  # the same 24-byte header, two CRCs
            f.write(payload)
            if i % batch == 0:
                f.flush()
    return time.perf_counter() - t0


def append_section(quick: bool, tmp: str) -> dict:
    out = {}
    n0 = 200_000 if quick else 2_000_000
    n_sync = 20_000 if quick else 100_000
    for name, n, size, level in (("64 B, level 0", n0, 64, 0), ("64 B, level 1", n_sync, 64, 1),
                                 ("64 B, level 2", n_sync, 64, 2),
                                 ("11 KiB (200 bars), level 0", n0 // 50, 200 * 56, 0)):
        best = None
        for rep in range(3):
            d = os.path.join(tmp, f"append-{level}-{size}-{rep}")
            r = _core.journal_bench(d, n, size, level, 1000)
            shutil.rmtree(d)
            rate = n / r["seconds"]
            best = rate if best is None or rate > best else best
        out[name] = {"records_per_s": best, "mb_per_s": best * (size + _core.JOURNAL_RECORD_HEADER) / 1e6}
    py = min(_python_append(os.path.join(tmp, "py.bin"), n0 // 4, b"x" * 64, 1000) for _ in range(3))
    out["python file writes, 64 B"] = {"records_per_s": (n0 // 4) / py, "mb_per_s": (n0 // 4) * (64 + _core.JOURNAL_RECORD_HEADER) / py / 1e6}
    return out


def engine_section(quick: bool, tmp: str) -> dict:
    n_agents = 10_000
    bars = dc.sim.MarketSimulator(NAMES, timeframe="H1", seed=1).bars(500 if quick else 2000)
    pop = dc.Population.random(n_agents, instruments=NAMES, timeframes=[3600], seed=7)
    res = {"agents": n_agents, "bars": len(bars)}
    for label, kw in (("no journal", {}), ("journal level 0", {"fsync": 0}), ("journal level 1", {"fsync": 1})):
        times = []
        for rep in range(3):
            d = os.path.join(tmp, f"eng-{label.replace(' ', '-')}-{rep}")
            extra = {"journal": d, **kw} if kw else {}
            with dc.Engine(pop, threads=2, **extra) as eng:
                t0 = time.perf_counter()
                for i in range(0, len(bars), 200):
                    eng.run(bars[i:i + 200])
                times.append(time.perf_counter() - t0)
        res[label] = min(times)
    _progress("replay ...")
    d = os.path.join(tmp, "eng-journal-level-0-0")
    reps = [dc.Engine.replay(d, threads=2) for _ in range(3)]
    best = max(reps, key=lambda r: r.updates_per_s)
    res["replay_updates_per_s"] = best.updates_per_s
    res["replay_seconds"] = best.seconds
    res["replay_verified"] = best.verified
    res["replay_signals"] = len(best.signals)
    res["replay_bars"] = best.bars
    return res


def report(app: dict, eng: dict) -> list[tuple[str, str, str, bool]]:
    """Prints the append, engine and replay tables; returns the target rows."""
    print(f"\n1. Journal append (best of 3; directory under {tempfile.gettempdir()}, filesystem "
          f"{fs_type(tempfile.gettempdir())}: sync costs depend on the device behind it)")
    print(f"   {'records':<32} {'records/s':>12} {'MB/s':>9}")
    for k, v in app.items():
        print(f"   {k:<32} {v['records_per_s'] / 1e6:>10.2f} M {v['mb_per_s']:>9.1f}")
    c = app["64 B, level 0"]["records_per_s"] / app["python file writes, 64 B"]["records_per_s"]
    print(f"   C++ writer (CRC32C) vs Python buffered writes (zlib.crc32), level 0: {c:.1f}x")
    base = eng["no journal"]
    print(f"\n2. Engine.run, {eng['agents']:,} agents, {eng['bars']:,} bars in calls of 200, 2 threads (best of 3)")
    for k in ("no journal", "journal level 0", "journal level 1"):
        print(f"   {k:<18} {eng[k] * 1e3:>8.1f} ms  ({(eng[k] / base - 1) * 100:+.1f}%)")
    print(f"\n3. Replay of that journal: {eng['replay_bars']:,} bars -> {eng['replay_signals']:,} signals in "
          f"{eng['replay_seconds']:.3f} s = {eng['replay_updates_per_s'] / 1e6:.1f} M agent-updates/s, "
          f"{eng['replay_verified']:,} verified against journaled hashes")
    a0 = app["64 B, level 0"]["records_per_s"]
    rows = [("journal append records/s, level 0", f"{a0 / 1e6:.2f} M", ">= 1 M", a0 >= 1e6),
            ("replay agent-updates/s", f"{eng['replay_updates_per_s'] / 1e6:.1f} M", ">= 5 M",
             eng["replay_updates_per_s"] >= 5e6)]
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = arg_parser(__doc__)
    args = ap.parse_args(argv)
    t_all = time.perf_counter()
    print("dynamic_core journal benchmark")
    print(describe())
    tmp = tempfile.mkdtemp(prefix="dc-bench-journal-")
    try:
        _progress("append ...")
        app = append_section(args.quick, tmp)
        _progress("engine with and without a journal ...")
        eng = engine_section(args.quick, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res = {"append": app, "engine": eng, "filesystem": fs_type(tempfile.gettempdir())}
    rows = report(app, eng)
    finish(rows, res, args, t_all)
    return 0


if __name__ == "__main__":
    sys.exit(main())
