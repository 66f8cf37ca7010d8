"""DynamicLoRA: each mechanism against the design's formulas, gradients against finite
differences, the batched forward against a per-agent loop, determinism and persistence."""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys

import msgspec
import numpy as np
import pytest
from dynamic_core.learning.lora import (
    ACCEPTABLE,
    AMNESIA_RISK,
    CONFLICT,
    CRYSTALLIZATION_RISK,
    DEGRADED,
    FAST_TRACK,
    HEALTHY,
    LAYERS,
    NORMAL,
    SHARED_LAYERS,
    Circuit,
    CircuitDetector,
    DynamicLoRALayer,
    HealthMonitor,
    HorizontalResonance,
    LayerGradient,
    LoRABackend,
    LoRAConfig,
    LoRAHierarchy,
    MigrationCoordinator,
    MigrationQueue,
    ResonanceEngine,
    VerticalResonance,
)

TINY_RANKS = (4, 3, 2, 2, 2)


def tiny(n: int = 3, d: int = 5, **kw) -> LoRAHierarchy:
    cfg = LoRAConfig(ranks=TINY_RANKS, **kw)
    return LoRAHierarchy(n, d, config=cfg, seed=7)


def randomise(h: LoRAHierarchy, seed: int = 1, scale: float = 0.3) -> None:
    """Nonzero B everywhere (B starts at zero, which hides A's gradient)."""
    rng = np.random.default_rng(seed)
    for layer in h.layers.values():
        layer.set_params(B=rng.normal(0.0, scale, size=layer.B.shape))


def circuit(autocorr: float = 0.8, params: int = 10, criticality: float = 0.0, slot: int = 0, d: int = 4,
            k: int = 1, layer: str = "context") -> Circuit:
    rng = np.random.default_rng(int(autocorr * 1000) + params)
    return Circuit(layer=layer, slot=slot, nodes=tuple(range(k)), parameter_count=params, autocorr=autocorr,
                   criticality=criticality, activation_signature=1, a_cols=rng.normal(size=(d, k)),
                   b_rows=rng.normal(size=(k, d)))


# ---------------------------------------------------------------------------------------- config
def test_config_defaults_are_the_designs() -> None:
    c = LoRAConfig()
    assert c.ranks == (64, 32, 16, 8, 4)
    assert c.base_inertia == (0.99, 0.9, 0.7, 0.5, 0.1)
    assert (c.screened_decay, c.free_decay) == (1e-4, 1e-2)
    assert (c.autocorr_window, c.stability_threshold) == (100, 0.7)
    assert c.bandwidth == (0.01, 0.005, 0.001, 0.0001) and c.restore_rate == 0.1
    assert (c.horizontal_alpha, c.horizontal_beta) == (0.5, -0.3)
    assert (c.vertical_gamma, c.vertical_delta, c.max_amplification) == (0.3, 0.2, 2.0)
    assert (c.vertical_threshold, c.conflict_threshold) == (0.5, 0.3)
    assert c.entropy_bands == (0.5, 0.8, 1.2, 2.0)


def test_config_is_frozen_and_strict() -> None:
    c = LoRAConfig()
    with pytest.raises(AttributeError):
        c.step_size = 2.0  # type: ignore[misc]
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"ranks": [1, 2, 3, 4, 5], "nope": 1}', type=LoRAConfig)
    assert msgspec.json.decode(msgspec.json.encode(c), type=LoRAConfig) == c
    for bad in ({"ranks": (1, 2, 3)}, {"base_inertia": (0.99, 0.9, 0.7, 0.5, 1.0)}, {"inertia_gain": 1.0},
                {"entropy_budget": (0.6, 0.2)}, {"bandwidth": (0.1,)}, {"screening_threshold": 0.0}):
        with pytest.raises(ValueError):
            LoRAConfig(**bad)
    # lists are kept as the tuples the fields are: equal, hashable, not changeable after the checks
    listed = LoRAConfig(entropy_budget=[0.2, 0.6], ranks=[64, 32, 16, 8, 4])  # type: ignore[arg-type]
    assert listed == LoRAConfig() and hash(listed) == hash(LoRAConfig())
    assert type(listed.entropy_budget) is tuple and type(listed.ranks) is tuple


# ---------------------------------------------------------------------------------------- layer
def _push_density(layer: DynamicLoRALayer, rms: np.ndarray) -> None:
    """One tick whose rank activations have the given RMS per slot (constant vectors)."""
    s, d, r = layer.slots, layer.dim, layer.rank
    u = np.repeat(np.asarray(rms, float)[:, None], r, axis=1)
    layer.record_interaction(np.ones((s, d)), u, np.zeros((s, d)))
    layer.end_interactions()


def test_effective_inertia_formula_bounds_and_learning_rate() -> None:
    cfg = LoRAConfig(screened_decay=0.0, free_decay=0.0)
    layer = DynamicLoRALayer(4, 2, 0.7, slots=3, config=cfg, rng=np.random.default_rng(0))
    H = cfg.interaction_window
    assert np.array_equal(layer.compute_effective_inertia(), np.full(3, 0.7))  # idle: the base
    pushed = [np.array([0.0, 0.5, 4.0]), np.array([0.0, 1.5, 8.0]), np.array([0.0, 2.5, 16.0])]
    previous = layer.compute_effective_inertia()
    for i, rms in enumerate(pushed):
        _push_density(layer, rms)
        D = np.sum(pushed[: i + 1], axis=0) / H
        expect = 0.7 + (1 - 0.7) * cfg.inertia_gain * (D / (D + cfg.density_half))
        got = layer.compute_effective_inertia()
        np.testing.assert_allclose(got, expect, rtol=1e-15, atol=0)
        assert np.all(got >= 0.7) and np.all(got < 0.7 + 0.3 * cfg.inertia_gain)
        assert np.all(got[1:] > previous[1:]) and got[0] == 0.7  # rises with density, only with it
        previous = got
    # the step of update() is (1 - inertia) * strength * gradient, exactly
    rng = np.random.default_rng(3)
    gA, gB = rng.normal(size=(3, 4, 2)), rng.normal(size=(3, 2, 4))
    A0, B0 = layer.A.copy(), layer.B.copy()
    lr = 1.0 - layer.compute_effective_inertia()
    used = layer.update((gA, gB), strength=0.37)
    assert np.array_equal(used, lr)
    c = lr * 0.37
    assert np.array_equal(layer.A, A0 + c[:, None, None] * gA)
    assert np.array_equal(layer.B, B0 + c[:, None, None] * gB)


def test_inertia_never_reaches_one_at_any_density() -> None:
    for base in (0.0, 0.5, 0.99):
        layer = DynamicLoRALayer(2, 1, base, slots=1, config=LoRAConfig(inertia_gain=0.9))
        for _ in range(40):
            _push_density(layer, np.array([1e12]))
        inertia = float(layer.compute_effective_inertia()[0])
        assert base <= inertia <= base + (1 - base) * 0.9 < 1.0
        assert float(layer.learning_rate()[0]) > 0.0


def _layer_with_phases() -> DynamicLoRALayer:
    layer = DynamicLoRALayer(3, 2, 0.5, slots=1, config=LoRAConfig(screening_threshold=1.0),
                             rng=np.random.default_rng(0))
    layer.act_in = np.array([[0.5, 2.0, 4.0]])
    layer.act_mid = np.array([[1.0, 0.3]])
    layer.act_out = np.array([[3.0, 0.1, 5.0]])
    rng = np.random.default_rng(1)
    layer.set_params(A=rng.normal(size=(3, 2)), B=rng.normal(size=(2, 3)), A_init=rng.normal(size=(3, 2)),
                     B_init=rng.normal(size=(2, 3)))
    return layer


def test_phase_is_activity_above_threshold_and_pins() -> None:
    layer = _layer_with_phases()
    actA, actB = layer.compute_activity_mask()
    pA, pB = layer.compute_phase()
    assert np.array_equal(pA, actA > 1.0) and np.array_equal(pB, actB > 1.0)
    assert pA.any() and (~pA).any() and pB.any() and (~pB).any()
    layer.pins[0, 1] = 3
    pA, pB = layer.compute_phase()
    assert pA[0, :, 1].all() and pB[0, 1, :].all()


def test_decay_to_init_free_1e2_screened_1e4_exact() -> None:
    layer = _layer_with_phases()
    pA, pB = layer.compute_phase()
    A, B, A0, B0 = layer.A.copy(), layer.B.copy(), layer.A_init.copy(), layer.B_init.copy()
    layer.update(None)
    decA = np.where(pA, 1e-4, 1e-2)
    decB = np.where(pB, 1e-4, 1e-2)
    assert np.array_equal(layer.A, A + decA * (A0 - A))
    assert np.array_equal(layer.B, B + decB * (B0 - B))
    assert np.array_equal(layer.phase_A, pA) and np.array_equal(layer.phase_B, pB)
    # over many ticks the FREE distance shrinks as 0.99**k, the SCREENED one as 0.9999**k
    dist0 = np.abs(A - A0)
    for _ in range(99):
        layer.update(None)
    ratio = np.abs(layer.A - A0) / dist0
    np.testing.assert_allclose(ratio[~pA[0][None]], 0.99 ** 100, rtol=1e-9)
    np.testing.assert_allclose(ratio[pA[0][None]], 0.9999 ** 100, rtol=1e-9)
    assert ratio[~pA[0][None]].max() < ratio[pA[0][None]].min()


