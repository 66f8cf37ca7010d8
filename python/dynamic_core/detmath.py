"""Transcendental functions with the same bits on every machine.

numpy's ``exp``, ``log``, ``power`` and ``cos`` run a different kernel per CPU (AVX-512 code on
one machine, the C library's scalar functions on another) and the results differ in the last
bit; the C library itself differs between systems. Where such a value feeds the simulated market
or a signal, the package computes it with these instead: each is a fixed sequence of ``+ - * /``
and exponent-bit arithmetic in the native core (``cpp/dynamic_core/detmath.hpp``), within 2 ulp
of the exact value and identical on any machine.

Each function takes a float or an array (any shape; converted to float64) and returns a float or
a new float64 array of the same shape.

>>> from dynamic_core import detmath
>>> detmath.exp(0.0), detmath.log(1.0), detmath.cos2pi(0.5)
(1.0, 0.0, -1.0)
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from . import _core

__all__ = ["cos2pi", "exp", "exp2", "expm1", "log", "tanh"]


def _wrap(native: Callable[[np.ndarray], np.ndarray], one: Callable[[float], float], name: str,
          doc: str) -> Callable[[Any], Any]:
    def f(x: Any) -> Any:
        if type(x) is float or type(x) is int:  # the common scalar case, without numpy
            return one(float(x))
        a = np.asarray(x, dtype=np.float64)
        out = native(a)
        return float(out) if a.ndim == 0 and not isinstance(x, np.ndarray) else out

    f.__name__ = f.__qualname__ = name
    f.__doc__ = doc
    return f


exp = _wrap(_core.det_exp, _core.det_exp1, "exp", "``e ** x``; +inf above ~709.78, 0 below ~-745.13.")
exp2 = _wrap(_core.det_exp2, _core.det_exp21, "exp2", "``2 ** x``; exact at integers in range.")
expm1 = _wrap(_core.det_expm1, _core.det_expm11, "expm1", "``e ** x - 1``, accurate near 0.")
log = _wrap(_core.det_log, _core.det_log1, "log", "Natural logarithm; ``log(0) = -inf``, NaN below 0.")
tanh = _wrap(_core.det_tanh, _core.det_tanh1, "tanh", "Hyperbolic tangent.")
cos2pi = _wrap(_core.det_cos2pi, _core.det_cos2pi1, "cos2pi",
               "``cos(2 pi u)``, with the whole and quarter turns of ``u`` taken exactly.")
