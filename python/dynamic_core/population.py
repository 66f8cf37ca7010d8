"""Agent populations: parameter grids, random populations and raw genome records."""

from __future__ import annotations

import hashlib
import itertools
import math
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._checks import check_int, check_real, is_real
from .errors import InsufficientMemory, InvalidGenome
from .instruments import instruments
from .market import parse_timeframe
from .records import GENOME_DTYPE

__all__ = ["Population", "MODES", "DEFAULTS", "MAX_AGENTS", "MAX_PERIOD", "MAX_COST_BPS"]

MAX_PERIOD = 100_000
MAX_AGENTS = 50_000_000
"""The most agents a population holds (a grid, a random population)."""
MAX_WEIGHT = 1e300  # a weight's size at most (kMaxWeight in population.hpp)
MAX_COST_BPS = 1000.0  # 10% of equity per unit of position change (a reversal: 20%); see population.hpp
MODES = {"long_only": 0, "long_short": 1}
PERIODS = ("fast", "slow", "rsi_period", "macd_fast", "macd_slow", "macd_signal", "atr_period",
           "bb_period", "mom_period")
WEIGHTS = ("w_trend", "w_rsi", "w_macd", "w_bb", "w_mom")
DEFAULTS: dict[str, Any] = {
    "fast": 12, "slow": 26, "rsi_period": 14, "macd_fast": 12, "macd_slow": 26, "macd_signal": 9,
    "atr_period": 14, "bb_period": 20, "mom_period": 10,
    "w_trend": 1.0, "w_rsi": 0.0, "w_macd": 0.0, "w_bb": 0.0, "w_mom": 0.0,
    "entry": 0.0, "cost_bps": 0.0, "mode": "long_short", "kind": 0, "w_dsi": 0.0,
}
"""Genome defaults: a plain EMA(12)/EMA(26) trend follower, long/short, no costs."""

_MEMINFO = "/proc/meminfo"
# cgroup memory limits (a container's): (limit, usage, stats, page-cache key), v2 then v1
_CGROUPS = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat", "file"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
     "/sys/fs/cgroup/memory/memory.stat", "total_cache"),
)
_SCRATCH_PER_AGENT = 64
"""Bytes per agent that building a population needs besides its records (measured: random
draws and check_records' masks and agent-id sort stay below this)."""


_HASH_CHUNK = 1 << 16  # records copied at a time to hash (a copy of them all was 6 GB at 50M agents)


def content_hash(rec: np.ndarray) -> int:
    """64-bit blake2b of valid ``GENOME_DTYPE`` records, each instrument id replaced by the rank
    of its name among the records' instrument names, then those names in that order. Instrument
    ids are per process (the order names were registered in): hashed as they were, the same
    population had another hash in another process, and there could take a different
    population's."""
    h = hashlib.blake2b(digest_size=8)
    if len(rec):
        inst = rec["instrument"]
        seen = np.zeros(int(inst.max()) + 1, dtype=bool)
        seen[inst] = True
        ids = np.flatnonzero(seen)
        names = [instruments.name(int(i)) for i in ids]
        by_name = sorted(range(len(ids)), key=names.__getitem__)
        rank = np.zeros(len(seen), dtype=np.uint32)
        rank[ids[by_name]] = np.arange(len(ids), dtype=np.uint32)
        for a in range(0, len(rec), _HASH_CHUNK):
            part = rec[a:a + _HASH_CHUNK].copy()
            part["instrument"] = rank[part["instrument"]]
            h.update(part.view(np.uint8))
        h.update("\0".join(names[j] for j in by_name).encode("utf-8", "surrogatepass"))
    return int.from_bytes(h.digest(), "little")


def _mode_code(m: Any) -> Any:
    if isinstance(m, (bool, np.bool_)):  # True == 1 == long_short: no bool is a mode
        raise InvalidGenome(f"mode: expected a mode name {sorted(MODES)} or its integer code, got {m!r}")
    if isinstance(m, str):
        if m not in MODES:
            raise InvalidGenome(f"unknown mode {m!r}; expected one of {sorted(MODES)}")
        return MODES[m]
    return m  # an integer code, range-checked with the other genome fields


