"""The circuit model's attention for "separable" heads in O(T), from the circuit's values alone.

In the circuit model every q and k channel outside the circuit holds its fill (Qf, Kf). A head
with circuit q or k channels, but no dimension holding both, has q(t) - Qf and k(u) - Kf varying
on disjoint dimensions, so their product vanishes and the score splits (scale s = 1/sqrt(d_head)):

    s q(t).k(u) = c + alpha(t) + beta(u),    c = s Qf.Kf,
    alpha(t) = s (q(t) - Qf).Kf,    beta(u) = s Qf.(k(u) - Kf)

both linear in the head's circuit values. The softmax over keys u <= t then weighs key u by
exp(beta(u)) whatever the query; the query's own term only moves the release's sink against them:

    y(t) = sum_{u<=t} exp(beta(u)) v(u)  /  (exp(sink - c - alpha(t)) + sum_{u<=t} exp(beta(u)))

two running sums over the positions instead of T^2 / 2 scores and exponentials per head (flash
attention was ~60% of an ablation pass at 1,024-token docs: bench/README.md). v outside the
circuit holds its fill, so only the circuit's v channels need a sum of their own; the head's other
channels are their fill times the keys' share of the weight. Without a sink the query term cancels.

`SeparableHeads` holds one layer's tables (built once per circuit model) and `run`s them on the
circuit values of a pass (any number of ablations): a numba kernel (float64 sums with flash's
running maximum, rescaled when a larger beta appears, so nothing overflows), or the same formula
in torch with `logcumsumexp` (any device; what the tests compare the kernel with).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from inference.numba_kernels import compiled

ENABLED = True  # tests switch the compiled kernel off to run the torch path on the same inputs
TASKS_PER_CHUNK = 64  # (ablation, doc, head) sequences per task of the worker threads (inference.fast's pool)


def head_channels(heads: torch.Tensor, d_head: int) -> torch.Tensor:
    """Every channel of `heads` (of q, k, v or the attention output), head by head."""
    return (heads[:, None] * d_head + torch.arange(d_head)).reshape(-1)


class SeparableHeads:
    """One layer's separable heads `heads` (S,) in the circuit model: built from the layer's circuit
    channels (q, k, v; sorted, as the circuit model keeps them), the fills of q, k and v (d_attn,),
    the sinks (n_head,) or None, and d_head. `run` gives their attention output, (ablations,
    rows, S * d_head), head by head, from a pass's circuit values."""

    def __init__(self, heads, q_channels, k_channels, v_channels, q_fill, k_fill, v_fill, sink, d_head: int):
        self.heads, self.dh, self.S = heads, d_head, len(heads)
        s = 1.0 / math.sqrt(d_head)
        local = torch.full((len(q_fill) // d_head,), -1, dtype=torch.long)  # each head's index in `heads`, or -1
        local[heads] = torch.arange(len(heads))
        qf, kf = q_fill.double(), k_fill.double()

        def score_map(channels, other_fill, own_fill):
            """(|channels|, S) weights and (S,) offset of alpha (q) or beta (k) from circuit values."""
            w = torch.zeros(len(channels), self.S, dtype=torch.float64)
            head = local[channels // d_head]
            inside = torch.nonzero(head >= 0).flatten()
            w[inside, head[inside]] = s * other_fill[channels[inside]]
            return w, -(own_fill[channels] @ w)

        self.w_alpha, self.alpha0 = score_map(q_channels, kf, qf)
        self.w_beta, self.beta0 = score_map(k_channels, qf, kf)
        channels = head_channels(heads, d_head)
        c = s * (qf[channels] * kf[channels]).view(-1, d_head).sum(-1)
        self.sink = None if sink is None else sink.detach().double()[heads] - c  # against exp(beta)
        self.v_fill = v_fill[channels].double()  # every channel of the heads, in head order
        # the circuit's v channels in these heads, grouped by head: column in the pass's v values,
        # dimension within the head, and where each head's run of them starts
        head = local[v_channels // d_head]
        mine = torch.nonzero(head >= 0).flatten()
        self.v_col = mine[torch.argsort(head[mine], stable=True)]
        self.v_dim = v_channels[self.v_col] % d_head
        self.v_head = head[self.v_col]
        self.v_start = torch.searchsorted(self.v_head, torch.arange(self.S + 1))

    def run(self, q, k, v, T: int, rows: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Attention output (A, rows, S * d_head) of the heads from the circuit's q, k and v values
        (A_kind, docs * T, |channels|), each A_kind 1 or A (values shared by every ablation); at
        every row, or at `rows` only. Written into `out` when given (a view may be strided)."""
        R = q.shape[1]
        A = max(q.shape[0], k.shape[0], v.shape[0])
        n_out = R if rows is None else len(rows)
        if out is None:
            out = torch.empty(A, n_out, self.S * self.dh, dtype=v.dtype, device=v.device)
        if self.S == 0:
            return out
        dev = q.device
        alpha = q.double() @ self.w_alpha.to(dev) + self.alpha0.to(dev)  # (A_q, R, S)
        beta = k.double() @ self.w_beta.to(dev) + self.beta0.to(dev)  # (A_k, R, S)
        kern = kernel() if ENABLED and dev.type == "cpu" and v.dtype == out.dtype == torch.float32 else None
        if kern is None:
            y = self._torch(alpha, beta, v, T, A)
            out.copy_(y if rows is None else y[:, rows])
            return out
        from inference.fast import _run_chunks, row_chunks

        out_row = torch.full((R,), -1, dtype=torch.long)
        out_row[torch.arange(R) if rows is None else rows] = torch.arange(n_out)
        sink = np.zeros(self.S) if self.sink is None else self.sink.numpy()
        args = (alpha.numpy(), beta.numpy(), v.detach().numpy(), self.v_start.numpy(), self.v_col.numpy(),
                self.v_dim.numpy(), self.v_fill.numpy(), sink, self.sink is not None, T, out_row.numpy(), out.numpy())  # fmt: skip
        tasks = A * (R // T) * self.S
        _run_chunks(lambda c: kern(*args, c.start, c.stop), row_chunks(tasks, TASKS_PER_CHUNK))
        return out

    def _torch(self, alpha, beta, v, T: int, A: int) -> torch.Tensor:
        """The formula with `logcumsumexp` in float64 (stable for any range of scores): (A, R, S * dh)."""
        S, dh, R = self.S, self.dh, v.shape[1]
        dev = v.device
        beta = beta.view(beta.shape[0], R // T, T, S)
        log_w = torch.logcumsumexp(beta, dim=2)  # log sum_{u<=t} exp(beta(u))
        log_den = log_w
        if self.sink is not None:
            alpha = alpha.view(alpha.shape[0], R // T, T, S)
            log_den = torch.logaddexp(log_w, self.sink.to(dev) - alpha)
        y = (self.v_fill.to(dev).view(S, dh) * torch.exp(log_w - log_den).unsqueeze(-1)).expand(A, R // T, T, S, dh).clone()
        if len(self.v_col):
            h = self.v_head.to(dev)
            vals = v[..., self.v_col.to(dev)].double().view(v.shape[0], R // T, T, -1)
            b = beta[..., h]
            # sum_u exp(beta) v = its positive part minus its negative part, each a log-sum-exp
            pos = torch.logcumsumexp(b + torch.log(vals.clamp(min=0)), dim=2)
            neg = torch.logcumsumexp(b + torch.log((-vals).clamp(min=0)), dim=2)
            den = log_den[..., h]
            y[..., h, self.v_dim.to(dev)] = (torch.exp(pos - den) - torch.exp(neg - den)).expand(A, -1, -1, -1)
        return y.view(A, R, S * dh).to(v.dtype)


def _separable(
    alpha, beta, v, v_start, v_col, v_dim, v_fill, sink, has_sink, T, out_row, out, lo, hi
):  # pragma: no cover (numba)
    S = alpha.shape[2]
    docs = out_row.shape[0] // T
    dh = out.shape[2] // S
    acc = np.zeros(dh, np.float64)
    for i in range(lo, hi):  # i = (ablation, doc, head)
        a = i // (docs * S)
        doc = (i // S) % docs
        h = i % S
        ia, ib, iv = min(a, alpha.shape[0] - 1), min(a, beta.shape[0] - 1), min(a, v.shape[0] - 1)
        j0, j1 = v_start[h], v_start[h + 1]
        m = -np.inf
        total = 0.0
        acc[:] = 0.0
        for t in range(T):
            r = doc * T + t
            b = beta[ib, r, h]
            if b > m:  # a new largest key weight: rescale the sums to it (flash's running maximum)
                scale = 0.0 if m == -np.inf else math.exp(m - b)
                total *= scale
                for j in range(j1 - j0):
                    acc[j] *= scale
                m = b
            w = math.exp(b - m)
            total += w
            for j in range(j0, j1):
                acc[j - j0] += w * v[iv, r, v_col[j]]
            o = out_row[r]
            if o < 0:
                continue
            den = total
            if has_sink:
                den += math.exp(sink[h] - alpha[ia, r, h] - m)
            share = total / den
            for d in range(dh):
                out[a, o, h * dh + d] = v_fill[h * dh + d] * share
            for j in range(j0, j1):
                out[a, o, h * dh + v_dim[j]] = acc[j - j0] / den


def kernel():
    """The compiled kernel, or None (numba missing or unable to compile: a warning, then torch)."""
    return compiled(_separable, _warm_up, "inference.separable_attention")


def _warm_up(kern) -> None:
    f, i = np.float64, np.int64
    ab, v = np.zeros((1, 2, 1), f), np.ones((1, 2, 1), np.float32)
    start, col, fill = np.array([0, 1], i), np.array([0], i), np.ones(2, f)
    for out in (np.empty((1, 2, 2), np.float32), np.empty((1, 2, 4), np.float32)[..., 1:3]):  # strided, as passes give
        kern(ab, ab, v, start, col, col, fill, np.zeros(1, f), True, 2, np.array([0, 1], i), out, 0, 1)
