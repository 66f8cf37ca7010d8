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
    before = eng.agents().tobytes()
    with pytest.raises(ValueError, match="'GOOG' is given more than once"):  # by name and by id
        eng.set_dsi({"GOOG": 0.5, dc.instruments.id("GOOG"): -0.5})
    assert eng.agents().tobytes() == before


def test_signals_carry_their_streams_dsi_evidence(sim_bars):
    # A signal carries the DSI evidence its bar's agents read (set_dsi, per instrument) and the
    # SIGNAL_DSI flag once evidence was set for its stream; other streams stay unflagged. The
    # evidence travels on through AISignal, the feed's batch encoding and the plans.
    names = ("EURUSD", "GBPUSD", "USDJPY")
    pop = dc.Population.random(150, instruments=list(names), seed=4, dsi_share=0.3)
    bars = sim_bars[np.isin(sim_bars["instrument"], [dc.instruments.id(n) for n in names])][:300]
    runs = []
    for threads in (1, 2):
        with dc.Engine(pop, threads=threads, cores_per_sm=32) as eng:
            s1 = eng.run(bars[:100])
            assert eng.set_dsi({"EURUSD": 0.55, "GBPUSD": 0.0}) == 2
            s2 = eng.run(bars[100:200])
            eng.set_dsi({"EURUSD": -0.25})
            s3 = eng.run(bars[200:])
        runs.append((s1, s2, s3))
    for a, b in zip(runs[0], runs[1]):
        assert a.tobytes() == b.tobytes()  # any thread count
    s1, s2, s3 = runs[0]
    assert (s1["flags"] == 0).all() and (s1["dsi"] == 0.0).all()
    eur, gbp, jpy = (dc.instruments.id(n) for n in names)
    for sig, want_eur in ((s2, 0.55), (s3, -0.25)):
        e, g, j = (sig["instrument"] == i for i in (eur, gbp, jpy))
        assert e.any() and g.any() and j.any()
        assert (sig["dsi"][e] == want_eur).all() and (sig["flags"][e] == dc.SIGNAL_DSI).all()
        assert (sig["dsi"][g] == 0.0).all() and (sig["flags"][g] == dc.SIGNAL_DSI).all()  # set, neutral
        assert (sig["dsi"][j] == 0.0).all() and (sig["flags"][j] == 0).all()  # never set
    objs = dc.payloads.signals_from_records(s3)
    assert [o.dsi for o in objs] == s3["dsi"].tolist()
    assert [o.has_dsi for o in objs] == ((s3["flags"] & dc.SIGNAL_DSI) != 0).tolist()
    one = dc.payloads.signal_from_record(s3[0])
    assert one == objs[0]
    k = int(np.flatnonzero(s3["instrument"] == eur)[0])
    o = objs[k]
    assert o.dsi_validation == float(np.sign(o.score)) * -0.25
    batch = dc.payloads.Codec(dc.payloads.FeedMessage).decode(
        dc.payloads.encode_signal_batch(1, 0, s3[s3["instrument"] == eur]))
    assert all(x.dsi == -0.25 and x.has_dsi for x in batch.signals)
    assert (dc.payloads.signals_to_records(objs) == s3).all()
    # a plan made from a signal carries direction x its evidence
    from dynamic_core.decision import make_plan
    rec = s3[k]
    plan = make_plan(rec, entry=1.1, atr=0.001, equity=100_000.0,
                     config=dc.decision.PlanConfig(min_action=1, min_score=1e-9))
    assert plan is not None and plan.evidence["dsi"] == plan.direction * -0.25
    j0 = s3[s3["instrument"] == jpy][0]
    plan = make_plan(j0, entry=150.0, atr=0.2, equity=100_000.0,
                     config=dc.decision.PlanConfig(min_action=1, min_score=1e-9))
    assert plan is None or "dsi" not in plan.evidence


def test_consensus_is_fitness_weighted_mean_of_warm_agents(sim_bars):
    pop = dc.Population.random(300, instruments=["EURUSD", "GBPUSD"], timeframes=["H1"], seed=2)
    eng = dc.Engine(pop, cores_per_sm=64)
    sig = eng.run(sim_bars)
    a = eng.agents()
    for inst in ("EURUSD", "GBPUSD"):
        iid = dc.instruments.id(inst)
        last = sig[sig["instrument"] == iid][-1]
        sel = (a["instrument"] == iid) & (a["warm"] == 1) & (a["quarantined"] == 0)
        w = np.maximum(a["equity"][sel], 0) * np.maximum(1 - a["max_drawdown"][sel], 0)
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



