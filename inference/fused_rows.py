"""The fused block's sparse stages row by row in compiled code (numba), with torch as the fallback.

Per 256-row chunk at release widths, the MLP's `c_fc -> gelu -> AbsTopK -> c_proj -> AbsTopK` and
the attention's `c_attn -> AbsTopK of q, k, v` were ~2/3 of a block's chunk time in torch (each
stage one pass over a (256, 8192) or (256, 6144) tensor in memory, plus a transpose; bench/README.md,
"Faster sparse forward, fused kernels"). Here each row runs through all of them with its
intermediates in L1:

- a linear is a scatter of the row's nonzero inputs' weight columns (W in CSC) into an accumulator:
  only the ~1/4 of inputs AbsTopK kept cost anything, and each output sums its products in column
  order, as a CSR row product does; then + bias;
- gelu is torch's own formula for float32 on CPU (`x * 0.5 * (1 + erf(x / sqrt 2))` with the erf of
  Abramowitz-Stegun 7.1.26 around a 1-ulp exp), vectorised, so it agrees with `F.gelu` to a few ulp;
- AbsTopK is `inference.topk_select`'s radix select on the row in L1 (histogram of the float bits,
  the k-th bucket's members, a quickselect), and the kept entries feed the next scatter directly.

A row whose k-th value is tied with a dropped one (or holds a NaN) is flagged and redone by the
caller's torch code, so choices among ties stay the plain path's. `mlp_rows` / `qkv_rows` return
None when the kernel does not apply (switched off, numba missing or unable to compile, not float32
on CPU, a linear not run sparse, an activation other than gelu / relu); the caller then runs torch.
"""

from __future__ import annotations

import numpy as np
import torch

from inference.numba_kernels import bit_casts, compiled, helper

ENABLED = True  # tests switch the compiled kernels off to run the torch path on the same inputs

_f2i, _i2f = bit_casts()  # float32 <-> its bits as int32, as single instructions the compiler vectorises

_f = np.float32
# torch's Vectorized<float>::erf (ATen vec512/vec256): A&S 7.1.26 with t = 1 / (1 + p|x|)
_ALPHA, _HALF, _ONE = _f(0.7071067811865476), _f(0.5), _f(1.0)
_P, _P1, _P2, _P3, _P4, _P5 = _f(0.3275911), _f(0.254829592), _f(-0.284496736), _f(1.421413741), _f(-1.453152027), _f(1.061405429)
# exp(x) for x <= 0 (Cephes expf, ~1 ulp): x = n ln2 + r, 2^n from the bits of x log2(e) + 1.5 * 2^23
_LOG2E, _MAGIC, _C1, _C2, _XMIN = _f(1.4426950408889634), _f(12582912.0), _f(0.693359375), _f(-2.12194440e-4), _f(-87.0)
_E0, _E1, _E2, _E3, _E4, _E5 = _f(1.9875691500e-4), _f(1.3981999507e-3), _f(8.3334519073e-3), _f(4.1665795894e-2), _f(1.6666665459e-1), _f(5.0000001201e-1)
_EXP_BIAS = np.int32(0x4B400000 - 127)  # the bits of 1.5 * 2^23, less the exponent bias
_ABS = np.int32(0x7FFFFFFF)
_INF = np.int32(0x7F800000)


def _gelu_row(h, n):  # pragma: no cover (numba)
    """h[:n] = gelu(h[:n]) in place (torch's float32 formula)."""
    for o in range(n):
        x = h[o]
        z = x * _ALPHA
        t = _ONE / (_P * abs(z) + _ONE)
        r = (((_P5 * t + _P4) * t + _P3) * t + _P2) * t + _P1
        xx = max(-(z * z), _XMIN)  # below: exp underflows; erf is 1 to float precision anyway
        kf = xx * _LOG2E + _MAGIC
        m = kf - _MAGIC
        x1 = xx - m * _C1 - m * _C2
        y = (((((_E0 * x1 + _E1) * x1 + _E2) * x1 + _E3) * x1 + _E4) * x1 + _E5) * (x1 * x1) + x1 + _ONE
        e = y * _i2f((_f2i(kf) - _EXP_BIAS) << np.int32(23))
        erf = _ONE - r * t * e
        h[o] = x * _HALF * (_ONE + (erf if z >= 0 else -erf))


def _relu_row(h, n):  # pragma: no cover (numba)
    for o in range(n):
        h[o] = max(h[o], _f(0.0))


def _kth_bits(h, n, k, hist, buf):  # pragma: no cover (numba)
    """The bits of the k-th largest |h[:n]| (0 < k < n) as int32, or -1 when h holds a NaN
    (`inference.topk_select._radix_select_rows`' passes 1 and 2 and its quickselect)."""
    top = 0
    nan = False
    for j in range(n):
        a = _f2i(h[j]) & _ABS
        nan |= a > _INF
        b = a >> 20
        hist[b] += 1
        top = max(top, b)
    b, above = top, 0
    while b > 0 and above + hist[b] < k:
        above += hist[b]
        b -= 1
    hist[: top + 1] = 0
    if nan:
        return np.int32(-1)
    m = 0
    for j in range(n):
        a = _f2i(h[j]) & _ABS
        buf[m] = a
        m += (a >> 20) == b
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
    return buf[want]


