"""Bad input is rejected with a reason, counted and dead-lettered, never a crash; loaders."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import dynamic_core as dc

H1 = 3600
NS = 1_000_000_000
PKG_ROOT = str(Path(dc.__file__).resolve().parent.parent)


def clean_bars(name: str, n: int, start: int = 0) -> np.ndarray:
    sim = dc.sim.MarketSimulator([name], timeframe=H1, seed=3)
    b = sim.bars(n)
    b["ts"] = (start + np.arange(n)) * H1 * NS
    return b


@pytest.fixture
def engine():
    pop = dc.Population.grid("BADIN", H1, fast=[3, 5], slow=[10, 20])
    return dc.Engine(pop)


DEFECTS = {
    "non_finite": lambda b: b.__setitem__("close", np.nan),
    "non_positive_price": lambda b: [b.__setitem__(k, -1.0) for k in ("open", "high", "low", "close")],
    "high_below_low": lambda b: [b.__setitem__("high", 0.5), b.__setitem__("low", 2.0)],
    "open_out_of_range": lambda b: b.__setitem__("open", b["high"] * 2),
    "close_out_of_range": lambda b: b.__setitem__("close", b["low"] / 2),
    "negative_volume": lambda b: b.__setitem__("volume", -5.0),
    "unknown_instrument": lambda b: b.__setitem__("instrument", 4_000_000),
    "bad_timeframe": lambda b: b.__setitem__("timeframe", 0),
    # a unit error: positive but so small the next return would overflow and quarantine the stream
    "price_out_of_range": lambda b: [b.__setitem__(k, 1e-310) for k in ("open", "high", "low", "close")],
}


@pytest.mark.parametrize("reason", sorted(DEFECTS))
def test_each_defect_rejected_counted_and_dead_lettered(engine, reason):
    b = clean_bars("BADIN", 60)
    bad = b[30].copy()
    DEFECTS[reason](bad)
    b[30] = bad
    sig = engine.run(b)
    assert len(sig) == 59  # the rest still ran
    s = engine.stats()
    assert s["rejected"] == 1 and s["rejects"][reason] == 1
    dl = engine.dead_letters()
    assert len(dl) == 1 and dc.REASONS[dl[0]["reason"]] == reason and dl[0]["index"] == 30
    assert dc.market.reason_counts(dc.market.validate(b)) == {reason: 1}


@pytest.mark.parametrize("price", [1e-308, 5e-324, 1e-16, 2e15])
def test_a_price_out_of_range_is_refused_and_quarantines_nobody(price):
    # one absurd bar among real ones: accepted, a 1e-308 price made the next return overflow and
    # quarantined every agent of the stream; it is a counted, dead-lettered reject instead
    pop = dc.Population.random(64, instruments=["TINYPX"], timeframes=[H1], seed=5)
    eng = dc.Engine(pop)
    b = clean_bars("TINYPX", 300)
    for k in ("open", "high", "low", "close"):
        b[100][k] = price
    eng.run(b)
    assert eng.stats()["rejects"]["price_out_of_range"] == 1
    assert dc.REASONS[eng.dead_letters()[0]["reason"]] == "price_out_of_range"
    assert not eng.agents()["quarantined"].any()


def test_the_price_bounds_are_inclusive():
    b = clean_bars("BOUNDS", 4)
    b[1]["open"] = b[1]["low"] = dc.MIN_PRICE
    b[2]["high"] = b[2]["close"] = dc.MAX_PRICE
    b[3]["low"] = np.nextafter(dc.MIN_PRICE, 0)
    assert [dc.REASONS[c] for c in dc.market.validate(b)] == ["ok", "ok", "ok", "price_out_of_range"]


def test_out_of_order_and_duplicates(engine):
    b = clean_bars("BADIN", 50)
    b[20]["ts"] = b[10]["ts"]  # older than the previous bar
    b[31]["ts"] = b[30]["ts"]  # duplicate
    sig = engine.run(b)
    assert len(sig) == 48
    assert engine.stats()["rejects"]["out_of_order"] == 1
    assert engine.stats()["rejects"]["duplicate_timestamp"] == 1
    # ordering is checked against the previous batch too
    again = engine.run(b[:5])
    assert len(again) == 0 and engine.stats()["rejects"]["out_of_order"] == 1 + 5


def test_unfollowed_instrument_is_skipped_not_rejected(engine):
    other = clean_bars("NOBODYFOLLOWS", 40)
    mine = clean_bars("BADIN", 40)
    both = dc.market.merge(mine, other)
    sig = engine.run(both)
    assert len(sig) == 40
    s = engine.stats()
    assert s["skipped_unfollowed"] == 40 and s["rejected"] == 0 and s["accepted"] == 80
    # skipped bars still take sequence numbers: followed bars sit at their merged positions + 1
    followed = np.flatnonzero(both["instrument"] == dc.instruments.id("BADIN"))
    np.testing.assert_array_equal(sig["seq"], followed + 1)


def test_strict_mode_raises_and_processes_nothing(engine):
    b = clean_bars("BADIN", 40)
    b[7]["volume"] = -1
    b[9]["high"] = np.inf
    before = engine.agents().tobytes()
    with pytest.raises(dc.errors.InvalidInput) as ei:
        engine.run(b, strict=True)
    assert ei.value.rows == [7, 9] and ei.value.reasons == ["negative_volume", "non_finite"]
    assert isinstance(ei.value, ValueError)
    assert "row 7" in str(ei.value)
    assert engine.agents().tobytes() == before and engine.stats()["signals"] == 0
    strict = dc.Engine(engine.population, strict=True)
    with pytest.raises(dc.errors.InvalidInput):
        strict.run(b)
    assert len(strict.run(clean_bars("BADIN", 40))) == 40


def test_wrong_types_raise_typeerror(engine):
    with pytest.raises(TypeError, match="BAR_DTYPE"):
        engine.run(np.zeros(10))
    with pytest.raises(TypeError, match="1-d"):
        engine.run(dc.market.empty(4).reshape(2, 2))
    with pytest.raises(TypeError, match="from_pandas"):
        engine.run(pd.DataFrame({"a": [1]}))
    with pytest.raises(TypeError):
        engine.run([1, 2, 3])
    # non-contiguous views are accepted (copied)
    assert len(engine.run(clean_bars("BADIN", 20)[::2])) == 10


def test_bars_at_an_odd_offset_of_a_buffer_are_read_as_aligned_copies():
    bars = dc.sim.MarketSimulator(["EURUSD"], seed=1).bars(120)
    buf = np.zeros(bars.nbytes + 1, np.uint8)
    buf[1:] = bars.view(np.uint8)
    odd = buf[1:].view(dc.BAR_DTYPE)  # contiguous, but 1 byte past an 8-byte boundary
    assert odd.ctypes.data % 8 and (odd == bars).all()
    assert dc.market.as_bars(odd).ctypes.data % 8 == 0 and dc.market.as_bars(bars) is bars
    pop = dc.Population.random(64, instruments=["EURUSD"], seed=2)
    with dc.Engine(pop, threads=1) as a, dc.Engine(pop, threads=1) as b:
        assert a.run(odd).tobytes() == b.run(bars).tobytes()


def test_dead_letters_are_bounded_and_counted():
    pop = dc.Population.grid("BADIN", H1, fast=3, slow=5)
    eng = dc.Engine(pop, dead_letter_capacity=5)
    b = clean_bars("BADIN", 30)
    b["volume"][:12] = -1
    eng.run(b)
    dl = eng.dead_letters()
    assert len(dl) == 5 and list(dl["index"]) == [7, 8, 9, 10, 11]  # newest kept, oldest first
    assert eng.stats()["dead_letters_dropped"] == 7 and eng.stats()["rejected"] == 12


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(dc.BAR_DTYPE, st.integers(0, 60)))
def test_arbitrary_records_never_crash(raw):
    pop = dc.Population.grid("BADIN", H1, fast=[2, 4], slow=[6], w_rsi=[0.0, 0.5], w_bb=[0.3], w_mom=[0.2])
    eng = dc.Engine(pop)
    sig = eng.run(raw)
    s = eng.stats()
    assert s["accepted"] + s["rejected"] == len(raw)
    assert len(sig) == s["accepted"] - s["skipped_unfollowed"]
    assert np.isfinite(sig["score"]).all()


def test_from_pandas_bundled_eurusd(eurusd):
    import backtesting.test as bt

    df = bt.EURUSD
    assert len(eurusd) == len(df)
    assert eurusd["timeframe"][0] == 3600  # inferred
    np.testing.assert_array_equal(eurusd["close"], df["Close"].to_numpy())
    assert eurusd["ts"][0] == pd.Timestamp(df.index[0], tz="UTC").value
    assert dc.instruments.name(int(eurusd["instrument"][0])) == "EURUSD"
    assert (dc.market.validate(eurusd) == 0).all()


def test_from_pandas_returns_newest_first_data_in_time_order(eurusd):
    import backtesting.test as bt

    rev = dc.market.from_pandas(bt.EURUSD.iloc[::-1], instrument="EURUSD")
    assert rev.tobytes() == eurusd.tobytes() and (dc.market.validate(rev) == 0).all()
    df = pd.DataFrame({"time": [2, 0, 1, 1], "open": [1.0, 2.0, 3.0, 4.0], "high": 5.0, "low": 0.5, "close": 1.0},
                      index=[10, 11, 12, 13])
    b = dc.market.from_pandas(df, instrument="ORDERED", timeframe=1)
    assert b["open"].tolist() == [2.0, 3.0, 4.0, 1.0]  # stable: equal times keep their order
    assert [dc.REASONS[c] for c in dc.market.validate(b)] == ["ok", "ok", "duplicate_timestamp", "ok"]


def test_from_pandas_lowercase_and_epoch_time_columns():
    df = pd.DataFrame({
        "time": [1_700_000_000 + 60 * i for i in range(5)],
        "open": [1.0] * 5, "HIGH": [1.2] * 5, "Low": [0.9] * 5, "close": [1.1] * 5,
    })
    b = dc.market.from_pandas(df, instrument="LOWER", timeframe="M1")
    assert b["timeframe"][0] == 60 and b["ts"][1] - b["ts"][0] == 60 * NS
    assert (b["volume"] == 0).all()
    df["time"] = pd.date_range("2024-01-01", periods=5, freq="1min")
    assert dc.market.from_pandas(df, instrument="LOWER")["timeframe"][0] == 60
    with pytest.raises(ValueError, match="close"):
        dc.market.from_pandas(df.drop(columns=["close"]), instrument="LOWER")
    with pytest.raises(ValueError, match="times"):
        dc.market.from_pandas(df.drop(columns=["time"]), instrument="LOWER")


def _ohlc(n: int, **cols) -> pd.DataFrame:
    return pd.DataFrame({**cols, "open": [1.0] * n, "high": [1.0] * n, "low": [1.0] * n, "close": [1.0] * n})


@pytest.mark.parametrize("dtype", ["int64", "uint64", "Int64"])
def test_from_pandas_integer_epochs_are_exact(dtype):
    t0 = 1_700_000_000_000_000_000
    ns = [t0 + 100 * i for i in range(5)]  # 100 ns apart: float64 rounded them to 256 ns
    b = dc.market.from_pandas(_ohlc(5, time=pd.Series(ns, dtype=dtype)), "EXACT", "1s")
    assert b["ts"].tolist() == ns and (dc.market.validate(b) == 0).all()
    us = [1_700_000_000_123_457, 1_700_000_000_123_458]
    b = dc.market.from_pandas(_ohlc(2, time=pd.Series(us, dtype=dtype)), "EXACT", "1s")
    assert b["ts"].tolist() == [u * 1000 for u in us]
    s = [1_700_000_000 + 60 * i for i in range(3)]
    b = dc.market.from_pandas(_ohlc(3, time=pd.Series(s, dtype=dtype)), "EXACT", "M1")
    assert b["ts"].tolist() == [x * NS for x in s]


def test_from_pandas_datetimes_are_exact_in_any_unit():
    t = pd.DatetimeIndex(["2024-01-01 00:00:00.000000100", "2024-01-01 00:00:00.000000200"])
    b = dc.market.from_pandas(_ohlc(2).set_index(t), "EXACT", "1s")
    assert b["ts"].tolist() == [1_704_067_200_000_000_100, 1_704_067_200_000_000_200]
    late = pd.Series(pd.to_datetime(["2024-01-01", "2200-01-01"]).as_unit("s"))
    b = dc.market.from_pandas(_ohlc(2, time=late), "EXACT", "H1")
    assert b["ts"].tolist() == [pd.Timestamp("2024-01-01").value, pd.Timestamp("2200-01-01").value]
    berlin = pd.Series(pd.DatetimeIndex(["2024-01-01 01:00"], tz="Europe/Berlin").as_unit("us"))
    assert dc.market.from_pandas(_ohlc(1, time=berlin), "EXACT", "H1")["ts"].tolist() == [1_704_067_200 * NS]


@pytest.mark.parametrize("times", [
    [np.nan, 1.7e9, 1.7e9 + 3600, 1.7e9 + 7200],                 # NaN: was ts = INT64_MIN, accepted
    [1.7e9, np.inf, 1.7e9 + 3600, 1.7e9 + 7200],
    [1e30, 2e30, 3e30, 4e30],                                     # past int64 ns
    pd.array([1_700_000_000, None, 1_700_003_600, 1_700_007_200], dtype="Int64"),
    [1_700_000_000, 10**10, 1_700_003_600, 1_700_007_200],        # seconds past 2262
    np.array([2**63, 1, 2, 3], dtype=np.uint64),
    [pd.NaT, "2024-01-01 01:00", "2024-01-01 02:00", "2024-01-01 03:00"],
    ["2024-01-01 00:00", "not a time", "2024-01-01 02:00", "2024-01-01 03:00"],
    pd.to_datetime(["2024-01-01 00:00", "3000-01-01 00:00", "2024-01-01 02:00",
                    "2024-01-01 03:00"]).as_unit("us"),                     # wrapped in the cast to ns
], ids=repr)
def test_from_pandas_refuses_bad_times_naming_the_rows(times):
    with pytest.raises(ValueError, match=r"of time column 'time' with .*: rows \d"):
        dc.market.from_pandas(_ohlc(4, time=times), "BADTIME", "H1")


def test_from_pandas_refuses_a_nat_index_and_boolean_times():
    idx = pd.DatetimeIndex([pd.NaT, "2024-01-01 01:00", "2024-01-01 02:00"])
    with pytest.raises(ValueError, match="DatetimeIndex .*rows 0"):
        dc.market.from_pandas(_ohlc(3).set_index(idx), "BADTIME", "H1")
    # a ValueError (a bad value in a file), which the command line reports; a TypeError was a traceback
    for col in ([True, False, True], pd.array([True, None, False], dtype="boolean"), [True, False, None]):
        with pytest.raises(ValueError, match="time column 'time' holds booleans"):
            dc.market.from_pandas(_ohlc(3, time=col), "BADTIME", "H1")


def _cli(*args: str, cwd, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m dynamic_core ARGS`` in a subprocess, with this checkout importable."""
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PKG_ROOT, env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "dynamic_core", *args], cwd=cwd, env=env, input=stdin,
                          capture_output=True, text=True, timeout=120, check=False)


