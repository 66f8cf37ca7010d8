"""Market data in: bar arrays, validation, pandas and CSV interop.

Every loader returns a time-ordered ``BAR_DTYPE`` array. Validation here is the engine's own
(the same C++ checks), so what ``validate`` flags is exactly what ``Engine.run`` rejects.
"""

from __future__ import annotations

import datetime
import io
import os
import re
import stat
import sys
import warnings
from collections.abc import Iterable

import numpy as np

from . import _core
from ._checks import short_repr
from .errors import InvalidInput
from .instruments import _nfc, instruments
from .records import BAR_DTYPE, REASONS

__all__ = [
    "as_bars",
    "empty",
    "from_pandas",
    "merge",
    "parse_timeframe",
    "read_csv",
    "reason_counts",
    "refuse_bad",
    "to_pandas",
    "validate",
]

_MT_FRAMES = {"M": 60, "H": 3600, "D": 86400, "W": 604800}
_MT_NAME = re.compile(r"([MHDW])(\d+)")
_BARE_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_NS = 1_000_000_000
_NOT_UINT32 = "is not between 1 s and 2**32-1 s (a uint32 number of seconds)"
_TIME_COLUMNS = ("ts", "time", "timestamp", "datetime", "date", "open_time")
_REAL_VOLUME = ("volume", "vol", "real_volume")
_TICK_VOLUME = ("tickvol", "tick_volume")
_NAMED_COLUMNS = ("open", "high", "low", "close", *_TIME_COLUMNS, *_REAL_VOLUME, *_TICK_VOLUME, "symbol",
                  "instrument")
"""Every column name the loaders look for (as :func:`_bare` reads names)."""


def parse_timeframe(tf: int | str) -> int:
    """Timeframe in seconds from an int, a MetaTrader name (``"M5"``, ``"H1"``, ``"D1"``) or a
    pandas offset (``"5min"``, ``"1h"``, ``"1D"``).

    Timeframes are whole seconds (``uint32``). A value that is not a whole positive number of
    seconds below 2**32 is refused with a ``ValueError`` naming it, never rounded: ``"1.5s"``,
    ``"1500ms"``, ``1.5`` (floats are refused, even ``60.0``), ``True``, ``0``, ``2**32``, and
    a string without a unit (``"60"``, which pandas would read as nanoseconds).
    """
    # a ValueError, as for "1.5s": these are numbers, but not a whole number of seconds
    if isinstance(tf, (bool, np.bool_)):
        raise ValueError(f"timeframe {tf!r} is a bool, not a number of seconds")  # noqa: TRY004
    if isinstance(tf, (float, np.floating)):
        raise ValueError(  # noqa: TRY004
            f"timeframe {tf!r} is a float: pass whole seconds as an int, or a string such as 'H1' or '1h'")
    if isinstance(tf, (int, np.integer)):
        seconds = int(tf)
    elif isinstance(tf, str):
        m = _MT_NAME.fullmatch(tf.strip().upper())
        if m and len(m.group(2)) > 10:  # out of range anyway (and int() refuses over 4300 digits)
            raise ValueError(f"timeframe {short_repr(tf)} {_NOT_UINT32}")
        if m:
            seconds = _MT_FRAMES[m.group(1)] * int(m.group(2))
        else:
            seconds = _offset_seconds(tf)
    else:
        raise TypeError(f"timeframe must be int or str, got {type(tf).__name__}")
    if not 0 < seconds < 2**32:
        shown = f"{short_repr(tf)} ({seconds} s)" if isinstance(tf, str) else short_repr(tf)
        raise ValueError(f"timeframe {shown} {_NOT_UINT32}")
    return seconds


def _offset_seconds(tf: str) -> int:
    """Whole seconds of a pandas offset string; refuses one that is not a whole number of them."""
    import pandas as pd

    if _BARE_NUMBER.fullmatch(tf.strip()):
        raise ValueError(f"cannot read timeframe {short_repr(tf)}: a string needs a unit ('60s', 'H1', "
                         "'1h'); pass bare seconds as an int")
    try:
        td = pd.Timedelta(tf)
    except (ValueError, OverflowError):
        raise ValueError(f"cannot read timeframe {short_repr(tf)}: use seconds, 'H1' or '1h'") from None
    if pd.isna(td):
        raise ValueError(f"cannot read timeframe {short_repr(tf)}: use seconds, 'H1' or '1h'")
    seconds, rest = divmod(td.value, _NS)
    if rest:
        raise ValueError(f"timeframe {short_repr(tf)} is not a whole number of seconds")
    return seconds


def empty(n: int = 0) -> np.ndarray:
    """A zeroed ``BAR_DTYPE`` array of length ``n``."""
    return np.zeros(n, dtype=BAR_DTYPE)


def as_records(records: object, dtype: np.dtype, name: str, what: str, hint: str = "") -> np.ndarray:
    """``records`` as a contiguous, aligned 1-d array of ``dtype`` (called ``dc.<name>`` in
    messages), or a TypeError saying what was expected (``hint`` added when it is not an array at
    all). A view at an odd offset of a buffer is copied: the core reads the records as structs."""
    if not isinstance(records, np.ndarray):
        raise TypeError(f"{what}: expected a 1-d numpy array of dc.{name}, got {type(records).__name__}{hint}")
    if records.dtype != dtype:
        raise TypeError(f"{what}: expected dtype dc.{name}, got {records.dtype}")
    if records.ndim != 1:
        raise TypeError(f"{what}: expected a 1-d array, got shape {records.shape}")
    out = np.ascontiguousarray(records)
    if out.ctypes.data % 8:  # the dtype is packed (alignment 1), so numpy's own flag says aligned
        out = out.copy()
    return out


def as_bars(bars: object, what: str = "bars") -> np.ndarray:
    """``bars`` as a contiguous 1-d ``BAR_DTYPE`` array, or a TypeError saying what was expected."""
    hint = " (use dc.market.from_pandas for a DataFrame)" if hasattr(bars, "columns") else ""
    return as_records(bars, BAR_DTYPE, "BAR_DTYPE", what, hint)


def validate(bars: np.ndarray) -> np.ndarray:
    """Reject reason code of each bar (0 = ok); names are in ``dc.REASONS``.

    A check of the batch alone, with no engine: time order is checked within the batch, on
    every (instrument, timeframe). An engine's verdict can differ (:meth:`Engine.validate
    <dynamic_core.Engine.validate>` gives it): it continues each stream's order from the bars
    it took before, and checks the prices but not the order of bars of streams no agent of its
    population follows (valid ones are counted as ``skipped_unfollowed``)."""
    return _core.validate_bars(as_bars(bars), len(instruments))


