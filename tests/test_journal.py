"""The append-only journal and replay: framing and CRC32C, torn tails, corruption, kill -9
recovery, and bit-identical replay (thread counts, control commands, withdrawn bars, instrument
ids that differ between processes)."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dynamic_core as dc
from dynamic_core import _core
from dynamic_core import journal as jr
from dynamic_core.errors import JournalCorrupt, JournalError, ReplayMismatch

from .test_runtime import blocked_submit, wait_for


def _pop(n: int = 600, names=("EURUSD", "GBPUSD"), seed: int = 5) -> dc.Population:
    return dc.Population.random(n, instruments=list(names), timeframes=[3600], seed=seed)


def _bars(n: int = 800, names=("EURUSD", "GBPUSD"), seed: int = 9) -> np.ndarray:
    return dc.sim.MarketSimulator(list(names), 3600, seed=seed).bars(n)


def _with_bad_rows(bars: np.ndarray) -> np.ndarray:
    b = bars.copy()
    b["close"][10] = np.nan
    b["high"][25] = b["low"][25] - 1.0
    b["ts"][40] = b["ts"][38]  # out of order within its stream
    return b


def _journaled_run(path: Path, pop: dc.Population, bars: np.ndarray, *, threads: int = 2,
                   chunk: int = 97, **kw) -> tuple[np.ndarray, np.ndarray, dict]:
    with dc.Engine(pop, threads=threads, journal=path, **kw) as eng:
        out = [eng.run(bars[i:i + chunk]).copy() for i in range(0, len(bars), chunk)]
        return np.concatenate(out), eng.agents().copy(), eng.stats()


# ---- CRC32C and framing -------------------------------------------------------------------
def test_crc32c_known_vectors():
    # RFC 3720 B.4 test vectors and the common check value
    assert _core.crc32c(b"123456789") == 0xE3069283
    assert _core.crc32c(bytes(32)) == 0x8A9136AA
    assert _core.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert _core.crc32c(bytes(range(32))) == 0x46DD794E
    # continuing a CRC equals one pass
    assert _core.crc32c(b"6789", _core.crc32c(b"12345")) == 0xE3069283


def test_signal_hash_is_fnv1a64_of_the_record(sim_bars):
    with dc.Engine(_pop(200, ("EURUSD", "GBPUSD", "USDJPY", "XAUUSD")), threads=1) as eng:
        sig = eng.run(sim_bars[:50])
    raw = sig[:3].tobytes()
    n = dc.SIGNAL_DTYPE.itemsize
    for i in range(3):
        h = 0xCBF29CE484222325
        for byte in raw[i * n:(i + 1) * n]:
            h = ((h ^ byte) * 0x100000001B3) & (2**64 - 1)
        assert _core.signal_hashes(sig[i:i + 1])[0] == h


# ---- replay ---------------------------------------------------------------------------------
def test_replay_is_bit_identical_on_other_thread_counts(tmp_path):
    pop, bars = _pop(), _with_bad_rows(_bars())
    live, agents, stats = _journaled_run(tmp_path / "j", pop, bars, threads=2, fsync=1)
    assert stats["rejected"] == 3 and stats["journal"]["syncs"] > 0
    rep = jr.verify(tmp_path / "j")
    assert rep.ok and rep.records == stats["journal"]["records"]
    assert rep.population_hash == pop.hash
    for threads in (1, 3):
        res = dc.Engine.replay(tmp_path / "j", threads=threads)
        assert res.ok and res.verified == len(live) and res.unverified == 0
        assert res.signals.tobytes() == live.tobytes()
        assert res.agents.tobytes() == agents.tobytes()
        assert res.dead_letters == 3
        assert res.bars == len(bars) - 3


def test_a_stray_entry_named_like_a_segment_does_not_break_replay(tmp_path):
    # the progress bar summed the sizes of every seg-*.dcj: a dangling seg-old.dcj (which the
    # reader ignores) made replay raise a bare FileNotFoundError
    path = tmp_path / "j"
    sig, _, _ = _journaled_run(path, _pop(100), _bars(60))
    os.symlink(tmp_path / "nowhere", path / "seg-old.dcj")
    assert jr.verify(path).status == "ok"
    rep = jr.replay(path)
    assert rep.signals.tobytes() == sig.tobytes()


def test_replay_detects_a_different_engine_build(tmp_path, monkeypatch):
    """A replay whose signals differ from the journaled hashes fails loudly."""
    pop, bars = _pop(300), _bars(300)
    _journaled_run(tmp_path / "j", pop, bars)
    real = _core.signal_hashes
    monkeypatch.setattr(_core, "signal_hashes", lambda s: real(s) ^ np.uint64(1))
    with pytest.raises(ReplayMismatch) as e:
        dc.Engine.replay(tmp_path / "j")
    assert len(e.value.mismatches) == len(bars)
    res = dc.Engine.replay(tmp_path / "j", verify=False)
    assert not res.ok and len(res.mismatched) == len(bars)


def test_control_commands_replay_between_the_same_updates(tmp_path):
    pop, bars = _pop(), _bars(600)
    seen_live: list[tuple[int, bytes]] = []
    with dc.Engine(pop, threads=2, journal=tmp_path / "j") as eng:
        out = []
        done = 0
        for i, cut in enumerate((100, 250, 420, 600)):
            out.append(eng.run(bars[done:cut]).copy())
            done = cut
            cmd = f"cmd-{i}".encode()
            eng.journal_control(cmd)
            seen_live.append((done, cmd))
        eng.journal_event(b"evolution-step-1")
        live = np.concatenate(out)
    seen_replay: list[bytes] = []
    res = dc.Engine.replay(tmp_path / "j", on_control=seen_replay.append)
    assert res.controls == seen_live
    assert seen_replay == [c for _, c in seen_live]
    assert res.events == [b"evolution-step-1"]
    assert res.signals.tobytes() == live.tobytes()


def test_streaming_submit_poll_with_reject_new_replays(tmp_path):
    """The journal holds exactly the bars reject_new took; the resubmitted ones count once."""
    pop, bars = _pop(400), _bars(1500)
    got = []
    with dc.Engine(pop, threads=2, journal=tmp_path / "j", backpressure="reject_new", capacity=64) as eng:
        i = 0
        withdrawn = 0
        while i < len(bars):
            k = eng.submit(bars[i:i + 200])
            withdrawn += (min(200, len(bars) - i) - k) > 0
            i += k
            got.append(eng.poll(timeout=0.5).copy())
        while sum(len(g) for g in got) < len(bars):
            got.append(eng.poll(timeout=5.0).copy())
        assert eng.stats()["backpressure"]["rejected"] > 0
    live = np.concatenate(got)
    assert withdrawn > 0
    journaled = sum(len(r.payload) // dc.BAR_DTYPE.itemsize for r in jr.read(tmp_path / "j") if r.type == "bars")
    assert journaled == len(bars)
    res = dc.Engine.replay(tmp_path / "j", threads=1)
    assert res.bars == len(bars)
    assert res.signals.tobytes() == live.tobytes()
    assert res.verified == len(live)


def test_the_only_consumer_of_a_blocked_submit_may_evolve_and_the_journal_replays(tmp_path):
    """A blocking submit journals its batch in pieces that fit the window, so a change made while
    it waits for room (here evolve, by the thread that is its only consumer) lands between two
    pieces instead of waiting for the batch, which waits for it."""
    pop, bars = _pop(512), _bars(1200)
    got: list[np.ndarray] = []
    errors: list[BaseException] = []
    evolved = []
    eng = dc.Engine(pop, threads=2, capacity=64, journal=tmp_path / "j")

    def consume() -> None:
        try:
            while sum(map(len, got)) < len(bars):
                got.append(eng.poll(timeout=5.0).copy())
                if sum(map(len, got)) >= 300 * (len(evolved) + 1) and len(evolved) < 3:
                    # the window fills: the submit waits for room
                    n = len(evolved)
                    assert wait_for(lambda: eng.stats()["backpressure"]["events"] > n), "the submit never waited"
                    eng.evolve(dict(min_age=50, replace_fraction=0.2), seed=3, generation=len(evolved) + 1)
                    eng.set_credit([int(eng.agents()["agent_id"][0])], [1.5])
                    evolved.append(sum(map(len, got)))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    prod = threading.Thread(target=eng.submit, args=(bars,), daemon=True)
    cons = threading.Thread(target=consume, daemon=True)
    prod.start()
    cons.start()
    cons.join(60)
    hung = cons.is_alive()
    if not hung:
        prod.join(10)
        agents = eng.agents().copy()
    eng.close()
    prod.join(10)
    assert not hung, "the consumer's evolve waited for the submit that waited for it"
    assert not errors, errors
    assert len(evolved) == 3
    live = np.concatenate(got)
    assert len(live) == len(bars)
    res = dc.Engine.replay(tmp_path / "j", threads=1)
    assert res.ok and res.verified == len(live) and res.unverified == 0
    assert res.signals.tobytes() == live.tobytes()
    assert res.agents.tobytes() == agents.tobytes()


def test_close_during_a_blocked_submit_journals_only_the_bars_taken(tmp_path):
    """close() ends a submit waiting for room; the journal holds the bars it took, not the rest
    of its batch (replay would process bars the live engine never did)."""
    pop, bars = _pop(300), _bars(1000)
    eng = dc.Engine(pop, threads=1, capacity=64, journal=tmp_path / "j")
    prod, raised, polled = blocked_submit(eng, bars)
    taken = eng.stats()["bars_in"]
    assert polled < taken < len(bars)
    eng.close()
    prod.join(10)
    assert not prod.is_alive() and raised and "closed" in str(raised[0])
    journaled = sum(len(r.payload) // dc.BAR_DTYPE.itemsize for r in jr.read(tmp_path / "j") if r.type == "bars")
    assert journaled == taken
    res = dc.Engine.replay(tmp_path / "j", threads=1)
    assert res.ok and res.bars == taken
    assert res.verified == polled and res.unverified == taken - polled


def test_segments_roll_over_and_replay(tmp_path):
    pop, bars = _pop(300), _bars(3000)
    live, _, stats = _journaled_run(tmp_path / "j", pop, bars, journal_segment_bytes=1 << 16, chunk=50)
    segs = sorted(p.name for p in (tmp_path / "j").iterdir())
    assert len(segs) == stats["journal"]["segments"] > 3
    assert segs[0] == "seg-000000.dcj"
    assert dc.Engine.replay(tmp_path / "j").signals.tobytes() == live.tobytes()


def test_instrument_ids_of_another_process(tmp_path):
    """Replay in a process whose registry hands out other ids reproduces the same signals."""
    pop, bars = _pop(300, ("EURUSD", "GBPUSD")), _bars(400, ("EURUSD", "GBPUSD"))
    name = f"LATE{os.getpid()}"
    assert name not in dc.instruments
    with dc.Engine(pop, threads=1, journal=tmp_path / "j") as eng:
        # registered after the journal opened; no agent follows it, but its bars take sequence
        # numbers, so replay must map its id too
        late = dc.sim.MarketSimulator([name], 3600, seed=3).bars(100)
        live = np.concatenate([eng.run(bars[:200]).copy(), eng.run(late).copy(), eng.run(bars[200:]).copy()])
        hashes = _core.signal_hashes(live)
        assert eng.stats()["skipped_unfollowed"] == 100
    assert "instruments" in [r.type for r in jr.read(tmp_path / "j")]
    script = textwrap.dedent(f"""
        import sys, numpy as np
        import dynamic_core as dc
        for k in range(7):                       # shift every id this process hands out
            dc.instruments.id(f"OTHER{{k}}")
        res = dc.Engine.replay({str(tmp_path / "j")!r}, threads=2)
        print(res.ok, res.verified, dc.instruments.id("EURUSD"))
        np.save({str(tmp_path / "sig.npy")!r}, res.signals)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env=_env())
    assert out.returncode == 0, out.stderr
    ok, verified, eur = out.stdout.split()
    assert ok == "True" and int(verified) == len(live) and int(eur) != dc.instruments.id("EURUSD")
    replayed = np.load(tmp_path / "sig.npy")
    # same signals up to the instrument id, which is this process's
    assert (replayed["seq"] == live["seq"]).all() and (replayed["score"] == live["score"]).all()
    assert len(hashes) == len(replayed)


