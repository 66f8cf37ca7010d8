"""The parallel runtime: determinism across threads, streaming submit/poll/step/on_signal,
backpressure, stalled-SM failover, quarantine and clean shutdown."""

from __future__ import annotations

import gc
import math
import os
import threading
import time

import msgspec
import numpy as np
import numpy.lib.recfunctions as rfn
import pytest

import dynamic_core as dc

NAMES = ["EURUSD", "GBPUSD", "USDJPY", "XAUUSD"]


@pytest.fixture(scope="module")
def market() -> np.ndarray:
    return dc.sim.MarketSimulator(NAMES, timeframe="H1", seed=3).bars(300)


@pytest.fixture(scope="module")
def pop() -> dc.Population:
    return dc.Population.random(3000, instruments=NAMES, timeframes=["H1"], seed=11)


def native_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def settled_threads(target: int, deadline: float = 20.0) -> int:
    """The thread count once it reaches ``target`` (or the deadline passes): a joined thread's
    /proc entry can outlive join() by a moment while the OS tears it down."""
    end = time.monotonic() + deadline
    n = native_threads()
    while n != target and time.monotonic() < end:
        time.sleep(0.005)
        n = native_threads()
    return n


def without_seq(s: np.ndarray) -> np.ndarray:
    return rfn.repack_fields(s[[n for n in s.dtype.names if n != "seq"]])


def test_bit_identical_across_thread_counts_and_runs(pop, market):
    ref_sig = ref_agents = None
    for threads in (1, 2, 4, 2):
        with dc.Engine(pop, threads=threads, cores_per_sm=64) as eng:
            sig = eng.run(market)
            agents = eng.agents()
        assert len(sig) == len(market)
        if ref_sig is None:
            ref_sig, ref_agents = sig, agents
        assert sig.tobytes() == ref_sig.tobytes(), f"signals differ with {threads} threads"
        assert agents.tobytes() == ref_agents.tobytes(), f"agents differ with {threads} threads"


def test_submit_poll_equals_run(pop, market):
    with dc.Engine(pop, threads=1) as a:
        ref = a.run(market)
    with dc.Engine(pop, threads=2) as eng:
        got = []
        for i in range(0, len(market), 37):
            assert eng.submit(market[i:i + 37]) == len(market[i:i + 37])
            got.append(eng.poll(timeout=0.0))
        while sum(map(len, got)) < len(ref):
            got.append(eng.poll(timeout=5.0))
        got = np.concatenate(got)
        st = eng.stats()  # no run(): the rate is over the busiest worker's time
        assert st["busy_seconds"] == 0.0 and 0.0 < st["worker_busy_seconds"] < st["uptime_seconds"]
        assert st["agent_updates_per_s"] == st["agent_updates"] / st["worker_busy_seconds"]
    assert got.tobytes() == ref.tobytes()


def test_concurrent_producers_keep_per_stream_order(pop, market):
    with dc.Engine(pop, threads=1) as a:
        ref = a.run(market)
    with dc.Engine(pop, threads=2) as eng:
        def produce(inst: int) -> None:
            mine = market[market["instrument"] == inst]
            for i in range(0, len(mine), 7):
                eng.submit(mine[i:i + 7])

        ids = np.unique(market["instrument"])
        ts = [threading.Thread(target=produce, args=(int(i),)) for i in ids]
        for t in ts:
            t.start()
        got = []
        deadline = time.monotonic() + 60
        while sum(map(len, got)) < len(market) and time.monotonic() < deadline:
            got.append(eng.poll(timeout=0.1))
        for t in ts:
            t.join()
        got = np.concatenate(got)
    assert len(got) == len(market)
    assert (np.diff(got["seq"].astype(np.int64)) == 1).all()  # bar order = sequence order
    for i in ids:
        mine, theirs = got[got["instrument"] == i], ref[ref["instrument"] == i]
        assert without_seq(mine).tobytes() == without_seq(theirs).tobytes()


def test_backpressure_reject_new(pop, market):
    with dc.Engine(pop, threads=2, capacity=64, backpressure="reject_new") as eng:
        taken = eng.submit(market)
        assert 64 <= taken < len(market)
        st = eng.stats()
        assert st["backpressure"]["rejected"] == len(market) - taken
        assert st["backpressure"]["events"] >= 1
        got = [eng.poll(timeout=5.0)]
        rest = market[taken:]
        while len(rest):
            k = eng.submit(rest)
            rest = rest[k:]
            got.append(eng.poll(timeout=5.0))
        while sum(map(len, got)) < len(market):
            got.append(eng.poll(timeout=5.0))
    with dc.Engine(pop, threads=1) as a:
        ref = a.run(market)
    assert np.concatenate(got).tobytes() == ref.tobytes()  # nothing lost, nothing reordered


def test_backpressure_drop_oldest(pop, market):
    with dc.Engine(pop, threads=2, capacity=64, backpressure="drop_oldest") as eng:
        assert eng.submit(market) == len(market)
        eng._native.wait_idle()
        kept = eng.poll()
        st = eng.stats()
    assert len(kept) == 64
    assert st["backpressure"]["dropped"] == len(market) - 64
    assert (kept["seq"] == np.arange(len(market) - 63, len(market) + 1)).all()  # the newest



def test_drop_oldest_with_nothing_ready_keeps_its_timeout_and_lets_stats_through(pop, market):
    # One stream whose group stalls 5 s (no failover: deadline 60 s), so the 64 bars in flight
    # stay unready and drop_oldest has nothing to drop: the submit waits for the oldest bar. It
    # must give up at its own timeout (taking what fitted), and while it waits without one,
    # stats() must not wait with it (it used to hold the ingress lock for the whole wait).
    one = market[market["instrument"] == market["instrument"][0]]
    assert len(one) >= 100
    for timeout in (0.05, None):
        with dc.Engine(pop, threads=1, capacity=64, backpressure="drop_oldest", fault_injection=True,
                       stall_deadline=60.0) as eng:
            for sm in range(eng.stats()["n_sms"]):
                eng.faults.stall_sm(sm, 5.0)
            if timeout is not None:
                t0 = time.monotonic()
                assert eng.submit(one[:100], timeout=timeout) == 64
                assert time.monotonic() - t0 < 2.5  # the stall lasts 5 s
                bp = eng.stats()["backpressure"]
                assert (bp["rejected"], bp["dropped"]) == (36, 0)
                continue
            raised: list[BaseException] = []

            def feed() -> None:
                try:
                    eng.submit(one[:100])
                except RuntimeError as e:  # the engine closed under it
                    raised.append(e)

            t = threading.Thread(target=feed, daemon=True)
            t.start()
            assert wait_for(lambda: eng.stats()["in_flight"] == 64)
            time.sleep(0.1)  # the feeder is in its wait now
            t0 = time.monotonic()
            st = eng.stats()
            assert time.monotonic() - t0 < 2.5 and t.is_alive()
            assert st["bars_in"] == 64 and st["backpressure"]["dropped"] == 0  # the first piece
        t.join(30.0)
        assert not t.is_alive() and len(raised) == 1 and "closed" in str(raised[0])

def test_backpressure_block_waits_for_consumer(pop, market):
    with dc.Engine(pop, threads=2, capacity=64, backpressure="block") as eng:
        done = []
        t = threading.Thread(target=lambda: done.append(eng.submit(market)))
        t.start()
        got = []
        while sum(map(len, got)) < len(market):
            got.append(eng.poll(timeout=5.0))
        t.join()
        assert done == [len(market)]
        assert eng.stats()["backpressure"]["events"] >= 1
    assert len(np.concatenate(got)) == len(market)


def test_a_blocking_submit_with_a_timeout_returns_what_it_took(pop, market):
    # one thread submits and polls: without a timeout, a submit finding the window full would
    # wait for good for a consumer that is itself
    with dc.Engine(pop, threads=2, capacity=64, backpressure="block") as eng:
        got, rest, rejected = [], market, 0
        with pytest.raises(TypeError, match="timeout must be a number"):
            eng.submit(market[:1], timeout="1")
        while len(rest):
            t0 = time.monotonic()
            k = eng.submit(rest, timeout=0.05)
            assert k <= 64 + sum(map(len, got)) and time.monotonic() - t0 < 30.0
            if k < len(rest):
                rejected += len(rest) - k
            rest = rest[k:]
            got.append(eng.poll(max_n=48, timeout=5.0))  # less than it took: the window stays full
        while sum(map(len, got)) < len(market):
            got.append(eng.poll(timeout=5.0))
        st = eng.stats()["backpressure"]
        assert rejected > 0 and st["rejected"] == rejected and st["events"] >= 1
        assert eng.stats()["bars_in"] == len(market)
        assert eng.submit(market[:0], timeout=0) == 0
    with dc.Engine(pop, threads=1) as a:
        ref = a.run(market)
    assert np.concatenate(got).tobytes() == ref.tobytes()  # nothing lost, nothing reordered


