"""`circuits materialize`: run the pipeline's assets in-process, headless, with progress.

The same asset definitions as `dagster dev` (`pipeline.definitions`), executed with
`dagster.materialize` one partition at a time: the tokenizer, each model's assets, each run's
assets (tables, then the recompute forward passes), then `circuits.duckdb`. A failing partition
(e.g. a corrupt viz_data) is reported with its message and the others still materialize.

Dagster's instance (run history, partitions) lives in `$DAGSTER_HOME` when that is set, else in
`<data>/.dagster` (a temporary instance when the data dir is an object store URL).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
from tqdm import tqdm

from pipeline.assets.discovery import refresh_partitions, store_index
from pipeline.assets.download import tokenizer_files
from pipeline.assets.duckdb_views import circuits_duckdb
from pipeline.assets.recompute import recompute_assets
from pipeline.definitions import MODEL_ASSETS, PIPELINE_ASSETS, RUN_ASSETS
from pipeline.resources import CircuitsResource
from pipeline.tables import is_remote

QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


@dataclass
class MaterializeSummary:
    runs: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    ok: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # partition (or step) -> error message
    duckdb: str | None = None


def pipeline_instance(data_url: str) -> dg.DagsterInstance:
    if os.environ.get("DAGSTER_HOME"):
        return dg.DagsterInstance.get()
    if is_remote(data_url):
        return dg.DagsterInstance.ephemeral(settings={"telemetry": {"enabled": False}})
    home = Path(data_url) / ".dagster"
    home.mkdir(parents=True, exist_ok=True)
    return dg.DagsterInstance.local_temp(tempdir=str(home), overrides={"telemetry": {"enabled": False}})


def failure_message(result: dg.ExecuteInProcessResult) -> str:
    msgs = []
    for ev in result.get_step_failure_events():
        data = ev.step_failure_data
        desc = data.user_failure_data.description if data.user_failure_data else None
        msgs.append(f"{ev.step_key}: {desc or (data.error.message.strip() if data.error else 'failed')}")
    return "; ".join(msgs) or "run failed"


def materialize_store(
    store: str | None = None,
    data: str | None = None,
    select: str | None = None,
    progress: bool = True,
    recompute: bool = True,
    device: str | None = None,
    instance: dg.DagsterInstance | None = None,
    verbose: bool = False,
    cache: str | None = None,
) -> MaterializeSummary:
    """Materialize every asset for every (selected) partition of the store; never raises on a bad partition."""
    resource = CircuitsResource.from_env(store_url=store, data=data, device=device, cache=cache)
    data_url = resource.data_url()
    resource = CircuitsResource.from_env(store_url=resource.store_url, data=data_url, device=device, cache=cache)
    instance = instance or pipeline_instance(data_url)
    resources = {"circuits": resource}
    run_config = None if verbose else QUIET
    summary = MaterializeSummary()

    store_obj = resource.store()
    runs, models = refresh_partitions(instance, store_obj)
    if not runs and not models:
        raise FileNotFoundError(
            f"{resource.store_url}: no models/ or viz/ found: not a circuit store "
            "(set CIRCUITS_STORE or --store, or build the embedded store with `circuits build-store`)"
        )
    summary.runs = [r.run_id for r in runs if not select or select in r.run_id]
    summary.models = sorted({r.model for r in runs if r.run_id in summary.runs} | (set(models) if not select else set()))
    summary.models = [m for m in summary.models if m in models]
    run_assets = RUN_ASSETS if recompute else [a for a in RUN_ASSETS if a not in recompute_assets]

    steps: list[tuple[str, list, str | None]] = [("store index and tokenizer", [store_index, tokenizer_files], None)]
    steps += [(f"model {m}", MODEL_ASSETS, m) for m in summary.models]
    steps += [(f"run {r}", run_assets, r) for r in summary.runs]
    steps += [("circuits.duckdb", [circuits_duckdb], None)]
    bar = tqdm(steps, desc="materialize", unit="step", disable=not progress)
    for label, assets, partition in bar:
        bar.set_postfix_str(label)
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
        if result.success:
            summary.ok.append(label)
        else:
            summary.failed[label] = failure_message(result)
            if progress:
                tqdm.write(f"FAILED {label}: {summary.failed[label]}")
    if "circuits.duckdb" in summary.ok:
        summary.duckdb = data_url.rstrip("/") + "/circuits.duckdb"
    return summary


def materialize_cli(args) -> int:
    try:
        s = materialize_store(
            store=args.store,
            data=args.data,
            select=args.select,
            recompute=not getattr(args, "no_recompute", False),
            device=getattr(args, "device", None),
            verbose=getattr(args, "verbose", False),
        )
    except FileNotFoundError as e:
        print(f"circuits materialize: {e}")
        return 2
    print(f"{len(s.runs)} circuits of {len(s.models)} models: {len(s.ok)} steps ok, {len(s.failed)} failed")
    if getattr(args, "no_recompute", False):
        print("recompute skipped (--no-recompute): no ablations, recomputed_activations, recompute_summary written")
    for label, msg in s.failed.items():
        print(f"  FAILED {label}: {msg}")
    if s.duckdb:
        print(f"tables and views: {s.duckdb}")
    return 1 if s.failed else 0
