"""A host stand-in for CuPy's array module that is strict about the host/device boundary.

``module()`` (also ``xp``) is a namespace usable wherever code takes ``xp=numpy`` or
``xp=cupy``: ``xp.zeros``, ``xp.einsum``, ``xp.maximum(x, 0, out=x)``, ``xp.linalg.norm``,
``xp.asarray``/``xp.asnumpy``, ``xp.get_array_module``, the dtypes and constants. Its arrays
are :class:`DeviceArray`: a wrapper around a numpy array (not a subclass) that, like
``cupy.ndarray`` (CuPy 13), refuses to be mixed with or silently turned into host arrays:

- ``np.asarray(dev)``/``np.array(dev)``, a C or pybind11 function wanting a numpy array, the
  buffer protocol: ``TypeError`` (``__array__`` raises CuPy's message; no ``__buffer__``);
- an ufunc, operator or numpy function (through NEP-13/NEP-18, ``np.add(dev, host)``,
  ``host @ dev``, ``np.stack([dev, host])``) given a host ``np.ndarray`` (0-d included), or an
  ufunc/operator given a list: ``TypeError("Unsupported type ...")``; a host array as an
  index, as the value assigned to an item or slice, or as ``out=``: ``TypeError``;
- ``flags.writeable`` does not exist (CuPy arrays cannot be made read-only), nor do ``data``,
  ``ctypes``, ``tobytes``, ``setflags``, ``flat``, the array-interface dunders; the namespace
  has no ``errstate``/``seterr`` (CuPy keeps no floating-point error state) nor ``random``.

The explicit transfers are the only ways across: ``xp.asarray``/``xp.array`` of host data (an
upload, always a copy) and ``xp.asnumpy``/``.get()``/``float()``/``int()``/``bool()``/
``complex()``/``.item()``/``.tolist()``/``format(dev, spec)`` (a download). ``transfers()``
counts them (``reset_transfers()`` zeroes), so a test can check that a hot path does not bounce
arrays between host and device. As in CuPy, reductions and full integer indexing give 0-d
device arrays (a 0-d view for indexing), ``out=`` writes in place into the device buffer and
the very ``out`` object is returned, basic-indexing views write through to their parent, and
``base`` collapses view chains to the root.

Compute is plain numpy underneath, so dtypes follow numpy's promotion rules (NEP 50), with
numpy's floating-point warnings off (a GPU keeps no error state: a division by zero is silent).
What it cannot check: the GPU's numerics (cuBLAS/cuTENSOR rounding and reduction orders, fused
multiply-adds, TF32), asynchrony (streams, events, kernels still running when the host reads),
memory pools and out-of-memory, and CuPy's own gaps: here every numpy function works on device
arrays, where CuPy may lack one; numpy functions still accept lists of numbers as array
arguments (CuPy's mostly do not; only ufuncs, operators and item assignment refuse them here).
"""
from __future__ import annotations

import functools
import threading
import types
from typing import Any

import numpy as np

__all__ = ["DeviceArray", "DeviceFlags", "module", "reset_transfers", "transfers", "xp"]

_IMPLICIT = ("Implicit conversion to a NumPy array is not allowed. "
             "Please use `.get()` to construct a NumPy array explicitly.")
_SCALARS = (bool, int, float, complex, np.generic)
# ndarray attributes that cupy.ndarray lacks or that would expose host memory
_BLOCKED_ATTRS = frozenset({"data", "ctypes", "tobytes", "tostring", "tofile", "flat", "setflags", "resize",
                            "byteswap", "newbyteorder", "getfield", "setfield", "itemset", "device",
                            "to_device", "dump", "dumps"})
# numpy names with no CuPy counterpart (or host-only), and index tricks that would build host arrays
# (CuPy has its own mgrid/ogrid/r_/c_; not mirrored); submodules other than linalg/fft are refused too
_NOT_IN_CUPY = frozenset({"errstate", "seterr", "geterr", "seterrcall", "geterrcall", "setbufsize",
                          "getbufsize", "memmap", "matrix", "asmatrix", "nditer", "mgrid", "ogrid", "r_", "c_"})
