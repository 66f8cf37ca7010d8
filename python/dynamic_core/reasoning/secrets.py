"""API keys: where they come from and how they are kept out of logs and error messages.

A key lives in the environment (``OPENAI_API_KEY=...``) or in a TOML secrets file of
``NAME = "value"`` pairs that only its owner may read (mode 0600). Inside the process it is a
:class:`Secret`, whose ``repr`` and ``str`` are ``Secret('***')`` and which refuses to be
pickled, so a key cannot reach a log line, a traceback's ``repr`` or a message to another
process by accident. :func:`redact` and :class:`RedactingFilter` scrub the text that does leave
(error messages, log records) of every known key and of anything shaped like one: a key
whole, any run of :data:`FRAGMENT_CHARS` or more of its characters (a server that echoes a key
cut short, a cut that splits one), and either of those written as JSON ``\\uXXXX`` escapes.
"""

from __future__ import annotations

import bisect
import logging
import os
import re
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SecretsError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (requires-python allows it): the same parser, from PyPI
    import tomli as tomllib  # type: ignore[no-redef]

if TYPE_CHECKING:
    from .profiles import ProviderProfile

__all__ = ["FRAGMENT_CHARS", "SECRETS_ENV", "RedactingFilter", "Secret", "api_key", "load_secrets_file",
           "redact"]

SECRETS_ENV = "DYNAMIC_CORE_SECRETS"
"""Environment variable naming the secrets file used when :func:`api_key` is given no path."""

_KEY_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")
_MAX_FILE_BYTES = 1 << 20  # a secrets file is a handful of lines; anything bigger is a wrong path
_MIN_SECRET_LEN = 4  # shorter "secrets" would redact ordinary words and numbers everywhere

FRAGMENT_CHARS = 8
"""Any run of this many consecutive characters of a known key (of at least this length) is
redacted wherever it appears: a server may echo a key cut short or with its end masked
(``Incorrect API key provided: xai-AbCd...****``), and a text cut at a limit may end inside one;
either way what is left is still most of the key. Shorter keys are redacted whole only."""

_U_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})")

# Header values first (they may hold a token of any shape), then bare bearer tokens, then
# provider-style keys. A quoted JSON value is cut at its closing quote, a plain header line at
# its end.
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"""(?i)(authorization["']?\s*[:=]\s*)("[^"\r\n]*"?|'[^'\r\n]*'?|[^\r\n]*)"""), r"\1***"),
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]+"), r"\1***"),
    (re.compile(r"""(?i)(\bapi[_-]?key["']?\s*[:=]\s*["']?)[^\s"',;&}]{4,}"""), r"\1***"),
    (re.compile(r"sk-[A-Za-z0-9_-]{8,}"), "***"),
)


class Secret:
    """An API key that does not show itself.

    ``repr``, ``str`` and ``format`` give ``Secret('***')``; :meth:`reveal` gives the value, to be
    called only where it is sent (the ``Authorization`` header). Equality is identity, so a
    comparison cannot be used to probe the value; pickling raises :class:`TypeError`, so a key
    cannot ride along in a message to another process or a pickled log record.

    Parameters
    ----------
    value : str
        The key. Surrounding whitespace is not part of it (the line end of a key read from a
        CRLF file, say) and is dropped.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"a Secret wraps a str, got {type(value).__name__}")
        self._value = value.strip()

    def reveal(self) -> str:
        """The key itself."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return format(repr(self), spec)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a Secret cannot be pickled or copied (it would leave the process unredacted)")


def _line_of(err: tomllib.TOMLDecodeError) -> str:
    # tomllib (3.11) exposes the position only inside its message; some of its messages quote
    # the offending text, so only the numbers are kept.
    m = re.search(r"line (\d+)", str(err))
    return f"line {m.group(1)}" if m else "end of file"


