"""The LoRA layers' native kernels (``_core.lora_*``) at their edges: arrays are never converted
behind the caller's back (a converted temporary dies while the kernel still writes through its
pointer), and threads that cannot be started leave their rows to the caller instead of ending
the process."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from dynamic_core import _core


def _matrix(S: int, r: int, d: int, out) -> tuple:
    return (np.ones((S, r, d)), np.zeros((S, r, d)), out, np.zeros((S, r, d), bool), None, [],
            np.ones((S, d)), np.zeros((S, d)))


@pytest.mark.parametrize("where", ["out", "P", "phase", "terms"])
def test_lora_update_refuses_what_is_not_an_array(where):
    S, r, d = 8, 2, 4
    a = list(_matrix(S, r, d, np.zeros((S, r, d))))
    if where == "out":
        a[2] = np.zeros((S, r, d)).tolist()  # was converted: the writes went to a freed copy
    elif where == "P":
        a[0] = np.ones((S, r, d)).tolist()
    elif where == "phase":
        a[3] = np.zeros((S, r, d), bool).tolist()
    else:
        a[5] = [(np.ones((S, r)).tolist(), np.ones((S, d)))]
    b = _matrix(S, r, d, np.zeros((S, r, d)))
    with pytest.raises(TypeError, match="numpy array"):
        _core.lora_update(0, S, 1, np.ones(S), np.ones((S, r)), np.zeros((S, r)), np.ones(S), None,
                          1e-4, 1e-2, tuple(a), b, np.empty(S), np.empty(S))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("threads", [1, 3])
def test_lora_update_reports_each_slots_finiteness(dtype, threads):
    """`finite` says, per slot, whether every updated parameter of A and B is finite: NaN and
    infinities anywhere in a slot (first row, last column, the tail past the 8-wide lanes) clear
    it; finite values at the dtype's limit do not (a sum over them would overflow)."""
    S, r, d = 200, 3, 11
    rng = np.random.default_rng(5)
    top = np.finfo(dtype).max

    def matrix(bad: dict[int, tuple]) -> tuple:
        P = rng.normal(size=(S, r, d)).astype(dtype)
        for s, (j, i, v) in bad.items():
            P[s, j, i] = v
        return (P, P.copy(), np.zeros((S, r, d), dtype), np.zeros((S, r, d), bool), None, [],
                np.ones((S, d)), np.zeros((S, d)))

    P_A = {3: (0, 0, np.nan), 77: (2, 10, np.inf), 150: (1, 9, top), 151: (0, 3, -top)}
    P_B = {4: (1, 8, -np.inf), 150: (2, 10, top)}
    A, B = matrix(P_A), matrix(P_B)
    finite = np.zeros(S, bool)
    c = np.zeros(S, dtype)  # no step: the values are P's, decayed toward P0 == P
    _core.lora_update(0, S, threads, c, np.ones((S, r)), np.zeros((S, r)), np.ones(S), None, 1e-4, 1e-2, A, B,
                      np.empty(S), np.empty(S), finite)
    want = np.ones(S, bool)
    want[[3, 77, 4]] = False
    assert np.array_equal(finite, want)
    assert np.isfinite(A[2][150]).all() and np.isfinite(B[2][150]).all()  # kept at the limit


@pytest.mark.parametrize("where", ["phase", "pinned", "finite"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float64])
def test_lora_update_flag_arrays_must_be_bool(where, dtype):
    """phase, pinned and finite are bool arrays: bytes of another dtype are refused, never
    reinterpreted (a float64 array of the right length passed the byte view's checks)."""
    S, r, d = 8, 2, 4
    a = list(_matrix(S, r, d, np.zeros((S, r, d))))
    pinned, finite = None, None
    if where == "phase":
        a[3] = np.zeros((S, r, d), dtype)
    elif where == "pinned":
        pinned = np.zeros((S, r), dtype)
    else:
        finite = np.zeros(S, dtype)
    with pytest.raises(TypeError, match=f"{where}: expected dtype bool"):
        _core.lora_update(0, S, 1, np.ones(S), np.ones((S, r)), np.zeros((S, r)), np.ones(S), pinned,
                          1e-4, 1e-2, tuple(a), _matrix(S, r, d, np.zeros((S, r, d))), np.empty(S), np.empty(S),
                          finite)


def test_lora_record_refuses_a_list_of_weights():
    n, d, r = 4, 3, 2
    acc = [np.zeros((n, d)), np.zeros((n, r)), np.zeros((n, d)), np.zeros(n), np.zeros((n, r))]
    with pytest.raises(TypeError, match="numpy array"):
        _core.lora_record(np.ones((n, d)), np.ones((n, r)), np.ones((n, d)), [1.0] * n, False, *acc)


def test_threads_that_cannot_start_leave_their_rows_to_the_caller():
    """With the address space capped, most of 3,000 requested threads fail to start: the call
    still returns the one-thread result (it used to abort the process in std::terminate)."""
    code = textwrap.dedent("""
        import resource, sys
        import numpy as np
        from dynamic_core import _core
        n, r, d = 64 * 3000, 2, 4
        rng = np.random.default_rng(1)
        x, M = rng.normal(size=(n, d)), rng.normal(size=(n, r, d))
        ref = _core.lora_rd_dot(x, M, 1)
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # 3 GiB: ~380 8 MiB stacks
        got = _core.lora_rd_dot(x, M, 3000)
        sys.exit(0 if got.tobytes() == ref.tobytes() else 3)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_shared_products_and_xty_check_their_shapes_and_dtypes(dtype):
    """A (rank, dim) M is one matrix for every row; lora_xty sums X.T @ Y over rows. Mismatched
    shapes and dtypes are refused, never read out of bounds or converted."""
    x, y = np.ones((5, 7), dtype), np.ones((5, 3), dtype)
    M = np.ones((3, 7), dtype)
    assert _core.lora_rd_dot(x, M, 1).shape == (5, 3) and _core.lora_r_rows(y, M, 1).shape == (5, 7)
    assert _core.lora_rd_dot(x[:0], M, 1).shape == (0, 3)
    with pytest.raises(ValueError):
        _core.lora_rd_dot(x[:, :6].copy(), M, 1)  # width differs from M's
    with pytest.raises(ValueError):
        _core.lora_r_rows(np.ones((5, 2), dtype), M, 1)  # rank differs
    with pytest.raises(ValueError):
        _core.lora_rd_dot(x[0], M, 1)  # one row must still be (1, dim)
    with pytest.raises(ValueError):
        _core.lora_rd_dot(x, np.ones(7, dtype), 1)
    with pytest.raises(TypeError):
        _core.lora_rd_dot(x, M[:, ::2], 1)  # not C-contiguous
    other = np.float32 if dtype == np.float64 else np.float64
    with pytest.raises(TypeError):
        _core.lora_rd_dot(x.astype(other), M, 1)
    got = _core.lora_xty(x, y, 2)
    assert got.shape == (7, 3) and got.dtype == dtype and np.all(got == 5)
    assert np.all(_core.lora_xty(x[:0], y[:0], 1) == 0)
    with pytest.raises(ValueError):
        _core.lora_xty(x, y[:4].copy(), 1)  # rows differ
    with pytest.raises(ValueError):
        _core.lora_xty(x[0], y, 1)
    with pytest.raises(TypeError):
        _core.lora_xty(x, y.astype(other), 1)
    with pytest.raises(TypeError):
        _core.lora_xty(x.tolist(), y, 1)
