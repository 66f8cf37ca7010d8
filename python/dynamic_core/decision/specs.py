"""Instrument contract specifications: what a lot is, how sizes round, how P&L converts.

A plan's size is ``risk amount / (stop distance x value of one price unit per lot)``, rounded
down to the instrument's lot step and clipped to its limits, so every instrument that can be
traded needs a spec. :func:`instrument_spec` knows the simulator's and the bundled data's
instruments, guesses a six-letter currency pair, and otherwise falls back to an equity-like
contract of one unit per lot; :func:`load_specs` reads overrides from TOML.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from typing import Annotated, Any

import msgspec

__all__ = ["DEFAULT_SPECS", "InstrumentSpec", "conversion_prices", "instrument_spec", "load_specs",
           "quote_to_account"]

_Pos = Annotated[float, msgspec.Meta(gt=0.0)]


class InstrumentSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One instrument's contract.

    Attributes
    ----------
    name : str
        Instrument name as in ``dc.instruments``.
    asset_class : str
        ``fx``, ``metal``, ``crypto``, ``equity`` or ``index``.
    base, quote : str
        Currency codes; P&L is in ``quote`` per unit of ``base`` (for equities ``base`` is the
        ticker and ``quote`` its currency). Exposure limits per currency count both legs.
    contract_size : float
        Units of ``base`` in one lot (100,000 for FX majors, 100 oz for gold, 1 share).
    lot_step, min_lot, max_lot : float
        Sizes are multiples of ``lot_step`` within [``min_lot``, ``max_lot``].
    tick_size : float
        Smallest price increment (prices of orders sent to a terminal are rounded to it).
    digits : int
        Decimal places of quoted prices.
    """

    name: str
    asset_class: str = "fx"
    base: str = ""
    quote: str = "USD"
    contract_size: _Pos = 100_000.0
    lot_step: _Pos = 0.01
    min_lot: _Pos = 0.01
    max_lot: _Pos = 100.0
    tick_size: _Pos = 0.00001
    digits: Annotated[int, msgspec.Meta(ge=0, le=12)] = 5

    def __post_init__(self) -> None:
        if self.min_lot > self.max_lot:
            raise ValueError(f"{self.name}: min_lot {self.min_lot} > max_lot {self.max_lot}")

    def round_lots(self, lots: float) -> float:
        """``lots`` rounded DOWN to the lot step (never more risk than asked), 0.0 when that is
        below ``min_lot``, clipped to ``max_lot``."""
        if not lots > 0.0:
            return 0.0
        step = self.lot_step
        steps = int(lots / step + 1e-9)
        inv = _inverse_step(step)
        # steps / (1/step) for decimal steps (0.01 -> /100) is the correctly rounded decimal;
        # steps * 0.01 is not (3 * 0.01 = 0.030000000000000002)
        out = steps / inv if inv else round(steps * step, 10)
        if out < self.min_lot - 1e-12:
            return 0.0
        return min(self.max_lot, out)

    def round_price(self, price: float) -> float:
        """``price`` on the tick grid, at ``digits`` decimals."""
        return round(round(price / self.tick_size) * self.tick_size, self.digits)


_INVERSES: dict[float, int] = {}


def _inverse_step(step: float) -> int:
    """``1 / step`` when that is a whole number (0.01 -> 100, 1.0 -> 1), else 0."""
    inv = _INVERSES.get(step)
    if inv is None:
        r = round(1.0 / step)
        inv = _INVERSES[step] = r if r >= 1 and abs(1.0 / step - r) < 1e-9 else 0
    return inv


def _fx(name: str, digits: int = 5) -> InstrumentSpec:
    return InstrumentSpec(name=name, asset_class="fx", base=name[:3], quote=name[3:], contract_size=100_000.0,
                          tick_size=10.0 ** -digits, digits=digits)


