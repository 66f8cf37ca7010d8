"""A host emulation of the CUDA device for tests on machines without a GPU: the kernels of
``cuda/engine.cu`` compiled by g++ against ``tests/cuda_emu/shim.hpp`` (one OS thread per CUDA
thread, barriers for __syncthreads, warp shuffles and ballots) and numpy arrays as device
memory. ``dc.Engine(pop, backend="cuda", device=EmuDevice.build(tmpdir))`` then runs the real
kernel source and the real host driver (``dynamic_core.gpu.DeviceRunner``) on the CPU.

:class:`FakeCupy` goes one layer further down: enough of CuPy's API (``RawModule`` compiling
lazily at the first ``get_function``, devices, streams, ``asarray``/``asnumpy``/``zeros``, the
runtime's device queries and CuPy's exception classes) over the same emulation, installed as
the ``cupy`` module, so ``dynamic_core.gpu.CupyDevice`` itself runs: which stream every
operation ran on is logged, and a failure can be injected at any point (compile, launch,
upload, allocation, download), once or sticky as a CUDA context error is.

What it checks: the kernels' logic, their canonical reduction order and the host's block
layout, against the CPU engine; every launch's arguments against the kernel's parameters (an
array for each pointer, of the pointee's size and kind; a numpy scalar of exactly the
parameter's size for each value, as the driver copies ``sizeof(parameter)`` bytes of it, and a
Python int being passed by CuPy as an int64) and CUDA's launch limits (blocks of 1..1024
threads, grids of at most 2^31-1 x 65535 blocks). What it cannot: NVRTC's code generation,
the GPU itself, and the asynchrony of real streams (it logs which stream ran what; it runs
everything at once).
"""
from __future__ import annotations

import ctypes
import hashlib
import shutil
import subprocess
import sys
import threading
import types
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
EMU_DIR = ROOT / "tests" / "cuda_emu"
# Kernels that use __syncthreads / warp intrinsics: one OS thread per CUDA thread.
COOPERATIVE = {"dc_lanes_block", "dc_fuse_wide"}
# ParamKind of shim.hpp
P_INT, P_FLOAT, P_PTR_INT, P_PTR_FLOAT, P_PTR_OTHER = range(5)
_LAUNCH_ERRORS = {-1000: "a cooperative block must be whole warps of 32 threads",
                  -1001: "block size outside [1, 1024] threads",
                  -1002: "grid outside [1, 2^31-1] x [1, 65535] blocks",
                  -2000: "no such kernel"}

_libs: dict[str, Path] = {}
_libs_lock = threading.Lock()


class EmuBuildError(RuntimeError):
    """g++ could not build the emulation (the compiler's output is the message)."""


