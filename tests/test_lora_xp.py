"""DynamicLoRA with its arrays in another array module (``xp``): CuPy on a GPU.

Without a GPU the device module is :mod:`tests.strict_xp`, a host stand-in that refuses every
implicit host/device crossing as CuPy does (a numpy function given a device array, a device
array mixed with a host one, a native kernel given a device array): a run that finishes there
kept its arrays on the "device". Its compute is numpy, so the same formulas must give the
host's results within rounding (the device path sums in other orders than the native kernels).
On a machine with a GPU the last test runs the same comparison with CuPy itself.
"""

from __future__ import annotations

import numpy as np
import pytest
from dynamic_core import gpu
from dynamic_core.decision import time_steps
from dynamic_core.learning.agents import LearningAgents, learning_genomes
from dynamic_core.learning.lora import LAYERS, LayerGradient, LoRAConfig, LoRAHierarchy

from . import strict_xp as sx
from .test_learning_agents import planted_market

XP = sx.module()


def _ticks(h: LoRAHierarchy, ticks: int, *, seed: int = 0, n_pattern: int = 1, device_inputs: bool = False) -> list:
    """Learn a planted target with a mask and a repeating input pattern (circuits form), one
    system tick per step; the reports."""
    rng = np.random.default_rng(seed)
    n, d = h.n_agents, h.dim
    w = rng.normal(size=d)
    pattern = rng.normal(size=(n_pattern, d))
    reps = []
    for t in range(ticks):
        x = 0.3 * rng.normal(size=(n, d)) + pattern[t % n_pattern]
        y = np.tanh(x @ w / 4)
        mask = rng.random(n) > 0.2
        if device_inputs:
            x, y, mask = h.xp.asarray(x), h.xp.asarray(y), h.xp.asarray(mask)
        h.learn(x, y, h.snapshot(), mask=mask)
        reps.append(h.system_tick())
    return reps


def _host(h: LoRAHierarchy, a):
    return a if h.xp is np else h.xp.asnumpy(a)


def _assert_close(host: LoRAHierarchy, dev: LoRAHierarchy, rtol: float = 1e-9) -> None:
    for name in LAYERS:
        a, b = host.layers[name], dev.layers[name]
        for what in ("A", "B", "act_in", "act_mid", "act_out", "screening_threshold", "current_entropy", "pins"):
            x, y = getattr(a, what), _host(dev, getattr(b, what))
            np.testing.assert_allclose(y, x, rtol=rtol, atol=rtol * (1.0 + float(np.max(np.abs(x)))),
                                       err_msg=f"{name}.{what}")
        assert np.array_equal(_host(dev, b.phase_A), a.phase_A) and np.array_equal(_host(dev, b.phase_B), a.phase_B)


def test_a_hierarchy_on_a_device_module_tracks_the_host_and_stays_there() -> None:
    cfg = LoRAConfig(ranks=(8, 6, 4, 4, 2), min_history=3, autocorr_window=10)
    host = LoRAHierarchy(40, 6, config=cfg, seed=5)
    dev = LoRAHierarchy(40, 6, config=cfg, seed=5, xp=XP)
    assert isinstance(dev.layers["agent"].A, sx.DeviceArray) and isinstance(dev.head, sx.DeviceArray)
    r_host, r_dev = _ticks(host, 40, seed=4), _ticks(dev, 40, seed=4)
    # the same mechanisms ran: circuits, migrations, resonance signals, health, counts
    for a, b in zip(r_host, r_dev):
        assert a["signal"] == b["signal"] and a["circuits"] == b["circuits"] and a["migrations"] == b["migrations"]
        assert a["learners"] == b["learners"] and a["health"]["entropy"] == b["health"]["entropy"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-9)
        assert b["learning_rate"] == pytest.approx(a["learning_rate"], rel=1e-9)
    assert sum(sum(r["circuits"].values()) for r in r_dev) > 0  # the circuit path was exercised
    assert dev.migration_coordinator.queues["context->agent"].completed > 0
    _assert_close(host, dev)
    x = np.random.default_rng(1).normal(size=(40, 6))
    s = dev.score(x)
    assert isinstance(s, sx.DeviceArray)
    np.testing.assert_allclose(XP.asnumpy(s), host.score(x), rtol=1e-9, atol=1e-12)


