"""Where the LoRA arrays live: numpy on the host (the default, with the native kernels) or CuPy
on a GPU.

A hierarchy and its layers hold one array module, ``xp``. With numpy the per-agent products,
recording and update run in the native kernels (fixed summation order, threads over agents).
With any other module (CuPy) every per-agent array (parameters, initial values, phases,
traces, thresholds, histories) lives in that module's memory and the same formulas run as its
array operations: the numpy reference formulas of :mod:`.layer`, which the native kernels are
tested against. Only small per-tick values cross to the host: the per-slot circuit signatures
(rank values per agent) and the candidates' component strengths, the shared layers' gradients
for resonance (dim x rank) and the three effective-map changes it compares (dim x dim), the
reports' scalars, and per circuit found or migration executed the rows of its slot (rank x dim,
at most ``max_circuits_per_tick`` circuits a tick per layer). A mask given on the device is
checked there.

Determinism on a GPU is per device and library version: the same state and inputs give the
same bits on the same GPU (cuBLAS and CuPy's reductions choose their order by size and device),
and agree with the host within rounding, not bit for bit.
"""

from __future__ import annotations

import contextlib
from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["errstate", "is_numpy", "namespace", "to_host"]

_NEEDED = ("asarray", "zeros", "empty", "matmul", "einsum", "where", "isfinite", "asnumpy")


def namespace(xp: Any = None) -> Any:
    """The array module for ``xp``: None, ``"numpy"`` or numpy itself -> numpy; ``"cupy"`` ->
    CuPy on its current device (RuntimeError naming what is missing: CuPy, the driver or a
    device); any other module with numpy's API and ``asnumpy`` (CuPy's) -> itself."""
    if xp is None or xp is np or (isinstance(xp, str) and xp == "numpy"):
        return np
    if isinstance(xp, str):
        if xp != "cupy":
            raise ValueError(f"xp must be 'numpy', 'cupy' or an array module, got {xp!r}")
        from ... import gpu

        status = gpu.probe()
        if not status:
            raise RuntimeError(f"xp='cupy': {status.reason}")
        import cupy

        return cupy
    missing = [a for a in _NEEDED if not hasattr(xp, a)]
    if missing and not isinstance(xp, ModuleType):
        raise TypeError(f"xp must be 'numpy', 'cupy' or an array module, got {type(xp).__name__}")
    if missing:
        raise TypeError(f"xp module {xp.__name__!r} lacks {', '.join(missing)} (numpy's API and CuPy's "
                        f"asnumpy are needed)")
    return xp


def is_numpy(xp: Any) -> bool:
    """Whether ``xp`` is numpy (the native kernels' path)."""
    return xp is np


def to_host(xp: Any, a: Any) -> np.ndarray:
    """``a`` as a numpy array (a download when ``xp`` is not numpy)."""
    return np.asarray(a) if xp is np else xp.asnumpy(a)


def errstate(xp: Any, **kw: str) -> contextlib.AbstractContextManager[Any]:
    """numpy's ``errstate`` for numpy; nothing for a GPU module (it has no floating-point
    error state: overflows and NaNs pass silently, as numpy's do under ``ignore``)."""
    return np.errstate(**kw) if xp is np else contextlib.nullcontext()
