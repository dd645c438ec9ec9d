"""Where things live, from the CIRCUITS_* environment variables with their defaults.

The one home of these defaults: Dagster resources, the CLI and the viewer all ask here.
Imports nothing heavy, so the viewer can use it without torch.
"""

from __future__ import annotations

import os

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
    return _join(data_dir(), "circuits.duckdb")


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name
