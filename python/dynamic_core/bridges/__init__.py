"""Execution: the paper broker and the MetaTrader 5 bridge."""

from __future__ import annotations
