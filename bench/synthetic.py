"""Synthetic release-shaped data for benchmarks (not a real circuit): one viz_data, or a whole store.

Shapes from the spec's largest model, csp_yolo2: 8 layers, d_model 2048, 128 heads of 16,
d_mlp 8192. A circuit of ~2000 nodes spread over all 64 per-layer locations and `final_resid`
(the residual after the last block: released circuits have it), 64 task docs of 1024 tokens with
an activation tensor per node, 5 top and 5 bottom pretraining snippets of 101 tokens per node and
frac (each (bottom, top) pair a tuple, as released), pair_data between the viewer's location pairs
(~10% nonzero, with bias rows), an all_loss curve. Values are random; only sizes and types matter,
and, in a store, the circuit's connectivity: its nodes are linked by nonzero weights planted into
the checkpoint (`plant_circuit`), so ablations spread through the circuit as in a pruned one.

    python bench/synthetic.py out/viz_data.pt [--nodes 2000 --docs 64 --ctx 1024]
    python bench/synthetic.py --store DIR [--nodes 2000 --docs 64 --ctx 1024] [--layers 8] [--doc-tokens N] [--shared-qk F]

`--store` writes a store in the released layout that `circuits materialize` reads: the tokenizer
(`tinypython/`, a synthetic 2048-id BPE), `models/csp_yolo2/beeg_config.json` + `final_model.pt`
(a full csp_yolo2-shaped checkpoint, weights at the release's ~1/1000 density; ~1.9 GB with 8
layers) and `viz/csp_yolo2/bracket_counting_beeg/prune_v4/<nodes>/viz_data.pt`. Converting it:

    circuits materialize --store DIR --data DIR/data --no-recompute

(the recompute forward passes at this scale are issue 14's; `--no-recompute` is the explicit
setting that skips them).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

CSP_YOLO2 = dict(n_layer=8, d_model=2048, n_head=128, d_head=16, d_mlp=8192, block_size=1024, vocab_size=2048,
                 afrac=0.25, d_pos_emb=32, sink=True, rms_norm=True, enable_bigram_table=True, learnable_bigram_table=True,
                 tied_unembed=False, pfrac=0.001, expansion_factor=4)  # fmt: skip
KINDS = ("attn.act_in", "attn.q", "attn.k", "attn.v", "attn.resid_delta", "mlp.act_in", "mlp.post_act", "mlp.resid_delta")
PAIRS = (("attn.act_in", "attn.q"), ("attn.act_in", "attn.k"), ("attn.act_in", "attn.v"), ("attn.v", "attn.resid_delta"),
         ("mlp.act_in", "mlp.post_act"), ("mlp.post_act", "mlp.resid_delta"))  # fmt: skip


def width(location: str, config: dict = CSP_YOLO2) -> int:
    kind = location.split(".", 1)[-1]
    if kind == "mlp.post_act":
        return config["d_mlp"]
    if kind in ("attn.q", "attn.k", "attn.v"):
        return config["n_head"] * config["d_head"]
    return config["d_model"]  # act_in, resid_delta, final_resid


def synthetic_circuit(
    n_nodes: int = 2000, seed: int = 0, config: dict = CSP_YOLO2, shared_qk: float = 0.0
) -> dict[str, torch.Tensor]:
    """The circuit's channels per location (`circuit_data`): n_nodes spread evenly over every
    per-layer location and `final_resid`. Residual-stream locations (act_in, resid_delta,
    final_resid) draw from one pool of residual channels twice a location's size, so what a
    resid_delta node writes, later act_in nodes read (as in a pruned circuit); q, k, v and MLP
    neurons are random channels (about as many attention heads as a random pick touches).

    `shared_qk`: the fraction of each layer's q channels that are also k channels (a head whose q
    and k share a dimension attends by its content, which the circuit model's attention must run
    in full: `inference.separable_attention`). Random picks share almost none (~2% of the heads
    they touch); the demo store's pruned circuits ~50% of those heads (shared_qk ~0.67 here)."""
    g = torch.Generator().manual_seed(seed)
    locs = [f"{i}.{k}" for i in range(config["n_layer"]) for k in KINDS] + ["final_resid"]
    per_loc = n_nodes // len(locs)
    pool = torch.randperm(config["d_model"], generator=g)[: min(2 * per_loc, config["d_model"])]
    circuit = {}
    for loc in locs:
        if loc.endswith(("act_in", "resid_delta", "final_resid")):
            circuit[loc] = pool[torch.randperm(len(pool), generator=g)[:per_loc]]
        else:
            circuit[loc] = torch.randperm(width(loc, config), generator=g)[:per_loc]
            if shared_qk and loc.endswith("attn.k"):
                q = circuit[loc.replace("attn.k", "attn.q")]
                shared = q[: round(shared_qk * len(q))]
                rest = circuit[loc][~torch.isin(circuit[loc], shared)]
                circuit[loc] = torch.cat([shared, rest])[:per_loc]
    return circuit


