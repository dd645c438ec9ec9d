"""`circuits store-report` (the README's embedded-store tables), checked against numbers
computed here from the store's files with plain torch (not through pipeline.demo.*)."""

import json
import math

import torch

from inference.loader import load_model
from pipeline.demo.report import collect, markdown


def _accuracy(model, docs):
    """Per-prompt accuracy: the row's answer outscores the pair's other answer at the last position."""
    n = docs.shape[0] // 2
    with torch.no_grad():
        logits = model(docs)
    right = 0
    for j in range(docs.shape[0]):
        length = int((docs[j] != 0).nonzero().max()) + 1
        partner = j + n if j < n else j - n
        plen = int((docs[partner] != 0).nonzero().max()) + 1
        answer, other = docs[j, length - 1], docs[partner, plen - 1]
        right += int(logits[j, length - 2, answer] > logits[j, length - 2, other])
    return right / docs.shape[0]


def test_report_numbers_match_the_files(tiny_store):
    report = collect(tiny_store)
    files = sorted((tiny_store / "viz").rglob("viz_data.pt"))
    assert len(report["circuits"]) == len(files)

    by_key = {(c["model"], c["task"], c["k"]): c for c in report["circuits"]}
    for f in files:
        viz = torch.load(f, weights_only=True)
        c = by_key[(f.parts[-5], f.parts[-4], f.parts[-2])]
        assert c["nodes"] == sum(len(v) for v in viz["circuit_data"].values())
        assert c["edges"] == sum(int((m[0] != 0).sum()) for m in viz["importances"]["pair_data_connections"])
        assert abs(c["loss"] - viz["importances"]["loss"] / 2) < 1e-12
        assert abs(c["circuit_loss"] - viz["importances"]["interv_loss"] / 2) < 1e-12

    manifest = json.loads((tiny_store / "store_manifest.json").read_text())
    for name, m in report["models"].items():
        assert m["num_params"] == sum(p.numel() for p in load_model(str(tiny_store / "models" / name)).parameters())
        assert m["final_test_xent"] == manifest["stages"][f"model:{name}"]["info"]["final_test_xent"]

    for row in report["tasks"]:
        f = next(p for p in files if p.parts[-5] == row["model"] and p.parts[-4] == row["task"])
        docs = torch.load(f, weights_only=True)["importances"]["task_samples"][0]
        model = load_model(str(tiny_store / "models" / row["model"]))
        assert abs(row["accuracy"] - _accuracy(model, docs)) < 1e-9
        assert row["prompts"] == docs.shape[0]
        kopt = torch.load(f.parent.parent / "k_optim" / "viz_data.pt", weights_only=True)
        assert row["k_optim"] == kopt["prune_config"].get("k_optim", sum(len(v) for v in kopt["circuit_data"].values()))

    text = markdown(report)
    for c in report["circuits"]:
        assert f"| {c['model']} | {c['task']} | {c['k']} | {c['nodes']} | {c['edges']} |" in text


def test_report_prints_targets_faithfulness_and_the_size_study(tiny_store):
    """The report's target, faithfulness and size-study cells are the stored values."""
    report = collect(tiny_store)
    text = markdown(report)
    assert "per prompt" in text  # the loss scale is stated
    for f in sorted((tiny_store / "viz").rglob("viz_data.pt")):
        pc = torch.load(f, weights_only=True)["prune_config"]
        ev = next(
            r
            for r in pc["faithfulness"]
            if (r["prompt_set"], r["ablation"], r["variant"]) == ("evaluation", "zero", "without_circuit")
        )
        assert f"{ev['loss']:.3f} ± {ev['loss_se']:.3f}" in text
        if f.parts[-2] == "k_optim":
            assert f"{pc['target_loss']:.3f} (f = {pc['target_fraction']})" in text
            assert len(pc["study"]) == len(pc["prune_seeds"]) * len(set(pc["target_sweep"]) | {pc["target_fraction"]})
            for r in pc["study"]:
                assert r["target"] > pc["full_loss_selection"]
            # A target at or above chance (ln 2 per prompt) is reachable by a constant predictor: said so.
            row = next(line for line in text.splitlines() if f"{pc['target_loss']:.3f} (f = {pc['target_fraction']})" in line)
            assert ("chance reaches it" in row) == (pc["target_loss"] >= math.log(2))