def blocked_submit(eng: dc.Engine, bars: np.ndarray, polled: int = 100
                   ) -> tuple[threading.Thread, list[BaseException], int]:
    """A thread submitting ``bars`` to ``eng`` (capacity well below their number), left waiting
    for room: at least ``polled`` signals are polled first, then nobody polls. Returns the
    thread, the RuntimeErrors its submit raised (once the engine closes) and the count polled."""
    raised: list[BaseException] = []

    def produce() -> None:
        try:
            eng.submit(bars)
        except RuntimeError as e:
            raised.append(e)

    cap = eng.stats()["capacity"]
    prod = threading.Thread(target=produce, daemon=True)
    prod.start()
    got = 0
    while got < polled:
        got += len(eng.poll(timeout=5.0))
    # nobody polls from now on: once the window has less room than the piece a blocking submit
    # waits for (a quarter of it, the batch being longer than that), the submit waits for good
    assert len(bars) >= polled + 3 * cap, "too few bars to leave the submit waiting"
    assert wait_for(lambda: cap - eng.in_flight() < max(1, cap // 4), 20.0), \
        f"the submit never filled the window again ({eng.in_flight()} of {cap} in flight)"
    return prod, raised, got


def test_a_submit_waiting_for_room_blocks_no_reader_and_not_close(pop, market):
    """While a submit waits for room (backpressure="block"), its consumer may ask for stats,
    agents and dead letters (they used to wait for the submit, which waited for them), and
    close() ends the wait: the submit raises, close returns."""
    eng = dc.Engine(pop, threads=1, capacity=64)
    prod, raised, got = blocked_submit(eng, market)
    done = threading.Event()

    def read() -> None:
        s = eng.stats()
        assert s["accepted"] >= got
        assert len(eng.agents()) == len(pop)
        eng.dead_letters()
        done.set()

    threading.Thread(target=read, daemon=True).start()
    assert done.wait(10), "a reader waited for the parked submit"
    closer = threading.Thread(target=eng.close, daemon=True)
    closer.start()
    closer.join(10)
    prod.join(10)
    assert not closer.is_alive() and not prod.is_alive()
    assert raised and "closed" in str(raised[0])


def test_a_submit_with_a_timeout_waits_no_longer_behind_another_feeders_blocked_batch(pop, market):
    """Feeders take turns, each batch contiguous: a submit behind a blocking submit that waits
    for room used to wait with it, whatever its own timeout. Now it gives up at its deadline,
    takes nothing and counts its bars as rejected; once the window drains, everything the
    first submit held arrives in order and nothing else is lost."""
    with dc.Engine(pop, threads=1) as a:
        ref = a.run(market)
    eng = dc.Engine(pop, threads=1, capacity=64, backpressure="block")
    try:
        prod, raised, got = blocked_submit(eng, market)
        before = eng.stats()["backpressure"]
        t0 = time.monotonic()
        assert eng.submit(market[:10], timeout=0.2) == 0
        waited = time.monotonic() - t0
        assert 0.15 <= waited < 10.0, waited
        after = eng.stats()["backpressure"]
        assert after["rejected"] == before["rejected"] + 10
        assert after["events"] == before["events"] + 1
        rest = []
        while got + sum(map(len, rest)) < len(market):
            part = eng.poll(timeout=10.0)
            assert len(part), "signals stopped"
            rest.append(part)
        prod.join(10)
        assert not prod.is_alive() and not raised
        assert eng.stats()["bars_in"] == len(market)
    finally:
        eng.close()
    # the first `got` signals were polled by blocked_submit; the rest match the reference
    assert np.concatenate(rest).tobytes() == ref[got:].tobytes()


def _raised_on_a_thread(call) -> BaseException | None:
    """What ``call()`` raised (None: it returned), run on a thread: one that waits for good
    fails the test here (joined within 10 s) instead of hanging it."""
    outcome: list[BaseException | None] = []

    def go() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - the caller asserts on it
            outcome.append(e)

    th = threading.Thread(target=go, daemon=True)
    th.start()
    th.join(10.0)
    assert not th.is_alive(), "the call waited for good behind the blocked submit"
    return outcome[0]


def _rest_of_blocked_submit(eng: dc.Engine, prod: threading.Thread, raised: list, got: int,
                            n: int) -> np.ndarray:
    """The signals of a :func:`blocked_submit` of ``n`` bars after its first ``got``, polled
    until all came; its producer has then finished without an error."""
    rest = []
    while got + sum(map(len, rest)) < n:
        part = eng.poll(timeout=10.0)
        assert len(part), "signals stopped"
        rest.append(part)
    prod.join(10)
    assert not prod.is_alive() and not raised
    assert eng.stats()["bars_in"] == n
    return np.concatenate(rest)


@pytest.mark.parametrize("timeout", [0.2, None])
def test_a_step_behind_another_feeders_batch_waiting_for_room_fails_at_once(pop, market, timeout):
    """Behind a blocking submit that waits for room, a step used to wait with it (for good with
    timeout=None: a poll that would make room is refused while a step runs, so that was a
    deadlock; with a timeout, until it ran out). The step can never succeed there (the submit's
    signals come first), so it raises RuntimeError at once, and takes, counts and journals
    nothing: once the window drains, the first submit's signals arrive in order, and the same
    bar stepped again gives the reference's signal."""
    with dc.Engine(pop, threads=1) as a:
        ref = a.run(market)
    eng = dc.Engine(pop, threads=1, capacity=64, backpressure="block")
    try:
        n = len(market) - 1  # the last bar is stepped
        prod, raised, got = blocked_submit(eng, market[:n])
        before = eng.stats()["backpressure"]
        err = _raised_on_a_thread(lambda: eng.step(market[n], timeout=timeout))
        assert isinstance(err, RuntimeError) and "not polled yet" in str(err), err
        assert eng.stats()["backpressure"] == before
        rest = _rest_of_blocked_submit(eng, prod, raised, got, n)
        sig = eng.step(market[n], timeout=10.0)
    finally:
        eng.close()
    assert rest.tobytes() == ref[got:n].tobytes()
    assert sig is not None and sig.seq == int(ref[n]["seq"]) and sig.score == float(ref[n]["score"])


def test_a_run_behind_another_feeders_batch_waiting_for_room_fails_at_once(pop, market):
    """run() behind a blocking submit waiting for room waited for good: the poll that would make
    room is refused while a run runs. It raises RuntimeError at once, taking nothing; the
    submit's signals then arrive in order, all of them, once polled."""
    with dc.Engine(pop, threads=1) as a:
        ref = a.run(market)
    eng = dc.Engine(pop, threads=1, capacity=64, backpressure="block")
    try:
        n = len(market) - 10
        prod, raised, got = blocked_submit(eng, market[:n])
        before = eng.stats()
        err = _raised_on_a_thread(lambda: eng.run(market[n:]))
        assert isinstance(err, RuntimeError) and "not polled yet" in str(err), err
        after = eng.stats()
        assert after["backpressure"] == before["backpressure"] and after["batches"] == before["batches"]
        rest = _rest_of_blocked_submit(eng, prod, raised, got, n)
    finally:
        eng.close()
    assert rest.tobytes() == ref[got:n].tobytes()


def _poll_until(eng: dc.Engine, n: int, timeout: float = 20.0) -> np.ndarray:
    """Polls until ``n`` signals came (each poll waiting up to ``timeout``: none by then fails)."""
    got = []
    while sum(map(len, got)) < n:
        part = eng.poll(timeout=timeout)
        assert len(part), "signals stopped"
        got.append(part)
    return np.concatenate(got)


def test_stalled_sm_fails_over_without_losing_signals(pop, market):
    with dc.Engine(pop, threads=1) as a:
        ref = a.run(market)
    # the victim stalls far longer than the sentinel needs to move it, however late a loaded
    # machine runs the sentinel (close() ends the stall); a 1 s deadline, not 20 ms, so a healthy
    # worker the load holds up for a moment is not taken for a stalled one
    with dc.Engine(pop, threads=2, stall_deadline=1.0, fault_injection=True) as eng:
        eng.submit(market[:20])
        first = eng.poll(20, timeout=5.0)
        while len(first) < 20:
            first = np.concatenate([first, eng.poll(timeout=5.0)])
        victim = 1
        eng.faults.stall_sm(victim, 30.0)
        eng.submit(market[20:])
        got = [first]
        while sum(map(len, got)) < len(market):
            part = eng.poll(timeout=10.0)
            assert len(part), "signals stopped"
            got.append(part)
        st = eng.stats()
    assert np.concatenate(got).tobytes() == ref.tobytes()
    assert st["failovers"] >= 1
    assert st["sms"]["stalls"][victim] >= 1
    assert st["sms"]["owner"][victim] != 0  # no longer on the stalled worker
    standby = [i for i, w in enumerate(st["workers"]) if w["standby"]]
    assert standby == [2] and st["workers"][2]["sms"] >= 1



def test_a_worker_stuck_holding_its_sm_shows_it_moving_then_hands_it_over():
    """A worker stuck in the middle of a group (holding it) cannot be relieved of it: the sentinel
    marks the group "moving" (owner -1) and the standby adopts it once the worker lets go. The
    status "moving" was never set (a move waiting for the holder showed "stalled" with owner -1),
    and the stall hooks could only stall a worker before it took hold, so the wait was never
    exercised by a test. No signal is lost or changed."""
    bars = dc.sim.MarketSimulator(["EURUSD"], timeframe="H1", seed=4).bars(400)
    p = dc.Population.random(2_000, instruments=["EURUSD"], timeframes=["H1"], seed=5)
    with dc.Engine(p, threads=1) as a:
        ref = a.run(bars)
    with dc.Engine(p, threads=1, fault_injection=True, stall_deadline=0.05) as eng:
        eng.run(bars[:100])
        eng.faults.stall_sm(0, 1.5, holding=True)
        eng.submit(bars[100:101])
        seen = set()
        deadline = time.monotonic() + 1.2
        while time.monotonic() < deadline:
            sms = eng.stats()["sms"]
            seen.add((str(sms["status"][0]), int(sms["owner"][0])))
            time.sleep(0.01)
        assert ("moving", -1) in seen, seen
        eng.submit(bars[101:])
        got = _poll_until(eng, len(bars) - 100)
        until = time.monotonic() + 5.0  # "ok" once the sentinel's next tick sees the progress
        while (st := eng.stats())["sms"]["status"][0] != "ok" and time.monotonic() < until:
            time.sleep(0.01)
    assert got.tobytes() == ref[100:].tobytes()
    assert st["failovers"] == 1 and st["sms"]["stalls"][0] == 1
    assert set(st["sms"]["owner"].tolist()) == {1} and set(st["sms"]["status"].tolist()) == {"ok"}


def test_a_stall_of_a_negative_length_is_refused() -> None:
    pop = dc.Population.random(32, instruments=["EURUSD"], seed=1)
    with dc.Engine(pop, threads=1, fault_injection=True) as eng:
        with pytest.raises(ValueError, match="seconds"):
            eng.faults.stall_sm(0, -1.0, holding=True)
        with pytest.raises(IndexError, match="0 ns or more"):  # the native hook checks it too
            eng._native.inject_stall(0, -5, True)


def test_an_sm_heartbeat_counts_from_its_pending_bar_not_from_the_idle_time_before() -> None:
    """An SM's heartbeat age is the time it has had work without progress: 0 when idle. It used
    to count from the SM's last unit of progress, so 1.5 s idle then 0.15 s into a stalled bar
    read 1.65 s (and a healthy SM just handed a bar after a quiet hour read an hour)."""
    bars = dc.sim.MarketSimulator(["HBIDLE"], timeframe="H1", seed=1).bars(60)
    pop = dc.Population.random(64, instruments=["HBIDLE"], seed=2)
    # deadline 0.4 s (the sentinel looks every 0.1 s), the stall shorter: no failover
    with dc.Engine(pop, threads=1, fault_injection=True, stall_deadline=0.4) as eng:
        eng.run(bars[:50])
        time.sleep(1.5)
        assert eng.stats()["sms"]["heartbeat_age_s"][0] == 0.0  # idle
        eng.faults.stall_sm(0, 0.3)
        t0 = time.monotonic()
        eng.submit(bars[50:51])
        time.sleep(0.15)
        age = eng.stats()["sms"]["heartbeat_age_s"][0]
        waited = time.monotonic() - t0
        assert len(eng.poll(timeout=5.0)) == 1
        assert eng.stats()["failovers"] == 0
    # at least the time since the bar came, at most a sentinel period (and the machine's lag) more
    assert 0.15 <= age < waited + 0.6, (age, waited)


def test_a_failover_never_hands_the_group_back_to_the_stalled_worker():
    """threads=1: the stalled worker's group goes to the standby, which catches up on a backlog
    longer than the deadline. It used to publish no heartbeat while catching up, so the sentinel
    took it for stalled too and handed the group back to the worker still asleep in its stall
    (whose ring was empty: it had popped its batch), reporting it "ok"."""
    bars = dc.sim.MarketSimulator(["EURUSD"], timeframe="H1", seed=3).bars(1500)
    p = dc.Population.random(20_000, instruments=["EURUSD"], timeframes=["H1"], seed=11)
    with dc.Engine(p, threads=1) as a:
        ref = a.run(bars)
    with dc.Engine(p, threads=1, fault_injection=True, stall_deadline=0.05, capacity=2048) as eng:
        eng.run(bars[:100])
        eng.faults.stall_sm(0, 30.0)  # worker 0 sleeps until close()
        eng.submit(bars[100:])
        got = _poll_until(eng, len(bars) - 100)
        st = eng.stats()
    assert got.tobytes() == ref[100:].tobytes()
    assert st["workers"][1]["standby"] and st["workers"][0]["heartbeat_age_s"] > 0.05
    assert set(st["sms"]["owner"]) == {1}  # all on the standby, none back on worker 0


def test_run_and_step_of_two_threads_take_turns():
    """Two threads feeding with step (or step and run): each call returns its own bar's signal.
    A step used to let go of the feed before it waited for its signal, and the other thread's
    call then found that bar unpolled and refused ("poll() them first", which it could not)."""
    bars = dc.sim.MarketSimulator(["EURUSD", "GBPUSD"], timeframe="H1", seed=3).bars(120)
    p = dc.Population.random(2000, instruments=["EURUSD", "GBPUSD"], timeframes=["H1"], seed=11)
    with dc.Engine(p, threads=1) as a:
        ref = a.run(bars)
    ids = np.unique(bars["instrument"])
    for mode in ("step", "run"):
        with dc.Engine(p, threads=2) as eng:
            out: dict[int, list] = {0: [], 1: []}
            errors: list[BaseException] = []

            def feed(k: int) -> None:
                mine = bars[bars["instrument"] == ids[k]]
                try:
                    for i in range(len(mine)):
                        if k == 0 or mode == "step":
                            s = eng.step(mine[i])
                            out[k].append((s.ts, s.score))
                        else:
                            r = eng.run(mine[i:i + 1])[0]
                            out[k].append((int(r["ts"]), float(r["score"])))
                except BaseException as e:  # noqa: BLE001 - reported below
                    errors.append(e)

            ts = [threading.Thread(target=feed, args=(k,)) for k in (0, 1)]
            for t in ts:
                t.start()
            for t in ts:
                t.join(60)
            assert not errors, errors[:1]
            for k in (0, 1):  # each stream's own signals, in its order (seq follows the interleaving)
                want = ref[ref["instrument"] == ids[k]]
                assert out[k] == list(zip(want["ts"].tolist(), want["score"].tolist()))


def test_step_from_a_callback_is_refused_like_run_and_submit():
    with dc.Engine(dc.Population.random(300, instruments=["EURUSD"], seed=1), threads=1) as eng:
        bars = dc.sim.MarketSimulator(["EURUSD"], seed=1).bars(3)
        seen: list = []
        done = threading.Event()

        def cb(sig):
            try:
                eng.step(bars[2])
                seen.append("stepped")
            except RuntimeError as e:
                seen.append(str(e))
            done.set()

        eng.on_signal(cb)
        eng.submit(bars[:1])
        assert done.wait(20)
        assert "step() called from an on_signal callback" in seen[0]
        assert eng.stats()["bars_in"] == 1  # the callback's bar was not taken


def test_on_signal_is_refused_while_another_thread_runs():
    """run returns its own bars' signals: a dispatcher started while it runs took some of them
    (run returned fewer signals than bars)."""
    bars = dc.sim.MarketSimulator(["EURUSD"], seed=2).bars(3000)
    with dc.Engine(dc.Population.random(10_000, instruments=["EURUSD"], seed=1), threads=1, capacity=64) as eng:
        got: dict = {}
        t = threading.Thread(target=lambda: got.setdefault("n", len(eng.run(bars))))
        t.start()
        while not eng._runners and t.is_alive():  # (stats() would wait for the run's ingress lock)
            time.sleep(0.0005)
        refused = None
        if t.is_alive():
            try:
                eng.on_signal(lambda s: None)
            except RuntimeError as e:
                refused = str(e)
        t.join(60)
        assert got["n"] == 3000
        assert refused is not None and "on_signal() while run() runs" in refused
        eng.on_signal(lambda s: None)  # once run returned, a dispatcher may start

_FAILOVER_STORM = """
import sys, numpy as np, dynamic_core as dc
names = ["A", "B"]
bars = dc.sim.MarketSimulator(names, seed=3).bars(300)
pop = dc.Population.random(300_000, instruments=names, seed=4)
with dc.Engine(pop, threads=1) as e:
    ref = e.run(bars)
moves = 0
for trial in range(6):
    with dc.Engine(pop, threads=int(sys.argv[1]), stall_deadline=0.001) as e:
        got = e.run(bars)
        moves += e.stats()["failovers"]
    assert got.tobytes() == ref.tobytes(), f"trial {trial}: signals differ"
print(moves)
"""


@pytest.mark.parametrize("threads", [2, 3])
def test_a_storm_of_failovers_loses_nothing_and_changes_nothing(threads):
    # A 1 ms stall deadline on 300k agents: the sentinel moves groups hundreds of times a run,
    # while workers still run them and stale adoptions try to claim them. Every run finishes
    # (no lost unit, no hang) with the signals of one uninterrupted worker. (A claim that failed
    # used to clear the holder's busy flag, so two workers could run one group.)
    import subprocess
    import sys

    from .test_journal import _env

    try:
        r = subprocess.run([sys.executable, "-c", _FAILOVER_STORM, str(threads)], capture_output=True, text=True,
                           timeout=240, env=_env())
    except subprocess.TimeoutExpired:
        pytest.fail("a run hung under failover")
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.split()[-1]) > 50  # the storm happened


def test_poisoned_agent_is_quarantined_and_the_rest_continue(pop, market):
    with dc.Engine(pop, threads=1) as a:
        ref = a.run(market)
    with dc.Engine(pop, threads=2, fault_injection=True) as eng:
        eng.run(market[:150])
        victim = int(np.flatnonzero(eng.agents()["warm"])[0])
        eng.faults.poison(victim)
        rest = eng.run(market[150:])
        agents = eng.agents()
        st = eng.stats()
    assert agents["quarantined"][victim] == 1 and agents["quarantined"].sum() == 1
    assert st["quarantined"] == 1
    assert np.isfinite(agents["equity"]).all()
    inst = pop.records["instrument"][victim]
    mine = rest[rest["instrument"] == inst]
    theirs = ref[150:][ref[150:]["instrument"] == inst]
    assert (mine["n_agents"] == theirs["n_agents"] - 1).all()  # excluded from consensus
    others = rest[rest["instrument"] != inst]
    assert without_seq(others).tobytes() == without_seq(ref[150:][ref[150:]["instrument"] != inst]).tobytes()


def test_faults_are_inert_unless_armed(pop):
    with dc.Engine(pop, threads=1) as eng, pytest.raises(RuntimeError, match="not armed"):
        eng.faults.stall_sm(0, 1.0)


def test_fault_hooks_check_their_arguments(pop):
    with dc.Engine(pop, threads=1, fault_injection=True) as eng:
        with pytest.raises(TypeError, match="agent must be an int"):
            eng.faults.poison(1.7)  # not agent 1
        with pytest.raises(ValueError, match="agent must be in"):
            eng.faults.poison(-1)
        with pytest.raises(IndexError, match="no such agent"):
            eng.faults.poison(len(pop))
        with pytest.raises(ValueError, match="seconds must be a finite number"):
            eng.faults.stall_sm(0, -1.0)
        with pytest.raises(IndexError, match="no such SM"):
            eng.faults.stall_sm(eng.stats()["n_sms"], 0.1)


def test_an_engine_is_neither_copied_nor_pickled(pop):
    import copy
    import pickle

    with dc.Engine(pop, threads=1) as eng:
        for f in (copy.copy, copy.deepcopy, pickle.dumps):
            with pytest.raises(TypeError, match="cannot be (copied|pickled)"):
                f(eng)


def test_step_returns_frozen_aisignal(pop, market):
    with dc.Engine(pop, threads=1) as a:
        ref = a.run(market[:50])
    with dc.Engine(pop, threads=2) as eng:
        sigs = [eng.step(b) for b in market[:50]]
        assert eng.step(market[0]) is None  # out of order: rejected, no signal
        assert eng.stats()["rejects"]["out_of_order"] == 1 or eng.stats()["rejected"] == 1
    assert all(isinstance(s, dc.AISignal) for s in sigs)
    assert [s.seq for s in sigs] == list(ref["seq"])
    assert [s.score for s in sigs] == list(ref["score"])
    assert sigs[0].instrument in NAMES
    with pytest.raises(AttributeError):
        sigs[0].score = 1.0  # type: ignore[misc]
    wire = msgspec.msgpack.encode(sigs[-1])
    assert msgspec.msgpack.decode(wire, type=dc.AISignal) == sigs[-1]


def test_step_takes_a_record_or_an_array_of_one_and_refuses_anything_else(pop, market):
    # A row of a BAR_DTYPE array goes to the core as its bytes; a 1-element array, a record of an
    # equal (not identical) dtype and a row of a strided view give the same signals, field for field.
    with dc.Engine(pop, threads=1) as a:
        ref = dc.payloads.signals_from_records(a.run(market[:40]))
    equal = np.dtype(dc.BAR_DTYPE.descr)
    assert equal == dc.BAR_DTYPE and equal is not dc.BAR_DTYPE
    wide = np.zeros(80, dtype=dc.BAR_DTYPE)
    wide[::2] = market[:40]
    forms = [lambda i: market[i], lambda i: market[i:i + 1], lambda i: market[i:i + 1].astype(equal)[0],
             lambda i: wide[::2][i]]
    for form in forms:
        with dc.Engine(pop, threads=2) as eng:
            assert [eng.step(form(i)) for i in range(40)] == ref
    with dc.Engine(pop, threads=2) as eng:
        g = pop.records[:1]
        with pytest.raises(TypeError, match="BAR_DTYPE"):
            eng.step(g[0])  # a record of another dtype
        with pytest.raises(TypeError, match="BAR_DTYPE"):
            eng.step(market[0].tobytes())
        with pytest.raises(ValueError, match="one bar, got 2"):
            eng.step(market[:2])
        assert eng.stats()["bars_in"] == 0


def test_step_and_run_return_their_own_signals_or_refuse(pop, market):
    # With signals of earlier bars unpolled (a submit not polled, a step that timed out), step
    # and run refuse instead of handing those out as their own (step returned bar i-1's signal
    # for bar i from then on; run(10 bars) returned 110 signals).
    with dc.Engine(pop, threads=1) as a:
        ref = a.run(market[:120])
    with dc.Engine(pop, threads=2) as eng:
        assert eng.submit(market[:100]) == 100
        with pytest.raises(RuntimeError, match="100 signal.*not polled yet.*poll"):
            eng.step(market[100])
        with pytest.raises(RuntimeError, match="not polled yet"):
            eng.run(market[100:110])
        assert eng.stats()["bars_in"] == 100  # nothing taken by the refused calls
        got = [eng.poll(timeout=10.0)]
        while sum(map(len, got)) < 100:
            got.append(eng.poll(timeout=10.0))
        polled = np.concatenate(got)
        assert polled["seq"].tolist() == ref["seq"][:100].tolist()
        s = eng.step(market[100])
        assert (s.seq, s.score) == (ref["seq"][100], ref["score"][100])
        out = eng.run(market[101:110])
        assert out["seq"].tolist() == ref["seq"][101:110].tolist()
    # a step that times out (its SM stalled) leaves its signal to poll; the next step refuses.
    # (No failover for 60 s, and every SM stalled 2 s: the signal is seconds away however late
    # a loaded machine runs this thread; the stalls are disarmed once the step has timed out.)
    with dc.Engine(pop, threads=1, fault_injection=True, stall_deadline=60.0) as eng:
        assert eng.run(market[:110])["seq"].tolist() == ref["seq"][:110].tolist()
        n_sms = len(eng.stats()["sms"]["owner"])
        for sm in range(n_sms):
            eng.faults.stall_sm(sm, 2.0)
        with pytest.raises(TimeoutError):
            eng.step(market[110], timeout=0.05)
        with pytest.raises(RuntimeError, match="1 signal.*not polled yet"):
            eng.step(market[111])
        for sm in range(n_sms):
            eng.faults.stall_sm(sm, 0.0)
        assert eng.poll(timeout=10.0)["seq"].tolist() == [ref["seq"][110]]
        assert eng.step(market[111]).seq == ref["seq"][111]


def test_on_signal_delivers_in_order_and_survives_raising_callback(pop, market, caplog):
    seen: list[int] = []

    def bad(sig: dc.AISignal) -> None:
        raise ValueError("boom")

    with dc.Engine(pop, threads=2) as eng:
        eng.on_signal(bad)
        eng.on_signal(lambda s: seen.append(s.seq))
        eng.submit(market)
        deadline = time.monotonic() + 30
        while len(seen) < len(market) and time.monotonic() < deadline:
            time.sleep(0.01)
        errors = eng.stats()["callback_errors"]
    assert seen == list(range(1, len(market) + 1))
    assert errors == len(market)
    assert "boom" in caplog.text


def wait_for(cond, deadline: float = 30.0) -> bool:
    end = time.monotonic() + deadline
    while not cond() and time.monotonic() < end:
        time.sleep(0.01)
    return cond()


def test_a_callback_raising_a_base_exception_keeps_the_dispatcher_delivering(pop, market, caplog):
    seen: list[int] = []

    def cb(sig: dc.AISignal) -> None:
        seen.append(sig.seq)
        if len(seen) == 3:
            raise SystemExit("a callback calling sys.exit()")  # ended the dispatcher, losing its batch

    with dc.Engine(pop, threads=2) as eng:
        eng.on_signal(cb)
        eng.submit(market)
        assert wait_for(lambda: len(seen) == len(market)), f"{len(seen)} of {len(market)} delivered"
        assert eng.stats()["callback_errors"] == 1 and eng._dispatcher.is_alive()
    assert seen == list(range(1, len(market) + 1))
    assert "sys.exit" in caplog.text


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the planted death
def test_on_signal_starts_a_new_dispatcher_when_the_last_one_died(pop, market, monkeypatch):
    import dynamic_core.engine as engine_mod

    real = engine_mod.signals_from_records
    died = threading.Event()

    def dies_once(records):  # the dispatcher's own code failing, not a callback: it ends
        if not died.is_set():
            died.set()
            raise SystemExit
        return real(records)

    monkeypatch.setattr(engine_mod, "signals_from_records", dies_once)
    seen: list[int] = []
    with dc.Engine(pop, threads=2) as eng:
        eng.on_signal(lambda s: None)
        eng.submit(market[:4])
        assert died.wait(10) and wait_for(lambda: not eng._dispatcher.is_alive(), 10)
        eng.on_signal(lambda s: seen.append(s.seq))  # was never delivered: the dead one stayed
        eng.submit(market[4:8])
        assert wait_for(lambda: seen[-1:] == [8], 10), seen
    # the batch the dead dispatcher had polled is gone with it (it polled 1 to 4 signals of the
    # first 4); everything after it arrives, in order
    assert seen == list(range(seen[0], 9)) and 2 <= seen[0] <= 5, seen


def test_an_on_signal_callback_cannot_feed_the_engine(pop, market):
    raised: list[str] = []
    done = threading.Event()

    def cb(sig: dc.AISignal) -> None:
        if done.is_set():
            return
        for call in (lambda: eng.run(market[8:12]), lambda: eng.submit(market[8:12])):
            try:
                call()
            except RuntimeError as e:
                raised.append(str(e))
        done.set()

    with dc.Engine(pop, threads=2) as eng:
        eng.on_signal(cb)
        eng.submit(market[:4])
        assert done.wait(10)
        assert wait_for(lambda: eng.stats()["in_flight"] == 0, 10)
        assert eng.stats()["bars_in"] == 4  # nothing was fed from the callback
    assert len(raised) == 2 and all("on_signal callback cannot feed the engine" in m for m in raised), raised


def test_close_stops_the_engine_before_joining_a_dispatcher_waiting_on_it(pop, market):
    eng = dc.Engine(pop, threads=2, capacity=64)
    ended: list[BaseException] = []

    def feed() -> None:
        try:
            eng.submit(market)  # 1200 bars through a window of 64: waits for the consumer
        except Exception as e:  # noqa: BLE001 - close ends the wait with an error
            ended.append(e)

    feeder = threading.Thread(target=feed, daemon=True)
    waiting = threading.Event()

    def cb(sig: dc.AISignal) -> None:
        if not waiting.is_set():
            waiting.set()
            feeder.join()  # the consumer waits on a feeding call that waits on the consumer

    eng.on_signal(cb)
    feeder.start()
    assert waiting.wait(10)
    closer = threading.Thread(target=eng.close, daemon=True)
    closer.start()
    closer.join(10)
    assert not closer.is_alive(), "close() hangs joining the dispatcher before stopping the engine"
    assert not feeder.is_alive() and len(ended) == 1
    assert not eng._dispatcher.is_alive()


def test_default_threads_stay_within_the_native_limit_on_many_cores(monkeypatch):
    import dynamic_core.engine as engine_mod

    monkeypatch.setattr(engine_mod, "usable_cores", lambda: 96)  # a 96-core machine
    pop = dc.Population.random(64, instruments=["EURUSD"], timeframes=["H1"], seed=1)
    with dc.Engine(pop) as eng:
        assert eng.stats()["threads"] == engine_mod.MAX_THREADS == 63
    with pytest.raises(ValueError, match=r"threads must be in \[1, 63\]"):
        dc.Engine(pop, threads=96)


def test_poll_and_step_take_an_infinite_or_huge_timeout_and_max_n(pop, market):
    with dc.Engine(pop, threads=2) as eng:
        eng.submit(market[:3])
        assert len(eng.poll(max_n=1, timeout=math.inf)) == 1  # inf: no limit, like None
        assert len(eng.poll(max_n=1, timeout=1e10)) == 1      # ~317 years: clamped
        assert len(eng.poll(max_n=2**64, timeout=10**400)) == 1  # past the native size_t
        eng.submit(market[3:4])
        assert len(eng.poll(max_n=1, timeout=1e300)) == 1  # x 1e9 is inf in a float
        assert eng.step(market[4], timeout=math.inf).seq == 5
        assert eng.step(market[5], timeout=1e10).seq == 6
        with pytest.raises(ValueError, match="timeout"):
            eng.poll(timeout=math.nan)
        with pytest.raises(TypeError, match="timeout"):
            eng.poll(timeout="1")
        with pytest.raises(TypeError, match="max_n"):
            eng.poll(max_n=2.5)
        with pytest.raises(ValueError, match="max_n"):
            eng.poll(max_n=-1)


def test_poll_of_nothing_returns_at_once_and_a_close_ends_a_waiting_poll(pop, market):
    with dc.Engine(pop, threads=2) as eng:
        eng.submit(market[:10])
        assert len(eng.poll(max_n=0, timeout=None)) == 0  # used to spin forever
    eng = dc.Engine(pop, threads=2)
    got: dict = {}

    def waiter():
        try:
            got["r"] = eng.poll(timeout=None)  # nothing was submitted: waits
        except RuntimeError as e:
            got["e"] = str(e)

    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    time.sleep(0.3)
    eng.close()
    t.join(5)
    assert not t.is_alive() and got == {"e": "engine is closed"}  # it spun at 100% CPU, forever


@pytest.mark.parametrize("change", ["set_credit", "agents", "set_dsi"])
def test_close_ends_a_change_waiting_for_idle_workers_while_another_thread_feeds(change):
    # close() stops the workers, then waits for the ingress lock that a caller waiting for the
    # workers to go idle holds: that caller must give up ("engine is closed"), not wait forever
    names = ["EURUSD", "GBPUSD"]
    pop = dc.Population.random(400, instruments=names, seed=3)
    bars = dc.sim.MarketSimulator(names, seed=8).bars(5000)
    calls = {"set_credit": lambda e: e.set_credit([1, 2, 3], [1.5, 1.5, 1.5]), "agents": lambda e: e.agents(),
             "set_dsi": lambda e: e.set_dsi({"EURUSD": 0.1})}
    for it in range(6):
        eng = dc.Engine(pop, threads=3, capacity=1024, backpressure="drop_oldest")
        stop = threading.Event()

        def feeder():
            for i in range(0, len(bars), 200):
                if stop.is_set():
                    return
                try:
                    eng.submit(bars[i:i + 200])
                except RuntimeError:
                    return

        def changer():
            while not stop.is_set():
                try:
                    calls[change](eng)
                except RuntimeError:
                    return

        threads = [threading.Thread(target=f, daemon=True) for f in (feeder, changer)]
        for t in threads:
            t.start()
        time.sleep(0.02 + 0.03 * (it % 3))
        closer = threading.Thread(target=eng.close, daemon=True)
        closer.start()
        closer.join(15)
        stop.set()
        assert not closer.is_alive(), f"close() blocked (iteration {it})"
        for t in threads:
            t.join(5)
            assert not t.is_alive()


def test_run_and_step_refuse_while_a_dispatcher_takes_signals(pop, market):
    with dc.Engine(pop, threads=2) as eng:
        eng.on_signal(lambda s: None)
        with pytest.raises(RuntimeError, match=r"run\(\) returns the signals of its bars, but an on_signal callback"):
            eng.run(market[:50])  # it returned some of them, the dispatcher the rest
        with pytest.raises(RuntimeError, match=r"step\(\) returns the signals"):
            eng.step(market[0])
        assert eng.stats()["bars_in"] == 0


def test_strict_refuses_a_bad_batch_in_submit_and_step_too(pop, market):
    bad = market[:6].copy()
    bad["close"][3] = np.nan
    with dc.Engine(pop, threads=2, strict=True) as eng:
        with pytest.raises(dc.errors.InvalidInput):
            eng.submit(bad)
        with pytest.raises(dc.errors.InvalidInput):
            eng.step(bad[3])
        assert eng.stats()["bars_in"] == 0
        assert eng.submit(market[:6]) == 6


def test_strict_verdict_holds_against_a_concurrent_feeder(market):
    """Two threads feed one stream of a strict engine, each bar's time taken from a shared
    counter, so one thread's bar often lands after the other's later one. A strict engine must
    refuse such a bar (InvalidInput, nothing taken), never take it as a counted reject: the
    check and the take happen under one lock."""
    one = dc.Population.random(64, instruments=["EURUSD"], timeframes=["H1"], seed=2)
    template = market[market["instrument"] == dc.instruments.id("EURUSD")][:1].copy()
    per_thread = 1500
    for _round in range(10):  # until the feeders have crossed (nearly always in the first round)
        clock = iter(range(1, 10 * per_thread))  # next() is atomic under the GIL
        refused = [0, 0]
        errors: list[BaseException] = []
        with dc.Engine(one, threads=2, strict=True, capacity=4 * per_thread) as eng:
            start = threading.Barrier(2)

            def feed(k: int) -> None:
                try:
                    start.wait()
                    for _ in range(per_thread):
                        bar = template.copy()
                        bar["ts"] = template["ts"][0] + next(clock) * 3_600_000_000_000
                        try:
                            eng.submit(bar)
                        except dc.errors.InvalidInput as e:
                            assert e.reasons == ["out_of_order"]
                            refused[k] += 1
                except BaseException as e:  # noqa: BLE001 - reported below
                    errors.append(e)

            threads = [threading.Thread(target=feed, args=(k,)) for k in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors
            st = eng.stats()  # ingress counts a bar as it takes it
            assert st["rejected"] == 0 and st["dead_letters"] == 0, st["rejects"]
            got = 0
            while got < st["bars_in"] and len(s := eng.poll(timeout=10.0)):
                got += len(s)
            assert got == st["bars_in"]  # every bar taken gave its signal
        assert st["bars_in"] + sum(refused) == 2 * per_thread
        assert st["accepted"] == st["bars_in"]
        if sum(refused):
            break
    assert 0 < sum(refused) < 2 * per_thread, "the two feeders never crossed in 10 rounds"


def test_telemetry(pop, market):
    # (no failover for 60 s: a worker a loaded machine holds up past 50 ms would move SMs)
    with dc.Engine(pop, threads=2, stall_deadline=60.0) as eng:
        eng.run(market)
        st = eng.stats()
    lat = st["latency_s"]
    assert lat["count"] == len(market)
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert len(st["workers"]) == 3 and sum(w["sms"] for w in st["workers"]) == st["n_sms"]
    assert sum(w["agent_updates"] for w in st["workers"]) == st["agent_updates"] == 3000 * 300
    assert (st["sms"]["status"] == "ok").all() and (st["sms"]["bars"] == 300).all()
    assert st["in_flight"] == 0 and 1 <= st["in_flight_high_water"] <= st["capacity"]
    assert 0 < st["warp_occupancy"] <= 1


def stable_threads(deadline: float = 2.0) -> int:
    """The thread count once it has not changed for 50 ms (threads of earlier tests may still
    be leaving)."""
    end = time.monotonic() + deadline
    n, since = native_threads(), time.monotonic()
    while time.monotonic() < end and time.monotonic() - since < 0.05:
        time.sleep(0.005)
        m = native_threads()
        if m != n:
            n, since = m, time.monotonic()
    return n


def test_clean_shutdown_no_leaked_threads(pop, market):
    base = stable_threads()
    for _ in range(5):
        eng = dc.Engine(pop, threads=2)
        eng.submit(market[:100])
        assert native_threads() >= base + 4  # 2 workers, standby, sentinel
        del eng
        gc.collect()
    assert settled_threads(base) == base
    eng = dc.Engine(pop, threads=2)
    eng.on_signal(lambda s: None)
    eng.close()
    eng.close()  # idempotent
    assert settled_threads(base) == base
    with pytest.raises(RuntimeError, match="closed"):
        eng.submit(market[:1])


_DAEMONS_AT_EXIT = r"""
import atexit, sys, threading, time, numpy as np, dynamic_core as dc
from dynamic_core.transport import EngineService
closing = []
atexit.register(lambda: [e.close() for e in closing])        # runs after dynamic_core's own hook
bars = dc.sim.MarketSimulator(["EURUSD", "GBPUSD"], "H1", seed=3).bars(4000)
pop = dc.Population.random(2000, instruments=["EURUSD", "GBPUSD"], seed=1)
waiting = dc.Engine(pop, threads=1)                          # a consumer waiting in poll
full = dc.Engine(pop, threads=1, capacity=64, backpressure="block")  # a producer blocked on room
busy = dc.Engine(pop, threads=2)                             # a long run in progress
listened = dc.Engine(pop, threads=2)
listened.on_signal(lambda s: None)                           # its dispatcher waits in poll
closing.append(listened)
served = dc.Engine(pop, threads=1)
svc = EngineService(served, on_signals=lambda recs: None)
svc.start()                                                  # left running: no stop()
started = threading.Barrier(4)
def wait():
    started.wait(); waiting.poll(timeout=None)
def produce():
    started.wait(); full.submit(bars)
def compute():
    started.wait()
    for _ in range(1000): busy.run(bars)
for f in (wait, produce, compute):
    threading.Thread(target=f, daemon=True).start()
started.wait()
time.sleep(0.3)                                              # all three inside native calls
sys.exit(int(sys.argv[1]))
"""


@pytest.mark.parametrize("code", [0, 3])
def test_daemon_threads_inside_the_engine_at_exit(code: int) -> None:
    # Daemon threads still inside engine calls (GIL released) when the interpreter exits: the
    # process ends with the script's own exit code. CPython ends such threads when they come
    # back for the GIL during finalization; out of pybind11's GIL guard that aborted the process
    # ("terminate called without an active exception", exit 134).
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _DAEMONS_AT_EXIT, str(code)], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == code, r.stderr[-2000:]
    assert "terminate" not in r.stderr and "Fatal" not in r.stderr, r.stderr[-2000:]


def test_run_and_step_do_not_share_their_signals_with_another_threads_poll(pop, market):
    # A poll waiting on another thread: run and step refuse before taking anything (they would
    # have returned only part of their signals, the poller the rest, with no error).
    with dc.Engine(pop, threads=2) as eng:
        t = threading.Thread(target=eng.poll, kwargs={"timeout": 1.0})
        t.start()
        assert wait_for(lambda: len(eng._pollers) > 0)
        for call in (lambda: eng.run(market[:40]), lambda: eng.step(market[0])):
            with pytest.raises(RuntimeError, match=r"poll\(\) is waiting on another thread"):
                call()
        t.join()
        assert eng.stats()["bars_in"] == 0
        assert len(eng.run(market[:40])) == 40  # once the poll is over
    # a run in progress: a poll from another thread raises instead of taking its signals
    with dc.Engine(pop, threads=2, fault_injection=True, stall_deadline=5.0) as eng:
        eng.faults.stall_sm(0, 0.5)
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("run", eng.run(market[:80])))
        t.start()
        assert wait_for(lambda: eng._runners)
        with pytest.raises(RuntimeError, match=r"poll\(\) while run\(\) runs on thread"):
            eng.poll(timeout=0)
        t.join()
        assert len(out["run"]) == 80
        with dc.Engine(pop, threads=1) as ref:
            assert np.array_equal(out["run"], ref.run(market[:80]))