def _kept(h, n, k, hist, buf, idx):  # pragma: no cover (numba)
    """AbsTopK of h[:n]: the kept entries' positions into idx (ascending), their count, and whether
    the row is ambiguous (its k-th |value| tied with a dropped one, or a NaN). k >= n keeps every
    nonzero, k <= 0 none (topk of 0). Zeros are never listed (a kept zero adds nothing)."""
    if k <= 0:
        return 0, False
    kth = np.int32(1) if k >= n else _kth_bits(h, n, k, hist, buf)
    if kth < 0:
        return 0, True
    kth = max(kth, np.int32(1))  # kth 0: fewer than k nonzeros, all kept (as topk keeps them)
    m = 0
    for j in range(n):
        idx[m] = j
        m += (_f2i(h[j]) & _ABS) >= kth
    return m, (k < n and m != k and kth > 1)


def _scatter(h, idx, m, ptr, rows, vals, acc):  # pragma: no cover (numba)
    """acc += W[:, idx[:m]] @ h[idx[:m]]: each listed input's weight column (W in CSC), scattered."""
    for q in range(m):
        j = idx[q]
        hj = h[j]
        for p in range(ptr[j], ptr[j + 1]):
            acc[rows[p]] += hj * vals[p]


def _nonzeros(x, i, n, idx):  # pragma: no cover (numba)
    m = 0
    for j in range(n):
        idx[m] = j
        m += x[i, j] != 0
    return m


def _mlp_rows(x, lo, hi, fc_ptr, fc_rows, fc_vals, fc_bias, gelu, k1, pr_ptr, pr_rows, pr_vals, pr_bias, k2, out, redo):  # pragma: no cover (numba)
    d_in = x.shape[1]
    d_mlp = fc_bias.shape[0]
    d_out = pr_bias.shape[0]
    h = np.empty(d_mlp, np.float32)
    y = np.empty(d_out, np.float32)
    idx = np.empty(max(d_in, d_mlp, d_out), np.int32)
    hist = np.zeros(2048, np.int32)  # 0x7F800000 >> 20 = 2040: every finite |x| has a bucket
    buf = np.empty(max(d_mlp, d_out), np.int32)
    xrow = np.empty(d_in, np.float32)
    for i in range(lo, hi):
        m = _nonzeros(x, i, d_in, idx)
        for j in range(d_in):
            xrow[j] = x[i, j]
        h[:] = 0
        _scatter(xrow, idx, m, fc_ptr, fc_rows, fc_vals, h)
        for o in range(d_mlp):
            h[o] += fc_bias[o]
        if gelu:
            _gelu_row(h, d_mlp)
        else:
            _relu_row(h, d_mlp)
        m, tied = _kept(h, d_mlp, k1, hist, buf, idx)
        y[:] = 0
        _scatter(h, idx, m, pr_ptr, pr_rows, pr_vals, y)
        for o in range(d_out):
            y[o] += pr_bias[o]
        m, tied2 = _kept(y, d_out, k2, hist, buf, idx)
        redo[i] = tied or tied2
        out[i, :] = 0
        for q in range(m):
            out[i, idx[q]] = y[idx[q]]


def _qkv_rows(x, lo, hi, ptr, rows, vals, bias, k, qkv, row0, redo):  # pragma: no cover (numba)
    d_in = x.shape[1]
    d = qkv.shape[2]
    acc = np.empty(3 * d, np.float32)
    idx = np.empty(max(d_in, d), np.int32)
    hist = np.zeros(2048, np.int32)
    buf = np.empty(d, np.int32)
    xrow = np.empty(d_in, np.float32)
    for i in range(lo, hi):
        m = _nonzeros(x, i, d_in, idx)
        for j in range(d_in):
            xrow[j] = x[i, j]
        acc[:] = 0
        _scatter(xrow, idx, m, ptr, rows, vals, acc)
        for o in range(3 * d):
            acc[o] += bias[o]
        tied = False
        for s in range(3):
            part = acc[s * d : (s + 1) * d]
            m, t = _kept(part, d, k[s], hist, buf, idx)
            tied |= t
            qkv[s, row0 + i, :] = 0
            for q in range(m):
                qkv[s, row0 + i, idx[q]] = part[idx[q]]
        redo[i] = tied


for _name in ("_gelu_row", "_relu_row", "_kth_bits", "_kept", "_scatter", "_nonzeros"):
    globals()[_name] = helper(globals()[_name])  # numba functions the kernels call (plain Python without numba)


def mlp_kernel():
    """The compiled MLP kernel, or None (numba missing or unable to compile: a warning, then torch)."""
    return compiled(_mlp_rows, _warm_up_mlp, "inference.fused_rows", error_model="numpy")


def qkv_kernel():
    return compiled(_qkv_rows, _warm_up_qkv, "inference.fused_rows", error_model="numpy")