def test_gradient_step_then_decay_exact_and_terms_match_dense() -> None:
    layer = _layer_with_phases()
    rng = np.random.default_rng(5)
    gA, gB = rng.normal(size=(1, 3, 2)), rng.normal(size=(1, 2, 3))
    twin = _layer_with_phases()
    A, A0 = layer.A.copy(), layer.A_init.copy()
    pA, _ = layer.compute_phase()
    lr = layer.learning_rate()
    layer.update(LayerGradient(gA, gB), strength=2.0)
    stepped = A + (lr * 2.0)[:, None, None] * gA
    assert np.array_equal(layer.A, stepped + np.where(pA, 1e-4, 1e-2) * (A0 - stepped))
    # the factored form (what learn gives per-agent layers) lands on the same values
    L, R = rng.normal(size=(1, 3)), rng.normal(size=(1, 2))
    layer2 = _layer_with_phases()
    layer2.update(LayerGradient(terms_A=[(L, R)]), strength=1.0)
    twin.update(LayerGradient(A=L[:, :, None] * R[:, None, :]), strength=1.0)
    np.testing.assert_allclose(layer2.A, twin.A, rtol=1e-15, atol=1e-15)


def _brute_entropy(layer: DynamicLoRALayer) -> np.ndarray:
    actA, actB = layer.compute_activity_mask()
    pA, pB = layer.compute_phase()
    out = []
    for s in range(layer.slots):
        act = np.concatenate([actA[s].ravel(), actB[s].ravel()])
        free = ~np.concatenate([pA[s].ravel(), pB[s].ravel()])
        p = act / act.sum()
        q = p[free & (p > 0)]
        out.append(-(q * np.log(q)).sum() / math.log(act.size))
    return np.array(out)


def test_entropy_matches_brute_force_and_rises_with_threshold() -> None:
    rng = np.random.default_rng(2)
    layer = DynamicLoRALayer(6, 3, 0.5, slots=4, config=LoRAConfig(), rng=rng)
    layer.act_in = rng.uniform(0, 2, size=(4, 6))
    layer.act_mid = rng.uniform(0, 2, size=(4, 3))
    layer.act_out = rng.uniform(0, 2, size=(4, 6))
    layer.act_in[0, 2] = 0.0  # a silent line contributes nothing
    last = np.full(4, -1.0)
    for th in (1e-3, 0.3, 0.8, 1.5, 3.0, 100.0):
        layer.screening_threshold = np.full(4, th)
        expect = _brute_entropy(layer)
        layer.update(None)
        np.testing.assert_allclose(layer.current_entropy, expect, rtol=1e-12, atol=1e-14)
        assert np.all(layer.current_entropy >= last - 1e-15)
        last = layer.current_entropy.copy()
    # everything free: the whole entropy of the activity distribution
    assert not layer.phase_A.any() and not layer.phase_B.any() and np.all(last > 0.8)


def test_homeostasis_steers_threshold_toward_budget() -> None:
    cfg = LoRAConfig(entropy_budget=(0.3, 0.5), threshold_rate=0.1)
    layer = DynamicLoRALayer(4, 2, 0.5, slots=3, config=cfg)
    layer.act_in[:] = 1.0
    layer.act_mid[:] = 1.0
    layer.act_out[:] = 1.0
    layer.act_in[2] = 0.0
    layer.act_mid[2] = 0.0  # slot 2: no activity at all
    layer.update(None)
    layer.current_entropy = np.array([0.1, 0.9, 0.1])
    th = layer.screening_threshold.copy()
    layer.maintain_homeostasis()
    assert layer.screening_threshold[0] == th[0] * 1.1  # too crystallised: free parameters
    assert layer.screening_threshold[1] == th[1] / 1.1  # too plastic: screen more
    assert layer.screening_threshold[2] == th[2]  # idle: nothing to steer
    # closed loop: a layer with fixed activity settles inside the budget
    rng = np.random.default_rng(0)
    layer = DynamicLoRALayer(8, 4, 0.5, slots=2, config=cfg)
    layer.act_in = rng.uniform(0.1, 2, size=(2, 8))
    layer.act_mid = rng.uniform(0.1, 2, size=(2, 4))
    layer.act_out = rng.uniform(0.1, 2, size=(2, 8))
    for _ in range(200):
        layer.maintain_homeostasis()
        layer.update(None)
    assert np.all((layer.current_entropy > 0.2) & (layer.current_entropy < 0.6))


def test_consolidate_circuit_blends_and_pins() -> None:
    cfg = LoRAConfig(consolidation_ticks=7, match_threshold=0.999)
    layer = DynamicLoRALayer(4, 3, 0.5, slots=2, config=cfg, rng=np.random.default_rng(0))
    layer.act_mid[1] = [0.5, 0.1, 0.9]
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(4, 1)), rng.normal(size=(1, 4))
    A, B = layer.A.copy(), layer.B.copy()
    c = Circuit(layer="context", slot=0, nodes=(0,), parameter_count=8, autocorr=0.9, criticality=0.1,
                activation_signature=1, a_cols=a, b_rows=b)
    used = layer.consolidate_circuit(c, slot=1, weight=0.25)
    assert used == [1]  # the least active component is recruited
    sign = 1.0 if a[:, 0] @ A[1, :, 1] >= 0 else -1.0
    assert np.array_equal(layer.A[1, :, 1], 0.75 * A[1, :, 1] + (0.25 * sign) * a[:, 0])
    assert np.array_equal(layer.B[1, 1, :], 0.75 * B[1, 1, :] + (0.25 * sign) * b[0])
    assert layer.pins[1, 1] == 7 and layer.pins[1].sum() == 7 and layer.pins[0].sum() == 0
    assert np.array_equal(layer.A[0], A[0]) and np.array_equal(layer.A[1, :, [0, 2]], A[1, :, [0, 2]])
    # the same pattern again joins the component that already carries it
    c2 = Circuit(layer="context", slot=0, nodes=(0,), parameter_count=8, autocorr=0.9, criticality=0.1,
                 activation_signature=1, a_cols=layer.A[1][:, [1]].copy(), b_rows=b)
    assert layer.consolidate_circuit(c2, slot=1, weight=0.5) == [1]


# ---------------------------------------------------------------------------------------- migration
def test_migration_never_exceeds_bandwidth_random_sequences() -> None:
    for seed in range(20):
        rng = np.random.default_rng(seed)
        bw = float(rng.choice([0.01, 0.005, 0.05]))
        moved: list[tuple[str, float]] = []
        q = MigrationQueue("context", "agent", bw, total_params=1000, emergency_threshold=0.9,
                           execute=lambda c, f, moved=moved: moved.append((c.layer, f)), max_pending=50)
        model = 0.0
        for _ in range(60):
            for _ in range(int(rng.integers(0, 6))):
                crit = float(rng.uniform(0, 1))
                c = circuit(autocorr=float(rng.uniform(0, 1)), params=int(rng.integers(1, 80)), criticality=crit)
                before = q.current_transfer
                res = q.enqueue_migration(c)
                if res == "executed":
                    model += c.parameter_count / 1000
                else:
                    assert q.current_transfer == before  # emergencies and queued: not accounted
                assert q.current_transfer <= bw
            model *= 0.9
            start = model
            done = q.tick()
            queued = [t.size for t in done if t.kind == "queued"]
            model = min(start + sum(queued), bw)
            assert start + sum(queued) <= bw * (1 + 1e-12)  # what the tick moved fitted in the room
            assert q.current_transfer <= bw
            assert q.current_transfer == pytest.approx(model, rel=1e-12, abs=1e-15)
        assert q.emergencies > 0 and q.rejections > 0


def test_migration_drains_by_priority_fifo_within_ties() -> None:
    order: list[float] = []
    q = MigrationQueue("agent", "swarm", 0.1, total_params=100, restore_rate=1.0,
                       execute=lambda c, f: order.append(c.autocorr))
    q.enqueue_migration(circuit(autocorr=0.99, params=10))  # fills the channel
    acs = [0.75, 0.95, 0.8, 0.95, 0.71, 0.9]
    cs = [circuit(autocorr=a, params=10) for a in acs]
    for c in cs:
        assert q.enqueue_migration(c) == "queued"
    fast = circuit(autocorr=0.5, params=10)
    fast.fast_track = True
    q.enqueue_migration(fast)
    order.clear()
    for _ in range(10):
        q.tick()
    assert order == [0.5, 0.95, 0.95, 0.9, 0.8, 0.75, 0.71]
    tied = [p for p in (cs[1], cs[3])]
    assert tied[0].autocorr == tied[1].autocorr


