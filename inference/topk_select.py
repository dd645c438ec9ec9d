"""Exact AbsTopK selection of rows: which entries of each row are among its k largest |x|.

`select_rows(x, out, k)` writes `x * (|x| >= kth)` into `out` (kth = the k-th largest |x| of
the row) and returns the rows whose kth is ambiguous (tied with an entry outside the top k, or
NaNs), which the caller redoes with `torch.topk` (`inference.fast.abs_topk_exact`). Four
implementations, all exact, chosen per call:

- `native` (float32, where `inference.native` builds `select_kernel.c`: a C compiler and an
  AVX-512 CPU): the k-th largest |x| found by counting 16 lanes at a time against a ladder of
  thresholds around the previous row's k-th value, then within the bracket that holds it; the same
  output and flags as `radix`, 2-4x faster per row (bench/README.md).
- `radix` (float32, when numba is installed): a compiled radix select. One pass counts the
  rows' |x| in 2048 buckets of their float bits (which order like integers for |x| >= 0: the
  exponent and 3 mantissa bits), the bucket holding the k-th largest is found by walking down
  from the top, a second pass gathers that bucket's few members (~5% of a row) and a quickselect
  among them gives the exact kth; a third pass writes the output. ~2 ns per element on one core,
  against 5-9 for numpy (bench/README.md), and it releases the GIL, so `FastBlock`'s worker
  threads run it in parallel.
- `sort` (numpy): a full sort of |x|, for chunks with many exact zeros (np.sort is vectorised,
  x86-simd-sort, and equal zeros cost it nothing).
- `introselect` (numpy): `np.partition` on the bits of |x|, for chunks with few zeros (it
  degrades badly once most of a row is zeros: 6x slower at 60%).
"""

from __future__ import annotations

import ctypes

import numpy as np

from inference import native
from inference.numba_kernels import compiled, helper

# numpy fallback: chunks with at least this share of exact zeros are sorted, the others
# partitioned. At 40% zeros the two cost the same on 2048-wide rows; at 59% (q, k, v and the MLP
# neurons of the release-width bench) sort 4.9 ns/element vs introselect 31; at 0-25% zeros
# introselect 5.3-5.5 vs sort 8.4-9.1 (1 thread, 256-row chunks).
SORT_MIN_ZERO_FRACTION = 0.3

# "auto": native where it builds, else radix when numba is importable (float32), else numpy; or
# force one of "native", "radix" (float32 only), "numpy" (tests use this to check every
# implementation against topk).
METHOD = "auto"


def select_rows(x: np.ndarray, out: np.ndarray, k: int) -> np.ndarray:
    """AbsTopK of the rows of `x` (r, n), C-contiguous, 0 < k < n, into `out`; returns a bool (r,)
    array of the rows to redo (ambiguous kth or NaNs; their `out` rows are unspecified)."""
    if METHOD in ("auto", "native") and x.dtype == np.float32:
        lib = native_kernels()
        if lib is not None:
            return _select_rows_native(lib, x, out, k)
        if METHOD == "native":
            raise RuntimeError(
                "METHOD = 'native' needs inference/select_kernel.c built, which failed here (no C compiler or no AVX-512)"
            )
    if METHOD != "numpy" and x.dtype == np.float32:
        kernel = radix_kernel()
        if kernel is not None:
            return kernel(x, out, k)
        if METHOD == "radix":
            raise RuntimeError(
                "METHOD = 'radix' needs the numba kernel, which is unavailable here (numba not installed or unable to compile)"
            )
    return _select_rows_numpy(x, out, k)