def test_the_command_line_reports_a_boolean_time_column_as_a_bad_file(tmp_path):
    """Booleans in the time column are a bad value in the file: a TypeError got past the command
    line's handling as a traceback."""
    (tmp_path / "b.csv").write_text("time,open,high,low,close\ntrue,1,1,1,1\nfalse,1,1,1,1\n")
    proc = _cli("run", "--data", "b.csv", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "b.csv: time column 'time' holds booleans" in proc.stderr


S0, MS0 = 1_700_000_000, 1_700_006_000_000


@pytest.mark.parametrize("dtype", ["int64", "float64", "Int64", "uint64"])
def test_from_pandas_refuses_epoch_numbers_of_mixed_units(dtype):
    """Seconds then milliseconds in one column: read by the largest number's unit, the seconds
    were dates in January 1970. Refused, naming the rows that disagree with the rest."""
    t = pd.Series([S0 + 60 * i for i in range(100)] + [MS0 + 60_000 * i for i in range(100)], dtype=dtype)
    with pytest.raises(ValueError, match=re.escape(
            "100 row(s) of time column 'time' with epoch numbers in another unit than the rest of the column "
            "(seconds among milliseconds): rows 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, ... (positions, from 0) are "
            "seconds by their size, the other 100 are milliseconds (1e11 <= |t| < 1e14); write every time in "
            "one unit, or as datetimes")):
        dc.market.from_pandas(_ohlc(200, time=t), "MIXED", "M1")
    # the rest is what most rows are: one stray nanosecond time among seconds is the row named
    t = pd.Series([S0 + 60 * i for i in range(5)], dtype=dtype)
    t[3] = (S0 + 180) * NS
    with pytest.raises(ValueError, match=r"1 row\(s\) .*\(nanoseconds among seconds\): rows 3 \(positions"):
        dc.market.from_pandas(_ohlc(5, time=t), "MIXED", "M1")


@pytest.mark.parametrize("times, want", [
    ([-3600, 0, 3600, 7200], [-3600 * NS, 0, 3600 * NS, 7200 * NS]),     # around the epoch: seconds
    ([2, 0, 1, 1], [0, NS, NS, 2 * NS]),
    ([-1.5, 0.0, 1.5], [-1_500_000_000, 0, 1_500_000_000]),
    ([MS0, MS0 + 1], [MS0 * 10**6, (MS0 + 1) * 10**6]),                    # one unit throughout
    ([-10**12, 10**12], [-10**18, 10**18]),                                # ms either side of 1970
], ids=repr)
def test_from_pandas_reads_epoch_numbers_of_one_unit_as_before(times, want):
    b = dc.market.from_pandas(_ohlc(len(times), time=times), "ONEUNIT", "1s")
    assert b["ts"].tolist() == want


def test_reason_counts_refuses_unknown_codes():
    assert dc.market.reason_counts(np.array([0, 1, 1, 3], dtype=np.uint32)) == {
        dc.REASONS[1]: 2, dc.REASONS[3]: 1}
    for bad in ([0, 99], [-1], [len(dc.REASONS)]):
        with pytest.raises(ValueError, match="reject reason code"):
            dc.market.reason_counts(bad)


def test_read_csv_round_trip(tmp_path, sim_bars):
    path = tmp_path / "bars.csv"
    dc.market.to_pandas(sim_bars).rename_axis("time").to_csv(path)
    back = dc.market.read_csv(path)
    assert back.tobytes() == sim_bars.tobytes()


def test_read_csv_puts_shuffled_rows_of_one_instrument_in_time_order(tmp_path, sim_bars):
    # like a file with a symbol column: a shuffled file used to lose every bar out of order
    one = sim_bars[sim_bars["instrument"] == sim_bars["instrument"][0]]
    df = dc.market.to_pandas(one).drop(columns=["instrument", "timeframe"]).rename_axis("time")
    df.sample(frac=1.0, random_state=3).to_csv(tmp_path / "shuffled.csv")
    back = dc.market.read_csv(tmp_path / "shuffled.csv")
    assert np.array_equal(back["ts"], one["ts"]) and np.array_equal(back["close"], one["close"])
    assert np.all(np.diff(back["ts"]) > 0)


def test_read_csv_takes_an_unnamed_index_column_as_the_times(tmp_path, sim_bars):
    """DataFrame.to_csv writes a DatetimeIndex without a name as an unnamed first column: its
    times, read as such (with or without a symbol column)."""
    df = dc.market.to_pandas(sim_bars).rename_axis(None)
    df.to_csv(tmp_path / "bars.csv")
    assert (tmp_path / "bars.csv").read_text().startswith(",")
    assert dc.market.read_csv(tmp_path / "bars.csv").tobytes() == sim_bars.tobytes()
    one = sim_bars[sim_bars["instrument"] == sim_bars["instrument"][0]]
    two = dc.market.to_pandas(one).rename_axis(None).assign(symbol="EURUSD")
    two.to_csv(tmp_path / "sym.csv")
    back = dc.market.read_csv(tmp_path / "sym.csv")
    assert np.array_equal(back["ts"], one["ts"]) and np.array_equal(back["close"], one["close"])


@pytest.mark.parametrize("sep, decimal", [(";", "."), (";", ","), ("\t", ".")])
def test_read_csv_reads_semicolon_and_tab_separated_files(tmp_path, eurusd, sep, decimal):
    """Spreadsheet exports in many locales use semicolons (often with decimal commas) and
    MetaTrader's history export uses tabs: the same bars as the comma-separated file."""
    df = dc.market.to_pandas(eurusd[:300])
    df.to_csv(tmp_path / "EURUSD.csv")
    df.to_csv(tmp_path / "other.csv", sep=sep, decimal=decimal)
    want = dc.market.read_csv(tmp_path / "EURUSD.csv")
    got = dc.market.read_csv(tmp_path / "other.csv", instrument="EURUSD")
    assert len(got) == 300 and got.tobytes() == want.tobytes()


def test_read_csv_without_times_names_the_file_and_the_columns(tmp_path):
    path = tmp_path / "prices.csv"
    path.write_text("when,open,high,low,close\n2024-01-01,1,2,0.5,1.5\n")
    with pytest.raises(ValueError, match=r"prices\.csv: no time column: name one ts/time/timestamp.*have \['when'"):
        dc.market.read_csv(path)
    # an unnamed integer index (to_csv of a RangeIndex) is not times: 0, 1, 2... were read as
    # 1970 epoch seconds
    df = pd.DataFrame({"Gmt time": ["2024-01-01 00:00", "2024-01-01 01:00"], "Open": [1.0, 1.1],
                       "High": [1.2, 1.2], "Low": [0.9, 1.0], "Close": [1.1, 1.15]})
    df.to_csv(path)
    with pytest.raises(ValueError, match=r"no time column"):
        dc.market.read_csv(path)
    df.assign(symbol="EURUSD").to_csv(path)
    with pytest.raises(ValueError, match=r"no time column"):
        dc.market.read_csv(path)


def _symbol_csv(path, rows: list[tuple[str, str]]):
    """A CSV of hourly bars from (symbol, close) pairs, each symbol's bars an hour apart."""
    seen: dict[str, int] = {}
    lines = ["time,symbol,open,high,low,close"]
    for sym, close in rows:
        h = seen[sym.strip()] = seen.get(sym.strip(), -1) + 1
        lines.append(f"2024-01-01 {h:02d}:00,{sym},1.1,1.2,1.0,{close}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_csv_keeps_symbols_pandas_would_read_as_missing(tmp_path):
    # "NA", "NULL", "nan" are names like any other: read as missing, their rows were dropped unseen
    rows = [(s, "1.15") for s in ("EURUSD", "NA", "NULL", "nan", "GBPUSD") for _ in range(3)]
    rows.append(("NA", "NA"))  # a missing price still reads as NaN: that bar is rejected and counted
    bars = dc.market.read_csv(_symbol_csv(tmp_path / "s.csv", rows))
    assert len(bars) == 16
    names = sorted(dc.instruments.name(int(i)) for i in np.unique(bars["instrument"]))
    assert names == sorted(["EURUSD", "NA", "NULL", "nan", "GBPUSD"])
    assert dc.market.reason_counts(dc.market.validate(bars)) == {"non_finite": 1}


def test_read_csv_strips_blanks_around_symbols(tmp_path):
    bars = dc.market.read_csv(_symbol_csv(tmp_path / "s.csv", [(" GBPUSD ", "1.15"), ("GBPUSD", "1.15")]))
    assert len(bars) == 2 and {dc.instruments.name(int(i)) for i in bars["instrument"]} == {"GBPUSD"}


def test_read_csv_refuses_rows_without_a_symbol_naming_them(tmp_path):
    rows = [("EURUSD", "1.15")] * 3 + [("", "1.15"), ("  ", "1.15")] + [("EURUSD", "1.15")] * 12
    with pytest.raises(ValueError, match=re.escape("2 row(s) with an empty 'symbol': rows 4, 5 ")):
        dc.market.read_csv(_symbol_csv(tmp_path / "s.csv", rows))
    rows = [("", "1.15")] * 12
    with pytest.raises(ValueError, match=re.escape("rows 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, ... ")):
        dc.market.read_csv(_symbol_csv(tmp_path / "s.csv", rows))


MT_BARS = [("2024.01.01", "22:00", "1.1", "1.2", "1.0", "1.15", "100"),
           ("2024.01.01", "23:00", "1.15", "1.25", "1.1", "1.2", "120"),
           ("2024.01.02", "00:00", "1.2", "1.3", "1.1", "1.25", "90")]
MT_TIMES = [1_704_146_400 * NS, 1_704_150_000 * NS, 1_704_153_600 * NS]  # 2024-01-01 22:00 UTC, hourly


def test_read_csv_reads_a_metatrader4_export_with_date_and_time_columns(tmp_path):
    """MetaTrader 4 writes the date and the time of day in two columns: the time alone got
    today's date (and pandas' format warning, an error under this suite's filter)."""
    path = tmp_path / "EURUSD60.csv"
    path.write_text("Date,Time,Open,High,Low,Close,Volume\n" + "".join(",".join(r) + "\n" for r in MT_BARS))
    b = dc.market.read_csv(path)
    assert b["ts"].tolist() == MT_TIMES and b["timeframe"].tolist() == [3600] * 3
    assert b["close"].tolist() == [1.15, 1.2, 1.25] and b["volume"].tolist() == [100, 120, 90]
    assert dc.instruments.name(int(b["instrument"][0])) == "EURUSD60"


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16"])
def test_read_csv_reads_a_metatrader5_export(tmp_path, encoding):
    """MetaTrader 5's export: tabs, <ANGLE> headers, dates with dots, and a tick volume beside a
    real volume that is all zeros for forex (the tick volume is then the volume)."""
    head = "<DATE>\t<TIME>\t<OPEN>\t<HIGH>\t<LOW>\t<CLOSE>\t<TICKVOL>\t<VOL>\t<SPREAD>\n"
    rows = [f"{d}\t{t}:00\t{o}\t{h}\t{lo}\t{c}\t{v}\t0\t5\n" for d, t, o, h, lo, c, v in MT_BARS]
    path = tmp_path / "EURUSD_H1.csv"
    path.write_text(head + "".join(rows), encoding=encoding)  # Python's utf-16 writes the byte order mark
    b = dc.market.read_csv(path)
    assert b["ts"].tolist() == MT_TIMES and b["timeframe"].tolist() == [3600] * 3
    assert b["open"].tolist() == [1.1, 1.15, 1.2] and b["volume"].tolist() == [100, 120, 90]
    assert dc.instruments.name(int(b["instrument"][0])) == "EURUSD_H1"
    assert (dc.market.validate(b) == 0).all()
    # a real volume with something in it is the volume
    path.write_text(head + "".join(r.replace("\t0\t5", "\t7\t5") for r in rows), encoding=encoding)
    assert dc.market.read_csv(path)["volume"].tolist() == [7, 7, 7]


def test_from_pandas_reads_date_and_time_columns_refusing_bad_ones():
    # the forms of a time of day may differ from row to row
    df = _ohlc(3, Date=["2024.01.01", "2024.01.01", "2024.01.02"], Time=["23:59:59.5", "00:00", "00:00:01"])
    assert dc.market.from_pandas(df, "DATETIME", "1s")["ts"].tolist() == [
        1_704_067_200 * NS, 1_704_153_599 * NS + NS // 2, 1_704_153_601 * NS]
    with pytest.raises(ValueError, match=r"of time column 'Time' with a missing or unreadable time of day .*rows 1 "):
        dc.market.from_pandas(df.assign(Time=["00:00", "24:00", "00:01"]), "DATETIME", "1s")
    with pytest.raises(ValueError, match=r"of date column 'Date' with a time of day besides the date.*rows 2 "):
        dc.market.from_pandas(df.assign(Date=["2024.01.01 00:00", "2024.01.01 00:00", "2024.01.02 05:00"]),
                              "DATETIME", "1s")
    with pytest.raises(ValueError, match=r"of date column 'Date' with a missing, unreadable.*rows 0 "):
        dc.market.from_pandas(df.assign(Date=[None, "2024.01.01", "2024.01.02"]), "DATETIME", "1s")


def _symbols_file(path, sep: str, symbols=("AAA", "BBB")):
    """Hourly bars of ``symbols`` with a symbol column, fields separated by ``sep``."""
    lines = ["time,symbol,open,high,low,close"] + [
        f"2024-01-01 {h:02d}:00,{sym},1.1,1.2,1.0,1.15" for h in range(4) for sym in symbols]
    path.write_text("".join(line.replace(",", sep) + "\n" for line in lines))
    return path


@pytest.mark.parametrize("sep", [",", ";", "\t"], ids=["comma", "semicolon", "tab"])
def test_read_csv_with_an_instrument_takes_its_rows_from_the_symbol_column(tmp_path, sep):
    """Given an instrument, a file with a symbol column yields that instrument's rows, or a
    refusal naming those it has, whatever its separator: every row was named the instrument."""
    path = _symbols_file(tmp_path / "sym.csv", sep)
    assert len(dc.market.read_csv(path)) == 8
    b = dc.market.read_csv(path, instrument="BBB")
    assert len(b) == 4 and set(b["instrument"].tolist()) == {dc.instruments.id("BBB")}
    assert dc.market.read_csv(path, instrument=dc.instruments.id("AAA")).tobytes() == \
        dc.market.read_csv(path)[::2].tobytes()
    with pytest.raises(ValueError, match=re.escape("sym.csv has no instrument 'FOO' (it has AAA, BBB) in its "
                                                   "'symbol' column")):
        dc.market.read_csv(path, instrument="FOO")


@pytest.mark.parametrize("sep", [",", ";", "\t"], ids=["comma", "semicolon", "tab"])
def test_backtest_refuses_an_instrument_the_symbol_column_lacks(tmp_path, sep):
    """One symbol in the file: the command line relabelled it as the instrument asked for when it
    did not find the symbol column (looked for with commas only)."""
    _symbols_file(tmp_path / "sym.csv", sep, symbols=("AAA",))
    proc = _cli("backtest", "--data", "sym.csv", "--instrument", "FOO", "-q", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "has no instrument 'FOO' (it has AAA)" in proc.stderr


@pytest.mark.parametrize("stem", ["x" * 65, " EURUSD", "EURUSD "], ids=["long", "leading-blank", "trailing-blank"])
def test_read_csv_says_where_an_invalid_instrument_name_came_from(tmp_path, stem):
    """A file without a symbol column is named after its stem: a stem that is no instrument name
    is refused saying so and how to fix it, not as a name the user never gave."""
    path = tmp_path / f"{stem}.csv"
    path.write_text("time,open,high,low,close\n2024-01-01 00:00,1,1,1,1\n2024-01-01 01:00,1,1,1,1\n")
    with pytest.raises(ValueError, match=re.escape(
            f"{path}: the file has no symbol column, so its stem names its instrument, and that fails: invalid "
            f"instrument name {stem!r}: 1-64 printable characters, no padding; rename the file, add a symbol "
            f"column, or give the instrument (instrument= in Python, --instrument on the command line)")):
        dc.market.read_csv(path)
    assert len(dc.market.read_csv(path, instrument="STEMLESS")) == 2


GOOD_CSV = "time,open,high,low,close\n" + "".join(f"2024-01-01 {h:02d}:00,1.1,1.2,1.0,1.15\n" for h in range(24))


def test_read_csv_reads_a_pipe_once(tmp_path):
    """A FIFO (a pipe, /dev/stdin) can be read once; the loader read it three times (separator,
    header, data) and found it empty: "No columns to parse from file"."""
    import threading

    (tmp_path / "file.csv").write_text(GOOD_CSV)
    want = dc.market.read_csv(tmp_path / "file.csv", instrument="PIPED")
    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    got: dict[str, object] = {}

    def read() -> None:
        try:
            got["bars"] = dc.market.read_csv(fifo, instrument="PIPED")
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            got["error"] = e

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    fifo.write_text(GOOD_CSV)  # waits for the reader to open the FIFO
    reader.join(30)
    while reader.is_alive():  # a loader that opens the FIFO again waits for a writer: give it one, empty
        with open(fifo, "w"):
            pass
        reader.join(5)
    assert "error" not in got, got["error"]
    assert got["bars"].tobytes() == want.tobytes()


def test_run_reads_bars_piped_to_dev_stdin(tmp_path):
    proc = _cli("run", "--data", "/dev/stdin", "--agents", "200", cwd=tmp_path, stdin=GOOD_CSV)
    assert proc.returncode == 0, proc.stderr
    assert "Processed 24 of 24 bars" in proc.stdout


def test_read_csv_warns_naming_cells_that_are_not_numbers(tmp_path):
    """A thousands separator (here in a quoted cell) reads as NaN and the bar is a non_finite
    reject, as for a gap in the data: kept, but a warning names the column and rows, so a
    format problem shows as one."""
    path = tmp_path / "prices.csv"
    rows = [f"2024-01-01 {h:02d}:00,AAA,1000,1001,999,1000" for h in range(6)]
    rows[1] = '2024-01-01 01:00,AAA,"1,000.5",1001,999,1000'
    rows[4] = "2024-01-01 04:00,AAA,1000,1001,999,1000 USD"
    rows[5] = "2024-01-01 05:00,AAA,1000,1001,999,"  # missing: NaN data, no warning of its own
    path.write_text("time,symbol,open,high,low,close\n" + "\n".join(rows) + "\n")
    msg = (f"{path}: 2 price/volume cell(s) are not numbers, read as missing, and their bars are rejected as "
           f"non_finite: column 'open' row 2 ('1,000.5'); column 'close' row 5 ('1000 USD'); rows counted from 1 "
           f"after the header. Write plain numbers (no thousands separators or units), or check the separator "
           f"and decimal mark")
    with pytest.warns(UserWarning, match=re.escape(msg)) as rec:
        b = dc.market.read_csv(path)
    assert len(rec) == 1 and rec[0].filename == __file__  # at the caller's line
    assert dc.market.reason_counts(dc.market.validate(b)) == {"non_finite": 3}
    path.write_text(path.read_text().replace(",AAA,", ","). replace("symbol,", ""))  # no symbol column
    with pytest.warns(UserWarning, match=re.escape(msg)):
        dc.market.read_csv(path, instrument="AAA")
    df = pd.DataFrame({"time": pd.date_range("2024-01-01", periods=3, freq="h"), "Open": ["1", "x", "y"],
                       "High": 2.0, "Low": 0.5, "Close": 1.0, "Volume": ["1", "2", "3"]})
    with pytest.warns(UserWarning, match=r"the DataFrame: 2 price/volume .*: column 'Open' rows 1, 2 \('x' first\); "
                                         r"rows positions, from 0\.") as rec:
        dc.market.from_pandas(df, "TEXTCELLS", "H1")
    assert len(rec) == 1 and rec[0].filename == __file__


@pytest.mark.parametrize("rows", [0, 1])
def test_read_csv_of_too_few_rows_says_how_to_give_the_timeframe(tmp_path, rows):
    path = tmp_path / "short.csv"
    path.write_text("time,open,high,low,close\n" + "2024-01-01 00:00,1,1,1,1\n" * rows)
    # a header alone is said to be that (it asked for a timeframe, which then gave "no bars")
    with pytest.raises(ValueError, match=re.escape(
            "cannot infer the timeframe from fewer than two distinct times: give the timeframe (timeframe= in "
            "Python, --timeframe on the command line)" if rows else "no rows: the data holds no bars")):
        dc.market.read_csv(path)
    assert len(dc.market.read_csv(path, timeframe="H1")) == rows


@pytest.mark.parametrize("tf,sec", [(60, 60), ("M5", 300), ("H1", 3600), ("H4", 14400), ("D1", 86400),
                                    ("1h", 3600), ("15min", 900), ("1D", 86400), ("W1", 604800),
                                    ("0.5m", 30), ("2000ms", 2), (np.uint32(60), 60), (2**32 - 1, 2**32 - 1)])
def test_parse_timeframe(tf, sec):
    assert dc.market.parse_timeframe(tf) == sec


# timeframes are uint32 whole seconds: anything else is refused, never rounded or wrapped
NOT_WHOLE_SECONDS = ["1.5s", "1500ms", "0.5s", "0.01m", 1.5, 60.0, np.float64(90.0), "90.5", "60", True,
                     np.bool_(True), 0, -60, "-1h", 2**32, 2**40, "M0", "fortnightly", "nan"]


@pytest.mark.parametrize("bad", NOT_WHOLE_SECONDS, ids=repr)
def test_parse_timeframe_rejects(bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        dc.market.parse_timeframe(bad)


@pytest.mark.parametrize("bad", ["1.5s", 1.5, "0.01m", 0, -60, 2**32, True], ids=repr)
def test_population_and_engine_refuse_a_timeframe_that_is_not_whole_seconds(bad):
    """Every way a timeframe enters refuses it the same way (``"1.5s"`` used to become 1 s)."""
    from dynamic_core.learning.agents import learning_genomes
    from dynamic_core.ticks import TickAggregator

    named = re.escape(repr(bad))
    with pytest.raises(ValueError, match=named):
        dc.Engine(dc.Population.grid("EURUSD", bad), threads=1)
    with pytest.raises(ValueError, match=named):
        dc.Engine(dc.Population.random(64, instruments=["EURUSD"], timeframes=[bad]), threads=1)
    with pytest.raises(ValueError, match=named):
        dc.Population.random_on([("EURUSD", bad)], 64)
    with pytest.raises(ValueError, match=named):
        dc.sim.MarketSimulator(["EURUSD"], timeframe=bad)
    with pytest.raises(ValueError, match=named):
        TickAggregator(bad)
    with pytest.raises(ValueError, match=named):
        learning_genomes("EURUSD", bad, 4)


def test_population_and_engine_take_every_spelling_of_a_whole_timeframe():
    pop = dc.Population.grid("EURUSD", ["1h", "H1", 3600, np.int64(3600), "60min", "0.5m", "D1"])
    assert sorted(set(pop.records["timeframe"].tolist())) == [30, 3600, 86400]
    eng = dc.Engine(dc.Population.random(64, instruments=["EURUSD"], timeframes=["15m", "H1"], seed=2), threads=1)
    assert sorted(set(eng.population.records["timeframe"].tolist())) == [900, 3600]


def test_simulator_is_deterministic_valid_and_continuous():
    a = dc.sim.MarketSimulator(["EURUSD", "XAUUSD"], "H1", seed=4)
    b = dc.sim.MarketSimulator(["EURUSD", "XAUUSD"], "H1", seed=4)
    x = np.concatenate([a.bars(300), a.bars(200)])
    y = b.bars(500)
    assert x.tobytes() == y.tobytes()
    assert (dc.market.validate(x) == 0).all()
    assert (np.diff(x["ts"]) >= 0).all()
    assert len(set(np.concatenate(a.regimes))) >= 2  # the regime chain switches
    eur = y[y["instrument"] == dc.instruments.id("EURUSD")]["close"]
    vol = np.std(np.diff(np.log(eur))) * np.sqrt(24 * 365.25)
    assert 0.02 < vol < 0.5  # FX-like annualised volatility
    assert dc.sim.MarketSimulator(["EURUSD"], seed=5).bars(50).tobytes() != y.tobytes()


@pytest.mark.parametrize("kwargs, error, match", [
    ({"seed": None}, TypeError, "seed must be an int"),  # None would draw an OS seed: no longer "same seed"
    ({"seed": -1}, ValueError, "seed must be in"),
    ({"seed": [1, 2]}, TypeError, "seed must be an int"),
    ({"start": None}, TypeError, "start must be a time or an epoch number"),  # NaT: every bar at int64 min
    ({"start": float("nan")}, ValueError, "start nan is a missing or non-finite time"),
    ({"start": "soon"}, ValueError, "start 'soon' is a missing, unreadable or out-of-range time"),
    ({"start": "1600-01-01"}, ValueError, "outside the int64 nanosecond range"),
    ({"start": True}, ValueError, "start holds booleans"),
    ({"instruments": ["EURUSD", "GBPUSD", "EURUSD"]}, ValueError, "'EURUSD' is named twice"),
])
def test_simulator_refuses_arguments_that_would_make_another_market(kwargs, error, match):
    with pytest.raises(error, match=match):
        dc.sim.MarketSimulator(**kwargs)


def test_simulator_start_reads_times_as_a_bar_time_column_does():
    import datetime

    import pandas as pd

    want = dc.sim.MarketSimulator(start="2024-01-01 01:00").bars(1)["ts"][0]
    paris = datetime.timezone(datetime.timedelta(hours=1))
    for start in (1704070800, np.int64(1704070800) * 10**9, datetime.datetime(2024, 1, 1, 2, tzinfo=paris),
                  pd.Timestamp("2024-01-01 02:00", tz="Europe/Paris"), np.datetime64("2024-01-01T01:00")):
        assert dc.sim.MarketSimulator(start=start).bars(1)["ts"][0] == want, start


def test_simulator_makes_long_runs_in_parts_with_the_same_bits(monkeypatch):
    # bars() walks in parts of _CHUNK bars to bound its temporaries: the parts must not show
    whole = dc.sim.MarketSimulator(["EURUSD", "XAUUSD"], seed=2).bars(1000)
    monkeypatch.setattr(dc.sim, "_CHUNK", 64)
    parts = dc.sim.MarketSimulator(["EURUSD", "XAUUSD"], seed=2)
    assert parts.bars(1000).tobytes() == whole.tobytes()
    assert len(parts.regimes[0]) == 1000


def test_simulated_market_is_the_same_bits_release_to_release():
    """The built-in market is part of what makes a run reproducible: these bars (three seeds,
    instrument sets and chunkings) and their regime paths hash to the value the simulator gave
    when its per-bar loop still ran on numpy arrays. A change to the simulated market must be
    deliberate and change this value. Re-pinned once when the simulator stopped depending on
    the CPU: numpy's vector exp gave other last bits on an AVX-512 machine than on an AVX2 one
    (d9966c2d... there, 324b5584... here), and numpy's Student-t, normal and lognormal samplers
    call the C library's exp/log/pow, whose FMA and non-FMA variants differ. Now the draws are
    uniforms turned into normals (Box-Muller) and Student-t(4) (normal / sqrt(chi2(4) / 4)) with
    dynamic_core.detmath, whose bits are the same on every machine (test_cross_machine.py)."""
    import hashlib

    d = hashlib.sha256()
    for seed, names, n, chunks in ((0, ("EURUSD", "GBPUSD", "USDJPY", "XAUUSD"), 3000, 1),
                                   (7, ("BTCUSD", "SPX"), 2500, 3),
                                   (3, tuple(f"SIM{i}" for i in range(9)), 400, 2)):
        sim = dc.sim.MarketSimulator(names, seed=seed)
        for _ in range(chunks):
            b = sim.bars(n // chunks)
            for f in ("ts", "timeframe", "open", "high", "low", "close", "volume"):
                d.update(np.ascontiguousarray(b[f]).tobytes())
            # instrument ids depend on this process's registry: hash the names
            d.update(",".join(dc.instruments.name(int(i)) for i in b["instrument"]).encode())
        d.update(repr(sim.regimes).encode())
    assert d.hexdigest() == "8fa0d0d5dba3b96fc600231c90394adc73476f80a05cda299934b33539304354"
    assert len(dc.sim.MarketSimulator(["EURUSD"], seed=1).bars(0)) == 0


def test_instrument_names_are_one_instrument_in_any_unicode_normal_form():
    import unicodedata

    nfc, nfd = (unicodedata.normalize(f, "CAFÉ_NORM.PA") for f in ("NFC", "NFD"))
    assert nfc != nfd
    i = dc.instruments.id(nfd)
    assert dc.instruments.id(nfc) == i and dc.instruments.name(i) == nfc
    assert dc.instruments.get(nfd) == dc.instruments.lookup(nfd) == i and nfd in dc.instruments


@pytest.mark.parametrize("bad", [1.7, True, "0", None, b"0"])
def test_instrument_name_takes_integer_ids_only(bad):
    # name(1.7) and name(True) gave instrument 1; name("0") said unknown instead of wrong type
    with pytest.raises(TypeError, match="int"):
        dc.instruments.name(bad)
    assert dc.instruments.name(np.uint32(dc.instruments.id("EURUSD"))) == "EURUSD"
    with pytest.raises(dc.errors.UnknownInstrument):
        dc.instruments.name(-1)


def test_the_inferred_timeframe_is_the_most_common_spacing():
    import pandas as pd

    h = 3_600_000_000_000
    t0 = 1_704_067_200 * 1_000_000_000

    def frame(hours):
        idx = pd.to_datetime([t0 + k * h for k in hours], utc=True)
        return pd.DataFrame({"open": 1.0, "high": 1.0, "low": 1.0, "close": 1.0}, index=idx)

    # a gap of three hours: the median spacing (2 h) matched no spacing in the data
    assert set(dc.market.from_pandas(frame([0, 1, 4]), "EURUSD")["timeframe"]) == {3600}
    # a weekend in daily bars, many missing hours: still the bars' own spacing
    assert set(dc.market.from_pandas(frame([0, 24, 48, 120, 144]), "EURUSD")["timeframe"]) == {86400}
    assert set(dc.market.from_pandas(frame([0, 1, 5, 9, 10, 14, 15]), "EURUSD")["timeframe"]) == {3600}


def test_a_time_column_of_times_of_day_without_dates_is_refused(tmp_path):
    path = tmp_path / "clock.csv"
    path.write_text("time,open,high,low,close\n00:00,1,1,1,1\n01:00,1,1,1,1\n02:00,1,1,1,1\n")
    with pytest.raises(ValueError, match="holds times of day without dates .*'00:00'.*add a date column"):
        dc.market.read_csv(path)  # pandas would have dated every bar today


def test_read_csv_with_a_trailing_delimiter_keeps_the_columns_in_place(tmp_path):
    p = tmp_path / "TRAIL.csv"
    p.write_text("time,open,high,low,close\n2024-01-01 00:00,1.0,2.0,0.5,1.5,\n2024-01-01 01:00,1.0,2.0,0.5,1.6,\n")
    r = dc.market.read_csv(p, timeframe="H1")  # pandas made the times the index: prices one column left
    assert r["open"].tolist() == [1.0, 1.0] and r["high"].tolist() == [2.0, 2.0]
    assert r["low"].tolist() == [0.5, 0.5] and r["close"].tolist() == [1.5, 1.6]
    assert r["ts"][0] == 1_704_067_200_000_000_000
    assert not dc.market.reason_counts(dc.market.validate(r))


# ---- time columns as vendors write them ----------------------------------------------------


def _real(name: str) -> pd.DataFrame:
    import backtesting.test as bt

    return getattr(bt, name)


def test_calendar_coded_whole_numbers_are_dates_not_epoch_seconds(tmp_path: Path) -> None:
    # GOOG daily with Date as 20040819 (read as epoch seconds, that was 1970-08-20 and one-second
    # bars): the same bars as from the DataFrame's DatetimeIndex
    goog = _real("GOOG")
    want = dc.market.from_pandas(goog, "GOOG")
    csv = goog.reset_index().rename(columns={goog.index.name or "index": "Date"})
    csv["Date"] = csv["Date"].dt.strftime("%Y%m%d").astype(np.int64)
    csv.to_csv(tmp_path / "GOOG.csv", index=False)
    got = dc.market.read_csv(tmp_path / "GOOG.csv")
    assert np.array_equal(got, want) and got["timeframe"][0] == 86400
    # the same as a DataFrame, as YYYYMMDDHHMM and YYYYMMDDHHMMSS, and as whole floats
    for fmt in ("%Y%m%d", "%Y%m%d%H%M", "%Y%m%d%H%M%S"):
        df = goog.reset_index(drop=True).assign(ts=goog.index.strftime(fmt).astype(np.int64))
        assert np.array_equal(dc.market.from_pandas(df, "GOOG"), want), fmt
    df = goog.reset_index(drop=True).assign(ts=goog.index.strftime("%Y%m%d").astype(float))
    assert np.array_equal(dc.market.from_pandas(df, "GOOG"), want)


def test_whole_numbers_that_are_not_all_real_dates_stay_epoch_numbers() -> None:
    base = {"open": 1.0, "high": 1.0, "low": 1.0, "close": 1.0}
    # 20230231 is no date: the column is epoch seconds (1970-08-23 ...)
    got = dc.market.from_pandas(pd.DataFrame({**base, "ts": [20230228, 20230231]}), "EPOCHS")
    assert got["ts"].tolist() == [20230228 * NS, 20230231 * NS]
    # hourly epoch seconds are never all YYYYMMDD codes
    t = 1_700_000_000 + 3600 * np.arange(48)
    got = dc.market.from_pandas(pd.DataFrame({**base, "ts": t}), "EPOCHS")
    assert got["ts"].tolist() == (t * NS).tolist()


def test_stooq_date_and_time_numbers_load_as_the_bars_times(tmp_path: Path) -> None:
    # <DATE>,<TIME> as 20170419,090000: the time column alone was read as epoch seconds (1970),
    # and 276 of 300 bars were rejected as duplicates
    eur = _real("EURUSD")
    want = dc.market.from_pandas(eur, "EURUSD")
    out = pd.DataFrame({"<TICKER>": "EURUSD", "<PER>": 60, "<DATE>": eur.index.strftime("%Y%m%d"),
                        "<TIME>": eur.index.strftime("%H%M%S"), "<OPEN>": eur["Open"], "<HIGH>": eur["High"],
                        "<LOW>": eur["Low"], "<CLOSE>": eur["Close"], "<VOL>": eur["Volume"]})
    out.to_csv(tmp_path / "EURUSD.csv", index=False)
    assert np.array_equal(dc.market.read_csv(tmp_path / "EURUSD.csv"), want)


def test_whole_number_times_of_day_below_2400_are_refused_as_ambiguous() -> None:
    df = pd.DataFrame({"date": 20240102, "time": np.arange(20) * 100, "open": 1.0, "high": 1.0, "low": 1.0,
                       "close": 1.0})
    with pytest.raises(ValueError, match="HHMM or HHMMSS cannot be told apart"):
        dc.market.from_pandas(df, "AMBIG")
    df["time"], df["date"] = 0, 20240102 + np.arange(20)  # midnight either way: a daily file
    got = dc.market.from_pandas(df, "AMBIG")["ts"]
    assert got.tolist() == [np.datetime64(f"2024-01-{d:02d}", "ns").astype(np.int64) for d in range(2, 22)]


def test_date_and_time_objects_load_together() -> None:
    eur = _real("EURUSD").iloc[:500]
    want = dc.market.from_pandas(eur, "EURUSD")
    t = pd.Series(eur.index)
    df = eur.reset_index(drop=True).assign(Date=t.dt.date.to_numpy(), Time=t.dt.time.to_numpy())
    assert np.array_equal(dc.market.from_pandas(df, "EURUSD"), want)


def test_a_datetime_index_gives_the_times_beside_helper_columns_and_must_agree_with_others() -> None:
    eur = _real("EURUSD").iloc[:300]
    want = dc.market.from_pandas(eur, "EURUSD")
    # a Date column of the index's dates: the index's hours, not 300 bars at midnight
    dates = eur.assign(Date=eur.index.strftime("%Y-%m-%d"))
    assert np.array_equal(dc.market.from_pandas(dates, "EURUSD"), want)
    # a Time column of times of day alone: the index has the dates
    assert np.array_equal(dc.market.from_pandas(eur.assign(Time=eur.index.strftime("%H:%M")), "EURUSD"), want)
    # a time column repeating the index
    assert np.array_equal(dc.market.from_pandas(eur.assign(time=eur.index), "EURUSD"), want)
    # other times: which one is meant is not for the loader to guess
    with pytest.raises(ValueError, match="DatetimeIndex and the time column 'time' disagree in 300 row"):
        dc.market.from_pandas(eur.assign(time=eur.index + pd.Timedelta("1h")), "EURUSD")


def test_from_pandas_honours_a_symbol_column_as_read_csv_does() -> None:
    bars = dc.sim.MarketSimulator(("SYMA", "SYMB"), seed=5).bars(40)
    df = dc.market.to_pandas(bars)
    assert np.array_equal(dc.market.from_pandas(df), bars)  # both instruments, not all labelled one
    only = dc.market.from_pandas(df, "SYMB")
    assert np.array_equal(only, bars[bars["instrument"] == dc.instruments.id("SYMB")])
    with pytest.raises(ValueError, match="has no instrument 'SYMC' .*SYMA, SYMB"):
        dc.market.from_pandas(df, "SYMC")
    with pytest.raises(ValueError, match="row\\(s\\) with an empty 'instrument': rows 3 "):
        dc.market.from_pandas(df.assign(instrument=df["instrument"].where(np.arange(len(df)) != 3)))
    with pytest.raises(ValueError, match="no instrument: give instrument="):
        dc.market.from_pandas(df.drop(columns=["instrument"]))


def test_a_decimal_comma_file_reads_dots_as_thousands_separators(tmp_path: Path) -> None:
    (tmp_path / "DE.csv").write_text("Datum;Open;High;Low;Close;Volume\n"
                                     "2017.04.19 09:00;1,0716;1,0722;1,07083;1,07219;1.413\n"
                                     "2017.04.19 10:00;1,07214;1.071,5;1,07214;1,0726;2.041,5\n")
    with pytest.raises(ValueError, match="no time column"):
        dc.market.read_csv(tmp_path / "DE.csv")
    (tmp_path / "DE.csv").write_text((tmp_path / "DE.csv").read_text().replace("Datum", "Date"))
    got = dc.market.read_csv(tmp_path / "DE.csv")
    assert got["volume"].tolist() == [1413.0, 2041.5] and got["high"].tolist() == [1.0722, 1071.5]
    assert got["close"].tolist() == [1.07219, 1.0726]
    want = [np.datetime64(f"2017-04-19T{h}:00", "ns").astype(np.int64) for h in ("09", "10")]
    assert got["ts"].tolist() == want


def _hours_ns(start: str, n: int) -> np.ndarray:
    return pd.date_range(start, periods=n, freq="h").to_numpy().astype("datetime64[ns]").view(np.int64)


def _dmy_frame(days: range) -> pd.DataFrame:
    t = pd.date_range("2017-05-01", periods=24 * len(days), freq="h")
    return pd.DataFrame({"Date": t.strftime("%d/%m/%Y %H:%M"), "Open": 1.0, "High": 1.0, "Low": 1.0,
                         "Close": 1.0})


def test_day_first_dates_are_read_day_first_when_the_values_say_so() -> None:
    # ten days of 01/05/2017 .. 10/05/2017 then 11/05 .. 20/05: the 13th decides
    want = _hours_ns("2017-05-01", 24 * 20)
    got = dc.market.from_pandas(_dmy_frame(range(20)), "DMY")
    assert got["ts"].tolist() == want.tolist() and got["timeframe"][0] == H1


def test_dates_that_could_be_either_order_warn_and_dayfirst_decides() -> None:
    df = _dmy_frame(range(10))  # 01/05 .. 10/05: May, or ten months of January 5th ...
    with pytest.warns(UserWarning, match="read month first .* pass dayfirst=True") as rec:
        got = dc.market.from_pandas(df, "DMY")
    assert rec[0].filename == __file__
    assert got["ts"][0] == np.datetime64("2017-01-05", "ns").astype(np.int64)
    want = _hours_ns("2017-05-01", 240)
    assert dc.market.from_pandas(df, "DMY", dayfirst=True)["ts"].tolist() == want.tolist()
    # dotted dates are day first in every locale that writes them
    dotted = df.assign(Date=df["Date"].str.replace("/", "."))
    assert dc.market.from_pandas(dotted, "DMY")["ts"].tolist() == want.tolist()