def test_migration_emergency_bypass_wait_and_rejection_stats() -> None:
    q = MigrationQueue("context", "agent", 0.1, total_params=100, restore_rate=1.0, emergency_threshold=0.95)
    results = [q.enqueue_migration(circuit(autocorr=0.8, params=5)) for _ in range(5)]
    assert results == ["executed", "executed", "queued", "queued", "queued"]
    assert q.enqueue_migration(circuit(autocorr=0.8, params=50, criticality=0.96)) == "emergency"
    assert q.emergencies == 1 and q.current_transfer == pytest.approx(0.1)
    assert q.rejections == 3 and q.total_requests == 6 and q.rejection_rate == 0.5
    done = q.tick()  # full restore: two of the three queued fit
    assert [t.kind for t in done] == ["immediate", "immediate", "emergency", "queued", "queued"]
    assert len(q.pending) == 1
    q.tick()
    assert not q.pending and q.completed == 6
    assert q.average_wait_time() == pytest.approx(1 / 6)  # one request waited one tick
    s = q.stats()
    assert s["queue_depth"] == 0 and s["emergencies"] == 1


def test_migration_oversized_circuit_streams_in_slices() -> None:
    got: list[float] = []
    q = MigrationQueue("swarm", "domain", 0.001, total_params=2048, execute=lambda c, f: got.append(f))
    big = circuit(autocorr=0.9, params=128)  # 0.0625 of the layer: 62.5 times the bandwidth
    assert q.enqueue_migration(big) == "queued"
    ticks = 0
    while q.pending:
        q.tick()
        ticks += 1
        assert q.current_transfer <= 0.001
        assert ticks < 10_000
    assert sum(got) == pytest.approx(1.0, rel=1e-9)
    assert q.transferred == pytest.approx(128 / 2048, rel=1e-9)
    assert q.completed == 1 and q.average_wait_time() == ticks - 1


def test_migration_queue_bound_and_coordinator_channels() -> None:
    q = MigrationQueue("context", "agent", 0.01, total_params=100, max_pending=3)
    q.enqueue_migration(circuit(autocorr=0.5, params=1))
    for a in (0.6, 0.7, 0.8, 0.4):
        q.enqueue_migration(circuit(autocorr=a, params=5))
    assert [p.circuit.autocorr for p in q.pending] == [0.8, 0.7, 0.6] and q.dropped == 1
    h = LoRAHierarchy(4, 8)
    coord = h.migration_coordinator
    assert isinstance(coord, MigrationCoordinator)
    assert {k: v.bandwidth for k, v in coord.queues.items()} == {
        "context->agent": 0.01, "agent->swarm": 0.005, "swarm->domain": 0.001, "domain->foundation": 0.0001}
    assert coord.queues["agent->swarm"].total_params == 4 * 2 * 8 * 8
    with pytest.raises(KeyError):
        coord.migrate_circuit(circuit(), "context", "domain")


# ---------------------------------------------------------------------------------------- resonance
def test_horizontal_resonance_factors() -> None:
    hr = HorizontalResonance()
    assert hr.factor(0.4) == 1 + 0.5 * 0.4
    assert hr.factor(-0.4) == 1 - 0.3 * 0.4  # conflicting gradients are damped
    assert hr.factor(0.0) == 1.0
    np.testing.assert_array_equal(hr.factor(np.array([1.0, -1.0])), [1.5, 0.7])
    g = np.array([1.0, 0.0])
    out = hr.apply(g, np.array([2.0, 0.0]))
    assert np.array_equal(out, g * 1.5)
    assert np.array_equal(hr.apply(-g, np.zeros(2)), -g * 0.7)  # the direction is set once


def test_horizontal_weights_in_the_swarm_gradient() -> None:
    """The swarm gradient is the mean of per-agent contributions, each weighted by the factor of
    its cosine with the swarm direction (checked against dense per-agent gradients)."""
    n, d = 5, 4
    rng = np.random.default_rng(0)
    x, t = rng.normal(size=(n, d)), rng.uniform(-1, 1, size=n)
    plain, weighted = tiny(n, d, horizontal_alpha=0.0, horizontal_beta=0.0), tiny(n, d)
    randomise(plain)
    randomise(weighted)
    direction = (rng.normal(size=(d, 2)), rng.normal(size=(2, d)))
    nrm = math.sqrt(sum(float((z * z).sum()) for z in direction))
    weighted.resonance_engine.horizontal.current_direction = tuple(z / nrm for z in direction)
    # per-agent swarm gradients from one-agent masks of the unweighted twin
    per = []
    for i in range(n):
        m = np.zeros(n, bool)
        m[i] = True
        plain.learn(x, t, mask=m)
        gA, gB = plain.gradients()["swarm"]
        per.append((gA[0].copy(), gB[0].copy()))
        plain._reset_grads()
    plain.learn(x, t)
    np.testing.assert_allclose(plain.gradients()["swarm"][0][0], np.mean([p[0] for p in per], axis=0), atol=1e-14)
    weighted.learn(x, t)
    DA, DB = weighted.resonance_engine.horizontal.current_direction
    f = []
    for gA, gB in per:
        a = (np.sum(gA * DA) + np.sum(gB * DB)) / math.sqrt(np.sum(gA * gA) + np.sum(gB * gB))
        f.append(1 + 0.5 * a if a > 0 else 1 - 0.3 * abs(a))
    expect = np.mean([fi * p[0] for fi, p in zip(f, per)], axis=0)
    np.testing.assert_allclose(weighted.gradients()["swarm"][0][0], expect, rtol=1e-10, atol=1e-14)
    assert len(set(np.round(f, 6))) > 1


def test_vertical_resonance_formulas() -> None:
    vr = VerticalResonance()
    f, s = vr.factors(0.6)
    assert s == FAST_TRACK and f == {"context": 1 + 0.3 * 0.6, "agent": 1 + 0.3 * 0.6, "swarm": 1 + 0.3 * 0.6}
    f, s = VerticalResonance(gamma=5.0).factors(0.9)
    assert s == FAST_TRACK and set(f.values()) == {2.0}  # amplification capped
    f, s = vr.factors(-0.5)
    assert s == CONFLICT and f == {"context": 1 - 0.2 * 0.5, "agent": 1 - 0.1 * 0.5, "swarm": 1.0}
    for edge in (0.5, -0.3, 0.0):
        assert vr.factors(edge) == ({"context": 1.0, "agent": 1.0, "swarm": 1.0}, NORMAL)
    g = {"context": np.array([1.0, 0.0]), "agent": np.array([-1.0, 0.1]), "swarm": np.array([1.0, 0.0])}
    swarm_before = g["swarm"]
    a = vr.alignment(g)
    expect = (-1 / math.sqrt(1.01) + -1 / math.sqrt(1.01) + 1.0) / 3
    assert a == pytest.approx(expect)
    g2, sig = vr.apply(dict(g), alignment=-0.8)
    assert sig == CONFLICT
    assert np.array_equal(g2["context"], g["context"] * (1 - 0.2 * 0.8))
    assert np.array_equal(g2["agent"], g["agent"] * (1 - 0.1 * 0.8))
    assert g2["swarm"] is swarm_before  # the slow layer is trusted


@pytest.mark.parametrize("sample", [0, 3])
def test_vertical_alignment_compares_effective_map_changes(sample: int) -> None:
    """The hierarchy's vertical alignment is the mean pairwise cosine of dA @ B + A @ dB
    (summed over the (sampled) agents for the per-agent layers), and its factors reach the
    report."""
    n, d = 7, 5
    rng = np.random.default_rng(3)
    h = tiny(n, d, vertical_sample=sample)
    randomise(h)
    x, t = rng.normal(size=(n, d)), rng.uniform(-1, 1, size=n)
    h.learn(x, t)
    grads = h.gradients()
    agents = range(n) if sample == 0 else [0, 3, 6]
    dW = {}
    for name in ("context", "agent", "swarm"):
        L = h.layers[name]
        gA, gB = grads[name]
        dW[name] = sum(gA[i] @ L.B[i] + L.A[i] @ gB[i] for i in (agents if L.slots > 1 else [0]))
    cos = lambda a, b: float(np.sum(a * b) / math.sqrt(np.sum(a * a) * np.sum(b * b)))
    expect = (cos(dW["context"], dW["agent"]) + cos(dW["agent"], dW["swarm"]) + cos(dW["context"], dW["swarm"])) / 3
    rep = h.system_tick()
    assert rep["alignment"] == pytest.approx(expect, rel=1e-9)
    assert (rep["factors"], rep["signal"]) == h.resonance_engine.vertical.factors(rep["alignment"])


