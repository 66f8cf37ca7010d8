"""The reasoning mesh end to end: a broker thread, adapter processes, real HTTP to a local
OpenAI-compatible server process (tests/openai_server.py), real ZeroMQ.

Every wait is bounded; outcomes are collected through ``on_rationale`` and awaited with a
deadline. Timings are asserted only as upper bounds that the mechanism (not the machine's speed)
guarantees: e.g. a fallback must land before the task's deadline.
"""

from __future__ import annotations

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


def deepseek(fake: FakeOpenAI, **over) -> dict:
    # latency class "fast": adaptive throttling would drop a "standard" provider (prior 4 s) for
    # the short deadlines used here before it has latency samples of its own
    d = {"base_url": fake.url, "api_key_env": KEY_ENV, "timeout_s": 10.0, "max_concurrency": 2,
         "latency_class": "fast"}
    d.update(over)
    return {"deepseek": d}


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

def test_fallback_within_the_deadline_when_the_adapter_process_is_killed_mid_request(fake) -> None:
    fake.script([], default={"mode": "hang", "delay": 60})
    m, out = mesh(fake, deadline_s=4.0)
    with m:
        t0 = time.monotonic()
        m.submit(ctx(3))
        wait_until(lambda: fake.stats()["in_flight"] >= 1)  # the request is at the server
        pid = m.adapters("deepseek")[0]["pid"]
        os.kill(pid, signal.SIGKILL)
        o = out.wait(1, timeout=10)[0]
        took = time.monotonic() - t0
        assert (o.status, o.provider) == ("fallback", "local")
        assert took < 2.5, took  # through heartbeat loss (0.5 s), long before the deadline path (3.9 s)
        st = m.stats()
        assert st["tasks"]["adapter_lost"] >= 1 and st["providers"]["deepseek"]["errors"].get("adapter_lost") == 1
        # the mesh restarts the dead adapter
        wait_until(lambda: any(a["pid"] != pid for a in m.adapters("deepseek")))


def _bad_secrets(tmp_path: Path) -> Path:
    """A secrets file adapters must refuse to read (mode 0644)."""
    f = tmp_path / "secrets.toml"
    f.write_text('DC_TEST_NO_SUCH_KEY = "sk-never-read"\n')
    f.chmod(0o644)
    return f


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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_an_adapter_without_a_broker_drops_stale_heartbeats_and_still_stops_on_a_signal(sig) -> None:
    # no broker: every heartbeat queues until the send queue (100k) is full; a blocking send then
    # never returned, and a signal (whose handler only sets a flag) could not end the process
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    lines: list[str] = []
    with subprocess.Popen([sys.executable, "-m", "dynamic_core", "adapter", "--provider", "local",
                           "--connect", f"tcp://127.0.0.1:{port}", "--heartbeat", "0.000001"],
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


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_adapter_heartbeat_must_be_a_positive_finite_number(value: str) -> None:
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
    m, out = mesh(fake, pol=pol, deadline_s=5.0, backoff_s=0.01)
    with m:
        m.submit(ctx(4))
        o = out.wait(1)[0]
        assert (o.status, o.provider) == ("fallback", "local")
        assert fake.stats()["requests"] == 4  # 1 + max_retries
        assert m.stats()["providers"]["deepseek"]["errors"] == {kind: 4}


def test_rate_limited_waits_for_retry_after_then_succeeds(fake) -> None:
    fake.script([{"mode": "status", "status": 429, "retry_after": 1}])
    m, out = mesh(fake, deadline_s=5.0)
    with m:
        t0 = time.monotonic()
        m.submit(ctx(5))
        o = out.wait(1)[0]
        assert (o.status, o.provider) == ("ok", "deepseek")
        assert time.monotonic() - t0 >= 0.9  # honoured Retry-After: 1
        assert m.stats()["providers"]["deepseek"]["errors"] == {"rate_limited": 1}


def test_slow_provider_times_out_and_the_narrator_answers_before_the_deadline(fake) -> None:
    fake.script([], default={"mode": "slow", "delay": 5.0})
    m, out = mesh(fake, deadline_s=2.0)
    with m:
        t0 = time.monotonic()
        m.submit(ctx(6))
        o = out.wait(1)[0]
        assert (o.status, o.provider) == ("fallback", "local")
        assert time.monotonic() - t0 < 2.0


def test_breaker_opens_then_half_open_probe_closes_it(fake) -> None:
    fake.script([{"mode": "status", "status": 500, "times": 4}])
    pol = policy("deepseek", "local")
    pol["breaker"] = {"failure_pct": 50.0, "min_requests": 4, "window_s": 60.0, "open_s": 1.0}
    pol["cooldown_failures"] = 100
    m, out = mesh(fake, pol=pol, max_retries=0, deadline_s=3.0)
    with m:
        for i in range(4):
            m.submit(ctx(100 + i))
            out.wait(i + 1)
        assert m.stats()["providers"]["deepseek"]["breaker"] == "open"
        m.submit(ctx(110))  # open: not even tried
        assert out.wait(5)[4].status == "local" and fake.stats()["requests"] == 4
        time.sleep(1.1)  # open_s passes: one probe is let through, succeeds, closes the breaker
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
    fake.script([{"mode": "status", "status": 500, "times": 2}], default={"mode": "slow", "delay": 0.3})
    pol = policy("deepseek", "local")
    pol["breaker"] = {"failure_pct": 50.0, "min_requests": 2, "window_s": 60.0, "open_s": 0.5,
                      "half_open_probes": 1}
    pol["cooldown_failures"] = 100
    m, out = mesh(fake, pol=pol, max_retries=0, deadline_s=5.0)
    with m:
        for i in range(2):
            m.submit(ctx(120 + i))
            out.wait(i + 1)
        assert m.stats()["providers"]["deepseek"]["breaker"] == "open"
        time.sleep(0.6)
        for i in range(5):  # a burst while half-open: one probe, the rest to the narrator
            m.submit(ctx(130 + i))
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


def test_priorities_are_respected_under_load(fake) -> None:
    fake.script([], default={"mode": "slow", "delay": 0.1})
    m, out = mesh(fake, prof=deepseek(fake, max_concurrency=1), deadline_s=30.0)
    with m:
        m.submit(ctx(400), priority="low")  # takes the only slot
        wait_until(lambda: fake.stats()["in_flight"] >= 1)
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
                       profiles=deepseek(fake)) as m:
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


