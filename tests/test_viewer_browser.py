"""The viewer in a real browser: `panel serve` on test tables, headless system Chromium driven by Playwright.

Picks a layer-half, clicks a node on the graph's canvas, and checks that the detail panel shows the
node's id and its snippet tokens; saves screenshots in the test's temp dir. System package: `apt-get
install -y chromium` (README "Setup"); skipped, with the reason, only when no Chromium is installed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from viewer_tables import write_contract_tables

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "", shutil.which("chromium-browser") or "") if p and
                 os.path.exists(p)), None)
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("no Chromium found (install the system package: apt-get install -y chromium)")
    pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra: pip install -e '.[dev]'")
    data = tmp_path_factory.mktemp("browser_data")
    truth = write_contract_tables(str(data))
    port = free_port()
    env = {**os.environ, "CIRCUITS_DATA": str(data)}
    log = open(data / "serve.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([sys.executable, "-m", "panel", "serve", "viewer/app.py", "--address", "127.0.0.1", "--port", str(port),
                             f"--allow-websocket-origin=127.0.0.1:{port}"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/app"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).read()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                log.close()
                pytest.fail(f"panel serve did not start: {(data / 'serve.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield url, truth
    proc.terminate()
    proc.wait(timeout=20)
    log.close()


def test_pick_layer_click_node_shows_detail(served, tmp_path):
    from playwright.sync_api import sync_playwright

    url, truth = served
    run = "toy/quotes/sweep1/8"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROME_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1400})
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
            title.wait_for(timeout=30000)
            for _ in range(240):
                if title.inner_text().strip() == target:
                    break
                time.sleep(0.25)
            assert title.inner_text().strip() == target
            # The snippet tokens of that node, from the tables: the boxed token of the first 0.1% bottom snippet.
            import pyarrow as pa

            s = pa.concat_tables(truth.tables["samples"]).to_pandas()
            s = s[(s["run_id"] == run) & (s["node_id"] == target) & (s["frac"] == 0.001) & (s["side"] == "bottom") & (s["rank"] == 0)]
            vocab = pa.concat_tables(truth.tables["vocab"]).to_pandas().set_index("token_id")["text"]
            centre_text = vocab[int(s[s["is_center"]]["token_id"].iloc[0])]
            first_centre = page.locator("span.tok.center").first
            first_centre.wait_for(timeout=30000)
            assert first_centre.inner_text() == centre_text
            assert page.locator("span.tok").count() >= 8 * 5 * 50  # 4 fracs x 2 sides x 5 snippets, >= 50 tokens each
            page.wait_for_function("(id) => new URLSearchParams(window.location.search).get('node') === id", arg=target,
                                   timeout=60000)  # the URL carries the selection
            page.screenshot(path=str(tmp_path / "viewer_node.png"), full_page=True)
            first_centre.scroll_into_view_if_needed()  # the template's main area scrolls by itself
            page.screenshot(path=str(tmp_path / "viewer_snippets.png"))
        finally:
            browser.close()
