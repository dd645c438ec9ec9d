"""Token and position embeddings of a residual channel: top/bottom tokens by wte weight, the column's histogram, wpe heatmap.

The histogram and the heatmap are HoloViews elements in DynamicMaps (`PipePlot`): a new channel sends
new data into the existing figures. The data comes from `models.embedding` and `models.model_wpe_image`.
"""

from __future__ import annotations

import holoviews as hv
import numpy as np
import panel as pn

from viewer import models
from viewer.views.hvplots import PipePlot
from viewer.views.markup import HtmlBox, heading, table_html

N_TOKENS = 20
RESIDUAL_KINDS = models.RESIDUAL_KINDS
EMPTY_HIST = (np.zeros(1), np.zeros(0))  # (edges, counts)
EMPTY_WPE = (np.zeros((1, 1), np.float32), 1.0, "wpe (positions x nonzero channels, symlog colours)")
TOOLS = ["hover"]


def histogram(data):
    edges, counts = data
    return hv.Histogram((edges, counts), kdims="wte weight", vdims="count").opts(
        height=240, width=420, title="wte column histogram (nonzero entries)", fill_color="#4393c3", line_color="white", tools=TOOLS,
        default_tools=["pan", "wheel_zoom", "reset", "save"])


def wpe_heatmap(data):
    img, m, title = data
    h, w = img.shape
    # hv.Image draws the first array row at the top: flipped so that position 0 is at the bottom of the y axis.
    return hv.Image(img[::-1], bounds=(0, 0, w, h), kdims=["column", "pos"], vdims="symlog value").opts(
        height=320, responsive=True, title=title, cmap="RdBu_r", clim=(-m, m), colorbar=True, tools=TOOLS,
        xlabel="channel (index among nonzero columns)", ylabel="position",
        default_tools=["pan", "wheel_zoom", "reset", "save"])


def hist_edges(hist) -> tuple[np.ndarray, np.ndarray]:
    """(edges, counts) of the pipeline's histogram rows (bin_left, bin_right, count); empty: no nonzero weight."""
    if hist is None or hist.is_empty():
        return EMPTY_HIST
    left, right = models.floats(hist, "bin_left"), models.floats(hist, "bin_right")
    return np.r_[left, right[-1:]], hist["count"].to_numpy()


class EmbeddingView:
    def __init__(self, state):
        self.state = state
        self.channel = pn.widgets.IntInput(label="residual channel", value=0, start=0, width=160)
        self.note = HtmlBox()
        self.top = HtmlBox()
        self.bottom = HtmlBox()
        self.hist = PipePlot(histogram, EMPTY_HIST)
        self.wpe = PipePlot(wpe_heatmap, EMPTY_WPE, sizing_mode="stretch_width")
        self._wpe_model = None
        self._shown = None  # (tables version, model, channel) on display
        pn.bind(self.show, self.channel, watch=True)
        self.panel = pn.Column(pn.Row(self.channel, self.note.panel),
                               pn.Row(pn.Column(heading("Top tokens"), self.top.panel, width=260), pn.Column(heading("Bottom tokens"), self.bottom.panel, width=260),
                                      self.hist.panel),
                               self.wpe.panel, sizing_mode="stretch_width")

    def follow_node(self, node: dict | None):
        """Select the channel of the selected node when it is a residual channel."""
        if node is not None and node["kind"] in RESIDUAL_KINDS and self.channel.value != int(node["channel"]):
            self.channel.value = int(node["channel"])  # triggers show()

    def show(self, *_):
        r = models.run(self.state.run)
        if r is None:
            return
        model, ch = r["model"], int(self.channel.value)
        key = (models.tables_version(), model, ch)
        if self._shown == key:
            return  # already showing it (follow_node's channel change has just shown it)
        self._shown = key
        self.draw(models.embedding(model, ch))
        if self._wpe_model != model:  # the heatmap depends on the model only
            self._wpe_model = model
            self.draw_wpe(*models.model_wpe_image(model))

    def draw(self, e: models.Embedding):
        if e.hist is None:
            self.note.object = "<i>No wte_extremes / wte_histograms tables: materialize them with the pipeline (circuits materialize).</i>"
            return
        self.top.object = table_html(e.top)
        self.bottom.object = table_html(e.bottom)
        self.note.object = f"model {e.model}: wte column {e.channel} has {int(e.hist['count'].sum())} nonzero weights"
        self.hist.send(hist_edges(e.hist))

    def draw_wpe(self, img, channels, linthresh):
        if img is None:
            self.wpe.send(EMPTY_WPE)
            return
        m = float(np.abs(img).max()) or 1.0
        self.wpe.send((img, m, f"wpe: {img.shape[0]} positions x {len(channels)} nonzero channels (symlog, linthresh {linthresh:.3g})"))
