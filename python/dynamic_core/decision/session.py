"""Driving an engine and a decision maker together, one time step at a time, and shadow runs.

:class:`TradingSession` is the loop ``dynamic-core run --paper`` uses and that an embedding
process can copy: for each timestamp, the trader sees the bars first (fills, stops, targets,
marks), then the engine turns them into signals, then the decision maker plans, judges and
orders; credits earned by closed trades go back to the engine between steps (journaled, so a
replay reproduces the signals).

:class:`ShadowSession` runs a candidate configuration beside the live one on the same stream:
both see the same bars and the same signals (the engine is the live one's; the candidate never
feeds credit back), each trades its own paper account, and :class:`ShadowReport` lists where
their verdicts and fills differ.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._checks import is_int
from .maker import DecisionMaker

__all__ = ["RationaleBook", "ShadowReport", "ShadowSession", "TradingSession", "time_steps"]


def time_steps(bars: np.ndarray) -> Iterator[np.ndarray]:
    """Consecutive slices of ``bars`` that share a timestamp (bars must be in time order)."""
    if len(bars) == 0:
        return
    ts = bars["ts"]
    cuts = np.flatnonzero(ts[1:] != ts[:-1]) + 1
    start = 0
    for c in cuts.tolist():
        yield bars[start:c]
        start = c
    yield bars[start:]


def _run_steps(step: Callable[[np.ndarray], np.ndarray], bars: np.ndarray,
               on_step: Callable[[int, np.ndarray], Any] | None) -> None:
    done = 0
    for part in time_steps(bars):
        sig = step(part)
        done += len(part)
        if on_step is not None:
            on_step(done, sig)


class RationaleBook:
    """What the reasoning mesh said about each signal, for the plans made from it.

    Pass :meth:`add` as the mesh's ``on_rationale``; the decision maker's ``rationale`` hook is
    :meth:`get`. Bounded: the oldest entries go first.
    """

    def __init__(self, capacity: int = 100_000) -> None:
        if not is_int(capacity) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        self.capacity = int(capacity)
        self._d: OrderedDict[str, tuple[str, str, int]] = OrderedDict()
        self._cv = threading.Condition()

    def add(self, outcome: Any) -> None:
        u = outcome.update
        with self._cv:
            self._d[u.signal_id] = (u.text, outcome.provider, int(outcome.agreeing))
            while len(self._d) > self.capacity:
                self._d.popitem(last=False)
            self._cv.notify_all()

    def get(self, signal_id: str) -> tuple[str, str, int] | None:
        with self._cv:
            return self._d.get(signal_id)

    def wait_for(self, signal_ids: Iterable[str], timeout: float) -> bool:
        """Wait until every id has a rationale or ``timeout`` seconds pass; True when all came."""
        want = set(signal_ids)
        end = time.monotonic() + timeout
        with self._cv:
            while not want.issubset(self._d.keys()):
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
            return True


class TradingSession:
    """An engine and a decision maker stepped together.

    Parameters
    ----------
    engine : dynamic_core.Engine
    maker : DecisionMaker
    credit : bool
        Feed the credit of closed trades back to the engine's consensus weights.
    mesh : ReasoningMesh, optional
        Signals go to the mesh as soon as they exist (never waiting on it). When the maker's
        limits ask for ``min_providers_agree``, the *decision* on an actionable signal waits for
        its rationale, at most the mesh's deadline plus ``grace`` seconds; one that does not
        come counts as no provider agreeing.
    book : RationaleBook, optional
        Where the mesh's rationales land (required with ``mesh``; the maker's ``rationale``
        hook should read it).
    """

    def __init__(self, engine: Any, maker: DecisionMaker, *, credit: bool = True, mesh: Any = None,
                 book: RationaleBook | None = None, grace: float = 0.5) -> None:
        if mesh is not None and book is None:
            raise ValueError("a mesh needs a RationaleBook for its rationales")
        self.engine = engine
        self.maker = maker
        self.credit = credit
        self.mesh = mesh
        self.book = book
        self.grace = float(grace)
        self.steps = 0
        self.signals = 0
        self.credited = 0
        self.reasoning_waits = 0
        self.reasoning_timeouts = 0
        self.learners: Any = None  # LearningAgents scored before each step's bars go in

    def step(self, bars: np.ndarray) -> np.ndarray:
        """One timestamp's bars through trader, engine and decision maker; returns the signals."""
        self.maker.on_bars(bars)
        if self.credit:
            self.credited += self.maker.credit.apply(self.engine)
        if self.learners is not None:
            self.learners.step(bars, self.engine)
        sig = self.engine.run(bars)
        if self.mesh is not None and len(sig):
            self._reason(sig)
        self.maker.on_signals(sig, agents=self.engine.agents)
        self.steps += 1
        self.signals += len(sig)
        return sig

    def _reason(self, sig: np.ndarray) -> None:
        """Hand the signals to the mesh (selected as the mesh's ``select`` says); with the
        ``min_providers_agree`` guardrail, every signal that may become a plan is sent too and
        the decision waits for those rationales (bounded). A signal never sent, or whose
        rationale is late, counts as no provider agreeing."""
        if not self.maker.governor.limits.min_providers_agree:
            self.mesh.submit_signal_ids(sig)
            return
        cfg = self.maker.plan_config
        act = np.abs(sig["action"]) >= cfg.min_action
        if cfg.min_score > 0.0:
            act |= np.abs(sig["score"]) >= cfg.min_score
        sent = set(self.mesh.submit_signal_ids(sig, force=act))
        rows = np.flatnonzero(act)
        ids = [i for i in (f"{int(sig['population_hash'][r]):016x}:{int(sig['seq'][r])}" for r in rows) if i in sent]
        if not ids:
            return
        self.reasoning_waits += 1
        if not self.book.wait_for(ids, self.mesh.deadline_s + self.grace):
            self.reasoning_timeouts += 1

    def run(self, bars: np.ndarray, on_step: Callable[[int, np.ndarray], Any] | None = None) -> None:
        """All of ``bars`` (time-ordered), one timestamp at a time; ``on_step(n_bars_done,
        signals)`` after each."""
        _run_steps(self.step, bars, on_step)


