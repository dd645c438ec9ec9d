"""The fast circuit model: `CircuitModel` and `fast_ablation_losses`, exact against `inference.circuit`.

In the circuit model every non-circuit node is a constant (its fill) and every norm's scale is
frozen, so most of the network does not depend on the circuit's values at all. `CircuitModel`
runs the masked forward once at full width (the "base" run) and keeps, per layer, only what the
circuit's values can still change:

- a linear layer's output rows reachable from the circuit's input channels (the weights are
  sparse: a handful of rows per channel), as `in_circuit @ W[rows, circuit].T + K` with the
  constant part K of those rows taken from the base run;
- the residual stream at the channels where circuit deltas were added (norms are frozen, so
  RMSNorm is per channel; LayerNorm's mean couples all channels and is computed at full width);
- attention only for heads with a circuit q or k channel; a head whose q and k are constants
  attends uniformly (plus its sink), so its circuit v channels give a weighted cumulative sum;
- AbsTopK: a circuit channel survives when |value| reaches the row's k-th largest |value|. The
  row is mostly constants, so the k-th largest comes from the few changing values and a window
  of the constants' order statistics (ranks k - m .. k + 1 for m changing values) kept from the
  base run. A tie at a nonzero k-th value, where topk's own choice matters, is detected: between
  constants only, or in a row as the base run had it, topk decides it on the row (kept whole for
  the rows where constants tie near rank k or the base row ties); where a changing value takes
  part in a new tie, that computation is redone by the reference.

Per-node ablations then run only this small network, many ablations batched along a leading
dimension, each starting at its node's layer from the stored un-ablated state.
"""

from __future__ import annotations

import copy
import math
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from inference.circuit import (
    ATTN_KINDS,
    FINAL_RESID,
    MLP_KINDS,
    ablated,
    ablation_losses,
    answer_tokens,
    circuit_locations,
    circuit_masks,
    doc_losses,
    docs_lengths,
    frozen_norm_scales,
    location_width,
    masked_forward,
    parse_location,
    wanted_column,
)
from inference.fast import SPARSE_MAX_DENSITY, abs_topk_exact, sink_attention
from inference.hooks import record
from inference.kth_pair import kth_pair, kth_pair_stage
from inference.memory import heap_kept, trim_heap
from inference.model import abs_topk
from inference.separable_attention import SeparableHeads, head_channels
from inference.sparse_rows import csr_arrays, sparse_rows


