"""A faster forward pass for the weight-sparse GPT, equal to the plain one up to float rounding.

    model = accelerate(load_model(...))      # in place; returns the model
    with torch.no_grad():
        logits = model(idx)                   # same logits, same hook values

What changes (only while no gradient is needed; with autograd on, every piece runs the plain
code, so pruning and attribution keep their exact gradients):

- Linears whose weight is mostly exact zeros (density <= `SPARSE_MAX_DENSITY`, decided per
  matrix when it is first used and again whenever the weight is changed in place) multiply
  by a compressed copy of the weight: `x @ W.T` as dense-times-CSC (`torch.addmm` with
  `W.T` in CSC layout; see bench/README.md). At the release's density (~1/1000) that is 5-10x
  faster than the dense matmul; denser matrices (embeddings, the unembedding, the dense
  baselines) stay dense. Inside the fused block, the wide c_attn and c_fc are computed the other
  way round, `W @ x.T` as sparse-CSR-times-dense (`SparseLinear.columns`): torch's
  dense-times-CSC transposes both the input and the output inside, which costs more than the
  multiply itself; the output in columns is turned into rows by the copy AbsTopK makes anyway.
- Attention with a sink: the released algorithm (and `inference.model`) prepends a sink key
  and builds a (B, H, T, T+1) additive mask, which forces SDPA onto its slow "math" path
  (1.5 s per csp_yolo2 layer at 1024 tokens). Here, for heads of <= 16 dimensions (the
  release's), a compiled causal kernel with the sink folded into the softmax's denominator
  (`inference.attention_kernel`, ~3x torch's flash kernel at 16 dimensions); otherwise causal
  flash attention without the sink, which also returns each query's log-sum-exp `lse` of the
  scores, then one rescale. With the sink the softmax denominator gains `exp(s)` and the sink's
  value is zero, so the output is the sinkless one times `Z / (Z + exp(s)) = sigmoid(lse - s)`.
- AbsTopK by an exact selection (`abs_topk_exact`: `inference.topk_select`, a C select where it
  builds, else a compiled numba radix select; the radix select alone was 4-7x faster per call than
  torch.topk + scatter on one thread, the C one 2-4x faster again). In the fused block, each sparse
  linear that AbsTopK follows (c_attn -> q / k / v, c_fc -> GELU -> neurons, both c_proj -> deltas)
  runs with its activation and selection in one C pass over tiles of 16 tokens
  (`inference.topk_columns.linear_topk_rows`), and each RMSNorm with the position rows appended and
  the selection after it (`norm_topk_rows`). Without the C kernels: the linears in columns, the
  selects straight from them (`inference.topk_columns`), and the MLP's c_proj multiplying its
  selected neurons in columns too (`W @ h`, ~4x faster than on rows).
- Each block runs token chunks of 256 rows, the chunks spread over worker threads, one torch
  thread each, rather than every small op split over torch's threads (bench/README.md has the
  measurements). The head (ln_f, the unembedding, the bigram table) runs on them too, one part
  of the rows per worker, and the few ops left on the calling thread run on one thread, so
  torch's own threads stay asleep instead of spinning beside the workers (`_workers_only`). A
  forward's blocks share their large intermediate tensors (`_forward_buffers`).

Every module keeps its parameters and names, so `state_dict()` (and `save_model`) is
unchanged, and every hook point of `inference.model` is still called with the same values:
recording and interventions work as before. `decelerate(model)` undoes it.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from inference import attention_kernel, topk_columns
from inference.hooks import deliver, hook, hooks_active, recorded, row_interventions
from inference.memory import release_mapped_pages
from inference.model import GPT, MLP, Block, CausalSelfAttention, abs_topk
from inference.sparse_rows import csr_arrays
from inference.topk_select import select_rows

# Dense-times-CSC beats the dense matmul below about 2-3% density for the release's shapes
# (measured on 2 cores at 1024 tokens: 8192x2080 at 1%: 110 ms vs 280 ms dense; at 0.1%: 23 ms).
SPARSE_MAX_DENSITY = 0.02


def _grad_needed(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class SparseLinear(nn.Linear):
    """An `nn.Linear` that, when no gradient is needed and its weight is sparse enough,
    computes `x @ W.T + b` with a compressed copy of W (rebuilt when W changes in place)."""

    max_density: float = SPARSE_MAX_DENSITY

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _grad_needed(x, self.weight) or x.dtype != self.weight.dtype:
            return super().forward(x)
        wt = self._compressed_weight_t()
        if wt is None:
            return super().forward(x)
        x2 = x.reshape(-1, self.in_features)
        y = torch.mm(x2, wt) if self.bias is None else torch.addmm(self.bias, x2, wt)
        return y.view(*x.shape[:-1], self.out_features)

    def columns(self, x: torch.Tensor) -> torch.Tensor:
        """`self(x).t()` for rows `x` (n, in_features): the output (out_features, n), one column per
        row, which `.t()` turns back into rows (a view; `abs_topk_exact` copies it into rows).

        With a compressed weight this is `W @ x.T` as sparse (CSR) times dense, which skips the two
        transposes that dense-times-CSC (`forward`) pays inside torch: 2-4x faster for the
        release's wide layers (bench/README.md, 2026-12-06). The fused block reads its linears
        this way; its next op (AbsTopK) makes one copy into rows either way."""
        if _grad_needed(x, self.weight) or x.dtype != self.weight.dtype or x.dim() != 2:
            return self(x).t()
        wt = self._compressed_weight_t()
        if wt is None:
            return F.linear(x, self.weight, self.bias).t()
        w = wt.t()  # W in CSR: the same index buffers as W.T in CSC
        return torch.mm(w, x.t()) if self.bias is None else torch.addmm(self.bias.unsqueeze(1), w, x.t())

    def density(self) -> float:
        return self.weight.count_nonzero().item() / max(1, self.weight.numel())

    def csr_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """W's nonzeros in row order (`inference.sparse_rows.csr_arrays`: each one's output row,
        column and value), the indices as int32, for the C kernels (`inference.topk_columns.
        linear_topk_rows`); None when W is kept dense. Built with the compressed weight, and
        rebuilt with it."""
        wt = self._compressed_weight_t()
        if wt is None or wt.dtype != torch.float32 or wt.values().numel() >= 2**31:
            return None
        cached = self.__dict__.get("_csr_arrays")
        if cached is not None and cached[0] is wt:
            return cached[1]
        rows, cols, values = csr_arrays(wt.t())  # W.T in CSC = W in CSR
        arrays = (rows.astype(np.int32), cols.astype(np.int32), values)
        self.__dict__["_csr_arrays"] = (wt, arrays)
        return arrays

    def _compressed_weight_t(self) -> torch.Tensor | None:
        """W.T in CSC layout, or None when W is too dense to gain from it. Cached on the weight's
        identity and version counter, so an in-place edit (e.g. zeroing a neuron) is seen."""
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device, self.max_density)
        cached = self.__dict__.get("_sparse_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        wt = None
        if self.density() <= self.max_density:
            # inference_mode(False): a normal tensor even when first built under inference_mode.
            with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Sparse CSC tensor support is in beta")
                wt = w.detach().t().to_sparse_csc()
            # The forward reads only the compressed copy now: a memory-mapped checkpoint's pages
            # of this weight leave the resident set (inference.memory; a no-op for other memory).
            release_mapped_pages([w.detach()], whole_mappings=False)
        self.__dict__["_sparse_cache"] = (key, wt)  # a plain attribute: never part of state_dict()
        return wt


_FLASH_WITH_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def sink_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink_logit: torch.Tensor | None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal attention over (B, H, T, d_head) with scale 1/sqrt(d_head) and, when `sink_logit`
    (H,) is given, the release's sink: an always-visible extra key with that logit and value zero.
    `out`: a (B, H, T, d_head) tensor (a view may be strided) to write the result into, and return.

    Heads of <= 16 dimensions in float32 on CPU run `inference.attention_kernel` (compiled C, the
    heads spread over the worker threads). Otherwise torch: with the sink, the softmax denominator
    gains exp(s) and the output is the sinkless one times Z / (Z + exp(s)) = sigmoid(lse - s), where
    lse = log Z comes with causal flash attention.
    """
    y = attention_kernel.attention(q, k, v, sink_logit, out, run_parts=_run_chunks)
    if y is not None:  # heads of <= 16 dimensions, float32 on CPU: the compiled kernel
        return y
    scale = 1.0 / math.sqrt(q.shape[-1])
    if sink_logit is None:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return y if out is None else out.copy_(y)
    if (
        _FLASH_WITH_LSE is not None
        and q.device.type == "cpu"
        and q.dtype in (torch.float32, torch.bfloat16)
        and not _grad_needed(q, k, v, sink_logit)
    ):
        y, lse = _FLASH_WITH_LSE(q, k, v, 0.0, True, scale=scale)[:2]  # lse: (B, H, T)
        gate = torch.sigmoid(lse - sink_logit.to(lse.dtype).view(1, -1, 1)).unsqueeze(-1).to(y.dtype)
        return y * gate if out is None else torch.mul(y, gate, out=out)
    T = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * scale
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    sink = sink_logit.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    y = F.softmax(torch.cat([sink, scores], dim=-1), dim=-1)[..., 1:] @ v
    return y if out is None else out.copy_(y)


