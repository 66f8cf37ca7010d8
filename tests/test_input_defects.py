"""Input-handling defects: ambiguous and boolean price columns, huge names and scores in error
messages, 0-d score arrays, and populations too large for the machine's memory.

House rule checked here: bad input gives a typed error (TypeError/ValueError or a
``dynamic_core.errors`` type) with a short message saying what was expected, never a raw library
exception, a silently wrong result, or a megabyte of the input echoed back."""

from __future__ import annotations

import math
import sys

import numpy as np
import pandas as pd
import pytest

import dynamic_core as dc
from dynamic_core import population as population_module
from dynamic_core.errors import DynamicCoreError, UnknownInstrument

instruments_module = sys.modules["dynamic_core.instruments"]  # dc.instruments is the registry

SHORT = 300  # the longest message any of these errors may have


def _frame(columns: list[str], values: list[object] | None = None, n: int = 3) -> pd.DataFrame:
    """``n`` hourly rows of the named columns (duplicates allowed), prices 1.0 unless given."""
    values = values if values is not None else [1.0] * len(columns)
    df = pd.DataFrame([values] * n, columns=columns)
    df.index = pd.date_range("2024-01-01", periods=n, freq="h")
    return df


# ---- 1. duplicated (ambiguous) column names -------------------------------------------------

@pytest.mark.parametrize("columns, ambiguous", [
    (["open", "high", "low", "close", "close"], "close"),             # an exact duplicate
    (["open", "high", "low", "close", "Close"], "close"),             # a case variant
    (["Open", "high", "low", "close", "<OPEN>"], "open"),             # MetaTrader's spelling
    (["open", "high", "low", " close", "close "], "close"),           # blanks around
    (["open", "high", "low", "close", "volume", "Volume"], "volume"),  # the volume column too
    (["open", "high", "low", "close", "tick_volume", "TICK_VOLUME"], "tick_volume"),
], ids=repr)
def test_from_pandas_refuses_ambiguous_columns_naming_them(columns, ambiguous):
    """A raw pandas TypeError for exact duplicates (``df[name]`` was a DataFrame); silently the
    first column for case variants, losing the other column's data without a word."""
    with pytest.raises(ValueError, match=f"ambiguous columns.*'{ambiguous}'") as e:
        dc.market.from_pandas(_frame(columns), "DUPCOLS", "H1")
    for c in columns:
        if c.strip().strip("<>").lower() == ambiguous:
            assert repr(c) in str(e.value)


def test_from_pandas_refuses_ambiguous_time_columns():
    df = _frame(["open", "high", "low", "close"]).reset_index(drop=True)
    df.insert(0, "time", pd.date_range("2024-01-01", periods=3, freq="h"))
    df.insert(1, "Time", pd.date_range("2025-01-01", periods=3, freq="h"))
    with pytest.raises(ValueError, match="ambiguous columns 'time' and 'Time'"):
        dc.market.from_pandas(df, "DUPCOLS", "H1")


def test_the_ambiguity_message_stays_short_for_huge_column_names():
    big = "close" + " " * 10**6  # matches "close" (blanks ignored)
    with pytest.raises(ValueError, match="ambiguous columns") as e:
        dc.market.from_pandas(_frame(["open", "high", "low", "close", big]), "DUPCOLS", "H1")
    assert len(str(e.value)) < SHORT


def test_from_pandas_still_loads_distinct_columns():
    """Columns the loader does not read may share names (a second "spread") and the documented
    volume preference (volume, vol, real_volume, then tick volume) is no ambiguity."""
    b = dc.market.from_pandas(_frame(["open", "high", "low", "close", "spread", "spread", "vol", "tickvol"],
                                     [1.0, 2.0, 0.5, 1.5, 0, 0, 7.0, 3.0]), "DUPCOLS", "H1")
    assert b["close"].tolist() == [1.5] * 3 and b["volume"].tolist() == [7.0] * 3


