"""Dagster on Dask (issue 17): the run partitions execute on a `dask.distributed` cluster through the
Dask executor (`pipeline.on_dask`), selected by configuration; on a `LocalCluster` of 2 worker
processes the tables equal those of the in-process run, and a partition that fails fails alone.

Kept small: the tiny store without recompute, the three `prune_demo/8` circuits (one corrupted); and one
partition run on a cluster the executor starts itself (the Dagster UI's default), 1 worker.
The workers are spawned with this interpreter's `sys.path`, so they import the code under test.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from pipeline import on_dask, settings
from pipeline.materialize import materialize_store, pipeline_instance

SELECT = "prune_demo/8"
BAD = "tiny_sparse/var_swap/prune_demo/8"
GOOD = ["tiny_sparse/bracket_counting/prune_demo/8", "tiny_sparse/single_double_quote/prune_demo/8"]


@pytest.fixture(scope="module")
def dask_cluster():
    """2 workers started with SIGTERM ignored, as some launchers leave it (`pipeline.log_capture`): the
    executor must put it back, or every step waits minutes for its log tails and leaves them running."""
    from dask.distributed import LocalCluster

    before = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited by the spawned workers
    try:
        # One thread per worker (Dagster's step execution is not thread-safe); no fixed dashboard port.
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    finally:
        signal.signal(signal.SIGTERM, before)
    with cluster:
        yield cluster


def _sigterm_on_workers(cluster) -> set[str]:
    from dask.distributed import Client

    with Client(cluster) as client:
        return set(client.run(lambda: str(signal.getsignal(signal.SIGTERM))).values())


def _log_tails_under(path: Path) -> list[str]:
    """Command lines of running `tail` processes (Dagster's log capture) reading files under `path`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:  # not a process, or gone meanwhile
            continue
        if argv and argv[0].endswith(b"tail") and any(str(path).encode() in a for a in argv):
            found.append(b" ".join(argv).decode(errors="replace"))
    return found


def test_restore_sigterm_resets_only_an_ignored_sigterm():
    from pipeline.log_capture import restore_sigterm

    before = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        assert restore_sigterm() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

        def handler(signum, frame):  # someone's own handler is theirs: left alone
            pass

        signal.signal(signal.SIGTERM, handler)
        assert not restore_sigterm() and signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, before)


