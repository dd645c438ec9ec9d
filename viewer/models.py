"""The viewer's model layer: query results (Polars frames from viewer/queries.py) reshaped into what the views draw.

Views (viewer/views/, viewer/explorer.py) never query: they call a function here and draw the plain data it
returns (dataclasses of Polars frames, numpy arrays, dicts and numbers), so a view can be tested with data
made by hand and a query changed without touching a view. Results that every session shares are memoized
process-wide by `queries.memo`, keyed by the tables' version (`queries.connection()[0]`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from viewer import queries

MARK_LAYER_DELTA = 0.3  # layer-halves above this delta are marked (released viewer)
ROWS = {"attn": ("act_in", "q", "k", "v", "resid_delta"), "mlp": ("act_in", "post_act", "resid_delta")}
RESIDUAL_KINDS = ("act_in", "resid_delta")


def tables_version():
    """Identifies the tables on disk: changes when the pipeline replaces circuits.duckdb."""
    return queries.connection()[0]


_version = tables_version


def floats(df: pl.DataFrame, name: str) -> np.ndarray:
    """A column as float64 numpy, nulls as NaN."""
    return df[name].cast(pl.Float64).to_numpy()


def objects(df: pl.DataFrame, name: str) -> np.ndarray:
    """A column as a numpy object array (strings as Python str, nulls as None)."""
    arr = df[name].to_numpy()
    return arr if arr.dtype == object else arr.astype(object)


# --- runs -----------------------------------------------------------------------------------


def run_ids() -> list[str]:
    return _run_ids(_version())


@queries.memo(8)
def _run_ids(version):
    return queries.runs()["run_id"].to_list()


def run(run_id: str) -> dict | None:
    """One run's row (a dict), from the (cached) runs table."""
    return _run_row(_version(), run_id)


@queries.memo(256)
def _run_row(version, run_id):
    df = queries.runs().filter(pl.col("run_id") == run_id)
    return None if df.is_empty() else df.row(0, named=True)


def model_config(run_id: str) -> dict:
    """The run's model config with d_head filled in (d_model // n_head when absent)."""
    r = run(run_id)
    cfg = json.loads(r["model_config"]) if r and r.get("model_config") else {}
    if not cfg.get("d_head") and cfg.get("d_model") and cfg.get("n_head"):
        cfg["d_head"] = cfg["d_model"] // cfg["n_head"]
    return cfg


def prefetch_run(run_id: str, layer_half: str) -> None:
    """A run's tables, concurrently (DuckDB releases the GIL): the views of a run switch then hit the cache."""
    queries.prefetch((queries.layer_halves, run_id), (queries.nodes, run_id), (queries.edges, run_id, layer_half))


def pick_run(choices: list[tuple[str, str]]) -> str | None:
    """The run the sidebar pickers point at: narrowed by (column, value) pairs in order (model, task, sweep,
    k_label) up to the picker changed; a value with no run is skipped. The first matching run."""
    sel = queries.runs()
    for column, value in choices:
        sub = sel.filter(pl.col(column) == value)
        sel = sub if len(sub) else sel
    return sel["run_id"][0] if len(sel) else None


@dataclass(frozen=True)
class RunChoices:
    """The sidebar of a run: (options, value) of the model, task, sweep and k pickers, its layer-halves, its row."""

    pickers: list
    layers: pl.DataFrame
    run: dict


def run_choices(run_id: str) -> RunChoices:
    return _run_choices(_version(), run_id)


@queries.memo(256)
def _run_choices(version, run_id):
    runs = queries.runs()
    r = run(run_id)
    cols = {c: objects(runs, c) for c in ("model", "task", "sweep", "k_label")}
    m = cols["model"] == r["model"]
    t = m & (cols["task"] == r["task"])
    k = t & (cols["sweep"] == r["sweep"])
    pickers = [
        (sorted(set(cols["model"])), r["model"]),
        (sorted(set(cols["task"][m])), r["task"]),
        (sorted(set(cols["sweep"][t])), r["sweep"]),
        (cols["k_label"][k].tolist(), r["k_label"]),
    ]  # runs are already in numeric k order
    return RunChoices(pickers, layer_halves(run_id), r)


# --- layer-halves and nodes -----------------------------------------------------------------


def layer_halves(run_id: str) -> pl.DataFrame:
    """The run's layer-halves (queries.layer_halves) with `marked`: delta > 0.3 (NaN and null deltas unmarked)."""
    return _layer_halves(_version(), run_id)


