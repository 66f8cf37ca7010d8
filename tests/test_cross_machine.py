"""The same bits on another machine, emulated on this one.

A run's results must not depend on the CPU it runs on. What differs between CPUs, for this
package, is which code numpy, OpenBLAS, the C library and the native kernels pick at load time:
numpy's SIMD kernels (exp, log, power, cos, ... take other paths on AVX-512 than on AVX2 or
SSE), OpenBLAS's GEMM kernel (chosen per CPU; a row's bits depend on it and on the row's place
in the matrix), the C library's exp/log/pow (FMA variants or not) and the engine's own
x86-64-v3/v4 kernels. The workload below runs twice in fresh interpreters: as this machine picks
them (the engine on 2 threads), and as an older CPU would (numpy without its x86-64-v3 kernels,
OpenBLAS's Nehalem kernel, the C library's non-FMA functions, the engine's baseline kernels on
1 thread). Every digest must agree.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

import dynamic_core

ROOT = pathlib.Path(__file__).resolve().parent.parent

WORKLOAD = r"""
import hashlib, json, sys
import numpy as np
import dynamic_core as dc
from dynamic_core import _core
if sys.argv[1] == "baseline":
    _core.set_kernel_isa(0)
from dynamic_core.learning.dsi import Dsi
from dynamic_core.learning.lora import LoRAHierarchy

def h(*arrays):
    d = hashlib.sha256()
    for a in arrays:
        d.update(np.ascontiguousarray(a).tobytes())
    return d.hexdigest()[:20]

out = {"isa": _core.kernel_isa()}
names = ("XM_EURUSD", "XM_XAUUSD", "XM_BTCUSD")
bars = dc.sim.MarketSimulator(names, seed=5).bars(1500)
out["sim_bars"] = h(*(bars[f] for f in ("ts", "open", "high", "low", "close", "volume")))
pop = dc.Population.random(2000, instruments=list(names), seed=6)
with dc.Engine(pop, threads=1 if sys.argv[1] == "baseline" else 2) as eng:  # thread counts differ too
    sig = eng.run(bars[:3000])
    rep = eng.evolve(dict(min_age=100, replace_fraction=0.2), seed=3, generation=1)
    sig2 = eng.run(bars[3000:])
    ag = eng.agents()
out["signals"] = h(*(sig[f] for f in sig.dtype.names if f != "instrument"))
out["signals_after_evolution"] = h(*(sig2[f] for f in sig2.dtype.names if f != "instrument"))
out["agents"] = h(*(ag[f] for f in ag.dtype.names))
out["generation"] = h(rep["births"].view(np.uint8), np.array([rep["best"], rep["median"], rep["mean"]]))
ticks = dc.sim.TickSimulator(["XM_EURUSD", "XM_XAUUSD"], seed=7).ticks(3 * 3600)
d = Dsi(["XM_EURUSD", "XM_XAUUSD"])
for part in np.array_split(ticks, 5):
    d.update(part)
out["dsi"] = h(np.array([[d.evidence(n), d.log_odds(n)] for n in ("XM_EURUSD", "XM_XAUUSD")]))
lo = LoRAHierarchy(37, 12, seed=8)
rng = np.random.default_rng(9)
for layer in lo.layers.values():
    layer.set_params(B=rng.normal(0.0, 0.3, size=layer.B.shape))
for i in range(6):
    x = rng.normal(size=(37, 12))
    lo.learn(x, np.tanh(x[:, 0] - x[:, 1]), lo.snapshot())
x = rng.normal(size=(37, 12))
out["lora_forward"] = h(lo.forward(x), lo.score(x), lo.backend.weight)
out["lora_weights"] = h(*(a for L in lo.layers.values() for a in (L.A, L.B)))
from dynamic_core.decision import CreditLedger
led = CreditLedger()
r = np.random.default_rng(10)
for i in range(3000):
    led.record(tuple(int(a) for a in r.integers(0, 50, 3)), float(r.normal(0.0, 1.5)), float(r.normal()))
out["credit"] = h(np.array(sorted(led.credit.items())))
print(json.dumps(out))
"""


def _digests(kind: str) -> dict:
    env = dict(os.environ)
    # the dynamic_core this process imported (the source tree in development, the installed wheel in CI)
    here = str(pathlib.Path(dynamic_core.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [here, env.get("PYTHONPATH", "")]))
    if kind == "baseline":
        env["NPY_DISABLE_CPU_FEATURES"] = "X86_V3 X86_V4 AVX512_ICL AVX512_SPR"
        env["OPENBLAS_CORETYPE"] = "Nehalem"
        env["GLIBC_TUNABLES"] = "glibc.cpu.hwcaps=-AVX2,-FMA,-AVX512F"  # libm's non-FMA exp/log/pow/sin
    else:
        for k in ("NPY_DISABLE_CPU_FEATURES", "OPENBLAS_CORETYPE", "GLIBC_TUNABLES"):
            env.pop(k, None)
    run = subprocess.run([sys.executable, "-c", WORKLOAD, kind], env=env, capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_results_do_not_depend_on_the_cpu_features_picked_at_load_time() -> None:
    native, baseline = _digests("native"), _digests("baseline")
    assert baseline.pop("isa") == 0
    isa = native.pop("isa")
    if isa == 0:
        pytest.skip("this machine runs the baseline kernels already")  # pragma: no cover
    differ = {k: (native[k], baseline[k]) for k in native if native[k] != baseline[k]}
    assert not differ, f"results differ between the CPU paths (engine ISA {isa} vs 0): {differ}"
