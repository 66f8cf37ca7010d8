"""The CUDA backend.

Three layers, each against the CPU engine as the oracle:
- the kernels compile: with nvcc where one is installed, and with NVRTC exactly as the backend
  compiles them at run time (no GPU needed for either);
- the kernel source and the host driver run on the CPU through a host emulation of the device
  (tests/cuda_emu): signals, agent state, stats and journals bit-identical to the CPU backend's;
- gpu.CupyDevice itself over an emulated CuPy (tests/cuda_emu.FakeCupy): its own stream, errors
  while the backend starts (typed; "auto" falls back to the CPU), device errors mid-run (raised
  once; the engine refuses state it no longer has), ``--check`` through cupy.RawModule;
- on a machine with an NVIDIA GPU (``-m gpu``), the same parity on the device itself.
"""
from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dynamic_core as dc
from dynamic_core import gpu
from dynamic_core.errors import BackendUnavailable

from .cuda_emu import EmuDevice, FakeCupy

ROOT = Path(__file__).resolve().parent.parent
CU_FILES = sorted((ROOT / "cuda").glob("*.cu"))


@pytest.fixture(scope="module")
def emu(tmp_path_factory: pytest.TempPathFactory) -> EmuDevice:
    return EmuDevice.build(tmp_path_factory.mktemp("cuda_emu"))


