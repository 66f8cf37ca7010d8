"""Organic growth: the population evolves while it trades.

The generation itself runs in C++ on the population in place (:meth:`dynamic_core.Engine.evolve`):
each SM is an island whose weakest judged agents are replaced by children of its fittest
(tournament selection, block crossover, mutation of weights, entry threshold and periods),
with migrants from the neighbouring SM of the stream and spawns into feature styles the stream
lacks. Periods move only among the features the SM's bank already computes, so children read
warm indicators from their first bar. Every draw comes from a counter-based RNG keyed by
(seed, agent id, generation): a generation is deterministic on any thread count, and journaled
generations replay bit for bit.

This module decides *when*: :class:`Evolution` runs bars through the engine and starts a
generation of a stream every ``every`` bars of that stream and when the stream's volatility
regime changes, splitting batches at the trigger bar so the result does not depend on how the
bars were chunked. It keeps the evolution trace (best/median fitness per generation).

>>> evo = Evolution(eng, every=500, seed=7)
>>> signals = evo.run(bars)            # like eng.run, with generations in between
>>> print(evo.table())

Arguments are checked when the :class:`Evolution` is made, so a run does not stop at its first
generation with bars already in the engine. Should a run still fail part-way (e.g. the engine was
closed from another thread), the signals of the bars the engine took are not lost: they come
with the :class:`EvolutionInterrupted` it raises.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import numpy as np

from .._checks import check_int, check_real
from ..errors import EvolutionInterrupted
from ..market import as_bars, refuse_bad
from ..payloads import EvolutionConfig, evolution_config
from ..records import SIGNAL_DTYPE

__all__ = ["Evolution", "EvolutionConfig", "EvolutionInterrupted", "GenerationRow", "VolatilityRegime",
           "check_plot_path", "format_trace", "plot_formats", "plot_trace"]

_MAX_SEED = (1 << 64) - 1  # the engine's counter-based RNG key is 64 bits
_MAX_EVERY = (1 << 63) - 1


class GenerationRow(msgspec.Struct, frozen=True, kw_only=True):
    """One generation of the trace."""

    generation: int
    stream: int
    instrument: int
    timeframe: int
    bar: int          # bars of the stream seen when it ran
    trigger: str      # "every" or "regime"
    judged: int       # agents old enough to be judged
    eligible: int     # of those, with min_trades closed trades and not replaced (parents)
    replaced: int
    crossovers: int
    migrants: int
    spawns: int
    period_moves: int
    best: float       # fitness of the judged agents with min_trades closed trades, before
    median: float     # replacement; NaN when none has them yet
    mean: float
    styles: tuple[int, ...]


class VolatilityRegime:
    """Volatility regime of one stream: the ratio of a fast to a slow exponentially weighted
    variance of close-to-close returns. The regime turns ``high`` when the ratio rises above
    ``high`` and back to ``normal`` when it falls below ``low`` (hysteresis), after ``warmup``
    bars. :meth:`update` returns True on a change.

    ``fast`` and ``slow`` are spans in bars, ints with ``1 <= fast < slow``; ``high`` and
    ``low`` finite numbers with ``high > low > 0``; ``warmup`` an int >= 0 (default ``slow``).
    TypeError for a wrong type (a bool, a float span, a str), ValueError naming the argument
    for a value out of range: an infinite ``high`` would never trigger, a negative ``warmup``
    or a fractional span means a mistake upstream."""

    def __init__(self, fast: int = 20, slow: int = 200, high: float = 3.0, low: float = 1.5,
                 warmup: int | None = None) -> None:
        fast = check_int("fast", fast, 1, _MAX_EVERY - 1)
        slow = check_int("slow", slow, 2, _MAX_EVERY)
        if not fast < slow:
            raise ValueError(f"fast must be below slow (spans in bars), got fast={fast}, slow={slow}")
        low = check_real("low", low, 0.0, lo_open=True)
        high = check_real("high", high, 0.0, lo_open=True)
        if not high > low:
            raise ValueError(f"high must be above low (the hysteresis band), got high={high}, low={low}")
        warmup = slow if warmup is None else check_int("warmup", warmup, 0, _MAX_EVERY)
        self._af, self._as = 2.0 / (fast + 1), 2.0 / (slow + 1)
        self._high, self._low = high, low
        self._warmup = warmup
        self._vf = self._vs = 0.0
        self._prev: float | None = None
        self._n = 0
        self.state = "normal"

    def update(self, close: float) -> bool:
        if not (math.isfinite(close) and close > 0):  # a bad close (the engine rejects it) is skipped
            return False
        if self._prev is None:
            self._prev = close
            return False
        r = close / self._prev - 1.0
        self._prev = close
        r2 = r * r
        self._vf += self._af * (r2 - self._vf)
        self._vs += self._as * (r2 - self._vs)
        self._n += 1
        if self._n < self._warmup or self._vs <= 0.0:
            return False
        ratio = self._vf / self._vs
        new = ("high" if ratio > self._high else "normal") if self.state == "normal" else (
            "normal" if ratio < self._low else "high")
        changed = new != self.state
        self.state = new
        return changed


class Evolution:
    """Runs bars through ``engine`` with generations of evolution in between.

    Parameters
    ----------
    engine : dynamic_core.Engine
    config : EvolutionConfig or dict, optional
        How a generation judges and breeds (defaults: :class:`EvolutionConfig`). Its ``stream``
        is set per generation.
    every : int
        Bars of a stream between its generations (0: never by count); an int >= 0 (not a bool
        or a float).
    regime : bool
        Also start a generation of a stream when its volatility regime changes (at most one per
        ``config.min_age`` bars of the stream, so children are judged before the next). A bool:
        another truthy value (``"no"``) is a TypeError.
    seed : int
        Seed of the counter-based RNG, in ``[0, 2**64)``; the generation number is the second key.
    regime_kwargs : dict, optional
        Passed to :class:`VolatilityRegime` (``fast``, ``slow``, ``high``, ``low``, ``warmup``),
        checked as it checks them, also when ``regime`` is False.

    Bad arguments raise here: TypeError for a wrong type (an ``engine`` that is not a
    :class:`dynamic_core.Engine` included), ValueError for a value out of range.
    Only bars the engine accepts count toward ``every`` and the volatility regime (a rejected
    bar is counted and dead-lettered by the engine, as with ``engine.run``).
    """

    def __init__(self, engine: Any, config: EvolutionConfig | dict[str, Any] | None = None, *,
                 every: int = 500, regime: bool = True, seed: int = 0,
                 regime_kwargs: dict[str, Any] | None = None) -> None:
        from ..engine import Engine

        if not isinstance(engine, Engine):
            raise TypeError(f"engine must be a dynamic_core.Engine, got {type(engine).__name__}")
        cfg = evolution_config(config)
        self.every = check_int("every", every, 0, _MAX_EVERY)
        self.seed = check_int("seed", seed, 0, _MAX_SEED)
        if not isinstance(regime, (bool, np.bool_)):
            raise TypeError(f"regime must be a bool, got {regime!r} ({type(regime).__name__})")
        if regime_kwargs is None:
            regime_kwargs = {}
        elif not isinstance(regime_kwargs, Mapping):
            raise TypeError(f"regime_kwargs must be a dict of VolatilityRegime arguments, "
                            f"got {type(regime_kwargs).__name__}")
        regime_kwargs = dict(regime_kwargs)
        try:  # checked now, even with no stream (or no regime) to make one for
            VolatilityRegime(**regime_kwargs)
        except (TypeError, ValueError) as e:
            raise type(e)(f"regime_kwargs: {e}") from None
        self.engine = engine
        self.config = cfg
        self.generation = 0
        self.trace: list[GenerationRow] = []
        self._keys = engine._stream_keys()
        self._streams = {k: s for s, k in enumerate(self._keys)}
        n = len(self._streams)
        self._seen = [0] * n          # bars of each stream run so far
        self._last = [0] * n          # bar of each stream's last generation
        self._regime = [VolatilityRegime(**regime_kwargs) for _ in range(n)] if regime else None

    def _due(self, s: int, close: float) -> str | None:
        self._seen[s] += 1
        changed = self._regime[s].update(close) if self._regime is not None else False
        since = self._seen[s] - self._last[s]
        if self.every and since >= self.every:
            return "every"
        if changed and since >= max(1, self.config.min_age):
            return "regime"
        return None

    def _mark(self) -> tuple[list[int], list[VolatilityRegime] | None]:
        """What feeding bars to :meth:`_due` changes, to put back when the engine fails to take
        them (a resumed run then counts each bar once)."""
        return list(self._seen), None if self._regime is None else [copy.copy(r) for r in self._regime]

    def run(self, bars: np.ndarray) -> np.ndarray:
        """Like ``engine.run(bars)``, with each due generation applied right after the bar that
        made it due. Returns the signals of all bars (``SIGNAL_DTYPE``).

        Raises
        ------
        InvalidInput
            The engine is strict and the batch has bad bars: nothing is run (as ``engine.run``).
        EvolutionInterrupted
            A failure after the engine took some of the bars; it carries their signals and how
            many rows were taken.
        """
        bars = as_bars(bars)
        # the engine's verdict on each bar now is its verdict when its chunk runs (a generation
        # does not touch ingress), so a strict batch fails whole, before anything runs
        reasons = np.asarray(self.engine.validate(bars))
        if self.engine.strict:
            refuse_bad(reasons)
        out: list[np.ndarray] = []
        start = 0
        inst, tf, close = bars["instrument"].tolist(), bars["timeframe"].tolist(), bars["close"].tolist()
        ok = (reasons == 0).tolist()
        mark = self._mark()

        def stream_of(i: int) -> int | None:  # the stream a good bar of a followed stream feeds
            return self._streams.get((inst[i], tf[i])) if ok[i] else None

        def take(end: int) -> None:
            nonlocal start, mark
            try:
                # strict=False: the batch was refused whole above if it had a bad bar
                out.append(self.engine.run(bars[start:end], strict=False))
            except Exception as exc:
                # the engine took a prefix of the chunk (.taken rows, 0 without it): the count of
                # bars fed is put back to the chunk's start and then moved over that prefix, so a
                # resumed run counts each bar once (no generation falls due inside a chunk: the
                # chunk ends at the bar that made one due, and that one was not taken)
                self._seen, self._regime = mark
                taken = int(getattr(exc, "taken", 0))
                if taken:
                    out.append(exc.signals)
                    for j in range(start, start + taken):
                        if (s := stream_of(j)) is not None:
                            self._due(s, close[j])
                    start, mark = start + taken, self._mark()
                raise
            start, mark = end, self._mark()

        try:
            for i in range(len(bars)):
                s = stream_of(i)
                if s is None:
                    continue
                why = self._due(s, close[i])
                if why is None:
                    continue
                take(i + 1)
                self.evolve(s, why)
            if start < len(bars):
                take(len(bars))
        except Exception as exc:
            if not out:  # the engine took nothing: the error as it is
                raise
            raise EvolutionInterrupted(f"evolution run stopped after {start} of {len(bars)} bars: {exc!r}",
                                       np.concatenate(out), start) from exc
        return np.concatenate(out) if out else np.empty(0, dtype=SIGNAL_DTYPE)

    def evolve(self, stream: int = -1, trigger: str = "manual") -> dict[str, Any]:
        """One generation now, of one stream (index) or all (-1); recorded in :attr:`trace`.

        The generation number (the RNG's second key) moves only when the generation ran: a
        failed one changes nothing."""
        stream = check_int("stream", stream, -1, len(self._keys) - 1)
        cfg = msgspec.structs.replace(self.config, stream=stream)
        rep = self.engine.evolve(cfg, seed=self.seed, generation=self.generation + 1, trigger=trigger)
        self.generation += 1
        streams = range(len(self._streams)) if stream < 0 else (stream,)
        for s in streams:
            self._last[s] = self._seen[s]
        s0 = max(stream, 0)
        self.trace.append(GenerationRow(
            generation=self.generation, stream=int(stream),
            instrument=self._keys[s0][0] if stream >= 0 else -1,
            timeframe=self._keys[s0][1] if stream >= 0 else -1,
            bar=self._seen[s0], trigger=trigger,
            **{k: rep[k] for k in ("judged", "eligible", "replaced", "crossovers", "migrants", "spawns",
                                   "period_moves", "best", "median", "mean")},
            styles=tuple(int(x) for x in rep["styles"])))
        return rep

    def table(self) -> str:
        """The trace as a text table."""
        return format_trace(self.trace)

    def plot(self, path: str | os.PathLike[str], title: str = "evolution trace") -> str:
        """Best, median and mean fitness per generation, a line of each per stream, saved as an
        image in the format of ``path``'s extension (:func:`plot_trace`); returns the path written."""
        return plot_trace(self.trace, path, title)


_STYLES = ("trend", "rsi", "macd", "bb", "mom")


def format_trace(rows: Sequence[GenerationRow]) -> str:
    """Generation, stream, bar, trigger, counts and best/median/mean fitness, one line each."""
    head = (f"{'gen':>4} {'stream':>6} {'bar':>7} {'trigger':>7} {'judged':>7} {'parents':>7} "
            f"{'replaced':>8} {'cross':>5} {'migr':>4} {'spawn':>5} {'best':>9} {'median':>9} {'mean':>9}"
            f"  styles ({'/'.join(_STYLES)})")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.generation:>4} {r.stream:>6} {r.bar:>7} {r.trigger:>7} {r.judged:>7} "
                     f"{r.eligible:>7} {r.replaced:>8} {r.crossovers:>5} {r.migrants:>4} {r.spawns:>5} "
                     f"{r.best:>9.4f} {r.median:>9.4f} {r.mean:>9.4f}  {'/'.join(map(str, r.styles))}")
    return "\n".join(lines)


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plotting the evolution trace needs matplotlib: pip install matplotlib") from None
    return matplotlib


