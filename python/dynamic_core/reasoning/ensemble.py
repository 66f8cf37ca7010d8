"""Ensemble reranking, the review queue, persisted adapter weights and the A/B split.

* :func:`rerank` scores the replies of an ensemble (direction agrees with the signal, valid
  structure, a confidence tag, a sensible length), multiplies by the adapter's weight and picks
  one; the number of providers that agree with the signal is reported for guardrails.
* :class:`ReviewQueue` holds conflicting or low-confidence rationales until a person approves
  or rejects them (control plane ``Review``/``ReviewQuery`` or ``dynamic-core review``); each
  decision nudges the answering adapter's weight (x1.1 approve, x0.8 reject, within [0.1, 10]),
  and the weights are written to a JSON file so they survive restarts.
* :class:`ABSplit` routes a fixed fraction of signals (chosen by a hash of the signal id, so the
  same signal always lands in the same arm) to variant B and records each arm's outcomes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from ..errors import ReasoningError
from .prompts import ParsedReply, action_direction

__all__ = ["ABSplit", "Candidate", "Ranked", "ReviewItem", "ReviewQueue", "Weights", "rerank"]

log = logging.getLogger("dynamic_core.reasoning.ensemble")


class Candidate(msgspec.Struct, frozen=True, kw_only=True):
    """One adapter's reply (to an ensemble request, or the one reply of a task)."""

    provider: str
    text: str
    parsed: ParsedReply
    latency_s: float = 0.0
    model_s: float = 0.0


@dataclass(frozen=True)
class Ranked:
    """The reranker's choice."""

    winner: Candidate
    score: float
    scores: tuple[float, ...]
    agreeing: int
    """Replies whose direction matches the signal's."""
    conflict: bool
    """Replies point in different directions."""


def _score(c: Candidate, want: str, weight: float) -> float:
    p = c.parsed
    s = 0.0
    if p.direction == want:
        s += 2.0
    elif p.direction is not None and p.direction != "hold" and want != "hold":
        s -= 1.0  # says the opposite of the signal
    if p.valid:
        s += 1.0
    if p.confidence is not None:
        s += 0.5
    n = len(p.rationale or c.text)
    if 40 <= n <= 800:
        s += 0.5
    elif n < 10:
        s -= 1.0
    return s * weight


def rerank(candidates: Sequence[Candidate], action: int, weights: dict[str, float] | None = None) -> Ranked:
    """Pick the best reply for a signal with ``action`` (-2..2). Ties go to the earlier
    candidate (the routing order)."""
    if not candidates:
        raise ValueError("rerank needs at least one candidate")
    want = action_direction(action)
    w = weights or {}
    scores = tuple(_score(c, want, w.get(c.provider, 1.0)) for c in candidates)
    best = max(range(len(candidates)), key=lambda i: (scores[i], -i))
    dirs = {c.parsed.direction for c in candidates if c.parsed.direction is not None}
    agreeing = sum(1 for c in candidates if c.parsed.direction == want)
    return Ranked(winner=candidates[best], score=scores[best], scores=scores, agreeing=agreeing,
                  conflict=len(dirs) > 1)


class Weights:
    """Per-adapter ensemble weights, persisted as JSON (written atomically) when ``path`` is set.

    A file that cannot be read or is damaged (not JSON, nested too deeply to decode, not an
    object of numbers) is logged and starts over: neutral weights, rewritten by the next
    decision."""

    LO, HI = 0.1, 10.0

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.values: dict[str, float] = {}
        if self.path is not None and self.path.exists():
            try:
                raw = json.loads(self.path.read_text())
                self.values = {str(k): min(self.HI, max(self.LO, float(v))) for k, v in raw.items()}
            except (OSError, ValueError, TypeError, AttributeError, RecursionError) as e:
                # (RecursionError: JSON nested deeper than the decoder recurses)
                log.warning("ensemble weights file %s is damaged (%s); starting over with neutral weights",
                            self.path, type(e).__name__)
                self.values = {}

    def get(self, provider: str) -> float:
        return self.values.get(provider, 1.0)

    def adjust(self, provider: str, factor: float) -> float:
        """Multiply ``provider``'s weight by ``factor`` (within [LO, HI]) and save; the new weight.
        :class:`~dynamic_core.errors.ReasoningError` naming the file when it cannot be written:
        the weight is then unchanged."""
        old = self.values.get(provider)
        v = min(self.HI, max(self.LO, self.get(provider) * factor))
        self.values[provider] = v
        try:
            self.save()
        except OSError as e:
            if old is None:
                del self.values[provider]
            else:
                self.values[provider] = old
            raise ReasoningError(f"ensemble weights file {self.path} cannot be written "
                                 f"({e.strerror or type(e).__name__}); the decision was not applied") from None
        return v

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.values, sort_keys=True, indent=1))
        os.replace(tmp, self.path)


