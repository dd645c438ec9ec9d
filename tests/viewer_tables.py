# ruff: noqa: B023  (the per-run generators below are consumed within their loop iteration)
"""Synthetic tables in the pipeline's table contract (notes/tables-contract.md v1), for the viewer.

The viewer's tests and `bench/viewer.py` use these until (and besides) the real pipeline's
fixture: the same layout (`tables/<table>/<partition>.parquet` + `circuits.duckdb` of views),
random but deterministic values, sizes set by `Scale`. The returned `Truth` keeps the raw
numpy data so tests can compute expected values independently of the viewer's SQL.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.derived import snippet_window, unembed_table, wte_tables
from pipeline.tables import row_group_rows
from viewer.queries import VIEWER_TABLES

FRACS = (0.001, 0.01, 0.1, 0.5)
LOSS_FACTOR = 0.5


@dataclass
class Scale:
    n_layer: int = 2
    d_model: int = 16
    n_head: int = 2
    d_head: int = 4
    d_mlp: int = 32
    vocab: int = 60
    n_docs: int = 4
    ctx: int = 12
    nodes_per_location: int = 3  # circuit channels kept at each location
    snippets_per_list: int = 6  # > 5, so the viewer's cut to five is exercised
    snippet_len: int = 120  # > 101, so the viewer's 50-either-side window is exercised
    row_group: int = 1 << 20  # rows per row group, as the pipeline writes
    act_zero_frac: float = 0.0  # fraction of task-doc activations that are exactly zero


@dataclass
class Truth:
    runs: list = field(default_factory=list)
    nodes: dict = field(default_factory=dict)  # run_id -> list of node dicts
    tables: dict = field(default_factory=dict)  # table -> list of pyarrow tables
    unembed: dict = field(default_factory=dict)  # model -> (lm_head (vocab, d_model), ln_f weight (d_model,))


def _locations(layer):
    return [
        f"{layer}.attn.act_in",
        f"{layer}.attn.q",
        f"{layer}.attn.k",
        f"{layer}.attn.v",
        f"{layer}.attn.resid_delta",
        f"{layer}.mlp.act_in",
        f"{layer}.mlp.post_act",
        f"{layer}.mlp.resid_delta",
    ]


def _width(kind, s: Scale):
    return {"q": s.n_head * s.d_head, "k": s.n_head * s.d_head, "v": s.n_head * s.d_head, "post_act": s.d_mlp}.get(
        kind, s.d_model
    )


def _write(root, table, partition, data, truth: Truth, sort_by=None):
    tbl = data if isinstance(data, pa.Table) else pa.table(data)
    if sort_by:
        tbl = tbl.sort_by([(c, "ascending") for c in sort_by])
    d = os.path.join(root, "tables", table)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, partition.replace("/", "__") + ".parquet")
    pq.write_table(tbl, path + ".tmp", compression="zstd", row_group_size=min(truth.row_group, row_group_rows(table)))
    os.replace(path + ".tmp", path)
    truth.tables.setdefault(table, []).append(tbl)


def _write_streamed(root, table, partition, batches, truth: Truth, derived=None):
    """Write a partition batch by batch (one row group each); tests keep the table in `truth` unless it is big.

    `derived`: (table, fn) to also write `fn(batch)` of every batch (whole nodes per batch) as that table.
    """
    names = [table] + ([derived[0]] if derived else [])
    paths = {}
    for name in names:
        d = os.path.join(root, "tables", name)
        os.makedirs(d, exist_ok=True)
        paths[name] = os.path.join(d, partition.replace("/", "__") + ".parquet")
    writers, kept = {}, {name: [] for name in names}
    for cols in batches:
        tbl = pa.table(cols)
        out = {table: tbl}
        if derived:
            out[derived[0]] = derived[1](tbl)
        for name, t in out.items():
            if name not in writers:
                writers[name] = pq.ParquetWriter(paths[name] + ".tmp", t.schema, compression="zstd")
            writers[name].write_table(t, row_group_size=min(truth.row_group, row_group_rows(name)))
            if truth.keep_big:
                kept[name].append(t)
    for name, w in writers.items():
        w.close()
        os.replace(paths[name] + ".tmp", paths[name])
        if kept[name]:
            truth.tables.setdefault(name, []).append(pa.concat_tables(kept[name]))


def write_views(root, tables):
    """circuits.duckdb with one view per table, built in a temp file and renamed (as the pipeline does)."""
    db = os.path.join(root, "circuits.duckdb")
    tmp = db + ".tmp"
    if os.path.exists(tmp):
        os.remove(tmp)
    con = duckdb.connect(tmp)
    for t in tables:
        glob = os.path.abspath(os.path.join(root, "tables", t, "*.parquet"))
        con.execute(f"CREATE VIEW {t} AS SELECT * FROM read_parquet('{glob}')")
    con.close()
    os.replace(tmp, db)


def vocab_text(i: int) -> str:
    """Token text of id i: mostly plain, some hostile (as real vocabularies of code and web text are): HTML
    that must be escaped, a script that must not run, and TeX delimiters that must not be typeset."""
    if i % 7 == 0:
        return f"<&{i}>"
    if i % 11 == 0:
        return f"$$x{i}$$"
    if i % 13 == 0:
        return f"\\(a{i}\\)"
    if i % 17 == 0:
        return f"<img src=x onerror=alert({i})>"
    return f"tok{i}"


def vocab_texts(n: int) -> list[str]:
    return [vocab_text(i) for i in range(n)]


def write_contract_tables(root, scale: Scale | None = None, runs=None, seed=0, skip=(), keep_big=True) -> Truth:
    """Write every contract table for `runs` (list of (model, task, sweep, k_label, nodes_per_location)).

    nodes_per_location: an int, or a dict layer-half ("1.attn") -> nodes at each of its locations."""
    s = scale or Scale()
    rng = np.random.default_rng(seed)
    runs = runs or [
        ("toy", "quotes", "sweep1", "8", s.nodes_per_location),
        ("toy", "quotes", "sweep1", "16", s.nodes_per_location + 1),
        ("toy", "brackets", "sweep1", "8", s.nodes_per_location),
    ]
    truth = Truth()
    truth.row_group = s.row_group
    truth.keep_big = keep_big
    model_config = {
        "n_layer": s.n_layer,
        "d_model": s.d_model,
        "n_head": s.n_head,
        "d_head": s.d_head,
        "d_mlp": s.d_mlp,
        "vocab_size": s.vocab,
        "block_size": s.ctx,
    }
    models = sorted({r[0] for r in runs})

    # Model-level tables: vocab, embeddings, train curves.
    for model in models:
        ids = np.arange(s.vocab)
        texts = vocab_texts(s.vocab)
        _write(
            root,
            "vocab",
            model,
            {
                "model": [model] * s.vocab,
                "token_id": ids.astype(np.int32),
                "text": texts,
                "bytes_hex": [t.encode().hex() for t in texts],
                "is_special": ids == 0,
            },
            truth,
        )
        rows = {"model": [], "matrix": [], "row": [], "channel": [], "value": []}
        dense_of = {}
        for matrix, n_rows in (("wte", s.vocab), ("wpe", s.ctx)):
            dense = rng.normal(size=(n_rows, s.d_model)).astype(np.float32)
            dense[rng.random(dense.shape) < 0.6] = 0
            dense[:, 1] = 0  # a channel with no nonzero weights at all
            dense_of[matrix] = dense
            r, c = np.nonzero(dense)
            rows["model"] += [model] * len(r)
            rows["matrix"] += [matrix] * len(r)
            rows["row"] += r.astype(np.int32).tolist()
            rows["channel"] += c.astype(np.int32).tolist()
            rows["value"] += dense[r, c].tolist()
        _write(root, "embeddings", model, {**rows, "value": np.array(rows["value"], np.float32)}, truth)
        for name, tbl in wte_tables(model, dense_of["wte"]).items():  # the pipeline's derived tables, from the same data
            _write(root, name, model, tbl, truth)
        urng = np.random.default_rng(seed + 1000)  # its own stream: the other tables stay as they were
        lm_head = urng.normal(size=(s.vocab, s.d_model)).astype(np.float32)
        lm_head[urng.random(lm_head.shape) < 0.6] = 0
        ln_f = urng.normal(size=s.d_model).astype(np.float32)
        truth.unembed[model] = (lm_head, ln_f)
        _write(root, "unembed_extremes", model, unembed_table(model, lm_head, ln_f), truth)
        steps = np.arange(0, 100, 10)
        _write(
            root,
            "train_curves",
            model,
            {
                "model": [model] * 2 * len(steps),
                "step": np.concatenate([steps, steps]),
                "metric": ["train_loss"] * len(steps) + ["lr"] * len(steps),
                "value": np.concatenate([3 / (1 + steps / 10), np.full(len(steps), 1e-3)]),
            },
            truth,
        )

    for model, task, sweep, k_label, per_loc in runs:
        run_id = f"{model}/{task}/{sweep}/{k_label}"
        loss_raw, interv_raw = 0.4 + rng.random(), 1.0 + rng.random()
        node_rows = []
        for layer in range(s.n_layer):
            for loc in _locations(layer):
                kind = loc.split(".")[-1]
                half = loc.split(".")[1]
                count = per_loc if isinstance(per_loc, int) else per_loc[f"{layer}.{half}"]
                chans = rng.choice(_width(kind, s), size=min(count, _width(kind, s)), replace=False)
                for order, ch in enumerate(chans):
                    ch_raw = interv_raw + rng.normal() * 0.6
                    is_qkv = kind in ("q", "k", "v")
                    node_rows.append(
                        dict(
                            run_id=run_id,
                            node_id=f"{loc}:{int(ch)}",
                            location=loc,
                            layer=layer,
                            half=half,
                            kind=kind,
                            channel=int(ch),
                            head=int(ch) // s.d_head if is_qkv else None,
                            head_channel=int(ch) % s.d_head if is_qkv else None,
                            node_order=order,
                            ch_interv_loss_raw=ch_raw,
                            ch_interv_loss=ch_raw * LOSS_FACTOR,
                            delta=(ch_raw - interv_raw) * LOSS_FACTOR,
                        )
                    )
        # Layer-halves: the second half of layer 0 and layer 1 attention above 0.3.
        halves = [f"{i}.{h}" for i in range(s.n_layer) for h in ("attn", "mlp")]
        # raw layer-half losses, stored like every task loss (x2): corrected delta 0.5 for the marked ones
        layer_raw = {lh: interv_raw + (1.0 if lh in ("0.mlp", "1.attn") else 0.2) for lh in halves}
        la = {
            "run_id": [],
            "layer_half": [],
            "layer": [],
            "half": [],
            "interv_loss_raw": [],
            "delta": [],
            "delta_released": [],
            "n_nodes": [],
        }
        for lh in halves:
            la["run_id"].append(run_id)
            la["layer_half"].append(lh)
            la["layer"].append(int(lh.split(".")[0]))
            la["half"].append(lh.split(".")[1])
            la["interv_loss_raw"].append(layer_raw[lh])
            la["delta"].append(layer_raw[lh] * LOSS_FACTOR - interv_raw * LOSS_FACTOR)  # corrected
            la["delta_released"].append(layer_raw[lh] - interv_raw * LOSS_FACTOR)  # the release's reading
            la["n_nodes"].append(sum(1 for n in node_rows if n["location"].startswith(lh + ".")))
        layer_delta = dict(zip(la["layer_half"], la["delta"], strict=True))
        layer_delta_released = dict(zip(la["layer_half"], la["delta_released"], strict=True))
        for n in node_rows:
            n["layer_delta"] = layer_delta[f"{n['layer']}.{n['half']}"]
            n["layer_delta_released"] = layer_delta_released[f"{n['layer']}.{n['half']}"]
        truth.nodes[run_id] = node_rows
        if "nodes" not in skip:
            _write(root, "nodes", run_id, {k: [n[k] for n in node_rows] for k in node_rows[0]}, truth)
        _write(root, "layer_ablations", run_id, la, truth)

        # Edges: the released viewer's within-layer pairs, plus a bias pseudo-node.
        by_loc = {}
        for n in node_rows:
            by_loc.setdefault(n["location"], []).append(n)
        e = {
            k: []
            for k in (
                "run_id",
                "src_node_id",
                "tgt_node_id",
                "src_location",
                "tgt_location",
                "src_channel",
                "tgt_channel",
                "src_is_bias",
                "strength",
                "weight",
                "abs_weight",
            )
        }
        for layer in range(s.n_layer):
            pairs = [
                ("attn.act_in", "attn.q"),
                ("attn.act_in", "attn.k"),
                ("attn.act_in", "attn.v"),
                ("attn.v", "attn.resid_delta"),
                ("mlp.act_in", "mlp.post_act"),
                ("mlp.post_act", "mlp.resid_delta"),
            ]
            for src_l, tgt_l in pairs:
                src_loc, tgt_loc = f"{layer}.{src_l}", f"{layer}.{tgt_l}"
                srcs = by_loc.get(src_loc, []) + ([None] if tgt_l == "mlp.post_act" else [])
                for sn in srcs:
                    for tn in by_loc.get(tgt_loc, []):
                        if rng.random() < 0.3:
                            continue  # a zero entry: no edge
                        strength = float(rng.normal())
                        weight = float(rng.normal()) if rng.random() < 0.8 else None
                        e["run_id"].append(run_id)
                        e["src_node_id"].append(f"{src_loc}:bias" if sn is None else sn["node_id"])
                        e["tgt_node_id"].append(tn["node_id"])
                        e["src_location"].append(src_loc)
                        e["tgt_location"].append(tgt_loc)
                        e["src_channel"].append(None if sn is None else sn["channel"])
                        e["tgt_channel"].append(tn["channel"])
                        e["src_is_bias"].append(sn is None)
                        e["strength"].append(strength)
                        e["weight"].append(weight)
                        e["abs_weight"].append(None if weight is None else abs(weight))
        _write(root, "edges", run_id, e, truth)

        # Task docs and the stored activations (positions < length only).
        lengths = rng.integers(s.ctx // 2, s.ctx + 1, size=s.n_docs)
        docs = [rng.integers(1, s.vocab, size=int(n)).astype(np.int32) for n in lengths]
        vocab_text = vocab_texts(s.vocab)
        half_n = s.n_docs // 2
        _write(
            root,
            "task_docs",
            run_id,
            {
                "run_id": [run_id] * s.n_docs,
                "doc": np.arange(s.n_docs, dtype=np.int32),
                "class": [1 if d < half_n else 2 for d in range(s.n_docs)],
                "pair": [d % half_n for d in range(s.n_docs)],
                "length": lengths.astype(np.int32),
                "token_ids": [d.tolist() for d in docs],
                "tokens": [[vocab_text[t] for t in d] for d in docs],
            },
            truth,
        )
        doc_col = np.concatenate([np.full(n, d, np.int32) for d, n in enumerate(lengths)])
        pos_col = np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])
        # Streamed in the pipeline's sort order (location, channel, ...), a group of nodes per row group.
        ordered = sorted(node_rows, key=lambda n: (n["location"], n["channel"]))

        def per_node_batches(rows_per_node, columns):
            chunk = max(1, s.row_group // rows_per_node)
            for i in range(0, len(ordered), chunk):
                group = ordered[i : i + chunk]
                n = len(group) * rows_per_node
                yield {
                    "run_id": pa.array([run_id] * n),
                    "node_id": pa.array(np.repeat([g["node_id"] for g in group], rows_per_node)),
                    "location": pa.array(np.repeat([g["location"] for g in group], rows_per_node)),
                    "channel": np.repeat(np.array([g["channel"] for g in group], np.int64), rows_per_node),
                    **columns(len(group), n),
                }

        def act_columns(n_group, n):
            value = rng.normal(size=n).astype(np.float32)
            value[rng.random(n) < s.act_zero_frac] = 0  # activation sparsity
            return {"doc": np.tile(doc_col, n_group), "pos": np.tile(pos_col, n_group), "value": value}

        _write_streamed(root, "activations", run_id, per_node_batches(len(doc_col), act_columns), truth)

        # Pretraining snippets: per node, frac, side, rank: snippet_len tokens with a centre.
        cols = {"frac": [], "side": [], "rank": [], "pos": [], "is_center": []}
        for frac in FRACS:
            for side in ("bottom", "top"):
                for rank in range(s.snippets_per_list):
                    centre = (rank * 17 + 30) % s.snippet_len
                    cols["frac"].append(np.full(s.snippet_len, frac))
                    cols["side"] += [side] * s.snippet_len
                    cols["rank"].append(np.full(s.snippet_len, rank, np.int32))
                    cols["pos"].append(np.arange(s.snippet_len, dtype=np.int32))
                    cols["is_center"].append(np.arange(s.snippet_len) == centre)
        per_node = len(cols["side"])

        def sample_columns(n_group, n):
            return {
                "frac": np.tile(np.concatenate(cols["frac"]), n_group),
                "side": pa.array(cols["side"] * n_group),
                "rank": np.tile(np.concatenate(cols["rank"]), n_group),
                "pos": np.tile(np.concatenate(cols["pos"]), n_group),
                "token_id": rng.integers(0, s.vocab, size=n).astype(np.int32),
                "value": rng.normal(size=n).astype(np.float32),
                "is_center": np.tile(np.concatenate(cols["is_center"]), n_group),
            }

        _write_streamed(
            root, "samples", run_id, per_node_batches(per_node, sample_columns), truth, derived=("snippets", snippet_window)
        )
        n_nodes = len(node_rows)

        # Run-level curves and summaries.
        steps = np.arange(20)
        curve_raw = interv_raw + 2.0 * np.exp(-steps / 5)
        _write(
            root,
            "pruning_curve",
            run_id,
            {
                "run_id": [run_id] * len(steps),
                "step": steps,
                "x": (steps + 1) * 8,
                "loss_raw": curve_raw,
                "loss": curve_raw * LOSS_FACTOR,
            },
            truth,
        )
        _write(
            root,
            "loss_at_k",
            run_id,
            {
                "model": [model],
                "task": [task],
                "sweep": [sweep],
                "k_label": [k_label],
                "run_id": [run_id],
                "n_nodes": [n_nodes],
                "final_loss_raw": [curve_raw[-1]],
                "final_loss": [curve_raw[-1] * LOSS_FACTOR],
                "interv_loss": [interv_raw * LOSS_FACTOR],
                "unpruned_loss": [loss_raw * LOSS_FACTOR],
            },
            truth,
        )
        ab = {
            k: []
            for k in (
                "run_id",
                "node_id",
                "mode",
                "stored_delta",
                "recomputed_loss",
                "recomputed_delta",
                "recomputed_delta_se",
                "abs_diff",
                "agrees",
            )
        }
        for i, n in enumerate(node_rows):
            recomputed = n["delta"] + (0.5 if i % 5 == 0 else 1e-4)  # every fifth node disagrees
            ab["run_id"].append(run_id)
            ab["node_id"].append(n["node_id"])
            ab["mode"].append("mean")
            ab["stored_delta"].append(n["delta"])
            ab["recomputed_loss"].append(recomputed + interv_raw * LOSS_FACTOR)
            ab["recomputed_delta"].append(recomputed)
            ab["recomputed_delta_se"].append(0.0)  # every pair ablated: exact
            ab["abs_diff"].append(abs(recomputed - n["delta"]))
            ab["agrees"].append(i % 5 != 0)
        _write(root, "ablations", run_id, ab, truth)
        truth.runs.append(
            dict(
                run_id=run_id,
                model=model,
                task=task,
                sweep=sweep,
                k_label=k_label,
                n_nodes=n_nodes,
                num_total_nodes=s.n_layer * (4 * s.d_model + 3 * s.n_head * s.d_head + s.d_mlp),
                loss_factor=LOSS_FACTOR,
                loss_raw=loss_raw,
                loss=loss_raw * LOSS_FACTOR,
                interv_loss_raw=interv_raw,
                interv_loss=interv_raw * LOSS_FACTOR,
                n_docs=s.n_docs,
                ctx=s.ctx,
                prune_config=json.dumps({"k": k_label, "lr": 0.01, "steps": 20}),
                model_config=json.dumps(model_config),
                source_path=f"viz/{run_id}/viz_data.pt",
                source_sha256="0" * 64,
            )
        )
        if "runs" not in skip:
            _write(root, "runs", run_id, {k: [v] for k, v in truth.runs[-1].items()}, truth)
    # the tables the viewer reads, as the pipeline would provide them (faithfulness: none, as for released runs)
    write_views(root, [t for t in VIEWER_TABLES if t not in skip and os.path.isdir(os.path.join(root, "tables", t))])
    return truth