def _tiny_csc(n_out, n_in):
    w = torch.eye(n_out, n_in)
    return _csc_of(w) + (np.zeros(n_out, np.float32),)


def _warm_up_mlp(kern) -> None:
    x = np.ones((2, 4), np.float32)
    fc, pr = _tiny_csc(8, 4), _tiny_csc(4, 8)
    for gelu in (True, False):
        kern(x, 0, 2, *fc, gelu, 2, *pr, 2, np.empty((2, 4), np.float32), np.zeros(2, np.bool_))


def _warm_up_qkv(kern) -> None:
    x = np.ones((2, 4), np.float32)
    kern(x, 0, 2, *_tiny_csc(12, 4), np.array([2, 2, 2], np.int64), np.empty((3, 2, 4), np.float32), 0, np.zeros(2, np.bool_))


def _csc_of(w: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W (out, in) by columns: (column pointers, output rows, values), int32 indices."""
    csr_t = w.detach().t().contiguous().to_sparse_csr()  # W.T by rows = W by columns
    return (csr_t.crow_indices().to(torch.int32).numpy(), csr_t.col_indices().to(torch.int32).numpy(),
            csr_t.values().contiguous().numpy())  # fmt: skip


def _scatter_arrays(linear) -> tuple | None:
    """(ptr, rows, vals, bias) of a `SparseLinear` whose weight runs sparse, else None. Cached on the
    weight's identity and version counter, as its compressed copy is (an in-place edit is seen)."""
    if linear._compressed_weight_t() is None:
        return None
    w = linear.weight
    key = (w.data_ptr(), w._version, None if linear.bias is None else (linear.bias.data_ptr(), linear.bias._version))
    cached = linear.__dict__.get("_scatter_cache")
    if cached is None or cached[0] != key:
        with torch.inference_mode(False), torch.no_grad():
            bias = torch.zeros(w.shape[0]) if linear.bias is None else linear.bias.detach().float().contiguous()
            cached = (key, _csc_of(w) + (bias.numpy(),))
        linear.__dict__["_scatter_cache"] = cached  # a plain attribute: never part of state_dict()
    return cached[1]


def _usable(x: torch.Tensor, *linears) -> bool:
    from inference.fast import SparseLinear

    return (
        ENABLED
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and x.dim() == 2
        and all(isinstance(lin, SparseLinear) and lin.weight.dtype == torch.float32 for lin in linears)
    )


def _k(frac: float | None, n: int) -> int:
    return n if frac is None else min(n, int(frac * n))


def mlp_rows(mlp, x: torch.Tensor, fallback) -> torch.Tensor | None:
    """The MLP's residual delta `AbsTopK(c_proj(AbsTopK(act(c_fc(x)))))` for rows x (n, d_in), the
    AbsTopKs at mlp_neuron and mlp_out; rows the kernel flags (ties, NaNs) come from `fallback(x_rows)`.
    None when the kernel does not apply."""
    cfg = mlp.config
    if not _usable(x, mlp.c_fc, mlp.c_proj) or cfg.activation_type not in ("gelu", "relu"):
        return None
    fc, pr = _scatter_arrays(mlp.c_fc), _scatter_arrays(mlp.c_proj)
    if fc is None or pr is None:
        return None
    kern = mlp_kernel()
    if kern is None:
        return None
    xs = x.detach().contiguous()
    n = xs.shape[0]
    out = torch.empty(n, pr[3].shape[0])
    redo = np.zeros(n, np.bool_)
    k1, k2 = _k(cfg.sparsity_at("mlp_neuron"), fc[3].shape[0]), _k(cfg.sparsity_at("mlp_out"), pr[3].shape[0])
    kern(xs.numpy(), 0, n, *fc, cfg.activation_type == "gelu", k1, *pr, k2, out.numpy(), redo)
    if redo.any():
        bad = torch.from_numpy(redo)
        out[bad] = fallback(xs[bad])
    return out


def qkv_rows(attn, x: torch.Tensor, qkv: torch.Tensor, s: slice, fallback) -> bool:
    """qkv[j, s] = AbsTopK of the j-th third of `c_attn(x)` (q, k, v at attn_q / attn_k / attn_v) for
    rows x (n, d_in); rows the kernel flags are written by `fallback(x_rows, rows)`. False (nothing
    written) when the kernel does not apply."""
    cfg = attn.config
    if not _usable(x, attn.c_attn) or not qkv.is_contiguous() or qkv.dtype != torch.float32:
        return False
    arrays = _scatter_arrays(attn.c_attn)
    if arrays is None:
        return False
    kern = qkv_kernel()
    if kern is None:
        return False
    d = qkv.shape[2]
    ks = np.array([_k(cfg.sparsity_at(loc), d) for loc in ("attn_q", "attn_k", "attn_v")], np.int64)
    xs = x.detach().contiguous()
    redo = np.zeros(xs.shape[0], np.bool_)
    kern(xs.numpy(), 0, xs.shape[0], *arrays, ks, qkv.numpy(), s.start, redo)
    if redo.any():
        fallback(xs[torch.from_numpy(redo)], torch.arange(s.start, s.stop)[torch.from_numpy(redo)])
    return True
