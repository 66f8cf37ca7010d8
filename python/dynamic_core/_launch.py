"""Whether this process is the ``dynamic-core`` command, for a ^C that lands while the package
is still importing (before :func:`dynamic_core.cli.main` can catch it).

A console script imports ``dynamic_core.cli`` (and so the whole package) before any of our code
runs, and ``python -m dynamic_core`` imports the package before ``__main__``; a
``KeyboardInterrupt`` there would print the interpreter's traceback. The package's imports end
the command the way ``main`` does instead: ``dynamic-core: interrupted`` on stderr, exit code
130. Imported as a library, the interrupt propagates unchanged.
"""

from __future__ import annotations

import os
import sys

PROG = "dynamic-core"


def is_command() -> bool:
    """True when this interpreter runs the ``dynamic-core`` console script or
    ``python -m dynamic_core``."""
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) in (PROG, PROG + ".exe", PROG + "-script.py"):
        return True
    orig = getattr(sys, "orig_argv", [])
    for i, a in enumerate(orig[:-1]):
        if a == "-m":
            return orig[i + 1] in ("dynamic_core", "dynamic_core.cli")
    return False


def end_interrupted() -> None:
    """End the command as ``main`` ends an interrupted one: one line on stderr, exit code 130."""
    print(f"{PROG}: interrupted", file=sys.stderr)
    raise SystemExit(130)


def interrupted() -> None:
    """In an ``except KeyboardInterrupt`` around an import, before a bare ``raise``: end the
    command when this process is the command; otherwise return, and the caller re-raises the
    interrupt."""
    if is_command():
        end_interrupted()