# ---- damage -----------------------------------------------------------------------------------
def _records(path: Path) -> list[jr.JournalRecord]:
    return list(jr.read(path))


def test_flipped_byte_is_detected_with_its_offset(tmp_path):
    pop, bars = _pop(200), _bars(400)
    _journaled_run(tmp_path / "j", pop, bars)
    recs = _records(tmp_path / "j")
    victim = recs[len(recs) // 2]
    seg = tmp_path / "j" / f"seg-{victim.segment:06d}.dcj"
    data = bytearray(seg.read_bytes())
    data[victim.offset + _core.JOURNAL_RECORD_HEADER + len(victim.payload) // 2] ^= 0x40
    seg.write_bytes(bytes(data))
    rep = jr.verify(tmp_path / "j")
    assert rep.status == "corrupt" and "CRC" in rep.detail
    assert (rep.bad_segment, rep.bad_offset) == (victim.segment, victim.offset)
    assert rep.records == len([r for r in recs if r.seq < victim.seq])
    with pytest.raises(JournalCorrupt) as e:
        dc.Engine.replay(tmp_path / "j")
    assert e.value.offset == victim.offset
    # repair never "fixes" corruption
    assert jr.verify(tmp_path / "j", repair=True).status == "corrupt"
    assert seg.read_bytes() == bytes(data)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.floats(0.0, 1.0, exclude_max=True), bit=st.integers(0, 7))
def test_any_single_bit_flip_is_detected(tmp_path_factory, where, bit):
    base = _small_journal(tmp_path_factory)
    d = tmp_path_factory.mktemp("flip")
    seg = d / "seg-000000.dcj"
    data = bytearray((base / "seg-000000.dcj").read_bytes())
    data[int(where * len(data))] ^= 1 << bit
    seg.write_bytes(bytes(data))
    rep = jr.verify(d)
    assert rep.status in ("corrupt", "torn_tail")  # a flip in the last record may read as torn
    with pytest.raises((JournalCorrupt, JournalError)):
        for _ in jr.read(d):
            pass
        if rep.status == "torn_tail":
            raise JournalError("torn")


_SMALL: dict[str, Path] = {}


def _small_journal(factory) -> Path:
    if "p" not in _SMALL:
        d = factory.mktemp("small")
        _journaled_run(d / "j", _pop(64), _bars(60), chunk=20)
        _SMALL["p"] = d / "j"
    return _SMALL["p"]


def test_torn_tail_is_reported_repaired_and_replayed(tmp_path):
    pop, bars = _pop(200), _bars(500)
    live, _, _ = _journaled_run(tmp_path / "j", pop, bars, chunk=50)
    recs = _records(tmp_path / "j")
    last_bars = [r for r in recs if r.type == "bars"][-1]
    seg = tmp_path / "j" / f"seg-{last_bars.segment:06d}.dcj"
    cut = last_bars.offset + _core.JOURNAL_RECORD_HEADER + len(last_bars.payload) // 3  # a write cut short by a crash
    size = seg.stat().st_size
    with open(seg, "r+b") as f:
        f.truncate(cut)
    rep = jr.verify(tmp_path / "j")
    assert rep.status == "torn_tail" and rep.bad_offset == last_bars.offset
    fixed = jr.verify(tmp_path / "j", repair=True)
    assert fixed.repaired and fixed.truncated_bytes == cut - last_bars.offset
    assert seg.stat().st_size == last_bars.offset < size
    assert jr.verify(tmp_path / "j").ok
    res = dc.Engine.replay(tmp_path / "j")
    n_before = sum(len(np.frombuffer(r.payload, dc.BAR_DTYPE)) for r in recs
                   if r.type == "bars" and r.seq < last_bars.seq)
    assert res.bars == n_before
    assert res.signals.tobytes() == live[:len(res.signals)].tobytes()


def test_repair_refuses_a_journal_that_is_still_being_written(tmp_path, capsys):
    # a record half-written by a live run looks like a torn tail: repair used to cut it (and,
    # caught in the meta record, every record the run went on writing at its own offset)
    pop, bars = _pop(100), _bars(40)
    with dc.Engine(pop, journal=tmp_path / "j", threads=1) as eng:
        eng.run(bars)
        seg = tmp_path / "j" / "seg-000000.dcj"
        size = seg.stat().st_size
        with open(seg, "ab") as f:  # what a reader sees mid-write
            f.write(b"\x07" * 10)
        assert jr.verify(tmp_path / "j").status == "torn_tail"  # verify alone only reports
        with pytest.raises(JournalError, match="open for writing"):
            jr.verify(tmp_path / "j", repair=True)
        # the CLI: a torn tail not repaired, exit 1 as the epilog says (it exited 2, a bad argument)
        from dynamic_core.cli import main

        assert main(["journal", "verify", str(tmp_path / "j"), "--repair"]) == 1
        assert "a writer has this journal open" in capsys.readouterr().out
        assert seg.stat().st_size == size + 10  # nothing cut
    fixed = jr.verify(tmp_path / "j", repair=True)  # the writer has gone: a torn tail now
    assert fixed.repaired and fixed.truncated_bytes == 10 and jr.verify(tmp_path / "j").ok


def test_journal_errors_are_typed(tmp_path):
    pop, bars = _pop(100), _bars(50)
    _journaled_run(tmp_path / "j", pop, bars)
    with pytest.raises(JournalError, match="already holds a journal"):
        dc.Engine(pop, journal=tmp_path / "j")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(JournalError, match="is not empty"):  # segments went in among other files
        dc.Engine(pop, journal=tmp_path / "other")
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["notes.txt"]
    with pytest.raises(JournalError, match="no journal directory"):
        jr.verify(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert jr.verify(tmp_path / "empty").status == "empty"
    with pytest.raises(ValueError, match="fsync"):
        dc.Engine(pop, journal=tmp_path / "k", fsync=3)
    with dc.Engine(pop) as eng, pytest.raises(JournalError, match="no journal"):
        eng.journal_control(b"x")


def test_a_file_where_the_journal_directory_goes_is_a_journal_error(tmp_path):
    (tmp_path / "f").write_text("not a directory")
    with pytest.raises(JournalError, match="cannot open journal") as e:
        dc.Engine(_pop(50), journal=tmp_path / "f")
    assert isinstance(e.value.__cause__, OSError)


def _append_record(path: Path, kind: int, payload: bytes, flags: int = 0) -> None:
    """Frames one record exactly as the writer does (24-byte header: length, type, flags, seq,
    payload CRC32C, header CRC32C) and appends it to the last segment."""
    last = list(jr.read(path))[-1]
    head = (len(payload).to_bytes(4, "little") + kind.to_bytes(2, "little") + flags.to_bytes(2, "little")
            + (last.seq + 1).to_bytes(8, "little") + _core.crc32c(payload).to_bytes(4, "little"))
    head += _core.crc32c(head).to_bytes(4, "little")
    seg = sorted(path.glob("seg-*.dcj"))[-1]
    with open(seg, "ab") as f:
        f.write(head + payload)


@pytest.mark.parametrize("kind,payload,what", [
    (_core.RecordType.BARS, bytes(dc.BAR_DTYPE.itemsize - 1), "not whole"),
    (_core.RecordType.SIGNAL_HASHES, bytes(20), "not whole"),
    (_core.RecordType.DEAD_LETTER, bytes(7), "not whole"),
    (_core.RecordType.INSTRUMENTS, b"\xc1garbage", "unreadable instrument"),
    (_core.RecordType.BARS, bytes(dc.BAR_DTYPE.itemsize), "inside a batch"),
])
def test_replay_of_a_well_framed_record_with_bad_contents_is_a_journal_error(tmp_path, kind, payload, what):
    """A record whose framing and CRCs hold but whose contents do not make sense (a foreign or
    buggy writer) stops replay with JournalError naming the record, not a numpy or msgspec error."""
    _journaled_run(tmp_path / "j", _pop(60), _bars(40), chunk=20)
    _journaled_control = tmp_path / "j"
    if what == "inside a batch":  # a batch's bars followed by a control record
        _append_record(_journaled_control, int(kind), payload, flags=_core.RECORD_MORE)
        _append_record(_journaled_control, int(_core.RecordType.CONTROL), b"cmd")
    else:
        _append_record(_journaled_control, int(kind), payload)
    assert jr.verify(tmp_path / "j").ok  # the framing is sound
    with pytest.raises(JournalError, match=what) as e:
        dc.Engine.replay(tmp_path / "j")
    assert "seq" in str(e.value)


@pytest.mark.parametrize("where", ["at_a_header", "inside_a_header", "inside_a_payload", "new_segment_header"])
def test_a_tail_of_zeros_a_crash_left_is_torn_and_repaired(tmp_path, where):
    """A crash can leave the file longer than what reached the disk, the rest zeros (from a page
    boundary: inside a record header, inside the payload of the first record of a commit of
    several, or a new segment whose header never made it): a torn tail, never corruption."""
    import shutil

    pop, bars = _pop(60, ("EURUSD",)), _bars(400, ("EURUSD",))
    bars["close"][390:] = np.nan  # the last batch: a bars record and a dead_letter record
    with dc.Engine(pop, threads=1, journal=tmp_path / "j") as eng:
        eng.run(bars[:200])
        eng.submit(bars[200:])  # no poll: the batch is the journal's last commit
    recs = list(jr.read(tmp_path / "j"))
    assert [r.type for r in recs[-2:]] == ["bars", "dead_letter"] and recs[-2].more
    seg = tmp_path / "j" / "seg-000000.dcj"
    data = seg.read_bytes()
    zero_from = {"at_a_header": recs[-1].offset, "inside_a_header": recs[-1].offset + 8,
                 "inside_a_payload": recs[-2].offset + _core.JOURNAL_RECORD_HEADER + 1000}.get(where)
    if zero_from is None:
        (tmp_path / "j" / "seg-000001.dcj").write_bytes(bytes(64))
    else:
        seg.write_bytes(data[:zero_from] + bytes(len(data) - zero_from))
    rep = jr.verify(tmp_path / "j", repair=True)
    assert rep.status == "torn_tail" and rep.repaired, rep.summary()
    assert jr.verify(tmp_path / "j").ok
    res = dc.Engine.replay(tmp_path / "j", threads=1)
    # the last batch, torn anywhere, is not replayed at all (a torn new segment took none of it)
    assert res.bars == (390 if zero_from is None else 200)


def test_a_segment_that_cannot_be_read_is_unreadable_not_corrupt_and_repair_leaves_it(tmp_path, capsys):
    # a segment that cannot be opened or read says nothing about its records: "unreadable"
    # (exit 1), never "corrupt", and never a torn tail that --repair would truncate
    _journaled_run(tmp_path / "j", _pop(60), _bars(40), chunk=20)
    (tmp_path / "j" / "seg-000001.dcj").mkdir()
    before = sorted((p.name, p.stat().st_size) for p in (tmp_path / "j").iterdir())
    rep = jr.verify(tmp_path / "j", repair=True)
    assert rep.status == "unreadable" and "not a regular file" in rep.detail and not rep.repaired
    assert rep.bad_segment == 1 and rep.records > 0 and "unreadable" in rep.summary()
    assert sorted((p.name, p.stat().st_size) for p in (tmp_path / "j").iterdir()) == before
    with pytest.raises(JournalError, match="not a regular file") as err:
        list(jr.read(tmp_path / "j"))
    assert not isinstance(err.value, JournalCorrupt)
    for argv, line in ((["journal", "verify", str(tmp_path / "j"), "--repair"], "unreadable, "),
                       (["journal", "dump", str(tmp_path / "j")], "dynamic-core journal dump: unreadable journal"),
                       (["replay", str(tmp_path / "j"), "--verify"], "dynamic-core replay: unreadable journal")):
        rc, out, err = _main(capsys, *argv)
        assert rc == 1 and line in out + err, out + err
    os.rmdir(tmp_path / "j" / "seg-000001.dcj")
    os.mkfifo(tmp_path / "j" / "seg-000001.dcj")  # never opened for a blocking read
    assert jr.verify(tmp_path / "j").status == "unreadable"


def test_a_flipped_length_bit_in_the_last_record_is_corruption_not_a_torn_tail(tmp_path):
    """The header CRC covers the length: a bit flip that makes the last record claim more bytes
    than the file holds must not read as a crash's torn tail, whose repair would delete it."""
    _journaled_run(tmp_path / "j", _pop(60), _bars(80), chunk=20)
    last = list(jr.read(tmp_path / "j"))[-1]
    seg = tmp_path / "j" / f"seg-{last.segment:06d}.dcj"
    data = bytearray(seg.read_bytes())
    data[last.offset + 2] ^= 0x10  # length += 1 MiB
    seg.write_bytes(bytes(data))
    rep = jr.verify(tmp_path / "j", repair=True)
    assert rep.status == "corrupt" and not rep.repaired and rep.bad_offset == last.offset
    assert seg.read_bytes() == bytes(data)


def test_a_batch_split_over_several_records_replays_whole_or_not_at_all(tmp_path):
    """A batch above one record's size limit (64 MiB: ~1.4M bars) is journaled as several bars
    records in one commit, each but the last flagged ``more``; replay runs it as the one batch it
    was, and a crash that tore its last record leaves none of it (the live engine took none).
    ``run`` and ``submit`` journal pieces no longer than the window, so the batch is taken the
    way the CUDA backend takes a launch's bars: ``admit`` journals it whole before it runs."""
    import shutil

    n = _core.JOURNAL_MAX_RECORD // dc.BAR_DTYPE.itemsize + 20_000
    eur = dc.instruments.id("EURUSD")
    rng = np.random.default_rng(3)
    bars = np.zeros(n, dtype=dc.BAR_DTYPE)
    bars["ts"] = (np.arange(n, dtype=np.int64) + 1) * 3_600_000_000_000
    bars["instrument"], bars["timeframe"], bars["volume"] = eur, 3600, 1.0
    close = 1.1 + np.cumsum(rng.normal(0, 1e-4, n))
    bars["open"] = np.r_[close[0], close[:-1]]
    bars["close"] = close
    bars["high"] = np.maximum(bars["open"], close) + 1e-4
    bars["low"] = np.minimum(bars["open"], close) - 1e-4
    pop = _pop(32, ("EURUSD",))
    with dc.Engine(pop, threads=1, journal=tmp_path / "j") as eng:
        eng._native.admit(bars, len(dc.instruments))
    with dc.Engine(pop, threads=1) as ref:
        live = ref.run(bars)
    recs = [r for r in jr.read(tmp_path / "j") if r.type == "bars"]
    assert len(recs) == 2 and recs[0].more and not recs[1].more
    res = dc.Engine.replay(tmp_path / "j", threads=1, verify=False)
    assert res.bars == n and res.signals.tobytes() == live.tobytes()
    # a crash inside the batch's second record (so before anything after it): the batch goes whole
    shutil.copytree(tmp_path / "j", tmp_path / "t")
    for later in (tmp_path / "t").glob("seg-*.dcj"):
        if int(later.stem[4:]) > recs[1].segment:
            later.unlink()
    seg = tmp_path / "t" / f"seg-{recs[1].segment:06d}.dcj"
    with open(seg, "r+b") as f:
        f.truncate(recs[1].offset + _core.JOURNAL_RECORD_HEADER + 1000)
    assert jr.verify(tmp_path / "t").status == "torn_tail"
    assert dc.Engine.replay(tmp_path / "t", threads=1).bars == 0


def test_a_failed_segment_rollover_is_final_and_typed(tmp_path):
    """When the next segment cannot be created (here: a file already holds its name), the batch
    that needed it is refused with JournalError and so is every later one: nothing runs
    unjournaled. The journal replays to exactly the signals handed out."""
    pop, bars = _pop(100), _bars(3000)
    d = tmp_path / "j"
    handed, errors = [], 0
    with dc.Engine(pop, threads=2, journal=d, journal_segment_bytes=1 << 16) as eng:
        (d / "seg-000001.dcj").write_bytes(b"")  # in the way of the rollover
        for i in range(0, len(bars), 50):
            try:
                handed.append(eng.run(bars[i:i + 50]).copy())
            except JournalError:
                errors += 1
        assert eng.stats()["journal"]["error"].startswith("cannot create segment")
        taken = eng.stats()["accepted"]
    assert len(handed) > 0 and errors == len(bars) // 50 - len(handed)
    assert taken == sum(len(h) for h in handed)
    (d / "seg-000001.dcj").unlink()
    res = dc.Engine.replay(d, threads=1)
    assert res.ok and res.signals.tobytes() == np.concatenate(handed).tobytes()


_FULL_DISK = """
import json, os, resource, signal, sys
import numpy as np
import dynamic_core as dc
from dynamic_core.errors import EvolutionInterrupted, JournalError
from dynamic_core.learning.evolution import Evolution
d, mode = sys.argv[1], sys.argv[2]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # write(2) then fails with EFBIG, as on a full disk
pop = dc.Population.random(300, instruments=["EURUSD", "GBPUSD"], timeframes=[3600], seed=5)
bars = dc.sim.MarketSimulator(["EURUSD", "GBPUSD"], 3600, seed=9).bars(6000)
# "pieces": each run of 400 bars is taken in pieces of up to 8 (capacity), so the write fails
# on a piece after others whose signals were handed out (the exception's .signals and .taken);
# "evolution": the same through Evolution.run, generations between
pieces = mode in ("pieces", "evolution", "ticks")
# "ticks": ticks -> M1 bars through a TickDriver, whose bars run in stretches of one close time:
# the 5 instruments' bars of a close in pieces of up to 2
FIVE = ["EURUSD", "GBPUSD", "USDJPY", "AUDUSD", "USDCHF"]
if mode == "ticks":
    pop = dc.Population.random(300, instruments=FIVE, timeframes=["M1"], seed=5, dsi_share=0.5)
eng = dc.Engine(pop, threads=2, journal=d, fsync=1,
                **(dict(capacity=2 if mode == "ticks" else 8) if pieces else {}))
step = 400 if pieces else 50
evo = Evolution(eng, dict(min_age=50, replace_fraction=0.1), every=150, regime=False, seed=1)
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(os.path.join(d, "seg-000000.dcj")) + 60_000, hard))
handed, failed_at, errors = [], None, []
i = 0
if mode == "ticks":
    from dynamic_core.learning.dsi.driver import TickDriver
    drv = TickDriver(eng, dsi=False)  # bars only: the write then fails in a run, not in a set_dsi
    ticks = dc.sim.TickSimulator(FIVE, seed=2).ticks(6 * 3600)
    for a in range(0, len(ticks), 20_000):
        try:
            handed.append(drv.update(ticks[a:a + 20_000]).copy())
        except JournalError as e:
            errors.append(str(e))
            if failed_at is not None:
                break
            _, held = drv.discard()  # the signals of the bars the engine took, not returned yet
            handed.append(held)
            failed_at = i = drv.bars
    bars = bars[:0]                                        # the loop below has nothing to do
while i < len(bars):
    try:
        if mode in ("run", "pieces"):
            handed.append(eng.run(bars[i:i + step]).copy())
            i += step
        elif mode == "evolution":
            handed.append(evo.run(bars[i:i + step]).copy())
            i += step
        else:
            i += eng.submit(bars[i:i + 50])
            handed.append(eng.poll(timeout=2.0).copy())   # never raises for the journal
    except (JournalError, EvolutionInterrupted) as e:
        errors.append(str(e))
        part = getattr(e, "signals", None)
        if part is not None:
            handed.append(part.copy())
            i += e.done if isinstance(e, EvolutionInterrupted) else e.taken  # the rows taken
        if failed_at is None:
            failed_at = i
        else:
            break                                          # refused again: the failure is final
while mode == "poll" and sum(len(h) for h in handed) < i:
    handed.append(eng.poll(timeout=5.0).copy())
error = eng.stats()["journal"]["error"]
in_flight = eng.in_flight()                                # nothing left behind for a poll
eng.close()                                                # told already: does not raise again
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
res = dc.Engine.replay(d, threads=1)
live = np.concatenate(handed)
print(json.dumps({"failed_at": failed_at, "i": i, "errors": len(errors), "error": error, "in_flight": in_flight,
                  "seen": sum(evo._seen), "generations": evo.generation,
                  "same": res.signals.tobytes() == live.tobytes(), "ok": res.ok, "bars": res.bars,
                  "handed": int(len(live)), "status": res.report.status}))
"""


@pytest.mark.parametrize("mode", ["run", "poll", "pieces", "evolution", "ticks"])
def test_a_failed_journal_write_is_final_typed_and_loses_nothing(tmp_path, mode):
    """A write that fails (the file size limit stands in for a full disk) raises JournalError
    once where it happens, refuses every later input, hands out every signal computed, and
    leaves a journal that verifies and replays to exactly the signals handed out. "pieces": a
    run taken in pieces failing on a later one; the earlier pieces' signals, journaled as handed
    out, were lost with the exception (replay had more signals than the caller got), and those
    still being computed were left in flight (the next run refused: "not polled yet"); the
    exception now also says how many rows were taken (.taken). "evolution": Evolution.run over
    such a failure hands back those signals and rows, and counts each bar it fed once. "ticks":
    a TickDriver keeps them and counts them taken (discard() hands them back)."""
    import json

    d = tmp_path / "j"
    out = subprocess.run([sys.executable, "-c", _FULL_DISK, str(d), mode], capture_output=True, text=True,
                         timeout=300, env=_env())
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.splitlines()[-1])
    assert r["failed_at"] is not None and r["errors"] == 2 and r["in_flight"] == 0, r
    assert "File too large" in r["error"]
    assert r["same"] and r["ok"] and r["status"] == "ok", r
    if mode == "poll":
        assert r["bars"] == r["handed"] == r["i"]
    else:  # every bar is followed and good: one signal per bar taken, the failing call's too
        assert r["bars"] == r["handed"] == r["failed_at"], r
    if mode == "evolution":
        assert r["seen"] == r["bars"] and r["generations"] >= 1, r
    if mode == "ticks":
        assert r["bars"] > 100, r
    assert jr.verify(d).ok


# ---- kill -9 --------------------------------------------------------------------------------
_WRITER = """
import sys, numpy as np
import dynamic_core as dc
from dynamic_core import _core
pop = dc.Population.random(800, instruments=["EURUSD", "GBPUSD"], timeframes=[3600], seed=5)
bars = dc.sim.MarketSimulator(["EURUSD", "GBPUSD"], 3600, seed=9).bars(200_000)
eng = dc.Engine(pop, threads=2, journal=sys.argv[1], fsync=1)
# instrument ids are per process and signal hashes cover them: name the ones hashed below
sys.stdout.write("ids " + " ".join(f"{n}={dc.instruments.id(n)}" for n in ("EURUSD", "GBPUSD")) + "\\n")
i = 0
while True:  # runs until killed
    sig = eng.run(bars[i:i + 40])
    i += 40
    for s, h in zip(sig["seq"].tolist(), _core.signal_hashes(sig).tolist()):
        sys.stdout.write(f"{s} {h}\\n")  # published: handed out after the bars were journaled
    sys.stdout.flush()
"""


def test_kill_9_mid_stream_then_recover_and_replay(tmp_path):
    d = tmp_path / "j"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(d)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())
    published: dict[int, int] = {}
    writer_ids: dict[str, int] = {}
    try:
        for line in proc.stdout:
            if line.startswith("ids "):
                writer_ids = {n: int(i) for n, i in (kv.split("=") for kv in line.split()[1:])}
                continue
            s, h = line.split()
            published[int(s)] = int(h)
            if len(published) >= 3000:
                break
        assert len(published) >= 3000, proc.stderr.read()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    rep = jr.verify(d, repair=True)
    assert rep.status in ("ok", "torn_tail"), rep.summary()
    assert jr.verify(d).ok
    res = dc.Engine.replay(d, threads=1)
    assert res.ok
    # the replayed signals carry this process's instrument ids: hash them in the writer's
    as_written = res.signals.copy()
    as_written["instrument"] = [writer_ids[dc.instruments.name(int(i))] for i in res.signals["instrument"]]
    got = dict(zip(res.signals["seq"].tolist(), _core.signal_hashes(as_written).tolist()))
    # every signal published before the kill is reproduced bit for bit
    assert all(got.get(s) == h for s, h in published.items())
    assert len(got) >= len(published)


