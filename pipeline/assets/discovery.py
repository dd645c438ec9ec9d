"""Discovery: every circuit (model, task, sweep, k) and model of the store, as dynamic partitions.

Runs live at `viz/<model>/<task>/<sweep>/<k>/viz_data.{pt,pkl}` (the released viewer's layout);
an extra `viz/<experiment>/<model>/...` level is tolerated: such a run's sweep is recorded as
`<sweep>@<experiment>` so run ids stay `<model>/<task>/<sweep>/<k>` and unique. When both
`viz_data.pt` and `viz_data.pkl` exist, the `.pt` is used.

Partitions are refreshed by the `store_index` asset (materialize it, or let the
`discover_circuits` sensor run) and by `circuits materialize`.
"""


import dagster as dg

from pipeline.convert import RunRef
from pipeline.resources import CircuitsResource
from pipeline.store_access import list_dir
from pipeline.tables import MODEL_TABLES

RUNS = dg.DynamicPartitionsDefinition(name="circuit_runs")
MODELS = dg.DynamicPartitionsDefinition(name="models")
VIZ_FILES = ("viz_data.pt", "viz_data.pkl")


def _viz_file(store, rel_dir: str) -> str | None:
    names = set(list_dir(store, rel_dir))
    for f in VIZ_FILES:
        if f in names:
            return f"{rel_dir}/{f}"
    return None


def discover_runs(store) -> list[RunRef]:
    """Every circuit of the store, sorted by run id."""
    runs: list[RunRef] = []
    for a in list_dir(store, "viz"):
        for b in list_dir(store, f"viz/{a}"):
            for c in list_dir(store, f"viz/{a}/{b}"):
                for d in list_dir(store, f"viz/{a}/{b}/{c}"):
                    base = f"viz/{a}/{b}/{c}/{d}"
                    path = _viz_file(store, base)
                    if path:  # viz/<model>/<task>/<sweep>/<k>/
                        runs.append(RunRef(a, b, c, d, path))
                        continue
                    for k in list_dir(store, base):  # viz/<experiment>/<model>/<task>/<sweep>/<k>/
                        path = _viz_file(store, f"{base}/{k}")
                        if path:
                            runs.append(RunRef(b, c, f"{d}@{a}", k, path))
    return sorted(runs, key=lambda r: r.run_id)


def discover_models(store) -> list[str]:
    return [m for m in list_dir(store, "models") if store.exists(f"models/{m}/beeg_config.json")]


def run_ref(store, run_id: str) -> RunRef:
    """The RunRef of a partition key (inverse of RunRef.run_id)."""
    parts = run_id.split("/")
    if len(parts) != 4:
        raise ValueError(f"not a run id <model>/<task>/<sweep>/<k>: {run_id!r}")
    model, task, sweep, k = parts
    sweep_dir, _, experiment = sweep.partition("@")
    base = f"viz/{experiment}/{model}/{task}/{sweep_dir}/{k}" if experiment else f"viz/{model}/{task}/{sweep}/{k}"
    path = _viz_file(store, base)
    if path is None:
        raise FileNotFoundError(f"{store.path(base)}: no viz_data.pt or viz_data.pkl (run {run_id})")
    return RunRef(model, task, sweep, k, path)


def refresh_partitions(instance: dg.DagsterInstance, store) -> tuple[list[RunRef], list[str]]:
    """Add every discovered run and model as a dynamic partition; returns what was discovered."""
    runs, models = discover_runs(store), discover_models(store)
    for definition, keys in ((RUNS, [r.run_id for r in runs]), (MODELS, models)):
        existing = set(instance.get_dynamic_partitions(definition.name))
        new = [k for k in keys if k not in existing]
        if new:
            instance.add_dynamic_partitions(definition.name, new)
    return runs, models


@dg.asset(group_name="discovery", description="Lists the store: every circuit run and model, added as dynamic partitions")
def store_index(context: dg.AssetExecutionContext, circuits: CircuitsResource) -> dg.MaterializeResult:
    runs, models = refresh_partitions(context.instance, circuits.store())
    context.log.info(f"{circuits.store_url}: {len(runs)} circuits of {len(models)} models")
    return dg.MaterializeResult(
        metadata={
            "store": circuits.store_url,
            "n_runs": len(runs),
            "n_models": len(models),
            "runs": dg.MetadataValue.md("\n".join(f"- `{r.run_id}` ({r.path})" for r in runs) or "(none)"),
        }
    )


# The jobs the sensor launches: one run's assets, one model's assets (selected by key, so this module
# needs no import of the asset modules).
RUN_ASSET_KEYS = ("viz_data_file", "runs", "nodes", "edges", "task_docs", "activations", "samples", "layer_ablations",
                  "pruning_curve", "loss_at_k", "faithfulness", "snippets", "ablations", "recomputed_activations", "recompute_summary")  # fmt: skip
MODEL_ASSET_KEYS = ("model_checkpoint", "train_curve_file", *MODEL_TABLES)  # the downloads, then every model-level table
run_tables_job = dg.define_asset_job("run_tables_job", selection=dg.AssetSelection.assets(*RUN_ASSET_KEYS))
model_tables_job = dg.define_asset_job("model_tables_job", selection=dg.AssetSelection.assets(*MODEL_ASSET_KEYS))


@dg.sensor(
    jobs=[run_tables_job, model_tables_job],
    minimum_interval_seconds=300,
    description="Adds new circuits and models of the store as partitions and requests their assets",
)
def discover_circuits(context: dg.SensorEvaluationContext, circuits: CircuitsResource):
    store = circuits.store()
    runs, models = discover_runs(store), discover_models(store)
    known_runs = set(context.instance.get_dynamic_partitions(RUNS.name))
    known_models = set(context.instance.get_dynamic_partitions(MODELS.name))
    new_runs = [r.run_id for r in runs if r.run_id not in known_runs]
    new_models = [m for m in models if m not in known_models]
    requests = [dg.RunRequest(partition_key=k, run_key=f"run:{k}", job_name="run_tables_job") for k in new_runs]
    requests += [dg.RunRequest(partition_key=m, run_key=f"model:{m}", job_name="model_tables_job") for m in new_models]
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[RUNS.build_add_request(new_runs), MODELS.build_add_request(new_models)],
    )
