"""Part 2 of the embedded store: find circuits by pruning and write them as viz_data.

Per task (`PruneConfig.tasks`), three disjoint prompt sets (`pipeline.demo.tasks.prompt_sets`):
gates are trained on fresh batches from the `pruning` pool, the circuit size k is chosen on the
`selection` set, and every reported loss and accuracy is measured on the `evaluation` set,
which nothing was tuned on. The viz_data's `task_samples` are the evaluation prompts.

Targets: per task, `target = full + f * |ablated - full|` (per prompt, the release's raw / 2),
with `full` the full model's and `ablated` the fully mean-ablated model's loss on the selection
set (the absolute value: on a task the model has not learned, ablation can lower the loss, and
the target must still lie above the full model's); when a store has two models, the larger of
their targets (so it lies above both full models' losses and the size comparison is at one loss). `f = target_fraction` gives the
stored `k_optim` circuit; the size study repeats the search for every f in `target_sweep` and
every pruning seed in `prune_seeds` (each seed draws different fresh batches).

Written, per model and task:
- `viz/<model>/<task>/<SWEEP>/<k>/viz_data.pt` for k in `PruneConfig.ks` and `k_optim` (first
  seed); each file's `prune_config` carries the target, the calibration, the faithfulness rows
  (`faithfulness_rows`) and, for k_optim, the size study (`study`) and the prompt-set counts;
- `models/<model>/prompt_sets/<task>.pt`: the docs of the three sets (and the calibration batch).
Files are written atomically (temp file, then rename).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch

from inference.circuit import (
    circuit_masks,
    frozen_norm_scales,
    location_width,
    masked_forward,
    node_locations,
    node_means,
    num_total_nodes,
)
from inference.files import write_atomic
from pipeline.demo.prune import (
    PruneConfig,
    answer_logit_diff,
    calibrate,
    circuit_from_order,
    circuit_z,
    find_k_optim,
    prompt_losses,
    train_gates,
)
from pipeline.demo.tasks import PROMPT_SETS, _line_index, prompt_sets
from pipeline.demo.vizdata import build_viz_data, pretraining_acts, weight_pairs
from pipeline.store_access import NODE_MEANS_FILE  # models/<model>/node_means.pt

SWEEP = "prune_demo"
MIN_PAIRS = 4
PROMPT_SETS_DIR = "prompt_sets"  # models/<model>/prompt_sets/<task>.pt


def pretraining_windows(stream: torch.Tensor, block_size: int, n: int) -> torch.Tensor:
    """`n` evenly spaced windows of `block_size` tokens of a token stream."""
    total = len(stream) // block_size
    rows = stream[: total * block_size].view(total, block_size)
    return rows[torch.linspace(0, total - 1, min(n, total)).round().long()].clone()


def save_atomic(obj, path: Path) -> None:
    buf = io.BytesIO()  # saved through a buffer: the archive's folder is always "archive/", so bytes are reproducible
    torch.save(obj, buf)
    write_atomic(path, buf.getvalue())


# ---- measurements ----------------------------------------------------------------------------


def complement_masks(config, circuit) -> dict[str, torch.Tensor]:
    """Masks that ablate only the circuit's nodes (the model without the circuit)."""
    out = {}
    for loc, m in circuit_masks(config, circuit).items():
        m = m.clone()
        w = location_width(config, loc)
        m[:w] = 1.0 - m[:w]
        out[loc] = m
    return out


