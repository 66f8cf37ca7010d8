"""The Python examples in README.md and docs/ run as written.

README's examples continue one another (the quick start defines ``pop`` and ``bars``, later
examples use them), so they run in order in one namespace, in a fresh process, in a temporary
directory, the way a reader pastes them into one session. Where an example talks to something
outside the process, that thing is real: the transport example's sender and subscriber talk to a
``dynamic-core run --feed ... --publish ...`` service process (the README's own command line,
on free ports), the reasoning example starts its adapter processes, the MT5 example's bridge
trades with a simulated terminal. What an example leaves undefined (the mesh's ``ctx``, the
bridge's ``plan``) is defined just before it, and a few checks after an example make sure it
did its work, not only that it raised nothing. The ``dynamic-core`` command lines of README's
shell blocks are parsed by the CLI's own parser, so a renamed flag or command fails here too.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import dynamic_core as dc

from .test_reasoning_client import free_port

ROOT = Path(__file__).resolve().parent.parent
README_TEXT = " ".join((ROOT / "README.md").read_text().split())  # whitespace as one space
PKG_ROOT = str(Path(dc.__file__).resolve().parent.parent)  # the package under test: source tree or installed

# Runs the blocks given as JSON on stdin in one namespace; prints a marker per block.
RUNNER = textwrap.dedent("""
    import json, sys, traceback
    blocks = json.load(sys.stdin)
    ns = {"__name__": "__main__"}
    for i, b in enumerate(blocks):
        if b.get("skip_unless"):
            ok, why = eval(b["skip_unless"], ns)
            if not ok:
                print(f"@@ block {b['name']}: skipped ({why})", flush=True)
                continue
        for part in ("before", "code", "after"):
            try:
                exec(compile(b[part], f"<{b['name']}:{part}>", "exec"), ns)
            except BaseException:
                print(f"@@ block {b['name']} ({part}) failed:", flush=True)
                traceback.print_exc(file=sys.stdout)
                sys.exit(1)
        print(f"@@ block {b['name']}: ok", flush=True)
""")


def fenced_blocks(path: Path, lang: str) -> list[tuple[int, str]]:
    """(line number, text) of every fenced ```lang block in a markdown file."""
    out = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == f"```{lang}":
            j = i + 1
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            out.append((i + 1, "\n".join(lines[i + 1:j]) + "\n"))
            i = j
        i += 1
    return out


def python_blocks(path: Path) -> list[tuple[int, str]]:
    return fenced_blocks(path, "python")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}  # no provider is paid for
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PKG_ROOT, env.get("PYTHONPATH")) if p)
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    return env


def _run(blocks: list[dict], cwd: Path, timeout: float = 240) -> str:
    p = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(blocks), cwd=cwd, env=_env(),
                       capture_output=True, text=True, timeout=timeout)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-6000:]
    return out


def _block(name: str, code: str, before: str = "", after: str = "", skip_unless: str = "") -> dict:
    return {"name": name, "code": code, "before": textwrap.dedent(before), "after": textwrap.dedent(after),
            "skip_unless": skip_unless}


def test_python_blocks_are_found() -> None:
    # the extraction itself: a README without its examples would make the tests below vacuous
    blocks = python_blocks(ROOT / "README.md")
    assert len(blocks) >= 10
    assert "dc.Population.random" in blocks[0][1] and "import dynamic_core as dc" in blocks[0][1]
    assert len(python_blocks(ROOT / "docs" / "mt5-bridge.md")) == 1


