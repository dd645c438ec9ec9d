"""The viewer's views drawn from plain data made here (no tables, no database): each view's `draw`/`show` takes
the model objects of viewer/models.py, so what it shows is checked against values computed in the test."""

from __future__ import annotations

import html
import re

import numpy as np
import polars as pl
import pytest


@pytest.fixture(autouse=True)
def no_database(monkeypatch, tmp_path):
    """Any query would fail: the views below must draw from the data they are given."""
    from viewer import queries

    monkeypatch.setenv("CIRCUITS_DATA", str(tmp_path / "no-tables"))

    def refuse(*_args, **_kwargs):
        raise AssertionError("a view queried the database")

    monkeypatch.setattr(queries, "query", refuse)
    monkeypatch.setattr(queries, "connection", refuse)


def state():
    from viewer.state import Explorer

    return Explorer(run="r/a", node="")


def test_graph_draws_the_layout_and_its_threshold():
    from viewer.models import GraphLayout
    from viewer.views.graph import CircuitGraph

    ids = np.array(["0.attn.q:1", "0.attn.k:2", "0.attn.v:3"], dtype=object)
    nodes = {
        "node_id": ids,
        "x": np.array([0.0, 1.0, 2.0]),
        "y": np.array([1.0, 2.0, 3.0]),
        "delta": np.array([0.5, -0.25, np.nan]),
        "label": np.array(["a", "b", "c"], dtype=object),
        "is_bias": np.zeros(3, bool),
    }
    measure = np.array([1.0, -0.4, 0.05])
    layout = GraphLayout(nodes, {1.0: "q", 2.0: "k"}, top=2.0, src=np.array([0, 1, 2]), tgt=np.array([1, 2, 0]), measure=measure)
    g = CircuitGraph(lambda _: None)
    g.show(layout, 0.1, 0.5, {"0.attn.k:2": "pinned"}, "0.attn.q:1")
    # top = 2.0 (an edge not drawn may be the strongest): 0.1 * 2 keeps |measure| >= 0.2
    assert list(g.edges.data["src"]) == ["0.attn.q:1", "0.attn.k:2"]
    assert list(g.edges.data["tgt"]) == ["0.attn.k:2", "0.attn.v:3"]
    assert list(g.edges.data["x0"]) == [0.0, 1.0] and list(g.edges.data["y1"]) == [2.0, 3.0]
    assert list(g.edges.data["color"]) == ["#d6604d", "#4393c3"]  # positive red, negative blue
    # The selected node is the renderer's selection (drawn with a black outline); pinned nodes are amber.
    assert list(g.nodes.selected.indices) == [0]
    renderer = next(r for r in g.figure.renderers if r.data_source is g.nodes)
    assert renderer.selection_glyph.line_color == "#000000" and renderer.selection_glyph.line_width == 3.0
    # Unselected nodes as without a selection: no nonselection glyph, so BokehJS draws them with a copy of the
    # glyph (its "auto" default would fade them).
    assert renderer.nonselection_glyph is None
    assert renderer.glyph.line_alpha == 1.0 and renderer.glyph.fill_alpha == 1.0
    assert renderer.level == "overlay"  # a new selection repaints the nodes' canvas layer only, not the edges'
    assert list(g.nodes.data["outline"]) == ["#555555", "#ffb000", "#555555"]
    assert list(g.nodes.data["pin"]) == ["", "pinned", ""]
    assert g.nodes.data["color"][2] == "#bbbbbb"  # no delta: grey
    assert g.figure.yaxis.major_label_overrides == {1.0: "q", 2.0: "k"}
    g.show_threshold(0.0)
    assert len(g.edges.data["src"]) == 3
    g.show_threshold(0.45)  # keeps |measure| >= 0.9
    assert list(g.edges.data["src"]) == ["0.attn.q:1"]


