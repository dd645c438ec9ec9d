"""Forward passes that check and extend a stored circuit. Pure functions, no Dagster.

Given the store's model and a circuit's viz_data:
- the full model on the task docs: task loss (vs stored `loss`) and every circuit node's activations;
- the circuit model (non-circuit nodes mean-ablated, norms frozen; `inference.circuit`): task loss
  (vs stored `interv_loss`) and the circuit nodes' activations;
- per circuit node, the task loss with that node also ablated, by its mean and by zero
  (vs stored `ch_interv_losses`), with the circuit-only model (`inference.circuit_model.CircuitModel`:
  every ablation recomputes only the circuit's nodes; equal to the per-node loop of full-size
  forwards within float rounding, tested).

Forward passes run on the fast path (`inference.fast.accelerate`, switched on in place on the
model given: same logits and hook values, sparse matmuls).

Means: the released store holds neither the node means its circuits were found with nor a
pretraining corpus, but every viz_data carries pretraining text, the `samples` snippets. The node
means are taken over all tokens of the distinct snippets of the file, each snippet run through the
model as its own sequence (positions from 0): an approximation, so small disagreements with the
stored ablations are expected. With no snippets the task docs are used instead. A store that holds
`models/<model>/node_means.pt` (the embedded store writes the exact means it pruned with) gives
those instead (`means_source` = "store"); then recomputed and stored values agree to float rounding.

Locations: `final_resid` nodes are recomputed like the others (the model's `final_resid` hook:
the residual after the last block, before `ln_f`). Nodes at a location the model has no hook for
are skipped, and `recompute_summary.skipped` says which and why.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from inference import circuit as C
from inference import circuit_model as CM
from inference import settings as env
from inference.fast import accelerate, is_accelerated
from inference.hooks import record
from inference.memory import release_mapped_pages, trim_heap
from pipeline.convert import RunRef, _unpadded_index, node_id
from pipeline.formats import VizData
from pipeline.tables import make_table


def snippet_sequences(viz: VizData) -> list[torch.Tensor]:
    """The distinct pretraining snippets of the file as 1-D token tensors."""
    seen: dict[bytes, torch.Tensor] = {}
    for loc, by_ch in viz.samples.items():
        for ch in by_ch:
            for s in viz.snippets(loc, ch):
                if s.tokens.size:
                    seen.setdefault(s.tokens.tobytes(), torch.from_numpy(s.tokens.copy()))
    return list(seen.values())


# Node means from the snippets: at most this many tokens (whole snippets, a fixed-seed sample when
# the file holds more). 32,768 tokens ~ 320 snippets of 101 tokens: the standard errors it gives
# are reported (`means_se_max`, `node_mean_se`), and bench/recompute.py measures the effect on the
# deltas of another budget (bench/README.md). Small files (every fixture) use all their snippets.
MEANS_TOKEN_BUDGET = 32_768
# Tokens per chunk of the forward passes (docs x the chunk's longest doc, whole pairs): bounds the
# hook tensors and the circuit-only model's tables (at release scale, 8 docs of 1,024 tokens took
# the masked forward plus CircuitModel's ablation batches past 10 GB; 2 docs, 2,048 tokens, fit in
# the 3 GB of issue 14). Short task docs share a chunk: the embedded store's ~17-token docs run
# ~60 pairs per chunk, so each run builds its circuit-only model twice instead of 64 times.
CHUNK_TOKENS = 2048
# Ablations per batched pass of the circuit-only model: a pass's widest tensors are (ablations,
# rows, width), `width` the circuit-only model's widest per-ablation row
# (`CircuitModel.ablation_width`: ~2,400 at release scale, the dynamic heads' q, k and v). This
# many elements per such tensor (~160 MB of float32) gives 8 ablations per pass at release scale
# (2 docs of 1,024 tokens; 32 took the process from 1.8 to 3.9 GB, bench/README.md) and lets small
# circuits, whose passes are mostly fixed overhead, batch many more.
ABLATION_ELEMENTS = 40_000_000
MAX_ABLATION_BATCH = 128


MIN_ABLATION_PAIRS = 2  # a sample of pairs has at least this many: a standard error needs two
# Two-sided 99.9% quantiles of Student's t by degrees of freedom (ablated pairs - 1). A sampled
# delta agrees with the stored one when they differ by at most the tolerance plus this many
# standard errors (were the per-pair differences normal, sampling alone would flag about one node
# in 1,000; effects concentrated in unsampled pairs escape any SE). Between tabulated degrees of
# freedom the smaller one's (larger, conservative) value is used; past 120, the normal's.
_T_999 = {1: 636.62, 2: 31.60, 3: 12.92, 4: 8.61, 5: 6.87, 6: 5.96, 7: 5.41, 8: 5.04, 9: 4.78, 10: 4.59,
          12: 4.32, 15: 4.07, 20: 3.85, 30: 3.65, 60: 3.46, 120: 3.37}  # fmt: skip


def t_quantile_999(df: int) -> float:
    """Student's t two-sided 99.9% quantile for `df` degrees of freedom (3.29 past 120)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df > 120:
        return 3.29
    return _T_999[max(d for d in _T_999 if d <= df)]


