"""Checks that make loading a torch/pickle data file safe *and* bounded, before anything is built.

`torch.load(weights_only=True)` and the project's restricted unpicklers never run code from a
file, but a small hostile file can still make them allocate a lot: a compressed zip record that
inflates to gigabytes, a storage whose declared size exceeds the file, or a tensor view with zero
or overlapping strides whose every later copy (`.numpy().astype`, `np.rint`, `.clone()`) is
terabytes. This module inspects a file's structure without creating any tensor:

- `check_torch_zip(path, source)`: a `torch.save` zip. Storage records must be stored
  uncompressed (torch never compresses them, and a stored record cannot be larger than the file)
  and no entry may inflate beyond the file's size; `data.pkl` is
  scanned by `ScanUnpickler`, which resolves globals to inert stand-ins (refusing, by name, any
  global that a tensor / array / plain-container file does not need) and records each storage's
  declared size and each tensor's shape, stride and offset; declared sizes must fit their records
  and every tensor must fit its storage with no more elements than the storage holds.
- `check_legacy_torch(f, source)`: the same for the pre-zip `torch.save` format (the storage blobs
  that a plain pickle of a tensor embeds, and legacy `.pt` files).
- `check_view(...)`: the per-tensor rule, also used by unpicklers that rebuild tensors themselves;
  `check_reconstruct(...)`: the same for numpy arrays, whose unpickling first allocates an
  uninitialised array of the pickled shape.

Each problem raises `UnsafeFileError` (a ValueError) naming the file and the key (the path of
the tensor inside the loaded object, e.g. `importances.task_samples[1]['0.mlp'][3]`).
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch


class UnsafeFileError(ValueError):
    """A data file refused before loading; the message names the file, the key and the problem."""


# Element sizes of the storage classes torch.save names (zip: persistent ids; legacy: globals).
STORAGE_ITEMSIZE = {
    "FloatStorage": 4, "DoubleStorage": 8, "HalfStorage": 2, "BFloat16Storage": 2, "LongStorage": 8,
    "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1, "BoolStorage": 1,
    "ComplexFloatStorage": 8, "ComplexDoubleStorage": 16, "UntypedStorage": 1,
}  # fmt: skip
STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}  # fmt: skip
_REBUILD_TENSOR = {
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v3"),
}
_PASS_THROUGH = {("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state")}
# Globals a checkpoint or viz_data file may name besides tensors: containers, numbers, numpy arrays.
_INERT = {
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
    ("builtins", "bytearray"), ("builtins", "complex"), ("_codecs", "encode"), ("torch", "Size"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "_reconstruct"), ("torch", "Tensor"),
}  # fmt: skip
_NUMPY_DTYPE_MODULE = "numpy.dtypes"  # numpy.dtypes.Float32DType etc.


def refusal(source: str, module: str, name: str) -> str:
    return (
        f"{source}: cannot be loaded safely: refusing to load global {module}.{name} (a file of tensors, "
        "arrays and plain containers never needs it; no code from data files is ever run)"
    )


@dataclass
class StorageRef:
    key: str
    itemsize: int
    numel: int | None  # declared (None if the format does not declare it)
    dtype_name: str


@dataclass
class TensorRef:
    storage: Any
    offset: int
    size: tuple
    stride: tuple


class _Inert:
    """Stands for any allowed non-tensor object during a scan: callable, buildable, inert."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:
        return _Inert(*args)

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:  # OrderedDict-like BUILD / SETITEMS targets
        pass

    def __reduce__(self):  # never pickled; keeps linters quiet about __setstate__ without __getstate__
        raise TypeError("inert")


MAX_RECONSTRUCT_BYTES = 1 << 20