def test_graph_selection_follows_taps_and_state():
    """A tap calls back with the node's id and leaves the node selected (its outline is drawn in the browser by
    that selection); a tap beside every node (empty selection) or on overlapping nodes restores one node."""
    from viewer.models import GraphLayout
    from viewer.views.graph import CircuitGraph

    ids = np.array(["0.attn.q:1", "0.attn.k:2", "0.attn.v:3"], dtype=object)
    nodes = {
        "node_id": ids,
        "x": np.array([0.0, 1.0, 2.0]),
        "y": np.array([1.0, 2.0, 3.0]),
        "delta": np.array([0.5, -0.25, 0.1]),
        "label": np.array(["a", "b", "c"], dtype=object),
        "is_bias": np.zeros(3, bool),
    }
    layout = GraphLayout(nodes, {}, top=1.0, src=np.array([0]), tgt=np.array([1]), measure=np.array([1.0]))
    picked = []
    g = CircuitGraph(picked.append)
    g.show(layout, 0.1, 0.5, {}, "")
    assert list(g.nodes.selected.indices) == []
    g.nodes.selected.indices = [2]  # as the browser's TapTool reports a tap
    assert picked == ["0.attn.v:3"] and list(g.nodes.selected.indices) == [2]
    g.nodes.selected.indices = []  # a tap beside every node: the selected node stays outlined
    assert list(g.nodes.selected.indices) == [2] and picked == ["0.attn.v:3"]
    g.nodes.selected.indices = [1, 0]  # overlapping nodes: the first one
    assert picked[-1] == "0.attn.k:2" and list(g.nodes.selected.indices) == [1]
    g.mark({"0.attn.q:1": "x"}, "0.attn.q:1")  # selected elsewhere (node picker, URL) and pinned
    assert list(g.nodes.selected.indices) == [0] and list(g.nodes.data["outline"]) == ["#ffb000", "#555555", "#555555"]
    g.mark({}, "1.mlp.post_act:4")  # a node this graph does not show: nothing selected
    assert list(g.nodes.selected.indices) == [] and list(g.nodes.data["pin"]) == ["", "", ""]
    assert picked[-1] == "0.attn.k:2"  # selections made by the app call nothing back


def test_node_detail_header_connections_snippets():
    from viewer import models
    from viewer.views.detail import DetailView

    node = {
        "node_id": "1.attn.q:7",
        "location": "1.attn.q",
        "channel": 7,
        "kind": "q",
        "head": 1,
        "head_channel": 3,
        "delta": 0.4373,
        "layer_delta": 1.5,
        "layer_delta_released": 2.75,
    }
    inputs = pl.DataFrame(
        {"src_node_id": ["1.attn.act_in:2"], "tgt_node_id": ["1.attn.q:7"], "strength": [0.75], "weight": [None]},
        schema_overrides={"weight": pl.Float64},
    )
    snippets = pl.DataFrame(
        {
            "frac": [0.5, 0.5, 0.5],
            "side": ["top"] * 3,
            "rank": [0, 0, 0],
            "pos": [0, 1, 2],
            "token_id": [5, 6, 7],
            "value": [0.0, 2.0, -1.0],
            "is_center": [False, True, False],
            "text": ["a<b", "$$x$$", "c"],
        }
    )
    detail = models.NodeDetail(
        node,
        ablation={"recomputed_delta": 0.44, "recomputed_delta_se": 0.0123, "abs_diff": 0.0027, "agrees": True},
        inputs=inputs,
        outputs=inputs.clear(),
        snippets=snippets,
    )
    view = DetailView(state())
    view.draw(detail, {"1.attn.q:7": "<my pin>"})
    head = view.header.object
    assert '<h3 class="node-title">1.attn.q:7</h3>' in head and "head 1, head channel 3" in head
    assert (
        "<b>0.4373</b>" in head
        and "layer-half delta 1.5000 (released reading 2.7500)" in head
        and "0.4400 ± 0.0123 (s.e., sampled pairs)" in head
        and "agrees" in head
    )
    assert "&lt;my pin&gt;" in head and "<my pin>" not in head
    assert "1.attn.act_in:2" in view.inputs.object and "0.7500" in view.inputs.object
    assert view.outputs.object == "<i>none</i>"
    snip = view.snippets.object
    assert "a&lt;b" in snip  # zero value: bare escaped text, no span
    assert re.search(r'<span class="p100 c" title=2>\$\$x\$\$</span>', snip)  # the max, boxed: full red
    assert re.search(r"<span class=n50 title=-1>c</span>", snip)  # half of the scale, blue
    view.draw(None, {})
    assert "Click a node" in view.header.object and view.snippets.object == ""


