"""HTML boxes that update cheaply: a Bokeh Div whose `text` is replaced in place.

Panel's HTML and DataFrame panes re-send every property of their model on each update, including
the stylesheet models, which makes Bokeh re-scan every model of the page (~50 ms here) per pane.
Setting a Div's text is one string property and no re-scan.
"""

from __future__ import annotations

import functools
import html

import numpy as np
import panel as pn
import param
import polars as pl
from bokeh.models import AutocompleteInput, Div
from panel.reactive import ReactiveHTML

TABLE_STYLE = """<style>
table.df {border-collapse: collapse; font-size: 12px; font-family: sans-serif; width: 100%;}
table.df th {text-align: right; border-bottom: 1px solid #999; padding: 2px 6px; position: sticky; top: 0; background: #fff;}
table.df td {text-align: right; padding: 1px 6px; border-bottom: 1px solid #eee; font-family: monospace;}
.dfwrap {overflow-y: auto;}
</style>"""


_TEX_OPENERS = {"$$": "$\u200b$", "\\(": "\\\u200b(", "\\[": "\\\u200b["}


def plain(text: str) -> str:
    """Data text for a Bokeh title, axis or tick label, shown as it is: Bokeh typesets a label string holding
    $$...$$, \\(...\\) or \\[...\\] as TeX (these have no `disable_math`); a zero-width space between the
    delimiter's two characters keeps the look and stops the parsing."""
    text = str(text)
    for opener, broken in _TEX_OPENERS.items():
        text = text.replace(opener, broken)
    return text


def heading_div(text: str, note: str = "") -> Div:
    """A bold label as a Bokeh Div: no Panel Markdown pane, whose HTML model makes every page load the
    1.8 MB MathJax bundle."""
    extra = f" {html.escape(note)}" if note else ""
    return Div(text=f"<b>{html.escape(text)}</b>{extra}", disable_math=True)


def heading(text: str, note: str = ""):
    """`heading_div` as a Panel pane."""
    return pn.pane.Bokeh(heading_div(text, note))


class HtmlPart:
    """A part of the HTML of a box that shows several (`.object` as on an HtmlBox; the owner renders the box)."""

    def __init__(self, text: str = ""):
        self.object = text


class HtmlBox:
    """`box.object = html` like a Panel pane; `box.panel` goes into layouts."""

    def __init__(self, text: str = "", max_height: int | None = None, style: dict | None = None):
        self.max_height = max_height
        # disable_math: token texts and ids are data, and Bokeh would otherwise typeset anything between
        # $$...$$, \(...\) or \[...\] (common in code snippets: regexes) as TeX.
        self.div = Div(
            text=text,
            sizing_mode="stretch_width",
            styles={**({"overflow-y": "auto"} if max_height else {}), **(style or {})},
            max_height=max_height,
            disable_math=True,
        )

    @functools.cached_property
    def panel(self) -> pn.pane.Bokeh:
        """The box as a Panel pane, built when a layout asks for it (a box in a `block` needs none)."""
        return pn.pane.Bokeh(self.div, sizing_mode="stretch_width")

    @property
    def object(self) -> str:
        return self.div.text

    @object.setter
    def object(self, text: str) -> None:
        if self.div.text != text:
            self.div.text = text


class LiveHtml(ReactiveHTML):
    """HTML whose updates are one `innerHTML` in the browser (see `LiveHtmlBox`). Not named with a leading
    underscore: Bokeh does not register such model classes, and the browser then cannot build the page.

    A ReactiveHTML with scripts rather than a JSComponent: a JSComponent's module is compiled in the browser
    before the page's views are built, which put ~250 ms on every cold start (bench/README.md). The HTML is
    held as a one-element list: ReactiveHTML passes every string parameter through an HTML sanitizer that
    strips classes and <style> (the token colours); this HTML is the viewer's own, built from escaped values,
    as a Bokeh Div's text is."""

    html_text = param.List(default=[""])
    _template = '<div id="box"></div>'
    _scripts = {"render": "box.innerHTML = data.html_text[0]", "html_text": "box.innerHTML = data.html_text[0]"}