def abs_topk_exact(x: torch.Tensor, frac: float | None) -> torch.Tensor:
    """`inference.model.abs_topk` with the same output, found by a threshold.

    The k-th largest |x| of each row comes from `inference.topk_select` (a compiled radix select,
    or numpy's sort / introselect), then every entry at least that large is kept. That is exactly
    the top k unless the k-th value is tied with an entry outside the top k (or NaNs); such rows
    are redone by `abs_topk` itself, so even the choice among ties is the plain path's. A row with
    fewer than k nonzeros keeps all of them, as topk does. Runs on the calling thread without the
    GIL (`FastBlock` runs chunks on worker threads).
    """
    if frac is None:
        return x
    n = x.shape[-1]
    k = int(frac * n)
    if (
        k >= n
        or k == 0
        or x.numel() == 0
        or x.device.type != "cpu"
        or x.dtype not in (torch.float32, torch.float64)
        or _grad_needed(x)
    ):
        return abs_topk(x, frac)
    xs = x.detach().reshape(-1, n).contiguous()
    out = torch.empty_like(xs)
    tied = select_rows(xs.numpy(), out.numpy(), k)
    out = out.view(x.shape)
    if tied.any():
        bad = torch.from_numpy(tied).view(x.shape[:-1])
        out[bad] = abs_topk(x.detach()[bad], frac)
    return out


