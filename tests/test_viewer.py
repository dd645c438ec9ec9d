"""Viewer: queries against small contract tables (checked by independent computation), the app built in-process."""

from __future__ import annotations

import contextlib
import io
import math
import os
import re

import numpy as np
import pandas as pd
import pytest
from viewer_tables import Scale, vocab_texts, write_contract_tables

RUN = "toy/quotes/sweep1/8"


@contextlib.contextmanager
def data_dir(path):
    old = os.environ.get("CIRCUITS_DATA")
    os.environ["CIRCUITS_DATA"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CIRCUITS_DATA", None)
        else:
            os.environ["CIRCUITS_DATA"] = old


@pytest.fixture(scope="module")
def viewer_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("viewer_data")
    truth = write_contract_tables(str(root))
    with data_dir(root):
        yield root, truth


def table(truth, name) -> pd.DataFrame:
    import pyarrow as pa

    return pa.concat_tables(truth.tables[name]).to_pandas()


# --- queries ----------------------------------------------------------------------------------


def test_viewer_tables_are_the_tables_its_sql_reads():
    """queries.VIEWER_TABLES (the one list; the contract tables build their views from it) names exactly the
    tables the viewer's SQL reads, and each is a table the pipeline writes."""
    import inspect

    from pipeline.tables import SCHEMAS
    from viewer import queries

    src = inspect.getsource(queries)
    read = set(re.findall(r"\b(?:FROM|JOIN)\s+([A-Za-z_]\w*)", src))
    read -= set(re.findall(r"\b(\w+)\s+AS\s+\(", src))  # the statements' own CTEs
    read -= {"information_schema"}
    assert read == set(queries.VIEWER_TABLES)
    assert set(queries.VIEWER_TABLES) <= set(SCHEMAS)


def test_runs_in_k_order_with_counts(viewer_data):
    from viewer import queries

    _, truth = viewer_data
    runs = queries.runs().to_pandas()
    quotes = runs[runs["task"] == "quotes"]["k_label"].tolist()
    assert quotes == ["8", "16"]  # numeric order, not "16" < "8"
    for r in truth.runs:
        got = runs[runs["run_id"] == r["run_id"]].iloc[0]
        assert got["n_nodes"] == len(truth.nodes[r["run_id"]])
        assert got["interv_loss"] == pytest.approx(r["interv_loss_raw"] * 0.5)


def test_layer_halves_deltas_counts_and_marks(viewer_data):
    from viewer import models

    _, truth = viewer_data
    got = models.layer_halves(RUN).to_pandas().set_index("layer_half")
    la = table(truth, "layer_ablations")
    la = la[la["run_id"] == RUN].set_index("layer_half")
    for lh, row in la.iterrows():
        # delta: both terms corrected; delta_released: the released viewer's reading
        assert got.loc[lh, "delta"] == pytest.approx(row["delta"])
        assert got.loc[lh, "delta_released"] == pytest.approx(row["delta_released"])
        count = sum(1 for n in truth.nodes[RUN] if f"{n['layer']}.{n['half']}" == lh)
        assert got.loc[lh, "n_nodes"] == count
        assert bool(got.loc[lh, "marked"]) == (row["delta"] > 0.3)
    expected = sorted(lh for lh, row in la.iterrows() if row["delta"] > 0.3)
    assert sorted(got.index[got["marked"]]) == expected
    assert expected, "the fixture should mark at least one layer-half"


def test_nodes_and_edges_of_a_layer_half(viewer_data):
    from viewer import queries

    _, truth = viewer_data
    got = queries.nodes(RUN, "1.attn").to_pandas()
    want = {n["node_id"] for n in truth.nodes[RUN] if n["layer"] == 1 and n["half"] == "attn"}
    assert set(got["node_id"]) == want
    edges = table(truth, "edges")
    want_e = edges[(edges["run_id"] == RUN) & edges["tgt_location"].str.startswith("1.attn.")]
    got_e = queries.edges(RUN, "1.attn").to_pandas()
    assert sorted(zip(got_e["src_node_id"], got_e["tgt_node_id"], strict=True)) == sorted(
        zip(want_e["src_node_id"], want_e["tgt_node_id"], strict=True)
    )


def test_connections_are_the_nodes_column_and_row(viewer_data):
    from viewer import models

    _, truth = viewer_data
    edges = table(truth, "edges")
    edges = edges[edges["run_id"] == RUN]
    node_id = edges["tgt_node_id"].iloc[0]
    inputs, outputs = (df.to_pandas() for df in models.connections(RUN, node_id))
    assert set(inputs["src_node_id"]) == set(edges[edges["tgt_node_id"] == node_id]["src_node_id"])
    assert set(outputs["tgt_node_id"]) == set(edges[edges["src_node_id"] == node_id]["tgt_node_id"])
    strengths = inputs["strength"].abs().tolist()
    assert strengths == sorted(strengths, reverse=True)


def test_samples_first_five_and_fifty_either_side(viewer_data):
    from viewer import models

    _, truth = viewer_data
    node_id = truth.nodes[RUN][5]["node_id"]
    got = models.snippets(RUN, node_id).to_pandas()
    s = table(truth, "samples")
    s = s[(s["run_id"] == RUN) & (s["node_id"] == node_id)]
    vocab = dict(zip(table(truth, "vocab")["token_id"], table(truth, "vocab")["text"], strict=True))
    assert set(got["rank"]) == set(range(5))
    for (frac, side, rank), snip in s.groupby(["frac", "side", "rank"]):
        if rank >= 5:
            continue
        centre = int(snip[snip["is_center"]]["pos"].iloc[0])
        want = snip[(snip["pos"] - centre).abs() <= 50].sort_values("pos")
        have = got[(got["frac"] == frac) & (got["side"] == side) & (got["rank"] == rank)]
        assert have["pos"].tolist() == want["pos"].tolist()
        assert have["text"].tolist() == [vocab[t] for t in want["token_id"]]
        np.testing.assert_allclose(have["value"], want["value"], rtol=1e-6)


def test_activation_matrix_matches_the_table(viewer_data):
    from viewer import models

    _, truth = viewer_data
    node_id = truth.nodes[RUN][2]["node_id"]
    m = models.activation_matrix(RUN, node_id)
    a = table(truth, "activations")
    a = a[(a["run_id"] == RUN) & (a["node_id"] == node_id)]
    docs = table(truth, "task_docs")
    docs = docs[docs["run_id"] == RUN]
    assert m.shape == (len(docs), docs["length"].max())
    for row in a.itertuples():
        assert m[row.doc, row.pos] == pytest.approx(row.value)
    for d in docs.itertuples():
        assert np.isnan(m[d.doc, d.length :]).all()


def test_head_attention_pattern_independent(viewer_data):
    """The head pattern from the stored q/k channels, computed here with plain loops over the raw table."""
    from viewer import models, queries

    _, truth = viewer_data
    q_nodes = [n for n in truth.nodes[RUN] if n["kind"] == "q"]
    k_nodes = [n for n in truth.nodes[RUN] if n["kind"] == "k"]
    # A head that has a head_channel in both q and k (the generator picks 3 of 8 channels; find one).
    found = None
    for qn in q_nodes:
        for kn in k_nodes:
            if (qn["layer"], qn["head"], qn["head_channel"]) == (kn["layer"], kn["head"], kn["head_channel"]):
                found = qn
    if found is None:
        pytest.skip("generator drew no shared q/k channel")
    layer, head, doc = found["layer"], found["head"], 1
    docs = table(truth, "task_docs")
    length = int(docs[(docs["run_id"] == RUN) & (docs["doc"] == doc)]["length"].iloc[0])
    acts = table(truth, "activations")
    acts = acts[(acts["run_id"] == RUN) & (acts["doc"] == doc)]

    def vec(n):
        a = acts[acts["node_id"] == n["node_id"]].sort_values("pos")
        return a["value"].to_numpy(float)

    q = {n["head_channel"]: vec(n) for n in q_nodes if n["layer"] == layer and n["head"] == head}
    k = {n["head_channel"]: vec(n) for n in k_nodes if n["layer"] == layer and n["head"] == head}
    d_head = 4
    want = np.full((length, length), np.nan)
    for t in range(length):
        scores = [sum(q[c][t] * k[c][s] for c in q if c in k) / math.sqrt(d_head) for s in range(t + 1)]
        z = sum(math.exp(x) for x in scores)
        want[t, : t + 1] = [math.exp(x) / z for x in scores]
    qm, km = models.qk_matrices(queries.head_qk(RUN, layer, head, doc), length)
    got = models.head_pattern(qm, km, models.model_config(RUN)["d_head"], length)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    c = found["head_channel"]
    ch = models.channel_pattern(qm[c], km[c], d_head)
    assert ch[length - 1, 0] == pytest.approx(math.exp(q[c][length - 1] * k[c][0] / 2))
    assert np.isnan(ch[0, 1])


def test_compare_and_residual_links(viewer_data):
    from viewer import queries

    _, truth = viewer_data
    other = "toy/quotes/sweep1/16"
    a = {n["node_id"] for n in truth.nodes[RUN]}
    b = {n["node_id"] for n in truth.nodes[other]}
    df = queries.compare(RUN, other).to_pandas()
    assert set(df[df["status"] == "shared"]["node_id"]) == a & b
    assert set(df[df["status"] == "only A"]["node_id"]) == a - b
    assert set(df[df["status"] == "only B"]["node_id"]) == b - a
    links = queries.residual_links(RUN).to_pandas()
    order = {"attn": 0, "mlp": 1}
    want = {
        (w["node_id"], r["node_id"])
        for w in truth.nodes[RUN]
        for r in truth.nodes[RUN]
        if w["kind"] == "resid_delta"
        and r["kind"] == "act_in"
        and w["channel"] == r["channel"]
        and (r["layer"], order[r["half"]]) > (w["layer"], order[w["half"]])
    }
    assert set(zip(links["src_node_id"], links["tgt_node_id"], strict=True)) == want


def expected_wte(entries: pd.DataFrame, channel: int):
    """Top / bottom 20 nonzero weights and the 30-bin histogram of one wte channel, computed here with pandas/numpy."""
    col = entries[(entries["matrix"] == "wte") & (entries["channel"] == channel) & (entries["value"] != 0)]
    top = col.sort_values(["value", "row"], ascending=[False, True]).head(20)
    bottom = col.sort_values(["value", "row"]).head(20)
    counts, edges = np.histogram(col["value"].to_numpy(np.float64), bins=30) if len(col) else (np.zeros(0), np.zeros(1))
    return top, bottom, counts, edges


def test_wte_extremes_and_histograms(viewer_data):
    """The derived tables (written by pipeline.derived from the dense wte) against the nonzero entries of `embeddings`."""
    from viewer import models, queries

    _, truth = viewer_data
    e = table(truth, "embeddings")
    vocab = dict(zip(table(truth, "vocab")["token_id"], table(truth, "vocab")["text"], strict=True))
    for channel in (0, 1, 3):
        top, bottom, counts, edges = expected_wte(e, channel)
        got = models.wte_extremes("toy", channel).to_pandas()
        got_top, got_bottom = got[got["side"] == "top"], got[got["side"] == "bottom"]
        assert got_top["token_id"].tolist() == top["row"].tolist()
        assert got_bottom["token_id"].tolist() == bottom["row"].tolist()
        np.testing.assert_allclose(got_top["value"], top["value"], rtol=1e-6)
        assert got_top["text"].tolist() == [vocab[t] for t in top["row"]]
        hist = queries.wte_histogram("toy", channel).to_pandas()
        np.testing.assert_array_equal(hist["count"], counts)
        if len(counts):
            np.testing.assert_allclose(hist["bin_left"], edges[:-1])
            np.testing.assert_allclose(hist["bin_right"], edges[1:])
    assert queries.wte_histogram("toy", 1).is_empty() and queries.wte_extremes("toy", 1).is_empty()  # channel 1 is all zero
    img, channels, _ = models.wpe_image(queries.embedding_matrix("toy", "wpe"))
    wpe = e[e["matrix"] == "wpe"]
    assert channels == sorted(wpe["channel"].unique().tolist()) and 1 not in channels  # channel 1 is all zero
    assert img.shape == (wpe["row"].max() + 1, len(channels))


def test_snippets_table_is_the_cut_of_samples(viewer_data):
    """The derived `snippets` table (read back from its files) holds exactly the rows of `samples` that the viewer shows."""
    import pyarrow.dataset as ds

    root, truth = viewer_data
    s = table(truth, "samples")
    s = s[s["rank"] < 5]
    centres = s[s["is_center"]].groupby(["run_id", "node_id", "frac", "side", "rank"])["pos"].min().rename("centre").reset_index()
    want = s.merge(centres, on=["run_id", "node_id", "frac", "side", "rank"])
    want = want[(want["pos"] - want["centre"]).abs() <= 50].drop(columns="centre")
    got = ds.dataset(str(root / "tables" / "snippets"), format="parquet").to_table().to_pandas()
    keys = ["run_id", "node_id", "frac", "side", "rank", "pos"]
    want, got = want.sort_values(keys).reset_index(drop=True), got.sort_values(keys).reset_index(drop=True)
    assert len(got) == len(want) and len(got) < len(s)
    pd.testing.assert_frame_equal(got[want.columns], want, check_dtype=False)


def test_replaced_database_is_reread(tmp_path, monkeypatch):
    """The pipeline replaces circuits.duckdb by rename: the viewer must not answer from the old file or cache."""
    from viewer import models, queries

    monkeypatch.setattr(queries, "RECHECK_SECONDS", 0.0)  # re-read the file's identity on every query
    with data_dir(tmp_path):
        first = write_contract_tables(str(tmp_path), Scale(snippet_len=8, snippets_per_list=1), seed=1)
        assert models.run(RUN)["loss_raw"] == pytest.approx(next(r for r in first.runs if r["run_id"] == RUN)["loss_raw"])
        second = write_contract_tables(str(tmp_path), Scale(snippet_len=8, snippets_per_list=1), seed=2)
        assert models.run(RUN)["loss_raw"] == pytest.approx(next(r for r in second.runs if r["run_id"] == RUN)["loss_raw"])


# --- the app, in-process ----------------------------------------------------------------------


def most_nodes_layer_half(node_rows) -> str:
    """The layer-half with the most nodes, ties to the earliest (layer, then attn before mlp), counted from the rows."""
    counts: dict = {}
    for n in sorted(node_rows, key=lambda n: (n["layer"], ("attn", "mlp").index(n["half"]))):
        if n["half"] in ("attn", "mlp"):
            counts[f"{n['layer']}.{n['half']}"] = counts.get(f"{n['layer']}.{n['half']}", 0) + 1
    return max(counts, key=lambda lh: (counts[lh], -list(counts).index(lh)))


def test_default_layer_is_the_layer_half_with_most_nodes():
    import polars as pl

    from viewer.models import default_layer

    def layers(counts):
        return pl.DataFrame({"layer_half": ["0.attn", "0.mlp", "1.attn", "1.mlp"], "n_nodes": counts})

    # the quote circuit of the demo store: a few nodes in 0.attn, most of the circuit in 1.attn
    assert default_layer(layers([3, 2, 15, 4])) == "1.attn"
    assert default_layer(layers([3, 9, 9, 4])) == "0.mlp"  # a tie: the earliest
    assert default_layer(layers([None, 1, None, 0])) == "0.mlp"  # no count (no layer_ablations row) counts as none


def test_app_opens_where_most_of_the_circuit_is(tmp_path):
    """A circuit of a few nodes in its first layer-halves and most in 1.attn (like the demo store's quote circuit)
    opens on 1.attn: not the first layer-half (0.attn), nor the first marked one (0.mlp, delta > 0.3)."""
    from viewer.app import create_app

    per_half = {"0.attn": 1, "0.mlp": 1, "1.attn": 3, "1.mlp": 2}  # per location: 5, 3, 15 and 6 nodes
    truth = write_contract_tables(
        str(tmp_path), Scale(snippet_len=8, snippets_per_list=1), runs=[("toy", "skewed", "s", "8", per_half)]
    )
    run = "toy/skewed/s/8"
    assert most_nodes_layer_half(truth.nodes[run]) == "1.attn"
    with data_dir(tmp_path):
        app = create_app(url={"run": run}).explorer
        assert app.state.layer == "1.attn"
        assert "★" in [k for k, v in app.layer.options.items() if v == "0.mlp"][0]
        assert create_app(url={"run": run, "layer": "0.attn"}).explorer.state.layer == "0.attn"  # the URL's layer wins


def test_app_opens_on_the_layer_half_with_most_nodes_and_click_shows_node(viewer_data):
    from viewer import models
    from viewer.app import create_app

    _, truth = viewer_data
    for run in truth.nodes:
        assert create_app(url={"run": run}).explorer.state.layer == most_nodes_layer_half(truth.nodes[run])
    assert create_app(url={"run": RUN, "layer": "1.mlp"}).explorer.state.layer == "1.mlp"  # a layer the URL names wins
    page = create_app(url={"run": RUN})
    app = page.explorer
    assert app.state.layer == "0.attn"  # 15 nodes, as 1.attn: the earliest; not the first marked one (0.mlp, delta > 0.3)
    assert "★" in [k for k, v in app.layer.options.items() if v == "0.mlp"][0]
    want = {n["node_id"] for n in truth.nodes[RUN] if n["layer"] == 0 and n["half"] == "attn"}
    shown = set(app.graph.nodes.data["node_id"])
    assert want <= shown and all(n.endswith(":bias") for n in shown - want)
    assert f"<b>{len(truth.nodes[RUN])}</b> nodes" in app.summary.object

    # Pick another layer, then tap a node (as the browser's TapTool does).
    app.layer.value = "1.attn"
    ids = app.graph.nodes.data["node_id"]
    i = next(i for i, n in enumerate(ids) if ".attn.q:" in n)
    app.graph.nodes.selected.indices = [i]
    node_id = ids[i]
    assert app.state.node == node_id
    assert list(app.graph.nodes.selected.indices) == [i]  # the graph outlines the tapped node (its selection)
    assert node_id in app.detail.header.object
    s = table(truth, "samples")
    s = s[(s["run_id"] == RUN) & (s["node_id"] == node_id) & (s["rank"] == 0) & (s["frac"] == 0.5) & (s["side"] == "top")]
    centre = int(s[s["is_center"]]["pos"].iloc[0])
    vocab = dict(zip(table(truth, "vocab")["token_id"], table(truth, "vocab")["text"], strict=True))
    import html

    centre_text = html.escape(vocab[int(s[s["pos"] == centre]["token_id"].iloc[0])])
    assert re.search(
        f'<span class="(p[0-9]+ |n[0-9]+ | )c" title=[^>]*>{re.escape(centre_text)}</span>', app.detail.snippets.object
    )
    app.detail.inner_tabs.active = 2  # a q node: its head's attention pattern
    node = models.node(RUN, node_id)
    assert f"layer 1 head {int(node['head'])}, doc 0" in app.detail.attn_note.object
    assert app.url_state.node == node_id and app.url_state.layer == "1.attn"


def test_threshold_hides_weak_edges(viewer_data):
    from viewer.app import create_app

    _, truth = viewer_data
    app = create_app(url={"run": RUN, "layer": "1.attn"}).explorer
    edges = table(truth, "edges")
    e = edges[(edges["run_id"] == RUN) & edges["tgt_location"].str.startswith("1.attn.")]
    mag = e["strength"].abs()
    for thr in (0.0, 0.5, 0.9):
        app.threshold.value = thr
        assert len(app.graph.edges.data["x0"]) == int((mag >= thr * mag.max()).sum())


def test_pick_run_toggle_pins_export(viewer_data):
    from viewer.app import create_app
    from viewer.views.export import to_bytes

    _, truth = viewer_data
    app = create_app(url={"run": RUN}).explorer
    app.k.value = "16"
    assert app.state.run == "toy/quotes/sweep1/16"
    assert f"<b>{len(truth.nodes['toy/quotes/sweep1/16'])}</b> nodes" in app.summary.object
    app.task.value = "brackets"
    assert app.state.run == "toy/brackets/sweep1/8"
    node_id = truth.nodes["toy/brackets/sweep1/8"][0]["node_id"]
    app.node.value = node_id
    # the graph follows the picked node into its layer-half and outlines it (selects it)
    assert [app.graph.nodes.data["node_id"][i] for i in app.graph.nodes.selected.indices] == [node_id]
    assert app.detail.task.object == ""  # the task docs render only when their tab is open
    app.detail.inner_tabs.active = 1
    before = app.detail.task.object
    assert node_id.split(":")[0] not in before and "doc 0 · class 1" in before
    app.state.zero_centred = False
    assert app.detail.task.object != before and "min" in app.detail.task.object
    app.pin_label.value = "quote detector"
    app.pin.clicks += 1
    assert app.state.pins == {node_id: "quote detector"}
    assert "quote detector" in app.url_state.pins
    from viewer.models import nodes_export

    df = pd.read_parquet(to_bytes(nodes_export(app.state.run, app.state.pins), "parquet"))
    assert df.set_index("node_id").loc[node_id, "pin_label"] == "quote detector"
    assert len(df) == len(truth.nodes["toy/brackets/sweep1/8"])
    # the pipeline's recomputed deltas ride along, with their standard errors (0: every pair ablated)
    assert {"recomputed_delta", "recomputed_delta_se", "agrees"} <= set(df.columns) and (df["recomputed_delta_se"] == 0).all()
    csv = pd.read_csv(io.BytesIO(to_bytes(nodes_export(app.state.run, app.state.pins), "csv").read()))
    assert len(csv) == len(df)


def test_other_tabs_render(viewer_data):
    from viewer.app import create_app

    _, truth = viewer_data
    node = next(n for n in truth.nodes[RUN] if n["kind"] == "resid_delta")
    app = create_app(url={"run": RUN, "node": node["node_id"], "compare": "toy/quotes/sweep1/16"}).explorer
    app.detail_tabs.active = 1
    assert app.embeddings.channel.value == node["channel"]
    assert len(app.embeddings.hist_source.data["top"]) == 30
    app.detail_tabs.active = 2
    lak, shown_run, unpruned = app.curves.k_plot.data
    assert lak["k_label"].to_list() == ["8", "16"] and shown_run == RUN
    assert unpruned == pytest.approx(next(r for r in truth.runs if r["run_id"] == RUN)["loss"])
    app.detail_tabs.active = 3
    assert "shared" in app.compare.summary.object
    app.graph_tabs.active = 1
    assert len(app.whole.nodes.data["node_id"]) == len(truth.nodes[RUN])
    assert any(
        ".resid_delta:" in s and ".act_in:" in t
        for s, t in zip(app.whole.edges.data["src"], app.whole.edges.data["tgt"], strict=True)
    )


def test_hostile_url_values_fall_back_with_notes(viewer_data):
    from viewer import queries
    from viewer.app import create_app

    n_runs = len(queries.runs())
    page = create_app(
        url={
            "run": "x' OR 1=1; DROP VIEW runs; --",
            "layer": "9.attn'--",
            "node": '"; SELECT 1',
            "threshold": "1e999",
            "pins": '{"nope": "x"}',
            "compare": "'; --",
        }
    )
    state = page.explorer.state
    assert state.run == queries.runs()["run_id"][0]
    assert state.node == "" and state.pins == {} and state.compare == "" and state.threshold == 0.1
    assert len(state.notes) == 6
    assert page.explorer.notes.div.visible and "Unknown run" in page.explorer.notes.object
    assert len(queries.runs()) == n_runs


def test_missing_tables_page(tmp_path):
    from viewer.app import create_app

    with data_dir(tmp_path / "nothing"):
        page = create_app()
        text = page.main[0].object
        assert "circuits materialize" in text and "does not exist" in text
        partial = tmp_path / "partial"
        write_contract_tables(str(partial), Scale(snippet_len=8, snippets_per_list=1), skip=("runs",))
    with data_dir(partial):
        text = create_app().main[0].object
        assert "circuits materialize" in text and "runs" in text


def test_layer_half_layout_rows_and_heads(viewer_data):
    """Rows per location; a head's q, k and v line up and heads do not overlap."""
    from viewer import queries
    from viewer.models import ROWS, layout_layer_half

    _, truth = viewer_data
    nodes = [n for n in truth.nodes[RUN] if n["layer"] == 1 and n["half"] == "attn"]
    layout = layout_layer_half(queries.nodes(RUN, "1.attn"), None, "attn")
    pos = pd.DataFrame(layout.nodes).set_index("node_id")
    for n in nodes:
        assert pos.loc[n["node_id"], "y"] == ROWS["attn"].index(n["kind"])
    for kind in ROWS["attn"]:
        xs = [pos.loc[n["node_id"], "x"] for n in nodes if n["kind"] == kind]
        assert len(set(xs)) == len(xs)  # no two nodes of a row on top of each other
        if kind not in ("q", "k", "v"):
            assert sum(xs) == pytest.approx(0)  # centred
    qkv = [n for n in nodes if n["kind"] in ("q", "k", "v")]
    for kind in ("q", "k", "v"):  # within a head and kind, channels left to right in head_channel order
        for head in {n["head"] for n in qkv}:
            mine = sorted((n for n in qkv if n["kind"] == kind and n["head"] == head), key=lambda n: n["head_channel"])
            xs = [pos.loc[n["node_id"], "x"] for n in mine]
            assert xs == sorted(xs)
            if mine:  # the first channel of every kind starts at the head's left edge
                left = min(pos.loc[m["node_id"], "x"] for m in qkv if m["head"] == head)
                assert xs[0] == left
    heads = sorted({n["head"] for n in qkv})
    for a, b in zip(heads, heads[1:], strict=False):
        right_a = max(pos.loc[n["node_id"], "x"] for n in qkv if n["head"] == a)
        left_b = min(pos.loc[n["node_id"], "x"] for n in qkv if n["head"] == b)
        assert left_b >= right_a + 2  # a column of gap between heads


def test_derived_tables_edges_of_the_cut():
    """pipeline.derived on hand-made input: window bounds (50 either side kept, 51 dropped), rank >= 5 and
    snippets without a token of interest dropped, an all-zero wte giving empty tables."""
    import pyarrow as pa

    from pipeline.derived import snippet_window, wte_tables

    rows = {
        k: []
        for k in ("run_id", "node_id", "location", "channel", "frac", "side", "rank", "pos", "token_id", "value", "is_center")
    }
    for rank, centre in ((0, 60), (5, 60), (1, None)):  # rank 5 is not shown; rank 1 has no centre
        for pos in range(130):
            for k, v in (
                ("run_id", "r"),
                ("node_id", "0.mlp.post_act:3"),
                ("location", "0.mlp.post_act"),
                ("channel", 3),
                ("frac", 0.1),
                ("side", "top"),
                ("rank", rank),
                ("pos", pos),
                ("token_id", pos),
                ("value", float(pos)),
                ("is_center", pos == centre),
            ):
                rows[k].append(v)
    piece = pa.table(rows).cast(
        pa.schema(
            [
                pa.field(n, t)
                for n, t in zip(
                    rows,
                    [pa.string()] * 3
                    + [pa.int64(), pa.float64(), pa.string(), pa.int32(), pa.int32(), pa.int32(), pa.float32(), pa.bool_()],
                    strict=True,
                )
            ]
        )
    )
    got = snippet_window(piece).to_pandas()
    assert set(got["rank"]) == {0}
    assert got["pos"].tolist() == list(range(10, 111))  # 60 - 50 .. 60 + 50
    assert got["is_center"].sum() == 1 and got.loc[got["is_center"], "pos"].item() == 60
    empty = wte_tables("m", np.zeros((4, 3), np.float32))
    assert empty["wte_extremes"].num_rows == 0 and empty["wte_histograms"].num_rows == 0


def test_outputs_of_a_residual_write_that_no_later_node_reads(viewer_data):
    """A resid_delta node whose channel no later act_in node of the circuit reads says that it goes to
    the logits; one that is read lists its readers."""
    from viewer.app import create_app

    _, truth = viewer_data
    nodes = truth.nodes[RUN]
    order = {"attn": 0, "mlp": 1}

    def readers(w):
        return [
            r
            for r in nodes
            if r["kind"] == "act_in"
            and r["channel"] == w["channel"]
            and (r["layer"], order[r["half"]]) > (w["layer"], order[w["half"]])
        ]

    writes = [n for n in nodes if n["kind"] == "resid_delta"]
    unread = next(w for w in writes if not readers(w))
    read = next(w for w in writes if readers(w))
    app = create_app(url={"run": RUN}).explorer
    app.state.node = unread["node_id"]
    assert f"reads residual channel {unread['channel']}" in app.detail.outputs.object
    assert "acts on the logits directly" in app.detail.outputs.object
    app.state.node = read["node_id"]
    assert all(r["node_id"] in app.detail.outputs.object for r in readers(read))
    assert "acts on the logits directly" not in app.detail.outputs.object


def test_outputs_of_a_residual_write_list_the_tokens_it_pushes_directly(viewer_data):
    """Every resid_delta node's Outputs name the tokens whose logits its channel raises and lowers most
    through the final norm and the unembedding: checked against lm_head[:, c] * ln_f[c] ranked here."""
    from viewer.app import create_app
    from viewer.views.detail import LOGIT_TOKENS_SHOWN
    from viewer.views.tokens import token_label

    assert token_label(" in\n") == "␣in⏎" and token_label("<&") == "&lt;&amp;"
    _, truth = viewer_data
    lm_head, ln_f = truth.unembed["toy"]
    texts = vocab_texts(lm_head.shape[0])  # the toy vocab
    app = create_app(url={"run": RUN}).explorer
    writes = [n for n in truth.nodes[RUN] if n["kind"] == "resid_delta"]
    assert writes
    for w in writes:
        app.state.node = w["node_id"]
        out = app.detail.outputs.object
        direct = lm_head[:, w["channel"]] * ln_f[w["channel"]]
        ids = np.flatnonzero(direct)
        raises = ids[np.lexsort((ids, -direct[ids]))][:LOGIT_TOKENS_SHOWN]
        lowers = ids[np.lexsort((ids, direct[ids]))][:LOGIT_TOKENS_SHOWN]
        up, down = out.split("raises:")[1].split("lowers:")
        assert [token_label(texts[i]) for i in raises] == re.findall(r"<code>(.*?)</code>", up)
        assert [token_label(texts[i]) for i in lowers] == re.findall(r"<code>(.*?)</code>", down)
        assert f"{direct[raises[0]]:+.3f}" in up and f"{direct[lowers[0]]:+.3f}" in down
    app.state.node = next(n["node_id"] for n in truth.nodes[RUN] if n["kind"] == "q")
    assert "raises:" not in app.detail.outputs.object  # only residual writes have a direct path


def test_post_load_parts_wait_while_other_sessions_load(monkeypatch):
    """A drawn session's post-load parts wait while another session of the process is loading, not for one
    that never loads (forgotten after LOADING_FORGET_SECONDS), and never beyond POST_LOAD_MAX_WAIT_SECONDS."""
    from viewer import explorer

    monkeypatch.setattr(explorer, "_loading", {})
    now = 1000.0
    assert not explorer.post_load_waits(1, since=now, now=now)  # nobody else loading
    explorer._loading[1] = now - 5  # itself (not yet removed) does not count
    assert not explorer.post_load_waits(1, since=now, now=now)
    explorer._loading[2] = now - 1  # another session being built
    assert explorer.post_load_waits(1, since=now, now=now)
    assert not explorer.post_load_waits(1, since=now - explorer.POST_LOAD_MAX_WAIT_SECONDS, now=now)
    explorer._loading[2] = now - explorer.LOADING_FORGET_SECONDS  # requested, never loaded
    assert not explorer.post_load_waits(1, since=now, now=now)


def test_first_document_then_detail_tabs_after_load_and_views_on_first_open(viewer_data, monkeypatch):
    """A served page's first document holds the sidebar's pickers and the graph; the Pins group and the detail
    tabs join it when the browser reports the page loaded (Panel's onload), showing the link's pins and node; the
    Embeddings view and the Node tab's Task docs / Attention widgets are built when their tab is first opened,
    with the selected node's data."""
    import json

    import panel as pn
    from bokeh.document import Document
    from panel.io.state import set_curdoc

    from viewer import models
    from viewer.app import create_app

    _, truth = viewer_data
    node = next(n for n in truth.nodes[RUN] if n["kind"] == "resid_delta")
    onload = []
    doc = Document()
    with set_curdoc(doc):
        # as in a served session: the callbacks wait for the browser (without one, Panel runs them at once)
        monkeypatch.setattr(pn.state, "onload", lambda cb, threaded=False: onload.append(cb))
        pins = json.dumps({node["node_id"]: "mine"})
        page = create_app(url={"run": RUN, "node": node["node_id"], "pins": pins})
        monkeypatch.undo()
        page.server_doc(doc)
        app = page.explorer
        assert app.detail_tabs is None and app.detail is None
        assert list(page.main) == [app.notes.panel, app.graph_tabs]
        assert app.node.panel in list(page.sidebar) and app.pins.panel not in list(page.sidebar)
        texts = [str(getattr(m, "text", "")) for m in doc.models]
        assert not any(node["node_id"] in t for t in texts)  # no node box, no pin list yet
        n_first = len(doc.models)
        for cb in onload:
            cb()
        assert list(page.main)[-1] is app.detail_tabs and list(page.sidebar)[-1] is app.pins.panel
        assert f">{node['node_id']}</h3>" in app.detail.header.object  # the link's node, shown once the tabs exist
        assert f"{node['node_id']}: mine" in app.pins.object
        assert len(doc.models) > n_first
        # not built until opened
        assert "Embeddings" not in app._lazy and len(app._holders["Embeddings"]) == 0
        assert len(app.detail.task_tab) == 0 and len(app.detail.attn) == 0
        app.detail_tabs.active = 1  # Embeddings: the node's residual channel
        assert len(app._holders["Embeddings"]) == 1
        assert app.embeddings.channel.value == node["channel"]
        e = table(truth, "embeddings")
        model = models.run(RUN)["model"]
        wte = e[(e["model"] == model) & (e["matrix"] == "wte") & (e["channel"] == node["channel"])]
        nonzero = int((wte["value"] != 0).sum())
        assert f"wte column {node['channel']} has {nonzero} nonzero weights" in app.embeddings.note.object
        app.detail_tabs.active = 0
        app.detail.inner_tabs.active = 1  # Task docs: the colour-mode buttons, the page picker, the docs
        assert app.detail.zero in list(app.detail.task_tab[0]) and "doc 0 · class" in app.detail.task.object


def test_opened_page_passes_bokeh_integrity_checks(viewer_data):
    """The served app skips Bokeh's per-session document validation (`app.skip_document_validation`): the same
    checks here, on a page with every view built, find no error."""
    from bokeh.core.validation.check import check_integrity

    doc, app = _opened_page()
    assert {"Embeddings", "Curves", "Compare", "Faithfulness", "Export", "Whole circuit"} <= set(app._lazy)
    assert check_integrity(list(doc.models)).error == []


def test_ablations_written_before_standard_errors_still_show(tmp_path):
    """Tables from before deltas carried standard errors (no `recomputed_delta_se` column in any
    file) still give the recomputed deltas, with a null standard error, not nothing."""
    import glob

    import pyarrow.parquet as pq
    from viewer_tables import write_views

    from viewer import queries

    truth = write_contract_tables(str(tmp_path))
    for path in glob.glob(str(tmp_path / "tables" / "ablations" / "*.parquet")):
        pq.write_table(pq.read_table(path).drop_columns(["recomputed_delta_se"]), path)
    write_views(str(tmp_path), [t for t in queries.VIEWER_TABLES if (tmp_path / "tables" / t).is_dir()])
    want = table(truth, "ablations")
    want = want[(want["run_id"] == RUN) & (want["mode"] == "mean")]
    with data_dir(tmp_path):
        got = queries.ablations(RUN)
    assert got is not None and got["recomputed_delta_se"].null_count() == len(got) == len(want) > 0
    got = got.to_pandas().set_index("node_id").loc[want["node_id"]]
    np.testing.assert_allclose(got["recomputed_delta"], want["recomputed_delta"])
    assert list(got["agrees"]) == list(want["agrees"])


def _opened_page(node=None):
    """A page with every view built (each tab opened once), in a document of its own: (document, explorer)."""
    from bokeh.document import Document

    from viewer.app import create_app

    doc = Document()
    page = create_app(url={"run": RUN, **({"node": node} if node else {})})
    page.server_doc(doc)
    app = page.explorer
    app.graph_tabs.active = 1
    for i in range(6):
        app.detail_tabs.active = i
    for i in range(3):
        app.detail.inner_tabs.active = i
    return doc, app


def _wire(doc) -> tuple[str, list[bytes]]:
    """The document as the WebSocket sends it (PULL-DOC-REPLY), with the ids that each build draws anew from a
    global counter (Bokeh's model and buffer ids, Panel's object names such as "Column00129") numbered by first
    appearance."""
    from bokeh.protocol import Protocol

    msg = Protocol().create("PULL-DOC-REPLY", "req", doc)
    ids: dict[str, int] = {}

    def renumber(m):
        prefix = m.group(1) or m.group(2)  # "p" of a model / buffer id ("p1065", "__ref:p1065"), or a Panel class name
        return f"{prefix}#{ids.setdefault(m.group(0), len(ids))}"

    content = re.sub(r'(?<=[":])(p)\d+(?=")|(?<=")([A-Z][A-Za-z]*)\d{5}(?=")', renumber, msg.content_json)
    return content, [bytes(b.data) for b in msg.buffers]


def test_cheaper_bokeh_sends_what_bokeh_sends(viewer_data, monkeypatch):
    """`viewer.cheap` (installed by the served app): a page with every view built, built and serialized with it,
    goes over the WebSocket byte for byte as Bokeh sends it without (ids renumbered); and the same document
    serialized both ways is the same message."""
    from bokeh.core.has_props import HasProps
    from bokeh.core.property.bases import Property
    from bokeh.core.property.descriptors import PropertyDescriptor
    from panel.io import server as panel_server

    from viewer import cheap

    patched = [
        (HasProps, "query_properties_with_values"),
        (Property, "themed_default"),
        (PropertyDescriptor, "has_unstable_default"),
        (panel_server, "server_html_page_for_session"),
    ]
    bokeh_own = [getattr(owner, name) for owner, name in patched]
    plain, _ = _opened_page()
    want = _wire(plain)
    for owner, name in patched:  # restored after the test
        monkeypatch.setattr(owner, name, getattr(owner, name))
    cheap.replace()  # whatever the installed versions: this comparison is what admits a release to cheap.TESTED
    assert HasProps.query_properties_with_values is cheap._query_properties_with_values
    assert _wire(plain) == want  # Bokeh's document, serialized by the cheaper code
    cheaper, _ = _opened_page()
    got = _wire(cheaper)
    assert len(got[0]) > 10_000 and got == want  # built and serialized by the cheaper code
    for (owner, name), own in zip(patched, bokeh_own, strict=True):
        setattr(owner, name, own)
    assert _wire(cheaper) == want


def test_cheaper_bokeh_only_on_the_tested_releases():
    """`cheap.install` replaces nothing on a Bokeh or Panel release the wire-message test has not admitted."""
    from viewer import cheap

    assert cheap.tested("3.9.2", "1.9.4")
    assert not cheap.tested("3.10.0", "1.9.4") and not cheap.tested("3.9.2", "1.10.0") and not cheap.tested("4.0.0", "1.9.4")


def test_reused_page_rendered_once_with_each_visitors_token(monkeypatch):
    """`cheap.cache_reused_page`: the page of the session that `--reuse-sessions` reuses is rendered once and each
    visitor gets it with their own token; another session's page, or a changed input, is rendered again."""
    import panel as pn
    from panel.io import server as panel_server

    from viewer import cheap

    renders = []

    def render(session, resources, title, token=None, template=None, template_variables=None):
        renders.append(token)
        return f'<html>{title} {session.id} {pn.config.theme} <script>{{"token":"{token}"}}</script></html>'

    class Session:
        def __init__(self, id):
            self.id = id

    class Resources:
        mode, root_url = "server", "/"

    reused, other = Session("reused-1"), Session("own-1")
    monkeypatch.setattr(panel_server, "server_html_page_for_session", render)
    monkeypatch.setattr(panel_server, "_viewer_uncached_page", render, raising=False)
    monkeypatch.setattr(cheap, "_pages", {})
    monkeypatch.setattr(pn.state, "_sessions", {("/app", "default"): reused})
    cheap.cache_reused_page()
    page = panel_server.server_html_page_for_session
    first = page(reused, Resources(), "T", token="tok-A")
    second = page(reused, Resources(), "T", token="tok-B")
    assert renders == ["tok-A"] and second == first.replace("tok-A", "tok-B") and "tok-B" in second
    assert page(other, Resources(), "T", token="tok-C") == render(other, Resources(), "T", token="tok-C")
    assert renders[1:] == ["tok-C", "tok-C"]  # not reused: rendered every time
    third = page(reused, Resources(), "another title", token="tok-D")
    assert renders[-1] == "tok-D" and "another title" in third  # an input changed: rendered again