# ---- CLI ------------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    # the child imports the same dynamic_core as this process (installed, or a dev tree)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    root = str(Path(dc.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dynamic_core", *args], capture_output=True, text=True,
                          timeout=180, env=_env())


def test_cli_run_journal_verify_replay(tmp_path):
    d = str(tmp_path / "j")
    r = _cli("run", "--agents", "500", "--bars", "200", "--journal", d, "--fsync", "2", "-q")
    assert r.returncode == 0, r.stderr
    assert "Journal" in r.stdout
    v = _cli("journal", "verify", d)
    assert v.returncode == 0 and ": ok," in v.stdout
    p = _cli("replay", d, "--verify", "--threads", "1")
    assert p.returncode == 0, p.stderr
    assert "verified 800 signal(s)" in p.stdout and "0 mismatched" in p.stdout
    dump = _cli("journal", "dump", d, "--limit", "2")
    assert dump.returncode == 0 and "meta" in dump.stdout and "records: bars" in dump.stdout
    # a flipped byte: verify and replay fail with exit code 1
    seg = tmp_path / "j" / "seg-000000.dcj"
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 0xFF
    seg.write_bytes(bytes(data))
    assert _cli("journal", "verify", d).returncode == 1
    assert _cli("replay", d, "--verify").returncode == 1
    assert _cli("journal", "verify", str(tmp_path / "missing")).returncode == 2