def test_a_poll_without_waiting_does_not_wait_for_another_threads_poll(pop, market):
    with dc.Engine(pop, threads=2) as eng:
        ended = []

        def wait() -> None:
            with pytest.raises(RuntimeError, match="closed"):
                eng.poll(timeout=3.0)
            ended.append(True)

        t = threading.Thread(target=wait)
        t.start()
        assert wait_for(lambda: len(eng._pollers) > 0)
        time.sleep(0.05)  # the other poll is parked in the native wait now
        t0 = time.monotonic()
        assert len(eng.poll(timeout=0)) == 0
        got = eng.poll(timeout=0.2)
        waited = time.monotonic() - t0
        assert len(got) == 0 and waited < 1.5, waited  # it waited up to 3 s for the other poll
        eng.close()  # ends the other poll
        t.join()
        assert ended


def test_an_engine_whose_callback_refers_to_it_is_collected_and_its_threads_end(pop, market):
    class Owner:
        def __init__(self) -> None:
            self.eng = dc.Engine(pop, threads=2)
            self.eng.on_signal(self.handle)
            self.seen = 0

        def handle(self, sig) -> None:
            self.seen += 1
            self.eng.stats()

    before = settled_threads(native_threads())
    o = Owner()
    o.eng.submit(market[:20])
    assert wait_for(lambda: o.seen == 20)
    dispatcher = o.eng._dispatcher
    del o
    gc.collect()
    dispatcher.join(5.0)
    assert not dispatcher.is_alive()
    assert settled_threads(before) <= before  # workers and sentinel joined too (an earlier test's may still end)


