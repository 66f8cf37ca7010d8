"""A host emulation of the CUDA device for tests on machines without a GPU: the kernels of
``cuda/engine.cu`` compiled by g++ against ``tests/cuda_emu/shim.hpp`` (one OS thread per CUDA
thread, barriers for __syncthreads, warp shuffles and ballots) and numpy arrays as device
memory. ``dc.Engine(pop, backend="cuda", device=EmuDevice.build(tmpdir))`` then runs the real
kernel source and the real host driver (``dynamic_core.gpu.DeviceRunner``) on the CPU.

What it checks: the kernels' logic, their canonical reduction order and the host's block
layout, against the CPU engine. What it cannot: NVRTC's code generation and the GPU itself.
"""
from __future__ import annotations

import ctypes
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# Kernels that use __syncthreads / warp intrinsics: one OS thread per CUDA thread.
COOPERATIVE = {"dc_lanes_block"}


class EmuDevice:
    xp = np
    name = "host emulation of the CUDA kernels"

    def __init__(self, lib: Path) -> None:
        self._lib = ctypes.CDLL(str(lib))
        self._lib.dc_emu_launch.restype = ctypes.c_int
        self._lib.dc_emu_launch.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
                                            ctypes.POINTER(ctypes.c_uint64), ctypes.c_int, ctypes.c_int]
        self.launches: dict[str, int] = {}

    @classmethod
    def build(cls, out_dir: Path) -> EmuDevice:
        cxx = shutil.which("g++") or shutil.which("c++")
        if cxx is None:
            raise RuntimeError("no C++ compiler to build the CUDA emulation")
        lib = Path(out_dir) / "libdcemu.so"
        subprocess.run([cxx, "-std=c++20", "-O2", "-ffp-contract=off", "-fPIC", "-shared", "-pthread",
                        f"-I{ROOT / 'cpp'}", f"-I{ROOT / 'tests' / 'cuda_emu'}",
                        str(ROOT / "tests" / "cuda_emu" / "emu.cpp"), "-o", str(lib)],
                       check=True, capture_output=True, text=True)
        return cls(lib)

    def launch(self, name: str, grid: tuple[int, int], block: int, args: tuple[Any, ...]) -> None:
        words = (ctypes.c_uint64 * max(1, len(args)))()
        for i, a in enumerate(args):
            if isinstance(a, np.ndarray):
                if not a.flags.c_contiguous:
                    raise ValueError(f"{name}: argument {i} is not contiguous")
                words[i] = a.ctypes.data
            elif isinstance(a, (float, np.floating)):
                words[i] = struct.unpack("<Q", struct.pack("<d", float(a)))[0]
            else:
                words[i] = int(a) & 0xFFFFFFFFFFFFFFFF
        rc = self._lib.dc_emu_launch(name.encode(), int(grid[0]), int(grid[1]), int(block), words, len(args),
                                     int(name in COOPERATIVE))
        if rc != 0:
            raise RuntimeError(f"emulated launch of {name} failed ({rc}: argument count or block size)")
        self.launches[name] = self.launches.get(name, 0) + 1

    def put(self, a: np.ndarray) -> np.ndarray:
        return np.array(a, copy=True, order="C")

    def get(self, a: np.ndarray) -> np.ndarray:
        return np.array(a, copy=True)

    def zeros(self, n: int, dtype: Any) -> np.ndarray:
        return np.zeros(n, dtype=dtype)
