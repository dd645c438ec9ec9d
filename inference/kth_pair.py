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

In an ablation pass the un-ablated rows' thresholds (`base`) are known, and an ablation moves a
row's threshold by a rank or two at most, mostly: one vectorised pass over the row's float bits
counts the values above and at the base k-th value and finds the nearest value on either side,
which answers the row (a further pass per distinct value when it moved by 2-4 ranks; further, the
selection above). `kth_pair_stage` also writes, in the same pass over each row, the stage's output
at the circuit channels (`inference.circuit_model._TopkStage.run`: values kept where they reach
the threshold, else 0.0) and its tie flags, which torch did in ~6 more passes over the tensor.

`kth_pair(changing, window)` and `kth_pair_stage` return None when the kernel does not apply (numba
missing or unable to compile, not float32, not on CPU); the caller then runs the torch code.
"""

from __future__ import annotations

import numpy as np
import torch

from inference.numba_kernels import compiled

ENABLED = True  # tests switch the compiled kernel off to run the torch path on the same inputs


def _kth_pair_rows(
    ch, window, kth, kth1, lo_i, hi_i, base, base_kth, base_kth1, c_src, c_pos, cconst, cpos, out, tied
):  # pragma: no cover (numba)
    m = ch.shape[1]
    rows = window.shape[0]
    has_base = base.shape[0] == rows
    buf = np.empty(m, ch.dtype)  # the values inside the window's range
    cand = np.empty(m, ch.dtype)  # those between two window entries
    # the fast path from the base thresholds (below): float bits as int32
    ABS = np.int32(0x7FFFFFFF)  # clears the sign bit
    INF = np.int32(0x7F800000)  # +inf's bits; NaNs' are above
    NONE_ABOVE = np.int32(0x7FFFFFFF)  # no value above P (as bits: beyond every NaN)
    NONE_BELOW = np.int32(-1)  # none below P
    NEAR = 4  # ranks this far from P's are found from the nearest values, further ones by the general path
    bits = ch.view(np.int32)
    base_bits = base_kth.view(np.int32)
    near_a = np.empty(NEAR, ch.dtype)
    near_b = np.empty(NEAR, ch.dtype)
    one = np.zeros(1, np.int32)  # int32 bits -> float32
    one_f = one.view(np.float32)
    for i in range(lo_i, hi_i):
        r = i % rows
        for _row in range(1):  # the row's thresholds (each `continue` below: found)
            if has_base and 0 <= base_bits[r] <= INF:
                # From the un-ablated row's k-th largest P (a float >= +0.0, not NaN). The k-th and (k+1)-th largest
                # of the whole row are the (m+1)-th and (m+2)-th largest of X = the row's m |values| and
                # its window's m + 2 entries, padding included (k - m - 1 constants lie above the
                # window, none of them below its top; the others below its bottom). One pass counts
                # the values of X above P and at or above it, which places each wanted rank at P, or
                # d-th nearest above or below it, and finds the nearest value on either side; d > 1 (the
                # threshold moved by more than a rank) takes a short pass per further distinct value.
                # The passes work on the float bits (|x| >= 0 orders like its bits as int32, NaNs
                # above +inf): integer compares and min / max, which the compiler vectorises.
                pb = base_bits[r]
                gt = 0
                ge = 0
                nan = 0
                a1 = NONE_ABOVE  # the nearest |value| above P, as bits
                b1 = NONE_BELOW  # and below
                for j in range(m):
                    v = bits[i, j] & ABS
                    gt += v > pb
                    ge += v >= pb
                    nan += v > INF
                    a1 = min(a1, v if v > pb else NONE_ABOVE)
                    b1 = max(b1, v if v < pb else NONE_BELOW)
                if nan == 0:
                    P = base_kth[r]
                    # the window is sorted (descending): entries 0..wa-1 are above P, wb..m+1 below
                    lo_w, hi_w = 0, m + 2
                    while lo_w < hi_w:
                        mid = (lo_w + hi_w) // 2
                        if window[r, mid] > P:
                            lo_w = mid + 1
                        else:
                            hi_w = mid
                    wa = lo_w
                    hi_w = m + 2
                    while lo_w < hi_w:
                        mid = (lo_w + hi_w) // 2
                        if window[r, mid] >= P:
                            lo_w = mid + 1
                        else:
                            hi_w = mid
                    wb = lo_w
                    G = gt + wa  # values of X above P
                    E = ge + wb  # values of X at or above P
                    # rank m + 1 + t is the (G - rank + 1)-th smallest above P when > 0, at P, or the
                    # (rank - E)-th largest below P
                    da = min(max(0, G - m), NEAR)
                    db = min(max(0, m + 2 - E), NEAR)
                    if max(0, G - m) <= NEAR and max(0, m + 2 - E) <= NEAR:
                        # the da nearest values of X above P, ascending: the row's (each distinct value
                        # with its count, one more pass each) merged with the window's wa - 1, wa - 2, ...
                        na = 0
                        cur = a1
                        q = wa - 1
                        while na < da:
                            one[0] = cur
                            fc = np.float32(np.inf) if cur == NONE_ABOVE else one_f[0]
                            while na < da and q >= 0 and window[r, q] < fc:
                                near_a[na] = window[r, q]
                                na += 1
                                q -= 1
                            if na == da or (cur == NONE_ABOVE and q < 0):
                                break
                            if cur == NONE_ABOVE:  # window entries at +inf
                                near_a[na] = window[r, q]
                                na += 1
                                q -= 1
                                continue
                            if na + 1 == da:  # one more: no need to count this value's copies
                                near_a[na] = fc
                                na += 1
                                break
                            cnt = 0
                            nxt = NONE_ABOVE
                            for j in range(m):
                                v = bits[i, j] & ABS
                                cnt += v == cur
                                nxt = min(nxt, v if v > cur else NONE_ABOVE)
                            while na < da and cnt > 0:
                                near_a[na] = fc
                                na += 1
                                cnt -= 1
                            cur = nxt
                        # the db nearest below P, descending, likewise
                        nb = 0
                        cur = b1
                        q = wb
                        while nb < db:
                            one[0] = cur
                            fc = np.float32(-np.inf) if cur == NONE_BELOW else one_f[0]
                            while nb < db and q <= m + 1 and window[r, q] > fc:
                                near_b[nb] = window[r, q]
                                nb += 1
                                q += 1
                            if nb == db or (cur == NONE_BELOW and q > m + 1):
                                break
                            if cur == NONE_BELOW:  # window entries at -inf
                                near_b[nb] = window[r, q]
                                nb += 1
                                q += 1
                                continue
                            if nb + 1 == db:
                                near_b[nb] = fc
                                nb += 1
                                break
                            cnt = 0
                            nxt = NONE_BELOW
                            for j in range(m):
                                v = bits[i, j] & ABS
                                cnt += v == cur
                                nxt = max(nxt, v if v < cur else NONE_BELOW)
                            while nb < db and cnt > 0:
                                near_b[nb] = fc
                                nb += 1
                                cnt -= 1
                            cur = nxt
                        for t in range(2):
                            want = m + 1 + t
                            if want <= G:
                                value = near_a[G - want]
                            elif want > E:
                                value = near_b[want - E - 1]
                            else:
                                value = P
                            if t == 0:
                                kth[i] = value
                            else:
                                kth1[i] = value
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

        if out.shape[0] > 0:
            # The stage's output (`_TopkStage.run`): the circuit channels' values, each from the row
            # or a constant, kept where |value| >= the k-th largest, else 0.0 (as torch.where), and
            # whether an AbsTopK tie at a nonzero value involves one of them.
            t0, t1 = kth[i], kth1[i]
            hit = False
            for q in range(c_src.shape[0]):
                v = ch[i, c_src[q]]
                a = abs(v)
                hit |= a == t0
                out[i, c_pos[q]] = v if a >= t0 else np.float32(0.0)
            for q in range(cpos.shape[0]):
                v = cconst[r, q]
                a = abs(v)
                hit |= a == t0
                out[i, cpos[q]] = v if a >= t0 else np.float32(0.0)
            tied[i] = hit and t1 == t0 and t0 > 0


def kernel():
    """The compiled kernel, or None (numba missing or unable to compile: a warning, then torch)."""
    return compiled(_kth_pair_rows, _warm_up, "inference.kth_pair")


def _warm_up(k) -> None:
    ch, no_base, no_kth = np.zeros((2, 1), np.float32), np.zeros((0, 1), np.float32), np.zeros(0, np.float32)
    src, pos = np.zeros(1, np.int64), np.zeros(1, np.int64)
    out, tied = np.empty((2, 1), np.float32), np.empty(2, np.bool_)
    k(ch, np.zeros((1, 3), np.float32), *(np.empty(2, np.float32) for _ in "ab"), 0, 2, no_base, no_kth, no_kth,
      src, pos, np.zeros((1, 0), np.float32), pos[:0], out, tied)  # fmt: skip


# Rows per task of the worker threads (inference.fast's pool): enough work to hide the dispatch.
ROWS_PER_TASK = 4096


def kth_pair(
    changing: torch.Tensor, window: torch.Tensor, base: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(k-th, (k+1)-th) largest, shapes (..., rows, 1), of rows made of |changing| (..., rows, m)
    (signed values: their absolute values are taken here) and the constants of `window`
    (rows, m + 2); None when the compiled kernel does not apply.

    `base` = (|values| (rows, m), k-th (rows,), (k+1)-th (rows,)) of the un-ablated rows: rows are
    then answered from those thresholds, with a selection only where one moved by several ranks."""
    got = _run(changing, window, base, None)
    return None if got is None else got[:2]


