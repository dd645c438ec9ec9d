"""`$CIRCUITS_DATA/circuits.duckdb`: one view per table over its Parquet files.

Views hold absolute paths (`read_parquet('<abs data>/tables/<table>/*.parquet')`), so the database
works from any working directory. It is rebuilt into a temporary file beside the target and renamed
over it (never held open by the pipeline), so other processes may open it `read_only=True` at any
time; a reader that opened the old file keeps a consistent view until it reconnects. A table with
no files yet gets a view over an empty relation of its schema's types, so queries never fail on a
missing table. For an object-store data dir the views hold the fsspec URLs: a reading session
registers the same filesystem (`con.register_filesystem(fsspec.filesystem("s3"))`) or loads
DuckDB's `httpfs` with credentials.
"""


import os
import tempfile
import uuid

import dagster as dg
import duckdb
import fsspec

from pipeline.assets.tables import VIZ_TABLES
from pipeline.resources import CircuitsResource
from pipeline.tables import MODEL_TABLES, SCHEMAS, is_remote, local_path, table_dir

DB_NAME = "circuits.duckdb"


def _q(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _ident(s: str) -> str:
    return '"' + s.replace('"', '""') + '"'


def _has_files(data: str, table: str) -> bool:
    fs, path = fsspec.core.url_to_fs(table_dir(data, table))
    return bool(fs.exists(path) and fs.glob(path.rstrip("/") + "/*.parquet"))


def view_sql(con: duckdb.DuckDBPyConnection, data: str, table: str) -> str:
    if _has_files(data, table):
        return f"CREATE VIEW {_ident(table)} AS SELECT * FROM read_parquet({_q(table_dir(data, table) + '/*.parquet')}, union_by_name = true)"
    empty = SCHEMAS[table].empty_table()  # noqa: F841 - read by DuckDB's replacement scan below
    types = con.execute("DESCRIBE SELECT * FROM empty").fetchall()
    cols = ", ".join(f"CAST(NULL AS {t}) AS {_ident(name)}" for name, t, *_ in types)
    return f"CREATE VIEW {_ident(table)} AS SELECT {cols} WHERE false"


def build_duckdb(data: str) -> str:
    """(Re)build `<data>/circuits.duckdb` atomically; returns its path."""
    remote = is_remote(data)
    if remote:
        tmp_dir = tempfile.mkdtemp(prefix="circuits-db-")
        tmp = os.path.join(tmp_dir, DB_NAME)
    else:
        base = local_path(data)
        base.mkdir(parents=True, exist_ok=True)
        tmp = str(base / f".{DB_NAME}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        con = duckdb.connect(tmp)
        try:
            if remote:  # DuckDB binds the views' files now: let it reach them through fsspec
                con.register_filesystem(fsspec.core.url_to_fs(data)[0])
            for table in SCHEMAS:
                con.execute(view_sql(con, data, table))
            con.execute("CHECKPOINT")
        finally:
            con.close()
        target = data.rstrip("/") + "/" + DB_NAME
        if remote:
            fs, path = fsspec.core.url_to_fs(target)
            fs.put_file(tmp, path)
        else:
            os.replace(tmp, target)
        return target
    finally:
        for p in (tmp, tmp + ".wal"):
            if os.path.exists(p):
                os.remove(p)
        if remote:
            os.rmdir(os.path.dirname(tmp))


@dg.asset(
    group_name="duckdb",
    deps=list(VIZ_TABLES) + ["ablations", "recomputed_activations", "recompute_summary", *MODEL_TABLES],
    description="circuits.duckdb: one view per table over its Parquet files (absolute paths)",
)
def circuits_duckdb(context: dg.AssetExecutionContext, circuits: CircuitsResource) -> dg.MaterializeResult:
    data = circuits.data_url()
    path = build_duckdb(data)
    present = [t for t in SCHEMAS if _has_files(data, t)]
    context.log.info(f"{path}: views over {len(present)} of {len(SCHEMAS)} tables with files")
    return dg.MaterializeResult(metadata={"path": path, "tables_with_files": ", ".join(present), "empty_views": ", ".join(t for t in SCHEMAS if t not in present)})


duckdb_assets = [circuits_duckdb]
