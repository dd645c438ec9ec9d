"""Release-shaped circuit files: `final_resid` nodes, a location the code does not know, samples pairs
as tuples and lists, and a checkpoint without `transformer.ln_f.weight`, through the real
`circuits materialize` (Dagster) path and the viewer. Expected values come from the raw files and
from plain-torch computations (`fixtures_viz.plain_final_resid_losses`), not from the pipeline."""

import pickle
import shutil
import warnings

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from fixtures_viz import (
    FIXTURE_CONFIG,
    PARTIAL_MODEL,
    RELEASE_MODEL,
    RELEASE_RUNS,
    UNKNOWN_LOCATION,
    make_model,
    plain_final_resid_losses,
)

from inference import circuit as C
from inference import circuit_model as CM

# ---- the location model and the final_resid ablation, against plain torch ----------------------


def test_locations_parse_classify_and_keep_unknown_names():
    assert C.parse_location("3.attn.q") == (3, "attn", "q")
    assert C.parse_location("final_resid") == (None, "final", "final_resid")
    with pytest.raises(ValueError):
        C.parse_location("1.resid_post")
    assert C.classify_location("1.resid_post") == (1, "other", "other")
    assert C.classify_location("embed_out") == (None, "other", "other")
    assert C.layer_half_key("0.mlp.post_act") == "0.mlp" and C.layer_half_key("final_resid") == "final_resid"
    assert C.layer_half_key("embed_out") is None


def _model(rms: bool):
    from inference import GPT, GPTConfig

    base = make_model(seed=3)
    if not rms:
        return base
    model = GPT(GPTConfig(**{k: v for k, v in FIXTURE_CONFIG.items() if k != "pfrac"}, rms_norm=True)).eval()
    model.load_state_dict({k: v for k, v in base.state_dict().items() if k in model.state_dict()}, strict=False)
    with torch.no_grad():
        model.transformer.ln_f.weight.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_final_resid_ablations_match_plain_torch(rms):
    model = _model(rms)
    g = torch.Generator().manual_seed(0)
    docs = torch.randint(1, 2000, (4, 12), generator=g)
    per_layer = {
        "0.attn.v": torch.tensor([1, 5]),
        "1.mlp.post_act": torch.tensor([3, 7, 2]),
        "1.mlp.resid_delta": torch.tensor([0, 4]),
        "0.mlp.act_in": torch.tensor([2, 9]),
    }
    final = [4, 9, 11, 0]
    circuit = {**per_layer, "final_resid": torch.tensor(final)}
    means = C.node_means(
        model, torch.randint(1, 2000, (6, 12), generator=g), locations=C.circuit_locations(model.config, circuit)
    )

    interv = plain_final_resid_losses(model, docs, per_layer, final, means)[0]
    assert C.circuit_loss(model, docs, circuit, means) == pytest.approx(interv, abs=1e-5)
    # The final_resid mask matters: without it the circuit's loss is another number.
    assert abs(C.circuit_loss(model, docs, per_layer, means) - interv) > 1e-4
    cm = CM.CircuitModel(model, docs, circuit, means)
    ref_logits = C.masked_forward(model, docs, C.circuit_masks(model.config, circuit), means)
    torch.testing.assert_close(cm.logits(), ref_logits, atol=1e-5, rtol=1e-5)
    moved = 0
    for mode in ("mean", "zero"):
        ref = C.ablation_losses(model, docs, circuit, means, mode=mode)
        fast = CM.fast_ablation_losses(model, docs, circuit, means, mode=mode)
        for loc, chans in circuit.items():
            for i, c in enumerate(chans.tolist()):
                plain = plain_final_resid_losses(model, docs, per_layer, final, means, (loc, c), mode)[0]
                assert ref[loc][i].item() == pytest.approx(plain, abs=1e-5), (mode, loc, c)
                assert fast[loc][i].item() == pytest.approx(plain, abs=1e-5), (mode, loc, c)
                moved += loc == "final_resid" and abs(plain - interv) > 1e-4
    assert moved >= 2  # some final_resid ablations change the loss: the comparison is not vacuous


# ---- the release-variant store through `circuits materialize` -----------------------------------


