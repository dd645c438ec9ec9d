"""Every environment variable the project reads: its name, default and parsing, in one module.

Nothing else in the project reads `os.environ` (a test checks it). It sits at the bottom of the
layers (`inference`, below `pipeline` and `viewer`) and imports nothing heavy, so the viewer can use
it without torch. Each function reads its variable when called, so a test or a long-running process
that changes the environment sees the change.

| variable | default | meaning |
|---|---|---|
| `CIRCUITS_STORE` | `<CIRCUITS_DATA>/store` (the embedded store) | the circuit store, released layout: path or URL |
| `CIRCUITS_DATA` | `data` | Parquet tables (and, when local, `circuits.duckdb`): path or fsspec URL |
| `CIRCUITS_CACHE` | `~/.cache/circuits` | download cache of remote store files |
| `CIRCUITS_TOKENIZER_DIR` | the store's `tinypython/` | where `encoder.json` + `vocab.bpe` are looked for first |
| `CIRCUITS_DEVICE` | `cpu` | torch device of the recompute forward passes |
| `CIRCUITS_LOSS_FACTOR` | `0.5` | corrected loss = stored (raw) loss x factor |
| `CIRCUITS_TOLERANCE` | `1e-3` | relative tolerance of recomputed vs stored numbers |
| `CIRCUITS_ABLATION_BUDGET` | `12000000` | recompute: node-tokens of ablation work per mode before pairs are sampled (`0`: every pair) |
| `CIRCUITS_MODELS`, `_TASKS`, `_SWEEPS`, `_KS` | all | what to fetch and convert (comma lists of names or patterns) |
| `CIRCUITS_DB_DIR` | under the cache | object-store data only: local dir of `circuits.duckdb` and `.dagster` |
| `CIRCUITS_EXECUTOR` | `in_process` | where `circuits materialize` runs the partitions: `in_process` or `dask` |
| `CIRCUITS_DASK_SCHEDULER` | unset: a local cluster | address of an existing Dask scheduler (`tcp://host:8786`) |
| `CIRCUITS_DASK_WORKERS` | `2` | worker processes of the local Dask cluster |
| `CIRCUITS_TRACEBACK` | unset | set: the CLI shows Python tracebacks instead of one-line errors |
| `DAGSTER_HOME` | unset | Dagster's own: an instance to use instead of the data dir's `.dagster/` |
| `AZURE_STORAGE_*` | unset | adlfs's own credentials (`pipeline`/`inference.store` pass them to adlfs) |
"""

from __future__ import annotations

import os

DEFAULT_DATA = "data"
DEFAULT_CACHE = "~/.cache/circuits"
EMBEDDED_STORE_DIRNAME = "store"


def _get(name: str) -> str | None:
    """The variable's value; unset and empty both mean "not set"."""
    return os.environ.get(name) or None