def reason_counts(reasons: np.ndarray) -> dict[str, int]:
    """{reason name: count} of the non-zero codes returned by :func:`validate`; ValueError for a
    code that names no reason."""
    r = np.asarray(reasons)
    codes, counts = np.unique(r[r != 0], return_counts=True)
    unknown = [c for c in codes.tolist()
               if isinstance(c, bool) or not (isinstance(c, int) and 0 < c < len(REASONS))]
    if unknown:
        raise ValueError(f"reason_counts: {unknown[0]!r} is not a reject reason code (1..{len(REASONS) - 1})")
    return {REASONS[c]: int(k) for c, k in zip(codes.tolist(), counts)}


def refuse_bad(reasons: np.ndarray, what: str = "batch not processed") -> None:
    """What a strict engine does with a batch: :class:`~dynamic_core.errors.InvalidInput` when
    any of the reject codes ``reasons`` (from :func:`validate`) is non-zero, naming ``what``
    happened to the batch and the first ten bad rows (``rows`` and ``reasons`` carry them all)."""
    reasons = np.asarray(reasons)
    bad = np.flatnonzero(reasons)
    if not len(bad):
        return
    names = [REASONS[int(r)] for r in reasons[bad]]
    shown = ", ".join(f"row {int(i)}: {n}" for i, n in zip(bad[:10], names[:10]))
    more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
    raise InvalidInput(f"{len(bad)} bad bar(s), {what}: {shown}{more}", rows=bad.tolist(), reasons=names)


def _bare(column: object) -> str:
    """A column name as the loaders match it: case and surrounding blanks ignored, and the angle
    brackets of MetaTrader 5's export headers (``<DATE>``, ``<CLOSE>``) removed."""
    s = str(column).strip()
    if len(s) > 2 and s[0] == "<" and s[-1] == ">":
        s = s[1:-1].strip()
    return s.lower()


def _find(columns: Iterable[str], name: str) -> str | None:
    """The one of ``columns`` called ``name`` (as :func:`_bare` reads names), or None.
    ValueError naming them when several are: taking the first lost the others' data without a
    word ("Close" beside "close"), and pandas hands out a DataFrame for a duplicated name."""
    found = [c for c in columns if _bare(c) == name]
    if len(found) > 1:
        shown = ", ".join(short_repr(c) for c in found[:-1][:9]) + (", ..." if len(found) > 10 else "")
        shown += f" and {short_repr(found[-1])}" + (f" ({len(found):,} columns)" if len(found) > 10 else "")
        raise ValueError(f"ambiguous columns {shown}: all name the {name!r} column (names match ignoring "
                         f"case, surrounding blanks and <>); keep one, or rename the others")
    return found[0] if found else None


def _refuse_ambiguous(columns: Iterable[str]) -> None:
    """ValueError (from :func:`_find`) when several of ``columns`` name one column the loaders
    read; names they never read may repeat."""
    columns = list(columns)
    for name in _NAMED_COLUMNS:
        _find(columns, name)


def from_pandas(df, instrument: str | int | None = None, timeframe: int | str | None = None, *,
                dayfirst: bool | None = None) -> np.ndarray:
    """Bars from a DataFrame with OHLC(V) columns in any case and a DatetimeIndex or a time column.

    Parameters
    ----------
    df : pandas.DataFrame
        ``Open High Low Close [Volume]`` (any case; MetaTrader 5's ``<OPEN>`` spelling too). Times
        come from a DatetimeIndex or from a column named ts/time/timestamp/datetime/date/open_time:
        datetimes; whole numbers that are all calendar codes ``YYYYMMDD``, ``YYYYMMDDHHMM`` or
        ``YYYYMMDDHHMMSS`` (each a real date and time: ``20040819``); else epoch numbers (seconds,
        ms, us or ns, told apart by magnitude, one unit for the whole column). A ``date`` column
        holding dates only beside a ``time`` column holding times of day, read together as one
        UTC time: ``HH:MM[:SS[.f]]`` text (MetaTrader's exports), ``datetime.time`` objects or
        timedeltas, or ``HHMMSS`` whole numbers (Stooq's ``<DATE> <TIME>``, 20240102 and 93000;
        below 2400 such numbers could be HHMM too, and are refused). With a DatetimeIndex, the
        index gives the times: a time column beside it must agree with it or hold its dates
        (``ValueError`` naming the first row where they differ).
    instrument : str or int, optional
        Instrument name (registered on first use) or id. A ``symbol``/``instrument`` column (as
        :func:`to_pandas` writes) names each row's instrument instead: without ``instrument``,
        every instrument of the frame is loaded; with it, that instrument's rows only
        (``ValueError`` naming the frame's instruments when it has none). Without such a column,
        ``instrument`` is required.
    timeframe : int or str, optional
        Seconds, ``"H1"`` or ``"1h"``. Inferred when omitted (per instrument): the most common
        spacing of the times (the shortest of equally common ones), so gaps (weekends, missing
        bars) do not change it.
    dayfirst : bool, optional
        Whether dates written ``05/01/2017`` (or with ``-`` or ``.``) put the day first. Omitted,
        the values decide: a first number above 12 is a day, a second one a month; when every
        date could be either, month first with a ``UserWarning`` (day first for dotted dates).

    Volume comes from the first column named volume/vol/real_volume that holds a non-zero
    value; failing that from a tickvol/tick_volume column (MetaTrader's tick counts: its real
    volume is all zeros for most forex and CFD symbols); failing that from a volume/vol/real_volume
    column of zeros; else it is zero.

    Raises ``ValueError`` when several columns name one the loader reads (``"close"`` twice, or
    ``"Close"`` beside ``"close"``: names match ignoring case), naming them, and for a price or
    volume column holding booleans (a bool is no price).

    Rows come back in time order (a stable sort: rows of equal time keep their order, and the
    engine then rejects the later ones as ``duplicate_timestamp``), so newest-first data loads
    like oldest-first.

    Raises ``ValueError`` naming the first rows whose time is missing (NaN, NaT), non-finite,
    unreadable, outside the int64 nanosecond range (years 1677 to 2262) or an epoch number of
    another unit than the rest of its column (seconds among milliseconds: read by the largest,
    the seconds were 1970 dates), and for a boolean time column. Integer epochs are converted
    exactly (integer arithmetic).

    Price and volume cells that are not numbers (``"1,000.5"``, ``"12 USD"``) are read as missing,
    so their bars are rejected as ``non_finite`` like NaN data; a ``UserWarning`` names their
    columns and first rows, as that is usually a format problem (a thousands separator, a
    decimal comma, a unit) rather than missing data.
    """
    import pandas as pd

    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"expected a pandas DataFrame, got {type(df).__name__}")
    _refuse_ambiguous(df.columns)
    _warn_not_numbers(df, "the DataFrame", first_row=0, how="positions, from 0")
    scol = _find(df.columns, "symbol") or _find(df.columns, "instrument")
    if scol is None:
        if instrument is None:
            raise ValueError("no instrument: give instrument= (a name or id), or a symbol/instrument column "
                             "naming each row's")
        return _from_pandas(df, instrument, timeframe, dayfirst)
    return _by_symbol(df, scol, instrument, timeframe, dayfirst, "the DataFrame", 0, "positions, from 0")


