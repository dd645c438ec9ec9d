"""The Dagster side: a corrupt partition fails alone, rematerializing is idempotent and atomic,
discovery (sensor) finds every circuit, `dagster dev`'s definitions load, the CLI runs."""

import shutil

import dagster as dg
import pyarrow.parquet as pq
import pytest
from fixtures_viz import FIXTURE_RUNS

from pipeline.materialize import materialize_store

BAD = "fixture_a/brackets/prune_v4/6"


@pytest.fixture(scope="module")
def corrupt_store(viz_store, tmp_path_factory):
    store = tmp_path_factory.mktemp("corrupt") / "store"
    shutil.copytree(viz_store, store)
    bad = store / "viz" / BAD / "viz_data.pt"
    with open(bad, "r+b") as f:
        f.truncate(bad.stat().st_size // 3)
    return store


def _snapshot(data):
    return {p.relative_to(data): pq.read_table(p) for p in sorted((data / "tables").rglob("*.parquet"))}


def test_corrupt_partition_fails_alone_and_rematerializing_is_idempotent(corrupt_store, tmp_path):
    data = tmp_path / "data"
    s = materialize_store(store=str(corrupt_store), data=str(data), progress=False, recompute=False)
    assert list(s.failed) == [f"run {BAD}"]
    msg = s.failed[f"run {BAD}"]
    assert f"viz/{BAD}/viz_data.pt" in msg and "cannot be loaded safely" in msg
    good = [r for r in FIXTURE_RUNS if r != BAD]
    names = {p.name for p in (data / "tables" / "nodes").iterdir()}
    assert names == {r.replace("/", "__") + ".parquet" for r in good}
    assert s.duckdb and (data / "circuits.duckdb").exists()  # the database still covers the good runs

    first = _snapshot(data)
    mtimes = {p: p.stat().st_mtime_ns for p in (data / "tables").rglob("*.parquet")}
    s2 = materialize_store(store=str(corrupt_store), data=str(data), progress=False, recompute=False, select="quotes/prune_v4/4")
    assert not s2.failed and s2.runs == ["fixture_a/quotes/prune_v4/4"]
    second = _snapshot(data)
    assert second.keys() == first.keys()
    for k in first:
        assert second[k].equals(first[k]), k
    # Only the selected run's files (and the model's) were rewritten; other partitions untouched.
    rewritten = {p.name for p, t in mtimes.items() if p.stat().st_mtime_ns != t}
    assert "fixture_a__quotes__prune_v4__k_optim.parquet" not in rewritten
    assert "fixture_a__quotes__prune_v4__4.parquet" in rewritten
    assert not list(data.rglob("*.tmp"))


def test_sensor_adds_partitions_and_requests_runs(viz_store):
    from pipeline.assets.discovery import discover_circuits
    from pipeline.resources import CircuitsResource

    with dg.instance_for_test() as instance:
        ctx = dg.build_sensor_context(
            instance=instance, resources={"circuits": CircuitsResource.from_env(store_url=str(viz_store), data="unused")}
        )
        result = discover_circuits(ctx)
        keys = sorted(r.partition_key for r in result.run_requests)
        assert keys == sorted([*FIXTURE_RUNS, "fixture_a"])
        added = [k for req in result.dynamic_partitions_requests for k in req.partition_keys]
        assert sorted(added) == keys


def test_definitions_load_with_every_table_asset():
    from pipeline.definitions import defs
    from pipeline.tables import SCHEMAS

    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert set(SCHEMAS) <= keys
    assert {"store_index", "viz_data_file", "model_checkpoint", "tokenizer_files", "circuits_duckdb"} <= keys
    assert defs.resolve_job_def("run_tables_job") is not None
    # The sensor's jobs (selected by key) cover exactly the run- and model-partitioned assets.
    from pipeline.assets.discovery import MODEL_ASSET_KEYS, RUN_ASSET_KEYS
    from pipeline.definitions import MODEL_ASSETS, RUN_ASSETS

    assert {k.to_user_string() for a in RUN_ASSETS for k in a.keys} == set(RUN_ASSET_KEYS)
    assert {k.to_user_string() for a in MODEL_ASSETS for k in a.keys} == set(MODEL_ASSET_KEYS)


def test_cli_materialize(viz_store, tmp_path, capsys):
    from pipeline.cli import main

    rc = main(["materialize", "--store", str(viz_store), "--data", str(tmp_path / "d"), "--select", "brackets", "--no-recompute"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "1 circuits of 1 models" in out
    assert (tmp_path / "d" / "tables" / "edges" / "fixture_a__brackets__prune_v4__6.parquet").exists()


def test_materialize_tiny_embedded_store(tiny_store, tmp_path):
    """The embedded `tiny` store (pipeline.demo) materializes without failures; tables match its files."""
    import duckdb
    import torch

    data = tmp_path / "data"
    s = materialize_store(store=str(tiny_store), data=str(data), progress=False, recompute=False)
    assert not s.failed, s.failed
    viz_files = sorted((tiny_store / "viz").glob("*/*/*/*/viz_data.*")) if (tiny_store / "viz").exists() else []
    models = sorted(p.name for p in (tiny_store / "models").iterdir())
    con = duckdb.connect(str(data / "circuits.duckdb"), read_only=True)
    assert sorted(r[0] for r in con.execute("select distinct model from vocab").fetchall()) == models
    assert con.execute("select count(*) from runs").fetchone()[0] == len(viz_files)
    for f in viz_files[:3]:
        run_id = "/".join(f.parent.relative_to(tiny_store / "viz").parts)
        raw = torch.load(f, weights_only=False)  # the project's own demo output: trusted here
        n = sum(len(v) for v in raw["circuit_data"].values())
        assert con.execute("select count(*) from nodes where run_id = ?", [run_id]).fetchone()[0] == n


def test_object_store_data_dir_one_put_per_file(circuits_data, tmp_path):
    """CIRCUITS_DATA on an fsspec object store (memory://): files appear whole, views are built in a
    local database (a database file is not an object), none is put in the store."""
    import fsspec

    from pipeline.assets.duckdb_views import build_duckdb
    from pipeline.tables import read_partition, write_partition

    run_id = next(iter(FIXTURE_RUNS))
    local = read_partition(str(circuits_data), "nodes", run_id)
    meta = write_partition("memory://circuits-test", "nodes", run_id, local)
    assert meta["path"] == "memory://circuits-test/tables/nodes/" + run_id.replace("/", "__") + ".parquet"
    assert read_partition("memory://circuits-test", "nodes", run_id).equals(local)
    fs = fsspec.filesystem("memory")
    assert fs.ls("/circuits-test/tables/nodes", detail=False) == [
        "/circuits-test/tables/nodes/" + run_id.replace("/", "__") + ".parquet"
    ]
    assert build_duckdb("memory://circuits-test", str(tmp_path / "db")) == str(tmp_path / "db" / "circuits.duckdb")
    assert (tmp_path / "db" / "circuits.duckdb").is_file() and not fs.exists("/circuits-test/circuits.duckdb")


def test_cli_refuses_a_directory_that_is_not_a_store(tmp_path, capsys):
    from pipeline.cli import main

    rc = main(["materialize", "--store", str(tmp_path / "nothing"), "--data", str(tmp_path / "d")])
    assert rc == 2 and "not a circuit store" in capsys.readouterr().out


def test_materialize_from_a_remote_store_through_the_cache(viz_store, tmp_path):
    """A store behind an fsspec URL (memory://): files are downloaded once into the cache, and the
    download assets record size and sha256 of exactly the store's bytes."""
    import hashlib

    import fsspec

    fs = fsspec.filesystem("memory")
    for p in viz_store.rglob("*"):
        if p.is_file():
            fs.pipe(f"/remote-store/{p.relative_to(viz_store).as_posix()}", p.read_bytes())
    cache = tmp_path / "cache"
    run = "fixture_a/quotes/prune_v4/4"
    data = tmp_path / "data"
    s = materialize_store(store="memory://remote-store", data=str(data), cache=str(cache), progress=False, select=run)
    assert not s.failed, s.failed
    cached = {p.name.split("-", 1)[-1] for p in cache.rglob("*") if p.is_file()}
    assert {"viz_data.pt", "encoder.json", "vocab.bpe", "final_model.pt"} <= cached  # all through the given cache
    import duckdb

    sha = duckdb.connect(str(data / "circuits.duckdb"), read_only=True).execute("select source_sha256 from runs").fetchall()
    assert sha == [(hashlib.sha256((viz_store / "viz" / run / "viz_data.pt").read_bytes()).hexdigest(),)]
    with dg.DagsterInstance.local_temp(tempdir=str(data / ".dagster")) as instance:
        ev = instance.get_latest_materialization_event(dg.AssetKey("viz_data_file"))
        meta = ev.asset_materialization.metadata
        assert meta["viz_data_pt/sha256"].value == sha[0][0]
        assert meta["viz_data_pt/size"].value == (viz_store / "viz" / run / "viz_data.pt").stat().st_size


def test_recompute_on_the_embedded_store_uses_its_means_and_agrees(tiny_store, tmp_path, monkeypatch):
    """The embedded store ships the node means its circuits were pruned with
    (`models/<model>/node_means.pt`): the pipeline's recomputed circuit loss and per-node mean
    ablations then equal the stored ones, on every node (an end-to-end check of builder and pipeline).
    Each run's viz_data is parsed and hashed once for its conversion and recompute assets."""
    import duckdb

    from inference import files
    from pipeline import formats, store_access

    parsed, hashed = [], []
    real_read, real_hash = formats.read_viz_data, store_access.sha256_file
    monkeypatch.setattr(formats, "read_viz_data", lambda path, source=None: parsed.append(str(path)) or real_read(path, source))
    monkeypatch.setattr(store_access, "sha256_file", lambda path: hashed.append(str(path)) or real_hash(path))
    assert files.sha256_file is not store_access.sha256_file
    store_access._HASHES.clear()  # files an earlier test of this process hashed and parsed
    store_access.forget_run_file()
    s = materialize_store(store=str(tiny_store), data=str(tmp_path / "d"), progress=False, select="single_double_quote")
    assert not s.failed, s.failed
    viz_files = [p for p in parsed if p.endswith(("viz_data.pt", "viz_data.pkl"))]
    assert len(viz_files) == len(set(viz_files)) == len(s.runs) > 0
    assert len([p for p in hashed if p in viz_files]) == len(s.runs)
    con = duckdb.connect(str(tmp_path / "d" / "circuits.duckdb"), read_only=True)
    rows = con.execute(
        "select run_id, means_source, stored_interv_loss, recomputed_interv_loss, tolerance from recompute_summary"
    ).fetchall()
    assert rows and len(rows) == len(s.runs)
    for run_id, source, stored, recomputed, tol in rows:
        assert source == "store", run_id
        assert abs(stored - recomputed) <= tol * max(1.0, abs(stored)), run_id
    n, agree, worst = con.execute(
        "select count(*), count(*) filter (where agrees), max(abs_diff) from ablations where mode = 'mean'"
    ).fetchone()
    n_nodes = con.execute("select count(*) from nodes").fetchone()[0]
    assert n == n_nodes > 0 and agree == n, (agree, n, worst)


def test_a_bad_node_means_file_fails_its_runs_by_name(tiny_store, tmp_path):
    import shutil

    import torch

    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    means_file = store / "models" / "tiny_sparse" / "node_means.pt"
    blob = torch.load(means_file, weights_only=True)
    loc = sorted(blob["means"])[0]
    blob["means"][loc] = blob["means"][loc][:-1]
    torch.save(blob, means_file)
    s = materialize_store(store=str(store), data=str(tmp_path / "d"), progress=False, select="single_double_quote/prune_demo/8")
    assert s.failed
    assert any("node_means.pt" in msg and loc in msg for msg in s.failed.values()), s.failed
