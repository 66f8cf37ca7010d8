"""Execution: the paper broker and the MetaTrader 5 bridge."""

from __future__ import annotations

from .paper import (
    EQUITY_DTYPE,
    ClosedTrade,
    CostModel,
    Fill,
    Leg,
    Order,
    OrderResult,
    PaperBroker,
    Position,
    order_from_plan,
)

__all__ = ["EQUITY_DTYPE", "ClosedTrade", "CostModel", "Fill", "Leg", "Order", "OrderResult", "PaperBroker",
           "Position", "order_from_plan"]
