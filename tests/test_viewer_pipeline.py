"""The viewer on the tables the real pipeline writes (fixture `circuits_data`: a fixture store in the released
format, materialized by `pipeline.materialize`). Expected values are read from the Parquet files with pyarrow."""

from __future__ import annotations

import html
import os

import pyarrow.dataset as ds
import pytest


@pytest.fixture(scope="module")
def pipeline_data(circuits_data):
    old = os.environ.get("CIRCUITS_DATA")
    os.environ["CIRCUITS_DATA"] = str(circuits_data)
    yield circuits_data
    if old is None:
        os.environ.pop("CIRCUITS_DATA", None)
    else:
        os.environ["CIRCUITS_DATA"] = old


def read(data, table):
    return ds.dataset(str(data / "tables" / table), format="parquet").to_table().to_pandas()


def test_every_run_opens_and_a_click_shows_its_node(pipeline_data):
    from viewer import queries
    from viewer.app import create_app

    runs = read(pipeline_data, "runs")
    nodes = read(pipeline_data, "nodes")
    samples = read(pipeline_data, "samples")
    assert sorted(queries.runs()["run_id"]) == sorted(runs["run_id"])
    for run_id in runs["run_id"]:
        page = create_app(url={"run": run_id})
        app = page.explorer
        assert app.state.notes == []
        # opens on the layer-half with the most nodes (counted from the nodes table), ties to the earliest
        mine = nodes[(nodes["run_id"] == run_id) & nodes["half"].isin(["attn", "mlp"])]
        counts = mine.groupby(["layer", "half"]).size().reset_index(name="n").sort_values(["layer", "half"], kind="stable")
        top = counts[counts["n"] == counts["n"].max()].iloc[0]
        assert app.state.layer == f"{int(top['layer'])}.{top['half']}"
        n_nodes = int((nodes["run_id"] == run_id).sum())
        assert f"<b>{n_nodes}</b> nodes" in app.summary.object
        # Click the node with the most snippets in the shown layer-half.
        shown = [n for n in app.graph.nodes.data["node_id"] if not n.endswith(":bias")]
        want = set(
            nodes[(nodes["run_id"] == run_id) & (nodes["layer"].astype(str) + "." + nodes["half"] == app.state.layer)]["node_id"]
        )
        assert set(shown) == want
        node_id = shown[0]
        app.graph.nodes.selected.indices = [list(app.graph.nodes.data["node_id"]).index(node_id)]
        assert app.state.node == node_id
        assert html.escape(node_id) in app.detail.header.object
        mine_s = samples[(samples["run_id"] == run_id) & (samples["node_id"] == node_id)]
        if len(mine_s):
            assert app.detail.snippets.object.count('c" title=') == mine_s[mine_s["rank"] < 5]["is_center"].sum()
        app.detail.inner_tabs.active = 1
        assert "doc 0 · class 1" in app.detail.task.object


def test_pipeline_tabs_render(pipeline_data):
    from viewer import queries
    from viewer.app import create_app

    runs = read(pipeline_data, "runs")
    run_id = runs["run_id"].iloc[0]
    nodes = read(pipeline_data, "nodes")
    resid = nodes[(nodes["run_id"] == run_id) & nodes["kind"].isin(["act_in", "resid_delta"])]
    app = create_app(url={"run": run_id, "node": resid["node_id"].iloc[0]}).explorer
    app.detail_tabs.active = 1
    assert app.embeddings.channel.value == int(resid["channel"].iloc[0])
    emb = read(pipeline_data, "embeddings")
    col = emb[
        (emb["matrix"] == "wte") & (emb["channel"] == int(resid["channel"].iloc[0])) & (emb["model"] == runs["model"].iloc[0])
    ]
    assert int(sum(app.embeddings.hist_source.data["top"])) == len(col)
    app.detail_tabs.active = 2
    lak = read(pipeline_data, "loss_at_k")
    r = runs.iloc[0]
    assert len(app.curves.k_plot.data[0]["k_label"]) == int(
        ((lak["model"] == r["model"]) & (lak["task"] == r["task"]) & (lak["sweep"] == r["sweep"])).sum()
    )
    other = [x for x in runs["run_id"] if x != run_id][0]
    app.state.compare = other
    app.detail_tabs.active = 3
    a = set(nodes[nodes["run_id"] == run_id]["node_id"])
    b = set(nodes[nodes["run_id"] == other]["node_id"])
    assert f"shared <b>{len(a & b)}</b>" in app.compare.summary.object
    # q/k/v attention pattern on a real circuit, when it has a q node.
    q = nodes[(nodes["run_id"] == run_id) & (nodes["kind"] == "q")]
    if len(q):
        app.detail_tabs.active = 0
        app.detail.inner_tabs.active = 2
        app.state.node = q["node_id"].iloc[0]
        assert "head" in app.detail.attn_note.object
    assert queries.ablations(run_id) is not None


