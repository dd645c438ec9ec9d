"""Where things live, from the CIRCUITS_* environment variables with their defaults.

The one home of these defaults: Dagster resources, the CLI and the viewer all ask here.
Imports nothing heavy, so the viewer can use it without torch.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass

DEFAULT_DATA = "data"
EMBEDDED_STORE_DIRNAME = "store"
PUBLIC_STORE = "https://openaipublic.blob.core.windows.net/circuit-sparsity"


def data_dir() -> str:
    """CIRCUITS_DATA: Parquet tables and circuits.duckdb (local path or fsspec URL); default `data/`."""
    return os.environ.get("CIRCUITS_DATA") or DEFAULT_DATA


def embedded_store_dir() -> str:
    """Where the embedded demo store is built by default: `<CIRCUITS_DATA>/store`."""
    return _join(data_dir(), EMBEDDED_STORE_DIRNAME)


def store_url() -> str:
    """CIRCUITS_STORE: the circuit store (released layout); default the embedded store."""
    return os.environ.get("CIRCUITS_STORE") or embedded_store_dir()


def uses_embedded_store() -> bool:
    return not os.environ.get("CIRCUITS_STORE") or os.environ["CIRCUITS_STORE"] == embedded_store_dir()


def duckdb_path() -> str:
    """Where `circuits.duckdb` is: in the local dir of the data (`local_dir`)."""
    return os.path.join(local_dir(), "circuits.duckdb")


def is_url(location: str) -> bool:
    """An object-store (fsspec) URL such as `az://c/p` or `s3://b/p`; `file://` and plain paths are local."""
    return "://" in location and not location.startswith("file://")


def db_dir() -> str | None:
    """CIRCUITS_DB_DIR: the local directory of `circuits.duckdb` (and `.dagster`) for object-store data; unset: `local_dir`'s default."""
    return os.environ.get("CIRCUITS_DB_DIR") or None


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
    cache = os.path.expanduser(os.environ.get("CIRCUITS_CACHE") or "~/.cache/circuits")
    parts = [p for p in rest.split("/") if p not in ("", ".", "..")]
    return os.path.abspath(os.path.join(cache, "data", scheme, *parts))


# ---- where the run partitions execute --------------------------------------------------------

EXECUTORS = ("in_process", "dask")


def executor() -> str:
    """CIRCUITS_EXECUTOR: `in_process` (default: one partition at a time in this process) or `dask`."""
    value = os.environ.get("CIRCUITS_EXECUTOR") or "in_process"
    if value not in EXECUTORS:
        raise ValueError(f"environment variable CIRCUITS_EXECUTOR={value!r}: expected one of {', '.join(EXECUTORS)}")
    return value


def dask_scheduler() -> str | None:
    """CIRCUITS_DASK_SCHEDULER: address of an existing Dask scheduler (`tcp://host:8786`); unset: a local cluster."""
    return os.environ.get("CIRCUITS_DASK_SCHEDULER") or None


def dask_workers() -> int:
    """CIRCUITS_DASK_WORKERS: worker processes of the local Dask cluster started when no scheduler is given (default 2)."""
    raw = os.environ.get("CIRCUITS_DASK_WORKERS") or "2"
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"environment variable CIRCUITS_DASK_WORKERS={raw!r}: expected a whole number >= 1")
    return n


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


# ---- what to fetch: models, tasks, sweeps, k ---------------------------------------------------

SELECTION_ENV = {"models": "CIRCUITS_MODELS", "tasks": "CIRCUITS_TASKS", "sweeps": "CIRCUITS_SWEEPS", "ks": "CIRCUITS_KS"}


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
        fields = {f: split_names(overrides[f]) if overrides.get(f) is not None else split_names(os.environ.get(var)) for f, var in SELECTION_ENV.items()}
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
        parts = [f"{name}={','.join(v)}" for name, v in (("model", self.models), ("task", self.tasks), ("sweep", self.sweeps), ("k", self.ks)) if v]
        return " ".join(parts + ([f"select={self.text}"] if self.text else [])) or "everything"


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns)
