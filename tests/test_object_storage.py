"""Tables on object storage (issue 17): `CIRCUITS_DATA=az://...` on the Azure Blob emulator (azurite).

The Parquet tables go to the container, `circuits.duckdb` stays a local file (CIRCUITS_DB_DIR) whose
views read the remote tables through the fsspec filesystem that `pipeline.database.connect` registers,
so queries (and the viewer's) return the same rows as a run with local data. A reader never sees half
an object: every file is one upload of the whole file, and an upload that breaks off leaves the old
object as it was. Credentials come from the environment (AZURE_STORAGE_CONNECTION_STRING), as adlfs reads them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import polars as pl
import pytest
from fixtures_azurite import point_adlfs_at
from polars.testing import assert_frame_equal

from pipeline.database import connect
from pipeline.materialize import materialize_store
from pipeline.tables import SCHEMAS, make_table, partition_file_name, read_partition, write_partition

REPO = Path(__file__).resolve().parents[1]
SELECT = "bracket_counting/prune_demo"  # two circuits of the tiny store
CONTAINER = "circuits-data"


@pytest.fixture
def az_env(azurite, monkeypatch, tmp_path):
    """adlfs (and so the pipeline) reaching azurite through the ordinary Azure variable; a private container."""
    azurite.create_container(CONTAINER, public=False)
    point_adlfs_at(monkeypatch, azurite.connection_string)  # with the account key: a private container
    monkeypatch.setenv("CIRCUITS_DB_DIR", str(tmp_path / "db"))
    return azurite


def _objects(url: str) -> list[str]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return sorted(p[len(root) + 1 :] for p in fs.find(root))


def _rows(con, table: str) -> pl.DataFrame:
    return pl.from_arrow(con.sql(f'SELECT * FROM "{table}" ORDER BY ALL').to_arrow_table())


def test_materialize_to_azure_then_query_through_the_local_database(az_env, tiny_store, tmp_path):
    url = f"az://{CONTAINER}/materialized"
    local = materialize_store(store=str(tiny_store), data=str(tmp_path / "local"), select=SELECT, recompute=False, progress=False)
    remote = materialize_store(store=str(tiny_store), data=url, select=SELECT, recompute=False, progress=False)
    assert not local.failed and not remote.failed, (local.failed, remote.failed)

    # The container holds the tables and only them: no database, no Dagster instance, no temp keys.
    objects = _objects(url)
    expected = sorted(p.relative_to(tmp_path / "local").as_posix() for p in (tmp_path / "local" / "tables").rglob("*.parquet"))
    assert objects == expected and len(objects) > 10
    # circuits.duckdb is a local file in CIRCUITS_DB_DIR whose views name the remote objects.
    assert remote.duckdb == str(tmp_path / "db" / "circuits.duckdb") and Path(remote.duckdb).is_file()
    with connect(remote.duckdb) as con, connect(local.duckdb) as con_local:
        sql = con.execute("SELECT sql FROM duckdb_views() WHERE view_name = 'nodes'").fetchall()[0][0]
        assert f"{url}/tables/nodes/*.parquet" in sql
        for table in SCHEMAS:
            assert_frame_equal(_rows(con, table), _rows(con_local, table), check_exact=True)
        assert con.execute("SELECT count(DISTINCT run_id) FROM nodes").fetchall() == [(2,)]
        # a cursor (what the viewer queries through, one per thread) reads the remote tables too
        assert (
            con.cursor().execute("SELECT count(*) FROM edges").fetchall()
            == con_local.execute("SELECT count(*) FROM edges").fetchall()
        )


def test_the_viewer_reads_remote_tables_without_torch(az_env, tiny_store, tmp_path):
    """The viewer's data layer, in a fresh process with CIRCUITS_DATA=az://...: finds the local database
    by itself, answers from the remote tables, and never imports torch."""
    url = f"az://{CONTAINER}/viewer"
    s = materialize_store(
        store=str(tiny_store), data=url, select="bracket_counting/prune_demo/8", recompute=False, progress=False
    )
    assert not s.failed
    code = (
        "import sys; from viewer import queries; queries.check_tables(); "
        "print(len(queries.runs()), queries.query('SELECT count(*) AS n FROM nodes')['n'][0], 'torch' in sys.modules)"
    )
    env = dict(os.environ, CIRCUITS_DATA=url, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    runs, nodes, torch_loaded = out.stdout.split()
    with connect(s.duckdb) as con:
        assert int(nodes) == con.execute("SELECT count(*) FROM nodes").fetchall()[0][0] > 0
    assert runs == "1" and torch_loaded == "False"


def _nodes(n: int, run_id: str):
    return make_table("nodes", {"run_id": [run_id] * n, "node_id": [f"n{i:05d}" for i in range(n)], "channel": list(range(n))})


def test_each_object_is_one_upload_and_a_broken_upload_leaves_the_old_one(az_env, monkeypatch):
    from azure.storage.blob.aio import BlobClient

    url, run_id = f"az://{CONTAINER}/atomic", "m/t/s/8"
    uploads: list[str] = []
    real_upload = BlobClient.upload_blob

    async def counted(self, data, *args, **kwargs):
        uploads.append(self.blob_name)
        return await real_upload(self, data, *args, **kwargs)

    monkeypatch.setattr(BlobClient, "upload_blob", counted)
    old = _nodes(3000, run_id)
    write_partition(url, "nodes", run_id, old)
    name = f"atomic/tables/nodes/{partition_file_name(run_id)}"
    assert uploads == [name]  # one upload of the whole file, at its final name (no temp key, no copy)
    assert _objects(url) == [f"tables/nodes/{partition_file_name(run_id)}"]

    class BreaksOff:
        """The local file, read in small blocks, failing half-way (a lost connection)."""

        def __init__(self, f):
            self.f, self.size, self.sent = f, os.fstat(f.fileno()).st_size, 0

        def read(self, n=-1):
            if self.sent > self.size // 2:
                raise ConnectionResetError("connection lost mid-upload (test)")
            chunk = self.f.read(n if n and n > 0 else 1024)
            self.sent += len(chunk)
            return chunk

        def __getattr__(self, name):
            if name in ("seek", "tell", "seekable", "fileno"):  # a stream: no seeking, so the SDK uploads in blocks
                raise AttributeError(name)
            return getattr(self.f, name)

    async def breaking(self, data, *args, **kwargs):
        # Blocks of 1 KiB (Put Block) and a commit at the end (Put Block List): a real staged upload.
        kwargs.update(max_concurrency=1)
        self._config.max_single_put_size = 1024
        self._config.max_block_size = 1024
        return await real_upload(self, BreaksOff(data), *args, **kwargs)

    monkeypatch.setattr(BlobClient, "upload_blob", breaking)
    temps_before = set(Path(tempfile.gettempdir()).glob("circuits-put-*"))
    with pytest.raises(Exception, match="connection lost mid-upload"):
        write_partition(url, "nodes", run_id, _nodes(5000, run_id))
    monkeypatch.setattr(BlobClient, "upload_blob", real_upload)
    # the upload did break off mid-way: blocks of the new file were staged, never committed
    blob = az_env.service().get_blob_client(CONTAINER, name)
    committed, uncommitted = blob.get_block_list("all")
    assert len(uncommitted) >= 2 and sum(b.size for b in uncommitted) > 0
    after = read_partition(url, "nodes", run_id)  # the old object, whole
    assert after.num_rows == 3000 and after.column("node_id").to_pylist() == old.column("node_id").to_pylist()
    assert _objects(url) == [f"tables/nodes/{partition_file_name(run_id)}"]  # no partial or temp object
    assert set(Path(tempfile.gettempdir()).glob("circuits-put-*")) == temps_before  # the local temp file removed too