def plot_formats() -> dict[str, str]:
    """``{extension: description}`` of the image formats :func:`plot_trace` can write (those of
    matplotlib's Agg backend). ImportError without matplotlib."""
    _matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    return dict(FigureCanvasAgg.get_supported_filetypes())


def check_plot_path(path: str | os.PathLike[str], what: str = "plot") -> str:
    """The image format of ``path`` by its extension, checked before any work: ValueError
    naming ``what`` for no extension (matplotlib would write PNG to ``path + ".png"``) or a
    format :func:`plot_formats` lacks; ImportError without matplotlib."""
    name = os.fspath(path)
    ext = os.path.splitext(name)[1].lstrip(".").lower()
    formats = plot_formats()
    if not ext:
        raise ValueError(f"{what} {name}: no file extension to tell the image format "
                         f"(one of: {', '.join(sorted(formats))})")
    if ext not in formats:
        raise ValueError(f"{what} {name}: unsupported image format {ext!r} "
                         f"(one of: {', '.join(sorted(formats))})")
    return ext


def _stream_label(row: GenerationRow) -> str:
    """``NAME/timeframe_s`` of a generation's stream (as the replay harness names streams);
    "all streams" for a generation of every stream at once."""
    if row.stream < 0:
        return "all streams"
    from ..instruments import UnknownInstrument, instruments

    try:
        name = instruments.name(row.instrument)
    except UnknownInstrument:  # not registered in this process: say the id
        name = f"instrument {row.instrument}"
    return f"{name}/{row.timeframe}"