def test_readme_python_examples_run_in_order(tmp_path: Path) -> None:
    feed, pub = free_port(), free_port()
    blocks = []
    for line, code in python_blocks(ROOT / "README.md"):
        name = f"README.md:{line}"
        if "MarketSender(" in code:
            # the README's service command line, on free ports; it waits for the example's subscriber
            assert "tcp://127.0.0.1:5555" in code and "tcp://127.0.0.1:5556" in code
            code = code.replace(":5555", f":{feed}").replace(":5556", f":{pub}")
            blocks.append(_block(name, code, after="""
                assert type(msg).__name__ == "SignalBatch", msg   # a signal of the bars just sent
                assert msg.signals and msg.signals[0].instrument == "EURUSD"
                """))
        elif "ReasoningMesh(" in code:
            blocks.append(_block(name, code, before="""
                from dynamic_core.reasoning.policy import DEFAULT_POLICY_TOML
                open("mesh.toml", "w").write(DEFAULT_POLICY_TOML)
                _sigs = dc.payloads.signals_from_records(signals[-3:])
                ctx = dc.payloads.ReasoningContext(signal_id=sig.id, instrument=sig.instrument,
                                                   timeframe=sig.timeframe, seq=sig.seq, action=sig.action,
                                                   score=sig.score, confidence=sig.confidence)
                ctxs = [dc.payloads.ReasoningContext(signal_id=s.id, instrument=s.instrument,
                                                     timeframe=s.timeframe, seq=s.seq, action=s.action,
                                                     score=s.score) for s in _sigs]
                """))
        elif "DecisionMaker(" in code and "TradingSession(" in code:
            # the figures the text after the example gives
            said = re.search(r"this makes (\d+) plans and (\d+) trades?", README_TEXT)
            assert said, "the decision example's figures are gone from README.md"
            blocks.append(_block(name, code, after=f"""
                _st = maker.stats()
                assert (_st["plans"], _st["trades"]) == ({said[1]}, {said[2]}), _st
                """))
        elif 'backend="cuda"' in code:
            blocks.append(_block(name, code, skip_unless="(lambda g: (g.usable, g.reason))(dc.gpu.probe())",
                                 before="""
                bar = bars[-1].copy()
                bar["ts"] += int(bar["timeframe"]) * 10**9
                """))
        else:
            blocks.append(_block(name, code))
    assert any("MarketSender(" in b["code"] for b in blocks)

    svc = subprocess.Popen(
        [sys.executable, "-m", "dynamic_core", "run", "--feed", f"tcp://127.0.0.1:{feed}", "--publish",
         f"tcp://127.0.0.1:{pub}", "--journal", str(tmp_path / "runs" / "feed"), "--wait-subscribers", "1",
         "--duration", "300", "-q", "--no-live"],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    svc_lines: list[str] = []
    bound = threading.Event()

    def read_service() -> None:
        for line in svc.stdout:
            svc_lines.append(line)
            if line.lstrip().startswith("signals   :"):
                bound.set()  # its sockets are bound: the subscriber's first wait starts from here

    reader = threading.Thread(target=read_service, daemon=True)
    reader.start()
    try:
        assert bound.wait(120), "the service did not start:\n" + "".join(svc_lines)[-3000:]
        out = _run(blocks, tmp_path)
    finally:
        svc.send_signal(signal.SIGINT)
        try:
            svc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            svc.kill()
            svc.wait()
        reader.join(10)
        svc.stdout.close()
    assert svc.returncode in (0, 130), "".join(svc_lines)[-3000:]
    done = re.findall(r"^@@ block (\S+): (ok|skipped)", out, re.M)
    assert len(done) == len(blocks), out[-3000:]
    # what the examples left on disk: their journals
    assert (tmp_path / "runs" / "today").is_dir() and (tmp_path / "run.journal").exists()


def readme_command_lines() -> list[list[str]]:
    """The ``dynamic-core`` command lines of README.md's bash blocks, as argument lists (comments,
    a trailing ``&`` and ``VAR=...`` prefixes taken off; a line that elides arguments with
    ``...`` or asks for ``--help`` left out)."""
    out = []
    for _, block in fenced_blocks(ROOT / "README.md", "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
                words.pop(0)
            if words and words[-1] == "&":
                words.pop()
            if words[:1] == ["dynamic-core"] and "..." not in words and "--help" not in words:
                out.append(words[1:])
    return out


def test_readme_command_lines_parse() -> None:
    # every documented command line is one the CLI accepts (a renamed flag, a removed command)
    from dynamic_core.cli import build_parser

    lines = readme_command_lines()
    assert len(lines) >= 12 and ["run", "--paper"] in lines
    bad = []
    for args in lines:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                build_parser().parse_args(args)
        except SystemExit:
            bad.append(f"dynamic-core {shlex.join(args)}: {err.getvalue().strip().splitlines()[-1]}")
    assert not bad, "\n".join(bad)


def test_mt5_bridge_doc_example_fills_an_order(tmp_path: Path) -> None:
    (line, code), = python_blocks(ROOT / "docs" / "mt5-bridge.md")
    port = free_port()
    assert "tcp://127.0.0.1:5560" in code
    code = code.replace(":5560", f":{port}")
    before = f"""
        import time
        from dynamic_core.bridges.mt5 import SimulatedTerminal
        from dynamic_core.payloads import TradingPlan
        terminal = SimulatedTerminal("tcp://127.0.0.1:{port}", heartbeat=0.2)
        terminal.set_price("EURUSD", 1.1)
        now = time.time_ns()
        plan = TradingPlan(plan_id="plan-1", signal_id="sig-1", instrument="EURUSD", timeframe=3600, ts=now,
                           seq=1, direction=1, action=1, entry=1.1, stop=1.09, targets=(1.12,), size=0.1,
                           valid_until=now + 60 * 10**9)
        """
    after = """
        terminal.close()
        assert terminal.broker.positions(), "the plan's order did not reach the account"
        """
    out = _run([_block(f"docs/mt5-bridge.md:{line}", code, before, after)], tmp_path, timeout=120)
    assert re.search(r"^\S+ filled 0\.1 1\.1 ", out, re.M), out[-3000:]
