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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference.circuit import is_known_location

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


def _load_storage_bytes(b: bytes):
    # A tensor pickled with plain pickle carries its storage as a legacy torch.save blob; torch's own
    # `_load_from_bytes` would load it with weights_only=False, so it is never allowed as such.
    return torch.load(io.BytesIO(b), weights_only=True)


class RestrictedUnpickler(pickle.Unpickler):
    """Builds only containers, numbers, strings, numpy arrays and torch tensors; refuses any other global."""

    _ALLOWED = {
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "slice"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_tensor"),
        ("torch", "Size"),
    }
    _DTYPE_CLASSES = {("numpy.dtypes", type(np.dtype(t)).__name__) for t in _NUMERIC_DTYPES}

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _load_storage_bytes
        if (module, name) in self._ALLOWED or (module, name) in self._DTYPE_CLASSES:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (not a plain container, number, array or tensor)")


def load_raw(path: str | Path, source: str | None = None) -> Any:
    """The object stored in a viz_data file, loaded without running code from the file."""
    path = Path(path)
    source = source or str(path)
    try:
        if path.suffix == ".pkl":
            with open(path, "rb") as f:
                return RestrictedUnpickler(f).load()
        with torch.serialization.safe_globals(_numpy_allow_list()):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except FileNotFoundError:
        raise VizDataError(f"{source}: file not found") from None
    except Exception as e:  # noqa: BLE001 - every loader failure becomes one clear message
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VizDataError(f"{source}: cannot be loaded safely ({type(e).__name__}: {first})") from e


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
            raise VizDataError(f"{self.source}: task_samples acts[{location!r}][{channel}] has shape {a.shape}, docs have {self.docs.shape}")
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
                        raise VizDataError(f"{self.source}: {what} {side}[{rank}]: {tokens.size} tokens but {acts.size} activations")
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
            out.append(_to_int(v))
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
            n_tok, n_act = (int(np.prod(getattr(x, "shape", (len(x),) if isinstance(x, (list, tuple)) else (-1,)))) for x in item[:2])
            if n_tok != n_act or n_tok < 0:
                raise VizDataError(f"{source}: {what} {side}[{rank}]: tokens and activations should be 1-D of equal length")


def parse_viz_data(raw: Any, source: str) -> VizData:
    """Validate a loaded viz_data object and normalise it (see module doc)."""
    if not isinstance(raw, dict):
        raise VizDataError(f"{source}: expected a dict at the top level, got {type(raw).__name__}")
    circuit_raw = _require(raw, "circuit_data", dict, "", source)
    imp = _require(raw, "importances", dict, "", source)

    unknown: set[str] = set()
    circuit: dict[str, np.ndarray] = {}
    for loc, chans in circuit_raw.items():
        _check_location(loc, "circuit_data", source, unknown)
        a = _to_numpy(chans, f"circuit_data[{loc!r}]", source)
        if a.ndim != 1 or not (np.issubdtype(a.dtype, np.integer) or (a.size and np.all(np.mod(a, 1) == 0)) or a.size == 0):
            raise VizDataError(f"{source}: circuit_data[{loc!r}] should be a 1-D int tensor, got shape {a.shape} dtype {a.dtype}")
        circuit[loc] = a.astype(np.int64)

    config = imp.get("beeg_model_config") or {}  # shown verbatim and used for d_head only: optional
    if not isinstance(config, dict):
        raise VizDataError(f"{source}: importances['beeg_model_config'] should be a dict, got {type(config).__name__}")
    loss = _to_float(_require(imp, "loss", object, "importances.", source), "importances['loss']", source)
    interv_loss = _to_float(_require(imp, "interv_loss", object, "importances.", source), "importances['interv_loss']", source)

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

    ts = _require(imp, "task_samples", (list, tuple), "importances.", source)
    if len(ts) != 2 or not isinstance(ts[1], dict):
        raise VizDataError(f"{source}: importances['task_samples'] should be [docs, acts]")
    docs = _to_numpy(ts[0], "task_samples docs", source)
    if docs.ndim != 2:
        raise VizDataError(f"{source}: task_samples docs should be 2-D (n_docs, ctx), got shape {docs.shape}")
    if docs.shape[0] % 2:
        raise VizDataError(f"{source}: task_samples has {docs.shape[0]} docs; they must come in pairs")
    docs = np.rint(docs).astype(np.int64)
    acts: dict[str, dict[int, Any]] = {}
    for loc, by_ch in ts[1].items():
        _check_location(loc, "task_samples acts", source, unknown)
        if not isinstance(by_ch, dict):
            raise VizDataError(f"{source}: task_samples acts[{loc!r}] should be a dict channel -> tensor")
        acts[loc] = {_to_int(c): t for c, t in by_ch.items()}
        for c, t in acts[loc].items():  # shapes only: the data stays unread (memory-mapped) until converted
            shape = tuple(getattr(t, "shape", ()))
            if shape != docs.shape:
                raise VizDataError(f"{source}: task_samples acts[{loc!r}][{c}] has shape {shape}, docs have {docs.shape}")

    samples_raw = raw.get("samples") or {}
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
            samples[loc][_to_int(c)] = {_to_float(f, f"samples[{loc!r}][{c}] frac", source): v for f, v in by_frac.items()}
            for f, pair in by_frac.items():
                _check_snippets(pair, f"samples[{loc!r}][{_to_int(c)}][{f}]", source)

    all_loss_raw = raw.get("all_loss") or []
    all_loss = []
    for i, entry in enumerate(all_loss_raw):
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise VizDataError(f"{source}: all_loss[{i}] should be (step, loss)")
        all_loss.append((_to_int(entry[0]), _to_float(entry[1], f"all_loss[{i}] loss", source)))

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
            UnknownLocationWarning, stacklevel=2,
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
        num_total_nodes=None if ntn is None else _to_int(ntn),
        prune_config=prune_config,
        extra_keys=sorted(set(raw) - known),
        unknown_locations=sorted(unknown),
    )


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
