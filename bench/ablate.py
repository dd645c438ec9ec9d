"""Benchmark: per-node ablation deltas of a 200-node circuit at release-scale widths.

Model as in bench/forward.py (csp_yolo2 widths, fewer layers, block weights at 1/1000). A random
circuit of `--nodes` nodes spread over every node location, paired task docs (right-padded,
the answer last), node means over random "pretraining" tokens. Times, in one process:

- `dense`: one forward of the full model over the docs by the released algorithm (dense
  matmuls; bench/forward.py's `released_forward`), the unit of the ratio;
- the per-node ablations as `fast_ablation_losses` computes them on the accelerated model, mean
  ablation of every node: the full model's norm scales (one forward), building the circuit-only
  model (`CircuitModel`), its ablation passes, and the reference recomputation of any node that
  hit an AbsTopK tie;
- one reference masked forward (what the naive loop pays per node), to show the naive ratio;

and prints total ablation time / dense forward time (target <= 2x), in wall-clock time and in
process CPU time (the latter is steadier when other jobs share the cores), plus the largest
difference between the fast and the reference deltas on a few nodes checked with the reference.

    python bench/ablate.py [--layers 2] [--nodes 200] [--docs 8] [--ctx 512] [--check 3] [--threads N]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forward import build_release_model, released_forward  # noqa: E402

from inference import circuit as C  # noqa: E402
from inference import circuit_model as CM  # noqa: E402
from inference.fast import accelerate  # noqa: E402


def random_circuit(config, n_nodes: int, gen: torch.Generator, heads_per_layer: int = 4) -> dict[str, torch.Tensor]:
    """`n_nodes` random nodes spread evenly over the node locations. q, k and v nodes are drawn
    from `heads_per_layer` heads of each layer, as in a pruned circuit, where a head is kept
    for its attention pattern (q and k together) and its values, not channel by channel."""
    locs = C.node_locations(config)
    per_loc = [n_nodes // len(locs) + (j < n_nodes % len(locs)) for j in range(len(locs))]
    dh = config.d_head
    heads = {i: torch.randperm(config.n_head, generator=gen)[:heads_per_layer] for i in range(config.n_layer)}
    circuit = {}
    for loc, n in zip(locs, per_loc, strict=True):
        layer, _, kind = C.parse_location(loc)
        if kind in ("q", "k", "v"):
            channels = (heads[layer][:, None] * dh + torch.arange(dh)).reshape(-1)
            circuit[loc] = channels[torch.randperm(len(channels), generator=gen)[:n]]
        else:
            circuit[loc] = torch.randperm(C.location_width(config, loc), generator=gen)[:n]
    return circuit


def task_docs(n_docs: int, ctx: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    docs = torch.zeros(n_docs, ctx, dtype=torch.long)
    for j in range(n_docs):
        length = int(torch.randint(ctx // 2, ctx + 1, (1,), generator=gen))
        docs[j, :length] = torch.randint(1, vocab, (length,), generator=gen)
    return docs


class _Clock:
    """Wall-clock and process CPU time since creation, and per lap."""

    def __init__(self):
        self.start = self.last = (time.perf_counter(), time.process_time())

    def lap(self) -> tuple[float, float]:
        now = (time.perf_counter(), time.process_time())
        out = (now[0] - self.last[0], now[1] - self.last[1])
        self.last = now
        return out

    def total(self) -> tuple[float, float]:
        return time.perf_counter() - self.start[0], time.process_time() - self.start[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--nodes", type=int, default=200)
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32, help="ablations per circuit-only pass")
    ap.add_argument("--check", type=int, default=3, help="nodes to recompute with the reference")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    model = build_release_model(args.layers)
    cfg = model.config
    docs = task_docs(args.docs, args.ctx, cfg.vocab_size, gen)
    circuit = random_circuit(cfg, args.nodes, gen)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; csp_yolo2 widths, {args.layers} layers, "
          f"{sum(len(v) for v in circuit.values())} circuit nodes, {args.docs} docs x {args.ctx} tokens")  # fmt: skip

    with torch.no_grad():
        sd = model.state_dict()
        clock = _Clock()
        released_forward(sd, cfg, docs)
        t_dense, cpu_dense = clock.lap()
        print(f"dense forward (released algorithm): {t_dense:.2f} s (CPU {cpu_dense:.2f} s)")

        accelerate(model)
        means = C.node_means(model, torch.randint(0, cfg.vocab_size, (2, args.ctx), generator=gen))
        clock = _Clock()
        frozen = C.frozen_norm_scales(model, docs)  # the full model's norm scales: one forward
        t_frozen, _ = clock.lap()
        cm = CM.CircuitModel(model, docs, circuit, means, frozen)
        t_build, _ = clock.lap()
        fast = CM.fast_ablation_losses(model, docs, circuit, means, "mean", args.batch, circuit_model=cm)
        t_passes, _ = clock.lap()
        t_total, cpu_total = clock.total()
        print(f"fast ablation of {args.nodes} nodes: {t_total:.2f} s (norm scales {t_frozen:.2f} s, circuit-only model "
              f"built in {t_build:.2f} s, ablation passes {t_passes:.2f} s; CPU {cpu_total:.2f} s)")  # fmt: skip
        print(f"ablate/dense: {t_total / t_dense:.1f}x wall, {cpu_total / cpu_dense:.1f}x CPU time (target <= 2x)")

        masks = C.circuit_masks(cfg, circuit)
        checked = [
            (loc, int(ch[0])) for loc, ch in list(circuit.items())[:: max(1, len(circuit) // max(1, args.check))][: args.check]
        ]
        worst, t_ref = 0.0, 0.0
        for loc, c in checked:
            m = dict(masks)
            m[loc] = masks[loc].clone()
            m[loc][c] = 0.0
            t0 = time.perf_counter()
            ref = C.task_loss(C.masked_forward(model, docs, m, means, frozen), docs).item()
            t_ref = time.perf_counter() - t0
            got = fast[loc][(torch.as_tensor(circuit[loc]) == c).nonzero()[0, 0]].item()
            worst = max(worst, abs(got - ref))
        if checked:
            print(f"reference check on {len(checked)} nodes: max |fast - reference| = {worst:.1e}; one reference masked "
                  f"forward (accelerated) takes {t_ref:.2f} s, so the naive loop is ~{args.nodes * t_ref / t_dense:.0f}x")  # fmt: skip
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
