"""Compiling the project's optional numba kernels: one way, shared by every kernel module.

Each kernel (`inference.topk_select`, `inference.topk_columns`, `inference.kth_pair`,
`inference.sparse_rows`) is plain Python compiled on first use (or loaded from numba's on-disk
cache) and warmed on a tiny input, so the compile happens once and not in the middle of a pass.
When numba is missing, or cannot compile the kernel here, the getter returns None (with a warning
for a failed compile) and the caller runs its pure torch / numpy fallback, which the tests run too.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable

_BUILT: dict[Callable, Callable | None] = {}
_LOCK = threading.Lock()


def compiled(fn: Callable, warm_up: Callable[[Callable], object], name: str) -> Callable | None:
    """`fn` compiled by numba (nogil, no bounds checks, cached on disk where numba can write), after
    `warm_up(kernel)` ran it once; None when numba is missing or the compile fails (`name` is the
    module named in the warning). Built once per process."""
    if fn not in _BUILT:
        with _LOCK:
            if fn not in _BUILT:
                _BUILT[fn] = _build(fn, warm_up, name)
    return _BUILT[fn]


def helper(fn: Callable) -> Callable:
    """`fn` as a numba function that compiled kernels call (compiled into each of them, with their
    options); `fn` itself when numba is missing (the kernels then do not exist either)."""
    try:
        import numba
    except ImportError:
        return fn
    return numba.njit(nogil=True, boundscheck=False)(fn)


def _build(fn: Callable, warm_up: Callable[[Callable], object], name: str) -> Callable | None:
    try:
        import numba
    except ImportError:
        return None
    try:
        try:
            kernel = numba.njit(nogil=True, cache=True, boundscheck=False)(fn)
        except RuntimeError:  # no writable cache location: compile per process instead
            kernel = numba.njit(nogil=True, boundscheck=False)(fn)
        warm_up(kernel)
    except Exception as e:  # noqa: BLE001 (any failure of an optional kernel falls back to torch / numpy)
        warnings.warn(f"{name}: numba kernel unavailable ({e!r}); using the fallback", stacklevel=3)
        return None
    return kernel
