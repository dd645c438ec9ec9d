"""Compiling the project's optional numba kernels: one way, shared by every kernel module.

Each kernel (`inference.topk_select`, `inference.topk_columns`, `inference.kth_pair`,
`inference.sparse_rows`) is plain Python compiled on first use (or loaded from numba's on-disk
cache) and warmed on a tiny input, so the compile happens once and not in the middle of a pass. When numba is missing, or cannot compile
the kernel here, the getter returns None (with a warning for a failed compile) and the caller runs
its pure torch / numpy fallback, which the tests run too.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable

_BUILT: dict[Callable, Callable | None] = {}
_LOCK = threading.Lock()


def compiled(fn: Callable, warm_up: Callable[[Callable], object], name: str, **options) -> Callable | None:
    """`fn` compiled by numba (nogil, no bounds checks, cached on disk where numba can write), after
    `warm_up(kernel)` ran it once; None when numba is missing or the compile fails (`name` is the
    module named in the warning). Built once per process. `options`: further `numba.njit` options
    (e.g. `fastmath={"reassoc", "contract"}`, which lets sums vectorise in a different order)."""
    if fn not in _BUILT:
        with _LOCK:
            if fn not in _BUILT:
                _BUILT[fn] = _build(fn, warm_up, name, options)
    return _BUILT[fn]


def helper(fn: Callable, **options) -> Callable:
    """`fn` as a numba function that compiled kernels call (compiled into each of them; `options` as
    for `compiled`); `fn` itself when numba is missing (the kernels then do not exist either)."""
    try:
        import numba
    except ImportError:
        return fn
    return numba.njit(nogil=True, boundscheck=False, **options)(fn)


def bit_casts() -> tuple[Callable, Callable]:
    """(float32 -> its bits as int32, int32 bits -> float32) for compiled kernels: one LLVM bitcast
    each, which vectorises (numba has no scalar view); plain numpy versions without numba. (Signed:
    numba turns uint32 mixed with signed integers into float64.)"""
    import numpy as np

    try:
        from llvmlite import ir
        from numba import types
        from numba.extending import intrinsic
    except ImportError:
        return (lambda x: np.float32(x).view(np.int32)), (lambda u: np.int32(u).view(np.float32))

    @intrinsic
    def f2i(typingctx, x):
        return types.int32(types.float32), lambda context, builder, sig, args: builder.bitcast(args[0], ir.IntType(32))

    @intrinsic
    def i2f(typingctx, x):
        return types.float32(types.int32), lambda context, builder, sig, args: builder.bitcast(args[0], ir.FloatType())

    return f2i, i2f


def _build(fn: Callable, warm_up: Callable[[Callable], object], name: str, options: dict | None = None) -> Callable | None:
    options = options or {}
    try:
        import numba
    except ImportError:
        return None
    try:
        try:
            kernel = numba.njit(nogil=True, cache=True, boundscheck=False, **options)(fn)
        except RuntimeError:  # no writable cache location: compile per process instead
            kernel = numba.njit(nogil=True, boundscheck=False, **options)(fn)
        warm_up(kernel)
    except Exception as e:  # noqa: BLE001 (any failure of an optional kernel falls back to torch / numpy)
        warnings.warn(f"{name}: numba kernel unavailable ({e!r}); using the fallback", stacklevel=3)
        return None
    return kernel
