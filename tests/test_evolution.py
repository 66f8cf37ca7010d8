"""Evolution of the running population: determinism and replay, selection against a reference
ranking, bounds, lineage, warm inheritance (children's scores equal a fresh engine's), selection
pressure on a planted edge versus a no-evolution control, triggers, and bad configs."""

from __future__ import annotations

import math

import dynamic_core as dc
import msgspec
import numpy as np
import pytest
from dynamic_core.learning.evolution import (
    Evolution,
    EvolutionConfig,
    EvolutionInterrupted,
    VolatilityRegime,
    format_trace,
)
from dynamic_core.payloads import GenerationEvent

from .test_learning_agents import planted_market

NONE = 0xFFFFFFFF
WEIGHTS = ("w_trend", "w_rsi", "w_macd", "w_bb", "w_mom")


def _pop(n: int = 512, seed: int = 2, name: str = "PLANT") -> dc.Population:
    return dc.Population.random(n, instruments=(name,), seed=seed, cost_bps=0.2)


def _bytes(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def _evolved_run(pop, bars, threads, cfg=None, every=300, seed=3, chunks=1):
    with dc.Engine(pop, threads=threads, cores_per_sm=64) as eng:
        evo = Evolution(eng, cfg or dict(min_age=150, replace_fraction=0.2), every=every, regime=False, seed=seed)
        sigs = [evo.run(part) for part in np.array_split(bars, chunks)]
        return np.concatenate(sigs), eng.genomes(), eng.lineage(), eng.agents(), evo.trace


def test_generations_are_deterministic_on_any_thread_count_and_chunking():
    bars = planted_market(2000, seed=5)
    pop = _pop()
    a = _evolved_run(pop, bars, threads=1)
    b = _evolved_run(pop, bars, threads=2, chunks=7)
    assert len(a[4]) == 6 and sum(r.replaced for r in a[4]) > 0
    for x, y in zip(a[:4], b[:4]):
        assert _bytes(x) == _bytes(y)
    assert a[4] == b[4]
    c = _evolved_run(pop, bars, threads=1, seed=4)  # another seed breeds other children
    assert _bytes(c[1]) != _bytes(a[1])


def test_large_generations_split_over_threads_breed_the_same_children():
    # 20,000 agents: enough lanes (>= 16,384) that a generation judges, breeds and writes its SMs
    # on the engine's threads; the children, ids, lineage and later signals match 1 thread's
    bars = planted_market(700, seed=8)
    pop = _pop(20_000, seed=9)
    cfg = dict(min_age=120, replace_fraction=0.15, p_migrate=0.3)
    a = _evolved_run(pop, bars, threads=1, cfg=cfg, every=250)
    b = _evolved_run(pop, bars, threads=2, cfg=cfg, every=250, chunks=3)
    assert len(a[4]) == 2 and all(r.replaced > 1000 for r in a[4])
    for x, y in zip(a[:4], b[:4]):
        assert _bytes(x) == _bytes(y)
    assert a[4] == b[4]


def test_journaled_generations_replay_bit_identically(tmp_path):
    bars = planted_market(1500, seed=6)
    pop = _pop(300)
    path = tmp_path / "j"
    with dc.Engine(pop, threads=2, journal=path) as eng:
        evo = Evolution(eng, dict(min_age=100, replace_fraction=0.25), every=250, regime=False, seed=11)
        sigs = evo.run(bars)
        genomes, lineage, agents = eng.genomes(), eng.lineage(), eng.agents()
    assert sum(r.replaced for r in evo.trace) > 0
    res = dc.Engine.replay(path, threads=1)
    assert res.mismatched == [] and res.missing == [] and res.verified == len(sigs)
    assert _bytes(res.signals) == _bytes(sigs)
    assert _bytes(res.agents) == _bytes(agents)
    gens = [msgspec.msgpack.decode(e, type=GenerationEvent) for e in res.events]
    assert [g.generation for g in gens] == [r.generation for r in evo.trace]
    assert all(g.seed == 11 and g.trigger == "every" for g in gens)
    del genomes, lineage


def _fitness(rec: np.ndarray, dd_penalty: float) -> np.ndarray:
    """Reference fitness from agent records: per-bar Sharpe minus the drawdown penalty."""
    sharpe = np.where(rec["ret_std"] > 0, rec["ret_mean"] / np.where(rec["ret_std"] > 0, rec["ret_std"], 1), 0.0)
    return np.where(rec["n_returns"] > 0, sharpe - dd_penalty * rec["max_drawdown"], 0.0)


def test_the_weakest_of_each_sm_are_replaced_and_parents_come_from_the_fittest():
    bars = planted_market(800, seed=7)
    pop = _pop(256)
    cfg = EvolutionConfig(min_age=0, replace_fraction=0.25, min_trades=2, dd_penalty=0.5, p_migrate=0.0)
    with dc.Engine(pop, threads=1, cores_per_sm=64) as eng:
        eng.run(bars)
        before = eng.agents()
        rep = eng.evolve(cfg, seed=1, generation=1)
    fit = _fitness(before, 0.5)
    # a plain reference of the selection: per SM (64 agents, population order here), agents
    # short of min_trades rank below all, then by fitness, then by agent id; the weakest quarter go
    expected_slots, parents_ok = set(), {}
    for sm in range(4):
        idx = np.arange(sm * 64, (sm + 1) * 64)
        traded = before["trades"][idx] >= 2
        key = [(1 if t else 0, f if t else -math.inf, int(before["agent_id"][i]))
               for i, t, f in zip(idx, traded, fit[idx])]
        ranked = [i for _, i in sorted(zip(key, idx))]
        losers = ranked[:16]
        expected_slots.update(int(i) for i in losers)
        parents_ok[sm] = {int(before["agent_id"][i]) for i in ranked[16:] if before["trades"][i] >= 2}
    births = rep["births"]
    assert set(births["slot"].tolist()) == expected_slots and rep["replaced"] == 64
    for b in births:
        assert int(b["parent_a"]) in parents_ok[int(b["sm"])]
        if b["parent_b"] != NONE:
            assert int(b["parent_b"]) in parents_ok[int(b["sm"])] and b["how"] & 1
        assert b["replaced_fitness"] == pytest.approx(fit[b["slot"]], abs=1e-12)
    traded = before["trades"] >= 2
    assert rep["best"] == pytest.approx(fit[traded].max(), abs=1e-12)
    assert rep["median"] == pytest.approx(np.median(fit[traded]), abs=1e-12)


def test_children_stay_in_bounds_and_on_their_sm_lattice():
    bars = planted_market(1200, seed=8)
    pop = _pop(512, seed=9)
    rec = pop.records
    cfg = EvolutionConfig(min_age=50, replace_fraction=0.3, w_max=0.8, sigma_weight=0.5, entry_min=0.05,
                          entry_max=0.3, sigma_entry=0.2, p_period=1.0, period_step=5, period_min=3,
                          period_max=40, p_crossover=0.7, p_migrate=0.5)
    # founders' periods all within [3, 40] already except slow EMAs (up to 199): moves must not
    # leave the bounds, so every used period of a moved feature stays inside
    with dc.Engine(pop, threads=2, cores_per_sm=64) as eng:
        for gen, part in enumerate(np.array_split(bars, 6), start=1):
            eng.run(part)
            eng.evolve(cfg, seed=2, generation=gen)
        g = eng.genomes()
        lin = eng.lineage()
    born = lin["generation"] > 0
    assert born.sum() > 300
    c = g[born]
    for w in WEIGHTS:
        assert (np.abs(c[w]) <= 0.8).all()
    assert ((c["entry"] >= 0.05) & (c["entry"] <= 0.3)).all()
    # every used feature of a child is one its SM's founders use (the SM's bank computes it)
    slots = np.flatnonzero(born)
    keys = {
        "w_trend": ("atr_period", "slow", "fast"), "w_rsi": ("rsi_period",),
        "w_macd": ("atr_period", "macd_slow", "macd_fast", "macd_signal"), "w_bb": ("bb_period",),
        "w_mom": ("mom_period",),
    }

    def key(r, w):
        k = tuple(int(r[f]) for f in keys[w])
        if w == "w_macd":  # the bank orders the MACD periods
            k = (k[0], max(k[1], k[2]), min(k[1], k[2]), k[3])
        return k

    for s in slots:
        sm = s // 64
        founders = rec[sm * 64:(sm + 1) * 64]
        for w in WEIGHTS:
            if g[s][w] == 0:
                continue
            lattice = {key(f, w) for f in founders if f[w] != 0}
            assert key(g[s], w) in lattice, (s, w)
    # a moved period stays in [3, 40] when it started inside: rsi, bb, mom periods of founders are
    for w, f in (("w_rsi", "rsi_period"), ("w_bb", "bb_period"), ("w_mom", "mom_period")):
        used = c[w] != 0
        assert ((c[f][used] >= 2) & (c[f][used] <= 50)).all()


def test_lineage_records_parents_generation_and_birth_bar():
    bars = planted_market(900, seed=10)
    pop = _pop(256, seed=12)
    with dc.Engine(pop, threads=1, cores_per_sm=128) as eng:
        ids_alive = set(pop.records["agent_id"].tolist())
        for gen, part in enumerate(np.array_split(bars, 3), start=1):
            eng.run(part)
            rep = eng.evolve(dict(min_age=100, replace_fraction=0.2), seed=5, generation=gen)
            b = rep["births"]
            assert set(b["parent_a"].tolist()) <= ids_alive
            assert set(b["parent_b"][b["parent_b"] != NONE].tolist()) <= ids_alive
            assert set(b["replaced_id"].tolist()) <= ids_alive
            assert not set(b["agent_id"].tolist()) & ids_alive  # fresh ids
            ids_alive = (ids_alive - set(b["replaced_id"].tolist())) | set(b["agent_id"].tolist())
            lin = eng.lineage()
            got = lin[b["slot"]]
            assert (got["agent_id"] == b["agent_id"]).all() and (got["generation"] == gen).all()
            assert (got["birth_bar"] == 300 * gen).all()
            assert (got["parent_a"] == b["parent_a"]).all() and (got["parent_b"] == b["parent_b"]).all()
        assert set(eng.agents()["agent_id"].tolist()) == ids_alive
        assert set(eng.genomes()["agent_id"].tolist()) == ids_alive
        founders = lin[lin["generation"] == 0]
        assert (founders["parent_a"] == NONE).all() and (founders["birth_bar"] == 0).all()
        # credit is addressed by the new ids; a replaced id is gone
        child = int(b["agent_id"][0])
        eng.set_credit([child], [1.5])
        assert eng.agents()["credit"][b["slot"][0]] == 1.5
        with pytest.raises(ValueError, match="no agent with id"):
            eng.set_credit([int(b["replaced_id"][0])], [1.5])


@pytest.mark.parametrize("dsi", [None, -0.4])
def test_children_read_warm_indicators_from_their_first_bar(dsi):
    # A child's score depends only on its weights, the bank's features and (a DSI reader) its
    # stream's DSI evidence; features it inherits have been updated since bar 0, so its scores
    # equal those of a fresh engine that ran the child's genome from bar 0 (a child starting
    # cold would score 0 until warm). A DSI reader's child reads the evidence set before its birth.
    bars = planted_market(1000, seed=13)
    pop = _pop(128, seed=14) if dsi is None else dc.Population.random(128, instruments=("PLANT",), seed=14,
                                                                      cost_bps=0.2, dsi_share=0.7)
    with dc.Engine(pop, threads=2, cores_per_sm=32) as eng:  # SM banks merged into group banks
        if dsi is not None:
            eng.set_dsi({"PLANT": dsi})
        eng.run(bars[:600])
        rep = eng.evolve(dict(min_age=100, replace_fraction=0.3, p_period=1.0), seed=9, generation=1)
        children = eng.genomes()[rep["births"]["slot"]]
        slots = rep["births"]["slot"]
        scores, warm = [], []
        for i in range(600, 640):
            eng.run(bars[i:i + 1])
            a = eng.agents()
            scores.append(a["score"][slots])
            warm.append(a["warm"][slots])
    assert len(slots) > 20 and np.array(warm).all()
    kids = children.copy()
    kids["kind"] = 0
    if dsi is not None:
        assert (kids["w_dsi"] != 0).sum() > 5 and (np.abs(kids["w_dsi"]) <= 4.0).all()
    with dc.Engine(dc.Population(kids), threads=1) as ref:
        if dsi is not None:
            ref.set_dsi({"PLANT": dsi})
        ref.run(bars[:600])
        for k, i in enumerate(range(600, 640)):
            ref.run(bars[i:i + 1])
            assert np.array_equal(ref.agents()["score"], scores[k])


def test_quarantined_agents_are_replaced_first():
    bars = planted_market(400, seed=15)
    pop = _pop(64, seed=16)
    with dc.Engine(pop, threads=1, fault_injection=True) as eng:
        eng.run(bars[:300])
        eng.faults.poison(5)
        eng.run(bars[300:301])
        assert eng.agents()["quarantined"][5] == 1
        rep = eng.evolve(dict(min_age=0, replace_fraction=0.0), seed=1, generation=1)  # nobody else goes
        b = rep["births"]
        assert b["slot"].tolist() == [5] and b["how"][0] & 8 and math.isnan(b["replaced_fitness"][0])
        assert eng.agents()["quarantined"][5] == 0
        eng.run(bars[301:])
        assert eng.agents()["quarantined"][5] == 0


def test_a_poison_armed_for_an_agent_a_generation_replaces_goes_with_it():
    """poison(i) names the agent at position i; armed and not yet landed when a generation
    replaces that agent, it is gone with it. It used to land on the child born into the slot,
    which was quarantined on its first bar."""
    bars = planted_market(400, seed=15)
    pop = _pop(64, seed=16)
    cfg = dict(min_age=0, replace_fraction=0.25)
    with dc.Engine(pop, threads=1) as ref:
        ref.run(bars[:300])
        slot = int(ref.evolve(cfg, seed=1, generation=1)["births"]["slot"][0])
        want = ref.run(bars[300:])
        want_agents = ref.agents()
    with dc.Engine(pop, threads=1, fault_injection=True) as eng:
        eng.run(bars[:300])
        eng.faults.poison(slot)
        rep = eng.evolve(cfg, seed=1, generation=1)
        assert slot in rep["births"]["slot"].tolist()
        got = eng.run(bars[300:])
        assert eng.agents()["quarantined"][slot] == 0 and eng.stats()["quarantined"] == 0
        assert got.tobytes() == want.tobytes()
        assert eng.agents().tobytes() == want_agents.tobytes()


def test_selection_pressure_on_a_planted_edge_beats_a_no_evolution_control():
    # returns follow r[t] = 0.3 r[t-1] + noise: momentum-like agents earn, others pay costs.
    # The same population with and without replacement (replace_fraction 0 only judges).
    bars = planted_market(6000, phi=0.3, seed=1)
    pop = _pop(1024, seed=2)
    traces = {}
    for rf in (0.0, 0.2):
        with dc.Engine(pop, threads=2) as eng:
            evo = Evolution(eng, dict(replace_fraction=rf, min_age=300), every=500, regime=False, seed=3)
            evo.run(bars)
            traces[rf] = evo.trace
    control = np.array([r.median for r in traces[0.0]])
    evolved = np.array([r.median for r in traces[0.2]])
    assert len(evolved) == 12 and traces[0.0][0].median == traces[0.2][0].median  # same start
    assert sum(r.replaced for r in traces[0.0]) == 0
    # the median climbs generation over generation (last third above the first third) ...
    assert evolved[-4:].mean() > evolved[:4].mean() + 0.05
    # ... and ends above the control's in every one of the last four generations
    assert (evolved[-4:] > control[-4:] + 0.05).all(), (evolved, control)


def test_regime_changes_trigger_a_generation():
    reg = VolatilityRegime()
    rng = np.random.default_rng(0)
    calm = 100 * np.exp(np.cumsum(rng.normal(0, 0.001, 1500)))
    wild = calm[-1] * np.exp(np.cumsum(rng.normal(0, 0.004, 60)))
    flips = [i for i, c in enumerate(np.concatenate([calm, wild])) if reg.update(float(c))]
    assert flips == [flips[0]] and 1500 <= flips[0] < 1520 and reg.state == "high"
    # through the driver: a volatility burst in the bars starts a generation tagged "regime"
    bars = planted_market(900, seed=17)
    r = np.diff(np.log(bars["close"]))
    r[600:] *= 4.0
    close = bars["close"][0] * np.exp(np.concatenate([[0.0], np.cumsum(r)]))
    bars["close"] = close
    bars["open"] = np.concatenate([[close[0]], close[:-1]])
    bars["high"] = np.maximum(bars["open"], close) * 1.0001
    bars["low"] = np.minimum(bars["open"], close) * 0.9999
    with dc.Engine(_pop(128), threads=1) as eng:
        evo = Evolution(eng, dict(min_age=50), every=0, regime=True, seed=1)
        evo.run(bars)
    assert [t.trigger for t in evo.trace][:1] == ["regime"] and 600 <= evo.trace[0].bar < 640


def test_bad_configs_are_typed_errors_and_change_nothing():
    with dc.Engine(_pop(64), threads=1) as eng:
        eng.run(planted_market(200, seed=1))
        g0 = eng.genomes()
        for bad in (dict(replace_fraction=1.5), dict(tournament=0), dict(entry_min=0.5, entry_max=0.1),
                    dict(period_min=50, period_max=10), dict(unknown=1), dict(stream=5)):
            with pytest.raises(ValueError):
                eng.evolve(bad, seed=1, generation=1)
        with pytest.raises(TypeError):
            eng.evolve("fast please", seed=1, generation=1)
        # a wrong type is a TypeError however the config is given (a dict used to give ValueError)
        for bad in (dict(tournament=3.0), dict(tournament=True), dict(replace_fraction="0.1")):
            for make in (lambda: EvolutionConfig(**bad), lambda: eng.evolve(bad, seed=1, generation=1),
                         lambda: Evolution(eng, bad)):
                with pytest.raises(TypeError, match=next(iter(bad))):
                    make()
        with pytest.raises(ValueError):
            eng.evolve(None, seed=-1, generation=1)
        with pytest.raises(ValueError, match="generation"):
            eng.evolve(None, seed=1, generation=0)  # 0 is the founders'
        assert _bytes(eng.genomes()) == _bytes(g0)


def test_numpy_numbers_in_a_config_are_journaled_as_python_ones(tmp_path):
    # an EvolutionConfig took np.float64 and a journaled generation then failed mid-run (the
    # journal's encoder takes no numpy scalar); the dict form refused it
    bars = planted_market(400, seed=1)
    for cfg in (EvolutionConfig(min_age=50, replace_fraction=np.float64(0.2), tournament=np.int64(2)),
                dict(min_age=np.int32(50), replace_fraction=np.float64(0.2), tournament=np.int64(2))):
        with dc.Engine(_pop(128), threads=1, journal=str(tmp_path / f"j{type(cfg).__name__}")) as eng:
            eng.run(bars)
            assert eng.evolve(cfg, seed=1, generation=1)["replaced"] > 0
    c = EvolutionConfig(replace_fraction=np.float32(0.5), dd_penalty=1)
    assert type(c.replace_fraction) is float and type(c.dd_penalty) is float
    with pytest.raises(TypeError):
        EvolutionConfig(tournament=np.float64(3.0))


def test_replace_fraction_one_keeps_the_fittest_of_each_sm_to_breed_from():
    # all of an SM replaced left no parent: a generation of replace_fraction 1 replaced nobody
    with dc.Engine(_pop(256), threads=1, cores_per_sm=64) as eng:
        eng.run(planted_market(600, seed=2))
        before = eng.agents()
        rep = eng.evolve(dict(min_age=50, replace_fraction=1.0, min_trades=0), seed=1, generation=1)
    assert rep["judged"] == 256 and rep["replaced"] == 256 - 4
    for sm in range(4):  # one survivor an SM, and it is the parent of every child there
        kids = rep["births"][rep["births"]["sm"] == sm]
        survivor = set(before["agent_id"][sm * 64:(sm + 1) * 64].tolist()) - set(kids["replaced_id"].tolist())
        assert len(kids) == 63 and len(survivor) == 1 and set(kids["parent_a"].tolist()) == survivor


def test_ids_near_the_end_of_the_range():
    bars = planted_market(400, seed=1)
    rec = _pop(1000).records.copy()
    rec["agent_id"][0] = 0xFFFFFFFF
    with pytest.raises(dc.errors.InvalidGenome, match="names no agent"):
        dc.Population.from_records(rec)
    for top, fits in ((2**32 - 200, True), (2**32 - 2, False)):
        rec["agent_id"][0] = top
        with dc.Engine(dc.Population.from_records(rec), threads=1) as eng:
            eng.run(bars)
            g0 = eng.genomes()
            if fits:  # 47 children fit in the 199 ids left (all lanes would not)
                rep = eng.evolve(dict(min_age=50, replace_fraction=0.05), seed=1, generation=1)
                assert rep["replaced"] > 0 and int(rep["births"]["agent_id"].max()) <= 2**32 - 2
            else:
                with pytest.raises(OverflowError, match="ids exhausted"):
                    eng.evolve(dict(min_age=50, replace_fraction=0.05), seed=1, generation=1)
                assert _bytes(eng.genomes()) == _bytes(g0)


def test_driver_arguments_are_checked_before_any_bar_runs():
    with dc.Engine(_pop(128), threads=1) as eng:
        for kw, err in (({"seed": -1}, ValueError), ({"seed": 1 << 64}, ValueError), ({"seed": 1.0}, TypeError),
                        ({"seed": True}, TypeError), ({"every": True}, TypeError), ({"every": 100.0}, TypeError),
                        ({"every": -1}, ValueError), ({"every": "100"}, TypeError)):
            with pytest.raises(err, match=next(iter(kw))):
                Evolution(eng, {"min_age": 50}, regime=False, **kw)
        assert eng.stats()["accepted"] == 0
        evo = Evolution(eng, every=np.int64(100), seed=np.uint64((1 << 64) - 1), regime=False)
        assert (evo.every, evo.seed) == (100, (1 << 64) - 1)


def test_evolution_refuses_what_is_not_an_engine():
    # Evolution(None) failed late with an AttributeError ('NoneType' has no '_stream_keys')
    for bad in (None, "engine", _pop(16)):
        with pytest.raises(TypeError, match="engine must be a dynamic_core.Engine"):
            Evolution(bad)


@pytest.mark.parametrize("kw, err, match", [
    # {"high": "3"} was a bare "'>' not supported"
    ({"high": "3"}, TypeError, "regime_kwargs: high must be a number, got str"),
    ({"high": math.inf}, ValueError, "regime_kwargs: high must be a finite number"),
    ({"high": math.nan}, ValueError, "regime_kwargs: high must be a finite number"),
    ({"low": 0.0}, ValueError, "regime_kwargs: low must be a finite number in \\(0.0"),
    ({"high": 1.5, "low": 1.5}, ValueError, "regime_kwargs: high must be above low"),
    ({"low": True}, TypeError, "regime_kwargs: low must be a number, got bool"),
    ({"warmup": -5}, ValueError, "regime_kwargs: warmup must be in \\[0, "),
    ({"warmup": 10.0}, TypeError, "regime_kwargs: warmup must be an int"),
    ({"fast": 2.5, "slow": 3.5}, TypeError, "regime_kwargs: fast must be an int, got float"),
    ({"fast": 0}, ValueError, "regime_kwargs: fast must be in \\[1, "),
    ({"fast": 30, "slow": 30}, ValueError, "regime_kwargs: fast must be below slow"),
    ({"slow": True}, TypeError, "regime_kwargs: slow must be an int, got bool"),
    ({"bogus": 1}, TypeError, "regime_kwargs: .*unexpected keyword argument 'bogus'"),
])
@pytest.mark.parametrize("regime", [True, False])
def test_regime_arguments_are_checked_when_the_evolution_is_made(kw, err, match, regime):
    # the docstring says arguments are checked when the Evolution is made: {"warmup": -5},
    # {"fast": 2.5, ...} and {"high": inf} were taken (an infinite high never triggers)
    with dc.Engine(_pop(128), threads=1) as eng:
        with pytest.raises(err, match=match):
            Evolution(eng, {"min_age": 50}, regime=regime, regime_kwargs=kw)
        assert eng.stats()["accepted"] == 0


def test_regime_flag_and_kwargs_types_are_checked():
    with dc.Engine(_pop(128), threads=1) as eng:
        with pytest.raises(TypeError, match="regime_kwargs must be a dict"):
            Evolution(eng, regime_kwargs=[("high", 3.0)])
        with pytest.raises(TypeError, match="regime must be a bool, got 'no'"):
            Evolution(eng, regime="no")
        evo = Evolution(eng, regime=np.bool_(True), regime_kwargs={"fast": np.int64(5), "slow": 50, "high": 4,
                                                                    "low": np.float32(2.0), "warmup": 0})
        reg = evo._regime[0]
        assert (reg._af, reg._as, reg._high, reg._low, reg._warmup) == (2 / 6, 2 / 51, 4.0, 2.0, 0)
        assert VolatilityRegime()._warmup == 200  # slow by default


def test_a_failed_generation_keeps_the_generation_number():
    with dc.Engine(_pop(128), threads=1) as eng:
        eng.run(planted_market(300, seed=1))
        evo = Evolution(eng, {"min_age": 50}, every=0, regime=False, seed=1)
        g0 = eng.genomes()
        for bad, err in ((7, ValueError), (-2, ValueError), (True, TypeError), (0.0, TypeError)):
            with pytest.raises(err, match="stream"):
                evo.evolve(stream=bad)
        assert evo.generation == 0 and evo.trace == [] and _bytes(eng.genomes()) == _bytes(g0)
        evo.evolve(0)
        assert evo.generation == 1 and [r.generation for r in evo.trace] == [1]
    with pytest.raises(RuntimeError, match="closed"):  # the engine refuses: still generation 1
        evo.evolve(0)
    assert evo.generation == 1 and len(evo.trace) == 1


def test_a_run_that_stops_part_way_loses_no_signals():
    bars = planted_market(400, seed=5)
    pop = _pop(256)
    with dc.Engine(pop, threads=1) as ref:
        want = ref.run(bars[:100])
    with dc.Engine(pop, threads=1) as eng:
        evo = Evolution(eng, {"min_age": 50}, every=100, regime=False, seed=1)

        def broken(*_a, **_k):
            raise OSError("disk full")
        eng.evolve = broken  # the generation due after bar 100 fails
        with pytest.raises(EvolutionInterrupted) as err:
            evo.run(bars)
        e = err.value
        assert isinstance(e.__cause__, OSError) and e.done == 100 == eng.stats()["accepted"]
        assert _bytes(e.signals) == _bytes(want) and evo.generation == 0
        del eng.evolve  # resume where it stopped: the missed generation comes due at once
        rest = evo.run(bars[e.done:])
        assert len(e.signals) + len(rest) == 400 and [r.bar for r in evo.trace] == [101, 201, 301]


def test_a_run_whose_engine_fails_part_way_resumes_exactly():
    bars = planted_market(400, seed=5)
    pop = _pop(256)
    with dc.Engine(pop, threads=1) as ref:
        evo = Evolution(ref, {"min_age": 50}, every=100, regime=True, seed=1)
        want = (evo.run(bars).tobytes(), _bytes(ref.genomes()), evo.trace)
    with dc.Engine(pop, threads=1) as eng:
        evo = Evolution(eng, {"min_age": 50}, every=100, regime=True, seed=1)
        run, calls = eng.run, []

        def flaky(b, **kw):  # the second chunk fails before the engine takes any of it
            calls.append(len(b))
            if len(calls) == 2:
                raise ConnectionError("feed lost")
            return run(b, **kw)
        eng.run = flaky
        with pytest.raises(EvolutionInterrupted) as err:
            evo.run(bars)
        assert err.value.done == 100 == eng.stats()["accepted"] and evo._seen == [100]
        del eng.run
        rest = evo.run(bars[err.value.done:])
        assert (np.concatenate([err.value.signals, rest]).tobytes(), _bytes(eng.genomes()), evo.trace) == want


def test_a_strict_engine_refuses_a_bad_batch_before_running_any_of_it():
    bars = planted_market(400, seed=5)
    bars["close"][250] = math.nan
    with dc.Engine(_pop(256), threads=1, strict=True) as eng:
        evo = Evolution(eng, {"min_age": 50}, every=100, regime=False, seed=1)
        with pytest.raises(dc.errors.InvalidInput) as err:
            evo.run(bars)
        assert err.value.rows == [250] and err.value.reasons == ["non_finite"]
        assert eng.stats()["accepted"] == 0 and evo.trace == [] and evo._seen == [0]


def test_rejected_bars_do_not_count_toward_a_generation():
    bars = planted_market(400, seed=5)
    bad = bars.copy()
    bad["close"][[30, 60]] = bad["high"][[30, 60]] * 2  # close_out_of_range: the engine rejects them
    bad["ts"][90] = bad["ts"][89]                        # duplicate_timestamp
    out = {}
    for name, data in (("clean", np.delete(bars, [30, 60, 90])), ("bad", bad)):
        with dc.Engine(_pop(256), threads=1) as eng:
            evo = Evolution(eng, {"min_age": 50}, every=100, regime=True, seed=1)
            sig = evo.run(data)
            out[name] = (sig["score"].tobytes(), _bytes(eng.genomes()), [(r.bar, r.generation) for r in evo.trace])
            if name == "bad":
                assert eng.stats()["rejected"] == 3
    assert out["bad"] == out["clean"] and len(out["clean"][2]) == 3


def test_trace_table_and_plot(tmp_path):
    bars = planted_market(1200, seed=18)
    with dc.Engine(_pop(256), threads=1) as eng:
        evo = Evolution(eng, dict(min_age=100), every=300, regime=False, seed=2)
        evo.run(bars)
    text = evo.table()
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["gen", "stream", "bar"] and len(lines) == 2 + len(evo.trace) == 6
    assert format_trace(evo.trace) == text
    out = evo.plot(tmp_path / "trace.png")
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_run_evolves_journals_and_replays(tmp_path):
    from .test_cli import assert_clean_error, dynamic_core

    proc = dynamic_core("run", "-q", "--agents", "600", "--bars", "900", "--instruments", "2", "--evolve", "300",
                        "--journal", "j", "--evolve-plot", "t.png", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Evolution: " in out and "children born" in out and " every " in out
    assert (tmp_path / "t.png").stat().st_size > 1000
    rep = dynamic_core("replay", "j", "--verify", cwd=tmp_path)
    assert rep.returncode == 0, rep.stderr
    assert "0 mismatched; 0 missing" in rep.stdout
    assert_clean_error(dynamic_core("run", "--evolve", "-5", cwd=tmp_path), "--evolve")
    assert_clean_error(dynamic_core("run", "--evolve-plot", "x.png", cwd=tmp_path), "--evolve")
    assert_clean_error(dynamic_core("run", "--paper", "--evolve", "100", cwd=tmp_path), "--paper")


def test_harness_traces_evolution_on_real_data():
    pytest.importorskip("backtesting")
    from dynamic_core.learning.harness import format_report, replay_report
    from dynamic_core.cli import load_bars

    bars = load_bars("backtesting:EURUSD", sim_names=["EURUSD"], bars=2000, timeframe=None, seed=0)
    table = replay_report(bars, 10, evolve=400, evolve_agents=512)
    rows = table.attrs["evolution"]
    assert len(rows) >= 5 and all(r.replaced > 0 for r in rows)
    assert rows[0].trigger == "every" and rows[0].bar == 400
    text = format_report(table)
    assert "evolution trace" in text and "best" in text and "median" in text
    # a DataFrame has no stream ids for agents to run on: said before any work, not dropped
    with pytest.raises(ValueError, match="evolve needs BAR_DTYPE bars"):
        replay_report(dc.market.to_pandas(bars), 10, evolve=400)


def test_evolution_trace_refuses_two_instruments_under_one_name():
    # streams are relabelled by name: two instruments' bars under one name would trade as one
    # series (prices jumping between them every bar), so that is refused before any work, as is
    # one instrument/timeframe given under two names
    from dynamic_core.learning.harness import evolution_trace, replay_report

    bars = dc.sim.MarketSimulator(["EURUSD", "USDJPY"], seed=1).bars(600)
    with pytest.raises(ValueError, match="2 instruments"):
        evolution_trace({"MIX": bars}, agents=64, every=100)
    with pytest.raises(ValueError, match="2 instruments"):
        replay_report({"MIX": bars}, 5, evolve=100, evolve_agents=64)
    eur = bars[bars["instrument"] == bars["instrument"][0]]
    with pytest.raises(ValueError, match="both hold EURUSD bars"):
        evolution_trace({"EURUSD": eur, "EURUSD/3600": eur}, agents=64, every=100)
    evo = evolution_trace({"EURUSD/3600": eur}, agents=64, every=100)
    assert evo.trace and {(r.instrument, r.timeframe) for r in evo.trace} == {(dc.instruments.id("EURUSD"), 3600)}


def test_evolution_trace_keeps_instrument_names_that_hold_a_slash():
    # "EUR/USD/3600" was read as instrument "EUR" (split at the first "/"): EUR/USD and EUR/GBP
    # were refused as one instrument, and a lone EUR/USD evolved under a new instrument "EUR"
    from dynamic_core.learning.harness import evolution_trace, journal_bars

    bars = dc.sim.MarketSimulator(["EUR/USD", "EUR/GBP"], seed=1).bars(600)
    streams = {f"{dc.instruments.name(int(i))}/3600": bars[bars["instrument"] == i]
               for i in np.unique(bars["instrument"])}
    assert sorted(streams) == ["EUR/GBP/3600", "EUR/USD/3600"]
    evo = evolution_trace(streams, agents=64, every=100)
    want = {(dc.instruments.id(n), 3600) for n in ("EUR/USD", "EUR/GBP")}
    assert evo.trace and {(r.instrument, r.timeframe) for r in evo.trace} == want
    assert "EUR" not in dc.instruments.names()


_WRITE = """
import sys, numpy as np, dynamic_core as dc
from dynamic_core.learning.evolution import Evolution
dc.instruments.id("EVB"); dc.instruments.id("EVA")      # EVB gets the lower id here
parts = []
for k, name in enumerate(("EVA", "EVB")):
    b = dc.sim.MarketSimulator([name], seed=3 + k).bars(1000)
    parts.append(b)
bars = np.concatenate(parts); bars = bars[np.argsort(bars["ts"], kind="stable")]
pop = dc.Population.random(400, instruments=("EVA", "EVB"), seed=1)
with dc.Engine(pop, threads=2, journal=sys.argv[1]) as eng:
    evo = Evolution(eng, dict(min_age=100, replace_fraction=0.25), every=300, regime=False, seed=5)
    evo.run(bars[:1800])
    eng.evolve(dict(min_age=100), seed=5, generation=99)   # all streams at once
    eng.run(bars[1800:])
print(sum(r.replaced for r in evo.trace))
"""
_READ = """
import sys, dynamic_core as dc
dc.instruments.id("EVA"); dc.instruments.id("EVB")      # the other order
res = dc.Engine.replay(sys.argv[1])
print(res.verified, len(res.mismatched), len(res.missing))
"""


def test_generations_replay_in_a_process_with_other_instrument_ids(tmp_path):
    import subprocess
    import sys

    from .test_cli import PKG_ROOT

    env = {"PYTHONPATH": PKG_ROOT, "OPENBLAS_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    j = str(tmp_path / "j")
    w = subprocess.run([sys.executable, "-c", _WRITE, j], capture_output=True, text=True, env=env, timeout=120)
    assert w.returncode == 0, w.stderr
    assert int(w.stdout.split()[-1]) > 100
    r = subprocess.run([sys.executable, "-c", _READ, j], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    verified, mismatched, missing = map(int, r.stdout.split())
    assert verified == 2000 and mismatched == 0 and missing == 0
