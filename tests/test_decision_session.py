"""The decision maker end to end: engine -> plans -> governor -> paper broker -> attribution ->
credit back to the engine; journal, replay, shadow runs and ``run --paper``."""

from __future__ import annotations

import io
import itertools
import math
import re
from contextlib import redirect_stdout

import dynamic_core as dc
import msgspec
import numpy as np
import pytest
from dynamic_core.bridges.paper import CostModel, PaperBroker
from dynamic_core.cli import main
from dynamic_core.decision import (
    DecisionMaker,
    PlanConfig,
    RationaleBook,
    RiskLimits,
    ShadowSession,
    TradingSession,
    time_steps,
)
from dynamic_core.payloads import PlanDecision

NAMES = ["EURUSD", "GBPUSD", "USDJPY", "XAUUSD"]


@pytest.fixture(scope="module")
def market():
    bars = dc.sim.MarketSimulator(NAMES, seed=2).bars(700)
    pop = dc.Population.random(3000, instruments=NAMES, timeframes=["H1"], seed=9)
    return pop, bars


def session(pop, bars, *, journal=None, plan=None, limits=None, credit=True, threads=1):
    eng = dc.Engine(pop, threads=threads, journal=journal)
    maker = DecisionMaker(PaperBroker(costs=CostModel(spread=0.0001, commission_per_lot=2.0)),
                          plan=plan or PlanConfig(min_score=0.02), limits=limits,
                          journal=eng.journal_event if journal else None)
    s = TradingSession(eng, maker, credit=credit)
    s.run(bars)
    return eng, maker, s


def test_time_steps_split_on_timestamps(market):
    _, bars = market
    parts = list(time_steps(bars))
    assert len(parts) == 700 and all(len(p) == 4 and (p["ts"] == p["ts"][0]).all() for p in parts)
    assert np.array_equal(np.concatenate(parts), bars)


def test_every_closed_trade_is_attributed_to_its_plan_signal_agents(market):
    pop, bars = market
    eng, maker, _s = session(pop, bars)
    try:
        att = maker.attribution()
        assert len(att) >= 20
        decided = {d.plan.plan_id: d for d in maker.decisions}
        by_signal = {d.plan.signal_id for d in maker.decisions}
        for a in att:
            d = decided[a.plan_id]
            assert d.verdict in ("APPROVED", "MODIFIED")
            assert a.signal_id == d.plan.signal_id and a.signal_id in by_signal
            assert a.instrument == d.plan.instrument and a.direction == d.plan.direction
            assert a.contributors == d.plan.contributors and 1 <= len(a.contributors) <= 8
        # contributors belong to the plan's instrument
        inst = dict(zip(pop.records["agent_id"].tolist(), pop.records["instrument"].tolist()))
        for a in att:
            assert {inst[c] for c in a.contributors} == {dc.instruments.id(a.instrument)}
        # the paper account adds up: closed P&L + open marks = equity
        st = maker.trader.stats()
        assert st["trades"] == len(att)
        assert math.fsum(a.pnl for a in att) == pytest.approx(st["net_pnl"], abs=1e-6)
        maker.trader.flatten()
        assert maker.trader.equity == pytest.approx(100_000.0 + math.fsum(t.pnl for t in maker.trader.trades),
                                                    abs=1e-6)
    finally:
        eng.close()


def test_trade_outcomes_reach_the_engine_as_credit(market):
    pop, bars = market
    eng, maker, s = session(pop, bars)
    try:
        maker.credit.apply(eng)  # the last trades' credit, normally sent at the next step
        ag = eng.agents()
        credit = dict(zip(ag["agent_id"].tolist(), ag["credit"].tolist()))
        assert maker.credit.credit and s.credited > 0
        for aid, c in maker.credit.credit.items():
            assert credit[aid] == c
        untouched = set(credit) - set(maker.credit.credit)
        assert all(credit[a] == 1.0 for a in untouched)
        # winners gained weight, losers lost it
        winners = [a for a, p in maker.credit.pnl.items() if p > 0 and maker.credit.trades[a] == 1]
        losers = [a for a, p in maker.credit.pnl.items() if p < 0 and maker.credit.trades[a] == 1]
        assert winners and losers
        assert all(credit[a] > 1.0 for a in winners) and all(credit[a] < 1.0 for a in losers)
    finally:
        eng.close()
    # and the feedback changes what the engine says afterwards
    e2, m2, _ = session(pop, bars, credit=False)
    try:
        assert [d.plan.size for d in m2.decisions] != [d.plan.size for d in maker.decisions]
    finally:
        e2.close()


