"""Recompute of one circuit run at (up to) release scale: time per stage, tokens/s, peak RSS.

    python bench/recompute.py [--store DIR] [--layers 2 --nodes 200 --docs 8 --ctx 512]
                              [--chunk-tokens 2048] [--budget 131072] [--compare-budget 16384]
                              [--ablation-budget N] [--compare-exact]

Without `--store` a synthetic release-shaped store (`bench/synthetic.py`, csp_yolo2 widths) is
written to /tmp/circuits-bench-recompute with the given size. Prints the input sizes, the seconds of
each stage of `pipeline.recompute.recompute` (full model, node means, circuit model, ablations),
tokens per second of the task docs, each stage's ratio to the full-model pass, and the process's
peak RSS (ru_maxrss). `--compare-budget N` reruns with a node-means budget of N tokens and prints
how far the deltas move against the first run (the estimator's effect on the deltas), beside the
standard errors of the means. `--ablation-budget N` is the pipeline's ablation work budget
(node-tokens per mode; default the pipeline's, 0 = every pair): with a sample of the pairs the
time of exact ablations is extrapolated (x pairs / sampled pairs). `--compare-exact` reruns with
every pair ablated and prints how far the sampled deltas are from the exact ones, in standard
errors (the estimator's calibration).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_now() -> str:
    """The process's resident size now, split into anonymous memory and mapped files (/proc)."""
    try:
        with open("/proc/self/status") as f:
            kb = {line.split(":")[0]: int(line.split()[1]) for line in f if line.startswith(("VmRSS", "RssAnon", "RssFile"))}
    except OSError:
        return "n/a"
    return f"{kb['VmRSS'] / 1e3:.0f} MB, anon {kb['RssAnon'] / 1e3:.0f} MB, mapped files {kb['RssFile'] / 1e3:.0f} MB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, default=None)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--nodes", type=int, default=200)
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunk-tokens", type=int, default=None, help="default: CHUNK_TOKENS")
    ap.add_argument("--budget", type=int, default=None, help="node-means token budget (default: MEANS_TOKEN_BUDGET)")
    ap.add_argument("--compare-budget", type=int, default=None)
    ap.add_argument("--modes", default="mean,zero")
    ap.add_argument(
        "--ablation-budget", type=int, default=None, help="node-tokens per mode (default: the pipeline's; 0: every pair)"
    )
    ap.add_argument("--compare-exact", action="store_true", help="rerun with every pair ablated; sampled vs exact deltas")
    args = ap.parse_args()

    import torch

    from inference.settings import DEFAULT_ABLATION_BUDGET, tolerance
    from pipeline.formats import read_viz_data
    from pipeline.recompute import CHUNK_TOKENS, MEANS_TOKEN_BUDGET, recompute, t_quantile_999
    from pipeline.store_access import load_model, open_store

    store_dir = args.store
    if store_dir is None:
        from synthetic import CSP_YOLO2, write_store

        store_dir = Path(f"/tmp/circuits-bench-recompute-{args.layers}-{args.nodes}-{args.docs}-{args.ctx}")
        if not (store_dir / "viz").exists():
            write_store(store_dir, args.nodes, args.docs, args.ctx, {**CSP_YOLO2, "n_layer": args.layers})
    viz_path = next((store_dir / "viz").rglob("viz_data.pt"))
    model_name = viz_path.relative_to(store_dir / "viz").parts[0]
    ckpt = store_dir / "models" / model_name / "final_model.pt"
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}; torch threads {torch.get_num_threads()}")
    print(f"inputs: checkpoint {ckpt.stat().st_size / 1e9:.2f} GB, viz_data {viz_path.stat().st_size / 1e6:.0f} MB")

    t = time.perf_counter()
    model = load_model(open_store(str(store_dir)), model_name)
    print(f"load model: {time.perf_counter() - t:.1f} s, peak RSS so far {peak_rss_mb():.0f} MB")
    t = time.perf_counter()
    viz = read_viz_data(viz_path)
    n_docs, ctx = viz.docs.shape[0], int(viz.doc_lengths().max())
    print(f"read viz_data: {time.perf_counter() - t:.1f} s ({viz.n_nodes} nodes, {n_docs} docs x {ctx} tokens), "
          f"peak RSS so far {peak_rss_mb():.0f} MB")  # fmt: skip

    budget = args.budget or MEANS_TOKEN_BUDGET
    chunk_tokens = args.chunk_tokens or CHUNK_TOKENS
    ablation_budget = DEFAULT_ABLATION_BUDGET if args.ablation_budget is None else args.ablation_budget
    modes = tuple(args.modes.split(","))
    t = time.perf_counter()
    r = recompute(model, viz, modes=modes, chunk_tokens=chunk_tokens, means_budget=budget, log=lambda m: print("  " + m, flush=True),
                  ablation_budget=ablation_budget)  # fmt: skip
    total = time.perf_counter() - t
    k, n_pairs = len(r.ablated_pairs), r.task_pairs
    print(f"ablations on {k} of {n_pairs} task pairs (budget {ablation_budget:,} node-tokens per mode): "
          f"{r.timings['ablations']:.1f} s")  # fmt: skip
    if k < n_pairs:
        ses = np.concatenate([v for by_loc in r.ablation_se.values() for v in by_loc.values()])
        print(f"  deltas' standard errors (raw loss units): median {np.median(ses):.2e}, max {ses.max():.2e}; "
              f"exact ablations extrapolated: {r.timings['ablations'] * n_pairs / k / 60:.0f} min "
              f"(x{n_pairs / k:.1f})")  # fmt: skip
    tokens = n_docs * ctx
    full = r.timings["full_model"]
    print(
        f"recompute: {total:.1f} s in all, {tokens / total:.0f} task tokens/s; means: {r.means_tokens} tokens of {r.means_source}"
    )
    for stage, sec in r.timings.items():
        print(f"  {stage:14s} {sec:8.1f} s  {sec / full:5.1f}x the full-model pass  {tokens / max(sec, 1e-9):8.0f} tok/s")
    ses = np.concatenate(list((r.means_se or {}).values())) if r.means_se else np.zeros(0)
    if ses.size:
        print(f"  means' standard errors: median {np.median(ses):.2e}, max {ses.max():.2e}")
    print(f"peak RSS: {peak_rss_mb():.0f} MB (now: {rss_now()})")

    if args.compare_budget:
        r2 = recompute(
            model,
            viz,
            modes=("mean",),
            chunk_tokens=chunk_tokens,
            ablation_budget=ablation_budget,
            means_budget=args.compare_budget,
        )
        d1 = np.concatenate([v - r.interv_loss for v in r.ablation["mean"].values()])
        d2 = np.concatenate([v - r2.interv_loss for v in r2.ablation["mean"].values()])
        print(f"means budget {args.compare_budget} vs {budget} tokens: circuit loss {r2.interv_loss:.5f} vs {r.interv_loss:.5f}; "
              f"mean-ablation deltas: max |diff| {np.abs(d1 - d2).max():.2e}, median {np.median(np.abs(d1 - d2)):.2e} "
              f"(delta scale: median |delta| {np.median(np.abs(d1)):.2e})")  # fmt: skip
        for x in (r2.full_acts, r2.circuit_acts):
            x.close()
    if args.compare_exact and k < n_pairs:
        t = time.perf_counter()
        ex = recompute(model, viz, modes=modes, chunk_tokens=chunk_tokens, means_budget=budget, ablation_budget=0)
        print(f"exact (every pair) in {time.perf_counter() - t:.1f} s; sampled ({k} pairs) vs exact deltas:")
        tq = t_quantile_999(k - 1)
        for mode in modes:
            est = np.concatenate([r.ablation[mode][loc] - r.interv_loss for loc in r.ablation[mode]])
            exact = np.concatenate([ex.ablation[mode][loc] - ex.interv_loss for loc in r.ablation[mode]])
            se = np.concatenate([r.ablation_se[mode][loc] for loc in r.ablation[mode]])
            # differences below float noise count as none (nodes that change nothing: delta and SE both ~0)
            z = np.where(np.abs(est - exact) > 1e-6, np.abs(est - exact) / np.maximum(se, 1e-12), 0.0)
            print(f"  {mode}: max |diff| {np.abs(est - exact).max():.2e}, median {np.median(np.abs(est - exact)):.2e} "
                  f"(median |delta| {np.median(np.abs(exact)):.2e}); |diff| beyond 1 / 2 / t(k-1)={tq:.1f} SEs: "
                  f"{(z > 1).mean():.1%} / {(z > 2).mean():.1%} / {(z > tq).mean():.2%} of {z.size} nodes")  # fmt: skip
            big = np.abs(exact) > 1e-3
            rule = np.abs(est - exact) > tolerance() * np.maximum(1.0, np.abs(exact)) + tq * se  # `agrees` false
            print(f"    where |exact delta| > 1e-3 ({big.sum()} nodes): beyond t(k-1) SEs {(z[big] > tq).mean():.1%}; "
                  f"outside the agreement rule (tolerance {tolerance():g} + t(k-1) SEs): {rule.sum()} of {z.size} nodes")  # fmt: skip
        for x in (ex.full_acts, ex.circuit_acts):
            x.close()
    for x in (r.full_acts, r.circuit_acts):
        x.close()


if __name__ == "__main__":
    main()
