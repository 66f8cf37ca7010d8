"""Populations: grids, random spreads, records round trip, validation naming rows, hashes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import dynamic_core as dc


def test_grid_is_cartesian_product_in_order():
    pop = dc.Population.grid("EURUSD", "H1", fast=[5, 10], slow=[20, 50, 100], entry=0.1, mode="long_only")
    r = pop.records
    assert len(pop) == 6
    assert list(zip(r["fast"], r["slow"])) == list(itertools.product([5, 10], [20, 50, 100]))
    assert (r["entry"] == 0.1).all() and (r["mode"] == 0).all()
    assert (r["instrument"] == dc.instruments.id("EURUSD")).all() and (r["timeframe"] == 3600).all()
    np.testing.assert_array_equal(r["agent_id"], np.arange(6))
    assert (r["rsi_period"] == dc.population.DEFAULTS["rsi_period"]).all()


def test_grid_over_instruments_and_timeframes():
    pop = dc.Population.grid(["EURUSD", "GBPUSD"], ["H1", "D1"], fast=[3, 4, 5])
    assert len(pop) == 12
    assert len(np.unique(pop.records[["instrument", "timeframe"]])) == 4


def test_grid_rejects_unknown_parameters_and_modes():
    with pytest.raises(TypeError, match="unknown genome parameter"):
        dc.Population.grid("EURUSD", "H1", fsat=[1])
    with pytest.raises(ValueError, match="mode"):
        dc.Population.grid("EURUSD", "H1", mode="sideways")
    with pytest.raises(ValueError, match="empty"):
        dc.Population.grid("EURUSD", "H1", fast=[])


def test_random_is_spread_evenly_and_deterministic():
    insts = ["EURUSD", "GBPUSD", "USDJPY"]
    a = dc.Population.random(1000, instruments=insts, timeframes=["H1", "H4"], seed=1)
    b = dc.Population.random(1000, instruments=insts, timeframes=["H1", "H4"], seed=1)
    c = dc.Population.random(1000, instruments=insts, timeframes=["H1", "H4"], seed=2)
    assert a.records.tobytes() == b.records.tobytes() and a.hash == b.hash
    assert a.hash != c.hash
    _, counts = np.unique(a.records[["instrument", "timeframe"]], return_counts=True)
    assert len(counts) == 6 and counts.max() - counts.min() <= 1
    r = a.records
    assert (r["slow"] > r["fast"]).all() and (r["w_trend"] == 0).any() and (r["w_trend"] != 0).any()


def test_from_records_round_trip_and_immutability():
    a = dc.Population.random(50, seed=3)
    b = dc.Population.from_records(a.records)
    assert b.records.tobytes() == a.records.tobytes() and b.hash == a.hash
    with pytest.raises(ValueError):
        a.records["fast"][0] = 3  # read-only
    rec = a.records.copy()
    rec["w_bb"][7] += 1.0
    assert dc.Population.from_records(rec).hash != a.hash


@pytest.mark.parametrize("field,value,msg", [
    ("fast", 0, "fast outside"),
    ("slow", 200_000, "slow outside"),
    ("w_rsi", np.nan, "w_rsi not finite"),
    ("w_mom", np.inf, "w_mom not finite"),
    ("w_dsi", np.nan, "w_dsi not finite"),
    ("mode", 7, "unknown mode"),
    ("entry", -0.1, "entry"),
    ("cost_bps", np.nan, "cost_bps"),
    ("kind", 3, "unknown kind"),
    ("timeframe", 0, "timeframe 0"),
    ("instrument", 3_999_999, "not registered"),
])
def test_invalid_genomes_name_rows(field, value, msg):
    rec = dc.Population.random(20, seed=1).records.copy()
    rec[field][[4, 11]] = value
    with pytest.raises(ValueError, match=msg) as ei:
        dc.Population.from_records(rec)
    assert ei.value.rows == [4, 11]
    assert "rows 4, 11" in str(ei.value)
    assert isinstance(ei.value, dc.errors.InvalidGenome)


def test_a_reason_shared_by_many_rows_is_said_once():
    with pytest.raises(dc.errors.InvalidGenome) as ei:
        dc.Population.grid("EURUSD", 3600, fast=list(range(2, 30)), cost_bps=-1)
    msg = str(ei.value)
    assert msg.count("cost_bps") == 1 and "rows 0, 1, 2" in msg and "(28 rows)" in msg
    assert ei.value.rows == list(range(28))


@pytest.mark.parametrize("value", [1j, "x", None, True, [1.0]])
def test_grid_refuses_a_weight_that_is_not_a_real_number(value):
    with pytest.raises(dc.errors.InvalidGenome, match="w_rsi: expected a real number"):
        dc.Population.grid("EURUSD", 3600, w_rsi=[0.5, value] if not isinstance(value, list) else [value])


@pytest.mark.parametrize("kw, err, msg", [
    (dict(seed=-1), ValueError, "seed must be in"),
    (dict(seed=1.5), TypeError, "seed must be an int"),
    (dict(dsi_share="0.5"), TypeError, "dsi_share must be a number"),
    (dict(dsi_share=1.5), ValueError, "dsi_share must be a finite number in"),
    (dict(cost_bps=-1), ValueError, "cost_bps must be a finite number in"),
    (dict(cost_bps=float("nan")), ValueError, "cost_bps"),
])
def test_random_names_a_bad_argument(kw, err, msg):
    with pytest.raises(err, match=msg):
        dc.Population.random(10, **kw)


def test_duplicate_agent_ids_are_invalid():
    rec = dc.Population.random(5, seed=1).records.copy()
    rec["agent_id"][3] = rec["agent_id"][1]
    with pytest.raises(ValueError, match="duplicate agent_id") as ei:
        dc.Population.from_records(rec)
    assert ei.value.rows == [3]


def test_wrong_record_type():
    with pytest.raises(TypeError, match="GENOME_DTYPE"):
        dc.Population(np.zeros(3))


def test_instruments_registry():
    i = dc.instruments.id("REGTEST")
    assert dc.instruments.id("REGTEST") == i and dc.instruments.name(i) == "REGTEST"
    assert "REGTEST" in dc.instruments and dc.instruments.get("NOPE_NOT_HERE") is None
    with pytest.raises(KeyError):
        dc.instruments.name(10**7)
    with pytest.raises(ValueError):
        dc.instruments.id(" padded ")
    with pytest.raises(TypeError):
        dc.instruments.id(5)


def test_score_to_action_thresholds():
    A = dc.Action
    cases = {-0.9: A.STRONG_SELL, -0.6: A.STRONG_SELL, -0.3: A.SELL, -0.2: A.SELL, 0.0: A.HOLD,
             0.19: A.HOLD, 0.2: A.BUY, 0.59: A.BUY, 0.6: A.STRONG_BUY}
    for s, a in cases.items():
        assert dc.score_to_action(s) is a
    np.testing.assert_array_equal(dc.score_to_action(np.array(list(cases))), [int(a) for a in cases.values()])


def test_score_to_action_scalar_and_array_agree_on_any_thresholds():
    # the array form used to overwrite in order: (0, 0, 0) gave STRONG_SELL, the scalar HOLD
    scores = np.array([-1.0, -0.6, -0.5, -0.1, -0.0, 0.0, 0.1, 0.5, 0.6, 1.0, np.nan])
    for weak, strong in [(0.0, 0.0), (0.0, 0.6), (0.5, 0.5), (0.2, 0.6), (0.6, 0.9)]:
        arr = dc.score_to_action(scores, weak, strong)
        one = [int(dc.score_to_action(float(x), weak, strong)) for x in scores]
        assert arr.tolist() == one, (weak, strong)
    assert dc.score_to_action([0.7, -0.3]).tolist() == [2, -1]


@pytest.mark.parametrize("args,err", [(("0.5",), TypeError), ((True,), TypeError), ((np.array(["a"]),), TypeError),
                                      ((0.1, -0.1, 0.6), ValueError), ((0.1, 0.7, 0.6), ValueError),
                                      ((0.1, float("nan"), 0.6), ValueError), ((0.1, 0.2, "x"), TypeError)])
def test_score_to_action_refuses_bad_arguments(args, err):
    with pytest.raises(err):
        dc.score_to_action(*args)


def test_dtypes_match_native_layouts():
    assert dc.BAR_DTYPE.itemsize == 56 and dc.GENOME_DTYPE.itemsize == 120
    assert dc.SIGNAL_DTYPE.itemsize == 104 and dc.AGENT_DTYPE.itemsize == 112
    assert dc.BAR_DTYPE.names == ("ts", "instrument", "timeframe", "open", "high", "low", "close", "volume")
    assert dc.SIGNAL_DTYPE["votes"].shape == (5,)
    assert dc.SIGNAL_DTYPE.names[8:10] == ("dispersion", "dsi") and dc.SIGNAL_DSI == 1


def test_cost_bps_is_bounded_so_equity_cannot_go_negative() -> None:
    # 20,000 bps made a reversal cost four times the equity: equity 7e75 with a 407% drawdown
    from dynamic_core.errors import InvalidGenome

    ok = dc.Population.grid("EURUSD", "H1", fast=5, slow=20, cost_bps=[0.0, 1000.0])
    assert len(ok) == 2
    with pytest.raises(InvalidGenome, match=r"cost_bps not a finite number in \[0, 1000\]"):
        dc.Population.grid("EURUSD", "H1", fast=5, slow=20, cost_bps=1000.5)
    rec = ok.records.copy()
    rec["cost_bps"][1] = 5000.0
    with pytest.raises(ValueError, match="cost_bps"):
        dc.Population.from_records(rec)


def test_a_grid_too_large_is_refused_before_its_values_are_read() -> None:
    # list(range(1, 10**12)) was built (and every value checked in Python) before the limit
    with pytest.raises(ValueError, match="grid of 999999999999 agents is larger than the 50M limit"):
        dc.Population.grid("EURUSD", "H1", fast=range(1, 10**12))
    gen = dc.Population.grid("EURUSD", "H1", fast=(f for f in (5, 10)), slow=range(20, 41, 10))
    assert gen.records["fast"].tolist() == [5, 5, 5, 10, 10, 10]
    assert gen.records["slow"].tolist() == [20, 30, 40] * 2
    with pytest.raises(TypeError, match="a set has no order"):
        dc.Population.grid("EURUSD", "H1", fast={5, 10})


_HASHES = """
import sys
import dynamic_core as dc
for name in sys.argv[1:]:
    dc.instruments.id(name)  # registered first: the ids this process hands out differ