def test_the_device_path_is_deterministic_and_takes_device_inputs() -> None:
    cfg = LoRAConfig(ranks=(8, 6, 4, 4, 2), min_history=3, autocorr_window=10)
    runs = []
    for device_inputs in (False, True):
        h = LoRAHierarchy(24, 5, config=cfg, seed=2, xp=XP)
        _ticks(h, 15, seed=8, device_inputs=device_inputs)
        runs.append(h.state_dict())
    assert runs[0].keys() == runs[1].keys()
    for k, v in runs[0].items():
        assert isinstance(v, (np.ndarray, str)), k  # a saved state is host arrays
        assert np.array_equal(v, runs[1][k]) if isinstance(v, np.ndarray) else v == runs[1][k], k


def test_states_move_between_host_and_device() -> None:
    h = LoRAHierarchy(12, 5, seed=3, xp=XP)
    _ticks(h, 6, seed=1)
    sd = h.state_dict()
    on_host, back = LoRAHierarchy.from_state_dict(sd), LoRAHierarchy.from_state_dict(sd, xp=XP)
    x = np.random.default_rng(0).normal(size=(12, 5))
    assert np.array_equal(XP.asnumpy(back.score(x)), XP.asnumpy(h.score(x)))
    np.testing.assert_allclose(on_host.score(x), XP.asnumpy(h.score(x)), rtol=1e-12, atol=1e-15)
    again = LoRAHierarchy.from_state_dict(on_host.state_dict(), xp=XP)
    for k, v in again.state_dict().items():
        assert np.array_equal(v, sd[k]) if isinstance(v, np.ndarray) else v == sd[k], k


def test_snapshots_copy_agents_and_host_gradients_on_a_device_module() -> None:
    h = LoRAHierarchy(6, 4, seed=1, xp=XP)
    _ticks(h, 3, seed=2)
    snap = h.snapshot()
    before = XP.asnumpy(snap["context"][0]).copy()
    _ticks(h, 2, seed=3)  # the update writes into another buffer while the snapshot lives
    assert np.array_equal(XP.asnumpy(snap["context"][0]), before)
    assert not np.array_equal(XP.asnumpy(h.layers["context"].A), before)
    h.copy_agent(1, 4)
    for name in ("agent", "context"):
        L = h.layers[name]
        assert np.array_equal(XP.asnumpy(L.A[4]), XP.asnumpy(L.A[1]))
        assert np.array_equal(XP.asnumpy(L.act_in[4]), XP.asnumpy(L.act_in[1]))
    # a direction given as host arrays is uploaded; the update matches the host layer's
    ref, fresh = LoRAHierarchy(6, 4, seed=1), LoRAHierarchy(6, 4, seed=1, xp=XP)
    rng = np.random.default_rng(4)
    L, R = rng.normal(size=(6, 4)), rng.normal(size=(6, 8))
    lr_dev = fresh.layers["agent"].update(LayerGradient(terms_A=[(L, R)]), 0.5)
    lr_ref = ref.layers["agent"].update(LayerGradient(terms_A=[(L, R)]), 0.5)
    assert isinstance(lr_dev, sx.DeviceArray)
    assert np.array_equal(XP.asnumpy(lr_dev), lr_ref)
    np.testing.assert_allclose(XP.asnumpy(fresh.layers["agent"].A), ref.layers["agent"].A, rtol=1e-12)
    assert not np.array_equal(ref.layers["agent"].A, ref.layers["agent"].A_init)


def test_nonfinite_rows_are_contained_on_a_device_module() -> None:
    host, dev = LoRAHierarchy(4, 5, seed=1), LoRAHierarchy(4, 5, seed=1, xp=XP)
    x = np.random.default_rng(0).normal(size=(4, 5))
    x[1, 2] = np.nan
    x[3] = 1e200  # overflows the forward pass
    t = np.array([0.5, -0.5, 0.2, 0.1])
    for h in (host, dev):
        h.learn(x, t)
    a, b = host.system_tick(), dev.system_tick()
    assert (a["nonfinite"], a["overflow"]) == (b["nonfinite"], b["overflow"]) == (1, 1)
    _assert_close(host, dev)
    with pytest.raises(ValueError, match="target must be in"):
        dev.learn(np.zeros((4, 5)), XP.asarray([0.0, 2.0, 0.0, 0.0]))
    with pytest.raises(TypeError, match="real numbers"):
        dev.learn(np.zeros((4, 5)), XP.asarray([1j, 0, 0, 0]))


