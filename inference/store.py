"""Read a store in the released layout through fsspec, with a local download cache.

A *store* is a local directory or any fsspec URL (`file://`, `https://`, `memory://`,
`s3://` when s3fs is installed) laid out as in `shared/spec/checkpoint-format.md`.

    store = Store("https://openaipublic.blob.core.windows.net/circuit-sparsity")
    path = store.local("models/csp_yolo1/final_model.pt")    # downloaded once, then cached
    wte = read_tensor(store.path("models/csp_yolo1"), "transformer.wte.weight")  # ranged reads

The cache: a remote file is stored under `cache_dir()` keyed by its URL *and* by what the
store reports about it (size plus ETag / modification time), so a changed remote file is
fetched again. Looking a file up in the cache costs one metadata request (`info`, an HTTP
HEAD) and never reads the remote file's bytes. When that request fails (offline), the most
recent cached copy of the URL is used with a warning. Downloads go to a temporary file in
the same directory and are renamed into place only once complete, so an interrupted
download never looks like a cached file.
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
import pickle
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

DEFAULT_CACHE = "~/.cache/circuits"
# Fields of `fs.info()` that change when a remote file changes, best first (HTTP: ETag,
# Last-Modified; S3: ETag, LastModified; memory: created; local: mtime).
_VERSION_FIELDS = ("ETag", "etag", "Last-Modified", "LastModified", "last_modified", "mtime", "modified", "created")
_COPY_CHUNK = 1 << 22


class StoreError(OSError):
    """A store file that cannot be read (unreachable URL, permission, ...); names the file."""


class CheckpointError(ValueError):
    """A `final_model.pt` that is not a readable torch checkpoint; names the file."""


def cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The download cache: the argument, else `CIRCUITS_CACHE`, else `~/.cache/circuits`."""
    chosen = explicit if explicit is not None else os.environ.get("CIRCUITS_CACHE") or DEFAULT_CACHE
    return Path(chosen).expanduser()


