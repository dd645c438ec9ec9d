"""What an embedded store holds, measured from its files: the README's tables come from here.

`circuits store-report [--store DIR]` prints, as Markdown:

- per model: parameters, weight density, held-out cross-entropy next to the unigram baseline
  (from the build manifest, measured at build time), and build seconds;
- per model and task: accuracy of the full model on the stored held-out task docs (per prompt,
  and per pair = both prompts of a pair right), the full-model task loss, `k_optim` and whether
  it reached the target, side by side for the sparse and the dense model;
- every circuit: model, task, k, nodes, edges, full-model and circuit loss.

Losses are printed per prompt (the stored raw values / 2, the release's factor-2 convention).
Accuracy needs one forward pass per model on the stored docs; everything else is read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.demo.tasks import task_metrics


def collect(store_dir: str | Path) -> dict:
    """{"models": {...}, "tasks": [...], "circuits": [...]} measured from the store's files."""
    from inference.loader import load_model

    store = Path(store_dir)
    manifest = json.loads((store / "store_manifest.json").read_text()) if (store / "store_manifest.json").is_file() else {}
    stages = manifest.get("stages", {})
    models = {}
    for stage, entry in stages.items():
        if stage.startswith("model:"):
            models[stage[6:]] = {**entry.get("info", {}), "seconds": entry.get("seconds")}
    circuits, tasks = [], []
    for model_dir in sorted((store / "viz").glob("*")):
        model = load_model(str(store / "models" / model_dir.name)) if (store / "models" / model_dir.name).is_dir() else None
        for task_dir in sorted(p for p in model_dir.glob("*") if p.is_dir()):
            files = sorted(task_dir.glob("*/*/viz_data.pt"))
            task_row = {"model": model_dir.name, "task": task_dir.name}
            for f in files:
                viz = torch.load(f, map_location="cpu", weights_only=True)
                imp, pc = viz["importances"], viz.get("prune_config", {})
                nodes = sum(len(c) for c in viz["circuit_data"].values())
                edges = sum(int(torch.count_nonzero(m[0])) for m in imp["pair_data_connections"])
                label = f.parent.name
                circuits.append(
                    {
                        "model": model_dir.name, "task": task_dir.name, "sweep": f.parent.parent.name, "k": label,
                        "nodes": nodes, "edges": edges, "loss": imp["loss"] / 2, "circuit_loss": imp["interv_loss"] / 2,
                    }
                )  # fmt: skip
                if label == "k_optim":
                    task_row.update(k_optim=pc.get("k_optim", nodes), reached=pc.get("k_optim_reached_target"), target=pc.get("target_loss"))
                if "accuracy" not in task_row and model is not None:
                    docs = imp["task_samples"][0]
                    with torch.no_grad():
                        m = task_metrics(model(docs), docs)
                    task_row.update(accuracy=m["accuracy"], pair_accuracy=m["pair_accuracy"], loss=imp["loss"] / 2, prompts=docs.shape[0])
            tasks.append(task_row)
    return {"models": models, "tasks": tasks, "circuits": circuits, "timings": manifest.get("timings", {})}


def _fmt(v, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def markdown(report: dict) -> str:
    out = ["| model | params | weight density | held-out xent | unigram xent | train s |", "|---|---:|---:|---:|---:|---:|"]
    for name, m in sorted(report["models"].items()):
        out.append(
            f"| {name} | {m.get('num_params', 0):,} | {_fmt(m.get('weight_density'), '.4f')} | {_fmt(m.get('final_test_xent'))} "
            f"| {_fmt(m.get('unigram_xent'))} | {_fmt(m.get('seconds'), '.0f')} |"
        )
    by_task: dict[str, dict[str, dict]] = {}
    for row in report["tasks"]:
        by_task.setdefault(row["task"], {})[row["model"]] = row
    models = sorted({row["model"] for row in report["tasks"]})
    out += ["", "| task | " + " | ".join(f"{m} accuracy (prompt / pair) | {m} k_optim" for m in models) + " |"]
    out.append("|---|" + "---:|---:|" * len(models))
    for task, rows in sorted(by_task.items()):
        cells = []
        for m in models:
            r = rows.get(m, {})
            acc = f"{_fmt(r.get('accuracy'), '.0%')} / {_fmt(r.get('pair_accuracy'), '.0%')}" if "accuracy" in r else "-"
            k = "-" if "k_optim" not in r else f"{r['k_optim']}" + ("" if r.get("reached") else " (target not reached)")
            cells += [acc, k]
        out.append(f"| {task} | " + " | ".join(cells) + " |")
    out += ["", "| model | task | k | nodes | edges | full-model loss | circuit loss |", "|---|---|---|---:|---:|---:|---:|"]
    for c in report["circuits"]:
        out.append(f"| {c['model']} | {c['task']} | {c['k']} | {c['nodes']} | {c['edges']} | {c['loss']:.3f} | {c['circuit_loss']:.3f} |")
    return "\n".join(out) + "\n"


def store_report_cli(args) -> int:
    from pipeline.settings import embedded_store_dir

    store = Path(args.store or embedded_store_dir())
    if not (store / "store_manifest.json").is_file() and not (store / "viz").is_dir():
        print(f"circuits store-report: {store} holds no embedded store (no store_manifest.json, no viz/)")
        return 1
    print(markdown(collect(store)), end="")
    return 0