def build_lib(out_dir: Path, source: Path | None = None, includes: tuple[str, ...] = (),
              defines: tuple[str, ...] = ()) -> Path:
    """The emulation library for a kernel source (default ``cuda/engine.cu``), built once per
    (source, include dirs, defines, emulator sources) and process."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler to build the CUDA emulation")
    src = source or ROOT / "cuda" / "engine.cu"
    h = hashlib.sha256()
    for part in (src.read_bytes(), (EMU_DIR / "emu.cpp").read_bytes(), (EMU_DIR / "shim.hpp").read_bytes(),
                 "\0".join(includes).encode(), "\0".join(defines).encode()):
        h.update(part)
        h.update(b"\1")
    key = h.hexdigest()[:20]
    with _libs_lock:
        lib = _libs.get(key)
        if lib is not None and lib.exists():
            return lib
        lib = Path(out_dir) / f"libdcemu_{key}.so"
        cmd = [cxx, "-std=c++20", "-O2", "-ffp-contract=off", "-fPIC", "-shared", "-pthread",
               f"-I{ROOT / 'cpp'}", f"-I{EMU_DIR}"] + [f"-I{d}" for d in includes] + [f"-D{d}" for d in defines]
        if source is not None:
            cmd.append(f'-DDC_EMU_SOURCE="{source}"')
        r = subprocess.run([*cmd, str(EMU_DIR / "emu.cpp"), "-o", str(lib)], capture_output=True, text=True,
                           check=False)
        if r.returncode != 0:
            raise EmuBuildError(r.stderr)
        _libs[key] = lib
        return lib


class EmuDevice:
    xp = np
    name = "host emulation of the CUDA kernels"

    def __init__(self, lib: Path) -> None:
        self._lib = ctypes.CDLL(str(lib))
        self._lib.dc_emu_launch.restype = ctypes.c_int
        self._lib.dc_emu_launch.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
                                            ctypes.POINTER(ctypes.c_uint64), ctypes.c_int, ctypes.c_int]
        self._lib.dc_emu_signature.restype = ctypes.c_int
        self._lib.dc_emu_signature.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_int),
                                               ctypes.POINTER(ctypes.c_int), ctypes.c_int]
        self._signatures: dict[str, list[tuple[int, int]]] = {}
        self.launches: dict[str, int] = {}

    @classmethod
    def build(cls, out_dir: Path) -> EmuDevice:
        return cls(build_lib(Path(out_dir)))

    def signature(self, name: str) -> list[tuple[int, int]]:
        """Kernel ``name``'s parameters: (ParamKind, size) each (for a pointer, its pointee's size)."""
        sig = self._signatures.get(name)
        if sig is None:
            cap = 64
            kinds, sizes = (ctypes.c_int * cap)(), (ctypes.c_int * cap)()
            n = self._lib.dc_emu_signature(name.encode(), kinds, sizes, cap)
            if n < 0:
                raise RuntimeError(f"emulated launch of {name}: no such kernel")
            sig = self._signatures[name] = [(kinds[i], sizes[i]) for i in range(min(n, cap))]
        return sig

    def launch(self, name: str, grid: tuple[int, int], block: int, args: tuple[Any, ...]) -> None:
        sig = self.signature(name)
        if len(args) != len(sig):
            raise TypeError(f"{name}: {len(args)} arguments for {len(sig)} parameters")
        words = (ctypes.c_uint64 * max(1, len(args)))()
        for i, (a, (kind, size)) in enumerate(zip(args, sig)):
            words[i] = _word(name, i, a, kind, size)
        gx, gy = (int(grid[0]), int(grid[1]) if len(grid) > 1 else 1)
        if min(gx, gy, int(block)) < 0 or max(gx, gy, int(block)) > 0xFFFFFFFF:
            raise RuntimeError(f"emulated launch of {name}: grid {grid} / block {block} out of range")
        rc = self._lib.dc_emu_launch(name.encode(), gx, gy, int(block), words, len(args), int(name in COOPERATIVE))
        if rc != 0:
            raise RuntimeError(f"emulated launch of {name} (grid {gx} x {gy}, block {block}) failed: "
                               f"{_LAUNCH_ERRORS.get(rc, f'error {rc}')}")
        self.launches[name] = self.launches.get(name, 0) + 1

    def put(self, a: np.ndarray) -> np.ndarray:
        return np.array(a, copy=True, order="C")

    def get(self, a: np.ndarray) -> np.ndarray:
        return np.array(a, copy=True)

    def zeros(self, n: int, dtype: Any) -> np.ndarray:
        return np.zeros(n, dtype=dtype)


def _word(name: str, i: int, a: Any, kind: int, size: int) -> int:
    """Argument ``i`` of a launch of ``name`` as the 64-bit word the shim unpacks, after checking
    it against the parameter: what a real launch would silently get wrong is an error here."""
    where = f"{name}: argument {i}"
    if kind in (P_PTR_INT, P_PTR_FLOAT, P_PTR_OTHER):
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{where} is {type(a).__name__}; the kernel's parameter is a pointer (pass a device array)")
        if not a.flags.c_contiguous:
            raise ValueError(f"{where} is not contiguous")
        want = {P_PTR_INT: "iu", P_PTR_FLOAT: "f"}.get(kind)
        if want is not None and (a.dtype.kind not in want or a.dtype.itemsize != size):
            raise TypeError(f"{where} is an array of {a.dtype}; the kernel's parameter points to "
                            f"{size}-byte {'floats' if kind == P_PTR_FLOAT else 'integers'}")
        return a.ctypes.data
    # A value: CuPy passes a numpy scalar as its dtype, a Python int as int64, a float as float64,
    # and the driver copies sizeof(parameter) bytes of it.
    if isinstance(a, (bool, np.bool_)):
        v: np.generic = np.bool_(a)
    elif isinstance(a, np.generic):
        v = a
    elif isinstance(a, int):
        v = np.int64(a)
    elif isinstance(a, float):
        v = np.float64(a)
    else:
        raise TypeError(f"{where} is {type(a).__name__}; the kernel's parameter is a {size}-byte value")
    is_float = v.dtype.kind == "f"
    if v.dtype.itemsize != size or is_float != (kind == P_FLOAT) or v.dtype.kind not in "iubf":
        raise TypeError(f"{where} is {type(a).__name__} ({v.dtype}, {v.dtype.itemsize} bytes); the kernel's "
                        f"parameter is a {size}-byte {'float' if kind == P_FLOAT else 'integer'}: the driver "
                        f"would copy {size} bytes of it")
    return int.from_bytes(v.tobytes().ljust(8, b"\0"), "little")


# ---- an emulated CuPy ------------------------------------------------------------------------------

class FakeCupy:
    """Enough of CuPy (13/14) for ``dynamic_core.gpu``: ``install(monkeypatch)`` makes it the
    ``cupy`` module. ``log`` lists every operation as (what, stream it ran on, detail);
    ``inject(point, exc)`` raises ``exc`` at an operation ("compile", "launch", "put", "zeros",
    "get", "sync")."""

    def __init__(self, build_dir: Path, *, devices: int = 1) -> None:
        self.build_dir = Path(build_dir)
        self.devices = devices
        self.log: list[tuple[str, Any, str]] = []
        self.compiled: list[tuple[str, tuple[str, ...]]] = []  # (code, options) of each compilation
        self._faults: list[dict[str, Any]] = []
        self._poison: BaseException | None = None
        self._tls = threading.local()
        self.module = self._make_module()

    # -- failure injection ---------------------------------------------------------------------
    def inject(self, point: str, exc: BaseException, *, after: int = 0, kernel: str | None = None,
               sticky: bool = False) -> None:
        """Raise ``exc`` at the (``after``+1)-th ``point`` operation (of ``kernel``, for launches);
        ``sticky``: and at every operation after it, as a CUDA context error does."""
        self._faults.append({"point": point, "left": after, "kernel": kernel, "exc": exc, "sticky": sticky})

    def _check(self, point: str, kernel: str | None = None) -> None:
        if self._poison is not None:
            raise self._poison
        for f in self._faults:
            if f["point"] != point or (f["kernel"] is not None and f["kernel"] != kernel):
                continue
            if f["left"] > 0:
                f["left"] -= 1
                continue
            self._faults.remove(f)
            if f["sticky"]:
                self._poison = f["exc"]
            raise f["exc"]

    # -- the current device and stream (per thread) ---------------------------------------------
    def current_stream(self) -> Any:
        st = getattr(self._tls, "streams", None)
        return st[-1] if st else self.null_stream

    def _record(self, what: str, detail: str = "") -> None:
        self.log.append((what, self.current_stream(), detail))

    def install(self, monkeypatch: Any) -> FakeCupy:
        m = self.module
        for name, mod in (("cupy", m), ("cupy.cuda", m.cuda), ("cupy.cuda.runtime", m.cuda.runtime),
                          ("cupy.cuda.compiler", m.cuda.compiler), ("cupy.cuda.memory", m.cuda.memory)):
            monkeypatch.setitem(sys.modules, name, mod)
        return self

    def _make_module(self) -> types.ModuleType:
        fake = self

        class CUDARuntimeError(RuntimeError):
            def __init__(self, status: int, msg: str = "") -> None:
                super().__init__(f"cudaError {status}: {msg}" if msg else f"cudaError {status}")
                self.status = status

        class CompileException(Exception):
            pass

        class OutOfMemoryError(MemoryError):
            pass

        class Device:
            def __init__(self, device: int | None = None) -> None:
                cur = getattr(fake._tls, "devices", None)
                self.id = int(device) if device is not None else (cur[-1] if cur else 0)

            def __enter__(self) -> Device:
                if not 0 <= self.id < fake.devices:
                    raise CUDARuntimeError(101, "invalid device ordinal")
                fake._tls.__dict__.setdefault("devices", []).append(self.id)
                return self

            def __exit__(self, *exc: object) -> None:
                fake._tls.devices.pop()

            def synchronize(self) -> None:
                fake._check("sync")
                fake._record("device sync")

        class Stream:
            def __init__(self, null: bool = False, non_blocking: bool = False, ptds: bool = False) -> None:
                self.null = null
                self.non_blocking = non_blocking

            def __enter__(self) -> Stream:
                fake._tls.__dict__.setdefault("streams", []).append(self)
                return self

            def __exit__(self, *exc: object) -> None:
                fake._tls.streams.pop()

            def use(self) -> Stream:
                fake._tls.streams = [self]
                return self

            def synchronize(self) -> None:
                fake._check("sync")
                fake.log.append(("sync", self, ""))

            def __repr__(self) -> str:
                return f"<emulated {'null ' if self.null else ''}stream{' non_blocking' if self.non_blocking else ''}>"

        class RawKernel:
            def __init__(self, name: str, emu: EmuDevice) -> None:
                self.name = name
                self._emu = emu

            def __call__(self, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...], *,
                         shared_mem: int = 0) -> None:
                fake._check("launch", self.name)
                fake._record("launch", self.name)
                grid = tuple(grid) if isinstance(grid, tuple) else (int(grid),)
                block = tuple(block) if isinstance(block, tuple) else (int(block),)
                if len(grid) > 2 and grid[2] != 1 or len(block) > 1 and any(b != 1 for b in block[1:]):
                    raise CUDARuntimeError(9, "invalid configuration argument (the emulation runs 1-D blocks, 2-D grids)")
                try:
                    self._emu.launch(self.name, (grid[0], grid[1] if len(grid) > 1 else 1), block[0], args)
                except RuntimeError as e:  # a launch CUDA refuses
                    raise CUDARuntimeError(9, str(e)) from None

        class RawModule:
            """Compiles at the first get_function, as CuPy's does: g++ against the shim, with the
            options' -I and -D (the others are NVRTC's)."""

            def __init__(self, code: str | None = None, *, path: str | None = None, options: tuple[str, ...] = (),
                         backend: str = "nvrtc", **kw: Any) -> None:
                if code is None:
                    raise NotImplementedError("the emulated RawModule compiles source code only")
                self.code, self.options = code, tuple(options)
                self._emu: EmuDevice | None = None

            def _compile(self) -> EmuDevice:
                if self._emu is None:
                    fake._check("compile")
                    src = fake.build_dir / f"kernels_{hashlib.sha256(self.code.encode()).hexdigest()[:16]}.cu"
                    src.write_text(self.code)
                    inc = tuple(o[2:] for o in self.options if o.startswith("-I"))
                    dfn = tuple(o[2:] for o in self.options if o.startswith("-D"))
                    try:
                        lib = build_lib(fake.build_dir, src, inc, dfn)
                    except EmuBuildError as e:
                        raise CompileException(str(e)) from None
                    fake.compiled.append((self.code, self.options))
                    self._emu = EmuDevice(lib)
                return self._emu

            def get_function(self, name: str) -> RawKernel:
                emu = self._compile()
                emu.signature(name)  # CuPy: CUDADriverError (named symbol not found) for an unknown one
                return RawKernel(name, emu)

        def asarray(a: Any, dtype: Any = None) -> np.ndarray:
            fake._check("put")
            fake._record("put")
            return np.array(a, dtype=dtype, copy=True, order="C")

        def asnumpy(a: Any, stream: Any = None, order: str = "C", out: Any = None, *, blocking: bool = True) -> np.ndarray:
            fake._check("get")
            fake._record("get")
            return np.array(a, copy=True)

        def zeros(shape: Any, dtype: Any = float) -> np.ndarray:
            fake._check("zeros")
            fake._record("zeros")
            return np.zeros(shape, dtype=dtype)

        def get_device_count() -> int:
            return fake.devices

        def get_device_properties(i: int) -> dict[str, Any]:
            if not 0 <= i < fake.devices:
                raise CUDARuntimeError(101, "invalid device ordinal")
            return {"name": b"Emulated CUDA device (host)", "totalGlobalMem": 80 * 2**30, "major": 9, "minor": 0}

        cupy = types.ModuleType("cupy")
        cupy.__version__ = "14.0.0+emulated"
        cuda = types.ModuleType("cupy.cuda")
        runtime = types.ModuleType("cupy.cuda.runtime")
        compiler = types.ModuleType("cupy.cuda.compiler")
        memory = types.ModuleType("cupy.cuda.memory")
        runtime.CUDARuntimeError = CUDARuntimeError
        runtime.getDeviceCount = get_device_count
        runtime.getDeviceProperties = get_device_properties
        compiler.CompileException = CompileException
        memory.OutOfMemoryError = OutOfMemoryError
        cuda.runtime, cuda.compiler, cuda.memory = runtime, compiler, memory
        cuda.Device, cuda.Stream = Device, Stream
        cuda.get_current_stream = fake.current_stream
        cupy.cuda = cuda
        cupy.RawModule, cupy.RawKernel = RawModule, RawKernel
        cupy.asarray, cupy.asnumpy, cupy.zeros = asarray, asnumpy, zeros
        cupy.ndarray = np.ndarray
        for t in ("uint8", "int32", "uint32", "int64", "uint64", "float64"):
            setattr(cupy, t, getattr(np, t))
        fake.null_stream = Stream(null=True)
        Stream.null = fake.null_stream
        return cupy

    # exception classes, for tests to raise
    @property
    def CompileException(self) -> type[Exception]:
        return self.module.cuda.compiler.CompileException

    @property
    def CUDARuntimeError(self) -> type[Exception]:
        return self.module.cuda.runtime.CUDARuntimeError

    @property
    def OutOfMemoryError(self) -> type[Exception]:
        return self.module.cuda.memory.OutOfMemoryError