def load_secrets_file(path: str | os.PathLike[str]) -> dict[str, Secret]:
    """Read a TOML file of ``NAME = "value"`` pairs that only its owner may read.

    Parameters
    ----------
    path : str or os.PathLike
        The file. Symbolic links are followed; the checks apply to the file they lead to.

    Returns
    -------
    dict[str, Secret]
        Each key name (``^[A-Z_][A-Z0-9_]*$``) and its value.

    Raises
    ------
    SecretsError
        The file is missing or unreadable, not a regular file, owned by another user, has any
        group or other permission bit set (fix: ``chmod 600 <path>``), is larger than 1 MiB, is
        not UTF-8 TOML (the message gives the line number, never the text), or holds a name
        that is not upper-case snake case or a value that is not a string. No message quotes a
        value.
    """
    p = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO must not hang; the checks below run on the open descriptor
        # so the file cannot be swapped between the check and the read.
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise SecretsError(f"secrets file {p} does not exist") from None
    except PermissionError:
        raise SecretsError(f"secrets file {p} is not readable by this user") from None
    except OSError as e:
        raise SecretsError(f"secrets file {p} cannot be opened: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SecretsError(f"secrets file {p} is not a regular file")
        geteuid = getattr(os, "geteuid", None)
        if geteuid is not None:  # POSIX only: Windows has neither uids nor these mode bits
            if st.st_uid != geteuid():
                raise SecretsError(f"secrets file {p} is owned by uid {st.st_uid}, not by this user "
                                   f"(uid {geteuid()})")
            if st.st_mode & 0o077:
                raise SecretsError(f"secrets file {p} has mode {stat.S_IMODE(st.st_mode):04o}: it must not be "
                                   f"readable by group or others; run: chmod 600 {p}")
        if st.st_size > _MAX_FILE_BYTES:
            raise SecretsError(f"secrets file {p} is {st.st_size} bytes, more than a secrets file holds")
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except SecretsError:
        raise
    except OSError as e:
        raise SecretsError(f"secrets file {p} cannot be read: {e.strerror}") from None
    finally:
        os.close(fd)
    raw = b"".join(chunks)
    text: str | None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None:
        raise SecretsError(f"secrets file {p} is not UTF-8 text")
    where: str | None = None
    data: dict[str, object] = {}
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        where = _line_of(e)
    if where is not None:
        # raised outside the except block so the TOML error, whose text may quote the file,
        # is not attached as __context__ either
        raise SecretsError(f"secrets file {p} is not valid TOML (error at {where}; contents not shown)")
    out: dict[str, Secret] = {}
    for i, (name, value) in enumerate(data.items(), 1):
        if not _KEY_NAME.match(name):
            # not shown: a name that is not one is most likely a key written where its name goes
            # (KEY = "NAME" instead of NAME = "KEY")
            raise SecretsError(f"secrets file {p}: entry {i} has a name that is not upper-case snake case "
                               "(not shown: is it a key written where its name goes?); names must match "
                               '^[A-Z_][A-Z0-9_]*$, as in OPENAI_API_KEY = "<the key>"')
        if not isinstance(value, str):
            raise SecretsError(f"secrets file {p}: {name} must be a string, got a TOML "
                               f"{type(value).__name__} (value not shown)")
        out[name] = Secret(value)
    return out


def api_key(profile: ProviderProfile, *, secrets_file: str | os.PathLike[str] | None = None,
            environ: Mapping[str, str] | None = None) -> Secret | None:
    """The API key of ``profile``: the value named by ``profile.api_key_env``.

    Looked up in the environment first, then in the secrets file (``secrets_file``, else the
    file named by ``DYNAMIC_CORE_SECRETS`` in the environment, when set). An empty value counts
    as absent.

    Parameters
    ----------
    profile : ProviderProfile
        The provider.
    secrets_file : str or os.PathLike, optional
        Secrets file to consult after the environment.
    environ : Mapping[str, str], optional
        The environment (default :data:`os.environ`).

    Returns
    -------
    Secret or None
        ``None`` when the provider needs no key (empty ``api_key_env``) or when none was found:
        the caller decides; a client without a key fails with kind ``auth`` at a provider that
        wants one.

    Raises
    ------
    SecretsError
        The secrets file had to be read and may not be (see :func:`load_secrets_file`).
    """
    name = profile.api_key_env
    if not name:
        return None
    env = os.environ if environ is None else environ
    value = env.get(name)
    if value:
        return Secret(value)
    path = secrets_file if secrets_file is not None else env.get(SECRETS_ENV) or None
    if path is None:
        return None
    found = load_secrets_file(path).get(name)
    return found if found else None


def key_values(secrets: Iterable[Secret | str]) -> list[str]:
    """The values of ``secrets`` that :func:`redact` replaces: distinct, at least 4 characters
    long (shorter ones would match ordinary words), longest first (so a key that contains another
    is not left half-redacted)."""
    values = {s.reveal() if isinstance(s, Secret) else s for s in secrets}
    return sorted((v for v in values if isinstance(v, str) and len(v) >= _MIN_SECRET_LEN), key=len, reverse=True)


def _spans(text: str, keys: list[str]) -> list[tuple[int, int]]:
    """Where ``keys`` occur in ``text``: each key whole, and each run of :data:`FRAGMENT_CHARS`
    characters of a key that long (the runs of one occurrence overlap, and merge into it)."""
    out: list[tuple[int, int]] = []
    for k in keys:
        needles = [k] if len(k) < FRAGMENT_CHARS else \
            dict.fromkeys(k[j:j + FRAGMENT_CHARS] for j in range(len(k) - FRAGMENT_CHARS + 1))
        for g in needles:
            i = text.find(g)
            while i >= 0:
                out.append((i, i + len(g)))
                i = text.find(g, i + 1)
    return out


def _escaped_spans(text: str, keys: list[str]) -> list[tuple[int, int]]:
    """:func:`_spans` in the view of ``text`` with its ``\\uXXXX`` escapes decoded, mapped back to
    ``text``: a key a server wrote as JSON escapes (in a body that did not decode) is still it."""
    starts: list[int] = []  # per piece: its start in the view, its start and end in text
    where: list[tuple[int, int]] = []
    pieces: list[str] = []
    v = o = 0
    for m in _U_ESCAPE.finditer(text):
        if m.start() > o:
            starts.append(v)
            where.append((o, m.start()))
            pieces.append(text[o:m.start()])
            v += m.start() - o
        starts.append(v)
        where.append((m.start(), m.end()))
        pieces.append(chr(int(m.group(1), 16)))
        v += 1
        o = m.end()
    if o < len(text):
        starts.append(v)
        where.append((o, len(text)))
        pieces.append(text[o:])

    def orig(i: int, end: bool) -> int:  # text position of view position i (of its end: end=True)
        k = bisect.bisect_right(starts, i) - 1
        a, b = where[k]
        if b - a != len(pieces[k]):  # an escape: all of it
            return b if end else a
        return a + (i - starts[k]) + int(end)

    return [(orig(a, False), orig(b - 1, True)) for a, b in _spans("".join(pieces), keys)]


def redact_keys(text: str, keys: list[str]) -> str:
    """``text`` with each of ``keys`` (as :func:`key_values` gives them) replaced by ``***``:
    whole, any run of :data:`FRAGMENT_CHARS` of its characters, and either written as
    ``\\uXXXX`` escapes. Only the keys, not the generic patterns :func:`redact` adds."""
    if not keys or not text:
        return text
    spans = _spans(text, keys)
    if "\\u" in text:
        spans += _escaped_spans(text, keys)
    if not spans:
        return text
    spans.sort()
    out: list[str] = []
    pos = 0
    cur_a, cur_b = spans[0]
    for a, b in spans[1:]:
        if a < cur_b:  # overlapping: one run (two keys side by side stay two)
            cur_b = max(cur_b, b)
            continue
        out += (text[pos:cur_a], "***")
        pos = cur_b
        cur_a, cur_b = a, b
    out += (text[pos:cur_a], "***", text[cur_b:])
    return "".join(out)


def redact(text: str, secrets: Iterable[Secret | str] = ()) -> str:
    """``text`` with every secret replaced by ``***``.

    Parameters
    ----------
    text : str
        Any text bound for a log, an error message or another process.
    secrets : Iterable[Secret | str]
        Known keys; each occurrence of one at least 4 characters long is replaced.

    Returns
    -------
    str
        The text, with the known keys (whole, in runs of :data:`FRAGMENT_CHARS` or more of their
        characters, and as ``\\uXXXX`` escapes), ``Authorization`` header values, ``Bearer``
        tokens, ``api_key=...`` values and anything shaped like a provider key (``sk-...``)
        replaced by ``***``.
    """
    text = redact_keys(text, key_values(secrets))
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


class RedactingFilter(logging.Filter):
    """A logging filter that scrubs secrets from records (see :func:`redact`).

    The message is formatted with its arguments, redacted and stored back with no arguments; an
    exception's traceback text and ``stack_info`` are redacted too. The filter never drops a
    record.

    A filter on a logger only sees records logged on that very logger, not those propagated from
    its children: to cover a whole process, use :meth:`install`, which also adds it to each of
    the logger's handlers.

    Parameters
    ----------
    secrets : Iterable[Secret | str]
        Known keys; more can be added with :meth:`add`.
    """

    def __init__(self, secrets: Iterable[Secret | str] = (), name: str = "") -> None:
        super().__init__(name)
        self._secrets: list[Secret | str] = [s for s in secrets if s]

    def add(self, secret: Secret | str) -> None:
        """Redact ``secret`` too, from now on."""
        if secret:
            self._secrets.append(secret)

    def install(self, logger: logging.Logger | None = None) -> RedactingFilter:
        """Add this filter to ``logger`` (default: the root logger) and to each of its handlers."""
        logger = logging.getLogger() if logger is None else logger
        logger.addFilter(self)
        for handler in logger.handlers:
            handler.addFilter(self)
        return self

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string: keep what there is, never lose the record
            message = f"{record.msg!s} {record.args!r}"
        record.msg = redact(message, self._secrets)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self._secrets)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, self._secrets)
        return True
