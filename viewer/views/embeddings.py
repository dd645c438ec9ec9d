"""Token and position embeddings of a residual channel: top/bottom tokens by wte weight, the column's histogram, wpe heatmap."""

from __future__ import annotations

import numpy as np
import pandas as pd
import panel as pn
from bokeh.models import ColorBar, ColumnDataSource, HoverTool, LinearColorMapper
from bokeh.palettes import RdBu11
from bokeh.plotting import figure

from viewer import queries
from viewer.views.markup import HtmlBox, heading, table_html

N_TOKENS = 20
RESIDUAL_KINDS = ("act_in", "resid_delta")


def symlog(values: np.ndarray, linthresh: float) -> np.ndarray:
    """Symmetric log: linear within +-linthresh, logarithmic beyond (sign kept)."""
    return np.sign(values) * np.log10(1 + np.abs(values) / linthresh)


def wpe_image(entries: pd.DataFrame | None):
    """(positions x nonzero channels) matrix in symlog units, the channel labels, and linthresh."""
    if entries is None or entries.empty:
        return None, [], 1.0
    channels = np.sort(entries["channel"].unique())
    rows = int(entries["row"].max()) + 1
    dense = np.zeros((rows, len(channels)), np.float64)
    dense[entries["row"].to_numpy(), np.searchsorted(channels, entries["channel"].to_numpy())] = entries["value"].to_numpy(float)
    nz = np.abs(dense[dense != 0])
    linthresh = float(np.percentile(nz, 10)) if nz.size else 1.0
    return symlog(dense, linthresh), channels.tolist(), linthresh


class EmbeddingView:
    def __init__(self, state):
        self.state = state
        self.channel = pn.widgets.IntInput(label="residual channel", value=0, start=0, width=160)
        self.note = HtmlBox()
        self.top = HtmlBox()
        self.bottom = HtmlBox()
        self.hist_source = ColumnDataSource({"left": [], "right": [], "top": []})
        hist = figure(height=240, width=420, title="wte column histogram (nonzero entries)", tools="pan,wheel_zoom,reset,save")
        hist.quad(left="left", right="right", top="top", bottom=0, source=self.hist_source, fill_color="#4393c3", line_color="white")
        self.hist = hist
        self.wpe_source = ColumnDataSource({"image": [], "dw": [], "dh": []})
        self.wpe_mapper = LinearColorMapper(palette=RdBu11[::-1], nan_color="#ffffff")
        wpe = figure(height=320, sizing_mode="stretch_width", title="wpe (positions x nonzero channels, symlog colours)",
                     tools="pan,wheel_zoom,reset,save", x_axis_label="channel (index among nonzero columns)", y_axis_label="position")
        wpe.image(image="image", x=0, y=0, dw="dw", dh="dh", source=self.wpe_source, color_mapper=self.wpe_mapper)
        wpe.add_layout(ColorBar(color_mapper=self.wpe_mapper, width=8, title="symlog"), "right")
        wpe.add_tools(HoverTool(tooltips=[("pos", "$y{0}"), ("column", "$x{0}"), ("symlog value", "@image{0.000}")]))
        self.wpe = wpe
        self._wpe_model = None
        self._shown = None  # (tables version, model, channel) on display
        pn.bind(self.show, self.channel, watch=True)
        self.panel = pn.Column(pn.Row(self.channel, self.note.panel),
                               pn.Row(pn.Column(heading("Top tokens"), self.top.panel, width=260), pn.Column(heading("Bottom tokens"), self.bottom.panel, width=260),
                                      pn.pane.Bokeh(hist)),
                               pn.pane.Bokeh(wpe, sizing_mode="stretch_width"), sizing_mode="stretch_width")

    def follow_node(self, node: dict | None):
        """Select the channel of the selected node when it is a residual channel."""
        if node is not None and node["kind"] in RESIDUAL_KINDS and self.channel.value != int(node["channel"]):
            self.channel.value = int(node["channel"])  # triggers show()

    def show(self, *_):
        r = queries.run(self.state.run)
        if r is None:
            return
        model, ch = r["model"], int(self.channel.value)
        if self._shown == (queries.connection()[0], model, ch):
            return  # already showing it (follow_node's channel change has just shown it)
        self._shown = (queries.connection()[0], model, ch)
        extremes, hist = queries.wte_extremes(model, ch), queries.wte_histogram(model, ch)
        if extremes is None or hist is None:
            self.note.object = "<i>No wte_extremes / wte_histograms tables: materialize them with the pipeline (circuits materialize).</i>"
            return
        columns = ["token_id", "text", "value"]
        self.top.object = table_html(extremes[extremes["side"] == "top"][columns])
        self.bottom.object = table_html(extremes[extremes["side"] == "bottom"][columns])
        self.note.object = f"model {model}: wte column {ch} has {int(hist['count'].sum())} nonzero weights"
        self.hist_source.data = {"left": hist["bin_left"].to_numpy(float), "right": hist["bin_right"].to_numpy(float), "top": hist["count"].to_numpy()}
        if self._wpe_model != model:  # the heatmap depends on the model only
            self._wpe_model = model
            img, channels, linthresh = model_wpe_image(queries.connection()[0], model)
            if img is None:
                self.wpe_source.data = {"image": [], "dw": [], "dh": []}
            else:
                m = float(np.abs(img).max()) or 1.0
                self.wpe_mapper.low, self.wpe_mapper.high = -m, m
                self.wpe_source.data = {"image": [img], "dw": [img.shape[1]], "dh": [img.shape[0]]}
                self.wpe.title.text = f"wpe: {img.shape[0]} positions x {len(channels)} nonzero channels (symlog, linthresh {linthresh:.3g})"


@queries.memo(4)
def model_wpe_image(version, model):
    """The wpe heatmap of a model (float32 symlog image), shared by every session (keyed by the tables' version)."""
    img, channels, linthresh = wpe_image(queries.embedding_matrix(model, "wpe"))
    return (None if img is None else img.astype(np.float32)), channels, linthresh