def test_an_agent_that_lost_more_than_everything_weighs_nothing():
    """A short through a rise of more than 100% in one bar leaves equity below 0; a second squeeze
    brings some of those agents back above 0 with a drawdown above 1. Neither kind may weigh
    less than 0 (they voted inverted): weight = max(equity, 0) x max(1 - max_drawdown, 0)."""
    n = 211
    c = 100.0 * np.exp(np.cumsum(np.random.default_rng(4).normal(0, 0.002, n)))
    c[200:] *= 2.5
    c[203:] *= 4.0
    bars = np.zeros(n, dtype=dc.BAR_DTYPE)
    bars["ts"] = 1_704_067_200_000_000_000 + np.arange(n, dtype=np.int64) * 3_600_000_000_000
    bars["instrument"], bars["timeframe"], bars["volume"] = dc.instruments.id("SQUEEZE"), 3600, 1.0
    bars["open"] = np.concatenate([[c[0]], c[:-1]])
    bars["close"] = c
    bars["high"], bars["low"] = np.maximum(bars["open"], c) * 1.0001, np.minimum(bars["open"], c) * 0.9999
    for threads in (1, 2):
        with dc.Engine(dc.Population.random(2000, instruments=("SQUEEZE",), seed=2), threads=threads) as eng:
            eng.run(bars[:210])
            last = eng.run(bars[210:])[0]
            a = eng.agents()
        assert ((a["max_drawdown"] > 1) & (a["equity"] > 0)).sum() > 100 and (a["equity"] < 0).sum() > 100
        w = np.maximum(a["equity"], 0) * np.maximum(1 - a["max_drawdown"], 0)
        np.testing.assert_array_equal(a["fitness"], w)
        sel = (a["warm"] == 1) & (a["quarantined"] == 0)
        assert last["n_agents"] == sel.sum()
        np.testing.assert_allclose(last["score"], (w[sel] * a["score"][sel]).sum() / w[sel].sum(), rtol=1e-12)


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
    # Equity compounded past the largest double quarantines the agent: a trend follower riding a
    # price that swings by x1.5 a bar between 1e-15 and 1e15 (the prices a bar may carry) gains
    # ~1e24 a leg and overflows after ~12 legs. (One bar of 1e-300 used to do it; such a price
    # is now refused.)
    iid = dc.instruments.id("QTEST")
    pop = dc.Population.grid("QTEST", 60, fast=2, slow=3, atr_period=1, mode="long_short")
    leg = np.concatenate([np.arange(-85, 85), np.arange(85, -85, -1)])
    px = 1.5 ** np.concatenate([np.arange(0, -85, -1)] + [leg] * 7).astype(float)
    bars = dc.market.empty(len(px))
    bars["instrument"] = iid
    bars["timeframe"] = 60
    bars["ts"] = np.arange(len(px)) * 60_000_000_000
    for k in ("open", "high", "low", "close"):
        bars[k] = px
    eng = dc.Engine(pop)
    sig = eng.run(bars)
    assert len(sig) == len(px) and eng.stats()["rejected"] == 0
    a = eng.agents()[0]
    assert eng.stats()["quarantined"] == 1 and a["quarantined"] == 1
    assert np.isfinite(a["equity"])
    assert sig[-1]["n_agents"] == 0  # excluded from consensus


def test_a_unanimous_signal_has_no_dispersion_and_full_confidence():
    # equal scores: sum_s2 / n - mean^2 left ~1e-17, and its square root a dispersion of ~1e-8
    # (confidence 0.99999999) that no agent's score had; the one-pass variance's rounding is 0
    import backtesting.test as bt

    bars = dc.market.from_pandas(bt.EURUSD.iloc[:300], "EURUSD")
    rec = np.repeat(dc.Population.grid("EURUSD", "H1").records, 7)
    rec["agent_id"] = np.arange(7)
    sig = dc.Engine(dc.Population.from_records(rec)).run(bars)
    live = sig[sig["n_agents"] == 7]
    assert len(live) > 200
    assert (live["dispersion"] == 0.0).all(), live["dispersion"].max()
    assert (live["confidence"] == live["agreement"]).all()


def test_weights_past_1e300_are_refused_and_up_to_it_never_quarantine():
    # w * f summed past DBL_MAX gave inf, soft(inf) = inf / inf = NaN, and a valid agent was
    # quarantined (frozen, out of consensus)
    import backtesting.test as bt

    rec = dc.Population.grid("EURUSD", "H1", w_trend=0.0, w_rsi=1e300, w_bb=1e300).records.copy()
    bars = dc.market.from_pandas(bt.EURUSD, "EURUSD")
    eng = dc.Engine(dc.Population.from_records(rec))
    eng.run(bars)
    a = eng.agents()
    assert a["quarantined"][0] == 0 and a["trades"][0] > 100 and eng.stats()["quarantined"] == 0
    rec["w_rsi"] = 1.7e308
    with pytest.raises(dc.errors.InvalidGenome, match="w_rsi beyond \\+-1e\\+300"):
        dc.Population.from_records(rec)