_SUBMODULES = frozenset({"linalg", "fft"})
# numpy functions answering a Python bool where CuPy answers a 0-d device array
_DEVICE_SCALAR_RESULTS = frozenset({"array_equal", "array_equiv", "allclose", "count_nonzero"})

_lock = threading.Lock()
_counts = {"uploads": 0, "downloads": 0}


def transfers() -> dict[str, int]:
    """The explicit host<->device transfers counted since the last ``reset_transfers()``."""
    with _lock:
        return dict(_counts)


def reset_transfers() -> None:
    with _lock:
        _counts["uploads"] = _counts["downloads"] = 0


def _count(kind: str) -> None:
    with _lock:
        _counts[kind] += 1


def _dev(arr: np.ndarray) -> DeviceArray:
    d = object.__new__(DeviceArray)
    d._a = arr
    return d


def _unsupported(x: Any) -> TypeError:
    return TypeError(f"Unsupported type {type(x)}")


def _is_host(x: Any) -> bool:
    """A host array, or something numpy would silently turn into one."""
    if isinstance(x, (np.ndarray, memoryview, bytearray)):
        return True
    if x is None or isinstance(x, (type, DeviceArray, str, bytes, slice, *_SCALARS)):
        return False
    return any(hasattr(x, n) for n in ("__array__", "__array_interface__", "__array_struct__"))


def _unwrap(x: Any, ids: dict[int, DeviceArray]) -> Any:
    """DeviceArrays (also inside lists/tuples) to their numpy arrays; host arrays refused."""
    if isinstance(x, DeviceArray):
        ids[id(x._a)] = x
        return x._a
    if isinstance(x, (list, tuple)):
        items = [_unwrap(i, ids) for i in x]
        return items if isinstance(x, list) else tuple(items)
    if _is_host(x):
        raise _unsupported(x)
    return x


def _operand(x: Any, ids: dict[int, DeviceArray]) -> Any:
    """An ufunc/operator operand: a DeviceArray or a Python/numpy scalar, nothing else."""
    if isinstance(x, DeviceArray):
        ids[id(x._a)] = x
        return x._a
    if isinstance(x, _SCALARS):
        return x
    raise _unsupported(x)


def _wrap(res: Any, ids: dict[int, DeviceArray]) -> Any:
    """numpy results to DeviceArrays (numpy scalars to 0-d ones); an input's own buffer to that input."""
    if isinstance(res, np.ndarray):
        known = ids.get(id(res))
        return known if known is not None and known._a is res else _dev(res)
    if isinstance(res, np.generic):
        return _dev(np.asarray(res))
    if isinstance(res, list):
        return [_wrap(r, ids) for r in res]
    if isinstance(res, tuple):
        items = [_wrap(r, ids) for r in res]
        return type(res)(*items) if hasattr(res, "_fields") else tuple(items)
    return res


