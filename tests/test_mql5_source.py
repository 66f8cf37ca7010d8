"""The shipped MQL5 Expert Advisor (``dynamic_core/bridges/mql5``) against the bridge protocol.

No MetaTrader compiler runs on this machine, so these tests read the MQL5 sources: every
message type and field the Python schemas define (``dynamic_core.bridges.mt5.protocol``) must
be read (engine -> EA) or written (EA -> engine) by the EA with the same JSON key, the same
kind and the same bounds; the protocol constants must agree; the sources must be lexically
sound (balanced delimiters outside comments and strings, resolvable includes); the EA must
never block on its socket; and the files must be part of the installed package.
"""

from __future__ import annotations

import importlib.resources
import re
import shutil
import subprocess
import sys
import tomllib
import typing
from fnmatch import fnmatch
from inspect import signature
from pathlib import Path

import msgspec
import pytest
from dynamic_core.bridges.mt5 import protocol as P
from dynamic_core.bridges.mt5.bridge import DEFAULT_BRIDGE_ADDRESS, MT5Bridge

ROOT = Path(__file__).resolve().parents[1]
MQL5 = ROOT / "python" / "dynamic_core" / "bridges" / "mql5"
EA = MQL5 / "DynamicCoreEA.mq5"
INCLUDE = MQL5 / "Include"
SOURCES = [EA, *sorted((INCLUDE / "DynamicCore").glob("*.mqh"))]
SHIPPED = [*SOURCES, MQL5 / "README.md"]

# what the EA may include from outside this package: the mql-zmq binding and MT5's standard library
EXTERNAL_INCLUDES = {"Zmq/Zmq.mqh", "Trade/Trade.mqh"}

ERROR_REASONS = {"oversized", "malformed", "truncated", "unknown_tag", "unknown_field", "version", "invalid",
                 "unexpected"}  # docs/mt5-bridge.md, section 2.3

COMMON = tuple(f.name for f in msgspec.inspect.type_info(P.Heartbeat).fields[:4])  # v, epoch, seq, ts
I63 = 2**63 - 1


# ---- a small MQL5 lexer ---------------------------------------------------------------------------

def _mask(src: str) -> tuple[str, str]:
    """``(code, masked)``, both as long as ``src``: ``code`` has comments blanked; ``masked``
    also has the insides of string and character literals blanked (quotes kept), so that
    delimiters and identifiers in it are real code."""
    code, masked = list(src), list(src)
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            for k in range(i, j):
                code[k] = masked[k] = " "
            i = j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            assert j >= 0, "unterminated block comment"
            for k in range(i, j + 2):
                if src[k] != "\n":
                    code[k] = masked[k] = " "
            i = j + 2
        elif c in "\"'":
            j = i + 1
            while j < n and src[j] != c:
                assert src[j] != "\n", f"unterminated literal at offset {i}: {src[i:i + 40]!r}"
                j += 2 if src[j] == "\\" else 1
            assert j < n, f"unterminated literal at offset {i}"
            for k in range(i + 1, j):
                masked[k] = "x"
            i = j + 1
        else:
            i += 1
    return "".join(code), "".join(masked)


def _read(path: Path) -> tuple[str, str]:
    return _mask(path.read_text(encoding="utf-8"))


def _all_code() -> str:
    return "\n".join(_read(p)[0] for p in SOURCES)


def _function_body(name: str) -> str:
    """The body (comments blanked) of the MQL5 function ``name``, from whichever source defines it."""
    found = []
    for path in SOURCES:
        code, masked = _read(path)
        for m in re.finditer(r"^[A-Za-z_][\w ]*?\b" + re.escape(name) + r"\s*\(", masked, re.MULTILINE):
            depth, i = 0, m.end() - 1
            while True:  # the parameter list
                depth += {"(": 1, ")": -1}.get(masked[i], 0)
                i += 1
                if depth == 0:
                    break
            rest = masked[i:].lstrip()
            if not rest.startswith("{"):
                continue  # a declaration or a call, not the definition
            start = masked.index("{", i)
            depth, j = 0, start
            while True:
                depth += {"{": 1, "}": -1}.get(masked[j], 0)
                j += 1
                if depth == 0:
                    break
            found.append(code[start:j])
    assert len(found) == 1, f"expected one definition of {name}, found {len(found)}"
    return found[0]


