"""Read a store in the released layout through fsspec, with a local download cache.

A *store* is a local directory or any fsspec URL (`file://`, `https://`, `memory://`,
`s3://` when s3fs is installed) laid out as in `shared/spec/checkpoint-format.md`.

    store = Store("https://openaipublic.blob.core.windows.net/circuit-sparsity")
    path = store.local("models/csp_yolo1/final_model.pt")    # downloaded once, then cached
    wte = read_tensor(store.path("models/csp_yolo1"), "transformer.wte.weight")  # ranged reads

Azure Blob Storage goes through `adlfs` (fsspec's Azure backend), never plain https: a blob
container has no HTML index, so only the Blob service's own API can list it. Two URL forms:

- `https://<account>.blob.core.windows.net/<container>[/<prefix>]`: the account is the URL's.
- `az://<container>[/<prefix>]` (also `abfs://`, `abfss://`): the account comes from the ordinary
  Azure variables, `AZURE_STORAGE_CONNECTION_STRING` (its `BlobEndpoint` / `AccountName`) or
  `AZURE_STORAGE_ACCOUNT_NAME`, else `openaipublic` (the release's account). An emulator such
  as azurite is reached this way: `AZURE_STORAGE_CONNECTION_STRING="BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;"`.

Access is anonymous (the release's container is public) unless credentials are in the ordinary
Azure variables (`AZURE_STORAGE_ACCOUNT_KEY`, `AZURE_STORAGE_SAS_TOKEN`, a service principal's
`AZURE_STORAGE_CLIENT_ID` / `_SECRET` / `TENANT_ID`, or a connection string holding a key);
`AZURE_STORAGE_ANON=false` asks adlfs for `DefaultAzureCredential` (e.g. `az login`). For an
https URL, credentials of another account (a connection string or `AZURE_STORAGE_ACCOUNT_NAME`
naming a different one) are not sent: that URL is read anonymously.

The cache: a remote file is stored under `cache_dir()` keyed by the file's identity (the
service's own URL of it, so `az://` and https spellings of one blob share an entry) *and* by
what the store reports about it (size, ETag, content MD5, modification time: any change fetches
it again). Looking a file up in the cache costs one metadata request (`info`, a HEAD) and never
reads the remote file's bytes. When that request fails (offline), the most recent cached copy of
the file is used with a warning. A download is verified before it enters the cache: its length
against the size the store lists, its MD5 against the service's `content_md5` when there is one
(Azure gives it for blobs uploaded whole). It goes to a temporary `.part` file in the same
directory (locked while written) and is renamed into place only once verified, so an interrupted
or truncated download never looks like a cached file; `.part` files left by a killed process are
removed when the next `Store` opens the cache. A file whose size the store does not report (an
HTTP server without Content-Length) cannot be verified: it is downloaded again on every use and
never served from the cache.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import fcntl
import hashlib
import io
import os
import pickle
import re
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from inference import settings
from inference.files import TMP_SUFFIX, write_atomic

__all__ = ["Store", "StoreError", "CheckpointError", "cache_dir", "azure_location", "read_tensor", "write_atomic"]

# Fields of `fs.info()` that change when a remote file changes (HTTP: ETag, Content-MD5, Digest,
# Last-Modified; S3: ETag, LastModified; Azure: etag, last_modified; memory: created; local:
# mtime). The cache key holds every one present, so a change to any of them is a new version.
_VERSION_FIELDS = (
    "ETag",
    "etag",
    "Content-MD5",
    "Digest",
    "Last-Modified",
    "LastModified",
    "last_modified",
    "mtime",
    "modified",
    "created",
)
_COPY_CHUNK = 1 << 22
# A `.part` file older than this whose lock nobody holds belongs to a killed download. (The age
# guards the instant between a download creating its temp file and locking it.)
_STALE_PART_S = 60.0
_UNVERIFIED = "unverified"  # cache subdirectory of downloads whose size the store did not report

DEFAULT_AZURE_ACCOUNT = "openaipublic"
AZURE_PROTOCOLS = ("az", "abfs", "abfss")
_AZURE_HOST = re.compile(r"(?P<account>[a-z0-9]+)\.blob\.core\.[a-z0-9.]+")


class StoreError(OSError):
    """A store file that cannot be read (unreachable URL, permission, ...); names the file."""


class CheckpointError(ValueError):
    """A `final_model.pt` that is not a readable torch checkpoint; names the file."""


def cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The download cache: the argument, else `CIRCUITS_CACHE`, else `~/.cache/circuits`."""
    chosen = explicit if explicit is not None else settings.cache_dir()
    return Path(chosen).expanduser()


