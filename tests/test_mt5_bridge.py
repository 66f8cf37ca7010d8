"""The MetaTrader 5 bridge over real ZeroMQ sockets and threads: MT5Bridge (engine side),
SimulatedTerminal (the EA's reference behaviour, paper broker behind it) and FaultProxy.

Timings are short (50 ms heartbeats) and every wait is on a condition with a deadline; no
assertion depends on a fixed sleep. The exactly-once oracle is the paper broker's own fill
list: every order must appear there exactly once, whatever the network did.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
import typing
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest
import zmq
from dynamic_core.bridges.mt5 import (
    MAX_FRAME,
    FaultProxy,
    Faults,
    MT5Bridge,
    MT5Codec,
    SimulatedTerminal,
    client_order_id_for,
)
from dynamic_core.bridges.mt5 import protocol as PR
from dynamic_core.bridges.mt5._util import SeqTracker
from dynamic_core.bridges.paper import Order as PaperOrder
from dynamic_core.errors import PayloadError
from dynamic_core.payloads import TradingPlan

HB = 0.05
# for tests that count sends exactly: no re-send while the ack is merely slow on a loaded machine
# for tests that count sends, acks or resends exactly: no resend timer, and a liveness window
# (0.5 s x 20) no stall of a loaded machine reaches (safe mode re-sends every open order on leaving)
NO_RESEND = {"resend_timeout": 3.0, "resend_max_delay": 3.0, "heartbeat": 0.5, "missed": 20}
TIMEOUT = 15.0  # generous bound on any single wait; never reached when things work
DOC = Path(__file__).resolve().parent.parent / "docs" / "mt5-bridge.md"


def wait_for(pred: Callable[[], object], timeout: float = TIMEOUT, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


PRICE = {"EURUSD": 1.1, "GBPUSD": 1.25}


def plan(i: int | str, *, valid_s: float = 60.0, direction: int = 1, size: float = 0.1,
         instrument: str = "EURUSD") -> TradingPlan:
    now = time.time_ns()
    px = PRICE[instrument]
    return TradingPlan(plan_id=f"plan-{i}", signal_id=f"sig-{i}", instrument=instrument, timeframe=3600, ts=now,
                       seq=len(str(i)), direction=direction, action=direction, entry=px,
                       stop=round(px - 0.01 * direction, 5), targets=(round(px + 0.02 * direction, 5),),
                       size=size, valid_until=now + int(valid_s * 1e9))


@pytest.fixture()
def make() -> Iterator[Callable[..., typing.Any]]:
    """Factory of bridges, terminals and proxies, all closed at the end (terminals first)."""
    made: list[typing.Any] = []

    def factory(kind: str, *args: typing.Any, **kw: typing.Any) -> typing.Any:
        if kind == "bridge":
            opts = {"heartbeat": HB, "missed": 3, "resend_timeout": 0.03, "resend_max_delay": 0.2}
            opts.update(kw)
            obj = MT5Bridge(*(args or ("tcp://127.0.0.1:*",)), **opts)
        elif kind == "terminal":
            obj = SimulatedTerminal(*args, **{"heartbeat": HB, **kw})
            for name, px in PRICE.items():
                obj.set_price(name, px)
        else:
            obj = FaultProxy(*args, **kw)
        made.append(obj)
        return obj

    yield factory
    for obj in sorted(made, key=lambda o: not isinstance(o, SimulatedTerminal)):
        obj.close()


def live(bridge: MT5Bridge) -> None:
    wait_for(lambda: bridge.link == "live", what="a live session")


# ---- protocol --------------------------------------------------------------------------------------

STAMP = {"v": 1, "epoch": 2**63 - 1, "seq": 1, "ts": 1_717_000_000_000}
SAMPLES = [
    PR.EngineHello(**STAMP, peer_epoch=5, heartbeat_ms=1000, missed=3, magic=556001),
    PR.Order(**STAMP, client_order_id="dcabc", symbol="EURUSD", side="buy", order_type="limit", volume=0.1,
             price=1.1, sl=1.09, tp=1.12, valid_until=1_717_000_060_000, plan_id="p", magic=1, comment="dcabc",
             attempt=0),
    PR.Cancel(**STAMP, client_order_id="dcabc", reason="requested"),
    PR.Heartbeat(**STAMP, recv_seq=7),
    PR.PositionsQuery(**STAMP, query_id=1, magic=0),
    PR.Flatten(**STAMP, query_id=2, magic=1, reason="safe_mode"),
    PR.Error(**STAMP, reason="malformed", detail="x", ref_seq=0),
    PR.TerminalHello(**STAMP, login=51234567, server="Broker-Demo", resumed=False, peer_epoch=0, build="EA 1.0"),
    PR.Ack(**STAMP, client_order_id="dcabc", order_seq=7, accepted=True, reason="", duplicate=False, ticket=90001),
    PR.ExecReport(**STAMP, client_order_id="dcabc", status="filled", symbol="EURUSD", side="sell", ticket=9,
                  price=1.1, volume=0.1, commission=-0.7, fill_ts=1_717_000_000_001, reason=""),
    PR.Position(**STAMP, query_id=1, snapshot=3, index=1, symbol="EURUSD", ticket=9, side="buy", volume=0.1,
                price_open=1.1, sl=0.0, tp=0.0, magic=1, comment="dcabc", client_order_id="dcabc", profit=-2.5),
    PR.PositionsEnd(**STAMP, query_id=1, snapshot=3, count=1),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_codec_round_trip(msg: typing.Any) -> None:
    union = PR.EngineMessage if type(msg) in typing.get_args(PR.EngineMessage) else PR.TerminalMessage
    codec = MT5Codec(union)
    raw = codec.encode(msg)
    assert raw.startswith(b'{"type":')
    assert codec.decode(raw) == msg
    # flat: every value is a scalar, so a small MQL5 JSON parser reads it
    obj = json.loads(raw)
    assert all(isinstance(v, (str, int, float, bool)) for v in obj.values())
    # key order does not matter, integer literals do for floats
    shuffled = json.dumps(dict(reversed(list(obj.items())))).encode()
    assert codec.decode(shuffled) == msg


def test_every_message_type_is_flat_and_documented() -> None:
    doc = DOC.read_text()
    for union in (PR.EngineMessage, PR.TerminalMessage):
        for cls in typing.get_args(union):
            info = msgspec.inspect.type_info(cls)
            assert f"`{info.tag}`" in doc, info.tag
            for f in info.fields:
                t = f.type
                assert isinstance(t, (msgspec.inspect.StrType, msgspec.inspect.IntType, msgspec.inspect.FloatType,
                                      msgspec.inspect.BoolType, msgspec.inspect.LiteralType)), (cls, f.name, t)
                assert f.required, (cls, f.name)  # fixed schema: every field always present
                assert f"`{f.name}`" in doc, (cls.__name__, f.name)


def _reason(codec: MT5Codec, raw: bytes) -> str:
    with pytest.raises(PayloadError) as e:
        codec.decode(raw)
    return e.value.reason


def test_codec_rejects() -> None:
    codec = MT5Codec(PR.TerminalMessage)
    ok = json.loads(codec.encode(SAMPLES[3]))
    assert _reason(codec, json.dumps({**ok, "extra": 1}).encode()) == "unknown_field"
    assert _reason(codec, json.dumps({**ok, "type": "nope"}).encode()) == "unknown_tag"
    assert _reason(codec, json.dumps({k: v for k, v in ok.items() if k != "type"}).encode()) == "unknown_tag"
    assert _reason(codec, json.dumps({**ok, "v": 2}).encode()) == "version"
    assert _reason(codec, json.dumps({**ok, "v": 0}).encode()) == "version"
    assert _reason(codec, json.dumps({k: v for k, v in ok.items() if k != "recv_seq"}).encode()) == "invalid"
    assert _reason(codec, json.dumps({**ok, "recv_seq": {"nested": 1}}).encode()) == "invalid"
    assert _reason(codec, json.dumps({**ok, "epoch": 0}).encode()) == "invalid"
    assert _reason(codec, json.dumps({**ok, "epoch": 2**63}).encode()) == "invalid"
    assert _reason(codec, b"[1, 2]") == "invalid"
    assert _reason(codec, b"\x00\xffgarbage") == "malformed"
    assert _reason(codec, b'{"type": "heartbeat", "v": 1') == "truncated"
    assert _reason(codec, b"{" + b" " * MAX_FRAME + b"}") == "oversized"
    # an engine-only message is not something the engine decodes: unexpected (section 2.3)
    assert _reason(codec, MT5Codec(PR.EngineMessage).encode(SAMPLES[1])) == "unexpected"
    bad_side = json.loads(codec.encode(SAMPLES[9]))
    assert _reason(codec, json.dumps({**bad_side, "status": "done"}).encode()) == "invalid"
    assert codec.rejects == {"unknown_field": 1, "unknown_tag": 2, "unexpected": 1, "version": 2, "invalid": 6,
                             "malformed": 1, "truncated": 1, "oversized": 1}
    # what can still be read of a refused frame: its seq (ref_seq) and type
    for raw, seq, typ in ((json.dumps({**ok, "v": 2, "seq": 17}), 17, "heartbeat"),
                          (json.dumps({**ok, "seq": 5, "extra": 1}), 5, "heartbeat"),
                          (json.dumps({**ok, "seq": "x"}), 0, ""), (json.dumps({**ok, "seq": 2**64}), 0, "heartbeat"),
                          ('{"type": "error", "seq": 3}', 3, "error"), ("[1]", 0, "")):
        with pytest.raises(PayloadError) as e:
            codec.decode(raw.encode())
        assert (e.value.ref_seq, e.value.msg_type) == (seq, typ), raw
    with pytest.raises(ValueError):  # PayloadError is a ValueError
        codec.decode(b"nope")


def test_client_order_id_for() -> None:
    a = client_order_id_for("plan-1")
    assert a == client_order_id_for("plan-1")  # deterministic
    assert a != client_order_id_for("plan-2") and a != client_order_id_for("plan-1", attempt=1)
    assert len(a) <= PR.MAX_ID <= 24 and re.fullmatch(r"[A-Za-z0-9_.:-]+", a)
    assert len({client_order_id_for(f"p{i}") for i in range(20000)}) == 20000
    assert len(client_order_id_for("x" * 10_000)) == len(a)
    with pytest.raises(ValueError):
        client_order_id_for("p", attempt=-1)


def test_seq_tracker() -> None:
    s = SeqTracker()
    assert [s.check(x) for x in (5, 6, 9, 7, 7, 9, 8, 10)] == [
        "first", "ok", "gap", "reordered", "duplicate", "duplicate", "reordered", "ok"]
    assert (s.gaps, s.reordered, s.duplicates) == (2, 2, 2)
    w = SeqTracker.WINDOW
    assert [s.check(x) for x in (10 + w - 1, 11, 11)] == ["gap", "reordered", "duplicate"]  # the window's edge
    # a window or more away, ahead or behind: processed, and the window restarts there
    hi = 10 + w - 1
    assert s.check(hi + 5 * w) == "jump" and (s.jumps, s.hi) == (1, hi + 5 * w)
    assert [s.check(x) for x in (hi + 1, hi + 2, hi + 2)] == ["jump", "ok", "duplicate"]  # back with the true numbers
    assert s.check(2**63 - 2) == "jump" and s.check(hi + 3) == "jump" and s.jumps == 4
    assert s.gaps == 2 + w - 2  # jumps count no gap


def test_one_bad_sequence_number_does_not_poison_the_session(raw_live: tuple[MT5Bridge, _RawEA]) -> None:
    bridge, ea = raw_live
    coid = bridge.submit_order(symbol="EURUSD", side="buy", volume=0.1, valid_until=PR.now_ms() + 60_000)
    o = ea.recv(PR.Order)
    seq = ea.seq
    ea.seq = 2**63 - 3
    ea.send("heartbeat", recv_seq=0)
    ea.seq = seq
    ea.send("ack", client_order_id=coid, order_seq=o.seq, accepted=True, reason="", duplicate=False, ticket=1)
    ea.send("exec_report", client_order_id=coid, status="filled", symbol="EURUSD", side="buy", ticket=1,
            price=1.1, volume=0.1, commission=0.0, fill_ts=PR.now_ms(), reason="")
    assert bridge.wait(coid) == "filled"
    st = bridge.stats()
    assert st["seq_jumps"] == 2 and st["gaps"] < 10 and st["link"] == "live"  # away and back


@pytest.mark.parametrize("ahead", [2 * SeqTracker.WINDOW, 5000, 1 << 20])
def test_a_bad_sequence_number_a_little_ahead_does_not_lock_the_terminal_out(
        raw_live: tuple[MT5Bridge, _RawEA], ahead: int) -> None:
    # one number between the window and a million ahead used to move the highest seq there, and
    # every later message of the EA (acks, reports, heartbeats, hello) was dropped as too old
    bridge, ea = raw_live
    coid = bridge.submit_order(symbol="EURUSD", side="buy", volume=0.1, valid_until=PR.now_ms() + 60_000)
    o = ea.recv(PR.Order)
    good = ea.seq
    ea.seq = good + ahead - 1
    ea.send("heartbeat", recv_seq=0)
    ea.seq = good  # the EA carries on with its true numbering
    ea.send("ack", client_order_id=coid, order_seq=o.seq, accepted=True, reason="", duplicate=False, ticket=1)
    ea.send("exec_report", client_order_id=coid, status="filled", symbol="EURUSD", side="buy", ticket=1,
            price=1.1, volume=0.1, commission=0.0, fill_ts=PR.now_ms(), reason="")
    assert bridge.wait(coid, timeout=5.0) == "filled"
    st = bridge.stats()
    assert (st["seq_jumps"], st["duplicates"], st["acks"], st["exec_reports"]) == (2, 0, 1, 1)
    assert st["link"] == "live" and st["gaps"] == 0


# ---- round trips -------------------------------------------------------------------------------------

def test_order_ack_exec_report_position(make: Callable[..., typing.Any]) -> None:
    bridge = make("bridge", **NO_RESEND)  # exactly one send and one ack are asserted
    reports: list[typing.Any] = []
    acks: list[tuple[str, bool, str]] = []
    bridge.on_report(reports.append)
    bridge.on_ack(lambda *a: acks.append(a))
    term = make("terminal", bridge.address)
    live(bridge)
    p = plan("rt")
    coid = bridge.submit_plan(p)
    assert coid == client_order_id_for(p.plan_id)
    assert bridge.wait(coid) == "filled"
    o = bridge.order(coid)
    assert o["sends"] == 1 and o["acks"] == 1 and o["filled_volume"] == pytest.approx(0.1)
    assert o["fill_price"] == pytest.approx(1.1) and o["ticket"] > 0 and o["sl"] == 1.09 and o["tp"] == 1.12
    assert acks == [(coid, True, "")]
    assert [(r.client_order_id, r.status, r.source, r.plan_id) for r in reports] == [
        (coid, "filled", "terminal", p.plan_id)]
    # the position is at the terminal, under the order's id, with its stop and target
    assert term.positions() == {coid: {"symbol": "EURUSD", "side": "buy", "volume": pytest.approx(0.1),
                                       "price": pytest.approx(1.1), "ticket": o["ticket"]}}
    assert term.broker.positions()["EURUSD"].legs[0].stop_loss == 1.09
    assert term.executions() == {coid: 1}
    # submitting the same plan again sends nothing
    assert bridge.submit_plan(p) == coid
    st = bridge.stats()
    assert st["idempotent"] == 1 and st["sent"] == 1 and st["resends"] == 0
    assert bridge.positions() == {coid: {"symbol": "EURUSD", "side": "buy", "volume": pytest.approx(0.1),
                                         "price": pytest.approx(1.1), "ticket": o["ticket"]}}
    assert term.order_messages == {coid: 1}
    # heartbeats flow both ways
    hb = bridge.stats()["heartbeats_sent"]
    wait_for(lambda: bridge.stats()["heartbeats_sent"] > hb + 2 and term.stats()["heartbeats_sent"] > 2)
    assert bridge.link == "live"


def test_limit_order_rests_fills_on_a_bar_and_cancel(make: Callable[..., typing.Any]) -> None:
    bridge = make("bridge")
    reports: list[typing.Any] = []
    bridge.on_report(reports.append)
    term = make("terminal", bridge.address)
    live(bridge)
    valid = int(time.time() * 1000) + 60_000
    lim = bridge.submit_order(symbol="EURUSD", side="buy", order_type="limit", price=1.095, volume=0.2,
                              sl=1.09, tp=1.12, valid_until=valid, plan_id="limit-1")
    other = bridge.submit_order(symbol="EURUSD", side="buy", order_type="limit", price=1.05, volume=0.1,
                                valid_until=valid, plan_id="limit-2")
    assert bridge.wait(lim, "placed") == "placed" and bridge.wait(other, "placed") == "placed"
    assert term.executions() == {}
    t = time.time_ns()
    term.on_bar("EURUSD", t, 1.1, 1.101, 1.094, 1.097)  # reaches 1.095, not 1.05
    assert bridge.wait(lim) == "filled"
    assert bridge.order(lim)["fill_price"] == pytest.approx(1.095)
    assert bridge.cancel(other)
    assert bridge.wait(other) == "cancelled"
    assert not bridge.cancel(other)  # final now
    assert term.executions() == {lim: 1}
    assert [r.status for r in reports if r.client_order_id == lim] == ["placed", "filled"]
    assert [r.status for r in reports if r.client_order_id == other] == ["placed", "cancelled"]
    with pytest.raises(ValueError):
        bridge.submit_order(symbol="EURUSD", side="long", volume=0.1, valid_until=valid)
    with pytest.raises(ValueError):
        bridge.submit_order(symbol="EURUSD", side="buy", order_type="limit", volume=0.1, valid_until=valid)


def test_broker_rejection_is_reported(make: Callable[..., typing.Any]) -> None:
    bridge = make("bridge")
    make("terminal", bridge.address)
    live(bridge)
    bad = bridge.submit_plan(plan("odd-lots", size=0.123))  # not a multiple of the lot step
    assert bridge.wait(bad) == "rejected"
    assert bridge.order(bad)["reason"] == "bad_size"


# ---- faults ------------------------------------------------------------------------------------------

def test_exactly_once_through_drops_duplicates_delays_and_reorders(make: Callable[..., typing.Any]) -> None:
    bridge = make("bridge", missed=4, max_sends=100)
    faults = Faults(drop=0.2, duplicate=0.2, delay=0.3, reorder=0.2, delay_ms=(1.0, 30.0))
    proxy = make("proxy", bridge.address, to_bridge=faults, to_terminal=faults, seed=7)
    term = make("terminal", proxy.address)
    live(bridge)
    coids = []
    for i in range(80):
        coids.append(bridge.submit_plan(plan(f"fault-{i}", size=0.01,
                                             instrument="EURUSD" if i % 2 else "GBPUSD")))
        if i % 10 == 0:
            bridge.submit_plan(plan(f"fault-{i}", size=0.01))  # idempotent resubmission
    wait_for(lambda: all(o["state"] == "filled" for o in bridge.orders().values()), what="every order filled")
    # every order executed exactly once at the terminal's broker, nothing else executed
    assert term.executions() == dict.fromkeys(coids, 1)
    assert len(term.broker.fills) == 80
    st, ps, ts = bridge.stats(), proxy.stats(), term.stats()
    # the faults really happened, and the protocol worked through them
    assert ps["to_terminal_dropped"] > 0 and ps["to_bridge_dropped"] > 0
    assert ps["to_terminal_duplicated"] > 0 and ps["to_bridge_reordered"] > 0 and ps["to_terminal_reordered"] > 0
    assert st["resends"] + st["status_requests"] > 0 and ts["duplicate_orders"] > 0
    assert st["duplicates"] > 0 and st["gaps"] > 0
    assert st["sent"] == 80 and st["idempotent"] == 8
    # the bridge's view equals the terminal's positions
    wait_for(lambda: bridge.link == "live")
    assert {k: round(v["volume"], 6) for k, v in bridge.positions().items()} == \
           {k: round(v["volume"], 6) for k, v in term.positions().items()}


def test_stale_orders_expire(make: Callable[..., typing.Any]) -> None:
    bridge = make("bridge")
    reports: list[typing.Any] = []
    bridge.on_report(reports.append)
    # (1) queued while no terminal is there, expires before it can be sent
    q = bridge.submit_plan(plan("stale-queued", valid_s=0.15))
    assert bridge.wait(q) == "expired"
    assert bridge.order(q)["reason"] == "expired_before_send" and bridge.order(q)["sends"] == 0
    # (2) already expired when submitted to a live bridge
    proxy = make("proxy", bridge.address)
    term = make("terminal", proxy.address)
    live(bridge)
    past = bridge.submit_plan(plan("stale-past", valid_s=-1.0))
    assert bridge.wait(past) == "expired" and bridge.order(past)["reason"] == "expired_before_send"
    # (3) valid when sent, expired when it reaches the EA (the link is slow): the EA refuses it.
    # Every copy reaches the EA 3 s after it left, so at least 0.5 s after valid_until whenever
    # it was sent; the bridge has 2.5 s (not 150 ms, less than a loaded machine may stop this
    # process for) to send it before it expires unsent
    proxy.set_faults(to_terminal=Faults(delay=1.0, delay_ms=(3000.0, 3000.0)))
    slow = bridge.submit_order(symbol="EURUSD", side="buy", volume=0.1, plan_id="stale-slow",
                               valid_until=int(time.time() * 1000) + 2500)
    wait_for(lambda: term.order_status(slow) == "expired", what="the EA refusing the stale order")
    proxy.set_faults(to_terminal=Faults())
    wait_for(lambda: bridge.order(slow)["state"] == "expired" and bridge.order(slow)["open"] is False)
    assert bridge.order(slow)["reason"] in ("expired", "expired_unacked")
    # none of them was ever executed, and each was reported expired once
    assert term.executions() == {}
    assert term.stats()["broker_submits"] == 0 and term.stats()["expired_refused"] == 1
    assert past not in term.order_messages and q not in term.order_messages
    for c in (q, past, slow):
        assert [r.status for r in reports if r.client_order_id == c] == ["expired"]
    # the link still works
    ok = bridge.submit_plan(plan("after-stale"))
    assert bridge.wait(ok) == "filled"


# ---- restarts and reconciliation ---------------------------------------------------------------------

def test_terminal_restart_reconciles_without_resending(make: Callable[..., typing.Any]) -> None:
    bridge = make("bridge", missed=3)
    proxy = make("proxy", bridge.address)
    term = make("terminal", proxy.address)
    live(bridge)
    done = bridge.submit_plan(plan("before"))
    assert bridge.wait(done) == "filled"
    # a position the bridge never ordered (opened by hand at the terminal)
    with term._lock:
        term.broker.submit(PaperOrder(client_order_id="manual-1", instrument="GBPUSD", side=-1, lots=0.3))
    # the EA executes an order, but nothing it says reaches the engine any more
    proxy.set_faults(to_bridge=Faults(drop=1.0))
    lost = bridge.submit_plan(plan("executed-unheard"))
    wait_for(lambda: term.executions().get(lost) == 1, what="the EA executing the order")
    wait_for(lambda: bridge.safe_mode, what="safe mode")
    assert bridge.order(lost)["state"] == "sent"
    # the terminal restarts (new epoch) and the link heals
    term.kill()
    later = bridge.submit_plan(plan("while-down"))
    assert bridge.order(later)["state"] == "queued"
    seen = dict(term.order_messages)
    proxy.set_faults(to_bridge=Faults())
    old_epoch = term.epoch
    term.restart()
    assert term.epoch != old_epoch
    assert bridge.wait(lost) == "filled" and bridge.wait(later) == "filled"
    wait_for(lambda: bridge.link == "live")
    o = bridge.order(lost)
    assert o["reason"] == "reconciled" and o["filled_volume"] == pytest.approx(0.1)
    # executed orders were not sent again after the reconciliation; every order executed once
    assert term.order_messages.get(lost, 0) == seen.get(lost, 0)
    assert term.order_messages.get(done) == seen.get(done) >= 1  # (a slow ack may have caused a re-send before)
    assert term.executions() == {done: 1, lost: 1, later: 1, "manual-1": 1}
    rec = bridge.reconciliation()
    assert rec["reconciled"] == [lost] and rec["matched"] == [done]
    assert [(u["client_order_id"], u["symbol"], u["side"], u["volume"]) for u in rec["unknown"]] == [
        ("", "GBPUSD", "sell", pytest.approx(0.3))]
    st = bridge.stats()
    assert st["sessions"] == 2 and st["reconciled_fills"] == 1 and st["unknown_positions"] == 1
    # the bridge's view equals the terminal's positions (those the bridge ordered)
    mine = {k: v for k, v in term.positions().items() if k != "manual-1"}
    assert {k: (v["symbol"], v["side"], round(v["volume"], 6)) for k, v in bridge.positions().items()} == \
           {k: (v["symbol"], v["side"], round(v["volume"], 6)) for k, v in mine.items()}


def test_engine_restart_adopts_executed_orders(make: Callable[..., typing.Any]) -> None:
    first = make("bridge")
    address = first.address
    term = make("terminal", address)
    live(first)
    p = plan("engine-restart")
    coid = first.submit_plan(p)
    assert first.wait(coid) == "filled"
    first.close()
    second = make("bridge", address)  # same address, new epoch, no memory of the order
    assert second.epoch != first.epoch
    live(second)  # the EA's next message makes the new engine ask for a hello
    wait_for(lambda: second.reconciliation().get("unknown"), what="the unknown position")
    assert second.stats()["terminal"]["resumed"] is True
    # the strategy submits the same plan again: the order is recognised, not placed twice
    assert second.submit_plan(p) == coid
    assert second.wait(coid) == "filled"
    assert second.order(coid)["reason"] == "reconciled" and second.order(coid)["sends"] == 0
    assert term.executions() == {coid: 1}


def test_ea_deduplicates_an_order_it_executed_and_closed(make: Callable[..., typing.Any]) -> None:
    # exact send and duplicate counts are asserted: with the suite's 30 ms resend timeout a loaded
    # machine re-sent the order before its ack came (the EA answered that copy as a duplicate too)
    first = make("bridge", **NO_RESEND)
    address = first.address
    term = make("terminal", address)
    live(first)
    p = plan("dedupe")
    coid = first.submit_plan(p)
    assert first.wait(coid) == "filled"
    term.on_bar("EURUSD", time.time_ns(), 1.1, 1.1, 1.08, 1.085)  # the stop closes the position
    assert term.positions() == {}
    first.close()
    # a new engine without memory of the order, and no position to find: it sends the order
    # again, and the EA answers with the first outcome instead of placing it a second time
    second = make("bridge", address, **NO_RESEND)
    live(second)
    assert second.submit_plan(p) == coid
    assert second.wait(coid) == "filled"
    o = second.order(coid)
    assert o["sends"] == 1 and o["filled_volume"] == pytest.approx(0.1) and o["fill_price"] == pytest.approx(1.1)
    assert second.stats()["duplicate_acks"] == 1
    assert term.executions() == {coid: 1} and term.stats()["duplicate_orders"] == 1


# ---- safe mode -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["queue", "refuse"])
def test_safe_mode_after_missed_heartbeats(make: Callable[..., typing.Any], policy: str) -> None:
    bridge = make("bridge", missed=3, safe_mode=policy)
    reports: list[typing.Any] = []
    bridge.on_report(reports.append)
    term = make("terminal", bridge.address)
    live(bridge)
    first = bridge.submit_plan(plan(f"safe-{policy}-1"))
    assert bridge.wait(first) == "filled"
    term.kill()
    wait_for(lambda: bridge.safe_mode, what="safe mode")
    st = bridge.stats()
    # entered after `missed` silent intervals, not before, and promptly after
    assert 3 * HB <= st["silence_at_safe_mode_s"] <= 3 * HB + 3.0  # (slack for a loaded machine)
    assert st["safe_mode_entries"] == 1 and st["link"] == "safe"
    held = bridge.submit_plan(plan(f"safe-{policy}-2"))
    if policy == "queue":
        wait_for(lambda: bridge.stats()["queued"] == 1)
        assert bridge.order(held)["state"] == "queued"
    else:
        assert bridge.wait(held) == "refused"
        assert bridge.order(held)["reason"] == "safe_mode"
        assert [r.status for r in reports if r.client_order_id == held] == ["rejected"]
    term.restart()
    wait_for(lambda: bridge.link == "live", what="leaving safe mode")
    assert not bridge.safe_mode and bridge.stats()["reconciliations"] == 2
    if policy == "refuse":  # a refused plan may be submitted again once the link is back
        assert bridge.submit_plan(plan(f"safe-{policy}-2")) == held
    assert bridge.wait(held) == "filled"
    assert term.executions() == {first: 1, held: 1}


def test_flatten_on_safe_mode(make: Callable[..., typing.Any]) -> None:
    bridge = make("bridge", flatten_on_safe_mode=True)
    term = make("terminal", bridge.address)
    live(bridge)
    a = bridge.submit_plan(plan("flat-a"))
    b = bridge.submit_plan(plan("flat-b", direction=-1, instrument="GBPUSD"))
    assert bridge.wait(a) == "filled" and bridge.wait(b) == "filled"
    assert set(term.positions()) == {a, b}
    term.kill()
    wait_for(lambda: bridge.safe_mode, what="safe mode")
    after = bridge.submit_plan(plan("flat-after"))  # queued, sent after the flatten
    term.restart()
    wait_for(lambda: bridge.link == "live", what="leaving safe mode")
    assert term.stats()["flattens"] >= 1
    assert bridge.wait(after) == "filled"
    rec = bridge.reconciliation()
    assert rec["flatten"] is True and rec["positions"] == 0 and set(rec["closed"]) == {a, b}
    assert set(term.positions()) == {after}
    assert set(bridge.positions()) == {after}
    assert term.executions() == {a: 1, b: 1, after: 1}


# ---- malformed input -----------------------------------------------------------------------------------

def test_malformed_terminal_messages_are_counted_and_answered(make: Callable[..., typing.Any]) -> None:
    bridge = make("bridge")
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.setsockopt(zmq.RCVTIMEO, int(TIMEOUT * 1000))
    raw.connect(bridge.address)
    dec = MT5Codec(PR.EngineMessage)
    stamp = {"v": 1, "epoch": 12345, "seq": 1, "ts": 1}
    hb = {"type": "heartbeat", **stamp, "recv_seq": 0}
    cases = [
        ([b"\x00\x01 not json at all \xff"], "malformed"),
        ([json.dumps({"type": "heartbeat", **stamp}).encode()], "invalid"),              # missing field
        ([json.dumps({**hb, "bogus": 1}).encode()], "unknown_field"),
        ([json.dumps({**hb, "type": "launch_missiles"}).encode()], "unknown_tag"),
        ([json.dumps({**hb, "v": 9}).encode()], "version"),
        ([b'{"type":"heartbeat","pad":"' + b"x" * (MAX_FRAME + 10) + b'"}'], "oversized"),
        ([json.dumps(json.loads(MT5Codec(PR.EngineMessage).encode(SAMPLES[1]))).encode()], "unexpected"),
        ([b"{}", b"{}"], "invalid"),                                                      # two frames
    ]
    try:
        for frames, reason in cases:
            raw.send_multipart(frames)
            err = dec.decode(raw.recv())
            assert type(err) is PR.Error and err.reason == reason, (reason, err)
            # ref_seq: the offending message's seq when it could be read (section 2.3)
            readable = reason not in ("malformed", "oversized") and len(frames) == 1
            assert err.ref_seq == (1 if readable else 0), (reason, err)
        # an error that does not decode is counted, never answered with an error
        raw.send(json.dumps({"type": "error", **stamp, "reason": "x" * 100, "detail": "", "ref_seq": 0}).encode())
        # a valid message from a terminal epoch without a session is not acted on: say hello first
        raw.send(json.dumps(hb).encode())
        hello = dec.decode(raw.recv())
        assert type(hello) is PR.EngineHello and hello.peer_epoch == 0
    finally:
        raw.close(0)
        ctx.term()
    st = bridge.stats()
    assert st["rejected"] == len(cases) + 1 and st["errors_sent"] == len(cases)
    assert st["rejects"] == {"malformed": 1, "invalid": 3, "unknown_field": 1, "unknown_tag": 1, "unexpected": 1,
                             "version": 1, "oversized": 1}
    assert st["unknown_epoch"] == 1 and st["sessions"] == 0
    # the bridge keeps working: a following order still round-trips
    make("terminal", bridge.address)
    live(bridge)
    coid = bridge.submit_plan(plan("after-garbage"))
    assert bridge.wait(coid) == "filled"


def test_terminal_answers_malformed_engine_messages(make: Callable[..., typing.Any]) -> None:
    ctx = zmq.Context()
    engine = ctx.socket(zmq.ROUTER)
    engine.setsockopt(zmq.LINGER, 0)
    engine.setsockopt(zmq.RCVTIMEO, int(TIMEOUT * 1000))
    port = engine.bind_to_random_port("tcp://127.0.0.1")
    term = make("terminal", f"tcp://127.0.0.1:{port}")
    dec = MT5Codec(PR.TerminalMessage)
    try:
        ident, first = engine.recv_multipart()
        hello = dec.decode(first)
        assert type(hello) is PR.TerminalHello and hello.resumed is False and hello.epoch == term.epoch
        engine.send_multipart([ident, b"garbage"])
        engine.send_multipart([ident, json.dumps({"type": "order", "v": 1}).encode()])
        reasons = []
        while len(reasons) < 2:
            m = dec.decode(engine.recv_multipart()[1])
            if type(m) is PR.Error:
                reasons.append(m.reason)
        assert reasons == ["malformed", "invalid"]
        assert term.alive and term.stats()["errors_sent"] == 2
    finally:
        engine.close(0)
        ctx.term()


def test_callback_errors_do_not_stop_the_bridge(make: Callable[..., typing.Any]) -> None:
    bridge = make("bridge")

    def boom(_: typing.Any) -> None:
        raise RuntimeError("user bug")

    bridge.on_report(boom)
    make("terminal", bridge.address)
    live(bridge)
    a = bridge.submit_plan(plan("cb-1"))
    b = bridge.submit_plan(plan("cb-2"))
    assert bridge.wait(a) == "filled" and bridge.wait(b) == "filled"
    assert bridge.stats()["callback_errors"] == 2


def test_a_wait_whose_condition_asks_the_bridge_thread_does_not_deadlock(make: Callable[..., typing.Any]) -> None:
    # the condition sleeps past a round of the bridge thread (whose end notifies waiters) before
    # it asks that thread for stats(): run under the waiters' lock, the two would wait on each other
    bridge = make("bridge")
    make("terminal", bridge.address)
    live(bridge)
    asked: list[int] = []

    def condition() -> bool:
        time.sleep(0.05)
        asked.append(bridge.stats()["open"])
        return len(asked) >= 3

    t0 = time.monotonic()
    assert bridge.wait_until(condition, 5.0)
    assert asked == [0, 0, 0] and time.monotonic() - t0 < 5.0
    # and a condition that stays false still times out on time
    t0 = time.monotonic()
    assert not bridge.wait_until(lambda: bridge.stats()["open"] < 0, 0.3)
    assert 0.3 <= time.monotonic() - t0 < 3.0


def test_bind_policy() -> None:
    with pytest.raises(ValueError):
        MT5Bridge("tcp://0.0.0.0:*", start=False)
    with pytest.raises(ValueError):
        MT5Bridge("tcp://127.0.0.1:*", safe_mode="panic", start=False)


def test_a_closed_bridge_refuses_work_instead_of_queueing_it() -> None:
    # an order submitted after close() waited "queued" for good for a thread that had stopped
    bridge = MT5Bridge("tcp://127.0.0.1:*")
    bridge.close()
    with pytest.raises(RuntimeError, match="closed"):
        bridge.submit_order(symbol="EURUSD", side="buy", volume=0.1, valid_until=int(time.time() * 1000) + 60_000)
    for call in (lambda: bridge.cancel("x"), bridge.flatten, bridge.reconcile):
        with pytest.raises(RuntimeError, match="closed"):
            call()
    assert bridge.orders() == {}


def test_an_order_racing_close_is_refused_not_left_queued() -> None:
    # close() lands between submit_order's open check and its hand-off to the bridge thread: the
    # order went into the inbox of a thread that had already taken its last look, queued for good
    bridge = MT5Bridge("tcp://127.0.0.1:*")
    real = bridge._send_now

    def close_first(o: typing.Any) -> bool:
        bridge.close()
        return real(o)

    bridge._send_now = close_first  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="closed"):
        bridge.submit_order(symbol="EURUSD", side="buy", volume=0.1, valid_until=int(time.time() * 1000) + 60_000,
                            client_order_id="dcrace1")
    assert bridge.orders() == {} and not bridge._inbox
    assert bridge.stats()["link"] == "waiting"  # answered here: the thread has ended


def test_a_question_racing_close_is_answered(make: Callable[..., typing.Any]) -> None:
    # stats() asks the bridge thread; close() meanwhile: answered by its last drain or here,
    # never a 10 s TimeoutError
    for _ in range(20):
        bridge = make("bridge")
        answers: list[typing.Any] = []
        t = threading.Thread(target=lambda b=bridge: answers.append(b.stats()["link"]))
        t.start()
        bridge.close()
        t.join(TIMEOUT)
        assert not t.is_alive() and answers == ["waiting"]


def test_callbacks_may_close_the_bridge_but_not_wait_on_it(make: Callable[..., typing.Any]) -> None:
    bridge = make("bridge")
    errors: list[BaseException] = []

    def on_report(r: typing.Any) -> None:
        if r.status == "filled":
            try:
                bridge.wait(r.client_order_id, timeout=5.0)
            except RuntimeError as e:
                errors.append(e)
            bridge.close()

    bridge.on_report(on_report)
    make("terminal", bridge.address)
    live(bridge)
    t0 = time.monotonic()
    bridge.submit_plan(plan("cb-close"))
    wait_for(lambda: bridge._thread is not None and not bridge._thread.is_alive(), what="the bridge thread to end")
    assert time.monotonic() - t0 < 5.0  # the wait raised at once instead of blocking its own thread
    assert len(errors) == 1 and "callback" in str(errors[0])
    assert bridge._sock.closed  # the thread closed the socket on its way out
    bridge.close()  # a second close is a no-op
    with pytest.raises(RuntimeError, match="closed"):
        bridge.submit_plan(plan("cb-after"))


def test_liveness_rule_within_what_the_hello_carries() -> None:
    # the hello tells the EA heartbeat_ms in [1, 3600000] and missed in [1, 1000]: a bridge
    # built outside them was accepted, no EA could take its hello, and the link never came up
    for kw in ({"missed": 1001}, {"missed": 0}, {"heartbeat": 3601.0}, {"heartbeat": 0.0005},
               {"heartbeat": math.nan}):
        with pytest.raises(ValueError, match="heartbeat|missed"):
            MT5Bridge("tcp://127.0.0.1:*", start=False, **kw)
    MT5Bridge("tcp://127.0.0.1:*", heartbeat=3600.0, missed=1000, start=False).close()
    for opt, val in (("--missed", "1001"), ("--heartbeat", "3601"), ("--heartbeat", "0.0001")):
        with pytest.raises(SystemExit) as e:
            _mt5_parser().parse_args(["bridge", "mt5", opt, val])
        assert e.value.code == 2


# ---- command line ----------------------------------------------------------------------------------

def _mt5_parser() -> typing.Any:
    import argparse

    from dynamic_core.bridges.mt5.cli import add_parser

    p = argparse.ArgumentParser(prog="dynamic-core")
    bridge = p.add_subparsers(dest="command").add_parser("bridge")
    add_parser(bridge.add_subparsers(dest="bridge_command"))
    return p


def test_cli_simulated_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    from dynamic_core.bridges.mt5.cli import cmd_bridge_mt5

    args = _mt5_parser().parse_args(["bridge", "mt5", "--bind", "tcp://127.0.0.1:*", "--simulated-terminal",
                                     "--bars", "60", "--bar-interval", "0.001", "--heartbeat", "0.05",
                                     "--agents", "256", "--instruments", "EURUSD"])
    assert args.func is cmd_bridge_mt5
    steps: list[int] = []

    def source(signals: typing.Any, bars: typing.Any) -> list[TradingPlan]:
        steps.append(len(bars))
        # a plan whose validity is 3000 bars of simulated time: rescaled to wall-clock time, 3 s
        # (+ the 1 s the command adds), not the 1 s a zero bar interval leaves a loaded machine
        ts, close = int(bars["ts"][0]), float(bars["close"][0])
        p = msgspec.structs.replace(plan(f"cli-{len(steps)}"), ts=ts, valid_until=ts + 3000 * 3600 * 10**9,
                                    entry=close, stop=close - 0.01, targets=(close + 0.02,))
        return [p] if len(steps) <= 5 else []

    assert cmd_bridge_mt5(args, plan_source=source) == 0
    out = capsys.readouterr().out
    assert len(steps) == 60 and set(steps) == {1}
    assert "link: live" in out and "orders: filled 5" in out
    assert "plans submitted 5, orders executed at the terminal 5, executed more than once 0" in out


def test_cli_default_plan_source_runs_the_same_way_every_time(capsys: pytest.CaptureFixture[str]) -> None:
    # with --bar-interval 0 the next bar reached the terminal before this bar's orders: stops
    # were judged at a later price, and the same seed gave other equities run to run
    from dynamic_core.bridges.mt5.cli import cmd_bridge_mt5

    outs = []
    for _ in range(2):
        args = _mt5_parser().parse_args(["bridge", "mt5", "--bind", "tcp://127.0.0.1:*", "--simulated-terminal",
                                         "--bars", "60", "--bar-interval", "0", "--heartbeat", "0.05", "-q",
                                         "--instruments", "USDJPY,XAUUSD,GOOG", "--timeframe", "D1"])
        assert cmd_bridge_mt5(args) == 0
        outs.append([ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(("terminal:", "plans"))])
    assert outs[0] == outs[1] and len(outs[0]) == 2 and "plans submitted 0" not in outs[0][1]


@pytest.mark.parametrize(("option", "value"), [
    ("--bar-interval", "-1"), ("--bar-interval", "nan"), ("--bar-interval", "inf"), ("--heartbeat", "nan"),
    ("--resend-timeout", "-0.5"), ("--duration", "inf"), ("--magic", "-1"), ("--bind", "tcp://127.0.0.1:99999"),
    ("--bind", "tcp://127.0.0.1:0"), ("--bind", "tcp://127.0.0.1:x"), ("--bind", "tcp://127.0.0.1")])
def test_cli_refuses_bad_values_when_parsing(option: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    # --bar-interval -1 made every order expire before it was sent (exit 0), nan crashed after the
    # bridge was up, and port 99999 bound another port
    with pytest.raises(SystemExit) as e:
        _mt5_parser().parse_args(["bridge", "mt5", option, value, "--simulated-terminal"])
    assert e.value.code == 2 and f"argument {option}:" in capsys.readouterr().err


def test_cli_timeframe_and_instruments_parse_like_run(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    # `run --timeframe 3600` worked while `bridge mt5 --timeframe 3600` was refused ("a string
    # needs a unit") after the bridge had bound its socket
    args = _mt5_parser().parse_args(["bridge", "mt5", "--simulated-terminal", "--timeframe", "3600",
                                     "--instruments", "EURUSD, USDJPY"])
    assert (args.timeframe, args.instruments) == (3600, ["EURUSD", "USDJPY"])
    args = _mt5_parser().parse_args(["bridge", "mt5", "--timeframe", "M15", "--instruments", "3"])
    assert (args.timeframe, args.instruments) == (900, ["EURUSD", "GBPUSD", "USDJPY"])
    assert _mt5_parser().parse_args(["bridge", "mt5"]).timeframe == 3600  # the default, H1

    from dynamic_core import cli
    from dynamic_core.bridges.mt5 import cli as mt5_cli

    def no_bind(*a: typing.Any, **k: typing.Any) -> typing.Any:
        raise AssertionError("bound a socket before the arguments were checked")

    monkeypatch.setattr(mt5_cli, "MT5Bridge", no_bind)
    for option, value in (("--timeframe", "1.5s"), ("--timeframe", "0"), ("--timeframe", "soon"),
                          ("--instruments", "EURUSD,,GBPUSD"), ("--instruments", "0"),
                          ("--instruments", "X" * 65)):
        assert cli.main(["bridge", "mt5", "--simulated-terminal", option, value]) == 2
        err = capsys.readouterr().err
        assert f"argument {option}:" in err and "Traceback" not in err, err


def test_bridge_refuses_a_port_out_of_range() -> None:
    for bad in ("tcp://127.0.0.1:99999", "tcp://127.0.0.1:65536", "tcp://127.0.0.1:0", "tcp://127.0.0.1"):
        with pytest.raises(ValueError, match="port"):
            MT5Bridge(bad, start=False).close()  # (closed if it binds after all)
    args = _mt5_parser().parse_args(["bridge", "mt5", "--bind", "tcp://[::1]:5560", "--bar-interval", "0"])
    assert (args.bind, args.bar_interval) == ("tcp://[::1]:5560", 0.0)


def test_history_bound_forgets_settled_orders_only(make: Callable[..., typing.Any]) -> None:
    bridge = make("bridge", history=3)
    term = make("terminal", bridge.address)
    live(bridge)
    coids = [bridge.submit_plan(plan(f"hist-{i}")) for i in range(5)]
    for c in coids:
        assert bridge.wait(c) == "filled"
    term.on_bar("EURUSD", time.time_ns(), 1.1, 1.1, 1.08, 1.085)  # stops close every position
    bridge.reconcile()
    wait_for(lambda: len(bridge.orders()) == 3, what="pruning")
    assert set(bridge.orders()) == set(coids[2:])
    # a forgotten order submitted again is sent, and the EA answers with its first outcome
    assert bridge.submit_plan(plan("hist-0")) == coids[0]
    assert bridge.wait(coids[0]) == "filled"
    assert term.executions() == dict.fromkeys(coids, 1)


def test_a_steady_link_reconciles_by_itself_to_keep_its_orders_bounded(make: Callable[..., typing.Any]) -> None:
    # orders netted back to flat at the terminal stayed "open" at the bridge (only a
    # reconciliation finds them closed, and a steady link never had one): history=10 kept 200
    bridge = make("bridge", history=10)
    term = make("terminal", bridge.address)
    live(bridge)
    coids = []
    for i in range(60):
        coids.append(bridge.submit_order(symbol="EURUSD", side="buy" if i % 2 == 0 else "sell", volume=0.1,
                                         valid_until=int(time.time() * 1000) + 60_000, plan_id=f"net-{i}"))
        assert bridge.wait(coids[-1]) == "filled"
    # at most once per `history` orders submitted: the orders kept stay within ~2 x history
    wait_for(lambda: bridge.link == "live" and len(bridge.orders()) <= 30, what="orders pruned")
    assert bridge.stats()["auto_reconciliations"] >= 2 and term.positions() == {}
    assert len(bridge.positions()) <= 30 and term.executions() == dict.fromkeys(coids, 1)


def test_order_expired_while_unacked_is_upgraded_by_a_late_fill(make: Callable[..., typing.Any]) -> None:
    # missed 200 (10 s): the 2.5 s delay below is no silence; the re-sends until valid_until stay
    # below max_sends (8 take about 1 s here)
    bridge = make("bridge", missed=200, max_sends=100)
    proxy = make("proxy", bridge.address)
    term = make("terminal", proxy.address)
    live(bridge)
    # each way takes 2.5 s: the EA gets the order 0.5 s before valid_until (if it was sent at
    # once), and its answer reaches the bridge at least 2 s after valid_until, so the bridge has
    # expired it first even when a loaded machine stopped this process over valid_until (its
    # threads, the proxy's included, then all wake at once: with 150 ms the ack could win)
    slow = Faults(delay=1.0, delay_ms=(2500.0, 2500.0))
    proxy.set_faults(to_bridge=slow, to_terminal=slow)
    coid = bridge.submit_order(symbol="EURUSD", side="buy", volume=0.1, plan_id="late",
                               valid_until=int(time.time() * 1000) + 3000)
    # unacked when valid_until passes: the bridge stops re-sending and calls it expired ...
    wait_for(lambda: bridge.order(coid)["state"] not in ("queued", "sent"), what="expiry at the bridge")
    st = bridge.order(coid)
    # ... but the EA got it in time, so the late ack and fill win (if the machine was too slow
    # for that, the EA refused it and both sides agree it expired)
    wait_for(lambda: term.order_status(coid) in ("filled", "expired"))
    if term.order_status(coid) == "filled":
        assert st["state"] == "expired" and st["reason"] == "expired_unacked"
        assert bridge.wait(coid, "filled") == "filled"
        assert bridge.stats()["late_outcomes"] >= 1
        assert term.executions() == {coid: 1}
    else:
        wait_for(lambda: bridge.stats()["acks_refused"] >= 1)
        assert bridge.order(coid)["state"] == "expired" and term.executions() == {}


def test_concurrent_submitters_each_order_exactly_once(make: Callable[..., typing.Any]) -> None:
    # Four threads submit 50 orders each at once: some go out from the submitting thread (the
    # fast path), others through the bridge thread's queue when the lock is busy; every order is
    # sent, acked and filled once, and the socket keeps being read (acks, reports, heartbeats).
    # Resends are what this test must not see, so their timeout is long: with the suite's 30 ms a
    # loaded 2-core machine resent a few orders (the EA then acks them again as duplicates).
    bridge = make("bridge", **NO_RESEND)
    acks: list[str] = []
    bridge.on_ack(lambda coid, ok, reason: acks.append(coid))
    term = make("terminal", bridge.address)
    live(bridge)
    ids: list[list[str]] = [[] for _ in range(4)]
    go = threading.Barrier(4)

    def submit(k: int) -> None:
        go.wait()
        for i in range(50):
            ids[k].append(bridge.submit_plan(plan(f"cc{k}-{i}")))

    threads = [threading.Thread(target=submit, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    coids = [c for part in ids for c in part]
    assert len(set(coids)) == 200
    for c in coids:
        assert bridge.wait(c, timeout=10) == "filled", bridge.order(c)
    st = bridge.stats()
    assert st["submitted"] == 200 and st["sent"] == 200
    assert st["resends"] == 0 and st["acks"] == 200 and st["duplicate_acks"] == 0, st
    assert sorted(acks) == sorted(coids)
    assert term.executions() == dict.fromkeys(coids, 1)
    assert set(term.order_messages.values()) == {1}


def test_an_order_cancelled_before_it_is_sent_is_never_sent(make: Callable[..., typing.Any]) -> None:
    # A cancel from another thread can reach the bridge thread's queue before the order it
    # cancels (the id is known in advance: client_order_id_for(plan_id)). The order then ends
    # cancelled_before_send and must not go out afterwards (it did, and was re-sent for ever).
    bridge = make("bridge")
    term = make("terminal", bridge.address)
    live(bridge)
    p = plan("cancel-first")
    coid = client_order_id_for(p.plan_id)
    real = bridge._send_now

    def cancel_first(o: typing.Any) -> bool:  # the interleaving, made deterministic
        assert bridge.cancel(coid)
        return False  # the order is queued behind the cancel

    bridge._send_now = cancel_first
    assert bridge.submit_plan(p) == coid
    bridge._send_now = real
    assert bridge.wait(coid) == "cancelled"
    time.sleep(3 * 0.2)  # resend_max_delay of the test bridges: a wrongly open order would re-send
    o = bridge.order(coid)
    assert (o["state"], o["reason"], o["sends"]) == ("cancelled", "cancelled_before_send", 0)
    assert coid not in term.order_messages and bridge.stats()["sent"] == 0


def test_close_keeps_its_timeout_while_a_callback_is_slow(make: Callable[..., typing.Any]) -> None:
    # Callbacks run on the bridge thread holding its lock; close(timeout) still returns in about
    # that time, and the bridge thread closes the socket once the callback is done.
    bridge = make("bridge")
    make("terminal", bridge.address)
    live(bridge)
    entered, release = threading.Event(), threading.Event()

    def slow(coid: str, ok: bool, reason: str) -> None:
        entered.set()
        release.wait(10)

    bridge.on_ack(slow)
    bridge.submit_plan(plan("slow-cb"))
    assert entered.wait(5)
    t0 = time.monotonic()
    bridge.close(timeout=0.3)
    assert time.monotonic() - t0 < 5.0  # it does not wait for the callback (10 s)
    release.set()
    wait_for(lambda: bridge._sock.closed, what="the bridge thread closing its socket")


# ---- an EA that lies: reports and answers no order or query can have ----------------------------

class _RawEA:
    """A terminal written by hand over a raw DEALER: says what a test tells it to."""

    def __init__(self, address: str, epoch: int = 777) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, int(TIMEOUT * 1000))
        self.sock.connect(address)
        self.epoch, self.seq = epoch, 0
        self.dec = MT5Codec(PR.EngineMessage)

    def send(self, kind: str, **fields: typing.Any) -> int:
        self.seq += 1
        self.sock.send(json.dumps({"type": kind, "v": 1, "epoch": self.epoch, "seq": self.seq,
                                   "ts": PR.now_ms(), **fields}).encode())
        return self.seq

    def recv(self, cls: type) -> typing.Any:
        while True:  # heartbeats and the like in between are skipped
            m = self.dec.decode(self.sock.recv())
            if type(m) is cls:
                return m

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture()
def raw_live(make: Callable[..., typing.Any]) -> Iterator[tuple[MT5Bridge, _RawEA]]:
    bridge = make("bridge", heartbeat=0.5, missed=20)
    ea = _RawEA(bridge.address)
    try:
        ea.send("hello", login=1, server="s", resumed=False, peer_epoch=0, build="b")
        q = ea.recv(PR.PositionsQuery)
        ea.send("positions_end", query_id=q.query_id, snapshot=1, count=0)
        live(bridge)
        yield bridge, ea
    finally:
        ea.close()


def test_an_exec_report_that_does_not_match_its_order_is_refused(raw_live: tuple[MT5Bridge, _RawEA]) -> None:
    bridge, ea = raw_live
    coid = bridge.submit_order(symbol="EURUSD", side="buy", volume=0.1, valid_until=PR.now_ms() + 60_000)
    o = ea.recv(PR.Order)
    ea.send("ack", client_order_id=coid, order_seq=o.seq, accepted=True, reason="", duplicate=False, ticket=1)
    report = {"client_order_id": coid, "status": "filled", "symbol": "EURUSD", "side": "buy", "ticket": 1,
              "price": 1.1, "volume": 0.1, "commission": 0.0, "fill_ts": PR.now_ms(), "reason": ""}
    bads = ({"volume": 50.0}, {"symbol": "GBPUSD"}, {"side": "sell"},
            # price 0 means nothing filled: a fill at price 0, or filled with no volume, is no fill
            {"volume": 0.0, "price": 0.0}, {"price": 0.0}, {"status": "partial", "volume": 0.05, "price": 0.0})
    for bad in bads:
        seq = ea.send("exec_report", **{**report, **bad})
        err = ea.recv(PR.Error)
        assert err.reason == "invalid" and err.ref_seq == seq and coid in err.detail, (bad, err)
    order = bridge.order(coid)
    assert order is not None and (order["state"], order["filled_volume"], order["inconsistent_reports"]) == (
        "acked", 0.0, len(bads))
    assert bridge.positions() == {} and bridge.stats()["inconsistent_reports"] == len(bads)
    ea.send("exec_report", **report)  # the true report still settles it
    assert bridge.wait(coid) == "filled"
    assert list(bridge.positions().values()) == [
        {"symbol": "EURUSD", "side": "buy", "volume": 0.1, "price": 1.1, "ticket": 1}]


def _limit_partly_filled(bridge: MT5Bridge, ea: _RawEA, plan_id: str) -> tuple[str, dict[str, typing.Any]]:
    """A limit order acked and partly filled (0.05 of 0.1 at 1.1); returns its id and the report."""
    coid = bridge.submit_order(symbol="EURUSD", side="buy", volume=0.1, order_type="limit", price=1.1,
                               valid_until=PR.now_ms() + 60_000, plan_id=plan_id)
    o = ea.recv(PR.Order)
    ea.send("ack", client_order_id=coid, order_seq=o.seq, accepted=True, reason="", duplicate=False, ticket=1)
    report = {"client_order_id": coid, "status": "partial", "symbol": "EURUSD", "side": "buy", "ticket": 1,
              "price": 1.1, "volume": 0.05, "commission": 0.0, "fill_ts": PR.now_ms(), "reason": ""}
    ea.send("exec_report", **report)
    wait_for(lambda: bridge.order(coid)["state"] == "partial", what="the partial fill")  # type: ignore[index]
    return coid, report


def test_a_partial_fill_is_held_and_never_lost_by_a_later_report(raw_live: tuple[MT5Bridge, _RawEA]) -> None:
    bridge, ea = raw_live
    coid, report = _limit_partly_filled(bridge, ea, "p-partial")
    held = {coid: {"symbol": "EURUSD", "side": "buy", "volume": 0.05, "price": 1.1, "ticket": 1}}
    assert bridge.positions() == held and bridge.order(coid)["open"]  # type: ignore[index]
    # a report of fewer lots than already reported (final or not) would lose the fill: refused
    for bad in ({"status": "cancelled", "volume": 0.0, "price": 0.0}, {"status": "filled", "volume": 0.03},
                {"status": "partial", "volume": 0.02}):
        seq = ea.send("exec_report", **{**report, **bad})
        err = ea.recv(PR.Error)
        assert err.reason == "invalid" and err.ref_seq == seq and "after 0.05" in err.detail, (bad, err)
    order = bridge.order(coid)
    assert order is not None and (order["state"], order["filled_volume"], order["inconsistent_reports"]) == (
        "partial", 0.05, 3)
    # the consistent cancel (the partial volume) ends it; the 0.05 lots stay held
    ea.send("exec_report", **{**report, "status": "cancelled"})
    assert bridge.wait(coid) == "cancelled"
    assert bridge.order(coid)["filled_volume"] == 0.05 and bridge.positions() == held  # type: ignore[index]


def test_reconciliation_never_replaces_a_final_status(raw_live: tuple[MT5Bridge, _RawEA]) -> None:
    bridge, ea = raw_live
    reports: list[typing.Any] = []
    bridge.on_report(reports.append)
    # cancelled after a partial fill: its position is the part filled, and stays so
    coid, report = _limit_partly_filled(bridge, ea, "p-cancelled")
    ea.send("exec_report", **{**report, "status": "cancelled"})
    assert bridge.wait(coid) == "cancelled"
    _listed(bridge, ea, coid, volume=0.05)
    order = bridge.order(coid)
    assert order is not None and (order["state"], order["filled_volume"], order["open"]) == ("cancelled", 0.05, True)
    assert bridge.reconciliation()["matched"] == [coid] and bridge.positions()[coid]["volume"] == 0.05
    assert [r.status for r in reports] == ["partial", "cancelled"]
    n_sent = bridge.order(coid)["sends"]  # type: ignore[index]
    # more lots than it ended with: not its position; a rejected order's position neither
    _, seq = _listed(bridge, ea, coid, volume=0.1)
    err = ea.recv(PR.Error)
    assert err.reason == "invalid" and err.ref_seq == seq and "ended cancelled" in err.detail
    rej = bridge.submit_order(symbol="EURUSD", side="buy", volume=0.1, valid_until=PR.now_ms() + 60_000, plan_id="p-rej")
    o = ea.recv(PR.Order)
    ea.send("ack", client_order_id=rej, order_seq=o.seq, accepted=False, reason="trade_disabled", duplicate=False,
            ticket=0)
    assert bridge.wait(rej) == "rejected"
    _listed(bridge, ea, rej)
    for c, state, filled in ((coid, "cancelled", 0.05), (rej, "rejected", 0.0)):
        order = bridge.order(c)
        assert order is not None and (order["state"], order["filled_volume"]) == (state, filled), order
    assert bridge.reconciliation()["inconsistent"] == [rej] and bridge.reconciliation()["reconciled"] == []
    assert [r.status for r in reports] == ["partial", "cancelled", "rejected"]
    assert bridge.order(coid)["sends"] == n_sent  # a final order is never asked about again  # type: ignore[index]


def _listed(bridge: MT5Bridge, ea: _RawEA, coid: str, **fields: typing.Any) -> tuple[PR.PositionsQuery, int]:
    """Reconcile, answering one position under ``coid`` (a EURUSD buy 0.1 @ 1.1 but for ``fields``);
    returns the query and the position's seq."""
    bridge.reconcile()
    q = ea.recv(PR.PositionsQuery)
    pos = {"symbol": "EURUSD", "ticket": 5, "side": "buy", "volume": 0.1, "price_open": 1.1, "sl": 0.0, "tp": 0.0,
           "magic": bridge.magic, "comment": coid, "client_order_id": coid, "profit": 0.0, **fields}
    seq = ea.send("position", query_id=q.query_id, snapshot=q.query_id, index=1, **pos)
    ea.send("positions_end", query_id=q.query_id, snapshot=q.query_id, count=1)
    wait_for(lambda: q.query_id in bridge.reconciliation().get("query_ids", ()), what="the reconciliation")
    return q, seq


