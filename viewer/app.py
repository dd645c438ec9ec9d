"""The circuit explorer: `panel serve viewer/app.py --address 127.0.0.1 --port 5006` (from the project root).

Page layout only; widgets and wiring are in explorer.py, view models in models.py, SQL in queries.py.
Reads `$CIRCUITS_DATA/circuits.duckdb` (default `data/`), written by `circuits materialize`.
"""

from __future__ import annotations

import html

import panel as pn
from bokeh.models import Div

from viewer import cheap, queries
from viewer.explorer import ExplorerApp
from viewer.views.markup import heading

TITLE = "Circuit explorer"


# The page's own frame (a header bar, a fixed-width sidebar and the main column) instead of a Panel template:
# every template loads the Fast/Bootstrap components and, through its HTML busy indicator, the 1.8 MB MathJax
# bundle (Panel adds bokeh-mathjax to a page holding any Panel HTML model), and builds ~40 models more per session.
HEADER_STYLE = {
    "background": "#b2182b",
    "color": "#fff",
    "padding": "10px 18px",
    "font-size": "20px",
    "font-weight": "600",
    "font-family": "sans-serif",
}
SIDEBAR_STYLE = {"border-right": "1px solid #ddd", "background": "#fafafa", "min-height": "100vh"}
SIDEBAR_WIDTH = 330


class Page(pn.Column):
    """A page: header, sidebar and main column. `.sidebar` / `.main` are those columns (list-like, like a
    template's areas; items appended after the page is served are sent to the browser)."""

    def __init__(self, sidebar: list, main: list, main_max_width: str | None = None):
        header = pn.pane.Bokeh(
            Div(text=html.escape(TITLE), disable_math=True, styles=HEADER_STYLE, sizing_mode="stretch_width"),
            sizing_mode="stretch_width",
        )
        side = pn.Column(*sidebar, width=SIDEBAR_WIDTH, styles=SIDEBAR_STYLE, margin=0)
        body = pn.Column(*main, sizing_mode="stretch_width", styles={"max-width": main_max_width} if main_max_width else {})
        super().__init__(
            header,
            pn.Row(*([side] if sidebar else []), body, sizing_mode="stretch_width", margin=0),
            sizing_mode="stretch_width",
            margin=0,
        )
        self.sidebar, self.main = side, body


def missing_page(reason: str) -> Page:
    """What to do when there are no tables yet: a page with the commands, not a traceback."""
    text = f"""
## No circuit tables yet

The viewer reads the tables that the pipeline writes, and found none it can use:

`{html.escape(reason)}`

Build them from the project root, then reload this page:

```bash
circuits build-store      # once, offline: the embedded demo store (skip it to use CIRCUITS_STORE)
circuits materialize      # store -> Parquet tables + circuits.duckdb in $CIRCUITS_DATA (default data/)
```

Or point `CIRCUITS_DATA` at a directory that already holds `circuits.duckdb` and `tables/`, and restart
`panel serve viewer/app.py`.
"""
    # The one Markdown pane of the viewer (its text is ours, apart from the escaped reason): this page has no data.
    return Page([], [pn.pane.Markdown(text, sizing_mode="stretch_width")], main_max_width="900px")


def create_app(url: dict | None = None, sync_url: bool = False):
    """The page for one session. `url`: query values to start from (tests); `sync_url`: keep the browser's URL in sync."""
    try:
        queries.check_tables()
        app = ExplorerApp(url=url, sync_url=sync_url)
    except queries.TablesMissing as err:
        return missing_page(str(err))
    # The first document holds what the first paint shows: the run, layer, threshold and node pickers, and the
    # graph. The Pins group and the detail tabs below the graph follow once the browser has drawn it
    # (`ExplorerApp.after_load`): every Panel object and Bokeh model of the page is built and sent by the server's
    # one event loop, where visitors arriving together wait for each other's pages. No layout level is added
    # that the page does not need (the sidebar's items go straight into its column) for the same reason.
    page = Page(
        [app.model, app.task, app.sweep, app.k, app.summary.panel, app.layer, app.threshold, app.node.panel],
        [app.notes.panel, app.graph_tabs],
    )

    def place_the_rest():
        page.sidebar.extend([heading("Pins"), app.pin_label, pn.Row(app.pin, app.unpin), app.pins.panel])
        page.main.append(app.build_detail())

    app.after_load(place_the_rest)
    page.explorer = app  # tests and bench reach the app's state and views through the page
    return page


def serve_locally(doc) -> None:
    """Settings of a served session (`panel serve`, see viewer/serve.py) made before its page is built.

    - Panel's stylesheets from this server, not from cdn.holoviz.org: Panel points a model's stylesheets at
      the server only when the session's page HTML is rendered (`dist_url`), and with `--reuse-sessions` a
      visitor's session is built without that (its page came from another session): every stylesheet, the
      theme's included, then came from the CDN (none at all on a machine without internet access).
    - No bokeh-gl bundle (0.2 MB): Panel sends every Bokeh component's JavaScript but MathJax's, and no
      figure here uses WebGL. (bokeh-tables stays: panel.min.js requires it when it loads.)
    """
    from bokeh.resources import Resources
    from panel.io.resources import LOCAL_DIST

    if doc is not None and "dist_url" not in doc.template_variables:
        doc.template_variables["dist_url"] = f"{pn.state.rel_path}/{LOCAL_DIST}" if pn.state.rel_path else LOCAL_DIST
    # The server's Resources() take these; there is no public setting (if Bokeh renames it, the bundle stays).
    default = getattr(Resources, "_default_components", None)
    if isinstance(default, list) and "bokeh-gl" in default:
        Resources._default_components = [c for c in default if c != "bokeh-gl"]


def skip_document_validation() -> None:
    """No Bokeh integrity check of every new session's document (Bokeh's `validate_doc` setting): it looks up
    every model's `_check_*` methods by `dir()`, ~10% of a session's build at release scale, on the event loop
    that builds the other visitors' sessions; it finds nothing on this page but empty placeholder columns (a
    warning). The tests run the same check on a page with every view built (tests/test_viewer.py)."""
    from bokeh.settings import settings

    settings.perform_document_validation.set_value(False)


if __name__.startswith("bokeh"):  # `panel serve viewer/app.py`
    # No extension named: the page loads the JavaScript of the models it uses only (without this call Panel
    # adds every imported model's, e.g. Tabulator's 0.5 MB and Luxon).
    pn.extension()
    skip_document_validation()
    cheap.install()  # Bokeh's and Panel's per-session work done once or skipped (viewer/cheap.py)
    serve_locally(pn.state.curdoc)
    create_app(sync_url=True).servable(title=TITLE)
