"""The circuit explorer: `panel serve viewer/app.py --address 127.0.0.1 --port 5006` (from the project root).

Template and layout only; widgets and wiring are in explorer.py, data access in queries.py.
Reads `$CIRCUITS_DATA/circuits.duckdb` (default `data/`), written by `circuits materialize`.
"""

from __future__ import annotations

import html

import panel as pn

from viewer import queries
from viewer.explorer import ExplorerApp
from viewer.views.markup import heading

TITLE = "Circuit explorer"


def missing_page(reason: str) -> pn.template.FastListTemplate:
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
    template = pn.template.FastListTemplate(title=TITLE, main=[pn.pane.Markdown(text, sizing_mode="stretch_width")])
    template.main_max_width = "900px"
    return template


def create_app(url: dict | None = None, sync_url: bool = False):
    """The page for one session. `url`: query values to start from (tests); `sync_url`: keep the browser's URL in sync."""
    try:
        queries.check_tables()
        app = ExplorerApp(url=url, sync_url=sync_url)
    except queries.TablesMissing as err:
        return missing_page(str(err))
    # One root per template area: the template adds each item as a document root, and each new root
    # makes Bokeh re-walk every model added so far (a dozen sidebar roots cost ~1 s of the cold start).
    sidebar = pn.Column(
        app.model, app.task, app.sweep, app.k, app.summary.panel,
        app.layer, app.threshold, app.node.panel,
        heading("Pins"), app.pin_label, pn.Row(app.pin, app.unpin), app.pins.panel, sizing_mode="stretch_width",
    )
    main = pn.Column(app.notes.panel, app.graph_tabs, app.detail_tabs, sizing_mode="stretch_width")
    template = pn.template.FastListTemplate(title=TITLE, sidebar=[sidebar], main=[main], sidebar_width=330, accent="#b2182b")
    template.explorer = app  # tests and bench reach the app's state and views through the page
    return template


if __name__.startswith("bokeh"):  # `panel serve viewer/app.py`
    create_app(sync_url=True).servable(title=TITLE)