def test_sessions_are_deterministic_across_thread_counts(market):
    pop, bars = market
    e1, m1, _ = session(pop, bars, threads=1)
    e2, m2, _ = session(pop, bars, threads=2)
    try:
        assert m1.decisions == m2.decisions
        assert m1.trader.trades == m2.trader.trades
        assert np.array_equal(m1.trader.equity_curve(), m2.trader.equity_curve())
    finally:
        e1.close()
        e2.close()


def test_verdicts_and_credit_are_journaled_and_replay_bit_identical(market, tmp_path):
    pop, bars = market
    eng, maker, _ = session(pop, bars, journal=tmp_path / "j")
    eng.close()
    dec = msgspec.msgpack.Decoder(PlanDecision)
    journaled, credits = [], 0
    for rec in dc.journal.read(tmp_path / "j"):
        if rec.type == "event":
            head = msgspec.msgpack.decode(rec.payload)
            if head["type"] == "decision":
                journaled.append(dec.decode(rec.payload))
            elif head["type"] == "credit":
                credits += 1
    assert journaled == maker.decisions and credits > 0
    r = dc.journal.replay(tmp_path / "j")
    assert r.ok and r.verified == len(bars) and not r.mismatched


def test_governor_limits_bind_in_a_session(market):
    pop, bars = market
    eng, maker, _ = session(pop, bars, limits=RiskLimits(max_open_positions=1, min_agreement=0.45))
    try:
        reasons = maker.governor.stats()["reasons"]
        assert reasons.get("max_open_positions", 0) > 0 and reasons.get("min_agreement", 0) > 0
        # never more than one position (or pending entry) at a time
        opened = sorted((t.entry_ts, t.exit_ts) for t in maker.trader.trades)
        for (_a0, a1), (b0, _) in itertools.pairwise(opened):
            assert b0 >= a1
    finally:
        eng.close()


def test_shadow_of_the_same_config_agrees_and_a_different_one_is_reported(market):
    pop, bars = market

    def shadow(candidate_plan, candidate_limits=None):
        eng = dc.Engine(pop, threads=1)
        live = DecisionMaker(PaperBroker(), plan=PlanConfig(min_score=0.02))
        cand = DecisionMaker(PaperBroker(), plan=candidate_plan, limits=candidate_limits)
        s = ShadowSession(eng, live, cand)
        rep = s.run(bars)
        eng.close()
        return rep, live, cand

    rep, live, cand = shadow(PlanConfig(min_score=0.02))
    assert not rep.differs and rep.live_plans == rep.candidate_plans > 0
    assert rep.live_pnl == rep.candidate_pnl
    rep, live, cand = shadow(PlanConfig(min_score=0.02, risk_pct=1.0), RiskLimits(max_open_positions=1))
    assert rep.differs and rep.sizes_differ > 0 and rep.verdicts_differ > 0 and rep.fills_differ > 0
    assert rep.examples and {e["kind"] for e in rep.examples} <= {"size", "verdict", "fills", "only_live",
                                                                    "only_candidate"}
    assert rep.live_trades == len(live.attributions) and rep.candidate_trades == len(cand.attributions)


def _guarded_session(providers, pop, bars, **mesh_kw):
    """A paper session whose governor wants one reasoning provider to agree with each plan."""
    from dynamic_core.reasoning import ReasoningMesh

    book = RationaleBook()
    # a loaded machine can leave an adapter unscheduled for a second or more: liveness judged over
    # 5 s (not lost, its requests not failed over to the narrator) and a deadline (which a
    # decision waits for at most, plus the session's grace) that a stalled reply still meets
    mesh_kw = {"deadline_s": 10.0, "liveness": 50, **mesh_kw}
    with ReasoningMesh(providers, on_rationale=book.add, **mesh_kw) as mesh:
        mesh.start(wait=20.0)
        assert mesh.wait_ready(timeout=20.0), mesh.stats()  # every provider's adapter, before the first signal
        with dc.Engine(pop, threads=1) as eng:
            maker = DecisionMaker(PaperBroker(), plan=PlanConfig(min_score=0.02),
                                  limits=RiskLimits(min_providers_agree=1), rationale=book.get)
            s = TradingSession(eng, maker, mesh=mesh, book=book)
            s.run(bars)
    return s, maker, mesh


