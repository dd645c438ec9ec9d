"""Honesty checks of the embedded store's circuits (tiny profile), recomputed independently
with raw hooks and the checkpoint's weights (not through pipeline.demo.*)."""

import re

import pytest
import torch
import torch.nn.functional as F

from inference.hooks import intervene, record
from inference.loader import load_model


def _viz_files(store):
    return sorted((store / "viz").rglob("viz_data.pt"))


@pytest.fixture(scope="module")
def one_circuit(tiny_store):
    files = _viz_files(tiny_store)
    assert files, "no viz_data.pt written"
    path = next(p for p in files if p.parts[-2] == "k_optim")
    viz = torch.load(path, weights_only=True)
    model = load_model(str(tiny_store / "models" / path.parts[-5]))
    return path, viz, model


def _loss(logits, docs):
    """Two-sided task loss, raw (x2), written out here independently of inference.circuit."""
    n = docs.shape[0] // 2
    lengths = torch.tensor([int((row != 0).nonzero().max()) + 1 for row in docs])
    total = 0.0
    for j in range(n):
        a, b = docs[j, lengths[j] - 1], docs[j + n, lengths[j + n] - 1]
        l1 = F.log_softmax(logits[j, lengths[j] - 2, [a, b]].double(), 0)[0]
        l2 = F.log_softmax(logits[j + n, lengths[j + n] - 2, [a, b]].double(), 0)[1]
        total += -(l1 + l2).item()
    return total / n


def _means(model, viz):
    # node means are not stored: recompute them the way the spec says would need the corpus;
    # instead check against the stored interv_loss with means recovered from the model run
    # on the same pretraining windows by pipeline.demo.circuits (one shared definition).
    from pipeline.demo.build import _load_encoding
    from pipeline.demo.circuits import pretraining_windows
    from pipeline.demo.corpus import corpus_for_profile
    from pipeline.demo.profiles import get_profile
    from pipeline.demo.train import token_stream

    cfg = viz["prune_config"]
    prof = get_profile("tiny")
    enc = _load_encoding(_means.store / "tinypython")
    stream = token_stream([f.text for f in corpus_for_profile(prof).split("train")], enc, enc.eot_token)
    windows = pretraining_windows(stream, model.config.block_size, cfg["mean_windows"])
    locs = [f"{i}.{h}.{k}" for i in range(model.config.n_layer) for h, ks in (("attn", ("act_in", "q", "k", "v", "resid_delta")), ("mlp", ("act_in", "post_act", "resid_delta"))) for k in ks]
    with torch.no_grad(), record("|".join(re.escape(x) for x in locs)) as rec:
        model(windows)
    return {loc: rec[loc].double().mean((0, 1)).float() for loc in locs}


def _circuit_forward(model, docs, keep, means):
    with torch.no_grad(), record(r".*rstd") as rstd:
        model(docs)
    fns = {name: (lambda t, s=s: s) for name, s in rstd.items()}
    for loc, m in means.items():
        mask = torch.zeros_like(m)
        mask[keep.get(loc, [])] = 1.0
        fns[loc] = lambda t, mask=mask, m=m: t * mask + (1 - mask) * m
    with torch.no_grad(), intervene(fns):
        return model(docs)


