"""Instrument contract specifications: what a lot is, how sizes round, how P&L converts.

A plan's size is ``risk amount / (stop distance x value of one price unit per lot)``, rounded
down to the instrument's lot step and clipped to its limits, so every instrument that can be
traded needs a spec. :func:`instrument_spec` knows the simulator's and the bundled data's
instruments, guesses a six-letter currency pair, and otherwise falls back to an equity-like
contract of one unit per lot; :func:`load_specs` reads overrides from TOML.
"""

from __future__ import annotations

import math
import numbers
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from typing import Annotated, Any

import msgspec

__all__ = ["DEFAULT_SPECS", "MIN_LOT_STEP", "InstrumentSpec", "conversion_prices", "instrument_spec", "load_specs",
           "quote_to_account"]

_Pos = Annotated[float, msgspec.Meta(gt=0.0)]

MIN_LOT_STEP = 1e-9
"""The smallest lot step a spec may have: sizes are counted in steps, and a finer step makes
those counts overflow (``lots / 1e-320`` is inf) while no venue trades below it."""


# ---- field checks that also hold for Structs built in Python --------------------------------------
#
# msgspec checks ``Meta`` constraints only when it decodes or converts; a config Struct built in
# Python (the README's way) would take NaN, a negative limit or a wrong type unchecked. The same
# constraints, read once per class from its annotations, are checked in ``__post_init__`` (which
# msgspec runs on construction, decode, convert and ``structs.replace``), and floats must also be
# finite: NaN compares false and would switch a limit off, inf has no size to trade.

_CHECKS: dict[type, tuple[tuple[str, Callable[[Any], str]], ...]] = {}


def _bounds(t: Any) -> str:
    parts = [f"{op} {v!r}" for op, v in ((">", t.gt), (">=", t.ge), ("<", t.lt), ("<=", t.le)) if v is not None]
    return " and ".join(parts)


def _in_bounds(t: Any, v: Any) -> bool:
    return ((t.gt is None or v > t.gt) and (t.ge is None or v >= t.ge) and (t.lt is None or v < t.lt)
            and (t.le is None or v <= t.le))


def _checker(t: Any) -> Callable[[Any], str]:
    """A function of a value returning '' when ``t`` (a msgspec.inspect type) admits it, else
    what it must be."""
    ti = msgspec.inspect
    if isinstance(t, ti.FloatType):
        want = "a finite number" + (f" {_bounds(t)}" if _bounds(t) else "")

        def check(v: Any) -> str:
            ok = (isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
                  and _in_bounds(t, v))
            return "" if ok else want
        return check
    if isinstance(t, ti.IntType):
        want = "an integer" + (f" {_bounds(t)}" if _bounds(t) else "")

        def check(v: Any) -> str:
            ok = isinstance(v, numbers.Integral) and not isinstance(v, bool) and _in_bounds(t, v)
            return "" if ok else want
        return check
    if isinstance(t, ti.StrType):
        lo, hi = t.min_length or 0, t.max_length
        want = f"a string of {lo} to {hi} characters" if hi is not None else f"a string of at least {lo} characters"
        pat = re.compile(t.pattern) if t.pattern else None
        if pat is not None:
            want += f" matching {t.pattern!r}"

        def check(v: Any) -> str:
            ok = (isinstance(v, str) and len(v) >= lo and (hi is None or len(v) <= hi)
                  and (pat is None or pat.search(v) is not None))
            return "" if ok else want
        return check
    if isinstance(t, ti.BoolType):
        return lambda v: "" if isinstance(v, bool) else "true or false"
    if isinstance(t, ti.VarTupleType):
        item = _checker(t.item_type)
        hi = t.max_length

        def check(v: Any) -> str:
            if not isinstance(v, tuple) or (hi is not None and len(v) > hi):
                return "a tuple" + (f" of at most {hi} items" if hi is not None else "")
            for x in v:
                bad = item(x)
                if bad:
                    return f"a tuple of items each {bad}"
            return ""
        return check
    return lambda v: ""  # a type without constraints of ours


CURRENCY_PATTERN = r"^[A-Z][A-Z0-9]{2,7}$"
CurrencyCode = Annotated[str, msgspec.Meta(min_length=3, max_length=8, pattern=CURRENCY_PATTERN)]
"""An account or leg currency code as instruments name them: upper case, 3 to 8 letters or
digits (``USD``, ``USDT``); ``usd`` would match no instrument's legs, so no plan could be valued."""