# Rows (tokens) per chunk in the fused block: keeps the (rows, d_mlp) intermediates at a few MB,
# in cache and in reused heap memory rather than fresh page-faulted allocations.
def _abs_topk_to_rows(hc: torch.Tensor, fracs: list[float | None], out: torch.Tensor, row0: int = 0) -> None:
    """out[j, row0 + i] = abs_topk_exact(column i of the j-th of len(fracs) equal parts of hc's
    features) for a linear's output in columns hc (features, n) and out (len(fracs), N, features /
    len(fracs)): by the compiled kernel (`inference.topk_columns`) where it applies, its flagged rows
    (ties, NaNs) and everything else by `abs_topk_exact`, so ties are chosen as the plain path does."""
    redo = topk_columns.topk_rows(hc, fracs, out, row0)
    if redo is not None and not redo.any():
        return
    width, n = out.shape[2], hc.shape[1]
    rows = slice(None) if redo is None else torch.from_numpy(redo)
    for j, frac in enumerate(fracs):
        out[j, row0 : row0 + n][rows] = abs_topk_exact(hc[j * width : (j + 1) * width].t()[rows], frac)


def _activation(h: torch.Tensor, kind: str | None) -> torch.Tensor:
    return h if kind is None else F.gelu(h) if kind == "gelu" else F.relu(h)


