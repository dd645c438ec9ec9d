"""Attention patterns of a head on one task doc, from the circuit's stored q and k channels (spec: "What the viewer derives").

head pattern:    softmax over causal s <= t of  sum_c q_c(t) k_c(s) / sqrt(d_head)
channel pattern: exp(q_c(t) k_c(s) / sqrt(d_head)) for one channel c, causal
Channels missing from the circuit are zero, so the sum runs over channels kept in both q and k.
Cost: one doc, T x T with T <= ctx; computed on selection, not stored.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from bokeh.models import ColorBar, ColumnDataSource, HoverTool, LinearColorMapper
from bokeh.palettes import Viridis256
from bokeh.plotting import figure


def qk_matrices(df: pd.DataFrame, length: int) -> tuple[dict, dict]:
    """head_channel -> activation vector (length,) for q and for k."""
    q, k = {}, {}
    for (kind, hc), grp in df.groupby(["kind", "head_channel"]):
        vec = np.zeros(length, np.float64)
        pos = grp["pos"].to_numpy()
        ok = pos < length
        vec[pos[ok]] = grp["value"].to_numpy(float)[ok]
        (q if kind == "q" else k)[int(hc)] = vec
    return q, k


def head_pattern(q: dict, k: dict, d_head: int, length: int) -> np.ndarray:
    scores = np.zeros((length, length))
    for c in set(q) & set(k):
        scores += np.outer(q[c], k[c])
    scores /= np.sqrt(d_head)
    causal = np.tril(np.ones((length, length), bool))
    scores = np.where(causal, scores, -np.inf)
    scores -= scores.max(axis=1, keepdims=True)
    p = np.exp(scores)
    return np.where(causal, p / p.sum(axis=1, keepdims=True), np.nan)


def channel_pattern(q: np.ndarray, k: np.ndarray, d_head: int) -> np.ndarray:
    length = len(q)
    out = np.exp(np.outer(q, k) / np.sqrt(d_head))
    return np.where(np.tril(np.ones((length, length), bool)), out, np.nan)


class PatternPlot:
    """A T x T heatmap (query position down, key position across) whose data is replaced per selection."""

    def __init__(self, title):
        self.source = ColumnDataSource({"image": [], "x": [], "y": [], "dw": [], "dh": []})
        self.mapper = LinearColorMapper(palette=Viridis256, nan_color="#ffffff")
        fig = figure(height=320, width=360, title=title, tools="pan,wheel_zoom,reset,save", match_aspect=True,
                     x_axis_label="key position s", y_axis_label="query position t")
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
