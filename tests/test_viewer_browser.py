"""The viewer in a real browser: `panel serve` on test tables, headless system Chromium driven by Playwright.

Picks a layer-half, clicks a node on the graph's canvas, and checks that the detail panel shows the
node's id and its snippet tokens; saves screenshots in the test's temp dir. System package: `apt-get
install -y chromium` (README "Setup"); skipped, with the reason, only when no Chromium is installed.
"""

from __future__ import annotations

import os
import re
import shutil
import time

import pytest
from viewer_tables import write_contract_tables

from viewer import serve

CHROMIUM = next(
    (
        p
        for p in ("/usr/bin/chromium", shutil.which("chromium") or "", shutil.which("chromium-browser") or "")
        if p and os.path.exists(p)
    ),
    None,
)
CHROME_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"]

# Screen position of a node of the layer-half graph, from BokehJS's own scales (the canvas has no DOM per node).
NODE_XY = """(nodeId) => {
  for (const v of Bokeh.index.all_views()) {
    const data = v.model.data_source && v.model.data_source.data;
    if (!data || !data.node_id || !v.parent || !v.parent.model || !v.parent.model.title) continue;
    const title = v.parent.model.title.text;
    if (!title.includes('layer-half') || title.startsWith('whole circuit')) continue;
    const i = Array.from(data.node_id).indexOf(nodeId);
    if (i < 0) continue;
    const r = v.parent.canvas_view.el.getBoundingClientRect();
    return [r.left + v.parent.frame.x_scale.compute(data.x[i]), r.top + v.parent.frame.y_scale.compute(data.y[i])];
  }
  return null;
}"""
# The node ids the layer-half graph shows selected (drawn with the black outline of its selection glyph).
GRAPH_SELECTED = """() => {
  for (const v of Bokeh.index.all_views()) {
    const data = v.model.data_source && v.model.data_source.data;
    if (!data || !data.node_id || !v.parent || !v.parent.model || !v.parent.model.title) continue;
    const title = v.parent.model.title.text;
    if (!title.includes('layer-half') || title.startsWith('whole circuit')) continue;
    return Array.from(v.model.data_source.selected.indices).map(i => data.node_id[i]);
  }
  return null;
}"""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("no Chromium found (install the system package: apt-get install -y chromium)")
    pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra: pip install -e '.[dev]'")
    data = tmp_path_factory.mktemp("browser_data")
    truth = write_contract_tables(str(data))
    port = serve.free_port()
    proc, log = serve.start(data, port, data / "serve.log", timeout=60)  # the README's command
    yield f"http://127.0.0.1:{port}/app", truth
    serve.stop(proc, log)


def test_several_server_processes_serve_the_app(tmp_path, browser_page):
    """`viewer/serve.py multi_process_options`: every forked process answers with the app's own page (its root
    elements and only the JavaScript it uses: viewer/warm.py ran in it; Panel's `--warm` before the fork gives an
    empty page with Tabulator's bundle), and sessions load whichever process their WebSocket reaches; with
    `--num-procs 0` warm.py refuses to start (its setup would run before the fork: the processes hung)."""
    import urllib.request

    if CHROMIUM is None:
        pytest.skip("no Chromium found (install the system package: apt-get install -y chromium)")
    truth = write_contract_tables(str(tmp_path))
    port = serve.free_port()
    proc, log = serve.start(tmp_path, port, tmp_path / "serve.log", options=serve.multi_process_options(2), timeout=60)
    try:
        url = f"http://127.0.0.1:{port}/app"
        _wait(lambda: len([p for p in os.listdir("/proc") if p.isdigit() and _pgid(int(p)) == proc.pid]) == 3, "2 forked servers")
        warmed = lambda: set(re.findall(r"the app ran in server process (\d+)", (tmp_path / "serve.log").read_text()))  # noqa: E731
        _wait(lambda: len(warmed()) == 2, "viewer/warm.py in each forked process")
        for _ in range(8):  # the kernel hands each connection to either process
            page = urllib.request.urlopen(url, timeout=60).read().decode()
            assert re.search(r'"roots":\{"p\d+"', page) and "tabulator" not in page
        run = truth.runs[0]["run_id"]
        for _ in range(3):
            browser_page.goto(f"{url}?run={run}", timeout=60000)
            browser_page.get_by_text("nodes in the circuit", exact=False).first.wait_for(timeout=60000)
    finally:
        serve.stop(proc, log)
    with pytest.raises(RuntimeError, match="not 0"):
        zero = ["--num-procs", "0", "--setup", "viewer/warm.py", "--reuse-sessions"]
        proc, log = serve.start(tmp_path, serve.free_port(), tmp_path / "serve0.log", options=zero, timeout=60)
        serve.stop(proc, log)