def _raw(store, run_id):
    f = RELEASE_RUNS[run_id]["file"]
    path = store / "viz" / run_id / f
    if f.endswith(".pkl"):
        with open(path, "rb") as fh:
            return pickle.load(fh)  # trusted test fixture: an independent read
    return torch.load(path, weights_only=False)


def _table(data, name, key):
    return pq.read_table(data / "tables" / name / (key.replace("/", "__") + ".parquet")).to_pandas()


def test_unknown_location_warns_once_per_file(release_store):
    from pipeline.formats import UnknownLocationWarning, read_viz_data

    run = "fixture_r/quotes/prune_v4/k_optim"
    path = release_store / "viz" / run / RELEASE_RUNS[run]["file"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        viz = read_viz_data(path)
    unknown = [w for w in caught if issubclass(w.category, UnknownLocationWarning)]
    assert len(unknown) == 1  # one per file, though the location has 2 nodes, acts, samples
    assert str(path) in str(unknown[0].message) and UNKNOWN_LOCATION in str(unknown[0].message)
    assert viz.unknown_locations == [UNKNOWN_LOCATION]


def test_release_store_converts_every_node(release_store, release_data):
    data, summary = release_data
    assert not summary.failed, summary.failed
    for run_id, spec in RELEASE_RUNS.items():
        raw = _raw(release_store, run_id)
        # The fixture holds both released pair types (what this test is about).
        loc0 = next(iter(raw["samples"]))
        pair = next(iter(next(iter(raw["samples"][loc0].values())).values()))
        assert type(pair) is spec["pair"]
        circuit = {loc: [int(c) for c in ch.tolist()] for loc, ch in raw["circuit_data"].items()}
        assert "final_resid" in circuit
        nodes = _table(data, "nodes", run_id).set_index("node_id")
        expected = {f"{loc}:{c}" for loc, chans in circuit.items() for c in chans}
        assert set(nodes.index) == expected and len(nodes) == len(expected)
        imp = raw["importances"]
        for loc, chans in circuit.items():
            for i, c in enumerate(chans):
                row = nodes.loc[f"{loc}:{c}"]
                assert row["delta"] == pytest.approx(
                    (float(imp["ch_interv_losses"][loc][i]) - imp["interv_loss"]) * 0.5, abs=1e-9
                )
                if loc == "final_resid":
                    assert pd.isna(row["layer"]) and (row["half"], row["kind"]) == ("final", "final_resid")
                elif loc == UNKNOWN_LOCATION:
                    assert (row["layer"], row["half"], row["kind"]) == (1, "other", "other")

        # activations and samples of every location, final_resid and the unknown one included
        acts = _table(data, "activations", run_id)
        docs = imp["task_samples"][0]
        lengths = [int((d != 0).nonzero().max()) + 1 for d in docs]
        samples = _table(data, "samples", run_id)
        snippets = _table(data, "snippets", run_id)
        for loc, chans in circuit.items():
            by_ch = {int(k): v for k, v in imp["task_samples"][1][loc].items()}
            s_by_ch = {int(k): v for k, v in raw["samples"][loc].items()}
            for c in chans:
                a = acts[acts["node_id"] == f"{loc}:{c}"].sort_values(["doc", "pos"])
                want = np.concatenate([by_ch[c][d, : lengths[d]].numpy() for d in range(len(docs))])
                np.testing.assert_allclose(a["value"].to_numpy(), want, rtol=0, atol=0)
                n_tokens = sum(len(item[0]) for lists in s_by_ch[c].values() for side in lists for item in side)
                assert (samples["node_id"] == f"{loc}:{c}").sum() == n_tokens
                assert (snippets["node_id"] == f"{loc}:{c}").any()

        # recompute: final_resid recomputed and agreeing with the stored (plain-torch) numbers; the unknown location skipped
        ab = _table(data, "ablations", run_id)
        assert not ab["location"].eq(UNKNOWN_LOCATION).any()
        fr = ab[(ab["location"] == "final_resid") & (ab["mode"] == "mean")]
        assert len(fr) == len(circuit["final_resid"]) and fr["agrees"].all() and fr["abs_diff"].max() < 1e-5
        assert ab[ab["mode"] == "mean"]["abs_diff"].max() < 1e-5  # every node: the stored numbers came from the same means
        summary_row = _table(data, "recompute_summary", run_id).iloc[0]
        assert summary_row["stored_acts_match"] == "circuit"
        if "unknown" in spec:
            assert UNKNOWN_LOCATION in summary_row["skipped"] and "2 nodes" in summary_row["skipped"]
        else:
            assert pd.isna(summary_row["skipped"])
        # final_resid's full-model activations = the residual after the last block, computed here by the blocks alone
        model = make_model(seed=5)
        with torch.no_grad():
            x = model.transformer.wte(docs) + model.transformer.wpe.weight[: docs.shape[1]]
            for blk in model.transformer.h:
                x = blk(x, None)
        ra = _table(data, "recomputed_activations", run_id)
        for c in circuit["final_resid"]:
            r = ra[ra["node_id"] == f"final_resid:{c}"]
            np.testing.assert_allclose(
                r["full_model"].to_numpy(),
                x[torch.from_numpy(r["doc"].to_numpy().copy()), torch.from_numpy(r["pos"].to_numpy().copy()), c].numpy(),
                atol=1e-5,
            )

    # a pair across layers, into final_resid, is an edge like any other
    edges = _table(data, "edges", "fixture_r/quotes/prune_v4/6")
    into = edges[edges["tgt_location"] == "final_resid"]
    assert len(into) == 1 and into["weight"].iloc[0] == 1.0 and into["src_location"].iloc[0].endswith("resid_delta")


def test_partial_checkpoint_skips_only_the_table_it_cannot_build(release_store, release_data):
    import dagster as dg

    from pipeline.materialize import pipeline_instance

    data, summary = release_data
    assert f"model {PARTIAL_MODEL}" in summary.ok
    for name in ("embeddings", "wte_extremes", "wte_histograms", "vocab"):
        assert len(_table(data, name, PARTIAL_MODEL)), name
    assert not (data / "tables" / "unembed_extremes" / f"{PARTIAL_MODEL}.parquet").exists()
    # The other model's unembed_extremes: the top token of a channel is argmax lm_head[:, c] * ln_f[c].
    model = make_model(seed=5)
    direct = (model.lm_head.weight * model.transformer.ln_f.weight[None, :]).detach().numpy()
    ue = _table(data, "unembed_extremes", RELEASE_MODEL)
    for c in (0, 5):
        top = ue[(ue["channel"] == c) & (ue["side"] == "top") & (ue["rank"] == 0)]
        assert int(top["token_id"].iloc[0]) == int(np.argmax(direct[:, c]))
    # The asset metadata says what was skipped, naming the tensor and the file.
    instance = pipeline_instance(str(data))
    event = instance.get_latest_materialization_event(dg.AssetKey("wte_extremes"))
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("wte_extremes"), asset_partitions=[PARTIAL_MODEL]), limit=1
    )
    meta = records.records[0].asset_materialization.metadata
    skipped = meta["skipped_tables"].value
    assert set(skipped) == {"unembed_extremes"}
    assert "transformer.ln_f.weight" in skipped["unembed_extremes"]
    assert str(release_store / "models" / PARTIAL_MODEL / "final_model.pt") in skipped["unembed_extremes"]
    assert event is not None


