"""Causal sink attention in O(T) for a circuit model's "separable" heads (numba, torch fallback).

In the circuit model every q and k channel outside the circuit holds a constant (its fill). When a
head's circuit q channels and circuit k channels share no dimension, q(t) - Q varies only on
dimensions where k(u) - K does not, for any fixed row's Q and K, so the cross term vanishes:

    q(t) . k(u) = q(t) . K  +  Q . k(u)  -  Q . K        (scaled by 1/sqrt(d_head))
                =   a(t)    +    b(u)    -    c

The softmax over keys u <= t then weighs key u by exp(b(u)) whatever the query, and the query's
own term a(t) only moves the sink against the keys:

    y(t) = sum_{u<=t} exp(b(u)) v(u)  /  (exp(sink - a(t) + c) + sum_{u<=t} exp(b(u)))

two running sums over the positions instead of T^2 / 2 scores and exponentials per head (flash
attention is ~60% of an ablation pass at 1,024-token docs: bench/README.md). Without a sink the
query's term cancels. The sums run in float64 with flash's running maximum (rescaled when a new
largest b appears), so no exponential overflows; results agree with `sink_attention` to float32
rounding (tests compare both on heads of each kind).

`separable_attention(q, k, v, sink, Q, K)` runs the compiled kernel on float32 CPU tensors and the
torch formula otherwise (also what the tests compare the kernel with).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from inference.numba_kernels import compiled

ENABLED = True  # tests switch the compiled kernel off to run the torch path on the same inputs
ROWS_PER_TASK = 64  # (sequence, head) rows per task of the worker threads (inference.fast's pool)


def _separable(q, k, v, qref, kref, sink, has_sink, scale, out, lo, hi):  # pragma: no cover (numba)
    heads, T, dh = q.shape[1], q.shape[2], q.shape[3]
    acc = np.zeros(dh, np.float64)
    for i in range(lo, hi):
        n, h = i // heads, i % heads
        c = 0.0
        for d in range(dh):
            c += qref[h, d] * kref[h, d]
        c *= scale
        m = -np.inf
        total = 0.0
        acc[:] = 0.0
        for t in range(T):
            b = 0.0
            for d in range(dh):
                b += qref[h, d] * k[n, h, t, d]
            b *= scale
            if b > m:  # a new largest key weight: rescale the sums to it (flash's running maximum)
                r = 0.0 if m == -np.inf else math.exp(m - b)
                total *= r
                for d in range(dh):
                    acc[d] *= r
                m = b
            w = math.exp(b - m)
            total += w
            for d in range(dh):
                acc[d] += w * v[n, h, t, d]
            den = total
            if has_sink:
                a = 0.0
                for d in range(dh):
                    a += q[n, h, t, d] * kref[h, d]
                den += math.exp(sink[h] - a * scale + c - m)
            for d in range(dh):
                out[n, h, t, d] = acc[d] / den


def kernel():
    """The compiled kernel, or None (numba missing or unable to compile: a warning, then torch)."""
    return compiled(_separable, _warm_up, "inference.separable_attention")


def _warm_up(kern) -> None:
    f = np.float32
    x = np.ones((1, 2, 3, 2), f)
    ref, sink = np.ones((2, 2)), np.zeros(2)
    kern(x, x, x, ref, ref, sink, True, 0.5, np.empty_like(x), 0, 2)
    y = np.ones((1, 3, 2, 2), f).transpose(0, 2, 1, 3)  # the strided views the circuit model passes
    kern(y, y, y, ref, ref, sink, True, 0.5, np.empty((1, 3, 2, 2), f).transpose(0, 2, 1, 3), 0, 2)


def separable_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sink: torch.Tensor | None,
    qref: torch.Tensor,
    kref: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`inference.fast.sink_attention(q, k, v, sink)` of (N, H, T, d_head) tensors whose heads are
    separable: q varies from `qref` (H, d_head) only on dimensions where k equals `kref` (H, d_head)
    at every position, and k from `kref` only where q equals `qref` (the module docstring). The
    result (written into `out` when given, which may be a strided view) in q's dtype."""
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.shape[-2] == 0 or q.numel() == 0:
        return out
    kern = kernel() if ENABLED and q.device.type == "cpu" and q.dtype == torch.float32 else None
    if kern is not None and out.dtype == torch.float32:
        from inference.fast import _run_chunks, row_chunks

        arrays = [t.detach().numpy() for t in (q, k, v)]
        qr, kr = (t.detach().double().contiguous().numpy() for t in (qref, kref))
        s = np.zeros(q.shape[1]) if sink is None else sink.detach().double().contiguous().numpy()
        o = out.numpy()
        scale = 1.0 / math.sqrt(q.shape[-1])
        rows = q.shape[0] * q.shape[1]
        _run_chunks(
            lambda c: kern(*arrays, qr, kr, s, sink is not None, scale, o, c.start, c.stop), row_chunks(rows, ROWS_PER_TASK)
        )
        return out
    out.copy_(_separable_torch(q, k, v, sink, qref, kref))
    return out


def _separable_torch(q, k, v, sink, qref, kref) -> torch.Tensor:
    """The formula with cumulative sums (float64, shifted by each sequence's largest key weight);
    sequences where every weight up to some query underflows (key weights more than ~700 apart)
    are left to `sink_attention`."""
    from inference.fast import sink_attention

    scale = 1.0 / math.sqrt(q.shape[-1])
    qr, kr = qref.double(), kref.double()
    c = (qr * kr).sum(-1).mul(scale).view(1, -1, 1)
    a = torch.einsum("nhtd,hd->nht", q.double(), kr) * scale
    b = torch.einsum("nhtd,hd->nht", k.double(), qr) * scale
    m = b.amax(dim=2, keepdim=True)
    w = torch.exp(b - m)
    den = w.cumsum(dim=2)
    if sink is not None:
        den = den + torch.exp(sink.double().view(1, -1, 1) - a + c - m)
    y = (w.unsqueeze(-1) * v.double()).cumsum(dim=2) / den.unsqueeze(-1)
    bad = ~torch.isfinite(y).flatten(2).all(dim=2)  # (N, H)
    if bad.any() and torch.isfinite(torch.stack([q, k, v])).all():
        n, h = torch.nonzero(bad, as_tuple=True)
        # those (sequence, head) rows as the heads of one sequence, each with its own sink
        exact = sink_attention(q[n, h][None], k[n, h][None], v[n, h][None], None if sink is None else sink[h])
        y[n, h] = exact[0].double()
    return y.to(q.dtype)
