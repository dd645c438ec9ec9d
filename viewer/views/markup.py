"""HTML boxes that update cheaply: a Bokeh Div whose `text` is replaced in place.

Panel's HTML and DataFrame panes re-send every property of their model on each update, including
the stylesheet models, which makes Bokeh re-scan every model of the page (~50 ms here) per pane.
Setting a Div's text is one string property and no re-scan.
"""

from __future__ import annotations

import pandas as pd
import panel as pn
from bokeh.models import Div

TABLE_STYLE = """<style>
table.df {border-collapse: collapse; font-size: 12px; font-family: sans-serif; width: 100%;}
table.df th {text-align: right; border-bottom: 1px solid #999; padding: 2px 6px; position: sticky; top: 0; background: #fff;}
table.df td {text-align: right; padding: 1px 6px; border-bottom: 1px solid #eee; font-family: monospace;}
.dfwrap {overflow-y: auto;}
</style>"""


class HtmlBox:
    """`box.object = html` like a Panel pane; `box.panel` goes into layouts."""

    def __init__(self, text: str = "", max_height: int | None = None):
        self.max_height = max_height
        self.div = Div(text=text, sizing_mode="stretch_width", styles={"overflow-y": "auto"} if max_height else {},
                       max_height=max_height)
        self.panel = pn.pane.Bokeh(self.div, sizing_mode="stretch_width")

    @property
    def object(self) -> str:
        return self.div.text

    @object.setter
    def object(self, text: str) -> None:
        if self.div.text != text:
            self.div.text = text


def table_html(df: pd.DataFrame | None, empty: str = "<i>none</i>", digits: int = 4) -> str:
    """A DataFrame as a small HTML table (values escaped by pandas)."""
    if df is None or df.empty:
        return empty
    return TABLE_STYLE + df.to_html(index=False, classes="df", border=0, float_format=lambda v: f"{v:.{digits}f}", na_rep="",
                                    escape=True)
