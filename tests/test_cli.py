"""The ``dynamic-core`` command line, run as a user would: in a real subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import dynamic_core as dc
from dynamic_core import cli

PKG_ROOT = str(Path(dc.__file__).resolve().parent.parent)


def dynamic_core(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m dynamic_core ARGS`` with this checkout importable; stdout is a pipe, not a TTY."""
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PKG_ROOT, env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "dynamic_core", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def assert_clean_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "error:" in proc.stderr
    for n in needles:
        assert n in proc.stderr


@pytest.fixture()
def sim_csv(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A two-instrument CSV (instrument column, UTC time index) and the bars it was written from."""
    bars = dc.sim.MarketSimulator(["EURUSD", "GBPUSD"], timeframe="H1", seed=5).bars(300)
    path = tmp_path / "prices.csv"
    dc.market.to_pandas(bars).to_csv(path)
    return path, bars


@pytest.fixture()
def eurusd_csv(sim_csv: tuple[Path, np.ndarray], tmp_path: Path) -> tuple[Path, np.ndarray]:
    """The EURUSD rows of ``sim_csv`` alone."""
    _, bars = sim_csv
    one = bars[bars["instrument"] == dc.instruments.id("EURUSD")]
    path = tmp_path / "eurusd.csv"
    dc.market.to_pandas(one).to_csv(path)
    return path, one


# ---- help and version ------------------------------------------------------------------------

def test_help_lists_commands_and_examples(tmp_path: Path) -> None:
    proc = dynamic_core("--help", cwd=tmp_path)
    assert proc.returncode == 0
    for word in ("run", "backtest", "examples", "backtesting:EURUSD"):
        assert word in proc.stdout


def test_backtest_help_documents_inclusive_ranges(tmp_path: Path) -> None:
    proc = dynamic_core("backtest", "--help", cwd=tmp_path)
    assert proc.returncode == 0
    assert "start:stop:step" in proc.stdout and "INCLUDED" in proc.stdout
    for opt in ("--w-trend", "--w-rsi", "--w-macd", "--w-bb", "--w-mom", "--rsi-period", "--atr-period",
                "--bb-period", "--mom-period", "--entry", "--cost-bps", "--mode", "--out"):
        assert opt in proc.stdout


def test_version(tmp_path: Path) -> None:
    proc = dynamic_core("--version", cwd=tmp_path)
    assert proc.returncode == 0
    assert dc.__version__ in proc.stdout


# ---- run -------------------------------------------------------------------------------------

def test_run_prints_summary_without_a_tty(tmp_path: Path) -> None:
    proc = dynamic_core("run", "--agents", "500", "--bars", "300", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    out = proc.stdout
    assert "Top 10 agents by Sharpe" in out
    assert "agent-updates/s" in out and "wall time" in out
    assert "Actions over all signals" in out and "STRONG_BUY" in out
    # beside the fused signals, the agents' own actions (the signals' vote counts): random
    # agents buy and sell even where their consensus holds
    assert "agent actions" in out
    rows = {ln.split()[1]: ln.split() for ln in out.splitlines()
            if ln.split()[1:2] and ln.split()[1] in ("STRONG_SELL", "SELL", "HOLD", "BUY", "STRONG_BUY")}
    agent = {a: int(r[7].replace(",", "")) for a, r in rows.items()}
    assert len(agent) == 5 and agent["BUY"] > 0 and agent["SELL"] > 0
    assert "Rejected bars: none" in out
    assert "Latest fused signal per instrument" in out
    for name in ("EURUSD", "GBPUSD", "USDJPY", "XAUUSD"):
        assert name in out
    # 300 bars x 4 instruments, one signal each
    assert "Processed 1,200 of 1,200 bars, 1,200 signals" in out
    # no cursor movement or colour codes when piped
    assert "\x1b[" not in out


def test_run_quiet_prints_only_the_summary(tmp_path: Path) -> None:
    proc = dynamic_core("run", "-q", "--agents", "64", "--bars", "100", "--instruments", "7", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Latest fused signal" not in proc.stdout
    assert "7 stream(s)" in proc.stdout and "SPX" in proc.stdout
    assert "agent-updates/s" in proc.stdout


def test_run_on_csv_data(sim_csv: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, _ = sim_csv
    proc = dynamic_core("run", "--data", str(path), "--agents", "256", "--chunk", "64", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "2 stream(s) (EURUSD H1, GBPUSD H1)" in out
    assert "Processed 600 of 600 bars, 600 signals" in out
    assert "USDJPY" not in out


def test_run_bars_limits_each_stream_of_the_data(sim_csv: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, _ = sim_csv
    proc = dynamic_core("run", "-q", "--data", str(path), "--agents", "64", "--bars", "120", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Processed 240 of 240 bars" in proc.stdout


def test_run_rejects_instruments_with_data(sim_csv: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, _ = sim_csv
    assert_clean_error(dynamic_core("run", "--data", str(path), "--instruments", "3", cwd=tmp_path),
                       "--instruments")


# ---- backtest --------------------------------------------------------------------------------

def test_backtest_matches_the_engine_in_process(eurusd_csv: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, bars = eurusd_csv
    out = tmp_path / "res.csv"
    proc = dynamic_core("backtest", "--data", str(path), "--fast", "5:15:5", "--slow", "20:40:10",
                        "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Top 9 agents by Sharpe" in proc.stdout and "agent-updates/s" in proc.stdout

    res = pd.read_csv(out)
    assert len(res) == 9
    pop = dc.Population.grid("EURUSD", "H1", fast=[5, 10, 15], slow=[20, 30, 40])
    eng = dc.Engine(pop)
    eng.run(bars)
    ref = eng.agents()
    np.testing.assert_array_equal(res["agent_id"].to_numpy(), ref["agent_id"])
    np.testing.assert_array_equal(res["fast"].to_numpy(), pop.records["fast"])
    np.testing.assert_array_equal(res["slow"].to_numpy(), pop.records["slow"])
    np.testing.assert_allclose(res["equity"].to_numpy(), ref["equity"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(res["sharpe"].to_numpy(), ref["sharpe"], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(res["trades"].to_numpy(), ref["trades"])
    assert set(res["instrument"]) == {"EURUSD"}
    assert set(res["mode"]) == {"long_short"}
    assert (res["timeframe"] == 3600).all()
    for col in ("w_trend", "w_rsi", "rsi_period", "entry", "cost_bps", "max_drawdown", "wins", "win_rate"):
        assert col in res.columns


def test_backtest_float_ranges_modes_and_instrument_choice(sim_csv: tuple[Path, np.ndarray],
                                                           tmp_path: Path) -> None:
    path, _ = sim_csv
    out = tmp_path / "res.csv"
    proc = dynamic_core("backtest", "--data", str(path), "--instrument", "GBPUSD", "--fast", "5,10",
                        "--entry", "0:0.2:0.1", "--w-rsi=-1:1:1", "--mode", "both", "--out", str(out),
                        cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    res = pd.read_csv(out)
    assert len(res) == 2 * 3 * 3 * 2
    assert set(res["instrument"]) == {"GBPUSD"}
    assert sorted(set(res["entry"])) == [0.0, 0.1, 0.2]
    assert sorted(set(res["w_rsi"])) == [-1.0, 0.0, 1.0]
    assert set(res["mode"]) == {"long_only", "long_short"}


def test_backtest_over_every_stream_of_the_data(sim_csv: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, _ = sim_csv
    out = tmp_path / "res.csv"
    proc = dynamic_core("backtest", "--data", str(path), "--fast", "5:10:5", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    res = pd.read_csv(out)
    assert res["instrument"].tolist() == ["EURUSD", "EURUSD", "GBPUSD", "GBPUSD"]
    assert res["agent_id"].tolist() == [0, 1, 2, 3]


def test_backtest_on_bundled_backtesting_data(tmp_path: Path) -> None:
    pytest.importorskip("backtesting")
    proc = dynamic_core("backtest", "--data", "backtesting:GOOG", "--fast", "5,10", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    res = pd.read_csv(tmp_path / "backtest_results.csv")
    assert len(res) == 2 and set(res["instrument"]) == {"GOOG"}
    assert (res["timeframe"] == 86400).all()


@pytest.mark.parametrize("value", ["5:x", "5:1", "5:10:0", "7.5", "5,,10"])
def test_bad_range_is_a_clean_error(value: str, tmp_path: Path) -> None:
    proc = dynamic_core("backtest", "--data", "sim", "--fast", value, cwd=tmp_path)
    assert_clean_error(proc, "--fast")
    assert not (tmp_path / "backtest_results.csv").exists()


@pytest.mark.parametrize("value", ["1.5s", "0", "4294967296", "H1.5"])
def test_timeframe_that_is_not_whole_seconds_is_a_clean_error(value: str, tmp_path: Path) -> None:
    proc = dynamic_core("run", "--timeframe", value, "--bars", "10", "--agents", "32", cwd=tmp_path)
    assert_clean_error(proc, "--timeframe", repr(value) if not value.isdigit() else value)


def test_invalid_genome_is_a_clean_error(tmp_path: Path) -> None:
    assert_clean_error(dynamic_core("backtest", "--data", "sim", "--fast", "0", cwd=tmp_path), "fast")


@pytest.mark.parametrize("command", ["run", "backtest"])
def test_missing_file_is_a_clean_error(command: str, tmp_path: Path) -> None:
    proc = dynamic_core(command, "--data", str(tmp_path / "nope.csv"), cwd=tmp_path)
    assert_clean_error(proc, "no such file", "nope.csv")


def test_csv_without_prices_is_a_clean_error(tmp_path: Path) -> None:
    path = tmp_path / "notprices.csv"
    path.write_text("a,b\n1,2\n")
    assert_clean_error(dynamic_core("run", "--data", str(path), cwd=tmp_path), "notprices.csv", "close")


def test_unknown_backtesting_set_is_a_clean_error(tmp_path: Path) -> None:
    assert_clean_error(dynamic_core("backtest", "--data", "backtesting:NOPE", cwd=tmp_path), "NOPE")


# ---- in-process ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "kind", "expected"),
    [
        ("5:50:5", int, [5, 10, 15, 20, 25, 30, 35, 40, 45, 50]),
        ("5:12:5", int, [5, 10]),
        ("5:8", int, [5, 6, 7, 8]),
        ("5,10,20", int, [5, 10, 20]),
        ("12", int, [12]),
        ("5:10:5,30", int, [5, 10, 30]),
        ("0:1:0.25", float, [0.0, 0.25, 0.5, 0.75, 1.0]),
        ("0:0.3:0.1", float, [0.0, 0.1, 0.2, 0.3]),
        ("-1:1:1", float, [-1.0, 0.0, 1.0]),
        ("1.5", float, [1.5]),
    ],
)
def test_parse_values(text: str, kind: type, expected: list[float]) -> None:
    got = cli.parse_values(text, kind)
    assert got == expected
    assert all(type(v) is kind for v in got)


@pytest.mark.parametrize("text", ["", "5:x", "x", "5:1", "1:5:0", "1:5:-1", "1:2:3:4", "1.5", "5,", "nan"])
def test_parse_values_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        cli.parse_values(text, int)


@pytest.mark.parametrize("text", ["0:1:1e-320", "0:1e308:1e-308", "-1e308:1e308:1", "1:1e300"])
def test_a_float_range_with_too_many_values_is_refused_not_a_traceback(text: str, capsys) -> None:
    # (stop - start) / step overflowed to inf, and int(inf) raised OverflowError: a traceback, exit 1
    with pytest.raises(ValueError, match="more than 1,000,000"):
        cli.parse_values(text, float)
    assert cli.main(["backtest", "--data", "backtesting:GOOG", f"--entry={text}"]) == 2
    assert "more than 1,000,000" in capsys.readouterr().err


def test_simulated_names() -> None:
    assert cli.simulated_names(4) == ["EURUSD", "GBPUSD", "USDJPY", "XAUUSD"]
    assert cli.simulated_names(9)[4:] == ["AUDUSD", "BTCUSD", "SPX", "SIM7", "SIM8"]


def test_main_returns_codes_instead_of_exiting(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert cli.main(["backtest", "--data", "sim", "--fast", "5:x"]) == 2
    err = capsys.readouterr().err
    assert "--fast" in err and "Traceback" not in err


def test_an_unknown_option_is_reported_by_its_command(tmp_path: Path) -> None:
    proc = dynamic_core("run", "--bogus", cwd=tmp_path)
    assert_clean_error(proc, "dynamic-core run: error: unrecognized arguments: --bogus", "usage: dynamic-core run")
    proc = dynamic_core("journal", "verify", str(tmp_path), "--nope", cwd=tmp_path)
    assert_clean_error(proc, "dynamic-core journal verify: error: unrecognized arguments: --nope")
    # ctl's own positional COMMAND does not hide it (it shared the top level's dest)
    proc = dynamic_core("ctl", "tcp://127.0.0.1:1", "pause", "--server-key", "k", "--client-key", "c", "--bogus",
                        cwd=tmp_path)
    assert_clean_error(proc, "dynamic-core ctl: error: unrecognized arguments: --bogus")
    # given before the subcommand's name: the top level's
    proc = dynamic_core("--bogus", "run", cwd=tmp_path)
    assert_clean_error(proc, "dynamic-core: error: unrecognized arguments: --bogus")


def test_dayfirst_reads_ambiguous_dates_day_first_on_the_command_line(tmp_path: Path) -> None:
    t = pd.date_range("2017-05-01", periods=240, freq="h")  # 01/05 .. 10/05: either order
    rng = np.random.default_rng(1)
    close = 1.1 + np.cumsum(rng.normal(0, 1e-3, len(t)))
    pd.DataFrame({"Date": t.strftime("%d/%m/%Y %H:%M"), "Open": close, "High": close + 1e-3,
                  "Low": close - 1e-3, "Close": close}).to_csv(tmp_path / "DMY.csv", index=False)
    with pytest.warns(UserWarning, match="--dayfirst on the command line"):
        month_first = cli.load_bars(str(tmp_path / "DMY.csv"), sim_names=[], bars=None, timeframe=None,
                                    seed=0)
    assert month_first["ts"][0] == np.datetime64("2017-01-05", "ns").astype(np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        day_first = cli.load_bars(str(tmp_path / "DMY.csv"), sim_names=[], bars=None, timeframe=None, seed=0,
                                  dayfirst=True)
        assert day_first["ts"].tolist() == t.to_numpy().astype("datetime64[ns]").view(np.int64).tolist()
        assert cli.main(["backtest", "--data", str(tmp_path / "DMY.csv"), "--dayfirst", "--fast", "5",
                         "--slow", "20", "-q", "--out", str(tmp_path / "r.csv")]) == 0


def test_smc_evolve_agents_without_evolve_is_refused(capsys) -> None:
    assert cli.main(["smc", "backtesting:EURUSD", "--evolve-agents", "10"]) == 2
    assert "--evolve-agents needs --evolve N" in capsys.readouterr().err


def test_evolve_plot_without_matplotlib_is_refused_before_any_work(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    png = tmp_path / "evo.png"
    assert cli.main(["run", "--agents", "64", "--bars", "200", "--evolve", "50", "--evolve-plot", str(png),
                     "-q"]) == 2
    captured = capsys.readouterr()
    assert "--evolve-plot needs matplotlib" in captured.err and "agents over" not in captured.out
    assert cli.main(["smc", "sim", "--evolve", "50", "--evolve-plot", str(png)]) == 2
    assert "--evolve-plot needs matplotlib" in capsys.readouterr().err
    assert not png.exists()


def test_run_header_says_how_bars_are_fed(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--agents", "64", "--bars", "60", "--no-live"]) == 0
    assert "200 per engine call" in capsys.readouterr().out  # 50 per instrument, 4 instruments
    assert cli.main(["run", "--agents", "64", "--bars", "60", "--learning", "4", "--no-live"]) == 0
    assert "one time step per engine call (learning agents)" in capsys.readouterr().out


def test_backend_auto_says_when_it_runs_on_the_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    from dynamic_core import gpu

    if gpu.probe():
        pytest.skip("a GPU is usable here")
    assert cli.main(["run", "--agents", "64", "--bars", "60", "--backend", "auto", "--no-live"]) == 0
    assert "backend auto: running on the CPU (" in capsys.readouterr().out


# ---- ^C while the package is still importing -------------------------------------------------

_SLOW_IMPORT = '''
import sys, time

class _Slow:  # holds the import of dynamic_core.payloads (inside the package's __init__)
    def find_spec(self, name, path=None, target=None):
        if name == "dynamic_core.payloads":
            print("importing", flush=True)
            time.sleep(60)
        return None

sys.meta_path.insert(0, _Slow())
'''


def _interrupt_while_importing(cmd: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Runs cmd with a sitecustomize that parks the package's import, sends SIGINT there."""
    import signal

    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_SLOW_IMPORT)
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), PKG_ROOT, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "importing"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.parametrize("how", ["python -m", "console script"])
def test_interrupt_while_the_command_imports_is_one_line(tmp_path: Path, how: str) -> None:
    if how == "python -m":
        cmd = [sys.executable, "-m", "dynamic_core", "--version"]
    else:  # what pip writes for [project.scripts], under the script's own name
        script = tmp_path / "dynamic-core"
        script.write_text("import sys\nfrom dynamic_core.cli import main\nsys.exit(main())\n")
        cmd = [sys.executable, str(script), "--version"]
    proc = _interrupt_while_importing(cmd, tmp_path)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr == "dynamic-core: interrupted\n"