def test_conflict_damps_fast_layers_in_the_update() -> None:
    """Forced CONFLICT: context and agent step with (1 - delta|a|) and (1 - delta/2 |a|) of the
    NORMAL step, swarm with the full one."""
    n, d = 3, 4
    rng = np.random.default_rng(4)
    x, t = rng.normal(size=(n, d)), rng.uniform(-1, 1, size=n)
    runs = {}
    for name, kw in (("normal", {"vertical_threshold": 1.0, "conflict_threshold": 1.0}),
                     ("conflict", {"vertical_threshold": 1.0, "conflict_threshold": -1.0})):
        h = tiny(n, d, screened_decay=0.0, free_decay=0.0, **kw)
        randomise(h)
        before = {k: L.A.copy() for k, L in h.layers.items()}
        h.learn(x, t)
        rep = h.system_tick()
        runs[name] = (rep, {k: h.layers[k].A - before[k] for k in LAYERS})
    rep, step = runs["conflict"]
    assert rep["signal"] == CONFLICT
    a = abs(rep["alignment"])
    base = runs["normal"][1]
    np.testing.assert_allclose(step["context"], base["context"] * (1 - 0.2 * a), rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(step["agent"], base["agent"] * (1 - 0.1 * a), rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(step["swarm"], base["swarm"], rtol=1e-12, atol=1e-15)
    assert np.abs(base["context"]).max() > 0


# ---------------------------------------------------------------------------------------- health
class _Q:
    def __init__(self, depth: int, wait: float, rej: float) -> None:
        self.pending = [None] * depth
        self._wait = wait
        self.rejection_rate = rej

    def average_wait_time(self) -> float:
        return self._wait


class _C:
    def __init__(self, *qs: _Q) -> None:
        self.queues = {str(i): q for i, q in enumerate(qs)}


def test_health_thresholds_at_band_edges() -> None:
    hm = HealthMonitor()
    cases = {0.4999: CRYSTALLIZATION_RISK, 0.5: ACCEPTABLE, 0.8: ACCEPTABLE, 0.8001: HEALTHY, 1.0: HEALTHY,
             1.1999: HEALTHY, 1.2: ACCEPTABLE, 2.0: ACCEPTABLE, 2.0001: AMNESIA_RISK}
    for ratio, status in cases.items():
        assert hm.entropy_status(ratio) == status, ratio
    layer = DynamicLoRALayer(2, 1, 0.5, config=LoRAConfig(entropy_budget=(0.2, 0.6)))
    layer.current_entropy = np.array([0.2])
    assert hm.entropy_ratio(layer) == pytest.approx(0.5) and hm.check_entropy_health(layer) == ACCEPTABLE
    ok = _Q(9, 4.99, 0.0099)
    assert hm.check_bandwidth_health(_C(ok, ok)) == HEALTHY
    for bad in (_Q(10, 0, 0), _Q(0, 5.0, 0), _Q(0, 0, 0.01)):
        assert hm.check_bandwidth_health(_C(ok, bad)) == DEGRADED
    eng = ResonanceEngine(HorizontalResonance(), VerticalResonance())
    assert hm.check_resonance_health(eng) == DEGRADED  # no signal yet

    def engine(mean: float, ft: int, conflicts: int) -> ResonanceEngine:
        e = ResonanceEngine(HorizontalResonance(), VerticalResonance())
        for i in range(100):
            e.record(mean, CONFLICT if i < conflicts else NORMAL)
        e.record_migrations(ft, True)
        e.record_migrations(100 - ft, False)
        return e

    assert hm.check_resonance_health(engine(0.2, 10, 4)) == HEALTHY
    assert hm.check_resonance_health(engine(-0.2, 10, 4)) == HEALTHY
    for args in ((0.1, 10, 4), (0.2, 5, 4), (0.2, 20, 4), (0.2, 10, 5)):
        assert hm.check_resonance_health(engine(*args)) == DEGRADED, args


# ---------------------------------------------------------------------------------------- hierarchy
def _reference_forward(h: LoRAHierarchy, x: np.ndarray) -> np.ndarray:
    """Per agent, one small layer at a time."""
    out = np.empty_like(x)
    W = h.backend.weight
    for i in range(h.n_agents):
        z = x[i] @ W
        for name in LAYERS:
            L = h.layers[name]
            s = 0 if name in SHARED_LAYERS else i
            z = z + (z @ L.A[s]) @ L.B[s]
        out[i] = z
    return out


def test_batched_forward_equals_per_agent_loop() -> None:
    h = LoRAHierarchy(7, 12, seed=3)
    randomise(h, scale=0.2)
    x = np.random.default_rng(0).normal(size=(7, 12))
    np.testing.assert_allclose(h.forward(x, h.snapshot()), _reference_forward(h, x), rtol=0, atol=1e-12)
    s = h.score(x)
    np.testing.assert_allclose(s, np.tanh(_reference_forward(h, x) @ h.head), atol=1e-12)
    assert np.all(np.abs(s) < 1)


def test_fresh_hierarchy_is_the_base() -> None:
    h = LoRAHierarchy(3, 6)
    x = np.random.default_rng(0).normal(size=(3, 6))
    # B starts at zero: the hidden state is the base map, x @ W row by row in the native fixed
    # order (sum_i x[i] W[i, k], i in order: the same bits on any CPU); BLAS's x @ W agrees
    # within rounding
    W = h.backend.weight
    base = np.empty((3, 6))
    for a in range(3):
        for k in range(6):
            acc = float(x[a, 0]) * float(W[0, k])
            for i in range(1, 6):
                acc = acc + float(x[a, i]) * float(W[i, k])
            base[a, k] = acc
    assert np.array_equal(h.forward(x), base)
    np.testing.assert_allclose(h.forward(x), x @ W, rtol=0, atol=1e-14)
    W = h.backend.weight
    np.testing.assert_allclose(W @ W.T, np.eye(6), atol=1e-12)


def _loss(h: LoRAHierarchy, x: np.ndarray, t: np.ndarray, m: np.ndarray) -> float:
    s = h.score(x)
    return float(0.5 * np.sum(((s - t) ** 2)[m]))


def test_gradients_equal_central_finite_differences() -> None:
    n, d = 3, 4
    h = tiny(n, d, horizontal_alpha=0.0, horizontal_beta=0.0)
    randomise(h, scale=0.4)
    rng = np.random.default_rng(9)
    x, t = rng.normal(size=(n, d)), rng.uniform(-0.9, 0.9, size=n)
    m = np.array([True, False, True])
    h.learn(x, t, mask=m)
    grads = h.gradients()
    eps = 1e-6
    checked = 0
    for name, layer in h.layers.items():
        for which in ("A", "B"):
            g = grads[name][0 if which == "A" else 1]
            base = getattr(layer, which).copy()
            for idx in np.ndindex(base.shape):
                p, q = base.copy(), base.copy()
                p[idx] += eps
                q[idx] -= eps
                layer.set_params(**{which: p})
                lp = _loss(h, x, t, m)
                layer.set_params(**{which: q})
                lm = _loss(h, x, t, m)
                layer.set_params(**{which: base})
                fd = (lp - lm) / (2 * eps)
                if name in SHARED_LAYERS:
                    fd /= m.sum()  # shared layers: the mean over learning agents
                assert g[idx] == pytest.approx(fd, rel=1e-6, abs=1e-9), (name, which, idx)
                checked += 1
    assert checked > 100
    # the agent that did not learn got no gradient of its own
    assert not grads["context"][0][1].any() and not grads["agent"][1][1].any()


def test_learning_reduces_loss_on_a_learnable_target() -> None:
    n, d = 32, 16
    h = LoRAHierarchy(n, d, seed=1)
    rng = np.random.default_rng(0)
    w = rng.normal(size=d) / math.sqrt(d)
    losses = []
    for _ in range(300):
        x = rng.normal(size=(n, d))
        snap = h.snapshot()
        losses.append(h.learn(x, np.tanh(2 * x @ w), snap))
        rep = h.system_tick()
        assert rep["learners"] == n
    first, last = np.mean(losses[:30]), np.mean(losses[-30:])
    assert last < 0.3 * first, (first, last)


def test_snapshot_determinism_and_isolation() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 8))
    h = LoRAHierarchy(6, 8, seed=2)
    for _ in range(3):
        h.learn(x, np.tanh(x[:, 0]), h.snapshot())
        h.system_tick()
    snap = h.snapshot()
    a, b = h.forward(x, snap), h.forward(x, snap)
    assert np.array_equal(a, b)
    frozen = {k: (A.copy(), B.copy()) for k, (A, B) in snap.layers.items()}
    with pytest.raises(ValueError):
        snap["context"][0][0, 0, 0] = 1.0  # read-only
    for _ in range(3):
        h.learn(x, -np.tanh(x[:, 1]), h.snapshot())
        h.system_tick()
    h.layers["agent"].consolidate_circuit(circuit(d=8), slot=0, weight=1.0)  # an in-place edit
    h.copy_agent(0, 1)
    for k, (A, B) in snap.layers.items():
        assert np.array_equal(A, frozen[k][0]) and np.array_equal(B, frozen[k][1]), k
    assert np.array_equal(h.forward(x, snap), a)
    assert not np.array_equal(h.forward(x), a)


