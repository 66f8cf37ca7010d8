"""``dynamic-core journal`` and ``dynamic-core replay``: inspect, verify, repair and replay journals.

Kept apart from :mod:`dynamic_core.cli` (which registers these subcommands) so each command
family stays readable.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from typing import Any

from . import journal as jr
from ._argtypes import int_range
from .engine import MAX_THREADS
from .errors import JournalCorrupt, JournalError, ReplayMismatch

__all__ = ["add_commands"]

_DUMP = "dynamic-core journal dump"  # how their stderr lines begin, as the other commands' do
_REPLAY = "dynamic-core replay"

_JOURNAL_EPILOG = """\
examples:
  dynamic-core run --journal runs/today --fsync 1      # write a journal while running
  dynamic-core journal verify runs/today               # check every record's framing and CRC32C
  dynamic-core journal verify runs/today --repair      # truncate a torn tail after a crash
  dynamic-core journal dump runs/today --limit 20      # list records (type, seq, size, place)
  dynamic-core replay runs/today --verify              # reproduce the signals bit for bit

exit codes: 0 ok; 1 corrupt or unreadable journal, replay mismatch, or (replay --verify) no
signal with a journaled hash to check it against (signals handed out after the last hash was
journaled are only noted), and, for verify and dump, a torn tail not repaired (verify --repair
refuses while a run still writes the journal); 2 bad arguments or no journal there (no
segments, or no records in them).
"""


def add_commands(sub: Any, formatter: type[argparse.HelpFormatter]) -> None:
    from .cli import _count

    j = sub.add_parser(
        "journal", help="verify (--repair a torn tail) or dump an append-only journal",
        description="Inspect the append-only journal an engine writes with --journal DIR: "
                    "segment files of length-prefixed, CRC32C-checked records (the population "
                    "and configuration, every accepted bar before it was processed, rejected "
                    "bars (dead letters), control commands, and the hash of every signal handed out).",
        epilog=_JOURNAL_EPILOG, formatter_class=formatter)
    jsub = j.add_subparsers(dest="journal_command", metavar="ACTION", title="actions")
    v = jsub.add_parser("verify", help="check framing, sequence and CRC32C of every record",
                        description="Walk every record. A torn tail (the last record cut short by "
                                    "a crash) is reported and, with --repair, truncated; corruption "
                                    "anywhere else is reported with its segment and byte offset.",
                        epilog=_JOURNAL_EPILOG, formatter_class=formatter)
    v.add_argument("dir", metavar="DIR", help="journal directory")
    v.add_argument("--repair", action="store_true",
                   help="truncate a torn tail so the journal replays cleanly (refused while a run still "
                        "writes the journal: the tail is reported, not repaired, exit 1)")
    v.set_defaults(func=cmd_journal_verify)
    d = jsub.add_parser("dump", help="list records: type, sequence number, size and place",
                        description="List the journal's records in order, one line each: sequence "
                                    f"number, type ({', '.join(jr._TYPE_NAMES.values())}), "
                                    "payload size, segment and byte offset; then how many more there "
                                    "are and the count of each type. The first --limit N intact records "
                                    "are listed (default 50; --limit 0 lists every one). A torn tail "
                                    "(the last record cut short by a crash) or a corrupt record is "
                                    "reported on stderr and the exit status is 1 ('journal verify DIR "
                                    "--repair' truncates a torn tail). On a terminal a progress bar "
                                    "of bytes read shows on stderr.",
                        epilog=_JOURNAL_EPILOG, formatter_class=formatter)
    d.add_argument("dir", metavar="DIR", help="journal directory")
    d.add_argument("--limit", type=_count, default=50, metavar="N", help="records listed [default: 50; 0 = all]")
    d.set_defaults(func=cmd_journal_dump)
    j.set_defaults(func=lambda a: _need_action(j))

    r = sub.add_parser(
        "replay", help="rebuild the engine from a journal and reproduce its signals",
        description="Rebuild the engine recorded in a journal (population, configuration, "
                    "instrument names) and run the journaled bars and control commands again. "
                    "With --verify, every replayed signal is compared with the hash journaled "
                    "when it was handed out; any difference fails.",
        epilog=_JOURNAL_EPILOG, formatter_class=formatter)
    r.add_argument("dir", metavar="DIR", help="journal directory")
    r.add_argument("--verify", action="store_true", help="fail (exit 1) unless every journaled signal is reproduced bit for bit")
    r.add_argument("--threads", type=int_range(1, MAX_THREADS), default=None, metavar="N",
                   help=f"worker threads of the replaying engine, 1 to {MAX_THREADS} (any count gives the same "
                        "signals) [default: usable cores]")
    r.add_argument("--backend", choices=("cpu", "cuda", "auto"), default="cpu",
                   help="where the replaying engine runs; a journal written on either backend replays "
                        "bit for bit on the other [default: cpu]")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_replay)


def _need_action(p: argparse.ArgumentParser) -> int:
    p.print_help()
    return 2


def torn_tail_advice(path: str) -> str:
    """What to do about a journal's incomplete last record: wait, when a writer still has the
    journal open (it may be writing that record; --repair refuses it then), else --repair."""
    if jr.writer_holds(path):
        return ("a writer has this journal open: it may still be writing that record; look again once "
                "that run has ended")
    return f"run dynamic-core journal verify {path} --repair to truncate the torn tail"


def _bytes_bar(label: str, quiet: bool = False):
    """A progress bar of bytes on stderr, shown only on a terminal and not ``quiet`` (a no-op
    elsewhere), and its update function for ``progress(done, total)``."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    prog = Progress(TextColumn(label), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                    console=console, disable=quiet or not console.is_terminal)
    task = prog.add_task(label, total=None)
    return prog, lambda done, total: prog.update(task, completed=done, total=total)