DEFAULT_SPECS: dict[str, InstrumentSpec] = {
    "EURUSD": _fx("EURUSD"),
    "GBPUSD": _fx("GBPUSD"),
    "AUDUSD": _fx("AUDUSD"),
    "USDJPY": _fx("USDJPY", 3),
    "XAUUSD": InstrumentSpec(name="XAUUSD", asset_class="metal", base="XAU", quote="USD", contract_size=100.0,
                             tick_size=0.01, digits=2),
    "BTCUSD": InstrumentSpec(name="BTCUSD", asset_class="crypto", base="BTC", quote="USD", contract_size=1.0,
                             tick_size=0.01, digits=2, max_lot=50.0),
    "SPX": InstrumentSpec(name="SPX", asset_class="index", base="SPX", quote="USD", contract_size=1.0,
                          lot_step=0.1, min_lot=0.1, max_lot=1000.0, tick_size=0.01, digits=2),
    "GOOG": InstrumentSpec(name="GOOG", asset_class="equity", base="GOOG", quote="USD", contract_size=1.0,
                           lot_step=1.0, min_lot=1.0, max_lot=100_000.0, tick_size=0.01, digits=2),
}
"""Specs of the simulator's instruments and the bundled market data."""

_ISO = {"USD", "EUR", "JPY", "GBP", "CHF", "AUD", "NZD", "CAD", "CNH", "CNY", "HKD", "SGD", "SEK", "NOK",
        "MXN", "ZAR", "TRY", "PLN"}


def instrument_spec(name: str, overrides: Mapping[str, InstrumentSpec] | None = None) -> InstrumentSpec:
    """The spec of ``name``: ``overrides``, then :data:`DEFAULT_SPECS`, then a guess (a
    six-letter ISO pair is an FX major; anything else one unit per lot, two decimals)."""
    if overrides and name in overrides:
        return overrides[name]
    if name in DEFAULT_SPECS:
        return DEFAULT_SPECS[name]
    u = name.upper()
    if len(u) == 6 and u[:3] in _ISO and u[3:] in _ISO:
        return _fx(name, 3 if u[3:] == "JPY" else 5)
    return InstrumentSpec(name=name, asset_class="equity", base=name, quote="USD", contract_size=1.0,
                          lot_step=1.0, min_lot=1.0, max_lot=1_000_000.0, tick_size=0.01, digits=2)


def conversion_prices(spec: InstrumentSpec, account: str = "USD") -> tuple[str, ...]:
    """The names of the cross prices :func:`quote_to_account` reads for ``spec`` (the direct
    quote-account pair first, then the inverse); none when the quote or the base is the account."""
    if spec.quote == account or spec.base == account:
        return ()
    return (spec.quote + account, account + spec.quote)


def quote_to_account(spec: InstrumentSpec, price: float, account: str = "USD",
                     prices: Mapping[str, float] | None = None) -> float:
    """Account-currency value of one unit of ``spec.quote`` at ``price`` (the instrument's
    own price) or via a cross in ``prices`` (``{"USDJPY": 150.0}``). 1.0 when the quote
    currency is the account's; raises ``KeyError`` when no route is known."""
    if spec.quote == account:
        return 1.0
    if spec.base == account:
        return 1.0 / price
    prices = prices or {}
    direct_name, inverse_name = conversion_prices(spec, account)
    direct = prices.get(direct_name)
    if direct:
        return float(direct)
    inverse = prices.get(inverse_name)
    if inverse:
        return 1.0 / float(inverse)
    raise KeyError(f"no price converts {spec.quote} to {account} (need {spec.quote}{account} or {account}{spec.quote})")


def load_specs(path: str | os.PathLike[str]) -> dict[str, InstrumentSpec]:
    """Instrument specs from a TOML file of ``[instruments.NAME]`` tables (fields of
    :class:`InstrumentSpec`; omitted fields default as for :func:`instrument_spec`)."""
    with open(path, "rb") as f:
        doc: dict[str, Any] = tomllib.load(f)
    out: dict[str, InstrumentSpec] = {}
    for name, table in (doc.get("instruments") or {}).items():
        base = msgspec.structs.asdict(instrument_spec(name))
        base.update(table)
        base["name"] = name
        out[name] = msgspec.convert(base, InstrumentSpec)
    return out
