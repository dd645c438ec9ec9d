"""The released `viz_data` payload: safe loading and validation (the only code that knows its layout).

Contract: `shared/spec/viz-data-format.md`. `read_viz_data(path)` loads a `viz_data.pt`
(`torch.load(weights_only=True)`, with exactly numpy's ndarray reconstruction allow-listed) or a
`viz_data.pkl` (a restricted unpickler that builds only plain containers, numbers, strings, numpy
arrays and torch tensors), checks every field the converter relies on, and returns a `VizData`
whose fields are normalised (int channel keys, float fracs, int token ids, numpy arrays).
Any problem raises `VizDataError` with the file's name and what is wrong.

Node locations: a location string this code does not know (not per-layer, not `final_resid`) is
kept, not refused (`VizData.unknown_locations`); the file gets one `UnknownLocationWarning` naming
them, and the tables place their nodes in the "other" group.

Large per-node tensors (task activations, snippets) are kept as loaded (a `.pt` is memory-mapped)
and converted one node at a time by the accessors, so converting a release-scale file never holds
a second full copy of it.
"""

from __future__ import annotations

import io
import pickle
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference.circuit import is_known_location, parse_location
from inference.safe_load import (
    UnsafeFileError,
    check_legacy_torch,
    check_reconstruct,
    check_torch_zip,
    check_view,
    explain_torch_error,
    refusal,
)

FRACS = (0.001, 0.01, 0.1, 0.5)
BIAS = "bias"


class VizDataError(ValueError):
    """A viz_data file that cannot be read; the message names the file and the problem."""


class UnknownLocationWarning(UserWarning):
    """A viz_data file holds node locations this code does not know; their nodes are kept."""


# ---- safe loading --------------------------------------------------------------------------------

# What numpy needs to rebuild a numeric ndarray inside a weights_only torch.load: the
# reconstruction function, the array and dtype types, and the dtype class of each numeric dtype.
_NUMERIC_DTYPES = (
    np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
    np.float16, np.float32, np.float64,
)  # fmt: skip


def _numpy_allow_list() -> list:
    from numpy._core.multiarray import _reconstruct

    return [_reconstruct, np.ndarray, np.dtype] + [type(np.dtype(t)) for t in _NUMERIC_DTYPES]


def _load_storage_bytes(b: bytes, source: str):
    # A tensor pickled with plain pickle carries its storage as a legacy torch.save blob; torch's own
    # `_load_from_bytes` would load it with weights_only=False, so it is never allowed as such. Its
    # declared sizes are checked against its bytes first (a tiny blob may declare gigabytes).
    if not isinstance(b, (bytes, bytearray)):
        raise VizDataError(f"{source}: a tensor storage should be bytes, got {type(b).__name__}")
    check_legacy_torch(io.BytesIO(b), source)
    return torch.load(io.BytesIO(b), weights_only=True)


def _latin1_encode(text: Any, encoding: str = "latin1") -> bytes:
    # How protocol-2 pickles spell a bytes object: _codecs.encode(str, "latin1"). Only that.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is only allowed as protocol 2's latin-1 bytes")
    return text.encode("latin1")


def _numpy_scalar(dtype: Any, data: Any = None):
    from numpy._core.multiarray import scalar

    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError("only numeric numpy scalars are allowed")
    return scalar(dtype, data)


@dataclass(eq=False)  # hashable by identity: 0-d tensors serve as dict keys in some releases
class _PendingTensor:
    """A tensor the unpickler saw; built only after its view is checked against its storage."""

    storage: Any
    offset: Any
    size: Any
    stride: Any
    rest: tuple


