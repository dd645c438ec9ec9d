"""Viewer hardening (issue 15), in-process: escaping of untrusted text, math typesetting off, tables with
duplicate node rows, a database replaced while another thread queries it, and links that restore the view.
The same behaviours in a real browser are in test_viewer_browser.py."""

from __future__ import annotations

import json
import threading
import time
import urllib.parse

import pyarrow.parquet as pq
import pytest
from test_viewer import RUN, data_dir
from viewer_tables import Scale, write_contract_tables

SMALL = Scale(snippet_len=8, snippets_per_list=1)
HOSTILE = "<img src=x onerror=alert(document.domain)>"


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening_data")
    truth = write_contract_tables(str(root), SMALL)
    with data_dir(root):
        yield root, truth


def test_url_values_in_notes_are_escaped(small_data):
    from viewer.app import create_app

    for key in ("run", "layer", "node", "compare"):
        app = create_app(url={key: HOSTILE}).explorer
        text = app.notes.object
        assert app.notes.div.visible
        assert "<img" not in text and "&lt;img src=x onerror=alert(document.domain)&gt;" in text, key
    app = create_app(url={"run": RUN}).explorer
    app.node.value = HOSTILE  # typed into the node picker
    assert "<img" not in app.notes.object and "&lt;img" in app.notes.object


def test_no_markdown_or_math_typesetting_of_data(small_data):
    """Every HTML box is a Bokeh Div with math off or a LiveHtml box (its text set as HTML, never typeset: the
    browser test checks that token texts holding TeX delimiters show as typed); no Markdown pane (raw HTML passes
    through Markdown)."""
    import panel as pn
    from bokeh.document import Document
    from bokeh.models import Div

    from viewer.app import create_app
    from viewer.views.markup import LiveHtmlBox, plain

    page = create_app(url={"run": RUN})
    app = page.explorer
    app.node.value = next(n for n in app.graph.nodes.data["node_id"] if not n.endswith(":bias"))
    for i in range(len(app.detail_tabs)):
        app.detail_tabs.active = i  # build the lazily built views too
    app.graph_tabs.active = 1
    doc = Document()
    page.server_doc(doc)
    divs = [m for m in doc.models if isinstance(m, Div)]
    assert len(divs) >= 5 and all(d.disable_math for d in divs)
    mine = [box.div for box in (app.notes, app.summary, app.pins, app.embeddings.top, app.compare.summary)]
    assert all(d.disable_math for d in mine)
    live = (app.detail.node_box, app.detail.snippets, app.detail.task)
    assert all(isinstance(box, LiveHtmlBox) for box in live)
    scripts = type(live[0].view)._scripts  # the box's only code: its text set as HTML
    assert set(scripts.values()) == {"box.innerHTML = data.html_text[0]"}
    # No Markdown pane at all (raw HTML passes through Markdown; its model also loads MathJax on every page).
    assert list(pn.Column(*page.sidebar, *page.main).select(pn.pane.Markdown)) == []
    # Titles and labels (no disable_math in Bokeh): the delimiters are broken up, the text looks the same.
    for s in ("re.compile(r'\\(a\\)')", "cost $$5$$", "\\[x\\]"):
        out = plain(s)
        assert "$$" not in out and "\\(" not in out and "\\[" not in out
        assert out.replace("\u200b", "") == s
    assert "\u200b" not in plain(RUN)


def test_tables_with_duplicate_node_rows(tmp_path):
    """A node table holding some nodes twice: the page still builds, a click shows the node, and a note says so."""
    from viewer import queries
    from viewer.app import create_app

    with data_dir(tmp_path):
        truth = write_contract_tables(str(tmp_path), SMALL)
        nodes_dir = tmp_path / "tables" / "nodes"
        table = pq.read_table(next(nodes_dir.glob(RUN.replace("/", "__") + ".parquet")))
        pq.write_table(table.slice(0, 5), nodes_dir / "duplicates.parquet")  # the view globs every file
        queries.clear_caches()
        dup = table.slice(0, 5).column("node_id").to_pylist()
        assert queries.duplicate_nodes(RUN) == 5
        assert len(queries.nodes(RUN)) == len(truth.nodes[RUN])
        page = create_app(url={"run": RUN, "node": dup[0]})
        app = page.explorer
        assert f'<h3 class="node-title">{dup[0]}</h3>' in app.detail.header.object
        assert "repeats 5 node row(s)" in app.notes.object and app.notes.div.visible
        ids = list(app.graph.nodes.data["node_id"])
        assert len(ids) == len(set(ids))
        app.graph_tabs.active = 1
        assert sorted(app.whole.nodes.data["node_id"]) == sorted(n["node_id"] for n in truth.nodes[RUN])
        app.detail_tabs.active = 3  # Compare: one row per node
        app.state.compare = "toy/quotes/sweep1/16"
        df = queries.compare(RUN, "toy/quotes/sweep1/16")
        assert df["node_id"].n_unique() == len(df)


def test_database_replaced_while_another_thread_queries(tmp_path, monkeypatch):
    """The reconnect after a rebuild must not close the connection a running query uses."""
    from viewer import models, queries

    monkeypatch.setattr(queries, "RECHECK_SECONDS", 0.0)
    with data_dir(tmp_path):
        write_contract_tables(str(tmp_path), SMALL, seed=1)
        queries.clear_caches()
        errors, started = [], threading.Event()

        def long_query():
            try:
                cur = queries._cursor()
                started.set()
                cur.sql("SELECT sum(a.range * b.range) FROM range(30000) a, range(30000) b").fetchall()  # a few seconds
            except Exception as err:  # noqa: BLE001 (the failure under test)
                errors.append(repr(err))

        worker = threading.Thread(target=long_query)
        worker.start()
        started.wait(30)
        time.sleep(0.3)
        second = write_contract_tables(str(tmp_path), SMALL, seed=2)  # replaced by rename, as the pipeline does
        got = models.run(RUN)["loss_raw"]  # reconnects while the other thread's query runs
        worker.join(120)
        assert errors == []
        assert got == pytest.approx(next(r for r in second.runs if r["run_id"] == RUN)["loss_raw"])


def test_link_restores_threshold_pins_and_node_layer(small_data):
    """A link's query strings, as the browser sends them, restore the view (the browser test does it end to end)."""
    from viewer import models
    from viewer.app import create_app
    from viewer.state import request_args

    _, truth = small_data
    node = next(n for n in truth.nodes[RUN] if n["layer"] == 1 and n["half"] == "attn")
    pins = {node["node_id"]: "a pin", truth.nodes[RUN][0]["node_id"]: "0.5"}
    query = {"run": RUN, "threshold": "0.5", "pins": json.dumps(pins), "node": node["node_id"]}
    args = urllib.parse.parse_qs(urllib.parse.urlencode(query))
    raw = request_args({k: [v.encode() for v in vs] for k, vs in args.items()})
    assert raw == query
    app = create_app(url=raw).explorer
    assert app.state.notes == []
    assert app.state.threshold == 0.5 and app.threshold.value == 0.5
    assert app.state.pins == pins
    assert app.state.node == node["node_id"] and app.state.layer == "1.attn" and app.layer.value == "1.attn"
    assert node["node_id"] in set(app.graph.nodes.data["node_id"])
    back = app.state.to_url()  # and the state written back to the URL reads the same
    assert create_app(url=back).explorer.state.to_url() == back
    assert models.node(RUN, node["node_id"])["half"] == "attn"