@dataclass
class ReviewItem:
    """A rationale waiting for a person."""

    item: int
    signal_id: str
    instrument: str
    timeframe: int
    provider: str
    text: str
    reason: str
    """``conflict``, ``low_confidence`` or ``disagrees`` (with the signal)."""
    confidence: float | None
    ts: int = field(default_factory=time.time_ns)

    def plain(self) -> dict[str, Any]:
        return {"item": self.item, "signal_id": self.signal_id, "instrument": self.instrument,
                "timeframe": self.timeframe, "provider": self.provider, "text": self.text,
                "reason": self.reason, "confidence": self.confidence, "ts": self.ts}


class ReviewQueue:
    """Bounded FIFO of :class:`ReviewItem`; the oldest is dropped (and counted) when full."""

    APPROVE, REJECT = 1.1, 0.8

    def __init__(self, weights: Weights, capacity: int = 10_000) -> None:
        self.weights = weights
        self.capacity = int(capacity)
        self.items: OrderedDict[int, ReviewItem] = OrderedDict()
        self._next = 1
        self.queued = self.approved = self.rejected = self.dropped = 0

    def add(self, **kw: Any) -> ReviewItem:
        item = ReviewItem(item=self._next, **kw)
        self._next += 1
        self.items[item.item] = item
        self.queued += 1
        while len(self.items) > self.capacity:
            self.items.popitem(last=False)
            self.dropped += 1
        return item

    def list(self, limit: int = 100) -> list[dict[str, Any]]:
        return [it.plain() for _, it in zip(range(limit), self.items.values())]

    def decide(self, item: int, approve: bool) -> dict[str, Any]:
        """Apply a decision; ``KeyError`` for an unknown (or already decided) item. The item
        leaves the queue only once the weights are saved: when they cannot be
        (:class:`~dynamic_core.errors.ReasoningError`), it stays, to be decided again."""
        it = self.items[int(item)]
        w = self.weights.adjust(it.provider, self.APPROVE if approve else self.REJECT)
        del self.items[it.item]
        if approve:
            self.approved += 1
        else:
            self.rejected += 1
        return {"item": it.item, "provider": it.provider, "approved": bool(approve), "weight": w}

    def stats(self) -> dict[str, Any]:
        return {"pending": len(self.items), "queued": self.queued, "approved": self.approved,
                "rejected": self.rejected, "dropped": self.dropped, "weights": dict(self.weights.values)}


class ABSplit:
    """Send ``fraction`` of signals to variant B (``candidates`` replaces the routing rule's).

    Assignment hashes the signal id, so it is stable across runs and processes.
    """

    def __init__(self, fraction: float = 0.0, candidates: Sequence[str] = ()) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError("A/B fraction must be in [0, 1]")
        if fraction > 0 and not candidates:
            raise ValueError("A/B split with a fraction > 0 needs variant B's candidates")
        self.fraction = float(fraction)
        self.candidates = tuple(candidates)
        self._cut = int(self.fraction * 2**64)
        self.outcomes = {arm: {"tasks": 0, "ok": 0, "fallback": 0, "agree": 0, "latency_s": 0.0}
                         for arm in ("A", "B")}

    def arm(self, signal_id: str) -> str:
        if self._cut == 0:
            return "A"
        h = int.from_bytes(hashlib.blake2b(signal_id.encode(), digest_size=8).digest(), "little")
        return "B" if h < self._cut else "A"

    def record(self, arm: str, *, ok: bool, fallback: bool, agree: bool, latency_s: float) -> None:
        o = self.outcomes[arm]
        o["tasks"] += 1
        o["ok"] += int(ok)
        o["fallback"] += int(fallback)
        o["agree"] += int(agree)
        o["latency_s"] += latency_s

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"fraction": self.fraction, "candidates_b": list(self.candidates)}
        for arm, o in self.outcomes.items():
            n = o["tasks"]
            out[arm] = {"tasks": n, "ok": o["ok"], "fallback": o["fallback"],
                        "agree_rate": o["agree"] / n if n else None,
                        "mean_latency_ms": o["latency_s"] / n * 1e3 if n else None}
        return out