def _select_rows_numpy(x: np.ndarray, out: np.ndarray, k: int) -> np.ndarray:
    n = x.shape[-1]
    a = np.abs(x)
    if a.size - np.count_nonzero(a) >= SORT_MIN_ZERO_FRACTION * a.size:
        srt = np.sort(a, axis=-1)
        kth = srt[:, n - k : n - k + 1]  # the k-th largest; 0 when a row has fewer than k nonzeros
        keep = np.greater_equal(a, kth)
        tied = (srt[:, n - k - 1] == kth[:, 0]) & (kth[:, 0] > 0)
    else:
        # |x| >= 0, so its float bits order like signed integers of the same width (and
        # introselect is ~10% faster on those)
        part = a.view(np.int32 if x.dtype == np.float32 else np.int64).copy()
        part.partition(n - k, axis=-1)
        kth = part[:, n - k : n - k + 1].view(x.dtype)
        keep = np.greater_equal(a, kth)
        # exactly k entries are >= the k-th largest unless it is tied (kth == 0: fewer than k
        # nonzeros, every one of them kept, as topk keeps them)
        tied = (np.count_nonzero(keep, axis=-1) != k) & (kth[:, 0] > 0)
    if np.isnan(a.sum()):  # rare: one cheap check per chunk, rows only then
        tied |= np.isnan(a).any(axis=-1)  # NaNs: leave them to topk
    # x * keep, then + 0.0 so that dropped negatives are +0.0 as topk's scatter leaves them
    # (inf is always kept, so there is no inf * 0).
    np.multiply(x, keep, out=out)
    out += 0.0
    return tied


# ---- the C select (inference/select_kernel.c, built by inference.native) -------------------------


def _declare(lib: ctypes.CDLL) -> None:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.select_rows_f32.argtypes = [p, p, i64, i64, i64, p]
    lib.select_rows_f32.restype = ctypes.c_int
    lib.select_columns_f32.argtypes = [p, i64, i64, i64, i64, p, i64, ctypes.c_int, p, i64, i64, p]
    lib.select_columns_f32.restype = ctypes.c_int
    lib.linear_select_rows_f32.argtypes = [p, i64, i64, i64, p, p, p, i64, p, i64, ctypes.c_int, p, i64, p, i64, i64, p]
    lib.linear_select_rows_f32.restype = ctypes.c_int
    lib.rms_select_rows_f32.argtypes = [p, i64, i64, i64, p, ctypes.c_float, p, p, i64, i64, i64, p, p]
    lib.rms_select_rows_f32.restype = ctypes.c_int
    lib.gelu_f32.argtypes = [p, p, i64]
    lib.gelu_f32.restype = None


def native_kernels() -> ctypes.CDLL | None:
    """The compiled `select_kernel.c` (`select_rows_f32`, `select_columns_f32`), or None."""
    return native.library("select_kernel.c", _declare)


def _select_rows_native(lib: ctypes.CDLL, x: np.ndarray, out: np.ndarray, k: int) -> np.ndarray:
    r, n = x.shape
    if not (x.flags.c_contiguous and out.flags.c_contiguous and out.shape == x.shape and out.dtype == x.dtype):
        raise ValueError(f"select_rows: x {x.shape} and out {out.shape} must be C-contiguous float32 of one shape")
    redo = np.zeros(r, np.bool_)
    if lib.select_rows_f32(x.ctypes.data, out.ctypes.data, r, n, k, redo.ctypes.data) != 0:
        raise MemoryError(f"select_kernel.c: out of memory selecting {r} rows of {n}")
    return redo


def select_columns_native(hc, lo, hi, ks, cols_out, out, row0, redo) -> None:
    """`_select_columns` (below; the same arguments, numpy arrays) by the C kernel, which must exist."""
    d, n = hc.shape
    rc = native_kernels().select_columns_f32(
        hc.ctypes.data, d, n, lo, hi, ks.ctypes.data, ks.shape[0], int(cols_out), out.ctypes.data, out.shape[1], row0,
        redo.ctypes.data,
    )  # fmt: skip
    if rc != 0:
        raise MemoryError(f"select_kernel.c: select_columns_f32 failed (code {rc}) on {d} x {n} columns")


# ---- the compiled radix select (numba, compiled on first use, cached on disk) -------------------


def radix_kernel():
    """The compiled kernel, or None when numba is not installed or cannot compile it here (numpy then
    serves; the first call compiles, ~1-2 s, or loads numba's on-disk cache)."""
    return compiled(_radix_select_rows, _warm_up, "inference.topk_select")


def _warm_up(kernel) -> None:
    x = np.arange(-8, 8, dtype=np.float32).reshape(2, 8)
    kernel(x, np.empty_like(x), 2)