def test_interrupt_while_a_library_imports_the_package_propagates(tmp_path: Path) -> None:
    proc = _interrupt_while_importing([sys.executable, "-c", "import dynamic_core"], tmp_path)
    assert "Traceback" in proc.stderr and "KeyboardInterrupt" in proc.stderr
    assert proc.returncode != 130


def test_smc_drops_bad_bars_and_keeps_the_engine_line_for_short_journals(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("smartmoneyconcepts")
    from backtesting.test import EURUSD

    df = EURUSD.iloc[:1000].copy()
    df.iloc[50, df.columns.get_loc("Close")] = float("nan")  # one bad bar used to skip the whole stream
    df.rename_axis("time").to_csv(tmp_path / "bad.csv")
    assert cli.main(["smc", str(tmp_path / "bad.csv")]) == 0
    out = capsys.readouterr()
    assert "dropped 1 bad bar(s) of 1,000 (non_finite 1)" in out.err
    assert "SMC agreement" in out.out and re.search(r"bad/3600\s+999\s", out.out)
    # too short to compare, but the engine's replay is still verified and said
    assert cli.main(["run", "--agents", "64", "--bars", "40", "-q", "--journal", str(tmp_path / "j")]) == 0
    capsys.readouterr()
    assert cli.main(["smc", str(tmp_path / "j"), "--engine"]) == 0
    out = capsys.readouterr().out
    assert "no stream long enough" in out and "engine replay: 160 bars, 160 signals, 160 verified" in out


def test_output_files_are_checked_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no" / "such" / "x.png"
    assert cli.main(["run", "--agents", "64", "--bars", "200", "--evolve", "50", "--evolve-plot", str(missing),
                     "-q"]) == 2
    captured = capsys.readouterr()
    assert "--evolve-plot" in captured.err and "no such directory" in captured.err
    assert "agents over" not in captured.out  # refused before the run, not after it
    assert cli.main(["backtest", "--data", "sim", "--fast", "5", "--slow", "20", "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path: Path) -> None:
    # `dynamic-core journal dump J | head -1` printed "error: [Errno 32] Broken pipe" (exit 2)
    # enough records that the listing outgrows the pipe's buffer
    assert cli.main(["run", "--agents", "64", "--bars", "40000", "-q", "--journal", str(tmp_path / "j")]) == 0
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (PKG_ROOT, os.environ.get("PYTHONPATH")) if p))
    with subprocess.Popen([sys.executable, "-m", "dynamic_core", "journal", "dump", str(tmp_path / "j"),
                           "--limit", "0"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as p:
        assert p.stdout is not None and p.stderr is not None and p.stdout.readline()
        p.stdout.close()  # like head after one line
        err = p.stderr.read().decode()
        rc = p.wait(timeout=60)
    assert rc == 1 and "Broken pipe" not in err and "Traceback" not in err, err


@pytest.mark.parametrize("argv", [["run", "--agents", "60000000"], ["smc", "--evolve", "10", "--evolve-agents", "60000000"]])
def test_an_agent_count_past_the_bound_is_refused_naming_the_option(argv, capsys):
    from dynamic_core.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert ("--agents" in err or "--evolve-agents" in err) and "1..50,000,000" in err


def test_an_interrupted_run_summarises_what_the_engine_took_and_its_journal_holds_exactly_that(
        tmp_path: Path) -> None:
    # ^C mid-run: exit 130 after the summary; "Processed N of M" counts the bars the engine
    # took (an interrupt can end a call after it took bars, before it returned them), and the
    # journal replays exactly those N bars, verified
    import signal
    import time

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (PKG_ROOT, os.environ.get("PYTHONPATH")) if p))
    j = tmp_path / "j"
    cmd = [sys.executable, "-m", "dynamic_core", "run", "--agents", "20000", "--instruments", "2",
           "--bars", "400000", "--chunk", "20000", "--no-live", "--journal", str(j)]
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as p:
        assert p.stdout is not None
        head = p.stdout.readline()  # printed once the bars are built, just before the run starts
        assert "agents over 2 stream(s)" in head, head + p.stderr.read()
        deadline = time.monotonic() + 60
        # past the meta record (its genomes alone are ~2 MB, written before the run starts: a ^C
        # then came before the run and its summary) by 1 MB of bars
        grown = 20000 * dc.GENOME_DTYPE.itemsize + (1 << 20)
        while not (j.exists() and sum(f.stat().st_size for f in j.iterdir()) > grown):
            assert time.monotonic() < deadline and p.poll() is None, "the run did not get going"
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "Traceback" not in out + err and "interrupted" in out
    m = re.search(r"Processed ([\d,]+) of ([\d,]+) bars, ([\d,]+) signals", out)
    assert m, out
    taken, total, signals = (int(g.replace(",", "")) for g in m.groups())
    assert 0 < taken < total == 800_000 and signals == taken
    r = dc.Engine.replay(j)  # verify=True: every journaled signal hash reproduced
    assert r.bars == taken and len(r.signals) == taken and not r.mismatched


def test_a_key_option_s_value_may_begin_with_a_dash(tmp_path: Path) -> None:
    join = cli._join_dash_values
    key = "-" + "a" * 39  # the 40 characters of a Z85 key that begins with "-"
    assert join(["ctl", "E", "health", "--client-key", key, "--timeout", "1"]) == \
        ["ctl", "E", "health", f"--client-key={key}", "--timeout", "1"]
    assert join(["--server-key", "-k.key"]) == ["--server-key=-k.key"]
    key2 = "--" + "a" * 38  # one that begins with "--" too
    assert join(["--client-key", key2, "--timeout", "1"]) == [f"--client-key={key2}", "--timeout", "1"]
    # an option after it, a short flag, "--help", a lone "-", or anything after "--" stay as given
    for argv in (["--client-key", "--timeout", "1"], ["--client-key", "-h"], ["--server-key", "--help"],
                 ["--client-key", "-"], ["--", "--client-key", key], ["--client-key"], ["--timeout", key]):
        assert join(argv) == argv
    # the command then names the mistake without echoing the key (argparse alone said "expected
    # one argument")
    for k in (key, key2):
        p = dynamic_core("ctl", "tcp://127.0.0.1:9", "health", "--server-key", k, "--client-key", k, cwd=tmp_path)
        assert_clean_error(p, "40 key characters, not a file name")
        assert k.lstrip("-") not in p.stderr + p.stdout