# ---- segments that do not belong, and what replay --verify can vouch for -------------------
def _segmented(path: Path, seed: int = 5) -> None:
    _journaled_run(path, _pop(300, seed=seed), _bars(1500), journal_segment_bytes=1 << 16, chunk=50)
    assert len(list(path.iterdir())) >= 3


def test_a_missing_middle_segment_is_named(tmp_path):
    _segmented(tmp_path / "j")
    (tmp_path / "j" / "seg-000001.dcj").unlink()
    rep = jr.verify(tmp_path / "j")
    assert rep.status == "corrupt" and rep.bad_segment == 1
    assert "segment seg-000001.dcj is missing" in rep.detail and "seg-000002.dcj" in rep.detail
    with pytest.raises(JournalCorrupt, match="seg-000001.dcj is missing"):
        dc.Engine.replay(tmp_path / "j")


def test_a_segment_of_another_journal_is_corruption(tmp_path):
    _segmented(tmp_path / "a", seed=5)
    _segmented(tmp_path / "b", seed=6)  # another population: another hash in every segment header
    (tmp_path / "a" / "seg-000001.dcj").write_bytes((tmp_path / "b" / "seg-000001.dcj").read_bytes())
    rep = jr.verify(tmp_path / "a")
    assert rep.status == "corrupt" and rep.bad_segment == 1 and rep.bad_offset == 0
    assert "belongs to another journal" in rep.detail


