"""Opening `circuits.duckdb`: one function for the viewer, the pipeline and ad-hoc SQL.

The database is a local file (a database is not an object; `pipeline.settings.local_dir`) of views
over the Parquet tables. When the tables are in object storage (`CIRCUITS_DATA=az://...`,
`s3://...`), the views hold those URLs and DuckDB reads them through the fsspec filesystem of the
URL's scheme, registered on the connection (`con.register_filesystem`). The filesystem takes its
credentials from the ordinary environment variables of its library (adlfs:
`AZURE_STORAGE_CONNECTION_STRING` or `AZURE_STORAGE_ACCOUNT_NAME` + `..._KEY` / `..._SAS_TOKEN`;
s3fs: `AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, ...), never from a file of this project.

The data location is recorded in the database (table `circuits_source`), so `connect(path)` knows
which filesystem to register without being told:

    from pipeline.database import connect
    con = connect()                      # $CIRCUITS_DB_DIR/circuits.duckdb, read-only
    con.sql("SELECT count(*) FROM nodes").show()
"""

from __future__ import annotations

import duckdb
import fsspec

from pipeline import settings

SOURCE_TABLE = "circuits_source"


def filesystem(data_url: str) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem of an object-store URL (options from the URL and the environment)."""
    return fsspec.core.url_to_fs(data_url)[0]


def register_data_filesystem(con: duckdb.DuckDBPyConnection, data_url: str) -> None:
    """Let DuckDB read `data_url`'s objects through fsspec (a no-op for a local data dir).

    The filesystem's listings are dropped first: fsspec caches one instance per URL and options, with
    its directory listings, so without this a long-lived process (the viewer) would keep globbing the
    tables as they were when it first looked, missing the partitions written since."""
    if settings.is_url(data_url):
        fs = filesystem(data_url)
        fs.invalidate_cache()
        name = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]  # the name DuckDB registers it under
        # Registrations belong to the database, shared by every connection to the same file in this process:
        # a second connection finds it registered (and refuses a second registration).
        if not con.filesystem_is_registered(name):
            con.register_filesystem(fs)


def record_source(con: duckdb.DuckDBPyConnection, data_url: str) -> None:
    con.execute(f"CREATE OR REPLACE TABLE {SOURCE_TABLE} (data_url VARCHAR)")
    con.execute(f"INSERT INTO {SOURCE_TABLE} VALUES (?)", [data_url])


def source_of(con: duckdb.DuckDBPyConnection) -> str | None:
    """The data location a database's views read (None for a database built before it was recorded)."""
    try:
        rows = con.execute(f"SELECT data_url FROM {SOURCE_TABLE}").fetchall()  # all: no result left open on `con`
    except duckdb.CatalogException:
        return None
    return rows[0][0] if rows else None


def connect(path: str | None = None, read_only: bool = True) -> duckdb.DuckDBPyConnection:
    """`circuits.duckdb` (default `settings.duckdb_path()`), ready to query its views wherever the tables are."""
    con = duckdb.connect(path or settings.duckdb_path(), read_only=read_only)
    try:
        url = source_of(con)
        if url:
            register_data_filesystem(con, url)
    except BaseException:
        con.close()
        raise
    return con
