"""`circuits.duckdb`: one view per table over its Parquet files.

The database is a local file: `$CIRCUITS_DATA/circuits.duckdb` for a local data dir, else in
`settings.local_dir` (CIRCUITS_DB_DIR). Views hold absolute paths
(`read_parquet('<abs data>/tables/<table>/*.parquet')`), so the database works from any working
directory. It is rebuilt into a temporary file beside the target and renamed over it (never held
open by the pipeline), so other processes may open it `read_only=True` at any time; a reader that
opened the old file keeps a consistent view until it reconnects. A table with no files yet gets a
view over an empty relation of its schema's types, so queries never fail on a missing table. For
an object-store data dir (`az://`, `s3://`) the views hold the URLs, and the data location is
recorded in the database: `pipeline.database.connect` registers the fsspec filesystem on the
connection, so the same queries read the remote tables.
"""

import os
import uuid
from pathlib import Path

import dagster as dg
import duckdb
import fsspec

from pipeline import settings
from pipeline.assets.tables import VIZ_TABLES
from pipeline.database import record_source, register_data_filesystem
from pipeline.resources import CircuitsResource
from pipeline.tables import MODEL_TABLES, SCHEMAS, table_dir

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


def build_duckdb(data: str, db_dir: str | None = None) -> str:
    """(Re)build `<local dir>/circuits.duckdb` atomically over the tables of `data`; returns its path.

    The local dir is `settings.local_dir(data, db_dir)`: the data dir itself when local, else a
    local directory (`db_dir`, CIRCUITS_DB_DIR, or one under the cache): a database file is not an object."""
    base = Path(settings.local_dir(data, db_dir))
    base.mkdir(parents=True, exist_ok=True)
    target = base / DB_NAME
    tmp = str(base / f".{DB_NAME}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        con = duckdb.connect(tmp)
        try:
            # DuckDB binds the views' files now: let it reach them (with fresh listings: workers wrote since)
            register_data_filesystem(con, data)
            for table in SCHEMAS:
                con.execute(view_sql(con, data, table))
            record_source(con, data)
            con.execute("CHECKPOINT")
        finally:
            con.close()
        os.replace(tmp, target)
        return str(target)
    finally:
        for p in (tmp, tmp + ".wal"):
            if os.path.exists(p):
                os.remove(p)


@dg.asset(
    group_name="duckdb",
    deps=list(VIZ_TABLES) + ["ablations", "recomputed_activations", "recompute_summary", *MODEL_TABLES],
    description="circuits.duckdb: one view per table over its Parquet files (absolute paths)",
)
def circuits_duckdb(context: dg.AssetExecutionContext, circuits: CircuitsResource) -> dg.MaterializeResult:
    data = circuits.data_url()
    path = build_duckdb(data, circuits.db_dir)
    present = [t for t in SCHEMAS if _has_files(data, t)]
    context.log.info(f"{path}: views over {len(present)} of {len(SCHEMAS)} tables with files")
    return dg.MaterializeResult(
        metadata={
            "path": path,
            "tables_with_files": ", ".join(present),
            "empty_views": ", ".join(t for t in SCHEMAS if t not in present),
        }
    )


duckdb_assets = [circuits_duckdb]