# ---- Azure Blob URLs -> adlfs -------------------------------------------------------------------


def _connection_account(conn: str) -> str | None:
    """The account a connection string names: `AccountName`, else its `BlobEndpoint`'s account."""
    fields = dict(p.split("=", 1) for p in conn.split(";") if "=" in p)
    if fields.get("AccountName"):
        return fields["AccountName"]
    if fields.get("UseDevelopmentStorage", "").lower() == "true":
        return "devstoreaccount1"
    endpoint = urlsplit(fields.get("BlobEndpoint", ""))
    m = _AZURE_HOST.fullmatch(endpoint.hostname or "")
    return m["account"] if m else (endpoint.path.strip("/") or None)  # path-style (emulator): /<account>


def azure_location(url: str) -> tuple[dict[str, Any], str] | None:
    """(adlfs options, `<container>[/<prefix>]`) of an Azure Blob store URL; None for other URLs.

    See the module doc for the URL forms and where the account and credentials come from."""
    parts = urlsplit(str(url))
    env_conn = settings.azure_connection_string()
    env_account = settings.azure_account_name()
    anon = settings.azure_anonymous()
    if parts.scheme in AZURE_PROTOCOLS:
        path = (parts.netloc + parts.path).strip("/")
        if not path:
            raise ValueError(f"{url}: an az:// store URL names a container: az://<container>[/<prefix>]")
        if env_conn:  # passed explicitly: fsspec caches filesystems by their arguments, not the env
            return {"connection_string": env_conn, "anon": anon}, path
        return {"account_name": env_account or DEFAULT_AZURE_ACCOUNT, "anon": anon}, path
    m = _AZURE_HOST.fullmatch(parts.hostname or "") if parts.scheme in ("http", "https") else None
    if m is None:
        return None
    account, path = m["account"], parts.path.strip("/")
    if not path:
        raise ValueError(
            f"{url}: an Azure Blob store URL names a container: https://<account>.blob.core.windows.net/<container>[/<prefix>]"
        )
    env_names = _connection_account(env_conn) if env_conn else env_account
    if env_names not in (None, account):  # the environment's credentials are another account's
        return {"connection_string": f"BlobEndpoint={parts.scheme}://{parts.netloc};", "anon": True}, path
    if env_conn:
        return {"connection_string": env_conn, "anon": anon}, path
    options: dict[str, Any] = {"account_name": account, "anon": anon}
    if parts.netloc != f"{account}.blob.core.windows.net":  # another Azure cloud's suffix
        options["account_host"] = parts.netloc
    return options, path


def _filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str, str]:
    """(filesystem, root path in it, identity URL for cache keys) of a store URL."""
    azure = azure_location(url)
    if azure is None:
        fs, root = fsspec.core.url_to_fs(url)
        return fs, root.rstrip("/"), url
    options, root = azure
    # No listings cache: a long-lived process (the Dagster sensor) must see new files.
    fs = fsspec.filesystem("az", use_listings_cache=False, **options)
    _shorter_backoff(fs)
    # The service's own URL: one cache entry per blob whichever way the store was spelled.
    return fs, root, f"{fs.service_client.url.rstrip('/')}/{root}"


def _shorter_backoff(fs) -> None:
    """Retry after ~2, 4, 6 s instead of the Azure SDK's 15, 18, 24 s (+-3): offline, a request
    otherwise takes ~85 s to fail before the cached copy is used, per file. adlfs does not pass
    retry settings on, so the service client's policy (shared by every container and blob client
    made from it) is adjusted in place; if that attribute moves in a later SDK, defaults apply."""
    policy = getattr(getattr(getattr(fs, "service_client", None), "_config", None), "retry_policy", None)
    if policy is not None and hasattr(policy, "initial_backoff") and hasattr(policy, "increment_base"):
        policy.initial_backoff, policy.increment_base, policy.random_jitter_range = 2, 2, 1


