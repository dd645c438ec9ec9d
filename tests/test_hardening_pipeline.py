"""Hardening of the pipeline against hostile stores and faults (issue 15): file names that cannot
collide, a store walk that survives bad entries, the CLI showing the real error, and a Dagster
instance that is created atomically, repaired, locked, and whose failures fail one step."""

import os
import shutil
import sqlite3
import subprocess
import sys
import warnings
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from fixtures_viz import FIXTURE_RUNS

from pipeline.materialize import materialize_store

REPO = Path(__file__).resolve().parents[1]
PT_RUN = "fixture_a/quotes/prune_v4/4"  # a .pt run of the fixture store
OTHER_PT_RUN = "fixture_a/brackets/prune_v4/6"


def _store(viz_store: Path, root: Path, runs: dict[str, str]) -> Path:
    """A store with the fixture's tokenizer and model, and `runs`: new run id -> fixture run id."""
    for d in ("tinypython", "models", "train_curves"):
        shutil.copytree(viz_store / d, root / d)
    for new, old in runs.items():
        src = viz_store / "viz" / old / FIXTURE_RUNS[old]["file"]
        (root / "viz" / new).mkdir(parents=True)
        shutil.copy(src, root / "viz" / new / src.name)
    return root


def _nodes_per_run(data: Path) -> dict[str, int]:
    t = pq.read_table(data / "tables" / "nodes").to_pandas()
    return t.groupby("run_id").size().to_dict()


# ---- file names ------------------------------------------------------------------------------


def test_file_names_are_injective_and_plain_ids_keep_their_names():
    from pipeline.tables import partition_file_name

    assert partition_file_name("fixture_a/quotes/prune_v4/k_optim") == "fixture_a__quotes__prune_v4__k_optim.parquet"
    assert partition_file_name("csp_yolo1") == "csp_yolo1.parquet"
    keys = ["m/coll__a/b/8", "m/coll/a__b/8", "m/coll_/_a/b", "m/coll/__a/b", "m/coll___a/b/8", "m/a%5Fb/c/d", "m/a_b/c/d",
            "m//c/d", "m/_/c/d", "m/%/c/d", "m/%25/c/d", "m_/x/y/z", "m/_x/y/z", "a__b", "a%5F%5Fb", "a_b"]  # fmt: skip
    names = [partition_file_name(k) for k in keys]
    assert len(set(names)) == len(keys), dict(zip(keys, names, strict=True))


def test_colliding_run_ids_keep_all_rows(viz_store, tmp_path):
    """`m/coll__a/b/8` and `m/coll/a__b/8` used to share one Parquet file: one run's rows vanished."""
    a, b = "fixture_a/coll__a/b/8", "fixture_a/coll/a__b/8"
    store = _store(viz_store, tmp_path / "store", {a: PT_RUN, b: OTHER_PT_RUN})
    data = tmp_path / "data"
    # A file left by the old naming (a stale copy of one run's rows) is removed, not read twice.
    (data / "tables" / "nodes").mkdir(parents=True)
    stale = data / "tables" / "nodes" / "fixture_a__coll__a__b__8.parquet"
    shutil.copy(_any_nodes_file(tmp_path), stale)

    s = materialize_store(store=str(store), data=str(data), progress=False, recompute=False)
    assert not s.failed, s.failed
    assert not stale.exists()
    counts = _nodes_per_run(data)
    assert counts == {a: FIXTURE_RUNS[PT_RUN]["n_nodes"], b: FIXTURE_RUNS[OTHER_PT_RUN]["n_nodes"]}
    import duckdb

    con = duckdb.connect(str(data / "circuits.duckdb"), read_only=True)
    got = dict(con.execute("select run_id, count(*) from activations group by run_id").fetchall())
    assert set(got) == {a, b} and all(v > 0 for v in got.values())


def _any_nodes_file(tmp_path) -> Path:
    """A valid nodes file of some other run (written by the pipeline's own writer)."""
    from pipeline.tables import make_table, partition_path, write_partition

    d = tmp_path / "scratch"
    write_partition(str(d), "nodes", "x/y/z/w", make_table("nodes", {"run_id": ["x/y/z/w"], "node_id": ["0.mlp:1"]}))
    return Path(partition_path(str(d), "nodes", "x/y/z/w"))


# ---- the store walk --------------------------------------------------------------------------


