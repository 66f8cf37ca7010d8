"""Circuits: activation patterns of a layer that repeat over time, ready to migrate upward.

The design extracts circuits from WaveGen trajectories; here a layer's *activation signature*
per tick is the mean rank activation ``h @ A`` of a slot (one agent's layer, or the population's
mean for a shared layer). Its autocorrelation is the mean cosine similarity between this tick's
signature and the previous ``autocorr_window`` (100) ones (ticks without interaction count as
zero vectors, so an idle pattern fades). Above ``stability_threshold`` (0.7) the slot reports a
circuit: the rank components carrying the signature (``|s_j| >= node_fraction * max|s|``),
a copy of their A columns and B rows, and a signature code (which components, which signs).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...errors import StateError
from . import _state
from .layer import DynamicLoRALayer

__all__ = ["Circuit", "CircuitDetector"]

_NEVER = np.iinfo(np.int64).min // 2
"""``last_tick`` of a slot that never reported (far enough from int64's ends to subtract)."""


@dataclass(slots=True, eq=False)
class Circuit:
    """A stable activation pattern of one slot of one layer.

    Attributes
    ----------
    layer : str
        Source layer.
    slot : int
        Source slot (the agent, for a per-agent layer; 0 for a shared one).
    nodes : tuple[int, ...]
        Rank components that carry the pattern.
    parameter_count : int
        Parameters the pattern occupies: ``len(nodes) * 2 * dim`` (its A columns and B rows).
    autocorr : float
        Mean cosine similarity of the signature with the window: the queue priority.
    criticality : float
        ``autocorr`` times ``min(1, S / sqrt(dim))``, ``S`` the summed strengths of the nodes
        (:meth:`DynamicLoRALayer.component_strength`, how far each moved the layer's map) and
        ``sqrt(dim)`` the norm of the identity path they add to: a stable pattern that rewrites
        the layer about as strongly as the identity is critical. In [0, 1]; above the emergency
        threshold a migration bypasses the bandwidth check.
    activation_signature : int
        Code of the pattern: bit j set when component j is a node, bit ``rank + j`` when it is
        a node with a negative activation. Equal codes are the same circuit.
    a_cols : ndarray (dim, len(nodes))
        The nodes' A columns when detected.
    b_rows : ndarray (len(nodes), dim)
        The nodes' B rows when detected.
    tick : int
        Tick of detection.
    fast_track : bool
        Requested while vertical resonance signalled FAST_TRACK (served first).
    """

    layer: str
    slot: int
    nodes: tuple[int, ...]
    parameter_count: int
    autocorr: float
    criticality: float
    activation_signature: int
    a_cols: np.ndarray = field(repr=False)
    b_rows: np.ndarray = field(repr=False)
    tick: int = 0
    fast_track: bool = False


class CircuitDetector:
    """Finds circuits in the layers it watches, from their per-tick activation signatures.

    Parameters
    ----------
    window : int
        Autocorrelation window in ticks (100).
    stability_threshold : float
        Autocorrelation above which a pattern is a circuit (0.7).
    min_history : int
        Signatures a slot needs before it can report.
    node_fraction : float
        Component share (of the largest) that makes a node.
    cooldown : int
        Ticks before a slot reports again (whatever its pattern: a slot whose pattern keeps
        changing would otherwise flood the queues).
    max_per_tick : int
        Circuits per layer and tick, highest autocorrelation first (ties: lower slot first).
    """

    def __init__(self, window: int = 100, stability_threshold: float = 0.7, *, min_history: int = 10,
                 node_fraction: float = 0.5, cooldown: int = 100, max_per_tick: int = 64) -> None:
        self.window = int(window)
        self.stability_threshold = float(stability_threshold)
        self.min_history = int(min_history)
        self.node_fraction = float(node_fraction)
        self.cooldown = int(cooldown)
        self.max_per_tick = int(max_per_tick)
        self._state: dict[str, dict[str, np.ndarray]] = {}
        self.last_autocorr: dict[str, np.ndarray] = {}

    def _get(self, name: str, slots: int, rank: int) -> dict[str, np.ndarray]:
        st = self._state.get(name)
        if st is None:
            st = {
                # unit signatures, float32: the window is the detector's largest array
                "ring": np.zeros((slots, self.window, rank), np.float32),
                "sum": np.zeros((slots, rank)),
                "pos": np.zeros((), np.int64),
                "count": np.zeros((), np.int64),
                "last_code": np.full(slots, -1, np.int64),
                "last_tick": np.full(slots, _NEVER, np.int64),
            }
            self._state[name] = st
        return st

    def autocorrelation(self, name: str, signatures: np.ndarray) -> np.ndarray:
        """Mean cosine of each slot's signature with its window (0 before any history)."""
        st = self._state.get(name)
        sig = np.asarray(signatures, dtype=np.float64)
        norm = np.linalg.norm(sig, axis=1)
        unit = np.divide(sig, norm[:, None], out=np.zeros_like(sig), where=norm[:, None] > 0)
        if st is None or int(st["count"]) == 0:
            return np.zeros(len(sig))
        return np.einsum("sr,sr->s", unit, st["sum"]) / int(st["count"])

    def observe(self, name: str, layer: DynamicLoRALayer, signatures: np.ndarray, active: np.ndarray,
                tick: int) -> list[Circuit]:
        """Take one tick's signatures of ``layer`` (slots, rank); return the circuits found."""
        slots, rank = signatures.shape
        st = self._get(name, slots, rank)
        count = int(st["count"])
        sig = np.asarray(signatures, dtype=np.float64)
        norm = np.linalg.norm(sig, axis=1)
        unit = np.divide(sig, norm[:, None], out=np.zeros_like(sig), where=norm[:, None] > 0)
        unit32 = unit.astype(np.float32)
        unit = unit32.astype(np.float64)
        ac = np.einsum("sr,sr->s", unit, st["sum"]) / count if count else np.zeros(slots)
        self.last_autocorr[name] = ac
        pos = int(st["pos"])
        ring = st["ring"]
        st["sum"] += unit - ring[:, pos, :]
        ring[:, pos, :] = unit32
        pos = (pos + 1) % self.window
        st["pos"][...] = pos
        st["count"][...] = min(count + 1, self.window)
        if pos == 0:  # refresh the running sum once a lap (rounding drift)
            st["sum"] = ring.sum(axis=1, dtype=np.float64)
        if count < self.min_history:
            return []
        cand = np.flatnonzero(active & (ac > self.stability_threshold) & (norm > 0))
        if cand.size == 0:
            return []
        s = sig[cand]
        mag = np.abs(s)
        nodes = mag >= self.node_fraction * mag.max(axis=1, keepdims=True)
        bits = np.left_shift(np.int64(1), np.arange(rank, dtype=np.int64))
        code = (nodes.astype(np.int64) @ bits) + ((nodes & (s < 0)).astype(np.int64) @ bits) * (1 << rank) \
            if rank <= 31 else _codes_big(nodes, s)
        fresh = tick - st["last_tick"][cand] >= self.cooldown
        cand, code, nodes = cand[fresh], code[fresh], nodes[fresh]
        if cand.size == 0:
            return []
        order = np.lexsort((cand, -ac[cand]))[: self.max_per_tick]
        cand, code, nodes = cand[order], code[order], nodes[order]
        strength = layer.component_strength(cand)  # (k, rank)
        # how far the nodes have rewritten the layer's map, against the identity path (||I|| = sqrt(dim))
        weight = np.minimum((strength * nodes).sum(axis=1) / np.sqrt(layer.dim), 1.0)
        out: list[Circuit] = []
        for i, slot in enumerate(cand.tolist()):
            nd = np.flatnonzero(nodes[i])
            a = float(ac[slot])
            a_cols, b_rows = layer.circuit_factors(slot, nd)
            out.append(Circuit(layer=name, slot=slot, nodes=tuple(nd.tolist()),
                               parameter_count=int(len(nd) * 2 * layer.dim), autocorr=a,
                               criticality=a * float(weight[i]), activation_signature=int(code[i]),
                               a_cols=a_cols, b_rows=b_rows, tick=int(tick)))
        st["last_tick"][cand] = tick
        st["last_code"][cand] = code
        return out

    def copy_slot(self, name: str, src: int, dst: int) -> None:
        """Slot ``dst`` inherits slot ``src``'s signature history."""
        st = self._state.get(name)
        if st is None or src == dst:
            return
        for key in ("ring", "sum", "last_code", "last_tick"):
            st[key][dst] = st[key][src]

    def state(self) -> dict[str, np.ndarray]:
        """Named arrays of every watched layer."""
        return {f"{name}.{k}": np.array(v, copy=True) for name, st in self._state.items() for k, v in st.items()}

    def load_state(self, arrays: Mapping[str, np.ndarray],
                   shapes: Mapping[str, tuple[int, int]] | None = None) -> None:
        """Restore what :meth:`state` gave, checked first (:meth:`check_state`): ``shapes``
        maps each layer it may hold to its (slots, rank); by default each layer's ring says.

        Raises
        ------
        StateError
            A key that is missing or unknown, an array of the wrong dtype or shape, a
            non-finite value or a ring position outside the window; the detector is unchanged.
        """
        if shapes is None:
            shapes = {}
            for key, v in arrays.items():
                name, _, k = key.rpartition(".")
                if k == "ring" and isinstance(v, np.ndarray) and v.ndim == 3:
                    shapes[name] = (v.shape[0], v.shape[2])
        self._restore(self.check_state(arrays, shapes, self.window))

    _KEYS = ("ring", "sum", "pos", "count", "last_code", "last_tick")

    @classmethod
    def check_state(cls, state: Mapping[str, Any], shapes: Mapping[str, tuple[int, int]], window: int,
                    prefix: str = "") -> dict[str, dict[str, np.ndarray]]:
        """The arrays of :meth:`state` (keys ``prefix + "<layer>.<array>"`` of ``state``; other
        keys are ignored) checked for layers of the given (slots, rank) and a detector of that
        ``window``: each layer's six arrays present, of their dtype and shape, finite, positions
        inside the window. Returns them by layer and name (not copied).

        Raises
        ------
        StateError
            Naming the first key that is missing, unknown or does not fit.
        """
        names = set()
        for key in state:
            if key.startswith(prefix):
                name, _, k = key[len(prefix):].rpartition(".")
                if name not in shapes or k not in cls._KEYS:
                    raise StateError(f"{key}: not part of a circuit detector's state")
                names.add(name)
        out = {}
        for name in sorted(names):
            slots, rank = shapes[name]
            p = f"{prefix}{name}."
            out[name] = {
                "ring": _state.real_array(state, p + "ring", (slots, window, rank), np.float32),
                "sum": _state.real_array(state, p + "sum", (slots, rank), np.float64),
                "pos": _state.whole_array(state, p + "pos", (), lo=0, hi=window - 1),
                "count": _state.whole_array(state, p + "count", (), lo=0, hi=window),
                "last_code": _state.whole_array(state, p + "last_code", (slots,)),
                "last_tick": _state.whole_array(state, p + "last_tick", (slots,), lo=_NEVER, hi=-_NEVER),
            }
        return out

    def _restore(self, states: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        """Restore what :meth:`check_state` accepted (copied)."""
        self._state = {name: {k: np.array(v, copy=True) for k, v in st.items()} for name, st in states.items()}


def _codes_big(nodes: np.ndarray, s: np.ndarray) -> np.ndarray:
    # ranks above 31 do not fit two bit fields in an int64: fall back to Python ints folded
    # into 63 bits (still deterministic; only equality matters)
    out = np.empty(len(nodes), np.int64)
    r = nodes.shape[1]
    for i in range(len(nodes)):
        v = 0
        for j in range(r):
            if nodes[i, j]:
                v |= 1 << j
                if s[i, j] < 0:
                    v |= 1 << (r + j)
        out[i] = v % ((1 << 63) - 1)
    return out
