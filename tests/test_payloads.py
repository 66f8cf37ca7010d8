"""Payloads: round trips, immutability, and typed, counted rejects for every kind of bad frame."""

from __future__ import annotations

import struct

import dynamic_core as dc
import msgspec
import numpy as np
import pytest
from dynamic_core import payloads as P
from dynamic_core.errors import DynamicCoreError, PayloadError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


@pytest.fixture(scope="module")
def signals() -> np.ndarray:
    bars = dc.sim.MarketSimulator(["EURUSD", "GBPUSD"], timeframe="H1", seed=2).bars(150)
    pop = dc.Population.random(400, instruments=["EURUSD", "GBPUSD"], timeframes=["H1"], seed=1)
    with dc.Engine(pop, threads=1) as eng:
        return eng.run(bars)


def _sig(**kw) -> P.AISignal:
    base = dict(ts=1_700_000_000_000_000_000, instrument="EURUSD", timeframe=3600, seq=12,
                population_hash=2**64 - 1, score=-0.25, confidence=0.75, agreement=0.5, dispersion=0.125,
                action=-1, n_agents=64, votes=(1, 2, 3, 4, 5), flags=0)
    base.update(kw)
    return P.AISignal(**base)


EXAMPLES = [
    _sig(),
    P.SignalBatch(epoch=2**64 - 1, seq=40, signals=(_sig(), _sig(seq=13, action=2))),
    P.SignalBatch(epoch=1, seq=0, signals=()),
    P.RationaleUpdate(signal_id="ffffffffffffffff:12", instrument="EURUSD", timeframe=3600,
                      text="momentum and RSI agree", provider="local-llm", ts=5, epoch=7, seq=3),
    P.Heartbeat(epoch=9, seq=1, ts=123, next_seq={"sig.EURUSD.3600": 41}),
    P.Reject(reason="oversized", detail="17 MiB", size=17 << 20, ts=1),
    P.PreparedMarketContext(instrument="EURUSD", timeframe=60, ts=(1, 2), open=(1.0, 1.1),
                            high=(1.2, 1.2), low=(0.9, 1.0), close=(1.1, 1.15), volume=(10.0, 0.0)),
    P.Pause(request_id=1),
    P.Resume(request_id=2),
    P.SetThrottle(request_id=3, max_bars_per_s=250.5),
    P.SwapPersona(request_id=4, persona="cautious"),
    P.UpdateRouting(request_id=5, table={"EURUSD": "paper", "XAUUSD": "mt5"}),
    P.LoadPopulation(request_id=6, records=b"\x00\x01\x02"),
    P.LoadPopulation(request_id=7, path="/tmp/pop.npy"),
    P.Snapshot(request_id=8, path="snap.npy"),
    P.HealthQuery(request_id=9),
    P.ControlReply(request_id=9, ok=True, result={"bars_in": 10, "nested": {"a": [1, 2.5]}}),
    P.ControlReply(request_id=10, ok=False, error="refused"),
    P.ReviewQuery(request_id=11, limit=5),
    P.Review(request_id=12, item=3, approve=False, note="contradicts the signal"),
    P.AdapterHello(provider="deepseek", kind="openai-compatible", model="deepseek-chat", context_window=65536,
                   usd_per_m_input=0.27, usd_per_m_output=1.1, personas=("analyst",), languages=("en", "zh"),
                   max_concurrency=4, pid=77),
    P.AdapterBeat(in_flight=2, ts=5),
    P.AdapterBye(reason="shutdown"),
    P.ReasonRequest(task_id=2**40, attempt=1, context=P.ReasoningContext(
        signal_id="00000000000000ab:12", instrument="EURUSD", timeframe=3600, seq=12, action=-1, score=-0.3,
        features={"atr_pct": 0.25}), messages=(("system", "be brief"), ("user", "why?")), template="narrative/1"),
    P.ReasonReply(task_id=2**40, attempt=1, ok=False, error_kind="rate_limited", status=429, retry_after=1.5),
    P.MeshShutdown(),
]


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
@pytest.mark.parametrize("obj", EXAMPLES, ids=lambda o: type(o).__name__)
def test_round_trip(obj, fmt: str) -> None:
    codec = P.Codec(type(obj), fmt=fmt)
    raw = codec.encode(obj)
    assert codec.decode(raw) == obj
    assert codec.decode(memoryview(raw)) == obj  # zero-copy buffers, as from recv(copy=False)
    # the tag travels as "type", with the schema version
    as_dict = msgspec.json.decode(raw) if fmt == "json" else msgspec.msgpack.decode(raw)
    assert as_dict["type"] == type(obj).__struct_config__.tag
    assert as_dict["version"] == P.PAYLOAD_VERSION
    assert codec.stats() == {"decoded": 2, "rejected": 0, "rejects": {}}