def _linear_abs_topk(
    linear: nn.Linear, x: torch.Tensor, fracs: list[float | None], out: torch.Tensor, row0: int = 0,
    activation: str | None = None, fallback: bool = True,
) -> bool:  # fmt: skip
    """out[j, row0 + i] = abs_topk_exact(j-th of len(fracs) equal parts of activation(linear(x))[i],
    fracs[j]) for rows x (n, in) and out (len(fracs), N, out / len(fracs)): by the C kernel in one pass
    where it applies (`topk_columns.linear_topk_rows`), its flagged rows (ties, NaNs) recomputed by
    torch and `abs_topk_exact`, so ties are chosen as the plain path does. Where it does not apply: the
    linear in columns and `_abs_topk_to_rows` when `fallback`, else nothing is written and it returns
    False."""
    redo = topk_columns.linear_topk_rows(linear, x, fracs, out, row0, activation)
    if redo is None:
        if not fallback:
            return False
        _abs_topk_to_rows(_activation(linear.columns(x), activation), fracs, out, row0)
        return True
    if redo.any():
        rows = torch.from_numpy(redo)
        h, width = _activation(linear(x[rows]), activation), out.shape[2]
        for j, frac in enumerate(fracs):
            out[j, row0 : row0 + x.shape[0]][rows] = abs_topk_exact(h[:, j * width : (j + 1) * width], frac)
    return True


def _abs_topk_columns(hc: torch.Tensor, frac: float | None) -> torch.Tensor:
    """abs_topk_exact over each column of hc (features, n), returned as columns (features, n): by the
    compiled kernel where it applies (its flagged columns, and everything else, by abs_topk_exact)."""
    fused = topk_columns.topk_columns(hc, frac)
    if fused is None:
        return abs_topk_exact(hc.t(), frac).t()
    out, redo = fused
    if redo.any():
        cols = torch.from_numpy(redo)
        out[:, cols] = abs_topk_exact(hc[:, cols].t(), frac).t()
    return out


CHUNK_ROWS = 256
HEAD_ROWS = 2048


def _norm_abs_topk(norm, x: torch.Tensor, pos: torch.Tensor | None, frac: float | None, at_rstd) -> torch.Tensor:
    """abs_topk_exact(cat([norm(x), pos], -1), frac) for rows x (n, d) (a chunk), with
    `at_rstd(inverse scale (n, 1))` in place of the norm's hook call (a chunk is not the tensor the
    hook point expects; None: no hook is active). An RMSNorm runs in one C pass (norm, append, select:
    `topk_columns.norm_topk_rows`), its flagged rows (ties, NaNs) redone here by torch; otherwise torch."""
    rstd = None if at_rstd is None else at_rstd(norm.inv_scale(x))
    out = x.new_empty(x.shape[0], x.shape[1] + (0 if pos is None else pos.shape[1]))
    redo = topk_columns.norm_topk_rows(norm, x, pos, frac, out, rstd)
    if redo is not None and not redo.any():
        return out
    rows = slice(None) if redo is None else torch.from_numpy(redo)
    h = norm.scale(x[rows], norm.inv_scale(x[rows]) if rstd is None else rstd[rows])
    if pos is not None:
        h = torch.cat([h, pos[rows]], dim=-1)
    if redo is None:
        return abs_topk_exact(h, frac)
    out[rows] = abs_topk_exact(h, frac)
    return out


class _Taps:
    """The hook points of one fused block that an active recorder asks for, assembled chunk by
    chunk into full (B*T, width) tensors and handed to the recorders, in forward order, at the end."""

    def __init__(self, names: list[str], n_rows: int):
        self.order = [name for name in names if recorded(name)]
        self.n_rows, self.full = n_rows, {}
        self.lock = threading.Lock()

    def put(self, name: str, s: slice, t: torch.Tensor) -> None:
        if name in self.order:
            with self.lock:  # chunks may run on several threads: one full tensor per name
                if name not in self.full:
                    self.full[name] = t.new_empty(self.n_rows, t.shape[-1])
            self.full[name][s] = t

    def flush(self, B: int, T: int) -> None:
        for name in self.order:
            if name in self.full:
                deliver(name, self.full[name].view(B, T, -1))  # interventions: applied per chunk


def _one_torch_thread() -> None:
    torch.set_num_threads(1)  # per OS thread: this worker's ops run on its own core


_CHUNK_POOLS: dict[int, ThreadPoolExecutor] = {}  # by size; never shut down (callers may share one)
_POOLS_LOCK = threading.Lock()


def row_chunks(n: int, size: int) -> list[slice]:
    """Rows 0..n in consecutive slices of `size` (the last shorter): the tasks `_run_chunks` spreads."""
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


# per calling thread: .threads, the workers' count while `_workers_only` holds this thread's torch to
# one; .buffers, the forward's shared tensors within `_forward_buffers`
_WORKERS = threading.local()