def test_residual_write_outputs_and_logit_effect():
    from viewer import models
    from viewer.views.detail import DetailView

    node = {"node_id": "0.mlp.resid_delta:4", "location": "0.mlp.resid_delta", "channel": 4, "kind": "resid_delta", "delta": 0.1}
    links = pl.DataFrame(
        {
            "src_node_id": ["0.mlp.resid_delta:4", "0.mlp.resid_delta:9"],
            "tgt_node_id": ["1.attn.act_in:4", "2.attn.act_in:9"],
            "channel": [4, 9],
        }
    )
    logit = pl.DataFrame(
        {
            "side": ["top", "top", "bottom"],
            "rank": [0, 1, 0],
            "token_id": [1, 2, 3],
            "value": [0.5, 0.25, -0.125],
            "text": [" in", "<", "x"],
        }
    )
    view = DetailView(state())
    view.draw(models.NodeDetail(node, links=links, logit=logit), {})
    out = view.outputs.object
    assert "later reads of the same residual channel" in out and "1.attn.act_in:4" in out and "2.attn.act_in:9" not in out
    up, down = out.split("raises:")[1].split("lowers:")
    assert re.findall(r"<code>(.*?)</code>", up) == ["␣in", "&lt;"] and "+0.500" in up and "+0.250" in up
    assert re.findall(r"<code>(.*?)</code>", down) == ["x"] and "-0.125" in down
    view.draw(models.NodeDetail(node, links=links.clear(), logit_available=False), {})
    assert "acts on the logits directly" in view.outputs.object and "not available" in view.outputs.object


def test_task_docs_pairs_scales_and_differences():
    from viewer.models import TaskDoc, task_doc_pages
    from viewer.views.tokens import task_docs_html

    docs = [
        TaskDoc(0, 1, 0, 3, ["a", "b", "c"]),
        TaskDoc(1, 2, 0, 2, ["d", "e"]),
        TaskDoc(2, 1, 1, 2, ["f", "g"]),
        TaskDoc(3, 2, 1, 2, ["h", "i"]),
    ]
    acts = np.array([[1.0, -2.0, 0.0], [4.0, 0.0, np.nan], [0.5, 0.5, np.nan], [0.0, 1.0, np.nan]], np.float32)
    out = task_docs_html(docs, acts, zero_centred=True, pairs_shown=[0])
    assert "|activation| 4 = full colour" in out
    assert "doc 0 · class 1 · pair 0" in out and "doc 1 · class 2 · pair 0" in out and "pair 1" not in out
    assert out.index("doc 0 · class 1") < out.index("doc 1 · class 2") < out.index("pair 0 · class 2 − class 1")
    # doc 0: max (a, 1.0) and min (b, -2.0) boxed, on the scale 4: a = red 25, b = blue 50
    assert '<span class="p25 c" title=1>a</span>' in out and '<span class="n50 c" title=-2>b</span>' in out
    # difference of pair 0 over the shorter doc: (4 - 1, 0 - -2) = (3, 2); its own scale is max |diff| over every pair = 3
    diff = out.split("pair 0 · class 2 − class 1")[1]
    assert "<span class=p100 title=3>d</span>" in diff and "<span class=p67 title=2>e</span>" in diff
    low = task_docs_html(docs, acts, zero_centred=False)
    assert "min -2 (clear) to max 4 (full red)" in low and "pair 1" in low
    assert "No task-doc activations" in task_docs_html([], acts, True)
    assert "No task-doc activations" in task_docs_html(docs, np.full((4, 3), np.nan), True)
    assert task_doc_pages(docs, 1) == {"pairs 0-0": 0, "pairs 1-1": 1}


def test_attention_plots_and_messages():
    from viewer import models
    from viewer.views.detail import DetailView

    view = DetailView(state())
    view.draw_attention("Attention patterns are shown for q, k and v nodes.")
    assert "shown for q, k and v" in view.attn_note.object and view.head_plot is None
    q, k = {3: np.array([1.0, 2.0])}, {3: np.array([0.5, -1.0])}
    att = models.Attention(
        ["layer 1 head 2, doc 0 (2 tokens)"],
        head=models.head_pattern(q, k, 4, 2),
        head_title="head 2 pattern",
        channel=models.channel_pattern(q[3], k[3], 4),
        channel_title="channel 3",
    )
    view.draw_attention(att)
    img = view.head_plot.source.data["image"][0]
    # softmax over s <= t of q(t) k(s) / sqrt(4): row 1 = softmax([2 * 0.5, 2 * -1] / 2)
    e = np.exp([0.5, -1.0])
    np.testing.assert_allclose(img[1], e / e.sum(), rtol=1e-6)
    assert img[0, 0] == pytest.approx(1.0) and np.isnan(img[0, 1])
    assert view.channel_plot.figure.title.text == "channel 3" and view.head_plot.figure.visible


