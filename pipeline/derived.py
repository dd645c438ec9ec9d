"""Derived tables: what the viewer shows, cut once by the pipeline so that a click only selects rows.

- `snippets` (run-level): the pretraining snippets as the viewer shows them, the first
  `SNIPPETS_SHOWN` of each (frac, side) list cut to `SNIPPET_RADIUS` tokens either side of the token
  of interest. Same columns as `samples`; a tenth of its rows at release widths, in small row groups.
- `wte_extremes` (model-level): per `wte` channel, the `N_EXTREME_TOKENS` largest and smallest
  nonzero weights (side "top" / "bottom", rank 0 = most extreme).
- `wte_histograms` (model-level): per `wte` channel, a `HISTOGRAM_BINS`-bin histogram of its nonzero
  weights (numpy's default range: min..max). Its counts add up to the channel's nonzero count.
- `unembed_extremes` (model-level): per residual channel c, the `N_EXTREME_TOKENS` tokens whose
  logits the channel raises most (side "top") and lowers most ("bottom") directly, through the final
  norm and the unembedding: value = `lm_head.weight[t, c] * ln_f.weight[c]`. With RMSNorm a residual
  value v in channel c adds exactly `v * rstd * value` to token t's logit (rstd > 0, the final norm's
  inverse scale, shared by all channels), so the ranking holds for a positive v and reverses for a
  negative one; with LayerNorm the mean subtraction spreads v over every channel first, and the
  value is the direct path only.

Pure functions of the base data (an Arrow piece of `samples`, a dense `wte`), used by the pipeline's
assets and by the viewer's test tables alike.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline.tables import SCHEMAS, sort_table

SNIPPETS_SHOWN = 5  # per (frac, side) list, as in the released viewer
SNIPPET_RADIUS = 50  # tokens either side of the token of interest
N_EXTREME_TOKENS = 20
HISTOGRAM_BINS = 30

_SNIPPET_KEYS = ["node_id", "frac", "side", "rank"]


def snippet_window(samples: pa.Table) -> pa.Table:
    """Rows of `samples` (any piece holding whole snippets) that the viewer shows, in `snippets` sort order.

    A snippet's centre is its first `is_center` position; snippets without one are dropped.
    """
    window = (
        pl.from_arrow(samples)
        .filter(pl.col("rank") < SNIPPETS_SHOWN)
        .with_columns(centre=pl.col("pos").filter(pl.col("is_center")).min().over(_SNIPPET_KEYS))
        .filter(
            pl.col("centre").is_not_null()
            & ((pl.col("pos").cast(pl.Int64) - pl.col("centre").cast(pl.Int64)).abs() <= SNIPPET_RADIUS)
        )
        .select(SCHEMAS["snippets"].names)
    )
    return sort_table("snippets", window.to_arrow().cast(SCHEMAS["snippets"]))


def _column_extremes(matrix: np.ndarray, ext: dict, hist: dict | None = None) -> None:
    """Per column of a (rows, channels) matrix: its `N_EXTREME_TOKENS` largest and smallest nonzero
    entries (rows = token ids; ties by id) into `ext`, and a histogram of its nonzeros into `hist`."""
    for ch in range(matrix.shape[1]):
        col = matrix[:, ch]
        rows = np.flatnonzero(col)
        if rows.size == 0:
            continue
        vals = col[rows]
        order = np.lexsort((rows, -vals))  # largest first; ties by token id
        top = rows[order[:N_EXTREME_TOKENS]]
        order = np.lexsort((rows, vals))
        bottom = rows[order[:N_EXTREME_TOKENS]]
        for side, ids in (("top", top), ("bottom", bottom)):
            n = ids.size
            ext["channel"].append(np.full(n, ch, np.int32))
            ext["side"] += [side] * n
            ext["rank"].append(np.arange(n, dtype=np.int32))
            ext["token_id"].append(ids.astype(np.int32))
            ext["value"].append(col[ids])
        if hist is not None:
            counts, edges = np.histogram(vals.astype(np.float64), bins=HISTOGRAM_BINS)
            hist["channel"].append(np.full(HISTOGRAM_BINS, ch, np.int32))
            hist["bin"].append(np.arange(HISTOGRAM_BINS, dtype=np.int32))
            hist["bin_left"].append(edges[:-1])
            hist["bin_right"].append(edges[1:])
            hist["count"].append(counts.astype(np.int64))


def _model_table(name: str, model: str, cols: dict) -> pa.Table:
    if not cols["channel"]:  # an all-zero matrix: no rows
        return SCHEMAS[name].empty_table()
    n = sum(len(v) for v in cols["channel"])
    data = {"model": [model] * n, **{k: (v if isinstance(v[0], str) else np.concatenate(v)) for k, v in cols.items()}}
    return sort_table(name, pa.table({f.name: pa.array(data[f.name], f.type) for f in SCHEMAS[name]}, schema=SCHEMAS[name]))


def _extreme_columns() -> dict:
    return {k: [] for k in ("channel", "side", "rank", "token_id", "value")}


def wte_tables(model: str, wte: np.ndarray) -> dict[str, pa.Table]:
    """`wte_extremes` and `wte_histograms` of a (vocab, d_model) token embedding."""
    ext, hist = _extreme_columns(), {k: [] for k in ("channel", "bin", "bin_left", "bin_right", "count")}
    _column_extremes(np.asarray(wte, np.float32), ext, hist)
    return {
        "wte_extremes": _model_table("wte_extremes", model, ext),
        "wte_histograms": _model_table("wte_histograms", model, hist),
    }


def unembed_table(model: str, lm_head: np.ndarray, ln_f_weight: np.ndarray) -> pa.Table:
    """`unembed_extremes` of a (vocab, d_model) unembedding and the final norm's (d_model,) weight."""
    direct = np.asarray(lm_head, np.float32) * np.asarray(ln_f_weight, np.float32)[None, :]
    ext = _extreme_columns()
    _column_extremes(direct, ext)
    return _model_table("unembed_extremes", model, ext)
