"""``dynamic-core bridge mt5``: run the engine side of the MetaTrader 5 bridge.

:func:`add_parser` registers the ``mt5`` subcommand on the subparsers of ``dynamic-core
bridge``; :func:`cmd_bridge_mt5` runs it. Without ``--simulated-terminal`` the bridge waits for
a real EA and submits the plans of the ``plan_source`` hook; with it, the command also runs a
simulated market, an engine with a random population, and a :class:`SimulatedTerminal`, so the
whole path (signals -> plans -> orders -> acks -> fills) can be watched on one machine.

The plan hook
    ``plan_source(signals, bars) -> Iterable[TradingPlan]``.

    - ``--simulated-terminal``: called once per simulated time step with that step's signals
      (``SIGNAL_DTYPE`` array, possibly empty) and bars (``BAR_DTYPE``); every plan it yields is
      submitted. Plan validity is rescaled to wall-clock time (a plan valid for k bars stays
      valid for k x ``--bar-interval`` seconds), since simulated bars are timestamped in the past.
      Default: :func:`default_plan_source` (ATR stops and risk sizing of
      :func:`dynamic_core.decision.make_plan`).
    - otherwise: called once as ``plan_source(None, None)``; the iterable it returns may block
      between plans (a generator fed by the decision pipeline); each plan is submitted as it
      comes, until it ends (then the bridge keeps serving until ``--duration`` or Ctrl-C).
      Default: no plans (the bridge only keeps the session: handshake, heartbeats,
      reconciliation).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from ..._argtypes import int_range, nonnegative_float, positive_float, positive_int, seed
from ...cli import _instrument_choice, _timeframe, simulated_names
from ...instruments import MAX_NAME
from ...payloads import TradingPlan
from ...transport._common import check_address
from .bridge import ACKED, DEFAULT_BRIDGE_ADDRESS, QUEUED, SENT, BridgeReport, MT5Bridge
from .protocol import MAX_HEARTBEAT_MS, MAX_MISSED

__all__ = ["PlanSource", "add_parser", "cmd_bridge_mt5", "default_plan_source"]

PlanSource = Callable[[Any, Any], Iterable[TradingPlan]]

_EPILOG = """\
examples:
  dynamic-core bridge mt5 --simulated-terminal                       watch it work, all simulated
  dynamic-core bridge mt5 --simulated-terminal --bars 500 --bar-interval 0.01 --agents 5000
  dynamic-core bridge mt5 --bind tcp://127.0.0.1:5560 --heartbeat 1 --missed 3 \\
      --flatten-on-safe-mode                                        serve a real EA (no plans)

Without --simulated-terminal the command submits no plans: it only serves the session with
the EA (handshake, heartbeats, reconciliation, safe mode). Plans are submitted from Python:
dynamic_core.bridges.mt5.MT5Bridge(...).submit_plan(plan), or
cmd_bridge_mt5(args, plan_source=...) of dynamic_core.bridges.mt5.cli with a plan hook.

The EA connects a ZeroMQ DEALER to --bind and speaks the protocol of docs/mt5-bridge.md (flat
JSON, acks, re-sends with the same client_order_id, reconciliation after every reconnect, safe
mode after --missed silent heartbeats). Orders are never sent over PUB/SUB.

