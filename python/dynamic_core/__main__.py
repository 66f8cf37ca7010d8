"""``python -m dynamic_core``: the ``dynamic-core`` command line."""

from __future__ import annotations

import sys

from . import _launch

try:
    from .cli import main
except KeyboardInterrupt:  # ^C while the command line is still importing: as main ends one
    _launch.end_interrupted()

sys.exit(main())
