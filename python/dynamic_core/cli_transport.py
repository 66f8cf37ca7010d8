"""``dynamic-core subscribe``, ``ctl``, ``keys`` and the socket options of ``run``.

Kept apart from :mod:`dynamic_core.cli` (which registers these subcommands) so each command
family stays readable. zmq is imported only when one of these commands runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ._argtypes import count, positive_float

__all__ = ["add_commands", "add_run_options", "cmd_run_service", "wants_service"]

_SUBSCRIBE_EPILOG = """\
examples:
  dynamic-core subscribe tcp://127.0.0.1:5556                    every signal, one line each
  dynamic-core subscribe ipc:///tmp/dc-signals --topic sig.EURUSD. --count 10
  dynamic-core subscribe tcp://127.0.0.1:5556 --json | jq .score   JSON lines for other tools
  dynamic-core subscribe tcp://127.0.0.1:5556 --topic sig. --topic rat.   signals and rationales

Signals are on topics sig.<instrument>.<timeframe seconds> (sig.EURUSD.3600), rationales on
rat.<instrument>.<timeframe seconds>; the default topic is sig. (signals only). --topic is a
prefix, so end it with a dot to match one instrument exactly. The feed may publish msgpack
(default) or JSON; both are read. Sequence gaps (messages the publisher dropped because this
subscriber was slow) and publisher restarts (a new epoch) are reported on stderr, and counted
in the summary.

exit codes: 0 done (--count reached, or interrupted); 1 nothing received within --timeout.
"""

_CTL_EPILOG = """\
commands:
  pause                      stop taking market updates (they queue in the ingress socket)
  resume                     take them again
  throttle N                 at most N bars per second (0 = unlimited)
  persona NAME               switch the reasoning persona
  routing CLASS=PROVIDERS ... replace the reasoning mesh's routing table: tasks of request
                             class CLASS (tactical, deep, multilingual, regional-CN, numeric
                             or *; narrow it with CLASS/PERSONA or CLASS/PERSONA/ASSET) go to
                             PROVIDERS (comma-separated, most preferred first) ahead of the
                             policy's rules; refused (exit 1) if it names an unknown provider
  routing clear              drop that table: the policy's rules alone again
  snapshot PATH              write the agents' state to PATH (.npy) on the server, relative
                             to its snapshot directory (run --snapshot-dir) and confined to it
  health                     the engine's and the service's counters
  load-population PATH       load a population .npy on the server: refused while the engine
                             runs (exit 1)

examples:
  dynamic-core keys new keys --name server
  dynamic-core keys new keys/clients --name ops
  dynamic-core run --feed tcp://127.0.0.1:5555 --publish tcp://127.0.0.1:5556 \\
      --control tcp://127.0.0.1:5557 --server-key keys/server.key_secret --authorized keys/clients
  dynamic-core ctl tcp://127.0.0.1:5557 health --server-key keys/server.key \\
      --client-key keys/clients/ops.key_secret

The reply's result is printed as JSON. The connection is CURVE-encrypted and the server only
answers clients whose public key (.key) is in its authorised directory; an unknown key gets
no answer at all, so the command times out.

exit codes: 0 ok; 1 the server refused the command; 2 bad arguments or no reply.
"""

_KEYS_EPILOG = """\
examples:
  dynamic-core keys new keys --name server          keys/server.key + keys/server.key_secret
  dynamic-core keys new keys/clients --name ops     a client; keys/clients is what the server
                                                    authorises (every .key file in it)

