"""The CUDA backend.

Three layers, each against the CPU engine as the oracle:
- the kernels compile: with nvcc where one is installed, and with NVRTC exactly as the backend
  compiles them at run time (no GPU needed for either);
- the kernel source and the host driver run on the CPU through a host emulation of the device
  (tests/cuda_emu): signals, agent state, stats and journals bit-identical to the CPU backend's;
- on a machine with an NVIDIA GPU (``-m gpu``), the same parity on the device itself.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import dynamic_core as dc
from dynamic_core import gpu
from dynamic_core.errors import BackendUnavailable

from .cuda_emu import EmuDevice

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
    with dc.Engine(pop, backend="auto") as eng:  # falls back to the CPU
        assert eng.backend == "cpu"
        assert eng.stats()["backend"] == "cpu"
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
    with dc.Engine(pop, threads=2, cores_per_sm=32) as cpu, \
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
        with pytest.raises(BackendUnavailable, match="failed in an earlier batch.*MemoryError"):
            eng.run(eurusd[60:70])
