"""Table assets: one Parquet file per partition of each table (docs/tables.md).

`run_tables` reads a run's viz_data once and writes the nine run-level tables; its checks run
in the same step. A corrupt, truncated or wrong-schema viz_data fails only its own partition,
with a message naming the file and the problem, before any of its files is replaced.
Model-level tables (`train_curves`, `embeddings`, `vocab`) are partitioned by model.

A viz_data with node locations this code does not know converts whole (their nodes in the "other"
group) with one warning per file. A checkpoint that lacks a tensor one model-level table needs
(e.g. `transformer.ln_f.weight` for `unembed_extremes`) skips that table with a warning naming the
tensor and the file; the model's other tables materialize, and their metadata lists what was skipped.
"""

import dagster as dg
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import convert
from pipeline.assets.discovery import MODELS, RUNS, run_file
from pipeline.assets.download import tokenizer_files, train_curve_file, viz_data_file
from pipeline.derived import unembed_table, wte_tables
from pipeline.formats import VizDataError
from pipeline.resources import CircuitsResource
from pipeline.store_access import load_tokenizer, read_tensor, token_bytes_list
from pipeline.tables import RUN_TABLES, partition_path, write_partition

GROUP = "tables"
_RECOMPUTED = ("ablations", "recomputed_activations", "recompute_summary")
VIZ_TABLES = tuple(t for t in RUN_TABLES if t not in _RECOMPUTED)
_DESCRIPTIONS = {
    "runs": "One row per circuit: ids, sizes, losses raw and corrected, prune and model config",
    "nodes": "One row per circuit node: location, channel, head, stored ablation loss and delta",
    "edges": "One row per nonzero edge in pair_data or pair_data_connections",
    "task_docs": "The run's task docs: class, pair, unpadded token ids and texts",
    "activations": "Stored activations of circuit nodes on the task docs (node x doc x position, no padding)",
    "samples": "Top/bottom pretraining snippets per node, one row per token",
    "snippets": "Derived: the snippets the viewer shows (first 5 per list, 50 tokens either side of the token of interest)",
    "layer_ablations": "Loss with a whole layer-half of the circuit ablated",
    "pruning_curve": "The pruning optimisation's loss curve (all_loss)",
    "loss_at_k": "Final loss of the run (one row; query across k)",
    "faithfulness": "Demo-store circuits: loss alone / without the circuit, mean vs zero ablation, per prompt set",
}


def table_metadata(meta: dict) -> dict:
    return {"path": meta["path"], "dagster/row_count": meta["rows"], "bytes": meta["bytes"]}


def _no_nan(t: pa.Table, cols: list[str]) -> list[str]:
    bad = []
    for c in cols:
        arr = t.column(c)
        if arr.null_count or (pa.types.is_floating(arr.type) and pc.any(pc.is_nan(arr)).as_py()):
            bad.append(c)
    return bad


CHECKS = [
    dg.AssetCheckSpec(
        "edge_endpoints_are_nodes",
        asset="edges",
        description="Every edge's target, and its source unless a bias, is a node of its run",
    ),
    dg.AssetCheckSpec("one_row_per_node", asset="nodes", description="node_id is unique within the run and rows = n_nodes"),
    dg.AssetCheckSpec("no_nan_nodes", asset="nodes", description="No NaN/null in ch_interv_loss, delta"),
    dg.AssetCheckSpec("no_nan_runs", asset="runs", description="No NaN/null in loss, interv_loss"),
    dg.AssetCheckSpec("no_nan_edges", asset="edges", description="No NaN/null in abs_weight"),
]