Give the server's .key to clients, keep every .key_secret private (it is written with mode
0600). To authorise a client, copy its .key into the server's --authorized directory.
"""


def add_commands(sub: Any, formatter: type[argparse.HelpFormatter]) -> None:
    """Register ``subscribe``, ``ctl`` and ``keys`` on the ``dynamic-core`` subparsers."""
    s = sub.add_parser(
        "subscribe", help="print a signal feed (ZeroMQ SUB)",
        description="Connect to a dynamic-core signal feed and print every signal as it arrives, "
                    "with sequence-gap and restart detection.",
        epilog=_SUBSCRIBE_EPILOG, formatter_class=formatter)
    s.add_argument("address", metavar="ADDR", help="the feed's address, e.g. tcp://127.0.0.1:5556 or ipc:///tmp/dc")
    s.add_argument("--json", action="store_true", help="print one JSON object per signal (and rationale)")
    s.add_argument("--topic", action="append", default=None, metavar="PREFIX",
                   help="topic prefix to subscribe to; repeatable; rationales are on rat. "
                        "[default: sig. (all signals)]")
    s.add_argument("--count", type=count, default=0, metavar="N", help="exit after N signals [default: run until ^C]")
    s.add_argument("--timeout", type=positive_float, default=None, metavar="S",
                   help="exit with status 1 if nothing (not even a heartbeat) arrives for S seconds")
    s.add_argument("--heartbeats", action="store_true", help="also print heartbeats")
    s.set_defaults(func=cmd_subscribe)

    c = sub.add_parser(
        "ctl", help="send a control command over the CURVE control plane",
        description="Send one command to a running service's control socket and print the reply.",
        epilog=_CTL_EPILOG, formatter_class=formatter)
    c.add_argument("address", metavar="ADDR", help="the control socket, e.g. tcp://127.0.0.1:5557")
    c.add_argument("ctl_command", metavar="COMMAND",
                   choices=("pause", "resume", "throttle", "persona", "routing", "snapshot", "health",
                            "load-population"),
                   help="pause, resume, throttle, persona, routing, snapshot, health, load-population")
    c.add_argument("args", nargs="*", metavar="ARG", help="the command's arguments (see below)")
    c.add_argument("--server-key", required=True, metavar="FILE", help="the server's public key file (.key)")
    c.add_argument("--client-key", required=True, metavar="FILE",
                   help="this client's secret key file (.key_secret); its .key must be authorised")
    c.add_argument("--timeout", type=positive_float, default=5.0, metavar="S",
                   help="seconds to wait for the reply [default: 5]")
    c.add_argument("--json-wire", action="store_true", help="send the command as JSON instead of msgpack")
    c.set_defaults(func=cmd_ctl)

    k = sub.add_parser("keys", help="create CURVE key pairs for the control plane",
                       description="Create CURVE key pairs (pyzmq certificate files) for the control plane.",
                       epilog=_KEYS_EPILOG, formatter_class=formatter)
    ksub = k.add_subparsers(dest="keys_command", metavar="ACTION", title="actions")
    kn = ksub.add_parser("new", help="write NAME.key (public) and NAME.key_secret (secret, 0600) in DIR",
                         epilog=_KEYS_EPILOG, formatter_class=formatter)
    kn.add_argument("dir", metavar="DIR", help="directory for the key files (created if missing)")
    kn.add_argument("--name", default="client", help="file name stem [default: client]")
    kn.add_argument("--force", action="store_true", help="replace existing files of that name")
    kn.set_defaults(func=cmd_keys_new)
    k.set_defaults(func=lambda a: _need_action(k))


def _need_action(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def add_run_options(r: argparse.ArgumentParser) -> None:
    """The socket options of ``dynamic-core run``."""
    g = r.add_argument_group(
        "sockets (any of these runs the engine as a service; every address binds loopback "
        "unless --allow-remote)")
    g.add_argument("--publish", default=None, metavar="ADDR",
                   help="publish signals here (PUB), e.g. tcp://127.0.0.1:5556 or ipc:///tmp/dc-signals")
    g.add_argument("--feed", default=None, metavar="ADDR",
                   help="take market bars from here (PULL, PreparedMarketContext frames, as sent by "
                        "dynamic_core.transport.MarketSender) instead of the simulator/--data; serves "
                        "until --duration or ^C")
    g.add_argument("--feed-kind", choices=("pull", "sub"), default=None,
                   help="with --feed: pull binds ADDR for PUSH senders; sub connects to a market PUB "
                        "[default: pull]")
    g.add_argument("--control", default=None, metavar="ADDR",
                   help="CURVE control socket (ROUTER); needs --server-key and --authorized")
    g.add_argument("--server-key", default=None, metavar="FILE",
                   help="the control server's secret key file (.key_secret; see 'dynamic-core keys new')")
    g.add_argument("--authorized", default=None, metavar="DIR",
                   help="directory of authorised client public keys (*.key)")
    g.add_argument("--snapshot-dir", default=None, metavar="DIR",
                   help="with --control: where 'ctl snapshot PATH' writes (PATH is relative to DIR and "
                        "confined to it; DIR is created, mode 0700, at the first snapshot) "
                        "[default: JOURNAL/snapshots with --journal, else ./snapshots]")
    # --json-feed, --heartbeat and --wait-subscribers are refused without --publish (cli.py's
    # _options_need_their_parent); None marks "not given" there, which sets the defaults
    g.add_argument("--json-feed", action="store_true", help="with --publish: publish JSON instead of msgpack")
    g.add_argument("--heartbeat", type=positive_float, default=None, metavar="S",
                   help="with --publish: heartbeat after S idle seconds [default: 1]")
    g.add_argument("--wait-subscribers", type=count, default=None, metavar="N",
                   help="with --publish: before sending bars, wait (up to 30 s) until N subscribers are "
                        "connected; a subscriber counts once it subscribes to heartbeats (topic 'hb', or "
                        "everything: 'dynamic-core subscribe' and SignalSubscriber do) [default: 0]")
    g.add_argument("--duration", type=positive_float, default=None, metavar="S",
                   help="serve for S seconds (with --feed: default until ^C; without: default until "
                        "every bar's signal is published)")
    g.add_argument("--allow-remote", action="store_true",
                   help="allow binding addresses beyond loopback (the feed and ingress are unauthenticated)")


def wants_service(args: argparse.Namespace) -> bool:
    # --snapshot-dir too: cmd_run_service says it needs --control instead of ignoring it
    return any(getattr(args, a, None) for a in ("publish", "feed", "control", "snapshot_dir"))


# ---- subscribe -------------------------------------------------------------------------------

def cmd_subscribe(args: argparse.Namespace) -> int:
    import msgspec

    from .cli import tf_label
    from .payloads import Heartbeat, RationaleUpdate, SignalBatch
    from .records import Action
    from .transport import SignalSubscriber

    out = sys.stdout
    enc = msgspec.json.Encoder()

    def gap(g: Any) -> None:
        where = "at heartbeat" if g.at_heartbeat else "at batch"
        print(f"gap on {_shown(str(g.topic))}: expected feed seq {g.expected}, got {g.got} ({g.missed} signal(s) missed, {where})",
              file=sys.stderr, flush=True)

    def epoch(e: Any) -> None:
        print(f"publisher restarted: epoch {e.old:#x} -> {e.new:#x}", file=sys.stderr, flush=True)

    n, rc = 0, 0
    with SignalSubscriber(args.address, topics=args.topic or ["sig."], on_gap=gap, on_epoch=epoch) as sub:
        try:
            while not args.count or n < args.count:
                msg = sub.recv(timeout=args.timeout)
                if msg is None:
                    print(f"dynamic-core: no message within {args.timeout} s from {args.address}",
                          file=sys.stderr)
                    rc = 1
                    break
                if isinstance(msg, SignalBatch):
                    for s in msg.signals[: (args.count - n) if args.count else None]:
                        if args.json:
                            out.write(enc.encode(s).decode() + "\n")
                        else:
                            t = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(s.ts / 1e9))
                            out.write(f"{t}  {_shown(s.instrument):<8} {tf_label(s.timeframe):<4} signal seq {s.seq:<8} "
                                      f"{Action(s.action).name:<11} score {s.score:+.4f}  conf {s.confidence:.3f}  "
                                      f"agree {s.agreement:.3f}  agents {s.n_agents}\n")
                        n += 1
                    out.flush()
                elif isinstance(msg, RationaleUpdate):
                    if args.json:
                        out.write(enc.encode(msg).decode() + "\n")
                    else:
                        out.write(f"rationale for {_shown(str(msg.signal_id))} ({_shown(msg.provider)}): {_shown(msg.text, True)}\n")
                    out.flush()
                elif isinstance(msg, Heartbeat) and args.heartbeats:
                    out.write(enc.encode(msg).decode() + "\n" if args.json
                              else f"heartbeat {msg.seq} epoch {msg.epoch:#x}\n")
                    out.flush()
        except KeyboardInterrupt:
            pass
        st = sub.stats()
    print(f"received {n} signal(s); {st['gap_signals']} missed in {st['gaps']} gap(s); "
          f"{st['epoch_changes']} restart(s); {st['rejected']} bad frame(s)", file=sys.stderr)
    return rc


# ---- ctl -------------------------------------------------------------------------------------

def _command(name: str, argv: list[str]) -> Any:
    from . import payloads as P

    def need(k: int, usage: str) -> None:
        if len(argv) != k:
            raise ValueError(f"usage: ctl ADDR {usage}")

    if name == "pause":
        need(0, "pause")
        return P.Pause()
    if name == "resume":
        need(0, "resume")
        return P.Resume()
    if name == "health":
        need(0, "health")
        return P.HealthQuery()
    if name == "throttle":
        need(1, "throttle BARS_PER_SECOND")
        try:
            v = float(argv[0])
        except ValueError:
            raise ValueError(f"throttle: {argv[0]!r} is not a number of bars per second") from None
        if not v >= 0 or v == float("inf"):
            raise ValueError("throttle: bars per second must be a finite number >= 0")
        return P.SetThrottle(max_bars_per_s=v)
    if name == "persona":
        need(1, "persona NAME")
        return P.SwapPersona(persona=argv[0])
    if name == "routing":
        if not argv:
            raise ValueError("routing: give CLASS[/PERSONA[/ASSET_CLASS]]=PROVIDER[,PROVIDER...] pairs, "
                             "or 'clear' to drop the table")
        if argv == ["clear"]:
            return P.UpdateRouting(table={})
        table = {}
        for item in argv:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ValueError(f"routing: expected KEY=VALUE, got {item!r}")
            table[key] = value
        from .reasoning.policy import routing_rules

        routing_rules(table)  # PolicyError (a ValueError) naming what does not parse
        return P.UpdateRouting(table=table)
    if name == "snapshot":
        need(1, "snapshot PATH")
        return P.Snapshot(path=argv[0])
    if name == "load-population":
        need(1, "load-population PATH")
        return P.LoadPopulation(path=argv[0])
    raise ValueError(f"unknown command {name!r}")  # pragma: no cover - argparse choices


def cmd_ctl(args: argparse.Namespace) -> int:
    from .transport import ControlClient

    cmd = _command(args.ctl_command, list(args.args))
    from .transport.keys import _regular_file

    # checked before connecting, with the key loader's own message (which never echoes an
    # argument that looks like key text: a secret pasted in place of a file name)
    _regular_file(args.server_key, "server key file")
    _regular_file(args.client_key, "client key file")
    with ControlClient(args.address, server_key=args.server_key, client_key=args.client_key,
                       fmt="json" if args.json_wire else "msgpack", timeout=args.timeout) as c:
        reply = c.request(cmd)
    if not reply.ok:
        print(f"dynamic-core: error: server refused {args.ctl_command}: {reply.error}", file=sys.stderr)
        return 1
    print(json.dumps(reply.result, indent=2, sort_keys=True, default=str))
    return 0


# ---- keys ------------------------------------------------------------------------------------

def cmd_keys_new(args: argparse.Namespace) -> int:
    from .transport import load_public_key, new_keypair

    public_file, secret_file = new_keypair(args.dir, args.name, overwrite=args.force)
    print(f"public key : {public_file}  ({load_public_key(public_file).decode()})")
    print(f"secret key : {secret_file}  (mode 0600: keep it private)")
    return 0


# ---- run as a service ------------------------------------------------------------------------

def cmd_run_service(args: argparse.Namespace) -> int:
    """``dynamic-core run`` with --publish/--feed/--control: the engine behind sockets.

    SIGTERM (systemd, docker, kill) stops it as ^C does: the bars the engine took have their
    signals published, the summary is printed, exit 130. Once the stop has begun, a further ^C
    or SIGTERM is noted and ignored: the stop is bounded, and cutting it short would close the
    sockets and the engine under the service's threads."""
    with _stop_signals():
        return _serve(args)


