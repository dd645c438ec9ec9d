"""Circuit graphs: one layer-half (rows per location) and the whole circuit across layers.

Bokeh figures built once per session; a new selection only replaces their ColumnDataSources'
data, so an interaction costs a layout of a few hundred points, not a new figure.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from bokeh.models import ColumnDataSource, FixedTicker, HoverTool, Segment, TapTool
from bokeh.palettes import RdBu11
from bokeh.plotting import figure

ROWS = {"attn": ("act_in", "q", "k", "v", "resid_delta"), "mlp": ("act_in", "post_act", "resid_delta")}
DIVERGING = RdBu11[::-1]  # blue = negative delta, red = positive (the node matters)
NO_DELTA = "#bbbbbb"


def delta_colours(delta: np.ndarray, scale: float) -> list[str]:
    """Diverging colours centred on zero; `scale` is the |delta| mapped to the palette's ends."""
    delta = np.asarray(delta, float)
    scale = scale if scale and np.isfinite(scale) and scale > 0 else 1.0
    idx = np.clip(np.round((delta / scale + 1) / 2 * (len(DIVERGING) - 1)), 0, len(DIVERGING) - 1)
    return [NO_DELTA if not np.isfinite(d) else DIVERGING[int(i)] for d, i in zip(delta, np.nan_to_num(idx), strict=True)]