_IDLE_CPU = """
import sys, time, dynamic_core as dc
names = ["EURUSD", "GBPUSD", "USDJPY", "XAUUSD"]
market = dc.sim.MarketSimulator(names, timeframe="H1", seed=3).bars(8)
pop = dc.Population.random(3000, instruments=names, timeframes=["H1"], seed=11)
with dc.Engine(pop, threads=2) as eng:
    eng.on_signal(lambda s: None)
    eng.submit(market)
    time.sleep(0.3)  # the feed stops: past the live-feed spin
    t0, c0 = time.monotonic(), time.process_time()
    time.sleep(1.0)
    print((time.process_time() - c0) / (time.monotonic() - t0))
"""


def test_an_idle_engine_with_a_callback_takes_no_cpu():
    # in a process of its own: the suite's process also runs what earlier tests left behind
    import subprocess
    import sys

    from .test_journal import _env

    r = subprocess.run([sys.executable, "-c", _IDLE_CPU], capture_output=True, text=True, timeout=120, env=_env())
    assert r.returncode == 0, r.stderr[-2000:]
    busy = float(r.stdout.split()[-1])
    assert busy < 0.02, busy  # the dispatcher spun 2 ms of every 50 ms wait: ~5% of a core


def test_a_second_close_returns_once_everything_is_joined(pop, market):
    eng = dc.Engine(pop, threads=2)
    started = threading.Event()

    def slow(sig) -> None:
        started.set()
        time.sleep(0.5)

    eng.on_signal(slow)
    eng.submit(market[:2])
    started.wait(5.0)
    first = threading.Thread(target=eng.close)
    first.start()
    assert wait_for(lambda: eng.closed)
    eng.close()
    assert not eng._dispatcher.is_alive()  # returned before the dispatcher was joined
    first.join()