def _kth_largest_pair(changing: torch.Tensor, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The k-th and (k+1)-th largest of a row made of `changing` |values| (..., rows, m) and
    constants whose ranks k - m .. k + 1 are `window` (rows, m + 2; +inf / -inf past the ends).

    The k-th largest of the union of two descending lists A, B is max_j min(B_j, A_{k-j}),
    j = 0..m, with B_0 = +inf. Only B values within the window's range [A_{k+1}, A_{k-m}] need
    their order: above it they act as +inf, below it as nothing. Most rows have none in range,
    and then, with h values above, the answers are A_{k-h} and A_{k+1-h}; the rest are sorted.
    """
    m = changing.shape[-1]
    hi, lo = window[:, :1], window[:, m + 1 :]  # A_{k-m}, A_{k+1}
    above = (changing > hi).sum(-1, keepdim=True)  # (..., rows, 1)
    busy = (changing >= lo).sum(-1, keepdim=True) > above  # some value within the window's range
    win = window.expand(*changing.shape[:-1], m + 2)
    sel = busy[..., 0]
    n_busy = int(sel.sum())
    if n_busy > sel.numel() // 2:  # mostly busy: every row through the general path, no gathering
        N = above.numel()
        kth, kth1 = _kth_largest_pair_sorted(changing.reshape(N, m), win.reshape(N, m + 2), above.reshape(N, 1))
        return kth.view(above.shape), kth1.view(above.shape)
    kth, kth1 = win.gather(-1, m - above), win.gather(-1, m + 1 - above)  # window[:, i] is A_{k-m+i}
    if n_busy:
        kth[sel], kth1[sel] = _kth_largest_pair_sorted(changing[sel], win[sel], above[sel])
    return kth, kth1


def _kth_largest_pair_sorted(
    changing: torch.Tensor, window: torch.Tensor, above: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_kth_largest_pair` for rows (N, m) with their windows (N, m + 2) and counts of values
    above the window (N, 1), ordering the values in range.

    With h values above the window (B_1..B_h = +inf) and p in range (B_{h+1}..B_{h+p}), only
    j = h..h+p can give the maximum: below h, A_{k-j} <= A_{k-h}; past h + p, B_j is nothing."""
    m = changing.shape[-1]
    hi, lo = window[:, :1], window[:, m + 1 :]
    in_range = (changing <= hi) & (changing >= lo)
    p = int(in_range.sum(-1).max())
    mid = torch.topk(torch.where(in_range, changing, -1.0), p, dim=-1).values  # -1: below every |value|
    b = torch.cat([changing.new_full((mid.shape[0], 1), float("inf")), mid], dim=-1)  # B_{h+q}, q = 0..p
    q = torch.arange(p + 1, device=changing.device)
    kth = torch.minimum(b, window.gather(-1, (m - above - q).clamp(min=0))).amax(dim=-1, keepdim=True)
    kth1 = torch.minimum(b, window.gather(-1, (m + 1 - above - q).clamp(min=0))).amax(dim=-1, keepdim=True)
    return kth, kth1


def _rank_window(const: torch.Tensor, k: int, m: int) -> torch.Tensor:
    """Per row, the values of ranks k - m .. k + 1 (descending) of `const` (rows, n) >= 0, with
    +inf for ranks < 1 and -inf past the last."""
    rows, n = const.shape
    if m + 2 <= k <= n - 1 and const.dtype in (torch.float32, torch.float64):
        # Two selections instead of a sort: the top k + 1, then the m + 2 smallest of those.
        # Zeros (plentiful) get distinct negative stand-ins, on which introselect stays fast.
        a = torch.where(const == 0, -torch.arange(1, n + 1, dtype=const.dtype), const).numpy()
        top = np.partition(a, n - k - 1, axis=-1)[:, n - k - 1 :]
        low = np.sort(np.partition(top, m + 1, axis=-1)[:, : m + 2], axis=-1)[:, ::-1]  # ranks k - m .. k + 1
        return torch.from_numpy(np.maximum(low, 0).copy())
    top = const.topk(min(k + 1, n), dim=-1).values  # ranks 1 .. k+1, descending
    pad_hi = torch.full((rows, max(0, m + 1 - k)), float("inf"), dtype=const.dtype)
    pad_lo = torch.full((rows, k + 1 - top.shape[1]), float("-inf"), dtype=const.dtype)
    ranks = torch.cat([pad_hi, top, pad_lo], dim=-1)  # ranks (k - m) .. k + 1 at its end
    return ranks[:, ranks.shape[1] - (m + 2) :]


def _rank_window_once(const: torch.Tensor, k: int, m: int, docs: int) -> torch.Tensor:
    """`_rank_window`, computed once when every row, or every doc's block of rows, repeats the
    first: in the circuit model many constants depend on the position only, or on nothing."""
    rows, n = const.shape
    if rows > 1 and bool((const == const[:1]).all()):
        return _rank_window(const[:1], k, m).expand(rows, -1)
    if docs > 1 and rows % docs == 0:
        per_doc = const.view(docs, rows // docs, n)
        if bool((per_doc == per_doc[:1]).all()):
            return _rank_window(per_doc[0], k, m).repeat(docs, 1)
    return _rank_window(const, k, m)


def _attention_at(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: torch.Tensor | None, doc: torch.Tensor, pos: torch.Tensor
) -> torch.Tensor:
    """`sink_attention` of (B, H, T, d_head) tensors at a few query rows only (row r: doc `doc[r]`,
    position `pos[r]`), as (H, rows, d_head): the last layer's answer positions need no other."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    keys, values = k[doc], v[doc]  # (rows, H, T, d)
    scores = torch.einsum("rhd,rhtd->rht", q[doc, :, pos], keys) * scale
    scores = scores.masked_fill(torch.arange(q.shape[2])[None, None, :] > pos[:, None, None], float("-inf"))
    if sink is not None:  # an always-visible key with logit `sink` and value zero
        scores = torch.cat([sink.to(scores.dtype).view(1, -1, 1).expand(scores.shape[0], -1, 1), scores], dim=-1)
        weights = F.softmax(scores, dim=-1)[..., 1:]
    else:
        weights = F.softmax(scores, dim=-1)
    return torch.einsum("rht,rhtd->hrd", weights, values)


class _TopkStage:
    """One location's AbsTopK (or none) in the circuit model: which channels change, the constants,
    and the channels read out (the circuit's, and act_in's position channels)."""

    def __init__(
        self,
        z: torch.Tensor,
        changing: torch.Tensor,
        circuit: torch.Tensor,
        frac: float | None,
        docs: int = 1,
        full: bool = False,
    ):
        n = z.shape[-1]
        self.n, self.full, self.frac = n, full, frac
        self.k = int(frac * n) if frac is not None else n
        self.changing, self.circuit = changing, circuit
        is_changing = torch.zeros(n, dtype=torch.bool)
        is_changing[changing] = True
        where_in_changing = torch.full((n,), -1, dtype=torch.long)
        where_in_changing[changing] = torch.arange(len(changing))
        c_changing = is_changing[circuit]
        self.c_from_changing = (torch.nonzero(c_changing).flatten(), where_in_changing[circuit[c_changing]])
        self.c_const_pos = torch.nonzero(~c_changing).flatten()
        self.c_const = z[:, circuit[~c_changing]]  # (rows, .): circuit channels that only the threshold can change
        self.base = None  # (|changing|, k-th, (k+1)-th) of the un-ablated run: `run(..., keep_base=True)`
        self.tie_rows, self.tie_z = torch.zeros(0, dtype=torch.long), None
        if full or self.k >= n:
            self.window = None
            return
        self.window = w = _rank_window_once(z[:, ~is_changing].abs(), self.k, len(changing), docs)
        # Rows where two constants are equal near rank k, or the un-ablated row ties at its k-th
        # value: a pass can tie there without a changing value at the tie, or with the row as it
        # was, and then topk's choice needs only the whole row, kept for these rows (`_decide_ties`).
        dup = ((w[:, 1:] == w[:, :-1]) & (w[:, 1:] > 0) & (w[:, 1:] < math.inf)).any(-1)
        kth, kth1 = _kth_largest_pair(z[:, changing].abs().unsqueeze(0), w)
        dup |= ((kth == kth1) & (kth > 0))[0, :, 0]
        if bool(dup.any()):
            self.tie_rows = torch.nonzero(dup).flatten()
            self.tie_z = z[self.tie_rows].clone()

    def take_rows(self, rows: torch.Tensor) -> _TopkStage:
        """This stage on a subset of the rows (tokens)."""
        out = copy.copy(self)
        out.c_const = self.c_const[rows]
        out.window = None if self.window is None else self.window[rows]
        out.base = None if self.base is None else tuple(t[rows] for t in self.base)
        if self.tie_z is not None:  # the kept rows among `rows`, renumbered
            where = torch.full((self.c_const.shape[0],), -1, dtype=torch.long)
            where[self.tie_rows] = torch.arange(len(self.tie_rows))
            j = where[rows]
            out.tie_rows = torch.nonzero(j >= 0).flatten()
            out.tie_z = self.tie_z[j[j >= 0]] if len(out.tie_rows) else None
        return out

    def run(
        self, changing: torch.Tensor, ties: tuple[torch.Tensor, torch.Tensor | None] | None, keep_base: bool = False
    ) -> torch.Tensor:
        """Values at the circuit channels (A, rows, |circuit|) after AbsTopK, given the changing
        channels' values (A, rows, m) (all n channels when `full`). `ties` = (flags (A, docs), rows
        or None): flags each ablation's docs with an AbsTopK tie at a nonzero value in those rows.
        `keep_base`: this is the un-ablated run (A = 1); its values and thresholds are kept, and
        the ablation passes' thresholds start from them (`kth_pair`'s base)."""
        if self.full:
            return abs_topk_exact(changing, self.frac)[..., self.circuit]
        A, rows = changing.shape[:2]
        pos, src = self.c_from_changing
        base = self.base if ties is not None else None
        if self.window is not None:
            # compiled (inference.kth_pair): thresholds, values and tie flags in one pass per row
            stage = (src, pos, self.c_const, self.c_const_pos, len(self.circuit))
            got = kth_pair_stage(changing, self.window, base, stage)
            if got is not None:
                kth, kth1, out, tied = got
                if keep_base:
                    self._keep_base(changing, kth, kth1)
                if ties is not None:
                    self._decide_ties(changing, kth, out, tied)
                    self._flag(ties, tied)
                return out
        vals = changing.new_empty(A, rows, len(self.circuit))
        vals[..., pos] = changing[..., src]
        vals[..., self.c_const_pos] = self.c_const
        if self.window is None:
            return vals
        # compiled thresholds only (a stage the kernel above declined), or None: the torch code
        got = kth_pair(changing, self.window, base)
        kth, kth1 = got if got is not None else _kth_largest_pair(changing.abs(), self.window)
        if keep_base:
            self._keep_base(changing, kth, kth1)
        out = torch.where(vals.abs() >= kth, vals, 0.0)
        if ties is not None:
            # topk's choice among tied entries matters only when a circuit channel is among them
            # (every other channel is replaced by its fill either way).
            tied = ((kth1 == kth) & (kth > 0) & (vals.abs() == kth).any(-1, keepdim=True))[..., 0]  # (A, rows)
            self._decide_ties(changing, kth, out, tied)
            self._flag(ties, tied)
        return out

    def _decide_ties(self, changing: torch.Tensor, kth: torch.Tensor, out: torch.Tensor, tied: torch.Tensor) -> None:
        """Decide by topk itself, in place in `out` and `tied` (A, rows), the flagged rows kept
        whole (`tie_rows`) whose tie is between constants only (no changing value at the k-th
        |value|), or whose changing values are the un-ablated run's (the row is the un-ablated
        one): the un-ablated row with the changing channels' values put in, through `abs_topk`
        (torch.topk, as the reference's redo of a tied row). Without this, one tie in the
        un-ablated run sent every pass through that row, nearly every node, to the reference
        (bench/README.md, 2026-12-07)."""
        if self.tie_z is None:
            return
        hit = tied[:, self.tie_rows]
        if not bool(hit.any()):
            return
        for a, j in torch.nonzero(hit).tolist():
            r = int(self.tie_rows[j])
            values = changing[a, r]
            as_base = self.base is not None and bool(torch.equal(values.abs(), self.base[0][r]))
            if not as_base and bool((values.abs() == kth[a, r]).any()):  # a changing value at a new tie
                continue  # the reference decides
            row = self.tie_z[j].clone()
            row[self.changing] = values
            out[a, r] = abs_topk(row.unsqueeze(0), self.frac)[0, self.circuit]
            tied[a, r] = False

    def _keep_base(self, changing: torch.Tensor, kth: torch.Tensor, kth1: torch.Tensor) -> None:
        """The un-ablated run's |values| and thresholds, which the passes' thresholds start from."""
        assert changing.shape[0] == 1, "the un-ablated run has one row per token"
        self.base = (changing[0].abs(), kth[0, :, 0], kth1[0, :, 0])

    @staticmethod
    def _flag(ties: tuple[torch.Tensor, torch.Tensor | None], bad: torch.Tensor) -> None:
        """Mark the (ablation, doc) pairs (A, docs) with a `bad` (A, rows) row among the rows that
        matter: with `relevant` ((docs x T,) bool), the docs' rows that reach an answer; without,
        the rows are the docs' answer rows, one per doc in order (the last layer's)."""
        flags, relevant = ties
        if relevant is not None:
            bad = (bad & relevant).view(bad.shape[0], flags.shape[1], -1).any(-1)
        flags |= bad


def _rows_reading(weight: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Output rows of a linear layer with a nonzero weight on any of `columns`."""
    if len(columns) == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.nonzero(weight[:, columns].ne(0).any(dim=1)).flatten()


