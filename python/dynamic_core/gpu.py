"""The CUDA backend: the population, its indicator banks and its state in GPU memory (CuPy),
run by the kernels of ``cuda/engine.cu`` compiled at run time by NVRTC.

``dc.Engine(pop, backend="cuda")`` uses it; ``backend="auto"`` uses it when :func:`probe`
finds a usable GPU. The kernels include the engine's own ``math.hpp`` and ``indicators.hpp``
(no second copy of the arithmetic) and are compiled with ``--fmad=false``, so the signals and
agent state are bit-identical to the CPU backend's.

Ingress (validation, sequencing, dead letters, the journal) stays in the native engine, which
also mirrors the agent state for ``agents()``, ``set_credit`` and ``evolve``: the device state is
copied to it before any of them reads or changes it, and back after a change.

Errors: whatever stops the backend from starting (no CuPy or a broken one, no driver or device,
NVRTC missing or failing to compile, a device or memory error while the kernels load or the
population uploads) is a :class:`~dynamic_core.errors.BackendUnavailable` naming it (the CuPy
exception chained as its cause), raised when the engine is created, never at its first run; an
engine created with ``backend="auto"`` then runs on the CPU and says why in
``stats()["backend_fallback"]``. A device error while bars run (or state travels) re-raises the
device's own exception (CuPy's ``OutOfMemoryError``, a ``MemoryError``; ``CUDARuntimeError``, a
``RuntimeError``) once, and the runner is failed from then on: the batch had been admitted and
journaled, so the device's state matches no journal position any more. Later ``run``/``step``
calls and every call that reads or changes agent state (``agents()``, ``evolve``, ``set_credit``,
...) raise ``BackendUnavailable`` naming the failure; ``close()`` adds nothing to it; the
journal, ``stats()`` (``"device_error"``) and ``dead_letters()`` still answer. Replaying the
journal (on either backend) recovers the state.

``python -m dynamic_core.gpu`` says whether a GPU is usable and why not; ``--check`` compiles
the kernels as the backend does: through CuPy (``cupy.RawModule``, the backend's options) where a
GPU is usable, else with the NVRTC library it finds (no GPU needed), naming which.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import glob
import hashlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import BackendUnavailable
from .records import ADMITTED_DTYPE, SIGNAL_DTYPE

__all__ = ["GpuStatus", "probe", "kernel_source", "include_dir", "nvrtc_options", "compile_ptx",
           "DeviceRunner", "CupyDevice", "KERNELS"]

_PKG = Path(__file__).resolve().parent
# The kernels each launch runs (the emulator in tests/ and the CuPy device load the same names).
KERNELS = ("dc_sizes", "dc_ind_init", "dc_ind_block", "dc_feat_block", "dc_lanes_block", "dc_fuse_block",
           "dc_fuse_wide")
# Bytes of device memory one block's scratch (indicator outputs, features, SM summaries, together)
# may take; the block's bars and signals come on top.
SCRATCH_BYTES = 256 << 20
DEFAULT_BLOCK_BARS = 4096
# Populations with a stream of more SMs than this fuse with dc_fuse_wide (a CUDA block per row,
# keeping its four adding threads fed), the others with dc_fuse_block (a thread per row); at most
# FUSE_CHUNK threads a block.
FUSE_WIDE_ABOVE = 32
FUSE_CHUNK = 256  # engine.cu kFuseChunk


def _first(*paths: Path) -> Path | None:
    return next((p for p in paths if p.exists()), None)


def kernel_dir() -> Path:
    """Where the ``.cu`` files are: inside the installed package, or the source tree's ``cuda/``."""
    d = _first(_PKG / "cuda", _PKG.parent.parent / "cuda")
    if d is None or not (d / "engine.cu").exists():
        raise BackendUnavailable("the CUDA kernels (cuda/engine.cu) are not installed with this package")
    return d


