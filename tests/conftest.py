from __future__ import annotations

import numpy as np
import pytest

import dynamic_core as dc


def _bundled(name: str) -> np.ndarray:
    import backtesting.test as bt

    return dc.market.from_pandas(getattr(bt, name), instrument=name)


@pytest.fixture(scope="session")
def eurusd() -> np.ndarray:
    """5,000 real EURUSD hourly bars bundled with backtesting.py."""
    return _bundled("EURUSD")


@pytest.fixture(scope="session")
def goog() -> np.ndarray:
    """Real GOOG daily bars bundled with backtesting.py."""
    return _bundled("GOOG")


@pytest.fixture(scope="session")
def btcusd() -> np.ndarray:
    """Real BTCUSD monthly bars bundled with backtesting.py."""
    return _bundled("BTCUSD")


@pytest.fixture(scope="session")
def sim_bars() -> np.ndarray:
    sim = dc.sim.MarketSimulator(["EURUSD", "GBPUSD", "USDJPY", "XAUUSD"], timeframe="H1", seed=11)
    return sim.bars(600)
