"""The ``dynamic-core`` command line: a live demo run and parameter-sweep backtests.

Two subcommands:

``dynamic-core run``
    Runs a random population over simulated (or CSV) bars in chunks, with a progress bar and a
    live table of the latest fused signal per instrument, then prints a summary.
``dynamic-core backtest``
    Sweeps a parameter grid (``--fast 5:50:5 --slow 20:200:10``) over one data set and writes
    one CSV row per agent.

``main`` returns an exit code instead of raising, so it can be called in-process as well as
through the ``dynamic-core`` entry point or ``python -m dynamic_core``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import os
import shutil
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import __version__
from ._argtypes import count as _count
from ._argtypes import int_range, positive_float
from ._argtypes import positive_int as _positive_int
from ._argtypes import seed as _seed
from .engine import Engine
from .errors import DynamicCoreError
from ._launch import PROG
from .instruments import instruments
from .market import from_pandas, parse_timeframe, read_csv
from .population import DEFAULTS, MAX_AGENTS, MAX_PERIOD, Population
from .records import Action
from .sim import PROFILES, MarketSimulator

__all__ = ["main", "build_parser", "parse_values", "positive_float", "simulated_names"]

MAX_SIM_INSTRUMENTS = 64
MAX_AXIS_VALUES = 1_000_000
MAX_LEARNING = 10_000
"""``run --learning`` upper bound per stream: each learning agent carries its own LoRA state
(about 6 kB), so 10,000 per stream is already 240 MB on 4 streams and 3.5 GB on 64."""
BACKTESTING_SETS = ("EURUSD", "GOOG", "BTCUSD")

# The simulator's default four come first so `--instruments 4` means the same market as
# MarketSimulator(); the other named profiles follow, then generic SIM<k> names.
_SIM_ORDER = ["EURUSD", "GBPUSD", "USDJPY", "XAUUSD"] + [
    n for n in PROFILES if n not in ("EURUSD", "GBPUSD", "USDJPY", "XAUUSD")
]

_INT_PARAMS = ("fast", "slow", "rsi_period", "macd_fast", "macd_slow", "macd_signal", "atr_period",
               "bb_period", "mom_period")
_FLOAT_PARAMS = ("w_trend", "w_rsi", "w_macd", "w_bb", "w_mom", "w_dsi", "entry", "cost_bps")

_GENOME_HELP = {
    "fast": "fast EMA period of the trend feature, soft((EMA fast - EMA slow) / ATR)",
    "slow": "slow EMA period of the trend feature",
    "rsi_period": "RSI period of the RSI feature, (RSI - 50) / 50",
    "macd_fast": "fast EMA period of the MACD feature, soft(histogram / ATR)",
    "macd_slow": "slow EMA period of the MACD feature",
    "macd_signal": "signal EMA period of the MACD feature",
    "atr_period": "ATR period that scales the trend and MACD features",
    "bb_period": "period of the Bollinger feature, soft((close - mean) / 2 sd), exponentially weighted",
    "mom_period": "lookback of the momentum feature, soft(rate of change in %%)",
    "w_trend": "weight of the trend feature",
    "w_rsi": "weight of the RSI feature",
    "w_macd": "weight of the MACD feature",
    "w_bb": "weight of the Bollinger feature",
    "w_mom": "weight of the momentum feature",
    "w_dsi": "weight of the DSI microstructure evidence (Engine.set_dsi); a CLI backtest has none, "
             "so it changes nothing here",
    "entry": "|score| that takes a position, >= 0: long above +entry, short (or flat) below -entry, "
             "else the position is kept; 1 or more never trades",
    "cost_bps": "cost per unit of position change, in basis points of equity (0 to 1000)",
}
"""``backtest --help`` text of each genome option (the README's "What an agent does")."""

_ACTION_STYLE = {
    Action.STRONG_SELL: "bold red",
    Action.SELL: "red",
    Action.HOLD: "dim",
    Action.BUY: "green",
    Action.STRONG_BUY: "bold green",
}


class CLIError(Exception):
    """A problem with the command line or its inputs, reported as one line on stderr."""


# ---- argument parsing ------------------------------------------------------------------------

def simulated_names(k: int) -> list[str]:
    """The first ``k`` simulated instrument names: EURUSD, GBPUSD, USDJPY, XAUUSD, AUDUSD,
    BTCUSD, SPX, then SIM7, SIM8, ..."""
    if not 1 <= k <= MAX_SIM_INSTRUMENTS:
        raise CLIError(f"--instruments must be between 1 and {MAX_SIM_INSTRUMENTS}, got {k}")
    return (_SIM_ORDER + [f"SIM{i}" for i in range(len(_SIM_ORDER), k)])[:k]


def parse_values(text: str, kind: type = int) -> list[Any]:
    """Values of one grid axis from ``start:stop[:step]`` (stop INCLUSIVE), ``a,b,c`` or ``x``.

    Parameters
    ----------
    text : str
        ``"5:50:5"`` gives 5, 10, ..., 50; ``"5:50"`` steps by 1; ``"0:1:0.25"`` works for
        floats; ``"5,10,20"`` is a list; ``"12"`` a single value. Items of a comma list may
        themselves be ranges (``"5:10,20"``).
    kind : type
        ``int`` or ``float``: what each value must be.

    Returns
    -------
    list
        The values in the order written.

    Raises
    ------
    ValueError
        With a message that names the offending text.
    """
    s = text.strip()
    if not s:
        raise ValueError("empty value")
    out: list[Any] = []
    for item in s.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"empty item in list {text!r}")
        if ":" in item:
            out.extend(_parse_range(item, kind))
        else:
            out.append(_parse_number(item, kind, text))
        if len(out) > MAX_AXIS_VALUES:
            raise ValueError(f"{text!r} has more than {MAX_AXIS_VALUES:,} values")
    return out


def _parse_number(item: str, kind: type, whole: str) -> int | float:
    try:
        v = float(item)
    except ValueError:
        raise ValueError(f"{item!r} in {whole!r} is not a number") from None
    if not math.isfinite(v):
        raise ValueError(f"{item!r} in {whole!r} is not finite")
    if kind is int:
        if v != int(v):
            raise ValueError(f"{item!r} in {whole!r} is not a whole number")
        return int(v)
    return v


def _parse_range(item: str, kind: type) -> list[Any]:
    parts = item.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"bad range {item!r}: expected start:stop or start:stop:step")
    start, stop = (_parse_number(p.strip(), kind, item) for p in parts[:2])
    step = _parse_number(parts[2].strip(), kind, item) if len(parts) == 3 else kind(1)
    if step <= 0:
        raise ValueError(f"bad range {item!r}: step must be > 0")
    if stop < start:
        raise ValueError(f"bad range {item!r}: stop is below start")
    # the small tolerance keeps a float stop that is a whole number of steps away (0:1:0.1)
    span = (stop - start) / step + 1e-9
    if not span < MAX_AXIS_VALUES:  # also inf (1e308 / 1e-308) and huge floats: no int() of them
        more = f"{int(math.floor(span)) + 1:,}" if span < 1e18 else "too many"
        raise ValueError(f"range {item!r} has {more} values, more than {MAX_AXIS_VALUES:,}")
    n = int(math.floor(span)) + 1
    if kind is int:
        return [int(start + i * step) for i in range(n)]
    # rounding hides accumulated binary error: 0:1:0.1 gives 0.3, not 0.30000000000000004
    return [round(start + i * step, 12) for i in range(n)]


def _axis(kind: type) -> Callable[[str], list[Any]]:
    """A backtest axis: values, a range or a list (:func:`parse_values`); periods (int) must be
    1..MAX_PERIOD, refused here with the option's name rather than as invalid genome rows later."""
    def convert(text: str) -> list[Any]:
        try:
            values = parse_values(text, kind)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        bad = [v for v in values if kind is int and not 1 <= v <= MAX_PERIOD]
        if bad:
            raise argparse.ArgumentTypeError(f"a period must be 1..{MAX_PERIOD:,}, got {bad[0]:,}")
        return values

    convert.__name__ = "integer values" if kind is int else "values"
    return convert


_DAYFIRST_HELP = ("dates like 05/01/2017 in the data put the day first [default: decided by the dates; month "
                  "first, with a warning, when every date could be either]")
"""``--dayfirst`` of the commands that read data."""