def test_fault_hooks_and_arguments_after_close(pop, market):
    eng = dc.Engine(pop, threads=1, fault_injection=True)
    eng.close()
    with pytest.raises(RuntimeError, match="closed"):
        eng.faults.stall_sm(0, 0.1)
    with pytest.raises(RuntimeError, match="closed"):
        eng.faults.poison(0)
    for bad in ("yes", 1, None):
        with pytest.raises(TypeError, match="fault_injection"):
            dc.Engine(pop, threads=1, fault_injection=bad)


@pytest.mark.parametrize("policy", ["drop_oldest", "block", "reject_new"])
def test_bars_that_take_no_slot_neither_wait_for_room_nor_drop_signals(policy: str) -> None:
    """A full window of ready signals; then bars of an instrument no agent follows, bad bars and
    one followed bar. Only the followed bar takes a slot: drop_oldest drops one signal (it
    dropped one per bar of the batch's piece, unfollowed and rejected ones too: lost signals),
    block takes the slot-less bars at once (it waited for room they do not need: forever with
    nobody polling), and every policy takes them all."""
    bars = dc.sim.MarketSimulator(("SLOTA", "SLOTB", "SLOTC"), seed=1).bars(200)
    pop = dc.Population.random(64, instruments=["SLOTA", "SLOTB"], seed=3)  # nobody follows SLOTC
    unfollowed = bars["instrument"] == dc.instruments.id("SLOTC")
    fol, unf = bars[~unfollowed], bars[unfollowed]
    bad = fol[100:110].copy()
    bad["close"] = np.nan
    with dc.Engine(pop, threads=1, capacity=64, backpressure=policy) as eng:
        assert eng.submit(fol[:64]) == 64
        eng._native.wait_idle()  # every one of them ready, none polled
        before = eng.stats()["backpressure"]
        mixed = np.concatenate([unf[:15], fol[64:65]])
        if policy == "block":  # the window stays full: only the slot-less bars go in
            assert eng.submit(unf[:15], timeout=0.5) == 15
            assert eng.submit(bad, timeout=0.5) == 10
            after = eng.stats()
            assert after["backpressure"] == before and after["in_flight"] == 64
            return
        taken = eng.submit(mixed)
        after = eng.stats()["backpressure"]
        if policy == "drop_oldest":
            assert taken == 16 and after["dropped"] == before["dropped"] + 1
        else:  # reject_new: the slot-less bars are taken, the followed one finds no room
            assert taken == 15 and after["dropped"] == before["dropped"]
        eng._native.wait_idle()  # the followed bar's signal is computed on the worker
        got = eng.poll(timeout=1.0)
        assert len(got) == 64