@dg.multi_asset(
    specs=[
        dg.AssetSpec(t, group_name=GROUP, deps=[viz_data_file, tokenizer_files], description=_DESCRIPTIONS[t]) for t in VIZ_TABLES
    ],
    partitions_def=RUNS,
    check_specs=CHECKS,
)
def run_tables(context: dg.AssetExecutionContext, circuits: CircuitsResource):
    store = circuits.store()
    key = context.partition_key
    run, rf = run_file(store, key)
    viz, source, sha = rf.viz, rf.source, rf.sha256
    for w in rf.warnings:
        context.log.warning(w)
    enc = load_tokenizer(store)
    try:
        tables = convert.run_tables(viz, run, circuits.loss_factor, lambda t: enc.decode([t]), sha256=sha)
    except Exception as e:  # noqa: BLE001 - content the validation let through: still name the file
        raise dg.Failure(description=f"{source}: cannot convert ({type(e).__name__}: {e})") from None
    data = circuits.data_url()
    context.log.info(f"{key}: {viz.n_nodes} nodes, {viz.docs.shape[0]} docs -> {data}")

    nodes, edges, runs = tables["nodes"], tables["edges"], tables["runs"]
    node_ids = set(nodes.column("node_id").to_pylist())
    tgt_ok = all(t in node_ids for t in edges.column("tgt_node_id").to_pylist())
    src_ok = all(
        s in node_ids or b
        for s, b in zip(edges.column("src_node_id").to_pylist(), edges.column("src_is_bias").to_pylist(), strict=True)
    )
    missing = sorted(
        {
            s
            for s in edges.column("src_node_id").to_pylist() + edges.column("tgt_node_id").to_pylist()
            if s not in node_ids and not s.endswith(":bias")
        }
    )
    checks = [
        dg.AssetCheckResult(check_name="edge_endpoints_are_nodes", asset_key="edges", passed=tgt_ok and src_ok, metadata={"missing": str(missing[:20])}),
        dg.AssetCheckResult(
            check_name="one_row_per_node", asset_key="nodes",
            passed=len(node_ids) == nodes.num_rows == viz.n_nodes, metadata={"rows": nodes.num_rows, "n_nodes": viz.n_nodes},
        ),
        dg.AssetCheckResult(check_name="no_nan_nodes", asset_key="nodes", passed=not (b := _no_nan(nodes, ["ch_interv_loss", "delta"])), metadata={"bad_columns": str(b)}),
        dg.AssetCheckResult(check_name="no_nan_runs", asset_key="runs", passed=not (b := _no_nan(runs, ["loss", "interv_loss"])), metadata={"bad_columns": str(b)}),
        dg.AssetCheckResult(check_name="no_nan_edges", asset_key="edges", passed=not (b := _no_nan(edges, ["abs_weight"])), metadata={"bad_columns": str(b)}),
    ]  # fmt: skip

    # Small tables first; the streamed ones (activations, samples) last. A per-node problem found
    # while streaming fails the step; files already replaced are consistent, complete tables.
    results = []
    for name in VIZ_TABLES:
        try:
            meta = write_partition(data, name, key, tables[name])
        except VizDataError as e:
            raise dg.Failure(description=str(e)) from None
        except (ArithmeticError, ValueError, TypeError, IndexError, KeyError) as e:  # while streaming the file's nodes
            raise dg.Failure(description=f"{source}: table {name}: {type(e).__name__}: {e}") from None
        extra = {"unknown_locations": str(viz.unknown_locations)} if name == "nodes" and viz.unknown_locations else {}
        results.append(dg.MaterializeResult(asset_key=name, metadata=table_metadata(meta) | extra))
    yield from results
    yield from checks


@dg.asset(
    group_name=GROUP,
    partitions_def=MODELS,
    deps=[train_curve_file],
    description="progress.json in long format (model, step, metric, value)",
)
def train_curves(context: dg.AssetExecutionContext, circuits: CircuitsResource) -> dg.MaterializeResult:
    store = circuits.store()
    model = context.partition_key
    rel = f"train_curves/{model}/progress.json"
    text = store.local(rel).read_text() if store.exists(rel) else ""
    try:
        table = convert.train_curves_table(model, text, source=rel)
    except ValueError as e:
        raise dg.Failure(description=str(e)) from None
    return dg.MaterializeResult(metadata=table_metadata(write_partition(circuits.data_url(), "train_curves", model, table)))


