"""Part 2 of the embedded store: find circuits by pruning and write them as viz_data.

For every model of the profile and every task (`pipeline.demo.tasks`), the gates are trained
once on train-split pairs (`pipeline.demo.prune`), and the circuit of each budget k in
`PruneConfig.ks` plus `k_optim` is written to `viz/<model>/<task>/<SWEEP>/<k>/viz_data.pt`
(`pipeline.demo.vizdata`), measured on held-out test-split pairs. Files are written
atomically (temp file, then rename).
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from inference.circuit import node_locations, node_means, num_total_nodes
from pipeline.demo.prune import PruneConfig, circuit_from_order, find_k_optim, raw_circuit_loss, train_gates
from pipeline.demo.tasks import TASK_NAMES, held_out_task_docs, pairs_to_docs, task_pairs
from pipeline.demo.vizdata import build_viz_data, pretraining_acts
from pipeline.store_access import NODE_MEANS_FILE  # models/<model>/node_means.pt

SWEEP = "prune_demo"
MIN_PAIRS = 4


def pretraining_windows(stream: torch.Tensor, block_size: int, n: int) -> torch.Tensor:
    """`n` evenly spaced windows of `block_size` tokens of a token stream."""
    total = len(stream) // block_size
    rows = stream[: total * block_size].view(total, block_size)
    return rows[torch.linspace(0, total - 1, min(n, total)).round().long()].clone()


def save_atomic(obj, path: Path) -> None:
    from pipeline.demo.build import atomic_write

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, buf.getvalue())


def build_circuits(store_dir, profile, progress=None) -> list[Path]:
    from inference.loader import load_model
    from pipeline.demo.build import _load_encoding
    from pipeline.demo.corpus import corpus_for_profile
    from pipeline.demo.profiles import get_profile
    from pipeline.demo.train import token_stream

    log = progress or (lambda msg: None)
    store_dir, profile = Path(store_dir), get_profile(profile)
    cfg = PruneConfig.from_profile(profile)
    torch.set_num_threads(profile.num_threads)
    corpus = corpus_for_profile(profile)
    enc = _load_encoding(store_dir / "tinypython")
    train_texts = [f.text for f in corpus.split("train")]
    stream = token_stream(train_texts, enc, enc.eot_token)
    test_docs_of = held_out_task_docs(corpus, enc, cfg.ctx, cfg.test_pairs)  # as progress.json measured them
    task_docs = {}
    for task in TASK_NAMES:
        tr = task_pairs(task, train_texts, enc, cfg.ctx, cfg.train_pairs)
        if len(tr) < MIN_PAIRS or task not in test_docs_of:
            log(f"circuits: task {task} skipped ({len(tr)} train pairs, test docs: {task in test_docs_of})")
            continue
        task_docs[task] = (pairs_to_docs(tr, cfg.ctx), test_docs_of[task])
    written = []
    for name in profile.model_names:
        model = load_model(str(store_dir / "models" / name))
        windows = pretraining_windows(stream, model.config.block_size, cfg.mean_windows)
        means = node_means(model, windows)
        # The means every circuit of this model was pruned and measured with: the release ships no
        # such file, so readers of the public store approximate them; on this store the pipeline
        # reads these and its recomputed ablations can match the stored ones exactly.
        means_path = store_dir / "models" / name / NODE_MEANS_FILE
        save_atomic(
            {"means": {loc: m.float().clone() for loc, m in means.items()}, "tokens": int(windows.numel()),
             "source": f"{windows.shape[0]} windows of {windows.shape[1]} tokens of the train split"},
            means_path,
        )  # fmt: skip
        written.append(means_path)
        pre_acts = pretraining_acts(model, windows)
        locs = node_locations(model.config)
        total = num_total_nodes(model.config)
        for task, (train_docs, test_docs) in task_docs.items():
            log(f"circuits: {name} / {task}: pruning ({len(train_docs) // 2} train pairs)")
            result = train_gates(model, train_docs, means, cfg, progress=log)
            k_opt, reached = find_k_optim(model, test_docs, result.order, means, cfg)
            prune_config = {**cfg.to_dict(), "model": name, "task": task, "k_optim": k_opt, "k_optim_reached_target": reached}
            budgets = [(str(k), k) for k in cfg.ks if k <= total] + [("k_optim", k_opt)]
            for label, k in budgets:
                circuit = circuit_from_order(result.order, k, locs)
                loss_k = raw_circuit_loss(model, test_docs, circuit, means, _frozen(model, test_docs))
                # all_loss: the optimisation curve (raw scale) until the kept count first drops to k,
                # closed by the measured loss of this top-k circuit on the stored docs.
                curve = []
                for step, corrected, kept in result.curve:
                    curve.append((step, corrected * cfg.loss_factor))
                    if kept <= k:
                        break
                curve.append((curve[-1][0] + 1 if curve else 0, loss_k))
                viz = build_viz_data(model, test_docs, circuit, means, pre_acts, windows, curve, total, {**prune_config, "k": k}, cfg)
                path = store_dir / "viz" / name / task / SWEEP / label / "viz_data.pt"
                save_atomic(viz, path)
                written.append(path)
                imp = viz["importances"]
                log(f"circuits: {name} / {task} / {label}: {k} nodes, loss {imp['loss'] / 2:.3f}, circuit {imp['interv_loss'] / 2:.3f} (per prompt)")
    return written


def _frozen(model, docs):
    from inference.circuit import frozen_norm_scales

    return frozen_norm_scales(model, docs)