@dataclass
class ShadowReport:
    """Where a candidate's decisions and paper fills differ from the live configuration's."""

    signals: int = 0
    live_plans: int = 0
    candidate_plans: int = 0
    verdicts_differ: int = 0
    sizes_differ: int = 0
    only_live: int = 0
    only_candidate: int = 0
    fills_differ: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)
    live_pnl: float = 0.0
    candidate_pnl: float = 0.0
    live_trades: int = 0
    candidate_trades: int = 0

    @property
    def differs(self) -> bool:
        return bool(self.verdicts_differ or self.sizes_differ or self.only_live or self.only_candidate
                     or self.fills_differ)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


class ShadowSession:
    """A live and a candidate decision maker on one engine's stream.

    Verdicts are matched by signal id; fills by (instrument, time, side, kind) in order. At most
    ``max_examples`` differences are kept verbatim, every one is counted.
    """

    def __init__(self, engine: Any, live: DecisionMaker, candidate: DecisionMaker, *, credit: bool = True,
                 max_examples: int = 20) -> None:
        self.live = TradingSession(engine, live, credit=credit)
        self.candidate = candidate
        self.report = ShadowReport()
        self.max_examples = int(max_examples)

    @property
    def engine(self) -> Any:
        return self.live.engine

    def step(self, bars: np.ndarray) -> np.ndarray:
        live = self.live.maker
        # running counts, not list lengths: the makers keep a bounded history
        n_live, n_cand = live.decision_count, self.candidate.decision_count
        f_live, f_cand = _n_fills(live.trader), _n_fills(self.candidate.trader)
        self.candidate.on_bars(bars)
        sig = self.live.step(bars)
        self.candidate.on_signals(sig, agents=self.engine.agents)
        self._compare(live.decisions_since(n_live), self.candidate.decisions_since(n_cand),
                      _fills_since(live.trader, f_live), _fills_since(self.candidate.trader, f_cand))
        self.report.signals += len(sig)
        return sig

    def run(self, bars: np.ndarray, on_step: Callable[[int, np.ndarray], Any] | None = None) -> ShadowReport:
        """As :meth:`TradingSession.run`; returns the finished report."""
        _run_steps(self.step, bars, on_step)
        return self.finish()

    def finish(self) -> ShadowReport:
        r = self.report
        live, cand = self.live.maker.stats(), self.candidate.stats()
        r.live_trades, r.candidate_trades = live["trades"], cand["trades"]
        r.live_pnl, r.candidate_pnl = live["pnl"], cand["pnl"]
        return r

    def _example(self, **kw: Any) -> None:
        if len(self.report.examples) < self.max_examples:
            self.report.examples.append(kw)

    def _compare(self, live: list, cand: list, live_fills: list, cand_fills: list) -> None:
        r = self.report
        r.live_plans += len(live)
        r.candidate_plans += len(cand)
        a = {d.plan.signal_id: d for d in live}
        b = {d.plan.signal_id: d for d in cand}
        for sid in sorted(a.keys() | b.keys()):
            x, y = a.get(sid), b.get(sid)
            if y is None:
                r.only_live += 1
                self._example(kind="only_live", signal_id=sid, live=x.verdict, live_size=x.plan.size)
            elif x is None:
                r.only_candidate += 1
                self._example(kind="only_candidate", signal_id=sid, candidate=y.verdict, candidate_size=y.plan.size)
            elif x.verdict != y.verdict:
                r.verdicts_differ += 1
                self._example(kind="verdict", signal_id=sid, live=x.verdict, candidate=y.verdict,
                              live_reasons=list(x.reasons), candidate_reasons=list(y.reasons))
            elif x.verdict != "REJECTED" and x.plan.size != y.plan.size:
                r.sizes_differ += 1
                self._example(kind="size", signal_id=sid, live_size=x.plan.size, candidate_size=y.plan.size)
        fa = Counter(((f.instrument, f.ts, f.side, f.kind), f.lots, f.price) for f in live_fills)
        fb = Counter(((f.instrument, f.ts, f.side, f.kind), f.lots, f.price) for f in cand_fills)
        if fa != fb:
            only_a, only_b = fa - fb, fb - fa
            # fills one side has and the other lacks; a changed fill (other size) counts once
            r.fills_differ += max(sum(only_a.values()), sum(only_b.values()))
            self._example(kind="fills", live=[_fill_text(f) for f in sorted(only_a.elements())][:4],
                          candidate=[_fill_text(f) for f in sorted(only_b.elements())][:4])


def _n_fills(trader: Any) -> int:
    n = getattr(trader, "fill_count", None)
    return n if n is not None else len(trader.fills)


def _fills_since(trader: Any, n: int) -> list:
    since = getattr(trader, "fills_since", None)
    return since(n) if since is not None else trader.fills[n:]


def _fill_text(f: tuple) -> str:
    (inst, _ts, side, kind), lots, price = f
    return f"{inst} {'buy' if side > 0 else 'sell'} {lots:g} @ {price:.6g} ({kind})"
