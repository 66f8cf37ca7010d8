"""From signal to plan: instrument specs, trading plans, the risk governor and its guardrails."""

from __future__ import annotations

from .specs import DEFAULT_SPECS, InstrumentSpec, instrument_spec, load_specs, quote_to_account

__all__ = ["DEFAULT_SPECS", "InstrumentSpec", "instrument_spec", "load_specs", "quote_to_account"]
