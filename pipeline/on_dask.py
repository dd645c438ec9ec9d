"""Run partitions on a Dask cluster through Dagster's Dask executor (`dagster-dask`).

Two jobs of the Definitions use the `dask` executor: `run_partitions_dask` (one circuit run's
assets: viz_data download, the run tables, the recompute tables) and `model_partitions_dask` (one
model's). Each Dagster run is one partition; its steps are Dask tasks, executed by whichever worker
is free. `circuits materialize --executor dask` launches one such run per partition, as many at a
time as the cluster has worker threads (`PartitionRunner`: each run orchestrated by a process of a
small local pool, which only submits steps and records events), and the store index, the tokenizer
and `circuits.duckdb` in-process before and after. A partition that fails (on any worker) fails its
own run only. The executor is dagster-dask's, with two fixes for partitioned runs (see
`PartitionSafeDaskExecutor` below).

What the workers need: the project importable, the same version as the driver's (`worker_threads`
checks a fingerprint of the sources and refuses other code; a `LocalCluster`'s workers are spawned
with this interpreter's `sys.path`, remote ones need the project installed), one thread each
(`dask worker --nthreads 1`; Dagster's step execution is not thread-safe), the store and the data
dir reachable under the same URLs (object storage, or a shared filesystem), the credentials of
those in their environment, and the Dagster instance: the driver passes its reference
(`InstanceRef`) to every step, so a SQLite instance (the default, in the data's local dir) works
for workers on the same host; workers on other hosts need an instance they can reach
(`DAGSTER_HOME` with a `dagster.yaml` whose storage is Postgres). No values move between steps
through an IO manager: every asset writes its own Parquet files and returns metadata only.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed

import dagster as dg

from pipeline import settings
from pipeline.assets.discovery import MODEL_ASSET_KEYS, RUN_ASSET_KEYS
from pipeline.log_capture import dask_worker_plugin

RUN_JOB = "run_partitions_dask"
MODEL_JOB = "model_partitions_dask"


def cluster_config(scheduler: str | None = None, workers: int | None = None) -> dict:
    """The Dask executor's config: an existing scheduler (argument, else CIRCUITS_DASK_SCHEDULER), else a
    local cluster of `workers` (else CIRCUITS_DASK_WORKERS) processes of one thread each."""
    address = scheduler or settings.dask_scheduler()
    if address:
        return {"cluster": {"existing": {"address": address}}}
    # dashboard on a free port: the default 8787 may be taken by another cluster on the host
    return {
        "cluster": {
            "local": {"n_workers": workers or settings.dask_workers(), "threads_per_worker": 1, "dashboard_address": ":0"}
        }
    }


# ---- dagster-dask's executor, made safe for partitioned runs ----------------------------------------
#
# `dagster_dask.DaskExecutor.execute` (dagster-dask 0.29) has two problems for this pipeline, both fixed
# here by overriding that one method; the config schema, the cluster kinds, the per-step worker function
# (`query_on_dask_worker`) and the resource-requirement tags are dagster-dask's own:
# 1. It passes the DagsterRun to `client.submit` as a plain argument. Dask (>= 2024.12, the task spec)
#    walks tuple arguments looking for futures, and a run of a dynamic partition holds a
#    `KeyRangesPartitionsSubset`, a Dagster `@record` that forbids iteration: every partitioned run
#    failed before its first step ("Iteration is not allowed on `@record` KeyRangesPartitionsSubset").
#    The arguments now travel in an opaque holder (`_Carried`); only the upstream futures stay visible
#    to Dask, which orders the steps by them.
# 2. It names each Dask task `<job>.<step>`, so two runs of the same job at once (two partitions)
#    share task keys and Dask hands the second run the first one's results without executing it
#    (dagster-io/dagster#21418). Keys now include the run id.


class _Carried:
    """Arguments Dask must ship to the worker but not look into (see above). Not a tuple, list or dict,
    so `dask._task_spec.parse_input` leaves it whole; pickled by Dask like any argument."""

    __slots__ = ("args",)

    def __init__(self, *args) -> None:
        self.args = args

    def __reduce__(self):
        return (_Carried, self.args)


def _step_on_worker(dependencies: list, carried: _Carried) -> _Carried:
    """One step on a Dask worker: dagster-dask's own worker function. `dependencies` (the upstream
    steps' results) are only there so that Dask runs this task after them. The step's events go back
    carried too (Dask's `sizeof` cannot measure a list of Dagster records and warns on each)."""
    from dagster_dask.executor import query_on_dask_worker

    return _Carried(*query_on_dask_worker(dependencies, *carried.args))


# The cluster kinds of dagster-dask's config schema: the class each one starts (as dagster-dask does).
_CLUSTER_CLASSES = {
    "local": ("dask.distributed", "LocalCluster"), "ssh": ("dask.distributed", "SSHCluster"),
    "yarn": ("dask_yarn", "YarnCluster"), "pbs": ("dask_jobqueue", "PBSCluster"), "moab": ("dask_jobqueue", "MoabCluster"),
    "sge": ("dask_jobqueue", "SGECluster"), "lsf": ("dask_jobqueue", "LSFCluster"), "slurm": ("dask_jobqueue", "SLURMCluster"),
    "oar": ("dask_jobqueue", "OARCluster"), "kube": ("dask_kubernetes", "KubeCluster"),
}  # fmt: skip


def _executor_class():
    import importlib

    import dask.distributed
    from dagster import _check as check
    from dagster._core.errors import raise_execution_interrupts
    from dagster._core.events import DagsterEvent
    from dagster._utils import iterate_with_context
    from dagster_dask.executor import DaskExecutor, get_dask_resource_requirements

    class PartitionSafeDaskExecutor(DaskExecutor):
        """dagster-dask's `DaskExecutor` with the two fixes above; otherwise the same execution."""

        def execute(self, plan_context, execution_plan):
            check.invariant(plan_context.instance.is_persistent, "Dask execution requires a persistent DagsterInstance")
            job_name, run = plan_context.job_name, plan_context.dagster_run
            if self.cluster_type == "existing":
                cluster, started = self.cluster_configuration["address"], None
            elif self.cluster_type in _CLUSTER_CLASSES:
                module, name = _CLUSTER_CLASSES[self.cluster_type]
                cluster = started = getattr(importlib.import_module(module), name)(**self.build_dict(job_name))
            else:
                raise ValueError(
                    f"Dask cluster kind {self.cluster_type!r}: expected existing or one of {', '.join(_CLUSTER_CLASSES)}"
                )
            try:
                with dask.distributed.Client(cluster) as client:
                    client.register_plugin(dask_worker_plugin())  # workers' steps stop their log tails (log_capture)
                    futures: dict[str, object] = {}
                    for level in execution_plan.get_steps_to_execute_by_level():
                        for step in level:
                            upstream = [futures[k] for step_input in step.step_inputs for k in step_input.dependency_keys]
                            carried = _Carried(plan_context.reconstructable_job, run, plan_context.run_config, [step.key],
                                               plan_context.instance.get_ref(), execution_plan.known_state)  # fmt: skip
                            futures[step.key] = client.submit(
                                _step_on_worker, upstream, carried,
                                key=f"{job_name}.{run.run_id}.{step.key}",  # unique per run (fix 2)
                                resources=get_dask_resource_requirements(step.tags),
                            )  # fmt: skip
                    done = dask.distributed.as_completed(list(futures.values()), with_results=True)
                    for _future, events in iterate_with_context(raise_execution_interrupts, done):
                        for event in events.args:
                            yield check.inst(event, DagsterEvent)
            finally:
                if started is not None:
                    started.close()

    return PartitionSafeDaskExecutor


def _make_executor(init_context):
    ((kind, config),) = init_context.executor_config["cluster"].items()
    return _executor_class()(kind, config)


def base_executor() -> dg.ExecutorDefinition:
    """The Dask executor: dagster-dask's name, config schema and requirements, with the fixed `execute`."""
    from dagster_dask import dask_executor as upstream

    return dg.ExecutorDefinition(
        name="dask", config_schema=upstream.config_schema, executor_creation_fn=_make_executor,
        requirements=dg.multiple_process_executor_requirements(), description="dagster-dask's Dask executor (pipeline.on_dask: safe for partitioned runs)",
    )  # fmt: skip


def dask_executor(scheduler: str | None = None, workers: int | None = None) -> dg.ExecutorDefinition:
    """The Dask executor with `cluster_config` as its configured default (editable in the launchpad)."""
    return base_executor().configured(cluster_config(scheduler, workers), name="dask")


def dask_jobs() -> list:
    """The two partition jobs on the Dask executor; their executor config in the launchpad defaults to
    `cluster_config()` (the environment's scheduler, or a local cluster)."""
    executor = base_executor()
    config = {"execution": {"config": cluster_config()}}
    return [
        dg.define_asset_job(RUN_JOB, selection=dg.AssetSelection.assets(*RUN_ASSET_KEYS),
                            executor_def=executor, config=config,
                            description="One circuit run's assets, each step a task on a Dask cluster"),
        dg.define_asset_job(MODEL_JOB, selection=dg.AssetSelection.assets(*MODEL_ASSET_KEYS),
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
                      dashboard_address=":0") as local:  # fmt: skip
        yield local.scheduler_address


def code_fingerprint() -> str:
    """A digest of this project's Python sources (`pipeline`, `inference`) as imported here: equal on
    the driver and the workers when they run the same version of the code."""
    import hashlib
    import importlib
    from pathlib import Path

    digest = hashlib.sha256()
    for package in ("pipeline", "inference"):
        root = Path(importlib.import_module(package).__file__).parent
        for path in sorted(root.rglob("*.py")):
            digest.update(path.relative_to(root.parent).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _worker_code() -> str:
    """On a worker: the fingerprint of the project it imports (an ImportError if it cannot)."""
    return code_fingerprint()


def worker_threads(address: str, timeout: float = 60) -> int:
    """How many tasks the cluster runs at once (its workers' threads), after checking the workers: they
    must import this project, the same version as here (else their tables would come from other code),
    and should run one thread each. Waits up to `timeout` s for a first worker."""
    from dask.distributed import Client

    try:
        client = Client(address, timeout=timeout)
    except OSError as e:
        raise OSError(f"Dask scheduler {address}: cannot connect ({type(e).__name__}: {e})") from e
    with client:
        try:
            client.wait_for_workers(1, timeout=timeout)
        except TimeoutError as e:
            raise OSError(f"Dask scheduler {address}: no worker joined within {timeout:g} s") from e
        try:
            theirs = client.run(_worker_code)
        except ImportError as e:
            raise ImportError(
                f"Dask workers of {address} cannot import the project ({e}): install it on the workers, or set PYTHONPATH in their environment"
            ) from e
        mine = code_fingerprint()
        stale = sorted(w for w, fp in theirs.items() if fp != mine)
        if stale:
            raise RuntimeError(
                f"Dask workers {', '.join(stale)} of {address} run another version of the project's code (fingerprint {theirs[stale[0]]}, here {mine}): update them"
            )
        workers = client.scheduler_info(n_workers=-1)["workers"]
        many = [w for w, info in workers.items() if info["nthreads"] > 1]
        if many:
            warnings.warn(
                f"Dask workers {', '.join(sorted(many))} run several threads; Dagster's step execution is not thread-safe: start them with `--nthreads 1`",
                stacklevel=2,
            )
        return sum(info["nthreads"] for info in workers.values())


def run_config(address: str, resource, extra: dict | None = None) -> dict:
    """Run config of one partition run: the cluster, and the driver's `circuits` resource settings
    (so the workers use the driver's store, data dir and options, whatever their own environment)."""
    fields = {f: getattr(resource, f) for f in type(resource).model_fields if getattr(resource, f) is not None}
    return {
        "execution": {"config": {"cluster": {"existing": {"address": address}}}},
        "resources": {"circuits": {"config": fields}},
        **(extra or {}),
    }


def _run_one(job: str, label: str, key: str, assets: list[str], instance_ref, config: dict, judge) -> str:
    """One partition as one run of `job` on the cluster (in a process of the driver's pool); its problem."""
    from pipeline import definitions

    recon = dg.reconstructable(definitions.dask_run_job if job == RUN_JOB else definitions.dask_model_job)
    with dg.DagsterInstance.from_ref(instance_ref) as instance:
        with dg.execute_job(
            recon,
            instance,
            run_config=config,
            tags={"dagster/partition": key, "circuits/step": label[:63]},
            asset_selection=[dg.AssetKey.from_user_string(a) for a in assets],
        ) as result:
            return judge(result)


class PartitionRunner:
    """Runs partitions as Dagster runs of the Dask jobs, `slots` at a time (a context manager).

    Each run is orchestrated by a process of a pool here (it submits the run's steps to the cluster and
    records their events), not by a thread: Dagster sets up every run's logging with
    `logging.config.dictConfig`, which closes the handlers other threads are writing through, and
    two runs in threads of one process deadlocked on the logging locks (and with them the local
    cluster's scheduler, whose event loop logs too). The pool's processes are spawned (a fresh
    interpreter, not a fork of this one and its threads) once, and serve every job."""

    def __init__(self, instance: dg.DagsterInstance, config: dict, slots: int) -> None:
        if not instance.is_persistent:
            raise ValueError("the Dask executor needs a persistent Dagster instance (the workers record their steps in it)")
        self.ref, self.config, self.slots = instance.get_ref(), config, max(1, slots)
        self.pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> PartitionRunner:
        import multiprocessing

        self.pool = ProcessPoolExecutor(max_workers=self.slots, mp_context=multiprocessing.get_context("spawn"))
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def run(
        self,
        job: str,
        partitions: list[tuple[str, str, list[dg.AssetKey]]],
        judge: Callable[[dg.ExecutionResult], str],
        done: Callable[[str, str], None],
    ) -> None:
        """Execute `partitions` ((label, partition key, asset keys) each) as runs of `job`; returns when all ended.

        `judge(result)` gives a run's problem ('' if none; a module-level function: it is sent to the
        pool); `done(label, problem)` is called in this thread as each run ends. An error of one run (of
        the instance, the cluster, its process) is that run's problem only."""
        futures = {
            self.pool.submit(_run_one, job, label, key, [a.to_user_string() for a in assets], self.ref, self.config, judge): label
            for label, key, assets in partitions
        }
        for future in as_completed(futures):
            label = futures[future]
            try:
                problem = future.result()
            except Exception as e:  # noqa: BLE001 - the run could not even be executed: its problem only
                problem = f"{type(e).__name__}: {e}"
            done(label, problem)
