"""Forward passes that check and extend a stored circuit. Pure functions, no Dagster.

Given the store's model and a circuit's viz_data:
- the full model on the task docs: task loss (vs stored `loss`) and every circuit node's activations;
- the circuit model (non-circuit nodes mean-ablated, norms frozen; `inference.circuit`): task loss
  (vs stored `interv_loss`) and the circuit nodes' activations;
- per circuit node, the task loss with that node also ablated, by its mean and by zero
  (vs stored `ch_interv_losses`), with the circuit-only model (`inference.circuit.CircuitModel`:
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
import re
from dataclasses import dataclass

import numpy as np
import torch

from inference import circuit as C
from inference.fast import accelerate, is_accelerated
from inference.hooks import record
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


@torch.no_grad()
def means_over_sequences(model, seqs: list[torch.Tensor], locations: list[str] | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """Token-weighted mean of every node location (or of `locations`) over sequences of any lengths; (means, n_tokens)."""
    block = model.config.block_size
    by_len: dict[int, list[torch.Tensor]] = {}
    for s in seqs:
        s = s[:block]
        by_len.setdefault(len(s), []).append(s)
    total: dict[str, torch.Tensor] = {}
    n_tokens = 0
    for _length, group in sorted(by_len.items()):
        idx = torch.stack(group).to(next(model.parameters()).device)
        m = C.node_means(model, idx, locations=locations)
        w = idx.numel()
        for loc, v in m.items():
            total[loc] = total[loc] + v.double() * w if loc in total else v.double() * w
        n_tokens += w
    return {loc: (v / n_tokens).float() for loc, v in total.items()}, n_tokens


@dataclass
class Recomputed:
    loss: float
    interv_loss: float
    full_acts: dict[tuple[str, int], np.ndarray]  # (loc, ch) -> (n_docs, ctx)
    circuit_acts: dict[tuple[str, int], np.ndarray]
    ablation: dict[str, dict[str, np.ndarray]]  # mode -> loc -> losses aligned with circuit[loc]
    means_source: str
    means_tokens: int


def _record_nodes(viz: VizData, rec: dict) -> dict[tuple[str, int], np.ndarray]:
    return {(loc, ch): rec[loc][..., ch].float().cpu().numpy() for loc, ch, _ in viz.nodes() if loc in rec}


def skipped_locations(viz: VizData) -> dict[str, int]:
    """Locations of the circuit that the model has no hook point for (unknown names), with their node counts."""
    return {loc: len(ch) for loc, ch in viz.circuit.items() if not C.is_known_location(loc)}


@torch.no_grad()
def recompute(
    model, viz: VizData, modes: tuple[str, ...] = ("mean", "zero"), log=None, store_means: tuple[dict, int, str] | None = None
) -> Recomputed:
    """`store_means`: (means by location, tokens, source) that the store holds for the model (the
    embedded store writes the ones its circuits were found with); used instead of the snippets."""
    if not is_accelerated(model):
        accelerate(model)
    device = next(model.parameters()).device
    docs = torch.from_numpy(viz.docs).to(device)
    ctx = int(viz.doc_lengths().max()) if docs.numel() else 0
    docs = docs[:, : max(ctx, 2)]  # positions after the longest doc only hold padding
    # Locations the model has no hook point for cannot be recomputed (skipped_locations).
    circuit = {loc: torch.from_numpy(ch) for loc, ch in viz.circuit.items() if C.is_known_location(loc)}
    locations = C.circuit_locations(model.config, circuit)  # the means needed, final_resid's included
    locs = sorted(circuit)
    if log and len(circuit) < len(viz.circuit):
        log(f"not recomputed (no hook point in the model): {skipped_locations(viz)}")
    pattern = "|".join(re.escape(loc) for loc in locs)

    def recording():  # nothing to record when every location is unknown (a pattern must name a hook point)
        return record(pattern) if pattern else contextlib.nullcontext({})

    with recording() as rec:
        logits = model(docs)
    loss = C.task_loss(logits, docs).item()
    full_acts = _record_nodes(viz, rec)

    seqs = snippet_sequences(viz) if store_means is None else []
    if store_means is not None:
        means, n_tokens, source = store_means
        means = {loc: m.to(device) for loc, m in means.items()}
        lacking = [loc for loc in locations if loc not in means]  # e.g. final_resid: not in the store's file
        if lacking:
            seqs = snippet_sequences(viz)
            extra = means_over_sequences(model, seqs, lacking)[0] if seqs else C.node_means(model, docs, locations=lacking)
            means = {**means, **extra}
            source = f"{source} ({', '.join(lacking)}: {'samples' if seqs else 'task_docs'})"
    elif seqs:
        means, n_tokens = means_over_sequences(model, seqs, locations)
        source = "samples"
    else:
        means, n_tokens = C.node_means(model, docs, locations=locations), docs.numel()
        source = "task_docs"
    if log:
        log(f"node means over {n_tokens} tokens of {source}")

    masks = C.circuit_masks(model.config, circuit)
    masks = {k: v.to(device) for k, v in masks.items()}
    frozen = C.frozen_norm_scales(model, docs)
    with recording() as rec:
        logits = C.masked_forward(model, docs, masks, means, frozen)
    interv_loss = C.task_loss(logits, docs).item()
    circuit_acts = _record_nodes(viz, rec)

    circuit_model = None  # built once, shared by the modes; CPU only
    if device.type == "cpu":
        try:
            circuit_model = C.CircuitModel(model, docs, circuit, means, frozen)
        except NotImplementedError:  # AbsTopK on the residual stream: the reference loop below
            pass
    ablation = {}
    for mode in modes:
        if log:
            log(f"{mode} ablation of {viz.n_nodes} nodes")
        if circuit_model is not None:
            out = C.fast_ablation_losses(model, docs, circuit, means, mode=mode, circuit_model=circuit_model)
        else:
            out = C.ablation_losses(model, docs, circuit, means, mode=mode)
        ablation[mode] = {loc: np.asarray(v, dtype=np.float64) for loc, v in out.items()}

    pad = viz.docs.shape[1] - docs.shape[1]

    def unpad(a: dict) -> dict:
        return {k: np.pad(v, ((0, 0), (0, pad))) if pad else v for k, v in a.items()}

    return Recomputed(loss, interv_loss, unpad(full_acts), unpad(circuit_acts), ablation, source, n_tokens)


def within(a: float, b: float, tol: float) -> bool:
    """|a - b| <= tol * max(1, |b|)."""
    return abs(a - b) <= tol * max(1.0, abs(b))


def recompute_tables(viz: VizData, run: RunRef, r: Recomputed, loss_factor: float, tolerance: float, device: str) -> dict:
    """The `ablations`, `recomputed_activations` (an iterator of per-node pieces) and `recompute_summary` tables of one run."""
    # ablations: per node and mode; deltas corrected and relative to the recomputed circuit loss.
    ab: dict[str, list] = {k: [] for k in ("run_id", "node_id", "location", "channel", "mode", "stored_delta",
                                           "recomputed_loss", "recomputed_delta", "abs_diff", "agrees")}  # fmt: skip
    for mode, by_loc in r.ablation.items():
        for loc, ch, order in viz.nodes():
            if loc not in by_loc:  # skipped (skipped_locations)
                continue
            rec_loss = float(by_loc[loc][order])
            rec_delta = (rec_loss - r.interv_loss) * loss_factor
            stored = (float(viz.ch_interv_losses[loc][order]) - viz.interv_loss) * loss_factor if mode == "mean" else None
            diff = None if stored is None else abs(rec_delta - stored)
            for k, v in zip(
                ab,
                (run.run_id, node_id(loc, ch), loc, ch, mode, stored, rec_loss, rec_delta, diff,
                 None if stored is None else within(rec_delta, stored, tolerance)),
                strict=True,
            ):  # fmt: skip
                ab[k].append(v)

    # activations: stored vs full model vs circuit model, unpadded positions of the task docs.
    doc, pos = _unpadded_index(viz)
    n = doc.size
    nodes = sorted((loc, ch) for loc, ch, _ in viz.nodes() if (loc, ch) in r.full_acts)
    skipped = skipped_locations(viz)
    max_full = max_circ = scale = 0.0
    for loc, ch in nodes:
        stored = viz.node_acts(loc, ch)
        if stored is not None and n:
            s = stored[doc, pos]
            max_full = max(max_full, float(np.abs(s - r.full_acts[(loc, ch)][doc, pos]).max()))
            max_circ = max(max_circ, float(np.abs(s - r.circuit_acts[(loc, ch)][doc, pos]).max()))
            scale = max(scale, float(np.abs(s).max()))

    def act_pieces():  # one piece per node, streamed to the writer (release scale: ~1e8 rows)
        for loc, ch in nodes:
            stored = viz.node_acts(loc, ch)
            yield make_table(
                "recomputed_activations",
                {"run_id": [run.run_id] * n, "node_id": [node_id(loc, ch)] * n, "location": [loc] * n, "channel": [ch] * n,
                 "doc": doc, "pos": pos, "stored": stored[doc, pos] if stored is not None else [None] * n,
                 "full_model": r.full_acts[(loc, ch)][doc, pos], "circuit_model": r.circuit_acts[(loc, ch)][doc, pos]},
            )  # fmt: skip

    has_stored = any(viz.node_acts(loc, ch) is not None for loc, ch in nodes)
    limit = tolerance * max(1.0, scale)
    if not has_stored:
        match = "neither"
    elif max_full <= limit or max_circ <= limit:
        match = "full" if max_full <= max_circ else "circuit"
    else:
        match = "neither"
    summary = make_table(
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
            "skipped": [None if not skipped else f"{sum(skipped.values())} nodes at locations the model has no hook point for "
                        f"(not recomputed): {', '.join(f'{loc} ({n})' for loc, n in skipped.items())}"],
        },
    )
    return {"ablations": make_table("ablations", ab), "recomputed_activations": act_pieces(), "recompute_summary": summary}