def _main(capsys, *argv: str) -> tuple[int, str, str]:
    from dynamic_core.cli import main

    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_dump_help_names_the_record_types_dump_prints(capsys):
    # the help listed "rejects", a type dump never prints (it prints dead_letter)
    import re

    rc, out, _ = _main(capsys, "journal", "dump", "--help")
    text = " ".join(out.split())
    listed = re.search(r"type \(([^)]*)\)", text).group(1).split(", ")
    assert rc == 0 and sorted(listed) == sorted(k.lower() for k in _core.RecordType.__members__)


def test_replay_verify_fails_when_no_signal_has_a_hash(tmp_path, capsys):
    d = tmp_path / "j"
    eng = dc.Engine(_pop(60), threads=1, journal=d)
    eng.submit(_bars(40))
    eng.close()  # the signals were never handed out: none was hashed
    rc, out, err = _main(capsys, "replay", str(d), "--verify", "-q")
    assert rc == 1 and "verified 0 signal(s)" in out and "nothing verified" in err
    assert _main(capsys, "replay", str(d), "-q")[0] == 0  # without --verify nothing is claimed
    d2 = tmp_path / "k"
    bars = _bars(60)  # 60 bars of each of two instruments
    with dc.Engine(_pop(60), threads=1, journal=d2) as eng:
        eng.run(bars[:80])
        eng.submit(bars[80:])  # a tail never polled
    rc, out, err = _main(capsys, "replay", str(d2), "--verify", "-q")
    assert rc == 0 and "verified 80 signal(s)" in out and "40 replayed signal(s) have no journaled hash" in err


