"""A sparse linear followed by AbsTopK, in one compiled pass where it can be, with torch as the fallback.

`linear_topk_rows` (C, `select_kernel.c`): the linear, its activation and the AbsTopK of its output
in one pass over tiles of 16 rows, the output never leaving the cache; the fused block's first
choice for q / k / v, the MLP's neurons and both residual deltas (1.2x on the whole forward at the
release's widths, bench/README.md "a sparse linear and its AbsTopK in one C pass"). Where it does
not build, the block computes the linear in columns and selects with the kernels below.
`norm_topk_rows` (C) does the same for an RMSNorm, the position embedding's rows appended and the
AbsTopK after them.

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


_ACTIVATIONS = {None: 0, "gelu": 1, "relu": 2}  # linear_select_rows_f32's act codes


def linear_topk_rows(linear, x: torch.Tensor, fracs: list[float | None], out: torch.Tensor, row0: int = 0,
                     activation: str | None = None) -> np.ndarray | None:  # fmt: skip
    """out[s, row0 + i] = AbsTopK(activation(linear(x))[i, s-th part of the features], fracs[s]) for
    rows x (n, in_features) of a sparse linear (`inference.fast.SparseLinear`), in one pass of the C
    kernel (`select_kernel.c`'s linear_select_rows_f32: the linear's output never leaves the cache);
    out (len(fracs), N, out_features / len(fracs)) C-contiguous. activation: None, "gelu" (the erf
    form, to float rounding) or "relu". Returns the (n,) bool array of the rows to redo (ties, NaNs: their out rows are
    unspecified), or None (nothing written) when the kernel does not apply (no C kernel, a dense
    weight, not float32 on CPU, a gradient needed)."""
    csr = linear.csr_arrays() if hasattr(linear, "csr_arrays") else None
    lib = native_kernels()
    if (
        csr is None
        or lib is None
        or torch.is_grad_enabled()
        or not _usable(x.detach(), out.detach(), linear.weight.detach())
        or x.dim() != 2
        or x.stride(1) != 1
        or out.dim() != 3
        or not out.is_contiguous()
    ):
        return None
    row, col, val = csr
    n, d = x.shape[0], linear.out_features
    if out.shape[0] != len(fracs) or out.shape[2] * len(fracs) != d or row0 + n > out.shape[1]:
        raise ValueError(f"linear_topk_rows: output {tuple(out.shape)} does not fit {len(fracs)} parts of {d} features")
    bias = None if linear.bias is None else linear.bias.detach().contiguous()  # held until the call returns
    if bias is not None and not _usable(bias):
        return None
    ks = _ks(fracs, out.shape[2])
    redo = np.zeros(n, np.bool_)
    rc = lib.linear_select_rows_f32(
        x.data_ptr(), n, x.shape[1], x.stride(0), row.ctypes.data, col.ctypes.data, val.ctypes.data, len(val),
        None if bias is None else bias.data_ptr(), d, _ACTIVATIONS[activation],
        ks.ctypes.data, len(fracs), out.data_ptr() + 4 * row0 * out.shape[2], out.shape[1] * out.shape[2],
        out.shape[2], redo.ctypes.data,
    )  # fmt: skip
    if rc != 0:
        raise MemoryError(f"select_kernel.c: linear_select_rows_f32 failed (code {rc}) on {n} rows of {d} features")
    return redo


def norm_topk_rows(norm, x: torch.Tensor, pos: torch.Tensor | None, frac: float | None, out: torch.Tensor,
                   rstd: torch.Tensor | None = None) -> np.ndarray | None:  # fmt: skip
    """out = AbsTopK(cat([norm(x), pos], -1), frac) for rows x (n, d) of an RMSNorm (`inference.
    model.Norm`), pos (n, dp) or None, out (n, d + dp) C-contiguous, in one pass of the C kernel
    (`select_kernel.c`'s rms_select_rows_f32). rstd (n, 1): the inverse scale to use (a hook point's
    value); None: computed in the kernel. Returns the (n,) bool array of the rows to redo (ties,
    NaNs), or None (nothing written) when the kernel does not apply (a LayerNorm, not float32 on
    CPU, a gradient needed, no C kernel)."""
    lib = native_kernels()
    parts = [x, out, norm.weight] + ([] if pos is None else [pos]) + ([] if rstd is None else [rstd])
    if (
        lib is None
        or not norm.rms
        or torch.is_grad_enabled()
        or not _usable(*(t.detach() for t in parts))
        or x.dim() != 2
        or x.stride(1) != 1
        or (pos is not None and (pos.dim() != 2 or pos.stride(1) != 1 or pos.shape[0] != x.shape[0]))
        or not out.is_contiguous()
    ):
        return None
    n, d = x.shape
    dp = 0 if pos is None else pos.shape[1]
    if out.shape != (n, d + dp):
        raise ValueError(f"norm_topk_rows: output {tuple(out.shape)} does not fit {n} rows of {d} + {dp}")
    weight = norm.weight.detach().contiguous()  # held until the call returns
    rstd = None if rstd is None else rstd.detach().reshape(n).contiguous()
    k = int(_ks([frac], d + dp)[0])
    redo = np.zeros(n, np.bool_)
    rc = lib.rms_select_rows_f32(
        x.data_ptr(), n, d, x.stride(0), None if rstd is None else rstd.data_ptr(), torch.finfo(x.dtype).eps,
        weight.data_ptr(), None if pos is None else pos.data_ptr(), dp, 0 if pos is None else pos.stride(0), k,
        out.data_ptr(), redo.ctypes.data,
    )  # fmt: skip
    if rc != 0:
        raise MemoryError(f"select_kernel.c: rms_select_rows_f32 failed (code {rc}) on {n} rows of {d + dp}")
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