def _rank_within(groups: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... within each run of equal values of an already grouped (sorted) array."""
    if len(groups) == 0:
        return np.zeros(0, int)
    starts = np.r_[0, np.flatnonzero(groups[1:] != groups[:-1]) + 1]
    return np.arange(len(groups)) - np.repeat(starts, np.diff(np.r_[starts, len(groups)]))


def row_positions(df: pd.DataFrame) -> np.ndarray:
    """x of each node within its row, centred: q/k/v columns grouped by head (a head's block as wide as its
    largest of q, k, v; one column of gap between heads), so a head's q, k and v line up across the three rows.
    Rows keep the table's order (circuit_data order); within a head, channels go left to right."""
    x = np.zeros(len(df))
    kind = df["kind"].to_numpy()
    qkv = np.isin(kind, ["q", "k", "v"])
    locations = df["location"].to_numpy()
    for loc in np.unique(locations[~qkv]):
        idx = np.flatnonzero((locations == loc) & ~qkv)
        x[idx] = np.arange(len(idx)) - (len(idx) - 1) / 2
    if qkv.any():
        idx = np.flatnonzero(qkv)
        head = df["head"].to_numpy()[idx].astype(np.int64)
        kind_code = np.searchsorted(["k", "q", "v"], kind[idx])
        order = np.lexsort((df["head_channel"].to_numpy()[idx].astype(np.int64), kind_code, head))
        group = head[order] * 3 + kind_code[order]
        rank = _rank_within(group)
        heads, head_of = np.unique(head, return_inverse=True)
        width = np.zeros(len(heads), np.int64)
        np.maximum.at(width, head_of[order], rank + 1)
        start = np.cumsum(width + 1) - (width + 1)
        total = int((width + 1).sum()) - 1
        x[idx[order]] = start[head_of[order]] + rank - (total - 1) / 2
    return x


def layout_layer_half(nodes: pd.DataFrame, edges: pd.DataFrame | None, half: str) -> pd.DataFrame:
    """Nodes (plus bias pseudo-nodes that feed this layer-half) with x, y; y = row of the location."""
    nodes = nodes.reset_index(drop=True).copy()
    nodes["is_bias"] = False
    if edges is not None and len(edges):
        bias = edges[edges["src_is_bias"].fillna(False).astype(bool)].drop_duplicates("src_node_id")
        if len(bias):
            extra = pd.DataFrame({"node_id": bias["src_node_id"], "location": bias["src_location"],
                                  "kind": bias["src_location"].str.rsplit(".", n=1).str[-1], "delta": np.nan, "is_bias": True})
            nodes = pd.concat([nodes, extra], ignore_index=True)
    rows = ROWS[half]
    nodes["y"] = nodes["kind"].map({k: i for i, k in enumerate(rows)}).astype(float)
    nodes["x"] = 0.0
    real = ~nodes["is_bias"]
    nodes.loc[real, "x"] = row_positions(nodes[real].reset_index(drop=True))
    for loc, idx in nodes[nodes["is_bias"]].groupby("location").indices.items():
        row = nodes[(nodes["location"] == loc) & ~nodes["is_bias"]]
        right = row["x"].max() if len(row) else 0
        nodes.loc[nodes.index[idx], "x"] = right + 1.5 + np.arange(len(idx))
    return nodes


def edge_segments(pos: pd.DataFrame, edges: pd.DataFrame | None, threshold: float) -> dict:
    """Segments for edges whose |strength| >= threshold * the strongest in view; width/alpha by strength."""
    cols = {k: [] for k in ("x0", "y0", "x1", "y1", "color", "alpha", "width", "src", "tgt", "strength")}
    if edges is None or not len(edges):
        return cols
    measure = edges["strength"].where(edges["strength"].notna(), edges["weight"]).to_numpy(float)
    mag = np.abs(np.nan_to_num(measure))
    top = mag.max() if len(mag) else 0
    if top <= 0:
        return cols
    keep = mag >= threshold * top
    xy = pos.set_index("node_id")[["x", "y"]]
    e = edges[keep]
    src, tgt = xy.reindex(e["src_node_id"]), xy.reindex(e["tgt_node_id"])
    ok = (src["x"].notna().to_numpy() & tgt["x"].notna().to_numpy())
    rel = mag[keep][ok] / top
    cols.update(x0=src["x"].to_numpy()[ok], y0=src["y"].to_numpy()[ok], x1=tgt["x"].to_numpy()[ok], y1=tgt["y"].to_numpy()[ok],
                color=np.where(measure[keep][ok] >= 0, "#d6604d", "#4393c3").astype(object), alpha=0.15 + 0.85 * rel,
                width=0.5 + 3.5 * rel, src=e["src_node_id"].to_numpy(dtype=object)[ok], tgt=e["tgt_node_id"].to_numpy(dtype=object)[ok],
                strength=measure[keep][ok])
    return as_arrays(cols)


def as_arrays(cols: dict) -> dict:
    """Column data as numpy arrays: Bokeh walks Python lists element by element whenever it re-scans the
    document's models (an array is one value), and serializes arrays in binary."""
    return {k: v if isinstance(v, np.ndarray) else np.asarray(v, dtype=object if v and isinstance(v[0], str) else None)
            for k, v in cols.items()}


def _node_data(pos: pd.DataFrame, scale: float, pins: dict, selected: str) -> dict:
    label = [
        f"head {int(h)} ch {int(hc)} (ch {int(c)})" if pd.notna(h) else ("bias" if b else f"ch {int(c)}")
        for h, hc, c, b in zip(pos.get("head", pd.Series(np.nan, index=pos.index)), pos.get("head_channel", pd.Series(np.nan, index=pos.index)),
                               pos.get("channel", pd.Series(0, index=pos.index)).fillna(0), pos["is_bias"], strict=True)
    ]
    outline = ["#000000" if n == selected else ("#ffb000" if n in pins else "#555555") for n in pos["node_id"]]
    return as_arrays({"x": pos["x"].to_numpy(float), "y": pos["y"].to_numpy(float), "node_id": pos["node_id"].tolist(), "label": label,
                      "delta": pos["delta"].to_numpy(float), "color": delta_colours(pos["delta"].to_numpy(float), scale),
                      "outline": outline, "lw": [3 if n == selected else (2.5 if n in pins else 0.8) for n in pos["node_id"]],
                      "pin": [pins.get(n, "") for n in pos["node_id"]]})


class CircuitGraph:
    """A Bokeh graph of circuit nodes; `on_select(node_id)` is called when a node is tapped."""

    def __init__(self, on_select, height=480, title="", node_size=14):
        self.on_select = on_select
        self.nodes = ColumnDataSource({k: [] for k in ("x", "y", "node_id", "label", "delta", "color", "outline", "lw", "pin")})
        self.edges = ColumnDataSource({k: [] for k in ("x0", "y0", "x1", "y1", "color", "alpha", "width", "src", "tgt", "strength")})
        fig = figure(height=height, sizing_mode="stretch_width", tools="pan,wheel_zoom,box_zoom,reset,save",
                     active_scroll="wheel_zoom", title=title, toolbar_location="above")
        fig.add_glyph(self.edges, Segment(x0="x0", y0="y0", x1="x1", y1="y1", line_color="color", line_alpha="alpha", line_width="width"))
        renderer = fig.scatter("x", "y", source=self.nodes, size=node_size, fill_color="color", line_color="outline", line_width="lw",
                               marker="circle", nonselection_fill_alpha=1.0, selection_fill_alpha=1.0)
        fig.add_tools(HoverTool(renderers=[renderer], tooltips=[("node", "@node_id"), ("", "@label"), ("delta", "@delta{0.0000}"),
                                                                ("pin", "@pin")]))
        fig.add_tools(TapTool(renderers=[renderer]))
        fig.xaxis.visible = False
        fig.xgrid.visible = False
        fig.ygrid.grid_line_alpha = 0.3
        self.ticker = FixedTicker(ticks=[])
        fig.yaxis.ticker = self.ticker
        self.figure = fig
        self.positions = pd.DataFrame()
        self.nodes.selected.on_change("indices", self._tapped)

    def _tapped(self, attr, old, new):
        if new:
            node_id = self.nodes.data["node_id"][new[0]]
            self.nodes.selected.indices = []  # selection is shown by the outline, not Bokeh's selection state
            self.on_select(node_id)

    def show(self, pos: pd.DataFrame, edges: pd.DataFrame | None, threshold: float, scale: float, pins: dict, selected: str, ticks: dict):
        self.positions = pos
        self.nodes.data = _node_data(pos, scale, pins, selected)
        self.edges.data = edge_segments(pos, edges, threshold)
        self.ticker.ticks = [float(t) for t in ticks]  # mutate: a new ticker model would re-walk the whole document
        self.figure.yaxis.major_label_overrides = {float(k): v for k, v in ticks.items()}

    def show_threshold(self, edges, threshold):
        self.edges.data = edge_segments(self.positions, edges, threshold)

    def mark(self, pins: dict, selected: str):
        """Refresh outlines only (selection or pins changed)."""
        ids = list(self.nodes.data["node_id"])
        self.nodes.patch({
            "outline": [(slice(0, len(ids)), ["#000000" if n == selected else ("#ffb000" if n in pins else "#555555") for n in ids])],
            "lw": [(slice(0, len(ids)), [3 if n == selected else (2.5 if n in pins else 0.8) for n in ids])],
            "pin": [(slice(0, len(ids)), [pins.get(n, "") for n in ids])],
        })


def layer_half_ticks(half: str) -> dict:
    return {i: k for i, k in enumerate(ROWS[half])}


def layout_whole(nodes: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """All nodes: one band of rows per layer-half, stacked by layer (layer 0 at the bottom)."""
    parts, ticks, base = [], {}, 0
    for (layer, half), grp in nodes.groupby(["layer", "half"], sort=True):
        grp = grp.reset_index(drop=True).copy()
        grp["is_bias"] = False
        rows = ROWS[half]
        grp["y"] = base + grp["kind"].map({k: i for i, k in enumerate(rows)}).astype(float)
        grp["x"] = row_positions(grp)
        ticks[base + (len(rows) - 1) / 2] = f"{layer}.{half}"  # one label per band; hover names each node's location
        parts.append(grp)
        base += len(rows) + 1
    pos = pd.concat(parts, ignore_index=True) if parts else nodes.assign(x=[], y=[], is_bias=[])
    return pos, ticks