@pytest.mark.parametrize("header", ["time,open,high,low,close,close", "time,open,high,low,close,Close",
                                    "time,open,high,low,close,<CLOSE>", "time,Time,open,high,low,close"])
def test_read_csv_refuses_ambiguous_columns_as_from_pandas_does(tmp_path, header):
    """pandas renames an exact duplicate ``close.1``: the first close column was taken silently."""
    ncols = header.count(",") + 1
    rows = [",".join(["2024-01-01 0%d:00" % i] * (2 if "Time" in header else 1)
                     + ["1.5"] * (ncols - (2 if "Time" in header else 1))) for i in range(3)]
    path = tmp_path / "dup.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    with pytest.raises(ValueError, match="ambiguous columns"):
        dc.market.read_csv(path, "DUPCSV", "H1")


def test_read_csv_ambiguous_columns_with_a_symbol_column(tmp_path):
    path = tmp_path / "dup.csv"
    path.write_text("symbol,time,open,high,low,close,CLOSE\nA,2024-01-01 00:00,1,1,1,1,2\n"
                    "A,2024-01-01 01:00,1,1,1,1,2\n")
    with pytest.raises(ValueError, match="ambiguous columns 'close' and 'CLOSE'"):
        dc.market.read_csv(path)


def test_read_csv_keeps_a_column_really_called_close_dot_1(tmp_path):
    """Not a pandas-renamed duplicate: a column of its own, which the loader does not read."""
    path = tmp_path / "ok.csv"
    path.write_text("time,open,high,low,close,close.1\n2024-01-01 00:00,1,2,0.5,1.5,9\n"
                    "2024-01-01 01:00,1,2,0.5,1.5,9\n")
    assert dc.market.read_csv(path, "DOT1")["close"].tolist() == [1.5, 1.5]


# ---- 2. boolean price and volume columns ------------------------------------------------------

BOOL_COLUMNS = {
    "bool": [True, False, True],
    "nullable boolean": pd.array([True, None, False], dtype="boolean"),
    "object bools": [True, False, None],
    "numbers and a bool": [1.5, True, 1.5],
}


@pytest.mark.parametrize("kind", list(BOOL_COLUMNS))
@pytest.mark.parametrize("column", ["open", "high", "low", "close", "volume", "tick_volume"])
def test_from_pandas_refuses_boolean_price_and_volume_columns(column, kind):
    """Read as prices 1.0 and 0.0 before: a bool is no price (nor volume), as it is no time."""
    volume = "tick_volume" if column == "tick_volume" else "volume"  # a tick volume is read without a volume
    df = _frame(["open", "high", "low", "close", volume]).astype(object)
    df[column] = list(BOOL_COLUMNS[kind]) if kind != "nullable boolean" else BOOL_COLUMNS[kind]
    with pytest.raises(ValueError, match=f"column '{column}' holds booleans, not numbers"):
        dc.market.from_pandas(df, "BOOLPRICE", "H1")


def test_read_csv_refuses_a_boolean_close_column(tmp_path):
    path = tmp_path / "b.csv"
    path.write_text("time,open,high,low,close\n2024-01-01 00:00,1,1,1,true\n2024-01-01 01:00,1,1,1,false\n")
    with pytest.raises(ValueError, match="column 'close' holds booleans"):
        dc.market.read_csv(path, "BOOLCSV", "H1")


def test_numeric_columns_still_load():
    df = _frame(["open", "high", "low", "close", "volume"], [1, 2, 0.5, np.float32(1.5), 10])
    b = dc.market.from_pandas(df, "NUMOK", "H1")
    assert b["close"].tolist() == [1.5] * 3 and b["volume"].tolist() == [10.0] * 3


# ---- 3. huge instrument names (and other echoed input) --------------------------------------

