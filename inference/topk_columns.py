"""AbsTopK of a linear's output held in columns, in one compiled pass (numba), with torch as the fallback.

The fused block computes its wide linears as `W @ x.T` (`SparseLinear.columns`): the output is
(features, rows), a column per token, because torch's sparse-times-dense is fastest that way. What
followed cost more than the multiply: for q / k / v, a copy of each third into rows and three
selects; for the MLP, a transposed copy of the (8192, 256) chunk into rows for its select, then the
c_proj as dense-times-CSC on rows (which transposes inside). Here (`inference.topk_select.
_select_columns`) 16 columns at a time are copied into rows (each feature's 16 values are one
64-byte cache line), selected per row by `topk_select`'s radix select, and written out as rows (q, k,
v; the MLP's delta) or back as columns (the MLP's post_act, which its c_proj then multiplies as
`W @ h` too: ~4x faster than on rows). Per 256-row chunk ~4-5 ms less than torch (bench/README.md,
"Faster sparse forward, fused kernels").

Rows whose k-th |value| ties with a dropped one (or that hold a NaN) come back flagged, and the
caller redoes them with `abs_topk_exact`, so choices among ties stay the plain path's. The entry
points return None when the kernel does not apply (switched off, numba missing or unable to
compile, not float32 on CPU); the caller then runs torch.
"""

from __future__ import annotations

import numpy as np
import torch

from inference.numba_kernels import compiled
from inference.topk_select import _select_columns, native_kernels, select_columns_native

ENABLED = True  # tests switch the compiled kernel off to run the torch path on the same inputs


def kernel():
    """The compiled kernel: C where `inference.native` builds it (AVX-512), else numba's; None when
    neither can (a warning, then torch)."""
    if native_kernels() is not None:
        return select_columns_native
    return compiled(_select_columns, _warm_up, "inference.topk_columns")


def _warm_up(kern) -> None:
    hc = np.arange(-12, 12, dtype=np.float32).reshape(6, 4)
    for cols_out in (False, True):
        out = np.empty((2, 4, 3) if not cols_out else (1, 6, 4), np.float32)
        ks = np.array([1, 1] if not cols_out else [2], np.int64)
        kern(hc, 0, 4, ks, cols_out, out, 0, np.zeros(4, np.bool_))


def _ks(fracs, width: int) -> np.ndarray:
    """k per part, as `abs_topk` reads its fraction (None: keep all)."""
    return np.array([width if f is None else int(f * width) for f in fracs], np.int64)


def _usable(*tensors: torch.Tensor) -> bool:
    return ENABLED and all(t.dtype == torch.float32 and t.device.type == "cpu" and not t.requires_grad for t in tensors)


def topk_rows(hc: torch.Tensor, fracs: list[float | None], out: torch.Tensor, row0: int) -> np.ndarray | None:
    """out[s, row0 + i] = AbsTopK(hc[s-th part of its features, i], fracs[s]) for every column i of
    hc (d, n); out (len(fracs), N, d / len(fracs)) C-contiguous. Returns the (n,) bool array of the
    rows to redo (their out rows are unspecified), or None (nothing written) when the kernel does
    not apply."""
    if not _usable(hc, out) or not out.is_contiguous() or out.dim() != 3 or hc.dim() != 2:
        return None
    kern = kernel()
    if kern is None:
        return None
    d, n = hc.shape
    if out.shape[0] != len(fracs) or out.shape[2] * len(fracs) != d or row0 + n > out.shape[1]:
        raise ValueError(f"topk_rows: output {tuple(out.shape)} does not fit {len(fracs)} parts of {d} x {n} columns")
    hcs = hc.detach().contiguous().numpy()
    redo = np.zeros(n, np.bool_)
    kern(hcs, 0, n, _ks(fracs, out.shape[2]), False, out.detach().numpy(), row0, redo)
    return redo


def topk_columns(hc: torch.Tensor, frac: float | None) -> tuple[torch.Tensor, np.ndarray] | None:
    """(AbsTopK over each column of hc (d, n), as (d, n) columns; the (n,) bool array of the columns
    to redo, whose output is unspecified), or None when the kernel does not apply."""
    if not _usable(hc) or hc.dim() != 2:
        return None
    kern = kernel()
    if kern is None:
        return None
    d, n = hc.shape
    out = torch.empty(1, d, n)
    redo = np.zeros(n, np.bool_)
    kern(hc.detach().contiguous().numpy(), 0, n, _ks([frac], d), True, out.numpy(), 0, redo)
    return out[0], redo