def test_reasoning_guardrail_waits_for_rationales_and_attaches_them(monkeypatch):
    from .openai_server import FakeOpenAI

    bars = dc.sim.MarketSimulator(["EURUSD"], seed=4).bars(300)
    pop = dc.Population.random(500, instruments=["EURUSD"], timeframes=["H1"], seed=1)
    key = "sk-test-guardrail-5c1e9a7b3d"
    monkeypatch.setenv("DC_TEST_KEY", key)
    # a provider over the real OpenAI protocol that states the signal's direction (the fake's
    # default: the action word of the prompt); the mesh's default selection (only when a
    # stream's action changes): the signals a decision waits on are sent anyway, so no wait
    # runs into the deadline
    with FakeOpenAI(expect_key=key) as fake:
        s, maker, mesh = _guarded_session(
            ["deepseek"], pop, bars,
            policy={"rules": [{"request_class": "*", "candidates": ["deepseek", "local"]}]},
            profiles={"deepseek": {"base_url": fake.url, "api_key_env": "DC_TEST_KEY", "timeout_s": 5.0,
                                   "latency_class": "fast"}})
    assert s.reasoning_waits > 0 and s.reasoning_timeouts == 0
    assert mesh.select == "change"
    approved = [d for d in maker.decisions if d.verdict != "REJECTED"]
    assert approved
    for d in approved:
        assert d.plan.rationale and d.plan.rationale_provider == "deepseek" and d.plan.providers_agreeing >= 1
    for a in maker.attribution():
        assert a.adapter == "deepseek"


def test_the_narrator_alone_never_satisfies_the_providers_guardrail():
    """The local narrator restates the signal; it is no reasoning provider agreeing with it,
    whether it runs inline or as its own process."""
    bars = dc.sim.MarketSimulator(["EURUSD"], seed=4).bars(120)
    pop = dc.Population.random(300, instruments=["EURUSD"], timeframes=["H1"], seed=1)
    for providers in (["local"], []):
        s, maker, _ = _guarded_session(providers, pop, bars)
        assert s.reasoning_waits > 0 and maker.decisions
        assert all(d.verdict == "REJECTED" and d.reasons == ("min_providers_agree",) for d in maker.decisions)


def test_run_paper_command(tmp_path):
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["run", "--paper", "--agents", "2000", "--bars", "400", "--no-live", "--seed", "1",
                     "--journal", str(tmp_path / "j")])
    text = out.getvalue()
    assert code == 0, text
    for needle in ("Paper account", "end equity", "Plans:", "Attribution", "Agents by attributed P&L", "Journal"):
        assert needle in text
    assert dc.journal.replay(tmp_path / "j").ok


def test_run_paper_reports_rejected_bars_and_signals_that_made_no_plan(tmp_path):
    """``run --paper`` says what it could not use: the engine's rejected bars (as plain ``run``
    does) and, by reason, signals that made no plan (here EURJPY: no price converts JPY to USD)."""
    bars = dc.sim.MarketSimulator(["EURJPY"], seed=3).bars(400)
    bars["high"][100] = np.nan  # one bad bar
    csv = tmp_path / "EURJPY.csv"
    import pandas as pd

    pd.DataFrame({"time": pd.to_datetime(bars["ts"], utc=True), "open": bars["open"], "high": bars["high"],
                  "low": bars["low"], "close": bars["close"], "volume": bars["volume"]}).to_csv(csv, index=False)
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["run", "--paper", "--data", str(csv), "--agents", "1000", "--no-live", "--seed", "1"])
    text = out.getvalue()
    assert code == 0, text
    assert "Rejected bars: 1 (non_finite 1)" in text
    assert "made no plan (" in text and "no_conversion" in text
    assert "bars skipped by the decision maker: non_finite 1" in text


def test_signals_with_an_action_outside_the_enum_are_skipped_and_on_bars_checks_its_dtype():
    m = DecisionMaker(PaperBroker())
    sig = np.zeros(2, dtype=dc.SIGNAL_DTYPE)
    sig["instrument"] = dc.instruments.id("EURUSD")
    sig["timeframe"], sig["ts"], sig["seq"], sig["action"], sig["score"] = 3600, 10**18, [1, 2], [5, -7], 0.5
    assert m.on_signals(sig) == [] and m.stats()["skipped_signals"] == {"bad_action": 2}
    assert m.stats()["no_plan"] == 0  # skipped before any plan was tried
    with pytest.raises(TypeError, match="BAR_DTYPE"):
        m.on_bars(np.zeros(3))