def test_short_repr():
    from dynamic_core._checks import short_repr

    assert short_repr("EURUSD") == "'EURUSD'"
    s = short_repr("A" * 10**6)
    assert s.startswith("'AAAA") and "..." in s and "1,000,000 characters" in s and len(s) < 80
    assert short_repr(10**5000) == "an int of about 5,001 digits"  # str() refuses over 4300 digits
    assert short_repr(-(10**400)) == "a negative int of about 401 digits"
    assert len(short_repr(list(range(10**5)))) < 80


def test_instrument_id_of_a_huge_name_gives_a_short_message():
    with pytest.raises(ValueError, match="invalid instrument name 'AAAA.*1,000,000 characters") as e:
        dc.instruments.id("A" * 10**6)
    assert len(str(e.value)) < SHORT


def test_a_huge_name_is_refused_before_its_unicode_normalisation(monkeypatch):
    calls = []
    real = instruments_module.unicodedata.normalize
    monkeypatch.setattr(instruments_module.unicodedata, "normalize",
                        lambda form, s: (calls.append(len(s)), real(form, s))[1])
    with pytest.raises(ValueError, match="invalid instrument name") as e:
        dc.instruments.id("e\u0301" * 10**6)
    assert len(str(e.value)) < SHORT
    assert dc.instruments.get("e\u0301" * 10**6) is None and "e\u0301" * 10**6 not in dc.instruments
    assert calls == []  # nothing normalised a 2-million-character string
    # within the bound, a decomposed name still composes to a valid one: 80 code points, 40 after NFC
    assert dc.instruments.name(dc.instruments.id("e\u0301" * 40)) == "\u00e9" * 40


def test_instrument_lookups_and_ids_keep_messages_short():
    with pytest.raises(UnknownInstrument, match="unknown instrument 'BBBB.*characters") as e:
        dc.instruments.lookup("B" * 10**6)
    assert len(str(e.value)) < SHORT
    # an id too large for str(): Python's own ValueError ("Exceeds the limit") came out before
    for big in (10**5000, -(10**5000), 2**64):
        with pytest.raises(UnknownInstrument, match="unknown instrument id") as e:
            dc.instruments.name(big)
        assert len(str(e.value)) < SHORT


def test_timeframe_and_csv_instrument_messages_stay_short(tmp_path):
    with pytest.raises(ValueError, match="cannot read timeframe 'xxxx.*characters") as e:
        dc.market.parse_timeframe("x" * 10**6)
    assert len(str(e.value)) < SHORT
    # Python's own "Exceeds the limit (4300 digits)" ValueError came out of these before
    for tf in ("M" + "9" * 5000, 10**5000):
        with pytest.raises(ValueError, match=r"timeframe .* is not between 1 s and 2\*\*32-1 s") as e:
            dc.market.parse_timeframe(tf)
        assert len(str(e.value)) < SHORT
    with pytest.raises(ValueError, match=r"timeframe 'H9999999999' \(35999999996400 s\) is not between"):
        dc.market.parse_timeframe("H9999999999")
    with pytest.raises(ValueError, match="n must be in .*an int of about 5,001 digits"):
        dc.Population.random(10**5000)
    path = tmp_path / "s.csv"
    path.write_text("symbol,time,open,high,low,close\nA,2024-01-01 00:00,1,1,1,1\n")
    with pytest.raises(ValueError, match="has no instrument 'ZZZZ") as e:
        dc.market.read_csv(path, "Z" * 10**6, "H1")
    assert len(str(e.value)) < SHORT + len(str(path))


# ---- 4. score_to_action: 0-d arrays and huge ints ---------------------------------------------

@pytest.mark.parametrize("score, action", [
    (np.array(0.5), dc.Action.BUY),
    (np.array(0.7, dtype=np.float32), dc.Action.STRONG_BUY),
    (np.array(-1, dtype=np.int8), dc.Action.STRONG_SELL),
    (np.array(0, dtype=np.uint64), dc.Action.HOLD),
    (np.array(math.nan), dc.Action.HOLD),
    (np.array(-0.3, dtype=np.float16), dc.Action.SELL),
])
def test_score_to_action_takes_a_0d_array_as_a_scalar(score, action):
    got = dc.score_to_action(score)
    assert isinstance(got, dc.Action) and got is action
    assert got == dc.score_to_action(score.item()) == dc.score_to_action(score.reshape(1))[0]


