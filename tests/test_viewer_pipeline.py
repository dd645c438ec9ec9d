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
    layers = read(pipeline_data, "layer_ablations")
    samples = read(pipeline_data, "samples")
    assert sorted(queries.runs()["run_id"]) == sorted(runs["run_id"])
    for run_id in runs["run_id"]:
        page = create_app(url={"run": run_id})
        app = page.explorer
        assert app.state.notes == []
        mine = layers[layers["run_id"] == run_id].sort_values(["layer", "half"])
        marked = mine[mine["delta_corrected"] > 0.3]
        assert app.state.layer == (marked if len(marked) else mine)["layer_half"].iloc[0]
        n_nodes = int((nodes["run_id"] == run_id).sum())
        assert f"<b>{n_nodes}</b> nodes" in app.summary.object
        # Click the node with the most snippets in the shown layer-half.
        shown = [n for n in app.graph.nodes.data["node_id"] if not n.endswith(":bias")]
        want = set(nodes[(nodes["run_id"] == run_id) & (nodes["layer"].astype(str) + "." + nodes["half"] == app.state.layer)]["node_id"])
        assert set(shown) == want
        node_id = shown[0]
        app.graph.nodes.selected.indices = [list(app.graph.nodes.data["node_id"]).index(node_id)]
        assert app.state.node == node_id
        assert html.escape(node_id) in app.detail.header.object
        mine_s = samples[(samples["run_id"] == run_id) & (samples["node_id"] == node_id)]
        if len(mine_s):
            assert app.detail.snippets.object.count('class="tok center"') == mine_s[mine_s["rank"] < 5]["is_center"].sum()
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
    col = emb[(emb["matrix"] == "wte") & (emb["channel"] == int(resid["channel"].iloc[0])) & (emb["model"] == runs["model"].iloc[0])]
    assert int(sum(app.embeddings.hist_source.data["top"])) == len(col)
    app.detail_tabs.active = 2
    lak = read(pipeline_data, "loss_at_k")
    r = runs.iloc[0]
    assert len(app.curves.k_source.data["k_label"]) == int(((lak["model"] == r["model"]) & (lak["task"] == r["task"])
                                                          & (lak["sweep"] == r["sweep"])).sum())
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
        app.state.node = q["node_id"].iloc[0]
        assert app.detail.attn.visible
        assert "head" in app.detail.attn_note.object
    assert queries.ablations(run_id) is not None