def test_no_plan_reasons_are_counted():
    m = DecisionMaker(PaperBroker())
    sig = np.zeros(2, dtype=dc.SIGNAL_DTYPE)
    sig["instrument"] = dc.instruments.id("EURUSD")
    sig["timeframe"], sig["ts"], sig["seq"], sig["action"], sig["score"] = 3600, 10**18, [1, 2], 2, 0.5
    assert m.on_signals(sig) == []  # no bar yet: no ATR to place a stop
    assert m.stats()["no_plan"] == 2 and m.stats()["no_plan_reasons"] == {"no_atr": 2}


def test_run_paper_shadow_and_config_errors(tmp_path, capsys):
    cand = tmp_path / "cand.toml"
    cand.write_text("[plan]\nrisk_pct = 2.0\n[risk]\nmax_open_positions = 1\n")
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["run", "--paper", "--agents", "1000", "--bars", "300", "--no-live", "--shadow", str(cand)]) == 0
    assert "Shadow differences" in out.getvalue()
    assert main(["run", "--shadow", str(cand)]) == 2
    assert "need --paper" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[risk]\nmax_leverage = -1\n")
    assert main(["run", "--paper", "--decision-config", str(bad), "--bars", "50"]) == 2
    assert "max_leverage" in capsys.readouterr().err
    for name, body, want in (("unk.toml", b"[plan]\nrisk = 1\n", "unk.toml: [plan] Object contains unknown field"),
                             ("nan.toml", b"[risk]\nmax_leverage = nan\n", "nan.toml: [risk] "),
                             ("latin.toml", b"\xff\xfe[plan]\n", "latin.toml: not valid TOML")):
        (tmp_path / name).write_bytes(body)  # the file and the table named, whatever the error
        assert main(["run", "--paper", "--decision-config", str(tmp_path / name), "--bars", "50"]) == 2
        assert want in capsys.readouterr().err
    for bad_args, want in ((["--equity", "1e-300"], "--equity must be a finite amount of at least 1"),
                           (["--chunk", "5"], "--chunk has no effect with --paper")):
        assert main(["run", "--paper", "--bars", "50", *bad_args]) == 2
        assert want in capsys.readouterr().err
    agree = tmp_path / "agree.toml"
    agree.write_text("[risk]\nmin_providers_agree = 1\n")
    for extra in ([], ["--reasoning", "local"]):  # no provider with a view of its own: refused up front
        assert main(["run", "--paper", "--decision-config", str(agree), "--bars", "50", *extra]) == 2
        assert "min_providers_agree = 1 needs" in capsys.readouterr().err