@pytest.mark.parametrize("obj", EXAMPLES, ids=lambda o: type(o).__name__)
def test_frozen_keyword_only_strict(obj) -> None:
    cfg = type(obj).__struct_config__
    assert cfg.frozen and cfg.forbid_unknown_fields and cfg.tag  # kw_only: checked below
    with pytest.raises(AttributeError):
        obj.version = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        type(obj)(1)  # positional arguments are refused


def test_unions_pick_the_tagged_class() -> None:
    cmds = [x for x in EXAMPLES if isinstance(x, P.CONTROL_COMMANDS)]
    assert {type(c) for c in cmds} == set(P.CONTROL_COMMANDS)
    codec = P.Codec(P.ControlCommand, fmt="auto")
    for c in cmds:
        assert codec.decode(codec.encode(c)) == c
        assert codec.decode(codec.encode(c, "json")) == c  # auto reads JSON too
        assert P.decode_command(P.encode_command(c)) == c
    feed = P.Codec(P.FeedMessage)
    for m in EXAMPLES[1:5]:
        assert type(feed.decode(feed.encode(m))) is type(m)


def test_signal_records_round_trip(signals: np.ndarray) -> None:
    objs = P.signals_from_records(signals)
    assert objs == [P.signal_from_record(r) for r in signals]
    assert P.signals_to_records(objs).tobytes() == signals.tobytes()
    assert objs[5].id == f"{int(signals['population_hash'][5]):016x}:{int(signals['seq'][5])}"
    # a few records go row by row, many column by column: the same signals either way, with
    # plain Python values, field by field as the record holds them
    for k in (1, 2, 3, 40):
        assert P.signals_from_records(signals[7:7 + k]) == objs[7:7 + k]
    r, s = signals[9], P.signal_from_record(signals[9])
    assert s.votes == tuple(int(v) for v in r["votes"]) and type(s.votes[0]) is int
    assert (s.ts, s.seq, s.action, s.flags) == (int(r["ts"]), int(r["seq"]), int(r["action"]), int(r["flags"]))
    assert type(s.ts) is int and type(s.score) is float and s.score == float(r["score"])
    assert s.instrument == dc.instruments.name(int(r["instrument"]))
    bad = signals[:1].copy()
    bad["instrument"] = 2**32 - 1
    with pytest.raises(KeyError):
        P.signal_from_record(bad[0])


def _by_field(r: np.void) -> dc.AISignal:
    """The oracle: an AISignal built from a record one numpy field at a time."""
    return dc.AISignal(ts=int(r["ts"]), instrument=dc.instruments.name(int(r["instrument"])),
                       timeframe=int(r["timeframe"]), seq=int(r["seq"]), population_hash=int(r["population_hash"]),
                       score=float(r["score"]), confidence=float(r["confidence"]), agreement=float(r["agreement"]),
                       dispersion=float(r["dispersion"]), action=int(r["action"]), n_agents=int(r["n_agents"]),
                       votes=tuple(int(v) for v in r["votes"]), flags=int(r["flags"]), dsi=float(r["dsi"]))