exit codes: 0 done; 1 an order was executed more than once, or the simulated terminal
never connected (simulated terminal only); 2 bad arguments; 130 interrupted.
"""


_IN_FLIGHT = (QUEUED, SENT, ACKED)  # states of an order the terminal has not yet taken


def _heartbeat(text: str) -> float:
    """A heartbeat interval the protocol can carry to the EA (whole ms, up to an hour)."""
    v = positive_float(text)
    if not 0.001 <= v <= MAX_HEARTBEAT_MS / 1000:
        raise argparse.ArgumentTypeError(f"must be in [0.001, {MAX_HEARTBEAT_MS // 1000}] s, got {text!r}")
    return v


def add_parser(subparsers: Any, formatter: type[argparse.HelpFormatter] | None = None) -> argparse.ArgumentParser:
    """Register ``mt5`` on ``subparsers`` (those of ``dynamic-core bridge``); returns the parser,
    whose ``func`` default is :func:`cmd_bridge_mt5`."""
    p = subparsers.add_parser(
        "mt5", help="run the MetaTrader 5 bridge (engine side), optionally with a simulated terminal",
        description="Serve a MetaTrader 5 EA over ZeroMQ (ROUTER): orders with acks, re-sends and "
                    "idempotent ids, heartbeats, position reconciliation and safe mode.",
        epilog=_EPILOG, formatter_class=formatter or argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bind", type=_bind_address, default=DEFAULT_BRIDGE_ADDRESS, metavar="ADDR",
                   help=f"address the bridge binds [default: {DEFAULT_BRIDGE_ADDRESS}]")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow binding beyond loopback (the protocol has no authentication)")
    p.add_argument("--heartbeat", type=_heartbeat, default=1.0, metavar="S",
                   help=f"heartbeat interval in seconds, 0.001 to {MAX_HEARTBEAT_MS // 1000} [default: 1]")
    p.add_argument("--missed", type=int_range(1, MAX_MISSED), default=3, metavar="N",
                   help=f"silent heartbeat intervals before safe mode, 1 to {MAX_MISSED} [default: 3]")
    p.add_argument("--resend-timeout", type=positive_float, default=0.5, metavar="S",
                   help="seconds without an ack before an order is re-sent (doubles per re-send) [default: 0.5]")
    p.add_argument("--magic", type=_magic, default=556001, help="MT5 magic number of the orders [default: 556001]")
    p.add_argument("--safe-mode", choices=("queue", "refuse"), default="queue",
                   help="what new orders do in safe mode [default: queue]")
    p.add_argument("--flatten-on-safe-mode", action="store_true",
                   help="on safe mode: drop queued orders, cancel unsettled ones and flatten the account "
                        "(at once, and again when the EA is back)")
    p.add_argument("--duration", type=positive_float, default=None, metavar="S",
                   help="stop after S seconds [default: until ^C, or the end of the simulation]")
    sim = p.add_argument_group("simulation")
    sim.add_argument("--simulated-terminal", action="store_true",
                     help="also run a simulated market, an engine and a simulated EA terminal (paper broker)")
    sim.add_argument("--instruments", type=_instruments, default="EURUSD,GBPUSD", metavar="K|NAMES",
                     help="simulated instruments: a count K (the first K of 'run --instruments') or a "
                          "comma list of names [default: EURUSD,GBPUSD]")
    sim.add_argument("--agents", type=positive_int, default=2000, metavar="N",
                     help="random agents of the engine [default: 2000]")
    sim.add_argument("--bars", type=positive_int, default=300, metavar="N",
                     help="simulated bars per instrument [default: 300]")
    sim.add_argument("--bar-interval", type=nonnegative_float, default=0.02, metavar="S",
                     help="wall-clock seconds between simulated bars (0: no pause) [default: 0.02]")
    sim.add_argument("--timeframe", type=_timeframe, default="H1", metavar="TF",
                     help="simulated bar length: H1, M15, D1, 1h, or seconds [default: H1]")
    sim.add_argument("--seed", type=seed, default=0, help="seed of the market and the population [default: 0]")
    sim.add_argument("-q", "--quiet", action="store_true", help="print only the summary")
    p.set_defaults(func=cmd_bridge_mt5)
    return p


def _bind_address(s: str) -> str:
    try:
        return check_address(s, bind=True, allow_remote=True)  # the loopback rule: MT5Bridge, with --allow-remote
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _instruments(text: str) -> list[str]:
    """``--instruments``: the type of ``run --instruments`` (a count or a comma list of names),
    resolved to names, each a valid instrument name."""
    choice = _instrument_choice(text)
    names = simulated_names(choice) if isinstance(choice, int) else choice
    for n in names:
        if len(n) > MAX_NAME or not n.isprintable():
            raise argparse.ArgumentTypeError(f"invalid instrument name {n!r}: 1-{MAX_NAME} printable characters")
    return names


_magic = int_range(0, 2**63 - 1, span="0..2**63-1 (an MQL5 long)")


def default_plan_source(equity: float = 100_000.0, min_score: float = 0.02) -> PlanSource:
    """A plan hook built on :class:`dynamic_core.decision.DecisionMaker`: ATR stops (Wilder, 14),
    risk sizing on ``equity``, a plan for every signal whose action is BUY/SELL or stronger or
    whose fused score reaches ``min_score`` (random populations rarely agree on an action), valid
    for 3 bars, judged by the risk governor with its default limits. The governor judges against
    an engine-side paper book that takes the same orders (filled at the next bar's open), so
    limits, cooldowns and the drawdown breaker apply as in ``run --paper``; the terminal's own
    account is the one of record, and reconciliation shows any drift."""
    from ...decision import DecisionMaker, PlanConfig
    from ..paper import PaperBroker

    maker = DecisionMaker(PaperBroker(equity=equity), plan=PlanConfig(min_score=min_score, valid_bars=3))

    def source(signals: Any, bars: Any) -> Iterable[TradingPlan]:
        if bars is None:
            return ()
        maker.on_bars(bars)
        if signals is None or not len(signals):
            return ()
        return [d.plan for d in maker.on_signals(signals) if d.verdict != "REJECTED"]

    source.maker = maker  # type: ignore[attr-defined]
    return source


def _printer(quiet: bool) -> Callable[[BridgeReport], None]:
    def on_report(r: BridgeReport) -> None:
        if not quiet:
            print(f"  {r.client_order_id} {r.status:<9} {r.side:<4} {r.volume:g} {r.symbol} @ {r.price:.5f}"
                  f"  ({r.source}{', ' + r.reason if r.reason else ''})", flush=True)
    return on_report


def cmd_bridge_mt5(args: argparse.Namespace, plan_source: PlanSource | None = None) -> int:
    """Run ``dynamic-core bridge mt5`` (see the module docstring for ``plan_source``)."""
    bridge = MT5Bridge(args.bind, heartbeat=args.heartbeat, missed=args.missed, resend_timeout=args.resend_timeout,
                       resend_max_delay=max(5.0, args.resend_timeout), magic=args.magic, safe_mode=args.safe_mode,
                       flatten_on_safe_mode=args.flatten_on_safe_mode, allow_remote=args.allow_remote)
    quiet = bool(getattr(args, "quiet", False))
    bridge.on_report(_printer(quiet))
    print(f"mt5 bridge on {bridge.address} (epoch {bridge.epoch}, heartbeat {args.heartbeat:g}s, "
          f"safe mode after {args.missed} missed, {args.safe_mode} policy"
          f"{', flatten on safe mode' if args.flatten_on_safe_mode else ''})", flush=True)
    try:
        if args.simulated_terminal:
            return _run_simulated(args, bridge, plan_source, quiet)
        return _run_serving(args, bridge, plan_source)
    finally:
        bridge.close()


def _watch_link(bridge: MT5Bridge, last: list[str]) -> None:
    if bridge.link != last[0]:
        last[0] = bridge.link
        print(f"link: {bridge.link}", flush=True)


def _run_serving(args: argparse.Namespace, bridge: MT5Bridge, plan_source: PlanSource | None) -> int:
    end = None if args.duration is None else time.monotonic() + args.duration
    last = [""]
    if plan_source is not None:
        for plan in plan_source(None, None):
            bridge.submit_plan(plan)
            _watch_link(bridge, last)
            if end is not None and time.monotonic() >= end:
                break
    while end is None or time.monotonic() < end:
        _watch_link(bridge, last)
        time.sleep(0.1)
    _summary(bridge, None)
    return 0


def _run_simulated(args: argparse.Namespace, bridge: MT5Bridge, plan_source: PlanSource | None, quiet: bool) -> int:
    from ... import Engine, Population
    from ...sim import MarketSimulator
    from .terminal import SimulatedTerminal

    names = list(args.instruments)
    if not names:
        raise ValueError("--instruments needs at least one name")
    sim = MarketSimulator(names, timeframe=args.timeframe, seed=args.seed)
    pop = Population.random(args.agents, names, [sim.timeframe], seed=args.seed)
    term = SimulatedTerminal(bridge.address, heartbeat=min(args.heartbeat, 1.0))
    source = plan_source if plan_source is not None else default_plan_source(term.broker.equity)
    end = None if args.duration is None else time.monotonic() + args.duration
    last = [""]
    tf_ns = sim.timeframe * 1_000_000_000
    submitted = 0
    try:
        with Engine(pop) as eng:
            if not bridge.wait_until(lambda: bridge.link == "live", 10.0):
                print(f"dynamic-core bridge mt5: the simulated terminal did not connect to {bridge.address} within "
                      f"10 s (link {bridge.link}; rejected frames {bridge.stats()['rejected']})", file=sys.stderr)
                return 1
            _watch_link(bridge, last)
            for step in range(args.bars):
                bars = sim.bars(1)
                wall = time.time_ns()
                for b in bars:
                    term.on_bar(sim.names[list(sim.ids).index(int(b["instrument"]))], wall, float(b["open"]),
                                float(b["high"]), float(b["low"]), float(b["close"]))
                sig = eng.run(bars)
                sent = []
                for plan in source(sig, bars):
                    bars_valid = max(0.0, (plan.valid_until - plan.ts) / tf_ns)
                    wall_valid = wall + int(bars_valid * args.bar_interval * 1e9) + 1_000_000_000
                    plan = msgspec.structs.replace(plan, valid_until=wall_valid)
                    sent.append(bridge.submit_plan(plan))
                    submitted += 1
                # the terminal takes this bar's orders at this bar's prices before the next bar
                # comes (with --bar-interval 0 it raced them: the same seed gave other results)
                bridge.wait_until(lambda: all((o := bridge.order(c)) is None or o["state"] not in _IN_FLIGHT
                                              for c in sent), 5.0)
                _watch_link(bridge, last)
                if end is not None and time.monotonic() >= end:
                    break
                if args.bar_interval > 0:
                    time.sleep(args.bar_interval)
            bridge.wait_until(lambda: bridge.stats()["open"] == 0, 5.0)
        ex = term.executions()
        twice = {k: n for k, n in ex.items() if n > 1}
        _summary(bridge, term)
        print(f"plans submitted {submitted}, orders executed at the terminal {len(ex)}, "
              f"executed more than once {len(twice)}", flush=True)
        return 1 if twice else 0
    finally:
        term.close()


def _summary(bridge: MT5Bridge, term: Any) -> None:
    st = bridge.stats()
    states = ", ".join(f"{k} {v}" for k, v in sorted(st["states"].items())) or "none"
    print(f"orders: {states}", flush=True)
    print(f"sent {st['sent']}, re-sent {st['resends']}, acks {st['acks']}, reports {st['exec_reports']}, "
          f"sessions {st['sessions']}, reconciliations {st['reconciliations']}, safe mode entries "
          f"{st['safe_mode_entries']}, rejected frames {st['rejected']}", flush=True)
    if term is not None:
        pos = term.positions()
        print(f"terminal: {len(pos)} open positions, equity {term.broker.equity:,.2f}", flush=True)
    sys.stdout.flush()