# ---- the viewer ------------------------------------------------------------------------------------


@pytest.fixture
def viewer_on(monkeypatch):
    from viewer import queries

    def use(data):
        monkeypatch.setenv("CIRCUITS_DATA", str(data))
        queries.clear_caches()
        queries._checked.clear()

    yield use
    queries.clear_caches()
    queries._checked.clear()


def test_whole_graph_places_final_resid_after_the_last_layer(release_data, viewer_on):
    import math

    from viewer import models, queries

    viewer_on(release_data[0])
    run = "fixture_r/quotes/prune_v4/k_optim"
    nodes = queries.nodes(run)
    layout = models.layout_whole(nodes)
    assert len(layout.node_ids) == len(nodes)  # every node placed
    y = dict(zip(layout.nodes["node_id"].tolist(), layout.nodes["y"].tolist(), strict=True))
    info = {r["node_id"]: r for r in nodes.select("node_id", "half", "location").to_dicts()}
    layered = [y[n] for n in y if info[n]["half"] in ("attn", "mlp")]
    final = [y[n] for n in y if info[n]["location"] == "final_resid"]
    other = [y[n] for n in y if info[n]["location"] == UNKNOWN_LOCATION]
    assert len(final) == 2 and len(other) == 2
    assert min(final) > max(layered) and min(other) > max(final)
    ticks = layout.ticks
    assert ticks[final[0]] == "final_resid" and ticks[other[0]] == f"{UNKNOWN_LOCATION} (other)"
    assert "1.mlp" in ticks.values() and "1.0.mlp" not in ticks.values()
    assert not any(math.isnan(v) for v in y.values())
    # the layer-half picker offers layer-halves only
    assert set(queries.layer_halves("fixture_r/quotes/prune_v4/k_optim")["half"]) <= {"attn", "mlp"}


