"""`circuits materialize`: run the pipeline's assets headless, with progress, in-process or on Dask.

The same asset definitions as `dagster dev` (`pipeline.definitions`), executed with
`dagster.materialize` one partition at a time: the tokenizer, each model's assets, each run's
assets (tables, then the recompute forward passes), then `circuits.duckdb`. A failing partition
(e.g. a corrupt viz_data) is reported with its message and the others still materialize. With the
Dask executor the model and run partitions run as Dagster runs on a Dask cluster instead
(`pipeline.on_dask`), the rest here.

Dagster's instance (run history, partitions) lives in `$DAGSTER_HOME` when that is set, else in
`<local dir>/.dagster`: the data dir, or for object-store data `settings.local_dir` (CIRCUITS_DB_DIR,
else a directory under the cache), so that it is persistent, as Dask needs. That directory
is created whole or not at all (built beside it, then renamed), an instance that fails to open
is migrated and, failing that, set aside and recreated (it holds only run history; the tables
are the data). One `circuits materialize` at a time per data dir: a second one waits for the
lock file `<local dir>/.dagster.lock`. An error of the instance itself (a full disk, say) fails the
step it happened in, with its message, not the process.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
from tqdm import tqdm

from inference import settings as env_settings
from pipeline import settings
from pipeline.assets.discovery import StoreWalkWarning, refresh_partitions, store_index
from pipeline.assets.download import model_checkpoint, tokenizer_files
from pipeline.assets.duckdb_views import circuits_duckdb
from pipeline.assets.recompute import recompute_assets
from pipeline.definitions import MODEL_ASSETS, PIPELINE_ASSETS, RUN_ASSETS
from pipeline.log_capture import restore_sigterm
from pipeline.resources import CircuitsResource
from pipeline.settings import is_url

QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


@dataclass
class MaterializeSummary:
    runs: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    ok: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # partition (or step) -> error message
    skipped: list[str] = field(default_factory=list)  # store entries the walk could not use, with why
    duckdb: str | None = None


INSTANCE_DIR = ".dagster"
LOCK_FILE = ".dagster.lock"
_TELEMETRY_OFF = {"telemetry": {"enabled": False}}


def _open_instance(home: Path) -> dg.DagsterInstance:
    return dg.DagsterInstance.local_temp(tempdir=str(home), overrides=_TELEMETRY_OFF)


def _probe(instance: dg.DagsterInstance) -> None:
    """Touch every storage the pipeline uses, so a half-created or outdated database fails here."""
    instance.get_dynamic_partitions("circuit_runs")
    instance.get_runs(limit=1)
    instance.all_instigator_state()


def _create_instance_dir(home: Path) -> None:
    """Create `home` with fully initialised databases, atomically: built in a sibling temp dir and
    renamed, so a kill mid-creation leaves only a `.dagster.new-*` leftover, never a broken `home`."""
    tmp = Path(tempfile.mkdtemp(prefix=f"{home.name}.new-", dir=home.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # as mkdir would (mkdtemp makes it private)
    try:
        instance = _open_instance(tmp)
        try:
            _probe(instance)
        finally:
            instance.dispose()
        try:
            os.rename(tmp, home)
        except OSError:  # created meanwhile by another process: use theirs
            if not home.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pipeline_instance(data_url: str, local_dir: str | None = None) -> dg.DagsterInstance:
    """The Dagster instance of a data dir (see the module doc), created or repaired as needed.

    It lives in the data's local dir (`settings.local_dir`: the data dir itself, or for object-store
    data a local directory), so it is persistent, as Dask workers need to record their steps."""
    if env_settings.dagster_home():
        return dg.DagsterInstance.get()
    home = Path(local_dir or settings.local_dir(data_url)) / INSTANCE_DIR
    home.parent.mkdir(parents=True, exist_ok=True)
    for leftover in home.parent.glob(f"{INSTANCE_DIR}.new-*"):  # from a creation that was killed
        if time.time() - leftover.stat().st_mtime > 3600:
            shutil.rmtree(leftover, ignore_errors=True)
    if not home.exists():
        _create_instance_dir(home)
    instance = None
    try:
        instance = _open_instance(home)
        _probe(instance)
        return instance
    except Exception as first:  # noqa: BLE001 - any database problem: migrate, else recreate
        try:
            if instance is None:
                raise
            instance.upgrade()  # what `dagster instance migrate` does
            _probe(instance)
            return instance
        except Exception:  # noqa: BLE001
            if instance is not None:
                instance.dispose()
        aside = home.with_name(f"{INSTANCE_DIR}.broken-{time.strftime('%Y%m%dT%H%M%S')}")
        os.rename(home, aside)
        warnings.warn(
            f"{home}: the Dagster instance could not be opened or migrated ({type(first).__name__}: "
            f"{str(first).strip().splitlines()[0] if str(first).strip() else ''}); moved it to {aside.name} "
            "and created a new one (it held only run history; the tables are unaffected)",
            stacklevel=2,
        )
        _create_instance_dir(home)
        instance = _open_instance(home)
        _probe(instance)
        return instance


@contextlib.contextmanager
def data_dir_lock(data_url: str, progress: bool = True, local_dir: str | None = None):
    """Hold `<local dir>/.dagster.lock` (an flock, released when the process dies): one materialize per
    data dir at a time; a second one waits. For object-store data the lock is in the local dir, so
    it guards against a second run on this machine only."""
    path = Path(local_dir or settings.local_dir(data_url)) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"waiting for another `circuits materialize` on {data_url} (lock {path})", file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _innermost(error) -> str:
    """The message of the root cause of a Dagster SerializableErrorInfo chain: the user's
    exception (`FileNotFoundError: ...`), not Dagster's `Error occurred while executing op`."""
    while error.cause is not None:
        error = error.cause
    return (error.message or error.cls_name or "failed").strip()


