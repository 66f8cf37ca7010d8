"""``dynamic-core run --paper``: signals -> plans -> risk governor -> paper broker, with
attribution, credit fed back to the agents and an optional shadow configuration."""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import numpy as np

from .bridges.paper import CostModel, PaperBroker
from .decision import (
    DecisionMaker,
    PlanConfig,
    RationaleBook,
    RiskLimits,
    ShadowSession,
    TradingSession,
    load_decision_config,
)

__all__ = ["DEFAULT_COSTS", "add_run_options", "cmd_run_paper"]

DEFAULT_COSTS: dict[str, CostModel] = {
    # typical retail ECN quotes: full spread in price units, commission per lot per side
    "EURUSD": CostModel(spread=0.00008, slippage=0.00001, commission_per_lot=3.5),
    "GBPUSD": CostModel(spread=0.00012, slippage=0.00001, commission_per_lot=3.5),
    "AUDUSD": CostModel(spread=0.00010, slippage=0.00001, commission_per_lot=3.5),
    "USDJPY": CostModel(spread=0.010, slippage=0.001, commission_per_lot=3.5),
    "XAUUSD": CostModel(spread=0.25, slippage=0.02, commission_per_lot=3.5),
    "BTCUSD": CostModel(spread=15.0, slippage=2.0),
    "SPX": CostModel(spread=0.5, slippage=0.1),
    "*": CostModel(),
}
"""Costs ``run --paper`` charges unless a decision config's ``[costs]`` says otherwise."""

DEFAULT_MIN_SCORE = 0.02


def add_run_options(r: argparse.ArgumentParser) -> None:
    """The trading options of ``dynamic-core run``."""
    g = r.add_argument_group("paper trading (plans, risk governor, paper broker)")
    g.add_argument("--paper", action="store_true",
                   help="trade the signals through plans, the risk governor and a paper broker; end "
                        "with the equity summary and the attribution table")
    g.add_argument("--decision-config", default=None, metavar="FILE",
                   help="TOML with [plan] (risk_pct, stop_atr, atr_period, targets_r, valid_bars, "
                        "min_action, min_score, account), [risk] (limits and guardrails), [costs] / [costs.NAME] "
                        "(spread, slippage, commission_per_lot) and [instruments.NAME] contract specs")
    g.add_argument("--shadow", default=None, metavar="FILE",
                   help="a candidate decision config run beside the live one on the same signals; "
                        "reports where verdicts and fills differ")
    g.add_argument("--equity", type=float, default=None, metavar="AMOUNT",
                   help="starting paper equity, in the config's account currency (at least 1) "
                        "[default: 100000]")
    g.add_argument("--entry-score", type=float, default=None, metavar="X",
                   help="trade a signal whose |fused score| reaches X (0 to 1) even when its action is HOLD (the live "
                        "configuration; a --shadow config keeps its own min_score) "
                        f"[default: the config's min_score, else {DEFAULT_MIN_SCORE}]")
    g.add_argument("--no-credit", action="store_true",
                   help="do not feed trade outcomes back to the agents' consensus weights")


def _costs(raw: dict[str, Any], path: str | None = None) -> dict[str, CostModel]:
    """The cost models of a decision config's ``[costs]`` tables; an error names the file and
    the table (``[costs.EURUSD]``) it is in."""
    import msgspec

    if not raw:
        return dict(DEFAULT_COSTS)
    out = dict(DEFAULT_COSTS)
    flat = {k: v for k, v in raw.items() if not isinstance(v, dict)}
    where = f"{path}: " if path else ""
    tables = ([("[costs]", "*", flat)] if flat else []) + [
        (f"[costs.{name}]", name, t) for name, t in raw.items() if isinstance(t, dict)]
    if flat:  # a flat [costs] table replaces every default; [costs.NAME] tables refine it
        out = {}
    for table, name, fields in tables:
        try:
            out[name] = msgspec.convert(fields, CostModel)
        except (msgspec.ValidationError, ValueError) as e:
            raise ValueError(f"{where}{table}: {e}") from None
    return out