@contextmanager
def _workers_only() -> Iterator[None]:
    """Within: torch's ops on the calling thread run on one thread, and `_run_chunks` still spreads
    over as many workers as torch had. Why: torch's OpenMP threads keep spinning for milliseconds
    after each parallel op (libgomp's default wait policy), so a parallel op between the workers'
    chunks (the embedding, a norm of the position rows) left a third busy thread on 2 cores: 3.6%
    of the fast forward's CPU samples, taken from the workers (bench/README.md, 2026-12-07)."""
    n = torch.get_num_threads()
    if n <= 1:
        yield
        return
    _WORKERS.threads = n
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
        _WORKERS.threads = None


@contextmanager
def _forward_buffers() -> Iterator[None]:
    """Within (a fast forward, no hook active): `FastBlock` takes its q/k/v, attention output and
    residual stream from buffers the forward's blocks share (`_buffer`), instead of fresh tensors
    per block. Why: tensors this large come from mmap, every page faulted and zeroed again (at
    batch 8, 272k page faults, ~1 GB, per 2-layer forward; bench/README.md). Dropped at the end:
    nothing is held between forwards."""
    outer = getattr(_WORKERS, "buffers", None)  # (a forward started from inside another keeps its own)
    _WORKERS.buffers = None if hooks_active() else {}
    try:
        yield
    finally:
        _WORKERS.buffers = outer


