"""Recompute assets: forward passes of the store's model that check and extend each circuit.

Writes `ablations`, `recomputed_activations` and `recompute_summary` (docs/tables.md) from
`pipeline.recompute`. Checks (severity WARN: a disagreement is a finding about the release, not
a pipeline failure): recomputed task losses and activations within tolerance of the stored ones.
"""

import dagster as dg

from pipeline.assets.discovery import RUNS, run_file
from pipeline.assets.download import viz_data_file
from pipeline.assets.tables import table_metadata
from pipeline.formats import VizDataError, check_against_model
from pipeline.recompute import recompute, recompute_tables, within
from pipeline.resources import CircuitsResource
from pipeline.store_access import load_model, load_node_means
from pipeline.tables import write_partition

GROUP = "recompute"
# (store, model, device) -> (model, the store's node means or None), reused across runs of one process
_MODELS: dict[tuple, tuple] = {}


def cached_model(store, model: str, device: str):
    """The model and its store-shipped node means (`load_node_means`: ValueError on a bad file),
    loaded once per process for all runs of that model."""
    key = (store.url, model, device)
    if key not in _MODELS:
        _MODELS.clear()  # keep at most one model in memory
        m = load_model(store, model, device)
        _MODELS[key] = (m, load_node_means(store, model, m.config))
    return _MODELS[key]


_DESCRIPTIONS = {
    "ablations": "Per circuit node: task loss with it also ablated (mean and zero), recomputed, beside the stored delta",
    "recomputed_activations": "Circuit nodes' activations on the task docs: stored, full model, circuit model",
    "recompute_summary": "Per run: stored vs recomputed losses, and which model the stored activations match",
}
CHECKS = [
    dg.AssetCheckSpec(
        "loss_matches_stored",
        asset="recompute_summary",
        description="Recomputed full-model and circuit task losses within tolerance of the stored ones",
    ),
    dg.AssetCheckSpec(
        "activations_match_stored",
        asset="recompute_summary",
        description="Stored activations match the full or the circuit model within tolerance",
    ),
]


@dg.multi_asset(
    specs=[dg.AssetSpec(t, group_name=GROUP, deps=[viz_data_file], description=d) for t, d in _DESCRIPTIONS.items()],
    partitions_def=RUNS,
    check_specs=CHECKS,
)
def recomputed(context: dg.AssetExecutionContext, circuits: CircuitsResource):
    store = circuits.store()
    key = context.partition_key
    run, rf = run_file(store, key)
    viz = rf.viz
    try:
        model, store_means = cached_model(store, run.model, circuits.device)
    except ValueError as e:  # a bad node-means file: fail the runs of that model, naming it
        raise dg.Failure(description=str(e)) from None
    try:  # channels, context and token ids that fit the store's model, before any forward pass
        check_against_model(viz, model.config, f"the model {run.model}")
    except VizDataError as e:
        raise dg.Failure(description=str(e)) from None
    r = recompute(model, viz, log=context.log.info, store_means=store_means, ablation_budget=circuits.ablation_budget)
    tables = recompute_tables(viz, run, r, circuits.loss_factor, circuits.tolerance, circuits.device)
    data = circuits.data_url()
    try:
        for name, t in tables.items():
            yield dg.MaterializeResult(asset_key=name, metadata=table_metadata(write_partition(data, name, key, t)))
    finally:  # the spilled activations' temporary files
        for spilled in (r.full_acts, r.circuit_acts):
            spilled.close()

    s = tables["recompute_summary"].to_pylist()[0]
    loss_ok = within(r.loss, viz.loss, circuits.tolerance) and within(r.interv_loss, viz.interv_loss, circuits.tolerance)
    sev = dg.AssetCheckSeverity.WARN
    yield dg.AssetCheckResult(
        check_name="loss_matches_stored", asset_key="recompute_summary", passed=loss_ok, severity=sev,
        metadata={k: s[k] for k in ("stored_loss", "recomputed_loss", "stored_interv_loss", "recomputed_interv_loss")},
    )  # fmt: skip
    yield dg.AssetCheckResult(
        check_name="activations_match_stored", asset_key="recompute_summary", passed=s["stored_acts_match"] != "neither", severity=sev,
        metadata={k: str(s[k]) for k in ("stored_acts_match", "max_abs_act_diff_full", "max_abs_act_diff_circuit")},
    )  # fmt: skip


recompute_assets = [recomputed]
