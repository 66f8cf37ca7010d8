"""The five-layer LoRA hierarchy over a population of agents.

Foundation, domain and swarm are shared (one slot each); agent and context are per agent,
stored stacked (agent axis first) so one batched contraction applies every agent's own
matrices, as multi-LoRA serving batches per adapter. Forward, for x (n_agents, dim)::

    h = base(x)
    for layer in foundation, domain, swarm, agent, context:
        h = h + (h @ A) @ B            # per agent: h[n] @ A[n] @ B[n]
    score = tanh(h @ head)

Inference runs on a :class:`LoRASnapshot` (Variant A: frozen weights, deterministic); learning
accumulates gradients with :meth:`LoRAHierarchy.learn` and applies them in
:meth:`LoRAHierarchy.system_tick`, in the design's order: homeostasis, gradients, vertical
resonance, updates, circuit detection, migration, health.

Choices where the design is loose:

* **Gradients** are of ``0.5 * (score - target)**2``, by analytic backprop in numpy; a shared
  layer takes the mean over the agents that learn in a call (the swarm's weighted by horizontal
  resonance), a per-agent layer each agent's own; several ``learn`` calls in a tick add up.
  Updates add ``-(1 - inertia) * strength * gradient`` (descent).
* **Vertical alignment** compares, for context, agent and swarm, the first-order change each
  layer's update makes to its effective map ``A @ B``: ``dA @ B + A @ dB``, a dim x dim matrix
  (summed over agents for the per-agent layers, over a fixed sample of ``vertical_sample``
  agents beyond that many). Comparing the raw gradients of ``A @ B``
  instead would say little: consecutive residual layers see nearly the same input and output
  gradient, so those are almost always aligned. Resonance factors reach ``update`` as its
  ``strength`` (the same product as scaling the gradient).
* **Circuits** are sought in context, agent, swarm and domain, and each migrates one level up
  its channel (the design's step 5 sends context circuits to agent, swarm or domain by WaveGen
  hit rate, but only adjacent channels exist). A migration blends the circuit into the target
  (:meth:`DynamicLoRALayer.consolidate_circuit`) with weight ``migration_blend`` times the
  transferred fraction, divided by the number of agents when per-agent layers feed a shared
  one (their mean). Circuits requested during a FAST_TRACK tick are served first.
* **Snapshots** share the layers' buffers (O(1)); an update writes into a spare buffer, and any
  in-place edit copies first, whenever a live snapshot still views the buffer.
* **Containment**: a learning row whose input or target is non-finite, or whose forward pass
  overflows (a finite but huge input: the squares behind a layer's RMS activation, or any
  hidden state, stop being finite), is left out of the tick like a masked row and counted
  (``nonfinite`` and ``overflow`` in the tick's report); a slot whose update would still come
  out non-finite keeps its parameters (``rejected_steps``). One such row would otherwise turn
  the interaction density infinite, the learning rate NaN and every weight NaN for good. The
  checks only read: inputs without such rows give the same bits as before them.
* **Sizes** are capped: ``n_agents`` <= ``MAX_AGENTS`` (2**24), ``dim`` <= ``MAX_DIM`` (4096),
  and the per-agent state ``n_agents * (2 * dim * (rank_agent + rank_context) + 2 *
  interaction_window + autocorr_window * (rank_agent + rank_context))`` <=
  ``MAX_STATE_ELEMENTS`` (2**32), checked before anything is allocated (by the constructor and
  by :meth:`LoRAHierarchy.from_state_dict`, which checks every saved array too).

Determinism: the same state and inputs give bit-identical outputs and updates, on any BLAS
thread count and any ``LoRAConfig.threads``, and no product depends on the BLAS or its CPU
kernel: on numpy arrays no product the forward pass, the score or ``learn`` computes goes
through BLAS:

* every row-wise product runs in the native fixed-order kernels, per-agent matrices and shared
  ones alike: a product with a matrix shared by every row (the base map ``x @ W``, the shared
  layers' ``h @ A`` and ``u @ B``, their backward ``g @ B.T`` and ``v @ A.T``, the horizontal
  resonance's ``h @ DA`` and ``u @ DB``) is :func:`~dynamic_core.learning.lora.layer.r_rows`
  (``out[k] = sum_i in[i] M[i, k]``, ``i`` in order), a dot product of a row (the score
  ``hid @ head``, the horizontal resonance's row dot products, the per-agent layers' ``h @ A``)
  is :func:`~dynamic_core.learning.lora.layer.rd_dot` / ``row_dot`` (8 fixed lanes, a fixed tree,
  the tail): a row's bits depend only on that row's inputs and the matrices, not on its
  position, the number of rows or the CPU (a BLAS GEMM's do: blocked kernels with tail paths,
  chosen per CPU);
* every reduction over agents (the shared layers' and the head's gradients, the vertical
  alignment's map changes) goes through :func:`~dynamic_core.learning.lora.layer.xty`: blocks
  of 32 rows, each summed row by row, the block sums added in order, natively;
* the per-agent layers' recording and update run in native kernels whose sums have a fixed
  order and whose threads split agents, never a sum.

The native kernels are built without FMA contraction; their AVX2 build gives the portable
build's bits (an AVX-512 CPU runs the AVX2 build). Other reductions are numpy's own (pairwise
sums, whose order numpy fixes). The transcendental functions (``tanh`` of the score, ``log`` in
the entropy) are :mod:`dynamic_core.detmath`'s on the host, not numpy's (which takes another
code path per CPU), and the base's orthogonal draw is a fixed-order Gram-Schmidt
(:func:`~dynamic_core.learning.lora.backend.orthonormal_columns`), not LAPACK's QR;
``tests/test_cross_machine.py`` checks the bits against another CPU's code paths. A hierarchy
on another array module (CuPy) uses its matmul: deterministic on one device, not bit-identical
to the host.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import msgspec
import numpy as np

from ..._checks import check_int
from ...errors import StateError
from . import _state
from ._xp import errstate, namespace, to_host
from .backend import LoRABackend
from .circuits import Circuit, CircuitDetector
from .config import (
    AGENT_LAYERS,
    CHANNELS,
    LAYERS,
    MAX_AGENTS,
    MAX_DIM,
    MAX_STATE_ELEMENTS,
    SHARED_LAYERS,
    LoRAConfig,
)
from .health import HealthMonitor
from .layer import DynamicLoRALayer, LayerGradient, check_state, det_tanh, r_rows, rd_dot, row_dot, xty
from .migration import MigrationCoordinator, MigrationQueue, _Pending
from .resonance import CONFLICT, FAST_TRACK, NORMAL, HorizontalResonance, ResonanceEngine, VerticalResonance

__all__ = ["LoRAHierarchy", "LoRASnapshot"]


class LoRASnapshot:
    """Frozen view of every layer's A and B (read-only arrays) and the head, for inference.

    ``snap["context"]`` is ``(A, B)``: (n_agents, dim, rank) and (n_agents, rank, dim) for a
    per-agent layer, (dim, rank) and (rank, dim) for a shared one. Later updates never change
    a snapshot.
    """

    __slots__ = ("__weakref__", "_layers", "_xp", "head", "tick")

    def __init__(self, tick: int, head: np.ndarray, xp: Any = None) -> None:
        self.tick = int(tick)
        self._xp = xp = namespace(xp)
        h = xp.array(head, copy=True)
        if xp is np:  # a CuPy array cannot be made read-only: treat a snapshot's as such
            h.flags.writeable = False
        self.head = h
        self._layers: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def layers(self) -> Mapping[str, tuple[np.ndarray, np.ndarray]]:
        """Layer name -> (A, B)."""
        return MappingProxyType(self._layers)

    def __getitem__(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        return self._layers[name]

    def holds(self, buf: np.ndarray) -> bool:
        """Whether this snapshot views ``buf``."""
        if self._xp is not np:
            return any(bool(self._xp.may_share_memory(v, buf)) for pair in self._layers.values() for v in pair)
        return any(v.base is buf for pair in self._layers.values() for v in pair)


def _bool_mask(mask: object, n: int, xp: Any = np) -> np.ndarray:
    """``mask`` as a bool array of shape ``(n,)`` of module ``xp``: bool, or numbers that are
    all 0 or 1. Of any other shape it is refused, not flattened: a (2, 2) mask of 4 agents says
    nothing about which agent each entry means. An array of ``xp`` (a GPU module) is checked
    where it lives (one scalar comes back); anything else on the host, then uploaded."""
    m = mask if (xp is not np and isinstance(mask, xp.ndarray)) else np.asarray(mask)
    if m.shape != (n,):
        raise ValueError(f"mask must have shape (n_agents,) = ({n},), got shape {m.shape}")
    if m.dtype != bool:
        if m.dtype.kind not in "biuf":
            raise ValueError(f"mask must be bool (or numbers that are all 0 or 1), got {m.dtype}")
        if not bool(((m == 0) | (m == 1)).all()):
            raise ValueError("mask must be bool (or numbers that are all 0 or 1): it holds other values")
        m = m.astype(bool)
    return xp.asarray(m)


def _check_size(n_agents: object, dim: object, cfg: LoRAConfig) -> tuple[int, int]:
    """``(n_agents, dim)`` as ints within the caps (TypeError, ValueError), the per-agent state
    they imply included."""
    n = check_int("n_agents", n_agents, 1, MAX_AGENTS)
    d = check_int("dim", dim, 1, MAX_DIM)
    r = cfg.rank("agent") + cfg.rank("context")
    per_agent = 2 * d * r + 2 * cfg.interaction_window + cfg.autocorr_window * r
    if n * per_agent > MAX_STATE_ELEMENTS:
        raise ValueError(f"{n} agents of width {d} need {n * per_agent} elements of per-agent state, more than "
                         f"MAX_STATE_ELEMENTS = {MAX_STATE_ELEMENTS}")
    return n, d


def _finite_rows(hid: np.ndarray, trace: list, s: np.ndarray, xp: Any = np) -> np.ndarray:
    """Rows (n,) whose forward pass stayed finite: the score and the sum of the squares of
    every hidden state, rank activation and increment (the squares behind the layers' RMS
    activations among them). Reads only (call under ``np.errstate``)."""
    acc = row_dot(hid, hid, xp)
    for h, u, d in trace:
        acc += row_dot(h, h, xp)
        acc += row_dot(u, u, xp)
        acc += row_dot(d, d, xp)
    return xp.isfinite(acc) & xp.isfinite(s)


def _head(hid: np.ndarray, head: np.ndarray) -> np.ndarray:
    """``hid @ head`` (n,): each row's dot product with the head in a fixed order (natively on
    numpy arrays: a BLAS GEMV's bits depend on the row's position and the CPU)."""
    return rd_dot(hid, head[None, :])[:, 0]


def _unit_pair(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = math.sqrt(float((x * x).sum()) + float((y * y).sum()))
    return (x / n, y / n) if n > 0 else (x, y)


def _real(a: Any, what: str, xp: Any = np) -> np.ndarray:
    """``a`` as an array of real numbers (bool, integer or float), else TypeError: strings were
    parsed as numbers, objects became NaN and complex values lost their imaginary part. An
    array of ``xp`` (a GPU module) stays where it is; anything else becomes a numpy array."""
    arr = a if (xp is not np and isinstance(a, xp.ndarray)) else np.asarray(a)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{what} must hold real numbers, got dtype {arr.dtype}")
    return arr

class LoRAHierarchy:
    """DynamicLoRA over ``n_agents`` agents of width ``dim``.

    Parameters
    ----------
    n_agents : int
        Agents (slots of the agent and context layers), in [1, 2**24].
    dim : int
        Width of inputs and hidden states, in [1, 4096]. Together they bound the per-agent
        state (see the module's note on sizes): ValueError beyond it.
    config : LoRAConfig, optional
        Every knob (defaults: the design's values).
    backend : LoRABackend, optional
        Frozen base and head (default: an orthogonal linear map and a N(0, 1/dim) head drawn
        from ``seed``).
    seed : int
        Seeds the initial A of every layer (and the default backend).
    dtype : numpy dtype
        float64 (default) or float32 for parameters and activations.
    xp : "numpy", "cupy" or an array module, optional
        Where every array lives: numpy (default; the native kernels, bit-identical on any
        thread count) or CuPy (the current GPU: the same formulas as CuPy operations, see
        :mod:`dynamic_core.learning.lora._xp`). Inputs may be numpy arrays either way (they are
        uploaded); scores, hidden states, gradients and the layers' arrays are arrays of that
        module; ``state_dict`` and circuits are numpy.
    """

    def __init__(self, n_agents: int, dim: int, *, config: LoRAConfig | None = None,
                 backend: LoRABackend | None = None, seed: int = 0, dtype: Any = np.float64,
                 xp: Any = None) -> None:
        cfg = config if config is not None else LoRAConfig()
        if not isinstance(cfg, LoRAConfig):
            raise TypeError(f"config must be a LoRAConfig, got {type(cfg).__name__}")
        self.config = cfg
        self.n_agents, self.dim = _check_size(n_agents, dim, cfg)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError("dtype must be float32 or float64")
        self.seed = check_int("seed", seed, 0, (1 << 64) - 1)  # what numpy's generators take
        self.xp = xp = namespace(xp)
        rng = np.random.default_rng(self.seed)
        self.layers: dict[str, DynamicLoRALayer] = {}
        for name in LAYERS:
            slots = 1 if name in SHARED_LAYERS else self.n_agents
            self.layers[name] = DynamicLoRALayer(self.dim, cfg.rank(name), cfg.inertia(name), slots=slots, config=cfg,
                                                 rng=rng, dtype=self.dtype, name=name, xp=xp)
        self.backend = (backend if backend is not None else LoRABackend()).bind(self.dim, seed=self.seed,
                                                                                 dtype=self.dtype)
        self.head = xp.array(self.backend.head, dtype=self.dtype)
        self.circuit_detector = CircuitDetector(cfg.autocorr_window, cfg.stability_threshold,
                                                min_history=cfg.min_history, node_fraction=cfg.node_fraction,
                                                cooldown=cfg.circuit_cooldown, max_per_tick=cfg.max_circuits_per_tick)
        self.resonance_engine = ResonanceEngine(
            HorizontalResonance(cfg.horizontal_alpha, cfg.horizontal_beta),
            VerticalResonance(cfg.vertical_gamma, cfg.vertical_delta, cfg.max_amplification,
                              vertical_threshold=cfg.vertical_threshold, conflict_threshold=cfg.conflict_threshold),
            window=cfg.resonance_window)
        queues = {}
        for (src, dst), bw in zip(CHANNELS, cfg.bandwidth):
            q = MigrationQueue(src, dst, bw, total_params=self.layers[src].total_params,
                               execute=self._executor(src, dst), restore_rate=cfg.restore_rate,
                               emergency_threshold=cfg.emergency_threshold, max_pending=cfg.max_pending)
            queues[q.key] = q
        self.migration_coordinator = MigrationCoordinator(queues)
        self.health_monitor = HealthMonitor(cfg)
        self.tick = 0
        k = cfg.vertical_sample
        self._vsample = None if k == 0 or k >= self.n_agents else xp.asarray(
            np.linspace(0, self.n_agents - 1, k).astype(np.int64))
        self._reset_grads()

    # ------------------------------------------------------------------ inference
    def snapshot(self) -> LoRASnapshot:
        """Frozen view of the current weights (O(1): buffers are shared copy-on-write)."""
        snap = LoRASnapshot(self.tick, self.head, self.xp)
        for name, layer in self.layers.items():
            A, B = layer.export(snap)
            snap._layers[name] = (A[0], B[0]) if name in SHARED_LAYERS else (A, B)
        return snap

    def _weights(self, snap: LoRASnapshot | None) -> tuple[Mapping[str, tuple[np.ndarray, np.ndarray]], np.ndarray]:
        live = {n: ((L.A[0], L.B[0]) if n in SHARED_LAYERS else (L.A, L.B)) for n, L in self.layers.items()}
        if snap is None:
            return live, self.head
        if not isinstance(snap, LoRASnapshot):
            raise TypeError(f"snapshot must be a LoRASnapshot (from .snapshot()), got {type(snap).__name__}")
        if snap._xp is not self.xp:
            raise ValueError(f"snapshot does not fit this hierarchy: its arrays are {getattr(snap._xp, '__name__', '?')}'s, "
                             f"this hierarchy's are {getattr(self.xp, '__name__', '?')}'s (it was taken from another one)")
        if snap.head.shape != self.head.shape or any(
                snap[n][0].shape != A.shape or snap[n][1].shape != B.shape for n, (A, B) in live.items()):
            raise ValueError(f"snapshot does not fit this hierarchy (n_agents={self.n_agents}, dim={self.dim}, "
                             f"ranks {[self.config.rank(n) for n in LAYERS]}): it was taken from another one")
        return snap.layers, snap.head

    def _check_x(self, x: np.ndarray) -> np.ndarray:
        xp = self.xp
        x = xp.ascontiguousarray(xp.asarray(_real(x, "x", xp), dtype=self.dtype))
        if x.shape != (self.n_agents, self.dim):
            raise ValueError(f"x must be (n_agents, dim) = {(self.n_agents, self.dim)}, got {x.shape}")
        return x

    def _run(self, x: np.ndarray, weights: Mapping[str, tuple[np.ndarray, np.ndarray]], keep: bool):
        th = self.config.threads
        h = self.backend.base(x, self.xp)
        trace = []
        for name in LAYERS:
            A, B = weights[name]
            if A.ndim == 2:  # one (d, r) A and (r, d) B for every row
                u = r_rows(h, A, th)
                d = r_rows(u, B, th)
            else:
                u = rd_dot(h, A.transpose(0, 2, 1), th)  # the layer's rank-major buffer
                d = r_rows(u, B, th)
            if keep:
                trace.append((h, u, d))
            h = h + d
        return h, trace

    def forward(self, x: np.ndarray, snapshot: LoRASnapshot | None = None) -> np.ndarray:
        """Hidden state (n_agents, dim): the base, then the five layers in order, each
        ``h <- h + (h @ A) @ B`` (agent and context with each agent's own matrices). Pure: uses
        ``snapshot`` (the live weights when None) and records nothing."""
        weights, _ = self._weights(snapshot)
        return self._run(self._check_x(x), weights, False)[0]

    def score(self, x: np.ndarray, snapshot: LoRASnapshot | None = None) -> np.ndarray:
        """``tanh(forward(x) @ head)`` per agent, in (-1, 1)."""
        weights, head = self._weights(snapshot)
        return det_tanh(_head(self._run(self._check_x(x), weights, False)[0], head), self.xp)

    # ------------------------------------------------------------------ learning
    def _reset_grads(self) -> None:
        d = self.dim
        xp = self.xp
        self._g_shared = {n: [xp.zeros((d, self.config.rank(n)), self.dtype),
                              xp.zeros((self.config.rank(n), d), self.dtype)] for n in SHARED_LAYERS}
        self._g_terms: dict[str, tuple[list, list]] = {n: ([], []) for n in AGENT_LAYERS}
        self._dW = {n: xp.zeros((d, d)) for n in AGENT_LAYERS}
        self._g_head = xp.zeros(d)
        self._calls = 0
        self._loss_sum = 0.0
        self._learners = 0
        self._nonfinite = 0
        self._overflow = 0
        self._h_align: list[float] = []

    def learn(self, x: np.ndarray, target: np.ndarray, snapshot: LoRASnapshot | None = None,
              mask: np.ndarray | None = None) -> float:
        """Accumulate this tick's gradients of ``0.5 * (score - target)**2`` wrt every layer's
        A and B (applied by the next :meth:`system_tick`).

        Parameters
        ----------
        x : ndarray (n_agents, dim)
            Inputs.
        target : ndarray (n_agents,)
            Targets in [-1, 1] (a finite target outside is a ValueError). Exactly this shape:
            another one is a ValueError even when its size matches (nothing is flattened).
        snapshot : LoRASnapshot, optional
            The weights that scored ``x`` (the live weights when None).
        mask : ndarray (n_agents,) bool, optional
            Agents that learn this call (default all); bool, or numbers that are all 0 or 1, of
            exactly this shape (ValueError otherwise). Rows with a non-finite input or target
            are left out and counted (``nonfinite`` in the tick's report), and so are rows whose
            forward pass overflows (``overflow``): a finite input so large that a hidden state,
            a rank activation or the sum of squares behind its RMS is no longer finite.

        Returns
        -------
        float
            Mean loss over the agents that learned (NaN when none did).
        """
        xp = self.xp
        x = self._check_x(x)
        t = xp.asarray(_real(target, "target", xp), dtype=self.dtype)
        if t.shape != (self.n_agents,):  # not flattened: a (2, 2) target of 4 agents is a mistake
            raise ValueError(f"target must have shape (n_agents,) = ({self.n_agents},), got shape {t.shape}")
        m = xp.ones(self.n_agents, bool) if mask is None else _bool_mask(mask, self.n_agents, xp)
        finite = xp.isfinite(x).all(axis=1) & xp.isfinite(t)
        wild = m & finite & (xp.abs(xp.where(finite, t, 0)) > 1.0)  # rows that do not learn are not read
        if bool(wild.any()):
            i = int(xp.flatnonzero(wild)[0])
            raise ValueError(f"target must be in [-1, 1]: {int(wild.sum())} rows outside, first row {i} = {float(t[i])!r}")
        weights, head = self._weights(snapshot)  # checked before the count below moves
        self._nonfinite += int(xp.count_nonzero(m & ~finite))
        m = m & finite
        k = int(xp.count_nonzero(m))
        if k == 0:
            return math.nan
        while True:
            if not bool(m.all()):  # rows that do not learn must not carry NaN (or an overflow) into the sums
                x = xp.where(m[:, None], x, 0).astype(self.dtype)
                t = xp.where(m, t, 0).astype(self.dtype)
            with errstate(xp, over="ignore", invalid="ignore"):
                hid, trace = self._run(x, weights, True)
                s = det_tanh(_head(hid, head), xp)
                blown = m & ~_finite_rows(hid, trace, s, xp)
            if not bool(blown.any()):
                break
            # left out like a masked row, and the pass run again without it (rows are independent:
            # the others' values do not change)
            self._overflow += int(xp.count_nonzero(blown))
            m = m & ~blown
            k = int(xp.count_nonzero(m))
            if k == 0:
                return math.nan
        for name, (h, u, d) in zip(LAYERS, trace):
            self.layers[name].record_interaction(h, u, d, m)
        err = (s - t) * m
        e = err * (1 - s * s)
        loss = 0.5 * float((err * err).sum())  # numpy's fixed-order sum, not a BLAS dot
        self._loss_sum += loss
        self._learners += k
        self._calls += 1
        th = self.config.threads
        if self.config.head_learning_rate > 0.0:
            self._g_head += xty(e[:, None], hid, th)[0] / k
        g = e[:, None] * head[None, :]  # dL/dhidden
        inv_k = self.dtype.type(1.0 / k)
        for name, (h, u, _) in zip(reversed(LAYERS), reversed(trace)):
            A, B = weights[name]
            if A.ndim == 2:
                v = r_rows(g, B.T, th)
                w = xp.full(self.n_agents, inv_k, self.dtype)
                if name == "swarm":
                    w = w * self._horizontal(h, u, v, g, m, inv_k).astype(self.dtype)
                hw = h * w[:, None]
                uw = u * w[:, None]
                gacc = self._g_shared[name]
                gacc[0] += xty(hw, v, th)
                gacc[1] += xty(uw, g, th)
                g_prev = g + r_rows(v, A.T, th)
            else:
                At = A.transpose(0, 2, 1)
                v = rd_dot(g, B, th)
                ta, tb = self._g_terms[name]
                ta.append((h, v))
                tb.append((u, g))
                # first-order change of each (sampled) agent's A @ B, summed: h (x) (v B) + (A u) (x) g
                sm = self._vsample
                if sm is None:
                    self._dW[name] += xty(h, r_rows(v, B, th), th) + xty(r_rows(u, At, th), g, th)
                else:
                    self._dW[name] += (xty(h[sm], r_rows(v[sm], B[sm], th), th)
                                       + xty(r_rows(u[sm], At[sm], th), g[sm], th))
                g_prev = g + r_rows(v, At, th)
            g = g_prev
        return loss / k

    def _horizontal(self, h: np.ndarray, u: np.ndarray, v: np.ndarray, g: np.ndarray, m: np.ndarray,
                    inv_k: Any) -> np.ndarray:
        """Per-agent horizontal factors of the swarm contributions ``(h (x) v, u (x) g)``."""
        hr = self.resonance_engine.horizontal
        xp = self.xp
        th = self.config.threads
        if hr.current_direction is None:  # kept on the host (small; saved by state_dict)
            hr.current_direction = tuple(to_host(xp, a) for a in _unit_pair(xty(h * inv_k, v, th),
                                                                              xty(u * inv_k, g, th)))
        DA, DB = (xp.asarray(a) for a in hr.current_direction)
        dot = row_dot(r_rows(h, DA, th), v, xp) + row_dot(r_rows(u, DB, th), g, xp)
        norm = xp.sqrt(row_dot(h, h, xp) * row_dot(v, v, xp) + row_dot(u, u, xp) * row_dot(g, g, xp))
        pos = norm > 0
        a = xp.where(pos, dot / xp.where(pos, norm, 1.0), 0.0)
        a = xp.clip(a, -1.0, 1.0)
        if bool(m.any()):
            self._h_align.append(float(a[m].mean()))
        return hr.factor(a, xp)

    def gradients(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The loss gradients accumulated since the last tick, dense: (dA, dB) per layer,
        shaped like the layer's arrays (shared: (1, d, r) and (1, r, d))."""
        out = {}
        for name, layer in self.layers.items():
            if name in SHARED_LAYERS:
                gA, gB = self._g_shared[name]
                out[name] = (gA[None].copy(), gB[None].copy())
            else:
                ta, tb = self._g_terms[name]
                out[name] = LayerGradient(terms_A=ta, terms_B=tb).dense(layer.slots, self.dim, layer.rank, self.dtype,
                                                                        self.xp)
        return out

    def _descent(self) -> dict[str, LayerGradient | None]:
        if self._calls == 0:
            return {n: None for n in LAYERS}
        out: dict[str, LayerGradient | None] = {}
        for name in SHARED_LAYERS:
            gA, gB = self._g_shared[name]
            out[name] = LayerGradient(-gA, -gB)
        for name in AGENT_LAYERS:
            ta, tb = self._g_terms[name]
            out[name] = LayerGradient(terms_A=[(-L, R) for L, R in ta], terms_B=[(-L, R) for L, R in tb])
        return out

    # ------------------------------------------------------------------ the tick
    def system_tick(self) -> dict[str, Any]:
        """Apply the tick in the design's order: homeostasis, gradients, vertical resonance,
        updates, circuit detection, migration, health.

        Returns
        -------
        dict
            ``tick``, ``signal`` (FAST_TRACK / CONFLICT / NORMAL), ``alignment`` (None without
            gradients), ``factors``, ``learning_rate`` (mean per layer), ``loss`` (mean over this
            tick's learners, None without), ``learners``, ``nonfinite`` (learning rows left out
            for a non-finite input or target), ``overflow`` (left out for a forward pass that
            overflowed), ``rejected_steps`` (per layer, slots whose update came out non-finite
            and were kept as they were; ``head`` for the head), ``dropped_interactions`` (per
            layer, slots whose recorded activations were non-finite and were discarded),
            ``circuits`` (found per source layer), ``migrations`` (per channel: executed,
            emergency, queued depth) and ``health`` (see :meth:`HealthMonitor.overall_health`).
        """
        cfg = self.config
        xp = self.xp
        # 1. homeostasis first
        for layer in self.layers.values():
            layer.maintain_homeostasis()
        # 2. gradients (accumulated by learn) and this tick's interactions
        dropped0 = {name: layer.dropped_interactions for name, layer in self.layers.items()}
        sigs = {name: layer.end_interactions() for name, layer in self.layers.items()}
        grads = self._descent()
        # 3. vertical resonance
        vr = self.resonance_engine.vertical
        alignment: float | None = None
        factors = {"context": 1.0, "agent": 1.0, "swarm": 1.0}
        signal = NORMAL
        if self._calls:
            sw = self.layers["swarm"]
            gA, gB = self._g_shared["swarm"]
            # gA B + A gB, row by row in a fixed order (B and gB shared by every row)
            dW = {"context": self._dW["context"], "agent": self._dW["agent"],
                  "swarm": r_rows(gA.astype(np.float64), sw.B[0]) + r_rows(sw.A[0], gB.astype(np.float64))}
            alignment = vr.alignment({k: to_host(xp, w) for k, w in dW.items()})  # dim x dim each
            factors, signal = vr.factors(alignment)
            self.resonance_engine.record(alignment, signal)
            self.resonance_engine.horizontal.update_direction((to_host(xp, gA), to_host(xp, gB)),
                                                              cfg.direction_decay)
        # 4. updates
        lrs = {}
        rejected: dict[str, int] = {}
        for name, layer in self.layers.items():
            lr = layer.update(grads[name], cfg.step_size * factors.get(name, 1.0))
            lrs[name] = float(lr.mean())
            rejected[name] = layer.last_rejected
        rejected["head"] = 0
        if self._calls and cfg.head_learning_rate > 0.0:
            with errstate(xp, over="ignore", invalid="ignore"):
                head = (self.head - cfg.head_learning_rate * self._g_head).astype(self.dtype)
            if bool(xp.isfinite(head).all()):
                self.head = head
            else:  # kept, like a layer's slot
                rejected["head"] = 1
        # 5. circuit detection: each source layer's circuits go one channel up
        fast = signal == FAST_TRACK
        found = {}
        for src, dst in CHANNELS:
            sig, active = sigs[src]  # to the host: the detector's history lives there
            circuits = self.circuit_detector.observe(src, self.layers[src], to_host(xp, sig), to_host(xp, active),
                                                     self.tick)
            for c in circuits:
                c.fast_track = fast
                self.migration_coordinator.migrate_circuit(c, src, dst)
            self.resonance_engine.record_migrations(len(circuits), fast)
            found[src] = len(circuits)
        # 6. migration queues
        transfers = self.migration_coordinator.tick_all()
        # 7. health
        health = self.health_monitor.overall_health(self)
        report = {
            "tick": self.tick,
            "signal": signal,
            "alignment": alignment,
            "factors": factors,
            "learning_rate": lrs,
            "loss": self._loss_sum / self._learners if self._learners else None,
            "learners": self._learners,
            "nonfinite": self._nonfinite,
            "overflow": self._overflow,
            "rejected_steps": rejected,
            "dropped_interactions": {name: layer.dropped_interactions - dropped0[name]
                                     for name, layer in self.layers.items()},
            "horizontal_alignment": float(np.mean(self._h_align)) if self._h_align else None,
            "circuits": found,
            "migrations": {k: {"executed": sum(1 for t in v if t.kind != "emergency"),
                               "emergency": sum(1 for t in v if t.kind == "emergency"),
                               "queued": len(self.migration_coordinator.queues[k].pending)}
                           for k, v in transfers.items()},
            "health": health,
        }
        self.tick += 1
        self._reset_grads()
        return report

    def _executor(self, src: str, dst: str):
        per_agent_to_shared = src in AGENT_LAYERS and dst in SHARED_LAYERS

        def execute(circuit: Circuit, fraction: float) -> None:
            # a slice moves its fraction of the blend; one of n agents feeding a shared layer
            # moves 1/n of it (their mean), and pins for as long (n of them pin one full term)
            share = fraction / self.n_agents if per_agent_to_shared else fraction
            slot = circuit.slot if dst in AGENT_LAYERS else 0
            self.layers[dst].consolidate_circuit(circuit, slot=slot, weight=self.config.migration_blend * share,
                                                 pin_ticks=self.config.consolidation_ticks * share)

        return execute

    # ------------------------------------------------------------------ population
    def copy_agent(self, src: int, dst: int) -> None:
        """Agent ``dst`` takes agent ``src``'s agent and context layers (A, B, initial values,
        phases, traces, thresholds, interaction history, signature history). ``dst``'s
        not-yet-applied gradient and its pending migrations are discarded (its share of this
        tick's vertical-alignment sums, a statistic, stays)."""
        for i in (src, dst):
            if not 0 <= i < self.n_agents:
                raise IndexError(f"agent {i} out of range [0, {self.n_agents})")
        if src == dst:
            return
        for name in AGENT_LAYERS:
            self.layers[name].copy_slot(src, dst)
            self.circuit_detector.copy_slot(name, src, dst)
            ta, tb = self._g_terms[name]
            for terms in (ta, tb):
                for i, (L, R) in enumerate(terms):
                    L2 = L.copy()
                    L2[dst] = 0
                    terms[i] = (L2, R)
        for q in self.migration_coordinator.queues.values():
            if q.from_layer in AGENT_LAYERS:
                q.purge(lambda c: c.slot == dst)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Everything as numpy arrays (and the config as a JSON string under ``"config"``):
        ``np.savez(path, **h.state_dict())`` saves it. Taken between ticks: raises ValueError
        when gradients from ``learn`` await a ``system_tick``."""
        if self._calls:
            raise ValueError("learn() was called since the last system_tick(): tick first, then save")
        sd: dict[str, Any] = {
            "config": msgspec.json.encode(self.config).decode(),
            "n_agents": np.array(self.n_agents), "dim": np.array(self.dim), "dtype": np.array(self.dtype.str),
            "seed": np.array(self.seed, dtype=np.uint64), "tick": np.array(self.tick),
            "head": np.array(to_host(self.xp, self.head), copy=True),
            "backend.head": np.array(self.backend.head),
        }
        if self.backend.weight is not None:
            sd["backend.weight"] = np.array(self.backend.weight)
        for name, layer in self.layers.items():
            for k, v in layer.state().items():
                sd[f"layer.{name}.{k}"] = v
        for k, v in self.circuit_detector.state().items():
            sd[f"detector.{k}"] = v
        re = self.resonance_engine
        if re.horizontal.current_direction is not None:
            sd["resonance.direction_A"], sd["resonance.direction_B"] = (np.array(x) for x in
                                                                        re.horizontal.current_direction)
        sd["resonance.alignments"] = np.array(list(re.alignments), dtype=np.float64)
        sd["resonance.counters"] = np.array([re.fast_track_count, re.total_migrations, re.conflict_count,
                                             re.fast_track_ticks, re.total_operations], np.int64)
        sd["resonance.last_signal"] = np.array(re.last_signal)
        for key, q in self.migration_coordinator.queues.items():
            p = f"migration.{key}."
            sd[p + "counters"] = np.array([q.now, q._seq, q.total_requests, q.rejections, q.emergencies, q.dropped,
                                           q.completed, q.wait_sum], np.int64)
            sd[p + "floats"] = np.array([q.current_transfer, q.transferred, q.emergency_transfer])
            sd.update({p + k: v for k, v in _pending_arrays(q, self.layers[q.from_layer]).items()})
        return sd

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], *, backend: LoRABackend | None = None,
                        xp: Any = None) -> LoRAHierarchy:
        """Rebuild a hierarchy from :meth:`state_dict` (or an ``np.load`` of its ``savez``),
        its arrays in ``xp`` (see the constructor: a state saved from either module loads into
        either). A backend built on a callable is not saved: pass it again as ``backend``.

        Raises
        ------
        StateError
            (a ValueError) Before anything is allocated from ``state``: a missing or unknown
            key, an array of the wrong dtype or shape (shapes follow from the saved config,
            ``n_agents`` and ``dim``), a non-finite or out-of-range value, a config that does
            not validate, or sizes beyond the caps (see the module's note on sizes).
        """
        v = _check_saved(state, need_backend=backend is None)
        cfg: LoRAConfig = v["config"]
        if backend is None:
            backend = LoRABackend(v["backend.weight"], v["backend.head"])
        h = cls(v["n_agents"], v["dim"], config=cfg, backend=backend, seed=v["seed"], dtype=v["dtype"], xp=xp)
        h.tick = v["tick"]
        h.head = h.xp.array(v["head"], dtype=h.dtype)
        for name, layer in h.layers.items():
            layer._restore(v[f"layer.{name}"])
        h.circuit_detector._restore(v["detector"])
        re = h.resonance_engine
        if "resonance.direction_A" in v:
            re.horizontal.current_direction = (np.array(v["resonance.direction_A"]),
                                               np.array(v["resonance.direction_B"]))
        re.alignments.extend(v["resonance.alignments"].tolist())
        (re.fast_track_count, re.total_migrations, re.conflict_count, re.fast_track_ticks,
         re.total_operations) = (int(x) for x in v["resonance.counters"])
        re.last_signal = v["resonance.last_signal"]
        for key, q in h.migration_coordinator.queues.items():
            p = f"migration.{key}."
            (q.now, q._seq, q.total_requests, q.rejections, q.emergencies, q.dropped, q.completed,
             q.wait_sum) = (int(x) for x in v[p + "counters"])
            q.current_transfer, q.transferred, q.emergency_transfer = (float(x) for x in v[p + "floats"])
            q.pending = _pending_from(q.from_layer, {k: v[p + k] for k in _PENDING_KEYS})
        return h


_COUNT_MAX = 1 << 62  # saved counters and ticks: far from int64's wrap


def _check_saved(state: Mapping[str, Any], *, need_backend: bool) -> dict[str, Any]:
    """Every entry of a saved hierarchy, checked (StateError naming the key) without allocating
    anything from it: the config first (it fixes the shapes), then the sizes against the caps,
    then each array's dtype, shape, finiteness and range. Returns the values to restore."""
    if not isinstance(state, Mapping):
        raise StateError(f"a saved state is a mapping of names to arrays, got {type(state).__name__}")
    try:
        cfg = msgspec.json.decode(_state.string(state, "config"), type=LoRAConfig)
    except (msgspec.DecodeError, TypeError, ValueError) as e:
        raise StateError(f"config: {e}") from None
    v: dict[str, Any] = {"config": cfg}
    n = _state.integer(state, "n_agents", 1, MAX_AGENTS)
    d = _state.integer(state, "dim", 1, MAX_DIM)
    try:
        _check_size(n, d, cfg)
    except ValueError as e:
        raise StateError(str(e)) from None
    dtype = np.dtype(_state.string(state, "dtype", 8, (np.dtype(np.float64).str, np.dtype(np.float32).str)))
    v.update(n_agents=n, dim=d, dtype=dtype, seed=_state.integer(state, "seed", 0, (1 << 64) - 1),
             tick=_state.integer(state, "tick", 0, _COUNT_MAX))
    known = set(v)
    for key in ("head", "backend.head"):
        v[key] = _state.real_array(state, key, (d,), dtype)
    if "backend.weight" in state:
        v["backend.weight"] = _state.real_array(state, "backend.weight", (d, d), dtype)
    elif need_backend:
        raise StateError("backend.weight: missing: the saved backend wraps a callable, pass "
                         "backend=LoRABackend(fn=...)")
    for name in LAYERS:
        slots = 1 if name in SHARED_LAYERS else n
        v[f"layer.{name}"] = check_state(state, f"layer.{name}.", slots, d, cfg.rank(name), cfg, dtype)
    known |= {"head", "backend.head", "backend.weight"}
    known |= {f"layer.{name}.{k}" for name in LAYERS for k in v[f"layer.{name}"]}
    shapes = {src: (1 if src in SHARED_LAYERS else n, cfg.rank(src)) for src, _ in CHANNELS}
    v["detector"] = CircuitDetector.check_state(state, shapes, cfg.autocorr_window, prefix="detector.")
    known |= {k for k in state if k.startswith("detector.")}
    rs = cfg.rank("swarm")
    if "resonance.direction_A" in state or "resonance.direction_B" in state:
        for key, shape in (("resonance.direction_A", (d, rs)), ("resonance.direction_B", (rs, d))):
            a = _state.get(state, key)
            dt = np.float32 if isinstance(a, np.ndarray) and a.dtype == np.float32 else np.float64
            v[key] = _state.real_array(state, key, shape, dt)
            known.add(key)
    v["resonance.alignments"] = _state.real_array(state, "resonance.alignments", (None,), np.float64, lo=-1.0, hi=1.0)
    if len(v["resonance.alignments"]) > cfg.resonance_window:
        raise StateError(f"resonance.alignments: more than resonance_window = {cfg.resonance_window} values")
    v["resonance.counters"] = _state.whole_array(state, "resonance.counters", (5,), lo=0, hi=_COUNT_MAX)
    v["resonance.last_signal"] = _state.string(state, "resonance.last_signal", 16, (FAST_TRACK, CONFLICT, NORMAL))
    known |= {"resonance.alignments", "resonance.counters", "resonance.last_signal"}
    for src, dst in CHANNELS:
        p = f"migration.{src}->{dst}."
        v[p + "counters"] = _state.whole_array(state, p + "counters", (8,), lo=0, hi=_COUNT_MAX)
        v[p + "floats"] = _state.real_array(state, p + "floats", (3,), np.float64, lo=0.0)
        slots = 1 if src in SHARED_LAYERS else n
        v.update({p + k: a for k, a in _check_pending(state, p, slots, d, cfg.rank(src), cfg, dtype).items()})
        known |= {p + "counters", p + "floats"} | {p + k for k in _PENDING_KEYS}
    unknown = sorted(k for k in state if k not in known)
    if unknown:
        raise StateError(f"{unknown[0]}: not part of a saved hierarchy ({len(unknown)} such keys)")
    return v


_PENDING_KEYS = ("pending.nodes", "pending.a", "pending.b", "pending.ints", "pending.floats")


def _check_pending(state: Mapping[str, Any], p: str, slots: int, d: int, r: int, cfg: LoRAConfig,
                   dtype: np.dtype) -> dict[str, np.ndarray]:
    """A channel's saved queue (see :func:`_pending_arrays`), checked; keyed without ``p``."""
    ints = _state.whole_array(state, p + "pending.ints", (None, 7))
    k = len(ints)
    if k > cfg.max_pending:
        raise StateError(f"{p}pending.ints: {k} requests, more than max_pending = {cfg.max_pending}")
    out = {"pending.ints": ints,
           "pending.nodes": _state.whole_array(state, p + "pending.nodes", (k, r), lo=-1, hi=r - 1),
           "pending.a": _state.real_array(state, p + "pending.a", (k, d, r), dtype),
           "pending.b": _state.real_array(state, p + "pending.b", (k, r, d), dtype),
           "pending.floats": _state.real_array(state, p + "pending.floats", (k, 3), np.float64)}
    # slot, parameter_count, signature, tick, fast_track, enqueued, sequence
    for col, name, lo, hi in ((0, "slot", 0, slots - 1), (1, "parameter count", 0, 2 * d * r),
                              (3, "tick", 0, _COUNT_MAX), (4, "fast_track", 0, 1), (5, "enqueued", 0, _COUNT_MAX),
                              (6, "sequence", 0, _COUNT_MAX)):
        c = ints[:, col]
        if k and (c.min() < lo or c.max() > hi):
            raise StateError(f"{p}pending.ints: a {name} outside [{lo}, {hi}]")
    rem = out["pending.floats"][:, 2]
    if k and (rem.min() < 0.0 or rem.max() > 1.0):
        raise StateError(f"{p}pending.floats: a remaining fraction outside [0, 1]")
    return out


def _pending_arrays(q: MigrationQueue, layer: DynamicLoRALayer) -> dict[str, np.ndarray]:
    n, r, d = len(q.pending), layer.rank, layer.dim
    nodes = np.full((n, r), -1, np.int64)
    a = np.zeros((n, d, r), layer.dtype)
    b = np.zeros((n, r, d), layer.dtype)
    ints = np.zeros((n, 7), np.int64)
    floats = np.zeros((n, 3))
    for i, p in enumerate(q.pending):
        c = p.circuit
        k = len(c.nodes)
        nodes[i, :k] = c.nodes
        a[i, :, :k] = c.a_cols
        b[i, :k, :] = c.b_rows
        ints[i] = (c.slot, c.parameter_count, c.activation_signature, c.tick, int(c.fast_track), p.enqueued, p.key[2])
        floats[i] = (c.autocorr, c.criticality, p.remaining)
    return {"pending.nodes": nodes, "pending.a": a, "pending.b": b, "pending.ints": ints, "pending.floats": floats}


def _pending_from(layer: str, arr: dict[str, np.ndarray]) -> list[_Pending]:
    out = []
    for i in range(len(arr["pending.ints"])):
        slot, pc, sig, tick, fast, enq, seq = (int(v) for v in arr["pending.ints"][i])
        ac, crit, rem = (float(v) for v in arr["pending.floats"][i])
        nd = tuple(int(j) for j in arr["pending.nodes"][i] if j >= 0)
        k = len(nd)
        c = Circuit(layer=layer, slot=slot, nodes=nd, parameter_count=pc, autocorr=ac, criticality=crit,
                    activation_signature=sig, a_cols=np.array(arr["pending.a"][i][:, :k]),
                    b_rows=np.array(arr["pending.b"][i][:k, :]), tick=tick, fast_track=bool(fast))
        out.append(_Pending((-int(c.fast_track), -c.autocorr, seq), c, rem, enq))
    return out