def ablation_batch(rows: int, width: int) -> int:
    """Ablations per pass for a chunk of `rows` tokens and a circuit-only model `width` wide."""
    return max(1, min(MAX_ABLATION_BATCH, ABLATION_ELEMENTS // max(1, rows * width)))


def sample_sequences(seqs: list[torch.Tensor], budget: int = MEANS_TOKEN_BUDGET, seed: int = 0) -> list[torch.Tensor]:
    """A fixed-seed random subset of whole sequences with at most `budget` tokens in all (all of
    them when they fit): the means' estimator is then a mean over a sample of snippets."""
    if sum(len(s) for s in seqs) <= budget:
        return seqs
    order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(seed)).tolist()
    out, n = [], 0
    for i in order:
        if n + len(seqs[i]) > budget:
            break
        out.append(seqs[i])
        n += len(seqs[i])
    return out


@torch.no_grad()
def means_over_sequences(
    model, seqs: list[torch.Tensor], locations: list[str] | None = None, batch_size: int = 16, with_se: bool = False
):
    """Token-weighted mean of every node location (or of `locations`) over sequences of any
    lengths; (means, n_tokens), or (means, n_tokens, standard errors) with `with_se`.

    Standard error: the sequences are the sampled units (tokens of one snippet are correlated),
    so SE = sqrt(sum_i w_i^2 (m_i - mean)^2) / sum_i w_i over sequences i with w_i tokens and
    mean m_i (the ratio estimator's); it needs the per-sequence means, recorded channel-wise by
    `record(into=...)` without keeping any hook tensor."""
    block = model.config.block_size
    locs = C.node_locations(model.config) if locations is None else locations
    device = next(model.parameters()).device
    by_len: dict[int, list[torch.Tensor]] = {}
    for s in seqs:
        s = s[:block]
        by_len.setdefault(len(s), []).append(s)
    total: dict[str, torch.Tensor] = {}
    sq: dict[str, torch.Tensor] = {}  # sum_i w_i^2 m_i^2, sum_i w_i^2 m_i, for the SE
    cross: dict[str, torch.Tensor] = {}
    w2_total = 0.0
    n_tokens = 0
    pattern = "|".join(re.escape(loc) for loc in locs)
    for length, group in sorted(by_len.items()):
        for start in range(0, len(group), batch_size):
            idx = torch.stack(group[start : start + batch_size]).to(device)

            def take(name, t, w=length):
                # (n_seq, width): each sequence's mean, summed in float32 (torch's pairwise sum,
                # ~1e-7 relative: far below the means' standard errors), then float64 across
                # sequences. Casting the whole hook tensor to float64 first was a third of the stage.
                m = t.mean(dim=1).double()
                s = m.sum(0) * w
                total[name] = total[name] + s if name in total else s
                if with_se:
                    a, b = (m * m).sum(0) * w * w, m.sum(0) * w * w
                    sq[name] = sq[name] + a if name in sq else a
                    cross[name] = cross[name] + b if name in cross else b

            with record(pattern, into=take):
                model(idx)
            trim_heap()
            n_tokens += idx.numel()
            w2_total += idx.shape[0] * length * length
    means = {loc: (v / n_tokens) for loc, v in total.items()}
    out = {loc: v.float() for loc, v in means.items()}
    if not with_se:
        return out, n_tokens
    # sum w^2 (m - mu)^2 = sum w^2 m^2 - 2 mu sum w^2 m + mu^2 sum w^2
    se = {
        loc: ((sq[loc] - 2 * mu * cross[loc] + mu * mu * w2_total).clamp(min=0).sqrt() / n_tokens).float()
        for loc, mu in means.items()
    }
    return out, n_tokens, se


class Spill:
    """Per-node activations (n_docs, ctx) written chunk by chunk to a temporary file, node-major,
    and read back one node at a time: the recompute never holds every node's activations (release
    scale: 2,000 nodes x 64 x 1,024 floats = 0.5 GB per model). Plain reads and writes, no mmap,
    so the pages are not counted in the process's resident memory."""

    def __init__(self, nodes: list[tuple[str, int]], n_docs: int, ctx: int):
        self._dir = tempfile.TemporaryDirectory(prefix="circuits-recompute-")
        self.path = os.path.join(self._dir.name, "acts.f32")
        self.index = {node: i for i, node in enumerate(nodes)}
        self.n_docs, self.ctx = n_docs, ctx
        with open(self.path, "wb") as f:
            f.truncate(len(nodes) * n_docs * ctx * 4)

    def write(self, docs: list[int], by_node: dict[tuple[str, int], np.ndarray]) -> None:
        """Rows `docs` of each node: arrays (len(docs), width <= ctx); positions past width stay 0."""
        with open(self.path, "r+b") as f:
            for node, a in by_node.items():
                a = np.ascontiguousarray(a, dtype=np.float32)
                for j, d in enumerate(docs):
                    f.seek(((self.index[node] * self.n_docs + d) * self.ctx) * 4)
                    f.write(a[j].tobytes())

    def __contains__(self, node) -> bool:
        return node in self.index

    def __getitem__(self, node) -> np.ndarray:
        with open(self.path, "rb") as f:
            f.seek(self.index[node] * self.n_docs * self.ctx * 4)
            return np.fromfile(f, dtype=np.float32, count=self.n_docs * self.ctx).reshape(self.n_docs, self.ctx)

    def close(self) -> None:
        self._dir.cleanup()


@dataclass
class Recomputed:
    loss: float
    interv_loss: float
    full_acts: Spill | dict  # (loc, ch) -> (n_docs, ctx)
    circuit_acts: Spill | dict
    ablation: dict[str, dict[str, np.ndarray]]  # mode -> loc -> losses aligned with circuit[loc]
    means_source: str
    means_tokens: int
    means: dict[str, np.ndarray] | None = None  # loc -> the node means used, aligned with circuit[loc]
    means_se: dict[str, np.ndarray] | None = None  # their standard errors (NaN when exact, e.g. the store's)
    timings: dict[str, float] | None = None  # seconds per stage
    ablation_se: dict[str, dict[str, np.ndarray]] | None = None  # mode -> loc -> standard errors (0: exact)
    ablated_pairs: list[int] | None = None  # the task pairs the ablations ran on (pair j: docs j, j + n/2)
    task_pairs: int | None = None  # all task pairs


def skipped_locations(viz: VizData) -> dict[str, int]:
    """Locations of the circuit that the model has no hook point for (unknown names), with their node counts."""
    return {loc: len(ch) for loc, ch in viz.circuit.items() if not C.is_known_location(loc)}


def pair_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """Per task pair (doc j and its partner j + n/2), the longer doc's length."""
    half = len(lengths) // 2
    return torch.maximum(lengths[:half], lengths[half:])


def pair_chunks(lengths: torch.Tensor, pairs, chunk_tokens: int = CHUNK_TOKENS) -> list[torch.Tensor]:
    """Doc indices per chunk for the given pairs: the pairs by length, grouped while the chunk's
    docs x its longest doc stay within `chunk_tokens` (at least one pair per chunk). A chunk lists
    its pairs' first docs, then their partners (the order `task_loss` reads), so each chunk's task
    losses are its own pairs' and the chunks' combine pair by pair."""
    half = len(lengths) // 2
    plen = pair_lengths(lengths).tolist()
    chunks, current, width = [], [], 0
    for j in sorted(pairs, key=lambda j: (plen[j], j)):
        w = max(width, plen[j], 2)
        if current and 2 * (len(current) + 1) * w > chunk_tokens:
            chunks.append(current)
            current, w = [], max(plen[j], 2)
        current.append(j)
        width = w
    if current:
        chunks.append(current)
    return [torch.cat([torch.tensor(c), torch.tensor(c) + half]) for c in chunks]


def ablation_pairs(lengths: torch.Tensor, n_nodes: int, budget: int) -> list[int]:
    """The task pairs the ablations run on: every pair when `n_nodes` x their tokens fits in
    `budget` (node-tokens per mode; 0: every pair), else a fixed-seed simple random sample of k
    whole pairs, k = budget / (n_nodes x the mean tokens of a pair), at least MIN_ABLATION_PAIRS.
    The sample's size depends only on the budget and the mean, and which pairs only on the seed:
    a simple random sample whatever the pairs' lengths (a sample cut where the budget runs out
    would favour short pairs), so the recompute's standard errors are those of one. Its work is
    within the budget on average over the pairs, not exactly."""
    half = len(lengths) // 2
    tokens = (lengths[:half] + lengths[half:]).tolist()
    if budget <= 0 or n_nodes * sum(tokens) <= budget or half <= MIN_ABLATION_PAIRS:
        return list(range(half))
    k = max(MIN_ABLATION_PAIRS, min(half - 1, int(budget * half // (n_nodes * sum(tokens)))))
    return sorted(torch.randperm(half, generator=torch.Generator().manual_seed(0))[:k].tolist())


def paired_estimate(ablated: np.ndarray, circuit: np.ndarray, n_pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error of the ablation's effect from a simple random sample of pairs.

    `ablated` (nodes, k): each node's ablated task loss on the k sampled pairs; `circuit` (k,):
    the circuit's loss on the same pairs; `n_pairs`: all pairs. The paired differences' mean is
    unbiased for the mean over every pair; its standard error carries the finite-population
    correction, so it is 0 when every pair was ablated (the delta is then exact)."""
    d = ablated - circuit[None, :]
    k = d.shape[1]
    mean = d.mean(axis=1)
    if k >= n_pairs:
        return mean, np.zeros_like(mean)
    return mean, d.std(axis=1, ddof=1) / np.sqrt(k) * np.sqrt(1.0 - k / n_pairs)


class _Run:
    """One run's recompute inputs, shared by its stages: the task docs in chunks of whole pairs, the
    circuit's channels per location, what to record, and the spills of the recorded activations."""

    def __init__(self, model, viz: VizData, chunk_tokens: int, ablation_budget: int, log):
        self.model, self.log = model, log
        self.device = next(model.parameters()).device
        self.all_docs = torch.from_numpy(viz.docs)
        self.n_docs = n_docs = self.all_docs.shape[0]
        if n_docs % 2:
            raise ValueError(f"task docs must come in pairs, got {n_docs} docs")
        self.lengths = torch.from_numpy(viz.doc_lengths()) if self.all_docs.numel() else torch.zeros(n_docs, dtype=torch.long)
        # the task-docs means (no snippets) run at the longest doc's width
        self.ctx = max(int(self.lengths.max()) if n_docs else 0, 2)
        # Locations the model has no hook point for cannot be recomputed (skipped_locations).
        self.circuit = {loc: torch.from_numpy(ch) for loc, ch in viz.circuit.items() if C.is_known_location(loc)}
        self.locations = C.circuit_locations(model.config, self.circuit)  # the means needed, final_resid's included
        self.locs = sorted(self.circuit)
        if log and len(self.circuit) < len(viz.circuit):
            log(f"not recomputed (no hook point in the model): {skipped_locations(viz)}")
        self.pattern = "|".join(re.escape(loc) for loc in self.locs)
        nodes = [(loc, int(ch)) for loc, ch, _ in viz.nodes() if loc in self.circuit]
        self.chans = {loc: torch.as_tensor(self.circuit[loc]).long() for loc in self.locs}
        self.full_acts = Spill(nodes, n_docs, viz.docs.shape[1])
        self.circuit_acts = Spill(nodes, n_docs, viz.docs.shape[1])
        # The ablated pairs' chunks first (the ablations run on those only), then the rest's.
        self.n_pairs = n_docs // 2
        self.ablated = ablation_pairs(self.lengths, len(nodes), ablation_budget)
        rest = sorted(set(range(self.n_pairs)) - set(self.ablated))
        ablated_chunks = pair_chunks(self.lengths, self.ablated, chunk_tokens)
        self.n_ablation_chunks = len(ablated_chunks)
        self.chunks = ablated_chunks + pair_chunks(self.lengths, rest, chunk_tokens)

    def docs_width(self, idx: torch.Tensor) -> int:
        """The width a chunk runs at: its longest doc (at least 2)."""
        return max(int(self.lengths[idx].max()) if len(idx) else 0, 2)

    def docs_of(self, idx: torch.Tensor) -> torch.Tensor:
        # Positions after a chunk's longest doc only hold padding, and the model is causal: cut
        # them (every pass, the ablations most, then scales with the chunk's real tokens).
        return self.all_docs[idx, : self.docs_width(idx)].to(self.device)

    def recorder(self, into: dict):
        """A `record(into=...)` callback keeping only the circuit's channels of each hook tensor."""

        def take(name, t):
            if name in self.chans:
                into[name] = t[..., self.chans[name].to(t.device)].float().cpu()
            else:  # a norm's inverse scale (B, T, 1): small
                into[name] = t.clone()

        return take

    def spill(self, target: Spill, docs_idx: torch.Tensor, got: dict) -> None:
        target.write(docs_idx.tolist(), {(loc, int(c)): got[loc][:, :, j].numpy() for loc in self.locs if loc in got
                                         for j, c in enumerate(self.chans[loc].tolist())})  # fmt: skip

    def aligned(self, d: dict) -> dict:
        """Per location, the circuit's channels in circuit_data order."""
        return {loc: d[loc].detach().double().cpu().numpy()[self.chans[loc].numpy()] for loc in self.locs if loc in d}


def _full_model_stage(run: _Run) -> tuple[float, list[dict]]:
    """Stage 1, the full model: task loss, the circuit's channels (spilled) and the norm scales per chunk."""
    pair_losses, frozen_by_chunk = [], []
    full_pattern = "|".join(p for p in (run.pattern, C._RSTD) if p)
    for idx in run.chunks:
        docs = run.docs_of(idx)
        got: dict = {}
        with record(full_pattern, into=run.recorder(got)):
            logits = run.model(docs)
        pair_losses.append(C.task_loss(logits, docs, per_pair=True).double().cpu())
        del logits
        frozen_by_chunk.append({k: v for k, v in got.items() if k.endswith(".rstd")})
        run.spill(run.full_acts, idx, got)
        if len(pair_losses) == 1:  # the linears' compressed copies are built: the dense pages are not read again
            release_mapped_pages(run.model.parameters())
        trim_heap()  # freed intermediates back to the system (inference.memory: else RSS creeps up chunk by chunk)
    return torch.cat(pair_losses).mean().item(), frozen_by_chunk


def _means_stage(run: _Run, viz: VizData, store_means, means_budget: int):
    """Stage 2, the node means: the store's (and, for locations it lacks, an estimate), else the
    estimate over a budget of snippet tokens, else over the task docs. (means, tokens, source, se)."""
    model, device, locations = run.model, run.device, run.locations
    se = None
    if store_means is not None:
        means, n_tokens, source = store_means
        means = {loc: m.to(device) for loc, m in means.items()}
        lacking = [loc for loc in locations if loc not in means]  # e.g. final_resid: not in the store's file
        if lacking:
            seqs = sample_sequences(snippet_sequences(viz), means_budget)
            if seqs:
                extra, _, se = means_over_sequences(model, seqs, lacking, with_se=True)
            else:
                extra = C.node_means(model, run.all_docs[:, : run.ctx].to(device), locations=lacking)
            means = {**means, **extra}
            source = f"{source} ({', '.join(lacking)}: {'samples' if seqs else 'task_docs'})"
    else:
        seqs = sample_sequences(snippet_sequences(viz), means_budget)
        if seqs:
            means, n_tokens, se = means_over_sequences(model, seqs, locations, with_se=True)
            source = "samples"
        else:
            means, n_tokens = (
                C.node_means(model, run.all_docs[:, : run.ctx].to(device), locations=locations),
                run.n_docs * run.ctx,
            )
            source = "task_docs"
    return {loc: m.to(device) for loc, m in means.items()}, n_tokens, source, se


def _chunk_ablations(run: _Run, docs, means, frozen, modes, first: bool) -> dict:
    """Every node's ablation loss on each pair of one chunk, per mode and location: (nodes, pairs)."""
    circuit_model = None  # built once per chunk, shared by the modes; CPU only
    t = time.perf_counter()
    if run.device.type == "cpu":
        try:
            circuit_model = CM.CircuitModel(run.model, docs, run.circuit, means, frozen)
        except NotImplementedError:  # AbsTopK on the residual stream: the reference loop below
            pass
    if run.log and first:
        run.log(f"circuit-only model of the first chunk built in {time.perf_counter() - t:.0f} s")
    if circuit_model is None:
        return {mode: C.ablation_losses(run.model, docs, run.circuit, means, mode=mode, per_pair=True) for mode in modes}
    # A mode's passes keep ~1.4 of 2 cores busy (small ops between the kernels, each split over
    # torch's threads). The modes are independent: with a torch thread per mode, each runs on a
    # thread of its own with one torch thread (torch's thread count is per OS thread, as for
    # inference.fast's workers), and every core stays busy; they share the per-pass memory budget.
    side_by_side = len(modes) > 1 and torch.get_num_threads() >= len(modes)
    batch = ablation_batch(docs.numel(), circuit_model.ablation_width()) // (len(modes) if side_by_side else 1)

    def ablate(mode: str) -> dict:
        if side_by_side:
            torch.set_num_threads(1)
        return CM.fast_ablation_losses(
            run.model,
            docs,
            run.circuit,
            means,
            mode=mode,
            batch=max(1, batch),
            circuit_model=circuit_model,
            log=run.log if first else None,
            per_pair=True,
        )  # log: per location, first chunk only

    if not side_by_side:
        return {mode: ablate(mode) for mode in modes}
    with ThreadPoolExecutor(len(modes), thread_name_prefix="ablations") as pool:
        futures = {mode: pool.submit(ablate, mode) for mode in modes}
        return {mode: f.result() for mode, f in futures.items()}


def _circuit_stage(run: _Run, means, frozen_by_chunk, modes, timings):
    """Stage 3, per chunk: the circuit model's task loss and channels (spilled), then, on the
    ablated pairs' chunks, every node's ablations. (circuit loss, mode -> location -> ablation
    losses, mode -> location -> their standard errors)."""
    masks = {k: v.to(run.device) for k, v in C.circuit_masks(run.model.config, run.circuit).items()}
    interv = np.full(run.n_pairs, np.nan)  # per pair
    # mode -> location -> (nodes, n_pairs), NaN where not ablated
    per_pair = {mode: {loc: np.full((len(run.circuit[loc]), run.n_pairs), np.nan) for loc in run.locs} for mode in modes}
    timings["circuit_model"] = timings["ablations"] = 0.0
    # the ablated chunks' task tokens (docs x width), for the time-left estimate in the log
    ablated_tokens = [len(idx) * run.docs_width(idx) for idx in run.chunks[: run.n_ablation_chunks]]
    for n_chunk, (idx, frozen) in enumerate(zip(run.chunks, frozen_by_chunk, strict=True)):
        t = time.perf_counter()
        docs = run.docs_of(idx)
        pairs = idx[: len(idx) // 2].numpy()
        got = {}
        with record(run.pattern, into=run.recorder(got)) if run.pattern else contextlib.nullcontext():
            logits = C.masked_forward(run.model, docs, masks, means, frozen)
        interv[pairs] = C.task_loss(logits, docs, per_pair=True).double().cpu().numpy()
        del logits
        run.spill(run.circuit_acts, idx, got)
        trim_heap()
        timings["circuit_model"] += time.perf_counter() - t
        if n_chunk < run.n_ablation_chunks:
            t = time.perf_counter()
            for mode, by_loc in _chunk_ablations(run, docs, means, frozen, modes, first=n_chunk == 0).items():
                for loc, v in by_loc.items():
                    per_pair[mode][loc][:, pairs] = np.asarray(v, dtype=np.float64).reshape(len(v), len(pairs))
            trim_heap()
            timings["ablations"] += time.perf_counter() - t
            if run.log and n_chunk + 1 < run.n_ablation_chunks:  # ablation time scales with the chunk's tokens
                done = sum(ablated_tokens[: n_chunk + 1])
                left = timings["ablations"] / done * sum(ablated_tokens[n_chunk + 1 :])
                run.log(
                    f"ablations: {n_chunk + 1} of {run.n_ablation_chunks} chunks in {timings['ablations']:.0f} s, about {left / 60:.0f} min left"
                )
        if run.log:
            run.log(f"chunk of {len(idx)} docs done ({n_chunk + 1}/{len(run.chunks)})")
    interv_loss = float(interv.mean())
    ablation = {mode: {} for mode in modes}
    ablation_se = {mode: {} for mode in modes}
    for mode, by_loc in per_pair.items():
        for loc, v in by_loc.items():
            mean, se = paired_estimate(v[:, run.ablated], interv[run.ablated], run.n_pairs)
            ablation[mode][loc], ablation_se[mode][loc] = interv_loss + mean, se
    return interv_loss, ablation, ablation_se


@torch.no_grad()
def recompute(
    model,
    viz: VizData,
    modes: tuple[str, ...] = ("mean", "zero"),
    log=None,
    store_means: tuple[dict, int, str] | None = None,
    chunk_tokens: int = CHUNK_TOKENS,
    means_budget: int = MEANS_TOKEN_BUDGET,
    ablation_budget: int = env.DEFAULT_ABLATION_BUDGET,
) -> Recomputed:
    """`store_means`: (means by location, tokens, source) that the store holds for the model (the
    embedded store writes the ones its circuits were found with); used instead of the snippets.

    Docs run in chunks of at most `chunk_tokens` padded tokens (whole pairs); every per-doc
    quantity (activations, norm scales, task loss per pair, ablation losses) is computed per chunk
    and combined, equal to one pass over all docs within float rounding (tested).

    Ablations: on every pair when the circuit's nodes x the pairs' tokens fit in `ablation_budget`
    (node-tokens per mode; 0: always every pair), else on a fixed-seed sample of pairs
    (`ablation_pairs`); each node's ablated loss is then the circuit loss plus the mean paired
    difference over the sample, with its standard error (`paired_estimate`)."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if not is_accelerated(model):
        accelerate(model)
    run = _Run(model, viz, chunk_tokens, ablation_budget, log)
    if log and len(run.ablated) < run.n_pairs:
        log(
            f"ablations on {len(run.ablated)} of {run.n_pairs} task pairs (a random sample sized by the budget of "
            f"{ablation_budget:,} node-tokens per mode; deltas carry standard errors)"
        )
    loss, frozen_by_chunk = _full_model_stage(run)
    timings["full_model"] = time.perf_counter() - t0
    if log:
        log(f"full model: {run.n_docs} docs in {timings['full_model']:.0f} s")
    t = time.perf_counter()
    means, n_tokens, source, se = _means_stage(run, viz, store_means, means_budget)
    timings["means"] = time.perf_counter() - t
    if log:
        log(f"node means over {n_tokens} tokens of {source}")
    interv_loss, ablation, ablation_se = _circuit_stage(run, means, frozen_by_chunk, modes, timings)
    return Recomputed(
        loss, interv_loss, run.full_acts, run.circuit_acts, ablation, source, n_tokens, run.aligned(means),
        run.aligned(se) if se is not None else None, timings, ablation_se, run.ablated, run.n_pairs,
    )  # fmt: skip


def within(a: float, b: float, tol: float, se: float = 0.0, pairs: int = 0) -> bool:
    """|a - b| <= tol * max(1, |b|), plus t_quantile_999(pairs - 1) standard errors when `a` is
    an estimate from a sample of `pairs` pairs with standard error `se`."""
    slack = t_quantile_999(pairs - 1) * se if se > 0 else 0.0
    return abs(a - b) <= tol * max(1.0, abs(b)) + slack


def recompute_tables(viz: VizData, run: RunRef, r: Recomputed, loss_factor: float, tolerance: float, device: str) -> dict:
    """The `ablations`, `recomputed_activations` (an iterator of per-node pieces) and `recompute_summary` tables of one run."""
    nodes = sorted((loc, ch) for loc, ch, _ in viz.nodes() if (loc, ch) in r.full_acts)
    doc, pos = _unpadded_index(viz)
    return {
        "ablations": _ablations_table(viz, run, r, loss_factor, tolerance),
        "recomputed_activations": _activation_pieces(viz, run, r, nodes, doc, pos),
        "recompute_summary": _summary_table(viz, run, r, nodes, doc, pos, loss_factor, tolerance, device),
    }


def _ablations_table(viz: VizData, run: RunRef, r: Recomputed, loss_factor: float, tolerance: float):
    # ablations: per node and mode; deltas corrected and relative to the recomputed circuit loss.
    ab: dict[str, list] = {k: [] for k in ("run_id", "node_id", "location", "channel", "mode", "stored_delta",
                                           "recomputed_loss", "recomputed_delta", "recomputed_delta_se", "abs_diff",
                                           "agrees", "node_mean", "node_mean_se")}  # fmt: skip
    for mode, by_loc in r.ablation.items():
        for loc, ch, order in viz.nodes():
            if loc not in by_loc:  # skipped (skipped_locations)
                continue
            rec_loss = float(by_loc[loc][order])
            rec_delta = (rec_loss - r.interv_loss) * loss_factor
            se = float(r.ablation_se[mode][loc][order]) * loss_factor if r.ablation_se else 0.0
            stored = (float(viz.ch_interv_losses[loc][order]) - viz.interv_loss) * loss_factor if mode == "mean" else None
            diff = None if stored is None else abs(rec_delta - stored)
            for k, v in zip(
                ab,
                (run.run_id, node_id(loc, ch), loc, ch, mode, stored, rec_loss, rec_delta, se, diff,
                 None if stored is None else within(rec_delta, stored, tolerance, se, len(r.ablated_pairs or ())),
                 None if r.means is None or loc not in r.means else float(r.means[loc][order]),
                 None if r.means_se is None or loc not in r.means_se else float(r.means_se[loc][order])),
                strict=True,
            ):  # fmt: skip
                ab[k].append(v)

    return make_table("ablations", ab)


def _activation_pieces(viz: VizData, run: RunRef, r: Recomputed, nodes, doc, pos):
    """Stored vs full model vs circuit model at the unpadded positions of the task docs: one piece
    per node, streamed to the writer (release scale: ~1e8 rows)."""
    n = doc.size
    for loc, ch in nodes:
        stored = viz.node_acts(loc, ch)
        yield make_table(
            "recomputed_activations",
            {"run_id": [run.run_id] * n, "node_id": [node_id(loc, ch)] * n, "location": [loc] * n, "channel": [ch] * n,
             "doc": doc, "pos": pos, "stored": stored[doc, pos] if stored is not None else [None] * n,
             "full_model": r.full_acts[(loc, ch)][doc, pos], "circuit_model": r.circuit_acts[(loc, ch)][doc, pos]},
        )  # fmt: skip


def _summary_table(viz: VizData, run: RunRef, r: Recomputed, nodes, doc, pos, loss_factor, tolerance, device):
    """One row: stored vs recomputed losses, which model the stored activations match, the means' estimate."""
    n = doc.size
    skipped = skipped_locations(viz)
    max_full = max_circ = scale = 0.0
    for loc, ch in nodes:
        stored = viz.node_acts(loc, ch)
        if stored is not None and n:
            s = stored[doc, pos]
            max_full = max(max_full, float(np.abs(s - r.full_acts[(loc, ch)][doc, pos]).max()))
            max_circ = max(max_circ, float(np.abs(s - r.circuit_acts[(loc, ch)][doc, pos]).max()))
            scale = max(scale, float(np.abs(s).max()))

    ses = [v for v in (r.means_se or {}).values() if v.size]
    has_stored = any(viz.node_acts(loc, ch) is not None for loc, ch in nodes)
    limit = tolerance * max(1.0, scale)
    if not has_stored:
        match = "neither"
    elif max_full <= limit or max_circ <= limit:
        match = "full" if max_full <= max_circ else "circuit"
    else:
        match = "neither"
    return make_table(
        "recompute_summary",
        {
            "run_id": [run.run_id],
            "stored_loss": [viz.loss * loss_factor],
            "recomputed_loss": [r.loss * loss_factor],
            "stored_interv_loss": [viz.interv_loss * loss_factor],
            "recomputed_interv_loss": [r.interv_loss * loss_factor],
            "max_abs_act_diff_full": [max_full if has_stored else None],
            "max_abs_act_diff_circuit": [max_circ if has_stored else None],
            "stored_acts_match": [match],
            "loss_factor": [loss_factor],
            "means_source": [r.means_source],
            "means_tokens": [r.means_tokens],
            "tolerance": [tolerance],
            "device": [device],
            "means_se_max": [float(max(v.max() for v in ses)) if ses else None],
            "means_se_median": [float(np.median(np.concatenate(ses))) if ses else None],
            "ablation_pairs": [None if r.ablated_pairs is None else len(r.ablated_pairs)],
            "task_pairs": [r.task_pairs],
            **{f"seconds_{k}": [(r.timings or {}).get(k)] for k in ("full_model", "means", "circuit_model", "ablations")},
            "skipped": [
                None
                if not skipped
                else f"{sum(skipped.values())} nodes at locations the model has no hook point for "
                f"(not recomputed): {', '.join(f'{loc} ({n})' for loc, n in skipped.items())}"
            ],
        },
    )
