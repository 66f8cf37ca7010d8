"""Describe the machine a benchmark runs on (shared by the bench scripts).

``describe()`` gives one human-readable block; ``info()`` the same facts as a dict for JSON.
numpy is imported lazily, so importing this module does not start a BLAS thread pool before a
script has set its thread environment variables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any

__all__ = ["describe", "info"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _cpu_flags() -> list[str]:
    want = ("avx512f", "avx2", "fma", "sse4_2", "neon", "asimd")
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("flags", "features")):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in want if w in have]
    except OSError:
        pass
    return []


def _ram_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:  # noqa: BLE001 - psutil missing or unusable: fall back to /proc
        pass
    return proc_kib("/proc/meminfo", "MemTotal")


def proc_kib(path: str, key: str) -> int | None:
    """Bytes of a ``key: N kB`` line of a /proc file (meminfo, self/status), or None."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cpu_id() -> str:
    """Family, model and L2 per core, which tell apart machines with one model name (an "AMD
    EPYC" VM may be Zen 3 or Zen 4); empty where not on Linux."""
    fam = model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                k = k.strip()
                if k == "cpu family" and not fam:
                    fam = v.strip()
                elif k == "model" and not model:
                    model = v.strip()
                if fam and model:
                    break
    except OSError:
        return ""
    parts = [f"family {fam}, model {model}"] if fam else []
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index2/size") as f:
            parts.append(f"L2 {f.read().strip()} per core")
    except OSError:
        pass
    return "; ".join(parts)


def info() -> dict[str, Any]:
    """Facts about this machine and interpreter."""
    import numpy as np

    from dynamic_core.engine import usable_cores

    logical = os.cpu_count()
    usable = usable_cores()  # the engine's default thread count
    ram = _ram_bytes()
    threads = {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                "NUMBA_NUM_THREADS") if os.environ.get(k) is not None}
    return {
        "cpu": _cpu_model(),
        "cpu_id": _cpu_id(),
        "cpu_flags": _cpu_flags(),
        "logical_cores": logical,
        "usable_cores": usable,
        "ram_bytes": ram,
        "os": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "python_executable": sys.executable,
        "numpy": np.__version__,
        "thread_env": threads,
    }


def describe() -> str:
    """A few lines naming the CPU, cores, RAM, OS, Python and numpy."""
    d = info()
    ram = f"{d['ram_bytes'] / 2**30:.1f} GiB" if d["ram_bytes"] else "unknown"
    cores = f"{d['logical_cores']} logical"
    if d["usable_cores"] != d["logical_cores"]:
        cores += f", {d['usable_cores']} usable by this process"
    flags = ", ".join(d["cpu_flags"]) or "n/a"
    env = " ".join(f"{k}={v}" for k, v in d["thread_env"].items()) or "none set"
    return "\n".join(
        [
            f"CPU     : {d['cpu']} ({cores}; ISA: {flags})",
            f"CPU id  : {d['cpu_id'] or 'n/a'}",
            f"RAM     : {ram}",
            f"OS      : {d['os']}",
            f"Python  : {d['python']}, numpy {d['numpy']}",
            f"Threads : {env}",
        ]
    )


def json_path(path: str) -> str:
    """An argparse type: a path the figures can be written to, checked before the run (a bad one
    failed with a traceback after all of it)."""
    p = os.path.abspath(path)
    if os.path.isdir(p):
        raise argparse.ArgumentTypeError(f"{path} is a directory")
    d = os.path.dirname(p)
    if not os.path.isdir(d) or not os.access(d, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {path}: {d} is not a writable directory")
    return path


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {v}")
    return v


def arg_parser(doc: str) -> argparse.ArgumentParser:
    """The options every bench script takes (``--quick``, ``--json``), its docstring as help."""
    prog = f"python -m bench.{os.path.splitext(os.path.basename(sys.argv[0]))[0]}"
    ap = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run, not figures to quote)")
    ap.add_argument("--json", metavar="PATH", type=json_path, help="also write the figures as JSON")
    return ap


def finish(rows, res: dict, args: argparse.Namespace, t_start: float) -> None:
    """The closing of a bench script: the (figure, value, target, met) rows against the issue's
    targets (never asserted), the wall time, and the figures as JSON with ``--json``."""
    print("\nSummary against the issue's targets (never asserted)")
    for name, val, tgt, ok in rows:
        verdict = "NOT MEASURED" if ok is None else "PASS" if ok else "BELOW"
        print(f"  {name:<44} {val:>10}  target {tgt:<8} {verdict}")
    if args.quick:
        print("(quick mode: smaller sizes; run without --quick for the figures to quote)")
    print(f"\ntotal wall time {time.perf_counter() - t_start:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    print(describe())