class LiveHtmlBox:
    """An HtmlBox for the boxes a click refills (the node's header and connections, its snippets, task docs).

    A Bokeh Div whose text changes is re-rendered by BokehJS and the layout of the whole page is then
    recomputed from the root, plots included (~20 ms of a click each in headless Chromium, measured in
    bench/README.md); here a change replaces the box's HTML and the browser lays out what changed. The text is
    set as HTML and never typeset (no MathJax: token texts holding $$ or \\( stay as they are). Two models (the component and its
    data) instead of a Div's one, so the boxes that rarely change stay Divs."""

    def __init__(self, text: str = "", style: dict | None = None):
        self.view = LiveHtml(html_text=[text], sizing_mode="stretch_width", margin=5, styles=style or {})  # a Div's margin

    @property
    def panel(self):
        return self.view

    @property
    def object(self) -> str:
        return self.view.html_text[0]

    @object.setter
    def object(self, text: str) -> None:
        if self.view.html_text[0] != text:
            self.view.html_text = [text]


def _cells(values: np.ndarray, digits: int) -> list[str]:
    if values.dtype.kind == "f":
        return ["" if v != v else f"{v:.{digits}f}" for v in values.tolist()]  # NaN -> empty
    return ["" if v is None or v != v else html.escape(str(v)) for v in values.tolist()]


def table_html(df: pl.DataFrame | dict | None, empty: str = "<i>none</i>", digits: int = 4) -> str:
    """A Polars DataFrame (or dict of equal-length columns) as a small HTML table, values escaped.

    Built from numpy columns (a table's HTML writer costs ~4 ms per table)."""
    if df is None or len(df) == 0 or (isinstance(df, dict) and len(next(iter(df.values()))) == 0):
        return empty
    names = list(df.columns) if isinstance(df, pl.DataFrame) else list(df)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in names)
    columns = [_cells(df[c].to_numpy() if isinstance(df, pl.DataFrame) else np.asarray(df[c]), digits) for c in names]
    rows = "".join("<tr>" + "".join(f"<td>{v}</td>" for v in row) + "</tr>" for row in zip(*columns, strict=True))
    return f'{TABLE_STYLE}<table class="df"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


class NodePicker:
    """A node-id text box with completions: a Bokeh AutocompleteInput used directly.

    Panel's select widgets re-scan every option on each value change (~5 ms for 2,000 node ids);
    here a new value is one string property. `on_pick(value)` is called when the value changes
    (typed by the user, or set through `.value`); `show(value)` changes it without calling back.
    """

    def __init__(self, on_pick, title="node"):
        self.on_pick = on_pick
        # restrict=False: any node id of the circuit may be typed; completions list the shown layer-half's nodes
        # (a list of every node, ~2,000 strings, cost ~13 ms of Bokeh validation per run switch).
        self.input = AutocompleteInput(
            title=title,
            completions=[],
            restrict=False,
            case_sensitive=False,
            search_strategy="includes",
            min_characters=1,
            placeholder="node id, e.g. 3.attn.q:37",
            sizing_mode="stretch_width",
        )
        self.panel = pn.pane.Bokeh(self.input, sizing_mode="stretch_width")
        self._quiet = False
        self.input.on_change("value", self._changed)

    def _changed(self, attr, old, new):
        if not self._quiet:
            self.on_pick(new or "")

    @property
    def value(self) -> str:
        return self.input.value or ""

    @value.setter
    def value(self, node_id: str) -> None:
        self.input.value = node_id

    @property
    def options(self) -> list[str]:
        return list(self.input.completions)

    def show(self, value: str, options: list[str] | None = None) -> None:
        self._quiet = True
        try:
            if options is not None and options != self.input.completions:
                self.input.completions = options
            if self.input.value != value:
                self.input.value = value
        finally:
            self._quiet = False
