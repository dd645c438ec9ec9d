"""viz_data (and the model-level store files) -> Arrow tables. Pure functions, no Dagster.

Every function returns a table of `pipeline.tables.SCHEMAS[name]`, or, for the two tables that
grow with nodes x docs x positions (`activations`, `samples`), an iterator of per-node pieces in
sort order that `tables.write_partition` streams to disk.

Loss convention (viz-data-format.md): stored task losses are raw; `corrected = raw * loss_factor`
(default 0.5, the release viewer's halving). Both are kept.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from inference.circuit import classify_location, layer_half_key
from pipeline.derived import snippet_window
from pipeline.formats import BIAS, VizData, to_jsonable
from pipeline.tables import SCHEMAS, make_table


@dataclass(frozen=True)
class RunRef:
    """One circuit of the store: viz/<model>/<task>/<sweep>/<k_label>/viz_data.{pt,pkl}."""

    model: str
    task: str
    sweep: str
    k_label: str
    path: str  # store-relative path of the viz_data file

    @property
    def run_id(self) -> str:
        return f"{self.model}/{self.task}/{self.sweep}/{self.k_label}"


def node_id(location: str, channel: int | str) -> str:
    return f"{location}:{channel}"


def _sorted_nodes(viz: VizData) -> list[tuple[str, int, int]]:
    return sorted(viz.nodes(), key=lambda n: (n[0], n[1]))


def runs_table(viz: VizData, run: RunRef, loss_factor: float, sha256: str | None = None) -> pa.Table:
    final_raw = viz.all_loss[-1][1] if viz.all_loss else None
    return make_table(
        "runs",
        {
            "run_id": [run.run_id],
            "model": [run.model],
            "task": [run.task],
            "sweep": [run.sweep],
            "k_label": [run.k_label],
            "n_nodes": [viz.n_nodes],
            "num_total_nodes": [viz.num_total_nodes],
            "loss_factor": [loss_factor],
            "loss_raw": [viz.loss],
            "loss": [viz.loss * loss_factor],
            "interv_loss_raw": [viz.interv_loss],
            "interv_loss": [viz.interv_loss * loss_factor],
            "n_docs": [viz.docs.shape[0]],
            "ctx": [viz.docs.shape[1]],
            "prune_config": [json.dumps(to_jsonable(viz.prune_config), sort_keys=True)],
            "model_config": [json.dumps(to_jsonable(viz.config), sort_keys=True)],
            "source_path": [run.path],
            "source_sha256": [sha256],
            "n_edges": [_count_edges(viz)],
            "final_loss_raw": [final_raw],
            "final_loss": [None if final_raw is None else final_raw * loss_factor],
        },
    )


# Every table's `delta` is corrected: (ablated - circuit) loss, both raw losses scaled by the factor.
# `*_released` columns keep the released viewer's reading of a layer-half's delta, which scales only
# the circuit's loss (raw ablated - raw circuit * factor), so a user can compare with its pages.
def _layer_delta(viz: VizData, layer_half: str | None, loss_factor: float) -> float | None:
    """A layer-half's ablation delta, corrected: (layer_interv_loss_raw - interv_loss_raw) * factor."""
    raw = viz.layer_interv_losses.get(layer_half) if layer_half is not None else None
    return None if raw is None else (raw - viz.interv_loss) * loss_factor


def _layer_delta_released(viz: VizData, layer_half: str | None, loss_factor: float) -> float | None:
    """The released viewer's reading of a layer-half's delta: layer_interv_loss_raw - interv_loss_raw * factor."""
    raw = viz.layer_interv_losses.get(layer_half) if layer_half is not None else None
    return None if raw is None else raw - viz.interv_loss * loss_factor


def nodes_table(viz: VizData, run: RunRef, loss_factor: float) -> pa.Table:
    d_head = _d_head(viz)
    cols: dict[str, list] = {k: [] for k in SCHEMAS["nodes"].names}
    for loc, ch, order in viz.nodes():
        layer, half, kind = classify_location(loc)  # final_resid: (None, final, final_resid); unknown: (.., other, other)
        raw = float(viz.ch_interv_losses[loc][order])
        qkv = kind in ("q", "k", "v")
        row = {
            "run_id": run.run_id,
            "node_id": node_id(loc, ch),
            "location": loc,
            "layer": layer,
            "half": half,
            "kind": kind,
            "channel": ch,
            "head": ch // d_head if qkv and d_head else None,
            "head_channel": ch % d_head if qkv and d_head else None,
            "node_order": order,
            "ch_interv_loss_raw": raw,
            "ch_interv_loss": raw * loss_factor,
            "delta": (raw - viz.interv_loss) * loss_factor,
            "layer_delta": _layer_delta(viz, layer_half_key(loc), loss_factor),
            "layer_delta_released": _layer_delta_released(viz, layer_half_key(loc), loss_factor),
        }
        for k, v in row.items():
            cols[k].append(v)
    return make_table("nodes", cols)