def test_review_over_the_control_plane_with_the_cli(fake, tmp_path) -> None:
    T.new_keypair(tmp_path, "server")
    T.new_keypair(tmp_path / "clients", "ops")
    fake.script([], default={"mode": "normal", "direction": "sell"})  # argues against a BUY signal
    m, out = mesh(fake, weights_path=tmp_path / "w.json")
    pop = dc.Population.random(64, instruments=["EURUSD"], timeframes=[3600], seed=1)
    with m, dc.Engine(pop, threads=1) as eng:
        control = T.ControlServer(secret_key=tmp_path / "server.key_secret", authorized_keys=tmp_path / "clients")
        svc = T.EngineService(eng, control=control, mesh=m, on_signals=lambda s: None)
        with svc:
            svc.start()
            m.submit(ctx(1000, action=1))
            assert out.wait(1)[0].provider == "deepseek"
            keys = ["--server-key", str(tmp_path / "server.key"), "--client-key",
                    str(tmp_path / "clients" / "ops.key_secret")]

            def cli(*args: str) -> subprocess.CompletedProcess:
                return subprocess.run([sys.executable, "-m", "dynamic_core", "review", *args, *keys],
                                      capture_output=True, text=True, timeout=60)

            r = cli("list", control.endpoint, "--json")
            assert r.returncode == 0, r.stderr
            items = json.loads(r.stdout)["items"]
            assert [(it["reason"], it["provider"]) for it in items] == [("disagrees", "deepseek")]
            r = cli("reject", control.endpoint, str(items[0]["item"]), "--note", "wrong way round")
            assert r.returncode == 0 and json.loads(r.stdout)["weight"] == pytest.approx(0.8)
            r = cli("approve", control.endpoint, str(items[0]["item"]))  # already decided
            assert r.returncode == 1 and "no review item" in r.stderr
            r = cli("list", control.endpoint)
            assert r.returncode == 0 and "review queue is empty" in r.stdout
    assert json.loads((tmp_path / "w.json").read_text()) == {"deepseek": pytest.approx(0.8)}


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
            svc.start()
            assert feed.wait_for_subscribers(1, timeout=TIMEOUT)
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


# ---- CLI ----------------------------------------------------------------------------------------

def test_cli_run_with_local_reasoning_prints_rationales_and_mesh_telemetry() -> None:
    env = dict(os.environ, COLUMNS="200", OPENBLAS_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "dynamic_core", "run", "--agents", "512", "--bars", "300",
                        "--instruments", "2", "--no-live", "--reasoning", "local"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "latest rationale" in r.stdout and "local: EURUSD H1" in r.stdout
    assert "Reasoning mesh" in r.stdout and "Rationales:" in r.stdout


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