def test_signal_from_bytes_is_signal_from_record(signals: np.ndarray) -> None:
    # The one-struct-call decoding every signal conversion uses, against the record read field by
    # field, on the fixture's signals and on records at the edges of every field's range.
    assert [P.signal_from_bytes(r.tobytes()) for r in signals] == [_by_field(r) for r in signals]
    assert P.signals_from_records(signals) == [_by_field(r) for r in signals]
    edge = signals[:3].copy()
    edge["ts"] = [-(2**63), 2**63 - 1, 0]
    edge["seq"] = [2**64 - 1, 0, 2**63]
    edge["population_hash"] = [2**64 - 1, 2**63, 1]
    edge["n_agents"] = [2**32 - 1, 0, 7]
    edge["votes"] = [[2**32 - 1, 0, 1, 2, 3], [0] * 5, [5, 4, 3, 2, 1]]
    edge["flags"] = [2**32 - 1, 0, 1]
    edge["dsi"] = [-1.0, 1.0, -0.0]
    edge["score"] = [-1.0, 5e-324, 1.0]
    edge["action"] = [-2, 2, 0]
    for r in edge:
        a, b = P.signal_from_bytes(r.tobytes()), _by_field(r)
        assert a == b and msgspec.msgpack.encode(a) == msgspec.msgpack.encode(b)
        assert P.signal_from_record(r) == b
    with pytest.raises(struct.error):
        P.signal_from_bytes(signals[0].tobytes()[:-1])
    bad = signals[:1].copy()
    bad["instrument"] = 2**32 - 1
    with pytest.raises(KeyError):
        P.signal_from_bytes(bad[0].tobytes())
    # the format is read off the dtype; a layout it cannot say is refused, not misread
    assert P._record_format(dc.SIGNAL_DTYPE).size == dc.SIGNAL_DTYPE.itemsize
    with pytest.raises(ValueError, match="packed"):
        P._record_format(np.dtype({"names": ["a", "b"], "formats": ["<u4", "<f8"], "offsets": [0, 8]}))
    with pytest.raises(ValueError, match="packed"):
        P._record_format(np.dtype([("a", "<f4")]))


def test_signals_and_plans_are_not_tracked_by_the_garbage_collector(signals: np.ndarray) -> None:
    # A consumer keeping millions of signals (or plans) must not make every collection walk
    # them: built from records, decoded from a feed frame, or constructed, they are untracked.
    import gc

    eur = signals[signals["instrument"] == dc.instruments.id("EURUSD")][:5]
    batch = P.Codec(P.FeedMessage).decode(P.encode_signal_batch(1, 1, eur, "EURUSD"))
    for s in [*P.signals_from_records(signals[:5]), *batch.signals, P.signal_from_bytes(signals[0].tobytes()),
              _sig(), P.Codec(P.AISignal, fmt="json").decode(P.Codec(P.AISignal, fmt="json").encode(_sig()))]:
        assert type(s) is P.AISignal and not gc.is_tracked(s)
    now = 1_700_000_000_000_000_000
    plan = P.TradingPlan(plan_id="p", signal_id="s", instrument="EURUSD", timeframe=3600, ts=now, seq=1,
                         direction=1, action=1, entry=1.1, stop=1.09, targets=(1.12,), size=0.1,
                         valid_until=now + 1)
    assert not gc.is_tracked(plan)


@pytest.mark.parametrize("n", [0, 1, 15, 16, 300])
def test_vectorised_batch_encoding_equals_msgspec(signals: np.ndarray, n: int) -> None:
    eur = signals[signals["instrument"] == dc.instruments.id("EURUSD")][:n]
    raw = P.encode_signal_batch(2**63 + 5, 99, eur, "EURUSD")
    expected = P.SignalBatch(epoch=2**63 + 5, seq=99, signals=tuple(P.signals_from_records(eur)))
    got = P.Codec(P.FeedMessage).decode(raw)
    assert got == expected
    # and a strict msgspec decoder sees the same as for msgspec's own encoding
    assert msgspec.msgpack.decode(raw) == msgspec.msgpack.decode(msgspec.msgpack.encode(expected))


def test_version_1_signals_decode_without_dsi_and_out_of_range_dsi_is_refused(signals: np.ndarray) -> None:
    # a version-1 peer's signal has no dsi field: it decodes with dsi 0.0 and no SIGNAL_DSI flag
    sig = P.signal_from_record(signals[0])
    d = msgspec.to_builtins(sig)
    d.pop("dsi")
    d["version"] = 1
    codec = P.Codec(P.AISignal)
    old = codec.decode(msgspec.msgpack.encode(d))
    assert old.dsi == 0.0 and not old.has_dsi and old.dsi_validation == 0.0
    d["version"], d["dsi"] = P.PAYLOAD_VERSION, 1.5
    with pytest.raises(P.PayloadError):
        codec.decode(msgspec.msgpack.encode(d))
    assert codec.rejects == {"invalid": 1}