def _d_head(viz: VizData) -> int | None:
    cfg = viz.config
    d_head = cfg.get("d_head")
    if d_head is None and cfg.get("d_model") and cfg.get("n_head"):
        d_head = int(cfg["d_model"]) // int(cfg["n_head"])
    return int(d_head) if d_head else None


def _edge_values(viz: VizData) -> dict[tuple, list]:
    """(src_loc, tgt_loc, src_name, tgt_name) -> [strength, weight] for every nonzero entry of either measure."""
    out: dict[tuple, list] = {}
    for slot, blocks in ((0, viz.pair_data), (1, viz.pair_data_connections)):
        for b in blocks:
            rows, cols = np.nonzero(b.matrix)
            for i, j in zip(rows.tolist(), cols.tolist(), strict=True):
                tgt = b.tgt_names[j]
                if tgt == BIAS:  # the bias pseudo-node has no incoming edges
                    continue
                key = (b.src_location, b.tgt_location, b.src_names[i], tgt)
                out.setdefault(key, [None, None])[slot] = float(b.matrix[i, j])
    return out


def _count_edges(viz: VizData) -> int:
    return len(_edge_values(viz))


def edges_table(viz: VizData, run: RunRef) -> pa.Table:
    cols: dict[str, list] = {k: [] for k in SCHEMAS["edges"].names}
    for (src_loc, tgt_loc, src, tgt), (strength, weight) in _edge_values(viz).items():
        is_bias = src == BIAS
        row = {
            "run_id": run.run_id,
            "src_node_id": node_id(src_loc, src),
            "tgt_node_id": node_id(tgt_loc, tgt),
            "src_location": src_loc,
            "tgt_location": tgt_loc,
            "src_channel": None if is_bias else src,
            "tgt_channel": tgt,
            "src_is_bias": is_bias,
            "strength": strength,
            "weight": weight,
            # |weight|, or |strength| when the file has no pair_data_connections entry for the edge.
            "abs_weight": abs(weight) if weight is not None else abs(strength),
        }
        for k, v in row.items():
            cols[k].append(v)
    return make_table("edges", cols)


def task_docs_table(viz: VizData, run: RunRef, decode_token: Callable[[int], str]) -> pa.Table:
    n = viz.docs.shape[0]
    half = n // 2
    lengths = viz.doc_lengths()
    ids = [viz.docs[d, : lengths[d]].tolist() for d in range(n)]
    return make_table(
        "task_docs",
        {
            "run_id": [run.run_id] * n,
            "doc": list(range(n)),
            "class": [1 if d < half else 2 for d in range(n)],
            "pair": [d % half if half else 0 for d in range(n)],
            "length": lengths.tolist(),
            "token_ids": ids,
            "tokens": [[decode_token(t) for t in doc] for doc in ids],
        },
    )


def _unpadded_index(viz: VizData) -> tuple[np.ndarray, np.ndarray]:
    """(doc, pos) of every position before its doc's length, doc-major."""
    lengths = viz.doc_lengths()
    doc = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
    pos = (np.arange(doc.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)).astype(np.int32)
    return doc, pos


def _repeat(text: str, n: int) -> pa.Array:
    return pa.repeat(pa.scalar(text, pa.string()), n)


def activation_pieces(viz: VizData, run: RunRef) -> Iterator[pa.Table]:
    """The stored task activations, one piece per node (sorted by location, channel), unpadded."""
    doc, pos = _unpadded_index(viz)
    n = doc.size
    for loc, ch, _ in _sorted_nodes(viz):
        a = viz.node_acts(loc, ch)
        if a is None:
            continue
        yield pa.table(
            {
                "run_id": _repeat(run.run_id, n),
                "node_id": _repeat(node_id(loc, ch), n),
                "location": _repeat(loc, n),
                "channel": np.full(n, ch, dtype=np.int64),
                "doc": doc,
                "pos": pos,
                "value": a[doc, pos],
            },
            schema=SCHEMAS["activations"],
        )