def _radix_select_row(xb, ob, k, hist, buf, sparse):  # pragma: no cover (numba)
    """One row: ob = xb's AbsTopK (both the uint32 bits of float32 rows of n > k > 0 entries).
    Returns (redo: the kth is ambiguous, or NaNs; sparse: whether the next row should compact
    its nonzeros first). `hist` (2048 int32) is zero on entry and exit; `buf` holds n uint32."""
    n = xb.shape[0]
    nan = False
    if sparse:
        # pass 0: the nonzero |x| (as bits), compacted branch-free. Rows after a sparse linear
        # or a gelu are often ~60% exact zeros, and counting those in one histogram bucket
        # chains every increment on the one before (the select 1.5x slower than with this pass,
        # which costs ~25% on rows without zeros: hence the choice by the previous row).
        nz = 0
        for j in range(n):
            a = xb[j] & 0x7FFFFFFF
            nan |= a > 0x7F800000
            buf[nz] = a
            nz += a != 0
        src, width = buf, nz
    else:
        src, width = xb, n
    if not nan and width > k:
        # pass 1: bucket counts of |x| (bits >> 20: exponent and 3 mantissa bits); NaNs
        top = 0
        for q in range(width):
            a = np.int64(src[q] & 0x7FFFFFFF)
            nan |= a > 0x7F800000
            b = a >> 20
            hist[b] += 1
            top = max(top, b)
        # the bucket holding the k-th largest: walk down from the top bucket
        b, above = top, 0
        while b > 0 and above + hist[b] < k:
            above += hist[b]
            b -= 1
        sparse = n - width + hist[0] > n // 4  # zeros (and subnormals)
        hist[: top + 1] = 0
    if nan:
        return True, sparse
    if width <= k:  # at most k nonzeros: all of them kept, as topk keeps them
        for j in range(n):
            v = xb[j]
            ob[j] = v if (v & 0x7FFFFFFF) != 0 else 0
        return False, sparse
    # pass 2: that bucket's members, compacted (in place from buf: branch-free, m <= q)
    m = 0
    for q in range(width):
        a = src[q] & 0x7FFFFFFF
        buf[m] = a
        m += (a >> 20) == b
    # the (k - above)-th largest of buf[:m]: quickselect (Hoare partition, descending)
    want, lo, hi = k - above - 1, 0, m - 1
    while lo < hi:
        pivot = buf[(lo + hi) >> 1]
        p, q = lo, hi
        while p <= q:
            while buf[p] > pivot:
                p += 1
            while buf[q] < pivot:
                q -= 1
            if p <= q:
                buf[p], buf[q] = buf[q], buf[p]
                p += 1
                q -= 1
        if want <= q:
            hi = q
        elif want >= p:
            lo = p
        else:
            break
    kth = buf[want]
    # pass 3: keep |x| >= kth (kth == 0: fewer than k nonzeros, all kept); -0.0 -> +0.0
    kept = 0
    for j in range(n):
        v = xb[j]
        a = v & 0x7FFFFFFF
        keep = a >= kth
        kept += keep
        ob[j] = v if (keep and a != 0) else 0
    return kth > 0 and kept != k, sparse  # the kth tied with an entry outside the top k


def _radix_select_rows(x, out, k):  # pragma: no cover (run compiled by numba; tested through select_rows)
    r, n = x.shape
    xb = x.view(np.uint32)
    ob = out.view(np.uint32)
    redo = np.zeros(r, np.bool_)
    hist = np.zeros(2048, np.int32)  # 0x7F800000 >> 20 = 2040: every finite |x| has a bucket
    buf = np.empty(n, np.uint32)
    sparse = True  # the previous row was mostly zeros: compact its nonzeros first (pass 0)
    for i in range(r):
        redo[i], sparse = _radix_select_row(xb[i], ob[i], k, hist, buf, sparse)
    return redo


_radix_select_row = helper(_radix_select_row)  # a numba function (compiled into the kernels that call it)

# ---- the same select on columns (inference.topk_columns' kernel; here, because numba's disk cache of a
# kernel is invalidated only by changes to the kernel's own file, and this one calls _radix_select_row)

TILE = 16  # columns copied into rows at a time: 16 float32 = one 64-byte cache line per feature


def _select_columns(hc, lo, hi, ks, cols_out, out, row0, redo):  # pragma: no cover (numba)
    """Columns lo..hi of hc (d, n): AbsTopK of each of its len(ks) equal parts, ks[s] kept (k <= 0:
    none; k >= the width: all, no select), into out[s, row0 + i] (rows), or, `cols_out`, into
    out[0, :, i] (columns). redo[i]: the row's k-th |value| ties with a dropped one, or NaNs."""
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
