"""Learning micro-agents: LoRA-adapted heads trained online, scoring external-score lanes."""

from __future__ import annotations

import math

import dynamic_core as dc
import numpy as np
import pytest
from dynamic_core.decision import time_steps
from dynamic_core.errors import InvalidInput
from dynamic_core.learning.agents import FEATURES, MAX_DIM, FeatureBank, LearningAgents, learning_genomes


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


# ---- hostile input: what the engine rejects, callbacks, batching, bad arguments -----------------

def _state(la: LearningAgents) -> tuple:
    """Everything a step may change, as bytes (bit-identical comparisons)."""
    layers = tuple((n, L.A.tobytes(), L.B.tobytes()) for n, L in la.model.layers.items())
    banks = tuple((b.n, b._var, b._mean, b._ew_var, b._gain, b._loss, b._prev, b.dsi, tuple(b._closes))
                  for b in la.banks)
    prev_x = tuple(None if x is None else x.tobytes() for x in la._prev_x)
    return (la.scores.tobytes(), la.features.tobytes(), la.hits.tobytes(), la.calls.tobytes(), la.ticks,
            la.model.tick, la.model.head.tobytes(), layers, banks, prev_x, tuple(la._prev_close), tuple(la._vol))


@pytest.mark.parametrize("bad", ["close_inf", "close_above_high", "duplicate_ts", "out_of_order"])
@pytest.mark.parametrize("with_engine", [True, False])
def test_bars_the_engine_rejects_teach_nothing(bad, with_engine):
    # a rejected bar must leave the agents exactly as if it had never come: no learning target
    # from it, no feature or volatility update, no previous close moved
    bars = planted_market(60, seed=1)
    data = bars.copy()
    if bad == "close_inf":
        data["close"][50] = np.inf
    elif bad == "close_above_high":
        data["close"][50] = 10 * data["high"][50]
    elif bad == "duplicate_ts":  # a valid bar but for its time
        data["ts"][50] = data["ts"][49]
    else:
        data["ts"][50] = data["ts"][48]
    g = learning_genomes("PLANT", 3600, 4)

    def run(feed):
        with dc.Engine(dc.Population.from_records(g)) as eng:
            la = LearningAgents(g, seed=0)
            for i in range(len(feed)):
                la.step(feed[i:i + 1], eng if with_engine else None)
                eng.run(feed[i:i + 1])
            return la, eng.stats()

    got, stats = run(data)
    want, _ = run(np.delete(bars, 50))
    assert _state(got) == _state(want)
    reason = {"close_inf": "non_finite", "close_above_high": "close_out_of_range",
              "duplicate_ts": "duplicate_timestamp", "out_of_order": "out_of_order"}[bad]
    assert stats["rejects"][reason] == stats["rejected"] == stats["dead_letters"] == 1  # as usual
    assert got.stats()["rejected"] == {reason: 1} and got.stats()["bars"] == 59


def test_a_nonfinite_dsi_counts_as_zero():
    bars = planted_market(60, seed=1)
    g = learning_genomes("PLANT", 3600, 4)

    def provider(bad):
        n = {"k": 0}

        def dsi(_inst):
            n["k"] += 1
            return bad if n["k"] > 40 and n["k"] % 3 else 0.1
        return dsi

    out = []
    for bad in (math.nan, math.inf, 0.0):
        with dc.Engine(dc.Population.from_records(g)) as eng:
            la = LearningAgents(g, seed=0, dsi=provider(bad))
            for i in range(len(bars)):
                la.step(bars[i:i + 1], eng)
                eng.run(bars[i:i + 1])
            assert np.isfinite(la.scores).all() and (la.scores != 0).any()
            out.append((_state(la), la.stats()["dsi_nonfinite"], eng.agents()))
    nan, inf, zero = out
    assert nan[0] == zero[0] and inf[0] == zero[0]  # exactly as if the provider had said 0
    assert nan[1] == inf[1] == 13 and zero[1] == 0
    assert np.array_equal(nan[2], zero[2])