def _weight_entries(linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(output row, input column, value) of every nonzero weight of an accelerated sparse linear,
    from its compressed copy (`inference.fast.SparseLinear`), or None (dense, or not accelerated).
    Reading these rather than the dense weight keeps a memory-mapped checkpoint's pages untouched
    (`inference.memory`: at release scale the dense weights are 1.7 GB of mostly zeros)."""
    get = getattr(linear, "_compressed_weight_t", None)
    wt = get() if get is not None else None  # W.T (in, out) in CSC: a column per output row
    if wt is None:
        return None
    cached = linear.__dict__.get("_entries")
    if cached is not None and cached[0] is wt:
        return cached[1]
    ccol = wt.ccol_indices()
    entries = (torch.repeat_interleave(torch.arange(len(ccol) - 1), ccol.diff()), wt.row_indices(), wt.values())
    linear.__dict__["_entries"] = (wt, entries)
    return entries


class _LinearStage:
    """out[rows] = x[circuit] @ W[rows, circuit].T + K for the rows that read the circuit channels."""

    def __init__(self, linear: nn.Linear, x_full: torch.Tensor, in_circuit: torch.Tensor):
        entries = _weight_entries(linear)
        if entries is None:
            w = linear.weight.detach()
            self.rows = _rows_reading(w, in_circuit)
            w_rows = w[self.rows]
        else:  # the same rows and the same W[rows] (bit for bit), from the nonzeros only
            out_idx, in_idx, vals = entries
            self.rows = (
                torch.unique(out_idx[torch.isin(in_idx, in_circuit)]) if len(in_circuit) else torch.zeros(0, dtype=torch.long)
            )
            sel = torch.isin(out_idx, self.rows)
            w_rows = vals.new_zeros(len(self.rows), linear.in_features)
            w_rows[torch.searchsorted(self.rows, out_idx[sel]), in_idx[sel]] = vals[sel]
        w_t = w_rows[:, in_circuit].t().contiguous()
        self.csr = None  # W[rows, circuit] in CSR for the compiled pass (inference.sparse_rows)
        if w_t.numel() and w_t.count_nonzero() <= SPARSE_MAX_DENSITY * w_t.numel():
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Sparse C.. tensor support is in beta")
                self.csr = csr_arrays(w_t.t())
                w_t = w_t.to_sparse_csc()  # x @ W.T as dense-times-CSC, as in inference.fast
        self.w_t = w_t
        x_const = x_full.clone()
        x_const[:, in_circuit] = 0
        self.k = F.linear(x_const, w_rows, None if linear.bias is None else linear.bias.detach()[self.rows])

    def take_rows(self, rows: torch.Tensor) -> _LinearStage:
        """This stage on a subset of the rows (tokens)."""
        out = copy.copy(self)
        out.k = self.k[rows]
        return out

    def run(self, x_circuit: torch.Tensor) -> torch.Tensor:
        if self.csr is not None:
            out = sparse_rows(x_circuit, self.csr, self.k)  # compiled, or None: torch below
            if out is not None:
                return out
        lead = x_circuit.shape[:-1]
        out = torch.mm(x_circuit.reshape(math.prod(lead), x_circuit.shape[-1]), self.w_t).view(*lead, self.w_t.shape[1])
        return out + self.k


def _union(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.unique(torch.cat([a, b]))


def _positions(of: torch.Tensor, within: torch.Tensor) -> torch.Tensor:
    """Index of each channel of `of` in the sorted channel list `within`."""
    return torch.searchsorted(within, of)


class CircuitModel:
    """The circuit model of `masked_forward` (non-circuit nodes at `fill`, norms frozen at
    `frozen_scales`, by default the full model's on `docs`), computed over the circuit's nodes.

        cm = CircuitModel(model, docs, circuit_data, means)
        cm.logits()                                 # == masked_forward(...) within float rounding
        cm.ablation_losses("mean")[0]               # == ablation_losses(..., per_pair=True) within float
                                                    # rounding, but on the pairs where ties are flagged

    Raises NotImplementedError for AbsTopK on the residual stream (`resid_post_attn`/`_mlp`),
    which no released model uses (`fast_ablation_losses` then falls back to the reference).
    """

    @torch.no_grad()
    def __init__(self, model, docs: torch.Tensor, circuit_data, fill, frozen_scales=None):
        cfg = model.config
        if cfg.sparsity_at("resid_post_attn") is not None or cfg.sparsity_at("resid_post_mlp") is not None:
            raise NotImplementedError("CircuitModel: AbsTopK on the residual stream is not supported")
        self.model, self.config, self.docs = model, cfg, docs
        self.B, self.T = docs.shape
        dtype = model.transformer.wte.weight.dtype
        frozen = frozen_norm_scales(model, docs) if frozen_scales is None else frozen_scales
        self.frozen_scales = frozen
        self.rstd = {name: s.reshape(-1, 1).to(dtype) for name, s in frozen.items()}
        self.locations = circuit_locations(cfg, circuit_data)
        self.circuit = {}
        for loc in self.locations:
            ch = torch.as_tensor(circuit_data.get(loc, []), dtype=torch.long).reshape(-1)
            self.circuit[loc] = torch.unique(ch)
        self.fill = {loc: fill[loc].to(dtype).reshape(-1) for loc in self.locations}
        self.full_norm = not cfg.rms_norm  # LayerNorm's mean couples every channel

        self._tail = None  # (key, tables) of `_after_attention_at`
        x = self._embed()
        resid = torch.zeros(0, dtype=torch.long)  # residual channels that depend on the circuit
        self.layers = []
        for i in range(cfg.n_layer):
            layer, x, resid = self._build_layer(i, x, resid)
            self.layers.append(layer)
        self.final_x, self.final_resid = x, resid
        # final_resid pruned (listed in circuit_data): its channels outside the circuit hold their fill.
        self.final_const = None
        if FINAL_RESID in self.circuit:
            keep = torch.zeros(cfg.d_model, dtype=torch.bool)
            keep[self.circuit[FINAL_RESID]] = True
            self.final_const = torch.nonzero(~keep).flatten()
            self.final_x = x.clone()
            self.final_x[:, self.final_const] = self.fill[FINAL_RESID][self.final_const]

        # Un-ablated circuit-only run: the state entering each layer, for ablations that start there,
        # and the docs where it hit an AbsTopK tie before that layer (where this run keeps every tied
        # entry and topk only some, so the state may differ from the reference's): an ablation
        # starting there inherits them (`ablation_losses`).
        self.lengths = docs_lengths(docs)
        self.relevant = (torch.arange(self.T)[None, :] <= (self.lengths - 2)[:, None]).reshape(-1)  # rows reaching an answer
        self.start_states, self.tied_before = [], []
        ties = (torch.zeros(1, self.B, dtype=torch.bool), self.relevant)
        state = x.new_zeros(1, x.shape[0], 0)
        for i in range(cfg.n_layer):
            self.start_states.append(state)
            self.tied_before.append(ties[0][0].clone())
            state = self._run_layer(i, state, {}, ties, keep_base=True)
        self.final_state = state
        self.tied_before.append(ties[0][0].clone())  # before final_resid: after every layer

    def ablation_width(self) -> int:
        """The widest per-ablation row of an ablation pass (its tensors are (ablations, rows, width)):
        the dynamic heads' q, k and v, a linear stage's output rows, the residual's changing
        channels (all of d_model under LayerNorm, whose mean couples them). Sizes the batches."""
        widths = [self.config.d_model if self.full_norm else 0, len(self.final_resid)]
        for L in self.layers:
            widths += [3 * len(L["dyn"]), len(L["y"]), len(L["mlp_resid_out"])]
            widths += [len(L[name].rows) for name in ("qkv", "proj", "fc", "mlp_proj")]
        return max(1, *widths)

    # ---- the base run (full width) -------------------------------------------------------
    def _embed(self) -> torch.Tensor:
        tr, cfg = self.model.transformer, self.config
        x = tr.wte.weight[self.docs]
        if not cfg.d_pos_emb:
            x = x + tr.wpe.weight[: self.T]
        return x.reshape(self.B * self.T, -1)

    def _pos(self, norm, i: int) -> torch.Tensor | None:
        if not self.config.d_pos_emb:
            return None
        p = norm(self.model.transformer.wpe.weight[: self.T], f"{i}.ln_p")  # not frozen: it does not depend on the circuit
        return p.expand(self.B, -1, -1).reshape(self.B * self.T, -1)

    def _norm(self, norm, x: torch.Tensor, rstd: torch.Tensor, channels: torch.Tensor | None = None) -> torch.Tensor:
        """A norm at its frozen scale, at full width, or (RMSNorm) at `channels` only."""
        return norm.scale(x, rstd, channels)

    def _masked(self, loc: str, values: torch.Tensor) -> torch.Tensor:
        out = self.fill[loc].expand(values.shape[0], -1).clone()
        width = location_width(self.config, loc)
        if values.shape[1] > width:  # act_in: the position-embedding channels are always kept
            out = torch.cat([out[:, :width], values[:, width:]], dim=1)
        c = self.circuit[loc]
        out[:, c] = values[:, c]
        return out

    def _masked_by(self, loc: str, stage: _TopkStage, z: torch.Tensor) -> torch.Tensor:
        """`_masked(loc, abs_topk(z))` for a location without position channels, with the circuit
        channels' values after AbsTopK from `stage` (its rank window): no full-row selection."""
        out = self.fill[loc].expand(z.shape[0], -1).clone()
        out[:, self.circuit[loc]] = stage.run(z[:, stage.changing].unsqueeze(0), None)[0]
        return out

    def _read_channels(self, circuit: torch.Tensor, loctype: str) -> torch.Tensor:
        """Channels of act_in that the next linear reads as variables: the circuit's, and the
        position channels when AbsTopK acts there. The mask keeps position channels (they are not
        nodes), so what passes is their value if it survives the threshold, which ablations move.
        They come last (index >= d_model): a node's position in the list is unchanged."""
        cfg = self.config
        if not cfg.d_pos_emb or cfg.sparsity_at(loctype) is None:
            return circuit
        return torch.cat([circuit, torch.arange(cfg.d_model, cfg.d_model_in)])

    def _build_layer(self, i: int, x: torch.Tensor, resid: torch.Tensor):
        """One block's stages (`L`), the full-width stream after it and its changing channels."""
        C = {kind: self.circuit[f"{i}.attn.{kind}"] for kind in ATTN_KINDS} | {
            f"mlp_{kind}": self.circuit[f"{i}.mlp.{kind}"] for kind in MLP_KINDS
        }
        L = {"resid_in": resid}
        x, resid = self._build_attn(i, C, L, x, resid)
        x, resid = self._build_mlp(i, C, L, x, resid)
        return L, x, resid

    # A layer-half's input: its norm and position norm, AbsTopK location type, the stage's name in
    # L (and the circuit's), and where the full-width stream and position channels are kept for
    # `full_norm` (`_norm_input` reads them).
    _INPUTS = {
        "attn": ("ln_1", "ln_p1", "attn_in", "act_in", "x_in_full", "pos1"),
        "mlp": ("ln_2", "ln_p2", "mlp_in", "mlp_act_in", "x_mid_full", "pos2"),
    }

    def _build_input(self, i: int, C: dict, L: dict, x: torch.Tensor, resid: torch.Tensor, half: str):
        """A layer-half's input norm and AbsTopK, its stage kept in L: (the channels it reads, its
        output at full width with the non-circuit channels at their fills)."""
        cfg, blk = self.config, self.model.transformer.h[i]
        ln, ln_p, loctype, stage, x_key, pos_key = self._INPUTS[half]
        pos = self._pos(getattr(blk, ln_p), i) if cfg.d_pos_emb else None
        h = self._norm(getattr(blk, ln), x, self.rstd[f"{i}.{ln}.rstd"])
        if pos is not None:
            h = torch.cat([h, pos], dim=-1)
        L[x_key] = x if self.full_norm else None
        L[pos_key] = pos if self.full_norm else None
        read = self._read_channels(C[stage], loctype)
        L[stage] = _TopkStage(h, resid, read, cfg.sparsity_at(loctype), self.B, self.full_norm)
        return read, self._masked(f"{i}.{half}.act_in", abs_topk_exact(h, cfg.sparsity_at(loctype)))

    def _build_attn(self, i: int, C: dict, L: dict, x: torch.Tensor, resid: torch.Tensor):
        cfg, blk = self.config, self.model.transformer.h[i]
        d = cfg.d_attn
        read, act_in = self._build_input(i, C, L, x, resid, "attn")
        # q, k, v
        qkv_lin = _LinearStage(blk.attn.c_attn, act_in, read)
        pre = blk.attn.c_attn(act_in)
        L["qkv"], qkv = qkv_lin, []
        for j, kind in enumerate("qkv"):
            part = (qkv_lin.rows >= j * d) & (qkv_lin.rows < (j + 1) * d)
            # the rows are sorted, so each kind's are a range: a slice (a view) rather than a gather
            cols = torch.nonzero(part).flatten()
            lo = int(cols[0]) if len(cols) else 0
            assert torch.equal(cols, torch.arange(lo, lo + len(cols)))
            L[f"{kind}_cols"] = slice(lo, lo + len(cols))
            z = pre[:, j * d : (j + 1) * d]
            L[kind] = _TopkStage(z, qkv_lin.rows[part] - j * d, C[kind], cfg.sparsity_at(f"attn_{kind}"), self.B)
            qkv.append(self._masked_by(f"{i}.attn.{kind}", L[kind], z))
        y, y_changing = self._build_heads(i, C, L, qkv, x.dtype)
        # attention output
        out_lin = _LinearStage(blk.attn.c_proj, y, y_changing)
        z = blk.attn.c_proj(y)
        L["proj"] = out_lin
        L["resid_delta"] = _TopkStage(z, out_lin.rows, C["resid_delta"], cfg.sparsity_at("attn_out"), self.B)
        delta = self._masked_by(f"{i}.attn.resid_delta", L["resid_delta"], z)
        x, resid = self._build_residual(L, "attn", x, delta, resid, C["resid_delta"], f"{i}.attn.resid_delta")
        return x, resid

    def _build_heads(self, i: int, C: dict, L: dict, qkv: list[torch.Tensor], dtype: torch.dtype):
        """Attention mixing: (y at full width, y's changing channels)."""
        cfg, blk = self.config, self.model.transformer.h[i]
        d = cfg.d_attn
        # attention: heads with a circuit q or k attend for real; the others uniformly
        H, dh = cfg.n_head, cfg.d_head
        sink = blk.attn.attn_imp.sink_logit.detach() if cfg.sink else None
        qk_heads = torch.unique(torch.cat([C["q"], C["k"]]) // dh)
        qk = head_channels(qk_heads, dh)
        is_qk_head = torch.zeros(H, dtype=torch.bool)
        is_qk_head[qk_heads] = True
        static_v = C["v"][~is_qk_head[C["v"] // dh]]
        # Constant q and k (static heads): every visible key has the same score c, so the weight
        # of each is 1 / ((t + 1) + exp(sink - c)) (1 / (t + 1) without a sink) at position t.
        qf, kf = (self.fill[f"{i}.attn.{kind}"].double().view(H, dh) for kind in "qk")
        c = (qf * kf).sum(-1) / math.sqrt(dh)
        t = torch.arange(1, self.T + 1, dtype=torch.float64)[:, None]
        extra = torch.exp(sink.double() - c) if sink is not None else torch.zeros(H, dtype=torch.float64)
        head_weight = (1.0 / (t + extra[None, :])).to(dtype)  # (T, H), used at static heads only
        y = qkv[2].view(self.B, self.T, H, dh).cumsum(dim=1).mul_(head_weight[None, :, :, None]).view(self.B * self.T, d)
        if len(qk):
            heads = lambda t: t[:, qk].view(self.B, self.T, len(qk_heads), dh).transpose(1, 2)  # noqa: E731
            y_qk = sink_attention(*(heads(t) for t in qkv), None if sink is None else sink[qk_heads])
            y[:, qk] = y_qk.transpose(1, 2).reshape(self.B * self.T, len(qk))
        # In the circuit-only run, a head whose q and k share a circuit dimension attends by content:
        # flash over its full q, k, v ("dynamic" heads). The other q/k heads are separable: their
        # score splits into a query and a key term, and running sums over the circuit's values
        # give their output in O(T) (`inference.separable_attention`).
        dyn_heads = torch.unique(C["q"][torch.isin(C["q"], C["k"])] // dh)
        dyn = head_channels(dyn_heads, dh)
        sep_heads = qk_heads[~torch.isin(qk_heads, dyn_heads)]
        fills = [self.fill[f"{i}.attn.{kind}"] for kind in "qkv"]
        L["sep"] = SeparableHeads(sep_heads, C["q"], C["k"], C["v"], *fills, sink, dh)
        L["dyn_heads"], L["dyn"], L["static_v"] = dyn_heads, dyn, static_v
        for kind, t in zip("qkv", qkv, strict=True):
            L[f"{kind}_fill_dyn"] = t[0, dyn].clone() if kind != "v" else None
        L["v_base_dyn"] = qkv[2][:, dyn]  # v at dynamic heads: constants where not circuit
        is_dyn_head = torch.zeros(H, dtype=torch.bool)
        is_dyn_head[dyn_heads] = True
        for kind in "qkv":  # the circuit channels of each kind in dynamic heads, and where they sit there
            in_dyn = is_dyn_head[C[kind] // dh]
            L[f"{kind}_dyn_src"] = torch.nonzero(in_dyn).flatten()
            L[f"{kind}_dyn_pos"] = _positions(C[kind][in_dyn], dyn)
        L["v_static_src"] = torch.nonzero(~is_qk_head[C["v"] // dh]).flatten()
        if len(static_v):
            L["static_weight"] = head_weight[:, static_v // dh]  # (T, |static_v|)
        sep = head_channels(sep_heads, dh)
        y_changing = torch.cat([dyn, sep, static_v])
        L["y"] = y_changing
        return y, y_changing

    def _build_mlp(self, i: int, C: dict, L: dict, x: torch.Tensor, resid: torch.Tensor):
        cfg, blk = self.config, self.model.transformer.h[i]
        L["ln_2_rstd"] = self.rstd[f"{i}.ln_2.rstd"]  # taken at the answer rows in the last layer
        read, act_in = self._build_input(i, C, L, x, resid, "mlp")
        fc = _LinearStage(blk.mlp.c_fc, act_in, read)
        z = self._act(blk.mlp.c_fc(act_in))
        L["fc"] = fc
        L["mlp_post_act"] = _TopkStage(z, fc.rows, C["mlp_post_act"], cfg.sparsity_at("mlp_neuron"), self.B)
        post = self._masked_by(f"{i}.mlp.post_act", L["mlp_post_act"], z)
        proj = _LinearStage(blk.mlp.c_proj, post, C["mlp_post_act"])
        z = blk.mlp.c_proj(post)
        L["mlp_proj"] = proj
        L["mlp_resid_delta"] = _TopkStage(z, proj.rows, C["mlp_resid_delta"], cfg.sparsity_at("mlp_out"), self.B)
        delta = self._masked_by(f"{i}.mlp.resid_delta", L["mlp_resid_delta"], z)
        x, resid = self._build_residual(L, "mlp", x, delta, resid, C["mlp_resid_delta"], f"{i}.mlp.resid_delta")
        return x, resid

    def _act(self, z: torch.Tensor) -> torch.Tensor:
        return F.gelu(z) if self.config.activation_type == "gelu" else F.relu(z)

    def _build_residual(self, L, half, x, delta, resid, circuit, loc):
        """Residual update; the changing channels grow by the circuit's delta channels."""
        new = _union(resid, circuit)
        L[f"{half}_resid_out"] = new
        L[f"{half}_from_old"] = _positions(resid, new)
        fresh = new[~torch.isin(new, resid)]
        L[f"{half}_fresh_pos"] = _positions(fresh, new)
        L[f"{half}_fresh_base"] = x[:, fresh]  # constant until now
        L[f"{half}_delta_fill"] = self.fill[loc][new].clone()
        L[f"{half}_delta_pos"] = _positions(circuit, new)
        x = x + delta
        if self.config.residual_activation_type == "relu":
            x = F.relu(x)
        return x, new

    # ---- the circuit-only run ----------------------------------------------------------
    def _ablate(self, loc: str, values: torch.Tensor, ablations) -> torch.Tensor:
        """Apply the ablations at `loc`. Until the first one applies, every tensor of the run has
        a leading size of 1 (the un-ablated values, shared); here it grows to the batch size."""
        spec = ablations.get(loc)
        if spec is not None:
            size, which, pos, value = spec
            if values.shape[0] != size:
                values = values.expand(size, *values.shape[1:]).clone()
            values[which, :, pos] = value[:, None]
        return values

    def _residual(self, L, half, state, delta_circuit):
        A, rows = max(state.shape[0], delta_circuit.shape[0]), state.shape[1]
        new = L[f"{half}_resid_out"]
        x = state.new_empty(A, rows, len(new))
        x[..., L[f"{half}_from_old"]] = state
        x[..., L[f"{half}_fresh_pos"]] = L[f"{half}_fresh_base"]
        delta = L[f"{half}_delta_fill"].expand(A, rows, -1).clone()
        delta[..., L[f"{half}_delta_pos"]] = delta_circuit
        x = x + delta
        return F.relu(x) if self.config.residual_activation_type == "relu" else x

    def _norm_input(self, i, L, norm, state, resid, rstd, full_key, pos_key):
        if not self.full_norm:
            return self._norm(norm, state, rstd, resid)
        x = L[full_key].expand(state.shape[0], -1, -1).clone()
        x[..., resid] = state
        h = self._norm(norm, x, rstd)
        if L[pos_key] is not None:
            h = torch.cat([h, L[pos_key].expand(state.shape[0], -1, -1)], dim=-1)
        return h

    def _after_attention_at(self, i: int, rows: torch.Tensor) -> dict:
        """Layer i's tables for the part after attention, on `rows` only (cached for the last call's rows)."""
        key = (i, rows.tolist())
        if self._tail is None or self._tail[0] != key:
            L = dict(self.layers[i])
            for name in ("proj", "resid_delta", "mlp_act_in", "fc", "mlp_post_act", "mlp_proj", "mlp_resid_delta"):
                L[name] = L[name].take_rows(rows)
            for name in ("attn_fresh_base", "mlp_fresh_base", "x_mid_full", "pos2", "ln_2_rstd"):
                L[name] = None if L[name] is None else L[name][rows]
            self._tail = (key, L)
        return self._tail[1]

    def _full_heads(self, L, qkv: list[torch.Tensor]) -> list[torch.Tensor]:
        """q, k, v at every channel of the dynamic heads (A_kind, rows, |dyn|): the circuit's values
        over the constants (fills for q and k, the base run's v where not circuit)."""
        full = []
        for kind, vals in zip("qk", qkv[:2], strict=True):
            t = L[f"{kind}_fill_dyn"].expand(vals.shape[0], vals.shape[1], -1).clone()
            t[..., L[f"{kind}_dyn_pos"]] = vals[..., L[f"{kind}_dyn_src"]]
            full.append(t)
        v = L["v_base_dyn"].expand(qkv[2].shape[0], -1, -1).clone()
        v[..., L["v_dyn_pos"]] = qkv[2][..., L["v_dyn_src"]]
        full.append(v)
        return full

    def _changed_heads(self, L, qkv: list[torch.Tensor], A: int) -> torch.Tensor:
        """(A, dynamic heads): where an ablation's q, k or v values differ from the un-ablated run's
        at any row. Elsewhere the head's output is the un-ablated one: same inputs, same output
        (a false "changed", e.g. from rounding, only costs time)."""
        nd, dh = len(L["dyn_heads"]), self.config.d_head
        changed = torch.zeros(A, nd, dtype=torch.bool)
        for kind, vals in zip("qkv", qkv, strict=True):
            vals = vals[..., L[f"{kind}_dyn_src"]]
            if vals.shape[-1] == 0:
                continue
            diff = (vals != L[f"base_{kind}"]).any(dim=1)  # (A_kind, channels)
            hit = torch.zeros(diff.shape[0], nd, dtype=torch.int32).index_add_(1, L[f"{kind}_dyn_pos"] // dh, diff.int())
            changed |= hit > 0
        return changed

    def _dynamic_heads(
        self,
        i: int,
        L,
        qkv: list[torch.Tensor],
        A: int,
        rows: torch.Tensor | None,
        keep_base: bool = False,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention output at the dynamic heads' channels (A, rows or all, |dyn|); when every head
        is computed, written into `out` (A, B * T, |dyn|, a view of the layer's attention output)
        if given, and `out` returned (the caller copies any other result there).

        The un-ablated run (`keep_base`) computes every head and keeps its output and inputs; an ablation pass
        recomputes only the (ablation, head) pairs whose inputs changed, and with `rows` (the last
        layer) only at those query rows."""
        cfg, blk = self.config, self.model.transformer.h[i]
        B, T, nd, dh = self.B, self.T, len(L["dyn_heads"]), cfg.d_head
        sink = blk.attn.attn_imp.sink_logit.detach()[L["dyn_heads"]] if cfg.sink else None

        def every_head(out=None) -> torch.Tensor:  # (A, B * T, |dyn|)
            q, k, v = (t.expand(A, -1, -1).reshape(A * B, T, nd, dh).transpose(1, 2) for t in self._full_heads(L, qkv))
            if out is not None:  # straight into the layer's output (no copy into a concatenation)
                sink_attention(q, k, v, sink, out=out.view(A * B, T, nd, dh).transpose(1, 2))
                return out
            return sink_attention(q, k, v, sink).transpose(1, 2).reshape(A, B * T, nd * dh)

        if keep_base:  # the un-ablated run (A = 1): every head, kept for the passes
            y = L["base_y_dyn"] = every_head()
            for kind, vals in zip("qkv", qkv, strict=True):
                L[f"base_{kind}"] = vals[..., L[f"{kind}_dyn_src"]].clone()
            return y if rows is None else y[:, rows]
        base = L["base_y_dyn"] if rows is None else L["base_y_dyn"][:, rows]
        changed = self._changed_heads(L, qkv, A)
        pa, ph = torch.nonzero(changed, as_tuple=True)
        if len(pa) == 0:
            return base
        if rows is None and len(pa) > changed.numel() // 2:  # most pairs changed: every head, no gathering
            return every_head(out)
        y = base.expand(A, -1, -1).clone()
        # the changed pairs as heads of one batch: (B, P, T, dh), each with its head's sink
        pairs = []
        for t in self._full_heads(L, qkv):
            t = t.view(t.shape[0], B, T, nd, dh)
            pairs.append(t[pa if t.shape[0] > 1 else torch.zeros_like(pa), :, :, ph].transpose(0, 1))  # (B, P, T, dh)
        sink_p = None if sink is None else sink[ph]
        if rows is None:
            out = sink_attention(*(t.contiguous() for t in pairs), sink_p)  # (B, P, T, dh)
            y.view(A, B, T, nd, dh)[pa, :, :, ph] = out.transpose(0, 1)
            return y
        out = _attention_at(*pairs, sink_p, rows // T, rows % T)  # (P, rows, dh)
        y.view(A, len(rows), nd, dh)[pa, :, ph] = out
        return y

    def _run_layer(
        self, i: int, state: torch.Tensor, ablations, ties, rows: torch.Tensor | None = None, keep_base: bool = False
    ) -> torch.Tensor:
        """Layer i of the circuit-only run. With `rows`, everything after attention (which is
        row-local) is computed, and the state returned, at those rows only: in the last layer,
        only the answer positions reach the loss. `keep_base`: the un-ablated run, whose values
        the ablation passes compare against and start from."""
        kb = keep_base
        blk, L = self.model.transformer.h[i], self.layers[i]
        p = f"{i}.attn"
        h = self._norm_input(i, L, blk.ln_1, state, L["resid_in"], self.rstd[f"{i}.ln_1.rstd"], "x_in_full", "pos1")
        act_in = self._ablate(f"{p}.act_in", L["act_in"].run(h, ties, kb), ablations)
        pre = L["qkv"].run(act_in)
        qkv = [self._ablate(f"{p}.{kind}", L[kind].run(pre[..., L[f"{kind}_cols"]], ties, kb), ablations) for kind in "qkv"]
        A = max(t.shape[0] for t in qkv)
        n_rows = state.shape[1] if rows is None else len(rows)
        n_dyn, n_sep, n_static = len(L["dyn"]), L["sep"].S * self.config.d_head, len(L["static_v"])
        n_y = n_dyn + n_sep + n_static
        # the attention output (A, rows, dynamic heads' channels, separable heads', static v's), each
        # part written into its slice (a concatenation would copy the (A, rows, ~800) parts again)
        y = state.new_empty(A, n_rows, n_y) if n_y else state.new_zeros(1, n_rows, 0)
        if n_dyn:
            y_dyn = self._dynamic_heads(i, L, qkv, A, rows, kb, out=y[..., :n_dyn])
            if y_dyn.data_ptr() != y.data_ptr():
                y[..., :n_dyn] = y_dyn
        if n_sep:
            L["sep"].run(*qkv, self.T, rows, out=y[..., n_dyn : n_dyn + n_sep])
        if n_static:
            v = qkv[2][..., L["v_static_src"]]
            v = v.reshape(v.shape[0], self.B, self.T, -1)
            y_static = (v.cumsum(dim=2) * L["static_weight"]).reshape(v.shape[0], self.B * self.T, -1)
            y[..., n_dyn + n_sep :] = y_static if rows is None else y_static[:, rows]
        if rows is not None:
            L, state = self._after_attention_at(i, rows), state[:, rows]
            ties = None if ties is None else (ties[0], None)  # every one of these rows reaches an answer
        delta = self._ablate(f"{p}.resid_delta", L["resid_delta"].run(L["proj"].run(y), ties, kb), ablations)
        state = self._residual(L, "attn", state, delta)

        p = f"{i}.mlp"
        h = self._norm_input(i, L, blk.ln_2, state, L["attn_resid_out"], L["ln_2_rstd"], "x_mid_full", "pos2")
        act_in = self._ablate(f"{p}.act_in", L["mlp_act_in"].run(h, ties, kb), ablations)
        post = self._ablate(f"{p}.post_act", L["mlp_post_act"].run(self._act(L["fc"].run(act_in)), ties, kb), ablations)
        delta = self._ablate(f"{p}.resid_delta", L["mlp_resid_delta"].run(L["mlp_proj"].run(post), ties, kb), ablations)
        return self._residual(L, "mlp", state, delta)

    def _final_logits(
        self,
        state: torch.Tensor,
        rows: torch.Tensor | None = None,
        tokens: torch.Tensor | None = None,
        at_rows: bool = False,
        ablations=None,
    ):
        """Logits at `rows` (all when None) of the flattened docs, for `tokens` (rows, j) or all;
        `at_rows`: `state` holds those rows only. `ablations` may hold final_resid's (positions
        there are channels of the full residual)."""
        tr, m = self.model.transformer, self.model
        rows = torch.arange(self.B * self.T) if rows is None else rows
        x = self.final_x[rows].expand(state.shape[0], -1, -1).clone()
        x[..., self.final_resid] = state if at_rows else state[:, rows]
        if self.final_const is not None:  # the final_resid mask: channels outside the circuit at their fill
            x[..., self.final_const] = self.final_x[rows][:, self.final_const]
            x = self._ablate(FINAL_RESID, x, ablations or {})
        h = self._norm(tr.ln_f, x, self.rstd["ln_f.rstd"][rows])
        ids = self.docs.reshape(-1)[rows]
        if tokens is None:
            logits = F.linear(h, m.lm_head.weight) + m.final_logits_bias
            return logits + m.bigram_table[ids] if self.config.enable_bigram_table else logits
        w = m.lm_head.weight[tokens]  # (rows, j, d)
        logits = torch.einsum("arc,rjc->arj", h, w) + m.final_logits_bias[tokens]
        if self.config.enable_bigram_table:
            logits = logits + m.bigram_table[ids[:, None], tokens]
        return logits

    @torch.no_grad()
    def logits(self) -> torch.Tensor:
        """Logits (B, T, vocab) of the circuit model, from the circuit-only run."""
        return self._final_logits(self.final_state)[0].view(self.B, self.T, -1)

    @torch.no_grad()
    def ablation_losses(
        self, mode: str = "mean", batch: int = 32, log=None
    ) -> tuple[dict[str, torch.Tensor], list[tuple[str, int, torch.Tensor]]]:
        """Raw task loss on each pair with each circuit node ablated in turn ((nodes, pairs) per
        location, sorted channels: `ablation_losses`' `per_pair` convention), and the nodes whose
        result hit an AbsTopK tie in a row that reaches an answer, as (loc, channel, the docs where
        it did): on those docs' pairs the value here is not to be trusted (`fast_ablation_losses`
        recomputes those docs with the reference)."""
        per_doc, tied = self.ablation_doc_losses(mode, batch, log)
        return {loc: pair_losses(v) for loc, v in per_doc.items()}, tied

    @torch.no_grad()
    def ablation_doc_losses(
        self, mode: str = "mean", batch: int = 32, log=None
    ) -> tuple[dict[str, torch.Tensor], list[tuple[str, int, torch.Tensor]]]:
        """`ablation_losses` per doc: each doc's half of its pair's loss (`inference.circuit.
        doc_losses`), float32 (nodes, docs) per location; a pair's loss is its two docs' sum
        (`pair_losses`). A doc's answer depends on that doc only, so a tie redone by the reference
        needs only the docs where it was hit."""
        if mode not in ("mean", "zero"):
            raise ValueError(f"mode must be 'mean' or 'zero', got {mode!r}")
        docs = self.docs
        n, half = docs.shape[0], docs.shape[0] // 2
        if n % 2:
            raise ValueError(f"task docs must come in pairs, got {n} docs")
        lengths = self.lengths
        rows = torch.arange(n) * self.T + lengths - 2
        tokens = answer_tokens(docs)  # (n, 2): tokid, alt_tokid of each doc's pair

        nodes = [(loc, pos, int(c)) for loc in self.locations for pos, c in enumerate(self.circuit[loc].tolist())]
        losses: dict[tuple[str, int], torch.Tensor] = {}
        tied: list[tuple[str, int, torch.Tensor]] = []
        # Freed pass intermediates stay mapped for the next ones (inference.memory.heap_kept).
        with heap_kept():
            # One location at a time, so a pass shares everything upstream of its nodes (size 1).
            for loc in self.locations:
                trim_heap()  # the passes' freed intermediates back to the system (inference.memory)
                t_loc = time.perf_counter()
                i = parse_location(loc)[0]
                # Ties matter only where they can reach an answer (`self.relevant`: positions up to
                # each doc's last query); the un-ablated run's before this layer are every ablation's.
                tied_before = self.tied_before[self.config.n_layer if loc == FINAL_RESID else i]
                loc_nodes = [nd for nd in nodes if nd[0] == loc]
                for start in range(0, len(loc_nodes), batch):
                    group = loc_nodes[start : start + batch]
                    A = len(group)
                    value = torch.tensor([0.0 if mode == "zero" else float(self.fill[loc][c]) for _, _, c in group])
                    # final_resid is ablated in the full-width residual: its positions are the channels.
                    pos = [c if loc == FINAL_RESID else p for _, p, c in group]
                    ablations = {loc: (A, torch.arange(A), torch.tensor(pos), value)}
                    ties = (tied_before.expand(A, n).clone(), self.relevant)
                    if loc == FINAL_RESID:  # after every layer: only the final norm and the unembedding run
                        logits = self._final_logits(self.final_state, rows, tokens, ablations=ablations).float()
                    else:
                        state = self.start_states[i]
                        last = self.config.n_layer - 1
                        for j in range(i, last + 1):
                            state = self._run_layer(j, state, ablations, ties, rows if j == last else None)
                        logits = self._final_logits(state, rows, tokens, at_rows=True).float()  # (A, n, 2)
                    lp_first = F.log_softmax(logits[:, :half], dim=-1)[..., 0]
                    lp_second = F.log_softmax(logits[:, half:], dim=-1)[..., 1]
                    # A leading size of 1 means no ablation reached the answers (e.g. act_in nodes
                    # read by no q/k/v node of the circuit): every one of them leaves the loss as is.
                    loss = -torch.cat([lp_first, lp_second], dim=1)  # (A or 1, docs)
                    loss = loss.expand(A, -1)
                    for a, (loc, _pos, c) in enumerate(group):
                        losses[(loc, c)] = loss[a]
                        if ties[0][a].any():
                            tied.append((loc, c, torch.nonzero(ties[0][a]).flatten()))
                if log:
                    log(f"{mode} ablations at {loc}: {len(loc_nodes)} nodes in {time.perf_counter() - t_loc:.1f} s")

        def gather(values):
            return torch.stack(values) if values else torch.zeros(0, n)

        out = {loc: gather([losses[(loc, int(c))] for c in self.circuit[loc].tolist()]) for loc in self.locations}
        return out, tied


def _aligned(
    circuit_data, per_channel: dict[str, torch.Tensor], circuit_sorted: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Re-align results over sorted unique channels with circuit_data's own order."""
    out = {}
    for loc, channels in circuit_data.items():
        chans = torch.as_tensor(channels).long().reshape(-1)
        if loc not in circuit_sorted:
            out[loc] = torch.zeros(0)
            continue
        out[loc] = per_channel[loc][_positions(chans, circuit_sorted[loc])]
    return out


def pair_losses(doc_losses: torch.Tensor) -> torch.Tensor:
    """(nodes, pairs) float64 task losses from (nodes, docs) per-doc halves (the first half of the
    docs, then their partners): each pair's two halves added in float32, as `task_loss` does."""
    half = doc_losses.shape[1] // 2
    return (doc_losses[:, :half] + doc_losses[:, half:]).double()


def _redo_tied(model, cm: CircuitModel, circuit_data, means, mode: str, tied, per_doc: dict[str, torch.Tensor]) -> int:
    """Recompute with the reference, in place in `per_doc`, each tied (node, doc) of
    `CircuitModel.ablation_doc_losses`; returns how many. Per doc, one un-ablated masked forward
    keeps the residual entering each layer; each of the doc's tied nodes then runs only the
    layers from its own (everything before is the same with or without the ablation)."""
    masks = circuit_masks(model.config, circuit_data)
    n, last = cm.docs.shape[0], model.config.n_layer - 1
    tokens = answer_tokens(cm.docs)
    by_doc: dict[int, list[tuple[str, int]]] = {}
    for loc, c, docs in tied:
        for d in docs.tolist():
            by_doc.setdefault(d, []).append((loc, c))
    for d, nodes in sorted(by_doc.items()):
        doc = cm.docs[d : d + 1]
        frozen = {name: s[d : d + 1] for name, s in cm.frozen_scales.items()}
        # final_resid's nodes rerun the last block (the residual the hook sees is not recorded unmasked)
        start = {loc: last if loc == FINAL_RESID else parse_location(loc)[0] for loc, _ in nodes}
        with record("|".join(rf"{i}\.resid_in" for i in sorted(set(start.values())))) as resid:
            masked_forward(model, doc, masks, means, frozen)
        for loc, c in nodes:
            i = start[loc]
            logits = masked_forward(model, doc, *ablated(masks, means, loc, c, mode), frozen, start=(i, resid[f"{i}.resid_in"]))
            loss = doc_losses(logits, doc, tokens[d : d + 1], wanted_column(torch.tensor([d]), n))
            per_doc[loc][_positions(torch.tensor([c]), cm.circuit[loc]), d] = loss.float().cpu()
    return sum(len(nodes) for nodes in by_doc.values())


@torch.no_grad()
def fast_ablation_losses(
    model,
    docs: torch.Tensor,
    circuit_data,
    means,
    mode: str = "mean",
    batch: int = 32,
    circuit_model: CircuitModel | None = None,
    log=None,
    per_pair: bool = False,
) -> dict[str, torch.Tensor]:
    """`ablation_losses` (same arguments and return convention) computed with `CircuitModel`:
    only the circuit's nodes are recomputed, many ablations per pass. An ablation whose result
    depends on how topk breaks a tie is recomputed by the reference on the docs where it does
    (the docs are independent: each pair's loss is its two docs'); models the circuit model
    does not support fall back to `ablation_losses` entirely.

    `circuit_model`: a `CircuitModel(model, docs, circuit_data, means)` built already (to share
    it between the mean and zero ablations); built here when None."""
    if mode not in ("mean", "zero"):
        raise ValueError(f"mode must be 'mean' or 'zero', got {mode!r}")
    cm = circuit_model
    if cm is None:
        try:
            cm = CircuitModel(model, docs, circuit_data, means)
        except NotImplementedError:
            return ablation_losses(model, docs, circuit_data, means, mode, per_pair)
    per_doc, tied = cm.ablation_doc_losses(mode, batch, log)  # (nodes, docs) per location
    if tied:
        t = time.perf_counter()
        redone = _redo_tied(model, cm, circuit_data, means, mode, tied, per_doc)
        if log:
            log(
                f"{mode} ablations: {len(tied)} nodes hit an AbsTopK tie; {redone} (node, doc)s redone by the reference in {time.perf_counter() - t:.1f} s"
            )
    per_channel = {loc: pair_losses(v) for loc, v in per_doc.items()}
    if not per_pair:  # the mean over pairs, as a float32 loss per node (the reference's convention)
        per_channel = {loc: v.mean(dim=1).float() for loc, v in per_channel.items()}
    return _aligned(circuit_data, per_channel, cm.circuit)