def cmd_journal_verify(args: argparse.Namespace) -> int:
    prog, tick = _bytes_bar("verify")
    with prog:
        try:
            rep = jr.verify(args.dir, repair=args.repair, progress=tick)
        except JournalError:
            # --repair found a torn tail but a writer holds the journal (that tail may be a record
            # being written): nothing was cut, so it reports as verify alone does, a torn tail not
            # repaired (exit 1 by the epilog), not as a bad argument
            if not (args.repair and jr.writer_holds(args.dir)):
                raise
            rep = jr.verify(args.dir, progress=tick)
    print(rep.summary())
    print(f"  format {rep.format}, build {rep.build_id or '-'}, population {rep.population_hash:016x}, "
          f"config {rep.config_hash:016x}, last seq {rep.last_seq}")
    if rep.unusable:
        return 1
    if rep.status == "torn_tail" and not rep.repaired:
        print(f"  ({torn_tail_advice(args.dir)})")
        return 1
    if rep.status == "empty":
        return 2
    if rep.records == 0:  # e.g. a crash tore the meta record and --repair truncated it
        print("  the journal holds no records, not even its meta record: there is nothing to replay")
        return 2
    return 0


def _no_journal(path: str) -> bool:
    """No journal at ``path`` (exit 2): no directory, or no record in it (a journal of another
    format is one, unreadable: exit 1)."""
    if not os.path.isdir(path):
        return True
    rep = jr.verify(path)
    return rep.records == 0 and rep.status not in ("unsupported", "unreadable")


def cmd_journal_dump(args: argparse.Namespace) -> int:
    counts: collections.Counter[str] = collections.Counter()
    shown = 0
    rep: dict = {}
    # a terminal shows how far the count has got past the listed records (a long journal takes a while)
    prog, tick = _bytes_bar("dump")
    try:
        with prog:
            for rec in jr.read(args.dir, report=rep, progress=tick):
                counts[rec.type] += 1
                if args.limit == 0 or shown < args.limit:
                    print(f"{rec.seq:>10}  {rec.type:<14} {len(rec.payload):>10} B  segment {rec.segment} @ {rec.offset}")
                    shown += 1
    except JournalCorrupt as e:
        print(f"{_DUMP}: stopped: {e} (segment {e.segment}, offset {e.offset})", file=sys.stderr)
        return 1
    except JournalError as e:
        if _no_journal(args.dir):
            raise  # exit 2 with the error line
        print(f"{_DUMP}: unreadable journal: {e}", file=sys.stderr)  # e.g. another format version
        return 1
    total = sum(counts.values())
    if args.limit and total > shown:
        print(f"... {total - shown} more")
    print("records: " + (", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"))
    if rep["status"] == "torn_tail":  # read() stops quietly there; its report says so
        print(f"{_DUMP}: warning: torn tail ({rep['detail']}): the last record is incomplete and not listed; "
              f"{torn_tail_advice(args.dir)}", file=sys.stderr)
        return 1
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    prog, tick = _bytes_bar("replay", args.quiet)
    with prog:
        try:
            res = jr.replay(args.dir, verify=False, threads=args.threads, progress=tick, backend=args.backend)
        except JournalCorrupt as e:
            print(f"{_REPLAY}: " + (str(e) if str(e).startswith("corrupt journal") else f"corrupt journal: {e}"),
                  file=sys.stderr)
            return 1
        except JournalError as e:
            if _no_journal(args.dir):
                raise  # exit 2 with the error line
            print(f"{_REPLAY}: unreadable journal: {e}", file=sys.stderr)  # e.g. framed and CRC-clean, but not replayable
            return 1
    print(f"replayed {res.bars:,} bars ({res.records:,} records) -> {len(res.signals):,} signals "
          f"in {res.seconds:.3f} s ({res.updates_per_s / 1e6:,.1f} M agent-updates/s)")
    print(f"verified {res.verified:,} signal(s) against journaled hashes; {res.unverified:,} without a "
          f"journaled hash; {len(res.mismatched)} mismatched; {len(res.missing)} missing; "
          f"{len(res.controls)} control command(s); {res.dead_letters} dead letter(s)")
    if res.report.status != "ok":
        print(f"journal: {res.report.summary()}")
    if args.verify and not res.ok:
        err = ReplayMismatch("replay differs", res.mismatched + res.missing)
        print(f"{_REPLAY}: FAILED: {err} at seq {err.mismatches[:10]}", file=sys.stderr)
        return 1
    if args.verify and res.unverified and not res.verified:
        print(f"{_REPLAY}: FAILED: nothing verified: none of the {res.unverified:,} replayed signal(s) has a journaled "
              "hash (a signal is hashed when it is handed out: returned by run() or step(), polled, or "
              "passed to a callback)", file=sys.stderr)
        return 1
    if args.verify and res.unverified:
        print(f"{_REPLAY}: note: {res.unverified:,} replayed signal(s) have no journaled hash (not handed out before "
              "the journal ended), so they are not checked", file=sys.stderr)
    return 0