print(dc.Population.grid("HASHPOP_A", "H1", fast=[3, 5]).hash,
      dc.Population.grid("HASHPOP_B", "H1", fast=[3, 5]).hash,
      dc.Population.random(50, instruments=["HASHPOP_B", "HASHPOP_A"], seed=1).hash)
"""


def test_the_population_hash_is_the_same_in_every_process_whatever_its_instrument_ids():
    """The hash is provenance in every signal, also on the feed other processes read. It hashed
    the records' instrument ids, which are per process: the same population had two hashes in
    two processes, and a population of HASHPOP_A in one took the hash of one of HASHPOP_B in the
    other (each name had the other's id)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    runs = []
    for first in ([], ["HASHPOP_B"], ["HASHPOP_X", "HASHPOP_A"]):
        out = subprocess.run([sys.executable, "-c", _HASHES, *first], capture_output=True, text=True, env=env,
                             check=True, timeout=120).stdout.split()
        runs.append(tuple(map(int, out)))
    assert runs[0] == runs[1] == runs[2], runs
    a, b, mixed = runs[0]
    assert len({a, b, mixed}) == 3
    here = (dc.Population.grid("HASHPOP_A", "H1", fast=[3, 5]).hash,
            dc.Population.grid("HASHPOP_B", "H1", fast=[3, 5]).hash)
    assert here == (a, b)


def test_population_arguments_refused_or_read_as_the_grid_reads_them():
    import pandas as pd

    with pytest.raises(TypeError, match="no order"):  # a set's order changes from process to process
        dc.Population.random(6, instruments={"EURUSD", "GBPUSD", "USDJPY"}, seed=1)
    with pytest.raises(TypeError, match="timeframes: a set"):
        dc.Population.random(6, instruments=["EURUSD"], timeframes={"H1", "D1"}, seed=1)
    for kw in (dict(w_rsi=10**400), dict(w_rsi=[0.0, 10**400]), dict(entry=2**1100)):
        with pytest.raises(dc.errors.InvalidGenome, match="beyond a float's range"):
            dc.Population.grid("EURUSD", "H1", **kw)
    series = dc.Population.grid("EURUSD", "H1", fast=pd.Series([3, 5, 7], index=[10, 11, 12]))
    assert series.hash == dc.Population.grid("EURUSD", "H1", fast=[3, 5, 7]).hash
    with pytest.raises(TypeError, match="no order"):
        dc.Population.grid("EURUSD", "H1", fast={3: "a", 5: "b"})
    for m in (True, np.True_):
        with pytest.raises(dc.errors.InvalidGenome, match="mode"):
            dc.Population.random(3, instruments=["EURUSD"], mode=m)