# The model-level tables of one checkpoint: (tables, the tensors they are built from). A tuple
# of names is a choice: a tied unembedding may be saved once, as wte.
_WTE, _WPE, _LN_F = "transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"
MODEL_TABLE_TENSORS = (
    (("embeddings",), (_WTE, _WPE)),
    (("wte_extremes", "wte_histograms"), (_WTE,)),
    (("unembed_extremes",), (("lm_head.weight", _WTE), _LN_F)),
)


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            "embeddings",
            group_name=GROUP,
            skippable=True,
            description="Nonzero entries of wte and wpe, read one tensor at a time from final_model.pt",
        ),
        dg.AssetSpec(
            "wte_extremes",
            group_name=GROUP,
            skippable=True,
            description="Derived: per wte channel, the 20 largest and smallest nonzero weights",
        ),
        dg.AssetSpec(
            "wte_histograms",
            group_name=GROUP,
            skippable=True,
            description="Derived: per wte channel, a 30-bin histogram of its nonzero weights",
        ),
        dg.AssetSpec(
            "unembed_extremes",
            group_name=GROUP,
            skippable=True,
            description="Derived: per residual channel, the 20 tokens whose logits it raises / lowers most directly (lm_head x ln_f weight)",
        ),
    ],
    partitions_def=MODELS,
)
def embeddings(context: dg.AssetExecutionContext, circuits: CircuitsResource):
    """Each table from the tensors it needs (`MODEL_TABLE_TENSORS`); a table whose tensor the checkpoint lacks is
    skipped (a warning naming the tensor and the file, an observation on the skipped asset, and
    `skipped_tables` in the metadata of the tables written), the others materialize."""
    store = circuits.store()
    model = context.partition_key
    checkpoint = store.path(f"models/{model}/final_model.pt")
    loaded: dict[str, np.ndarray | None] = {}

    def tensor(key: str) -> np.ndarray | None:
        if key not in loaded:
            try:
                loaded[key] = read_tensor(store, model, key).float().numpy()
            except KeyError:  # the checkpoint has no such tensor
                loaded[key] = None
        return loaded[key]

    build = {
        "embeddings": lambda wte, wpe: {"embeddings": convert.embeddings_table(model, wte, wpe)},
        "wte_extremes": lambda wte: wte_tables(model, wte),
        "unembed_extremes": lambda lm_head, ln_f: {"unembed_extremes": unembed_table(model, lm_head, ln_f)},
    }
    tables: dict = {}
    skipped: dict[str, str] = {}
    for names, needs in MODEL_TABLE_TENSORS:
        args, missing = [], None
        for need in needs:
            choices = need if isinstance(need, tuple) else (need,)
            found = next((t for t in map(tensor, choices) if t is not None), None)
            if found is None:
                missing = " or ".join(choices)
                break
            args.append(found)
        if missing is not None:
            skipped |= {name: f"{checkpoint} has no tensor {missing}" for name in names}
        else:
            tables |= build[names[0]](*args)
    if (wte := loaded.get(_WTE)) is not None:
        context.log.info(f"{model}: wte {wte.shape} ({np.count_nonzero(wte)} nonzero)")
    for name, reason in skipped.items():
        context.log.warning(f"{model}: table {name} skipped: {reason}")
        stale = partition_path(circuits.data_url(), name, model)  # from an earlier checkpoint: no longer true
        fs, path = fsspec.core.url_to_fs(stale)
        if fs.exists(path):
            fs.rm(path)
            context.log.warning(f"{model}: removed {stale}, written from an earlier checkpoint that had the tensor")
        context.log_event(dg.AssetObservation(asset_key=name, partition=model, metadata={"skipped": reason}))
    note = {"skipped_tables": dg.MetadataValue.json(skipped)} if skipped else {}
    for name, table in tables.items():
        meta = table_metadata(write_partition(circuits.data_url(), name, model, table))
        yield dg.MaterializeResult(asset_key=name, metadata=meta | note)


@dg.asset(
    group_name=GROUP,
    partitions_def=MODELS,
    deps=[tokenizer_files],
    description="The model's tokenizer: id, printable text, bytes, special flag",
)
def vocab(context: dg.AssetExecutionContext, circuits: CircuitsResource) -> dg.MaterializeResult:
    store = circuits.store()
    token_bytes, special = token_bytes_list(load_tokenizer(store))
    table = convert.vocab_table(context.partition_key, token_bytes, special)
    return dg.MaterializeResult(
        metadata=table_metadata(write_partition(circuits.data_url(), "vocab", context.partition_key, table))
    )


table_assets = [run_tables, train_curves, embeddings, vocab]
