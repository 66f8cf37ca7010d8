"""Checks of saved state before it is restored: every failure is a
:class:`~dynamic_core.errors.StateError` naming the key.

A state comes from ``state_dict`` (arrays and Python scalars) or from ``np.load`` of its
``savez`` (0-d arrays for the scalars and strings); both are taken. Nothing here allocates more
than the arrays it is handed (shapes are compared before any conversion).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..._checks import check_int
from ...errors import StateError

__all__ = ["get", "integer", "real_array", "string", "whole_array"]


def get(state: Mapping[str, Any], key: str) -> Any:
    """``state[key]``; StateError when missing."""
    try:
        return state[key]
    except KeyError:
        raise StateError(f"{key}: missing from the saved state") from None


def integer(state: Mapping[str, Any], key: str, lo: int, hi: int) -> int:
    """A scalar integer in ``[lo, hi]`` (a Python int or a 0-d integer array)."""
    v = get(state, key)
    if isinstance(v, np.ndarray):
        if v.ndim != 0 or v.dtype.kind not in "iu":
            raise StateError(f"{key}: expected an integer scalar, got {v.dtype} of shape {v.shape}")
        v = v.item()
    try:
        return check_int(key, v, lo, hi)
    except (TypeError, ValueError) as e:
        raise StateError(str(e)) from None


def string(state: Mapping[str, Any], key: str, max_len: int = 1 << 20,
           choices: tuple[str, ...] | None = None) -> str:
    """A string (a Python str or a 0-d unicode array) of at most ``max_len`` characters."""
    v = get(state, key)
    if isinstance(v, np.ndarray):
        if v.ndim != 0 or v.dtype.kind != "U":
            raise StateError(f"{key}: expected a string, got {v.dtype} of shape {v.shape}")
        v = str(v)
    if not isinstance(v, str):
        raise StateError(f"{key}: expected a string, got {type(v).__name__}")
    if len(v) > max_len:
        raise StateError(f"{key}: longer than {max_len} characters")
    if choices is not None and v not in choices:
        raise StateError(f"{key}: {v!r} is not one of {choices}")
    return v


def _array(state: Mapping[str, Any], key: str, shape: tuple[int | None, ...], dtype: Any) -> np.ndarray:
    v = get(state, key)
    if not isinstance(v, np.ndarray):
        raise StateError(f"{key}: expected an array, got {type(v).__name__}")
    want = np.dtype(dtype)
    if v.dtype.kind != want.kind or v.dtype.itemsize != want.itemsize:
        raise StateError(f"{key}: dtype {v.dtype}, expected {want}")
    if v.ndim != len(shape) or any(w is not None and s != w for s, w in zip(v.shape, shape)):
        want_shape = tuple("n" if w is None else w for w in shape)
        raise StateError(f"{key}: shape {v.shape}, expected {want_shape}")
    return v


def real_array(state: Mapping[str, Any], key: str, shape: tuple[int | None, ...], dtype: Any, *,
               lo: float = -np.inf, hi: float = np.inf) -> np.ndarray:
    """A float array of exactly ``shape`` (None: any length) and ``dtype`` (byte order free),
    every value finite and in ``[lo, hi]``."""
    v = _array(state, key, shape, dtype)
    if v.size and not (np.isfinite(v).all() and v.min() >= lo and v.max() <= hi):
        bad = "non-finite values" if not np.isfinite(v).all() else f"values outside [{lo}, {hi}]"
        raise StateError(f"{key}: {bad}")
    return v


def whole_array(state: Mapping[str, Any], key: str, shape: tuple[int | None, ...], dtype: Any = np.int64, *,
                lo: int | None = None, hi: int | None = None) -> np.ndarray:
    """An integer (or bool, with ``dtype=bool``) array of exactly ``shape``, every value in
    ``[lo, hi]`` when given."""
    v = _array(state, key, shape, dtype)
    if v.size and ((lo is not None and v.min() < lo) or (hi is not None and v.max() > hi)):
        raise StateError(f"{key}: values outside [{lo}, {hi}]")
    return v
