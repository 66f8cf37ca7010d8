"""tests/strict_xp.py, the strict host stand-in for CuPy: each refusal, each explicit transfer,
in-place writes and views, and the 0-d device results CuPy gives for reductions."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from . import strict_xp as sx

xp = sx.module()


@pytest.fixture
def dev() -> sx.DeviceArray:
    return xp.asarray(np.arange(12, dtype=np.float32).reshape(3, 4))


@pytest.fixture
def host() -> np.ndarray:
    return np.ones((3, 4), dtype=np.float32)


def test_namespace_is_the_module() -> None:
    assert sx.xp is xp and xp.__name__ == "strict_xp" and xp.ndarray is sx.DeviceArray
    a = xp.zeros((3, 4), xp.float32)
    assert isinstance(a, xp.ndarray) and a.dtype == np.float32 and a.shape == (3, 4)
    assert (xp.newaxis, xp.inf, xp.pi, xp.e) == (None, np.inf, np.pi, np.e)
    assert xp.dtype("float32") == xp.float32 and xp.result_type(a, xp.float64) == np.float64
    assert not xp.isscalar(a) and xp.ndarray((2, 2), xp.float32).shape == (2, 2)


def test_no_errstate_nor_random() -> None:
    for name in ("errstate", "seterr", "random", "no_such_function"):
        with pytest.raises(AttributeError):
            getattr(xp, name)


@pytest.mark.parametrize("convert", [np.asarray, np.array, np.ascontiguousarray, memoryview,
                                     lambda a: np.asarray([a, a])])
def test_implicit_host_conversion_refused(dev: sx.DeviceArray, convert: object) -> None:
    with pytest.raises(TypeError):
        convert(dev)  # type: ignore[operator]
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
        np.asarray(dev[0, 0])


def test_native_bindings_refuse_device_arrays() -> None:
    core = pytest.importorskip("dynamic_core._core")
    x, m = np.ones((4, 8)), np.ones((4, 2, 8))
    assert core.lora_rd_dot(x, m, 1).shape == (4, 2)
    with pytest.raises(TypeError):
        core.lora_rd_dot(xp.asarray(x), m, 1)


def test_no_host_memory_attributes(dev: sx.DeviceArray) -> None:
    for name in ("data", "ctypes", "tobytes", "setflags", "flat", "__array_interface__", "__array_struct__"):
        with pytest.raises(AttributeError):
            getattr(dev, name)
    with pytest.raises(AttributeError):
        dev.flags.writeable = False
    with pytest.raises(AttributeError):
        _ = dev.flags.writeable
    assert dev.flags.c_contiguous and dev.T.flags.f_contiguous and dev.flags["C_CONTIGUOUS"]


@pytest.mark.parametrize("mix", [
    lambda d, h: d + h, lambda d, h: h + d, lambda d, h: h @ d.T, lambda d, h: d.T @ h,
    lambda d, h: d < h, lambda d, h: np.add(d, h), lambda d, h: np.add(d, h[0, 0, ...]),
    lambda d, h: xp.multiply(d, h), lambda d, h: np.einsum("ij,ij->i", d, h), lambda d, h: np.stack([d, h]),
    lambda d, h: xp.where(d > 0, d, h), lambda d, h: xp.concatenate([d, h]), lambda d, h: d.dot(h.T),
    lambda d, h: xp.copyto(d, h), lambda d, h: xp.maximum(d, 0, out=h), lambda d, h: d + [1, 2, 3, 4],
    lambda d, h: xp.maximum(d, [0.0, 1.0, 2.0, 3.0]),
])
def test_mixing_with_host_arrays_refused(dev: sx.DeviceArray, host: np.ndarray, mix: object) -> None:
    with pytest.raises(TypeError, match="Unsupported type"):
        mix(dev, host)  # type: ignore[operator]


def test_in_place_with_host_refused(dev: sx.DeviceArray, host: np.ndarray) -> None:
    with pytest.raises(TypeError):
        dev += host
    with pytest.raises(TypeError):
        host += dev


def test_indexing_with_host_refused(dev: sx.DeviceArray, host: np.ndarray) -> None:
    with pytest.raises(TypeError):
        dev[np.array([0, 1])]
    with pytest.raises(TypeError):
        dev[0] = host[0]
    with pytest.raises(TypeError):
        dev[0] = [1.0, 2.0, 3.0, 4.0]


def test_scalars_mix_freely(dev: sx.DeviceArray) -> None:
    for r in (dev + 1, 2.0 * dev, np.float64(2.0) * dev, dev - np.int64(3), np.float32(1) + dev, -dev, abs(dev),
              dev ** 2, 2 ** dev, dev // 2, dev % 3, dev / 2, dev == 3.0, ~(dev > 2)):
        assert isinstance(r, sx.DeviceArray) and r.shape == dev.shape
    assert (dev + np.float32(1)).dtype == np.float32  # numpy's own promotion, no float64 upcast


def test_reductions_are_0d_device_arrays(dev: sx.DeviceArray) -> None:
    for r in (np.sum(dev), np.mean(dev), dev.max(), dev.argmax(), dev.all(), xp.sum(dev), xp.linalg.norm(dev),
              np.linalg.norm(dev), xp.count_nonzero(dev), xp.array_equal(dev, dev), dev[1, 2]):
        assert isinstance(r, sx.DeviceArray) and r.ndim == 0
    assert float(np.sum(dev)) == 66.0 and int(dev.argmax()) == 11 and bool(dev.all()) is False
    assert dev[1, 2].item() == 6.0 and np.sum(dev, axis=0).shape == (4,)


def test_numpy_functions_stay_on_device(dev: sx.DeviceArray) -> None:
    e = np.einsum("ij,ij->i", dev, dev)
    assert isinstance(e, sx.DeviceArray) and e.tolist() == [14.0, 126.0, 366.0]
    for r in (np.exp(dev), np.zeros_like(dev), np.transpose(dev), np.where(dev > 3, dev, 0.0), xp.tanh(dev),
              xp.einsum("ij->j", dev), xp.broadcast_to(dev[0], (2, 4)), xp.stack([dev, dev]), dev @ dev.T):
        assert isinstance(r, sx.DeviceArray)
    assert all(isinstance(r, sx.DeviceArray) for r in (*np.nonzero(dev), *dev.nonzero(), *xp.where(dev > 3)))
    assert xp.lexsort((dev[0], dev[1])).tolist() == [0, 1, 2, 3]


def test_out_writes_in_place(dev: sx.DeviceArray) -> None:
    c = xp.empty_like(dev)
    assert np.multiply(dev, 2, out=c) is c and c.get()[1, 0] == 8.0
    assert xp.maximum(dev, 5, out=dev) is dev and dev.get()[0].tolist() == [5.0] * 4
    assert xp.subtract(dev, 1, out=c) is c and np.sum(dev, axis=1, out=c[:, 0]) is not None
    assert c.get()[:, 0].tolist() == [20.0, 23.0, 38.0]
    x = dev[0]
    x -= 5
    x *= 2
    assert dev.get()[0].tolist() == [0.0] * 4
    xp.copyto(dev, xp.ones((3, 4), xp.float32))
    assert dev.get().sum() == 12.0
    dev.fill(2)
    assert dev.get().sum() == 24.0


def test_views_write_through_and_share(dev: sx.DeviceArray) -> None:
    v = dev[1:, ::2]
    v[0, 0] = 99
    dev[2][1] = -1.0
    dev[xp.asarray([False, False, True])] *= 1  # fancy indexing copies, but setitem writes
    r = dev.reshape(12)
    r[0] = 7
    s = dev[2, 3]  # a 0-d view, as CuPy's
    s[...] = 42
    assert dev.get()[2, 3] == 42.0
    assert dev.get()[1, 0] == 99.0 and dev.get()[2, 1] == -1.0 and dev.get()[0, 0] == 7.0
    assert xp.may_share_memory(v, dev) and xp.shares_memory(r, dev) and np.may_share_memory(v, dev)
    assert not xp.may_share_memory(dev, dev.copy()) and not xp.may_share_memory(dev, xp.zeros((3, 4)))
    assert dev.base is None and v.base is not None and xp.may_share_memory(v[0].base, dev)
    dev[dev > 50] = 0
    assert float(dev.max()) < 50


def test_uploads_copy_and_asarray_keeps_device_arrays(host: np.ndarray) -> None:
    d = xp.asarray(host)
    d[0, 0] = 5
    assert host[0, 0] == 1.0  # the upload copied
    assert xp.asarray(d) is d and xp.asarray(d, xp.float32) is d and xp.asarray(d, xp.float64) is not d
    assert xp.array(d) is not d and xp.asnumpy(host) is host
    assert isinstance(xp.asarray([1.0, 2.0]), sx.DeviceArray) and xp.asarray(3).ndim == 0


def test_transfer_counters(dev: sx.DeviceArray, host: np.ndarray) -> None:
    sx.reset_transfers()
    xp.zeros(3) + dev[0, :3] * 2  # device-only work moves nothing
    assert sx.transfers() == {"uploads": 0, "downloads": 0}
    xp.asarray(host)
    xp.array([1, 2])
    h = dev.get()
    h2 = xp.asnumpy(dev)
    assert isinstance(h, np.ndarray) and isinstance(h2, np.ndarray) and h is not h2
    float(dev[0, 0])
    int(dev[0, 0])
    bool(dev[0, 1])
    dev.sum().item()
    dev.tolist()
    f"{dev[0, 0]:.2f}"
    assert sx.transfers() == {"uploads": 2, "downloads": 8}
    sx.reset_transfers()
    assert sx.transfers() == {"uploads": 0, "downloads": 0}


def test_get_array_module(dev: sx.DeviceArray, host: np.ndarray) -> None:
    assert xp.get_array_module(dev) is xp and xp.get_array_module(host, dev) is xp
    assert xp.get_array_module(host, 1.0) is np and xp.get_array_module() is np


def test_sequence_protocol_and_methods(dev: sx.DeviceArray) -> None:
    rows = list(dev)
    assert len(dev) == 3 and len(rows) == 3 and all(isinstance(r, sx.DeviceArray) for r in rows)
    with pytest.raises(TypeError):
        len(dev[0, 0])
    with pytest.raises(ValueError):
        bool(dev)
    assert dev.astype(xp.float32, copy=False) is dev and dev.astype(xp.float64).dtype == np.float64
    for r in (dev.T, dev.ravel(), dev.flatten(), dev.transpose(1, 0), dev.swapaxes(0, 1), dev.cumsum(), dev.clip(0, 3),
              dev.view(np.int32), dev[None, ..., 0], dev.take([0, 2], axis=1), dev.repeat(2), copy.deepcopy(dev)):
        assert isinstance(r, sx.DeviceArray)
    assert repr(dev[0]).startswith("DeviceArray([0., 1.") and dev.std().ndim == 0
