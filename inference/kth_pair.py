"""The circuit model's AbsTopK threshold in one compiled pass (numba), with a pure-torch fallback.

`inference.circuit_model._kth_largest_pair` finds, for each row of a batch of ablations, the k-th and
(k+1)-th largest |value| of a row made of m changing values and constants whose ranks k - m ..
k + 1 are kept (the row's "window"). In torch that is ~10 passes over an (A, rows, m) tensor
(compare, count, gather, a topk over the rows with values inside the window's range, minimum,
maximum): at release scale (32 ablations x 2,048 tokens x ~500 changing channels) it was most of
an ablation pass's time. Here one pass per row counts the values above the window and collects those
inside its range (at release scale often most of the row); a binary search over the sorted window
then finds the answer among the window's entries or the few collected values between two of them:
the same values selected, so the result is equal bit for bit (tests compare both with a brute-force
sort).

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
    buf = np.empty(m, ch.dtype)  # the values inside the window's range
    cand = np.empty(m, ch.dtype)  # those between two window entries
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
        # the union's k-th and (k+1)-th largest are its (m + 1 - above)-th and (m + 2 - above)-th
        # (the window's +inf / -inf padding stands for the ranks that do not exist, as in torch).
        # The window W = window[r] is sorted (descending): in the union in descending order (values
        # of S before equal entries of W), W[j] sits at position j + #{s in S: s >= W[j]}, which
        # grows with j. A binary search over j (each step one branch-free count over S) finds the
        # entries of W around the wanted position; the answer is one of them, or one of the few
        # values of S between them, selected there. (A quickselect over all of S and W, as before,
        # cost ~22 us a row at release scale, where S holds ~1,000 values and W ~1,100.)
        for t in range(2):
            want = m + 1 - above + t  # rank from the top: the k-th, then the (k+1)-th largest
            lo_j, hi_j = -1, m + 1  # the largest j with position <= want - 1 (-1: none; position -1)
            pos = -1  # lo_j's position
            while lo_j < hi_j:
                mid = (lo_j + hi_j + 1) // 2
                x = window[r, mid]
                c = 0
                for q in range(p):
                    if buf[q] >= x:
                        c += 1
                if mid + c <= want - 1:
                    lo_j, pos = mid, mid + c
                else:
                    hi_j = mid - 1
            j = lo_j
            if pos == want - 1:
                value = window[r, j]
            else:
                # the values of S between W[j] and W[j + 1]: s >= W[j + 1] and s < W[j]
                lower = window[r, j + 1]
                n = 0
                for q in range(p):
                    v = buf[q]
                    if v >= lower and (j < 0 or v < window[r, j]):
                        cand[n] = v
                        n += 1
                a = n - (want - 1 - pos)  # ascending index of the answer among them
                # quickselect of cand[a] with a three-way partition (rows hold many equal values)
                lo_q, hi_q = 0, n - 1
                while lo_q < hi_q:
                    x, y, z = cand[lo_q], cand[(lo_q + hi_q) // 2], cand[hi_q]
                    pivot = max(min(x, y), min(max(x, y), z))  # median of three
                    lt, q, gt = lo_q, lo_q, hi_q
                    while q <= gt:
                        v = cand[q]
                        if v < pivot:
                            cand[q] = cand[lt]
                            cand[lt] = v
                            lt += 1
                            q += 1
                        elif v > pivot:
                            cand[q] = cand[gt]
                            cand[gt] = v
                            gt -= 1
                        else:
                            q += 1
                    if a < lt:
                        hi_q = lt - 1
                    elif a > gt:
                        lo_q = gt + 1
                    else:
                        lo_q = hi_q = a
                        cand[a] = pivot  # cand[lt..gt] all equal the pivot
                value = cand[a]
            if t == 0:
                kth[i] = value
            else:
                kth1[i] = value


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
    from inference.fast import _run_chunks, row_chunks

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
    _run_chunks(lambda s: k(ch, win, kth, kth1, s.start, s.stop, b, bk, bk1), row_chunks(n, ROWS_PER_TASK))
    return torch.from_numpy(kth).view(*lead, 1), torch.from_numpy(kth1).view(*lead, 1)
