"""The explorer's widgets and the wiring from state changes to view updates (layout is in app.py).

Every interaction changes `Explorer` state; one dispatcher decides which views to refresh.
Views in hidden tabs are only marked stale and refreshed when their tab is opened, so a click
costs the visible views only.
"""

from __future__ import annotations

import html
import itertools
import time
import urllib.parse
from functools import partial

import panel as pn
from panel.io.state import set_curdoc

from viewer import models
from viewer.state import URL_KEYS, Explorer, UrlState, request_args
from viewer.views import graph as graph_views
from viewer.views.compare import CompareView
from viewer.views.detail import DetailView
from viewer.views.embeddings import EmbeddingView
from viewer.views.export import ExportView
from viewer.views.faithfulness import FaithfulnessView
from viewer.views.markup import HtmlBox, NodePicker, plain

DETAIL_TABS = ("Node", "Embeddings", "Curves", "Compare", "Faithfulness", "Export")
GRAPH_TABS = ("Layer-half", "Whole circuit")
NOTE_STYLE = {
    "background": "#fff3cd",
    "border": "1px solid #ffe69c",
    "border-radius": "4px",
    "padding": "6px 10px",
    "color": "#664d03",
}


def layer_label(row: dict) -> str:
    def fmt(x):
        return "n/a" if x is None or x != x else f"{x:+.3f}"  # null or NaN

    mark = "★ " if row["marked"] else "   "
    return f"{mark}{row['layer_half']}  Δ {fmt(row['delta'])} (released reading {fmt(row['delta_released'])}) · {row['n_nodes']} nodes"


def summary_html(r: dict) -> str:
    """The sidebar's summary of a run (its row of the runs table)."""
    return (
        f"<div><b>{int(r['n_nodes'])}</b> nodes in the circuit (of {int(r['num_total_nodes'])} prunable)</div>"
        f"<div>task loss: unpruned <b>{r['loss']:.4f}</b> → circuit <b>{r['interv_loss']:.4f}</b></div>"
        f"<div style='color:#666;font-size:11px'>losses corrected by the factor {r['loss_factor']:g} "
        f"(raw {r['loss_raw']:.4f} → {r['interv_loss_raw']:.4f})</div>"
    )


def layer_options(layers) -> dict:
    """Label -> layer_half of the layer picker."""
    return {layer_label(row): row["layer_half"] for row in layers.iter_rows(named=True)}


# Sessions of this server process that are being built or are loading in a browser: session number -> when
# its build started; removed when the browser reports the page drawn (Panel's onload). While any other session
# is loading, a drawn session's post-load parts (the detail tabs, the Pins group: ~40% of a session's build) wait:
# when many visitors arrive together, the server builds and sends their first pages first. At most a few seconds:
# visitors arriving one after another keep some session loading all the time, and a drawn page waiting for its
# detail tabs longer would be a page without them.
_loading: dict[int, float] = {}
_session_numbers = itertools.count()
LOADING_FORGET_SECONDS = 30.0  # a page requested and never loaded (no browser, a closed tab) stops counting then
POST_LOAD_MAX_WAIT_SECONDS = 5.0  # and no post-load part waits longer than this
POST_LOAD_POLL_MS = 250


def post_load_waits(me: int, since: float, now: float) -> bool:
    """Whether session `me`, drawn at `since`, still leaves the CPU to other sessions of the process that are loading."""
    if now - since >= POST_LOAD_MAX_WAIT_SECONDS:
        return False
    return any(k != me and now - t < LOADING_FORGET_SECONDS for k, t in list(_loading.items()))


def curves_view(state):
    """The Curves tab, imported on first open: hvPlot and HoloViews take ~1 s to import, which the first page
    a server shows would otherwise wait for."""
    from viewer.views.curves import CurvesView

    return CurvesView(state)


