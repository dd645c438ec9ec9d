"""Build one circuit's `viz_data` dict in the released format (shared/spec/viz-data-format.md).

Every number is measured by forward passes of the model (`inference.circuit`):

- `loss`: raw task loss of the full model on the stored task docs; `interv_loss`: the circuit
  model (non-circuit nodes mean-ablated, norms frozen); `ch_interv_losses[loc][i]`: the circuit
  with node `circuit_data[loc][i]` also mean-ablated (`inference.circuit_model.fast_ablation_losses`); `layer_interv_losses["{i}.attn"|"{i}.mlp"]`:
  the circuit with every circuit node of that layer-half mean-ablated. All raw (x2 convention).
- `pair_data_connections`: for each location pair, the matrix (n_src x n_tgt) of the linear
  weights between retained nodes, entry [s, t] =
    act_in -> q/k/v:        attn.c_attn.weight[row of t in q|k|v, s]
    v -> resid_delta:       attn.c_proj.weight[t, s]
    act_in -> post_act:     mlp.c_fc.weight[t, s]
    post_act -> resid_delta: mlp.c_proj.weight[t, s]
    resid_delta (layer i, attn or mlp) -> act_in of every later read (same layer's MLP for
    attention writes, every later layer): 1.0 where the channel is the same.
  The linear's weight only: the frozen norm's gain and inverse scale between a residual write
  and a read are not folded in. Pairs whose matrix has no nonzero entry are left out.
- `pair_data`: an edge importance, same shapes: weight * mean |src activation| over the task
  docs' real (non-padding) tokens in the full model, where the source activation of the
  v -> resid_delta pair is the attention output channel (`attn.y`, the attention-weighted v)
  and that of a residual link the written channel itself (weight 1.0).
- `task_samples`: [docs, {loc: {channel: (n_docs, ctx) activations in the full model}}].
- `samples`: per node and frac in 0.001/0.01/0.1/0.5, [bottom, top] lists of 5
  (tokens, acts, pos) snippets of pretraining text drawn evenly from the bottom / top frac of
  that node's activations over the pretraining windows.
"""

from __future__ import annotations

import re

import torch

from inference.circuit import (
    circuit_masks,
    docs_lengths,
    frozen_norm_scales,
    masked_forward,
    node_locations,
    parse_location,
    task_loss,
)
from inference.circuit_model import fast_ablation_losses
from inference.hooks import record

FRACS = (0.001, 0.01, 0.1, 0.5)


def _ablate(masks: dict, loc: str, channels) -> dict:
    out = dict(masks)
    out[loc] = masks[loc].clone()
    out[loc][torch.as_tensor(channels, dtype=torch.long)] = 0.0
    return out


@torch.no_grad()
def intervention_losses(model, docs, circuit, means) -> tuple[float, float, dict, dict]:
    """(loss, interv_loss, ch_interv_losses, layer_interv_losses), all raw."""
    cfg = model.config
    frozen = frozen_norm_scales(model, docs)
    masks = circuit_masks(cfg, circuit)
    full = task_loss(model(docs), docs).item()

    def run(m):
        return task_loss(masked_forward(model, docs, m, means, frozen), docs).item()

    interv = run(masks)
    # per-node ablations over the circuit's nodes only (equal to one masked forward per node, tested)
    per_node = fast_ablation_losses(model, docs, circuit, means, mode="mean")
    ch = {loc: [float(v) for v in per_node[loc]] for loc in circuit if len(circuit[loc])}
    layer = {}
    for i in range(cfg.n_layer):
        for half in ("attn", "mlp"):
            m = dict(masks)
            locs = [loc for loc in circuit if loc.startswith(f"{i}.{half}.") and len(circuit[loc])]
            for loc in locs:
                m = _ablate(m, loc, circuit[loc])
            layer[f"{i}.{half}"] = run(m) if locs else interv
    return full, interv, ch, layer


def _later_reads(cfg, i: int, half: str) -> list[str]:
    reads = [f"{i}.mlp.act_in"] if half == "attn" else []
    return reads + [f"{j}.{h}.act_in" for j in range(i + 1, cfg.n_layer) for h in ("attn", "mlp")]


