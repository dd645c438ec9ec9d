"""Serving choices of the viewer, measured with the functions of bench/viewer_browser.py (run it from the project root):

    python bench/viewer_serving.py cold [--code DIR] [--visits 8]
        the cold start of a new visitor on this checkout and on DIR (e.g. a main checkout), both servers up at
        once and the visits alternated between them, so that both see the same machine load
    python bench/viewer_serving.py concurrent [--code DIR] [--sessions 20] [--serve-options '...']
        N light clients at once (the server's share), then twice one Chromium page among N-1 light clients,
        with that page's phases (HTML received, JavaScript run, document drawn)
    python bench/viewer_serving.py clicks [--code DIR] [--visits 4] [--clicks 6]
        node clicks (action to painted frame, as `bench/viewer.py --browser` times them) on this checkout and on
        DIR, both servers up and the sessions alternated between them (each session: 2 layer-halves x N clicks),
        so that both see the same machine load; with each click's phases in the page (the tap sent, the
        server's answer in: WebSocket messages hooked), the bytes it received and the Bokeh models it added
    python bench/viewer_serving.py build [--code DIR] [--visits 4] [--sessions 12]
        a session's server CPU in-process, without a browser, as a served session spends it: its first document
        (`create_app`, the Bokeh models, the document serialized as the WebSocket sends it) and then its post-load
        parts (Panel's onload callbacks, deferred as in a served page, and the patch they send), for this
        checkout and DIR, each in a fresh process, processes alternated (`--visits` each, `--sessions` timed per
        process after 3 untimed)

Uses the release-scale tables of `python bench/viewer.py` (built there, once, into /tmp/circuits-viewer-bench).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import viewer_browser as vb  # noqa: E402 (after the path set-up)

from viewer import serve  # noqa: E402

RUN = "csp_yolo2_synth/bracket_counting/sweep/2000"  # the bench tables' biggest circuit


def start(data: Path, code: Path, options: list[str] | None, name: str):
    port = serve.free_port()
    options = vb.serve_options(code) if options is None else options
    proc, log = serve.start(data, port, data / f"bench-serving-{name}.log", code, options=options)
    print(f"{name}: {code}, options {options}")
    return proc, log, f"http://127.0.0.1:{port}/app?run={RUN}"


async def cold(urls: dict, visits: int):
    from playwright.async_api import async_playwright

    out = {name: [] for name in urls}
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=vb.CHROMIUM, args=vb.CHROME_ARGS)
        for url in urls.values():  # each server's first session: not counted
            c, _, _ = await vb.open_session(browser, url)
            await c.close()
        await vb.settle(3)
        names = list(urls)
        for i in range(visits):
            for name in names if i % 2 == 0 else names[::-1]:
                c, page, ms = await vb.open_session(browser, urls[name])
                out[name].append([ms, *await page.evaluate("() => window.__bench.phases()")])
                await c.close()
                await vb.settle(2)
        await browser.close()
    for name, rows in out.items():
        med = [statistics.median(r[j] for r in rows) for j in range(4)]
        print(
            f"{name}: cold start median {med[0]:.0f} ms (page HTML {med[1]:.0f}, JavaScript run {med[2]:.0f}, "
            f"document drawn {med[3]:.0f}); each: {[round(r[0]) for r in rows]}"
        )


# The page's WebSocket messages with their arrival time (page clock) and size; outgoing ones marked "out".
WS_HOOK = """
(() => {
  const Native = window.WebSocket;
  window.__ws = [];
  window.WebSocket = function (...args) {
    const ws = new Native(...args);
    ws.addEventListener('message', (e) => window.__ws.push([performance.now(), typeof e.data === 'string' ? e.data.length : e.data.byteLength ?? e.data.size]));
    const send = ws.send.bind(ws);
    ws.send = (d) => { window.__ws.push([performance.now(), 'out']); return send(d); };
    return ws;
  };
  window.WebSocket.prototype = Native.prototype;
  Object.assign(window.WebSocket, Native);
})();
"""


async def clicks(urls: dict, visits: int, per_layer: int):
    from playwright.async_api import async_playwright

    out = {name: [] for name in urls}
    loads = {name: [] for name in urls}
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=vb.CHROMIUM, args=vb.CHROME_ARGS)
        names = list(urls)
        for i in range(visits):
            for name in names if i % 2 == 0 else names[::-1]:
                loads[name].append(os.getloadavg()[0])
                c = await browser.new_context(viewport={"width": 1400, "height": 1400})
                page = await c.new_page()
                await page.add_init_script(WS_HOOK)
                await page.add_init_script(vb.HELPERS)
                await page.goto(urls[name], wait_until="commit", timeout=180000)
                await page.wait_for_function("() => window.__bench.ready()", polling="raf", timeout=300000)
                await vb.settle(3)  # the post-load parts built and drawn
                for layer in ("0.attn", "1.mlp"):
                    await vb.pick_layer(page, layer)
                    ids = [n for n in await page.evaluate("() => window.__bench.node_ids()") if not n.endswith(":bias")]
                    for node_id in ids[i % 3 :: max(1, len(ids) // per_layer)][:per_layer]:
                        t0, n0 = await page.evaluate(
                            "() => { window.__ws = []; return [performance.now(), window.__bench.models().length]; }"
                        )
                        ms = await vb.click_node(page, node_id)
                        await asyncio.sleep(0.3)  # messages after the measured frame (none expected) are counted too
                        msgs, n1 = await page.evaluate("() => [window.__ws, window.__bench.models().length]")
                        sent = [t for t, size in msgs if size == "out"]
                        got = [(t, size) for t, size in msgs if size != "out"]
                        answer = next((t for t, size in got if size > 1000), None)  # the patch (small ones: acks)
                        out[name].append(
                            (ms, sent[0] - t0 if sent else -1, answer - t0 if answer else -1, sum(x for _, x in got), n1 - n0)
                        )
                        await asyncio.sleep(0.3)
                await c.close()
        await browser.close()
    for name, rows in out.items():
        xs = [r[0] for r in rows]
        med = [statistics.median(r[j] for r in rows) for j in range(1, 5)]
        print(
            f"{name}: click node median {statistics.median(xs):.0f} ms, p95 {vb.pct(xs, 0.95):.0f} ({len(xs)} clicks; "
            f"load average at each session's start {', '.join(f'{x:.1f}' for x in loads[name])}); medians: tap sent at "
            f"{med[0]:.0f} ms, the server's answer in at {med[1]:.0f} ms, {med[2] / 1000:.0f} KB received, {med[3]:.0f} "
            "Bokeh models added per click"
        )


async def concurrent(url: str, sessions: int, server: int | None = None):
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=vb.CHROMIUM, args=vb.CHROME_ARGS)
        c, _, _ = await vb.open_session(browser, url)
        await c.close()
        await vb.settle(3)
        meter = vb.CpuMeter(server)
        light = await asyncio.gather(*(vb.light_session(url) for _ in range(sessions)))
        docs = [x[0] for x in light]
        print(
            f"{sessions} light clients: page + document max {max(docs):.0f} ms (median {statistics.median(docs):.0f}); "
            f"+ post-load parts max {max(x[1] for x in light):.0f} ms; {meter.report()}"
        )
        for _ in range(2):
            await vb.settle(5)
            meter = vb.CpuMeter(server)
            others = [asyncio.ensure_future(vb.light_session(url)) for _ in range(sessions - 1)]
            c, page, ms = await vb.open_session(browser, url)
            phases = await page.evaluate("() => window.__bench.phases()")
            done = await asyncio.gather(*others)
            print(
                f"1 Chromium among {sessions - 1} light clients: {ms:.0f} ms (page HTML {phases[0]:.0f}, JavaScript run "
                f"{phases[1]:.0f}, document drawn {phases[2]:.0f}); the light clients' documents max {max(x[0] for x in done):.0f} ms; "
                f"{meter.report()}"
            )
            await c.close()
        await browser.close()


# One process's measure for `build`: run with the checkout's own `viewer` first on sys.path.
BUILD_SNIPPET = r"""
import json, os, statistics, sys, time
import panel as pn
from bokeh.document import Document
from bokeh.protocol import Protocol
from panel.io.state import set_curdoc
from viewer.app import create_app