def test_close_stops_the_dispatcher_after_the_callback_it_runs() -> None:
    """close() used to wait for the dispatcher to deliver the whole batch it had polled (up to
    4,096 callbacks); a close from inside a callback returned, and the batch kept coming after
    it. Now the dispatcher stops after the callback it is running."""
    bars = dc.sim.MarketSimulator(("CBSLOW",), seed=2).bars(600)
    pop = dc.Population.random(64, instruments=["CBSLOW"], seed=1)
    seen: list[int] = []
    eng = dc.Engine(pop, threads=1, capacity=1024)

    @eng.on_signal
    def slow(sig) -> None:
        seen.append(sig.seq)
        time.sleep(0.005)

    eng.submit(bars)
    assert wait_for(lambda: len(seen) >= 10, 20.0)
    eng.close()
    at_close = len(seen)
    time.sleep(0.2)
    assert len(seen) == at_close < 100, (at_close, len(seen))
    # closed from a callback: nothing is delivered after that callback
    seen2: list[int] = []
    eng2 = dc.Engine(pop, threads=1, capacity=1024)

    @eng2.on_signal
    def closer(sig) -> None:
        seen2.append(sig.seq)
        if len(seen2) == 5:
            eng2.close()

    eng2.submit(bars)
    assert wait_for(lambda: eng2.closed and len(seen2) >= 5, 20.0)
    time.sleep(0.2)
    assert len(seen2) == 5


