"""Arrow schemas of every table, and the atomic Parquet writer.

Layout (docs/tables.md): `<data>/tables/<table>/<partition>.parquet`, one file per circuit run
(run-level tables) or per model (model-level tables); `partition_file_name` maps a partition key to
its file name injectively (`model/task/sweep/k` -> `model__task__sweep__k.parquet`, with escapes
only in the rare components that could make two keys collide).
Files are zstd-compressed and written in sorted order (run, location, channel, ...) so that
filters on those columns prune row groups. A file is written to a temporary name beside its
target (a name that does not end in `.parquet`, so readers globbing `*.parquet` never see it)
and renamed with `os.replace`; on an object store it is written locally and uploaded with one
put. Readers therefore see the old file or the new one, never half of either.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterable
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.settings import is_url

S, I32, I64, F32, F64, B = pa.string(), pa.int32(), pa.int64(), pa.float32(), pa.float64(), pa.bool_()


def _schema(*fields: tuple[str, pa.DataType]) -> pa.Schema:
    return pa.schema([pa.field(n, t) for n, t in fields])


SCHEMAS: dict[str, pa.Schema] = {
    "runs": _schema(
        ("run_id", S), ("model", S), ("task", S), ("sweep", S), ("k_label", S), ("n_nodes", I64),
        ("num_total_nodes", I64), ("loss_factor", F64), ("loss_raw", F64), ("loss", F64),
        ("interv_loss_raw", F64), ("interv_loss", F64), ("n_docs", I64), ("ctx", I64),
        ("prune_config", S), ("model_config", S), ("source_path", S), ("source_sha256", S),
        ("n_edges", I64), ("final_loss_raw", F64), ("final_loss", F64),
    ),
    "nodes": _schema(
        ("run_id", S), ("node_id", S), ("location", S), ("layer", I32), ("half", S), ("kind", S),
        ("channel", I64), ("head", I32), ("head_channel", I32), ("node_order", I32),
        ("ch_interv_loss_raw", F64), ("ch_interv_loss", F64), ("delta", F64), ("layer_delta", F64),
        ("layer_delta_released", F64),
    ),
    "edges": _schema(
        ("run_id", S), ("src_node_id", S), ("tgt_node_id", S), ("src_location", S), ("tgt_location", S),
        ("src_channel", I64), ("tgt_channel", I64), ("src_is_bias", B), ("strength", F64),
        ("weight", F64), ("abs_weight", F64),
    ),
    "task_docs": _schema(
        ("run_id", S), ("doc", I32), ("class", I32), ("pair", I32), ("length", I32),
        ("token_ids", pa.list_(I32)), ("tokens", pa.list_(S)),
    ),
    "activations": _schema(
        ("run_id", S), ("node_id", S), ("location", S), ("channel", I64), ("doc", I32), ("pos", I32), ("value", F32),
    ),
    "samples": _schema(
        ("run_id", S), ("node_id", S), ("location", S), ("channel", I64), ("frac", F64), ("side", S),
        ("rank", I32), ("pos", I32), ("token_id", I32), ("value", F32), ("is_center", B),
    ),
    "layer_ablations": _schema(
        ("run_id", S), ("layer_half", S), ("layer", I32), ("half", S), ("interv_loss_raw", F64),
        ("delta", F64), ("delta_released", F64), ("n_nodes", I64), ("layer_interv_loss_raw", F64),
    ),
    "pruning_curve": _schema(("run_id", S), ("step", I64), ("x", I64), ("loss_raw", F64), ("loss", F64)),
    "loss_at_k": _schema(
        ("model", S), ("task", S), ("sweep", S), ("k_label", S), ("run_id", S), ("n_nodes", I64),
        ("final_loss_raw", F64), ("final_loss", F64), ("interv_loss", F64), ("unpruned_loss", F64),
    ),
    "train_curves": _schema(("model", S), ("step", I64), ("metric", S), ("value", F64)),
    "embeddings": _schema(("model", S), ("matrix", S), ("row", I32), ("channel", I32), ("value", F32)),
    "vocab": _schema(("model", S), ("token_id", I32), ("text", S), ("bytes_hex", S), ("is_special", B)),
    "ablations": _schema(
        ("run_id", S), ("node_id", S), ("location", S), ("channel", I64), ("mode", S), ("stored_delta", F64),
        ("recomputed_loss", F64), ("recomputed_delta", F64), ("recomputed_delta_se", F64), ("abs_diff", F64),
        ("agrees", B), ("node_mean", F64), ("node_mean_se", F64),
    ),
    "recomputed_activations": _schema(
        ("run_id", S), ("node_id", S), ("location", S), ("channel", I64), ("doc", I32), ("pos", I32),
        ("stored", F32), ("full_model", F32), ("circuit_model", F32),
    ),
    "snippets": _schema(  # derived (pipeline/derived.py): the snippets the viewer shows
        ("run_id", S), ("node_id", S), ("location", S), ("channel", I64), ("frac", F64), ("side", S),
        ("rank", I32), ("pos", I32), ("token_id", I32), ("value", F32), ("is_center", B),
    ),
    "wte_extremes": _schema(("model", S), ("channel", I32), ("side", S), ("rank", I32), ("token_id", I32), ("value", F32)),
    "unembed_extremes": _schema(("model", S), ("channel", I32), ("side", S), ("rank", I32), ("token_id", I32), ("value", F32)),
    "wte_histograms": _schema(("model", S), ("channel", I32), ("bin", I32), ("bin_left", F64), ("bin_right", F64), ("count", I64)),
    "recompute_summary": _schema(
        ("run_id", S), ("stored_loss", F64), ("recomputed_loss", F64), ("stored_interv_loss", F64),
        ("recomputed_interv_loss", F64), ("max_abs_act_diff_full", F64), ("max_abs_act_diff_circuit", F64),
        ("stored_acts_match", S), ("loss_factor", F64), ("means_source", S), ("means_tokens", I64),
        ("tolerance", F64), ("device", S), ("skipped", S), ("means_se_max", F64), ("means_se_median", F64),
        ("ablation_pairs", I64), ("task_pairs", I64),
        ("seconds_full_model", F64), ("seconds_means", F64), ("seconds_circuit_model", F64), ("seconds_ablations", F64),
    ),
}  # fmt: skip

# Faithfulness stress tests of a circuit (embedded demo store: prune_config["faithfulness"],
# pipeline.demo.circuits; no rows for released runs): its loss alone, without it, mean vs zero
# ablation, on each prompt set. `flagged`: the run's evaluation loss misses its selection loss
# by more than the standard error of their difference (same value on every row of the run).
SCHEMAS["faithfulness"] = _schema(
    ("run_id", S), ("prompt_set", S), ("ablation", S), ("variant", S), ("loss_raw", F64), ("loss", F64),
    ("loss_se", F64), ("accuracy", F64), ("n_prompts", I64), ("flagged", B),
)  # fmt: skip

# Which tables are partitioned by model (the rest: by run).
MODEL_TABLES = ("train_curves", "embeddings", "vocab", "wte_extremes", "wte_histograms", "unembed_extremes")
RUN_TABLES = tuple(t for t in SCHEMAS if t not in MODEL_TABLES)
# Sort keys of each table's rows within a file (the partition column first).
SORT_KEYS: dict[str, tuple[str, ...]] = {
    "runs": ("run_id",),
    "nodes": ("run_id", "location", "channel"),
    "edges": ("run_id", "tgt_location", "tgt_channel", "src_location", "src_channel"),
    "task_docs": ("run_id", "doc"),
    "activations": ("run_id", "location", "channel", "doc", "pos"),
    "samples": ("run_id", "location", "channel", "frac", "side", "rank", "pos"),
    "layer_ablations": ("run_id", "layer", "half"),
    "pruning_curve": ("run_id", "step"),
    "loss_at_k": ("model", "task", "sweep", "k_label"),
    "train_curves": ("model", "metric", "step"),
    "embeddings": ("model", "matrix", "channel", "row"),
    "vocab": ("model", "token_id"),
    "ablations": ("run_id", "location", "channel", "mode"),
    "recomputed_activations": ("run_id", "location", "channel", "doc", "pos"),
    "recompute_summary": ("run_id",),
    "snippets": ("run_id", "location", "channel", "frac", "side", "rank", "pos"),
    "wte_extremes": ("model", "channel", "side", "rank"),
    "unembed_extremes": ("model", "channel", "side", "rank"),
    "wte_histograms": ("model", "channel", "bin"),
    "faithfulness": ("run_id", "prompt_set", "ablation", "variant"),
}
ROW_GROUP_ROWS = 1 << 20
# Tables read one node (or channel) at a time by the viewer: small row groups, so that a lookup
# decompresses a few nodes' rows rather than a million (~20 nodes' activations at release widths).
SMALL_ROW_GROUPS = {
    "activations": 1 << 16,
    "snippets": 1 << 15,
    "wte_extremes": 1 << 13,
    "wte_histograms": 1 << 13,
    "unembed_extremes": 1 << 13,
}


def row_group_rows(table: str) -> int:
    return SMALL_ROW_GROUPS.get(table, ROW_GROUP_ROWS)


def _escape_component(c: str) -> str:
    """A key component as it appears in a file name: unchanged when plain, else percent-escaped.

    Plain: non-empty, no `%`, no `__`, neither starting nor ending with `_`. Such a component
    can neither contain nor touch the `__` separator, so splitting a name on `__` gives back the
    components. Any other component has its `%` and `_` escaped (`%25`, `%5F`), so it contains `%`
    and no `_` at all, and a plain component never contains `%`: the map is injective.
    """
    if c and "%" not in c and "__" not in c and not c.startswith("_") and not c.endswith("_"):
        return c
    return c.replace("%", "%25").replace("_", "%5F")


def partition_file_name(partition_key: str) -> str:
    """`model/task/sweep/k` -> `model__task__sweep__k.parquet`, injectively.

    Ids whose components contain `__` (or start/end with `_`, or hold `%`) get those characters
    escaped: `m/coll__a/b/8` -> `m__coll%5F%5Fa__b__8.parquet`, while `m/coll/a__b/8` ->
    `m__coll__a%5F%5Fb__8.parquet`; under the old plain `/` -> `__` mapping both were
    `m__coll__a__b__8.parquet` and one run's rows silently replaced the other's. Every id without
    such components keeps its old name, so existing data dirs stay valid.
    """
    return "__".join(_escape_component(c) for c in partition_key.split("/")) + ".parquet"


def _legacy_file_name(partition_key: str) -> str:
    """The file name before the names were made injective (only differs for escaped ids)."""
    return partition_key.replace("/", "__") + ".parquet"


def table_dir(data: str, table: str) -> str:
    return data.rstrip("/") + f"/tables/{table}"


def partition_path(data: str, table: str, partition_key: str) -> str:
    return table_dir(data, table) + "/" + partition_file_name(partition_key)


def local_path(url: str) -> Path:
    return Path(url[len("file://") :] if url.startswith("file://") else url)


def make_table(table: str, columns: dict[str, list | pa.Array]) -> pa.Table:
    """A table of `table`'s schema from columns (missing columns become nulls), sorted by its keys."""
    schema = SCHEMAS[table]
    n = max((len(v) for v in columns.values()), default=0)
    unknown = set(columns) - set(schema.names)
    if unknown:
        raise KeyError(f"table {table} has no columns {sorted(unknown)}")
    arrays = [pa.array(columns[f.name], type=f.type) if f.name in columns else pa.nulls(n, f.type) for f in schema]
    t = pa.Table.from_arrays(arrays, schema=schema)
    return sort_table(table, t)


