"""The viewer in a real browser (Playwright + system Chromium): click-to-paint latencies, cold start and
concurrent sessions against `panel serve` on the release-scale tables. Run through `bench/viewer.py --browser`.

Every time is measured in the page, from the browser's own clock: from just before the action (a mouse
click on the node's canvas position, a tab click, a widget value set on its Bokeh model) to the first
animation frame in which the page's Bokeh models hold the new content (the frame that paints it). Python
only waits. Each session runs in a fresh browser context (no HTTP cache), like a first visit.

Concurrent first visits are measured three ways, because on one 2-core machine N Chromium pages compete with
the server for the cores, where real visitors render on their own machines: N light clients that ask of the
server what a browser asks (`light_session`: the server's share), one Chromium page among N-1 light clients
(what one visitor waits for when N arrive together), and N Chromium pages (everything on these 2 cores).
The server is started as `viewer/serve.py` says (the README's command; `--code` checkouts without that file
get the plain `panel serve viewer/app.py`).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import statistics
import time
import uuid
from pathlib import Path

from viewer import serve

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROME_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"]

# Helpers installed in every page: the layer-half graph's node positions, and a few models found by content.
HELPERS = """
window.__bench = {
  models() { return Array.from(Bokeh.documents[0]._all_models.values()); },
  graph() {  // the layer-half graph's node source and its plot view
    for (const v of Bokeh.index.all_views()) {
      const data = v.model.data_source && v.model.data_source.data;
      if (!data || !data.node_id || !v.parent || !v.parent.model || !v.parent.model.title) continue;
      const title = v.parent.model.title.text;
      if (typeof title !== 'string' || !title.includes('layer-half') || title.startsWith('whole circuit')) continue;
      return v;
    }
    return null;
  },
  ready() {  // the page is usable: the graph holds its nodes
    if (!window.Bokeh || !Bokeh.documents || !Bokeh.documents.length) return false;
    const g = this.graph();
    return g !== null && g.model.data_source.data.node_id.length > 0;
  },
  node_xy(id) {
    const v = this.graph();
    if (!v) return null;
    const data = v.model.data_source.data;
    const i = Array.from(data.node_id).indexOf(id);
    if (i < 0) return null;
    const r = v.parent.canvas_view.el.getBoundingClientRect();
    return [r.left + v.parent.frame.x_scale.compute(data.x[i]), r.top + v.parent.frame.y_scale.compute(data.y[i])];
  },
  node_ids() { const v = this.graph(); return v ? Array.from(v.model.data_source.data.node_id) : []; },
  // An HTML box's text: a Bokeh Div's `text`, or the `html_text` of the viewer's LiveHtml boxes (a Panel
  // ReactiveHTML, whose parameters live in a data model).
  html(m) {
    if (typeof m.text === 'string') return m.text;
    return Array.isArray(m.html_text) && typeof m.html_text[0] === 'string' ? m.html_text[0] : null;
  },
  div(marker) { return this.models().find(m => { const t = this.html(m); return t !== null && t.includes(marker); }) || null; },
  task_text() { const d = this.div('difference = class 2 minus class 1'); return d ? this.html(d) : null; },
  whole_edges() {  // the whole-circuit graph's edge count, or -1 before it exists
    for (const m of this.models()) {
      if ((m.type !== 'Plot' && m.type !== 'Figure') || !m.title || !String(m.title.text).startsWith('whole circuit')) continue;
      for (const r of m.renderers) { const d = r.data_source && r.data_source.data; if (d && d.x0 && !d.node_id) return d.x0.length; }
    }
    return -1;
  },
  phases() {  // a cold start's steps, ms from navigation start (the graph drawn is the bench's own wait)
    const nav = performance.getEntriesByType('navigation')[0];
    return [nav.responseEnd, nav.domContentLoadedEventEnd, window.__bench_doc || -1];
  },
  header_shows(id) {
    const esc = id.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
    return this.div('node-title">' + esc + '</h3>') !== null;
  },
};
(function poll() {  // the first frame in which BokehJS holds the session's document (received and its models built)
  if (window.Bokeh && Bokeh.documents && Bokeh.documents.length) window.__bench_doc = performance.now();
  else requestAnimationFrame(poll);
})();
"""


def serve_options(code: Path) -> list[str]:
    """The `panel serve` options the checkout `code` recommends (its viewer/serve.py), or none (checkouts from
    before viewer/serve.py served the plain command)."""
    path = code / "viewer" / "serve.py"
    if not path.exists():
        return []
    spec = importlib.util.spec_from_file_location("_bench_serve_of_checkout", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.OPTIONS)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def open_session(browser, url):
    """A fresh context (no cache) and page; returns (context, page, ms from navigation start to the ready graph)."""
    context = await browser.new_context(viewport={"width": 1400, "height": 1400})
    page = await context.new_page()
    await page.add_init_script(HELPERS)
    await page.goto(url, wait_until="commit", timeout=180000)
    handle = await page.wait_for_function("() => window.__bench.ready() && performance.now()", polling="raf", timeout=300000)
    return context, page, float(await handle.json_value())


async def timed(page, action, done_js, arg=None, before_js="null"):
    """ms from just before `action()` to the first animation frame where `done_js(arg)` is true
    (`before_js` is evaluated first; its value is `window.__before` for done_js)."""
    t0 = float(await page.evaluate(f"() => {{ window.__before = ({before_js}); return performance.now(); }}"))
    await action()
    handle = await page.wait_for_function(f"(a) => ({done_js})(a) && performance.now()", arg=arg, polling="raf", timeout=120000)
    return float(await handle.json_value()) - t0


async def click_node(page, node_id, extra_done="true", before_js="null"):
    """A tap on the node, as Bokeh's TapTool reports it: the node's index set as the source's selection (a
    mouse click at its canvas position hit a neighbour now and then: nodes 6 px apart overlap)."""
    tap = "(id) => { const s = window.__bench.graph().model.data_source; s.selected.indices = [Array.from(s.data.node_id).indexOf(id)]; }"
    return await timed(
        page,
        lambda: page.evaluate(tap, node_id),
        f"(id) => window.__bench.header_shows(id) && ({extra_done})",
        node_id,
        before_js,
    )


async def pick_layer(page, layer):
    await page.locator("select[size]").select_option(layer)
    await page.wait_for_function(
        "(l) => { const g = window.__bench.graph(); return g && g.parent.model.title.text.includes('layer-half ' + l + ' '); }",
        arg=layer,
        polling="raf",
        timeout=120000,
    )
    await asyncio.sleep(1.0)  # the plot re-ranges to the new nodes when it renders: positions are read after that


async def run(url: str, run_id: str, layers: list[str], sessions: int, clicks_per_layer: int, server: int | None = None):
    """`server`: the server's process group, for the CPU accounting of the concurrent phases (`CpuMeter`)."""
    from playwright.async_api import async_playwright

    results = {}
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROME_ARGS)
        base = f"{url}?run={run_id}"
        # Cold start: the server's first session (its caches empty), then further first visits.
        ctx, page, ms = await open_session(browser, base)
        results["cold start, first session of the server (navigation to a drawn graph)"] = [ms]
        await ctx.close()
        starts, phases = [], []
        for _ in range(3):
            ctx, page, ms = await open_session(browser, base)
            starts.append(ms)
            phases.append(await page.evaluate("() => window.__bench.phases()"))
            await ctx.close()
        results["cold start, a new visitor (server warm, browser cache empty)"] = starts
        for i, step in enumerate(("page HTML received", "JavaScript run (DOMContentLoaded)", "document received and built")):
            results[f"   of which: {step}"] = [p[i] for p in phases]

        report(results)
        ctx, page, _ = await open_session(browser, base)
        clicks, clicks_task = [], []
        for i, layer in enumerate(layers):
            await pick_layer(page, layer)
            ids = [n for n in await page.evaluate("() => window.__bench.node_ids()") if not n.endswith(":bias")]
            picks = ids[::2][:: max(1, len(ids) // 2 // clicks_per_layer)][:clicks_per_layer]
            print(f"layer-half {layer}: clicking {picks}", flush=True)
            for node_id in picks:
                clicks.append(await click_node(page, node_id))
            if i == 0:  # with the Task docs tab open: a click also renders a page of task docs
                await page.get_by_text("Task docs", exact=True).click()
                await asyncio.sleep(1.0)
                for node_id in ids[1::2][:: max(1, len(ids) // 2 // clicks_per_layer)][:clicks_per_layer]:
                    clicks_task.append(
                        await click_node(
                            page, node_id, "window.__bench.task_text() !== window.__before", "window.__bench.task_text()"
                        )
                    )
                await page.get_by_text("Pretraining snippets", exact=True).click()
                await asyncio.sleep(1.0)
        results["click node (header, connections, snippets)"] = clicks
        results["click node, Task docs tab open (4 pairs of task docs)"] = clicks_task
        report(results)

        # Whole circuit: open the tab, then move the threshold (set on the slider's model, as a drag ends).
        whole = []
        t_open = await timed(
            page, lambda: page.get_by_text("Whole circuit", exact=True).click(), "() => window.__bench.whole_edges() > 0"
        )
        results["open whole-circuit graph"] = [t_open]
        for thr in (0.3, 0.05, 0.5, 0.02, 0.2):
            whole.append(
                await timed(
                    page,
                    lambda t=thr: page.evaluate(
                        "(t) => { const s = window.__bench.models().find(m => m.type === 'Slider' && "
                        "String(m.title).includes('edge threshold')); s.value = t; }",
                        t,
                    ),
                    "() => window.__bench.whole_edges() !== window.__before",
                    before_js="window.__bench.whole_edges()",
                )
            )
        results["whole-circuit graph: threshold"] = whole
        report(results)
        await ctx.close()

        # Concurrent first visits, three ways (browser pages, light clients and the server all on these 2 cores):
        # (a) the server's share: `sessions` light clients at once, each doing what a browser asks of the server
        #     (the page HTML, then the document over the WebSocket, then "document ready", after which the
        #     server builds the page's post-load parts) without any rendering;
        # (b) one Chromium page while `sessions - 1` light clients load at once (the others' browsers are on
        #     their own machines: what one visitor waits for among `sessions` arriving together);
        # (c) `sessions` Chromium pages at once, each timed to its drawn graph (20 browsers rendering on the
        #     server's 2 cores).
        await settle()
        meter = CpuMeter(server)
        light = await asyncio.gather(*(light_session(base) for _ in range(sessions)))
        print(f"(a) {meter.report()}", flush=True)
        results[f"{sessions} concurrent light clients: page + document (the server's share)"] = [x[0] for x in light]
        results[f"{sessions} concurrent light clients: ... + post-load parts"] = [x[1] for x in light]
        report(results)

        await settle()
        mixed, phases = [], []
        for _ in range(3):
            meter = CpuMeter(server)
            others = [asyncio.ensure_future(light_session(base)) for _ in range(sessions - 1)]
            c, page, ms = await open_session(browser, base)
            mixed.append(ms)
            phases.append(await page.evaluate("() => window.__bench.phases()"))
            await asyncio.gather(*others)
            print(f"(b) {meter.report()}", flush=True)
            await c.close()
            await settle()
        results[f"1 browser among {sessions} concurrent new sessions ({sessions - 1} light clients)"] = mixed
        for i, step in enumerate(("page HTML received", "JavaScript run (DOMContentLoaded)", "document received and built")):
            results[f"   of which (that browser): {step}"] = [p[i] for p in phases]
        report(results)

        async def one():
            try:
                c, _, ms = await open_session(browser, base)
                return c, ms
            except Exception:  # noqa: BLE001 (a session that never drew within the timeout counts as one)
                return None, float("inf")

        t = time.perf_counter()
        meter = CpuMeter(server)
        out = await asyncio.gather(*(one() for _ in range(sessions)))
        wall = (time.perf_counter() - t) * 1000
        print(f"(c) {meter.report()}", flush=True)
        results[f"{sessions} concurrent Chromium sessions (each: navigation to a drawn graph)"] = [ms for _, ms in out]
        for c, _ in out:
            if c is not None:
                await c.close()
        await browser.close()
    return results, wall


async def settle(seconds: float = 5.0):
    """A pause between phases: the server finishes the previous phase's post-load work and closes its sessions."""
    await asyncio.sleep(seconds)


async def light_session(url: str, timeout: float = 600) -> tuple[float, float]:
    """A new visitor without a browser: what a browser asks of the server, nothing rendered. Returns ms from the
    page request to (the document received over the WebSocket, the post-load parts received).

    Bokeh's protocol: a message is a header, a metadata and a content frame (JSON), then two frames per binary
    buffer; the server sends ACK on connect; the client asks for the document (PULL-DOC-REQ) and, once it has
    drawn it, sends the `document_ready` event, on which the app builds its post-load parts (the detail tabs and
    the sidebar's Pins group; before that change, checkouts such as a `--code` baseline built the Embeddings view
    and the Node tab's inner tabs there) and sends them (a PATCH-DOC setting `children`)."""
    from tornado.httpclient import AsyncHTTPClient, HTTPRequest
    from tornado.websocket import websocket_connect

    t0 = time.perf_counter()
    page = (await AsyncHTTPClient().fetch(url, request_timeout=timeout)).body.decode()
    token = re.search(r'"token":"([^"]+)"', page).group(1)
    ws_url = url.replace("http://", "ws://", 1).replace("/app?", "/app/ws?", 1)
    origin = "http://" + url.split("/")[2]
    conn = await websocket_connect(
        HTTPRequest(ws_url, headers={"Origin": origin}, request_timeout=timeout), subprotocols=["bokeh", token]
    )

    async def read():
        header = json.loads(await conn.read_message())
        await conn.read_message()  # metadata
        content = await conn.read_message()
        for _ in range(2 * header.get("num_buffers", 0)):
            await conn.read_message()
        return header["msgtype"], content

    async def send(msgtype, content):
        for frame in (json.dumps({"msgid": uuid.uuid4().hex, "msgtype": msgtype}), "{}", json.dumps(content)):
            await conn.write_message(frame)

    try:
        while (await read())[0] != "ACK":
            pass
        await send("PULL-DOC-REQ", {})
        while (await read())[0] != "PULL-DOC-REPLY":
            pass
        t_doc = (time.perf_counter() - t0) * 1000
        ready = {
            "kind": "MessageSent",
            "msg_type": "bokeh_event",
            "msg_data": {"type": "event", "name": "document_ready", "values": {"type": "map"}},
        }
        await send("PATCH-DOC", {"events": [ready]})
        while True:
            kind, content = await asyncio.wait_for(read(), timeout)
            if kind == "PATCH-DOC" and '"attr":"children"' in content.replace(" ", ""):
                break
        return t_doc, (time.perf_counter() - t0) * 1000
    finally:
        conn.close()


def main(data: Path, sessions: int, clicks_per_layer: int, max_layers: int, code: Path = ROOT, options: list[str] | None = None):
    import duckdb

    con = duckdb.connect(str(data / "circuits.duckdb"), read_only=True)
    run_id, n_nodes = con.execute(
        "SELECT run_id, n_nodes FROM runs ORDER BY n_nodes DESC LIMIT 1"
    ).fetchone()  # the biggest circuit
    layers = [
        r[0]
        for r in con.execute(
            "SELECT DISTINCT layer || '.' || half AS lh, layer, half FROM nodes WHERE run_id = ? ORDER BY layer, half", [run_id]
        ).fetchall()
    ][:max_layers]
    con.close()
    port = serve.free_port()
    log_path = data / "bench-serve.log"
    options = serve_options(code) if options is None else options
    print(
        f"browser bench of the viewer in {code}: {CHROMIUM}, circuit {run_id} ({n_nodes} nodes), layer-halves {layers}; server log {log_path}"
    )
    print("server:", " ".join(serve.command(port, options=options)[1:]))
    print(f"load average (1, 5, 15 min) before: {', '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    proc, log = serve.start(data, port, log_path, code, options=options)
    try:
        results, wall = asyncio.run(run(f"http://127.0.0.1:{port}/app", run_id, layers, sessions, clicks_per_layer, proc.pid))
        usage = server_usage(proc.pid)
    finally:
        serve.stop(proc, log)
    print(f"load average (1, 5, 15 min) after: {', '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    report(results)
    print(
        f"{sessions} concurrent Chromium sessions: all drawn after {wall:.0f} ms (wall-clock, browsers and server on the same 2 cores)"
    )
    print(
        "server processes (pid: peak RSS, CPU over the run): "
        + "; ".join(f"{pid}: {hwm:.0f} MB, {cpu:.1f} s" for pid, hwm, cpu in usage)
        + f"; peak RSS summed {sum(u[1] for u in usage):.0f} MB (pages shared after a fork counted in each)"
    )


class CpuMeter:
    """Where the machine's CPU went between its creation and `report()`: the server (its process group), this bench
    process (the light clients run in it, with Playwright's client side), Chromium and Playwright's driver (this
    process's other descendants; a process that ended and was reaped is counted in its parent's children time),
    and everything else on the machine (the other jobs on the same cores), from /proc (Linux). The load generator
    runs on the server's cores: its share says how much of a concurrent phase's time is the bench itself."""

    def __init__(self, server_group: int | None):
        self.server_group = server_group
        self.t0, self.before = time.perf_counter(), self.sample()

    def sample(self) -> dict[str, float]:
        tick = os.sysconf("SC_CLK_TCK")
        with open("/proc/stat") as f:
            cpu = [int(x) for x in f.readline().split()[1:]]
        out = {"server": 0.0, "bench process": 0.0, "Chromium + Playwright driver": 0.0}
        out["machine busy"] = (sum(cpu) - cpu[3] - cpu[4]) / tick  # all but idle and iowait
        me, procs = os.getpid(), {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                f = (d / "stat").read_text().rsplit(")", 1)[1].split()
                # parent, process group, utime + stime, cutime + cstime (its children that ended and were reaped)
                procs[int(d.name)] = (int(f[1]), int(f[2]), (int(f[11]) + int(f[12])) / tick, (int(f[13]) + int(f[14])) / tick)
            except (OSError, ValueError, IndexError):  # ended meanwhile
                continue

        def descends(pid):
            seen = set()
            while pid in procs and pid not in seen:
                seen.add(pid)
                pid = procs[pid][0]
                if pid == me:
                    return True
            return False

        for pid, (_, group, own, reaped) in procs.items():
            if group == self.server_group:
                out["server"] += own + reaped
            elif pid == me:
                out["bench process"] += own
            elif descends(pid):
                out["Chromium + Playwright driver"] += own + reaped
        return out

    def report(self) -> str:
        wall = time.perf_counter() - self.t0
        after = self.sample()
        d = {k: after[k] - self.before[k] for k in after}
        own = d["server"] + d["bench process"] + d["Chromium + Playwright driver"]
        d["other processes"] = max(0.0, d["machine busy"] - own)
        return (
            f"CPU over {wall:.1f} s (x {os.cpu_count()} cores = {wall * os.cpu_count():.1f} core-s): "
            + ", ".join(f"{k} {v:.1f} s" for k, v in d.items())
            + f"; load average {os.getloadavg()[0]:.1f}"
        )


def server_usage(group: int) -> list[tuple[int, float, float]]:
    """(pid, peak RSS MB, CPU s) of every process of the server's process group (`--num-procs N`: the parent,
    which only watches its children, and the N forked servers), from /proc (Linux), read before it stops."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if os.getpgid(int(d.name)) != group:
                continue
            status = dict(line.split(":", 1) for line in (d / "status").read_text().splitlines() if ":" in line)
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError):  # ended meanwhile
            continue
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        out.append((int(d.name), int(status["VmHWM"].split()[0]) / 1024, cpu))
    return sorted(out)


def report(results):
    """The table of results so far (printed after each phase: a later failure keeps the earlier numbers)."""
    targets = {"click node (header": ("median", 150), "cold start, a new": ("median", 1500), "concurrent": ("max", 5000)}
    # The 5 s target is per session of 20 loading together; each concurrent line is judged by its slowest session.
    print(f"load average now: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"{'in the browser (ms, action to painted frame)':72s} {'n':>3s} {'median':>8s} {'p95':>8s} {'max':>8s}  target")
    for name, xs in results.items():
        if not xs:
            continue
        target = next(((kind, v) for k, (kind, v) in targets.items() if name.startswith(k) or k in name), None)
        verdict = ""
        if target:
            got = statistics.median(xs) if target[0] == "median" else max(xs)
            verdict = f"{target[0]} <= {target[1]}: {'ok' if got <= target[1] else 'OVER'} ({got / target[1]:.2f}x)"
        print(f"{name:72s} {len(xs):3d} {statistics.median(xs):8.0f} {pct(xs, 0.95):8.0f} {max(xs):8.0f}  {verdict}", flush=True)