_learning_count = int_range(0, MAX_LEARNING, span=f"0..{MAX_LEARNING:,} learning agents per stream")
"""``--learning``: learning agents per stream, 0 (off) to :data:`MAX_LEARNING`."""
_agent_count = int_range(1, MAX_AGENTS, span=f"1..{MAX_AGENTS:,} agents")
"""``--agents``, ``--evolve-agents``: a population's size, 1 to :data:`~dynamic_core.population.MAX_AGENTS`."""


def _instrument_choice(text: str) -> int | list[str]:
    """``--instruments``: a count of simulated names, or a comma list of names."""
    t = text.strip()
    if t.isdigit():
        k = int(t)
        if not 1 <= k <= MAX_SIM_INSTRUMENTS:
            raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_SIM_INSTRUMENTS}, got {k}")
        return k
    names = [n.strip() for n in t.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a count or a comma list of names")
    return names


def _timeframe(text: str) -> int:
    try:
        return parse_timeframe(text.strip() if not text.strip().isdigit() else int(text))
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _modes(text: str) -> list[str]:
    names = ["long_only", "long_short"] if text.strip() == "both" else [m.strip() for m in text.split(",")]
    bad = [m for m in names if m not in ("long_only", "long_short")]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {bad}: use long_only, long_short or both")
    return names


_MAIN_EPILOG = """\
examples:
  dynamic-core run                                  10,000 agents, 4 simulated instruments
  dynamic-core run --agents 100000 --bars 5000      a bigger population, a longer market
  dynamic-core run --data prices.csv                random agents over your own bars
  dynamic-core backtest --data backtesting:EURUSD --fast 5:50:5 --slow 20:200:10
  dynamic-core run --publish tcp://127.0.0.1:5556   stream the signals over ZeroMQ
  dynamic-core subscribe tcp://127.0.0.1:5556       print such a feed from another shell
  dynamic-core <command> --help                     options of one command

Data (--data) is a CSV file, "sim" for the built-in simulated market, or
"backtesting:EURUSD|GOOG|BTCUSD" for the sample data shipped with backtesting.py.
"""

_RUN_EPILOG = """\
examples:
  dynamic-core run
  dynamic-core run --agents 50000 --instruments 7 --bars 5000 --timeframe M15
  dynamic-core run --instruments EURUSD,BTCUSD --seed 3
  dynamic-core run --data prices.csv --agents 20000
  dynamic-core run --no-live > report.txt           plain tables, no animation
  dynamic-core run --paper                          trade the signals on a paper account
  dynamic-core run --paper --decision-config live.toml --shadow candidate.toml

CSV files need a header with Open, High, Low, Close (any case), optionally Volume, and a
time/timestamp/date column (or an unnamed first column: the index DataFrame.to_csv writes). A
symbol or instrument column splits
the rows by instrument; without one the file name is the instrument. The timeframe is inferred
from the spacing of the times unless --timeframe is given.

When stdout is not a terminal (a pipe, a file, CI) nothing is animated and only the final
tables are printed.

exit codes: 0 done; 1 nothing ran (every bar rejected), or a service's loop ended by an error;
2 a bad argument or input; 130 interrupted: ^C, and, for a service (--publish/--feed/--control),
SIGTERM too. Either stops a service gracefully: the signals of the bars the engine took are
published and the summary printed; a further ^C or SIGTERM meanwhile is ignored.
"""

_BACKTEST_EPILOG = """\
value syntax (every genome option):
  12            one value
  5,10,20       a list
  5:50:5        a range: start:stop:step, stop INCLUDED (5, 10, ..., 50)
  5:50          a range with step 1
  0:1:0.25      float ranges work for weights, --entry and --cost-bps
  5:10,20,30    lists of ranges
Values that start with "-" must be attached with "=": --w-rsi=-1:1:0.5

Every combination becomes one agent (a cartesian grid), so --fast 5:50:5 --slow 20:200:10
is 10 x 19 = 190 agents. Parameters not given keep the defaults: EMA(12)/EMA(26) trend
(w-trend 1, other weights 0), long_short, no costs.

examples:
  dynamic-core backtest --data backtesting:EURUSD --fast 5:50:5 --slow 20:200:10
  dynamic-core backtest --data prices.csv --fast 5,10,20 --slow 50:200:50 --mode both \\
      --cost-bps 0,1,2 --out sweep.csv
  dynamic-core backtest --data sim --instrument XAUUSD --bars 5000 --w-trend 0 \\
      --w-rsi 1 --rsi-period 7:21:7 --entry 0:0.3:0.1
"""

_SMC_EPILOG = """\
examples:
  dynamic-core smc backtesting:EURUSD                 the bundled EURUSD hourly bars
  dynamic-core smc prices.csv --swing-length 5        your own bars, tighter swings
  dynamic-core smc runs/today --engine                a journal's bars; also replay its signals
  dynamic-core smc backtesting:EURUSD --evolve 500 --evolve-plot evo.png

The reference labels come from the smartmoneyconcepts package (pip install 'dynamic_core[test]').
"""

_BRIDGE_EPILOG = """\
examples:
  dynamic-core bridge mt5 --simulated-terminal --duration 10    the whole path on one machine
  dynamic-core bridge mt5 --bind tcp://127.0.0.1:5560           wait for a real EA
  dynamic-core bridge mt5 --help                                every option of the MT5 bridge
"""


def _wrap(text: str) -> str:
    # RawDescriptionHelpFormatter keeps the epilogs' layout but stops wrapping descriptions too
    return textwrap.fill(" ".join(text.split()), width=min(100, shutil.get_terminal_size().columns - 2))


_Formatter = argparse.RawDescriptionHelpFormatter


def build_parser() -> argparse.ArgumentParser:
    """The ``dynamic-core`` argument parser with its ``run`` and ``backtest`` subcommands."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description=_wrap("Run thousands of trading micro-agents in parallel and fuse them into "
                          "consensus signals, or sweep a strategy parameter grid as a streaming backtest."),
        epilog=_MAIN_EPILOG, formatter_class=_Formatter,
    )
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    r = sub.add_parser(
        "run", help="run a random population with a live signal view",
        description=_wrap("Run a population of random agents over market bars in chunks, showing a "
                          "progress bar and the latest fused signal per instrument, then print the "
                          "top agents, the action mix, rejected bars and the throughput."),
        epilog=_RUN_EPILOG, formatter_class=_Formatter,
    )
    r.add_argument("--agents", type=_agent_count, default=10_000, metavar="N",
                   help="number of random agents, spread evenly over the instruments [default: 10000]")
    r.add_argument("--instruments", type=_instrument_choice, default=None, metavar="K|NAMES",
                   help="simulated instruments: a count K (the first K of EURUSD, GBPUSD, USDJPY, "
                        f"XAUUSD, AUDUSD, BTCUSD, SPX, SIM7, ...; at most {MAX_SIM_INSTRUMENTS}) "
                        "or a comma list of names [default: 4]")
    r.add_argument("--bars", type=_positive_int, default=None, metavar="N",
                   help="bars per instrument [default: 2000 simulated; with --data, all bars, "
                        "else the first N of each instrument]")
    r.add_argument("--timeframe", type=_timeframe, default=None, metavar="TF",
                   help="bar length: H1, M15, D1, 1h, or seconds [default: H1 simulated; "
                        "inferred from --data]")
    r.add_argument("--data", default=None, metavar="SOURCE",
                   help="CSV file (comma, semicolon or tab separated, with a header: time, open, high, low, "
                        "close[, volume][, symbol]), 'sim', or 'backtesting:EURUSD|GOOG|BTCUSD' instead of the "
                        "simulator")
    r.add_argument("--dayfirst", action="store_true",
                   help=_DAYFIRST_HELP)
    r.add_argument("--seed", type=_seed, default=0,
                   help="seed of the simulated market and of the population, 0 to 2**64-1 [default: 0]")
    r.add_argument("--cores-per-sm", type=int, choices=(32, 64, 96, 128), default=128,
                   help="agents (lanes) per streaming multiprocessor [default: 128]")
    r.add_argument("--chunk", type=_positive_int, default=None, metavar="N",
                   help="bars per engine call [default: 50 per instrument]")
    r.add_argument("--top", type=_positive_int, default=10, metavar="N",
                   help="agents listed in the summary [default: 10]")
    r.add_argument("--no-live", action="store_true",
                   help="no animation: print the latest-signal table once at the end")
    r.add_argument("-q", "--quiet", action="store_true",
                   help="print only the summary (no progress, no latest-signal table)")
    r.add_argument("--journal", default=None, metavar="DIR",
                   help="write an append-only journal of the run to DIR (new directory); "
                        "'dynamic-core replay DIR --verify' reproduces it bit for bit")
    r.add_argument("--learning", type=_learning_count, default=0, metavar="N",
                   help="add N learning agents per stream: external-score lanes whose LoRA-adapted heads "
                        "learn online from realised returns (the run then steps one bar time at a time; "
                        f"not with --publish/--feed/--control); 0 to {MAX_LEARNING:,} [default: 0, off]")
    r.add_argument("--fsync", type=int, choices=(0, 1, 2), default=None,
                   help="journal durability per batch: 0 OS, 1 data (fdatasync), 2 data + metadata [default: 0]")
    r.add_argument("--evolve", type=_count, default=0, metavar="N",
                   help="evolve the population while it trades: a generation of a stream every N of its bars "
                        "and when its volatility regime changes (the weakest 10%% of each SM replaced by "
                        "children of its fittest); prints the evolution trace [default: 0, off]")
    r.add_argument("--evolve-seed", type=_seed, default=None, metavar="S",
                   help="seed of the evolution's counter-based RNG, 0 to 2**64-1 [default: 0]")
    r.add_argument("--evolve-plot", default=None, metavar="PNG",
                   help="also plot best/median fitness per generation to this image file, in the format "
                        "of its extension (png, pdf, svg, ...; needs matplotlib)")
    r.add_argument("--backend", choices=("cpu", "cuda", "auto"), default="cpu",
                   help="where the agents run: cpu, cuda (an NVIDIA GPU through CuPy: pip install "
                        "'dynamic_core[cuda]'; same signals bit for bit) or auto (the GPU when usable) "
                        "[default: cpu]")
    r.set_defaults(func=cmd_run)

    b = sub.add_parser(
        "backtest", help="sweep a parameter grid and write per-agent results",
        description=_wrap("Build a cartesian grid of agent genomes from value ranges, run every agent "
                          "over the same bars in one streaming pass, write one CSV row per agent "
                          "(genome and final state: equity, Sharpe, drawdown, trades, ...) and print "
                          "the best by Sharpe."),
        epilog=_BACKTEST_EPILOG, formatter_class=_Formatter,
    )
    b.add_argument("--data", required=True, metavar="SOURCE",
                   help="CSV file, 'sim', or 'backtesting:EURUSD|GOOG|BTCUSD'")
    b.add_argument("--instrument", default=None, metavar="NAME",
                   help="instrument to test: selects it from a multi-instrument file, names a "
                        "single-instrument file, or picks the simulated one [default: all in the "
                        "data; EURUSD for sim]")
    b.add_argument("--timeframe", type=_timeframe, default=None, metavar="TF",
                   help="bar length (H1, D1, 1h, seconds) [default: inferred; H1 for sim]")
    b.add_argument("--bars", type=_positive_int, default=None, metavar="N",
                   help="bars per instrument [default: 2000 for sim; all bars of a file, else the first N]")
    b.add_argument("--dayfirst", action="store_true",
                   help=_DAYFIRST_HELP)
    b.add_argument("--seed", type=_seed, default=0,
                   help="seed of the simulated market (--data sim), 0 to 2**64-1 [default: 0]")
    genome = b.add_argument_group(
        "genome (each takes a value, list or inclusive range; see below)",
        _wrap("Per bar an agent blends features in [-1, 1] into score = soft(sum of weight x feature), "
              "soft(x) = x / (1 + |x|), then goes long above +entry and short (flat with long_only) "
              "below -entry. A weight of 0 leaves its feature out (its warm-up is not waited for). "
              f"Periods are in bars, 1 to {MAX_PERIOD:,}."))
    for name in _INT_PARAMS + _FLOAT_PARAMS:
        kind = int if name in _INT_PARAMS else float
        default = DEFAULTS[name]
        genome.add_argument(f"--{name.replace('_', '-')}", dest=name, type=_axis(kind), default=None,
                            metavar="V", help=f"{_GENOME_HELP[name]} [default: {default:g}]")
    genome.add_argument("--mode", type=_modes, default=None, metavar="MODE",
                        help="long_only, long_short, or both (comma list allowed) [default: long_short]")
    b.add_argument("--out", default="backtest_results.csv", metavar="FILE",
                   help="per-agent results CSV [default: backtest_results.csv]")
    b.add_argument("--cores-per-sm", type=int, choices=(32, 64, 96, 128), default=128,
                   help="agents (lanes) per streaming multiprocessor [default: 128]")
    b.add_argument("--top", type=_positive_int, default=10, metavar="N",
                   help="agents listed by Sharpe [default: 10]")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_backtest)

    from . import cli_journal

    cli_journal.add_commands(sub, _Formatter)

    # sockets: subscribe / ctl / keys, and run --publish/--feed/--control (cli_transport.py)
    from . import cli_transport

    cli_transport.add_commands(sub, _Formatter)
    cli_transport.add_run_options(r)

    # reasoning mesh: adapter / review, and run --reasoning (cli_reasoning.py)
    from . import cli_reasoning

    cli_reasoning.add_commands(sub, _Formatter)
    cli_reasoning.add_run_options(r)

    # trading: run --paper (cli_decision.py) and bridge mt5 (bridges/mt5/cli.py)
    from . import cli_decision

    cli_decision.add_run_options(r)

    sm = sub.add_parser(
        "smc", help="causal Smart Money Concepts detectors against the smartmoneyconcepts labels",
        description=_wrap("Run the causal SMC detectors (swings, BOS/CHoCH, fair value gaps, liquidity, "
                          "order blocks) over a journal's bars or a data source and print precision and "
                          "recall against the smartmoneyconcepts package's settled labels (it looks ahead, "
                          "so only labels that can no longer change are compared)."),
        epilog=_SMC_EPILOG, formatter_class=_Formatter)
    sm.add_argument("source", metavar="SOURCE",
                    help="a journal directory, a CSV file, or 'backtesting:EURUSD|GOOG|BTCUSD'")
    sm.add_argument("--swing-length", type=_positive_int, default=10, metavar="L",
                    help="bars on each side of a swing [default: 10]")
    sm.add_argument("--dayfirst", action="store_true",
                    help=_DAYFIRST_HELP)
    sm.add_argument("--engine", action="store_true",
                    help="with a journal: also replay it through the engine and verify its signals")
    sm.add_argument("--evolve", type=_count, default=0, metavar="N",
                    help="also replay the bars through random agents that evolve while they trade: a "
                         "generation of a stream every N of its bars and when its volatility regime changes; "
                         "prints the evolution trace (best/median fitness per generation) [default: 0, off]")
    sm.add_argument("--evolve-agents", type=_agent_count, default=None, metavar="K",
                    help="agents of the evolving population (with --evolve) [default: 2048]")
    sm.add_argument("--evolve-plot", default=None, metavar="PNG",
                    help="plot the evolution trace to this image file, one line per stream, in the format of "
                         "its extension (png, pdf, svg, ...; needs matplotlib)")
    sm.add_argument("-q", "--quiet", action="store_true",
                    help="no progress line on stderr (there is none either when stderr is not a terminal)")
    sm.set_defaults(func=cmd_smc)
    from .bridges.mt5 import cli as mt5_cli

    br = sub.add_parser("bridge", help="execution bridges: mt5 (MetaTrader 5 EA over ZeroMQ)",
                        description=_wrap("Run an execution bridge. 'mt5' serves a MetaTrader 5 Expert "
                                          "Advisor (shipped in dynamic_core/bridges/mql5/) over ZeroMQ; see "
                                          "docs/mt5-bridge.md for the protocol."),
                        epilog=_BRIDGE_EPILOG, formatter_class=_Formatter)
    bsub = br.add_subparsers(dest="bridge", metavar="BRIDGE", title="bridges")
    mt5_cli.add_parser(bsub, _Formatter)
    br.set_defaults(func=lambda a: (br.print_help(), 2)[1])
    return p


# ---- data ------------------------------------------------------------------------------------

def load_bars(source: str | None, *, sim_names: Sequence[str], bars: int | None, timeframe: int | None,
              seed: int, instrument: str | None = None, dayfirst: bool | None = None) -> np.ndarray:
    """Bars from ``source``: None or ``"sim"`` (the simulator), ``"backtesting:NAME"``, or a CSV path.

    ``instrument`` selects one instrument of the data (or names a single-instrument file);
    ``bars`` keeps the first N bars of each (instrument, timeframe) stream of loaded data, or is
    the simulated length (default 2,000).
    """
    if source is None or source.strip().lower() == "sim":
        sim = MarketSimulator(list(sim_names), timeframe=timeframe or "H1", seed=seed)
        return sim.bars(bars or 2000)
    if source.lower().startswith("backtesting:"):
        out = _backtesting_bars(source.split(":", 1)[1].strip(), instrument, timeframe)
    else:
        out = _csv_bars(source, instrument, timeframe, dayfirst)
    if len(out) == 0:
        raise CLIError(f"{source}: no bars")
    if bars is not None:
        out = _first_per_stream(out, bars)
    return out


def _backtesting_bars(name: str, instrument: str | None, timeframe: int | None) -> np.ndarray:
    key = name.upper()
    if key not in BACKTESTING_SETS:
        raise CLIError(f"unknown backtesting data set {name!r}: use one of {', '.join(BACKTESTING_SETS)}")
    try:
        import backtesting.test as bt
    except ImportError:
        raise CLIError(f"backtesting:{name} needs the backtesting package (it ships the data): "
                       "pip install backtesting") from None
    return from_pandas(getattr(bt, key), instrument=instrument or key, timeframe=timeframe)


def _csv_bars(path: str, instrument: str | None, timeframe: int | None,
              dayfirst: bool | None = None) -> np.ndarray:
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    if os.path.isdir(path):
        raise CLIError(f"{path} is a directory, not a CSV file")
    try:
        # with an instrument: that symbol's rows, or a single-instrument file named so
        return read_csv(path, instrument=instrument, timeframe=timeframe, dayfirst=dayfirst)
    except ValueError as e:
        # pandas' messages ("No columns to parse from file") do not say which file
        msg = str(e)
        raise CLIError(msg if path in msg else f"{path}: {msg}") from None


def _first_per_stream(bars: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` bars of every (instrument, timeframe) stream, keeping time order."""
    _, inverse = np.unique(_stream_keys(bars), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    starts = np.searchsorted(inverse[order], np.arange(inverse.max() + 1))
    rank = np.empty(len(bars), dtype=np.int64)
    rank[order] = np.arange(len(bars)) - starts[inverse[order]]
    return bars[rank < n]


def _stream_keys(rec: np.ndarray) -> np.ndarray:
    """One uint64 per record identifying its (instrument, timeframe) stream."""
    return rec["instrument"].astype(np.uint64) << np.uint64(32) | rec["timeframe"].astype(np.uint64)


def _streams(bars: np.ndarray) -> list[tuple[int, int]]:
    """Distinct (instrument id, timeframe) pairs in order of first appearance."""
    pairs = np.stack([bars["instrument"].astype(np.int64), bars["timeframe"].astype(np.int64)], axis=1)
    _, first = np.unique(pairs, axis=0, return_index=True)
    return [(int(pairs[i, 0]), int(pairs[i, 1])) for i in sorted(first)]


# ---- formatting ------------------------------------------------------------------------------

def tf_label(seconds: int) -> str:
    """``3600`` -> ``"H1"``, ``900`` -> ``"M15"``, ``86400`` -> ``"D1"``; other lengths in seconds."""
    for unit, size in (("W", 604_800), ("D", 86_400), ("H", 3_600), ("M", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{unit}{seconds // size}"
    return f"{seconds}s"


def _ts_label(ns: int) -> str:
    return np.datetime64(int(ns), "ns").astype("datetime64[s]").item().strftime("%Y-%m-%d %H:%M")


def _rate(x: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= size:
            return f"{x / size:.2f}{unit}"
    return f"{x:.0f}"


def _action_text(code: int):
    from rich.text import Text

    try:
        a = Action(int(code))
    except ValueError:
        return Text(str(code))
    return Text(a.name, style=_ACTION_STYLE[a])


def _signal_table(latest: dict[tuple[int, int], np.void], counts: dict[tuple[int, int], int],
                  rationales: dict[tuple[int, int], str] | None = None):
    from rich.table import Table

    t = Table(title="Latest fused signal per instrument", title_justify="left")
    t.add_column("instrument")
    t.add_column("tf")
    t.add_column("time (UTC)")
    t.add_column("action")
    for c in ("score", "conf", "agree", "agents", "signals"):
        t.add_column(c, justify="right")
    if rationales is not None:
        t.add_column("latest rationale", max_width=60, overflow="ellipsis", no_wrap=True)
    for key in sorted(latest, key=lambda k: (instruments.name(k[0]), k[1])):
        s = latest[key]
        row = [instruments.name(key[0]), tf_label(key[1]), _ts_label(s["ts"]), _action_text(s["action"]),
               f"{s['score']:+.3f}", f"{s['confidence']:.3f}", f"{s['agreement']:.3f}",
               f"{int(s['n_agents']):,}", f"{counts[key]:,}"]
        if rationales is not None:
            row.append(rationales.get(key, "..."))
        t.add_row(*row)
    return t


def _top_agents(agents: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` best agents by Sharpe (non-finite last, ties by agent id)."""
    sharpe = np.where(np.isfinite(agents["sharpe"]), agents["sharpe"], -np.inf)
    order = np.lexsort((agents["agent_id"], -sharpe))
    return order[:k]


def _win_rate(agents: np.ndarray) -> np.ndarray:
    trades = agents["trades"].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(trades > 0, agents["wins"] / np.maximum(trades, 1), np.nan)


def _agents_table(agents: np.ndarray, k: int, title: str, extra: Sequence[tuple[str, np.ndarray]] = (),
                  show_instrument: bool = True):
    from rich.table import Table

    top = _top_agents(agents, k)
    win = _win_rate(agents)
    t = Table(title=title, title_justify="left")
    t.add_column("#", justify="right")
    t.add_column("agent", justify="right")
    if show_instrument:
        t.add_column("instrument")
    for name, _ in extra:
        t.add_column(name, justify="right")
    for c in ("equity", "sharpe", "max dd", "trades", "win %"):
        t.add_column(c, justify="right")
    for rank, i in enumerate(top, 1):
        a = agents[i]
        row = [str(rank), str(int(a["agent_id"]))]
        if show_instrument:
            row.append(f"{instruments.name(int(a['instrument']))} {tf_label(int(a['timeframe']))}")
        row += [_fmt_value(col[i]) for _, col in extra]
        row += [f"{a['equity']:.4f}", f"{a['sharpe']:.2f}", f"{100 * a['max_drawdown']:.1f}%",
                f"{int(a['trades']):,}", "-" if not np.isfinite(win[i]) else f"{100 * win[i]:.1f}"]
        t.add_row(*row)
    return t


def _fmt_value(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        return f"{float(v):g}"
    return str(v)


def _actions_table(action_counts: np.ndarray, votes: np.ndarray | None = None):
    """Fused signals per action and, beside them, the agents' own actions (the SM vote counts
    summed over every signal): a population of opposing views fuses to HOLD while its agents
    buy and sell."""
    from rich.table import Table

    total = int(action_counts.sum())
    v_total = int(votes.sum()) if votes is not None else 0
    t = Table(title="Actions over all signals", title_justify="left",
              caption="agent actions: each warm agent's own view, bar by bar" if votes is not None else None,
              caption_justify="left")
    t.add_column("action")
    t.add_column("signals", justify="right")
    t.add_column("share", justify="right")
    if votes is not None:
        t.add_column("agent actions", justify="right")
        t.add_column("share", justify="right")
    for a in Action:
        n = int(action_counts[int(a) + 2])
        row = [_action_text(int(a)), f"{n:,}", f"{100 * n / total:.1f}%" if total else "-"]
        if votes is not None:
            m = int(votes[int(a) + 2])
            row += [f"{m:,}", f"{100 * m / v_total:.1f}%" if v_total else "-"]
        t.add_row(*row)
    return t


def _rejects_line(stats: dict[str, Any]) -> str:
    """Rejected bars by reason, and the valid bars of streams no agent follows (skipped)."""
    rejected = int(stats.get("rejected", 0))
    skipped = int(stats.get("skipped_unfollowed", 0))
    tail = f"; {skipped:,} valid bar(s) of streams no agent follows skipped" if skipped else ""
    if not rejected:
        return f"Rejected bars: none{tail}"
    parts = ", ".join(f"{k} {v:,}" for k, v in stats.get("rejects", {}).items() if v)
    return f"Rejected bars: {rejected:,} ({parts}){tail}"


def _throughput_line(stats: dict[str, Any], wall: float) -> str:
    updates = int(stats["agent_updates"])
    busy = float(stats["busy_seconds"])
    rate = updates / busy if busy > 0 else 0.0
    spent = f"{busy:.3f} s" if busy >= 0.1 else f"{1000 * busy:.2f} ms"
    return (f"{updates:,} agent updates in {spent} of engine time: {_rate(rate)} agent-updates/s "
            f"| wall time {wall:.2f} s")


_PIPE_WIDTH = 1000
"""Console width when stdout is not a terminal: no table of ours is this wide, so none is cut."""


def _console():
    from rich.console import Console

    # rich falls back to 80 columns when piped, which squeezes the tables; CI logs are wider
    # highlight off: rich's number highlighter would colour fragments such as "26." of "26.58M"
    if sys.stdout.isatty():
        return Console(highlight=False)
    # not a terminal: wide enough that no table is squeezed or cut (rich only pads a table to
    # its own width); COLUMNS still narrows it when set
    return Console(width=max(100, _env_int("COLUMNS", _PIPE_WIDTH)), highlight=False)


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


# ---- commands --------------------------------------------------------------------------------

@dataclass
class _Progress:
    """Running totals over the chunks fed to the engine."""

    latest: dict[tuple[int, int], np.void]
    counts: dict[tuple[int, int], int]
    actions: np.ndarray
    votes: np.ndarray = field(default_factory=lambda: np.zeros(5, dtype=np.int64))
    done: int = 0
    mesh: Any = None
    rationales: dict[tuple[int, int], str] | None = None

    @classmethod
    def new(cls, mesh: Any = None) -> _Progress:
        return cls({}, {}, np.zeros(5, dtype=np.int64), mesh=mesh, rationales={} if mesh is not None else None)

    def take_rationales(self) -> None:
        if self.mesh is None or self.rationales is None:
            return
        for upd in self.mesh.take_rationales(4096):
            text = " ".join(upd.text.split())
            self.rationales[(instruments.id(upd.instrument), upd.timeframe)] = f"{upd.provider}: {text}"

    def add(self, signals: np.ndarray, n_bars: int) -> None:
        self.done += n_bars
        if self.mesh is not None:
            self.mesh.submit_signals(signals)  # never blocks: rationales follow on their own
            self.take_rationales()
        if len(signals) == 0:
            return
        self.actions += np.bincount(np.clip(signals["action"], -2, 2) + 2, minlength=5)
        self.votes += signals["votes"].sum(axis=0, dtype=np.int64)  # the agents' own actions
        keys = _stream_keys(signals)
        uniq, inverse, cnt = np.unique(keys, return_inverse=True, return_counts=True)
        # the last signal of each stream: first occurrence in the reversed chunk
        last = len(keys) - 1 - np.unique(inverse[::-1], return_index=True)[1]
        for u, i, c in zip(uniq, last, cnt):
            key = (int(u >> np.uint64(32)), int(u & np.uint64(0xFFFFFFFF)))
            self.latest[key] = signals[i].copy()
            self.counts[key] = self.counts.get(key, 0) + int(c)


def _drive(eng: Engine, bars: np.ndarray, chunk: int, state: _Progress,
           on_chunk: Callable[[], None] | None = None, learners: Any = None, evo: Any = None) -> None:
    """Feed ``bars`` to ``eng`` ``chunk`` at a time; engine state carries over between calls.
    With learning agents, one time step at a time: each step's scores go in before its bars.
    With ``evo`` (an :class:`~dynamic_core.learning.evolution.Evolution`), generations run
    between the bars that trigger them."""
    run = eng.run if evo is None else evo.run
    if learners is not None:
        from .decision import time_steps

        for n, part in enumerate(time_steps(bars)):
            learners.step(part, eng)
            state.add(run(part), len(part))
            if on_chunk is not None and n % 50 == 0:
                on_chunk()
        if on_chunk is not None:
            on_chunk()
        return
    for start in range(0, len(bars), chunk):
        part = bars[start:start + chunk]
        state.add(run(part), len(part))
        if on_chunk is not None:
            on_chunk()


def _progress_bar(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("bars"), TimeElapsedColumn(), TextColumn("{task.fields[rate]}"),
                    console=console)


def learning_population(pop: Population, bars: np.ndarray, per_stream: int, seed: int) -> tuple[Population, Any]:
    """``pop`` plus ``per_stream`` learning agents on every stream of ``bars`` (ids after the
    population's), and the :class:`~dynamic_core.learning.agents.LearningAgents` that score them."""
    from .learning.agents import LearningAgents, learning_genomes

    first = int(pop.records["agent_id"].max()) + 1 if len(pop) else 0
    parts = []
    for k, (i, tf) in enumerate(_streams(bars)):
        parts.append(learning_genomes(i, tf, per_stream, first_id=first + k * per_stream))
    lg = np.concatenate(parts)
    return Population.from_records(np.concatenate([pop.records, lg])), LearningAgents(lg, seed=seed)


def _run_population(bars: np.ndarray, n_agents: int, seed: int) -> Population:
    """``n_agents`` random agents spread over exactly the streams present in ``bars``."""
    return Population.random_on(_streams(bars), n_agents, seed)


def cmd_run(args: argparse.Namespace) -> int:
    """``dynamic-core run``."""
    from . import cli_transport

    _options_need_their_parent(args)
    if getattr(args, "backend", "cpu") != "cpu" and (getattr(args, "paper", False) or cli_transport.wants_service(args)):
        raise CLIError("--backend cuda/auto runs the plain 'run' (and replay); --paper and --publish/--feed/--control "
                       "run on the CPU backend")
    if getattr(args, "reasoning", None):  # the broker's address, before any work or header
        from .transport._common import check_address

        check_address(args.reasoning_bind, bind=True, allow_remote=getattr(args, "allow_remote", False))
        from .cli_reasoning import check_reasoning_args

        check_reasoning_args(args)  # providers, secrets file and reasoning config: before the engine starts
    if getattr(args, "paper", False):
        if getattr(args, "evolve", 0):
            raise CLIError("--evolve does not combine with --paper yet: the decision layer's credit "
                           "ledger follows agent ids, which evolution replaces")
        if cli_transport.wants_service(args):
            raise CLIError("--paper runs in this process; it does not combine with --publish/--feed/--control")
        from . import cli_decision

        return cli_decision.cmd_run_paper(args)
    if getattr(args, "shadow", None) or getattr(args, "decision_config", None):
        raise CLIError("--decision-config and --shadow need --paper")
    if args.evolve_plot and not args.evolve:
        raise CLIError("--evolve-plot needs --evolve N")
    _need_matplotlib(args.evolve_plot)
    if cli_transport.wants_service(args):  # --publish/--feed/--control: behind sockets
        if args.evolve:
            raise CLIError("--evolve runs in the plain 'run'; it does not combine with --publish/--feed/--control yet")
        if args.learning:
            # the learning agents are scored one bar time at a time before that time's bars go in
            # (_drive); the service submits bars as its ingress takes them and has no such step
            raise CLIError("--learning runs in the plain 'run' (and --paper); it does not combine with "
                           "--publish/--feed/--control yet")
        return cli_transport.cmd_run_service(args)
    t0 = time.perf_counter()
    console = _console()
    bars, streams, pop, learners = run_inputs(args)
    eng = Engine(pop, cores_per_sm=args.cores_per_sm, journal=args.journal, fsync=args.fsync,
                 backend=getattr(args, "backend", "cpu"))
    chunk = args.chunk or 50 * len(streams)
    stream_names = ", ".join(f"{instruments.name(i)} {tf_label(tf)}" for i, tf in streams)
    feed = "one time step per engine call (learning agents)" if learners is not None else f"{chunk:,} per engine call"
    console.print(f"[bold]{PROG} run[/]: {len(pop):,} agents over {len(streams)} stream(s) "
                  f"({stream_names}), {len(bars):,} bars, {feed}"
                  + (f", on {eng.stats()['device']}" if eng.backend == "cuda" else ""))
    if eng.backend_fallback:
        console.print(f"backend auto: running on the CPU ({eng.backend_fallback})")
    mesh = None
    if args.reasoning:
        from .cli_reasoning import mesh_from_args

        try:
            mesh = mesh_from_args(args)
        except BaseException:
            eng.close()  # the journal, if any, ends cleanly
            raise
        console.print(f"reasoning mesh at {mesh.address}: adapters "
                      f"{', '.join(sorted({a['provider'] for a in mesh.adapters()})) or 'none yet'}, "
                      f"deadline {mesh.deadline_s:g}s")

    evo = None
    if args.evolve:
        from .learning.evolution import Evolution

        evo = Evolution(eng, every=args.evolve, seed=args.evolve_seed)
        console.print(f"evolution: a generation of a stream every {args.evolve:,} of its bars and on a "
                      f"volatility regime change (seed {args.evolve_seed})")
    state = _Progress.new(mesh)
    live = console.is_terminal and not (args.no_live or args.quiet)
    interrupted = False
    try:
        if live:
            _run_live(console, eng, bars, chunk, state, learners, evo)
        else:
            _drive(eng, bars, chunk, state, learners=learners, evo=evo)
    except KeyboardInterrupt:
        # summarise what ran so far; the exit code still says it was cut short
        interrupted = True
    except Exception as e:
        error = eng.stats().get("device_error") if eng.backend == "cuda" else None
        if error is None:
            raise
        # a GPU failure mid-run: one line (the journal, if any, ends cleanly and replays the run)
        if mesh is not None:
            mesh.close()
        eng.close()
        raise CLIError(f"the CUDA device failed after {state.done:,} bars: {error}"
                       + (f"; the journal {args.journal} replays what ran ({PROG} replay {args.journal})"
                          if args.journal else "")) from e
    wall = time.perf_counter() - t0

    if mesh is not None:
        mesh.wait_idle(timeout=mesh.deadline_s + 1.0)  # the last rationales (bounded by the deadline)
        state.take_rationales()
    if not live and not args.quiet and state.latest:
        console.print(_signal_table(state.latest, state.counts, state.rationales))
    agents = eng.agents()
    stats = eng.stats()
    console.print(_agents_table(agents, args.top, f"Top {min(args.top, len(agents))} agents by Sharpe"))
    console.print(_actions_table(state.actions, state.votes))
    console.print(_rejects_line(stats))
    # the engine's count: an interrupt can end a call after it took bars, before it returned them
    taken = int(stats["bars_in"])
    console.print(f"Processed {taken:,} of {len(bars):,} bars, {int(stats['signals']):,} signals, "
                  f"{len(pop):,} agents in {int(stats['n_warps']):,} warps / {int(stats['n_sms']):,} SMs")
    if taken > state.done:
        console.print(f"(the tables above leave out the last {taken - state.done:,} bars' signals: the "
                      "interrupt came before their call returned them)")
    console.print(_throughput_line(stats, wall))
    if learners is not None:
        console.print(_learning_line(learners, agents))
    if evo is not None:
        _evolution_summary(console, evo, args.evolve_plot)
    return finish_run(console, args, eng, mesh, interrupted,
                      lambda j: f"{j['records']:,} records, {j['bytes']:,} bytes, {j['syncs']:,} syncs")


def _need_matplotlib(plot: str | None) -> None:
    """Refuses --evolve-plot before any work when matplotlib cannot be imported or the file
    cannot be written."""
    if plot and importlib.util.find_spec("matplotlib") is None:
        raise CLIError("--evolve-plot needs matplotlib: pip install matplotlib (it is in the test extra)")
    if plot:
        _writable("--evolve-plot", plot)
        _plot_format("--evolve-plot", plot)


def _options_need_their_parent(args: argparse.Namespace) -> None:
    """Refuses options of ``run`` that would do nothing without the option they refine (rather
    than ignoring them), then gives the unset ones their defaults."""
    paper_only = (("--equity", args.equity is not None), ("--entry-score", args.entry_score is not None),
                  ("--no-credit", args.no_credit))
    _need_parent(args.paper, paper_only, "for the paper account of --paper: add --paper")
    _need_parent(args.publish, (("--json-feed", args.json_feed), ("--heartbeat", args.heartbeat is not None),
                                ("--wait-subscribers", args.wait_subscribers is not None)),
                 "for the signal feed of --publish: add --publish ADDR")
    _need_parent(args.publish or args.feed or args.control,
                 (("--duration", args.duration is not None), ("--allow-remote", args.allow_remote)),
                 "for a service: add --publish ADDR, --feed ADDR or --control ADDR")
    _need_parent(args.feed, (("--feed-kind", args.feed_kind is not None),),
                 "for the market socket of --feed: add --feed ADDR")
    _need_parent(args.control, (("--server-key", args.server_key is not None),
                                ("--authorized", args.authorized is not None)),
                 "for the control socket of --control: add --control ADDR")
    if args.fsync is not None and not args.journal:
        raise CLIError("--fsync is the journal's durability: add --journal DIR")
    if args.evolve_seed is not None and not args.evolve:
        raise CLIError("--evolve-seed seeds the evolution: add --evolve N")
    for name, default in (("equity", 100_000.0), ("fsync", 0), ("evolve_seed", 0), ("heartbeat", 1.0),
                          ("wait_subscribers", 0), ("feed_kind", "pull")):
        if getattr(args, name) is None:
            setattr(args, name, default)


def _need_parent(parent: Any, options: Sequence[tuple[str, bool]], why: str) -> None:
    """CLIError naming the ``options`` given (``(name, given)`` pairs) when ``parent`` is not."""
    given = [o for o, g in options if g]
    if given and not parent:
        raise CLIError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} {why}")


def _writable(option: str, path: str) -> None:
    """Refuses, before any work, an output file that could not be written at the end."""
    if not path.strip():
        raise CLIError(f"{option} needs a file name")
    out_dir = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(out_dir):
        raise CLIError(f"{option} {path}: no such directory {out_dir}")
    if os.path.isdir(path):
        raise CLIError(f"{option} {path} is a directory")
    if not os.access(out_dir, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise CLIError(f"{option} {path}: not writable")


def _write_whole(option: str, path: str, write: Callable[[Any], None]) -> None:
    """``write(file)`` into ``path`` so that it is either written whole or left as it was: a
    regular file (or a new one) is written next to it under a temporary name and renamed over it
    at the end, so an interrupt, a full disk or an error leaves no half-written results (and an
    earlier file intact); anything else (/dev/null, a pipe) is written in place. An OSError
    becomes a CLIError naming the option and the file."""
    special = os.path.exists(path) and not os.path.isfile(path)
    tmp = None
    try:
        if special:
            with open(path, "w", newline="") as f:
                write(f)
            return
        d, name = os.path.split(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{name}.", suffix=".part")
        # the permissions a plain open() would give (mkstemp's are 0600)
        umask = os.umask(0)
        os.umask(umask)
        mode = os.stat(path).st_mode & 0o7777 if os.path.exists(path) else 0o666 & ~umask
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", newline="") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise CLIError(f"{option} {path}: {e.strerror or e}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _evolution_summary(console: Any, evo: Any, plot: str | None) -> None:
    """The evolution trace (one line per generation) and, if asked, its plot."""
    if not evo.trace:
        console.print("evolution: no generation was due (fewer bars per stream than --evolve)")
        return
    born = sum(r.replaced for r in evo.trace)
    console.print(f"Evolution: {len(evo.trace)} generation(s), {born:,} children born")
    console.print(evo.table(), markup=False, highlight=False, soft_wrap=True)
    if plot:
        console.print(f"evolution trace plotted to {evo.plot(plot)}")


def run_inputs(args: argparse.Namespace) -> tuple[np.ndarray, list[tuple[int, int]], Population, Any]:
    """The bars, their streams, the population (random agents, plus ``--learning`` agents) and
    the learning agents' model (or None) of ``run`` and ``run --paper``."""
    if args.data is not None and args.data.strip().lower() != "sim" and args.instruments is not None:
        raise CLIError("--instruments chooses simulated instruments; with --data the instruments "
                       "are those found in the data")
    choice = 4 if args.instruments is None else args.instruments
    names = simulated_names(choice) if isinstance(choice, int) else choice
    bars = load_bars(args.data, sim_names=names, bars=args.bars, timeframe=args.timeframe, seed=args.seed,
                     dayfirst=args.dayfirst or None)
    pop = _run_population(bars, args.agents, args.seed)
    learners = None
    if args.learning:
        pop, learners = learning_population(pop, bars, args.learning, args.seed)
    return bars, _streams(bars), pop, learners


def finish_run(console: Any, args: argparse.Namespace, eng: Engine, mesh: Any, interrupted: bool,
               journal_summary: Callable[[dict[str, Any]], str]) -> int:
    """The common end of ``run`` and ``run --paper``: the journal line (``journal_summary`` of the
    engine's journal statistics), the mesh summary, closing everything, and the exit code (130
    when interrupted, 1 when every bar was rejected: nothing ran)."""
    stats = eng.stats()
    if args.journal:
        console.print(f"Journal {args.journal}: {journal_summary(stats['journal'])} "
                      f"(replay: {PROG} replay {args.journal} --verify)")
    if mesh is not None:
        from .cli_reasoning import mesh_summary

        mesh_summary(console, mesh)
        mesh.close()
    eng.close()
    if interrupted:
        console.print("[yellow]interrupted[/]")
        return 130
    if _all_rejected(stats):
        return 1
    return 0


def _all_rejected(stats: dict[str, Any]) -> bool:
    """True (after saying so on stderr) when bars came in and every one was rejected."""
    taken = int(stats["bars_in"])
    if taken == 0 or int(stats["rejected"]) < taken:
        return False
    _error(f"every one of the {taken:,} bars was rejected (reasons above): nothing ran")
    return True


def _run_live(console, eng: Engine, bars: np.ndarray, chunk: int, state: _Progress, learners: Any = None,
              evo: Any = None) -> None:
    from rich.console import Group
    from rich.live import Live

    progress = _progress_bar(console)
    task = progress.add_task("running", total=len(bars), rate="")

    def view():
        return Group(progress, _signal_table(state.latest, state.counts, state.rationales))

    with Live(view(), console=console, refresh_per_second=10, transient=False) as live:
        def update() -> None:
            s = eng.stats()
            busy = s["busy_seconds"]
            rate = f"{_rate(s['agent_updates'] / busy)} agent-updates/s" if busy > 0 else ""
            progress.update(task, completed=state.done, rate=rate)
            live.update(view())

        _drive(eng, bars, chunk, state, update, learners, evo)


def _learning_line(learners: Any, agents: np.ndarray) -> str:
    """One line on the learning agents: hit rate, trades, equity next to the blend agents'."""
    mine = np.isin(agents["agent_id"], learners.ids)
    hit = learners.hit_rate()
    eq_l = float(np.median(agents["equity"][mine])) if mine.any() else float("nan")
    eq_b = float(np.median(agents["equity"][~mine])) if (~mine).any() else float("nan")
    return (f"Learning agents: {int(mine.sum()):,} ({learners.ticks:,} LoRA ticks), next-bar hit rate "
            f"{'n/a' if math.isnan(hit) else f'{hit * 100:.1f}%'}, {int(agents['trades'][mine].sum()):,} trades, "
            f"median equity {eq_l:.4f} (blend agents {eq_b:.4f})")


def cmd_smc(args: argparse.Namespace) -> int:
    """``dynamic-core smc``: 0 when a stream was compared (or the engine replay or the evolution
    asked for ran), 1 when nothing was compared or the journal is corrupt (as ``journal
    verify``), 2 for bad arguments or inputs."""
    from .learning.harness import format_report, replay_report

    if args.evolve_plot and not args.evolve:
        raise CLIError("--evolve-plot needs --evolve N")
    if args.evolve_agents is not None and not args.evolve:
        raise CLIError("--evolve-agents needs --evolve N")
    _need_matplotlib(args.evolve_plot)
    src = args.source
    if os.path.isdir(src):
        from . import journal as jr

        rep = jr.verify(src)  # what `journal verify` says, with its exit code for a bad journal
        if rep.unusable:
            print(f"{PROG} smc: {rep.summary()}", file=sys.stderr)
            return 1
        if rep.status == "torn_tail":
            from .cli_journal import torn_tail_advice

            print(f"{PROG} smc: warning: the journal's last record is torn ({rep.detail}); the bars before it "
                  f"are compared ({torn_tail_advice(src)})", file=sys.stderr)
        source: Any = src
    else:
        if args.engine:
            raise CLIError("--engine needs a journal directory")
        bars = load_bars(src, sim_names=["EURUSD"], bars=None, timeframe=None, seed=0,
                         dayfirst=args.dayfirst or None)
        from .market import reason_counts, validate

        reasons = validate(bars)
        if reasons.any():  # what run and backtest reject (and count): one bad bar ended the stream
            counts = ", ".join(f"{k} {v:,}" for k, v in reason_counts(reasons).items())
            print(f"dynamic-core smc: dropped {int(np.count_nonzero(reasons)):,} bad bar(s) of {len(bars):,} "
                  f"({counts})", file=sys.stderr)
            bars = bars[reasons == 0]
        source = bars
    extra: dict[str, Any] = {"engine": True} if args.engine else {}
    if args.evolve:
        extra.update(evolve=args.evolve, evolve_agents=args.evolve_agents or 2048,
                     evolve_plot=args.evolve_plot)
    status = _StatusLine(f"{PROG} smc: ") if not args.quiet and sys.stderr.isatty() else None
    try:
        table = replay_report(source, args.swing_length, progress=status, **extra)
    except ImportError as e:
        raise CLIError(f"{e}: install the test extra (pip install dynamic_core[test])") from None
    finally:
        if status is not None:
            status.close()
    print(format_report(table))
    if len(table) == 0 and not table.attrs.get("engine") and "evolution" not in table.attrs:
        why = "every stream was skipped (the reasons are above)" if table.attrs.get("skipped") else "no bars"
        print(f"{PROG} smc: nothing compared: {why}", file=sys.stderr)
        return 1
    return 0


def _plot_format(option: str, path: str) -> str:
    """The image format of ``path`` by its extension, refused before any work when missing or not
    one matplotlib writes (matplotlib would write ``path.png``, or fail after all the work)."""
    from .learning.evolution import check_plot_path

    try:
        return check_plot_path(path, option)
    except ValueError as e:
        raise CLIError(str(e)) from None


_STATUS_AFTER = 1.0
"""Seconds of work before ``smc`` shows its progress line (short runs stay silent)."""
_STATUS_EVERY = 0.5
"""Seconds between repaints of the progress line."""


class _StatusLine:
    """One progress line on stderr (a terminal), repainted in place from :data:`_STATUS_AFTER`
    seconds on with the latest step reported and the time so far, so a long step (the reference
    package labelling 100,000 bars) still shows it is under way; erased by :meth:`close`.
    Called with each step's text (the harness's ``progress``)."""

    def __init__(self, prefix: str) -> None:
        import threading

        self._prefix = prefix
        self._text = "starting"
        self._t0 = time.monotonic()
        self._shown = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="smc-progress", daemon=True)
        self._thread.start()

    def __call__(self, text: str) -> None:
        self._text = text   # one reference assignment: atomic under the GIL

    def _run(self) -> None:
        while not self._stop.wait(_STATUS_EVERY):
            spent = time.monotonic() - self._t0
            if spent < _STATUS_AFTER:
                continue
            width = max(20, shutil.get_terminal_size().columns - 1)
            line = f"{self._prefix}{self._text} [{spent:.0f} s]"[:width]
            sys.stderr.write(f"\r{line}\x1b[K")
            sys.stderr.flush()
            self._shown = True

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        if self._shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def _grid_population(streams: Sequence[tuple[int, int]], params: dict[str, list[Any]]) -> Population:
    """The cartesian grid of ``params`` for each stream, agents numbered 0..n-1 stream by stream."""
    if len(streams) == 1:
        return Population.grid(streams[0][0], streams[0][1], **params)
    # one grid per stream rather than instrument x timeframe, which could pair an instrument
    # with a timeframe it has no bars in
    recs = [Population.grid(i, tf, **params).records for i, tf in streams]
    rec = np.concatenate(recs)
    rec["agent_id"] = np.arange(len(rec), dtype=np.uint32)
    return Population.from_records(rec)


def results_frame(pop: Population, agents: np.ndarray):
    """Per-agent results as a DataFrame: genome (instrument and mode as names) then final state."""
    df = pop.to_pandas().drop(columns=["kind"])
    # agents() is in population order, so rows line up; checked rather than assumed
    if not np.array_equal(agents["agent_id"], pop.records["agent_id"]):
        raise RuntimeError("engine agents are not in population order")
    for name in agents.dtype.names:
        if name not in ("agent_id", "instrument", "timeframe"):
            df[name] = agents[name]
    df["win_rate"] = _win_rate(agents)
    return df


def cmd_backtest(args: argparse.Namespace) -> int:
    """``dynamic-core backtest``."""
    t0 = time.perf_counter()
    console = _console()
    # checked before the run so a typo in --out does not cost a long sweep
    _writable("--out", args.out)
    src = args.data.strip()
    is_sim = src.lower() == "sim"
    with contextlib.suppress(OSError):
        if os.path.samefile(src, args.out):
            raise CLIError(f"--out {args.out} is the --data file: the results would overwrite the bars")
    sim_names = [args.instrument or "EURUSD"]
    bars = load_bars(src, sim_names=sim_names, bars=args.bars, timeframe=args.timeframe, seed=args.seed,
                     instrument=None if is_sim else args.instrument, dayfirst=args.dayfirst or None)
    streams = _streams(bars)
    params = {k: getattr(args, k) for k in _INT_PARAMS + _FLOAT_PARAMS + ("mode",)
              if getattr(args, k) is not None}
    n_grid = math.prod(len(v) for v in params.values()) * len(streams)
    if n_grid > MAX_AGENTS:
        raise CLIError(f"the grid has {n_grid:,} agents, more than the {MAX_AGENTS // 10**6}M limit")
    pop = _grid_population(streams, params)
    eng = Engine(pop, cores_per_sm=args.cores_per_sm)
    stream_names = ", ".join(f"{instruments.name(i)} {tf_label(tf)}" for i, tf in streams)
    console.print(f"[bold]{PROG} backtest[/]: {len(pop):,} agents ({_grid_shape(params)}) over "
                  f"{stream_names}, {len(bars):,} bars")

    state = _Progress.new()
    # a few hundred bars per call keeps the progress bar moving without measurable overhead
    chunk = max(1000, 250 * len(streams))
    if console.is_terminal and not args.quiet:
        progress = _progress_bar(console)
        with progress:
            task = progress.add_task("backtest", total=len(bars), rate="")
            _drive(eng, bars, chunk, state, lambda: progress.update(task, completed=state.done))
    else:
        _drive(eng, bars, chunk, state)

    agents = eng.agents()
    stats = eng.stats()
    if _all_rejected(stats):  # agents that saw no bar: no results to write
        console.print(_rejects_line(stats))
        return 1
    df = results_frame(pop, agents)
    _write_whole("--out", args.out, lambda f: df.to_csv(f, index=False))
    wall = time.perf_counter() - t0

    varying = [k for k, v in params.items() if len(v) > 1]
    extra = [(k.replace("_", "-"), df[k].to_numpy()) for k in varying]
    console.print(_agents_table(agents, args.top, f"Top {min(args.top, len(agents))} agents by Sharpe",
                                extra=extra, show_instrument=len(streams) > 1))
    console.print(_rejects_line(stats))
    console.print(_throughput_line(stats, wall))
    console.print(f"Wrote {len(df):,} agent row(s) to {args.out}")
    return 0


def _grid_shape(params: dict[str, list[Any]]) -> str:
    axes = [f"{k.replace('_', '-')} {len(v)}" for k, v in params.items() if len(v) > 1]
    return " x ".join(axes) if axes else "defaults only"


# ---- entry point -----------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """Run the ``dynamic-core`` command line and return its exit code.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name; ``sys.argv[1:]`` when omitted.

    Returns
    -------
    int
        0 on success, 2 for bad arguments or inputs (one ``dynamic-core: error: ...`` line on
        stderr, never a traceback), 130 when interrupted.
    """
    import warnings

    # a warning (a loader's note on cells that are not numbers, say) is one line for a user, not
    # Python's "file:line: UserWarning: ..." with a source line
    warnings.showwarning = _show_warning
    if sys.stdout is None:  # started with its standard output closed (`>&-`): nowhere to report to
        if sys.stderr is not None:
            _error("standard output is closed; send it to /dev/null to discard it (>/dev/null)")
        return 2
    try:
        # inside the try: building the parser imports most of the package, and a ^C then is
        # "interrupted" like any other
        parser = build_parser()
        argv = _join_dash_values(sys.argv[1:] if argv is None else list(argv))
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # reported by the (sub)command they were given to, with its usage line
            _command_parser(parser, args, argv, unknown).error(f"unrecognized arguments: {' '.join(unknown)}")
        if getattr(args, "func", None) is None:
            parser.print_help()
            return 2
        return int(args.func(args))
    except SystemExit as e:
        # argparse exits for --help, --version and usage errors; hand back its code instead
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`... | head`): stop quietly, as a pipeline expects; stdout is
        # pointed at /dev/null so the interpreter's final flush does not fail again
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1  # as rich's console does on a broken pipe (run's live view and tables)
    except FileNotFoundError as e:
        _error(str(e) if not e.filename else f"no such file: {e.filename}")
    except (CLIError, DynamicCoreError, ValueError, KeyError) as e:
        _error(str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e))
    except OSError as e:
        _error(f"{e.filename}: {e.strerror}" if e.filename else str(e))
    except MemoryError:
        _error("out of memory: try fewer agents (--agents, --learning) or a smaller grid "
               "(fewer values per backtest option)")
    except _zmq_errors() as e:
        _error(_socket_message(e))
    return 2


# Options whose value may begin with "-": a key file's name, or (by mistake) the 40 characters of
# a Z85 key pasted in its place, which argparse would take for an option ("expected one argument").
_DASH_VALUE_OPTIONS = ("--server-key", "--client-key")


def _join_dash_values(argv: list[str]) -> list[str]:
    """``argv`` with ``OPT VALUE`` written as ``OPT=VALUE`` where OPT is one of
    :data:`_DASH_VALUE_OPTIONS` and VALUE begins with "-" but does not look like an option (a
    short flag, ``--help``, a lone "-"; 40 characters, the length of a key, never do): the value
    then reaches the command, which names what is wrong with it (a pasted key: "40 key
    characters, not a file name", without echoing it)."""
    def looks_like_option(v: str) -> bool:
        return len(v) != 40 and (v == "-" or v.startswith("--") or (len(v) == 2 and v[1].isalpha()))

    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":  # everything after is positional
            out.extend(argv[i:])
            break
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if a in _DASH_VALUE_OPTIONS and nxt is not None and nxt.startswith("-") and not looks_like_option(nxt):
            out.append(f"{a}={nxt}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str],
                    unknown: Sequence[str]) -> argparse.ArgumentParser:
    """The parser of the innermost (sub)command ``args`` were parsed for whose name comes before
    the first of the ``unknown`` arguments in ``argv`` (an option given before a subcommand's
    name is the enclosing command's)."""
    first_unknown = argv.index(unknown[0]) if unknown[0] in argv else len(argv)
    at = 0  # where the current parser's arguments begin in argv
    while True:
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        name = getattr(args, sub.dest, None) if sub is not None and sub.dest else None
        if name is None or name not in sub.choices or name not in argv[at:first_unknown]:
            return parser
        at = argv.index(name, at) + 1
        parser = sub.choices[name]


def _zmq_errors() -> tuple[type[BaseException], ...]:
    """``(zmq.ZMQError,)`` when zmq is loaded, else ``()`` (an except clause matching nothing):
    a ZMQError can only come from code that imported zmq, and main does not import it itself."""
    zmq = sys.modules.get("zmq")
    return (zmq.ZMQError,) if zmq is not None else ()


def _socket_message(e: BaseException) -> str:
    """One line for a ZeroMQ error (a bind to a busy port, an address ZeroMQ cannot parse)."""
    import zmq

    text = str(e)
    if getattr(e, "errno", None) == zmq.EADDRINUSE:
        return f"{text}: another process is bound there; stop it or choose another port"
    if getattr(e, "errno", None) == zmq.EINVAL and "addr=" in text:
        return f"{text}: expected a ZeroMQ address such as tcp://127.0.0.1:5556 or ipc:///tmp/dc.sock"
    return f"socket error: {text}"


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """``warnings.showwarning`` of the command line: ``dynamic-core: warning: MESSAGE``."""
    out = sys.stderr if file is None else file
    if out is not None:
        with contextlib.suppress(OSError):
            print(f"{PROG}: warning: {message}", file=out)


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