class ExplorerApp:
    def __init__(self, url: dict | None = None, sync_url: bool = False):
        self.state = state = Explorer()
        self.url_state = UrlState()  # the URL's query values (strings), as last written
        self._location = pn.state.location if sync_url else None
        if url is None:
            url = request_args(pn.state.session_args) if sync_url else {}
        state.apply_url(url)
        self._session = next(_session_numbers)
        if self._location is not None:
            _loading[self._session] = time.monotonic()
            pn.state.onload(lambda: _loading.pop(self._session, None))
            # Query changes made while the page is built do not reach the browser: push the checked state once loaded.
            pn.state.onload(self._write_url)
            # The browser reports its URL (the link as typed) when its Location view starts, and that may come after
            # the page's onload has written the state (seen about once in four loads): answer such a report with the state.
            self._location.param.watch(self._url_reported, "search")
        self._updating = False

        # Sidebar widgets.
        self.model = pn.widgets.Select(label="model")
        self.task = pn.widgets.Select(label="task")
        self.sweep = pn.widgets.Select(label="sweep")
        self.k = pn.widgets.Select(label="k")
        self.summary = HtmlBox()
        self.layer = pn.widgets.Select(label="layer-half (★ = delta > 0.3)", size=10, sizing_mode="stretch_width")
        self.threshold = pn.widgets.FloatSlider.from_param(
            state.param.threshold, label="edge threshold (fraction of strongest)", step=0.01
        )
        self.node = NodePicker(self._pick_node)
        self.pin_label = pn.widgets.TextInput(label="pin label", placeholder="label for the selected node")
        self.pin = pn.widgets.Button(label="pin / update label", color="default")
        self.unpin = pn.widgets.Button(label="unpin", color="light")
        self.pins = HtmlBox()
        # Notes quote URL values and typed ids: escaped HTML in a Div, never Markdown (which passes raw HTML through).
        self.notes = HtmlBox(style=NOTE_STYLE)
        self.notes.div.visible = False

        # Views. The page's first document holds what its first paint shows (app.py: the sidebar's pickers and the
        # graph tabs); the detail tabs below the graph (the Node view, the other tabs' headers) and the sidebar's Pins
        # group are added right after the page has loaded (`after_load`: ~40% of a session's build). Every other
        # view is built when its tab is first opened: the Embeddings view (two figures), the Node tab's Task docs
        # and Attention widgets, the whole-circuit graph, Curves, Compare, Faithfulness, Export. Built with every
        # page, the Embeddings view and the inner tabs' widgets had cost each session ~60% more server CPU after
        # its build; built on open they cost the first open of that tab (bench/README.md "Viewer: cheaper
        # sessions").
        self.graph = graph_views.CircuitGraph(self._select_node, title="layer-half")
        self._lazy = {}
        self._holders = {GRAPH_TABS[1]: pn.Column(sizing_mode="stretch_width")}
        self.graph_tabs = pn.Tabs(
            (GRAPH_TABS[0], pn.pane.Bokeh(self.graph.figure, sizing_mode="stretch_width")),
            (GRAPH_TABS[1], self._holders[GRAPH_TABS[1]]),
            sizing_mode="stretch_width",
        )
        self.detail = self.detail_tabs = None  # `build_detail`, after load
        self.stale: set[str] = set()
        self._whole_key = (None, None)  # (run, threshold) the whole-circuit graph shows

        # Widget -> state.
        for w in (self.model, self.task, self.sweep, self.k):
            w.param.watch(self._picked_run, "value")
        self.layer.param.watch(lambda e: self._from_widget("layer", e.new), "value")
        self.pin.on_click(self._pin)
        self.unpin.on_click(self._unpin)
        self.graph_tabs.param.watch(lambda e: self._refresh_stale(), "active")
        # State -> views and URL.
        state.param.watch(self._changed, ["run", "layer", "node", "threshold", "pins", "compare", "doc", "zero_centred"])
        self._update({"run"})
        self._show_notes()

    def after_load(self, place) -> None:
        """Call `place()` (it puts the parts of the page that its first paint does not need into the page) once the
        page has loaded, in a tick of its own: the URL written back on load goes out first; and once no other
        session of the process is loading (`_loading`). Without a served page (tests, bench) at once."""
        pn.state.onload(lambda: pn.state.execute(partial(self._after_load_when_quiet, place), schedule=True))

    def _after_load_when_quiet(self, place, doc=None, since=None):
        doc = doc if doc is not None else pn.state.curdoc
        now = time.monotonic()
        since = now if since is None else since
        if doc is not None and doc.session_context is not None and post_load_waits(self._session, since, now):
            doc.add_timeout_callback(partial(self._after_load_when_quiet, place, doc, since), POST_LOAD_POLL_MS)
            return
        if doc is None:
            self._after_load(place)
            return
        with set_curdoc(doc):
            self._after_load(place)

    def _after_load(self, place):
        with pn.io.hold():
            place()
            self._refresh_stale()  # the Node tab: the node of the link, if any

    def build_detail(self):
        """The detail tabs (once): the Node view, the other tabs' holders (their views are built on first open)."""
        if self.detail_tabs is None:
            self.detail = DetailView(self.state)
            self._holders.update({name: pn.Column(sizing_mode="stretch_width") for name in DETAIL_TABS[1:]})
            self.detail_tabs = pn.Tabs(
                (DETAIL_TABS[0], self.detail.panel),
                *((t, self._holders[t]) for t in DETAIL_TABS[1:]),
                sizing_mode="stretch_width",
            )
            self.detail_tabs.param.watch(lambda e: self._refresh_stale(), "active")
        return self.detail_tabs

    def _view(self, tab):
        """The view of a tab built on first open."""
        if tab not in self._lazy:
            if tab in DETAIL_TABS:
                self.build_detail()
            make = {
                GRAPH_TABS[1]: lambda: graph_views.CircuitGraph(
                    self._select_node,
                    height=640,
                    node_size=7,
                    title="whole circuit: rows per location in bands per layer-half; residual writes linked to later reads of the channel",
                ),
                "Embeddings": lambda: EmbeddingView(self.state),
                "Curves": lambda: curves_view(self.state),
                "Compare": lambda: CompareView(self.state),
                "Faithfulness": lambda: FaithfulnessView(self.state),
                "Export": lambda: ExportView(self.state),
            }[tab]
            view = self._lazy[tab] = make()
            self._holders[tab].append(
                pn.pane.Bokeh(view.figure, sizing_mode="stretch_width") if tab == GRAPH_TABS[1] else view.panel
            )
        return self._lazy[tab]

    whole = property(lambda self: self._view(GRAPH_TABS[1]))
    embeddings = property(lambda self: self._view("Embeddings"))
    curves = property(lambda self: self._view("Curves"))
    compare = property(lambda self: self._view("Compare"))
    faithfulness = property(lambda self: self._view("Faithfulness"))
    export = property(lambda self: self._view("Export"))

    # --- widget -> state --------------------------------------------------------------------

    def _from_widget(self, name, value):
        if not self._updating and value is not None and getattr(self.state, name) != value:
            setattr(self.state, name, value)

    def _picked_run(self, event):
        if self._updating:
            return
        # Narrow by each picker down to the one changed; the pickers after it follow the first matching run.
        choices = []
        for widget, column in ((self.model, "model"), (self.task, "task"), (self.sweep, "sweep"), (self.k, "k_label")):
            choices.append((column, widget.value))
            if widget is event.obj:
                break
        run = models.pick_run(choices)
        if run is not None:
            self.state.set_run(run)

    def _pick_node(self, node_id: str):
        """A node id typed in the picker: any node of the run (completions list the shown layer-half's)."""
        if self._updating or node_id == self.state.node:
            return
        if node_id and models.node(self.state.run, node_id) is None:
            self.node.show(self.state.node)
            self._show_notes([f"No node {node_id!r} in this circuit."])
            return
        self.state.node = node_id

    def _select_node(self, node_id: str):
        self.state.node = node_id

    def _pin(self, _=None):
        if self.state.node:
            self.state.pins = {**self.state.pins, self.state.node: self.pin_label.value}

    def _unpin(self, _=None):
        if self.state.node in self.state.pins:
            self.state.pins = {k: v for k, v in self.state.pins.items() if k != self.state.node}

    # --- state -> views ---------------------------------------------------------------------

    def _changed(self, *events):
        # One message to the browser per interaction: unheld, each property change went out on its own and
        # BokehJS re-laid out the page after each (a click sent a dozen messages).
        with pn.io.hold():
            self._update({e.name for e in events})

    def _update(self, names: set):
        s = self.state
        if "run" in names:
            self._sync_run_widgets()
            if self.notes.div.visible or models.duplicate_nodes(s.run):
                self._show_notes()
            self.stale = {"whole", *DETAIL_TABS}
            self._show_graph()
        elif "layer" in names:
            self._set_widget(self.layer, s.layer)
            self._show_graph()
        elif "threshold" in names:
            self.graph.show_threshold(s.threshold)
            self.stale.add("whole")
        if "node" in names and "run" not in names:
            node = models.node(s.run, s.node) if s.node else None
            # Follow the node into its layer-half (nested update); final_resid and "other" nodes have none.
            if node is not None and node["half"] in ("attn", "mlp") and f"{int(node['layer'])}.{node['half']}" != s.layer:
                s.layer = f"{int(node['layer'])}.{node['half']}"
            self.node.show(s.node)
            self.graph.mark(s.pins, s.node)
            self.stale.update({"whole", "Node", "Embeddings"})
        if "pins" in names:
            self.graph.mark(s.pins, s.node)
            self.stale.update({"whole", "Node"})
            self._show_pins()
        if "compare" in names:
            self.stale.add("Compare")
        if "zero_centred" in names and "Node" not in self.stale:
            self._when_visible("Node", self.detail.show_task)
        if "doc" in names and "Node" not in self.stale:
            self._when_visible("Node", self.detail.show_attention)
        self._refresh_stale()
        if set(names) & set(URL_KEYS):
            self.url_state.param.update(**s.to_url())
            self._write_url()

    def _url_search(self) -> str:
        """The state as the URL's query: the strings `apply_url` reads back (empty values left out)."""
        query = {k: v for k, v in self.state.to_url().items() if v}
        return "?" + urllib.parse.urlencode(query) if query else ""

    def _write_url(self):
        """The state into the browser's URL.

        Not `location.update_query`: it re-parses the current query as JSON and writes a dict back as Python repr."""
        if self._location is not None:
            search = self._url_search()
            if self._location.search != search:
                self._location.search = search

    def _url_reported(self, event):
        if event.new != self._url_search():  # not our own write: the browser's URL, behind the state
            pn.state.execute(self._write_url, schedule=True)

    def _when_visible(self, tab, fn):
        if self.detail_tabs is not None and DETAIL_TABS[self.detail_tabs.active] == tab:
            fn()
        else:
            self.stale.add(tab)

    def _refresh_stale(self):
        s = self.state
        if "whole" in self.stale and GRAPH_TABS[self.graph_tabs.active] == GRAPH_TABS[1]:
            self.stale.discard("whole")
            if self._whole_key[0] != s.run:
                self._show_whole()
            else:  # same circuit: only outlines and, when moved, the threshold
                self.whole.mark(s.pins, s.node)
                if self._whole_key[1] != s.threshold:
                    self.whole.show_threshold(s.threshold)
            self._whole_key = (s.run, s.threshold)
        if self.detail_tabs is None:  # not built yet (`build_detail`): its tabs stay stale until then
            return
        tab = DETAIL_TABS[self.detail_tabs.active]
        if tab in self.stale:
            self.stale.discard(tab)
            self._refresh_tab(tab)

    def _refresh_tab(self, tab):
        s = self.state
        if tab == "Node":
            self.detail.show()
        elif tab == "Embeddings":
            self.embeddings.follow_node(models.node(s.run, s.node) if s.node else None)
            self.embeddings.show()
        elif tab == "Curves":
            self.curves.show()
        elif tab == "Compare":
            self.compare.show()
        elif tab == "Faithfulness":
            self.faithfulness.show()
        elif tab == "Export":
            self.export.show()

    def _set_widget(self, widget, value):
        self._updating = True
        try:
            widget.value = value
        finally:
            self._updating = False

    def _sync_run_widgets(self):
        s = self.state
        c = models.run_choices(s.run)
        options = layer_options(c.layers)
        self._updating = True
        try:
            for widget, (opts, value) in zip((self.model, self.task, self.sweep, self.k), c.pickers, strict=True):
                widget.param.update(options=opts, value=value)
            self.layer.param.update(options=options, value=s.layer)
        finally:
            self._updating = False
        self.summary.object = summary_html(c.run)
        self._show_pins()

    def _show_graph(self):
        s = self.state
        layout = models.layer_layout(s.run, s.layer)
        self.graph.figure.title.text = plain(f"{s.run} · layer-half {s.layer} · colour = ablation delta (red: node matters)")
        self.graph.show(layout, s.threshold, models.delta_scale(s.run), s.pins, s.node)
        self.node.show(s.node, layout.nodes["node_id"][~layout.nodes["is_bias"]].tolist())  # completions: this layer-half's nodes

    def _show_whole(self):
        s = self.state
        self.whole.show(models.whole_layout(s.run), s.threshold, models.delta_scale(s.run), s.pins, s.node)

    def _show_pins(self):
        pins = self.state.pins
        if not pins:
            self.pins.object = "<i>no pinned nodes</i>"
            return
        self.pins.object = "<br>".join(f"📌 {html.escape(k)}: {html.escape(v)}" for k, v in sorted(pins.items()))

    def _show_notes(self, extra=()):
        """The URL notes, data warnings about the run shown, and `extra` (each escaped: they quote untrusted text)."""
        notes = [*self.state.notes, *extra]
        duplicates = models.duplicate_nodes(self.state.run)
        if duplicates:
            notes.append(
                f"The node table of {self.state.run!r} repeats {duplicates} node row(s): the first row of each node is shown."
            )
        self.notes.object = "".join(f"<div>{html.escape(n)}</div>" for n in notes)
        self.notes.div.visible = bool(notes)