def _configs(args: argparse.Namespace, path: str | None, *, live: bool) -> tuple[Any, ...]:
    """(plan config, limits, specs, costs) of one decision config, checked. ``--entry-score``
    sets the live configuration's ``min_score``; a shadow keeps its own (so it can be compared),
    and either defaults to 0.02 when its file does not set one."""
    plan, limits, specs, costs = (load_decision_config(path) if path else (PlanConfig(), RiskLimits(), {}, {}))
    if live and args.entry_score is not None:
        if not 0.0 <= args.entry_score <= 1.0:
            raise ValueError(f"--entry-score must be in [0, 1], got {args.entry_score:g}")
        plan = _replace(plan, min_score=args.entry_score)
    elif not (path and "min_score" in _plan_keys(path)):
        plan = _replace(plan, min_score=DEFAULT_MIN_SCORE)
    if not (math.isfinite(args.equity) and args.equity >= 1.0):  # 1e-300 sizes no plan at all
        raise ValueError(f"--equity must be a finite amount of at least 1, got {args.equity:g}")
    return plan, limits, specs, _costs(costs, path)


def _check_agreeing(args: argparse.Namespace, cfg: tuple[Any, ...], path: str | None) -> None:
    """A ``min_providers_agree`` that the providers asked for cannot meet would reject every plan:
    refused up front. The local narrator restates the signal and never counts as agreeing."""
    need = cfg[1].min_providers_agree
    if not need:
        return
    from .cli_reasoning import reasoning_providers

    providers = set(reasoning_providers(args))
    viewers = sorted(providers - {"local"})
    if len(viewers) < need:
        have = f"--reasoning gives {len(viewers)} ({', '.join(viewers)})" if viewers else "no --reasoning provider gives one"
        raise ValueError(f"{path}: [risk] min_providers_agree = {need} needs that many reasoning providers with a "
                         f"view of their own (not 'local', which restates the signal), and {have}: every plan "
                         "would be rejected; add providers to --reasoning or lower min_providers_agree")


def _maker(args: argparse.Namespace, cfg: tuple[Any, ...], journal: Any = None,
           book: RationaleBook | None = None) -> DecisionMaker:
    plan, limits, specs, costs = cfg
    broker = PaperBroker(equity=args.equity, account=plan.account, costs=costs, specs=specs)
    return DecisionMaker(broker, plan=plan, limits=limits, specs=specs, journal=journal,
                         rationale=book.get if book is not None else None)


def _replace(s: Any, **kw: Any) -> Any:
    import msgspec

    return msgspec.structs.replace(s, **kw)


def _plan_keys(path: str) -> set[str]:
    import tomllib

    with open(path, "rb") as f:
        return set(tomllib.load(f).get("plan", {}))


def cmd_run_paper(args: argparse.Namespace) -> int:
    """``dynamic-core run --paper``."""
    from . import cli
    from .engine import Engine
    from .instruments import instruments

    t0 = time.perf_counter()
    console = cli._console()
    # every configuration is checked before anything is created (a journal directory included)
    live_cfg = _configs(args, args.decision_config, live=True)
    shadow_cfg = _configs(args, args.shadow, live=False) if args.shadow else None
    if args.chunk is not None:
        raise ValueError("--chunk has no effect with --paper (it trades one time step at a time)")
    _check_agreeing(args, live_cfg, args.decision_config)
    if shadow_cfg is not None:
        _check_agreeing(args, shadow_cfg, args.shadow)
    bars, streams, pop, learners = cli.run_inputs(args)
    eng = Engine(pop, cores_per_sm=args.cores_per_sm, journal=args.journal, fsync=args.fsync)
    journal = eng.journal_event if args.journal else None

    mesh = book = None
    if args.reasoning:
        from .cli_reasoning import mesh_from_args

        book = RationaleBook()
        try:
            mesh = mesh_from_args(args)
        except BaseException:
            eng.close()
            raise
        mesh.on_rationale = book.add
    maker = _maker(args, live_cfg, journal, book)
    shadow = _maker(args, shadow_cfg, None, book) if shadow_cfg is not None else None
    if shadow is not None:
        session: Any = ShadowSession(eng, maker, shadow, credit=not args.no_credit)
        session.live.mesh, session.live.book = mesh, book
        live = session.live
    else:
        session = live = TradingSession(eng, maker, credit=not args.no_credit, mesh=mesh, book=book)
    live.learners = learners

    stream_names = ", ".join(f"{instruments.name(i)} {cli.tf_label(tf)}" for i, tf in streams)
    cfg = maker.plan_config
    console.print(f"[bold]{cli.PROG} run --paper[/]: {len(pop):,} agents over {len(streams)} stream(s) "
                  f"({stream_names}), {len(bars):,} bars; equity {args.equity:,.0f} {cfg.account}, risk "
                  f"{cfg.risk_pct:g}% a trade, stop {cfg.stop_atr:g} ATR, targets {', '.join(f'{r:g}R' for r in cfg.targets_r)}"
                  + (f", shadow {args.shadow}" if shadow is not None else ""))
    interrupted = False
    try:
        if console.is_terminal and not (args.quiet or args.no_live):  # --no-live: no animation
            progress = cli._progress_bar(console)
            with progress:
                task = progress.add_task("trading", total=len(bars), rate="")
                last = [0.0]

                def on_step(done: int, _sig: np.ndarray) -> None:
                    now = time.perf_counter()
                    if now - last[0] > 0.1 or done == len(bars):
                        last[0] = now
                        progress.update(task, completed=done, rate=f"equity {maker.trader.equity:,.0f}")

                session.run(bars, on_step)
        else:
            session.run(bars)
    except KeyboardInterrupt:
        interrupted = True
    report = session.finish() if shadow is not None else None
    wall = time.perf_counter() - t0

    _print_summary(console, maker, args.equity, live, wall, args.top)
    console.print(cli._rejects_line(eng.stats()))
    unused = _unused_line(maker)
    if unused:
        console.print(unused)
    if learners is not None:
        console.print(cli._learning_line(learners, eng.agents()))
    if report is not None:
        _print_shadow(console, report, args.shadow)
    return cli.finish_run(console, args, eng, mesh, interrupted,
                          lambda j: f"{j['records']:,} records (bars, credit and every verdict)")