def _call(fn: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    ids: dict[int, DeviceArray] = {}
    with np.errstate(all="ignore"):  # a GPU has no floating-point error state: no warnings
        res = fn(*_unwrap(args, ids), **{k: _unwrap(v, ids) for k, v in kwargs.items()})
    if name in _DEVICE_SCALAR_RESULTS and isinstance(res, (bool, int)):
        res = np.asarray(res)
    return _wrap(res, ids)


def _ufunc_call(uf: np.ufunc, method: str, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    ids: dict[int, DeviceArray] = {}
    if method == "at":  # (a, indices[, b]): the indices are an index, not an operand
        args = [_operand(inputs[0], ids), _index(inputs[1]), *(_operand(x, ids) for x in inputs[2:])]
    else:
        args = [_operand(x, ids) for x in inputs]
    kw = {k: _unwrap(v, ids) for k, v in kwargs.items() if k not in ("out", "where")}
    if "where" in kwargs:
        w = kwargs["where"]
        kw["where"] = w if isinstance(w, bool) else _operand(w, ids)
    out = kwargs.get("out")
    if out is not None:
        outs = out if isinstance(out, tuple) else (out,)
        for o in outs:
            if o is not None and not isinstance(o, DeviceArray):
                raise TypeError(f"Unsupported type {type(o)} for out= (it must be a device array)")
        kw["out"] = tuple(None if o is None else _operand(o, ids) for o in outs)
    with np.errstate(all="ignore"):
        return _wrap(getattr(uf, method)(*args, **kw), ids)


def _index(key: Any) -> Any:
    if isinstance(key, tuple):
        return tuple(_index(k) for k in key)
    if isinstance(key, DeviceArray):
        return key._a
    if isinstance(key, list):
        return _unwrap(key, {})
    if _is_host(key):
        raise TypeError(f"Unsupported index type {type(key)}: upload it with xp.asarray first")
    return key


def _binop(uf: np.ufunc, *, reflected: bool = False, inplace: bool = False) -> Any:
    def op(self: DeviceArray, other: Any) -> Any:
        if not isinstance(other, (DeviceArray, *_SCALARS)):
            if _is_host(other) or isinstance(other, (list, tuple)):
                raise _unsupported(other)
            return NotImplemented
        if inplace:
            return _ufunc_call(uf, "__call__", (self, other), {"out": (self,)})
        return _ufunc_call(uf, "__call__", (other, self) if reflected else (self, other), {})
    return op


def _unop(uf: np.ufunc) -> Any:
    return lambda self: _ufunc_call(uf, "__call__", (self,), {})


class DeviceFlags:
    """``cupy.ndarray.flags``: c_contiguous, f_contiguous, owndata; read-only, no ``writeable``."""

    __slots__ = ("c_contiguous", "f_contiguous", "owndata")

    def __init__(self, arr: np.ndarray) -> None:
        for name, value in (("c_contiguous", arr.flags.c_contiguous), ("f_contiguous", arr.flags.f_contiguous),
                            ("owndata", arr.base is None)):
            object.__setattr__(self, name, bool(value))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"cupy array flags are read-only (cannot set {name!r}; there is no 'writeable')")

    def __getitem__(self, name: str) -> bool:
        return {"C_CONTIGUOUS": self.c_contiguous, "F_CONTIGUOUS": self.f_contiguous,
                "OWNDATA": self.owndata}[name]

    def __repr__(self) -> str:
        return "\n".join(f"  {n.upper()} : {getattr(self, n)}" for n in self.__slots__)


class DeviceArray:
    """A "device" array: numpy storage, CuPy's refusals. ``DeviceArray(shape, dtype)`` allocates
    (as ``cupy.ndarray`` does); upload host data with ``xp.asarray``."""

    __slots__ = ("_a",)
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, shape: Any, dtype: Any = float, memptr: Any = None, strides: Any = None,
                 order: str = "C") -> None:
        if memptr is not None or strides is not None:
            raise NotImplementedError("strict_xp.DeviceArray does not take memptr/strides")
        self._a = np.empty(shape, dtype=dtype, order=order)

    # -- refusals and explicit downloads ---------------------------------------------------------
    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        raise TypeError(_IMPLICIT)

    def get(self, stream: Any = None, order: str = "C", out: np.ndarray | None = None,
            blocking: bool = True) -> np.ndarray:
        return asnumpy(self, stream=stream, order=order, out=out, blocking=blocking)

    def _download(self, convert: Any) -> Any:
        _count("downloads")
        return convert(self._a)

    def __float__(self) -> float:
        return self._download(float)

    def __int__(self) -> int:
        return self._download(int)

    def __complex__(self) -> complex:
        return self._download(complex)

    def __bool__(self) -> bool:
        return self._download(bool)

    def __format__(self, spec: str) -> str:
        if spec:  # reading a value into text: a download (a sync, on a GPU)
            _count("downloads")
        return format(self._a, spec)

    def __repr__(self) -> str:
        return "DeviceArray" + repr(self._a).removeprefix("array")

    def __str__(self) -> str:
        return str(self._a)

    # -- NEP 13 / NEP 18 -------------------------------------------------------------------------
    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
        return _ufunc_call(ufunc, method, inputs, kwargs)

    def __array_function__(self, func: Any, types_: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        for t in types_:
            if issubclass(t, np.ndarray):
                raise TypeError(f"Unsupported type {t}")
            if not issubclass(t, DeviceArray):
                return NotImplemented
        kwargs = {k: v for k, v in kwargs.items() if k != "like"}
        return _call(func, func.__name__, args, kwargs)

    # -- attributes, methods ---------------------------------------------------------------------
    @property
    def flags(self) -> DeviceFlags:
        return DeviceFlags(self._a)

    @property
    def base(self) -> DeviceArray | None:
        b = self._a.base
        return _dev(b) if isinstance(b, np.ndarray) else None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in _BLOCKED_ATTRS:
            raise AttributeError(f"'DeviceArray' object (strict stand-in for cupy.ndarray) has no attribute {name!r}")
        attr = getattr(self._a, name)
        if name in ("item", "tolist"):
            @functools.wraps(attr)
            def download(*args: Any, **kwargs: Any) -> Any:
                _count("downloads")
                return attr(*args, **kwargs)
            return download
        if callable(attr):
            @functools.wraps(attr)
            def method(*args: Any, **kwargs: Any) -> Any:
                ids = {id(self._a): self}
                with np.errstate(all="ignore"):
                    res = attr(*_unwrap(args, ids), **{k: _unwrap(v, ids) for k, v in kwargs.items()})
                return _wrap(res, ids)
            return method
        return _wrap(attr, {id(self._a): self})

    def __copy__(self) -> DeviceArray:
        return _dev(self._a.copy())

    def __deepcopy__(self, memo: Any) -> DeviceArray:
        return _dev(self._a.copy())

    # -- sequence protocol, indexing -------------------------------------------------------------
    def __len__(self) -> int:
        if self._a.ndim == 0:
            raise TypeError("len() of unsized object")
        return self._a.shape[0]

    def __iter__(self) -> Any:
        if self._a.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(self._a.shape[0]))

    def __getitem__(self, key: Any) -> DeviceArray:
        k = _index(key)
        res = self._a[k]
        if isinstance(res, np.generic):  # all-integer index: CuPy answers a 0-d view, not a scalar
            res = self._a[(*(k if isinstance(k, tuple) else (k,)), Ellipsis)]
        return _wrap(res, {id(self._a): self})

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(value, DeviceArray):
            value = value._a
        elif not isinstance(value, _SCALARS):
            raise TypeError(f"Unsupported type {type(value)} assigned to a device array "
                            "(assign a device array or a scalar; upload with xp.asarray)")
        self._a[_index(key)] = value