@pytest.mark.parametrize("score", [np.array(True), np.array("0.5"), np.array(0.5 + 0j), np.array(None)])
def test_score_to_action_refuses_0d_arrays_that_hold_no_real_number(score):
    with pytest.raises(TypeError, match="score must be a number"):
        dc.score_to_action(score)


@pytest.mark.parametrize("score", [10**400, -(10**400), 10**5000, np.array(10**400, dtype=object)],
                         ids=["1e400", "-1e400", "1e5000", "object 0-d array"])
def test_score_to_action_refuses_ints_beyond_float64(score):
    """An OverflowError from float() before (and a 0-d object array was a TypeError either way)."""
    exc = TypeError if isinstance(score, np.ndarray) else ValueError
    with pytest.raises(exc, match="score") as e:
        dc.score_to_action(score)
    assert len(str(e.value)) < SHORT
    if exc is ValueError:
        assert "out of range" in str(e.value)


def test_score_to_action_thresholds_too_large_give_a_short_message():
    """``check_real`` printed ``repr`` of the int: Python refuses to for over 4300 digits."""
    for big in (10**400, 10**5000):
        with pytest.raises(ValueError, match="weak must be a finite number") as e:
            dc.score_to_action(0.5, weak=big)
        assert len(str(e.value)) < SHORT


# ---- 5. populations that do not fit in memory -------------------------------------------------

def _meshgrid_records(instrument, timeframe, **params) -> np.ndarray:
    """The records as Population.grid built them with np.meshgrid (the oracle)."""
    axes = {"instrument": [dc.instruments.resolve(i) for i in list(population_module._axis_values("instrument", instrument))],
            "timeframe": [dc.market.parse_timeframe(t) for t in list(population_module._axis_values("timeframe", timeframe))]}
    for k, default in population_module.DEFAULTS.items():
        axes[k] = list(population_module._axis_values(k, params.get(k, default)))
    axes["mode"] = [population_module._mode_code(m) for m in axes["mode"]]
    n = math.prod(len(v) for v in axes.values())
    rec = np.zeros(n, dtype=dc.GENOME_DTYPE)
    rec["agent_id"] = np.arange(n, dtype=np.uint32)
    grids = np.meshgrid(*[np.asarray(axes[k]) for k in axes], indexing="ij")
    for k, g in zip(axes, grids):
        rec[k] = g.reshape(-1)
    return rec


@pytest.mark.parametrize("args, params", [
    (("GRIDA", "H1"), {}),                                                    # all scalars: one agent
    (("GRIDA", "H1"), {"fast": [5, 10], "slow": [20, 50, 100], "entry": 0.1, "mode": "long_only"}),
    ((["GRIDA", "GRIDB"], ["H1", "D1", 300]), {"fast": [3, 4, 5], "w_rsi": [0.0, -1.5]}),
    (("GRIDA", ["M5"]), {"fast": [2, 3], "slow": 30, "rsi_period": [7, 14, 21, 28],
                         "mode": ["long_only", 1], "cost_bps": [0.0, 2.5], "w_dsi": [0.0, 1.0],
                         "kind": [0, 1], "w_mom": np.array([1.0, 2.0]), "mom_period": (5,)}),
    (("GRIDA", "H4"), {"fast": np.arange(1, 40), "slow": [50.0, 60], "bb_period": [10, 20, 30]}),
], ids=repr)
def test_grid_records_are_those_meshgrid_built(args, params):
    pop = dc.Population.grid(*args, **params)
    oracle = _meshgrid_records(*args, **params)
    assert pop.records.dtype == oracle.dtype and pop.records.tobytes() == oracle.tobytes()