@pytest.mark.parametrize("bad", [{"symbol": "GBPUSD"}, {"side": "sell"}, {"volume": 500.0}, {"price_open": 0.0},
                                 {"symbol": "GBPUSD", "side": "sell", "volume": 500.0, "price_open": 0.0}],
                         ids=["symbol", "side", "volume", "price", "all"])
def test_a_reconciled_position_that_does_not_match_its_order_settles_nothing(
        raw_live: tuple[MT5Bridge, _RawEA], bad: dict[str, typing.Any]) -> None:
    # the same rules as an exec_report: such a position used to settle the order filled at its numbers
    bridge, ea = raw_live
    bridge.max_sends = 10**6  # stays "sent" until acked (not "unconfirmed" after 8 sends, ~1 s here)
    reports: list[typing.Any] = []
    bridge.on_report(reports.append)
    coid = bridge.submit_order(symbol="EURUSD", side="buy", volume=0.1, valid_until=PR.now_ms() + 60_000)
    o = ea.recv(PR.Order)  # received, not acked yet
    _, seq = _listed(bridge, ea, coid, **bad)
    err = ea.recv(PR.Error)
    assert err.reason == "invalid" and err.ref_seq == seq and coid in err.detail
    order = bridge.order(coid)
    assert order is not None and order["state"] == "sent" and order["filled_volume"] == 0.0
    assert order["inconsistent_reports"] == 1 and not order["open"]
    assert bridge.positions() == {} and reports == []
    rec = bridge.reconciliation()
    assert rec["inconsistent"] == [coid] and rec["reconciled"] == [] and len(rec["unknown"]) == 1
    st = bridge.stats()
    assert (st["inconsistent_reports"], st["reconciled_fills"], st["fills"]) == (1, 0, 0)
    # the order is still worked on: the true outcome settles it
    ea.send("ack", client_order_id=coid, order_seq=o.seq, accepted=True, reason="", duplicate=False, ticket=1)
    ea.send("exec_report", client_order_id=coid, status="filled", symbol="EURUSD", side="buy", ticket=1,
            price=1.1, volume=0.1, commission=0.0, fill_ts=PR.now_ms(), reason="")
    assert bridge.wait(coid) == "filled"
    want = {coid: {"symbol": "EURUSD", "side": "buy", "volume": 0.1, "price": 1.1, "ticket": 1}}
    assert bridge.positions() == want
    # a filled order's position that contradicts it changes nothing either
    _listed(bridge, ea, coid, **bad)
    assert bridge.positions() == want and bridge.order(coid)["state"] == "filled"  # type: ignore[index]
    assert bridge.stats()["inconsistent_reports"] == 2 and bridge.reconciliation()["inconsistent"] == [coid]