@queries.memo(256)
def _layer_halves(version, run_id):
    df = queries.layer_halves(run_id)
    return df.with_columns(marked=(pl.col("delta").fill_nan(None) > MARK_LAYER_DELTA).fill_null(False))


def default_layer(layers: pl.DataFrame) -> str:
    """Where the graph opens when the URL names no layer: the layer-half holding the most circuit nodes (ties: the
    earliest), so a circuit living mostly in one layer-half opens there. (The released viewer opened on the first
    marked one, delta > 0.3: often a layer-half of a few nodes beside the one holding most of the circuit.)"""
    counts = layers["n_nodes"].fill_null(0).to_list()
    return layers["layer_half"][counts.index(max(counts))]  # list.index: the first of the ties, rows in (layer, half) order


def node(run_id: str, node_id: str) -> dict | None:
    """One node's row, looked up in the run's (cached) node table rather than by another query per click."""
    index = _node_index(_version(), run_id)
    i = index.get(node_id)
    return None if i is None else queries.nodes(run_id).row(i, named=True)


@queries.memo(64)
def _node_index(version, run_id):
    return {n: i for i, n in enumerate(queries.nodes(run_id)["node_id"].to_list())}


def node_ids(run_id: str) -> list[str]:
    return list(_node_index(_version(), run_id))


def duplicate_nodes(run_id: str) -> int:
    """How many rows of the run's node table repeat a node_id (the page says so)."""
    return queries.duplicate_nodes(run_id)


def delta_scale(run_id: str) -> float:
    """The largest |delta| of the run's nodes: the ends of the graphs' colour scale."""
    return _delta_scale(_version(), run_id)


@queries.memo(256)
def _delta_scale(version, run_id):
    d = queries.nodes(run_id)["delta"].cast(pl.Float64).fill_nan(None).abs().max()
    return float(d) if d is not None else 1.0


# --- graphs ---------------------------------------------------------------------------------


