"""Discovery: every circuit (model, task, sweep, k) and model of the store, as dynamic partitions.

Runs live at `viz/<model>/<task>/<sweep>/<k>/viz_data.{pt,pkl}` (the released viewer's layout);
an extra `viz/<experiment>/<model>/...` level is tolerated: such a run's sweep is recorded as
`<sweep>@<experiment>` so run ids stay `<model>/<task>/<sweep>/<k>` and unique. When both
`viz_data.pt` and `viz_data.pkl` exist, the `.pt` is used.

A local store is walked directory by directory (with the symlink guards of `_Walk`); an object
store (Azure through adlfs, S3, HTTP, memory) is listed flat, `viz/` and `models/` in one recursive
listing each (a few requests for thousands of files, not one per directory).

Partitions are refreshed by the `store_index` asset (materialize it, or let the
`discover_circuits` sensor run) and by `circuits materialize`. Only the circuits and models of the
selection (`pipeline.settings.Selection`: the `circuits` resource's `models` / `tasks` / `sweeps` /
`ks`, from CIRCUITS_MODELS etc.) become partitions, so a backfill of every partition in the UI
fetches only those.
"""

import os
import warnings

import dagster as dg

from pipeline.convert import RunRef
from pipeline.formats import VizDataError
from pipeline.resources import CircuitsResource
from pipeline.settings import Selection
from pipeline.store_access import RunFile, read_run_file
from pipeline.tables import MODEL_TABLES

RUNS = dg.DynamicPartitionsDefinition(name="circuit_runs")
MODELS = dg.DynamicPartitionsDefinition(name="models")
VIZ_FILES = ("viz_data.pt", "viz_data.pkl")


class StoreWalkWarning(UserWarning):
    """A store entry the walk skipped (unreadable, a symlink leaving the store, a symlink loop)."""


class _Walk:
    """Directory listings of one walk over a store, robust to what a shared store may hold.

    An entry that cannot be listed (permissions, a self-looping symlink, a network error) is
    skipped with a `StoreWalkWarning` naming it; the rest of the store is still discovered. In
    a local store, symlinks are followed only to targets inside the store root; a symlinked
    directory whose target the walk reaches anyway (inside the same `viz/` or `models/`: a link to
    `.`, to an ancestor, or an alias of a sibling) is not followed, and no directory is entered
    twice, so a link can neither hang the walk nor invent phantom runs.
    """

    def __init__(self, store) -> None:
        self.store = store
        self.local = bool(getattr(store, "is_local", False))
        self.root = os.path.realpath(store._fspath("")) if self.local else ""
        self.seen: dict[str, str] = {}  # real path -> store-relative path that claimed it
        self.warnings: list[str] = []
        self.listed: dict[str, list[str]] = {}

    def warn(self, rel: str, why: str) -> None:
        msg = f"{self.store.path(rel)}: skipped ({why})"
        self.warnings.append(msg)
        warnings.warn(msg, StoreWalkWarning, stacklevel=3)

    def _allowed(self, rel: str, is_dir: bool) -> bool:
        """Local stores: the entry resolves inside the root and (directories) was not entered yet."""
        if not self.local:
            return True
        path = self.store._fspath(rel)
        try:
            real = os.path.realpath(path, strict=True)
        except OSError as e:  # a symlink loop, a dangling link, a vanished entry
            self.warn(rel, f"cannot resolve: {e.strerror or e}")
            return False
        if real != self.root and not real.startswith(self.root + os.sep):
            self.warn(rel, f"a symlink to {real}, outside the store; not followed")
            return False
        if is_dir:
            top = os.path.realpath(self.store._fspath(rel.split("/")[0]))
            if rel != rel.split("/")[0] and os.path.islink(path) and (real == top or real.startswith(top + os.sep)):
                self.warn(rel, f"a symlink to {real}, which the walk reaches by its real path; not followed")
                return False
            if real in self.seen:
                self.warn(rel, f"the same directory as {self.store.path(self.seen[real])} (symlink); not entered twice")
                return False
            self.seen[real] = rel
        return True

    def ls(self, rel: str) -> list[str]:
        """Sorted child names of a store directory; [] if absent or unreadable (with a warning)."""
        if rel in self.listed:
            return self.listed[rel]
        self.listed[rel] = []
        if not self._allowed(rel, is_dir=True):
            return []
        try:
            names = self.store.ls(rel)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as e:  # PermissionError, ELOOP, StoreError (network): this entry only
            self.warn(rel, f"cannot list: {e}")
            return []
        self.listed[rel] = names
        return names

    def viz_file(self, rel_dir: str) -> str | None:
        names = set(self.ls(rel_dir))
        for f in VIZ_FILES:
            if f in names and self._allowed(f"{rel_dir}/{f}", is_dir=False):
                return f"{rel_dir}/{f}"
        return None


def _viz_file(store, rel_dir: str) -> str | None:
    return _Walk(store).viz_file(rel_dir)


