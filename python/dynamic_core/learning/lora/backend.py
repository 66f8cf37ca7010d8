"""The frozen base under the LoRA stack, and the head that turns the hidden state into a score.

By default the base is a linear map ``x @ W`` (W orthogonal, drawn from the hierarchy's seed,
so the hidden state keeps the input's scale), computed on numpy arrays by the native fixed-order
row product (:func:`~dynamic_core.learning.lora.layer.r_rows`: ``hidden[k] = sum_i x[i] W[i, k]``,
``i`` in order): each agent's hidden state has the same bits wherever its row sits and on any CPU
(a BLAS GEMM's do not). Any frozen callable ``x -> hidden`` can
take its place; it receives a C-contiguous (n_agents, dim) array of the hierarchy's array
module (numpy; a CuPy array for a hierarchy built with ``xp="cupy"``, which ``torch.as_tensor``
and ``jnp.asarray`` take on the GPU through DLPack) and must return an array-like of the same
shape (numpy results are uploaded). It is treated as a constant: no gradient flows into it, only the
LoRA layers (and, when ``head_learning_rate > 0``, the head) learn.

Wrapping another framework's model means converting at the boundary::

    import torch
    model.eval()

    def base(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)).cpu().numpy()

    backend = LoRABackend(fn=base)

    # JAX: LoRABackend(fn=lambda x: np.asarray(jitted_model(jnp.asarray(x))))

    # on a GPU (LoRAHierarchy(..., xp="cupy")): x is a CuPy array, handed over by DLPack
    def base_gpu(x: cupy.ndarray) -> cupy.ndarray:
        with torch.no_grad():
            return cupy.from_dlpack(model(torch.from_dlpack(x)))

The model's output width must be the hierarchy's ``dim``; determinism is then the model's
(e.g. ``torch.use_deterministic_algorithms(True)`` and a fixed thread count).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .layer import r_rows, row_dot

__all__ = ["LoRABackend"]


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.array(a, copy=True)
    a.flags.writeable = False
    return a


def orthonormal_columns(g: np.ndarray) -> np.ndarray:
    """``Q`` of ``g = Q R`` (square, full rank) with ``R``'s diagonal positive: for a Gaussian ``g``
    a Haar-random orthogonal matrix. Classical Gram-Schmidt run twice per column, every dot
    product in the native fixed order (:func:`~dynamic_core.learning.lora.layer.r_rows`,
    :func:`~dynamic_core.learning.lora.layer.row_dot`), so the bits are the same on any CPU:
    LAPACK's QR goes through the BLAS kernel the CPU picks and its bits differ between them."""
    g = np.asarray(g, dtype=np.float64)
    n, d = g.shape
    qt = np.zeros((d, n))  # row j: column j of Q
    for j in range(d):
        v = g[:, j].copy()
        size = math.sqrt(float(row_dot(v[None, :], v[None, :])[0]))
        for _ in range(2 if j else 0):  # "twice is enough": orthogonal to working precision
            c = r_rows(v[None, :], np.ascontiguousarray(qt[:j].T))  # (1, j): v . q_i
            v = v - r_rows(c, qt[:j])[0]
        norm = math.sqrt(float(row_dot(v[None, :], v[None, :])[0]))
        if not norm > 1e-10 * size:  # what is left is rounding: g is (numerically) singular
            raise ValueError("orthonormal_columns: the columns are linearly dependent")
        qt[j] = v / norm
    return np.ascontiguousarray(qt.T)


class LoRABackend:
    """Frozen base and score head.

    Parameters
    ----------
    weight : ndarray (dim, dim), optional
        The base linear map (``hidden = x @ weight``); drawn orthogonal from the hierarchy's
        seed when neither it nor ``fn`` is given.
    head : ndarray (dim,), optional
        Score head (``score = tanh(hidden @ head)``); drawn N(0, 1/dim) when not given.
    fn : callable, optional
        Any frozen ``x -> hidden`` in place of the linear map (not saved by ``state_dict``:
        pass it again to ``from_state_dict``).
    """

    def __init__(self, weight: np.ndarray | None = None, head: np.ndarray | None = None,
                 fn: Callable[[np.ndarray], Any] | None = None) -> None:
        if fn is not None and weight is not None:
            raise ValueError("give a weight or a callable, not both")
        if head is not None and np.ndim(head) != 1:
            raise ValueError(f"head must be a 1-d vector of dim values, got shape {np.shape(head)}")
        self.weight = None if weight is None else _frozen(weight)
        self.head = None if head is None else _frozen(np.ravel(head))
        self.fn = fn
        self._on: dict[int, Any] = {}  # the weight uploaded, per array module
        if self.weight is not None and (self.weight.ndim != 2 or self.weight.shape[0] != self.weight.shape[1]):
            raise ValueError("weight must be a square (dim, dim) matrix")
        if self.weight is not None and self.head is not None and self.head.shape[0] != self.weight.shape[0]:
            raise ValueError(f"head has {self.head.shape[0]} values but weight is {self.weight.shape[0]} wide")
        for name, a in (("weight", self.weight), ("head", self.head)):
            if a is not None and not (a.dtype.kind in "fiu" and np.isfinite(a).all()):
                raise ValueError(f"{name} must hold finite real numbers (a NaN scores every agent NaN)")

    @property
    def dim(self) -> int | None:
        """Width fixed by the given arrays (None when nothing fixes it yet)."""
        if self.weight is not None:
            return int(self.weight.shape[0])
        if self.head is not None:
            return int(self.head.shape[0])
        return None

    def bind(self, dim: int, *, seed: int = 0, dtype: Any = np.float64) -> LoRABackend:
        """A fully specified backend for ``dim`` and ``dtype``: missing arrays drawn from
        ``seed`` (an orthogonal ``weight`` when there is no ``fn``; a N(0, 1/dim) head)."""
        dt = np.dtype(dtype)
        if self.dim is not None and self.dim != dim:
            raise ValueError(f"backend width {self.dim} differs from the hierarchy's dim {dim}")
        rng = np.random.default_rng([int(seed), 0x1B4C])  # a stream apart from the layers'
        weight = self.weight
        if weight is None and self.fn is None:
            weight = orthonormal_columns(rng.normal(size=(dim, dim)))  # Haar: Q of QR with R's diagonal > 0
        head = self.head
        if head is None:
            head = rng.normal(0.0, 1.0 / math.sqrt(dim), size=dim)
        out = LoRABackend(None if weight is None else np.asarray(weight, dtype=dt),
                          np.asarray(head, dtype=dt), self.fn)
        return out

    def base(self, x: np.ndarray, xp: Any = np) -> np.ndarray:
        """The frozen base's hidden state for ``x`` (n, dim), an array of module ``xp``: a
        callable receives ``x`` as it is (a CuPy array for a hierarchy on a GPU) and may return
        an array of either module; the linear map is uploaded once per module."""
        if self.fn is not None:
            got = self.fn(np.ascontiguousarray(x) if xp is np else x)
            out = xp.asarray(got, dtype=x.dtype)
            if out.shape != x.shape:
                raise ValueError(f"the base callable returned shape {out.shape}, expected {x.shape}")
            return out
        if self.weight is None:
            raise ValueError("unbound backend: call bind(dim) first")
        if xp is np:
            # x @ W row by row in a fixed order: hidden[k] = sum_i x[i] W[i, k], i in order
            return r_rows(x, self.weight)
        dev = self._on.get(id(xp))
        if dev is None:
            dev = self._on[id(xp)] = xp.asarray(self.weight)
        return x @ dev