def test_poll_beside_on_signal_is_refused_rather_than_taking_the_callbacks_signals() -> None:
    bars = dc.sim.MarketSimulator(("CBPOLL",), seed=2).bars(50)
    pop = dc.Population.random(64, instruments=["CBPOLL"], seed=1)
    seen: list[int] = []
    with dc.Engine(pop, threads=1) as eng:
        eng.on_signal(lambda s: seen.append(s.seq))
        with pytest.raises(RuntimeError, match="poll\\(\\) beside on_signal"):
            eng.poll(timeout=0.05)
        eng.submit(bars)
        assert wait_for(lambda: len(seen) == 50, 20.0)


def test_stats_answers_while_a_long_run_runs_on_another_thread() -> None:
    """run() held the ingress lock for its whole batch, and stats() (a health monitor's call)
    waited for all of it. It now releases it while it waits for its signals."""
    bars = dc.sim.MarketSimulator(("LONGA", "LONGB"), seed=4).bars(20_000)
    pop = dc.Population.random(8192, instruments=["LONGA", "LONGB"], seed=2)
    with dc.Engine(pop, threads=1) as eng:
        runner = threading.Thread(target=eng.run, args=(bars,), daemon=True)
        runner.start()
        assert wait_for(lambda: eng.in_flight() > 0, 20.0)
        st = eng.stats()
        assert runner.is_alive() and 0 < st["bars_in"] < len(bars), st["bars_in"]
        runner.join(120)
        assert eng.stats()["bars_in"] == len(bars)