def test_files_load_safely_and_docs_are_paired(tiny_store):
    for path in _viz_files(tiny_store):
        viz = torch.load(path, weights_only=True)
        assert {"circuit_data", "importances", "samples", "all_loss", "num_total_nodes", "prune_config"} <= set(viz)
        docs = viz["importances"]["task_samples"][0]
        n = docs.shape[0]
        assert n % 2 == 0 and n >= 8
        ends = torch.tensor([int((r != 0).nonzero().max()) for r in docs])
        answers = docs[torch.arange(n), ends]
        # each pair's two answers differ: the contrast is real
        assert (answers[: n // 2] != answers[n // 2 :]).all()
        k = sum(len(v) for v in viz["circuit_data"].values())
        assert path.parts[-2] == "k_optim" or k == int(path.parts[-2])


def test_losses_reproduce(tiny_store, one_circuit):
    path, viz, model = one_circuit
    imp = viz["importances"]
    docs = imp["task_samples"][0]
    with torch.no_grad():
        assert _loss(model(docs), docs) == pytest.approx(imp["loss"], abs=1e-4)
    _means.store = tiny_store
    means = _means(model, viz)
    keep = {loc: c.tolist() for loc, c in viz["circuit_data"].items()}
    assert _loss(_circuit_forward(model, docs, keep, means), docs) == pytest.approx(imp["interv_loss"], abs=1e-4)
    loc = next(iter(keep))
    drop = {**keep, loc: keep[loc][1:]}
    assert _loss(_circuit_forward(model, docs, drop, means), docs) == pytest.approx(imp["ch_interv_losses"][loc][0], abs=1e-4)


def test_task_samples_are_full_model_activations(one_circuit):
    _, viz, model = one_circuit
    docs, acts = viz["importances"]["task_samples"]
    with torch.no_grad(), record(r".*") as rec:
        model(docs)
    for loc, chans in acts.items():
        for c, a in chans.items():
            torch.testing.assert_close(a, rec[loc][:, :, c])


def test_edges_are_checkpoint_weights(one_circuit):
    _, viz, model = one_circuit
    sd = model.state_dict()
    d_attn = model.config.n_head * model.config.d_head
    for mat, src_names, tgt_names, (src, tgt) in viz["importances"]["pair_data_connections"]:
        assert src_names == viz["circuit_data"][src].tolist() and tgt_names == viz["circuit_data"][tgt].tolist()
        i, _, skind = src.split(".")
        j, thalf, tkind = tgt.split(".")
        for s_i, s in enumerate(src_names):
            for t_i, t in enumerate(tgt_names):
                v = mat[s_i, t_i].item()
                if skind == "resid_delta":
                    want = 1.0 if s == t else 0.0
                elif tkind in ("q", "k", "v"):
                    want = sd[f"transformer.h.{i}.attn.c_attn.weight"][("q", "k", "v").index(tkind) * d_attn + t, s].item()
                elif tkind == "resid_delta":
                    want = sd[f"transformer.h.{i}.{thalf}.c_proj.weight"][t, s].item()
                else:
                    want = sd[f"transformer.h.{i}.mlp.c_fc.weight"][t, s].item()
                assert v == pytest.approx(want)
        assert mat.count_nonzero() > 0


@pytest.mark.parametrize(
    "losses, want",
    [
        ({k: 1.0 / k for k in range(1, 300)}, (34, True)),  # smallest k with 1/k <= 0.03 (raw = 2 x 0.15 / 10)
        ({k: 0.5 + abs(k - 23) / 100 for k in range(1, 300)}, (23, False)),  # never reached: the best grid k
    ],
)
def test_find_k_optim(monkeypatch, losses, want):
    """k_optim against a known loss-vs-k curve: the smallest passing k by bisection, else the best k
    the grid tried (never silently the whole model)."""
    from pipeline.demo import prune

    cfg = prune.PruneConfig(target_loss=0.015, k_optim_max=256)  # raw target 0.03
    order = [("0.mlp.post_act", c) for c in range(300)]
    size = lambda circuit: sum(len(c) for c in circuit.values())  # noqa: E731
    monkeypatch.setattr(prune, "node_locations", lambda config: ["0.mlp.post_act"])
    monkeypatch.setattr(prune, "frozen_norm_scales", lambda model, docs: None)
    monkeypatch.setattr(prune, "raw_circuit_loss", lambda model, docs, circuit, means, frozen: losses[size(circuit)])
    model = type("M", (), {"config": None})()
    assert prune.find_k_optim(model, None, order, None, cfg) == want