def _itemsize(spec: Any) -> int:
    """Element size of a numpy dtype spec as a pickle gives it (b'b', 'f4', a dtype, a stand-in)."""
    import numpy as np

    if isinstance(spec, _Inert) and spec.args:
        spec = spec.args[0]
    try:
        if isinstance(spec, (bytes, bytearray)):
            spec = bytes(spec).decode("latin1")
        if isinstance(spec, (str, np.dtype)):
            return max(np.dtype(spec).itemsize, 1)
    except (TypeError, ValueError):
        pass
    return 1


def check_reconstruct(source: str, key: str, shape: Any, dtype: Any) -> None:
    """numpy's unpickling first creates an *uninitialised* array of the pickled shape (numpy itself
    always writes `(0,)`, then fills it); a hostile shape would allocate before any data is read."""
    if not (isinstance(shape, tuple) and all(isinstance(n, int) and n >= 0 for n in shape)):
        raise UnsafeFileError(f"{source}: numpy array {key}: malformed shape {shape!r:.60}")
    nbytes = math.prod(shape) * _itemsize(dtype)
    if nbytes > MAX_RECONSTRUCT_BYTES:
        raise UnsafeFileError(
            f"{source}: numpy array {key} is created with shape {shape} ({nbytes:,} uninitialised bytes) before "
            "its data; numpy writes shape (0,) there, so this file is not numpy's; refusing it"
        )


class _NdStub(_Inert):
    """numpy's `_reconstruct(cls, shape, dtype)` during a scan: checked (with its key) after the scan."""

    def __init__(self, cls: Any = None, shape: Any = (0,), dtype: Any = b"b", *rest: Any) -> None:
        super().__init__(cls, shape, dtype, *rest)
        self.shape, self.dtype = shape, dtype


def _rebuild_ref(storage: Any, offset: Any = 0, size: Any = (), stride: Any = (), *_rest: Any) -> TensorRef:
    return TensorRef(
        storage,
        offset,
        tuple(size) if isinstance(size, (tuple, list)) else size,
        tuple(stride) if isinstance(stride, (tuple, list)) else stride,
    )


class ScanUnpickler(pickle.Unpickler):
    """Unpickles a torch `data.pkl` (or a legacy pickle) into stand-ins: `TensorRef`s for tensors,
    `StorageRef`s for storages, `_Inert` for other allowed objects; refuses any other global by name."""

    def __init__(self, file: BinaryIO, source: str) -> None:
        super().__init__(file)
        self.source = source
        self.storages: dict[str, StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _REBUILD_TENSOR:
            return _rebuild_ref
        if (module, name) in _PASS_THROUGH:
            return lambda data, *_a: data
        if (module, name) == ("torch._tensor", "_rebuild_from_type_v2"):  # func is one of our stand-ins
            return lambda func, _type, args, *_a: func(*args) if callable(func) else _Inert(func, args)
        if module in ("torch", "torch.cuda") and name in STORAGE_ITEMSIZE:
            return name
        if name == "_reconstruct" and module in ("numpy._core.multiarray", "numpy.core.multiarray"):
            return _NdStub
        if (module, name) in _INERT or module == _NUMPY_DTYPE_MODULE and name.endswith("DType"):
            if (module, name) == ("collections", "OrderedDict"):
                return collections.OrderedDict  # a state dict's: BUILD then sets its `_metadata`
            return _Inert
        raise UnsafeFileError(refusal(self.source, module, name))

    def persistent_load(self, pid: Any) -> StorageRef:
        # zip: ('storage', type, key, location, numel); legacy: the same plus view metadata.
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and pid[1] in STORAGE_ITEMSIZE):
            raise UnsafeFileError(f"{self.source}: unexpected persistent id {str(pid)[:200]} in the pickle")
        key, numel = str(pid[2]), pid[4]
        if not isinstance(numel, int) or numel < 0:
            raise UnsafeFileError(f"{self.source}: storage {key} declares {numel!r} elements")
        ref = self.storages.get(key) or StorageRef(key, STORAGE_ITEMSIZE[pid[1]], numel, pid[1])
        self.storages[key] = ref
        return ref


