"""``python -m dynamic_core``: the ``dynamic-core`` command line."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
