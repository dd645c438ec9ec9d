"""What an embedded store holds, measured from its files: the README's tables come from here.

`circuits store-report [--store DIR]` prints, as Markdown:

- per model: parameters, weight density, held-out cross-entropy next to the unigram baseline
  (from the build manifest), training steps (the dense model stops at the sparse one's loss);
- per task: the three prompt sets (pairs, and what deduplication and the pretraining check dropped);
- per model and task: accuracy and loss of the full model on the evaluation set, the target
  (a fraction of the way from the full to the fully mean-ablated loss), `k_optim` and its
  evaluation loss next to its selection loss;
- every circuit: nodes, edges, losses; and its faithfulness stress tests (circuit alone, model
  without the circuit, mean vs zero ablation, every prompt set), flagged when the evaluation loss
  misses the selection loss by more than the standard error of that difference;
- the size study: edges of circuits at equal loss, sparse vs dense, mean and spread over pruning
  seeds, and their geometric mean ratio over the tasks every seed of both models reached.

Every loss is per prompt (the stored raw values / 2, the release's factor-2 convention).
Accuracy needs one forward pass per model on the stored docs; everything else is read.
"""

from __future__ import annotations

import json
import math
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
                    task_row.update(
                        k_optim=pc.get("k_optim", nodes), reached=pc.get("k_optim_reached_target"), target=pc.get("target_loss"),
                        target_fraction=pc.get("target_fraction"), full_selection=pc.get("full_loss_selection"),
                        ablated_selection=pc.get("ablated_loss_selection"), overfit=pc.get("overfit"),
                        study=pc.get("study", []), prompt_sets=pc.get("prompt_sets"),
                    )  # fmt: skip
                circuits[-1].update(faithfulness=pc.get("faithfulness", []), overfit=pc.get("overfit"))
                if "accuracy" not in task_row and model is not None:
                    docs = imp["task_samples"][0]
                    with torch.no_grad():
                        m = task_metrics(model(docs), docs)
                    task_row.update(
                        accuracy=m["accuracy"], pair_accuracy=m["pair_accuracy"], loss=imp["loss"] / 2, prompts=docs.shape[0]
                    )
            tasks.append(task_row)
    return {"models": models, "tasks": tasks, "circuits": circuits, "timings": manifest.get("timings", {})}