def _is_int_tuple(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in x)


def check_view(source: str, key: str, size: Any, stride: Any, offset: Any, storage_numel: int) -> None:
    """A tensor view (size, stride, offset) over a storage of `storage_numel` elements must lie
    inside it and hold no more elements than it (no zero-stride broadcasts, no overlaps that
    make a copy larger than the file)."""
    where = f"{source}: tensor {key}"
    if not (_is_int_tuple(size) and _is_int_tuple(stride) and isinstance(offset, int)) or len(size) != len(stride):
        raise UnsafeFileError(f"{where}: malformed shape {size!r} / stride {stride!r} / offset {offset!r}")
    if any(s < 0 for s in size) or any(s < 0 for s in stride) or offset < 0:
        raise UnsafeFileError(f"{where}: negative shape, stride or offset ({size}, {stride}, {offset})")
    numel = math.prod(size)
    if numel == 0:
        return
    extent = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) + 1
    if extent > storage_numel:
        raise UnsafeFileError(
            f"{where}: shape {size} stride {stride} offset {offset} reaches element {extent - 1}, but its storage holds {storage_numel}"
        )
    if numel > storage_numel:
        raise UnsafeFileError(
            f"{where}: shape {size} (stride {stride}) has {numel:,} elements over a storage of {storage_numel:,}: "
            "a broadcast/overlapping view whose copy would be far larger than the file; refusing it"
        )


def _child(path: str, k: Any) -> str:
    return k if not path and isinstance(k, str) else f"{path}[{k!r}]"


def tensor_refs(obj: Any) -> list[tuple[str, Any]]:
    """Every TensorRef (and numpy array stand-in) in a scanned object, with its key path
    (`importances['task_samples'][1]`)."""
    out: list[tuple[str, Any]] = []
    stack: list[tuple[str, Any]] = [("", obj)]
    seen: set[int] = set()
    while stack:
        p, x = stack.pop()
        if isinstance(x, (TensorRef, _NdStub)):
            out.append((p or "<top>", x))
        elif isinstance(x, (dict, list, tuple, _Inert)) and id(x) not in seen:
            seen.add(id(x))
            if isinstance(x, dict):
                stack.extend((_child(p, k), v) for k, v in x.items())
            elif isinstance(x, _Inert):
                stack.extend((f"{p}<arg{i}>", v) for i, v in enumerate(x.args))
            else:
                stack.extend((_child(p, i), v) for i, v in enumerate(x))
    return out


def _check_refs(obj: Any, source: str, storage_numel: dict[str, int]) -> None:
    for key, ref in tensor_refs(obj):
        if isinstance(ref, _NdStub):
            check_reconstruct(source, key, ref.shape, ref.dtype)
            continue
        st = ref.storage
        if not isinstance(st, StorageRef):
            raise UnsafeFileError(f"{source}: tensor {key}: its storage is not a storage record")
        check_view(source, key, ref.size, ref.stride, ref.offset, storage_numel[st.key])