# Circuit edges planted into the synthetic checkpoint: each circuit node of a linear layer's output
# reads this many circuit nodes of its input (nonzero weights), so ablations propagate through the
# circuit as they do in a pruned one. Without them, a random 1/1000-dense model connects a random
# circuit's nodes almost nowhere and every ablation would die out at once (a flattering benchmark).
PLANTED_FAN_IN = 4


def plant_circuit(sd: dict, circuit: dict, config: dict, fan_in: int = PLANTED_FAN_IN, seed: int = 0) -> int:
    """Give every circuit node at a linear layer's output `fan_in` nonzero weights from the circuit
    nodes at its input (act_in -> q/k/v, v -> attn resid_delta, mlp act_in -> post_act ->
    mlp resid_delta), drawn like the matrix's other nonzeros (same std). Returns edges planted."""
    g = torch.Generator().manual_seed(seed + 1)
    d = config["n_head"] * config["d_head"]
    planted = 0
    for i in range(config["n_layer"]):
        c = {k: circuit[f"{i}.{k}"] for k in KINDS}
        links = [  # (weight, rows of the targets, columns of the sources)
            ("attn.c_attn", c["attn.q"], c["attn.act_in"]),
            ("attn.c_attn", d + c["attn.k"], c["attn.act_in"]),
            ("attn.c_attn", 2 * d + c["attn.v"], c["attn.act_in"]),
            ("attn.c_proj", c["attn.resid_delta"], c["attn.v"]),
            ("mlp.c_fc", c["mlp.post_act"], c["mlp.act_in"]),
            ("mlp.c_proj", c["mlp.resid_delta"], c["mlp.post_act"]),
        ]
        for name, rows, cols in links:
            w = sd[f"transformer.h.{i}.{name}.weight"]
            nz = w[w != 0]
            std = float(nz.std()) if nz.numel() > 1 else 1.0
            for r in rows.tolist():
                src = cols[torch.randperm(len(cols), generator=g)[: min(fan_in, len(cols))]]
                w[r, src] = torch.randn(len(src), generator=g) * std
                planted += len(src)
    return planted


def synthetic_viz_data(
    n_nodes: int = 2000,
    n_docs: int = 64,
    ctx: int = 1024,
    snippets: int = 5,
    seed: int = 0,
    config: dict = CSP_YOLO2,
    doc_tokens: int | None = None,
    shared_qk: float = 0.0,
) -> dict:
    """`doc_tokens`: each task doc's real tokens (the rest right-padded with 0, as released task docs
    are); default: all `ctx`."""
    g = torch.Generator().manual_seed(seed)
    circuit = synthetic_circuit(n_nodes, seed, config, shared_qk)
    locs = list(circuit)
    docs = torch.randint(1, config["vocab_size"] - 1, (n_docs, ctx), generator=g)
    if doc_tokens is not None and doc_tokens < ctx:
        docs[:, doc_tokens:] = 0
    acts = {loc: {int(c): torch.randn(n_docs, ctx, generator=g) for c in ch} for loc, ch in circuit.items()}
    samples = {}
    for loc, ch in circuit.items():
        samples[loc] = {}
        for c in ch.tolist():
            by_frac = {}
            for frac in (0.001, 0.01, 0.1, 0.5):
                by_frac[frac] = tuple(  # (bottom, top): a tuple in the released files
                    [
                        (torch.randint(0, config["vocab_size"], (101,), generator=g).float(), torch.randn(101, generator=g), 50)
                        for _ in range(snippets)
                    ]
                    for _side in range(2)
                )
            samples[loc][c] = by_frac
    pair_data, connections = [], []
    for i in range(config["n_layer"]):
        for a, b in PAIRS:
            src, tgt = circuit[f"{i}.{a}"].tolist(), circuit[f"{i}.{b}"].tolist()
            m = torch.randn(len(src) + 1, len(tgt), generator=g) * (torch.rand(len(src) + 1, len(tgt), generator=g) < 0.1)
            pair_data.append([m, src + ["bias"], tgt, (f"{i}.{a}", f"{i}.{b}")])
            connections.append([m * 2, src + ["bias"], tgt, (f"{i}.{a}", f"{i}.{b}")])
    return {
        "circuit_data": circuit,
        "importances": {
            "beeg_model_config": dict(config),
            "loss": 0.2,
            "interv_loss": 0.3,
            "ch_interv_losses": {loc: (0.3 + torch.rand(len(ch), generator=g)).tolist() for loc, ch in circuit.items()},
            "layer_interv_losses": {f"{i}.{h}": 0.5 for i in range(config["n_layer"]) for h in ("attn", "mlp")},
            "pair_data": pair_data,
            "pair_data_connections": connections,
            "task_samples": [docs, acts],
        },
        "samples": samples,
        "all_loss": [(s, 1.0 / (s + 1)) for s in range(0, 10000, 10)],
        "num_total_nodes": sum(width(loc, config) for loc in locs),
        "prune_config": {"k": n_nodes, "lr": 0.01},
    }