_BINARY = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "truediv": np.true_divide,
           "floordiv": np.floor_divide, "mod": np.remainder, "pow": np.power, "matmul": np.matmul,
           "and": np.bitwise_and, "or": np.bitwise_or, "xor": np.bitwise_xor, "lshift": np.left_shift,
           "rshift": np.right_shift}
for _name, _uf in _BINARY.items():
    setattr(DeviceArray, f"__{_name}__", _binop(_uf))
    setattr(DeviceArray, f"__r{_name}__", _binop(_uf, reflected=True))
    setattr(DeviceArray, f"__i{_name}__", _binop(_uf, inplace=True))
DeviceArray.__divmod__ = _binop(np.divmod)  # type: ignore[attr-defined]
DeviceArray.__rdivmod__ = _binop(np.divmod, reflected=True)  # type: ignore[attr-defined]
for _name, _uf in {"lt": np.less, "le": np.less_equal, "gt": np.greater, "ge": np.greater_equal,
                   "eq": np.equal, "ne": np.not_equal}.items():
    setattr(DeviceArray, f"__{_name}__", _binop(_uf))
for _name, _uf in {"neg": np.negative, "pos": np.positive, "abs": np.absolute, "invert": np.invert}.items():
    setattr(DeviceArray, f"__{_name}__", _unop(_uf))