def check_fields(obj: msgspec.Struct) -> None:
    """Raise ``ValueError`` naming the first field of ``obj`` its annotation's constraints
    refuse (and any non-finite float), as decoding it would."""
    cls = type(obj)
    checks = _CHECKS.get(cls)
    if checks is None:
        checks = _CHECKS[cls] = tuple((f.name, _checker(f.type)) for f in msgspec.inspect.type_info(cls).fields)
    for name, check in checks:
        v = getattr(obj, name)
        bad = check(v)
        if bad:
            raise ValueError(f"{cls.__name__}.{name} must be {bad}, got {v!r}")


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
        check_fields(self)
        if self.lot_step < MIN_LOT_STEP:
            raise ValueError(f"{self.name}: InstrumentSpec.lot_step must be >= {MIN_LOT_STEP!r}, got {self.lot_step!r}")
        if self.min_lot > self.max_lot:
            raise ValueError(f"{self.name}: min_lot {self.min_lot} > max_lot {self.max_lot}")

    def round_lots(self, lots: float, *, cap: bool = True) -> float:
        """``lots`` rounded DOWN to the lot step (never more risk than asked), 0.0 when that is
        below ``min_lot``, clipped to ``max_lot`` (an order's limit) unless ``cap`` is False (a
        close of a position built from several orders)."""
        if not lots > 0.0:
            return 0.0
        step = self.lot_step
        q = lots / step + 1e-9
        if q == math.inf:  # more steps than a float counts (or lots = inf): the most there is
            return self.max_lot if lots != math.inf and cap else 0.0
        steps = int(q)
        inv = _INVERSES.get(step)
        if inv is None:
            inv = _inverse_step(step)
        # steps / (1/step) for decimal steps (0.01 -> /100) is the correctly rounded decimal;
        # steps * 0.01 is not (3 * 0.01 = 0.030000000000000002)
        out = steps / inv if inv else round(steps * step, 10)
        if out < self.min_lot - 1e-12:
            return 0.0
        return min(self.max_lot, out) if cap else out

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
    # the legs are currency codes whatever the name's case ("eurusd" quotes in USD)
    return InstrumentSpec(name=name, asset_class="fx", base=name[:3].upper(), quote=name[3:].upper(),
                          contract_size=100_000.0, tick_size=10.0 ** -digits, digits=digits)


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


_GUESSED: dict[str, InstrumentSpec] = {}
_GUESSED_MAX = 1 << 16  # guessed specs kept (a spec is immutable: callers may share one)


def instrument_spec(name: str, overrides: Mapping[str, InstrumentSpec] | None = None) -> InstrumentSpec:
    """The spec of ``name``: ``overrides``, then :data:`DEFAULT_SPECS`, then a guess (a
    six-letter ISO pair, in any case, is an FX major with upper-case legs; anything else one unit
    per lot, two decimals)."""
    if overrides and name in overrides:
        return overrides[name]
    if name in DEFAULT_SPECS:
        return DEFAULT_SPECS[name]
    sp = _GUESSED.get(name)
    if sp is not None:
        return sp
    u = name.upper()
    if len(u) == 6 and u[:3] in _ISO and u[3:] in _ISO:
        sp = _fx(name, 3 if u[3:] == "JPY" else 5)
    else:
        sp = InstrumentSpec(name=name, asset_class="equity", base=name, quote="USD", contract_size=1.0,
                            lot_step=1.0, min_lot=1.0, max_lot=1_000_000.0, tick_size=0.01, digits=2)
    if len(_GUESSED) < _GUESSED_MAX:
        _GUESSED[name] = sp
    return sp


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
    currency is the account's; raises ``KeyError`` when no route is known. A price that is not
    finite and > 0, or a rate that is not, is no route (a NaN or inf cross would otherwise size
    plans and value exposure by it)."""
    if spec.quote == account:
        return 1.0
    if spec.base == account:
        r = 1.0 / price if price > 0.0 else math.nan
        if 0.0 < r < math.inf:
            return r
        raise KeyError(f"no rate converts {spec.quote} to {account} at {spec.name} price {price!r}")
    prices = prices or {}
    direct_name, inverse_name = conversion_prices(spec, account)
    direct = prices.get(direct_name)
    if direct and 0.0 < direct < math.inf:
        return float(direct)
    inverse = prices.get(inverse_name)
    if inverse and 0.0 < inverse < math.inf:
        r = 1.0 / float(inverse)
        if r < math.inf:
            return r
    raise KeyError(f"no price converts {spec.quote} to {account} (need {spec.quote}{account} or {account}{spec.quote})")


def load_specs(path: str | os.PathLike[str]) -> dict[str, InstrumentSpec]:
    """Instrument specs from a TOML file of ``[instruments.NAME]`` tables (fields of
    :class:`InstrumentSpec`; omitted fields default as for :func:`instrument_spec`)."""
    return specs_from_tables(_load_toml(path).get("instruments", {}), path)


def _load_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A TOML file's tables; a syntax error is a ``ValueError`` naming the file."""
    with open(path, "rb") as f:
        try:
            return tomllib.load(f)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:  # TOML is UTF-8
            raise ValueError(f"{os.fspath(path)}: not valid TOML: {e}") from None


def specs_from_tables(tables: Any, path: str | os.PathLike[str] = "<config>") -> dict[str, InstrumentSpec]:
    """Specs of an ``[instruments]`` table (``{NAME: {field: value}}``); ``ValueError`` naming
    the file and the key for anything that is not such a table or not a valid spec."""
    where = os.fspath(path)
    if not isinstance(tables, dict):
        # a ValueError, as every other error in a config file's contents
        raise ValueError(f"{where}: [instruments] must be a table of [instruments.NAME] tables, "  # noqa: TRY004
                         f"got {type(tables).__name__}")
    out: dict[str, InstrumentSpec] = {}
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ValueError(f"{where}: [instruments.{name}] must be a table, got {type(table).__name__}")  # noqa: TRY004
        try:
            base = msgspec.structs.asdict(instrument_spec(name))
            base.update(table)
            base["name"] = name
            out[name] = msgspec.convert(base, InstrumentSpec)
        except (msgspec.ValidationError, ValueError, TypeError) as e:
            raise ValueError(f"{where}: [instruments.{name}]: {e}") from None
    return out