def test_a_step_that_raises_changes_nothing():
    bars = planted_market(80, seed=1)
    g = learning_genomes("PLANT", 3600, 4)
    calls = {"n": 0, "fail_at": -1, "value": 0.2}

    def dsi(_inst):
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise KeyError("provider down")
        return calls["value"]

    with dc.Engine(dc.Population.from_records(g)) as eng:
        la = LearningAgents(g, seed=0, dsi=dsi)
        for i in range(60):
            la.step(bars[i:i + 1], eng)
            eng.run(bars[i:i + 1])
        before, agents = _state(la), eng.agents()
        # the provider fails on the second bar of a three-bar call: the first is not half-taken
        calls["fail_at"] = calls["n"] + 2
        with pytest.raises(KeyError, match="provider down"):
            la.step(bars[60:63], eng)
        assert _state(la) == before
        calls["fail_at"], calls["value"] = -1, "strong"  # not a number: a TypeError
        with pytest.raises(TypeError, match="dsi"):
            la.step(bars[60:63], eng)
        assert _state(la) == before
        calls["value"] = 0.2
        with pytest.raises(TypeError):
            la.step([1, 2, 3], eng)
        assert _state(la) == before and la.stats()["rejected"] == {}
        assert np.array_equal(eng.agents(), agents)  # no score was handed over either
    # an engine without these learning agents: refused before anything is learned (a retry
    # would have learned the same bar twice)
    other = dc.Population.random(64, instruments=["PLANT"], timeframes=[3600], seed=2)  # ids 0..63, kind 0
    with dc.Engine(other) as eng2:
        with pytest.raises(ValueError, match="agent id 0 is not an external-score agent"):
            la.step(bars[60:63], eng2)
    rec = other.records.copy()
    rec["agent_id"] += 1000
    with dc.Engine(dc.Population.from_records(rec)) as eng3:
        with pytest.raises(ValueError, match="no agent with id 0"):
            la.step(bars[60:63], eng3)
    assert _state(la) == before
    with pytest.raises(RuntimeError, match="closed"):
        la.step(bars[60:61], eng)
    assert _state(la) == before
    # a strict engine refuses a batch with a bad bar in run: the agents refuse it in step
    with dc.Engine(dc.Population.from_records(g), strict=True) as eng:
        la = LearningAgents(g, seed=0)
        bad = bars[:30].copy()
        bad["close"][20] = math.nan
        with pytest.raises(InvalidInput) as err:
            la.step(bad, eng)
        assert err.value.rows == [20] and err.value.reasons == ["non_finite"]
        assert la.ticks == 0 and la.banks[0].n == 0 and la.stats()["rejected"] == {}


def test_a_nonfinite_score_is_contained():
    # a model fault must not reach the engine (which would refuse it after the model moved)
    bars = planted_market(40, seed=1)
    g = learning_genomes("PLANT", 3600, 4)
    with dc.Engine(dc.Population.from_records(g)) as eng:
        la = LearningAgents(g, seed=0)
        la.model.score = lambda x, snapshot=None: np.full(len(x), np.nan)
        for i in range(len(bars)):
            la.step(bars[i:i + 1], eng)
            eng.run(bars[i:i + 1])
        assert (la.scores == 0).all() and la.stats()["nonfinite_scores"] == 4 * 20  # the warm bars
        assert (eng.agents()["score"] == 0).all()


def _two_streams(n: int) -> np.ndarray:
    a = planted_market(n, seed=2)
    b = planted_market(n, seed=3, name="PLANT2")
    b["ts"] += 1800 * 10**9 * (np.arange(n) % 2)  # interleaved, some timestamps shared
    return np.sort(np.concatenate([a, b]), order=["ts", "instrument"], kind="stable")


@pytest.mark.parametrize("streams", [1, 2])
def test_any_batching_gives_bit_identical_learning(streams):
    bars = planted_market(200, seed=2) if streams == 1 else _two_streams(150)
    g = learning_genomes("PLANT", 3600, 4)
    if streams == 2:
        g = np.concatenate([g, learning_genomes("PLANT2", 3600, 3, first_id=100)])
    feeds = {
        "bar by bar": [bars[i:i + 1] for i in range(len(bars))],
        "pairs": [bars[i:i + 2] for i in range(0, len(bars), 2)],
        "uneven": np.array_split(bars, [3, 4, 40, 41, 42, 97]),
        "time steps": list(time_steps(bars)),
        "one batch": [bars],
    }
    runs = {}
    for name, parts in feeds.items():
        la = LearningAgents(g, seed=3, dsi=lambda inst: 0.3 if inst % 2 else -0.2)
        for p in parts:
            la.step(p)
        runs[name] = la
    ref = runs["bar by bar"]
    assert ref.ticks > (170 if streams == 1 else 250)  # every bar after warm-up teaches
    for name, got in runs.items():
        assert _state(got) == _state(ref), name
    assert all(got.stats() == ref.stats() for got in runs.values())