MODEL = "csp_yolo2"
TASK, SWEEP = "bracket_counting_beeg", "prune_v4"
AFRAC_LOCTYPES = "attn_in,attn_out,mlp_in,mlp_out,mlp_neuron,attn_v,attn_k,attn_q"


def synthetic_checkpoint(config: dict, density: float = 1e-3, seed: int = 0) -> dict:
    """A state dict in the released layout for `config`: block weights at `density` (the release's
    ~1 in 1000 nonzero), scaled so activations stay O(1); embeddings, norms, bigram table dense."""
    from inference import GPT, GPTConfig

    torch.manual_seed(seed)
    cfg = GPTConfig.from_dict({**config, "afrac_loctypes": AFRAC_LOCTYPES})
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".h." in name and p.dim() == 2:
                p.mul_(torch.rand_like(p) < density).mul_(p.shape[1] ** 0.5 / 6)
            elif name.endswith("sink_logit") or name.endswith("ln_f.weight"):
                p.normal_(1.0 if name.endswith("ln_f.weight") else 0.0, 0.5)
            elif name == "bigram_table":
                p.normal_(std=0.1)
    return model.state_dict()


def write_store(
    root: Path,
    n_nodes: int = 2000,
    n_docs: int = 64,
    ctx: int = 1024,
    config: dict = CSP_YOLO2,
    density: float = 1e-3,
    log=print,
    doc_tokens: int | None = None,
    shared_qk: float = 0.0,
) -> Path:
    """A store in the released layout (module doc) under `root`; every file written atomically."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from fixtures_viz import write_tokenizer  # the synthetic 2048-id data-gym BPE of the test fixtures

    from inference.store import write_atomic

    t = time.perf_counter()
    write_tokenizer(root / "tinypython")
    mdir = root / "models" / MODEL
    mdir.mkdir(parents=True, exist_ok=True)
    beeg = {**config, "afrac_loctypes": AFRAC_LOCTYPES}
    write_atomic(mdir / "beeg_config.json", lambda f: f.write(json.dumps(beeg, indent=1).encode()))
    sd = synthetic_checkpoint(config, density)
    planted = plant_circuit(sd, synthetic_circuit(n_nodes, config=config, shared_qk=shared_qk), config)
    n_params = sum(v.numel() for v in sd.values())
    write_atomic(mdir / "final_model.pt", lambda f: torch.save(sd, f))
    sd = None  # ~1.7 GB at csp_yolo2 scale: freed before the circuit is built
    log(
        f"{mdir / 'final_model.pt'}: {n_params / 1e6:.0f}M parameters, "
        f"{(mdir / 'final_model.pt').stat().st_size / 1e9:.2f} GB, {planted} circuit edges planted ({time.perf_counter() - t:.0f} s)"
    )
    viz = synthetic_viz_data(n_nodes, n_docs, ctx, config=config, doc_tokens=doc_tokens, shared_qk=shared_qk)
    vdir = root / "viz" / MODEL / TASK / SWEEP / str(sum(len(c) for c in viz["circuit_data"].values()))
    vdir.mkdir(parents=True, exist_ok=True)
    write_atomic(vdir / "viz_data.pt", lambda f: torch.save(viz, f))
    log(
        f"{vdir / 'viz_data.pt'}: {(vdir / 'viz_data.pt').stat().st_size / 1e6:.0f} MB "
        f"({len(viz['circuit_data']['final_resid'])} final_resid nodes) ({time.perf_counter() - t:.0f} s)"
    )
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, nargs="?", help="viz_data.pt to write (without --store)")
    ap.add_argument("--store", type=Path, default=None, help="write a whole store in the released layout here")
    ap.add_argument("--nodes", type=int, default=2000)
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--doc-tokens", type=int, default=None, help="real tokens per task doc, the rest padding (default: ctx)")
    ap.add_argument("--shared-qk", type=float, default=0.0, help="fraction of q channels also k channels, per layer")
    ap.add_argument(
        "--layers", type=int, default=CSP_YOLO2["n_layer"], help="n_layer of the store's model (default: csp_yolo2's 8)"
    )
    args = ap.parse_args()
    if args.store is not None:
        write_store(
            args.store,
            args.nodes,
            args.docs,
            args.ctx,
            {**CSP_YOLO2, "n_layer": args.layers},
            doc_tokens=args.doc_tokens,
            shared_qk=args.shared_qk,
        )
        return
    if args.out is None:
        ap.error("give a viz_data.pt path or --store DIR")
    t = time.perf_counter()
    viz = synthetic_viz_data(args.nodes, args.docs, args.ctx)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(viz, args.out)
    print(f"{args.out}: {args.out.stat().st_size / 1e6:.0f} MB in {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