def _pgid(pid):
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_pick_layer_click_node_shows_detail(served, tmp_path):
    from playwright.sync_api import sync_playwright

    url, truth = served
    run = "toy/quotes/sweep1/8"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROME_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1400})
            requested = []
            page.on("request", lambda r: requested.append(r.url))
            page.goto(f"{url}?run={run}", timeout=60000)
            page.wait_for_selector("canvas", timeout=60000)
            layer_list = page.locator("select[size]")
            layer_list.wait_for(timeout=30000)
            layer_list.select_option("1.attn")
            target = next(n["node_id"] for n in truth.nodes[run] if n["node_id"].startswith("1.attn.q:"))
            xy = None
            for _ in range(240):  # wait (up to a minute on a loaded machine) until the graph shows the picked layer-half
                xy = page.evaluate(NODE_XY, target)
                if xy:
                    break
                time.sleep(0.25)
            assert xy, "the layer-half graph never showed the picked layer"
            page.mouse.click(*xy)
            title = page.locator("h3.node-title")
            title.wait_for(timeout=60000)  # the detail tabs come after the page has loaded: slow on a loaded machine
            for _ in range(240):
                if title.inner_text().strip() == target:
                    break
                time.sleep(0.25)
            assert title.inner_text().strip() == target
            assert page.evaluate(GRAPH_SELECTED) == [target]  # outlined in the graph (and nothing else)
            # The snippet tokens of that node, from the tables: the boxed token of the first 0.1% bottom snippet.
            import pyarrow as pa

            s = pa.concat_tables(truth.tables["samples"]).to_pandas()
            s = s[
                (s["run_id"] == run)
                & (s["node_id"] == target)
                & (s["frac"] == 0.001)
                & (s["side"] == "bottom")
                & (s["rank"] == 0)
            ]
            vocab = pa.concat_tables(truth.tables["vocab"]).to_pandas().set_index("token_id")["text"]
            centre_text = vocab[int(s[s["is_center"]]["token_id"].iloc[0])]
            first_centre = page.locator(".toks span.c").first
            first_centre.wait_for(timeout=30000)
            assert first_centre.inner_text() == centre_text
            assert page.locator(".toks span").count() >= 8 * 5 * 50  # 4 fracs x 2 sides x 5 snippets, >= 50 tokens each
            page.wait_for_function(
                "(id) => new URLSearchParams(window.location.search).get('node') === id", arg=target, timeout=60000
            )  # the URL carries the selection
            page.screenshot(path=str(tmp_path / "viewer_node.png"), full_page=True)
            first_centre.scroll_into_view_if_needed()  # the template's main area scrolls by itself
            page.screenshot(path=str(tmp_path / "viewer_snippets.png"))
            # Everything the page loads comes from the server (with `--reuse-sessions` a visitor's session once
            # took Panel's stylesheets from cdn.holoviz.org: unstyled widgets without internet access).
            server = url.split("/app")[0]
            ours = (server, f"blob:{server}", "data:")
            assert requested and [u for u in requested if not u.startswith(ours)] == []
            assert not any("bokeh-gl" in u for u in requested)  # no figure uses WebGL: its bundle is not sent
        finally:
            browser.close()


