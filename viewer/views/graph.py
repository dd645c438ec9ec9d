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


def node_labels(kind, channel, head, head_channel, is_bias) -> np.ndarray:
    """Hover text of each node: head/channel for q/k/v, channel otherwise, 'bias' for bias pseudo-nodes."""
    out = []
    for k, c, h, hc, b in zip(kind, channel, head, head_channel, is_bias, strict=True):
        if b:
            out.append("bias")
        elif k in ("q", "k", "v") and h == h:  # NaN check
            out.append(f"head {int(h)} ch {int(hc)} (ch {int(c)})")
        else:
            out.append(f"ch {int(c)}")
    return np.asarray(out, dtype=object)


def layout_layer_half(nodes: pd.DataFrame, edges: pd.DataFrame | None, half: str) -> pd.DataFrame:
    """Nodes (plus bias pseudo-nodes that feed this layer-half) with x, y, is_bias, label; y = row of the location.

    Built from numpy columns (a few hundred nodes): the pandas version cost ~30 ms per layer pick.
    """
    nodes = nodes.reset_index(drop=True)
    rows = {k: i for i, k in enumerate(ROWS[half])}
    cols = {c: nodes[c].to_numpy(object) for c in ("node_id", "location", "kind")}
    cols.update({c: nodes[c].to_numpy(float, na_value=np.nan) for c in ("channel", "head", "head_channel", "delta")})
    cols["x"] = row_positions(nodes)
    cols["is_bias"] = np.zeros(len(nodes), bool)
    if edges is not None and len(edges):
        bias_mask = edges["src_is_bias"].to_numpy(object) == True  # noqa: E712 (nulls are not bias)
        bias_ids, first = np.unique(edges["src_node_id"].to_numpy(object)[bias_mask], return_index=True)
        if len(bias_ids):
            bias_locs = edges["src_location"].to_numpy(object)[bias_mask][first]
            bx = np.zeros(len(bias_ids))
            for loc in np.unique(bias_locs):  # to the right of their row
                in_row = cols["x"][cols["location"] == loc]
                at = np.flatnonzero(bias_locs == loc)
                bx[at] = (in_row.max() if len(in_row) else 0) + 1.5 + np.arange(len(at))
            n = len(bias_ids)
            extra = {"node_id": bias_ids, "location": bias_locs, "kind": np.array([loc.rsplit(".", 1)[-1] for loc in bias_locs], object),
                     "channel": np.full(n, np.nan), "head": np.full(n, np.nan), "head_channel": np.full(n, np.nan),
                     "delta": np.full(n, np.nan), "x": bx, "is_bias": np.ones(n, bool)}
            cols = {k: np.concatenate([v, extra[k]]) for k, v in cols.items()}
    cols["y"] = np.array([rows.get(k, np.nan) for k in cols["kind"]], float)
    cols["label"] = node_labels(cols["kind"], cols["channel"], cols["head"], cols["head_channel"], cols["is_bias"])
    return pd.DataFrame(cols)


def edge_segments(pos: pd.DataFrame, edges: pd.DataFrame | None, threshold: float) -> dict:
    """Segments for edges whose |strength| >= threshold * the strongest in view; width/alpha by strength."""
    cols = {k: [] for k in ("x0", "y0", "x1", "y1", "color", "alpha", "width", "src", "tgt", "strength")}
    if edges is None or not len(edges):
        return cols
    strength, weight = edges["strength"].to_numpy(float, na_value=np.nan), edges["weight"].to_numpy(float, na_value=np.nan)
    measure = np.where(np.isnan(strength), weight, strength)
    mag = np.abs(np.nan_to_num(measure))
    top = mag.max() if len(mag) else 0
    if top <= 0:
        return cols
    index = pd.Index(pos["node_id"].to_numpy(object))
    si = index.get_indexer(edges["src_node_id"].to_numpy(object))
    ti = index.get_indexer(edges["tgt_node_id"].to_numpy(object))
    keep = np.flatnonzero((mag >= threshold * top) & (si >= 0) & (ti >= 0))
    x, y = pos["x"].to_numpy(float), pos["y"].to_numpy(float)
    si, ti, rel = si[keep], ti[keep], mag[keep] / top
    cols.update(x0=x[si], y0=y[si], x1=x[ti], y1=y[ti], color=np.where(measure[keep] >= 0, "#d6604d", "#4393c3").astype(object),
                alpha=0.15 + 0.85 * rel, width=0.5 + 3.5 * rel, src=edges["src_node_id"].to_numpy(object)[keep],
                tgt=edges["tgt_node_id"].to_numpy(object)[keep], strength=measure[keep])
    return as_arrays(cols)


