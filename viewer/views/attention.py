"""The attention-pattern heatmaps of the Node tab (the patterns are computed in viewer/models.py: `models.attention`)."""

from __future__ import annotations

import numpy as np
from bokeh.models import ColorBar, ColumnDataSource, HoverTool, LinearColorMapper
from bokeh.palettes import Viridis256
from bokeh.plotting import figure


class PatternPlot:
    """A T x T heatmap (query position down, key position across) whose data is replaced per selection."""

    def __init__(self, title):
        self.source = ColumnDataSource({"image": [], "x": [], "y": [], "dw": [], "dh": []})
        self.mapper = LinearColorMapper(palette=Viridis256, nan_color="#ffffff")
        fig = figure(
            height=320,
            width=360,
            title=title,
            tools="pan,wheel_zoom,reset,save",
            match_aspect=True,
            x_axis_label="key position s",
            y_axis_label="query position t",
        )
        fig.image(image="image", x="x", y="y", dw="dw", dh="dh", source=self.source, color_mapper=self.mapper)
        fig.y_range.flipped = True
        fig.add_layout(ColorBar(color_mapper=self.mapper, width=8), "right")
        fig.add_tools(HoverTool(tooltips=[("t", "$y{0}"), ("s", "$x{0}"), ("value", "@image{0.0000}")]))
        self.figure = fig

    def show(self, matrix: np.ndarray | None, title: str):
        self.figure.title.text = title
        self.figure.visible = matrix is not None and matrix.size > 0  # no empty frame when there is no pattern
        if not self.figure.visible:
            self.source.data = {"image": [], "x": [], "y": [], "dw": [], "dh": []}
            return
        n = matrix.shape[0]
        finite = matrix[np.isfinite(matrix)]
        self.mapper.low, self.mapper.high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        self.source.data = {"image": [matrix.astype(np.float32)], "x": [-0.5], "y": [-0.5], "dw": [n], "dh": [n]}
