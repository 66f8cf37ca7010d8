"""Market data in: bar arrays, validation, pandas and CSV interop.

Every loader returns a time-ordered ``BAR_DTYPE`` array. Validation here is the engine's own
(the same C++ checks), so what ``validate`` flags is exactly what ``Engine.run`` rejects.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

import numpy as np

from . import _core
from .errors import InvalidInput
from .instruments import instruments
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
_TIME_COLUMNS = ("ts", "time", "timestamp", "datetime", "date", "open_time")


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
        if m:
            seconds = _MT_FRAMES[m.group(1)] * int(m.group(2))
        else:
            seconds = _offset_seconds(tf)
    else:
        raise TypeError(f"timeframe must be int or str, got {type(tf).__name__}")
    if not 0 < seconds < 2**32:
        shown = f"{tf!r} ({seconds} s)" if isinstance(tf, str) else repr(tf)
        raise ValueError(f"timeframe {shown} is not between 1 s and 2**32-1 s (a uint32 number of seconds)")
    return seconds


def _offset_seconds(tf: str) -> int:
    """Whole seconds of a pandas offset string; refuses one that is not a whole number of them."""
    import pandas as pd

    if _BARE_NUMBER.fullmatch(tf.strip()):
        raise ValueError(f"cannot read timeframe {tf!r}: a string needs a unit ('60s', 'H1', '1h'); "
                         "pass bare seconds as an int")
    try:
        td = pd.Timedelta(tf)
    except (ValueError, OverflowError):
        raise ValueError(f"cannot read timeframe {tf!r}: use seconds, 'H1' or '1h'") from None
    if pd.isna(td):
        raise ValueError(f"cannot read timeframe {tf!r}: use seconds, 'H1' or '1h'")
    seconds, rest = divmod(td.value, _NS)
    if rest:
        raise ValueError(f"timeframe {tf!r} is not a whole number of seconds")
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
    """Reject reason code of each bar (0 = ok); names are in ``dc.REASONS``."""
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


def _find(columns: Iterable[str], name: str) -> str | None:
    for c in columns:
        if str(c).strip().lower() == name:
            return c
    return None


def from_pandas(df, instrument: str | int, timeframe: int | str | None = None) -> np.ndarray:
    """Bars from a DataFrame with OHLC(V) columns in any case and a DatetimeIndex or a time column.

    Parameters
    ----------
    df : pandas.DataFrame
        ``Open High Low Close [Volume]`` (any case). Times come from a DatetimeIndex or from a
        column named ts/time/timestamp/datetime/date (datetimes, or epoch numbers: seconds, ms,
        us or ns, told apart by magnitude).
    instrument : str or int
        Instrument name (registered on first use) or id.
    timeframe : int or str, optional
        Seconds, ``"H1"`` or ``"1h"``. Inferred from the median spacing of the times when omitted.

    Rows come back in time order (a stable sort: rows of equal time keep their order, and the
    engine then rejects the later ones as ``duplicate_timestamp``), so newest-first data loads
    like oldest-first.

    Raises ``ValueError`` naming the first rows whose time is missing (NaN, NaT), non-finite,
    unreadable or outside the int64 nanosecond range (years 1677 to 2262), and ``TypeError`` for
    a boolean time column. Integer epochs are converted exactly (integer arithmetic).
    """
    import pandas as pd

    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"expected a pandas DataFrame, got {type(df).__name__}")
    cols = list(df.columns)
    missing = [c for c in ("open", "high", "low", "close") if _find(cols, c) is None]
    if missing:
        raise ValueError(f"DataFrame lacks columns {missing} (have {cols})")
    tcol = next((c for name in _TIME_COLUMNS if (c := _find(cols, name)) is not None), None)
    if tcol is not None:
        ts = _to_ns(df[tcol], f"time column {tcol!r}")
    elif isinstance(df.index, pd.DatetimeIndex):
        ts = _to_ns(pd.Series(df.index), "the DatetimeIndex")
    else:
        raise ValueError("no times: give the DataFrame a DatetimeIndex or a time/timestamp/date column")
    out = empty(len(df))
    out["ts"] = ts
    out["instrument"] = instruments.resolve(instrument)
    if timeframe is None:
        d = np.diff(np.sort(ts))
        d = d[d > 0]
        if len(d) == 0:
            raise ValueError("cannot infer the timeframe from fewer than two distinct times; pass timeframe=")
        timeframe = max(1, int(np.median(d) // 1_000_000_000))
    out["timeframe"] = parse_timeframe(timeframe)
    for name in ("open", "high", "low", "close"):
        out[name] = pd.to_numeric(df[_find(cols, name)], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    vcol = _find(cols, "volume")
    if vcol is not None:
        out["volume"] = pd.to_numeric(df[vcol], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    # time order, as every loader gives (newest-first vendor data was rejected bar by bar as
    # out_of_order but for its first row)
    return out if len(ts) < 2 or bool((np.diff(ts) >= 0).all()) else out[np.argsort(ts, kind="stable")]


_INT64_MAX = (1 << 63) - 1
_OUT_OF_RANGE = "a time outside the int64 nanosecond range (1677..2262)"
_NS_PER_UNIT = {"s": 1_000_000_000, "ms": 1_000_000, "us": 1_000, "ns": 1}


def _epoch_scale(mag: float) -> int:
    """ns per unit of epoch numbers whose largest magnitude is ``mag``: seconds, ms, us or ns."""
    return 10**9 if mag < 1e11 else 10**6 if mag < 1e14 else 10**3 if mag < 1e17 else 1


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


def _to_ns(col, source: str = "the time column") -> np.ndarray:
    """Times as int64 ns since the epoch: epoch numbers (seconds, ms, us or ns, told apart by
    magnitude; integers in integer arithmetic, so ns stay exact) or datetimes (UTC when naive).
    ValueError naming the first bad rows for a missing, non-finite, unreadable or out-of-range
    time; TypeError for booleans."""
    import pandas as pd

    if pd.api.types.is_bool_dtype(col) or (
            col.dtype == object and pd.api.types.infer_dtype(col, skipna=True) == "boolean"):
        raise TypeError(f"{source} holds booleans, not times (datetimes or epoch numbers)")
    if pd.api.types.is_integer_dtype(col):
        _refuse_times(col.isna().to_numpy(), source, "a missing time")
        if pd.api.types.is_unsigned_integer_dtype(col):
            u = col.to_numpy(dtype=np.uint64)
            _refuse_times(u > _INT64_MAX, source, _OUT_OF_RANGE)
            v = u.astype(np.int64)
        else:
            v = col.to_numpy(dtype=np.int64)
        mag = max(-int(v.min()), int(v.max())) if len(v) else 0
        return _scaled(v, _epoch_scale(mag), source)
    if pd.api.types.is_numeric_dtype(col):
        f = col.to_numpy(dtype=np.float64, na_value=np.nan)
        _refuse_times(~np.isfinite(f), source, "a missing or non-finite time")
        mag = float(np.max(np.abs(f))) if len(f) else 0.0
        ns = f * float(_epoch_scale(mag))
        _refuse_times(~(np.abs(ns) < 2.0**63), source, _OUT_OF_RANGE)
        return ns.astype(np.int64)
    t = pd.to_datetime(col, utc=True, errors="coerce")
    _refuse_times(t.isna().to_numpy(), source, "a missing, unreadable or out-of-range time")
    d = np.asarray(t.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy())
    unit = np.datetime_data(d.dtype)[0]
    if unit not in _NS_PER_UNIT:  # pragma: no cover - pandas resolutions are s/ms/us/ns
        d, unit = d.astype("datetime64[ns]"), "ns"
    return _scaled(d.view(np.int64), _NS_PER_UNIT[unit], source)


def read_csv(path: str | os.PathLike, instrument: str | int | None = None,
             timeframe: int | str | None = None) -> np.ndarray:
    """Bars from a CSV file with a header (see :func:`from_pandas` for the columns), its fields
    separated by commas, or by semicolons (numbers with a decimal point or comma) or tabs when the
    header line holds no comma.

    Times come from a column named ts/time/timestamp/datetime/date/open_time or, when there is
    none, from an unnamed first column (the index ``DataFrame.to_csv`` writes).

    When ``instrument`` is omitted, a ``symbol``/``instrument`` column names each row's
    instrument (as written, surrounding blanks removed: ``NA``, ``NULL`` and ``nan`` are names
    like any other); failing that, the file's stem is the instrument name.

    Raises
    ------
    ValueError
        Besides the errors of :func:`from_pandas`: rows whose symbol is empty, naming them (such a
        row belongs to no instrument, and dropping it would lose data without a word).
    """
    import pandas as pd

    seps = _separator(path)
    header = pd.read_csv(path, nrows=0, **seps).columns
    # times: a named column, or the unnamed first column DataFrame.to_csv writes for the index
    index_col, no_times = None, None
    if not any(_find(header, name) is not None for name in _TIME_COLUMNS):
        no_times = ValueError(f"{os.fspath(path)}: no time column: name one {'/'.join(_TIME_COLUMNS)} "
                              f"(any case), or leave the first header cell empty for a DatetimeIndex "
                              f"written by DataFrame.to_csv (have {list(header)})")
        if len(header) and str(header[0]) == "Unnamed: 0":
            index_col = 0
        elif all(_find(header, c) is not None for c in ("open", "high", "low", "close")):  # else: those first
            raise no_times
    scol = None
    if instrument is None:
        scol = _find(header, "symbol") or _find(header, "instrument")
    if scol is None:
        df = _index_times(pd.read_csv(path, **seps), index_col, no_times)
        if instrument is None:
            instrument = os.path.splitext(os.path.basename(os.fspath(path)))[0]
        # in time order, as the multi-instrument path gives (rows out of order were rejected
        # as out_of_order one by one, leaving a handful of bars)
        return merge(from_pandas(df, instrument, timeframe))
    from pandas._libs.parsers import STR_NA_VALUES  # read_csv's documented default NA strings

    # the symbol column as text, without NA detection: by default "NA", "NULL", "nan" and ""
    # read as missing and groupby drops their rows silently; the other columns keep the
    # defaults, so a missing price is still NaN and its bar is rejected and counted
    df = _index_times(pd.read_csv(path, **seps, dtype={scol: str}, keep_default_na=False,
                                  na_values={c: STR_NA_VALUES for c in header if c != scol}), index_col,
                      no_times)
    names = df[scol].str.strip()
    empty = np.flatnonzero((names == "").to_numpy())
    if len(empty):
        shown = ", ".join(str(i + 1) for i in empty[:10]) + (", ..." if len(empty) > 10 else "")
        raise ValueError(f"{len(empty):,} row(s) with an empty {scol!r}: rows {shown} (counted from 1 after "
                         f"the header); give every row an instrument, or drop the column to name all rows "
                         f"after the file")
    parts = [from_pandas(g.drop(columns=[scol]), name, timeframe)
             for name, g in df.groupby(names, sort=True, dropna=False)]
    return merge(*parts)


def _separator(path: str | os.PathLike) -> dict[str, str]:
    """``read_csv`` options for a CSV file's separators: commas, unless its header line holds
    none and holds semicolons or tabs instead (spreadsheet exports in many locales, MetaTrader's
    history export); with semicolons, a decimal comma when the first data line has one."""
    with open(path, encoding="utf-8", errors="replace") as f:
        first, second = f.readline(1 << 16), f.readline(1 << 16)
    if "," in first:
        return {"sep": ","}
    for sep in (";", "\t", "|"):
        if sep in first:
            if sep == ";" and re.search(r"\d,\d", second):
                return {"sep": sep, "decimal": ","}
            return {"sep": sep}
    return {"sep": ","}


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