# --- hardening (issue 15): hostile links, shared links, text shown as text --------------------

HOSTILE = "<img src=x onerror=alert(document.domain)>"
BOKEH_MODEL_VALUE = """(args) => {
  for (const v of Bokeh.index.all_views()) {
    const m = v.model;
    if (m.type === args[0] || m.constructor.name === args[0]) {
      if (args[1] === null || String(m.title).includes(args[1])) return m.value;
    }
  }
  return null;
}"""


@pytest.fixture()
def browser_page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROME_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1400})
            page.dialogs = []
            page.on("dialog", lambda d: (page.dialogs.append(d.message), d.dismiss()))
            yield page
        finally:
            browser.close()


def _open(page, url):
    page.goto(url, timeout=60000)
    page.wait_for_selector("canvas", timeout=60000)


def _wait(predicate, what, seconds=60):
    for _ in range(int(seconds / 0.25)):
        if predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def test_hostile_link_runs_no_script_and_shows_the_text(served, browser_page, tmp_path):
    import urllib.parse

    url, _ = served
    page = browser_page
    query = urllib.parse.urlencode({"run": HOSTILE, "layer": HOSTILE, "node": HOSTILE, "compare": HOSTILE})
    _open(page, f"{url}?{query}")
    notes = page.get_by_text("Unknown run", exact=False)
    notes.first.wait_for(timeout=60000)
    time.sleep(1.0)  # an injected <img onerror> fires as soon as it is inserted
    for what in ("Unknown run", "Unknown layer", "Unknown comparison run"):
        assert page.get_by_text(f"{what} '{HOSTILE}'", exact=False).count() == 1, what  # shown as text, escaped
    assert page.dialogs == []
    assert page.locator("img[src='x']").count() == 0  # no element was made from the value
    page.screenshot(path=str(tmp_path / "hostile_link.png"))


def test_shared_link_restores_threshold_pins_node_and_its_layer(served, browser_page, tmp_path):
    import json
    import urllib.parse

    url, truth = served
    run = "toy/quotes/sweep1/8"
    node = next(
        n["node_id"] for n in truth.nodes[run] if n["node_id"].startswith("1.attn.k:")
    )  # not the layer-half the page opens on (the one with the most nodes)
    other = truth.nodes[run][0]["node_id"]
    pins = {node: "a k channel", other: "0.5"}
    query = {"run": run, "threshold": "0.5", "pins": json.dumps(pins), "node": node}
    page = browser_page
    _open(page, f"{url}?{urllib.parse.urlencode(query)}")
    title = page.locator("h3.node-title")
    title.wait_for(timeout=60000)
    assert title.inner_text().strip() == node
    _wait(lambda: page.evaluate(NODE_XY, node) is not None, "the graph showing the node's layer-half")
    _wait(lambda: page.evaluate(GRAPH_SELECTED) == [node], "the graph outlining the link's node")
    assert page.evaluate(BOKEH_MODEL_VALUE, ["Slider", "edge threshold"]) == 0.5
    assert page.locator("select[size]").input_value() == "1.attn"
    sidebar_pins = page.get_by_text("📌", exact=False)
    assert sorted(t.strip() for t in sidebar_pins.first.inner_text().split("\n") if t.strip()) == sorted(
        f"📌 {k}: {v}" for k, v in pins.items()
    )
    # The URL after loading still carries the link's state, as strings the app reads back.
    # The link has no layer: it is in the URL once the app has written its state back.
    _wait(lambda: "layer=" in page.evaluate("() => window.location.search"), "the URL written back")
    back = urllib.parse.parse_qs(page.evaluate("() => window.location.search")[1:])
    assert back["threshold"] == ["0.5"] and json.loads(back["pins"][0]) == pins and back["node"] == [node]
    assert back["layer"] == ["1.attn"]
    page.screenshot(path=str(tmp_path / "shared_link.png"), full_page=True)


