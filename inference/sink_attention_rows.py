"""Causal attention with the release's sink for many small heads, in compiled code (numba), with
torch's flash attention (`inference.fast.sink_attention`) as the fallback.

At csp_yolo2's widths (128 heads of 16 dimensions, q / k / v each AbsTopK'd to a quarter of their
2048 entries) torch's flash kernel spends ~1/3 of the fast forward: its blocked GEMMs are built for
wide heads, and with 16 dimensions their overhead dominates (bench/README.md). Here, per (sequence,
head), the keys and values are copied into (dim, token) rows once, and per query:

- scores over the query's nonzero dimensions only (~4 of 16 after AbsTopK), 4 per pass over the
  keys, vectorised over keys;
- softmax with a bound in place of the running maximum (sum over the query's dimensions of |q_d|
  times the largest |k_d| of the sequence, and the sink logit), so the exponentials are one
  vectorised pass (Cephes' expf polynomial, ~1 ulp); when the bound is far above the true maximum
  (the sum of the exponentials below 1e-12) the query is redone with its exact maximum;
- the sink adds exp(sink - bound) to the denominator (its value is zero);
- the output as 16 dot products over the keys, two queries per pass (each value loaded once for
  both).

Sums run in a different order than torch's (`fastmath` reassoc / contract: vectorised partial sums
and fused multiply-adds), so results agree to float rounding (tests compare with torch's flash path
and a float64 softmax). `sink_attention_rows` returns False when the kernel does not apply (switched
off, numba missing or unable to compile, not float32, d_head not a multiple of 4).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from inference.numba_kernels import bit_casts, compiled, helper

ENABLED = True  # tests switch the compiled kernel off to run torch's flash path on the same inputs

_f2i, _i2f = bit_casts()
_f = np.float32
_ZERO, _ONE, _NEG_INF = _f(0.0), _f(1.0), _f(-np.inf)
# exp(x) for x <= 0 (Cephes expf): x = n ln2 + r; 2^n from the bits of x log2(e) + 1.5 * 2^23
_LOG2E, _MAGIC, _C1, _C2, _XMIN = _f(1.4426950408889634), _f(12582912.0), _f(0.693359375), _f(-2.12194440e-4), _f(-87.0)
_E0, _E1, _E2, _E3, _E4, _E5 = _f(1.9875691500e-4), _f(1.3981999507e-3), _f(8.3334519073e-3), _f(4.1665795894e-2), _f(1.6666665459e-1), _f(5.0000001201e-1)
_EXP_BIAS = np.int32(0x4B400000 - 127)  # the bits of 1.5 * 2^23, less the exponent's bias
_TINY = _f(1e-12)
_FASTMATH = {"reassoc", "contract"}  # sums vectorised in partial sums, multiply-adds fused  # a denominator below this: the bound was too loose; redo with the exact maximum


def _exp_scores(sq, n, nz, qd, qi, Kt, m):  # pragma: no cover (numba)
    """sq[:n] = exp(scores - m) of one query (its nz nonzero dimensions qd at qi, padded to a
    multiple of 4 by the zero row of Kt), and their sum."""
    # dimensions beyond the first 4 first (few queries have them)
    if nz > 4:
        a0, a1, a2, a3 = qd[4], qd[5], qd[6], qd[7]
        k0, k1, k2, k3 = Kt[qi[4]], Kt[qi[5]], Kt[qi[6]], Kt[qi[7]]
        for j in range(n):
            sq[j] = a0 * k0[j] + a1 * k1[j] + a2 * k2[j] + a3 * k3[j] - m
        for t in range(8, nz, 4):
            a0, a1, a2, a3 = qd[t], qd[t + 1], qd[t + 2], qd[t + 3]
            k0, k1, k2, k3 = Kt[qi[t]], Kt[qi[t + 1]], Kt[qi[t + 2]], Kt[qi[t + 3]]
            for j in range(n):
                sq[j] += a0 * k0[j] + a1 * k1[j] + a2 * k2[j] + a3 * k3[j]
    else:
        for j in range(n):
            sq[j] = -m
    # + the first 4 dimensions, exp, and the sum, in one vectorised pass
    a0, a1, a2, a3 = qd[0], qd[1], qd[2], qd[3]
    k0, k1, k2, k3 = Kt[qi[0]], Kt[qi[1]], Kt[qi[2]], Kt[qi[3]]
    z = _ZERO
    for j in range(n):
        xx = max(sq[j] + a0 * k0[j] + a1 * k1[j] + a2 * k2[j] + a3 * k3[j], _XMIN)
        kf = xx * _LOG2E + _MAGIC
        r = kf - _MAGIC  # round(xx log2 e)
        x1 = xx - r * _C1 - r * _C2
        y = (((((_E0 * x1 + _E1) * x1 + _E2) * x1 + _E3) * x1 + _E4) * x1 + _E5) * (x1 * x1) + x1 + _ONE
        p = y * _i2f((_f2i(kf) - _EXP_BIAS) << np.int32(23))
        sq[j] = p
        z += p
    return z


_exp_scores = helper(_exp_scores, fastmath=_FASTMATH)


def _attention(q, k, v, sink, has_sink, scale, T, H, out, lo, hi):  # pragma: no cover (numba)
    """Tasks lo..hi, task = b * H + h: out[b T + i, h D : (h + 1) D] for every query i of sequence b,
    head h. q, k, v, out: (B T, H D) rows."""
    D = q.shape[1] // H
    Kt = np.zeros((D + 1, T + 16), np.float32)  # (dim, key); row D stays zero (padding of the passes)
    Vt = np.empty((D, T + 16), np.float32)  # (+16: rows not 4 KB apart, which would share L1 sets)
    kmax = np.empty(D, np.float32)
    S = np.empty((2, T + 16), np.float32)  # two queries' scores, then exponentials
    invs = np.empty(2, np.float32)
    qd = np.zeros(D + 8, np.float32)  # a query's nonzero dimensions' values (times scale), padded
    qi = np.full(D + 8, D, np.int64)  # and their dimensions (padding: D, the zero row of Kt)
    for task in range(lo, hi):
        b = task // H
        h = task % H
        r0 = b * T
        c0 = h * D
        kmax[:] = 0
        for j in range(T):
            for d in range(D):
                kv = k[r0 + j, c0 + d]
                Kt[d, j] = kv
                Vt[d, j] = v[r0 + j, c0 + d]
                kmax[d] = max(kmax[d], abs(kv))
        sl = sink[h] if has_sink else _ZERO
        for i0 in range(0, T, 2):
            nq = min(2, T - i0)
            for qq in range(nq):
                i = i0 + qq
                n = i + 1
                sq = S[qq]
                nz = 0
                bound = _ZERO
                for d in range(D):
                    c = q[r0 + i, c0 + d] * scale
                    qd[nz] = c
                    qi[nz] = d
                    nz += c != _ZERO
                    bound += abs(c) * kmax[d]
                for t in range(nz, nz + 8):
                    qd[t] = _ZERO
                    qi[t] = D
                m = max(bound, sl) if has_sink else bound
                z = _exp_scores(sq, n, nz, qd, qi, Kt, m)
                if has_sink:
                    z += _f(math.exp(sl - m))
                if z < _TINY:  # the bound was too loose: again with the scores' exact maximum
                    m = sl if has_sink else _NEG_INF
                    for j in range(n):
                        sc = _ZERO
                        for t in range(nz):
                            sc += qd[t] * Kt[qi[t], j]
                        m = max(m, sc)
                    z = _exp_scores(sq, n, nz, qd, qi, Kt, m)
                    if has_sink:
                        z += _f(math.exp(sl - m))
                invs[qq] = _ONE / z
            # the outputs: 4 dimensions per pass over the keys, both queries at once (the second
            # query's last key after the pass)
            n = i0 + 1
            s1 = S[0]
            s2 = S[1]
            for d in range(0, D, 4):
                v0, v1, v2, v3 = Vt[d], Vt[d + 1], Vt[d + 2], Vt[d + 3]
                a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = _ZERO
                for j in range(n):
                    p = s1[j]
                    pp = s2[j]
                    w0 = v0[j]
                    w1 = v1[j]
                    w2 = v2[j]
                    w3 = v3[j]
                    a0 += p * w0
                    a1 += p * w1
                    a2 += p * w2
                    a3 += p * w3
                    b0 += pp * w0
                    b1 += pp * w1
                    b2 += pp * w2
                    b3 += pp * w3
                out[r0 + i0, c0 + d] = a0 * invs[0]
                out[r0 + i0, c0 + d + 1] = a1 * invs[0]
                out[r0 + i0, c0 + d + 2] = a2 * invs[0]
                out[r0 + i0, c0 + d + 3] = a3 * invs[0]
                if nq == 2:
                    pl = s2[n]
                    out[r0 + i0 + 1, c0 + d] = (b0 + pl * v0[n]) * invs[1]
                    out[r0 + i0 + 1, c0 + d + 1] = (b1 + pl * v1[n]) * invs[1]
                    out[r0 + i0 + 1, c0 + d + 2] = (b2 + pl * v2[n]) * invs[1]
                    out[r0 + i0 + 1, c0 + d + 3] = (b3 + pl * v3[n]) * invs[1]


def kernel():
    """The compiled kernel, or None (numba missing or unable to compile: a warning, then torch)."""
    return compiled(_attention, _warm_up, "inference.sink_attention_rows", fastmath=_FASTMATH)


def _warm_up(kern) -> None:
    x = np.linspace(-1, 1, 3 * 8, dtype=np.float32).reshape(3, 8)
    for has_sink in (True, False):
        kern(x, x, x, np.zeros(2, np.float32), has_sink, _f(0.5), 3, 2, np.empty_like(x), 0, 2)


def sink_attention_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink_logit: torch.Tensor | None,
                        n_head: int, seq_len: int, out: torch.Tensor) -> bool:  # fmt: skip
    """Causal attention, scale 1/sqrt(d_head), with the sink when `sink_logit` (H,) is given, on
    rows: q, k, v (B T, H d_head) C-contiguous, sequence after sequence; the result into `out`
    (same shape, C-contiguous). The (sequence, head) pairs are spread over `inference.fast`'s
    worker threads. False (nothing written) when the kernel does not apply."""
    rows, width = q.shape
    d_head = width // n_head
    if (
        not ENABLED
        or any(t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() or t.shape != q.shape for t in (q, k, v, out))
        or d_head % 4
        or rows % seq_len
        or (sink_logit is not None and sink_logit.requires_grad and torch.is_grad_enabled())
    ):
        return False
    kern = kernel()
    if kern is None:
        return False
    from inference.fast import _run_chunks, row_chunks

    sink = np.zeros(n_head, np.float32) if sink_logit is None else sink_logit.detach().float().contiguous().numpy()
    arrays = [t.detach().numpy() for t in (q, k, v, out)]
    tasks = rows // seq_len * n_head
    scale = _f(1.0 / math.sqrt(d_head))
    per = max(1, -(-tasks // (4 * torch.get_num_threads())))  # a few tasks per thread: even loads
    _run_chunks(lambda s: kern(*arrays[:3], sink, sink_logit is not None, scale, seq_len, n_head, arrays[3], s.start, s.stop),
                row_chunks(tasks, per))  # fmt: skip
    return True