def _by_symbol(df, scol, instrument: str | int | None, timeframe: int | str | None, dayfirst: bool | None,
               source: str, first_row: int, how: str, warn: bool = False) -> np.ndarray:
    """The bars of ``df`` whose ``scol`` column names each row's instrument: all of them, or
    ``instrument``'s only. Names
    as written, surrounding blanks removed; ``ValueError`` naming rows without one (such a row
    belongs to no instrument, and dropping it would lose data without a word) and for an
    ``instrument`` the column does not hold. ``warn``: :func:`_warn_not_numbers` on the rows
    kept, rows (the index's labels: the file's rows) counted as ``first_row`` and ``how`` say."""
    names = df[scol].astype("string").str.strip().fillna("")
    blank = np.flatnonzero((names == "").to_numpy())
    if len(blank):
        shown = ", ".join(str(i + first_row) for i in blank[:10]) + (", ..." if len(blank) > 10 else "")
        raise ValueError(f"{len(blank):,} row(s) with an empty {scol!r}: rows {shown} ({how}); give "
                         f"every row an instrument, or drop the column to name all rows "
                         f"{'after the file' if first_row else 'with instrument='}")
    if instrument is not None:
        # the symbol column decides, as without an instrument: naming every row `instrument`
        # made one instrument of all of them (another's bars rejected as duplicate times)
        wanted = _nfc(instrument if isinstance(instrument, str)
                      else instruments.name(instruments.lookup(instrument)))
        have = sorted(set(names.tolist()))
        mine = [n for n in have if _nfc(n) == wanted]
        if not mine:
            shown = ", ".join(have[:10]) + (f" and {len(have) - 10:,} more" if len(have) > 10 else "")
            raise ValueError(f"{source} has no instrument {short_repr(instrument)} (it has {shown}) in its "
                             f"{scol!r} column: give one of those, or no instrument to load them all")
        keep = names.isin(mine).to_numpy()
        df, names = df[keep], names[keep]
    if warn:
        _warn_not_numbers(df.drop(columns=[scol]), source, first_row=first_row, how=how, by_label=True)
    # grouped by position (an array): a DatetimeIndex repeats a time for each instrument
    parts = [_from_pandas(g.drop(columns=[scol]), str(n), timeframe, dayfirst)
             for n, g in df.groupby(names.to_numpy(dtype=object), sort=True)]
    return merge(*parts)


def _column_times(df, cols: list, dayfirst: bool | None) -> tuple[np.ndarray, str] | None:
    """(int64 ns, what they came from) of ``df``'s time column(s), or None when it has none."""
    tcol = next((c for name in _TIME_COLUMNS if (c := _find(cols, name)) is not None), None)
    if tcol is None:
        return None
    dcol = _find(cols, "date")
    if dcol is not None and _bare(tcol) == "time" and _is_time_of_day(df[tcol], with_date=True):
        # MetaTrader 4/5 exports: Date 2024.01.01, Time 00:00 (Stooq: 20240101, 000000). Read
        # alone, the time of day got today's date
        ns = _date_and_time_ns(df[dcol], df[tcol], f"date column {dcol!r}", f"time column {tcol!r}", dayfirst)
        return ns, f"the date and time columns {dcol!r} and {tcol!r}"
    if dcol is None and _is_time_of_day(df[tcol]):  # pandas would date every bar today
        raise ValueError(f"time column {tcol!r} holds times of day without dates (e.g. "
                         f"{str(df[tcol].dropna().iloc[0]).strip()!r}): add a date column (read together "
                         "with it) or write full datetimes")
    return _to_ns(df[tcol], f"time column {tcol!r}", dayfirst), f"the time column {tcol!r}"


def _frame_times(df, cols: list, dayfirst: bool | None) -> np.ndarray:
    """The bar times of ``df`` (see :func:`from_pandas`): its DatetimeIndex, which time columns
    may only repeat (or give the dates of); else its time column(s)."""
    import pandas as pd

    if not isinstance(df.index, pd.DatetimeIndex):
        found = _column_times(df, cols, dayfirst)
        if found is None:
            raise ValueError("no times: give the DataFrame a DatetimeIndex or a time/timestamp/date column")
        return found[0]
    ts = _to_ns(pd.Series(df.index), "the DatetimeIndex")
    try:
        found = _column_times(df, cols, dayfirst)
    except ValueError:  # a helper column the index makes unnecessary (times of day alone, say)
        return ts
    if found is None:
        return ts
    col, what = found
    # a column of the index's dates (df["Date"] = df.index.date) is a helper, not other times
    differ = np.flatnonzero((col != ts) & ((col % _DAY_NS != 0) | (col != ts - ts % _DAY_NS)))
    if len(differ):
        i = int(differ[0])
        show = [str(np.datetime64(int(x), "ns")).replace("T", " ") for x in (ts[i], col[i])]
        raise ValueError(f"the DatetimeIndex and {what} disagree in {len(differ):,} row(s), e.g. position "
                         f"{i}: {show[0]} against {show[1]}: drop the column(s) or reset the index "
                         f"(df.reset_index(drop=True)), so that one of them gives the times")
    return ts