def _split_args(s: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        depth += {"(": 1, ")": -1}.get(ch, 0)
        cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def _defines() -> dict[str, str]:
    out = {}
    for path in SOURCES:
        for m in re.finditer(r"^#define\s+(\w+)\s+(.+?)\s*$", _read(path)[0], re.MULTILINE):
            out[m.group(1)] = m.group(2)
    return out


def _value(token: str) -> float | int | bool:
    """A constant argument of the MQL5 source as a Python value."""
    token = token.strip()
    if token in ("true", "false"):
        return token == "true"
    if token in ("LONG_MAX", "DC_I63"):
        return I63
    defines = _defines()
    if token in defines:
        return _value(defines[token])
    if re.fullmatch(r"-?\d+", token):
        return int(token)
    return float(token)


def _calls(body: str, obj: str, methods: str) -> list[tuple[str, str, list[str]]]:
    """``(method, key, other args)`` of every ``obj.Method("key", ...)`` call in ``body``."""
    out = []
    for m in re.finditer(r"\b" + obj + r"\.(" + methods + r")\(", body):
        depth, i = 1, m.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(body[i], 0)
            i += 1
        args = _split_args(body[m.end():i - 1])
        key = re.fullmatch(r'"(\w+)"', args[0])
        assert key, f"{obj}.{m.group(1)} with a key that is not a string literal: {args[0]}"
        out.append((m.group(1), key.group(1), args[1:]))
    return out


def _struct(cls: type) -> msgspec.inspect.StructType:
    return msgspec.inspect.type_info(cls)


def _field(cls: type, name: str) -> typing.Any:
    return next(f.type for f in _struct(cls).fields if f.name == name)


ENGINE = typing.get_args(P.EngineMessage)      # what the EA reads
TERMINAL = typing.get_args(P.TerminalMessage)  # what the EA writes


# ---- files ----------------------------------------------------------------------------------------

def test_the_ea_and_its_includes_are_shipped() -> None:
    for path in SHIPPED:
        assert path.is_file(), f"missing {path.relative_to(ROOT)}"
    assert {p.name for p in SOURCES} >= {"DynamicCoreEA.mq5", "Json.mqh", "Protocol.mqh", "Session.mqh",
                                         "Trading.mqh"}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_delimiters_balance_outside_comments_and_literals(path: Path) -> None:
    _, masked = _read(path)
    stack: list[tuple[str, int]] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    for i, ch in enumerate(masked):
        if ch in "([{":
            stack.append((ch, i))
        elif ch in pairs:
            line = masked.count("\n", 0, i) + 1
            assert stack, f"{path.name}:{line}: unmatched {ch!r}"
            opened, at = stack.pop()
            assert opened == pairs[ch], (f"{path.name}:{line}: {ch!r} closes {opened!r} of line "
                                         f"{masked.count(chr(10), 0, at) + 1}")
    assert not stack, f"{path.name}: unclosed {[c for c, _ in stack]}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_every_include_resolves_to_a_shipped_file_or_a_known_library(path: Path) -> None:
    code, _ = _read(path)
    includes = re.findall(r'^\s*#include\s+([<"])([^>"]+)[>"]', code, re.MULTILINE)
    assert includes or path.name == "Json.mqh"
    for kind, name in includes:
        if kind == '"':
            target = path.parent / name
            assert target.is_file(), f"{path.name}: #include \"{name}\" is not shipped"
        elif name.startswith("DynamicCore/"):
            assert (INCLUDE / name).is_file(), f"{path.name}: #include <{name}> is not shipped"
        else:
            assert name in EXTERNAL_INCLUDES, f"{path.name}: unexpected external include <{name}>"
    # the EA is installed under MQL5/Experts: it reaches the includes through <DynamicCore/...>
    if path == EA:
        assert all(kind == "<" for kind, _ in includes)


# ---- the protocol ---------------------------------------------------------------------------------

def test_protocol_constants_agree() -> None:
    d = _defines()
    assert _value(d["DC_PROTOCOL_VERSION"]) == P.PROTOCOL_VERSION
    assert _value(d["DC_MAX_FRAME"]) == P.MAX_FRAME
    assert _value(d["DC_MAX_ID"]) == P.MAX_ID
    assert _value(d["DC_I63"]) == I63
    # the id alphabet is the one of the schema's pattern, and DcIsIdChar tests exactly it
    pattern = _field(P.Order, "client_order_id").pattern
    alphabet = set(d["DC_ID_CHARS"].strip('"'))
    assert alphabet == {chr(c) for c in range(128) if re.fullmatch(pattern, chr(c))}
    body = _function_body("DcIsIdChar")
    accepted = set()
    for lo, hi in re.findall(r"c>='(.)' && c<='(.)'", body):
        accepted |= {chr(c) for c in range(ord(lo), ord(hi) + 1)}
    accepted |= set(re.findall(r"c=='(.)'", body))
    assert accepted == alphabet


def test_the_decoder_dispatches_every_engine_message_type() -> None:
    body = _function_body("DcDecode")
    tags = re.findall(r'tag=="(\w+)"', body)
    assert sorted(tags) == sorted(_struct(cls).tag for cls in ENGINE)
    for cls in ENGINE:  # each tag reads the common fields and its own reader
        branch = body.split(f'tag=="{_struct(cls).tag}"', 1)[1].split("else", 1)[0]
        assert "DcReadHeader(j,m.h)" in branch.replace(" ", "")
        reader = f"DcRead{cls.__name__}"
        assert f"{reader}(" in branch, f"tag {_struct(cls).tag!r} does not call {reader}"
    assert "unknown_tag" in body and "Finish()" in body  # unknown type, unknown fields


def _check_read(kind: str, key: str, args: list[str], t: typing.Any) -> None:
    where = f"reader of `{key}`"
    assert args[-1].endswith("." + key), f"{where} stores into {args[-1]}"
    bounds = args[:-1]
    if isinstance(t, msgspec.inspect.IntType):
        lo = t.ge if t.ge is not None else (t.gt + 1 if t.gt is not None else -(2**63))
        hi = t.le if t.le is not None else (t.lt - 1 if t.lt is not None else I63)
        if key == "v":
            assert kind == "GetVersion" and lo == hi == _value(bounds[0]), where
            return
        assert kind == "GetInt", f"{where}: {kind} for an int"
        assert (_value(bounds[0]), _value(bounds[1])) == (lo, hi), f"{where}: bounds {bounds} != [{lo}, {hi}]"
    elif isinstance(t, msgspec.inspect.FloatType):
        assert kind == "GetDbl", f"{where}: {kind} for a float"
        lo, excl = (t.gt, True) if t.gt is not None else (t.ge, False)
        assert lo is not None and t.le is not None and t.lt is None
        assert (_value(bounds[0]), _value(bounds[1]), _value(bounds[2])) == (lo, t.le, excl), where
    elif isinstance(t, msgspec.inspect.StrType):
        if t.pattern is not None:
            assert kind == "GetId", f"{where}: a patterned string must be read with GetId"
            assert (t.min_length, _value(bounds[0])) == (1, t.max_length), where
        else:
            assert kind == "GetStr", f"{where}: {kind} for a str"
            assert t.max_length is not None, f"{where}: the schema has no length bound"
            assert (_value(bounds[0]), _value(bounds[1])) == (t.min_length or 0, t.max_length), where
    elif isinstance(t, msgspec.inspect.LiteralType):
        assert kind == "GetEnum", f"{where}: {kind} for a literal"
        assert set(bounds[0].strip('"').split("|")) == set(t.values), where
    elif isinstance(t, msgspec.inspect.BoolType):
        assert kind == "GetBool", where
    else:  # pragma: no cover - the protocol has no other field types
        pytest.fail(f"{where}: unsupported schema type {t!r}")


@pytest.mark.parametrize("cls", ENGINE, ids=lambda c: c.__name__)
def test_each_engine_message_is_read_with_the_schema_keys_and_bounds(cls: type) -> None:
    info = _struct(cls)
    calls = _calls(_function_body(f"DcRead{cls.__name__}"), "j", r"Get\w+")
    own = [f for f in info.fields if f.name not in COMMON]
    assert sorted(k for _, k, _ in calls) == sorted(f.name for f in own), (
        f"DcRead{cls.__name__} reads {sorted(k for _, k, _ in calls)}, "
        f"the schema has {sorted(f.name for f in own)}")
    types = {f.name: f.type for f in info.fields}
    for kind, key, args in calls:
        _check_read(kind, key, args, types[key])


def test_the_common_fields_are_read_with_the_schema_bounds() -> None:
    calls = _calls(_function_body("DcReadHeader"), "j", r"Get\w+")
    types = {f.name: f.type for f in _struct(P.Order).fields}
    assert [k for _, k, _ in calls] == list(COMMON)
    for kind, key, args in calls:
        _check_read(kind, key, args, types[key])


def _check_write(kind: str, key: str, args: list[str], t: typing.Any) -> None:
    where = f"writer of `{key}`"
    if isinstance(t, msgspec.inspect.IntType):
        assert kind == "Int", f"{where}: {kind} for an int"
    elif isinstance(t, msgspec.inspect.FloatType):
        assert kind == "Dbl", f"{where}: {kind} for a float"
    elif isinstance(t, msgspec.inspect.BoolType):
        assert kind == "Bool", f"{where}: {kind} for a bool"
    elif isinstance(t, msgspec.inspect.StrType):
        assert kind == "Str", f"{where}: {kind} for a str"
        assert t.max_length is not None and _value(args[1]) == t.max_length, (
            f"{where}: clipped to {args[1]}, the schema allows {t.max_length}")
    elif isinstance(t, msgspec.inspect.LiteralType):
        assert kind == "Str", f"{where}: {kind} for a literal"
        assert _value(args[1]) >= max(len(v) for v in t.values), where
    else:  # pragma: no cover
        pytest.fail(f"{where}: unsupported schema type {t!r}")


@pytest.mark.parametrize("cls", TERMINAL, ids=lambda c: c.__name__)
def test_each_terminal_message_is_written_with_the_schema_keys_and_kinds(cls: type) -> None:
    info = _struct(cls)
    body = _function_body(f"DcWrite{cls.__name__}")
    assert re.search(r'DcWriteHeader\(w,"' + info.tag + r'",s\)', body.replace(" ", "")), (
        f"DcWrite{cls.__name__} does not write the tag {info.tag!r}")
    calls = _calls(body, "w", r"Str|Int|Dbl|Bool")
    own = [f for f in info.fields if f.name not in COMMON]
    assert [k for _, k, _ in calls] == [f.name for f in own], (
        f"DcWrite{cls.__name__} writes {[k for _, k, _ in calls]}, the schema has {[f.name for f in own]}")
    types = {f.name: f.type for f in info.fields}
    for kind, key, args in calls:
        _check_write(kind, key, args, types[key])


def test_the_common_fields_are_written() -> None:
    calls = _calls(_function_body("DcWriteHeader"), "w", r"Str|Int|Dbl|Bool")
    assert [k for _, k, _ in calls] == [_struct(P.Order).tag_field, *COMMON]
    assert calls[1][2] == ["DC_PROTOCOL_VERSION"]
    assert all(kind == "Int" for kind, _, _ in calls[1:])


def test_every_message_the_ea_sends_goes_through_its_writer() -> None:
    ea, _ = _read(EA)
    for cls in TERMINAL:
        assert f"DcWrite{cls.__name__}(" in ea, f"the EA never sends {_struct(cls).tag!r}"
    # JSON is only produced by the writers: no hand-built message text in the EA
    assert '\\"type\\"' not in ea and "CJAVal" not in ea


def test_statuses_and_reasons_are_the_protocol_ones() -> None:
    code = _all_code()
    status_values = set(_field(P.ExecReport, "status").values)
    assigned = set(re.findall(r'\bstatus\s*=\s*(?:\([^;]*\)\s*\?\s*)?"(\w*)"(?:\s*:\s*"(\w*)")?', code))
    used = {s for pair in assigned for s in pair if s}
    assert used <= status_values, f"statuses outside the protocol: {used - status_values}"
    assert used == status_values, f"statuses the EA never reports: {status_values - used}"
    reasons = set(re.findall(r'SendError\(\s*"(\w+)"', code)) | set(re.findall(r'Fail\(\s*"(\w+)"', code))
    reasons |= set(re.findall(r'FieldFail\([^,]+,\s*"(\w+)"', code))
    reasons |= set(re.findall(r'reason="(\w+)"', _function_body("DcDecode")))
    assert reasons, "no error reasons found"
    assert reasons <= ERROR_REASONS, f"error reasons outside docs section 2.3: {reasons - ERROR_REASONS}"
    # the EA's own decisions named by the specification
    for literal in ('"expired"', '"cancelled"', '"terminal_restart"', '"flatten"', '"invalid_symbol"',
                    '"invalid_volume"', '"trade_disabled"'):
        assert literal in code, f"{literal} never used"


# ---- the EA ---------------------------------------------------------------------------------------

def _input_default(name: str) -> str:
    m = re.search(r"^input\s+\w+\s+" + name + r"\s*=\s*([^;]+);", _read(EA)[0], re.MULTILINE)
    assert m, f"no input {name}"
    return m.group(1).strip()


def test_inputs_default_to_the_engine_defaults() -> None:
    params = signature(MT5Bridge.__init__).parameters
    assert _input_default("InpEndpoint") == f'"{DEFAULT_BRIDGE_ADDRESS}"'
    assert int(_input_default("InpMagic")) == params["magic"].default
    assert int(_input_default("InpHeartbeatMs")) == round(params["heartbeat"].default * 1000)
    for name in ("InpTimerMs", "InpDeviationPoints", "InpFlattenOnEngineLoss", "InpHistoryDays",
                 "InpMaxOrders", "InpRefreshMs", "InpStateFile", "InpMaxMessagesPerPoll", "InpVerbose"):
        _input_default(name)


def test_the_ea_handles_the_terminal_events() -> None:
    ea, _ = _read(EA)
    for handler in ("int OnInit(", "void OnDeinit(const int reason)", "void OnTimer(", "void OnTick(",
                    "void OnTradeTransaction("):
        assert handler in ea, f"no {handler}"
    assert re.search(r"EventSetMillisecondTimer\(InpTimerMs\)", ea)
    assert "EventKillTimer()" in _function_body("OnDeinit")
    for handler in ("OnTimer", "OnTick"):
        assert "Poll()" in _function_body(handler), f"{handler} does not poll the socket"


def test_the_socket_is_a_dealer_that_never_blocks() -> None:
    ea, _ = _read(EA)
    init = _function_body("OnInit")
    assert re.search(r"new\s+Socket\(\s*g_ctx\s*,\s*ZMQ_DEALER\s*\)", init)
    assert "setLinger(0)" in init
    for opt in ("setSendHighWaterMark", "setReceiveHighWaterMark"):
        hwm = re.search(opt + r"\((\d+)\)", init)
        assert hwm and int(hwm.group(1)) >= 1000, f"{opt} must be at least 1000 (docs section 1)"
    assert ".bind(" not in ea and "ZMQ_PUB" not in ea and "ZMQ_PUSH" not in ea
    code = _all_code()
    socket_calls = 0
    for m in re.finditer(r"\b\w+\.(recv|send)\(", code):
        depth, i = 1, m.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(code[i], 0)
            i += 1
        args = _split_args(code[m.end():i - 1])
        assert len(args) == 2 and args[1] == "true", f"blocking {m.group(1)}: {code[m.start():i]}"
        socket_calls += 1
    assert socket_calls >= 3, "no socket calls found"
    assert "Sleep(" not in code
    # the mql-zmq API, as the binding defines it (Socket, SocketOptions, Context, ZmqMsg, Zmq)
    known = {"recv", "send", "connect", "valid", "setLinger", "setSendHighWaterMark",
             "setReceiveHighWaterMark", "setMaxMessageSize", "setReconnectInterval",
             "setReconnectIntervalMax", "setBlocky", "size", "more", "getData"}
    used = set(re.findall(r"\bg_(?:sock|ctx)\.(\w+)\(", code))
    used |= set(re.findall(r"\b(?:msg|part)\.(\w+)\(", code))
    assert used <= known, f"not part of the mql-zmq API: {used - known}"
    assert set(re.findall(r"Zmq::(\w+)\(", code)) <= {"errorNumber", "errorMessage"}


def test_orders_are_acked_before_they_are_placed_and_deduplicated_first() -> None:
    body = _function_body("OnOrderMessage")
    find, dup_ack = body.index("g_table.Find("), body.index("SendAck(rec,h.seq,true)")
    expired, lookup = body.index("now>=o.valid_until"), body.index("g_broker.Lookup(")
    ack, place = body.rindex("SendAck(rec,h.seq,false)"), body.index("g_broker.Place(")
    assert find < dup_ack < expired < lookup < ack < place, "order handling out of the protocol's order"
    # recorded (persisted) before the ack, the outcome recorded before the report
    assert body.rindex("g_table.Save(rec)", 0, ack) > lookup
    assert place < body.rindex("g_table.Save(rec)") < body.rindex("SendReport(rec)")


# ---- packaging ------------------------------------------------------------------------------------

def test_the_sources_are_package_data_of_the_wheel() -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["scikit-build"]
    packages = cfg["wheel"]["packages"]
    assert any(Path(p) in (Path("python/dynamic_core"), *Path("python/dynamic_core/bridges/mql5").parents)
               for p in packages), f"wheel.packages {packages} do not cover the EA sources"
    excludes = [*cfg.get("wheel", {}).get("exclude", []), *cfg.get("sdist", {}).get("exclude", [])]
    for path in SHIPPED:
        rel = path.relative_to(ROOT).as_posix()
        assert not any(fnmatch(rel, pat) or fnmatch(path.name, pat) for pat in excludes), f"{rel} is excluded"
    if shutil.which("git") and (ROOT / ".git").exists():
        ignored = subprocess.run(["git", "check-ignore", *[str(p) for p in SHIPPED]], cwd=ROOT,
                                 capture_output=True, text=True, check=False)
        assert ignored.stdout.strip() == "", f"git-ignored, so not in the sdist/wheel: {ignored.stdout}"


def test_the_installed_package_carries_the_sources() -> None:
    import dynamic_core

    pkg = Path(dynamic_core.__file__).resolve().parent
    if pkg == (ROOT / "python" / "dynamic_core").resolve():
        base = importlib.resources.files("dynamic_core.bridges") / "mql5"
        assert base.joinpath("DynamicCoreEA.mq5").is_file()
        pytest.skip("dynamic_core is imported from the source tree; CI checks the installed wheel")
    installed = pkg / "bridges" / "mql5"
    for path in SHIPPED:
        target = installed / path.relative_to(MQL5)
        assert target.is_file(), f"{target} is not installed ({sys.prefix})"
        assert target.read_bytes() == path.read_bytes(), f"{target} differs from the source"