def _detail(run, node):
    from viewer.state import Explorer
    from viewer.views.detail import DetailView

    state = Explorer()
    state.run, state.node = run, node
    view = DetailView(state)
    view.show()
    return view


def test_final_resid_detail_shows_its_writers_and_the_tokens_it_pushes(release_data, viewer_on):
    from viewer import queries

    data = release_data[0]
    viewer_on(data)
    run = "fixture_r/quotes/prune_v4/6"
    nodes = queries.nodes(run)
    writer = next(n for n in nodes["node_id"] if ".resid_delta:" in n)
    channel = int(writer.rsplit(":", 1)[1])
    view = _detail(run, f"final_resid:{channel}")
    assert "the residual stream after the last block" in view.header.object
    assert writer in view.inputs.object  # the stored edge into it
    out = view.outputs.object
    ue = _table(data, "unembed_extremes", RELEASE_MODEL)
    top = ue[(ue["channel"] == channel) & (ue["side"] == "top") & (ue["rank"] == 0)].iloc[0]
    assert "raises:" in out and f"{top['value']:+.3f}" in out
    assert "span" in view.snippets.object  # its pretraining snippets


def test_detail_says_not_available_without_unembed_extremes(release_data, viewer_on, tmp_path):
    from pipeline.assets.duckdb_views import build_duckdb

    data = tmp_path / "data"
    shutil.copytree(release_data[0] / "tables", data / "tables")
    (data / "tables" / "unembed_extremes" / f"{RELEASE_MODEL}.parquet").unlink()  # as for a checkpoint without ln_f.weight
    build_duckdb(str(data))
    viewer_on(data)
    view = _detail("fixture_r/quotes/prune_v4/6", "final_resid:3")
    assert "not available" in view.outputs.object
    assert "final_resid:3" in view.header.object


def test_docs_location_queries_find_final_resid_and_other(release_store, release_data):
    """The docs/tables.md queries about locations, on the release-variant tables: they find final_resid and "other"."""
    import re
    from pathlib import Path

    import duckdb

    text = (Path(__file__).parent.parent / "docs" / "tables.md").read_text()
    run = "fixture_r/quotes/prune_v4/k_optim"
    qs = [q.replace("csp_yolo1/single_double_quote/prune_v4/k_optim", run) for q in re.findall(r"```sql\n(.*?)```", text, re.S)]
    con = duckdb.connect(str(release_data[0] / "circuits.duckdb"), read_only=True)
    rows = con.execute(next(q for q in qs if "unembed_extremes" in q)).fetchall()
    final = {f"final_resid:{int(c)}" for c in _raw(release_store, run)["circuit_data"]["final_resid"]}
    assert {r[0] for r in rows if r[0].startswith("final_resid:")} == final
    assert all(len([r for r in rows if r[0] == n]) == 10 for n in final)  # 5 per side
    groups = {half: n for half, n, _ in con.execute(next(q for q in qs if "GROUP BY half" in q)).fetchall()}
    assert groups["final"] == len(final) and groups["other"] == 2