def _run(h: LoRAHierarchy, ticks: int, seed: int, patterns: int = 3) -> list[dict]:
    """Inputs cycling through a few patterns per agent (so circuits form), some agents idle."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(patterns, h.n_agents, h.dim))
    reports = []
    for i in range(ticks):
        x = base[i % patterns] + 0.01 * rng.normal(size=(h.n_agents, h.dim))
        mask = rng.uniform(size=h.n_agents) < 0.8
        snap = h.snapshot()
        h.learn(x, np.tanh(x[:, 0] - x[:, 1]), snap, mask=mask)
        reports.append(h.system_tick())
    return reports


def _same_state(a: LoRAHierarchy, b: LoRAHierarchy) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert np.array_equal(np.asarray(sa[k]), np.asarray(sb[k])), k


def test_same_state_same_inputs_bit_identical() -> None:
    cfg = LoRAConfig(ranks=(8, 6, 4, 4, 2), min_history=3, autocorr_window=10)
    a, b = (LoRAHierarchy(10, 6, config=cfg, seed=5) for _ in range(2))
    ra, rb = _run(a, 40, seed=1), _run(b, 40, seed=1)
    assert ra == rb
    _same_state(a, b)
    assert sum(sum(r["circuits"].values()) for r in ra) > 0  # the run exercised circuits
    assert sum(m["executed"] + m["emergency"] for r in ra for m in r["migrations"].values()) > 0


def test_state_dict_round_trip(tmp_path) -> None:
    cfg = LoRAConfig(ranks=(8, 6, 4, 4, 2), min_history=3, autocorr_window=10, emergency_threshold=2.0,
                     bandwidth=(0.001, 0.001, 0.001, 0.0001))
    h = LoRAHierarchy(10, 6, config=cfg, seed=5, dtype=np.float32)
    _run(h, 30, seed=2)
    assert any(q.pending for q in h.migration_coordinator.queues.values())  # queues are saved too
    np.savez(tmp_path / "lora.npz", **h.state_dict())
    with np.load(tmp_path / "lora.npz") as f:
        g = LoRAHierarchy.from_state_dict(dict(f))
    assert g.dtype == np.float32 and g.config == cfg and g.tick == h.tick
    _same_state(h, g)
    ra, rb = _run(h, 15, seed=3), _run(g, 15, seed=3)
    assert ra == rb
    _same_state(h, g)
    h.learn(np.zeros((10, 6)), np.zeros(10))
    with pytest.raises(ValueError):
        h.state_dict()


def test_copy_agent() -> None:
    h = LoRAHierarchy(5, 6, seed=4)
    randomise(h)
    rng = np.random.default_rng(0)
    _run(h, 5, seed=7)
    x = rng.normal(size=(5, 6))
    h.learn(x, np.zeros(5))
    before = h.forward(x)
    others = {k: h.layers[k].A[[0, 1, 3, 4]].copy() for k in ("agent", "context")}
    h.copy_agent(2, 4)
    for name in ("agent", "context"):
        L = h.layers[name]
        for arr in (L.A, L.B, L.A_init, L.B_init, L.phase_A, L.act_mid, L.interaction_history,
                    L.screening_threshold):
            assert np.array_equal(arr[4], arr[2])
        assert np.array_equal(L.A[[0, 1, 3]], others[name][:3])
    xx = x.copy()
    xx[4] = x[2]
    after = h.forward(xx)
    assert np.array_equal(after[4], after[2]) and np.array_equal(after[:4], before[:4])
    g = h.gradients()
    assert not g["context"][0][4].any() and g["context"][0][2].any()  # dst's pending gradient dropped
    with pytest.raises(IndexError):
        h.copy_agent(0, 5)


def test_circuit_detector_reports_stable_patterns_once_per_cooldown() -> None:
    layer = DynamicLoRALayer(6, 4, 0.5, slots=3, rng=np.random.default_rng(0))
    det = CircuitDetector(window=20, stability_threshold=0.7, min_history=5, cooldown=8)
    rng = np.random.default_rng(1)
    stable = np.array([1.0, -0.8, 0.05, 0.0])
    found = []
    for tick in range(30):
        sig = np.stack([stable * (1 + 0.05 * rng.normal()), rng.normal(size=4), np.zeros(4)])
        found += [(tick, c) for c in det.observe("context", layer, sig, np.array([True, True, False]), tick)]
    ticks = [t for t, _ in found]
    assert ticks == [5, 13, 21, 29]  # first after min_history, then once per cooldown
    c = found[0][1]
    assert c.slot == 0 and c.nodes == (0, 1) and c.parameter_count == 2 * 2 * 6 and c.autocorr > 0.99
    assert c.activation_signature == 0b0011 | (0b0010 << 4)
    assert np.array_equal(c.a_cols, layer.A[0][:, [0, 1]])
    assert 0.0 <= c.criticality <= c.autocorr
    assert det.last_autocorr["context"][1] < 0.7 and det.last_autocorr["context"][2] == 0.0


def test_circuits_migrate_within_bandwidth_in_a_run() -> None:
    cfg = LoRAConfig(ranks=(8, 6, 4, 4, 2), min_history=3, autocorr_window=10)
    h = LoRAHierarchy(40, 6, config=cfg, seed=5)
    reps = _run(h, 40, seed=4, patterns=1)
    q = h.migration_coordinator.queues["context->agent"]
    assert q.total_requests > 0 and q.completed > 0
    assert all(qq.current_transfer <= qq.bandwidth for qq in h.migration_coordinator.queues.values())
    assert h.layers["agent"].pins.any()  # consolidated components are pinned SCREENED
    assert h.resonance_engine.total_migrations == sum(sum(r["circuits"].values()) for r in reps)
    health = reps[-1]["health"]
    assert set(health["entropy"]) == set(LAYERS) and health["bandwidth"] in (HEALTHY, DEGRADED)


def test_nonfinite_rows_are_left_out_and_counted() -> None:
    h, ref = LoRAHierarchy(4, 5, seed=1), LoRAHierarchy(4, 5, seed=1)
    x = np.random.default_rng(0).normal(size=(4, 5))
    t = np.array([0.5, -0.5, 0.2, 0.1])
    bad = x.copy()
    bad[1, 2] = np.nan
    h.learn(bad, t)
    m = np.array([True, False, True, True])
    ref.learn(x, t, mask=m)
    for name in LAYERS:
        for ga, gb in zip(h.gradients()[name], ref.gradients()[name]):
            assert np.array_equal(ga, gb) and np.isfinite(ga).all()
    assert h.system_tick()["nonfinite"] == 1
    with pytest.raises(ValueError):
        h.learn(np.zeros((3, 5)), np.zeros(3))


def test_float32_tracks_float64() -> None:
    a, b = LoRAHierarchy(6, 8, seed=3), LoRAHierarchy(6, 8, seed=3, dtype=np.float32)
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.normal(size=(6, 8))
        for h in (a, b):
            h.learn(x, np.tanh(x[:, 0]), h.snapshot())
            h.system_tick()
    x = rng.normal(size=(6, 8))
    assert b.score(x).dtype == np.float32
    np.testing.assert_allclose(b.score(x), a.score(x), atol=2e-4)


def test_backend_wraps_a_frozen_callable() -> None:
    d = 5
    W = np.random.default_rng(0).normal(size=(d, d)) / math.sqrt(d)
    calls = []

    def model(x: np.ndarray) -> np.ndarray:  # stands in for a torch/jax model behind numpy
        calls.append(x.shape)
        return np.tanh(x @ W)

    h = LoRAHierarchy(3, d, backend=LoRABackend(fn=model), seed=2)
    x = np.random.default_rng(1).normal(size=(3, d))
    assert np.array_equal(h.forward(x), np.tanh(x @ W))
    for _ in range(5):
        h.learn(x, np.array([0.5, -0.5, 0.0]))
        h.system_tick()
    assert not np.array_equal(h.forward(x), np.tanh(x @ W)) and calls
    assert np.array_equal(h.head, h.backend.head)  # frozen head by default
    with pytest.raises(ValueError):
        LoRAHierarchy.from_state_dict(h.state_dict())
    g = LoRAHierarchy.from_state_dict(h.state_dict(), backend=LoRABackend(fn=model))
    assert np.array_equal(g.forward(x), h.forward(x))
    with pytest.raises(ValueError):
        LoRABackend(weight=W, fn=model)
    with pytest.raises(ValueError):
        LoRAHierarchy(3, d + 1, backend=LoRABackend(weight=W))
    head = np.ones(d) / d
    h2 = LoRAHierarchy(3, d, backend=LoRABackend(weight=W, head=head), config=LoRAConfig(head_learning_rate=0.1))
    h2.learn(x, np.array([0.9, 0.9, 0.9]))
    h2.system_tick()
    assert not np.array_equal(h2.head, head) and np.array_equal(h2.backend.head, head)


def test_update_threads_and_chunking_do_not_change_results() -> None:
    cfg = LoRAConfig(ranks=(8, 6, 4, 4, 2), min_history=3, autocorr_window=10)
    runs = []
    for threads, chunk in ((1, 1 << 17), (2, 16), (3, 40)):
        h = LoRAHierarchy(37, 6, config=msgspec.structs.replace(cfg, threads=threads, chunk_elems=chunk), seed=5)
        runs.append((h, _run(h, 12, seed=8)))
    (h0, r0), *rest = runs
    for h, r in rest:
        assert r == r0
        for name in LAYERS:
            assert np.array_equal(h.layers[name].A, h0.layers[name].A)
            assert np.array_equal(h.layers[name].B, h0.layers[name].B)
            assert np.array_equal(h.layers[name].current_entropy, h0.layers[name].current_entropy)


def _random_layer(dtype, native: bool, slots: int = 9, dim: int = 13, rank: int = 5,
                  ties: bool = False) -> DynamicLoRALayer:
    rng = np.random.default_rng(11)
    layer = DynamicLoRALayer(dim, rank, 0.5, slots=slots, config=LoRAConfig(), rng=rng, dtype=dtype)
    layer.native = native
    layer.set_params(A=rng.normal(size=(slots, dim, rank)), B=rng.normal(size=(slots, rank, dim)),
                     A_init=rng.normal(size=(slots, dim, rank)), B_init=rng.normal(size=(slots, rank, dim)))
    layer.act_in = rng.uniform(0, 2, size=(slots, dim))
    layer.act_mid = rng.uniform(0, 2, size=(slots, rank))
    layer.act_out = rng.uniform(0, 2, size=(slots, dim))
    layer.act_mid[1, 2] = 0.0  # a silent rank line: threshold / 0 = inf, never SCREENED by activity
    layer.act_in[2, :] = 0.0
    layer.screening_threshold = rng.uniform(0.2, 2.0, size=slots)
    layer.pins[3, 1] = 4  # a pinned component: SCREENED whatever its activity
    layer.act_in[4], layer.act_mid[4], layer.act_out[4] = 0.0, 0.0, 0.0  # no activity: uniform
    layer.pins[4, 0] = 9  # ... with one component pinned: entropy = free fraction < 1
    if ties:  # traces on a grid with threshold 1: a[i] == 1 / m[j] and m[j] == 1 / o[k] happen often
        grid = np.array([0.0, 0.5, 1.0, 2.0])
        for name in ("act_in", "act_mid", "act_out"):
            arr = getattr(layer, name)
            setattr(layer, name, grid[rng.integers(0, 4, size=arr.shape)])
        layer.screening_threshold = np.ones(slots)
        layer.act_in[4], layer.act_mid[4], layer.act_out[4] = 0.0, 0.0, 0.0
    return layer


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_native_update_is_the_numpy_reference_bit_for_bit(dtype, ties) -> None:
    rng = np.random.default_rng(12)
    S, d, r = 9, 13, 5
    gA = rng.normal(size=(S, d, r)).astype(dtype)
    terms_A = [(rng.normal(size=(S, d)).astype(dtype), rng.normal(size=(S, r)).astype(dtype)) for _ in range(2)]
    terms_B = [(rng.normal(size=(S, r)).astype(dtype), rng.normal(size=(S, d)).astype(dtype))]
    steps = [None, LayerGradient(A=gA), LayerGradient(terms_A=terms_A, terms_B=terms_B),
             LayerGradient(A=gA, terms_A=terms_A[:1], terms_B=terms_B)]
    strength = rng.uniform(0.5, 1.5, size=S)
    rank = r
    for step in steps:
        native, ref = _random_layer(dtype, True, ties=ties), _random_layer(dtype, False, ties=ties)
        for _ in range(3):  # pins count down, phases and entropy feed the next update
            lr_n, lr_r = native.update(step, strength), ref.update(step, strength)
            assert np.array_equal(lr_n, lr_r)
            assert np.array_equal(native.A, ref.A) and np.array_equal(native.B, ref.B)
            assert np.array_equal(native.phase_A, ref.phase_A) and np.array_equal(native.phase_B, ref.phase_B)
            assert native.phase_A.any() and (~native.phase_A).any()
            np.testing.assert_allclose(native.current_entropy, ref.current_entropy, rtol=1e-12, atol=1e-15)
            assert native.current_entropy[4] == ref.current_entropy[4] == 1.0 - 1 / rank
            np.testing.assert_allclose(native._activity_total, ref._activity_total, rtol=1e-14, atol=0)
            assert np.array_equal(native.pins, ref.pins)
    # a step in another dtype than the layer's takes the reference path (its rounding)
    other = np.float32 if dtype == np.float64 else np.float64
    native, ref = _random_layer(dtype, True), _random_layer(dtype, False)
    native.update(LayerGradient(A=gA.astype(other)), 0.7)
    ref.update(LayerGradient(A=gA.astype(other)), 0.7)
    assert np.array_equal(native.A, ref.A)


def test_native_update_hierarchy_matches_reference_over_ticks() -> None:
    cfg = LoRAConfig(ranks=(8, 6, 4, 4, 2), min_history=3, autocorr_window=10)
    for dtype in (np.float64, np.float32):
        hs = []
        for native in (True, False):
            h = LoRAHierarchy(23, 6, config=cfg, seed=5, dtype=dtype)
            for L in h.layers.values():
                L.native = native
            hs.append((h, _run(h, 15, seed=8)))
        (hn, rn), (hr, rr) = hs
        for name in LAYERS:
            assert np.array_equal(hn.layers[name].A, hr.layers[name].A), (dtype, name)
            assert np.array_equal(hn.layers[name].B, hr.layers[name].B), (dtype, name)


def test_native_update_rejects_bad_arrays_with_typed_errors() -> None:
    from dynamic_core import _core

    S, r, d = 3, 2, 4
    P = np.zeros((S, r, d))

    def mat(P=P, out=None, phase=None, col=None, terms=()):
        return (P, np.zeros_like(P), np.zeros_like(P) if out is None else out,
                np.zeros(P.shape, bool) if phase is None else phase, None, list(terms),
                np.ones((S, d)) if col is None else col, np.zeros((S, d)))

    def call(s1=S, A=None, B=None, entropy=None):
        _core.lora_update(0, s1, 1, np.ones(S), np.ones((S, r)), np.zeros((S, r)), np.ones(S), None, 1e-4, 1e-2,
                          mat() if A is None else A, mat() if B is None else B,
                          np.zeros(S) if entropy is None else entropy, np.zeros(S))

    call()  # well-formed: runs
    with pytest.raises(ValueError):
        call(s1=S + 1)  # slots out of range
    with pytest.raises(ValueError):
        call(A=mat(out=np.zeros((S, r, d + 1))))
    with pytest.raises(TypeError):
        call(A=mat(out=np.zeros((S, r, d), np.float32)))
    with pytest.raises(ValueError):
        call(A=mat(out=P))  # out aliasing P
    with pytest.raises(ValueError):
        call(A=mat(terms=[(np.ones((S, r)), np.ones((S, d + 1)))]))
    with pytest.raises(TypeError):
        call(B=mat(col=np.ones((S, d), np.float32)))
    with pytest.raises(ValueError):
        call(entropy=np.zeros(S + 1))
    with pytest.raises(ValueError):
        call(A=mat()[:7])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_native_stacked_products_in_their_documented_order(dtype) -> None:
    from dynamic_core.learning.lora.layer import r_rows, rd_dot

    rng = np.random.default_rng(21)
    n, r, d = 11, 5, 21  # two blocks of 8 lanes and a tail of 5
    x = rng.normal(size=(n, d)).astype(dtype)
    y = rng.normal(size=(n, r)).astype(dtype)
    M = rng.normal(size=(n, r, d)).astype(dtype)
    # rd_dot: products in 8 lanes summed block by block, a fixed tree, then the tail in order
    P = x[:, None, :] * M
    acc = P[..., 0:8]
    for b in range(1, d // 8):
        acc = acc + P[..., 8 * b:8 * b + 8]
    u = ((acc[..., 0] + acc[..., 1]) + (acc[..., 2] + acc[..., 3])) + ((acc[..., 4] + acc[..., 5])
                                                                        + (acc[..., 6] + acc[..., 7]))
    for i in range(8 * (d // 8), d):
        u = u + P[..., i]
    got = rd_dot(x, M)
    assert got.dtype == dtype and np.array_equal(got, u)
    np.testing.assert_allclose(got, np.einsum("nd,nrd->nr", x, M), rtol=1e-4 if dtype == np.float32 else 1e-12)
    # r_rows: rank by rank
    o = y[:, 0, None] * M[:, 0]
    for j in range(1, r):
        o = o + y[:, j, None] * M[:, j]
    assert np.array_equal(r_rows(y, M), o)
    with pytest.raises(ValueError):
        rd_dot(x[:, :-1], M)


def test_native_passes_split_rows_over_threads_with_the_same_bits() -> None:
    from dynamic_core.learning.lora.layer import r_rows, rd_dot

    rng = np.random.default_rng(23)
    n, r, d = 1000, 8, 64
    x, y = rng.normal(size=(n, d)), rng.normal(size=(n, r))
    M = rng.normal(size=(n, r, d))
    for threads in (2, 3):
        assert np.array_equal(rd_dot(x, M, threads), rd_dot(x, M))
        assert np.array_equal(r_rows(y, M, threads), r_rows(y, M))
    layers = [DynamicLoRALayer(d, r, 0.5, slots=n, config=LoRAConfig(threads=t)) for t in (1, 3)]
    mask = rng.random(n) > 0.3
    for L in layers:
        for m in (None, mask):
            L.record_interaction(x, y, x * 0.5, m)
    for k in ("in", "mid", "out", "rms", "sig", "calls"):
        assert np.array_equal(getattr(layers[0], "_t_" + k), getattr(layers[1], "_t_" + k)), k


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("slots", [1, 9])
@pytest.mark.parametrize("masked", [False, True])
def test_native_record_and_fold_are_the_numpy_formulas(dtype, slots, masked) -> None:
    rng = np.random.default_rng(22)
    n, r, d = 9, 5, 13
    layer = DynamicLoRALayer(d, r, 0.5, slots=slots, rng=rng, dtype=dtype)
    t = {k: np.zeros_like(getattr(layer, "_t_" + k)) for k in ("in", "mid", "out", "rms", "sig")}
    calls = np.zeros(slots, np.int64)
    for _ in range(3):
        h, delta = rng.normal(size=(n, d)).astype(dtype), rng.normal(size=(n, d)).astype(dtype)
        u = rng.normal(size=(n, r)).astype(dtype)
        mask = rng.random(n) > 0.4 if masked else None
        layer.record_interaction(h, u, delta, mask)
        # the oracle: the formulas in numpy
        w = np.ones(n) if mask is None else mask.astype(np.float64)
        rms = np.sqrt(np.mean(np.square(u, dtype=np.float64), axis=1))
        if slots == 1:
            wn = (w / n)[:, None]
            t["in"][0] += np.add.reduce(wn * np.abs(h), axis=0)
            t["mid"][0] += np.add.reduce(wn * np.abs(u), axis=0)
            t["out"][0] += np.add.reduce(wn * np.abs(delta), axis=0)
            t["rms"][0] += float(np.add.reduce(wn[:, 0] * rms))
            t["sig"][0] += np.add.reduce(wn * u, axis=0)
            calls += 1
        else:
            wc = w[:, None]
            t["in"] += wc * np.abs(h)
            t["mid"] += wc * np.abs(u)
            t["out"] += wc * np.abs(delta)
            t["rms"] += w * rms
            t["sig"] += wc * u
            calls += (w > 0)
        for k, v in t.items():
            assert np.array_equal(getattr(layer, "_t_" + k), v), k
        assert np.array_equal(layer._t_calls, calls)
    act = {k: getattr(layer, "act_" + k).copy() for k in ("in", "mid", "out")}
    sig, active = layer.end_interactions()
    c = np.maximum(calls, 1).astype(np.float64)
    k = layer.config.activity_decay
    for name, a in act.items():
        assert np.array_equal(getattr(layer, "act_" + name), k * a + (1.0 - k) * (t[name] / c[:, None])), name
    assert np.array_equal(sig, t["sig"] / c[:, None]) and np.array_equal(active, calls > 0)
    for name in ("in", "mid", "out", "rms", "sig", "calls"):
        assert not getattr(layer, "_t_" + name).any()  # the next tick starts from zero
    if slots > 1:
        with pytest.raises(ValueError):
            layer.record_interaction(h[:-1], u[:-1], delta[:-1])


def test_hierarchy_is_bit_identical_on_any_thread_count_at_a_size_that_splits() -> None:
    """300 agents: enough rows for the native products and recording to split (the small
    hierarchies elsewhere run them on one thread)."""
    cfg = LoRAConfig(ranks=(8, 6, 4, 4, 2), min_history=3, autocorr_window=10)
    runs = []
    for threads in (1, 3):
        h = LoRAHierarchy(300, 8, config=msgspec.structs.replace(cfg, threads=threads), seed=2, dtype=np.float32)
        runs.append((h, _run(h, 8, seed=4)))
    (h0, r0), (h1, r1) = runs
    assert r0 == r1
    x = np.random.default_rng(9).normal(size=(300, 8)).astype(np.float32)
    assert np.array_equal(h0.score(x), h1.score(x))
    for name in LAYERS:
        assert np.array_equal(h0.layers[name].A, h1.layers[name].A), name
        assert np.array_equal(h0.layers[name].act_in, h1.layers[name].act_in), name


def test_snapshots_share_buffers_until_written() -> None:
    h = LoRAHierarchy(4, 6, seed=0)
    x = np.random.default_rng(0).normal(size=(4, 6))
    s1 = h.snapshot()
    assert s1["agent"][0].base is h.layers["agent"].A.base  # no copy taken
    out1 = h.score(x, s1)
    for _ in range(3):  # each tick writes a buffer no live snapshot views
        h.learn(x, np.ones(4), h.snapshot())
        h.system_tick()
        assert s1["agent"][0].base is not h.layers["agent"].A.base
    assert np.array_equal(h.score(x, s1), out1)


_BLAS_PROBE = """
import hashlib, numpy as np
from dynamic_core.learning.lora import LoRAHierarchy
h = LoRAHierarchy(3000, 64, seed=1)
rng = np.random.default_rng(0)
for i in range(3):
    x = rng.normal(size=(3000, 64))
    h.learn(x, np.tanh(x[:, 0]), h.snapshot())
    h.system_tick()