def _rank_within(groups: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... within each run of equal values of an already grouped (sorted) array."""
    if len(groups) == 0:
        return np.zeros(0, int)
    starts = np.r_[0, np.flatnonzero(groups[1:] != groups[:-1]) + 1]
    return np.arange(len(groups)) - np.repeat(starts, np.diff(np.r_[starts, len(groups)]))


def row_positions(kind: np.ndarray, location: np.ndarray, head: np.ndarray, head_channel: np.ndarray) -> np.ndarray:
    """x of each node within its row, centred: q/k/v columns grouped by head (a head's block as wide as its
    largest of q, k, v; one column of gap between heads), so a head's q, k and v line up across the three rows.
    Rows keep the table's order (circuit_data order); within a head, channels go left to right."""
    x = np.zeros(len(kind))
    qkv = np.isin(kind, ["q", "k", "v"])
    for loc in np.unique(location[~qkv]):
        idx = np.flatnonzero((location == loc) & ~qkv)
        x[idx] = np.arange(len(idx)) - (len(idx) - 1) / 2
    if qkv.any():
        idx = np.flatnonzero(qkv)
        heads_of = head[idx].astype(np.int64)
        kind_code = np.searchsorted(["k", "q", "v"], kind[idx])
        order = np.lexsort((head_channel[idx].astype(np.int64), kind_code, heads_of))
        group = heads_of[order] * 3 + kind_code[order]
        rank = _rank_within(group)
        heads, head_of = np.unique(heads_of, return_inverse=True)
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


@dataclass(frozen=True)
class GraphLayout:
    """A graph to draw: node columns (numpy: node_id, x, y, delta, label, is_bias), y-axis ticks (y -> label),
    and the edges as indices into the node columns with their measure (strength, else weight); `top`: the
    largest |measure| of all the edges given, drawn or not (the threshold is a fraction of it)."""

    nodes: dict
    ticks: dict
    top: float = 0.0
    src: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    tgt: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    measure: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def node_ids(self) -> list[str]:
        return self.nodes["node_id"].tolist()


def _node_columns(nodes: pl.DataFrame) -> dict:
    cols = {c: objects(nodes, c) for c in ("node_id", "location", "kind")}
    cols.update({c: floats(nodes, c) for c in ("channel", "head", "head_channel", "delta")})
    return cols


def _with_edges(cols: dict, ticks: dict, edges: pl.DataFrame | None) -> GraphLayout:
    """The layout with its edges resolved to node indices (edges whose ends are not drawn are left out)."""
    keep = ("node_id", "x", "y", "delta", "label", "is_bias")
    nodes = {k: cols[k] for k in keep}
    if edges is None or edges.is_empty():
        return GraphLayout(nodes, ticks)
    strength, weight = floats(edges, "strength"), floats(edges, "weight")
    measure = np.where(np.isnan(strength), weight, strength)
    index = {n: i for i, n in enumerate(cols["node_id"].tolist())}
    si = np.fromiter((index.get(n, -1) for n in edges["src_node_id"].to_list()), np.int64, len(edges))
    ti = np.fromiter((index.get(n, -1) for n in edges["tgt_node_id"].to_list()), np.int64, len(edges))
    ok = (si >= 0) & (ti >= 0)
    top = float(np.abs(np.nan_to_num(measure)).max())
    return GraphLayout(nodes, ticks, top, si[ok], ti[ok], measure[ok])


def layout_layer_half(nodes: pl.DataFrame, edges: pl.DataFrame | None, half: str) -> GraphLayout:
    """Nodes (plus bias pseudo-nodes that feed this layer-half) with x, y, is_bias, label; y = row of the location."""
    rows = {k: i for i, k in enumerate(ROWS[half])}
    cols = _node_columns(nodes)
    cols["x"] = row_positions(cols["kind"], cols["location"], cols["head"], cols["head_channel"])
    cols["is_bias"] = np.zeros(len(nodes), bool)
    if edges is not None and len(edges):
        bias_mask = edges["src_is_bias"].fill_null(False).to_numpy()  # nulls are not bias
        bias_ids, first = np.unique(objects(edges, "src_node_id")[bias_mask].astype(str), return_index=True)
        if len(bias_ids):
            bias_locs = objects(edges, "src_location")[bias_mask][first]
            bx = np.zeros(len(bias_ids))
            for loc in np.unique(bias_locs):  # to the right of their row
                in_row = cols["x"][cols["location"] == loc]
                at = np.flatnonzero(bias_locs == loc)
                bx[at] = (in_row.max() if len(in_row) else 0) + 1.5 + np.arange(len(at))
            n = len(bias_ids)
            extra = {
                "node_id": bias_ids.astype(object),
                "location": bias_locs,
                "kind": np.array([loc.rsplit(".", 1)[-1] for loc in bias_locs], object),
                "channel": np.full(n, np.nan),
                "head": np.full(n, np.nan),
                "head_channel": np.full(n, np.nan),
                "delta": np.full(n, np.nan),
                "x": bx,
                "is_bias": np.ones(n, bool),
            }
            cols = {k: np.concatenate([v, extra[k]]) for k, v in cols.items()}
    cols["y"] = np.array([rows.get(k, np.nan) for k in cols["kind"]], float)
    cols["label"] = node_labels(cols["kind"], cols["channel"], cols["head"], cols["head_channel"], cols["is_bias"])
    return _with_edges(cols, {i: k for i, k in enumerate(ROWS[half])}, edges)


def layer_layout(run_id: str, layer_half: str) -> GraphLayout:
    """The layer-half graph of a run, shared by every session."""
    return _layer_layout(_version(), run_id, layer_half)


@queries.memo(512)
def _layer_layout(version, run_id, layer_half):
    return layout_layer_half(queries.nodes(run_id, layer_half), queries.edges(run_id, layer_half), layer_half.split(".", 1)[1])


def layout_whole(nodes: pl.DataFrame, edges: pl.DataFrame | None = None, links: pl.DataFrame | None = None) -> GraphLayout:
    """All nodes: one band of rows per layer-half, stacked by layer (layer 0 at the bottom); above the
    last layer the final residual (`final_resid`, read by ln_f and the unembedding), then one row per
    location this code does not know (the "other" group, by name). Edges: the stored ones, plus `links`
    (residual writes to later reads of the channel, `queries.residual_links`) drawn at the strongest
    edge's strength so that they pass any threshold."""
    all_cols = _node_columns(nodes)
    half = objects(nodes, "half")
    n = len(nodes)
    x, y = np.zeros(n), np.full(n, np.nan)
    order, ticks, base = [], {}, 0
    layer = floats(nodes, "layer")
    for h_layer, h in sorted(
        {(int(a), b) for a, b in zip(layer[np.isin(half, list(ROWS))], half[np.isin(half, list(ROWS))], strict=True)}
    ):
        idx = np.flatnonzero((layer == h_layer) & (half == h))
        rows = ROWS[h]
        y[idx] = base + np.array([rows.index(k) if k in rows else np.nan for k in all_cols["kind"][idx]], float)
        order.append(idx)
        ticks[base + (len(rows) - 1) / 2] = f"{h_layer}.{h}"  # one label per band; hover names each node's location
        base += len(rows) + 1
    for group in ("final", "other"):
        idx = np.flatnonzero(half == group)
        if not len(idx):
            continue
        locations = sorted(set(all_cols["location"][idx].tolist()))
        y[idx] = base + np.array([locations.index(loc) for loc in all_cols["location"][idx]], float)
        order.append(idx)
        ticks.update({base + i: loc if group == "final" else f"{loc} (other)" for i, loc in enumerate(locations)})
        base += len(locations) + 1
    keep = np.concatenate(order) if order else np.zeros(0, np.int64)
    for idx in order:  # x within each band's rows, as in a layer-half
        x[idx] = row_positions(
            all_cols["kind"][idx], all_cols["location"][idx], all_cols["head"][idx], all_cols["head_channel"][idx]
        )
    cols = {k: v[keep] for k, v in all_cols.items()}
    cols.update(x=x[keep], y=y[keep], is_bias=np.zeros(len(keep), bool))
    cols["label"] = node_labels(cols["kind"], cols["channel"], cols["head"], cols["head_channel"], cols["is_bias"])
    return _with_edges(cols, ticks, _whole_edges(edges, links))


def _whole_edges(edges: pl.DataFrame | None, links: pl.DataFrame | None) -> pl.DataFrame | None:
    if links is None or links.is_empty():
        return edges
    strongest = edges["strength"].cast(pl.Float64).fill_nan(None).abs().max() if edges is not None and len(edges) else None
    links = links.select(
        "src_node_id",
        "tgt_node_id",
        strength=pl.lit(float(strongest) if strongest is not None else 1.0),
        weight=pl.lit(float("nan")),
    )
    return links if edges is None else pl.concat([edges.select(links.columns).cast(links.schema), links])


def whole_layout(run_id: str) -> GraphLayout:
    """The whole-circuit graph of a run, shared by every session."""
    return _whole_layout(_version(), run_id)


@queries.memo(16)
def _whole_layout(version, run_id):
    return layout_whole(queries.nodes(run_id), queries.edges(run_id), queries.residual_links(run_id))


# --- tokens ---------------------------------------------------------------------------------


def vocab_texts(model: str) -> np.ndarray | None:
    """Token id -> text (object array) of a model's vocab (its own partition, else the only one: vocab may
    be keyed by tokenizer name); None without a vocab table."""
    names = queries.vocab_models()
    if not names:
        return None
    return _vocab_array(_version(), model if model in names else names[0])


@queries.memo(8)
def _vocab_array(version, vm):
    df = queries.vocab(vm)
    if df is None or df.is_empty():
        return None
    ids = df["token_id"].to_numpy()
    out = np.array(["#" + str(i) for i in range(int(ids.max()) + 1)], dtype=object)
    out[ids] = objects(df, "text")
    return out


def token_texts(model: str, token_ids) -> np.ndarray:
    """Texts of token ids (the vocab's, or '#<id>' for ids it lacks / without a vocab)."""
    ids = np.asarray(token_ids, np.int64)
    texts = vocab_texts(model)
    if texts is None:
        return np.array(["#" + str(i) for i in ids.tolist()], dtype=object)
    inside = (ids >= 0) & (ids < len(texts))
    out = texts[np.where(inside, ids, 0)]
    if not inside.all():
        out = out.copy()
        out[~inside] = ["#" + str(i) for i in ids[~inside].tolist()]
    return out


def _with_text(df: pl.DataFrame | None, model: str) -> pl.DataFrame | None:
    if df is None:
        return None
    return df.with_columns(text=pl.Series(token_texts(model, df["token_id"].to_numpy()).tolist(), dtype=pl.String))


def snippets(run_id: str, node_id: str) -> pl.DataFrame | None:
    """The snippets shown for a node, ordered by (frac, side, rank, pos), with each token's text:
    frac, side, rank, pos, token_id, value, is_center, text."""
    df = queries.snippets(run_id, node_id)
    if df is None:
        return None
    r = run(run_id)
    return _with_text(df.sort("frac", "side", "rank", "pos"), r["model"] if r else "")


def wte_extremes(model: str, channel: int) -> pl.DataFrame | None:
    """Top and bottom wte weights of a channel with token texts: side, rank, token_id, value, text."""
    return _with_text(queries.wte_extremes(model, channel), model)


def unembed_extremes(model: str, channel: int) -> pl.DataFrame | None:
    """The tokens a residual channel pushes up ('top') and down ('bottom') directly, with texts."""
    return _with_text(queries.unembed_extremes(model, channel), model)


# --- the selected node ----------------------------------------------------------------------


def connections(run_id: str, node_id: str) -> tuple[pl.DataFrame | None, pl.DataFrame | None]:
    """(inputs, outputs) of a node: the nonzero entries of its column / row, strongest |strength| first
    (|weight| where there is no strength; neither: last), ties by source then target id."""
    df = queries.node_edges(run_id, node_id)
    if df is None:
        return None, None
    measure = (
        pl.when(pl.col("strength").is_null() | pl.col("strength").is_nan()).then(pl.col("weight")).otherwise(pl.col("strength"))
    )
    df = df.sort([measure.abs().fill_nan(-1).fill_null(-1), "src_node_id", "tgt_node_id"], descending=[True, False, False])
    return df.filter(pl.col("tgt_node_id") == node_id), df.filter(pl.col("src_node_id") == node_id)


@dataclass
class NodeDetail:
    """What the Node tab shows of a node (before the task docs and the attention pattern, which render on demand).

    `links`: the run's residual links, only when no stored edge says what reads / writes the channel;
    `logit`: the tokens a residual channel pushes directly (`unembed_extremes`), `logit_available` False
    when the model has no such table."""

    node: dict
    ablation: dict | None = None
    inputs: pl.DataFrame | None = None
    outputs: pl.DataFrame | None = None
    links: pl.DataFrame | None = None
    logit: pl.DataFrame | None = None
    logit_available: bool = True
    snippets: pl.DataFrame | None = None


def node_detail(run_id: str, node_id: str) -> NodeDetail | None:
    n = node(run_id, node_id) if node_id else None
    if n is None:
        return None
    queries.prefetch((queries.snippets, run_id, node_id), (queries.node_edges, run_id, node_id))
    ab = queries.ablations(run_id)
    row = ab.filter(pl.col("node_id") == node_id) if ab is not None else None
    detail = NodeDetail(n, ablation=row.row(0, named=True) if row is not None and len(row) else None)
    detail.inputs, detail.outputs = connections(run_id, node_id)
    kind = n.get("kind")
    if (kind == "resid_delta" and (detail.outputs is None or detail.outputs.is_empty())) or (
        kind == "final_resid" and (detail.inputs is None or detail.inputs.is_empty())
    ):
        detail.links = queries.residual_links(run_id)  # later readers / earlier writers, only when no stored edge says it
    if kind in ("resid_delta", "final_resid"):  # a residual channel: the tokens it pushes directly
        r = run(run_id)
        if r is not None:
            detail.logit_available = queries.model_has_rows("unembed_extremes", r["model"])
            detail.logit = unembed_extremes(r["model"], int(n["channel"])) if detail.logit_available else None
    detail.snippets = snippets(run_id, node_id)
    return detail


def activation_matrix(run_id: str, node_id: str) -> np.ndarray | None:
    """(n_docs, max length) float array of the node's activations, NaN where the doc has ended."""
    acts = queries.activations(run_id, node_id)
    docs = queries.task_docs(run_id)
    if acts is None or docs is None or docs.is_empty():
        return None
    out = np.full((int(docs["doc"].max()) + 1, int(docs["length"].max())), np.nan, np.float32)
    out[acts["doc"].to_numpy(), acts["pos"].to_numpy()] = acts["value"].to_numpy()
    return out


@dataclass
class TaskDoc:
    doc: int
    cls: int
    pair: int
    length: int
    tokens: list


def task_docs(run_id: str) -> list[TaskDoc]:
    """The run's task docs (doc order), each with its token texts; [] without a task_docs table."""
    return _task_docs(_version(), run_id)


@queries.memo(64)
def _task_docs(version, run_id):
    df = queries.task_docs(run_id)
    if df is None:
        return []
    return [
        TaskDoc(int(r["doc"]), int(r["class"]), int(r["pair"]), int(r["length"]), list(r["tokens"]))
        for r in df.iter_rows(named=True)
    ]


def task_doc_pages(docs: list[TaskDoc], per_page: int) -> dict:
    """Page label -> first pair of the page."""
    if not docs:
        return {}
    n_pairs = max(d.pair for d in docs) + 1
    return {f"pairs {p}-{min(p + per_page, n_pairs) - 1}": p for p in range(0, n_pairs, per_page)}


# --- attention patterns ---------------------------------------------------------------------
# Attention patterns of a head on one task doc, from the circuit's stored q and k channels (spec: "What the viewer derives").
#   head pattern:    softmax over causal s <= t of  sum_c q_c(t) k_c(s) / sqrt(d_head)
#   channel pattern: exp(q_c(t) k_c(s) / sqrt(d_head)) for one channel c, causal
# Channels missing from the circuit are zero, so the sum runs over channels kept in both q and k.
# Cost: one doc, T x T with T <= ctx; computed on selection, not stored.


def qk_matrices(df: pl.DataFrame, length: int) -> tuple[dict, dict]:
    """head_channel -> activation vector (length,) for q and for k."""
    q, k = {}, {}
    for (kind, hc), grp in df.group_by(["kind", "head_channel"], maintain_order=True):
        vec = np.zeros(length, np.float64)
        pos = grp["pos"].to_numpy()
        ok = pos < length
        vec[pos[ok]] = grp["value"].cast(pl.Float64).to_numpy()[ok]
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


@dataclass
class Attention:
    """The attention patterns of a q/k/v node's head on one doc: matrices (None: nothing to show) and titles."""

    note: list
    head: np.ndarray | None = None
    head_title: str = "head pattern"
    channel: np.ndarray | None = None
    channel_title: str = "channel pattern"


def attention(run_id: str, node_id: str, doc: int) -> Attention | str:
    """The patterns of the node's head, or a message (str) saying why there are none."""
    n = node(run_id, node_id) if node_id else None
    if n is None or n["kind"] not in ("q", "k", "v"):
        return "Attention patterns are shown for q, k and v nodes."
    docs = task_docs(run_id)
    if not docs:
        return "No task docs in the tables."
    doc = min(max(int(doc), 0), max(d.doc for d in docs))
    length = next(d.length for d in docs if d.doc == doc)
    d_head = int(model_config(run_id).get("d_head") or 1)
    layer, head, hc = int(n["layer"]), int(n["head"]), int(n["head_channel"])
    qk = queries.head_qk(run_id, layer, head, doc)
    q, k = qk_matrices(qk, length) if qk is not None else ({}, {})
    shared = sorted(set(q) & set(k))
    out = Attention(
        [
            f"layer {layer} head {head}, doc {doc} ({length} tokens): q·k over the circuit's channels kept in both q and k: "
            f"{shared if shared else 'none'}"
        ]
    )
    out.head, out.head_title = (head_pattern(q, k, d_head, length) if shared else None), f"head {head} pattern"
    if hc in q and hc in k:
        out.channel, out.channel_title = channel_pattern(q[hc], k[hc], d_head), f"channel {hc}: exp(q·k/√d)"
    else:
        out.channel_title = f"channel {hc}: not in both q and k"
        out.note.append(f"channel {hc} is not kept in both q and k of this head, so it has no pattern of its own")
    return out


# --- embeddings -----------------------------------------------------------------------------


def symlog(values: np.ndarray, linthresh: float) -> np.ndarray:
    """Symmetric log: linear within +-linthresh, logarithmic beyond (sign kept)."""
    return np.sign(values) * np.log10(1 + np.abs(values) / linthresh)


def wpe_image(entries: pl.DataFrame | None):
    """(positions x nonzero channels) matrix in symlog units, the channel labels, and linthresh."""
    if entries is None or entries.is_empty():
        return None, [], 1.0
    ch = entries["channel"].to_numpy()
    channels = np.unique(ch)
    rows = int(entries["row"].max()) + 1
    dense = np.zeros((rows, len(channels)), np.float64)
    dense[entries["row"].to_numpy(), np.searchsorted(channels, ch)] = floats(entries, "value")
    nz = np.abs(dense[dense != 0])
    linthresh = float(np.percentile(nz, 10)) if nz.size else 1.0
    return symlog(dense, linthresh), channels.tolist(), linthresh


def model_wpe_image(model: str):
    """The wpe heatmap of a model (float32 symlog image, channels, linthresh), shared by every session."""
    return _model_wpe_image(_version(), model)


@queries.memo(4)
def _model_wpe_image(version, model):
    img, channels, linthresh = wpe_image(queries.embedding_matrix(model, "wpe"))
    return (None if img is None else img.astype(np.float32)), channels, linthresh


@dataclass
class Embedding:
    """A residual channel's token embeddings: top / bottom tokens by wte weight (token_id, text, value),
    the histogram of its nonzero wte weights (bin_left, bin_right, count); None without the tables."""

    model: str
    channel: int
    top: pl.DataFrame | None = None
    bottom: pl.DataFrame | None = None
    hist: pl.DataFrame | None = None


def embedding(model: str, channel: int) -> Embedding:
    extremes, hist = wte_extremes(model, channel), queries.wte_histogram(model, channel)
    if extremes is None or hist is None:
        return Embedding(model, channel)
    columns = ["token_id", "text", "value"]
    return Embedding(
        model,
        channel,
        extremes.filter(pl.col("side") == "top").select(columns),
        extremes.filter(pl.col("side") == "bottom").select(columns),
        hist,
    )


# --- curves, comparison, checks, export -----------------------------------------------------


@dataclass
class Curves:
    """The Curves tab of a run: loss at k across its sweep (n_nodes, final_loss, k_label, run_id; None without
    the table) with the unpruned loss, the pruning curve (x, loss), the prune config, and training metrics
    (step, metric, value) with the last value of each."""

    run_id: str
    loss_at_k: pl.DataFrame | None = None
    unpruned: float | None = None
    pruning: pl.DataFrame | None = None
    config: dict = field(default_factory=dict)
    train: pl.DataFrame | None = None
    train_last: pl.DataFrame | None = None
    metrics: list = field(default_factory=list)


def curves(run_id: str) -> Curves | None:
    r = run(run_id)
    if r is None:
        return None
    out = Curves(run_id)
    lak = queries.loss_at_k(r["model"], r["task"], r["sweep"])
    if lak is not None and len(lak):
        out.loss_at_k = lak.select("n_nodes", "final_loss", "k_label", "run_id")
        out.unpruned = float(lak["unpruned_loss"][0])
    pc = queries.pruning_curve(run_id)
    out.pruning = None if pc is None else pc.select("x", "loss")
    try:
        out.config = json.loads(r["prune_config"]) if r.get("prune_config") else {}
    except ValueError:
        out.config = {"prune_config (not JSON)": str(r["prune_config"])}
    train = queries.train_curves(r["model"])
    if train is not None and len(train):
        out.train = train
        out.train_last = train.group_by("metric", maintain_order=True).last().select("metric", "step", "value")
        out.metrics = sorted(train["metric"].unique().to_list())
    return out


def default_metric(names: list[str]) -> str:
    return next((m for m in names if "loss" in m), names[0])


@dataclass
class Comparison:
    run_a: str
    run_b: str
    shared: pl.DataFrame
    only_a: pl.DataFrame
    only_b: pl.DataFrame

    @property
    def jaccard(self) -> float:
        union = len(self.shared) + len(self.only_a) + len(self.only_b)
        return len(self.shared) / union if union else 0.0


def comparison(run_a: str, run_b: str) -> Comparison:
    df = queries.compare(run_a, run_b)
    return Comparison(
        run_a,
        run_b,
        df.filter(pl.col("status") == "shared").select("node_id", "delta_a", "delta_b"),
        df.filter(pl.col("status") == "only A").select("node_id", "delta_a"),
        df.filter(pl.col("status") == "only B").select("node_id", "delta_b"),
    )


def faithfulness(run_id: str) -> pl.DataFrame | None:
    return queries.faithfulness(run_id)


def nodes_export(run_id: str, pins: dict) -> pl.DataFrame:
    """The run's nodes with their pin labels (and the pipeline's recomputed deltas when it has them)."""
    df = queries.nodes(run_id)
    df = df.with_columns(pin_label=pl.Series([pins.get(n) for n in df["node_id"].to_list()], dtype=pl.String))
    ab = queries.ablations(run_id)
    if ab is not None and len(ab):
        cols = ("node_id", "recomputed_delta", "recomputed_delta_se", "agrees")
        df = df.join(ab.select(*cols), on="node_id", how="left", maintain_order="left")
    return df


def edges_export(run_id: str) -> pl.DataFrame:
    df = queries.edges(run_id)
    return pl.DataFrame() if df is None else df
