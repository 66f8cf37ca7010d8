"""What an embedding process relies on beyond the data path: ^C ends a blocking call, an engine
with callbacks is still collected, and a forked child cannot crash on an inherited engine."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from typing import Any
from pathlib import Path

import dynamic_core as dc
import numpy as np
import pytest

PKG = os.path.dirname(os.path.dirname(os.path.abspath(dc.__file__)))  # the package as installed (or built here)


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _child(code: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (PKG, os.environ.get("PYTHONPATH")) if p),
               OPENBLAS_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _interrupted_once_ready(p: subprocess.Popen) -> str:
    """^C to the child once it prints "ready"; it must then print "interrupted ..." and exit 0
    (within 30 s: a call ^C cannot end hangs until the child is killed). Returns its output."""
    with p:
        try:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready", p.stderr
            p.send_signal(signal.SIGINT)
            out, err = p.communicate(timeout=30)
        finally:
            p.kill()
    assert p.returncode == 0, (out, err)
    assert out.startswith("interrupted"), (out, err)
    return out


@pytest.mark.parametrize("call", ["eng.submit(bars)", "eng.poll(timeout=None)", "eng.poll(timeout=3600)"])
def test_ctrl_c_ends_a_blocking_call(call: str) -> None:
    # a block-policy submit with no consumer waits for room for good, an idle poll(None) for a
    # signal that never comes: ^C must end both (it was ignored until the process was killed)
    # "ready" comes from a watcher thread once the main thread is inside the call (a submit: once
    # it has filled the window and waits for room), so ^C arrives while the call blocks however
    # late a loaded machine runs the child
    is_submit = "submit" in call
    p = _child(f"""
        import sys, threading, time, dynamic_core as dc
        pop = dc.Population.random(256, instruments=["EURUSD"], timeframes=[3600], seed=1)
        bars = dc.sim.MarketSimulator(["EURUSD"], timeframe="H1", seed=1).bars(64)
        main = threading.main_thread().ident
        submit = {is_submit!r}

        def blocked():
            if submit:
                return eng.stats()["backpressure"]["events"] >= 1
            f = sys._current_frames().get(main)
            while f is not None and f.f_code.co_name != "_sliced_poll":
                f = f.f_back
            return f is not None

        def watch():
            end = time.monotonic() + 60
            while not blocked():
                if time.monotonic() > end:
                    print("never blocked", flush=True)
                    return
                time.sleep(0.01)
            print("ready", flush=True)

        with dc.Engine(pop, threads=2, capacity=8) as eng:
            try:
                threading.Thread(target=watch, daemon=True).start()
                {call}
            except KeyboardInterrupt:
                st = eng.stats()
                print("interrupted", st["bars_in"], flush=True)
                sys.exit(0)
            print("returned", flush=True)
            sys.exit(3)
    """)
    out = _interrupted_once_ready(p)
    if "submit" in call:  # the pieces taken before ^C stay taken: at most the window
        assert 0 < int(out.split()[1]) <= 8


@pytest.mark.parametrize("call", ["eng.submit(bars)"])
def test_ctrl_c_ends_a_wait_behind_another_threads_blocked_submit(call: str) -> None:
    # Another thread's block-policy submit fills the window and waits for room; the main thread's
    # submit waits for that batch to end, which nothing will do: ^C must end that wait too, with
    # nothing of the main thread's bars taken. (A step or run there fails at once instead:
    # test_runtime.py, test_a_*_behind_another_feeders_batch_waiting_for_room_fails_at_once.)
    # "ready" once the other submit blocks and the main thread has been inside its call for 0.5 s
    # (the native wait: before the fix it never returned, and the child was killed at the timeout)
    p = _child(f"""
        import sys, threading, time, dynamic_core as dc
        pop = dc.Population.random(256, instruments=["EURUSD"], timeframes=[3600], seed=1)
        bars = dc.sim.MarketSimulator(["EURUSD"], timeframe="H1", seed=1).bars(64)
        main = threading.main_thread().ident
        name = {call.split("(")[0].split(".")[1]!r}

        def feeder():
            try:
                eng.submit(bars)
            except RuntimeError:
                pass  # closed at the end

        def watch():
            end = time.monotonic() + 60
            while True:
                f = sys._current_frames().get(main)
                if f is not None and f.f_code.co_name == name and eng.stats()["backpressure"]["events"] >= 1:
                    break
                if time.monotonic() > end:
                    print("never blocked", flush=True)
                    return
                time.sleep(0.01)
            time.sleep(0.5)
            print("ready", flush=True)

        with dc.Engine(pop, threads=2, capacity=8) as eng:
            t = threading.Thread(target=feeder, daemon=True)
            t.start()
            while eng.stats()["backpressure"]["events"] < 1:
                time.sleep(0.01)
            try:
                threading.Thread(target=watch, daemon=True).start()
                {call}
            except KeyboardInterrupt:
                st = eng.stats()
                print("interrupted", st["bars_in"], st["backpressure"]["events"], flush=True)
                sys.exit(0)
            print("returned", flush=True)
            sys.exit(3)
    """)
    out = _interrupted_once_ready(p)
    taken, events = map(int, out.split()[1:3])
    assert 0 < taken <= 8  # the other thread's pieces only: the window; none of the main thread's
    assert events == 1  # the other submit's wait; the interrupted wait is not a counted reject


@pytest.mark.parametrize("call", ["run", "poll", "step"])
def test_ctrl_c_during_a_call_loses_no_signal(call: str) -> None:
    # ^C lands while the call waits for signals that a stalled SM holds back (0.4 s), and before
    # they are ready. A poll or step must end without taking any (they stay for the next poll);
    # a run must end with every signal it took on the exception (.signals, .taken). The native
    # waits did not look for ^C: the signals were drained once ready, then Python raised the
    # KeyboardInterrupt and dropped them, though counted (and journaled) as handed out.
    p = _child(f"""
        import os, signal, sys, threading, time, dynamic_core as dc
        pop = dc.Population.random(256, instruments=["EURUSD"], timeframes=[3600], seed=1)
        bars = dc.sim.MarketSimulator(["EURUSD"], timeframe="H1", seed=1).bars(64)
        call = {call!r}
        with dc.Engine(pop, threads=1, capacity=16, stall_deadline=60, fault_injection=True) as eng:
            eng.faults.stall_sm(0, 0.4, holding=True)
            if call == "poll":
                eng.submit(bars[:4])
            def kick():
                time.sleep(0.15)
                os.kill(os.getpid(), signal.SIGINT)
            threading.Thread(target=kick, daemon=True).start()
            got = 0
            try:
                if call == "run":
                    eng.run(bars)
                elif call == "poll":
                    eng.poll(timeout=None)
                else:
                    eng.step(bars[0], timeout=None)
                print("returned", flush=True)
                sys.exit(3)
            except KeyboardInterrupt as e:
                if call == "run":  # every signal it took is on the exception, none left behind
                    got = len(e.signals)
                    assert e.taken == got == eng.stats()["bars_in"] and eng.in_flight() == 0, (e.taken, got)
                    assert e.signals["seq"].tolist() == list(range(1, got + 1))
            # a poll or step took none: they all come to the next polls
            end = time.monotonic() + 10
            while eng.in_flight() and time.monotonic() < end:
                got += len(eng.poll(timeout=1.0))
            st = eng.stats()
            assert got == st["signals"] == st["bars_in"] > 0, (got, st["signals"], st["bars_in"])
            print("interrupted", got, flush=True)
    """)
    with p:
        try:
            out, err = p.communicate(timeout=60)
        finally:
            p.kill()
    assert p.returncode == 0 and out.startswith("interrupted"), (out, err)


def _child_ok(code: str, expect: str, timeout: float = 60) -> str:
    """Run ``code`` in a child; it must exit 0 within ``timeout`` with output starting ``expect``."""
    p = _child(code)
    with p:
        try:
            out, err = p.communicate(timeout=timeout)
        finally:
            p.kill()
    assert p.returncode == 0 and out.startswith(expect), (out, err)
    return out


@pytest.mark.parametrize("call", ["run", "poll", "step"])
def test_ctrl_c_as_the_native_call_returns_loses_no_signal(call: str) -> None:
    # ^C that lands while the native call hands its signals back (sent from a profile hook at the
    # native call's return: Python raises it at its next bytecode, in the wrapper). The wrapper
    # dropped the return value: a poll's and a step's signals were lost (counted and journaled as
    # handed out, never returned, none left in flight), a run's exception carried none of them.
    _child_ok(f"""
        import os, signal, sys, dynamic_core as dc
        pop = dc.Population.random(256, instruments=["EURUSD"], timeframes=[3600], seed=1)
        bars = dc.sim.MarketSimulator(["EURUSD"], timeframe="H1", seed=1).bars(40)
        call = {call!r}
        with dc.Engine(pop, threads=1) as eng:
            if call == "poll":
                eng.submit(bars)
                eng._native.wait_idle()
            armed = [True]
            def prof(frame, event, arg):
                if event == "c_return" and armed[0] and getattr(arg, "__name__", "") == call:
                    armed[0] = False
                    os.kill(os.getpid(), signal.SIGINT)
            sys.setprofile(prof)
            try:
                got = eng.run(bars) if call == "run" else eng.poll() if call == "poll" else eng.step(bars[0])
                sys.setprofile(None)
                print("returned", got, flush=True)
                sys.exit(3)
            except KeyboardInterrupt as e:
                sys.setprofile(None)
                if call == "run":  # the whole batch was taken: every signal is on the exception
                    assert e.taken == len(bars) and len(e.signals) == len(bars), (e.taken, len(e.signals))
                    got = e.signals
                else:  # held for the next poll, and counted as in flight till then
                    n = len(bars) if call == "poll" else 1
                    assert eng.in_flight() == n, eng.in_flight()
                    try:
                        eng.step(bars[-1])
                        sys.exit(4)
                    except RuntimeError as r:
                        assert "not polled yet" in str(r), r
                    got = eng.poll()
                    assert eng.in_flight() == 0 and len(eng.poll()) == 0
            st = eng.stats()
            assert len(got) == st["signals"] == st["bars_in"] > 0, (len(got), st["signals"], st["bars_in"])
            assert got["seq"].tolist() == list(range(1, len(got) + 1))
            print("interrupted", len(got), flush=True)
    """, "interrupted")


def test_ctrl_c_on_a_live_feed_loses_no_signal_of_a_poll() -> None:
    # SIGINT at random times while the main thread polls a live feed; a handler raises
    # KeyboardInterrupt only where it lands inside the engine's calls (elsewhere it would be this
    # loop's own loss). Every signal handed out must reach the loop: a poll that had drained
    # signals natively when the interrupt was raised lost them.
    _child_ok("""
        import os, random, signal, threading, time, dynamic_core as dc
        pop = dc.Population.random(500, instruments=["EURUSD", "GBPUSD"], timeframes=[3600], seed=1)
        bars = dc.sim.MarketSimulator(["EURUSD", "GBPUSD"], 3600, seed=1).bars(600)
        def handler(signum, frame):
            if os.path.basename(frame.f_code.co_filename) == "engine.py":
                raise KeyboardInterrupt
        signal.signal(signal.SIGINT, handler)
        rng = random.Random(0)
        got = interrupts = 0
        with dc.Engine(pop, threads=1) as eng:
            done = threading.Event()
            def feeder():
                for i in range(len(bars)):
                    eng.submit(bars[i:i + 1])
                    time.sleep(0.0005)
                done.set()
            def kicker():
                while not done.is_set():
                    time.sleep(rng.uniform(0.002, 0.01))
                    os.kill(os.getpid(), signal.SIGINT)
            threading.Thread(target=feeder, daemon=True).start()
            threading.Thread(target=kicker, daemon=True).start()
            while not done.is_set() or eng.in_flight():
                try:
                    got += len(eng.poll(timeout=0.5))
                except KeyboardInterrupt:
                    interrupts += 1
            st = eng.stats()
        assert interrupts > 20, interrupts
        assert got == st["signals"] == len(bars), (got, st["signals"])
        print("interrupted", interrupts, got, flush=True)
    """, "interrupted")


@pytest.mark.parametrize("call", ["poll", "run"])
def test_a_signal_handler_may_close_the_engine_while_a_call_waits(call: str) -> None:
    # A handler that closes the engine (a SIGTERM shutdown) runs while poll or run waits for
    # signals: the native waits ran handlers holding the engine's egress (or ingress) lock, which
    # close takes too, and the process hung.
    _child_ok(f"""
        import os, signal, tempfile, threading, time, dynamic_core as dc
        d = tempfile.mkdtemp()
        pop = dc.Population.random(200, instruments=["EURUSD"], timeframes=[3600], seed=1)
        bars = dc.sim.MarketSimulator(["EURUSD"], timeframe="H1", seed=1).bars(64)
        eng = dc.Engine(pop, threads=1, journal=os.path.join(d, "j"), fault_injection=True, stall_deadline=60)
        signal.signal(signal.SIGUSR1, lambda *a: eng.close())
        threading.Thread(target=lambda: (time.sleep(0.3), os.kill(os.getpid(), signal.SIGUSR1)), daemon=True).start()
        try:
            if {call!r} == "poll":
                eng.poll(timeout=None)  # nothing submitted: waits
            else:
                eng.faults.stall_sm(0, 1.0, holding=True)
                eng.run(bars)
            print("returned", flush=True)
        except RuntimeError as e:
            assert "closed" in str(e), e
            print("interrupted: closed", flush=True)
    """, "interrupted", timeout=30)


def test_ctrl_c_anywhere_in_run_leaves_the_engine_usable_by_other_threads() -> None:
    # ^C at each point of the bookkeeping around a run (entering, leaving) where Python raises a
    # pending signal: as each call made there returns (a profile hook sends it). The engine's own
    # lock or its record of the running thread stayed behind when ^C landed between taking it and
    # the try that gives it back, and every later run from another thread waited forever (a poll
    # from another thread raised 'poll() while run() runs').
    _child_ok("""
        import os, signal, sys, threading, dynamic_core as dc
        pop = dc.Population.random(200, instruments=["EURUSD"], timeframes=[3600], seed=1)
        bars = dc.sim.MarketSimulator(["EURUSD"], timeframe="H1", seed=1).bars(400)
        eng = dc.Engine(pop, threads=1)
        cases = 0
        for fn in ("_egress_enter", "_egress_exit"):
            k = 0
            while True:  # ^C as the k-th call made in fn returns, until fn makes no more
                seen, fired = [0], [False]
                def prof(frame, ev, arg):
                    at = frame if ev == "c_return" else frame.f_back
                    caller = at.f_code.co_name if at is not None else ""
                    if ev in ("c_return", "return") and caller == fn and not fired[0]:
                        if seen[0] == k:
                            fired[0] = True
                            os.kill(os.getpid(), signal.SIGINT)
                        seen[0] += 1
                sys.setprofile(prof)
                try:
                    eng.run(bars[:1])
                except KeyboardInterrupt:
                    pass
                sys.setprofile(None)
                if not fired[0]:
                    break
                cases += 1
                eng.poll()  # what a run interrupted after taking its bar may have left
                out = []
                def other():
                    try:
                        out.append(len(eng.run(bars[1:2])))
                        out.append(len(eng.poll(timeout=0)))
                    except Exception as e:
                        out.append(repr(e))
                t = threading.Thread(target=other, daemon=True)
                t.start()
                t.join(5)
                assert not t.is_alive() and out == [1, 0], (fn, k, out)
                k += 1
                bars = bars[2:]
        assert cases >= 6, cases
        print("interrupted", cases, flush=True)
    """, "interrupted")


def test_on_signal_and_a_poll_starting_together_never_both_consume() -> None:
    # A poll paused where it registers (a trace hook holds it there) while another thread starts
    # an on_signal dispatcher: the poll looked for a dispatcher before it registered, so neither
    # saw the other and both took signals (the callbacks missed 54 of 200).
    import linecache

    eng = dc.Engine(dc.Population.random(300, instruments=["EURUSD"], timeframes=[3600], seed=1), threads=1)
    bars = dc.sim.MarketSimulator(["EURUSD"], timeframe="H1", seed=1).bars(200)
    at_gap, go = threading.Event(), threading.Event()

    def tracer(frame: Any, ev: str, arg: object) -> Any:
        code = frame.f_code
        if code.co_name != "poll" or not code.co_filename.endswith("engine.py"):
            return None

        def local(frame: Any, ev: str, arg: object) -> Any:
            line = linecache.getline(code.co_filename, frame.f_lineno)
            if ev == "line" and "with self._egress_guard" in line and not at_gap.is_set():
                at_gap.set()
                go.wait(5)
            return local
        return local

    polled: list = []

    def poller() -> None:
        sys.settrace(tracer)
        try:
            polled.append(len(eng.poll(timeout=2.0)))
        except RuntimeError as e:
            polled.append(str(e))
        finally:
            sys.settrace(None)

    th = threading.Thread(target=poller)
    th.start()
    try:
        assert at_gap.wait(5)
        got: list = []
        try:
            eng.on_signal(got.append)
            started = True
        except RuntimeError:
            started = False
        go.set()
        th.join(10)
        if started:
            eng.submit(bars)
            end = time.monotonic() + 10
            while len(got) < len(bars) and time.monotonic() < end:
                time.sleep(0.01)
            assert isinstance(polled[0], str) and "on_signal" in polled[0], polled
            assert len(got) == len(bars) == eng.stats()["signals"], (len(got), polled)
        else:
            assert polled == [0], polled
    finally:
        go.set()
        eng.close()


def test_an_engine_with_a_callback_is_collected_and_its_threads_end() -> None:
    bars = dc.sim.MarketSimulator(["EURUSD"], timeframe="H1", seed=1).bars(50)
    before = _os_threads()
    refs = []
    for k in range(5):
        eng = dc.Engine(dc.Population.random(500, instruments=["EURUSD"], timeframes=[3600], seed=k), threads=2)
        got: list = []
        eng.on_signal(got.append)
        eng.submit(bars)
        refs.append(weakref.ref(eng))
        del eng
    gc.collect()
    deadline = time.monotonic() + 10
    while (any(r() is not None for r in refs) or _os_threads() > before) and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.05)
    assert all(r() is None for r in refs)  # the dispatcher kept every one alive, with its threads
    assert _os_threads() <= before


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_an_engine_inherited_by_a_forked_child_refuses_and_does_not_crash() -> None:
    bars = dc.sim.MarketSimulator(["EURUSD"], timeframe="H1", seed=1).bars(50)
    eng = dc.Engine(dc.Population.random(500, instruments=["EURUSD"], timeframes=[3600], seed=1), threads=2)
    eng.run(bars[:20])
    eng.submit(bars[20:40])  # maybe still in flight at the fork
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no worker threads exist here
        code = 1
        try:
            signal.alarm(30)  # a call that waits on the parent's workers would wait forever
            try:
                eng.run(bars[40:])
            except RuntimeError as e:
                code = 0 if "another process" in str(e) else 2
            # every other use raises too (agents() waited forever for bars in flight at the fork)
            for use in (eng.agents, eng.stats, eng.in_flight, eng.dead_letters, lambda: eng.validate(bars)):
                try:
                    use()
                    code = 3
                except RuntimeError as e:
                    code = code if "another process" in str(e) else 4
            eng.close()  # nothing to join here: a no-op, not a crash
            del eng
            gc.collect()
            os.write(w, b"ok")
        finally:
            os._exit(code)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    msg = os.read(r, 16)
    os.close(r)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and msg == b"ok", status
    got = eng.poll(20, timeout=30.0)  # the parent's engine is untouched
    while len(got) < 20:
        got = np.concatenate([got, eng.poll(timeout=30.0)])
    assert len(eng.run(bars[40:])) == 10 and eng.stats()["signals"] == 50
    eng.close()
    assert threading.active_count() >= 1


def test_exiting_with_a_daemon_thread_blocked_in_submit_does_not_abort() -> None:
    # The engine's close() at exit wakes a daemon thread's blocked submit with "engine is closed";
    # when the interpreter began to finalize while that thread waited for the GIL, CPython ended
    # it there with a forced unwind on top of the propagating exception: "terminate called
    # without an active exception", SIGABRT (about 1 exit in 8 on a busy 2-core machine). A race:
    # the exit is tried 12 times
    code = """
        import sys, threading, time, dynamic_core as dc
        pop = dc.Population.random(256, instruments=["EURUSD"], timeframes=[3600], seed=1)
        bars = dc.sim.MarketSimulator(["EURUSD"], timeframe="H1", seed=1).bars(64)

        def feeder():
            try:
                eng.submit(bars)
            except RuntimeError:
                pass

        with dc.Engine(pop, threads=2, capacity=8) as eng:
            threading.Thread(target=feeder, daemon=True).start()
            while eng.stats()["backpressure"]["events"] < 1:
                time.sleep(0.001)
            sys.exit(0)
    """
    for _ in range(12):
        p = _child(code)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, (p.returncode, err)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_forked_child_that_exits_normally_does_not_crash() -> None:
    # the interpreter's exit in the child used to run the engine's destructor: SIGSEGV
    p = _child("""
        import gc, os, sys, dynamic_core as dc
        bars = dc.sim.MarketSimulator(["EURUSD"], timeframe="H1", seed=1).bars(20)
        eng = dc.Engine(dc.Population.random(500, instruments=["EURUSD"], timeframes=[3600], seed=1), threads=2)
        eng.run(bars)
        pid = os.fork()
        if pid == 0:
            del eng
            gc.collect()
            sys.exit(0)
        _, status = os.waitpid(pid, 0)
        print(status, flush=True)
        eng.close()
    """)
    with p:
        out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and out.strip() == "0", (out, err)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_forked_child_does_not_keep_the_journal_locked(tmp_path: Path) -> None:
    # The writer flock()s the journal directory while it has it open; a child made by fork()
    # shares that lock through its copy of the descriptor. It used to keep the journal "open for
    # writing" (repair refused, dc.journal.locked true) after the parent closed it, for as long
    # as the child lived.
    import fcntl

    d = tmp_path / "j"
    bars = dc.sim.MarketSimulator(["EURUSD"], timeframe="H1", seed=1).bars(30)
    eng = dc.Engine(dc.Population.random(100, instruments=["EURUSD"], timeframes=[3600], seed=1), threads=1,
                    journal=d)
    eng.run(bars)
    r, w = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child (its fork hooks have run once fork() returns) lives until the parent has looked
        try:
            os.close(w)
            os.write(ready_w, b"r")
            os.read(r, 1)
        finally:
            os._exit(0)
    os.close(r)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"r"  # not before the child runs: it holds the lock until its hook
        os.close(ready_r)
        fd = os.open(d, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):  # the parent's writer holds it
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            eng.close()
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free once the parent closed, child alive
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
    finally:
        os.write(w, b"x")
        os.close(w)
        os.waitpid(pid, 0)
    assert dc.journal.verify(d).ok