def weight_pairs(model, circuit) -> list[tuple[str, str, torch.Tensor]]:
    """(src_loc, tgt_loc, weight matrix n_src x n_tgt) for every location pair with an edge."""
    cfg, sd = model.config, model.state_dict()
    none = torch.zeros(0, dtype=torch.long)
    circuit = {loc: circuit.get(loc, none) for loc in node_locations(cfg)}
    out = []

    def add(src, tgt, full):  # full: (tgt width, src width) linear weight
        s, t = circuit[src], circuit[tgt]
        if len(s) and len(t):
            mat = full[t][:, s].T.contiguous().float()
            if mat.count_nonzero():
                out.append((src, tgt, mat))

    for i in range(cfg.n_layer):
        w_attn = sd[f"transformer.h.{i}.attn.c_attn.weight"]
        for n, kind in enumerate(("q", "k", "v")):
            add(f"{i}.attn.act_in", f"{i}.attn.{kind}", w_attn[n * cfg.d_attn : (n + 1) * cfg.d_attn])
        add(f"{i}.attn.v", f"{i}.attn.resid_delta", sd[f"transformer.h.{i}.attn.c_proj.weight"])
        add(f"{i}.mlp.act_in", f"{i}.mlp.post_act", sd[f"transformer.h.{i}.mlp.c_fc.weight"])
        add(f"{i}.mlp.post_act", f"{i}.mlp.resid_delta", sd[f"transformer.h.{i}.mlp.c_proj.weight"])
    for i in range(cfg.n_layer):
        for half in ("attn", "mlp"):
            src = f"{i}.{half}.resid_delta"
            for tgt in _later_reads(cfg, i, half):
                s, t = circuit[src], circuit[tgt]
                mat = (s[:, None] == t[None, :]).float()
                if len(s) and len(t) and mat.count_nonzero():
                    out.append((src, tgt, mat))
    return out


@torch.no_grad()
def edge_measures(model, docs, circuit) -> tuple[list, list]:
    """(pair_data, pair_data_connections) in the released list-of-[matrix, src, tgt, (src, tgt)] shape."""
    pairs = weight_pairs(model, circuit)
    with record(r"\d+\.(attn\.(act_in|q|k|v|y|resid_delta)|mlp\.(act_in|post_act|resid_delta))") as rec:
        model(docs)
    lengths = docs_lengths(docs)
    real = torch.arange(docs.shape[1])[None, :] < lengths[:, None]  # (n, ctx)
    conn, imp = [], []
    for src, tgt, mat in pairs:
        i, half, kind = parse_location(src)
        act = rec[f"{i}.attn.y"] if kind == "v" else rec[src]
        mean_abs = act[real].abs().mean(0)[circuit[src]]  # (n_src,)
        names = (circuit[src].tolist(), circuit[tgt].tolist())
        conn.append([mat, *names, (src, tgt)])
        imp.append([(mat * mean_abs[:, None]).contiguous(), list(names[0]), list(names[1]), (src, tgt)])
    return imp, conn


@torch.no_grad()
def task_activations(model, docs, circuit) -> dict:
    locs = [loc for loc in circuit if len(circuit[loc])]
    if not locs:
        return {}
    with record("|".join(re.escape(loc) for loc in locs)) as rec:
        model(docs)
    return {loc: {c: rec[loc][:, :, c].clone() for c in circuit[loc].tolist()} for loc in locs}


@torch.no_grad()
def pretraining_acts(model, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every node location's activations on the pretraining windows: {loc: (N, T, width)}."""
    locs = node_locations(model.config)
    with record("|".join(re.escape(loc) for loc in locs)) as rec:
        model(windows)
    return dict(rec)


def node_samples(acts: torch.Tensor, windows: torch.Tensor, n: int, radius: int) -> dict:
    """{frac: [bottom, top]} for one node; acts (N, T) on windows (N, T)."""
    N, T = acts.shape
    flat = acts.reshape(-1)
    order = flat.argsort()
    out = {}
    for frac in FRACS:
        m = max(n, int(frac * flat.numel()))
        lists = []
        for pool in (order[:m], order.flip(0)[:m]):
            picks = pool[torch.linspace(0, len(pool) - 1, n).round().long()]
            snippets = []
            for flat_i in picks.tolist():
                row, pos = divmod(flat_i, T)
                lo, hi = max(0, pos - radius), min(T, pos + radius + 1)
                snippets.append((windows[row, lo:hi].clone(), acts[row, lo:hi].clone(), pos - lo))
            lists.append(snippets)
        out[frac] = lists
    return out


def build_viz_data(model, docs, circuit, means, pre_acts, windows, all_loss, num_total, prune_config: dict, cfg) -> dict:
    circuit = {loc: torch.as_tensor(c, dtype=torch.long) for loc, c in circuit.items() if len(c)}
    loss, interv, ch, layer = intervention_losses(model, docs, circuit, means)
    pair_data, pair_conn = edge_measures(model, docs, circuit)
    samples = {
        loc: {c: node_samples(pre_acts[loc][:, :, c], windows, cfg.snippets_per_list, cfg.snippet_radius) for c in chans.tolist()}
        for loc, chans in circuit.items()
        if len(chans)
    }
    return {
        "circuit_data": {loc: c.clone() for loc, c in circuit.items()},
        "importances": {
            "beeg_model_config": model.config.to_dict(),
            "loss": loss,
            "interv_loss": interv,
            "ch_interv_losses": ch,
            "layer_interv_losses": layer,
            "pair_data": pair_data,
            "pair_data_connections": pair_conn,
            "task_samples": [docs.clone(), task_activations(model, docs, circuit)],
        },
        "samples": samples,
        "all_loss": [(int(s), float(v)) for s, v in all_loss],
        "num_total_nodes": int(num_total),
        "prune_config": prune_config,
    }