def test_config_errors_leave_no_journal_behind(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[plan]\nrisk_pct = 500\n")
    j = tmp_path / "j"
    assert main(["run", "--paper", "--decision-config", str(bad), "--journal", str(j), "--bars", "50"]) == 2
    assert "risk_pct" in capsys.readouterr().err and not j.exists()
    mixed = tmp_path / "mixed.toml"
    mixed.write_text('[plan]\naccount = "EUR"\n[risk]\naccount = "USD"\n')
    assert main(["run", "--paper", "--decision-config", str(mixed), "--bars", "50"]) == 2
    assert "differ" in capsys.readouterr().err


def test_flat_cost_table_applies_to_every_instrument():
    from dynamic_core.cli_decision import DEFAULT_COSTS, _costs

    c = _costs({"spread": 0.0002, "commission_per_lot": 7.0, "XAUUSD": {"spread": 0.3}})
    broker = PaperBroker(costs=c)
    assert broker._cost("EURUSD") == CostModel(spread=0.0002, commission_per_lot=7.0)
    assert broker._cost("NZDUSD") == CostModel(spread=0.0002, commission_per_lot=7.0)
    assert broker._cost("XAUUSD") == CostModel(spread=0.3)
    assert _costs({}) == DEFAULT_COSTS
    assert _costs({"EURUSD": {"spread": 0.0003}})["GBPUSD"] == DEFAULT_COSTS["GBPUSD"]


@pytest.mark.parametrize("table, msg", [
    ("[costs.EURUSD]\nspread = -1.0\n", r"\[costs.EURUSD\]: CostModel.spread must be"),
    ("[costs.EURUSD]\nspread = nan\n", r"\[costs.EURUSD\]: CostModel.spread must be"),
    ("[costs.EURUSD]\nslipage = 1\n", r"\[costs.EURUSD\]: .*unknown field `slipage`"),
    ("[costs]\nspread = -1.0\n", r"\[costs\]: CostModel.spread must be"),
])
def test_a_cost_table_error_names_the_file_and_the_table(tmp_path, capsys, table, msg):
    f = tmp_path / "d.toml"
    f.write_text(table)
    assert main(["run", "--paper", "--decision-config", str(f), "--bars", "50", "-q"]) == 2
    err = capsys.readouterr().err
    assert str(f) in err and re.search(msg, err), err


def test_shadow_counts_each_differing_fill_once():
    from dynamic_core.bridges.paper import Fill

    def fill(ts, lots):
        return Fill(client_order_id="c", plan_id="p", instrument="EURUSD", side=1, lots=lots, price=1.1,
                    commission=0.0, ts=ts, kind="entry")

    eng = dc.Engine(dc.Population.random(64, instruments=["EURUSD"], timeframes=["H1"], seed=1), threads=1)
    try:
        s = ShadowSession(eng, DecisionMaker(PaperBroker()), DecisionMaker(PaperBroker()))
        s._compare([], [], [fill(1, 1.0), fill(2, 1.0), fill(3, 1.0), fill(4, 1.0)],
                   [fill(1, 1.0), fill(3, 1.0), fill(4, 1.0)])
        assert s.report.fills_differ == 1
        s._compare([], [], [fill(5, 1.0)], [fill(5, 2.0)])  # the same fill, another size
        assert s.report.fills_differ == 2
    finally:
        eng.close()


@pytest.mark.parametrize("targets_r", [(1.5, 3.0), (1.5, 400.0, 3.0)])  # 400 R: shorts' far target is < 0
def test_batch_plans_equal_one_at_a_time_plans(targets_r):
    from dynamic_core.decision import InstrumentSpec, make_plan

    names = ["EURUSD", "USDJPY", "XAUUSD", "EURGBP", "GBPUSD", "ODDLOT"]
    specs = {"ODDLOT": InstrumentSpec(name="ODDLOT", asset_class="equity", base="ODDLOT", quote="USD",
                                      contract_size=1.0, lot_step=0.3, min_lot=0.3, max_lot=1e6, tick_size=0.01,
                                      digits=2)}  # 1 / 0.3 is not whole: the scalar rounding path
    bars = dc.sim.MarketSimulator(names, seed=3).bars(60)
    no_limits = RiskLimits(max_open_positions=0, max_instrument_leverage=0, max_currency_leverage=0, max_leverage=0,
                           daily_loss_pct=0, max_drawdown_pct=0, loss_streak=0, allow_pyramiding=True)
    maker = DecisionMaker(PaperBroker(specs=specs), plan=PlanConfig(min_score=0.05, targets_r=targets_r),
                          limits=no_limits, specs=specs)
    maker.on_bars(bars)
    rng = np.random.default_rng(8)
    sig = np.zeros(300, dtype=dc.SIGNAL_DTYPE)
    sig["instrument"] = np.array([dc.instruments.id(n) for n in names])[rng.integers(0, len(names), 300)]
    sig["timeframe"], sig["ts"], sig["seq"], sig["population_hash"] = 3600, bars["ts"][-1], np.arange(300), 99
    sig["action"] = rng.integers(-2, 3, 300)
    sig["score"] = rng.uniform(-0.3, 0.3, 300)
    sig["confidence"], sig["agreement"] = rng.uniform(0, 1, 300), rng.uniform(0, 1, 300)
    equity = maker.trader.equity
    got = {d.plan.signal_id: d.plan for d in maker.on_signals(sig)}
    want = {}
    for r in sig:
        i, tf = int(r["instrument"]), int(r["timeframe"])
        p = make_plan(r, entry=maker.atr.last_close(i, tf), atr=maker.atr.value(i, tf), equity=equity,
                      config=maker.plan_config, spec=maker._spec(dc.instruments.name(i)), prices=maker.prices)
        if p is not None:
            want[p.signal_id] = p
    assert got == want and len(got) > 100
    assert any(p.instrument == "ODDLOT" for p in got.values()) and any(p.instrument == "EURGBP" for p in got.values())
    kept = {len(p.targets) for p in got.values()}
    assert kept == ({2} if len(targets_r) == 2 else {2, 3})  # a dropped target leaves the others in order