def check_torch_zip(path: str | os.PathLike, source: str) -> None:
    """Refuse a `torch.save` zip whose structure would make loading it allocate beyond its size."""
    size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            tops = [
                i.filename[: -len("/data.pkl")] for i in infos if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1
            ]
            if len(tops) != 1:
                raise UnsafeFileError(f"{source}: expected one <folder>/data.pkl in the zip, found {len(tops)}")
            top = tops[0]
            records = {}
            for i in infos:
                if i.compress_type != zipfile.ZIP_STORED and (i.file_size > size or "/data/" in i.filename):
                    raise UnsafeFileError(
                        f"{source}: zip entry {i.filename} is compressed ({i.compress_size:,} -> {i.file_size:,} bytes); "
                        "torch.save never compresses, and inflating it could allocate far more than the file holds"
                    )
                if i.file_size > size:
                    raise UnsafeFileError(
                        f"{source}: zip entry {i.filename} claims {i.file_size:,} bytes in a {size:,}-byte file"
                    )
                records[i.filename] = i.file_size
            scan = ScanUnpickler(io.BytesIO(zf.read(f"{top}/data.pkl")), source)
            try:
                obj = scan.load()
            except UnsafeFileError:
                raise
            except Exception as e:  # noqa: BLE001 - a malformed pickle
                raise UnsafeFileError(f"{source}: cannot parse data.pkl ({type(e).__name__}: {e})") from None
    except zipfile.BadZipFile as e:
        raise UnsafeFileError(f"{source}: corrupt zip archive ({e})") from None
    numel = {}
    for key, st in scan.storages.items():
        rec = records.get(f"{top}/data/{key}")
        if rec is None:
            raise UnsafeFileError(f"{source}: storage {key} has no record {top}/data/{key} in the zip")
        if st.numel * st.itemsize > rec:
            raise UnsafeFileError(
                f"{source}: storage {key} declares {st.numel:,} x {st.itemsize} bytes, its record holds {rec:,}"
            )
        numel[key] = st.numel
    _check_refs(obj, source, numel)


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def check_legacy_torch(f: BinaryIO, source: str) -> None:
    """Refuse a legacy (pre-zip) `torch.save` stream whose declared storages exceed its bytes.

    Layout: pickles of the magic number, protocol version and sys info; the object's pickle (whose
    persistent ids declare each storage's element count); the list of storage keys; then per key
    an 8-byte element count and the raw data.
    """
    start = f.tell()
    f.seek(0, io.SEEK_END)
    end = f.tell()
    f.seek(start)
    try:
        if pickle.load(f) != _LEGACY_MAGIC:  # plain ints: safe with any unpickler, but use the scanner anyway
            raise UnsafeFileError(
                f"{source}: cannot be loaded safely (neither a torch zip archive nor a legacy torch.save stream; truncated?)"
            )
        for _ in range(2):
            ScanUnpickler(f, source).load()
        scan = ScanUnpickler(f, source)
        obj = scan.load()
        keys = ScanUnpickler(f, source).load()
    except UnsafeFileError:
        raise
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UnsafeFileError(
            f"{source}: cannot be loaded safely (not a torch zip archive, nor a readable legacy torch.save stream: {type(e).__name__}: {first})"
        ) from None
    if not isinstance(keys, list) or set(map(str, keys)) != set(scan.storages):
        raise UnsafeFileError(f"{source}: the storage list does not match the storages the pickle uses")
    numel = {}
    for key in keys:
        st = scan.storages[str(key)]
        header = f.read(8)
        if len(header) != 8:
            raise UnsafeFileError(f"{source}: storage {key} is missing (file ends early)")
        (n,) = struct.unpack("<q", header)
        if n != st.numel or n < 0:
            raise UnsafeFileError(f"{source}: storage {key} declares {st.numel} elements, its data header {n}")
        nbytes = n * st.itemsize
        if f.tell() + nbytes > end:
            raise UnsafeFileError(f"{source}: storage {key} declares {nbytes:,} bytes, the file holds {end - f.tell():,} more")
        f.seek(nbytes, io.SEEK_CUR)
        numel[str(key)] = n
    f.seek(start)
    _check_refs(obj, source, numel)


_GLOBAL_RE = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)")


def explain_torch_error(e: BaseException, source: str) -> str:
    """A torch.load failure as one line naming the file; for a refused global, the global's name
    and no advice to turn the safety off (torch's message suggests `weights_only=False`)."""
    text = str(e)
    m = _GLOBAL_RE.search(text)
    if m:
        module, _, name = m.group(1).rpartition(".")
        return refusal(source, module, name)
    first = next((line.strip() for line in text.splitlines() if line.strip() and "weights_only" not in line), type(e).__name__)
    return f"{source}: cannot be loaded safely ({type(e).__name__}: {first})"
