"""One DynamicLoRA layer: A and B with emergent inertia, per-parameter phases and homeostasis.

A layer holds ``slots`` independent instances stacked on a leading axis: one slot for a layer
shared by every agent (foundation, domain, swarm), one slot per agent for the agent and context
layers, so one batched contraction applies every agent's own matrices.

Interpretations of the design (where it is loose):

* **Interaction density**: each tick a slot pushes the RMS of its rank activations ``h @ A``
  (0 when it did not interact) into a ring of ``interaction_window`` ticks; the density ``D``
  is the ring's mean. Effective inertia is ``base + (1 - base) * inertia_gain * D / (D +
  density_half)``: the configured base inertia is the floor (an idle layer learns at
  ``1 - base``), interactions screen a layer further, and it stays below
  ``base + (1 - base) * inertia_gain < 1``. The learning rate is ``1 - effective inertia``.
* **Activity** is Hebbian and factorised: traces (EMAs of ``|activation|``) of every input
  line ``a``, rank component ``m`` and output line ``o`` of a slot; the activity of ``A[i, j]``
  is ``a[i] * m[j]``, of ``B[j, k]`` is ``m[j] * o[k]``. A parameter is SCREENED when its
  activity exceeds the slot's screening threshold (evaluated as ``a[i] > threshold / m[j]``),
  or while its rank component is pinned by a consolidation; otherwise FREE.
* **Decay** toward the initial values after the gradient step: ``p += decay * (p_init - p)``
  with decay ``screened_decay`` (1e-4) or ``free_decay`` (1e-2) by phase (the design's
  ``p * (1 - decay) + p_init * decay``, rearranged to one fewer pass).
* **Entropy**: with ``p`` the activity normalised over the slot's parameters, the entropy is
  ``-sum(p log p)`` over the FREE parameters, divided by ``log(#parameters)``: in [0, 1], 0
  when everything is screened (crystallised), at its largest when everything is free. It rises
  monotonically with the threshold, which is what lets homeostasis steer it: below the budget
  the threshold is raised (frees parameters), above it lowered. A slot with no activity at all
  counts as uniform (entropy = its free fraction) and its threshold is left alone.
* ``update(gradient, strength)`` *adds* ``(1 - inertia) * strength * gradient`` (the design's
  sign): the hierarchy passes descent directions.

Containment: a slot whose update would leave a parameter non-finite (an overflowing step, a NaN
strength) keeps its parameters as they were for that tick, counted in ``rejected_steps``; a
slot whose tick recorded non-finite activations (a huge input through ``forward`` or
``record_interaction``) has that tick's interaction discarded, counted in
``dropped_interactions``. Neither check changes a value of a finite slot.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from ... import _core, detmath
from ..._checks import check_int
from . import _state
from ._xp import errstate, namespace, to_host
from .config import MAX_AGENTS, MAX_DIM, MAX_RANK, MAX_STATE_ELEMENTS, LoRAConfig

if TYPE_CHECKING:
    from .circuits import Circuit

__all__ = ["FREE", "SCREENED", "DynamicLoRALayer", "LayerGradient", "check_state", "r_rows", "rd_dot", "row_dot", "xty"]

SCREENED = True
"""Phase value of a parameter locked by interactions (phase arrays hold booleans)."""
FREE = False
"""Phase value of a parameter that drifts back to its initial value."""

_TINY = 1e-300


def _log_floor(x: np.ndarray, xp: Any = np) -> np.ndarray:
    """``log(max(x, 1e-300))`` in float64, C-contiguous; on the host with
    :mod:`dynamic_core.detmath` (numpy's log takes another code path per CPU)."""
    if xp is not np:
        out = xp.maximum(x.astype(xp.float64), _TINY)
        return xp.log(out, out=out)
    return detmath.log(np.maximum(np.asarray(x, dtype=np.float64), _TINY, order="C"))


def det_log(x: np.ndarray, xp: Any = np) -> np.ndarray:
    """``log`` in the array's dtype: :mod:`dynamic_core.detmath` on the host (the same bits on any
    CPU), the module's own otherwise."""
    if xp is not np:
        return xp.log(x)
    return detmath.log(x).astype(np.result_type(x, np.float32), copy=False)


def det_tanh(x: np.ndarray, xp: Any = np) -> np.ndarray:
    """``tanh`` in the array's dtype: :mod:`dynamic_core.detmath` on the host (the same bits on any
    CPU), the module's own otherwise."""
    if xp is not np:
        return xp.tanh(x)
    return detmath.tanh(x).astype(np.result_type(x, np.float32), copy=False)


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(n: int) -> ThreadPoolExecutor:
    pool = _POOLS.get(n)
    if pool is None:
        pool = _POOLS[n] = ThreadPoolExecutor(n, thread_name_prefix="lora")
    return pool


# Both matrices are stored rank-major, (slots, rank, dim): A transposed. Every per-parameter pass
# then runs along dim (64 wide) instead of rank (4-8 wide), where numpy's per-row overhead
# dominated (measured 3x on the decay and phase passes), and every per-agent contraction is one
# of the two forms below.
def _same_float(*arrays: np.ndarray) -> list[np.ndarray]:
    dt = np.result_type(*arrays)
    dt = dt if dt in (np.float32, np.float64) else np.dtype(np.float64)
    return [np.ascontiguousarray(a, dtype=dt) for a in arrays]


def rd_dot(x: np.ndarray, M: np.ndarray, threads: int = 1) -> np.ndarray:
    """``M[n] @ x[n]`` for every n: (n, d) x (n, r, d) -> (n, r), natively, each dot product
    summed in a fixed order (8 lanes, a fixed tree, then the tail); rows split over
    ``threads`` (the same bits on any count). ``M`` of shape (r, d) is one matrix for every
    row (``x @ M.T``, in the same order). A row's values depend on that row and its matrix
    only: not on its position, the number of rows, a BLAS or the CPU. Arrays of another module
    (CuPy): its matmul."""
    if not (isinstance(x, np.ndarray) and isinstance(M, np.ndarray)):
        return x @ M.T if M.ndim == 2 else (M @ x[:, :, None])[:, :, 0]
    return _core.lora_rd_dot(*_same_float(x, M), threads)


def r_rows(y: np.ndarray, M: np.ndarray, threads: int = 1) -> np.ndarray:
    """``y[n] @ M[n]`` for every n: (n, r) x (n, r, d) -> (n, d), natively, rank by rank; rows
    split over ``threads``. ``M`` of shape (r, d) is one matrix for every row (``y @ M``, in the
    same order). Like :func:`rd_dot`, a row's values depend on that row and its matrix only.
    Arrays of another module (CuPy): its matmul."""
    if not (isinstance(y, np.ndarray) and isinstance(M, np.ndarray)):
        return y @ M if M.ndim == 2 else (y[:, None, :] @ M)[:, 0, :]
    return _core.lora_r_rows(*_same_float(y, M), threads)


def row_dot(x: np.ndarray, y: np.ndarray, xp: Any = np) -> np.ndarray:
    """``sum(x[n] * y[n])`` for every row n of two (n, d) arrays, natively in :func:`rd_dot`'s
    fixed order. Arrays of another module ``xp`` (CuPy): its einsum."""
    if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)):
        return xp.einsum("nd,nd->n", x, y)
    return rd_dot(x, y[:, None, :])[:, 0]