def _from_pandas(df, instrument: str | int, timeframe: int | str | None,
                 dayfirst: bool | None = None) -> np.ndarray:
    """:func:`from_pandas` of one instrument, without its warning about cells that are not
    numbers (:func:`read_csv` gives its own, naming rows of the file rather than of each
    instrument's part of it)."""
    cols = list(df.columns)
    missing = [c for c in ("open", "high", "low", "close") if _find(cols, c) is None]
    if missing:
        have = ", ".join(short_repr(c) for c in cols[:20])
        if len(cols) > 20:
            have += f" and {len(cols) - 20:,} more"
        raise ValueError(f"DataFrame lacks columns {missing} (have [{have}])")
    ts = _frame_times(df, cols, dayfirst)
    out = empty(len(df))
    out["ts"] = ts
    out["instrument"] = instruments.resolve(instrument)
    if timeframe is None:
        d = np.diff(np.sort(ts))
        d = d[d > 0]
        if len(ts) == 0:
            raise ValueError("no rows: the data holds no bars (a header alone)")
        if len(d) == 0:
            raise ValueError("cannot infer the timeframe from fewer than two distinct times: give the "
                             "timeframe (timeframe= in Python, --timeframe on the command line)")
        # the most common spacing (the shortest among equals): bars at 0h, 1h and 4h are H1 bars
        # with a gap, where the median (2h) matched no spacing at all
        secs, counts = np.unique(d // 1_000_000_000, return_counts=True)
        timeframe = max(1, int(secs[np.argmax(counts)]))
    out["timeframe"] = parse_timeframe(timeframe)
    for name in ("open", "high", "low", "close"):
        out[name] = _numbers(df[_find(cols, name)], "price")
    vcol = _volume_column(df)
    if vcol is not None:
        out["volume"] = _numbers(df[vcol], "volume")
    # time order, as every loader gives (newest-first vendor data was rejected bar by bar as
    # out_of_order but for its first row)
    return out if len(ts) < 2 or bool((np.diff(ts) >= 0).all()) else out[np.argsort(ts, kind="stable")]


def _numbers(col, what: str) -> np.ndarray:
    """``col`` (a ``what`` column: price or volume) as float64, cells that are not numbers as NaN
    (rejected as ``non_finite``); ValueError for booleans (see :func:`_refuse_booleans`)."""
    import pandas as pd

    _refuse_booleans(col, what)
    return pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


def _holds_booleans(col) -> bool:
    """Whether ``col`` holds booleans: a bool dtype, or Python/numpy bools among other objects
    (``[1.5, True]``, which ``pandas.to_numeric`` reads as 1.0)."""
    import pandas as pd

    if pd.api.types.is_bool_dtype(col):
        return True
    if col.dtype != object:
        return False
    kind = pd.api.types.infer_dtype(col, skipna=True)
    # a cell by cell look only at mixed columns: text and number columns need none
    return kind == "boolean" or (kind.startswith("mixed")
                                 and any(isinstance(v, (bool, np.bool_)) for v in col))


def _refuse_booleans(col, what: str) -> None:
    """ValueError naming ``col`` (a ``what`` column) when it holds booleans: read as 1.0 and 0.0
    they made prices (or volumes) of a True/False flag."""
    if _holds_booleans(col):
        raise ValueError(f"{what} column {short_repr(col.name)} holds booleans, not numbers")


def _volume_column(df) -> str | None:
    """The column bar volumes come from (see :func:`from_pandas`), or None."""
    cols = list(df.columns)
    real = [c for name in _REAL_VOLUME if (c := _find(cols, name)) is not None]
    for c in real:
        v = _numbers(df[c], "volume")
        if bool((np.nan_to_num(v) != 0).any()):
            return c
    tick = next((c for name in _TICK_VOLUME if (c := _find(cols, name)) is not None), None)
    return tick if tick is not None else (real[0] if real else None)


def _price_columns(df) -> list:
    """The columns :func:`_from_pandas` reads as numbers: OHLC and the volume it takes."""
    cols = list(df.columns)
    out = [c for name in ("open", "high", "low", "close") if (c := _find(cols, name)) is not None]
    vcol = _volume_column(df)
    return out + ([vcol] if vcol is not None else [])


def _warn_not_numbers(df, source: str, first_row: int, how: str, by_label: bool = False) -> None:
    """One ``UserWarning`` (at the loader's caller) naming the columns and first
    rows of ``df``'s price and volume cells that hold something other than a number. Such cells
    read as NaN and their bars are rejected as ``non_finite``, as missing data is: without the
    warning, a file with thousands separators or a decimal comma looked like a file with gaps.
    Rows are positions, or with ``by_label`` the (integer) index labels (the file's row
    positions once rows are selected), plus ``first_row``, as ``how`` says."""
    import pandas as pd

    found = []
    for c in _price_columns(df):
        col = df[c]
        if pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col):
            continue  # numbers (or NaN) throughout, or booleans (refused by _numbers): nothing was text
        bad = np.flatnonzero((pd.to_numeric(col, errors="coerce").isna() & col.notna()).to_numpy())
        if len(bad):
            found.append((c, df.index[bad].to_numpy() if by_label else bad, col.iloc[bad[0]]))
    if not found:
        return
    total = sum(len(bad) for _, bad, _ in found)
    parts = []
    for c, bad, example in found:
        rows = ", ".join(str(int(i) + first_row) for i in bad[:5]) + (", ..." if len(bad) > 5 else "")
        parts.append(f"column {c!r} row{'s' if len(bad) > 1 else ''} {rows} ({example!r}"
                     f"{' first' if len(bad) > 1 else ''})")
    warnings.warn(f"{source}: {total:,} price/volume cell(s) are not numbers, read as missing, and their "
                  f"bars are rejected as non_finite: {'; '.join(parts)}; rows {how}. Write plain numbers "
                  f"(no thousands separators or units), or check the separator and decimal mark",
                  UserWarning, stacklevel=_outside())


_TIME_OF_DAY = r"(\d{1,2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?"
_DAY_NS = 86_400 * _NS


def _first_text(col) -> str | None:
    """The first non-missing value of a text column, or None (for other columns too)."""
    import pandas as pd

    if (pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col)
            or pd.api.types.is_datetime64_any_dtype(col) or pd.api.types.is_timedelta64_dtype(col)):
        return None
    first = col.dropna()
    return first.iloc[0] if len(first) and isinstance(first.iloc[0], str) else None


def _stripped(col, first: str):
    """``col`` without blanks around its values when its first value has some ("Date, Time"
    headers come with ", 00:00" fields); as it is otherwise (stripping a million cells costs)."""
    return col.astype("string").str.strip() if first != first.strip() else col