def failure_message(result: dg.ExecuteInProcessResult) -> str:
    msgs = []
    for ev in result.get_step_failure_events():
        data = ev.step_failure_data
        desc = data.user_failure_data.description if data.user_failure_data else None
        msgs.append(f"{ev.step_key}: {desc or (_innermost(data.error) if data.error else 'failed')}")
    return "; ".join(msgs) or "run failed"


def failed_checks(result: dg.ExecuteInProcessResult) -> str:
    """The ERROR-severity asset checks that did not pass (WARN ones are findings, not failures)."""
    bad = [
        f"check {ev.check_name} of {ev.asset_key.to_user_string()} failed"
        + (f" ({ev.metadata['bad_columns'].value})" if "bad_columns" in ev.metadata else "")
        for ev in result.get_asset_check_evaluations()
        if not ev.passed and ev.severity == dg.AssetCheckSeverity.ERROR
    ]
    return "; ".join(bad)


def materialize_store(
    store: str | None = None,
    data: str | None = None,
    select: str | None = None,
    progress: bool = True,
    recompute: bool = True,
    device: str | None = None,
    ablation_budget: int | None = None,
    instance: dg.DagsterInstance | None = None,
    verbose: bool = False,
    cache: str | None = None,
    models=None,
    tasks=None,
    sweeps=None,
    ks=None,
    executor: str | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
) -> MaterializeSummary:
    """Materialize every asset for every selected partition of the store; never raises on a bad partition.

    The selection: `models`, `tasks`, `sweeps`, `ks` (names, patterns or comma lists; None: from
    CIRCUITS_MODELS etc.) and `select` (run ids containing this text). Only the selected circuits
    and their models are fetched.

    `executor`: "in_process" (one partition at a time here) or "dask" (the model and run partitions
    as Dagster runs on a Dask cluster, `pipeline.on_dask`: the scheduler at `scheduler`, else a
    local cluster of `workers` processes); None: CIRCUITS_EXECUTOR.

    `ablation_budget`: node-tokens of ablation work per mode before the recompute samples task
    pairs (0: every pair); None: CIRCUITS_ABLATION_BUDGET."""
    restore_sigterm()  # the Dask workers and run processes started below inherit it (pipeline.log_capture)
    chosen = dict(models=models, tasks=tasks, sweeps=sweeps, ks=ks, ablation_budget=ablation_budget)
    resource = CircuitsResource.from_env(store_url=store, data=data, device=device, cache=cache, **chosen)
    data_url = resource.data_url()
    resource = CircuitsResource.from_env(store_url=resource.store_url, data=data_url, device=device, cache=cache, **chosen)
    if executor is None:
        executor = settings.executor()
    if executor not in settings.EXECUTORS:
        raise ValueError(f"executor {executor!r}: expected one of {', '.join(settings.EXECUTORS)}")
    dask = {"scheduler": scheduler, "workers": workers} if executor == "dask" else None
    local = resource.local_dir()
    with data_dir_lock(data_url, progress, local):
        instance = instance or pipeline_instance(data_url, local)
        return _materialize(resource, data_url, select, progress, recompute, instance, verbose, dask)


