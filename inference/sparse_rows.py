"""The circuit model's sparse linear stages in one compiled pass (numba), with torch as the fallback.

An ablation pass computes, per linear layer, `out = x @ W[rows, circuit].T + K` over (ablations x
tokens) rows (`inference.circuit_model._LinearStage`). For the attention's output projection at
release scale that is ~1,200 output rows reading ~800 channels through ~1,800 nonzeros, on 8 x
2,048 rows: torch's dense-times-CSC transposes its input and its output inside, which costs more
than the multiply, and the `+ K` is one more pass over the output. Here each input row (its ~800
values in L1) runs once over W's nonzeros, accumulating into the row's outputs, and adds K in the
same pass: ~2-3x faster per stage (bench/README.md). Each output is the sum of its nonzeros'
products in column order, then + K, as torch's CSC product sums them, so results agree to float
rounding (tests compare both with a float64 product).

`sparse_rows(x, csr, k)` returns None when the kernel does not apply (numba missing or unable to
compile, not float32, not on CPU); the caller then runs torch.
"""

from __future__ import annotations

import numpy as np
import torch

from inference.numba_kernels import compiled

ENABLED = True  # tests switch the compiled kernel off to run the torch path on the same inputs
ROWS_PER_TASK = 2048  # rows per task of the worker threads (inference.fast's pool); a multiple of TILE


TILE = 16  # rows per tile of the kernel: one 64-byte vector of float32 per input and output channel


def _sparse_rows(x, out_rows, columns, values, k, out, lo, hi):  # pragma: no cover (numba)
    rows = k.shape[0]
    n_in, n_out = x.shape[1], out.shape[1]
    # TILE rows at a time, transposed into (channel, row) tiles: each nonzero then updates TILE
    # outputs with one vector multiply-add, where row by row it was a scalar one waiting on the
    # previous update of the same output (~1.4x per stage measured, bench/README.md). Each output
    # still sums its nonzeros' products in the same order, so the result is the same bit for bit.
    xt = np.empty((n_in, TILE), np.float32)
    acc = np.empty((n_out, TILE), np.float32)
    tail = lo + (hi - lo) // TILE * TILE
    for i in range(lo, tail, TILE):
        for c in range(n_in):
            for j in range(TILE):
                xt[c, j] = x[i + j, c]
        acc[:] = 0
        for p in range(values.shape[0]):
            o, c, v = out_rows[p], columns[p], values[p]
            for j in range(TILE):
                acc[o, j] += xt[c, j] * v
        for j in range(TILE):
            r = (i + j) % rows  # x's rows are (ablation, token); K is per token
            for o in range(n_out):
                out[i + j, o] = acc[o, j] + k[r, o]
    for i in range(tail, hi):  # the last rows (fewer than a tile), one at a time
        r = i % rows
        acc[:, 0] = 0
        for p in range(values.shape[0]):
            acc[out_rows[p], 0] += x[i, columns[p]] * values[p]
        for o in range(n_out):
            out[i, o] = acc[o, 0] + k[r, o]


def kernel():
    """The compiled kernel, or None (numba missing or unable to compile: a warning, then torch)."""
    return compiled(_sparse_rows, _warm_up, "inference.sparse_rows")


def _warm_up(kern) -> None:
    f, i = np.float32, np.int64
    kern(np.ones((2, 2), f), np.array([0, 1], i), np.array([1, 0], i), np.ones(2, f), np.zeros((1, 2), f),
         np.empty((2, 2), f), 0, 2)  # fmt: skip


def csr_arrays(w: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(output row, column, value) of each nonzero of W (out, in), in row order, as the kernel reads them."""
    csr = w.to_sparse_csr() if w.layout != torch.sparse_csr else w
    counts = csr.crow_indices().diff()
    out_rows = torch.repeat_interleave(torch.arange(len(counts)), counts)
    return out_rows.numpy(), csr.col_indices().numpy(), csr.values().contiguous().numpy()


def sparse_rows(x: torch.Tensor, csr: tuple[np.ndarray, np.ndarray, np.ndarray], k: torch.Tensor) -> torch.Tensor | None:
    """x (..., in) @ W.T + K, W (out, in) given by `csr_arrays`, K (rows, out) repeating over x's
    leading rows (x's rows are whole multiples of K's); None when the kernel does not apply."""
    if not ENABLED or x.dtype != torch.float32 or k.dtype != torch.float32 or x.device.type != "cpu":
        return None
    kern = kernel()
    if kern is None:
        return None
    from inference.fast import _run_chunks, row_chunks

    lead = x.shape[:-1]
    xs = x.detach().reshape(-1, x.shape[-1]).contiguous().numpy()
    ks = k.detach().contiguous().numpy()
    n = xs.shape[0]
    if n % ks.shape[0]:
        raise ValueError(f"sparse_rows: {n} rows are not a whole number of K's {ks.shape[0]} rows")
    out = np.empty((n, ks.shape[1]), np.float32)
    out_rows, columns, values = csr
    _run_chunks(lambda s: kern(xs, out_rows, columns, values, ks, out, s.start, s.stop), row_chunks(n, ROWS_PER_TASK))
    return torch.from_numpy(out).view(*lead, ks.shape[1])
