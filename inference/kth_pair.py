"""The circuit model's AbsTopK threshold in one compiled pass (numba), with a pure-torch fallback.

`inference.circuit_model._kth_largest_pair` finds, for each row of a batch of ablations, the k-th and
(k+1)-th largest |value| of a row made of m changing values and constants whose ranks k - m ..
k + 1 are kept (the row's "window"). In torch that is ~10 passes over an (A, rows, m) tensor
(compare, count, gather, a topk over the rows with values inside the window's range, minimum,
maximum): at release scale (32 ablations x 2,048 tokens x ~500 changing channels) it was most of
an ablation pass's time. Here one pass per row counts the values above the window, sorts those inside
its range (at release scale often most of the row), and takes the same max-min over them: the same
selection on the same float values, so the result is equal bit for bit (tests compare both with
a brute-force sort).

`kth_pair(changing, window)` returns None when the kernel does not apply (numba missing or
unable to compile, not float32, not on CPU); the caller then runs the torch code.
"""

from __future__ import annotations

import numpy as np
import torch

from inference.numba_kernels import compiled

ENABLED = True  # tests switch the compiled kernel off to run the torch path on the same inputs


def _kth_pair_rows(ch, window, kth, kth1, lo_i, hi_i, base, base_kth, base_kth1):  # pragma: no cover (numba)
    m = ch.shape[1]
    rows = window.shape[0]
    has_base = base.shape[0] == rows
    buf = np.empty(2 * m + 2, ch.dtype)
    for i in range(lo_i, hi_i):
        r = i % rows
        if has_base:
            # The un-ablated row's k-th and (k+1)-th largest K >= K1 stand when every value that
            # changed was and stays strictly above K, or was and stays strictly below K1: the counts
            # of values above, at and below each of them are unchanged (an O(m) scan, no selection).
            big, small = base_kth[r], base_kth1[r]
            same = True
            for j in range(m):
                v, b = abs(ch[i, j]), base[r, j]
                if v != b and not ((v > big and b > big) or (v < small and b < small)):
                    same = False
                    break
            if same:
                kth[i] = big
                kth1[i] = small
                continue
        hi = window[r, 0]  # A_{k-m}
        lo = window[r, m + 1]  # A_{k+1}
        above = 0
        p = 0
        for j in range(m):
            v = abs(ch[i, j])
            if v > hi:
                above += 1
            elif v >= lo:  # inside the window's range
                buf[p] = v
                p += 1
        if p == 0:
            kth[i] = window[r, m - above]
            kth1[i] = window[r, m + 1 - above]
            continue
        # Everything above the range (`above` values, and the constants of ranks < k - m) is
        # larger than all of S = (values in range) + (the window), everything below it smaller:
        # the union's k-th and (k+1)-th largest are S's (m + 1 - above)-th and (m + 2 - above)-th
        # (the window's +inf / -inf padding stands for the ranks that do not exist, as in torch).
        for j in range(m + 2):
            buf[p + j] = window[r, j]
        n = p + m + 2
        a = n - (m + 1 - above)  # ascending index of the k-th largest
        # quickselect of buf[a] with a three-way partition (rows hold many equal values, e.g. zeros)
        lo_j, hi_j = 0, n - 1
        while lo_j < hi_j:
            x, y, z = buf[lo_j], buf[(lo_j + hi_j) // 2], buf[hi_j]
            pivot = max(min(x, y), min(max(x, y), z))  # median of three
            lt, j, gt = lo_j, lo_j, hi_j
            while j <= gt:
                v = buf[j]
                if v < pivot:
                    buf[j] = buf[lt]
                    buf[lt] = v
                    lt += 1
                    j += 1
                elif v > pivot:
                    buf[j] = buf[gt]
                    buf[gt] = v
                    gt -= 1
                else:
                    j += 1
            if a < lt:
                hi_j = lt - 1
            elif a > gt:
                lo_j = gt + 1
            else:
                lo_j = hi_j = a
                buf[a] = pivot  # buf[lt..gt] all equal the pivot
        kth[i] = buf[a]
        best1 = buf[0]  # after the selection buf[:a] holds the values below it: the next is their max
        for j in range(1, a):
            if buf[j] > best1:
                best1 = buf[j]
        kth1[i] = best1


def kernel():
    """The compiled kernel, or None (numba missing or unable to compile: a warning, then torch)."""
    return compiled(_kth_pair_rows, _warm_up, "inference.kth_pair")


def _warm_up(k) -> None:
    ch, no_base, no_kth = np.zeros((2, 1), np.float32), np.zeros((0, 1), np.float32), np.zeros(0, np.float32)
    k(ch, np.zeros((1, 3), np.float32), *(np.empty(2, np.float32) for _ in "ab"), 0, 2, no_base, no_kth, no_kth)


# Rows per task of the worker threads (inference.fast's pool): enough work to hide the dispatch.
ROWS_PER_TASK = 4096


def kth_pair(
    changing: torch.Tensor, window: torch.Tensor, base: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(k-th, (k+1)-th) largest, shapes (..., rows, 1), of rows made of |changing| (..., rows, m)
    (signed values: their absolute values are taken here) and the constants of `window`
    (rows, m + 2); None when the compiled kernel does not apply.

    `base` = (|values| (rows, m), k-th (rows,), (k+1)-th (rows,)) of the un-ablated rows: a row
    whose changed values all stay on their side of the base thresholds keeps them without a selection."""
    if (
        not ENABLED
        or changing.shape[-1] == 0
        or changing.numel() == 0
        or changing.dtype != torch.float32
        or window.dtype != torch.float32
        or changing.device.type != "cpu"
    ):
        return None
    k = kernel()
    if k is None:
        return None
    from inference.fast import _run_chunks

    m = changing.shape[-1]
    lead = changing.shape[:-1]
    ch = changing.detach().reshape(-1, m).contiguous().numpy()
    win = window.detach().contiguous().numpy()
    n = ch.shape[0]
    if n % win.shape[0]:
        raise ValueError(f"kth_pair: {n} rows are not a whole number of the window's {win.shape[0]} rows")
    kth, kth1 = np.empty(n, np.float32), np.empty(n, np.float32)
    if base is not None and base[0].shape == (win.shape[0], m) and base[0].dtype == torch.float32:
        b, bk, bk1 = (t.detach().contiguous().numpy() for t in base)
    else:
        b = np.zeros((0, m), np.float32)
        bk = bk1 = np.zeros(0, np.float32)
    chunks = [slice(s, min(s + ROWS_PER_TASK, n)) for s in range(0, n, ROWS_PER_TASK)]
    _run_chunks(lambda s: k(ch, win, kth, kth1, s.start, s.stop, b, bk, bk1), chunks)
    return torch.from_numpy(kth).view(*lead, 1), torch.from_numpy(kth1).view(*lead, 1)
