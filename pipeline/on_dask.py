"""Run partitions on a Dask cluster through Dagster's Dask executor (`dagster-dask`).

Two jobs of the Definitions use the `dask` executor: `run_partitions_dask` (one circuit run's
assets: viz_data download, the run tables, the recompute tables) and `model_partitions_dask` (one
model's). Each Dagster run is one partition; its steps are Dask tasks, executed by whichever worker
is free. `circuits materialize --executor dask` launches one such run per partition, as many at a
time as the cluster has worker threads, from threads of this process (which only wait on the
cluster and record events), and the store index, the tokenizer and `circuits.duckdb` in-process
before and after. A partition that fails (on any worker) fails its own run only.

What the workers need: the project importable (same code, same Python packages), one thread each
(`dask worker --nthreads 1`; Dagster's step execution is not thread-safe), the store and the data
dir reachable under the same URLs (object storage, or a shared filesystem), the credentials of those
in their environment, and the Dagster instance: the driver passes its reference (`InstanceRef`) to
every step, so a SQLite instance (the default, in the data's local dir) works for workers on the
same host; workers on other hosts need an instance they can reach (`DAGSTER_HOME` with a
`dagster.yaml` whose storage is Postgres). No values move between steps through an IO manager:
every asset writes its own Parquet files and returns metadata only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed

import dagster as dg

from pipeline import settings
from pipeline.assets.discovery import MODEL_ASSET_KEYS, MODELS, RUN_ASSET_KEYS, RUNS

RUN_JOB = "run_partitions_dask"
MODEL_JOB = "model_partitions_dask"


def cluster_config(scheduler: str | None = None, workers: int | None = None) -> dict:
    """The Dask executor's config: an existing scheduler (argument, else CIRCUITS_DASK_SCHEDULER), else a
    local cluster of `workers` (else CIRCUITS_DASK_WORKERS) processes of one thread each."""
    address = scheduler or settings.dask_scheduler()
    if address:
        return {"cluster": {"existing": {"address": address}}}
    return {"cluster": {"local": {"n_workers": workers or settings.dask_workers(), "threads_per_worker": 1}}}


def dask_executor(scheduler: str | None = None, workers: int | None = None) -> dg.ExecutorDefinition:
    """dagster-dask's executor with `cluster_config` as its configured default (editable in the launchpad)."""
    from dagster_dask import dask_executor as executor

    return executor.configured(cluster_config(scheduler, workers), name="dask")


def dask_jobs() -> list:
    """The two partition jobs on the Dask executor; their executor config in the launchpad defaults to
    `cluster_config()` (the environment's scheduler, or a local cluster)."""
    from dagster_dask import dask_executor as executor

    config = {"execution": {"config": cluster_config()}}
    return [
        dg.define_asset_job(RUN_JOB, selection=dg.AssetSelection.assets(*RUN_ASSET_KEYS), partitions_def=RUNS,
                            executor_def=executor, config=config,
                            description="One circuit run's assets, each step a task on a Dask cluster"),
        dg.define_asset_job(MODEL_JOB, selection=dg.AssetSelection.assets(*MODEL_ASSET_KEYS), partitions_def=MODELS,
                            executor_def=executor, config=config,
                            description="One model's assets, each step a task on a Dask cluster"),
    ]  # fmt: skip


@contextlib.contextmanager
def cluster(scheduler: str | None = None, workers: int | None = None) -> Iterator[str]:
    """The address of the scheduler to use: `scheduler` (else CIRCUITS_DASK_SCHEDULER) as given, or a
    `LocalCluster` of `workers` processes (one thread each) started here and closed on exit."""
    address = scheduler or settings.dask_scheduler()
    if address:
        yield address
        return
    from dask.distributed import LocalCluster

    # processes, not threads: Dagster's step execution is not thread-safe, and torch holds the GIL.
    with LocalCluster(n_workers=workers or settings.dask_workers(), threads_per_worker=1, processes=True,
                      dashboard_address=None) as local:  # fmt: skip
        yield local.scheduler_address


def worker_threads(address: str, timeout: float = 60) -> int:
    """How many tasks the cluster runs at once (its workers' threads); waits for a first worker."""
    from dask.distributed import Client

    with Client(address, timeout=timeout) as client:
        client.wait_for_workers(1, timeout=timeout)
        return sum(w["nthreads"] for w in client.scheduler_info()["workers"].values())


def run_config(address: str, resource, extra: dict | None = None) -> dict:
    """Run config of one partition run: the cluster, and the driver's `circuits` resource settings
    (so the workers use the driver's store, data dir and options, whatever their own environment)."""
    fields = {f: getattr(resource, f) for f in type(resource).model_fields if getattr(resource, f) is not None}
    return {
        "execution": {"config": {"cluster": {"existing": {"address": address}}}},
        "resources": {"circuits": {"config": fields}},
        **(extra or {}),
    }


def run_partitions(
    job: str,
    partitions: list[tuple[str, str, list[dg.AssetKey]]],
    instance: dg.DagsterInstance,
    config: dict,
    slots: int,
    judge: Callable[[dg.ExecutionResult], str],
    done: Callable[[str, str], None],
) -> None:
    """Execute `partitions` ((label, partition key, asset keys) each) as runs of `job`, `slots` at a time.

    `judge(result)` gives a run's problem ('' if none); `done(label, problem)` is called in this
    thread as each run ends. An error of one run (of the instance, the cluster) is that run's problem."""
    from pipeline import definitions

    recon = dg.reconstructable(definitions.dask_run_job if job == RUN_JOB else definitions.dask_model_job)

    def one(label: str, key: str, assets: list[dg.AssetKey]) -> str:
        result = dg.execute_job(
            recon,
            instance,
            run_config=config,
            tags={"dagster/partition": key, "circuits/step": label[:63]},
            asset_selection=list(assets),
        )
        return judge(result)

    with ThreadPoolExecutor(max_workers=max(1, slots), thread_name_prefix="circuits-dask") as pool:
        futures = {pool.submit(one, *p): p[0] for p in partitions}
        for future in as_completed(futures):
            label = futures[future]
            try:
                problem = future.result()
            except Exception as e:  # noqa: BLE001 - the run could not even be executed: its problem only
                problem = f"{type(e).__name__}: {e}"
            done(label, problem)