d = hashlib.sha256(h.score(x).tobytes())
for L in h.layers.values():
    d.update(L.A.tobytes() + L.B.tobytes())
print(d.hexdigest())
"""


@pytest.mark.slow
def test_results_do_not_depend_on_blas_threads() -> None:
    """OpenBLAS splits long reductions (X.T @ Y over 3000 agents) differently on 2 threads; the
    hierarchy's reductions over agents must not notice."""
    out = []
    for threads in ("1", "2"):
        env = dict(os.environ, OPENBLAS_NUM_THREADS=threads, OMP_NUM_THREADS=threads)
        r = subprocess.run([sys.executable, "-c", _BLAS_PROBE], env=env, capture_output=True, text=True, timeout=300,
                           check=False)
        assert r.returncode == 0, r.stderr
        out.append(r.stdout.strip())
    assert out[0] == out[1]


def test_results_do_not_depend_on_the_native_instruction_set() -> None:
    """The native kernels follow the engine's instruction-set level (x86-64-v3 where the CPU has
    it); the baseline build must give the same bits (float32 and float64). Without it both runs
    take the baseline."""
    import hashlib

    from dynamic_core import _core

    def probe(dtype) -> str:
        h = LoRAHierarchy(300, 64, seed=1, dtype=dtype)
        rng = np.random.default_rng(0)
        for _ in range(3):
            x = rng.normal(size=(300, 64))
            h.learn(x, np.tanh(x[:, 0]), h.snapshot())
            h.system_tick()
        d = hashlib.sha256(h.score(x).tobytes())
        for L in h.layers.values():
            d.update(L.A.tobytes() + L.B.tobytes())
        return d.hexdigest()

    best = _core.kernel_isa()
    out = []
    try:
        for dt in (np.float64, np.float32):
            runs = []
            for level in (best, 0):
                assert _core.set_kernel_isa(level) == level
                runs.append(probe(dt))
            assert runs[0] == runs[1] and len(runs[0]) == 64, dt
            out.append(runs[0])
    finally:
        _core.set_kernel_isa(best)
    assert out[0] != out[1]


