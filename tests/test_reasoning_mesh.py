"""The reasoning mesh end to end: a broker thread, adapter processes, real HTTP to a local
OpenAI-compatible server process (tests/openai_server.py), real ZeroMQ.

Every wait is bounded; outcomes are collected through ``on_rationale`` and awaited with a
deadline. Timings are asserted only as upper bounds that the mechanism (not the machine's speed)
guarantees: e.g. a fallback must land before the task's deadline.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import dynamic_core as dc
import numpy as np
import pytest
from dynamic_core import payloads as P
from dynamic_core import transport as T
from dynamic_core.reasoning import ReasoningMesh
from dynamic_core.reasoning.ensemble import ABSplit
from dynamic_core.reasoning.mesh import Outcome

from .openai_server import FakeOpenAI

PKG_ROOT = str(Path(dc.__file__).resolve().parent.parent)
TIMEOUT = 20.0
KEY = "sk-test-7f3a9c2e51d84b06a1c3e5f7"
KEY_ENV = "DC_TEST_DEEPSEEK_KEY"


@pytest.fixture(scope="module")
def fake():
    with FakeOpenAI(expect_key=KEY) as f:
        yield f


@pytest.fixture(autouse=True)
def _key_env(monkeypatch, fake):
    monkeypatch.setenv(KEY_ENV, KEY)  # spawned adapters inherit it
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (PKG_ROOT, os.environ.get("PYTHONPATH")) if p))
    fake.reset()


def ctx(i: int = 1, action: int = 1, agreement: float = 0.8, confidence: float = 0.7,
        instrument: str = "EURUSD", **kw) -> P.ReasoningContext:
    return P.ReasoningContext(signal_id=f"{0xAB:016x}:{i}", instrument=instrument, timeframe=3600, seq=i,
                              action=action, score=0.3 * action, confidence=confidence, agreement=agreement,
                              dispersion=0.1, n_agents=1000, features={"atr_pct": 0.3, "ret_20": 1.5 + 0.01 * i},
                              **kw)  # distinct features: distinct cache keys


def provider(fake: FakeOpenAI, name: str, **over) -> dict:
    # latency class "fast": adaptive throttling would drop a "standard" provider (prior 4 s) for
    # the short deadlines used here before it has latency samples of its own
    d = {"base_url": fake.url, "api_key_env": KEY_ENV, "timeout_s": 10.0, "max_concurrency": 2,
         "latency_class": "fast"}
    d.update(over)
    return {name: d}


def deepseek(fake: FakeOpenAI, **over) -> dict:
    return provider(fake, "deepseek", **over)


def policy(*cands: str, **limits) -> dict:
    return {"rules": [{"request_class": "*", "candidates": list(cands)}],
            "limits": {k: v for k, v in limits.items()}}


class Collect:
    """``on_rationale`` sink with bounded waits."""

    def __init__(self) -> None:
        self.items: list[Outcome] = []
        self.cv = threading.Condition()

    def __call__(self, o: Outcome) -> None:
        with self.cv:
            assert all(x.task_id != o.task_id for x in self.items), f"task {o.task_id} finished twice"
            self.items.append(o)
            self.cv.notify_all()

    def wait(self, n: int, timeout: float = TIMEOUT) -> list[Outcome]:
        end = time.monotonic() + timeout
        with self.cv:
            while len(self.items) < n:
                left = end - time.monotonic()
                assert left > 0, f"only {len(self.items)} of {n} rationales after {timeout}s"
                self.cv.wait(left)
            return list(self.items)


def mesh(fake: FakeOpenAI, providers=("deepseek",), *, pol=None, prof=None, **kw) -> tuple[ReasoningMesh, Collect]:
    out = Collect()
    # a loaded machine can leave an adapter unscheduled for a second or more: the tests judge
    # liveness over 5 s (the tests of losses set their own, or kill the process: lost on exit)
    kw.setdefault("liveness", 50)
    m = ReasoningMesh(list(providers), policy=pol or policy("deepseek", "local"),
                      profiles=prof or deepseek(fake), on_rationale=out, **kw)
    m.start(wait=TIMEOUT)
    assert m.wait_ready(timeout=TIMEOUT), m.stats()
    return m, out


def wait_until(pred, timeout: float = TIMEOUT) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.01)


# ---- the happy path and the cache ----------------------------------------------------------

def test_rationale_from_a_provider_over_real_http_then_from_the_cache(fake) -> None:
    m, out = mesh(fake)
    with m:
        tid = m.submit(ctx(1, action=2))
        assert tid > 0
        o = out.wait(1)[0]
        assert (o.status, o.provider, o.task_id) == ("ok", "deepseek", tid)
        assert o.update.signal_id == f"{0xAB:016x}:1" and o.update.text
        assert o.agreeing == 1  # the fake answers "buy" for a BUY prompt
        assert fake.stats()["authorized"] == 1
        # the same context again: answered from the narrative cache, no HTTP request
        m.submit(ctx(1, action=2))
        o2 = out.wait(2)[1]
        assert (o2.status, o2.provider, o2.update.text) == ("cached", "deepseek", o.update.text)
        assert fake.stats()["requests"] == 1
        st = m.stats()
        assert st["cache"]["hits"] == 1 and st["providers"]["deepseek"]["cache_hits"] == 1
        row = st["providers"]["deepseek"]
        assert row["requests"] == 1 and row["tokens_in"] > 0 and row["tokens_out"] > 0 and row["usd"] > 0
        assert row["p50_ms"] is not None and row["breaker"] == "closed"
        assert m.take_rationales() == [o.update, o2.update]


def test_local_narrator_is_the_last_fallback_even_without_adapters(fake) -> None:
    out = Collect()
    with ReasoningMesh([], policy=policy("deepseek", "local"), profiles=deepseek(fake), on_rationale=out) as m:
        m.submit(ctx(2, action=-1))  # no deepseek adapter registered: straight to the narrator
        o = out.wait(1)[0]
        assert (o.status, o.provider) == ("local", "local")
        assert "SELL" in o.update.text.upper()
    assert fake.stats()["requests"] == 0


# ---- failures ---------------------------------------------------------------------------------

def test_fallback_within_the_deadline_when_the_adapter_process_is_killed_mid_request(fake, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="dynamic_core.reasoning.mesh")
    fake.script([], default={"mode": "hang", "delay": 60})
    # a deadline far beyond what the loss takes, even on a loaded machine: a quick fallback comes
    # through the adapter's loss, never the deadline
    m, out = mesh(fake, deadline_s=20.0)
    with m:
        t0 = time.monotonic()
        m.submit(ctx(3))
        wait_until(lambda: fake.stats()["requests"] >= 1)  # this test's request is at the server (it hangs)
        pid = m.adapters("deepseek")[0]["pid"]
        os.kill(pid, signal.SIGKILL)
        o = out.wait(1)[0]
        took = time.monotonic() - t0
        assert (o.status, o.provider) == ("fallback", "local")
        assert took < 10.0, took  # long before the 20 s deadline
        st = m.stats()
        # through the loss of the adapter (its process exited; liveness here is 5 s), not the deadline path
        assert st["tasks"]["adapter_lost"] >= 1 and st["providers"]["deepseek"]["errors"].get("adapter_lost") == 1
        assert "its process exited with -9" in caplog.text
        # the mesh restarts the dead adapter
        wait_until(lambda: any(a["pid"] != pid for a in m.adapters("deepseek")))


def _bad_secrets(tmp_path: Path) -> Path:
    """A secrets file adapters must refuse to read (mode 0644)."""
    f = tmp_path / "secrets.toml"
    f.write_text('DC_TEST_NO_SUCH_KEY = "sk-never-read"\n')
    f.chmod(0o644)
    return f


def test_an_adapter_without_its_key_refuses_requests_at_once_with_auth(fake) -> None:
    """A provider that takes an API key, started without one: its requests fail with 'auth'
    inside the adapter, never sent without credentials, and fall back to the narrator. A server
    on this machine (a local OpenAI-compatible one under a built-in name) is asked anyway."""
    out = Collect()
    remote = deepseek(fake, api_key_env="DC_TEST_NO_SUCH_KEY", base_url="https://provider.invalid/v1")
    with ReasoningMesh(["deepseek"], policy=policy("deepseek", "local"), on_rationale=out, profiles=remote,
                       liveness=50) as m:  # (as mesh() does: not lost while a loaded machine stalls it)
        m.start(wait=TIMEOUT)
        assert m.wait_ready(timeout=TIMEOUT)
        m.submit(ctx(710))
        assert out.wait(1)[0].provider == "local"
        errors = m.stats()["providers"]["deepseek"]["errors"]
        assert set(errors) == {"auth"} and errors["auth"] >= 1
    assert fake.stats()["requests"] == 0
    out = Collect()
    local = deepseek(fake, api_key_env="DC_TEST_NO_SUCH_KEY")  # the fake server, on loopback
    with ReasoningMesh(["deepseek"], policy=policy("deepseek", "local"), on_rationale=out, profiles=local,
                       liveness=50) as m:
        m.start(wait=TIMEOUT)
        assert m.wait_ready(timeout=TIMEOUT)
        m.submit(ctx(711))
        out.wait(1)
    assert fake.stats()["requests"] >= 1


def test_an_adapter_that_exits_with_a_configuration_error_is_not_restarted(fake, tmp_path) -> None:
    # exit status 2 (here: a secrets file readable by others) fails the same way on every restart
    out = Collect()
    m = ReasoningMesh(["deepseek"], policy=policy("deepseek", "local"), on_rationale=out,
                      profiles=deepseek(fake, api_key_env="DC_TEST_NO_SUCH_KEY"), secrets_file=_bad_secrets(tmp_path))
    with m:
        m.start(wait=TIMEOUT)  # returns once the only provider is down, not after the full wait
        assert not m.wait_ready(timeout=TIMEOUT)
        assert "configuration error" in m.down["deepseek"]
        time.sleep(1.5)  # a restart would have come after 1 s
        st = m.stats()
        assert st["tasks"]["adapter_config_errors"] == 1 and st["tasks"]["respawned"] == 0
        assert "configuration error" in st["providers"]["deepseek"]["down"]
        m.submit(ctx(700))
        o = out.wait(1)[0]
        assert o.provider == "local"  # the provider is down: its requests fall back
    assert fake.stats()["requests"] == 0


# serve() as 'dynamic-core adapter' runs it, with a heartbeat the command line refuses (at least
# 0.01 s there): a microsecond fills the send queue in seconds
_SERVE_TINY_HEARTBEAT = """\
import logging, sys
from dynamic_core.reasoning.worker import serve
logging.basicConfig(level=logging.INFO, format="adapter %(levelname)s %(message)s", stream=sys.stderr)
sys.exit(serve("local", sys.argv[1], heartbeat_s=1e-6))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_an_adapter_without_a_broker_drops_stale_heartbeats_and_still_stops_on_a_signal(sig) -> None:
    # no broker: every heartbeat queues until the send queue (100k) is full; a blocking send then
    # never returned, and a signal (whose handler only sets a flag) could not end the process
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    lines: list[str] = []
    with subprocess.Popen([sys.executable, "-c", _SERVE_TINY_HEARTBEAT, f"tcp://127.0.0.1:{port}"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
        reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
        reader.start()
        try:
            wait_until(lambda: any("send queue full" in line for line in lines), timeout=60)
            proc.send_signal(sig)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            reader.join(10)
    stop = [line for line in lines if "messages the broker never took" in line]
    assert len(stop) == 1 and "beats" in stop[0] and "Traceback" not in "".join(lines)
    # and it said there was no broker, once (not in silence, not at every retry)
    assert sum(f"no broker at tcp://127.0.0.1:{port}" in line for line in lines) == 1


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "1e-300", "0.009", "61"])
def test_adapter_heartbeat_must_be_a_positive_finite_number(value: str) -> None:
    # and within what a mesh takes for its own, [0.01, 60]: shorter only spins the adapter's loop
    from dynamic_core import cli_reasoning
    from dynamic_core.reasoning import worker

    assert (cli_reasoning._HEARTBEAT_MIN_S, cli_reasoning._HEARTBEAT_MAX_S) == (worker.HEARTBEAT_MIN_S,
                                                                                worker.HEARTBEAT_MAX_S)
    r = subprocess.run([sys.executable, "-m", "dynamic_core", "adapter", "--provider", "local", "--connect",
                        "tcp://127.0.0.1:1", "--heartbeat", value], capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 2 and "argument --heartbeat:" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("step,kind", [
    ({"mode": "status", "status": 500, "times": 10}, "server_error"),
    ({"mode": "malformed", "times": 10}, "malformed"),
    ({"mode": "drop", "times": 10}, "connection"),
])
def test_retries_within_the_provider_then_falls_back(fake, step, kind) -> None:
    fake.script([step])
    pol = policy("deepseek", "local")
    pol["cooldown_failures"] = 10  # (the default, 3 in a row, would cool it down before the last retry)
    m, out = mesh(fake, pol=pol, deadline_s=10.0, backoff_s=0.01)  # (room for 4 attempts on a loaded machine)
    with m:
        m.submit(ctx(4))
        o = out.wait(1)[0]
        assert (o.status, o.provider) == ("fallback", "local")
        assert fake.stats()["requests"] == 4  # 1 + max_retries
        assert m.stats()["providers"]["deepseek"]["errors"] == {kind: 4}


def test_rate_limited_waits_for_retry_after_then_succeeds(fake) -> None:
    fake.script([{"mode": "status", "status": 429, "retry_after": 1}])
    m, out = mesh(fake, deadline_s=10.0)  # (room for a loaded CI machine after the 1 s wait)
    with m:
        t0 = time.monotonic()
        m.submit(ctx(5))
        o = out.wait(1)[0]
        assert (o.status, o.provider) == ("ok", "deepseek")
        assert time.monotonic() - t0 >= 0.9  # honoured Retry-After: 1
        assert m.stats()["providers"]["deepseek"]["errors"] == {"rate_limited": 1}


def test_slow_provider_times_out_and_the_narrator_answers_before_the_deadline(fake) -> None:
    fake.script([], default={"mode": "slow", "delay": 20.0})
    m, out = mesh(fake, deadline_s=2.0)
    with m:
        t0 = time.monotonic()
        m.submit(ctx(6))
        o = out.wait(1)[0]
        assert (o.status, o.provider) == ("fallback", "local")
        assert time.monotonic() - t0 < 2.0 + 5.0  # the deadline, not the 20 s reply (slack for a loaded machine)


def test_breaker_opens_then_half_open_probe_closes_it(fake) -> None:
    fake.script([{"mode": "status", "status": 500, "times": 4}])
    pol = policy("deepseek", "local")
    # open_s: long enough that a loaded machine stalling this test still finds it open below
    pol["breaker"] = {"failure_pct": 50.0, "min_requests": 4, "window_s": 60.0, "open_s": 5.0}
    pol["cooldown_failures"] = 100
    m, out = mesh(fake, pol=pol, max_retries=0, deadline_s=3.0)
    with m:
        for i in range(4):
            before = time.monotonic()  # (the last one: before the breaker opened)
            m.submit(ctx(100 + i))
            out.wait(i + 1)
        assert m.stats()["providers"]["deepseek"]["breaker"] == "open"
        m.submit(ctx(110))  # open: not even tried
        assert out.wait(5)[4].status == "local" and fake.stats()["requests"] == 4
        # open_s passes: half-open (not before); one probe is let through, succeeds, closes the breaker
        wait_until(lambda: m.stats()["providers"]["deepseek"]["breaker"] == "half_open")
        assert time.monotonic() - before >= 5.0  # not before open_s
        m.submit(ctx(111))
        assert out.wait(6)[5].provider == "deepseek"
        assert m.stats()["providers"]["deepseek"]["breaker"] == "closed"


def test_a_timed_out_attempt_is_recorded_once_and_keeps_its_slot_until_the_late_reply(fake) -> None:
    fake.script([{"mode": "slow", "delay": 1.2}])
    pol = policy("deepseek", "local")
    m, out = mesh(fake, pol=pol, prof=deepseek(fake, timeout_s=0.5), max_retries=0, deadline_s=5.0)
    with m:
        m.submit(ctx(7))
        o = out.wait(1)[0]
        assert (o.status, o.provider) == ("fallback", "local")
        # the adapter's own timeout reply arrives after the broker's attempt timer fired
        wait_until(lambda: m.stats()["tasks"]["late_replies"] == 1)
        row = m.stats()["providers"]["deepseek"]
        assert row["errors"] == {"timeout": 1} and row["ok"] == 0  # one outcome for one attempt
        assert m.adapters("deepseek")[0]["in_flight"] == 0  # its slot came back with the reply
    assert len(out.items) == 1


def test_half_open_breaker_lets_only_its_probe_through_a_burst(fake) -> None:
    # the probe takes 3 s at the server: the burst is decided while it is in flight
    fake.script([{"mode": "status", "status": 500, "times": 2}], default={"mode": "slow", "delay": 3.0})
    pol = policy("deepseek", "local")
    # open_s: long enough that a loaded machine stalling this test still finds it open below
    pol["breaker"] = {"failure_pct": 50.0, "min_requests": 2, "window_s": 60.0, "open_s": 5.0,
                      "half_open_probes": 1}
    pol["cooldown_failures"] = 100
    m, out = mesh(fake, pol=pol, max_retries=0, deadline_s=10.0)
    with m:
        for i in range(2):
            m.submit(ctx(120 + i))
            out.wait(i + 1)
        assert m.stats()["providers"]["deepseek"]["breaker"] == "open"
        wait_until(lambda: m.stats()["providers"]["deepseek"]["breaker"] == "half_open")
        # a burst while half-open (one batch): one probe, the rest to the narrator at once
        m.submit_many([ctx(130 + i) for i in range(5)])
        assert [o.provider for o in out.wait(6)[2:]] == ["local"] * 4
        assert m.stats()["providers"]["deepseek"]["breaker"] == "half_open"  # the probe is still out
        outs = out.wait(7)[2:]
        assert sorted(o.provider for o in outs) == ["deepseek"] + ["local"] * 4
        assert fake.stats()["requests"] == 3
        assert m.stats()["providers"]["deepseek"]["breaker"] == "closed"


# ---- budgets, quotas, priorities ----------------------------------------------------------------

def test_daily_token_budget_is_enforced(fake) -> None:
    fake.script([], default={"mode": "normal", "prompt_tokens": 300, "completion_tokens": 100})
    m, out = mesh(fake, pol=policy("deepseek", "local", deepseek={"daily_tokens": 800}), max_tokens=64)
    with m:
        providers = []
        for i in range(3):
            m.submit(ctx(200 + i))
            providers.append(out.wait(i + 1)[i].provider)
        assert providers == ["deepseek", "deepseek", "local"]  # 400 + 400 spent; a third would exceed
        assert m.stats()["providers"]["deepseek"]["budget_left"]["tokens"] == 0
        assert fake.stats()["requests"] == 2


def test_rpm_quota_is_enforced(fake) -> None:
    m, out = mesh(fake, pol=policy("deepseek", "local", deepseek={"rpm": 2}))
    with m:
        for i in range(3):
            m.submit(ctx(300 + i))
            out.wait(i + 1)
        assert [o.provider for o in out.items] == ["deepseek", "deepseek", "local"]
        assert fake.stats()["requests"] == 2


@pytest.mark.parametrize("limit", [{"daily_tokens": 500}, {"rpm": 2}])
def test_a_burst_of_queued_tasks_never_passes_the_budget_or_quota(fake, limit) -> None:
    """Tasks are routed when queued; a burst routed on the same unspent budget is checked again
    as each attempt is sent, with the attempts in flight holding their possible spend."""
    fake.script([], default={"mode": "slow", "delay": 0.3, "prompt_tokens": 120, "completion_tokens": 40})
    m, out = mesh(fake, pol=policy("deepseek", "local", deepseek=limit), prof=deepseek(fake, max_concurrency=8),
                  max_tokens=64)
    with m:
        m.submit_many([ctx(900 + i) for i in range(8)])
        items = out.wait(8)
        st = m.stats()["providers"]["deepseek"]
    sent = fake.stats()["requests"]
    assert 1 <= sent < 8 and {o.provider for o in items} == {"deepseek", "local"}
    assert sum(o.provider == "deepseek" for o in items) == sent
    if "daily_tokens" in limit:
        assert st["tokens_in"] + st["tokens_out"] <= 500 and st["skipped"]["budget"] > 0
    else:
        assert sent <= 2 and st["skipped"]["rpm"] > 0


def test_priorities_are_respected_under_load(fake) -> None:
    # the first request holds the only slot for 5 s: every later task is queued behind it, even
    # when a loaded machine stalls this thread between the submits
    fake.script([{"mode": "slow", "delay": 5.0}], default={"mode": "normal"})
    m, out = mesh(fake, prof=deepseek(fake, max_concurrency=1), deadline_s=30.0)
    with m:
        m.submit(ctx(400), priority="low")  # takes the only slot
        wait_until(lambda: fake.stats()["requests"] >= 1)  # this test's request is at the server
        low = [m.submit(ctx(401 + i), priority="low") for i in range(5)]
        crit = [m.submit(ctx(420 + i), priority="critical") for i in range(3)]
        done = [o.task_id for o in out.wait(9)][1:]
        assert set(done[:3]) == set(crit), done  # every critical before any queued low
        assert done[3:] == low
        assert all(o.provider == "deepseek" for o in out.items)


def test_full_queue_sheds_the_lowest_priority_first(fake) -> None:
    fake.script([], default={"mode": "hang", "delay": 60})
    m, out = mesh(fake, prof=deepseek(fake, max_concurrency=1), queue_size=3, deadline_s=30.0)
    with m:
        first = m.submit(ctx(500), priority="high")
        # this test's own request at the server (not one left over from an earlier test)
        wait_until(lambda: fake.stats()["requests"] >= 1 and fake.stats()["in_flight"] >= 1)
        lows = [m.submit(ctx(501 + i), priority="low") for i in range(3)]  # fills the queue
        high = m.submit(ctx(510), priority="high")  # sheds the newest low
        o = out.wait(1)[0]
        # the newest low: shed by the high task when the four submits reached the broker in one
        # batch; when the broker woke in between, the queue's pressure (updated per batch) had
        # already dropped the remote provider from its route and the last resort narrated it at
        # once. Either way the newest low, never an older one or the high task.
        assert o.task_id == lows[-1] and (o.status, o.provider) in (("shed", "local"), ("local", "local")), \
            (o, first)
        newest = m.submit(ctx(511), priority="low")  # nothing lower queued: the newcomer never waits
        wait_until(lambda: any(x.task_id == newest for x in out.items))
        o2 = next(x for x in out.items if x.task_id == newest)
        # shed by the full queue, or -- when the queue's pressure had already dropped the remote
        # provider from its route -- narrated at once; either way by the last resort, never queued
        assert (o2.status, o2.provider) in (("shed", "local"), ("local", "local")), o2
        done = {x.task_id: x for x in out.items}
        # the older lows wait behind the hanging request; the high task is never shed (under queue
        # pressure the router may have sent it to the last resort at once instead of queueing it)
        assert lows[0] not in done and lows[1] not in done, done
        assert high not in done or (done[high].status, done[high].provider) == ("local", "local"), done
        q = m.stats()["queue"]
        assert q["shed"]["low"] == (o.status == "shed") + (o2.status == "shed")
        assert q["shed"].get("high", 0) == 0 and q["shed"].get("critical", 0) == 0


# ---- secrets ------------------------------------------------------------------------------------

def test_secrets_never_reach_logs_errors_or_telemetry(fake, caplog) -> None:
    # the server echoes the key it was sent in its error body; everything downstream must redact it
    wrong = "sk-wrong-but-secret-0123456789abcdef"
    fake.script([{"mode": "status", "status": 401, "message": f"bad key {wrong} and {KEY}", "times": 5}])
    caplog.set_level(logging.DEBUG, logger="dynamic_core")
    out = Collect()
    with ReasoningMesh([], policy=policy("deepseek", "local"), on_rationale=out,
                       profiles=deepseek(fake), liveness=50) as m:
        env = dict(os.environ, **{KEY_ENV: wrong})
        proc = subprocess.Popen([sys.executable, "-m", "dynamic_core", "adapter", "--provider", "deepseek",
                                 "--connect", m.address, "--base-url", fake.url,
                                 "--profile-json", json.dumps({"api_key_env": KEY_ENV})],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert m.wait_ready(["deepseek"], timeout=TIMEOUT)
            m.submit(ctx(600))
            o = out.wait(1)[0]
            assert (o.status, o.provider) == ("fallback", "local")
            stats = json.dumps(m.stats(), default=str)
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=TIMEOUT)
    assert "auth" in stats
    assert "401" in err or "auth" in err  # the adapter did log the failure...
    for text in (err, stats, caplog.text, o.update.text):
        assert wrong not in text and KEY not in text  # ...without the key


# ---- ensemble, review, refinement, A/B ----------------------------------------------------------

def test_ensemble_reranks_counts_agreement_and_queues_conflicts_for_review(fake, tmp_path) -> None:
    # two providers on the same server: deepseek agrees with the BUY signal, qwen argues SELL
    fake.script([], default={"mode": "normal"})
    prof = deepseek(fake)
    prof["qwen"] = {"base_url": fake.url, "api_key_env": KEY_ENV, "max_concurrency": 2, "model": "qwen-sell", "latency_class": "fast"}
    fake.script([], default={"mode": "normal", "direction_by_model": {"qwen-sell": "sell"}})
    m, out = mesh(fake, ("deepseek", "qwen"), pol=policy("deepseek", "qwen", "local"), prof=prof,
                  ensemble=2, weights_path=tmp_path / "weights.json")
    with m:
        m.submit(ctx(700, action=1))
        o = out.wait(1)[0]
        assert (o.status, o.provider, o.agreeing, o.conflict) == ("ok", "deepseek", 1, True)
        items = m.review_list()
        assert [(it["reason"], it["provider"]) for it in items] == [("conflict", "deepseek")]
        r = m.review(items[0]["item"], approve=False)
        assert r["weight"] == pytest.approx(0.8)
        with pytest.raises(KeyError):
            m.review(items[0]["item"], approve=True)
    assert json.loads((tmp_path / "weights.json").read_text()) == {"deepseek": pytest.approx(0.8)}


def test_progressive_refinement_only_when_ambiguous(fake) -> None:
    prof = deepseek(fake)  # cheap drafter
    prof["chatgpt"] = {"base_url": fake.url, "api_key_env": KEY_ENV, "max_concurrency": 2,
                       "usd_per_m_input": 2.5, "usd_per_m_output": 10.0, "latency_class": "fast"}  # premium
    m, out = mesh(fake, ("deepseek", "chatgpt"), pol=policy("chatgpt", "deepseek", "local"), prof=prof,
                  refine=True, ambiguity=0.5)
    with m:
        m.submit(ctx(800, agreement=0.9, confidence=0.9))  # clear: the draft stands
        assert out.wait(1)[0].provider == "deepseek"
        fake.script([], default={"mode": "normal", "confidence": 0.2})
        m.submit(ctx(801, agreement=0.3))  # ambiguous: the premium refines the draft
        assert out.wait(2)[1].provider == "chatgpt"
        assert fake.stats()["models"] == {"deepseek-chat": 2, "gpt-4o-mini": 1}


def test_ab_split_is_stable_and_recorded(fake) -> None:
    prof = deepseek(fake)
    prof["qwen"] = {"base_url": fake.url, "api_key_env": KEY_ENV, "max_concurrency": 2, "latency_class": "fast"}
    m, out = mesh(fake, ("deepseek", "qwen"), prof=prof, ab_fraction=0.5, ab_candidates=("qwen",))
    with m:
        for i in range(20):
            m.submit(ctx(900 + i))
        outs = out.wait(20)
        arms = {o.update.signal_id: (o.arm, o.provider) for o in outs}
        assert all(p == ("qwen" if a == "B" else "deepseek") for a, p in arms.values())
        fresh = ABSplit(0.5, ("qwen",))  # assignment depends on the signal id only
        assert all(fresh.arm(sid) == a for sid, (a, _) in arms.items())
        ab = m.stats()["ab"]
        assert ab["A"]["tasks"] + ab["B"]["tasks"] == 20 and ab["A"]["tasks"] and ab["B"]["tasks"]


@contextlib.contextmanager
def _served(m: ReasoningMesh, tmp_path: Path):
    """An engine service with mesh ``m`` behind a CURVE control plane; yields the service and a
    runner of ``dynamic-core COMMAND ARGS`` with an authorised client's keys."""
    T.new_keypair(tmp_path, "server")
    T.new_keypair(tmp_path / "clients", "ops")
    pop = dc.Population.random(64, instruments=["EURUSD"], timeframes=[3600], seed=1)
    with m, dc.Engine(pop, threads=1) as eng:
        control = T.ControlServer(secret_key=tmp_path / "server.key_secret", authorized_keys=tmp_path / "clients")
        svc = T.EngineService(eng, control=control, mesh=m, on_signals=lambda s: None)
        with svc:
            svc.start()
            keys = ["--server-key", str(tmp_path / "server.key"), "--client-key",
                    str(tmp_path / "clients" / "ops.key_secret")]

            def cli(command: str, *args: str) -> subprocess.CompletedProcess:
                return subprocess.run([sys.executable, "-m", "dynamic_core", command, *args, *keys],
                                      capture_output=True, text=True, timeout=60)

            yield svc, control.endpoint, cli


def test_review_over_the_control_plane_with_the_cli(fake, tmp_path) -> None:
    fake.script([], default={"mode": "normal", "direction": "sell"})  # argues against a BUY signal
    m, out = mesh(fake, weights_path=tmp_path / "w.json")
    with _served(m, tmp_path) as (_, addr, cli):
        m.submit(ctx(1000, action=1))
        assert out.wait(1)[0].provider == "deepseek"
        r = cli("review", "list", addr, "--json")
        assert r.returncode == 0, r.stderr
        items = json.loads(r.stdout)["items"]
        assert [(it["reason"], it["provider"]) for it in items] == [("disagrees", "deepseek")]
        r = cli("review", "reject", addr, str(items[0]["item"]))
        assert r.returncode == 0 and json.loads(r.stdout)["weight"] == pytest.approx(0.8)
        r = cli("review", "approve", addr, str(items[0]["item"]))  # already decided
        assert r.returncode == 1 and "no review item" in r.stderr
        r = cli("review", "list", addr)
        assert r.returncode == 0 and "review queue is empty" in r.stdout
    assert json.loads((tmp_path / "w.json").read_text()) == {"deepseek": pytest.approx(0.8)}


def test_routing_table_over_the_control_plane_with_the_cli(fake, tmp_path) -> None:
    m, out = mesh(fake, pol=policy("local"))  # the deepseek adapter runs, but no rule names it
    with _served(m, tmp_path) as (svc, addr, cli):
        m.submit(ctx(1100))
        assert out.wait(1)[0].provider == "local"
        r = cli("ctl", addr, "routing", "tactical=deepseek")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == {"routes": 1, "mesh": True}
        m.submit(ctx(1101))
        assert out.wait(2)[1].provider == "deepseek"
        r = cli("ctl", addr, "routing", "tactical=deepseek,nobody")
        assert r.returncode == 1 and "unknown provider 'nobody'" in r.stderr
        assert svc.routing == {"tactical": "deepseek"}  # refused: the table in force stays
        m.submit(ctx(1102))
        assert out.wait(3)[2].provider == "deepseek"
        r = cli("ctl", addr, "routing", "clear")
        assert r.returncode == 0 and json.loads(r.stdout)["routes"] == 0
        m.submit(ctx(1103))
        assert out.wait(4)[3].provider == "local"
        assert fake.stats()["requests"] == 2


# ---- reasoning never blocks signals --------------------------------------------------------------

def test_signals_keep_flowing_while_every_adapter_hangs(fake, tmp_path) -> None:
    fake.script([], default={"mode": "hang", "delay": 60})
    bars = dc.sim.MarketSimulator(["EURUSD", "GBPUSD"], timeframe="H1", seed=5).bars(1500)
    pop = dc.Population.random(2000, instruments=["EURUSD", "GBPUSD"], timeframes=[3600], seed=1)
    m, out = mesh(fake, select="all", queue_size=50, deadline_s=1.0)
    with m, dc.Engine(pop, threads=1) as eng:
        feed = T.SignalFeed(f"ipc://{tmp_path / 'sig.sock'}", heartbeat_interval=0.05)
        svc = T.EngineService(eng, feed=feed, mesh=m)
        with svc, T.SignalSubscriber(feed.endpoint, topics=["sig.", "rat."]) as sub:
            # before start(): the egress thread then owns the feed's socket (one thread per socket)
            assert feed.wait_for_subscribers(1, timeout=TIMEOUT)
            svc.start()
            t0 = time.monotonic()
            eng.submit(bars)
            seen: set[str] = set()
            early = 0
            n_sig = n_rat = 0
            while n_sig < len(bars) or n_rat < 10:
                msg = sub.recv(timeout=TIMEOUT)
                assert msg is not None, (n_sig, n_rat)
                if isinstance(msg, P.SignalBatch):
                    n_sig += len(msg.signals)
                    seen.update(s.id for s in msg.signals)
                    if n_sig == len(bars):
                        all_signals_s = time.monotonic() - t0
                elif isinstance(msg, P.RationaleUpdate):
                    n_rat += 1
                    early += msg.signal_id not in seen
        st = m.stats()
    assert n_sig == len(bars)
    assert early == 0  # a rationale never precedes its signal
    # every signal was out long before any hung request could have returned (60 s) or even a
    # single task deadline passed on the slowest path
    assert all_signals_s < 30.0
    assert st["tasks"]["submitted"] + st["tasks"]["dropped_inbox"] == len(bars)
    assert st["queue"]["shed"]["medium"] + st["queue"]["shed"]["high"] > 0  # shed, never blocked
    assert "answers" not in st["providers"]["deepseek"]  # no hung request ever answered


def test_rationales_finished_when_the_service_stops_are_published(fake, tmp_path) -> None:
    # the egress loop's last round (stopping, nothing in flight) returned before taking the
    # mesh's outbox: a rationale finished just then was never published
    m, out = mesh(fake)
    pop = dc.Population.random(64, instruments=["EURUSD"], timeframes=[3600], seed=1)
    with m, dc.Engine(pop, threads=1) as eng:
        feed = T.SignalFeed(f"ipc://{tmp_path / 'rat.sock'}", heartbeat_interval=0.05)
        svc = T.EngineService(eng, feed=feed, mesh=m)
        with svc, T.SignalSubscriber(feed.endpoint, topics=["rat."]) as sub:
            assert feed.wait_for_subscribers(1, timeout=TIMEOUT)
            m.submit(ctx(7, action=2))
            assert out.wait(1)[0].provider == "deepseek"  # finished: in the outbox
            # that last round, run here (no egress thread was started)
            svc._egress_end_by = time.monotonic() + 1.0
            svc._egress_stop.set()
            svc._egress_body()
            assert svc.rationales_published == 1 and not m.outbox
            msg = sub.recv(timeout=TIMEOUT)
            assert isinstance(msg, P.RationaleUpdate) and msg.signal_id == ctx(7).signal_id


# ---- CLI ----------------------------------------------------------------------------------------

def test_cli_run_with_local_reasoning_prints_rationales_and_mesh_telemetry(tmp_path) -> None:
    env = dict(os.environ, COLUMNS="200", OPENBLAS_NUM_THREADS="1")
    addr = f"ipc://{tmp_path}/mesh"
    r = subprocess.run([sys.executable, "-m", "dynamic_core", "run", "--agents", "512", "--bars", "300",
                        "--instruments", "2", "--no-live", "--reasoning", "local", "--reasoning-bind", addr],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"reasoning mesh at {addr}:" in r.stdout + r.stderr  # the address asked for
    assert "latest rationale" in r.stdout and "local: EURUSD H1" in r.stdout
    assert "Reasoning mesh" in r.stdout and "Rationales:" in r.stdout
    r = subprocess.run([sys.executable, "-m", "dynamic_core", "run", "--agents", "100", "--bars", "10", "-q",
                        "--reasoning", "local", "--reasoning-bind", "tcp://0.0.0.0:5611"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--allow-remote" in r.stderr and "Traceback" not in r.stderr
    assert "dynamic-core run:" not in r.stdout  # refused before the run's header, not after it


def test_cli_run_with_a_bad_secrets_file_fails_before_starting_adapters(tmp_path) -> None:
    r = subprocess.run([sys.executable, "-m", "dynamic_core", "run", "--agents", "100", "--bars", "10", "-q",
                        "--reasoning", "deepseek", "--secrets", str(_bad_secrets(tmp_path))],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.count("has mode 0644") == 1 and "restarting in" not in r.stderr


def test_cli_run_stops_when_an_adapter_it_spawned_has_a_configuration_error(tmp_path) -> None:
    # the secrets file comes from the environment, so only the adapter process reads it
    env = {k: v for k, v in os.environ.items() if k != "DEEPSEEK_API_KEY"}
    env["DYNAMIC_CORE_SECRETS"] = str(_bad_secrets(tmp_path))
    r = subprocess.run([sys.executable, "-m", "dynamic_core", "run", "--agents", "100", "--bars", "10", "-q",
                        "--reasoning", "deepseek"], env=env, capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.count("has mode 0644") == 1 and "restarting in" not in r.stderr
    assert "dynamic-core: error: --reasoning: the adapter of deepseek could not start" in r.stderr


def test_cli_adapter_help_and_unknown_provider() -> None:
    r = subprocess.run([sys.executable, "-m", "dynamic_core", "adapter", "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "deepseek" in r.stdout and "0600" in r.stdout
    r = subprocess.run([sys.executable, "-m", "dynamic_core", "adapter", "--provider", "nope", "--connect",
                        "tcp://127.0.0.1:1"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown provider 'nope'" in r.stderr and "Traceback" not in r.stderr


def test_signals_with_dsi_evidence_carry_it_into_the_rationale_context(fake) -> None:
    # signals of a stream whose DSI evidence was set reach the writer as the feature
    # `dsi_evidence` (here the narrator lists it); a stream without evidence adds no feature
    from dynamic_core.sim import MarketSimulator

    names = ("DSIA", "DSIB")
    bars = MarketSimulator(names, seed=5).bars(60)
    pop = dc.Population.random(256, instruments=list(names), seed=2)
    with dc.Engine(pop) as eng:
        eng.run(bars[:40 * len(names)])
        eng.set_dsi({"DSIA": 0.625})
        recs = eng.run(bars[40 * len(names):])
    last = {dc.instruments.name(int(r["instrument"])): r for r in recs}
    assert last["DSIA"]["flags"] & dc.SIGNAL_DSI and last["DSIA"]["dsi"] == 0.625
    assert not last["DSIB"]["flags"] & dc.SIGNAL_DSI
    out = Collect()
    with ReasoningMesh([], policy=policy("local"), profiles=deepseek(fake), on_rationale=out, select="all") as m:
        ids = m.submit_signal_ids(np.stack([last["DSIA"], last["DSIB"]]))
        assert len(ids) == 2
        got = {o.update.signal_id: o.update.text for o in out.wait(2)}
    assert "dsi_evidence 0.625" in got[ids[0]]
    assert "dsi_evidence" not in got[ids[1]]


# ---- audit fixes: secrets, scheduling, configuration, shutdown, bounds ------------------------

@pytest.fixture(scope="module")
def fake2():
    """A second provider server, for tests where two providers must behave differently."""
    with FakeOpenAI(expect_key=KEY) as f:
        yield f


def test_a_key_echoed_in_a_successful_reply_never_reaches_the_rationale_or_the_cache(fake, caplog) -> None:
    # a provider that answers 200 and quotes the request's Authorization header back
    fake.script([], default={"mode": "normal", "content": f"Direction: buy. You sent Authorization: Bearer {KEY} "
                                                         f"and the key {KEY} again."})
    caplog.set_level(logging.DEBUG, logger="dynamic_core")
    m, out = mesh(fake, prof=deepseek(fake, style="narrative"))
    with m:
        m.submit(ctx(1100))
        o = out.wait(1)[0]
        assert (o.status, o.provider) == ("ok", "deepseek")
        assert KEY not in o.update.text and "***" in o.update.text
        m.submit(ctx(1100))  # answered from the cache: what was cached is the redacted text
        o2 = out.wait(2)[1]
        assert o2.status == "cached" and KEY not in o2.update.text
        cached = m._call(lambda: [v[0] for v in m.cache._d.values()])
        stats = json.dumps(m.stats(), default=str)
    for text in (*map(str, cached), stats, caplog.text, *(u.text for u in m.take_rationales())):
        assert KEY not in text and KEY[10:] not in text


def test_the_adapter_redacts_a_key_that_straddles_the_reply_cut() -> None:
    from dynamic_core.reasoning.profiles import profile
    from dynamic_core.reasoning.worker import MIN_REPLY_CHARS, AdapterWorker

    key = "Zq9custom4471secretvalue"  # no shape any generic pattern knows: only the key itself matches
    w = AdapterWorker(profile("deepseek", {"base_url": "http://127.0.0.1:9/v1"}), "tcp://127.0.0.1:9", api_key=key)
    try:
        for before in (5, 12, len(key) - 1):  # the cut falls inside the key
            text = "x" * (MIN_REPLY_CHARS + 1 - before) + key + " tail"
            clipped = w._clip(text, MIN_REPLY_CHARS + 1)
            assert len(clipped) <= MIN_REPLY_CHARS + 1 and "***" in clipped
            assert key[:4] not in clipped  # not even a prefix of it is left at the end
    finally:
        w.close()


class _Echo:
    """A stand-in client: a successful completion of ``n`` characters echoing the key."""

    def __init__(self, n: int) -> None:
        self.n = n

    def complete(self, messages, **kw):
        from types import SimpleNamespace

        return SimpleNamespace(text=("a" * self.n + KEY + " risk-adjusted, bearer bonds"), model=f"m-{KEY}",
                               tokens_in=1, tokens_out=1, latency_s=0.0)


def test_the_adapter_sends_at_most_one_character_over_the_reply_limit_redacted() -> None:
    from dynamic_core.reasoning.profiles import profile
    from dynamic_core.reasoning.worker import MIN_REPLY_CHARS, REPLY_CHARS_PER_TOKEN, AdapterWorker

    w = AdapterWorker(profile("deepseek", {"base_url": "http://127.0.0.1:9/v1"}), "tcp://127.0.0.1:9", api_key=KEY)
    try:
        req = P.ReasonRequest(task_id=1, attempt=0, context=ctx(1), messages=(("user", "hi"),), max_tokens=1024,
                              timeout_ms=1000)
        rep = w._answer_http(_Echo(1 << 20), req)
        assert rep.ok and len(rep.text) == REPLY_CHARS_PER_TOKEN * 1024 + 1
        assert KEY not in rep.model and "***" in rep.model
        rep = w._answer_http(_Echo(10), req)
        assert rep.text == "a" * 10 + "*** risk-adjusted, bearer bonds"  # only the key, not look-alikes
        req = P.ReasonRequest(task_id=1, attempt=0, context=ctx(1), messages=(("user", "hi"),), max_tokens=1,
                              timeout_ms=1000)
        assert len(w._answer_http(_Echo(1 << 20), req).text) == MIN_REPLY_CHARS + 1
    finally:
        w.close()


def test_a_task_for_an_idle_provider_does_not_wait_behind_a_backlog_for_a_hung_one(fake, fake2) -> None:
    # 'deep' tasks wait for a hung deepseek (1 slot); 'tactical' ones, routed to an idle qwen,
    # queued behind them in the same priority class, start at once
    fake.script([], default={"mode": "hang", "delay": 60})
    fake2.reset()
    prof = {**deepseek(fake, max_concurrency=1, timeout_s=30.0), **provider(fake2, "qwen", max_concurrency=4)}
    pol = {"rules": [{"request_class": "deep", "candidates": ["deepseek"]},
                     {"request_class": "tactical", "candidates": ["qwen"]}],
           "default_candidates": ["local"], "breaker": {"min_requests": 1000}, "cooldown_failures": 1000}
    m, out = mesh(fake, ("deepseek", "qwen"), pol=pol, prof=prof, deadline_s=20.0, queue_size=100)
    with m:
        deep = [m.submit(ctx(1200 + i), request_class="deep") for i in range(30)]
        wait_until(lambda: m.stats()["queue"]["queued"] == 29)  # one at deepseek, the rest queued
        tac = [m.submit(ctx(1300 + i), request_class="tactical", deadline_s=20.0) for i in range(5)]
        got = {o.task_id: o for o in out.wait(5, timeout=30)}
        assert set(got) == set(tac)
        # (waiting behind the backlog would end at the 20 s deadline; half of it is slack for a
        # loaded machine)
        assert all((o.status, o.provider) == ("ok", "qwen") and o.latency_s < 10.0 for o in got.values()), got
        assert fake2.stats()["requests"] == 5 and len(deep) == 30


def test_a_queued_task_goes_to_the_next_live_candidate_with_a_free_slot(fake, fake2) -> None:
    # candidates [deepseek, qwen, local]: deepseek hangs with its only slot taken, so the tasks
    # behind the first go to qwen now instead of waiting for deepseek until their deadline
    fake.script([], default={"mode": "hang", "delay": 60})
    fake2.reset()
    prof = {**deepseek(fake, max_concurrency=1, timeout_s=30.0), **provider(fake2, "qwen", max_concurrency=4)}
    m, out = mesh(fake, ("deepseek", "qwen"), pol=policy("deepseek", "qwen", "local"), prof=prof, deadline_s=20.0,
                  max_retries=0)
    with m:
        first = m.submit(ctx(1400))
        wait_until(lambda: fake.stats()["requests"] >= 1)  # this test's request is at the server (it hangs)
        rest = [m.submit(ctx(1401 + i)) for i in range(4)]
        got = out.wait(4, timeout=30)
        assert {o.task_id for o in got} == set(rest)
        # (waiting for deepseek would end at the 20 s deadline; half of it is slack for a loaded
        # machine)
        assert all((o.status, o.provider) == ("ok", "qwen") and o.latency_s < 10.0 for o in got), got
        assert first not in {o.task_id for o in got}


def test_the_queue_decides_per_route_and_keeps_priority_order_among_runnable_tasks() -> None:
    from dynamic_core.reasoning.tasks import Task, TaskQueue

    q = TaskQueue(100)
    tasks = []
    for i in range(40):  # a backlog for "busy", interleaved with tasks "idle" can take
        t = Task(i + 1, ctx(i), "tactical", (3, 2, 1)[i % 3], 0.0, 10.0, 1, False, 64)
        t.candidates = ["busy", "local"] if i % 4 else ["idle", "local"]
        assert q.push(t) is None
        tasks.append(t)
    asked: list[tuple] = []

    def runnable(route: tuple) -> bool:
        asked.append(route)
        return route[0] == "idle"

    taken = []
    for _ in range(len(tasks) + 1):
        t = q.take(runnable)
        if t is None:
            break
        assert isinstance(t, Task)
        taken.append(t)
    assert {t.candidates[0] for t in taken} == {"idle"} and len(taken) == 10
    assert len(asked) <= 2 * (len(taken) + 1)  # per route, not per queued task
    # every runnable task of a more urgent class before any of a less urgent one still queued
    pris = [t.priority for t in taken]
    assert pris[0] == min(pris) and len(q) == 30
    for p in set(pris):  # arrival order within a class
        ids = [t.id for t in taken if t.priority == p]
        assert ids == sorted(ids)


@pytest.mark.parametrize("kw", [
    {"deadline_s": float("nan")}, {"deadline_s": float("inf")}, {"deadline_s": 1e9}, {"deadline_s": 0.0},
    {"heartbeat_s": 0.0}, {"heartbeat_s": -1.0}, {"heartbeat_s": float("nan")}, {"liveness": 0},
    {"max_retries": -5}, {"backoff_s": float("nan")}, {"backoff_s": float("inf")}, {"workers": 0},
    {"ensemble": 0}, {"queue_size": 0}, {"cache_size": -1}, {"cache_ttl_s": float("inf")},
    {"cache_bytes": -1}, {"ambiguity": 1.5}, {"review_confidence": float("nan")}, {"ab_fraction": 2.0},
    {"max_tokens": 0}, {"outbox_size": 0},
])
def test_the_constructor_checks_every_number_and_names_it(kw) -> None:
    (name,) = kw
    with pytest.raises(ValueError, match=name):
        ReasoningMesh([], spawn=False, **kw)


def test_the_constructor_refuses_wrong_types_and_submit_checks_its_numbers() -> None:
    with pytest.raises(TypeError, match="queue_size"):
        ReasoningMesh([], spawn=False, queue_size="10")  # type: ignore[arg-type]
    with ReasoningMesh([], spawn=False) as m:
        for bad in (float("nan"), float("inf"), 0.0, 1e9):
            with pytest.raises(ValueError, match="deadline_s"):
                m.submit(ctx(1), deadline_s=bad)
        for bad in (0, -1, 65):
            with pytest.raises(ValueError, match="ensemble"):
                m.submit(ctx(1), ensemble=bad)


def test_a_non_finite_timer_fires_at_once_instead_of_blocking_every_later_timer() -> None:
    m = ReasoningMesh([], spawn=False)
    try:
        for when in (float("nan"), float("inf")):
            m._push_timer(when, "deadline", 1, 0)
        m._push_timer(time.monotonic() + 1.0, "deadline", 2, 0)
        assert all(t[0] < float("inf") for t in m._timers)  # (NaN compares False too)
        m._run_timers(time.monotonic() + 2.0)
        assert m._timers == []  # every timer was due: none stuck behind a NaN root
    finally:
        m.close()


def test_profiles_refuse_a_base_url_the_http_client_would_refuse() -> None:
    from dynamic_core.errors import PolicyError
    from dynamic_core.reasoning.profiles import load_profiles, profile

    for url in ("ftp://127.0.0.1/v1", "file:///etc/passwd", "127.0.0.1:8000/v1", "http:///v1", ""):
        with pytest.raises(PolicyError, match="deepseek.*base_url"):
            profile("deepseek", {"base_url": url})
    with pytest.raises(PolicyError, match="credentials") as ei:
        load_profiles({"deepseek": {"base_url": "http://user:sk-embedded-secret-123456@127.0.0.1:9/v1"}})
    assert "sk-embedded" not in str(ei.value)
    with pytest.raises(PolicyError, match="credentials"):
        ReasoningMesh(["deepseek"], spawn=False, profiles={"deepseek": {"base_url": "https://a:b@example.com/v1"}})
    assert profile("deepseek", {"base_url": "https://example.com:8443/v1"}).base_url.endswith("/v1")
    assert profile("local").base_url == ""  # the narrator needs none


def test_an_adapter_whose_client_refuses_its_key_is_marked_down_not_restarted(fake, monkeypatch) -> None:
    # a key no HTTP header can carry: the client refuses it when the adapter starts; that is a
    # configuration error (exit 2), not a crash to restart every second forever
    monkeypatch.setenv(KEY_ENV, "sk-\u20ac-not-latin-1-0123456789")
    out = Collect()
    m = ReasoningMesh(["deepseek"], policy=policy("deepseek", "local"), profiles=deepseek(fake), on_rationale=out)
    with m:
        m.start(wait=TIMEOUT)
        wait_until(lambda: "deepseek" in m.down)
        assert "configuration error" in m.down["deepseek"]
        time.sleep(1.3)  # a restart would have come after 1 s
        st = m.stats()
        assert st["tasks"]["adapter_config_errors"] == 1 and st["tasks"]["respawned"] == 0
        m.submit(ctx(1500))
        assert out.wait(1)[0].provider == "local"
    assert fake.stats()["requests"] == 0


class _DeadProc:
    """A Popen stand-in for an adapter process that has already exited."""

    _pids = itertools.count(10_000_000)

    def __init__(self, code: int = 1) -> None:
        self.pid = next(self._pids)
        self.returncode = code

    def poll(self) -> int:
        return self.returncode


def test_adapters_that_keep_dying_are_restarted_with_capped_exponential_backoff(monkeypatch) -> None:
    from dynamic_core.reasoning import mesh as mesh_mod

    m = ReasoningMesh([], spawn=False)
    spawns: list[float] = []
    clock = [0.0]

    def spawn(p: str, **kw) -> _DeadProc:  # every restart dies again at once
        spawns.append(clock[0])
        proc = _DeadProc()
        m._children[proc.pid] = (p, proc, {})
        return proc

    monkeypatch.setattr(m, "spawn", spawn)
    try:
        first = _DeadProc()
        m._children[first.pid] = ("deepseek", first, {})
        while clock[0] < 200.0:
            m._check_children(clock[0])
            clock[0] += 0.05
        gaps = [round(b - a) for a, b in zip([0.0, *spawns], spawns)]
        assert gaps[:6] == [1, 2, 4, 8, 16, 32], gaps  # doubling ...
        assert all(g == mesh_mod.RESPAWN_MAX_S for g in gaps[6:]), gaps  # ... up to the cap
        st = m.stats()
        assert st["tasks"]["respawned"] == len(spawns) and st["tasks"]["adapter_exits"] == len(spawns) + 1
        assert st["respawn"] == {"deepseek": len(spawns) + 1}
    finally:
        m._children.clear()
        m.close()


def test_close_ends_every_unfinished_task_once_with_the_narrator(fake) -> None:
    fake.script([], default={"mode": "hang", "delay": 60})
    m, out = mesh(fake, deadline_s=30.0, queue_size=100)
    ids = [m.submit(ctx(1600 + i)) for i in range(6)]  # 2 at the hung provider, 4 queued
    wait_until(lambda: fake.stats()["in_flight"] >= 2)
    ids += [m.submit(ctx(1610 + i)) for i in range(3)]  # (maybe still in the inbox)
    t0 = time.monotonic()
    m.close()
    assert time.monotonic() - t0 < 10.0  # not the 60 s hang
    got = out.wait(len(ids), timeout=1.0)  # delivered by close itself
    assert sorted(o.task_id for o in got) == sorted(ids)
    assert {(o.status, o.provider, o.reason) for o in got} == {("fallback", "local", "closed")}
    assert len(m.take_rationales()) == len(ids)
    assert m.counts["ended_by_close"] == len(ids) and not m._tasks
    # a mesh closed without ever starting ends its submitted tasks too
    out2 = Collect()
    m2 = ReasoningMesh([], policy=policy("local"), on_rationale=out2)
    a, b = m2.submit(ctx(1620)), m2.submit(ctx(1621))
    m2.close()
    assert sorted(o.task_id for o in out2.wait(2, timeout=1.0)) == sorted((a, b))


def test_adapter_close_waits_for_its_request_threads_together_not_one_after_another() -> None:
    from dynamic_core.reasoning.profiles import profile
    from dynamic_core.reasoning.worker import JOIN_S, AdapterWorker

    w = AdapterWorker(profile("local"), "tcp://127.0.0.1:9")
    release = threading.Event()
    w._threads = [threading.Thread(target=release.wait, daemon=True) for _ in range(6)]  # six hung requests
    for t in w._threads:
        t.start()
    try:
        t0 = time.monotonic()
        w.close()
        assert time.monotonic() - t0 < JOIN_S + 3.0  # (one by one would take 6 s)
    finally:
        release.set()


def test_a_submit_racing_close_never_rings_a_closed_doorbell(monkeypatch) -> None:
    # the submitter is paused after its argument checks; close() runs and closes the eventfd,
    # whose number an unrelated file then gets: the submit must neither write there nor return
    # an id that would never complete
    import tempfile

    from dynamic_core.reasoning import mesh as mesh_mod

    m = ReasoningMesh([], policy=policy("local"))
    m.start()
    m.submit(ctx(1700))
    assert m.wait_idle(5)
    go, paused = threading.Event(), threading.Event()
    real = mesh_mod.priority_index

    def slow_priority(p):
        paused.set()
        go.wait(5)
        return real(p)

    monkeypatch.setattr(mesh_mod, "priority_index", slow_priority)
    res: list[int] = []
    # (a priority given as an index goes through priority_index: the pause point)
    t = threading.Thread(target=lambda: res.append(m.submit(ctx(1701), priority=2)))
    t.start()
    assert paused.wait(5)
    fd = m._wake.wfd
    m.close()
    files = []
    try:
        while True:
            f = tempfile.TemporaryFile()
            files.append(f)
            if f.fileno() == fd or len(files) > 50:
                break
        go.set()
        t.join(5)
        assert res == [0] and m.counts["refused_closed"] == 1
        files[-1].seek(0)
        assert files[-1].read() == b""
    finally:
        go.set()
        for f in files:
            f.close()
    assert m.submit(ctx(1702)) == 0  # after close: refused, not raised


def test_finished_tasks_leave_no_timers_behind() -> None:
    n = 6000
    out: list = []
    with ReasoningMesh([], policy=policy("local"), deadline_s=3600.0, on_rationale=out.append,
                       queue_size=n) as m:
        for i in range(n):
            while not m.submit(ctx(1800 + i)):
                time.sleep(0.001)
        assert m.wait_idle(30)
        timers = m._call(lambda: len(m._timers))
        assert len(out) == n
        assert timers < 2 * 1024 + 100, timers  # not one per finished task until its deadline
        assert m.stats()["tasks"]["timers_compacted"] >= 1


def test_a_reply_far_beyond_max_tokens_is_cut_and_counted_and_the_cache_has_a_byte_budget(fake) -> None:
    from dynamic_core.reasoning.worker import MIN_REPLY_CHARS

    fake.script([], default={"mode": "normal", "content": "Direction: buy. " + "y" * 300_000, "completion_tokens": 50})
    m, out = mesh(fake, prof=deepseek(fake, style="narrative"), max_tokens=64, cache_bytes=3 * MIN_REPLY_CHARS)
    with m:
        for i in range(3):
            m.submit(ctx(1900 + i))
            o = out.wait(i + 1)[i]
            assert (o.status, o.provider) == ("ok", "deepseek") and len(o.update.text) <= MIN_REPLY_CHARS
        st = m.stats()
        assert st["tasks"]["truncated_replies"] == 3 and st["providers"]["deepseek"]["truncated"] == 3
        assert st["cache"]["bytes"] <= st["cache"]["max_bytes"] == 3 * MIN_REPLY_CHARS
        assert st["cache"]["size"] < 3 and st["cache"]["evictions"] >= 1


def test_changing_features_after_submit_changes_neither_the_prompt_nor_the_cache_key(fake) -> None:
    # the first request holds the only slot for 5 s: B is still queued when its dict changes, even
    # when a loaded machine stalls this thread (the deadline outlasts the wait)
    fake.script([{"mode": "slow", "delay": 5.0}], default={"mode": "normal"})
    m, out = mesh(fake, prof=deepseek(fake, max_concurrency=1), deadline_s=30.0)
    with m:
        m.submit(ctx(2000))  # holds the only slot
        wait_until(lambda: fake.stats()["requests"] >= 1)  # this test's request is at the server
        feats = {"atr_pct": 0.3}
        b = P.ReasoningContext(signal_id="b:1", instrument="EURUSD", timeframe=3600, action=0, confidence=0.7,
                               agreement=0.8, n_agents=10, features=feats)
        m.submit(b)
        wait_until(lambda: m.stats()["queue"]["queued"] == 1)  # routed (cache key taken) and queued
        feats["zz_injected"] = 9.0  # the caller reuses its dict
        feats["atr_pct"] = 5.0
        ob = next(o for o in out.wait(2) if o.update.signal_id == "b:1")
        assert ob.status == "ok"
        user = next(x["content"] for x in fake.stats()["last_request"]["body"]["messages"] if x["role"] == "user")
        assert "zz_injected" not in user and "atr_pct" in user and "5.0" not in user
        # an unrelated signal with the numbers B was submitted with hits B's entry, rightly
        c = P.ReasoningContext(signal_id="c:1", instrument="EURUSD", timeframe=3600, action=0, confidence=0.7,
                               agreement=0.8, n_agents=10, features={"atr_pct": 0.3})
        m.submit(c)
        oc = next(o for o in out.wait(3) if o.update.signal_id == "c:1")
        assert (oc.status, oc.update.text) == ("cached", ob.update.text)


def test_ensemble_applies_policy_weights_and_breaks_ties_by_routing_order(fake, fake2) -> None:
    # deepseek answers late; qwen and kimi at once; every reply agrees with the signal, so the
    # scores are equal but for the weights
    fake.script([], default={"mode": "slow", "delay": 0.4})
    fake2.reset()
    prof = {**deepseek(fake), **provider(fake2, "qwen"), **provider(fake2, "kimi", personas=["*"])}
    pol = {"rules": [{"request_class": "tactical", "candidates": ["deepseek", "qwen", "local"]},
                     {"request_class": "deep", "candidates": ["kimi", "deepseek", "local"]}],
           "limits": {"kimi": {"weight": 0.5}}}
    m, out = mesh(fake, ("deepseek", "qwen", "kimi"), pol=pol, prof=prof, ensemble=2, cache_size=0)
    with m:
        m.submit(ctx(2100), request_class="tactical")  # a tie: the routing order, not qwen's head start
        o = out.wait(1)[0]
        assert (o.status, o.provider, o.agreeing) == ("ok", "deepseek", 2)
        m.submit(ctx(2101), request_class="deep")  # kimi (weight 0.5) first in line and first back
        o = out.wait(2)[1]
        assert (o.status, o.provider, o.agreeing) == ("ok", "deepseek", 2)


def test_a_full_inbox_makes_room_for_an_urgent_task_by_evicting_a_lower_one() -> None:
    out = Collect()
    m = ReasoningMesh([], policy=policy("local"), on_rationale=out, queue_size=10)  # inbox: 1024
    try:
        lows = [m.submit(ctx(i), priority="low") for i in range(1024)]
        assert all(lows) and m.submit(ctx(5000), priority="low") == 0  # full: a low is refused
        assert m.submit(ctx(5001), priority="medium") == 0  # only critical and high evict
        crit = m.submit(ctx(5002), priority="critical")
        high = m.submit(ctx(5003), priority="high")
        assert crit and high
        assert m.counts["evicted_inbox"] == 2 and m.counts["dropped_inbox"] == 2
    finally:
        m.close()  # never started: close ends everything in the inbox
    got = {o.task_id: o for o in out.wait(1026, timeout=5)}
    assert crit in got and high in got
    evicted = [o for o in got.values() if o.reason == "evicted"]
    assert sorted(o.task_id for o in evicted) == sorted(lows[-2:])  # the newest lows
    assert all(o.status == "fallback" and o.provider == "local" for o in evicted)


def test_submit_many_queues_in_order_refuses_past_a_full_inbox_and_evicts_like_submit() -> None:
    out = Collect()
    m = ReasoningMesh([], policy=policy("local"), on_rationale=out, queue_size=10)  # inbox: 1024
    try:
        first = m.submit_many([ctx(i) for i in range(1000)], priority="low")
        assert first == sorted(first) and len(set(first)) == 1000 and all(first)
        more = m.submit_many([ctx(3000 + i) for i in range(30)], priority="low")
        assert all(more[:24]) and more[24:] == [0] * 6  # the inbox holds 1024
        assert m.counts["dropped_inbox"] == 6
        urgent = m.submit_many([ctx(4000), ctx(4001)], priority="critical")
        assert all(urgent) and m.counts["evicted_inbox"] == 2  # made room, as submit does
        with pytest.raises(ValueError, match="priority"):
            m.submit_many([ctx(4002)], priority="urgent")
        with pytest.raises(ValueError, match="deadline_s"):
            m.submit_many([ctx(4003)], deadline_s=float("nan"))
    finally:
        m.close()
    assert m.submit_many([ctx(4004), ctx(4005)]) == [0, 0] and m.counts["refused_closed"] == 2
    got = {o.task_id: o for o in out.wait(1026, timeout=5)}
    assert set(got) == {t for t in first + more + urgent if t}
    with pytest.raises(AttributeError):
        got[urgent[0]].status = "ok"  # type: ignore[misc]  # an Outcome is immutable


def test_submit_many_through_a_started_mesh_completes_every_task_once() -> None:
    out = Collect()
    with ReasoningMesh([], policy=policy("local"), on_rationale=out) as m:
        m.start()
        ids = m.submit_many([ctx(5100 + i) for i in range(300)], priority="high")
        assert all(ids)
        got = out.wait(300)
    assert sorted(o.task_id for o in got) == sorted(ids)
    assert sorted(o.update.signal_id for o in got) == sorted(ctx(5100 + i).signal_id for i in range(300))


def test_close_called_from_on_rationale_ends_the_broker_and_closes_its_sockets() -> None:
    got: list = []
    holder: list = []

    def on(o) -> None:
        got.append(o)
        if len(got) == 1:
            holder[0].close()  # on the broker thread: it cannot join itself

    m = ReasoningMesh([], policy=policy("local"), on_rationale=on)
    holder.append(m)
    m.start()
    m.submit(ctx(5200))
    deadline = time.monotonic() + 5
    while not m._sock.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert m._sock.closed  # the loop closed the socket and the doorbell as it ended
    assert m._thread is not None and not m._thread.is_alive() or m._thread is None
    assert m.submit(ctx(5201)) == 0 and len(got) == 1
    m.close()  # again, from outside: nothing left to do, no error


def test_waits_from_on_rationale_raise_at_once() -> None:
    # the broker thread runs on_rationale: a wait there for that thread spun until its timeout
    errors: list[str] = []
    holder: list = []

    def on(o) -> None:
        for wait in (lambda: holder[0].wait_idle(timeout=5.0), lambda: holder[0].wait_ready(timeout=5.0)):
            t0 = time.monotonic()
            try:
                wait()
            except RuntimeError as e:
                errors.append(f"{time.monotonic() - t0 < 1.0} {e}")

    with ReasoningMesh([], policy=policy("local"), on_rationale=on) as m:
        holder.append(m)
        m.start()
        m.submit(ctx(5250))
        wait_until(lambda: len(errors) == 2)
        assert m.wait_idle(timeout=TIMEOUT)  # from any other thread it waits as before
    assert [e.split(" ", 1)[0] for e in errors] == ["True", "True"]
    assert "wait_idle() from on_rationale" in errors[0] and "wait_ready() from on_rationale" in errors[1]


def test_submit_many_is_all_or_nothing_when_a_context_cannot_be_copied() -> None:
    out = Collect()
    bad = P.ReasoningContext(signal_id="bad:1", instrument="EURUSD", timeframe=3600, seq=1, action=1,
                           score=0.3, confidence=0.7, agreement=0.8, dispersion=0.1, n_agents=10,
                           features={"lock": threading.Lock()})  # type: ignore[dict-item]
    with ReasoningMesh([], policy=policy("local"), on_rationale=out) as m:
        m.start()
        with pytest.raises(TypeError):
            m.submit_many([ctx(5300), ctx(5301), bad])
        assert len(m._inbox) == 0  # nothing of the batch was queued
        time.sleep(0.3)
        assert out.items == [] and m.counts["submitted"] == 0


def test_a_producer_that_keeps_the_inbox_full_cannot_hold_the_broker_in_one_drain(monkeypatch) -> None:
    from dynamic_core.reasoning import mesh as mesh_mod

    most = {"drained": 0, "timers": 0}
    taken = [0]  # inbox entries made into tasks (submitted counts them at submit)
    real = mesh_mod.ReasoningMesh._drain_inbox
    real_task_of = mesh_mod.ReasoningMesh._task_of

    def task_of(self, entry):
        taken[0] += 1
        return real_task_of(self, entry)

    def drain(self) -> None:
        before = taken[0]
        real(self)
        most["drained"] = max(most["drained"], taken[0] - before)
        most["timers"] = max(most["timers"], len(self._timers))

    monkeypatch.setattr(mesh_mod.ReasoningMesh, "_task_of", task_of)
    monkeypatch.setattr(mesh_mod.ReasoningMesh, "_drain_inbox", drain)
    # queue_size=1: nearly every task is shed while draining, leaving a dead deadline timer
    m = ReasoningMesh([], policy=policy("local"), queue_size=1, deadline_s=3600.0, cache_size=0,
                      on_rationale=lambda o: None)
    try:
        m.start()
        cs = [ctx(5400 + i) for i in range(100)]
        stop = time.monotonic() + 1.5
        while time.monotonic() < stop:
            m.submit_many(cs)
    finally:
        m.close()
    cap = m._inbox_cap
    assert 0 < most["drained"] <= cap  # at most an inbox's worth per iteration
    assert most["timers"] <= 2 * cap + 2, most  # dead timers compacted every iteration


def _read_until(stream, text: str, timeout: float = TIMEOUT) -> str:
    """Lines of a child's ``stream`` up to and including the first holding ``text`` (a reader
    thread, so a child that never says it fails the test instead of hanging it)."""
    got: list[str] = []
    found = threading.Event()

    def read() -> None:
        for line in stream:
            got.append(line)
            if text in line:
                found.set()
                return
    threading.Thread(target=read, daemon=True).start()
    assert found.wait(timeout), f"{text!r} not said in {timeout} s: {''.join(got)!r}"
    return "".join(got)


def test_an_adapter_facing_a_listener_that_is_no_broker_warns_once() -> None:
    """A port whose listener accepts and closes (not a ZeroMQ broker): TCP connects succeed, no
    handshake does. One 'no broker' warning for the whole outage, no 'connected'/'lost' pairs."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)

    def accept_and_close() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            c.close()

    threading.Thread(target=accept_and_close, daemon=True).start()
    port = srv.getsockname()[1]
    try:
        with subprocess.Popen([sys.executable, "-m", "dynamic_core", "adapter", "--provider", "local",
                               "--connect", f"tcp://127.0.0.1:{port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
            # the warning (its signal handler is in place by then), then more reconnects
            first = _read_until(proc.stderr, f"no broker at tcp://127.0.0.1:{port}")
            time.sleep(1.5)
            proc.send_signal(signal.SIGTERM)
            err = first + proc.communicate(timeout=TIMEOUT)[1]
            assert proc.returncode == 0
    finally:
        srv.close()
    assert err.count(f"no broker at tcp://127.0.0.1:{port}") == 1
    assert "connected to the broker" not in err and "lost the broker" not in err and "Traceback" not in err


# ---- second review: contexts adapters refuse, signals, heartbeats, weights, configuration ---------

def _bad_contexts() -> dict[str, P.ReasoningContext]:
    """Contexts a Python caller can build (a Struct built in Python skips its constraints) that an
    adapter's decoder refuses, keyed by the field the refusal names."""
    base = dict(signal_id="bad:1", instrument="EURUSD", timeframe=3600, seq=1, action=1, score=0.3, confidence=0.7,
                agreement=0.8, dispersion=0.1, n_agents=10, features={"atr_pct": 0.3})
    over = {"features": dict(features={f"f{j}": 1.0 for j in range(65)}), "signal_id": dict(signal_id="s" * 300),
            "asset_class": dict(asset_class="a" * 300), "timeframe": dict(timeframe=0), "action": dict(action=3),
            "seq": dict(seq=-1), "key": dict(features={"k" * 300: 1.0}), "instrument": dict(instrument=""),
            "float": dict(features={"flag": True})}  # ("key": a feature name, "float": a feature value)
    return {field: P.ReasoningContext(**{**base, **o}) for field, o in over.items()}  # type: ignore[arg-type]


def test_submit_refuses_a_context_an_adapter_would_refuse_and_the_provider_keeps_its_slots(fake) -> None:
    # such a context used to be sent, refused by the adapter without a reply, and hold the
    # provider's slot for good: after max_concurrency of them every task fell back to 'local'
    m, out = mesh(fake, prof=deepseek(fake, max_concurrency=1))
    with m:
        bad = _bad_contexts()
        for field, c in bad.items():
            with pytest.raises(ValueError, match=f"ctx would be refused by the adapters: .*{field}"):
                m.submit(c)
        with pytest.raises(TypeError, match="ctx must be a dynamic_core.payloads.ReasoningContext, got NoneType"):
            m.submit(None)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"ctxs\[1\] would be refused .*features"):
            m.submit_many([ctx(1), bad["features"], ctx(2)])  # all or nothing
        assert len(m._inbox) == 0 and m.counts["submitted"] == 0
        assert m.counts["invalid_contexts"] == len(bad) + 2
        # numpy scalars (features computed with numpy) are taken as Python floats
        c = P.ReasoningContext(signal_id="np:1", instrument="EURUSD", timeframe=3600, action=1, confidence=0.7,
                               agreement=0.8, n_agents=10, features={"atr_pct": np.float32(0.25),
                                                                     "ret_20": np.float64(1.5)})
        m.submit(c)
        for i in range(3):
            m.submit(ctx(1700 + i))
        got = out.wait(4)
        assert [(o.status, o.provider) for o in got] == [("ok", "deepseek")] * 4
        user = next(x["content"] for x in fake.stats()["last_request"]["body"]["messages"] if x["role"] == "user")
        assert "ret_20" in user
        assert m.adapters("deepseek")[0]["in_flight"] == 0


def test_an_adapter_answers_a_request_it_cannot_decode_so_the_broker_gets_its_slot_back() -> None:
    # a broker of another payload version, say: the frame does not decode, but its task id and
    # attempt can still be read, and a client_error reply frees the slot the broker holds for it
    import zmq

    zctx = zmq.Context.instance()
    router = zctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind("tcp://127.0.0.1:*")
    addr = router.getsockopt_string(zmq.LAST_ENDPOINT)
    enc, dec = P.Codec(P.MeshToAdapter), P.Codec(P.MeshFromAdapter)
    proc = subprocess.Popen([sys.executable, "-m", "dynamic_core", "adapter", "--provider", "local", "--connect", addr],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    replies: dict[int, P.ReasonReply] = {}
    try:
        assert router.poll(TIMEOUT * 1000), "no hello"
        ident = router.recv_multipart()[0]
        bad = _bad_contexts()["features"]
        router.send_multipart([ident, enc.encode(P.ReasonRequest(task_id=77, attempt=3, context=bad))])
        router.send_multipart([ident, b"\x93garbage"])  # says nothing of an attempt: counted, not answered
        router.send_multipart([ident, enc.encode(P.ReasonRequest(task_id=78, attempt=0, context=ctx(1)))])
        end = time.monotonic() + TIMEOUT
        while 78 not in replies:  # answered in order: 77's reply, if any, came first
            assert time.monotonic() < end, f"replies so far: {replies}"
            if not router.poll(100):
                continue
            for frame in router.recv_multipart()[1:]:
                for buf in P.split_batch(frame):
                    msg = dec.decode(buf)
                    if isinstance(msg, P.ReasonReply):
                        replies[msg.task_id] = msg
        router.send_multipart([ident, enc.encode(P.MeshShutdown())])
        err = proc.communicate(timeout=TIMEOUT)[1]
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        router.close(0)
    refused = replies.get(77)
    assert refused is not None, err
    assert (refused.attempt, refused.ok, refused.error_kind) == (3, False, "client_error")
    assert "features" in refused.error and "refused" in refused.error
    assert replies[78].ok and "Traceback" not in err
    assert "refused request 77 (attempt 3)" in err and "refused a broker frame" in err


_TERM_WHILE_STOPPING = """\\
import os, signal, sys
import dynamic_core.reasoning.worker as W
def hook(frame, event, arg):
    # run()'s way out: self._stop.set() -> Condition.notify_all, with the Event's lock held
    if event == "call" and frame.f_code.co_name == "notify_all":
        caller = frame.f_back
        if caller and caller.f_code.co_name == "set" and caller.f_back and caller.f_back.f_code.co_name == "run":
            sys.setprofile(None)
            print("signalled", flush=True)
            os.kill(os.getpid(), signal.SIGTERM)  # what ReasoningMesh.close() sends, right then
sys.setprofile(hook)
sys.exit(W.serve("local", sys.argv[1]))
"""


def test_a_signal_landing_while_the_adapter_holds_its_stop_lock_still_lets_it_exit() -> None:
    # the handler used to call Event.set, whose lock is not reentrant: a SIGTERM arriving while
    # run() was inside its own Event.set hung the adapter for good
    import zmq

    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind("tcp://127.0.0.1:*")
    proc = subprocess.Popen([sys.executable, "-c", _TERM_WHILE_STOPPING, router.getsockopt_string(zmq.LAST_ENDPOINT)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert router.poll(TIMEOUT * 1000), "no hello"
        ident = router.recv_multipart()[0]
        router.send_multipart([ident, P.Codec(P.MeshToAdapter).encode(P.MeshShutdown())])
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail("the adapter hung in its own signal handler")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        router.close(0)
    assert "signalled" in out, err  # the signal did land at that point
    assert proc.returncode == 0 and "Traceback" not in err


def test_an_adapter_beating_slower_than_the_mesh_is_lost_once_then_judged_by_its_own_interval(
        fake, caplog) -> None:
    # started by hand with --heartbeat 1 against a mesh beating every 0.1 s (5 missed: 0.5 s):
    # it used to be lost after every hello and its requests failed over each time
    caplog.set_level(logging.WARNING, logger="dynamic_core.reasoning.mesh")
    out = Collect()
    with ReasoningMesh([], spawn=False, policy=policy("deepseek", "local"), profiles=deepseek(fake),
                       on_rationale=out, liveness=5) as m:
        proc = subprocess.Popen([sys.executable, "-m", "dynamic_core", "adapter", "--provider", "deepseek",
                                 "--connect", m.address, "--base-url", fake.url, "--heartbeat", "1",
                                 "--profile-json", json.dumps({"api_key_env": KEY_ENV})],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert m.wait_ready(["deepseek"], timeout=TIMEOUT)
            wait_until(lambda: m.stats()["tasks"]["slow_heartbeats"] == 1, timeout=10)
            lost = m.stats()["adapters_lost"]
            assert lost == 1
            time.sleep(3.5)  # three of its beats, a hello
            st = m.stats()
            assert st["adapters_lost"] == lost and st["providers"]["deepseek"]["adapters"] == 1
            for i in range(3):
                m.submit(ctx(1800 + i))
            assert [(o.status, o.provider) for o in out.wait(3)] == [("ok", "deepseek")] * 3
        finally:
            proc.terminate()
            proc.wait(TIMEOUT)
    warned = [r.getMessage() for r in caplog.records if "beats slower than the mesh" in r.getMessage()]
    assert len(warned) == 1 and "--heartbeat 0.1" in warned[0]


def test_a_key_echoed_cut_short_or_escaped_reaches_neither_the_adapter_log_nor_the_mesh(caplog) -> None:
    from .test_reasoning_client import XKEY, _escaped, assert_no_fragment

    caplog.set_level(logging.DEBUG, logger="dynamic_core")
    out = Collect()
    with FakeOpenAI() as echo:  # takes any key, and quotes the one it got (as many providers do)
        echo.script([{"mode": "status", "status": 401,
                      "message": f"Incorrect API key provided: {XKEY[:-4]}****; as sent: {_escaped(XKEY)}"}])
        with ReasoningMesh([], policy=policy("deepseek", "local"), profiles=deepseek(echo), on_rationale=out,
                           max_retries=0, liveness=50) as m:
            env = dict(os.environ, DC_TEST_XKEY=XKEY)
            proc = subprocess.Popen([sys.executable, "-m", "dynamic_core", "adapter", "--provider", "deepseek",
                                     "--connect", m.address, "--base-url", echo.url,
                                     "--profile-json", json.dumps({"api_key_env": "DC_TEST_XKEY"})],
                                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            try:
                assert m.wait_ready(["deepseek"], timeout=TIMEOUT)
                m.submit(ctx(1900))
                o = out.wait(1)[0]
                stats = json.dumps(m.stats(), default=str)
            finally:
                proc.send_signal(signal.SIGTERM)
                _, err = proc.communicate(timeout=TIMEOUT)
        assert echo.stats()["by_mode"].get("status") == 1  # the server did echo it
    assert (o.status, o.provider) == ("fallback", "local") and "auth" in stats
    assert "401" in err and "Incorrect API key provided: ***" in err
    for text in (err, stats, caplog.text, o.update.text):
        assert_no_fragment(text)


def test_a_base_url_carrying_a_credential_never_reaches_an_adapter_command_line() -> None:
    from dynamic_core.errors import PolicyError

    secret = "AIzaSyD-9tSrke72PouQMnMX"
    with pytest.raises(PolicyError, match="query string") as ei:
        ReasoningMesh(["grok"], spawn=False,
                      profiles={"grok": {"base_url": f"http://127.0.0.1:9/v1?key={secret}", "api_key_env": ""}})
    assert secret not in str(ei.value)
    m = ReasoningMesh([], spawn=False)
    try:
        with pytest.raises(PolicyError, match="query string") as ei:
            m.spawn("grok", base_url=f"http://127.0.0.1:9/v1?key={secret}", api_key_env="")
        with pytest.raises(PolicyError, match="credentials"):
            m.spawn("grok", base_url=f"http://u:{secret}@127.0.0.1:9/v1", api_key_env="")
        assert secret not in str(ei.value) and not m._children  # refused before any process started
    finally:
        m.close()


def test_a_damaged_weights_file_starts_over_and_a_decision_that_cannot_be_saved_stays_queued(
        tmp_path, caplog) -> None:
    from dynamic_core.errors import ReasoningError

    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)  # nested deeper than the JSON decoder recurses
    with caplog.at_level(logging.WARNING, logger="dynamic_core.reasoning.ensemble"):
        m = ReasoningMesh([], spawn=False, weights_path=deep)
    m.close()
    assert m.weights.values == {} and f"{deep} is damaged" in caplog.text
    blocker = tmp_path / "afile"
    blocker.write_text("x")  # the weights' directory is a file: the save fails
    with ReasoningMesh([], spawn=False, weights_path=blocker / "weights.json") as m:
        m.start()
        item = m._call(lambda: m.review_queue.add(signal_id="s", instrument="EURUSD", timeframe=60, provider="grok",
                                                  text="t", reason="conflict", confidence=0.2)).item
        with pytest.raises(ReasoningError, match=f"{blocker / 'weights.json'} cannot be written.*not applied"):
            m.review(item, True)
        assert [it["item"] for it in m.review_list()] == [item]  # still there, to be decided again
        assert m.weights.values == {} and m.stats()["review"]["approved"] == 0
        blocker.unlink()
        assert m.review(item, True)["weight"] == pytest.approx(1.1)  # the retry goes through
        assert m.review_list() == [] and m.stats()["review"]["approved"] == 1
    assert json.loads((blocker / "weights.json").read_text()) == {"grok": pytest.approx(1.1)}


def test_review_offers_no_note_since_nothing_would_keep_it() -> None:
    r = subprocess.run([sys.executable, "-m", "dynamic_core", "review", "--help"], capture_output=True, text=True,
                       timeout=60, env=dict(os.environ, COLUMNS="200"))
    assert r.returncode == 0 and "--note" not in r.stdout and "note" not in r.stdout
    r = subprocess.run([sys.executable, "-m", "dynamic_core", "review", "reject", "tcp://127.0.0.1:5997", "1",
                        "--note", "x", "--server-key", "k", "--client-key", "k"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "unrecognized arguments: --note" in r.stderr


_BAD_CONFIGS = {  # file contents -> what the one error line says (after the file's name)
    'providers = "x"\n': "'providers' must be a table of [providers.NAME] tables, got a TOML str",
    "[providers]\ngrok = 3\n": "'providers.grok' must be a table of profile fields ([providers.grok]), got a TOML int",
    "policy = 5\n": "'policy' must be a table ([policy]), got a TOML int",
    "[provider.grok]\nmodel = \"m\"\n": "unknown key 'provider'",
    "[providers.grok]\nmodel = 5\n": "provider 'grok': Expected `str`, got `int` - at `$.model`",
    "[[policy.rules]]\ncandidates = [\"nosuch\"]\n": "unknown provider 'nosuch'",
    "[providers.grok]\nbase_url = \"http://127.0.0.1:1/v1?key=SUPERSECRET123\"\n": "query string",
    "x = \"unterminated\n": "not valid TOML",
}


def test_reasoning_config_of_the_wrong_shape_or_contents_is_one_error_naming_file_and_key(tmp_path) -> None:
    import argparse

    from dynamic_core.cli_reasoning import check_reasoning_args, reasoning_config

    for i, (text, says) in enumerate(_BAD_CONFIGS.items()):
        path = tmp_path / f"bad{i}.toml"
        path.write_text(text)
        with pytest.raises(ValueError) as ei:
            reasoning_config(path)
        assert str(ei.value).startswith(f"--reasoning-config {path}: ") and says in str(ei.value), str(ei.value)
        assert "SUPERSECRET" not in str(ei.value)
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe\n")
    with pytest.raises(ValueError, match=rf"--reasoning-config {tmp_path / 'bin.toml'}: not valid TOML \(not UTF-8"):
        reasoning_config(tmp_path / "bin.toml")
    with pytest.raises(ValueError, match="cannot be read"):
        reasoning_config(tmp_path / "missing.toml")
    good = tmp_path / "good.toml"
    good.write_text('[policy]\nlast_resort = "local"\n[[policy.rules]]\nrequest_class = "*"\n'
                    'candidates = ["mine", "local"]\n[providers.mine]\nbase_url = "http://127.0.0.1:9/v1"\n'
                    'model = "m"\n')
    policy_tbl, providers = reasoning_config(good)
    assert policy_tbl is not None and policy_tbl["rules"][0]["candidates"] == ["mine", "local"]
    assert providers == {"mine": {"base_url": "http://127.0.0.1:9/v1", "model": "m"}}

    def args(**kw) -> argparse.Namespace:
        return argparse.Namespace(**{"reasoning": "local", "secrets": None, "reasoning_config": None, **kw})

    check_reasoning_args(args(reasoning=None))  # no mesh: nothing to check
    check_reasoning_args(args(reasoning="local,mine", reasoning_config=str(good)))  # a provider the file defines
    with pytest.raises(ValueError, match="--reasoning: unknown provider 'mine'"):
        check_reasoning_args(args(reasoning="local,mine"))
    with pytest.raises(ValueError, match="at least one provider"):
        check_reasoning_args(args(reasoning=" , "))
    with pytest.raises(ValueError, match="'providers' must be a table"):
        check_reasoning_args(args(reasoning_config=str(tmp_path / "bad0.toml")))


@pytest.mark.parametrize("text", ['providers = "x"\n', "[providers]\ngrok = 3\n"], ids=["str", "int"])
def test_cli_run_with_a_reasoning_config_of_the_wrong_shape_exits_2_with_one_error_line(tmp_path, text) -> None:
    path = tmp_path / "mesh.toml"
    path.write_text(text)
    r = subprocess.run([sys.executable, "-m", "dynamic_core", "run", "--agents", "100", "--bars", "10", "-q",
                        "--reasoning", "local", "--reasoning-config", str(path)],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"dynamic-core: error: --reasoning-config {path}: 'providers" in r.stderr
