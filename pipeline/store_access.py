"""How the pipeline reaches a store's files, models and tokenizer: through `inference`.

`inference.store.Store` (fsspec + download cache + single-tensor reads), `inference.load_model`
and `inference.tokenizer.get_tokenizer`; this module only adapts them to the pipeline's needs
(directory listings that tolerate missing directories, checksums of the cached copy, the
tokenizer's bytes per id).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from inference.files import sha256_file

TOKENIZER_DIR = "tinypython"


def open_store(url: str, cache_dir: str | None = None):
    from inference.store import Store

    return Store(url, cache_dir=cache_dir)


def list_dir(store, rel: str) -> list[str]:
    """Child names of a store directory; [] when it does not exist or is a file."""
    try:
        return store.ls(rel)
    except (FileNotFoundError, NotADirectoryError):
        return []


# sha256 by (local path, size, mtime): the download asset and the conversion hash the same copy once.
_HASHES: dict[tuple, str] = {}


def _version(path: Path) -> tuple:
    """What identifies one version of a local file: (path, size, mtime in ns)."""
    st = path.stat()
    return (str(path), st.st_size, st.st_mtime_ns)


def local_sha256(store, rel: str) -> tuple[Path, str]:
    """(local copy, sha256) of a store file: hashed from the cached copy, once per version of it."""
    path = store.local(rel)
    key = _version(path)
    if key not in _HASHES:
        if len(_HASHES) > 256:
            _HASHES.clear()
        _HASHES[key] = sha256_file(path)
    return path, _HASHES[key]


@dataclass(frozen=True)
class RunFile:
    """One run's viz_data as the run partition's assets need it: the cached local copy, its sha256,
    the parsed `VizData`, and the warnings parsing raised (unknown locations), to be logged by
    each asset that uses it."""

    local: Path
    source: str
    sha256: str
    viz: object
    warnings: list[str]


# The last run file read, keyed by (local path, size, mtime): a run partition's conversion and
# recompute assets run one after the other in the same process (`circuits materialize`), so the
# file is listed, hashed and parsed once. A different key evicts it before parsing (one viz_data in
# memory at a time; release files parse to about 1 GB). On a Dask cluster the two assets may run
# on different workers, and each reads the file once.
_RUN_FILE: dict[tuple, RunFile] = {}


def read_run_file(store, rel: str) -> RunFile:
    """`rel` (a run's viz_data) fetched, hashed and parsed once per process and version of the file.
    Raises `pipeline.formats.VizDataError` naming the file."""
    import warnings as _warnings

    from pipeline.formats import UnknownLocationWarning, read_viz_data

    local, sha = local_sha256(store, rel)
    key = _version(local)
    if key not in _RUN_FILE:
        _RUN_FILE.clear()
        source = store.path(rel)
        with _warnings.catch_warnings(record=True) as caught:
            _warnings.simplefilter("always", UnknownLocationWarning)
            viz = read_viz_data(local, source=source)
        _RUN_FILE[key] = RunFile(local, source, sha, viz, [str(w.message) for w in caught])
    return _RUN_FILE[key]


def forget_run_file() -> None:
    """Drop the parsed file now (tests; in a run, reading another file evicts it)."""
    _RUN_FILE.clear()


def load_model(store, model: str, device: str = "cpu"):
    """The store's `models/<model>` as an eval-mode GPT on `device`."""
    from inference import load_model as _load

    return _load(store.path(f"models/{model}"), device=device, cache_dir=getattr(store, "_cache_dir", None)).eval()


NODE_MEANS_FILE = "node_means.pt"


def load_node_means(store, model: str, config) -> tuple[dict, int, str] | None:
    """(means by node location, tokens, "store") from `models/<model>/node_means.pt` when the store
    has one (the embedded store does; the release does not), else None. Loaded with
    `weights_only=True`; a file that does not fit the model is an error naming it."""
    import torch

    from inference.circuit import location_width, node_locations

    rel = f"models/{model}/{NODE_MEANS_FILE}"
    if not store.exists(rel):
        return None
    where = store.path(rel)
    try:
        from inference.safe_load import check_torch_zip

        local = store.local(rel)
        check_torch_zip(local, where)  # sizes and views checked before anything is allocated
        blob = torch.load(local, map_location="cpu", weights_only=True)
        means, tokens = blob["means"], int(blob["tokens"])
    except Exception as e:  # noqa: BLE001 (any unreadable content is the same finding)
        raise ValueError(f"{where}: not a node-means file ({type(e).__name__}: {e})") from None
    for loc in node_locations(config):
        m = means.get(loc) if isinstance(means, dict) else None
        want = location_width(config, loc)
        if not isinstance(m, torch.Tensor) or tuple(m.shape) != (want,):
            got = "missing" if m is None else f"shape {tuple(getattr(m, 'shape', ()))}"
            raise ValueError(f"{where}: means of {loc} are {got}, expected shape ({want},)")
    return {loc: means[loc].float() for loc in node_locations(config)}, tokens, "store"


def read_tensor(store, model: str, key: str):
    """One tensor of `models/<model>/final_model.pt`, with ranged reads (not the whole checkpoint)."""
    import torch

    from inference.store import read_tensor as _read

    t = _read(store.path(f"models/{model}"), key, cache_dir=getattr(store, "_cache_dir", None))
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):  # else NaN tables, or numpy errors naming nothing
        raise ValueError(
            f"{store.path(f'models/{model}/final_model.pt')}: tensor {key!r} holds {int((~torch.isfinite(t)).sum())} NaN or infinite values"
        )
    return t


def load_tokenizer(store):
    """The store's `tinypython/` tokenizer (a tiktoken Encoding, cached per file version), its files
    fetched through the pipeline's download cache."""
    from inference.tokenizer import get_tokenizer

    return get_tokenizer(store.path(TOKENIZER_DIR), cache_dir=getattr(store, "_cache_dir", None))


def token_bytes_list(enc) -> tuple[list[bytes], dict[int, str]]:
    """Every token's bytes (index = id) and the special tokens {id: name}."""
    special = {i: s for s, i in getattr(enc, "_special_tokens", {}).items()}
    out = []
    for i in range(enc.n_vocab):
        if i in special:
            out.append(special[i].encode())
            continue
        try:
            out.append(enc.decode_single_token_bytes(i))
        except KeyError:
            out.append(b"")
    return out, special