def _float(name: str, default: float) -> float:
    raw = _get(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not a number") from None


# ---- where things live ---------------------------------------------------------------------------


def data_dir() -> str:
    """CIRCUITS_DATA: Parquet tables and circuits.duckdb (local path or fsspec URL); default `data`."""
    return _get("CIRCUITS_DATA") or DEFAULT_DATA


def embedded_store_dir() -> str:
    """Where the embedded demo store is built by default: `<CIRCUITS_DATA>/store`."""
    return data_dir().rstrip("/") + "/" + EMBEDDED_STORE_DIRNAME


def store_env() -> str | None:
    """CIRCUITS_STORE as set, or None."""
    return _get("CIRCUITS_STORE")


def store_url() -> str:
    """CIRCUITS_STORE: the circuit store (released layout); default the embedded store."""
    return store_env() or embedded_store_dir()


def cache_dir() -> str:
    """CIRCUITS_CACHE: the download cache (not expanded); default `~/.cache/circuits`."""
    return cache_env() or DEFAULT_CACHE


def cache_env() -> str | None:
    """CIRCUITS_CACHE as set, or None (the pipeline's resource keeps "unset" apart from the default)."""
    return _get("CIRCUITS_CACHE")


def tokenizer_dir() -> str | None:
    """CIRCUITS_TOKENIZER_DIR: a directory (or store URL) holding encoder.json + vocab.bpe, or None."""
    return _get("CIRCUITS_TOKENIZER_DIR")


# ---- how the pipeline computes -----------------------------------------------------------------


def device() -> str:
    """CIRCUITS_DEVICE: torch device of the recompute (`cpu`, `cuda`, `cuda:1`, ...); default `cpu`."""
    return _get("CIRCUITS_DEVICE") or "cpu"


def loss_factor() -> float:
    """CIRCUITS_LOSS_FACTOR: corrected loss = stored loss x factor (the release stores 2x); default 0.5."""
    return _float("CIRCUITS_LOSS_FACTOR", 0.5)


def tolerance() -> float:
    """CIRCUITS_TOLERANCE: relative tolerance of recomputed vs stored numbers; default 1e-3."""
    return _float("CIRCUITS_TOLERANCE", 1e-3)


# The recompute's ablation work per mode, in node-tokens (circuit nodes x task tokens of the ablated
# pairs): within it every task pair is ablated and the deltas are exact; past it a fixed-seed sample
# of pairs is (pipeline.recompute.ablation_pairs). 12 M: every pair of every embedded-store circuit
# (~0.14 M) and of a 2,000-node circuit with 64 task docs of 64 tokens (8.3 M), two pairs of one
# whose docs are 1,024 tokens (4.1 M per pair; exact would take ~5.5 hours on 2 cores, the 2 pairs ~20 min).
DEFAULT_ABLATION_BUDGET = 12_000_000


def whole_number(text: str, minimum: int = 0) -> int | None:
    """`text` as an integer >= `minimum` (underscores allowed: 12_000_000), or None when it is not one.
    The one parser of counts given as text: environment variables here, the CLI's options."""
    try:
        n = int(text.replace("_", ""))
    except ValueError:
        return None
    return n if n >= minimum else None


def ablation_budget() -> int:
    """CIRCUITS_ABLATION_BUDGET: node-tokens of ablation work per mode before the recompute samples
    task pairs; 0 means every pair (exact deltas, however long). Default 12,000,000."""
    raw = _get("CIRCUITS_ABLATION_BUDGET")
    if raw is None:
        return DEFAULT_ABLATION_BUDGET
    n = whole_number(raw)
    if n is None:
        raise ValueError(f"environment variable CIRCUITS_ABLATION_BUDGET={raw!r}: expected a whole number >= 0")
    return n


SELECTION_ENV = {"models": "CIRCUITS_MODELS", "tasks": "CIRCUITS_TASKS", "sweeps": "CIRCUITS_SWEEPS", "ks": "CIRCUITS_KS"}


def selection(field: str) -> str | None:
    """The raw comma list of one selection field (`models`, `tasks`, `sweeps`, `ks`), or None."""
    return _get(SELECTION_ENV[field])


# ---- where the partitions run, and the local side of object-store data -------------------------

EXECUTORS = ("in_process", "dask")


def db_dir() -> str | None:
    """CIRCUITS_DB_DIR: the local dir of `circuits.duckdb` (and `.dagster`) for object-store data, or None."""
    return _get("CIRCUITS_DB_DIR")


def executor() -> str:
    """CIRCUITS_EXECUTOR: `in_process` (default: one partition at a time in this process) or `dask`."""
    value = _get("CIRCUITS_EXECUTOR") or "in_process"
    if value not in EXECUTORS:
        raise ValueError(f"environment variable CIRCUITS_EXECUTOR={value!r}: expected one of {', '.join(EXECUTORS)}")
    return value


def dask_scheduler() -> str | None:
    """CIRCUITS_DASK_SCHEDULER: address of an existing Dask scheduler (`tcp://host:8786`); None: a local cluster."""
    return _get("CIRCUITS_DASK_SCHEDULER")


def dask_workers() -> int:
    """CIRCUITS_DASK_WORKERS: worker processes of the local Dask cluster started when no scheduler is given (default 2)."""
    raw = _get("CIRCUITS_DASK_WORKERS") or "2"
    n = whole_number(raw, minimum=1)
    if n is None:
        raise ValueError(f"environment variable CIRCUITS_DASK_WORKERS={raw!r}: expected a whole number >= 1")
    return n


# ---- the command line and the engines' own variables ---------------------------------------------


def show_tracebacks() -> bool:
    """CIRCUITS_TRACEBACK set: the CLI re-raises errors instead of printing one line."""
    return _get("CIRCUITS_TRACEBACK") is not None


def dagster_home() -> str | None:
    """DAGSTER_HOME (Dagster's own variable): an instance directory chosen by the user, or None."""
    return _get("DAGSTER_HOME")


def azure_anonymous() -> bool:
    """AZURE_STORAGE_ANON (adlfs's own variable and parsing): anonymous unless it says false."""
    raw = os.environ.get("AZURE_STORAGE_ANON")
    return True if raw is None else raw.strip().lower() not in ("false", "0", "f", "")


def azure_connection_string() -> str | None:
    """AZURE_STORAGE_CONNECTION_STRING (the Azure SDK's variable), or None."""
    return _get("AZURE_STORAGE_CONNECTION_STRING")


def azure_account_name() -> str | None:
    """AZURE_STORAGE_ACCOUNT_NAME (the Azure SDK's variable), or None."""
    return _get("AZURE_STORAGE_ACCOUNT_NAME")