def xty(X: np.ndarray, Y: np.ndarray, threads: int = 1) -> np.ndarray:
    """``X.T @ Y`` summed over the leading (agent) axis in a fixed order, whatever the BLAS, its
    thread count or the CPU.

    The rows go in blocks of 32 in order; each block is summed row by row (from its first
    product), and the block sums are added in order to a zeroed sum, natively (no FMA): the
    same bits on any machine and any ``threads`` (which split the output's rows). A BLAS
    would not do: OpenBLAS splits a long reduction among threads (the rounding changes with
    the thread count), and even a small GEMM per block rounds differently with the CPU's
    kernel (Haswell's FMA order is not SkylakeX's).

    Arrays of another module (CuPy): one GEMM, whose order cuBLAS fixes for a size on a device.
    """
    if not (isinstance(X, np.ndarray) and isinstance(Y, np.ndarray)):
        return X.T @ Y
    return _core.lora_xty(*_same_float(X, Y), threads)


class LayerGradient:
    """An update direction for one layer: dense arrays and/or sums of outer products.

    What one learning pass gives a per-agent layer is rank one per agent
    (``dA[n] = h[n] (x) v[n]``); keeping the factors instead of the dense (n, d, r) array saves
    a full write and read of it.

    Parameters
    ----------
    A, B : ndarray, optional
        Dense parts, shaped like the layer's ``A`` (slots, d, r) and ``B`` (slots, r, d); a 2-d
        array is taken as the single slot of a shared layer.
    terms_A : sequence of (L, R)
        ``A[s] += L[s] (x) R[s]`` with L (slots, d), R (slots, r).
    terms_B : sequence of (L, R)
        ``B[s] += L[s] (x) R[s]`` with L (slots, r), R (slots, d).
    """

    __slots__ = ("A", "B", "terms_A", "terms_B")

    def __init__(self, A: np.ndarray | None = None, B: np.ndarray | None = None,
                 terms_A: Sequence[tuple[np.ndarray, np.ndarray]] = (),
                 terms_B: Sequence[tuple[np.ndarray, np.ndarray]] = ()) -> None:
        self.A = None if A is None else (A[None] if A.ndim == 2 else A)
        self.B = None if B is None else (B[None] if B.ndim == 2 else B)
        self.terms_A = list(terms_A)
        self.terms_B = list(terms_B)

    def dense(self, slots: int, dim: int, rank: int, dtype: Any = np.float64,
              xp: Any = np) -> tuple[np.ndarray, np.ndarray]:
        """The direction as dense (slots, d, r) and (slots, r, d) arrays (of module ``xp``)."""
        gA = xp.zeros((slots, dim, rank), dtype) if self.A is None else xp.array(self.A, dtype=dtype)
        gB = xp.zeros((slots, rank, dim), dtype) if self.B is None else xp.array(self.B, dtype=dtype)
        for L, R in self.terms_A:
            gA += xp.asarray(L)[:, :, None] * xp.asarray(R)[:, None, :]
        for L, R in self.terms_B:
            gB += xp.asarray(L)[:, :, None] * xp.asarray(R)[:, None, :]
        return gA, gB

    @property
    def empty(self) -> bool:
        """No dense part and no term."""
        return self.A is None and self.B is None and not self.terms_A and not self.terms_B

    def _rank_major(self) -> tuple[tuple[Any, list], tuple[Any, list]]:
        """(dense, [(rank-side, dim-side), ...]) for A^T and for B."""
        dA = None if self.A is None else self.A.transpose(0, 2, 1)
        return (dA, [(R, L) for L, R in self.terms_A]), (self.B, list(self.terms_B))


def _readonly(a: np.ndarray) -> np.ndarray:
    v = a.view()
    if isinstance(v, np.ndarray):  # a CuPy array cannot be made read-only
        v.flags.writeable = False
    return v