class Store:
    """One store root (local directory or fsspec URL); file names are relative to it."""

    def __init__(self, url: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> None:
        self.url = str(url).rstrip("/") or "/"
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.root = self.root.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self._cache_dir = cache_dir

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # ---- names ---------------------------------------------------------------------
    def path(self, rel: str = "") -> str:
        """The full URL (or local path) of a file in the store, as shown in messages."""
        rel = rel.strip("/")
        return f"{self.url}/{rel}" if rel else self.url

    def _fspath(self, rel: str) -> str:
        rel = rel.strip("/")
        return f"{self.root}/{rel}" if rel else self.root

    # ---- metadata and reading ------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self._call(rel, self.fs.exists)

    def info(self, rel: str) -> dict[str, Any]:
        return self._call(rel, self.fs.info)

    def ls(self, rel: str = "") -> list[str]:
        """Sorted names of the children of a directory (names only, not paths)."""
        entries = self._call(rel, lambda p: self.fs.ls(p, detail=False))
        own = self._fspath(rel).rstrip("/")
        return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != own})

    def open(self, rel: str, mode: str = "rb", **kwargs: Any) -> BinaryIO:
        return self._call(rel, lambda p: self.fs.open(p, mode, **kwargs))

    def read_bytes(self, rel: str) -> bytes:
        return self._call(rel, self.fs.cat_file)

    def sha256(self, rel: str) -> str:
        digest = hashlib.sha256()
        with self.open(rel) as f:
            while chunk := f.read(_COPY_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def _call(self, rel: str, fn):
        """Run an fsspec call on a store file, turning failures into errors that name it."""
        full = self.path(rel)
        try:
            return fn(self._fspath(rel))
        except FileNotFoundError as e:
            # fsspec's HTTP backend reports every failure (refused connection, 500, ...) as
            # FileNotFoundError; only a 404 really means "no such file".
            cause = e.__cause__
            if cause is not None and getattr(cause, "status", None) != 404:
                raise StoreError(f"{full}: cannot reach ({type(cause).__name__}: {cause})") from cause
            raise FileNotFoundError(f"{full}: no such file or directory") from None
        except (IsADirectoryError, NotADirectoryError, PermissionError) as e:
            raise type(e)(f"{full}: {e}") from None
        except Exception as e:  # network and backend errors come in many types (aiohttp, botocore, ...)
            raise StoreError(f"{full}: cannot read ({type(e).__name__}: {e})") from e

    # ---- local copies --------------------------------------------------------------
    def local(self, rel: str) -> Path:
        """A local path holding the file: the file itself for a local store, else a cached download."""
        if self.is_local:
            path = Path(self._fspath(rel))
            if not path.is_file():
                raise FileNotFoundError(f"{self.path(rel)}: no such file")
            return path
        try:
            info = self.info(rel)
        except StoreError as e:
            fallback = self._newest_cached(rel)
            if fallback is None:
                raise
            warnings.warn(f"{e}; using the cached copy {fallback}", stacklevel=2)
            return fallback
        target = self._cache_path(rel, info)
        if target.is_file() and (info.get("size") is None or target.stat().st_size == info["size"]):
            return target
        self._download(rel, info, target)
        return target

    def cached(self, rel: str) -> Path | None:
        """The local copy of a file if it is already at hand (local store or cache hit), else None."""
        if self.is_local:
            return self.local(rel)
        target = self._cache_path(rel, self.info(rel))
        return target if target.is_file() else None

    def _url_dir(self, rel: str) -> Path:
        key = hashlib.sha256(self.path(rel).encode()).hexdigest()[:32]
        return cache_dir(self._cache_dir) / "files" / key

    def _cache_path(self, rel: str, info: dict[str, Any]) -> Path:
        version = next((str(info[k]) for k in _VERSION_FIELDS if info.get(k) is not None), "")
        key = hashlib.sha256(f"{info.get('size')}\0{version}".encode()).hexdigest()[:16]
        return self._url_dir(rel) / f"{key}-{rel.rstrip('/').rsplit('/', 1)[-1]}"

    def _newest_cached(self, rel: str) -> Path | None:
        name = rel.rstrip("/").rsplit("/", 1)[-1]
        candidates = [p for p in self._url_dir(rel).glob(f"*-{name}") if p.is_file()]
        return max(candidates, key=lambda p: p.stat().st_mtime, default=None)

    def _download(self, rel: str, info: dict[str, Any], target: Path) -> None:
        from tqdm.auto import tqdm

        size = info.get("size")

        def copy(out: BinaryIO) -> None:
            got = 0
            big = (size or 0) > 1 << 24  # a progress bar only where a download takes a while
            with (
                self.open(rel, "rb") as src,
                tqdm(total=size, unit="B", unit_scale=True, desc=f"download {rel}", disable=None if big else True) as bar,
            ):
                while chunk := _read_remote(src, self.path(rel)):
                    out.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
            if size is not None and got != size:
                raise StoreError(f"{self.path(rel)}: download stopped after {got} of {size} bytes")

        write_atomic(target, copy)


def write_atomic(target: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Write a local file atomically: `write(f)` fills a temp file in the same directory,
    which is renamed over `target` only if it returns; on any error the temp file is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_remote(f: BinaryIO, name: str) -> bytes:
    try:
        return f.read(_COPY_CHUNK)
    except Exception as e:
        raise StoreError(f"{name}: read failed ({type(e).__name__}: {e})") from e


# ---- one tensor out of a checkpoint, by ranged reads ---------------------------------------

# torch.save names each tensor's storage by a legacy typed-storage class; its element dtype:
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


@dataclass(frozen=True)
class _StorageRef:
    key: str  # the storage's file name under `<top>/data/`
    dtype: torch.dtype


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *_ignored) -> _TensorRef:
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *_ignored):
    return data


