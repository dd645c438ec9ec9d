"""Token and position embeddings of a residual channel: top/bottom tokens by wte weight, the column's histogram, wpe heatmap.

The data comes from `models.embedding` and `models.model_wpe_image`.
"""

from __future__ import annotations

import numpy as np
import panel as pn
from bokeh.models import ColorBar, ColumnDataSource, HoverTool, LinearColorMapper
from bokeh.palettes import RdBu11
from bokeh.plotting import figure

from viewer import models
from viewer.views.markup import HtmlBox, heading, table_html

N_TOKENS = 20
RESIDUAL_KINDS = models.RESIDUAL_KINDS


class EmbeddingView:
    def __init__(self, state):
        self.state = state
        self.channel = pn.widgets.IntInput(label="residual channel", value=0, start=0, width=160)
        self.note = HtmlBox()
        self.top = HtmlBox()
        self.bottom = HtmlBox()
        # Raw Bokeh, not hvPlot/HoloViews like the Curves tab: with both figures as HoloViews DynamicMaps fed by a
        # Pipe, `python bench/viewer.py` (2026-12-06, load 4) measured "open Embeddings tab" at p95 61 ms (raw Bokeh:
        # 28 ms; budget 50 ms) and the first open in a new session at p50 146 ms (16 ms): HoloViews re-runs its plot
        # machinery per update, where a Bokeh source takes the new columns directly.
        self.hist_source = ColumnDataSource({"left": [], "right": [], "top": []})
        hist = figure(height=240, width=420, title="wte column histogram (nonzero entries)", tools="pan,wheel_zoom,reset,save")
        hist.quad(
            left="left", right="right", top="top", bottom=0, source=self.hist_source, fill_color="#4393c3", line_color="white"
        )
        self.hist = hist
        self.wpe_source = ColumnDataSource({"image": [], "dw": [], "dh": []})
        self.wpe_mapper = LinearColorMapper(palette=RdBu11[::-1], nan_color="#ffffff")
        wpe = figure(
            height=320,
            sizing_mode="stretch_width",
            title="wpe (positions x nonzero channels, symlog colours)",
            tools="pan,wheel_zoom,reset,save",
            x_axis_label="channel (index among nonzero columns)",
            y_axis_label="position",
        )
        wpe.image(image="image", x=0, y=0, dw="dw", dh="dh", source=self.wpe_source, color_mapper=self.wpe_mapper)
        wpe.add_layout(ColorBar(color_mapper=self.wpe_mapper, width=8, title="symlog"), "right")
        wpe.add_tools(HoverTool(tooltips=[("pos", "$y{0}"), ("column", "$x{0}"), ("symlog value", "@image{0.000}")]))
        self.wpe = wpe
        self._wpe_model = None
        self._shown = None  # (tables version, model, channel) on display
        pn.bind(self.show, self.channel, watch=True)
        self.panel = pn.Column(
            pn.Row(self.channel, self.note.panel),
            pn.Row(
                pn.Column(heading("Top tokens"), self.top.panel, width=260),
                pn.Column(heading("Bottom tokens"), self.bottom.panel, width=260),
                pn.pane.Bokeh(hist),
            ),
            pn.pane.Bokeh(wpe, sizing_mode="stretch_width"),
            sizing_mode="stretch_width",
        )

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
            self.note.object = (
                "<i>No wte_extremes / wte_histograms tables: materialize them with the pipeline (circuits materialize).</i>"
            )
            return
        self.top.object = table_html(e.top)
        self.bottom.object = table_html(e.bottom)
        self.note.object = f"model {e.model}: wte column {e.channel} has {int(e.hist['count'].sum())} nonzero weights"
        self.hist_source.data = {
            "left": models.floats(e.hist, "bin_left"),
            "right": models.floats(e.hist, "bin_right"),
            "top": e.hist["count"].to_numpy(),
        }

    def draw_wpe(self, img, channels, linthresh):
        if img is None:
            self.wpe_source.data = {"image": [], "dw": [], "dh": []}
            return
        m = float(np.abs(img).max()) or 1.0
        self.wpe_mapper.low, self.wpe_mapper.high = -m, m
        self.wpe_source.data = {"image": [img], "dw": [img.shape[1]], "dh": [img.shape[0]]}
        self.wpe.title.text = (
            f"wpe: {img.shape[0]} positions x {len(channels)} nonzero channels (symlog, linthresh {linthresh:.3g})"
        )
