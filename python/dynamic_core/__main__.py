"""``python -m dynamic_core``: the ``dynamic-core`` command line."""

from __future__ import annotations

import sys

try:
    from .cli import main
except KeyboardInterrupt:
    # ^C while the command line is still importing: the same word and code as main's
    print("dynamic-core: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