def include_dir() -> Path:
    """The directory holding ``dynamic_core/math.hpp`` (the arithmetic the kernels share)."""
    d = _first(_PKG / "include", _PKG.parent.parent / "cpp")
    if d is None or not (d / "dynamic_core" / "math.hpp").exists():
        raise BackendUnavailable("the engine headers (dynamic_core/math.hpp) are not installed with this package")
    return d


def kernel_source() -> str:
    return (kernel_dir() / "engine.cu").read_text()


HEADERS = ("math.hpp", "indicators.hpp", "records.hpp")


def headers_digest() -> str:
    """A digest of the headers the kernels include. CuPy's kernel cache keys on the source and
    the options, not on included files: the digest goes into the options, so a changed header
    never reuses a kernel compiled from the old one."""
    h = hashlib.sha256()
    for name in HEADERS:
        h.update((include_dir() / "dynamic_core" / name).read_bytes())
    return h.hexdigest()[:16]


def nvrtc_options(arch: str | None = None) -> tuple[str, ...]:
    """NVRTC options: FMA contraction off (bit-identical to the CPU), C++17, the headers (and
    their digest, see :func:`headers_digest`)."""
    opts = ("--fmad=false", "-std=c++17", f"-I{include_dir()}", f"-DDC_HEADERS_DIGEST=0x{headers_digest()}ull")
    return opts + ((f"--gpu-architecture={arch}",) if arch else ())


@dataclass(frozen=True)
class GpuStatus:
    usable: bool
    reason: str  # why not, or the device in words
    device: str = ""

    def __bool__(self) -> bool:
        return self.usable


_BROKEN_CUPY = "CuPy is installed but cannot be imported"


def probe() -> GpuStatus:
    """Is a GPU usable from here? Names what is missing when not (CuPy, driver, device)."""
    try:
        import cupy  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != "cupy":
            return GpuStatus(False, f"{_BROKEN_CUPY}: {_why(e)}")
        return GpuStatus(False, f"CuPy is not installed (pip install 'dynamic_core[cuda]'): {e}")
    except Exception as e:  # a broken install: a missing library, an ABI mismatch with NumPy 2...
        return GpuStatus(False, f"{_BROKEN_CUPY}: {_why(e)}")
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError: no driver, no device
        return GpuStatus(False, f"CuPy found no usable CUDA driver or device: {e}")
    if n == 0:
        return GpuStatus(False, "CuPy found no CUDA device")
    try:
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        mem = props["totalGlobalMem"] / 2**30
        cc = f"{props['major']}.{props['minor']}"
    except Exception as e:
        return GpuStatus(False, f"the CUDA device could not be queried: {e}")
    dev = f"{name} ({mem:.0f} GiB, compute capability {cc})"
    return GpuStatus(True, dev, dev)


# ---- NVRTC without CuPy (compile checks on machines without a GPU) ---------------------------

def _load_nvrtc() -> ctypes.CDLL:
    names: list[str] = []
    try:
        import nvidia.cuda_nvrtc as pkg  # the NVRTC wheel (nvidia-cuda-nvrtc-cu12)
        for d in pkg.__path__:
            names += sorted(glob.glob(os.path.join(d, "lib", "libnvrtc.so*")))
    except ImportError:
        pass
    names += sorted(glob.glob("/usr/local/cuda*/lib64/libnvrtc.so*"))
    found = ctypes.util.find_library("nvrtc")
    if found:
        names.append(found)
    errors = []
    for n in names:
        if "builtins" in n or ".alt." in n:
            continue
        try:
            return ctypes.CDLL(n)
        except OSError as e:
            errors.append(f"{n}: {e}")
    raise BackendUnavailable("the NVRTC library was not found (pip install nvidia-cuda-nvrtc-cu12, or a CUDA "
                             "toolkit)" + (": " + "; ".join(errors) if errors else ""))


