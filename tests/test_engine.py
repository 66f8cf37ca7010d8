"""Engine semantics against the plain-Python reference, consensus, determinism, warps and SMs."""

from __future__ import annotations

import numpy as np
import pytest

import dynamic_core as dc

from .reference import run_agent

FIELDS_EXACT = ["position", "trades", "wins", "n_returns", "action"]
FIELDS_CLOSE = ["equity", "max_drawdown", "peak", "score", "ret_mean"]


def compare_with_reference(pop: dc.Population, bars: np.ndarray, **engine_kw) -> None:
    eng = dc.Engine(pop, **engine_kw)
    signals = eng.run(bars)
    assert len(signals) == len(bars)
    agents = eng.agents()
    o, h, l, c = (bars[k] for k in ("open", "high", "low", "close"))
    for i, g in enumerate(pop.records):
        ref = run_agent(g, o, h, l, c)
        a = agents[i]
        assert a["agent_id"] == g["agent_id"]
        for f in FIELDS_EXACT:
            assert a[f] == ref[f], (i, f, a[f], ref[f])
        for f in FIELDS_CLOSE:
            np.testing.assert_allclose(a[f], ref[f], rtol=1e-12, atol=1e-15, err_msg=f"agent {i} {f}")


def test_ema_crossover_grid_equals_reference(eurusd):
    pop = dc.Population.grid("EURUSD", "H1", fast=[3, 5, 8, 13, 21], slow=[20, 34, 55, 89],
                             mode=["long_only", "long_short"], cost_bps=[0.0, 1.5])
    assert len(pop) == 5 * 4 * 2 * 2
    compare_with_reference(pop, eurusd)


def test_full_blend_random_population_equals_reference(goog):
    pop = dc.Population.random(70, instruments=["GOOG"], timeframes=[86400], seed=5)
    compare_with_reference(pop, goog, cores_per_sm=32)


def test_entry_threshold_holds_position_inside_band(eurusd):
    pop = dc.Population.grid("EURUSD", "H1", fast=5, slow=30, entry=[0.0, 0.1, 0.3, 0.45], w_trend=[1.0, 2.5])
    compare_with_reference(pop, eurusd[:1500])


def test_dsi_readers_add_their_weighted_evidence_to_the_blend(goog):
    # half the agents read DSI; the evidence changes between updates (journal-style batches)
    pop = dc.Population.random(64, instruments=["GOOG"], timeframes=[86400], seed=7, dsi_share=0.5)
    g = pop.records
    assert 0 < (g["w_dsi"] != 0).sum() < len(g)
    cuts = [0, 300, 700, 1100, len(goog)]
    levels = [0.0, 0.8, -0.35, 1.0]
    ev = np.zeros(len(goog))
    eng = dc.Engine(pop, cores_per_sm=32)
    for a, b, x in zip(cuts, cuts[1:], levels):
        assert eng.set_dsi({"GOOG": x, "NOT-TRADED": 0.5}) == 1  # the unknown name is skipped
        ev[a:b] = x
        eng.run(goog[a:b])
    agents = eng.agents()
    o, h, l, c = (goog[k] for k in ("open", "high", "low", "close"))
    moved = 0
    for i, gi in enumerate(g):
        ref = run_agent(gi, o, h, l, c, dsi=ev)
        for f in FIELDS_EXACT:
            assert agents[i][f] == ref[f], (i, f)
        for f in FIELDS_CLOSE:
            np.testing.assert_allclose(agents[i][f], ref[f], rtol=1e-12, atol=1e-15, err_msg=f"agent {i} {f}")
        if gi["w_dsi"] != 0:
            moved += run_agent(gi, o, h, l, c)["trades"] != ref["trades"]
    assert moved > 0  # the evidence changed what readers did
    with pytest.raises(ValueError, match="finite and in"):
        eng.set_dsi({"GOOG": 1.5})
    with pytest.raises(ValueError, match="finite and in"):
        eng.set_dsi({"GOOG": float("nan")})


def test_consensus_is_fitness_weighted_mean_of_warm_agents(sim_bars):
    pop = dc.Population.random(300, instruments=["EURUSD", "GBPUSD"], timeframes=["H1"], seed=2)
    eng = dc.Engine(pop, cores_per_sm=64)
    sig = eng.run(sim_bars)
    a = eng.agents()
    for inst in ("EURUSD", "GBPUSD"):
        iid = dc.instruments.id(inst)
        last = sig[sig["instrument"] == iid][-1]
        sel = (a["instrument"] == iid) & (a["warm"] == 1) & (a["quarantined"] == 0)
        w = np.maximum(a["equity"][sel], 0) * (1 - a["max_drawdown"][sel])
        s = a["score"][sel]
        assert last["n_agents"] == sel.sum()
        np.testing.assert_allclose(last["score"], (w * s).sum() / w.sum(), rtol=1e-12)
        np.testing.assert_allclose(last["dispersion"], s.std(), rtol=1e-9)
        acts = dc.score_to_action(s)
        np.testing.assert_array_equal(last["votes"], [(acts == k).sum() for k in range(-2, 3)])
        assert last["action"] == dc.score_to_action(last["score"])
        side = np.sign(last["action"])
        agree = (np.sign(acts) == side).mean()
        np.testing.assert_allclose(last["agreement"], agree, rtol=1e-12)
        np.testing.assert_allclose(last["confidence"], agree * (1 - s.std()), rtol=1e-9)
        assert last["population_hash"] == pop.hash