def _is_time_of_day(col, with_date: bool = False) -> bool:
    """Whether ``col`` holds times of day, judged by its first value: ``HH:MM[:SS[.f]]`` text
    (MetaTrader's separate Time column), timedeltas or ``datetime.time`` objects (a SQL TIME
    column); and, ``with_date`` (beside a date column), integers that are all ``HHMMSS`` times
    (Stooq's ``<TIME>`` 093000, read as the number 93000)."""
    import pandas as pd

    if pd.api.types.is_timedelta64_dtype(col):
        return True
    if with_date and pd.api.types.is_integer_dtype(col) and not _holds_booleans(col) and len(col):
        v = col.to_numpy(dtype=np.int64, na_value=-1)
        return bool(((v >= 0) & (v // 10000 < 24) & (v // 100 % 100 < 60) & (v % 100 < 60)).all())
    if col.dtype == object:
        first = col.dropna()
        if len(first) and isinstance(first.iloc[0], datetime.time):
            return True
    first = _first_text(col)
    return first is not None and re.fullmatch(_TIME_OF_DAY, first.strip()) is not None


def _date_and_time_ns(dates, times, dsource: str, tsource: str, dayfirst: bool | None = None) -> np.ndarray:
    """int64 ns of a column of dates (UTC midnight; ``YYYY.MM.DD`` as MetaTrader writes them,
    ``YYYYMMDD`` numbers as Stooq does) plus a column of times of day (see
    :func:`_is_time_of_day`), exactly, refusing (naming the rows) dates that are missing,
    unreadable or carry a time of day themselves, and times of day that are missing, unreadable
    (``HH:MM[:SS[.f]]``) or not below 24:00."""
    import pandas as pd

    day = _to_ns(dates, dsource, dayfirst)
    _refuse_times(day % _DAY_NS != 0, dsource, "a time of day besides the date (the time column gives it)")
    if pd.api.types.is_integer_dtype(times):  # HHMMSS numbers (see _is_time_of_day)
        v = times.to_numpy(dtype=np.int64)
        top = int(v.max()) if len(v) else 0
        if 0 < top <= 2359:
            raise BadTimes(f"{tsource} holds whole numbers up to {top} as times of day: HHMM or HHMMSS "
                           f"cannot be told apart below 2400 (900 is 09:00 or 00:09:00); write the times as "
                           f"HH:MM[:SS] text or as HHMMSS with hours past midnight",
                           "ambiguous whole-number times of day")
        return day + ((v // 10000 * 60 + v // 100 % 100) * 60 + v % 100) * _NS
    if times.dtype == object and len(times.dropna()) and isinstance(times.dropna().iloc[0], datetime.time):
        # datetime.time objects (a SQL TIME column) as their ISO text; anything else there is refused below
        times = times.map(lambda t: t.isoformat() if isinstance(t, datetime.time) and t.tzinfo is None else t)
    if pd.api.types.is_timedelta64_dtype(times):
        _refuse_times(times.isna().to_numpy(), tsource, "a missing time of day")
        tod = times.to_numpy(dtype="timedelta64[ns]").view(np.int64)
    else:
        first = _first_text(times)
        m = re.fullmatch(_TIME_OF_DAY, first.strip())
        fmt = "%H:%M" + (":%S" if m.group(3) else "") + (".%f" if m.group(4) else "")
        # the first row's form, parsed in C (strptime puts times on 1900-01-01, subtracted)
        times = _stripped(times, first)
        t = pd.to_datetime(times, format=fmt, errors="coerce")
        tod = (t - pd.Timestamp("1900-01-01")).to_numpy(dtype="timedelta64[ns]").view(np.int64)
        other = np.flatnonzero(t.isna().to_numpy())
        if len(other):  # in another of the forms (00:00 among 00:00:30), or unreadable
            parts = times.iloc[other].astype("string").str.strip().str.extract(f"^{_TIME_OF_DAY}$")
            h, mi, sec = (pd.to_numeric(parts[i]).fillna(0).to_numpy(dtype=np.int64) for i in range(3))
            frac = pd.to_numeric(parts[3].str.ljust(9, "0")).fillna(0).to_numpy(dtype=np.int64)
            bad = parts[0].isna().to_numpy() | (h > 23) | (mi > 59) | (sec > 59)
            _refuse_times(np.isin(np.arange(len(t)), other[bad]), tsource,
                          "a missing or unreadable time of day (HH:MM[:SS[.f]], 00:00 to 23:59:59)")
            tod = tod.copy()  # to_numpy may hand out a read-only view
            tod[other] = ((h * 60 + mi) * 60 + sec) * _NS + frac
    _refuse_times((tod < 0) | (tod >= _DAY_NS), tsource, "a time of day outside 00:00 to 23:59:59")
    _refuse_times(day > _INT64_MAX - tod, tsource, _OUT_OF_RANGE)
    return day + tod


_INT64_MAX = (1 << 63) - 1
_OUT_OF_RANGE = "a time outside the int64 nanosecond range (1677..2262)"
_NS_PER_UNIT = {"s": 1_000_000_000, "ms": 1_000_000, "us": 1_000, "ns": 1}


# an epoch number's unit is told by its size: |t| below 1e11 is seconds (up to year 5138), then
# ms, us and ns, each band 1000 times the last; 0 and small negative numbers are seconds
_EPOCH_BANDS = (10**11, 10**14, 10**17)
_EPOCH_UNITS = (("seconds", 10**9, "|t| < 1e11"), ("milliseconds", 10**6, "1e11 <= |t| < 1e14"),
                ("microseconds", 10**3, "1e14 <= |t| < 1e17"), ("nanoseconds", 1, "|t| >= 1e17"))


def _epoch_scale(v: np.ndarray, source: str) -> int:
    """ns per unit of the epoch numbers ``v`` (int64 or finite float64): the unit whose
    magnitude band holds the most of them (a tie goes to the larger unit). Refuses, naming the
    first rows, numbers in another unit's band: a column of seconds then milliseconds was read
    as milliseconds throughout (its largest number's unit), its seconds as dates in January 1970."""
    if not len(v):
        return 10**9
    band = np.zeros(len(v), dtype=np.intp)
    for edge in _EPOCH_BANDS:  # no abs(): abs(INT64_MIN) wraps
        band += (v >= edge) | (v <= -edge)
    counts = np.bincount(band, minlength=len(_EPOCH_UNITS))
    unit = max(range(len(_EPOCH_UNITS)), key=lambda u: (counts[u], u))
    name, per, size = _EPOCH_UNITS[unit]
    rows = np.flatnonzero(band != unit)
    if len(rows):
        others = " or ".join(_EPOCH_UNITS[u][0] for u in np.unique(band[rows]).tolist())
        shown = ", ".join(str(int(i)) for i in rows[:10]) + (", ..." if len(rows) > 10 else "")
        why = f"epoch numbers in another unit than the rest of the column ({others} among {name})"
        raise BadTimes(f"{len(rows):,} row(s) of {source} with {why}: rows {shown} (positions, from 0) are "
                       f"{others} by their size, the other {int(counts[unit]):,} are {name} ({size}); write "
                       f"every time in one unit, or as datetimes", why)
    return per


class BadTimes(ValueError):
    """Times that cannot be bar times; ``why`` says what is wrong with them."""

    def __init__(self, message: str, why: str) -> None:
        super().__init__(message)
        self.why = why


def _refuse_times(bad: np.ndarray, source: str, why: str) -> None:
    """:class:`BadTimes` naming the first rows (positions) flagged in ``bad``, if any."""
    rows = np.flatnonzero(bad)
    if len(rows):
        shown = ", ".join(str(int(i)) for i in rows[:10]) + (", ..." if len(rows) > 10 else "")
        raise BadTimes(f"{len(rows):,} row(s) of {source} with {why}: rows {shown} (positions, from 0)", why)


def _scaled(v: np.ndarray, per: int, source: str) -> np.ndarray:
    """int64 ``v`` times ``per`` in integer arithmetic, refusing rows that would leave int64
    (INT64_MIN, the NaT sentinel, included)."""
    lim = _INT64_MAX // per
    _refuse_times((v > lim) | (v < -lim), source, _OUT_OF_RANGE)
    return v * np.int64(per)


# Calendar-coded whole numbers: (digits, 10^(digits - 8)) of YYYYMMDD, YYYYMMDDHHMM and
# YYYYMMDDHHMMSS, years 1678..2261 (inside the int64 nanosecond range)
_CALENDAR_CODES = ((8, 1), (12, 10**4), (14, 10**6))


def _calendar_ns(v: np.ndarray) -> np.ndarray | None:
    """int64 ns (UTC) of whole numbers that are all calendar codes of one width (see
    :data:`_CALENDAR_CODES`), each a real date (no 20230231) and time of day; None otherwise,
    and they are epoch numbers. Read as epoch seconds, 20040819 was 1970-08-20: a vendor's
    daily file became a year of one-second bars."""
    if not len(v):
        return None
    lo, hi = int(v.min()), int(v.max())
    tail = next((t for _, t in _CALENDAR_CODES if 16780101 * t <= lo and hi < 22620101 * t), None)
    if tail is None:
        return None
    day = v // tail
    y, m, d = day // 10000, day // 100 % 100, day % 100
    if not ((m >= 1) & (m <= 12) & (d >= 1) & (d <= 31)).all():
        return None
    month = ((y - 1970) * 12 + (m - 1)).astype("datetime64[M]")
    date = month.astype("datetime64[D]") + (d - 1).astype("timedelta64[D]")
    if not (date.astype("datetime64[M]") == month).all():  # a day past its month's end
        return None
    secs = np.zeros(len(v), dtype=np.int64)
    if tail > 1:
        rest = v % tail
        if tail == 10**4:  # HHMM
            hh, mi, ss = rest // 100, rest % 100, 0
        else:  # HHMMSS
            hh, mi, ss = rest // 10**4, rest // 100 % 100, rest % 100
        if not ((hh < 24) & (mi < 60) & (ss < 60)).all():
            return None
        secs = (hh * 60 + mi) * 60 + ss
    return date.astype("datetime64[ns]").view(np.int64) + secs * _NS


_DIGITS = r"\s*[+-]?\d{1,18}\s*"


def _to_ns(col, source: str = "the time column", dayfirst: bool | None = None) -> np.ndarray:
    """Times as int64 ns since the epoch: calendar-coded whole numbers (``YYYYMMDD``,
    ``YYYYMMDDHHMM``, ``YYYYMMDDHHMMSS``, when every value is one; see :func:`_calendar_ns`),
    epoch numbers (seconds, ms, us or ns, told apart by magnitude; integers in integer
    arithmetic, so ns stay exact), the same as digit text, or datetimes (UTC when naive;
    ``dd/mm/yyyy`` against ``mm/dd/yyyy`` as :func:`_dayfirst` decides).
    ValueError naming the first bad rows for a missing, non-finite, unreadable or out-of-range
    time, or epoch numbers of mixed units (see :func:`_epoch_scale`); ValueError for booleans
    too: a bad value in a file, which callers (the command line) report as such."""
    import pandas as pd

    if _holds_booleans(col):
        raise ValueError(f"{source} holds booleans, not times (datetimes or epoch numbers)")
    first = _first_text(col)
    if first is not None and re.fullmatch(_DIGITS, first):
        text = col.astype("string")
        if bool(text.str.fullmatch(_DIGITS).fillna(True).all()):  # digits throughout: numbers
            col = pd.to_numeric(text.str.strip()).astype("Int64")
    if pd.api.types.is_integer_dtype(col):
        _refuse_times(col.isna().to_numpy(), source, "a missing time")
        if pd.api.types.is_unsigned_integer_dtype(col):
            u = col.to_numpy(dtype=np.uint64)
            _refuse_times(u > _INT64_MAX, source, _OUT_OF_RANGE)
            v = u.astype(np.int64)
        else:
            v = col.to_numpy(dtype=np.int64)
        cal = _calendar_ns(v)
        return cal if cal is not None else _scaled(v, _epoch_scale(v, source), source)
    if pd.api.types.is_numeric_dtype(col):
        f = col.to_numpy(dtype=np.float64, na_value=np.nan)
        _refuse_times(~np.isfinite(f), source, "a missing or non-finite time")
        if bool((f == np.floor(f)).all()) and bool((np.abs(f) < 2.0**62).all()):
            cal = _calendar_ns(f.astype(np.int64))  # 20040819.0: a spreadsheet's whole numbers
            if cal is not None:
                return cal
        ns = f * float(_epoch_scale(f, source))
        _refuse_times(~(np.abs(ns) < 2.0**63), source, _OUT_OF_RANGE)
        return ns.astype(np.int64)
    fmt = _dotted_format(col)
    if fmt is not None:
        col = _stripped(col, _first_text(col))
    day_first = _dayfirst(col, source, dayfirst) if fmt is None else None
    t = pd.to_datetime(col, utc=True, errors="coerce", format=fmt, dayfirst=bool(day_first))
    _refuse_times(t.isna().to_numpy(), source, "a missing, unreadable or out-of-range time")
    d = np.asarray(t.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy())
    unit = np.datetime_data(d.dtype)[0]
    if unit not in _NS_PER_UNIT:  # pragma: no cover - pandas resolutions are s/ms/us/ns
        d, unit = d.astype("datetime64[ns]"), "ns"
    return _scaled(d.view(np.int64), _NS_PER_UNIT[unit], source)


def _outside() -> int:
    """The ``stacklevel`` of a warning issued by this module's caller of :func:`_outside`
    that names the first frame outside this module (the user's call of a loader)."""
    f, level = sys._getframe(1), 1
    while f is not None and f.f_code.co_filename == __file__:
        f, level = f.f_back, level + 1
    return level


# dates written day and month first, in either order: 05/01/2017, 05-01-2017, 05.01.2017 14:00
_DAY_MONTH = r"\s*(\d{1,2})([/.-])(\d{1,2})\2(?:\d{4}|\d{2})(?:$|[ T,])"


def _dayfirst(col, source: str, dayfirst: bool | None) -> bool | None:
    """Whether the dates of ``col`` (text like ``05/01/2017``) put the day first: ``dayfirst``
    when given; else decided by the values (a first number above 12 is a day, a second one a
    month); when every value could be either, month first (pandas' reading) with a
    ``UserWarning``, or day first without one for dotted dates (``05.01.2017``: no locale
    writes the month first with dots). None for other text. Without this, pandas took the
    order of the first value for all of them: ten days of ``01/05/2017`` bars became ten
    months, and a later ``13/05/2017`` was an unreadable time."""
    import pandas as pd

    first = _first_text(col)
    m = None if first is None else re.match(_DAY_MONTH, first)
    if m is None:
        return None
    if dayfirst is not None:
        return bool(dayfirst)
    parts = col.astype("string").str.extract(r"^\s*(\d{1,2})[/.-](\d{1,2})[/.-]")
    a, b = pd.to_numeric(parts[0]), pd.to_numeric(parts[1])
    day_first, month_first = bool((a > 12).any()), bool((b > 12).any())
    if day_first != month_first:
        return day_first
    if day_first:  # both: mixed orders; the rows pandas cannot read are refused, named
        return False
    if m.group(2) == ".":
        return True
    warnings.warn(f"{source}: dates like {first.strip()!r} read month first (mm{m.group(2)}dd); every date "
                  f"could be either order: pass dayfirst=True (--dayfirst on the command line) to read them "
                  f"day first (dayfirst=False silences this)",
                  UserWarning, stacklevel=_outside())
    return False


_DOTTED_DATE = r"\d{4}\.\d{1,2}\.\d{1,2}(?:([ T])\d{1,2}:\d{2}(:\d{2}(\.\d{1,9})?)?)?"


def _dotted_format(col) -> str | None:
    """The strptime format of MetaTrader's year-first dotted dates (``2024.01.02``,
    ``2024.01.02 00:00[:00[.f]]``) when the first value of ``col`` is one, else None (pandas
    infers the format). pandas 2 may guess none for dots and parse row by row (slow, with a
    warning); an explicit format also parses in C."""
    first = _first_text(col)
    m = None if first is None else re.fullmatch(_DOTTED_DATE, first.strip())
    if m is None:
        return None
    if not m.group(1):
        return "%Y.%m.%d"
    return f"%Y.%m.%d{m.group(1)}%H:%M" + (":%S" if m.group(2) else "") + (".%f" if m.group(3) else "")


def read_csv(path: str | os.PathLike, instrument: str | int | None = None,
             timeframe: int | str | None = None, *, dayfirst: bool | None = None) -> np.ndarray:
    """Bars from a CSV file with a header (see :func:`from_pandas` for the columns), its fields
    separated by commas, or by semicolons (numbers with a decimal point or comma) or tabs when the
    header line holds no comma.

    Times come from a column named ts/time/timestamp/datetime/date/open_time or, when there is
    none, from an unnamed first column (the index ``DataFrame.to_csv`` writes). MetaTrader's
    exports load as they are: MetaTrader 4's ``Date,Time,Open,High,Low,Close,Volume`` (dates
    ``2024.01.01``, times ``00:00``) and MetaTrader 5's tab-separated
    ``<DATE> <TIME> <OPEN> <HIGH> <LOW> <CLOSE> <TICKVOL> <VOL> <SPREAD>`` (its tick volume is the
    volume when ``<VOL>`` is all zeros), and Stooq's ``<DATE>,<TIME>`` (``20240102,093000``).
    A file starting with a UTF-16 byte order mark is read as UTF-16, otherwise UTF-8. With
    semicolons and a decimal comma (``1,0716``), a dot in a number is a thousands separator
    (volume ``1.413`` is 1413), as in the locales that write such files. ``dayfirst``: see
    :func:`from_pandas`.

    A ``symbol``/``instrument`` column names each row's instrument (as written, surrounding
    blanks removed: ``NA``, ``NULL`` and ``nan`` are names like any other): without
    ``instrument``, every instrument of the file is loaded; with it, only that instrument's rows
    (a ``ValueError`` naming the file's instruments when it has none). A file without such a
    column holds one instrument: ``instrument``, or when omitted the file's stem.

    ``path`` may be a pipe, a FIFO or ``/dev/stdin``: a file that is not a regular file is read
    once into memory (it cannot be read a second time, and the file is read several times:
    separator, header, data).

    Raises
    ------
    ValueError
        Besides the errors of :func:`from_pandas` (a column name repeated in the header is
        ambiguous too, even spelled alike): rows whose symbol is empty, naming them (such a
        row belongs to no instrument, and dropping it would lose data without a word); an
        ``instrument`` the symbol column does not hold; a file stem that is no valid instrument
        name, when it would name the instrument.

    Warns
    -----
    UserWarning
        Price or volume cells that are not numbers, naming the columns and first rows (see
        :func:`from_pandas`; rows here are counted from 1 after the header).
    """
    name = os.fspath(path)
    src = _csv_source(path)
    seps = _separator(src)
    header = _read(src, nrows=0, **seps).columns
    text = {}  # columns read as text
    if seps.get("decimal") == ",":
        # 1.413,5 is 1413.5 there; times stay text (a dotted date 2024.01.02 read as a number
        # with thousands separators became 20240102)
        seps["thousands"] = "."
        text = {c: str for c in header if _bare(c) in _TIME_COLUMNS or str(c) == "Unnamed: 0"}
    # the header as written: pandas renames a repeated name ("close" -> "close.1"), which made
    # the second close column a column the loader does not read
    _refuse_ambiguous(_read(src, header=None, nrows=1, dtype=str, keep_default_na=False, **seps).iloc[0])
    # times: a named column, or the unnamed first column DataFrame.to_csv writes for the index
    index_col, no_times = None, None
    if not any(_find(header, t) is not None for t in _TIME_COLUMNS):
        no_times = ValueError(f"{name}: no time column: name one {'/'.join(_TIME_COLUMNS)} "
                              f"(any case), or leave the first header cell empty for a DatetimeIndex "
                              f"written by DataFrame.to_csv (have {list(header)})")
        if len(header) and str(header[0]) == "Unnamed: 0":
            index_col = 0
        elif all(_find(header, c) is not None for c in ("open", "high", "low", "close")):  # else: those first
            raise no_times
    scol = _find(header, "symbol") or _find(header, "instrument")
    if scol is None:
        df = _index_times(_read(src, **seps, dtype=text or None), index_col, no_times)
        _warn_not_numbers(df, name, first_row=1, how="counted from 1 after the header", by_label=True)
        if instrument is None:
            instrument = os.path.splitext(os.path.basename(name))[0]
            try:
                instruments.id(instrument)
            except ValueError as e:  # a name the user never gave: say where it came from
                raise ValueError(
                    f"{name}: the file has no symbol column, so its stem names its instrument, and that "
                    f"fails: {e}; rename the file, add a symbol column, or give the instrument "
                    f"(instrument= in Python, --instrument on the command line)") from None
        # in time order, as the multi-instrument path gives (rows out of order were rejected
        # as out_of_order one by one, leaving a handful of bars)
        return merge(_from_pandas(df, instrument, timeframe, dayfirst))
    from pandas._libs.parsers import STR_NA_VALUES  # read_csv's documented default NA strings

    # the symbol column as text, without NA detection: by default "NA", "NULL", "nan" and ""
    # read as missing and groupby drops their rows silently; the other columns keep the
    # defaults, so a missing price is still NaN and its bar is rejected and counted
    df = _index_times(_read(src, **seps, dtype={**text, scol: str}, keep_default_na=False,
                            na_values={c: STR_NA_VALUES for c in header if c != scol}), index_col, no_times)
    return _by_symbol(df, scol, instrument, timeframe, dayfirst, name, 1, "counted from 1 after the header",
                      warn=True)


def _csv_source(path: str | os.PathLike) -> str | os.PathLike | bytes:
    """What :func:`_read` reads ``path`` from: the path of a regular file, or the bytes of
    anything else (a pipe, a FIFO, ``/dev/stdin``, a terminal) read once to its end. Those can
    be read only once, and a CSV is read several times (separator, header, data): the second
    read found nothing ("No columns to parse from file")."""
    if stat.S_ISREG(os.stat(path).st_mode):
        return path
    with open(path, "rb") as f:
        return f.read()


def _read(src: str | os.PathLike | bytes, **kwargs):
    """``pandas.read_csv`` of a path, or of bytes from :func:`_csv_source`. The first column is
    never made the index behind our back: pandas does that when every data line has one field
    more than the header (a trailing delimiter), which shifted every price one column left."""
    import pandas as pd

    kwargs.setdefault("index_col", False)
    return pd.read_csv(io.BytesIO(src) if isinstance(src, bytes) else src, **kwargs)


def _separator(src: str | os.PathLike | bytes) -> dict[str, str]:
    """``read_csv`` options for a CSV file's separators and encoding: commas, unless its header
    line holds none and holds semicolons or tabs instead (spreadsheet exports in many locales,
    MetaTrader's history export); with semicolons, a decimal comma when the first data line has
    one. UTF-16 when the file starts with its byte order mark (Windows tools write "Unicode"
    text so); pandas reads UTF-8, and skips a UTF-8 byte order mark, by default."""
    if isinstance(src, bytes):
        head = src[: 1 << 17]
    else:
        with open(src, "rb") as f:
            head = f.read(1 << 17)
    opts = {}
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        opts["encoding"] = "utf-16"
        text = head[: len(head) // 2 * 2].decode("utf-16", errors="replace")
    else:
        text = head.decode("utf-8", errors="replace")
    lines = text.splitlines()
    first, second = (lines + ["", ""])[:2]
    if "," in first:
        return {"sep": ",", **opts}
    for sep in (";", "\t", "|"):
        if sep in first:
            if sep == ";" and re.search(r"\d,\d", second):
                return {"sep": sep, "decimal": ",", **opts}
            return {"sep": sep, **opts}
    return {"sep": ",", **opts}


def _index_times(df, index_col: int | None, no_times: Exception | None):
    """``df`` with its column ``index_col`` (an index column without a name) as the time column.
    Numbers there are an integer index (``RangeIndex``), not times: ``no_times`` is raised."""
    if index_col is None:
        return df
    import pandas as pd

    col = df.columns[index_col]
    if pd.api.types.is_numeric_dtype(df[col]) or pd.api.types.is_bool_dtype(df[col]):
        raise no_times
    return df.rename(columns={col: "time"})


def merge(*arrays: np.ndarray) -> np.ndarray:
    """Interleave bar arrays into one time-ordered array (stable: ties keep argument order)."""
    if not arrays:
        return empty(0)
    allbars = np.concatenate([as_bars(a, "merge argument") for a in arrays])
    return allbars[np.argsort(allbars["ts"], kind="stable")]


def to_pandas(bars: np.ndarray):
    """A DataFrame with a UTC DatetimeIndex and instrument names."""
    import pandas as pd

    b = as_bars(bars)
    df = pd.DataFrame(
        {
            "instrument": [instruments.name(int(i)) for i in b["instrument"]],
            "timeframe": b["timeframe"],
            "Open": b["open"],
            "High": b["high"],
            "Low": b["low"],
            "Close": b["close"],
            "Volume": b["volume"],
        },
        index=pd.to_datetime(b["ts"], utc=True),
    )
    df.index.name = "time"
    return df