def compile_ptx(source: str | None = None, arch: str = "compute_90") -> tuple[str, str]:
    """Compiles the kernels with NVRTC as CuPy would (same options); returns (ptx, log).
    Raises :class:`BackendUnavailable` without NVRTC and ``RuntimeError`` with the log when the
    compilation fails."""
    lib = _load_nvrtc()
    src = kernel_source() if source is None else source
    prog = ctypes.c_void_p()
    c = ctypes.c_char_p
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), c(src.encode()), c(b"engine.cu"), 0, None, None)
    if rc != 0:
        raise RuntimeError(f"nvrtcCreateProgram failed ({rc})")
    opts = [o.encode() for o in nvrtc_options(arch)]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    try:
        rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, buf)
        log = buf.value.decode(errors="replace")
        if rc != 0:
            raise RuntimeError(f"NVRTC could not compile cuda/engine.cu:\n{log}")
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        ptx = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetPTX(prog, ptx)
        return ptx.value.decode(), log
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


# ---- devices -----------------------------------------------------------------------------------

def _why(e: BaseException) -> str:
    """One line naming an exception: its type and the first line of its message (a compiler's
    log, a CUDA error's detail) cut at 300 characters."""
    lines = str(e).strip().splitlines()
    msg = lines[0].strip() if lines else ""
    if len(msg) > 300:
        msg = msg[:297] + "..."
    more = " [...]" if len(lines) > 1 else ""
    return f"{type(e).__name__}: {msg}{more}" if msg else type(e).__name__


_STARTUP_HINT = ("`python -m dynamic_core.gpu --check` says more; pip install 'dynamic_core[cuda]' brings CuPy "
                 "with the CUDA components it needs (NVRTC, headers)")


def _load_kernels(cupy: Any, device_id: int) -> dict[str, Any]:
    """The kernels on the current CuPy device: a ``cupy.RawModule`` of :func:`kernel_source`
    with :func:`nvrtc_options`, compiled by CuPy's NVRTC and loaded. CuPy compiles a RawModule
    lazily, at its first ``get_function``: this is where a missing NVRTC or CUDA headers, or a
    compile error (``CompileException``, with the log), surface. A module is kept (per device,
    source and options) once all its kernels loaded; a compile that failed is not tried again
    in this process (every later engine would pay seconds of NVRTC for the same error): its
    error is raised again at once."""
    code, opts = kernel_source(), nvrtc_options()
    key = (int(device_id), hashlib.sha256(code.encode()).hexdigest(), opts)
    failed = CupyDevice._compile_failed.get(key)
    if failed is not None:
        raise RuntimeError(f"{failed} (compiled once in this process already; not tried again)")
    mod = CupyDevice._modules.get(key)
    if mod is None:
        mod = cupy.RawModule(code=code, options=opts)
    try:
        fns = {k: mod.get_function(k) for k in KERNELS}
    except Exception as e:
        if type(e).__name__ == "CompileException":  # the source or options, not the moment: final
            CupyDevice._compile_failed[key] = _why(e)
        raise
    CupyDevice._modules[key] = mod
    return fns