def test_a_journal_whose_meta_was_torn_and_repaired_holds_nothing_to_replay(tmp_path, capsys):
    d = tmp_path / "j"
    _journaled_run(d, _pop(60), _bars(40), chunk=20)
    with open(d / "seg-000000.dcj", "r+b") as f:
        f.truncate(64 + 100)  # inside the meta record (after the 64-byte segment header)
    rc, out, _ = _main(capsys, "journal", "verify", str(d), "--repair")
    assert rc == 2 and "repaired" in out and "holds no records" in out
    assert _main(capsys, "journal", "verify", str(d))[0] == 2
    rc, _, err = _main(capsys, "replay", str(d), "--verify", "-q")
    assert rc == 2 and "holds no records" in err


def test_replay_of_a_framed_but_unreadable_journal_exits_1(tmp_path, capsys):
    d = tmp_path / "j"
    _journaled_run(d, _pop(60), _bars(40), chunk=20)
    _append_record(d, int(_core.RecordType.META), b"again")  # a second meta record
    assert jr.verify(d).ok
    rc, _, err = _main(capsys, "replay", str(d), "-q")
    assert rc == 1 and "unreadable journal" in err and "second meta record" in err


def test_cli_exit_codes_for_a_journal_of_another_format(tmp_path):
    # verify said 1 (unreadable), dump and replay 2 ("no journal there")
    import struct

    path = tmp_path / "j"
    _journaled_run(path, _pop(100), _bars(60))
    seg = path / "seg-000000.dcj"
    b = bytearray(seg.read_bytes())
    b[8:12] = struct.pack("<I", 1)  # the header's format field, CRC fixed up: framed, other format
    b[60:64] = struct.pack("<I", _core.crc32c(bytes(b[:60])))
    seg.write_bytes(bytes(b))
    for args in (("journal", "verify"), ("journal", "dump"), ("replay",)):
        r = _cli(*args, str(path))
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert "not supported" in r.stdout + r.stderr