def test_market_context_bars(sim_bars: np.ndarray) -> None:
    ctxs = P.split_bars(sim_bars, max_bars=7)
    # runs of one stream, in the original order: concatenating gives the same bars back
    assert np.concatenate([c.to_bars() for c in ctxs]).tobytes() == sim_bars.tobytes()
    assert all(len(c) <= 7 and len({c.instrument}) == 1 for c in ctxs)
    one = sim_bars[sim_bars["instrument"] == dc.instruments.id("USDJPY")]
    ctx = P.PreparedMarketContext.from_bars(one)
    assert ctx.instrument == "USDJPY" and ctx.timeframe == 3600 and len(ctx) == len(one)
    assert ctx.to_bars().tobytes() == one.tobytes()
    with pytest.raises(ValueError, match="several streams"):
        P.PreparedMarketContext.from_bars(sim_bars[:10])
    # JSON keeps every float64 exactly
    codec = P.Codec(P.PreparedMarketContext, fmt="json")
    assert codec.decode(codec.encode(ctx)).to_bars().tobytes() == one.tobytes()


def test_market_context_registers_new_names_like_from_pandas() -> None:
    name = "PAYLOADTEST1"
    assert name not in dc.instruments
    ctx = P.PreparedMarketContext(instrument=name, timeframe=60, ts=(1,), open=(1.0,), high=(1.0,),
                                  low=(1.0,), close=(1.0,), volume=(0.0,))
    bars = ctx.to_bars()
    assert bars["instrument"][0] == dc.instruments.get(name)


def test_market_context_unequal_columns_is_a_payload_error() -> None:
    raw = msgspec.msgpack.encode({"type": "market", "instrument": "EURUSD", "timeframe": 60, "ts": [1, 2],
                                  "open": [1.0], "high": [1.0], "low": [1.0], "close": [1.0], "volume": [1.0]})
    ctx = P.Codec(P.PreparedMarketContext).decode(raw)
    with pytest.raises(PayloadError, match="differ in length") as e:
        ctx.to_bars()
    assert e.value.reason == "invalid"


# ---- bad frames ------------------------------------------------------------------------------

def _mp(d) -> bytes:
    return msgspec.msgpack.encode(d)


GOOD_HB = {"type": "heartbeat", "version": 1, "epoch": 1, "seq": 0, "ts": 0}
BAD_FRAMES = [
    ("unknown_field", _mp({**GOOD_HB, "extra": 1})),
    ("unknown_tag", _mp({**GOOD_HB, "type": "no_such_payload"})),
    ("unknown_tag", _mp({k: v for k, v in GOOD_HB.items() if k != "type"})),
    ("version", _mp({**GOOD_HB, "version": P.PAYLOAD_VERSION + 1})),
    ("version", _mp({**GOOD_HB, "version": 0})),
    ("version", _mp({"type": "signal_batch", "epoch": 1, "seq": 0,
                     "signals": [{**msgspec.to_builtins(_sig()), "version": 7}]})),
    ("invalid", _mp({**GOOD_HB, "seq": -1})),
    ("invalid", _mp({**GOOD_HB, "epoch": "one"})),
    ("invalid", _mp([1, 2, 3])),
    ("truncated", _mp(GOOD_HB)[:-3]),
    ("truncated", b""),
    ("malformed", b"\xc1\xc1\xc1"),
    ("truncated", b'{"type": "heartbeat"'),
    ("oversized", _mp({**GOOD_HB, "next_seq": {f"sig.X{i}.60": i for i in range(200)}})),
]


@pytest.mark.parametrize("reason,raw", BAD_FRAMES, ids=[f"{r}-{i}" for i, (r, _) in enumerate(BAD_FRAMES)])
def test_bad_frames_are_typed_and_counted(reason: str, raw: bytes) -> None:
    codec = P.Codec(P.FeedMessage, fmt="auto", max_frame=2048)
    with pytest.raises(PayloadError) as e:
        codec.decode(raw)
    assert e.value.reason == reason
    assert isinstance(e.value, DynamicCoreError) and isinstance(e.value, ValueError)
    assert codec.stats() == {"decoded": 0, "rejected": 1, "rejects": {reason: 1}}
    # and the codec keeps working
    assert isinstance(codec.decode(_mp(GOOD_HB)), P.Heartbeat)


def test_oversized_is_refused_before_decoding() -> None:
    codec = P.Codec(P.FeedMessage, max_frame=100)
    big = _mp({**GOOD_HB, "next_seq": {f"t{i}": i for i in range(50)}})
    with pytest.raises(PayloadError, match="max_frame 100") as e:
        codec.decode(big)
    assert e.value.reason == "oversized"
    with pytest.raises(ValueError):
        P.Codec(P.FeedMessage, max_frame=0)
    with pytest.raises(ValueError):
        P.Codec(P.FeedMessage, fmt="xml")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=600))
