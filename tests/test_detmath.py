"""dynamic_core.detmath: accuracy against 120-bit mpmath references, special values, and pinned
bits (the point of the module: the same bits on every machine, so the pin must hold anywhere)."""

from __future__ import annotations

import hashlib
import math

import mpmath
import numpy as np
import pytest

from dynamic_core import detmath

mpmath.mp.prec = 120

_REFS = {
    "exp": mpmath.exp,
    "exp2": lambda x: mpmath.power(2, x),
    "expm1": mpmath.expm1,
    "log": mpmath.log,
    "tanh": mpmath.tanh,
    "cos2pi": lambda u: mpmath.cos(2 * mpmath.pi * u),
}
_LIMIT = {"exp": 2.0, "exp2": 2.0, "expm1": 2.0, "log": 2.0, "tanh": 2.5, "cos2pi": 2.0}


def _inputs(name: str, rng: np.random.Generator, n: int) -> np.ndarray:
    # uniform draws and detmath only (numpy's ** on arrays differs between CPUs: see the module)
    u = rng.uniform
    parts = {
        "exp": [u(-745, 709.7, n), u(-1, 1, n), u(-1e-9, 1e-9, n)],
        "exp2": [u(-1074, 1023.9, n), u(-1, 1, n)],
        "expm1": [u(-60, 700, n), u(-3, 3, n), u(-1e-9, 1e-9, n)],
        "log": [detmath.exp2(u(-1020, 1023, n)), u(0.5, 2, n), 1 + u(-1e-7, 1e-7, n), u(1e-322, 2e-308, n // 10)],
        "tanh": [u(-25, 25, n), u(-1, 1, n), u(-1e-6, 1e-6, n)],
        "cos2pi": [u(-8, 8, n), u(0, 1, n), u(0.24, 0.26, n)],
    }[name]
    return np.concatenate(parts)


def _ulps(got: float, ref: mpmath.mpf) -> float:
    r = float(ref)
    if r == 0.0:
        return 0.0 if got == 0.0 else math.inf
    return float(abs(mpmath.mpf(got) - ref) / math.ulp(r))


@pytest.mark.parametrize("name", sorted(_REFS))
def test_within_a_few_ulp_of_a_120_bit_reference(name: str) -> None:
    xs = _inputs(name, np.random.default_rng(sum(map(ord, name))), 3000)
    got = getattr(detmath, name)(xs)
    worst = 0.0
    for x, g in zip(xs.tolist(), got.tolist()):
        ref = _REFS[name](mpmath.mpf(x))
        if abs(ref) > 1.7976931348623157e308 or (ref != 0 and abs(ref) < 2.2250738585072014e-308):
            continue  # overflow, or the subnormal range (where an ulp is absolute)
        worst = max(worst, _ulps(g, ref))
    assert worst <= _LIMIT[name], (name, worst)


def test_exact_and_special_values() -> None:
    inf, nan = math.inf, math.nan
    assert detmath.exp(0.0) == 1.0 and detmath.exp(-inf) == 0.0 and detmath.exp(inf) == inf
    assert detmath.exp(710.0) == inf and detmath.exp(-746.0) == 0.0 and 0 < detmath.exp(-745.0) < 1e-320
    assert all(detmath.exp2(float(k)) == 2.0 ** k for k in range(-1074, 1024))
    assert detmath.expm1(0.0) == 0.0 and detmath.expm1(-inf) == -1.0 and detmath.expm1(1e-300) == 1e-300
    assert detmath.log(1.0) == 0.0 and detmath.log(0.0) == -inf and detmath.log(inf) == inf
    assert math.isnan(detmath.log(-1.0)) and math.isnan(detmath.log(-inf))
    assert all(detmath.log(2.0 ** k) == pytest.approx(k * math.log(2), rel=1e-15, abs=0) for k in range(-1074, 1024) if k)
    assert detmath.tanh(0.0) == 0.0 and detmath.tanh(inf) == 1.0 and detmath.tanh(-inf) == -1.0
    assert detmath.tanh(1e-20) == 1e-20 and detmath.tanh(-30.0) == -1.0
    assert [detmath.cos2pi(u) for u in (0.0, 0.25, 0.5, 0.75, 1.0, -0.5, 2.0 ** 60)] == [1.0, 0.0, -1.0, 0.0, 1.0, -1.0, 1.0]
    for f in (detmath.exp, detmath.exp2, detmath.expm1, detmath.log, detmath.tanh, detmath.cos2pi):
        assert math.isnan(f(nan))
    assert math.isnan(detmath.cos2pi(inf))


def test_shapes_and_types() -> None:
    x = np.linspace(0.1, 2.0, 12).reshape(3, 4)
    out = detmath.log(x)
    assert out.shape == (3, 4) and out.dtype == np.float64
    assert np.allclose(out, np.log(x), rtol=1e-15, atol=0)
    assert isinstance(detmath.exp(1), float) and isinstance(detmath.exp(np.float64(1.0)), float)
    assert detmath.exp([0.0, 0.0]).tolist() == [1.0, 1.0]
    assert detmath.exp(np.float32(1.0)) == detmath.exp(float(np.float32(1.0)))  # float64 inside
    assert detmath.log(np.zeros(0)).shape == (0,)
    with pytest.raises((TypeError, ValueError)):
        detmath.exp("e")


def test_the_bits_are_pinned() -> None:
    """The same bits on any machine: these digests were taken on one machine and must hold on
    every other (a difference here is exactly the defect the module exists to prevent)."""
    rng = np.random.default_rng(20261123)
    d = {}
    for name in sorted(_REFS):
        xs = _inputs(name, rng, 20000)
        d[name] = hashlib.sha256(getattr(detmath, name)(xs).tobytes()).hexdigest()[:16]
    assert d == PINNED


PINNED = {'cos2pi': '3eca6d3b2d57d0df', 'exp': '37ae27d33c2e4fef', 'exp2': 'ffea520b38e9a7a6', 'expm1': '74a38f4eec1c6821', 'log': 'cacdb30d82eca3f5', 'tanh': '9c75d92c2106118c'}


@pytest.mark.parametrize("isa", [0, 3])
def test_the_array_log_is_the_scalar_log(isa: int) -> None:
    # det_log over an array runs a vectorised pass, then redoes the elements outside the positive
    # normal range: the same bits as one call each, in the baseline and the x86-64-v3 build
    from dynamic_core import _core

    rng = np.random.default_rng(5)
    x = np.concatenate([detmath.exp2(rng.uniform(-1074, 1024, 5000)), rng.uniform(-2, 2, 500),
                        [0.0, -0.0, math.inf, -math.inf, math.nan, 5e-324, 2.2250738585072014e-308,
                         1.7976931348623157e308, 1.0, 1.4142135623730951, 1.4142135623730954]])
    rng.shuffle(x)
    before = _core.kernel_isa()
    try:
        if isa > before:
            pytest.skip(f"this CPU runs kernel ISA {before}")
        _core.set_kernel_isa(isa)
        got = detmath.log(x)
    finally:
        _core.set_kernel_isa(before)
    one = np.array([detmath.log(float(v)) for v in x])
    assert got.tobytes() == one.tobytes()
