"""Circuit graphs: one layer-half (rows per location) and the whole circuit across layers.

Bokeh figures built once per session; a new selection only replaces their ColumnDataSources'
data, so an interaction costs a layout of a few hundred points, not a new figure. The layouts
(`models.GraphLayout`) are computed in viewer/models.py and shared by every session.

Raw Bokeh (the graphs are not among the figures the design card moves to hvPlot): a tap calls
back with the node's id through the source's selection, and the selected node is drawn by the
renderer's selection glyph (black outline): the browser outlines a tapped node in the same frame as
the tap, and the server sends nothing back to the graph for a click. A canvas repaint costs ~70 ms of
a click in headless Chromium (~20 ms painting, ~50 ms handing the canvas to the compositor), and the
previous design (selection cleared by the server, outlines patched in three columns) repainted twice
more per click. Pins change the outline columns, patched in place.
"""

from __future__ import annotations

import numpy as np
from bokeh.models import ColumnDataSource, FixedTicker, HoverTool, Scatter, Segment, TapTool
from bokeh.palettes import RdBu11
from bokeh.plotting import figure

from viewer.models import GraphLayout

DIVERGING = RdBu11[::-1]  # blue = negative delta, red = positive (the node matters)
NO_DELTA = "#bbbbbb"


def delta_colours(delta: np.ndarray, scale: float) -> list[str]:
    """Diverging colours centred on zero; `scale` is the |delta| mapped to the palette's ends."""
    delta = np.asarray(delta, float)
    scale = scale if scale and np.isfinite(scale) and scale > 0 else 1.0
    idx = np.clip(np.round((delta / scale + 1) / 2 * (len(DIVERGING) - 1)), 0, len(DIVERGING) - 1)
    return [NO_DELTA if not np.isfinite(d) else DIVERGING[int(i)] for d, i in zip(delta, np.nan_to_num(idx), strict=True)]


def edge_segments(layout: GraphLayout, threshold: float) -> dict:
    """Segments for edges whose |strength| >= threshold * the strongest; width/alpha by strength."""
    cols = {k: [] for k in ("x0", "y0", "x1", "y1", "color", "alpha", "width", "src", "tgt", "strength")}
    if layout.top <= 0 or not len(layout.measure):
        return cols
    mag = np.abs(np.nan_to_num(layout.measure))
    keep = np.flatnonzero(mag >= threshold * layout.top)
    n = layout.nodes
    si, ti, rel, measure = layout.src[keep], layout.tgt[keep], mag[keep] / layout.top, layout.measure[keep]
    cols.update(
        x0=n["x"][si],
        y0=n["y"][si],
        x1=n["x"][ti],
        y1=n["y"][ti],
        color=np.where(measure >= 0, "#d6604d", "#4393c3").astype(object),
        alpha=0.15 + 0.85 * rel,
        width=0.5 + 3.5 * rel,
        src=n["node_id"][si],
        tgt=n["node_id"][ti],
        strength=measure,
    )
    return as_arrays(cols)


def as_arrays(cols: dict) -> dict:
    """Column data as numpy arrays: Bokeh walks Python lists element by element whenever it re-scans the
    document's models (an array is one value), and serializes arrays in binary."""
    return {
        k: v if isinstance(v, np.ndarray) else np.asarray(v, dtype=object if v and isinstance(v[0], str) else None)
        for k, v in cols.items()
    }


SELECTED_OUTLINE, SELECTED_WIDTH = "#000000", 3.0  # the selection glyph's outline (the selected node)