def sample_pieces(viz: VizData, run: RunRef) -> Iterator[pa.Table]:
    """Pretraining snippets, one piece per node (sorted by location, channel), one row per token."""
    nodes = {(loc, ch) for loc, ch, _ in viz.nodes()}
    # Nodes with snippets but no longer in the circuit are kept too: the file holds them.
    keys = sorted(nodes | {(loc, ch) for loc, by_ch in viz.samples.items() for ch in by_ch})
    for loc, ch in keys:
        cols: dict[str, list] = {k: [] for k in ("frac", "side", "rank", "pos", "token_id", "value", "is_center")}
        for s in viz.snippets(loc, ch):
            m = s.tokens.size
            cols["frac"].append(np.full(m, s.frac))
            cols["side"] += [s.side] * m
            cols["rank"].append(np.full(m, s.rank, dtype=np.int32))
            cols["pos"].append(np.arange(m, dtype=np.int32))
            cols["token_id"].append(s.tokens.astype(np.int32))
            cols["value"].append(s.acts)
            cols["is_center"].append(np.arange(m) == s.pos)
        n = len(cols["side"])
        if not n:
            continue
        yield pa.table(
            {
                "run_id": _repeat(run.run_id, n),
                "node_id": _repeat(node_id(loc, ch), n),
                "location": _repeat(loc, n),
                "channel": np.full(n, ch, dtype=np.int64),
                "frac": np.concatenate(cols["frac"]),
                "side": pa.array(cols["side"], pa.string()),
                "rank": np.concatenate(cols["rank"]),
                "pos": np.concatenate(cols["pos"]),
                "token_id": np.concatenate(cols["token_id"]),
                "value": np.concatenate(cols["value"]),
                "is_center": np.concatenate(cols["is_center"]),
            },
            schema=SCHEMAS["samples"],
        )


def layer_ablations_table(viz: VizData, run: RunRef, loss_factor: float) -> pa.Table:
    counts: dict[str, int] = {}
    for loc, _ch, _ in viz.nodes():
        key = layer_half_key(loc)
        counts[key] = counts.get(key, 0) + 1
    cols: dict[str, list] = {k: [] for k in SCHEMAS["layer_ablations"].names}
    for key, raw in viz.layer_interv_losses.items():
        layer_s, _, half = key.partition(".")
        half = "final" if key == "final_resid" else half  # a released key for the final residual, if any
        row = {
            "run_id": run.run_id,
            "layer_half": key,
            "layer": int(layer_s) if layer_s.isdigit() else None,
            "half": half,
            "interv_loss_raw": viz.interv_loss,
            "layer_interv_loss_raw": raw,
            "delta": _layer_delta(viz, key, loss_factor),
            "delta_released": _layer_delta_released(viz, key, loss_factor),
            "n_nodes": counts.get(key, 0),
        }
        for k, v in row.items():
            cols[k].append(v)
    return make_table("layer_ablations", cols)


def pruning_curve_table(viz: VizData, run: RunRef, loss_factor: float) -> pa.Table:
    steps = [s for s, _ in viz.all_loss]
    losses = [v for _, v in viz.all_loss]
    return make_table(
        "pruning_curve",
        {
            "run_id": [run.run_id] * len(steps),
            "step": steps,
            "x": [(s + 1) * 8 for s in steps],  # the released viewer's x axis
            "loss_raw": losses,
            "loss": [v * loss_factor for v in losses],
        },
    )


# loss_at_k's columns: the run's own numbers under the loss-vs-k plot's names (column <- runs column).
_LOSS_AT_K_FROM_RUNS = {
    "model": "model", "task": "task", "sweep": "sweep", "k_label": "k_label", "run_id": "run_id", "n_nodes": "n_nodes",
    "final_loss_raw": "final_loss_raw", "final_loss": "final_loss", "interv_loss": "interv_loss", "unpruned_loss": "loss",
}  # fmt: skip


def loss_at_k_table(runs: pa.Table) -> pa.Table:
    """The loss-vs-k rows of a run: a projection of its `runs` row, so each number is computed once."""
    return make_table("loss_at_k", {name: runs[src].to_pylist() for name, src in _LOSS_AT_K_FROM_RUNS.items()})