def _buffer(name: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of `shape` like `like`: within `_forward_buffers`, the forward's
    buffer `name` (made on first use); else a fresh one."""
    bufs = getattr(_WORKERS, "buffers", None)
    if bufs is None:
        return like.new_empty(shape)
    t = bufs.get(name)
    if t is None or t.shape != shape or t.dtype != like.dtype or t.device != like.device:
        t = bufs[name] = like.new_empty(shape)
    return t


def _workers() -> int:
    """How many worker threads `_run_chunks` spreads over."""
    return getattr(_WORKERS, "threads", None) or torch.get_num_threads()


def _run_chunks(fn, chunks: list[slice]) -> None:
    """fn(chunk) for every chunk: on the calling thread when torch has one thread (or there is one
    chunk); else spread over as many worker threads as torch has (had, within `_workers_only`),
    each running its ops on one thread. The chunks are independent rows, so every row gets the same
    ops either way: equal results. (Torch's own intra-op threads split each small op of a chunk,
    paying a fork/join per op; whole chunks per thread pay none: the fast forward is ~15-30%
    faster on 2 cores.)"""
    n = _workers()
    if n <= 1 or len(chunks) <= 1:
        for s in chunks:
            fn(s)
        return
    with _POOLS_LOCK:
        pool = _CHUNK_POOLS.get(n)
        if pool is None:
            pool = _CHUNK_POOLS[n] = ThreadPoolExecutor(n, thread_name_prefix="fastblock", initializer=_one_torch_thread)

    def run(s: slice) -> None:
        with torch.no_grad():  # grad mode is per thread; the caller checked it is off
            fn(s)

    for f in [pool.submit(run, s) for s in chunks]:
        f.result()


class FastCausalSelfAttention(CausalSelfAttention):
    """Sink attention by `sink_attention` (causal flash attention plus one rescale), AbsTopK by
    `abs_topk_exact`."""

    abs_topk = staticmethod(abs_topk_exact)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """`out`: as `sink_attention`'s."""
        if not self.config.sink or _grad_needed(q, k, v, self.attn_imp.sink_logit):
            y = super()._sdpa(q, k, v)
            return y if out is None else out.copy_(y)
        return sink_attention(q, k, v, self.attn_imp.sink_logit, out)


class FastMLP(MLP):
    """AbsTopK by `abs_topk_exact` (the plain module otherwise: `FastBlock` runs its own MLP)."""

    abs_topk = staticmethod(abs_topk_exact)


class FastBlock(Block):
    """The block computed chunk by chunk of tokens, with `abs_topk_exact`, when nothing can change
    its insides but per-token interventions: the same math as `Block.forward` (tests check
    equality on every model variant). Recorded hook points are assembled from the chunks and
    recorded with the same values. The chunks before and after attention run on worker threads
    (`_run_chunks`), one torch thread each. Interventions at the hook points computed in chunks
    apply chunk by chunk when they say how (`hooks.row_interventions`: e.g. `inference.circuit.
    masked_forward`'s masks and frozen norm scales); with any other intervention, or a gradient,
    it runs `Block.forward`, still with the sparse linears, fast attention and `abs_topk_exact`."""

    abs_topk = staticmethod(abs_topk_exact)

    def forward(self, x: torch.Tensor, pos_emb: torch.Tensor | None) -> torch.Tensor:
        cfg, i = self.config, self.layer
        # the hook points computed in chunks of tokens (resid_in, q, k, v and y are whole tensors)
        names = [f"{i}.ln_1.rstd", f"{i}.attn.act_in", f"{i}.attn.resid_delta", f"{i}.resid_mid"]
        names += [f"{i}.ln_2.rstd", f"{i}.mlp.act_in", f"{i}.mlp.post_act", f"{i}.mlp.resid_delta"]
        at_rows = row_interventions(names)
        if torch.is_grad_enabled() or not cfg.flash or at_rows is None:
            return super().forward(x, pos_emb)
        B, T, D = x.shape
        attn, mlp = self.attn, self.mlp
        taps = None
        if hooks_active():
            taps = _Taps(names, B * T)
            x = hook(f"{i}.resid_in", x)
        rows = x.reshape(B * T, D)

        def tap(name: str, s: slice, t: torch.Tensor) -> torch.Tensor:
            """A chunk's value at a hook point: its interventions applied, kept for the recorders."""
            if taps is None:
                return t
            t = at_rows(name, t, s)
            taps.put(name, s, t)
            return t

        pos1 = pos2 = None
        if pos_emb is not None:  # (these norms run once, at full size: their hooks are called as usual)
            pos1 = self.ln_p1(pos_emb, f"{i}.ln_p1").expand(B, T, -1).reshape(B * T, -1)
            pos2 = self.ln_p2(pos_emb, f"{i}.ln_p2").expand(B, T, -1).reshape(B * T, -1)
        chunks = row_chunks(B * T, CHUNK_ROWS)

        qkv = _buffer("qkv", (3, B * T, cfg.d_attn), x)

        def attn_in_chunk(s: slice) -> None:
            at_rstd = None if taps is None else lambda rstd: tap(f"{i}.ln_1.rstd", s, rstd)
            pos = None if pos1 is None else pos1[s]
            h = tap(f"{i}.attn.act_in", s, _norm_abs_topk(self.ln_1, rows[s], pos, cfg.sparsity_at("attn_in"), at_rstd))
            _linear_abs_topk(attn.c_attn, h, [cfg.sparsity_at(loc) for loc in ("attn_q", "attn_k", "attn_v")], qkv, s.start)

        _run_chunks(attn_in_chunk, chunks)
        q, k, v = qkv
        if taps:
            q, k, v = (hook(f"{i}.attn.{kind}", t.view(B, T, -1)) for kind, t in zip("qkv", qkv, strict=True))
        q, k, v = (t.reshape(B, T, attn.n_head, attn.d_head).transpose(1, 2) for t in (q, k, v))
        y = _buffer("y", (B, T, attn.n_head, attn.d_head), x).transpose(1, 2)  # rows underneath: y below is a view
        y = attn._sdpa(q, k, v, y).transpose(1, 2).reshape(B * T, cfg.d_attn)
        if taps:
            y = hook(f"{i}.attn.y", y.view(B, T, -1)).reshape(B * T, cfg.d_attn)

        out = _buffer(f"resid{i % 2}", rows.shape, rows)  # block i - 1's output is block i's input

        def mlp_chunk(s: slice) -> None:
            delta = rows[s].new_empty(1, s.stop - s.start, D)
            _linear_abs_topk(attn.c_proj, y[s], [cfg.sparsity_at("attn_out")], delta)
            delta = tap(f"{i}.attn.resid_delta", s, delta[0])
            xm = tap(f"{i}.resid_mid", s, self._residual(rows[s] + delta, "resid_post_attn"))
            at_rstd = None if taps is None else lambda rstd: tap(f"{i}.ln_2.rstd", s, rstd)
            pos = None if pos2 is None else pos2[s]
            h = tap(f"{i}.mlp.act_in", s, _norm_abs_topk(self.ln_2, xm, pos, cfg.sparsity_at("mlp_in"), at_rstd))
            post = h.new_empty(1, h.shape[0], cfg.d_mlp)
            if _linear_abs_topk(mlp.c_fc, h, [cfg.sparsity_at("mlp_neuron")], post, 0, cfg.activation_type, fallback=False):
                h = post[0]
            else:
                # AbsTopK into columns, so that c_proj multiplies them as W @ h too (~4x faster than on
                # rows); an intervention on the rows view keeps that layout (elementwise ops follow their input's)
                h = _activation(mlp.c_fc.columns(h), cfg.activation_type)  # (d_mlp, rows)
                h = _abs_topk_columns(h, cfg.sparsity_at("mlp_neuron")).t()
            h = tap(f"{i}.mlp.post_act", s, h)
            delta = h.new_empty(1, h.shape[0], D)
            _linear_abs_topk(mlp.c_proj, h, [cfg.sparsity_at("mlp_out")], delta)
            delta = tap(f"{i}.mlp.resid_delta", s, delta[0])
            out[s] = self._residual(xm + delta, "resid_post_mlp")

        _run_chunks(mlp_chunk, chunks)
        if taps:
            taps.flush(B, T)
        return out.view(B, T, D)


class FastGPT(GPT):
    """The forward with torch's own threads kept idle (`_workers_only`): the blocks' chunks and the
    head's run on the workers, the few small ops between them on the calling thread."""

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, start=None):
        with _workers_only(), _forward_buffers():
            return super().forward(idx, targets, start)

    def head(self, x: torch.Tensor, idx: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """`GPT.head` on one part of the rows per worker (each row's logits are its own), unless a
        hook is active (ln_f's inverse scale is a hook point), a gradient is needed or `out` given."""
        if hooks_active() or _grad_needed(x, self.lm_head.weight) or x.dim() < 2 or out is not None:
            return super().head(x, idx, out)
        rows, ids = x.reshape(-1, x.shape[-1]), idx.reshape(-1)
        logits = x.new_empty(rows.shape[0], self.config.vocab_size)
        # one part per worker (a dense unembedding packs its weight once per call), at most HEAD_ROWS
        # rows (the parts' temporaries then stay below malloc's mmap threshold, reused, not faulted in)
        parts = row_chunks(rows.shape[0], max(CHUNK_ROWS, min(HEAD_ROWS, -(-rows.shape[0] // _workers()))))
        _run_chunks(lambda s: GPT.head(self, rows[s], ids[s], out=logits[s]), parts)
        return logits.view(*x.shape[:-1], -1)


def accelerate(model: GPT, max_density: float = SPARSE_MAX_DENSITY) -> GPT:
    """Switch `model` (in place) to the fast forward path; returns it.

    Each linear layer multiplies by a compressed weight when its density is at most
    `max_density` (checked per matrix, lazily); `max_density=1.0` forces the sparse kernel
    everywhere (tests), `0.0` keeps every matmul dense.
    """
    for module in model.modules():
        if type(module) is GPT:
            module.__class__ = FastGPT
        elif isinstance(module, nn.Linear):
            module.__class__ = SparseLinear
            module.max_density = max_density
        elif type(module) is CausalSelfAttention:
            module.__class__ = FastCausalSelfAttention
        elif type(module) is Block:
            module.__class__ = FastBlock
        elif type(module) is MLP:
            module.__class__ = FastMLP
    return model


def decelerate(model: GPT) -> GPT:
    """Undo `accelerate`: every module back to the plain class, caches dropped."""
    for module in model.modules():
        if isinstance(module, FastGPT):
            module.__class__ = GPT
        elif isinstance(module, SparseLinear):
            module.__class__ = nn.Linear
            module.__dict__.pop("_sparse_cache", None)
            module.__dict__.pop("_csr_arrays", None)
            module.__dict__.pop("max_density", None)
        elif isinstance(module, FastCausalSelfAttention):
            module.__class__ = CausalSelfAttention
        elif isinstance(module, FastBlock):
            module.__class__ = Block
        elif isinstance(module, FastMLP):
            module.__class__ = MLP
    return model


def is_accelerated(model: GPT) -> bool:
    return any(isinstance(m, (FastGPT, SparseLinear, FastCausalSelfAttention, FastMLP, FastBlock)) for m in model.modules())
