"""The Dagster Definitions: assets, checks, resources, jobs and the discovery sensor.

`dagster dev` finds this module through `[tool.dagster] module_name` in pyproject.toml (run it from
the project root). Settings come from the CIRCUITS_* variables (`pipeline.resources`).
`circuits materialize` runs the same assets in-process (`pipeline.materialize`).
"""

from __future__ import annotations

import dagster as dg

from pipeline.assets.demo_store import demo_store_assets
from pipeline.assets.discovery import discover_circuits, model_tables_job, run_tables_job, store_index
from pipeline.assets.download import download_assets, model_checkpoint, train_curve_file, viz_data_file
from pipeline.assets.duckdb_views import duckdb_assets
from pipeline.assets.recompute import recompute_assets
from pipeline.assets.tables import embeddings, run_tables, table_assets, train_curves, vocab
from pipeline.resources import CircuitsResource

# Assets of one run partition, of one model partition, and the unpartitioned ones.
RUN_ASSETS = [viz_data_file, run_tables, *recompute_assets]
MODEL_ASSETS = [model_checkpoint, train_curve_file, train_curves, embeddings, vocab]
PIPELINE_ASSETS = [store_index, *download_assets, *table_assets, *recompute_assets, *duckdb_assets]


def build_definitions(resource: CircuitsResource | None = None) -> dg.Definitions:
    return dg.Definitions(
        assets=[*PIPELINE_ASSETS, *demo_store_assets],
        asset_checks=[],
        jobs=[run_tables_job, model_tables_job],
        sensors=[discover_circuits],
        resources={"circuits": resource or CircuitsResource.from_env()},
    )


defs = build_definitions()