def test_constructor_arguments_are_checked():
    g = learning_genomes("PLANT", 3600, 4)
    for bad in (math.nan, math.inf, -math.inf, 0.0, -1.0):
        with pytest.raises(ValueError, match="target_scale"):
            LearningAgents(g, target_scale=bad)
    for bad in ("1", None, True):
        with pytest.raises(TypeError, match="target_scale"):
            LearningAgents(g, target_scale=bad)
    for cls in (FeatureBank, lambda dim: LearningAgents(g, dim=dim)):
        for bad in (16.9, 16.0, True, "16", None):
            with pytest.raises(TypeError, match="dim"):
                cls(bad)
        for bad in (len(FEATURES) - 1, -16, 10**7, MAX_DIM + 1):
            with pytest.raises(ValueError, match="dim"):
                cls(bad)
    assert FeatureBank(np.int64(MAX_DIM)).dim == MAX_DIM and LearningAgents(g, dim=len(FEATURES)).dim == 12
    for bad, err in ((-1, ValueError), (1 << 64, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(err, match="seed"):
            LearningAgents(g, seed=bad)
    with pytest.raises(TypeError, match="dsi"):
        LearningAgents(g, dsi=0.5)
    # a wrong type is a TypeError, as the docstring says (a list of records was a ValueError)
    for bad, what in ((list(g), "got list"), (None, "got NoneType"),
                      (np.zeros(4, dtype=[("agent_id", "<u4")]), "got an array of dtype")):
        with pytest.raises(TypeError, match=f"genomes must be a 1-d GENOME_DTYPE array .*{what}"):
            LearningAgents(bad)
    for bad in (g[:0], g.reshape(2, 2)):
        with pytest.raises(ValueError, match="non-empty 1-d GENOME_DTYPE array, got shape"):
            LearningAgents(bad)


def test_duplicate_agent_ids_are_refused_when_made():
    # LearningAgents(concat([lg, lg])) was taken; its first step with an engine then raised
    # "agent id 1000 is given more than once" after it had learned and moved its counters
    lg = learning_genomes("EURUSD", 3600, 3, first_id=1000)
    with pytest.raises(ValueError, match=r"agent id 1000 is given more than once \(3 duplicated ids\)"):
        LearningAgents(np.concatenate([lg, lg]))
    other = learning_genomes("PLANT", 3600, 2, first_id=1002)  # 1002 on another stream too
    with pytest.raises(ValueError, match=r"agent id 1002 is given more than once \(1 duplicated id\)"):
        LearningAgents(np.concatenate([lg, other]))
    fine = np.concatenate([lg, learning_genomes("PLANT", 3600, 2, first_id=1003)])
    assert len(LearningAgents(fine).ids) == 5


def test_a_failing_step_changes_no_counter():
    # the dsi_nonfinite count moved before the engine's agent ids were checked: a step that
    # raised changed stats(); every counter and score must stay as they were
    bars = planted_market(40, seed=1)
    g = learning_genomes("PLANT", 3600, 4)
    la = LearningAgents(g, seed=0, dsi=lambda _inst: math.nan)
    for i in range(30):
        la.step(bars[i:i + 1])
    before, stats = _state(la), la.stats()
    assert stats["dsi_nonfinite"] == 30 and stats["bars"] == 30
    rec = dc.Population.random(8, instruments=["PLANT"], timeframes=[3600], seed=2).records.copy()
    rec["agent_id"] += 5000
    with dc.Engine(dc.Population.from_records(rec)) as eng:  # lacks the learning agents' ids
        with pytest.raises(ValueError, match="no agent with id 0"):
            la.step(bars[30:33], eng)
    assert la.stats() == stats and _state(la) == before
    with pytest.raises(TypeError, match="engine must be a dynamic_core.Engine or None, got str"):
        la.step(bars[30:33], "engine")
    assert la.stats() == stats and _state(la) == before
    la.step(bars[30:33])  # the same bars are still new to it
    assert la.stats()["dsi_nonfinite"] == 33 and la.stats()["bars"] == 33


@pytest.mark.parametrize("value", ["0.5", True, np.bool_(False), None, b"1", [0.5], complex(0.5)])
def test_a_dsi_value_that_is_not_a_real_number_is_a_type_error(value):
    # float() took "0.5" and True: the docstring says a non-number is a TypeError
    bars = planted_market(30, seed=1)
    la = LearningAgents(learning_genomes("PLANT", 3600, 2), seed=0, dsi=lambda _inst: value)
    with pytest.raises(TypeError, match=r"dsi\(\d+\) must return a real number .*got"):
        la.step(bars)
    assert la.stats()["bars"] == 0 and la.ticks == 0 and la.banks[0].n == 0


def test_dsi_values_that_are_numbers_are_taken_and_clipped():
    bars = planted_market(30, seed=1)
    for value, want in ((np.float32(0.25), 0.25), (np.int64(-3), -1.0), (2, 1.0), (10**400, 1.0),
                        (-(10**400), -1.0)):
        la = LearningAgents(learning_genomes("PLANT", 3600, 2), seed=0, dsi=lambda _inst, v=value: v)
        la.step(bars)
        assert la.banks[0].dsi == want and la.stats()["dsi_nonfinite"] == 0


def test_rows_the_model_drops_as_nonfinite_are_counted():
    # the tick report's count of non-finite learning rows is what reveals learning gone quiet
    la = LearningAgents(learning_genomes("PLANT", 3600, 4), seed=0)
    for p in time_steps(planted_market(40, seed=1)):
        la.step(p)
    assert la.stats()["nonfinite_rows"] == 0 and la.ticks > 0
    la.target_scale = math.nan  # past the constructor's check: every target non-finite
    for p in time_steps(planted_market(60, seed=1)[40:]):
        la.step(p)
    assert la.stats()["nonfinite_rows"] == 4 * 20


@pytest.mark.parametrize("kw, err, msg", [
    (dict(n=0), ValueError, "n must be in"), (dict(n=2.5), TypeError, "n must be an int"),
    (dict(n=2, first_id=-5), ValueError, "first_id must be in"),
    (dict(n=2, first_id=2**32 - 1), ValueError, "passes the largest agent id"),
    # entry and long_short were not checked: a NaN or negative entry, a truthy str long_short
    (dict(n=2, entry=math.nan), ValueError, "entry must be a finite number in \\[0.0, inf\\], got nan"),
    (dict(n=2, entry=math.inf), ValueError, "entry must be a finite number"),
    (dict(n=2, entry=-1), ValueError, "entry must be a finite number in \\[0.0, inf\\], got -1"),
    (dict(n=2, entry="0.1"), TypeError, "entry must be a number, got str"),
    (dict(n=2, entry=True), TypeError, "entry must be a number, got bool"),
    (dict(n=2, long_short="no"), TypeError, "long_short must be a bool .* got 'no'"),
    (dict(n=2, long_short=1), TypeError, "long_short must be a bool"),
    (dict(n=2, long_short=None), TypeError, "long_short must be a bool"),
])
def test_learning_genomes_names_a_bad_argument(kw, err, msg):
    with pytest.raises(err, match=msg):
        learning_genomes("EURUSD", 3600, **kw)


def test_learning_genomes_takes_good_entries_and_modes():
    g = learning_genomes("EURUSD", 3600, 2, entry=np.float32(0.25), long_short=np.bool_(False))
    assert (g["entry"] == 0.25).all() and (g["mode"] == 0).all()
    g = learning_genomes("EURUSD", 3600, 2, entry=0, long_short=True)
    assert (g["entry"] == 0.0).all() and (g["mode"] == 1).all()
    dc.Population.from_records(g)  # what it makes is a valid population
    with pytest.raises(ValueError, match="timeframe"):  # checked before a new name is registered
        learning_genomes("LG_NEVER_SEEN", "bogus", 2)
    assert dc.instruments.get("LG_NEVER_SEEN") is None


def test_hit_rate_takes_rows_and_names_a_bad_one():
    g = learning_genomes("PLANT", 3600, 4, first_id=100)
    la = LearningAgents(g, seed=1)
    for part in time_steps(planted_market(200, seed=1)):
        la.step(part)
    calls = la.calls[[1, 2]].sum()
    assert calls > 0 and la.hit_rate([1, 2]) == la.hits[[1, 2]].sum() / calls
    with pytest.raises(IndexError, match=r"agent row 100 out of range \[0, 4\) .*agent id 100 is row 0"):
        la.hit_rate([100])
    with pytest.raises(IndexError, match="agent row -1 out of range"):
        la.hit_rate([-1])
    with pytest.raises(TypeError, match="row indices"):
        la.hit_rate([0.5])
    assert la.hit_rate(np.array([False, True, True, False])) == la.hit_rate([1, 2])  # a mask of rows
    assert math.isnan(la.hit_rate([]))  # nothing selected: no calls
    with pytest.raises(IndexError, match="needs 4 entries"):
        la.hit_rate([True, False])