def outlines(node_ids, pins: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(outline colour, line width, pin label) per node: amber = pinned (the selected node's black outline is
    the renderer's selection glyph)."""
    ids = np.asarray(node_ids, dtype=object)
    pinned = np.array([n in pins for n in ids], bool) if pins else np.zeros(len(ids), bool)
    colour = np.where(pinned, "#ffb000", "#555555").astype(object)
    width = np.where(pinned, 2.5, 0.8)
    label = np.array([pins.get(n, "") for n in ids], dtype=object) if pins else np.full(len(ids), "", dtype=object)
    return colour, width, label


def _node_data(layout: GraphLayout, scale: float, pins: dict) -> dict:
    n = layout.nodes
    colour, width, label = outlines(n["node_id"], pins)
    return {
        "x": n["x"],
        "y": n["y"],
        "node_id": n["node_id"],
        "label": n["label"],
        "delta": n["delta"],
        "color": np.asarray(delta_colours(n["delta"], scale), dtype=object),
        "outline": colour,
        "lw": width,
        "pin": label,
    }


class CircuitGraph:
    """A Bokeh graph of circuit nodes; `on_select(node_id)` is called when a node is tapped."""

    def __init__(self, on_select, height=420, title="", node_size=14):
        self.on_select = on_select
        self.nodes = ColumnDataSource({k: [] for k in ("x", "y", "node_id", "label", "delta", "color", "outline", "lw", "pin")})
        self.edges = ColumnDataSource(
            {k: [] for k in ("x0", "y0", "x1", "y1", "color", "alpha", "width", "src", "tgt", "strength")}
        )
        # No x axis or x grid (the x position is a row within a location, not a quantity): with x_axis_type=None
        # the figure has neither model (hidden ones cost a session five models to build and send).
        fig = figure(
            height=height,
            sizing_mode="stretch_width",
            tools="pan,wheel_zoom,box_zoom,reset,save",
            active_scroll="wheel_zoom",
            title=title,
            toolbar_location="above",
            x_axis_type=None,
        )
        fig.add_glyph(
            self.edges, Segment(x0="x0", y0="y0", x1="x1", y1="y1", line_color="color", line_alpha="alpha", line_width="width")
        )
        glyph = dict(x="x", y="y", size=node_size, fill_color="color", line_color="outline", line_width="lw", marker="circle")
        renderer = fig.add_glyph(
            self.nodes,
            Scatter(**glyph),
            # The selected node gets a black outline.
            selection_glyph=Scatter(**{**glyph, "line_color": SELECTED_OUTLINE, "line_width": SELECTED_WIDTH}),
            # Unselected nodes look as with no selection: None makes BokehJS draw them with a copy of the glyph
            # (no model sent; "auto" would fade them). Muting (no legend here) stays "auto", also made in the browser.
            nonselection_glyph=None,
            # Drawn on the canvas's overlay layer: a click (a new selection) repaints the nodes alone, not the
            # edges, axes and grid of the primary layer beneath.
            level="overlay",
        )
        fig.add_tools(
            HoverTool(
                renderers=[renderer],
                tooltips=[("node", "@node_id"), ("", "@label"), ("delta", "@delta{0.0000}"), ("pin", "@pin")],
            )
        )
        fig.add_tools(TapTool(renderers=[renderer]))
        fig.ygrid.grid_line_alpha = 0.3
        self.ticker = FixedTicker(ticks=[])
        fig.yaxis.ticker = self.ticker
        self.figure = fig
        self.layout = GraphLayout({}, {})
        self.selected = ""  # the node id the selection shows
        self._pins: dict = {}  # the pins the outline columns show
        self._quiet = False
        self.nodes.selected.on_change("indices", self._tapped)

    def _tapped(self, attr, old, new):
        if self._quiet:
            return
        if not new:  # a tap beside every node cleared the browser's selection: show the selected node again
            self._select(self.selected, force=True)
            return
        node_id = self.nodes.data["node_id"][new[0]]
        if len(new) > 1:  # overlapping nodes tapped at once: the first is selected
            self._select(node_id, force=True)
        self.selected = node_id
        self.on_select(node_id)

    def _select(self, node_id: str, force: bool = False):
        """The selection (the black outline) on `node_id`, none if this graph does not show it; sent only if it
        changed (a tap has already set it in the browser)."""
        self.selected = node_id or ""
        ids = self.nodes.data["node_id"]
        hit = np.flatnonzero(np.asarray(ids, dtype=object) == node_id) if node_id and len(ids) else []
        want = [int(hit[0])] if len(hit) else []
        if force or list(self.nodes.selected.indices) != want:
            self._quiet = True
            try:
                self.nodes.selected.indices = want
            finally:
                self._quiet = False

    def show(self, layout: GraphLayout, threshold: float, scale: float, pins: dict, selected: str):
        self.layout = layout
        self.nodes.data = _node_data(layout, scale, pins)
        self._pins = dict(pins)
        self._select(selected)
        self.edges.data = edge_segments(layout, threshold)
        ticks = layout.ticks
        if list(self.ticker.ticks) != [float(t) for t in ticks]:  # mutate: a new ticker model would re-walk the whole document
            self.ticker.ticks = [float(t) for t in ticks]
            self.figure.yaxis.major_label_overrides = {float(k): v for k, v in ticks.items()}

    def show_threshold(self, threshold):
        self.edges.data = edge_segments(self.layout, threshold)

    def mark(self, pins: dict, selected: str):
        """Refresh the selection and, when the pins changed, the outline columns."""
        self._select(selected)
        if pins != self._pins:
            ids = self.nodes.data["node_id"]
            colour, width, label = outlines(ids, pins)
            n = len(ids)
            self.nodes.patch({"outline": [(slice(0, n), colour)], "lw": [(slice(0, n), width)], "pin": [(slice(0, n), label)]})
            self._pins = dict(pins)