pn.extension()
try:  # what the served app of this checkout installs (viewer/cheap.py; absent in older checkouts)
    from viewer import cheap
    cheap.install()
except ImportError:
    pass
res = {"first document": [], "post-load parts": [], "models in the first document": [], "models after load": []}
for i in range(int(sys.argv[1]) + 3):
    doc, onload = Document(), []
    with set_curdoc(doc):
        real = pn.state.onload
        pn.state.onload = lambda cb, threaded=False: onload.append(cb)  # as in a served session: after the page is drawn
        try:
            c0 = time.process_time()
            page = create_app(url={"run": sys.argv[2]})
            page.server_doc(doc)
        finally:
            pn.state.onload = real
        Protocol().create("PULL-DOC-REPLY", "req", doc)  # the document as the WebSocket sends it
        c1 = time.process_time()
        n = len(doc.models)
        events = []
        doc.on_change(lambda event: events.append(event))
        for cb in onload:
            cb()
        if events:
            Protocol().create("PATCH-DOC", events)
        c2 = time.process_time()
    if i >= 3:
        for k, v in zip(res, ((c1 - c0) * 1000, (c2 - c1) * 1000, n, len(doc.models))):
            res[k].append(v)
print(json.dumps({k: statistics.median(v) for k, v in res.items()}))
"""


def build(code: Path | None, visits: int, sessions: int, data: Path):
    import json
    import subprocess

    checkouts = {"this checkout": ROOT, **({"other": code} if code else {})}
    for name, path in checkouts.items():
        print(f"{name}: {path}")
    got = {name: [] for name in checkouts}
    for v in range(visits):
        for name in checkouts if v % 2 == 0 else reversed(checkouts):
            env = {**os.environ, "CIRCUITS_DATA": str(data), "PYTHONPATH": str(checkouts[name])}
            load = os.getloadavg()[0]
            out = subprocess.run(
                [sys.executable, "-c", BUILD_SNIPPET, str(sessions), RUN],
                cwd=checkouts[name],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            got[name].append(r)
            print(
                f"{name:14s} load {load:4.1f}: first document {r['first document']:6.1f} ms CPU, post-load parts "
                f"{r['post-load parts']:6.1f} ms ({r['models in the first document']:.0f} models, {r['models after load']:.0f} after load)",
                flush=True,
            )
    for name, rs in got.items():
        first, post = [r["first document"] for r in rs], [r["post-load parts"] for r in rs]
        print(
            f"{name}: median of the processes' medians: first document {statistics.median(first):.0f} ms, "
            f"post-load parts {statistics.median(post):.0f} ms, together {statistics.median([a + b for a, b in zip(first, post, strict=True)]):.0f} ms"
        )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["cold", "concurrent", "clicks", "build"])
    ap.add_argument("--data", default="/tmp/circuits-viewer-bench")
    ap.add_argument(
        "--code", default=None, help="cold, clicks, build: the other checkout; concurrent: serve this checkout instead"
    )
    ap.add_argument("--serve-options", default=None, help="concurrent: `panel serve` options instead of the checkout's own")
    ap.add_argument("--visits", type=int, default=8)
    ap.add_argument("--sessions", type=int, default=None, help="concurrent: light clients (20); build: sessions per process (12)")
    ap.add_argument("--clicks", type=int, default=6, help="clicks: per layer-half and session")
    args = ap.parse_args(argv)
    data = Path(args.data)
    if not (data / "circuits.duckdb").exists():
        sys.exit(f"{data}: no bench tables; build them with `python bench/viewer.py` first")
    print(f"load average (1, 5, 15 min) before: {', '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    servers = {}
    try:
        if args.what == "build":
            build(Path(args.code) if args.code else None, args.visits, args.sessions or 12, data)
        elif args.what in ("cold", "clicks"):
            servers["this checkout"] = start(data, ROOT, None, "this")
            if args.code:
                servers["other"] = start(data, Path(args.code), None, "other")
            urls = {name: s[2] for name, s in servers.items()}
            asyncio.run(cold(urls, args.visits) if args.what == "cold" else clicks(urls, args.visits, args.clicks))
        else:
            options = None if args.serve_options is None else shlex.split(args.serve_options)
            servers["served"] = start(data, Path(args.code) if args.code else ROOT, options, "served")
            asyncio.run(concurrent(servers["served"][2], args.sessions or 20, servers["served"][0].pid))
    finally:
        for proc, log, _ in servers.values():
            serve.stop(proc, log)
    print(f"load average (1, 5, 15 min) after: {', '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