def test_store_walk_skips_loops_and_outside_links_with_a_warning(viz_store, tmp_path):
    from pipeline.assets.discovery import StoreWalkWarning, discover_runs
    from pipeline.store_access import open_store

    store = _store(viz_store, tmp_path / "store", {PT_RUN: PT_RUN, OTHER_PT_RUN: OTHER_PT_RUN})
    outside = _store(viz_store, tmp_path / "outside", {"other/t/s/1": PT_RUN})
    viz = store / "viz"
    os.symlink("loop", viz / "loop")  # a self-looping symlink: ELOOP on every access
    os.symlink(".", viz / "fixture_a" / "quotes" / "dot")  # a symlink to `.`: phantom runs
    os.symlink(outside / "viz" / "other", viz / "other")  # leaves the store root
    os.symlink(viz / "fixture_a" / "quotes" / "prune_v4", viz / "fixture_a" / "brackets" / "alias")  # an alias inside
    unreadable = viz / "locked"
    unreadable.mkdir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = discover_runs(open_store(str(store)))
    assert [r.run_id for r in runs] == sorted([PT_RUN, OTHER_PT_RUN])
    msgs = [str(w.message) for w in caught if issubclass(w.category, StoreWalkWarning)]
    assert any("viz/loop" in m and "cannot resolve" in m for m in msgs), msgs
    assert any("viz/other" in m and "outside the store" in m for m in msgs), msgs
    assert any("quotes/dot" in m for m in msgs), msgs
    assert any("brackets/alias" in m for m in msgs), msgs


