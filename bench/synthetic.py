"""A synthetic viz_data with release-scale shapes, for benchmarks (not a real circuit).

Shapes from the spec's largest model, csp_yolo2: 8 layers, d_model 2048, 128 heads of 16,
d_mlp 8192. A circuit of ~2000 nodes spread over all 64 locations, 64 task docs of 1024 tokens
with an activation tensor per node, 5 top and 5 bottom pretraining snippets of 101 tokens per node
and frac, pair_data between the viewer's location pairs (~10% nonzero, with bias rows), an all_loss
curve. Values are random; only sizes and types matter.

    python bench/synthetic.py out/viz_data.pt [--nodes 2000 --docs 64 --ctx 1024]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

CSP_YOLO2 = dict(n_layer=8, d_model=2048, n_head=128, d_head=16, d_mlp=8192, block_size=1024, vocab_size=2048,
                 afrac=0.25, d_pos_emb=32, sink=True, rms_norm=True, enable_bigram_table=True, learnable_bigram_table=True,
                 tied_unembed=False, pfrac=0.001, expansion_factor=4)  # fmt: skip
KINDS = ("attn.act_in", "attn.q", "attn.k", "attn.v", "attn.resid_delta", "mlp.act_in", "mlp.post_act", "mlp.resid_delta")
PAIRS = (("attn.act_in", "attn.q"), ("attn.act_in", "attn.k"), ("attn.act_in", "attn.v"), ("attn.v", "attn.resid_delta"),
         ("mlp.act_in", "mlp.post_act"), ("mlp.post_act", "mlp.resid_delta"))  # fmt: skip


def width(kind: str) -> int:
    return CSP_YOLO2["d_mlp"] if kind == "mlp.post_act" else CSP_YOLO2["d_model"]  # q/k/v: 128 * 16 = 2048 too


def synthetic_viz_data(n_nodes: int = 2000, n_docs: int = 64, ctx: int = 1024, snippets: int = 5, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    locs = [f"{i}.{k}" for i in range(CSP_YOLO2["n_layer"]) for k in KINDS]
    per_loc = n_nodes // len(locs)
    circuit = {loc: torch.randperm(width(loc.split(".", 1)[1]), generator=g)[:per_loc] for loc in locs}
    docs = torch.randint(1, 2047, (n_docs, ctx), generator=g)
    acts = {loc: {int(c): torch.randn(n_docs, ctx, generator=g) for c in ch} for loc, ch in circuit.items()}
    samples = {}
    for loc, ch in circuit.items():
        samples[loc] = {}
        for c in ch.tolist():
            by_frac = {}
            for frac in (0.001, 0.01, 0.1, 0.5):
                by_frac[frac] = [
                    [(torch.randint(0, 2048, (101,), generator=g).float(), torch.randn(101, generator=g), 50) for _ in range(snippets)]
                    for _side in range(2)
                ]
            samples[loc][c] = by_frac
    pair_data, connections = [], []
    for i in range(CSP_YOLO2["n_layer"]):
        for a, b in PAIRS:
            src, tgt = circuit[f"{i}.{a}"].tolist(), circuit[f"{i}.{b}"].tolist()
            m = torch.randn(len(src) + 1, len(tgt), generator=g) * (torch.rand(len(src) + 1, len(tgt), generator=g) < 0.1)
            pair_data.append([m, src + ["bias"], tgt, (f"{i}.{a}", f"{i}.{b}")])
            connections.append([m * 2, src + ["bias"], tgt, (f"{i}.{a}", f"{i}.{b}")])
    return {
        "circuit_data": circuit,
        "importances": {
            "beeg_model_config": dict(CSP_YOLO2),
            "loss": 0.2,
            "interv_loss": 0.3,
            "ch_interv_losses": {loc: (0.3 + torch.rand(len(ch), generator=g)).tolist() for loc, ch in circuit.items()},
            "layer_interv_losses": {f"{i}.{h}": 0.5 for i in range(CSP_YOLO2["n_layer"]) for h in ("attn", "mlp")},
            "pair_data": pair_data,
            "pair_data_connections": connections,
            "task_samples": [docs, acts],
        },
        "samples": samples,
        "all_loss": [(s, 1.0 / (s + 1)) for s in range(0, 10000, 10)],
        "num_total_nodes": CSP_YOLO2["n_layer"] * (7 * 2048 + 8192),
        "prune_config": {"k": n_nodes, "lr": 0.01},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--nodes", type=int, default=2000)
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=1024)
    args = ap.parse_args()
    t = time.perf_counter()
    viz = synthetic_viz_data(args.nodes, args.docs, args.ctx)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(viz, args.out)
    print(f"{args.out}: {args.out.stat().st_size / 1e6:.0f} MB in {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