def test_signals_carry_bar_identity_and_sequence(sim_bars):
    pop = dc.Population.random(100, instruments=["EURUSD", "GBPUSD", "USDJPY", "XAUUSD"], timeframes=["H1"], seed=1)
    sig = dc.Engine(pop).run(sim_bars)
    np.testing.assert_array_equal(sig["ts"], sim_bars["ts"])
    np.testing.assert_array_equal(sig["instrument"], sim_bars["instrument"])
    np.testing.assert_array_equal(sig["seq"], np.arange(1, len(sim_bars) + 1))


def test_determinism_runs_and_chunking(sim_bars):
    pop = dc.Population.random(2000, instruments=["EURUSD", "GBPUSD", "USDJPY", "XAUUSD"], timeframes=["H1"], seed=9)
    e1, e2, e3 = dc.Engine(pop), dc.Engine(pop), dc.Engine(pop, block_bars=37)
    s1 = e1.run(sim_bars)
    s2 = e2.run(sim_bars)
    s3 = np.concatenate([e3.run(sim_bars[i:i + 101]) for i in range(0, len(sim_bars), 101)])
    assert s1.tobytes() == s2.tobytes() == s3.tobytes()
    assert e1.agents().tobytes() == e2.agents().tobytes() == e3.agents().tobytes()


def test_agent_state_independent_of_sm_size(sim_bars):
    pop = dc.Population.random(500, instruments=["EURUSD", "GBPUSD"], timeframes=["H1"], seed=4)
    states = [dc.Engine(pop, cores_per_sm=c) for c in (32, 64, 96, 128)]
    sigs = [e.run(sim_bars) for e in states]
    ref = states[0].agents().tobytes()
    assert all(e.agents().tobytes() == ref for e in states)
    for s in sigs[1:]:
        np.testing.assert_array_equal(s["votes"], sigs[0]["votes"])
        np.testing.assert_allclose(s["score"], sigs[0]["score"], rtol=1e-12, atol=1e-15)


def test_warps_and_sms_layout():
    pop = dc.Population.grid(["EURUSD", "GBPUSD"], "H1", fast=list(range(2, 52)), slow=[60, 90, 120])  # 150 each
    eng = dc.Engine(pop, cores_per_sm=64)
    lay = eng.layout()
    assert lay["n_streams"] == 2
    # 150 agents -> 5 warps (last masked: 22 lanes) -> SMs of 2, 2, 1 warps per stream
    np.testing.assert_array_equal(lay["sm_warps"], [2, 2, 1, 2, 2, 1])
    np.testing.assert_array_equal(lay["sm_active"], [64, 64, 22, 64, 64, 22])
    assert lay["n_warps"] == 10 and lay["n_lanes"] == 320
    # the bank holds each distinct (indicator, period) once: the EMAs of the first SM's 64 lanes,
    # plus one ATR (all share atr_period); its features are the distinct (fast, slow, atr) triples
    first = pop.records[pop.records["instrument"] == dc.instruments.id("EURUSD")][:64]
    emas = len(set(first["fast"]) | set(first["slow"]))
    assert lay["sm_bank_indicators"][0] == emas + 1
    assert lay["sm_bank_features"][0] == len(set(zip(first["fast"], first["slow"])))
    stats = eng.stats()
    assert stats["warp_occupancy"] == pytest.approx(300 / 320)


def test_agents_in_population_order_for_interleaved_population(sim_bars):
    rec = dc.Population.random(64, instruments=["EURUSD", "GBPUSD"], timeframes=["H1"], seed=3).records.copy()
    rec = rec[::-1].copy()  # agent ids descending, instruments interleaved
    pop = dc.Population.from_records(rec)
    eng = dc.Engine(pop)
    eng.run(sim_bars)
    a = eng.agents()
    np.testing.assert_array_equal(a["agent_id"], rec["agent_id"])
    np.testing.assert_array_equal(a["instrument"], rec["instrument"])


def test_engine_arguments():
    pop = dc.Population.grid("EURUSD", "H1", fast=[5])
    with pytest.raises(ValueError, match="cores_per_sm"):
        dc.Engine(pop, cores_per_sm=48)
    with pytest.raises(TypeError, match="Population"):
        dc.Engine(pop.records)
    assert "1 agents" in repr(dc.Engine(pop))


def test_quarantine_of_non_finite_state():
    # A price ratio that overflows equity to inf quarantines the agents holding a position.
    iid = dc.instruments.id("QTEST")
    pop = dc.Population.grid("QTEST", 60, fast=2, slow=3, atr_period=1, mode="long_short")
    bars = dc.market.empty(8)
    bars["instrument"] = iid
    bars["timeframe"] = 60
    bars["ts"] = np.arange(8) * 60_000_000_000
    px = np.array([1.0, 1.1, 1.2, 1.3, 1.4, 1e-300, 1e300, 1e300])
    for k in ("open", "high", "low", "close"):
        bars[k] = px
    eng = dc.Engine(pop)
    sig = eng.run(bars)
    assert len(sig) == 8
    a = eng.agents()[0]
    assert eng.stats()["quarantined"] == 1 and a["quarantined"] == 1
    assert np.isfinite(a["equity"])
    assert sig[-1]["n_agents"] == 0  # excluded from consensus