def assert_same_signals(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype == dc.SIGNAL_DTYPE
    assert len(a) == len(b)
    for f in a.dtype.names:
        diff = np.flatnonzero(a[f] != b[f]) if a[f].ndim == 1 else np.flatnonzero((a[f] != b[f]).any(axis=1))
        assert len(diff) == 0, f"signal field {f!r} differs first at row {diff[0]}: {a[f][diff[0]]} vs {b[f][diff[0]]}"
    assert a.tobytes() == b.tobytes()


def assert_same_agents(a: np.ndarray, b: np.ndarray) -> None:
    for f in a.dtype.names:
        diff = np.flatnonzero(a[f] != b[f])
        assert len(diff) == 0, f"agent field {f!r} differs first at agent {diff[0]}: {a[f][diff[0]]} vs {b[f][diff[0]]}"
    assert a.tobytes() == b.tobytes()


# ---- compilation -------------------------------------------------------------------------------

def test_there_are_kernels_and_they_ship_with_the_package() -> None:
    assert [p.name for p in CU_FILES] == ["engine.cu"]
    assert gpu.kernel_dir().joinpath("engine.cu").exists()
    assert gpu.include_dir().joinpath("dynamic_core", "math.hpp").exists()
    src = gpu.kernel_source()
    # the arithmetic is included from the engine, not copied
    assert '#include "dynamic_core/indicators.hpp"' in src
    for k in gpu.KERNELS:
        assert f'extern "C" __global__ void {k}(' in src


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_every_kernel_file_compiles_with_nvcc(cu: Path, tmp_path: Path) -> None:
    ptx = tmp_path / (cu.stem + ".ptx")
    r = subprocess.run(["nvcc", "-std=c++17", "--fmad=false", f"-I{ROOT / 'cpp'}", "-arch=sm_90", "--ptx",
                        "-Werror", "all-warnings", str(cu), "-o", str(ptx)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = ptx.read_text()
    for k in gpu.KERNELS:
        assert f".entry {k}(" in text


def _nvrtc_available() -> bool:
    try:
        gpu._load_nvrtc()
    except BackendUnavailable:
        return False
    return True


@pytest.mark.skipif(not _nvrtc_available(), reason="the NVRTC library is not installed")
def test_kernels_compile_with_nvrtc_as_the_backend_does() -> None:
    # Under NVRTC there are no standard headers and every function the kernels call must be
    # __device__: what nvcc alone does not catch.
    ptx, log = gpu.compile_ptx(arch="compute_90")
    for k in gpu.KERNELS:
        assert f".entry {k}(" in ptx
    assert "--fmad=false" in gpu.nvrtc_options()
    # FMA contraction off: no fused multiply-add in the generated code
    assert "fma.rn.f64" not in ptx
    assert gpu.main(["--check"]) == 0


def test_nvrtc_reports_a_broken_kernel() -> None:
    if not _nvrtc_available():
        pytest.skip("the NVRTC library is not installed")
    with pytest.raises(RuntimeError, match="could not compile"):
        gpu.compile_ptx(gpu.kernel_source() + "\nextern \"C\" __global__ void broken() { undefined_call(); }\n")


# ---- backend selection -------------------------------------------------------------------------

def test_cuda_backend_without_a_gpu_says_what_is_missing() -> None:
    status = gpu.probe()
    if status:
        pytest.skip(f"a GPU is usable here: {status.device}")
    pop = dc.Population.random(64, instruments=["EURUSD"], seed=1)
    with pytest.raises(BackendUnavailable, match="backend='cuda' needs a usable GPU: .*(CuPy|CUDA)"):
        dc.Engine(pop, backend="cuda")
    with dc.Engine(pop, backend="auto") as eng:  # falls back to the CPU, saying why
        assert eng.backend == "cpu" and eng.backend_fallback
        assert eng.stats()["backend"] == "cpu"
        assert "needs a usable GPU" in eng.stats()["backend_fallback"]
    with dc.Engine(pop) as eng:
        assert eng.stats()["backend_fallback"] is None
    with pytest.raises(ValueError, match="backend must be"):
        dc.Engine(pop, backend="tpu")


def test_cpu_only_calls_are_refused_with_a_device(emu: EmuDevice, eurusd: np.ndarray) -> None:
    pop = dc.Population.random(64, instruments=["EURUSD"], seed=1)
    with dc.Engine(pop, backend="cuda", device=emu) as eng:
        assert eng.backend == "cuda"
        for call in (lambda: eng.submit(eurusd[:3]), lambda: eng.poll(), lambda: eng.on_signal(print)):
            with pytest.raises(BackendUnavailable, match="CPU backend only"):
                call()
    with pytest.raises(BackendUnavailable, match="fault injection"):
        dc.Engine(pop, backend="cuda", device=emu, fault_injection=True)


def test_a_strict_device_engine_refuses_a_bad_batch_whole(emu: EmuDevice, eurusd: np.ndarray) -> None:
    pop = dc.Population.random(64, instruments=["EURUSD"], seed=1)
    bad = eurusd[:5].copy()
    bad["high"][2] = bad["low"][2] / 2
    with dc.Engine(pop, backend="cuda", device=emu, strict=True) as eng:
        with pytest.raises(dc.errors.InvalidInput, match="row 2: high_below_low") as e:
            eng.run(bad)
        assert e.value.rows == [2]
        with pytest.raises(dc.errors.InvalidInput):
            eng.step(bad[2])
        assert eng.stats()["bars_in"] == 0 and emu.launches.get("dc_lanes_block", 0) == 0
        assert len(eng.run(eurusd[:5])) == 5  # the good batch runs


# ---- parity through the host emulation ----------------------------------------------------------

def test_eurusd_sweep_is_bit_identical_to_the_cpu(emu: EmuDevice, eurusd: np.ndarray) -> None:
    # Real EURUSD bars; SMs of four warps (the order of their sums in the SM summary matters); blocks
    # of 97 bars, so state and indicators carry across launches mid-warm-up.
    pop = dc.Population.random(300, instruments=["EURUSD"], seed=7)
    bars = eurusd[:300]
    with dc.Engine(pop, threads=2, cores_per_sm=128) as cpu, \
            dc.Engine(pop, cores_per_sm=128, backend="cuda", device=emu, block_bars=97) as dev:
        a = np.concatenate([cpu.run(bars[:150]), cpu.run(bars[150:])])
        b = np.concatenate([dev.run(bars[:150]), dev.run(bars[150:])])
        assert len(a) == 300 and a["n_agents"].max() > 0
        assert_same_signals(a, b)
        assert_same_agents(cpu.agents(), dev.agents())
        sc, sd = cpu.stats(), dev.stats()
        for k in ("accepted", "signals", "agent_updates", "quarantined"):
            assert sc[k] == sd[k], k
        assert sd["backend"] == "cuda" and sd["device"] == emu.name
    assert emu.launches["dc_lanes_block"] >= 4


def test_streams_of_many_sms_fuse_through_the_wide_kernel(emu: EmuDevice, sim_bars: np.ndarray,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # A stream of ~35 SMs beside a stream of a few, in one launch of the wide consensus kernel:
    # the same bits as the CPU's SM-order sum, in one chunk (a block of 64 threads) and in two
    # (blocks of 32: the loads of the next chunk overlap the adds of this one).
    rec = np.concatenate([dc.Population.random(1100, instruments=["EURUSD"], seed=21).records,
                          dc.Population.random(100, instruments=["GBPUSD"], seed=22).records])
    rec["agent_id"] = np.arange(len(rec))
    pop = dc.Population.from_records(rec)
    ids = [dc.instruments.id("EURUSD"), dc.instruments.id("GBPUSD")]
    bars = sim_bars[np.isin(sim_bars["instrument"], ids)][:80]
    with dc.Engine(pop, threads=2, cores_per_sm=32) as cpu:
        a, agents = cpu.run(bars), cpu.agents()
    assert a["n_agents"].max() > 250  # warm agents: most SMs add to the sum
    for chunk in (gpu.FUSE_CHUNK, 32):
        monkeypatch.setattr(gpu, "FUSE_CHUNK", chunk)
        before = dict(emu.launches)
        with dc.Engine(pop, cores_per_sm=32, backend="cuda", device=emu, block_bars=30) as dev:
            m = dev._device._M
            assert max(m) > gpu.FUSE_WIDE_ABOVE > min(m)
            b = dev.run(bars)
            assert_same_signals(a, b)
            assert_same_agents(agents, dev.agents())
        assert emu.launches["dc_fuse_wide"] - before.get("dc_fuse_wide", 0) == 3
        assert emu.launches.get("dc_fuse_block", 0) == before.get("dc_fuse_block", 0)


def test_mixed_streams_rejects_and_external_agents(emu: EmuDevice, sim_bars: np.ndarray) -> None:
    # Four instruments interleaved, a few bad bars (dead-lettered, not run), a stream nobody
    # follows (skipped), external-score agents whose scores are set between batches, and DSI
    # readers whose evidence changes between batches.
    rec = dc.Population.random(160, instruments=["EURUSD", "GBPUSD", "USDJPY"], seed=3,
                               dsi_share=0.4).records.copy()
    rec["kind"][::9] = 1
    pop = dc.Population.from_records(rec)
    bars = sim_bars[:240].copy()
    bars["close"][[17, 101]] = np.nan
    bars["high"][55] = bars["low"][55] - 1.0
    ext = rec["agent_id"][rec["kind"] == 1]
    scores = np.linspace(-0.9, 0.9, len(ext))
    with dc.Engine(pop, threads=2, cores_per_sm=32, stall_deadline=60.0) as cpu, \
            dc.Engine(pop, cores_per_sm=32, backend="cuda", device=emu) as dev:
        out = []
        for eng in (cpu, dev):
            s1 = eng.run(bars[:120])
            eng.set_external_scores(ext, scores)
            eng.set_credit(rec["agent_id"][:10], np.full(10, 2.5))
            assert eng.set_dsi({"EURUSD": 0.6, "GBPUSD": -0.45}) == 2
            s2 = eng.run(bars[120:])
            out.append((np.concatenate([s1, s2]), eng.agents(), eng.dead_letters(), eng.stats()))
        (a, ag_a, dl_a, st_a), (b, ag_b, dl_b, st_b) = out
        assert set(dc.instruments.name(int(i)) for i in a["instrument"]) == {"EURUSD", "GBPUSD", "USDJPY"}
        # the device's consensus writes each stream's evidence into its signals, as the CPU's does
        late = np.arange(len(a)) >= len(s1)  # the second batch: after set_dsi
        eur = a["instrument"] == dc.instruments.id("EURUSD")
        assert (b["dsi"][late & eur] == 0.6).all() and (b["flags"][late & eur] == dc.SIGNAL_DSI).all()
        assert (b["flags"][~late] == 0).all() and (b["dsi"][~late] == 0.0).all()
        assert_same_signals(a, b)
        assert_same_agents(ag_a, ag_b)
        assert dl_a.tobytes() == dl_b.tobytes() and len(dl_a) == 3
        assert st_a["skipped_unfollowed"] == st_b["skipped_unfollowed"] > 0
        # the health counters too: bars per SM, a latency for every signal, a high-water mark
        assert st_b["sms"]["bars"].tolist() == st_a["sms"]["bars"].tolist() and st_b["sms"]["bars"].min() > 0
        assert st_b["latency_s"]["count"] == st_a["latency_s"]["count"] == len(a)
        assert st_b["latency_s"]["p50"] > 0 and st_b["in_flight_high_water"] > 0
        assert st_b["sms"]["status"].tolist() == st_a["sms"]["status"].tolist()
        assert (st_b["sms"]["stalls"] == 0).all()


def test_live_step_matches_backtest_blocks(emu: EmuDevice, eurusd: np.ndarray) -> None:
    pop = dc.Population.random(96, instruments=["EURUSD"], seed=11)
    bars = eurusd[:120]
    with dc.Engine(pop, threads=1, cores_per_sm=32) as cpu, \
            dc.Engine(pop, cores_per_sm=32, backend="cuda", device=emu) as dev:
        a = cpu.run(bars)
        live = [dev.step(b) for b in bars]
        assert all(s is not None for s in live)
        assert [s.score for s in live] == a["score"].tolist()
        assert [s.seq for s in live] == a["seq"].tolist()
        assert [s.n_agents for s in live] == a["n_agents"].tolist()
        assert_same_agents(cpu.agents(), dev.agents())


def test_evolution_with_the_device_state(emu: EmuDevice, eurusd: np.ndarray) -> None:
    # A generation reads the device's agent state (copied to the native mirror) and the device
    # runs the children afterwards: the same as on the CPU.
    pop = dc.Population.random(128, instruments=["EURUSD"], seed=5, dsi_share=0.5)
    cfg = dc.payloads.EvolutionConfig(min_age=20, min_trades=0, replace_fraction=0.25)
    with dc.Engine(pop, threads=1, cores_per_sm=64) as cpu, \
            dc.Engine(pop, cores_per_sm=64, backend="cuda", device=emu) as dev:
        res = []
        for eng in (cpu, dev):
            eng.set_dsi({"EURUSD": 0.7})
            s1 = eng.run(eurusd[:150])
            rep = eng.evolve(cfg, seed=3, generation=1)
            s2 = eng.run(eurusd[150:260])
            res.append((np.concatenate([s1, s2]), rep, eng.genomes(), eng.agents()))
        (a, ra, ga, aa), (b, rb, gb, ab) = res
        assert ra["replaced"] == rb["replaced"] > 0
        assert ga.tobytes() == gb.tobytes()
        assert_same_signals(a, b)
        assert_same_agents(aa, ab)


def test_a_device_run_replays_bit_for_bit_on_the_cpu(emu: EmuDevice, eurusd: np.ndarray, tmp_path: Path) -> None:
    # Journal written by the device backend (inputs by the native ingress, signal hashes of the
    # device's signals); replayed by the CPU engine, which verifies every hash.
    pop = dc.Population.random(100, instruments=["EURUSD"], seed=2)
    with dc.Engine(pop, backend="cuda", device=emu, cores_per_sm=32, journal=tmp_path / "j") as dev:
        sig = np.concatenate([dev.run(eurusd[:90]), dev.run(eurusd[90:180])])
    res = dc.journal.replay(tmp_path / "j", verify=True)
    assert res.ok and res.verified == len(sig) == 180
    assert_same_signals(res.signals, sig)
    # and the other way: a CPU journal replayed on the device
    # (with DSI readers and a journaled DSI change)
    pop = dc.Population.random(100, instruments=["EURUSD"], seed=2, dsi_share=0.5)
    with dc.Engine(pop, threads=2, cores_per_sm=32, journal=tmp_path / "k") as cpu:
        cpu.run(eurusd[:60])
        cpu.set_dsi({"EURUSD": -0.9})
        cpu.run(eurusd[60:120])
    res = dc.journal.replay(tmp_path / "k", verify=True, backend="cuda", device=emu)
    assert res.ok and res.verified == 120
    res = dc.journal.replay(tmp_path / "k", verify=True)
    assert res.ok and res.verified == 120


# ---- on a GPU --------------------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_parity_on_the_device(eurusd: np.ndarray) -> None:
    status = gpu.probe()
    if not status:
        pytest.skip(f"no usable GPU: {status.reason}")
    pop = dc.Population.random(5000, instruments=["EURUSD"], seed=9)
    with dc.Engine(pop, threads=2) as cpu, dc.Engine(pop, backend="cuda", block_bars=777) as dev:
        a, b = cpu.run(eurusd), dev.run(eurusd)
        assert_same_signals(a, b)
        assert_same_agents(cpu.agents(), dev.agents())
    with dc.Engine(pop, backend="cuda") as live:  # live mode: one bar per launch
        sig = [live.step(bar) for bar in eurusd[:300]]
        assert [s.score for s in sig] == a["score"][:300].tolist()


def test_cli_backend_option(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from dynamic_core import cli

    if gpu.probe():
        pytest.skip("a GPU is usable here")
    assert cli.main(["run", "--agents", "64", "--bars", "50", "--backend", "cuda", "-q"]) == 2
    assert "needs a usable GPU" in capsys.readouterr().err
    assert cli.main(["run", "--agents", "64", "--bars", "50", "--backend", "auto", "-q",
                     "--journal", str(tmp_path / "j")]) == 0
    assert cli.main(["replay", str(tmp_path / "j"), "--verify", "--backend", "cuda", "-q"]) == 2
    assert "needs a usable GPU" in capsys.readouterr().err
    assert cli.main(["run", "--agents", "64", "--bars", "50", "--backend", "cuda", "--paper", "-q"]) == 2
    assert "CPU backend" in capsys.readouterr().err


def test_kernel_cache_key_follows_the_headers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # CuPy caches compiled kernels by source and options: the included headers' digest is in the
    # options, so editing math.hpp (not engine.cu) still recompiles.
    before = gpu.nvrtc_options()
    inc = tmp_path / "include"
    shutil.copytree(gpu.include_dir() / "dynamic_core", inc / "dynamic_core")
    monkeypatch.setattr(gpu, "include_dir", lambda: inc)
    assert gpu.nvrtc_options()[-1] == before[-1]  # same headers, same key
    math = inc / "dynamic_core" / "math.hpp"
    math.write_text(math.read_text().replace("kWeakAction = 0.2", "kWeakAction = 0.25"))
    assert gpu.nvrtc_options()[-1] != before[-1]


class _FailingEmu(EmuDevice):
    fail_at = -1

    def launch(self, name, grid, block, args):  # type: ignore[no-untyped-def]
        if name == "dc_lanes_block":
            self.fail_at -= 1
            if self.fail_at == 0:
                raise MemoryError("out of device memory (injected)")
        super().launch(name, grid, block, args)


def test_a_device_failure_mid_batch_stops_the_engine(emu: EmuDevice, eurusd: np.ndarray) -> None:
    # The batch was admitted (sequenced, journaled) before it ran: after a failure in its second
    # block the device state matches no journal, so the engine refuses further bars.
    dev = _FailingEmu(Path(emu._lib._name))
    dev.fail_at = 2
    pop = dc.Population.random(64, instruments=["EURUSD"], seed=1)
    with dc.Engine(pop, cores_per_sm=32, backend="cuda", device=dev, block_bars=20) as eng:
        with pytest.raises(MemoryError):
            eng.run(eurusd[:60])
        with pytest.raises(BackendUnavailable, match="device failed earlier.*MemoryError"):
            eng.run(eurusd[60:70])


# ---- CupyDevice itself, through an emulated CuPy ----------------------------------------------------

@pytest.fixture
def fake_cupy(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> FakeCupy:
    """CuPy's API over the host emulation, installed as ``cupy``: gpu.probe() finds a usable
    GPU and ``Engine(backend="cuda")`` runs gpu.CupyDevice, compiling through its RawModule."""
    from dynamic_core import engine

    monkeypatch.setattr(gpu.CupyDevice, "_modules", {})  # no module of another test's CuPy
    monkeypatch.setattr(gpu.CupyDevice, "_compile_failed", {})  # nor another test's failed compile
    monkeypatch.setattr(engine, "_fallbacks_logged", set())
    return FakeCupy(tmp_path_factory.mktemp("fake_cupy")).install(monkeypatch)


def test_cupy_device_runs_every_operation_on_its_own_stream(fake_cupy: FakeCupy, eurusd: np.ndarray) -> None:
    # Uploads (pinned, asynchronous in CuPy), launches and downloads all on the device's own
    # non-blocking stream, whatever stream the calling thread has current; every download
    # synchronises that stream. And the parity with the CPU through the real CupyDevice.
    pop = dc.Population.random(96, instruments=["EURUSD"], seed=4)
    bars = eurusd[:160]
    user_stream = fake_cupy.module.cuda.Stream(non_blocking=True)
    with dc.Engine(pop, threads=1, cores_per_sm=32) as cpu, user_stream, \
            dc.Engine(pop, cores_per_sm=32, backend="cuda", block_bars=50) as dev:
        assert dev.backend == "cuda" and dev.stats()["device"].startswith("Emulated CUDA device")
        a = cpu.run(bars[:150])
        b = dev.run(bars[:150])
        live = [dev.step(bar) for bar in bars[150:]]
        a2 = cpu.run(bars[150:])
        assert_same_signals(a, b)
        assert [s.score for s in live] == a2["score"].tolist()
        assert_same_agents(cpu.agents(), dev.agents())
        own = dev._device.dev.stream
    assert own.non_blocking and own is not user_stream
    log = fake_cupy.log
    assert {what for what, _, _ in log} >= {"put", "zeros", "launch", "get", "sync"}
    assert all(stream is own for _, stream, _ in log), {(w, repr(s)) for w, s, _ in log if s is not own}
    for i, (what, _, _) in enumerate(log):
        if what == "get":
            assert log[i + 1][0] == "sync", f"download {i} not followed by a synchronisation of the stream"
    # compiled once, by the RawModule, from the kernel source with the backend's options
    assert fake_cupy.compiled == [(gpu.kernel_source(), gpu.nvrtc_options())]
    assert "--fmad=false" in fake_cupy.compiled[0][1]


_START_FAILURES = {
    # where, which failure, how many of those operations succeed first, what the message names
    "compile error": ("compile", "CompileException", (("engine.cu(12): error: identifier \"x\" is undefined\n"
                                                       "1 error detected in the compilation of \"engine.cu\"."),), 0),
    "no libnvrtc": ("compile", "RuntimeError", (("CuPy failed to load libnvrtc.so.12: OSError: libnvrtc.so.12: "
                                                 "cannot open shared object file: No such file or directory"),), 0),
    "no CUDA root": ("compile", "RuntimeError", (("Failed to auto-detect CUDA root directory. Please specify "
                                                  "`CUDA_PATH` environment variable"),), 0),
    "first launch": ("launch", "CUDARuntimeError", (209, "cudaErrorNoKernelImageForDevice"), 0),
    "first sync": ("sync", "CUDARuntimeError", (700, "cudaErrorIllegalAddress"), 0),
    "upload": ("put", "OutOfMemoryError", ("Out of memory allocating 268,435,456 bytes",), 3),
    "allocation": ("zeros", "OutOfMemoryError", ("Out of memory allocating 1,048,576 bytes",), 2),
}


def _exc(fake: FakeCupy, kind: str, args: tuple) -> BaseException:
    cls = {"RuntimeError": RuntimeError, "CompileException": fake.CompileException,
           "CUDARuntimeError": fake.CUDARuntimeError, "OutOfMemoryError": fake.OutOfMemoryError}[kind]
    return cls(*args)


@pytest.mark.parametrize("case", list(_START_FAILURES), ids=lambda c: c.replace(" ", "-"))
def test_a_backend_that_cannot_start_is_typed_and_auto_falls_back(
        case: str, fake_cupy: FakeCupy, eurusd: np.ndarray, caplog: pytest.LogCaptureFixture) -> None:
    point, kind, args, after = _START_FAILURES[case]
    pop = dc.Population.random(64, instruments=["EURUSD"], seed=1)
    exc = _exc(fake_cupy, kind, args)
    fake_cupy.inject(point, exc, after=after)
    with pytest.raises(BackendUnavailable, match=f"could not (start|take).*{kind}") as ei:
        dc.Engine(pop, backend="cuda")
    assert ei.value.__cause__ is exc  # CuPy's exception, chained
    assert "\n" not in str(ei.value)  # one line (a compiler's log stays in the cause)
    final = kind == "CompileException"  # the source or options: not compiled again in this process
    with caplog.at_level(logging.INFO, logger="dynamic_core.engine"):
        for _ in range(2):
            if not final:
                fake_cupy.inject(point, _exc(fake_cupy, kind, args), after=after)
            with dc.Engine(pop, backend="auto", threads=2) as eng:
                assert eng.backend == "cpu" and eng.backend_fallback
                st = eng.stats()
                assert st["backend"] == "cpu" and kind in st["backend_fallback"] and "device" not in st
                assert st["threads"] == 2  # the CPU engine, not the device's mirror
                assert len(eng.run(eurusd[:50])) == 50
                assert ("not tried again" in st["backend_fallback"]) == final
    fallbacks = [r for r in caplog.records if "backend='auto' runs on the CPU" in r.getMessage()]
    assert len(fallbacks) == 1 and fallbacks[0].levelno == logging.WARNING  # logged once
    if final:
        assert fake_cupy.compiled == []  # the failed compile was never tried again
        gpu.CupyDevice._compile_failed.clear()  # as in a new process: it compiles again
    # the failure was injected once each time: the next engine starts
    with dc.Engine(pop, backend="auto") as eng:
        assert eng.backend == "cuda" and eng.stats()["backend_fallback"] is None


def test_probe_reports_a_broken_cupy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     caplog: pytest.LogCaptureFixture) -> None:
    # A CuPy whose import fails with something else than ImportError (a binary built against
    # NumPy 1.x under NumPy 2 raises AttributeError/ValueError): unusable, with the reason.
    pkg = tmp_path / "cupy"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise AttributeError('_ARRAY_API not found')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    status = gpu.probe()
    assert not status and "cannot be imported" in status.reason and "AttributeError: _ARRAY_API" in status.reason
    pop = dc.Population.random(64, instruments=["EURUSD"], seed=1)
    with pytest.raises(BackendUnavailable, match="needs a usable GPU: CuPy is installed but cannot be imported"):
        dc.Engine(pop, backend="cuda")
    from dynamic_core import engine

    monkeypatch.setattr(engine, "_fallbacks_logged", set())
    with caplog.at_level(logging.INFO, logger="dynamic_core.engine"), dc.Engine(pop, backend="auto") as eng:
        assert eng.backend == "cpu" and "AttributeError" in eng.stats()["backend_fallback"]
    # a broken install is worth a warning (no CuPy at all is what "auto" expects: info)
    assert [r.levelno for r in caplog.records if "runs on the CPU" in r.getMessage()] == [logging.WARNING]
    assert gpu.main([]) == 3


def test_check_compiles_through_cupy_when_a_gpu_is_usable(fake_cupy: FakeCupy, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    assert gpu.main(["--check"]) == 0
    out = capsys.readouterr().out
    assert "CuPy" in out and "compiled and loaded" in out and "dc_lanes_block" in out
    assert fake_cupy.compiled == [(gpu.kernel_source(), gpu.nvrtc_options())]  # the backend's RawModule
    # a compile error: the compiler's log, exit 1
    monkeypatch.setattr(gpu.CupyDevice, "_modules", {})
    fake_cupy.inject("compile", fake_cupy.CompileException("engine.cu(3): error: expected a \";\""))
    assert gpu.main(["--check"]) == 1
    out = capsys.readouterr().out
    assert "do not compile" in out and 'expected a ";"' in out
    gpu.CupyDevice._compile_failed.clear()  # each --check is a process of its own
    # CuPy without its NVRTC: exit 2, the reason
    fake_cupy.inject("compile", RuntimeError("CuPy failed to load libnvrtc.so.12"))
    assert gpu.main(["--check"]) == 2
    assert "failed to load libnvrtc" in capsys.readouterr().out


def test_cli_backend_errors_are_one_line(fake_cupy: FakeCupy, capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path) -> None:
    from dynamic_core import cli

    fake_cupy.inject("compile", fake_cupy.CompileException("engine.cu(7): error: bad\n1 error detected"))
    assert cli.main(["run", "--agents", "64", "--bars", "50", "--backend", "cuda", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dynamic-core: error: the CUDA backend could not start") and "CompileException" in err
    assert err.count("\n") == 1
    gpu.CupyDevice._compile_failed.clear()  # each run is a process of its own
    # a device failure mid-run: one line too, the journal closed and replayable
    fake_cupy.inject("launch", fake_cupy.CUDARuntimeError(700, "cudaErrorIllegalAddress"), kernel="dc_lanes_block",
                     sticky=True)
    rc = cli.main(["run", "--agents", "64", "--bars", "50", "--backend", "cuda", "-q",
                   "--journal", str(tmp_path / "j")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("dynamic-core: error: the CUDA device failed") and err.count("\n") == 1
    assert "CUDARuntimeError" in err and "replay" in err
    assert dc.journal.replay(tmp_path / "j").ok


def _failing_engine(pop: dc.Population, **kw) -> dc.Engine:  # type: ignore[no-untyped-def]
    return dc.Engine(pop, cores_per_sm=32, backend="cuda", block_bars=20, **kw)


def test_a_sticky_device_error_surfaces_once_and_close_adds_nothing(fake_cupy: FakeCupy, eurusd: np.ndarray,
                                                                     tmp_path: Path) -> None:
    # A context-poisoning error in the second block of the second batch: every later CUDA call
    # fails too. The run raises it once; leaving the `with` copies nothing back (the runner
    # failed), so it raises nothing on top of it, and the engine ends closed.
    pop = dc.Population.random(64, instruments=["EURUSD"], seed=1)
    err = fake_cupy.CUDARuntimeError(700, "an illegal memory access was encountered")
    fake_cupy.inject("launch", err, kernel="dc_lanes_block", after=2, sticky=True)
    raised = []
    with pytest.raises(fake_cupy.CUDARuntimeError) as ei:
        with _failing_engine(pop, journal=tmp_path / "j") as eng:
            eng.run(eurusd[:20])
            try:
                eng.run(eurusd[20:80])
            except BaseException as e:
                raised.append(e)
                ops = len(fake_cupy.log)
                raise
    assert ei.value is err and raised == [err]
    assert ei.value.__context__ is None and ei.value.__cause__ is None
    assert len(fake_cupy.log) == ops  # nothing touched the device after the failure: close() copied nothing back
    assert eng.closed
    with pytest.raises(BackendUnavailable, match="CUDA device failed.*CUDARuntimeError.*replay the journal"):
        eng.agents()
    assert "CUDARuntimeError" in eng.stats()["device_error"]
    eng.close()  # idempotent
    res = dc.journal.replay(tmp_path / "j")  # the journal holds every admitted bar
    assert res.ok and len(res.signals) == 80


def test_a_one_off_device_error_mid_batch_leaves_no_half_run_state(fake_cupy: FakeCupy, eurusd: np.ndarray) -> None:
    # Out of memory in the second block of a batch (not sticky: the device still answers): its
    # first block ran, so copying the device state back would show a state matching no journal
    # position. agents() and the other state calls refuse instead, before and after close.
    pop = dc.Population.random(64, instruments=["EURUSD"], seed=1)
    fake_cupy.inject("launch", fake_cupy.OutOfMemoryError("Out of memory allocating 4,096 bytes"),
                     kernel="dc_lanes_block", after=2)
    with _failing_engine(pop) as eng:
        eng.run(eurusd[:20])
        assert len(eng.agents()) == 64
        with pytest.raises(MemoryError):
            eng.run(eurusd[20:80])
        for call in (eng.agents, lambda: eng.set_credit(pop.records["agent_id"][:1], [2.0]),
                     lambda: eng.evolve(dc.payloads.EvolutionConfig(min_age=1, min_trades=0), seed=1, generation=1)):
            with pytest.raises(BackendUnavailable, match="CUDA device failed.*OutOfMemoryError"):
                call()
        with pytest.raises(BackendUnavailable, match="device failed earlier"):
            eng.run(eurusd[80:90])
        assert eng.stats()["accepted"] == 80 and "OutOfMemoryError" in eng.stats()["device_error"]
    with pytest.raises(BackendUnavailable, match="CUDA device failed"):
        eng.agents()


def test_a_device_error_found_at_close_is_logged_not_raised(fake_cupy: FakeCupy, eurusd: np.ndarray,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    pop = dc.Population.random(64, instruments=["EURUSD"], seed=1)
    with caplog.at_level(logging.WARNING, logger="dynamic_core.engine"), _failing_engine(pop) as eng:
        eng.run(eurusd[:40])
        fake_cupy.inject("get", fake_cupy.CUDARuntimeError(700, "cudaErrorIllegalAddress"), sticky=True)
    assert eng.closed
    assert any("copied back at close" in r.getMessage() for r in caplog.records)
    with pytest.raises(BackendUnavailable, match="CUDA device failed.*copying the agent state back"):
        eng.agents()


# ---- the emulator's own checks --------------------------------------------------------------------

def test_the_emulator_checks_arguments_and_launch_limits(emu: EmuDevice) -> None:
    # What a real launch gets silently wrong: the driver copies sizeof(parameter) bytes of each
    # argument (CuPy passes a Python int as an int64), and CUDA refuses blocks over 1024
    # threads and grids over 65535 in y.
    sizes = np.zeros(3, np.uint64)
    emu.launch("dc_sizes", (1, 1), 1, (sizes,))
    assert sizes.min() > 0
    with pytest.raises(TypeError, match="pointer"):
        emu.launch("dc_sizes", (1, 1), 1, (5,))
    with pytest.raises(TypeError, match="8-byte integers"):
        emu.launch("dc_sizes", (1, 1), 1, (np.zeros(3, np.uint32),))
    with pytest.raises(TypeError, match="1 arguments for 2|2 arguments for 1"):
        emu.launch("dc_sizes", (1, 1), 1, (sizes, sizes))
    i32 = np.zeros(4, np.int32)
    st = np.zeros(4096, np.uint8)

    def init(n):  # type: ignore[no-untyped-def]
        return (n, i32, i32, i32, i32, st)
    emu.launch("dc_ind_init", (1, 1), 128, init(np.int32(0)))
    for bad in (0, np.int64(0), np.uint16(0), np.float32(0.0)):  # int32 parameter
        with pytest.raises(TypeError, match="4-byte integer"):
            emu.launch("dc_ind_init", (1, 1), 128, init(bad))
    with pytest.raises(TypeError, match="4-byte integers"):
        emu.launch("dc_ind_init", (1, 1), 128, (np.int32(0), i32.astype(np.int64), i32, i32, i32, st))
    u32, i64, u64, f64 = (np.zeros(4, t) for t in (np.uint32, np.int64, np.uint64, np.float64))
    block = [np.int32(0), i32, u32, u32, i64, f64, st, f64, f64, f64, u32, u32, u64, f64]  # dc_ind_block's
    emu.launch("dc_ind_block", (1, 1), 128, tuple(block))
    block[5] = np.zeros(4, np.float32)  # double* buf
    with pytest.raises(TypeError, match="argument 5 .* 8-byte floats"):
        emu.launch("dc_ind_block", (1, 1), 128, tuple(block))
    with pytest.raises(RuntimeError, match="block size"):
        emu.launch("dc_ind_init", (1, 1), 2048, init(np.int32(0)))
    with pytest.raises(RuntimeError, match="block size"):
        emu.launch("dc_ind_init", (1, 1), 0, init(np.int32(0)))
    for grid in ((1, 65536), (0, 1), (1, 0)):
        with pytest.raises(RuntimeError, match="grid"):
            emu.launch("dc_ind_init", grid, 128, init(np.int32(0)))
    emu.launch("dc_ind_init", (1, 65535), 1, init(np.int32(0)))  # the limit itself is fine


def test_replay_on_a_failing_device_is_one_line(fake_cupy: FakeCupy, capsys: pytest.CaptureFixture[str],
                                                tmp_path: Path) -> None:
    from dynamic_core import cli

    journal = str(tmp_path / "j")
    assert cli.main(["run", "--agents", "64", "--bars", "120", "-q", "--journal", journal]) == 0
    capsys.readouterr()
    fake_cupy.inject("launch", fake_cupy.CUDARuntimeError(700, "cudaErrorIllegalAddress"), kernel="dc_lanes_block",
                     sticky=True)
    rc = cli.main(["replay", journal, "--backend", "cuda", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("dynamic-core: error: the CUDA device failed") and err.count("\n") == 1, err
    assert "CUDARuntimeError" in err