class RestrictedUnpickler(pickle.Unpickler):
    """Builds only containers, numbers, strings, numpy arrays and torch tensors; refuses any other
    global, naming it. Reads every pickle protocol (0-5; protocol 2 spells bytes as `_codecs.encode`).

    Tensors come back as `_PendingTensor`s; `load()` checks each one's shape and strides against
    its storage (no zero-stride or overlapping views that would be huge once copied) and then
    builds it, naming the offending key otherwise.
    """

    _ALLOWED = {
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "slice"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("torch", "Size"),
    }
    _DTYPE_CLASSES = {("numpy.dtypes", type(np.dtype(t)).__name__) for t in _NUMERIC_DTYPES}

    def __init__(self, file, source: str = "<pickle>") -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return lambda b: _load_storage_bytes(b, self.source)
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            return lambda storage, offset, size, stride, *rest: _PendingTensor(storage, offset, size, stride, rest)
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (module, name) in (("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar")):
            return _numpy_scalar
        if (module, name) in (("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct")):
            return self._checked_reconstruct
        if (module, name) in self._ALLOWED or (module, name) in self._DTYPE_CLASSES:
            return super().find_class(module, name)
        raise VizDataError(refusal(self.source, module, name))

    def _checked_reconstruct(self, cls, shape, dtype, *rest):
        from numpy._core.multiarray import _reconstruct

        self._arrays = getattr(self, "_arrays", 0) + 1
        check_reconstruct(self.source, f"#{self._arrays} (in file order)", shape, dtype)
        return _reconstruct(cls, shape, dtype, *rest)

    def load(self):
        return _build_tensors(super().load(), "", self.source)