def test_bench_store_at_small_widths_materializes_with_recompute(tmp_path):
    """`bench/synthetic.py --store`'s layout at small widths (csp_yolo2's options: RMSNorm, sink,
    concatenated position embedding, bigram table, untied unembedding): every node converts, and the
    recompute runs, its final_resid ablations equal to the reference (one masked forward per node)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
    from synthetic import CSP_YOLO2, MODEL, write_store

    from pipeline.formats import read_viz_data
    from pipeline.materialize import materialize_store
    from pipeline.recompute import MEANS_TOKEN_BUDGET, means_over_sequences, sample_sequences, snippet_sequences
    from pipeline.store_access import load_model, open_store

    cfg = {**CSP_YOLO2, "n_layer": 2, "d_model": 32, "n_head": 4, "d_head": 8, "d_mlp": 64, "block_size": 32, "d_pos_emb": 8}
    store = write_store(tmp_path / "store", n_nodes=34, n_docs=4, ctx=16, config=cfg, density=0.2, log=lambda *_: None)
    data = tmp_path / "data"
    summary = materialize_store(store=str(store), data=str(data), progress=False)
    assert not summary.failed, summary.failed
    run = summary.runs[0]
    viz_path = next((store / "viz").rglob("viz_data.pt"))
    raw = torch.load(viz_path, weights_only=False)
    nodes = _table(data, "nodes", run)
    assert len(nodes) == sum(len(c) for c in raw["circuit_data"].values()) == 34
    assert (nodes["kind"] == "final_resid").sum() == len(raw["circuit_data"]["final_resid"]) == 2
    # the recompute's final_resid ablations vs the reference, on the same model, docs and means
    viz = read_viz_data(viz_path)
    model = load_model(open_store(str(store)), MODEL)
    circuit = {loc: torch.from_numpy(ch) for loc, ch in viz.circuit.items()}
    seqs = sample_sequences(snippet_sequences(viz), MEANS_TOKEN_BUDGET)  # the pipeline's estimator of the means
    means = means_over_sequences(model, seqs, C.circuit_locations(model.config, circuit))[0]
    docs = torch.from_numpy(viz.docs)
    ref = C.ablation_losses(model, docs, {"final_resid": circuit["final_resid"], **circuit}, means)["final_resid"]
    ab = _table(data, "ablations", run)
    got = ab[(ab["location"] == "final_resid") & (ab["mode"] == "mean")].set_index("channel")["recomputed_loss"]
    for i, c in enumerate(viz.circuit["final_resid"].tolist()):
        assert got[c] == pytest.approx(ref[i].item(), abs=1e-4)


def test_skipped_table_replaces_a_stale_file(release_store, release_data, tmp_path):
    """A model-level file of a table the checkpoint can no longer build (written from an earlier one) is removed."""
    import dagster as dg

    from pipeline.assets.discovery import MODELS
    from pipeline.assets.tables import embeddings
    from pipeline.resources import CircuitsResource

    data = tmp_path / "data"
    stale = data / "tables" / "unembed_extremes" / f"{PARTIAL_MODEL}.parquet"
    stale.parent.mkdir(parents=True)
    shutil.copy(release_data[0] / "tables" / "unembed_extremes" / f"{RELEASE_MODEL}.parquet", stale)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(MODELS.name, [PARTIAL_MODEL])
        result = dg.materialize(
            [embeddings],
            partition_key=PARTIAL_MODEL,
            instance=instance,
            resources={"circuits": CircuitsResource.from_env(store_url=str(release_store), data=str(data))},
        )
    assert result.success
    assert not stale.exists()
    assert (data / "tables" / "wte_extremes" / f"{PARTIAL_MODEL}.parquet").exists()


def test_recompute_of_a_circuit_with_only_unknown_locations_skips_them(release_store):
    from pipeline.convert import RunRef
    from pipeline.formats import UnknownLocationWarning, parse_viz_data
    from pipeline.recompute import recompute, recompute_tables
    from pipeline.store_access import load_model, open_store

    run = "fixture_r/quotes/prune_v4/k_optim"
    raw = _raw(release_store, run)
    keep = UNKNOWN_LOCATION
    raw["circuit_data"] = {keep: raw["circuit_data"][keep]}
    imp = raw["importances"]
    imp["ch_interv_losses"] = {keep: imp["ch_interv_losses"][keep]}
    imp["pair_data"] = imp["pair_data_connections"] = []
    with pytest.warns(UnknownLocationWarning):
        viz = parse_viz_data(raw, "only-unknown.pkl")
    model = load_model(open_store(str(release_store)), RELEASE_MODEL)
    r = recompute(model, viz)
    tables = recompute_tables(viz, RunRef(*run.split("/"), "x"), r, 0.5, 1e-3, "cpu")
    assert tables["ablations"].num_rows == 0
    assert sum(t.num_rows for t in tables["recomputed_activations"]) == 0
    assert "2 nodes" in tables["recompute_summary"].column("skipped")[0].as_py()