def plot_trace(rows: Sequence[GenerationRow], path: str | os.PathLike[str], title: str = "evolution trace") -> str:
    """Best, median and mean fitness per generation, one line of each per stream (a colour per
    stream: generations of different streams are different populations, never joined into one
    line), saved as an image in the format of ``path``'s extension; returns the path written
    (``path + ".png"`` when it has no extension, as matplotlib does). ValueError for a format
    matplotlib cannot write, before drawing anything."""
    name = os.fspath(path)
    if os.path.splitext(name)[1]:
        check_plot_path(name)
    else:
        _matplotlib()
        name += ".png"
    matplotlib = _matplotlib()
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    streams: dict[str, list[GenerationRow]] = {}
    for r in rows:
        streams.setdefault(_stream_label(r), []).append(r)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for k, (label, rs) in enumerate(streams.items()):
        g = [r.generation for r in rs]
        color = f"C{k % 10}"
        prefix = f"{label} " if len(streams) > 1 else ""
        ax.plot(g, [r.best for r in rs], marker="o", color=color, label=f"{prefix}best")
        ax.plot(g, [r.median for r in rs], marker="s", linestyle="--", color=color, label=f"{prefix}median")
        ax.plot(g, [r.mean for r in rs], linestyle=":", color=color, label=f"{prefix}mean")
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness (per-bar Sharpe - penalty x max drawdown)")
    ax.set_title(title if len(streams) != 1 else f"{title} ({next(iter(streams))})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small" if len(streams) > 2 else None)
    fig.tight_layout()
    fig.savefig(name, dpi=110)
    plt.close(fig)
    return name