class _Ufunc:
    """An ufunc of the namespace: numpy's, under the operand rules (no host arrays, no lists)."""

    def __init__(self, uf: np.ufunc) -> None:
        self._uf = uf
        self.__name__ = uf.__name__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _ufunc_call(self._uf, "__call__", args, kwargs)

    def __getattr__(self, name: str) -> Any:
        if name in ("reduce", "accumulate", "reduceat", "outer", "at"):
            return lambda *args, **kwargs: _ufunc_call(self._uf, name, args, kwargs)
        return getattr(self._uf, name)

    def __repr__(self) -> str:
        return f"<strict_xp ufunc {self.__name__!r}>"


def _function(fn: Any, name: str) -> Any:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        return _call(fn, name, args, kwargs)
    return call


class _Namespace(types.ModuleType):
    """numpy's namespace seen through the device rules; names CuPy lacks raise AttributeError."""

    def __init__(self, name: str, source: types.ModuleType, overrides: dict[str, Any]) -> None:
        super().__init__(name)
        self._source = source
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in _NOT_IN_CUPY:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r} (nor has cupy)")
        try:
            obj = getattr(self._source, name)
        except AttributeError:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}") from None
        if isinstance(obj, np.ufunc):
            obj = _Ufunc(obj)
        elif isinstance(obj, types.ModuleType):
            if name not in _SUBMODULES:
                raise AttributeError(f"module {self.__name__!r} does not provide numpy.{name}")
            obj = _Namespace(f"{self.__name__}.{name}", obj, {})
        elif callable(obj) and not isinstance(obj, type):
            obj = _function(obj, name)
        setattr(self, name, obj)
        return obj


# -- the explicit transfers and CuPy-only functions -------------------------------------------------
def _holds_device(x: Any) -> bool:
    return isinstance(x, DeviceArray) or (isinstance(x, (list, tuple)) and any(_holds_device(i) for i in x))


def asarray(a: Any, dtype: Any = None, order: str | None = None, *, blocking: bool = False) -> DeviceArray:
    """``cupy.asarray``: a device array unchanged (same dtype), host data uploaded (a copy)."""
    if isinstance(a, DeviceArray):
        return _wrap(np.asarray(a._a, dtype=dtype, order=order), {id(a._a): a})
    if _holds_device(a):
        return _dev(np.asarray(_unwrap(a, {}), dtype=dtype, order=order))
    _count("uploads")
    return _dev(np.array(a, dtype=dtype, order=order or "K", copy=True))


def array(obj: Any, dtype: Any = None, copy: bool = True, order: str = "K", subok: bool = False,
          ndmin: int = 0, *, blocking: bool = False) -> DeviceArray:
    """``cupy.array``: copies (``copy=False``: only if needed); host data is uploaded."""
    if isinstance(obj, DeviceArray):
        res = np.array(obj._a, dtype=dtype, copy=True if copy else None, order=order, ndmin=ndmin)
        return _wrap(res, {id(obj._a): obj})
    if _holds_device(obj):
        return _dev(np.array(_unwrap(obj, {}), dtype=dtype, order=order, ndmin=ndmin))
    _count("uploads")
    return _dev(np.array(obj, dtype=dtype, copy=True, order=order, ndmin=ndmin))


def asnumpy(a: Any, stream: Any = None, order: str = "C", out: np.ndarray | None = None, *,
            blocking: bool = True) -> np.ndarray:
    """``cupy.asnumpy``: a device array downloaded (a copy); host input returned as numpy."""
    if not isinstance(a, DeviceArray):
        res = np.asarray(a, order=order)
    else:
        _count("downloads")
        res = np.array(a._a, order=order, copy=True)
    if out is None:
        return res
    out[...] = res
    return out


def get_array_module(*args: Any) -> Any:
    """``cupy.get_array_module``: this namespace if any argument is a device array, else numpy."""
    return xp if any(isinstance(a, DeviceArray) for a in args) else np


xp = _Namespace("strict_xp", np, {
    "ndarray": DeviceArray, "asarray": asarray, "asanyarray": asarray, "array": array, "asnumpy": asnumpy,
    "get_array_module": get_array_module,
})


def module() -> _Namespace:
    """The strict CuPy stand-in namespace (one per process, as ``cupy`` is)."""
    return xp