_STOPPING_NOTE = b"dynamic-core: already stopping (publishing the signals of the bars taken); please wait\n"


@contextlib.contextmanager
def _stop_signals() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, as ^C does, until :func:`_hold_stop_signals`; both
    handlers are put back on the way out. Only the main thread can set handlers: elsewhere
    (a caller's own thread) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def _hold_stop_signals() -> None:
    """From here on ^C and SIGTERM do not raise: the service is stopping (see cmd_run_service)."""
    if threading.current_thread() is not threading.main_thread():
        return
    told = []

    def note(signum: int, frame: Any) -> None:
        if not told:  # os.write: print() here could re-enter a print the main thread is in
            told.append(True)
            with contextlib.suppress(OSError):
                os.write(2, _STOPPING_NOTE)

    signal.signal(signal.SIGINT, note)
    signal.signal(signal.SIGTERM, note)


def _serve(args: argparse.Namespace) -> int:
    from .cli import CLIError, _run_population, load_bars, simulated_names, tf_label
    from .engine import Engine
    from .instruments import instruments
    from .transport import ControlServer, EngineService, MarketIngress, SignalFeed

    if args.control and not (args.server_key and args.authorized):
        raise CLIError("--control needs --server-key FILE (.key_secret) and --authorized DIR")
    if getattr(args, "snapshot_dir", None) and not args.control:
        raise CLIError("--snapshot-dir only makes sense with --control ADDR (snapshots are control commands)")
    moot = [o for o, given in (("--data", args.data is not None), ("--bars", args.bars is not None),
                               ("--chunk", args.chunk is not None)) if given]
    if args.feed and moot:
        raise CLIError(f"--feed takes bars from the socket; {', '.join(moot)} "
                       f"{'does' if len(moot) == 1 else 'do'} not apply (the population follows "
                       "--instruments and --timeframe)")
    choice = 4 if args.instruments is None else args.instruments
    names = simulated_names(choice) if isinstance(choice, int) else choice
    bars = load_bars(None if args.feed else args.data, sim_names=names,
                     bars=8 if args.feed else args.bars, timeframe=args.timeframe, seed=args.seed,
                     dayfirst=getattr(args, "dayfirst", False) or None)
    pop = _run_population(bars, args.agents, args.seed)
    journal = getattr(args, "journal", None)
    if journal and os.path.isdir(journal) and os.listdir(journal):
        # the engine opens it only after the sockets (below); a directory it would refuse is
        # refused now, before the banner and any wait for subscribers
        raise CLIError(f"--journal {journal} is not empty: give a new or empty directory (a journal owns its "
                       "directory)")
    extra = {"journal": journal, "fsync": getattr(args, "fsync", 0)} if journal else {}
    # snapshots are always confined to a directory: a control client must not write anywhere
    # the server process can
    snapshot_dir = Path(getattr(args, "snapshot_dir", None) or (
        os.path.join(journal, "snapshots") if journal else "snapshots")).resolve()
    own_ingress = not args.feed
    ingress_addr = args.feed or f"inproc://dynamic-core-run-{os.getpid()}"
    parts: list[Any] = []
    sender_thread = None
    stop_sender = threading.Event()
    feed_ctx = None
    eng = None
    svc = None
    try:
        # every socket is bound, every key loaded and the audience waited for before the engine
        # opens its journal: a start that fails (a busy port, a missing key file, too few
        # subscribers) leaves no journal behind, and the same --journal works on the retry
        ingress = MarketIngress(ingress_addr, kind=args.feed_kind if args.feed else "pull",
                                bind=None if args.feed else True, allow_remote=args.allow_remote)
        parts.append(ingress)
        feed = None
        if args.publish:
            import zmq

            # the feed's own context: ending it below waits (up to the feed's linger) for the
            # last signals to leave, which the process's exit would otherwise cut short
            feed_ctx = zmq.Context()
            feed = SignalFeed(args.publish, fmt="json" if args.json_feed else "msgpack",
                              heartbeat_interval=args.heartbeat, allow_remote=args.allow_remote,
                              context=feed_ctx)
            parts.append(feed)
        control = None
        if args.control:
            control = ControlServer(args.control, secret_key=args.server_key, authorized_keys=args.authorized,
                                    allow_remote=args.allow_remote)
            parts.append(control)
        mesh = None
        if getattr(args, "reasoning", None):
            from .cli_reasoning import mesh_from_args

            mesh = mesh_from_args(args)
            parts.append(mesh)
        streams = sorted({(instruments.name(int(i)), int(t)) for i, t in zip(pop.records["instrument"],
                                                                                pop.records["timeframe"])})
        print(f"dynamic-core run (service): {len(pop):,} agents over "
              f"{', '.join(f'{n} {tf_label(t)}' for n, t in streams)}", flush=True)
        print(f"  market in : {ingress.endpoint}" + ("" if args.feed else f" ({len(bars):,} bars from "
                                                                            f"{args.data or 'the simulator'})"),
              flush=True)
        if feed is not None:
            print(f"  signals   : {feed.endpoint} ({feed.fmt}, epoch {feed.epoch:#018x})", flush=True)
        if control is not None:
            print(f"  control   : {control.endpoint} (CURVE, server public key {control.public_key}, "
                  f"{control.stats()['authorised_keys']} authorised client key(s))", flush=True)
            print(f"  snapshots : {snapshot_dir}", flush=True)
        if journal:
            print(f"  journal   : {journal}", flush=True)
        if mesh is not None:
            print(f"  reasoning : {mesh.address} ({', '.join(mesh.providers)}; rationales on rat.* topics)",
                  flush=True)
        if feed is not None and args.wait_subscribers and \
                not feed.wait_for_subscribers(args.wait_subscribers, timeout=30.0):
            raise CLIError(f"fewer than {args.wait_subscribers} subscriber(s) after 30 s")
        eng = Engine(pop, cores_per_sm=args.cores_per_sm, **extra)
        # without a feed the egress thread still drains the engine, or a full window would block
        svc = EngineService(eng, ingress=ingress, feed=feed, control=control, mesh=mesh,
                            on_signals=None if feed is not None else (lambda s: None),
                            snapshot_dir=snapshot_dir, create_snapshot_dir=True)
        if own_ingress:
            sender_thread = threading.Thread(target=_push_bars, daemon=True, name="dc-run-sender",
                                             args=(ingress_addr, bars, max(1, args.chunk or 256), stop_sender))
            sender_thread.start()
        t0 = time.monotonic()
        svc.start()
        interrupted = False
        try:
            while True:
                time.sleep(0.02)
                if svc.error is not None:
                    break  # the loop ended by an exception: said below, exit 1
                if args.duration is not None and time.monotonic() - t0 >= args.duration:
                    break
                if own_ingress and args.duration is None and svc.bars_submitted >= len(bars):
                    _drain(eng, svc, feed)
                    break
        except KeyboardInterrupt:
            interrupted = True
        _hold_stop_signals()
        if mesh is not None and not interrupted:
            mesh.wait_idle(timeout=mesh.deadline_s + 1.0)
        svc.stop()  # its egress thread publishes the last rationales on its way out
        st = eng.stats()
        print(f"bars submitted {svc.bars_submitted:,}, accepted {st['accepted']:,}, rejected {st['rejected']:,}; "
              f"signals {st['signals']:,}"
              + (f", published {svc.signals_published:,}" if feed is not None else " (no --publish: none published)")
              + f"; control commands {svc.commands}; "
              f"ingress rejects {ingress.stats()['rejected']}", flush=True)
        if mesh is not None:
            from .cli import _console
            from .cli_reasoning import mesh_summary

            print(f"rationales published {svc.rationales_published:,}", flush=True)
            mesh_summary(_console(), mesh)
        if svc.error is not None:
            print(f"run: the service loop ended early: {svc.error}", file=sys.stderr, flush=True)
            return 1
        return 130 if interrupted else 0
    finally:
        _hold_stop_signals()  # an error or a ^C before the loop ends here too
        if sender_thread is not None:
            stop_sender.set()
            sender_thread.join(timeout=5)
        # the service closes its own sockets once its threads have ended (never under them);
        # what it does not own (the mesh, or every part when it was never made) is closed here
        closed = svc.close() if svc is not None else True
        for p in parts:
            if svc is None or p not in (svc.ingress, svc.feed, svc.control):
                p.close()
        if feed_ctx is not None and closed:
            feed_ctx.destroy()  # returns once the feed's queue is out or its close linger is over
        if eng is not None:
            # the journal ends cleanly; a service thread still running (a stop that timed out)
            # finds the engine closed, which it reports, rather than a socket closed under it
            eng.close()


def _push_bars(address: str, bars: Any, chunk: int, stop: threading.Event) -> None:
    """Sender thread of ``run`` without --feed: the bars go through the same ingress socket as
    a live feed, so Pause and SetThrottle act on them too. Owns its socket."""
    import zmq

    from .payloads import split_bars
    from .transport import MarketSender

    with MarketSender(address, kind="push", send_timeout=0.1) as sender:
        for ctx in split_bars(bars, chunk):
            while not stop.is_set():
                try:
                    sender.send_context(ctx)
                    break
                except zmq.Again:  # ingress paused or throttled: its queue is full
                    continue
            if stop.is_set():
                sender.close(linger=0)
                return


def _shown(text: str, lines: bool = False) -> str:
    """``text`` for a terminal: control characters (escape sequences a publisher could send
    to move the cursor, retitle the window or clear the screen) written as ``\\x1b`` etc.;
    with ``lines``, newlines and tabs kept."""
    if text.isprintable():
        return text
    keep = "\n\t" if lines else ""
    return "".join(c if c.isprintable() or c in keep else repr(c)[1:-1] for c in text)


def _drain(eng: Any, svc: Any, feed: Any, timeout: float = 10.0) -> None:
    """Wait until every submitted bar's signal has left (or ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = eng.stats()
        if st["in_flight"] == 0 and (feed is None or svc.signals_published >= st["signals"]):
            return
        time.sleep(0.01)