def faithfulness_table(viz: VizData, run: RunRef, loss_factor: float) -> pa.Table:
    """The stored stress tests of a demo-store circuit (per-prompt losses, i.e. raw / 2, in the
    file; `loss_raw` restores the release's raw scale so that `loss` follows `loss_factor`)."""
    rows = viz.prune_config.get("faithfulness") or []
    flagged = bool((viz.prune_config.get("overfit") or {}).get("flagged", False))
    cols: dict[str, list] = {k: [] for k in SCHEMAS["faithfulness"].names}
    for r in rows:
        raw = 2.0 * float(r["loss"])
        row = {
            "run_id": run.run_id, "prompt_set": str(r["prompt_set"]), "ablation": str(r["ablation"]), "variant": str(r["variant"]),
            "loss_raw": raw, "loss": raw * loss_factor, "loss_se": 2.0 * float(r["loss_se"]) * loss_factor,
            "accuracy": float(r["accuracy"]), "n_prompts": int(r["n_prompts"]), "flagged": flagged,
        }  # fmt: skip
        for k, v in row.items():
            cols[k].append(v)
    return make_table("faithfulness", cols)


def run_tables(
    viz: VizData, run: RunRef, loss_factor: float, decode_token: Callable[[int], str], sha256: str | None = None
) -> dict:
    """Every run-level table of one circuit: name -> table, or iterator of pieces (activations, samples, snippets)."""
    runs = runs_table(viz, run, loss_factor, sha256)
    return {
        "runs": runs,
        "nodes": nodes_table(viz, run, loss_factor),
        "edges": edges_table(viz, run),
        "task_docs": task_docs_table(viz, run, decode_token),
        "activations": activation_pieces(viz, run),
        "samples": sample_pieces(viz, run),
        "snippets": (snippet_window(piece) for piece in sample_pieces(viz, run)),  # derived: the viewer's cut
        "layer_ablations": layer_ablations_table(viz, run, loss_factor),
        "pruning_curve": pruning_curve_table(viz, run, loss_factor),
        "loss_at_k": loss_at_k_table(runs),
        "faithfulness": faithfulness_table(viz, run, loss_factor),
    }


# ---- model-level tables --------------------------------------------------------------------------


def train_curves_table(model: str, progress_jsonl: str, source: str = "progress.json") -> pa.Table:
    """progress.json (one metrics dict per line) in long format; non-numeric values are skipped."""
    cols: dict[str, list] = {"model": [], "step": [], "metric": [], "value": []}
    for lineno, line in enumerate(progress_jsonl.splitlines()):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{source}: line {lineno + 1} is not JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{source}: line {lineno + 1} is not a JSON object")
        step = d.get("step", lineno)
        for k, v in d.items():
            if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            cols["model"].append(model)
            cols["step"].append(int(step))
            cols["metric"].append(k)
            cols["value"].append(float(v) if math.isfinite(v) else None)
    return make_table("train_curves", cols)


def embeddings_table(model: str, wte: np.ndarray, wpe: np.ndarray) -> pa.Table:
    """Nonzero entries of the token and position embeddings."""
    pieces = []
    for name, m in (("wte", wte), ("wpe", wpe)):
        rows, chans = np.nonzero(m)
        n = rows.size
        pieces.append(
            pa.table(
                {
                    "model": pa.array([model] * n, pa.string()),
                    "matrix": pa.array([name] * n, pa.string()),
                    "row": rows.astype(np.int32),
                    "channel": chans.astype(np.int32),
                    "value": m[rows, chans].astype(np.float32),
                },
                schema=SCHEMAS["embeddings"],
            )
        )
    t = pa.concat_tables(pieces)
    return t.sort_by([("model", "ascending"), ("matrix", "ascending"), ("channel", "ascending"), ("row", "ascending")])


def printable_token(b: bytes) -> str:
    """A token's bytes as safe display text: valid UTF-8 kept, control characters and invalid bytes escaped."""
    text = b.decode("utf-8", errors="backslashreplace")
    out = []
    for ch in text:
        if ch == "\\" or ch.isprintable() or ch == " ":
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def vocab_table(model: str, token_bytes: list[bytes], special: dict[int, str]) -> pa.Table:
    """One row per token id; `special` maps special token ids to their names."""
    n = len(token_bytes)
    return make_table(
        "vocab",
        {
            "model": [model] * n,
            "token_id": list(range(n)),
            "text": [special[i] if i in special else printable_token(b) for i, b in enumerate(token_bytes)],
            "bytes_hex": [b.hex() for b in token_bytes],
            "is_special": [i in special for i in range(n)],
        },
    )