def test_embeddings_curves_compare_faithfulness_draw_their_data():
    from viewer import models
    from viewer.views.compare import CompareView
    from viewer.views.curves import CurvesView
    from viewer.views.embeddings import EmbeddingView
    from viewer.views.faithfulness import FaithfulnessView

    hist = pl.DataFrame({"bin": [0, 1], "bin_left": [-1.0, 0.0], "bin_right": [0.0, 1.0], "count": [3, 4]})
    top = pl.DataFrame({"token_id": [7], "text": ["<t>"], "value": [0.9]})
    emb = EmbeddingView(state())
    emb.draw(models.Embedding("m", 5, top=top, bottom=top.clear(), hist=hist))
    assert list(emb.hist_source.data["top"]) == [3, 4] and list(emb.hist_source.data["left"]) == [-1.0, 0.0]
    assert "wte column 5 has 7 nonzero weights" in emb.note.object and "&lt;t&gt;" in emb.top.object
    emb.draw_wpe(np.array([[1.0, -2.0]], np.float32), [0, 3], 0.5)
    assert emb.wpe_mapper.low == -2.0 and emb.wpe_mapper.high == 2.0 and "1 positions x 2 nonzero channels" in emb.wpe.title.text

    lak = pl.DataFrame({"n_nodes": [10, 20], "final_loss": [2.0, 1.0], "k_label": ["8", "16"], "run_id": ["r/a", "r/b"]})
    train = pl.DataFrame({"step": [0, 1, 0], "metric": ["loss", "loss", "lr"], "value": [3.0, 2.5, 0.1]})
    c = models.Curves(
        "r/a",
        loss_at_k=lak,
        unpruned=0.75,
        pruning=pl.DataFrame({"x": [8, 16], "loss": [1.5, 1.2]}),
        config={"k": 8},
        train=train,
        train_last=pl.DataFrame({"metric": ["loss", "lr"], "step": [1, 0], "value": [2.5, 0.1]}),
        metrics=["loss", "lr"],
    )
    curves = CurvesView(state())
    curves.draw(c)
    drawn, run_id, unpruned = curves.k_plot.data
    assert drawn["k_label"].to_list() == ["8", "16"] and run_id == "r/a" and unpruned == 0.75
    assert "unpruned model's loss 0.7500" in curves.k_note.object
    assert curves.p_plot.data["loss"].to_list() == [1.5, 1.2] and curves.config.object == {"k": 8}
    assert curves.metric_pick.value == "loss" and curves.t_plot.data[0]["value"].to_list() == [3.0, 2.5]
    assert "2.500000" in curves.metrics.object

    cmp = models.Comparison(
        "r/a",
        "r/<b>",
        pl.DataFrame({"node_id": ["n1"], "delta_a": [0.5], "delta_b": [0.25]}),
        pl.DataFrame({"node_id": ["n2", "n3"], "delta_a": [0.1, 0.2]}),
        pl.DataFrame({"node_id": [], "delta_b": []}),
    )
    view = CompareView(state())
    view.draw(cmp)
    assert "shared <b>1</b> · only in A <b>2</b> · only in B <b>0</b> · Jaccard 0.333" in view.summary.object
    assert html.escape("r/<b>") in view.summary.object and "n3" in view.only_a.object and view.only_b.object == "<i>none</i>"

    f = pl.DataFrame(
        {
            "prompt_set": ["evaluation"],
            "ablation": ["mean"],
            "variant": ["circuit"],
            "loss": [1.25],
            "loss_se": [0.5],
            "accuracy": [0.5],
            "n_prompts": [10],
            "flagged": [True],
        }
    )
    fv = FaithfulnessView(state())
    fv.draw("r/a", f)
    assert "Flagged" in fv.verdict.object and "1.250" in fv.table.object and "flagged" not in fv.table.object


def test_sidebar_labels():
    from viewer.explorer import layer_label, summary_html

    assert (
        layer_label({"marked": True, "layer_half": "0.mlp", "delta": 0.5, "delta_released": None, "n_nodes": 9})
        == "★ 0.mlp  Δ +0.500 (released reading n/a) · 9 nodes"
    )
    r = {
        "n_nodes": 48,
        "num_total_nodes": 240,
        "loss": 0.25,
        "interv_loss": 1.0,
        "loss_factor": 0.5,
        "loss_raw": 0.5,
        "interv_loss_raw": 2.0,
    }
    assert "<b>48</b> nodes in the circuit (of 240 prunable)" in summary_html(r) and "raw 0.5000 → 2.0000" in summary_html(r)