class _CheckpointIndexUnpickler(pickle.Unpickler):
    """Reads a torch `data.pkl` into {key: _TensorRef} without creating tensors or running code.

    Only the handful of globals a state dict needs resolve, each to a harmless stand-in;
    anything else is refused.
    """

    _GLOBALS = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }

    def __init__(self, file: BinaryIO, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._GLOBALS:
            return self._GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        raise CheckpointError(f"{self.source}: data.pkl refers to {module}.{name}, which a state dict never needs; refusing it")

    def persistent_load(self, pid: Any) -> _StorageRef:
        # torch.save writes ('storage', storage_type, key, location, numel).
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage" and pid[1] in _STORAGE_DTYPES):
            raise CheckpointError(f"{self.source}: unexpected persistent id {pid!r} in data.pkl")
        return _StorageRef(str(pid[2]), _STORAGE_DTYPES[pid[1]])


def _checkpoint_file(location: str | os.PathLike) -> tuple[Store, str]:
    """(store of the containing directory, file name) for a model directory or a .pt file."""
    location = str(location).rstrip("/")
    if location.endswith(".pt"):
        parent, _, name = location.rpartition("/")
        return Store(parent or "."), name
    return Store(location), "final_model.pt"


def open_checkpoint_zip(f: BinaryIO, source: str) -> tuple[zipfile.ZipFile, str]:
    """Open a torch checkpoint zip; return it and its top-level folder name (which varies)."""
    try:
        zf = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, EOFError, ValueError) as e:
        raise CheckpointError(f"{source}: not a zip archive, so not a torch checkpoint (truncated download? {e})") from None
    tops = [n[: -len("/data.pkl")] for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(tops) != 1:
        raise CheckpointError(f"{source}: expected one <folder>/data.pkl in the zip, found {len(tops)}")
    top = tops[0]
    if f"{top}/byteorder" in zf.namelist() and zf.read(f"{top}/byteorder").strip() not in (b"little", b""):
        raise CheckpointError(f"{source}: big-endian checkpoints are not supported")
    return zf, top


def _check_record(source: str, key: str, ref: _TensorRef, record: zipfile.ZipInfo) -> None:
    """Refuse, before reading it, a storage record that would inflate (torch never compresses) or
    a view that reaches outside it or holds more elements than it (a zero-stride view's copy)."""
    from inference.safe_load import UnsafeFileError, check_view

    if record.compress_type != zipfile.ZIP_STORED:
        raise CheckpointError(f"{source}: the storage of {key!r} is a compressed zip record; torch.save never writes one")
    try:
        check_view(source, repr(key), ref.size, ref.stride, ref.offset, record.file_size // ref.storage.dtype.itemsize)
    except UnsafeFileError as e:
        raise CheckpointError(str(e)) from None


def read_tensor(location: str | os.PathLike, key: str, cache_dir: str | os.PathLike | None = None) -> torch.Tensor:
    """Read one named tensor (e.g. `transformer.wte.weight`) out of a `final_model.pt`.

    `location` is a model directory or the checkpoint's own path/URL. Reads only the zip's
    central directory, `data.pkl` and that tensor's storage (ranged reads); when the file is
    local or already in the download cache, reads the local copy instead.
    """
    store, name = _checkpoint_file(location)
    if cache_dir is not None:
        store._cache_dir = cache_dir
    source = store.path(name)
    local = store.cached(name)
    # cache_type="none": every read is one exact ranged request, no read-ahead.
    f = open(local, "rb") if local is not None else store.open(name, "rb", cache_type="none")
    try:
        with f:
            zf, top = open_checkpoint_zip(f, source)
            with zf:
                try:
                    index = _CheckpointIndexUnpickler(io.BytesIO(zf.read(f"{top}/data.pkl")), source).load()
                except CheckpointError:
                    raise
                except Exception as e:
                    raise CheckpointError(f"{source}: cannot parse data.pkl ({type(e).__name__}: {e})") from None
                if not isinstance(index, dict):
                    raise CheckpointError(f"{source}: not a state dict (data.pkl holds a {type(index).__name__})")
                ref = index.get(key)
                if not isinstance(ref, _TensorRef):
                    raise KeyError(f"{source}: no tensor {key!r} in the checkpoint")
                record = zf.getinfo(f"{top}/data/{ref.storage.key}")
                _check_record(source, key, ref, record)
                raw = zf.read(record)
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{source}: corrupt zip entry ({e})") from None
    storage = torch.frombuffer(bytearray(raw), dtype=ref.storage.dtype) if raw else torch.empty(0, dtype=ref.storage.dtype)
    return storage.as_strided(ref.size, ref.stride, ref.offset).clone()