def test_pipeline_derived_tables(pipeline_data):
    """`snippets`, `wte_extremes`, `wte_histograms` as the pipeline wrote them, against the base tables (computed here)."""
    import numpy as np
    import pandas as pd

    s = read(pipeline_data, "samples")
    s = s[s["rank"] < 5]
    keys = ["run_id", "node_id", "frac", "side", "rank"]
    centres = s[s["is_center"]].groupby(keys)["pos"].min().rename("centre").reset_index()
    want = s.merge(centres, on=keys)
    want = (
        want[(want["pos"] - want["centre"]).abs() <= 50].drop(columns="centre").sort_values([*keys, "pos"]).reset_index(drop=True)
    )
    got = read(pipeline_data, "snippets").sort_values([*keys, "pos"]).reset_index(drop=True)
    assert len(want) > 0
    pd.testing.assert_frame_equal(got[want.columns], want, check_dtype=False)

    emb = read(pipeline_data, "embeddings")
    ext, hist = read(pipeline_data, "wte_extremes"), read(pipeline_data, "wte_histograms")
    wte = emb[(emb["matrix"] == "wte") & (emb["value"] != 0)]
    assert set(hist["channel"]) == set(wte["channel"])
    for (model, channel), col in list(wte.groupby(["model", "channel"]))[:50]:
        top = col.sort_values(["value", "row"], ascending=[False, True]).head(20)["row"].tolist()
        bottom = col.sort_values(["value", "row"]).head(20)["row"].tolist()
        mine = ext[(ext["model"] == model) & (ext["channel"] == channel)]
        assert mine[mine["side"] == "top"].sort_values("rank")["token_id"].tolist() == top
        assert mine[mine["side"] == "bottom"].sort_values("rank")["token_id"].tolist() == bottom
        counts, _ = np.histogram(col["value"].to_numpy(np.float64), bins=30)
        h = hist[(hist["model"] == model) & (hist["channel"] == channel)].sort_values("bin")
        assert h["count"].tolist() == counts.tolist()


def test_pipeline_unembed_extremes_from_the_checkpoint(pipeline_data, viz_store):
    """`unembed_extremes` as the pipeline wrote it, against lm_head.weight[:, c] * ln_f.weight[c] read
    here from each model's checkpoint with plain torch.load."""
    import numpy as np
    import torch

    ext = read(pipeline_data, "unembed_extremes")
    models = sorted(set(ext["model"]))
    assert models
    for model in models:
        sd = torch.load(viz_store / "models" / model / "final_model.pt", map_location="cpu", weights_only=True)
        sd = sd.get("model", sd) if isinstance(sd, dict) else sd
        direct = sd["lm_head.weight"].float().numpy() * sd["transformer.ln_f.weight"].float().numpy()[None, :]
        mine = ext[ext["model"] == model]
        assert set(mine["channel"]) == {c for c in range(direct.shape[1]) if np.any(direct[:, c])}
        for c in range(direct.shape[1]):
            ids = np.flatnonzero(direct[:, c])
            if not ids.size:
                continue
            ch = mine[mine["channel"] == c]
            for side, order in (("top", np.lexsort((ids, -direct[ids, c]))), ("bottom", np.lexsort((ids, direct[ids, c])))):
                got = ch[ch["side"] == side].sort_values("rank")
                assert got["token_id"].tolist() == ids[order][:20].tolist()
                np.testing.assert_allclose(got["value"].to_numpy(), direct[ids[order][:20], c], rtol=1e-6)