def test_garbage_never_crashes(data: bytes) -> None:
    for typ in (P.FeedMessage, P.ControlCommand, P.PreparedMarketContext):
        codec = P.Codec(typ, fmt="auto", max_frame=512)
        try:
            obj = codec.decode(data)
        except PayloadError as e:
            assert codec.rejected == 1 and e.reason in codec.rejects
        else:
            assert codec.decoded == 1 and obj.version == P.PAYLOAD_VERSION


@settings(max_examples=150, deadline=None)
@given(which=st.integers(0, len(EXAMPLES) - 1), cut=st.integers(0, 10_000), flip=st.integers(0, 10_000),
       fmt=st.sampled_from(["msgpack", "json"]))
def test_truncated_and_flipped_frames(which: int, cut: int, flip: int, fmt: str) -> None:
    obj = EXAMPLES[which]
    codec = P.Codec(type(obj), fmt=fmt)
    raw = codec.encode(obj)
    with pytest.raises(PayloadError):
        codec.decode(raw[: cut % len(raw)])  # every proper prefix is refused
    mutated = bytearray(raw)
    mutated[flip % len(raw)] ^= 0x5A
    try:
        codec.decode(bytes(mutated))
    except PayloadError:
        pass
    assert codec.decoded + codec.rejected == 2


def test_plain_makes_engine_stats_encodable(signals: np.ndarray) -> None:
    pop = dc.Population.random(100, instruments=["EURUSD"], timeframes=["H1"], seed=1)
    with dc.Engine(pop, threads=1) as eng:
        stats = eng.stats()
    with pytest.raises(TypeError):
        msgspec.msgpack.encode(stats)
    reply = P.ControlReply(request_id=1, ok=True, result=P.plain(stats))
    for fmt in ("msgpack", "json"):
        codec = P.Codec(P.ControlReply, fmt=fmt)
        back = codec.decode(codec.encode(reply))
        assert back.result["n_agents"] == 100 and back.result["sms"]["status"][0] == "ok"


def test_batch_frames_split_into_messages_each_decoded_on_its_own():
    codec = P.Codec(P.MeshToAdapter)
    good = codec.encode(P.MeshShutdown())
    bad = msgspec.msgpack.encode({"type": "nope"})
    frame = P.encode_batch([good, bad, good])
    parts = P.split_batch(frame)
    assert len(parts) == 3
    assert isinstance(codec.decode(parts[0]), P.MeshShutdown)
    with pytest.raises(PayloadError):
        codec.decode(parts[1])  # one bad message is rejected alone
    assert isinstance(codec.decode(parts[2]), P.MeshShutdown)
    assert codec.rejected == 1
    # a single message is a frame as it is; a frame that only starts like an array comes back
    # whole, for the codec to reject as malformed
    assert P.split_batch(good) == [good]
    junk = b"\x93\xc1\xc1"
    assert P.split_batch(junk) == [junk]
    with pytest.raises(PayloadError):
        codec.decode(junk)


def test_checked_gives_a_payload_as_its_receiver_decodes_it() -> None:
    from dynamic_core.payloads import checked

    good = dict(ts=1, instrument="EURUSD", timeframe=3600, seq=1, population_hash=7, score=0.5, confidence=0.5,
                agreement=0.5, dispersion=0.1, action=1, n_agents=4, votes=(0, 1, 1, 1, 1))
    sig = dc.AISignal(**good)
    assert checked(sig) == sig
    # built in Python, a Struct is not checked: the receiver would refuse each of these
    for bad, field in [(dict(action=99), "action"), (dict(timeframe=0), "timeframe"), (dict(instrument=""), "instrument"),
                       (dict(dsi=5.0), "dsi"), (dict(score="high"), "score")]:
        with pytest.raises(dc.errors.PayloadError, match=field) as e:
            checked(dc.AISignal(**{**good, **bad}))
        assert e.value.reason == "invalid"
    listed = dc.AISignal(**{**good, "votes": [0, 1, 1, 1, 1]})  # a list: unhashable as built
    with pytest.raises(TypeError):
        hash(listed)
    assert hash(checked(listed)) == hash(sig)  # decoded as the tuple the field is
    with pytest.raises(TypeError, match="takes a dynamic_core payload"):
        checked({"type": "signal"})