def check_records(rec: np.ndarray) -> None:
    """Raise :class:`InvalidGenome` naming every offending row (the first ten in the message)."""
    problems: dict[str, np.ndarray] = {}  # reason -> its rows, in check order

    def flag(mask: np.ndarray, why: str) -> None:
        rows = np.flatnonzero(mask)
        if len(rows):
            problems[why] = rows

    for p in PERIODS:
        flag((rec[p] < 1) | (rec[p] > MAX_PERIOD), f"{p} outside [1, {MAX_PERIOD}]")
    for w in (*WEIGHTS, "w_dsi"):
        flag(~np.isfinite(rec[w]), f"{w} not finite")
        # the blend of six weights, each feature in [-1, 1], stays finite (population.hpp)
        flag(np.isfinite(rec[w]) & (np.abs(rec[w]) > MAX_WEIGHT),
             f"{w} beyond +-{MAX_WEIGHT:g} (the blend would overflow)")
    flag(~np.isfinite(rec["entry"]) | (rec["entry"] < 0), "entry not a finite number >= 0")
    flag(~np.isfinite(rec["cost_bps"]) | (rec["cost_bps"] < 0) | (rec["cost_bps"] > MAX_COST_BPS),
         f"cost_bps not a finite number in [0, {MAX_COST_BPS:g}]")
    flag(rec["mode"] > 1, "unknown mode (0 long_only, 1 long_short)")
    flag(rec["kind"] > 1, "unknown kind (0 indicator blend, 1 external score)")
    flag(rec["timeframe"] == 0, "timeframe 0")
    flag(rec["instrument"] >= len(instruments), "instrument id not registered in dc.instruments")
    flag(rec["agent_id"] == 0xFFFFFFFF, "agent_id 2**32 - 1 (it names no agent in lineage and births)")
    ids, first, counts = np.unique(rec["agent_id"], return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = np.isin(rec["agent_id"], ids[counts > 1])
        dup[first[counts > 1]] = False
        flag(dup, "duplicate agent_id")
    if problems:
        rows = sorted(set(np.concatenate(list(problems.values())).tolist()))

        def where(r: np.ndarray) -> str:  # "row 4" / "rows 4, 11" / "rows 0, 1, ... (25 rows)"
            shown = ", ".join(str(int(i)) for i in r[:10])
            return f"row {shown}" if len(r) == 1 else (
                f"rows {shown}" + (f", ... ({len(r)} rows)" if len(r) > 10 else ""))

        what = "; ".join(f"{why} at {where(r)}" for why, r in problems.items())
        raise InvalidGenome(f"{len(rows)} invalid genome row(s): {what}", rows=rows)


class Population:
    """An immutable set of agent genomes (``GENOME_DTYPE`` records).

    Build one with :meth:`grid`, :meth:`random` or :meth:`from_records`. ``records`` is
    read-only; ``hash`` is a content hash used as provenance in every signal.
    """

    __slots__ = ("_rec", "_hash")

    def __init__(self, records: np.ndarray) -> None:
        if not isinstance(records, np.ndarray) or records.dtype != GENOME_DTYPE or records.ndim != 1:
            got = records.dtype if isinstance(records, np.ndarray) else type(records).__name__
            raise TypeError(f"expected a 1-d numpy array of dc.GENOME_DTYPE, got {got}")
        self._take(np.array(records, dtype=GENOME_DTYPE, copy=True, order="C"))

    def _take(self, rec: np.ndarray) -> None:
        """Validate ``rec`` (a C-contiguous array nothing else holds) and freeze it as the records."""
        check_records(rec)
        rec.setflags(write=False)
        self._rec = rec
        self._hash = content_hash(rec)

    @classmethod
    def _adopt(cls, rec: np.ndarray) -> Population:
        """A population of records built here (fresh, C-contiguous, nothing else holds them):
        validated, not copied, which doubled the peak memory of a large population."""
        self = cls.__new__(cls)
        self._take(rec)
        return self

    # ---- constructors ------------------------------------------------------------------------
    @classmethod
    def from_records(cls, records: np.ndarray) -> Population:
        """A population from existing genome records (validated; copied)."""
        return cls(records)

    @classmethod
    def grid(cls, instrument: str | int | Sequence[str | int], timeframe: int | str | Sequence[int | str],
             **params: Any) -> Population:
        """The cartesian product of every list-valued parameter; scalars broadcast.

        ``instrument`` and ``timeframe`` may be lists too; a parameter's values may be any
        sequence (list, tuple, range, numpy array) or iterator, but not a set (it has no order).
        Unnamed parameters take :data:`DEFAULTS`. Agents are numbered 0..n-1 in product order:
        ``instrument``, ``timeframe``, then the genome fields in the order :data:`DEFAULTS` lists
        them (not the order the keywords are given in), the last varying fastest.

        >>> Population.grid("EURUSD", "H1", fast=[5, 10], slow=[20, 50, 100])  # 6 agents

        The grid's size is checked before any value is read: ``fast=range(1, 10**9)`` is refused
        at once (more than :data:`MAX_AGENTS`), not after building a list of a billion numbers.
        """
        unknown = set(params) - set(DEFAULTS)
        if unknown:
            raise TypeError(f"unknown genome parameter(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        given = {"instrument": instrument, "timeframe": timeframe,
                 **{k: params.get(k, default) for k, default in DEFAULTS.items()}}
        raw = {k: _axis_values(k, v) for k, v in given.items()}
        n = math.prod(len(v) for v in raw.values())  # Python ints: np.prod would wrap in int64
        if n == 0:
            raise ValueError("the grid is empty (a parameter has an empty list)")
        if n > MAX_AGENTS:
            raise ValueError(f"grid of {n} agents is larger than the {MAX_AGENTS // 10**6}M limit")
        axes: dict[str, Any] = dict(raw)
        axes["instrument"] = [instruments.resolve(i) for i in raw["instrument"]]
        axes["timeframe"] = [parse_timeframe(t) for t in raw["timeframe"]]
        axes["mode"] = [_mode_code(m) for m in raw["mode"]]
        for k in axes:
            axes[k] = list(axes[k])
            _check_axis(k, axes[k])
        names = list(axes)
        _check_memory(n, "grid")
        rec = np.zeros(n, dtype=GENOME_DTYPE)
        rec["agent_id"] = np.arange(n, dtype=np.uint32)
        # product order (the last axis varies fastest, as itertools.product): the records seen
        # as an array of one dimension per list axis, in C order, and each axis's values
        # broadcast along its dimension, written in place. np.meshgrid made a full n-sized
        # array of every axis first (8 bytes per agent and axis, 21 axes)
        lists = [k for k in names if len(axes[k]) > 1]
        shaped = rec.reshape([len(axes[k]) for k in lists]) if lists else rec
        for k in names:
            values = np.asarray(axes[k])
            if len(values) == 1:
                rec[k] = values  # one value: every agent's
            else:
                d = lists.index(k)
                shaped[k] = values.reshape([-1 if j == d else 1 for j in range(len(lists))])
        return cls._adopt(rec)

    @classmethod
    def random(cls, n: int, instruments: Sequence[str | int] = ("SIM0",),
               timeframes: Sequence[int | str] = (3600,), seed: int = 0,
               mode: str | None = None, cost_bps: float | None = None,
               dsi_share: float = 0.0) -> Population:
        """``n`` random agents spread evenly over every (instrument, timeframe) pair.

        Periods are drawn in trader-typical ranges, each feature weight is N(0, 1) and zero with
        probability 0.3, entry thresholds in [0, 0.5), mode long/short with probability 0.5
        (unless ``mode`` is given) and costs in [0, 2) bps (unless ``cost_bps`` is given). A
        share ``dsi_share`` of the agents also read DSI microstructure evidence
        (:meth:`Engine.set_dsi`) with a weight ``w_dsi`` ~ N(0, 1). The same ``seed`` gives the
        same population.
        """
        from .instruments import instruments as registry

        n = check_int("n", n, 1, MAX_AGENTS)
        seed = check_int("seed", seed, 0, 2**64 - 1)
        dsi_share = check_real("dsi_share", dsi_share, 0.0, 1.0)
        if cost_bps is not None:
            cost_bps = check_real("cost_bps", cost_bps, 0.0, MAX_COST_BPS)
        mode_code = None if mode is None else _mode_code(mode)
        if mode_code is not None and mode_code not in MODES.values():
            raise InvalidGenome(f"unknown mode {mode!r}; expected one of {sorted(MODES)}")
        # a single name (or timeframe) is one instrument, not one per character
        pairs = list(itertools.product(registry.resolve_all(_axis_values("instruments", instruments)),
                                       [parse_timeframe(t) for t in _axis_values("timeframes", timeframes)]))
        if not pairs:
            raise ValueError("need at least one instrument and one timeframe")
        _check_memory(n, "random population")
        rng = np.random.default_rng(seed)
        rec = np.zeros(n, dtype=GENOME_DTYPE)
        rec["agent_id"] = np.arange(n, dtype=np.uint32)
        which = np.arange(n) % len(pairs)
        rec["instrument"] = np.array([p[0] for p in pairs], dtype=np.uint32)[which]
        rec["timeframe"] = np.array([p[1] for p in pairs], dtype=np.uint32)[which]
        rec["fast"] = rng.integers(2, 50, n)
        rec["slow"] = rec["fast"] + rng.integers(1, 150, n)
        rec["rsi_period"] = rng.integers(2, 31, n)
        rec["macd_fast"] = rng.integers(2, 21, n)
        rec["macd_slow"] = rec["macd_fast"] + rng.integers(1, 31, n)
        rec["macd_signal"] = rng.integers(2, 16, n)
        rec["atr_period"] = rng.integers(5, 31, n)
        rec["bb_period"] = rng.integers(5, 51, n)
        rec["mom_period"] = rng.integers(2, 31, n)
        for w in WEIGHTS:
            rec[w] = np.where(rng.random(n) < 0.3, 0.0, rng.standard_normal(n))
        rec["entry"] = rng.random(n) * 0.5
        rec["mode"] = mode_code if mode_code is not None else rng.integers(0, 2, n)
        rec["cost_bps"] = cost_bps if cost_bps is not None else rng.random(n) * 2.0
        if dsi_share > 0.0:  # drawn last: populations without DSI readers stay as they were
            rec["w_dsi"] = np.where(rng.random(n) < dsi_share, rng.standard_normal(n), 0.0)
        return cls._adopt(rec)

    @classmethod
    def random_on(cls, streams: Sequence[tuple[str | int, int | str]], n: int, seed: int = 0) -> Population:
        """``n`` random agents (as :meth:`random` draws them) spread evenly over exactly these
        (instrument, timeframe) streams: data with, say, EURUSD H1 and GOOG D1 only gets no
        agents on EURUSD D1 or GOOG H1, whose bars never come."""
        from .instruments import instruments as registry

        keys = [(registry.resolve(i), parse_timeframe(t)) for i, t in streams]
        if not keys:
            raise ValueError("need at least one stream")
        ids = sorted({i for i, _ in keys})
        tfs = sorted({t for _, t in keys})
        every_pair = len(set(keys)) == len(ids) * len(tfs)
        if not every_pair:  # the records are copied to be respread: two sets at once
            _check_memory(check_int("n", n, 1, MAX_AGENTS), "random population", copies=2)
        pop = cls.random(n, instruments=ids, timeframes=tfs, seed=seed)
        if every_pair:
            return pop
        rec = pop.records.copy()
        del pop  # its records are freed: only the copy is kept
        which = np.arange(n) % len(keys)
        rec["instrument"] = np.array([k[0] for k in keys], dtype=np.uint32)[which]
        rec["timeframe"] = np.array([k[1] for k in keys], dtype=np.uint32)[which]
        return cls._adopt(rec)

    # ---- views -------------------------------------------------------------------------------
    @property
    def records(self) -> np.ndarray:
        """Read-only ``GENOME_DTYPE`` records in population order."""
        return self._rec

    @property
    def hash(self) -> int:
        """64-bit content hash (blake2b of the records, instruments by name): the same for the
        same genomes in any process, whatever ids its instrument registry handed out."""
        return self._hash

    def __len__(self) -> int:
        return len(self._rec)

    def __getitem__(self, idx: Any) -> Population:
        return Population(np.atleast_1d(self._rec[idx]))

    def to_pandas(self):
        """The genomes as a DataFrame with instrument names and mode names."""
        import pandas as pd

        df = pd.DataFrame(self._rec)
        df["instrument"] = [instruments.name(int(i)) for i in self._rec["instrument"]]
        df["mode"] = np.where(self._rec["mode"] == 1, "long_short", "long_only")
        return df

    def __repr__(self) -> str:
        pairs = len(np.unique(self._rec[["instrument", "timeframe"]]))
        return f"Population({len(self)} agents, {pairs} instrument/timeframe streams, hash={self._hash:016x})"


def _check_axis(name: str, values: list[Any]) -> None:
    """Refuse values that the genome field cannot hold as given: numpy's cast into the record
    would wrap an out-of-range integer (``2**32 + 5`` -> 5) or truncate a fractional one."""
    kind = GENOME_DTYPE[name]
    if kind.kind == "f":  # a real number (finiteness and range: check_records, naming rows)
        for v in values:
            if not is_real(v):
                raise InvalidGenome(f"{name}: expected a real number, got {v!r}")
            try:
                float(v)
            except OverflowError:  # an int past a float's range (numpy's cast raised it bare)
                raise InvalidGenome(f"{name}: {v!r} is beyond a float's range") from None
        return
    if kind.kind not in "iu":
        return
    info = np.iinfo(kind)
    for v in values:
        if isinstance(v, (bool, np.bool_)):
            raise InvalidGenome(f"{name}: expected an integer, got {v!r}")
        if isinstance(v, (float, np.floating)):
            if not (math.isfinite(v) and float(v).is_integer()):
                raise InvalidGenome(f"{name}: expected an integer, got {v!r}")
            v = int(v)
        try:
            i = operator.index(v)
        except TypeError:
            raise InvalidGenome(f"{name}: expected an integer, got {v!r}") from None
        if not info.min <= i <= info.max:
            raise InvalidGenome(f"{name}: {i} does not fit the genome field ({kind.name}, "
                                f"[{info.min}, {info.max}])")


def _axis_values(name: str, v: Any) -> Any:
    """A grid parameter's values, unread where they have a length (a range stays a range): a
    scalar (a string too) as one value; a sequence or numpy array as it is; an iterator read
    up to one value past :data:`MAX_AGENTS` (enough to refuse the grid). ``TypeError`` for a
    set or a mapping, whose order is no order a grid could be numbered in."""
    if isinstance(v, (str, bytes)):
        return [v]
    if isinstance(v, (set, frozenset, Mapping)):
        raise TypeError(f"{name}: a {type(v).__name__} has no order to number the agents by: give a "
                        f"list, tuple, range or array (sorted({name}) for a set)")
    if hasattr(v, "to_numpy") and callable(v.to_numpy):  # a pandas Series or Index: its values
        return _axis_values(name, v.to_numpy())
    if isinstance(v, np.ndarray):
        if v.ndim > 1:
            raise TypeError(f"{name}: expected a scalar or a 1-d array of values, got a {v.ndim}-d array")
        return [v[()]] if v.ndim == 0 else v
    if hasattr(v, "__len__") and hasattr(v, "__getitem__"):
        return v
    if hasattr(v, "__iter__") or hasattr(v, "__next__"):
        return list(itertools.islice(v, MAX_AGENTS + 1))
    return [v]


def _check_memory(n: int, what: str, copies: int = 1) -> None:
    """:class:`InsufficientMemory` when building ``what`` of ``n`` agents (``copies`` sets of
    records at once, plus scratch) needs more memory than is available now. Near
    :data:`MAX_AGENTS` that is tens of GiB: allocated anyway, the process swapped or was killed
    by the kernel without a message. Skipped where the available memory cannot be read."""
    need = n * (copies * GENOME_DTYPE.itemsize + _SCRATCH_PER_AGENT)
    avail = _available_memory()
    if avail is not None and need > avail:
        raise InsufficientMemory(f"{what} of {n:,} agents needs ~{need / 2**30:,.3f} GiB of memory, "
                                 f"{avail / 2**30:,.3f} GiB available: use fewer agents (an engine running "
                                 f"them needs more still)")


def _available_memory() -> int | None:
    """Bytes this process may still allocate: the kernel's ``MemAvailable`` estimate, or less
    where a cgroup (a container) limit leaves less (its page cache counted as free: the kernel
    reclaims it before killing anything); None where neither can be read (not Linux)."""
    avail = None
    try:
        with open(_MEMINFO) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024  # in kB
                    break
    except (OSError, ValueError, IndexError):
        avail = None
    left = _cgroup_left()
    return left if avail is None else avail if left is None else min(avail, left)


def _cgroup_left() -> int | None:
    """Bytes left under this process's cgroup memory limit, or None without one ("max", v1's
    near-2**63 "unlimited", or no cgroup files)."""
    for limit_path, usage_path, stat_path, cache_key in _CGROUPS:
        try:
            with open(limit_path) as f:
                limit = int(f.read())  # "max" (v2, no limit): ValueError
            with open(usage_path) as f:
                usage = int(f.read())
        except (OSError, ValueError):
            continue
        if limit >= 1 << 60:
            continue
        cache = 0
        try:
            with open(stat_path) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == cache_key:
                        cache = int(value)
                        break
        except (OSError, ValueError):
            pass
        return max(0, limit - usage + cache)
    return None
