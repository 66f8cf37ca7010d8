"""Learning micro-agents: LoRA-adapted heads trained online, scoring external-score lanes."""

from __future__ import annotations

import math

import dynamic_core as dc
import numpy as np
import pytest
from dynamic_core.decision import time_steps
from dynamic_core.learning.agents import FEATURES, FeatureBank, LearningAgents, learning_genomes


def planted_market(n: int, phi: float = 0.35, seed: int = 0, name: str = "PLANT") -> np.ndarray:
    """Hourly bars whose log returns follow r[t] = phi * r[t-1] + noise: the last return (a
    feature the agents see) predicts the next one."""
    rng = np.random.default_rng(seed)
    r = np.zeros(n)
    eps = rng.normal(0.0, 0.002, n)
    for t in range(1, n):
        r[t] = phi * r[t - 1] + eps[t]
    close = 100.0 * np.exp(np.cumsum(r))
    open_ = np.concatenate([[100.0], close[:-1]])
    wiggle = np.abs(rng.normal(0.0, 0.0005, n))
    bars = np.zeros(n, dtype=dc.BAR_DTYPE)
    bars["ts"] = 1_704_067_200_000_000_000 + np.arange(n, dtype=np.int64) * 3_600_000_000_000
    bars["instrument"] = dc.instruments.id(name)
    bars["timeframe"] = 3600
    bars["open"], bars["close"] = open_, close
    bars["high"] = np.maximum(open_, close) * (1 + wiggle)
    bars["low"] = np.minimum(open_, close) * (1 - wiggle)
    bars["volume"] = 1000.0
    return bars


def test_feature_bank_lagged_returns_are_scaled_returns():
    bars = planted_market(100, seed=3)
    fb = FeatureBank(16)
    xs = [fb.update(h, lo, c) for h, lo, c in zip(bars["high"], bars["low"], bars["close"])]
    c = bars["close"]
    assert not xs[5].any() and xs[-1].any()  # zeros until warm
    x = xs[-1]
    vol = math.sqrt(fb._var)
    assert x[FEATURES.index("ret1")] == pytest.approx(np.clip(math.log(c[-1] / c[-2]) / vol, -5, 5), rel=1e-12)
    assert x[FEATURES.index("ret2")] == pytest.approx(np.clip(math.log(c[-2] / c[-3]) / vol, -5, 5), rel=1e-12)
    assert x[FEATURES.index("bias")] == 1.0 and (x[len(FEATURES):] == 0).all()
    assert np.abs(np.array(xs)).max() <= 5.0


def test_learning_agents_beat_frozen_ones_on_a_planted_edge():
    # r[t] = 0.5 r[t-1] + noise: the best linear predictor gets about 0.5 + asin(0.5) / pi = 0.67
    # of the signs right; frozen heads (the same initial weights, never trained) are at chance
    bars = planted_market(1500, phi=0.5, seed=11)
    g = learning_genomes("PLANT", 3600, 32)
    hl, hf = [], []
    for seed in (5, 6, 7):
        learning = LearningAgents(g, seed=seed)
        frozen = LearningAgents(g, seed=seed, learn=False)
        for part in time_steps(bars):
            learning.step(part)
            frozen.step(part)
        hl.append(learning.hit_rate())
        hf.append(frozen.hit_rate())
        assert learning.ticks > 1000 and frozen.ticks == 0
    assert min(hl) >= 0.58, (hl, hf)
    assert np.mean(hl) - np.mean(hf) >= 0.06, (hl, hf)
    assert all(a > b for a, b in zip(hl, hf)), (hl, hf)


def test_learning_is_deterministic_and_seeded():
    bars = planted_market(300, seed=2)
    g = learning_genomes("PLANT", 3600, 16)
    runs = []
    for _ in range(2):
        la = LearningAgents(g, seed=9)
        out = [la.step(p).copy() for p in time_steps(bars)]
        runs.append(np.array(out))
    assert np.array_equal(runs[0], runs[1])
    other = LearningAgents(g, seed=10)
    out = np.array([other.step(p).copy() for p in time_steps(bars)])
    assert not np.array_equal(out, runs[0])


def test_learning_agents_trade_in_the_engine_end_to_end(tmp_path):
    sim = dc.sim.MarketSimulator(["EURUSD"], seed=4).bars(400)
    plant = planted_market(400, seed=4)
    plant["ts"] = sim["ts"]
    bars = np.sort(np.concatenate([sim, plant]), order=["ts", "instrument"], kind="stable")
    blend = dc.Population.random(256, instruments=["EURUSD", "PLANT"], timeframes=["H1"], seed=1).records
    lg = np.concatenate([learning_genomes("EURUSD", 3600, 32, first_id=1000),
                         learning_genomes("PLANT", 3600, 32, first_id=2000)])
    pop = dc.Population.from_records(np.concatenate([blend, lg]))

    def run(journal=None, threads=1):
        la = LearningAgents(lg, seed=3)
        out = []
        with dc.Engine(pop, threads=threads, journal=journal) as eng:
            for part in time_steps(bars):
                la.step(part, eng)
                out.append(eng.run(part))
            return np.concatenate(out), eng.agents(), la

    sig, ag, _la = run(tmp_path / "j")
    learners = np.isin(ag["agent_id"], lg["agent_id"])
    assert (ag["trades"][learners] > 0).any() and (ag["score"][learners] != 0).any()
    # they vote in consensus: every signal counts the stream's blend and learning agents once warm
    last = sig[-2:]
    assert set(last["n_agents"].tolist()) <= {128 + 32}
    # replay needs no model: the journaled scores reproduce every signal and agent bit for bit
    r = dc.journal.replay(tmp_path / "j")
    assert r.ok and r.verified == len(sig) and np.array_equal(r.agents, ag)
    sig2, ag2, _ = run(threads=2)
    assert np.array_equal(sig, sig2) and np.array_equal(ag, ag2)


def test_children_inherit_agent_layers():
    g = learning_genomes("PLANT", 3600, 4)
    la = LearningAgents(g, seed=1)
    for part in time_steps(planted_market(200, seed=1)):
        la.step(part)
    x = np.tile(la.features[0], (4, 1))
    before = la.model.score(x, la.model.snapshot())
    la.inherit(child=3, parent=0)
    after = la.model.score(x, la.model.snapshot())
    assert after[3] == before[0] and after[0] == before[0] and after[1] == before[1]


def test_learning_agents_refuse_blend_genomes():
    g = learning_genomes("PLANT", 3600, 4)
    g["kind"] = 0
    with pytest.raises(ValueError, match="kind 1"):
        LearningAgents(g)


def test_run_command_with_learning_agents(tmp_path):
    import io
    from contextlib import redirect_stdout

    from dynamic_core.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["run", "--learning", "4", "--bars", "200", "--agents", "500", "--no-live",
                     "--journal", str(tmp_path / "j")]) == 0
    assert "Learning agents: 16 (" in out.getvalue()
    assert dc.journal.replay(tmp_path / "j").ok
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["run", "--paper", "--learning", "2", "--bars", "150", "--agents", "300", "--no-live"]) == 0
    assert "Learning agents: 8 (" in out.getvalue() and "Paper account" in out.getvalue()
