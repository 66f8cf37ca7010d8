"""The command line under hostile or careless input: every user mistake is one
``dynamic-core: error: ...`` line and a non-zero exit, never a traceback, a hang or lost rows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import zmq
from dynamic_core import cli, journal

from .test_cli import PKG_ROOT, assert_clean_error, dynamic_core


def _csv(path: Path, symbols: list[str], rows: int = 24) -> Path:
    lines = ["time,symbol,open,high,low,close"]
    for s in symbols:
        for h in range(rows):
            lines.append(f"2024-01-{1 + h // 24:02d} {h % 24:02d}:00,{s},1.1,1.2,1.0,1.15")
    path.write_text("\n".join(lines) + "\n")
    return path


# ---- CSV symbols ------------------------------------------------------------------------------

def test_symbols_na_null_nan_are_instruments_not_lost_rows(tmp_path: Path) -> None:
    path = _csv(tmp_path / "na.csv", ["EURUSD", "NA", "NULL", "nan"])
    proc = dynamic_core("run", "--agents", "100", "--data", str(path), "-q", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "4 stream(s)" in proc.stdout and "Processed 96 of 96 bars" in proc.stdout
    proc = dynamic_core("backtest", "--data", str(path), "--out", str(tmp_path / "r.csv"), "-q", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "96 bars" in proc.stdout


def test_rows_without_a_symbol_are_a_clean_error_naming_them(tmp_path: Path) -> None:
    path = _csv(tmp_path / "blank.csv", ["EURUSD", ""], rows=3)
    assert_clean_error(dynamic_core("run", "--agents", "100", "--data", str(path), "-q", cwd=tmp_path),
                       "blank.csv", "3 row(s) with an empty 'symbol'", "rows 4, 5, 6")


# ---- sockets ----------------------------------------------------------------------------------

@pytest.fixture()
def busy_port():
    """An address another socket is bound to."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUB)
    s.setsockopt(zmq.LINGER, 0)
    s.bind("tcp://127.0.0.1:*")
    yield s.getsockopt_string(zmq.LAST_ENDPOINT)
    s.close()
    ctx.term()


@pytest.mark.parametrize("option", ["--publish", "--feed"])
def test_a_port_in_use_is_a_clean_error(option: str, busy_port: str, tmp_path: Path) -> None:
    bars = [] if option == "--feed" else ["--bars", "10"]  # with --feed the bars come from the socket
    proc = dynamic_core("run", "--agents", "100", *bars, "-q", option, busy_port, "--duration", "5", cwd=tmp_path)
    assert_clean_error(proc, "Address already in use", busy_port, "choose another port")