class CupyDevice:
    """Device memory and kernel launches through CuPy on one GPU (``ordinal``; default: the
    current CuPy device), whichever thread calls: every call runs with that device current.

    It owns a non-blocking CUDA stream, and every upload, allocation, launch and download runs
    on it (``with self.device, self.stream``), never on whatever stream the calling thread has
    current: CuPy's uploads of host arrays go through pinned staging buffers, asynchronously on
    the current stream, so work on one stream is what keeps each launch after the uploads it
    reads. A download synchronises the stream before its result is returned.

    Creating one compiles the kernels (:func:`_load_kernels`), runs one tiny kernel and waits for
    it: any failure (NVRTC, compiler, driver, device, memory) is a :class:`BackendUnavailable`
    here, with the CuPy exception as its cause, not an error at the first run."""

    _modules: dict[tuple[int, str, tuple[str, ...]], Any] = {}  # compiled kernels, per device, source, options
    _compile_failed: dict[tuple[int, str, tuple[str, ...]], str] = {}  # compiles that failed: their error

    def __init__(self, ordinal: int | None = None) -> None:
        status = probe()
        if not status:
            err = BackendUnavailable(f"backend='cuda' needs a usable GPU: {status.reason}")
            # no CuPy, driver or device: what backend="auto" expects on most machines (a broken
            # CuPy install is not)
            err.no_gpu = _BROKEN_CUPY not in status.reason  # type: ignore[attr-defined]
            raise err
        import cupy
        self.xp = cupy
        self.name = status.device if ordinal is None else f"CUDA device {ordinal}"
        try:
            self.device = cupy.cuda.Device(ordinal) if ordinal is not None else cupy.cuda.Device()
            with self.device:
                self.stream = cupy.cuda.Stream(non_blocking=True)
                self._fn = _load_kernels(cupy, self.device.id)
                with self.stream:  # one launch, to completion: the module loads and runs here
                    sizes = cupy.zeros(3, dtype=np.uint64)
                    self._fn["dc_sizes"]((1,), (1,), (sizes,))
                    self.stream.synchronize()
        except Exception as e:
            raise BackendUnavailable(f"the CUDA backend could not start on {self.name}: {_why(e)} "
                                     f"({_STARTUP_HINT})") from e

    def launch(self, name: str, grid: tuple[int, int], block: int, args: tuple[Any, ...]) -> None:
        with self.device, self.stream:
            self._fn[name](grid, (block,), args)

    def put(self, a: np.ndarray) -> Any:
        with self.device, self.stream:
            return self.xp.asarray(np.ascontiguousarray(a))

    def get(self, a: Any) -> np.ndarray:
        with self.device, self.stream:
            out = self.xp.asnumpy(a)  # on this stream, after everything queued on it
            self.stream.synchronize()
            return out

    def zeros(self, n: int, dtype: Any) -> Any:
        with self.device, self.stream:
            return self.xp.zeros(n, dtype=dtype)


# ---- the runner ----------------------------------------------------------------------------------

_STATE = ("score", "equity", "entry_equity", "peak", "max_dd", "ret_sum", "ret_sq", "credit", "ext_score", "dsi",
          "trades", "wins", "n_ret", "quarantined", "position", "action")
_LANES = ("w0", "w1", "w2", "w3", "w4", "entry", "cost",  # float64
          "fidx0", "fidx1", "fidx2", "fidx3", "fidx4", "lookback", "long_short", "active", "external")  # int32