# ---- the sentinel after failovers ------------------------------------------------------------


def test_close_right_after_failovers_leaves_every_sm_at_the_same_bar():
    """close() joined the workers, then the sentinel: a move waiting for its old owner (owner -1)
    or an adoption posted to a worker that had left never ran its bars, and agents() after close
    mixed SMs at different bars (7 of 8 trials). close() now runs what moved groups left."""
    bars = dc.sim.MarketSimulator(("CLOSEA", "CLOSEB"), seed=1).bars(128)
    pop = dc.Population.random(20_000, instruments=["CLOSEA", "CLOSEB"], seed=2)
    with dc.Engine(pop, threads=1) as e:
        e.run(bars)
        ref = e.agents().copy()
    moved = 0
    for trial in range(4):
        # a 1 ms deadline with 256-bar blocks: workers hold groups past it, so groups move
        eng = dc.Engine(pop, threads=2, stall_deadline=0.001, capacity=256, block_bars=256)
        eng.submit(bars)
        time.sleep(0.003 * trial)
        eng.close()
        st, lay = eng.stats(), eng.layout()
        moved += st["failovers"]
        assert (st["sms"]["bars"] == lay["stream_bars"][lay["sm_stream"]]).all(), trial
        assert (st["sms"]["owner"] >= 0).all()
        assert eng.agents().tobytes() == ref.tobytes(), trial
    assert moved > 0, "no failover happened: the test tested nothing"


def _poisoned_run(pop, bars, stall: bool):
    with dc.Engine(pop, threads=1, fault_injection=True) as eng:
        eng.run(bars[:60])
        eng.faults.poison(0)
        if stall:
            eng.faults.stall_sm(0, 0.5)  # past the 50 ms deadline: the group moves to the standby
        eng.submit(bars[60:])
        out = []
        while sum(map(len, out)) < len(bars) - 60:
            out.append(eng.poll(timeout=5.0))
        return np.concatenate(out), eng.agents(), eng.stats()


def test_a_poison_armed_before_a_failover_lands_on_the_same_bar():
    # the adopter's catch-up ran the backlog with no poison, and the poison landed on whatever
    # batch came next (or never): the quarantine depended on failover timing
    bars = dc.sim.MarketSimulator(("POISONFO",), seed=1).bars(200)
    pop = dc.Population.random(500, instruments=["POISONFO"], seed=2)
    ref, ra, rs = _poisoned_run(pop, bars, stall=False)
    got, a, s = _poisoned_run(pop, bars, stall=True)
    assert s["failovers"] >= 1 and rs["quarantined"] == s["quarantined"] == 1
    assert got.tobytes() == ref.tobytes() and a.tobytes() == ra.tobytes()


def test_with_every_worker_stalled_a_stall_is_one_failover_not_one_per_deadline():
    # worker and standby both asleep: the group went from one stuck worker to another (or to
    # itself) every deadline, each counted as a failover and a stall (16 for 2 stalls)
    bars = dc.sim.MarketSimulator(("STORM",), seed=1).bars(200)
    pop = dc.Population.random(500, instruments=["STORM"], seed=2)
    with dc.Engine(pop, threads=1) as e:
        ref = e.run(bars)
    with dc.Engine(pop, threads=1, fault_injection=True) as eng:
        got = [eng.run(bars[:50])]
        eng.faults.stall_sm(0, 1.0)
        got.append(eng.run(bars[50:100]))  # returns once the standby has the group
        eng.faults.stall_sm(0, 1.0)  # the standby sleeps too, worker 0 still does
        got.append(eng.run(bars[100:]))
        st = eng.stats()
        # worker busy time leaves the injected sleeps out (2 s of them; the bars take ms)
        assert st["worker_busy_seconds"] < 0.5, st["worker_busy_seconds"]
    assert np.concatenate(got).tobytes() == ref.tobytes()
    assert 2 <= st["failovers"] <= 3, st["failovers"]
    assert (st["sms"]["stalls"] <= 3).all(), st["sms"]["stalls"]


def test_stats_counts_the_agents_quarantined_now_not_ever():
    from dynamic_core.payloads import EvolutionConfig

    bars = dc.sim.MarketSimulator(("QNOW",), seed=1).bars(300)
    pop = dc.Population.random(500, instruments=["QNOW"], seed=2)
    with dc.Engine(pop, threads=1, fault_injection=True) as eng:
        eng.run(bars[:200])
        eng.faults.poison(0)
        eng.run(bars[200:201])
        assert eng.agents()["quarantined"].sum() == eng.stats()["quarantined"] == 1
        rep = eng.evolve(EvolutionConfig(min_age=10, min_trades=0), seed=1, generation=1)
        assert ((rep["births"]["how"] & 8) != 0).sum() == 1  # the quarantined agent was replaced
        eng.run(bars[201:202])
        assert eng.agents()["quarantined"].sum() == eng.stats()["quarantined"] == 0
        eng.faults.poison(0)
        eng.run(bars[202:203])
        assert eng.agents()["quarantined"].sum() == eng.stats()["quarantined"] == 1


def test_the_kernel_microbenchmark_runs_every_lane_the_same_on_each_instruction_set():
    """bench_runtime's kernel figure (_core.kernel_bench) steps every synthetic lane of every bar
    through the engine's lane kernel, with the same results on each instruction-set level, and
    refuses sizes it cannot run."""
    from dynamic_core import _core

    level = _core.kernel_isa()
    try:
        runs = {}
        for isa in sorted({0, 3, level}):
            if _core.set_kernel_isa(isa) != isa:
                continue
            r = _core.kernel_bench(3, 500, 40, 4)
            assert r["lane_updates"] == 3 * 128 * 40 and r["ns_per_lane_update"] > 0
            runs[isa] = r["checksum"]
        assert len(set(runs.values())) == 1, runs
    finally:
        _core.set_kernel_isa(level)
    for bad in [dict(sms=0), dict(features=1), dict(bars=0), dict(rows=0), dict(rows=5000)]:
        with pytest.raises(ValueError):
            _core.kernel_bench(**bad)


def test_a_step_behind_another_threads_run_keeps_to_its_timeout(pop, market):
    """step(timeout=...) bounds the wait for another thread's run too: it waited for the whole
    run (seconds here, a stalled SM holding it back) before its own deadline was even looked
    at. It raises TimeoutError at its timeout, the bar not taken and counted as a submit's
    would be; the run is untouched and the bar steps later."""
    with dc.Engine(pop, threads=1) as a:
        ref = a.run(market)
    n = len(market) - 1
    with dc.Engine(pop, threads=1, capacity=64, stall_deadline=60, fault_injection=True) as eng:
        eng.faults.stall_sm(0, 1.5, holding=True)
        out: dict = {}
        runner = threading.Thread(target=lambda: out.setdefault("run", eng.run(market[:n])))
        runner.start()
        end = time.monotonic() + 10
        while eng.stats()["bars_in"] == 0 and time.monotonic() < end:
            time.sleep(0.005)
        before = eng.stats()["backpressure"]
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="not taken"):
            eng.step(market[n], timeout=0.1)
        waited = time.monotonic() - t0
        after = eng.stats()["backpressure"]
        runner.join(30)
        assert not runner.is_alive()
        sig = eng.step(market[n], timeout=10.0)
    assert waited < 1.0, waited  # not the run's 1.5 s stall
    assert after["events"] == before["events"] + 1 and after["rejected"] == before["rejected"] + 1
    assert out["run"].tobytes() == ref[:n].tobytes()
    assert sig is not None and sig.seq == int(ref[n]["seq"]) and sig.score == float(ref[n]["score"])


def test_on_signal_is_refused_beside_another_threads_waiting_poll(pop, market):
    """A dispatcher started while another thread waits in poll shared the signals with it (the
    callbacks missed those the poll took): on_signal refuses then, as poll refuses beside a
    dispatcher."""
    with dc.Engine(pop, threads=1) as eng:
        polled: list = []
        poller = threading.Thread(target=lambda: polled.append(eng.poll(timeout=1.0)))
        poller.start()
        end = time.monotonic() + 10
        while not eng._pollers and time.monotonic() < end:
            time.sleep(0.002)
        with pytest.raises(RuntimeError, match="poll"):
            eng.on_signal(lambda s: None)
        poller.join(10)
        got: list = []
        eng.on_signal(got.append)  # once the poll is over
        eng.submit(market[:20])
        end = time.monotonic() + 20
        while len(got) < 20 and time.monotonic() < end:
            time.sleep(0.01)
    assert len(polled) == 1 and len(polled[0]) == 0 and len(got) == 20
