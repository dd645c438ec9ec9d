"""The Dagster Definitions: assets, checks, resources, jobs and the discovery sensor.

`dagster dev` finds this module through `[tool.dagster] module_name` in pyproject.toml (run it from
the project root). Settings come from the CIRCUITS_* variables (`pipeline.resources`).
`circuits materialize` runs the same assets in-process (`pipeline.materialize`), or on a Dask
cluster (`--executor dask`, `pipeline.on_dask`) through the jobs `run_partitions_dask` and
`model_partitions_dask`. With `CIRCUITS_EXECUTOR=dask` every job of these Definitions (the sensor's
too) runs on Dask: the scheduler at `CIRCUITS_DASK_SCHEDULER`, else a local cluster per run.
"""

from __future__ import annotations

import dagster as dg

from pipeline.assets.demo_store import demo_store_assets
from pipeline.assets.discovery import discover_circuits, model_tables_job, run_tables_job, store_index
from pipeline.assets.download import download_assets, model_checkpoint, train_curve_file, viz_data_file
from pipeline.assets.duckdb_views import duckdb_assets
from pipeline.assets.recompute import recompute_assets
from pipeline.assets.tables import embeddings, run_tables, table_assets, train_curves, vocab
from pipeline.log_capture import restore_sigterm
from pipeline.on_dask import MODEL_JOB, RUN_JOB, dask_executor, dask_jobs
from pipeline.resources import CircuitsResource
from pipeline.settings import executor

# Assets of one run partition, of one model partition, and the unpartitioned ones.
RUN_ASSETS = [viz_data_file, run_tables, *recompute_assets]
MODEL_ASSETS = [model_checkpoint, train_curve_file, train_curves, embeddings, vocab]
PIPELINE_ASSETS = [store_index, *download_assets, *table_assets, *recompute_assets, *duckdb_assets]


def build_definitions(resource: CircuitsResource | None = None) -> dg.Definitions:
    return dg.Definitions(
        assets=[*PIPELINE_ASSETS, *demo_store_assets],
        asset_checks=[],
        jobs=[run_tables_job, model_tables_job, *dask_jobs()],
        sensors=[discover_circuits],
        resources={"circuits": resource or CircuitsResource.from_env()},
        executor=dask_executor() if executor() == "dask" else None,
    )


restore_sigterm()  # this module is imported by every Dagster process of the code location (pipeline.log_capture)
defs = build_definitions()


# Module-level functions returning the Dask jobs: what `dg.reconstructable` needs, so that each worker
# rebuilds the job by importing this module.
def dask_run_job() -> dg.JobDefinition:
    return defs.resolve_job_def(RUN_JOB)


def dask_model_job() -> dg.JobDefinition:
    return defs.resolve_job_def(MODEL_JOB)