# ---------------------------------------------------------------- row determinism
def _lane_dot(x: list, y: list, zero=0.0):
    """The native dot product's order as a plain loop: 8 lanes over whole blocks of 8, the
    tree ((0+1)+(2+3))+((4+5)+(6+7)), then the tail in order. Python floats are float64; for
    float32 pass np.float32 values (each operation rounds to float32, as the kernel's)."""
    acc = [zero] * 8
    d = len(x)
    full = d - d % 8
    for i in range(0, full, 8):
        for lane in range(8):
            acc[lane] = acc[lane] + x[i + lane] * y[i + lane]
    s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
    for i in range(full, d):
        s = s + x[i] * y[i]
    return s


@contextlib.contextmanager
def _baseline_kernels():
    """The native kernels' portable (baseline) build for the duration."""
    from dynamic_core import _core

    best = _core.kernel_isa()
    try:
        assert _core.set_kernel_isa(0) == 0
        yield
    finally:
        _core.set_kernel_isa(best)


def _scalars(a: np.ndarray) -> list:
    return [a.dtype.type(v) for v in a.ravel()] if a.dtype == np.float32 else [float(v) for v in a.ravel()]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n,r,d", [(5, 3, 21), (3, 9, 8), (4, 1, 1), (2, 6, 7), (6, 5, 64), (0, 3, 5)])