@pytest.fixture(scope="module")
def store_with_a_bad_run(tiny_store, tmp_path_factory) -> Path:
    """A copy of the tiny store whose `BAD` circuit's viz_data is truncated (not loadable)."""
    store = tmp_path_factory.mktemp("dask_store") / "store"
    shutil.copytree(tiny_store, store, ignore=shutil.ignore_patterns(".build.lock"))
    bad = store / "viz" / BAD / "viz_data.pt"
    with open(bad, "r+b") as f:
        f.truncate(bad.stat().st_size // 3)
    return store


def _frames(data: Path) -> dict[str, pl.DataFrame]:
    return {p.relative_to(data / "tables").as_posix(): pl.read_parquet(p) for p in sorted((data / "tables").rglob("*.parquet"))}


def test_definitions_offer_the_dask_jobs_and_the_env_selects_the_executor(monkeypatch):
    """What `dagster dev` loads: the two partition jobs on the Dask executor, with a launchpad default
    (a local cluster of CIRCUITS_DASK_WORKERS, or the scheduler at CIRCUITS_DASK_SCHEDULER); and with
    CIRCUITS_EXECUTOR=dask every job of the Definitions runs on Dask."""
    from pipeline.definitions import build_definitions, defs
    from pipeline.resources import CircuitsResource

    for name in (on_dask.RUN_JOB, on_dask.MODEL_JOB):
        job = defs.resolve_job_def(name)
        assert job.executor_def.name == "dask"
        assert job.partitions_def is not None  # a partition per run (model), as the UI's backfills need
    assert "viz_data_file" in {
        k.to_user_string() for k in defs.resolve_job_def(on_dask.RUN_JOB).asset_layer.executable_asset_keys
    }
    assert defs.resolve_job_def("run_tables_job").executor_def.name != "dask"  # default: in-process

    monkeypatch.setenv("CIRCUITS_DASK_WORKERS", "3")
    assert on_dask.cluster_config()["cluster"]["local"]["n_workers"] == 3
    monkeypatch.setenv("CIRCUITS_DASK_SCHEDULER", "tcp://scheduler.example:8786")
    assert on_dask.cluster_config() == {"cluster": {"existing": {"address": "tcp://scheduler.example:8786"}}}
    monkeypatch.setenv("CIRCUITS_EXECUTOR", "dask")
    resource = CircuitsResource(store_url="/nowhere", data="/nowhere")
    on_env = build_definitions(resource)
    assert on_env.resolve_job_def("run_tables_job").executor_def.name == "dask"
    # the launchpad's defaults (a partition's config; the configured executor) are valid for dagster-dask's schema
    job = defs.resolve_job_def(on_dask.RUN_JOB)
    config = job.partitioned_config.get_run_config_for_partition_key(BAD)
    assert dg.validate_run_config(job, config)["execution"]["dask"]["cluster"]["local"]["threads_per_worker"] == 1
    assert dg.validate_run_config(on_env.resolve_job_def("run_tables_job"))["execution"]["dask"]["cluster"] == {
        "existing": {"address": "tcp://scheduler.example:8786"}
    }


def test_bad_executor_settings_name_the_variable(monkeypatch):
    monkeypatch.setenv("CIRCUITS_EXECUTOR", "spark")
    with pytest.raises(ValueError, match="CIRCUITS_EXECUTOR='spark'"):
        settings.executor()
    monkeypatch.setenv("CIRCUITS_DASK_WORKERS", "zero")
    with pytest.raises(ValueError, match="CIRCUITS_DASK_WORKERS='zero'"):
        settings.dask_workers()


def test_partitions_on_two_workers_equal_in_process_and_a_bad_one_fails_alone(
    dask_cluster, store_with_a_bad_run, tmp_path, capsys
):
    from pipeline.cli import main

    assert _sigterm_on_workers(dask_cluster) == {str(signal.SIG_IGN)}  # the fixture's premise
    store = str(store_with_a_bad_run)
    local = materialize_store(
        store=store, data=str(tmp_path / "in_process"), select=SELECT, recompute=False, progress=False, executor="in_process"
    )
    assert list(local.failed) == [f"run {BAD}"]

    # The Dask run through the CLI, as a user would: --scheduler alone selects the Dask executor.
    rc = main(["materialize", "--store", store, "--data", str(tmp_path / "dask"), "--select", SELECT, "--no-recompute",
               "--scheduler", dask_cluster.scheduler_address])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "1 failed" in out and f"FAILED run {BAD}: " in out and f"viz/{BAD}/viz_data.pt" in out
    assert all(f"FAILED run {r}" not in out for r in GOOD)

    # Every table file of the in-process run, and nothing else, with equal frames.
    expected, got = _frames(tmp_path / "in_process"), _frames(tmp_path / "dask")
    assert sorted(got) == sorted(expected)
    assert any(k.startswith("nodes/") for k in got) and any(k.startswith("embeddings/") for k in got)
    for name, frame in expected.items():
        assert_frame_equal(got[name], frame, check_exact=True)
    # The bad partition wrote nothing; the good ones wrote their files.
    nodes = {Path(k).stem for k in got if k.startswith("nodes/")}
    assert nodes == {r.replace("/", "__") for r in GOOD}
    assert (tmp_path / "dask" / "circuits.duckdb").is_file()
    # The executor put SIGTERM back on the workers, so Dagster stopped every step's log tails.
    assert _sigterm_on_workers(dask_cluster) == {str(signal.SIG_DFL)}
    assert _log_tails_under(tmp_path / "dask") == []

    # The partitions ran as runs of the Dask jobs, their steps in the workers' processes.
    from dask.distributed import Client

    with Client(dask_cluster) as client:
        worker_pids = set(client.run(os.getpid).values())
        keys = client.run_on_scheduler(lambda dask_scheduler: {str(t[0]) for t in dask_scheduler.transition_log})
    # every run's steps were tasks of their own: runs of one job share no task key (else Dask answers the
    # second run with the first one's results, dagster-io/dagster#21418)
    assert len({k for k in keys if k.startswith(f"{on_dask.RUN_JOB}.") and k.endswith(".viz_data_file")}) == 3
    instance = pipeline_instance(str(tmp_path / "dask"))
    try:
        runs = instance.get_runs(filters=dg.RunsFilter(job_name=on_dask.RUN_JOB))
        status = {r.tags["dagster/partition"]: r.status for r in runs}
        assert status == {BAD: dg.DagsterRunStatus.FAILURE, **{r: dg.DagsterRunStatus.SUCCESS for r in GOOD}}
        assert [r.status for r in instance.get_runs(filters=dg.RunsFilter(job_name=on_dask.MODEL_JOB))] == [
            dg.DagsterRunStatus.SUCCESS
        ]
        step_pids = {
            e.dagster_event.pid for r in runs for e in instance.all_logs(r.run_id, of_type=dg.DagsterEventType.STEP_START)
        }
        assert step_pids and step_pids <= worker_pids and os.getpid() not in step_pids
    finally:
        instance.dispose()


def test_workers_must_run_the_same_code(dask_cluster, monkeypatch):
    """A cluster whose workers import another version of the project is refused, with the reason."""
    assert on_dask.worker_threads(dask_cluster.scheduler_address) == 2
    monkeypatch.setattr(on_dask, "code_fingerprint", lambda: "not-this-code")  # here only: the workers compute their own
    with pytest.raises(RuntimeError, match="another version of the project"):
        on_dask.worker_threads(dask_cluster.scheduler_address)


def test_an_unreachable_scheduler_is_a_clear_error():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    with pytest.raises(OSError, match=f"Dask scheduler tcp://127.0.0.1:{port}: cannot connect"):
        on_dask.worker_threads(f"tcp://127.0.0.1:{port}", timeout=2)


ONE = "tiny_sparse/single_double_quote/prune_demo/8"


def _gone(pids: set[int], wait_s: float = 30) -> bool:
    """Whether the processes have exited (waiting up to `wait_s` for them: a nanny stops its worker asynchronously)."""
    import time

    import psutil

    deadline = time.monotonic() + wait_s

    def running(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    while any(running(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_a_cluster_started_by_the_executor_runs_a_partition_as_in_process(tiny_store, tmp_path):
    """The Dagster UI's default (no scheduler): the Dask executor starts a LocalCluster of its own for the
    run (here of 1 worker) and stops it after; one run partition's tables equal the in-process run's."""
    from pipeline import definitions
    from pipeline.assets.discovery import refresh_partitions
    from pipeline.assets.tables import VIZ_TABLES
    from pipeline.definitions import PIPELINE_ASSETS
    from pipeline.materialize import judge
    from pipeline.resources import CircuitsResource

    assets = ["viz_data_file", *VIZ_TABLES]  # the run's assets but the recompute (as --no-recompute)

    def resource(data: Path) -> CircuitsResource:
        return CircuitsResource(store_url=str(tiny_store), data=str(data), cache=str(tmp_path / "cache"))

    # In-process: the same assets of the same partition.
    with dg.DagsterInstance.ephemeral() as instance:
        refresh_partitions(instance, resource(tmp_path / "in_process").store(), resource(tmp_path / "in_process").selection(ONE))
        result = dg.materialize(
            PIPELINE_ASSETS,
            selection=dg.AssetSelection.assets(*assets),
            partition_key=ONE,
            resources={"circuits": resource(tmp_path / "in_process")},
            instance=instance,
        )
        assert result.success

    # As in the UI: the store index registers the partitions, then one run of the Dask job is launched with the
    # launchpad's default executor config, a local cluster (`cluster_config()` without a scheduler).
    data = tmp_path / "dask"
    config = {
        "execution": {"config": on_dask.cluster_config(workers=1)},
        "resources": {"circuits": {"config": resource(data).model_dump(exclude_none=True)}},
    }
    assert "local" in config["execution"]["config"]["cluster"]
    instance = pipeline_instance(str(data))  # persistent, as the Dask executor requires
    try:
        refresh_partitions(instance, resource(data).store(), resource(data).selection(ONE))
        with dg.execute_job(
            dg.reconstructable(definitions.dask_run_job),
            instance,
            run_config=config,
            tags={"dagster/partition": ONE},
            asset_selection=[dg.AssetKey(a) for a in assets],
        ) as result:
            assert result.success, judge(result)
            step_pids = {e.pid for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_START}
        assert step_pids and os.getpid() not in step_pids  # the steps ran in the cluster's worker process ...
        assert _gone(step_pids), f"worker processes {step_pids} still running after the run"  # ... stopped with it
    finally:
        instance.dispose()

    expected, got = _frames(tmp_path / "in_process"), _frames(data)
    assert sorted(got) == sorted(expected) and len([k for k in got if k.startswith("nodes/")]) == 1
    for name, frame in expected.items():
        assert_frame_equal(got[name], frame, check_exact=True)
