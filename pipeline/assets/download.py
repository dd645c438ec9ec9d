"""Download assets: the store files each table is built from, fetched through the store's cache.

Each records the file's store path, size and sha256 in its materialization metadata, so a changed
file in the store shows up as a changed sha256 in the asset's history.
"""

import dagster as dg

from pipeline.assets.discovery import MODELS, RUNS, run_ref
from pipeline.resources import CircuitsResource
from pipeline.store_access import TOKENIZER_DIR, local_sha256

GROUP = "download"


def file_metadata(store, rel: str) -> dict:
    local, sha = local_sha256(store, rel)
    return {"store_path": rel, "local_path": str(local), "size": local.stat().st_size, "sha256": sha}


def _result(store, rels: list[str]) -> dg.MaterializeResult:
    meta: dict = {}
    for rel in rels:
        name = rel.rsplit("/", 1)[-1].replace(".", "_")
        for k, v in file_metadata(store, rel).items():
            meta[f"{name}/{k}"] = v
    return dg.MaterializeResult(metadata=meta)


@dg.asset(group_name=GROUP, partitions_def=RUNS, description="The run's viz_data.pt / viz_data.pkl")
def viz_data_file(context: dg.AssetExecutionContext, circuits: CircuitsResource) -> dg.MaterializeResult:
    store = circuits.store()
    run = run_ref(store, context.partition_key)
    context.log.info(f"downloading {run.path}")
    return _result(store, [run.path])


@dg.asset(group_name=GROUP, partitions_def=MODELS, description="The model's beeg_config.json and final_model.pt")
def model_checkpoint(context: dg.AssetExecutionContext, circuits: CircuitsResource) -> dg.MaterializeResult:
    store = circuits.store()
    m = context.partition_key
    context.log.info(f"downloading models/{m}")
    return _result(store, [f"models/{m}/beeg_config.json", f"models/{m}/final_model.pt"])


@dg.asset(group_name=GROUP, partitions_def=MODELS, description="train_curves/<model>/progress.json (absent for some models)")
def train_curve_file(context: dg.AssetExecutionContext, circuits: CircuitsResource) -> dg.MaterializeResult:
    store = circuits.store()
    rel = f"train_curves/{context.partition_key}/progress.json"
    if not store.exists(rel):
        context.log.warning(f"{rel} is not in the store")
        return dg.MaterializeResult(metadata={"store_path": rel, "present": False})
    return _result(store, [rel])


@dg.asset(group_name=GROUP, description="The tinypython tokenizer files (encoder.json, vocab.bpe)")
def tokenizer_files(context: dg.AssetExecutionContext, circuits: CircuitsResource) -> dg.MaterializeResult:
    return _result(circuits.store(), [f"{TOKENIZER_DIR}/encoder.json", f"{TOKENIZER_DIR}/vocab.bpe"])


download_assets = [viz_data_file, model_checkpoint, train_curve_file, tokenizer_files]