def test_grid_refuses_what_does_not_fit_in_available_memory(monkeypatch):
    from dynamic_core.errors import InsufficientMemory

    monkeypatch.setattr(population_module, "_available_memory", lambda: 1 << 20)  # 1 MiB free
    with pytest.raises(InsufficientMemory, match=r"grid of 100,000 agents needs ~0\.\d+ GiB of memory, "
                                                 r"0\.001 GiB available") as e:
        dc.Population.grid("MEMGRID", "H1", fast=list(range(1, 101)), slow=list(range(1, 1001)))
    assert isinstance(e.value, MemoryError) and isinstance(e.value, DynamicCoreError)
    assert dc.Population.grid("MEMGRID", "H1", fast=[1, 2, 3]).records["fast"].tolist() == [1, 2, 3]


def test_random_populations_are_checked_the_same_way(monkeypatch):
    from dynamic_core.errors import InsufficientMemory

    monkeypatch.setattr(population_module, "_available_memory", lambda: 1 << 20)
    with pytest.raises(InsufficientMemory, match="random population of 100,000 agents needs ~0"):
        dc.Population.random(100_000)
    with pytest.raises(InsufficientMemory, match="random population of 100,000 agents needs"):
        dc.Population.random_on([("MEMA", "H1"), ("MEMB", "D1")], 100_000)
    assert len(dc.Population.random(100)) == 100


def test_no_memory_check_where_available_memory_is_unknown(monkeypatch):
    monkeypatch.setattr(population_module, "_available_memory", lambda: None)
    grid = dc.Population.grid("MEMGRID", "H1", fast=list(range(1, 101)), slow=list(range(1, 101)))
    assert len(grid) == 10_000
    assert len(dc.Population.random(10_000)) == 10_000


def test_available_memory_reads_meminfo_and_cgroup_limits(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  16000000 kB\nMemFree:  1000000 kB\nMemAvailable:  8000000 kB\n")
    monkeypatch.setattr(population_module, "_MEMINFO", str(meminfo))
    monkeypatch.setattr(population_module, "_CGROUPS", ())
    assert population_module._available_memory() == 8_000_000 * 1024
    meminfo.write_text("MemTotal:       16000000 kB\n")  # an old kernel: no MemAvailable
    assert population_module._available_memory() is None
    monkeypatch.setattr(population_module, "_MEMINFO", str(tmp_path / "missing"))  # not Linux
    assert population_module._available_memory() is None
    # a container's limit counts where it leaves less; its page cache is reclaimable
    monkeypatch.setattr(population_module, "_MEMINFO", str(meminfo))
    meminfo.write_text("MemAvailable:    8000000 kB\n")
    v2 = [str(tmp_path / f) for f in ("memory.max", "memory.current", "memory.stat")]
    v1 = [str(tmp_path / f) for f in ("limit_in_bytes", "usage_in_bytes", "v1.stat")]
    monkeypatch.setattr(population_module, "_CGROUPS", ((*v2, "file"), (*v1, "total_cache")))
    (tmp_path / "memory.max").write_text("1073741824\n")
    (tmp_path / "memory.current").write_text("273741824\n")
    (tmp_path / "memory.stat").write_text("anon 73741824\nfile 200000000\nkernel 0\n")
    assert population_module._available_memory() == 1_000_000_000
    (tmp_path / "memory.max").write_text("max\n")  # no limit (v2); v1 files absent
    assert population_module._available_memory() == 8_000_000 * 1024
    (tmp_path / "limit_in_bytes").write_text("9223372036854771712\n")  # v1's "unlimited"
    (tmp_path / "usage_in_bytes").write_text("5000\n")
    assert population_module._available_memory() == 8_000_000 * 1024
    (tmp_path / "limit_in_bytes").write_text("600000\n")  # v1, no stat file: no cache counted
    assert population_module._available_memory() == 595_000
    monkeypatch.setattr(population_module, "_MEMINFO", str(tmp_path / "missing"))
    assert population_module._available_memory() == 595_000