def test_native_shared_products_match_a_plain_python_oracle(dtype, n, r, d) -> None:
    """One (rank, dim) matrix for every row: each row's products in the documented order, the
    same bits as the stacked form with the matrix repeated, on any thread count."""
    from dynamic_core.learning.lora.layer import r_rows, rd_dot, row_dot

    rng = np.random.default_rng(n * 100 + r * 10 + d)
    x = rng.normal(size=(n, d)).astype(dtype)
    y = rng.normal(size=(n, r)).astype(dtype)
    M = rng.normal(size=(r, d)).astype(dtype)
    zero = dtype(0.0) if dtype == np.float32 else 0.0
    Ms = [_scalars(M[j]) for j in range(r)]
    want_u = np.array([[_lane_dot(_scalars(x[a]), Ms[j], zero) for j in range(r)] for a in range(n)],
                      dtype).reshape(n, r)
    want_o = np.empty((n, d), dtype)
    for a in range(n):  # rank by rank, from the first product
        ya = _scalars(y[a])
        for i in range(d):
            o = ya[0] * Ms[0][i]
            for j in range(1, r):
                o = o + ya[j] * Ms[j][i]
            want_o[a, i] = o
    got_u, got_o = rd_dot(x, M), r_rows(y, M)
    assert got_u.dtype == dtype and got_o.dtype == dtype
    assert np.array_equal(got_u, want_u) and np.array_equal(got_o, want_o)
    with _baseline_kernels():  # the portable build: the same bits
        assert np.array_equal(rd_dot(x, M), want_u) and np.array_equal(r_rows(y, M), want_o)
    stacked = np.ascontiguousarray(np.broadcast_to(M, (n, r, d)))
    assert np.array_equal(rd_dot(x, stacked), got_u) and np.array_equal(r_rows(y, stacked), got_o)
    assert np.array_equal(row_dot(x, x), np.array([_lane_dot(_scalars(v), _scalars(v), zero) for v in x], dtype))
    tol = 1e-4 if dtype == np.float32 else 1e-12
    if n:
        np.testing.assert_allclose(got_u, x @ M.T, rtol=tol, atol=tol)
        np.testing.assert_allclose(got_o, y @ M, rtol=tol, atol=tol)
    big_x = rng.normal(size=(300, d)).astype(dtype)
    big_y = rng.normal(size=(300, r)).astype(dtype)
    for threads in (2, 3):
        assert np.array_equal(rd_dot(big_x, M, threads), rd_dot(big_x, M))
        assert np.array_equal(r_rows(big_y, M, threads), r_rows(big_y, M))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n", [0, 1, 31, 32, 33, 70, 100])
def test_native_xty_matches_a_plain_python_oracle(dtype, n) -> None:
    """X.T @ Y over the agent axis: blocks of 32 rows, each summed row by row from its first
    product, the block sums added in order to a zeroed sum; the same bits on any thread count."""
    from dynamic_core.learning.lora.layer import xty

    rng = np.random.default_rng(n)
    p, q = 5, 9
    X = rng.normal(size=(n, p)).astype(dtype)
    Y = rng.normal(size=(n, q)).astype(dtype)
    Xs, Ys = [_scalars(row) for row in X], [_scalars(row) for row in Y]
    zero = dtype(0.0) if dtype == np.float32 else 0.0
    want = np.empty((p, q), dtype)
    for i in range(p):
        for k in range(q):
            total = zero
            for b in range(0, n, 32):
                part = Xs[b][i] * Ys[b][k]
                for a in range(b + 1, min(n, b + 32)):
                    part = part + Xs[a][i] * Ys[a][k]
                total = total + part
            want[i, k] = total
    got = xty(X, Y)
    assert got.dtype == dtype and np.array_equal(got, want)
    with _baseline_kernels():
        assert np.array_equal(xty(X, Y), want)
    tol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, X.T @ Y, rtol=tol, atol=tol * max(1, n))
    for threads in (2, 3):
        assert np.array_equal(xty(X, Y, threads), got)
    wide = rng.normal(size=(2000, 64)).astype(dtype)
    assert np.array_equal(xty(wide, wide, 2), xty(wide, wide))


def _population(h: LoRAHierarchy, order: np.ndarray) -> LoRAHierarchy:
    """A hierarchy whose agent k is ``h``'s agent ``order[k]`` (every per-agent array: layers,
    history, traces, detector), with ``h``'s shared layers, base and head: a permutation, or
    the same agents (some repeated) in a larger population."""
    sd = h.state_dict()
    n = h.n_agents
    for key, v in sd.items():
        if key.startswith(("layer.agent.", "layer.context.", "detector.")) and np.ndim(v) >= 1 and v.shape[0] == n:
            sd[key] = v[order]
    sd["n_agents"] = np.array(len(order))
    return LoRAHierarchy.from_state_dict(sd)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_a_rows_bits_do_not_depend_on_its_position_or_the_population(dtype) -> None:
    """Forward, score and a learning pass's per-agent gradients and updates, row by row: the
    same bits when the agents are permuted or sit in a larger population (base map, shared
    layers, head and backward products all run in the native fixed-order row products; a BLAS
    GEMM's row bits depend on where the row sits and on the CPU's kernel)."""
    n, d = 37, 13  # a row of 13: one block of 8 lanes and a tail
    cfg = LoRAConfig(ranks=(9, 6, 5, 3, 2), vertical_threshold=2.0, conflict_threshold=2.0,
                     autocorr_window=10, min_history=10)  # NORMAL factors (1.0), no circuits yet
    h = LoRAHierarchy(n, d, config=cfg, seed=5, dtype=dtype)
    randomise(h)
    _run(h, 3, seed=2)
    rng = np.random.default_rng(9)
    x = rng.normal(size=(n, d))
    t = np.tanh(x[:, 0] - x[:, 2])
    perm = rng.permutation(n)
    grown = np.concatenate([rng.permutation(n), rng.integers(0, n, 40)])  # 77 rows: other blocks and tails
    pops = [_population(h, order) for order in (perm, grown)]  # before h learns
    ref_f, ref_s = h.forward(x), h.score(x)
    h.learn(x, t)
    ref_g = h.gradients()
    h.system_tick()
    tol = 1e-4 if dtype == np.float32 else 1e-12
    for order, h2 in zip((perm, grown), pops):
        xo = x[order]
        assert np.array_equal(h2.forward(xo), ref_f[order])
        assert np.array_equal(h2.score(xo), ref_s[order])
        h2.learn(xo, t[order])
        g2 = h2.gradients()
        for name in ("agent", "context"):  # each agent's own: its row's bits
            for k in (0, 1):
                assert np.array_equal(g2[name][k], ref_g[name][k][order]), name
        if order is perm:  # the shared layers' gradients sum over agents: in another order, close
            for name in ("foundation", "domain", "swarm"):
                for k in (0, 1):
                    np.testing.assert_allclose(g2[name][k], ref_g[name][k], rtol=tol, atol=tol)
        h2.system_tick()
        for name in ("agent", "context"):  # the tick's per-agent updates: their rows' bits
            a, b = h.layers[name], h2.layers[name]
            assert np.array_equal(b.A, a.A[order]) and np.array_equal(b.B, a.B[order]), name
            assert np.array_equal(b.phase_A, a.phase_A[order]), name


def test_base_weight_is_lapacks_haar_draw_in_a_fixed_order() -> None:
    # orthonormal_columns against LAPACK's QR with the sign fix (the draw the backend made before:
    # the same matrix within rounding), orthogonal to working precision, and refusing a rank-deficient g
    from dynamic_core.learning.lora.backend import orthonormal_columns

    for d in (1, 3, 16, 64):
        g = np.random.default_rng(d).normal(size=(d, d))
        q = orthonormal_columns(g)
        Q, R = np.linalg.qr(g)
        assert np.allclose(q, Q * np.sign(np.diag(R)), rtol=0, atol=1e-12)
        assert np.abs(q.T @ q - np.eye(d)).max() < 1e-14
    with pytest.raises(ValueError, match="linearly dependent"):
        orthonormal_columns(np.ones((3, 3)))