def _fmt(v, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def _pm(values: list[float], spec: str = ".0f") -> str:
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return format(mean, spec)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{format(mean, spec)} ± {format(sd, spec)}"


def size_study(report: dict) -> tuple[list[dict], dict]:
    """Rows (task, fraction, model: edges over seeds) and, per fraction, the geometric mean over
    tasks of dense edges / sparse edges (tasks where every seed of every model reached the target)."""
    by = {}
    for row in report["tasks"]:
        for r in row.get("study") or []:
            by.setdefault((row["task"], r["target_fraction"]), {}).setdefault(row["model"], []).append(r)
    rows, ratios = [], {}
    models = sorted({row["model"] for row in report["tasks"]})
    # A task counts as learned when every model's full loss on the selection set is below chance
    # (ln 2 per prompt): a calibrated empty circuit reaches chance, so an unlearned task's
    # "circuits" can reach a target above it with next to nothing.
    learned = {}
    for row in report["tasks"]:
        ok = row.get("full_selection") is not None and row["full_selection"] < math.log(2)
        learned[row["task"]] = learned.get(row["task"], True) and ok
    for (task, f), per_model in sorted(by.items()):
        all_reached = len(per_model) == len(models) and all(r["reached"] for rs in per_model.values() for r in rs)
        rows.append({"task": task, "fraction": f, "target": next(iter(per_model.values()))[0]["target"], "all_reached": all_reached,
                     "learned": learned.get(task, False), "models": per_model})  # fmt: skip
        if all_reached and learned.get(task, False) and len(models) == 2:
            s_name = next(m for m in models if m.endswith("_sparse"))
            d_name = next(m for m in models if m.endswith("_dense"))
            sparse = sum(r["edges"] for r in per_model[s_name]) / len(per_model[s_name])
            dense = sum(r["edges"] for r in per_model[d_name]) / len(per_model[d_name])
            if sparse > 0 and dense > 0:  # a ratio with an empty (0-edge) circuit has no geometric mean
                ratios.setdefault(f, []).append((task, dense / sparse))
    geo = {f: (math.exp(sum(math.log(r) for _, r in rs) / len(rs)), [t for t, _ in rs]) for f, rs in ratios.items()}
    return rows, geo


def markdown(report: dict) -> str:
    """The README's embedded-store tables, one section per function below."""
    by_task: dict[str, dict[str, dict]] = {}
    for row in report["tasks"]:
        by_task.setdefault(row["task"], {})[row["model"]] = row
    models = sorted({row["model"] for row in report["tasks"]})
    out = [
        "All losses: per prompt, nats (the release stores raw = 2 x this). Every loss and accuracy below is on the",
        "evaluation prompts unless a column says otherwise.",
    ]
    out += _models_section(report)
    out += _prompt_sets_section(by_task)
    out += _tasks_section(by_task, models)
    out += _circuits_section(report)
    out += _faithfulness_section(report)
    out += _size_section(report, models)
    return "\n".join(out) + "\n"


def _models_section(report: dict) -> list[str]:
    out = [
        "",
        "| model | params | weight density | held-out xent | unigram xent | steps | train s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in sorted(report["models"].items()):
        steps = m.get("steps")
        matched = (
            f" (stopped at the sparse model's xent {m['matched_to_xent']:.3f})" if m.get("matched_to_xent") is not None else ""
        )
        out.append(
            f"| {name} | {m.get('num_params', 0):,} | {_fmt(m.get('weight_density'), '.4f')} | {_fmt(m.get('final_test_xent'))} "
            f"| {_fmt(m.get('unigram_xent'))} | {steps if steps is not None else '-'}{matched} | {_fmt(m.get('seconds'), '.0f')} |"
        )
    return out


def _dropped(d: dict) -> str:
    return f"{d['duplicates_dropped']} / {d.get('equal_to_pruning_dropped', 0)} / {d['seen_in_pretraining_dropped']}"


def _prompt_sets_section(by_task: dict) -> list[str]:
    out = [
        "",
        "Prompt sets (pairs; pruning = the pool fresh batches are drawn from; dropped = duplicates / equal to a pruning prompt / seen verbatim in pretraining):",
        "",
    ]
    out += [
        "| task | pruning pool | selection | evaluation | selection dropped | evaluation dropped |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for task, rows in sorted(by_task.items()):
        st = next((r.get("prompt_sets") for r in rows.values() if r.get("prompt_sets")), None)
        if st:
            out.append(
                f"| {task} | {st['pruning']['pairs']} | {st['selection']['pairs']} | {st['evaluation']['pairs']} "
                f"| {_dropped(st['selection'])} | {_dropped(st['evaluation'])} |"
            )
    return out


def _target_cell(r: dict) -> str:
    if r.get("target") is None:
        return "-"
    cell = f"{_fmt(r.get('target'))} (f = {r.get('target_fraction')})"
    # a target a coin flip between the pair's two answers reaches is no evidence of a mechanism
    return cell + (" **>= ln 2: chance reaches it**" if r["target"] >= math.log(2) else "")


def _tasks_section(by_task: dict, models: list[str]) -> list[str]:
    out = [
        "",
        "| model | task | accuracy (prompt / pair) | full loss | full loss (selection) | ablated loss (selection) | target | k_optim | k_optim calibrated loss (selection) | k_optim calibrated loss (evaluation) |",
    ]
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for task, rows in sorted(by_task.items()):
        for m in models:
            r = rows.get(m)
            if r is None:
                continue
            ov = r.get("overfit") or {}
            acc = f"{_fmt(r.get('accuracy'), '.0%')} / {_fmt(r.get('pair_accuracy'), '.0%')}" if "accuracy" in r else "-"
            k = "-" if "k_optim" not in r else f"{r['k_optim']}" + ("" if r.get("reached") else " (not reached)")
            ev = f"{_fmt(ov.get('evaluation_loss'))}" + (" **flagged**" if ov.get("flagged") else "") if ov else "-"
            out.append(
                f"| {m} | {task} | {acc} | {_fmt(r.get('loss'))} | {_fmt(r.get('full_selection'))} | {_fmt(r.get('ablated_selection'))} "
                f"| {_target_cell(r)} | {k} | {_fmt(ov.get('selection_loss'))} | {ev} |"
            )
    return out


def _circuits_section(report: dict) -> list[str]:
    out = ["", "Every circuit (first pruning seed; edges = nonzero weights between retained nodes, `pair_data_connections`):", ""]
    out += [
        "| model | task | k | nodes | edges | full-model loss | circuit loss | calibrated circuit loss |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for c in report["circuits"]:
        cal = next(
            (
                r["loss"]
                for r in c.get("faithfulness", [])
                if r["prompt_set"] == "evaluation" and r["variant"] == "circuit_calibrated"
            ),
            None,
        )
        out.append(
            f"| {c['model']} | {c['task']} | {c['k']} | {c['nodes']} | {c['edges']} | {c['loss']:.3f} | {c['circuit_loss']:.3f} | {_fmt(cal)} |"
        )
    return out


def _faithfulness_section(report: dict) -> list[str]:
    out = ["", "Faithfulness stress tests (loss ± standard error over prompts; evaluation set unless named):", ""]
    out += [
        "| model | task | k | circuit alone (mean abl.) | circuit alone (zero abl.) | without circuit (mean abl.) | without circuit (zero abl.) "
        "| calibrated: pruning | selection | evaluation | flag |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in report["circuits"]:
        rows = c.get("faithfulness") or []
        if not rows:
            continue
        pick = {(r["prompt_set"], r["ablation"], r["variant"]): r for r in rows}

        def cell(key, pick=pick):
            r = pick.get(key)
            return "-" if r is None else f"{r['loss']:.3f} ± {r['loss_se']:.3f}"

        flagged = (c.get("overfit") or {}).get("flagged")
        out.append(
            f"| {c['model']} | {c['task']} | {c['k']} | {cell(('evaluation', 'mean', 'circuit'))} | {cell(('evaluation', 'zero', 'circuit'))} "
            f"| {cell(('evaluation', 'mean', 'without_circuit'))} | {cell(('evaluation', 'zero', 'without_circuit'))} "
            f"| {cell(('pruning', 'mean', 'circuit_calibrated'))} | {cell(('selection', 'mean', 'circuit_calibrated'))} "
            f"| {cell(('evaluation', 'mean', 'circuit_calibrated'))} | {'evaluation misses selection' if flagged else 'ok'} |"
        )
    return out


def _size_section(report: dict, models: list[str]) -> list[str]:
    rows, geo = size_study(report)
    if not rows:
        return []
    out = [
        "",
        "Size at equal loss: k selected per pruning seed on the selection set at one target per task (full + f x |ablated - full|,",
        "the larger of the models' targets); edges, nodes and evaluation loss (calibrated) as mean ± sd over seeds:",
        "",
    ]
    out += ["| task | f | target | " + " | ".join(f"{m} edges | {m} nodes | {m} eval loss | {m} reached" for m in models) + " |"]
    out.append("|---|---:|---:|" + "---:|---:|---:|---:|" * len(models))
    for r in rows:
        cells = []
        for m in models:
            rs = r["models"].get(m, [])
            cells += [
                _pm([x["edges"] for x in rs]),
                _pm([x["k"] for x in rs]),
                _pm([x["evaluation_loss"] for x in rs], ".3f"),
                f"{sum(x['reached'] for x in rs)}/{len(rs)}",
            ]
        task = r["task"] if r["learned"] else f"{r['task']} (not learned: full loss >= ln 2)"
        if r["learned"] and r["target"] >= math.log(2):
            task += " (target >= ln 2: chance reaches it)"
        out.append(f"| {task} | {r['fraction']} | {r['target']:.3f} | " + " | ".join(cells) + " |")
    if len(models) == 2:
        out.append("")
        for f in sorted({r["fraction"] for r in rows}):
            if f in geo:
                g, tasks = geo[f]
                out.append(
                    f"- f = {f}: geometric mean over {len(tasks)} learned task(s) ({', '.join(tasks)}) of dense edges / sparse edges: **{g:.2f}**"
                )
            else:
                out.append(
                    f"- f = {f}: no learned task where every seed of both models reached the target with nonempty circuits; no ratio"
                )
    return out


def store_report_cli(args) -> int:
    from pipeline.settings import embedded_store_dir

    store = Path(args.store or embedded_store_dir())
    if not (store / "store_manifest.json").is_file() and not (store / "viz").is_dir():
        print(f"circuits store-report: {store} holds no embedded store (no store_manifest.json, no viz/)")
        return 1
    print(markdown(collect(store)), end="")
    return 0