def _unused_line(maker: DecisionMaker) -> str:
    """What reached the decision maker and made nothing, by reason ('' when nothing)."""
    def fmt(d: dict[str, int]) -> str:
        return ", ".join(f"{k} {v:,}" for k, v in sorted(d.items(), key=lambda kv: -kv[1]))

    ms = maker.stats()
    parts = []
    if ms["no_plan"]:
        parts.append(f"{ms['no_plan']:,} signal(s) made no plan ({fmt(ms['no_plan_reasons'])})")
    if ms["skipped_signals"]:
        parts.append(f"signals skipped: {fmt(ms['skipped_signals'])}")
    if ms["skipped_bars"]:
        parts.append(f"bars skipped by the decision maker: {fmt(ms['skipped_bars'])}")
    ignored = maker.trader.stats().get("ignored_bars", {}) if hasattr(maker.trader, "stats") else {}
    if ignored:
        parts.append(f"bars ignored by the broker: {fmt(ignored)}")
    return "Not used: " + "; ".join(parts) if parts else ""


def _print_summary(console: Any, maker: DecisionMaker, start: float, session: TradingSession, wall: float,
                   top: int) -> None:
    from rich.table import Table

    st = maker.trader.stats()
    end = float(maker.trader.equity)
    t = Table(title="Paper account", title_justify="left", show_header=False)
    t.add_column("", style="bold")
    t.add_column("", justify="right")
    pf = st["profit_factor"]
    rows = [
        ("start equity", f"{start:,.2f}"), ("end equity", f"{end:,.2f}"),
        ("return", f"{(end / start - 1) * 100:+.2f}%"),
        ("closed trades", f"{st['trades']:,} ({st['wins']:,} won, {st['losses']:,} lost)"),
        ("win rate", "n/a" if not st["trades"] else f"{st['win_rate'] * 100:.1f}%"),
        ("profit factor", "n/a" if math.isnan(pf) else ("inf" if math.isinf(pf) else f"{pf:.2f}")),
        ("max drawdown", f"{st['max_drawdown']:,.2f} ({st['max_drawdown_pct'] * 100:.2f}%)"),
        ("commission", f"{st['commission']:,.2f}"),
        ("open positions", ", ".join(f"{k} {p.lots:+g}" for k, p in sorted(maker.trader.positions().items())) or "none"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)

    g = maker.governor.stats()
    d = g["decisions"]
    reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(g["reasons"].items(), key=lambda kv: -kv[1])) or "none"
    console.print(f"Plans: {sum(d.values()):,} judged - {d['APPROVED']:,} approved, {d['MODIFIED']:,} modified, "
                  f"{d['REJECTED']:,} rejected; reasons: {reasons}"
                  + ("; [red]drawdown breaker tripped[/]" if g["halted"] else ""))
    refused, expired = maker.order_rejects, getattr(maker.trader, "stats", dict)().get("expired", 0)
    if refused or expired:
        console.print("Orders of approved plans: "
                      + (f"{sum(refused.values()):,} refused by the broker ("
                         + ", ".join(f"{k} {v:,}" for k, v in sorted(refused.items())) + ")" if refused else "")
                      + ("; " if refused and expired else "")
                      + (f"{expired:,} expired unfilled" if expired else ""))

    att = maker.attribution()
    if att:
        a = Table(title=f"Attribution (last {min(top, len(att))} of {len(att):,} closed trades)", title_justify="left")
        for c in ("plan", "signal", "instrument", "side", "lots", "entry → exit (UTC)", "exit", "P&L", "R",
                  "top agents", "adapter"):
            a.add_column(c, justify="right" if c in ("lots", "P&L", "R") else "left", no_wrap=True)
        for x in att[-top:]:
            a.add_row(x.plan_id[:8], x.signal_id.split(":")[-1], x.instrument, "buy" if x.direction > 0 else "sell",
                      f"{x.lots:g}", f"{_short_ts(x.entry_ts)} → {_short_ts(x.exit_ts)}",
                      _EXIT.get(x.exit_reason, x.exit_reason), f"{x.pnl:+,.0f}",
                      "n/a" if math.isnan(x.r_multiple) else f"{x.r_multiple:+.2f}",
                      ",".join(str(i) for i in x.contributors[:2]) + ("…" if len(x.contributors) > 2 else ""),
                      x.adapter or "-")
        console.print(a)
        by = maker.by_agent(min(top, 10))
        if by:
            b = Table(title="Agents by attributed P&L (credit = their consensus-weight multiplier)",
                      title_justify="left")
            for c in ("agent", "trades", "attributed P&L", "credit"):
                b.add_column(c, justify="right")
            for aid, n, pnl, cr in by:
                b.add_row(str(aid), f"{n:,}", f"{pnl:+,.2f}", f"{cr:.3f}")
            console.print(b)
    feedback = (f"credit updates sent to the engine: {session.credited:,}" if session.credit
                else "credit feedback off")
    extra = ""
    if session.reasoning_waits:
        extra = f"; decisions waited for reasoning {session.reasoning_waits:,} times ({session.reasoning_timeouts:,} timed out)"
    console.print(f"{session.steps:,} time steps, {session.signals:,} signals in {wall:.2f}s; {feedback}{extra}")
    made = int(session.engine.stats()["signals"])
    if made > session.signals:  # an interrupt ended a step after the engine ran its bars
        console.print(f"(the engine made {made - session.signals:,} more signal(s), journaled, that the "
                      "interrupt kept from the decision maker)")


