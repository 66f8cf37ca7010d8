"""External-score agents (genome kind 1): lanes whose score is set from outside the engine."""

from __future__ import annotations

import dynamic_core as dc
import numpy as np
import pytest
from dynamic_core.decision import time_steps

NAMES = ["EURUSD", "GBPUSD"]


@pytest.fixture(scope="module")
def market():
    return dc.sim.MarketSimulator(NAMES, seed=21).bars(400)


def blend_population(n=64, seed=2):
    return dc.Population.random(n, instruments=NAMES, timeframes=["H1"], seed=seed)


def as_external(rec, keep_weights=False):
    """External twins of ``rec``. Their weights are not used for the score; they only set the
    warm-up (the lookback of the indicators they name), so without them a twin is warm at once."""
    ext = rec.copy()
    ext["kind"] = 1
    ext["agent_id"] += 10_000
    if not keep_weights:
        for w in ("w_trend", "w_rsi", "w_macd", "w_bb", "w_mom"):
            ext[w] = 0.0
    return ext


def steps(bars):
    return time_steps(bars)


def test_external_agents_behave_like_the_blend_agents_whose_scores_they_are_given(market):
    # The oracle: an indicator-blend agent's own scores, fed bar by bar to an external-score twin
    # with the same entry, mode, cost and warm-up, give the twin exactly the same state: positions,
    # actions, equity, drawdown, trades, fitness, and the same fused signals.
    pop = blend_population()
    twin = as_external(pop.records, keep_weights=True)
    with dc.Engine(pop, threads=1) as a, dc.Engine(dc.Population.from_records(twin), threads=1) as b:
        for part in steps(market):
            sa = a.run(part)
            b.set_external_scores(twin["agent_id"], a.agents()["score"])
            sb = b.run(part)
            assert np.array_equal(sa[["score", "confidence", "agreement", "dispersion", "action", "votes"]],
                                  sb[["score", "confidence", "agreement", "dispersion", "action", "votes"]])
        ra, rb = a.agents(), b.agents()
    assert (rb["trades"] > 0).any() and (rb["warm"] == 1).all()
    for f in ("score", "position", "action", "warm", "trades", "wins", "equity", "peak", "max_drawdown", "fitness"):
        assert np.array_equal(ra[f], rb[f]), f


def test_external_scores_drive_positions_and_consensus(market):
    rec = as_external(blend_population(32).records)
    rec["entry"] = 0.1
    pop = dc.Population.from_records(rec)
    with dc.Engine(pop, threads=1) as eng:
        first = next(iter(steps(market)))
        eng.run(first)
        ids = rec["agent_id"]
        scores = np.where(np.arange(len(ids)) % 2 == 0, 0.7, -0.3)
        eng.set_external_scores(ids, scores)
        sig = eng.run(list(steps(market))[1])
        ag = eng.agents()
    assert np.array_equal(ag["score"], scores)
    assert np.array_equal(ag["position"], np.where(scores > 0.1, 1, np.where(rec["mode"] == 1, -1, 0)))
    assert np.array_equal(ag["action"], np.where(scores >= 0.6, 2, -1))
    for s in sig:  # votes per stream: STRONG_BUY for 0.7, SELL for -0.3
        m = ag["instrument"] == s["instrument"]
        assert s["votes"][4] == int((scores[m] > 0).sum()) and s["votes"][1] == int((scores[m] < 0).sum())


def test_set_external_scores_refuses_bad_input(market):
    mixed = np.concatenate([blend_population(32).records, as_external(blend_population(32, seed=3).records)])
    with dc.Engine(dc.Population.from_records(mixed)) as eng:
        blend_id, ext_id = int(mixed["agent_id"][0]), int(mixed["agent_id"][-1])
        with pytest.raises(ValueError, match=f"agent id {blend_id} is not an external-score agent"):
            eng.set_external_scores([blend_id], [0.5])
        with pytest.raises(ValueError, match=rf"score of agent id {ext_id} must be finite and in \[-1, 1\]"):
            eng.set_external_scores([ext_id], [1.5])  # the id, not the agent's index (63)
        with pytest.raises(ValueError, match=r"finite and in \[-1, 1\]"):
            eng.set_external_scores([ext_id], [float("nan")])
        with pytest.raises(ValueError, match="no agent with id 99999"):
            eng.set_external_scores([99999], [0.1])
        assert (eng.agents()["score"] == 0.0).all()
    bad = mixed.copy()
    bad["kind"][0] = 2
    with pytest.raises(dc.errors.InvalidGenome, match="unknown kind"):
        dc.Population.from_records(bad)


def test_external_scores_replay_and_threads(market, tmp_path):
    mixed = np.concatenate([blend_population(200).records, as_external(blend_population(100, seed=5).records)])
    pop = dc.Population.from_records(mixed)
    ext = mixed["agent_id"][mixed["kind"] == 1]
    rng = np.random.default_rng(0)
    plan = [np.round(rng.uniform(-1, 1, len(ext)), 3) for _ in range(400)]

    def go(threads, journal=None):
        out = []
        with dc.Engine(pop, threads=threads, journal=journal) as eng:
            for t, part in enumerate(steps(market)):
                eng.set_external_scores(ext, plan[t])
                out.append(eng.run(part))
            return np.concatenate(out), eng.agents()

    s1, a1 = go(1, tmp_path / "j")
    s2, a2 = go(2)
    assert np.array_equal(s1, s2) and np.array_equal(a1, a2)
    r = dc.journal.replay(tmp_path / "j")
    assert r.ok and r.verified == len(s1) and np.array_equal(r.signals, s1)
    assert np.array_equal(r.agents, a1)