@torch.no_grad()
def set_measure(model, docs, masks, fill, scale: float = 1.0, shift: float = 0.0) -> dict:
    """Per-prompt loss (mean and standard error over prompts) and per-prompt accuracy of the
    model with `masks` (None: the full model) on task docs, after calibration scale/shift."""
    logits = model(docs) if masks is None else masked_forward(model, docs, masks, fill, frozen_norm_scales(model, docs))
    z = answer_logit_diff(logits, docs)
    losses = prompt_losses(z, scale, shift).double()
    half = z.shape[0] // 2
    zc = scale * z + shift
    right = torch.cat([zc[:half] > 0, zc[half:] < 0]).double()
    n = losses.numel()
    return {
        "loss": float(losses.mean()),
        "loss_se": float(losses.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0,
        "accuracy": float(right.mean()),
        "n_prompts": n,
    }


def count_edges(model, circuit) -> int:
    """Nonzero weights between the circuit's nodes (the stored `pair_data_connections`)."""
    return sum(int(torch.count_nonzero(mat)) for _, _, mat in weight_pairs(model, circuit))


def faithfulness_rows(model, circuit, set_docs: dict[str, torch.Tensor], means, calibration: tuple[float, float]) -> list[dict]:
    """Stress tests of one circuit: on every prompt set, with mean and with zero ablation, the
    full model, the circuit alone (everything else ablated), the model without the circuit
    (only the circuit's nodes ablated), and (mean ablation) the calibrated circuit."""
    zeros = {loc: torch.zeros_like(m) for loc, m in means.items()}
    rows = []
    for set_name, docs in set_docs.items():
        rows.append(
            {"prompt_set": set_name, "ablation": "none", "variant": "full_model", **set_measure(model, docs, None, means)}
        )
        for mode, fill in (("mean", means), ("zero", zeros)):
            rows.append(
                {
                    "prompt_set": set_name,
                    "ablation": mode,
                    "variant": "circuit",
                    **set_measure(model, docs, circuit_masks(model.config, circuit), fill),
                }
            )
            rows.append(
                {
                    "prompt_set": set_name,
                    "ablation": mode,
                    "variant": "without_circuit",
                    **set_measure(model, docs, complement_masks(model.config, circuit), fill),
                }
            )
        rows.append(
            {"prompt_set": set_name, "ablation": "mean", "variant": "circuit_calibrated", **set_measure(model, docs, circuit_masks(model.config, circuit), means, *calibration)}
        )  # fmt: skip
    return rows


def overfit_flag(rows: list[dict]) -> dict:
    """Does the circuit's evaluation loss miss its selection loss by more than its spread (the
    standard error of the difference of the two means)? Calibrated, mean ablation: the loss
    k_optim was selected on."""
    pick = {r["prompt_set"]: r for r in rows if r["variant"] == "circuit_calibrated"}
    sel, ev = pick["selection"], pick["evaluation"]
    spread = math.sqrt(sel["loss_se"] ** 2 + ev["loss_se"] ** 2)
    gap = ev["loss"] - sel["loss"]
    return {
        "selection_loss": sel["loss"],
        "evaluation_loss": ev["loss"],
        "gap": gap,
        "spread": spread,
        "flagged": bool(gap > spread),
    }


# ---- the stage ---------------------------------------------------------------------------------


def build_circuits(store_dir, profile, progress=None) -> list[Path]:
    """The circuits stage: prompt sets, node means, targets, then per model and task the pruning
    seeds (size study) and the stored circuits with their faithfulness rows. Returns the files written."""
    from inference.loader import load_model
    from inference.tokenizer import get_tokenizer
    from pipeline.demo.corpus import corpus_for_profile
    from pipeline.demo.profiles import get_profile
    from pipeline.demo.train import token_stream

    log = progress or (lambda msg: None)
    store_dir, profile = Path(store_dir), get_profile(profile)
    cfg = PruneConfig.from_profile(profile)
    torch.set_num_threads(profile.num_threads)
    corpus = corpus_for_profile(profile)
    enc = get_tokenizer(store_dir / "tinypython")
    train_texts = [f.text for f in corpus.split("train")]
    stream = token_stream(train_texts, enc, enc.eot_token)
    sets = _task_prompt_sets(cfg, corpus, enc, _line_index(train_texts), log)

    models, means_of, windows_of = {}, {}, {}
    written = []
    for name in profile.model_names:
        model = load_model(str(store_dir / "models" / name))
        windows = pretraining_windows(stream, model.config.block_size, cfg.mean_windows)
        means = node_means(model, windows)
        written += _write_model_inputs(store_dir / "models" / name, means, windows, sets)
        models[name], means_of[name], windows_of[name] = model, means, windows

    baselines, targets = _targets(models, means_of, sets, cfg)
    for name, model in models.items():
        pre_acts = pretraining_acts(model, windows_of[name])
        for task, s in sets.items():
            written += _prune_task(
                store_dir, name, model, task, s, means_of[name], windows_of[name], pre_acts, baselines, targets, cfg, log
            )
    return written


def _task_prompt_sets(cfg, corpus, enc, index, log) -> dict[str, dict]:
    """Per task: the pruning pool, the docs of each prompt set (pruning = the fixed calibration
    batch) and the set statistics; tasks with a set below MIN_PAIRS are skipped."""
    sizes = {"pruning": cfg.pool_pairs, "selection": cfg.selection_pairs, "evaluation": cfg.eval_pairs}
    sets = {}
    for task in cfg.tasks:
        ps = prompt_sets(task, corpus, enc, cfg.ctx, sizes, index)
        counts = {name: len(getattr(ps, name)) for name in PROMPT_SETS}
        log(f"circuits: {task}: prompt sets {counts}")
        if min(counts.values()) < MIN_PAIRS:
            log(f"circuits: task {task} skipped (fewer than {MIN_PAIRS} pairs in a set)")
            continue
        pool = ps.docs("pruning", cfg.ctx)
        n_pool = pool.shape[0] // 2
        calib_rows = torch.cat([torch.arange(min(cfg.batch_pairs, n_pool)), n_pool + torch.arange(min(cfg.batch_pairs, n_pool))])
        sets[task] = {
            "pool": pool,
            "docs": {
                "pruning": pool[calib_rows],
                "selection": ps.docs("selection", cfg.ctx),
                "evaluation": ps.docs("evaluation", cfg.ctx),
            },
            "stats": ps.stats,
        }
    return sets


def _write_model_inputs(model_dir: Path, means, windows, sets) -> list[Path]:
    """`node_means.pt` and the prompt sets of one model."""
    # The means every circuit of this model was pruned and measured with: the release ships no
    # such file, so readers of the public store approximate them; on this store the pipeline
    # reads these and its recomputed ablations can match the stored ones exactly.
    means_path = model_dir / NODE_MEANS_FILE
    save_atomic(
        {"means": {loc: m.float().clone() for loc, m in means.items()}, "tokens": int(windows.numel()),
         "source": f"{windows.shape[0]} windows of {windows.shape[1]} tokens of the train split"},
        means_path,
    )  # fmt: skip
    written = [means_path]
    for task, s in sets.items():
        path = model_dir / PROMPT_SETS_DIR / f"{task}.pt"
        save_atomic({"pool": s["pool"].clone(), **{k: v.clone() for k, v in s["docs"].items()}, "stats": s["stats"]}, path)
        written.append(path)
    return written


def _targets(models, means_of, sets, cfg) -> tuple[dict, dict]:
    """(baselines[task][model] = full and fully-ablated loss on the selection set,
    targets[task][f] = the larger over models of full + f * |ablated - full|)."""
    baselines: dict[str, dict[str, dict]] = {}
    for name, model in models.items():
        empty = {loc: torch.zeros(0, dtype=torch.long) for loc in node_locations(model.config)}
        for task, s in sets.items():
            sel = s["docs"]["selection"]
            baselines.setdefault(task, {})[name] = {
                "full": set_measure(model, sel, None, means_of[name])["loss"],
                "ablated": set_measure(model, sel, circuit_masks(model.config, empty), means_of[name])["loss"],
            }
    fractions = sorted(set(cfg.target_sweep) | {cfg.target_fraction})
    targets = {
        task: {f: max(b["full"] + f * abs(b["ablated"] - b["full"]) for b in by_model.values()) for f in fractions}
        for task, by_model in baselines.items()
    }
    return baselines, targets


def _size_study(model, s, means, targets_f: dict, cfg, log, name: str, task: str):
    """Prune every seed; per seed and target fraction, k_optim on the selection set and the
    calibrated loss on selection and evaluation. Returns (rows, the first seed's result)."""
    docs, locs = s["docs"], node_locations(model.config)
    study, first = [], None
    for seed in cfg.prune_seeds:
        log(f"circuits: {name} / {task}: pruning, seed {seed} ({s['pool'].shape[0] // 2} pool pairs, {cfg.batch_pairs} per step)")
        result = train_gates(model, s["pool"], means, cfg, progress=log, seed=seed)
        if first is None:
            first = result
        for f, target in sorted(targets_f.items()):
            k, reached = find_k_optim(
                model, docs["selection"], result.order, means, cfg, target=target, calib_docs=docs["pruning"]
            )
            circuit = circuit_from_order(result.order, k, locs)
            calib = calibrate(circuit_z(model, docs["pruning"], circuit, means))
            row = {
                "seed": seed,
                "target_fraction": f,
                "target": target,
                "k": k,
                "reached": reached,
                "edges": count_edges(model, circuit),
            }
            for set_name in ("selection", "evaluation"):
                m = set_measure(model, docs[set_name], circuit_masks(model.config, circuit), means, *calib)
                row[f"{set_name}_loss"], row[f"{set_name}_loss_se"] = m["loss"], m["loss_se"]
            study.append(row)
    return study, first


def _prune_task(store_dir, name, model, task, s, means, windows, pre_acts, baselines, targets, cfg, log) -> list[Path]:
    """One model and task: the size study, then a viz_data file per stored k (the k grid and k_optim)."""
    study, first = _size_study(model, s, means, targets[task], cfg, log, name, task)
    head = next(r for r in study if r["seed"] == cfg.prune_seeds[0] and r["target_fraction"] == cfg.target_fraction)
    k_opt, reached = head["k"], head["reached"]
    prune_config = {
        **cfg.to_dict(), "model": name, "task": task, "k_optim": k_opt, "k_optim_reached_target": reached,
        "target_loss": targets[task][cfg.target_fraction], "targets": {str(f): t for f, t in targets[task].items()},
        "full_loss_selection": baselines[task][name]["full"], "ablated_loss_selection": baselines[task][name]["ablated"],
        "seed": cfg.prune_seeds[0],
    }  # fmt: skip
    docs, locs, total = s["docs"], node_locations(model.config), num_total_nodes(model.config)
    written = []
    for label, k in [(str(k), k) for k in cfg.ks if k <= total] + [("k_optim", k_opt)]:
        circuit = circuit_from_order(first.order, k, locs)
        calib = calibrate(circuit_z(model, docs["pruning"], circuit, means))
        rows = faithfulness_rows(model, circuit, docs, means, calib)
        flag = overfit_flag(rows)
        ev = next(r for r in rows if r["prompt_set"] == "evaluation" and r["variant"] == "circuit" and r["ablation"] == "mean")
        curve = _pruning_curve(first.curve, k, ev["loss"], cfg.loss_factor)
        extra = {"k": k, "calibration": {"scale": calib[0], "shift": calib[1]}, "faithfulness": rows, "overfit": flag}
        if label == "k_optim":
            extra.update(study=study, prompt_sets=s["stats"])
        viz = build_viz_data(
            model, docs["evaluation"], circuit, means, pre_acts, windows, curve, total, {**prune_config, **extra}, cfg
        )
        path = store_dir / "viz" / name / task / SWEEP / label / "viz_data.pt"
        save_atomic(viz, path)
        written.append(path)
        imp = viz["importances"]
        log(
            f"circuits: {name} / {task} / {label}: {k} nodes, evaluation loss (per prompt) full {imp['loss'] / 2:.3f}, "
            f"circuit {imp['interv_loss'] / 2:.3f}, calibrated {flag['evaluation_loss']:.3f} (selection {flag['selection_loss']:.3f}"
            f"{', FLAGGED' if flag['flagged'] else ''}); target {prune_config['target_loss']:.3f}"
        )
    return written


def _pruning_curve(curve_steps, k: int, eval_loss: float, loss_factor: float) -> list[tuple[int, float]]:
    """`all_loss`: the optimisation curve (raw scale) until the kept count first drops to k,
    closed by the measured loss of this top-k circuit on the stored (evaluation) docs."""
    curve = []
    for step, corrected, kept in curve_steps:
        curve.append((step, corrected * loss_factor))
        if kept <= k:
            break
    curve.append((curve[-1][0] + 1 if curve else 0, eval_loss * loss_factor))
    return curve