_EXIT = {"stop_loss": "stop", "take_profit": "target"}


def _short_ts(ns: int) -> str:
    import datetime as _dt

    return _dt.datetime.fromtimestamp(ns / 1e9, _dt.UTC).strftime("%m-%d %H:%M")


def _print_shadow(console: Any, r: Any, path: str) -> None:
    from rich.table import Table

    console.print(f"[bold]Shadow[/] {path}: live {r.live_plans:,} plans / {r.live_trades:,} trades / P&L "
                  f"{r.live_pnl:+,.2f}; candidate {r.candidate_plans:,} / {r.candidate_trades:,} / {r.candidate_pnl:+,.2f}")
    if not r.differs:
        console.print("Shadow: no difference in verdicts, sizes or fills")
        return
    console.print(f"Shadow differences: verdicts {r.verdicts_differ:,}, sizes {r.sizes_differ:,}, only live "
                  f"{r.only_live:,}, only candidate {r.only_candidate:,}, fills {r.fills_differ:,}")
    t = Table(title=f"First {len(r.examples)} differences", title_justify="left")
    t.add_column("kind")
    t.add_column("signal")
    t.add_column("live")
    t.add_column("candidate")
    for e in r.examples:
        if e["kind"] == "fills":
            t.add_row("fills", "", "; ".join(e["live"]) or "-", "; ".join(e["candidate"]) or "-")
        else:
            live = f"{e.get('live', '')} {e.get('live_size', '')} {' '.join(e.get('live_reasons', []))}".strip()
            cand = f"{e.get('candidate', '')} {e.get('candidate_size', '')} {' '.join(e.get('candidate_reasons', []))}".strip()
            t.add_row(e["kind"], e.get("signal_id", "").split(":")[-1], live or "-", cand or "-")
    console.print(t)