def test_learning_agents_learn_on_a_device_module() -> None:
    bars = planted_market(300, phi=0.5, seed=2)
    g = learning_genomes("PLANT", 3600, 16)
    host, dev = LearningAgents(g, seed=9), LearningAgents(g, seed=9, xp=XP)
    for part in time_steps(bars):
        a, b = host.step(part), dev.step(part)
        assert isinstance(b, np.ndarray)  # scores come back to the host for the engine
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12)
    assert dev.ticks == host.ticks > 250 and dev.hit_rate() == host.hit_rate()


def test_masks_snapshots_and_directions_across_modules() -> None:
    host, dev = LoRAHierarchy(4, 5, seed=1), LoRAHierarchy(4, 5, seed=1, xp=XP)
    x = np.zeros((4, 5))
    x[0, 0] = np.nan
    for h, other in ((dev, host), (host, dev)):  # a snapshot of the other module: refused before any count
        with pytest.raises(ValueError, match="taken from another one"):
            h.learn(x, np.zeros(4), other.snapshot())
        assert h._nonfinite == 0
    # a device mask of 0/1 numbers is checked on the device: one scalar more than a bool mask
    x = np.random.default_rng(0).normal(size=(4, 5))
    t = np.array([0.5, -0.5, 0.2, 0.1])
    counts = []
    for mask in (XP.asarray([True, False, True, True]), XP.asarray([1, 0, 1, 1]),
                 XP.asarray([True, False, True, True])):
        sx.reset_transfers()
        dev.learn(x, t, mask=mask)
        counts.append(sx.transfers()["downloads"])
    assert counts[1] == counts[2] + 1  # (the first call also sets the swarm's direction)
    for mask in (np.array([True, False, True, True]), np.array([1, 0, 1, 1]), np.array([True, False, True, True])):
        host.learn(x, t, mask=mask)
    for name in LAYERS:
        for a, b in zip(host.gradients()[name], dev.gradients()[name]):
            np.testing.assert_allclose(XP.asnumpy(b), a, rtol=1e-12, atol=1e-15)
    for bad, match in ((XP.asarray([1, 2, 0, 0]), "other values"), (XP.asarray([True, False]), "shape")):
        with pytest.raises(ValueError, match=match):
            dev.learn(x, t, mask=bad)
    # a direction of host factors, densified on the device
    L, R = np.ones((4, 5)), np.arange(12.0).reshape(4, 3)
    gA, _ = LayerGradient(terms_A=[(L, R)]).dense(4, 5, 3, xp=XP)
    assert np.array_equal(XP.asnumpy(gA), LayerGradient(terms_A=[(L, R)]).dense(4, 5, 3)[0])


def test_the_array_module_argument_is_checked() -> None:
    with pytest.raises(ValueError, match="'numpy', 'cupy' or an array module"):
        LoRAHierarchy(2, 3, xp="torch")
    with pytest.raises(TypeError, match="array module"):
        LoRAHierarchy(2, 3, xp=object())
    if not gpu.probe():
        with pytest.raises(RuntimeError, match="xp='cupy': "):
            LoRAHierarchy(2, 3, xp="cupy")
    assert LoRAHierarchy(2, 3, xp="numpy").xp is np


@pytest.mark.gpu
def test_cupy_on_the_device_tracks_the_host() -> None:
    status = gpu.probe()
    if not status:
        pytest.skip(f"no usable GPU: {status.reason}")
    import cupy

    cfg = LoRAConfig(ranks=(8, 6, 4, 4, 2), min_history=3, autocorr_window=10)
    host = LoRAHierarchy(200, 16, config=cfg, seed=5)
    devs = [LoRAHierarchy(200, 16, config=cfg, seed=5, xp="cupy") for _ in range(2)]
    r_host = _ticks(host, 30, seed=4)
    r_devs = [_ticks(d, 30, seed=4) for d in devs]
    assert isinstance(devs[0].layers["agent"].A, cupy.ndarray)
    assert [r["signal"] for r in r_devs[0]] == [r["signal"] for r in r_host]
    _assert_close(host, devs[0], rtol=1e-7)
    a, b = devs[0].state_dict(), devs[1].state_dict()  # the same GPU: the same bits
    for k, v in a.items():
        assert np.array_equal(v, b[k]) if isinstance(v, np.ndarray) else v == b[k], k