# ---- the store ----------------------------------------------------------------------------------


def _content_md5(info: dict[str, Any]) -> str | None:
    """The MD5 the service reports for a file, as hex (Azure `content_md5` bytes, HTTP Content-MD5 base64)."""
    raw = (info.get("content_settings") or {}).get("content_md5") if isinstance(info.get("content_settings"), dict) else None
    raw = raw if raw is not None else info.get("content_md5", info.get("Content-MD5"))
    if not raw:
        return None
    if isinstance(raw, (bytes, bytearray)):
        return bytes(raw).hex() if len(raw) == 16 else None
    text = str(raw).strip()
    if re.fullmatch(r"[0-9a-fA-F]{32}", text):
        return text.lower()
    try:
        digest = base64.b64decode(text, validate=True)
    except ValueError:
        return None
    return digest.hex() if len(digest) == 16 else None


def _version_key(info: dict[str, Any]) -> str:
    fields = [f"{k}={info[k]}" for k in _VERSION_FIELDS if info.get(k) is not None]
    md5 = _content_md5(info)
    return "\0".join([f"size={info.get('size')}", *fields, f"md5={md5}"])


_CLEANED: set[Path] = set()


def clean_stale_downloads(root: str | os.PathLike | None = None, min_age_s: float = _STALE_PART_S) -> list[Path]:
    """Remove the `.part` files that killed downloads left in the cache; returns what was removed.

    A live download holds an exclusive `flock` on its `.part` file for as long as it writes, so
    a file that is old enough and not locked belongs to a process that is gone."""
    files = cache_dir(root) / "files"
    removed = []
    now = time.time()
    for part in (*files.glob(f"*/*{TMP_SUFFIX}"), *files.glob(f"*/{_UNVERIFIED}/*{TMP_SUFFIX}")):
        with contextlib.suppress(OSError):
            if now - part.stat().st_mtime < min_age_s:
                continue
            with open(part, "rb") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a download in progress
                part.unlink()
                removed.append(part)
    return removed