def as_arrays(cols: dict) -> dict:
    """Column data as numpy arrays: Bokeh walks Python lists element by element whenever it re-scans the
    document's models (an array is one value), and serializes arrays in binary."""
    return {k: v if isinstance(v, np.ndarray) else np.asarray(v, dtype=object if v and isinstance(v[0], str) else None)
            for k, v in cols.items()}


def outlines(node_ids, pins: dict, selected: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(outline colour, line width, pin label) per node: black = selected, amber = pinned."""
    ids = np.asarray(node_ids, dtype=object)
    pinned = np.array([n in pins for n in ids], bool) if pins else np.zeros(len(ids), bool)
    chosen = ids == selected
    colour = np.where(chosen, "#000000", np.where(pinned, "#ffb000", "#555555")).astype(object)
    width = np.where(chosen, 3.0, np.where(pinned, 2.5, 0.8))
    label = np.array([pins.get(n, "") for n in ids], dtype=object) if pins else np.full(len(ids), "", dtype=object)
    return colour, width, label


def _node_data(pos: pd.DataFrame, scale: float, pins: dict, selected: str) -> dict:
    ids = pos["node_id"].to_numpy(object)
    colour, width, label = outlines(ids, pins, selected)
    delta = pos["delta"].to_numpy(float)
    return {"x": pos["x"].to_numpy(float), "y": pos["y"].to_numpy(float), "node_id": ids, "label": pos["label"].to_numpy(object),
            "delta": delta, "color": np.asarray(delta_colours(delta, scale), dtype=object), "outline": colour, "lw": width, "pin": label}


class CircuitGraph:
    """A Bokeh graph of circuit nodes; `on_select(node_id)` is called when a node is tapped."""

    def __init__(self, on_select, height=420, title="", node_size=14):
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
        if list(self.ticker.ticks) != [float(t) for t in ticks]:  # mutate: a new ticker model would re-walk the whole document
            self.ticker.ticks = [float(t) for t in ticks]
            self.figure.yaxis.major_label_overrides = {float(k): v for k, v in ticks.items()}

    def show_threshold(self, edges, threshold):
        self.edges.data = edge_segments(self.positions, edges, threshold)

    def mark(self, pins: dict, selected: str):
        """Refresh outlines only (selection or pins changed)."""
        ids = self.nodes.data["node_id"]
        colour, width, label = outlines(ids, pins, selected)
        n = len(ids)
        self.nodes.patch({"outline": [(slice(0, n), colour)], "lw": [(slice(0, n), width)], "pin": [(slice(0, n), label)]})


def layer_half_ticks(half: str) -> dict:
    return {i: k for i, k in enumerate(ROWS[half])}


def _band(grp: pd.DataFrame, y: np.ndarray) -> pd.DataFrame:
    """Nodes of one band of the whole-circuit graph at rows `y`, laid out within their rows."""
    grp = grp.reset_index(drop=True).copy()
    grp["is_bias"] = False
    grp["y"] = np.asarray(y, float)
    grp["x"] = row_positions(grp)
    grp["label"] = node_labels(grp["kind"].to_numpy(object), grp["channel"].to_numpy(float, na_value=np.nan),
                               grp["head"].to_numpy(float, na_value=np.nan),
                               grp["head_channel"].to_numpy(float, na_value=np.nan), np.zeros(len(grp), bool))
    return grp


def layout_whole(nodes: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """All nodes: one band of rows per layer-half, stacked by layer (layer 0 at the bottom); above the
    last layer the final residual (`final_resid`, read by ln_f and the unembedding), then one row per
    location this code does not know (the "other" group, by name)."""
    parts, ticks, base = [], {}, 0
    half = nodes["half"].to_numpy(object)
    for (layer, h), grp in nodes[np.isin(half, list(ROWS))].groupby(["layer", "half"], sort=True):
        rows = ROWS[h]
        parts.append(_band(grp, base + grp["kind"].map({k: i for i, k in enumerate(rows)}).to_numpy(float)))
        ticks[base + (len(rows) - 1) / 2] = f"{int(layer)}.{h}"  # one label per band (int: final_resid makes the column float); hover names each node's location
        base += len(rows) + 1
    for group in ("final", "other"):
        grp = nodes[half == group]
        if grp.empty:
            continue
        locations = sorted(set(grp["location"]))
        parts.append(_band(grp, base + grp["location"].map({loc: i for i, loc in enumerate(locations)}).to_numpy(float)))
        ticks.update({base + i: loc if group == "final" else f"{loc} (other)" for i, loc in enumerate(locations)})
        base += len(locations) + 1
    pos = pd.concat(parts, ignore_index=True) if parts else nodes.assign(x=[], y=[], is_bias=[])
    return pos, ticks
