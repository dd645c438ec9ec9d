"""The pipeline's settings: where things live and what to fetch.

The environment is read by `inference.settings` (the one module that reads it, with every
variable's default); this module derives the pipeline's paths and the selection from those values.
Imports nothing heavy, so the viewer can use it without torch.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass

from inference.settings import (
    EXECUTORS,
    SELECTION_ENV,
    cache_dir,
    dask_scheduler,
    dask_workers,
    data_dir,
    db_dir,
    embedded_store_dir,
    executor,
    store_env,
    store_url,
)
from inference.settings import selection as _selection_env

__all__ = ["EXECUTORS", "PUBLIC_STORE", "SELECTION_ENV", "Selection", "dask_scheduler", "dask_workers", "data_dir", "db_dir",
           "duckdb_path", "embedded_store_dir", "executor", "is_url", "local_dir", "split_names", "store_url",
           "uses_embedded_store"]  # fmt: skip

PUBLIC_STORE = "https://openaipublic.blob.core.windows.net/circuit-sparsity"


def uses_embedded_store() -> bool:
    return store_env() in (None, embedded_store_dir())


def duckdb_path() -> str:
    """Where `circuits.duckdb` is: in the local dir of the data (`local_dir`)."""
    return os.path.join(local_dir(), "circuits.duckdb")


def is_url(location: str) -> bool:
    """An object-store (fsspec) URL such as `az://c/p` or `s3://b/p`; `file://` and plain paths are local."""
    return "://" in location and not location.startswith("file://")


def local_dir(data: str | None = None, explicit: str | None = None) -> str:
    """The local directory of `circuits.duckdb`, Dagster's instance (`.dagster`) and the lock file for the
    data location `data` (default CIRCUITS_DATA).

    A local data dir holds them itself. Object-store data (`az://`, `s3://`) cannot (a database file
    is not an object): `explicit`, else CIRCUITS_DB_DIR, else
    `<CIRCUITS_CACHE or ~/.cache/circuits>/data/<scheme>/<bucket>/<prefix>`, one dir per URL.
    CIRCUITS_DB_DIR applies to object-store data only, so that it can never make two local data dirs
    share (and overwrite) one database."""
    data = data or data_dir()
    if not is_url(data):
        return os.path.abspath(data.removeprefix("file://"))
    chosen = explicit or db_dir()
    if chosen:
        return os.path.abspath(os.path.expanduser(chosen))
    scheme, _, rest = data.partition("://")
    cache = os.path.expanduser(cache_dir())
    parts = [p for p in rest.split("/") if p not in ("", ".", "..")]
    return os.path.abspath(os.path.join(cache, "data", scheme, *parts))


# ---- what to fetch: models, tasks, sweeps, k ---------------------------------------------------


def split_names(values) -> tuple[str, ...]:
    """Names from a comma list, or a list of comma lists (`--task a,b --task c`); blanks dropped."""
    if values is None:
        return ()
    if isinstance(values, str):
        values = [values]
    return tuple(n.strip() for v in values for n in str(v).split(",") if n.strip())


@dataclass(frozen=True)
class Selection:
    """The part of the store to fetch and convert: circuits `viz/<model>/<task>/<sweep>/<k>/` whose
    parts match, and the models they belong to. Each field is a tuple of names or shell-style
    patterns (`csp_sweep1_*`); an empty field matches everything. `text`: only runs whose id
    `<model>/<task>/<sweep>/<k>` contains it (the older `--select`).

    A run's sweep under the README's `viz/<experiment>/<model>/...` level is `<sweep>@<experiment>`;
    a sweep pattern matches either that or the bare `<sweep>`."""

    models: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()
    sweeps: tuple[str, ...] = ()
    ks: tuple[str, ...] = ()
    text: str | None = None

    @classmethod
    def from_env(cls, **overrides) -> Selection:
        """CIRCUITS_MODELS / _TASKS / _SWEEPS / _KS (comma lists); a field given here (not None) wins."""
        fields = {
            f: split_names(overrides[f]) if overrides.get(f) is not None else split_names(_selection_env(f))
            for f in SELECTION_ENV
        }
        return cls(**fields, text=overrides.get("text") or None)

    @property
    def filters_runs(self) -> bool:
        """Whether anything beyond the model narrows the circuits (then only their models are kept)."""
        return bool(self.tasks or self.sweeps or self.ks or self.text)

    def __bool__(self) -> bool:
        return bool(self.models) or self.filters_runs

    def wants_model(self, model: str) -> bool:
        return _matches(model, self.models)

    def wants_run(self, model: str, task: str, sweep: str, k: str) -> bool:
        return (
            _matches(model, self.models)
            and _matches(task, self.tasks)
            and (_matches(sweep, self.sweeps) or _matches(sweep.partition("@")[0], self.sweeps))
            and _matches(k, self.ks)
            and (not self.text or self.text in f"{model}/{task}/{sweep}/{k}")
        )

    def describe(self) -> str:
        parts = [
            f"{name}={','.join(v)}"
            for name, v in (("model", self.models), ("task", self.tasks), ("sweep", self.sweeps), ("k", self.ks))
            if v
        ]
        return " ".join(parts + ([f"select={self.text}"] if self.text else [])) or "everything"


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns)