def test_an_unknown_position_that_contradicts_a_later_order_is_not_adopted(raw_live: tuple[MT5Bridge, _RawEA]) -> None:
    bridge, ea = raw_live
    bridge.max_sends = 10**6  # stays "sent" until acked (not "unconfirmed" after 8 sends, ~1 s here)
    _listed(bridge, ea, "dcadopt1", volume=500.0)  # no such order yet: an unknown position
    assert len(bridge.reconciliation()["unknown"]) == 1
    coid = bridge.submit_order(symbol="EURUSD", side="buy", volume=0.1, valid_until=PR.now_ms() + 60_000,
                               client_order_id="dcadopt1")
    assert ea.recv(PR.Order).client_order_id == coid  # sent, not taken as filled by that position
    order = bridge.order(coid)
    assert order is not None and order["state"] == "sent" and order["inconsistent_reports"] == 1
    assert bridge.positions() == {}


def test_a_frame_flood_is_logged_and_answered_in_bounded_volume(raw_live: tuple[MT5Bridge, _RawEA]) -> None:
    import logging

    bridge, ea = raw_live
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("dynamic_core.bridges.mt5")
    handler = Keep(logging.INFO)
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.setsockopt(zmq.RCVHWM, 100_000)
    raw.connect(bridge.address)
    n = 3000
    frames = [b"\xff\xfegarbage", b'{"type":"ack","v":1,"epoch":"x"}', b'{"type":"launch","v":1}']
    try:
        t0 = time.monotonic()
        for i in range(n):
            raw.send(frames[i % 3])
        wait_for(lambda: bridge.stats()["rejected"] >= n, what="every frame counted")
        elapsed = time.monotonic() - t0
        answers = 0
        while raw.poll(300):
            raw.recv()
            answers += 1
        st = bridge.stats()
        assert st["rejects"] == {"malformed": n // 3, "invalid": n // 3, "unknown_tag": n // 3}
        assert answers == st["errors_sent"] and st["errors_sent"] + st["errors_suppressed"] == n
        assert st["errors_sent"] <= 50 + 10 * elapsed + 1  # burst, then 10 a second
        warnings = [r for r in records if r.levelno == logging.WARNING]
        assert len(warnings) == 3 * 10 and st["logs_suppressed"] == n - 30  # the first 10 per reason
        # once the minute is over, one line per reason with the count of the rest
        bridge._call(lambda: bridge._logs.flush(time.monotonic() + 61.0))
        summaries = [r.getMessage() for r in records if "more not logged" in r.getMessage()]
        assert len(summaries) == 3 and all(f"{n // 3 - 10} more not logged" in m for m in summaries)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        raw.close(0)
        ctx.term()
    # the real EA is still served
    coid = bridge.submit_order(symbol="EURUSD", side="sell", volume=0.1, valid_until=PR.now_ms() + 60_000)
    o = ea.recv(PR.Order)
    ea.send("ack", client_order_id=coid, order_seq=o.seq, accepted=True, reason="", duplicate=False, ticket=2)
    assert bridge.wait(coid, "acked") == "acked"


def test_position_answers_are_bounded_and_strays_counted(raw_live: tuple[MT5Bridge, _RawEA]) -> None:
    from dynamic_core.bridges.mt5.bridge import MAX_POSITIONS

    bridge, ea = raw_live
    pos = {"snapshot": 5, "symbol": "EURUSD", "ticket": 9, "side": "buy", "volume": 0.1, "price_open": 1.1,
           "sl": 0.0, "tp": 0.0, "magic": bridge.magic, "comment": "", "client_order_id": "", "profit": 0.0}
    before = bridge.stats()["stale_reports"]
    ea.send("position", query_id=99, index=1, **pos)  # no reconciliation asked for these
    ea.send("positions_end", query_id=99, snapshot=5, count=1)
    wait_for(lambda: bridge.stats()["stale_reports"] == before + 2, what="stray answers counted")
    bridge.reconcile()
    q = ea.recv(PR.PositionsQuery)
    bad = [("positions_end", {"snapshot": 5, "count": MAX_POSITIONS + 1}),  # more than the bridge holds
           ("position", {**pos, "index": MAX_POSITIONS + 1}),
           ("positions_end", {"snapshot": 5, "count": 2}),
           ("position", {**pos, "index": 3}),                                  # past the snapshot's count
           ("positions_end", {"snapshot": 5, "count": 3})]                     # a second, different count
    for kind, fields in bad:
        seq = ea.send(kind, query_id=q.query_id, **fields)
        if kind == "positions_end" and fields["count"] == 2:
            continue  # accepted
        err = ea.recv(PR.Error)
        assert err.reason == "invalid" and err.ref_seq == seq, (kind, fields, err)
    assert bridge.stats()["bad_answers"] == 4
    ea.send("position", query_id=q.query_id, index=2, **pos)
    ea.send("position", query_id=q.query_id, index=1, **{**pos, "ticket": 8})
    wait_for(lambda: q.query_id in bridge.reconciliation().get("query_ids", ()), what="the answer completes")
    rec = bridge.reconciliation()
    assert rec["snapshot"] == 5 and rec["positions"] == 2 and len(rec["unknown"]) == 2
    live(bridge)


def test_submit_refuses_what_no_ea_could_accept(make: Callable[..., typing.Any]) -> None:
    bridge = make("bridge")
    ok = {"symbol": "EURUSD", "side": "buy", "volume": 0.1, "valid_until": PR.now_ms() + 60_000}
    for bad in ({"client_order_id": "a b/c"}, {"sl": float("nan")}, {"tp": -1.0}, {"plan_id": "p" * 300},
                {"symbol": ""}, {"valid_until": 2**64}, {"volume": float("inf")}, {"price": 1e13}):
        with pytest.raises(ValueError):
            bridge.submit_order(**{**ok, **bad})
    assert bridge.orders() == {} and bridge.stats()["submitted"] == 0


def test_a_terminal_replaced_by_a_stray_hello_comes_back_once_the_stray_is_silent(
        make: Callable[..., typing.Any]) -> None:
    bridge = make("bridge", heartbeat=0.1)
    term = make("terminal", bridge.address, heartbeat=0.1)
    live(bridge)
    stray = _RawEA(bridge.address, epoch=4242)  # a second EA attached by mistake, or a replayed hello
    try:
        stray.send("hello", login=1, server="s", resumed=False, peer_epoch=0, build="b")
        q = stray.recv(PR.PositionsQuery)
        stray.send("positions_end", query_id=q.query_id, snapshot=1, count=0)
        wait_for(lambda: bridge.stats()["stale_epoch"] > 0, what="the first terminal's traffic refused")
    finally:
        stray.close()
    # the stray is silent: safe mode, then the first terminal is told to say hello and is back
    wait_for(lambda: bridge.stats()["sessions"] == 3 and bridge.link == "live", what="the terminal's new session")
    assert term.alive and term.handshaked
    coid = bridge.submit_plan(plan("after-stray"))
    assert bridge.wait(coid) == "filled"
