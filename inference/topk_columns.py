"""AbsTopK (after gelu / relu) of a linear's output held in columns, in one compiled pass (numba),
with torch as the fallback.

The fused block computes its wide linears as `W @ x.T` (`SparseLinear.columns`): the output is
(features, rows), a column per token, because torch's sparse-times-dense is fastest that way. Torch
then spends more on what follows than on the multiply: for the MLP, gelu over the (8192, 256)
chunk, a transposed copy into rows, the select, and the c_proj's own transposes; for q / k / v, the
copy of each third into rows and three selects (bench/README.md, "Faster sparse forward, fused
kernels"). Here 16 columns at a time are copied into rows (each feature's 16 values are one 64-byte
cache line), activated in place (gelu: torch's own float32 formula, vectorised), selected per row by
`inference.topk_select`'s radix select, and written out as rows (q, k, v, the MLP's delta) or back
as columns (the MLP's post_act, which its c_proj reads as `W @ h` again). One pass over memory in,
one out, the rows in between in L1 / L2.

Rows whose k-th value is tied with a dropped one (or that hold a NaN) come back flagged and the
caller redoes them with `abs_topk_exact` on torch's activation, so choices among ties stay the
plain path's. The entry points return None when the kernel does not apply (switched off, numba
missing or unable to compile, not float32 on CPU); the caller then runs torch.

gelu: torch's CPU kernel computes `x * 0.5 * (1 + erf(x / sqrt 2))` with the erf of Abramowitz and
Stegun 7.1.26 (|error| < 1.5e-7) around Sleef's 1-ulp exp; the same formula here around Cephes'
expf (also ~1 ulp), so the two agree to a few float roundings (tests compare both, and with a
float64 gelu).
"""

from __future__ import annotations

import numpy as np
import torch

from inference.numba_kernels import compiled
from inference.topk_select import _radix_select_row

ENABLED = True  # tests switch the compiled kernel off to run the torch path on the same inputs
TILE = 16  # columns copied into rows at a time: 16 float32 = one 64-byte cache line per feature

def _topk_columns(hc, lo, hi, ks, cols_out, out, row0, redo):  # pragma: no cover (numba)
    """Columns lo..hi of hc (d, n): AbsTopK of each of its len(ks) equal parts with ks[s] kept (k <= 0: none; k >= width: all, no select), into
    out[s, row0 + i] (rows), or, `cols_out`, into out[0, :, i] (columns). redo[i]: ambiguous rows."""
    d = hc.shape[0]
    S = ks.shape[0]
    w = d // S
    # rows padded by a cache line: at a stride of d floats (a multiple of 4 KB) the 16 rows would
    # share one L1 set, and the copy into them would thrash it (3x slower measured)
    tile = np.empty((TILE, d + 16), np.float32)
    tb = tile.view(np.uint32)
    sel = np.empty((TILE, d + 16), np.float32)
    sb = sel.view(np.uint32)
    ob = out.view(np.uint32)
    hist = np.zeros(2048, np.int32)
    buf = np.empty(w, np.uint32)
    sparse = True
    for i0 in range(lo, hi, TILE):
        nt = min(TILE, hi - i0)
        if nt == TILE:  # (a constant trip count: the compiler unrolls the 16 copies)
            for o in range(d):
                for t in range(TILE):
                    tile[t, o] = hc[o, i0 + t]
        else:
            for o in range(d):
                for t in range(nt):
                    tile[t, o] = hc[o, i0 + t]
        for t in range(nt):
            bad = False
            for s in range(S):
                src = tb[t, s * w : (s + 1) * w]
                dst = sb[t, s * w : (s + 1) * w] if cols_out else ob[s, row0 + i0 + t]
                k = ks[s]
                if k <= 0:
                    dst[:] = 0
                elif k >= w:
                    dst[:] = src
                else:
                    r, sparse = _radix_select_row(src, dst, k, hist, buf, sparse)
                    bad |= r
            redo[i0 + t] = bad
        if cols_out and nt == TILE:
            for o in range(d):
                for t in range(TILE):
                    out[0, o, i0 + t] = sel[t, o]
        elif cols_out:
            for o in range(d):
                for t in range(nt):
                    out[0, o, i0 + t] = sel[t, o]


def kernel():
    """The compiled kernel, or None (numba missing or unable to compile: a warning, then torch)."""
    return compiled(_topk_columns, _warm_up, "inference.topk_columns", error_model="numpy")


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
