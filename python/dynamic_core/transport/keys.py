"""CURVE key pairs for the control plane, in pyzmq's certificate format.

``new_keypair(DIR, "server")`` writes ``DIR/server.key`` (public, shareable) and
``DIR/server.key_secret`` (public + secret, mode 0600), the files ``zmq.auth.create_certificates``
writes and ``zmq.auth.load_certificate(s)`` reads. The usual layout:

* the server keeps ``server.key_secret`` and gives ``server.key`` to its clients;
* each client keeps its ``<name>.key_secret``; the operator copies its ``<name>.key`` into the
  server's *authorised-keys directory*. The server accepts exactly the public keys found there
  (:meth:`ControlServer.reload_keys` re-reads it). Keep that directory free of other ``.key``
  files: every one of them is authorised.

Secret keys are never logged, printed or put in a ``repr`` by dynamic_core.

Permissions (POSIX): directories :func:`new_keypair` creates are mode 0700 whatever the umask;
a key directory (or authorised-keys directory) that group or others may write to is logged as a
warning, once per directory and process (anyone who can write there can add an authorised key
or swap a key file); :func:`load_keypair` refuses a secret key file that group or others may
access at all (``PermissionError``; fix: ``chmod 600 FILE``).
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import stat
import threading
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

from ._common import make_private_dirs

__all__ = ["authorised_keys", "load_keypair", "load_public_key", "new_keypair"]

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

log = logging.getLogger("dynamic_core.transport.keys")

_Z85 = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")  # the text of a key
_POSIX_MODES = hasattr(os, "geteuid")  # Windows has neither uids nor these mode bits
_warned_dirs: set[str] = set()
_warned_lock = threading.Lock()


def _warn_if_open(directory: str | os.PathLike) -> None:
    """Log once per directory (and process) when group or others may write to it."""
    if not _POSIX_MODES:
        return
    try:
        st = os.stat(directory)
    except OSError:
        return
    if not st.st_mode & 0o022:
        return
    key = os.path.realpath(directory)
    with _warned_lock:
        if key in _warned_dirs:
            return
        _warned_dirs.add(key)
    log.warning("key directory %s has mode %04o: group or others can write to it (and so add or replace "
                "keys); run: chmod go-w %s", directory, stat.S_IMODE(st.st_mode), directory)


_BANNER = """#   ****  Generated on {now} by dynamic_core (pyzmq {pyzmq} / libzmq {libzmq})  ****
#   ZeroMQ CURVE {what}
#   {advice}

metadata
curve
    public-key = "{public}"
"""


def _write(path: Path, text: str, mode: int) -> None:
    # O_EXCL + mode at creation: the secret is never readable by others, not even briefly
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def new_keypair(directory: str | os.PathLike, name: str = "client", *,
                overwrite: bool = False) -> tuple[Path, Path]:
    """Create a CURVE key pair: ``(DIR/name.key, DIR/name.key_secret)``.

    The directory, and any missing parent, is created with mode 0700; the secret file is created
    with mode 0600. An existing directory that group or others may write to is logged as a
    warning (once). Existing files are refused unless ``overwrite=True`` (a silently replaced
    server key locks every client out).
    """
    if not _NAME.match(name):
        raise ValueError(f"key name {name!r}: use 1-64 letters, digits, '_', '-' or '.'")
    d = Path(directory)
    make_private_dirs(d)
    _warn_if_open(d)
    public_file, secret_file = d / f"{name}.key", d / f"{name}.key_secret"
    for f in (public_file, secret_file):
        if f.exists():
            if not overwrite:
                raise FileExistsError(f"{f} exists (--force on the command line, overwrite=True in Python, "
                                      "replaces it)")
            f.unlink()
    public, secret = zmq.curve_keypair()
    fmt = {"now": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(), "public": public.decode("ascii")}
    _write(public_file, _BANNER.format(what="public certificate", advice="share freely", **fmt), 0o644)
    _write(secret_file,
           _BANNER.format(what="SECRET certificate", advice="DO NOT PROVIDE THIS FILE TO OTHER USERS",
                          **fmt) + f'    secret-key = "{secret.decode("ascii")}"\n', 0o600)
    return public_file, secret_file


def load_keypair(secret_file: str | os.PathLike) -> tuple[bytes, bytes]:
    """``(public, secret)`` z85 keys from a ``.key_secret`` file.

    On POSIX systems a file that group or others may read, write or execute (any of the mode
    bits 0077, e.g. 0644) is refused with ``PermissionError`` (fix it with ``chmod 600 FILE``),
    or with ``ValueError`` when it holds no secret key at all (a public ``.key`` file). A
    group/world-writable directory holding it is logged as a warning."""
    path = os.fspath(secret_file)
    st = _regular_file(path, "secret key file")
    if _POSIX_MODES:
        if st.st_mode & 0o077:
            # a public key file (0644 is right for it) is named as such (a regular file: read
            # without blocking)
            if not zmq.auth.load_certificate(path)[1]:
                raise ValueError(f"{secret_file}: no secret key in it (pass the .key_secret file)")
            raise PermissionError(f"secret key file {path} has mode {stat.S_IMODE(st.st_mode):04o}: it must not "
                                  f"be accessible by group or others; run: chmod 600 {path}")
        _warn_if_open(os.path.dirname(os.path.abspath(path)))
    public, secret = zmq.auth.load_certificate(path)
    if not secret:
        raise ValueError(f"{secret_file}: no secret key in it (pass the .key_secret file)")
    return public, secret


def load_public_key(key: str | bytes | os.PathLike) -> bytes:
    """A z85 public key from a ``.key``/``.key_secret`` file, or the 40-character z85 text itself."""
    if isinstance(key, (str, bytes)) and len(key) == 40 and not os.path.exists(key):
        k = key.encode("ascii") if isinstance(key, str) else key
        z85.decode(k)  # validates
        return k
    path = os.fspath(key)
    _regular_file(path, "public key file")
    public, _ = zmq.auth.load_certificate(path)
    return public


def authorised_keys(directory: str | os.PathLike) -> set[bytes]:
    """z85 public keys of every ``*.key`` file in ``directory``."""
    d = os.fspath(directory)
    if not os.path.isdir(d):
        raise FileNotFoundError(f"authorised-keys directory not found: {d}")
    _warn_if_open(d)
    for f in sorted(Path(d).glob("*.key")):
        _regular_file(os.fspath(f), "authorised key file")  # a FIFO would block the read
    return set(zmq.auth.load_certificates(d))


def _regular_file(path: str | bytes, what: str) -> os.stat_result:
    """``os.stat(path)`` of a regular file; FileNotFoundError naming ``what`` (not echoing a
    path that looks like key text, which would put a secret in a log), ValueError for a FIFO, a
    device, a directory or another non-file (reading it could block or never end)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if _Z85.fullmatch(os.fsdecode(path)):
            raise FileNotFoundError(f"{what} not found: the argument is 40 key characters, not a file "
                                    "name (pass the key file)") from None
        raise FileNotFoundError(f"{what} not found: {os.fsdecode(path)}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{what} {os.fsdecode(path)} is not a regular file")
    return st