def test_token_text_is_not_typeset_and_zero_centred_toggle_redraws(served, browser_page, tmp_path):
    url, truth = served
    run = "toy/quotes/sweep1/8"
    node = next(n["node_id"] for n in truth.nodes[run] if n["node_id"].startswith("1.attn.q:"))
    page = browser_page
    _open(page, f"{url}?run={run}&node={node}")
    page.locator(".toks span").first.wait_for(timeout=60000)
    # The vocab holds texts like "$$x11$$" and "\(a13\)" (tests/viewer_tables.py): shown as typed, not as TeX.
    lines = page.locator(".toks").all_inner_texts()  # a token is a span, or bare text when its value is exactly 0
    assert re.search(r"\$\$x[0-9]+\$\$", "".join(lines))
    assert re.search(r"\\\(a[0-9]+\\\)", "".join(lines))
    assert page.locator("mjx-container").count() == 0
    assert "<img src=x onerror=alert(" in "".join(lines) and page.dialogs == []
    # Task docs: the colour-mode buttons redraw the docs on the other colour scale (clicking the label of the
    # former checkbox did nothing).
    page.get_by_text("Task docs", exact=True).click()
    legend = page.locator(".scale", has_text="zero-centred: red positive")
    legend.first.wait_for(timeout=60000)
    first_doc = page.locator('div.doclabel:has-text("doc 0 · class") + div.toks').first
    before = first_doc.inner_html()
    page.get_by_text("min to max", exact=True).click()
    page.locator(".scale", has_text="(clear) to max").first.wait_for(timeout=60000)
    assert first_doc.inner_html() != before
    page.screenshot(path=str(tmp_path / "task_docs.png"), full_page=True)


def test_detail_tabs_after_load_and_embeddings_built_on_first_open(served, browser_page, tmp_path):
    """The detail tabs arrive after the page's first document, and the Embeddings view is built when its tab is
    first opened: it shows the linked residual node's channel, its top tokens and its two figures."""
    import urllib.parse

    import pyarrow as pa

    url, truth = served
    run = "toy/quotes/sweep1/8"
    node = next(n for n in truth.nodes[run] if n["kind"] == "resid_delta")
    page = browser_page
    _open(page, f"{url}?{urllib.parse.urlencode({'run': run, 'node': node['node_id']})}")
    page.locator("h3.node-title").wait_for(timeout=60000)  # the Node tab, added after load, shows the link's node
    assert page.locator("h3.node-title").inner_text().strip() == node["node_id"]
    figures = lambda: page.evaluate(  # noqa: E731 (the titles of the page's figures)
        "() => Array.from(Bokeh.index.all_views()).filter(v => v.model.title && v.model.title.text !== undefined)"
        ".map(v => String(v.model.title.text))"
    )
    assert not any("wte column histogram" in t for t in figures())  # not built before the tab is opened
    page.get_by_text("Embeddings", exact=True).click()
    page.get_by_text(f"wte column {node['channel']} has", exact=False).first.wait_for(timeout=60000)
    _wait(lambda: any("wte column histogram" in t for t in figures()), "the Embeddings figures")
    assert any(t.startswith("wpe: ") for t in figures())  # the heatmap, titled with its shape once drawn
    # The first row of "Top tokens": the token with the largest weight in the channel's wte column (from the
    # embeddings table itself).
    e = pa.concat_tables(truth.tables["embeddings"]).to_pandas()
    col = e[(e["matrix"] == "wte") & (e["channel"] == node["channel"])]
    if len(col):
        top = int(col.sort_values("value", ascending=False)["row"].iloc[0])
        cells = page.locator("table.df:visible").first.locator("tbody tr").first.locator("td")  # "Top tokens"
        assert cells.first.inner_text().strip() == str(top)
    page.screenshot(path=str(tmp_path / "embeddings.png"), full_page=True)