@pytest.mark.parametrize("how", ["run", "drop_oldest"])
def test_close_during_a_run_or_drop_waiting_for_room_journals_only_the_bars_taken(tmp_path, how):
    """A run() (which drains its own signals) and a drop_oldest submit (which drops the oldest)
    wait for room while an SM is stalled; close() ends the wait. The journal holds the bars they
    took, not the rest of the batch: each piece is journaled as it is taken."""
    pop, bars = _pop(300), _bars(1000)
    kw = {"backpressure": "drop_oldest"} if how == "drop_oldest" else {}
    eng = dc.Engine(pop, threads=1, capacity=64, journal=tmp_path / "j", fault_injection=True,
                    stall_deadline=30.0, **kw)
    raised: list[BaseException] = []

    def feed() -> None:
        try:
            (eng.run if how == "run" else eng.submit)(bars)
        except RuntimeError as e:
            raised.append(e)

    cap = eng.stats()["capacity"]
    # the window fills behind SM 0's next bar and stays full (close() ends the stall)
    eng.faults.stall_sm(0, 60.0)
    t = threading.Thread(target=feed, daemon=True)
    t.start()
    # the call waits for room once the window has less room than its next piece (a quarter of
    # it); in_flight is read without the ingress lock, which the waiting call holds
    assert wait_for(lambda: cap - eng.in_flight() < cap // 4, 20.0), (eng.in_flight(), cap)
    assert t.is_alive()
    eng.close()
    t.join(10)
    assert not t.is_alive() and raised and "closed" in str(raised[0])
    taken = eng.stats()["bars_in"]
    assert 0 < taken < len(bars)
    journaled = sum(len(r.payload) // dc.BAR_DTYPE.itemsize for r in jr.read(tmp_path / "j") if r.type == "bars")
    assert journaled == taken
    res = dc.Engine.replay(tmp_path / "j", threads=1, verify=False)
    assert res.ok and res.bars == taken


def test_verify_reports_progress_and_an_interrupt_from_it_repairs_nothing(tmp_path, monkeypatch, capsys):
    # journal verify walks a journal of any size: its progress comes every few MB, ends at the
    # total, and ^C (an exception from the callback) ends the walk before any repair; journal
    # dump's bar moves the same way
    d = tmp_path / "j"
    bars = _bars(60_000)  # two instruments: ~10 MB of bars and signal hashes
    with dc.Engine(_pop(32), threads=1, journal=d, journal_segment_bytes=4 << 20) as eng:
        eng.run(bars)
    segs = sorted(d.iterdir())
    total = sum(p.stat().st_size for p in segs)
    assert len(segs) > 2 and total > 8 << 20
    calls: list[tuple[int, int]] = []
    rep = jr.verify(d, progress=lambda done, tot: calls.append((done, tot)))
    assert rep.ok and len(calls) >= 2
    assert all(t == total for _, t in calls) and calls[-1][0] == total
    assert [c for c, _ in calls] == sorted(c for c, _ in calls)  # never backwards
    from dynamic_core import cli_journal

    dumped: list[tuple[int, int]] = []
    monkeypatch.setattr(cli_journal, "_bytes_bar", lambda label, quiet=False: (
        contextlib.nullcontext(), lambda done, tot: dumped.append((done, tot))))
    assert cli_journal.cmd_journal_dump(argparse.Namespace(dir=str(d), limit=1)) == 0
    assert len(dumped) >= 2 and all(t == total for _, t in dumped) and dumped[-1][0] == total
    assert [c for c, _ in dumped] == sorted(c for c, _ in dumped)
    assert "records: bars" in capsys.readouterr().out
    replayed: list[tuple[int, int]] = []  # replay reads through the same reader, with the same steps
    assert jr.replay(d, progress=lambda done, tot: replayed.append((done, tot))).ok
    assert replayed == dumped
    with open(segs[-1], "r+b") as f:  # a torn tail for --repair to cut
        f.truncate(segs[-1].stat().st_size - 7)
    sizes = [p.stat().st_size for p in segs]

    def interrupt(done: int, tot: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        jr.verify(d, repair=True, progress=interrupt)
    assert [p.stat().st_size for p in segs] == sizes  # nothing repaired
    with pytest.raises(TypeError, match="progress must be callable"):
        jr.verify(d, progress=5)
    assert jr.verify(d, repair=True).repaired


def test_an_instrument_registered_while_the_journal_opens_still_replays(tmp_path, monkeypatch):
    """The meta record's instrument names and the count the next instruments record starts from
    were two readings of the registry: a name another thread registered between them (a loader
    beside a large engine's start) went into both, and replay refused the journal ("instrument
    record starts at id N, expected M") while verify said ok."""
    pop = dc.Population.random(64, instruments=["EURUSD"], seed=1)
    bars = dc.sim.MarketSimulator(["EURUSD"], 3600, seed=2).bars(50)
    encode = jr.encode_meta
    racer = f"RACE{os.getpid()}"

    def meanwhile(*args, **kwargs):
        dc.instruments.id(racer)  # registered by "another thread" in between
        return encode(*args, **kwargs)

    monkeypatch.setattr(jr, "encode_meta", meanwhile)
    eng = dc.Engine(pop, threads=1, journal=tmp_path / "j")
    live = eng.run(bars)
    eng.close()
    res = dc.Engine.replay(tmp_path / "j", threads=1)
    assert res.ok and res.signals.tobytes() == live.tobytes()


def test_events_of_the_engines_own_types_are_refused_from_the_embedder_and_bad_ones_fail_replay_typed(tmp_path):
    """Replay applies events typed credit, dsi, ext_scores or generation to the engine. An
    embedder's own event of such a type ({"type": "credit", ...} as an audit note) was journaled,
    verified ok, and then stopped the replay; and a well-formed credit event for an agent the
    engine lacks failed replay with ValueError (the CLI's exit 2, "bad arguments"), not
    JournalError (exit 1, an unreadable journal)."""
    import msgspec

    pop = dc.Population.random(64, instruments=["EURUSD"], seed=1)
    bars = dc.sim.MarketSimulator(["EURUSD"], 3600, seed=2).bars(60)
    d = tmp_path / "j"
    eng = dc.Engine(pop, threads=1, journal=d)
    eng.run(bars[:30])
    for kind in sorted(jr.ENGINE_EVENT_TYPES):
        with pytest.raises(ValueError, match=f"type '{kind}' is the engine's own"):
            eng.journal_event(msgspec.msgpack.encode({"type": kind, "note": "mine"}))
    eng.journal_event(msgspec.msgpack.encode({"type": "audit", "note": "mine"}))  # any other type
    eng.journal_event(b"\x01\x02 not msgpack")  # and any bytes
    # a credit event for an agent the engine lacks, as a foreign writer could leave it
    bad = dc.payloads.CreditUpdate(agents=np.array([999_999], "<u4").tobytes(), credit=np.array([1.0]).tobytes())
    eng._native.journal_append(dc._core.RecordType.EVENT, msgspec.msgpack.encode(bad), True)
    eng.run(bars[30:])
    eng.close()
    with pytest.raises(dc.errors.JournalError, match="credit event at seq .*no agent with id 999999"):
        dc.Engine.replay(d, threads=1)
    out = subprocess.run([sys.executable, "-m", "dynamic_core", "replay", str(d)], capture_output=True,
                         text=True, timeout=120, env=_env())
    assert out.returncode == 1, (out.returncode, out.stderr)