class DeviceRunner:
    """Runs a native engine's population on a device: uploads the plan, the lanes and the state,
    then turns each admitted batch into signals, ``block_bars`` bars per launch of each kernel
    (the time loop inside the lane kernel, agent state in registers).

    A device error while it starts (uploads, the sizes kernel) is a :class:`BackendUnavailable`
    with the device's exception as its cause. After that, a device error in ``run`` or while
    state travels re-raises the device's exception and sets ``failed``: from then on ``run``
    raises ``BackendUnavailable``, ``store_state`` leaves the native mirror alone (it never takes
    a half-run state), and the engine refuses reads of agent state."""

    def __init__(self, native: Any, device: Any, *, population_hash: int, block_bars: int = 0) -> None:
        self.native = native
        self.dev = device
        self.population_hash = int(population_hash)
        plan = native.device_plan()
        self.n_streams = len(plan["st_instrument"])
        if self.n_streams > 65535:  # grid.y of the feature kernel
            raise BackendUnavailable(f"the CUDA backend runs at most 65,535 streams, this population has {self.n_streams:,}")
        self.failed: str | None = None
        self.n_sms = len(plan["sm_stream"])
        self._plan = plan
        self.n_ind = len(plan["ind_kind"])
        self._I = np.diff(plan["st_ind_begin"]).astype(np.int64)
        self._F = np.diff(plan["st_feat_begin"]).astype(np.int64)
        self._M = (plan["st_sm_end"].astype(np.int64) - plan["st_sm_begin"])
        self.sm_block = int(plan["sm_lanes"].max()) if self.n_sms else 32
        max_sm = int(self._M.max(initial=0))
        # the consensus kernel, its threads a block and rows a block
        self._fuse = (("dc_fuse_wide", min(FUSE_CHUNK, _blocks(max_sm, 32) * 32), 1) if max_sm > FUSE_WIDE_ABOVE
                      else ("dc_fuse_block", 128, 128))
        self.state_dirty = False  # device state newer than the native mirror
        try:
            self._start(plan)
        except BackendUnavailable:
            raise
        except Exception as e:  # CuPy: OutOfMemoryError, CUDARuntimeError, ...
            raise BackendUnavailable(f"the CUDA device could not take the population: {_why(e)}") from e
        # the three scratch buffers of a bar of the widest stream, together
        per_row = int(16 * self._I.max(initial=1) + 8 * self._F.max(initial=1)
                      + self.summary_bytes * self._M.max(initial=1))
        cap = max(1, SCRATCH_BYTES // per_row)  # bars whose scratch fits in SCRATCH_BYTES
        self.block_bars = min(int(block_bars) or DEFAULT_BLOCK_BARS, cap)
        self._scratch: dict[str, Any] = {}

    def _start(self, plan: dict[str, Any]) -> None:
        """The plan, the indicator banks, the lanes and the state to the device."""
        d = self.dev
        self._p = {k: d.put(v) for k, v in plan.items() if isinstance(v, np.ndarray)}
        self._p["ind_stream"] = d.put(np.repeat(np.arange(self.n_streams, dtype=np.uint32), self._I))
        sizes = d.zeros(3, np.uint64)
        d.launch("dc_sizes", (1, 1), 1, (sizes,))
        self.ind_state_bytes, self.summary_bytes, self.signal_bytes = (int(x) for x in d.get(sizes))
        if self.signal_bytes != SIGNAL_DTYPE.itemsize:
            raise BackendUnavailable(f"the kernels' Signal record has {self.signal_bytes} bytes, "
                                     f"SIGNAL_DTYPE {SIGNAL_DTYPE.itemsize}: rebuild the package")
        self._ind = d.zeros(max(1, self.n_ind) * self.ind_state_bytes, np.uint8)
        self._roc = d.zeros(max(1, int(plan["buf_size"])), np.float64)
        if self.n_ind:
            d.launch("dc_ind_init", (_blocks(self.n_ind, 128), 1), 128,
                     (np.int32(self.n_ind), self._p["ind_kind"], self._p["ind_p0"], self._p["ind_p1"],
                      self._p["ind_p2"], self._ind))
        self.load_lanes()
        self.load_state()
        self._counters = d.zeros(2, np.uint64)  # agent updates, quarantines (atomics in the lane kernel)
        self._counted = np.zeros(2, np.uint64)  # their values after the last run
        d.get(self._counters)  # waits for all of the above: a device error surfaces here, not at the first run

    def _failing(self, what: str, e: BaseException) -> None:
        """Marks the runner failed by ``e`` (raised while doing ``what``)."""
        if self.failed is None:
            self.failed = f"{_why(e)} (while {what})"

    # -- state ----------------------------------------------------------------------------------
    def load_lanes(self) -> None:
        lanes = self.native.lane_arrays()
        try:
            self._lanes = {k: self.dev.put(lanes[k]) for k in _LANES}
        except BaseException as e:
            self._failing("uploading the lanes", e)
            raise

    def load_state(self) -> None:
        """Native mirror -> device (after a change made on the native side)."""
        st = self.native.read_state()
        try:
            self._state = {k: self.dev.put(st[k]) for k in _STATE}
            self._load_stream_dsi()
        except BaseException as e:
            self._failing("uploading the agent state", e)
            raise
        self.state_dirty = False

    def _load_stream_dsi(self) -> None:
        """Each stream's DSI evidence and signal flags (what set_dsi left) -> device: the
        consensus kernel writes them into every signal, as the CPU consensus does."""
        ev, flags = self.native.stream_dsi()
        self._st_dsi, self._st_flags = self.dev.put(ev), self.dev.put(flags)

    def load_fields(self, names: tuple[str, ...]) -> None:
        """Native mirror -> device for some state arrays only (credit, external scores: what
        set_credit and set_external_scores change; the rest of the mirror may be stale)."""
        st = self.native.read_state()
        try:
            for k in names:
                self._state[k] = self.dev.put(st[k])
            if "dsi" in names:
                self._load_stream_dsi()
        except BaseException as e:
            self._failing("uploading agent state", e)
            raise

    def store_state(self) -> None:
        """Device -> native mirror, when the device has run bars since the last copy. Never
        after a failure: the device's state then matches no journal position."""
        if self.state_dirty and not self.failed:
            try:
                st = {k: self.dev.get(v) for k, v in self._state.items()}
            except BaseException as e:
                self._failing("copying the agent state back", e)
                raise
            self.native.write_state(st)
            self.state_dirty = False

    # -- running ----------------------------------------------------------------------------------
    def run(self, bars: np.ndarray, n_registered: int, strict: bool = False) -> np.ndarray:
        if self.failed:
            raise BackendUnavailable(f"the device failed earlier ({self.failed}); its state is no longer that "
                                     "of the journaled inputs: start a new engine (or replay the journal)")
        t0 = time.perf_counter()
        adm = np.frombuffer(self.native.admit(bars, n_registered, strict), dtype=ADMITTED_DTYPE)
        stream, index, sidx, seq = adm["stream"], adm["index"], adm["sidx"], adm["seq"]
        out = np.empty(len(stream), dtype=SIGNAL_DTYPE)
        before = self._counted
        if len(stream):
            self.state_dirty = True
        try:
            for a in range(0, len(stream), self.block_bars):
                b = min(len(stream), a + self.block_bars)
                out[a:b] = self._block(bars[index[a:b]], stream[a:b], sidx[a:b], seq[a:b])
            after = self.dev.get(self._counters) if len(stream) else before
        except BaseException as e:
            # The bars were admitted (sequenced, journaled) but not all run: nothing after this
            # could match the journal, so the runner refuses further work.
            self._failing("running a batch", e)
            raise
        self._counted = after
        upd, quar = (int(x) - int(y) for x, y in zip(after, before))
        self.native.emit_external(out, upd, quar, time.perf_counter() - t0)
        return out

    def _buf(self, name: str, n: int, dtype: Any) -> Any:
        cur = self._scratch.get(name)
        if cur is None or cur.size < n:
            cur = self.dev.zeros(max(n, 1), dtype)
            self._scratch[name] = cur
        return cur

    def _block(self, bars: np.ndarray, stream: np.ndarray, sidx: np.ndarray, seq: np.ndarray) -> np.ndarray:
        d, p, n = self.dev, self._p, len(stream)
        S = self.n_streams
        counts = np.bincount(stream, minlength=S).astype(np.int64)
        order = np.argsort(stream, kind="stable").astype(np.uint32)  # rows grouped by stream, in time order
        row_begin = np.concatenate(([0], np.cumsum(counts))).astype(np.uint32)
        row_k = np.empty(n, np.uint32)
        row_k[order] = np.arange(n, dtype=np.uint32) - row_begin[stream[order]]

        def bases(per: np.ndarray) -> tuple[np.ndarray, int]:
            sizes = counts * per
            base = np.concatenate(([0], np.cumsum(sizes[:-1]))).astype(np.uint64)
            return base, int(sizes.sum())
        ind_base, n_ind_out = bases(2 * self._I)
        feat_base, n_feat = bases(self._F)
        summ_base, n_summ = bases(self._M)
        host = {
            "high": np.ascontiguousarray(bars["high"]), "low": np.ascontiguousarray(bars["low"]),
            "close": np.ascontiguousarray(bars["close"]), "ts": np.ascontiguousarray(bars["ts"]),
            "instrument": np.ascontiguousarray(bars["instrument"]),
            "timeframe": np.ascontiguousarray(bars["timeframe"]),
            "sidx": sidx.astype(np.int64), "seq": seq.astype(np.uint64), "rows": order,
            "row_begin": row_begin, "row_stream": stream.astype(np.uint32), "row_k": row_k,
            "ind_base": ind_base, "feat_base": feat_base, "summ_base": summ_base,
        }
        g = self._upload(host)
        ind_out = self._buf("ind_out", n_ind_out, np.float64)
        feat = self._buf("feat", n_feat, np.float64)
        summ = self._buf("summ", n_summ * self.summary_bytes, np.uint8)
        sig = self._buf("sig", n * self.signal_bytes, np.uint8)
        if self.n_ind:
            d.launch("dc_ind_block", (_blocks(self.n_ind, 128), 1), 128,
                     (np.int32(self.n_ind), p["ind_kind"], p["ind_stream"], p["st_ind_begin"], p["ind_buf"],
                      self._roc, self._ind, g["high"], g["low"], g["close"], g["rows"], g["row_begin"],
                      g["ind_base"], ind_out))
        max_feats = int((counts * self._F).max(initial=0))
        if max_feats and S:
            d.launch("dc_feat_block", (_blocks(max_feats, 256), S), 256,
                     (p["st_ind_begin"], p["st_feat_begin"], p["feat_kind"], p["feat_a"], p["feat_b"],
                      p["feat_c"], p["feat_from"], g["close"], g["sidx"], g["rows"], g["row_begin"],
                      g["ind_base"], ind_out, g["feat_base"], feat))
        if self.n_sms:
            L, s = self._lanes, self._state
            d.launch("dc_lanes_block", (self.n_sms, 1), self.sm_block,
                     (p["sm_stream"], p["sm_lane_begin"], p["sm_lanes"], p["st_sm_begin"], p["st_sm_end"],
                      p["st_ind_begin"], p["st_feat_begin"],
                      L["w0"], L["w1"], L["w2"], L["w3"], L["w4"], L["fidx0"], L["fidx1"], L["fidx2"], L["fidx3"],
                      L["fidx4"], L["entry"], L["cost"], L["lookback"], L["long_short"], L["active"],
                      L["external"],
                      s["score"], s["equity"], s["entry_equity"], s["peak"], s["max_dd"], s["ret_sum"],
                      s["ret_sq"], s["credit"], s["ext_score"], s["dsi"], s["trades"], s["wins"], s["n_ret"],
                      s["quarantined"], s["position"], s["action"],
                      g["sidx"], g["rows"], g["row_begin"], g["ind_base"], ind_out, g["feat_base"], feat,
                      g["summ_base"], summ, self._counters))
        fuse, threads, rows = self._fuse
        d.launch(fuse, (_blocks(n, rows), 1), threads,
                 (np.uint32(n), g["row_stream"], g["row_k"], p["st_sm_begin"], p["st_sm_end"], g["summ_base"],
                  summ, g["ts"], g["instrument"], g["timeframe"], g["seq"], self._st_dsi, self._st_flags,
                  np.uint64(self.population_hash), sig))
        return d.get(sig[: n * self.signal_bytes]).view(SIGNAL_DTYPE)

    def _upload(self, host: dict[str, np.ndarray]) -> dict[str, Any]:
        """The block's host arrays in one copy to the device (8-byte aligned views of one buffer):
        one transfer per block instead of one per array, which is most of live mode's cost."""
        offs, total = {}, 0
        for k, v in host.items():
            offs[k] = total
            total += (v.nbytes + 7) // 8 * 8
        packed = np.zeros(max(total, 8), np.uint8)
        for k, v in host.items():
            packed[offs[k]: offs[k] + v.nbytes] = np.ascontiguousarray(v).view(np.uint8)
        dev = self.dev.put(packed)
        return {k: dev[offs[k]: offs[k] + v.nbytes].view(v.dtype) for k, v in host.items()}


def _blocks(n: int, per: int) -> int:
    return max(1, (int(n) + per - 1) // per)


def make_device(backend: str) -> Callable[[], Any] | None:
    """The device factory for an ``Engine`` backend name: None for the CPU. For ``"auto"`` the
    same factory as ``"cuda"``: the engine falls back to the CPU on its ``BackendUnavailable``
    (which says why)."""
    if backend == "cpu":
        return None
    if backend in ("cuda", "auto"):
        return CupyDevice
    raise ValueError(f"backend must be 'cpu', 'cuda' or 'auto', got {backend!r}")


def _check_with_cupy(status: GpuStatus) -> int:
    """--check where a GPU is usable: the kernels compiled and loaded exactly as the backend
    does (:func:`_load_kernels`: cupy.RawModule, CuPy's NVRTC, :func:`nvrtc_options`)."""
    import cupy
    opts = " ".join(nvrtc_options())
    try:
        dev = cupy.cuda.Device()
        with dev:
            fns = _load_kernels(cupy, dev.id)
    except Exception as e:
        ce = getattr(getattr(cupy.cuda, "compiler", None), "CompileException", None)
        compile_error = isinstance(ce, type) and isinstance(e, ce)
        print(f"CuPy (cupy.RawModule, NVRTC; options {opts}): "
              + ("the kernels do not compile:" if compile_error else f"could not compile the kernels: {_why(e)}"))
        if compile_error:
            print(str(e))
        return 1 if compile_error else 2
    print(f"CuPy {getattr(cupy, '__version__', '?')} (cupy.RawModule, NVRTC; options {opts}): compiled and loaded on "
          f"{status.device}; kernels: {', '.join(k for k in KERNELS if k in fns)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m dynamic_core.gpu",
        description="Whether the CUDA backend can run here, and why not. With --check, compile the kernels "
                    "(cuda/engine.cu) as the backend does: through CuPy (cupy.RawModule, the backend's NVRTC "
                    "options) where a GPU is usable; elsewhere with the NVRTC library found here (named in the "
                    "output; CuPy may load another), which needs no GPU.")
    ap.add_argument("--check", action="store_true", help="compile the kernels and report the result")
    ap.add_argument("--arch", default="compute_90",
                    help="virtual architecture for --check without a GPU (default compute_90); with one, CuPy "
                         "compiles for the device")
    args = ap.parse_args(argv)
    st = probe()
    print(f"GPU: {'usable: ' + st.device if st else 'not usable: ' + st.reason}")
    try:
        print(f"kernels: {kernel_dir() / 'engine.cu'}; headers: {include_dir()}")
    except BackendUnavailable as e:  # an install without the kernel sources beside the package
        print(f"kernels: {e}")
        return 2
    if args.check:
        if st:
            return _check_with_cupy(st)
        try:
            lib = _load_nvrtc()
            ptx, log = compile_ptx(arch=args.arch)
        except BackendUnavailable as e:
            print(f"NVRTC: {e}")
            return 2
        except RuntimeError as e:
            print(e)
            return 1
        entries = [k for k in KERNELS if f".entry {k}(" in ptx]
        print(f"NVRTC ({getattr(lib, '_name', '?')}; no usable GPU, so not through CuPy): compiled with the "
              f"backend's options ({len(ptx)} bytes of PTX for {args.arch}; kernels: {', '.join(entries)})"
              + (f"\n{log}" if log.strip() else ""))
        return 0 if len(entries) == len(KERNELS) else 1
    return 0 if st else 3


if __name__ == "__main__":
    sys.exit(main())