def sort_table(table: str, t: pa.Table) -> pa.Table:
    return t.sort_by([(k, "ascending") for k in SORT_KEYS[table]]) if t.num_rows > 1 else t


def write_partition(data: str, table: str, partition_key: str, parts: pa.Table | Iterable[pa.Table | pa.RecordBatch]) -> dict:
    """Write one partition file of `table` atomically; `parts` is a table or an iterable of pieces
    already in sort order (streamed, so a large partition never sits in memory whole).

    Returns metadata: path, rows, bytes.
    """
    schema = SCHEMAS[table]
    target = partition_path(data, table, partition_key)
    remote = is_url(data)
    if remote:
        tmp_dir = tempfile.mkdtemp(prefix="circuits-put-")
        tmp = os.path.join(tmp_dir, partition_file_name(partition_key))
    else:
        final = local_path(target)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = str(final.parent / f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
    rows = 0
    group_rows = row_group_rows(table)
    try:
        # Dictionary pages for the repetitive columns (ids, locations, channels); plain for floats,
        # where trying a dictionary only costs time.
        dictionary = [f.name for f in schema if not pa.types.is_floating(f.type)]
        with pq.ParquetWriter(tmp, schema, compression="zstd", use_dictionary=dictionary) as writer:
            buffered: list[pa.Table] = []
            n_buf = 0
            for piece in [parts] if isinstance(parts, pa.Table) else parts:
                t = piece if isinstance(piece, pa.Table) else pa.Table.from_batches([piece])
                if t.schema != schema:
                    t = t.select(schema.names).cast(schema)
                buffered.append(t)
                n_buf += t.num_rows
                rows += t.num_rows
                if n_buf >= group_rows:
                    writer.write_table(pa.concat_tables(buffered), row_group_size=group_rows)
                    buffered, n_buf = [], 0
            if buffered:
                writer.write_table(pa.concat_tables(buffered), row_group_size=group_rows)
        size = os.path.getsize(tmp)
        if remote:
            fs, path = fsspec.core.url_to_fs(target)
            fs.put_file(tmp, path)  # one put: the object appears whole or not at all
        else:
            os.replace(tmp, target)
        _remove_legacy_file(data, table, partition_key)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        if remote:
            os.rmdir(os.path.dirname(tmp))
    return {"path": target, "rows": rows, "bytes": size}


def _remove_legacy_file(data: str, table: str, partition_key: str) -> None:
    """Remove a file written under the old, colliding name of this partition, now superseded.

    A legacy name that differs from the new one is never the new name of any key (it has an
    unescaped `__` inside a component, or a bare `%`), so it can only be a stale file whose rows
    (this run's or a colliding run's) would otherwise be read twice by the `*.parquet` views.
    """
    legacy = _legacy_file_name(partition_key)
    if legacy == partition_file_name(partition_key):
        return
    stale = table_dir(data, table) + "/" + legacy
    if is_url(data):
        fs, path = fsspec.core.url_to_fs(stale)
        if fs.exists(path):
            fs.rm(path)
    else:
        local_path(stale).unlink(missing_ok=True)


def read_partition(data: str, table: str, partition_key: str) -> pa.Table:
    """One partition file (for tests and asset checks)."""
    with fsspec.open(partition_path(data, table, partition_key), "rb") as f:
        return pq.read_table(f)


def empty_table(table: str) -> pa.Table:
    return SCHEMAS[table].empty_table()