def kth_pair_stage(
    changing: torch.Tensor,
    window: torch.Tensor,
    base: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    stage: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """`kth_pair` and, in the same pass over each row, an AbsTopK stage's output at the circuit
    channels (`inference.circuit_model._TopkStage.run`): `stage` = (src, pos, const, const_pos,
    width): out[..., pos] = changing[..., src], out[..., const_pos] = const (rows, |const_pos|),
    each kept where its |value| >= the row's k-th largest, else 0.0. Returns (k-th, (k+1)-th,
    out (..., rows, width), tied (..., rows): the k-th value is nonzero, equals the (k+1)-th and
    one of the row's outputs before the threshold), or None when the kernel does not apply."""
    return _run(changing, window, base, stage)


def _run(changing, window, base, stage):
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
    if stage is None:
        src = pos = cpos = np.zeros(0, np.int64)
        const, out, tied = np.zeros((1, 0), np.float32), np.empty((0, 0), np.float32), np.empty(0, np.bool_)
    else:
        src, pos, const, cpos, width = stage
        if const.dtype != torch.float32:
            return None
        src, pos, cpos = (t.detach().to(torch.int64).contiguous().numpy() for t in (src, pos, cpos))
        const = const.detach().contiguous().numpy()
        if len(cpos) and const.shape != (win.shape[0], len(cpos)):
            raise ValueError(f"kth_pair: constants {const.shape} for {win.shape[0]} rows and {len(cpos)} channels")
        if not len(cpos):
            const = np.zeros((1, 0), np.float32)
        out, tied = np.empty((n, width), np.float32), np.empty(n, np.bool_)
    _run_chunks(
        lambda s: k(ch, win, kth, kth1, s.start, s.stop, b, bk, bk1, src, pos, const, cpos, out, tied),
        row_chunks(n, ROWS_PER_TASK),
    )
    got = (torch.from_numpy(kth).view(*lead, 1), torch.from_numpy(kth1).view(*lead, 1))
    if stage is None:
        return got
    return (*got, torch.from_numpy(out).view(*lead, out.shape[1]), torch.from_numpy(tied).view(*lead))