def test_a_service_that_fails_to_start_leaves_no_journal(busy_port: str, tmp_path: Path) -> None:
    # the engine opened its journal before the sockets: a failed start left a journal behind and
    # the retry with the same --journal was refused ("already holds a journal")
    (tmp_path / "clients").mkdir()
    run = ["run", "--agents", "100", "--bars", "10", "-q", "--journal", "j"]
    control = ["--control", "tcp://127.0.0.1:*", "--authorized", "clients"]
    assert_clean_error(dynamic_core(*run, *control, "--server-key", "missing.key_secret", cwd=tmp_path),
                       "secret key file not found")
    assert_clean_error(dynamic_core(*run, "--publish", busy_port, cwd=tmp_path), "Address already in use")
    assert not (tmp_path / "j").exists()
    proc = dynamic_core(*run, "--publish", "tcp://127.0.0.1:*", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    segments = sorted((tmp_path / "j").iterdir())
    assert segments and journal.verify(tmp_path / "j").ok
    # a journal there before the command is refused before any socket, and left as it was
    sizes = [p.stat().st_size for p in segments]
    assert_clean_error(dynamic_core(*run, "--publish", busy_port, cwd=tmp_path), "--journal j is not empty")
    assert [p.stat().st_size for p in sorted((tmp_path / "j").iterdir())] == sizes


def test_an_address_zeromq_cannot_parse_is_a_clean_error(tmp_path: Path) -> None:
    proc = dynamic_core("adapter", "--provider", "local", "--connect", "garbage", cwd=tmp_path)
    assert_clean_error(proc, "garbage", "tcp://127.0.0.1:5556")


# ---- numbers that never expire or cannot be ---------------------------------------------------

@pytest.mark.parametrize("args, option", [
    (["run", "--publish", "tcp://127.0.0.1:*", "--duration", "nan"], "--duration"),
    (["run", "--publish", "tcp://127.0.0.1:*", "--duration", "inf"], "--duration"),
    (["run", "--publish", "tcp://127.0.0.1:*", "--duration", "0"], "--duration"),
    (["run", "--publish", "tcp://127.0.0.1:*", "--heartbeat", "nan"], "--heartbeat"),
    (["run", "--reasoning", "local", "--reasoning-deadline", "nan"], "--reasoning-deadline"),
    (["run", "--learning", "-3"], "--learning"),
    (["run", "--learning", "300000"], "--learning"),
    (["run", "--seed", "-1"], "--seed"),
    (["run", "--seed", str(2**64)], "--seed"),
    (["run", "--evolve", "5", "--evolve-seed", "-1"], "--evolve-seed"),
    (["backtest", "--data", "sim", "--seed", "-1"], "--seed"),
    (["subscribe", "tcp://127.0.0.1:5995", "--timeout", "nan"], "--timeout"),
    (["ctl", "tcp://127.0.0.1:5996", "health", "--server-key", "k", "--client-key", "k", "--timeout", "-1"],
     "--timeout"),
    (["journal", "dump", ".", "--limit", "-1"], "--limit"),
    (["review", "approve", "tcp://127.0.0.1:5997", str(10**23), "--server-key", "k", "--client-key", "k"], "ITEM"),
    (["review", "approve", "tcp://127.0.0.1:5997", "-1", "--server-key", "k", "--client-key", "k"], "ITEM"),
])
def test_bad_numbers_are_refused_at_parse_time_naming_the_option(args: list[str], option: str,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # parse only: with the old parser some of these ran for ever (a NaN duration never expires)
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(args)
    assert e.value.code == 2
    assert f"error: argument {option}:" in capsys.readouterr().err


@pytest.mark.parametrize("args, option", [
    (["run", "--agents", "100", "--bars", "10", "-q", "--publish", "tcp://127.0.0.1:*", "--duration", "nan"],
     "--duration"),
    (["run", "--agents", "100", "--bars", "10", "-q", "--seed", "-1"], "--seed"),
    (["run", "--agents", "100", "--bars", "10", "-q", "--learning", "-3"], "--learning"),
])
def test_bad_numbers_name_their_option(args: list[str], option: str, tmp_path: Path) -> None:
    proc = dynamic_core(*args, cwd=tmp_path, timeout=30)
    assert_clean_error(proc, f"argument {option}:")


def test_out_of_memory_is_one_line_suggesting_fewer_agents(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    def huge(*args: object, **kw: object) -> None:
        raise MemoryError("Unable to allocate 37.3 GiB for an array")

    monkeypatch.setattr(cli.Population, "random_on", huge)
    assert cli.main(["run", "--agents", "100", "--bars", "10", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dynamic-core: error: out of memory") and "--agents" in err
    assert len(err.strip().splitlines()) == 1


# ---- ^C before the command runs ---------------------------------------------------------------

def test_interrupt_while_building_the_parser_exits_130(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    try:
        code = cli.main(["run"])
    except KeyboardInterrupt:  # caught here: escaping, it would stop the whole test session
        pytest.fail("KeyboardInterrupt escaped main()")
    assert code == 130
    assert capsys.readouterr().err == "dynamic-core: interrupted\n"


def test_interrupt_while_python_m_imports_the_cli_exits_130(tmp_path: Path) -> None:
    # a ^C that lands while `python -m dynamic_core` imports dynamic_core.cli, made deterministic
    # by an import hook that raises it there
    code = (
        "import runpy, sys\n"
        "class Hook:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'dynamic_core.cli':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Hook())\n"
        "runpy.run_module('dynamic_core', run_name='__main__', alter_sys=True)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (PKG_ROOT, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr == "dynamic-core: interrupted\n"


# ---- help -------------------------------------------------------------------------------------

def test_backtest_help_explains_every_genome_option(tmp_path: Path) -> None:
    out = dynamic_core("backtest", "--help", cwd=tmp_path, timeout=30).stdout
    lines = out.splitlines()
    for name in cli._INT_PARAMS + cli._FLOAT_PARAMS:
        opt = f"--{name.replace('_', '-')} V"
        (i,) = [k for k, line in enumerate(lines) if line.strip().startswith(opt)]
        text = " ".join(lines[i:i + 3])
        # more than the bare default: what the value means
        assert len(text.split("[default:")[0].replace(opt, "").split()) >= 3, text
    assert "soft(x) = x / (1 + |x|)" in " ".join(out.split())


@pytest.mark.parametrize("command, needle", [
    (["smc"], "dynamic-core smc backtesting:EURUSD"),
    (["bridge"], "dynamic-core bridge mt5 --simulated-terminal"),
    (["journal", "dump"], "torn tail"),
])
def test_help_teaches_with_examples(command: list[str], needle: str, tmp_path: Path) -> None:
    proc = dynamic_core(*command, "--help", cwd=tmp_path, timeout=30)
    assert proc.returncode == 0
    assert needle in " ".join(proc.stdout.split())


# ---- journal dump on a torn journal -----------------------------------------------------------

def test_journal_dump_lists_what_it_can_then_warns_of_a_torn_tail(tmp_path: Path) -> None:
    d = tmp_path / "j"
    assert dynamic_core("run", "--agents", "100", "--bars", "50", "-q", "--chunk", "20", "--journal", str(d),
                        cwd=tmp_path).returncode == 0
    seg = d / "seg-000000.dcj"
    seg.write_bytes(seg.read_bytes()[:-7])
    proc = dynamic_core("journal", "dump", str(d), "--limit", "0", cwd=tmp_path)
    assert proc.returncode == 1
    assert "meta" in proc.stdout and "records: bars" in proc.stdout
    assert "torn tail" in proc.stderr and "--repair" in proc.stderr and "Traceback" not in proc.stderr
    assert dynamic_core("journal", "verify", str(d), "--repair", cwd=tmp_path).returncode == 0
    assert dynamic_core("journal", "dump", str(d), cwd=tmp_path).returncode == 0


# ---- output width -----------------------------------------------------------------------------

def test_tables_are_not_squeezed_when_stdout_is_not_a_terminal(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PKG_ROOT, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "dynamic_core", "run", "--agents", "256", "--bars", "60",
                           "--instruments", "1", "--no-live", "--reasoning", "local"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    header = next(line for line in proc.stdout.splitlines() if "latest rationale" in line)
    assert "instrument" in header and "time (UTC)" in header  # not squeezed to "…"
    mesh = next(line for line in proc.stdout.splitlines() if "provider" in line)
    for col in ("tokens in/out", "cache hits", "budget left"):
        assert col in mesh  # every header on one line, none cut


def test_review_list_refuses_an_item(tmp_path: Path) -> None:
    proc = dynamic_core("review", "list", "tcp://127.0.0.1:5998", "5", "--server-key", "k", "--client-key", "k",
                        cwd=tmp_path, timeout=30)
    assert_clean_error(proc, "review list takes no ITEM")


def test_run_reasoning_keeps_review_weights_in_the_journal_and_warns_of_unrouted_providers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The mesh 'run --reasoning' builds: ensemble weights in a file (--reasoning-weights, else
    the journal's directory), and a warning for a provider no 'tactical' rule names."""
    import argparse

    from dynamic_core import cli_reasoning, reasoning

    made: list[dict] = []

    class Mesh(reasoning.ReasoningMesh):  # the constructor's arguments; nothing started
        def __init__(self, providers, **kw) -> None:
            made.append({"providers": providers, **kw})
            super().__init__(providers, **kw)

        def start(self, wait: float) -> None:
            self.close()

    monkeypatch.setattr(reasoning, "ReasoningMesh", Mesh)
    base = dict(reasoning="local,qwen,deepseek", reasoning_config=None, reasoning_deadline=3.0, ensemble=1,
                reasoning_select="change", secrets=None)
    cli_reasoning.mesh_from_args(argparse.Namespace(**base, journal=str(tmp_path / "j"), reasoning_weights=None))
    assert made[-1]["weights_path"] == str(tmp_path / "j" / "reasoning_weights.json")
    err = capsys.readouterr().err
    assert "--reasoning deepseek: the routing policy gives 'run'" in err and "qwen" not in err
    cli_reasoning.mesh_from_args(argparse.Namespace(**base, journal=None, reasoning_weights=str(tmp_path / "w.json")))
    assert made[-1]["weights_path"] == str(tmp_path / "w.json")
    capsys.readouterr()
    cli_reasoning.mesh_from_args(argparse.Namespace(**{**base, "reasoning": "local,qwen"}, journal=None,
                                                    reasoning_weights=None))
    assert made[-1]["weights_path"] is None and "warning" not in capsys.readouterr().err
    # under 2 s the default policy asks only the narrator: qwen too gets nothing then
    cli_reasoning.mesh_from_args(argparse.Namespace(**{**base, "reasoning": "local,qwen", "reasoning_deadline": 1.5},
                                                    journal=None, reasoning_weights=None))
    assert "--reasoning qwen: the routing policy" in capsys.readouterr().err


# ---- outputs, parents, counts -----------------------------------------------------------------

def test_a_closed_stdout_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PKG_ROOT, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(f"{sys.executable} -m dynamic_core run -q --agents 100 --bars 50 >&-", shell=True,
                          cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert "standard output is closed" in proc.stderr and "Traceback" not in proc.stderr


def test_backtest_out_is_written_whole_or_not_at_all(tmp_path: Path) -> None:
    import resource

    out = tmp_path / "results.csv"
    out.write_text("an earlier result\n")
    out.chmod(0o640)
    grid = ["backtest", "--data", "sim", "--bars", "200", "-q", "--fast", "1:40", "--slow", "1:40"]

    def small_files() -> None:  # writes past 4 KiB fail (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PKG_ROOT, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "dynamic_core", *grid, "--out", str(out)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120, check=False,
                          preexec_fn=small_files)
    assert_clean_error(proc, f"--out {out}", "File too large")
    assert out.read_text() == "an earlier result\n"  # untouched, and no part file left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]
    proc = dynamic_core(*grid, "--out", str(out), cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = out.read_text().splitlines()
    assert len(lines) == 1 + 40 * 40 and lines[0].startswith("agent_id")
    assert oct(out.stat().st_mode & 0o777) == oct(0o640)  # the file's permissions are kept
    assert_clean_error(dynamic_core("backtest", "--data", str(out), "--out", str(out), cwd=tmp_path),
                       "is the --data file")
    assert len(out.read_text().splitlines()) == 1 + 40 * 40
    assert_clean_error(dynamic_core("backtest", "--data", "sim", "--out", "", cwd=tmp_path), "--out needs a file name")


@pytest.mark.parametrize(("args", "needle"), [
    (["--equity", "5000"], "--equity is for the paper account of --paper"),
    (["--no-credit", "--entry-score", "0.2"], "--entry-score, --no-credit are for the paper account"),
    (["--fsync", "1"], "--fsync is the journal's durability: add --journal"),
    (["--evolve-seed", "3"], "--evolve-seed seeds the evolution: add --evolve"),
    # they were ignored without --publish (run --feed ... --wait-subscribers 3 did not wait)
    (["--json-feed"], "--json-feed is for the signal feed of --publish: add --publish"),
    (["--feed", "tcp://127.0.0.1:*", "--heartbeat", "0.5", "--wait-subscribers", "3", "--duration", "1"],
     "--heartbeat, --wait-subscribers are for the signal feed of --publish"),
    # the service path built its population without the learning agents asked for
    (["--learning", "3", "--publish", "tcp://127.0.0.1:*"], "--learning runs in the plain 'run'"),
    # ignored without the socket they configure
    (["--duration", "1", "--allow-remote"], "--duration, --allow-remote are for a service: add --publish"),
    (["--publish", "tcp://127.0.0.1:*", "--feed-kind", "sub"], "--feed-kind is for the market socket of --feed"),
    (["--server-key", "k", "--authorized", "d"], "--server-key, --authorized are for the control socket"),
    (["--publish", "tcp://127.0.0.1:*", "--server-key", "k"], "--server-key is for the control socket"),
    # the bars come from the socket (run's --bars 50 above)
    (["--feed", "tcp://127.0.0.1:*", "--chunk", "5"], "--feed takes bars from the socket; --bars, --chunk do not"),
])
def test_an_option_without_the_option_it_refines_is_refused(args: list[str], needle: str, tmp_path: Path) -> None:
    assert_clean_error(dynamic_core("run", "-q", "--agents", "100", "--bars", "50", *args, cwd=tmp_path), needle)


def test_a_run_where_every_bar_is_rejected_fails(tmp_path: Path) -> None:
    path = tmp_path / "huge.csv"
    path.write_text("time,open,high,low,close\n"
                    + "".join(f"{1704067200 + 3600 * i},1e300,1e300,1e300,1e300\n" for i in range(50)))
    proc = dynamic_core("run", "-q", "--agents", "100", "--data", str(path), cwd=tmp_path)
    assert proc.returncode == 1 and "every one of the 50 bars was rejected" in proc.stderr
    assert "Rejected bars: 50 (price_out_of_range 50)" in proc.stdout
    proc = dynamic_core("backtest", "--data", str(path), "--fast", "5:10", "--out", "r.csv", cwd=tmp_path)
    assert proc.returncode == 1 and "every one of the 50 bars was rejected" in proc.stderr
    assert not (tmp_path / "r.csv").exists()


def test_bars_of_streams_no_agent_follows_are_reported(tmp_path: Path) -> None:
    proc = dynamic_core("run", "-q", "--agents", "1", "--instruments", "4", "--bars", "30", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Rejected bars: none; 90 valid bar(s) of streams no agent follows skipped" in proc.stdout
    assert "Processed 120 of 120 bars, 30 signals" in proc.stdout


def test_a_torn_tail_a_writer_may_still_be_writing_is_not_sent_to_repair(tmp_path: Path) -> None:
    import fcntl

    d = tmp_path / "j"
    assert dynamic_core("run", "--agents", "100", "--bars", "50", "-q", "--journal", str(d),
                        cwd=tmp_path).returncode == 0
    seg = d / "seg-000000.dcj"
    seg.write_bytes(seg.read_bytes()[:-7])
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what a writing engine holds
        proc = dynamic_core("journal", "verify", str(d), cwd=tmp_path)
        assert proc.returncode == 1 and "a writer has this journal open" in proc.stdout
        assert "--repair" not in proc.stdout
        proc = dynamic_core("journal", "dump", str(d), cwd=tmp_path)
        assert proc.returncode == 1 and "a writer has this journal open" in proc.stderr
    finally:
        os.close(fd)
    proc = dynamic_core("journal", "verify", str(d), cwd=tmp_path)
    assert proc.returncode == 1 and "--repair to truncate the torn tail" in proc.stdout
    proc = dynamic_core("smc", str(d), cwd=tmp_path, timeout=120)
    assert "the journal's last record is torn" in proc.stderr and "Traceback" not in proc.stderr
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 0xFF
    seg.write_bytes(bytes(data))
    proc = dynamic_core("smc", str(d), cwd=tmp_path, timeout=120)
    assert proc.returncode == 1 and "corrupt" in proc.stderr and "Traceback" not in proc.stderr


def test_replay_threads_and_backtest_periods_are_refused_naming_the_option(tmp_path: Path) -> None:
    assert_clean_error(dynamic_core("replay", str(tmp_path), "--threads", "0", cwd=tmp_path),
                       "argument --threads: must be 1..63, got 0")
    assert_clean_error(dynamic_core("backtest", "--data", "sim", "--fast", "0", cwd=tmp_path),
                       "argument --fast: a period must be 1..100,000, got 0")