class Store:
    """One store root (local directory or fsspec URL); file names are relative to it."""

    def __init__(self, url: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> None:
        self.url = str(url).rstrip("/") or "/"
        self.fs, self.root, self._identity = _filesystem(self.url)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self._cache_dir = cache_dir
        if not self.is_local:
            self._clean_cache_once()

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def _clean_cache_once(self) -> None:
        root = globals()["cache_dir"](self._cache_dir).resolve()
        if root not in _CLEANED:
            _CLEANED.add(root)
            for part in clean_stale_downloads(root):
                warnings.warn(f"removed {part}, left by an interrupted download", stacklevel=3)

    # ---- names ---------------------------------------------------------------------
    def path(self, rel: str = "") -> str:
        """The full URL (or local path) of a file in the store, as shown in messages."""
        rel = rel.strip("/")
        return f"{self.url}/{rel}" if rel else self.url

    def _fspath(self, rel: str) -> str:
        rel = rel.strip("/")
        return f"{self.root}/{rel}" if rel else self.root

    def rel(self, fspath: str) -> str:
        """The store-relative name of a path returned by the filesystem (inverse of `_fspath`)."""
        p, root = fspath.rstrip("/"), self.root.rstrip("/")
        return p[len(root) :].lstrip("/") if p == root or p.startswith(root + "/") else p

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

    def find(self, rel: str = "") -> dict[str, dict[str, Any]]:
        """Every file under a directory, recursively: {store-relative name: info (size, ...)}.

        On an object store this is one flat listing (a few requests for thousands of files)
        instead of one request per directory. {} when the directory does not exist."""
        try:
            found = self._call(rel, lambda p: self.fs.find(p, detail=True))
        except (FileNotFoundError, NotADirectoryError):
            return {}
        return {self.rel(p): info for p, info in sorted(found.items()) if info.get("type", "file") != "directory"}

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
            status = getattr(cause, "status", getattr(cause, "status_code", None))
            if cause is not None and status != 404:
                raise StoreError(f"{full}: cannot reach ({type(cause).__name__}: {cause})") from cause
            raise FileNotFoundError(f"{full}: no such file or directory") from None
        except (IsADirectoryError, NotADirectoryError, PermissionError) as e:
            raise type(e)(f"{full}: {e}") from None
        except Exception as e:  # network and backend errors come in many types (aiohttp, botocore, azure.core, ...)
            raise StoreError(f"{full}: cannot read ({type(e).__name__}: {e})") from e

    # ---- local copies --------------------------------------------------------------
    def local(self, rel: str, info: dict[str, Any] | None = None) -> Path:
        """A local path holding the file: the file itself for a local store, else a verified
        download from the cache (fetched first if missing or changed). `info`: the file's entry
        from a listing (`find`), which spares the metadata request."""
        if self.is_local:
            path = Path(self._fspath(rel))
            if not path.is_file():
                raise FileNotFoundError(f"{self.path(rel)}: no such file")
            return path
        if info is None:
            try:
                info = self.info(rel)
            except StoreError as e:
                fallback = self._newest_cached(rel)
                if fallback is None:
                    raise
                warnings.warn(f"{e}; using the cached copy {fallback}", stacklevel=2)
                return fallback
        target = self._cache_path(rel, info)
        if info.get("size") is not None and target.is_file() and target.stat().st_size == info["size"]:
            return target
        self._download(rel, info, target)
        return target

    def cached(self, rel: str) -> Path | None:
        """The local copy of a file if it is already at hand (local store or cache hit), else None."""
        if self.is_local:
            return self.local(rel)
        info = self.info(rel)
        target = self._cache_path(rel, info)
        return target if info.get("size") is not None and target.is_file() else None

    def _url_dir(self, rel: str) -> Path:
        identity = f"{self._identity}/{rel.strip('/')}" if rel.strip("/") else self._identity
        key = hashlib.sha256(identity.encode()).hexdigest()[:32]
        return cache_dir(self._cache_dir) / "files" / key

    def _cache_path(self, rel: str, info: dict[str, Any]) -> Path:
        name = rel.rstrip("/").rsplit("/", 1)[-1]
        if info.get("size") is None:  # unverifiable: never a cache entry (see the module doc)
            return self._url_dir(rel) / _UNVERIFIED / name
        key = hashlib.sha256(_version_key(info).encode()).hexdigest()[:16]
        return self._url_dir(rel) / f"{key}-{name}"

    def _newest_cached(self, rel: str) -> Path | None:
        name = rel.rstrip("/").rsplit("/", 1)[-1]
        candidates = [p for p in self._url_dir(rel).glob(f"*-{name}") if p.is_file()]
        return max(candidates, key=lambda p: p.stat().st_mtime, default=None)

    def _download(self, rel: str, info: dict[str, Any], target: Path) -> None:
        """Fetch a file into `target`, verified by size and MD5 where the store gives them."""
        from tqdm.auto import tqdm

        size, md5 = info.get("size"), _content_md5(info)
        if size is None:
            warnings.warn(f"{self.path(rel)}: the store does not report its size, so a download cannot be verified; "
                          "it is fetched on every use and never cached", stacklevel=3)  # fmt: skip

        def copy(out: BinaryIO) -> None:
            fcntl.flock(out.fileno(), fcntl.LOCK_EX)  # "in progress", for `clean_stale_downloads`
            got, digest = 0, hashlib.md5(usedforsecurity=False)
            # The bar appears only for a download that takes over a second, and only on a terminal.
            with (
                self.open(rel, "rb") as src,
                tqdm(total=size, unit="B", unit_scale=True, desc=f"download {rel}", delay=1.0, disable=None, leave=False) as bar,
            ):
                while chunk := _read_remote(src, self.path(rel)):
                    out.write(chunk)
                    digest.update(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
            if size is not None and got != size:
                raise StoreError(f"{self.path(rel)}: download stopped after {got} of {size} bytes; not cached")
            if md5 is not None and digest.hexdigest() != md5:
                raise StoreError(
                    f"{self.path(rel)}: downloaded bytes have MD5 {digest.hexdigest()}, the store lists {md5}; not cached"
                )

        write_atomic(target, copy)


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
