"""From signal to plan: instrument specs, trading plans, the risk governor and its guardrails,
and the decision maker that joins them to a trader."""

from __future__ import annotations

from .governor import DAY_NS, DAYS_KEPT, Portfolio, RiskGovernor, RiskLimits
from .maker import Attribution, CreditLedger, DecisionMaker, load_decision_config, top_contributors
from .plans import AtrTracker, PlanConfig, make_plan, plan_id_for, signal_id_for
from .session import RationaleBook, ShadowReport, ShadowSession, TradingSession, time_steps
from .specs import DEFAULT_SPECS, InstrumentSpec, instrument_spec, load_specs, quote_to_account

__all__ = [
    "DAYS_KEPT",
    "DAY_NS",
    "DEFAULT_SPECS",
    "AtrTracker",
    "Attribution",
    "CreditLedger",
    "DecisionMaker",
    "InstrumentSpec",
    "PlanConfig",
    "Portfolio",
    "RationaleBook",
    "RiskGovernor",
    "RiskLimits",
    "ShadowReport",
    "ShadowSession",
    "TradingSession",
    "instrument_spec",
    "load_decision_config",
    "load_specs",
    "make_plan",
    "plan_id_for",
    "quote_to_account",
    "signal_id_for",
    "time_steps",
    "top_contributors",
]