class DynamicLoRALayer:
    """A LoRA layer (``h <- h + (h @ A) @ B``) with emergent temporal dynamics.

    Parameters
    ----------
    dim : int
        Width of the hidden state.
    rank : int
        LoRA rank.
    base_inertia : float
        Inertia at zero interaction density.
    slots : int
        Independent instances stacked on the leading axis (1 for a shared layer).
    config : LoRAConfig, optional
        The decay rates, traces, thresholds and budgets (defaults: the design's).
    rng : numpy.random.Generator, optional
        Draws the initial A (N(0, init_scale**2 / dim)); B starts at zero.
    dtype : numpy dtype
        Of A and B (float64 or float32); traces and thresholds are always float64.
    name : str
        For reports.
    xp : array module, optional
        Where the arrays live: numpy (default: the native kernels) or CuPy (a GPU; see
        :mod:`dynamic_core.learning.lora._xp`). Properties and results are arrays of that module.
    """

    native: bool = True
    """Run :meth:`update` in the native kernel (False: the numpy reference; same parameters
    and phases bit for bit, entropy within rounding)."""

    def __init__(self, dim: int, rank: int, base_inertia: float, *, slots: int = 1,
                 config: LoRAConfig | None = None, rng: np.random.Generator | None = None,
                 dtype: Any = np.float64, name: str = "", xp: Any = None) -> None:
        cfg = config if config is not None else LoRAConfig()
        self.xp = xp = namespace(xp)
        check_int("dim", dim, 1, MAX_DIM)
        check_int("rank", rank, 1, MAX_RANK)
        check_int("slots", slots, 1, MAX_AGENTS)
        if slots * dim * rank > MAX_STATE_ELEMENTS:
            raise ValueError(f"slots * dim * rank = {slots * dim * rank} exceeds {MAX_STATE_ELEMENTS}")
        if not 0.0 <= base_inertia < 1.0:
            raise ValueError("base_inertia must be in [0, 1)")
        self.config = cfg
        self.name = name
        self.dim, self.rank, self.slots = int(dim), int(rank), int(slots)
        self.base_inertia = float(base_inertia)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError("dtype must be float32 or float64")
        rng = rng if rng is not None else np.random.default_rng(0)
        A0 = rng.normal(0.0, cfg.init_scale / math.sqrt(dim), size=(slots, dim, rank)).astype(self.dtype)
        self._At0 = xp.asarray(np.ascontiguousarray(A0.transpose(0, 2, 1)))
        self._B0 = xp.zeros((slots, rank, dim), self.dtype)
        self._At = self._At0.copy()
        self._B = self._B0.copy()
        # double buffers: an update writes into the spare one unless a live snapshot holds it
        self._spare_At: np.ndarray | None = None
        self._spare_B: np.ndarray | None = None
        self._holders: weakref.WeakSet[Any] = weakref.WeakSet()
        self.interaction_history = xp.zeros((slots, cfg.interaction_window))
        self._hist_pos = 0
        self._hist_sum = xp.zeros(slots)
        self.screening_threshold = xp.full(slots, cfg.screening_threshold)
        self.entropy_budget = tuple(cfg.entropy_budget)
        self._phA = xp.zeros((slots, rank, dim), bool)
        self._phB = xp.zeros((slots, rank, dim), bool)
        self.act_in = xp.zeros((slots, dim))
        self.act_mid = xp.zeros((slots, rank))
        self.act_out = xp.zeros((slots, dim))
        self.pins = xp.zeros((slots, rank))  # ticks a consolidated component stays SCREENED
        self.current_entropy = xp.ones(slots)  # no activity yet: uniform, everything free
        self._activity_total = xp.zeros(slots)
        self.rejected_steps = 0  # slot updates refused for a non-finite result (cumulative)
        self.last_rejected = 0  # of the last update
        self.dropped_interactions = 0  # slot-ticks of non-finite activations discarded (cumulative)
        self._reset_tick()

    # ------------------------------------------------------------------ parameters
    @property
    def A(self) -> np.ndarray:
        """Current A, (slots, d, r), read-only (use :meth:`set_params` to assign). On a GPU
        module a view that must not be written: CuPy cannot make an array read-only, and a
        write would reach the live weights and every snapshot sharing them."""
        return _readonly(self._At.transpose(0, 2, 1))

    @property
    def B(self) -> np.ndarray:
        """Current B, (slots, r, d), read-only."""
        return _readonly(self._B)

    @property
    def A_init(self) -> np.ndarray:
        """Initial A, (slots, d, r), read-only: FREE parameters drift back to it."""
        return _readonly(self._At0.transpose(0, 2, 1))

    @property
    def B_init(self) -> np.ndarray:
        """Initial B, (slots, r, d), read-only."""
        return _readonly(self._B0)

    @property
    def phase_A(self) -> np.ndarray:
        """Phase of every A parameter at the last update, (slots, d, r): True = SCREENED."""
        return _readonly(self._phA.transpose(0, 2, 1))

    @property
    def phase_B(self) -> np.ndarray:
        """Phase of every B parameter at the last update, (slots, r, d)."""
        return _readonly(self._phB)

    @property
    def params_per_slot(self) -> int:
        """Parameters of one slot: ``2 * dim * rank``."""
        return 2 * self.dim * self.rank

    @property
    def total_params(self) -> int:
        """Parameters of every slot together."""
        return self.slots * self.params_per_slot

    def set_params(self, A: np.ndarray | None = None, B: np.ndarray | None = None, *,
                   A_init: np.ndarray | None = None, B_init: np.ndarray | None = None) -> None:
        """Assign parameters (copied, host arrays uploaded; a 2-d array sets a single-slot layer)."""
        s, d, r = self.slots, self.dim, self.rank
        xp = self.xp
        if A is not None:
            self._At = xp.ascontiguousarray(xp.array(A, dtype=self.dtype).reshape(s, d, r).transpose(0, 2, 1))
        if A_init is not None:
            self._At0 = xp.ascontiguousarray(xp.array(A_init, dtype=self.dtype).reshape(s, d, r).transpose(0, 2, 1))
        if B is not None:
            self._B = xp.array(B, dtype=self.dtype).reshape(s, r, d)
        if B_init is not None:
            self._B0 = xp.array(B_init, dtype=self.dtype).reshape(s, r, d)

    def export(self, holder: Any) -> tuple[np.ndarray, np.ndarray]:
        """Read-only views of the current A (slots, d, r) and B for ``holder`` (a snapshot):
        the layer never writes into a buffer a live holder still views (``holder.holds(buf)``)."""
        self._holders.add(holder)
        return self.A, self.B

    def _held(self, buf: np.ndarray | None) -> bool:
        return buf is not None and any(h.holds(buf) for h in list(self._holders))

    def _fresh(self, spare: np.ndarray | None, like: np.ndarray) -> np.ndarray:
        if spare is None or self._held(spare):
            return self.xp.empty_like(like)
        return spare

    def _own(self) -> None:
        """Copy-on-write before an in-place edit of A or B."""
        if self._held(self._At):
            new = self._fresh(self._spare_At, self._At)
            self.xp.copyto(new, self._At)
            self._spare_At, self._At = None, new
        if self._held(self._B):
            new = self._fresh(self._spare_B, self._B)
            self.xp.copyto(new, self._B)
            self._spare_B, self._B = None, new

    # ------------------------------------------------------------------ forward and recording
    def forward(self, h: np.ndarray, *, record: bool = True) -> np.ndarray:
        """``h + (h @ A) @ B``; recorded as this tick's interaction when ``record``.

        A single-slot layer applies its matrices to every row; a stacked layer needs one row
        per slot (row n uses slot n).
        """
        h = self.xp.asarray(h, dtype=self.dtype)
        if self.slots == 1:  # one matrix for every row, each row in the same fixed order
            u = r_rows(h, self._At[0].T, self.config.threads)
            delta = r_rows(u, self._B[0], self.config.threads)
        else:
            if h.shape != (self.slots, self.dim):
                raise ValueError(f"a stacked layer takes one row per slot: expected {(self.slots, self.dim)}, "
                                 f"got {h.shape}")
            u = rd_dot(h, self._At, self.config.threads)
            delta = r_rows(u, self._B, self.config.threads)
        if record:
            self.record_interaction(h, u, delta)
        return h + delta

    def _reset_tick(self) -> None:
        s, d, r = self.slots, self.dim, self.rank
        xp = self.xp
        self._t_in = xp.zeros((s, d))
        self._t_mid = xp.zeros((s, r))
        self._t_out = xp.zeros((s, d))
        self._t_rms = xp.zeros(s)
        self._t_sig = xp.zeros((s, r))
        self._t_calls = xp.zeros(s, np.int64)

    def record_interaction(self, h: np.ndarray, u: np.ndarray, delta: np.ndarray,
                           mask: np.ndarray | None = None) -> None:
        """Accumulate one pass's activations (input ``h``, rank activations ``u``, output
        increment ``delta``) into this tick's interaction.

        A stacked layer takes one row per slot; rows outside ``mask`` did not interact. A
        single-slot layer takes the mean over all rows (rows outside ``mask`` count as zero:
        the shared layer's interaction is the population's).
        """
        n = h.shape[0]
        xp = self.xp
        if mask is not None and xp is not np:
            mask = xp.asarray(mask)
        full = mask is None or bool(xp.all(mask))
        w = None if full else xp.ascontiguousarray(xp.asarray(mask, dtype=xp.float64))
        if w is not None and not w.any():
            return
        if self.slots != 1 and n != self.slots:
            raise ValueError(f"a stacked layer records one row per slot: expected {self.slots} rows, got {n}")
        if xp is np:
            h, u, delta = _same_float(h, u, delta)
            _core.lora_record(h, u, delta, w, self.slots == 1, self._t_in, self._t_mid, self._t_out, self._t_rms,
                              self._t_sig, self.config.threads)
        else:
            self._record_xp(*(xp.asarray(a) for a in (h, u, delta)), w)
        self._t_calls += 1 if (w is None or self.slots == 1) else (w > 0)

    def _record_xp(self, h: Any, u: Any, delta: Any, w: Any) -> None:
        """The native recording's formulas as array operations (a GPU module's path)."""
        xp = self.xp
        u64 = u.astype(xp.float64)
        rms = xp.sqrt((u64 * u64).mean(axis=1))
        if self.slots == 1:
            wn = (xp.ones(h.shape[0]) if w is None else w) / h.shape[0]
            self._t_in[0] += (wn[:, None] * xp.abs(h)).sum(axis=0)
            self._t_mid[0] += (wn[:, None] * xp.abs(u)).sum(axis=0)
            self._t_out[0] += (wn[:, None] * xp.abs(delta)).sum(axis=0)
            self._t_rms[0] += (wn * rms).sum()
            self._t_sig[0] += (wn[:, None] * u).sum(axis=0)
        elif w is None:
            self._t_in += xp.abs(h)
            self._t_mid += xp.abs(u)
            self._t_out += xp.abs(delta)
            self._t_rms += rms
            self._t_sig += u
        else:
            wc = w[:, None]
            self._t_in += wc * xp.abs(h)
            self._t_mid += wc * xp.abs(u)
            self._t_out += wc * xp.abs(delta)
            self._t_rms += w * rms
            self._t_sig += wc * u

    def end_interactions(self) -> tuple[np.ndarray, np.ndarray]:
        """Fold this tick's interactions into the history and activity traces.

        Returns
        -------
        signature : ndarray (slots, rank)
            Mean rank activation of the tick per slot (the circuit detector's input).
        active : ndarray (slots,) bool
            Slots that interacted this tick.
        """
        self._drop_nonfinite_tick()
        xp = self.xp
        calls = self._t_calls
        c = xp.maximum(calls, 1).astype(xp.float64)
        cfg = self.config
        entry = self._t_rms / c
        H = self.interaction_history.shape[1]
        old = self.interaction_history[:, self._hist_pos].copy()
        self.interaction_history[:, self._hist_pos] = entry
        self._hist_sum += entry - old
        self._hist_pos = (self._hist_pos + 1) % H
        if self._hist_pos == 0:  # the running sum drifts by rounding: refresh it once a lap
            self._hist_sum = self.interaction_history.sum(axis=1)
        k = cfg.activity_decay
        if xp is not np:
            for name in ("in", "mid", "out"):
                t = getattr(self, "_t_" + name)
                setattr(self, "act_" + name, k * getattr(self, "act_" + name) + (1.0 - k) * (t / c[:, None]))
                t.fill(0)
        else:
            self._fold_native(c, k)
        sig = self._t_sig / c[:, None]
        active = calls > 0
        for t in (self._t_rms, self._t_sig, self._t_calls):
            t.fill(0)
        return sig, active

    def _fold_native(self, c: np.ndarray, k: float) -> None:
        # k * act + (1 - k) * (t / c), one native pass each; the accumulators are zeroed
        self.act_in = _core.lora_fold(np.ascontiguousarray(self.act_in, dtype=np.float64), self._t_in, c, k, 1.0 - k)
        self.act_mid = _core.lora_fold(np.ascontiguousarray(self.act_mid, dtype=np.float64), self._t_mid, c, k,
                                       1.0 - k)
        self.act_out = _core.lora_fold(np.ascontiguousarray(self.act_out, dtype=np.float64), self._t_out, c, k,
                                       1.0 - k)

    def _drop_nonfinite_tick(self) -> None:
        """Discard (and count) the tick of every slot whose accumulated activations are not all
        finite: folded in, one such value would make the slot's density, and then its learning
        rate and every parameter, NaN for good."""
        xp = self.xp
        with errstate(xp, over="ignore", invalid="ignore"):  # one sum per slot: NaN and infinities survive it
            total = self._t_rms + xp.einsum("sd->s", self._t_in) + xp.einsum("sr->s", self._t_mid)
            total += xp.einsum("sd->s", self._t_out) + xp.einsum("sr->s", self._t_sig)
        ok = xp.isfinite(total)
        if bool(ok.all()):
            return
        bad = ~ok
        for t in (self._t_in, self._t_mid, self._t_out, self._t_rms, self._t_sig, self._t_calls):
            t[bad] = 0
        self.dropped_interactions += int(xp.count_nonzero(bad))

    # ------------------------------------------------------------------ dynamics
    def interaction_density(self) -> np.ndarray:
        """Mean of each slot's interaction history, (slots,)."""
        return self._hist_sum / self.interaction_history.shape[1]

    def compute_effective_inertia(self) -> np.ndarray:
        """Inertia per slot from interaction density: ``base + (1 - base) * inertia_gain * rho``,
        ``rho = D / (D + density_half)``; in ``[base, base + (1 - base) * inertia_gain]``."""
        D = self.xp.maximum(self.interaction_density(), 0.0)
        rho = D / (D + self.config.density_half)
        b = self.base_inertia
        return b + (1.0 - b) * self.config.inertia_gain * rho

    def learning_rate(self) -> np.ndarray:
        """``1 - compute_effective_inertia()`` per slot."""
        return 1.0 - self.compute_effective_inertia()

    def compute_activity_mask(self) -> tuple[np.ndarray, np.ndarray]:
        """Activity of every parameter: ``a[i] * m[j]`` for A (slots, d, r), ``m[j] * o[k]`` for
        B (slots, r, d)."""
        return (self.act_in[:, :, None] * self.act_mid[:, None, :],
                self.act_mid[:, :, None] * self.act_out[:, None, :])

    def _thresholds(self, sl: slice) -> tuple[np.ndarray, np.ndarray]:
        # a[i] * m[j] > t  <=>  a[i] > t / m[j]: one broadcast compare, no outer product
        th = self.screening_threshold[sl, None]
        with errstate(self.xp, divide="ignore"):
            return th / self.act_mid[sl], th / self.act_out[sl]

    def compute_phase(self) -> tuple[np.ndarray, np.ndarray]:
        """Phase of every parameter from the current activity, threshold and pins (True =
        SCREENED), A (slots, d, r) and B (slots, r, d): what the next :meth:`update` will use."""
        tm, to = self._thresholds(slice(None))
        pA = self.act_in[:, None, :] > tm[:, :, None]
        pB = self.act_mid[:, :, None] > to[:, None, :]
        pinned = self.pins[:, :, None] > 0
        pA |= pinned
        pB |= pinned
        return pA.transpose(0, 2, 1), pB

    def update(self, gradient: LayerGradient | tuple[np.ndarray, np.ndarray] | None = None,
               strength: float | np.ndarray = 1.0) -> np.ndarray:
        """One step: ``p += (1 - inertia) * strength * gradient``, then the phase-based decay
        ``p += decay * (p_init - p)`` (SCREENED 1e-4, FREE 1e-2), for A and B.

        Parameters
        ----------
        gradient : LayerGradient or (gA, gB), optional
            The direction to add (a descent direction for learning); None: decay only.
        strength : float or ndarray (slots,)
            Multiplies the step (resonance factors, the config's step size).

        Returns
        -------
        ndarray (slots,)
            The learning rate each slot used.

        A slot whose result would not be finite keeps its parameters (see the module's
        containment note); ``last_rejected`` says how many did.
        """
        if isinstance(gradient, tuple):
            gradient = LayerGradient(gradient[0], gradient[1])
        if gradient is not None and gradient.empty:
            gradient = None
        xp = self.xp
        lr = self.learning_rate()
        c = xp.broadcast_to((lr * xp.asarray(strength, dtype=xp.float64)).astype(self.dtype), (self.slots,))
        parts = gradient._rank_major() if gradient is not None else ((None, []), (None, []))
        if xp is not np:  # a direction given as host arrays is uploaded
            parts = tuple((None if dense is None else xp.asarray(dense), [(xp.asarray(R), xp.asarray(C)) for R, C in terms])
                          for dense, terms in parts)
        newA = self._fresh(self._spare_At, self._At)
        newB = self._fresh(self._spare_B, self._B)
        s, d, r = self.slots, self.dim, self.rank
        pinned = self.pins > 0
        pinned = pinned if pinned.any() else None
        native = self.native and xp is np
        finite = np.empty(self.slots, bool) if native else None
        if not (native and self._update_native(c, parts, newA, newB, pinned, finite)):
            finite = None
            sums = {k: xp.empty((s, d if k.endswith("d") else r)) for k in ("Ad", "Ar", "Br", "Bd")}
            job = (c, parts, newA, newB, sums, pinned)
            # a GPU module takes every slot in one pass
            step = max(1, self.config.chunk_elems // (d * r)) if xp is np else s
            chunks = [slice(s0, min(s, s0 + step)) for s0 in range(0, s, step)]
            threads = min(self.config.threads, len(chunks))
            if threads > 1:
                list(_pool(threads).map(lambda sl: self._update_chunk_numpy(sl, *job), chunks))
            else:
                for sl in chunks:
                    self._update_chunk_numpy(sl, *job)
            self._entropy(sums["Ad"], sums["Ar"], sums["Br"], sums["Bd"])
        self._keep_nonfinite_slots(newA, newB, finite)
        self._spare_At, self._At = self._At, newA
        self._spare_B, self._B = self._B, newB
        xp.maximum(self.pins - 1, 0, out=self.pins)
        return lr

    def _keep_nonfinite_slots(self, newA: np.ndarray, newB: np.ndarray, finite: np.ndarray | None = None) -> None:
        """Slots whose new parameters are not all finite keep their current ones (counted).
        ``finite`` (slots,) is the native update's per-slot answer, found while it wrote the
        values; without it (the numpy path) every value is checked here."""
        xp = self.xp
        if finite is None:
            finite = xp.isfinite(newA.reshape(self.slots, -1)).all(axis=1)
            finite &= xp.isfinite(newB.reshape(self.slots, -1)).all(axis=1)
        n = self.slots - int(xp.count_nonzero(finite))
        self.last_rejected = n
        if n:
            bad = ~finite
            newA[bad] = self._At[bad]
            newB[bad] = self._B[bad]
            self.rejected_steps += n

    def _update_native(self, c: np.ndarray, parts: Any, newA: np.ndarray, newB: np.ndarray,
                       pinned: np.ndarray | None, finite: np.ndarray | None = None) -> bool:
        """The update in the native kernel, one pass per matrix, with each slot's entropy: the
        numpy reference's parameters and phases bit for bit, its entropy within rounding. False
        (nothing done) when a step array's dtype is not the layer's, whose mixed-precision
        rounding only the reference reproduces."""
        dt = self.dtype
        for dense, terms in parts:
            if (dense is not None and dense.dtype != dt) or any(R.dtype != dt or C.dtype != dt for R, C in terms):
                return False
        logs = [_log_floor(x) for x in (self.act_in, self.act_mid, self.act_out)]
        mats = []
        for (dense, terms), P, P0, new, ph, col, log_col in (
                (parts[0], self._At, self._At0, newA, self._phA, self.act_in, logs[0]),
                (parts[1], self._B, self._B0, newB, self._phB, self.act_out, logs[2])):
            mats.append((np.ascontiguousarray(P), np.ascontiguousarray(P0), new, ph,
                         None if dense is None else np.ascontiguousarray(dense),
                         [(np.ascontiguousarray(R), np.ascontiguousarray(C)) for R, C in terms],
                         np.ascontiguousarray(col, dtype=np.float64), log_col))
        entropy, total = np.empty(self.slots), np.empty(self.slots)
        _core.lora_update(0, self.slots, self.config.threads, np.ascontiguousarray(c, dtype=dt),
                          np.ascontiguousarray(self.act_mid, dtype=np.float64), logs[1],
                          np.ascontiguousarray(self.screening_threshold, dtype=np.float64), pinned,
                          self.config.screened_decay, self.config.free_decay, tuple(mats[0]), tuple(mats[1]),
                          entropy, total, finite)
        self.current_entropy, self._activity_total = entropy, total
        return True

    def _update_chunk_numpy(self, sl: slice, c: np.ndarray, parts: Any, newA: np.ndarray, newB: np.ndarray,
                            sums: dict[str, np.ndarray], pinned: np.ndarray | None) -> None:
        """The update of slots ``sl`` in numpy: the reference the native kernel is tested
        against, the path for steps in another dtype than the layer's, and (in the layer's
        array module) the path on a GPU."""
        xp = self.xp
        cfg = self.config
        dt = self.dtype.type
        dec_s, dec_f = dt(cfg.screened_decay), dt(cfg.free_decay)
        a, m, o = self.act_in[sl], self.act_mid[sl], self.act_out[sl]
        tm, to = self._thresholds(sl)
        cs = c[sl]
        shape = (sl.stop - sl.start, self.rank, self.dim)
        dec = xp.empty(shape, self.dtype)
        tmp = xp.empty(shape, self.dtype)
        nph = xp.empty(shape, bool)
        Sf = xp.empty(shape)
        for which, P, P0, new, ph in (("A", self._At, self._At0, newA, self._phA),
                                      ("B", self._B, self._B0, newB, self._phB)):
            dense, terms = parts[0] if which == "A" else parts[1]
            out = new[sl]
            if dense is None and not terms:
                xp.copyto(out, P[sl])
            else:
                first = True
                if dense is not None:
                    xp.multiply(dense[sl], cs[:, None, None], out=out)
                    first = False
                for Rr, Cd in terms:
                    Rc = Rr[sl] * cs[:, None]  # the step folded into the small factor
                    if first:
                        xp.multiply(Rc[:, :, None], Cd[sl, None, :], out=out)
                        first = False
                    else:
                        xp.multiply(Rc[:, :, None], Cd[sl, None, :], out=tmp)
                        out += tmp
                out += P[sl]
            phs = ph[sl]
            if which == "A":
                xp.greater(a[:, None, :], tm[:, :, None], out=phs)  # A^T[j, i]: a[i] > t / m[j]
            else:
                xp.greater(m[:, :, None], to[:, None, :], out=phs)  # B[j, k]: m[j] > t / o[k]
            if pinned is not None:
                phs |= pinned[sl, :, None]
            # decay per phase, branch-free (np.where on a mixed mask mispredicts): exact values
            xp.multiply(phs, dec_s, out=dec)
            xp.invert(phs, out=nph)
            xp.multiply(nph, dec_f, out=tmp)
            dec += tmp
            xp.subtract(P0[sl], out, out=tmp)
            tmp *= dec
            out += tmp
            # activity summed over SCREENED parameters by rank row and by dim column
            xp.copyto(Sf, phs)
            if which == "A":
                scr_r = xp.matmul(Sf, a[:, :, None])[:, :, 0]
                scr_d = xp.matmul(m[:, None, :], Sf)[:, 0, :]
                sums["Ar"][sl] = m * (a.sum(1, keepdims=True) - scr_r)
                sums["Ad"][sl] = a * (m.sum(1, keepdims=True) - scr_d)
            else:
                scr_r = xp.matmul(Sf, o[:, :, None])[:, :, 0]
                scr_d = xp.matmul(m[:, None, :], Sf)[:, 0, :]
                sums["Br"][sl] = m * (o.sum(1, keepdims=True) - scr_r)
                sums["Bd"][sl] = o * (m.sum(1, keepdims=True) - scr_d)

    def _entropy(self, sA_in: np.ndarray, sA_mid: np.ndarray, sB_mid: np.ndarray, sB_out: np.ndarray) -> None:
        # -sum_free p log p with p = T / Z and log T[i, j] = log a[i] + log m[j]: line sums only
        xp = self.xp
        a, m, o = self.act_in, self.act_mid, self.act_out
        Z = a.sum(1) * m.sum(1) + m.sum(1) * o.sum(1)
        la, lm, lo = (_log_floor(x, xp) for x in (a, m, o))
        F = (la * sA_in).sum(1) + (lm * sA_mid).sum(1) + (lm * sB_mid).sum(1) + (lo * sB_out).sum(1)
        free_mass = sA_in.sum(1) + sB_mid.sum(1)
        logP = detmath.log(float(self.params_per_slot))
        live = Z > 0.0
        Zs = xp.where(live, Z, 1.0)
        ent = (free_mass * det_log(Zs, xp) - F) / Zs / logP
        if not bool(live.all()):
            # no activity: the uniform distribution, whose free entropy is the free fraction
            free = ((~self._phA).sum((1, 2)) + (~self._phB).sum((1, 2))) / self.params_per_slot
            ent = xp.where(live, ent, free)
        self.current_entropy = xp.clip(ent, 0.0, 1.0)
        self._activity_total = Z

    def maintain_homeostasis(self) -> np.ndarray:
        """Steer each slot's screening threshold toward the entropy budget: raised by
        ``1 + threshold_rate`` below it (frees parameters), lowered above it. Slots without any
        activity are left alone (no threshold changes their phases). Returns the thresholds."""
        lo, hi = self.entropy_budget
        k = 1.0 + self.config.threshold_rate
        live = self._activity_total > 0.0
        e = self.current_entropy
        th = self.screening_threshold
        xp = self.xp
        th = xp.where(live & (e < lo), th * k, xp.where(live & (e > hi), th / k, th))
        b0, b1 = self.config.threshold_bounds
        self.screening_threshold = xp.clip(th, b0, b1)
        return self.screening_threshold

    # ------------------------------------------------------------------ circuits
    def component_strength(self, slot: int | np.ndarray) -> np.ndarray:
        """``||A[:, j] B[j, :] - A0[:, j] B0[j, :]||_F`` per rank component of ``slot`` (or of
        each slot in an index array): how much each component has moved the layer's map. A
        numpy array, whatever the layer's module (the circuit detector runs on the host)."""
        xp = self.xp
        if xp is not np and not isinstance(slot, int):
            slot = xp.asarray(slot)
        A, B, A0, B0 = self._At[slot], self._B[slot], self._At0[slot], self._B0[slot]

        def dot(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            return xp.sum(x * y, axis=-1, dtype=xp.float64)

        sq = dot(A, A) * dot(B, B) + dot(A0, A0) * dot(B0, B0) - 2.0 * dot(A, A0) * dot(B, B0)
        return to_host(xp, xp.sqrt(xp.maximum(sq, 0.0)))

    def consolidate_circuit(self, circuit: Circuit, *, slot: int = 0, weight: float = 1.0,
                            pin_ticks: float | None = None) -> list[int]:
        """Strengthen a pattern in ``slot``: each of the circuit's components is blended into a
        rank component of this layer (``x <- (1 - weight) x + weight x_circuit`` for its A
        column and B row), which is then pinned SCREENED: ``pin_ticks`` (default
        ``consolidation_ticks``) are added to its pin, capped at ``consolidation_ticks``; the
        component stays SCREENED while its pin is positive (one tick is taken per update).

        The target component is the one whose A column the circuit's matches with
        ``|cos| >= match_threshold`` (the pattern is already here: reinforce it), else the
        least active unpinned one (recruited). The circuit's component is sign-aligned with the
        target first (``a b`` and ``(-a)(-b)`` are the same map). Returns the components used.
        """
        self._own()
        xp = self.xp
        # the slot's rows on the host (views of the buffers with numpy; written back otherwise)
        At, B = to_host(xp, self._At[slot]), to_host(xp, self._B[slot])
        pins = to_host(xp, self.pins[slot]).copy()
        used: list[int] = []
        w = float(weight)
        dt = self.dtype.type
        order = np.lexsort((to_host(xp, self.act_mid[slot]), pins > 0))
        cap = float(self.config.consolidation_ticks)
        pin = cap if pin_ticks is None else float(pin_ticks)
        for a_s, b_s in zip(circuit.a_cols.T, circuit.b_rows):
            if len(used) == self.rank:
                break
            a64 = np.asarray(a_s, dtype=np.float64)
            free = [k for k in range(self.rank) if k not in used]
            rows = At[free].astype(np.float64)
            na = np.linalg.norm(rows, axis=1) * float(np.linalg.norm(a64))
            # dot products in the native fixed order (a BLAS GEMV's rounding changes with the CPU)
            cos = np.divide(rd_dot(a64[None], rows)[0], na, out=np.zeros(len(free)), where=na > 0)
            best = int(np.argmax(np.abs(cos)))
            if abs(cos[best]) >= self.config.match_threshold:
                k = free[best]
                sign = 1.0 if cos[best] >= 0 else -1.0
            else:
                k = next(int(j) for j in order if int(j) not in used)
                sign = -1.0 if float(row_dot(At[k].astype(np.float64)[None], a64[None])[0]) < 0 else 1.0
            At[k] = dt(1.0 - w) * At[k] + dt(w * sign) * np.asarray(a_s, dtype=self.dtype)
            B[k] = dt(1.0 - w) * B[k] + dt(w * sign) * np.asarray(b_s, dtype=self.dtype)
            pins[k] = min(pins[k] + pin, cap)
            used.append(k)
        if xp is np:
            self.pins[slot] = pins
        else:
            self._At[slot], self._B[slot], self.pins[slot] = xp.asarray(At), xp.asarray(B), xp.asarray(pins)
        return used

    def circuit_factors(self, slot: int, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the A columns (dim, k) and B rows (k, dim) of ``nodes`` in ``slot``, as
        numpy arrays whatever the layer's module."""
        xp = self.xp
        if xp is not np:
            idx = xp.asarray(nodes)
            return xp.asnumpy(self._At[slot][idx].T), xp.asnumpy(self._B[slot][idx])
        return self._At[slot][nodes].T.copy(), self._B[slot][nodes].copy()

    # ------------------------------------------------------------------ slots and state
    _SLOT_ARRAYS = ("_At0", "_B0", "interaction_history", "_hist_sum", "screening_threshold", "_phA", "_phB",
                    "act_in", "act_mid", "act_out", "pins", "current_entropy", "_activity_total")
    _TICK_ARRAYS = ("_t_in", "_t_mid", "_t_out", "_t_rms", "_t_sig", "_t_calls")

    def copy_slot(self, src: int, dst: int) -> None:
        """Make slot ``dst`` a copy of slot ``src``: parameters, initial values, history,
        threshold, phases, traces and pins. What ``dst`` recorded this tick is discarded (the
        new occupant did not interact yet)."""
        for i in (src, dst):
            check_int("slot", i, -(1 << 62), 1 << 62)
            if not 0 <= i < self.slots:
                raise IndexError(f"slot {i} out of range [0, {self.slots})")
        if src == dst:
            return
        self._own()
        self._At[dst] = self._At[src]
        self._B[dst] = self._B[src]
        for name in self._SLOT_ARRAYS:
            arr = getattr(self, name)
            arr[dst] = arr[src]
        for name in self._TICK_ARRAYS:
            getattr(self, name)[dst] = 0

    def state(self) -> dict[str, np.ndarray]:
        """The layer's state as named arrays (see :meth:`load_state`); A is stored transposed
        (rank-major), as held; numpy arrays whatever the layer's module."""
        xp = self.xp

        def host(a: Any) -> np.ndarray:
            return np.array(a, copy=True) if xp is np else xp.asnumpy(a)

        out = {"At": host(self._At), "B": host(self._B), "hist_pos": np.array(self._hist_pos)}
        for name in self._SLOT_ARRAYS:
            out[name.lstrip("_")] = host(getattr(self, name))
        return out

    def load_state(self, st: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`state` gave. Every array is checked first (:func:`check_state`):
        :class:`~dynamic_core.errors.StateError` leaves the layer as it was."""
        self._restore(check_state(st, "", self.slots, self.dim, self.rank, self.config, self.dtype))

    def _restore(self, st: dict[str, np.ndarray]) -> None:
        """Restore arrays :func:`check_state` accepted (uploaded to the layer's module)."""
        xp = self.xp
        self._At = xp.array(st["At"], dtype=self.dtype)
        self._B = xp.array(st["B"], dtype=self.dtype)
        self._spare_At = self._spare_B = None
        self._hist_pos = int(st["hist_pos"])
        for name in self._SLOT_ARRAYS:
            setattr(self, name, xp.array(st[name.lstrip("_")], dtype=getattr(self, name).dtype))
        self.entropy_budget = tuple(self.config.entropy_budget)
        self._reset_tick()


def check_state(state: Any, prefix: str, slots: int, dim: int, rank: int, config: LoRAConfig,
                dtype: Any) -> dict[str, Any]:
    """The arrays of a layer's :meth:`~DynamicLoRALayer.state` (keys ``prefix + name`` of
    ``state``), checked against the shapes and dtypes a layer of that size keeps, finite and in
    their ranges (thresholds within ``threshold_bounds``, traces and history >= 0, pins within
    ``consolidation_ticks``, the ring position inside the ring); keyed by name.

    Raises
    ------
    StateError
        Naming the first key that is missing or does not fit.
    """
    s, d, r = slots, dim, rank
    f64 = np.float64
    out: dict[str, Any] = {"hist_pos": _state.integer(state, prefix + "hist_pos", 0, config.interaction_window - 1)}
    for name in ("At", "B", "At0", "B0"):
        out[name] = _state.real_array(state, prefix + name, (s, r, d), dtype)
    for name in ("phA", "phB"):
        out[name] = _state.whole_array(state, prefix + name, (s, r, d), bool)
    lo, hi = config.threshold_bounds
    for name, shape, bounds in (("interaction_history", (s, config.interaction_window), (0.0, np.inf)),
                                ("hist_sum", (s,), (-np.inf, np.inf)),
                                ("screening_threshold", (s,), (lo, hi)),
                                ("act_in", (s, d), (0.0, np.inf)), ("act_mid", (s, r), (0.0, np.inf)),
                                ("act_out", (s, d), (0.0, np.inf)),
                                ("pins", (s, r), (0.0, float(config.consolidation_ticks))),
                                ("current_entropy", (s,), (0.0, 1.0)), ("activity_total", (s,), (0.0, np.inf))):
        out[name] = _state.real_array(state, prefix + name, shape, f64, lo=bounds[0], hi=bounds[1])
    return out