def _remove_stale_temp_files(data_url: str, min_age_s: float = 3600) -> None:
    """Temp files of writes a kill interrupted (`tables/<t>/.<name>.<hex>.tmp`; never read, since
    readers glob `*.parquet`): removed once old enough not to belong to a live writer."""
    if is_url(data_url):
        return
    now = time.time()
    for tmp in Path(data_url).glob("tables/*/.*.tmp"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > min_age_s:
                tmp.unlink()


def _discover(resource, instance, select, summary: MaterializeSummary, progress: bool):
    """(runs, models) of the selection, added as partitions to the instance; None (the problem in
    `summary.failed`) when the store or the instance cannot be read. A store with nothing selected
    is a FileNotFoundError naming it."""
    selection = resource.selection(select)
    store = resource.store()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", StoreWalkWarning)
            runs, models = refresh_partitions(instance, store, selection)
        for w in caught:
            if issubclass(w.category, StoreWalkWarning):
                summary.skipped.append(str(w.message))
                if progress:
                    tqdm.write(f"WARNING {w.message}")
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - an unreadable store or a failing instance: report, don't crash
        summary.failed["store index"] = f"{type(e).__name__}: {e}"
        return None
    if not runs and not models:
        if selection:
            raise FileNotFoundError(
                f"{resource.store_url}: nothing matches the selection ({selection.describe()}); `circuits ls` shows what the store holds"
            )
        raise FileNotFoundError(
            f"{resource.store_url}: no models/ or viz/ found: not a circuit store "
            "(set CIRCUITS_STORE or --store, or build the embedded store with `circuits build-store`)"
        )
    return runs, models


def _steps(summary: MaterializeSummary, recompute: bool) -> list[tuple[str, list, str | None]]:
    """(label, assets, partition) in order: the store index, each model, each run, the views."""
    run_assets = RUN_ASSETS if recompute else [a for a in RUN_ASSETS if a not in recompute_assets]
    steps: list[tuple[str, list, str | None]] = [("store index and tokenizer", [store_index, tokenizer_files], None)]
    # Without recompute nothing needs the whole checkpoint: the model tables read their few tensors
    # by ranged reads (`read_tensor`), so the checkpoint download (~1.9 GB for csp_yolo2) is skipped.
    model_assets = MODEL_ASSETS if recompute else [a for a in MODEL_ASSETS if a is not model_checkpoint]
    steps += [(f"model {m}", model_assets, m) for m in summary.models]
    steps += [(f"run {r}", run_assets, r) for r in summary.runs]
    steps += [("circuits.duckdb", [circuits_duckdb], None)]
    return steps


def _materialize(resource, data_url, select, progress, recompute, instance, verbose, dask=None) -> MaterializeSummary:
    _remove_stale_temp_files(data_url)
    resources = {"circuits": resource}
    run_config = None if verbose else QUIET
    summary = MaterializeSummary()

    found = _discover(resource, instance, select, summary, progress)
    if found is None:
        return summary
    summary.runs = [r.run_id for r in found[0]]
    summary.models = list(found[1])
    steps = _steps(summary, recompute)
    bar = tqdm(total=len(steps), desc="materialize", unit="step", disable=not progress)

    def done(label: str, problem: str) -> None:
        if problem:
            summary.failed[label] = problem
            if progress:
                tqdm.write(f"FAILED {label}: {problem}")
        else:
            summary.ok.append(label)
        bar.update()

    def in_process(label: str, assets: list, partition: str | None) -> None:
        bar.set_postfix_str(label)
        try:
            result = dg.materialize(
                PIPELINE_ASSETS,
                selection=dg.AssetSelection.assets(*assets),
                partition_key=partition,
                resources=resources,
                instance=instance,
                raise_on_error=False,
                run_config=run_config,
                tags={"circuits/step": label[:63]},
            )
        except Exception as e:  # noqa: BLE001 - the instance itself failed (disk full, locked database)
            done(label, f"Dagster instance error ({instance.root_directory or 'in memory'}): {type(e).__name__}: {e}")
        else:
            done(label, judge(result))

    if dask is None:
        for step in steps:
            in_process(*step)
    else:  # the partitions on the cluster (pipeline.on_dask); the store index before, the views after, here
        from pipeline import on_dask

        in_process(*steps[0])
        with on_dask.cluster(dask.get("scheduler"), dask.get("workers")) as address:
            slots = on_dask.worker_threads(address)
            config = on_dask.run_config(address, resource, run_config)
            with on_dask.PartitionRunner(instance, config, slots) as runner:
                # the models first: a run's recompute reads its model's checkpoint
                for job, kind in ((on_dask.MODEL_JOB, "model "), (on_dask.RUN_JOB, "run ")):
                    parts = [
                        (label, p, [k for a in assets for k in a.keys])
                        for label, assets, p in steps[1:-1]
                        if label.startswith(kind)
                    ]
                    bar.set_postfix_str(f"{len(parts)} {kind}partitions on {slots} Dask worker threads ({address})")
                    runner.run(job, parts, judge, done)
        in_process(*steps[-1])
    bar.close()
    if "circuits.duckdb" in summary.ok:
        summary.duckdb = os.path.join(resource.local_dir(), "circuits.duckdb")
    return summary


def judge(result: dg.ExecutionResult) -> str:
    """A run's problem: its failed steps, else its failed ERROR checks; '' when it succeeded."""
    return failure_message(result) if not result.success else failed_checks(result)


def materialize_cli(args) -> int:
    try:
        s = materialize_store(
            store=args.store,
            data=args.data,
            select=args.select,
            models=getattr(args, "model", None),
            tasks=getattr(args, "task", None),
            sweeps=getattr(args, "sweep", None),
            ks=getattr(args, "k", None),
            recompute=not getattr(args, "no_recompute", False),
            device=getattr(args, "device", None),
            ablation_budget=getattr(args, "ablation_budget", None),
            verbose=getattr(args, "verbose", False),
            # --scheduler or --workers alone mean Dask
            executor=getattr(args, "executor", None)
            or ("dask" if getattr(args, "scheduler", None) or getattr(args, "workers", None) else None),
            scheduler=getattr(args, "scheduler", None),
            workers=getattr(args, "workers", None),
        )
    except FileNotFoundError as e:
        print(f"circuits materialize: {e}")
        return 2
    except Exception as e:  # noqa: BLE001 - e.g. the instance cannot be created (disk full): one clear line
        print(f"circuits materialize: {type(e).__name__}: {e}")
        return 2
    print(f"{len(s.runs)} circuits of {len(s.models)} models: {len(s.ok)} steps ok, {len(s.failed)} failed")
    for msg in s.skipped:
        print(f"  SKIPPED {msg}")
    if getattr(args, "no_recompute", False):
        print(
            "recompute skipped (--no-recompute): no ablations, recomputed_activations, recompute_summary written; checkpoints not downloaded (model tables read their tensors by ranged reads)"
        )
    for label, msg in s.failed.items():
        print(f"  FAILED {label}: {msg}")
    if s.duckdb:
        print(f"tables and views: {s.duckdb}")
    return 1 if s.failed else 0