def _build_tensors(x: Any, path: str, source: str, memo: dict[int, Any] | None = None) -> Any:
    """Replace every `_PendingTensor` in a loaded structure (values and keys) by its tensor, after
    checking its view; shared references stay shared."""
    memo = {} if memo is None else memo
    if id(x) in memo:
        return memo[id(x)]
    if isinstance(x, _PendingTensor):
        st = x.storage
        if not isinstance(st, torch.storage.TypedStorage):
            raise VizDataError(f"{source}: tensor {path or '<top>'}: its storage is a {type(st).__name__}, not a tensor storage")
        size = tuple(x.size) if isinstance(x.size, (tuple, list)) else x.size
        stride = tuple(x.stride) if isinstance(x.stride, (tuple, list)) else x.stride
        check_view(source, path or "<top>", size, stride, x.offset, st._untyped_storage.nbytes() // st.dtype.itemsize)
        out = torch._utils._rebuild_tensor(st, x.offset, size, stride)
    elif isinstance(x, dict):
        out = type(x)() if type(x) in (dict, OrderedDict) else {}
        for k, v in x.items():
            where = (
                k
                if not path and isinstance(k, str)
                else f"{path}[{'<tensor>' if isinstance(k, _PendingTensor) else repr(k)[:80]}]"
            )
            out[_build_tensors(k, where + " (key)", source, memo)] = _build_tensors(v, where, source, memo)
    elif isinstance(x, (list, tuple)):
        items = [_build_tensors(v, f"{path}[{i}]", source, memo) for i, v in enumerate(x)]
        out = items if isinstance(x, list) else tuple(items)
    else:
        return x
    memo[id(x)] = out
    return out


def load_raw(path: str | Path, source: str | None = None) -> Any:
    """The object stored in a viz_data file, loaded without running code from the file, after
    checking its structure so that no declared size or tensor view exceeds what the file holds."""
    path = Path(path)
    source = source or str(path)
    try:
        if path.suffix == ".pkl":
            with open(path, "rb") as f:
                return RestrictedUnpickler(f, source).load()
        is_zip = zipfile.is_zipfile(path)
        if is_zip:
            check_torch_zip(path, source)
        else:  # the legacy (pre-zip) torch.save format
            with open(path, "rb") as f:
                check_legacy_torch(f, source)
        with torch.serialization.safe_globals(_numpy_allow_list()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except FileNotFoundError:
        raise VizDataError(f"{source}: file not found") from None
    except (VizDataError, UnsafeFileError) as e:
        raise VizDataError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - every loader failure becomes one clear message
        raise VizDataError(explain_torch_error(e, source)) from e


# ---- normalised payload --------------------------------------------------------------------------


@dataclass
class EdgeBlock:
    """One pair_data entry: `matrix[i, j]` is the edge from src_names[i] to tgt_names[j]."""

    matrix: np.ndarray  # float (n_src, n_tgt)
    src_names: list[int | str]  # channel ids; may end with "bias"
    tgt_names: list[int | str]
    src_location: str
    tgt_location: str


@dataclass
class Snippet:
    location: str
    channel: int
    frac: float
    side: str  # "bottom" | "top"
    rank: int
    tokens: np.ndarray  # int64
    acts: np.ndarray  # float32
    pos: int


@dataclass
class VizData:
    source: str
    circuit: dict[str, np.ndarray]  # location -> int64 channels, in file order
    config: dict
    loss: float
    interv_loss: float
    ch_interv_losses: dict[str, np.ndarray]  # aligned with circuit
    layer_interv_losses: dict[str, float]
    pair_data: list[EdgeBlock]
    pair_data_connections: list[EdgeBlock]
    docs: np.ndarray  # int64 (n_docs, ctx), right-padded with 0
    acts: dict[str, dict[int, Any]]  # location -> channel -> (n_docs, ctx) tensor/array
    samples: dict[str, dict[int, dict[float, Any]]]
    all_loss: list[tuple[int, float]]
    num_total_nodes: int | None
    prune_config: dict
    extra_keys: list[str] = field(default_factory=list)
    unknown_locations: list[str] = field(default_factory=list)  # kept, in the "other" group

    @property
    def n_nodes(self) -> int:
        return sum(len(c) for c in self.circuit.values())

    def nodes(self) -> Iterator[tuple[str, int, int]]:
        """(location, channel, order within circuit[location]) for every node, in file order."""
        for loc, chans in self.circuit.items():
            for i, c in enumerate(chans.tolist()):
                yield loc, int(c), i

    def doc_lengths(self) -> np.ndarray:
        """Length of each doc: the position after which all ids are 0."""
        nz = self.docs != 0
        last = np.where(nz.any(axis=1), self.docs.shape[1] - np.argmax(nz[:, ::-1], axis=1), 0)
        return last.astype(np.int64)

    def node_acts(self, location: str, channel: int) -> np.ndarray | None:
        """Stored task activations of one node (n_docs, ctx) float32, or None if absent."""
        t = self.acts.get(location, {}).get(channel)
        if t is None:
            return None
        a = _to_numpy(t, f"task_samples acts[{location!r}][{channel}]", self.source).astype(np.float32, copy=False)
        if a.shape != self.docs.shape:
            raise VizDataError(
                f"{self.source}: task_samples acts[{location!r}][{channel}] has shape {a.shape}, docs have {self.docs.shape}"
            )
        return a

    def snippets(self, location: str, channel: int) -> Iterator[Snippet]:
        """The node's pretraining snippets, fracs ascending, bottom before top, in stored rank order."""
        by_frac = self.samples.get(location, {}).get(channel, {})
        for frac in sorted(by_frac):
            pair = by_frac[frac]
            what = f"samples[{location!r}][{channel}][{frac}]"
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise VizDataError(f"{self.source}: {what} should be [bottom, top]")
            for side, items in zip(("bottom", "top"), pair, strict=True):
                for rank, item in enumerate(items):
                    if not isinstance(item, (list, tuple)) or len(item) != 3:
                        raise VizDataError(f"{self.source}: {what} {side}[{rank}] should be (tokens, acts, pos)")
                    tokens = _to_numpy(item[0], f"{what} {side}[{rank}] tokens", self.source).reshape(-1)
                    acts = _to_numpy(item[1], f"{what} {side}[{rank}] acts", self.source).reshape(-1).astype(np.float32)
                    if tokens.shape != acts.shape:
                        raise VizDataError(
                            f"{self.source}: {what} {side}[{rank}]: {tokens.size} tokens but {acts.size} activations"
                        )
                    yield Snippet(location, channel, frac, side, rank, np.rint(tokens).astype(np.int64), acts, _to_int(item[2]))


def _to_numpy(x: Any, what: str, source: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, (list, tuple)):
        try:
            return np.asarray(x)
        except ValueError:
            pass
    raise VizDataError(f"{source}: {what} should be a tensor or array, got {type(x).__name__}")


def _to_int(x: Any) -> int:
    if isinstance(x, (torch.Tensor, np.ndarray, np.generic)):
        return int(x.item())
    return int(x)


def _to_int64(x: Any, what: str, source: str) -> int:
    """An integer that fits the tables' int64 columns (a pickle can hold arbitrarily large ints)."""
    try:
        v = _to_int(x)
    except (TypeError, ValueError, OverflowError):
        raise VizDataError(f"{source}: {what} should be an integer, got {x!r:.40}") from None
    if not -(2**63) <= v < 2**63:
        raise VizDataError(f"{source}: {what} = {v} does not fit in 64 bits")
    return v


def _to_float(x: Any, what: str, source: str) -> float:
    try:
        if isinstance(x, (torch.Tensor, np.ndarray, np.generic)):
            return float(x.item())
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise TypeError
        return float(x)
    except (TypeError, ValueError):
        raise VizDataError(f"{source}: {what} should be a number, got {type(x).__name__}") from None


def _require(d: dict, key: str, typ: type | tuple[type, ...], where: str, source: str) -> Any:
    if key not in d:
        raise VizDataError(f"{source}: missing key {where}{key!r}")
    if not isinstance(d[key], typ):
        raise VizDataError(f"{source}: {where}{key!r} should be {getattr(typ, '__name__', typ)}, got {type(d[key]).__name__}")
    return d[key]


def _check_location(loc: Any, what: str, source: str, unknown: set[str] | None = None) -> str:
    """A location must be a string; one this code does not know is kept and collected in `unknown`."""
    if not isinstance(loc, str) or not loc:
        raise VizDataError(f"{source}: {what} has a node location {loc!r} that is not a name (a non-empty string)")
    if unknown is not None and not is_known_location(loc):
        unknown.add(loc)
    return loc


def _edge_blocks(raw: Any, key: str, source: str, unknown: set[str] | None = None) -> list[EdgeBlock]:
    if raw is None:
        return []
    if not isinstance(raw, (list, tuple)):
        raise VizDataError(f"{source}: importances[{key!r}] should be a list, got {type(raw).__name__}")
    entries = list(raw)

    # One release version nests pair_data one level deeper (a list per worker; a worker's list may be empty).
    def per_worker(e: Any) -> bool:
        return isinstance(e, (list, tuple)) and (not e or isinstance(e[0], (list, tuple)))

    if entries and all(per_worker(e) for e in entries):
        entries = [e for worker in entries for e in worker]
    blocks = []
    for n, e in enumerate(entries):
        what = f"importances[{key!r}][{n}]"
        if not isinstance(e, (list, tuple)) or len(e) != 4:
            raise VizDataError(f"{source}: {what} should be [matrix, src_names, tgt_names, (src_location, tgt_location)]")
        matrix = _to_numpy(e[0], f"{what} matrix", source)
        src, tgt = [_names(x, f"{what} names", source) for x in (e[1], e[2])]
        if not isinstance(e[3], (list, tuple)) or len(e[3]) != 2:
            raise VizDataError(f"{source}: {what} should end with (src_location, tgt_location)")
        src_loc, tgt_loc = (_check_location(x, what, source, unknown) for x in e[3])
        if matrix.ndim != 2 or matrix.shape != (len(src), len(tgt)):
            raise VizDataError(f"{source}: {what} matrix has shape {matrix.shape}, names give ({len(src)}, {len(tgt)})")
        blocks.append(EdgeBlock(matrix.astype(np.float32, copy=False), src, tgt, src_loc, tgt_loc))
    return blocks


def _names(x: Any, what: str, source: str) -> list[int | str]:
    if isinstance(x, (torch.Tensor, np.ndarray)):
        x = x.reshape(-1).tolist()
    if not isinstance(x, (list, tuple)):
        raise VizDataError(f"{source}: {what} should be a list, got {type(x).__name__}")
    out: list[int | str] = []
    for i, v in enumerate(x):
        if isinstance(v, str):
            if v != BIAS or i != len(x) - 1:
                raise VizDataError(f"{source}: {what} has the string {v!r} (only a final 'bias' is allowed)")
            out.append(BIAS)
        else:
            c = _to_int64(v, what, source)
            if c < 0:
                raise VizDataError(f"{source}: {what} has the negative channel id {c}")
            out.append(c)
    return out


def _check_snippets(pair: Any, what: str, source: str) -> None:
    """Structure and shapes of one [bottom, top] pair, without reading the tensors' data."""
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
        raise VizDataError(f"{source}: {what} should be [bottom, top]")
    for side, items in zip(("bottom", "top"), pair, strict=True):
        if not isinstance(items, (list, tuple)):
            raise VizDataError(f"{source}: {what} {side} should be a list of (tokens, acts, pos)")
        for rank, item in enumerate(items):
            if not isinstance(item, (list, tuple)) or len(item) != 3:
                raise VizDataError(f"{source}: {what} {side}[{rank}] should be (tokens, acts, pos)")
            n_tok, n_act = (
                int(np.prod(getattr(x, "shape", (len(x),) if isinstance(x, (list, tuple)) else (-1,)))) for x in item[:2]
            )
            if n_tok != n_act or n_tok < 0:
                raise VizDataError(f"{source}: {what} {side}[{rank}]: tokens and activations should be 1-D of equal length")


def parse_viz_data(raw: Any, source: str) -> VizData:
    """Validate a loaded viz_data object and normalise it (see module doc).

    When the file's own `beeg_model_config` is a usable model config, the payload is also checked
    against it (`check_against_model`); the recompute assets check it against the store's model.
    Any unexpected failure while reading the content (an int too large, a malformed nesting) is
    reported as a `VizDataError` naming the file.
    """
    try:
        viz = _parse_viz_data(raw, source)
    except VizDataError:
        raise
    except (ArithmeticError, ValueError, TypeError, IndexError, KeyError, AttributeError, RuntimeError, RecursionError) as e:
        raise VizDataError(f"{source}: malformed content ({type(e).__name__}: {e})") from None
    config = _usable_config(viz.config)
    if config is not None:
        check_against_model(viz, config, "the file's beeg_model_config")
    return viz


def _usable_config(raw: dict):
    """The file's model config as a GPTConfig, or None when it is absent or partial."""
    if not raw:
        return None
    from inference.config import GPTConfig

    try:
        with warnings.catch_warnings():  # unknown keys etc.: the config is only consulted here
            warnings.simplefilter("ignore")
            return GPTConfig.from_dict(raw)
    except Exception:  # noqa: BLE001 - the config is shown verbatim; only a complete one is checked against
        return None


def check_against_model(viz: VizData, config, against: str = "the model") -> None:
    """Refuse a payload that does not fit a model: node locations beyond its layers, channel ids
    beyond a location's width, docs longer than its context, token ids beyond its vocabulary."""
    from inference.circuit import location_width

    src = viz.source

    def check_channels(loc: str, chans, what: str) -> None:
        if not is_known_location(loc):
            return  # kept as an 'other' node: no width to check it against
        layer = parse_location(loc)[0]
        if layer is not None and layer >= config.n_layer:
            raise VizDataError(f"{src}: {what} names layer {layer}, but {against} has {config.n_layer} layers")
        width = location_width(config, loc)
        bad = [c for c in chans if isinstance(c, (int, np.integer)) and not 0 <= c < width]
        if bad:
            raise VizDataError(f"{src}: {what} has channel id {bad[0]} outside [0, {width}) of {against}")

    for loc, chans in viz.circuit.items():
        check_channels(loc, chans.tolist(), f"circuit_data[{loc!r}]")
    for loc, by_ch in viz.acts.items():
        check_channels(loc, list(by_ch), f"task_samples acts[{loc!r}]")
    for loc, by_ch in viz.samples.items():
        check_channels(loc, list(by_ch), f"samples[{loc!r}]")
    for key, blocks in (("pair_data", viz.pair_data), ("pair_data_connections", viz.pair_data_connections)):
        for n, b in enumerate(blocks):
            check_channels(b.src_location, b.src_names, f"importances[{key!r}][{n}] source names")
            check_channels(b.tgt_location, b.tgt_names, f"importances[{key!r}][{n}] target names")
    ctx = viz.docs.shape[1]
    if ctx > config.block_size:
        raise VizDataError(
            f"{src}: task_samples docs have {ctx} positions, more than the block size {config.block_size} of {against}"
        )
    if viz.docs.size and (viz.docs.min() < 0 or viz.docs.max() >= config.vocab_size):
        bad = int(viz.docs.max() if viz.docs.max() >= config.vocab_size else viz.docs.min())
        raise VizDataError(
            f"{src}: task_samples docs hold token id {bad}, outside the vocabulary [0, {config.vocab_size}) of {against}"
        )


def _parse_viz_data(raw: Any, source: str) -> VizData:
    """Validate the top level and hand each part to its parser; `unknown` collects location strings
    this code does not know (kept, in the 'other' group) for one warning per file."""
    if not isinstance(raw, dict):
        raise VizDataError(f"{source}: expected a dict at the top level, got {type(raw).__name__}")
    imp = _require(raw, "importances", dict, "", source)
    unknown: set[str] = set()
    circuit = _parse_circuit(_require(raw, "circuit_data", dict, "", source), source, unknown)
    config = imp.get("beeg_model_config") or {}  # shown verbatim and used for d_head only: optional
    if not isinstance(config, dict):
        raise VizDataError(f"{source}: importances['beeg_model_config'] should be a dict, got {type(config).__name__}")
    loss = _to_float(_require(imp, "loss", object, "importances.", source), "importances['loss']", source)
    interv_loss = _to_float(_require(imp, "interv_loss", object, "importances.", source), "importances['interv_loss']", source)
    ch_interv, layer_interv = _parse_interv_losses(imp, circuit, source)
    docs, acts = _parse_task_samples(_require(imp, "task_samples", (list, tuple), "importances.", source), source, unknown)
    samples = _parse_samples(raw.get("samples") or {}, source, unknown)
    all_loss = _parse_all_loss(raw.get("all_loss") or [], source)
    ntn = raw.get("num_total_nodes")
    prune_config = raw.get("prune_config") or {}
    if not isinstance(prune_config, dict):
        raise VizDataError(f"{source}: 'prune_config' should be a dict")
    known = {"circuit_data", "importances", "samples", "all_loss", "num_total_nodes", "prune_config"}
    pair_data = _edge_blocks(imp.get("pair_data"), "pair_data", source, unknown)
    pair_data_connections = _edge_blocks(imp.get("pair_data_connections"), "pair_data_connections", source, unknown)
    if unknown:  # one warning per file, not per node
        warnings.warn(
            f"{source}: node locations this code does not know, kept in the 'other' group: {sorted(unknown)}",
            UnknownLocationWarning,
            stacklevel=2,
        )
    return VizData(
        source=source,
        circuit=circuit,
        config=config,
        loss=loss,
        interv_loss=interv_loss,
        ch_interv_losses=ch_interv,
        layer_interv_losses=layer_interv,
        pair_data=pair_data,
        pair_data_connections=pair_data_connections,
        docs=docs,
        acts=acts,
        samples=samples,
        all_loss=all_loss,
        num_total_nodes=None if ntn is None else _to_int64(ntn, "num_total_nodes", source),
        prune_config=prune_config,
        extra_keys=sorted(set(raw) - known),
        unknown_locations=sorted(unknown),
    )


def _parse_circuit(circuit_raw: dict, source: str, unknown: set[str]) -> dict[str, np.ndarray]:
    """`circuit_data`: location -> distinct non-negative channel ids, exact as int64."""
    circuit: dict[str, np.ndarray] = {}
    for loc, chans in circuit_raw.items():
        _check_location(loc, "circuit_data", source, unknown)
        a = _to_numpy(chans, f"circuit_data[{loc!r}]", source)
        if a.ndim != 1 or not (np.issubdtype(a.dtype, np.integer) or (a.size and np.all(np.mod(a, 1) == 0)) or a.size == 0):
            raise VizDataError(f"{source}: circuit_data[{loc!r}] should be a 1-D int tensor, got shape {a.shape} dtype {a.dtype}")
        if a.size and not np.issubdtype(a.dtype, np.integer) and np.abs(a).max() >= 2**53:
            raise VizDataError(f"{source}: circuit_data[{loc!r}] has channel ids too large to be exact ({np.abs(a).max():g})")
        a = a.astype(np.int64)
        if a.size and a.min() < 0:
            raise VizDataError(f"{source}: circuit_data[{loc!r}] has the negative channel id {int(a.min())}")
        uniq, counts = np.unique(a, return_counts=True)
        if (counts > 1).any():
            raise VizDataError(
                f"{source}: circuit_data[{loc!r}] lists channel(s) {uniq[counts > 1][:10].tolist()} more than once"
            )
        circuit[loc] = a
    return circuit


def _parse_interv_losses(
    imp: dict, circuit: dict[str, np.ndarray], source: str
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """(`ch_interv_losses`: one value per circuit node, `layer_interv_losses`: one per layer-half)."""
    ch_raw = _require(imp, "ch_interv_losses", dict, "importances.", source)
    ch_interv: dict[str, np.ndarray] = {}
    for loc, chans in circuit.items():
        if len(chans) == 0:
            ch_interv[loc] = np.zeros(0)
            continue
        if loc not in ch_raw:
            raise VizDataError(f"{source}: importances['ch_interv_losses'] has no entry for circuit location {loc!r}")
        v = np.asarray(_to_numpy(ch_raw[loc], f"ch_interv_losses[{loc!r}]", source), dtype=np.float64).reshape(-1)
        if len(v) != len(chans):
            raise VizDataError(f"{source}: ch_interv_losses[{loc!r}] has {len(v)} values for {len(chans)} circuit nodes")
        ch_interv[loc] = v
    layer_raw = imp.get("layer_interv_losses") or {}
    if not isinstance(layer_raw, dict):
        raise VizDataError(f"{source}: importances['layer_interv_losses'] should be a dict")
    layer_interv = {str(k): _to_float(v, f"layer_interv_losses[{k!r}]", source) for k, v in layer_raw.items()}
    return ch_interv, layer_interv


def _parse_task_samples(ts: list | tuple, source: str, unknown: set[str]) -> tuple[np.ndarray, dict[str, dict[int, Any]]]:
    """`task_samples` = [docs (n_docs, ctx) in pairs, acts location -> channel -> (n_docs, ctx)]."""
    if len(ts) != 2 or not isinstance(ts[1], dict):
        raise VizDataError(f"{source}: importances['task_samples'] should be [docs, acts]")
    docs = _to_numpy(ts[0], "task_samples docs", source)
    if docs.ndim != 2:
        raise VizDataError(f"{source}: task_samples docs should be 2-D (n_docs, ctx), got shape {docs.shape}")
    if docs.shape[0] % 2:
        raise VizDataError(f"{source}: task_samples has {docs.shape[0]} docs; they must come in pairs")
    if docs.size and not np.issubdtype(docs.dtype, np.integer) and not np.all(np.abs(docs) < 2**53):
        raise VizDataError(f"{source}: task_samples docs hold token ids that are not finite exact integers")
    docs = np.rint(docs).astype(np.int64)
    acts: dict[str, dict[int, Any]] = {}
    for loc, by_ch in ts[1].items():
        _check_location(loc, "task_samples acts", source, unknown)
        if not isinstance(by_ch, dict):
            raise VizDataError(f"{source}: task_samples acts[{loc!r}] should be a dict channel -> tensor")
        acts[loc] = {_to_int64(c, f"task_samples acts[{loc!r}] channel", source): t for c, t in by_ch.items()}
        if any(c < 0 for c in acts[loc]):
            raise VizDataError(f"{source}: task_samples acts[{loc!r}] has the negative channel id {min(acts[loc])}")
        for c, t in acts[loc].items():  # shapes only: the data stays unread (memory-mapped) until converted
            shape = tuple(getattr(t, "shape", ()))
            if shape != docs.shape:
                raise VizDataError(f"{source}: task_samples acts[{loc!r}][{c}] has shape {shape}, docs have {docs.shape}")
    return docs, acts


def _parse_samples(samples_raw: Any, source: str, unknown: set[str]) -> dict[str, dict[int, dict[float, Any]]]:
    """`samples`: location -> channel -> frac -> [bottom, top] snippets (the pair a tuple or a list)."""
    if not isinstance(samples_raw, dict):
        raise VizDataError(f"{source}: 'samples' should be a dict")
    samples: dict[str, dict[int, dict[float, Any]]] = {}
    for loc, by_ch in samples_raw.items():
        _check_location(loc, "samples", source, unknown)
        if not isinstance(by_ch, dict):
            raise VizDataError(f"{source}: samples[{loc!r}] should be a dict channel -> frac -> [bottom, top]")
        samples[loc] = {}
        for c, by_frac in by_ch.items():
            if not isinstance(by_frac, dict):
                raise VizDataError(f"{source}: samples[{loc!r}][{c}] should be a dict frac -> [bottom, top]")
            if _to_int64(c, f"samples[{loc!r}] channel", source) < 0:
                raise VizDataError(f"{source}: samples[{loc!r}] has the negative channel id {_to_int(c)}")
            samples[loc][_to_int(c)] = {_to_float(f, f"samples[{loc!r}][{c}] frac", source): v for f, v in by_frac.items()}
            for f, pair in by_frac.items():
                _check_snippets(pair, f"samples[{loc!r}][{_to_int(c)}][{f}]", source)
    return samples


def _parse_all_loss(all_loss_raw: Any, source: str) -> list[tuple[int, float]]:
    """`all_loss`: the pruning curve as (step, loss) pairs."""
    all_loss = []
    for i, entry in enumerate(all_loss_raw):
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise VizDataError(f"{source}: all_loss[{i}] should be (step, loss)")
        all_loss.append((_to_int64(entry[0], f"all_loss[{i}] step", source), _to_float(entry[1], f"all_loss[{i}] loss", source)))
    return all_loss


def read_viz_data(path: str | Path, source: str | None = None) -> VizData:
    """Load and validate one viz_data.pt / viz_data.pkl; `source` names it in errors (default: the path)."""
    source = source or str(path)
    return parse_viz_data(load_raw(path, source), source)


def to_jsonable(x: Any) -> Any:
    """prune_config / model config values as JSON-friendly values (tensors and arrays become lists)."""
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return repr(x)