def _runs_from_files(files) -> list[RunRef]:
    """The runs among store-relative file names (a flat listing of `viz/`), by the walk's rules: a
    `<model>/<task>/<sweep>/<k>/` directory holding a viz file is a run (nothing below it is looked
    at), else one level deeper under an `<experiment>/`; `.pt` before `.pkl`."""
    found: dict[tuple[str, ...], str] = {}
    for rel in files:
        parts = rel.split("/")
        if parts[0] != "viz" or parts[-1] not in VIZ_FILES or len(parts) not in (6, 7):
            continue
        d = tuple(parts[1:-1])
        best = found.get(d)
        if best is None or VIZ_FILES.index(parts[-1]) < VIZ_FILES.index(best.rsplit("/", 1)[-1]):
            found[d] = rel
    runs = []
    for d, rel in found.items():
        if len(d) == 4:
            runs.append(RunRef(*d, rel))
        elif d[:4] not in found:  # viz/<experiment>/<model>/<task>/<sweep>/<k>/
            runs.append(RunRef(d[1], d[2], f"{d[3]}@{d[0]}", d[4], rel))
    return runs


def _all_runs(store, files=None) -> list[RunRef]:
    if files is not None:
        return _runs_from_files(files)
    if not getattr(store, "is_local", True):  # an object store: one flat listing, not one per directory
        return _runs_from_files(store.find("viz"))
    walk = _Walk(store)
    runs: list[RunRef] = []
    for a in walk.ls("viz"):
        for b in walk.ls(f"viz/{a}"):
            for c in walk.ls(f"viz/{a}/{b}"):
                for d in walk.ls(f"viz/{a}/{b}/{c}"):
                    base = f"viz/{a}/{b}/{c}/{d}"
                    path = walk.viz_file(base)
                    if path:  # viz/<model>/<task>/<sweep>/<k>/
                        runs.append(RunRef(a, b, c, d, path))
                        continue
                    for k in walk.ls(base):  # viz/<experiment>/<model>/<task>/<sweep>/<k>/
                        path = walk.viz_file(f"{base}/{k}")
                        if path:
                            runs.append(RunRef(b, c, f"{d}@{a}", k, path))
    return runs


def discover_runs(store, selection: Selection | None = None, files=None) -> list[RunRef]:
    """The store's circuits (those `selection` wants), sorted by run id; on a local store, entries
    it cannot read are skipped with a warning. Lists only: no file is fetched. `files`: a flat
    listing of the store (relative names) to use instead of listing it again."""
    sel = selection or Selection()
    return sorted(
        (r for r in _all_runs(store, files) if sel.wants_run(r.model, r.task, r.sweep, r.k_label)), key=lambda r: r.run_id
    )


def discover_models(store, selection: Selection | None = None, runs: list[RunRef] | None = None, files=None) -> list[str]:
    """The store's models (`models/<m>/beeg_config.json`) that `selection` wants: those matching its
    model names and, when it narrows the circuits (task, sweep, k), only the models of `runs`
    (the selected circuits; discovered here when not given)."""
    sel = selection or Selection()
    if files is not None or not getattr(store, "is_local", True):
        names = {
            rel.split("/")[1]
            for rel in (files if files is not None else store.find("models"))
            if rel.startswith("models/") and rel.count("/") == 2 and rel.endswith("/beeg_config.json")
        }
        models = sorted(names)
    else:
        walk = _Walk(store)
        models = []
        for m in walk.ls("models"):
            try:
                if walk._allowed(f"models/{m}", is_dir=True) and store.exists(f"models/{m}/beeg_config.json"):
                    models.append(m)
            except OSError as e:
                walk.warn(f"models/{m}", f"cannot read: {e}")
    if sel.filters_runs:
        wanted = {r.model for r in (runs if runs is not None else discover_runs(store, sel))}
        models = [m for m in models if m in wanted]
    return [m for m in models if sel.wants_model(m)]


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


def run_file(store, run_id: str) -> tuple[RunRef, RunFile]:
    """A run partition's RunRef and its viz_data, parsed (once per partition: the run's table and
    recompute assets share it); a file that does not parse fails the step, naming the file."""
    run = run_ref(store, run_id)
    try:
        return run, read_run_file(store, run.path)
    except VizDataError as e:
        raise dg.Failure(description=str(e)) from None


def refresh_partitions(instance: dg.DagsterInstance, store, selection: Selection | None = None) -> tuple[list[RunRef], list[str]]:
    """Add every discovered (selected) run and model as a dynamic partition; returns them."""
    runs = discover_runs(store, selection)
    models = discover_models(store, selection, runs)
    for definition, keys in ((RUNS, [r.run_id for r in runs]), (MODELS, models)):
        existing = set(instance.get_dynamic_partitions(definition.name))
        new = [k for k in keys if k not in existing]
        if new:
            instance.add_dynamic_partitions(definition.name, new)
    return runs, models


@dg.asset(group_name="discovery", description="Lists the store: every circuit run and model, added as dynamic partitions")
def store_index(context: dg.AssetExecutionContext, circuits: CircuitsResource) -> dg.MaterializeResult:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", StoreWalkWarning)
        runs, models = refresh_partitions(context.instance, circuits.store(), circuits.selection())
    for w in caught:  # entries the walk skipped: in the run's log, one line each
        context.log.warning(str(w.message))
    context.log.info(f"{circuits.store_url}: {len(runs)} circuits of {len(models)} models ({circuits.selection().describe()})")
    return dg.MaterializeResult(
        metadata={
            "store": circuits.store_url,
            "selection": circuits.selection().describe(),
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
    store, selection = circuits.store(), circuits.selection()
    runs = discover_runs(store, selection)
    models = discover_models(store, selection, runs)
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