def test_unreadable_directory_is_skipped_and_the_rest_materializes(viz_store, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads every directory")
    store = _store(viz_store, tmp_path / "store", {PT_RUN: PT_RUN, "fixture_a/x/y/1": OTHER_PT_RUN})
    (store / "viz" / "fixture_a" / "x").chmod(0)
    try:
        from pipeline.assets.discovery import discover_runs
        from pipeline.store_access import open_store

        with pytest.warns(UserWarning, match="cannot list"):
            assert [r.run_id for r in discover_runs(open_store(str(store)))] == [PT_RUN]
    finally:
        (store / "viz" / "fixture_a" / "x").chmod(0o755)


def test_materialize_survives_a_self_looping_symlink(viz_store, tmp_path):
    store = _store(viz_store, tmp_path / "store", {PT_RUN: PT_RUN})
    os.symlink("loop", store / "viz" / "loop")
    s = materialize_store(store=str(store), data=str(tmp_path / "data"), progress=False, recompute=False)
    assert not s.failed and s.runs == [PT_RUN]
    assert len(s.skipped) == 1 and "viz/loop" in s.skipped[0]
    assert _nodes_per_run(tmp_path / "data") == {PT_RUN: FIXTURE_RUNS[PT_RUN]["n_nodes"]}


# ---- the CLI shows the real error --------------------------------------------------------------


def test_cli_shows_the_underlying_error_not_dagsters_wrapper(viz_store, tmp_path, capsys):
    from pipeline.cli import main

    store = _store(viz_store, tmp_path / "store", {PT_RUN: PT_RUN})
    (store / "models" / "fixture_a" / "final_model.pt").unlink()
    rc = main(["materialize", "--store", str(store), "--data", str(tmp_path / "d"), "--no-recompute"])
    out = capsys.readouterr().out
    assert rc == 1
    line = next(x for x in out.splitlines() if "FAILED model fixture_a" in x)
    assert "FileNotFoundError" in line and "final_model.pt" in line, line
    assert "Error occurred while executing" not in line


def test_failed_error_checks_and_hostile_files_are_failures_in_the_summary(viz_store, tmp_path):
    """A NaN loss fails the run's no_nan check (the summary used to call the run ok); a zero-stride
    activation is refused with the file and the key in the summary."""
    raw = torch.load(viz_store / "viz" / PT_RUN / "viz_data.pt", weights_only=False)  # our own fixture: trusted
    raw["importances"]["loss"] = float("nan")
    store = _store(viz_store, tmp_path / "store", {})
    (store / "viz" / PT_RUN).mkdir(parents=True)
    torch.save(raw, store / "viz" / PT_RUN / "viz_data.pt")
    raw["importances"]["loss"] = 1.0
    acts = raw["importances"]["task_samples"][1]
    loc = next(iter(acts))
    ch = next(iter(acts[loc]))
    acts[loc][ch] = torch.zeros(1).as_strided(acts[loc][ch].shape, (0, 0))
    (store / "viz" / OTHER_PT_RUN).mkdir(parents=True)
    torch.save(raw, store / "viz" / OTHER_PT_RUN / "viz_data.pt")
    s = materialize_store(store=str(store), data=str(tmp_path / "d"), progress=False, recompute=False)
    assert f"run {PT_RUN}" in s.failed and f"run {PT_RUN}" not in s.ok
    assert "no_nan_runs" in s.failed[f"run {PT_RUN}"] and "loss" in s.failed[f"run {PT_RUN}"]
    msg = s.failed[f"run {OTHER_PT_RUN}"]
    assert f"viz/{OTHER_PT_RUN}/viz_data.pt: tensor importances['task_samples'][1]['{loc}'][{ch}]" in msg, msg


# ---- the Dagster instance ------------------------------------------------------------------------


def test_a_broken_instance_database_is_repaired(viz_store, tmp_path):
    """The state a kill during the instance's creation left: a database without its tables."""
    from pipeline.materialize import pipeline_instance

    data = tmp_path / "data"
    pipeline_instance(str(data)).dispose()
    index = data / ".dagster" / "history" / "runs" / "index.db"
    with sqlite3.connect(index) as con:
        con.execute("DROP TABLE dynamic_partitions")
    store = _store(viz_store, tmp_path / "store", {PT_RUN: PT_RUN})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = materialize_store(store=str(store), data=str(data), progress=False, recompute=False)
    assert not s.failed, s.failed
    assert _nodes_per_run(data) == {PT_RUN: FIXTURE_RUNS[PT_RUN]["n_nodes"]}


def test_a_kill_while_creating_the_instance_leaves_no_half_instance(tmp_path):
    """SIGKILL while the instance's databases are being created (held there by a slow probe)."""
    import signal

    data = tmp_path / "data"
    code = (
        "import sys, time, pipeline.materialize as M\n"
        "M._probe = lambda instance: (print('creating', flush=True), time.sleep(60))\n"
        "M.pipeline_instance(sys.argv[1])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("DAGSTER_HOME", None)
    p = subprocess.Popen([sys.executable, "-c", code, str(data)], env=env, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "creating"  # the databases exist, half-way through creation
    assert list(data.glob(".dagster.new-*/history/runs.db"))
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (data / ".dagster").exists()
    from pipeline.materialize import pipeline_instance

    pipeline_instance(str(data)).dispose()
    assert (data / ".dagster" / "history" / "runs" / "index.db").exists()


def test_instance_failure_fails_the_step_not_the_process(viz_store, tmp_path, monkeypatch):
    """A full disk under the instance: the steps fail with the error; the next run works again."""
    import errno

    from pipeline.materialize import pipeline_instance

    data = tmp_path / "data"
    store = _store(viz_store, tmp_path / "store", {PT_RUN: PT_RUN})
    instance = pipeline_instance(str(data))
    storage = instance.event_log_storage

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage, "store_event", full)
    s = materialize_store(store=str(store), data=str(data), progress=False, recompute=False, instance=instance)
    assert s.failed and not s.ok
    assert all("No space left on device" in m for m in s.failed.values()), s.failed
    monkeypatch.undo()
    s = materialize_store(store=str(store), data=str(data), progress=False, recompute=False)
    assert not s.failed, s.failed


def test_two_concurrent_materialize_on_a_fresh_dir_both_succeed(viz_store, tmp_path):
    store = _store(viz_store, tmp_path / "store", {PT_RUN: PT_RUN})
    data = tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("DAGSTER_HOME", None)
    cmd = [sys.executable, "-m", "pipeline.cli", "materialize", "--store", str(store), "--data", str(data), "--no-recompute"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, out + err[-3000:]
    assert _nodes_per_run(data) == {PT_RUN: FIXTURE_RUNS[PT_RUN]["n_nodes"]}


def test_nan_embedding_weight_fails_the_model_naming_file_and_key(viz_store, tmp_path):
    store = _store(viz_store, tmp_path / "store", {PT_RUN: PT_RUN})
    pt = store / "models" / "fixture_a" / "final_model.pt"
    state = torch.load(pt, weights_only=True)
    state["transformer.wte.weight"][3, 2] = float("nan")
    torch.save(state, pt)
    s = materialize_store(store=str(store), data=str(tmp_path / "d"), progress=False, recompute=False)
    msg = s.failed["model fixture_a"]
    assert "models/fixture_a/final_model.pt: tensor 'transformer.wte.weight' holds 1 NaN" in msg, msg
